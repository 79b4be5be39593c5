#![no_main]
//! See `cairn_domain::fuzzing::catalog_log`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cairn_domain::fuzzing::catalog_log(data));
