//! OCI image layouts (a directory, or the same files inside a tar): `oci-layout`,
//! `index.json`, `blobs/sha256/<hex>`; image indexes (OCI and Docker manifest lists) and
//! image manifests (OCI and Docker v2 schema 2).
//!
//! Picking the manifest from `index.json`: a tag matches the
//! `org.opencontainers.image.ref.name` annotation; `@sha256:..` matches a descriptor's digest
//! (or names any manifest blob in the layout); with neither, the only entry is taken, or, when
//! every entry carries a platform, the platform pick. An index met on the way (nested, or a
//! manifest list) is resolved by platform, at most [`MAX_DEPTH`] levels deep.
//!
//! Invariants: blob paths are built only from parsed `Digest`s; every index, manifest and
//! config is checked against its descriptor's size and digest before it is parsed; a media
//! type we do not know is an error naming it.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;

use serde::Deserialize;

use super::archive::Archive;
use super::blob::{BlobRef, verify_bytes};
use super::source::{ImageRef, Platform};
use super::{LayerDesc, ResolvedImage, SourceManifest, count_mismatch, diff_ids, invalid, media};
use crate::store::Digest;

/// How many indexes deep a manifest may sit below `index.json`.
pub const MAX_DEPTH: usize = 4;

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where the layout's files are.
#[derive(Debug)]
pub enum Layout {
    Dir(PathBuf),
    Archive(Archive),
}

impl Layout {
    fn describe(&self) -> String {
        match self {
            Layout::Dir(d) => d.display().to_string(),
            Layout::Archive(a) => a.path().display().to_string(),
        }
    }

    /// A top-level file (`oci-layout`, `index.json`), if present.
    fn file(&self, name: &str) -> io::Result<Option<BlobRef>> {
        match self {
            Layout::Dir(d) => {
                let p = d.join(name);
                match BlobRef::whole_file(&p) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Layout::Archive(a) => a.find(name),
        }
    }

    /// `blobs/sha256/<hex>`, if present.
    pub fn blob(&self, d: &Digest) -> io::Result<Option<BlobRef>> {
        let rel = PathBuf::from("blobs").join(d.rel_path());
        self.file(&rel.to_string_lossy())
    }
}

#[derive(Deserialize, Debug, Clone)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
    #[serde(default)]
    platform: Option<PlatformJson>,
}

impl Descriptor {
    fn ref_name(&self) -> Option<&str> {
        self.annotations.as_ref()?.get(REF_NAME).map(String::as_str)
    }
}

#[derive(Deserialize, Debug, Clone)]
struct PlatformJson {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl PlatformJson {
    fn to_platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
        }
    }
}

#[derive(Deserialize)]
struct IndexJson {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ManifestJson {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct LayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: String,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    config: Option<serde_json::Value>,
}

/// Checks `oci-layout`; reads and parses `index.json` (`which` names the layout in errors).
fn read_top(layout: &Layout, which: &str) -> io::Result<IndexJson> {
    let Some(lf) = layout.file("oci-layout")? else {
        if let Layout::Dir(d) = layout
            && !d.is_dir()
        {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{which}: no such directory"),
            ));
        }
        return Err(invalid(format!(
            "{which}: missing oci-layout (not an OCI image layout)"
        )));
    };
    let bytes = lf.read_json_bytes(&format!("{which}: oci-layout"))?;
    let l: LayoutFile =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{which}: oci-layout: {e}")))?;
    if l.image_layout_version.split('.').next() != Some("1") {
        return Err(invalid(format!(
            "{which}: oci-layout: unsupported imageLayoutVersion {:?} (expected 1.x)",
            l.image_layout_version
        )));
    }
    let Some(ix) = layout.file("index.json")? else {
        return Err(invalid(format!("{which}: missing index.json")));
    };
    let bytes = ix.read_json_bytes(&format!("{which}: index.json"))?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{which}: index.json: {e}")))
}

fn parse_digest(s: &str, what: &str) -> io::Result<Digest> {
    s.parse::<Digest>()
        .map_err(|e| invalid(format!("{what}: {e}")))
}

fn tags_of(list: &[Descriptor]) -> String {
    let tags: Vec<&str> = list.iter().filter_map(Descriptor::ref_name).collect();
    if tags.is_empty() {
        "none".to_string()
    } else {
        tags.join(", ")
    }
}

/// The names a layout's `index.json` gives, with their manifest digests.
pub fn list_refs(layout: &Layout) -> io::Result<Vec<(String, Digest)>> {
    let which = layout.describe();
    let top = read_top(layout, &which)?;
    let mut out = Vec::new();
    for d in &top.manifests {
        if let Some(name) = d.ref_name() {
            out.push((
                name.to_string(),
                parse_digest(&d.digest, &format!("{which}: index.json: {name:?}"))?,
            ));
        }
    }
    Ok(out)
}

/// Picks the image `reference` names in `layout`; see the module doc.
pub fn resolve(
    layout: &Layout,
    reference: &ImageRef,
    platform: &Platform,
) -> io::Result<ResolvedImage> {
    let which = layout.describe();
    let top = read_top(layout, &which)?;
    let list = &top.manifests;
    let (desc, tag) = match reference {
        ImageRef::Tag(t) => {
            let Some(d) = list.iter().find(|d| d.ref_name() == Some(t.as_str())) else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{which}: no image tagged {t:?} in index.json (tags: {})",
                        tags_of(list)
                    ),
                ));
            };
            (d.clone(), Some(t.clone()))
        }
        ImageRef::Digest(want) => {
            let found = list.iter().find(|d| d.digest == want.to_string());
            match found {
                Some(d) => (d.clone(), d.ref_name().map(str::to_string)),
                None => {
                    let Some(b) = layout.blob(want)? else {
                        return Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{which}: no manifest {want} in index.json or blobs/"),
                        ));
                    };
                    let d = Descriptor {
                        media_type: None,
                        digest: want.to_string(),
                        size: b.len,
                        annotations: None,
                        platform: None,
                    };
                    (d, None)
                }
            }
        }
        ImageRef::Default => match list.len() {
            0 => return Err(invalid(format!("{which}: index.json lists no manifests"))),
            1 => (list[0].clone(), list[0].ref_name().map(str::to_string)),
            _ if list.iter().all(|d| d.platform.is_some()) => {
                let d = pick_platform(list, platform, &format!("{which}: index.json"))?;
                (d.clone(), d.ref_name().map(str::to_string))
            }
            n => {
                return Err(invalid(format!(
                    "{which}: index.json lists {n} manifests; name one with :TAG or @DIGEST \
                     (tags: {})",
                    tags_of(list)
                )));
            }
        },
    };
    let mut img = descend(layout, &which, &desc, platform, 0)?;
    img.tag = tag;
    Ok(img)
}

fn pick_platform<'a>(
    list: &'a [Descriptor],
    want: &Platform,
    what: &str,
) -> io::Result<&'a Descriptor> {
    if let Some(d) = list.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| want.matches(&p.to_platform()))
    }) {
        return Ok(d);
    }
    let have: Vec<String> = list
        .iter()
        .map(|d| match &d.platform {
            Some(p) => p.to_platform().to_string(),
            None => "(no platform)".to_string(),
        })
        .collect();
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{what}: no manifest for platform {want} (available: {})",
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        ),
    ))
}

/// Fetches a blob a descriptor names, verified against its size and digest.
fn fetch(
    layout: &Layout,
    which: &str,
    digest: &Digest,
    size: u64,
    what: &str,
) -> io::Result<Vec<u8>> {
    let Some(b) = layout.blob(digest)? else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{which}: {what} {digest} is missing (no blobs/sha256/{})",
                digest.hex()
            ),
        ));
    };
    let label = format!("{which}: {what} {digest}");
    if b.len != size {
        return Err(invalid(format!(
            "{label}: blob is {} bytes but the descriptor says {size}",
            b.len
        )));
    }
    let bytes = b.read_json_bytes(&label)?;
    verify_bytes(&bytes, digest, Some(size), &label)?;
    Ok(bytes)
}

fn descend(
    layout: &Layout,
    which: &str,
    desc: &Descriptor,
    platform: &Platform,
    depth: usize,
) -> io::Result<ResolvedImage> {
    let digest = parse_digest(
        &desc.digest,
        &format!("{which}: manifest descriptor digest"),
    )?;
    if depth > MAX_DEPTH {
        return Err(invalid(format!(
            "{which}: manifest {digest}: indexes nested more than {MAX_DEPTH} deep"
        )));
    }
    let bytes = fetch(layout, which, &digest, desc.size, "manifest")?;
    let probe: Probe = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("{which}: manifest {digest}: {e}")))?;
    let media_type = match (&desc.media_type, &probe.media_type) {
        (Some(m), _) | (None, Some(m)) => m.clone(),
        (None, None) if probe.manifests.is_some() => media::OCI_INDEX.to_string(),
        (None, None) if probe.config.is_some() => media::OCI_MANIFEST.to_string(),
        (None, None) => {
            return Err(invalid(format!(
                "{which}: manifest {digest}: no mediaType and neither manifests nor config"
            )));
        }
    };
    match media_type.as_str() {
        media::OCI_INDEX | media::DOCKER_LIST => {
            let ix: IndexJson = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("{which}: index {digest}: {e}")))?;
            let child =
                pick_platform(&ix.manifests, platform, &format!("{which}: index {digest}"))?;
            descend(layout, which, child, platform, depth + 1)
        }
        media::OCI_MANIFEST | media::DOCKER_MANIFEST => {
            manifest(layout, which, digest, media_type, bytes)
        }
        other => Err(invalid(format!(
            "{which}: manifest {digest}: unknown media type {other:?}"
        ))),
    }
}

fn manifest(
    layout: &Layout,
    which: &str,
    digest: Digest,
    media_type: String,
    bytes: Vec<u8>,
) -> io::Result<ResolvedImage> {
    let label = format!("{which}: manifest {digest}");
    let m: ManifestJson =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{label}: {e}")))?;
    let config_digest = parse_digest(&m.config.digest, &format!("{label}: config digest"))?;
    if let Some(mt) = &m.config.media_type
        && mt != media::OCI_CONFIG
        && mt != media::DOCKER_CONFIG
    {
        return Err(invalid(format!(
            "{label}: config {config_digest}: unknown media type {mt:?}"
        )));
    }
    let config = fetch(layout, which, &config_digest, m.config.size, "config")?;
    let ids = diff_ids(&config, &format!("{which}: config {config_digest}"))?;
    if ids.len() != m.layers.len() {
        return Err(count_mismatch(&label, m.layers.len(), ids.len()));
    }
    let mut layers = Vec::with_capacity(m.layers.len());
    for (i, (l, diff_id)) in m.layers.iter().zip(ids).enumerate() {
        let ld = parse_digest(&l.digest, &format!("{label}: layers[{i}] digest"))?;
        let mt = l.media_type.as_deref().unwrap_or("");
        let Some(compression) = media::layer_compression(mt) else {
            return Err(invalid(format!(
                "{label}: layer {ld}: unknown media type {mt:?}"
            )));
        };
        let Some(source) = layout.blob(&ld)? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{which}: layer {ld} is missing (no blobs/sha256/{})",
                    ld.hex()
                ),
            ));
        };
        if source.len != l.size {
            return Err(invalid(format!(
                "{which}: layer {ld}: blob is {} bytes but the manifest says {}",
                source.len, l.size
            )));
        }
        layers.push(LayerDesc {
            digest: Some(ld),
            diff_id,
            compression,
            media_type: Some(mt.to_string()),
            size: l.size,
            source,
        });
    }
    Ok(ResolvedImage {
        source: which.to_string(),
        tag: None,
        manifest: Some(SourceManifest {
            digest,
            media_type,
            bytes,
        }),
        config_digest,
        config_media_type: m.config.media_type.clone(),
        config,
        layers,
    })
}
