//! Inputs the fuzz targets once crashed on (`fuzz/regressions/<target>/`),
//! run through the same checks as the targets, so that a fixed decoder
//! stays fixed without anyone running the fuzzer.

use crate::fuzzing;
use crate::journal::Intent;
use crate::layout::DecodeError;

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
        // Saved before targets took a mode byte: replayed with one.
        fuzzing::intent(&[&[0u8][..], data].concat());
        match Intent::decode(data) {
            Err(DecodeError::Field { field: "text", .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// The `records` target found a tag whose options held a NUL: it decoded,
/// and encoding it again (as any change of the tag does) panicked. Options
/// that could not be written are now refused when read.
#[test]
fn tags_with_options_that_could_not_be_written_are_refused() {
    let data = include_bytes!(
        "../../fuzz/regressions/records/crash-bc1a9c22824471a167dcf01bae28efad4c1c0dc2"
    );
    fuzzing::records(data);
    assert_eq!(crate::model::decode_options("k=a\0b"), None);
    assert_eq!(crate::model::decode_options("k=1\nk=2"), None);
    assert!(crate::model::decode_options("k=1\nj=2").is_some());
}

/// The `journal_ring` target ran out of memory: a one-page ring whose
/// record claims an oldest open intent far below its own sequence number
/// made the scan list every sequence number between as a torn record. A
/// live window larger than the ring is now corruption.
#[test]
fn a_live_window_larger_than_the_ring_is_corruption() {
    let data = include_bytes!(
        "../../fuzz/regressions/journal_ring/oom-3165dab20b329194954f748f1140f373e87016d3"
    );
    fuzzing::journal_ring(data);
}
