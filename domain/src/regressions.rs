//! Inputs the fuzz targets once crashed on (`fuzz/regressions/<target>/`),
//! run through the same checks as the targets, so that a fixed decoder
//! stays fixed without anyone running the fuzzer.

use crate::journal::{Commit, Intent};
use crate::layout::DecodeError;

/// What the `intent` target asserts: whatever decodes re-encodes to the
/// same value.
fn intent_target(data: &[u8]) {
    if let Ok(i) = Intent::decode(data) {
        assert_eq!(Intent::decode(&i.encode()).unwrap(), i);
    }
    if let Ok(c) = Commit::decode(data) {
        assert_eq!(Commit::decode(&c.encode()).unwrap(), c);
    }
}

/// Both crashed the `intent` target when labels that are not UTF-8 were
/// decoded lossily: the re-encoded label differed from the original.
/// Such a label is now refused.
#[test]
fn intents_with_labels_that_are_not_utf8_are_refused() {
    let crashes: [&[u8]; 2] = [
        include_bytes!(
            "../../fuzz/regressions/intent/crash-0ac648a568d7d5e3f737ba8f994d6606a793a200"
        ),
        include_bytes!(
            "../../fuzz/regressions/intent/crash-cde0994fa99d1ed6a7eb15ae300e54550f27feb2"
        ),
    ];
    for data in crashes {
        intent_target(data);
        match Intent::decode(data) {
            Err(DecodeError::Field { field: "text", .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
