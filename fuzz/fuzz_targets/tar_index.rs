//! cargo-fuzz target `tar_index`: the body is `unionmount::fuzzing::tar_index` (shared with
//! tests/fuzz_regressions.rs); see its doc for the input format and the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| unionmount::fuzzing::tar_index(data));
