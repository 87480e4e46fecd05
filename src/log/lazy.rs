//! Events decoded as far as their readers need them.
//!
//! A reader that routes events (which projection handles this type? which
//! document does it change?) needs an event's headers: its type, aggregate,
//! versions and timestamp. Only some readers need its data, and almost none
//! its metadata. [`decode_current_lazy`] decodes the headers of every event
//! of a MessagePack record, checks the rest of the record exactly as the
//! serde decoder of [`super::decode`] would (so a record is accepted or
//! refused the same way by every reader, lazy or not; the one exception is
//! an event or metadata written as a positional array, which the format
//! excludes and this decoder refuses), and keeps where each
//! event's data and metadata lie in the record's bytes: the data becomes a
//! `serde_json::Value` the first time a reader asks for it, once, however
//! many projections read it; the metadata only when a whole [`Event`] is
//! asked for. JSON records (not the default encoding) are decoded whole.
//!
//! Upcasting runs here ([`upcast`], which [`super::decode_current`] runs
//! too, so no read path can skip it): an event whose type's current
//! version differs from the one it was written with has its data decoded
//! and brought to the current version before the reader sees it.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::record::{Encoding, Event, EventMetadata, MAX_MSGPACK_DEPTH, RecordError, encoding_of};

/// One stored event whose data and metadata are decoded on demand.
#[derive(Debug)]
pub struct LazyEvent {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: u64,
    pub event_type: String,
    /// The event type's data version, current once decoded through
    /// [`decode_current_lazy`].
    pub schema_version: u64,
    pub timestamp: DateTime<Utc>,
    /// The data, once decoded (or upcast, or given whole).
    data: OnceLock<serde_json::Value>,
    body: Body,
}

#[derive(Debug)]
enum Body {
    /// Data and metadata are still MessagePack in the record's bytes; the
    /// record was checked to decode, so these decode too.
    Raw {
        bytes: Arc<Vec<u8>>,
        data: Range<usize>,
        metadata: Range<usize>,
    },
    /// The event was decoded whole (a JSON record, or built in memory).
    Decoded(EventMetadata),
}

impl From<Event> for LazyEvent {
    fn from(event: Event) -> Self {
        Self {
            event_id: event.event_id,
            aggregate_type: event.aggregate_type,
            aggregate_id: event.aggregate_id,
            version: event.version,
            event_type: event.event_type,
            schema_version: event.schema_version,
            timestamp: event.timestamp,
            data: OnceLock::from(event.data),
            body: Body::Decoded(event.metadata),
        }
    }
}

impl LazyEvent {
    /// The event's data, decoded the first time it is asked for.
    pub fn data(&self) -> Result<&serde_json::Value, RecordError> {
        if let Some(data) = self.data.get() {
            return Ok(data);
        }
        let value = match &self.body {
            Body::Raw { bytes, data, .. } => msgpack_part(bytes, data, "data")?,
            // A decoded event always has its data.
            Body::Decoded(_) => serde_json::Value::Null,
        };
        Ok(self.data.get_or_init(|| value))
    }

    /// The event as the domain's handlers see it (which decodes its data).
    pub fn input(&self) -> Result<crate::domain::EventInput<'_>, RecordError> {
        Ok(crate::domain::EventInput {
            event_type: &self.event_type,
            data: self.data()?,
            aggregate_id: &self.aggregate_id,
            version: self.version,
            timestamp: self.timestamp,
        })
    }

    /// The event's metadata, decoded.
    pub fn metadata(&self) -> Result<EventMetadata, RecordError> {
        match &self.body {
            Body::Raw {
                bytes, metadata, ..
            } => msgpack_part(bytes, metadata, "metadata"),
            Body::Decoded(metadata) => Ok(metadata.clone()),
        }
    }

    /// The whole event, decoded.
    pub fn to_event(&self) -> Result<Event, RecordError> {
        Ok(Event {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            version: self.version,
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            timestamp: self.timestamp,
            data: self.data()?.clone(),
            metadata: self.metadata()?,
        })
    }

    /// The whole event, decoded, without copying what is decoded already.
    pub fn into_event(self) -> Result<Event, RecordError> {
        let metadata = self.metadata()?;
        let data = match self.data.into_inner() {
            Some(data) => data,
            None => match &self.body {
                Body::Raw { bytes, data, .. } => msgpack_part(bytes, data, "data")?,
                Body::Decoded(_) => serde_json::Value::Null,
            },
        };
        Ok(Event {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            version: self.version,
            event_type: self.event_type,
            schema_version: self.schema_version,
            timestamp: self.timestamp,
            data,
            metadata,
        })
    }
}

/// Decodes a part of a checked record (an event's data or metadata).
fn msgpack_part<T: DeserializeOwned>(
    bytes: &[u8],
    range: &Range<usize>,
    what: &str,
) -> Result<T, RecordError> {
    let malformed = |reason: String| RecordError::Malformed {
        encoding: "msgpack",
        reason: format!("event {what}: {reason}"),
    };
    let part = bytes
        .get(range.clone())
        .ok_or_else(|| malformed("out of the record".to_owned()))?;
    let mut de = rmp_serde::Deserializer::from_read_ref(part);
    de.set_max_depth(MAX_MSGPACK_DEPTH);
    T::deserialize(&mut de).map_err(|e| malformed(e.to_string()))
}

/// Decodes a record's events as far as their headers and brings each to
/// the current version of its type in `domain` (DESIGN.md §3.3): the read
/// path of readers that route events before they read them (projections,
/// policies, rebuilds); [`super::decode_current`] decodes whole, with the
/// same upcasting, for those that need every event. A record is refused
/// here exactly when
/// [`super::decode`] refuses it, and an event that cannot be upcast makes
/// the record an [`RecordError::Upcast`] error.
pub fn decode_current_lazy(
    domain: &crate::domain::Domain,
    headers: &[(String, Vec<u8>)],
    value: Vec<u8>,
) -> Result<Vec<LazyEvent>, RecordError> {
    let mut events = match encoding_of(headers)? {
        Encoding::Json => super::decode(headers, &value)?
            .into_iter()
            .map(LazyEvent::from)
            .collect(),
        Encoding::MessagePack => {
            let parsed = parse_msgpack(&value).map_err(|reason| RecordError::Malformed {
                encoding: "msgpack",
                reason,
            })?;
            let bytes = Arc::new(value);
            parsed
                .into_iter()
                .map(|p| LazyEvent {
                    event_id: p.event_id,
                    aggregate_type: p.aggregate_type,
                    aggregate_id: p.aggregate_id,
                    version: p.version,
                    event_type: p.event_type,
                    schema_version: p.schema_version,
                    timestamp: p.timestamp,
                    data: OnceLock::new(),
                    body: Body::Raw {
                        bytes: bytes.clone(),
                        data: p.data,
                        metadata: p.metadata,
                    },
                })
                .collect::<Vec<_>>()
        }
    };
    upcast(domain, &mut events)?;
    Ok(events)
}

/// Brings events to the current versions of their types in place. Only an
/// event written at another version than its type's current one has its
/// data decoded for it.
pub(super) fn upcast(
    domain: &crate::domain::Domain,
    events: &mut [LazyEvent],
) -> Result<(), RecordError> {
    for (index, event) in events.iter_mut().enumerate() {
        if event.schema_version == 1 && !domain.has_versions() {
            continue;
        }
        if !domain.upcast_needed(
            &event.aggregate_type,
            &event.event_type,
            event.schema_version,
        ) {
            continue;
        }
        let upcast = domain
            .upcast(&event.aggregate_type, &event.input()?, event.schema_version)
            .map_err(|e| RecordError::Upcast {
                index,
                event_type: event.event_type.clone(),
                schema_version: event.schema_version,
                reason: e.to_string(),
            })?;
        if let Some(data) = upcast {
            event.data = OnceLock::from(data);
            event.schema_version = domain
                .aggregate(&event.aggregate_type)
                .map_or(1, |a| a.event_version(&event.event_type));
        }
    }
    Ok(())
}

/// An event's headers, and where its data and metadata lie in the record.
struct Parsed {
    event_id: Uuid,
    aggregate_type: String,
    aggregate_id: String,
    version: u64,
    event_type: String,
    schema_version: u64,
    timestamp: DateTime<Utc>,
    data: Range<usize>,
    metadata: Range<usize>,
}

/// The fields of an event, in the order of [`Event`]'s declaration: serde's
/// derived decoder also takes a field's index for its name.
const EVENT_FIELDS: [&str; 9] = [
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "version",
    "event_type",
    "schema_version",
    "timestamp",
    "data",
    "metadata",
];

/// The same for [`EventMetadata`].
const METADATA_FIELDS: [&str; 6] = [
    "command",
    "command_id",
    "idempotency_key",
    "correlation_id",
    "request_hash",
    "principal",
];

/// Parses a MessagePack event list, checking it as `rmp_serde` checks it
/// when it decodes a `Vec<Event>` (see [`Reader`]).
fn parse_msgpack(value: &[u8]) -> Result<Vec<Parsed>, String> {
    let mut reader = Reader {
        bytes: value,
        pos: 0,
        depth: u16::try_from(MAX_MSGPACK_DEPTH).unwrap_or(u16::MAX),
    };
    let Item::Array(count) = reader.item()? else {
        return Err("the value is not an array of events".to_owned());
    };
    reader.enter()?;
    let mut events = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1024));
    for _ in 0..count {
        events.push(reader.event()?);
    }
    reader.leave();
    // Like `rmp_serde`, bytes after the list are not looked at.
    let Some(first) = events.first() else {
        return Err("the event list is empty".to_owned());
    };
    if events
        .iter()
        .any(|e| e.aggregate_type != first.aggregate_type || e.aggregate_id != first.aggregate_id)
    {
        return Err("the events belong to more than one aggregate".to_owned());
    }
    Ok(events)
}

/// One MessagePack item's head: a scalar, or a container's length.
enum Item<'a> {
    Nil,
    Bool,
    Unsigned(u64),
    Signed(i64),
    Float,
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(u32),
    Map(u32),
    Ext,
}

/// A MessagePack reader over a record's bytes that accepts exactly what
/// `rmp_serde` (1.x, with the same depth limit) accepts for each part of an
/// event: serde's derived struct decoding for the event and its metadata
/// (fields by name or by index, unknown fields skipped whatever they hold,
/// duplicates refused), `String` for the ids and names (a `str` or a `bin`
/// holding UTF-8), strict strings for the UUIDs and the timestamp, and
/// `serde_json::Value` for the data (no `bin` or `ext`, string keys only).
/// Positional (array) events are refused: the format never writes them.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Containers left before the depth limit, counted like `rmp_serde`.
    depth: u16,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| "the value ends in the middle of an item".to_owned())?;
        let taken = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len(&mut self, width: usize) -> Result<usize, String> {
        Ok(match width {
            1 => usize::from(self.array::<1>()?[0]),
            2 => usize::from(u16::from_be_bytes(self.array()?)),
            _ => usize::try_from(u32::from_be_bytes(self.array()?)).unwrap_or(usize::MAX),
        })
    }

    fn item(&mut self) -> Result<Item<'a>, String> {
        let marker = self.array::<1>()?[0];
        Ok(match marker {
            0x00..=0x7f => Item::Unsigned(u64::from(marker)),
            0x80..=0x8f => Item::Map(u32::from(marker & 0x0f)),
            0x90..=0x9f => Item::Array(u32::from(marker & 0x0f)),
            0xa0..=0xbf => Item::Str(self.take(usize::from(marker & 0x1f))?),
            0xc0 => Item::Nil,
            0xc1 => return Err("reserved MessagePack marker 0xc1".to_owned()),
            0xc2 | 0xc3 => Item::Bool,
            0xc4..=0xc6 => {
                let n = self.len(1 << (marker - 0xc4))?;
                Item::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.len(1 << (marker - 0xc7))?;
                self.take(1)?;
                self.take(n)?;
                Item::Ext
            }
            0xca => {
                self.take(4)?;
                Item::Float
            }
            0xcb => {
                self.take(8)?;
                Item::Float
            }
            0xcc => Item::Unsigned(u64::from(self.array::<1>()?[0])),
            0xcd => Item::Unsigned(u64::from(u16::from_be_bytes(self.array()?))),
            0xce => Item::Unsigned(u64::from(u32::from_be_bytes(self.array()?))),
            0xcf => Item::Unsigned(u64::from_be_bytes(self.array()?)),
            0xd0 => Item::Signed(i64::from(i8::from_be_bytes(self.array()?))),
            0xd1 => Item::Signed(i64::from(i16::from_be_bytes(self.array()?))),
            0xd2 => Item::Signed(i64::from(i32::from_be_bytes(self.array()?))),
            0xd3 => Item::Signed(i64::from_be_bytes(self.array()?)),
            0xd4..=0xd8 => {
                self.take(1)?;
                self.take(1 << (marker - 0xd4))?;
                Item::Ext
            }
            0xd9..=0xdb => {
                let n = self.len(1 << (marker - 0xd9))?;
                Item::Str(self.take(n)?)
            }
            0xdc | 0xdd => {
                Item::Array(u32::try_from(self.len(2 << (marker - 0xdc))?).unwrap_or(u32::MAX))
            }
            0xde | 0xdf => {
                Item::Map(u32::try_from(self.len(2 << (marker - 0xde))?).unwrap_or(u32::MAX))
            }
            0xe0..=0xff => Item::Signed(i64::from(marker as i8)),
        })
    }

    /// Enters a container (or an `ext`, which `rmp_serde` counts as one).
    fn enter(&mut self) -> Result<(), String> {
        self.depth -= 1;
        if self.depth == 0 {
            return Err("the value nests too deeply".to_owned());
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth += 1;
    }

    /// Skips any one item, as serde's `IgnoredAny` does an unknown field.
    fn skip(&mut self) -> Result<(), String> {
        match self.item()? {
            Item::Array(n) => {
                self.enter()?;
                for _ in 0..n {
                    self.skip()?;
                }
                self.leave();
            }
            Item::Map(n) => {
                self.enter()?;
                for _ in 0..n {
                    self.skip()?;
                    self.skip()?;
                }
                self.leave();
            }
            Item::Ext => {
                self.enter()?;
                self.leave();
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks one item that decodes into a `serde_json::Value`.
    fn check_json(&mut self) -> Result<(), String> {
        match self.item()? {
            Item::Nil | Item::Bool | Item::Unsigned(_) | Item::Signed(_) | Item::Float => {}
            Item::Str(text) => {
                utf8(text)?;
            }
            Item::Bin(_) | Item::Ext => {
                return Err("event data holds a MessagePack bin or ext item".to_owned());
            }
            Item::Array(n) => {
                self.enter()?;
                for _ in 0..n {
                    self.check_json()?;
                }
                self.leave();
            }
            Item::Map(n) => {
                self.enter()?;
                for _ in 0..n {
                    let Item::Str(key) = self.item()? else {
                        return Err("event data has a map key that is not a string".to_owned());
                    };
                    utf8(key)?;
                    self.check_json()?;
                }
                self.leave();
            }
        }
        Ok(())
    }

    /// A field name (or a field's index) of a struct with `fields`: `None`
    /// for a field serde's derived decoder ignores.
    fn field(&mut self, fields: &[&str]) -> Result<Option<usize>, String> {
        match self.item()? {
            Item::Str(name) | Item::Bin(name) => {
                Ok(fields.iter().position(|field| field.as_bytes() == name))
            }
            Item::Unsigned(index) => Ok(usize::try_from(index).ok().filter(|i| *i < fields.len())),
            _ => Err("a field name is not a string".to_owned()),
        }
    }

    /// A `String` field: a `str`, or a `bin` holding UTF-8.
    fn string(&mut self, what: &str) -> Result<&'a str, String> {
        match self.item()? {
            Item::Str(text) | Item::Bin(text) => utf8(text),
            _ => Err(format!("{what} is not a string")),
        }
    }

    /// An `Option<String>` field.
    fn optional_string(&mut self, what: &str) -> Result<(), String> {
        let at = self.pos;
        if let Item::Nil = self.item()? {
            return Ok(());
        }
        self.pos = at;
        self.string(what).map(|_| ())
    }

    /// A field serde decodes from a `str` only (the UUIDs, the timestamp).
    fn strict_str(&mut self, what: &str) -> Result<&'a str, String> {
        match self.item()? {
            Item::Str(text) => utf8(text),
            _ => Err(format!("{what} is not a string")),
        }
    }

    fn uuid(&mut self, what: &str) -> Result<Uuid, String> {
        let text = self.strict_str(what)?;
        Uuid::parse_str(text).map_err(|e| format!("invalid UUID {text:?}: {e}"))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        match self.item()? {
            Item::Unsigned(n) => Ok(n),
            Item::Signed(n) => u64::try_from(n).map_err(|_| format!("{what} is negative")),
            _ => Err(format!("{what} is not an unsigned integer")),
        }
    }

    /// Skips a part of the value, checked by `check`, and says where it is.
    fn span(&mut self, check: fn(&mut Self) -> Result<(), String>) -> Result<Range<usize>, String> {
        let start = self.pos;
        check(self)?;
        Ok(start..self.pos)
    }

    /// The map of one event.
    fn event(&mut self) -> Result<Parsed, String> {
        let Item::Map(n) = self.item()? else {
            return Err("an event is not a map".to_owned());
        };
        self.enter()?;
        let mut event_id = None;
        let mut aggregate_type = None;
        let mut aggregate_id = None;
        let mut version = None;
        let mut event_type = None;
        let mut schema_version = None;
        let mut timestamp = None;
        let mut data = None;
        let mut metadata = None;
        for _ in 0..n {
            let Some(field) = self.field(&EVENT_FIELDS)? else {
                self.skip()?;
                continue;
            };
            let name = EVENT_FIELDS[field];
            let duplicate = || format!("duplicate field `{name}`");
            match field {
                0 => set(&mut event_id, self.uuid(name)?, duplicate)?,
                1 => set(&mut aggregate_type, self.string(name)?, duplicate)?,
                2 => set(&mut aggregate_id, self.string(name)?, duplicate)?,
                3 => set(&mut version, self.u64(name)?, duplicate)?,
                4 => set(&mut event_type, self.string(name)?, duplicate)?,
                5 => set(&mut schema_version, self.u64(name)?, duplicate)?,
                6 => {
                    let text = self.strict_str(name)?;
                    let parsed = DateTime::parse_from_rfc3339(text)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| format!("invalid RFC 3339 timestamp {text:?}: {e}"))?;
                    set(&mut timestamp, parsed, duplicate)?;
                }
                7 => set(&mut data, self.span(Self::check_json)?, duplicate)?,
                _ => set(&mut metadata, self.span(Self::metadata)?, duplicate)?,
            }
        }
        self.leave();
        let missing = |name: &str| format!("missing field `{name}`");
        Ok(Parsed {
            event_id: event_id.ok_or_else(|| missing("event_id"))?,
            aggregate_type: aggregate_type
                .ok_or_else(|| missing("aggregate_type"))?
                .to_owned(),
            aggregate_id: aggregate_id
                .ok_or_else(|| missing("aggregate_id"))?
                .to_owned(),
            version: version.ok_or_else(|| missing("version"))?,
            event_type: event_type.ok_or_else(|| missing("event_type"))?.to_owned(),
            schema_version: schema_version.unwrap_or(1),
            timestamp: timestamp.ok_or_else(|| missing("timestamp"))?,
            data: data.ok_or_else(|| missing("data"))?,
            metadata: metadata.ok_or_else(|| missing("metadata"))?,
        })
    }

    /// Checks an event's metadata map without decoding it.
    fn metadata(&mut self) -> Result<(), String> {
        let Item::Map(n) = self.item()? else {
            return Err("event metadata is not a map".to_owned());
        };
        self.enter()?;
        let mut seen = [false; METADATA_FIELDS.len()];
        for _ in 0..n {
            let Some(field) = self.field(&METADATA_FIELDS)? else {
                self.skip()?;
                continue;
            };
            let name = METADATA_FIELDS[field];
            if std::mem::replace(&mut seen[field], true) {
                return Err(format!("duplicate field `{name}`"));
            }
            match field {
                0 | 4 => {
                    self.string(name)?;
                }
                1 => {
                    self.uuid(name)?;
                }
                _ => self.optional_string(name)?,
            }
        }
        self.leave();
        for required in [0, 1, 4] {
            if !seen[required] {
                return Err(format!("missing field `{}`", METADATA_FIELDS[required]));
            }
        }
        Ok(())
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("a string is not UTF-8: {e}"))
}

/// Sets a field seen for the first time.
fn set<T>(slot: &mut Option<T>, value: T, duplicate: impl Fn() -> String) -> Result<(), String> {
    if slot.is_some() {
        return Err(duplicate());
    }
    *slot = Some(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::domain::{Domain, EXAMPLE_DOMAIN};
    use crate::log::record::{decode, encode};

    fn event(version: u64, event_type: &str, data: serde_json::Value) -> Event {
        let mut event =
            crate::bench::target::bench_event("acc-1", version, event_type, version, data);
        event.metadata.correlation_id = Some("corr-1".to_owned());
        event.metadata.principal = Some("alice".to_owned());
        event
    }

    fn headers() -> Vec<(String, Vec<u8>)> {
        encode(&[event(1, "A", json!({}))], Encoding::MessagePack)
            .unwrap()
            .headers
    }

    fn bank() -> Domain {
        Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap()
    }

    /// The lazy decoder accepts a record exactly when the serde decoder
    /// does, and gives the same events once decoded whole.
    fn same_as_serde(value: &[u8]) -> Result<(), TestCaseError> {
        let lazy = decode_current_lazy(&bank(), &headers(), value.to_vec()).and_then(|events| {
            events
                .into_iter()
                .map(LazyEvent::into_event)
                .collect::<Result<Vec<_>, _>>()
        });
        let eager = decode(&headers(), value);
        match (lazy, eager) {
            (Ok(lazy), Ok(eager)) => prop_assert_eq!(lazy, eager),
            (Err(_), Err(_)) => {}
            (lazy, eager) => {
                return Err(TestCaseError::fail(format!(
                    "lazy {lazy:?} but serde {eager:?} for {value:02x?}"
                )));
            }
        }
        Ok(())
    }

    /// A MessagePack map written by hand: `(key, value)` byte strings.
    fn map(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![0x80 | u8::try_from(entries.len()).unwrap()];
        for (key, value) in entries {
            out.extend_from_slice(key);
            out.extend_from_slice(value);
        }
        out
    }

    fn str(text: &str) -> Vec<u8> {
        let mut out = vec![0xd9, u8::try_from(text.len()).unwrap()];
        out.extend_from_slice(text.as_bytes());
        out
    }

    fn bin(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![0xc4, u8::try_from(bytes.len()).unwrap()];
        out.extend_from_slice(bytes);
        out
    }

    fn key(name: &str) -> Vec<u8> {
        str(name)
    }

    /// One event's map, with `data` and `metadata` as given and the other
    /// fields well-formed, plus `extra` entries; inside a one-event list.
    fn record(data: Vec<u8>, metadata: Vec<u8>, extra: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<u8> {
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (key("event_id"), str("019ac1f4-5a7e-7c3d-9b21-6f0e8d4c2a11")),
            (key("aggregate_type"), str("account")),
            (key("aggregate_id"), str("acc-1")),
            (key("version"), vec![0x07]),
            (key("event_type"), str("MoneyDeposited")),
            (key("timestamp"), str("2026-11-26T13:00:00.123Z")),
            (key("data"), data),
            (key("metadata"), metadata),
        ];
        entries.extend(extra);
        let mut out = vec![0x91];
        out.extend(map(&entries));
        out
    }

    fn metadata() -> Vec<u8> {
        map(&[
            (key("command"), str("deposit")),
            (
                key("command_id"),
                str("019ac1f4-5a7d-7f00-8e6b-3d2c1b0a9f88"),
            ),
            (key("request_hash"), str("sha256:ab")),
        ])
    }

    /// Encodings the writer never produces but MessagePack (and serde's
    /// derived decoder) allow: the lazy decoder takes or refuses each as
    /// the serde decoder does.
    #[test]
    fn unusual_encodings_are_read_as_serde_reads_them() {
        let amount = map(&[(key("amount"), vec![0x19])]);
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "well-formed",
                record(amount.clone(), metadata(), vec![]),
                true,
            ),
            (
                "an unknown field holding bin, ext and nested maps",
                record(
                    amount.clone(),
                    metadata(),
                    vec![
                        (key("x-bin"), bin(b"\xff\x00")),
                        (key("x-ext"), vec![0xd4, 0x01, 0x02]),
                        (key("x-map"), map(&[(vec![0x01], vec![0xc0])])),
                    ],
                ),
                true,
            ),
            (
                "data holding bin",
                record(map(&[(key("amount"), bin(b"1"))]), metadata(), vec![]),
                false,
            ),
            (
                "data holding ext",
                record(
                    map(&[(key("amount"), vec![0xd4, 0x01, 0x02])]),
                    metadata(),
                    vec![],
                ),
                false,
            ),
            (
                "data with an integer key",
                record(map(&[(vec![0x01], vec![0x02])]), metadata(), vec![]),
                false,
            ),
            (
                "data with a string that is not UTF-8",
                record(
                    map(&[(key("note"), vec![0xa2, 0xff, 0xfe])]),
                    metadata(),
                    vec![],
                ),
                false,
            ),
            (
                "data that is not a map",
                record(
                    vec![0x93, 0x01, 0xc0, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0],
                    metadata(),
                    vec![],
                ),
                true,
            ),
            (
                "a field named by its index (4: event_type twice)",
                record(amount.clone(), metadata(), vec![(vec![0x04], str("Other"))]),
                false,
            ),
            (
                "an unknown field index",
                record(amount.clone(), metadata(), vec![(vec![0x2a], str("x"))]),
                true,
            ),
            (
                "schema_version as a signed integer",
                record(
                    amount.clone(),
                    metadata(),
                    vec![(key("schema_version"), vec![0xd0, 0x01])],
                ),
                true,
            ),
            (
                "a negative schema_version",
                record(
                    amount.clone(),
                    metadata(),
                    vec![(key("schema_version"), vec![0xff])],
                ),
                false,
            ),
            (
                "a duplicate field",
                record(
                    amount.clone(),
                    metadata(),
                    vec![(key("aggregate_id"), str("acc-1"))],
                ),
                false,
            ),
            (
                "metadata without its request hash",
                record(
                    amount.clone(),
                    map(&[
                        (key("command"), str("deposit")),
                        (
                            key("command_id"),
                            str("019ac1f4-5a7d-7f00-8e6b-3d2c1b0a9f88"),
                        ),
                    ]),
                    vec![],
                ),
                false,
            ),
            (
                "metadata strings as bin, optional ones nil",
                record(
                    amount.clone(),
                    map(&[
                        (key("command"), bin(b"deposit")),
                        (
                            key("command_id"),
                            str("019ac1f4-5a7d-7f00-8e6b-3d2c1b0a9f88"),
                        ),
                        (key("request_hash"), bin(b"sha256:ab")),
                        (key("principal"), vec![0xc0]),
                        (key("correlation_id"), str("c")),
                    ]),
                    vec![],
                ),
                true,
            ),
            (
                "a command id as bin",
                record(
                    amount.clone(),
                    map(&[
                        (key("command"), str("deposit")),
                        (
                            key("command_id"),
                            bin(b"019ac1f4-5a7d-7f00-8e6b-3d2c1b0a9f88"),
                        ),
                        (key("request_hash"), str("sha256:ab")),
                    ]),
                    vec![],
                ),
                false,
            ),
        ];
        for (what, value, accepted) in cases {
            same_as_serde(&value).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(decode(&headers(), &value).is_ok(), accepted, "{what}");
        }
    }

    /// Data and metadata are decoded where they lie, once: the data is the
    /// same value however often it is asked for, nested fields included.
    #[test]
    fn data_is_decoded_on_demand_and_once() {
        let data =
            json!({"amount": 25, "nested": {"list": [1, 2.5, "x", null, true], "deep": {"n": -3}}});
        let written = event(1, "MoneyDeposited", data.clone());
        let record = encode(std::slice::from_ref(&written), Encoding::MessagePack).unwrap();
        let events = decode_current_lazy(&bank(), &record.headers, record.value.clone()).unwrap();
        let lazy = &events[0];
        assert_eq!(
            (
                lazy.event_type.as_str(),
                lazy.aggregate_id.as_str(),
                lazy.version,
                lazy.event_id
            ),
            ("MoneyDeposited", "acc-1", 1, written.event_id)
        );
        let first: *const serde_json::Value = lazy.data().unwrap();
        assert_eq!(lazy.data().unwrap(), &data);
        assert!(std::ptr::eq(first, lazy.data().unwrap()));
        assert_eq!(lazy.input().unwrap().data["nested"]["deep"]["n"], json!(-3));
        assert_eq!(lazy.metadata().unwrap(), written.metadata);
        assert_eq!(lazy.to_event().unwrap(), written);
    }

    proptest! {
        #[test]
        fn lazy_decoding_agrees_with_serde_on_mutated_records(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let events = vec![
                event(1, "MoneyDeposited", json!({"amount": 10, "fee": 0.5, "tags": ["a", {"b": null}]})),
                event(2, "MoneyWithdrawn", json!({"amount": -3})),
            ];
            let mut value = encode(&events, Encoding::MessagePack).unwrap().value;
            for (index, byte) in flips {
                let i = index.index(value.len());
                value[i] = byte;
            }
            same_as_serde(&value)?;
        }

        #[test]
        fn lazy_decoding_agrees_with_serde_on_arbitrary_bytes(
            value in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            same_as_serde(&value)?;
        }
    }
}
