//! Arbitrary text as the position and cursor parameters of the query side:
//! `consistent_with` positions, `from` / `Last-Event-ID` of the event stream,
//! search cursors and view list cursors. Each is parsed or rejected, never a
//! panic, and a parsed value's canonical spelling parses to itself.
#![no_main]

use cqrsd::fuzzing::{search_cursor, stream_start, view_cursor};
use cqrsd::log::Position;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(position) = text.parse::<Position>() {
        assert_eq!(position.to_string().parse::<Position>().unwrap(), position);
    }
    if let Ok(canonical) = stream_start(text) {
        assert_eq!(stream_start(&canonical).as_deref(), Ok(canonical.as_str()));
    }
    if let Ok(canonical) = search_cursor(text) {
        assert_eq!(search_cursor(&canonical).as_deref(), Ok(canonical.as_str()));
    }
    if let Some(canonical) = view_cursor(text) {
        assert_eq!(view_cursor(&canonical).as_deref(), Some(canonical.as_str()));
    }
});
