//! `cqrsd log migrate`: converts the sled event log of earlier versions
//! (`<data_dir>/log`) into the segment log, offline, keeping every offset.
//!
//! This is the only code that still reads the old layout: the `meta` tree
//! (`format` → `"1"`, `topic/<topic>` → partition count, u32 BE) and one tree
//! per partition, `p/<topic>/<partition>`, from offset (u64 BE) to a legacy
//! frame (`version 1 u8 ‖ CRC-32 u32 BE of the body ‖ body`, the body being
//! the timestamp, then key, headers and value with u32 BE lengths). The per-aggregate index tree is not needed: histories
//! are derived from the log now.
//!
//! The new log is written to `<data_dir>/eventlog.migrating` and renamed to
//! `eventlog` only once every partition holds exactly the old records at the
//! old offsets; the sled directory is then renamed to `log.sled-migrated`, so
//! an interrupted migration can simply be run again and the old data stays
//! until the operator deletes it.

use std::path::{Path, PathBuf};

use super::frame::Cursor;
use super::segment_log::{LEGACY_LOG_DIR, LOG_DIR, is_legacy_log, sync_dir};
use super::{SegmentLog, SegmentLogOptions, StoreError};
use crate::log::Record;

/// Records copied per append (and so per fdatasync) during a migration.
const CHUNK: usize = 1000;
/// The sled page cache while reading the old log once.
const LEGACY_CACHE_BYTES: u64 = 64 << 20;
/// Where the old sled database is kept after a migration.
pub const MIGRATED_LEGACY_DIR: &str = "log.sled-migrated";
const MIGRATING_DIR: &str = "eventlog.migrating";

/// What a migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub topics: usize,
    pub records: u64,
    /// Where the old database now is.
    pub kept_at: PathBuf,
}

/// Converts `<data_dir>/log` into `<data_dir>/eventlog`. `total` is called once
/// with the number of records to copy, `advance` after each copied chunk.
/// Blocking; the daemon must not be running (sled's lock makes it fail if it is).
pub fn migrate_legacy_log(
    data_dir: &Path,
    total: &mut dyn FnMut(u64),
    advance: &mut dyn FnMut(u64),
) -> Result<Migrated, StoreError> {
    let legacy = data_dir.join(LEGACY_LOG_DIR);
    if !is_legacy_log(&legacy) {
        return Err(StoreError::InvalidRequest(format!(
            "{} holds no sled event log: nothing to migrate",
            legacy.display()
        )));
    }
    let target = data_dir.join(LOG_DIR);
    if target.exists() {
        return Err(StoreError::InvalidRequest(format!(
            "{} exists already; move it away to migrate {} into its place",
            target.display(),
            legacy.display()
        )));
    }
    let db = super::open_db(&legacy, LEGACY_CACHE_BYTES)?;
    let meta = db.open_tree("meta")?;
    let what =
        |detail: &str| StoreError::corrupt(format!("sled log at {}", legacy.display()), detail);
    match meta.get(b"format")? {
        Some(v) if v.as_ref() == b"1" => {}
        Some(_) => return Err(what("unknown storage format")),
        None => return Err(what("no storage format")),
    }
    let mut topics: Vec<(String, u32)> = Vec::new();
    for item in meta.scan_prefix(b"topic/") {
        let (key, value) = item?;
        let name = std::str::from_utf8(&key[b"topic/".len()..])
            .map_err(|_| what("a topic name is not UTF-8"))?
            .to_owned();
        let count: [u8; 4] = value
            .as_ref()
            .try_into()
            .map_err(|_| what("a partition count is not 4 bytes"))?;
        topics.push((name, u32::from_be_bytes(count)));
    }
    let partitions = topics.first().map_or(1, |(_, count)| *count);
    if let Some((name, count)) = topics.iter().find(|(_, count)| *count != partitions) {
        return Err(what(&format!(
            "topic {name} has {count} partitions, another {partitions}; the segment log keeps one count"
        )));
    }
    let mut trees = Vec::new();
    let mut records_total = 0u64;
    for (name, count) in &topics {
        for p in 0..*count {
            let tree = db.open_tree(format!("p/{name}/{p}"))?;
            records_total += tree.len() as u64;
            trees.push((name.clone(), p, tree));
        }
    }
    total(records_total);

    let staging = data_dir.join(MIGRATING_DIR);
    if staging.exists() {
        // Left by an interrupted migration: nothing in it was ever served.
        std::fs::remove_dir_all(&staging)?;
    }
    let log = SegmentLog::open_root(
        &staging,
        SegmentLogOptions {
            partitions,
            ..SegmentLogOptions::default()
        },
    )?;
    for (name, _) in &topics {
        log.ensure_topic(name)?;
    }
    let mut copied = 0u64;
    for (name, p, tree) in &trees {
        let mut chunk: Vec<Record> = Vec::with_capacity(CHUNK);
        let mut next = 0u64;
        let mut flush = |chunk: &mut Vec<Record>, next: u64| -> Result<(), StoreError> {
            if chunk.is_empty() {
                return Ok(());
            }
            let n = chunk.len() as u64;
            let start = next - n;
            let pending = log.submit(name, *p, std::mem::take(chunk), Some(start))?;
            let offsets = futures::executor::block_on(pending)?;
            if offsets.first() != Some(&start) {
                return Err(StoreError::corrupt(
                    format!("migration of {name}:{p}"),
                    format!("records landed at {offsets:?}, expected from {start}"),
                ));
            }
            advance(n);
            Ok(())
        };
        for item in tree.iter() {
            let (key, frame) = item?;
            let offset: [u8; 8] = key
                .as_ref()
                .try_into()
                .map_err(|_| what(&format!("a key of {name}:{p} is not an 8-byte offset")))?;
            let offset = u64::from_be_bytes(offset);
            if offset != next {
                // Offsets were dense from 0; a gap would shift every later position.
                return Err(what(&format!(
                    "{name}:{p} has offset {offset} where {next} was expected"
                )));
            }
            chunk.push(decode_legacy_frame(&frame, &|| {
                format!("record {name}:{p}:{offset}")
            })?);
            next += 1;
            if chunk.len() == CHUNK {
                flush(&mut chunk, next)?;
            }
        }
        flush(&mut chunk, next)?;
        if log.end_offset(name, *p)? != next {
            return Err(StoreError::corrupt(
                format!("migration of {name}:{p}"),
                "the new partition does not end where the old one did",
            ));
        }
        copied += next;
    }
    log.close()?;
    drop(log);
    drop(trees);
    drop(meta);
    drop(db);

    std::fs::rename(&staging, &target)?;
    let kept_at = data_dir.join(MIGRATED_LEGACY_DIR);
    std::fs::rename(&legacy, &kept_at)?;
    sync_dir(data_dir)?;
    Ok(Migrated {
        topics: topics.len(),
        records: copied,
        kept_at,
    })
}

/// Decodes a frame of the sled log: `version 1 ‖ CRC-32 of the body ‖ body`.
fn decode_legacy_frame(frame: &[u8], what: &dyn Fn() -> String) -> Result<Record, StoreError> {
    let corrupt = |detail: &str| StoreError::corrupt(what(), detail);
    let (Some(&1), Some(crc), Some(body)) = (frame.first(), frame.get(1..5), frame.get(5..)) else {
        return Err(corrupt("not a version 1 frame"));
    };
    if crc32fast::hash(body).to_be_bytes() != crc {
        return Err(corrupt("CRC32 mismatch"));
    }
    decode_legacy_body(body, &corrupt)
}

/// Decodes a legacy frame body: timestamp, key, headers, value, every length a u32 BE.
fn decode_legacy_body(
    body: &[u8],
    corrupt: &dyn Fn(&str) -> StoreError,
) -> Result<Record, StoreError> {
    let mut cur = Cursor::new(body);
    let truncated = || corrupt("frame is truncated");
    let timestamp_ms = i64::from_be_bytes(cur.array().ok_or_else(truncated)?);
    let key = String::from_utf8(cur.u32_bytes().ok_or_else(truncated)?.to_vec())
        .map_err(|_| corrupt("key is not UTF-8"))?;
    let header_count = cur.u32().ok_or_else(truncated)?;
    // Each header takes at least 8 bytes, which bounds the allocation by the frame size.
    let capacity = usize::try_from(header_count)
        .unwrap_or(usize::MAX)
        .min(cur.remaining() / 8);
    let mut headers = Vec::with_capacity(capacity);
    for _ in 0..header_count {
        let name = String::from_utf8(cur.u32_bytes().ok_or_else(truncated)?.to_vec())
            .map_err(|_| corrupt("header name is not UTF-8"))?;
        let value = cur.u32_bytes().ok_or_else(truncated)?.to_vec();
        headers.push((name, value));
    }
    let value = cur.u32_bytes().ok_or_else(truncated)?.to_vec();
    if cur.remaining() > 0 {
        return Err(corrupt("trailing bytes after the record"));
    }
    Ok(Record {
        key,
        headers,
        value,
        timestamp_ms,
    })
}
