//! Partition ownership on Kafka: the fence that keeps a stale owner's writes
//! out of the log when several command nodes share a topic's partitions.
//!
//! A node appends to a partition only after it has taken it
//! ([`KafkaLog::take_partition`]): that creates a transactional producer
//! whose `transactional.id` is `<prefix>.<topic>.<partition>`, the same on
//! every node, and calls `init_transactions`. The broker then bumps the
//! epoch of that id, aborts the previous owner's open transaction, and
//! refuses every later produce and commit of the previous owner
//! (`ProducerFenced`); the test broker does this too
//! (`examples/tansu_transactions.rs`). Each append is one transaction, and
//! is acknowledged only once its commit is: a record whose transaction did
//! not commit is never acknowledged.
//!
//! Aborted records: Kafka hides them from `read_committed` readers (every
//! cqrsd reader, librdkafka's default); the test broker returns them like
//! committed data, and librdkafka never hands the application the control
//! records that would tell them apart. Either way every reader of a
//! partition sees the same records, the writer's restore included, so the
//! rules here are that nobody may act on a record before its transaction is
//! decided (`read_committed` stops at an open transaction on both brokers),
//! and that an owner never goes on from state that assumes an aborted batch
//! absent: after a failed batch the transaction is aborted *before* the
//! append returns its error, the partition's end is marked stale, and the
//! writer re-reads the partition to its end (as after any failed Kafka
//! append) before its next command. A record the broker shows after an abort
//! is then folded like any other, never given its version a second time, and
//! its client, who got an error, finds the first answer when it retries with
//! its `Idempotency-Key` (the key is in the record, so the restore rebuilds
//! it). The taker, likewise, restores the partition only after its
//! `init_transactions`, so whatever the previous owner left is in its state.
//!
//! A producer that is fenced, or whose transaction cannot be aborted, is
//! broken: its partition's appends answer [`LogError::NotOwned`] until the
//! partition is taken again. Only whoever decides ownership may do that,
//! since taking a partition fences its current owner.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};

use super::{Context, KafkaLog, ms, unavailable};
use crate::log::{LogError, Record};

/// The pause between looks at librdkafka's outstanding count before a commit.
const COMMIT_SETTLE_STEP: Duration = Duration::from_millis(1);

/// One partition this node owns.
pub(super) struct Owned {
    producer: FutureProducer<Context>,
    transactional_id: String,
    /// One transaction at a time: a writer never pipelines Kafka appends,
    /// and librdkafka allows one open transaction per producer.
    turn: tokio::sync::Mutex<()>,
    /// The producer cannot go on (fenced, or a transaction left undecided).
    broken: AtomicBool,
    /// A delivery report said the brokers refused the producer's epoch.
    epoch_refused: AtomicBool,
}

impl KafkaLog {
    /// The `transactional.id` of a partition's owner, the same on every
    /// node; `None` without `transactional_id_prefix`.
    pub fn transactional_id(&self, topic: &str, partition: u32) -> Option<String> {
        self.inner
            .settings
            .transactional_id_prefix
            .as_ref()
            .map(|prefix| format!("{prefix}.{topic}.{partition}"))
    }

    /// Takes a partition: a new transactional producer for it, whose
    /// `init_transactions` fences whichever producer held the partition's
    /// transactional id before (another node's, or this node's own broken
    /// one). The partition's end is marked stale, so the caller's restore,
    /// which must come after this, reads everything the previous owner left.
    /// Returns how long the fence took. Blocking.
    pub fn take_partition(&self, topic: &str, partition: u32) -> Result<Duration, LogError> {
        self.check_partition(partition)?;
        let Some(transactional_id) = self.transactional_id(topic, partition) else {
            return Err(LogError::Invalid(
                "partitions are taken only with a transactional_id_prefix".to_owned(),
            ));
        };
        let started = Instant::now();
        let settings = &self.inner.settings;
        let mut config = self.inner.producer_config.clone();
        config
            .set("transactional.id", &transactional_id)
            // librdkafka wants a transaction to outlive its records' timeout.
            .set(
                "transaction.timeout.ms",
                ms(settings.produce_timeout.max(Duration::from_secs(1)) * 2),
            );
        let producer: FutureProducer<Context> = config
            .create_with_context(Context)
            .map_err(|e| unavailable("cannot create a transactional producer", e))?;
        producer
            .init_transactions(settings.request_timeout)
            .map_err(|e| {
                unavailable(
                    &format!("cannot take {topic}:{partition} ({transactional_id})"),
                    e,
                )
            })?;
        let owned = Arc::new(Owned {
            producer,
            transactional_id,
            turn: tokio::sync::Mutex::new(()),
            broken: AtomicBool::new(false),
            epoch_refused: AtomicBool::new(false),
        });
        let took = started.elapsed();
        self.mark_stale(topic, partition);
        let (previous, owned_now) = {
            let mut owners = self.inner.owners.lock().unwrap();
            let previous = owners.insert((topic.to_owned(), partition), owned);
            (previous, owners.len())
        };
        if let Some(previous) = previous {
            // Dropping a producer waits for its queue: not on the caller's thread.
            std::thread::spawn(move || drop(previous));
        }
        metrics::counter!("cqrsd_kafka_partitions_taken_total").increment(1);
        metrics::gauge!("cqrsd_kafka_partitions_owned").set(owned_now as f64);
        metrics::histogram!("cqrsd_kafka_fence_seconds").record(took.as_secs_f64());
        tracing::info!(topic, partition, ?took, "partition taken");
        Ok(took)
    }

    /// Gives a partition up: its appends answer [`LogError::NotOwned`] from
    /// now on (one already started finishes first). The caller stops taking
    /// its commands and answers those in flight before. False when the
    /// partition was not owned.
    pub fn release_partition(&self, topic: &str, partition: u32) -> bool {
        let (released, owned_now) = {
            let mut owners = self.inner.owners.lock().unwrap();
            let released = owners.remove(&(topic.to_owned(), partition));
            (released, owners.len())
        };
        metrics::gauge!("cqrsd_kafka_partitions_owned").set(owned_now as f64);
        match released {
            Some(owned) => {
                std::thread::spawn(move || drop(owned));
                tracing::info!(topic, partition, "partition released");
                true
            }
            None => false,
        }
    }

    /// How often another node fenced one of this node's partition owners.
    pub fn fenced_count(&self) -> u64 {
        self.inner.fenced.load(Ordering::Relaxed)
    }

    /// The partitions this node owns, sorted.
    pub fn owned_partitions(&self) -> Vec<(String, u32)> {
        let mut owned: Vec<(String, u32)> =
            self.inner.owners.lock().unwrap().keys().cloned().collect();
        owned.sort();
        owned
    }

    /// Appends a batch as one transaction of the partition's owner; see the
    /// module documentation for what a failure leaves behind.
    pub(super) async fn append_owned(
        &self,
        topic: &str,
        partition: u32,
        records: &[Record],
    ) -> Result<Vec<u64>, LogError> {
        let owned = self
            .inner
            .owners
            .lock()
            .unwrap()
            .get(&(topic.to_owned(), partition))
            .cloned()
            .ok_or_else(|| {
                LogError::NotOwned(format!("{topic}:{partition} is not taken by this node"))
            })?;
        let result = {
            let _turn = owned.turn.lock().await;
            self.transaction(&owned, topic, partition, records).await
        };
        // Released or fenced meanwhile: the last reference is this one, and
        // dropping a producer waits for its queue, so not on this task.
        if Arc::strong_count(&owned) == 1 {
            std::thread::spawn(move || drop(owned));
        }
        result
    }

    /// One batch as one transaction of `owned`.
    async fn transaction(
        &self,
        owned: &Arc<Owned>,
        topic: &str,
        partition: u32,
        records: &[Record],
    ) -> Result<Vec<u64>, LogError> {
        if owned.broken.load(Ordering::Acquire) {
            return Err(LogError::NotOwned(format!(
                "{topic}:{partition}: its producer was fenced or left a transaction undecided"
            )));
        }
        let started = Instant::now();
        // Beginning a transaction only changes the producer's local state.
        if let Err(error) = owned.producer.begin_transaction() {
            return Err(self
                .transaction_failed(owned, topic, partition, error)
                .await);
        }
        let offsets = match self
            .send_batch(
                &owned.producer,
                &owned.epoch_refused,
                topic,
                partition,
                records,
            )
            .await
        {
            Ok(offsets) => offsets,
            Err(error) => {
                return Err(self.abort_after(owned, topic, partition, error).await);
            }
        };
        // rdkafka's commit first flushes, and while librdkafka still counts
        // anything outstanding (delivery events not yet served by the
        // producer's polling thread, the partition's registration) that
        // flush waits in polls of up to 100 ms that the polling thread wins:
        // a commit took about 100 ms that way. Every record is delivered by
        // now, so wait here, briefly and off any thread, until nothing is.
        let settle_until = Instant::now() + self.inner.settings.produce_timeout;
        while owned.producer.in_flight_count() > 0 && Instant::now() < settle_until {
            tokio::time::sleep(COMMIT_SETTLE_STEP).await;
        }
        let committing = Arc::clone(owned);
        let timeout = self.inner.settings.produce_timeout;
        let committed =
            tokio::task::spawn_blocking(move || committing.producer.commit_transaction(timeout))
                .await
                .unwrap_or_else(|_| Err(KafkaError::Canceled));
        if let Err(error) = committed {
            return Err(self
                .transaction_failed(owned, topic, partition, error)
                .await);
        }
        metrics::histogram!("cqrsd_kafka_transaction_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Some(last) = offsets.last() {
            self.observe_end(topic, partition, last + 1, false);
        }
        Ok(offsets)
    }

    /// After a failed send: the transaction is aborted before the error is
    /// returned, so the writer's re-read sees the batch decided.
    async fn abort_after(
        &self,
        owned: &Arc<Owned>,
        topic: &str,
        partition: u32,
        error: LogError,
    ) -> LogError {
        self.mark_stale(topic, partition);
        metrics::counter!("cqrsd_kafka_produce_errors_total").increment(1);
        if self.is_fenced(owned) {
            return self.fenced(owned, topic, partition);
        }
        let aborting = Arc::clone(owned);
        let timeout = self.inner.settings.produce_timeout;
        let aborted =
            tokio::task::spawn_blocking(move || aborting.producer.abort_transaction(timeout))
                .await
                .unwrap_or_else(|_| Err(KafkaError::Canceled));
        match aborted {
            Ok(()) => {
                tracing::warn!(topic, partition, %error, "kafka transaction aborted");
                error
            }
            Err(abort_error) => {
                if fencing_error(&abort_error) || self.is_fenced(owned) {
                    return self.fenced(owned, topic, partition);
                }
                owned.broken.store(true, Ordering::Release);
                tracing::error!(topic, partition, %error, %abort_error, "a failed kafka transaction could not be aborted; the partition must be taken again");
                LogError::NotOwned(format!(
                    "{topic}:{partition}: a failed transaction could not be aborted ({abort_error})"
                ))
            }
        }
    }

    /// After a failed begin or commit: abort when librdkafka says the
    /// transaction can be, else the producer is broken.
    async fn transaction_failed(
        &self,
        owned: &Arc<Owned>,
        topic: &str,
        partition: u32,
        error: KafkaError,
    ) -> LogError {
        let abortable = matches!(&error, KafkaError::Transaction(e) if e.txn_requires_abort());
        let as_log = unavailable(&format!("transaction on {topic}:{partition}"), &error);
        if abortable {
            return self.abort_after(owned, topic, partition, as_log).await;
        }
        self.mark_stale(topic, partition);
        metrics::counter!("cqrsd_kafka_produce_errors_total").increment(1);
        if fencing_error(&error) || self.is_fenced(owned) {
            return self.fenced(owned, topic, partition);
        }
        // A commit that timed out or failed otherwise leaves the outcome
        // unknown; only a new `init_transactions` decides it.
        owned.broken.store(true, Ordering::Release);
        tracing::error!(topic, partition, %error, "kafka transaction left undecided; the partition must be taken again");
        LogError::NotOwned(format!(
            "{topic}:{partition}: the transaction's outcome is unknown ({error})"
        ))
    }

    /// Whether the brokers fenced this owner: librdkafka's fatal error (a
    /// transactional producer that is fenced cannot go on), or a delivery
    /// report that refused the producer's epoch.
    fn is_fenced(&self, owned: &Owned) -> bool {
        let fatal = owned
            .producer
            .client()
            .fatal_error()
            .is_some_and(|(code, _)| fencing_code(code));
        fatal || owned.epoch_refused.load(Ordering::Acquire)
    }

    /// A fenced owner owns the partition no more: it leaves the owned set
    /// (unless it was taken again meanwhile).
    fn fenced(&self, owned: &Arc<Owned>, topic: &str, partition: u32) -> LogError {
        owned.broken.store(true, Ordering::Release);
        let owned_now = {
            let mut owners = self.inner.owners.lock().unwrap();
            let key = (topic.to_owned(), partition);
            if owners.get(&key).is_some_and(|now| Arc::ptr_eq(now, owned)) {
                owners.remove(&key);
            }
            owners.len()
        };
        metrics::gauge!("cqrsd_kafka_partitions_owned").set(owned_now as f64);
        self.inner.fenced.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("cqrsd_kafka_fenced_total").increment(1);
        tracing::warn!(
            topic,
            partition,
            transactional_id = owned.transactional_id,
            "fenced: another node took this partition"
        );
        LogError::NotOwned(format!(
            "{topic}:{partition} was taken by another node, which fenced this one"
        ))
    }
}

/// The codes by which the brokers, or librdkafka on their word, say that a
/// newer producer took the transactional id.
fn fencing_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::Fenced
    )
}

fn fencing_error(error: &KafkaError) -> bool {
    match error {
        KafkaError::Transaction(e) => fencing_code(e.code()),
        KafkaError::MessageProduction(code) => fencing_code(*code),
        _ => error.rdkafka_error_code().is_some_and(fencing_code),
    }
}
