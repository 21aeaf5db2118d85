//! Opening an image as union layers: resolve the image (from a source or from the store),
//! import what the store lacks, and load each layer's index (indexing the blob once, on
//! first use, with the digest and DiffID checks). After the first mount of any image sharing
//! a layer, mounting reads only manifests, configs and cached indexes.

use std::sync::Arc;

use super::indexlayer::{BlobAt, IndexLayer};
use super::layerindex::{AtCursor, FileRange, IndexError, LayerIndex};
use super::progress::{Progress, short};
use super::tarindex::{LayerSource, Limits, index_layer, index_unnamed_layer};
use super::{Compression, Digest, Store};
use crate::image::{self, ImageSource, Platform};
use crate::layer::Layer;

/// One layer of an image: what is needed to index and serve it.
#[derive(Debug, Clone)]
pub struct StoredLayer {
    pub digest: Digest,
    pub diff_id: Digest,
    pub compression: Compression,
    pub size: u64,
}

/// One layer of an image to mount: what it is, where its blob is, and its index if it had
/// to be built now (its cache file is written once every layer has been indexed).
pub struct MountLayer {
    pub layer: StoredLayer,
    pub blob: BlobAt,
    pub index: LayerIndex,
}

/// `spec` is an image source (`docker-archive:`, `oci:`, `oci-archive:`), mounted in place:
/// its blobs are read where they are (inside the archive), nothing is copied, and only the
/// layer indexes are cached in the store. Or it is the name (tag or manifest digest) of an
/// image in the store. Layers come base first.
pub fn image_layers(
    store: &Store,
    spec: &str,
    platform: Option<&Platform>,
) -> Result<Vec<MountLayer>, String> {
    let is_source = ["docker-archive:", "oci:", "oci-archive:"]
        .iter()
        .any(|p| spec.starts_with(p));
    let img = if is_source {
        let src = ImageSource::parse(spec).map_err(|e| e.to_string())?;
        image::resolve(&src, platform).map_err(|e| e.to_string())?
    } else {
        store.resolve(spec, platform).map_err(|e| e.to_string())?
    };
    // What each layer needs: its cached index, or an indexing pass. The passes run in
    // parallel (one per core): a first mount waits for the largest layer, not for all.
    enum Plan<'a> {
        Ready(Box<MountLayer>, bool),
        Index {
            blob: BlobAt,
            layer: StoredLayer,
            /// A compressed member of a legacy docker-archive that nothing names: its
            /// digest is learnt by the pass, then remembered (`known_member_digest`).
            unnamed: Option<&'a image::BlobRef>,
        },
    }
    let at_member =
        |l: &image::BlobRef, e: String| format!("{}: layer {}: {e}", img.source, l.path.display());
    let mut plans = Vec::with_capacity(img.layers.len());
    for l in &img.layers {
        let blob = BlobAt {
            path: l.source.path.clone(),
            offset: l.source.offset,
            len: l.source.len,
        };
        // A plain layer's digest is its DiffID. A compressed layer of a legacy
        // docker-archive has none (the DiffID, checked by indexing, is what vouches for
        // it): a second mount finds it remembered, the first learns it from its pass.
        let digest = match (l.digest, l.compression) {
            (Some(d), _) => d,
            (None, Compression::None) => l.diff_id,
            (None, _) => match known_member_digest(store, &l.source)
                .map_err(|e| at_member(&l.source, e.to_string()))?
            {
                Some(d) => d,
                None => {
                    plans.push(Plan::Index {
                        blob,
                        layer: stored(l.diff_id, l.diff_id, l.compression, l.size),
                        unnamed: Some(&l.source),
                    });
                    continue;
                }
            },
        };
        let layer = stored(digest, l.diff_id, l.compression, l.size);
        plans.push(match cached_index(store, &layer) {
            Some(index) => Plan::Ready(Box::new(MountLayer { layer, blob, index }), false),
            None => Plan::Index {
                blob,
                layer,
                unnamed: None,
            },
        });
    }
    let jobs: Vec<usize> = (0..plans.len())
        .filter(|&i| matches!(plans[i], Plan::Index { .. }))
        .collect();
    let results: Vec<std::sync::Mutex<Option<Result<LayerIndex, String>>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = jobs.get(k) else { break };
                    if let Plan::Index {
                        blob,
                        layer,
                        unnamed,
                    } = &plans[i]
                    {
                        let r = index_range(blob, layer, unnamed.is_none());
                        *results[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    }
                }
            });
        }
    });
    let mut results = results
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()));
    let mut out = Vec::with_capacity(plans.len());
    for plan in plans {
        match plan {
            Plan::Ready(m, fresh) => out.push((*m, fresh)),
            Plan::Index {
                blob,
                layer,
                unnamed,
            } => {
                let index = results
                    .next()
                    .flatten()
                    .unwrap_or_else(|| Err("indexing did not run".into()));
                match unnamed {
                    None => out.push((
                        MountLayer {
                            layer,
                            blob,
                            index: index?,
                        },
                        true,
                    )),
                    Some(src) => {
                        let index = index.map_err(|e| at_member(src, e))?;
                        remember_member_digest(store, src, &index.layer)
                            .map_err(|e| at_member(src, e.to_string()))?;
                        let layer =
                            stored(index.layer, layer.diff_id, layer.compression, layer.size);
                        let fresh = cached_index(store, &layer).is_none();
                        out.push((MountLayer { layer, blob, index }, fresh));
                    }
                }
            }
        }
    }
    for (m, fresh) in &out {
        if *fresh {
            m.index
                .write_atomic(&store.index_path(&m.layer.digest), &store.tmp_dir())
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(out.into_iter().map(|(m, _)| m).collect())
}

/// The digest of an archive member that nothing names, remembered in the store by the
/// member's place and the archive's identity (device, inode, size, mtime), so that a second
/// mount of the same archive does not read the layer again. Safe to trust: a stale answer
/// only picks the wrong cached index, and every file's bytes are still checked against its
/// own sha256 before they are served.
fn known_member_digest(store: &Store, b: &image::BlobRef) -> std::io::Result<Option<Digest>> {
    let path = member_record(store, b)?;
    Ok(std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse::<Digest>().ok()))
}

/// Records what `known_member_digest` answers for this member from now on.
fn remember_member_digest(store: &Store, b: &image::BlobRef, d: &Digest) -> std::io::Result<()> {
    let path = member_record(store, b)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let (tmp, mut f) = store.new_tmp()?;
    std::io::Write::write_all(&mut f, d.to_string().as_bytes())?;
    drop(f);
    store.publish_tmp(&tmp, &path)
}

/// Where the digest of an archive member is remembered (see `known_member_digest`).
fn member_record(store: &Store, b: &image::BlobRef) -> std::io::Result<std::path::PathBuf> {
    use sha2::{Digest as _, Sha256};
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&b.path)?;
    let key = format!(
        "{}\0{}\0{}\0{}\0{}\0{}\0{}.{}",
        std::fs::canonicalize(&b.path)?.display(),
        b.offset,
        b.len,
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec()
    );
    let name = Digest::from_bytes(Sha256::digest(key.as_bytes()).into()).hex();
    Ok(store.root().join("index/by-member").join(name))
}

/// Imports `img` into the store as `name` (default: its tag, else its manifest digest),
/// indexing every new layer from its staged bytes first, so that a layer that fails its
/// digest or DiffID check leaves the store as it was (outside tmp/).
pub fn import_and_index(
    store: &Store,
    img: &image::ResolvedImage,
    name: Option<&str>,
) -> Result<super::ImportedImage, String> {
    let mut fresh: Vec<LayerIndex> = Vec::new();
    let imported = store
        .import_checked(img, name, &mut |l, path| {
            let sl = stored(l.digest, l.diff_id, l.compression, l.size);
            if cached_index(store, &sl).is_none() && !fresh.iter().any(|x| x.layer == l.digest) {
                let at = BlobAt {
                    path: path.to_path_buf(),
                    offset: 0,
                    len: l.size,
                };
                fresh.push(index_range(&at, &sl, true).map_err(std::io::Error::other)?);
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    for ix in &fresh {
        ix.write_atomic(&store.index_path(&ix.layer), &store.tmp_dir())
            .map_err(|e| e.to_string())?;
    }
    Ok(imported)
}

fn stored(digest: Digest, diff_id: Digest, compression: Compression, size: u64) -> StoredLayer {
    StoredLayer {
        digest,
        diff_id,
        compression,
        size,
    }
}

/// The cached index of `layer`, if there is a sound one.
fn cached_index(store: &Store, layer: &StoredLayer) -> Option<LayerIndex> {
    let path = store.index_path(&layer.digest);
    match LayerIndex::read(&path, &layer.digest) {
        Ok(ix) if ix.diff_id == layer.diff_id => Some(ix),
        Ok(_) => {
            log::warn!(
                "index {}: DiffID differs from the image's; indexing again",
                path.display()
            );
            None
        }
        Err(e) if e.is_not_found() => None,
        Err(e) => {
            log::warn!("{e}; indexing the layer again");
            None
        }
    }
}

/// Indexes the layer blob at `at`: one sequential pass that also checks the layer digest
/// and the DiffID, with a progress line on a terminal.
fn index_range(at: &BlobAt, layer: &StoredLayer, named: bool) -> Result<LayerIndex, String> {
    let file = std::fs::File::open(&at.path)
        .map_err(|e| format!("layer {}: blob {}: {e}", layer.digest, at.path.display()))?;
    let range = FileRange {
        file,
        offset: at.offset,
        len: at.len,
    };
    let src = LayerSource {
        compression: layer.compression,
        layer: layer.digest,
        diff_id: layer.diff_id,
        size: layer.size,
    };
    let mut bar = Progress::new(format!("indexing layer {}", short(&layer.digest)));
    let reader = std::io::BufReader::with_capacity(1 << 20, AtCursor::new(&range, 0));
    let progress = &mut |done, total| bar.show(done, total);
    let ix = if named {
        index_layer(reader, &src, &Limits::default(), progress)
    } else {
        index_unnamed_layer(reader, &src, &Limits::default(), progress)
    }
    .map_err(|e: IndexError| e.to_string())?;
    bar.done();
    Ok(ix)
}

/// The union layers of image `spec`, top first (`dev_base` numbers their devices), and the
/// lease that keeps them from gc while the mount lives.
pub fn open_image(
    store: &Store,
    spec: &str,
    platform: Option<&Platform>,
    dev_base: u64,
) -> Result<(Vec<Layer>, super::lease::MountLease), String> {
    let layers = image_layers(store, spec, platform)?;
    let digests: Vec<Digest> = layers.iter().map(|m| m.layer.digest).collect();
    let lease = store
        .lease(&digests)
        .map_err(|e| format!("image store {}: mounts: {e}", store.root().display()))?;
    let verified = Arc::new(super::indexlayer::Verified::default());
    let mut out = Vec::with_capacity(layers.len());
    for (i, m) in layers.into_iter().enumerate().rev() {
        let (l, ix) = (m.layer, m.index);
        let v = IndexLayer::new(
            Arc::new(ix),
            store.clone(),
            dev_base + i as u64,
            verified.clone(),
            m.blob,
        );
        out.push(Layer::virtual_layer(
            &format!("layer {}", l.digest),
            store.root(),
            Arc::new(v),
        )?);
    }
    Ok((out, lease))
}
