//! A safe wrapper over the zlib inflate C API (as implemented in pure Rust by `libz-rs-sys`),
//! for the few calls random access into gzip needs and safe crates do not expose: `Z_BLOCK`
//! flushes (stop at deflate block boundaries and report the bit position there),
//! `inflatePrime` and `inflateSetDictionary` (resume mid-stream from a checkpoint).
//!
//! Invariants: the `z_stream` is boxed and never moves after `inflateInit2_` (zlib keeps a
//! pointer back to it); `next_in`/`next_out` point into the slices of the current `inflate`
//! call only and are cleared before it returns; `inflateEnd` runs exactly once, on drop.

use std::ffi::CStr;
use std::io;

use libz_rs_sys as z;

/// What the stream starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A gzip member: header, deflate data, CRC-32 and length trailer (all checked).
    Gzip,
    /// Bare deflate data, as found at a checkpoint in the middle of a member.
    Raw,
}

impl Format {
    fn window_bits(self) -> i32 {
        match self {
            Format::Gzip => 15 + 16,
            Format::Raw => -15,
        }
    }
}

/// The result of one `inflate` call.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// The end of the deflate stream (and, for gzip, a verified trailer) was reached.
    pub stream_end: bool,
    /// Stopped at a deflate block boundary (or just after a gzip header) that is not the end
    /// of the last block: a place where a checkpoint may be taken.
    pub at_block_boundary: bool,
    /// Unused bits in the last consumed input byte (0..=7), meaningful at a boundary.
    pub bits: u8,
}

pub struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the raw pointers inside z_stream are only ever set during `inflate` and
// point to memory owned by the stream's own allocator otherwise, so moving the owner between
// threads is sound.
unsafe impl Send for Inflater {}

fn zerr(what: &str, ret: i32, strm: &z::z_stream) -> io::Error {
    let msg = if strm.msg.is_null() {
        String::new()
    } else {
        // SAFETY: zlib sets `msg` to a static NUL-terminated string or leaves it null.
        unsafe { CStr::from_ptr(strm.msg) }
            .to_string_lossy()
            .into_owned()
    };
    let detail = if msg.is_empty() {
        format!("zlib code {ret}")
    } else {
        msg
    };
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {detail}"))
}

impl Inflater {
    pub fn new(format: Format) -> io::Result<Inflater> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: strm is a zeroed z_stream (null allocators select the default ones) that
        // lives in a Box and is never moved; the version string and struct size are the
        // library's own.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *strm,
                format.window_bits(),
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if ret != z::Z_OK {
            return Err(io::Error::other(format!("inflateInit2 failed: code {ret}")));
        }
        Ok(Inflater { strm })
    }

    /// Starts a new stream of the given format, keeping the allocated state.
    pub fn reset(&mut self, format: Format) -> io::Result<()> {
        // SAFETY: the stream was initialized by `new` and is not moved.
        let ret = unsafe { z::inflateReset2(&mut *self.strm, format.window_bits()) };
        if ret != z::Z_OK {
            return Err(zerr("inflateReset2", ret, &self.strm));
        }
        Ok(())
    }

    /// Feeds `bits` (1..=7) low bits of `value` before the next input byte (resume mid-byte).
    pub fn prime(&mut self, bits: u8, value: u8) -> io::Result<()> {
        // SAFETY: the stream was initialized by `new`; prime only updates its bit buffer.
        let ret = unsafe { z::inflatePrime(&mut *self.strm, i32::from(bits), i32::from(value)) };
        if ret != z::Z_OK {
            return Err(zerr("inflatePrime", ret, &self.strm));
        }
        Ok(())
    }

    /// Sets the 32 KiB history a raw stream resumed mid-way may refer back to.
    pub fn set_dictionary(&mut self, dict: &[u8]) -> io::Result<()> {
        let len = u32::try_from(dict.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "dictionary too large"))?;
        // SAFETY: the stream was initialized by `new`; dict is valid for len bytes and zlib
        // copies it into its own window before returning.
        let ret = unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len) };
        if ret != z::Z_OK {
            return Err(zerr("inflateSetDictionary", ret, &self.strm));
        }
        Ok(())
    }

    /// One `inflate` call with `Z_BLOCK` (stop at block boundaries). An error carries zlib's
    /// message ("invalid block type", "incorrect data check", ...).
    pub fn inflate(&mut self, input: &[u8], output: &mut [u8]) -> io::Result<Step> {
        let avail_in = input.len().min(u32::MAX as usize) as u32;
        let avail_out = output.len().min(u32::MAX as usize) as u32;
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        // SAFETY: next_in/next_out point to live slices valid for avail_in/avail_out bytes
        // for the duration of this call; the stream was initialized by `new`.
        let ret = unsafe { z::inflate(&mut *self.strm, z::Z_BLOCK) };
        let consumed = (avail_in - self.strm.avail_in) as usize;
        let produced = (avail_out - self.strm.avail_out) as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        let dt = self.strm.data_type;
        match ret {
            z::Z_OK | z::Z_STREAM_END | z::Z_BUF_ERROR => Ok(Step {
                consumed,
                produced,
                stream_end: ret == z::Z_STREAM_END,
                at_block_boundary: ret != z::Z_STREAM_END && dt & 128 != 0 && dt & 64 == 0,
                bits: (dt & 7) as u8,
            }),
            _ => Err(zerr("inflate", ret, &self.strm)),
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialized by `new` and is ended exactly once, here.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let mut inf = Inflater::new(Format::Gzip).unwrap();
        let mut out = [0u8; 64];
        let input = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff];
        // Z_BLOCK: the first call stops right after the 10-byte header, at a boundary.
        let step = inf.inflate(&input, &mut out).unwrap();
        assert_eq!((step.consumed, step.produced), (10, 0));
        assert!(step.at_block_boundary && !step.stream_end);
        let e = inf.inflate(&input[10..], &mut out).unwrap_err();
        assert!(
            e.to_string().starts_with("inflate: invalid block type"),
            "{e}"
        );
    }
}
