//! cargo-fuzz target `digest`: the body is `unionmount::fuzzing::digest` (shared with
//! tests/fuzz_regressions.rs); see its doc for the input format and the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| unionmount::fuzzing::digest(data));
