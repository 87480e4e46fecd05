//! A projection worker: one std thread that owns some projections, reads their
//! source partitions in batches, and commits each batch with its positions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::engine::{Engine, SourceRecord, Target};
use super::{ProjectionError, ProjectionHandle, ProjectionState, RebuildProgress};
use crate::domain::Domain;
use crate::health::Readiness;
use crate::log::{EventLog, LogError, Record, decode_current};
use crate::store::StoreError;
use crate::store::views::Positions;

/// How long a failed projection waits before it tries again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often an idle worker refreshes rates and lag gauges.
const REFRESH: Duration = Duration::from_secs(1);
/// Nobody searches an index while it is rebuilt offline, so it commits
/// rarely (commits cost fsyncs and segments) and once more at the end.
const OFFLINE_SEARCH_COMMIT_INTERVAL: Duration = Duration::from_secs(10);

/// What every worker shares with the pool.
pub(super) struct WorkerContext {
    pub log: EventLog,
    /// Decodes records into current versions of their events.
    pub domain: Arc<Domain>,
    pub batch_size: usize,
    /// How long a batch may grow (see [`Growth`]).
    pub batch_time: Duration,
    pub cancel: CancellationToken,
    pub wake: Arc<Notify>,
    pub readiness: Readiness,
    /// Projections that have not reached the end offsets seen at startup.
    pub pending: Arc<AtomicUsize>,
    /// The worker's nice value (see `priority`).
    pub nice: i32,
}

/// A rebuild in progress: a new generation filled from offset 0.
struct Rebuild {
    target: Box<dyn Target>,
    positions: Positions,
    events: u64,
}

/// One projection as its worker drives it.
pub(super) struct Runner {
    handle: Arc<ProjectionHandle>,
    engine: Box<dyn Engine>,
    live: Option<Box<dyn Target>>,
    positions: Positions,
    startup_end: Option<Positions>,
    rebuild: Option<Rebuild>,
    retry_at: Option<Instant>,
    rate_since: Instant,
    rate_events: u64,
    /// When the live target's buffered changes are due to be committed.
    flush_at: Option<Instant>,
    /// The positions of the projection this one reads from (a search
    /// projection's view): its progress is what lets this one read on.
    follows: Option<watch::Receiver<Positions>>,
}

/// The stored positions completed with offset 0 for every source partition.
pub(super) fn full_positions(stored: &Positions, topics: &[String], partitions: u32) -> Positions {
    let mut positions = Positions::new();
    for topic in topics {
        for partition in 0..partitions {
            let key = (topic.clone(), partition);
            let offset = stored.get(&key).copied().unwrap_or(0);
            positions.insert(key, offset);
        }
    }
    positions
}

/// Reads up to one batch from each partition and applies it. Returns the
/// events seen, the quarantined events and whether any record was read.
fn advance(
    domain: &Domain,
    log: &EventLog,
    batch_size: usize,
    target: &mut dyn Target,
    positions: &mut Positions,
) -> Result<(u64, u64, bool), ProjectionError> {
    let (mut events, mut quarantined, mut read) = (0, 0, false);
    let limit = target.read_limit()?;
    for ((topic, partition), next) in positions.iter_mut() {
        let end = match &limit {
            None => u64::MAX,
            Some(limit) => limit
                .get(&(topic.clone(), *partition))
                .copied()
                .unwrap_or(0),
        };
        if *next >= end {
            continue;
        }
        let max = usize::try_from(end - *next).map_or(batch_size, |left| left.min(batch_size));
        let mut records = log.read(topic, *partition, *next, max)?;
        records.retain(|(offset, _)| *offset < end);
        let Some((last, _)) = records.last() else {
            continue;
        };
        let new_next = last + 1;
        let decoded: Vec<SourceRecord> = records
            .into_iter()
            .map(|(offset, record)| SourceRecord {
                topic: topic.clone(),
                partition: *partition,
                offset,
                events: decode_current(domain, &record.headers, &record.value)
                    .map_err(|e| e.to_string()),
            })
            .collect();
        let mut commit = Positions::new();
        commit.insert((topic.clone(), *partition), new_next);
        let stats = target.apply(&decoded, &commit)?;
        *next = new_next;
        events += stats.events;
        quarantined += stats.quarantined;
        read = true;
    }
    Ok((events, quarantined, read))
}

/// Reads up to `max` records of a partition from an offset: the log's read,
/// or a test's.
type ReadFn<'a> = dyn FnMut(&str, u32, u64, usize) -> Result<Vec<(u64, Record)>, LogError> + 'a;

/// How far one batch grows: up to `events` records, read in chunks of at
/// most `chunk`, and no more chunks once reading and decoding have taken
/// `time`. Larger batches write each changed document once for more events;
/// the time bound keeps a batch's commit, and so what queries see, from
/// waiting long behind a slow log.
#[derive(Debug, Clone, Copy)]
pub(super) struct Growth {
    pub events: usize,
    pub chunk: usize,
    pub time: Duration,
}

/// Records read per call to the log while a batch grows.
pub(super) const READ_CHUNK: usize = 1000;

/// Where a batch is read: a partition from an offset, up to an end offset.
struct Span<'a> {
    topic: &'a str,
    partition: u32,
    from: u64,
    end: u64,
}

/// Reads and decodes one growing batch of a partition (see [`Growth`]).
fn read_batch(
    domain: &Domain,
    read: &mut ReadFn<'_>,
    span: Span<'_>,
    grow: &Growth,
) -> Result<Vec<SourceRecord>, LogError> {
    let started = Instant::now();
    let mut decoded: Vec<SourceRecord> = Vec::new();
    let mut from = span.from;
    loop {
        let left = grow.events.saturating_sub(decoded.len());
        let want = usize::try_from(span.end - from)
            .map_or(left, |until_end| until_end.min(left))
            .min(grow.chunk.max(1));
        if want == 0 {
            break;
        }
        let records = read(span.topic, span.partition, from, want)?;
        let got = records.len();
        decoded.extend(
            records
                .into_iter()
                .filter(|(offset, _)| *offset < span.end)
                .map(|(offset, record)| SourceRecord {
                    topic: span.topic.to_owned(),
                    partition: span.partition,
                    offset,
                    events: decode_current(domain, &record.headers, &record.value)
                        .map_err(|e| e.to_string()),
                }),
        );
        // A short read is the end of what the log has now.
        let Some(last) = decoded.last() else { break };
        from = last.offset + 1;
        if got < want || from >= span.end || started.elapsed() >= grow.time {
            break;
        }
    }
    Ok(decoded)
}

/// What one projection's live generation did in a round.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    events: u64,
    quarantined: u64,
    /// Whether any record was read for it.
    read: bool,
}

/// One round of the live generations of a worker's projections, with one
/// read per source partition and position: the projections that are at the
/// same offset of a partition share the read and the decoding of its next
/// batch, and each applies it to its own storage and commits it with its
/// own positions. A projection behind the others is alone at its offset, so
/// it catches up on its own reads and joins the shared one once it gets
/// there. A target that may not read as far as the others (a search index
/// following its view) gets the part of the batch before its limit.
///
/// `outcomes` holds, per runner, `None` when it does not work this round,
/// else its result so far, which this fills in.
fn advance_live(
    domain: &Domain,
    read: &mut ReadFn<'_>,
    grow: &Growth,
    runners: &mut [Runner],
    outcomes: &mut [Option<Result<Tally, ProjectionError>>],
) {
    // The limit of each working runner, and the readers of each (partition, offset).
    let mut limits: Vec<Option<Positions>> = vec![None; runners.len()];
    let mut readers: BTreeMap<(String, u32, u64), Vec<(usize, u64)>> = BTreeMap::new();
    for (i, runner) in runners.iter().enumerate() {
        if !matches!(outcomes[i], Some(Ok(_))) {
            continue;
        }
        let Some(live) = runner.live.as_ref() else {
            continue;
        };
        match live.read_limit() {
            Ok(limit) => limits[i] = limit,
            Err(error) => {
                outcomes[i] = Some(Err(error.into()));
                continue;
            }
        }
        for ((topic, partition), next) in &runner.positions {
            let end = match &limits[i] {
                None => u64::MAX,
                Some(limit) => limit
                    .get(&(topic.clone(), *partition))
                    .copied()
                    .unwrap_or(0),
            };
            if *next < end {
                readers
                    .entry((topic.clone(), *partition, *next))
                    .or_default()
                    .push((i, end));
            }
        }
    }
    for ((topic, partition, next), mut members) in readers {
        // A projection whose commit failed for an earlier partition stops
        // for this round; it retries from its stored positions.
        members.retain(|(i, _)| matches!(outcomes[*i], Some(Ok(_))));
        let Some(end) = members.iter().map(|(_, end)| *end).max() else {
            continue;
        };
        let span = Span {
            topic: &topic,
            partition,
            from: next,
            end,
        };
        let decoded = match read_batch(domain, read, span, grow) {
            Ok(decoded) => decoded,
            Err(error) => {
                let reason = error.to_string();
                for (i, _) in &members {
                    outcomes[*i] = Some(Err(ProjectionError::Log(LogError::Unavailable(
                        reason.clone(),
                    ))));
                }
                continue;
            }
        };
        for (i, end) in members {
            // Offsets grow along the batch, so a limit cuts it in two.
            let upto = decoded.partition_point(|record| record.offset < end);
            let batch = &decoded[..upto];
            let Some(last) = batch.last() else {
                continue;
            };
            let new_next = last.offset + 1;
            let runner = &mut runners[i];
            let Some(live) = runner.live.as_mut() else {
                continue;
            };
            let mut commit = Positions::new();
            commit.insert((topic.clone(), partition), new_next);
            match live.apply(batch, &commit) {
                Ok(stats) => {
                    runner
                        .positions
                        .insert((topic.clone(), partition), new_next);
                    if let Some(Ok(tally)) = outcomes[i].as_mut() {
                        tally.events += stats.events;
                        tally.quarantined += stats.quarantined;
                        tally.read = true;
                    }
                }
                Err(error) => outcomes[i] = Some(Err(error.into())),
            }
        }
    }
}

impl Runner {
    pub(super) fn new(
        handle: Arc<ProjectionHandle>,
        engine: Box<dyn Engine>,
        live: Box<dyn Target>,
        positions: Positions,
        startup_end: Positions,
    ) -> Self {
        Self {
            handle,
            engine,
            live: Some(live),
            positions,
            startup_end: Some(startup_end),
            rebuild: None,
            retry_at: None,
            rate_since: Instant::now(),
            rate_events: 0,
            flush_at: None,
            follows: None,
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.handle.name
    }

    /// Wakes this projection's worker whenever `positions` change.
    pub(super) fn follow(&mut self, positions: watch::Receiver<Positions>) {
        self.follows = Some(positions);
    }

    /// Publishes the positions queries can rely on: what the live target has
    /// committed and made visible, for every source partition.
    fn publish(handle: &ProjectionHandle, positions: &Positions, live: &dyn Target) {
        let visible = match live.visible_positions() {
            None => positions.clone(),
            Some(visible) => positions
                .keys()
                .map(|key| (key.clone(), visible.get(key).copied().unwrap_or(0)))
                .collect(),
        };
        handle.positions.send_if_modified(|published| {
            let changed = *published != visible;
            if changed {
                *published = visible;
            }
            changed
        });
    }

    /// Commits what the live target buffered, at shutdown. Blocking.
    fn flush_live(&mut self) {
        if let Some(live) = self.live.as_mut()
            && let Err(error) = live.flush(true)
        {
            tracing::error!(projection = %self.handle.name, %error, "cannot commit buffered changes");
        }
    }

    /// Whether this projection may work now (it is not waiting to retry).
    fn due(&self) -> bool {
        self.retry_at.is_none_or(|at| Instant::now() >= at)
    }

    /// Settles the outcome of one round: a failure is reported and retried
    /// later; a success after failures clears the failed state. Returns
    /// whether anything was read.
    fn settle(&mut self, outcome: Result<bool, ProjectionError>) -> bool {
        match outcome {
            Ok(worked) => {
                if self.retry_at.take().is_some() {
                    let state = if self.rebuild.is_some() {
                        ProjectionState::Rebuilding
                    } else {
                        ProjectionState::Running
                    };
                    self.handle.set_state(state, None);
                }
                worked
            }
            Err(error) => {
                tracing::error!(projection = %self.handle.name, %error, "projection failed; retrying");
                self.handle
                    .set_state(ProjectionState::Failed, Some(error.to_string()));
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                // A failed storage write may still have landed: fjall's
                // journal can write out a batch whose commit reported a full
                // disk once the disk has room again. Memory then no longer
                // tells what is stored, so the generations are opened again
                // and the positions read back from the store (a rebuild starts
                // over, as it is still requested); retrying from the positions
                // in memory would apply that batch twice.
                if matches!(error, ProjectionError::Store(_)) {
                    self.live = None;
                    self.rebuild = None;
                }
                // A failed open of the live generation is retried from scratch.
                if self.live.is_none() {
                    match self.engine.open_live().and_then(|live| {
                        let stored = live.positions()?;
                        Ok((live, stored))
                    }) {
                        Ok((live, stored)) => {
                            self.positions.extend(stored);
                            self.live = Some(live);
                        }
                        Err(error) => tracing::error!(%error, "cannot reopen the live generation"),
                    }
                }
                false
            }
        }
    }

    /// The first part of a round, before the live generation reads: starts a
    /// requested rebuild, and checks that the live generation is open.
    fn prepare(&mut self, context: &WorkerContext) -> Result<(), ProjectionError> {
        if self.rebuild.is_none()
            && self
                .handle
                .rebuild_requested
                .load(std::sync::atomic::Ordering::Acquire)
        {
            let target = self.engine.open_rebuild()?;
            let positions = full_positions(
                &Positions::new(),
                &self.handle.topics,
                context.log.partitions(),
            );
            tracing::info!(projection = %self.handle.name, "rebuild started");
            self.rebuild = Some(Rebuild {
                target,
                positions,
                events: 0,
            });
        }
        if self.live.is_none() {
            return Err(ProjectionError::Store(StoreError::Unavailable(
                "the live generation is not open".to_owned(),
            )));
        }
        if let Some(request) = self.handle.take_move()
            && !request.reply.is_closed()
        {
            let result = self.move_forward(&context.log, request.positions);
            let _ = request.reply.send(result);
        }
        Ok(())
    }

    /// Moves a policy's positions forward to `wanted` (an operator's skip):
    /// every partition must be one of its sources', no offset may go back or
    /// past the end of the log.
    fn move_forward(
        &mut self,
        log: &EventLog,
        wanted: Positions,
    ) -> Result<Positions, super::QueryError> {
        use super::QueryError;
        let mut moved = self.positions.clone();
        for ((topic, partition), offset) in wanted {
            let Some(current) = self.positions.get(&(topic.clone(), partition)) else {
                return Err(QueryError::BadParameter(format!(
                    "{topic}:{partition} is not a partition that {} reads",
                    self.handle.name
                )));
            };
            if offset < *current {
                return Err(QueryError::BadParameter(format!(
                    "{topic}:{partition}:{offset} is behind the policy's position {topic}:{partition}:{current}; a policy's position only moves forward (going back would send commands again)"
                )));
            }
            let end = log
                .end_offset(&topic, partition)
                .map_err(|e| QueryError::Unavailable(e.to_string()))?;
            if offset > end {
                return Err(QueryError::BadParameter(format!(
                    "{topic}:{partition}:{offset} is past the end of the log ({topic}:{partition}:{end})"
                )));
            }
            moved.insert((topic, partition), offset);
        }
        let Some(live) = self.live.as_mut() else {
            return Err(QueryError::Unavailable(
                "the live generation is not open".to_owned(),
            ));
        };
        live.move_positions(&moved)
            .map_err(|e| QueryError::Unavailable(e.to_string()))?;
        tracing::warn!(policy = %self.handle.name, from = ?self.positions, to = ?moved,
            "policy position moved forward by an operator; the events between are skipped");
        self.positions = moved;
        Self::publish(&self.handle, &self.positions, live.as_ref());
        Ok(self.positions.clone())
    }

    /// The rest of a round, after the live generation has applied what the
    /// worker read for it (`live`): commits what is due, publishes the
    /// positions, advances a rebuild (which reads on its own) and notes when
    /// the projection has caught up.
    fn conclude(&mut self, context: &WorkerContext, live: Tally) -> Result<bool, ProjectionError> {
        let Tally {
            events,
            quarantined,
            read: mut worked,
        } = live;
        let Some(target) = self.live.as_mut() else {
            return Err(ProjectionError::Store(StoreError::Unavailable(
                "the live generation is not open".to_owned(),
            )));
        };
        self.flush_at = target.flush(false)?;
        Self::publish(&self.handle, &self.positions, target.as_ref());
        if worked {
            let mut status = self.handle.status();
            status.events_total += events;
            status.quarantined += quarantined;
            metrics::counter!("cqrsd_projection_events_total", "projection" => self.handle.name.clone())
                .increment(events);
            metrics::counter!("cqrsd_projection_quarantined_total", "projection" => self.handle.name.clone())
                .increment(quarantined);
        }
        if let Some(rebuild) = self.rebuild.as_mut() {
            let (events, _, read) = advance(
                &context.domain,
                &context.log,
                context.batch_size,
                rebuild.target.as_mut(),
                &mut rebuild.positions,
            )?;
            worked |= read;
            rebuild.events += events;
            self.handle.status().rebuild = Some(RebuildProgress {
                positions: rebuild.positions.clone(),
                events: rebuild.events,
            });
            // Swap only once the new generation is at least where the live one
            // is, so positions seen by queries never go back.
            let caught_up = self
                .positions
                .iter()
                .all(|(key, live)| rebuild.positions.get(key).is_some_and(|p| p >= live));
            if caught_up && let Some(rebuild) = self.rebuild.take() {
                self.finish_rebuild(rebuild)?;
            }
        }
        // Caught up means visible to queries: a search index that has applied
        // events but not yet committed them does not count.
        let caught_up = self.startup_end.as_ref().is_some_and(|end| {
            let published = self.handle.positions.borrow();
            end.iter()
                .all(|(key, end)| published.get(key).is_some_and(|p| p >= end))
        });
        if caught_up {
            self.startup_end = None;
            if self.handle.status().state == ProjectionState::Starting {
                self.handle.set_state(ProjectionState::Running, None);
            }
            if context.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                context.readiness.ready();
                tracing::info!("every projection caught up with the event log");
            }
        }
        Ok(worked)
    }

    fn finish_rebuild(&mut self, rebuild: Rebuild) -> Result<(), ProjectionError> {
        // The live target holds the old generation; it must be let go before the
        // swap, which waits for the last reader of the old generation.
        self.live = None;
        let quarantined = rebuild.target.quarantine_count()?;
        rebuild.target.promote()?;
        let live = self.engine.open_live()?;
        self.positions = rebuild.positions;
        Self::publish(&self.handle, &self.positions, live.as_ref());
        self.live = Some(live);
        {
            let mut status = self.handle.status();
            status.quarantined = quarantined;
            status.rebuild = None;
            status.state = ProjectionState::Running;
            status.error = None;
        }
        self.handle
            .rebuild_requested
            .store(false, std::sync::atomic::Ordering::Release);
        tracing::info!(projection = %self.handle.name, events = rebuild.events, "rebuild finished and swapped in");
        Ok(())
    }

    /// Refreshes events/s and the position and lag gauges.
    fn refresh(&mut self, log: &EventLog) {
        let elapsed = self.rate_since.elapsed();
        if elapsed >= REFRESH {
            let mut status = self.handle.status();
            let delta = status.events_total.saturating_sub(self.rate_events);
            status.events_per_sec = delta as f64 / elapsed.as_secs_f64();
            self.rate_events = status.events_total;
            self.rate_since = Instant::now();
        }
        for ((topic, partition), next) in &self.positions {
            let labels = [
                ("projection", self.handle.name.clone()),
                ("topic", topic.clone()),
                ("partition", partition.to_string()),
            ];
            metrics::gauge!("cqrsd_projection_position", &labels).set(*next as f64);
            let end = log.end_offset(topic, *partition).unwrap_or(*next);
            metrics::gauge!("cqrsd_projection_lag", &labels).set(end.saturating_sub(*next) as f64);
        }
    }
}

/// The worker thread's loop: work while there is something to read, then
/// sleep until an append, a wake-up (rebuild request) or shutdown.
pub(super) fn run(context: WorkerContext, mut runners: Vec<Runner>) {
    // Rebuild targets opened later on this thread inherit the priority too.
    super::priority::lower_current_thread(context.nice);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start a projection worker");
            return;
        }
    };
    let mut watches: Vec<watch::Receiver<u64>> = Vec::new();
    let mut follows: Vec<watch::Receiver<Positions>> = Vec::new();
    for runner in &mut runners {
        for (topic, partition) in runner.positions.keys() {
            match context.log.subscribe(topic, *partition) {
                Ok(receiver) => watches.push(receiver),
                Err(error) => tracing::error!(%error, %topic, partition, "cannot watch partition"),
            }
        }
        follows.extend(runner.follows.take());
    }
    while !context.cancel.is_cancelled() {
        // Marking the watches seen before working means an append during the
        // work is not missed: the wait below returns at once for it.
        for watch in &mut watches {
            watch.borrow_and_update();
        }
        for follow in &mut follows {
            follow.borrow_and_update();
        }
        let mut outcomes: Vec<Option<Result<Tally, ProjectionError>>> = runners
            .iter_mut()
            .map(|runner| {
                runner
                    .due()
                    .then(|| runner.prepare(&context).map(|()| Tally::default()))
            })
            .collect();
        advance_live(
            &context.domain,
            &mut |topic, partition, from, max| context.log.read(topic, partition, from, max),
            &Growth {
                events: context.batch_size,
                chunk: READ_CHUNK,
                time: context.batch_time,
            },
            &mut runners,
            &mut outcomes,
        );
        let mut worked = false;
        for (runner, outcome) in runners.iter_mut().zip(outcomes) {
            if let Some(outcome) = outcome {
                let outcome = outcome.and_then(|live| runner.conclude(&context, live));
                worked |= runner.settle(outcome);
            }
            runner.refresh(&context.log);
        }
        if worked {
            continue;
        }
        let retrying = runners.iter().any(|r| r.retry_at.is_some());
        let mut idle = if retrying { RETRY_AFTER / 4 } else { REFRESH };
        // Buffered changes are committed on time even when nothing else happens.
        if let Some(due) = runners.iter().filter_map(|r| r.flush_at).min() {
            idle = idle.min(due.saturating_duration_since(Instant::now()));
        }
        runtime.block_on(async {
            let mut changes: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>> =
                watches
                    .iter_mut()
                    .map(|w| {
                        Box::pin(async move {
                            // A closed log never changes again: wait on the other arms.
                            if w.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        })
                            as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
                    })
                    .collect();
            changes.extend(follows.iter_mut().map(|w| {
                Box::pin(async move {
                    // A stopped projection never moves again: wait on the other arms.
                    if w.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
            }));
            // `select_all` needs at least one future.
            changes.push(Box::pin(std::future::pending()));
            tokio::select! {
                _ = futures::future::select_all(changes) => {}
                () = context.wake.notified() => {}
                () = context.cancel.cancelled() => {}
                () = tokio::time::sleep(idle) => {}
            }
        });
    }
    // Committing at shutdown spares a restart from applying the batches again.
    for runner in &mut runners {
        runner.flush_live();
    }
}

/// Rebuilds one projection offline (the daemon must not run): fills a new
/// generation from offset 0 to the current end of the log, then swaps it in.
/// `progress` is called with (records read, records in total, events applied).
pub fn rebuild_offline(
    domain: &Arc<crate::domain::Domain>,
    log: &EventLog,
    store: &crate::store::ViewStore,
    name: &str,
    batch_size: usize,
    settings: &super::EngineSettings,
    mut progress: impl FnMut(u64, u64, u64),
) -> Result<u64, ProjectionError> {
    if domain.policy(name).is_some() {
        return Err(ProjectionError::Policy(name.to_owned()));
    }
    if domain.projection(name).is_none() {
        return Err(ProjectionError::Unknown(name.to_owned()));
    }
    let settings = super::EngineSettings {
        search_commit_interval: OFFLINE_SEARCH_COMMIT_INTERVAL,
        ..*settings
    };
    // Offline, the view is not running: a search reads its documents from
    // the view store.
    let engine = super::engine_for(domain, store, &super::Feeds::default(), name, &settings)
        .ok_or_else(|| ProjectionError::NotRebuildable(name.to_owned()))?;
    let topics = super::topics_of(domain, log, name);
    let mut positions = full_positions(&Positions::new(), &topics, log.partitions());
    let mut total = 0;
    for (topic, partition) in positions.keys() {
        total += log.end_offset(topic, *partition)?;
    }
    let mut target = engine.open_rebuild()?;
    let mut events = 0;
    loop {
        let (seen, _, read) = advance(
            domain,
            log,
            batch_size.max(1),
            target.as_mut(),
            &mut positions,
        )?;
        events += seen;
        progress(positions.values().sum(), total, events);
        if !read {
            break;
        }
    }
    target.promote()?;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::projection::engine::BatchStats;
    use crate::projection::{ProjectionHandle, Status};

    /// What a fake target was handed: (first offset, records, address of the
    /// first record), one entry per batch.
    type Seen = Arc<Mutex<Vec<(u64, usize, usize)>>>;

    struct FakeTarget {
        seen: Seen,
        limit: Option<Positions>,
    }

    impl Target for FakeTarget {
        fn positions(&self) -> Result<Positions, StoreError> {
            Ok(Positions::new())
        }
        fn quarantine_count(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn apply(
            &mut self,
            records: &[SourceRecord],
            _positions: &Positions,
        ) -> Result<BatchStats, StoreError> {
            self.seen.lock().unwrap().push((
                records[0].offset,
                records.len(),
                records.as_ptr() as usize,
            ));
            Ok(BatchStats {
                events: records.len() as u64,
                quarantined: 0,
            })
        }
        fn read_limit(&self) -> Result<Option<Positions>, StoreError> {
            Ok(self.limit.clone())
        }
        fn promote(self: Box<Self>) -> Result<(), StoreError> {
            Ok(())
        }
    }

    struct NoEngine;

    impl Engine for NoEngine {
        fn open_live(&self) -> Result<Box<dyn Target>, StoreError> {
            Err(StoreError::Unavailable("not in this test".to_owned()))
        }
        fn open_rebuild(&self) -> Result<Box<dyn Target>, StoreError> {
            Err(StoreError::Unavailable("not in this test".to_owned()))
        }
    }

    fn runner(name: &str, next: u64, limit: Option<u64>) -> (Runner, Seen) {
        let key = ("t".to_owned(), 0);
        let positions: Positions = [(key.clone(), next)].into_iter().collect();
        let handle = Arc::new(ProjectionHandle {
            name: name.to_owned(),
            kind: "view",
            topics: vec!["t".to_owned()],
            positions: watch::Sender::new(positions.clone()),
            status: Mutex::new(Status {
                state: ProjectionState::Starting,
                events_total: 0,
                events_per_sec: 0.0,
                quarantined: 0,
                error: None,
                rebuild: None,
            }),
            rebuild_requested: std::sync::atomic::AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            moves: Default::default(),
        });
        let seen = Seen::default();
        let target = FakeTarget {
            seen: seen.clone(),
            limit: limit.map(|end| [(key, end)].into_iter().collect()),
        };
        let runner = Runner::new(
            handle,
            Box::new(NoEngine),
            Box::new(target),
            positions.clone(),
            positions,
        );
        (runner, seen)
    }

    fn domain() -> Domain {
        Domain::from_toml_str(crate::domain::EXAMPLE_DOMAIN).unwrap()
    }

    /// Runs one round over `runners` against a log of `len` records and
    /// returns how many reads it made.
    fn round(runners: &mut [Runner], len: u64, batch: usize) -> usize {
        let mut reads = Vec::new();
        let mut outcomes: Vec<_> = runners.iter().map(|_| Some(Ok(Tally::default()))).collect();
        let grow = Growth {
            events: batch,
            chunk: batch,
            time: Duration::from_secs(60),
        };
        advance_live(
            &domain(),
            &mut *serve(len, &mut reads),
            &grow,
            runners,
            &mut outcomes,
        );
        assert!(outcomes.iter().all(|o| matches!(o, Some(Ok(_)))));
        reads.len()
    }

    #[test]
    fn projections_at_one_offset_share_one_read_and_one_decoding() {
        let (a, seen_a) = runner("a", 0, None);
        let (b, seen_b) = runner("b", 0, None);
        // A search index may read only as far as its view has committed.
        let (c, seen_c) = runner("c", 0, Some(2));
        let mut runners = vec![a, b, c];
        assert_eq!(round(&mut runners, 10, 4), 1);
        let (a0, b0, c0) = (
            seen_a.lock().unwrap()[0],
            seen_b.lock().unwrap()[0],
            seen_c.lock().unwrap()[0],
        );
        assert_eq!((a0.0, a0.1), (0, 4));
        // The same decoded records, not a copy.
        assert_eq!(a0, b0);
        assert_eq!((c0.0, c0.1, c0.2), (0, 2, a0.2));
        assert_eq!(runners[0].positions.values().next(), Some(&4));
        assert_eq!(runners[2].positions.values().next(), Some(&2));
        // The limited one waits at its limit; the others read on together.
        assert_eq!(round(&mut runners, 10, 4), 1);
        assert_eq!(seen_a.lock().unwrap()[1], seen_b.lock().unwrap()[1]);
        assert_eq!(seen_c.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_projection_behind_catches_up_alone_then_joins_the_shared_read() {
        let (ahead, seen_ahead) = runner("ahead", 8, None);
        let (behind, seen_behind) = runner("behind", 0, None);
        let mut runners = vec![ahead, behind];
        // Each reads where it is: the one ahead is not held back.
        assert_eq!(round(&mut runners, 10, 4), 2);
        assert_eq!(seen_ahead.lock().unwrap()[0].0, 8);
        assert_eq!(seen_behind.lock().unwrap()[0].0, 0);
        assert_eq!(round(&mut runners, 10, 4), 2);
        assert_eq!(round(&mut runners, 10, 4), 2);
        assert_eq!(runners[1].positions.values().next(), Some(&10));
        // Both at the end: new records are read once for both.
        assert_eq!(round(&mut runners, 14, 4), 1);
        let last_ahead = *seen_ahead.lock().unwrap().last().unwrap();
        let last_behind = *seen_behind.lock().unwrap().last().unwrap();
        assert_eq!(last_ahead, last_behind);
        assert_eq!((last_ahead.0, last_ahead.1), (10, 4));
    }

    /// A log of `len` empty records, noting every read (from, max).
    fn serve(len: u64, reads: &mut Vec<(u64, usize)>) -> Box<ReadFn<'_>> {
        Box::new(move |_, _, from, max| {
            reads.push((from, max));
            Ok((from..len.min(from + max as u64))
                .map(|offset| {
                    let record = Record {
                        key: "k".to_owned(),
                        headers: Vec::new(),
                        value: Vec::new(),
                        timestamp_ms: 0,
                    };
                    (offset, record)
                })
                .collect())
        })
    }

    #[test]
    fn a_batch_grows_by_chunks_up_to_its_events_its_end_and_its_time() {
        let span = |from, end| Span {
            topic: "t",
            partition: 0,
            from,
            end,
        };
        let grow = Growth {
            events: 10,
            chunk: 4,
            time: Duration::from_secs(60),
        };
        // Up to the event bound, in chunks.
        let mut reads = Vec::new();
        let batch = read_batch(
            &domain(),
            &mut *serve(100, &mut reads),
            span(0, u64::MAX),
            &grow,
        )
        .unwrap();
        assert_eq!(batch.len(), 10);
        assert_eq!(reads, [(0, 4), (4, 4), (8, 2)]);
        // Up to the end offset (a read limit).
        let mut reads = Vec::new();
        let batch = read_batch(&domain(), &mut *serve(100, &mut reads), span(0, 6), &grow).unwrap();
        assert_eq!(batch.last().map(|r| r.offset), Some(5));
        assert_eq!(reads, [(0, 4), (4, 2)]);
        // Up to the end of the log: a short read stops it.
        let mut reads = Vec::new();
        let batch = read_batch(
            &domain(),
            &mut *serve(5, &mut reads),
            span(0, u64::MAX),
            &grow,
        )
        .unwrap();
        assert_eq!(batch.len(), 5);
        assert_eq!(reads, [(0, 4), (4, 4)]);
        // Out of time: one chunk only.
        let hurried = Growth {
            time: Duration::ZERO,
            ..grow
        };
        let mut reads = Vec::new();
        let batch = read_batch(
            &domain(),
            &mut *serve(100, &mut reads),
            span(0, u64::MAX),
            &hurried,
        )
        .unwrap();
        assert_eq!(batch.len(), 4);
        assert_eq!(reads, [(0, 4)]);
    }
}
