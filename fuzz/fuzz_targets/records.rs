#![no_main]
//! Volume, tag and host slot record decoders.
use cairn_domain::records::{decode_tag, decode_volume, encode_tag, encode_volume, Slot, SlotHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 512 + 16 + 4 {
        return;
    }
    let salt: [u8; 16] = data[512..528].try_into().unwrap();
    let slot = u32::from_le_bytes(data[528..532].try_into().unwrap()) % 4096;
    let rec = &data[..512];
    if let Ok(Slot::Live(v)) = decode_volume(&salt, slot, rec) {
        assert_eq!(decode_volume(&salt, slot, &encode_volume(&salt, &v)).unwrap(), Slot::Live(v));
    }
    if let Ok(Slot::Live(t)) = decode_tag(&salt, slot, rec) {
        assert_eq!(decode_tag(&salt, slot, &encode_tag(&salt, &t)).unwrap(), Slot::Live(t));
    }
    if let Ok(h) = SlotHeader::decode(&salt, slot, rec) {
        if h.state != 0 {
            assert_eq!(SlotHeader::decode(&salt, slot, &h.encode(&salt, slot)).unwrap(), h);
        }
    }
});
