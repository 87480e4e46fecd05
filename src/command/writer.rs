//! A partition's single writer: decides commands in arrival order against
//! the latest state, appends each batch's records in one call, answers once
//! they are durable, and checkpoints snapshots and idempotency answers.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use lru::LruCache;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    AggregateState, CommandFailure, CommandReply, CommandRequest, EmittedEvent, ExpectedVersion,
    Job, WriterSettings,
};
use crate::domain::{CommandContext, Domain};
use crate::log::{Event, EventLog, EventMetadata, LogError, Position, Record};
use crate::store::{CommandStore, Snapshot, StoredReply};

/// An idle partition with unsaved changes checkpoints after this long, so a
/// restart replays little even when the partition sees few commands.
const IDLE_CHECKPOINT: Duration = Duration::from_secs(5);
/// Most batches of one partition whose appends are in flight at once, when
/// the log allows it (`EventLog::pipelines_appends`): the writer decides the
/// next batch against the states of the batches still being made durable,
/// so the group commit gathers more records per flush. Answers still go out
/// in order, each only once its own record is durable.
const MAX_IN_FLIGHT_BATCHES: usize = 4;

type Answer = oneshot::Sender<Result<CommandReply, CommandFailure>>;

/// What the node's ownership tells a partition's writer.
pub(super) enum Control {
    /// Restore the partition and serve it; answered once restored.
    Take {
        reply: oneshot::Sender<Result<(), CommandFailure>>,
    },
    /// Stop serving it; answered once its state is checkpointed and dropped.
    Release { reply: oneshot::Sender<()> },
}

/// A decided batch whose append is in flight.
struct InFlight {
    seq: u64,
    now: DateTime<Utc>,
    overlay: HashMap<String, AggregateState>,
    pending_keys: HashMap<(String, String), (usize, String)>,
    outcomes: Vec<(Answer, Outcome)>,
}

type Appending =
    Pin<Box<dyn std::future::Future<Output = (InFlight, Result<Vec<u64>, LogError>)> + Send>>;

/// What a job of a batch turns into once the batch's records are durable.
enum Outcome {
    /// Known without appending anything.
    Ready(Result<CommandReply, CommandFailure>),
    /// Waits for the record at this index of the batch.
    Appended {
        record: usize,
        reply: CommandReply,
        key: Option<(String, String)>,
    },
    /// The same idempotent command as an earlier job of this batch.
    SameAs(usize),
}

pub(super) struct Writer {
    domain: Arc<Domain>,
    aggregate: String,
    topic: String,
    partition: u32,
    log: EventLog,
    store: CommandStore,
    settings: WriterSettings,
    cache: LruCache<String, AggregateState>,
    /// Idempotency answers not yet checkpointed into the store, by (id, key).
    replies: HashMap<(String, String), StoredReply>,
    /// States changed since the last checkpoint.
    dirty: HashMap<String, Snapshot>,
    /// The log offset after the last record this writer knows of.
    next_offset: u64,
    /// The offset the next append starts at: `next_offset` plus the records
    /// of the appends in flight. The embedded log refuses an append that
    /// would start elsewhere, which is how a batch decided against a failed
    /// one's states is kept out of the log.
    append_offset: u64,
    records_since_checkpoint: u64,
    /// Set when an append failed: its records may still land in the log, so
    /// the partition is re-read to its end before the next command.
    needs_resync: bool,
    /// Set while the unsaved states were dropped by a resync whose restore
    /// has not yet succeeded: the store's snapshots plus `dirty` then no
    /// longer cover every record below `next_offset`, so no checkpoint may
    /// be written until the restore has folded them again.
    unsaved_dropped: bool,
    /// Appends in flight, oldest first, with their batches.
    appending: FuturesOrdered<Appending>,
    /// How many batches may be in flight (1 when the log cannot pipeline).
    depth: usize,
    next_seq: u64,
    /// Latest states decided by batches in flight, with the batch's number.
    pending: HashMap<String, (u64, AggregateState)>,
    /// Idempotency keys of commands in batches in flight.
    pending_keys: HashMap<(String, String), u64>,
}

impl Writer {
    pub(super) fn new(
        domain: Arc<Domain>,
        aggregate: String,
        topic: String,
        partition: u32,
        log: EventLog,
        store: CommandStore,
        settings: WriterSettings,
    ) -> Self {
        let capacity = NonZeroUsize::new(settings.cache_capacity).unwrap_or(NonZeroUsize::MIN);
        let depth = if log.pipelines_appends() {
            MAX_IN_FLIGHT_BATCHES
        } else {
            1
        };
        Self {
            domain,
            aggregate,
            topic,
            partition,
            log,
            store,
            settings,
            cache: LruCache::new(capacity),
            replies: HashMap::new(),
            dirty: HashMap::new(),
            next_offset: 0,
            append_offset: 0,
            records_since_checkpoint: 0,
            needs_resync: false,
            unsaved_dropped: false,
            appending: FuturesOrdered::new(),
            depth,
            next_seq: 0,
            pending: HashMap::new(),
            pending_keys: HashMap::new(),
        }
    }

    pub(super) async fn run(
        mut self,
        mut jobs: mpsc::Receiver<Job>,
        stop: CancellationToken,
        restored: Arc<Semaphore>,
        settled: Arc<Semaphore>,
    ) {
        let restore = self.restore().await;
        // Whether or not it worked, the restore has stopped writing the
        // command store: the history indexers may begin once every writer is
        // past this point, and a partition that cannot be restored must not
        // keep the others' histories from being indexed.
        settled.add_permits(1);
        if let Err(error) = restore {
            // Without a restored partition the writer could hand out wrong
            // versions or forget idempotent answers: refuse its commands.
            tracing::error!(topic = %self.topic, partition = self.partition, %error, "cannot restore the partition; its commands will fail");
            // Every command until shutdown gets the reason, not a closed
            // queue's "shutting down".
            loop {
                tokio::select! {
                    job = jobs.recv() => match job {
                        Some(job) => answer_failure(
                            job,
                            CommandFailure::Unavailable(format!("partition not restored: {error}")),
                        ),
                        None => return,
                    },
                    () = stop.cancelled() => return,
                }
            }
        }
        restored.add_permits(1);
        self.serve(&mut jobs, stop.cancelled()).await;
        self.finish_queued(jobs).await;
    }

    /// Takes commands until `end` completes (its output is returned) or
    /// the queue closes (`None`); appends still in flight are left to the
    /// caller.
    async fn serve<T>(
        &mut self,
        jobs: &mut mpsc::Receiver<Job>,
        end: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(end);
        let mut idle = tokio::time::interval(IDLE_CHECKPOINT);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Finishing appends first keeps answers flowing and frees room.
                biased;
                Some((batch, result)) = self.appending.next(), if !self.appending.is_empty() => {
                    self.finish(batch, result);
                    self.checkpoint_if_due().await;
                }
                job = jobs.recv(), if self.appending.len() < self.depth => match job {
                    Some(first) => {
                        let batch = take_batch(first, jobs, self.settings.max_batch);
                        self.process(batch).await;
                    }
                    None => return None,
                },
                _ = idle.tick() => {
                    if self.appending.is_empty() && self.records_since_checkpoint > 0 {
                        self.checkpoint().await;
                    }
                }
                ended = &mut end => return Some(ended),
            }
        }
    }

    /// At shutdown: finishes what was queued before the stop, refuses
    /// anything later, and leaves a checkpoint so the next start replays
    /// nothing.
    async fn finish_queued(&mut self, mut jobs: mpsc::Receiver<Job>) {
        jobs.close();
        loop {
            let Some(first) = jobs.recv().await else {
                break;
            };
            let batch = take_batch(first, &mut jobs, self.settings.max_batch);
            self.process(batch).await;
            self.drain().await;
        }
        self.settle().await;
    }

    /// Answers every batch in flight and checkpoints what is unsaved.
    async fn settle(&mut self) {
        self.drain().await;
        if self.records_since_checkpoint > 0 || !self.replies.is_empty() {
            self.checkpoint().await;
        }
    }

    /// A partition writer when several command nodes share the partitions:
    /// it starts without the partition, and answers its commands with
    /// `Moving` until it is told to take it (`Control::Take`: a fresh
    /// writer restores it from the checkpoint to the log's end, the caller
    /// having fenced the previous owner first), then serves them until it
    /// is told to give it up (`Control::Release`: commands still queued are
    /// answered `Moving`, those in flight are answered, the state is
    /// checkpointed and dropped) or the daemon stops.
    pub(super) async fn run_owned(
        make: impl Fn() -> Writer,
        mut jobs: mpsc::Receiver<Job>,
        mut control: mpsc::Receiver<Control>,
        stop: CancellationToken,
        moving: CommandFailure,
    ) {
        let mut next: Option<Control> = None;
        loop {
            let order = match next.take() {
                Some(order) => order,
                None => tokio::select! {
                    job = jobs.recv() => match job {
                        Some(job) => {
                            answer_failure(job, moving.clone());
                            continue;
                        }
                        None => return,
                    },
                    order = control.recv() => match order {
                        Some(order) => order,
                        None => return,
                    },
                    () = stop.cancelled() => return,
                },
            };
            let reply = match order {
                Control::Release { reply } => {
                    let _ = reply.send(());
                    continue;
                }
                Control::Take { reply } => reply,
            };
            let mut writer = make();
            if let Err(error) = writer.restore().await {
                tracing::error!(topic = %writer.topic, partition = writer.partition, %error, "cannot restore the partition taken; it is not served here");
                let _ = reply.send(Err(error));
                continue;
            }
            let _ = reply.send(Ok(()));
            let ended = writer
                .serve(&mut jobs, async {
                    tokio::select! {
                        () = stop.cancelled() => None,
                        order = control.recv() => order,
                    }
                })
                .await;
            match ended {
                // Released (or told to take it again, which starts afresh).
                Some(Some(order)) => {
                    writer.settle().await;
                    tracing::info!(topic = %writer.topic, partition = writer.partition, "partition given up");
                    next = Some(order);
                }
                Some(None) | None => {
                    writer.finish_queued(jobs).await;
                    return;
                }
            }
        }
    }

    /// Waits for every append in flight and finishes its batch.
    async fn drain(&mut self) {
        while let Some((batch, result)) = self.appending.next().await {
            self.finish(batch, result);
        }
        self.checkpoint_if_due().await;
    }

    async fn checkpoint_if_due(&mut self) {
        if self.records_since_checkpoint >= self.settings.snapshot_every {
            self.checkpoint().await;
        }
    }

    async fn restore(&mut self) -> Result<(), CommandFailure> {
        let domain = self.domain.clone();
        let log = self.log.clone();
        let store = self.store.clone();
        let (aggregate, topic, partition) =
            (self.aggregate.clone(), self.topic.clone(), self.partition);
        let ttl = self.settings.idempotency_ttl;
        let end = tokio::task::spawn_blocking(move || {
            super::restore::restore_partition(
                &domain, &log, &store, &aggregate, &topic, partition, ttl,
            )
        })
        .await
        .map_err(|e| CommandFailure::Internal(e.to_string()))??;
        self.next_offset = end;
        self.append_offset = end;
        Ok(())
    }

    /// After a failed append: saves what is known, forgets the cached
    /// states, and restores the partition from the checkpoint to the end of
    /// the log, so a record of the failed append that landed anyway is
    /// folded (with its idempotent answer) before the next command decides.
    async fn resync(&mut self) -> Result<(), CommandFailure> {
        self.checkpoint().await;
        // If that checkpoint failed, the store's older checkpoint and
        // snapshots are still consistent: the restore folds from there.
        self.cache.clear();
        self.dirty.clear();
        self.replies.clear();
        self.records_since_checkpoint = 0;
        // If the restore fails too (a disk still full), a later checkpoint
        // would claim the dropped states as saved: found by the full-disk
        // test once the command store reported its write errors at once.
        self.unsaved_dropped = true;
        self.restore().await?;
        self.unsaved_dropped = false;
        self.needs_resync = false;
        tracing::info!(topic = %self.topic, partition = self.partition, next_offset = self.next_offset, "partition re-read after a failed append");
        Ok(())
    }

    /// Decides a batch against the latest states (those of batches still in
    /// flight included) and starts its append; `finish` answers it.
    async fn process(&mut self, jobs: Vec<Job>) {
        if self.needs_resync {
            // Every batch decided against the failed one's states must be
            // finished (and refused) before the partition is re-read.
            self.drain().await;
        }
        if self.needs_resync
            && let Err(error) = self.resync().await
        {
            let failure = match error {
                CommandFailure::Unavailable(reason) => CommandFailure::Unavailable(reason),
                other => CommandFailure::Unavailable(other.to_string()),
            };
            for job in jobs {
                answer_failure(job, failure.clone());
            }
            return;
        }
        let now = Utc::now().trunc_subsecs(3);
        let mut overlay: HashMap<String, AggregateState> = HashMap::new();
        let mut pending_keys: HashMap<(String, String), (usize, String)> = HashMap::new();
        let mut records: Vec<Record> = Vec::new();
        let mut outcomes: Vec<(Answer, Outcome)> = Vec::new();

        for job in jobs {
            match job {
                Job::Read { id, reply } => {
                    // Reads see committed state only: a command of this batch
                    // (or of one in flight) is not acknowledged yet, so a
                    // concurrent read may precede it.
                    let _ = reply.send(self.load(&id, None).await);
                }
                Job::Execute {
                    request,
                    request_hash,
                    reply,
                } => {
                    let outcome = self
                        .decide(
                            request,
                            request_hash,
                            now,
                            &mut overlay,
                            &mut pending_keys,
                            &mut records,
                            outcomes.len(),
                        )
                        .await;
                    outcomes.push((reply, outcome));
                }
            }
        }

        let seq = self.next_seq;
        self.next_seq += 1;
        for (id, state) in &overlay {
            self.pending.insert(id.clone(), (seq, state.clone()));
        }
        for key in pending_keys.keys() {
            self.pending_keys.insert(key.clone(), seq);
        }
        let batch = InFlight {
            seq,
            now,
            overlay,
            pending_keys,
            outcomes,
        };
        if records.is_empty() {
            // Nothing to append, but the answers still wait for the batches
            // before this one: they were decided against those states.
            self.appending
                .push_back(Box::pin(std::future::ready((batch, Ok(Vec::new())))));
        } else {
            metrics::histogram!("cqrsd_command_batch_size").record(records.len() as f64);
            let expected = self.append_offset;
            self.append_offset += records.len() as u64;
            let append = self
                .log
                .start_append(&self.topic, self.partition, records, expected);
            self.appending
                .push_back(Box::pin(async move { (batch, append.await) }));
        }
    }

    /// Answers a batch once its append is done, and makes its states the
    /// committed ones. After a failed append every later batch in flight is
    /// refused too, whatever its own append did: it was decided against
    /// states that never became durable.
    fn finish(&mut self, batch: InFlight, result: Result<Vec<u64>, LogError>) {
        let InFlight {
            seq,
            now,
            overlay,
            pending_keys,
            outcomes,
        } = batch;
        self.pending.retain(|_, (owner, _)| *owner != seq);
        self.pending_keys.retain(|_, owner| *owner != seq);
        let refused = self.needs_resync;
        let offsets = if refused {
            Err(CommandFailure::Unavailable(
                "an earlier append of this partition failed".to_owned(),
            ))
        } else {
            result.map_err(CommandFailure::from)
        };

        let mut answers: Vec<Result<CommandReply, CommandFailure>> =
            Vec::with_capacity(outcomes.len());
        match &offsets {
            Ok(offsets) => {
                for (id, state) in overlay {
                    self.dirty.insert(
                        id.clone(),
                        Snapshot {
                            version: state.version,
                            state: state.state.clone(),
                        },
                    );
                    self.cache.put(id, state);
                }
                if let Some(last) = offsets.last() {
                    self.next_offset = last + 1;
                    self.records_since_checkpoint += offsets.len() as u64;
                }
            }
            Err(error) => {
                tracing::warn!(topic = %self.topic, partition = self.partition, %error, "append failed; the batch's commands are not applied");
                self.needs_resync = true;
            }
        }
        let expires_at_ms = (now + self.settings.idempotency_ttl).timestamp_millis();
        for (_, outcome) in &outcomes {
            let answer = match outcome {
                Outcome::Ready(answer) => match &offsets {
                    Err(error) if refused => Err(error.clone()),
                    _ => answer.clone(),
                },
                Outcome::SameAs(index) => answers[*index].clone(),
                Outcome::Appended { record, reply, key } => match &offsets {
                    Ok(offsets) => {
                        let mut reply = reply.clone();
                        reply.position = Some(
                            Position::new(self.topic.clone(), self.partition, offsets[*record])
                                .to_string(),
                        );
                        if let Some((id, key)) = key
                            && let Some((_, hash)) = pending_keys.get(&(id.clone(), key.clone()))
                        {
                            self.remember(id, key, hash, &reply, expires_at_ms);
                        }
                        Ok(reply)
                    }
                    Err(error) => Err(error.clone()),
                },
            };
            answers.push(answer);
        }
        for ((reply, _), answer) in outcomes.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }

    /// Decides one command against the latest state (this batch's included).
    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &mut self,
        request: CommandRequest,
        request_hash: String,
        now: DateTime<Utc>,
        overlay: &mut HashMap<String, AggregateState>,
        pending_keys: &mut HashMap<(String, String), (usize, String)>,
        records: &mut Vec<Record>,
        index: usize,
    ) -> Outcome {
        let key = request
            .idempotency_key
            .clone()
            .map(|k| (request.id.clone(), k));
        if let Some(key) = &key {
            if let Some((earlier, hash)) = pending_keys.get(key) {
                return if *hash == request_hash {
                    Outcome::SameAs(*earlier)
                } else {
                    Outcome::Ready(Err(CommandFailure::IdempotencyConflict))
                };
            }
            if self.pending_keys.contains_key(key) {
                // The same key is in a batch still in flight: its answer is
                // known only once that batch is finished, so finish them all.
                self.drain().await;
            }
            match self.stored_reply(key, now).await {
                Ok(Some(stored)) => {
                    return Outcome::Ready(if stored.request_hash == request_hash {
                        rmp_serde::from_slice::<CommandReply>(&stored.reply)
                            .map_err(|e| CommandFailure::Internal(format!("stored reply: {e}")))
                    } else {
                        Err(CommandFailure::IdempotencyConflict)
                    });
                }
                Ok(None) => {}
                Err(error) => return Outcome::Ready(Err(error)),
            }
        }
        let current = match self.load(&request.id, Some(overlay)).await {
            Ok(state) => state,
            Err(error) => return Outcome::Ready(Err(error)),
        };
        match request.expected {
            Some(ExpectedVersion::Exact(expected)) if expected != current.version => {
                return Outcome::Ready(Err(CommandFailure::VersionMismatch {
                    expected: expected.to_string(),
                    actual: current.version,
                }));
            }
            Some(ExpectedVersion::Exists) if current.version == 0 => {
                return Outcome::Ready(Err(CommandFailure::VersionMismatch {
                    expected: "*".to_owned(),
                    actual: 0,
                }));
            }
            _ => {}
        }
        let Some(aggregate) = self.domain.aggregate(&self.aggregate) else {
            return Outcome::Ready(Err(CommandFailure::UnknownAggregate(
                self.aggregate.clone(),
            )));
        };
        let meta = serde_json::json!({
            "correlation_id": request.correlation_id,
            "principal": request.principal,
        });
        let context = CommandContext {
            aggregate_id: request.id.clone(),
            version: current.version,
            now,
            meta,
        };
        let decision = match aggregate.execute_validated(
            &request.command,
            &current.state,
            &request.body,
            &context,
        ) {
            Ok(decision) => decision,
            Err(error) => {
                let failure = match CommandFailure::from(error) {
                    CommandFailure::UnknownCommand { command, .. } => {
                        CommandFailure::UnknownCommand {
                            aggregate: self.aggregate.clone(),
                            command,
                        }
                    }
                    other => other,
                };
                return Outcome::Ready(Err(failure));
            }
        };
        let mut reply = CommandReply {
            aggregate: self.aggregate.clone(),
            id: request.id.clone(),
            version: current.version + decision.events.len() as u64,
            events: Vec::with_capacity(decision.events.len()),
            position: None,
        };
        if decision.events.is_empty() {
            // Nothing to append: the answer is final now.
            if let Some((id, key)) = &key {
                self.remember(
                    id,
                    key,
                    &request_hash,
                    &reply,
                    (now + self.settings.idempotency_ttl).timestamp_millis(),
                );
            }
            return Outcome::Ready(Ok(reply));
        }
        let command_id = Uuid::now_v7();
        let metadata = EventMetadata {
            command: request.command.clone(),
            command_id,
            idempotency_key: request.idempotency_key.clone(),
            correlation_id: request.correlation_id.clone(),
            request_hash: request_hash.clone(),
            principal: request.principal.clone(),
        };
        let events: Vec<Event> = decision
            .events
            .into_iter()
            .enumerate()
            .map(|(i, new)| Event {
                event_id: Uuid::now_v7(),
                aggregate_type: self.aggregate.clone(),
                aggregate_id: request.id.clone(),
                version: current.version + i as u64 + 1,
                // New events are written at their type's current version.
                schema_version: aggregate.event_version(&new.event_type),
                event_type: new.event_type,
                timestamp: now,
                data: new.data,
                metadata: metadata.clone(),
            })
            .collect();
        reply.events = events
            .iter()
            .map(|e| EmittedEvent {
                event_type: e.event_type.clone(),
                version: e.version,
                data: e.data.clone(),
            })
            .collect();
        let record = match crate::log::encode(&events, self.settings.encoding) {
            Ok(record) => record,
            Err(error) => return Outcome::Ready(Err(CommandFailure::Internal(error.to_string()))),
        };
        overlay.insert(
            request.id.clone(),
            AggregateState {
                version: reply.version,
                state: decision.new_state,
            },
        );
        if let Some(key) = &key {
            pending_keys.insert(key.clone(), (index, request_hash));
        }
        records.push(record);
        Outcome::Appended {
            record: records.len() - 1,
            reply,
            key,
        }
    }

    fn remember(
        &mut self,
        id: &str,
        key: &str,
        hash: &str,
        reply: &CommandReply,
        expires_at_ms: i64,
    ) {
        match rmp_serde::to_vec_named(reply) {
            Ok(bytes) => {
                self.replies.insert(
                    (id.to_owned(), key.to_owned()),
                    StoredReply {
                        request_hash: hash.to_owned(),
                        reply: bytes,
                        expires_at_ms,
                    },
                );
            }
            Err(error) => tracing::error!(%error, "cannot encode an idempotent reply"),
        }
    }

    /// Takes `&mut self` although it changes nothing: a `&self` held across
    /// the await would require the writer to be `Sync`, which its in-flight
    /// appends are not.
    async fn stored_reply(
        &mut self,
        key: &(String, String),
        now: DateTime<Utc>,
    ) -> Result<Option<StoredReply>, CommandFailure> {
        let now_ms = now.timestamp_millis();
        if let Some(reply) = self.replies.get(key) {
            return Ok((reply.expires_at_ms > now_ms).then(|| reply.clone()));
        }
        let store = self.store.clone();
        let (aggregate, id, k) = (self.aggregate.clone(), key.0.clone(), key.1.clone());
        let stored =
            tokio::task::spawn_blocking(move || store.idempotent_reply(&aggregate, &id, &k))
                .await
                .map_err(|e| CommandFailure::Internal(e.to_string()))??;
        Ok(stored.filter(|reply| reply.expires_at_ms > now_ms))
    }

    /// The latest state: this batch's, else the cache's, else the newest
    /// snapshot (this writer's unsaved one, else the store's).
    async fn load(
        &mut self,
        id: &str,
        overlay: Option<&HashMap<String, AggregateState>>,
    ) -> Result<AggregateState, CommandFailure> {
        if let Some(overlay) = overlay {
            if let Some(state) = overlay.get(id) {
                return Ok(state.clone());
            }
            // Deciding: the states of batches in flight count, as if durable.
            if let Some((_, state)) = self.pending.get(id) {
                return Ok(state.clone());
            }
        }
        if let Some(state) = self.cache.get(id) {
            metrics::counter!("cqrsd_aggregate_cache_total", "result" => "hit").increment(1);
            return Ok(state.clone());
        }
        metrics::counter!("cqrsd_aggregate_cache_total", "result" => "miss").increment(1);
        let domain = self.domain.clone();
        let store = self.store.clone();
        let dirty = self.dirty.get(id).cloned();
        let (aggregate, owned_id) = (self.aggregate.clone(), id.to_owned());
        let state = tokio::task::spawn_blocking(move || {
            super::restore::load_aggregate(&domain, &store, &aggregate, &owned_id, dirty)
        })
        .await
        .map_err(|e| CommandFailure::Internal(e.to_string()))??;
        self.cache.put(id.to_owned(), state.clone());
        Ok(state)
    }

    /// Saves changed snapshots and new idempotency answers with the
    /// partition's position, atomically, so a restart replays only later records.
    async fn checkpoint(&mut self) {
        if self.unsaved_dropped {
            return;
        }
        let snapshots: Vec<(String, String, Snapshot)> = self
            .dirty
            .iter()
            .map(|(id, snapshot)| (self.aggregate.clone(), id.clone(), snapshot.clone()))
            .collect();
        let replies: Vec<(String, String, String, StoredReply)> = self
            .replies
            .iter()
            .map(|((id, key), reply)| {
                (
                    self.aggregate.clone(),
                    id.clone(),
                    key.clone(),
                    reply.clone(),
                )
            })
            .collect();
        let store = self.store.clone();
        let (topic, partition, next_offset) =
            (self.topic.clone(), self.partition, self.next_offset);
        let now_ms = Utc::now().timestamp_millis();
        let result = tokio::task::spawn_blocking(move || {
            store.commit(&topic, partition, next_offset, &snapshots, &replies)?;
            store.purge_expired_replies(now_ms)
        })
        .await;
        match result {
            Ok(Ok(_)) => {
                self.dirty.clear();
                self.replies.clear();
                self.records_since_checkpoint = 0;
            }
            // The log still holds everything; a later checkpoint retries.
            Ok(Err(error)) => {
                tracing::warn!(topic = %self.topic, partition = self.partition, %error, "checkpoint failed")
            }
            Err(error) => tracing::warn!(%error, "checkpoint task failed"),
        }
    }
}

fn take_batch(first: Job, jobs: &mut mpsc::Receiver<Job>, max: usize) -> Vec<Job> {
    let mut batch = vec![first];
    while batch.len() < max {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    batch
}

fn answer_failure(job: Job, failure: CommandFailure) {
    match job {
        Job::Execute { reply, .. } => drop(reply.send(Err(failure))),
        Job::Read { reply, .. } => drop(reply.send(Err(failure))),
    }
}
