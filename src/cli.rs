//! The command line: the native form, the fuse-overlayfs form and the mount(8) form, one
//! typed `MountOptions`, then mount.
//!
//! The process returns only once the mount is live: it forks, the child sets up the FUSE
//! session (mount + INIT handshake) and reports back through a pipe, then closes its
//! inherited stdio and serves. With `-f` it serves in the foreground. SIGTERM, SIGINT and
//! SIGHUP unmount (lazily if busy); the daemon exits when the kernel ends the connection.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::fuse::UnionFs;
use crate::options::{self, MountOptions};
use crate::sys;
use crate::union::Union;

const EXAMPLES: &str = "\
Examples:
  unionmount --layers top:middle:base /mnt                      read-only union of three layers
  unionmount --layers app:base --upper up --work wk /mnt        writable, changes go to ./up
  unionmount -o lowerdir=/l1:/l2,upperdir=/u,workdir=/w /mnt    fuse-overlayfs form
  mount -t fuse.unionmount unionmount /mnt -o lowerdir=/l1,upperdir=/u,workdir=/w
  unionmount --image oci:/images/app:latest --upper up --work wk /mnt   a container image
  unionmount image import docker-archive:app.tar --name app     import into the store
  unionmount image ls | rm NAME | gc | verify                   manage the store
  fusermount3 -u /mnt    (or umount /mnt as root)               unmount

Layer order is overlayfs order: the leftmost layer is the top. Options: lowerdir, upperdir,
workdir, ro, rw, dev, nodev, suid, nosuid, exec, noexec, noatime, volatile, fsync=0|1,
context=, uidmapping=H:T:L[:H:T:L...], gidmapping=, squash_to_root, squash_to_uid=,
squash_to_gid=, static_nlink, noxattrs, noacl, allow_other, allow_root, default_permissions,
max_write=, xino=. Set RUST_LOG=debug (or -d) for a request log.";

#[cfg(test)]
mod tests {
    use super::clap_one_line;

    #[test]
    fn clap_errors_fit_one_line() {
        let t = "error: the following required arguments were not provided:\n  <MOUNTPOINT>...\n\nUsage: unionmount <MOUNTPOINT>...\n\nFor more information, try '--help'.\n";
        assert_eq!(
            clap_one_line(t),
            "the following required arguments were not provided: <MOUNTPOINT>..."
        );
        assert_eq!(
            clap_one_line("error: unexpected argument '--frob' found\n\nUsage: x\n"),
            "unexpected argument '--frob' found"
        );
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "unionmount",
    version,
    about = "Mount a stack of layers as one tree with overlayfs semantics (FUSE)",
    after_help = EXAMPLES
)]
struct Args {
    /// Lower layers, top first, separated by ':' (`\:` for a colon in a path)
    #[arg(long, value_name = "TOP:...:BASE")]
    layers: Option<String>,
    /// Mount a container image: docker-archive:PATH, oci:DIR[:TAG|@DIGEST],
    /// oci-archive:PATH[:TAG], or the name of an image in the store (read-only without --upper)
    #[arg(long, value_name = "SOURCE")]
    image: Option<String>,
    /// Image store (default: $UNIONMOUNT_STORE, /var/lib/unionmount as root,
    /// ~/.local/share/unionmount otherwise)
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Platform to pick from a multi-platform image (default: the host's)
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Writable upper layer (needs --work)
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// Work directory on the same filesystem as --upper
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
    /// Mount options, comma separated (may be given several times)
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    options: Vec<OsString>,
    /// Stay in the foreground
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Foreground with a debug log on stderr
    #[arg(short = 'd', long)]
    debug: bool,
    /// Write the log to FILE (appending) instead of stderr; a background daemon keeps it
    #[arg(long, value_name = "FILE", env = "UNIONMOUNT_LOG_FILE")]
    log_file: Option<PathBuf>,
    /// [SOURCE] MOUNTPOINT (mount(8) passes a source first)
    #[arg(value_name = "MOUNTPOINT", num_args = 1..=2, required = true)]
    positional: Vec<PathBuf>,
}

/// An image to mount (below any --layers).
struct ImagePlan {
    spec: String,
    store: PathBuf,
    platform: Option<crate::image::Platform>,
}

fn open_image(
    img: &ImagePlan,
) -> Result<(Vec<crate::layer::Layer>, crate::store::lease::MountLease), String> {
    let store = crate::store::Store::open_or_create(&img.store)
        .map_err(|e| format!("image store {}: {e}", img.store.display()))?;
    crate::store::mount::open_image(
        &store,
        &img.spec,
        img.platform.as_ref(),
        crate::union::VIRTUAL_DEV_BASE + 0x1000,
    )
}

/// Everything `main` needs, validated.
struct Plan {
    opts: MountOptions,
    image: Option<ImagePlan>,
    mountpoint: PathBuf,
    source: String,
    foreground: bool,
    debug: bool,
    log_file: Option<PathBuf>,
}

fn plan(args: Args) -> Result<Plan, String> {
    let mut strs = Vec::new();
    for o in &args.options {
        strs.push(
            o.to_str()
                .ok_or_else(|| format!("option string is not UTF-8: {o:?}"))?
                .to_string(),
        );
    }
    let refs: Vec<&str> = strs.iter().map(String::as_str).collect();
    let mut opts = options::parse_options(&refs).map_err(|e| e.to_string())?;
    if let Some(l) = &args.layers {
        if !opts.lowers.is_empty() {
            return Err("give the layers once: --layers or lowerdir=, not both".into());
        }
        opts.lowers = options::split_layer_list("--layers", l).map_err(|e| e.to_string())?;
    }
    if args.upper.is_some() {
        opts.upper = args.upper.clone();
    }
    if args.work.is_some() {
        opts.work = args.work.clone();
    }
    if opts.upper.is_some() != opts.work.is_some() {
        return Err(
            "an upper layer needs a workdir and a workdir needs an upper layer \
                    (--upper with --work, or upperdir= with workdir=)"
                .into(),
        );
    }
    opts.validate_combination().map_err(|e| e.to_string())?;
    let image = match &args.image {
        None => None,
        Some(spec) => Some(ImagePlan {
            spec: spec.clone(),
            store: match &args.store {
                Some(s) => s.clone(),
                None => {
                    crate::store::Store::default_dir().map_err(|e| format!("image store: {e}"))?
                }
            },
            platform: match &args.platform {
                Some(p) => Some(crate::image::Platform::parse(p).map_err(|e| e.to_string())?),
                None => None,
            },
        }),
    };
    if image.is_none() && (args.store.is_some() || args.platform.is_some()) {
        return Err("--store and --platform go with --image".into());
    }
    if opts.lowers.is_empty() && opts.upper.is_none() && image.is_none() {
        return Err("no layers given: use --layers TOP:...:BASE or -o lowerdir=...".into());
    }
    if opts.xattr_permissions.is_some_and(|x| x != 0) {
        return Err("option 'xattr_permissions' is not implemented yet".into());
    }
    let (source, mountpoint) = match args.positional.as_slice() {
        [m] => ("unionmount".to_string(), m.clone()),
        [s, m] => (s.display().to_string(), m.clone()),
        _ => return Err("expected [SOURCE] MOUNTPOINT".into()),
    };
    match std::fs::metadata(&mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(format!(
                "mountpoint {}: not a directory",
                mountpoint.display()
            ));
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            // The daemon of an earlier FUSE mount there died. Not unmounted for the user:
            // it may be another program's mount, and a busy one must be detached with care.
            let m = mountpoint.display();
            return Err(format!(
                "mountpoint {m}: a FUSE mount whose daemon is gone is still there \
                 (transport endpoint is not connected); unmount it first: \
                 fusermount3 -u {m} (or umount -l {m})"
            ));
        }
        Err(e) => {
            return Err(format!(
                "mountpoint {}: {}",
                mountpoint.display(),
                short(&e)
            ));
        }
    }
    if opts.read_only && opts.upper.is_some() {
        // `ro` with an upper: mount read-only, never touch the upper.
        opts.upper = None;
        opts.work = None;
    }
    Ok(Plan {
        opts,
        image,
        mountpoint,
        source,
        foreground: args.foreground || args.debug,
        debug: args.debug,
        log_file: args.log_file,
    })
}

/// Parses a command line (`argv[0]` first) and checks it as [`main`] does, without mounting
/// or logging: the entry point for the fuzzer. `Err` is the one-line message `main` would
/// print; `--help` and `--version` count as `Ok`.
#[doc(hidden)]
pub fn check_command_line(argv: &[OsString]) -> Result<(), String> {
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                return Ok(());
            }
            return Err(clap_one_line(&e.to_string()));
        }
    };
    plan(args).map(drop)
}

/// clap's message on one line: the error and the arguments it names, without usage hints.
pub(crate) fn clap_one_line(text: &str) -> String {
    let mut parts = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("Usage:") || l.starts_with("For more information") {
            break;
        }
        if !l.is_empty() {
            parts.push(
                l.trim_start_matches("error: ")
                    .trim_end_matches(':')
                    .to_string(),
            );
        }
    }
    if parts.is_empty() {
        "bad arguments".into()
    } else {
        parts.join(": ")
    }
}

fn short(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "no such directory".into(),
        _ => e.to_string(),
    }
}

fn fuse_config(p: &Plan, root: bool) -> fuser::Config {
    use fuser::MountOption as M;
    let o = &p.opts;
    let mut mo = vec![
        M::FSName(p.source.clone()),
        M::CUSTOM("subtype=unionmount".into()),
        M::DefaultPermissions,
    ];
    if o.read_only || o.upper.is_none() {
        mo.push(M::RO);
    }
    // As root, a container rootfs needs suid and dev unless told otherwise.
    mo.push(if o.dev.unwrap_or(root) {
        M::Dev
    } else {
        M::NoDev
    });
    mo.push(if o.suid.unwrap_or(root) {
        M::Suid
    } else {
        M::NoSuid
    });
    if o.exec == Some(false) {
        mo.push(M::NoExec);
    }
    if o.noatime {
        mo.push(M::NoAtime);
    }
    let mut c = fuser::Config::default();
    c.mount_options = mo;
    c.acl = if root || o.allow_other {
        fuser::SessionACL::All
    } else if o.allow_root {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    c.n_threads = Some((cpus * 2).max(4));
    c.clone_fd = true;
    c
}

pub fn main() -> i32 {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // `image` followed by a subcommand; `unionmount image /mnt -o ...` (mount(8) with the
    // source named "image", then an existing mountpoint) still mounts.
    let image_cmd = [
        "import", "ls", "rm", "gc", "verify", "help", "--help", "-h", "--store",
    ];
    if argv.get(1).is_some_and(|a| a == "image")
        && argv
            .get(2)
            .is_none_or(|a| image_cmd.iter().any(|c| a == *c) || !std::path::Path::new(a).is_dir())
    {
        let mut sub = vec![OsString::from("unionmount image")];
        sub.extend(argv.into_iter().skip(2));
        return crate::imagecmd::main(sub);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return 0;
            }
            eprintln!("unionmount: {}", clap_one_line(&e.to_string()));
            return 2;
        }
    };
    let plan = match plan(args) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("unionmount: {msg}");
            return 1;
        }
    };
    // fuser's session warns when it finds the mount already gone at exit (after our own
    // unmount, or an outside `umount`), and its reply path reports ENOENT for a request the
    // kernel dropped during teardown: both expected, so they are not shown by default.
    let level = if plan.debug {
        "debug"
    } else {
        "warn,fuser::session=error,fuser::reply=off"
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    logger.format_timestamp_millis();
    if let Some(path) = &plan.log_file {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => {
                logger.target(env_logger::Target::Pipe(Box::new(f)));
            }
            Err(e) => {
                eprintln!("unionmount: log file {}: {e}", path.display());
                return 1;
            }
        }
    }
    logger.init();
    sys::set_umask(0);
    sys::raise_nofile();
    let mut extra = Vec::new();
    // Held until the daemon exits (the parent forgets its copy after the fork).
    let mut lease = None;
    if let Some(img) = &plan.image {
        match open_image(img) {
            Ok((layers, l)) => {
                extra = layers;
                lease = Some(l);
            }
            Err(msg) => {
                eprintln!("unionmount: {msg}");
                return 1;
            }
        }
    }
    let union = match Union::with_lowers(&plan.opts, extra) {
        Ok(u) => u,
        Err(msg) => {
            eprintln!("unionmount: {msg}");
            return 1;
        }
    };
    let fs = UnionFs::new(
        union,
        plan.opts.max_write.unwrap_or(1 << 20),
        plan.opts.passthrough,
        plan.opts.passthrough_lower,
    );
    if plan.foreground {
        return serve(fs, &plan, None);
    }
    let (rd, wr) = match sys::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("unionmount: pipe: {e}");
            return 1;
        }
    };
    match sys::fork() {
        Err(e) => {
            eprintln!("unionmount: fork: {e}");
            1
        }
        Ok(sys::Forked::Parent(_)) => {
            // The daemon holds the lease now: the parent must not remove its record.
            std::mem::forget(lease);
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            match msg.strip_prefix("ok") {
                Some(_) => 0,
                None if msg.is_empty() => {
                    eprintln!("unionmount: the daemon exited before the mount was ready");
                    1
                }
                None => {
                    eprintln!("unionmount: {}", msg.trim_end());
                    1
                }
            }
        }
        Ok(sys::Forked::Child) => {
            drop(rd);
            let _ = sys::setsid();
            serve(fs, &plan, Some(wr))
        }
    }
}

/// Mounts, reports readiness on `ready` (daemon mode), then serves until unmounted.
fn serve(fs: UnionFs, plan: &Plan, ready: Option<OwnedFd>) -> i32 {
    let root = sys::geteuid() == 0;
    let config = fuse_config(plan, root);
    if let Err(e) = sys::block_term_signals() {
        log::warn!("cannot block signals: {e}");
    }
    let notifier = fs.notifier.clone();
    let session = match fuser::Session::new(fs, &plan.mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("mount on {} failed: {e}", plan.mountpoint.display());
            match ready {
                Some(w) => {
                    let _ = std::fs::File::from(w).write_all(msg.as_bytes());
                }
                None => eprintln!("unionmount: {msg}"),
            }
            return 1;
        }
    };
    let _ = notifier.set(session.notifier());
    let mnt = plan.mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = sys::wait_signal();
            log::info!("signal {sig}: unmounting {}", mnt.display());
            unmount(&mnt, root);
        })
        .ok();
    if let Some(w) = ready {
        let _ = std::fs::File::from(w).write_all(b"ok");
        if let Err(e) = sys::detach_stdio() {
            log::warn!("cannot detach stdio: {e}");
        }
    }
    match session.run() {
        Ok(()) => 0,
        Err(e) => {
            log::error!("session ended: {e}");
            1
        }
    }
}

/// Unmounts, lazily when busy.
fn unmount(mnt: &Path, root: bool) {
    if root {
        if sys::umount2(mnt, 0).is_err()
            && let Err(e) = sys::umount2(mnt, libc::MNT_DETACH)
        {
            log::error!("umount {}: {e}", mnt.display());
        }
    } else {
        let ok = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            log::error!("fusermount3 -u -z {} failed", mnt.display());
        }
    }
}
