//! Aggregate histories, derived from the log off the append path.
//!
//! Neither backend indexes aggregates while it appends: the write side keeps every
//! aggregate's latest state in its command store, so only `GET .../events` needs an
//! aggregate's records. This index (aggregate id → offsets and last versions, per
//! partition) is built the first time a partition's history is asked for, by scanning the
//! records it has not seen yet, and extended by later requests from where it stopped; it
//! lives in memory and is rebuilt after a restart. Each backend supplies its own read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Record;

/// Records read per step while indexing a partition or fetching a history.
const CHUNK: usize = 2000;

/// The lazily built history index of every partition of a log.
#[derive(Default)]
pub struct HistoryIndex {
    partitions: Mutex<HashMap<(String, u32), SharedHistory>>,
}

impl std::fmt::Debug for HistoryIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryIndex").finish_non_exhaustive()
    }
}

type SharedHistory = Arc<Mutex<PartitionHistory>>;

/// Aggregate id → (offset, last version) of its records, for one partition.
#[derive(Default)]
struct PartitionHistory {
    scanned_to: u64,
    by_id: HashMap<String, Vec<(u64, u64)>>,
}

impl HistoryIndex {
    /// The records of `aggregate_id` in `partition` that hold versions at or above
    /// `from_version`, up to the partition's `end`, as (partition, offset, record).
    /// `read(from, max)` reads the partition; `corrupt` builds the error for a record
    /// without a version range. Blocking (it reads).
    #[allow(clippy::too_many_arguments)]
    pub fn records<E>(
        &self,
        topic: &str,
        partition: u32,
        aggregate_id: &str,
        from_version: u64,
        end: u64,
        read: &mut dyn FnMut(u64, usize) -> Result<Vec<(u64, Record)>, E>,
        corrupt: &dyn Fn(String) -> E,
    ) -> Result<Vec<(u32, u64, Record)>, E> {
        let index = self
            .partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((topic.to_owned(), partition))
            .or_default()
            .clone();
        let wanted: Vec<u64> = {
            let mut index = index.lock().unwrap_or_else(|e| e.into_inner());
            while index.scanned_to < end {
                let records = read(index.scanned_to, CHUNK)?;
                let Some((last, _)) = records.last() else {
                    break;
                };
                index.scanned_to = last + 1;
                for (offset, record) in records {
                    let (_, last_version) = record
                        .version_range()
                        .map_err(|e| corrupt(format!("record {offset}: {e}")))?;
                    index
                        .by_id
                        .entry(record.key)
                        .or_default()
                        .push((offset, last_version));
                }
            }
            index
                .by_id
                .get(aggregate_id)
                .map(|entries| {
                    entries
                        .iter()
                        .filter(|(offset, last)| *last >= from_version && *offset < end)
                        .map(|(offset, _)| *offset)
                        .collect()
                })
                .unwrap_or_default()
        };
        // Read the wanted records in runs: records close together are read with one
        // range read (a Kafka fetch is costly), records far apart each on their own.
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
                let records = read(from, (stop - from + 1) as usize)?;
                let Some((last, _)) = records.last() else {
                    break;
                };
                from = last + 1;
                found.extend(
                    records
                        .into_iter()
                        .filter(|(offset, _)| wanted[i..=j].binary_search(offset).is_ok())
                        .map(|(offset, record)| (partition, offset, record)),
                );
            }
            i = j + 1;
        }
        Ok(found)
    }
}
