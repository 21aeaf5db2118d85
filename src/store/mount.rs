//! Opening an image as union layers: resolve the image (from a source or from the store),
//! import what the store lacks, and load each layer's index (indexing the blob once, on
//! first use, with the digest and DiffID checks). After the first mount of any image sharing
//! a layer, mounting reads only manifests, configs and cached indexes.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::indexlayer::IndexLayer;
use super::layerindex::{IndexError, LayerIndex};
use super::tarindex::{LayerSource, Limits, index_layer};
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

/// `spec` is an image source (`docker-archive:`, `oci:`, `oci-archive:`), imported into the
/// store first when it holds something the store lacks, or the name (tag or manifest digest)
/// of an image already in the store. Returns the image's layers, base first, with the index
/// of each layer that had to be indexed during the import (its cache file written once the
/// import succeeded).
pub fn image_layers(
    store: &Store,
    spec: &str,
    platform: Option<&Platform>,
) -> Result<Vec<(StoredLayer, Option<LayerIndex>)>, String> {
    let is_source = ["docker-archive:", "oci:", "oci-archive:"]
        .iter()
        .any(|p| spec.starts_with(p));
    if is_source {
        let src = ImageSource::parse(spec).map_err(|e| e.to_string())?;
        let img = image::resolve(&src, platform).map_err(|e| e.to_string())?;
        // Every new layer is indexed (digest and DiffID checked) from its staged bytes
        // before anything is committed, so a bad layer leaves the store untouched.
        let mut fresh: Vec<LayerIndex> = Vec::new();
        let imported = store
            .import_checked(&img, None, &mut |l, path| {
                let sl = stored(l.digest, l.diff_id, l.compression, l.size);
                if cached_index(store, &sl).is_none() {
                    let ix = index_file(path, &sl).map_err(std::io::Error::other)?;
                    fresh.push(ix);
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        for ix in &fresh {
            ix.write_atomic(&store.index_path(&ix.layer), &store.tmp_dir())
                .map_err(|e| e.to_string())?;
        }
        return Ok(imported
            .layers
            .iter()
            .map(|l| {
                let ix = fresh
                    .iter()
                    .position(|x| x.layer == l.digest)
                    .map(|i| fresh.swap_remove(i));
                (stored(l.digest, l.diff_id, l.compression, l.size), ix)
            })
            .collect());
    }
    let img = store.resolve(spec, platform).map_err(|e| e.to_string())?;
    img.layers
        .iter()
        .map(|l| {
            let digest = l.digest.ok_or_else(|| {
                format!("image {spec}: a layer has no digest in the store's manifest")
            })?;
            Ok((stored(digest, l.diff_id, l.compression, l.size), None))
        })
        .collect()
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

/// Indexes the layer blob at `path`: one sequential pass that also checks the layer digest
/// and the DiffID, with a progress line on a terminal.
fn index_file(path: &std::path::Path, layer: &StoredLayer) -> Result<LayerIndex, String> {
    let blob = std::fs::File::open(path)
        .map_err(|e| format!("layer {}: blob {}: {e}", layer.digest, path.display()))?;
    let src = LayerSource {
        compression: layer.compression,
        layer: layer.digest,
        diff_id: layer.diff_id,
        size: layer.size,
    };
    let mut bar = Progress::new(&layer.digest);
    let ix = index_layer(
        std::io::BufReader::with_capacity(1 << 20, blob),
        &src,
        &Limits::default(),
        &mut |done, total| bar.show(done, total),
    )
    .map_err(|e: IndexError| e.to_string())?;
    bar.done();
    Ok(ix)
}

/// The cached index of `layer`, or a fresh one from its stored blob, cached for next time.
pub fn layer_index(store: &Store, layer: &StoredLayer) -> Result<LayerIndex, String> {
    if let Some(ix) = cached_index(store, layer) {
        return Ok(ix);
    }
    let ix = index_file(&store.blob_path(&layer.digest), layer)?;
    ix.write_atomic(&store.index_path(&layer.digest), &store.tmp_dir())
        .map_err(|e| e.to_string())?;
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
    let digests: Vec<Digest> = layers.iter().map(|(l, _)| l.digest).collect();
    let lease = store
        .lease(&digests)
        .map_err(|e| format!("image store {}: mounts: {e}", store.root().display()))?;
    let verified = Arc::new(super::indexlayer::Verified::default());
    let mut out = Vec::with_capacity(layers.len());
    for (i, (l, fresh)) in layers.into_iter().enumerate().rev() {
        let ix = match fresh {
            Some(ix) => ix,
            None => layer_index(store, &l)?,
        };
        let v = IndexLayer::new(
            Arc::new(ix),
            store.clone(),
            dev_base + i as u64,
            verified.clone(),
        );
        out.push(Layer::virtual_layer(
            &format!("layer {}", l.digest),
            store.root(),
            Arc::new(v),
        )?);
    }
    Ok((out, lease))
}

/// A one-line progress display on a terminal (stderr), silent otherwise.
struct Progress {
    name: String,
    tty: bool,
    last: Instant,
    shown: bool,
}

impl Progress {
    fn new(d: &Digest) -> Progress {
        Progress {
            name: format!("indexing layer {}", &d.to_string()[..19]),
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            shown: false,
        }
    }

    fn show(&mut self, done: u64, total: u64) {
        if !self.tty || self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        self.shown = true;
        let pct = (done * 100).checked_div(total).unwrap_or(0).min(100);
        eprint!("\r{}: {pct:3}% of {} MB", self.name, total >> 20);
    }

    fn done(&self) {
        if self.shown {
            eprintln!("\r{}: done{:20}", self.name, "");
        }
    }
}
