//! `GET /events/stream`: the live events of every aggregate as Server-Sent Events.
//!
//! Each connection pulls from the event log at its own pace: a task on the query
//! runtime reads batches with [`EventLog::read`] (on the blocking pool), hands the
//! events to the response body through a small bounded channel, and sleeps on the
//! partitions' end-offset watches when it has caught up. Nothing is shared between
//! connections, so a slow client only slows itself and never loses events.
//!
//! Every message carries, as its SSE `id`, a cursor naming the next event of every
//! partition the stream covers. A client that reconnects with that cursor in
//! `Last-Event-ID` (browsers do so by themselves) resumes right after the last event
//! it saw, with nothing lost or repeated, even inside a record holding several events.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use super::problem::{ApiError, Problem};
use crate::domain::Domain;
use crate::log::{Event, EventLog, LogError, Position, Record, decode_current};

/// Records read from one partition per log read; small enough that partitions
/// interleave promptly, large enough to amortise the blocking-pool hop.
const READ_BATCH: usize = 64;
/// Events buffered between the log reader and the response body. Small on purpose:
/// a full buffer makes the reader wait, which is how a slow client sets the pace.
const CHANNEL_CAPACITY: usize = 32;
/// Proxies drop idle connections; a comment every 15 s keeps the stream open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The first byte of an encoded cursor, so the format can change without a
/// new cursor being misread as an old one.
const CURSOR_VERSION: u8 = 1;
/// Cursors longer than this are rejected before decoding.
const MAX_CURSOR_LEN: usize = 64 * 1024;

/// The stream's route, ready to be merged into the query router.
pub fn routes(
    log: EventLog,
    domain: Arc<Domain>,
    topics: Vec<String>,
    shutdown: CancellationToken,
) -> Router {
    Router::new()
        .route("/events/stream", get(stream_events))
        .with_state(StreamState {
            log,
            domain,
            topics,
            shutdown,
        })
}

/// The OpenAPI description of the stream's route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    StreamApi::openapi()
}

#[derive(OpenApi)]
#[openapi(paths(stream_events))]
struct StreamApi;

#[derive(Clone)]
struct StreamState {
    log: EventLog,
    /// Streamed events are their types' current versions (DESIGN.md §3.3).
    domain: Arc<Domain>,
    /// The topic of every aggregate type, as created at startup.
    topics: Vec<String>,
    shutdown: CancellationToken,
}

#[derive(Debug, Deserialize)]
struct StreamParams {
    from: Option<String>,
    aggregate: Option<String>,
}

/// One event as sent in a message's `data`.
#[derive(Debug, Serialize)]
struct StreamedEvent<'a> {
    aggregate: &'a str,
    id: &'a str,
    version: u64,
    #[serde(rename = "type")]
    event_type: &'a str,
    timestamp: String,
    data: &'a serde_json::Value,
    /// The record holding the event, in the form command replies use.
    position: String,
}

/// Live events as Server-Sent Events.
///
/// `from` is `now` (the default: only new events), `start` (everything), a cursor
/// (an earlier message's `id`) or a position `topic:partition:offset` (that
/// partition after that record, the others from now). A `Last-Event-ID` header
/// wins over `from`. `aggregate` limits the stream to one aggregate type.
#[utoipa::path(get, path = "/events/stream", tag = "events", operation_id = "streamEvents",
    params(
        ("from" = Option<String>, Query, description = "now | start | a cursor | topic:partition:offset"),
        ("aggregate" = Option<String>, Query, description = "Only events of this aggregate type"),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "Resume after this message (a cursor)"),
    ),
    responses(
        (status = 200, description = "An endless stream of events; each message's `event` is the event type, `data` the event as JSON and `id` a resumable cursor", content_type = "text/event-stream"),
        (status = 400, description = "Malformed `from`, `Last-Event-ID` or `aggregate`", body = Problem, content_type = "application/problem+json")
    ))]
async fn stream_events(
    State(state): State<StreamState>,
    Query(params): Query<StreamParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let topics = match &params.aggregate {
        None => state.topics.clone(),
        Some(aggregate) => {
            let topic = state.log.topic(aggregate);
            if !state.topics.contains(&topic) {
                return Err(ApiError::BadRequest(format!(
                    "unknown aggregate type {aggregate:?}"
                )));
            }
            vec![topic]
        }
    };
    let from = match headers.get("last-event-id") {
        Some(value) => {
            let value = value.to_str().map_err(|_| {
                ApiError::BadRequest("Last-Event-ID is not a valid cursor".to_owned())
            })?;
            parse_from(value).map_err(|error| {
                ApiError::BadRequest(format!("Last-Event-ID is not a valid cursor: {error}"))
            })?
        }
        None => match &params.from {
            None => StartAt::Now,
            Some(value) => parse_from(value).map_err(|error| {
                ApiError::BadRequest(format!("invalid `from` parameter: {error}"))
            })?,
        },
    };

    let log = state.log.clone();
    let slots = tokio::task::spawn_blocking(move || start_slots(&log, &topics, from))
        .await
        .map_err(|_| ApiError::Internal("the stream setup task failed".to_owned()))?
        .map_err(|error| match error {
            StartError::Invalid(reason) => ApiError::BadRequest(reason),
            StartError::Log(LogError::Closed) => ApiError::ShuttingDown,
            StartError::Log(error) => ApiError::Internal(error.to_string()),
        })?;

    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    // The handler runs on the query runtime (the dispatch middleware put it
    // there), so the reader does too, and the HTTP runtime only copies bytes.
    tokio::spawn(pump(
        state.log.clone(),
        state.domain.clone(),
        slots,
        tx,
        state.shutdown.clone(),
    ));
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// Where a stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StartAt {
    Now,
    Start,
    Cursor(Cursor),
    Position(Position),
}

/// Why `from` or `Last-Event-ID` was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum FromError {
    #[error("{0}")]
    Position(#[from] crate::log::PositionError),
    #[error("malformed cursor: {0}")]
    Cursor(&'static str),
}

fn parse_from(value: &str) -> Result<StartAt, FromError> {
    match value {
        "now" => Ok(StartAt::Now),
        "start" => Ok(StartAt::Start),
        // Cursors are base64url, which never contains ':', and positions always do.
        _ if value.contains(':') => Ok(StartAt::Position(value.parse()?)),
        _ => Ok(StartAt::Cursor(Cursor::decode(value)?)),
    }
}

/// Parses a stream start (`from` or `Last-Event-ID`) as the route does and
/// spells it back in its one canonical form. Parsing the canonical form must
/// give it again; the fuzz target in `fuzz/` checks that through
/// [`crate::fuzzing`].
pub(crate) fn canonical_start(value: &str) -> Result<String, String> {
    Ok(match parse_from(value).map_err(|e| e.to_string())? {
        StartAt::Now => "now".to_owned(),
        StartAt::Start => "start".to_owned(),
        StartAt::Position(position) => position.to_string(),
        StartAt::Cursor(cursor) => Cursor::encode(
            cursor
                .topics
                .iter()
                .map(|(name, partitions)| (name.as_str(), partitions.as_slice())),
        ),
    })
}

/// The next event of each partition: the offset of the next record and how many
/// events of that record were already delivered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Cursor {
    topics: BTreeMap<String, Vec<PartitionCursor>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct PartitionCursor {
    offset: u64,
    skip: u64,
}

impl Cursor {
    /// A compact binary form (version, then per topic its name and per partition
    /// two varints), in base64url so it is a valid SSE id and URL parameter.
    fn encode<'a>(topics: impl Iterator<Item = (&'a str, &'a [PartitionCursor])>) -> String {
        let mut bytes = vec![CURSOR_VERSION];
        let topics: Vec<_> = topics.collect();
        put_varint(&mut bytes, topics.len() as u64);
        for (name, partitions) in topics {
            put_varint(&mut bytes, name.len() as u64);
            bytes.extend_from_slice(name.as_bytes());
            put_varint(&mut bytes, partitions.len() as u64);
            for partition in partitions {
                put_varint(&mut bytes, partition.offset);
                put_varint(&mut bytes, partition.skip);
            }
        }
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn decode(text: &str) -> Result<Cursor, FromError> {
        if text.len() > MAX_CURSOR_LEN {
            return Err(FromError::Cursor("it is too long"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| FromError::Cursor("it is not base64url"))?;
        let mut input = bytes.as_slice();
        if take_byte(&mut input)? != CURSOR_VERSION {
            return Err(FromError::Cursor("unknown cursor version"));
        }
        let mut cursor = Cursor::default();
        for _ in 0..take_varint(&mut input)? {
            let len = usize::try_from(take_varint(&mut input)?)
                .map_err(|_| FromError::Cursor("topic name too long"))?;
            if len > input.len() {
                return Err(FromError::Cursor("truncated topic name"));
            }
            let (name, rest) = input.split_at(len);
            input = rest;
            let name = std::str::from_utf8(name)
                .map_err(|_| FromError::Cursor("topic name is not UTF-8"))?
                .to_owned();
            let count = take_varint(&mut input)?;
            // Each partition takes at least two bytes: this bounds the allocation
            // by the input's size whatever count a hostile cursor claims.
            if count > (input.len() / 2) as u64 {
                return Err(FromError::Cursor("truncated partition list"));
            }
            let mut partitions = Vec::new();
            for _ in 0..count {
                partitions.push(PartitionCursor {
                    offset: take_varint(&mut input)?,
                    skip: take_varint(&mut input)?,
                });
            }
            if cursor.topics.insert(name, partitions).is_some() {
                return Err(FromError::Cursor("a topic appears twice"));
            }
        }
        if !input.is_empty() {
            return Err(FromError::Cursor("trailing bytes"));
        }
        Ok(cursor)
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_byte(input: &mut &[u8]) -> Result<u8, FromError> {
    let (&first, rest) = input
        .split_first()
        .ok_or(FromError::Cursor("it is truncated"))?;
    *input = rest;
    Ok(first)
}

fn take_varint(input: &mut &[u8]) -> Result<u64, FromError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = take_byte(input)?;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(FromError::Cursor("a number overflows 64 bits"));
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(FromError::Cursor("a number overflows 64 bits"))
}

/// One partition the stream reads: where it is and the watch that wakes it.
struct Slot {
    topic: String,
    partition: u32,
    next: PartitionCursor,
    watch: watch::Receiver<u64>,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Resolves where each partition starts and subscribes to its end offset.
/// Blocking: a remote log answers end offsets over the network.
fn start_slots(log: &EventLog, topics: &[String], from: StartAt) -> Result<Vec<Slot>, StartError> {
    let partitions = log.partitions();
    if let StartAt::Position(position) = &from {
        if !topics.contains(&position.topic) {
            return Err(StartError::Invalid(format!(
                "position {position} is not in a topic this stream reads"
            )));
        }
        if position.partition >= partitions {
            return Err(StartError::Invalid(format!(
                "position {position} names partition {}, but topics have {partitions}",
                position.partition
            )));
        }
    }
    if let StartAt::Cursor(cursor) = &from {
        for (topic, stored) in &cursor.topics {
            if topics.contains(topic) && stored.len() != partitions as usize {
                return Err(StartError::Invalid(format!(
                    "the cursor has {} partitions for topic {topic}, but it has {partitions}",
                    stored.len()
                )));
            }
        }
    }
    let mut slots = Vec::new();
    let mut sorted = topics.to_vec();
    sorted.sort();
    sorted.dedup();
    for topic in sorted {
        for partition in 0..partitions {
            // Subscribing before reading the end offset means no append can
            // fall between the two unnoticed.
            let watch = log.subscribe(&topic, partition)?;
            let end = log.end_offset(&topic, partition)?;
            let next = match &from {
                StartAt::Now => PartitionCursor {
                    offset: end,
                    skip: 0,
                },
                StartAt::Start => PartitionCursor::default(),
                StartAt::Position(position) => {
                    if position.topic == topic && position.partition == partition {
                        if position.offset >= end {
                            return Err(StartError::Invalid(format!(
                                "position {position} is beyond the end of the log"
                            )));
                        }
                        PartitionCursor {
                            offset: position.offset + 1,
                            skip: 0,
                        }
                    } else {
                        PartitionCursor {
                            offset: end,
                            skip: 0,
                        }
                    }
                }
                // A topic the cursor does not name was not read by that stream
                // (an aggregate type added since, or a filtered stream): all of
                // its events are new to this client.
                StartAt::Cursor(cursor) => match cursor.topics.get(&topic) {
                    None => PartitionCursor::default(),
                    Some(stored) => {
                        let next = stored[partition as usize];
                        if next.offset > end {
                            return Err(StartError::Invalid(format!(
                                "the cursor is beyond the end of {topic}:{partition}; \
                                 it belongs to another log"
                            )));
                        }
                        next
                    }
                },
            };
            slots.push(Slot {
                topic: topic.clone(),
                partition,
                next,
                watch,
            });
        }
    }
    Ok(slots)
}

/// The cursor after every slot's current position.
fn cursor_of(slots: &[Slot]) -> String {
    let mut topics: Vec<(&str, Vec<PartitionCursor>)> = Vec::new();
    for slot in slots {
        match topics.last_mut() {
            Some((topic, partitions)) if *topic == slot.topic => partitions.push(slot.next),
            _ => topics.push((&slot.topic, vec![slot.next])),
        }
    }
    Cursor::encode(topics.iter().map(|(t, p)| (*t, p.as_slice())))
}

/// Why the reader stopped.
enum Stop {
    /// The client went away or the daemon is shutting down.
    Done,
}

/// Reads the log from the slots' positions and sends every event, in order per
/// partition and round-robin across partitions, until the client disconnects or
/// the daemon shuts down.
async fn pump(
    log: EventLog,
    domain: Arc<Domain>,
    mut slots: Vec<Slot>,
    tx: mpsc::Sender<SseEvent>,
    shutdown: CancellationToken,
) {
    loop {
        // Marking the ends seen before reading means an append after this
        // point always wakes the wait below: no event can slip by unnoticed.
        let pending: Vec<(usize, String, u32, u64)> = slots
            .iter_mut()
            .enumerate()
            .filter_map(|(index, slot)| {
                let end = *slot.watch.borrow_and_update();
                (slot.next.offset < end)
                    .then(|| (index, slot.topic.clone(), slot.partition, slot.next.offset))
            })
            .collect();
        if pending.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                changed = any_changed(&mut slots) => {
                    if !changed {
                        // The log closed: the daemon is stopping.
                        return;
                    }
                    continue;
                }
            }
        }
        let reader = log.clone();
        let read = tokio::task::spawn_blocking(move || {
            pending
                .into_iter()
                .map(|(index, topic, partition, from)| {
                    reader
                        .read(&topic, partition, from, READ_BATCH)
                        .map(|records| (index, records))
                })
                .collect::<Result<Vec<_>, LogError>>()
        })
        .await;
        let batches = match read {
            Ok(Ok(batches)) => batches,
            Ok(Err(LogError::Closed)) => return,
            Ok(Err(error)) => {
                fail(&tx, &format!("cannot read the event log: {error}")).await;
                return;
            }
            Err(_) => {
                fail(&tx, "the event log reader failed").await;
                return;
            }
        };
        match deliver(&domain, &mut slots, batches, &tx, &shutdown).await {
            Ok(()) => {}
            Err(Stop::Done) => return,
        }
    }
}

/// Sends a batch: one record of each partition in turn, so a busy partition
/// cannot hold back the others.
async fn deliver(
    domain: &Domain,
    slots: &mut [Slot],
    batches: Vec<(usize, Vec<(u64, Record)>)>,
    tx: &mpsc::Sender<SseEvent>,
    shutdown: &CancellationToken,
) -> Result<(), Stop> {
    let mut queues: Vec<(usize, std::vec::IntoIter<(u64, Record)>)> = batches
        .into_iter()
        .map(|(index, records)| (index, records.into_iter()))
        .collect();
    while !queues.is_empty() {
        let mut exhausted = Vec::new();
        for (position, (index, records)) in queues.iter_mut().enumerate() {
            let Some((offset, record)) = records.next() else {
                exhausted.push(position);
                continue;
            };
            send_record(domain, slots, *index, offset, &record, tx, shutdown).await?;
        }
        for position in exhausted.into_iter().rev() {
            queues.remove(position);
        }
    }
    Ok(())
}

async fn send_record(
    domain: &Domain,
    slots: &mut [Slot],
    index: usize,
    offset: u64,
    record: &Record,
    tx: &mpsc::Sender<SseEvent>,
    shutdown: &CancellationToken,
) -> Result<(), Stop> {
    let position = Position::new(slots[index].topic.clone(), slots[index].partition, offset);
    let events = match decode_current(domain, &record.headers, &record.value) {
        Ok(events) => events,
        Err(error) => {
            // A record this build cannot read is reported, never skipped: the
            // stream ends here so the client sees the problem.
            tracing::error!(%position, %error, "event stream stopped at an unreadable record");
            fail(tx, &format!("unreadable record at {position}: {error}")).await;
            return Err(Stop::Done);
        }
    };
    let skip = if slots[index].next.offset == offset {
        slots[index].next.skip
    } else {
        0
    };
    let count = events.len() as u64;
    for (number, event) in (0u64..).zip(events.iter()) {
        if number < skip {
            continue;
        }
        slots[index].next = if number + 1 == count {
            PartitionCursor {
                offset: offset.saturating_add(1),
                skip: 0,
            }
        } else {
            PartitionCursor {
                offset,
                skip: number + 1,
            }
        };
        let message = sse_event(event, &position, cursor_of(slots));
        tokio::select! {
            () = shutdown.cancelled() => return Err(Stop::Done),
            sent = tx.send(message) => if sent.is_err() { return Err(Stop::Done) },
        }
    }
    // A record with fewer events than the cursor skips (a cursor from a
    // different log) still moves on to the next record.
    if slots[index].next.offset == offset {
        slots[index].next = PartitionCursor {
            offset: offset.saturating_add(1),
            skip: 0,
        };
    }
    Ok(())
}

fn sse_event(event: &Event, position: &Position, cursor: String) -> SseEvent {
    let body = StreamedEvent {
        aggregate: &event.aggregate_type,
        id: &event.aggregate_id,
        version: event.version,
        event_type: &event.event_type,
        timestamp: event.timestamp.to_rfc3339_opts(SecondsFormat::Millis, true),
        data: &event.data,
        position: position.to_string(),
    };
    let data = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_owned());
    SseEvent::default()
        .event(field_value(&event.event_type))
        .data(data)
        .id(cursor)
}

/// SSE field values cannot hold line breaks (axum panics on them); the record
/// format forbids them in event types, but a record written by another client
/// must not be able to crash a connection.
fn field_value(text: &str) -> String {
    text.chars()
        .filter(|c| !matches!(c, '\r' | '\n' | '\0'))
        .collect()
}

/// Ends a stream with an `error` message saying why.
async fn fail(tx: &mpsc::Sender<SseEvent>, detail: &str) {
    let data = serde_json::json!({ "detail": detail }).to_string();
    let _ = tx.send(SseEvent::default().event("error").data(data)).await;
}

/// Resolves when any slot's end offset changes; false when the log closed.
async fn any_changed(slots: &mut [Slot]) -> bool {
    if slots.is_empty() {
        // Nothing to watch: wait forever (shutdown or the client ends it).
        std::future::pending::<()>().await;
    }
    let changes = slots.iter_mut().map(|slot| Box::pin(slot.watch.changed()));
    let (result, _, _) = futures::future::select_all(changes).await;
    result.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let a = [
            PartitionCursor { offset: 0, skip: 0 },
            PartitionCursor {
                offset: u64::MAX,
                skip: 3,
            },
        ];
        let b = [PartitionCursor {
            offset: 300,
            skip: 0,
        }];
        let text = Cursor::encode([("cqrsd.a", &a[..]), ("cqrsd.b", &b[..])].into_iter());
        let decoded = Cursor::decode(&text).unwrap();
        assert_eq!(decoded.topics["cqrsd.a"], a);
        assert_eq!(decoded.topics["cqrsd.b"], b);
        assert!(!text.contains(':'));
    }

    #[test]
    fn malformed_cursors_are_errors() {
        for bad in [
            "",
            "!!",
            "AA",
            "AQ",
            "Ag",
            "AQE",
            "AQFh",
            "AQH_",
            "AX",
            "now!",
            "////////////",
        ] {
            assert!(
                matches!(parse_from(bad), Err(FromError::Cursor(_))),
                "{bad:?} was accepted"
            );
        }
        // A huge partition count in a short cursor is rejected, not allocated.
        let mut bytes = vec![CURSOR_VERSION, 1, 1, b'a'];
        put_varint(&mut bytes, u64::MAX);
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(bytes)).is_err());
        // A varint longer than 64 bits is rejected.
        let bytes = [
            CURSOR_VERSION,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x7f,
        ];
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(bytes)).is_err());
    }

    #[test]
    fn from_keywords_and_positions() {
        assert_eq!(parse_from("now"), Ok(StartAt::Now));
        assert_eq!(parse_from("start"), Ok(StartAt::Start));
        assert_eq!(
            parse_from("cqrsd.account:2:5"),
            Ok(StartAt::Position(Position::new("cqrsd.account", 2, 5)))
        );
        assert!(matches!(parse_from("x:y:z"), Err(FromError::Position(_))));
    }

    #[test]
    fn event_types_cannot_break_the_framing() {
        assert_eq!(field_value("A\r\nB\0"), "AB");
    }
}
