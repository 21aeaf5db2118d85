//! Crash safety under SIGKILL (issue 5): the daemon, `image commit` and `image import` are
//! killed at random moments (before, during and after an operation) and what is left on disk
//! is checked.
//!
//! File-system scenarios (one test each): copy-up of a large lower file and of a sparse one
//! (1-byte append, chmod, open O_RDWR), renames of lower files and of an upper directory over
//! a whiteout (and the EXDEV a lower directory gets), deletes (whiteout creation, replacing a
//! copied-up file with a whiteout, `rm -rf` of a lower tree), and creation over a whiteout
//! (mkdir makes an opaque dir). One kill:
//! 1. fresh upper and work, mount, run the scenario's preparation through the mount and take
//!    the merged tree as the before-state; the after-state is computed from it by the
//!    scenario's model (never by running the operation);
//! 2. run the operation on a thread, SIGKILL the daemon after a random delay within 1.3x
//!    the operation's measured time (a fifth of the kills come before it starts), detach the
//!    dead mount. Half the kills run the daemon under strace delay injection (3 ms after
//!    each syscall that changes the upper or workdir, `UNIONMOUNT_CRASH_SLOW=0` turns it
//!    off), so that kills fall between the steps of one operation, not only around it;
//! 3. check the raw upper: every regular file in it is complete, i.e. equal (bytes, mode,
//!    owner, mtime, xattrs) to its lower source or to its before- or after-state, and a
//!    complete copy of a sparse file kept its holes;
//! 4. remount over the same upper and work: the workdir holds no leftovers, and the merged
//!    tree equals the before- or the after-state exactly (names, types, modes, owners, sizes,
//!    content hashes, link targets, xattrs; file mtimes where the model knows them); an
//!    `rm -rf` may also stop between its unlinks (a tree between the two states);
//! 5. redo the operation if it had not happened, and the tree is the after-state; the mount
//!    is usable (a probe file is written and removed); unmount cleanly.
//!
//! Store scenarios: `image commit` of an upper over an imported image and `image import` of
//! an OCI layout are SIGKILLed at random moments; then `image verify` exits 0, every file in
//! `blobs/sha256/` hashes to its name, `index.json` parses and every name in it leads to a
//! manifest whose config and layers are present, the new name is absent or mounts to exactly
//! the expected tree, and running the command again works.
//!
//! Knobs: `UNIONMOUNT_CRASH_KILLS` (total kills over the 7 scenarios, default 28: the CI run),
//! `UNIONMOUNT_CRASH_SEED` (default from the clock; printed), `UNIONMOUNT_CRASH_BIG_MIB` (size of
//! the large file, default 64). Each scenario prints one `crash[NAME]:` line with its figures.
//! `scripts/crash.sh` runs the same tests with 200+ kills.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use common::{
    Driver, Fixture, MountGuard, TempDir, alive, daemon_pids, get_xattr, is_mounted, kill,
    list_xattrs, mount, mount_allowed, text, umount2, unionmount_bin, wait_for, with_timeout,
    work_leftovers,
};

const MIB: u64 = 1 << 20;
/// Fixed times of lower objects, so that a copy's mtime can be checked exactly.
const T_LOWER: (i64, i64) = (1_600_000_000, 123_456_789);

// ---------------------------------------------------------------------------------------
// Knobs, randomness, reporting
// ---------------------------------------------------------------------------------------

const SCENARIOS: usize = 7;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Kills for one scenario: the total spread evenly (rounded up), at least one.
fn kills_per_scenario() -> u64 {
    env_u64("UNIONMOUNT_CRASH_KILLS", 28)
        .div_ceil(SCENARIOS as u64)
        .max(1)
}

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(scenario: &str) -> Rng {
        let base = env_u64(
            "UNIONMOUNT_CRASH_SEED",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
        );
        eprintln!("crash[{scenario}]: seed {base} (UNIONMOUNT_CRASH_SEED)");
        let mut h = base ^ 0x9e37_79b9_7f4a_7c15;
        for b in scenario.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Rng(h | 1)
    }
    fn next(&mut self) -> u64 {
        common::xorshift64star(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Pseudo-random bytes (incompressible enough that gzip takes its time).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Where the kill fell relative to the operation, and which state it left.
#[derive(Default)]
struct Tally {
    kills: u64,
    phase_before: u64,
    phase_during: u64,
    phase_after: u64,
    state_before: u64,
    state_after: u64,
    state_between: u64,
    leftovers_cleaned: u64,
    by_op: BTreeMap<String, u64>,
}

impl Tally {
    fn print(&self, scenario: &str, started: Instant) {
        let ops: Vec<String> = self.by_op.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "crash[{scenario}]: {} kills survived (killed before op {}, during {}, after {}); \
             state left: before {}, after {}, between {}; workdir/tmp leftovers cleaned {}; \
             ops {}; {:.1} s",
            self.kills,
            self.phase_before,
            self.phase_during,
            self.phase_after,
            self.state_before,
            self.state_after,
            self.state_between,
            self.leftovers_cleaned,
            ops.join(" "),
            started.elapsed().as_secs_f64()
        );
    }
}

const PH_NOT_STARTED: u8 = 0;
const PH_RUNNING: u8 = 1;
const PH_DONE: u8 = 2;

// ---------------------------------------------------------------------------------------
// Tree model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    /// sha256 of the contents, hex.
    File(String),
    Symlink(Vec<u8>),
    Other(u32),
}

#[derive(Clone, Debug)]
struct Ent {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    /// 0 for directories (their size is not an overlay contract).
    size: u64,
    /// None: any (directories; files whose mtime the operation sets to "now").
    mtime: Option<(i64, i64)>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

impl Ent {
    /// `self` (observed) is what `want` (a model, maybe with wildcards) describes.
    fn matches(&self, want: &Ent) -> bool {
        self.kind == want.kind
            && self.mode == want.mode
            && (self.uid, self.gid) == (want.uid, want.gid)
            && self.size == want.size
            && self.xattrs == want.xattrs
            && (want.mtime.is_none() || self.mtime == want.mtime)
    }
}

type Tree = BTreeMap<String, Ent>;

/// Overlay-private xattr names (never user data) and security labels.
fn private_xattr(name: &str) -> bool {
    name.starts_with("security.")
        || (name.starts_with("trusted.overlay.") && !name.starts_with("trusted.overlay.overlay."))
        || (name.starts_with("user.overlay.") && !name.starts_with("user.overlay.overlay."))
        || name.starts_with("user.fuseoverlayfs.")
        || name.starts_with("user.unionmount.")
}

fn sha256_file(p: &Path, extra: &[u8]) -> io::Result<String> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.update(extra);
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_ent(p: &Path) -> io::Result<Ent> {
    let md = fs::symlink_metadata(p)?;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File(sha256_file(p, b"")?)
    } else if ft.is_symlink() {
        Kind::Symlink(
            fs::read_link(p)?
                .into_os_string()
                .into_encoded_bytes()
                .to_vec(),
        )
    } else {
        Kind::Other(md.mode() & libc::S_IFMT)
    };
    let mut xattrs = BTreeMap::new();
    for n in list_xattrs(p).unwrap_or_default() {
        if !private_xattr(&n) {
            xattrs.insert(n.clone(), get_xattr(p, &n).unwrap_or_default());
        }
    }
    let is_dir = kind == Kind::Dir;
    Ok(Ent {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: if is_dir { 0 } else { md.size() },
        mtime: (!is_dir).then(|| (md.mtime(), md.mtime_nsec())),
        xattrs,
    })
}

/// Every path under `root` (not the root itself), as a user sees it.
fn snapshot(root: &Path) -> io::Result<Tree> {
    fn walk(root: &Path, rel: &str, out: &mut Tree) -> io::Result<()> {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for de in fs::read_dir(&dir)? {
            let name = de?.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let e = read_ent(&root.join(&r))?;
            let is_dir = e.kind == Kind::Dir;
            out.insert(r.clone(), e);
            if is_dir {
                walk(root, &r, out)?;
            }
        }
        Ok(())
    }
    let mut out = Tree::new();
    walk(root, "", &mut out)?;
    Ok(out)
}

fn snapshot_within(root: &Path) -> Tree {
    let r = root.to_path_buf();
    with_timeout(60, move || snapshot(&r))
        .unwrap_or_else(|e| panic!("snapshot of {}: {e}", root.display()))
}

/// Lines saying how `got` differs from the model `want`.
fn tree_diff(got: &Tree, want: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => out.push(format!("{k}: missing (want {w:?})")),
            Some(g) if !g.matches(w) => out.push(format!("{k}: got {g:?}, want {w:?}")),
            _ => {}
        }
    }
    for k in got.keys() {
        if !want.contains_key(k) {
            out.push(format!("{k}: unexpected {:?}", got[k]));
        }
    }
    out
}

/// Every entry of `got` is in `outer` as it is there, and every entry of `inner` is in
/// `got` as it is there: a state part-way through removing `outer - inner`.
fn between(got: &Tree, outer: &Tree, inner: &Tree) -> bool {
    got.iter()
        .all(|(k, g)| outer.get(k).is_some_and(|o| g.matches(o)))
        && inner
            .iter()
            .all(|(k, i)| got.get(k).is_some_and(|g| g.matches(i)))
}

fn remove_subtree(t: &mut Tree, path: &str) {
    let prefix = format!("{path}/");
    t.retain(|k, _| k != path && !k.starts_with(&prefix));
}

/// Moves `from` (and everything below it) to `to`, replacing whatever was at `to`.
fn move_subtree(t: &mut Tree, from: &str, to: &str) {
    remove_subtree(t, to);
    let prefix = format!("{from}/");
    let moved: Vec<(String, Ent)> = t
        .iter()
        .filter(|(k, _)| *k == from || k.starts_with(&prefix))
        .map(|(k, e)| (format!("{to}{}", &k[from.len()..]), e.clone()))
        .collect();
    remove_subtree(t, from);
    t.extend(moved);
}

// ---------------------------------------------------------------------------------------
// File-system scenarios
// ---------------------------------------------------------------------------------------

/// One operation of a scenario.
struct FsOp {
    name: &'static str,
    /// Runs through the mount before the before-state is taken (must complete).
    prep: fn(&Path) -> io::Result<()>,
    /// The operation that is killed.
    op: fn(&Path) -> io::Result<()>,
    /// The after-state from the before-state and the scenario's lower.
    model: fn(&Tree, &Path) -> Tree,
    /// The operation is a sequence of removals (`rm -rf`): a crash may stop between them.
    removal_sequence: bool,
    /// Upper path → lower paths its complete copy may come from (besides itself).
    origins: fn(&str) -> Vec<String>,
}

fn no_prep(_: &Path) -> io::Result<()> {
    Ok(())
}

fn same_origin(_: &str) -> Vec<String> {
    Vec::new()
}

/// Drops the kills' victims: a FUSE mount whose daemon is gone is detached, and waits until
/// it is out of the mount table.
fn detach_dead_mount(mnt: &Path) {
    let _ = umount2(mnt, libc::MNT_DETACH);
    assert!(
        wait_for(Duration::from_secs(10), || !is_mounted(mnt)),
        "{} still mounted after the daemon was killed and it was detached",
        mnt.display()
    );
}

fn clear_dir(d: &Path) {
    for e in fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
}

fn the_daemon(mnt: &Path) -> i32 {
    let pids = daemon_pids(mnt);
    assert_eq!(pids.len(), 1, "daemons serving {}: {pids:?}", mnt.display());
    pids[0]
}

fn mount_rw(fx: &Fixture) -> MountGuard {
    mount(&Driver::Unionmount, fx, true, &[]).unwrap_or_else(|e| panic!("mount: {e}"))
}

/// The syscalls that change the upper or the workdir: in a slowed mount each one sleeps
/// after it returns, so that a kill falls between two steps of one operation (between a
/// copy's data and its metadata and its rename, between a whiteout and an opaque mark).
const SLOW_CALLS: &str = "renameat2,renameat,unlinkat,mknodat,linkat,mkdirat,symlinkat,\
setxattr,lsetxattr,fsetxattr,removexattr,lremovexattr,fremovexattr,fchownat,fchown,\
fchmodat,fchmod,utimensat,copy_file_range,ftruncate";
/// Sleep after each slowed syscall.
const SLOW_US: u64 = 3000;

/// Whether the daemon can be slowed with strace's delay injection (`UNIONMOUNT_CRASH_SLOW=0`
/// turns it off). Without strace, every kill uses the plain daemon and the report says so.
fn strace_can_slow() -> bool {
    if std::env::var("UNIONMOUNT_CRASH_SLOW").as_deref() == Ok("0") {
        return false;
    }
    Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("trace={SLOW_CALLS}"))
        .arg("-e")
        .arg(format!("inject={SLOW_CALLS}:delay_exit=1"))
        .arg("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Mounts `fx` read-write with the daemon running under strace, which delays every
/// syscall in [`SLOW_CALLS`]. Returns the guard and the strace process (reaped by the
/// caller once the daemon is dead).
fn mount_rw_slow(fx: &Fixture) -> (MountGuard, std::process::Child) {
    let guard = MountGuard::adopt(&fx.mnt);
    let mut opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        fx.lowers[0].display(),
        fx.upper.display(),
        fx.work.display()
    );
    // The same extra options as every other mount of the run (`common::mount`).
    if let Ok(more) = std::env::var("UNIONMOUNT_TEST_OPTS")
        && !more.is_empty()
    {
        opts.push(',');
        opts.push_str(&more);
    }
    let child = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("trace={SLOW_CALLS}"))
        .arg("-e")
        .arg(format!("inject={SLOW_CALLS}:delay_exit={SLOW_US}"))
        .arg(unionmount_bin())
        .arg("-o")
        .arg(opts)
        .arg(&fx.mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn strace");
    assert!(
        wait_for(Duration::from_secs(30), || is_mounted(&fx.mnt)
            && daemon_pids(&fx.mnt).len() == 1),
        "slowed mount of {} did not come up",
        fx.mnt.display()
    );
    (guard, child)
}

/// Runs `f(mnt)` under a timeout.
fn through<T: Send + 'static>(
    mnt: &Path,
    what: &str,
    f: impl FnOnce(&Path) -> io::Result<T> + Send + 'static,
) -> T {
    let m = mnt.to_path_buf();
    let w = what.to_string();
    with_timeout(120, move || f(&m).unwrap_or_else(|e| panic!("{w}: {e}")))
}

/// Regular files in the raw upper must be complete copies (see the file's doc, step 3).
fn check_upper(fx: &Fixture, op: &FsOp, before: &Tree, after: &Tree, sparse: &[&str]) {
    let lower = snapshot(&fx.lowers[0]).unwrap();
    let upper = snapshot(&fx.upper).unwrap();
    for (rel, e) in &upper {
        if !matches!(e.kind, Kind::File(_)) {
            continue;
        }
        let name = rel.rsplit('/').next().unwrap();
        if name.starts_with(".wh.") && e.size == 0 {
            continue; // a whiteout in the OCI dialect
        }
        let mut origins = vec![rel.clone()];
        origins.extend((op.origins)(rel));
        // A metadata-only copy (metacopy=on) keeps its bytes below, whatever it holds (a
        // kill while its bytes were being copied in leaves some): only its metadata counts.
        // Copying the bytes into the metacopy's inode moves its mtime until the copy-up puts
        // it back; a kill in between leaves the times recorded beside the marker, and the
        // next lookup puts them back (step 4 checks that through the mount).
        let metacopy = common::union_metacopy()
            && common::get_xattr(&fx.u(rel), "trusted.overlay.metacopy").is_ok();
        let recorded = common::get_xattr(&fx.u(rel), "user.unionmount.filltimes")
            .ok()
            .filter(|v| v.len() == 32)
            .map(|v| {
                let n = |i: usize| i64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().unwrap());
                (n(2), n(3))
            });
        let as_copy_of = |l: &Ent| {
            let mut e = e.clone();
            if metacopy {
                e.kind = l.kind.clone();
                if recorded.is_some() {
                    e.mtime = recorded;
                }
            }
            e
        };
        let ok = origins
            .iter()
            .any(|o| lower.get(o).is_some_and(|l| as_copy_of(l).matches(l)))
            || before.get(rel).is_some_and(|b| as_copy_of(b).matches(b))
            || after.get(rel).is_some_and(|a| as_copy_of(a).matches(a));
        assert!(
            ok,
            "{}: upper file {rel} is neither a complete copy of its lower source {origins:?} \
             nor its before/after state: {e:?}\nlower: {:?}\nafter: {:?}",
            op.name,
            origins.iter().map(|o| lower.get(o)).collect::<Vec<_>>(),
            after.get(rel)
        );
        if sparse.contains(&rel.as_str()) {
            let u = fs::metadata(fx.u(rel)).unwrap();
            let l = fs::metadata(fx.l(0, rel)).unwrap();
            assert!(
                u.blocks() * 512 <= l.blocks() * 512 + 256 * 1024,
                "{}: copy of sparse {rel} lost its holes: {} bytes allocated, lower {}",
                op.name,
                u.blocks() * 512,
                l.blocks() * 512
            );
        }
    }
}

/// Runs `kills` kills of randomly chosen `ops` over the lower built in `fx`.
fn fs_scenario(scenario: &str, fx: &Fixture, ops: &[FsOp], sparse: &[&str], max_delay: Duration) {
    let started = Instant::now();
    let kills = kills_per_scenario();
    let mut rng = Rng::new(scenario);
    let mut tally = Tally::default();
    let can_slow = strace_can_slow();
    // How long each operation takes (plain, slowed): kills are spread over 0..1.3x that.
    let mut took: BTreeMap<(&str, bool), u64> = BTreeMap::new();
    let mut slowed = 0;
    for i in 0..kills {
        let op = &ops[rng.below(ops.len() as u64) as usize];
        *tally.by_op.entry(op.name.to_string()).or_default() += 1;
        clear_dir(&fx.upper);
        clear_dir(&fx.work);

        // 1. the before-state
        let slow = can_slow && rng.below(2) == 0;
        let (guard, tracer) = if slow {
            slowed += 1;
            let (g, c) = mount_rw_slow(fx);
            (g, Some(c))
        } else {
            (mount_rw(fx), None)
        };
        let prep = op.prep;
        through(&fx.mnt, &format!("{}: prep", op.name), prep);
        let before = snapshot_within(&fx.mnt);
        let after = (op.model)(&before, &fx.lowers[0]);
        let pid = the_daemon(&fx.mnt);

        // 2. the kill
        let phase = Arc::new(AtomicU8::new(PH_NOT_STARTED));
        let early = rng.below(5) == 0;
        let est = *took.entry((op.name, slow)).or_insert(if slow {
            50_000
        } else {
            max_delay.as_micros() as u64
        });
        let delay = Duration::from_micros(rng.below(est * 13 / 10 + 1));
        let runner = if early {
            None
        } else {
            let ph = phase.clone();
            let m = fx.mnt.clone();
            let f = op.op;
            let h = std::thread::spawn(move || {
                ph.store(PH_RUNNING, Ordering::SeqCst);
                let t0 = Instant::now();
                let r = f(&m);
                ph.store(PH_DONE, Ordering::SeqCst);
                r.map(|()| t0.elapsed())
            });
            std::thread::sleep(delay);
            Some(h)
        };
        let at_kill = phase.load(Ordering::SeqCst);
        kill(pid, libc::SIGKILL);
        assert!(
            wait_for(Duration::from_secs(10), || !alive(pid)),
            "daemon {pid} survived SIGKILL"
        );
        match at_kill {
            PH_NOT_STARTED => tally.phase_before += 1,
            PH_RUNNING => tally.phase_during += 1,
            _ => tally.phase_after += 1,
        }
        if let Some(h) = runner {
            // The dead connection fails whatever the operation still asks (ENOTCONN).
            let r = with_timeout(60, move || h.join());
            match r {
                Ok(Err(e)) if at_kill == PH_DONE => {
                    panic!("{}: the operation failed before the kill: {e}", op.name)
                }
                Ok(Ok(t)) if at_kill == PH_DONE => {
                    // It finished before the kill: aim the next kills of it closer.
                    took.insert((op.name, slow), (t.as_micros() as u64).max(100));
                }
                _ => {}
            }
        }
        detach_dead_mount(&fx.mnt);
        drop(guard);
        if let Some(mut c) = tracer {
            let _ = with_timeout(30, move || c.wait());
        }
        tally.kills += 1;

        // 3. the raw upper
        check_upper(fx, op, &before, &after, sparse);
        let had_leftovers = !work_leftovers(&fx.work).is_empty();

        // 4. remount: clean workdir, before- or after-state
        let guard = mount_rw(fx);
        let left = work_leftovers(&fx.work);
        assert!(
            left.is_empty(),
            "{}: workdir leftovers after remount: {left:?}",
            op.name
        );
        if had_leftovers {
            tally.leftovers_cleaned += 1;
        }
        let got = snapshot_within(&fx.mnt);
        let d_before = tree_diff(&got, &before);
        let d_after = tree_diff(&got, &after);
        let state = if d_before.is_empty() {
            tally.state_before += 1;
            "before"
        } else if d_after.is_empty() {
            tally.state_after += 1;
            "after"
        } else if op.removal_sequence && between(&got, &before, &after) {
            tally.state_between += 1;
            "between"
        } else {
            panic!(
                "{scenario}/{} kill {i} (delay {delay:?}, early {early}): merged tree is neither \
                 the before- nor the after-state\nvs before:\n  {}\nvs after:\n  {}",
                op.name,
                d_before.join("\n  "),
                d_after.join("\n  ")
            );
        };

        // 5. redo, usable, clean unmount
        if state != "after" {
            let f = op.op;
            let t0 = Instant::now();
            through(&fx.mnt, &format!("{}: redo", op.name), f);
            // The plain daemon's time for it: a base for the plain kills' delays.
            took.insert((op.name, false), (t0.elapsed().as_micros() as u64).max(100));
            let redone = snapshot_within(&fx.mnt);
            let d = tree_diff(&redone, &after);
            assert!(
                d.is_empty(),
                "{}: redone after a kill, the tree is not the after-state:\n  {}",
                op.name,
                d.join("\n  ")
            );
        }
        through(&fx.mnt, "probe write", |m| {
            fs::write(m.join("probe"), b"usable")?;
            assert_eq!(fs::read(m.join("probe"))?, b"usable");
            fs::remove_file(m.join("probe"))
        });
        guard
            .unmount()
            .unwrap_or_else(|e| panic!("{}: unmount after the checks: {e}", op.name));
        assert_eq!(work_leftovers(&fx.work), Vec::<PathBuf>::new());
    }
    *tally.by_op.entry("slowed".into()).or_default() += slowed;
    if !can_slow {
        println!("crash[{scenario}]: strace cannot delay syscalls here: no slowed kills");
    }
    tally.print(scenario, started);
}

fn set_lower_meta(p: &Path, mode: u32, owner: (u32, u32), xattr: Option<(&str, &[u8])>) {
    common::lchown(p, owner.0, owner.1).unwrap();
    if !fs::symlink_metadata(p).unwrap().file_type().is_symlink() {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }
    if let Some((n, v)) = xattr {
        common::set_xattr(p, n, v).unwrap();
    }
    common::set_times(p, T_LOWER, T_LOWER).unwrap();
}

fn big_bytes() -> u64 {
    env_u64("UNIONMOUNT_CRASH_BIG_MIB", 64) * MIB
}

fn append_bang(m: &Path, rel: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().append(true).open(m.join(rel))?;
    f.write_all(b"!")
}

fn model_append(b: &Tree, lower: &Path, rel: &str) -> Tree {
    let mut t = b.clone();
    let e = t.get_mut(rel).unwrap();
    e.kind = Kind::File(sha256_file(&lower.join(rel), b"!").unwrap());
    e.size += 1;
    e.mtime = None;
    t
}

fn model_chmod(b: &Tree, rel: &str, mode: u32) -> Tree {
    let mut t = b.clone();
    t.get_mut(rel).unwrap().mode = mode;
    t
}

#[test]
fn crash_copy_up_of_a_large_file() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(1);
    let big = fx.l(0, "big");
    {
        let mut f = fs::File::create(&big).unwrap();
        let chunk = noise(MIB as usize, 7);
        for i in 0..big_bytes() / MIB {
            let mut c = chunk.clone();
            c[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&c).unwrap();
        }
    }
    set_lower_meta(&big, 0o640, (1001, 1002), Some(("user.crash", b"big")));
    let ops = [
        FsOp {
            name: "append",
            prep: no_prep,
            op: |m| append_bang(m, "big"),
            model: |b, l| model_append(b, l, "big"),
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "chmod",
            prep: no_prep,
            op: |m| fs::set_permissions(m.join("big"), fs::Permissions::from_mode(0o604)),
            model: |b, _| model_chmod(b, "big", 0o604),
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            // With metacopy (on over image layers, or `metacopy=on`) the chmod copies the
            // metadata only, and the append copies the bytes into that same upper inode:
            // most kills land in that copy.
            name: "chmod-then-append",
            prep: |m| fs::set_permissions(m.join("big"), fs::Permissions::from_mode(0o600)),
            op: |m| append_bang(m, "big"),
            model: |b, l| model_append(b, l, "big"),
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "open-rdwr",
            prep: no_prep,
            op: |m| {
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(m.join("big"))
                    .map(drop)
            },
            model: |b, _| b.clone(),
            removal_sequence: false,
            origins: same_origin,
        },
    ];
    // A copy of the large file takes some tens of ms: most kills land inside it.
    let delay = Duration::from_millis(40 + big_bytes() / MIB * 2);
    fs_scenario("copyup-large", &fx, &ops, &[], delay);
}

#[test]
fn crash_copy_up_of_a_sparse_file() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(1);
    let p = fx.l(0, "sparse");
    {
        let f = fs::File::create(&p).unwrap();
        let size = 4 * big_bytes();
        f.set_len(size).unwrap();
        let data = noise(MIB as usize, 11);
        f.write_all_at(&data, 0).unwrap();
        f.write_all_at(&data, size / 2).unwrap();
        f.write_all_at(&data[..65536], size - 65536).unwrap();
    }
    set_lower_meta(&p, 0o644, (0, 0), Some(("user.crash", b"sparse")));
    let md = fs::metadata(&p).unwrap();
    assert!(
        md.blocks() * 512 < 4 * MIB,
        "the lower filesystem did not keep the test file sparse"
    );
    let ops = [
        FsOp {
            name: "append",
            prep: no_prep,
            op: |m| append_bang(m, "sparse"),
            model: |b, l| model_append(b, l, "sparse"),
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "chmod",
            prep: no_prep,
            op: |m| fs::set_permissions(m.join("sparse"), fs::Permissions::from_mode(0o600)),
            model: |b, _| model_chmod(b, "sparse", 0o600),
            removal_sequence: false,
            origins: same_origin,
        },
    ];
    fs_scenario(
        "copyup-sparse",
        &fx,
        &ops,
        &["sparse"],
        Duration::from_millis(30),
    );
}

/// A lower with files, directories, a symlink and a tree, all with fixed metadata.
fn namespace_lower(fx: &Fixture) {
    let l = &fx.lowers[0];
    let a = fx.write(l, "a", &noise(4 * MIB as usize, 3), 0o644);
    set_lower_meta(&a, 0o644, (1001, 1001), Some(("user.crash", b"a")));
    for (rel, body) in [
        ("c", &b"c lower\n"[..]),
        ("f", b"f lower\n"),
        ("g", b"g lower\n"),
        ("n", b"n lower\n"),
        ("d/x", b"x\n"),
        ("w/y", b"y\n"),
        ("m/k", b"k\n"),
    ] {
        let p = fx.write(l, rel, body, 0o640);
        set_lower_meta(&p, 0o640, (1002, 1003), None);
    }
    fx.mkdir(l, "e", 0o755);
    fx.symlink(l, "s", "a");
    for i in 0..4 {
        for j in 0..5 {
            for k in 0..3 {
                let p = fx.write(
                    l,
                    &format!("t/a{i}/b{j}/f{k}"),
                    format!("{i}{j}{k}").as_bytes(),
                    0o600,
                );
                set_lower_meta(&p, 0o600, (0, 0), None);
            }
        }
    }
    for rel in ["d", "w", "m", "e", "t", "s"] {
        set_lower_meta(&fx.l(0, rel), 0o755, (0, 0), None);
    }
}

#[test]
fn crash_renames() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(1);
    namespace_lower(&fx);
    let ops = [
        FsOp {
            name: "file-to-new",
            prep: no_prep,
            op: |m| fs::rename(m.join("a"), m.join("b")),
            model: |b, _| {
                let mut t = b.clone();
                move_subtree(&mut t, "a", "b");
                t
            },
            removal_sequence: false,
            origins: |p| if p == "b" { vec!["a".into()] } else { vec![] },
        },
        FsOp {
            name: "file-over-lower-file",
            prep: no_prep,
            op: |m| fs::rename(m.join("a"), m.join("c")),
            model: |b, _| {
                let mut t = b.clone();
                move_subtree(&mut t, "a", "c");
                t
            },
            removal_sequence: false,
            origins: |p| if p == "c" { vec!["a".into()] } else { vec![] },
        },
        FsOp {
            name: "symlink",
            prep: no_prep,
            op: |m| fs::rename(m.join("s"), m.join("s2")),
            model: |b, _| {
                let mut t = b.clone();
                move_subtree(&mut t, "s", "s2");
                t
            },
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "lower-dir-exdev",
            prep: no_prep,
            op: |m| match fs::rename(m.join("d"), m.join("d2")) {
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Ok(()),
                Err(e) => Err(e),
                Ok(()) => Err(io::Error::other("rename of a lower dir did not give EXDEV")),
            },
            model: |b, _| b.clone(),
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "upper-dir-over-whiteout",
            prep: |m| {
                fs::remove_dir_all(m.join("w"))?;
                fs::DirBuilder::new().mode(0o750).create(m.join("u"))?;
                fs::write(m.join("u/z"), b"z upper\n")
            },
            op: |m| fs::rename(m.join("u"), m.join("w")),
            model: |b, _| {
                let mut t = b.clone();
                move_subtree(&mut t, "u", "w");
                t
            },
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            // The target holds five whiteouts (its merged view is empty): they must go
            // before the rename can replace it, and a crash must never show them half gone.
            name: "upper-dir-over-merged-empty-dir",
            prep: |m| {
                for j in 0..5 {
                    fs::remove_dir_all(m.join(format!("t/a0/b{j}")))?;
                }
                fs::DirBuilder::new().mode(0o750).create(m.join("v"))?;
                fs::write(m.join("v/z"), b"z upper\n")
            },
            op: |m| fs::rename(m.join("v"), m.join("t/a0")),
            model: |b, _| {
                let mut t = b.clone();
                move_subtree(&mut t, "v", "t/a0");
                t
            },
            removal_sequence: false,
            origins: same_origin,
        },
    ];
    fs_scenario("rename", &fx, &ops, &[], Duration::from_millis(25));
}

#[test]
fn crash_deletes() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(1);
    namespace_lower(&fx);
    let ops = [
        FsOp {
            name: "unlink-lower",
            prep: no_prep,
            op: |m| fs::remove_file(m.join("f")),
            model: |b, _| {
                let mut t = b.clone();
                remove_subtree(&mut t, "f");
                t
            },
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "rmdir-lower",
            prep: no_prep,
            op: |m| fs::remove_dir(m.join("e")),
            model: |b, _| {
                let mut t = b.clone();
                remove_subtree(&mut t, "e");
                t
            },
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "unlink-copied-up",
            prep: |m| fs::set_permissions(m.join("g"), fs::Permissions::from_mode(0o600)),
            op: |m| fs::remove_file(m.join("g")),
            model: |b, _| {
                let mut t = b.clone();
                remove_subtree(&mut t, "g");
                t
            },
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "rm-rf-lower-tree",
            prep: no_prep,
            op: |m| fs::remove_dir_all(m.join("t")),
            model: |b, _| {
                let mut t = b.clone();
                remove_subtree(&mut t, "t");
                t
            },
            removal_sequence: true,
            origins: same_origin,
        },
    ];
    fs_scenario("delete", &fx, &ops, &[], Duration::from_millis(40));
}

fn model_new(b: &Tree, rel: &str, e: Ent) -> Tree {
    let mut t = b.clone();
    remove_subtree(&mut t, rel);
    t.insert(rel.to_string(), e);
    t
}

fn new_dir_ent() -> Ent {
    Ent {
        kind: Kind::Dir,
        mode: 0o750,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: None,
        xattrs: BTreeMap::new(),
    }
}

#[test]
fn crash_creation_over_whiteouts() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(1);
    namespace_lower(&fx);
    // The modes asked for (0750, 0640) survive any umask without group-read/other bits.
    let ops = [
        FsOp {
            name: "mkdir-over-dir-whiteout",
            prep: |m| fs::remove_dir_all(m.join("m")),
            op: |m| fs::DirBuilder::new().mode(0o750).create(m.join("m")),
            model: |b, _| model_new(b, "m", new_dir_ent()),
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "mkdir-over-file-whiteout",
            prep: |m| fs::remove_file(m.join("n")),
            op: |m| fs::DirBuilder::new().mode(0o750).create(m.join("n")),
            model: |b, _| model_new(b, "n", new_dir_ent()),
            removal_sequence: false,
            origins: same_origin,
        },
        FsOp {
            name: "create-over-whiteout",
            prep: |m| fs::remove_dir_all(m.join("d")),
            // One syscall (an O_CREAT open): a write after it would be a second operation.
            op: |m| {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o640)
                    .open(m.join("d"))
                    .map(drop)
            },
            model: |b, _| {
                let h = Sha256::new();
                model_new(
                    b,
                    "d",
                    Ent {
                        kind: Kind::File(hex(&h.finalize())),
                        mode: 0o640,
                        uid: 0,
                        gid: 0,
                        size: 0,
                        mtime: None,
                        xattrs: BTreeMap::new(),
                    },
                )
            },
            removal_sequence: false,
            origins: same_origin,
        },
    ];
    fs_scenario(
        "create-over-whiteout",
        &fx,
        &ops,
        &[],
        Duration::from_millis(20),
    );
}

// ---------------------------------------------------------------------------------------
// Store scenarios
// ---------------------------------------------------------------------------------------

/// Scratch directories on the fixtures' filesystem (`UNIONMOUNT_TEST_TMPDIR`, /var/tmp).
fn scratch(tag: &str) -> TempDir {
    let base = std::env::var("UNIONMOUNT_TEST_TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
    TempDir::new_in(&base, tag)
}

fn run_um(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let args: Vec<std::ffi::OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    common::run_prog_within(300, unionmount_bin(), args)
}

#[track_caller]
fn ok(out: &std::process::Output, what: &str) {
    common::assert_success(out, what);
}

fn sha256(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// `dir` as an OCI image layout with one gzip layer, tagged `v1`, in `out`.
fn write_oci_layout(dir: &Path, out: &Path) {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    fn add(tar: &mut tar::Builder<Vec<u8>>, root: &Path, rel: &str) {
        let d = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let mut names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() {
                n
            } else {
                format!("{rel}/{n}")
            };
            let p = root.join(&r);
            tar.append_path_with_name(&p, &r).unwrap();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                add(tar, root, &r);
            }
        }
    }
    add(&mut tar, dir, "");
    let layer_tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer_tar).unwrap();
    let layer = gz.finish().unwrap();
    let arch = unionmount::image::Platform::host().architecture;
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256(&layer_tar))]},
    }))
    .unwrap();
    let desc = |media: &str, b: &[u8]| -> Value {
        json!({"mediaType": media, "digest": format!("sha256:{}", sha256(b)), "size": b.len()})
    };
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
    }))
    .unwrap();
    let mut mdesc = desc("application/vnd.oci.image.manifest.v1+json", &manifest);
    mdesc["annotations"] = json!({"org.opencontainers.image.ref.name": "v1"});
    let blobs = out.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    for b in [&layer, &config, &manifest] {
        fs::write(blobs.join(sha256(b)), b).unwrap();
    }
    fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(
        out.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [mdesc]})).unwrap(),
    )
    .unwrap();
}

/// The store after a kill: `image verify` passes, every blob hashes to its name, and
/// `index.json` parses and names only manifests whose config and layers are all present.
/// Returns the names in `index.json`.
fn check_store(store: &Path, what: &str) -> Vec<String> {
    let out = run_um(&[&"image", &"verify", &"--store", &store]);
    ok(&out, &format!("{what}: image verify"));
    assert!(
        !text(&out.stdout).contains("STRAY") && !text(&out.stdout).contains("BAD"),
        "{what}: image verify: {}",
        text(&out.stdout)
    );
    let blobs = store.join("blobs/sha256");
    let mut present = std::collections::BTreeSet::new();
    for e in fs::read_dir(&blobs).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let got = sha256_file(&e.path(), b"").unwrap();
        assert_eq!(
            got, name,
            "{what}: blob {name} holds other bytes (half-published?)"
        );
        present.insert(name);
    }
    let ix: Value = serde_json::from_slice(&fs::read(store.join("index.json")).unwrap())
        .unwrap_or_else(|e| panic!("{what}: index.json does not parse: {e}"));
    let blob = |d: &str| -> Vec<u8> {
        let h = d
            .strip_prefix("sha256:")
            .unwrap_or_else(|| panic!("{what}: digest {d}"));
        assert!(
            present.contains(h),
            "{what}: index names {d}, which is not in blobs/"
        );
        fs::read(blobs.join(h)).unwrap()
    };
    let mut names = Vec::new();
    for m in ix["manifests"].as_array().expect("manifests array") {
        let man: Value = serde_json::from_slice(&blob(m["digest"].as_str().unwrap())).unwrap();
        blob(man["config"]["digest"].as_str().unwrap());
        for l in man["layers"].as_array().unwrap() {
            blob(l["digest"].as_str().unwrap());
        }
        let name = m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        names.push(name);
    }
    names
}

/// Mounts image `spec` read-only and returns its tree without mtimes.
fn image_tree(spec: &str, store: &Path, mnt: &Path) -> Tree {
    let guard = MountGuard::adopt(mnt);
    ok(
        &run_um(&[&"--image", &spec, &"--store", &store, &mnt]),
        &format!("mount --image {spec}"),
    );
    let t = snapshot_within(mnt);
    guard.unmount().unwrap();
    without_mtimes(t)
}

fn without_mtimes(mut t: Tree) -> Tree {
    for e in t.values_mut() {
        e.mtime = None;
    }
    t
}

fn tmp_entries(store: &Path) -> usize {
    fs::read_dir(store.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs `cmd` and SIGKILLs it after a random delay up to `max`; phase into `tally`.
fn run_and_kill(cmd: &mut Command, rng: &mut Rng, max: Duration, tally: &mut Tally) {
    let early = rng.below(5) == 0;
    let delay = if early {
        Duration::ZERO
    } else {
        Duration::from_micros(rng.below(max.as_micros() as u64 + 1))
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn unionmount");
    std::thread::sleep(delay);
    match child.try_wait().unwrap() {
        Some(st) => {
            assert!(st.success(), "the command failed before the kill: {st}");
            tally.phase_after += 1;
        }
        None => {
            if early {
                tally.phase_before += 1;
            } else {
                tally.phase_during += 1;
            }
            child.kill().unwrap();
        }
    }
    let _ = with_timeout(60, move || child.wait());
    tally.kills += 1;
}

#[test]
fn crash_image_commit() {
    if !mount_allowed() {
        return;
    }
    let started = Instant::now();
    let root = scratch("crash-commit");
    let (content, layout, store, upper, work, mnt) = (
        root.path().join("content"),
        root.path().join("layout"),
        root.path().join("store"),
        root.path().join("upper"),
        root.path().join("work"),
        root.path().join("mnt"),
    );
    for d in [&content, &upper, &work, &mnt] {
        fs::create_dir_all(d).unwrap();
    }
    fs::create_dir_all(content.join("etc")).unwrap();
    fs::create_dir_all(content.join("data/sub")).unwrap();
    fs::write(content.join("etc/hostname"), b"base\n").unwrap();
    fs::write(content.join("etc/keep"), b"keep\n").unwrap();
    fs::write(content.join("data/rm-me"), b"bye\n").unwrap();
    fs::write(content.join("data/sub/deep"), b"deep\n").unwrap();
    write_oci_layout(&content, &layout);
    ok(
        &run_um(&[
            &"image",
            &"import",
            &"--store",
            &store,
            &format!("oci:{}:v1", layout.display()),
            &"--name",
            &"base",
        ]),
        "import base",
    );
    // The container's changes: a payload that takes gzip a while, an edit, deletes
    // (whiteouts), a directory made over a deleted one (opaque).
    {
        let guard = MountGuard::adopt(&mnt);
        ok(
            &run_um(&[
                &"--image", &"base", &"--store", &store, &"--upper", &upper, &"--work", &work, &mnt,
            ]),
            "mount base rw",
        );
        let m = mnt.clone();
        with_timeout(120, move || -> io::Result<()> {
            fs::write(m.join("payload"), noise((big_bytes() / 4) as usize, 5))?;
            fs::write(m.join("etc/hostname"), b"changed\n")?;
            fs::remove_file(m.join("data/rm-me"))?;
            fs::remove_dir_all(m.join("data/sub"))?;
            fs::create_dir(m.join("data/sub"))?;
            fs::write(m.join("data/sub/new"), b"new\n")
        })
        .unwrap();
        guard.unmount().unwrap();
    }
    let expected = {
        let guard = MountGuard::adopt(&mnt);
        ok(
            &run_um(&[
                &"--image", &"base", &"--store", &store, &"--upper", &upper, &"--work", &work, &mnt,
            ]),
            "mount base rw",
        );
        let t = snapshot_within(&mnt);
        guard.unmount().unwrap();
        without_mtimes(t)
    };
    let commit = |name: &str| {
        let mut c = Command::new(unionmount_bin());
        c.args(["image", "commit", "--store"])
            .arg(&store)
            .args(["--from", "base", "--upper"])
            .arg(&upper)
            .args(["--name", name]);
        c
    };
    // An uninterrupted commit: how long one takes, and that it mounts as the tree above.
    let t0 = Instant::now();
    let out = commit("reference").output().unwrap();
    ok(&out, "commit reference");
    let took = t0.elapsed();
    let d = tree_diff(&image_tree("reference", &store, &mnt), &expected);
    assert!(d.is_empty(), "reference commit:\n  {}", d.join("\n  "));

    let mut rng = Rng::new("image-commit");
    let mut tally = Tally::default();
    for i in 0..kills_per_scenario() {
        let name = format!("snap-{i}");
        run_and_kill(&mut commit(&name), &mut rng, took.mul_f64(1.6), &mut tally);
        if tmp_entries(&store) > 0 {
            *tally.by_op.entry("tmp-left".into()).or_default() += 1;
        }
        let names = check_store(&store, &format!("commit kill {i}"));
        if names.contains(&name) {
            tally.state_after += 1;
        } else {
            tally.state_before += 1;
            ok(&commit(&name).output().unwrap(), "commit after a kill");
            check_store(&store, &format!("commit redone after kill {i}"));
        }
        let d = tree_diff(&image_tree(&name, &store, &mnt), &expected);
        assert!(d.is_empty(), "{name} after kill {i}:\n  {}", d.join("\n  "));
    }
    // Whatever the kills left in tmp/ is not part of any image; gc keeps young entries.
    ok(&run_um(&[&"image", &"gc", &"--store", &store]), "gc");
    check_store(&store, "after gc");
    assert_eq!(common::daemon_pids(&mnt), Vec::<i32>::new());
    tally.print("image-commit", started);
}

#[test]
fn crash_image_import() {
    if !mount_allowed() {
        return;
    }
    let started = Instant::now();
    let root = scratch("crash-import");
    let (content, layout, mnt) = (
        root.path().join("content"),
        root.path().join("layout"),
        root.path().join("mnt"),
    );
    fs::create_dir_all(content.join("usr/lib")).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    fs::write(
        content.join("usr/lib/payload"),
        noise((big_bytes() / 4) as usize, 9),
    )
    .unwrap();
    fs::write(content.join("usr/hello"), b"hello\n").unwrap();
    std::os::unix::fs::symlink("lib/payload", content.join("usr/link")).unwrap();
    write_oci_layout(&content, &layout);
    let src = format!("oci:{}:v1", layout.display());
    let import = |store: &Path| {
        let mut c = Command::new(unionmount_bin());
        c.args(["image", "import", "--store"])
            .arg(store)
            .arg(&src)
            .args(["--name", "img"]);
        c
    };
    let reference = root.path().join("reference-store");
    let t0 = Instant::now();
    ok(&import(&reference).output().unwrap(), "reference import");
    let took = t0.elapsed();
    let expected = image_tree("img", &reference, &mnt);
    assert_eq!(
        expected.get("usr/hello").map(|e| e.size),
        Some(6),
        "reference import: {expected:?}"
    );

    let mut rng = Rng::new("image-import");
    let mut tally = Tally::default();
    for i in 0..kills_per_scenario() {
        let store = root.path().join(format!("store-{i}"));
        run_and_kill(&mut import(&store), &mut rng, took.mul_f64(1.6), &mut tally);
        if tmp_entries(&store) > 0 {
            *tally.by_op.entry("tmp-left".into()).or_default() += 1;
        }
        let names = check_store(&store, &format!("import kill {i}"));
        if names.iter().any(|n| n == "img") {
            tally.state_after += 1;
            let d = tree_diff(&image_tree("img", &store, &mnt), &expected);
            assert!(d.is_empty(), "import kill {i}: img:\n  {}", d.join("\n  "));
        } else {
            tally.state_before += 1;
        }
        // Importing again works (over whatever the kill left) and gives the same image.
        ok(&import(&store).output().unwrap(), "import after a kill");
        check_store(&store, &format!("import redone after kill {i}"));
        let d = tree_diff(&image_tree("img", &store, &mnt), &expected);
        assert!(
            d.is_empty(),
            "re-import after kill {i}:\n  {}",
            d.join("\n  ")
        );
        fs::remove_dir_all(&store).unwrap();
    }
    tally.print("image-import", started);
}
