//! The record format shared by the embedded log and the Kafka backend.
//!
//! One record per command: the key is the aggregate id, the value is the list of the
//! command's events, and headers describe the record so that any Kafka client can route
//! and filter it without decoding the value. The format is specified for other languages
//! in `docs/record-format.md`; change the two together and bump [`FORMAT_VERSION`] for
//! any change an existing reader could misread.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The value of the `cqrsd-format` header written by this build, and the only one it reads.
pub const FORMAT_VERSION: &str = "1";

pub const HEADER_FORMAT: &str = "cqrsd-format";
pub const HEADER_CONTENT_TYPE: &str = "content-type";
pub const HEADER_AGGREGATE_TYPE: &str = "cqrsd-aggregate-type";
pub const HEADER_VERSION_FIRST: &str = "cqrsd-version-first";
pub const HEADER_VERSION_LAST: &str = "cqrsd-version-last";
pub const HEADER_EVENT_TYPES: &str = "cqrsd-event-types";

pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// The same nesting limit serde_json applies by default, so that a hostile or corrupt
/// MessagePack value cannot exhaust the stack of the thread decoding it.
const MAX_MSGPACK_DEPTH: usize = 128;

/// How a record's value is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// MessagePack with named fields (maps, not arrays), as written by `rmp_serde::to_vec_named`.
    #[default]
    #[serde(alias = "msgpack")]
    MessagePack,
    /// UTF-8 JSON, for interoperability with tools that cannot read MessagePack.
    Json,
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::MessagePack => CONTENT_TYPE_MSGPACK,
            Encoding::Json => CONTENT_TYPE_JSON,
        }
    }

    /// Parses a `content-type` header value; media-type parameters such as
    /// `; charset=utf-8` are ignored because they do not change the encoding.
    pub fn from_content_type(value: &str) -> Option<Self> {
        let media_type = value.split(';').next().unwrap_or("").trim();
        if media_type.eq_ignore_ascii_case(CONTENT_TYPE_MSGPACK) {
            Some(Encoding::MessagePack)
        } else if media_type.eq_ignore_ascii_case(CONTENT_TYPE_JSON) {
            Some(Encoding::Json)
        } else {
            None
        }
    }
}

/// One domain event, as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// A UUIDv7, stored as its hyphenated string in both encodings.
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: u64,
    pub event_type: String,
    /// The version of the event type's data shape this event was written
    /// with (DESIGN.md §3.3), not to be confused with `version`, the
    /// aggregate's. Written only above 1: absent means 1, so logs from before
    /// event versions read as version 1 and unversioned events cost nothing.
    #[serde(
        default = "first_schema_version",
        skip_serializing_if = "is_first_schema_version"
    )]
    pub schema_version: u64,
    /// Stored as an RFC 3339 UTC string with millisecond precision in both encodings;
    /// anything finer is truncated by the writer.
    #[serde(with = "timestamp_millis")]
    pub timestamp: DateTime<Utc>,
    /// Always a JSON object.
    pub data: serde_json::Value,
    pub metadata: EventMetadata,
}

impl Event {
    /// The event as the domain's handlers see it.
    pub fn as_input(&self) -> crate::domain::EventInput<'_> {
        crate::domain::EventInput {
            event_type: &self.event_type,
            data: &self.data,
            aggregate_id: &self.aggregate_id,
            version: self.version,
            timestamp: self.timestamp,
        }
    }
}

fn first_schema_version() -> u64 {
    1
}

fn is_first_schema_version(version: &u64) -> bool {
    *version == 1
}

/// Where an event came from; used for idempotency, tracing and auditing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub command: String,
    #[serde(with = "uuid_string")]
    pub command_id: Uuid,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// Fingerprint of the command name and body, so that an idempotency key reused with a
    /// different body can be rejected instead of silently answered with another result.
    pub request_hash: String,
    #[serde(default)]
    pub principal: Option<String>,
}

/// A log record, independent of the backend that stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
    /// Milliseconds since the Unix epoch (the first event's timestamp).
    pub timestamp_ms: i64,
}

impl Record {
    /// The first header with this name, if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header(&self.headers, name)
    }

    /// The version range `(first, last)` from the `cqrsd-version-*` headers.
    pub fn version_range(&self) -> Result<(u64, u64), RecordError> {
        let first = header_u64(&self.headers, HEADER_VERSION_FIRST)?;
        let last = header_u64(&self.headers, HEADER_VERSION_LAST)?;
        if last < first {
            return Err(RecordError::BadHeader {
                name: HEADER_VERSION_LAST,
                reason: format!("last version {last} is below first version {first}"),
            });
        }
        Ok((first, last))
    }
}

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The events handed to [`encode`] break the format's rules (a caller bug).
    #[error("cannot encode events: {0}")]
    InvalidEvents(String),
    #[error("failed to serialize events as {encoding}: {reason}")]
    Serialize {
        encoding: &'static str,
        reason: String,
    },

    /// The record's headers do not describe a record this build can read.
    #[error("record header {0:?} is missing")]
    MissingHeader(&'static str),
    #[error("record header {name:?} is invalid: {reason}")]
    BadHeader { name: &'static str, reason: String },
    #[error("unsupported record format version {0:?}: this build reads format {FORMAT_VERSION}")]
    UnsupportedFormat(String),
    #[error("unsupported content type {0:?}: expected application/msgpack or application/json")]
    UnsupportedContentType(String),

    /// An event of the record cannot be brought to its type's current version.
    #[error("event {index} ({event_type} at version {schema_version}) cannot be upcast: {reason}")]
    Upcast {
        index: usize,
        event_type: String,
        schema_version: u64,
        reason: String,
    },

    /// The value does not hold a valid event list.
    #[error("record value is not a valid {encoding} event list: {reason}")]
    Malformed {
        encoding: &'static str,
        reason: String,
    },
}

/// The first header with this name, if any. Names are compared exactly (lowercase),
/// as Kafka header names are case-sensitive.
pub fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

fn header_str<'a>(
    headers: &'a [(String, Vec<u8>)],
    name: &'static str,
) -> Result<&'a str, RecordError> {
    let raw = header(headers, name).ok_or(RecordError::MissingHeader(name))?;
    std::str::from_utf8(raw).map_err(|_| RecordError::BadHeader {
        name,
        reason: "not valid ASCII".to_owned(),
    })
}

fn header_u64(headers: &[(String, Vec<u8>)], name: &'static str) -> Result<u64, RecordError> {
    let text = header_str(headers, name)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RecordError::BadHeader {
            name,
            reason: format!("{text:?} is not a decimal integer"),
        });
    }
    text.parse().map_err(|_| RecordError::BadHeader {
        name,
        reason: format!("{text:?} does not fit in 64 bits"),
    })
}

/// Header values must be printable ASCII without separators the format uses.
fn check_header_token(what: &str, value: &str) -> Result<(), RecordError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(RecordError::InvalidEvents(format!(
            "{what} {value:?} must be non-empty printable ASCII without spaces or commas"
        )));
    }
    Ok(())
}

/// Encodes the events of one command as one record.
///
/// The events must be non-empty, belong to one aggregate, carry consecutive versions,
/// and have object `data`; these are the invariants readers rely on.
pub fn encode(events: &[Event], encoding: Encoding) -> Result<Record, RecordError> {
    let Some(first) = events.first() else {
        return Err(RecordError::InvalidEvents(
            "a record needs at least one event".to_owned(),
        ));
    };
    check_header_token("aggregate type", &first.aggregate_type)?;
    let mut event_types: Vec<&str> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        if event.aggregate_type != first.aggregate_type || event.aggregate_id != first.aggregate_id
        {
            return Err(RecordError::InvalidEvents(format!(
                "event {i} belongs to {}/{}, not {}/{}",
                event.aggregate_type, event.aggregate_id, first.aggregate_type, first.aggregate_id
            )));
        }
        // Versions must be first, first + 1, ...; overflowing u64 is a gap too.
        let expected_version = u64::try_from(i)
            .ok()
            .and_then(|i| first.version.checked_add(i));
        if Some(event.version) != expected_version {
            return Err(RecordError::InvalidEvents(format!(
                "event {i} has version {}, but versions must be consecutive from {}",
                event.version, first.version
            )));
        }
        if !event.data.is_object() {
            return Err(RecordError::InvalidEvents(format!(
                "event {i} data must be a JSON object"
            )));
        }
        check_header_token("event type", &event.event_type)?;
        if !event_types.contains(&event.event_type.as_str()) {
            event_types.push(&event.event_type);
        }
    }
    let last_version = events.last().map_or(first.version, |e| e.version);

    let value = match encoding {
        Encoding::MessagePack => {
            rmp_serde::to_vec_named(events).map_err(|e| RecordError::Serialize {
                encoding: "msgpack",
                reason: e.to_string(),
            })?
        }
        Encoding::Json => serde_json::to_vec(events).map_err(|e| RecordError::Serialize {
            encoding: "json",
            reason: e.to_string(),
        })?,
    };

    let headers = vec![
        (HEADER_FORMAT.to_owned(), FORMAT_VERSION.as_bytes().to_vec()),
        (
            HEADER_CONTENT_TYPE.to_owned(),
            encoding.content_type().as_bytes().to_vec(),
        ),
        (
            HEADER_AGGREGATE_TYPE.to_owned(),
            first.aggregate_type.as_bytes().to_vec(),
        ),
        (
            HEADER_VERSION_FIRST.to_owned(),
            first.version.to_string().into_bytes(),
        ),
        (
            HEADER_VERSION_LAST.to_owned(),
            last_version.to_string().into_bytes(),
        ),
        (
            HEADER_EVENT_TYPES.to_owned(),
            event_types.join(",").into_bytes(),
        ),
    ];

    Ok(Record {
        key: first.aggregate_id.clone(),
        headers,
        value,
        timestamp_ms: first.timestamp.timestamp_millis(),
    })
}

/// Decodes a record's value into its events, using the headers to pick the decoder.
///
/// Never panics: any malformed input is a [`RecordError`].
pub fn decode(headers: &[(String, Vec<u8>)], value: &[u8]) -> Result<Vec<Event>, RecordError> {
    let format = header_str(headers, HEADER_FORMAT)?;
    if format.trim() != FORMAT_VERSION {
        return Err(RecordError::UnsupportedFormat(format.to_owned()));
    }
    let content_type = header_str(headers, HEADER_CONTENT_TYPE)?;
    let encoding = Encoding::from_content_type(content_type)
        .ok_or_else(|| RecordError::UnsupportedContentType(content_type.to_owned()))?;

    let events: Vec<Event> = match encoding {
        Encoding::MessagePack => match super::msgpack::decode_events(value) {
            Some(events) => events,
            // Anything the fast path does not take gets serde's answer, as before.
            None => {
                let mut de = rmp_serde::Deserializer::from_read_ref(value);
                de.set_max_depth(MAX_MSGPACK_DEPTH);
                Deserialize::deserialize(&mut de).map_err(|e| RecordError::Malformed {
                    encoding: "msgpack",
                    reason: e.to_string(),
                })?
            }
        },
        Encoding::Json => serde_json::from_slice(value).map_err(|e| RecordError::Malformed {
            encoding: "json",
            reason: e.to_string(),
        })?,
    };

    let enc_name = match encoding {
        Encoding::MessagePack => "msgpack",
        Encoding::Json => "json",
    };
    let Some(first) = events.first() else {
        return Err(RecordError::Malformed {
            encoding: enc_name,
            reason: "the event list is empty".to_owned(),
        });
    };
    if events
        .iter()
        .any(|e| e.aggregate_type != first.aggregate_type || e.aggregate_id != first.aggregate_id)
    {
        return Err(RecordError::Malformed {
            encoding: enc_name,
            reason: "the events belong to more than one aggregate".to_owned(),
        });
    }
    Ok(events)
}

/// Decodes a record like [`decode`] and brings every event to the current
/// version of its event type in `domain` (DESIGN.md §3.3). Every read path
/// that hands events to the domain or to clients decodes through here (the
/// write side's restore and history, projections, the event stream), so
/// none of them ever sees an older version. An event already at the current
/// version costs one comparison when the domain declares no versions, one
/// map lookup otherwise.
pub fn decode_current(
    domain: &crate::domain::Domain,
    headers: &[(String, Vec<u8>)],
    value: &[u8],
) -> Result<Vec<Event>, RecordError> {
    let mut events = decode(headers, value)?;
    upcast(domain, &mut events)?;
    Ok(events)
}

/// Brings decoded events to the current versions of their types in place.
pub fn upcast(domain: &crate::domain::Domain, events: &mut [Event]) -> Result<(), RecordError> {
    for (index, event) in events.iter_mut().enumerate() {
        if event.schema_version == 1 && !domain.has_versions() {
            continue;
        }
        let upcast = domain
            .upcast(
                &event.aggregate_type,
                &event.as_input(),
                event.schema_version,
            )
            .map_err(|e| RecordError::Upcast {
                index,
                event_type: event.event_type.clone(),
                schema_version: event.schema_version,
                reason: e.to_string(),
            })?;
        if let Some(data) = upcast {
            event.data = data;
            event.schema_version = domain
                .aggregate(&event.aggregate_type)
                .map_or(1, |a| a.event_version(&event.event_type));
        }
    }
    Ok(())
}

/// A string field parsed where the decoder holds it (borrowed from the
/// record, or in the decoder's scratch buffer), without an owned copy first:
/// every event has three such fields, and their copies were a fair share of
/// a record's decoding.
struct ParseStr<T> {
    what: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> serde::de::Visitor<'_> for ParseStr<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} as a string", self.what)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<T, E> {
        (self.parse)(text).map_err(E::custom)
    }
}

/// Serde adapter: RFC 3339 UTC with milliseconds (`2026-11-26T13:00:00.123Z`).
mod timestamp_millis {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&ts.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        d.deserialize_str(ParseStr {
            what: "an RFC 3339 timestamp",
            parse: |text| {
                DateTime::parse_from_rfc3339(text)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| format!("invalid RFC 3339 timestamp {text:?}: {e}"))
            },
        })
    }
}

/// Serde adapter: a UUID as its lowercase hyphenated string in every encoding.
///
/// The uuid crate writes 16 raw bytes for non-human-readable formats such as MessagePack;
/// a string keeps one schema for both encodings and is easier for other languages.
mod uuid_string {
    use serde::{Deserializer, Serializer};
    use uuid::Uuid;

    use super::ParseStr;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        d.deserialize_str(ParseStr {
            what: "a UUID",
            parse: |text| Uuid::parse_str(text).map_err(|e| format!("invalid UUID {text:?}: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn ts(millis: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(millis).unwrap()
    }

    fn event(version: u64, event_type: &str, data: serde_json::Value) -> Event {
        Event {
            event_id: Uuid::now_v7(),
            aggregate_type: "account".to_owned(),
            aggregate_id: "acc-42".to_owned(),
            version,
            event_type: event_type.to_owned(),
            schema_version: 1,
            timestamp: ts(1_795_000_000_123),
            data,
            metadata: EventMetadata {
                command: "deposit".to_owned(),
                command_id: Uuid::now_v7(),
                idempotency_key: Some("key-1".to_owned()),
                correlation_id: None,
                request_hash: "sha256:abcd".to_owned(),
                principal: Some("alice".to_owned()),
            },
        }
    }

    fn sample() -> Vec<Event> {
        vec![
            event(
                7,
                "MoneyDeposited",
                json!({"amount": 10, "fee": 0.5, "big": u64::MAX, "neg": -3, "one": 1.0}),
            ),
            event(
                8,
                "FeeCharged",
                json!({"nested": {"list": [1, 2.5, "x", null, true]}}),
            ),
            event(9, "MoneyDeposited", json!({})),
        ]
    }

    #[test]
    fn round_trip_both_encodings() {
        for encoding in [Encoding::MessagePack, Encoding::Json] {
            let events = sample();
            let record = encode(&events, encoding).unwrap();
            assert_eq!(record.key, "acc-42");
            assert_eq!(record.timestamp_ms, 1_795_000_000_123);
            assert_eq!(record.header(HEADER_FORMAT), Some(&b"1"[..]));
            assert_eq!(
                record.header(HEADER_CONTENT_TYPE),
                Some(encoding.content_type().as_bytes())
            );
            assert_eq!(record.header(HEADER_AGGREGATE_TYPE), Some(&b"account"[..]));
            assert_eq!(
                record.header(HEADER_EVENT_TYPES),
                Some(&b"MoneyDeposited,FeeCharged"[..])
            );
            assert_eq!(record.version_range().unwrap(), (7, 9));
            let decoded = decode(&record.headers, &record.value).unwrap();
            assert_eq!(decoded, events);

            // Integers stay integers and floats stay floats, including 1.0.
            let data = &decoded[0].data;
            assert!(data["amount"].is_u64());
            assert!(data["fee"].is_f64());
            assert!(data["one"].is_f64());
            assert_eq!(data["one"].to_string(), "1.0");
            assert_eq!(data["big"].as_u64(), Some(u64::MAX));
            assert!(data["neg"].is_i64());
            assert!(decoded[1].data["nested"]["list"][1].is_f64());
            assert!(decoded[1].data["nested"]["list"][0].is_u64());
        }
    }

    #[test]
    fn json_value_has_documented_shape() {
        let record = encode(&sample()[..1], Encoding::Json).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        let e = &value[0];
        assert_eq!(e["timestamp"], "2026-11-18T11:06:40.123Z");
        assert_eq!(e["version"], 7);
        assert_eq!(e["metadata"]["correlation_id"], serde_json::Value::Null);
        assert!(e["event_id"].is_string());
    }

    #[test]
    fn msgpack_uses_named_fields() {
        let record = encode(&sample()[..1], Encoding::MessagePack).unwrap();
        // A map with 8 entries (fixmap 0x88) inside a one-element array (fixarray 0x91).
        assert_eq!(&record.value[..2], &[0x91, 0x88]);
        let generic: serde_json::Value = rmp_serde::from_slice(&record.value).unwrap();
        assert_eq!(generic[0]["event_type"], "MoneyDeposited");
    }

    #[test]
    fn encode_rejects_invalid_event_lists() {
        assert!(matches!(
            encode(&[], Encoding::Json),
            Err(RecordError::InvalidEvents(_))
        ));
        let mut mixed = sample();
        mixed[1].aggregate_id = "other".to_owned();
        assert!(matches!(
            encode(&mixed, Encoding::Json),
            Err(RecordError::InvalidEvents(_))
        ));
        let mut gap = sample();
        gap[2].version = 11;
        assert!(matches!(
            encode(&gap, Encoding::Json),
            Err(RecordError::InvalidEvents(_))
        ));
        let mut not_object = sample();
        not_object[0].data = json!([1]);
        assert!(matches!(
            encode(&not_object, Encoding::Json),
            Err(RecordError::InvalidEvents(_))
        ));
        let mut comma = sample();
        comma[0].event_type = "A,B".to_owned();
        assert!(matches!(
            encode(&comma, Encoding::Json),
            Err(RecordError::InvalidEvents(_))
        ));
    }

    #[test]
    fn decode_checks_headers() {
        let record = encode(&sample(), Encoding::Json).unwrap();
        let mut no_format = record.headers.clone();
        no_format.retain(|(n, _)| n != HEADER_FORMAT);
        assert!(matches!(
            decode(&no_format, &record.value),
            Err(RecordError::MissingHeader(HEADER_FORMAT))
        ));

        let mut future = record.headers.clone();
        future[0].1 = b"2".to_vec();
        let err = decode(&future, &record.value).unwrap_err();
        assert!(
            matches!(err, RecordError::UnsupportedFormat(ref v) if v == "2"),
            "{err}"
        );

        let mut other_type = record.headers.clone();
        other_type[1].1 = b"text/plain".to_vec();
        assert!(matches!(
            decode(&other_type, &record.value),
            Err(RecordError::UnsupportedContentType(_))
        ));

        let mut with_params = record.headers.clone();
        with_params[1].1 = b"application/json; charset=utf-8".to_vec();
        assert_eq!(decode(&with_params, &record.value).unwrap().len(), 3);

        // The JSON bytes are not MessagePack.
        let mut wrong = record.headers.clone();
        wrong[1].1 = CONTENT_TYPE_MSGPACK.as_bytes().to_vec();
        assert!(matches!(
            decode(&wrong, &record.value),
            Err(RecordError::Malformed { .. })
        ));

        // An empty list is not a record.
        assert!(matches!(
            decode(&record.headers, b"[]"),
            Err(RecordError::Malformed { .. })
        ));
    }

    #[test]
    fn deeply_nested_msgpack_is_an_error_not_a_stack_overflow() {
        let headers = encode(&sample(), Encoding::MessagePack).unwrap().headers;
        // 100k nested one-element arrays.
        let value = vec![0x91u8; 100_000];
        assert!(decode(&headers, &value).is_err());
        let json_headers = encode(&sample(), Encoding::Json).unwrap().headers;
        assert!(decode(&json_headers, &vec![b'['; 100_000]).is_err());
    }

    /// The data version is stored only above 1, absent reads as 1, and
    /// `decode_current` hands out current versions only.
    #[test]
    fn schema_versions_are_stored_above_one_and_decoded_to_the_current_one() {
        let domain = crate::domain::Domain::from_toml_str(
            r#"
[aggregates.account]
state = { balance = 0 }
[aggregates.account.commands.deposit]
emit = [ { event = "MoneyDeposited", data = { cents = "command.cents" } } ]
[aggregates.account.events.MoneyDeposited]
version = 2
set = { balance = "state.balance + event.cents" }
[aggregates.account.events.MoneyDeposited.upcast.1]
set = { cents = "int(event.amount * 100)" }
remove = ["amount"]
"#,
        )
        .unwrap();
        for encoding in [Encoding::MessagePack, Encoding::Json] {
            let old = event(1, "MoneyDeposited", json!({"amount": 2.5}));
            let mut new = event(2, "MoneyDeposited", json!({"cents": 250}));
            new.schema_version = 2;
            let record = encode(&[old.clone(), new.clone()], encoding).unwrap();
            let raw: serde_json::Value = match encoding {
                Encoding::Json => serde_json::from_slice(&record.value).unwrap(),
                Encoding::MessagePack => rmp_serde::from_slice(&record.value).unwrap(),
            };
            assert!(raw[0].get("schema_version").is_none(), "{raw}");
            assert_eq!(raw[1]["schema_version"], 2);
            let plain = decode(&record.headers, &record.value).unwrap();
            assert_eq!(plain, vec![old.clone(), new.clone()]);
            let current = decode_current(&domain, &record.headers, &record.value).unwrap();
            assert_eq!(current[0].data, json!({"cents": 250}));
            assert_eq!(current[0].schema_version, 2);
            assert_eq!(current[1], new);
            // A step that fails names the event and its version.
            let bad = encode(&[event(1, "MoneyDeposited", json!({}))], encoding).unwrap();
            let error = decode_current(&domain, &bad.headers, &bad.value).unwrap_err();
            assert!(
                matches!(
                    error,
                    RecordError::Upcast {
                        index: 0,
                        schema_version: 1,
                        ..
                    }
                ),
                "{error}"
            );
        }
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e300f64..1e300f64).prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(
            value in prop::collection::vec(any::<u8>(), 0..512),
            json in any::<bool>(),
        ) {
            let encoding = if json { Encoding::Json } else { Encoding::MessagePack };
            let headers = encode(&sample(), encoding).unwrap().headers;
            let _ = decode(&headers, &value);
        }

        #[test]
        fn decode_never_panics_on_mutated_records(
            json in any::<bool>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let encoding = if json { Encoding::Json } else { Encoding::MessagePack };
            let record = encode(&sample(), encoding).unwrap();
            let mut value = record.value.clone();
            for (index, byte) in flips {
                let i = index.index(value.len());
                value[i] = byte;
            }
            let _ = decode(&record.headers, &value);
        }

        #[test]
        fn decode_never_panics_on_arbitrary_headers(
            headers in prop::collection::vec((".{0,20}", prop::collection::vec(any::<u8>(), 0..20)), 0..8),
            value in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = decode(&headers, &value);
        }

        #[test]
        fn arbitrary_data_round_trips(
            fields in prop::collection::btree_map("[a-z]{1,8}", arb_json(), 0..6),
            json in any::<bool>(),
        ) {
            let encoding = if json { Encoding::Json } else { Encoding::MessagePack };
            let data = serde_json::Value::Object(fields.into_iter().collect());
            let events = vec![event(1, "Happened", data)];
            let record = encode(&events, encoding).unwrap();
            prop_assert_eq!(decode(&record.headers, &record.value).unwrap(), events);
        }
    }
}
