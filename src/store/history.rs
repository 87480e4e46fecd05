//! The per-aggregate history index behind `GET /aggregates/{a}/{id}/events`, persisted in
//! a sled database at `<data_dir>/history`.
//!
//! Neither log backend indexes aggregates while it appends, so that the append path stays
//! one write and one sync. The write side derives this index from the log off the critical
//! path: for every (topic, partition) it records, per aggregate id, the offset and last
//! version of each of its records, and the next offset it has indexed (its position). The
//! entries of a read and that position go into one sled batch, so after a crash the index
//! is exactly the records below its position: nothing missing below it, nothing above it.
//! Entries are keyed by their offset, so indexing a record again rewrites the same entry
//! and can never duplicate it.
//!
//! Everything here is derived from the log, so it is not fsynced, and it is rebuildable: a
//! missing database (an operator may delete the directory while the daemon is stopped) is
//! created empty and filled again from offset 0.
//!
//! One tree holds both kinds of key, so one batch can write them atomically:
//! - `p ‖ topic ‖ 0 ‖ partition (u32 BE)` → next offset to index (u64 BE);
//! - `e ‖ topic ‖ 0 ‖ partition (u32 BE) ‖ aggregate id ‖ 0 ‖ offset (u64 BE)` → the last
//!   version the record holds (u64 BE).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::StoreError;

const POSITION: u8 = b'p';
const ENTRY: u8 = b'e';

/// One indexed record: the aggregate it belongs to, its offset and the last version in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub aggregate_id: String,
    pub offset: u64,
    pub last_version: u64,
}

/// The persisted history index of every partition of every aggregate topic;
/// clones share one database.
#[derive(Clone)]
pub struct HistoryStore {
    opened: Arc<RwLock<Option<Opened>>>,
    path: PathBuf,
    cache_bytes: u64,
}

/// sled keeps the first I/O error it meets (a full disk, say) and fails every
/// later operation with it, so the index recovers by reopening its database.
struct Opened {
    db: sled::Db,
    tree: sled::Tree,
}

impl std::fmt::Debug for HistoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryStore").finish_non_exhaustive()
    }
}

impl HistoryStore {
    /// Opens (or creates, empty) the index at `<data_dir>/history`. Blocking.
    pub fn open(data_dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let path = data_dir.join("history");
        let opened = Self::open_db(&path, cache_bytes)?;
        Ok(Self {
            opened: Arc::new(RwLock::new(Some(opened))),
            path,
            cache_bytes,
        })
    }

    fn open_db(path: &Path, cache_bytes: u64) -> Result<Opened, StoreError> {
        let db = super::open_db(path, cache_bytes)?;
        Ok(Opened {
            tree: db.open_tree("index")?,
            db,
        })
    }

    /// Drops the database and opens it again: after an I/O error (the disk
    /// was full) sled refuses everything until it is reopened. What sled had
    /// not written is lost, which the index allows: entries and their position
    /// were written in one batch, so the reopened index is a prefix of the
    /// log, and indexing resumes from its position. Blocking.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut opened = self.opened.write().unwrap_or_else(|e| e.into_inner());
        // The old handle holds sled's file lock until it is gone.
        drop(opened.take());
        *opened = Some(Self::open_db(&self.path, self.cache_bytes)?);
        Ok(())
    }

    /// The index tree of the open database. Each operation takes its own
    /// handle and drops it at its end, so a reopen does not wait for long.
    fn tree(&self) -> Result<sled::Tree, StoreError> {
        self.opened
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|opened| opened.tree.clone())
            .ok_or_else(|| StoreError::Unavailable("the history index is being reopened".into()))
    }

    /// The next offset of the partition to index; 0 when nothing is indexed yet. Blocking.
    pub fn position(&self, topic: &str, partition: u32) -> Result<u64, StoreError> {
        stored_position(&self.tree()?, topic, partition)
    }

    /// Writes the entries of the records from `from` to below `next_offset`,
    /// and the new position, in one atomic sled batch, if the stored position
    /// is `from`; otherwise (the database was reopened and lost what sled had
    /// not written) writes nothing and returns false, so that no gap can be
    /// committed. One indexer writes a partition, so the check cannot race.
    /// Blocking.
    pub fn commit(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        next_offset: u64,
        entries: &[HistoryEntry],
    ) -> Result<bool, StoreError> {
        let tree = self.tree()?;
        if stored_position(&tree, topic, partition)? != from {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        for entry in entries {
            let mut key = aggregate_prefix(topic, partition, &entry.aggregate_id);
            key.extend_from_slice(&entry.offset.to_be_bytes());
            batch.insert(key, &entry.last_version.to_be_bytes());
        }
        batch.insert(position_key(topic, partition), &next_offset.to_be_bytes());
        tree.apply_batch(batch)?;
        Ok(true)
    }

    /// Forgets everything indexed of one partition (its log was replaced by a shorter
    /// one), so it is indexed again from offset 0. The entries are removed in batches;
    /// the position goes first, so an interrupted reset is finished by the next one.
    /// Blocking.
    pub fn reset(&self, topic: &str, partition: u32) -> Result<(), StoreError> {
        let tree = self.tree()?;
        tree.remove(position_key(topic, partition))?;
        let prefix = partition_prefix(ENTRY, topic, partition);
        loop {
            let mut batch = sled::Batch::default();
            let mut removed = 0;
            for item in tree.scan_prefix(&prefix).take(10_000) {
                let (key, _) = item?;
                batch.remove(key);
                removed += 1;
            }
            if removed == 0 {
                return Ok(());
            }
            tree.apply_batch(batch)?;
        }
    }

    /// The offsets, in order, of at most `max` records of `aggregate_id` in the partition
    /// that hold versions at or above `from_version`. Blocking.
    pub fn offsets(
        &self,
        topic: &str,
        partition: u32,
        aggregate_id: &str,
        from_version: u64,
        max: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let prefix = aggregate_prefix(topic, partition, aggregate_id);
        let mut offsets = Vec::new();
        for item in self.tree()?.scan_prefix(&prefix) {
            if offsets.len() >= max {
                break;
            }
            let (key, value) = item?;
            // An id that contains a 0 byte followed by more bytes shares this prefix; only
            // a key with exactly an offset after the prefix belongs to `aggregate_id`.
            let Some(offset) = be_u64(&key[prefix.len()..]) else {
                continue;
            };
            let last_version = be_u64(&value).ok_or_else(|| {
                corrupt(format!(
                    "history entry of {aggregate_id} at {topic}:{partition}:{offset}"
                ))
            })?;
            if last_version >= from_version {
                offsets.push(offset);
            }
        }
        Ok(offsets)
    }

    /// Writes what sled still buffers, so a clean stop does not re-index. Blocking.
    pub fn flush(&self) -> Result<(), StoreError> {
        let db = self
            .opened
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|opened| opened.db.clone());
        if let Some(db) = db {
            db.flush()?;
        }
        Ok(())
    }
}

fn stored_position(tree: &sled::Tree, topic: &str, partition: u32) -> Result<u64, StoreError> {
    match tree.get(position_key(topic, partition))? {
        None => Ok(0),
        Some(bytes) => {
            be_u64(&bytes).ok_or_else(|| corrupt(format!("position of {topic}:{partition}")))
        }
    }
}

fn partition_prefix(kind: u8, topic: &str, partition: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(topic.len() + 6);
    key.push(kind);
    key.extend_from_slice(topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

fn position_key(topic: &str, partition: u32) -> Vec<u8> {
    partition_prefix(POSITION, topic, partition)
}

fn aggregate_prefix(topic: &str, partition: u32, aggregate_id: &str) -> Vec<u8> {
    let mut key = partition_prefix(ENTRY, topic, partition);
    key.extend_from_slice(aggregate_id.as_bytes());
    key.push(0);
    key
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_be_bytes)
}

fn corrupt(what: String) -> StoreError {
    StoreError::corrupt(what, "value is not 8 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, offset: u64, last_version: u64) -> HistoryEntry {
        HistoryEntry {
            aggregate_id: id.to_owned(),
            offset,
            last_version,
        }
    }

    #[test]
    fn entries_and_position_are_kept_per_partition_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(store.position("t", 0).unwrap(), 0);
            store
                .commit(
                    "t",
                    0,
                    0,
                    3,
                    &[entry("a", 0, 1), entry("ab", 1, 1), entry("a", 2, 3)],
                )
                .unwrap();
            assert!(store.commit("t", 1, 0, 1, &[entry("a", 0, 7)]).unwrap());
            store.flush().unwrap();
        }
        let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.position("t", 0).unwrap(), 3);
        assert_eq!(store.position("t", 1).unwrap(), 1);
        assert_eq!(store.offsets("t", 0, "a", 1, 10).unwrap(), vec![0, 2]);
        // Versions below from_version are skipped, and `max` bounds the answer.
        assert_eq!(store.offsets("t", 0, "a", 2, 10).unwrap(), vec![2]);
        assert_eq!(store.offsets("t", 0, "a", 1, 1).unwrap(), vec![0]);
        // "a" is not a prefix match for "ab", nor partition 1 for partition 0.
        assert_eq!(store.offsets("t", 0, "ab", 1, 10).unwrap(), vec![1]);
        assert_eq!(store.offsets("t", 1, "a", 1, 10).unwrap(), vec![0]);
        assert!(store.offsets("t", 0, "nobody", 1, 10).unwrap().is_empty());
        // Committing the same record again rewrites its entry: no duplicate.
        assert!(store.commit("t", 0, 3, 3, &[entry("a", 2, 3)]).unwrap());
        // A commit that does not start at the stored position writes nothing,
        // so neither a gap nor a duplicate can be committed.
        assert!(!store.commit("t", 0, 2, 3, &[entry("a", 2, 3)]).unwrap());
        assert!(!store.commit("t", 0, 5, 6, &[entry("a", 5, 4)]).unwrap());
        assert_eq!(store.position("t", 0).unwrap(), 3);
        assert_eq!(store.offsets("t", 0, "a", 1, 10).unwrap(), vec![0, 2]);
    }

    #[test]
    fn a_reopen_keeps_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
        let other = store.clone();
        store.commit("t", 0, 0, 1, &[entry("a", 0, 1)]).unwrap();
        store.flush().unwrap();
        other.reopen().unwrap();
        assert_eq!(store.position("t", 0).unwrap(), 1);
        assert!(store.commit("t", 0, 1, 2, &[entry("a", 1, 2)]).unwrap());
        assert_eq!(other.offsets("t", 0, "a", 1, 10).unwrap(), vec![0, 1]);
    }

    #[test]
    fn an_id_with_a_zero_byte_does_not_leak_into_another_ids_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
        store
            .commit("t", 0, 0, 2, &[entry("a", 0, 1), entry("a\0b", 1, 1)])
            .unwrap();
        assert_eq!(store.offsets("t", 0, "a", 1, 10).unwrap(), vec![0]);
        assert_eq!(store.offsets("t", 0, "a\0b", 1, 10).unwrap(), vec![1]);
    }

    #[test]
    fn a_reset_forgets_one_partition_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
        store.commit("t", 0, 0, 1, &[entry("a", 0, 1)]).unwrap();
        store.commit("t", 1, 0, 1, &[entry("a", 0, 1)]).unwrap();
        store.reset("t", 0).unwrap();
        assert_eq!(store.position("t", 0).unwrap(), 0);
        assert!(store.offsets("t", 0, "a", 1, 10).unwrap().is_empty());
        assert_eq!(store.position("t", 1).unwrap(), 1);
        assert_eq!(store.offsets("t", 1, "a", 1, 10).unwrap(), vec![0]);
    }
}
