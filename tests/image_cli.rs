//! `unionmount image ...` from the command line: what a user sees on stdout and stderr, the
//! exit codes, and what the store holds afterwards. The image is generated here (two layers,
//! gzip and plain tar, in an OCI layout).

mod common;
#[path = "common/tree.rs"]
mod tree;

use common::TempDir;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

fn sha(b: &[u8]) -> String {
    let d: [u8; 32] = Sha256::digest(b).into();
    d.iter().map(|x| format!("{x:02x}")).collect()
}

fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn put(dir: &Path, bytes: &[u8]) -> (String, usize) {
    let h = sha(bytes);
    fs::write(dir.join("blobs/sha256").join(&h), bytes).unwrap();
    (format!("sha256:{h}"), bytes.len())
}

/// An OCI layout at `dir` tagged `tag`: base layer gzip, top layer plain tar.
fn make_image(dir: &Path, tag: &str) -> String {
    make_image_with(dir, tag, false)
}

/// `make_image`, with a config whose DiffID for the base layer is wrong when `bad_diff_id`.
fn make_image_with(dir: &Path, tag: &str, bad_diff_id: bool) -> String {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let base = layer(&[("etc/greeting", b"hello\n"), ("bin/tool", b"#!/bin/sh\n")]);
    let top = layer(&[
        ("etc/greeting", b"bonjour\n"),
        ("app/data", &[7u8; 5000]),
        ("opt/doc", b"documentation\n"),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&base).unwrap();
    let base_gz = gz.finish().unwrap();
    let (bd, bn) = put(dir, &base_gz);
    let (td, tn) = put(dir, &top);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{}","sha256:{}"]}}}}"#,
        if bad_diff_id {
            sha(b"something else")
        } else {
            sha(&base)
        },
        sha(&top)
    );
    let (cd, cn) = put(dir, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{cn}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{bd}","size":{bn}}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{td}","size":{tn}}}]}}"#
    );
    let (md, mn) = put(dir, manifest.as_bytes());
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{mn},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}]}}"#
        ),
    )
    .unwrap();
    md
}

fn image(store: &Path, args: &[&str]) -> Output {
    Command::new(common::unionmount_bin())
        .arg("image")
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn files_under(p: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(p).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn import_list_verify_remove_gc() {
    let t = TempDir::new("life");
    let (src, store) = (t.0.join("img"), t.0.join("store"));
    let manifest = make_image(&src, "v1");

    let o = image(
        &store,
        &[
            "import",
            &format!("oci:{}:v1", src.display()),
            "--name",
            "demo",
        ],
    );
    assert!(o.status.success(), "import failed: {}", stderr(&o));
    assert_eq!(stdout(&o), format!("demo {manifest}\n"));
    // Every blob of the image is in the store, and each layer has its cached index.
    let blobs = files_under(&store.join("blobs"));
    assert_eq!(blobs.len(), 4, "{blobs:?}");
    assert_eq!(files_under(&store.join("index")).len(), 2);

    let o = image(&store, &["ls"]);
    assert!(o.status.success());
    let line = stdout(&o);
    let cols: Vec<&str> = line.trim_end().split('\t').collect();
    assert_eq!(cols[..2], ["demo", manifest.as_str()], "{line}");

    let o = image(&store, &["verify"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "checked 4 blobs and file contents\n");

    // A flipped byte in a stored blob is found and named.
    let victim = store.join("blobs").join(&blobs[0]);
    let mut bytes = fs::read(&victim).unwrap();
    let keep = bytes.clone();
    bytes[0] ^= 0x40;
    fs::write(&victim, &bytes).unwrap();
    let o = image(&store, &["verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).starts_with(&format!("BAD {}: expected sha256:", victim.display())),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        stderr(&o),
        "unionmount image: 1 corrupt blob(s) or file content(s)\n"
    );
    fs::write(&victim, &keep).unwrap();

    // Untag, then gc removes everything the image held.
    let o = image(&store, &["rm", "demo"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), format!("untagged demo {manifest}\n"));
    let o = image(&store, &["rm", "demo"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no image named \"demo\""),
        "{}",
        stderr(&o)
    );
    let o = image(&store, &["gc"]);
    assert!(o.status.success());
    assert!(
        stdout(&o).starts_with("removed 4 blobs, 2 indexes, 0 file contents"),
        "{}",
        stdout(&o)
    );
    assert!(files_under(&store.join("blobs")).is_empty());
    assert!(files_under(&store.join("index")).is_empty());
    assert_eq!(stdout(&image(&store, &["ls"])), "");
}

#[test]
fn gc_keeps_the_file_contents_of_live_images() {
    if !common::mount_allowed() {
        return;
    }
    let t = TempDir::new("gc");
    let (src, store, mnt) = (t.0.join("img"), t.0.join("store"), t.0.join("mnt"));
    fs::create_dir_all(&mnt).unwrap();
    make_image(&src, "v1");
    make_image(&t.0.join("img2"), "v2");
    let o = image(&store, &["import", &format!("oci:{}:v1", src.display())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = Command::new(common::unionmount_bin())
        .args(["--image", "v1", "--store"])
        .arg(&store)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(o.status.success(), "mount: {}", stderr(&o));
    let guard = common::MountGuard::adopt(&mnt);
    let m = mnt.clone();
    let (g, d) = common::with_timeout(10, move || {
        (
            fs::read(m.join("etc/greeting")).unwrap(),
            fs::read(m.join("app/data")).unwrap(),
        )
    });
    assert_eq!(g, b"bonjour\n");
    assert_eq!(d, vec![7u8; 5000]);
    guard.unmount().unwrap();
    let objects = files_under(&store.join("objects"));
    assert_eq!(
        objects,
        [
            format!(
                "sha256/{}/{}",
                &sha(b"bonjour\n")[..2],
                &sha(b"bonjour\n")[2..]
            ),
            format!(
                "sha256/{}/{}",
                &sha(&[7u8; 5000])[..2],
                &sha(&[7u8; 5000])[2..]
            ),
        ]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    // The image is tagged: gc keeps its blobs, indexes and file contents.
    let o = image(&store, &["gc"]);
    assert!(o.status.success());
    assert!(
        stdout(&o).starts_with("removed 0 blobs, 0 indexes, 0 file contents"),
        "{}",
        stdout(&o)
    );
    assert_eq!(files_under(&store.join("objects")), objects);
    // Untagged: the contents go too.
    assert!(image(&store, &["rm", "v1"]).status.success());
    let o = image(&store, &["gc"]);
    assert!(
        stdout(&o).starts_with("removed 4 blobs, 2 indexes, 2 file contents"),
        "{}",
        stdout(&o)
    );
    assert!(files_under(&store.join("objects")).is_empty());
}

#[test]
fn bad_usage_is_one_line() {
    let t = TempDir::new("bad");
    let store = t.0.join("store");
    let o = image(&store, &["import", "nope:x"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "unionmount image: image source \"nope:x\": unknown transport \"nope\" (expected docker-archive, oci or oci-archive)\n"
    );
    let o = image(&store, &["import", "oci:/nonexistent/dir"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/dir"), "{}", stderr(&o));
    let o = image(&store, &["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "unionmount image: unrecognized subcommand 'frobnicate'\n"
    );
    // Nothing but the empty layout was written.
    assert!(files_under(&store.join("blobs")).is_empty());
}

#[test]
fn a_mount_whose_source_is_named_image_still_mounts() {
    if !common::mount_allowed() {
        return;
    }
    let t = TempDir::new("src");
    let (low, mnt) = (t.0.join("low"), t.0.join("mnt"));
    fs::create_dir_all(&low).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    fs::write(low.join("f"), b"x").unwrap();
    let o = Command::new(common::unionmount_bin())
        .arg("image")
        .arg(&mnt)
        .arg("-o")
        .arg(format!("lowerdir={}", low.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let guard = common::MountGuard::adopt(&mnt);
    let m = mnt.clone();
    assert_eq!(
        common::with_timeout(10, move || fs::read(m.join("f")).unwrap()),
        b"x"
    );
    assert_eq!(
        common::mount_entry(&mnt).map(|e| e.0),
        Some("image".to_string())
    );
    guard.unmount().unwrap();
}

fn unionmount(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(common::unionmount_bin())
        .args(args)
        .output()
        .unwrap()
}

fn snap(root: &Path) -> tree::Snapshot {
    let r = root.to_path_buf();
    common::with_timeout(30, move || {
        tree::snapshot(&r, tree::View::Merged)
            .unwrap_or_else(|e| panic!("snapshot {}: {e}", r.display()))
    })
}

/// Commit: the container's changes become a new image that mounts to the same tree, and
/// that skopeo converts and umoci unpacks to that tree too.
#[test]
fn commit_mounts_back_to_what_the_container_saw() {
    if !common::mount_allowed() {
        return;
    }
    let t = TempDir::new("commit");
    let p = |n: &str| t.0.join(n);
    for d in ["u", "w", "m", "m2"] {
        fs::create_dir_all(p(d)).unwrap();
    }
    let store = p("store");
    make_image(&p("img"), "v1");
    let o = image(
        &store,
        &["import", &format!("oci:{}:v1", p("img").display())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = unionmount(&[
        "--image".as_ref(),
        "v1".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--upper".as_ref(),
        p("u").as_os_str(),
        "--work".as_ref(),
        p("w").as_os_str(),
        p("m").as_os_str(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let guard = common::MountGuard::adopt(&p("m"));
    let m = p("m");
    let before = common::with_timeout(30, move || {
        use std::os::unix::fs::{PermissionsExt, symlink};
        fs::write(m.join("new"), b"new file\n").unwrap();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.join("etc/greeting"))
            .unwrap();
        f.write_all(b"and more\n").unwrap();
        fs::remove_file(m.join("bin/tool")).unwrap(); // a lower file: whiteout
        fs::remove_dir_all(m.join("app")).unwrap(); // a lower dir...
        fs::create_dir(m.join("app")).unwrap(); // ...made again: opaque
        fs::write(m.join("app/fresh"), b"x").unwrap();
        fs::create_dir_all(m.join("deep/er")).unwrap();
        symlink("../new", m.join("deep/link")).unwrap();
        fs::hard_link(m.join("new"), m.join("deep/er/hard")).unwrap();
        fs::set_permissions(m.join("new"), fs::Permissions::from_mode(0o4751)).unwrap();
        xattr_set(&m.join("new"), "user.note", b"kept");
        // A metadata-only copy-up: the commit takes its bytes from the image below.
        fs::set_permissions(m.join("opt/doc"), fs::Permissions::from_mode(0o600)).unwrap();
        tree::snapshot(&m, tree::View::Merged).unwrap()
    });
    guard.unmount().unwrap();
    assert!(
        common::stores_no_data(&p("u").join("opt/doc")),
        "opt/doc was copied up without its bytes"
    );

    let o = image(
        &store,
        &[
            "commit",
            "--from",
            "v1",
            "--upper",
            p("u").to_str().unwrap(),
            "--name",
            "v2",
            "-m",
            "test",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("v2 sha256:"), "{out}");
    assert!(out.trim_end().ends_with("(14 entries)"), "{out}");

    // The new image mounts (read-only, no upper) to exactly the tree the container saw.
    let o = unionmount(&[
        "--image".as_ref(),
        "v2".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        p("m2").as_os_str(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let guard = common::MountGuard::adopt(&p("m2"));
    let after = snap(&p("m2"));
    let _ = std::process::Command::new("true").status();
    let m2 = p("m2");
    let (a, b) = common::with_timeout(10, move || {
        use std::os::unix::fs::MetadataExt;
        (
            fs::metadata(m2.join("new")).unwrap().ino(),
            fs::metadata(m2.join("deep/er/hard")).unwrap().ino(),
        )
    });
    guard.unmount().unwrap();
    let d = tree::diff(&before, &after, "container", "committed", (0, i64::MAX));
    assert!(d.is_empty(), "committed image differs:\n{}", d.join("\n"));
    assert_eq!(a, b, "hard links stay linked");

    // Other tools accept it: skopeo converts it, umoci unpacks it to the same tree.
    let tool = |name: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for name in ["skopeo", "umoci"] {
        if !tool(name) {
            assert!(
                std::env::var_os("UNIONMOUNT_REQUIRE_MOUNT").is_none(),
                "{name} is missing (scripts/install-deps.sh installs it)"
            );
            println!("SKIP: {name} not installed");
            return;
        }
    }
    let o = Command::new("skopeo")
        .args(["copy", "-q"])
        .arg(format!("oci:{}:v2", store.display()))
        .arg(format!("docker-archive:{}:app:v2", p("v2.tar").display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo: {}", stderr(&o));
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v2", store.display()))
        .arg(p("bundle"))
        .output()
        .unwrap();
    assert!(o.status.success(), "umoci: {}", stderr(&o));
    let unpacked = snap(&p("bundle/rootfs"));
    let d = tree::diff(&before, &unpacked, "container", "umoci", (0, i64::MAX));
    // umoci gives the root its own mode/mtime; compare everything below it.
    let d: Vec<_> = d.into_iter().filter(|l| !l.starts_with(": ")).collect();
    assert!(d.is_empty(), "umoci's unpack differs:\n{}", d.join("\n"));
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) {
    let o = Command::new("setfattr")
        .arg("-n")
        .arg(name)
        .arg("-v")
        .arg(format!(
            "0x{}",
            value.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ))
        .arg(p)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "setfattr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// gc never deletes what a live mount uses, even once the image's name is gone; after the
/// unmount it does.
#[test]
fn gc_spares_the_layers_of_live_mounts() {
    if !common::mount_allowed() {
        return;
    }
    let t = TempDir::new("lease");
    let (src, store, mnt) = (t.0.join("img"), t.0.join("store"), t.0.join("mnt"));
    fs::create_dir_all(&mnt).unwrap();
    make_image(&src, "v1");
    assert!(
        image(&store, &["import", &format!("oci:{}:v1", src.display())])
            .status
            .success()
    );
    let o = unionmount(&[
        "--image".as_ref(),
        "v1".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        mnt.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let guard = common::MountGuard::adopt(&mnt);
    let pids = common::daemon_pids(&mnt);
    assert_eq!(
        files_under(&store.join("mounts")).len(),
        1,
        "one lease while mounted"
    );
    assert!(image(&store, &["rm", "v1"]).status.success());
    // gc takes the untagged manifest and config, and leaves the mounted layers and indexes.
    let o = image(&store, &["gc"]);
    assert!(
        stdout(&o).starts_with("removed 2 blobs, 0 indexes"),
        "{}",
        stdout(&o)
    );
    assert_eq!(files_under(&store.join("blobs")).len(), 2);
    assert_eq!(files_under(&store.join("index")).len(), 2);
    // The mount still reads its files.
    let m = mnt.clone();
    assert_eq!(
        common::with_timeout(10, move || fs::read(m.join("etc/greeting")).unwrap()),
        b"bonjour\n"
    );
    guard.unmount().unwrap();
    assert!(
        common::wait_for(std::time::Duration::from_secs(10), || pids
            .iter()
            .all(|&p| !common::alive(p))),
        "daemon exited"
    );
    let o = image(&store, &["gc"]);
    assert!(
        stdout(&o).starts_with("removed 2 blobs, 2 indexes"),
        "{}",
        stdout(&o)
    );
    assert!(files_under(&store.join("mounts")).is_empty());
    assert!(files_under(&store.join("blobs")).is_empty());
}

/// An image whose config names the wrong DiffID is refused by `image import` with one line
/// naming the layer, and leaves the store without blobs, indexes or names.
#[test]
fn import_refuses_a_wrong_diff_id_and_writes_nothing() {
    let t = TempDir::new("diffid");
    let (src, store) = (t.0.join("img"), t.0.join("store"));
    make_image_with(&src, "v1", true);
    let o = image(&store, &["import", &format!("oci:{}:v1", src.display())]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("DiffID"), "{err}");
    assert!(files_under(&store.join("blobs")).is_empty());
    assert!(files_under(&store.join("index")).is_empty());
    assert_eq!(stdout(&image(&store, &["ls"])), "");
}

/// `image import` on a terminal shows each layer's copy and indexing (a percentage while it
/// runs, then a "done" line); with stderr not a terminal it says nothing there.
#[test]
fn import_shows_progress_on_a_terminal_only() {
    let t = TempDir::new("progress");
    let src = t.0.join("img");
    make_image(&src, "v1");
    let o = image(
        &t.0.join("quiet"),
        &["import", &format!("oci:{}:v1", src.display())],
    );
    assert!(o.status.success(), "import failed: {}", stderr(&o));
    assert_eq!(stderr(&o), "");
    // script(1) gives the command a pseudo-terminal; its output is what the terminal showed.
    let cmd = format!(
        "{} image import oci:{}:v1 --store {}",
        common::unionmount_bin().display(),
        src.display(),
        t.0.join("tty").display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script(1) (util-linux) runs");
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = stdout(&o).replace('\r', "\n");
    let done: Vec<&str> = shown
        .lines()
        .filter(|l| l.trim_end().ends_with(": done"))
        .map(str::trim_end)
        .collect();
    let copies: Vec<&&str> = done
        .iter()
        .filter(|l| l.starts_with("copying layer "))
        .collect();
    let indexes: Vec<&&str> = done
        .iter()
        .filter(|l| l.starts_with("indexing layer sha256:"))
        .collect();
    assert_eq!(copies.len(), 2, "{shown}");
    assert!(
        copies[0].starts_with("copying layer 1/2 sha256:"),
        "{shown}"
    );
    assert!(
        copies[1].starts_with("copying layer 2/2 sha256:"),
        "{shown}"
    );
    assert_eq!(indexes.len(), 2, "{shown}");
}
