//! Aggregate histories: the indexer that derives the persisted history index
//! (`store::HistoryStore`) from the log, and the reads behind
//! `GET /aggregates/{a}/{id}/events`.
//!
//! The index is kept off the append path: one tracked task per (aggregate
//! topic, partition) tails the partition from the index's stored position and
//! commits each read's entries with the new position in one batch, on a
//! blocking thread. A history read first waits, like `consistent_with`, until
//! the index has reached the log's end as of the request, so a command's
//! events are in its history as soon as its reply is sent; past the
//! configured bound the read is answered 503 with Retry-After.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::CommandFailure;
use crate::log::{EventLog, LogError, Record};
use crate::store::{HistoryEntry, HistoryStore, StoreError};

/// Records read and indexed per batch; also the span within which the records
/// of one history are read with one range read rather than one by one.
const CHUNK: usize = 2000;

/// How long an indexer waits after a failed read or commit before it retries.
const RETRY: Duration = Duration::from_millis(500);

/// The history index and how far each partition of it has come.
#[derive(Debug)]
pub(super) struct Histories {
    store: HistoryStore,
    log: EventLog,
    /// Topic → each partition's indexer, as a history read sees it.
    partitions: HashMap<String, Vec<Partition>>,
    wait: Duration,
}

/// One partition's indexer seen from the history reads.
#[derive(Debug)]
struct Partition {
    /// The indexed position (next offset).
    indexed: watch::Receiver<u64>,
    /// Whether the partition's history has been asked for: an indexer starts
    /// on its first history read (or at startup when its index already holds
    /// some of the partition), so a node whose histories nobody reads pays
    /// nothing for them.
    asked: watch::Sender<bool>,
}

impl Histories {
    /// Starts one indexer per partition of every topic on `runtime`; they
    /// begin once `restored` is true.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        store: HistoryStore,
        restored: watch::Receiver<bool>,
        log: EventLog,
        topics: Vec<String>,
        wait: Duration,
        runtime: &tokio::runtime::Handle,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Histories {
        let mut partitions = HashMap::new();
        for topic in topics {
            let mut seen = Vec::new();
            for partition in 0..log.partitions() {
                let (tx, indexed) = watch::channel(0);
                let (ask, asked) = watch::channel(false);
                seen.push(Partition {
                    indexed,
                    asked: ask,
                });
                let indexer = Indexer {
                    store: store.clone(),
                    log: log.clone(),
                    topic: topic.clone(),
                    partition,
                    indexed: tx,
                };
                tracker.spawn_on(indexer.run(restored.clone(), asked, stop.clone()), runtime);
            }
            partitions.insert(topic, seen);
        }
        Histories {
            store,
            log,
            partitions,
            wait,
        }
    }

    /// Waits until the partition's index has reached the log's end as of now,
    /// at most the configured bound.
    pub(super) async fn caught_up(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(), CommandFailure> {
        let seen = self
            .partitions
            .get(topic)
            .and_then(|partitions| partitions.get(partition as usize))
            .ok_or_else(|| CommandFailure::Internal(format!("no history index for {topic}")))?;
        seen.asked
            .send_if_modified(|asked| !std::mem::replace(asked, true));
        let mut indexed = seen.indexed.clone();
        let end = self.log.end_offset(topic, partition)?;
        let reached = tokio::time::timeout(self.wait, indexed.wait_for(|at| *at >= end))
            .await
            .map(|reached| reached.map(|_| ()));
        match reached {
            Ok(Ok(())) => Ok(()),
            // The indexer stopped: the daemon is shutting down.
            Ok(Err(_)) => Err(CommandFailure::ShuttingDown),
            Err(_) => Err(CommandFailure::HistoryBehind {
                lag: end.saturating_sub(*indexed.borrow()),
            }),
        }
    }

    /// The records of `aggregate_id` in `partition` that hold versions at or
    /// above `from_version`, at most `max`, in offset order. Blocking.
    pub(super) fn records(
        &self,
        topic: &str,
        partition: u32,
        aggregate_id: &str,
        from_version: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, CommandFailure> {
        let wanted = self
            .store
            .offsets(topic, partition, aggregate_id, from_version, max)
            .map_err(unavailable)?;
        // Read the wanted records in runs: records close together are read with
        // one range read (a Kafka fetch is costly), records far apart each alone.
        let mut found = Vec::with_capacity(wanted.len());
        let mut i = 0;
        while let Some(&start) = wanted.get(i) {
            let mut j = i;
            while wanted
                .get(j + 1)
                .is_some_and(|&next| next - start < CHUNK as u64)
            {
                j += 1;
            }
            let stop = wanted[j];
            let mut from = start;
            while from <= stop {
                let records = self
                    .log
                    .read(topic, partition, from, (stop - from + 1) as usize)?;
                let Some((last, _)) = records.last() else {
                    break;
                };
                from = last + 1;
                found.extend(
                    records
                        .into_iter()
                        .filter(|(offset, _)| wanted[i..=j].binary_search(offset).is_ok()),
                );
            }
            i = j + 1;
        }
        if found.len() < wanted.len() {
            return Err(CommandFailure::Internal(format!(
                "the history index of {topic}:{partition} names records the log does not hold"
            )));
        }
        Ok(found)
    }
}

fn unavailable(error: StoreError) -> CommandFailure {
    CommandFailure::Unavailable(format!("history index: {error}"))
}

/// Keeps one partition's index up to date with the log.
struct Indexer {
    store: HistoryStore,
    log: EventLog,
    topic: String,
    partition: u32,
    indexed: watch::Sender<u64>,
}

impl Indexer {
    async fn run(
        self,
        mut restored: watch::Receiver<bool>,
        mut asked: watch::Receiver<bool>,
        stop: CancellationToken,
    ) {
        tokio::select! {
            _ = stop.cancelled() => return,
            started = restored.wait_for(|restored| *restored) => if started.is_err() { return },
        }
        let this = Arc::new(self);
        // Indexing a partition costs a sled write per record (BENCHMARKS.md,
        // "The history index"), so it starts only once its history is asked
        // for, or at once when the index already holds some of it (it was
        // asked for before a restart and must keep up).
        let store = this.clone();
        let kept = tokio::task::spawn_blocking(move || {
            store.store.position(&store.topic, store.partition)
        })
        .await;
        if !matches!(kept, Ok(Ok(position)) if position > 0) {
            tokio::select! {
                _ = stop.cancelled() => return,
                asked = asked.wait_for(|asked| *asked) => if asked.is_err() { return },
            }
        }
        let mut end = match this.log.subscribe(&this.topic, this.partition) {
            Ok(end) => end,
            Err(error) => {
                tracing::error!(topic = %this.topic, partition = this.partition, %error, "history index cannot follow the log");
                return;
            }
        };
        let mut started = false;
        while !stop.is_cancelled() {
            let at = *end.borrow_and_update();
            let behind = *this.indexed.borrow() < at;
            if started && !behind {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    changed = end.changed() => if changed.is_err() { break },
                }
                continue;
            }
            let indexer = this.clone();
            let step = tokio::task::spawn_blocking(move || {
                if started {
                    indexer.index_chunk()
                } else {
                    indexer.resume(at).map(|()| true)
                }
            })
            .await;
            let pause = match step {
                Ok(Ok(progressed)) => {
                    started = true;
                    !progressed
                }
                Ok(Err(error)) => {
                    tracing::warn!(topic = %this.topic, partition = this.partition, %error, "history indexing failed; retrying");
                    // Resume from the stored position: after a reopen it may
                    // be behind the one this indexer published.
                    started = false;
                    if matches!(
                        error,
                        IndexError::Store(
                            StoreError::Sled(_) | StoreError::Io(_) | StoreError::Unavailable(_)
                        )
                    ) {
                        // sled fails every operation after an I/O error until
                        // it is reopened (a full disk that was freed, say).
                        let indexer = this.clone();
                        let reopened =
                            tokio::task::spawn_blocking(move || indexer.store.reopen()).await;
                        if let Ok(Err(error)) = reopened {
                            tracing::warn!(%error, "history index cannot be reopened yet");
                        }
                    }
                    true
                }
                Err(error) => {
                    tracing::error!(%error, "history indexer panicked");
                    return;
                }
            };
            // A failed step, or a read that found nothing below a known end (a
            // broker that is slow to serve it), is tried again after a pause.
            if pause {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
        let indexer = this.clone();
        let flushed = tokio::task::spawn_blocking(move || indexer.store.flush()).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "history index flush failed");
        }
    }

    /// Reads the stored position; an index ahead of the log (the log was
    /// replaced by a shorter one) is dropped and rebuilt from offset 0.
    /// Blocking.
    fn resume(&self, end: u64) -> Result<(), IndexError> {
        let mut position = self.store.position(&self.topic, self.partition)?;
        if position > end {
            tracing::warn!(
                topic = %self.topic,
                partition = self.partition,
                indexed = position,
                end,
                "the history index is ahead of the log; rebuilding it for this partition"
            );
            self.store.reset(&self.topic, self.partition)?;
            position = 0;
        }
        self.publish(position, end);
        Ok(())
    }

    /// Indexes the next records of the partition; false when there were none.
    /// Blocking.
    fn index_chunk(&self) -> Result<bool, IndexError> {
        let from = *self.indexed.borrow();
        let records = self.log.read(&self.topic, self.partition, from, CHUNK)?;
        let Some(&(last, _)) = records.last() else {
            return Ok(false);
        };
        let entries = records
            .into_iter()
            .map(|(offset, record)| {
                let (_, last_version) = record.version_range().map_err(|e| {
                    IndexError::Log(LogError::Corrupt(format!(
                        "record {}:{}:{offset}: {e}",
                        self.topic, self.partition
                    )))
                })?;
                Ok(HistoryEntry {
                    aggregate_id: record.key,
                    offset,
                    last_version,
                })
            })
            .collect::<Result<Vec<_>, IndexError>>()?;
        if !self
            .store
            .commit(&self.topic, self.partition, from, last + 1, &entries)?
        {
            return Err(IndexError::Moved);
        }
        let end = self
            .log
            .end_offset(&self.topic, self.partition)
            .unwrap_or(last + 1);
        self.publish(last + 1, end);
        Ok(true)
    }

    fn publish(&self, position: u64, end: u64) {
        self.indexed.send_replace(position);
        metrics::gauge!(
            "cqrsd_history_index_lag",
            "topic" => self.topic.clone(),
            "partition" => self.partition.to_string()
        )
        .set(end.saturating_sub(position) as f64);
    }
}

/// Why a step of an indexer failed; it retries after a pause either way.
#[derive(Debug, thiserror::Error)]
enum IndexError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored position is not where this indexer stood (the database was
    /// reopened and lost what sled had not written): it resumes from there.
    #[error("the stored history position moved; resuming from it")]
    Moved,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Encoding, Event, EventMetadata, encode};
    use crate::store::{EmbeddedSettings, open_embedded};

    const TOPIC: &str = "cqrsd.account";

    /// The histories of `TOPIC` on a write side that has restored.
    fn restored_histories(
        store: HistoryStore,
        log: EventLog,
        tracker: &TaskTracker,
        stop: &CancellationToken,
    ) -> Histories {
        Histories::start(
            store,
            watch::channel(true).1,
            log,
            vec![TOPIC.to_owned()],
            Duration::from_secs(30),
            &tokio::runtime::Handle::current(),
            tracker,
            stop.clone(),
        )
    }

    fn record(id: &str, versions: std::ops::RangeInclusive<u64>) -> Record {
        let events: Vec<Event> = versions
            .map(|version| Event {
                event_id: uuid::Uuid::now_v7(),
                aggregate_type: "account".into(),
                aggregate_id: id.into(),
                version,
                event_type: "MoneyDeposited".into(),
                timestamp: chrono::DateTime::from_timestamp_millis(1_764_000_000_000).unwrap(),
                data: serde_json::json!({"amount": 1}),
                schema_version: 1,
                metadata: EventMetadata {
                    command: "deposit".into(),
                    command_id: uuid::Uuid::now_v7(),
                    idempotency_key: None,
                    correlation_id: None,
                    request_hash: "h".into(),
                    principal: None,
                },
            })
            .collect();
        encode(&events, Encoding::MessagePack).unwrap()
    }

    fn log(dir: &std::path::Path) -> EventLog {
        let log = open_embedded(EmbeddedSettings {
            data_dir: dir.to_owned(),
            topic_prefix: "cqrsd".into(),
            partitions: 1,
            group_commit_max_records: 4096,
            group_commit_max_delay: Duration::ZERO,
            fsync: false,
            segment_bytes: 1 << 20,
        })
        .unwrap();
        log.ensure_topic(TOPIC).unwrap();
        log
    }

    fn versions(records: &[(u64, Record)]) -> Vec<(u64, u64)> {
        records
            .iter()
            .map(|(_, r)| r.version_range().unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_indexer_follows_the_log_and_reads_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path());
        log.append(TOPIC, 0, vec![record("a", 1..=2), record("ab", 1..=1)])
            .await
            .unwrap();
        let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let histories = Arc::new(restored_histories(
            store.clone(),
            log.clone(),
            &tracker,
            &stop,
        ));
        for round in 0..3u64 {
            // Appended while the indexer runs: the wait covers it.
            log.append(TOPIC, 0, vec![record("a", 3 + round..=3 + round)])
                .await
                .unwrap();
            histories.caught_up(TOPIC, 0).await.unwrap();
            let h = histories.clone();
            let found = tokio::task::spawn_blocking(move || h.records(TOPIC, 0, "a", 1, 100))
                .await
                .unwrap()
                .unwrap();
            let mut expected = vec![(1, 2)];
            expected.extend((0..=round).map(|r| (3 + r, 3 + r)));
            assert_eq!(versions(&found), expected);
        }
        let h = histories.clone();
        let (from_four, first) = tokio::task::spawn_blocking(move || {
            (
                h.records(TOPIC, 0, "a", 4, 100).unwrap(),
                h.records(TOPIC, 0, "a", 1, 1).unwrap(),
            )
        })
        .await
        .unwrap();
        assert_eq!(versions(&from_four), vec![(4, 4), (5, 5)]);
        assert_eq!(versions(&first), vec![(1, 2)]);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(store.position(TOPIC, 0).unwrap(), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_is_indexed_only_once_its_history_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path());
        log.append(TOPIC, 0, vec![record("a", 1..=1), record("b", 1..=1)])
            .await
            .unwrap();
        let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let histories = restored_histories(store.clone(), log, &tracker, &stop);
        // Restored, records in the log, nobody asking: nothing is indexed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(store.position(TOPIC, 0).unwrap(), 0);
        assert_eq!(*histories.partitions[TOPIC][0].indexed.borrow(), 0);
        // The first history read starts the indexer and waits for it.
        histories.caught_up(TOPIC, 0).await.unwrap();
        assert_eq!(*histories.partitions[TOPIC][0].indexed.borrow(), 2);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(store.position(TOPIC, 0).unwrap(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_past_the_wait_is_refused_with_the_lag() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path());
        log.append(TOPIC, 0, vec![record("a", 1..=1), record("a", 2..=2)])
            .await
            .unwrap();
        // No indexer runs: the index stays at 0.
        let (_indexed_tx, indexed) = watch::channel(0);
        let (asked, _asked_rx) = watch::channel(false);
        let histories = Histories {
            store: HistoryStore::open(dir.path(), 1 << 20).unwrap(),
            log,
            partitions: HashMap::from([(TOPIC.to_owned(), vec![Partition { indexed, asked }])]),
            wait: Duration::from_millis(10),
        };
        match histories.caught_up(TOPIC, 0).await {
            Err(CommandFailure::HistoryBehind { lag }) => assert_eq!(lag, 2),
            other => panic!("expected HistoryBehind, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_index_ahead_of_the_log_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path());
        log.append(TOPIC, 0, vec![record("a", 1..=1)])
            .await
            .unwrap();
        let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
        // Left from a longer log that has since been replaced.
        let stale = HistoryEntry {
            aggregate_id: "gone".into(),
            offset: 5,
            last_version: 9,
        };
        store.commit(TOPIC, 0, 0, 10, &[stale]).unwrap();
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let histories = restored_histories(store.clone(), log, &tracker, &stop);
        let mut indexed = histories.partitions[TOPIC][0].indexed.clone();
        indexed.wait_for(|at| *at == 1).await.unwrap();
        assert!(store.offsets(TOPIC, 0, "gone", 1, 10).unwrap().is_empty());
        assert_eq!(store.offsets(TOPIC, 0, "a", 1, 10).unwrap(), vec![0]);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
