//! `docker save` tarballs (`docker-archive:PATH[:TAG]`), in every shape docker writes:
//! - legacy: `manifest.json` (`Config: "<hex>.json"`, `RepoTags`, `Layers:
//!   ["<id>/layer.tar", ..]`), where a layer repeated in the image may be a symlink or hard
//!   link inside the tar to another `<id>/layer.tar`;
//! - docker 25+: an OCI layout inside the tar and `manifest.json` beside it whose `Config`
//!   and `Layers` are `blobs/sha256/<hex>`;
//! - either with gzip- or zstd-compressed layer blobs (no media types here, so the
//!   compression is sniffed from the first bytes).
//!
//! The image is `manifest.json`'s entry 0 unless a TAG is given, which must equal one of an
//! entry's `RepoTags` after docker's normalisation (`busybox` matches
//! `docker.io/library/busybox:latest`, `example/app:v1` matches `docker.io/example/app:v1`).
//!
//! Invariants: member names from `manifest.json` are only looked up in the archive's member
//! table (links followed inside the archive only); a config or layer named
//! `blobs/sha256/<hex>` or `<hex>.json` gets that digest, and the config is verified
//! against it. A legacy layer's blob digest is unknown here (`LayerDesc::digest` is `None`).

use std::io;
use std::path::Path;

use serde::Deserialize;

use super::archive::Archive;
use super::blob::{sha256_of, verify_bytes};
use super::source::ImageRef;
use super::{LayerDesc, ResolvedImage, count_mismatch, diff_ids, invalid};
use crate::store::{Compression, Digest};

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

/// The digest a member name states: `blobs/sha256/<hex>` or `<hex>.json` / `<hex>`.
fn digest_in_name(name: &str) -> Option<Digest> {
    let name = name.trim_start_matches("./");
    if let Some(hex) = name.strip_prefix("blobs/sha256/") {
        return Digest::parse_hex(hex).ok();
    }
    Digest::parse_hex(name.strip_suffix(".json").unwrap_or(name)).ok()
}

/// A docker reference in its full form, as docker compares them: `busybox` →
/// `docker.io/library/busybox:latest`, `example/app:v1` → `docker.io/example/app:v1`.
fn normalise_ref(r: &str) -> String {
    let (first, rest) = match r.split_once('/') {
        Some((f, rest)) if f.contains('.') || f.contains(':') || f == "localhost" => {
            (f.to_string(), rest.to_string())
        }
        _ => ("docker.io".to_string(), r.to_string()),
    };
    let rest = if first == "docker.io" && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest
    };
    let last = rest.rsplit('/').next().unwrap_or("");
    if last.contains(':') || last.contains('@') {
        format!("{first}/{rest}")
    } else {
        format!("{first}/{rest}:latest")
    }
}

pub fn resolve(path: &Path, reference: &ImageRef) -> io::Result<ResolvedImage> {
    let ar = Archive::open(path)?;
    let which = path.display().to_string();
    let Some(mf) = ar.find("manifest.json")? else {
        let hint = if ar.contains("index.json") {
            " (it holds an OCI layout: use oci-archive:)"
        } else {
            ""
        };
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{which}: missing manifest.json, not a docker-archive{hint}"),
        ));
    };
    let bytes = mf.read_json_bytes(&format!("{which}: manifest.json"))?;
    let entries: Vec<Entry> = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("{which}: manifest.json: {e}")))?;
    let (entry, tag) = match reference {
        ImageRef::Default => {
            let Some(e) = entries.first() else {
                return Err(invalid(format!("{which}: manifest.json lists no images")));
            };
            let tag = e.repo_tags.as_ref().and_then(|t| t.first()).cloned();
            (e, tag)
        }
        ImageRef::Tag(t) => {
            let want = normalise_ref(t);
            let hit = entries.iter().find(|e| {
                e.repo_tags
                    .iter()
                    .flatten()
                    .any(|r| r == t || normalise_ref(r) == want)
            });
            let Some(e) = hit else {
                let all: Vec<&str> = entries
                    .iter()
                    .flat_map(|e| e.repo_tags.iter().flatten())
                    .map(String::as_str)
                    .collect();
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{which}: no image tagged {t:?} in manifest.json (RepoTags: {})",
                        if all.is_empty() {
                            "none".to_string()
                        } else {
                            all.join(", ")
                        }
                    ),
                ));
            };
            (e, Some(t.clone()))
        }
        ImageRef::Digest(d) => {
            return Err(invalid(format!(
                "{which}: docker-archive images are picked by tag, not by digest {d}"
            )));
        }
    };

    let Some(cref) = ar.find(&entry.config)? else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{which}: manifest.json names config {:?}, which is not in the archive",
                entry.config
            ),
        ));
    };
    let label = format!("{which}: config {:?}", entry.config);
    let config = cref.read_json_bytes(&label)?;
    let config_digest = match digest_in_name(&entry.config) {
        Some(d) => {
            verify_bytes(&config, &d, None, &label)?;
            d
        }
        None => sha256_of(&config),
    };
    let ids = diff_ids(&config, &label)?;
    if ids.len() != entry.layers.len() {
        return Err(count_mismatch(
            &format!("{which}: manifest.json"),
            entry.layers.len(),
            ids.len(),
        ));
    }
    let mut layers = Vec::with_capacity(ids.len());
    for (name, diff_id) in entry.layers.iter().zip(ids) {
        let Some(source) = ar.find(name)? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{which}: manifest.json names layer {name:?}, which is not in the archive"),
            ));
        };
        let compression = Compression::sniff(&source.head(4)?);
        let digest = name
            .trim_start_matches("./")
            .starts_with("blobs/sha256/")
            .then(|| digest_in_name(name))
            .flatten();
        layers.push(LayerDesc {
            digest,
            diff_id,
            compression,
            media_type: None,
            size: source.len,
            source,
        });
    }
    Ok(ResolvedImage {
        source: which,
        tag,
        manifest: None,
        config_digest,
        config_media_type: None,
        config,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::normalise_ref;

    #[test]
    fn docker_references_normalise() {
        for (a, b) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1", "docker.io/library/busybox:1"),
            ("example/app:v1", "docker.io/example/app:v1"),
            ("docker.io/example/app:v1", "docker.io/example/app:v1"),
            ("quay.io/a/b", "quay.io/a/b:latest"),
            ("localhost:5000/x:2", "localhost:5000/x:2"),
            ("localhost/x", "localhost/x:latest"),
        ] {
            assert_eq!(normalise_ref(a), b, "{a}");
        }
    }
}
