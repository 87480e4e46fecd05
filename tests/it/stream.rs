//! `GET /events/stream`: live events as Server-Sent Events, resumable without
//! loss or duplicates.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use cqrsd::log::{Encoding, Event, EventLog, EventMetadata, encode, partition_for};
use futures::StreamExt as _;
use uuid::Uuid;

use crate::harness::{InProcess, expect_problem};

/// How long a test waits for one message before failing.
const MESSAGE_BOUND: Duration = Duration::from_secs(20);

fn start() -> InProcess {
    start_with(|_| {})
}

fn start_with(adjust: impl FnOnce(&mut cqrsd::config::Config)) -> InProcess {
    InProcess::start(
        |config| {
            // The stream does not depend on durability; skipping fsync keeps
            // the tests fast on slow disks.
            config.log.embedded.fsync = false;
            adjust(config);
        },
        None,
    )
}

/// A client without a total timeout: streams are meant to stay open.
fn stream_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn event(id: &str, version: u64, event_type: &str, data: serde_json::Value) -> Event {
    Event {
        event_id: Uuid::now_v7(),
        aggregate_type: "account".to_owned(),
        aggregate_id: id.to_owned(),
        version,
        event_type: event_type.to_owned(),
        schema_version: 1,
        timestamp: Utc::now(),
        data,
        metadata: EventMetadata {
            command: "test".to_owned(),
            command_id: Uuid::now_v7(),
            idempotency_key: None,
            correlation_id: None,
            request_hash: "test".to_owned(),
            principal: None,
        },
    }
}

/// Appends one record holding `count` events of aggregate `id`, starting at
/// version `first`; returns the record's position string.
async fn append(log: &EventLog, id: &str, first: u64, count: u64) -> String {
    append_with(log, id, first, count, serde_json::json!({})).await
}

async fn append_with(
    log: &EventLog,
    id: &str,
    first: u64,
    count: u64,
    data: serde_json::Value,
) -> String {
    let events: Vec<Event> = (first..first + count)
        .map(|version| event(id, version, "Tested", data.clone()))
        .collect();
    let record = encode(&events, Encoding::MessagePack).unwrap();
    let topic = log.topic("account");
    let partition = partition_for(id, log.partitions());
    let offsets = log.append(&topic, partition, vec![record]).await.unwrap();
    format!("{topic}:{partition}:{}", offsets[0])
}

/// One SSE message.
#[derive(Debug, Clone)]
struct Message {
    event: String,
    id: String,
    data: serde_json::Value,
}

impl Message {
    fn aggregate_version(&self) -> (String, u64) {
        (
            self.data["id"].as_str().unwrap().to_owned(),
            self.data["version"].as_u64().unwrap(),
        )
    }
}

/// Reads SSE messages from a response, skipping keep-alive comments.
struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseReader {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next message, or None when the stream ended.
    async fn next(&mut self) -> Option<Message> {
        tokio::time::timeout(MESSAGE_BOUND, self.next_unbounded())
            .await
            .expect("no SSE message arrived in time")
    }

    async fn next_unbounded(&mut self) -> Option<Message> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut fields = BTreeMap::new();
                for line in block.lines() {
                    if let Some((name, value)) = line.split_once(':')
                        && !name.is_empty()
                    {
                        fields.insert(name.to_owned(), value.trim_start().to_owned());
                    }
                }
                if !fields.contains_key("data") {
                    continue; // A keep-alive comment.
                }
                return Some(Message {
                    event: fields.get("event").cloned().unwrap_or_default(),
                    id: fields.get("id").cloned().unwrap_or_default(),
                    data: serde_json::from_str(&fields["data"]).unwrap(),
                });
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                Some(Err(error)) => panic!("stream failed: {error}"),
                None => return None,
            }
        }
    }

    async fn take(&mut self, count: usize) -> Vec<Message> {
        let mut messages = Vec::with_capacity(count);
        while messages.len() < count {
            messages.push(self.next().await.expect("the stream ended early"));
        }
        messages
    }

    /// Fails if a message arrives within `quiet`.
    async fn expect_nothing(&mut self, quiet: Duration) {
        if let Ok(message) = tokio::time::timeout(quiet, self.next_unbounded()).await {
            panic!("unexpected message: {message:?}");
        }
    }
}

async fn connect(daemon: &InProcess, query: &str, last_event_id: Option<&str>) -> SseReader {
    let mut request = stream_client().get(daemon.url(&format!("/events/stream{query}")));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    SseReader::new(request.send().await.unwrap())
}

/// Checks that every aggregate's versions arrive exactly once and in order.
fn assert_in_order_once(messages: &[Message], expected: &BTreeMap<String, u64>) {
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for message in messages {
        let (id, version) = message.aggregate_version();
        let last = seen.entry(id.clone()).or_insert(0);
        assert_eq!(version, *last + 1, "{id}: version {version} after {last}");
        *last = version;
    }
    assert_eq!(&seen, expected);
}

#[tokio::test]
async fn every_event_is_delivered_once_in_order_per_aggregate() {
    let daemon = start();
    let mut reader = connect(&daemon, "", None).await;

    // 12 aggregates, spread over partitions, each with records of 1 to 3 events.
    let mut expected = BTreeMap::new();
    for round in 0..4u64 {
        for n in 0..12u64 {
            let id = format!("acc-{n}");
            let next = expected.get(&id).copied().unwrap_or(0) + 1;
            let count = 1 + (n + round) % 3;
            append(&daemon.log, &id, next, count).await;
            expected.insert(id, next + count - 1);
        }
    }
    let total: u64 = expected.values().sum();
    let messages = reader.take(usize::try_from(total).unwrap()).await;
    assert_in_order_once(&messages, &expected);
    reader.expect_nothing(Duration::from_millis(300)).await;

    let first = &messages[0];
    assert_eq!(first.event, "Tested");
    assert_eq!(first.data["aggregate"], "account");
    assert_eq!(first.data["type"], "Tested");
    assert!(first.data["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(first.data["data"].is_object());
    assert!(
        first.data["position"]
            .as_str()
            .unwrap()
            .starts_with("cqrsd.account:")
    );
    assert!(!first.id.is_empty());
    daemon.stop();
}

#[tokio::test]
async fn the_default_start_is_now_and_from_start_replays_everything() {
    let daemon = start();
    let mut expected = BTreeMap::new();
    for n in 0..10u64 {
        let id = format!("old-{n}");
        append(&daemon.log, &id, 1, 2).await;
        expected.insert(id, 2);
    }

    let mut live = connect(&daemon, "?from=now", None).await;
    let mut default = connect(&daemon, "", None).await;
    let mut replay = connect(&daemon, "?from=start", None).await;
    let replayed = replay.take(20).await;
    assert_in_order_once(&replayed, &expected);

    append(&daemon.log, "new", 1, 1).await;
    for reader in [&mut live, &mut default, &mut replay] {
        let message = reader.next().await.unwrap();
        assert_eq!(message.aggregate_version(), ("new".to_owned(), 1));
    }
    daemon.stop();
}

#[tokio::test]
async fn reconnecting_with_last_event_id_resumes_without_loss_or_duplicates() {
    let daemon = start();
    let mut expected = BTreeMap::new();
    for n in 0..6u64 {
        let id = format!("acc-{n}");
        // Three-event records, so some cut points fall inside a record.
        append(&daemon.log, &id, 1, 3).await;
        append(&daemon.log, &id, 4, 3).await;
        expected.insert(id, 6);
    }
    let mut all = Vec::new();
    let mut last_id: Option<String> = None;
    // Read in uneven slices, reconnecting after each, while more is appended.
    for (slice, n) in [7usize, 1, 5, 11, 2].into_iter().zip(6u64..) {
        let mut reader = match &last_id {
            None => connect(&daemon, "?from=start", None).await,
            // The header wins over `from`.
            Some(id) => connect(&daemon, "?from=now", Some(id)).await,
        };
        let messages = reader.take(slice).await;
        last_id = Some(messages.last().unwrap().id.clone());
        all.extend(messages);
        drop(reader);
        let id = format!("acc-{n}");
        append(&daemon.log, &id, 1, 2).await;
        expected.insert(id, 2);
    }
    let total: u64 = expected.values().sum();
    let mut reader = connect(&daemon, "", last_id.as_deref()).await;
    let rest = reader
        .take(usize::try_from(total).unwrap() - all.len())
        .await;
    all.extend(rest);
    assert_in_order_once(&all, &expected);
    reader.expect_nothing(Duration::from_millis(300)).await;

    // A cursor also works as `from`.
    let cursor = all[10].id.clone();
    let mut reader = connect(&daemon, &format!("?from={cursor}"), None).await;
    let again = reader.take(all.len() - 11).await;
    reader.expect_nothing(Duration::from_millis(300)).await;
    // Partitions may interleave differently on a replay; what must match is
    // the set of events and each aggregate's order.
    let versions = |messages: &[Message]| {
        let mut by_aggregate: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for message in messages {
            let (id, version) = message.aggregate_version();
            by_aggregate.entry(id).or_default().push(version);
        }
        by_aggregate
    };
    assert_eq!(versions(&again), versions(&all[11..]));
    daemon.stop();
}

#[tokio::test]
async fn a_position_starts_after_that_record_in_its_partition() {
    let daemon = start();
    let position = append(&daemon.log, "acc", 1, 2).await;
    append(&daemon.log, "acc", 3, 1).await;
    append(&daemon.log, "other", 1, 1).await;
    let mut reader = connect(&daemon, &format!("?from={position}"), None).await;
    let message = reader.next().await.unwrap();
    assert_eq!(message.aggregate_version(), ("acc".to_owned(), 3));
    append(&daemon.log, "acc", 4, 1).await;
    let message = reader.next().await.unwrap();
    assert_eq!(message.aggregate_version(), ("acc".to_owned(), 4));
    daemon.stop();
}

#[tokio::test]
async fn a_slow_reader_loses_nothing() {
    let daemon = start();
    let mut reader = connect(&daemon, "", None).await;
    // About 4 MB of events: far more than the channel and socket buffers
    // hold, so the server must wait for the client rather than drop.
    let padding = "x".repeat(2000);
    let mut expected = BTreeMap::new();
    for n in 0..2000u64 {
        let id = format!("acc-{}", n % 50);
        let next = expected.get(&id).copied().unwrap_or(0) + 1;
        append_with(
            &daemon.log,
            &id,
            next,
            1,
            serde_json::json!({ "padding": padding }),
        )
        .await;
        expected.insert(id, next);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let messages = reader.take(2000).await;
    assert_in_order_once(&messages, &expected);
    daemon.stop();
}

#[tokio::test]
async fn a_stream_outlives_the_request_timeout() {
    let daemon = start_with(|config| config.http.request_timeout_ms = 200);
    let mut reader = connect(&daemon, "", None).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    append(&daemon.log, "late", 1, 1).await;
    let message = reader.next().await.unwrap();
    assert_eq!(message.aggregate_version(), ("late".to_owned(), 1));
    daemon.stop();
}

#[tokio::test]
async fn streams_end_on_shutdown() {
    let daemon = start();
    let mut reader = connect(&daemon, "", None).await;
    daemon.begin_shutdown();
    assert!(reader.next().await.is_none());
    daemon.stop();
}

#[tokio::test]
async fn the_aggregate_filter_selects_one_topic() {
    let daemon = start();
    append(&daemon.log, "acc", 1, 1).await;
    let mut reader = connect(&daemon, "?from=start&aggregate=account", None).await;
    assert_eq!(
        reader.next().await.unwrap().aggregate_version(),
        ("acc".to_owned(), 1)
    );
    let response = stream_client()
        .get(daemon.url("/events/stream?aggregate=nope"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 400).await;
    daemon.stop();
}

#[tokio::test]
async fn malformed_starts_are_400_problems() {
    let daemon = start();
    let http = stream_client();
    for from in [
        "garbage!",
        "AQ",
        "bm9wZQ",
        "cqrsd.nope:0:0",
        "cqrsd.account:999:0",
        "cqrsd.account:0:99",
        "cqrsd.account:x:1",
    ] {
        let response = http
            .get(daemon.url("/events/stream"))
            .query(&[("from", from)])
            .send()
            .await
            .unwrap();
        let problem = expect_problem(response, 400).await;
        assert!(!problem["detail"].as_str().unwrap().is_empty(), "{from}");
        let response = http
            .get(daemon.url("/events/stream"))
            .header("last-event-id", from)
            .send()
            .await
            .unwrap();
        expect_problem(response, 400).await;
    }
    daemon.stop();
}
