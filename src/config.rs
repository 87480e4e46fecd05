//! Daemon configuration: a TOML file layered under `CQRSD__SECTION__KEY`
//! environment overrides, with a default for every key.
//!
//! Loading never stops at the first problem: unknown keys and invalid values
//! are all collected, each naming its key, so `cqrsd check` can list every
//! mistake in one run.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The prefix of environment overrides: `CQRSD__HTTP__LISTEN` sets `[http] listen`.
pub const ENV_PREFIX: &str = "CQRSD";
/// The separator between the prefix, the section and the key in environment overrides.
pub const ENV_SEPARATOR: &str = "__";

/// The whole configuration of one daemon.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    pub http: HttpConfig,
    pub storage: StorageConfig,
    pub domain: DomainConfig,
    pub log: LogConfig,
    pub command: CommandConfig,
    pub query: QueryConfig,
    pub projections: ProjectionsConfig,
    pub logging: LoggingConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub rate_limit: RateLimitConfig,
    pub node: NodeConfig,
    /// The directory the configuration file lives in; relative `[domain] path`
    /// values are resolved against it. Not a configuration key.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// `[http]`: the one listener that serves the whole API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct HttpConfig {
    pub listen: String,
    /// Threads of the runtime that accepts connections and parses HTTP; the
    /// handlers themselves run on the command or query runtime.
    pub threads: usize,
    /// Time a client has to send a complete request head (defeats slowloris).
    pub header_read_timeout_ms: u64,
    /// Time a handler may take before the request is answered 503.
    pub request_timeout_ms: u64,
    /// Largest accepted request body; larger bodies are answered 413.
    pub body_limit_bytes: usize,
    /// Requests handled at once; more are answered 503 instead of queueing without bound.
    pub max_concurrent_requests: usize,
    /// Open connections at once; further connections wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests before closing connections.
    pub drain_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            threads: 1,
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 30_000,
            body_limit_bytes: 1024 * 1024,
            max_concurrent_requests: 1024,
            max_connections: 4096,
            drain_timeout_ms: 10_000,
        }
    }
}

/// `[storage]`: where the embedded stores keep their files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StorageConfig {
    /// Relative paths are resolved against the working directory.
    pub data_dir: PathBuf,
    /// Block cache of the command store (snapshots, idempotency answers), MiB.
    pub command_cache_mib: u64,
    /// Block cache of the view store (views, aggregations, positions), MiB.
    pub view_cache_mib: u64,
    /// sled page cache of the history index, MiB.
    pub history_cache_mib: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./cqrsd-data"),
            command_cache_mib: crate::store::COMMAND_STORE_CACHE_BYTES >> 20,
            view_cache_mib: crate::store::VIEW_STORE_CACHE_BYTES >> 20,
            history_cache_mib: crate::store::HISTORY_CACHE_BYTES >> 20,
        }
    }
}

impl StorageConfig {
    /// The block cache of the command store, in bytes.
    pub fn command_cache_bytes(&self) -> u64 {
        self.command_cache_mib.saturating_mul(1 << 20)
    }

    /// The block cache of the view store, in bytes.
    pub fn view_cache_bytes(&self) -> u64 {
        self.view_cache_mib.saturating_mul(1 << 20)
    }

    /// The sled page cache of the history index, in bytes.
    pub fn history_cache_bytes(&self) -> u64 {
        self.history_cache_mib.saturating_mul(1 << 20)
    }
}

/// `[domain]`: the domain file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DomainConfig {
    /// Relative to the configuration file. Absent: the built-in bank example.
    pub path: Option<PathBuf>,
}

/// Which event log backs the daemon.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    #[default]
    Embedded,
    Kafka,
}

/// How event payloads are encoded in log records.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    #[default]
    Msgpack,
    Json,
}

/// `[log]`: the event log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LogConfig {
    pub backend: LogBackend,
    pub encoding: PayloadEncoding,
    pub embedded: EmbeddedLogConfig,
    pub kafka: KafkaConfig,
}

/// `[log.embedded]`: the segment-file log used when no Kafka is configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct EmbeddedLogConfig {
    /// Partitions per aggregate type, as Kafka partitions are per topic.
    pub partitions: u32,
    /// Most records made durable by one flush (group commit).
    pub group_commit_max_records: usize,
    /// Extra time the committer waits to gather a larger batch; 0 flushes as soon as it can.
    pub group_commit_max_delay_us: u64,
    /// Whether appends are flushed and `fdatasync`ed before they are acknowledged.
    /// Turning it off loses acknowledged commands on power loss; only for throwaway data.
    pub fsync: bool,
    /// A partition's segment file is rolled once the next group commit would take it
    /// past this size.
    pub segment_bytes: u64,
}

/// Bounds of `[log.embedded] segment_bytes`: below 64 KiB a partition would roll on
/// nearly every group commit; above 1 GiB a segment's tail scan and its preallocation
/// stop being small.
const MIN_SEGMENT_BYTES: u64 = 64 << 10;
const MAX_SEGMENT_BYTES: u64 = 1 << 30;

impl Default for EmbeddedLogConfig {
    fn default() -> Self {
        Self {
            partitions: 8,
            group_commit_max_records: 4096,
            group_commit_max_delay_us: 0,
            fsync: true,
            segment_bytes: 64 << 20,
        }
    }
}

/// `[log.kafka]`: the Kafka cluster, used when `backend = "kafka"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct KafkaConfig {
    pub brokers: String,
    /// Topics are named `<topic_prefix>.<aggregate>`; the embedded log uses the same names.
    pub topic_prefix: String,
    pub partitions: u32,
    /// Replication factor of topics cqrsd creates (existing topics are only checked).
    pub replication_factor: i32,
    /// How long the producer waits to fill a batch (librdkafka `linger.ms`).
    pub linger_ms: u64,
    /// Largest producer batch in bytes (librdkafka `batch.size`).
    pub batch_size: u64,
    /// Bound on one append: a record not acknowledged by the brokers within it
    /// fails the append and its commands answer 503 (librdkafka `message.timeout.ms`).
    pub produce_timeout_ms: u64,
    /// Bound on one read, end-offset or metadata request.
    pub request_timeout_ms: u64,
    /// Passed to librdkafka's producer as they are (e.g. SASL or TLS settings).
    pub producer: BTreeMap<String, String>,
    /// Passed to librdkafka's consumers as they are.
    pub consumer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            topic_prefix: "cqrsd".to_owned(),
            partitions: 8,
            replication_factor: 1,
            linger_ms: 1,
            batch_size: 1_000_000,
            produce_timeout_ms: 10_000,
            request_timeout_ms: 10_000,
            producer: BTreeMap::new(),
            consumer: BTreeMap::new(),
        }
    }
}

/// `[command]`: the write side's runtime and limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CommandConfig {
    pub threads: usize,
    /// Aggregates kept in memory across all partitions.
    pub cache_capacity: usize,
    /// Commands waiting per partition writer before new ones are answered 503.
    pub queue_depth: usize,
    /// Most commands one partition writer decides and appends in one batch.
    pub max_batch: usize,
    /// How long an `Idempotency-Key` answer is remembered.
    pub idempotency_ttl_secs: u64,
    /// Records appended to a partition between two snapshot checkpoints.
    pub snapshot_every: u64,
    /// Longest wait of a history read (`GET /aggregates/{a}/{id}/events`) for
    /// the history index to reach the log's end before it is answered 503.
    pub history_wait_ms: u64,
}

impl Default for CommandConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            cache_capacity: 100_000,
            queue_depth: 4096,
            max_batch: 512,
            idempotency_ttl_secs: 24 * 60 * 60,
            snapshot_every: 1000,
            history_wait_ms: 5_000,
        }
    }
}

/// `[query]`: the read side's runtime and limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct QueryConfig {
    pub threads: usize,
    /// Longest wait of a `consistent_with` query before it is answered 504.
    pub consistency_timeout_ms: u64,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            consistency_timeout_ms: 5_000,
        }
    }
}

/// `[projections]`: the pool that keeps read models up to date.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ProjectionsConfig {
    /// Worker threads; each owns some projections and reads their sources
    /// once for all of them. Default: the number of cores.
    pub workers: usize,
    /// Most events applied and committed in one atomic write.
    pub batch_size: usize,
    /// How often, at most, a search index commits (tantivy commits are costly:
    /// they fsync and start new segments); changes become visible to searches
    /// at the next commit. 0 commits after every batch.
    pub search_commit_interval_ms: u64,
    /// The nice value of the projection threads (0 to 19): higher runs them
    /// after the command and query threads when the cores are busy.
    pub nice: i32,
    /// Longest a batch keeps growing (reading more of the log) before it is
    /// applied and committed, in milliseconds.
    pub batch_max_ms: u64,
    /// MiB of documents and aggregation groups that views and aggregations
    /// keep in memory in front of the view store, and of documents on their
    /// way from a view to its search indexes, all together (0 keeps none).
    pub cache_mib: usize,
    /// MiB a search index's writer buffers before it writes a segment.
    pub search_writer_mib: usize,
    /// Indexing threads of each search index's writer.
    pub search_writer_threads: usize,
    /// The first wait, in milliseconds, before a policy sends again a
    /// command the write side could not take (503, a full queue, a timeout);
    /// each further try waits twice as long, up to `policy_retry_max_ms`.
    pub policy_retry_min_ms: u64,
    /// The longest wait between two tries of a policy's command.
    pub policy_retry_max_ms: u64,
    /// Longest a policy waits for the answer to one command before it
    /// counts as a timeout (and is sent again, with the same key).
    pub policy_send_timeout_ms: u64,
}

impl ProjectionsConfig {
    /// The storage settings of the projection pool.
    pub fn engine_settings(&self) -> crate::projection::EngineSettings {
        crate::projection::EngineSettings {
            search_commit_interval: std::time::Duration::from_millis(
                self.search_commit_interval_ms,
            ),
            cache_bytes: self.cache_mib.saturating_mul(1 << 20),
            search_writer_bytes: self.search_writer_mib.saturating_mul(1 << 20),
            search_writer_threads: self.search_writer_threads,
        }
    }
}

impl Default for ProjectionsConfig {
    fn default() -> Self {
        Self {
            workers: default_projection_workers(),
            batch_size: 10_000,
            search_commit_interval_ms: 500,
            nice: 10,
            batch_max_ms: 100,
            cache_mib: 64,
            search_writer_mib: 64,
            search_writer_threads: 1,
            policy_retry_min_ms: 100,
            policy_retry_max_ms: 10_000,
            policy_send_timeout_ms: 10_000,
        }
    }
}

/// One projection worker per core: projections are spread over them, and
/// their threads run at `[projections] nice`, so they use idle cores without
/// taking them from the threads that answer clients.
pub fn default_projection_workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Output format of the daemon's own log lines.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[logging]`: the daemon's diagnostic output (not the event log).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LoggingConfig {
    /// A `tracing` filter such as `info` or `cqrsd=debug,tower_http=info`; `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// `[auth]`: bearer tokens and what each may do. Reloaded on SIGHUP.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AuthConfig {
    /// Serve a non-loopback listener without tokens (everyone may do
    /// everything). Without it, such a configuration is refused.
    pub allow_unauthenticated: bool,
    /// Serve `/metrics` without a token; otherwise it needs the `admin` role.
    pub metrics_public: bool,
    pub tokens: Vec<TokenConfig>,
}

/// One `[[auth.tokens]]` entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TokenConfig {
    /// Names the token in logs and in the `principal` of the events it causes.
    pub name: String,
    /// `sha256:<hex>`, as printed by `cqrsd token hash`.
    pub hash: String,
    pub roles: Vec<crate::auth::Role>,
    /// The aggregate types it may touch; absent: all.
    pub aggregates: Option<Vec<String>>,
    /// The projections (views, aggregations, searches) it may touch; absent: all.
    pub projections: Option<Vec<String>>,
}

/// `[tls]`: serve HTTPS. Both paths or neither; reloaded on SIGHUP.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first; relative to the configuration file.
    pub cert_path: Option<PathBuf>,
    /// PEM private key; relative to the configuration file.
    pub key_path: Option<PathBuf>,
}

/// `[rate_limit]`: requests per token (per client address without auth).
/// Reloaded on SIGHUP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RateLimitConfig {
    /// Sustained rate; fractions allowed (0.5 = one request every 2 s). 0 turns limiting off.
    pub requests_per_second: f64,
    /// Requests allowed at once above the sustained rate.
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 0.0,
            burst: 100,
        }
    }
}

/// `[node]`: this process's role among several nodes on one Kafka cluster
/// (DESIGN.md §7), and the peers it forwards what it does not run to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeConfig {
    /// `all` (the single process), `command` (write side only) or `query`
    /// (read side only).
    pub role: crate::node::Role,
    /// How other nodes reach this one (`http://host:port`); shown by
    /// `GET /admin/node`, and no peer may name it.
    pub advertise_url: Option<String>,
    /// The other nodes (`http://host:port`) requests for a side this node
    /// does not run are forwarded to.
    pub peers: Vec<String>,
    /// Bound on opening a connection to a peer.
    pub connect_timeout_ms: u64,
    /// Bound on a peer's answer to a forwarded request (its status and
    /// headers; a streamed body then flows for as long as it lasts).
    pub response_timeout_ms: u64,
    /// How often each peer's `/readyz` is asked for its health and role.
    pub health_interval_ms: u64,
    /// `none` (one node runs the write side) or `group` (several command
    /// nodes share the partitions; set on every node of such a cluster).
    pub ownership: crate::node::Ownership,
    /// The command-owners group's session timeout: how long a silent
    /// command node keeps its partitions before they move.
    pub session_timeout_ms: u64,
    /// The `Retry-After` (rounded up to seconds) of a command whose
    /// partition has no owner here, or is moving.
    pub moving_retry_after_ms: u64,
}

impl NodeConfig {
    /// The `Retry-After`, in whole seconds (at least one), of a command
    /// whose partition has no owner here or is moving.
    pub fn moving_retry_after_secs(&self) -> u64 {
        self.moving_retry_after_ms.div_ceil(1000).max(1)
    }

    /// `advertise_url` in canonical form, as the owner map and peers
    /// compare URLs (validation accepted it, so it is kept as written only
    /// if it somehow does not parse).
    pub fn canonical_advertise_url(&self) -> Option<String> {
        self.advertise_url
            .as_ref()
            .map(|url| crate::node::canonical_url(url).unwrap_or_else(|_| url.clone()))
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            role: crate::node::Role::All,
            advertise_url: None,
            peers: Vec::new(),
            connect_timeout_ms: 1_000,
            response_timeout_ms: 10_000,
            health_interval_ms: 1_000,
            ownership: crate::node::Ownership::None,
            session_timeout_ms: 10_000,
            moving_retry_after_ms: 1_000,
        }
    }
}

/// The longest `[node]` timeout or interval accepted (ten minutes).
const MAX_NODE_MILLIS: u64 = 600_000;

/// The highest sustained rate accepted: beyond it the refill period would
/// be below governor's nanosecond resolution.
const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;

/// One thing wrong with a configuration, named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The dotted key, e.g. `http.listen`, or the file for problems of the file itself.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Every problem found while loading a configuration.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn single(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            problems: vec![ConfigProblem {
                key: key.into(),
                reason: reason.into(),
            }],
        }
    }
}

impl Config {
    /// Loads the configuration from an optional file and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, None)
    }

    /// Loads the configuration with an explicit environment instead of the
    /// process's (tests use this to avoid mutating global state).
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::single(
                    path.display().to_string(),
                    "the configuration file does not exist or is not a file",
                ));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let mut environment = config::Environment::with_prefix(ENV_PREFIX)
            .separator(ENV_SEPARATOR)
            .try_parsing(true)
            .ignore_empty(true);
        if let Some(env) = env {
            environment = environment.source(Some(env.into_iter().collect()));
        }
        let merged = builder.add_source(environment).build().map_err(|error| {
            ConfigError::single(
                file.map_or_else(|| "environment".to_owned(), |p| p.display().to_string()),
                error.to_string(),
            )
        })?;

        // Unknown keys are collected rather than rejected one by one, so that
        // a file with several typos is reported in one run.
        let mut unknown = Vec::new();
        let parsed: Result<Config, _> =
            serde_ignored::deserialize(merged, |path| unknown.push(path.to_string()));
        let mut config = parsed.map_err(|error| {
            ConfigError::single(config_key_of(&error.to_string()), error.to_string())
        })?;
        config.base_dir = file.and_then(Path::parent).map(Path::to_path_buf);

        let mut problems: Vec<ConfigProblem> = unknown
            .into_iter()
            .map(|key| ConfigProblem {
                key,
                reason: "unknown key".to_owned(),
            })
            .collect();
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Checks every value against its allowed range and returns every problem.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, reason: String| {
            problems.push(ConfigProblem {
                key: key.to_owned(),
                reason,
            });
        };
        if let Err(error) = self.http.listen.parse::<SocketAddr>() {
            problem(
                "http.listen",
                format!(
                    "`{}` is not an IP address and port ({error})",
                    self.http.listen
                ),
            );
        }
        // Beyond an hour, changes would hardly ever become searchable; the
        // bound also keeps deadline arithmetic far from overflowing.
        if self.projections.search_commit_interval_ms > 3_600_000 {
            problem(
                "projections.search_commit_interval_ms",
                format!(
                    "{} ms is more than the limit of 3600000 (one hour)",
                    self.projections.search_commit_interval_ms
                ),
            );
        }
        // A batch's commit is what queries wait for: beyond a minute, reads
        // with consistent_with would time out behind it.
        if self.projections.batch_max_ms > 60_000 {
            problem(
                "projections.batch_max_ms",
                format!(
                    "{} ms is more than the limit of 60000 (one minute)",
                    self.projections.batch_max_ms
                ),
            );
        }
        // A policy's backoff doubles from its minimum to its maximum; zero
        // would retry in a busy loop, and beyond ten minutes the lag of a
        // waiting policy would look like a stall.
        let (retry_min, retry_max) = (
            self.projections.policy_retry_min_ms,
            self.projections.policy_retry_max_ms,
        );
        if !(1..=600_000).contains(&retry_min) {
            problem(
                "projections.policy_retry_min_ms",
                format!("{retry_min} ms is not from 1 to 600000"),
            );
        } else if !(retry_min..=600_000).contains(&retry_max) {
            problem(
                "projections.policy_retry_max_ms",
                format!("{retry_max} ms is not from policy_retry_min_ms ({retry_min}) to 600000"),
            );
        }
        if !(1..=600_000).contains(&self.projections.policy_send_timeout_ms) {
            problem(
                "projections.policy_send_timeout_ms",
                format!(
                    "{} ms is not from 1 to 600000",
                    self.projections.policy_send_timeout_ms
                ),
            );
        }
        // Decoded batches are held in memory whole.
        if self.projections.batch_size > 1_000_000 {
            problem(
                "projections.batch_size",
                format!(
                    "{} events is more than the limit of 1000000",
                    self.projections.batch_size
                ),
            );
        }
        // The working sets are meant to stay well inside the machine's memory;
        // beyond 64 GiB a typo is likelier than a wish.
        if self.projections.cache_mib > 65_536 {
            problem(
                "projections.cache_mib",
                format!(
                    "{} MiB is more than the limit of 65536",
                    self.projections.cache_mib
                ),
            );
        }
        // tantivy needs at least 15 MB per indexing thread and less than 4 GB
        // in all; thread counts beyond the cores only oversubscribe them.
        let (writer_mib, writer_threads) = (
            self.projections.search_writer_mib,
            self.projections.search_writer_threads,
        );
        if !(1..=64).contains(&writer_threads) {
            problem(
                "projections.search_writer_threads",
                format!("{writer_threads} is not from 1 to 64"),
            );
        } else if writer_mib.saturating_mul(1 << 20)
            < crate::store::search::WRITER_MEMORY_PER_THREAD_MIN.saturating_mul(writer_threads)
        {
            problem(
                "projections.search_writer_mib",
                format!(
                    "{writer_mib} MiB is less than the 15 MB per writer thread tantivy needs ({writer_threads} threads)"
                ),
            );
        }
        if writer_mib >= 4096 {
            problem(
                "projections.search_writer_mib",
                format!("{writer_mib} MiB is not less than tantivy's limit of 4096"),
            );
        }
        // Negative values would need CAP_SYS_NICE and would put projections
        // ahead of commands, the opposite of what the setting is for.
        if !(0..=19).contains(&self.projections.nice) {
            problem(
                "projections.nice",
                format!(
                    "{} is not a nice value from 0 (normal priority) to 19 (lowest)",
                    self.projections.nice
                ),
            );
        }
        for (key, value) in [
            ("http.threads", self.http.threads),
            ("command.threads", self.command.threads),
            ("query.threads", self.query.threads),
            ("projections.workers", self.projections.workers),
        ] {
            if value == 0 {
                problem(key, "must be at least 1".to_owned());
            } else if value > 1024 {
                problem(
                    key,
                    format!("{value} threads is more than the limit of 1024"),
                );
            }
        }
        for (key, value) in [
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            ("http.request_timeout_ms", self.http.request_timeout_ms),
            ("http.drain_timeout_ms", self.http.drain_timeout_ms),
            (
                "query.consistency_timeout_ms",
                self.query.consistency_timeout_ms,
            ),
            (
                "command.idempotency_ttl_secs",
                self.command.idempotency_ttl_secs,
            ),
            ("command.snapshot_every", self.command.snapshot_every),
            ("command.history_wait_ms", self.command.history_wait_ms),
        ] {
            if value == 0 {
                problem(key, "must be greater than 0".to_owned());
            }
        }
        for (key, value) in [
            ("http.body_limit_bytes", self.http.body_limit_bytes),
            (
                "http.max_concurrent_requests",
                self.http.max_concurrent_requests,
            ),
            ("http.max_connections", self.http.max_connections),
            ("command.cache_capacity", self.command.cache_capacity),
            ("command.queue_depth", self.command.queue_depth),
            ("command.max_batch", self.command.max_batch),
            ("projections.batch_size", self.projections.batch_size),
            (
                "log.embedded.group_commit_max_records",
                self.log.embedded.group_commit_max_records,
            ),
        ] {
            if value == 0 {
                problem(key, "must be greater than 0".to_owned());
            }
        }
        for (key, value) in [
            ("storage.command_cache_mib", self.storage.command_cache_mib),
            ("storage.view_cache_mib", self.storage.view_cache_mib),
            ("storage.history_cache_mib", self.storage.history_cache_mib),
        ] {
            if !(1..=1 << 20).contains(&value) {
                problem(key, format!("{value} MiB: must be between 1 and 1048576"));
            }
        }
        for (key, value) in [
            ("log.embedded.partitions", self.log.embedded.partitions),
            ("log.kafka.partitions", self.log.kafka.partitions),
        ] {
            if !(1..=1024).contains(&value) {
                problem(
                    key,
                    format!("{value} partitions: must be between 1 and 1024"),
                );
            }
        }
        let segment_bytes = self.log.embedded.segment_bytes;
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&segment_bytes) {
            problem(
                "log.embedded.segment_bytes",
                format!(
                    "{segment_bytes}: must be between {MIN_SEGMENT_BYTES} (64 KiB) and \
                     {MAX_SEGMENT_BYTES} (1 GiB)"
                ),
            );
        }
        let prefix = &self.log.kafka.topic_prefix;
        if prefix.is_empty()
            || prefix.len() > 200
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            problem(
                "log.kafka.topic_prefix",
                format!("`{prefix}` must be 1 to 200 characters of A-Z, a-z, 0-9, '.', '_', '-'"),
            );
        }
        if self.log.backend == LogBackend::Kafka {
            if self.log.kafka.brokers.trim().is_empty() {
                problem(
                    "log.kafka.brokers",
                    "must name at least one broker".to_owned(),
                );
            }
            let kafka = &self.log.kafka;
            if kafka.replication_factor < 1 {
                problem(
                    "log.kafka.replication_factor",
                    "must be at least 1".to_owned(),
                );
            }
            for (key, value) in [
                ("log.kafka.batch_size", kafka.batch_size),
                ("log.kafka.produce_timeout_ms", kafka.produce_timeout_ms),
                ("log.kafka.request_timeout_ms", kafka.request_timeout_ms),
            ] {
                if value == 0 {
                    problem(key, "must be greater than 0".to_owned());
                }
            }
            if kafka.linger_ms >= kafka.produce_timeout_ms {
                problem(
                    "log.kafka.linger_ms",
                    "must be less than log.kafka.produce_timeout_ms".to_owned(),
                );
            }
            for key in crate::kafka::ENFORCED_PRODUCER_KEYS {
                if kafka.producer.contains_key(*key) {
                    problem(
                        &format!("log.kafka.producer.{key}"),
                        "is set by cqrsd (its guarantees depend on it) and cannot be overridden"
                            .to_owned(),
                    );
                }
            }
            for key in crate::kafka::ENFORCED_CONSUMER_KEYS {
                if kafka.consumer.contains_key(*key) {
                    problem(
                        &format!("log.kafka.consumer.{key}"),
                        "is set by cqrsd and cannot be overridden".to_owned(),
                    );
                }
            }
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.logging.level) {
            problem(
                "logging.level",
                format!("`{}` is not a valid filter: {error}", self.logging.level),
            );
        }
        self.validate_auth(&mut problem);
        self.validate_node(&mut problem);
        let rate = &self.rate_limit;
        if !rate.requests_per_second.is_finite()
            || !(0.0..=MAX_REQUESTS_PER_SECOND).contains(&rate.requests_per_second)
        {
            problem(
                "rate_limit.requests_per_second",
                format!(
                    "{} must be between 0 (off) and {MAX_REQUESTS_PER_SECOND}",
                    rate.requests_per_second
                ),
            );
        }
        if rate.burst == 0 {
            problem("rate_limit.burst", "must be at least 1".to_owned());
        }
        match self.tls_paths() {
            Ok(None) => {}
            Ok(Some((cert, key))) => {
                if let Err(error) = crate::tls::server_config(&cert, &key) {
                    let key_name = match error {
                        crate::tls::TlsError::Key { .. } => "tls.key_path",
                        _ => "tls.cert_path",
                    };
                    problem(key_name, error.to_string());
                }
            }
            Err((key, reason)) => problem(key, reason),
        }
        if let Err(reason) = check_dir_creatable(&self.storage.data_dir) {
            problem("storage.data_dir", reason);
        }
        if let Some(path) = self.domain_path()
            && !path.is_file()
        {
            problem(
                "domain.path",
                format!("{} does not exist or is not a file", path.display()),
            );
        }
        problems
    }

    /// Problems of `[auth]`: each token's fields, duplicates, and a
    /// non-loopback listener left open without saying so.
    fn validate_auth(&self, problem: &mut impl FnMut(&str, String)) {
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, token) in self.auth.tokens.iter().enumerate() {
            let key = |field: &str| format!("auth.tokens[{i}].{field}");
            if token.name.is_empty()
                || token.name.len() > 64
                || !token
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
            {
                problem(
                    &key("name"),
                    format!(
                        "`{}` must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-', '@'",
                        token.name
                    ),
                );
            } else if !names.insert(token.name.as_str()) {
                problem(
                    &key("name"),
                    format!("`{}` names another token too", token.name),
                );
            }
            match crate::auth::parse_hash(&token.hash) {
                Err(reason) => problem(&key("hash"), reason),
                Ok(digest) => {
                    if !hashes.insert(digest) {
                        problem(&key("hash"), "is the hash of another token too".to_owned());
                    }
                }
            }
            if token.roles.is_empty() {
                problem(
                    &key("roles"),
                    "must name at least one of \"command\", \"query\", \"admin\"".to_owned(),
                );
            }
            for (field, list) in [
                ("aggregates", &token.aggregates),
                ("projections", &token.projections),
            ] {
                if list.as_ref().is_some_and(Vec::is_empty) {
                    problem(
                        &key(field),
                        "an empty list allows nothing; leave the key out to allow all".to_owned(),
                    );
                }
            }
        }
        if let Ok(addr) = self.http.listen.parse::<SocketAddr>()
            && !addr.ip().is_loopback()
            && self.auth.tokens.is_empty()
            && !self.auth.allow_unauthenticated
        {
            problem(
                "auth.tokens",
                format!(
                    "the listener {addr} is not on loopback and no tokens are configured: \
                     add [[auth.tokens]] (see `cqrsd token hash`), or set \
                     auth.allow_unauthenticated = true to serve everyone"
                ),
            );
        }
    }

    /// Problems of `[node]`: roles other than `all` need the shared Kafka
    /// log and plain HTTP between nodes; every URL must parse, and no peer
    /// may be this node or be listed twice.
    fn validate_node(&self, problem: &mut impl FnMut(&str, String)) {
        let node = &self.node;
        if node.role != crate::node::Role::All {
            if self.log.backend != LogBackend::Kafka {
                problem(
                    "node.role",
                    format!(
                        "role `{}` needs log.backend = \"kafka\": nodes share the event log through Kafka",
                        node.role
                    ),
                );
            }
            if self.tls.cert_path.is_some() || self.tls.key_path.is_some() {
                problem(
                    "node.role",
                    format!(
                        "role `{}` with [tls]: nodes forward to each other over plain http, which a TLS listener does not accept",
                        node.role
                    ),
                );
            }
        }
        let own = match &node.advertise_url {
            Some(url) => match crate::node::canonical_url(url) {
                Ok(own) => Some(own),
                Err(reason) => {
                    problem("node.advertise_url", reason);
                    None
                }
            },
            None => None,
        };
        let mut seen = std::collections::HashSet::new();
        for (i, peer) in node.peers.iter().enumerate() {
            let key = format!("node.peers[{i}]");
            match crate::node::canonical_url(peer) {
                Ok(canonical) if own.as_ref() == Some(&canonical) => problem(
                    &key,
                    format!(
                        "`{peer}` is this node's own node.advertise_url; a node is not its own peer"
                    ),
                ),
                Ok(canonical) => {
                    if !seen.insert(canonical) {
                        problem(&key, format!("`{peer}` is listed twice"));
                    }
                }
                Err(reason) => problem(&key, reason),
            }
        }
        if node.peers.len() > 64 {
            problem(
                "node.peers",
                format!("{} peers is more than the limit of 64", node.peers.len()),
            );
        }
        if node.ownership == crate::node::Ownership::Group {
            match node.role {
                crate::node::Role::All => problem(
                    "node.ownership",
                    "ownership = \"group\" needs role \"command\" or \"query\": a node with role \"all\" runs the whole write side alone".to_owned(),
                ),
                crate::node::Role::Command if node.advertise_url.is_none() => problem(
                    "node.ownership",
                    "ownership = \"group\" on a command node needs node.advertise_url: the owner map tells the other nodes where this node's partitions are served".to_owned(),
                ),
                _ => {}
            }
            if node.session_timeout_ms < 1_000 {
                problem(
                    "node.session_timeout_ms",
                    format!(
                        "{} ms is less than the least of 1000",
                        node.session_timeout_ms
                    ),
                );
            }
        }
        for (key, value) in [
            ("node.connect_timeout_ms", node.connect_timeout_ms),
            ("node.response_timeout_ms", node.response_timeout_ms),
            ("node.health_interval_ms", node.health_interval_ms),
            ("node.session_timeout_ms", node.session_timeout_ms),
            ("node.moving_retry_after_ms", node.moving_retry_after_ms),
        ] {
            if value == 0 {
                problem(key, "must be greater than 0".to_owned());
            } else if value > MAX_NODE_MILLIS {
                problem(
                    key,
                    format!("{value} ms is more than the limit of {MAX_NODE_MILLIS} (ten minutes)"),
                );
            }
        }
    }

    /// Whether requests need a token: with any configured, always; without,
    /// the API is open (only on loopback, or when explicitly allowed).
    pub fn auth_enabled(&self) -> bool {
        !self.auth.tokens.is_empty()
    }

    /// Things that are allowed but worth an operator's attention.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.auth.tokens.is_empty() && !self.listen_addr().ip().is_loopback() {
            warnings.push(format!(
                "auth.allow_unauthenticated = true: the API on {} is open to everyone who can reach it",
                self.http.listen
            ));
        }
        if self.node.role != crate::node::Role::All && self.node.peers.is_empty() {
            let other = match self.node.role {
                crate::node::Role::Query => "commands",
                _ => "queries",
            };
            warnings.push(format!(
                "node.role = \"{}\" with no node.peers: {other} sent to this node are answered 503",
                self.node.role
            ));
        }
        if self.node.role != crate::node::Role::All
            && self.node.response_timeout_ms <= self.query.consistency_timeout_ms
        {
            warnings.push(format!(
                "node.response_timeout_ms ({}) is not above query.consistency_timeout_ms ({}): a forwarded consistent_with wait is cut off as a 504 before its own 504 with the lag",
                self.node.response_timeout_ms, self.query.consistency_timeout_ms
            ));
        }
        warnings
    }

    /// The certificate and key files, resolved against the configuration
    /// file's directory; `None` without TLS, `Err((key, reason))` when only
    /// one of them is set.
    pub fn tls_paths(&self) -> Result<Option<(PathBuf, PathBuf)>, (&'static str, String)> {
        let resolve = |path: &PathBuf| match &self.base_dir {
            Some(base) if path.is_relative() => base.join(path),
            _ => path.clone(),
        };
        match (&self.tls.cert_path, &self.tls.key_path) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some((resolve(cert), resolve(key)))),
            (Some(_), None) => Err(("tls.key_path", "must be set with tls.cert_path".to_owned())),
            (None, Some(_)) => Err(("tls.cert_path", "must be set with tls.key_path".to_owned())),
        }
    }

    /// The listen address; valid after `load` succeeded.
    pub fn listen_addr(&self) -> SocketAddr {
        self.http
            .listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// The domain file, resolved against the configuration file's directory,
    /// or `None` for the built-in example domain.
    pub fn domain_path(&self) -> Option<PathBuf> {
        let path = self.domain.path.as_ref()?;
        Some(match &self.base_dir {
            Some(base) if path.is_relative() => base.join(path),
            _ => path.clone(),
        })
    }

    /// The text of the domain file, or of the built-in example.
    pub fn domain_source(&self) -> Result<std::borrow::Cow<'static, str>, ConfigError> {
        match self.domain_path() {
            None => Ok(std::borrow::Cow::Borrowed(crate::domain::EXAMPLE_DOMAIN)),
            Some(path) => std::fs::read_to_string(&path)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| {
                    ConfigError::single(
                        "domain.path",
                        format!("cannot read {}: {e}", path.display()),
                    )
                }),
        }
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.http.header_read_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.http.request_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.http.drain_timeout_ms)
    }
}

/// Serde's messages name the offending field but not its section; this pulls
/// out the field so the problem's key is at least that precise.
fn config_key_of(message: &str) -> String {
    message
        .split("for key `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .map_or_else(|| "configuration".to_owned(), str::to_owned)
}

/// A directory is acceptable when it exists and is a directory, or when its
/// nearest existing ancestor is a writable directory it can be created in.
/// Nothing is created here: `check` must not change the machine.
fn check_dir_creatable(dir: &Path) -> Result<(), String> {
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("cannot read the working directory: {e}"))?
            .join(dir)
    };
    let mut candidate = absolute.as_path();
    loop {
        match std::fs::metadata(candidate) {
            Ok(meta) if meta.is_dir() => {
                if meta.permissions().readonly() {
                    return Err(format!("{} is read-only", candidate.display()));
                }
                return Ok(());
            }
            Ok(_) => {
                return Err(format!(
                    "{} exists and is not a directory",
                    candidate.display()
                ));
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                candidate = candidate.parent().ok_or_else(|| {
                    format!(
                        "no existing ancestor of {} to create it in",
                        absolute.display()
                    )
                })?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotADirectory => {
                return Err(format!(
                    "a parent of {} is not a directory",
                    absolute.display()
                ));
            }
            Err(error) => return Err(format!("cannot inspect {}: {error}", candidate.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn defaults_match_the_design() {
        let config = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:8080");
        assert_eq!(config.storage.data_dir, PathBuf::from("./cqrsd-data"));
        assert_eq!(config.log.backend, LogBackend::Embedded);
        assert_eq!(config.log.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(config.log.kafka.topic_prefix, "cqrsd");
        assert_eq!(config.log.kafka.partitions, 8);
        assert_eq!((config.command.threads, config.query.threads), (1, 1));
        assert_eq!(
            config.projections.workers,
            std::thread::available_parallelism().unwrap().get()
        );
        assert_eq!(config.domain_path(), None);
    }

    #[test]
    fn file_values_override_defaults_and_env_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "config.toml",
            "[http]\nlisten = \"127.0.0.1:9000\"\n[command]\nthreads = 3\n[domain]\npath = \"d.toml\"\n",
        );
        write(dir.path(), "d.toml", "");
        let config = Config::load_with_env(Some(&file), env(&[])).unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:9000");
        assert_eq!(config.command.threads, 3);
        assert_eq!(config.domain_path(), Some(dir.path().join("d.toml")));

        let config = Config::load_with_env(
            Some(&file),
            env(&[
                ("CQRSD__HTTP__LISTEN", "127.0.0.1:9100"),
                ("CQRSD__QUERY__THREADS", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:9100");
        assert_eq!(config.query.threads, 2);
        assert_eq!(config.command.threads, 3);
    }

    #[test]
    fn every_unknown_key_and_bad_value_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "config.toml",
            "[http]\nlistn = \"x\"\nlisten = \"nowhere\"\n[query]\nthreads = 0\n[sotrage]\ndata_dir = \"x\"\n",
        );
        let error = Config::load_with_env(Some(&file), env(&[])).unwrap_err();
        let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"http.listn"), "{error}");
        assert!(keys.contains(&"sotrage"), "{error}");
        assert!(keys.contains(&"http.listen"), "{error}");
        assert!(keys.contains(&"query.threads"), "{error}");
        assert_eq!(error.problems.len(), 4, "{error}");
    }

    #[test]
    fn producer_settings_cqrsd_owns_cannot_be_passed_through() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "config.toml",
            "[log]\nbackend = \"kafka\"\n[log.kafka.producer]\n\"transactional.id\" = \"mine\"\n\"acks\" = \"1\"\n",
        );
        let error = Config::load_with_env(Some(&file), env(&[])).unwrap_err();
        let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(
            keys.contains(&"log.kafka.producer.transactional.id"),
            "{error}"
        );
        assert!(keys.contains(&"log.kafka.producer.acks"), "{error}");
    }

    #[test]
    fn projection_nice_values_outside_0_to_19_are_refused() {
        for bad in ["-5", "20"] {
            let error =
                Config::load_with_env(None, env(&[("CQRSD__PROJECTIONS__NICE", bad)])).unwrap_err();
            assert_eq!(error.problems[0].key, "projections.nice", "{error}");
        }
        let config =
            Config::load_with_env(None, env(&[("CQRSD__PROJECTIONS__NICE", "19")])).unwrap();
        assert_eq!(config.projections.nice, 19);
        assert_eq!(
            Config::load_with_env(None, env(&[]))
                .unwrap()
                .projections
                .nice,
            10
        );
    }

    #[test]
    fn segment_sizes_outside_64_kib_to_1_gib_are_refused() {
        for bad in ["65535", "1073741825", "0"] {
            let error =
                Config::load_with_env(None, env(&[("CQRSD__LOG__EMBEDDED__SEGMENT_BYTES", bad)]))
                    .unwrap_err();
            assert_eq!(
                error.problems[0].key, "log.embedded.segment_bytes",
                "{error}"
            );
        }
        let config = Config::load_with_env(
            None,
            env(&[("CQRSD__LOG__EMBEDDED__SEGMENT_BYTES", "65536")]),
        )
        .unwrap();
        assert_eq!(config.log.embedded.segment_bytes, 65536);
        let defaults = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(defaults.log.embedded.segment_bytes, 64 << 20);
    }

    #[test]
    fn working_set_and_search_writer_settings_are_bounded() {
        let keys = |pairs: &[(&str, &str)]| -> Vec<String> {
            match Config::load_with_env(None, env(pairs)) {
                Ok(_) => Vec::new(),
                Err(error) => error.problems.into_iter().map(|p| p.key).collect(),
            }
        };
        assert_eq!(
            keys(&[("CQRSD__PROJECTIONS__CACHE_MIB", "70000")]),
            ["projections.cache_mib"]
        );
        assert_eq!(
            keys(&[("CQRSD__PROJECTIONS__BATCH_MAX_MS", "60001")]),
            ["projections.batch_max_ms"]
        );
        assert_eq!(
            keys(&[("CQRSD__PROJECTIONS__BATCH_SIZE", "1000001")]),
            ["projections.batch_size"]
        );
        assert_eq!(
            keys(&[("CQRSD__PROJECTIONS__SEARCH_WRITER_THREADS", "0")]),
            ["projections.search_writer_threads"]
        );
        assert_eq!(
            keys(&[("CQRSD__PROJECTIONS__POLICY_RETRY_MIN_MS", "0")]),
            ["projections.policy_retry_min_ms"]
        );
        assert_eq!(
            keys(&[
                ("CQRSD__PROJECTIONS__POLICY_RETRY_MIN_MS", "500"),
                ("CQRSD__PROJECTIONS__POLICY_RETRY_MAX_MS", "100"),
            ]),
            ["projections.policy_retry_max_ms"]
        );
        assert_eq!(
            keys(&[("CQRSD__PROJECTIONS__POLICY_SEND_TIMEOUT_MS", "0")]),
            ["projections.policy_send_timeout_ms"]
        );
        // 15 MB per thread at least: 4 threads need more than 32 MiB.
        assert_eq!(
            keys(&[
                ("CQRSD__PROJECTIONS__SEARCH_WRITER_THREADS", "4"),
                ("CQRSD__PROJECTIONS__SEARCH_WRITER_MIB", "32"),
            ]),
            ["projections.search_writer_mib"]
        );
        assert_eq!(
            keys(&[("CQRSD__PROJECTIONS__SEARCH_WRITER_MIB", "4096")]),
            ["projections.search_writer_mib"]
        );
        assert!(
            keys(&[
                ("CQRSD__PROJECTIONS__SEARCH_WRITER_THREADS", "2"),
                ("CQRSD__PROJECTIONS__SEARCH_WRITER_MIB", "64"),
                ("CQRSD__PROJECTIONS__CACHE_MIB", "0"),
            ])
            .is_empty()
        );
        let settings = ProjectionsConfig::default().engine_settings();
        assert_eq!(settings.cache_bytes, 64 << 20);
        assert_eq!(
            (settings.search_writer_bytes, settings.search_writer_threads),
            (64 << 20, 1)
        );
    }

    #[test]
    fn unknown_environment_keys_are_reported() {
        let error =
            Config::load_with_env(None, env(&[("CQRSD__HTTP__LISTN", "127.0.0.1:1")])).unwrap_err();
        assert_eq!(error.problems[0].key, "http.listn", "{error}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "config.toml", "[command]\nthreads = \"many\"\n");
        let error = Config::load_with_env(Some(&file), env(&[])).unwrap_err();
        assert!(error.to_string().contains("threads"), "{error}");
    }

    #[test]
    fn an_uncreatable_data_dir_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = write(dir.path(), "file", "");
        let data_dir = blocker.join("data");
        let error = Config::load_with_env(
            None,
            env(&[("CQRSD__STORAGE__DATA_DIR", data_dir.to_str().unwrap())]),
        )
        .unwrap_err();
        assert_eq!(error.problems[0].key, "storage.data_dir", "{error}");
        assert!(
            error.problems[0].reason.contains("not a directory"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_domain_file_is_reported() {
        let error =
            Config::load_with_env(None, env(&[("CQRSD__DOMAIN__PATH", "/nonexistent/d.toml")]))
                .unwrap_err();
        assert_eq!(error.problems[0].key, "domain.path", "{error}");
    }

    #[test]
    fn security_sections_are_validated_by_key() {
        let keys = |pairs: &[(&str, &str)]| -> Vec<String> {
            Config::load_with_env(None, env(pairs))
                .err()
                .map(|e| e.problems.into_iter().map(|p| p.key).collect())
                .unwrap_or_default()
        };
        assert_eq!(
            keys(&[("CQRSD__HTTP__LISTEN", "0.0.0.0:1")]),
            vec!["auth.tokens"]
        );
        assert!(
            keys(&[
                ("CQRSD__HTTP__LISTEN", "0.0.0.0:1"),
                ("CQRSD__AUTH__ALLOW_UNAUTHENTICATED", "true")
            ])
            .is_empty()
        );
        assert_eq!(
            keys(&[("CQRSD__RATE_LIMIT__REQUESTS_PER_SECOND", "-1")]),
            vec!["rate_limit.requests_per_second"]
        );
        assert_eq!(
            keys(&[("CQRSD__RATE_LIMIT__BURST", "0")]),
            vec!["rate_limit.burst"]
        );
        assert_eq!(
            keys(&[("CQRSD__TLS__CERT_PATH", "/nonexistent/cert.pem")]),
            vec!["tls.key_path"]
        );
        assert_eq!(
            keys(&[
                ("CQRSD__TLS__CERT_PATH", "/nonexistent/cert.pem"),
                ("CQRSD__TLS__KEY_PATH", "/nonexistent/key.pem")
            ]),
            vec!["tls.cert_path"]
        );
    }

    #[test]
    fn node_roles_are_validated_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let problems = |text: &str| -> Vec<String> {
            let path = write(dir.path(), "node.toml", text);
            Config::load_with_env(Some(&path), env(&[]))
                .err()
                .map(|e| e.problems.into_iter().map(|p| p.to_string()).collect())
                .unwrap_or_default()
        };
        // The default is today's single process, with nothing to check.
        assert!(problems("").is_empty());
        assert_eq!(Config::default().node.role, crate::node::Role::All);
        let embedded = problems("[node]\nrole = \"query\"\n");
        assert_eq!(embedded.len(), 1, "{embedded:?}");
        assert!(embedded[0].starts_with("node.role: ") && embedded[0].contains("kafka"));
        let kafka = "[log]\nbackend = \"kafka\"\n";
        assert!(problems(&format!("{kafka}[node]\nrole = \"command\"\n")).is_empty());
        let bad = problems(&format!(
            "{kafka}[node]\nrole = \"query\"\nadvertise_url = \"http://Node-A:8080/\"\n\
             peers = [\"http://node-a:8080\", \"node-b:8080\", \"http://c:1\", \"http://C:1\", \"https://d:1\"]\n\
             health_interval_ms = 0\n"
        ));
        let keys: Vec<&str> = bad.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            vec![
                "node.peers[0]",
                "node.peers[1]",
                "node.peers[3]",
                "node.peers[4]",
                "node.health_interval_ms"
            ],
            "{bad:?}"
        );
        assert!(bad[0].contains("own node.advertise_url"), "{bad:?}");
        assert!(bad[2].contains("listed twice"), "{bad:?}");
        let url = problems(&format!("{kafka}[node]\nadvertise_url = \"ftp://x\"\n"));
        assert_eq!(url.len(), 1);
        assert!(url[0].starts_with("node.advertise_url: "), "{url:?}");
        assert!(problems("[node]\nrole = \"edge\"\n")[0].contains("node.role"));

        // Several command nodes: only roles command and query, a command
        // node must say where it is reached, and the session is bounded.
        assert_eq!(
            Config::default().node.ownership,
            crate::node::Ownership::None
        );
        let all = problems("[node]\nownership = \"group\"\n");
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].starts_with("node.ownership: ") && all[0].contains("\"all\""));
        let unreachable = problems(&format!(
            "{kafka}[node]\nrole = \"command\"\nownership = \"group\"\n"
        ));
        assert_eq!(unreachable.len(), 1, "{unreachable:?}");
        assert!(unreachable[0].contains("advertise_url"), "{unreachable:?}");
        assert!(problems(&format!(
            "{kafka}[node]\nrole = \"command\"\nownership = \"group\"\nadvertise_url = \"http://a:1\"\n"
        ))
        .is_empty());
        assert!(
            problems(&format!(
                "{kafka}[node]\nrole = \"query\"\nownership = \"group\"\n"
            ))
            .is_empty()
        );
        let bounds = problems(&format!(
            "{kafka}[node]\nrole = \"query\"\nownership = \"group\"\nsession_timeout_ms = 999\nmoving_retry_after_ms = 0\n"
        ));
        let keys: Vec<&str> = bounds
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            ["node.session_timeout_ms", "node.moving_retry_after_ms"],
            "{bounds:?}"
        );
        assert!(problems("[node]\nownership = \"leases\"\n")[0].contains("node.ownership"));
    }

    #[test]
    fn the_example_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml.example");
        let config = Config::load_with_env(Some(&path), env(&[])).unwrap();
        // The example documents the defaults, so it must equal them (up to the
        // file's location and the domain path it names).
        let mut expected = Config {
            base_dir: config.base_dir.clone(),
            ..Config::default()
        };
        expected.domain.path = config.domain.path.clone();
        assert_eq!(config, expected);
    }
}
