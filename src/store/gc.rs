//! Reachability, garbage collection and verification of the store.
//!
//! Mark: every manifest `index.json` names → (for an index, each child present in the store)
//! → config and layers. The layer digests found are the live layers: their `index/` files
//! stay, and the caller's `live_objects` hook, which knows the layer index format, says which
//! `objects/` each live layer uses. Without a hook the `objects/` area is left alone (we
//! cannot know what is reachable, and deleting a live object would cost a refetch but
//! deleting a wrong one cannot happen).
//!
//! Sweep: blobs and indexes not marked; objects not marked (only with a hook); entries of
//! `tmp/` older than [`TMP_GRACE`] (younger ones may belong to a running writer that does not
//! take the lock, such as a mount filling `objects/`).
//!
//! Invariants: gc holds the exclusive store lock; a manifest named by `index.json` that is
//! missing or unreadable aborts the gc before anything is deleted; files whose names are not
//! digests are never deleted from `blobs/`, `index/` or `objects/`.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::Digest;
use super::layout::{Store, invalid};
use crate::image::blob::MAX_JSON;

/// How old a `tmp/` entry must be before gc removes it.
pub const TMP_GRACE: Duration = Duration::from_secs(3600);

/// The hook that lists the objects a live layer's index refers to.
pub type LiveObjects<'a> = &'a dyn Fn(&Digest) -> io::Result<Vec<Digest>>;

/// What `gc` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub removed_blobs: Vec<Digest>,
    pub removed_indexes: Vec<Digest>,
    pub removed_objects: Vec<Digest>,
    /// Entries removed from `tmp/`.
    pub removed_tmp: usize,
    /// Bytes freed by the removed blobs, indexes, objects and tmp files.
    pub freed_bytes: u64,
}

/// A blob or object whose bytes do not hash to its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBlob {
    pub path: PathBuf,
    pub expected: Digest,
    pub actual: Digest,
}

/// What `verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of blobs and objects rehashed.
    pub checked: usize,
    pub bad: Vec<BadBlob>,
    /// Files under `blobs/sha256/` or `objects/sha256/` whose names are not digests.
    pub strays: Vec<PathBuf>,
}

/// Regular files of a directory (none if it is missing), sorted.
fn files_in(dir: &Path) -> io::Result<Vec<(String, PathBuf, u64)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let md = e.metadata()?;
        if md.is_file() {
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                e.path(),
                md.len(),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// `objects/sha256/<xx>/<rest>` as (digest or None, path, size).
fn objects_in(root: &Path) -> io::Result<Vec<(Option<Digest>, PathBuf, u64)>> {
    let dir = root.join("objects/sha256");
    let mut out = Vec::new();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    let mut subs: Vec<_> = rd.collect::<Result<_, _>>()?;
    subs.sort_by_key(|e| e.file_name());
    for sub in subs {
        let prefix = sub.file_name().to_string_lossy().into_owned();
        if !sub.file_type()?.is_dir() {
            out.push((None, sub.path(), 0));
            continue;
        }
        for (name, path, len) in files_in(&sub.path())? {
            out.push((
                Digest::parse_hex(&format!("{prefix}{name}")).ok(),
                path,
                len,
            ));
        }
    }
    Ok(out)
}

/// sha256 of a file, streamed.
fn hash_file(p: &Path) -> io::Result<Digest> {
    crate::image::blob::sha256_of_reader(fs::File::open(p)?)
}

fn digests_in(v: Option<&serde_json::Value>) -> Vec<&str> {
    match v {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|d| d.get("digest").and_then(|d| d.as_str()))
            .collect(),
        Some(d) => d
            .get("digest")
            .and_then(|d| d.as_str())
            .into_iter()
            .collect(),
        None => Vec::new(),
    }
}

impl Store {
    /// Adds `digest` and everything it references to `blobs` (layers also to `layers`).
    /// `required`: a missing manifest is an error (true for `index.json` entries; children
    /// of an index may be absent, as for the platforms not imported).
    pub(crate) fn mark(
        &self,
        digest: &Digest,
        depth: usize,
        blobs: &mut BTreeSet<Digest>,
        layers: &mut BTreeSet<Digest>,
        required: bool,
    ) -> io::Result<()> {
        if !blobs.insert(*digest) {
            return Ok(());
        }
        let p = self.blob_path(digest);
        let md = match fs::metadata(&p) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => return Ok(()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("store: manifest {digest} named by index.json: {e}"),
                ));
            }
        };
        if md.len() > MAX_JSON || depth > crate::image::oci::MAX_DEPTH {
            return Err(invalid(format!(
                "store: manifest {digest}: too large or nested too deep to follow"
            )));
        }
        let bytes = fs::read(&p)?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("store: manifest {digest}: {e}")))?;
        let parse = |s: &str| {
            s.parse::<Digest>()
                .map_err(|e| invalid(format!("store: manifest {digest}: {e}")))
        };
        for child in v
            .get("manifests")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(s) = child.get("digest").and_then(|d| d.as_str()) {
                self.mark(&parse(s)?, depth + 1, blobs, layers, false)?;
            }
        }
        for s in digests_in(v.get("config")) {
            blobs.insert(parse(s)?);
        }
        for s in digests_in(v.get("layers")) {
            let d = parse(s)?;
            blobs.insert(d);
            layers.insert(d);
        }
        Ok(())
    }

    /// Deletes what no tagged image reaches; see the module doc. `live_objects` maps a live
    /// layer digest to the object digests its index uses; `None` keeps every object.
    pub fn gc(&self, live_objects: Option<LiveObjects<'_>>) -> io::Result<GcReport> {
        let _lock = self.lock(true)?;
        let ix = self.read_index()?;
        let mut blobs = BTreeSet::new();
        let mut layers = BTreeSet::new();
        for e in &ix.manifests {
            let d = self.entry_digest(e)?;
            self.mark(&d, 0, &mut blobs, &mut layers, true)?;
        }
        // Layers of live mounts stay, named or not (see `lease`).
        for d in self.leased_layers()? {
            blobs.insert(d);
            layers.insert(d);
        }
        let mut objects = BTreeSet::new();
        if let Some(hook) = live_objects {
            for l in &layers {
                objects.extend(hook(l)?);
            }
        }

        let mut report = GcReport::default();
        for (name, path, len) in files_in(&self.root().join("blobs/sha256"))? {
            if let Ok(d) = Digest::parse_hex(&name)
                && !blobs.contains(&d)
            {
                fs::remove_file(&path)?;
                report.removed_blobs.push(d);
                report.freed_bytes += len;
            }
        }
        for (name, path, len) in files_in(&self.root().join("index/sha256"))? {
            if let Ok(d) = Digest::parse_hex(&name)
                && !layers.contains(&d)
            {
                fs::remove_file(&path)?;
                report.removed_indexes.push(d);
                report.freed_bytes += len;
            }
        }
        // Remembered digests of archive members (see store::mount) whose layer is gone.
        for (_, path, _) in files_in(&self.root().join("index/by-member"))? {
            let keep = fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<Digest>().ok())
                .is_some_and(|d| layers.contains(&d));
            if !keep {
                fs::remove_file(&path)?;
            }
        }
        if live_objects.is_some() {
            for (d, path, len) in objects_in(self.root())? {
                if let Some(d) = d
                    && !objects.contains(&d)
                {
                    fs::remove_file(&path)?;
                    report.removed_objects.push(d);
                    report.freed_bytes += len;
                }
            }
        }
        let now = SystemTime::now();
        for e in fs::read_dir(self.tmp_dir())? {
            let e = e?;
            let md = e.metadata()?;
            let old = md
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age >= TMP_GRACE);
            if old {
                if md.is_dir() {
                    fs::remove_dir_all(e.path())?;
                } else {
                    fs::remove_file(e.path())?;
                }
                report.removed_tmp += 1;
                report.freed_bytes += md.len();
            }
        }
        Ok(report)
    }

    /// Rehashes every blob and object and reports those whose bytes do not match their name.
    pub fn verify(&self) -> io::Result<VerifyReport> {
        let _lock = self.lock(false)?;
        let mut report = VerifyReport::default();
        let mut check = |expected: Digest, path: PathBuf| -> io::Result<()> {
            let actual = hash_file(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            report.checked += 1;
            if actual != expected {
                report.bad.push(BadBlob {
                    path,
                    expected,
                    actual,
                });
            }
            Ok(())
        };
        let mut strays = Vec::new();
        for (name, path, _) in files_in(&self.root().join("blobs/sha256"))? {
            match Digest::parse_hex(&name) {
                Ok(d) => check(d, path)?,
                Err(_) => strays.push(path),
            }
        }
        for (d, path, _) in objects_in(self.root())? {
            match d {
                Some(d) => check(d, path)?,
                None => strays.push(path),
            }
        }
        report.strays = strays;
        Ok(report)
    }
}
