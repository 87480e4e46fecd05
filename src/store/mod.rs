//! Local storage: the embedded event log in segment files, the command side's state and
//! the history index in sled, the read models in fjall, and the full-text search indexes
//! in tantivy.
//!
//! This is the only module that knows the storage engine; everything above it speaks in
//! log records, positions, snapshots and checkpoints.

pub mod command_store;
mod frame;
pub mod history;
mod lsm;
pub mod migrate;
pub mod search;
pub mod segment_log;
pub mod views;

pub use command_store::{CommandStore, Snapshot, StoredReply};
pub use history::{HistoryEntry, HistoryStore};
pub use search::{SearchError, SearchHit, SearchIndex, SearchPage, SearchReader};
pub use segment_log::{EmbeddedSettings, LogStats, SegmentLog, SegmentLogOptions, open_embedded};
pub use views::ViewStore;

/// Why a storage operation failed, grouped by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The disk or the storage engine failed; the operation may be retried after the cause
    /// is fixed, usually by a restart.
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage engine error: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage engine error: {0}")]
    Lsm(#[from] fjall::Error),

    /// Stored bytes do not decode; never silently skipped.
    #[error("corrupt data in {what}: {detail}")]
    Corrupt { what: String, detail: String },

    /// The store was closed; nothing more is accepted.
    #[error("the event log is closed")]
    Closed,

    /// The on-disk layout disagrees with the configuration.
    #[error(
        "topic {topic} has {stored} partitions on disk but {configured} are configured; \
         partition counts cannot change because aggregates would move between partitions"
    )]
    TopicMismatch {
        topic: String,
        stored: u32,
        configured: u32,
    },

    /// The log cannot accept writes right now (a failed flush or fsync); callers answer 503.
    /// After a failed fsync the page cache can no longer be trusted, so the log stays
    /// unavailable until the process restarts and recovers from what is on disk.
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),

    /// The data directory holds the sled event log of earlier versions, which this build
    /// does not read; starting on it would serve an empty log beside the real one.
    #[error(
        "{path} holds an event log in the sled format of earlier cqrsd versions, which this \
         version does not read; convert it offline with `cqrsd log migrate` (it keeps every \
         offset, so positions stay valid), then start again"
    )]
    LegacyLog { path: std::path::PathBuf },

    /// The caller asked for something that does not exist or is not valid.
    #[error("invalid log request: {0}")]
    InvalidRequest(String),

    /// The search engine (tantivy) failed for a reason other than IO or corruption.
    #[error("search index error: {0}")]
    Search(String),
}

// sled caches up to 1 GiB per database by default, and cqrsd opened three
// (the event log was one, before it moved to segment files): a catch-up that
// read a 1M-event log once held the whole log in memory (peak RSS 1.1 GiB in
// `cqrsd bench projection --events 1000000`). The command store is mostly
// written; the views are read by queries, so they get the larger share.
/// Block cache of the command store (snapshots, idempotency answers).
pub const COMMAND_STORE_CACHE_BYTES: u64 = 32 << 20;
/// Block cache of the view store (views, aggregations, positions).
pub const VIEW_STORE_CACHE_BYTES: u64 = 64 << 20;
/// sled page cache of the history index (`<data_dir>/history`): written in
/// order by one indexer per partition and read one aggregate at a time, so it
/// gains little from a large cache.
pub const HISTORY_CACHE_BYTES: u64 = 16 << 20;

/// How long opening a database waits for a lock that is being released.
const LOCK_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens a sled database at `path`. sled releases its file lock from
/// background threads after the previous handle is dropped, so a reopen in
/// the same process (a restarted in-process daemon, a test) can find it still
/// held for a moment: that is retried briefly. Another process holding the
/// database still fails, with sled's message, once the wait is over.
pub(crate) fn open_db(path: &std::path::Path, cache_bytes: u64) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_RELEASE_WAIT;
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
        {
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

impl From<StoreError> for crate::log::LogError {
    fn from(error: StoreError) -> Self {
        use crate::log::LogError;
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
            | StoreError::Lsm(_)
            | StoreError::Search(_) => LogError::Unavailable(error.to_string()),
        }
    }
}

impl StoreError {
    pub(crate) fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }
}
