//! Importing a resolved image into the store: layer blobs, config and manifest copied into
//! `blobs/`, then a tag in `index.json`.
//!
//! For a docker-archive (no manifest in the source) an OCI image manifest is written: the
//! config as `application/vnd.oci.image.config.v1+json`, each layer with the OCI media type
//! of its sniffed compression and the digest computed while copying. A source manifest is
//! kept byte for byte, so its digest is the image's digest in the store too.
//!
//! Invariants:
//! - All-or-nothing: every blob is first staged (hashed and verified) in `tmp/`; only when
//!   all are good are they renamed into `blobs/`, and then `index.json` is replaced
//!   atomically. A failure leaves nothing outside `tmp/`.
//! - A layer whose digest the source states is checked against it while copying; an
//!   uncompressed layer of unknown digest (legacy docker-archive) must hash to its DiffID.
//! - The exclusive store lock is held throughout, so gc never sees half an import.
//! - The tag is the given name, else the source's tag, else the manifest digest; a tag
//!   that already exists is moved to the new image.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde_json::json;

use super::layout::{IndexEntry, REF_NAME, StagedBlob, Store, invalid};
use super::progress::{Progress, Reading, short};
use super::{Compression, Digest};
use crate::image::{self, ImageSource, ResolvedImage, media};

/// A layer as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedLayer {
    pub digest: Digest,
    pub diff_id: Digest,
    pub compression: Compression,
    pub size: u64,
}

/// What `import` stored and how it is tagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    pub name: String,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    /// Base first.
    pub layers: Vec<ImportedLayer>,
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() > 4096 || name.chars().any(char::is_control) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("image name {name:?}: must be 1 to 4096 characters without control characters"),
        ));
    }
    Ok(())
}

impl Store {
    /// Resolves `source` for the host platform and imports it (see [`Store::import_resolved`]).
    pub fn import(&self, source: &ImageSource, name: Option<&str>) -> io::Result<ImportedImage> {
        let img = image::resolve(source, None)?;
        self.import_resolved(&img, name)
    }

    /// Copies the image's blobs into the store and tags it `name` (default: its source tag,
    /// else its manifest digest).
    pub fn import_resolved(
        &self,
        img: &ResolvedImage,
        name: Option<&str>,
    ) -> io::Result<ImportedImage> {
        self.import_checked(img, name, &mut |_, _| Ok(()))
    }

    /// `import_resolved`, calling `check` with each layer and the file holding its bytes
    /// (staged in tmp/, or the stored blob) before anything is committed: an error from it
    /// leaves the store as it was (outside tmp/).
    pub fn import_checked(
        &self,
        img: &ResolvedImage,
        name: Option<&str>,
        check: &mut dyn FnMut(&ImportedLayer, &Path) -> io::Result<()>,
    ) -> io::Result<ImportedImage> {
        if let Some(n) = name {
            check_name(n)?;
        }
        let _lock = self.lock(true)?;
        let mut staged: Vec<StagedBlob> = Vec::new();
        let mut layers = Vec::with_capacity(img.layers.len());
        for (i, l) in img.layers.iter().enumerate() {
            let what = format!("{}: layer {i} (DiffID {})", img.source, l.diff_id);
            if let Some(d) = l.digest
                && std::fs::metadata(self.blob_path(&d)).is_ok_and(|m| m.len() == l.size)
            {
                layers.push(ImportedLayer {
                    digest: d,
                    diff_id: l.diff_id,
                    compression: l.compression,
                    size: l.size,
                });
                continue;
            }
            let expected = match (l.digest, l.compression) {
                (Some(d), _) => Some(d),
                (None, Compression::None) => Some(l.diff_id),
                (None, _) => None,
            };
            let mut bar = Progress::new(format!(
                "copying layer {}/{} {}",
                i + 1,
                img.layers.len(),
                short(expected.as_ref().unwrap_or(&l.diff_id))
            ));
            let mut r = Reading {
                inner: l.source.open()?,
                bar: &mut bar,
                done: 0,
                total: l.size,
            };
            let s = self
                .stage_blob(&mut r, expected.as_ref())
                .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))?;
            bar.done();
            layers.push(ImportedLayer {
                digest: s.digest,
                diff_id: l.diff_id,
                compression: l.compression,
                size: s.size,
            });
            staged.push(s);
        }
        let config = self
            .stage_blob(&mut img.config.as_slice(), Some(&img.config_digest))
            .map_err(|e| invalid(format!("{}: config: {e}", img.source)))?;
        let (manifest_bytes, manifest_type) = match &img.manifest {
            Some(m) => (m.bytes.clone(), m.media_type.clone()),
            None => {
                let layer_descs: Vec<_> = layers
                    .iter()
                    .map(|l| {
                        json!({
                            "mediaType": media::oci_layer(l.compression),
                            "digest": l.digest.to_string(),
                            "size": l.size,
                        })
                    })
                    .collect();
                let m = json!({
                    "schemaVersion": 2,
                    "mediaType": media::OCI_MANIFEST,
                    "config": {
                        "mediaType": media::OCI_CONFIG,
                        "digest": img.config_digest.to_string(),
                        "size": img.config.len(),
                    },
                    "layers": layer_descs,
                });
                let bytes = serde_json::to_vec(&m)
                    .map_err(|e| invalid(format!("manifest: cannot serialise: {e}")))?;
                (bytes, media::OCI_MANIFEST.to_string())
            }
        };
        let expected = img.manifest_digest();
        let manifest = self
            .stage_blob(&mut manifest_bytes.as_slice(), expected.as_ref())
            .map_err(|e| invalid(format!("{}: manifest: {e}", img.source)))?;
        let manifest_digest = manifest.digest;
        let name = match name {
            Some(n) => n.to_string(),
            None => img
                .tag
                .clone()
                .unwrap_or_else(|| manifest_digest.to_string()),
        };
        check_name(&name)?;
        for l in &layers {
            let staged_path = staged
                .iter()
                .find(|s| s.digest == l.digest)
                .and_then(|s| s.path().map(Path::to_path_buf));
            let path = staged_path.unwrap_or_else(|| self.blob_path(&l.digest));
            check(l, &path)?;
        }
        let mut ix = self.read_index()?;

        for s in staged {
            self.commit_blob(s)?;
        }
        self.commit_blob(config)?;
        self.commit_blob(manifest)?;

        ix.manifests.retain(|e| e.name() != Some(name.as_str()));
        ix.manifests.push(IndexEntry {
            media_type: manifest_type,
            digest: manifest_digest.to_string(),
            size: manifest_bytes.len() as u64,
            annotations: Some(BTreeMap::from([(REF_NAME.to_string(), name.clone())])),
            extra: BTreeMap::new(),
        });
        self.write_index(&ix)?;
        Ok(ImportedImage {
            name,
            manifest_digest,
            config_digest: img.config_digest,
            layers,
        })
    }
}
