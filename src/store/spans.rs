//! Random access to a layer's uncompressed tar stream, in spans kept in a small LRU cache:
//! plain tar is read in place; gzip spans start at the index's checkpoints (inflate resumes
//! there); zstd spans are fixed 1 MiB windows of one sequential decoder, restarted only when
//! asked for something behind it. Reading many files of one layer in any order then costs
//! about one decompression of the spans they sit in, instead of one per file.
//!
//! Invariants: bytes handed out are the decompressor's output for exactly the requested range
//! (the caller verifies them against the file's sha256); memory is bounded by `CACHE_SPANS`
//! spans; one mutex guards the cache and the zstd cursor, and it is not held while a span is
//! decompressed for gzip (two threads may decode the same span; the second insert is dropped).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use super::Compression;
use super::gzindex::{Checkpoint, GzReader};
use super::layerindex::{AtCursor, FileRange, LayerIndex, ReadAt};

/// Spans kept per layer (gzip spans are about 1 MiB of output).
const CACHE_SPANS: usize = 16;
/// zstd span size.
const ZSTD_SPAN: u64 = 1 << 20;

type ZstdDecoder =
    zstd::stream::read::Decoder<'static, io::BufReader<AtCursor<'static, FileRange>>>;

struct Cursor {
    dec: ZstdDecoder,
    pos: u64,
}

#[derive(Default)]
struct Cache {
    spans: HashMap<u64, Arc<Vec<u8>>>,
    order: VecDeque<u64>,
}

impl Cache {
    fn get(&mut self, start: u64) -> Option<Arc<Vec<u8>>> {
        let s = self.spans.get(&start)?.clone();
        if let Some(i) = self.order.iter().position(|&x| x == start) {
            self.order.remove(i);
        }
        self.order.push_back(start);
        Some(s)
    }

    fn put(&mut self, start: u64, data: Arc<Vec<u8>>) {
        if self.spans.insert(start, data).is_none() {
            self.order.push_back(start);
        }
        while self.order.len() > CACHE_SPANS {
            if let Some(old) = self.order.pop_front() {
                self.spans.remove(&old);
            }
        }
    }
}

pub struct SpanReader {
    index: Arc<LayerIndex>,
    blob: &'static FileRange,
    cache: Mutex<(Cache, Option<Cursor>)>,
}

impl std::fmt::Debug for SpanReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanReader")
            .field("layer", &self.index.layer)
            .finish()
    }
}

impl SpanReader {
    /// `blob` is leaked on purpose: a layer's blob stays open for the life of the mount.
    pub fn new(index: Arc<LayerIndex>, blob: FileRange) -> SpanReader {
        SpanReader {
            index,
            blob: Box::leak(Box::new(blob)),
            cache: Mutex::new((Cache::default(), None)),
        }
    }

    /// Calls `sink` with consecutive pieces of the uncompressed stream covering
    /// `[offset, offset + len)`.
    pub fn read_range(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.index.compression == Compression::None {
            let mut buf = vec![0u8; 256 * 1024];
            let (mut at, end) = (offset, offset + len);
            while at < end {
                let n = buf.len().min((end - at) as usize);
                let got = ReadAt::read_at(self.blob, &mut buf[..n], at)?;
                if got == 0 {
                    return Err(eof(at));
                }
                sink(&buf[..got])?;
                at += got as u64;
            }
            return Ok(());
        }
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let (start, span) = self.span_at(at)?;
            let from = (at - start) as usize;
            if from >= span.len() {
                return Err(eof(at));
            }
            let to = span.len().min((end - start) as usize);
            sink(&span[from..to])?;
            at = start + to as u64;
        }
        Ok(())
    }

    /// The cached or freshly decoded span holding uncompressed offset `at`.
    fn span_at(&self, at: u64) -> io::Result<(u64, Arc<Vec<u8>>)> {
        match self.index.compression {
            Compression::Gzip => {
                let cps = self.index.checkpoints();
                let i = cps.partition_point(|c| c.out <= at);
                let (start, cp) = if i == 0 {
                    (0, None)
                } else {
                    (cps[i - 1].out, Some(&cps[i - 1]))
                };
                let end = cps.get(i).map_or(self.index.tar_size, |c| c.out);
                if let Some(s) = self.lock().0.get(start) {
                    return Ok((start, s));
                }
                let data = Arc::new(self.inflate(cp, end - start)?);
                self.lock().0.put(start, data.clone());
                Ok((start, data))
            }
            Compression::Zstd => {
                let start = at - at % ZSTD_SPAN;
                let mut g = self.lock();
                if let Some(s) = g.0.get(start) {
                    return Ok((start, s));
                }
                let (cache, cursor) = &mut *g;
                if cursor.as_ref().is_none_or(|c| c.pos > start) {
                    let dec = zstd::stream::read::Decoder::new(AtCursor::new(self.blob, 0))?;
                    *cursor = Some(Cursor { dec, pos: 0 });
                }
                let c = cursor.as_mut().ok_or_else(|| eof(at))?;
                loop {
                    let len = ZSTD_SPAN.min(self.index.tar_size.saturating_sub(c.pos));
                    if len == 0 {
                        return Err(eof(at));
                    }
                    let mut buf = vec![0u8; len as usize];
                    c.dec.read_exact(&mut buf)?;
                    let s0 = c.pos;
                    c.pos += len;
                    let data = Arc::new(buf);
                    cache.put(s0, data.clone());
                    if s0 == start {
                        return Ok((start, data));
                    }
                }
            }
            Compression::None => Err(io::Error::other("plain layers have no spans")),
        }
    }

    fn inflate(&self, cp: Option<&Checkpoint>, len: u64) -> io::Result<Vec<u8>> {
        let mut r = match cp {
            Some(cp) => {
                let at = cp.input - u64::from(cp.bits > 0);
                GzReader::resume(AtCursor::new(self.blob, at), cp)?
            }
            None => GzReader::from_start(AtCursor::new(self.blob, 0))?,
        };
        let mut buf = vec![0u8; len as usize];
        r.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Cache, Option<Cursor>)> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn eof(at: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the layer stream ends before offset {at}"),
    )
}
