//! Image source strings (`docker-archive:PATH[:TAG]`, `oci:DIR[:TAG|@DIGEST]`,
//! `oci-archive:PATH[:TAG|@DIGEST]`) and platform strings (`os/arch[/variant]`), parsed into
//! typed values with one clear error per mistake.
//!
//! Splitting rule (the same as skopeo's, plus an escape):
//! 1. The transport is everything before the first `:`.
//! 2. In the rest, `\:` stands for a literal `:` and `\\` for a backslash, so a PATH that
//!    contains a colon is written with `\:`. No other escape exists.
//! 3. If the last `@` in the rest is followed by letters/digits and an unescaped `:`
//!    (`@ALG:VALUE`), that is a digest reference: it must parse as a sha256 `Digest`, and only
//!    `oci` and `oci-archive` take one. (A path containing `@x:` writes that colon as `\:`.)
//! 4. Otherwise PATH ends at the first unescaped `:`; everything after it is the TAG, which
//!    may itself contain `:` (`docker-archive:app.tar:busybox:latest`).
//!
//! Invariants: PATH and TAG are never empty; a digest reference is a parsed `Digest`.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::store::Digest;

/// Which image inside a source to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// The only image, or index 0 of a docker-archive, or the platform pick of an index.
    Default,
    /// A tag: an `org.opencontainers.image.ref.name` annotation, or a docker `RepoTags` entry.
    Tag(String),
    /// A manifest digest.
    Digest(Digest),
}

/// A parsed image source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A `docker save` tarball (legacy layout or OCI layout inside). Only `Default` or `Tag`.
    DockerArchive { path: PathBuf, reference: ImageRef },
    /// An OCI image layout directory.
    Oci { dir: PathBuf, reference: ImageRef },
    /// An OCI image layout inside a tar file.
    OciArchive { path: PathBuf, reference: ImageRef },
}

impl ImageSource {
    /// Parses a source string; see the module doc for the splitting rule.
    pub fn parse(text: &str) -> io::Result<ImageSource> {
        let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let Some((transport, rest)) = text.split_once(':') else {
            return Err(bad(format!(
                "image source {text:?}: expected TRANSPORT:PATH with TRANSPORT one of \
                 docker-archive, oci, oci-archive"
            )));
        };
        let takes_digest = match transport {
            "docker-archive" => false,
            "oci" | "oci-archive" => true,
            _ => {
                return Err(bad(format!(
                    "image source {text:?}: unknown transport {transport:?} (expected \
                     docker-archive, oci or oci-archive)"
                )));
            }
        };
        // Unescape into (char, escaped) pairs so splitting sees only unescaped colons.
        let mut chars: Vec<(char, bool)> = Vec::with_capacity(rest.len());
        let mut it = rest.chars();
        while let Some(c) = it.next() {
            if c == '\\' {
                match it.next() {
                    Some(n @ (':' | '\\')) => chars.push((n, true)),
                    _ => {
                        return Err(bad(format!(
                            "image source {text:?}: a backslash may only escape ':' or '\\'"
                        )));
                    }
                }
            } else {
                chars.push((c, false));
            }
        }
        let collect = |s: &[(char, bool)]| s.iter().map(|&(c, _)| c).collect::<String>();

        let mut path_part: &[(char, bool)] = &chars;
        let mut reference = ImageRef::Default;
        if let Some(at) = digest_suffix(&chars) {
            if !takes_digest {
                return Err(bad(format!(
                    "image source {text:?}: docker-archive takes a tag, not a @digest"
                )));
            }
            let d = collect(&chars[at + 1..]);
            let digest = d
                .parse::<Digest>()
                .map_err(|e| bad(format!("image source {text:?}: {e}")))?;
            reference = ImageRef::Digest(digest);
            path_part = &chars[..at];
        } else if let Some(colon) = chars.iter().position(|&(c, esc)| c == ':' && !esc) {
            let tag = collect(&chars[colon + 1..]);
            if tag.is_empty() {
                return Err(bad(format!(
                    "image source {text:?}: empty tag after ':' (omit the ':' to take the default image)"
                )));
            }
            if tag.chars().any(char::is_control) {
                return Err(bad(format!(
                    "image source {text:?}: tag contains a control character"
                )));
            }
            reference = ImageRef::Tag(tag);
            path_part = &chars[..colon];
        }
        let path = collect(path_part);
        if path.is_empty() {
            return Err(bad(format!("image source {text:?}: empty path")));
        }
        let path = PathBuf::from(path);
        Ok(match transport {
            "docker-archive" => ImageSource::DockerArchive { path, reference },
            "oci" => ImageSource::Oci {
                dir: path,
                reference,
            },
            _ => ImageSource::OciArchive { path, reference },
        })
    }

    pub fn reference(&self) -> &ImageRef {
        match self {
            ImageSource::DockerArchive { reference, .. }
            | ImageSource::Oci { reference, .. }
            | ImageSource::OciArchive { reference, .. } => reference,
        }
    }
}

/// Position of the `@` of a trailing `@ALG:VALUE`, if the text ends in one.
fn digest_suffix(chars: &[(char, bool)]) -> Option<usize> {
    let at = chars.iter().rposition(|&(c, esc)| c == '@' && !esc)?;
    let tail = &chars[at + 1..];
    let colon = tail.iter().position(|&(c, esc)| c == ':' && !esc)?;
    let alg = &tail[..colon];
    let alg_ok = !alg.is_empty()
        && alg
            .iter()
            .all(|&(c, esc)| !esc && c.is_ascii_alphanumeric());
    alg_ok.then_some(at)
}

/// The source as it would be written on the command line: [`ImageSource::parse`] of the
/// text gives the same source back.
impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (t, p, r) = match self {
            ImageSource::DockerArchive { path, reference } => ("docker-archive", path, reference),
            ImageSource::Oci { dir, reference } => ("oci", dir, reference),
            ImageSource::OciArchive { path, reference } => ("oci-archive", path, reference),
        };
        let p = p
            .to_string_lossy()
            .replace('\\', "\\\\")
            .replace(':', "\\:");
        match r {
            ImageRef::Default => write!(f, "{t}:{p}"),
            ImageRef::Tag(tag) => {
                // A tag's backslashes are escaped too, and so are its colons when it holds
                // an `@` (`@ALG:VALUE` would read as a digest reference).
                let mut tag = tag.replace('\\', "\\\\");
                if tag.contains('@') {
                    tag = tag.replace(':', "\\:");
                }
                write!(f, "{t}:{p}:{tag}")
            }
            ImageRef::Digest(d) => write!(f, "{t}:{p}@{d}"),
        }
    }
}

/// A platform as OCI names it (`os`, `architecture`, optional `variant`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// `os/arch[/variant]`, each part non-empty, e.g. `linux/arm64/v8` (a `--platform` flag).
    pub fn parse(text: &str) -> io::Result<Platform> {
        let parts: Vec<&str> = text.split('/').collect();
        let ok = (2..=3).contains(&parts.len()) && parts.iter().all(|p| !p.is_empty());
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("platform {text:?}: expected os/arch[/variant], e.g. linux/arm64/v8"),
            ));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }

    /// This machine: linux and `std::env::consts::ARCH` in OCI (Go `GOARCH`) spelling.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            "mips64" => "mips64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: "linux".to_string(),
            architecture: arch.to_string(),
            variant: None,
        }
    }

    /// Whether an image for `other` runs here: os and architecture equal, and the variant
    /// equal when this platform names one (arm64 without a variant counts as `v8`).
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        let norm = |p: &Platform| match (&p.variant, p.architecture.as_str()) {
            (None, "arm64") => Some("v8".to_string()),
            (v, _) => v.clone(),
        };
        self.variant.is_none() || norm(self) == norm(other)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn p(s: &str) -> ImageSource {
        ImageSource::parse(s).unwrap()
    }

    fn err(s: &str) -> String {
        ImageSource::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn splits_path_tag_and_digest() {
        assert_eq!(
            p("docker-archive:app.tar"),
            ImageSource::DockerArchive {
                path: "app.tar".into(),
                reference: ImageRef::Default
            }
        );
        assert_eq!(
            p("docker-archive:/x/app.tar:busybox:latest"),
            ImageSource::DockerArchive {
                path: "/x/app.tar".into(),
                reference: ImageRef::Tag("busybox:latest".into())
            }
        );
        assert_eq!(
            p("oci:/l/lay\\:out:v1"),
            ImageSource::Oci {
                dir: "/l/lay:out".into(),
                reference: ImageRef::Tag("v1".into())
            }
        );
        assert_eq!(
            p(&format!("oci-archive:/a@b/c.tar@{D}")),
            ImageSource::OciArchive {
                path: "/a@b/c.tar".into(),
                reference: ImageRef::Digest(D.parse().unwrap())
            }
        );
        // An '@' in a path without a digest after it is part of the path.
        assert_eq!(
            p("oci:/a@b/dir"),
            ImageSource::Oci {
                dir: "/a@b/dir".into(),
                reference: ImageRef::Default
            }
        );
        for s in [
            "docker-archive:/x/app.tar:busybox:latest",
            "oci:/l/lay\\:out:v1",
            &format!("oci:/d@{D}"),
        ] {
            assert_eq!(p(&p(s).to_string()), p(s), "{s}");
        }
    }

    #[test]
    fn one_error_per_mistake() {
        assert!(err("app.tar").contains("expected TRANSPORT:PATH"));
        assert!(err("docker:app").contains("unknown transport \"docker\""));
        assert!(err("oci:").contains("empty path"));
        assert!(err("oci::v1").contains("empty path"));
        assert!(err("oci:/d:").contains("empty tag"));
        assert!(err("oci:/d@sha256:../../x").contains("\"sha256:../../x\""));
        assert!(err(&format!("docker-archive:/a.tar@{D}")).contains("not a @digest"));
        assert!(err("oci:/d\\x").contains("backslash"));
    }

    #[test]
    fn platforms() {
        let pl = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(pl.to_string(), "linux/arm64/v8");
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//v7").is_err());
        assert!(Platform::parse("a/b/c/d").is_err());
        let arm64 = Platform::parse("linux/arm64").unwrap();
        assert!(pl.matches(&arm64));
        assert!(arm64.matches(&pl));
        assert!(!pl.matches(&Platform::parse("linux/arm64/v9").unwrap()));
        assert!(!pl.matches(&Platform::parse("linux/amd64").unwrap()));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(Platform::host().to_string(), "linux/amd64");
        }
    }
}
