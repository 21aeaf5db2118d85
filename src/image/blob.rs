//! Where a blob's bytes are: a whole file (a blob in an OCI layout directory) or a byte range
//! of a file (a member of a tar archive, which tar stores contiguously), and reading them.
//!
//! Invariants: a `BlobRef`'s range lies inside the file as it was when the ref was made (the
//! maker checked it); readers are bounded by `len`, so a hostile size field can never make us
//! read or allocate more than the range. JSON blobs are read whole only up to [`MAX_JSON`].

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::store::Digest;

/// Largest manifest, index or config we read into memory.
pub const MAX_JSON: u64 = 32 << 20;

/// The bytes of one blob: `len` bytes of `path` starting at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl BlobRef {
    /// A whole regular file.
    pub fn whole_file(path: &Path) -> io::Result<BlobRef> {
        let md = std::fs::metadata(path)?;
        if !md.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a regular file", path.display()),
            ));
        }
        Ok(BlobRef {
            path: path.to_path_buf(),
            offset: 0,
            len: md.len(),
        })
    }

    /// A reader over exactly the blob's bytes; it reports `UnexpectedEof` if the file became
    /// shorter than the range.
    pub fn open(&self) -> io::Result<BlobReader> {
        let mut f = File::open(&self.path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        f.seek(SeekFrom::Start(self.offset))?;
        Ok(BlobReader {
            inner: f.take(self.len),
            left: self.len,
            what: self.describe(),
        })
    }

    /// Reads the whole blob (at most `MAX_JSON` bytes); `what` names it in errors.
    pub fn read_json_bytes(&self, what: &str) -> io::Result<Vec<u8>> {
        if self.len > MAX_JSON {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{what} is {} bytes, more than the {} MiB limit for JSON documents",
                    self.len,
                    MAX_JSON >> 20
                ),
            ));
        }
        let mut buf = Vec::with_capacity(self.len as usize);
        self.open()?.read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// First bytes of the blob, for `Compression::sniff`.
    pub fn head(&self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(n);
        self.open()?.take(n as u64).read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn describe(&self) -> String {
        if self.offset == 0 {
            self.path.display().to_string()
        } else {
            format!(
                "{} (bytes {}..{})",
                self.path.display(),
                self.offset,
                self.offset + self.len
            )
        }
    }
}

/// Reader returned by [`BlobRef::open`].
pub struct BlobReader {
    inner: io::Take<File>,
    left: u64,
    what: String,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: truncated, {} bytes missing", self.what, self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// sha256 of a byte string.
pub fn sha256_of(bytes: &[u8]) -> Digest {
    Digest::from_bytes(Sha256::digest(bytes).into())
}

/// sha256 of everything `r` yields, streamed.
pub fn sha256_of_reader(mut r: impl Read) -> io::Result<Digest> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
    Ok(Digest::from_bytes(h.finalize().into()))
}

/// Checks `bytes` against the digest and size a descriptor names; `what` names the blob.
pub fn verify_bytes(
    bytes: &[u8],
    digest: &Digest,
    size: Option<u64>,
    what: &str,
) -> io::Result<()> {
    if let Some(size) = size
        && size != bytes.len() as u64
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what}: size {} does not match the descriptor's size {size}",
                bytes.len()
            ),
        ));
    }
    let actual = sha256_of(bytes);
    if actual != *digest {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: content digest is {actual}, expected {digest}"),
        ));
    }
    Ok(())
}
