//! The command line as a user and as mount(8) / containers/storage drive it (DESIGN 1): the
//! three mount forms, `--help`/`--version`, the process model (returns only when the mount
//! is live, `-f`, a daemon that lets go of its caller's stdio, SIGTERM/SIGINT), the mount
//! table entry, the options containers/storage passes, and bad input: one `unionmount: `
//! line on stderr naming the culprit, a non-zero exit, nothing mounted, nothing written.

mod common;

use common::TempDir;

use common::{
    Fixture, MountGuard, alive, assert_file, assert_quiet_success, daemon_pids, is_mounted, kill,
    list_dir, mount_entry, os, text, umount_busy_tolerant, umount2, unionmount_bin, wait_for,
    with_timeout,
};
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds any single step (a command, a filesystem access) may take.
const STEP: u64 = 5;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Run `prog args` with stdin from /dev/null, under the step timeout, output captured.
fn run_prog(prog: impl AsRef<OsStr>, args: Vec<OsString>) -> Output {
    common::run_prog_within(STEP, prog, args)
}

fn run(args: Vec<OsString>) -> Output {
    run_prog(unionmount_bin(), args)
}

fn statvfs_flags(p: &Path) -> u64 {
    let p = p.to_path_buf();
    with_timeout(STEP, move || {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path and an out-buffer of the right type.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(
            r,
            0,
            "statvfs {}: {}",
            p.display(),
            io::Error::last_os_error()
        );
        st.f_flag
    })
}

/// Wait (bounded) until `mnt` is gone from the mount table and no daemon serves it.
#[track_caller]
fn assert_unmounted_and_daemon_gone(mnt: &Path, pids: &[i32]) {
    assert!(
        wait_for(Duration::from_secs(3), || !is_mounted(mnt)),
        "{} still mounted",
        mnt.display()
    );
    assert!(
        wait_for(Duration::from_secs(3), || pids.iter().all(|&p| !alive(p))),
        "daemon(s) {pids:?} for {} still running",
        mnt.display()
    );
}

/// The one daemon serving `mnt`.
#[track_caller]
fn one_daemon(mnt: &Path) -> i32 {
    let pids = daemon_pids(mnt);
    assert_eq!(pids.len(), 1, "one daemon serves {}", mnt.display());
    pids[0]
}

/// `umount MNT` succeeds quietly, the mount goes and its daemon exits.
#[track_caller]
fn umount_ends_it(mnt: &Path) {
    let pids = daemon_pids(mnt);
    assert_quiet_success(&umount_busy_tolerant(mnt), "umount MNT");
    assert_unmounted_and_daemon_gone(mnt, &pids);
}

/// The mount table has `fuse.unionmount` on `mnt` with `mode` (`rw`/`ro`) as the first
/// option; returns (source, options).
#[track_caller]
fn assert_table_entry(mnt: &Path, mode: &str) -> (String, Vec<String>) {
    let (source, fstype, opts) =
        mount_entry(mnt).unwrap_or_else(|| panic!("{} is not in the mount table", mnt.display()));
    assert_eq!(fstype, "fuse.unionmount");
    assert_eq!(opts[0], mode, "options {opts:?}");
    (source, opts)
}

/// Each of `want` is among the mount options `opts`.
#[track_caller]
fn assert_has_opts(opts: &[String], want: &[&str]) {
    for o in want {
        assert!(opts.iter().any(|x| x == o), "{o} missing from {opts:?}");
    }
}

/// None of `unwanted` is among the mount options `opts`.
#[track_caller]
fn assert_lacks_opts(opts: &[String], unwanted: &[&str]) {
    for o in unwanted {
        assert!(!opts.iter().any(|x| x == o), "{o} in {opts:?}");
    }
}

/// A write of `name` through the mount lands in the upper.
#[track_caller]
fn assert_write_lands_in_upper(fx: &Fixture, name: &str, data: &'static [u8]) {
    let p = fx.m(name);
    with_timeout(STEP, move || fs::write(p, data).unwrap());
    assert_file(fx.u(name), data);
}

/// The errno of `op` on the mount (under the step timeout) is EROFS.
#[track_caller]
fn assert_erofs(what: &str, op: impl FnOnce() -> io::Result<()> + Send + 'static) {
    let e = with_timeout(STEP, move || common::errno_of(op()));
    assert_eq!(e, libc::EROFS, "{what}: {}", common::errno_name(e));
}

/// Layers for the mount tests: lower0 (TOP) has `a` = "top-a" and `d/x`; lower1 has
/// `a` = "mid-a" and `m`; lower2 (BASE) has `b`.
fn three_layers() -> Fixture {
    let fx = Fixture::new(3);
    fx.write(&fx.lowers[0], "a", b"top-a", 0o644);
    fx.write(&fx.lowers[0], "d/x", b"x", 0o644);
    fx.write(&fx.lowers[1], "a", b"mid-a", 0o644);
    fx.write(&fx.lowers[1], "m", b"mid", 0o644);
    fx.write(&fx.lowers[2], "b", b"base", 0o644);
    fx
}

fn layers_arg(fx: &Fixture) -> OsString {
    let v: Vec<String> = fx
        .lowers
        .iter()
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    os(v.join(":"))
}

/// `unionmount --layers L0:L1:L2 MNT` (read-only) succeeds quietly.
#[track_caller]
fn mount_layers_ro(fx: &Fixture) {
    let out = run(vec![os("--layers"), layers_arg(fx), os(&fx.mnt)]);
    assert_quiet_success(&out, "unionmount --layers");
}

/// Native form, writable: `--layers L0:L1:L2 --upper U --work W MNT`.
fn layers_form(fx: &Fixture) -> Vec<OsString> {
    vec![
        os("--layers"),
        layers_arg(fx),
        os("--upper"),
        os(&fx.upper),
        os("--work"),
        os(&fx.work),
        os(&fx.mnt),
    ]
}

/// `lowerdir=LOWERS,upperdir=U,workdir=W`, then `,extra` unless `extra` is empty.
fn o_opts(lowerdir: &str, upper: &Path, work: &Path, extra: &str) -> String {
    let mut o = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    if !extra.is_empty() {
        o.push(',');
        o.push_str(extra);
    }
    o
}

/// `-o lowerdir=LOWERS,upperdir=U,workdir=W MNT` with the given pieces.
fn o_args(lowerdir: &str, upper: &Path, work: &Path, extra: &str, mnt: &Path) -> Vec<OsString> {
    vec![os("-o"), os(o_opts(lowerdir, upper, work, extra)), os(mnt)]
}

/// The top lower layer's path.
fn lower0(fx: &Fixture) -> &str {
    fx.lowers[0].to_str().unwrap()
}

/// `-o` form with the top lower only, `fx`'s upper, workdir and mountpoint, plus `extra`.
fn lower0_o_args(fx: &Fixture, extra: &str) -> Vec<OsString> {
    o_args(lower0(fx), &fx.upper, &fx.work, extra, &fx.mnt)
}

/// `-o` form over all of `fx`: every lower, its upper and workdir, plus `extra`.
fn fx_o_args(fx: &Fixture, extra: &str) -> Vec<OsString> {
    o_args(
        layers_arg(fx).to_str().unwrap(),
        &fx.upper,
        &fx.work,
        extra,
        &fx.mnt,
    )
}

/// mount(8) form: `mount -t fuse.unionmount unionmount MNT -o OPTS`.
fn mount8(mnt: &Path, opts: String) -> Output {
    run_prog(
        "mount",
        vec![
            os("-t"),
            os("fuse.unionmount"),
            os("unionmount"),
            os(mnt),
            os("-o"),
            os(opts),
        ],
    )
}

/// The merged view of `three_layers` as seen through `mnt` (checked under a timeout).
fn assert_three_layers_merged(mnt: &Path) {
    let mnt = mnt.to_path_buf();
    with_timeout(STEP, move || {
        assert_eq!(list_dir(&mnt), ["a", "b", "d", "m"]);
        assert_file(mnt.join("a"), b"top-a");
        assert_file(mnt.join("b"), b"base");
        assert_file(mnt.join("m"), b"mid");
        assert_file(mnt.join("d/x"), b"x");
    });
}

/// One line per entry under `root` (recursively, sorted): path, type+mode, owner, size,
/// mtime and ctime in ns, rdev, xattr names. Equal snapshots mean nothing was written.
fn snapshot(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = fs::symlink_metadata(&p).unwrap();
            let xattrs = common::list_xattrs(&p).unwrap_or_default();
            out.push(format!(
                "{} mode={:o} owner={}:{} size={} mtime={}.{} ctime={}.{} rdev={} xattrs={:?}",
                p.strip_prefix(root).unwrap().display(),
                m.mode(),
                m.uid(),
                m.gid(),
                if m.is_dir() { 0 } else { m.size() },
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.rdev(),
                xattrs
            ));
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let root = root.to_path_buf();
    with_timeout(STEP, move || {
        let m = fs::symlink_metadata(&root).unwrap();
        let mut out = vec![format!(
            ". mode={:o} mtime={}.{} ctime={}.{}",
            m.mode(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        )];
        if m.is_dir() {
            walk(&root, &root, &mut out);
        }
        out
    })
}

// ---------------------------------------------------------------------------------------
// --help, --version
// ---------------------------------------------------------------------------------------

#[test]
fn help_prints_usage_with_examples() {
    let out = run(vec![os("--help")]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
    let s = text(&out.stdout);
    assert!(s.contains("Usage: unionmount"), "no usage line:\n{s}");
    assert!(s.contains("\nExamples:\n"), "no Examples: section:\n{s}");
    for needle in [
        "--layers",
        "--upper",
        "--work",
        "-o",
        "lowerdir=",
        "mount -t fuse.unionmount",
    ] {
        assert!(s.contains(needle), "--help does not mention {needle}:\n{s}");
    }
}

#[test]
fn version_prints_name_and_version() {
    let out = run(vec![os("--version")]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
    assert_eq!(
        text(&out.stdout),
        format!("unionmount {}\n", env!("CARGO_PKG_VERSION"))
    );
}

// ---------------------------------------------------------------------------------------
// The mount forms
// ---------------------------------------------------------------------------------------

/// Native form, writable: returns only once the mount is live (no waiting here), the
/// mount table says `fuse.unionmount` with allow_other, default_permissions, suid and dev
/// on; a write lands in upper; `umount MNT` ends it and the daemon exits.
#[test]
fn layers_form_rw_is_live_on_return() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    let out = run(layers_form(&fx));
    assert_quiet_success(&out, "unionmount --layers --upper --work");
    // Live the moment the command returned: no polling.
    let (source, opts) = assert_table_entry(&fx.mnt, "rw");
    assert_eq!(source, "unionmount");
    assert_has_opts(
        &opts,
        &[
            "allow_other",
            "default_permissions",
            "user_id=0",
            "group_id=0",
        ],
    );
    assert_lacks_opts(&opts, &["nosuid", "nodev", "ro"]);
    assert_eq!(statvfs_flags(&fx.mnt) & libc::ST_RDONLY, 0);
    assert_three_layers_merged(&fx.mnt);
    assert_write_lands_in_upper(&fx, "new", b"n");
    one_daemon(&fx.mnt);
    umount_ends_it(&fx.mnt);
}

/// Without an upper the mount is read-only: `ro` in the table, ST_RDONLY, EROFS on write.
#[test]
fn layers_form_without_upper_is_read_only() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    mount_layers_ro(&fx);
    assert_table_entry(&fx.mnt, "ro");
    assert_ne!(statvfs_flags(&fx.mnt) & libc::ST_RDONLY, 0, "ST_RDONLY");
    assert_three_layers_merged(&fx.mnt);
    let p = fx.m("new");
    assert_erofs("write on a read-only mount", move || fs::write(p, b"n"));
    umount_ends_it(&fx.mnt);
}

/// `-o ro` with an upper and workdir: read-only, and the upper stays untouched.
#[test]
fn ro_option_with_upper_is_read_only() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    let out = run(fx_o_args(&fx, "ro"));
    assert_quiet_success(&out, "unionmount -o ...,ro");
    assert_table_entry(&fx.mnt, "ro");
    assert_ne!(statvfs_flags(&fx.mnt) & libc::ST_RDONLY, 0, "ST_RDONLY");
    let p = fx.m("nd");
    assert_erofs("mkdir on a ro mount", move || fs::create_dir(p));
    assert_eq!(list_dir(&fx.upper), Vec::<String>::new());
    umount_ends_it(&fx.mnt);
}

/// fuse-overlayfs form with `-o` given twice, the second after the mountpoint:
/// both are honoured (nosuid,nodev show in the table).
#[test]
fn o_form_repeated_and_after_mountpoint() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    let out = run(vec![
        os("-o"),
        os(format!(
            "lowerdir={},upperdir={}",
            layers_arg(&fx).to_str().unwrap(),
            fx.upper.display()
        )),
        os("-o"),
        os(format!("workdir={}", fx.work.display())),
        os(&fx.mnt),
        os("-o"),
        os("nosuid,nodev"),
    ]);
    assert_quiet_success(&out, "unionmount -o ... MNT -o nosuid,nodev");
    let (_, opts) = assert_table_entry(&fx.mnt, "rw");
    assert_has_opts(
        &opts,
        &["nosuid", "nodev", "allow_other", "default_permissions"],
    );
    assert_three_layers_merged(&fx.mnt);
    assert_write_lands_in_upper(&fx, "a", b"changed");
    assert_file(fx.l(0, "a"), b"top-a");
    umount_ends_it(&fx.mnt);
}

/// Serialises the tests that put `unionmount` into mount(8)'s PATH.
static MOUNT_HELPER_LOCK: Mutex<()> = Mutex::new(());

const HELPER_LINK: &str = "/usr/local/sbin/unionmount";

/// `/usr/local/sbin/unionmount` -> the binary under test while alive; whatever was there
/// before is moved aside and put back on drop (also while panicking).
struct HelperLink {
    backup: Option<PathBuf>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl HelperLink {
    fn install() -> HelperLink {
        let lock = MOUNT_HELPER_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let link = Path::new(HELPER_LINK);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        let backup = if fs::symlink_metadata(link).is_ok() {
            let b = link.with_file_name(format!(
                ".unionmount.cli-test-backup-{}",
                std::process::id()
            ));
            fs::rename(link, &b).expect("move the existing helper aside");
            Some(b)
        } else {
            None
        };
        let guard = HelperLink {
            backup,
            _lock: lock,
        };
        std::os::unix::fs::symlink(unionmount_bin(), link).expect("symlink mount helper");
        guard
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        let link = Path::new(HELPER_LINK);
        let _ = fs::remove_file(link);
        if let Some(b) = &self.backup
            && let Err(e) = fs::rename(b, link)
        {
            eprintln!(
                "warning: could not restore {HELPER_LINK} from {}: {e}",
                b.display()
            );
        }
    }
}

/// mount(8) form: `mount -t fuse.unionmount unionmount MNT -o ...` (through mount.fuse3
/// with a sanitised PATH and `-o` after the positionals) mounts rw with suid and dev on;
/// `umount MNT` ends it and the daemon exits.
#[test]
fn mount8_form_mounts_and_umount_ends_it() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    let _link = HelperLink::install();
    let lowers = layers_arg(&fx);
    let out = mount8(
        &fx.mnt,
        o_opts(lowers.to_str().unwrap(), &fx.upper, &fx.work, ""),
    );
    assert_quiet_success(&out, "mount -t fuse.unionmount");
    // Mounted when mount(8) returns.
    let (source, opts) = assert_table_entry(&fx.mnt, "rw");
    assert_eq!(source, "unionmount");
    assert_has_opts(&opts, &["allow_other", "default_permissions"]);
    assert_lacks_opts(&opts, &["nosuid", "nodev"]);
    assert_three_layers_merged(&fx.mnt);
    assert_write_lands_in_upper(&fx, "via-mount8", b"v");
    one_daemon(&fx.mnt);
    umount_ends_it(&fx.mnt);
}

/// mount(8) form with bad input: mount fails, the helper's one-line error reaches the
/// user, nothing is mounted.
#[test]
fn mount8_form_reports_a_missing_lowerdir() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    let _link = HelperLink::install();
    let missing = fx.dir.join("no-such-layer");
    let before = snapshot(&fx.dir);
    let out = mount8(
        &fx.mnt,
        o_opts(missing.to_str().unwrap(), &fx.upper, &fx.work, ""),
    );
    assert!(
        !out.status.success(),
        "mount succeeded with a missing lowerdir"
    );
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr: {err:?}");
    assert!(lines[0].starts_with("unionmount: "), "stderr: {err:?}");
    assert!(
        lines[0].contains(missing.to_str().unwrap()),
        "stderr: {err:?}"
    );
    assert!(
        !is_mounted(&fx.mnt),
        "something is mounted on {}",
        fx.mnt.display()
    );
    assert_eq!(
        snapshot(&fx.dir),
        before,
        "the failed mount wrote something"
    );
}

// ---------------------------------------------------------------------------------------
// Process model: -f, the daemon's stdio, signals
// ---------------------------------------------------------------------------------------

/// Wait up to `limit` for `child` to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills a child we started if it is still running when dropped.
struct Reap(Option<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0
            && c.try_wait().ok().flatten().is_none()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Start `unionmount -f --layers ... --upper --work MNT`, wait for the mount, check the
/// process is still there; returns it (stdout/stderr piped).
fn start_foreground(fx: &Fixture) -> Reap {
    let child = Command::new(unionmount_bin())
        .arg("-f")
        .args(layers_form(fx))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unionmount -f");
    let mut reap = Reap(Some(child));
    let mnt = fx.mnt.clone();
    assert!(
        wait_for(Duration::from_secs(3), || is_mounted(&mnt)),
        "-f: mount did not appear"
    );
    let c = reap.0.as_mut().unwrap();
    assert!(
        c.try_wait().unwrap().is_none(),
        "-f: the process exited while its mount is up"
    );
    // It stays: still running a moment later, still mounted.
    std::thread::sleep(Duration::from_millis(200));
    assert!(c.try_wait().unwrap().is_none(), "-f: the process went away");
    assert!(is_mounted(&fx.mnt));
    assert_three_layers_merged(&fx.mnt);
    reap
}

/// Mounts `three_layers` with `-f`; after `trigger(mountpoint, pid)`, the foreground
/// process exits 0 within 3 s with no output, and the mount is gone.
fn foreground_ends_cleanly(trigger: impl FnOnce(&Path, i32)) {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    let mut reap = start_foreground(&fx);
    let pid = reap.0.as_ref().unwrap().id() as i32;
    trigger(&fx.mnt, pid);
    let st = wait_exit(reap.0.as_mut().unwrap(), Duration::from_secs(3));
    let child = reap.0.take().unwrap();
    let out = with_timeout(STEP, move || child.wait_with_output().unwrap());
    let st = st.expect("-f: the process did not exit");
    assert_eq!(
        st.code(),
        Some(0),
        "-f exit status {st}; stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "", "-f stdout");
    assert_eq!(text(&out.stderr), "", "-f stderr");
    assert!(
        !is_mounted(&fx.mnt),
        "still mounted after the -f process exited"
    );
}

#[test]
fn foreground_sigterm_unmounts_and_exits_0() {
    foreground_ends_cleanly(|_, pid| kill(pid, libc::SIGTERM));
}

#[test]
fn foreground_sigint_unmounts_and_exits_0() {
    foreground_ends_cleanly(|_, pid| kill(pid, libc::SIGINT));
}

#[test]
fn foreground_exits_0_when_unmounted() {
    foreground_ends_cleanly(|mnt, _| {
        assert_quiet_success(&umount_busy_tolerant(mnt), "umount MNT");
    });
}

/// The background daemon must not hold its caller's stdout/stderr: `output()` (which
/// reads both pipes to EOF) returns as soon as the launching command exits, while the
/// mount stays up.
#[test]
fn daemon_releases_callers_stdout_and_stderr() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    let t0 = Instant::now();
    let out = run(layers_form(&fx));
    let took = t0.elapsed();
    assert_quiet_success(&out, "unionmount with piped stdout/stderr");
    assert!(
        took < Duration::from_secs(2),
        "output() took {took:?}: the daemon kept the pipes open"
    );
    assert!(is_mounted(&fx.mnt), "the mount did not stay up");
    let pid = one_daemon(&fx.mnt);
    assert_three_layers_merged(&fx.mnt);
    // The daemon's fds 1 and 2 are not pipes any more.
    for fd in [1, 2] {
        let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).map(|p| p.display().to_string());
        if let Ok(t) = target {
            assert!(!t.starts_with("pipe:"), "daemon fd {fd} is still {t}");
        }
    }
}

/// SIGTERM to the background daemon (found through /proc/*/cmdline) unmounts; the daemon
/// exits.
#[test]
fn daemon_sigterm_unmounts() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    mount_layers_ro(&fx);
    let pid = one_daemon(&fx.mnt);
    kill(pid, libc::SIGTERM);
    assert_unmounted_and_daemon_gone(&fx.mnt, &[pid]);
}

/// SIGTERM while a process has its cwd inside the mount: the mount is detached lazily
/// (gone from mountinfo at once); the daemon exits once the last user lets go.
#[test]
fn daemon_sigterm_when_busy_detaches_lazily() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    mount_layers_ro(&fx);
    let pid = one_daemon(&fx.mnt);
    let d = fx.m("d");
    let sleeper = with_timeout(STEP, move || {
        Command::new("sleep")
            .arg("10")
            .current_dir(d)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep inside the mount")
    });
    let mut sleeper = Reap(Some(sleeper));
    let spid = sleeper.0.as_ref().unwrap().id();
    assert!(
        fs::read_link(format!("/proc/{spid}/cwd"))
            .unwrap()
            .starts_with(&fx.mnt)
    );
    // Busy: a plain umount fails.
    assert_eq!(
        umount2(&fx.mnt, 0).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EBUSY))
    );
    kill(pid, libc::SIGTERM);
    assert!(
        wait_for(Duration::from_secs(3), || !is_mounted(&fx.mnt)),
        "busy mount not detached after SIGTERM"
    );
    // The busy process can still use its cwd (a lazy detach, not an abort).
    let cwd = PathBuf::from(format!("/proc/{spid}/cwd"));
    with_timeout(STEP, move || assert_file(cwd.join("x"), b"x"));
    let c = sleeper.0.as_mut().unwrap();
    let _ = c.kill();
    let _ = wait_exit(c, Duration::from_secs(3));
    assert_unmounted_and_daemon_gone(&fx.mnt, &[pid]);
}

// ---------------------------------------------------------------------------------------
// Options containers/storage passes; escapes
// ---------------------------------------------------------------------------------------

/// `context="..."` (quoted, with a comma inside) and `volatile`, as containers/storage
/// passes them: mounts, works, and the comma inside the quotes is not an option split.
#[test]
fn containers_storage_context_and_volatile_mount() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    let out = run(fx_o_args(
        &fx,
        "context=\"system_u:object_r:container_file_t:s0:c1,c2\",volatile",
    ));
    assert_quiet_success(&out, "unionmount -o ...,context=\"...,c2\",volatile");
    assert_table_entry(&fx.mnt, "rw");
    assert_three_layers_merged(&fx.mnt);
    assert_write_lands_in_upper(&fx, "f", b"v");
    umount_ends_it(&fx.mnt);
}

#[test]
fn fsync_0_mounts() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = MountGuard::adopt(&fx.mnt);
    let out = run(fx_o_args(&fx, "fsync=0"));
    assert_quiet_success(&out, "unionmount -o ...,fsync=0");
    assert_three_layers_merged(&fx.mnt);
    let m = fx.mnt.clone();
    with_timeout(STEP, move || {
        use std::io::Write;
        let mut f = fs::File::create(m.join("synced")).unwrap();
        f.write_all(b"s").unwrap();
        f.sync_all().unwrap();
    });
    assert_file(fx.u("synced"), b"s");
    umount_ends_it(&fx.mnt);
}

/// `\:` escapes a colon inside a layer path, in `lowerdir=` and in `--layers`.
#[test]
fn escaped_colon_in_layer_path() {
    if !common::mount_allowed() {
        return;
    }
    let fx = Fixture::new(1);
    let colon = fx.mkdir(&fx.dir, "lay:er", 0o755);
    fx.write(&colon, "c", b"colon", 0o644);
    fx.write(&fx.lowers[0], "b", b"base", 0o644);
    let spec = format!(
        "{}:{}",
        colon.to_str().unwrap().replace(':', "\\:"),
        fx.lowers[0].display()
    );
    let _c = MountGuard::adopt(&fx.mnt);
    for args in [
        vec![os("-o"), os(format!("lowerdir={spec}")), os(&fx.mnt)],
        vec![os("--layers"), os(&spec), os(&fx.mnt)],
    ] {
        let out = run(args.clone());
        assert_quiet_success(&out, &format!("unionmount {args:?}"));
        let m = fx.mnt.clone();
        with_timeout(STEP, move || {
            assert_eq!(list_dir(&m), ["b", "c"]);
            assert_file(m.join("c"), b"colon");
            assert_file(m.join("b"), b"base");
        });
        umount_ends_it(&fx.mnt);
    }
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

/// Exit code of an input error found after parsing (a path, an option value).
const EXIT_ERROR: i32 = 1;
/// Exit code of a command-line usage error (unknown flag, missing argument).
const EXIT_USAGE: i32 = 2;

/// Run `args`; it must exit with `code`, print nothing on stdout and exactly one stderr
/// line starting `unionmount: ` that contains every string in `culprits`, mount nothing
/// on `fx.mnt`, and leave the fixture (and every dir in `also`) exactly as it was.
#[track_caller]
fn assert_rejected(
    fx: &Fixture,
    args: Vec<OsString>,
    code: i32,
    culprits: &[&str],
    also: &[&Path],
) {
    let _c = MountGuard::adopt(&fx.mnt);
    let mut watched: Vec<PathBuf> = vec![fx.dir.clone()];
    watched.extend(also.iter().map(|p| p.to_path_buf()));
    let before: Vec<Vec<String>> = watched.iter().map(|p| snapshot(p)).collect();
    let out = run(args.clone());
    let err = text(&out.stderr);
    assert!(
        !is_mounted(&fx.mnt),
        "unionmount {args:?} mounted {} (stderr: {err:?})",
        fx.mnt.display()
    );
    assert_eq!(
        out.status.code(),
        Some(code),
        "unionmount {args:?}: exit status {} (stderr: {err:?})",
        out.status
    );
    assert_eq!(text(&out.stdout), "", "unionmount {args:?}: stdout");
    assert!(
        err.ends_with('\n') && err.matches('\n').count() == 1,
        "unionmount {args:?}: stderr must be exactly one line, got {err:?}"
    );
    assert!(err.starts_with("unionmount: "), "stderr {err:?}");
    for c in culprits {
        assert!(err.contains(c), "stderr {err:?} does not name {c:?}");
    }
    for (p, b) in watched.iter().zip(before) {
        assert_eq!(
            snapshot(p),
            b,
            "unionmount {args:?} changed {}",
            p.display()
        );
    }
    assert_eq!(list_dir(&fx.upper), Vec::<String>::new(), "upper");
    assert_eq!(list_dir(&fx.work), Vec::<String>::new(), "workdir");
}

#[test]
fn rejects_missing_lower_layer() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let missing = fx.dir.join("missing-layer");
    let lowers = format!("{}:{}", fx.lowers[0].display(), missing.display());
    let args = o_args(&lowers, &fx.upper, &fx.work, "", &fx.mnt);
    assert_rejected(&fx, args, EXIT_ERROR, &[missing.to_str().unwrap()], &[]);
    // Same through --layers.
    let args = vec![
        os("--layers"),
        os(&lowers),
        os("--upper"),
        os(&fx.upper),
        os("--work"),
        os(&fx.work),
        os(&fx.mnt),
    ];
    assert_rejected(&fx, args, EXIT_ERROR, &[missing.to_str().unwrap()], &[]);
}

#[test]
fn rejects_lower_layer_that_is_a_file() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let file = fx.write(&fx.dir, "plain-file", b"f", 0o644);
    let lowers = format!("{}:{}", file.display(), fx.lowers[1].display());
    let args = o_args(&lowers, &fx.upper, &fx.work, "", &fx.mnt);
    assert_rejected(&fx, args, EXIT_ERROR, &[file.to_str().unwrap()], &[]);
}

#[test]
fn rejects_missing_upperdir() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let missing = fx.dir.join("missing-upper");
    let args = o_args(lower0(&fx), &missing, &fx.work, "", &fx.mnt);
    assert_rejected(
        &fx,
        args,
        EXIT_ERROR,
        &["upperdir", missing.to_str().unwrap()],
        &[],
    );
}

/// upperdir on /var/tmp (ext4 here), workdir on /dev/shm (tmpfs): refused, naming the
/// workdir; neither directory gets anything.
#[test]
fn rejects_workdir_on_another_filesystem() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let shm = TempDir::new_in("/dev/shm", "work");
    let dev = |p: &Path| fs::metadata(p).unwrap().dev();
    assert_ne!(
        dev(&shm.0),
        dev(&fx.upper),
        "precondition: /dev/shm and {} on different filesystems",
        fx.upper.display()
    );
    let args = o_args(lower0(&fx), &fx.upper, &shm.0, "", &fx.mnt);
    assert_rejected(
        &fx,
        args,
        EXIT_ERROR,
        &["workdir", shm.0.to_str().unwrap()],
        &[&shm.0],
    );
    assert_eq!(
        list_dir(&shm.0),
        Vec::<String>::new(),
        "workdir on /dev/shm"
    );
}

#[test]
fn rejects_missing_mountpoint() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let missing = fx.dir.join("missing-mnt");
    let args = o_args(lower0(&fx), &fx.upper, &fx.work, "", &missing);
    assert_rejected(&fx, args, EXIT_ERROR, &[missing.to_str().unwrap()], &[]);
    assert!(!missing.exists(), "the mountpoint was created");
}

#[test]
fn rejects_mountpoint_that_is_a_file() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let file = fx.write(&fx.dir, "mnt-file", b"f", 0o644);
    let args = o_args(lower0(&fx), &fx.upper, &fx.work, "", &file);
    let _c = MountGuard::adopt(&file);
    assert_rejected(&fx, args, EXIT_ERROR, &[file.to_str().unwrap()], &[]);
    assert!(!is_mounted(&file), "mounted on the file");
}

#[test]
fn rejects_unknown_option() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let args = vec![
        os("-o"),
        os(format!("lowerdir={},frobnicate", fx.lowers[0].display())),
        os(&fx.mnt),
    ];
    assert_rejected(&fx, args, EXIT_ERROR, &["frobnicate"], &[]);
}

#[test]
fn rejects_unknown_option_value() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let args = lower0_o_args(&fx, "fsync=7");
    assert_rejected(&fx, args, EXIT_ERROR, &["fsync", "7"], &[]);
}

#[test]
fn rejects_empty_layer_element() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let lowers = format!("{}::{}", fx.lowers[0].display(), fx.lowers[1].display());
    let args = o_args(&lowers, &fx.upper, &fx.work, "", &fx.mnt);
    assert_rejected(&fx, args, EXIT_ERROR, &["lowerdir"], &[]);
    let args = vec![
        os("--layers"),
        os(format!("{}:", fx.lowers[0].display())),
        os(&fx.mnt),
    ];
    assert_rejected(&fx, args, EXIT_ERROR, &["--layers"], &[]);
}

#[test]
fn rejects_upperdir_without_workdir() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let args = vec![
        os("-o"),
        os(format!(
            "lowerdir={},upperdir={}",
            fx.lowers[0].display(),
            fx.upper.display()
        )),
        os(&fx.mnt),
    ];
    assert_rejected(&fx, args, EXIT_ERROR, &["workdir"], &[]);
    let args = vec![
        os("--layers"),
        os(&fx.lowers[0]),
        os("--upper"),
        os(&fx.upper),
        os(&fx.mnt),
    ];
    assert_rejected(&fx, args, EXIT_ERROR, &["work"], &[]);
}

#[test]
fn rejects_unknown_flag() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let args = vec![os("--frob"), os("--layers"), os(&fx.lowers[0]), os(&fx.mnt)];
    assert_rejected(&fx, args, EXIT_USAGE, &["--frob"], &[]);
}

#[test]
fn rejects_missing_mountpoint_argument() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let args = vec![os("--layers"), os(&fx.lowers[0])];
    assert_rejected(&fx, args, EXIT_USAGE, &["MOUNTPOINT"], &[]);
}

#[test]
fn rejects_unterminated_quote() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let args = lower0_o_args(&fx, "context=\"abc");
    assert_rejected(&fx, args, EXIT_ERROR, &["context"], &[]);
}
