#![no_main]
//! Superblock decoder: never panics; whatever decodes re-encodes identically.
use cairn_domain::Geometry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4096 {
        return;
    }
    if let Ok(g) = Geometry::decode(&data[..4096], 0) {
        let again = Geometry::decode(zerocopy_bytes(&g).as_slice(), 0).expect("re-decodes");
        assert_eq!(again, g);
    }
});

fn zerocopy_bytes(g: &Geometry) -> Vec<u8> {
    let sb = g.encode();
    // SuperblockRaw is plain bytes with a fixed layout.
    cairn_domain::layout::as_bytes(&sb).to_vec()
}
