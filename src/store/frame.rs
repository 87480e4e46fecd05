//! The embedded log's on-disk framing of one record (documented in docs/record-format.md).
//!
//! sled checksums its own pages, but a frame carries its own CRC so that a record damaged
//! anywhere between write and read (a bug, a bad copy, a manual edit) is detected and
//! reported as corrupt instead of being handed to a projection as valid data.

use crate::log::Record;

use super::StoreError;

/// Version of the frame layout, the first byte of every frame.
pub(crate) const FRAME_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 4;

pub(crate) fn encode_frame(record: &Record) -> Result<Vec<u8>, StoreError> {
    let too_long =
        |what: &str| StoreError::InvalidRequest(format!("record {what} is larger than 4 GiB"));
    let len32 = |n: usize, what: &str| u32::try_from(n).map_err(|_| too_long(what));

    let mut body = Vec::with_capacity(
        8 + 4 + record.key.len() + 4 + record.value.len() + 4 + record.headers.len() * 32,
    );
    body.extend_from_slice(&record.timestamp_ms.to_be_bytes());
    body.extend_from_slice(&len32(record.key.len(), "key")?.to_be_bytes());
    body.extend_from_slice(record.key.as_bytes());
    body.extend_from_slice(&len32(record.headers.len(), "header list")?.to_be_bytes());
    for (name, value) in &record.headers {
        body.extend_from_slice(&len32(name.len(), "header name")?.to_be_bytes());
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&len32(value.len(), "header value")?.to_be_bytes());
        body.extend_from_slice(value);
    }
    body.extend_from_slice(&len32(record.value.len(), "value")?.to_be_bytes());
    body.extend_from_slice(&record.value);

    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.push(FRAME_VERSION);
    frame.extend_from_slice(&crc32(&body).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

pub(crate) fn decode_frame(frame: &[u8], what: &dyn Fn() -> String) -> Result<Record, StoreError> {
    let corrupt = |detail: &str| StoreError::corrupt(what(), detail);
    if frame.len() < HEADER_LEN {
        return Err(corrupt("frame is shorter than its header"));
    }
    if frame[0] != FRAME_VERSION {
        return Err(corrupt(&format!("unknown frame version {}", frame[0])));
    }
    let stored_crc = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]);
    let body = &frame[HEADER_LEN..];
    if crc32(body) != stored_crc {
        return Err(corrupt("CRC32 mismatch"));
    }

    let mut cur = Cursor { rest: body };
    let truncated = || corrupt("frame is truncated");
    let timestamp_ms = i64::from_be_bytes(cur.array().ok_or_else(truncated)?);
    let key = cur
        .string()
        .ok_or_else(truncated)?
        .map_err(|_| corrupt("key is not UTF-8"))?;
    let header_count = cur.u32().ok_or_else(truncated)?;
    // Each header takes at least 8 bytes, which bounds the allocation by the frame size.
    let capacity = usize::try_from(header_count)
        .unwrap_or(usize::MAX)
        .min(cur.rest.len() / 8);
    let mut headers = Vec::with_capacity(capacity);
    for _ in 0..header_count {
        let name = cur
            .string()
            .ok_or_else(truncated)?
            .map_err(|_| corrupt("header name is not UTF-8"))?;
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

/// A bounds-checked reader: every method returns `None` instead of reading past the end.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|b| b.try_into().ok())
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    fn string(&mut self) -> Option<Result<String, std::string::FromUtf8Error>> {
        self.bytes().map(|b| String::from_utf8(b.to_vec()))
    }
}

/// CRC-32 (IEEE 802.3, the zlib/PNG polynomial), table-driven. Written here rather than
/// taken as a dependency because it is twenty lines and the format must pin it exactly.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc ^ 0xFFFF_FFFF
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn what() -> String {
        "test frame".to_owned()
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn frame_round_trip() {
        let record = Record {
            key: "acc-1".to_owned(),
            headers: vec![("a".to_owned(), b"1".to_vec()), ("b".to_owned(), vec![])],
            value: vec![1, 2, 3],
            timestamp_ms: -5,
        };
        let frame = encode_frame(&record).unwrap();
        assert_eq!(decode_frame(&frame, &what).unwrap(), record);
    }

    #[test]
    fn damaged_frames_are_corrupt() {
        let record = Record {
            key: "k".into(),
            headers: vec![],
            value: vec![9; 10],
            timestamp_ms: 1,
        };
        let frame = encode_frame(&record).unwrap();
        for cut in 0..frame.len() {
            assert!(matches!(
                decode_frame(&frame[..cut], &what),
                Err(StoreError::Corrupt { .. })
            ));
        }
        let mut flipped = frame.clone();
        flipped[10] ^= 0x40;
        assert!(matches!(
            decode_frame(&flipped, &what),
            Err(StoreError::Corrupt { .. })
        ));
        let mut version = frame;
        version[0] = 9;
        assert!(matches!(
            decode_frame(&version, &what),
            Err(StoreError::Corrupt { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_frame_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes, &what);
            // Also with a valid CRC, so the body parser itself is exercised.
            let mut framed = vec![FRAME_VERSION];
            framed.extend_from_slice(&crc32(&bytes).to_be_bytes());
            framed.extend_from_slice(&bytes);
            let _ = decode_frame(&framed, &what);
        }
    }
}
