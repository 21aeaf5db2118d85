//! Rootless use (DESIGN 1: rootless container tools and CI runners):
//! - an unprivileged user (uid 1000) mounts through fusermount3: nosuid,nodev,user_id=1000,
//!   whiteouts and opaque markers it can write (char dev 0/0, `user.overlay.opaque`), files
//!   owned by the user, `fusermount3 -u` ends it;
//! - the same user inside `unshare -r -m` (root in a user namespace) mounts directly; the
//!   upper it leaves is read the same way by kernel overlayfs with `userxattr` in that
//!   namespace;
//! - real root inside `unshare -m` still uses `trusted.overlay.*`, and kernel overlayfs
//!   (without `userxattr`) reads that upper the same way.
//!
//! Every command that touches a mount runs under a timeout; a guard unmounts and reaps the
//! daemon on every path.

mod common;

use common::{
    Fixture, MountGuard, assert_file, assert_quiet_success, assert_success, assert_work_clean,
    daemon_pids, get_xattr, is_chardev_whiteout, is_mounted, list_dir, lstat, mount_entry, os,
    parse_mount_entry, text, unionmount_bin, wait_for, with_timeout,
};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// Seconds any single command may take.
const STEP: u64 = 8;

const UID: u32 = 1000;
const GID: u32 = 1000;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Run `prog args` (stdin /dev/null, output captured) under the step timeout.
fn run_prog(prog: &str, args: Vec<OsString>) -> Output {
    common::run_prog_within(STEP, prog, args)
}

/// `setpriv --reuid=1000 --regid=1000 --clear-groups -- args...`
fn run_as_user(args: Vec<OsString>) -> Output {
    let mut all = vec![
        os(format!("--reuid={UID}")),
        os(format!("--regid={GID}")),
        os("--clear-groups"),
        os("--"),
    ];
    all.extend(args);
    run_prog("setpriv", all)
}

/// True when the tools the rootless tests drive are present and usable; otherwise SKIP
/// (or fail under UNIONMOUNT_REQUIRE_MOUNT=1), like a missing mount permission.
fn rootless_allowed() -> bool {
    if !common::mount_allowed() {
        return false;
    }
    let mut missing = Vec::new();
    let in_path = |tool: &str| {
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(tool))
                    .find(|f| f.is_file())
            })
            .unwrap_or(None)
    };
    for tool in ["setpriv", "unshare", "fusermount3"] {
        if in_path(tool).is_none() {
            missing.push(format!("{tool} not found"));
        }
    }
    if let Some(fm) = in_path("fusermount3")
        && fs::metadata(&fm)
            .map(|m| m.mode() & 0o4000 == 0)
            .unwrap_or(true)
    {
        missing.push("fusermount3 is not setuid".to_string());
    }
    match fs::metadata("/dev/fuse") {
        Ok(m) if m.mode() & 0o666 == 0o666 => {}
        _ => missing.push("/dev/fuse is not mode 0666 (run scripts/install-deps.sh)".into()),
    }
    if missing.is_empty() {
        return true;
    }
    let name = std::thread::current().name().unwrap_or("?").to_string();
    let msg = format!("{name}: {}", missing.join(", "));
    if std::env::var("UNIONMOUNT_REQUIRE_MOUNT").as_deref() == Ok("1") {
        panic!("UNIONMOUNT_REQUIRE_MOUNT=1 but the rootless test cannot run: {msg}");
    }
    eprintln!("SKIP: {msg}");
    false
}

/// No unionmount process serves `mnt` any more (waits up to 3 s).
#[track_caller]
fn assert_no_daemon(mnt: &Path) {
    assert!(
        wait_for(Duration::from_secs(3), || daemon_pids(mnt).is_empty()),
        "unionmount daemon(s) {:?} for {} still running",
        daemon_pids(mnt),
        mnt.display()
    );
}

/// Layers: lower0 (TOP) has `a` and `d/x`; lower1 (BASE) has `b` and `d/y`. Plus extra
/// dirs `work2` and `mnt2` for a kernel overlay over the same upper. Everything below the
/// fixture dir (which stays root-owned, 0755) is chowned to `owner`.
fn layers(owner: Option<(u32, u32)>) -> (Fixture, PathBuf, PathBuf) {
    let fx = Fixture::new(2);
    fx.write(&fx.lowers[0], "a", b"top-a", 0o644);
    fx.write(&fx.lowers[0], "d/x", b"x", 0o644);
    fx.write(&fx.lowers[1], "b", b"base-b", 0o644);
    fx.write(&fx.lowers[1], "d/y", b"y", 0o644);
    let work2 = fx.mkdir(&fx.dir, "work2", 0o755);
    let mnt2 = fx.mkdir(&fx.dir, "mnt2", 0o755);
    if let Some((u, g)) = owner {
        fn walk(dir: &Path, u: u32, g: u32) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                common::lchown(&p, u, g).unwrap();
                if lstat(&p).unwrap().is_dir() {
                    walk(&p, u, g);
                }
            }
        }
        walk(&fx.dir, u, g);
    }
    assert_eq!(
        fs::metadata(&fx.dir).unwrap().permissions().mode() & 0o777,
        0o755
    );
    (fx, work2, mnt2)
}

fn layers_arg(fx: &Fixture) -> String {
    format!("{}:{}", fx.lowers[0].display(), fx.lowers[1].display())
}

/// What a user does through the mount at `$M`: delete a lower file, replace a lower
/// directory by a new empty one (rmdir + mkdir → opaque), create files.
const OPS: &str = r#"rm "$M/a" && rm -r "$M/d" && mkdir "$M/d" && echo n > "$M/new" && echo made > "$M/d/inside""#;

/// A shell function printing a tree: sorted paths, then `path=contents` for files.
const LISTING_FN: &str = r#"listing() { (cd "$1" && find . | LC_ALL=C sort && find . -type f | LC_ALL=C sort | while read -r f; do printf '%s=%s\n' "$f" "$(cat "$f")"; done); }"#;

/// The merged tree after `OPS`, as `listing` prints it.
const MERGED_AFTER_OPS: &str = "\
.
./b
./d
./d/inside
./new
./b=base-b
./d/inside=made
./new=n
";

/// Single-quote `p` for sh.
fn q(p: &Path) -> String {
    format!("'{}'", p.to_str().unwrap().replace('\'', r"'\''"))
}

/// The text between `--- name` and the next `--- ` marker (or the end).
fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("--- {name}\n"))
        .unwrap_or_else(|| panic!("no section {name} in:\n{out}"))
        + name.len()
        + 5;
    let rest = &out[start..];
    &rest[..rest.find("--- ").unwrap_or(rest.len())]
}

/// The upper after `OPS`: whiteout `a`, opaque empty-but-for-`inside` `d`, `new`.
#[track_caller]
fn assert_upper_after_ops(fx: &Fixture, owner: (u32, u32), opaque_xattr: &str, other: &str) {
    assert_eq!(list_dir(&fx.upper), ["a", "d", "new"]);
    let a = fx.u("a");
    assert!(
        is_chardev_whiteout(&a),
        "upper/a is not a 0/0 char-dev whiteout"
    );
    let owner_of = |p: &Path| {
        let m = lstat(p).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner_of(&a), owner, "owner of the whiteout upper/a");
    let d = fx.u("d");
    assert!(lstat(&d).unwrap().is_dir());
    assert_eq!(list_dir(&d), ["inside"]);
    assert_eq!(
        get_xattr(&d, opaque_xattr).ok().as_deref(),
        Some(&b"y"[..]),
        "{opaque_xattr} on upper/d"
    );
    assert_eq!(
        get_xattr(&d, other).map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENODATA)),
        "{other} must not be set on upper/d"
    );
    assert_eq!(owner_of(&d), owner, "owner of upper/d");
    assert_file(fx.u("new"), b"n\n");
    assert_eq!(owner_of(&fx.u("new")), owner, "owner of upper/new");
    assert_file(fx.u("d/inside"), b"made\n");
    assert_eq!(
        owner_of(&fx.u("d/inside")),
        owner,
        "owner of upper/d/inside"
    );
    // The lowers are untouched.
    assert_eq!(list_dir(&fx.lowers[0]), ["a", "d"]);
    assert_eq!(list_dir(fx.l(0, "d")), ["x"]);
    assert_eq!(list_dir(&fx.lowers[1]), ["b", "d"]);
    assert_eq!(list_dir(fx.l(1, "d")), ["y"]);
}

/// A script for a private namespace: unionmount mounts `fx` on `fx.mnt` (section `table`:
/// its mount-table line), `OPS` run through it (section `union`: the merged tree after),
/// and it is unmounted; then `between`; then kernel overlayfs, with `kernel_opts` before
/// `lowerdir=`, mounts the same lowers and upper on `mnt2` (section `kernel`).
fn namespace_script(
    fx: &Fixture,
    work2: &Path,
    mnt2: &Path,
    between: &str,
    kernel_opts: &str,
) -> String {
    format!(
        "set -e; M={m}; {LISTING_FN}\n\
         {bin} --layers {layers} --upper {u} --work {w} \"$M\"\n\
         echo '--- table'; grep \" $M \" /proc/self/mounts\n\
         {OPS}\n\
         echo '--- union'; listing \"$M\"\n\
         umount \"$M\"\n\
         {between}\
         mount -t overlay overlay -o {kernel_opts}lowerdir={layers},upperdir={u},workdir={w2} {m2}\n\
         echo '--- kernel'; listing {m2}\n\
         umount {m2}\n\
         echo '--- end'\n",
        m = q(&fx.mnt),
        bin = q(&unionmount_bin()),
        layers = q(Path::new(&layers_arg(fx))),
        u = q(&fx.upper),
        w = q(&fx.work),
        w2 = q(work2),
        m2 = q(mnt2),
    )
}

/// The namespace script succeeded without a word on stderr, unionmount showed the tree a
/// user expects after `OPS`, and kernel overlayfs read the same tree from its upper.
/// Returns the script's stdout and the options of unionmount's `fuse.unionmount` entry.
#[track_caller]
fn assert_namespace_run(out: &Output, what: &str, fx: &Fixture) -> (String, Vec<String>) {
    assert_success(out, what);
    assert_eq!(text(&out.stderr), "", "stderr of the namespace script");
    let stdout = text(&out.stdout);
    let table = section(&stdout, "table");
    let (_, fstype, opts) = parse_mount_entry(table, &fx.mnt)
        .unwrap_or_else(|| panic!("no mount entry inside the namespace:\n{table}"));
    assert_eq!(fstype, "fuse.unionmount");
    assert_eq!(section(&stdout, "union"), MERGED_AFTER_OPS);
    assert_eq!(
        section(&stdout, "kernel"),
        section(&stdout, "union"),
        "kernel overlayfs ({what}) over unionmount's upper shows another tree"
    );
    (stdout, opts)
}

/// After the namespace is gone: nothing mounted outside, no daemon, and the upper `OPS`
/// leave (owned by `owner`, opaque by `opaque_xattr`); the workdir is clean.
#[track_caller]
fn assert_left_behind(
    fx: &Fixture,
    mnt2: &Path,
    owner: (u32, u32),
    opaque_xattr: &str,
    other: &str,
) {
    assert!(!is_mounted(&fx.mnt));
    assert!(!is_mounted(mnt2));
    assert_no_daemon(&fx.mnt);
    assert_upper_after_ops(fx, owner, opaque_xattr, other);
    assert_work_clean(&fx.work);
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// uid 1000 mounts through fusermount3; markers are ones it may write; files are its own;
/// `fusermount3 -u` ends the mount and the daemon.
#[test]
fn unprivileged_user_mounts_through_fusermount3() {
    if !rootless_allowed() {
        return;
    }
    let (fx, _, _) = layers(Some((UID, GID)));
    let _c = MountGuard::adopt(&fx.mnt);
    let out = run_as_user(vec![
        os(unionmount_bin()),
        os("--layers"),
        os(layers_arg(&fx)),
        os("--upper"),
        os(&fx.upper),
        os("--work"),
        os(&fx.work),
        os(&fx.mnt),
    ]);
    assert_quiet_success(&out, "unionmount as uid 1000");
    let (_, fstype, opts) = mount_entry(&fx.mnt).expect("mounted when the command returns");
    assert_eq!(fstype, "fuse.unionmount");
    assert_eq!(opts[0], "rw", "options {opts:?}");
    for o in ["nosuid", "nodev", "user_id=1000", "group_id=1000"] {
        assert!(opts.iter().any(|x| x == o), "{o} missing from {opts:?}");
    }
    assert_eq!(daemon_pids(&fx.mnt).len(), 1, "one daemon");

    // What the user sees, before and after the operations.
    let dir = fx.dir.clone();
    let mnt = fx.mnt.clone();
    let (code, stdout, stderr) = with_timeout(STEP, move || {
        let script = format!(
            "set -e; M={m}; {LISTING_FN}; echo '--- before'; listing \"$M\"; {OPS}; \
             echo '--- after'; listing \"$M\"; echo '--- owners'; \
             stat -c '%n %u:%g' \"$M/new\" \"$M/d\" \"$M/d/inside\"",
            m = q(&mnt)
        );
        common::sh_as(Some((UID, GID)), &dir, &script)
    });
    assert_eq!(code, 0, "operations as uid 1000 failed: {stderr}");
    assert_eq!(stderr, "");
    assert_eq!(
        section(&stdout, "before"),
        ".\n./a\n./b\n./d\n./d/x\n./d/y\n./a=top-a\n./b=base-b\n./d/x=x\n./d/y=y\n"
    );
    assert_eq!(section(&stdout, "after"), MERGED_AFTER_OPS);
    let m = fx.mnt.display();
    assert_eq!(
        section(&stdout, "owners"),
        format!("{m}/new 1000:1000\n{m}/d 1000:1000\n{m}/d/inside 1000:1000\n")
    );

    assert_upper_after_ops(
        &fx,
        (UID, GID),
        "user.overlay.opaque",
        "trusted.overlay.opaque",
    );

    let out = run_as_user(vec![os("fusermount3"), os("-u"), os(&fx.mnt)]);
    assert_quiet_success(&out, "fusermount3 -u as uid 1000");
    assert!(!is_mounted(&fx.mnt), "still mounted after fusermount3 -u");
    assert_no_daemon(&fx.mnt);
    assert_work_clean(&fx.work);
}

/// uid 1000 in `unshare -r -m`: mounts inside its namespace, writes `user.overlay.*`
/// markers; kernel overlayfs with `userxattr` over that upper, in the same namespace, shows
/// the same tree. Nothing is visible outside and nothing survives the namespace.
#[test]
fn user_namespace_mount_matches_kernel_userxattr() {
    if !rootless_allowed() {
        return;
    }
    let (fx, work2, mnt2) = layers(Some((UID, GID)));
    let _c = [MountGuard::adopt(&fx.mnt), MountGuard::adopt(&mnt2)];
    let between = format!(
        "echo '--- after-umount'; grep -c \" $M \" /proc/self/mounts || true\n\
         echo '--- upper'; stat -c '%n %F %t:%T %u:%g' {u}/a {u}/d {u}/new; \
         getfattr --absolute-names --only-values -n user.overlay.opaque {u}/d; echo\n",
        u = q(&fx.upper),
    );
    let script = namespace_script(&fx, &work2, &mnt2, &between, "userxattr,");
    let out = run_as_user(vec![
        os("unshare"),
        os("-r"),
        os("-m"),
        os("sh"),
        os("-c"),
        os(&script),
    ]);
    let (stdout, opts) = assert_namespace_run(&out, "unshare -r -m script as uid 1000", &fx);
    assert_eq!(opts[0], "rw", "options {opts:?}");
    assert_eq!(section(&stdout, "after-umount"), "0\n");
    let u = fx.upper.display();
    assert_eq!(
        section(&stdout, "upper"),
        format!(
            "{u}/a character special file 0:0 0:0\n{u}/d directory 0:0 0:0\n\
             {u}/new regular file 0:0 0:0\ny\n"
        ),
        "upper as seen inside the namespace"
    );
    // Outside: nothing mounted, no daemon, the upper belongs to uid 1000.
    assert_left_behind(
        &fx,
        &mnt2,
        (UID, GID),
        "user.overlay.opaque",
        "trusted.overlay.opaque",
    );
}

/// Real root in a private mount namespace (`unshare -m`, no user namespace) writes
/// `trusted.overlay.opaque`, and kernel overlayfs (trusted xattrs) reads that upper the
/// same way.
#[test]
fn root_in_mount_namespace_uses_trusted_xattrs() {
    if !rootless_allowed() {
        return;
    }
    let (fx, work2, mnt2) = layers(None);
    let _c = [MountGuard::adopt(&fx.mnt), MountGuard::adopt(&mnt2)];
    let script = namespace_script(&fx, &work2, &mnt2, "", "");
    let out = run_prog("unshare", vec![os("-m"), os("sh"), os("-c"), os(&script)]);
    let (_, opts) = assert_namespace_run(&out, "unshare -m script as root", &fx);
    for o in ["allow_other", "default_permissions", "user_id=0"] {
        assert!(opts.iter().any(|x| x == o), "{o} missing from {opts:?}");
    }
    assert_left_behind(
        &fx,
        &mnt2,
        (0, 0),
        "trusted.overlay.opaque",
        "user.overlay.opaque",
    );
}
