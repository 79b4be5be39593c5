#![no_main]
//! See `cairn_domain::fuzzing::catalog_head`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cairn_domain::fuzzing::catalog_head(data));
