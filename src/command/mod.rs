//! The write side: commands in, durable events out.
//!
//! Every aggregate type's topic has a fixed number of partitions, and every
//! partition has exactly one writer task on the command runtime. A command is
//! routed to the writer of its aggregate's partition, so commands on one
//! aggregate are applied one at a time, in arrival order, against its latest
//! state, without any lock. A writer takes whatever commands are queued,
//! decides them all, appends their records in one call (the log then makes
//! many writers' records durable with one flush: group commit), and only then
//! answers them.

mod history;
mod restore;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{CommandConfig, PayloadEncoding};
use crate::domain::{CommandError, Domain, Violation};
use crate::health::Health;
use crate::log::{Encoding, Event, EventLog, LogError, RecordError, partition_for};
use crate::store::{CommandStore, HistoryStore, StoreError};

/// What a client asks the write side to do.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub aggregate: String,
    pub id: String,
    pub command: String,
    pub body: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub expected: Option<ExpectedVersion>,
    pub correlation_id: Option<String>,
    pub principal: Option<String>,
}

/// An `If-Match` precondition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// The aggregate must be at exactly this version.
    Exact(u64),
    /// The aggregate must exist (`If-Match: *`).
    Exists,
}

/// The answer to an accepted command. Idempotent retries get the same one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReply {
    pub aggregate: String,
    pub id: String,
    /// The aggregate's version after the command.
    pub version: u64,
    pub events: Vec<EmittedEvent>,
    /// The log position of the command's record (`topic:partition:offset`);
    /// `None` when the command emitted no event.
    pub position: Option<String>,
}

/// One event of a command reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmittedEvent {
    pub event_type: String,
    pub version: u64,
    pub data: serde_json::Value,
}

/// An aggregate's current state.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateState {
    pub version: u64,
    pub state: serde_json::Value,
}

/// One page of an aggregate's history.
#[derive(Debug, Clone)]
pub struct History {
    pub events: Vec<(String, Event)>,
    /// The version to ask for next, when more events exist.
    pub next_from_version: Option<u64>,
}

/// Why a command or an aggregate read failed, grouped by meaning; the HTTP
/// layer decides the status of each.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandFailure {
    #[error("unknown aggregate type `{0}`")]
    UnknownAggregate(String),
    #[error("aggregate `{aggregate}` has no command `{command}`")]
    UnknownCommand { aggregate: String, command: String },
    #[error("aggregate {aggregate}/{id} does not exist")]
    NotFound { aggregate: String, id: String },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the command body does not match its schema")]
    Schema(Vec<Violation>),
    #[error("{0}")]
    Rejected(String),
    #[error("the command could not be evaluated: {place}: {reason}")]
    Evaluation { place: String, reason: String },
    #[error("the aggregate is at version {actual}, not {expected}")]
    VersionMismatch { expected: String, actual: u64 },
    #[error("the Idempotency-Key was already used with a different command or body")]
    IdempotencyConflict,
    #[error("too many commands are queued for this partition; retry shortly")]
    Overloaded,
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
    #[error("the write side is shutting down")]
    ShuttingDown,
    /// The aggregate's partition is not served by this node now: it is
    /// owned by another command node, or moving between nodes.
    #[error("{reason}; retry in {retry_after_secs} s")]
    Moving {
        reason: String,
        retry_after_secs: u64,
    },
    /// A stored event cannot be brought to its type's current version (a
    /// domain problem an operator fixes in the domain file, not a client's).
    #[error("a stored event cannot be upcast: {0}")]
    Upcast(String),
    /// The history index has not reached the log's end within the configured
    /// wait (it is being built, or its indexer cannot read the log).
    #[error("the history index is {lag} records behind the log; retry shortly")]
    HistoryBehind { lag: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<CommandError> for CommandFailure {
    fn from(error: CommandError) -> Self {
        match error {
            // The aggregate name was resolved before; the command is what is unknown.
            CommandError::UnknownCommand { command } => CommandFailure::UnknownCommand {
                aggregate: String::new(),
                command,
            },
            CommandError::Schema(violations) => CommandFailure::Schema(violations),
            CommandError::Rejected { message } => CommandFailure::Rejected(message),
            CommandError::Evaluation { place, reason } => {
                CommandFailure::Evaluation { place, reason }
            }
        }
    }
}

impl From<LogError> for CommandFailure {
    fn from(error: LogError) -> Self {
        match error {
            LogError::Closed => CommandFailure::ShuttingDown,
            LogError::Unavailable(reason) => CommandFailure::Unavailable(reason),
            // Fenced or released under the writer: another node owns the
            // partition now, or will once the group has moved it.
            LogError::NotOwned(reason) => CommandFailure::Moving {
                reason,
                retry_after_secs: 1,
            },
            LogError::Corrupt(reason) | LogError::Invalid(reason) => {
                CommandFailure::Internal(reason)
            }
        }
    }
}

impl From<StoreError> for CommandFailure {
    fn from(error: StoreError) -> Self {
        CommandFailure::Internal(error.to_string())
    }
}

/// Work for a partition writer.
enum Job {
    Execute {
        request: CommandRequest,
        request_hash: String,
        reply: oneshot::Sender<Result<CommandReply, CommandFailure>>,
    },
    Read {
        id: String,
        reply: oneshot::Sender<Result<AggregateState, CommandFailure>>,
    },
}

/// Longest accepted aggregate id. Ids are path segments and log keys; a bound
/// keeps index keys and metrics small.
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Checks an aggregate id: 1 to 128 characters of `A-Z a-z 0-9 _ - . : @`.
pub fn validate_id(id: &str) -> Result<(), CommandFailure> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(CommandFailure::InvalidRequest(format!(
            "aggregate ids are 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9, '_', '-', '.', ':', '@'"
        )))
    }
}

/// The fingerprint of a command, used to tell a retry from a reuse of its
/// idempotency key. serde_json's maps are ordered, so equal bodies serialize
/// identically whatever the order of their keys on the wire.
fn request_hash(command: &str, body: &serde_json::Value) -> String {
    let mut hasher = sha2::Sha256::new();
    hasher.update(command.as_bytes());
    hasher.update([0]);
    hasher.update(body.to_string().as_bytes());
    let digest = hasher.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Settings every writer shares.
#[derive(Debug, Clone)]
struct WriterSettings {
    cache_capacity: usize,
    max_batch: usize,
    snapshot_every: u64,
    idempotency_ttl: Duration,
    encoding: Encoding,
}

/// The write side; cheap to clone.
#[derive(Clone)]
pub struct CommandSide {
    inner: Arc<Inner>,
}

struct Inner {
    domain: Arc<Domain>,
    log: EventLog,
    /// Per aggregate type, the queue of each partition's writer.
    writers: HashMap<String, Vec<mpsc::Sender<Job>>>,
    /// With ownership, each writer's control queue, by topic and partition.
    controls: HashMap<(String, u32), mpsc::Sender<writer::Control>>,
    /// With ownership, the partitions this node serves now.
    owned: std::sync::Mutex<std::collections::BTreeSet<(String, u32)>>,
    histories: history::Histories,
}

impl std::fmt::Debug for CommandSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandSide").finish_non_exhaustive()
    }
}

/// What starting the write side needs.
pub struct CommandSideParts<'a> {
    pub domain: Arc<Domain>,
    pub log: EventLog,
    pub store: CommandStore,
    /// The persisted history index, kept up to date by the write side's indexers.
    pub history: HistoryStore,
    pub config: &'a CommandConfig,
    pub encoding: PayloadEncoding,
    pub runtime: &'a tokio::runtime::Handle,
    /// Cancelled once the HTTP server has drained: writers then finish what
    /// is queued, checkpoint and stop.
    pub stop: CancellationToken,
    pub tracker: &'a TaskTracker,
    pub health: &'a Health,
    /// With several command nodes, the partitions this node serves are the
    /// ones it is told to take ([`CommandSide::take`]); without, all.
    pub ownership: Option<Ownership>,
}

/// How the write side behaves when several command nodes share the
/// partitions.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    /// The `Retry-After` of a command for a partition not served here.
    pub retry_after_secs: u64,
}

impl CommandSide {
    /// Starts one writer per partition of every aggregate type. Each writer
    /// first restores its partition (snapshots and idempotency answers from
    /// the last checkpoint to the end of the log), then takes commands; the
    /// `command` component is ready once every writer has restored.
    pub fn start(parts: CommandSideParts<'_>) -> CommandSide {
        let partitions = parts.log.partitions();
        let aggregate_count = parts.domain.aggregates().count().max(1);
        let writer_count = aggregate_count * partitions as usize;
        let settings = WriterSettings {
            cache_capacity: (parts.config.cache_capacity / writer_count).max(16),
            max_batch: parts.config.max_batch,
            snapshot_every: parts.config.snapshot_every,
            idempotency_ttl: Duration::from_secs(parts.config.idempotency_ttl_secs),
            encoding: match parts.encoding {
                PayloadEncoding::Msgpack => Encoding::MessagePack,
                PayloadEncoding::Json => Encoding::Json,
            },
        };
        let readiness = parts
            .health
            .register("command", "restoring aggregates from the log");
        let restored = Arc::new(tokio::sync::Semaphore::new(0));
        let settled = Arc::new(tokio::sync::Semaphore::new(0));
        let mut writers = HashMap::new();
        let mut controls = HashMap::new();
        for aggregate in parts.domain.aggregates() {
            let topic = parts.log.topic(aggregate.name());
            let mut queues = Vec::with_capacity(partitions as usize);
            for partition in 0..partitions {
                let (tx, rx) = mpsc::channel(parts.config.queue_depth);
                queues.push(tx);
                let make = {
                    let (domain, log, store, settings) = (
                        parts.domain.clone(),
                        parts.log.clone(),
                        parts.store.clone(),
                        settings.clone(),
                    );
                    let (name, topic) = (aggregate.name().to_owned(), topic.clone());
                    move || {
                        writer::Writer::new(
                            domain.clone(),
                            name.clone(),
                            topic.clone(),
                            partition,
                            log.clone(),
                            store.clone(),
                            settings.clone(),
                        )
                    }
                };
                let stop = parts.stop.clone();
                if let Some(ownership) = parts.ownership {
                    // Nothing to restore before the group gives a partition:
                    // the writer counts as restored and settled at once.
                    restored.add_permits(1);
                    settled.add_permits(1);
                    let (control_tx, control_rx) = mpsc::channel(4);
                    controls.insert((topic.clone(), partition), control_tx);
                    let moving = CommandFailure::Moving {
                        reason: format!("partition {topic}:{partition} is not served by this node"),
                        retry_after_secs: ownership.retry_after_secs,
                    };
                    parts.tracker.spawn_on(
                        writer::Writer::run_owned(make, rx, control_rx, stop, moving),
                        parts.runtime,
                    );
                    continue;
                }
                let writer = make();
                let restored = restored.clone();
                let settled = settled.clone();
                parts.tracker.spawn_on(
                    async move { writer.run(rx, stop, restored, settled).await },
                    parts.runtime,
                );
            }
            writers.insert(aggregate.name().to_owned(), queues);
        }
        // The indexers start once every writer's restore has ended (restored
        // or failed): the restore and the indexing both write sled hard, and
        // together they were the peak of the daemon's memory at startup
        // (BENCHMARKS.md, issue 13 item 4). A failed restore does not hold
        // them back, so the other partitions' histories are still served and
        // a history read on the failed one answers with its reason.
        let (restored_tx, restored_rx) = tokio::sync::watch::channel(false);
        let histories = history::Histories::start(
            parts.history,
            restored_rx,
            parts.log.clone(),
            parts
                .domain
                .aggregates()
                .map(|aggregate| parts.log.topic(aggregate.name()))
                .collect(),
            Duration::from_millis(parts.config.history_wait_ms),
            parts.runtime,
            parts.tracker,
            parts.stop.clone(),
        );
        let permits = u32::try_from(writer_count).unwrap_or(u32::MAX);
        parts.tracker.spawn_on(
            async move {
                if restored.acquire_many(permits).await.is_ok() {
                    readiness.ready();
                }
            },
            parts.runtime,
        );
        parts.tracker.spawn_on(
            async move {
                if settled.acquire_many(permits).await.is_ok() {
                    restored_tx.send_replace(true);
                }
            },
            parts.runtime,
        );
        CommandSide {
            inner: Arc::new(Inner {
                domain: parts.domain,
                log: parts.log,
                writers,
                controls,
                owned: std::sync::Mutex::default(),
                histories,
            }),
        }
    }

    /// With ownership: restores the partition (the caller fenced its
    /// previous owner first) and serves its commands from now on.
    pub async fn take(&self, topic: &str, partition: u32) -> Result<(), CommandFailure> {
        let control = self.control(topic, partition)?;
        let (reply, answer) = oneshot::channel();
        control
            .send(writer::Control::Take { reply })
            .await
            .map_err(|_| CommandFailure::ShuttingDown)?;
        answer.await.map_err(|_| CommandFailure::ShuttingDown)??;
        self.inner
            .owned
            .lock()
            .unwrap()
            .insert((topic.to_owned(), partition));
        Ok(())
    }

    /// With ownership: stops serving the partition once the commands in
    /// flight are answered and its state is checkpointed; the caller then
    /// releases it in the log.
    pub async fn give_up(&self, topic: &str, partition: u32) {
        self.inner
            .owned
            .lock()
            .unwrap()
            .remove(&(topic.to_owned(), partition));
        let Ok(control) = self.control(topic, partition) else {
            return;
        };
        let (reply, answer) = oneshot::channel();
        if control
            .send(writer::Control::Release { reply })
            .await
            .is_ok()
        {
            // A writer that stopped meanwhile has checkpointed on its own.
            let _ = answer.await;
        }
    }

    /// With ownership: the partitions this node serves now, sorted.
    pub fn owned(&self) -> Vec<(String, u32)> {
        self.inner.owned.lock().unwrap().iter().cloned().collect()
    }

    fn control(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<&mpsc::Sender<writer::Control>, CommandFailure> {
        self.inner
            .controls
            .get(&(topic.to_owned(), partition))
            .ok_or_else(|| {
                CommandFailure::Internal(format!(
                    "no owned writer for {topic}:{partition} (ownership is off, or no such partition)"
                ))
            })
    }

    fn queue(&self, aggregate: &str, id: &str) -> Result<&mpsc::Sender<Job>, CommandFailure> {
        let queues = self
            .inner
            .writers
            .get(aggregate)
            .ok_or_else(|| CommandFailure::UnknownAggregate(aggregate.to_owned()))?;
        validate_id(id)?;
        let partition = partition_for(id, self.inner.log.partitions()) as usize;
        queues
            .get(partition)
            .ok_or_else(|| CommandFailure::Internal("no writer for partition".into()))
    }

    fn enqueue(queue: &mpsc::Sender<Job>, job: Job) -> Result<(), CommandFailure> {
        queue.try_send(job).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => CommandFailure::Overloaded,
            mpsc::error::TrySendError::Closed(_) => CommandFailure::ShuttingDown,
        })
    }

    /// Validates, decides and durably appends a command; answers once its
    /// events are durable (or with why it was not applied).
    pub async fn execute(&self, request: CommandRequest) -> Result<CommandReply, CommandFailure> {
        let started = Instant::now();
        let labels = [
            ("aggregate", request.aggregate.clone()),
            ("command", request.command.clone()),
        ];
        let result = self.execute_inner(request).await;
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(CommandFailure::Rejected(_) | CommandFailure::Evaluation { .. }) => "rejected",
            Err(CommandFailure::VersionMismatch { .. } | CommandFailure::IdempotencyConflict) => {
                "conflict"
            }
            Err(
                CommandFailure::Overloaded
                | CommandFailure::Unavailable(_)
                | CommandFailure::ShuttingDown
                | CommandFailure::Moving { .. }
                | CommandFailure::HistoryBehind { .. }
                | CommandFailure::Internal(_),
            ) => "failed",
            Err(_) => "invalid",
        };
        // Unknown names are not used as label values: clients choose them.
        if !matches!(
            result,
            Err(CommandFailure::UnknownAggregate(_) | CommandFailure::UnknownCommand { .. })
        ) {
            metrics::counter!("cqrsd_commands_total", "aggregate" => labels[0].1.clone(), "command" => labels[1].1.clone(), "outcome" => outcome).increment(1);
            metrics::histogram!("cqrsd_command_duration_seconds", "aggregate" => labels[0].1.clone(), "command" => labels[1].1.clone(), "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn execute_inner(&self, request: CommandRequest) -> Result<CommandReply, CommandFailure> {
        let aggregate = self
            .inner
            .domain
            .aggregate(&request.aggregate)
            .ok_or_else(|| CommandFailure::UnknownAggregate(request.aggregate.clone()))?;
        if aggregate.command(&request.command).is_none() {
            return Err(CommandFailure::UnknownCommand {
                aggregate: request.aggregate.clone(),
                command: request.command.clone(),
            });
        }
        let queue = self.queue(&request.aggregate, &request.id)?;
        if let Some(key) = &request.idempotency_key
            && (key.is_empty()
                || key.len() > MAX_IDEMPOTENCY_KEY_LEN
                || !key.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(CommandFailure::InvalidRequest(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            )));
        }
        // Schema validation needs no state, so it runs here, in parallel,
        // rather than on the partition's single writer.
        aggregate
            .validate(&request.command, &request.body)
            .map_err(CommandFailure::from)?;
        let request_hash = request_hash(&request.command, &request.body);
        let (reply, answer) = oneshot::channel();
        Self::enqueue(
            queue,
            Job::Execute {
                request,
                request_hash,
                reply,
            },
        )?;
        answer.await.map_err(|_| CommandFailure::ShuttingDown)?
    }

    /// The aggregate's latest state, read through its writer so that it
    /// reflects every command acknowledged before this call.
    pub async fn state(&self, aggregate: &str, id: &str) -> Result<AggregateState, CommandFailure> {
        let queue = self.queue(aggregate, id)?;
        let (reply, answer) = oneshot::channel();
        Self::enqueue(
            queue,
            Job::Read {
                id: id.to_owned(),
                reply,
            },
        )?;
        let state = answer.await.map_err(|_| CommandFailure::ShuttingDown)??;
        if state.version == 0 {
            return Err(CommandFailure::NotFound {
                aggregate: aggregate.to_owned(),
                id: id.to_owned(),
            });
        }
        Ok(state)
    }

    /// The aggregate's events from `from_version` on, at most `limit`, each with
    /// its position. Waits (bounded) until the history index has reached the
    /// log's end as of this call, so every acknowledged command is in it.
    pub async fn history(
        &self,
        aggregate: &str,
        id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<History, CommandFailure> {
        if self.inner.domain.aggregate(aggregate).is_none() {
            return Err(CommandFailure::UnknownAggregate(aggregate.to_owned()));
        }
        validate_id(id)?;
        let topic = self.inner.log.topic(aggregate);
        let partition = partition_for(id, self.inner.log.partitions());
        self.inner.histories.caught_up(&topic, partition).await?;
        let side = self.clone();
        let owned_id = id.to_owned();
        let records = tokio::task::spawn_blocking(move || {
            // Every record holds at least one wanted version, so `limit + 1`
            // records hold enough events to fill the page and name the next.
            side.inner
                .histories
                .records(
                    &topic,
                    partition,
                    &owned_id,
                    from_version.max(1),
                    limit.saturating_add(1),
                )
                .map(|r| (topic, r))
        })
        .await
        .map_err(|e| CommandFailure::Internal(e.to_string()))??;
        let (topic, records) = records;
        let mut events = Vec::new();
        let mut next_from_version = None;
        'records: for (offset, record) in records {
            let decoded =
                crate::log::decode_current(&self.inner.domain, &record.headers, &record.value)
                    .map_err(|e| match e {
                        RecordError::Upcast { .. } => {
                            CommandFailure::Upcast(format!("{topic}:{partition}:{offset}: {e}"))
                        }
                        e => CommandFailure::Internal(format!(
                            "undecodable record at {topic}:{partition}:{offset}: {e}"
                        )),
                    })?;
            for event in decoded {
                if event.version < from_version {
                    continue;
                }
                if events.len() == limit {
                    next_from_version = Some(event.version);
                    break 'records;
                }
                events.push((format!("{topic}:{partition}:{offset}"), event));
            }
        }
        if events.is_empty() && from_version <= 1 {
            return Err(CommandFailure::NotFound {
                aggregate: aggregate.to_owned(),
                id: id.to_owned(),
            });
        }
        Ok(History {
            events,
            next_from_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_hashes_ignore_key_order_but_not_values_or_commands() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap();
        let c: serde_json::Value = serde_json::from_str(r#"{"b":2,"a":2}"#).unwrap();
        assert_eq!(request_hash("x", &a), request_hash("x", &b));
        assert_ne!(request_hash("x", &a), request_hash("x", &c));
        assert_ne!(request_hash("x", &a), request_hash("y", &a));
    }

    #[test]
    fn ids_are_bounded_and_restricted() {
        assert!(validate_id("acc-1.x:y@z_2").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id("é").is_err());
        assert!(validate_id(&"a".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate_id(&"a".repeat(MAX_ID_LEN + 1)).is_err());
    }
}
