//! A direct MessagePack reader for the event lists cqrsd writes.
//!
//! `rmp_serde` decodes a record through serde's generic machinery: every field name is
//! matched through an identifier visitor and every value of an event's `data` goes
//! through `deserialize_any`. Decoding was 44 % of reading and decoding the log before
//! this module (BENCHMARKS.md, "Results at fd4eca9"). This module reads the one shape
//! `rmp_serde::to_vec_named` gives an event list (an array of maps with string keys) with
//! `rmp`'s markers straight into [`Event`]s.
//!
//! It is a fast path, not a second decoder of the format: [`decode_events`] answers
//! `None` for anything outside the common shape (an unknown or repeated field, a struct
//! written as an array, binary or extension values, deep nesting, a string that is not
//! UTF-8, a malformed value), and the caller then decodes with `rmp_serde`, which gives
//! the result or the error it always gave. Wherever the fast path answers, it answers
//! what `rmp_serde` would have; the property tests below check that on generated events
//! and on damaged bytes.

use chrono::{DateTime, Utc};
use rmp::Marker;
use serde_json::{Map, Number, Value};
use uuid::Uuid;

use super::record::{Event, EventMetadata};

/// Containers nested deeper than this are left to the serde path and its depth limit.
const MAX_DEPTH: usize = 32;

/// Decodes a MessagePack event list, or `None` when the bytes are not the plain shape
/// this reader takes (the caller then decodes them with `rmp_serde`).
pub(super) fn decode_events(bytes: &[u8]) -> Option<Vec<Event>> {
    let mut cur = Cursor { rest: bytes };
    let marker = cur.marker()?;
    let len = cur.array_len(marker)?;
    let mut events = Vec::with_capacity(cautious::<Event>(len, cur.rest.len()));
    for _ in 0..len {
        events.push(cur.event()?);
    }
    // `rmp_serde` ignores bytes after the value; leaving them to it keeps that its call.
    cur.rest.is_empty().then_some(events)
}

struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn marker(&mut self) -> Option<Marker> {
        let (&byte, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(Marker::from_u8(byte))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(taken)
    }

    fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<usize> {
        Some(usize::from(self.be::<1>()?[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        Some(usize::from(u16::from_be_bytes(self.be()?)))
    }

    fn u32(&mut self) -> Option<usize> {
        usize::try_from(u32::from_be_bytes(self.be()?)).ok()
    }

    fn array_len(&mut self, marker: Marker) -> Option<usize> {
        match marker {
            Marker::FixArray(n) => Some(usize::from(n)),
            Marker::Array16 => self.u16(),
            Marker::Array32 => self.u32(),
            _ => None,
        }
    }

    fn map_len(&mut self, marker: Marker) -> Option<usize> {
        match marker {
            Marker::FixMap(n) => Some(usize::from(n)),
            Marker::Map16 => self.u16(),
            Marker::Map32 => self.u32(),
            _ => None,
        }
    }

    /// The bytes of a string whose marker was just read.
    fn str_bytes(&mut self, marker: Marker) -> Option<&'a [u8]> {
        let len = match marker {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => self.u8()?,
            Marker::Str16 => self.u16()?,
            Marker::Str32 => self.u32()?,
            _ => return None,
        };
        self.take(len)
    }

    fn str_after(&mut self, marker: Marker) -> Option<&'a str> {
        std::str::from_utf8(self.str_bytes(marker)?).ok()
    }

    fn str(&mut self) -> Option<&'a str> {
        let marker = self.marker()?;
        self.str_after(marker)
    }

    /// A field name: compared as bytes, so it needs no UTF-8 check of its own (an
    /// unknown name sends the whole record to the serde path).
    fn key(&mut self) -> Option<&'a [u8]> {
        let marker = self.marker()?;
        self.str_bytes(marker)
    }

    fn optional_str(&mut self) -> Option<Option<String>> {
        match self.marker()? {
            Marker::Null => Some(None),
            marker => Some(Some(self.str_after(marker)?.to_owned())),
        }
    }

    /// An integer whose marker was just read, in any width MessagePack allows, by the
    /// signedness of its encoding (as rmp_serde hands it to a visitor); `None` when the
    /// marker is not an integer's.
    fn int_after(&mut self, marker: Marker) -> Option<Int> {
        Some(match marker {
            Marker::FixPos(n) => Int::Unsigned(u64::from(n)),
            Marker::U8 => Int::Unsigned(u64::from(self.be::<1>()?[0])),
            Marker::U16 => Int::Unsigned(u64::from(u16::from_be_bytes(self.be()?))),
            Marker::U32 => Int::Unsigned(u64::from(u32::from_be_bytes(self.be()?))),
            Marker::U64 => Int::Unsigned(u64::from_be_bytes(self.be()?)),
            Marker::FixNeg(n) => Int::Signed(i64::from(n)),
            Marker::I8 => Int::Signed(i64::from(i8::from_be_bytes(self.be()?))),
            Marker::I16 => Int::Signed(i64::from(i16::from_be_bytes(self.be()?))),
            Marker::I32 => Int::Signed(i64::from(i32::from_be_bytes(self.be()?))),
            Marker::I64 => Int::Signed(i64::from_be_bytes(self.be()?)),
            _ => return None,
        })
    }

    /// An unsigned integer (serde's `u64` takes a non-negative signed encoding too).
    fn u64(&mut self) -> Option<u64> {
        let marker = self.marker()?;
        match self.int_after(marker)? {
            Int::Unsigned(n) => Some(n),
            Int::Signed(n) => u64::try_from(n).ok(),
        }
    }

    fn uuid(&mut self) -> Option<Uuid> {
        Uuid::parse_str(self.str()?).ok()
    }

    fn timestamp(&mut self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(self.str()?)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// Reads a struct written as a map, handing each field's name to `field`, which
    /// reads the value and answers whether the field was seen for the first time. A
    /// repeated field is an error for serde: the record goes to the serde path to be
    /// refused there.
    fn fields(&mut self, mut field: impl FnMut(&mut Self, &'a [u8]) -> Option<bool>) -> Option<()> {
        let marker = self.marker()?;
        for _ in 0..self.map_len(marker)? {
            let name = self.key()?;
            if !field(self, name)? {
                return None;
            }
        }
        Some(())
    }

    fn event(&mut self) -> Option<Event> {
        let mut event_id = None;
        let mut aggregate_type = None;
        let mut aggregate_id = None;
        let mut version = None;
        let mut event_type = None;
        let mut schema_version = None;
        let mut timestamp = None;
        let mut data = None;
        let mut metadata = None;
        self.fields(|cur, name| {
            Some(match name {
                b"event_id" => set(&mut event_id, cur.uuid()?),
                b"aggregate_type" => set(&mut aggregate_type, cur.str()?.to_owned()),
                b"aggregate_id" => set(&mut aggregate_id, cur.str()?.to_owned()),
                b"version" => set(&mut version, cur.u64()?),
                b"event_type" => set(&mut event_type, cur.str()?.to_owned()),
                b"schema_version" => set(&mut schema_version, cur.u64()?),
                b"timestamp" => set(&mut timestamp, cur.timestamp()?),
                b"data" => set(&mut data, cur.value(0)?),
                b"metadata" => set(&mut metadata, cur.metadata()?),
                _ => false,
            })
        })?;
        Some(Event {
            event_id: event_id?,
            aggregate_type: aggregate_type?,
            aggregate_id: aggregate_id?,
            version: version?,
            event_type: event_type?,
            schema_version: schema_version.unwrap_or(1),
            timestamp: timestamp?,
            data: data?,
            metadata: metadata?,
        })
    }

    fn metadata(&mut self) -> Option<EventMetadata> {
        let mut command = None;
        let mut command_id = None;
        let mut idempotency_key = None;
        let mut correlation_id = None;
        let mut request_hash = None;
        let mut principal = None;
        self.fields(|cur, name| {
            Some(match name {
                b"command" => set(&mut command, cur.str()?.to_owned()),
                b"command_id" => set(&mut command_id, cur.uuid()?),
                b"idempotency_key" => set(&mut idempotency_key, cur.optional_str()?),
                b"correlation_id" => set(&mut correlation_id, cur.optional_str()?),
                b"request_hash" => set(&mut request_hash, cur.str()?.to_owned()),
                b"principal" => set(&mut principal, cur.optional_str()?),
                _ => false,
            })
        })?;
        Some(EventMetadata {
            command: command?,
            command_id: command_id?,
            idempotency_key: idempotency_key.flatten(),
            correlation_id: correlation_id.flatten(),
            request_hash: request_hash?,
            principal: principal.flatten(),
        })
    }

    /// Any JSON value, as `serde_json::Value`'s own deserializer builds it from
    /// `rmp_serde`: integers by sign, a float that JSON cannot hold (NaN, infinities) as
    /// `null`, and map keys that are strings; everything else is left to the serde path.
    fn value(&mut self, depth: usize) -> Option<Value> {
        let marker = self.marker()?;
        Some(match marker {
            Marker::Null => Value::Null,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::FixPos(_)
            | Marker::U8
            | Marker::U16
            | Marker::U32
            | Marker::U64
            | Marker::FixNeg(_)
            | Marker::I8
            | Marker::I16
            | Marker::I32
            | Marker::I64 => Value::Number(match self.int_after(marker)? {
                Int::Unsigned(n) => n.into(),
                // A non-negative signed encoding becomes a `PosInt`, as serde_json's
                // own `visit_i64` makes it.
                Int::Signed(n) => n.into(),
            }),
            Marker::F32 => float(f64::from(f32::from_be_bytes(self.be()?))),
            Marker::F64 => float(f64::from_be_bytes(self.be()?)),
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                Value::String(self.str_after(marker)?.to_owned())
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                let len = self.array_len(marker)?;
                let mut items = Vec::with_capacity(cautious::<Value>(len, self.rest.len()));
                for _ in 0..len {
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                let len = self.map_len(marker)?;
                let mut map = Map::new();
                for _ in 0..len {
                    let key = self.str()?.to_owned();
                    let value = self.value(depth + 1)?;
                    // The last of repeated keys wins, as in serde_json's own visitor.
                    map.insert(key, value);
                }
                Value::Object(map)
            }
            _ => return None,
        })
    }
}

/// An integer as its encoding's signedness gives it.
enum Int {
    Unsigned(u64),
    Signed(i64),
}

/// How many elements to allocate for a container that claims `len` of them: a length
/// read from the bytes is not trusted further than the bytes left (each element takes
/// at least one) and than serde's own cap of 1 MiB preallocated, so a corrupt length
/// cannot make a small record allocate a large block.
fn cautious<T>(len: usize, bytes_left: usize) -> usize {
    const MAX_PREALLOC_BYTES: usize = 1 << 20;
    len.min(bytes_left)
        .min(MAX_PREALLOC_BYTES / std::mem::size_of::<T>().max(1))
}

/// Fills a field seen for the first time; `false` when it was seen before.
fn set<T>(slot: &mut Option<T>, value: T) -> bool {
    slot.replace(value).is_none()
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serde_decode(bytes: &[u8]) -> Result<Vec<Event>, String> {
        let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
        de.set_max_depth(128);
        serde::Deserialize::deserialize(&mut de).map_err(|e| e.to_string())
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        (
            (any::<u128>(), ".{0,10}", ".{0,10}", any::<u64>(), ".{0,10}"),
            (
                1u64..5,
                -62_000_000_000_000i64..250_000_000_000_000,
                arb_json(),
            ),
            (
                ".{0,10}",
                any::<u128>(),
                proptest::option::of(".{0,10}"),
                proptest::option::of(".{0,10}"),
                ".{0,10}",
                proptest::option::of(".{0,10}"),
            ),
        )
            .prop_map(|(head, (schema_version, millis, data), meta)| Event {
                event_id: Uuid::from_u128(head.0),
                aggregate_type: head.1,
                aggregate_id: head.2,
                version: head.3,
                event_type: head.4,
                schema_version,
                timestamp: DateTime::from_timestamp_millis(millis).unwrap(),
                data,
                metadata: EventMetadata {
                    command: meta.0,
                    command_id: Uuid::from_u128(meta.1),
                    idempotency_key: meta.2,
                    correlation_id: meta.3,
                    request_hash: meta.4,
                    principal: meta.5,
                },
            })
    }

    proptest! {
        /// What the daemon writes, the fast path reads, and reads as serde does.
        #[test]
        fn written_event_lists_decode_as_serde_decodes_them(
            events in prop::collection::vec(arb_event(), 0..4),
        ) {
            let bytes = rmp_serde::to_vec_named(&events).unwrap();
            let fast = decode_events(&bytes);
            prop_assert_eq!(fast.as_ref(), Some(&events));
            prop_assert_eq!(serde_decode(&bytes), Ok(events));
        }

        /// Damaged bytes: wherever the fast path still answers, serde answers the same.
        #[test]
        fn damaged_event_lists_decode_as_serde_decodes_them_or_go_to_serde(
            events in prop::collection::vec(arb_event(), 1..3),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = rmp_serde::to_vec_named(&events).unwrap();
            for (index, byte) in flips {
                let i = index.index(bytes.len());
                bytes[i] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len()));
            }
            if let Some(fast) = decode_events(&bytes) {
                prop_assert_eq!(serde_decode(&bytes), Ok(fast));
            }
        }

        /// Any bytes at all: never a panic, and never an answer serde would not give.
        #[test]
        fn arbitrary_bytes_decode_as_serde_decodes_them_or_go_to_serde(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            if let Some(fast) = decode_events(&bytes) {
                prop_assert_eq!(serde_decode(&bytes), Ok(fast));
            }
        }
    }

    #[test]
    fn a_claimed_length_allocates_no_more_than_the_bytes_and_a_mebibyte_allow() {
        // A corrupt record of a mebibyte claiming four billion events.
        let mut bytes = vec![0xdd, 0xff, 0xff, 0xff, 0xff];
        bytes.resize(1 << 20, 0x90);
        assert_eq!(decode_events(&bytes), None);
        let events = cautious::<Event>(u32::MAX as usize, bytes.len());
        assert!(events * std::mem::size_of::<Event>() <= 1 << 20);
        assert_eq!(cautious::<Value>(3, 100), 3);
        assert_eq!(cautious::<Value>(1_000, 10), 10);
    }

    #[test]
    fn shapes_outside_the_plain_one_go_to_serde() {
        let event = Event {
            event_id: Uuid::from_u128(7),
            aggregate_type: "account".into(),
            aggregate_id: "a-1".into(),
            version: 1,
            event_type: "Opened".into(),
            // Above 1, so that the positional encoding below writes every field (a
            // skipped `schema_version` shifts the rest, and serde cannot read it either).
            schema_version: 2,
            timestamp: DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
            data: serde_json::json!({ "owner": "ann", "limits": [1, -2, 2.5] }),
            metadata: EventMetadata {
                command: "open".into(),
                command_id: Uuid::from_u128(8),
                idempotency_key: None,
                correlation_id: Some("c".into()),
                request_hash: "sha256:00".into(),
                principal: None,
            },
        };
        // Structs written as arrays (`rmp_serde::to_vec`): serde reads them, the fast
        // path does not try.
        let positional = rmp_serde::to_vec(&vec![event.clone()]).unwrap();
        assert_eq!(decode_events(&positional), None);
        assert_eq!(serde_decode(&positional), Ok(vec![event.clone()]));
        // Trailing bytes after the list: serde's call.
        let mut trailing = rmp_serde::to_vec_named(&vec![event.clone()]).unwrap();
        trailing.push(0xc0);
        assert_eq!(decode_events(&trailing), None);
        // An unknown field: serde ignores it; the fast path leaves it to serde.
        let mut value = serde_json::to_value(&event).unwrap();
        value["extra"] = serde_json::json!(1);
        let unknown = rmp_serde::to_vec_named(&vec![value]).unwrap();
        assert_eq!(decode_events(&unknown), None);
        assert_eq!(serde_decode(&unknown), Ok(vec![event]));
    }
}
