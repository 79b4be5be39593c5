#![no_main]
//! User data blob decoder.
use cairn_domain::records::{decode_user_data, encode_user_data};
use cairn_domain::TagId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let t = TagId::generate(7);
    if let Ok(items) = decode_user_data(&t, data) {
        assert_eq!(decode_user_data(&t, &encode_user_data(&t, &items)).unwrap(), items);
    }
});
