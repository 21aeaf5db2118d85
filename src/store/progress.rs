//! A one-line progress display for long store work (copying a layer in, indexing it) on a
//! terminal (stderr): a percentage that updates in place, then a "done" line. Silent when
//! stderr is not a terminal.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use super::Digest;

/// The first 12 hex digits of a digest, as container tools show them.
pub fn short(d: &Digest) -> String {
    let s = d.to_string();
    match s.split_once(':') {
        Some((alg, hex)) => format!("{alg}:{}", &hex[..hex.len().min(12)]),
        None => s,
    }
}

pub struct Progress {
    name: String,
    tty: bool,
    last: Option<Instant>,
}

impl Progress {
    pub fn new(name: String) -> Progress {
        Progress {
            name,
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    /// Shows `done` of `total` bytes, at most five times a second.
    pub fn show(&mut self, done: u64, total: u64) {
        if !self.tty
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(Instant::now());
        let pct = (done * 100).checked_div(total).unwrap_or(0).min(100);
        eprint!(
            "\r{}: {pct:3}% of {} MB",
            self.name,
            total.div_ceil(1 << 20)
        );
    }

    pub fn done(&self) {
        if self.tty {
            eprintln!("\r{}: done{:20}", self.name, "");
        }
    }
}

/// A reader that reports the bytes read through it to a `Progress`.
pub struct Reading<'a, R> {
    pub inner: R,
    pub bar: &'a mut Progress,
    pub done: u64,
    pub total: u64,
}

impl<R: std::io::Read> std::io::Read for Reading<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.bar.show(self.done, self.total);
        Ok(n)
    }
}
