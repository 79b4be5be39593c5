#![no_main]
//! Journal block decoder and ring scanner over arbitrary rings.
use cairn_domain::journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pages = data.len() / 4096;
    if pages == 0 {
        return;
    }
    let ring = &data[..pages * 4096];
    let salt = [0u8; 16];
    for p in 0..pages {
        let _ = journal::decode_block(&salt, 0, &ring[p * 4096..(p + 1) * 4096]);
    }
    let _ = journal::scan(&salt, 0, ring, 0);
});
