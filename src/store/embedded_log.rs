//! The embedded event log: a partitioned, append-only log in sled with group commit.
//!
//! Layout of the sled database at `<data_dir>/log` (see docs/record-format.md):
//! - `meta`: `format` → `"1"`, `topic/<topic>` → partition count (u32 big-endian);
//! - `p/<topic>/<partition>`: offset (u64 big-endian) → framed record;
//! - `i/<topic>`: (aggregate id, first version) → (partition, offset, last version).
//!
//! One appender thread owns all writes. It gathers every queued append into a group,
//! writes the group's records and index entries in one sled transaction (so a crash
//! leaves all of a command's events or none), makes them durable with one sled flush and
//! one `fdatasync`, and only then publishes the new end offsets and answers the callers.
//! Readers never see past the durable end, so nothing they read can vanish in a crash.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::{oneshot, watch};

use super::StoreError;
use super::frame::{decode_frame, encode_frame};
use crate::log::Record;
use crate::log::position::validate_topic_name;

/// Version of the embedded storage layout, checked at open.
const STORAGE_FORMAT: &[u8] = b"1";
const META_FORMAT_KEY: &[u8] = b"format";
const META_TOPIC_PREFIX: &[u8] = b"topic/";

#[derive(Debug, Clone)]
pub struct EmbeddedLogOptions {
    /// Partitions of every topic created by this log.
    pub partitions: u32,
    /// Upper bound on the records written by one group commit.
    pub group_commit_max_records: usize,
    /// Extra time the appender waits to gather a larger group; zero takes whatever is
    /// queued, which already batches well under load because requests queue during a flush.
    pub group_commit_max_delay: Duration,
    /// Flush and fdatasync before acknowledging. Turning this off gives up durability and
    /// exists only for tests and benchmarks.
    pub fsync: bool,
}

impl Default for EmbeddedLogOptions {
    fn default() -> Self {
        Self {
            partitions: 8,
            group_commit_max_records: 4096,
            group_commit_max_delay: Duration::ZERO,
            fsync: true,
        }
    }
}

/// Counters of the appender, mainly to observe group commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Group commits done (each one flush, plus one fdatasync when fsync is on).
    pub flushes: u64,
    /// Records appended.
    pub records: u64,
    /// The most records written by one group commit.
    pub largest_group: u64,
}

/// The embedded log; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("dir", &self.inner.shared.dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// `None` once closed: new appends are refused, and dropping the sender lets the
    /// appender drain what is queued and stop.
    tx: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    appender: Mutex<Option<JoinHandle<()>>>,
}

/// State shared between callers and the appender thread.
struct Shared {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    opts: EmbeddedLogOptions,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Set after a failed write or fsync; see [`StoreError::Unavailable`].
    failed: Mutex<Option<String>>,
    poisoned: AtomicBool,
    syncer: Mutex<Syncer>,
    flushes: AtomicU64,
    records: AtomicU64,
    largest_group: AtomicU64,
    /// Fault injection: the next group commit fails as if fdatasync had failed.
    #[cfg(test)]
    fail_next_sync: AtomicBool,
}

struct Topic {
    name: String,
    index: sled::Tree,
    partitions: Vec<Partition>,
}

struct Partition {
    tree: sled::Tree,
    /// The durable end offset: every offset below it is durable and readable.
    end: watch::Sender<u64>,
}

struct AppendRequest {
    topic: Arc<Topic>,
    partition: u32,
    /// Framed records with their index key and value (without offset, added by the appender).
    frames: Vec<PreparedRecord>,
    reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
    enqueued: Instant,
}

struct PreparedRecord {
    frame: sled::IVec,
    index_key: Vec<u8>,
    version_last: u64,
}

impl EmbeddedLog {
    /// Opens (or creates) the log at `<data_dir>/log` and starts the appender thread.
    /// Blocking.
    pub fn open(data_dir: &Path, opts: EmbeddedLogOptions) -> Result<Self, StoreError> {
        if opts.partitions == 0 {
            return Err(StoreError::InvalidRequest(
                "a topic needs at least one partition".into(),
            ));
        }
        let dir = data_dir.join("log");
        let created = !dir.exists();
        std::fs::create_dir_all(&dir)?;
        let db = super::open_db(&dir, super::LOG_CACHE_BYTES)?;
        let meta = db.open_tree("meta")?;
        match meta.get(META_FORMAT_KEY)? {
            None => {
                meta.insert(META_FORMAT_KEY, STORAGE_FORMAT)?;
            }
            Some(v) if v.as_ref() == STORAGE_FORMAT => {}
            Some(v) => {
                return Err(StoreError::corrupt(
                    format!("log meta at {}", dir.display()),
                    format!(
                        "storage format {:?} is not supported by this build (expected 1)",
                        String::from_utf8_lossy(&v)
                    ),
                ));
            }
        }
        let mut syncer = Syncer::open(&dir)?;
        if opts.fsync {
            // sled writes `conf` and creates `db` and `blobs/` without syncing them or their
            // directories; make the database itself durable before anything relies on it.
            syncer.sync(&db)?;
            File::open(dir.join("conf"))?.sync_all()?;
            sync_dir(&dir)?;
            if created {
                sync_dir(data_dir)?;
            }
        }

        let shared = Arc::new(Shared {
            dir,
            db,
            meta,
            opts,
            topics: RwLock::new(HashMap::new()),
            failed: Mutex::new(None),
            poisoned: AtomicBool::new(false),
            syncer: Mutex::new(syncer),
            flushes: AtomicU64::new(0),
            records: AtomicU64::new(0),
            largest_group: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
        });
        // Load every existing topic now, so later lookups are memory-only.
        for item in shared.meta.scan_prefix(META_TOPIC_PREFIX) {
            let (key, _) = item?;
            let name = key
                .strip_prefix(META_TOPIC_PREFIX)
                .and_then(|n| std::str::from_utf8(n).ok())
                .ok_or_else(|| StoreError::corrupt("log meta", "topic name is not UTF-8"))?;
            shared.topic(name)?;
        }

        let (tx, rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let appender = std::thread::Builder::new()
            .name("cqrsd-log-appender".into())
            .spawn(move || appender_loop(&thread_shared, &rx))?;
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                tx: Mutex::new(Some(tx)),
                appender: Mutex::new(Some(appender)),
            }),
        })
    }

    /// Creates the topic's partitions if needed and returns its partition count. The count
    /// is persisted: a topic that exists with another count is an error, because changing
    /// it would move aggregates to other partitions. Blocking.
    pub fn ensure_topic(&self, topic: &str) -> Result<u32, StoreError> {
        validate_topic_name(topic).map_err(|e| StoreError::InvalidRequest(e.to_string()))?;
        let shared = &self.inner.shared;
        let configured = shared.opts.partitions;
        let key = meta_topic_key(topic);
        match shared.meta.get(&key)? {
            Some(stored) => {
                let stored = decode_partition_count(topic, &stored)?;
                if stored != configured {
                    return Err(StoreError::TopicMismatch {
                        topic: topic.to_owned(),
                        stored,
                        configured,
                    });
                }
            }
            None => {
                // Create the trees before recording the topic, so a recorded topic always
                // has its trees; then make the record durable.
                for p in 0..configured {
                    shared.db.open_tree(partition_tree_name(topic, p))?;
                }
                shared.db.open_tree(index_tree_name(topic))?;
                shared.meta.insert(&key, &configured.to_be_bytes())?;
                if shared.opts.fsync {
                    lock(&shared.syncer).sync(&shared.db)?;
                }
            }
        }
        shared.topic(topic)?;
        Ok(configured)
    }

    /// Appends whole records to one partition and resolves once they are durable, with
    /// their offsets. Concurrent callers share one flush (group commit). The records must
    /// carry the `cqrsd-version-first`/`-last` headers, which feed the aggregate index.
    /// The topic must exist (created by `ensure_topic`, or found on disk at open).
    pub async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<Vec<u64>, StoreError> {
        self.submit(topic, partition, records)?.await
    }

    /// Queues an append and returns the future of its answer: the records' place in the
    /// partition is fixed when this returns (appends are committed in the order they are
    /// queued), and a failed group commit poisons the log, so every append queued after a
    /// failed one fails too. That is what lets a writer queue its next batch before the
    /// previous one is durable.
    pub fn submit(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<PendingAppend, StoreError> {
        let shared = &self.inner.shared;
        if let Some(reason) = shared.failure() {
            return Err(StoreError::Unavailable(reason));
        }
        let topic = shared.existing_topic(topic)?;
        check_partition(&topic, partition)?;
        if records.is_empty() {
            return Ok(PendingAppend::Done(Some(Ok(Vec::new()))));
        }
        let frames = records
            .iter()
            .map(|record| {
                let (first, last) = record.version_range().map_err(|e| {
                    StoreError::InvalidRequest(format!("record not appendable: {e}"))
                })?;
                Ok(PreparedRecord {
                    frame: encode_frame(record)?.into(),
                    index_key: index_key(&record.key, first),
                    version_last: last,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;

        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            topic,
            partition,
            frames,
            reply,
            enqueued: Instant::now(),
        };
        {
            let tx = lock(&self.inner.tx);
            let tx = tx.as_ref().ok_or(StoreError::Closed)?;
            tx.send(request).map_err(|_| StoreError::Closed)?;
        }
        Ok(PendingAppend::Queued(answer))
    }

    /// Up to `max` durable records of a partition from offset `from` (inclusive). Blocking.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let topic = self.inner.shared.existing_topic(topic)?;
        let part = check_partition(&topic, partition)?;
        let end = *part.end.borrow();
        if from >= end || max == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for item in part
            .tree
            .range(from.to_be_bytes()..end.to_be_bytes())
            .take(max)
        {
            let (key, frame) = item?;
            let offset = decode_offset(&topic.name, partition, &key)?;
            let record = decode_frame(&frame, &|| {
                format!("record {}:{partition}:{offset}", topic.name)
            })?;
            out.push((offset, record));
        }
        Ok(out)
    }

    /// The next offset to be written in a partition, counting durable records only.
    /// Does not block: it reads memory only.
    pub fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, StoreError> {
        let topic = self.inner.shared.existing_topic(topic)?;
        let part = check_partition(&topic, partition)?;
        Ok(*part.end.borrow())
    }

    /// A watch of the partition's durable end offset, for readers to wake up on appends.
    /// Does not block: it reads memory only.
    pub fn subscribe(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<watch::Receiver<u64>, StoreError> {
        let topic = self.inner.shared.existing_topic(topic)?;
        let part = check_partition(&topic, partition)?;
        Ok(part.end.subscribe())
    }

    /// The durable records of one aggregate that contain versions at or above
    /// `from_version`, in version (and so offset) order, as (partition, offset, record).
    /// Blocking.
    pub fn aggregate_records(
        &self,
        topic: &str,
        aggregate_id: &str,
        from_version: u64,
    ) -> Result<Vec<(u32, u64, Record)>, StoreError> {
        let topic = self.inner.shared.existing_topic(topic)?;
        let prefix = index_prefix(aggregate_id);
        // The record holding `from_version` may start below it: begin at the last record
        // whose first version is at or below `from_version`.
        let start_version = match topic
            .index
            .range(prefix.clone()..=index_key(aggregate_id, from_version))
            .next_back()
        {
            Some(item) => {
                let (key, value) = item?;
                let (_, _, last) = decode_index_value(&topic.name, &value)?;
                if last >= from_version {
                    index_key_version(&topic.name, &key)?
                } else {
                    from_version
                }
            }
            None => from_version,
        };
        let mut out = Vec::new();
        for item in topic.index.range(index_key(aggregate_id, start_version)..) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let (partition, offset, _) = decode_index_value(&topic.name, &value)?;
            let part = check_partition(&topic, partition).map_err(|_| {
                StoreError::corrupt(
                    format!("aggregate index of {}", topic.name),
                    format!("entry points to partition {partition}, which does not exist"),
                )
            })?;
            // Index entries of records that are not durable yet are skipped.
            if offset >= *part.end.borrow() {
                continue;
            }
            let what = || format!("record {}:{partition}:{offset}", topic.name);
            let frame = part
                .tree
                .get(offset.to_be_bytes())?
                .ok_or_else(|| StoreError::corrupt(what(), "indexed record is missing"))?;
            out.push((partition, offset, decode_frame(&frame, &what)?));
        }
        Ok(out)
    }

    /// Counters of the appender.
    pub fn stats(&self) -> LogStats {
        let s = &self.inner.shared;
        LogStats {
            flushes: s.flushes.load(Ordering::Relaxed),
            records: s.records.load(Ordering::Relaxed),
            largest_group: s.largest_group.load(Ordering::Relaxed),
        }
    }

    /// Refuses new appends, lets the appender finish every queued append, and flushes.
    /// Idempotent. Blocking (it joins the appender thread).
    pub fn close(&self) -> Result<(), StoreError> {
        self.inner.stop();
        let shared = &self.inner.shared;
        shared.db.flush()?;
        if shared.opts.fsync {
            lock(&shared.syncer).sync(&shared.db)?;
        }
        Ok(())
    }
}

impl Inner {
    fn stop(&self) {
        drop(lock(&self.tx).take());
        if let Some(handle) = lock(&self.appender).take()
            && handle.join().is_err()
        {
            tracing::error!("the event log appender thread panicked");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Without this the appender would keep the database open after the last handle.
        self.stop();
    }
}

impl Shared {
    fn failure(&self) -> Option<String> {
        if !self.poisoned.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.failed).clone()
    }

    fn poison(&self, reason: String) {
        tracing::error!(%reason, "event log write failed; refusing appends until restart");
        *lock(&self.failed) = Some(reason);
        self.poisoned.store(true, Ordering::Release);
    }

    /// A loaded topic. Every topic recorded on disk is loaded at open and every new one by
    /// `ensure_topic`, so this never touches sled and is safe on async threads.
    fn existing_topic(&self, name: &str) -> Result<Arc<Topic>, StoreError> {
        read_lock(&self.topics)
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::InvalidRequest(format!("unknown topic {name:?}")))
    }

    /// Loads a topic recorded in `meta` into memory (once).
    fn topic(&self, name: &str) -> Result<Arc<Topic>, StoreError> {
        let mut topics = write_lock(&self.topics);
        if let Some(t) = topics.get(name) {
            return Ok(Arc::clone(t));
        }
        let stored = self
            .meta
            .get(meta_topic_key(name))?
            .ok_or_else(|| StoreError::InvalidRequest(format!("unknown topic {name:?}")))?;
        let count = decode_partition_count(name, &stored)?;
        let mut partitions = Vec::new();
        for p in 0..count {
            let tree = self.db.open_tree(partition_tree_name(name, p))?;
            let end = match tree.last()? {
                Some((key, _)) => {
                    decode_offset(name, p, &key)?
                        .checked_add(1)
                        .ok_or_else(|| {
                            StoreError::corrupt(
                                format!("partition {name}:{p}"),
                                "offset u64::MAX is in use",
                            )
                        })?
                }
                None => 0,
            };
            partitions.push(Partition {
                tree,
                end: watch::Sender::new(end),
            });
        }
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            index: self.db.open_tree(index_tree_name(name))?,
            partitions,
        });
        topics.insert(name.to_owned(), Arc::clone(&topic));
        Ok(topic)
    }
}

/// The appender: gathers queued requests into groups and commits each group at once.
/// A queued append: resolves with the records' offsets once they are durable.
#[derive(Debug)]
pub enum PendingAppend {
    /// Answered without queueing (nothing to append).
    Done(Option<Result<Vec<u64>, StoreError>>),
    Queued(oneshot::Receiver<Result<Vec<u64>, StoreError>>),
}

impl std::future::Future for PendingAppend {
    type Output = Result<Vec<u64>, StoreError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            PendingAppend::Done(answer) => {
                std::task::Poll::Ready(answer.take().unwrap_or(Err(StoreError::Closed)))
            }
            // A dropped reply means the appender stopped without answering.
            PendingAppend::Queued(answer) => std::pin::Pin::new(answer)
                .poll(cx)
                .map(|answer| answer.map_err(|_| StoreError::Closed)?),
        }
    }
}

fn appender_loop(shared: &Shared, rx: &mpsc::Receiver<AppendRequest>) {
    let max_records = shared.opts.group_commit_max_records.max(1);
    // `recv` keeps returning queued requests after the senders are gone and fails only
    // once the queue is empty, which is exactly the drain that `close` promises.
    while let Ok(first) = rx.recv() {
        let mut records = first.frames.len();
        let mut group = vec![first];
        let delay = shared.opts.group_commit_max_delay;
        if !delay.is_zero() {
            let deadline = Instant::now() + delay;
            while records < max_records {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(req) => {
                        records += req.frames.len();
                        group.push(req);
                    }
                    Err(_) => break,
                }
            }
        }
        while records < max_records {
            match rx.try_recv() {
                Ok(req) => {
                    records += req.frames.len();
                    group.push(req);
                }
                Err(_) => break,
            }
        }
        commit_group(shared, group, records);
    }
}

fn commit_group(shared: &Shared, group: Vec<AppendRequest>, record_count: usize) {
    if let Some(reason) = shared.failure() {
        for req in group {
            let _ = req.reply.send(Err(StoreError::Unavailable(reason.clone())));
        }
        return;
    }

    // Assign dense offsets per partition, continuing from the durable end: the appender is
    // the only writer, so the durable end is also the next free offset.
    let mut next: HashMap<(String, u32), (Arc<Topic>, u64)> = HashMap::new();
    let mut trees: Vec<sled::Tree> = Vec::new();
    let mut tree_slots: HashMap<String, usize> = HashMap::new();
    let mut slot = |name: String, tree: &sled::Tree| -> usize {
        *tree_slots.entry(name).or_insert_with(|| {
            trees.push(tree.clone());
            trees.len() - 1
        })
    };
    let mut writes: Vec<(usize, Vec<u8>, sled::IVec)> = Vec::with_capacity(record_count * 2);
    let mut offsets: Vec<Vec<u64>> = Vec::with_capacity(group.len());
    for req in &group {
        let Some(part) = req.topic.partitions.get(req.partition as usize) else {
            // Checked in `append`; kept total so that a bug cannot panic the appender.
            offsets.push(Vec::new());
            continue;
        };
        let data_slot = slot(
            partition_tree_name(&req.topic.name, req.partition),
            &part.tree,
        );
        let index_slot = slot(index_tree_name(&req.topic.name), &req.topic.index);
        let (_, next_offset) = next
            .entry((req.topic.name.clone(), req.partition))
            .or_insert_with(|| (Arc::clone(&req.topic), *part.end.borrow()));
        let mut assigned = Vec::with_capacity(req.frames.len());
        for rec in &req.frames {
            let offset = *next_offset;
            // 2^64 records cannot be written; saturating keeps the appender panic-free.
            *next_offset = next_offset.saturating_add(1);
            writes.push((data_slot, offset.to_be_bytes().to_vec(), rec.frame.clone()));
            writes.push((
                index_slot,
                rec.index_key.clone(),
                index_value(req.partition, offset, rec.version_last).into(),
            ));
            assigned.push(offset);
        }
        offsets.push(assigned);
    }

    let result = write_and_sync(shared, &trees, &writes);
    if let Err(reason) = result {
        shared.poison(reason.clone());
        for req in group {
            let _ = req.reply.send(Err(StoreError::Unavailable(reason.clone())));
        }
        return;
    }

    // Durable: publish the new ends, then answer.
    for ((_, partition), (topic, end)) in &next {
        if let Some(part) = topic.partitions.get(*partition as usize) {
            part.end.send_if_modified(|current| {
                let grew = *end > *current;
                if grew {
                    *current = *end;
                }
                grew
            });
        }
    }
    shared.flushes.fetch_add(1, Ordering::Relaxed);
    shared
        .records
        .fetch_add(record_count as u64, Ordering::Relaxed);
    shared
        .largest_group
        .fetch_max(record_count as u64, Ordering::Relaxed);
    metrics::histogram!("cqrsd_log_group_commit_records").record(record_count as f64);
    for (req, assigned) in group.into_iter().zip(offsets) {
        metrics::counter!("cqrsd_log_appended_records_total", "topic" => req.topic.name.clone())
            .increment(assigned.len() as u64);
        metrics::histogram!("cqrsd_log_append_seconds")
            .record(req.enqueued.elapsed().as_secs_f64());
        let _ = req.reply.send(Ok(assigned));
    }
}

/// Writes the group in one transaction and makes it durable. The error is a message
/// because it is shared by every request of the group.
fn write_and_sync(
    shared: &Shared,
    trees: &[sled::Tree],
    writes: &[(usize, Vec<u8>, sled::IVec)],
) -> Result<(), String> {
    let tx: Result<(), TransactionError<()>> = trees.transaction(|views| {
        for (slot, key, value) in writes {
            let Some(view) = views.get(*slot) else {
                return Err(ConflictableTransactionError::Abort(()));
            };
            view.insert(key.as_slice(), value.clone())?;
        }
        Ok(())
    });
    match tx {
        Ok(()) => {}
        Err(TransactionError::Abort(())) => return Err("internal error: bad tree slot".into()),
        Err(TransactionError::Storage(e)) => return Err(format!("write failed: {e}")),
    }
    #[cfg(test)]
    if shared.fail_next_sync.swap(false, Ordering::SeqCst) {
        return Err("flush failed: injected fdatasync failure".into());
    }
    if shared.opts.fsync {
        let started = Instant::now();
        lock(&shared.syncer)
            .sync(&shared.db)
            .map_err(|e| format!("flush failed: {e}"))?;
        metrics::histogram!("cqrsd_log_fsync_seconds").record(started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Makes sled's writes durable against power loss.
///
/// sled 0.34's `flush` writes its log with `sync_file_range`, which neither flushes the
/// drive's write cache nor persists file metadata, so it is not durable on Linux. After
/// it, `fdatasync` the `db` file (kept open). Values too large for a log segment go to
/// files under `blobs/` that sled never syncs, so new blob files and the directory are
/// synced too: before the flush (the log that points to them must not outlive them) and
/// after it (blobs written during the flush).
struct Syncer {
    db_file: File,
    blobs_dir: PathBuf,
    synced_blobs: HashSet<OsString>,
}

impl Syncer {
    fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db_file: File::open(dir.join("db"))?,
            blobs_dir: dir.join("blobs"),
            synced_blobs: HashSet::new(),
        })
    }

    fn sync(&mut self, db: &sled::Db) -> Result<(), StoreError> {
        self.sync_blobs()?;
        db.flush()?;
        self.sync_blobs()?;
        self.db_file.sync_data()?;
        Ok(())
    }

    fn sync_blobs(&mut self) -> Result<(), StoreError> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut present = HashSet::new();
        let mut new_files = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // sled garbage-collects blobs concurrently; a removed blob needs no sync.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                new_files = true;
            }
            present.insert(name);
        }
        if new_files {
            sync_dir(&self.blobs_dir)?;
        }
        // Forget removed blobs so the set does not grow forever.
        self.synced_blobs = present;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn check_partition(topic: &Topic, partition: u32) -> Result<&Partition, StoreError> {
    topic.partitions.get(partition as usize).ok_or_else(|| {
        StoreError::InvalidRequest(format!(
            "partition {partition} does not exist in topic {} ({} partitions)",
            topic.name,
            topic.partitions.len()
        ))
    })
}

fn meta_topic_key(topic: &str) -> Vec<u8> {
    format!("topic/{topic}").into_bytes()
}

fn partition_tree_name(topic: &str, partition: u32) -> String {
    format!("p/{topic}/{partition}")
}

fn index_tree_name(topic: &str) -> String {
    format!("i/{topic}")
}

fn decode_partition_count(topic: &str, bytes: &[u8]) -> Result<u32, StoreError> {
    let arr: [u8; 4] = bytes.try_into().map_err(|_| {
        StoreError::corrupt(
            format!("log meta of topic {topic}"),
            "partition count is not 4 bytes",
        )
    })?;
    Ok(u32::from_be_bytes(arr))
}

fn decode_offset(topic: &str, partition: u32, key: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = key.try_into().map_err(|_| {
        StoreError::corrupt(
            format!("partition {topic}:{partition}"),
            "a key is not an 8-byte offset",
        )
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// Index keys are `len(id) u32 BE ‖ id ‖ first version u64 BE`: the length prefix keeps
/// one id from being a prefix of another, and big-endian versions sort numerically.
fn index_prefix(aggregate_id: &str) -> Vec<u8> {
    let id = aggregate_id.as_bytes();
    let mut key = Vec::with_capacity(4 + id.len() + 8);
    // Aggregate ids are bounded far below 4 GiB by request limits; saturating keeps this total.
    key.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_be_bytes());
    key.extend_from_slice(id);
    key
}

fn index_key(aggregate_id: &str, version_first: u64) -> Vec<u8> {
    let mut key = index_prefix(aggregate_id);
    key.extend_from_slice(&version_first.to_be_bytes());
    key
}

fn index_key_version(topic: &str, key: &[u8]) -> Result<u64, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|start| key.get(start..))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::corrupt(format!("aggregate index of {topic}"), "key too short"))
}

/// Index values are `partition u32 BE ‖ offset u64 BE ‖ last version u64 BE`.
fn index_value(partition: u32, offset: u64, version_last: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&partition.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&version_last.to_be_bytes());
    v
}

fn decode_index_value(topic: &str, value: &[u8]) -> Result<(u32, u64, u64), StoreError> {
    let bad = || {
        StoreError::corrupt(
            format!("aggregate index of {topic}"),
            "entry is not 20 bytes",
        )
    };
    let arr: &[u8; 20] = value.try_into().map_err(|_| bad())?;
    let (p, rest) = arr.split_at(4);
    let (o, l) = rest.split_at(8);
    let p = u32::from_be_bytes(p.try_into().map_err(|_| bad())?);
    let o = u64::from_be_bytes(o.try_into().map_err(|_| bad())?);
    let l = u64::from_be_bytes(l.try_into().map_err(|_| bad())?);
    Ok((p, o, l))
}

/// Locks ignoring poisoning: the guarded data stays consistent because no code here
/// panics while holding a lock, and refusing service after an unrelated panic helps nobody.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Encoding, Event, EventMetadata, encode, partition_for};
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    const TOPIC: &str = "cqrsd.account";

    fn opts(partitions: u32) -> EmbeddedLogOptions {
        EmbeddedLogOptions {
            partitions,
            ..EmbeddedLogOptions::default()
        }
    }

    fn open(dir: &Path, o: EmbeddedLogOptions) -> EmbeddedLog {
        let log = EmbeddedLog::open(dir, o).unwrap();
        log.ensure_topic(TOPIC).unwrap();
        log
    }

    /// A record of `count` events of aggregate `id`, versions `first..first+count`.
    fn rec(id: &str, first: u64, count: u64) -> Record {
        let events: Vec<Event> = (first..first + count)
            .map(|version| Event {
                event_id: Uuid::now_v7(),
                aggregate_type: "account".into(),
                aggregate_id: id.into(),
                version,
                event_type: "Deposited".into(),
                timestamp: DateTime::<Utc>::from_timestamp_millis(1_700_000_000_000).unwrap(),
                data: serde_json::json!({ "amount": version }),
                metadata: EventMetadata {
                    command: "deposit".into(),
                    command_id: Uuid::now_v7(),
                    idempotency_key: None,
                    correlation_id: None,
                    request_hash: "h".into(),
                    principal: None,
                },
            })
            .collect();
        encode(&events, Encoding::MessagePack).unwrap()
    }

    #[tokio::test]
    async fn offsets_are_dense_per_partition() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), opts(2));
        let batch = vec![rec("a", 1, 1), rec("a", 2, 2), rec("a", 4, 1)];
        assert_eq!(
            log.append(TOPIC, 0, batch.clone()).await.unwrap(),
            vec![0, 1, 2]
        );
        assert_eq!(
            log.append(TOPIC, 0, vec![rec("a", 5, 1)]).await.unwrap(),
            vec![3]
        );
        assert_eq!(
            log.append(TOPIC, 1, vec![rec("b", 1, 1)]).await.unwrap(),
            vec![0]
        );
        assert_eq!(
            log.append(TOPIC, 1, vec![]).await.unwrap(),
            Vec::<u64>::new()
        );
        assert_eq!(log.end_offset(TOPIC, 0).unwrap(), 4);
        assert_eq!(log.end_offset(TOPIC, 1).unwrap(), 1);

        let read = log.read(TOPIC, 0, 0, 10).unwrap();
        assert_eq!(
            read.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(read[1].1, batch[1]);
        assert_eq!(log.read(TOPIC, 0, 1, 2).unwrap().len(), 2);
        assert!(log.read(TOPIC, 0, 4, 10).unwrap().is_empty());
        assert!(log.read(TOPIC, 0, 0, 0).unwrap().is_empty());
        log.close().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_are_dense_distinct_and_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let o = EmbeddedLogOptions {
            partitions: 3,
            // A short gathering window makes batching deterministic in the test; under
            // real load requests queue up during each fsync anyway.
            group_commit_max_delay: Duration::from_millis(5),
            ..EmbeddedLogOptions::default()
        };
        let log = open(dir.path(), o);
        log.ensure_topic("cqrsd.other").unwrap();

        let mut tasks = Vec::new();
        for i in 0..120u32 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let topic = if i % 2 == 0 { TOPIC } else { "cqrsd.other" };
                let partition = i % 3;
                let records = vec![
                    rec(&format!("agg-{i}"), 1, 1),
                    rec(&format!("agg-{i}"), 2, 1),
                ];
                let offsets = log.append(topic, partition, records).await.unwrap();
                (topic, partition, offsets)
            }));
        }
        let mut seen: HashMap<(&str, u32), Vec<u64>> = HashMap::new();
        for t in tasks {
            let (topic, partition, offsets) = t.await.unwrap();
            // One append's records are contiguous.
            assert_eq!(offsets.len(), 2);
            assert_eq!(offsets[1], offsets[0] + 1);
            seen.entry((topic, partition)).or_default().extend(offsets);
        }
        for ((topic, partition), mut offsets) in seen {
            offsets.sort_unstable();
            let n = offsets.len() as u64;
            assert_eq!(offsets, (0..n).collect::<Vec<_>>(), "{topic}:{partition}");
            assert_eq!(log.end_offset(topic, partition).unwrap(), n);
            assert_eq!(log.read(topic, partition, 0, 1000).unwrap().len() as u64, n);
        }
        let stats = log.stats();
        assert_eq!(stats.records, 240);
        assert!(stats.largest_group > 2, "{stats:?}");
        assert!(stats.flushes < 120, "{stats:?}");
        log.close().unwrap();
    }

    #[tokio::test]
    async fn reopen_after_close_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let written = vec![rec("a", 1, 2), rec("b", 1, 1), rec("a", 3, 1)];
        {
            let log = open(dir.path(), opts(4));
            log.append(TOPIC, 2, written.clone()).await.unwrap();
            log.close().unwrap();
            log.close().unwrap();
        }
        let log = EmbeddedLog::open(dir.path(), opts(4)).unwrap();
        // Readable before ensure_topic: topics recorded on disk are found.
        assert_eq!(log.end_offset(TOPIC, 2).unwrap(), 3);
        assert_eq!(log.ensure_topic(TOPIC).unwrap(), 4);
        let read = log.read(TOPIC, 2, 0, 10).unwrap();
        assert_eq!(
            read.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
            written
        );
        assert_eq!(log.aggregate_records(TOPIC, "a", 0).unwrap().len(), 2);
        assert_eq!(
            log.append(TOPIC, 2, vec![rec("a", 4, 1)]).await.unwrap(),
            vec![3]
        );
        log.close().unwrap();
    }

    #[tokio::test]
    async fn aggregate_records_returns_exactly_the_aggregate_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), opts(4));
        let pa = partition_for("a", 4);
        let pab = partition_for("ab", 4);
        log.append(TOPIC, pa, vec![rec("a", 1, 2)]).await.unwrap();
        log.append(TOPIC, pab, vec![rec("ab", 1, 1)]).await.unwrap();
        log.append(TOPIC, pa, vec![rec("a", 3, 1), rec("a", 4, 3)])
            .await
            .unwrap();
        log.append(TOPIC, pab, vec![rec("ab", 2, 1)]).await.unwrap();

        let versions = |from: u64| -> Vec<(u64, u64)> {
            log.aggregate_records(TOPIC, "a", from)
                .unwrap()
                .into_iter()
                .map(|(p, _, r)| {
                    assert_eq!(p, pa);
                    assert_eq!(r.key, "a");
                    r.version_range().unwrap()
                })
                .collect()
        };
        assert_eq!(versions(0), vec![(1, 2), (3, 3), (4, 6)]);
        assert_eq!(versions(2), vec![(1, 2), (3, 3), (4, 6)]);
        assert_eq!(versions(3), vec![(3, 3), (4, 6)]);
        assert_eq!(versions(5), vec![(4, 6)]);
        assert_eq!(versions(7), Vec::<(u64, u64)>::new());
        let offsets: Vec<u64> = log
            .aggregate_records(TOPIC, "a", 0)
            .unwrap()
            .into_iter()
            .map(|(_, o, _)| o)
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        assert_eq!(log.aggregate_records(TOPIC, "ab", 0).unwrap().len(), 2);
        assert!(
            log.aggregate_records(TOPIC, "nobody", 0)
                .unwrap()
                .is_empty()
        );
        log.close().unwrap();
    }

    #[tokio::test]
    async fn subscribe_wakes_on_append() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), opts(2));
        let mut rx = log.subscribe(TOPIC, 1).unwrap();
        assert_eq!(*rx.borrow(), 0);
        let writer = log.clone();
        tokio::spawn(async move { writer.append(TOPIC, 1, vec![rec("x", 1, 1)]).await.unwrap() });
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*rx.borrow_and_update(), 1);
        // Appends to another partition do not wake this one.
        log.append(TOPIC, 0, vec![rec("y", 1, 1)]).await.unwrap();
        assert!(!rx.has_changed().unwrap());
        log.close().unwrap();
    }

    #[test]
    fn partition_count_mismatch_on_reopen_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path(), opts(4)));
        let log = EmbeddedLog::open(dir.path(), opts(2)).unwrap();
        let err = log.ensure_topic(TOPIC).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::TopicMismatch {
                    stored: 4,
                    configured: 2,
                    ..
                }
            ),
            "{err}"
        );
        // A new topic gets the configured count.
        assert_eq!(log.ensure_topic("cqrsd.new").unwrap(), 2);
    }

    #[tokio::test]
    async fn corrupt_framed_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), opts(1));
        log.append(TOPIC, 0, vec![rec("a", 1, 1), rec("a", 2, 1)])
            .await
            .unwrap();
        let tree = log
            .inner
            .shared
            .db
            .open_tree(partition_tree_name(TOPIC, 0))
            .unwrap();
        let mut frame = tree.get(1u64.to_be_bytes()).unwrap().unwrap().to_vec();
        let last = frame.len() - 1;
        frame[last] ^= 0xFF;
        tree.insert(1u64.to_be_bytes(), frame).unwrap();
        tree.insert(0u64.to_be_bytes(), &b"garbage"[..]).unwrap();

        assert!(matches!(
            log.read(TOPIC, 0, 0, 1),
            Err(StoreError::Corrupt { .. })
        ));
        let err = log.read(TOPIC, 0, 1, 1).unwrap_err();
        assert!(err.to_string().contains("cqrsd.account:0:1"), "{err}");
        assert!(matches!(
            log.aggregate_records(TOPIC, "a", 0),
            Err(StoreError::Corrupt { .. })
        ));
        log.close().unwrap();
    }

    #[tokio::test]
    async fn invalid_requests_and_closed_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), opts(2));
        let unknown = log.append("cqrsd.nope", 0, vec![rec("a", 1, 1)]).await;
        assert!(matches!(unknown, Err(StoreError::InvalidRequest(_))));
        let bad_partition = log.append(TOPIC, 2, vec![rec("a", 1, 1)]).await;
        assert!(matches!(bad_partition, Err(StoreError::InvalidRequest(_))));
        let mut no_headers = rec("a", 1, 1);
        no_headers.headers.clear();
        assert!(matches!(
            log.append(TOPIC, 0, vec![no_headers]).await,
            Err(StoreError::InvalidRequest(_))
        ));
        assert!(matches!(
            log.read(TOPIC, 5, 0, 1),
            Err(StoreError::InvalidRequest(_))
        ));
        assert!(matches!(
            log.ensure_topic("bad topic"),
            Err(StoreError::InvalidRequest(_))
        ));

        log.close().unwrap();
        log.close().unwrap();
        assert!(matches!(
            log.append(TOPIC, 0, vec![rec("a", 1, 1)]).await,
            Err(StoreError::Closed)
        ));
    }

    #[tokio::test]
    async fn close_drains_queued_appends() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), opts(1));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.append(TOPIC, 0, vec![rec("a", i + 1, 1)]).await
            }));
        }
        // Let the tasks enqueue before closing (they do not await anything before sending).
        tokio::task::yield_now().await;
        tokio::task::spawn_blocking({
            let log = log.clone();
            move || log.close()
        })
        .await
        .unwrap()
        .unwrap();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::Closed) => {}
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        // Every append queued before close was written, and all are readable.
        assert_eq!(ok, 20);
        assert_eq!(log.end_offset(TOPIC, 0).unwrap(), ok);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_fsync_fails_the_whole_group_and_reports_no_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let o = EmbeddedLogOptions {
            partitions: 2,
            group_commit_max_delay: Duration::from_millis(20),
            ..EmbeddedLogOptions::default()
        };
        let log = open(dir.path(), o);
        log.append(TOPIC, 0, vec![rec("a", 1, 1)]).await.unwrap();
        log.inner
            .shared
            .fail_next_sync
            .store(true, Ordering::SeqCst);
        let mut tasks = Vec::new();
        for i in 0..10u32 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.append(TOPIC, i % 2, vec![rec(&format!("b{i}"), 1, 1)])
                    .await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Err(StoreError::Unavailable(_))));
        }
        // Nothing of the failed group is visible, and the log refuses further appends
        // because the page cache can no longer be trusted after a failed fsync.
        assert_eq!(log.end_offset(TOPIC, 0).unwrap(), 1);
        assert_eq!(log.end_offset(TOPIC, 1).unwrap(), 0);
        assert_eq!(log.read(TOPIC, 0, 0, 100).unwrap().len(), 1);
        assert!(log.aggregate_records(TOPIC, "b0", 0).unwrap().is_empty());
        let again = log.append(TOPIC, 0, vec![rec("c", 1, 1)]).await;
        assert!(matches!(again, Err(StoreError::Unavailable(_))));
    }

    #[tokio::test]
    async fn large_records_round_trip_through_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), opts(1));
        let mut big = rec("a", 1, 1);
        // Larger than sled's inline limit (a quarter of a 512 KiB segment), so it is stored
        // in a blob file, which the syncer must fsync.
        big.value = vec![7u8; 300 * 1024];
        log.append(TOPIC, 0, vec![big.clone()]).await.unwrap();
        let blobs = std::fs::read_dir(dir.path().join("log/blobs"))
            .unwrap()
            .count();
        assert!(
            blobs > 0,
            "expected sled to store the record in a blob file"
        );
        assert!(!lock(&log.inner.shared.syncer).synced_blobs.is_empty());
        log.close().unwrap();
        drop(log);
        let log = open(dir.path(), opts(1));
        assert_eq!(log.read(TOPIC, 0, 0, 1).unwrap()[0].1, big);
    }
}
