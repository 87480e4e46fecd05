//! Arbitrary bytes as a record value, in either encoding: decoding gives
//! events or an error, never a panic. Decoded events that the writer would
//! accept must survive encode → decode unchanged after one normalization
//! (the writer truncates timestamps to milliseconds, and MessagePack may
//! widen numbers on the first pass).
#![no_main]

use cqrsd::log::record::{FORMAT_VERSION, HEADER_CONTENT_TYPE, HEADER_FORMAT};
use cqrsd::log::{Encoding, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, value)) = data.split_first() else {
        return;
    };
    let encoding = if selector % 2 == 0 {
        Encoding::Json
    } else {
        Encoding::MessagePack
    };
    let headers = vec![
        (HEADER_FORMAT.to_owned(), FORMAT_VERSION.as_bytes().to_vec()),
        (
            HEADER_CONTENT_TYPE.to_owned(),
            encoding.content_type().as_bytes().to_vec(),
        ),
    ];
    let Ok(events) = decode(&headers, value) else {
        return;
    };
    let Ok(record) = encode(&events, encoding) else {
        // The reader is more lenient than the writer (e.g. gaps in versions
        // are the writer's to refuse); such records are not round-tripped.
        return;
    };
    let normalized = decode(&record.headers, &record.value).expect("an encoded record decodes");
    let again = encode(&normalized, encoding).expect("decoded events encode again");
    let twice = decode(&again.headers, &again.value).expect("an encoded record decodes");
    assert_eq!(normalized, twice);
    assert_eq!(record, again);
});
