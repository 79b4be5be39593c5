#![no_main]
//! Allocation map root and bitmap page decoders.
use cairn_domain::{alloc, FormatParams, Geometry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4096 {
        return;
    }
    let p = FormatParams {
        name: "fuzz".into(),
        host_slots: Some(2),
        volume_slots: Some(64),
        tag_slots: Some(64),
        journal_size: Some(65536),
        user_data_size: Some(4096),
        extent_size: None,
    };
    let g = Geometry::compute(64 << 20, 512, &p, uuid::Uuid::nil(), 0).unwrap();
    let _ = alloc::decode_root(&g, &data[..4096]);
    for map in 0..3 {
        let _ = alloc::decode_page(&g, map, 0, &data[..4096]);
    }
});
