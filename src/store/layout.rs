//! The store on disk (DESIGN section 4), itself a valid OCI image layout:
//! ```text
//! STORE/oci-layout, index.json       refs: name → manifest digest (ref.name annotation)
//! STORE/blobs/sha256/<hex>           complete verified blobs (manifests, configs, layers)
//! STORE/index/sha256/<layer-hex>     layer indexes (written by the indexer)
//! STORE/objects/sha256/<xx>/<rest>   file contents by sha256
//! STORE/tmp/                         staging: write, hash, fsync, rename
//! STORE/lock                         flock: exclusive for import/remove/gc, shared to read
//! ```
//! Invariants:
//! - A file under `blobs/` is complete and its name is the sha256 of its bytes: it is
//!   written under `tmp/`, hashed while written, compared, fsynced, then renamed in (and an
//!   existing blob is kept). Paths are built only from parsed `Digest`s.
//! - `index.json` is replaced atomically (tmp, fsync, rename, fsync of the directory) and
//!   only while holding the exclusive lock, so concurrent imports never lose a tag and gc
//!   never runs between an import's blob writes and its tagging.
//! - Nothing but `tmp/` is written until a write is known good.
//! - The store root is mode 0700 (group and other bits are removed when opened): file
//!   contents lose their modes here, so no other user may read or replace them.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::Digest;
use crate::image::{self, ImageRef, ImageSource, ResolvedImage, media, oci};

pub const REF_NAME: &str = oci::REF_NAME;

/// A content-addressed image store rooted at one directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// One tagged image, as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    pub name: String,
    pub manifest_digest: Digest,
    /// Bytes of every distinct blob the image uses (manifest, config, layers).
    pub size: u64,
}

/// A descriptor in the store's `index.json`; fields we do not know are kept as they are.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct IndexEntry {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl IndexEntry {
    pub fn name(&self) -> Option<&str> {
        self.annotations.as_ref()?.get(REF_NAME).map(String::as_str)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct IndexFile {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<IndexEntry>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A blob written under `tmp/` and verified, not yet renamed into `blobs/`; dropping it
/// removes the temporary file.
#[derive(Debug)]
pub struct StagedBlob {
    tmp: Option<PathBuf>,
    pub digest: Digest,
    pub size: u64,
}

impl StagedBlob {
    /// Where the staged bytes are until `commit_blob`.
    pub fn path(&self) -> Option<&Path> {
        self.tmp.as_deref()
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if let Some(t) = self.tmp.take() {
            let _ = fs::remove_file(t);
        }
    }
}

pub(crate) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn with_path(e: io::Error, p: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

/// fsync of a directory, so a rename inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| with_path(e, dir))
}

/// The default store directory from an environment lookup and whether we run as root:
/// `$UNIONMOUNT_STORE`, else `/var/lib/unionmount` for root, else `$XDG_DATA_HOME/unionmount`
/// (when absolute), else `$HOME/.local/share/unionmount`.
pub fn default_dir_from(
    env: impl Fn(&str) -> Option<OsString>,
    is_root: bool,
) -> io::Result<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(v) = set("UNIONMOUNT_STORE") {
        return Ok(PathBuf::from(v));
    }
    if is_root {
        return Ok(PathBuf::from("/var/lib/unionmount"));
    }
    if let Some(x) = set("XDG_DATA_HOME").filter(|x| Path::new(x).is_absolute()) {
        return Ok(PathBuf::from(x).join("unionmount"));
    }
    if let Some(h) = set("HOME") {
        return Ok(PathBuf::from(h).join(".local/share/unionmount"));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "cannot choose an image store directory: set UNIONMOUNT_STORE or HOME",
    ))
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// The default store directory for this user (see [`default_dir_from`]).
    pub fn default_dir() -> io::Result<PathBuf> {
        default_dir_from(|k| std::env::var_os(k), nix::unistd::geteuid().is_root())
    }

    /// Opens the store at `dir`, creating its layout if missing. An existing `oci-layout`
    /// must say version 1.x and an existing `index.json` must parse.
    pub fn open_or_create(dir: &Path) -> io::Result<Store> {
        fs::create_dir_all(dir).map_err(|e| with_path(e, dir))?;
        // Only the owner may enter the store: `objects/` holds the bytes of a 0600 file of
        // an image like any other (content has no mode), and what is under `blobs/`,
        // `index/` and `objects/` is served to every later mount. The daemon runs with
        // umask 0, so this is set here rather than left to the creation modes below.
        let mode = fs::metadata(dir)
            .map_err(|e| with_path(e, dir))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o700))
                .map_err(|e| with_path(e, dir))?;
        }
        let store = Store {
            root: dir.to_path_buf(),
        };
        for sub in ["blobs/sha256", "index/sha256", "objects/sha256", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| with_path(e, &p))?;
        }
        let _lock = store.lock(true)?;
        let layout = dir.join("oci-layout");
        match fs::read(&layout) {
            Ok(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| invalid(format!("{}: {e}", layout.display())))?;
                let ver = v.get("imageLayoutVersion").and_then(|v| v.as_str());
                if ver.and_then(|v| v.split('.').next()) != Some("1") {
                    return Err(invalid(format!(
                        "{}: unsupported imageLayoutVersion {ver:?} (expected 1.x)",
                        layout.display()
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                store.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            }
            Err(e) => return Err(with_path(e, &layout)),
        }
        if dir.join("index.json").exists() {
            store.read_index()?;
        } else {
            store.write_index(&IndexFile {
                schema_version: 2,
                media_type: Some(media::OCI_INDEX.to_string()),
                manifests: Vec::new(),
                extra: BTreeMap::new(),
            })?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `STORE/blobs/sha256/<hex>`.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs").join(d.rel_path())
    }

    /// `STORE/index/sha256/<layer-hex>`: where the indexer keeps a layer's index.
    pub fn index_path(&self, layer: &Digest) -> PathBuf {
        self.root.join("index").join(layer.rel_path())
    }

    /// `STORE/objects/sha256/<xx>/<rest>`: a file's contents by their sha256.
    pub fn object_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root
            .join("objects/sha256")
            .join(&hex[..2])
            .join(&hex[2..])
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Takes the store lock (exclusive or shared); released when the value is dropped.
    pub fn lock(&self, exclusive: bool) -> io::Result<Flock<File>> {
        let p = self.root.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| with_path(e, &p))?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        Flock::lock(f, arg).map_err(|(_, errno)| with_path(io::Error::from(errno), &p))
    }

    /// A new empty file under `tmp/` (for any staged write: blobs, indexes, objects).
    pub fn new_tmp(&self) -> io::Result<(PathBuf, File)> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        loop {
            let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let p = self
                .tmp_dir()
                .join(format!("{}-{seq}-{nanos}", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).open(&p) {
                Ok(f) => return Ok((p, f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(with_path(e, &p)),
            }
        }
    }

    /// Moves a complete, fsynced file from `tmp/` to `dest` (creating its parent) and makes
    /// the rename durable. An existing `dest` is kept and the temporary file removed.
    pub fn publish_tmp(&self, tmp: &Path, dest: &Path) -> io::Result<()> {
        let parent = dest.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(|e| with_path(e, parent))?;
        if dest.exists() {
            let _ = fs::remove_file(tmp);
            return Ok(());
        }
        fs::rename(tmp, dest).map_err(|e| with_path(e, dest))?;
        sync_dir(parent)
    }

    /// Writes `bytes` to `dest` atomically (tmp, fsync, rename, fsync dir), replacing it.
    pub(crate) fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let (tmp, mut f) = self.new_tmp()?;
        let r = f.write_all(bytes).and_then(|_| f.sync_all());
        drop(f);
        if let Err(e) = r.and_then(|_| fs::rename(&tmp, dest)) {
            let _ = fs::remove_file(&tmp);
            return Err(with_path(e, dest));
        }
        sync_dir(dest.parent().unwrap_or(&self.root))
    }

    /// Copies `reader` into `tmp/` while hashing it, checks the digest against `expected`,
    /// and fsyncs; the blob is not visible until [`Store::commit_blob`].
    pub fn stage_blob(
        &self,
        reader: &mut dyn Read,
        expected: Option<&Digest>,
    ) -> io::Result<StagedBlob> {
        let (tmp, mut f) = self.new_tmp()?;
        let mut staged = StagedBlob {
            tmp: Some(tmp),
            digest: Digest::from_bytes([0; 32]),
            size: 0,
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            f.write_all(&buf[..n])?;
            staged.size += n as u64;
        }
        let actual = Digest::from_bytes(hasher.finalize().into());
        if let Some(exp) = expected
            && *exp != actual
        {
            return Err(invalid(format!(
                "blob digest mismatch: expected {exp}, got {actual}"
            )));
        }
        f.sync_all()?;
        staged.digest = actual;
        Ok(staged)
    }

    /// Renames a staged blob into `blobs/` (keeping an existing blob of that digest).
    pub fn commit_blob(&self, mut staged: StagedBlob) -> io::Result<Digest> {
        let dest = self.blob_path(&staged.digest);
        if let Some(tmp) = staged.tmp.take() {
            self.publish_tmp(&tmp, &dest)?;
        }
        Ok(staged.digest)
    }

    /// Writes a blob atomically: tmp/, hashed while written, compared with `expected`,
    /// fsynced, renamed into `blobs/`. On a mismatch nothing is left behind and the error
    /// names both digests.
    pub fn publish_blob(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
    ) -> io::Result<Digest> {
        let staged = self.stage_blob(&mut reader, expected)?;
        self.commit_blob(staged)
    }

    pub(crate) fn read_index(&self) -> io::Result<IndexFile> {
        let p = self.root.join("index.json");
        let bytes = fs::read(&p).map_err(|e| with_path(e, &p))?;
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{}: {e}", p.display())))
    }

    pub(crate) fn write_index(&self, ix: &IndexFile) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(ix)
            .map_err(|e| invalid(format!("index.json: cannot serialise: {e}")))?;
        self.write_atomic(&self.root.join("index.json"), &bytes)
    }

    /// Every tagged image with its manifest digest and the total size of its blobs.
    pub fn list(&self) -> io::Result<Vec<ImageEntry>> {
        let _lock = self.lock(false)?;
        let ix = self.read_index()?;
        let mut out = Vec::new();
        for e in &ix.manifests {
            let Some(name) = e.name() else { continue };
            let digest = self.entry_digest(e)?;
            let mut blobs = std::collections::BTreeSet::new();
            let mut layers = std::collections::BTreeSet::new();
            self.mark(&digest, 0, &mut blobs, &mut layers, true)?;
            let mut size = 0;
            for b in &blobs {
                size += fs::metadata(self.blob_path(b))
                    .map(|m| m.len())
                    .unwrap_or(0);
            }
            out.push(ImageEntry {
                name: name.to_string(),
                manifest_digest: digest,
                size,
            });
        }
        Ok(out)
    }

    pub(crate) fn entry_digest(&self, e: &IndexEntry) -> io::Result<Digest> {
        e.digest.parse::<Digest>().map_err(|err| {
            invalid(format!(
                "{}: entry {:?}: {err}",
                self.root.join("index.json").display(),
                e.name().unwrap_or("")
            ))
        })
    }

    /// Removes the tag `name` (the blobs stay until `gc`); returns the manifest it named.
    pub fn remove(&self, name: &str) -> io::Result<Digest> {
        let _lock = self.lock(true)?;
        let mut ix = self.read_index()?;
        let Some(pos) = ix.manifests.iter().position(|e| e.name() == Some(name)) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no image named {name:?} in store {}", self.root.display()),
            ));
        };
        let e = ix.manifests.remove(pos);
        let d = self.entry_digest(&e)?;
        self.write_index(&ix)?;
        Ok(d)
    }

    /// Names `entry` (a manifest already in blobs/) `name` in index.json, replacing any
    /// image of that name.
    pub(crate) fn tag(&self, name: &str, entry: IndexEntry) -> io::Result<()> {
        let _lock = self.lock(true)?;
        let mut ix = self.read_index()?;
        ix.manifests.retain(|e| e.name() != Some(name));
        ix.manifests.push(entry);
        self.write_index(&ix)
    }

    /// The stored image `name` (a tag, or `sha256:..` for a manifest digest), read back
    /// through the OCI layout reader, ready to mount.
    pub fn resolve(
        &self,
        name: &str,
        platform: Option<&image::Platform>,
    ) -> io::Result<ResolvedImage> {
        let _lock = self.lock(false)?;
        let reference = match name.parse::<Digest>() {
            Ok(d) => ImageRef::Digest(d),
            Err(_) => ImageRef::Tag(name.to_string()),
        };
        image::resolve(
            &ImageSource::Oci {
                dir: self.root.clone(),
                reference,
            },
            platform,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dir_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = &[
            ("UNIONMOUNT_STORE", "/s"),
            ("XDG_DATA_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(
            default_dir_from(env(all), false).unwrap(),
            PathBuf::from("/s")
        );
        let no_store = &[("XDG_DATA_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(
            default_dir_from(env(no_store), true).unwrap(),
            PathBuf::from("/var/lib/unionmount")
        );
        assert_eq!(
            default_dir_from(env(no_store), false).unwrap(),
            PathBuf::from("/x/unionmount")
        );
        let rel_xdg = &[("XDG_DATA_HOME", "rel"), ("HOME", "/h")];
        assert_eq!(
            default_dir_from(env(rel_xdg), false).unwrap(),
            PathBuf::from("/h/.local/share/unionmount")
        );
        let e = default_dir_from(env(&[]), false).unwrap_err().to_string();
        assert!(e.contains("set UNIONMOUNT_STORE or HOME"), "{e}");
    }

    #[test]
    fn paths_come_from_digests() {
        let s = Store {
            root: PathBuf::from("/st"),
        };
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        assert_eq!(
            s.object_path(&d),
            PathBuf::from(
                "/st/objects/sha256/e3/b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            )
        );
        assert_eq!(
            s.index_path(&d),
            PathBuf::from("/st/index").join(d.rel_path())
        );
        assert_eq!(
            s.blob_path(&d),
            PathBuf::from("/st/blobs").join(d.rel_path())
        );
    }
}
