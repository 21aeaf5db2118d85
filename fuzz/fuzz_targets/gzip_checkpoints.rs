//! cargo-fuzz target `gzip_checkpoints`: the body is `unionmount::fuzzing::gzip_checkpoints` (shared with
//! tests/fuzz_regressions.rs); see its doc for the input format and the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| unionmount::fuzzing::gzip_checkpoints(data));
