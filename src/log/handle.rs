//! The event log as the rest of the daemon sees it, whichever backend holds it.
//!
//! The command side appends through this handle and the read side reads
//! through it; they never talk to each other directly. The embedded log and
//! Kafka are variants with the same methods, so callers do not change.

use std::time::Duration;

use tokio::sync::watch;

use super::Record;

/// The future of an append started with [`EventLog::start_append`].
pub type AppendFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u64>, LogError>> + Send>>;
use crate::kafka::{KafkaLog, KafkaSettings};
use crate::store::{SegmentLog, SegmentLogOptions, StoreError};

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
}

impl From<StoreError> for LogError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Closed => LogError::Closed,
            StoreError::Corrupt { .. } => LogError::Corrupt(error.to_string()),
            StoreError::InvalidRequest(reason) => LogError::Invalid(reason),
            StoreError::TopicMismatch { .. } | StoreError::LegacyLog { .. } => {
                LogError::Invalid(error.to_string())
            }
            StoreError::Unavailable(_)
            | StoreError::Io(_)
            | StoreError::Sled(_)
            | StoreError::Search(_) => LogError::Unavailable(error.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
enum Backend {
    Embedded(SegmentLog),
    Kafka(KafkaLog),
}

/// A handle on the event log; cheap to clone.
#[derive(Debug, Clone)]
pub struct EventLog {
    backend: Backend,
    prefix: String,
    partitions: u32,
}

/// Settings of the embedded backend.
#[derive(Debug, Clone)]
pub struct EmbeddedSettings {
    pub data_dir: std::path::PathBuf,
    pub topic_prefix: String,
    pub partitions: u32,
    pub group_commit_max_records: usize,
    pub group_commit_max_delay: Duration,
    pub fsync: bool,
    pub segment_bytes: u64,
}

impl EventLog {
    /// Opens the embedded log. Blocking.
    pub fn open_embedded(settings: EmbeddedSettings) -> Result<Self, LogError> {
        let log = SegmentLog::open(
            &settings.data_dir,
            SegmentLogOptions {
                partitions: settings.partitions,
                group_commit_max_records: settings.group_commit_max_records,
                group_commit_max_delay: settings.group_commit_max_delay,
                fsync: settings.fsync,
                segment_bytes: settings.segment_bytes,
            },
        )?;
        Ok(Self {
            backend: Backend::Embedded(log),
            prefix: settings.topic_prefix,
            partitions: settings.partitions,
        })
    }

    /// Connects to a Kafka cluster. Blocking.
    pub fn open_kafka(settings: KafkaSettings, topic_prefix: String) -> Result<Self, LogError> {
        let partitions = settings.partitions;
        Ok(Self {
            backend: Backend::Kafka(KafkaLog::open(settings)?),
            prefix: topic_prefix,
            partitions,
        })
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
        match &self.backend {
            Backend::Embedded(log) => {
                log.ensure_topic(topic)?;
            }
            Backend::Kafka(log) => log.ensure_topic(topic)?,
        }
        Ok(())
    }

    /// Appends whole records to one partition; resolves once they are durable.
    pub async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<Vec<u64>, LogError> {
        match &self.backend {
            Backend::Embedded(log) => Ok(log.append(topic, partition, records).await?),
            Backend::Kafka(log) => log.append(topic, partition, records).await,
        }
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
        match &self.backend {
            Backend::Embedded(log) => {
                match log.submit(topic, partition, records, Some(expected_offset)) {
                    Ok(pending) => Box::pin(async move { Ok(pending.await?) }),
                    Err(error) => Box::pin(std::future::ready(Err(error.into()))),
                }
            }
            Backend::Kafka(log) => {
                let log = log.clone();
                let topic = topic.to_owned();
                Box::pin(async move { log.append(&topic, partition, records).await })
            }
        }
    }

    /// Whether a writer may start its next append before the previous one is
    /// durable: true when appends land in the order they were started and a
    /// failed append makes every later one fail (the embedded log refuses an
    /// append whose expected offset a failed one left unfilled, and poisons
    /// itself on a failed fdatasync), so no record decided against a failed
    /// batch's state can land. Kafka gives no such guarantee here.
    pub fn pipelines_appends(&self) -> bool {
        matches!(self.backend, Backend::Embedded(_))
    }

    /// Up to `max` records of a partition from offset `from`. Blocking.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, LogError> {
        match &self.backend {
            Backend::Embedded(log) => Ok(log.read(topic, partition, from, max)?),
            Backend::Kafka(log) => log.read(topic, partition, from, max),
        }
    }

    /// The next offset to be written (the end of the durable records).
    pub fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        match &self.backend {
            Backend::Embedded(log) => Ok(log.end_offset(topic, partition)?),
            Backend::Kafka(log) => log.end_offset(topic, partition),
        }
    }

    /// Wakes on every change of the partition's end offset.
    pub fn subscribe(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>, LogError> {
        match &self.backend {
            Backend::Embedded(log) => Ok(log.subscribe(topic, partition)?),
            Backend::Kafka(log) => log.subscribe(topic, partition),
        }
    }

    /// The records of one aggregate holding versions from `from_version` on,
    /// as (partition, offset, record). Blocking.
    pub fn aggregate_records(
        &self,
        topic: &str,
        aggregate_id: &str,
        from_version: u64,
    ) -> Result<Vec<(u32, u64, Record)>, LogError> {
        match &self.backend {
            Backend::Embedded(log) => {
                Ok(log.aggregate_records(topic, aggregate_id, from_version)?)
            }
            Backend::Kafka(log) => log.aggregate_records(topic, aggregate_id, from_version),
        }
    }

    /// Finishes queued appends and flushes. Blocking.
    pub fn close(&self) -> Result<(), LogError> {
        match &self.backend {
            Backend::Embedded(log) => Ok(log.close()?),
            Backend::Kafka(log) => log.close(),
        }
    }
}
