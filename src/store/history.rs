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

use std::path::Path;

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

/// The persisted history index of every partition of every aggregate topic.
#[derive(Clone)]
pub struct HistoryStore {
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
        let db = super::open_db(&data_dir.join("history"), cache_bytes)?;
        Ok(Self {
            tree: db.open_tree("index")?,
            db,
        })
    }

    /// The next offset of the partition to index; 0 when nothing is indexed yet. Blocking.
    pub fn position(&self, topic: &str, partition: u32) -> Result<u64, StoreError> {
        match self.tree.get(position_key(topic, partition))? {
            None => Ok(0),
            Some(bytes) => {
                be_u64(&bytes).ok_or_else(|| corrupt(format!("position of {topic}:{partition}")))
            }
        }
    }

    /// Writes the entries of the records below `next_offset` that are not indexed yet,
    /// and the new position, in one atomic sled batch. Blocking.
    pub fn commit(
        &self,
        topic: &str,
        partition: u32,
        next_offset: u64,
        entries: &[HistoryEntry],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let mut key = aggregate_prefix(topic, partition, &entry.aggregate_id);
            key.extend_from_slice(&entry.offset.to_be_bytes());
            batch.insert(key, &entry.last_version.to_be_bytes());
        }
        batch.insert(position_key(topic, partition), &next_offset.to_be_bytes());
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Forgets everything indexed of one partition (its log was replaced by a shorter
    /// one), so it is indexed again from offset 0. The entries are removed in batches;
    /// the position goes first, so an interrupted reset is finished by the next one.
    /// Blocking.
    pub fn reset(&self, topic: &str, partition: u32) -> Result<(), StoreError> {
        self.tree.remove(position_key(topic, partition))?;
        let prefix = partition_prefix(ENTRY, topic, partition);
        loop {
            let mut batch = sled::Batch::default();
            let mut removed = 0;
            for item in self.tree.scan_prefix(&prefix).take(10_000) {
                let (key, _) = item?;
                batch.remove(key);
                removed += 1;
            }
            if removed == 0 {
                return Ok(());
            }
            self.tree.apply_batch(batch)?;
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
        for item in self.tree.scan_prefix(&prefix) {
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
        self.db.flush()?;
        Ok(())
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
                    3,
                    &[entry("a", 0, 1), entry("ab", 1, 1), entry("a", 2, 3)],
                )
                .unwrap();
            store.commit("t", 1, 1, &[entry("a", 0, 7)]).unwrap();
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
        store.commit("t", 0, 3, &[entry("a", 2, 3)]).unwrap();
        assert_eq!(store.offsets("t", 0, "a", 1, 10).unwrap(), vec![0, 2]);
    }

    #[test]
    fn an_id_with_a_zero_byte_does_not_leak_into_another_ids_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
        store
            .commit("t", 0, 2, &[entry("a", 0, 1), entry("a\0b", 1, 1)])
            .unwrap();
        assert_eq!(store.offsets("t", 0, "a", 1, 10).unwrap(), vec![0]);
        assert_eq!(store.offsets("t", 0, "a\0b", 1, 10).unwrap(), vec![1]);
    }

    #[test]
    fn a_reset_forgets_one_partition_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::open(dir.path(), 1 << 20).unwrap();
        store.commit("t", 0, 1, &[entry("a", 0, 1)]).unwrap();
        store.commit("t", 1, 1, &[entry("a", 0, 1)]).unwrap();
        store.reset("t", 0).unwrap();
        assert_eq!(store.position("t", 0).unwrap(), 0);
        assert!(store.offsets("t", 0, "a", 1, 10).unwrap().is_empty());
        assert_eq!(store.position("t", 1).unwrap(), 1);
        assert_eq!(store.offsets("t", 1, "a", 1, 10).unwrap(), vec![0]);
    }
}
