//! The digest store (DESIGN section 4): blobs by sha256, layer indexes by layer digest,
//! file contents by sha256. Everything here is named by a parsed `Digest`, never by a string
//! from an image.

pub mod digest;
pub mod gc;
pub mod gzindex;
pub mod import;
pub mod indexlayer;
pub mod layerindex;
pub mod layout;
pub mod lease;
pub mod mount;
pub mod progress;
pub mod spans;
pub mod tarindex;

pub use digest::{Digest, DigestError};
pub use gc::{BadBlob, GcReport, LiveObjects, VerifyReport};
pub use import::{ImportedImage, ImportedLayer};
pub use layerindex::{Entry, ErrorKind, IndexError, Kind, LayerIndex, ReadAt};
pub use layout::{ImageEntry, StagedBlob, Store};
pub use tarindex::{LayerSource, Limits, index_layer};

/// How a layer blob is compressed, from its media type (or its magic bytes when the source
/// has no media types, as in a legacy docker-archive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From the first bytes of a blob: gzip (1f 8b), zstd (28 b5 2f fd), else plain tar.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}
