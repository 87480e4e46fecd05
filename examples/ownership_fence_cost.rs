//! What the ownership fence costs an append: the same batches appended
//! through `KafkaLog` with the idempotent producer alone, then as owned
//! partitions (a transactional producer per partition, one transaction per
//! batch, `src/kafka/owner.rs`). One writer per partition, each waiting for
//! its append before the next (as the write side does on Kafka).
//!
//! ```text
//! cargo run --release --example ownership_fence_cost -- 127.0.0.1:19092 [batches] [records per batch] [partitions]
//! ```
//!
//! Prints, per mode, batches/s and records/s over all partitions, and the
//! p50/p99 latency of one append; for owned partitions also how long taking
//! a partition (its `init_transactions`, the fence) took.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cqrsd::kafka::{KafkaLog, KafkaSettings};
use cqrsd::log::Record;

fn settings(brokers: &str, partitions: u32, prefix: Option<String>) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers.to_owned(),
        partitions,
        replication_factor: 1,
        linger_ms: 1,
        batch_size: 1_000_000,
        produce_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        // `PRODUCER="key=value,key=value"` passes producer settings through.
        producer: std::env::var("PRODUCER")
            .unwrap_or_default()
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        consumer: BTreeMap::new(),
        transactional_id_prefix: prefix,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `RUST_LOG=debug PRODUCER=debug=eos` shows librdkafka's transaction steps.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().collect();
    let brokers = args
        .get(1)
        .expect("usage: ownership_fence_cost BROKERS [batches] [records per batch] [partitions]")
        .clone();
    let batches: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(500);
    let per_batch: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1);
    let partitions: u32 = args.get(4).and_then(|n| n.parse().ok()).unwrap_or(4);
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    println!("{batches} batches of {per_batch} records on each of {partitions} partitions");
    for owned in [false, true] {
        let prefix = format!("fence-cost-{stamp}-{owned}");
        let topic = format!("{prefix}.account");
        let log = {
            let (brokers, topic, prefix) = (brokers.clone(), topic.clone(), prefix.clone());
            tokio::task::spawn_blocking(move || {
                let log = KafkaLog::open(settings(&brokers, partitions, owned.then_some(prefix)))
                    .expect("open the log");
                log.ensure_topic(&topic).expect("topic");
                log
            })
            .await
            .unwrap()
        };
        let mut fence_times = Vec::new();
        if owned {
            for partition in 0..partitions {
                let (log, topic) = (log.clone(), topic.clone());
                let took =
                    tokio::task::spawn_blocking(move || log.take_partition(&topic, partition))
                        .await
                        .unwrap()
                        .expect("take the partition");
                fence_times.push(took);
            }
        }
        let started = Instant::now();
        let writers: Vec<_> = (0..partitions)
            .map(|partition| {
                let (log, topic) = (log.clone(), topic.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(batches);
                    for n in 0..batches {
                        let records = (0..per_batch)
                            .map(|i| Record {
                                key: format!("acc-{partition}"),
                                headers: Vec::new(),
                                value: format!("{n}-{i}").into_bytes(),
                                timestamp_ms: 0,
                            })
                            .collect();
                        let at = Instant::now();
                        log.append(&topic, partition, records)
                            .await
                            .expect("append");
                        latencies.push(at.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for writer in writers {
            latencies.extend(writer.await.unwrap());
        }
        let elapsed = started.elapsed();
        latencies.sort();
        let total = latencies.len();
        println!(
            "{}: {:.0} batches/s, {:.0} records/s, append p50 {:?} p99 {:?}{}",
            if owned {
                "owned (a transaction per batch)"
            } else {
                "idempotent producer alone"
            },
            total as f64 / elapsed.as_secs_f64(),
            (total * per_batch) as f64 / elapsed.as_secs_f64(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            if owned {
                format!(", taking a partition {fence_times:?}")
            } else {
                String::new()
            }
        );
        tokio::task::spawn_blocking(move || log.close())
            .await
            .unwrap()
            .expect("close");
    }
}
