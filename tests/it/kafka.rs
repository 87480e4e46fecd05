//! The Kafka backend: records readable by any Kafka client from the format
//! document alone, a restart from an empty data directory, and a broker
//! outage under load.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use crate::harness::{
    Broker, Process, ProcessOptions, client, command, kafka_brokers, kafka_config, skip_kafka,
    tansu_bin,
};

const PARTITIONS: u32 = 4;

/// The `topic_prefix` of a config made by `kafka_config`.
fn prefix_of(config: &str) -> String {
    let line = config
        .lines()
        .find(|l| l.starts_with("topic_prefix"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_owned()
}

/// Kafka's murmur2 partitioner, written from docs/record-format.md §2.
fn doc_partition(key: &str, partitions: u32) -> u32 {
    let data = key.as_bytes();
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for b in &mut chunks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]).wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m) ^ k;
    }
    let t = chunks.remainder();
    if t.len() == 3 {
        h ^= u32::from(t[2]) << 16;
    }
    if t.len() >= 2 {
        h ^= u32::from(t[1]) << 8;
    }
    if !t.is_empty() {
        h ^= u32::from(t[0]);
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    (h & 0x7fff_ffff) % partitions
}

/// A record as a plain Kafka client sees it.
#[derive(Debug)]
struct Plain {
    partition: u32,
    offset: u64,
    key: String,
    headers: BTreeMap<String, String>,
    events: Vec<Value>,
}

/// Reads every record of a topic with a bare rdkafka consumer (manual
/// assignment, no cqrsd code) and decodes it as docs/record-format.md says.
fn read_topic(brokers: &str, topic: &str) -> Vec<Plain> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "plain-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS as i32 {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap();
        ends.insert(partition, high);
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    let total: i64 = ends.values().sum();
    consumer.assign(&assignment).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Read at least up to the high watermarks, then on until the topic stays
    // quiet: a broker may report a watermark behind records it has
    // acknowledged (Tansu does), and those records count too.
    let mut quiet_since = Instant::now();
    while (records.len() as i64) < total || quiet_since.elapsed() < Duration::from_secs(1) {
        assert!(Instant::now() < deadline, "could not read {topic}");
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        quiet_since = Instant::now();
        let message = message.unwrap();
        let mut headers = BTreeMap::new();
        for header in message.headers().unwrap().iter() {
            headers.insert(
                header.key.to_owned(),
                String::from_utf8(header.value.unwrap().to_vec()).unwrap(),
            );
        }
        assert_eq!(headers["cqrsd-format"], "1");
        let payload = message.payload().unwrap();
        let events: Vec<Value> = match headers["content-type"].as_str() {
            "application/msgpack" => rmp_serde::from_slice(payload).unwrap(),
            "application/json" => serde_json::from_slice(payload).unwrap(),
            other => panic!("unknown content-type {other}"),
        };
        records.push(Plain {
            partition: message.partition() as u32,
            offset: message.offset() as u64,
            key: String::from_utf8(message.key().unwrap().to_vec()).unwrap(),
            headers,
            events,
        });
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_kafka_consumer_decodes_the_records_from_the_format_doc() {
    if skip_kafka() {
        return;
    }
    let brokers = kafka_brokers();
    for encoding in ["msgpack", "json"] {
        let config = kafka_config(&brokers).replace(
            "backend = \"kafka\"\n",
            &format!("backend = \"kafka\"\nencoding = \"{encoding}\"\n"),
        );
        let prefix = prefix_of(&config);
        let daemon = Process::start(ProcessOptions {
            config,
            ..ProcessOptions::default()
        });
        daemon.ready().await;
        let (http, base) = (client(), daemon.url(""));
        let response = http
            .post(format!("{base}/commands/account/acc-42/open"))
            .header("idempotency-key", "k-open")
            .json(&json!({"owner": "Ada"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        for amount in [json!(10.5), json!(2)] {
            let response = command(
                &http,
                &base,
                "account/acc-42/deposit",
                json!({"amount": amount}),
            )
            .await;
            assert_eq!(response.status(), 200);
        }

        let topic = format!("{prefix}.account");
        let records = tokio::task::spawn_blocking({
            let (brokers, topic) = (brokers.clone(), topic.clone());
            move || read_topic(&brokers, &topic)
        })
        .await
        .unwrap();
        assert_eq!(records.len(), 3, "one record per command");
        for (n, record) in records.iter().enumerate() {
            let version = n as u64 + 1;
            assert_eq!(record.key, "acc-42");
            assert_eq!(record.partition, doc_partition("acc-42", PARTITIONS));
            assert_eq!(
                record.headers["content-type"],
                format!("application/{encoding}")
            );
            assert_eq!(record.headers["cqrsd-aggregate-type"], "account");
            assert_eq!(record.headers["cqrsd-version-first"], version.to_string());
            assert_eq!(record.headers["cqrsd-version-last"], version.to_string());
            assert_eq!(record.events.len(), 1);
            let event = &record.events[0];
            assert_eq!(event["aggregate_type"], "account");
            assert_eq!(event["aggregate_id"], "acc-42");
            assert_eq!(event["version"], version);
            assert_eq!(
                event["event_type"].as_str().unwrap(),
                record.headers["cqrsd-event-types"]
            );
            assert!(event["event_id"].as_str().unwrap().len() == 36, "{event}");
            assert!(
                event["timestamp"].as_str().unwrap().ends_with('Z'),
                "{event}"
            );
            assert!(event["metadata"]["command_id"].is_string(), "{event}");
        }
        assert_eq!(records[0].events[0]["data"], json!({"owner": "Ada"}));
        assert_eq!(records[0].events[0]["metadata"]["command"], "open");
        assert_eq!(
            records[0].events[0]["metadata"]["idempotency_key"],
            "k-open"
        );
        // Numbers keep their kind: 10.5 stays a float, 2 an integer.
        assert_eq!(records[1].events[0]["data"]["amount"], json!(10.5));
        assert!(records[2].events[0]["data"]["amount"].is_u64());
        assert_eq!(
            records[2].events[0]["metadata"]["idempotency_key"],
            Value::Null
        );
    }
}

/// A daemon on the test broker with the default settings, ready.
async fn ready_on_kafka() -> Process {
    let daemon = Process::start(ProcessOptions {
        config: kafka_config(&kafka_brokers()),
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    daemon
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_data_directory_restores_states_versions_and_idempotent_answers() {
    if skip_kafka() {
        return;
    }
    let daemon = ready_on_kafka().await;
    let (http, base) = (client(), daemon.url(""));
    let mut answers = BTreeMap::new();
    for account in 0..10 {
        let id = format!("r{account}");
        assert_eq!(
            command(
                &http,
                &base,
                &format!("account/{id}/open"),
                json!({"owner": "x"})
            )
            .await
            .status(),
            200
        );
        for n in 0..=account {
            let key = format!("{id}-{n}");
            let response = http
                .post(format!("{base}/commands/account/{id}/deposit"))
                .header("idempotency-key", &key)
                .json(&json!({"amount": n + 1}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            answers.insert((id.clone(), key), response.text().await.unwrap());
        }
    }
    let mut states = BTreeMap::new();
    for account in 0..10 {
        let id = format!("r{account}");
        states.insert(
            id.clone(),
            get(&http, format!("{base}/aggregates/account/{id}")).await,
        );
    }

    crate::readside::wait_caught_up(&http, &base).await;
    let mut views = BTreeMap::new();
    for id in states.keys() {
        views.insert(
            id.clone(),
            get(&http, format!("{base}/views/accounts/{id}")).await,
        );
    }
    assert_eq!(
        views["r9"]["doc"]["balance"],
        json!(55),
        "{:?}",
        views["r9"]
    );

    let daemon = daemon.restart_after(|dir| {
        std::fs::remove_dir_all(dir.join("data")).unwrap();
    });
    daemon.ready().await;
    let base = daemon.url("");
    for (id, state) in &states {
        assert_eq!(
            &get(&http, format!("{base}/aggregates/account/{id}")).await,
            state,
            "{id} restored"
        );
    }
    // The views are rebuilt from the topic: readiness waits for them.
    for (id, view) in &views {
        assert_eq!(
            &get(&http, format!("{base}/views/accounts/{id}")).await,
            view,
            "view of {id} rebuilt"
        );
    }
    for ((id, key), first) in &answers {
        let amount: u64 = key.rsplit('-').next().unwrap().parse::<u64>().unwrap() + 1;
        let response = http
            .post(format!("{base}/commands/account/{id}/deposit"))
            .header("idempotency-key", key)
            .json(&json!({"amount": amount}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            &response.text().await.unwrap(),
            first,
            "{key} answered as before"
        );
    }
    for (id, state) in &states {
        assert_eq!(
            &get(&http, format!("{base}/aggregates/account/{id}")).await,
            state,
            "the retries applied nothing"
        );
    }
    // New commands continue the restored versions.
    let reply: Value = command(&http, &base, "account/r3/deposit", json!({"amount": 1}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        reply["version"],
        states["r3"]["version"].as_u64().unwrap() + 1
    );
}

/// A restore after a SIGKILL folds every record even when the broker is
/// slow to answer the first fetch of a new process. The consumer settings
/// make every fetch wait about a second (far longer than the end probe's
/// quiet window), as a cold consumer on a loaded machine may: a probe that
/// took "nothing yet" for "nothing there" found the partitions empty, so the
/// restarted write side had no state for aggregates in the log and decided
/// their idempotent retries afresh, claiming their versions a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_waits_for_a_slow_first_fetch_before_it_takes_a_partition_to_end() {
    if skip_kafka() {
        return;
    }
    let config = format!(
        "{}[log.kafka.consumer]\n\"fetch.min.bytes\" = \"100000000\"\n\"fetch.wait.max.ms\" = \"1000\"\n",
        kafka_config(&kafka_brokers())
    );
    let daemon = Process::start(ProcessOptions {
        config,
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let (http, base) = (client(), daemon.url(""));
    let mut answers = BTreeMap::new();
    for account in 0..8 {
        let id = format!("s{account}");
        let key = format!("{id}-open");
        let response = http
            .post(format!("{base}/commands/account/{id}/open"))
            .header("idempotency-key", &key)
            .json(&json!({"owner": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        answers.insert((id, key), response.text().await.unwrap());
    }
    // Killed well before the idle checkpoint: the restart restores every
    // partition from the log alone.
    let daemon = daemon.restart(true);
    daemon.ready().await;
    let base = daemon.url("");
    for ((id, key), first) in &answers {
        let state = get(&http, format!("{base}/aggregates/account/{id}")).await;
        assert_eq!(state["version"], json!(1), "{id} restored: {state}");
        let response = http
            .post(format!("{base}/commands/account/{id}/open"))
            .header("idempotency-key", key)
            .json(&json!({"owner": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{key}");
        assert_eq!(
            &response.text().await.unwrap(),
            first,
            "{key} answered as before"
        );
        let state = get(&http, format!("{base}/aggregates/account/{id}")).await;
        assert_eq!(
            state["version"],
            json!(1),
            "the retry of {id} applied nothing"
        );
    }
}

#[test]
fn a_topic_with_another_partition_count_is_a_startup_error() {
    if skip_kafka() {
        return;
    }
    // The first start creates the topics with 4 partitions; it is listening
    // only after the topics exist.
    let config = kafka_config(&kafka_brokers());
    let dir = tempfile::tempdir().unwrap();
    let daemon = Process::start(ProcessOptions {
        config: config.clone(),
        ..ProcessOptions::default()
    });
    drop(daemon);
    // The same prefix with 8 partitions must not start: aggregates would
    // move to other partitions and their histories would split.
    let changed = config.replace("partitions = 4", "partitions = 8");
    std::fs::write(dir.path().join("config.toml"), &changed).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let output = std::process::Command::new(crate::harness::cqrsd_bin())
        .args(["serve", "--config", "config.toml"])
        .current_dir(dir.path())
        .env("CQRSD__STORAGE__DATA_DIR", dir.path().join("data"))
        .env("CQRSD__HTTP__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("has 4 partitions but [log.kafka] partitions = 8"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_broker_fails_commands_with_503_then_the_daemon_recovers_alone() {
    if skip_kafka() {
        return;
    }
    if tansu_bin().is_none() {
        // Only reachable with KAFKA_BROKERS: an external cluster cannot be paused.
        eprintln!("\n!!!!! SKIPPING the broker-pause test: it needs the Tansu binary !!!!!\n");
        return;
    }
    const CLIENTS: usize = 16;
    const ACCOUNTS: usize = 8;
    const BOUND: Duration = Duration::from_secs(12);
    // A broker of its own: pausing the shared one would stall other tests.
    let broker = Broker::start();
    let config = kafka_config(&broker.addr);
    let prefix = prefix_of(&config);
    let daemon = Process::start(ProcessOptions {
        config,
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let (http, base) = (client(), daemon.url(""));
    for account in 0..ACCOUNTS {
        assert_eq!(
            command(
                &http,
                &base,
                &format!("account/p{account}/open"),
                json!({"owner": "x"})
            )
            .await
            .status(),
            200
        );
    }

    let acknowledged: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let refused = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for client_no in 0..CLIENTS {
        let (http, base) = (http.clone(), base.clone());
        let (acknowledged, refused, stop) = (acknowledged.clone(), refused.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let key = format!("c{client_no}-{n}");
                let account = (client_no + n as usize) % ACCOUNTS;
                let started = Instant::now();
                let response = http
                    .post(format!("{base}/commands/account/p{account}/deposit"))
                    .header("idempotency-key", &key)
                    .json(&json!({"amount": 1}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let body = response.text().await.unwrap();
                assert!(
                    started.elapsed() < BOUND,
                    "a command took {:?} (status {status})",
                    started.elapsed()
                );
                match status {
                    200 => {
                        let reply: Value = serde_json::from_str(&body).unwrap();
                        let position = reply["position"].as_str().unwrap().to_owned();
                        acknowledged.lock().unwrap().insert(key, position);
                    }
                    503 => {
                        *refused.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("unexpected status {other}: {body}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_pause = acknowledged.lock().unwrap().len();
    assert!(before_pause > 0, "no command succeeded before the pause");

    broker.signal("STOP");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = acknowledged.lock().unwrap().len();
    let refused_during = *refused.lock().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        acknowledged.lock().unwrap().len(),
        during,
        "a command was acknowledged while the broker was paused"
    );
    assert!(
        refused_during > 0,
        "no command was refused during the pause"
    );

    broker.signal("CONT");
    let resumed = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if acknowledged.lock().unwrap().len() > during + 20 {
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(60),
            "the daemon did not serve again after the broker resumed"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    eprintln!(
        "acknowledged {} commands ({before_pause} before the pause), refused {}, recovered in {:?}",
        acknowledged.lock().unwrap().len(),
        refused.lock().unwrap(),
        resumed.elapsed()
    );

    // Every acknowledged command is in the topic exactly once, and each
    // aggregate's versions have no gap and no duplicate.
    let topic = format!("{prefix}.account");
    let brokers = broker.addr.clone();
    let records = tokio::task::spawn_blocking(move || read_topic(&brokers, &topic))
        .await
        .unwrap();
    let mut found: HashMap<String, usize> = HashMap::new();
    let mut at: HashMap<String, String> = HashMap::new();
    let mut versions: HashMap<String, Vec<u64>> = HashMap::new();
    for record in &records {
        for event in &record.events {
            versions
                .entry(record.key.clone())
                .or_default()
                .push(event["version"].as_u64().unwrap());
            if let Some(key) = event["metadata"]["idempotency_key"].as_str() {
                *found.entry(key.to_owned()).or_default() += 1;
                at.insert(
                    format!("{}:{}", record.partition, record.offset),
                    format!("{key} v{}", event["version"]),
                );
            }
        }
    }
    // A record whose append failed (503) may still land, but only before the
    // writer's re-read finds it: no version is ever claimed twice.
    for (id, versions) in &versions {
        if versions != &(1..=versions.len() as u64).collect::<Vec<_>>() {
            for record in records.iter().filter(|r| &r.key == id) {
                eprintln!(
                    "{id} {}:{} v{} {}",
                    record.partition,
                    record.offset,
                    record.events[0]["version"],
                    record.events[0]["metadata"]["idempotency_key"]
                );
            }
            panic!("{id}: versions in the topic are not 1..=n: {versions:?}");
        }
    }
    for (key, position) in acknowledged.lock().unwrap().iter() {
        let place = position.split_once(':').unwrap().1;
        assert_eq!(
            found.get(key),
            Some(&1),
            "acknowledged {key} at {position} lost or duplicated; that offset holds {:?}",
            at.get(place)
        );
    }
    assert!(
        found.values().all(|&n| n == 1),
        "a command was written twice"
    );
    // The daemon's view agrees with the topic.
    for account in 0..ACCOUNTS {
        let id = format!("p{account}");
        let state = get(&http, format!("{base}/aggregates/account/{id}")).await;
        assert_eq!(
            state["version"],
            versions[&id].iter().max().copied().unwrap(),
            "{id}"
        );
    }
}

/// A fetch that reaches a partition's end is reported by librdkafka (the
/// end probes ask for it) many times a second per idle partition: an idle
/// Kafka daemon must neither log it nor count it as a broker error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaching_a_partitions_end_is_neither_logged_nor_counted_as_a_broker_error() {
    if skip_kafka() {
        return;
    }
    let daemon = ready_on_kafka().await;
    let (http, base) = (client(), daemon.url(""));
    let opened = command(&http, &base, "account/eof/open", json!({"owner": "x"})).await;
    assert_eq!(opened.status(), 200);
    let position = opened.json::<Value>().await.unwrap()["position"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = http
        .get(format!(
            "{base}/views/accounts/eof?consistent_with={position}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(view.status(), 200);
    // The readers and the end refresher keep fetching at the end meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let noisy: Vec<String> = daemon
        .logged_lines()
        .into_iter()
        .filter(|line| line.contains("PartitionEOF") || line.contains("kafka client error"))
        .collect();
    assert!(
        noisy.is_empty(),
        "{} lines like {:?}",
        noisy.len(),
        noisy.first()
    );
    let metrics = crate::harness::get_text(&http, &format!("{base}/metrics")).await;
    let errors = metrics
        .lines()
        .find(|line| line.starts_with("cqrsd_kafka_broker_errors_total"))
        .map(|line| line.rsplit(' ').next().unwrap().to_owned());
    assert!(
        errors.is_none() || errors.as_deref() == Some("0"),
        "{errors:?}"
    );
}
