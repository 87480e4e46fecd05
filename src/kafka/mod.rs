//! The Kafka event-log backend: the only module that knows rdkafka.
//!
//! - Appends go through one idempotent producer (`enable.idempotence`,
//!   `acks=all`). One record per command, keyed by aggregate id, sent to the
//!   partition the writer chose. A batch's records are all handed to
//!   librdkafka before any is awaited; the append resolves once every one is
//!   acknowledged, or fails with `Unavailable` within `produce_timeout_ms`.
//! - Reads use a small pool of consumers with manual partition assignment
//!   (`assign`, no group, no commits): the consumer offsets of cqrsd live
//!   beside its data, never in Kafka.
//! - End offsets are cached per partition in a `watch`: own appends advance
//!   them at once, a background thread reads past them for records other
//!   nodes appended, and a partition that is unknown or whose append failed
//!   is asked again on its next read. An end is always the offset after the
//!   last record a reader gets, never the high watermark alone: a broker may
//!   report a watermark behind records it has already acknowledged (Tansu
//!   does; see `examples/tansu_stale_end_offset.rs`), and a restore that
//!   stops there would lose acknowledged commands; and with transactions
//!   (partition ownership, `owner.rs`) the watermark also counts the commit
//!   markers, which no reader gets, so a reader after the last record would
//!   never reach it. The authoritative answer reads from just before the
//!   watermark until the partition stays quiet (`readable_end`), the quiet
//!   counted from the broker's first answer (`probe_end`).
//! - Kafka has no per-aggregate index, and needs none here: the write side
//!   keeps every aggregate's latest state in its command store, and histories
//!   come from the write side's persisted history index, built by reading the
//!   partitions like any reader.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::log::{AppendFuture, EventLog, LogBackend, LogError, Record};

mod owner;
mod owners;
mod raw;
pub use owners::{
    GroupSettings, GroupStats, Membership, OwnerMap, OwnershipHandler, TopicPartition,
};
pub use raw::RawProducer;

/// Producer settings cqrsd sets itself; the pass-through map may not change them.
pub const ENFORCED_PRODUCER_KEYS: &[&str] = &[
    "bootstrap.servers",
    "enable.idempotence",
    "acks",
    "message.timeout.ms",
    "linger.ms",
    "batch.size",
    "transactional.id",
];
/// Consumer settings cqrsd sets itself.
pub const ENFORCED_CONSUMER_KEYS: &[&str] = &[
    "bootstrap.servers",
    "enable.auto.commit",
    "group.id",
    "enable.partition.eof",
];

/// How often the background thread refreshes the cached end offsets.
const REFRESH_EVERY: Duration = Duration::from_millis(250);
/// Pause between the end-offset answers compared after a failed append.
const SETTLE: Duration = Duration::from_millis(500);
/// How long a probe past the reported end waits for one more record before
/// it takes the partition to end there, once the broker has answered a
/// fetch. A fetch at the end returns after `fetch.wait.max.ms`, so this is
/// several fetch round trips.
const PROBE_QUIET: Duration = Duration::from_millis(300);
/// How long the refresher's peek past the known ends waits for a record
/// (see [`KafkaLog::peek_past_ends`]): a few fetch round trips.
const PEEK_QUIET: Duration = Duration::from_millis(60);
/// How far before the reported end `authoritative_end` starts to look for
/// the last readable record: a transaction's commit marker takes the last
/// offset, so its last record is one before.
const TAIL_LOOKBACK: u64 = 2;
/// Wait between retries while librdkafka's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);
/// Idle consumers kept for reads.
const POOL_SIZE: usize = 8;

/// Settings of the Kafka backend.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub partitions: u32,
    pub replication_factor: i32,
    pub linger_ms: u64,
    pub batch_size: u64,
    pub produce_timeout: Duration,
    pub request_timeout: Duration,
    pub producer: BTreeMap<String, String>,
    pub consumer: BTreeMap<String, String>,
    /// With a prefix, appends go only to partitions this node has taken
    /// ([`KafkaLog::take_partition`]), each through a transactional producer
    /// of its own whose `transactional.id` is `<prefix>.<topic>.<partition>`,
    /// so a later owner fences this one (see `owner.rs`). Without one, every
    /// partition is appended to through the one idempotent producer.
    pub transactional_id_prefix: Option<String>,
}

/// librdkafka's logs and errors, into tracing and metrics.
#[derive(Clone, Copy)]
struct Context;

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // With `enable.partition.eof` (which the end probes need) librdkafka
        // also reports every fetch that reached a partition's end here, many
        // times a second per idle partition. That is the log working, not a
        // broker error: it must neither fill the log nor count as an error.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        metrics::counter!("cqrsd_kafka_broker_errors_total").increment(1);
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for Context {}

/// A partition's cached end offset.
struct End {
    tx: watch::Sender<u64>,
    /// False after a failed append: a record may have landed unseen, so the
    /// next `end_offset` asks the brokers.
    fresh: bool,
}

type Key = (String, u32);

struct Inner {
    settings: KafkaSettings,
    producer_config: ClientConfig,
    /// Replaced when librdkafka reports a fatal error (e.g. the idempotent
    /// producer was fenced after an outage), so the log recovers by itself.
    producer: RwLock<Arc<FutureProducer<Context>>>,
    /// Metadata and watermark requests.
    meta: BaseConsumer<Context>,
    readers: Mutex<Vec<BaseConsumer<Context>>>,
    ends: Mutex<HashMap<Key, End>>,
    in_flight: AtomicI64,
    closed: AtomicBool,
    /// Set when a delivery failed on the producer's idempotence state
    /// (fenced, bad epoch or sequence): only a new producer gets past it.
    producer_broken: AtomicBool,
    /// The partitions this node has taken, with their transactional
    /// producers (only with `transactional_id_prefix`).
    owners: Mutex<HashMap<Key, Arc<owner::Owned>>>,
    /// How often another node fenced one of this node's owners.
    fenced: std::sync::atomic::AtomicU64,
}

/// A handle on the Kafka backend; cheap to clone.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("brokers", &self.inner.settings.brokers)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("kafka: {what}: {error}"))
}

/// The producer's settings: the operator's pass-through map, then the ones
/// cqrsd enforces (idempotent, `acks=all`, the configured bounds). Shared by
/// the log and `RawProducer`, so the benchmark's bare producer is the same.
fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &settings.producer {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", settings.linger_ms.to_string())
        .set("batch.size", settings.batch_size.to_string())
        .set("message.timeout.ms", ms(settings.produce_timeout));
    if !settings.producer.contains_key("request.timeout.ms") {
        config.set(
            "request.timeout.ms",
            ms(settings.produce_timeout.min(Duration::from_secs(30))),
        );
    }
    config
}

fn ms(duration: Duration) -> String {
    duration.as_millis().max(1).to_string()
}

impl KafkaLog {
    /// Connects the producer and the metadata client, and starts the
    /// end-offset refresher. Blocking.
    pub fn open(settings: KafkaSettings) -> Result<Self, LogError> {
        let producer_config = producer_config(&settings);
        let producer: FutureProducer<Context> = producer_config
            .create_with_context(Context)
            .map_err(|e| unavailable("cannot create the producer", e))?;
        let producer = RwLock::new(Arc::new(producer));
        let meta = Self::consumer(&settings)?;
        let inner = Arc::new(Inner {
            settings,
            producer_config,
            producer,
            meta,
            readers: Mutex::new(Vec::new()),
            ends: Mutex::new(HashMap::new()),
            in_flight: AtomicI64::new(0),
            closed: AtomicBool::new(false),
            producer_broken: AtomicBool::new(false),
            owners: Mutex::new(HashMap::new()),
            fenced: std::sync::atomic::AtomicU64::new(0),
        });
        // Fail at startup, with a clear message, when no broker answers.
        inner
            .meta
            .fetch_metadata(None, inner.settings.request_timeout)
            .map_err(|e| {
                unavailable(
                    &format!("no broker answered at {}", inner.settings.brokers),
                    e,
                )
            })?;
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("cqrsd-kafka-ends".to_owned())
            .spawn(move || refresh_ends(weak))
            .map_err(|e| unavailable("cannot start the end-offset refresher", e))?;
        Ok(Self { inner })
    }

    fn consumer(settings: &KafkaSettings) -> Result<BaseConsumer<Context>, LogError> {
        let mut config = ClientConfig::new();
        for (key, value) in &settings.consumer {
            config.set(key, value);
        }
        config
            .set("bootstrap.servers", &settings.brokers)
            // librdkafka's assign needs a group id; with manual assignment
            // and no subscribe the consumer never joins the group.
            .set("group.id", "cqrsd-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // The end-of-partition event tells a probe that a fetch has been
            // answered, so an empty answer is not mistaken for a slow one
            // (see `probe_end`); reads skip it.
            .set("enable.partition.eof", "true")
            .set("allow.auto.create.topics", "false");
        if !settings.consumer.contains_key("fetch.wait.max.ms") {
            config.set("fetch.wait.max.ms", "20");
        }
        config
            .create_with_context(Context)
            .map_err(|e| unavailable("cannot create a consumer", e))
    }

    fn check_partition(&self, partition: u32) -> Result<(), LogError> {
        if partition >= self.inner.settings.partitions {
            return Err(LogError::Invalid(format!(
                "partition {partition} out of range (0..{})",
                self.inner.settings.partitions
            )));
        }
        Ok(())
    }

    /// Creates a topic with `partitions` partitions; one that already
    /// exists is left as it is. Blocking.
    fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), LogError> {
        let settings = &self.inner.settings;
        let admin: AdminClient<Context> = {
            let mut config = ClientConfig::new();
            for (key, value) in &settings.producer {
                config.set(key, value);
            }
            config
                .set("bootstrap.servers", &settings.brokers)
                .create_with_context(Context)
                .map_err(|e| unavailable("cannot create the admin client", e))?
        };
        let new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(settings.replication_factor),
        );
        let options = AdminOptions::new().operation_timeout(Some(settings.request_timeout));
        let results = futures::executor::block_on(admin.create_topics([&new], &options))
            .map_err(|e| unavailable(&format!("cannot create topic {topic}"), e))?;
        for result in results {
            match result {
                Ok(_) => tracing::info!(topic, partitions, "topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(unavailable(&format!("cannot create topic {topic}"), code));
                }
            }
        }
        Ok(())
    }

    /// Creates the topic with the configured partitions, or checks that an
    /// existing one has them. Blocking.
    pub fn ensure_topic(&self, topic: &str) -> Result<(), LogError> {
        let settings = &self.inner.settings;
        let wanted = settings.partitions as usize;
        let mut count = self.partition_count(topic)?;
        if count == 0 {
            self.create_topic(topic, settings.partitions as i32)?;
            // Wait until the metadata shows the new topic's partitions.
            let deadline = Instant::now() + settings.request_timeout;
            loop {
                count = self.partition_count(topic)?;
                if count > 0 || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if count != wanted {
            return Err(LogError::Invalid(format!(
                "topic {topic} has {count} partitions but [log.kafka] partitions = {wanted}; \
                 an aggregate's partition depends on the count, so it must match \
                 (use another topic_prefix, or set partitions = {count})"
            )));
        }
        // Every partition's end, asked in parallel: each probe waits for a
        // quiet moment past the reported end.
        std::thread::scope(|scope| {
            let probes: Vec<_> = (0..settings.partitions)
                .map(|partition| {
                    scope.spawn(move || {
                        let end = self.authoritative_end(topic, partition)?;
                        self.observe_end(topic, partition, end, true);
                        Ok::<_, LogError>(())
                    })
                })
                .collect();
            probes.into_iter().try_for_each(|probe| {
                probe
                    .join()
                    .unwrap_or_else(|_| Err(unavailable("end offset", "the probe panicked")))
            })
        })
    }

    /// The topic's partition count in the cluster metadata; 0 when it does not exist.
    fn partition_count(&self, topic: &str) -> Result<usize, LogError> {
        let metadata = self
            .inner
            .meta
            .fetch_metadata(Some(topic), self.inner.settings.request_timeout)
            .map_err(|e| unavailable(&format!("metadata of {topic}"), e))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len()))
    }

    /// Asks the brokers for a partition's high watermark. Blocking.
    fn fetch_end(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let (_, high) = self
            .inner
            .meta
            .fetch_watermarks(topic, partition as i32, self.inner.settings.request_timeout)
            .map_err(|e| unavailable(&format!("end offset of {topic}:{partition}"), e))?;
        Ok(u64::try_from(high).unwrap_or(0))
    }

    /// Where a partition really ends: after the last record a reader gets,
    /// found by reading from just before the high watermark until the
    /// partition stays quiet (further back when nothing is there). Never the
    /// watermark alone: it may lag acknowledged records, and it counts
    /// offsets no reader gets (transaction markers, and on Kafka aborted
    /// records), while every reader takes the offset after the last record it
    /// got as its position, which must then count as the end. Blocking;
    /// takes at least `PROBE_QUIET`.
    fn authoritative_end(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let reported = self.fetch_end(topic, partition)?;
        // A consumer of its own, not one from the pool: a pooled consumer may
        // still hold an end-of-partition event of its earlier assignment (the
        // refresher's peek leaves them), which would start the probe's quiet
        // window before this assignment's first fetch is answered, and a slow
        // broker then reads as an empty partition. This runs when a partition
        // is opened and after a failed append, so its cost is rare.
        let consumer = Self::consumer(&self.inner.settings)?;
        let deadline = Instant::now() + self.inner.settings.request_timeout;
        let end = loop {
            let end = self.readable_end(&consumer, topic, partition, reported)?;
            // Without transactions every offset below the watermark is a
            // record, so a watermark above 0 with nothing read means no
            // answer came in time, not an empty partition: ask again, within
            // the request timeout.
            if end > 0 || reported == 0 || Instant::now() >= deadline {
                break end;
            }
            tracing::debug!(
                topic,
                partition,
                reported,
                "nothing read below a watermark above 0; probing again"
            );
        };
        if end > reported {
            metrics::counter!("cqrsd_kafka_stale_end_offsets_total").increment(1);
            tracing::debug!(
                topic,
                partition,
                reported,
                end,
                "records found past the reported end offset"
            );
        }
        Ok(end)
    }

    /// The offset after the last record readable at or before about
    /// `reported` (or past it): looks back from `reported` in growing
    /// windows until a window holds a record; 0 when none is readable.
    fn readable_end(
        &self,
        consumer: &BaseConsumer<Context>,
        topic: &str,
        partition: u32,
        reported: u64,
    ) -> Result<u64, LogError> {
        let mut back = TAIL_LOOKBACK;
        loop {
            let from = reported.saturating_sub(back);
            if let Some(end) = self.probe_end(consumer, topic, partition, from)? {
                return Ok(end);
            }
            if from == 0 {
                return Ok(0);
            }
            back = back.saturating_mul(16);
        }
    }

    /// Reads from `from` until no record arrives for `PROBE_QUIET`, and
    /// returns the offset after the last record seen (`None` when none).
    /// The quiet window starts only once the broker has answered a fetch (a
    /// record, or the end-of-partition event): a consumer's first fetch can
    /// take longer than the window (a new process, a loaded machine), and a
    /// window that ran out before any answer would take a partition holding
    /// records to be empty, so a restore would fold none of them and hand
    /// out their versions again. Without any answer within the request
    /// timeout the end is unknown, which is an error, never "empty".
    fn probe_end(
        &self,
        consumer: &BaseConsumer<Context>,
        topic: &str,
        partition: u32,
        from: u64,
    ) -> Result<Option<u64>, LogError> {
        assign_at(consumer, topic, partition, from)?;
        let deadline = Instant::now() + self.inner.settings.request_timeout;
        // Until the first answer, only the deadline bounds the wait.
        let mut quiet_until: Option<Instant> = None;
        let mut next = None;
        loop {
            let now = Instant::now();
            if quiet_until.is_some_and(|quiet| now >= quiet) {
                return Ok(next);
            }
            if now >= deadline {
                if quiet_until.is_none() {
                    return Err(unavailable(
                        &format!("end of {topic}:{partition} past {from}"),
                        "no fetch was answered within the request timeout",
                    ));
                }
                // Records kept coming for the whole bound: someone else is
                // writing, and any end is only a moment's answer.
                return Ok(next);
            }
            match consumer.poll(quiet_until.unwrap_or(deadline).min(deadline) - now) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(eof))) if eof == partition as i32 => {
                    quiet_until.get_or_insert(Instant::now() + PROBE_QUIET);
                }
                // Another partition's end (left from an earlier assignment).
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(error)) => {
                    metrics::counter!("cqrsd_kafka_broker_errors_total").increment(1);
                    // A partition we cannot read has no known end.
                    return Err(unavailable(
                        &format!("end of {topic}:{partition} past {from}"),
                        error,
                    ));
                }
                Some(Ok(message)) => {
                    let offset = u64::try_from(message.offset()).unwrap_or(0);
                    if message.topic() == topic
                        && message.partition() == partition as i32
                        && offset >= next.unwrap_or(from)
                    {
                        next = Some(offset + 1);
                        quiet_until = Some(Instant::now() + PROBE_QUIET);
                    }
                }
            }
        }
    }

    /// Reads every partition of `keys` from its known end, all at once on one
    /// consumer, until no record arrives for `PEEK_QUIET`, and moves each end
    /// past the records found there as they come. This is how a node learns
    /// of records it did not append: the high watermarks (`reported`) are
    /// not taken as ends, since they count offsets no reader gets (see
    /// `authoritative_end`); an end found past its watermark counts as a
    /// stale watermark. Blocking.
    fn peek_past_ends(&self, keys: &[Key], reported: &HashMap<Key, u64>) -> Result<(), LogError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut assignment = TopicPartitionList::new();
        let mut known = HashMap::with_capacity(keys.len());
        for (topic, partition) in keys {
            let end = self.known_end(topic, *partition);
            assignment
                .add_partition_offset(topic, *partition as i32, Offset::Offset(end as i64))
                .map_err(|e| LogError::Invalid(e.to_string()))?;
            known.insert((topic.clone(), *partition), end);
        }
        let consumer = self.pooled_consumer()?;
        if let Err(error) = consumer.assign(&assignment) {
            self.return_consumer(consumer);
            return Err(unavailable("assign", error));
        }
        let mut found: HashMap<Key, u64> = HashMap::new();
        let deadline = Instant::now() + self.inner.settings.request_timeout;
        let mut quiet_until = Instant::now() + PEEK_QUIET;
        let mut result = Ok(());
        loop {
            let now = Instant::now();
            if now >= quiet_until || now >= deadline {
                break;
            }
            match consumer.poll(quiet_until.min(deadline) - now) {
                // A partition read to its end is no error.
                None | Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(error)) => {
                    metrics::counter!("cqrsd_kafka_broker_errors_total").increment(1);
                    result = Err(unavailable("peek past the end offsets", error));
                    break;
                }
                Some(Ok(message)) => {
                    let Ok(partition) = u32::try_from(message.partition()) else {
                        continue;
                    };
                    let key = (message.topic().to_owned(), partition);
                    let offset = u64::try_from(message.offset()).unwrap_or(0);
                    if known.get(&key).is_some_and(|end| offset >= *end) {
                        self.observe_end(&key.0, partition, offset + 1, false);
                        let next = found.entry(key).or_insert(0);
                        *next = (*next).max(offset + 1);
                        quiet_until = Instant::now() + PEEK_QUIET;
                    }
                }
            }
        }
        self.return_consumer(consumer);
        for (key, end) in found {
            if reported.get(&key).is_some_and(|high| end > *high) {
                metrics::counter!("cqrsd_kafka_stale_end_offsets_total").increment(1);
                tracing::debug!(
                    topic = key.0,
                    partition = key.1,
                    end,
                    "records found past the reported end offset"
                );
            }
        }
        result
    }

    fn pooled_consumer(&self) -> Result<BaseConsumer<Context>, LogError> {
        match self.inner.readers.lock().unwrap().pop() {
            Some(consumer) => Ok(consumer),
            None => Self::consumer(&self.inner.settings),
        }
    }

    fn return_consumer(&self, consumer: BaseConsumer<Context>) {
        let _ = consumer.unassign();
        let mut pool = self.inner.readers.lock().unwrap();
        if pool.len() < POOL_SIZE {
            pool.push(consumer);
        }
    }

    /// The end offset last observed for a partition (0 when none was).
    fn known_end(&self, topic: &str, partition: u32) -> u64 {
        self.inner
            .ends
            .lock()
            .unwrap()
            .get(&(topic.to_owned(), partition))
            .map_or(0, |entry| *entry.tx.borrow())
    }

    /// Records a known end offset; it only ever moves forward.
    fn observe_end(&self, topic: &str, partition: u32, end: u64, fresh: bool) {
        let mut ends = self.inner.ends.lock().unwrap();
        let entry = ends
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| End {
                tx: watch::Sender::new(0),
                fresh,
            });
        if fresh {
            entry.fresh = true;
        }
        entry.tx.send_if_modified(|current| {
            if end > *current {
                *current = end;
                true
            } else {
                false
            }
        });
    }

    fn mark_stale(&self, topic: &str, partition: u32) {
        if let Some(entry) = self
            .inner
            .ends
            .lock()
            .unwrap()
            .get_mut(&(topic.to_owned(), partition))
        {
            entry.fresh = false;
        }
    }

    /// The partition's end offset: cached, asked of the brokers when unknown
    /// or when an append to it failed.
    pub fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.check_partition(partition)?;
        if let Some(entry) = self
            .inner
            .ends
            .lock()
            .unwrap()
            .get(&(topic.to_owned(), partition))
            && entry.fresh
        {
            return Ok(*entry.tx.borrow());
        }
        // Unknown, or an append to it failed. A failed record can still be
        // written by a broker that resumes with the request buffered, so ask
        // until two answers a moment apart agree: the caller (the writer's
        // re-read) then sees such a record rather than reusing its version.
        let mut end = self.authoritative_end(topic, partition)?;
        let known = self
            .inner
            .ends
            .lock()
            .unwrap()
            .contains_key(&(topic.to_owned(), partition));
        if known {
            loop {
                std::thread::sleep(SETTLE);
                let again = self.authoritative_end(topic, partition)?;
                if again == end {
                    break;
                }
                end = again;
            }
        }
        self.observe_end(topic, partition, end, true);
        Ok(end)
    }

    /// Wakes on every change of the partition's end offset.
    pub fn subscribe(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>, LogError> {
        self.end_offset(topic, partition)?;
        let ends = self.inner.ends.lock().unwrap();
        ends.get(&(topic.to_owned(), partition))
            .map(|entry| entry.tx.subscribe())
            .ok_or_else(|| LogError::Invalid(format!("unknown partition {topic}:{partition}")))
    }

    /// Sends every record of the batch, then waits for all acknowledgements;
    /// resolves with their offsets once every one is acknowledged by all
    /// in-sync replicas, or fails within the produce timeout.
    pub async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<Vec<u64>, LogError> {
        self.check_partition(partition)?;
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        if self.inner.settings.transactional_id_prefix.is_some() {
            return self.append_owned(topic, partition, &records).await;
        }
        let result = self.produce(topic, partition, &records).await;
        if let Err(error) = &result {
            // A failed record may still land: whoever reads this partition
            // next must ask the brokers where it ends.
            self.mark_stale(topic, partition);
            metrics::counter!("cqrsd_kafka_produce_errors_total").increment(1);
            tracing::warn!(topic, partition, %error, "kafka append failed");
            self.replace_producer_if_fatal();
        }
        result
    }

    /// After a fatal producer error every later send would fail: start a new
    /// producer (a new producer id) instead of waiting for an operator.
    fn replace_producer_if_fatal(&self) {
        let current = self.inner.producer.read().unwrap().clone();
        let broken = self.inner.producer_broken.swap(false, Ordering::AcqRel);
        let Some((code, reason)) = current.client().fatal_error().or_else(|| {
            broken.then(|| {
                (
                    RDKafkaErrorCode::ProducerFenced,
                    "the producer's idempotence state was refused".to_owned(),
                )
            })
        }) else {
            return;
        };
        tracing::error!(%code, reason, "the kafka producer cannot continue; starting a new producer");
        match self
            .inner
            .producer_config
            .create_with_context::<_, FutureProducer<Context>>(Context)
        {
            Ok(fresh) => {
                let mut slot = self.inner.producer.write().unwrap();
                if Arc::ptr_eq(&slot, &current) {
                    let old = std::mem::replace(&mut *slot, Arc::new(fresh));
                    // Dropping a producer waits for its queue: not on this task.
                    std::thread::spawn(move || drop(old));
                }
            }
            Err(error) => tracing::error!(%error, "cannot start a new kafka producer"),
        }
    }

    async fn produce(
        &self,
        topic: &str,
        partition: u32,
        records: &[Record],
    ) -> Result<Vec<u64>, LogError> {
        let producer = self.inner.producer.read().unwrap().clone();
        let offsets = self
            .send_batch(
                &producer,
                &self.inner.producer_broken,
                topic,
                partition,
                records,
            )
            .await?;
        if let Some(last) = offsets.last() {
            self.observe_end(topic, partition, last + 1, false);
        }
        Ok(offsets)
    }

    /// Hands every record to `producer`, then waits for all delivery
    /// reports; sets `epoch_refused` when the brokers refused the producer's
    /// idempotence state. Publishes no end offset: a transactional caller
    /// may only do so once its transaction is committed.
    async fn send_batch(
        &self,
        producer: &FutureProducer<Context>,
        epoch_refused: &AtomicBool,
        topic: &str,
        partition: u32,
        records: &[Record],
    ) -> Result<Vec<u64>, LogError> {
        let started = Instant::now();
        // librdkafka fails every record by message.timeout.ms; this bound
        // only guards against a lost delivery report.
        let deadline = started + self.inner.settings.produce_timeout + Duration::from_secs(1);
        let count = records.len() as i64;
        let in_flight = InFlight::new(&self.inner.in_flight, count);
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let headers = record.headers.iter().fold(
                OwnedHeaders::new_with_capacity(record.headers.len()),
                |headers, (name, value)| {
                    headers.insert(Header {
                        key: name,
                        value: Some(value.as_slice()),
                    })
                },
            );
            let mut message = FutureRecord::to(topic)
                .partition(partition as i32)
                .key(record.key.as_bytes())
                .payload(record.value.as_slice())
                .headers(headers)
                .timestamp(record.timestamp_ms);
            loop {
                match producer.send_result(message) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    // Backpressure from librdkafka's local queue: wait, within the bound.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        if Instant::now() >= deadline {
                            return Err(unavailable(
                                "produce",
                                "the producer queue stayed full for the whole produce timeout",
                            ));
                        }
                        message = back;
                        tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                    }
                    Err((error, _)) => return Err(unavailable("produce", error)),
                }
            }
        }
        let results = tokio::time::timeout_at(
            tokio::time::Instant::from_std(deadline),
            futures::future::join_all(deliveries),
        )
        .await
        .map_err(|_| unavailable("produce", "no delivery report within the produce timeout"))?;
        drop(in_flight);
        let mut offsets = Vec::with_capacity(results.len());
        for result in results {
            match result {
                Ok(Ok(delivery)) => {
                    if delivery.partition != partition as i32 {
                        return Err(LogError::Invalid(format!(
                            "a record for partition {partition} went to {}",
                            delivery.partition
                        )));
                    }
                    offsets.push(u64::try_from(delivery.offset).unwrap_or(0));
                }
                Ok(Err((error, _))) => {
                    if matches!(
                        error,
                        KafkaError::MessageProduction(
                            RDKafkaErrorCode::ProducerFenced
                                | RDKafkaErrorCode::InvalidProducerEpoch
                                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                                | RDKafkaErrorCode::UnknownProducerId
                                | RDKafkaErrorCode::InvalidProducerIdMapping
                        )
                    ) {
                        epoch_refused.store(true, Ordering::Release);
                    }
                    return Err(unavailable("produce", error));
                }
                Err(_) => return Err(unavailable("produce", "the delivery report was lost")),
            }
        }
        metrics::histogram!("cqrsd_kafka_produce_seconds").record(started.elapsed().as_secs_f64());
        Ok(offsets)
    }

    /// Up to `max` records of a partition from offset `from`, stopping at the
    /// end offset known when the call starts. Blocking.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, LogError> {
        let end = self.end_offset(topic, partition)?;
        if from >= end || max == 0 {
            return Ok(Vec::new());
        }
        let want = usize::try_from(end - from).unwrap_or(usize::MAX).min(max);
        let consumer = self.pooled_consumer()?;
        let result = self.read_with(&consumer, topic, partition, from, end, want);
        self.return_consumer(consumer);
        if let Ok(records) = &result {
            let next = records.last().map_or(from, |(offset, _)| offset + 1);
            metrics::gauge!("cqrsd_kafka_consumer_lag", "topic" => topic.to_owned(), "partition" => partition.to_string())
                .set(end.saturating_sub(next) as f64);
        }
        result
    }

    fn read_with(
        &self,
        consumer: &BaseConsumer<Context>,
        topic: &str,
        partition: u32,
        from: u64,
        end: u64,
        want: usize,
    ) -> Result<Vec<(u64, Record)>, LogError> {
        assign_at(consumer, topic, partition, from)?;
        let deadline = Instant::now() + self.inner.settings.request_timeout;
        let mut records = Vec::with_capacity(want.min(4096));
        let mut next = from;
        let mut last_error: Option<KafkaError> = None;
        while records.len() < want && next < end {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unavailable(
                    &format!("read of {topic}:{partition} from {from}"),
                    last_error.map_or_else(|| "timed out".to_owned(), |e| e.to_string()),
                ));
            }
            match consumer.poll(left.min(Duration::from_millis(100))) {
                // Reaching the end is no error; the loop ends at `end`.
                None | Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(error)) => {
                    metrics::counter!("cqrsd_kafka_broker_errors_total").increment(1);
                    last_error = Some(error);
                }
                Some(Ok(message)) => {
                    let offset = u64::try_from(message.offset()).unwrap_or(0);
                    // Skip anything left from an earlier assignment of this consumer.
                    if message.topic() != topic
                        || message.partition() != partition as i32
                        || offset < next
                    {
                        continue;
                    }
                    next = offset + 1;
                    records.push((offset, to_record(&message, topic, partition)?));
                }
            }
        }
        Ok(records)
    }

    /// Waits for queued records to be delivered and stops the refresher. Blocking.
    pub fn close(&self) -> Result<(), LogError> {
        self.inner.closed.store(true, Ordering::Release);
        let producer = self.inner.producer.read().unwrap().clone();
        producer
            .flush(self.inner.settings.produce_timeout)
            .map_err(|e| unavailable("flush", e))
    }
}

/// Connects to a Kafka cluster as the daemon's event log, with topics named
/// `<topic_prefix>.<aggregate>`. Blocking.
pub fn open_event_log(settings: KafkaSettings, topic_prefix: String) -> Result<EventLog, LogError> {
    let partitions = settings.partitions;
    Ok(EventLog::new(
        Arc::new(KafkaLog::open(settings)?),
        topic_prefix,
        partitions,
    ))
}

impl LogBackend for KafkaLog {
    fn ensure_topic(&self, topic: &str) -> Result<(), LogError> {
        KafkaLog::ensure_topic(self, topic)
    }

    /// The append starts when the future is first polled; the expected offset
    /// is not checked, since Kafka appends are never pipelined.
    fn start_append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
        _expected_offset: Option<u64>,
    ) -> AppendFuture {
        let log = self.clone();
        let topic = topic.to_owned();
        Box::pin(async move { log.append(&topic, partition, records).await })
    }

    /// A failed produce says nothing about the records sent after it, so a
    /// writer must wait for each append before it decides the next batch.
    fn pipelines_appends(&self) -> bool {
        false
    }

    fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, LogError> {
        KafkaLog::read(self, topic, partition, from, max)
    }

    fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        KafkaLog::end_offset(self, topic, partition)
    }

    fn subscribe(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>, LogError> {
        KafkaLog::subscribe(self, topic, partition)
    }

    fn close(&self) -> Result<(), LogError> {
        KafkaLog::close(self)
    }
}

/// Counts records awaiting acknowledgement, also when the wait is cancelled.
struct InFlight<'a> {
    counter: &'a AtomicI64,
    count: i64,
}

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicI64, count: i64) -> Self {
        let now = counter.fetch_add(count, Ordering::Relaxed) + count;
        metrics::gauge!("cqrsd_kafka_in_flight_records").set(now as f64);
        Self { counter, count }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let now = self.counter.fetch_sub(self.count, Ordering::Relaxed) - self.count;
        metrics::gauge!("cqrsd_kafka_in_flight_records").set(now as f64);
    }
}

/// Points a pooled consumer at one partition from `from` (manual assignment,
/// no group join).
fn assign_at(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partition: u32,
    from: u64,
) -> Result<(), LogError> {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition as i32, Offset::Offset(from as i64))
        .map_err(|e| LogError::Invalid(e.to_string()))?;
    consumer
        .assign(&assignment)
        .map_err(|e| unavailable("assign", e))
}

fn to_record(message: &impl Message, topic: &str, partition: u32) -> Result<Record, LogError> {
    let at = || format!("{topic}:{partition}:{}", message.offset());
    let key = std::str::from_utf8(message.key().unwrap_or_default())
        .map_err(|_| LogError::Corrupt(format!("{}: the key is not UTF-8", at())))?
        .to_owned();
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Ok(Record {
        key,
        headers,
        value: message.payload().unwrap_or_default().to_vec(),
        timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
    })
}

/// Refreshes every known partition's end offset until the log is dropped or
/// closed: the high watermark, then a peek past the known ends, because a
/// node that does not append to a partition itself (a query node, or any
/// node reading another writer's partition) learns its end only this way,
/// and the test broker can report a watermark behind records it has
/// acknowledged (README, Kafka) until the next write moves it.
fn refresh_ends(weak: Weak<Inner>) {
    loop {
        std::thread::sleep(REFRESH_EVERY);
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let log = KafkaLog { inner };
        let keys: Vec<Key> = log.inner.ends.lock().unwrap().keys().cloned().collect();
        let mut reachable = true;
        let mut reported = HashMap::with_capacity(keys.len());
        for (topic, partition) in &keys {
            match log.fetch_end(topic, *partition) {
                Ok(end) => {
                    // Not an end to publish (it counts transaction markers
                    // no reader gets): the peek below moves the ends.
                    reported.insert((topic.clone(), *partition), end);
                    metrics::gauge!("cqrsd_kafka_end_offset", "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(end as f64);
                }
                Err(error) => {
                    tracing::debug!(%error, "end offset refresh failed");
                    reachable = false;
                    break;
                }
            }
        }
        if reachable && let Err(error) = log.peek_past_ends(&keys, &reported) {
            tracing::debug!(%error, "peek past the end offsets failed");
        }
    }
}
