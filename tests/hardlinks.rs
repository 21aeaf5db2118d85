//! Hard links of a lower layer across copy-up: unionmount's documented difference from
//! kernel overlayfs (README "Where it differs"). fuser shows a FUSE node id as `st_ino`, and
//! the names of one lower inode share an `st_ino`, so they are one FUSE inode: once one name
//! is copied up, every name shows the upper copy, and the upper links every name the kernel
//! has looked up (overlayfs `index=on` behaviour). The kernel's default breaks the link
//! instead, so these tests run against unionmount only.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

use common::{Driver, Fixture};

fn unionmount_only() -> bool {
    common::mount_allowed() && common::driver() == Driver::Unionmount
}

#[test]
fn write_to_one_lower_link_shows_in_the_other_and_both_land_in_upper() {
    if !unionmount_only() {
        return;
    }
    let fx = Fixture::new(1);
    fx.mkdir(&fx.lowers[0], "d1", 0o755);
    fx.mkdir(&fx.lowers[0], "d2", 0o755);
    fx.write(&fx.lowers[0], "d1/a", b"lower", 0o640);
    fx.hardlink(&fx.lowers[0], "d1/a", "d2/b");
    let guard = common::mount(&Driver::Unionmount, &fx, true, &[]).expect("mount");
    common::within_mount(&fx, move |f| {
        let ino = fs::symlink_metadata(f.m("d1/a")).unwrap().ino();
        // Both names known to the kernel before the copy-up.
        assert_eq!(fs::symlink_metadata(f.m("d2/b")).unwrap().ino(), ino);
        let mut w = fs::OpenOptions::new()
            .append(true)
            .open(f.m("d1/a"))
            .unwrap();
        w.write_all(b"+more").unwrap();
        drop(w);
        assert_eq!(fs::read(f.m("d1/a")).unwrap(), b"lower+more");
        assert_eq!(fs::read(f.m("d2/b")).unwrap(), b"lower+more");
        let (ma, mb) = (
            fs::symlink_metadata(f.m("d1/a")).unwrap(),
            fs::symlink_metadata(f.m("d2/b")).unwrap(),
        );
        assert_eq!((ma.ino(), mb.ino()), (ino, ino), "st_ino survives copy-up");
        assert_eq!((ma.nlink(), mb.nlink()), (2, 2));
        // In the upper: one inode with both names, the lower untouched.
        let (ua, ub) = (
            fs::symlink_metadata(f.u("d1/a")).unwrap(),
            fs::symlink_metadata(f.u("d2/b")).unwrap(),
        );
        assert_eq!(ua.ino(), ub.ino());
        assert_eq!(ua.nlink(), 2);
        assert_eq!(ua.mode() & 0o7777, 0o640);
        assert_eq!(fs::read(f.l(0, "d1/a")).unwrap(), b"lower");
    });
    guard.unmount().expect("unmount");
}

#[test]
fn lower_link_looked_up_after_copy_up_is_linked_into_upper() {
    if !unionmount_only() {
        return;
    }
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "a", b"v1", 0o644);
    fx.hardlink(&fx.lowers[0], "a", "b");
    let guard = common::mount(&Driver::Unionmount, &fx, true, &[]).expect("mount");
    common::within_mount(&fx, move |f| {
        fs::write(f.m("a"), b"v2").unwrap();
        // "b" was never looked up before the copy-up of "a".
        assert_eq!(fs::read(f.m("b")).unwrap(), b"v2");
        let (ua, ub) = (
            fs::symlink_metadata(f.u("a")).unwrap(),
            fs::symlink_metadata(f.u("b")).unwrap(),
        );
        assert_eq!(ua.ino(), ub.ino(), "b is linked to a's upper copy");
        assert_eq!(
            fs::symlink_metadata(f.m("a")).unwrap().ino(),
            fs::symlink_metadata(f.m("b")).unwrap().ino()
        );
    });
    guard.unmount().expect("unmount");
    // The upper alone now holds what the mount showed: a remount agrees.
    let guard = common::mount(&Driver::Unionmount, &fx, true, &[]).expect("remount");
    common::within_mount(&fx, move |f| {
        assert_eq!(fs::read(f.m("a")).unwrap(), b"v2");
        assert_eq!(fs::read(f.m("b")).unwrap(), b"v2");
    });
    guard.unmount().expect("unmount");
}

#[test]
fn unlink_of_one_lower_link_keeps_the_other() {
    if !unionmount_only() {
        return;
    }
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "a", b"data", 0o644);
    fx.hardlink(&fx.lowers[0], "a", "b");
    let guard = common::mount(&Driver::Unionmount, &fx, true, &[]).expect("mount");
    common::within_mount(&fx, move |f| {
        assert_eq!(fs::read(f.m("b")).unwrap(), b"data");
        fs::remove_file(f.m("a")).unwrap();
        common::assert_enoent(f.m("a"));
        assert_eq!(fs::read(f.m("b")).unwrap(), b"data");
        assert!(common::is_chardev_whiteout(&f.u("a")));
    });
    guard.unmount().expect("unmount");
}

/// The copied-up name of a lower hard link unlinked while open (before its other name was
/// looked up): the copy has no name left for the other one to be linked to, so the other
/// name shows the lower file (as overlayfs without `index` does), listed and openable, as
/// its own inode; the open fd keeps the copy with the write made through it.
#[test]
fn other_lower_link_after_the_open_copy_is_unlinked_shows_the_lower_file() {
    if !unionmount_only() {
        return;
    }
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "a", b"lower data", 0o644);
    fx.hardlink(&fx.lowers[0], "a", "b");
    let guard = common::mount(&Driver::Unionmount, &fx, true, &[]).expect("mount");
    common::within_mount(&fx, move |f| {
        use std::os::unix::fs::FileExt;
        let w = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.m("a"))
            .unwrap();
        w.write_all_at(b"UPPER", 0).unwrap();
        fs::remove_file(f.m("a")).unwrap();
        assert_eq!(common::list_dir(f.mnt.clone()), vec!["b".to_string()]);
        assert_eq!(fs::read(f.m("b")).unwrap(), b"lower data");
        let (mb, mw) = (
            fs::symlink_metadata(f.m("b")).unwrap(),
            w.metadata().unwrap(),
        );
        assert_ne!(mb.ino(), mw.ino(), "b is not the open copy");
        let mut buf = [0u8; 10];
        w.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"UPPER data");
        // b can be deleted too, and the lower stays untouched.
        fs::remove_file(f.m("b")).unwrap();
        assert_eq!(common::list_dir(f.mnt.clone()), Vec::<String>::new());
        assert_eq!(fs::read(f.l(0, "b")).unwrap(), b"lower data");
    });
    guard.unmount().expect("unmount");
}
