//! Local storage: the embedded event log and the command side's state, both in sled,
//! and the full-text search indexes, in tantivy.
//!
//! This is the only module that knows the storage engine; everything above it speaks in
//! log records, positions, snapshots and checkpoints.

pub mod command_store;
pub mod embedded_log;
mod frame;
pub mod search;
pub mod views;

pub use command_store::{CommandStore, Snapshot, StoredReply};
pub use embedded_log::{EmbeddedLog, EmbeddedLogOptions, LogStats};
pub use search::{SearchError, SearchHit, SearchIndex, SearchPage, SearchReader};
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

    /// The caller asked for something that does not exist or is not valid.
    #[error("invalid log request: {0}")]
    InvalidRequest(String),

    /// The search engine (tantivy) failed for a reason other than IO or corruption.
    #[error("search index error: {0}")]
    Search(String),
}

impl StoreError {
    pub(crate) fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }
}
