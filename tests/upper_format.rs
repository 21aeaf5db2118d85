//! What unionmount leaves in the upper and workdir beyond the per-rule tests: the `.wh.`
//! fallback when mknod of a whiteout is refused, leftovers of an earlier run cleaned at
//! mount, and the refusal to create a 0/0 character device (which would be a whiteout).

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use common::{Driver, Fixture};

#[test]
fn whiteouts_fall_back_to_oci_files_when_mknod_is_refused() {
    if !common::mount_allowed() || common::driver() != Driver::Unionmount {
        return;
    }
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "f", b"lower", 0o644);
    fx.mkdir(&fx.lowers[0], "d", 0o755);
    fx.write(&fx.lowers[0], "d/inner", b"i", 0o644);
    fx.mkdir(&fx.lowers[0], "e", 0o755);
    fx.write(&fx.lowers[0], "e/x", b"x", 0o644);
    let guard = common::mount_paths_env(
        &Driver::Unionmount,
        &fx.lowers,
        Some(&fx.upper),
        Some(&fx.work),
        &fx.mnt,
        &[],
        &[("UNIONMOUNT_TEST_NO_MKNOD_WHITEOUT", "1")],
    )
    .expect("mount");
    common::within_mount(&fx, move |f| {
        fs::remove_file(f.m("f")).unwrap();
        fs::remove_file(f.m("d/inner")).unwrap();
        fs::remove_dir(f.m("d")).unwrap();
        fs::remove_file(f.m("e/x")).unwrap();
        fs::remove_dir(f.m("e")).unwrap();
        fs::create_dir(f.m("e")).unwrap();
        common::assert_enoent(f.m("f"));
        common::assert_enoent(f.m("d"));
        assert_eq!(common::list_dir(f.m("e")), Vec::<String>::new());
        assert_eq!(common::list_dir(&f.mnt), vec!["e"]);
        // The upper holds empty `.wh.` files, no character devices.
        for wh in [".wh.f", ".wh.d"] {
            let m = fs::symlink_metadata(f.u(wh)).unwrap();
            assert!(m.file_type().is_file() && m.len() == 0, "{wh}");
        }
        assert!(!fs::symlink_metadata(f.u("f")).is_ok_and(|m| m.file_type().is_char_device()));
        // mkdir over the whiteout: opaque dir, its `.wh.` gone.
        common::assert_enoent(f.u(".wh.e"));
        assert!(common::is_opaque_in_upper(&f.u("e")));
        assert_eq!(common::list_dir(&f.upper), vec![".wh.d", ".wh.f", "e"]);
    });
    guard.unmount().expect("unmount");
    // A remount without the hook reads the OCI dialect back to the same tree.
    let guard = common::mount(&Driver::Unionmount, &fx, true, &[]).expect("remount");
    common::within_mount(&fx, move |f| {
        assert_eq!(common::list_dir(&f.mnt), vec!["e"]);
        assert_eq!(common::list_dir(f.m("e")), Vec::<String>::new());
    });
    guard.unmount().expect("unmount");
}

#[test]
fn workdir_leftovers_are_removed_at_mount() {
    if !common::mount_allowed() || common::driver() != Driver::Unionmount {
        return;
    }
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "a", b"a", 0o644);
    // What a daemon killed mid copy-up leaves behind.
    let w = fx.work.join("work");
    fs::create_dir_all(w.join("#dead.1/sub")).unwrap();
    fs::write(w.join("#dead.1/sub/partial"), b"half").unwrap();
    fs::write(w.join("#dead.2"), b"partial copy").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", w.join("#dead.3")).unwrap();
    let guard = common::mount(&Driver::Unionmount, &fx, true, &[]).expect("mount");
    assert_eq!(common::list_dir(&w), Vec::<String>::new());
    assert_eq!(
        fs::read("/etc/passwd").map(|v| v.is_empty()).ok(),
        Some(false)
    );
    common::within_mount(&fx, move |f| {
        fs::write(f.m("a"), b"changed").unwrap();
        assert_eq!(fs::read(f.u("a")).unwrap(), b"changed");
    });
    guard.unmount().expect("unmount");
    assert_eq!(common::list_dir(&w), Vec::<String>::new());
}

#[test]
fn mknod_of_a_whiteout_device_is_eperm() {
    if !common::mount_allowed() {
        return;
    }
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "f", b"x", 0o644);
    let guard = common::mount(&common::driver(), &fx, true, &[]).expect("mount");
    common::within_mount(&fx, move |f| {
        common::assert_errno(
            common::mknod(&f.m("wh"), libc::S_IFCHR | 0o644, 0),
            libc::EPERM,
        );
        common::assert_errno(
            common::mknod(&f.m("f"), libc::S_IFCHR | 0o644, 0),
            libc::EEXIST,
        );
        // Other devices are fine.
        common::mknod(&f.m("null"), libc::S_IFCHR | 0o666, common::makedev(1, 3)).unwrap();
        assert_eq!(
            fs::symlink_metadata(f.u("null")).unwrap().rdev(),
            common::makedev(1, 3)
        );
        assert_eq!(common::list_dir(&f.mnt), vec!["f", "null"]);
    });
    guard.unmount().expect("unmount");
}
