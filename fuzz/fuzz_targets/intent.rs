#![no_main]
//! Intent and commit payload decoders.
use cairn_domain::journal::{Commit, Intent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(i) = Intent::decode(data) {
        assert_eq!(Intent::decode(&i.encode()).unwrap(), i);
    }
    if let Ok(c) = Commit::decode(data) {
        assert_eq!(Commit::decode(&c.encode()).unwrap(), c);
    }
});
