//! FUSE passthrough: negotiated as root (Linux 6.9+), off with `passthrough=off`, and the
//! rules that keep it safe: a lower file never backs a writable open (on a writable mount,
//! lower files are served by the daemon; on a mount without an upper they pass through), one
//! io mode per inode so readers and writers always coexist, setuid cleared on write by a
//! non-owner even though the write bypasses the daemon. What each open did is read from the
//! daemon's log (`--log-file`, debug level for the adapter).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{Driver, Fixture};

fn log_opt(fx: &Fixture) -> (String, std::path::PathBuf) {
    let log = fx.dir.join("daemon.log");
    (log.display().to_string(), log)
}

fn mount_logged(fx: &Fixture, extra: &[&str]) -> (common::MountGuard, std::path::PathBuf) {
    mount_logged_rw(fx, true, extra)
}

fn mount_logged_rw(
    fx: &Fixture,
    rw: bool,
    extra: &[&str],
) -> (common::MountGuard, std::path::PathBuf) {
    let (log_s, log) = log_opt(fx);
    let g = common::mount_paths_env(
        &Driver::Unionmount,
        &fx.lowers,
        rw.then_some(fx.upper.as_path()),
        rw.then_some(fx.work.as_path()),
        &fx.mnt,
        extra,
        &[
            ("UNIONMOUNT_LOG_FILE", log_s.as_str()),
            ("RUST_LOG", "info,unionmount::fuse=debug"),
        ],
    )
    .expect("mount");
    (g, log)
}

fn log_says(log: &Path, what: &str) -> bool {
    fs::read_to_string(log).unwrap_or_default().contains(what)
}

fn log_count(log: &Path, what: &str) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .matches(what)
        .count()
}

fn applies() -> bool {
    common::mount_allowed()
        && common::driver() == Driver::Unionmount
        // A suite rerun with passthrough=off has nothing to check here.
        && std::env::var("UNIONMOUNT_TEST_OPTS").map_or(true, |o| !o.contains("passthrough"))
}

/// One lower layer holding a file `f` = "lower".
fn lower_file_f() -> Fixture {
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "f", b"lower", 0o644);
    fx
}

#[test]
fn passthrough_is_negotiated_and_serves_reads_writes_and_mmap() {
    if !applies() {
        return;
    }
    let fx = Fixture::new(1);
    let big: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
    fx.write(&fx.lowers[0], "big", &big, 0o644);
    fx.write(&fx.lowers[0], "small", b"lower", 0o644);
    let (guard, log) = mount_logged(&fx, &[]);
    assert!(
        log_says(&log, "capability passthrough: on"),
        "log: {:?}",
        fs::read_to_string(&log)
    );
    common::within_mount(&fx, move |f| {
        assert_eq!(fs::read(f.m("big")).unwrap(), big);
        // Write through a passthrough open: lands in the upper, lower untouched.
        let mut w = fs::OpenOptions::new()
            .append(true)
            .open(f.m("small"))
            .unwrap();
        w.write_all(b"+upper").unwrap();
        drop(w);
        assert_eq!(fs::read(f.m("small")).unwrap(), b"lower+upper");
        assert_eq!(fs::read(f.u("small")).unwrap(), b"lower+upper");
        assert_eq!(fs::read(f.l(0, "small")).unwrap(), b"lower");
        assert_eq!(fs::metadata(f.m("small")).unwrap().len(), 11);
        // A file created through the mount is passthrough-backed by its upper file.
        fs::write(f.m("new"), b"created").unwrap();
        assert_eq!(fs::read(f.u("new")).unwrap(), b"created");
    });
    guard.unmount().expect("unmount");
}

#[test]
fn passthrough_off_falls_back_to_daemon_io() {
    if !applies() {
        return;
    }
    let fx = lower_file_f();
    let (guard, log) = mount_logged(&fx, &["passthrough=off"]);
    assert!(log_says(&log, "capability passthrough: off"));
    assert!(!log_says(&log, "capability passthrough: on"));
    // Without passthrough, writes are cached by the kernel (writeback cache).
    assert!(log_says(&log, "capability writeback_cache: on"));
    common::within_mount(&fx, move |f| {
        let mut w = fs::OpenOptions::new().append(true).open(f.m("f")).unwrap();
        w.write_all(b"!").unwrap();
        drop(w);
        assert_eq!(fs::read(f.m("f")).unwrap(), b"lower!");
        assert_eq!(fs::read(f.u("f")).unwrap(), b"lower!");
        // O_APPEND through the writeback cache: the kernel places the bytes.
        for _ in 0..3 {
            let mut w = fs::OpenOptions::new().append(true).open(f.m("f")).unwrap();
            w.write_all(b"+").unwrap();
        }
        assert_eq!(fs::read(f.m("f")).unwrap(), b"lower!+++");
        assert_eq!(fs::read(f.u("f")).unwrap(), b"lower!+++");
        // A write-only open of a file with a read-only-for-others mode still works.
        let mut w = fs::OpenOptions::new().write(true).open(f.m("f")).unwrap();
        w.write_all(b"L").unwrap();
        drop(w);
        assert_eq!(fs::read(f.m("f")).unwrap(), b"Lower!+++");
    });
    guard.unmount().expect("unmount");
}

#[test]
fn reader_of_a_lower_file_and_a_writer_coexist() {
    if !applies() {
        return;
    }
    let fx = lower_file_f();
    let (guard, log) = mount_logged(&fx, &[]);
    common::within_mount(&fx, move |f| {
        let mut reader = fs::File::open(f.m("f")).unwrap();
        let mut first = [0u8; 2];
        reader.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"lo");
        // Opening for write while the lower file is open for reading: copy-up, no error.
        let mut w = fs::OpenOptions::new().write(true).open(f.m("f")).unwrap();
        w.write_all(b"UPPER").unwrap();
        drop(w);
        // The reader now reads the upper copy (as overlayfs since 4.19).
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"PER");
        drop(reader);
        assert_eq!(fs::read(f.u("f")).unwrap(), b"UPPER");
        assert_eq!(fs::read(f.l(0, "f")).unwrap(), b"lower");
    });
    guard.unmount().expect("unmount");
    // On a writable mount the lower file was served by the daemon, never passed through.
    assert!(log_says(&log, "(lower file): served by the daemon"));
    assert_eq!(log_count(&log, "(lower file): passthrough"), 0);
}

/// `passthrough=all`: a lower file (of 256 KiB and more) opened read-only passes through to
/// the lower file on a writable mount; smaller ones stay with the daemon. A writer (and any
/// opener) that comes while such readers are open finds the copy-up under a new inode
/// number: its first open answers ESTALE, the kernel walks the path again, and every name of
/// the file (hard links too) now leads to the copy. The old readers keep reading the lower
/// bytes; the lower is never written.
#[test]
fn passthrough_all_passes_lower_reads_through_and_moves_writers_to_the_copy() {
    if !applies() {
        return;
    }
    let fx = Fixture::new(1);
    let tail = vec![b'.'; 256 * 1024];
    let pad = move |s: &[u8]| [s, &tail[..]].concat();
    fx.write(&fx.lowers[0], "d/f", &pad(b"lower"), 0o644);
    fs::hard_link(fx.lowers[0].join("d/f"), fx.lowers[0].join("d/g")).unwrap();
    fx.write(&fx.lowers[0], "d/quiet", &pad(b"quiet"), 0o644);
    fx.write(&fx.lowers[0], "small", b"small", 0o644);
    let (guard, log) = mount_logged(&fx, &["passthrough=all"]);
    common::within_mount(&fx, move |f| {
        assert_eq!(fs::read(f.m("small")).unwrap(), b"small");
        let ino_before = fs::metadata(f.m("d/f")).unwrap().ino();
        assert_eq!(fs::metadata(f.m("d/g")).unwrap().ino(), ino_before);
        // Without readers in the way a copy-up keeps the inode number (as overlayfs).
        let q = fs::metadata(f.m("d/quiet")).unwrap().ino();
        assert!(fs::read(f.m("d/quiet")).unwrap() == pad(b"quiet"));
        fs::OpenOptions::new()
            .append(true)
            .open(f.m("d/quiet"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        assert_eq!(fs::metadata(f.m("d/quiet")).unwrap().ino(), q);
        assert!(fs::read(f.m("d/quiet")).unwrap() == [pad(b"quiet"), b"!".to_vec()].concat());

        let mut reader = fs::File::open(f.m("d/f")).unwrap();
        let mut first = [0u8; 2];
        reader.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"lo");
        let mut w = fs::OpenOptions::new().write(true).open(f.m("d/f")).unwrap();
        w.write_all(b"UPPER").unwrap();
        drop(w);
        // Both names show the copy, under one new number.
        let ino_after = fs::metadata(f.m("d/f")).unwrap().ino();
        assert_ne!(ino_after, ino_before);
        assert_eq!(fs::metadata(f.m("d/g")).unwrap().ino(), ino_after);
        assert!(fs::read(f.m("d/f")).unwrap() == pad(b"UPPER"));
        assert!(fs::read(f.m("d/g")).unwrap() == pad(b"UPPER"));
        // The old reader keeps its lower view, and fstat agrees with what it reads.
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest == pad(b"lower")[2..]);
        assert_eq!(reader.metadata().unwrap().len(), pad(b"lower").len() as u64);
        drop(reader);
        // Opens after the readers left: the same new node, passed through to the upper.
        fs::OpenOptions::new()
            .append(true)
            .open(f.m("d/g"))
            .unwrap()
            .write_all(b"+")
            .unwrap();
        let want = [pad(b"UPPER"), b"+".to_vec()].concat();
        assert!(fs::read(f.m("d/f")).unwrap() == want);
        assert_eq!(fs::metadata(f.m("d/f")).unwrap().ino(), ino_after);
        assert!(fs::read(f.u("d/f")).unwrap() == want);
        assert!(fs::read(f.l(0, "d/f")).unwrap() == pad(b"lower"));
        assert!(fs::read(f.l(0, "d/quiet")).unwrap() == pad(b"quiet"));
        // The upper holds the one copied-up object under both names, and nothing else.
        let mut names: Vec<_> = fs::read_dir(f.u("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["f", "g", "quiet"]);
        assert_eq!(
            fs::metadata(f.u("d/f")).unwrap().ino(),
            fs::metadata(f.u("d/g")).unwrap().ino()
        );
    });
    guard.unmount().expect("unmount");
    // d/quiet and d/f passed through to their lower files; "small" was served by the daemon.
    assert_eq!(log_count(&log, "(lower file): passthrough"), 2);
    assert_eq!(log_count(&log, "(lower file): served by the daemon"), 1);
    assert_eq!(log_count(&log, "copied up under lower readers"), 1);
}

#[test]
fn upper_files_pass_through_on_a_writable_mount() {
    if !applies() {
        return;
    }
    let fx = lower_file_f();
    let (guard, log) = mount_logged(&fx, &[]);
    common::within_mount(&fx, move |f| {
        fs::write(f.m("new"), b"created").unwrap();
        assert_eq!(fs::read(f.m("new")).unwrap(), b"created");
        fs::write(f.m("f"), b"rewritten").unwrap();
        assert_eq!(fs::read(f.m("f")).unwrap(), b"rewritten");
    });
    guard.unmount().expect("unmount");
    assert!(
        log_count(&log, "(upper file): passthrough") >= 4,
        "{}",
        fs::read_to_string(&log).unwrap()
    );
    assert_eq!(log_count(&log, "(upper file): served by the daemon"), 0);
}

/// A mount without an upper: by default the kernel opens files without a round trip
/// (`no_open`): reads come without a handle and are served by inode, the page cache stays
/// across opens, and a second read of the file sends no request at all. With
/// `UNIONMOUNT_NO_OPEN=0` the daemon answers OPEN and lower files pass through instead.
#[test]
fn lower_files_on_a_mount_without_upper_need_no_open_or_pass_through() {
    if !applies() {
        return;
    }
    for no_open in [true, false] {
        let fx = Fixture::new(2);
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 13) as u8).collect();
        fx.write(&fx.lowers[1], "f", &data, 0o644);
        let (log_s, log) = log_opt(&fx);
        let guard = common::mount_paths_env(
            &Driver::Unionmount,
            &fx.lowers,
            None,
            None,
            &fx.mnt,
            &[],
            &[
                ("UNIONMOUNT_LOG_FILE", log_s.as_str()),
                ("RUST_LOG", "info,unionmount::fuse=debug,fuser=debug"),
                ("UNIONMOUNT_NO_OPEN", if no_open { "1" } else { "0" }),
            ],
        )
        .expect("mount");
        let log2 = log.clone();
        let reads = common::within_mount(&fx, move |f| {
            assert_eq!(fs::read(f.m("f")).unwrap(), data);
            let first = log_count(&log2, " READ ");
            assert_eq!(fs::read(f.m("f")).unwrap(), data);
            common::assert_errno(
                fs::OpenOptions::new().write(true).open(f.m("f")),
                libc::EROFS,
            );
            (first, log_count(&log2, " READ "))
        });
        guard.unmount().expect("unmount");
        let text = fs::read_to_string(&log).unwrap_or_default();
        if no_open {
            assert!(log_says(&log, "capability no_open: on"), "{text}");
            assert_eq!(
                log_count(&log, " OPEN "),
                1,
                "one OPEN (answered ENOSYS): {text}"
            );
            assert!(reads.0 > 0, "the first read is served by READ requests");
            assert_eq!(
                reads.0, reads.1,
                "the second read is served from the page cache"
            );
        } else {
            assert!(!log_says(&log, "capability no_open: on"), "{text}");
            assert!(log_says(&log, "(lower file): passthrough"), "{text}");
            assert_eq!(reads, (0, 0), "passthrough reads send no READ");
        }
    }
}

#[test]
fn mmap_shared_write_through_passthrough_reaches_upper() {
    if !applies() {
        return;
    }
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "m", b"0123456789", 0o644);
    let (guard, _log) = mount_logged(&fx, &[]);
    common::within_mount(&fx, move |f| {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import mmap,sys\nf=open(sys.argv[1],'r+b')\nm=mmap.mmap(f.fileno(),0)\n\
                 m[0:3]=b'abc'\nm.flush()\nm.close()\nf.close()",
            )
            .arg(f.m("m"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(fs::read(f.m("m")).unwrap(), b"abc3456789");
        assert_eq!(fs::read(f.u("m")).unwrap(), b"abc3456789");
        assert_eq!(fs::read(f.l(0, "m")).unwrap(), b"0123456789");
    });
    guard.unmount().expect("unmount");
}

#[test]
fn write_by_non_owner_through_passthrough_clears_setuid() {
    if !applies() {
        return;
    }
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "s", b"#!/bin/sh\n", 0o4777);
    fs::set_permissions(&fx.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    let (guard, log) = mount_logged(&fx, &[]);
    assert!(log_says(&log, "capability passthrough: on"));
    common::within_mount(&fx, move |f| {
        assert_eq!(fs::metadata(f.m("s")).unwrap().mode() & 0o7777, 0o4777);
        let (rc, _out, err) = common::sh_as(
            Some((1000, 1000)),
            Path::new("/"),
            &format!("echo x >> {}", f.m("s").display()),
        );
        assert_eq!(rc, 0, "{err}");
        assert_eq!(fs::metadata(f.m("s")).unwrap().mode() & 0o7777, 0o0777);
        assert_eq!(fs::metadata(f.u("s")).unwrap().mode() & 0o7777, 0o0777);
        assert_eq!(fs::read(f.m("s")).unwrap(), b"#!/bin/sh\nx\n");
    });
    guard.unmount().expect("unmount");
}
