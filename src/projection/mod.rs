//! The read side: the projection pool that keeps read models up to date from
//! the event log, and the queries that read them.
//!
//! `[projections] workers` std threads share the projections; each projection
//! is owned by exactly one worker, so each storage tree has one writer. A
//! worker reads each source partition from the positions stored beside the
//! projection's data, in batches, and commits the changes and the new
//! positions together (DESIGN.md §2 guarantee 5). It sleeps on the log's end
//! offset watches when there is nothing to read. Events that cannot be
//! applied are quarantined with their reason, never dropped (guarantee 6).

mod cache;
mod engine;
mod feed;
mod measures;
mod policy;
mod priority;
mod query;
mod search;
mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use engine::{BatchStats, Engine, EngineSettings, SourceRecord, Target, engine_for};
pub use feed::Feeds;
pub use policy::{CommandSender, PolicyCommand, PolicyOptions, PolicySender, SendAnswer};
pub use query::{ListRequest, Page, QueryError, SortOrder, parse_value};
pub(crate) use query::{hex, unhex};
pub use worker::rebuild_offline;

use crate::domain::{Domain, ProjectionKind};
use crate::health::Health;
use crate::log::EventLog;
use crate::store::views::{Positions, Quarantined};
use crate::store::{StoreError, ViewStore};

/// Settings of the pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub workers: usize,
    /// Most events of one batch.
    pub batch_size: usize,
    /// Longest a batch grows before it is applied and committed.
    pub batch_time: std::time::Duration,
    /// The nice value of the workers and of the threads their targets start.
    pub nice: i32,
    /// The projections' storage settings; `cache_bytes` is the working-set
    /// budget of all views and aggregations together, shared out equally.
    pub engine: EngineSettings,
    /// How policies send their commands and retry.
    pub policies: PolicyOptions,
}

/// The life cycle of a projection, as shown by the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionState {
    Starting,
    Running,
    Rebuilding,
    Failed,
}

impl ProjectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionState::Starting => "starting",
            ProjectionState::Running => "running",
            ProjectionState::Rebuilding => "rebuilding",
            ProjectionState::Failed => "failed",
        }
    }
}

/// Progress of a running rebuild.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebuildProgress {
    pub positions: Positions,
    pub events: u64,
}

#[derive(Debug, Clone)]
struct Status {
    state: ProjectionState,
    events_total: u64,
    events_per_sec: f64,
    quarantined: u64,
    error: Option<String>,
    rebuild: Option<RebuildProgress>,
}

/// What the pool shares about one projection with queries and the admin API.
#[derive(Debug)]
pub struct ProjectionHandle {
    name: String,
    kind: &'static str,
    /// The topics of the projection's sources.
    topics: Vec<String>,
    /// The live generation's positions, published after every commit, so
    /// `consistent_with` waits without polling.
    positions: watch::Sender<Positions>,
    status: Mutex<Status>,
    rebuild_requested: AtomicBool,
    /// Wakes the projection's worker (e.g. for a rebuild request).
    wake: Arc<Notify>,
    /// An operator's request to move a policy's positions forward, for its
    /// worker to carry out between batches.
    moves: PendingMove,
}

/// Where a move request waits; shared with a policy's target, whose retries
/// give way to it.
pub(crate) type PendingMove = Arc<Mutex<Option<MoveRequest>>>;

/// A request to move a policy's positions forward, and where to answer.
#[derive(Debug)]
pub(crate) struct MoveRequest {
    pub positions: Positions,
    pub reply: tokio::sync::oneshot::Sender<Result<Positions, QueryError>>,
}

impl ProjectionHandle {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        // Every update is a plain field assignment, so a poisoned lock still holds
        // a coherent status.
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_state(&self, state: ProjectionState, error: Option<String>) {
        let mut status = self.status();
        status.state = state;
        status.error = error;
    }

    fn take_move(&self) -> Option<MoveRequest> {
        self.moves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// A projection's report for the admin API.
#[derive(Debug, Clone)]
pub struct ProjectionReport {
    pub name: String,
    pub kind: &'static str,
    /// The live generation; each finished rebuild adds one.
    pub generation: u64,
    pub state: ProjectionState,
    pub error: Option<String>,
    /// (topic, partition, next offset, lag).
    pub partitions: Vec<(String, u32, u64, u64)>,
    pub events_total: u64,
    pub events_per_sec: f64,
    pub quarantine_count: u64,
    pub quarantined: Vec<Quarantined>,
    pub rebuild: Option<RebuildProgress>,
}

/// The read side as queries and the admin API see it; cheap to clone.
#[derive(Debug, Clone)]
pub struct ReadModels {
    domain: Arc<Domain>,
    log: EventLog,
    store: ViewStore,
    projections: Arc<BTreeMap<String, Arc<ProjectionHandle>>>,
}

/// The running pool: its workers and the read models they maintain.
#[derive(Debug)]
pub struct ProjectionPool {
    read_models: ReadModels,
    cancel: CancellationToken,
    workers: Vec<JoinHandle<()>>,
}

/// Why the pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("projection storage: {0}")]
    Store(#[from] StoreError),
    #[error("event log: {0}")]
    Log(#[from] crate::log::LogError),
    #[error("unknown projection {0:?}")]
    Unknown(String),
    #[error("projection {0:?} is a search projection, which this pool does not rebuild")]
    NotRebuildable(String),
    #[error(
        "{0:?} is a policy, which is never rebuilt (that would send every command again); move its position forward with POST /admin/projections/{0}/position instead"
    )]
    Policy(String),
    #[error("cannot start a projection worker thread: {0}")]
    Thread(std::io::Error),
}

/// The topics of a projection's (or a policy's) sources.
fn topics_of(domain: &Domain, log: &EventLog, name: &str) -> Vec<String> {
    let sources = match (domain.projection(name), domain.policy(name)) {
        (Some(projection), _) => projection.sources(),
        (None, Some(policy)) => policy.sources(),
        (None, None) => &[],
    };
    sources.iter().map(|s| log.topic(s)).collect()
}

impl ProjectionPool {
    /// Opens every view and aggregation, then starts the workers. Blocking. The
    /// workers stop when `shutdown` is cancelled; [`ProjectionPool::stop`] joins them.
    pub fn start(
        options: PoolOptions,
        domain: Arc<Domain>,
        log: EventLog,
        store: ViewStore,
        health: &Health,
        shutdown: &CancellationToken,
    ) -> Result<ProjectionPool, ProjectionError> {
        let readiness = health.register("projections", "catching up with the event log");
        let cancel = shutdown.child_token();
        let workers = options.workers.max(1);
        let mut handles = BTreeMap::new();
        let mut assignments: Vec<Vec<worker::Runner>> = (0..workers).map(|_| Vec::new()).collect();
        let wakes: Vec<Arc<Notify>> = (0..workers).map(|_| Arc::new(Notify::new())).collect();
        let mut next = 0;
        // The working sets of views and aggregations and the documents a
        // view hands to each search projection share `cache_mib` equally.
        let shares = domain.projections().count();
        let settings = EngineSettings {
            cache_bytes: options.engine.cache_bytes / shares.max(1),
            ..options.engine
        };
        let feeds = Feeds::new(&domain, settings.cache_bytes);
        // Policies run beside the projections, on the same workers.
        let mut engines: Vec<(&str, &'static str, Box<dyn Engine>)> = Vec::new();
        for projection in domain.projections() {
            let name = projection.name();
            let Some(engine) = engine_for(&domain, &store, &feeds, name, &settings) else {
                continue;
            };
            let kind = match projection.kind() {
                ProjectionKind::View(_) => "view",
                ProjectionKind::Aggregation(_) => "aggregation",
                ProjectionKind::Search(_) => "search",
            };
            engines.push((name, kind, engine));
        }
        let mut pending_moves: BTreeMap<String, PendingMove> = BTreeMap::new();
        for policy in domain.policies() {
            let moves = PendingMove::default();
            pending_moves.insert(policy.name().to_owned(), moves.clone());
            let engine = policy::PolicyEngine {
                moves,
                domain: domain.clone(),
                store: store.clone(),
                name: policy.name().to_owned(),
                options: options.policies.clone(),
                cancel: cancel.clone(),
            };
            engines.push((policy.name(), "policy", Box::new(engine)));
        }
        for (name, kind, engine) in engines {
            // Opened at the projections' priority: a search index starts its
            // tantivy threads here, and they inherit it.
            let (engine, live) = priority::at_projection_priority(options.nice, move || {
                let live = engine.open_live();
                (engine, live)
            })
            .map_err(ProjectionError::Thread)?;
            let live = live?;
            let topics = topics_of(&domain, &log, name);
            let positions = worker::full_positions(&live.positions()?, &topics, log.partitions());
            let handle = Arc::new(ProjectionHandle {
                name: name.to_owned(),
                kind,
                topics: topics.clone(),
                positions: watch::Sender::new(positions.clone()),
                status: Mutex::new(Status {
                    state: ProjectionState::Starting,
                    events_total: 0,
                    events_per_sec: 0.0,
                    quarantined: live.quarantine_count()?,
                    error: None,
                    rebuild: None,
                }),
                rebuild_requested: AtomicBool::new(false),
                wake: wakes[next].clone(),
                moves: pending_moves.remove(name).unwrap_or_default(),
            });
            // Readiness waits for the ends seen now: catching up with events
            // appended later is the ordinary lag, shown by metrics.
            let mut startup_end = Positions::new();
            for key in positions.keys() {
                startup_end.insert(key.clone(), log.end_offset(&key.0, key.1)?);
            }
            assignments[next].push(worker::Runner::new(
                handle.clone(),
                engine,
                live,
                positions,
                startup_end,
            ));
            handles.insert(name.to_owned(), handle);
            next = (next + 1) % workers;
        }
        // A search projection reads no further than its view has committed, so
        // its worker wakes when the view's positions move.
        for runner in assignments.iter_mut().flatten() {
            if let Some(ProjectionKind::Search(def)) =
                domain.projection(runner.name()).map(|p| p.kind())
                && let Some(view) = handles.get(def.view())
            {
                let receiver: watch::Receiver<Positions> = view.positions.subscribe();
                runner.follow(receiver);
            }
        }
        let read_models = ReadModels {
            domain,
            log,
            store,
            projections: Arc::new(handles),
        };
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(
            read_models.projections.len(),
        ));
        if read_models.projections.is_empty() {
            readiness.ready();
        }
        let mut threads = Vec::new();
        for (index, (runners, wake)) in assignments.into_iter().zip(wakes).enumerate() {
            if runners.is_empty() {
                continue;
            }
            let context = worker::WorkerContext {
                log: read_models.log.clone(),
                domain: read_models.domain().clone(),
                batch_size: options.batch_size.max(1),
                batch_time: options.batch_time,
                cancel: cancel.clone(),
                wake,
                readiness: readiness.clone(),
                pending: pending.clone(),
                nice: options.nice,
            };
            let thread = std::thread::Builder::new()
                .name(format!("cqrsd-projection-{index}"))
                .spawn(move || worker::run(context, runners))
                .map_err(ProjectionError::Thread)?;
            threads.push(thread);
        }
        Ok(ProjectionPool {
            read_models,
            cancel,
            workers: threads,
        })
    }

    /// What queries and the admin API read.
    pub fn read_models(&self) -> ReadModels {
        self.read_models.clone()
    }

    /// Stops the workers (each finishes its current batch), joins them and
    /// flushes the view store. Blocking.
    pub fn stop(self) {
        self.cancel.cancel();
        for worker in self.workers {
            if worker.join().is_err() {
                tracing::error!("a projection worker panicked");
            }
        }
        if let Err(error) = self.read_models.store.flush() {
            tracing::error!(%error, "cannot flush the view store");
        }
    }
}

impl ReadModels {
    pub fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    fn handle(&self, name: &str) -> Option<&Arc<ProjectionHandle>> {
        self.projections.get(name)
    }

    /// Asks the owning worker to rebuild a projection beside its live data.
    /// Returns the projection's report; fails when a rebuild is running already.
    pub fn request_rebuild(&self, name: &str) -> Result<ProjectionState, QueryError> {
        let handle = match self.handle(name) {
            Some(handle) => handle,
            None if self.domain.projection(name).is_some() => {
                return Err(QueryError::NotRebuildable(name.to_owned()));
            }
            None => return Err(QueryError::UnknownProjection(name.to_owned())),
        };
        if handle.kind == "policy" {
            return Err(QueryError::PolicyNotRebuildable(name.to_owned()));
        }
        if handle
            .rebuild_requested
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(QueryError::RebuildRunning(name.to_owned()));
        }
        {
            let mut status = handle.status();
            status.state = ProjectionState::Rebuilding;
            status.rebuild = Some(RebuildProgress::default());
        }
        handle.wake.notify_one();
        Ok(ProjectionState::Rebuilding)
    }

    /// Asks the worker of a policy to move its positions forward to
    /// `positions` (partitions not named stay where they are); the answer,
    /// the policy's new positions or why not, comes through the receiver.
    pub fn request_move(
        &self,
        name: &str,
        positions: Positions,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Positions, QueryError>>, QueryError> {
        let handle = match self.handle(name) {
            Some(handle) if handle.kind == "policy" => handle,
            Some(_) => return Err(QueryError::NotAPolicy(name.to_owned())),
            None => return Err(QueryError::UnknownProjection(name.to_owned())),
        };
        let (reply, receiver) = tokio::sync::oneshot::channel();
        let previous = handle
            .moves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(MoveRequest { positions, reply });
        // A request not yet carried out is answered by the newer one.
        if let Some(previous) = previous {
            let _ = previous.reply.send(Err(QueryError::Unavailable(
                "a newer request to move this policy's position replaced this one".to_owned(),
            )));
        }
        handle.wake.notify_one();
        Ok(receiver)
    }

    /// Every projection's state, positions, lag and quarantined events (at most
    /// `max_quarantined` each). Blocking (reads the quarantine from disk).
    pub fn report(&self, max_quarantined: usize) -> Result<Vec<ProjectionReport>, QueryError> {
        let mut out = Vec::new();
        for handle in self.projections.values() {
            let status = handle.status().clone();
            let positions = handle.positions.borrow().clone();
            let mut partitions = Vec::new();
            for ((topic, partition), next) in positions {
                let end = self.log.end_offset(&topic, partition).unwrap_or(next);
                partitions.push((topic, partition, next, end.saturating_sub(next)));
            }
            let (generation, quarantined) = if handle.kind == "search" {
                // A search index only copies view documents: the view
                // quarantines what cannot be applied.
                (self.store.search_generation(&handle.name)?, Vec::new())
            } else {
                match self.store.live_cached(&handle.name) {
                    Some(live) => (live.number, live.quarantined(max_quarantined)?),
                    None => (0, Vec::new()),
                }
            };
            out.push(ProjectionReport {
                name: handle.name.clone(),
                kind: handle.kind,
                generation,
                state: status.state,
                error: status.error,
                partitions,
                events_total: status.events_total,
                events_per_sec: status.events_per_sec,
                quarantine_count: status.quarantined,
                quarantined,
                rebuild: status.rebuild,
            });
        }
        Ok(out)
    }
}
