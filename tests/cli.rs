//! The command line as a user and as mount(8) / containers/storage drive it (DESIGN 1): the
//! three mount forms, `--help`/`--version`, the process model (returns only when the mount
//! is live, `-f`, a daemon that lets go of its caller's stdio, SIGTERM/SIGINT), the mount
//! table entry, the options containers/storage passes, and bad input: one `unionmount: `
//! line on stderr naming the culprit, a non-zero exit, nothing mounted, nothing written.

mod common;

use common::{Fixture, assert_file, is_mounted, list_dir, unionmount_bin, with_timeout};
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds any single step (a command, a filesystem access) may take.
const STEP: u64 = 5;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// Run `prog args` with stdin from /dev/null, under a timeout; stdout and stderr captured
/// (`output()` also waits for EOF on both pipes).
fn run_prog(prog: impl AsRef<OsStr>, args: Vec<OsString>) -> Output {
    let prog = os(prog);
    with_timeout(STEP, move || {
        Command::new(&prog)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn {prog:?}: {e}"))
    })
}

fn run(args: Vec<OsString>) -> Output {
    run_prog(unionmount_bin(), args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The command succeeded (exit 0) and printed nothing.
#[track_caller]
fn assert_quiet_success(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: exit status {}; stderr: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "", "{what}: stdout");
    assert_eq!(text(&out.stderr), "", "{what}: stderr");
}

/// `/proc/self/mounts` entry for `mnt`: (source, fstype, options).
fn mount_entry(mnt: &Path) -> Option<(String, String, Vec<String>)> {
    let want = mnt.as_os_str().as_bytes();
    let table = fs::read_to_string("/proc/self/mounts").ok()?;
    let mut found = None;
    for line in table.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() >= 4 && unescape(f[1]) == want {
            found = Some((
                f[0].to_string(),
                f[2].to_string(),
                f[3].split(',').map(str::to_string).collect(),
            ));
        }
    }
    found
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn umount2(mnt: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = CString::new(mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Poll `cond` every 10 ms for up to `limit`.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Live (non-zombie) processes whose argv has `mnt` as one whole argument and whose
/// argv[0] names a `unionmount` binary: the daemons serving `mnt`.
fn daemon_pids(mnt: &Path) -> Vec<i32> {
    let want = mnt.as_os_str().as_bytes();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_um = args
            .first()
            .and_then(|a| Path::new(OsStr::from_bytes(a)).file_name())
            .is_some_and(|n| n == "unionmount");
        if is_um && args.contains(&want) {
            pids.push(pid);
        }
    }
    pids
}

/// `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn kill(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid we started or observed serving our own mountpoint.
    unsafe { libc::kill(pid, sig) };
}

/// Unmounts `mnt` on drop if something is still mounted there (umount, then lazily), and
/// makes sure no daemon for it survives (SIGKILL after a bounded wait). Never stats `mnt`.
struct Cleanup {
    mnt: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let pids = daemon_pids(&self.mnt);
        if is_mounted(&self.mnt) && umount2(&self.mnt, 0).is_err() {
            let _ = umount2(&self.mnt, libc::MNT_DETACH);
        }
        if !wait_for(Duration::from_secs(5), || !is_mounted(&self.mnt)) {
            eprintln!("warning: {} still mounted", self.mnt.display());
        }
        if !wait_for(Duration::from_secs(5), || pids.iter().all(|&p| !alive(p))) {
            for &p in &pids {
                kill(p, libc::SIGKILL);
            }
        }
    }
}

fn cleanup(mnt: &Path) -> Cleanup {
    Cleanup {
        mnt: mnt.to_path_buf(),
    }
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

/// A directory outside the fixture (e.g. on /dev/shm), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(base: &str, tag: &str) -> TempDir {
        let p = PathBuf::from(base).join(format!(
            "unionmount-cli-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
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
    let _c = cleanup(&fx.mnt);
    let out = run(vec![
        os("--layers"),
        layers_arg(&fx),
        os("--upper"),
        os(&fx.upper),
        os("--work"),
        os(&fx.work),
        os(&fx.mnt),
    ]);
    assert_quiet_success(&out, "unionmount --layers --upper --work");
    // Live the moment the command returned: no polling.
    let (source, fstype, opts) = mount_entry(&fx.mnt).expect("mounted when the command returns");
    assert_eq!(fstype, "fuse.unionmount");
    assert_eq!(source, "unionmount");
    assert_eq!(opts[0], "rw", "options {opts:?}");
    for o in [
        "allow_other",
        "default_permissions",
        "user_id=0",
        "group_id=0",
    ] {
        assert!(opts.iter().any(|x| x == o), "{o} missing from {opts:?}");
    }
    for o in ["nosuid", "nodev", "ro"] {
        assert!(!opts.iter().any(|x| x == o), "{o} in {opts:?}");
    }
    assert_eq!(statvfs_flags(&fx.mnt) & libc::ST_RDONLY, 0);
    assert_three_layers_merged(&fx.mnt);
    let m = fx.mnt.clone();
    with_timeout(STEP, move || fs::write(m.join("new"), b"n").unwrap());
    assert_file(fx.u("new"), b"n");
    let pids = daemon_pids(&fx.mnt);
    assert_eq!(pids.len(), 1, "one daemon serves {}", fx.mnt.display());
    let out = run_prog("umount", vec![os(&fx.mnt)]);
    assert_quiet_success(&out, "umount MNT");
    assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
}

/// Without an upper the mount is read-only: `ro` in the table, ST_RDONLY, EROFS on write.
#[test]
fn layers_form_without_upper_is_read_only() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = cleanup(&fx.mnt);
    let out = run(vec![os("--layers"), layers_arg(&fx), os(&fx.mnt)]);
    assert_quiet_success(&out, "unionmount --layers");
    let (_, fstype, opts) = mount_entry(&fx.mnt).expect("mounted");
    assert_eq!(fstype, "fuse.unionmount");
    assert_eq!(opts[0], "ro", "options {opts:?}");
    assert_ne!(statvfs_flags(&fx.mnt) & libc::ST_RDONLY, 0, "ST_RDONLY");
    assert_three_layers_merged(&fx.mnt);
    let m = fx.mnt.clone();
    let e = with_timeout(STEP, move || {
        common::errno_of(fs::write(m.join("new"), b"n"))
    });
    assert_eq!(
        e,
        libc::EROFS,
        "write on a read-only mount: {}",
        common::errno_name(e)
    );
    let pids = daemon_pids(&fx.mnt);
    assert_quiet_success(&run_prog("umount", vec![os(&fx.mnt)]), "umount");
    assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
}

/// `-o ro` with an upper and workdir: read-only, and the upper stays untouched.
#[test]
fn ro_option_with_upper_is_read_only() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = cleanup(&fx.mnt);
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},ro",
        layers_arg(&fx).to_str().unwrap(),
        fx.upper.display(),
        fx.work.display()
    );
    let out = run(vec![os("-o"), os(opts), os(&fx.mnt)]);
    assert_quiet_success(&out, "unionmount -o ...,ro");
    let (_, _, opts) = mount_entry(&fx.mnt).expect("mounted");
    assert_eq!(opts[0], "ro", "options {opts:?}");
    assert_ne!(statvfs_flags(&fx.mnt) & libc::ST_RDONLY, 0, "ST_RDONLY");
    let m = fx.mnt.clone();
    let e = with_timeout(STEP, move || common::errno_of(fs::create_dir(m.join("nd"))));
    assert_eq!(
        e,
        libc::EROFS,
        "mkdir on a ro mount: {}",
        common::errno_name(e)
    );
    assert_eq!(list_dir(&fx.upper), Vec::<String>::new());
    let pids = daemon_pids(&fx.mnt);
    assert_quiet_success(&run_prog("umount", vec![os(&fx.mnt)]), "umount");
    assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
}

/// fuse-overlayfs form with `-o` given twice, the second after the mountpoint:
/// both are honoured (nosuid,nodev show in the table).
#[test]
fn o_form_repeated_and_after_mountpoint() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = cleanup(&fx.mnt);
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
    let (_, fstype, opts) = mount_entry(&fx.mnt).expect("mounted");
    assert_eq!(fstype, "fuse.unionmount");
    assert_eq!(opts[0], "rw", "options {opts:?}");
    for o in ["nosuid", "nodev", "allow_other", "default_permissions"] {
        assert!(opts.iter().any(|x| x == o), "{o} missing from {opts:?}");
    }
    assert_three_layers_merged(&fx.mnt);
    let m = fx.mnt.clone();
    with_timeout(STEP, move || fs::write(m.join("a"), b"changed").unwrap());
    assert_file(fx.u("a"), b"changed");
    assert_file(fx.l(0, "a"), b"top-a");
    let pids = daemon_pids(&fx.mnt);
    assert_quiet_success(&run_prog("umount", vec![os(&fx.mnt)]), "umount");
    assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
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
    let _c = cleanup(&fx.mnt);
    let _link = HelperLink::install();
    let out = run_prog(
        "mount",
        vec![
            os("-t"),
            os("fuse.unionmount"),
            os("unionmount"),
            os(&fx.mnt),
            os("-o"),
            os(format!(
                "lowerdir={},upperdir={},workdir={}",
                layers_arg(&fx).to_str().unwrap(),
                fx.upper.display(),
                fx.work.display()
            )),
        ],
    );
    assert_quiet_success(&out, "mount -t fuse.unionmount");
    let (source, fstype, opts) = mount_entry(&fx.mnt).expect("mounted when mount(8) returns");
    assert_eq!(
        (source.as_str(), fstype.as_str()),
        ("unionmount", "fuse.unionmount")
    );
    assert_eq!(opts[0], "rw", "options {opts:?}");
    for o in ["allow_other", "default_permissions"] {
        assert!(opts.iter().any(|x| x == o), "{o} missing from {opts:?}");
    }
    for o in ["nosuid", "nodev"] {
        assert!(!opts.iter().any(|x| x == o), "{o} in {opts:?}");
    }
    assert_three_layers_merged(&fx.mnt);
    let m = fx.mnt.clone();
    with_timeout(STEP, move || fs::write(m.join("via-mount8"), b"v").unwrap());
    assert_file(fx.u("via-mount8"), b"v");
    let pids = daemon_pids(&fx.mnt);
    assert_eq!(pids.len(), 1, "one daemon serves {}", fx.mnt.display());
    assert_quiet_success(&run_prog("umount", vec![os(&fx.mnt)]), "umount MNT");
    assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
}

/// mount(8) form with bad input: mount fails, the helper's one-line error reaches the
/// user, nothing is mounted.
#[test]
fn mount8_form_reports_a_missing_lowerdir() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = cleanup(&fx.mnt);
    let _link = HelperLink::install();
    let missing = fx.dir.join("no-such-layer");
    let before = snapshot(&fx.dir);
    let out = run_prog(
        "mount",
        vec![
            os("-t"),
            os("fuse.unionmount"),
            os("unionmount"),
            os(&fx.mnt),
            os("-o"),
            os(format!(
                "lowerdir={},upperdir={},workdir={}",
                missing.display(),
                fx.upper.display(),
                fx.work.display()
            )),
        ],
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
        .arg("--layers")
        .arg(layers_arg(fx))
        .arg("--upper")
        .arg(&fx.upper)
        .arg("--work")
        .arg(&fx.work)
        .arg(&fx.mnt)
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

/// After `trigger`, the foreground process exits 0 within 3 s with no output, and the
/// mount is gone.
fn foreground_ends_cleanly(fx: &Fixture, trigger: impl FnOnce(i32)) {
    let mut reap = start_foreground(fx);
    let pid = reap.0.as_ref().unwrap().id() as i32;
    trigger(pid);
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
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = cleanup(&fx.mnt);
    foreground_ends_cleanly(&fx, |pid| kill(pid, libc::SIGTERM));
}

#[test]
fn foreground_sigint_unmounts_and_exits_0() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = cleanup(&fx.mnt);
    foreground_ends_cleanly(&fx, |pid| kill(pid, libc::SIGINT));
}

#[test]
fn foreground_exits_0_when_unmounted() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = cleanup(&fx.mnt);
    let mnt = fx.mnt.clone();
    foreground_ends_cleanly(&fx, move |_| {
        let out = run_prog("umount", vec![os(&mnt)]);
        assert_quiet_success(&out, "umount MNT");
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
    let _c = cleanup(&fx.mnt);
    let t0 = Instant::now();
    let out = run(vec![
        os("--layers"),
        layers_arg(&fx),
        os("--upper"),
        os(&fx.upper),
        os("--work"),
        os(&fx.work),
        os(&fx.mnt),
    ]);
    let took = t0.elapsed();
    assert_quiet_success(&out, "unionmount with piped stdout/stderr");
    assert!(
        took < Duration::from_secs(2),
        "output() took {took:?}: the daemon kept the pipes open"
    );
    assert!(is_mounted(&fx.mnt), "the mount did not stay up");
    let pids = daemon_pids(&fx.mnt);
    assert_eq!(pids.len(), 1, "one daemon serves {}", fx.mnt.display());
    assert_three_layers_merged(&fx.mnt);
    // The daemon's fds 1 and 2 are not pipes any more.
    for fd in [1, 2] {
        let target =
            fs::read_link(format!("/proc/{}/fd/{fd}", pids[0])).map(|p| p.display().to_string());
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
    let _c = cleanup(&fx.mnt);
    let out = run(vec![os("--layers"), layers_arg(&fx), os(&fx.mnt)]);
    assert_quiet_success(&out, "unionmount --layers");
    let pids = daemon_pids(&fx.mnt);
    assert_eq!(pids.len(), 1, "one daemon serves {}", fx.mnt.display());
    kill(pids[0], libc::SIGTERM);
    assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
}

/// SIGTERM while a process has its cwd inside the mount: the mount is detached lazily
/// (gone from mountinfo at once); the daemon exits once the last user lets go.
#[test]
fn daemon_sigterm_when_busy_detaches_lazily() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = cleanup(&fx.mnt);
    let out = run(vec![os("--layers"), layers_arg(&fx), os(&fx.mnt)]);
    assert_quiet_success(&out, "unionmount --layers");
    let pids = daemon_pids(&fx.mnt);
    assert_eq!(pids.len(), 1, "one daemon serves {}", fx.mnt.display());
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
    kill(pids[0], libc::SIGTERM);
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
    assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
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
    let _c = cleanup(&fx.mnt);
    let out = run(vec![
        os("-o"),
        os(format!(
            "lowerdir={},upperdir={},workdir={},context=\"system_u:object_r:container_file_t:s0:c1,c2\",volatile",
            layers_arg(&fx).to_str().unwrap(),
            fx.upper.display(),
            fx.work.display()
        )),
        os(&fx.mnt),
    ]);
    assert_quiet_success(&out, "unionmount -o ...,context=\"...,c2\",volatile");
    let (_, fstype, opts) = mount_entry(&fx.mnt).expect("mounted");
    assert_eq!(fstype, "fuse.unionmount");
    assert_eq!(opts[0], "rw", "options {opts:?}");
    assert_three_layers_merged(&fx.mnt);
    let m = fx.mnt.clone();
    with_timeout(STEP, move || fs::write(m.join("f"), b"v").unwrap());
    assert_file(fx.u("f"), b"v");
    let pids = daemon_pids(&fx.mnt);
    assert_quiet_success(&run_prog("umount", vec![os(&fx.mnt)]), "umount");
    assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
}

#[test]
fn fsync_0_mounts() {
    if !common::mount_allowed() {
        return;
    }
    let fx = three_layers();
    let _c = cleanup(&fx.mnt);
    let out = run(vec![
        os("-o"),
        os(format!(
            "lowerdir={},upperdir={},workdir={},fsync=0",
            layers_arg(&fx).to_str().unwrap(),
            fx.upper.display(),
            fx.work.display()
        )),
        os(&fx.mnt),
    ]);
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
    let pids = daemon_pids(&fx.mnt);
    assert_quiet_success(&run_prog("umount", vec![os(&fx.mnt)]), "umount");
    assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
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
    let _c = cleanup(&fx.mnt);
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
        let pids = daemon_pids(&fx.mnt);
        assert_quiet_success(&run_prog("umount", vec![os(&fx.mnt)]), "umount");
        assert_unmounted_and_daemon_gone(&fx.mnt, &pids);
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
    let _c = cleanup(&fx.mnt);
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

/// `-o lowerdir=LOWERS,upperdir=U,workdir=W MNT` with the given pieces.
fn o_args(lowerdir: &str, upper: &Path, work: &Path, extra: &str, mnt: &Path) -> Vec<OsString> {
    let mut o = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    if !extra.is_empty() {
        o.push(',');
        o.push_str(extra);
    }
    vec![os("-o"), os(o), os(mnt)]
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
    let args = o_args(
        fx.lowers[0].to_str().unwrap(),
        &missing,
        &fx.work,
        "",
        &fx.mnt,
    );
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
    let shm = TempDir::new("/dev/shm", "work");
    let dev = |p: &Path| fs::metadata(p).unwrap().dev();
    assert_ne!(
        dev(&shm.0),
        dev(&fx.upper),
        "precondition: /dev/shm and {} on different filesystems",
        fx.upper.display()
    );
    let args = o_args(
        fx.lowers[0].to_str().unwrap(),
        &fx.upper,
        &shm.0,
        "",
        &fx.mnt,
    );
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
    let args = o_args(
        fx.lowers[0].to_str().unwrap(),
        &fx.upper,
        &fx.work,
        "",
        &missing,
    );
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
    let args = o_args(
        fx.lowers[0].to_str().unwrap(),
        &fx.upper,
        &fx.work,
        "",
        &file,
    );
    let _c = cleanup(&file);
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
    let args = o_args(
        fx.lowers[0].to_str().unwrap(),
        &fx.upper,
        &fx.work,
        "fsync=7",
        &fx.mnt,
    );
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
    let args = o_args(
        fx.lowers[0].to_str().unwrap(),
        &fx.upper,
        &fx.work,
        "context=\"abc",
        &fx.mnt,
    );
    assert_rejected(&fx, args, EXIT_ERROR, &["context"], &[]);
}
