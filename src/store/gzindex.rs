//! Random access into gzip blobs, zlib "zran" style: one sequential pass records checkpoints
//! (compressed offset, bit offset, uncompressed offset, and the 32 KiB of output before it)
//! at deflate block boundaries about every `SPAN` bytes of output; later a read at any
//! uncompressed offset inflates from the nearest checkpoint at or before it instead of from
//! the start of the blob.
//!
//! Invariants: multi-member gzip (concatenated members, as pigz and `cat a.gz b.gz` make) is
//! one continuous uncompressed stream; every member's CRC-32 and length are checked when the
//! member is read from its start (a read resumed from a checkpoint checks the trailers of the
//! members after it, and the caller verifies content by sha256 anyway); bytes after the last
//! member that do not start a new member are ignored, as `gzip -d` does; a stream that ends
//! inside a member is an error, never a short read. Memory is bounded: a 64 KiB input buffer
//! and, while indexing, a 64 KiB history buffer; windows are at most 32 KiB.

use std::io::{self, Read};

use crate::sys::zlib::{Format, Inflater};

/// Uncompressed distance between checkpoints (DESIGN: about every 1 MiB of output).
pub const SPAN: u64 = 1 << 20;
/// The deflate history a resumed stream may refer back to.
pub const WINDOW: usize = 32 * 1024;
const INBUF: usize = 64 * 1024;

/// A place to resume inflating: `input` is the offset in the blob of the first compressed
/// byte not yet fully consumed; when `bits` > 0, the top `bits` bits of the byte before it
/// still belong to the next block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub out: u64,
    pub input: u64,
    pub bits: u8,
    pub window: Box<[u8]>,
}

/// The last checkpoint at or before uncompressed offset `out` (None: start of the blob).
pub fn checkpoint_for(checkpoints: &[Checkpoint], out: u64) -> Option<&Checkpoint> {
    let i = checkpoints.partition_point(|c| c.out <= out);
    i.checked_sub(1).map(|i| &checkpoints[i])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InMember(Format),
    /// Skipping the 8-byte trailer of a member that was inflated raw (from a checkpoint).
    Trailer(u8),
    BetweenMembers,
    Done,
}

/// Decompresses a gzip stream (all members) from a `Read` positioned at the start of the blob
/// or at a checkpoint; optionally records checkpoints as it goes.
pub struct GzReader<R: Read> {
    src: R,
    inf: Inflater,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// Blob offset of `inbuf[in_start]`.
    in_pos: u64,
    out_pos: u64,
    state: State,
    recorder: Option<Recorder>,
}

struct Recorder {
    checkpoints: Vec<Checkpoint>,
    history: Vec<u8>,
    last: u64,
}

impl Recorder {
    fn push(&mut self, data: &[u8]) {
        if data.len() >= WINDOW {
            self.history.clear();
            self.history.extend_from_slice(&data[data.len() - WINDOW..]);
            return;
        }
        if self.history.len() + data.len() > 2 * WINDOW {
            let drop = self.history.len() - (WINDOW - data.len());
            self.history.drain(..drop);
        }
        self.history.extend_from_slice(data);
    }

    fn window(&self) -> &[u8] {
        &self.history[self.history.len().saturating_sub(WINDOW)..]
    }
}

fn corrupt(at: u64, e: io::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("gzip data corrupt at compressed byte {at}: {e}"),
    )
}

fn truncated(at: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("gzip stream truncated at compressed byte {at}"),
    )
}

impl<R: Read> GzReader<R> {
    fn with(src: R, format: Format, in_pos: u64, out_pos: u64) -> io::Result<GzReader<R>> {
        Ok(GzReader {
            src,
            inf: Inflater::new(format)?,
            inbuf: vec![0u8; INBUF].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            in_pos,
            out_pos,
            state: State::InMember(format),
            recorder: None,
        })
    }

    /// Reads from the start of the blob and records a checkpoint about every `SPAN` bytes.
    pub fn indexing(src: R) -> io::Result<GzReader<R>> {
        let mut r = GzReader::with(src, Format::Gzip, 0, 0)?;
        r.recorder = Some(Recorder {
            checkpoints: Vec::new(),
            history: Vec::with_capacity(2 * WINDOW),
            last: 0,
        });
        Ok(r)
    }

    /// Reads from the start of the blob, without recording.
    pub fn from_start(src: R) -> io::Result<GzReader<R>> {
        GzReader::with(src, Format::Gzip, 0, 0)
    }

    /// Resumes at `cp`. `src` must be positioned at blob offset `cp.input - 1` when
    /// `cp.bits > 0` (that byte holds the first bits), else at `cp.input`.
    pub fn resume(mut src: R, cp: &Checkpoint) -> io::Result<GzReader<R>> {
        let mut first = [0u8; 1];
        if cp.bits > 0 {
            src.read_exact(&mut first)
                .map_err(|_| truncated(cp.input))?;
        }
        let mut r = GzReader::with(src, Format::Raw, cp.input, cp.out)?;
        if cp.bits > 0 {
            r.inf
                .prime(cp.bits, first[0] >> (8 - cp.bits))
                .map_err(|e| corrupt(cp.input, e))?;
        }
        r.inf
            .set_dictionary(&cp.window)
            .map_err(|e| corrupt(cp.input, e))?;
        Ok(r)
    }

    /// Uncompressed bytes produced so far (plus the checkpoint's offset when resumed).
    pub fn out_pos(&self) -> u64 {
        self.out_pos
    }

    /// The checkpoints recorded by an `indexing` reader.
    pub fn take_checkpoints(&mut self) -> Vec<Checkpoint> {
        self.recorder
            .as_mut()
            .map(|r| std::mem::take(&mut r.checkpoints))
            .unwrap_or_default()
    }

    /// Appends more input after the pending bytes; false at the end of the source.
    fn fill(&mut self) -> io::Result<bool> {
        if self.in_start > 0 {
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        if self.in_end == self.inbuf.len() {
            return Ok(true);
        }
        loop {
            match self.src.read(&mut self.inbuf[self.in_end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.in_end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.in_start += n;
        self.in_pos += n as u64;
    }
}

impl<R: Read> Read for GzReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Trailer(left) => {
                    if self.in_start == self.in_end && !self.fill()? {
                        return Err(truncated(self.in_pos));
                    }
                    let n = (left as usize).min(self.in_end - self.in_start);
                    self.consume(n);
                    let left = left - n as u8;
                    self.state = if left == 0 {
                        State::BetweenMembers
                    } else {
                        State::Trailer(left)
                    };
                }
                State::BetweenMembers => {
                    while self.in_end - self.in_start < 2 {
                        if !self.fill()? {
                            break;
                        }
                    }
                    let pending = &self.inbuf[self.in_start..self.in_end];
                    if pending.starts_with(&[0x1f, 0x8b]) {
                        self.inf.reset(Format::Gzip)?;
                        if let Some(r) = self.recorder.as_mut() {
                            r.history.clear();
                        }
                        self.state = State::InMember(Format::Gzip);
                    } else {
                        // End of data, or trailing bytes that are not a member: ignored.
                        self.state = State::Done;
                    }
                }
                State::InMember(format) => {
                    if self.in_start == self.in_end && !self.fill()? {
                        return Err(truncated(self.in_pos));
                    }
                    let at = self.in_pos;
                    let step = self
                        .inf
                        .inflate(&self.inbuf[self.in_start..self.in_end], buf)
                        .map_err(|e| corrupt(at, e))?;
                    self.consume(step.consumed);
                    self.out_pos += step.produced as u64;
                    if let Some(r) = self.recorder.as_mut() {
                        r.push(&buf[..step.produced]);
                        if step.at_block_boundary && self.out_pos >= r.last + SPAN {
                            r.last = self.out_pos;
                            let window = r.window().into();
                            r.checkpoints.push(Checkpoint {
                                out: self.out_pos,
                                input: self.in_pos,
                                bits: step.bits,
                                window,
                            });
                        }
                    }
                    if step.stream_end {
                        self.state = match format {
                            Format::Gzip => State::BetweenMembers,
                            Format::Raw => State::Trailer(8),
                        };
                    } else if step.consumed == 0 && step.produced == 0 && !self.fill()? {
                        return Err(truncated(self.in_pos));
                    }
                    if step.produced > 0 {
                        return Ok(step.produced);
                    }
                }
            }
        }
    }
}
