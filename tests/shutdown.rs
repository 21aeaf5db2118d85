//! How a unionmount mount ends: SIGTERM to the background daemon (idle and busy), a
//! SIGKILLed daemon (ENOTCONN, never a hang; recovery by a new mount over the same upper,
//! work and mountpoint), and a daemon killed while requests wait for it.
//!
//! The test binary makes itself the child subreaper, so a daemon forked by the mount
//! command it runs is re-parented here and its exit status can be read with waitpid.
//!
//! Findings these tests pin down (Linux 6.x FUSE):
//! - SIGTERM unmounts; when busy, the daemon detaches lazily: the mount leaves the table at
//!   once, open files and a held directory keep working (reads, writes, creates land in the
//!   upper), and the daemon exits 0 when the last user lets go.
//! - After SIGKILL every new request (stat, readdir, open, and reads, fstat and fsync on an
//!   fd opened before) fails with ENOTCONN at once; a request queued for the daemon ends
//!   with ECONNABORTED, a read the daemon had taken with ENOTCONN. Writes on a held fd are
//!   the exception: with FUSE passthrough the kernel still writes the upper file directly
//!   (the data lands), without it they end in the dead connection's page cache (lost);
//!   fsync reports ENOTCONN either way. `fusermount3 -u` or `umount -l` removes the dead
//!   mount, and a new mount over the same upper/work cleans the workdir and shows every
//!   earlier write.
//! - Mounting over the dead mount without unmounting it fails with one line that names the
//!   mountpoint and the command that removes it (no automatic unmount: the dead mount may
//!   belong to another program).
//!
//! Kernel overlayfs has no daemon; these tests are unionmount-only and return at once
//! under `UNIONMOUNT_TEST_DRIVER=kernel`.

mod common;

use common::*;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Seconds one step through a mount may take.
const STEP: u64 = 30;
/// How long a daemon may take to exit, or a mount to disappear.
const EXIT_WAIT: Duration = Duration::from_secs(10);

fn unionmount_only() -> bool {
    if is_kernel() {
        eprintln!("note: kernel overlayfs has no daemon to signal; nothing to compare");
        return false;
    }
    if !mount_allowed() {
        return false;
    }
    become_child_subreaper();
    true
}

/// Lower: `f` = "lower f\n", `d/g` = "lower g\n", `gone` (deleted in the tests).
fn fixture() -> Fixture {
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "f", b"lower f\n", 0o644);
    fx.write(&fx.lowers[0], "d/g", b"lower g\n", 0o644);
    fx.write(&fx.lowers[0], "gone", b"to delete\n", 0o644);
    fx
}

fn the_daemon(mnt: &Path) -> i32 {
    let pids = daemon_pids(mnt);
    assert_eq!(pids.len(), 1, "daemons serving {}: {pids:?}", mnt.display());
    pids[0]
}

/// The state letter (R, S, D, T, t, Z, ...) of every thread of `pid`.
fn task_states(pid: i32) -> Vec<String> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("stat")).ok())
        .map(|s| {
            let after = s.rsplit(')').next().unwrap_or("").trim_start();
            after.chars().next().unwrap_or('?').to_string()
        })
        .collect()
}

/// A helper process (strace) that must not outlive a failing test.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn end(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.end();
    }
}

/// Mount the fixture rw with `opts`, the daemon logging at info level to `log`.
fn mount_logged(fx: &Fixture, opts: &[&str], log: &Path) -> MountGuard {
    mount_paths_env(
        &driver(),
        &fx.lowers,
        Some(&fx.upper),
        Some(&fx.work),
        &fx.mnt,
        opts,
        &[
            ("UNIONMOUNT_LOG_FILE", log.to_str().unwrap()),
            ("RUST_LOG", "info"),
        ],
    )
    .unwrap()
}

/// Changes of every kind through the mount: a new file, a copy-up, a whiteout, a new dir.
fn make_changes(fx: &Fixture) {
    within_mount(fx, |fx| {
        fs::write(fx.m("new"), b"new\n").unwrap();
        let mut f = fs::OpenOptions::new().append(true).open(fx.m("f")).unwrap();
        f.write_all(b"appended\n").unwrap();
        drop(f);
        fs::remove_file(fx.m("gone")).unwrap();
        fs::create_dir(fx.m("newdir")).unwrap();
        fs::write(fx.m("newdir/x"), b"x\n").unwrap();
    });
}

#[track_caller]
fn assert_changes_in_upper(fx: &Fixture) {
    assert_file(fx.u("new"), b"new\n");
    assert_file(fx.u("f"), b"lower f\nappended\n");
    assert!(is_whiteout_in_upper(&fx.u("gone")), "no whiteout for gone");
    assert_file(fx.u("newdir/x"), b"x\n");
}

/// SIGTERM to the background daemon of an idle rw mount: unmounted, the daemon exits 0,
/// every change is in the upper and the workdir is clean.
#[test]
fn sigterm_daemon_exits_0_upper_intact_work_clean() {
    if !unionmount_only() {
        return;
    }
    let fx = fixture();
    let _m = mount(&driver(), &fx, true, &[]).unwrap();
    make_changes(&fx);
    let pid = the_daemon(&fx.mnt);
    kill(pid, libc::SIGTERM);
    assert!(
        wait_for(EXIT_WAIT, || !is_mounted(&fx.mnt)),
        "still mounted"
    );
    assert_eq!(wait_exit_status(pid, EXIT_WAIT), Some(Ok(0)), "daemon exit");
    assert_changes_in_upper(&fx);
    assert_work_clean(&fx.work);
    assert_eq!(list_dir(&fx.mnt), Vec::<String>::new(), "mountpoint left");
}

/// SIGTERM while this process holds a directory and a read-write file open in the mount:
/// the mount leaves the table at once (lazy detach) and the mountpoint shows the empty
/// directory under it; the held file still reads and writes, the held directory still
/// lists and takes a new file, all of it reaching the upper; the daemon stays until the
/// last descriptor closes, then exits 0 with the workdir clean.
#[test]
fn sigterm_busy_mount_detaches_lazily_and_users_keep_working() {
    if !unionmount_only() {
        return;
    }
    let fx = fixture();
    let log = fx.dir.join("daemon.log");
    let _m = mount_logged(&fx, &[], &log);
    let pid = the_daemon(&fx.mnt);
    let (dir, file) = within_mount(&fx, |fx| {
        let dir = fs::File::open(fx.m("d")).unwrap();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(fx.m("d/g"))
            .unwrap();
        (dir, file)
    });
    kill(pid, libc::SIGTERM);
    assert!(
        wait_for(EXIT_WAIT, || !is_mounted(&fx.mnt)),
        "busy mount not detached after SIGTERM"
    );
    assert_eq!(
        list_dir(&fx.mnt),
        Vec::<String>::new(),
        "mountpoint after detach"
    );
    assert!(alive(pid), "daemon exited while the mount was still in use");
    let (dir, file) = with_timeout(STEP, move || {
        let mut buf = vec![0u8; 64];
        let n = file.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"lower g\n", "held file after detach");
        file.write_at(b"LOWER", 0).unwrap();
        file.sync_all().unwrap();
        let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir));
        fs::write(format!("{via}/after"), b"after\n").unwrap();
        assert_eq!(
            list_dir(&via),
            ["after", "g"],
            "held directory after detach"
        );
        let mut back = String::new();
        fs::File::open(format!("{via}/g"))
            .unwrap()
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, "LOWER g\n");
        (dir, file)
    });
    assert!(alive(pid), "daemon exited while files were open");
    drop(file);
    drop(dir);
    assert_eq!(
        wait_exit_status(pid, EXIT_WAIT),
        Some(Ok(0)),
        "daemon exit after the last user; its log:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert_file(fx.u("d/g"), b"LOWER g\n");
    assert_file(fx.u("d/after"), b"after\n");
    assert_work_clean(&fx.work);
}

/// errno of `op` run under a timeout (a hang fails the test).
fn errno_within(
    what: &'static str,
    op: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> i32 {
    with_timeout(STEP, move || match op() {
        Ok(()) => panic!("{what}: succeeded on a dead mount"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: error without errno: {e}")),
    })
}

/// Mount the fixture with the unionmount command; its output.
fn mount_cmd(fx: &Fixture) -> std::process::Output {
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        fx.lowers[0].display(),
        fx.upper.display(),
        fx.work.display()
    );
    run_prog_within(
        STEP,
        unionmount_bin(),
        vec![os("-o"), os(opts), os(&fx.mnt)],
    )
}

/// SIGKILL the daemon while this process holds files open: stat, readdir and open on the
/// mountpoint and inside it, and I/O on the held files, fail with ENOTCONN at once. A new
/// mount over the dead one is refused with one line saying what to do; after
/// `fusermount3 -u` a new mount over the same upper, work and mountpoint recovers: the
/// workdir's leftovers (as a kill in the middle of a copy-up leaves them) are gone and
/// every earlier write is there.
#[test]
fn sigkill_gives_enotconn_and_a_new_mount_recovers() {
    if !unionmount_only() {
        return;
    }
    let fx = fixture();
    let _guard = MountGuard::adopt(&fx.mnt);
    assert_quiet_success(&mount_cmd(&fx), "unionmount -o ... MNT");
    make_changes(&fx);
    let pid = the_daemon(&fx.mnt);
    let (held_r, held_w) = within_mount(&fx, |fx| {
        let r = fs::File::open(fx.m("d/g")).unwrap();
        let w = fs::OpenOptions::new()
            .write(true)
            .open(fx.m("new"))
            .unwrap();
        (r, w)
    });
    kill(pid, libc::SIGKILL);
    assert_eq!(
        wait_exit_status(pid, EXIT_WAIT),
        Some(Err(libc::SIGKILL)),
        "daemon end"
    );
    let m = fx.mnt.clone();
    let checks: Vec<(&'static str, i32)> = vec![
        ("stat mountpoint", {
            let m = m.clone();
            errno_within("stat", move || fs::metadata(m).map(drop))
        }),
        ("readdir mountpoint", {
            let m = m.clone();
            errno_within("readdir", move || fs::read_dir(m).map(drop))
        }),
        ("open inside", {
            let m = m.clone();
            errno_within("open", move || fs::File::open(m.join("f")).map(drop))
        }),
        ("stat inside", {
            let m = m.clone();
            errno_within("stat inside", move || fs::metadata(m.join("new")).map(drop))
        }),
        (
            "read held fd",
            errno_within("read", move || held_r.read_at(&mut [0u8; 16], 0).map(drop)),
        ),
        ("fsync held fd", {
            let w = held_w.try_clone().unwrap();
            errno_within("fsync", move || w.sync_all())
        }),
        (
            "fstat held fd",
            errno_within("fstat", move || held_w.metadata().map(drop)),
        ),
    ];
    for (what, e) in &checks {
        assert_eq!(*e, libc::ENOTCONN, "{what}: got {}", errno_name(*e));
    }

    // Mounting over the dead mount: refused, one line naming the mountpoint and the way out.
    let out = mount_cmd(&fx);
    assert_ne!(out.status.code(), Some(0), "mounted over a dead mount");
    let err = text(&out.stderr);
    let mp = fx.mnt.display().to_string();
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(
        err.starts_with(&format!("unionmount: mountpoint {mp}: "))
            && err.contains(&format!("fusermount3 -u {mp}")),
        "stderr: {err}"
    );

    let out = run_prog_within(STEP, "fusermount3", vec![os("-u"), os(&fx.mnt)]);
    assert_quiet_success(&out, "fusermount3 -u on the dead mount");
    assert!(!is_mounted(&fx.mnt));

    // What a kill in the middle of a copy-up leaves behind in the workdir.
    fs::write(fx.work.join("work/#staged-copy"), b"partial").unwrap();
    fs::create_dir(fx.work.join("work/#staged-dir")).unwrap();
    fs::write(fx.work.join("work/#staged-dir/x"), b"partial").unwrap();

    assert_quiet_success(&mount_cmd(&fx), "unionmount over the same upper/work again");
    assert_work_clean(&fx.work);
    within_mount(&fx, |fx| {
        assert_file(fx.m("new"), b"new\n");
        assert_file(fx.m("f"), b"lower f\nappended\n");
        assert_enoent(fx.m("gone"));
        assert_file(fx.m("newdir/x"), b"x\n");
        assert_file(fx.m("d/g"), b"lower g\n");
        fs::write(fx.m("again"), b"again\n").unwrap();
    });
    assert_file(fx.u("again"), b"again\n");
}

/// Requests waiting for a daemon that dies must not hang their callers: with the daemon
/// stopped, a lookup (`stat`) and an open+read (`cat`) block in the kernel waiting for an
/// answer; SIGKILL the daemon and both end at once with ECONNABORTED. `umount -l` then
/// removes the dead mount.
#[test]
fn daemon_killed_with_requests_in_flight_does_not_hang_callers() {
    if !unionmount_only() {
        return;
    }
    let fx = fixture();
    let _m = mount(&driver(), &fx, true, &[]).unwrap();
    let pid = the_daemon(&fx.mnt);
    kill(pid, libc::SIGSTOP);
    assert!(
        wait_for(EXIT_WAIT, || task_states(pid).iter().all(|s| s == "T")),
        "daemon threads not all stopped: {:?}",
        task_states(pid)
    );
    let spawn = |prog: &str, arg: &Path| {
        Command::new(prog)
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let callers = vec![
        spawn("stat", &fx.m("never-looked-up")),
        spawn("cat", &fx.m("d/g")),
    ];
    // Blocked waiting for the FUSE answer. Where the kernel hides wchan symbols ("0"),
    // settle for: asleep inside a syscall (the stopped daemon can answer nothing).
    let waiting = |c: &std::process::Child| {
        let pid = c.id();
        match fs::read_to_string(format!("/proc/{pid}/wchan")).as_deref() {
            Ok("request_wait_answer") => true,
            Ok("0") => {
                let in_syscall =
                    fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| {
                        s.split(' ')
                            .next()
                            .is_some_and(|n| n.parse::<u32>().is_ok())
                    });
                let asleep = task_states(pid as i32).iter().all(|s| s == "S" || s == "D");
                in_syscall && asleep
            }
            _ => false,
        }
    };
    let blocked = wait_for(EXIT_WAIT, || callers.iter().all(waiting));
    if !blocked {
        kill(pid, libc::SIGKILL);
        let seen: Vec<String> = callers
            .iter()
            .map(|c| {
                let w = fs::read_to_string(format!("/proc/{}/wchan", c.id())).unwrap_or_default();
                format!(
                    "{} wchan={w} state={:?}",
                    c.id(),
                    task_states(c.id() as i32)
                )
            })
            .collect();
        panic!("the callers never blocked on the stopped daemon: {seen:?}");
    }
    kill(pid, libc::SIGKILL);
    for c in callers {
        let out = with_timeout(STEP, move || c.wait_with_output().unwrap());
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = text(&out.stderr);
        let want = errno_name(libc::ECONNABORTED);
        let want = want.split(" (os error").next().unwrap();
        assert!(err.trim_end().ends_with(want), "caller's error: {err}");
    }
    assert_eq!(wait_exit_status(pid, EXIT_WAIT), Some(Err(libc::SIGKILL)));
    let out = run_prog_within(STEP, "umount", vec![os("-l"), os(&fx.mnt)]);
    assert_quiet_success(&out, "umount -l on the dead mount");
    assert!(!is_mounted(&fx.mnt));
}

/// A file opened for writing before the daemon is SIGKILLed. fsync on it fails with
/// ENOTCONN in every mode, so a program that syncs learns its last writes may be lost.
/// What a write() does depends on the data path: with FUSE passthrough the kernel writes
/// the upper file directly, so the write succeeds and reaches the upper even with the
/// daemon gone; without it (`passthrough=off`: writeback cache) the write ends in the page
/// cache of a dead connection and never reaches the upper.
#[test]
fn writes_through_a_file_held_across_a_sigkill() {
    if !unionmount_only() {
        return;
    }
    for mode in ["off", "on"] {
        let fx = fixture();
        let log = fx.dir.join("daemon.log");
        let opt = format!("passthrough={mode}");
        let _m = mount_logged(&fx, &[&opt], &log);
        let held = within_mount(&fx, |fx| {
            fs::write(fx.m("new"), b"new\n").unwrap();
            fs::OpenOptions::new()
                .write(true)
                .open(fx.m("new"))
                .unwrap()
        });
        let pid = the_daemon(&fx.mnt);
        kill(pid, libc::SIGKILL);
        assert_eq!(wait_exit_status(pid, EXIT_WAIT), Some(Err(libc::SIGKILL)));
        let (wrote, synced) = with_timeout(STEP, move || {
            let w = held.write_at(b"late", 0).map_err(|e| e.raw_os_error());
            let s = held.sync_all().map_err(|e| e.raw_os_error());
            (w, s)
        });
        assert_eq!(
            synced,
            Err(Some(libc::ENOTCONN)),
            "{opt}: fsync after the kill"
        );
        let passthrough = fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("capability passthrough: on");
        if passthrough {
            assert_eq!(wrote, Ok(4), "{opt}: passthrough write after the kill");
            assert_file(fx.u("new"), b"late");
        } else {
            if mode == "on" {
                eprintln!("note: passthrough=on but the kernel did not grant passthrough");
            }
            assert!(
                matches!(wrote, Ok(4) | Err(Some(libc::ENOTCONN))),
                "{opt}: write after the kill: {wrote:?}"
            );
            assert_file(fx.u("new"), b"new\n");
        }
    }
}

/// The daemon killed inside a handler: strace holds the daemon's pread64 of a lower file
/// (a read the daemon has taken and not answered), then the daemon is SIGKILLed. The
/// reader (`cat`) ends at once with the connection's error (ENOTCONN: the kernel reads
/// ahead asynchronously, so the page fails; ECONNABORTED for a synchronous request) and
/// never hangs; `fusermount3 -u` then removes the dead mount.
#[test]
fn daemon_killed_inside_a_read_does_not_hang_the_reader() {
    if !unionmount_only() {
        return;
    }
    let fx = fixture();
    let _m = mount(&driver(), &fx, true, &[]).unwrap();
    let pid = the_daemon(&fx.mnt);
    let log = fx.dir.join("strace.log");
    let mut strace = KillOnDrop(
        Command::new("strace")
            .args(["-f", "-qq", "-etrace=pread64"])
            .arg("-einject=pread64:delay_enter=60000000")
            .arg("-o")
            .arg(&log)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn strace"),
    );
    let traced = wait_for(EXIT_WAIT, || {
        fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("TracerPid:") && !l.ends_with("\t0"))
        })
    });
    let reader = Command::new("cat")
        .arg(fx.m("d/g"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The daemon has taken the read: a thread sits in the delayed pread64 (tracing stop).
    let in_handler = traced
        && wait_for(EXIT_WAIT, || {
            fs::read_to_string(&log).is_ok_and(|l| l.contains("pread64("))
                && task_states(pid).iter().any(|s| s == "t")
        });
    kill(pid, libc::SIGKILL);
    // A thread held in a ptrace stop dies only once its tracer lets go: end strace too.
    strace.end();
    let out = with_timeout(STEP, move || reader.wait_with_output().unwrap());
    assert!(
        in_handler,
        "the daemon never took the read (strace: {traced})"
    );
    assert_eq!(wait_exit_status(pid, EXIT_WAIT), Some(Err(libc::SIGKILL)));
    assert_eq!(out.status.code(), Some(1), "reader: {out:?}");
    assert_eq!(
        text(&out.stdout),
        "",
        "reader got data from a killed daemon"
    );
    let err = text(&out.stderr);
    let msg = |e: i32| {
        errno_name(e)
            .split(" (os error")
            .next()
            .unwrap()
            .to_string()
    };
    assert!(
        [libc::ENOTCONN, libc::ECONNABORTED]
            .iter()
            .any(|&e| err.trim_end().ends_with(&msg(e))),
        "reader's error: {err}"
    );
    let out = run_prog_within(STEP, "fusermount3", vec![os("-u"), os(&fx.mnt)]);
    assert_quiet_success(&out, "fusermount3 -u on the dead mount");
}

/// The unprivileged user the rootless case mounts as.
const USER: (u32, u32) = (1000, 1000);

/// A mount by an unprivileged user needs a setuid fusermount3 and a 0666 /dev/fuse; SKIP
/// (or fail under UNIONMOUNT_REQUIRE_MOUNT=1) without them.
fn rootless_allowed() -> bool {
    let setuid = fs::metadata("/usr/bin/fusermount3").is_ok_and(|m| m.mode() & 0o4000 != 0);
    let dev = fs::metadata("/dev/fuse").is_ok_and(|m| m.mode() & 0o666 == 0o666);
    if setuid && dev {
        return true;
    }
    let msg = "rootless SIGTERM: needs a setuid /usr/bin/fusermount3 and /dev/fuse 0666";
    if std::env::var("UNIONMOUNT_REQUIRE_MOUNT").as_deref() == Ok("1") {
        panic!("UNIONMOUNT_REQUIRE_MOUNT=1 but {msg}");
    }
    eprintln!("SKIP: {msg}");
    false
}

/// SIGTERM to the daemon of an unprivileged user's mount (it unmounts through
/// `fusermount3 -u -z`, not umount2): idle, the mount goes and the daemon exits 0 with the
/// user's file in the upper and the workdir clean; busy (the user's shell has its cwd in
/// the mount), the mount leaves the table at once, the shell still works in it, and the
/// daemon exits 0 once the shell is gone.
#[test]
fn sigterm_rootless_daemon_unmounts_through_fusermount3() {
    if !unionmount_only() || !rootless_allowed() {
        return;
    }
    let fx = fixture();
    for rel in ["", "d", "d/g", "f", "gone"] {
        fx.chown(&fx.lowers[0], rel, USER.0, USER.1);
    }
    for p in [&fx.upper, &fx.work, &fx.mnt] {
        lchown(p, USER.0, USER.1).unwrap();
    }
    let _guard = MountGuard::adopt(&fx.mnt);
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        fx.lowers[0].display(),
        fx.upper.display(),
        fx.work.display()
    );
    let mount_as_user = || {
        let out = run_prog_within(
            STEP,
            "setpriv",
            vec![
                os(format!("--reuid={}", USER.0)),
                os(format!("--regid={}", USER.1)),
                os("--clear-groups"),
                os("--"),
                os(unionmount_bin()),
                os("-o"),
                os(&opts),
                os(&fx.mnt),
            ],
        );
        assert_quiet_success(&out, "unionmount as uid 1000");
        the_daemon(&fx.mnt)
    };
    let mnt = fx.mnt.to_str().unwrap().to_string();

    let pid = mount_as_user();
    let (code, _, err) = sh_as(Some(USER), &fx.dir, &format!("echo mine > {mnt}/mine"));
    assert_eq!(code, 0, "write as the user: {err}");
    kill(pid, libc::SIGTERM);
    assert!(
        wait_for(EXIT_WAIT, || !is_mounted(&fx.mnt)),
        "still mounted"
    );
    assert_eq!(wait_exit_status(pid, EXIT_WAIT), Some(Ok(0)), "daemon exit");
    assert_file(fx.u("mine"), b"mine\n");
    assert_eq!(
        lstat(fx.u("mine")).map(|m| (m.uid(), m.gid())).unwrap(),
        USER
    );
    assert_work_clean(&fx.work);

    let pid = mount_as_user();
    let mut shell = KillOnDrop(
        Command::new("setpriv")
            .args([
                format!("--reuid={}", USER.0),
                format!("--regid={}", USER.1),
                "--clear-groups".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                // Tell the test it is inside, wait for its go, then write through the cwd.
                "cd \"$1\" && echo in && read go && { echo busy > busy && cat busy; } 2>&1".into(),
                "sh".into(),
                format!("{mnt}/d"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = shell.0.stdout.take().unwrap();
    let mut stdin = shell.0.stdin.take().unwrap();
    let line = with_timeout(STEP, move || {
        let mut b = [0u8; 3];
        stdout.read_exact(&mut b).map(|()| (b, stdout))
    });
    let (first, mut stdout) = line.expect("the user's shell never got inside the mount");
    assert_eq!(&first, b"in\n");
    kill(pid, libc::SIGTERM);
    assert!(
        wait_for(EXIT_WAIT, || !is_mounted(&fx.mnt)),
        "busy rootless mount not detached after SIGTERM"
    );
    assert!(alive(pid), "daemon exited while the shell was inside");
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let rest = with_timeout(STEP, move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    })
    .unwrap();
    assert_eq!(
        rest, "busy\n",
        "the shell's write and read after the detach"
    );
    let status = shell.0.wait().unwrap();
    assert!(status.success(), "user's shell: {status}");
    assert_eq!(
        wait_exit_status(pid, EXIT_WAIT),
        Some(Ok(0)),
        "daemon exit after the shell left"
    );
    assert_file(fx.u("d/busy"), b"busy\n");
    assert_work_clean(&fx.work);
}
