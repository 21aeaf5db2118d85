//! Image sources → resolved images: which manifest, which config, which layer blobs in
//! which order (DESIGN section 4 "Sources").
//!
//! [`resolve`] reads a [`ImageSource`] (`docker-archive:`, `oci:`, `oci-archive:`) and returns
//! a [`ResolvedImage`]: the manifest (when the source has one), the config, and one
//! [`LayerDesc`] per layer, base first (image order, the reverse of overlayfs' TOP-first
//! order), each with a [`BlobRef`] to read its bytes in place.
//!
//! Invariants:
//! - Every digest taken from an image is parsed into a `Digest` before it names a file;
//!   archive member names are looked up in the archive's own table, never joined to a path.
//! - Every manifest, index and config named by digest is verified (size and sha256) before
//!   it is parsed; layers are verified when they are copied (store) or indexed.
//! - The number of layers equals the number of `rootfs.diff_ids` in the config.
//! - Errors are one line naming the source and the thing at fault.

pub mod archive;
pub mod blob;
pub mod docker;
pub mod oci;
pub mod source;

use std::io;

use serde::Deserialize;

use crate::store::{Compression, Digest};

pub use blob::{BlobReader, BlobRef};
pub use source::{ImageRef, ImageSource, Platform};

/// Media types we read and write.
pub mod media {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const OCI_LAYER_ND: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    pub const OCI_LAYER_ND_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    pub const OCI_LAYER_ND_ZSTD: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";
    pub const DOCKER_FOREIGN_GZIP: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

    use crate::store::Compression;

    /// The compression a layer media type states; `None` for a type that is not a layer.
    pub fn layer_compression(media_type: &str) -> Option<Compression> {
        match media_type {
            OCI_LAYER | OCI_LAYER_ND | DOCKER_LAYER => Some(Compression::None),
            OCI_LAYER_GZIP | OCI_LAYER_ND_GZIP | DOCKER_LAYER_GZIP | DOCKER_FOREIGN_GZIP => {
                Some(Compression::Gzip)
            }
            OCI_LAYER_ZSTD | OCI_LAYER_ND_ZSTD | DOCKER_LAYER_ZSTD => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The OCI layer media type for a compression (what the store writes).
    pub fn oci_layer(c: Compression) -> &'static str {
        match c {
            Compression::None => OCI_LAYER,
            Compression::Gzip => OCI_LAYER_GZIP,
            Compression::Zstd => OCI_LAYER_ZSTD,
        }
    }
}

/// The manifest as the source stores it (kept byte for byte so its digest survives import).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// One layer, in image order (base first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    /// Digest of the blob as stored (compressed); `None` for a legacy docker-archive layer,
    /// which is known only once hashed.
    pub digest: Option<Digest>,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: Digest,
    pub compression: Compression,
    /// The media type the manifest gave (`None` in a docker-archive).
    pub media_type: Option<String>,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Where the blob's bytes are.
    pub source: BlobRef,
}

/// An image picked out of a source, ready to import or mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The source, as text, for messages.
    pub source: String,
    /// The tag the image was picked by or carries in the source (`RepoTags[0]`, a
    /// `ref.name` annotation), used as the default name on import.
    pub tag: Option<String>,
    /// The manifest, when the source has one (`None` for docker-archive).
    pub manifest: Option<SourceManifest>,
    pub config_digest: Digest,
    /// The config's media type (`None` in a docker-archive).
    pub config_media_type: Option<String>,
    pub config: Vec<u8>,
    pub layers: Vec<LayerDesc>,
}

impl ResolvedImage {
    pub fn manifest_digest(&self) -> Option<Digest> {
        self.manifest.as_ref().map(|m| m.digest)
    }
}

/// Reads `source` and picks the image it names. `platform` chooses among the manifests of an
/// image index (default: [`Platform::host`]).
pub fn resolve(source: &ImageSource, platform: Option<&Platform>) -> io::Result<ResolvedImage> {
    let host = Platform::host();
    let platform = platform.unwrap_or(&host);
    let mut img = match source {
        ImageSource::DockerArchive { path, reference } => docker::resolve(path, reference)?,
        ImageSource::Oci { dir, reference } => {
            oci::resolve(&oci::Layout::Dir(dir.clone()), reference, platform)?
        }
        ImageSource::OciArchive { path, reference } => {
            let ar = archive::Archive::open(path)?;
            oci::resolve(&oci::Layout::Archive(ar), reference, platform)?
        }
    };
    img.source = source.to_string();
    Ok(img)
}

pub(crate) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[derive(Deserialize)]
struct ConfigJson {
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// `rootfs.diff_ids` of a config, parsed; `what` names the config in errors.
pub(crate) fn diff_ids(config: &[u8], what: &str) -> io::Result<Vec<Digest>> {
    let c: ConfigJson = serde_json::from_slice(config)
        .map_err(|e| invalid(format!("{what}: not a valid image config: {e}")))?;
    let Some(rootfs) = c.rootfs else {
        return Err(invalid(format!(
            "{what}: image config has no rootfs.diff_ids"
        )));
    };
    rootfs
        .diff_ids
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<Digest>()
                .map_err(|e| invalid(format!("{what}: rootfs.diff_ids[{i}]: {e}")))
        })
        .collect()
}

/// The error for a layer list and a diff_id list of different lengths.
pub(crate) fn count_mismatch(what: &str, layers: usize, diff_ids: usize) -> io::Error {
    invalid(format!(
        "{what}: {layers} layers but the config lists {diff_ids} rootfs.diff_ids"
    ))
}
