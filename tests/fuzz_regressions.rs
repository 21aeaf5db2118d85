//! Replays the fuzz corpus and every crash ever found, on stable and without cargo-fuzz:
//! each file in `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the
//! same body the cargo-fuzz target calls (`unionmount::fuzzing::<target>`), which asserts
//! the target's properties.
//!
//! Invariants: every target has a non-empty corpus (a missing or emptied directory fails
//! rather than passing vacuously); a failing input is reported by its file name, and all of
//! a target's inputs run even after one fails.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.expect("reading a corpus directory").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    v.sort();
    v
}

/// Address-space cap for a replay: far above what any input needs, far below what an
/// allocation sized by a hostile field asks for (a calloc of gigabytes would otherwise
/// succeed lazily here and hide the bug the fuzzer reported as out-of-memory).
const MEMORY_CAP: &str = "1073741824";

/// Replays `target` in a child copy of this test binary under `prlimit --as` (the test
/// named `test`, which calls [`replay`] when `UNIONMOUNT_FUZZ_CHILD` is set).
fn replay_capped(target: &str, test: &str) {
    if std::env::var_os("UNIONMOUNT_FUZZ_CHILD").is_some() {
        let n = replay(target);
        println!("replayed {n} inputs of {target}");
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new("prlimit")
        .arg(format!("--as={MEMORY_CAP}"))
        .arg("--")
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("UNIONMOUNT_FUZZ_CHILD", "1")
        .output()
        .expect("running prlimit (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("replayed "),
        "replay of {target} under a {MEMORY_CAP}-byte address-space cap failed ({}):\n{text}",
        out.status
    );
}

/// Runs every corpus and regression input of `target`; returns how many ran.
fn replay(target: &str) -> usize {
    let body = unionmount::fuzzing::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .map(|&(_, f)| f)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = inputs(&root.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is empty or missing: the regression run would prove nothing"
    );
    let regressions = inputs(&root.join("regressions").join(target));
    let mut failed = Vec::new();
    let total = corpus.len() + regressions.len();
    for p in corpus.iter().chain(&regressions) {
        let data = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(p.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "fuzz target {target}: {} of {total} inputs fail: {}",
        failed.len(),
        failed.join(", ")
    );
    total
}

#[test]
fn every_target_has_a_test_here() {
    let names: Vec<&str> = unionmount::fuzzing::TARGETS.iter().map(|t| t.0).collect();
    assert_eq!(
        names,
        [
            "options",
            "digest",
            "manifest",
            "tar_index",
            "gzip_checkpoints",
            "layer_index_file",
            "whiteout"
        ]
    );
    // Each target has a fuzz/fuzz_targets/<name>.rs calling the shared body.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for n in names {
        let src = fs::read_to_string(root.join(format!("{n}.rs")))
            .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{n}.rs: {e}"));
        assert!(
            src.contains(&format!("unionmount::fuzzing::{n}(data)")),
            "fuzz/fuzz_targets/{n}.rs does not call unionmount::fuzzing::{n}"
        );
    }
}

#[test]
fn options_corpus() {
    replay_capped("options", "options_corpus");
}

#[test]
fn digest_corpus() {
    replay_capped("digest", "digest_corpus");
}

#[test]
fn manifest_corpus() {
    replay_capped("manifest", "manifest_corpus");
}

#[test]
fn tar_index_corpus() {
    replay_capped("tar_index", "tar_index_corpus");
}

#[test]
fn gzip_checkpoints_corpus() {
    replay_capped("gzip_checkpoints", "gzip_checkpoints_corpus");
}

#[test]
fn layer_index_file_corpus() {
    replay_capped("layer_index_file", "layer_index_file_corpus");
}

#[test]
fn whiteout_corpus() {
    replay_capped("whiteout", "whiteout_corpus");
}

/// Not a check: writes the layer_index_file seeds (real encoded indexes of the tar_index
/// seed layers, whole and as bare bodies). Run with
/// `cargo test --test fuzz_regressions -- --ignored write_layer_index_file_seeds`.
#[test]
#[ignore]
fn write_layer_index_file_seeds() {
    use sha2::{Digest as _, Sha256};
    use unionmount::store::{Compression, Digest, LayerSource, Limits, index_layer};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let out = root.join("layer_index_file");
    fs::create_dir_all(&out).expect("creating the corpus directory");
    for p in inputs(&root.join("tar_index")) {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let data = fs::read(&p).expect("reading a seed");
        let Some((&0, tar)) = data.split_first() else {
            continue;
        };
        if !name.starts_with("seed-") {
            continue;
        }
        let d = Digest::from_bytes(Sha256::digest(tar).into());
        let src = LayerSource {
            compression: Compression::None,
            layer: d,
            diff_id: d,
            size: tar.len() as u64,
        };
        let Ok(ix) = index_layer(tar, &src, &Limits::default(), &mut |_, _| {}) else {
            continue;
        };
        let enc = ix.encode();
        let mut whole = vec![0u8];
        whole.extend_from_slice(&enc);
        fs::write(out.join(format!("{name}-file")), whole).expect("writing a seed");
        let mut body = vec![1u8];
        body.extend_from_slice(&enc[12..enc.len() - 32]);
        fs::write(out.join(format!("{name}-body")), body).expect("writing a seed");
    }
}
