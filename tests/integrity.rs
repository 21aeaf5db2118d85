//! Data-integrity exerciser (issue 5): seeded random reads, writes, truncates, fallocates,
//! shared mmaps, copy_file_range, O_TRUNC opens, O_APPEND writes, reopens and closes on
//! files that start in a lower directory layer, in a blob-backed image layer (a gzip
//! docker-archive built here) and in the upper, several fds per file at once, checked
//! against an in-memory model of every file after every step.
//!
//! What is checked, and when:
//! - after every step, the touched file's size (fstat through one of its fds, or stat of
//!   its path) and the bytes of the affected range (pread through another readable fd, or
//!   a fresh open); reads, mappings and reopened fds are compared as they are made;
//! - every `WHOLE_EVERY` steps one whole file, every `ALL_EVERY` steps every file through a
//!   fresh open of its path;
//! - right after a lower file is copied up: its upper copy has its size and keeps its
//!   holes (allocates at most what kernel overlayfs allocates);
//! - fallocate: each mode succeeds or fails exactly as on kernel overlayfs over the same
//!   filesystem (probed once per run; the upper filesystem's own answer when overlayfs is
//!   not available); copy_file_range within one file over overlapping ranges is EINVAL;
//!   whatever SEEK_DATA/SEEK_HOLE call a hole reads as zeros;
//! - at the end of the first mount every file, and after unmount and remount every file
//!   again (persistence); the last tenth of the steps then run on that second mount;
//! - after it, the upper holds exactly the files that started there plus those opened for
//!   writing or truncated (a file only ever read stays in its lower layer), with the
//!   model's bytes; the lower directory layers are untouched; nothing is left in the
//!   workdir.
//!
//! The first half of the steps runs on two threads at once, each with its own half of the
//! files (so sibling copy-ups race and the daemon interleaves requests for two files).
//! An fd opened read-only before its file was copied up keeps being read, but is not
//! mapped afterwards: a new MAP_SHARED mapping of it may show the lower file, as overlayfs
//! documents and does.
//!
//! Knobs: `UNIONMOUNT_INTEGRITY_OPS` (total over the four tests, default 100 000) and
//! `UNIONMOUNT_INTEGRITY_SEED` (decimal or 0x-hex; default: from the clock). Every test
//! prints its seed, and a failure names the seed, the step and the last operations, so
//! `UNIONMOUNT_INTEGRITY_SEED=<seed> cargo test --test integrity <test>` replays it.
//! Each test runs the default data path (FUSE passthrough where the kernel grants it) or
//! `passthrough=off` (the daemon serves the data, with the writeback cache).
//!
//! Invariants of this file: every mount is held by a `MountGuard` (unmounted on every
//! path), every access through a mount runs under a watchdog, and a mapping never reaches
//! past the size the model (already checked against the file) gives.

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{
    Driver, Fixture, Mapping, MountGuard, assert_success, assert_work_clean, is_mounted,
    mount_allowed, unionmount_bin, with_timeout,
};
use unionmount::image::Platform;
use unionmount::image::blob::sha256_of;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const PAGE: usize = 4096;
/// No file grows past this (keeps the model and the whole-file checks cheap).
const MAX_SIZE: usize = 4 * MIB;
/// Open fds kept per file at most.
const MAX_FDS: usize = 4;
const WHOLE_EVERY: usize = 293;
const ALL_EVERY: usize = 4999;
/// The four tests share `UNIONMOUNT_INTEGRITY_OPS`.
const TESTS: usize = 4;

// ---------------------------------------------------------------------------------------
// Knobs and the PRNG
// ---------------------------------------------------------------------------------------

fn base_seed() -> u64 {
    match std::env::var("UNIONMOUNT_INTEGRITY_SEED") {
        Ok(s) => {
            let s = s.trim();
            let v = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            v.unwrap_or_else(|e| panic!("UNIONMOUNT_INTEGRITY_SEED={s:?}: {e}"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
        }
    }
}

fn ops_per_test() -> usize {
    let total: usize = match std::env::var("UNIONMOUNT_INTEGRITY_OPS") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("UNIONMOUNT_INTEGRITY_OPS={s:?}: {e}")),
        Err(_) => 100_000,
    };
    total.div_ceil(TESTS)
}

/// xorshift64* (seeded; the same seed gives the same operation sequence).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut r = Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1);
        for _ in 0..4 {
            r.next();
        }
        r
    }
    fn next(&mut self) -> u64 {
        common::xorshift64star(&mut self.0)
    }
    /// Uniform in 0..n (0 when n is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    /// Uniform in lo..=hi.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
    /// An offset in a file of `size` bytes: mostly inside, often near the end or on a
    /// page boundary, sometimes past the end (a hole when written).
    fn offset(&mut self, size: usize) -> usize {
        let o = match self.below(10) {
            0..=5 => self.below(size + 1),
            6 | 7 => (size + self.below(16 * KIB)).saturating_sub(8 * KIB),
            8 => self.below(size / PAGE + 2) * PAGE,
            _ => size + self.below(256 * KIB),
        };
        o.min(MAX_SIZE)
    }
    /// A length: mostly small, sometimes large, rarely zero.
    fn length(&mut self) -> usize {
        match self.below(100) {
            0 => 0,
            1..=55 => self.between(1, 4 * KIB),
            56..=87 => self.between(1, 64 * KIB),
            88..=97 => self.between(1, 256 * KIB),
            _ => self.between(1, 3 * MIB / 2),
        }
    }
}

/// Deterministic bytes for layer contents.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// A sparse-looking file: zeros with a few islands of noise (first and last bytes too).
fn sparse(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut r = Rng::new(seed);
    for &at in &[0, len / 3 + 123, len - 5000] {
        let n = 4000.min(len - at);
        r.fill(&mut v[at..at + n]);
    }
    v
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Origin {
    Lower,
    Image,
    Upper,
    Created,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Access {
    Ro,
    Rw,
    Append,
}

struct Open {
    file: File,
    access: Access,
    /// A read-only open of a file still in its lower layer. Once the file is copied up,
    /// reads through it see the upper copy, but a new MAP_SHARED mapping of it may still
    /// show the lower file (overlayfs documents this; kernel overlayfs does it), so the
    /// mmap ops do not use such an fd after the copy-up.
    before_copy_up: bool,
}

struct Tracked {
    rel: String,
    origin: Origin,
    /// What the file must hold.
    data: Vec<u8>,
    fds: Vec<Open>,
    /// Only ever read: must never be copied up.
    read_only: bool,
    /// Opened for writing at least once (so it lives in the upper now).
    written: bool,
}

impl Tracked {
    fn new(rel: &str, origin: Origin, data: Vec<u8>) -> Tracked {
        Tracked {
            rel: rel.to_string(),
            origin,
            data,
            fds: Vec::new(),
            read_only: false,
            written: false,
        }
    }
    fn read_only(mut self) -> Tracked {
        self.read_only = true;
        self
    }
    fn in_upper(&self) -> bool {
        matches!(self.origin, Origin::Upper | Origin::Created) || self.written
    }
}

/// fallocate modes tried, with the kernel overlayfs answer for each (Ok or the errno).
const FALLOC_MODES: [(libc::c_int, &str); 5] = [
    (0, "0"),
    (libc::FALLOC_FL_KEEP_SIZE, "KEEP_SIZE"),
    (
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        "PUNCH_HOLE|KEEP_SIZE",
    ),
    (libc::FALLOC_FL_ZERO_RANGE, "ZERO_RANGE"),
    (
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        "ZERO_RANGE|KEEP_SIZE",
    ),
];

#[derive(Default, Debug)]
struct Stats {
    pread: usize,
    pwrite: usize,
    append: usize,
    truncate: usize,
    fallocate: usize,
    fallocate_refused: usize,
    mmap_read: usize,
    mmap_write: usize,
    copy_range: usize,
    copy_overlap: usize,
    copy_short: usize,
    seek: usize,
    open_trunc: usize,
    reopen: usize,
    close: usize,
    whole_checks: usize,
    sparse_copy_ups: usize,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.pread += o.pread;
        self.pwrite += o.pwrite;
        self.append += o.append;
        self.truncate += o.truncate;
        self.fallocate += o.fallocate;
        self.fallocate_refused += o.fallocate_refused;
        self.mmap_read += o.mmap_read;
        self.mmap_write += o.mmap_write;
        self.copy_range += o.copy_range;
        self.copy_overlap += o.copy_overlap;
        self.copy_short += o.copy_short;
        self.seek += o.seek;
        self.open_trunc += o.open_trunc;
        self.reopen += o.reopen;
        self.close += o.close;
        self.whole_checks += o.whole_checks;
        self.sparse_copy_ups += o.sparse_copy_ups;
    }
}

/// One exerciser run over one mount.
struct Run {
    name: String,
    /// Which thread, while two run at once.
    part: &'static str,
    seed: u64,
    ops: usize,
    rng: Rng,
    mnt: PathBuf,
    /// The upper directory (to check what a copy-up wrote).
    upper: PathBuf,
    files: Vec<Tracked>,
    falloc: Vec<Result<(), i32>>,
    log: VecDeque<String>,
    step: usize,
    stats: Stats,
}

fn read_at_most(f: &File, off: usize, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match f.read_at(&mut buf[done..], (off + done) as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(
            "first difference at +{i}: got {:#04x}, want {:#04x}; got {} bytes, want {}",
            a[i],
            b[i],
            a.len(),
            b.len()
        ),
        None => format!("got {} bytes, want {}", a.len(), b.len()),
    }
}

/// Model of a write of `bytes` at `off` (an empty write changes nothing, not even the size).
fn set_range(data: &mut Vec<u8>, off: usize, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if data.len() < off + bytes.len() {
        data.resize(off + bytes.len(), 0);
    }
    data[off..off + bytes.len()].copy_from_slice(bytes);
}

impl Run {
    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        let log: Vec<&str> = self.log.iter().map(String::as_str).collect();
        panic!(
            "{}{}: step {}: {msg}\nreplay: UNIONMOUNT_INTEGRITY_SEED={:#x} UNIONMOUNT_INTEGRITY_OPS={} \
             cargo test --test integrity {}\nlast operations:\n  {}",
            self.name,
            self.part,
            self.step,
            self.seed,
            self.ops * TESTS,
            self.name,
            log.join("\n  ")
        );
    }

    fn note(&mut self, what: String) {
        if self.log.len() == 24 {
            self.log.pop_front();
        }
        self.log.push_back(format!("#{} {what}", self.step));
    }

    fn path(&self, i: usize) -> PathBuf {
        self.mnt.join(&self.files[i].rel)
    }

    fn access_flags(acc: Access) -> OpenOptions {
        let mut oo = OpenOptions::new();
        match acc {
            Access::Ro => oo.read(true),
            Access::Rw => oo.read(true).write(true),
            Access::Append => oo.append(true),
        };
        oo
    }

    /// Opens `rel` again with `acc` (and O_TRUNC); returns the fd's index.
    fn open(&mut self, i: usize, acc: Access, trunc: bool) -> usize {
        let mut oo = Self::access_flags(acc);
        if trunc {
            // Not OpenOptions::truncate: std refuses it without write access.
            oo.custom_flags(libc::O_TRUNC);
        }
        let p = self.path(i);
        let file = match oo.open(&p) {
            Ok(f) => f,
            Err(e) => self.fail(format!("open {} {acc:?} trunc={trunc}: {e}", p.display())),
        };
        let t = &mut self.files[i];
        let copy_up = !t.in_upper() && (acc != Access::Ro || trunc);
        if trunc {
            t.data.clear();
        }
        if acc != Access::Ro || trunc {
            t.written = true;
        }
        if copy_up && !trunc {
            self.check_copy_up_sparse(i);
        }
        let t = &mut self.files[i];
        let before_copy_up = acc == Access::Ro && !t.in_upper();
        t.fds.push(Open {
            file,
            access: acc,
            before_copy_up,
        });
        t.fds.len() - 1
    }

    /// Right after file `i` was copied up (the model still holds its layer's bytes): the
    /// upper copy has its size and keeps the holes of a lower file (it allocates at most
    /// the 1 MiB chunks that hold data, which is what kernel overlayfs allocates).
    fn check_copy_up_sparse(&mut self, i: usize) {
        let t = &self.files[i];
        let up = self.upper.join(&t.rel);
        let m = match fs::metadata(&up) {
            Ok(m) => m,
            Err(e) => self.fail(format!("copy-up of {}: upper {}: {e}", t.rel, up.display())),
        };
        if m.len() as usize != t.data.len() {
            self.fail(format!(
                "copy-up of {}: upper size {}, want {}",
                t.rel,
                m.len(),
                t.data.len()
            ));
        }
        if t.origin != Origin::Lower {
            return;
        }
        let has_data = |c: &[u8]| c.iter().any(|&b| b != 0);
        let data_pages = t.data.chunks(PAGE).filter(|c| has_data(c)).count();
        let data_chunks = t.data.chunks(MIB).filter(|c| has_data(c)).count();
        // Kernel overlayfs skips holes a 1 MiB chunk at a time.
        let allowed = data_chunks * MIB + data_pages * PAGE;
        let allocated = m.blocks() as usize * 512;
        if allocated > allowed {
            self.fail(format!(
                "copy-up of {} filled holes: {allocated} bytes allocated in the upper for \
                 {data_pages} data pages",
                t.rel
            ));
        }
        self.stats.sparse_copy_ups += 1;
    }

    /// An fd of file `i` with one of `kinds` (opened when there is none, sometimes anyway).
    fn fd(&mut self, i: usize, kinds: &[Access]) -> usize {
        let cands: Vec<usize> = (0..self.files[i].fds.len())
            .filter(|&k| kinds.contains(&self.files[i].fds[k].access))
            .collect();
        if !cands.is_empty() && !self.rng.chance(1, 12) {
            return cands[self.rng.below(cands.len())];
        }
        let acc = kinds[self.rng.below(kinds.len())];
        self.open(i, acc, false)
    }

    /// A readable fd of file `i` that a new mapping may use (see `Open::before_copy_up`).
    fn map_fd(&mut self, i: usize) -> usize {
        let t = &self.files[i];
        let cands: Vec<usize> = (0..t.fds.len())
            .filter(|&k| {
                let o = &t.fds[k];
                o.access != Access::Append && !(o.before_copy_up && t.in_upper())
            })
            .collect();
        if !cands.is_empty() && !self.rng.chance(1, 12) {
            return cands[self.rng.below(cands.len())];
        }
        let acc = if self.files[i].read_only || self.rng.chance(1, 2) {
            Access::Ro
        } else {
            Access::Rw
        };
        self.open(i, acc, false)
    }

    fn readable_kinds(&self, i: usize) -> &'static [Access] {
        if self.files[i].read_only {
            &[Access::Ro]
        } else {
            &[Access::Ro, Access::Rw]
        }
    }

    /// Size and bytes of `[lo, hi)` of file `i` as seen through the mount equal the model.
    fn check_range(&mut self, i: usize, lo: usize, hi: usize, what: &str) {
        let size = self.files[i].data.len();
        // fstat through one of its fds, or stat of the path (a quarter of the time).
        let fstat = match self.files[i].fds.first() {
            Some(o) if !self.rng.chance(1, 4) => o.file.metadata(),
            _ => fs::metadata(self.path(i)),
        };
        match fstat {
            Ok(m) if m.len() as usize == size => {}
            Ok(m) => self.fail(format!(
                "{what}: {} has size {}, the model says {size}",
                self.files[i].rel,
                m.len()
            )),
            Err(e) => self.fail(format!("{what}: stat {}: {e}", self.files[i].rel)),
        }
        let (lo, hi) = (lo.min(size), hi.min(size));
        // One byte past the end when the range reaches it: EOF must be there too.
        let want_len = hi - lo + usize::from(hi == size);
        let readable: Vec<usize> = (0..self.files[i].fds.len())
            .filter(|&k| self.files[i].fds[k].access != Access::Append)
            .collect();
        let got = if !readable.is_empty() && !self.rng.chance(1, 8) {
            let k = readable[self.rng.below(readable.len())];
            read_at_most(&self.files[i].fds[k].file, lo, want_len)
        } else {
            File::open(self.path(i)).and_then(|f| read_at_most(&f, lo, want_len))
        };
        let got = match got {
            Ok(g) => g,
            Err(e) => self.fail(format!("{what}: read {} at {lo}: {e}", self.files[i].rel)),
        };
        if got != self.files[i].data[lo..hi] {
            self.fail(format!(
                "{what}: {} bytes {lo}..{hi} differ from the model: {}",
                self.files[i].rel,
                first_difference(&got, &self.files[i].data[lo..hi])
            ));
        }
    }

    fn check_whole(&mut self, i: usize, what: &str) {
        self.stats.whole_checks += 1;
        self.check_range(i, 0, usize::MAX, what);
    }

    /// Every file, each through a fresh open of its path.
    fn check_all_fresh(&mut self, what: &str) {
        for i in 0..self.files.len() {
            let p = self.path(i);
            let got = match fs::read(&p) {
                Ok(g) => g,
                Err(e) => self.fail(format!("{what}: read {}: {e}", p.display())),
            };
            if got != self.files[i].data {
                self.fail(format!(
                    "{what}: {} differs from the model: {}",
                    self.files[i].rel,
                    first_difference(&got, &self.files[i].data)
                ));
            }
            self.stats.whole_checks += 1;
        }
    }

    fn writable_file(&mut self) -> usize {
        loop {
            let i = self.rng.below(self.files.len());
            if !self.files[i].read_only {
                return i;
            }
        }
    }

    /// Steps `from..to` of this run's sequence.
    fn exercise(&mut self, from: usize, to: usize) {
        for step in from..to {
            self.step = step;
            // Fd indices stay valid within a step; extra fds are closed between steps.
            for t in 0..self.files.len() {
                while self.files[t].fds.len() > MAX_FDS {
                    let k = self.rng.below(self.files[t].fds.len());
                    self.files[t].fds.swap_remove(k);
                }
            }
            let i = self.rng.below(self.files.len());
            let ro = self.files[i].read_only;
            let pick = self.rng.below(100);
            match pick {
                0..=19 => self.op_pread(i),
                20..=37 if !ro => self.op_pwrite(i),
                38..=43 if !ro => self.op_append(i),
                44..=49 if !ro => self.op_truncate(i),
                50..=57 if !ro => self.op_fallocate(i),
                58..=63 => self.op_mmap_read(i),
                64..=70 if !ro => self.op_mmap_write(i),
                71..=82 => self.op_copy_range(i),
                83 if !ro => self.op_open_trunc(i),
                84..=91 => self.op_reopen(i),
                92..=96 => self.op_close(i),
                _ => self.op_seek(i),
            }
            if step % WHOLE_EVERY == WHOLE_EVERY - 1 {
                let j = self.rng.below(self.files.len());
                self.check_whole(j, "periodic whole-file check");
            }
            if step % ALL_EVERY == ALL_EVERY - 1 {
                self.check_all_fresh("periodic check of every file");
            }
        }
    }

    /// Moves every other file into a second run (its own PRNG stream, log and stats) for a
    /// second thread: the two work on disjoint files of one mount at once.
    fn split(&mut self) -> Run {
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for (k, t) in std::mem::take(&mut self.files).into_iter().enumerate() {
            if k % 2 == 0 {
                mine.push(t);
            } else {
                theirs.push(t);
            }
        }
        self.files = mine;
        self.part = " (thread 1 of 2)";
        for files in [&self.files, &theirs] {
            assert!(
                files.iter().any(|t| !t.read_only),
                "each half needs a writable file"
            );
        }
        Run {
            name: self.name.clone(),
            part: " (thread 2 of 2)",
            seed: self.seed,
            ops: self.ops,
            rng: Rng::new(self.rng.next()),
            mnt: self.mnt.clone(),
            upper: self.upper.clone(),
            files: theirs,
            falloc: self.falloc.clone(),
            log: VecDeque::new(),
            step: self.step,
            stats: Stats::default(),
        }
    }

    /// Takes the files (in their first order) and counts of `other` back.
    fn join(&mut self, other: Run) {
        let mine = std::mem::take(&mut self.files);
        let mut a = mine.into_iter();
        let mut b = other.files.into_iter();
        loop {
            match (a.next(), b.next()) {
                (None, None) => break,
                (x, y) => self.files.extend(x.into_iter().chain(y)),
            }
        }
        self.stats.add(&other.stats);
        self.part = "";
    }

    fn op_pread(&mut self, i: usize) {
        self.stats.pread += 1;
        let size = self.files[i].data.len();
        let (off, len) = (self.rng.offset(size), self.rng.length());
        let kinds = self.readable_kinds(i);
        let k = self.fd(i, kinds);
        self.note(format!(
            "pread {} fd{k} off {off} len {len}",
            self.files[i].rel
        ));
        let got = match read_at_most(&self.files[i].fds[k].file, off, len) {
            Ok(g) => g,
            Err(e) => self.fail(format!("pread: {e}")),
        };
        let d = &self.files[i].data;
        let want = &d[off.min(d.len())..(off + len).min(d.len())];
        if got != want {
            self.fail(format!("pread: {}", first_difference(&got, want)));
        }
        self.check_range(i, off, off, "size after pread");
    }

    fn op_pwrite(&mut self, i: usize) {
        self.stats.pwrite += 1;
        let size = self.files[i].data.len();
        let off = self.rng.offset(size);
        let len = self.rng.length().min(MAX_SIZE - off);
        let bytes = self.rng.bytes(len);
        let k = self.fd(i, &[Access::Rw]);
        self.note(format!(
            "pwrite {} fd{k} off {off} len {len}",
            self.files[i].rel
        ));
        if let Err(e) = self.files[i].fds[k].file.write_all_at(&bytes, off as u64) {
            self.fail(format!("pwrite: {e}"));
        }
        set_range(&mut self.files[i].data, off, &bytes);
        self.check_range(i, off.saturating_sub(64), off + len + 64, "after pwrite");
    }

    fn op_append(&mut self, i: usize) {
        self.stats.append += 1;
        let size = self.files[i].data.len();
        let len = self.rng.length().min(64 * KIB).min(MAX_SIZE - size);
        let bytes = self.rng.bytes(len);
        let k = self.fd(i, &[Access::Append]);
        self.note(format!(
            "append {} fd{k} len {len} (at {size})",
            self.files[i].rel
        ));
        if let Err(e) = self.files[i].fds[k].file.write_all(&bytes) {
            self.fail(format!("O_APPEND write: {e}"));
        }
        self.files[i].data.extend_from_slice(&bytes);
        self.check_range(
            i,
            size.saturating_sub(64),
            usize::MAX,
            "after O_APPEND write",
        );
    }

    fn op_truncate(&mut self, i: usize) {
        self.stats.truncate += 1;
        let size = self.files[i].data.len();
        let new = match self.rng.below(10) {
            0..=3 => self.rng.below(size + 1),
            4..=7 => size + self.rng.below(MIB),
            8 => self.rng.below(size / PAGE + 2) * PAGE,
            _ => 0,
        }
        .min(MAX_SIZE);
        if self.rng.chance(1, 4) {
            // truncate(2) by path: a setattr without a file handle (copies up a lower file).
            self.note(format!("truncate {} {size} -> {new}", self.files[i].rel));
            if let Err(e) = common::truncate(&self.path(i), new as u64) {
                self.fail(format!("truncate: {e}"));
            }
            self.files[i].written = true;
        } else {
            let k = self.fd(i, &[Access::Rw]);
            self.note(format!(
                "ftruncate {} fd{k} {size} -> {new}",
                self.files[i].rel
            ));
            if let Err(e) = self.files[i].fds[k].file.set_len(new as u64) {
                self.fail(format!("ftruncate: {e}"));
            }
        }
        self.files[i].data.resize(new, 0);
        let lo = size.min(new).saturating_sub(PAGE);
        self.check_range(i, lo, lo + 2 * PAGE + 64, "after ftruncate");
    }

    fn op_fallocate(&mut self, i: usize) {
        self.stats.fallocate += 1;
        let m = self.rng.below(FALLOC_MODES.len());
        let (mode, mode_name) = FALLOC_MODES[m];
        let size = self.files[i].data.len();
        let off = self.rng.offset(size).min(MAX_SIZE - 1);
        let len = self.rng.length().min(MAX_SIZE - off);
        let k = self.fd(i, &[Access::Rw]);
        self.note(format!(
            "fallocate {} fd{k} mode {mode_name} off {off} len {len}",
            self.files[i].rel
        ));
        let got = common::fallocate(&self.files[i].fds[k].file, mode, off as u64, len as u64);
        // A zero length is EINVAL on every filesystem (checked before the filesystem).
        let want = if len == 0 {
            Err(libc::EINVAL)
        } else {
            self.falloc[m]
        };
        match (got, want) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(w)) if e.raw_os_error() == Some(w) => {
                self.stats.fallocate_refused += 1;
                self.check_range(i, off, off + len, "after a refused fallocate");
                return;
            }
            (got, want) => self.fail(format!(
                "fallocate mode {mode_name} off {off} len {len}: got {got:?}, kernel \
                 overlayfs gives {:?}",
                want.map_err(io::Error::from_raw_os_error)
            )),
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zero = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let d = &mut self.files[i].data;
        let end = if keep {
            (off + len).min(d.len())
        } else {
            off + len
        };
        if !keep && d.len() < end {
            d.resize(end, 0);
        }
        if zero && off < end {
            d[off..end].fill(0);
        }
        self.check_range(i, off.saturating_sub(64), off + len + 64, "after fallocate");
    }

    /// A page-aligned window `[start, start+len)` inside file `i`, or None when empty.
    fn window(&mut self, i: usize) -> Option<(usize, usize)> {
        let size = self.files[i].data.len();
        if size == 0 {
            return None;
        }
        let start = self.rng.below(size) / PAGE * PAGE;
        let len = self.rng.length().clamp(1, size - start);
        Some((start, len))
    }

    fn op_mmap_read(&mut self, i: usize) {
        let Some((start, len)) = self.window(i) else {
            return self.op_pread(i);
        };
        self.stats.mmap_read += 1;
        let k = self.map_fd(i);
        self.note(format!(
            "mmap read {} fd{k} {start}+{len}",
            self.files[i].rel
        ));
        let map = match Mapping::new(&self.files[i].fds[k].file, start as u64, len, false) {
            Ok(m) => m,
            Err(e) => self.fail(format!("mmap (read): {e}")),
        };
        let want = &self.files[i].data[start..start + len];
        if map.bytes() != want {
            self.fail(format!(
                "mmap read: {}",
                first_difference(map.bytes(), want)
            ));
        }
    }

    fn op_mmap_write(&mut self, i: usize) {
        let Some((start, len)) = self.window(i) else {
            return self.op_pwrite(i);
        };
        self.stats.mmap_write += 1;
        let k = self.fd(i, &[Access::Rw]);
        let a = self.rng.below(len);
        let b = self.rng.between(a + 1, len);
        let bytes = self.rng.bytes(b - a);
        self.note(format!(
            "mmap write {} fd{k} map {start}+{len} bytes {}..{}",
            self.files[i].rel,
            start + a,
            start + b
        ));
        let mut map = match Mapping::new(&self.files[i].fds[k].file, start as u64, len, true) {
            Ok(m) => m,
            Err(e) => self.fail(format!("mmap (write): {e}")),
        };
        if map.bytes() != &self.files[i].data[start..start + len] {
            let msg = first_difference(map.bytes(), &self.files[i].data[start..start + len]);
            self.fail(format!("mmap before writing: {msg}"));
        }
        map.bytes_mut()[a..b].copy_from_slice(&bytes);
        if let Err(e) = map.sync() {
            self.fail(format!("msync: {e}"));
        }
        set_range(&mut self.files[i].data, start + a, &bytes);
        // Still mapped: reads through the fds see the stores.
        self.check_range(i, start + a, start + b, "after mmap write + msync (mapped)");
        drop(map);
        self.check_range(i, start, start + len, "after munmap");
    }

    fn op_copy_range(&mut self, src: usize) {
        // Same file a quarter of the time (when it may be written).
        let dst = if !self.files[src].read_only && self.rng.chance(1, 4) {
            src
        } else {
            self.writable_file()
        };
        let (ssize, dsize) = (self.files[src].data.len(), self.files[dst].data.len());
        let src_off = self.rng.offset(ssize);
        let dst_off = self.rng.offset(dsize);
        let len = self.rng.length().min(MAX_SIZE - dst_off);
        let count = len.min(ssize.saturating_sub(src_off));
        let overlap =
            src == dst && count > 0 && dst_off < src_off + count && src_off < dst_off + count;
        let kinds = self.readable_kinds(src);
        let ks = self.fd(src, kinds);
        let kd = self.fd(dst, &[Access::Rw]);
        self.note(format!(
            "copy_file_range {} fd{ks} off {src_off} -> {} fd{kd} off {dst_off} len {len} \
             (copies {count}{})",
            self.files[src].rel,
            self.files[dst].rel,
            if overlap { ", overlapping: EINVAL" } else { "" }
        ));
        if overlap {
            self.stats.copy_overlap += 1;
            let r = common::copy_file_range(
                &self.files[src].fds[ks].file,
                src_off as u64,
                &self.files[dst].fds[kd].file,
                dst_off as u64,
                len,
            );
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                r => self.fail(format!(
                    "copy_file_range over overlapping ranges of one file: got {r:?}, want EINVAL"
                )),
            }
            self.check_range(
                dst,
                dst_off,
                dst_off + len,
                "after a refused copy_file_range",
            );
            return;
        }
        self.stats.copy_range += 1;
        // Each call copies min(asked, source bytes left); a short copy is continued, each
        // call checked against the model as it stands then (a copy within one file can
        // grow the source while it runs, so a continuation may find more, or overlap).
        let mut done = 0;
        loop {
            let ssize = self.files[src].data.len();
            let (from, to, ask) = (src_off + done, dst_off + done, len - done);
            let max = ask.min(ssize.saturating_sub(from));
            let overlap_now = src == dst && max > 0 && to < from + max && from < to + max;
            if done > 0 && (max == 0 || overlap_now) {
                break;
            }
            let r = common::copy_file_range(
                &self.files[src].fds[ks].file,
                from as u64,
                &self.files[dst].fds[kd].file,
                to as u64,
                ask,
            );
            let n = match r {
                Ok(n) if n <= max && (n > 0 || max == 0) => n,
                Ok(n) => self.fail(format!(
                    "copy_file_range after {done} bytes: copied {n}, want 1..={max}"
                )),
                Err(e) => self.fail(format!("copy_file_range after {done} bytes: {e}")),
            };
            let bytes = self.files[src].data[from.min(ssize)..from.min(ssize) + n].to_vec();
            set_range(&mut self.files[dst].data, to, &bytes);
            done += n;
            if n < max {
                self.stats.copy_short += 1;
            }
            if n == 0 || done == len {
                break;
            }
        }
        let count = done;
        self.check_range(
            dst,
            dst_off.saturating_sub(64),
            dst_off + count + 64,
            "after copy_file_range",
        );
        if src != dst {
            self.check_range(
                src,
                src_off,
                src_off + count,
                "copy_file_range source after",
            );
        }
    }

    /// lseek SEEK_DATA / SEEK_HOLE: whatever is reported as a hole reads as zeros in the
    /// model (what `cp --sparse` and backup tools rely on), both answer within the file, and
    /// ENXIO at or past its end.
    fn op_seek(&mut self, i: usize) {
        self.stats.seek += 1;
        let size = self.files[i].data.len();
        let off = if self.rng.chance(1, 10) {
            size + self.rng.below(2)
        } else {
            self.rng.below(size + 1)
        };
        let kinds = self.readable_kinds(i);
        let k = self.fd(i, kinds);
        self.note(format!(
            "lseek {} fd{k} SEEK_DATA/SEEK_HOLE from {off} (size {size})",
            self.files[i].rel
        ));
        let seek = |run: &Run, from: usize, whence: libc::c_int| -> Option<usize> {
            match common::lseek(&run.files[i].fds[k].file, from as i64, whence) {
                Ok(p) => Some(p as usize),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => None,
                Err(e) => run.fail(format!("lseek from {from} whence {whence}: {e}")),
            }
        };
        let zeros = |run: &Run, from: usize, to: usize, what: &str| {
            if let Some(p) = run.files[i].data[from..to].iter().position(|&b| b != 0) {
                run.fail(format!(
                    "{what}: {from}..{to} is reported as a hole, but byte {} is {:#04x}",
                    from + p,
                    run.files[i].data[from + p]
                ));
            }
        };
        let data = seek(self, off, libc::SEEK_DATA);
        let hole = seek(self, off, libc::SEEK_HOLE);
        if off >= size {
            if data.is_some() || hole.is_some() {
                self.fail(format!(
                    "lseek from {off} at or past the end ({size}): SEEK_DATA {data:?}, \
                     SEEK_HOLE {hole:?}, want ENXIO for both"
                ));
            }
            return;
        }
        match data {
            Some(d) if d < off || d >= size => self.fail(format!(
                "SEEK_DATA from {off} gave {d}, outside {off}..{size}"
            )),
            Some(d) => zeros(self, off, d, "SEEK_DATA"),
            None => zeros(self, off, size, "SEEK_DATA (ENXIO)"),
        }
        let Some(h) = hole else {
            self.fail(format!("SEEK_HOLE from {off} < size {size}: ENXIO"));
        };
        if h < off || h > size {
            self.fail(format!(
                "SEEK_HOLE from {off} gave {h}, outside {off}..={size}"
            ));
        }
        if h < size {
            match seek(self, h, libc::SEEK_DATA) {
                Some(d) if d <= h || d >= size => self.fail(format!(
                    "SEEK_DATA from the hole at {h} gave {d}, outside {h}+1..{size}"
                )),
                Some(d) => zeros(self, h, d, "SEEK_HOLE then SEEK_DATA"),
                None => zeros(self, h, size, "SEEK_HOLE then SEEK_DATA (ENXIO)"),
            }
        }
    }

    fn op_open_trunc(&mut self, i: usize) {
        self.stats.open_trunc += 1;
        // O_RDONLY|O_TRUNC truncates too (and copies up) on Linux.
        let acc = if self.rng.chance(1, 3) {
            Access::Ro
        } else {
            Access::Rw
        };
        self.note(format!("open {} {acc:?}|O_TRUNC", self.files[i].rel));
        self.open(i, acc, true);
        self.check_range(i, 0, 64, "after open O_TRUNC");
    }

    fn op_reopen(&mut self, i: usize) {
        self.stats.reopen += 1;
        if !self.files[i].fds.is_empty() && self.rng.chance(1, 2) {
            let k = self.rng.below(self.files[i].fds.len());
            self.files[i].fds.swap_remove(k);
        }
        let acc = if self.files[i].read_only {
            Access::Ro
        } else {
            [Access::Ro, Access::Rw, Access::Append][self.rng.below(3)]
        };
        self.note(format!("reopen {} {acc:?}", self.files[i].rel));
        let k = self.open(i, acc, false);
        let size = self.files[i].data.len();
        let off = self.rng.offset(size);
        if acc != Access::Append {
            // Through the new fd itself.
            let got = match read_at_most(&self.files[i].fds[k].file, off, 4 * KIB) {
                Ok(g) => g,
                Err(e) => self.fail(format!("read through the reopened fd: {e}")),
            };
            let want = &self.files[i].data[off.min(size)..(off + 4 * KIB).min(size)];
            if got != want {
                self.fail(format!(
                    "read through the reopened fd at {off}: {}",
                    first_difference(&got, want)
                ));
            }
        }
        self.check_range(i, off, off + 4 * KIB, "after reopen");
    }

    fn op_close(&mut self, i: usize) {
        self.stats.close += 1;
        if self.files[i].fds.is_empty() {
            return;
        }
        let k = self.rng.below(self.files[i].fds.len());
        self.note(format!("close {} fd{k}", self.files[i].rel));
        self.files[i].fds.swap_remove(k);
        let size = self.files[i].data.len();
        let off = self.rng.offset(size);
        self.check_range(i, off, off + 4 * KIB, "after close");
    }

    fn close_all(&mut self) {
        for t in &mut self.files {
            t.fds.clear();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fallocate answers of kernel overlayfs
// ---------------------------------------------------------------------------------------

/// For each of `FALLOC_MODES`, what kernel overlayfs (over a copied-up file on the same
/// filesystem as our fixtures) answers; the upper filesystem's own answer when overlayfs
/// cannot be mounted here (overlayfs hands fallocate to the upper file as it is).
fn kernel_fallocate_answers() -> Vec<Result<(), i32>> {
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "f", &noise(64 * KIB, 7), 0o644);
    let target = match common::mount(&Driver::Kernel, &fx, true, &[]) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!(
                "note: kernel overlayfs not mountable ({e}); fallocate answers from the upper filesystem"
            );
            None
        }
    };
    let p = if target.is_some() {
        fx.m("f")
    } else {
        fx.l(0, "f")
    };
    let answers = with_timeout(30, move || {
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        FALLOC_MODES
            .iter()
            .map(|&(mode, _)| {
                common::fallocate(&f, mode, 4096, 8192).map_err(|e| e.raw_os_error().unwrap())
            })
            .collect()
    });
    if let Some(g) = target {
        g.unmount().expect("unmount the kernel overlayfs probe");
    }
    answers
}

// ---------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------

/// A gzip layer tar of `dirs` and `files` (root-owned, 0755 / 0644).
fn gzip_layer(dirs: &[&str], files: &[(&str, &[u8])]) -> (Vec<u8>, Vec<u8>) {
    let mut b = tar::Builder::new(Vec::new());
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_600_000_000);
        h.set_size(0);
        b.append_data(&mut h, d, &[][..]).unwrap();
    }
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, *data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&tar).unwrap();
    (tar, e.finish().unwrap())
}

/// A one-layer `docker save` tarball (the layer member is the gzip blob).
fn write_docker_archive(path: &Path, tar: &[u8], blob: &[u8]) {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": Platform::host().architecture,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256_of(tar).to_string()]},
    }))
    .unwrap();
    let cfg_name = format!("{}.json", sha256_of(&config).hex());
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": cfg_name, "RepoTags": ["integrity:v1"], "Layers": ["l0/layer.tar"]}
    ]))
    .unwrap();
    let mut b = tar::Builder::new(File::create(path).unwrap());
    for (name, data) in [
        ("l0/layer.tar", blob),
        (cfg_name.as_str(), config.as_slice()),
        ("manifest.json", manifest.as_slice()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }
    b.finish().unwrap();
}

// ---------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Two lower directory layers plus the upper.
    Dirs,
    /// A gzip docker-archive image plus the upper.
    Image,
}

struct Setup {
    fx: Fixture,
    kind: Kind,
    passthrough_off: bool,
    archive: PathBuf,
    store: PathBuf,
}

impl Setup {
    /// The daemon's log (info, debug for the FUSE adapter: one line per open saying how
    /// it is served).
    fn log(&self) -> PathBuf {
        self.fx.dir.join("daemon.log")
    }

    fn mount(&self) -> MountGuard {
        let _ = fs::remove_file(self.log());
        let log = self.log().display().to_string();
        let env = [
            ("UNIONMOUNT_LOG_FILE", log.as_str()),
            ("RUST_LOG", "info,unionmount::fuse=debug"),
        ];
        let mut extra: Vec<String> = Vec::new();
        if self.passthrough_off {
            extra.push("passthrough=off".into());
        }
        match self.kind {
            Kind::Dirs => {
                let driver = common::driver();
                if driver == Driver::Kernel {
                    extra.clear();
                }
                let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
                let fx = &self.fx;
                common::mount_paths_env(
                    &driver,
                    &fx.lowers,
                    Some(&fx.upper),
                    Some(&fx.work),
                    &fx.mnt,
                    &refs,
                    &env,
                )
                .expect("mount")
            }
            Kind::Image => {
                let mnt = &self.fx.mnt;
                let guard = MountGuard::adopt(mnt);
                let mut args: Vec<OsString> = vec![
                    "--image".into(),
                    format!("docker-archive:{}", self.archive.display()).into(),
                    "--store".into(),
                    self.store.clone().into(),
                    "--upper".into(),
                    self.fx.upper.clone().into(),
                    "--work".into(),
                    self.fx.work.clone().into(),
                ];
                if let Ok(more) = std::env::var("UNIONMOUNT_TEST_OPTS")
                    && !more.is_empty()
                {
                    extra.push(more);
                }
                for e in &extra {
                    args.push("-o".into());
                    args.push(e.into());
                }
                args.push(mnt.clone().into());
                let env: Vec<(String, String)> = env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let out = with_timeout(120, move || {
                    Command::new(unionmount_bin())
                        .args(&args)
                        .envs(env)
                        .stdin(Stdio::null())
                        .output()
                        .expect("spawn unionmount")
                });
                assert_success(&out, "unionmount --image docker-archive:...");
                assert!(is_mounted(mnt), "{} is not mounted", mnt.display());
                guard
            }
        }
    }

    /// From the daemon log of the last mount: (passthrough granted, opens passed through,
    /// opens served by the daemon).
    fn data_paths(&self) -> (bool, usize, usize) {
        let log = fs::read_to_string(self.log()).unwrap_or_default();
        (
            log.contains("capability passthrough: on"),
            log.matches("): passthrough").count(),
            log.matches("): served by the daemon").count(),
        )
    }
}

/// Builds the layers and the model for `kind`: lower (or image) files, files already in
/// the upper, and one created through the mount by the first step.
fn build(kind: Kind, passthrough_off: bool) -> (Setup, Vec<Tracked>) {
    let fx = Fixture::new(if kind == Kind::Dirs { 2 } else { 0 });
    let mut files = Vec::new();
    let archive = fx.dir.join("image.tar");
    let store = fx.dir.join("store");
    match kind {
        Kind::Dirs => {
            let (top, base) = (fx.lowers[0].clone(), fx.lowers[1].clone());
            let mut holes = vec![0u8; 4 * MIB];
            Rng::new(6).fill(&mut holes[2 * MIB + 100..2 * MIB + 4100]);
            let lower: [(&Path, &str, Vec<u8>, bool); 7] = [
                (&top, "data/holes.bin", holes, false),
                (&base, "data/shadowed.bin", noise(200 * KIB, 1), false),
                (&base, "data/base.bin", noise(MIB, 2), false),
                (&top, "data/shadowed.bin", noise(300 * KIB, 3), false),
                (&top, "data/sparse.bin", sparse(3 * MIB, 4), false),
                (&top, "data/empty", Vec::new(), false),
                (&top, "data/ro.bin", noise(512 * KIB, 5), true),
            ];
            for (layer, rel, data, ro) in lower {
                write_sparse(&layer.join(rel), &data);
                // The top layer's copy hides the base's.
                files.retain(|t: &Tracked| t.rel != rel);
                let t = Tracked::new(rel, Origin::Lower, data);
                files.push(if ro { t.read_only() } else { t });
            }
            files.push(Tracked::new(
                "data/small.txt",
                Origin::Lower,
                b"small\n".repeat(170),
            ));
            write_sparse(&top.join("data/small.txt"), &files.last().unwrap().data);
        }
        Kind::Image => {
            let img: Vec<(&str, Vec<u8>, bool)> = vec![
                ("img/a.bin", noise(3 * MIB / 2, 11), false),
                ("img/sparse.bin", sparse(5 * MIB / 2, 12), false),
                ("img/empty", Vec::new(), false),
                ("img/small", noise(100, 13), false),
                ("img/ro.bin", noise(400 * KIB, 14), true),
            ];
            let refs: Vec<(&str, &[u8])> = img.iter().map(|(n, d, _)| (*n, d.as_slice())).collect();
            let (tar, blob) = gzip_layer(&["img"], &refs);
            write_docker_archive(&archive, &tar, &blob);
            for (rel, data, ro) in img {
                let t = Tracked::new(rel, Origin::Image, data);
                files.push(if ro { t.read_only() } else { t });
            }
        }
    }
    for (rel, data) in [
        ("u/pre.bin", noise(700 * KIB, 21)),
        ("u/sparse-up.bin", sparse(2 * MIB, 22)),
    ] {
        write_sparse(&fx.upper.join(rel), &data);
        files.push(Tracked::new(rel, Origin::Upper, data));
    }
    files.push(Tracked::new("created.bin", Origin::Created, Vec::new()));
    let setup = Setup {
        fx,
        kind,
        passthrough_off,
        archive,
        store,
    };
    (setup, files)
}

/// Writes `data` to `p` leaving holes where it has whole zero pages.
fn write_sparse(p: &Path, data: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = File::create(p).unwrap();
    for (n, chunk) in data.chunks(PAGE).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, (n * PAGE) as u64).unwrap();
        }
    }
    f.set_len(data.len() as u64).unwrap();
}

/// Regular files under `root` (relative paths) and directories, sorted.
fn walk(root: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    fn go(root: &Path, dir: &Path, files: &mut BTreeSet<String>, dirs: &mut BTreeSet<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                dirs.insert(rel);
                go(root, &p, files, dirs);
            } else {
                files.insert(rel);
            }
        }
    }
    let (mut f, mut d) = (BTreeSet::new(), BTreeSet::new());
    go(root, root, &mut f, &mut d);
    (f, d)
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

fn exercise(name: &str, kind: Kind, passthrough_off: bool) {
    exercise_with(name, kind, passthrough_off, base_seed(), ops_per_test());
}

/// One run of `ops` steps from `seed` (mixed with `name`, so each test has its own
/// sequence).
fn exercise_with(name: &str, kind: Kind, passthrough_off: bool, seed: u64, ops: usize) {
    if !mount_allowed() {
        return;
    }
    if kind == Kind::Image && common::is_kernel() {
        // Kernel overlayfs cannot mount an image archive; the Dirs tests cover the oracle.
        eprintln!(
            "note: {name}: image mounts are unionmount-only; nothing to run on the kernel driver"
        );
        return;
    }
    // Each test draws its own sequence from the shared seed.
    let test_seed = name
        .bytes()
        .fold(seed, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    eprintln!("{name}: seed {seed:#x}, {ops} operations");
    let falloc = kernel_fallocate_answers();
    let (setup, files) = build(kind, passthrough_off);
    let lower_before: Vec<(PathBuf, Vec<u8>)> = setup
        .fx
        .lowers
        .iter()
        .flat_map(|l| walk(l).0.into_iter().map(move |r| l.join(r)))
        .map(|p| {
            let d = fs::read(&p).unwrap();
            (p, d)
        })
        .collect();

    let mut run = Run {
        name: name.to_string(),
        part: "",
        seed,
        ops,
        rng: Rng::new(test_seed),
        mnt: setup.fx.mnt.clone(),
        upper: setup.fx.upper.clone(),
        files,
        falloc,
        log: VecDeque::new(),
        step: 0,
        stats: Stats::default(),
    };
    let watchdog = 120 + (ops / 100) as u64;

    let guard = setup.mount();
    let mut run = with_timeout(watchdog, move || {
        // The created file comes into being through the mount.
        let created = run
            .files
            .iter()
            .position(|t| t.origin == Origin::Created)
            .unwrap();
        let p = run.path(created);
        if let Err(e) = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&p)
        {
            run.fail(format!("create {}: {e}", p.display()));
        }
        run.check_all_fresh("before the first operation");
        // Half the steps on two threads at once, each on its own half of the files
        // (sibling copy-ups racing, requests for two files interleaved), the rest on one.
        let quarter = run.ops / 4;
        let mut other = run.split();
        std::thread::scope(|s| {
            let h = s.spawn(|| other.exercise(0, quarter));
            run.exercise(0, quarter);
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        });
        run.join(other);
        run.exercise(2 * quarter, run.ops - run.ops / 10);
        run.close_all();
        for i in 0..run.files.len() {
            run.check_whole(i, "at the end, all fds closed");
        }
        run.check_all_fresh("at the end, fresh opens");
        run
    });
    guard.unmount().expect("clean unmount");
    let (granted, passed, served) = setup.data_paths();
    if common::driver() == Driver::Unionmount {
        if passthrough_off && (granted || passed > 0) {
            run.fail(format!(
                "passthrough=off, yet the daemon log says passthrough granted={granted}, \
                 {passed} opens passed through"
            ));
        }
        if !passthrough_off && granted && passed == 0 {
            run.fail(
                "passthrough was granted, yet no open was passed through: the default \
                      data path was not exercised",
            );
        }
    }

    // Persistence: a new mount over the same layers and upper shows the same bytes.
    let guard = setup.mount();
    let mut run = with_timeout(watchdog, move || {
        run.check_all_fresh("after unmount and remount");
        // The last tenth of the steps on the new mount, over the copies made by the old.
        run.exercise(run.ops - run.ops / 10, run.ops);
        run.step = run.ops;
        run.close_all();
        run.check_all_fresh("at the end of the second mount");
        run
    });
    guard.unmount().expect("clean unmount after the remount");

    // The upper holds exactly the files that started there or were opened for writing.
    let (upper_files, upper_dirs) = walk(&setup.fx.upper);
    let want: BTreeSet<String> = run
        .files
        .iter()
        .filter(|t| t.in_upper())
        .map(|t| t.rel.clone())
        .collect();
    if upper_files != want {
        run.fail(format!(
            "the upper holds {upper_files:?}, want exactly {want:?} (the files that started \
             there or were opened for writing)"
        ));
    }
    for d in &upper_dirs {
        if !want.iter().any(|f| f.starts_with(&format!("{d}/"))) {
            run.fail(format!(
                "the upper holds directory {d} with no file of ours below"
            ));
        }
    }
    for t in run.files.iter().filter(|t| t.in_upper()) {
        let got = fs::read(setup.fx.upper.join(&t.rel)).unwrap();
        if got != t.data {
            run.fail(format!(
                "upper copy of {}: {}",
                t.rel,
                first_difference(&got, &t.data)
            ));
        }
    }
    for (p, before) in &lower_before {
        if fs::read(p).unwrap() != *before {
            run.fail(format!("lower layer file {} changed", p.display()));
        }
    }
    if common::driver() == Driver::Unionmount {
        assert_work_clean(&setup.fx.work);
    }
    run.step = run.ops;
    eprintln!(
        "integrity {name}: {} ops, seed {seed:#x}, passthrough granted={granted}, opens \
         passed through {passed}, served by the daemon {served}, fallocate answers {:?}, \
         {} files ({} copied up), {:?}",
        run.ops,
        run.falloc,
        run.files.len(),
        run.files
            .iter()
            .filter(|t| t.written && matches!(t.origin, Origin::Lower | Origin::Image))
            .count(),
        run.stats
    );
}

#[test]
fn lower_dir_layers_default() {
    exercise("lower_dir_layers_default", Kind::Dirs, false);
}

#[test]
fn lower_dir_layers_passthrough_off() {
    exercise("lower_dir_layers_passthrough_off", Kind::Dirs, true);
}

#[test]
fn image_layer_default() {
    exercise("image_layer_default", Kind::Image, false);
}

#[test]
fn image_layer_passthrough_off() {
    exercise("image_layer_passthrough_off", Kind::Image, true);
}

/// Regression (found by this exerciser, seed 0x18ea46020c5d1ad4): with `passthrough=off`
/// the kernel keeps written data in its writeback cache, and SEEK_DATA/SEEK_HOLE answered
/// by the daemon from the real file reported holes over that data.
#[test]
fn regression_seek_hole_over_cached_writes() {
    exercise_with(
        "lower_dir_layers_passthrough_off",
        Kind::Dirs,
        true,
        0x18ea_4602_0c5d_1ad4,
        2000,
    );
}

/// The same bug as a user meets it: data just written at 1 MiB into a sparse file (still in
/// the page cache) is found by SEEK_DATA, and `cp --sparse=always` (which copies only what
/// SEEK_DATA finds) copies it.
#[test]
fn sparse_copy_sees_data_still_in_the_page_cache() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(1);
    fx.write(&fx.lowers[0], "lower.bin", &sparse(2 * MIB, 31), 0o644);
    let extra: &[&str] = if common::is_kernel() {
        &[]
    } else {
        &["passthrough=off"]
    };
    let guard = common::mount(&common::driver(), &fx, true, extra).expect("mount");
    let (m, dir) = (fx.mnt.clone(), fx.dir.clone());
    common::within_mount(&fx, move |_| {
        for name in ["new.bin", "lower.bin"] {
            let p = m.join(name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .unwrap();
            f.set_len(MIB as u64).unwrap();
            let data = noise(4 * KIB, 32);
            f.write_all_at(&data, MIB as u64).unwrap();
            let mut want = vec![0u8; MIB];
            want.extend_from_slice(&data);
            let at = common::lseek(&f, 0, libc::SEEK_DATA);
            assert!(
                matches!(at, Ok(d) if d <= MIB as i64),
                "{name}: SEEK_DATA from 0 = {at:?}, the data at {MIB} is missed"
            );
            let hole = common::lseek(&f, MIB as i64, libc::SEEK_HOLE).unwrap();
            assert_eq!(hole, (MIB + 4 * KIB) as i64, "{name}: SEEK_HOLE from {MIB}");
            let dst = dir.join(format!("copy-{name}"));
            let out = std::process::Command::new("cp")
                .arg("--sparse=always")
                .arg(&p)
                .arg(&dst)
                .output()
                .unwrap();
            assert_success(&out, "cp --sparse=always");
            assert!(
                fs::read(&dst).unwrap() == want,
                "{name}: cp --sparse=always copied other bytes than the file holds"
            );
        }
    });
    guard.unmount().expect("clean unmount");
}

/// While one thread copies lower files up (their first writable opens) and writes their
/// second halves, another keeps reading the first halves through fds opened before and
/// during the copy-ups: every read returns the layer's bytes, never a short read or an
/// error (a reader must never see a half-made copy). Default data path and passthrough=off.
#[test]
fn reads_during_copy_up_see_whole_data() {
    if !mount_allowed() {
        return;
    }
    const FILES: usize = 6;
    const HALF: usize = 512 * KIB;
    for passthrough_off in [false, true] {
        let fx = Fixture::new(1);
        let layer: Vec<Vec<u8>> = (0..FILES).map(|k| noise(2 * HALF, 41 + k as u64)).collect();
        for (k, d) in layer.iter().enumerate() {
            fx.write(&fx.lowers[0], &format!("f{k}"), d, 0o644);
        }
        let extra: &[&str] = if passthrough_off && !common::is_kernel() {
            &["passthrough=off"]
        } else {
            &[]
        };
        let guard = common::mount(&common::driver(), &fx, true, extra).expect("mount");
        let (mnt, upper) = (fx.mnt.clone(), fx.upper.clone());
        let orig = layer.clone();
        let models = with_timeout(120, move || {
            let done = std::sync::atomic::AtomicBool::new(false);
            let barrier = std::sync::Barrier::new(2);
            let path = |k: usize| mnt.join(format!("f{k}"));
            std::thread::scope(|s| {
                let reader = s.spawn(|| {
                    let mut rng = Rng::new(40);
                    let mut fds: Vec<(usize, File)> = (0..FILES)
                        .map(|k| (k, File::open(path(k)).unwrap()))
                        .collect();
                    barrier.wait();
                    let mut n = 0;
                    while !done.load(std::sync::atomic::Ordering::Acquire) || n < 200 {
                        n += 1;
                        if n % 50 == 0 {
                            let k = rng.below(FILES);
                            fds.push((k, File::open(path(k)).unwrap()));
                        }
                        let (k, f) = &fds[rng.below(fds.len())];
                        let off = rng.below(HALF);
                        let len = rng.between(1, 64 * KIB).min(HALF - off);
                        let got = read_at_most(f, off, len).unwrap_or_else(|e| {
                            panic!("f{k}: read {off}+{len} during copy-ups: {e}")
                        });
                        assert!(
                            got == orig[*k][off..off + len],
                            "f{k}: read {off}+{len} during copy-ups \
                             (passthrough_off={passthrough_off}): {}",
                            first_difference(&got, &orig[*k][off..off + len])
                        );
                    }
                    n
                });
                let mut rng = Rng::new(43);
                let mut models: Vec<Vec<u8>> = orig.iter().map(|d| d[HALF..].to_vec()).collect();
                barrier.wait();
                for (k, model) in models.iter_mut().enumerate() {
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path(k))
                        .unwrap();
                    for _ in 0..50 {
                        let off = rng.below(HALF);
                        let len = rng.between(1, 16 * KIB).min(HALF - off);
                        let bytes = rng.bytes(len);
                        f.write_all_at(&bytes, (HALF + off) as u64).unwrap();
                        model[off..off + len].copy_from_slice(&bytes);
                    }
                }
                done.store(true, std::sync::atomic::Ordering::Release);
                match reader.join() {
                    Ok(reads) => assert!(reads >= 200, "the reader ran"),
                    Err(e) => std::panic::resume_unwind(e),
                }
                for (k, model) in models.iter().enumerate() {
                    let all = fs::read(path(k)).unwrap();
                    assert!(
                        all[..HALF] == orig[k][..HALF],
                        "f{k}: first half afterwards"
                    );
                    assert!(all[HALF..] == model[..], "f{k}: second half afterwards");
                }
                models
            })
        });
        guard.unmount().expect("clean unmount");
        for (k, model) in models.iter().enumerate() {
            let up = fs::read(upper.join(format!("f{k}"))).unwrap();
            assert!(
                up[..HALF] == layer[k][..HALF] && up[HALF..] == model[..],
                "upper f{k}: the layer's first half and the written second half"
            );
        }
    }
}
