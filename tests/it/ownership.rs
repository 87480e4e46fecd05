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

use crate::harness::{Broker, Process, free_port, kafka_brokers, node_url, skip_kafka, tansu_bin};

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

/// Starts a node of a cluster whose command nodes share the partitions.
fn group_node(log: &str, role: &str, port: u16, peers: &[u16]) -> Process {
    crate::harness::start_node(
        log,
        role,
        port,
        peers,
        "ownership = \"group\"\nsession_timeout_ms = 3000\nmoving_retry_after_ms = 1000\n\
         response_timeout_ms = 5000\n",
    )
}

/// What the clients saw while partitions moved.
#[derive(Debug, Default)]
struct Seen {
    /// Acknowledged deposits: (account, idempotency key) -> reply.
    acknowledged: BTreeMap<(String, String), serde_json::Value>,
    /// 503s, every one with a Retry-After.
    moving: u64,
    /// Requests that reached no node (it was stopped or gone), or whose
    /// answer the client stopped waiting for.
    unreachable: u64,
    /// Whether a 502 or 504 (a forward to a stopped or killed owner) is
    /// allowed: only where nodes are killed or stopped, never on a clean
    /// handover.
    unknown_allowed: bool,
    /// 502s and 504s, each retried with the same key.
    unknown: u64,
}

/// Sends one command until it is acknowledged, to the nodes in turn from
/// `start`: a 503 must carry Retry-After, and a node that cannot be reached
/// is skipped; any other answer than 200 fails the test.
async fn until_acknowledged(
    http: &reqwest::Client,
    urls: &[String],
    start: usize,
    path: &str,
    body: serde_json::Value,
    key: &str,
    seen: &std::sync::Mutex<Seen>,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    for attempt in 0.. {
        assert!(
            Instant::now() < deadline,
            "{path} ({key}) never acknowledged"
        );
        let url = &urls[(start + attempt) % urls.len()];
        let sent = http
            .post(format!("{url}{path}"))
            .header("idempotency-key", key)
            .timeout(Duration::from_secs(20))
            .json(&body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(_) => {
                seen.lock().unwrap().unreachable += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match response.status().as_u16() {
            200 => return response.json().await.unwrap(),
            503 => {
                assert!(
                    response.headers().contains_key("retry-after"),
                    "a 503 without Retry-After from {url}{path}: {}",
                    response.text().await.unwrap_or_default()
                );
                seen.lock().unwrap().moving += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // A forward to an owner that was stopped (SIGSTOP) times out,
            // or one that was killed breaks off: the command's outcome is
            // unknown, and the client retries with its key.
            502 | 504 if seen.lock().unwrap().unknown_allowed => {
                seen.lock().unwrap().unknown += 1;
            }
            status => panic!(
                "{url}{path} ({key}) answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }
    unreachable!()
}

/// GETs `path` from the nodes in turn until one answers 200 (503s and
/// unreachable nodes are waited out).
async fn read_until_ok(http: &reqwest::Client, urls: &[String], path: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        assert!(Instant::now() < deadline, "GET {path} never answered 200");
        let url = &urls[attempt % urls.len()];
        if let Ok(response) = http.get(format!("{url}{path}")).send().await {
            match response.status().as_u16() {
                200 => return response.json().await.unwrap(),
                503 => assert!(response.headers().contains_key("retry-after")),
                status => panic!("GET {url}{path} answered {status}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!()
}

/// Deposits of 1 by `clients` concurrent clients, each `per_client` of them
/// with unique idempotency keys spread over `accounts`, sent to the nodes in
/// turn; calls `midway` once half are acknowledged.
async fn deposit_load(
    http: &reqwest::Client,
    urls: &[String],
    accounts: usize,
    clients: usize,
    per_client: usize,
    round: usize,
    seen: &Arc<std::sync::Mutex<Seen>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|client| {
            let (http, urls, seen) = (http.clone(), urls.to_vec(), seen.clone());
            tokio::spawn(async move {
                for n in 0..per_client {
                    let account = format!("acct-{}", (client + n * clients) % accounts);
                    let key = format!("r{round}-c{client}-n{n}");
                    let reply = until_acknowledged(
                        &http,
                        &urls,
                        client + n,
                        &format!("/commands/account/{account}/deposit"),
                        serde_json::json!({"amount": 1}),
                        &key,
                        &seen,
                    )
                    .await;
                    seen.lock()
                        .unwrap()
                        .acknowledged
                        .insert((account, key), reply);
                }
            })
        })
        .collect()
}

/// Waits (bounded) until at least `count` deposits are acknowledged.
async fn acknowledged_at_least(seen: &std::sync::Mutex<Seen>, count: usize) {
    eventually(&format!("{count} deposits acknowledged"), || {
        seen.lock().unwrap().acknowledged.len() >= count
    })
    .await;
}

/// The end state: every acknowledged deposit is in its account's history
/// exactly once (by its idempotency key), versions are dense, nothing was
/// applied that was not acknowledged, and the query node's view equals the
/// aggregate's state folded from the log.
async fn audit(http: &reqwest::Client, urls: &[String], query: &str, accounts: usize, seen: &Seen) {
    for i in 0..accounts {
        let id = format!("acct-{i}");
        let history = read_until_ok(
            http,
            urls,
            &format!("/aggregates/account/{id}/events?limit=1000"),
        )
        .await;
        let events = history["events"].as_array().unwrap();
        crate::harness::assert_dense_versions(events, &id);
        let keys: Vec<&str> = events
            .iter()
            .filter(|e| e["type"] == "MoneyDeposited")
            .map(|e| e["idempotency_key"].as_str().unwrap())
            .collect();
        let unique: BTreeSet<&str> = keys.iter().copied().collect();
        assert_eq!(unique.len(), keys.len(), "a deposit applied twice to {id}");
        let acknowledged: BTreeSet<&str> = seen
            .acknowledged
            .keys()
            .filter(|(account, _)| *account == id)
            .map(|(_, key)| key.as_str())
            .collect();
        assert_eq!(
            unique, acknowledged,
            "the log of {id} is not what was acknowledged"
        );
        // Each reply's version is the version its event has in the log.
        for ((account, key), reply) in &seen.acknowledged {
            if *account == id {
                let event = events
                    .iter()
                    .find(|e| e["idempotency_key"] == key.as_str())
                    .unwrap();
                assert_eq!(event["version"], reply["version"], "{id} {key}");
            }
        }
        let last = events.last().unwrap()["position"]
            .as_str()
            .unwrap()
            .to_owned();
        let state = read_until_ok(http, urls, &format!("/aggregates/account/{id}")).await;
        let view = read_until_ok(
            http,
            &[query.to_owned()],
            &format!("/views/accounts/{id}?consistent_with={last}"),
        )
        .await;
        assert_eq!(view["doc"]["balance"], state["state"]["balance"], "{id}");
        assert_eq!(
            state["state"]["balance"],
            serde_json::json!(acknowledged.len()),
            "{id}"
        );
    }
}

/// Opens the accounts through any node (retrying 503s while the group
/// settles), so deposits have something to go to.
async fn open_accounts(
    http: &reqwest::Client,
    urls: &[String],
    accounts: usize,
    seen: &std::sync::Mutex<Seen>,
) {
    for i in 0..accounts {
        let reply = until_acknowledged(
            http,
            urls,
            i,
            &format!("/commands/account/acct-{i}/open"),
            serde_json::json!({"owner": format!("owner-{i}")}),
            &format!("open-{i}"),
            seen,
        )
        .await;
        assert_eq!(reply["version"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_sigterm_of_a_command_node_hands_its_partitions_over_with_only_503s() {
    if skip_kafka() {
        return;
    }
    let log = crate::harness::kafka_config(&kafka_brokers());
    let (c1, c2, q) = (free_port(), free_port(), free_port());
    let first = group_node(&log, "command", c1, &[c2, q]);
    let mut second = group_node(&log, "command", c2, &[c1, q]);
    let query = group_node(&log, "query", q, &[c1, c2]);
    for node in [&first, &second, &query] {
        node.ready().await;
    }
    let http = crate::harness::client();
    let urls: Vec<String> = [c1, c2, q].into_iter().map(node_url).collect();
    let accounts = 8;
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    open_accounts(&http, &urls, accounts, &seen).await;

    // Both command nodes serve partitions: each answered some command itself.
    let (clients, per_client) = (3, 16);
    let load = deposit_load(&http, &urls, accounts, clients, per_client, 0, &seen).await;
    acknowledged_at_least(&seen, clients * per_client / 3).await;
    let handed = owned_by(&http, &node_url(c2)).await.unwrap();
    assert!(
        !handed.is_empty(),
        "the second command node serves partitions"
    );
    let moved = account_in(&handed, accounts, 4).unwrap();
    // A clean stop: its partitions are handed over while clients keep
    // sending; nothing but 503 with Retry-After (or a refused connection
    // to the stopped node) may reach them.
    let live = [node_url(c1), node_url(q)];
    second.signal("TERM");
    let probe = takeover_probe(
        &http,
        live.to_vec(),
        moved,
        "probe-term".to_owned(),
        seen.clone(),
    );
    assert_eq!(second.wait_exit(Duration::from_secs(60)).code(), Some(0));
    for task in load {
        task.await.unwrap();
    }
    eprintln!(
        "takeover after SIGTERM: {:?} to the first acknowledged command on a moved partition",
        probe.await.unwrap()
    );
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "handover: {} acknowledged, {} answers 503 with Retry-After, {} sends reached no node",
        seen.acknowledged.len(),
        seen.moving,
        seen.unreachable
    );
    assert_eq!(seen.acknowledged.len(), clients * per_client + 1);
    // The first node now serves every partition.
    audit(&http, &live, &node_url(q), accounts, &seen).await;
    // An acknowledged command retried now, with its key, on the node that
    // took its partition over, gets its first answer: the new owner rebuilt
    // the idempotency answers from the log.
    let ((account, key), first_reply) = seen.acknowledged.iter().next().unwrap();
    let again = until_acknowledged(
        &http,
        &live,
        0,
        &format!("/commands/account/{account}/deposit"),
        serde_json::json!({"amount": 1}),
        key,
        &std::sync::Mutex::new(Seen::default()),
    )
    .await;
    assert_eq!(&again, first_reply);
    drop((first, query));
}

/// The partitions a command node of a group says it serves (`None` when it
/// does not answer).
async fn owned_by(http: &reqwest::Client, url: &str) -> Option<BTreeSet<String>> {
    let response = http
        .get(format!("{url}/admin/node"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = response.json().await.ok()?;
    Some(
        body["ownership"]["owned"]
            .as_array()?
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect(),
    )
}

/// Waits (bounded) until the command nodes at `urls` serve every partition
/// between them, each partition once.
async fn serve_every_partition(http: &reqwest::Client, urls: &[String], partitions: usize) {
    let deadline = Instant::now() + BOUND * 2;
    loop {
        let mut all = Vec::new();
        for url in urls {
            all.extend(owned_by(http, url).await.unwrap_or_default());
        }
        let unique: BTreeSet<&String> = all.iter().collect();
        if all.len() == partitions && unique.len() == partitions {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{urls:?} never served the {partitions} partitions between them: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_stopped_command_nodes_lose_nothing_and_a_zombie_lands_nothing() {
    if skip_kafka() {
        return;
    }
    let log = crate::harness::kafka_config(&kafka_brokers());
    let partitions = 4;
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let peers = |i: usize| -> Vec<u16> {
        ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| *p)
            .collect()
    };
    let mut commands: Vec<Option<Process>> = (0..3)
        .map(|i| Some(group_node(&log, "command", ports[i], &peers(i))))
        .collect();
    let query = group_node(&log, "query", ports[3], &peers(3));
    for node in commands.iter().flatten().chain([&query]) {
        node.ready().await;
    }
    let http = crate::harness::client();
    let urls: Vec<String> = ports.iter().copied().map(node_url).collect();
    let command_urls = &urls[..3];
    let accounts = 8;
    let seen = Arc::new(std::sync::Mutex::new(Seen {
        unknown_allowed: true,
        ..Seen::default()
    }));
    open_accounts(&http, &urls, accounts, &seen).await;
    serve_every_partition(&http, command_urls, partitions).await;

    let (clients, per_client) = (3, 12);
    for round in 0..2 {
        let (killed, stopped) = (round % 3, (round + 1) % 3);
        let before = seen.lock().unwrap().acknowledged.len();
        let load = deposit_load(&http, &urls, accounts, clients, per_client, round, &seen).await;
        let total = clients * per_client;

        // SIGKILL one command node mid-load: its partitions move once its
        // session expires, and their commands are accepted again.
        acknowledged_at_least(&seen, before + total / 3).await;
        let lost = owned_by(&http, &urls[killed]).await.unwrap();
        let survivors: Vec<String> = (0..3)
            .filter(|i| *i != killed)
            .map(|i| urls[i].clone())
            .collect();
        let mut victim = commands[killed].take().unwrap();
        victim.signal("KILL");
        let probe = account_in(&lost, accounts, partitions as u32).map(|account| {
            let urls = survivors.iter().cloned().chain([urls[3].clone()]).collect();
            takeover_probe(
                &http,
                urls,
                account,
                format!("probe-kill-{round}"),
                seen.clone(),
            )
        });
        victim.wait_exit(BOUND);
        serve_every_partition(&http, &survivors, partitions).await;
        if let Some(probe) = probe {
            eprintln!(
                "round {round}: takeover after SIGKILL: {:?} to the first acknowledged command on a moved partition",
                probe.await.unwrap()
            );
        }

        // SIGSTOP another past its session: its partitions move to the
        // last node while it still believes it owns them; then SIGCONT.
        acknowledged_at_least(&seen, before + 2 * total / 3).await;
        let believed = owned_by(&http, &urls[stopped]).await.unwrap();
        commands[stopped].as_ref().unwrap().signal("STOP");
        let last = (0..3).find(|i| *i != killed && *i != stopped).unwrap();
        serve_every_partition(&http, &urls[last..=last], partitions).await;
        // A command that waits in the stopped node's socket for one of the
        // partitions it believes it owns, marked forwarded so that the
        // zombie handles it itself whatever its owner map says by then: it
        // must be refused (fenced, or no longer served), and never land.
        let zombie = account_in(&believed, accounts, partitions as u32).map(|account| {
            // A connection of its own: a pooled one may be closed as idle
            // by the node as soon as it runs again.
            let fresh = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            let request = fresh
                .post(format!(
                    "{}/commands/account/{account}/deposit",
                    urls[stopped]
                ))
                .header("cqrsd-forwarded", "1")
                .header("idempotency-key", format!("zombie-{round}"))
                .timeout(BOUND * 2)
                .json(&serde_json::json!({"amount": 1}))
                .send();
            tokio::spawn(request)
        });
        // Let the request reach the stopped node's socket before it runs.
        tokio::time::sleep(Duration::from_millis(300)).await;
        commands[stopped].as_ref().unwrap().signal("CONT");
        if let Some(zombie) = zombie {
            let answer = zombie
                .await
                .unwrap()
                .expect("the zombie answered the command queued while it was stopped");
            assert_eq!(answer.status(), 503, "the zombie accepted a command");
            assert!(answer.headers().contains_key("retry-after"));
            eprintln!(
                "round {round}: the zombie answered 503: {}",
                answer.text().await.unwrap_or_default()
            );
        }

        for task in load {
            task.await.unwrap();
        }
        // The load's deposits, and the probe's when the killed node held
        // one of the accounts' partitions.
        let now = seen.lock().unwrap().acknowledged.len();
        assert!(now == before + total || now == before + total + 1, "{now}");
        // The woken zombie rejoined: the two live command nodes share the
        // partitions again.
        serve_every_partition(&http, &survivors, partitions).await;
        {
            let seen = seen.lock().unwrap();
            eprintln!(
                "round {round}: {} acknowledged, {} answers 503 with Retry-After, {} 502/504, {} sends reached no node",
                seen.acknowledged.len(),
                seen.moving,
                seen.unknown,
                seen.unreachable
            );
        }
        let live: Vec<String> = survivors.iter().cloned().chain([urls[3].clone()]).collect();
        let acknowledged = Seen {
            acknowledged: seen.lock().unwrap().acknowledged.clone(),
            ..Seen::default()
        };
        audit(&http, &live, &urls[3], accounts, &acknowledged).await;

        // The killed node comes back on its data for the next round.
        let back = victim.respawn(BOUND);
        back.ready().await;
        commands[killed] = Some(back);
        serve_every_partition(&http, command_urls, partitions).await;
    }
    // Every view equals a rebuild from the log: what the query node built
    // while owners were killed, stopped and replaced is what a fresh read
    // of the whole log gives.
    let base = urls[3].clone();
    crate::readside::wait_caught_up(&http, &base).await;
    let view = crate::projection_crash::read_view(&http, &base).await;
    let flows = crate::projection_crash::read_flows(&http, &base).await;
    crate::projection_crash::assert_equal_to_a_rebuild(&http, &base, &view, &flows).await;
    drop(query);
}

/// An account of the first `accounts` whose partition is in `owned` (as
/// `<topic>:<partition>` of the account topic).
fn account_in(owned: &BTreeSet<String>, accounts: usize, partitions: u32) -> Option<String> {
    (0..accounts).map(|i| format!("acct-{i}")).find(|id| {
        let partition = cqrsd::log::partition_for(id, partitions);
        owned
            .iter()
            .any(|o| o.ends_with(&format!(".account:{partition}")))
    })
}

/// Sends a probe deposit (a key of its own) for `account` from now until it
/// is acknowledged, and records it: how long the account's partition took
/// to be served again. Printed for the lead's measurements, never asserted.
fn takeover_probe(
    http: &reqwest::Client,
    urls: Vec<String>,
    account: String,
    key: String,
    seen: Arc<std::sync::Mutex<Seen>>,
) -> tokio::task::JoinHandle<Duration> {
    let http = http.clone();
    let started = Instant::now();
    tokio::spawn(async move {
        let reply = until_acknowledged(
            &http,
            &urls,
            0,
            &format!("/commands/account/{account}/deposit"),
            serde_json::json!({"amount": 1}),
            &key,
            &seen,
        )
        .await;
        let took = started.elapsed();
        seen.lock()
            .unwrap()
            .acknowledged
            .insert((account, key), reply);
        took
    })
}
