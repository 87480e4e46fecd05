//! Rebuilding the write side's state from the log: a partition at startup;
//! and one aggregate on a cache miss, from its snapshot. Blocking: callers
//! run these on blocking threads.

use std::collections::HashMap;
use std::time::Duration;

use super::{AggregateState, CommandFailure, CommandReply, EmittedEvent};
use crate::domain::{Aggregate, Domain};
use crate::log::{Event, EventLog, Position, RecordError};
use crate::store::{CommandStore, Snapshot, StoredReply};

/// How long a restore waits for records it knows exist before it fails.
const RESTORE_STALL_BOUND: Duration = Duration::from_secs(60);

/// Records read per step of a restore.
const RESTORE_CHUNK: usize = 1000;
/// A restore saves its folded states (and idempotency answers) with a
/// checkpoint once it holds this many, so its memory is bounded by this
/// number of aggregates, not by the partition's, and a restart in the middle
/// resumes from the last chunk.
const RESTORE_SAVE_EVERY: usize = 2_000;

fn aggregate<'a>(domain: &'a Domain, name: &str) -> Result<&'a Aggregate, CommandFailure> {
    domain
        .aggregate(name)
        .ok_or_else(|| CommandFailure::UnknownAggregate(name.to_owned()))
}

/// Folds events over a state, skipping those the state already includes.
fn fold(
    aggregate: &Aggregate,
    mut state: AggregateState,
    events: &[Event],
    at: &dyn Fn() -> String,
) -> Result<AggregateState, CommandFailure> {
    for event in events {
        if event.version <= state.version {
            continue;
        }
        if event.version != state.version + 1 {
            return Err(CommandFailure::Internal(format!(
                "{}: version {} follows version {}",
                at(),
                event.version,
                state.version
            )));
        }
        state.state = aggregate
            .apply(&state.state, &event.as_input())
            .map_err(|error| {
                CommandFailure::Internal(format!(
                    "{}: the domain cannot apply a logged event: {error}",
                    at()
                ))
            })?;
        state.version = event.version;
    }
    Ok(state)
}

/// The latest state of one aggregate: the newest snapshot (the writer's
/// unsaved one, else the store's). After the startup restore, the store's
/// snapshots plus the writer's unsaved ones hold every aggregate's latest
/// state on either backend, so no history is folded on a cache miss.
pub(super) fn load_aggregate(
    domain: &Domain,
    store: &CommandStore,
    aggregate_name: &str,
    id: &str,
    unsaved: Option<Snapshot>,
) -> Result<AggregateState, CommandFailure> {
    let aggregate = aggregate(domain, aggregate_name)?;
    let snapshot = match unsaved {
        Some(snapshot) => Some(snapshot),
        None => store.snapshot(aggregate_name, id)?,
    };
    Ok(match snapshot {
        Some(Snapshot { version, state }) => AggregateState { version, state },
        None => AggregateState {
            version: 0,
            state: aggregate.initial_state().clone(),
        },
    })
}

/// Brings a partition's snapshots and idempotency answers up to the end of
/// the log, from its last checkpoint, and saves them with a new checkpoint,
/// in chunks of at most `RESTORE_SAVE_EVERY` aggregates: each chunk's
/// checkpoint is the offset after the last record folded, so every record
/// below it is in a saved snapshot, and an aggregate seen again after its
/// chunk was saved is folded on from that snapshot. Returns the partition's
/// end offset.
pub(super) fn restore_partition(
    domain: &Domain,
    log: &EventLog,
    store: &CommandStore,
    aggregate_name: &str,
    topic: &str,
    partition: u32,
    idempotency_ttl: Duration,
) -> Result<u64, CommandFailure> {
    restore_in_chunks(
        domain,
        log,
        store,
        (aggregate_name, topic, partition),
        idempotency_ttl,
        RESTORE_SAVE_EVERY,
    )
}

fn restore_in_chunks(
    domain: &Domain,
    log: &EventLog,
    store: &CommandStore,
    (aggregate_name, topic, partition): (&str, &str, u32),
    idempotency_ttl: Duration,
    save_every: usize,
) -> Result<u64, CommandFailure> {
    let aggregate = aggregate(domain, aggregate_name)?;
    let mut from = store.checkpoint(topic, partition)?.unwrap_or(0);
    let end = log.end_offset(topic, partition)?;
    // Snapshots folded while an event type was at another version hold
    // states of the old handlers over the old data: the partition is folded
    // again from its first record, through the upcasters, and every one of
    // its aggregates' snapshots replaced (DESIGN.md §3.3).
    let versions = aggregate.event_versions();
    let refold = store.folded_versions(topic, partition)? != versions;
    if refold {
        from = 0;
    }
    if from >= end {
        if refold {
            store.set_folded_versions(topic, partition, &versions)?;
        }
        return Ok(end);
    }
    if refold {
        tracing::info!(topic, partition, versions = %versions, "event versions changed: folding the partition again from its first record");
    }
    // While refolding, the aggregates already folded again (and saved by a
    // chunk), whose stored snapshots are new; any other stored snapshot is
    // from the old versions and is not read.
    let mut refolded: std::collections::HashSet<String> = std::collections::HashSet::new();
    let started = std::time::Instant::now();
    let replayed = end - from;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let ttl_ms = i64::try_from(idempotency_ttl.as_millis()).unwrap_or(i64::MAX);
    let mut states: HashMap<String, AggregateState> = HashMap::new();
    let mut replies = Vec::new();
    let mut aggregates_saved = 0usize;
    // A remote log may answer a read with nothing before the end is reached
    // (a fetch that timed out); that is no reason to stop early, which would
    // checkpoint past records never folded.
    let deadline = std::time::Instant::now() + RESTORE_STALL_BOUND;
    while from < end {
        let records = log.read(topic, partition, from, RESTORE_CHUNK)?;
        let Some((last, _)) = records.last() else {
            if std::time::Instant::now() >= deadline {
                return Err(CommandFailure::Unavailable(format!(
                    "{topic}:{partition}: no records from offset {from} although the log ends at {end}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        from = last + 1;
        for (offset, record) in records {
            let at = || format!("{topic}:{partition}:{offset}");
            // An event that cannot be upcast leaves the partition
            // unrestored (its commands answer 503 with this reason) rather
            // than folding a state from data of the wrong shape.
            let events = crate::log::decode_current(domain, &record.headers, &record.value)
                .map_err(|e| match e {
                    RecordError::Upcast { .. } => CommandFailure::Upcast(format!("{}: {e}", at())),
                    e => CommandFailure::Internal(format!("{}: {e}", at())),
                })?;
            let Some(first) = events.first() else {
                continue;
            };
            let id = first.aggregate_id.clone();
            let state = match states.remove(&id) {
                Some(state) => state,
                None => {
                    // Every stored snapshot folds only records below the
                    // partition's checkpoint (each is saved with the
                    // checkpoint after its records, in one batch), and this
                    // record is at or after it. So an aggregate whose first
                    // event is here has no snapshot to read: with a million
                    // new aggregates those reads found nothing a million
                    // times, through every memtable and table filter.
                    let first_here = first.version == 1;
                    let stored = if first_here || (refold && !refolded.contains(&id)) {
                        None
                    } else {
                        store.snapshot(aggregate_name, &id)?
                    };
                    match stored {
                        Some(Snapshot { version, state }) => AggregateState { version, state },
                        None => AggregateState {
                            version: 0,
                            state: aggregate.initial_state().clone(),
                        },
                    }
                }
            };
            let state = fold(aggregate, state, &events, &at)?;
            states.insert(id.clone(), state);
            if let Some(key) = &first.metadata.idempotency_key {
                let expires_at_ms = first.timestamp.timestamp_millis().saturating_add(ttl_ms);
                if expires_at_ms > now_ms {
                    let reply = reply_of(aggregate_name, &id, topic, partition, offset, &events);
                    let bytes = rmp_serde::to_vec_named(&reply)
                        .map_err(|e| CommandFailure::Internal(e.to_string()))?;
                    replies.push((
                        aggregate_name.to_owned(),
                        id.clone(),
                        key.clone(),
                        StoredReply {
                            request_hash: first.metadata.request_hash.clone(),
                            reply: bytes,
                            expires_at_ms,
                        },
                    ));
                }
            }
            // A chunk ends after a whole record, so its checkpoint covers
            // exactly the records folded so far.
            if states.len() >= save_every || replies.len() >= save_every {
                if refold {
                    refolded.extend(states.keys().cloned());
                }
                aggregates_saved += save(
                    store,
                    aggregate_name,
                    topic,
                    partition,
                    offset + 1,
                    &mut states,
                    &mut replies,
                )?;
            }
        }
    }
    aggregates_saved += save(
        store,
        aggregate_name,
        topic,
        partition,
        end,
        &mut states,
        &mut replies,
    )?;
    // Only now are all of the partition's snapshots of these versions: a
    // crash before this line folds it again from the start, which is safe.
    if refold {
        store.set_folded_versions(topic, partition, &versions)?;
    }
    tracing::info!(
        topic,
        partition,
        records = replayed,
        aggregates = aggregates_saved,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "partition restored"
    );
    Ok(end)
}

/// Saves a restore's folded states and answers with the checkpoint
/// `next_offset`, and empties them. Returns how many states were saved.
fn save(
    store: &CommandStore,
    aggregate_name: &str,
    topic: &str,
    partition: u32,
    next_offset: u64,
    states: &mut HashMap<String, AggregateState>,
    replies: &mut Vec<(String, String, String, StoredReply)>,
) -> Result<usize, CommandFailure> {
    let snapshots: Vec<(String, String, Snapshot)> = states
        .drain()
        .map(|(id, s)| {
            (
                aggregate_name.to_owned(),
                id,
                Snapshot {
                    version: s.version,
                    state: s.state,
                },
            )
        })
        .collect();
    store.commit(topic, partition, next_offset, &snapshots, replies)?;
    replies.clear();
    Ok(snapshots.len())
}

/// The reply a command got, rebuilt from its record.
fn reply_of(
    aggregate: &str,
    id: &str,
    topic: &str,
    partition: u32,
    offset: u64,
    events: &[Event],
) -> CommandReply {
    CommandReply {
        aggregate: aggregate.to_owned(),
        id: id.to_owned(),
        version: events.last().map_or(0, |e| e.version),
        events: events
            .iter()
            .map(|e| EmittedEvent {
                event_type: e.event_type.clone(),
                version: e.version,
                data: e.data.clone(),
            })
            .collect(),
        position: Some(Position::new(topic.to_owned(), partition, offset).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EXAMPLE_DOMAIN;
    use crate::log::{Encoding, EventMetadata, encode};
    use crate::store::{EmbeddedSettings, open_embedded};

    const TOPIC: &str = "cqrsd.account";

    fn event(id: &str, version: u64) -> Event {
        let (event_type, data) = if version == 1 {
            ("AccountOpened", serde_json::json!({"owner": id}))
        } else {
            ("MoneyDeposited", serde_json::json!({"amount": 1}))
        };
        Event {
            event_id: uuid::Uuid::now_v7(),
            aggregate_type: "account".into(),
            aggregate_id: id.into(),
            version,
            event_type: event_type.into(),
            schema_version: 1,
            timestamp: chrono::DateTime::from_timestamp_millis(1_764_000_000_000).unwrap(),
            data,
            metadata: EventMetadata {
                command: "deposit".into(),
                command_id: uuid::Uuid::now_v7(),
                idempotency_key: None,
                correlation_id: None,
                request_hash: "h".into(),
                principal: None,
            },
        }
    }

    /// An embedded log of one partition with the account topic.
    fn one_partition_log(data_dir: &std::path::Path) -> EventLog {
        let log = open_embedded(EmbeddedSettings {
            data_dir: data_dir.to_owned(),
            topic_prefix: "cqrsd".into(),
            partitions: 1,
            group_commit_max_records: 4096,
            group_commit_max_delay: Duration::ZERO,
            fsync: false,
            segment_bytes: 64 << 20,
        })
        .unwrap();
        log.ensure_topic(TOPIC).unwrap();
        log
    }

    #[tokio::test]
    async fn a_restore_saves_in_bounded_chunks_and_resumes_from_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let domain = Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap();
        let log = one_partition_log(dir.path());
        let store = CommandStore::open(dir.path()).unwrap();
        // Ten accounts opened, then three deposits each, round robin, so every
        // account appears again after its chunk was saved.
        let mut records = Vec::new();
        for version in 1..=4 {
            for n in 0..10 {
                records.push(
                    encode(&[event(&format!("a{n}"), version)], Encoding::MessagePack).unwrap(),
                );
            }
        }
        // Then a record the domain cannot read (its value is not an event list).
        let mut broken = records[0].clone();
        broken.value = vec![0xC1];
        records.push(broken);
        log.append(TOPIC, 0, records).await.unwrap();

        let at = ("account", TOPIC, 0);
        let failed = restore_in_chunks(&domain, &log, &store, at, Duration::from_secs(60), 4);
        let error = failed.unwrap_err();
        assert!(error.to_string().contains("cqrsd.account:0:40"), "{error}");
        // The chunks before the broken record were saved with their checkpoint:
        // a restart resumes there instead of folding the whole partition again.
        let checkpoint = store.checkpoint(TOPIC, 0).unwrap().unwrap();
        assert!(checkpoint > 0 && checkpoint <= 40, "{checkpoint}");
        for n in 0..10u64 {
            let snapshot = store
                .snapshot("account", &format!("a{n}"))
                .unwrap()
                .unwrap();
            let folded = (0..checkpoint).filter(|o| o % 10 == n).count() as u64;
            assert_eq!(snapshot.version, folded, "a{n}");
            assert_eq!(
                snapshot.state["balance"].as_f64(),
                Some((folded - 1) as f64),
                "a{n}"
            );
        }
        log.close().unwrap();
    }

    /// An aggregate whose first event lies after the checkpoint has no
    /// snapshot to read; one whose later events do is folded on from its
    /// snapshot. The test plants a snapshot no cqrsd would write (ahead of the
    /// checkpoint) to see which of the two was read.
    #[tokio::test]
    async fn an_aggregates_first_event_after_the_checkpoint_reads_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let domain = Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap();
        let log = one_partition_log(dir.path());
        let records = [event("b", 1), event("a", 1), event("a", 2), event("b", 2)]
            .iter()
            .map(|e| encode(std::slice::from_ref(e), Encoding::MessagePack).unwrap())
            .collect();
        log.append(TOPIC, 0, records).await.unwrap();
        let store = CommandStore::open(dir.path()).unwrap();
        let planted = |owner: &str, balance: i64| Snapshot {
            version: 1,
            state: serde_json::json!({"balance": balance, "status": "open", "owner": owner}),
        };
        // The checkpoint is after b's first record, whose snapshot it covers.
        store
            .commit(
                TOPIC,
                0,
                1,
                &[
                    ("account".into(), "b".into(), planted("b", 50)),
                    ("account".into(), "a".into(), planted("planted", 999)),
                ],
                &[],
            )
            .unwrap();

        let at = ("account", TOPIC, 0);
        restore_in_chunks(&domain, &log, &store, at, Duration::from_secs(60), 100).unwrap();
        let a = store.snapshot("account", "a").unwrap().unwrap();
        assert_eq!(a.version, 2);
        assert_eq!(a.state["owner"], "a");
        assert_eq!(a.state["balance"].as_f64(), Some(1.0));
        let b = store.snapshot("account", "b").unwrap().unwrap();
        assert_eq!(b.version, 2);
        assert_eq!(b.state["balance"].as_f64(), Some(51.0));
        log.close().unwrap();
    }
}
