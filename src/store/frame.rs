//! The segment log's on-disk framing of one record (documented in docs/record-format.md).
//!
//! A frame is `length u32 BE ‖ CRC-32 u32 BE ‖ offset u64 BE ‖ record body`, where the
//! length and the CRC both cover everything after the CRC. The offset inside the frame
//! lets recovery and the index rebuild check that a segment's records are dense without
//! trusting anything else, and the CRC detects a record damaged anywhere between write
//! and read (a torn write, a bad copy, a manual edit) so that it is reported or repaired,
//! never handed to a projection as valid data.

use crate::log::Record;

use super::StoreError;

/// Bytes before the checked payload: length and CRC.
pub(crate) const FRAME_HEADER_LEN: usize = 4 + 4;
/// The smallest payload: offset, timestamp, and three empty varint-prefixed fields.
const MIN_PAYLOAD_LEN: usize = 8 + 8 + 1 + 1 + 1;
/// Header names the cqrsd record format always uses (docs/record-format.md section 4),
/// stored as one-byte codes (1 = the first) instead of spelled out: they would otherwise
/// take about 190 bytes of every record. The table is part of the segment format:
/// entries are only ever appended.
const KNOWN_HEADERS: [&str; 6] = [
    "cqrsd-format",
    "content-type",
    "cqrsd-aggregate-type",
    "cqrsd-version-first",
    "cqrsd-version-last",
    "cqrsd-event-types",
];
/// The largest payload a frame may declare. Far above any record the daemon writes (a
/// command's body is bounded by the HTTP limits); a larger length is damage, and
/// bounding it keeps recovery from allocating whatever a garbage length says.
pub(crate) const MAX_PAYLOAD_LEN: usize = 256 << 20;

/// Appends the frame of `record` at `offset` to `out`.
pub(crate) fn encode_frame(
    offset: u64,
    record: &Record,
    out: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&record.timestamp_ms.to_be_bytes());
    put_bytes(out, record.key.as_bytes());
    put_varint(out, record.headers.len() as u64);
    for (name, value) in &record.headers {
        match KNOWN_HEADERS
            .iter()
            .position(|known| *known == name.as_str())
        {
            // Codes start at 1; 0 announces a name spelled out.
            Some(code) => out.push(code as u8 + 1),
            None => {
                out.push(0);
                put_bytes(out, name.as_bytes());
            }
        }
        put_bytes(out, value);
    }
    put_bytes(out, &record.value);

    let payload_len = out.len() - start - FRAME_HEADER_LEN;
    if payload_len > MAX_PAYLOAD_LEN {
        out.truncate(start);
        return Err(StoreError::InvalidRequest(format!(
            "a record of {payload_len} bytes is larger than the log's limit of {MAX_PAYLOAD_LEN}"
        )));
    }
    let crc = crc32fast::hash(&out[start + FRAME_HEADER_LEN..]);
    // At most MAX_PAYLOAD_LEN, checked above, so it fits.
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// What the bytes at the start of a buffer hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    /// A frame whose CRC matches: its offset and its total length (header included).
    Frame { offset: u64, len: usize },
    /// The buffer ends inside a frame whose declared length is plausible; `need` is the
    /// frame's total length.
    Short { need: usize },
    /// Not a frame: a length out of bounds, or a CRC mismatch.
    Invalid(&'static str),
}

/// Checks the frame at the start of `buf` without decoding its record.
pub(crate) fn scan_frame(buf: &[u8]) -> Scan {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Scan::Short {
            need: FRAME_HEADER_LEN,
        };
    };
    let payload_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if payload_len == 0 {
        return Scan::Invalid("zero length");
    }
    if !(MIN_PAYLOAD_LEN..=MAX_PAYLOAD_LEN).contains(&payload_len) {
        return Scan::Invalid("length out of bounds");
    }
    let need = FRAME_HEADER_LEN + payload_len;
    let Some(payload) = buf.get(FRAME_HEADER_LEN..need) else {
        return Scan::Short { need };
    };
    let stored_crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if crc32fast::hash(payload) != stored_crc {
        return Scan::Invalid("CRC32 mismatch");
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&payload[..8]);
    Scan::Frame {
        offset: u64::from_be_bytes(offset),
        len: need,
    }
}

/// Decodes a whole frame (as `scan_frame` delimited it) into its offset and record,
/// checking it first: the tests' way to hand a frame from anywhere to the decoder.
#[cfg(test)]
pub(crate) fn decode_frame(
    frame: &[u8],
    what: &dyn Fn() -> String,
) -> Result<(u64, Record), StoreError> {
    let corrupt = |detail: &str| StoreError::corrupt(what(), detail);
    match scan_frame(frame) {
        Scan::Frame { offset, len } if len == frame.len() => {
            Ok((offset, decode_scanned_frame(frame, what)?))
        }
        Scan::Frame { .. } => Err(corrupt("trailing bytes after the frame")),
        Scan::Short { .. } => Err(corrupt("frame is truncated")),
        Scan::Invalid(reason) => Err(corrupt(reason)),
    }
}

/// Decodes the record of a frame that `scan_frame` has just accepted in the same
/// buffer: its length and CRC are checked already, and checking the CRC again was a
/// twentieth of a log read.
pub(crate) fn decode_scanned_frame(
    frame: &[u8],
    what: &dyn Fn() -> String,
) -> Result<Record, StoreError> {
    let corrupt = |detail: &str| StoreError::corrupt(what(), detail);
    let body = frame
        .get(FRAME_HEADER_LEN + 8..)
        .ok_or_else(|| corrupt("frame is truncated"))?;
    decode_body(body, &corrupt)
}

/// Decodes a record body: timestamp, key, headers, value.
fn decode_body(body: &[u8], corrupt: &dyn Fn(&str) -> StoreError) -> Result<Record, StoreError> {
    let mut cur = Cursor { rest: body };
    let truncated = || corrupt("frame is truncated");
    let timestamp_ms = i64::from_be_bytes(cur.array().ok_or_else(truncated)?);
    let key = String::from_utf8(cur.bytes().ok_or_else(truncated)?.to_vec())
        .map_err(|_| corrupt("key is not UTF-8"))?;
    let header_count = cur.varint().ok_or_else(truncated)?;
    // Each header takes at least 2 bytes, which bounds the allocation by the frame size.
    let capacity = usize::try_from(header_count)
        .unwrap_or(usize::MAX)
        .min(cur.rest.len() / 2);
    let mut headers = Vec::with_capacity(capacity);
    for _ in 0..header_count {
        let code = cur.take(1).ok_or_else(truncated)?[0];
        let name = match code {
            0 => String::from_utf8(cur.bytes().ok_or_else(truncated)?.to_vec())
                .map_err(|_| corrupt("header name is not UTF-8"))?,
            code => (*KNOWN_HEADERS
                .get(usize::from(code) - 1)
                .ok_or_else(|| corrupt("unknown header code"))?)
            .to_owned(),
        };
        let value = cur.bytes().ok_or_else(truncated)?.to_vec();
        headers.push((name, value));
    }
    let value = cur.bytes().ok_or_else(truncated)?.to_vec();
    if !cur.rest.is_empty() {
        return Err(corrupt("trailing bytes after the record"));
    }
    Ok(Record {
        key,
        headers,
        value,
        timestamp_ms,
    })
}

/// Appends `n` as an unsigned LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Appends `bytes` with its length as a varint.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A bounds-checked reader: every method returns `None` instead of reading past the end.
/// Also used by the migration's reader of the sled log's frames (`u32`, `u32_bytes`).
pub(super) struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Cursor { rest: bytes }
    }

    pub(super) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    /// Bytes with their length as a u32 BE.
    pub(super) fn u32_bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|b| b.try_into().ok())
    }

    /// An unsigned LEB128 varint of at most 10 bytes that fits in a u64.
    fn varint(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for i in 0..10 {
            let b = self.take(1)?[0];
            let bits = u64::from(b & 0x7F);
            if i == 9 && b > 1 {
                return None;
            }
            n |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn what() -> String {
        "test frame".to_owned()
    }

    fn record() -> Record {
        Record {
            key: "acc-1".to_owned(),
            headers: vec![("a".to_owned(), b"1".to_vec()), ("b".to_owned(), vec![])],
            value: vec![1, 2, 3],
            timestamp_ms: -5,
        }
    }

    #[test]
    fn crc_is_ieee_crc32() {
        // The format pins CRC-32/ISO-HDLC (zlib, PNG); this is its check value.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn frame_round_trip() {
        let mut buf = vec![0xAA];
        encode_frame(17, &record(), &mut buf).unwrap();
        let frame = &buf[1..];
        assert_eq!(
            scan_frame(frame),
            Scan::Frame {
                offset: 17,
                len: frame.len()
            }
        );
        assert_eq!(decode_frame(frame, &what).unwrap(), (17, record()));
    }

    #[test]
    fn known_headers_take_one_byte_and_others_round_trip() {
        let mut record = record();
        record.headers = vec![
            ("cqrsd-format".to_owned(), b"1".to_vec()),
            ("content-type".to_owned(), b"application/msgpack".to_vec()),
            ("x-other".to_owned(), vec![0xFF; 200]),
        ];
        let mut frame = Vec::new();
        encode_frame(u64::MAX, &record, &mut frame).unwrap();
        assert_eq!(
            decode_frame(&frame, &what).unwrap(),
            (u64::MAX, record.clone())
        );
        // Header, offset, timestamp, key, count, 2 known (code, value), 1 spelled out, value.
        let expected =
            8 + 8 + 8 + (1 + 5) + 1 + (1 + 2) + (1 + 20) + (1 + 1 + 7 + 2 + 200) + (1 + 3);
        assert_eq!(frame.len(), expected);
        // An unknown code is damage, not a guess.
        let mut body = Vec::new();
        body.extend_from_slice(&0u64.to_be_bytes());
        body.extend_from_slice(&0i64.to_be_bytes());
        body.extend_from_slice(&[0, 1, 42, 0, 0]);
        let mut framed = Vec::new();
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        framed.extend_from_slice(&body);
        assert!(matches!(
            decode_frame(&framed, &what),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn damaged_frames_are_detected() {
        let mut frame = Vec::new();
        encode_frame(3, &record(), &mut frame).unwrap();
        for cut in 0..frame.len() {
            assert!(
                matches!(scan_frame(&frame[..cut]), Scan::Short { .. }),
                "{cut}"
            );
            assert!(matches!(
                decode_frame(&frame[..cut], &what),
                Err(StoreError::Corrupt { .. })
            ));
        }
        for at in 0..frame.len() {
            let mut flipped = frame.clone();
            flipped[at] ^= 0x40;
            assert!(
                !matches!(scan_frame(&flipped), Scan::Frame { .. }),
                "flip at {at} not detected"
            );
        }
        assert_eq!(scan_frame(&[0; 64]), Scan::Invalid("zero length"));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = scan_frame(&bytes);
            let _ = decode_frame(&bytes, &what);
            // Also with a valid header, so the body parser itself is exercised.
            let mut framed = Vec::new();
            framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            framed.extend_from_slice(&crc32fast::hash(&bytes).to_be_bytes());
            framed.extend_from_slice(&bytes);
            let _ = decode_frame(&framed, &what);
        }
    }
}
