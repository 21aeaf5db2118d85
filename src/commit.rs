//! Commit: an upper directory becomes a new OCI layer (a gzip tar in which whiteouts are
//! `.wh.NAME` entries and opaque directories hold a `.wh..wh..opq` entry), stacked on the
//! image it was mounted over, and stored as a new image (manifest, config with the new DiffID
//! and a history entry, a name).
//!
//! Invariants: the upper is read through the same no-follow, beneath-the-root access as the
//! union (symlinks in it are recorded, never followed); every whiteout and opaque dialect
//! the union writes or reads in an upper is translated; the overlay's private xattrs are left
//! out; hard links inside the upper stay hard links; the blob, config and manifest are each
//! hashed while written and published atomically before the name is added to `index.json`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::image::media;
use crate::layer::{LDir, Layer};
use crate::store::layout::{IndexEntry, REF_NAME};
use crate::store::{Digest, Store};
use crate::union::copyup::is_private_xattr;
use crate::union::whiteout::{self, OPAQUE_MARKER, WH_PREFIX};

/// What `commit` made.
#[derive(Debug, Clone)]
pub struct Committed {
    pub name: String,
    pub manifest: Digest,
    pub layer: Digest,
    pub diff_id: Digest,
    pub entries: u64,
}

/// A writer that hashes what passes through.
struct Hashing<W: Write> {
    inner: W,
    sha: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.sha.update(&b[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    // "LEN key=value\n", LEN counting its own digits.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Writes one tar entry, with a PAX header for what ustar cannot hold (long names and link
/// targets, sub-second mtimes, xattrs, big ids and sizes).
#[allow(clippy::too_many_arguments)]
fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &[u8],
    kind: tar::EntryType,
    st: &libc::stat,
    link: Option<&[u8]>,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    data: &mut dyn Read,
    size: u64,
) -> io::Result<()> {
    let mut pax = Vec::new();
    let short = |b: &[u8], max: usize| b.len() <= max && b.is_ascii();
    if !short(path, 100) {
        pax_record(&mut pax, "path", path);
    }
    if let Some(l) = link.filter(|l| !short(l, 100)) {
        pax_record(&mut pax, "linkpath", l);
    }
    if st.st_mtime_nsec != 0 || st.st_mtime < 0 {
        let v = format!("{}.{:09}", st.st_mtime, st.st_mtime_nsec);
        pax_record(&mut pax, "mtime", v.as_bytes());
    }
    if st.st_uid > 0o7777777 {
        pax_record(&mut pax, "uid", st.st_uid.to_string().as_bytes());
    }
    if st.st_gid > 0o7777777 {
        pax_record(&mut pax, "gid", st.st_gid.to_string().as_bytes());
    }
    for (k, v) in xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(k);
        pax_record(&mut pax, &String::from_utf8_lossy(&key), v);
    }
    if !pax.is_empty() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(pax.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        set_name(&mut h, b"PaxHeader")?;
        h.set_cksum();
        tar.append(&h, pax.as_slice())?;
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    let name = if short(path, 100) { path } else { &path[..0] };
    set_name(&mut h, if name.is_empty() { b"long-name" } else { name })?;
    if let Some(l) = link {
        h.set_link_name_literal(if short(l, 100) { l } else { b"long-link" })?;
    }
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid).min(0o7777777));
    h.set_gid(u64::from(st.st_gid).min(0o7777777));
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(size);
    if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
        h.set_device_major(libc::major(st.st_rdev))?;
        h.set_device_minor(libc::minor(st.st_rdev))?;
    }
    h.set_cksum();
    tar.append(&h, data)
}

fn set_name(h: &mut tar::Header, name: &[u8]) -> io::Result<()> {
    let u = h
        .as_ustar_mut()
        .ok_or_else(|| io::Error::other("not a ustar header"))?;
    u.name = [0; 100];
    u.name[..name.len()].copy_from_slice(name);
    Ok(())
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn user_xattrs(d: &LDir, name: Option<&OsStr>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match d.listxattr(name) {
        Ok(n) => n,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::EPERM)) => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for k in names.split(|b| *b == 0).filter(|k| !k.is_empty()) {
        if is_private_xattr(k) {
            continue;
        }
        if let Some(v) = d.getxattr(name, k)? {
            out.push((k.to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes the layer tar of `upper` into `out`; returns the number of entries.
/// Opens the bytes of a metadata-only copy (metacopy) at a path of the upper: the file
/// at that path in the image below.
pub type BelowData<'a> = &'a dyn Fn(&[u8]) -> io::Result<std::fs::File>;

pub fn write_layer(upper: &Path, out: impl Write, below: BelowData) -> Result<u64, String> {
    let e = |x: io::Error| format!("upper {}: {x}", upper.display());
    let layer = Layer::open(upper).map_err(|x| format!("upper {x}"))?;
    let root = layer.open_dir(Path::new(".")).map_err(e)?;
    let mut tar = tar::Builder::new(out);
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut n = 0u64;
    // Whiteout and opaque markers: empty root-owned files.
    let mut marker = crate::sys::zeroed_stat();
    marker.st_mode = libc::S_IFREG | 0o644;
    // The root's own metadata (mode, owner, times, xattrs) as "./", as tar and docker write it.
    let root_st = root.stat_self().map_err(e)?;
    let root_x = user_xattrs(&root, None).map_err(e)?;
    append(
        &mut tar,
        b"./",
        tar::EntryType::Directory,
        &root_st,
        None,
        &root_x,
        &mut io::empty(),
        0,
    )
    .map_err(e)?;
    let mut stack: Vec<(LDir, Vec<u8>)> = vec![(root, Vec::new())];
    while let Some((d, rel)) = stack.pop() {
        let marks = whiteout::dir_marks(&d).map_err(e)?;
        if marks.opaque && !rel.is_empty() {
            let p = join(&rel, OPAQUE_MARKER);
            append(
                &mut tar,
                &p,
                tar::EntryType::Regular,
                &marker,
                None,
                &[],
                &mut io::empty(),
                0,
            )
            .map_err(e)?;
            n += 1;
        }
        let mut names = d.names().map_err(e)?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let b = name.as_bytes();
            if b == OPAQUE_MARKER {
                continue;
            }
            let path = join(&rel, b);
            let st = d.stat(&name).map_err(e)?;
            let kind = st.st_mode & libc::S_IFMT;
            let is_wh = whiteout::is_chardev_whiteout(&st)
                || whiteout::is_whiteout(&d, &marks, &name, &st).map_err(e)?
                || b.starts_with(WH_PREFIX);
            if is_wh {
                // `.wh.NAME` files (the fallback dialect) are already in OCI form.
                let wh = if b.starts_with(WH_PREFIX) {
                    path.clone()
                } else {
                    join(&rel, &[WH_PREFIX, b].concat())
                };
                append(
                    &mut tar,
                    &wh,
                    tar::EntryType::Regular,
                    &marker,
                    None,
                    &[],
                    &mut io::empty(),
                    0,
                )
                .map_err(e)?;
                n += 1;
                continue;
            }
            let xattrs = match kind {
                libc::S_IFREG | libc::S_IFDIR | libc::S_IFLNK => {
                    user_xattrs(&d, Some(&name)).map_err(e)?
                }
                _ => Vec::new(),
            };
            if kind != libc::S_IFDIR && st.st_nlink > 1 {
                let key = (st.st_dev, st.st_ino);
                if let Some(first) = links.get(&key) {
                    append(
                        &mut tar,
                        &path,
                        tar::EntryType::Link,
                        &st,
                        Some(first),
                        &[],
                        &mut io::empty(),
                        0,
                    )
                    .map_err(e)?;
                    n += 1;
                    continue;
                }
                links.insert(key, path.clone());
            }
            match kind {
                libc::S_IFREG => {
                    let mut f = if whiteout::is_metacopy(&d, &name).map_err(e)? {
                        let f = below(&path).map_err(|x| {
                            format!(
                                "upper {}: {}: metacopy data: {x}",
                                upper.display(),
                                String::from_utf8_lossy(&path)
                            )
                        })?;
                        let len = f.metadata().map_err(e)?.len();
                        if len != st.st_size as u64 {
                            return Err(format!(
                                "upper {}: {}: metacopy of {} bytes over a file of {len}",
                                upper.display(),
                                String::from_utf8_lossy(&path),
                                st.st_size
                            ));
                        }
                        f
                    } else {
                        std::fs::File::from(d.open(&name, nix::fcntl::OFlag::O_RDONLY).map_err(e)?)
                    };
                    append(
                        &mut tar,
                        &path,
                        tar::EntryType::Regular,
                        &st,
                        None,
                        &xattrs,
                        &mut f,
                        st.st_size as u64,
                    )
                    .map_err(e)?;
                }
                libc::S_IFDIR => {
                    append(
                        &mut tar,
                        &path,
                        tar::EntryType::Directory,
                        &st,
                        None,
                        &xattrs,
                        &mut io::empty(),
                        0,
                    )
                    .map_err(e)?;
                    subdirs.push((d.child_dir(&name).map_err(e)?, path));
                }
                libc::S_IFLNK => {
                    let t = d.readlink(&name).map_err(e)?;
                    append(
                        &mut tar,
                        &path,
                        tar::EntryType::Symlink,
                        &st,
                        Some(t.as_bytes()),
                        &xattrs,
                        &mut io::empty(),
                        0,
                    )
                    .map_err(e)?;
                }
                libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
                    let k = match kind {
                        libc::S_IFCHR => tar::EntryType::Char,
                        libc::S_IFBLK => tar::EntryType::Block,
                        _ => tar::EntryType::Fifo,
                    };
                    append(&mut tar, &path, k, &st, None, &[], &mut io::empty(), 0).map_err(e)?;
                }
                _ => {
                    log::warn!(
                        "commit: skipping {} (sockets cannot be stored in a layer)",
                        String::from_utf8_lossy(&path)
                    );
                    continue;
                }
            }
            n += 1;
        }
        // Depth first, in name order: push in reverse.
        stack.extend(subdirs.into_iter().rev());
    }
    tar.finish().map_err(e)?;
    Ok(n)
}

/// Commits `upper` (of a mount of image `base`) as image `name` in `store`.
pub fn commit(
    store: &Store,
    base: &str,
    upper: &Path,
    name: &str,
    message: Option<&str>,
) -> Result<Committed, String> {
    let img = store.resolve(base, None).map_err(|e| e.to_string())?;
    // The layer: tar -> hash (DiffID) -> gzip -> hash (digest) -> tmp file.
    let (tmp, file) = store.new_tmp().map_err(|e| e.to_string())?;
    let cleanup = |msg: String| {
        let _ = std::fs::remove_file(&tmp);
        msg
    };
    let gz_out = Hashing {
        inner: io::BufWriter::new(file),
        sha: Sha256::new(),
        len: 0,
    };
    let gz = flate2::write::GzEncoder::new(gz_out, flate2::Compression::default());
    let mut tar_out = Hashing {
        inner: gz,
        sha: Sha256::new(),
        len: 0,
    };
    // Metadata-only copies in the upper keep their bytes in the base image: read them
    // there, through a read-only union of its layers (verified as every image read is).
    let (layers, _lease) = crate::store::mount::open_image(
        store,
        base,
        None,
        crate::union::VIRTUAL_DEV_BASE + 0x2000,
    )?;
    let below = crate::union::Union::with_lowers(&crate::options::MountOptions::new(), layers)?;
    let read_below = |path: &[u8]| below.open_path(path);
    let entries = write_layer(upper, &mut tar_out, &read_below).map_err(cleanup)?;
    let diff_id = Digest::from_bytes(tar_out.sha.finalize().into());
    let mut gz_out = tar_out
        .inner
        .finish()
        .map_err(|e| cleanup(format!("gzip: {e}")))?;
    gz_out.flush().map_err(|e| cleanup(e.to_string()))?;
    let layer = Digest::from_bytes(gz_out.sha.finalize().into());
    let layer_size = gz_out.len;
    let file = gz_out
        .inner
        .into_inner()
        .map_err(|e| cleanup(e.to_string()))?;
    file.sync_all().map_err(|e| cleanup(e.to_string()))?;
    drop(file);
    store
        .publish_tmp(&tmp, &store.blob_path(&layer))
        .map_err(|e| cleanup(e.to_string()))?;

    // Config: the base's, plus the new DiffID and a history entry.
    let mut config: Value =
        serde_json::from_slice(&img.config).map_err(|e| format!("image {base}: config: {e}"))?;
    let now = rfc3339_now();
    config["created"] = json!(now);
    match config["rootfs"]["diff_ids"].as_array_mut() {
        Some(ids) => ids.push(json!(diff_id.to_string())),
        None => return Err(format!("image {base}: config has no rootfs.diff_ids")),
    }
    let mut h = json!({"created": now, "created_by": "unionmount image commit"});
    if let Some(m) = message {
        h["comment"] = json!(m);
    }
    match config["history"].as_array_mut() {
        Some(hist) => hist.push(h),
        None => config["history"] = json!([h]),
    }
    let config_bytes = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
    let config_digest = store
        .publish_blob(config_bytes.as_slice(), None)
        .map_err(|e| e.to_string())?;

    // Manifest: the base's layers plus the new one.
    let mut layers: Vec<Value> = Vec::new();
    for l in &img.layers {
        let d = l
            .digest
            .ok_or_else(|| format!("image {base}: a layer has no digest"))?;
        layers.push(json!({
            "mediaType": l.media_type.clone().unwrap_or_else(|| media::oci_layer(l.compression).to_string()),
            "digest": d.to_string(),
            "size": l.size,
        }));
    }
    layers.push(json!({
        "mediaType": media::OCI_LAYER_GZIP,
        "digest": layer.to_string(),
        "size": layer_size,
    }));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {
            "mediaType": media::OCI_CONFIG,
            "digest": config_digest.to_string(),
            "size": config_bytes.len(),
        },
        "layers": layers,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
    let manifest_digest = store
        .publish_blob(manifest_bytes.as_slice(), None)
        .map_err(|e| e.to_string())?;
    store
        .tag(
            name,
            IndexEntry {
                media_type: media::OCI_MANIFEST.to_string(),
                digest: manifest_digest.to_string(),
                size: manifest_bytes.len() as u64,
                annotations: Some(BTreeMap::from([(REF_NAME.to_string(), name.to_string())])),
                extra: BTreeMap::new(),
            },
        )
        .map_err(|e| e.to_string())?;
    Ok(Committed {
        name: name.to_string(),
        manifest: manifest_digest,
        layer,
        diff_id,
        entries,
    })
}

/// Now as RFC 3339 UTC (what OCI configs use), without a date crate.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm, public domain arithmetic).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
