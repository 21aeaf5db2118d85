//! Content digests (`sha256:<64 lowercase hex>`), the names of everything in the store.
//!
//! Invariant: a `Digest` only exists after its text was parsed and checked, so its hex part is
//! always exactly 64 characters of `[0-9a-f]` and is safe to use as a file name. Other
//! algorithms are refused (the store and the images we read are sha256 only).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    bytes: [u8; 32],
}

/// Why a digest string was refused; the message quotes the (shortened) input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestError(pub String);

impl fmt::Display for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DigestError {}

fn shown(s: &str) -> String {
    let mut t: String = s.chars().take(80).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    format!("{t:?}")
}

impl Digest {
    pub fn from_bytes(bytes: [u8; 32]) -> Digest {
        Digest { bytes }
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// The 64 hex characters, without the algorithm.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.bytes {
            s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
        }
        s
    }

    /// `sha256/<hex>`: the digest as a relative path under `blobs/` or `index/`.
    pub fn rel_path(&self) -> PathBuf {
        PathBuf::from("sha256").join(self.hex())
    }

    /// Parses the 64-hex part alone (a file name in `blobs/sha256/`).
    pub fn parse_hex(hex: &str) -> Result<Digest, DigestError> {
        let b = hex.as_bytes();
        if b.len() != 64 {
            return Err(DigestError(format!(
                "digest {}: expected 64 hex characters after \"sha256:\", found {}",
                shown(hex),
                b.len()
            )));
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in b.chunks(2).enumerate() {
            let v = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            match (v(pair[0]), v(pair[1])) {
                (Some(h), Some(l)) => bytes[i] = h << 4 | l,
                _ => {
                    return Err(DigestError(format!(
                        "digest {}: only lowercase hex digits are allowed",
                        shown(hex)
                    )));
                }
            }
        }
        Ok(Digest { bytes })
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Accepts exactly `sha256:` followed by 64 lowercase hex digits.
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        match s.split_once(':') {
            Some(("sha256", hex)) => Digest::parse_hex(hex).map_err(|_| {
                DigestError(format!(
                    "digest {}: not sha256 followed by 64 lowercase hex digits",
                    shown(s)
                ))
            }),
            Some((alg, _)) if !alg.is_empty() && alg.bytes().all(|c| c.is_ascii_alphanumeric()) => {
                Err(DigestError(format!(
                    "digest {}: unsupported algorithm {alg:?} (only sha256)",
                    shown(s)
                )))
            }
            _ => Err(DigestError(format!(
                "digest {}: expected \"sha256:<64 hex digits>\"",
                shown(s)
            ))),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn round_trip() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.rel_path(), PathBuf::from("sha256").join(&EMPTY[7..]));
        assert_eq!(d.as_bytes()[0], 0xe3);
        assert_eq!(Digest::parse_hex(&EMPTY[7..]).unwrap(), d);
    }

    #[test]
    fn refuses_what_could_become_a_path() {
        for bad in [
            "sha256:../../x",
            "sha256:../../../../etc/passwd",
            "sha256:",
            "sha256",
            "",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85/",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8g5",
            "sha512:e3b0",
            "/sha256:e3b0",
        ] {
            let e = bad.parse::<Digest>().unwrap_err();
            assert!(e.0.starts_with("digest "), "{bad}: {e}");
        }
        let e = "sha512:abcd".parse::<Digest>().unwrap_err();
        assert!(e.0.contains("unsupported algorithm"), "{e}");
        assert!(Digest::parse_hex("../x").is_err());
    }
}
