//! Mount leases: a live mount keeps the blobs and indexes of its layers out of gc's reach,
//! even after the image's name was removed.
//!
//! A mount writes `STORE/mounts/<pid>-<n>` with its layer digests (one per line) and holds an
//! exclusive flock on it for the daemon's lifetime. gc treats every file it cannot lock as
//! live and deletes the files it can lock (their daemon is gone). The lock, not the file,
//! is the truth: a daemon killed without cleanup leaves a file that the next gc removes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};

use super::{Digest, Store};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Held by a mounting daemon; dropping it ends the lease.
#[derive(Debug)]
pub struct MountLease {
    path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for MountLease {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Store {
    fn mounts_dir(&self) -> PathBuf {
        self.root().join("mounts")
    }

    /// Records that a mount uses `layers` until the lease is dropped (or the process dies).
    pub fn lease(&self, layers: &[Digest]) -> io::Result<MountLease> {
        let dir = self.mounts_dir();
        fs::create_dir_all(&dir)?;
        let path = dir.join(format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let mut text = String::new();
        for d in layers {
            text.push_str(&d.to_string());
            text.push('\n');
        }
        f.write_all(text.as_bytes())?;
        let lock =
            Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| io::Error::from(e))?;
        Ok(MountLease { path, _lock: lock })
    }

    /// Layer digests of live mounts; removes the records of mounts that are gone.
    pub(crate) fn leased_layers(&self) -> io::Result<Vec<Digest>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(self.mounts_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in rd {
            let path = e?.path();
            let Ok(f) = File::open(&path) else { continue };
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(gone) => {
                    // Nobody holds it: that mount ended without removing its record.
                    let _ = fs::remove_file(&path);
                    drop(gone);
                }
                Err((mut f, _)) => {
                    let mut text = String::new();
                    f.read_to_string(&mut text)?;
                    out.extend(text.lines().filter_map(|l| l.parse::<Digest>().ok()));
                }
            }
        }
        Ok(out)
    }
}
