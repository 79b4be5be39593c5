#![no_main]
//! See `cairn_domain::fuzzing::superblock`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cairn_domain::fuzzing::superblock(data));
