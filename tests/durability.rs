//! Durability through the mount, shown on a real disk image: what is in the upper
//! filesystem's on-disk state (not its page cache) after fsync, fdatasync and syncfs
//! return, on a default mount and on `volatile` / `fsync=0` mounts.
//!
//! How: upper and work live on a small ext4 on a loop device, mounted `commit=600` so the
//! journal never commits on its own timer during a test. A "crash image" is a copy of the
//! loop device's backing file taken while everything stays mounted: it holds exactly what
//! the upper filesystem has written to its device, and mounting the copy replays the
//! journal as a reboot would. What a crash would keep is read from that copy.
//!
//! Invariants of the checks:
//! - A positive case (data must be on disk) is deterministic: fsync returned before the
//!   copy was taken.
//! - A negative case (fsync returned, data not on disk yet) is asserted on disk only while
//!   the ext4 journal has not committed since the write (its transaction count in
//!   /proc/fs/jbd2 is unchanged): then the new file cannot be in the image. A `sync(2)`
//!   from some other process on the machine commits every journal and makes that check
//!   impossible; the test then says so and relies on the second check, which always runs:
//!   the daemon, traced with strace, made no fsync/fdatasync/syncfs/sync/sync_file_range
//!   call at all.
//! - Every access through a mount runs under a timeout; every mount (the union, the
//!   ext4, the crash copy) and loop device is undone on drop, also on failure.
//!
//! With `UNIONMOUNT_TEST_DRIVER=kernel` the same tests run on kernel overlayfs (the oracle;
//! no daemon, so no strace check, and no `fsync=0` option). Findings recorded here:
//! - syncfs(2) on a FUSE mount never reaches the daemon (Linux sends FUSE_SYNCFS only to
//!   virtiofs servers; fuser has no handler either): after `sync -f` on a unionmount
//!   mount the data is only in the upper's page cache. Kernel overlayfs syncs the upper.
//!   fsync/fdatasync of the file (or a global sync(2)) is what makes it durable.
//! - Kernel overlayfs `volatile` leaves `work/work/incompat/volatile` behind and refuses
//!   every later mount of that upper/work until it is removed; unionmount (like
//!   fuse-overlayfs, which podman pairs with its own volatile bookkeeping) leaves no marker
//!   and mounts the upper again, but refuses a workdir the kernel marked.
//! - A copy-up's data is written out and waited for (sync_file_range) before its rename,
//!   where the kernel fsyncs the copy: without that, a chmod plus any later fsync on the
//!   upper fs and a crash left a zero-filled upper copy hiding the intact lower file. The
//!   barrier orders the rename after the data's allocation in the journal; no per-copy-up
//!   journal commit is needed for that.
//! - The first fdatasync after a copy-up is a full fsync in unionmount, so the copy-up's
//!   rename is committed with the data. Kernel overlayfs can lose that rename (the file's
//!   fdatasynced bytes vanish behind the lower file); the kernel runs accept that outcome.

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Seconds one step through a mount may take.
const STEP: u64 = 30;

/// Run a command to completion; panic with its stderr when it fails.
fn must(prog: &str, args: &[&str]) -> String {
    let out = run_prog_within(60, prog, args.iter().map(os).collect());
    assert_success(&out, &format!("{prog} {}", args.join(" ")));
    text(&out.stdout)
}

/// A 64 MiB ext4 on a loop device, mounted at `root` with `commit=600`; `upper` and `work`
/// are made inside it. The union's `lower` and `mnt` sit next to it, on the host
/// filesystem. Drop unmounts and detaches everything and removes the files.
struct Disk {
    tmp: TempDir,
    img: PathBuf,
    dev: String,
    root: PathBuf,
    lower: PathBuf,
    mnt: PathBuf,
}

impl Disk {
    fn new(tag: &str) -> Disk {
        let tmp = TempDir::new_in("/var/tmp", tag);
        let img = tmp.path().join("disk.img");
        let root = tmp.path().join("disk");
        let lower = tmp.path().join("lower");
        let mnt = tmp.path().join("mnt");
        for d in [&root, &lower, &mnt] {
            fs::create_dir(d).unwrap();
        }
        fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .expect("size the disk image");
        let img_s = img.to_str().unwrap();
        must("mkfs.ext4", &["-q", "-F", img_s]);
        let dev = must("losetup", &["-f", "--show", img_s]).trim().to_string();
        let disk = Disk {
            tmp,
            img,
            dev,
            root,
            lower,
            mnt,
        };
        must(
            "mount",
            &["-o", "commit=600", &disk.dev, disk.root.to_str().unwrap()],
        );
        fs::create_dir(disk.upper()).unwrap();
        fs::create_dir(disk.work()).unwrap();
        disk
    }

    fn upper(&self) -> PathBuf {
        self.root.join("upper")
    }

    fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    /// Mount the union (lower, upper, work) on `mnt` with `opts`.
    fn mount(&self, opts: &[&str]) -> MountGuard {
        mount_paths(
            &driver(),
            std::slice::from_ref(&self.lower),
            Some(&self.upper()),
            Some(&self.work()),
            &self.mnt,
            opts,
        )
        .expect("mount the union over the ext4 upper")
    }

    /// syncfs on the ext4 itself: everything so far is on disk, the journal committed.
    fn flush(&self) {
        must("sync", &["-f", self.root.to_str().unwrap()]);
    }

    /// Transactions the ext4 journal has committed so far.
    fn commits(&self) -> u64 {
        let name = Path::new(&self.dev).file_name().unwrap().to_str().unwrap();
        let info = fs::read_to_string(format!("/proc/fs/jbd2/{name}-8/info"))
            .expect("read the jbd2 info of the test disk");
        info.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected jbd2 info: {info}"))
    }

    /// What a crash now would leave: a copy of the device's bytes, mounted (the journal is
    /// replayed) read-write on a loop device of its own.
    fn crash_image(&self) -> CrashImage {
        let copy = self.tmp.path().join("crash.img");
        let at = self.tmp.path().join("crash");
        let _ = fs::remove_file(&copy);
        let _ = fs::create_dir(&at);
        fs::copy(&self.img, &copy).expect("copy the disk image");
        must(
            "mount",
            &["-o", "loop", copy.to_str().unwrap(), at.to_str().unwrap()],
        );
        CrashImage { at, copy }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = umount2(&self.mnt, libc::MNT_DETACH);
        }
        if umount2(&self.root, 0).is_err() {
            let _ = umount2(&self.root, libc::MNT_DETACH);
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A mounted copy of the disk as a crash would have left it.
struct CrashImage {
    at: PathBuf,
    copy: PathBuf,
}

impl CrashImage {
    /// Contents of `rel` (relative to the disk's root), None when it does not exist.
    fn read(&self, rel: &str) -> Option<Vec<u8>> {
        match fs::read(self.at.join(rel)) {
            Ok(v) => Some(v),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => panic!("crash image: read {rel}: {e}"),
        }
    }

    fn mode(&self, rel: &str) -> u32 {
        lstat(self.at.join(rel)).unwrap().mode() & 0o7777
    }
}

impl Drop for CrashImage {
    fn drop(&mut self) {
        if umount2(&self.at, 0).is_err() {
            let _ = umount2(&self.at, libc::MNT_DETACH);
        }
        let _ = fs::remove_file(&self.copy);
    }
}

/// The sync-family syscalls strace watches for in the daemon.
const SYNC_CALLS: [&str; 5] = ["fsync", "fdatasync", "syncfs", "sync", "sync_file_range"];

/// strace attached to every thread of a daemon, logging its sync-family syscalls.
struct SyncTrace {
    child: Option<Child>,
    log: PathBuf,
}

impl SyncTrace {
    fn attach(pid: i32, log: PathBuf) -> SyncTrace {
        let child = Command::new("strace")
            .args(["-f", "-qq", "-o"])
            .arg(&log)
            .arg(format!("-etrace={}", SYNC_CALLS.join(",")))
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn strace (Debian package strace)");
        let t = SyncTrace {
            child: Some(child),
            log,
        };
        let traced = wait_for(Duration::from_secs(10), || {
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                return false;
            };
            tasks.flatten().all(|t| {
                fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                    s.lines().any(|l| {
                        l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")
                    })
                })
            })
        });
        assert!(
            traced,
            "strace did not attach to every thread of daemon {pid}"
        );
        t
    }

    /// Detach and return how many calls of each name the daemon made.
    fn finish(mut self) -> Vec<(&'static str, usize)> {
        let mut c = self.child.take().unwrap();
        kill(c.id() as i32, libc::SIGINT);
        let _ = c.wait();
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        SYNC_CALLS
            .iter()
            .map(|name| {
                let call = format!(" {name}(");
                (*name, log.lines().filter(|l| l.contains(&call)).count())
            })
            .collect()
    }
}

impl Drop for SyncTrace {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn count(calls: &[(&str, usize)], name: &str) -> usize {
    calls.iter().find(|(n, _)| *n == name).map_or(0, |c| c.1)
}

/// The strace of the daemon serving `disk.mnt` (unionmount only).
fn trace_daemon(disk: &Disk) -> Option<SyncTrace> {
    if is_kernel() {
        return None;
    }
    let pids = daemon_pids(&disk.mnt);
    assert_eq!(pids.len(), 1, "one daemon serves {}", disk.mnt.display());
    Some(SyncTrace::attach(
        pids[0],
        disk.tmp.path().join("strace.log"),
    ))
}

/// Create `rel` under the mount with `data`, then call `sync` on the open file.
fn write_and(
    mnt: &Path,
    rel: &str,
    data: &'static [u8],
    sync: fn(&fs::File) -> std::io::Result<()>,
) {
    let p = mnt.join(rel);
    with_timeout(STEP, move || {
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(data).unwrap();
        sync(&f).unwrap_or_else(|e| panic!("sync {}: {e}", p.display()));
    });
}

/// fsync and fdatasync on a default mount: the files and their data are on disk when the
/// calls return, and the daemon did call fsync/fdatasync on the upper.
#[test]
fn fsync_and_fdatasync_reach_the_disk() {
    if !mount_allowed() {
        return;
    }
    let disk = Disk::new("dur-fsync");
    fs::write(disk.lower.join("old"), b"old\n").unwrap();
    let _m = disk.mount(&[]);
    disk.flush();
    let trace = trace_daemon(&disk);
    write_and(&disk.mnt, "a", b"fsynced\n", fs::File::sync_all);
    write_and(&disk.mnt, "b", b"fdatasynced\n", fs::File::sync_data);
    let img = disk.crash_image();
    assert_eq!(img.read("upper/a").as_deref(), Some(&b"fsynced\n"[..]));
    assert_eq!(img.read("upper/b").as_deref(), Some(&b"fdatasynced\n"[..]));
    if let Some(t) = trace {
        let calls = t.finish();
        assert!(count(&calls, "fsync") >= 1, "daemon sync calls: {calls:?}");
        assert!(
            count(&calls, "fdatasync") >= 1,
            "daemon sync calls: {calls:?}"
        );
    }
    drop(img);

    // Names: a new directory and file, and a whiteout, made durable by fsync of the
    // directories alone (the journal has not committed since, so only they can do it).
    let before = disk.commits();
    let mnt = disk.mnt.clone();
    with_timeout(STEP, move || {
        fs::create_dir(mnt.join("dd")).unwrap();
        fs::write(mnt.join("dd/e"), b"e\n").unwrap();
        fs::remove_file(mnt.join("old")).unwrap();
    });
    if disk.commits() != before {
        // Still checked below, but then not only the directory fsyncs can have done it.
        eprintln!("note: the test disk's journal committed before the directory fsyncs");
    }
    let mnt = disk.mnt.clone();
    with_timeout(STEP, move || {
        fs::File::open(mnt.join("dd")).unwrap().sync_all().unwrap();
        fs::File::open(&mnt).unwrap().sync_all().unwrap();
    });
    let img = disk.crash_image();
    assert!(img.read("upper/dd/e").is_some(), "upper/dd/e not on disk");
    assert!(
        is_whiteout_in_upper(&img.at.join("upper/old")),
        "no whiteout for old on disk"
    );
}

/// A copy-up followed by fsync is durable: the copied-up file (lower bytes plus the
/// append, its mode) and the directories above it are in the crash image. Also a
/// chmod-only copy-up fsynced through a read-only descriptor.
#[test]
fn copy_up_then_fsync_is_durable() {
    if !mount_allowed() {
        return;
    }
    let disk = Disk::new("dur-copyup");
    fs::create_dir_all(disk.lower.join("a/b")).unwrap();
    fs::write(disk.lower.join("a/b/f"), b"lower\n").unwrap();
    fs::set_permissions(disk.lower.join("a/b/f"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(disk.lower.join("a/g"), b"only chmod\n").unwrap();
    fs::set_permissions(disk.lower.join("a/g"), fs::Permissions::from_mode(0o644)).unwrap();
    let _m = disk.mount(&[]);
    disk.flush();
    let mnt = disk.mnt.clone();
    with_timeout(STEP, move || {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("a/b/f"))
            .unwrap();
        f.write_all(b"appended\n").unwrap();
        f.sync_all().unwrap();
        fs::set_permissions(mnt.join("a/g"), fs::Permissions::from_mode(0o600)).unwrap();
        let g = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(mnt.join("a/g"))
            .unwrap();
        g.sync_all().unwrap();
    });
    let img = disk.crash_image();
    assert_eq!(
        img.read("upper/a/b/f").as_deref(),
        Some(&b"lower\nappended\n"[..])
    );
    assert_eq!(img.mode("upper/a/b/f"), 0o640);
    assert_eq!(img.read("upper/a/g").as_deref(), Some(&b"only chmod\n"[..]));
    assert_eq!(img.mode("upper/a/g"), 0o600);
}

/// fdatasync after a copy-up keeps the upper name: open a lower file for writing (a copy-up
/// with its data), overwrite bytes inside it (no size change, so fdatasync alone would
/// commit no metadata) and fdatasync. The crash image must hold the upper copy with the
/// new bytes. Kernel overlayfs may lose the copy-up's rename here (the lower file shows
/// through after the crash); unionmount makes the first sync after a copy-up a full one.
#[test]
fn fdatasync_after_copy_up_keeps_the_upper_name() {
    if !mount_allowed() {
        return;
    }
    let disk = Disk::new("dur-copyup-fdatasync");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(disk.lower.join("f"), &data).unwrap();
    let _m = disk.mount(&[]);
    disk.flush();
    let p = disk.mnt.join("f");
    with_timeout(STEP, move || {
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"PATCHED", 50_000).unwrap();
        f.sync_data().unwrap();
    });
    let mut want = data.clone();
    want[50_000..50_007].copy_from_slice(b"PATCHED");
    let img = disk.crash_image();
    let on_disk = img.read("upper/f");
    if is_kernel() && on_disk.is_none() {
        eprintln!("note: kernel overlayfs lost the copy-up's rename despite the fdatasync");
        return;
    }
    assert!(
        on_disk.as_deref() == Some(want.as_slice()),
        "after fdatasync the crash image holds upper/f with {:?} bytes",
        on_disk.map(|v| v.len())
    );
}

/// A copy-up nobody fsynced must not lose the lower file's bytes in a crash. A chmod
/// copies `f` up (its bytes unchanged), then another program fsyncs an unrelated file on
/// the same upper filesystem, which commits the journal and with it the copy-up's rename.
/// A crash now may lose the chmod (then the lower file shows through again) but must never
/// leave an upper copy without the data: that would hide the intact lower file behind an
/// empty or short one. Kernel overlayfs fsyncs the copy before the rename for this reason.
#[test]
fn copy_up_without_fsync_never_hides_lower_data_after_a_crash() {
    if !mount_allowed() {
        return;
    }
    let disk = Disk::new("dur-copyup-crash");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(disk.lower.join("f"), &data).unwrap();
    fs::set_permissions(disk.lower.join("f"), fs::Permissions::from_mode(0o644)).unwrap();
    let _m = disk.mount(&[]);
    disk.flush();
    let mnt = disk.mnt.clone();
    with_timeout(STEP, move || {
        fs::set_permissions(mnt.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
    });
    assert_eq!(mode_of(disk.upper().join("f")), 0o600, "chmod copied f up");
    write_and(&disk.mnt, "other", b"other\n", fs::File::sync_all);
    let img = disk.crash_image();
    assert_eq!(img.read("upper/other").as_deref(), Some(&b"other\n"[..]));
    match img.read("upper/f") {
        None => {}
        Some(v) => {
            let differ = v.iter().zip(&data).filter(|(a, b)| a != b).count();
            assert!(
                v == data,
                "after a crash upper/f holds {} bytes ({differ} differ from the lower file's \
                 {}): the intact lower data is hidden behind it",
                v.len(),
                data.len()
            );
        }
    }
}

/// The same with metacopy: a chmod copies `f` up without its bytes, and an append (not
/// synced) copies the bytes into that upper file before it removes the marker. After
/// another program's fsync commits the journal, a crash image holds either the metacopy
/// (marker still on: the bytes are read below) or the upper file with the lower bytes in
/// full: never the marker gone without the bytes.
#[test]
fn metacopy_bytes_copy_never_drops_the_marker_before_the_bytes() {
    if !mount_allowed() || is_kernel() {
        return;
    }
    let disk = Disk::new("dur-metacopy");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    fs::write(disk.lower.join("f"), &data).unwrap();
    let _m = disk.mount(&["metacopy=on"]);
    disk.flush();
    let mnt = disk.mnt.clone();
    with_timeout(STEP, move || {
        fs::set_permissions(mnt.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("f"))
            .unwrap();
        f.write_all(b"tail").unwrap();
    });
    write_and(
        &disk.mnt,
        "other",
        b"other
",
        fs::File::sync_all,
    );
    let img = disk.crash_image();
    assert_eq!(
        img.read("upper/other").as_deref(),
        Some(
            &b"other
"[..]
        )
    );
    let marker = get_xattr(&img.at.join("upper/f"), "trusted.overlay.metacopy").is_ok();
    if let Some(v) = img.read("upper/f")
        && !marker
    {
        assert!(
            v.len() >= data.len() && v[..data.len()] == data[..],
            "after a crash upper/f has no metacopy marker but not the lower bytes ({} bytes)",
            v.len()
        );
    }
}

/// With `opt` (volatile, fsync=0), fsync and fdatasync return success and the data reads
/// back, but nothing was synced: the daemon made no sync call, and (while the journal has
/// not committed) a crash would lose the file.
fn fsync_is_a_no_op_with(opt: &str) {
    let disk = Disk::new("dur-nosync");
    fs::write(disk.lower.join("c"), b"lower c\n").unwrap();
    let _m = disk.mount(&[opt]);
    disk.flush();
    let before = disk.commits();
    let trace = trace_daemon(&disk);
    write_and(&disk.mnt, "v", b"not synced\n", fs::File::sync_all);
    write_and(&disk.mnt, "w", b"not synced either\n", fs::File::sync_data);
    // A copy-up skips its fdatasync too.
    let c = disk.mnt.join("c");
    with_timeout(STEP, move || {
        fs::set_permissions(&c, fs::Permissions::from_mode(0o600)).unwrap();
        fs::File::open(&c).unwrap().sync_all().unwrap();
    });
    assert_eq!(mode_of(disk.upper().join("c")), 0o600, "chmod copied c up");
    let v = disk.mnt.join("v");
    with_timeout(STEP, move || assert_file(v, b"not synced\n"));
    assert_file(disk.upper().join("w"), b"not synced either\n");
    if let Some(t) = trace {
        let calls = t.finish();
        assert!(
            calls.iter().all(|(_, n)| *n == 0),
            "{opt}: the daemon synced: {calls:?}"
        );
    }
    let img = disk.crash_image();
    if disk.commits() == before {
        assert_eq!(img.read("upper/v"), None, "{opt}: upper/v reached the disk");
        assert_eq!(img.read("upper/w"), None, "{opt}: upper/w reached the disk");
        assert_eq!(img.read("upper/c"), None, "{opt}: upper/c reached the disk");
    } else {
        eprintln!(
            "note: {opt}: the test disk's journal committed during the test (a sync(2) \
             elsewhere on the machine?); the on-disk half of the check could not run"
        );
    }
}

#[test]
fn volatile_fsync_returns_but_data_is_not_on_disk() {
    if !mount_allowed() {
        return;
    }
    fsync_is_a_no_op_with("volatile");
}

#[test]
fn fsync_0_fsync_returns_but_data_is_not_on_disk() {
    if !mount_allowed() {
        return;
    }
    if is_kernel() {
        eprintln!("note: kernel overlayfs has no fsync=0 option; nothing to compare");
        return;
    }
    fsync_is_a_no_op_with("fsync=0");
}

/// syncfs (`sync -f FILE`) after writing a file through the mount. Kernel overlayfs syncs
/// the upper filesystem: the file is on disk. On a FUSE mount Linux does not pass syncfs
/// to the daemon (only virtiofs gets FUSE_SYNCFS), so unionmount never sees it: the
/// daemon makes no sync call and the file is not on disk. fsync of the file, the
/// documented way, then makes it durable.
#[test]
fn syncfs_durability() {
    if !mount_allowed() {
        return;
    }
    let disk = Disk::new("dur-syncfs");
    let _m = disk.mount(&[]);
    disk.flush();
    let before = disk.commits();
    let trace = trace_daemon(&disk);
    let p = disk.mnt.join("s");
    with_timeout(STEP, move || {
        fs::write(&p, b"syncfs\n").unwrap();
        let out = Command::new("sync")
            .arg("-f")
            .arg(&p)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_success(&out, "sync -f FILE-IN-MOUNT");
    });
    let img = disk.crash_image();
    if is_kernel() {
        assert_eq!(img.read("upper/s").as_deref(), Some(&b"syncfs\n"[..]));
        return;
    }
    let calls = trace.unwrap().finish();
    assert!(
        calls.iter().all(|(_, n)| *n == 0),
        "syncfs reached the daemon ({calls:?}): Linux now forwards syncfs to FUSE; \
         update this test and the README"
    );
    if disk.commits() == before {
        assert_eq!(img.read("upper/s"), None, "upper/s on disk without a sync");
    } else {
        eprintln!("note: the test disk's journal committed during the test; on-disk check skipped");
    }
    drop(img);
    let p = disk.mnt.join("s");
    with_timeout(STEP, move || {
        fs::File::open(&p).unwrap().sync_all().unwrap()
    });
    let img = disk.crash_image();
    assert_eq!(img.read("upper/s").as_deref(), Some(&b"syncfs\n"[..]));
}

/// After a `volatile` mount is unmounted, what does the next (default) mount of the same
/// upper/work do? Kernel overlayfs leaves `work/work/incompat/volatile` and refuses every
/// later mount until it is removed. unionmount leaves no marker (as fuse-overlayfs), but
/// it honours the kernel's: over a workdir the kernel marked it refuses to mount, names the
/// marker, and leaves it in place. Once it is removed the mount shows what was written and
/// the workdir is clean.
#[test]
fn remount_after_volatile() {
    if !mount_allowed() {
        return;
    }
    let disk = Disk::new("dur-volremount");
    let m = disk.mount(&["volatile"]);
    let p = disk.mnt.join("kept");
    with_timeout(STEP, move || fs::write(p, b"kept\n").unwrap());
    m.unmount().expect("unmount the volatile mount");
    let marker = disk.work().join("work/incompat/volatile");
    if is_kernel() {
        assert!(marker.is_dir(), "kernel overlayfs left no volatile marker");
    } else {
        assert!(!marker.exists(), "unionmount left {}", marker.display());
        // What a volatile kernel overlay mount of this upper would have left.
        fs::create_dir_all(&marker).unwrap();
        fs::write(marker.join("dirty"), b"").unwrap();
    }
    let refused = mount_paths(
        &driver(),
        std::slice::from_ref(&disk.lower),
        Some(&disk.upper()),
        Some(&disk.work()),
        &disk.mnt,
        &[],
    );
    let Err(e) = refused else {
        panic!("mounted over a workdir marked work/incompat/volatile");
    };
    if !is_kernel() {
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "workdir {}: work/incompat/volatile exists",
                disk.work().display()
            )),
            "error: {msg}"
        );
    }
    assert!(
        marker.join("dirty").exists(),
        "the volatile marker was erased"
    );
    fs::remove_dir_all(&marker).unwrap();
    let _m = disk.mount(&[]);
    let p = disk.mnt.join("kept");
    with_timeout(STEP, move || assert_file(p, b"kept\n"));
    assert_work_clean(&disk.work());
}

/// xorshift64*: a small deterministic generator, so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        common::xorshift64star(&mut self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let tag = self.next();
        (0..len)
            .map(|i| (tag.wrapping_add(i as u64 * 131) >> 7) as u8)
            .collect()
    }
}

/// What a crash must keep of one file, by the last thing done to it.
#[derive(Clone, Debug)]
enum Kept {
    /// Last change fsynced: exactly these bytes.
    Exact(Vec<u8>),
    /// Only copied up (chmod), never synced: the lower bytes, or no upper copy at all.
    LowerOrAbsent(Vec<u8>),
    /// Kernel overlayfs only: fdatasynced after a copy-up that no full fsync has followed.
    /// The data is synced but the copy-up's rename may not be, so a crash may leave no
    /// upper copy (the lower file shows through). unionmount commits the rename too.
    ExactOrAbsent(Vec<u8>),
    /// Written after its last sync: nothing to promise.
    Anything,
}

/// Random rounds of creates, appends, overwrites and chmod copy-ups through the mount,
/// some fsynced or fdatasynced, each round ending with a crash image that must hold every
/// fsynced file exactly and no lower file hidden by a copy without its data.
/// `UNIONMOUNT_DURABILITY_ROUNDS` (default 3) and `UNIONMOUNT_DURABILITY_SEED` (default:
/// the clock; printed) drive it; scripts/durability-soak.sh runs many rounds.
#[test]
fn random_fsyncs_survive_crash_images() {
    if !mount_allowed() {
        return;
    }
    let rounds: u64 = std::env::var("UNIONMOUNT_DURABILITY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("UNIONMOUNT_DURABILITY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("random_fsyncs_survive_crash_images: seed {seed}, {rounds} rounds");
    let mut rng = Rng(seed);
    let disk = Disk::new("dur-random");
    let mut kept: std::collections::BTreeMap<String, Kept> = Default::default();
    let mut current: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    for i in 0..24 {
        let name = format!("l{i}");
        let n = rng.below(300_000) as usize;
        let data = rng.bytes(n);
        fs::write(disk.lower.join(&name), &data).unwrap();
        current.insert(name, data);
    }
    let lowers: Vec<String> = current.keys().cloned().collect();
    let _m = disk.mount(&[]);
    let (mut ops, mut syncs, mut checked) = (0u64, 0u64, 0u64);
    // Lower files whose upper name a sync has made durable (see Kept::ExactOrAbsent).
    let mut name_durable = std::collections::BTreeSet::new();
    for round in 0..rounds {
        for _ in 0..12 {
            let names: Vec<String> = current.keys().cloned().collect();
            let kind = rng.below(4);
            let name = match kind {
                0 => format!("n{round}_{}", rng.below(1000)),
                _ => names[rng.below(names.len() as u64) as usize].clone(),
            };
            let sync = rng.below(3);
            let mut data = current.get(&name).cloned().unwrap_or_default();
            let p = disk.mnt.join(&name);
            match kind {
                // chmod only: a metadata copy-up of a lower file, never synced.
                3 if lowers.contains(&name) && !kept.contains_key(&name) => {
                    let q = p.clone();
                    with_timeout(STEP, move || {
                        fs::set_permissions(&q, fs::Permissions::from_mode(0o600)).unwrap()
                    });
                    kept.insert(name.clone(), Kept::LowerOrAbsent(data.clone()));
                    ops += 1;
                    continue;
                }
                _ => {}
            }
            // (truncate first, offset, bytes): a new or replaced file, an append, or a
            // patch in place; the last two copy a lower file up with its data.
            let (trunc, at, bytes) = match kind {
                0 => {
                    let n = rng.below(200_000) as usize + 1;
                    (true, 0, rng.bytes(n))
                }
                1 => {
                    let n = rng.below(70_000) as usize;
                    (false, data.len(), rng.bytes(n))
                }
                _ => {
                    let n = rng.below(20_000) as usize + 1;
                    let at = rng.below(data.len() as u64 + 1) as usize;
                    (false, at, rng.bytes(n))
                }
            };
            if trunc {
                data.clear();
            }
            let end = (at + bytes.len()).max(data.len());
            data.resize(end, 0);
            data[at..at + bytes.len()].copy_from_slice(&bytes);
            with_timeout(STEP, move || {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(trunc)
                    .open(&p)
                    .unwrap();
                f.write_all_at(&bytes, at as u64).unwrap();
                match sync {
                    0 => f.sync_all().unwrap(),
                    1 => f.sync_data().unwrap(),
                    _ => {}
                }
            });
            ops += 1;
            if sync == 0 || (sync == 1 && !is_kernel()) {
                name_durable.insert(name.clone());
            }
            let k = if sync < 2 {
                syncs += 1;
                if lowers.contains(&name) && !name_durable.contains(&name) {
                    Kept::ExactOrAbsent(data.clone())
                } else {
                    Kept::Exact(data.clone())
                }
            } else {
                Kept::Anything
            };
            kept.insert(name.clone(), k);
            current.insert(name, data);
        }
        let img = disk.crash_image();
        for (name, k) in &kept {
            let on_disk = img.read(&format!("upper/{name}"));
            match k {
                Kept::Exact(want) => assert!(
                    on_disk.as_deref() == Some(want.as_slice()),
                    "seed {seed} round {round}: {name} was synced with {} bytes, the crash \
                     image holds {:?} bytes",
                    want.len(),
                    on_disk.map(|v| v.len())
                ),
                Kept::LowerOrAbsent(lower) => assert!(
                    on_disk.is_none() || on_disk.as_deref() == Some(lower.as_slice()),
                    "seed {seed} round {round}: {name}'s upper copy in the crash image is not \
                     the lower file's bytes"
                ),
                Kept::ExactOrAbsent(want) => assert!(
                    on_disk.is_none() || on_disk.as_deref() == Some(want.as_slice()),
                    "seed {seed} round {round}: {name} was fdatasynced with {} bytes, the \
                     crash image holds {:?} bytes",
                    want.len(),
                    on_disk.map(|v| v.len())
                ),
                Kept::Anything => continue,
            }
            checked += 1;
        }
    }
    for (name, data) in &current {
        assert_eq!(
            fs::read(disk.upper().join(name))
                .ok()
                .or_else(|| fs::read(disk.lower.join(name)).ok())
                .as_deref(),
            Some(data.as_slice()),
            "live content of {name}"
        );
    }
    eprintln!(
        "random_fsyncs_survive_crash_images: seed {seed}: {rounds} rounds, {ops} ops, {syncs} \
         syncs, {checked} files checked in crash images"
    );
}
