//! Micro-benchmarks of the hot paths below the command decision (which
//! `domain.rs` measures): event encode/decode in both encodings, projection
//! apply (the pure view handler, and a whole batch into the view
//! store), and the embedded log's batch append with flush + fdatasync, the
//! storage limit of durable commands.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cqrsd::domain::{Domain, EXAMPLE_DOMAIN, ProjectionKind};
use cqrsd::log::{Encoding, Event, EventMetadata, Record, decode, decode_current, encode};
use cqrsd::projection::{Feeds, SourceRecord, engine_for};
use cqrsd::store::ViewStore;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

fn deposit(id: &str, version: u64) -> Event {
    Event {
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "account".to_owned(),
        aggregate_id: id.to_owned(),
        version,
        event_type: "MoneyDeposited".to_owned(),
        schema_version: 1,
        timestamp: chrono::Utc::now(),
        data: json!({ "amount": 25 }),
        metadata: EventMetadata {
            command: "deposit".to_owned(),
            command_id: uuid::Uuid::now_v7(),
            idempotency_key: None,
            correlation_id: None,
            request_hash: "0123456789abcdef0123456789abcdef".to_owned(),
            principal: None,
        },
    }
}

fn codec(c: &mut Criterion) {
    let events = [deposit("acc-0000001", 7)];
    for (name, encoding) in [("msgpack", Encoding::MessagePack), ("json", Encoding::Json)] {
        let record = encode(&events, encoding).unwrap();
        c.bench_function(&format!("encode one deposit ({name})"), |b| {
            b.iter(|| encode(&events, encoding).unwrap());
        });
        c.bench_function(&format!("decode one deposit ({name})"), |b| {
            b.iter(|| decode(&record.headers, &record.value).unwrap());
        });
    }
}

/// What the one decoding every read path goes through (`decode_current`)
/// adds to a plain decode: nothing measurable for an event at its type's
/// current version, with or without versioned event types in the domain,
/// and one upcast step's cost for an old one.
fn upcast(c: &mut Criterion) {
    let plain = Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap();
    let versioned_source = EXAMPLE_DOMAIN.replace(
        "[aggregates.account.events.MoneyDeposited]\n",
        "[aggregates.account.events.MoneyDeposited]\nversion = 2\n",
    ) + "\n[aggregates.account.events.MoneyDeposited.upcast.1]\nset = { amount = \"event.amount * 1\" }\n";
    let versioned = Domain::from_toml_str(&versioned_source).unwrap();
    let old = encode(&[deposit("acc-0000001", 7)], Encoding::MessagePack).unwrap();
    let mut current_event = deposit("acc-0000001", 7);
    current_event.schema_version = 2;
    let current = encode(&[current_event], Encoding::MessagePack).unwrap();
    c.bench_function("decode_current one deposit (msgpack, no versions)", |b| {
        b.iter(|| decode_current(&plain, &old.headers, &old.value).unwrap());
    });
    c.bench_function(
        "decode_current one deposit (msgpack, versioned, at the current version)",
        |b| b.iter(|| decode_current(&versioned, &current.headers, &current.value).unwrap()),
    );
    c.bench_function(
        "decode_current one deposit (msgpack, versioned, one upcast step)",
        |b| b.iter(|| decode_current(&versioned, &old.headers, &old.value).unwrap()),
    );
}

fn projection_apply(c: &mut Criterion) {
    let domain = Arc::new(Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap());
    let ProjectionKind::View(view) = domain.projection("accounts").unwrap().kind() else {
        panic!("accounts is a view");
    };
    let event = deposit("acc-0000001", 7);
    let doc = json!({ "owner": "Ada", "status": "open", "balance": 100, "opened_at": "2026-01-01T00:00:00Z" });
    c.bench_function("view handler: apply one deposit to a document", |b| {
        b.iter(|| {
            view.apply(Some(&doc), &event.as_input(), "account")
                .unwrap()
        });
    });

    // A whole batch into the view store: read the documents, apply,
    // write documents, index entries and positions in one atomic batch.
    let dir = tempfile::tempdir().unwrap();
    let store = ViewStore::open(dir.path()).unwrap();
    let settings = cqrsd::config::ProjectionsConfig::default().engine_settings();
    // With the feed that the accounts view hands account_search's documents
    // to, as in the daemon (nothing takes them here, so it stays full and
    // each batch replaces the documents it holds).
    let feeds = Feeds::new(&domain, settings.cache_bytes);
    let engine = engine_for(&domain, &store, &feeds, "accounts", &settings).unwrap();
    let mut target = engine.open_live().unwrap();
    const BATCH: u64 = 1000;
    const ACCOUNTS: u64 = 100;
    let topic = || "cqrsd.account".to_owned();
    // The accounts are opened first: a deposit on a missing document fails
    // its handler (`doc.balance` does not exist) and would be quarantined,
    // which is not the path being measured.
    let opened: Vec<SourceRecord> = (0..ACCOUNTS)
        .map(|i| {
            let mut event = deposit(&format!("acc-{i:07}"), 1);
            event.event_type = "AccountOpened".to_owned();
            event.data = json!({ "owner": format!("owner {i}") });
            SourceRecord {
                topic: topic(),
                partition: 0,
                offset: i,
                events: Ok(vec![event]),
            }
        })
        .collect();
    let stats = target
        .apply(&opened, &[((topic(), 0), ACCOUNTS)].into())
        .unwrap();
    assert_eq!(stats.quarantined, 0);
    let mut offset = ACCOUNTS;
    let mut group = c.benchmark_group("view batch into the view store");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("1000 deposits over 100 accounts", |b| {
        b.iter_batched(
            || {
                let records: Vec<SourceRecord> = (0..BATCH)
                    .map(|i| {
                        offset += 1;
                        SourceRecord {
                            topic: "cqrsd.account".to_owned(),
                            partition: 0,
                            offset,
                            events: Ok(vec![deposit(&format!("acc-{:07}", i % ACCOUNTS), offset)]),
                        }
                    })
                    .collect();
                let positions: BTreeMap<(String, u32), u64> =
                    [(("cqrsd.account".to_owned(), 0), offset + 1)].into();
                (records, positions)
            },
            |(records, positions)| {
                let stats = target.apply(&records, &positions).unwrap();
                assert_eq!(stats.quarantined, 0, "a deposit was quarantined");
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// The bank domain's records as the log stores them (MessagePack, one event
/// per record, metadata as the write side writes it): `accounts` accounts
/// opened, then deposits and withdrawals over them, `count` records in all.
fn bank_records(count: u64, accounts: u64) -> Vec<Record> {
    let start = chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap();
    (0..count)
        .map(|n| {
            let id = format!("acc-{:07}", n % accounts);
            let (event_type, command, data) = if n < accounts {
                (
                    "AccountOpened",
                    "open",
                    json!({ "owner": format!("owner {n}") }),
                )
            } else if n % 3 == 0 {
                ("MoneyWithdrawn", "withdraw", json!({ "amount": 3 }))
            } else {
                ("MoneyDeposited", "deposit", json!({ "amount": 25 }))
            };
            let event = Event {
                event_id: uuid::Uuid::now_v7(),
                aggregate_type: "account".to_owned(),
                aggregate_id: id,
                version: n / accounts + 1,
                event_type: event_type.to_owned(),
                schema_version: 1,
                timestamp: start + chrono::Duration::seconds(n as i64 * 60),
                data,
                metadata: EventMetadata {
                    command: command.to_owned(),
                    command_id: uuid::Uuid::now_v7(),
                    idempotency_key: None,
                    correlation_id: Some(uuid::Uuid::now_v7().to_string()),
                    request_hash: format!("sha256:{:064x}", u128::from(n) * 0x9e37_79b9),
                    principal: None,
                },
            };
            encode(&[event], Encoding::MessagePack).unwrap()
        })
        .collect()
}

/// A record read from partition 0 of `cqrsd.account`, decoded as the
/// projection worker decodes it.
fn source(domain: &Domain, offset: u64, record: Record) -> SourceRecord {
    SourceRecord {
        topic: "cqrsd.account".to_owned(),
        partition: 0,
        offset,
        events: decode_current(domain, &record.headers, &record.value).map_err(|e| e.to_string()),
    }
}

/// The read side's per-event path on 1,000 bank records: decoding them as
/// the projection worker does, and that plus applying them to the bank's
/// stored projections (the `accounts` view and the `daily_flows` aggregation,
/// each committing the batch to the view store, as one worker hands one decoded batch
/// to every projection at its position).
fn read_side_batch(c: &mut Criterion) {
    const RECORDS: u64 = 1000;
    let domain = Arc::new(Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap());
    let records = bank_records(RECORDS, 100);
    let decode_all = |records: Vec<Record>| -> Vec<SourceRecord> {
        records
            .into_iter()
            .zip(0..)
            .map(|(record, offset)| source(&domain, offset, record))
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = ViewStore::open(dir.path()).unwrap();
    let settings = cqrsd::config::ProjectionsConfig::default().engine_settings();
    let feeds = Feeds::new(&domain, settings.cache_bytes);
    let mut targets: Vec<_> = ["accounts", "daily_flows"]
        .into_iter()
        .map(|name| {
            engine_for(&domain, &store, &feeds, name, &settings)
                .unwrap()
                .open_live()
                .unwrap()
        })
        .collect();
    let positions: BTreeMap<(String, u32), u64> =
        [(("cqrsd.account".to_owned(), 0), RECORDS)].into();
    let mut group = c.benchmark_group("read side, 1000 bank records");
    group.throughput(Throughput::Elements(RECORDS));
    group.bench_function("decode as the projection worker does", |b| {
        b.iter_batched(|| records.clone(), decode_all, BatchSize::SmallInput);
    });
    group.bench_function(
        "decode, then apply to the accounts view and daily_flows",
        |b| {
            b.iter_batched(
                || records.clone(),
                |records| {
                    let decoded = decode_all(records);
                    for target in &mut targets {
                        let stats = target.apply(&decoded, &positions).unwrap();
                        assert_eq!(stats.quarantined, 0, "an event was quarantined");
                    }
                },
                BatchSize::SmallInput,
            );
        },
    );
    group.finish();
}

fn log_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = cqrsd::store::open_embedded(cqrsd::store::EmbeddedSettings {
        data_dir: dir.path().to_owned(),
        topic_prefix: "cqrsd".to_owned(),
        partitions: 1,
        group_commit_max_records: 4096,
        group_commit_max_delay: Duration::from_micros(0),
        fsync: true,
        segment_bytes: 64 << 20,
    })
    .unwrap();
    log.ensure_topic("cqrsd.account").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let record: Record = encode(&[deposit("acc-0000001", 7)], Encoding::MessagePack).unwrap();
    let mut group = c.benchmark_group("embedded log append + fdatasync");
    group.sample_size(30);
    for batch in [1_usize, 64, 512] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("{batch} records"), |b| {
            b.iter_batched(
                || vec![record.clone(); batch],
                |records| {
                    runtime
                        .block_on(log.append("cqrsd.account", 0, records))
                        .unwrap()
                },
                BatchSize::SmallInput,
            );
        });
    }
    // One group over 8 partitions, as deposits to many accounts make it: one
    // segment file per partition to make durable. The group waits for all 64
    // records (at most 5 ms) so the 8 appends always land in one group.
    let spread_dir = tempfile::tempdir().unwrap();
    let spread = cqrsd::store::open_embedded(cqrsd::store::EmbeddedSettings {
        data_dir: spread_dir.path().to_owned(),
        topic_prefix: "cqrsd".to_owned(),
        partitions: 8,
        group_commit_max_records: 64,
        group_commit_max_delay: Duration::from_millis(5),
        fsync: true,
        segment_bytes: 64 << 20,
    })
    .unwrap();
    spread.ensure_topic("cqrsd.account").unwrap();
    group.throughput(Throughput::Elements(64));
    group.bench_function("64 records over 8 partitions", |b| {
        b.iter(|| {
            let appends = (0..8).map(|partition| {
                spread.append("cqrsd.account", partition, vec![record.clone(); 8])
            });
            for offsets in runtime.block_on(futures::future::join_all(appends)) {
                offsets.unwrap();
            }
        });
    });
    group.finish();
    log.close().unwrap();
    spread.close().unwrap();
}

criterion_group!(
    benches,
    codec,
    upcast,
    projection_apply,
    read_side_batch,
    log_append
);
criterion_main!(benches);
