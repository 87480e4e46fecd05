//! Startup, the runtimes, and orderly shutdown of a whole daemon.
//!
//! Three tokio runtimes run in one process: a small one for HTTP connections
//! and housekeeping, the command runtime (the write side) and the query
//! runtime (the read side), each sized from the configuration, so that load
//! on one side cannot starve the other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::command::{CommandSide, CommandSideParts};
use crate::config::{Config, LogBackend};
use crate::domain::Domain;
use crate::health::Health;
use crate::http::edge::{Edge, EdgeOptions};
use crate::http::{self, ApiRoutes, HttpServer, RequestLimits, Runtimes, ServerOptions};
use crate::kafka::KafkaSettings;
use crate::log::{EventLog, LogError};
use crate::node::Side;
use crate::projection::{PoolOptions, ProjectionPool};
use crate::security::LiveSettings;
use crate::store::EmbeddedSettings;
use crate::store::ViewStore;
use crate::store::{CommandStore, HistoryStore};

/// How often idle rate-limit buckets (full again) are forgotten.
const RATE_LIMIT_HOUSEKEEPING: Duration = Duration::from_secs(60);

/// How long runtimes get to finish their tasks once everything else stopped.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Builds extra routes once the runtimes exist (tests use it to probe the
/// dispatch machinery with handlers of their own).
pub type RoutesHook = Box<dyn FnOnce(&Runtimes) -> ApiRoutes + Send>;

/// Options of [`Daemon::start`] that are not configuration.
#[derive(Default)]
pub struct StartOptions {
    /// Install SIGTERM/SIGINT handlers, and SIGHUP to reload (the binary
    /// does; in-process tests don't).
    pub handle_signals: bool,
    /// The configuration file, re-read on SIGHUP for `[auth]`, `[tls]` and
    /// `[rate_limit]`.
    pub config_path: Option<std::path::PathBuf>,
    pub extra_routes: Option<RoutesHook>,
}

/// A started daemon: listening, with its tasks running.
pub struct Daemon {
    io: Runtime,
    command: Runtime,
    query: Runtime,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    server: Option<HttpServer>,
    local_addr: SocketAddr,
    health: Health,
    log: EventLog,
    domain: Arc<Domain>,
    components_stop: CancellationToken,
    projections: Option<ProjectionPool>,
    /// With `[node] ownership = "group"` on a command node: its membership
    /// in the command-owners group, left at shutdown.
    membership: Option<crate::kafka::Membership>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

fn runtime(name: &str, threads: usize) -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(format!("cqrsd-{name}"))
        .enable_all()
        .build()
        .with_context(|| format!("cannot start the {name} runtime"))
}

impl Daemon {
    /// Starts everything and returns once the listener is bound. Readiness
    /// comes later, when every component reports ready.
    pub fn start(config: Config, options: StartOptions) -> anyhow::Result<Daemon> {
        let io = runtime("http", config.http.threads)?;
        let command = runtime("command", config.command.threads)?;
        let query = runtime("query", config.query.threads)?;
        let runtimes = Runtimes {
            command: command.handle().clone(),
            query: query.handle().clone(),
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let health = Health::new();
        let settings = LiveSettings::new(&config, options.config_path.clone())
            .context("cannot apply the [auth], [tls] or [rate_limit] settings")?;
        if options.handle_signals {
            // Installed before anything else, so a signal that arrives during
            // startup is a clean shutdown rather than the default termination.
            let _entered = io.enter();
            let signals = Signals::install().context("cannot install signal handlers")?;
            tracker.spawn_on(
                wait_for_signal(signals, settings.clone(), shutdown.clone()),
                io.handle(),
            );
        }
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        tracker.spawn_on(
            settings
                .clone()
                .forget_idle_keys(RATE_LIMIT_HOUSEKEEPING, shutdown.clone()),
            io.handle(),
        );

        let data_dir = &config.storage.data_dir;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
        let domain = load_domain(&config)?;
        match config.domain_path() {
            Some(path) => tracing::info!(path = %path.display(), "domain loaded"),
            None => tracing::info!(
                "no [domain] path configured: serving the built-in example domain (bank accounts)"
            ),
        }

        let group = config.node.ownership == crate::node::Ownership::Group;
        // With several command nodes the daemon needs the Kafka backend
        // itself: to take partitions, join the group and read the owner map.
        let (log, kafka) = if group {
            let (log, kafka) = open_group_log(&config, &domain)?;
            (log, Some(kafka))
        } else {
            (open_log(&config, &domain)?, None)
        };
        let owner_map = match &kafka {
            Some(kafka) => Some(
                kafka
                    .watch_owner_map(&owner_map_topic(&config))
                    .context("cannot read the owner map")?,
            ),
            None => None,
        };
        let domain = Arc::new(domain);

        let role = config.node.role;
        tracing::info!(%role, peers = config.node.peers.len(), "node role");
        // A command node opens no view store and no search index: its read
        // side is its peers' (DESIGN.md §7).
        check_policies_fit_role(&domain, role).map_err(|message| anyhow::anyhow!(message))?;
        // Policies send through the write side, which starts after the pool:
        // they wait (as for a 503) until it is set below.
        let policy_sender = crate::projection::PolicySender::default();
        let projections = if role.runs(Side::Query) {
            let views = ViewStore::open_with_cache(data_dir, config.storage.view_cache_bytes())
                .with_context(|| {
                    format!(
                        "cannot open the view store in {} (is another cqrsd using it?)",
                        data_dir.display()
                    )
                })?;
            let projections = ProjectionPool::start(
                PoolOptions {
                    workers: config.projections.workers,
                    batch_size: config.projections.batch_size,
                    batch_time: Duration::from_millis(config.projections.batch_max_ms),
                    nice: config.projections.nice,
                    engine: config.projections.engine_settings(),
                    policies: crate::projection::PolicyOptions {
                        retry_min: Duration::from_millis(config.projections.policy_retry_min_ms),
                        retry_max: Duration::from_millis(config.projections.policy_retry_max_ms),
                        sender: policy_sender.clone(),
                    },
                },
                domain.clone(),
                log.clone(),
                views,
                &health,
                &shutdown,
            )
            .context("cannot start the projections")?;
            Some(projections)
        } else {
            None
        };

        let http_ready = health.register("http", "binding the listener");
        // Components stop after the HTTP drain, so in-flight requests can
        // still reach them while it runs.
        let components_stop = CancellationToken::new();
        let mut routes = ApiRoutes {
            domain: Some(domain.clone()),
            ..ApiRoutes::default()
        };
        let owners = owner_map.map(|map| crate::http::edge::OwnerRouting {
            lookup: Arc::new(map),
            partitions: log.partitions(),
            topics: domain
                .aggregates()
                .map(|a| (a.name().to_owned(), log.topic(a.name())))
                .collect(),
            retry_after_secs: config.node.moving_retry_after_secs(),
        });
        let edge = start_edge(&config, io.handle(), &tracker, &shutdown, owners);
        let mut membership = None;
        // A query node has no write side: no command store, no writers, no
        // restore; its commands are forwarded.
        if role.runs(Side::Command) {
            let command_store = match CommandStore::open_with_cache(
                &config.storage.data_dir,
                config.storage.command_cache_bytes(),
            ) {
                Ok(store) => store,
                Err(error) => {
                    stop_projections(projections);
                    return Err(error).context("cannot open the command store");
                }
            };
            let history = match HistoryStore::open(
                &config.storage.data_dir,
                config.storage.history_cache_bytes(),
            ) {
                Ok(store) => store,
                Err(error) => {
                    stop_projections(projections);
                    return Err(error).context("cannot open the history index");
                }
            };
            let commands = CommandSide::start(CommandSideParts {
                domain: domain.clone(),
                log: log.clone(),
                store: command_store,
                history,
                config: &config.command,
                encoding: config.log.encoding,
                runtime: command.handle(),
                stop: components_stop.clone(),
                tracker: &tracker,
                health: &health,
                ownership: kafka.as_ref().map(|_| crate::command::Ownership {
                    retry_after_secs: config.node.moving_retry_after_secs(),
                }),
            });
            if let Some(kafka) = &kafka {
                let takeover = Arc::new(std::sync::Mutex::new(None));
                let handler = Arc::new(GroupOwner {
                    side: commands.clone(),
                    kafka: kafka.clone(),
                    runtime: command.handle().clone(),
                    takeover: takeover.clone(),
                });
                let joined =
                    kafka.join_command_owners(group_settings(&config, &domain, &log), handler);
                match joined {
                    Ok(joined) => {
                        edge.report_ownership(Arc::new(GroupReport {
                            side: commands.clone(),
                            kafka: kafka.clone(),
                            stats: joined.stats(),
                            takeover,
                        }));
                        membership = Some(joined);
                    }
                    Err(error) => {
                        stop_projections(projections);
                        return Err(error).context("cannot join the command-owners group");
                    }
                }
            }
            policy_sender.set(Arc::new(http::commands::PolicyCommands::new(
                commands.clone(),
                command.handle().clone(),
                Duration::from_millis(config.projections.policy_send_timeout_ms),
            )));
            let (command_routes, command_api) = http::commands::routes(commands);
            routes.merge(ApiRoutes {
                command: edge.route_to_owners(command_routes),
                openapi: Some(command_api),
                ..ApiRoutes::default()
            });
        }
        if let Some(projections) = &projections {
            let consistency_timeout = Duration::from_millis(config.query.consistency_timeout_ms);
            let query_side = http::query_routes(projections.read_models(), consistency_timeout);
            routes.merge(query_side);
            routes.merge(ApiRoutes {
                query: http::search::routes(projections.read_models(), consistency_timeout),
                openapi: Some(http::search::openapi()),
                ..ApiRoutes::default()
            });
            let topics = domain
                .aggregates()
                .map(|aggregate| log.topic(aggregate.name()))
                .collect();
            routes.merge(ApiRoutes {
                query: http::stream::routes(log.clone(), domain.clone(), topics, shutdown.clone()),
                openapi: Some(http::stream::openapi()),
                ..ApiRoutes::default()
            });
        }
        routes.merge(edge.routes());
        if let Some(hook) = options.extra_routes {
            routes.merge(hook(&runtimes));
        }
        let router = http::router(
            routes,
            runtimes,
            health.clone(),
            RequestLimits {
                body_limit_bytes: config.http.body_limit_bytes,
                request_timeout: config.request_timeout(),
                max_concurrent_requests: config.http.max_concurrent_requests,
            },
            settings.clone(),
            role,
        );
        let server_options = ServerOptions {
            header_read_timeout: config.header_read_timeout(),
            max_connections: config.http.max_connections,
            drain_timeout: config.drain_timeout(),
        };
        let listen = config.listen_addr();
        let server = io.block_on(async {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let server = HttpServer::start(
                listener,
                router,
                server_options,
                settings.clone(),
                shutdown.clone(),
            )
            .context("cannot start the HTTP server")?;
            anyhow::Ok(server)
        });
        let server = match server {
            Ok(server) => server,
            Err(error) => {
                // The projection workers are already running; stop them before failing.
                stop_projections(projections);
                return Err(error);
            }
        };
        let local_addr = server.local_addr();
        http_ready.ready();
        let security = settings.current();
        tracing::info!(
            %local_addr,
            version = env!("CARGO_PKG_VERSION"),
            tls = security.tls.is_some(),
            auth = security.tokens.is_some(),
            "listening"
        );

        tracker.spawn_on(
            crate::systemd::notify_when_ready(health.clone(), shutdown.clone()),
            io.handle(),
        );
        tracker.spawn_on(crate::systemd::watchdog(shutdown.clone()), io.handle());

        Ok(Daemon {
            io,
            command,
            query,
            shutdown,
            tracker,
            server: Some(server),
            local_addr,
            health,
            log,
            domain,
            components_stop,
            projections,
            membership,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The event log this daemon appends to and projects from.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    pub fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Cancelling this token starts an orderly shutdown, as SIGTERM does.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Blocks until shutdown is requested, then stops accepting, drains
    /// in-flight requests within the configured bound, stops every task and
    /// flushes storage.
    pub fn wait(mut self) -> anyhow::Result<()> {
        let server = self.server.take();
        let shutdown = self.shutdown.clone();
        let tracker = self.tracker.clone();
        let components_stop = self.components_stop.clone();
        let membership = self.membership.take();
        self.io.block_on(async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down");
            crate::systemd::notify_stopping();
            if let Some(server) = server {
                server.stopped().await;
            }
            // Hands this node's partitions over: each is given up (its
            // commands in flight answered, its state checkpointed) and
            // released before the member leaves, so the next owner restores
            // from the log's end at once.
            if let Some(membership) = membership {
                let _ = tokio::task::spawn_blocking(move || membership.leave()).await;
            }
            components_stop.cancel();
            tracker.close();
            if tokio::time::timeout(RUNTIME_SHUTDOWN_GRACE, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!("some background tasks did not stop in time");
            }
        });
        // Workers see the cancelled token and finish their current batch.
        if let Some(projections) = self.projections.take() {
            projections.stop();
        }
        let Daemon {
            io,
            command,
            query,
            log,
            ..
        } = self;
        command.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
        query.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
        io.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
        // Every task that could append is gone: flush what is queued.
        log.close().context("cannot flush the event log")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Stops the projection workers of a daemon whose startup failed after they started.
fn stop_projections(projections: Option<ProjectionPool>) {
    if let Some(projections) = projections {
        projections.stop();
    }
}

/// Starts the edge of this node (DESIGN.md §7): the peers' health checks on
/// the HTTP runtime, and the forwarding of the sides the role does not run.
fn start_edge(
    config: &Config,
    io: &tokio::runtime::Handle,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    owners: Option<crate::http::edge::OwnerRouting>,
) -> Edge {
    let node = &config.node;
    // Validation accepted every URL, so none is dropped here.
    let peers = node
        .peers
        .iter()
        .filter_map(|peer| crate::node::canonical_url(peer).ok())
        .collect();
    let options = EdgeOptions {
        role: node.role,
        // Canonical, as the owner map's URLs are.
        advertise_url: node.canonical_advertise_url(),
        peers,
        connect_timeout: Duration::from_millis(node.connect_timeout_ms),
        response_timeout: Duration::from_millis(node.response_timeout_ms),
        health_interval: Duration::from_millis(node.health_interval_ms),
        body_limit_bytes: config.http.body_limit_bytes,
        owners,
    };
    Edge::start(options, io, tracker, shutdown.clone())
}

/// The owner map's topic, `<topic_prefix>.command-owners.map`.
fn owner_map_topic(config: &Config) -> String {
    format!("{}.command-owners.map", config.log.kafka.topic_prefix)
}

/// The command-owners group, `<topic_prefix>.command-owners`; also the
/// prefix of the owned partitions' transactional ids.
fn owners_group(config: &Config) -> String {
    format!("{}.command-owners", config.log.kafka.topic_prefix)
}

/// A command node's place in the command-owners group.
fn group_settings(config: &Config, domain: &Domain, log: &EventLog) -> crate::kafka::GroupSettings {
    crate::kafka::GroupSettings {
        group_id: owners_group(config),
        topics: domain.aggregates().map(|a| log.topic(a.name())).collect(),
        map_topic: owner_map_topic(config),
        url: config.node.canonical_advertise_url().unwrap_or_default(),
        session_timeout: Duration::from_millis(config.node.session_timeout_ms),
    }
}

/// Opens the Kafka backend for a node of a cluster whose command nodes
/// share the partitions: appends only to partitions taken (fenced by a
/// transactional producer per partition), and the handle the group needs.
fn open_group_log(
    config: &Config,
    domain: &Domain,
) -> anyhow::Result<(EventLog, crate::kafka::KafkaLog)> {
    let mut settings = kafka_settings(&config.log.kafka);
    if config.node.role.runs(Side::Command) {
        settings.transactional_id_prefix = Some(owners_group(config));
    }
    let partitions = settings.partitions;
    let kafka = crate::kafka::KafkaLog::open(settings).context("cannot open the event log")?;
    let log = EventLog::new(
        Arc::new(kafka.clone()),
        config.log.kafka.topic_prefix.clone(),
        partitions,
    );
    ensure_topics(&log, domain)?;
    Ok((log, kafka))
}

/// What a command node does when the group moves partitions: on
/// assignment, fence the previous owner, then restore and serve; on
/// revocation, give the partition up (in-flight commands answered, state
/// checkpointed), then release it. Runs on the group member's thread.
struct GroupOwner {
    side: CommandSide,
    kafka: crate::kafka::KafkaLog,
    runtime: tokio::runtime::Handle,
    /// The last assignment's takeover time, for `/admin/node`.
    takeover: Arc<std::sync::Mutex<Option<Duration>>>,
}

/// A command node's partitions and rebalances, for `/admin/node`.
struct GroupReport {
    side: CommandSide,
    kafka: crate::kafka::KafkaLog,
    stats: Arc<crate::kafka::GroupStats>,
    takeover: Arc<std::sync::Mutex<Option<Duration>>>,
}

impl std::fmt::Debug for GroupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupReport").finish_non_exhaustive()
    }
}

impl crate::node::OwnershipSource for GroupReport {
    fn report(&self) -> crate::node::OwnershipReport {
        use std::sync::atomic::Ordering::Relaxed;
        crate::node::OwnershipReport {
            owned: self
                .side
                .owned()
                .into_iter()
                .map(|(topic, partition)| format!("{topic}:{partition}"))
                .collect(),
            assignments: self.stats.assignments.load(Relaxed),
            revocations: self.stats.revocations.load(Relaxed),
            lost: self.stats.lost.load(Relaxed),
            fenced: self.kafka.fenced_count(),
            last_takeover: *self.takeover.lock().unwrap(),
        }
    }
}

impl crate::kafka::OwnershipHandler for GroupOwner {
    fn assigned(&self, partitions: &[(String, u32)]) -> Vec<(String, u32)> {
        let started = std::time::Instant::now();
        // Fencing is one quick round trip per partition; the restores, each
        // reading its partition to an end the brokers confirm, run together.
        let fenced: Vec<&(String, u32)> = partitions
            .iter()
            .filter(|(topic, partition)| match self.kafka.take_partition(topic, *partition) {
                Ok(_) => true,
                Err(error) => {
                    tracing::error!(topic, partition, %error, "cannot take the partition assigned");
                    false
                }
            })
            .collect();
        let restored = self.runtime.block_on(futures::future::join_all(
            fenced
                .iter()
                .map(|(topic, partition)| self.side.take(topic, *partition)),
        ));
        let mut taken = Vec::new();
        for ((topic, partition), restored) in fenced.into_iter().zip(restored) {
            if let Err(error) = restored {
                tracing::error!(topic, partition, %error, "cannot serve the partition assigned");
                self.kafka.release_partition(topic, *partition);
                continue;
            }
            taken.push((topic.clone(), *partition));
        }
        let took = started.elapsed();
        *self.takeover.lock().unwrap() = Some(took);
        metrics::histogram!("cqrsd_command_owners_takeover_seconds").record(took.as_secs_f64());
        tracing::info!(partitions = ?taken, ?took, "partitions taken over: commands accepted");
        taken
    }

    fn revoked(&self, partitions: &[(String, u32)], _lost: bool) {
        for (topic, partition) in partitions {
            self.runtime.block_on(self.side.give_up(topic, *partition));
            self.kafka.release_partition(topic, *partition);
        }
    }
}

/// Opens the configured event log and creates (or checks) one topic per
/// aggregate type.
fn open_log(config: &Config, domain: &Domain) -> anyhow::Result<EventLog> {
    let log = match config.log.backend {
        LogBackend::Embedded => crate::store::open_embedded(embedded_settings(config)),
        LogBackend::Kafka => crate::kafka::open_event_log(
            kafka_settings(&config.log.kafka),
            config.log.kafka.topic_prefix.clone(),
        ),
    }
    .context("cannot open the event log")?;
    ensure_topics(&log, domain)?;
    Ok(log)
}

/// How long startup keeps trying to create or check the topics while the log
/// answers "unavailable" (a broker that is restarting, or that refused a
/// connection for a moment) before it gives up: a daemon started together
/// with its brokers should wait for them, not exit at the first refusal.
const STARTUP_LOG_WAIT: Duration = Duration::from_secs(30);
/// The pause between two such tries.
const STARTUP_LOG_PAUSE: Duration = Duration::from_millis(500);

/// Creates (or checks) one topic per aggregate type. Blocking.
fn ensure_topics(log: &EventLog, domain: &Domain) -> anyhow::Result<()> {
    for aggregate in domain.aggregates() {
        let topic = log.topic(aggregate.name());
        retry_unavailable(STARTUP_LOG_WAIT, STARTUP_LOG_PAUSE, || {
            log.ensure_topic(&topic)
        })
        .with_context(|| format!("cannot create or check topic {topic}"))?;
    }
    Ok(())
}

/// Runs `attempt` until it succeeds, fails with anything but
/// [`LogError::Unavailable`] (a wrong partition count is final), or `wait`
/// has passed since the first try; then returns its last result. Blocking.
fn retry_unavailable<T>(
    wait: Duration,
    pause: Duration,
    mut attempt: impl FnMut() -> Result<T, LogError>,
) -> Result<T, LogError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match attempt() {
            Err(LogError::Unavailable(reason)) if std::time::Instant::now() + pause < deadline => {
                tracing::warn!(%reason, "the event log is unavailable at startup; trying again");
                std::thread::sleep(pause);
            }
            result => return result,
        }
    }
}

/// The embedded log's settings from `[storage]` and `[log.embedded]` (also
/// used by `cqrsd bench` to pre-fill and scan the log it then serves).
pub fn embedded_settings(config: &Config) -> EmbeddedSettings {
    EmbeddedSettings {
        data_dir: config.storage.data_dir.clone(),
        topic_prefix: config.log.kafka.topic_prefix.clone(),
        partitions: config.log.embedded.partitions,
        group_commit_max_records: config.log.embedded.group_commit_max_records,
        group_commit_max_delay: Duration::from_micros(
            config.log.embedded.group_commit_max_delay_us,
        ),
        fsync: config.log.embedded.fsync,
        segment_bytes: config.log.embedded.segment_bytes,
    }
}

/// The Kafka backend's settings from `[log.kafka]` (also used by `cqrsd
/// bench kafka` for its raw producer, so both produce alike).
pub fn kafka_settings(kafka: &crate::config::KafkaConfig) -> KafkaSettings {
    KafkaSettings {
        brokers: kafka.brokers.clone(),
        partitions: kafka.partitions,
        replication_factor: kafka.replication_factor,
        linger_ms: kafka.linger_ms,
        batch_size: kafka.batch_size,
        produce_timeout: Duration::from_millis(kafka.produce_timeout_ms),
        request_timeout: Duration::from_millis(kafka.request_timeout_ms),
        producer: kafka.producer.clone(),
        consumer: kafka.consumer.clone(),
        // One writer per partition on this node: the idempotent producer.
        transactional_id_prefix: None,
    }
}

/// Rebuilds one projection offline, for `cqrsd projections rebuild`. Opening
/// the log and the view store takes their file locks, so this fails with a
/// clear error while a daemon runs on the same data directory. `progress_bar`
/// makes the bar for the number of records to read.
pub fn rebuild_projection(
    config: &Config,
    name: &str,
    progress_bar: impl FnOnce(u64) -> indicatif::ProgressBar,
) -> anyhow::Result<u64> {
    let domain = Arc::new(load_domain(config)?);
    let data_dir = &config.storage.data_dir;
    let hint = || {
        format!(
            "cannot open the stores in {}; stop the daemon first (a running cqrsd holds their lock)",
            data_dir.display()
        )
    };
    let log = open_log(config, &domain).with_context(hint)?;
    let views = ViewStore::open_with_cache(data_dir, config.storage.view_cache_bytes())
        .with_context(hint)?;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut make = Some(progress_bar);
    let events = crate::projection::rebuild_offline(
        &domain,
        &log,
        &views,
        name,
        config.projections.batch_size,
        &config.projections.engine_settings(),
        |read, total, events| {
            let bar = bar.get_or_insert_with(|| match make.take() {
                Some(make) => make(total),
                None => indicatif::ProgressBar::hidden(),
            });
            bar.set_position(read);
            bar.set_message(format!("{events} events"));
        },
    )?;
    if let Some(bar) = bar {
        bar.finish();
    }
    views.flush()?;
    log.close()?;
    Ok(events)
}

/// Loads and compiles the configured domain; every problem is reported at
/// once, here at startup, never at the first request.
/// Policies run on the read side and send through the local write side, so
/// they need a node that runs both (`all`); a command node runs no read
/// side and so no policies. A query node would have to send its policies'
/// commands over the edge, which is not built: refused here, with a clear
/// message, by `cqrsd check` and at startup.
pub fn check_policies_fit_role(domain: &Domain, role: crate::node::Role) -> Result<(), String> {
    let policies: Vec<&str> = domain.policies().map(|p| p.name()).collect();
    if !policies.is_empty() && role.runs(Side::Query) && !role.runs(Side::Command) {
        return Err(format!(
            "the domain declares policies ({}), which send commands through this node's own write side; a node with [node] role = \"{role}\" has none. Run the policies on a node with role \"all\"",
            policies.join(", ")
        ));
    }
    Ok(())
}

pub fn load_domain(config: &Config) -> anyhow::Result<Domain> {
    let source = config.domain_source()?;
    Domain::from_toml_str(&source)
        .map_err(|errors| anyhow::anyhow!("invalid domain file:\n{errors}"))
}

/// SIGTERM, SIGINT and SIGHUP handlers, installed at startup.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Turns SIGTERM or SIGINT into a cancellation of the daemon's root token,
/// and SIGHUP into a reload of the live settings.
async fn wait_for_signal(
    mut signals: Signals,
    settings: LiveSettings,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = signals.term.recv() => tracing::info!("SIGTERM received"),
            _ = signals.int.recv() => tracing::info!("SIGINT received"),
            _ = signals.hup.recv() => {
                reload(&settings).await;
                continue;
            }
            () = shutdown.cancelled() => return,
        }
        shutdown.cancel();
        return;
    }
}

/// Applies a SIGHUP: reads the files off the async workers, and logs what
/// happened, including a rejected reload (the old settings stay).
async fn reload(settings: &LiveSettings) {
    tracing::info!("SIGHUP received: reloading [auth], [tls] and [rate_limit]");
    let handle = settings.clone();
    match tokio::task::spawn_blocking(move || handle.reload()).await {
        Ok(Ok(ignored)) => {
            if !ignored.is_empty() {
                tracing::warn!(
                    sections = ?ignored,
                    "these sections changed but only take effect after a restart"
                );
            }
            let security = settings.current();
            tracing::info!(
                tokens = security.tokens.as_ref().map_or(0, crate::auth::Tokens::len),
                tls = security.tls.is_some(),
                rate_limit = security.rate_limit.is_some(),
                "configuration reloaded"
            );
        }
        Ok(Err(error)) => {
            tracing::error!("configuration not reloaded, the previous settings stay: {error}");
        }
        Err(error) => tracing::error!(%error, "the reload task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_tries_an_unavailable_log_again_and_stops_at_other_errors() {
        let pause = Duration::from_millis(1);
        // Unavailable twice, then there: the third try's answer.
        let mut tries = 0;
        let result = retry_unavailable(Duration::from_secs(10), pause, || {
            tries += 1;
            if tries < 3 {
                Err(LogError::Unavailable("brokers down".into()))
            } else {
                Ok(tries)
            }
        });
        assert_eq!(result.unwrap(), 3);
        // Any other error is final at once.
        let mut tries = 0;
        let result: Result<(), _> = retry_unavailable(Duration::from_secs(10), pause, || {
            tries += 1;
            Err(LogError::Invalid("4 partitions, not 8".into()))
        });
        assert!(matches!(result, Err(LogError::Invalid(_))));
        assert_eq!(tries, 1);
        // An unavailable log is given up on once the wait has passed.
        let started = std::time::Instant::now();
        let result: Result<(), _> = retry_unavailable(Duration::from_millis(50), pause, || {
            Err(LogError::Unavailable("brokers down".into()))
        });
        assert!(matches!(result, Err(LogError::Unavailable(_))));
        assert!(started.elapsed() >= Duration::from_millis(40));
    }
}
