//! Background warm-up of lower directories: when a directory is listed for the first time,
//! a worker lists its subdirectories in the lower layers and stats their entries, so that
//! the kernel's dentry and inode caches of the lower filesystems are warm by the time the
//! caller descends. A cold tree walk then overlaps its disk reads with FUSE round trips on
//! the second core instead of paying both in turn.
//!
//! Invariants: a job only reads (open O_DIRECTORY|O_NOFOLLOW, getdents, fstatat NOFOLLOW)
//! below a directory fd the union already holds, so it can change no state the union or a
//! caller sees; the queue is bounded and newest-first (the subdirectories of the directory
//! listed last are the ones a depth-first walker visits next); jobs that no longer fit are
//! dropped. A job holds its parent's fd, so the queue is also kept under an eighth of the
//! open-file limit (`queue_cap`), and a worker that meets EMFILE just skips the job. Lock order: only the queue mutex, never held across I/O.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use nix::dir::{Dir, Type};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

/// Jobs waiting at most; older ones are dropped first.
const QUEUE_CAP: usize = 512;

/// Jobs kept: `QUEUE_CAP`, or an eighth of the open-file limit when that is less.
fn queue_cap() -> usize {
    (super::dircache::fd_limit() / 8).clamp(1, QUEUE_CAP)
}

struct Job {
    parent: Arc<OwnedFd>,
    name: OsString,
    /// Levels below this directory still to warm.
    depth: u8,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Directories listed so far (for tests and logs).
    warmed: std::sync::atomic::AtomicU64,
}

pub struct Prefetcher {
    shared: Arc<Shared>,
    depth: u8,
    workers: usize,
    started: std::sync::Once,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher")
            .field("depth", &self.depth)
            .finish()
    }
}

impl Prefetcher {
    /// A prefetcher with `workers` threads, started on first use (the daemon forks after the
    /// union is built, and threads do not survive a fork); depth 0 warms only the
    /// directories handed in.
    pub fn new(workers: usize, depth: u8) -> Prefetcher {
        Prefetcher {
            shared: Arc::new(Shared::default()),
            depth,
            workers,
            started: std::sync::Once::new(),
        }
    }

    fn start(&self) {
        for i in 0..self.workers {
            let s = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("prefetch-{i}"))
                .spawn(move || worker(&s));
            if let Err(e) = spawned {
                log::warn!("prefetch thread not started: {e}");
            }
        }
    }

    /// Queues subdirectory `name` of the (lower) directory `parent` for warming.
    pub fn push(&self, parent: &Arc<OwnedFd>, name: OsString) {
        self.started.call_once(|| self.start());
        push(
            &self.shared,
            Job {
                parent: parent.clone(),
                name,
                depth: self.depth,
            },
        );
    }
}

impl Prefetcher {
    /// How many directories the workers have listed.
    pub fn warmed(&self) -> u64 {
        self.shared
            .warmed
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.stop = true;
        q.jobs.clear();
        self.shared.ready.notify_all();
    }
}

fn push(shared: &Shared, job: Job) {
    let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
    if q.stop {
        return;
    }
    if q.jobs.len() >= queue_cap() {
        q.jobs.pop_front();
    }
    q.jobs.push_back(job);
    drop(q);
    shared.ready.notify_one();
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if q.stop {
                    return;
                }
                if let Some(j) = q.jobs.pop_back() {
                    break j;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        warm(shared, job);
    }
}

/// Lists one directory and stats its entries; errors only mean there is nothing to warm.
fn warm(shared: &Shared, job: Job) {
    let Ok(fd) = nix::fcntl::openat(
        job.parent.as_fd(),
        job.name.as_os_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let fd = Arc::new(fd);
    shared
        .warmed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let Ok(dup) = fd.try_clone() else {
        return;
    };
    let Ok(mut dir) = Dir::from_fd(dup) else {
        return;
    };
    let mut subdirs = Vec::new();
    for ent in dir.iter().flatten() {
        let name = ent.file_name();
        let b = name.to_bytes();
        if b == b"." || b == b".." {
            continue;
        }
        let _ = nix::sys::stat::fstatat(fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW);
        if job.depth > 0 && ent.file_type() == Some(Type::Directory) {
            subdirs.push(std::ffi::OsStr::from_bytes(b).to_os_string());
        }
    }
    for name in subdirs {
        push(
            shared,
            Job {
                parent: fd.clone(),
                name,
                depth: job.depth - 1,
            },
        );
    }
}

use std::os::unix::ffi::OsStrExt;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_for(p: &Prefetcher, n: u64) -> u64 {
        let t = Instant::now();
        while p.warmed() < n && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        p.warmed()
    }

    #[test]
    fn warms_subdirectories_to_the_given_depth_and_never_follows_symlinks() {
        let base = std::env::temp_dir().join(format!("um-prefetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("d/e/f")).unwrap();
        std::fs::write(base.join("d/file"), b"x").unwrap();
        std::os::unix::fs::symlink("/", base.join("s")).unwrap();
        std::os::unix::fs::symlink("d", base.join("t")).unwrap();
        let root = Arc::new(OwnedFd::from(std::fs::File::open(&base).unwrap()));

        // depth 1: d and d/e are listed, d/e/f is not; the symlinks s and t are refused.
        let p = Prefetcher::new(1, 1);
        for n in ["s", "t", "d", "missing"] {
            p.push(&root, n.into());
        }
        assert_eq!(wait_for(&p, 2), 2);

        let p0 = Prefetcher::new(2, 0);
        p0.push(&root, "d".into());
        assert_eq!(wait_for(&p0, 1), 1);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
