//! The event log as the rest of the daemon sees it, whichever backend holds it.
//!
//! The command side appends through this handle and the read side reads
//! through it; they never talk to each other directly. A backend (the
//! embedded segment log in `store`, Kafka in `kafka`) implements
//! [`LogBackend`]; which one runs is decided where the daemon starts, so this
//! module knows neither.

use std::sync::Arc;

use tokio::sync::watch;

use super::Record;

/// The future of an append started with [`EventLog::start_append`].
pub type AppendFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u64>, LogError>> + Send>>;

/// Why a log operation failed, grouped by what a caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log cannot take or serve records now; commands answer 503.
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
    /// The log was closed during shutdown.
    #[error("the event log is closed")]
    Closed,
    /// Stored data does not decode; never skipped silently.
    #[error("corrupt event log data: {0}")]
    Corrupt(String),
    /// A request for a topic or partition that does not exist.
    #[error("invalid event log request: {0}")]
    Invalid(String),
    /// An append to a partition this node does not own: never taken, given
    /// up, or taken by another node, which fenced this one. Nothing of it
    /// was written; commands answer 503 until the partition is taken again.
    #[error("this node does not own the partition: {0}")]
    NotOwned(String),
}

/// What a log backend provides. Blocking methods are called from blocking
/// threads only; `end_offset` and `subscribe` read memory and may be called
/// anywhere.
pub trait LogBackend: Send + Sync + std::fmt::Debug {
    /// Creates the topic of an aggregate type with the configured partition
    /// count, or checks it. Blocking.
    fn ensure_topic(&self, topic: &str) -> Result<(), LogError>;

    /// Starts an append of whole records to one partition; the future
    /// resolves once they are durable, with their offsets. With
    /// `expected_offset`, a backend that pipelines appends refuses one that
    /// would not start at that offset.
    fn start_append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
        expected_offset: Option<u64>,
    ) -> AppendFuture;

    /// See [`EventLog::pipelines_appends`].
    fn pipelines_appends(&self) -> bool;

    /// Up to `max` durable records of a partition from offset `from`. Blocking.
    fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, LogError>;

    /// The next offset to be written (the end of the durable records).
    fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError>;

    /// Wakes on every change of the partition's end offset.
    fn subscribe(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>, LogError>;

    /// Finishes queued appends and makes them durable. Blocking.
    fn close(&self) -> Result<(), LogError>;
}

/// A handle on the event log; cheap to clone.
#[derive(Debug, Clone)]
pub struct EventLog {
    backend: Arc<dyn LogBackend>,
    prefix: String,
    partitions: u32,
}

impl EventLog {
    /// A handle on an opened backend whose topics are named
    /// `<topic_prefix>.<aggregate>` and have `partitions` partitions.
    pub fn new(backend: Arc<dyn LogBackend>, topic_prefix: String, partitions: u32) -> Self {
        Self {
            backend,
            prefix: topic_prefix,
            partitions,
        }
    }

    /// The topic that holds an aggregate type's events: `<prefix>.<aggregate>`.
    pub fn topic(&self, aggregate: &str) -> String {
        format!("{}.{aggregate}", self.prefix)
    }

    /// Partitions of every topic.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Creates the topic of an aggregate type, or checks it. Blocking.
    pub fn ensure_topic(&self, topic: &str) -> Result<(), LogError> {
        self.backend.ensure_topic(topic)
    }

    /// Appends whole records to one partition; resolves once they are durable.
    pub async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<Vec<u64>, LogError> {
        self.backend
            .start_append(topic, partition, records, None)
            .await
    }

    /// Starts an append and returns the future of its offsets. On the embedded
    /// log the records are queued before this returns, so appends started one
    /// after another land in that order, and an append that would not start at
    /// `expected_offset` is refused (so nothing decided against a failed
    /// append's records can land after it); on Kafka the append starts when the
    /// future is first polled, and `expected_offset` is not checked.
    pub fn start_append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
        expected_offset: u64,
    ) -> AppendFuture {
        self.backend
            .start_append(topic, partition, records, Some(expected_offset))
    }

    /// Whether a writer may start its next append before the previous one is
    /// durable: true when appends land in the order they were started and a
    /// failed append makes every later one fail (the embedded log refuses an
    /// append whose expected offset a failed one left unfilled, and poisons
    /// itself on a failed fdatasync), so no record decided against a failed
    /// batch's state can land. Kafka gives no such guarantee here.
    pub fn pipelines_appends(&self) -> bool {
        self.backend.pipelines_appends()
    }

    /// Up to `max` records of a partition from offset `from`. Blocking.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, LogError> {
        self.backend.read(topic, partition, from, max)
    }

    /// The next offset to be written (the end of the durable records).
    pub fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.backend.end_offset(topic, partition)
    }

    /// Wakes on every change of the partition's end offset.
    pub fn subscribe(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>, LogError> {
        self.backend.subscribe(topic, partition)
    }

    /// Finishes queued appends and flushes. Blocking.
    pub fn close(&self) -> Result<(), LogError> {
        self.backend.close()
    }
}
