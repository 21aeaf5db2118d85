//! Concurrency stress (issue 5): 8 or more threads race random namespace and data
//! operations in shared (merged) directories for a bounded time, under a watchdog;
//! afterwards kernel overlayfs must read the upper unionmount wrote and show the same tree,
//! and so must unionmount remounted. Two shapes: "shared dirs" (each thread on its own names
//! `t<i>a`..`t<i>d` in the shared directories, while every thread lists them: CI runs this)
//! and "same names" (every thread on the same 24 names, so opens, stats and chmods race
//! renames and unlinks of the very name they resolve, and truncating opens race writes).
//!
//! What counts as a failure:
//! - an errno outside what the operation may legitimately race into (ENOENT, EEXIST,
//!   ENOTEMPTY, EXDEV, ENOTDIR, EISDIR, ELOOP, ENODATA; EPERM only for link of a directory
//!   and a user xattr on a symlink; EINVAL only for a rename, where a racing rename of a
//!   directory can make the source an ancestor of the target's parent), so
//!   EIO, ESTALE, ENOTCONN or EINVAL on valid arguments fail the test;
//! - a name in a listing that the operations never create (a leaked whiteout, `.wh.`
//!   marker or workdir temp name), or a node of a type they never create (a char device is a
//!   leaked whiteout);
//! - wrong bytes in a thread's private file (each thread keeps a model of its own file, and
//!   of an open-but-unlinked one, and reads them back while the others race);
//! - a thread whose progress counter stands still for the stall limit: the watchdog dumps
//!   the daemon's threads (`/proc/PID/task/*/{comm,wchan,stack}`) and the FUSE connection's
//!   `waiting` count, aborts the connection so nothing stays blocked, and fails;
//! - a dead daemon, or a `panic` or `ERROR` line in its log (`UNIONMOUNT_LOG_FILE`);
//! - leftovers in the workdir after unmount, or any difference between the merged tree
//!   seen through unionmount, through kernel overlayfs over the same lowers and upper (fresh
//!   workdir), and through unionmount remounted (names, types, modes, owners, sizes, content
//!   hashes, link targets, xattrs, st_nlink of non-directories; see `common/tree.rs`).
//!
//! The lowers are fixed (three layers with merged dirs, files, symlinks, a hard-link pair,
//! char-device whiteouts and an opaque dir); the operations are seeded per thread, the
//! interleaving is whatever the machine does. Knobs: `UNIONMOUNT_STRESS_SECS` (run time
//! per test, default 12 for shared dirs and 8 for same names, to keep CI short),
//! `UNIONMOUNT_STRESS_THREADS` (default 8), `UNIONMOUNT_STRESS_SEED` (default 1),
//! `UNIONMOUNT_STRESS_STALL_SECS` (watchdog limit, default 20). scripts/stress.sh runs the
//! long version (`UNIONMOUNT_STRESS_MODE=same-names` for these).
//!
//! What the same-names runs found (fixed): with the writeback cache (passthrough=off) the
//! mount showed files shorter than their upper copies, because the kernel zeroed its own
//! size after an open(O_TRUNC) a second time, without a request, after a write of another
//! thread had been flushed (`trunc_open_races_writes_passthrough_off` pins that race down
//! in two threads); and setattr answered ESTALE, or EINVAL for a truncate, while a racing
//! rename or unlink held the name.
mod common;
#[path = "common/tree.rs"]
mod tree;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Driver, Fixture, MountGuard};
use tree::View;

/// Directories the operations work in; never removed or renamed, except `s1/d`, which is
/// also a target (an opaque lower dir that may be emptied, removed and made again).
const DIRS: &[&str] = &["", "s0", "s1", "s2", "s0/n", "s1/d"];
/// The names every thread races on, in every dir of `DIRS`.
const NAMES: &[&str] = &["a", "b", "c", "d"];
/// Names that may appear in a listing besides `NAMES`: the fixed dirs and the threads'
/// private files (`p<i>`, `q<i>`) and open-unlinked scratch files (`u<i>`).
const FIXED: &[&str] = &["s0", "s1", "s2", "n"];
const SYMLINK_TARGETS: &[&str] = &["a", "b", "c", "d", "n", "dangling", "/nonexistent-conc"];
const MODES: &[u32] = &[0o644, 0o600, 0o755, 0o700, 0o4755, 0o2755, 0o640];
/// Options that pin kernel overlayfs to unionmount's defaults (DESIGN 2.6).
const KERNEL_OPTS: &[&str] = &["redirect_dir=off", "index=off", "metacopy=off"];
const MAX_FAILURES: usize = 40;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

use common::SplitMix as Rng;

impl Rng {
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let c = b'a' + self.below(26) as u8;
        let mut v = vec![c; len];
        if len > 0 {
            v[0] = b'A' + self.below(26) as u8;
        }
        v
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

// ---------------------------------------------------------------- the lowers

/// Three lowers (0 = top) whose dirs `s0`, `s1`, `s2`, `s0/n` merge; whiteouts sit only in
/// dirs that merge with the layer below (kernel overlayfs reads them only there).
fn build_lowers(fx: &Fixture) {
    let (top, mid, bot) = (&fx.lowers[0], &fx.lowers[1], &fx.lowers[2]);
    // bottom
    fx.write(bot, "a", b"bottom a", 0o644);
    fx.mkdir(bot, "b", 0o755);
    fx.write(bot, "b/x", b"bottom b/x", 0o644);
    fx.write(bot, "s0/a", b"bottom s0/a", 0o644);
    fx.mkdir(bot, "s0/b", 0o755);
    fx.write(bot, "s0/b/x", b"bottom s0/b/x", 0o600);
    fx.symlink(bot, "s0/c", "a");
    fx.write(bot, "s0/n/a", b"bottom s0/n/a", 0o644);
    fx.mkdir(bot, "s0/n/b", 0o700);
    fx.write(bot, "s1/a", b"bottom s1/a", 0o644);
    fx.write(bot, "s1/b", &[b'z'; 5000], 0o755);
    fx.mkdir(bot, "s1/d", 0o755);
    fx.write(bot, "s1/d/hidden", b"hidden by the opaque dir above", 0o644);
    fx.write(bot, "s2/a", b"bottom s2/a", 0o644);
    fx.write(bot, "s2/c", b"bottom s2/c", 0o4755);
    fx.setxattr(bot, "s2/c", "user.origin", b"bottom");
    // middle
    fx.write(mid, "c", b"middle c", 0o644);
    fx.mkdir(mid, "s0", 0o755);
    fx.whiteout_chardev(mid, "s0/c");
    fx.symlink(mid, "s0/n/c", "../a");
    fx.mkdir(mid, "s1/d", 0o750);
    fx.opaque_xattr(mid, "s1/d");
    fx.write(mid, "s1/d/a", b"middle s1/d/a", 0o644);
    fx.mkdir(mid, "s1/d/b", 0o755);
    fx.write(mid, "s1/c", b"middle s1/c, linked", 0o644);
    fx.hardlink(mid, "s1/c", "s2/d");
    fx.write(mid, "s2/b", b"middle s2/b", 0o600);
    fx.setxattr(mid, "s2/b", "user.k", b"v");
    // top
    fx.symlink(top, "d", "s0");
    fx.write(top, "s0/d", b"top s0/d", 0o644);
    fx.write(top, "s1/a", b"top s1/a shadows the bottom", 0o640);
    fx.mkdir(top, "s2", 0o755);
    fx.whiteout_chardev(top, "s2/a");
    fx.mkdir(top, "s0/n", 0o755);
    fx.whiteout_chardev(top, "s0/n/b");
}

// ---------------------------------------------------------------- operations

#[derive(Debug, Clone)]
enum Op {
    Create {
        p: String,
        mode: u32,
        len: usize,
    },
    Write {
        p: String,
        off: u64,
        len: usize,
    },
    Truncate {
        p: String,
        len: u64,
    },
    Read {
        p: String,
    },
    Unlink {
        p: String,
    },
    Mkdir {
        p: String,
        mode: u32,
    },
    Rmdir {
        p: String,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: &'static str,
        p: String,
    },
    Chmod {
        p: String,
        mode: u32,
    },
    SetXattr {
        p: String,
        name: &'static str,
        len: usize,
    },
    RemoveXattr {
        p: String,
        name: &'static str,
    },
    Readdir {
        dir: String,
    },
    Stat {
        p: String,
    },
    /// Thread-private: write/truncate/read back the thread's own file (checked against a
    /// model), sometimes moving it between two shared dirs.
    Private {
        step: u64,
    },
    /// Thread-private: create, open, unlink, then write and read back through the fd.
    OpenUnlinked {
        len: usize,
    },
}

thread_local! {
    /// In a partitioned run, the worker index whose own names (`t<i>a` ...) this thread
    /// uses; None when every thread races on the same names.
    static OWNER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

fn target(rng: &mut Rng) -> String {
    let name = rng.pick(NAMES);
    match OWNER.with(|o| o.get()) {
        Some(i) => join(rng.pick(DIRS), &format!("t{i}{name}")),
        None => join(rng.pick(DIRS), name),
    }
}

fn gen_op(rng: &mut Rng) -> Op {
    match rng.below(100) {
        0..=9 => Op::Create {
            p: target(rng),
            mode: rng.pick(MODES),
            len: rng.below(3000) as usize,
        },
        10..=17 => Op::Write {
            p: target(rng),
            off: rng.below(9000),
            len: 1 + rng.below(4000) as usize,
        },
        18..=21 => Op::Truncate {
            p: target(rng),
            len: rng.below(7000),
        },
        22..=27 => Op::Read { p: target(rng) },
        28..=35 => Op::Unlink { p: target(rng) },
        36..=41 => Op::Mkdir {
            p: target(rng),
            mode: rng.pick(&[0o755, 0o700, 0o775]),
        },
        42..=46 => Op::Rmdir { p: target(rng) },
        47..=58 => {
            let from = target(rng);
            let mut to = target(rng);
            if to == from {
                to = target(rng);
            }
            let flags = match rng.below(10) {
                0..=5 => 0,
                6 | 7 => libc::RENAME_NOREPLACE,
                _ => libc::RENAME_EXCHANGE,
            };
            Op::Rename { from, to, flags }
        }
        59..=62 => Op::Link {
            from: target(rng),
            to: target(rng),
        },
        63..=66 => Op::Symlink {
            target: rng.pick(SYMLINK_TARGETS),
            p: target(rng),
        },
        67..=71 => Op::Chmod {
            p: target(rng),
            mode: rng.pick(MODES),
        },
        72..=75 => Op::SetXattr {
            p: target(rng),
            name: rng.pick(&["user.k", "user.race", "user.t"]),
            len: rng.below(40) as usize,
        },
        76 | 77 => Op::RemoveXattr {
            p: target(rng),
            name: rng.pick(&["user.k", "user.race"]),
        },
        78..=83 => Op::Readdir {
            dir: rng.pick(DIRS).to_string(),
        },
        84..=89 => Op::Stat { p: target(rng) },
        90..=96 => Op::Private { step: rng.next() },
        _ => Op::OpenUnlinked {
            len: 1 + rng.below(20000) as usize,
        },
    }
}

/// What an operation may legitimately race into (see the module doc).
fn expected_errno(op: &Op, e: i32) -> bool {
    const COMMON: &[i32] = &[
        libc::ENOENT,
        libc::EEXIST,
        libc::ENOTEMPTY,
        libc::EXDEV,
        libc::ENOTDIR,
        libc::EISDIR,
        libc::ELOOP,
        libc::ENODATA,
    ];
    if matches!(op, Op::Private { .. } | Op::OpenUnlinked { .. }) {
        // Thread-private names: nothing else touches them.
        return false;
    }
    if COMMON.contains(&e) {
        return true;
    }
    match op {
        Op::Link { .. } | Op::SetXattr { .. } | Op::RemoveXattr { .. } => e == libc::EPERM,
        // EINVAL: `from` is (or, after a racing directory rename, has become) an ancestor
        // of `to`; the kernel's rename checks the dentries it resolved, as on any fs.
        Op::Rename { .. } => e == libc::EINVAL,
        _ => false,
    }
}

/// Per-thread state for the private operations.
struct Private {
    idx: usize,
    /// Where the private file lives now (`s0/p<i>` or `s1/q<i>`) and its expected bytes;
    /// None until created.
    file: Option<(String, Vec<u8>)>,
}

fn nofollow(write: bool) -> fs::OpenOptions {
    let mut o = fs::OpenOptions::new();
    o.read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    o
}

/// Runs `op`; Ok(note) or the io error. A broken invariant is an `Err` of kind `Other`
/// with the explanation (no errno).
fn apply(mnt: &Path, op: &Op, rng: &mut Rng, me: &mut Private) -> io::Result<()> {
    let m = |p: &str| mnt.join(p);
    match op {
        Op::Create { p, mode, len } => {
            let f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(*mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(m(p))?;
            f.write_all_at(&rng.bytes(*len), 0)?;
            if rng.below(4) == 0 {
                f.sync_all()?;
            }
        }
        Op::Write { p, off, len } => {
            let f = nofollow(true).open(m(p))?;
            f.write_all_at(&rng.bytes(*len), *off)?;
        }
        Op::Truncate { p, len } => {
            if rng.below(2) == 0 {
                nofollow(true).open(m(p))?.set_len(*len)?;
            } else {
                // truncate(2) by path (follows a symlink: targets stay inside the mount).
                fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(m(p))?
                    .set_len(*len)?;
            }
        }
        Op::Read { p } => {
            let mut f = nofollow(false).open(m(p))?;
            let md = f.metadata()?;
            if md.is_file() {
                let mut v = Vec::new();
                f.read_to_end(&mut v)?;
            }
        }
        Op::Unlink { p } => fs::remove_file(m(p))?,
        Op::Mkdir { p, mode } => fs::DirBuilder::new().mode(*mode).create(m(p))?,
        Op::Rmdir { p } => fs::remove_dir(m(p))?,
        Op::Rename { from, to, flags } => common::renameat2(&m(from), &m(to), *flags)?,
        Op::Link { from, to } => fs::hard_link(m(from), m(to))?,
        Op::Symlink { target, p } => std::os::unix::fs::symlink(target, m(p))?,
        Op::Chmod { p, mode } => fs::set_permissions(m(p), fs::Permissions::from_mode(*mode))?,
        Op::SetXattr { p, name, len } => common::set_xattr(&m(p), name, &rng.bytes(*len))?,
        Op::RemoveXattr { p, name } => common::remove_xattr(&m(p), name)?,
        Op::Readdir { dir } => {
            for e in fs::read_dir(m(dir))? {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                if !listed_name_ok(&name) {
                    return Err(io::Error::other(format!(
                        "readdir of '{dir}' lists '{name}', which no operation creates"
                    )));
                }
            }
        }
        Op::Stat { p } => {
            let md = fs::symlink_metadata(m(p))?;
            let ft = md.file_type();
            if !(ft.is_dir() || ft.is_file() || ft.is_symlink()) {
                return Err(io::Error::other(format!(
                    "'{p}' is a {ft:?} (mode {:o}), which no operation creates",
                    std::os::unix::fs::MetadataExt::mode(&md)
                )));
            }
        }
        Op::Private { step } => private_step(mnt, *step, rng, me)?,
        Op::OpenUnlinked { len } => open_unlinked(mnt, *len, rng, me.idx)?,
    }
    Ok(())
}

fn listed_name_ok(name: &str) -> bool {
    if NAMES.contains(&name) || FIXED.contains(&name) {
        return true;
    }
    if let Some(rest) = name.strip_prefix('t')
        && let Some(last) = rest.chars().last()
        && NAMES.contains(&last.to_string().as_str())
    {
        let idx = &rest[..rest.len() - 1];
        return !idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit());
    }
    let rest = name.strip_prefix(['p', 'q', 'u']).unwrap_or("");
    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
}

fn mismatch(what: &str, path: &str, want: &[u8], got: &[u8]) -> io::Error {
    let first = want.iter().zip(got).position(|(a, b)| a != b);
    io::Error::other(format!(
        "{what} '{path}': read {} bytes, expected {} (first difference at {first:?})",
        got.len(),
        want.len()
    ))
}

/// One step on the thread's private file: create it, or write/truncate it and read it
/// back in full, or move it to the other shared dir.
fn private_step(mnt: &Path, step: u64, rng: &mut Rng, me: &mut Private) -> io::Result<()> {
    let i = me.idx;
    let Some((path, model)) = me.file.as_mut() else {
        let path = format!("s0/p{i}");
        let n = 1 + rng.below(3000) as usize;
        let data = rng.bytes(n);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(mnt.join(&path))?
            .write_all_at(&data, 0)?;
        me.file = Some((path, data));
        return Ok(());
    };
    match step % 4 {
        0 => {
            let off = rng.below(model.len() as u64 + 2000) as usize;
            let n = 1 + rng.below(5000) as usize;
            let data = rng.bytes(n);
            nofollow(true)
                .open(mnt.join(&*path))?
                .write_all_at(&data, off as u64)?;
            if model.len() < off + data.len() {
                model.resize(off + data.len(), 0);
            }
            model[off..off + data.len()].copy_from_slice(&data);
        }
        1 => {
            let len = rng.below(model.len() as u64 + 3000) as usize;
            nofollow(true).open(mnt.join(&*path))?.set_len(len as u64)?;
            model.resize(len, 0);
        }
        2 => {
            let to = if path.starts_with("s0/") {
                format!("s1/q{i}")
            } else {
                format!("s0/p{i}")
            };
            common::renameat2(&mnt.join(&*path), &mnt.join(&to), libc::RENAME_NOREPLACE)?;
            *path = to;
        }
        _ => {}
    }
    let got = fs::read(mnt.join(&*path))?;
    if got != *model {
        return Err(mismatch("private file", path, model, &got));
    }
    Ok(())
}

/// Create `s2/u<i>`, keep it open, unlink it, then write and read back through the fd.
fn open_unlinked(mnt: &Path, len: usize, rng: &mut Rng, i: usize) -> io::Result<()> {
    let rel = format!("s2/u{i}");
    let p = mnt.join(&rel);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)?;
    let first = rng.bytes(len);
    f.write_all_at(&first, 0)?;
    fs::remove_file(&p)?;
    let second = rng.bytes(len / 2 + 1);
    f.write_all_at(&second, len as u64 / 3)?;
    let mut want = first;
    let end = len / 3 + second.len();
    if want.len() < end {
        want.resize(end, 0);
    }
    want[len / 3..end].copy_from_slice(&second);
    let mut got = vec![0u8; want.len() + 10];
    let mut n = 0;
    while n < got.len() {
        let r = f.read_at(&mut got[n..], n as u64)?;
        if r == 0 {
            break;
        }
        n += r;
    }
    got.truncate(n);
    if got != want {
        return Err(mismatch("open-unlinked file", &rel, &want, &got));
    }
    match fs::symlink_metadata(&p) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => Err(io::Error::other(format!(
            "'{rel}' still visible after unlink: {other:?}"
        ))),
    }
}

// ---------------------------------------------------------------- the run

#[derive(Default)]
struct Counts {
    ok: u64,
    expected: BTreeMap<i32, u64>,
}

struct Shared {
    mnt: PathBuf,
    deadline: Instant,
    stop: AtomicBool,
    progress: Vec<AtomicU64>,
    /// The op each thread is in (for the hang report).
    current: Vec<Mutex<String>>,
    finished: AtomicUsize,
    failures: Mutex<Vec<String>>,
    counts: Mutex<Counts>,
}

impl Shared {
    fn fail(&self, msg: String) {
        let mut f = self.failures.lock().unwrap();
        if f.len() < MAX_FAILURES {
            f.push(msg);
        }
    }
}

fn worker(sh: Arc<Shared>, idx: usize, seed: u64, partitioned: bool) {
    OWNER.with(|o| o.set(partitioned.then_some(idx)));
    let mut rng = Rng::new(seed.wrapping_mul(1000).wrapping_add(idx as u64));
    let mut me = Private { idx, file: None };
    let mut counts = Counts::default();
    while Instant::now() < sh.deadline && !sh.stop.load(Ordering::Relaxed) {
        let op = gen_op(&mut rng);
        *sh.current[idx].lock().unwrap() = format!("{op:?}");
        match apply(&sh.mnt, &op, &mut rng, &mut me) {
            Ok(()) => counts.ok += 1,
            Err(e) => match e.raw_os_error() {
                Some(n) if expected_errno(&op, n) => *counts.expected.entry(n).or_default() += 1,
                Some(n) => sh.fail(format!(
                    "thread {idx}: {op:?}: unexpected {} ({e})",
                    errno_name(n)
                )),
                None => sh.fail(format!("thread {idx}: {op:?}: {e}")),
            },
        }
        sh.progress[idx].fetch_add(1, Ordering::Relaxed);
    }
    *sh.current[idx].lock().unwrap() = "done".into();
    let mut c = sh.counts.lock().unwrap();
    c.ok += counts.ok;
    for (k, v) in counts.expected {
        *c.expected.entry(k).or_default() += v;
    }
    drop(c);
    sh.finished.fetch_add(1, Ordering::SeqCst);
}

fn errno_name(e: i32) -> &'static str {
    match e {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EPERM => "EPERM",
        libc::EINVAL => "EINVAL",
        libc::EIO => "EIO",
        libc::ESTALE => "ESTALE",
        libc::ENOTCONN => "ENOTCONN",
        libc::EBUSY => "EBUSY",
        libc::ENOSPC => "ENOSPC",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => "errno",
    }
}

fn read_or(p: &Path) -> String {
    match fs::read_to_string(p) {
        Ok(s) => s.trim_end().to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// What the watchdog prints when a thread stands still: the stuck ops, the daemon's
/// threads with their kernel wait channel and stack, our own threads' stacks, and the FUSE
/// connection's count of requests waiting for the daemon.
fn hang_report(sh: &Shared, stuck: &[usize], daemons: &[i32], conn: Option<&Path>) -> String {
    let mut out = String::new();
    for &i in stuck {
        out += &format!(
            "thread {i} stuck in: {}\n",
            sh.current[i].lock().map(|s| s.clone()).unwrap_or_default()
        );
    }
    if let Some(c) = conn {
        out += &format!(
            "{}/waiting = {}\n",
            c.display(),
            read_or(&c.join("waiting"))
        );
    }
    let mut pids: Vec<(String, i32)> = daemons.iter().map(|&p| ("daemon".into(), p)).collect();
    pids.push(("test".into(), std::process::id() as i32));
    for (who, pid) in pids {
        let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else {
            out += &format!("{who} {pid}: no /proc entry (dead?)\n");
            continue;
        };
        for t in rd.flatten() {
            let d = t.path();
            out += &format!(
                "{who} {pid} task {} '{}' wchan={}\n",
                t.file_name().to_string_lossy(),
                read_or(&d.join("comm")),
                read_or(&d.join("wchan"))
            );
            for l in read_or(&d.join("stack")).lines() {
                out += &format!("    {l}\n");
            }
        }
    }
    out
}

struct Outcome {
    ops: u64,
    counts: Counts,
}

/// Runs the workers against `mnt` under the watchdog. Err(report) on a hang (after
/// aborting the FUSE connection) or on failed operations.
fn run_workers(
    guard: &MountGuard,
    threads: usize,
    secs: u64,
    seed: u64,
    partitioned: bool,
) -> Result<Outcome, String> {
    let stall = Duration::from_secs(knob("UNIONMOUNT_STRESS_STALL_SECS", 20));
    let daemons = common::daemon_pids(&guard.mnt);
    let sh = Arc::new(Shared {
        mnt: guard.mnt.clone(),
        deadline: Instant::now() + Duration::from_secs(secs),
        stop: AtomicBool::new(false),
        progress: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        current: (0..threads).map(|_| Mutex::new(String::new())).collect(),
        finished: AtomicUsize::new(0),
        failures: Mutex::new(Vec::new()),
        counts: Mutex::new(Counts::default()),
    });
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let sh = sh.clone();
            std::thread::Builder::new()
                .name(format!("stress-{i}"))
                .spawn(move || worker(sh, i, seed, partitioned))
                .expect("spawn worker")
        })
        .collect();
    // The watchdog: every thread must finish an op at least every `stall`.
    let mut last: Vec<(u64, Instant)> = vec![(0, Instant::now()); threads];
    let mut hang = None;
    while sh.finished.load(Ordering::SeqCst) < threads {
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        let mut stuck = Vec::new();
        for (i, l) in last.iter_mut().enumerate() {
            let v = sh.progress[i].load(Ordering::Relaxed);
            if v != l.0 {
                *l = (v, now);
            } else if now - l.1 > stall && !handles[i].is_finished() {
                stuck.push(i);
            }
        }
        if !stuck.is_empty() {
            hang = Some(hang_report(&sh, &stuck, &daemons, guard.fuse_conn()));
            break;
        }
    }
    if let Some(report) = hang {
        sh.stop.store(true, Ordering::SeqCst);
        // Abort the connection: every blocked request ends with ENOTCONN, so the workers
        // return and the guard can unmount.
        if let Some(c) = guard.fuse_conn() {
            let _ = fs::write(c.join("abort"), b"1");
        }
        common::wait_for(Duration::from_secs(10), || {
            sh.finished.load(Ordering::SeqCst) == threads
        });
        return Err(format!(
            "watchdog: a thread made no progress for {stall:?}\n{report}"
        ));
    }
    for h in handles {
        h.join().expect("worker panicked");
    }
    let failures = std::mem::take(&mut *sh.failures.lock().unwrap());
    if !failures.is_empty() {
        return Err(format!(
            "{} operation failure(s) (first {MAX_FAILURES} shown):\n{}",
            failures.len(),
            failures.join("\n")
        ));
    }
    let counts = std::mem::take(&mut *sh.counts.lock().unwrap());
    let ops = sh.progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();
    Ok(Outcome { ops, counts })
}

/// Problems the daemon's log shows: panics and ERROR lines.
fn log_problems(log: &Path) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("panic") || l.contains(" ERROR "))
        .map(str::to_string)
        .collect()
}

fn snapshot_within(root: &Path) -> tree::Snapshot {
    let r = root.to_path_buf();
    match common::with_timeout(120, move || tree::snapshot(&r, View::Merged)) {
        Ok(s) => s,
        Err(e) => {
            // Does it last? (A walk after the workers stopped races with nothing.)
            std::thread::sleep(Duration::from_secs(1));
            let r = root.to_path_buf();
            let again = common::with_timeout(120, move || tree::snapshot(&r, View::Merged));
            panic!(
                "walk {}: {e} (walked again 1 s later: {})",
                root.display(),
                match again {
                    Ok(_) => "fine".to_string(),
                    Err(e2) => e2.to_string(),
                }
            )
        }
    }
}

fn stress(label: &str, extra: &[&str], partitioned: bool, default_secs: u64) {
    if !common::mount_allowed() {
        return;
    }
    if common::driver() != Driver::Unionmount {
        eprintln!("SKIP: {label}: the stress test drives unionmount (the kernel is its oracle)");
        return;
    }
    let threads = knob("UNIONMOUNT_STRESS_THREADS", 8) as usize;
    let secs = knob("UNIONMOUNT_STRESS_SECS", default_secs);
    let seed = knob("UNIONMOUNT_STRESS_SEED", 1);
    let fx = Fixture::new(3);
    build_lowers(&fx);
    let log = fx.dir.join("daemon.log");
    let log_s = log.to_str().unwrap().to_string();
    let t0 = Instant::now();
    let guard = common::mount_paths_env(
        &Driver::Unionmount,
        &fx.lowers,
        Some(&fx.upper),
        Some(&fx.work),
        &fx.mnt,
        extra,
        &[("UNIONMOUNT_LOG_FILE", &log_s)],
    )
    .expect("mount unionmount");
    let daemons = common::daemon_pids(&fx.mnt);
    assert!(
        !daemons.is_empty(),
        "no unionmount daemon serves {}",
        fx.mnt.display()
    );
    let before = snapshot_within(&fx.mnt);

    let outcome = run_workers(&guard, threads, secs, seed, partitioned);
    let dead: Vec<i32> = daemons
        .iter()
        .copied()
        .filter(|&p| !common::alive(p))
        .collect();
    let problems = log_problems(&log);
    let outcome = match outcome {
        Ok(o) => o,
        Err(report) => panic!(
            "{label} (seed {seed}): {report}\ndead daemons: {dead:?}\ndaemon log problems:\n{}",
            problems.join("\n")
        ),
    };
    assert!(
        dead.is_empty(),
        "{label}: the daemon died during the run: {dead:?}"
    );
    assert!(
        problems.is_empty(),
        "{label}: the daemon logged problems:\n{}",
        problems.join("\n")
    );

    // The merged tree through unionmount, then through kernel overlayfs over the same
    // upper (fresh workdir), then through unionmount remounted.
    let seen = snapshot_within(&fx.mnt);
    guard.unmount().expect("unmount unionmount");
    let leftovers = common::work_leftovers(&fx.work);
    assert!(
        leftovers.is_empty(),
        "{label}: workdir leftovers after unmount: {leftovers:?}"
    );

    let (work2, mnt2) = (fx.dir.join("work2"), fx.dir.join("mnt2"));
    fs::create_dir(&work2).unwrap();
    fs::create_dir(&mnt2).unwrap();
    let kguard = common::mount_paths(
        &Driver::Kernel,
        &fx.lowers,
        Some(&fx.upper),
        Some(&work2),
        &mnt2,
        KERNEL_OPTS,
    )
    .expect("kernel overlayfs mounts the upper unionmount wrote");
    let kernel = snapshot_within(&mnt2);
    kguard.unmount().expect("unmount kernel overlayfs");
    let d = tree::diff(&seen, &kernel, "unionmount", "kernel", (0, 0));
    assert!(
        d.is_empty(),
        "{label} (seed {seed}): kernel overlayfs over unionmount's upper differs:\n{}",
        d.join("\n")
    );

    let guard = common::mount_paths_env(
        &Driver::Unionmount,
        &fx.lowers,
        Some(&fx.upper),
        Some(&fx.work),
        &fx.mnt,
        extra,
        &[("UNIONMOUNT_LOG_FILE", &log_s)],
    )
    .expect("remount unionmount");
    let again = snapshot_within(&fx.mnt);
    guard.unmount().expect("unmount the remount");
    let d = tree::diff(&seen, &again, "unionmount", "remounted", (0, 0));
    assert!(
        d.is_empty(),
        "{label} (seed {seed}): unionmount remounted differs:\n{}",
        d.join("\n")
    );
    let problems = log_problems(&log);
    assert!(
        problems.is_empty(),
        "{label}: daemon log:\n{}",
        problems.join("\n")
    );

    let changed = tree::diff(&before, &seen, "before", "after", (0, 0)).len();
    let expected: Vec<String> = outcome
        .counts
        .expected
        .iter()
        .map(|(e, n)| format!("{} {n}", errno_name(*e)))
        .collect();
    eprintln!(
        "concurrency[{label}]: seed {seed}, {threads} threads, {secs} s of ops, {} ops \
         ({} ok; expected errors: {}), {} entries after ({} changed), trees agree \
         (unionmount, kernel overlayfs, remount), {:.1} s total",
        outcome.ops,
        outcome.counts.ok,
        expected.join(", "),
        seen.entries.len(),
        changed,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        outcome.counts.ok > 0 && changed > 0,
        "{label}: nothing happened (ops {}, changed {changed})",
        outcome.ops
    );
}

/// 8 threads in the same directories, each on its own names: create, write, rename
/// (within and across the shared directories), link, unlink, mkdir/rmdir, xattrs, while
/// others list those directories (CI runs this; passthrough on where the kernel allows).
#[test]
fn stress_shared_dirs_default_options() {
    stress("shared dirs, default", &[], true, 12);
}

/// The same without passthrough: data goes through the daemon and the writeback cache.
#[test]
fn stress_shared_dirs_passthrough_off() {
    stress(
        "shared dirs, passthrough=off",
        &["passthrough=off"],
        true,
        12,
    );
}

/// Every thread on the SAME 24 names: opens, stats and chmods race renames and unlinks of
/// the very name they resolve (8 s in CI; scripts/stress.sh for longer runs).
#[test]
fn stress_same_names_default_options() {
    stress("same names, default", &[], false, 8);
}

/// The same-names race without passthrough: data through the daemon and the writeback
/// cache, whose sizes the kernel trusts over ours.
#[test]
fn stress_same_names_passthrough_off() {
    stress(
        "same names, passthrough=off",
        &["passthrough=off"],
        false,
        8,
    );
}

/// open(O_TRUNC) racing another thread's write to the same file, through the writeback
/// cache (passthrough=off), in lockstep: after each pair the size the mount shows is the
/// upper file's, and so are the bytes at the end. (With atomic_o_trunc, the kernel zeroed
/// its size a second time after the open without a request, so a write flushed in between
/// stayed in the upper file while the mount said the file ended before it.)
#[test]
fn trunc_open_races_writes_passthrough_off() {
    if !common::mount_allowed() {
        return;
    }
    if common::driver() != Driver::Unionmount {
        eprintln!("SKIP: trunc_open_races_writes: the writeback cache is unionmount's");
        return;
    }
    const PAIRS: usize = 3000;
    let fx = Fixture::new(1);
    let guard = common::mount_paths(
        &Driver::Unionmount,
        &fx.lowers,
        Some(&fx.upper),
        Some(&fx.work),
        &fx.mnt,
        &["passthrough=off"],
    )
    .expect("mount unionmount");
    let (mnt, upper) = (fx.mnt.join("f"), fx.upper.join("f"));
    let result = common::with_timeout(120, move || {
        let sync = Arc::new(std::sync::Barrier::new(2));
        let (m, b) = (mnt.clone(), sync.clone());
        let writer = std::thread::spawn(move || -> io::Result<()> {
            for _ in 0..PAIRS {
                b.wait();
                match fs::OpenOptions::new().write(true).open(&m) {
                    Ok(f) => f.write_all_at(&[b'B'; 3904], 5000)?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                b.wait();
                b.wait();
            }
            Ok(())
        });
        let mut bad = None;
        for i in 0..PAIRS {
            sync.wait();
            let f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&mnt)
                .expect("open(O_TRUNC)");
            f.write_all_at(&[b'A'; 2563], 0).expect("write at 0");
            drop(f);
            sync.wait();
            let seen = fs::metadata(&mnt).expect("stat through the mount").len();
            let real = fs::metadata(&upper).expect("stat the upper file").len();
            if seen != real && bad.is_none() {
                bad = Some(format!(
                    "pair {i}: the mount says {seen} bytes, the upper file holds {real}"
                ));
            }
            sync.wait();
        }
        writer.join().unwrap().expect("open and write at 5000");
        let same = fs::read(&mnt).expect("read through the mount")
            == fs::read(&upper).expect("read the upper file");
        (bad, same)
    });
    guard.unmount().expect("unmount unionmount");
    let (bad, same) = result;
    assert_eq!(bad, None);
    assert!(
        same,
        "the bytes read through the mount differ from the upper file's"
    );
    eprintln!("trunc_open_races_writes: {PAIRS} pairs, mount and upper agree");
}

/// The names a listing may show are exactly what the operations create.
#[test]
fn listed_names() {
    for ok in ["a", "d", "s0", "n", "p0", "q12", "u3", "t0a", "t11d"] {
        assert!(listed_name_ok(ok), "{ok}");
    }
    for bad in [
        ".wh.a",
        "#1",
        "p",
        "px",
        "e",
        ".wh..wh..opq",
        "work",
        "t",
        "ta",
        "t1",
        "t1e",
    ] {
        assert!(!listed_name_ok(bad), "{bad}");
    }
}
