//! Rebuilding the write side's state from the log: a partition at startup;
//! and one aggregate on a cache miss, from its snapshot. Blocking: callers
//! run these on blocking threads.

use std::collections::HashMap;
use std::time::Duration;

use super::{AggregateState, CommandFailure, CommandReply, EmittedEvent};
use crate::domain::{Aggregate, Domain};
use crate::log::{Event, EventLog, Position};
use crate::store::{CommandStore, Snapshot, StoredReply};

/// How long a restore waits for records it knows exist before it fails.
const RESTORE_STALL_BOUND: Duration = Duration::from_secs(60);

/// Records read per step of a restore.
const RESTORE_CHUNK: usize = 1000;

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
/// the log, from its last checkpoint, and saves them with a new checkpoint.
/// Returns the partition's end offset.
pub(super) fn restore_partition(
    domain: &Domain,
    log: &EventLog,
    store: &CommandStore,
    aggregate_name: &str,
    topic: &str,
    partition: u32,
    idempotency_ttl: Duration,
) -> Result<u64, CommandFailure> {
    let aggregate = aggregate(domain, aggregate_name)?;
    let mut from = store.checkpoint(topic, partition)?.unwrap_or(0);
    let end = log.end_offset(topic, partition)?;
    if from >= end {
        return Ok(end);
    }
    let started = std::time::Instant::now();
    let replayed = end - from;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let ttl_ms = i64::try_from(idempotency_ttl.as_millis()).unwrap_or(i64::MAX);
    let mut states: HashMap<String, AggregateState> = HashMap::new();
    let mut replies = Vec::new();
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
            let events = crate::log::decode(&record.headers, &record.value)
                .map_err(|e| CommandFailure::Internal(format!("{}: {e}", at())))?;
            let Some(first) = events.first() else {
                continue;
            };
            let id = first.aggregate_id.clone();
            let state = match states.remove(&id) {
                Some(state) => state,
                None => match store.snapshot(aggregate_name, &id)? {
                    Some(Snapshot { version, state }) => AggregateState { version, state },
                    None => AggregateState {
                        version: 0,
                        state: aggregate.initial_state().clone(),
                    },
                },
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
        }
    }
    let snapshots: Vec<(String, String, Snapshot)> = states
        .into_iter()
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
    store.commit(topic, partition, end, &snapshots, &replies)?;
    tracing::info!(
        topic,
        partition,
        records = replayed,
        aggregates = snapshots.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "partition restored"
    );
    Ok(end)
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
