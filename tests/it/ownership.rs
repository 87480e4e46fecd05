//! Partition ownership on Kafka: the fence. Two event logs on the shared
//! test broker stand for two command nodes; a third, without ownership, for
//! a query node. The fence lives in `KafkaLog` (src/kafka/owner.rs); the
//! command-owners group that decides who takes what is not built yet.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use std::sync::Arc;

use cqrsd::kafka::{GroupSettings, KafkaLog, KafkaSettings, OwnershipHandler};
use cqrsd::log::{LogError, Record};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::harness::{Broker, kafka_brokers, skip_kafka, tansu_bin};

/// How long a test waits for something to become true before it fails.
const BOUND: Duration = Duration::from_secs(30);

fn settings(brokers: &str, transactional_id_prefix: Option<&str>) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers.to_owned(),
        partitions: 2,
        replication_factor: 1,
        linger_ms: 1,
        batch_size: 1_000_000,
        produce_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(3),
        producer: BTreeMap::new(),
        consumer: BTreeMap::new(),
        transactional_id_prefix: transactional_id_prefix.map(str::to_owned),
    }
}

fn unique_prefix() -> String {
    format!(
        "own{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn record(payload: &str) -> Record {
    Record {
        key: "acc-1".to_owned(),
        headers: Vec::new(),
        value: payload.as_bytes().to_vec(),
        timestamp_ms: 0,
    }
}

/// Opens a log off the async worker threads (opening and reading block).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Takes partition `partition` of `topic` for `log`, off the async workers.
async fn take(log: &KafkaLog, topic: &str, partition: u32) -> Result<Duration, LogError> {
    let (log, topic) = (log.clone(), topic.to_owned());
    blocking(move || log.take_partition(&topic, partition)).await
}

/// Whether appending `payload` is refused because the partition is not owned.
async fn not_owned(log: &KafkaLog, topic: &str, partition: u32, payload: &str) -> bool {
    matches!(
        log.append(topic, partition, vec![record(payload)]).await,
        Err(LogError::NotOwned(_))
    )
}

fn payloads(records: &[(u64, Record)]) -> Vec<String> {
    records
        .iter()
        .map(|(_, r)| String::from_utf8(r.value.clone()).unwrap())
        .collect()
}

/// Every payload in a partition as a bare `read_uncommitted` consumer sees
/// it: data of aborted transactions included, whatever the broker hides.
fn everything_in(brokers: &str, topic: &str, partition: i32) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ownership-audit")
        .set("isolation.level", "read_uncommitted")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut found = Vec::new();
    let deadline = Instant::now() + BOUND;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_secs(2) {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            found.push(String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned());
            quiet_since = Instant::now();
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_owner_fences_the_earlier_one_and_every_reader_ends_at_the_last_record() {
    if skip_kafka() {
        return;
    }
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.account");
    let open = |with_prefix: bool| {
        let brokers = brokers.clone();
        let prefix = prefix.clone();
        let topic = topic.clone();
        blocking(move || {
            let log = KafkaLog::open(settings(&brokers, with_prefix.then_some(&*prefix))).unwrap();
            log.ensure_topic(&topic).unwrap();
            log
        })
    };
    let a = open(true).await;
    let b = open(true).await;

    // No append before the partition is taken.
    assert!(not_owned(&a, &topic, 0, "early").await);
    take(&a, &topic, 0).await.unwrap();
    assert_eq!(a.owned_partitions(), vec![(topic.clone(), 0)]);
    // The other partition is not A's.
    assert!(not_owned(&a, &topic, 1, "elsewhere").await);
    let mut acknowledged = Vec::new();
    for n in 0..3 {
        let batch = vec![record(&format!("a{n}-x")), record(&format!("a{n}-y"))];
        let offsets = a.append(&topic, 0, batch).await.unwrap();
        assert_eq!(offsets.len(), 2);
        assert_eq!(offsets[1], offsets[0] + 1, "a batch's records are adjacent");
        acknowledged.extend(offsets);
    }
    let a_last = *acknowledged.last().unwrap();

    // B takes the partition: A is fenced, and nothing A sends lands.
    take(&b, &topic, 0).await.unwrap();
    for n in 0..2 {
        let refused = a
            .append(&topic, 0, vec![record(&format!("zombie{n}"))])
            .await;
        assert!(
            matches!(refused, Err(LogError::NotOwned(_))),
            "a fenced owner's append must be refused: {refused:?}"
        );
    }
    assert!(
        a.owned_partitions().is_empty(),
        "a fenced owner owns nothing"
    );

    // The taker's restore reads what the previous owner left, and stops at
    // its last record although a commit marker follows it.
    let reader = b.clone();
    let t = topic.clone();
    let (end, records) = blocking(move || {
        let end = reader.end_offset(&t, 0).unwrap();
        (end, reader.read(&t, 0, 0, 100).unwrap())
    })
    .await;
    assert_eq!(
        end,
        a_last + 1,
        "the end is after the last record, not the marker"
    );
    assert_eq!(
        payloads(&records),
        ["a0-x", "a0-y", "a1-x", "a1-y", "a2-x", "a2-y"]
    );
    assert_eq!(
        records.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        acknowledged,
        "every acknowledged record at its acknowledged offset"
    );
    let b_offsets = b.append(&topic, 0, vec![record("b0")]).await.unwrap();
    assert!(b_offsets[0] > a_last);

    // A query node (no ownership) learns the new end from its refresher and
    // reads everything, ending at B's record.
    let query = open(false).await;
    let reader = query.clone();
    let t = topic.clone();
    let want = b_offsets[0] + 1;
    let (end, records) = blocking(move || {
        let deadline = Instant::now() + BOUND;
        let mut end = reader.end_offset(&t, 0).unwrap();
        while end < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            end = reader.end_offset(&t, 0).unwrap();
        }
        (end, reader.read(&t, 0, 0, 100).unwrap())
    })
    .await;
    assert_eq!(end, want);
    assert_eq!(
        payloads(&records),
        ["a0-x", "a0-y", "a1-x", "a1-y", "a2-x", "a2-y", "b0"]
    );
    // A reader positioned after the last record is at the end: nothing to
    // read, and no wait for offsets that only markers hold.
    let reader = query.clone();
    let t = topic.clone();
    let tail = blocking(move || reader.read(&t, 0, want, 100))
        .await
        .unwrap();
    assert!(tail.is_empty());

    // Nothing of the zombie is in the partition at all, aborted or not.
    let audit_brokers = brokers.clone();
    let t = topic.clone();
    let all = blocking(move || everything_in(&audit_brokers, &t, 0)).await;
    assert!(
        all.iter().all(|p| !p.starts_with("zombie")),
        "a fenced owner's record landed: {all:?}"
    );
    assert_eq!(all.len(), 7);

    // Given up, a partition takes no appends; taken again, it does.
    assert!(b.release_partition(&topic, 0));
    assert!(not_owned(&b, &topic, 0, "released").await);
    take(&a, &topic, 0).await.unwrap();
    let again = a.append(&topic, 0, vec![record("a-again")]).await.unwrap();
    assert!(again[0] > b_offsets[0]);
    for log in [a, b, query] {
        blocking(move || log.close()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_taken_only_in_ownership_mode() {
    if skip_kafka() {
        return;
    }
    let brokers = kafka_brokers();
    let topic = format!("{}.account", unique_prefix());
    let log = blocking(move || KafkaLog::open(settings(&brokers, None)).unwrap()).await;
    assert_eq!(log.transactional_id(&topic, 0), None);
    assert!(matches!(
        take(&log, &topic, 0).await,
        Err(LogError::Invalid(_))
    ));
    blocking(move || log.close()).await.unwrap();
}

/// Appends `payload` as a batch of one, taking the partition again when the
/// log says it is no longer owned (as whoever decides ownership would, still
/// holding it), until it is acknowledged or `BOUND` passes. Each attempt
/// has a payload of its own. Returns the acknowledged attempt (offset and
/// payload) and the payloads of the attempts that failed.
async fn append_until_acknowledged(
    log: &KafkaLog,
    topic: &str,
    payload: &str,
) -> ((u64, String), Vec<String>) {
    let deadline = Instant::now() + BOUND;
    let mut failed = Vec::new();
    for attempt in 0.. {
        assert!(Instant::now() < deadline, "{payload} never acknowledged");
        let payload = format!("{payload}-try{attempt}");
        match log.append(topic, 0, vec![record(&payload)]).await {
            Ok(offsets) => return ((offsets[0], payload), failed),
            Err(LogError::NotOwned(_)) => {
                failed.push(payload);
                // The broker may still be resuming: retried by the loop.
                let _ = take(log, topic, 0).await;
            }
            Err(_) => failed.push(payload),
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_in_an_outage_is_decided_before_the_next_one_and_never_lands_later() {
    if skip_kafka() {
        return;
    }
    if tansu_bin().is_none() {
        // Only reachable with KAFKA_BROKERS: an external cluster cannot be paused.
        eprintln!(
            "\n!!!!! SKIPPING the broker-pause ownership test: it needs the Tansu binary !!!!!\n"
        );
        return;
    }
    // A broker of its own: pausing the shared one would stall other tests.
    let broker = Broker::start();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.account");
    let log = {
        let (addr, prefix, topic) = (broker.addr.clone(), prefix.clone(), topic.clone());
        blocking(move || {
            let log = KafkaLog::open(settings(&addr, Some(&prefix))).unwrap();
            log.ensure_topic(&topic).unwrap();
            log.take_partition(&topic, 0).unwrap();
            log
        })
        .await
    };
    let mut acknowledged: Vec<(u64, String)> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for n in 0..10 {
        let (acked, refused) = append_until_acknowledged(&log, &topic, &format!("before{n}")).await;
        assert!(refused.is_empty(), "{refused:?} failed with the broker up");
        acknowledged.push(acked);
    }

    // The broker stops mid-append: the batch fails within the produce
    // timeout, and its transaction cannot be decided until the broker is back.
    broker.signal("STOP");
    let outage = log.append(&topic, 0, vec![record("outage")]).await;
    broker.signal("CONT");
    eprintln!("the append during the outage: {outage:?}");
    assert!(
        outage.is_err(),
        "an append to a stopped broker was acknowledged"
    );
    failed.push("outage".to_owned());

    // The next append is acknowledged only once the failed one is decided
    // (aborted, or fenced by taking the partition again); what of it is
    // visible then is all that ever will be.
    let ((first_after, payload), refused) = append_until_acknowledged(&log, &topic, "after0").await;
    eprintln!("attempts refused after the outage: {refused:?}");
    failed.extend(refused);
    acknowledged.push((first_after, payload));
    let reader = log.clone();
    let t = topic.clone();
    let visible_then: BTreeSet<String> = blocking(move || {
        let end = reader.end_offset(&t, 0).unwrap();
        payloads(
            &reader
                .read(&t, 0, 0, usize::try_from(end).unwrap())
                .unwrap(),
        )
    })
    .await
    .into_iter()
    .collect();
    for n in 1..10 {
        let (acked, refused) = append_until_acknowledged(&log, &topic, &format!("after{n}")).await;
        failed.extend(refused);
        acknowledged.push(acked);
    }

    // A fresh reader (no cached ends) sees every acknowledged record once,
    // at its offset, and of the failed ones only those that were visible
    // right after the failure, all before the first record appended after it.
    let fresh = {
        let (addr, prefix, topic) = (broker.addr.clone(), prefix.clone(), topic.clone());
        blocking(move || {
            let log = KafkaLog::open(settings(&addr, Some(&prefix))).unwrap();
            log.ensure_topic(&topic).unwrap();
            log
        })
        .await
    };
    let reader = fresh.clone();
    let t = topic.clone();
    let all = blocking(move || reader.read(&t, 0, 0, 10_000).unwrap()).await;
    let mut by_payload: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (offset, r) in &all {
        by_payload
            .entry(String::from_utf8(r.value.clone()).unwrap())
            .or_default()
            .push(*offset);
    }
    assert!(
        by_payload.values().all(|offsets| offsets.len() == 1),
        "a record is in the log twice: {by_payload:?}"
    );
    for (offset, payload) in &acknowledged {
        assert_eq!(
            by_payload.get(payload),
            Some(&vec![*offset]),
            "acknowledged {payload}"
        );
    }
    for payload in &failed {
        if let Some(offsets) = by_payload.get(payload) {
            assert!(
                visible_then.contains(payload),
                "the failed {payload} landed after the append that followed it"
            );
            assert!(
                offsets[0] < first_after,
                "{payload} lies after later records"
            );
        }
    }
    for log in [log, fresh] {
        blocking(move || log.close()).await.unwrap();
    }
}

/// A stand-in for a command node in the command-owners group: it takes what
/// the group gives it (fencing the previous owner) and releases what the
/// group takes away, and remembers what it holds.
struct GroupNode {
    log: KafkaLog,
    held: std::sync::Mutex<BTreeSet<(String, u32)>>,
}

impl OwnershipHandler for GroupNode {
    fn assigned(&self, partitions: &[(String, u32)]) -> Vec<(String, u32)> {
        let mut taken = Vec::new();
        for (topic, partition) in partitions {
            if self.log.take_partition(topic, *partition).is_ok() {
                taken.push((topic.clone(), *partition));
            }
        }
        self.held.lock().unwrap().extend(taken.iter().cloned());
        taken
    }

    fn revoked(&self, partitions: &[(String, u32)], _lost: bool) {
        let mut held = self.held.lock().unwrap();
        for (topic, partition) in partitions {
            self.log.release_partition(topic, *partition);
            held.remove(&(topic.clone(), *partition));
        }
    }
}

impl GroupNode {
    fn held(&self) -> BTreeSet<(String, u32)> {
        self.held.lock().unwrap().clone()
    }
}

/// Waits (bounded) until `done` holds; fails with `what` otherwise.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_owners_group_splits_the_partitions_and_the_map_names_each_owner() {
    if skip_kafka() {
        return;
    }
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.account");
    let partitions = 4;
    let open = |with_prefix: bool| {
        let (brokers, prefix) = (brokers.clone(), prefix.clone());
        blocking(move || {
            let mut settings = settings(&brokers, with_prefix.then_some(&*prefix));
            settings.partitions = partitions;
            KafkaLog::open(settings).unwrap()
        })
    };
    let query = open(false).await;
    let ensure = (query.clone(), topic.clone());
    blocking(move || ensure.0.ensure_topic(&ensure.1).unwrap()).await;
    let map_topic = format!("{prefix}.command-owners.map");
    let map = {
        let (query, map_topic) = (query.clone(), map_topic.clone());
        blocking(move || query.watch_owner_map(&map_topic).unwrap()).await
    };
    let group = |url: &str| GroupSettings {
        group_id: format!("{prefix}.command-owners"),
        topics: vec![topic.clone()],
        map_topic: map_topic.clone(),
        url: url.to_owned(),
        session_timeout: Duration::from_millis(3000),
    };
    let join = |node: &Arc<GroupNode>, settings: GroupSettings| {
        let node = node.clone();
        blocking(move || {
            let handler: Arc<dyn OwnershipHandler> = node.clone();
            node.log.join_command_owners(settings, handler).unwrap()
        })
    };
    let every: BTreeSet<(String, u32)> = (0..partitions).map(|p| (topic.clone(), p)).collect();
    let a = Arc::new(GroupNode {
        log: open(true).await,
        held: Default::default(),
    });
    let b = Arc::new(GroupNode {
        log: open(true).await,
        held: Default::default(),
    });
    let (url_a, url_b) = ("http://127.0.0.1:1", "http://127.0.0.1:2");

    // Alone in the group, A takes every partition and the map says so.
    let member_a = join(&a, group(url_a)).await;
    eventually("A alone holds every partition, as the map says", || {
        a.held() == every
            && every
                .iter()
                .all(|(t, p)| map.owner(t, *p).as_deref() == Some(url_a))
    })
    .await;

    // With B, the partitions are split: each holds some, none is held twice,
    // and the map names each partition's holder.
    let member_b = join(&b, group(url_b)).await;
    eventually("A and B split the partitions, as the map says", || {
        let (held_a, held_b) = (a.held(), b.held());
        !held_a.is_empty()
            && !held_b.is_empty()
            && held_a.is_disjoint(&held_b)
            && held_a.union(&held_b).cloned().collect::<BTreeSet<_>>() == every
            && every.iter().all(|(t, p)| {
                let url = if held_a.contains(&(t.clone(), *p)) {
                    url_a
                } else {
                    url_b
                };
                map.owner(t, *p).as_deref() == Some(url)
            })
    })
    .await;
    assert!(
        member_a
            .stats()
            .revocations
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // Only the holder can append; the other node's producer was fenced or
    // released.
    let (p_b, p_a) = (b.held().first().unwrap().1, a.held().first().unwrap().1);
    b.log
        .append(&topic, p_b, vec![record("by-b")])
        .await
        .unwrap();
    assert!(not_owned(&a.log, &topic, p_b, "a-on-b").await);
    assert!(not_owned(&b.log, &topic, p_a, "b-on-a").await);

    // B leaves cleanly: it releases everything, and A takes it all again.
    blocking(move || member_b.leave()).await;
    assert!(
        b.held().is_empty(),
        "B released what it held before leaving"
    );
    assert!(not_owned(&b.log, &topic, p_b, "b-after-leave").await);
    eventually("A holds every partition again, as the map says", || {
        a.held() == every
            && every
                .iter()
                .all(|(t, p)| map.owner(t, *p).as_deref() == Some(url_a))
    })
    .await;
    a.log
        .append(&topic, p_b, vec![record("by-a")])
        .await
        .unwrap();
    assert_eq!(
        everything_in(&brokers, &topic, p_b as i32)
            .iter()
            .filter(|p| p.starts_with("by-"))
            .cloned()
            .collect::<Vec<_>>(),
        ["by-b", "by-a"]
    );
    blocking(move || member_a.leave()).await;
    assert!(a.held().is_empty());
}
