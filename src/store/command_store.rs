//! The command side's local state: aggregate snapshots, idempotency replies and the log
//! checkpoint they correspond to, in a fjall database (an LSM tree) at `<data_dir>/command`.
//!
//! Everything here is derived from the event log, so it is not fsynced: after a crash the
//! write side replays the log from the last checkpoint that reached the disk. What matters
//! is that a checkpoint is never ahead of the snapshots and replies it covers, which the
//! single write batch in [`CommandStore::commit`] guarantees (one journal record over
//! every keyspace, recovered whole or not at all, and made visible to readers at once).
//!
//! It left sled for the reason the view store did (`super::views` says it): the startup
//! restore of a million aggregates writes a million new snapshot keys, and sled's
//! transactions over them took a quarter of the CPU of a 1M-aggregate catch-up under sled's
//! process-wide lock. A data directory of an earlier version is converted once at open.

use std::path::Path;
use std::sync::Arc;

use fjall::Keyspace;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// An aggregate's state as of a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u64,
    pub state: serde_json::Value,
}

/// The first reply to a command sent with an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReply {
    /// Fingerprint of the command name and body, to reject a key reused with another body.
    pub request_hash: String,
    /// Opaque bytes from the caller.
    #[serde(with = "serde_bytes_vec")]
    pub reply: Vec<u8>,
    /// After this time (Unix milliseconds) the reply may be purged; callers also treat an
    /// expired reply as absent.
    pub expires_at_ms: i64,
}

/// The keyspaces:
/// - `snapshots`: aggregate key → snapshot;
/// - `replies`: reply key → stored reply;
/// - `reply_expiry`: `expires_at_ms (order-preserving) ‖ reply key` → empty, so
///   purging does not scan every reply;
/// - `checkpoints`: partition key → next offset (u64 BE);
/// - `folded_versions`: partition key → the event versions its snapshots
///   were folded with.
#[derive(Clone)]
pub struct CommandStore {
    engine: Arc<super::lsm::Engine>,
}

impl std::fmt::Debug for CommandStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandStore").finish_non_exhaustive()
    }
}

impl CommandStore {
    /// Opens (or creates) the store at `<data_dir>/command` with the default
    /// page cache. Blocking.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(data_dir, super::COMMAND_STORE_CACHE_BYTES)
    }

    /// Opens (or creates) the store at `<data_dir>/command` with a block
    /// cache of `cache_bytes`, converting a sled store of an earlier version
    /// first. Blocking.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        super::lsm::convert_sled(
            data_dir,
            "command",
            cache_bytes,
            super::lsm::COMMAND_MEMTABLE_BYTES,
            |tree| TREES.contains(&tree).then(|| tree.to_owned()),
        )?;
        let engine = super::lsm::Engine::open(
            &data_dir.join("command"),
            cache_bytes,
            super::lsm::COMMAND_MEMTABLE_BYTES,
        )?;
        Ok(Self {
            engine: Arc::new(engine),
        })
    }

    /// One keyspace's handle, for one operation.
    fn keyspace(&self, name: &str) -> Result<Keyspace, StoreError> {
        Ok(self.engine.handles(name, true)?.1)
    }

    pub fn snapshot(&self, aggregate_type: &str, id: &str) -> Result<Option<Snapshot>, StoreError> {
        let key = aggregate_key(aggregate_type, id);
        self.keyspace("snapshots")?
            .get(&key)?
            .map(|bytes| decode(&bytes, || format!("snapshot of {aggregate_type}/{id}")))
            .transpose()
    }

    /// The stored reply for an idempotency key, expired or not; the caller compares
    /// `expires_at_ms` with its clock.
    pub fn idempotent_reply(
        &self,
        aggregate_type: &str,
        id: &str,
        key: &str,
    ) -> Result<Option<StoredReply>, StoreError> {
        let k = reply_key(aggregate_type, id, key);
        self.keyspace("replies")?
            .get(&k)?
            .map(|bytes| {
                decode(&bytes, || {
                    format!("idempotency reply {aggregate_type}/{id}/{key}")
                })
            })
            .transpose()
    }

    /// The next offset to read from a partition, as of the last commit.
    pub fn checkpoint(&self, topic: &str, partition: u32) -> Result<Option<u64>, StoreError> {
        match self
            .keyspace("checkpoints")?
            .get(checkpoint_key(topic, partition))?
        {
            None => Ok(None),
            Some(bytes) => {
                let arr: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
                    StoreError::corrupt(
                        format!("checkpoint of {topic}:{partition}"),
                        "value is not 8 bytes",
                    )
                })?;
                Ok(Some(u64::from_be_bytes(arr)))
            }
        }
    }

    /// The event versions (`Aggregate::event_versions`) the partition's
    /// snapshots were folded with; empty when none was recorded, which is
    /// what a partition written before event versions existed has (every
    /// event type at version 1).
    pub fn folded_versions(&self, topic: &str, partition: u32) -> Result<String, StoreError> {
        match self
            .keyspace("folded_versions")?
            .get(checkpoint_key(topic, partition))?
        {
            None => Ok(String::new()),
            Some(bytes) => String::from_utf8(bytes.to_vec()).map_err(|_| {
                StoreError::corrupt(
                    format!("folded event versions of {topic}:{partition}"),
                    "value is not UTF-8",
                )
            }),
        }
    }

    /// Records the event versions the partition's snapshots are folded with.
    pub fn set_folded_versions(
        &self,
        topic: &str,
        partition: u32,
        versions: &str,
    ) -> Result<(), StoreError> {
        let keyspace = self.keyspace("folded_versions")?;
        self.engine
            .written(keyspace.insert(checkpoint_key(topic, partition), versions.as_bytes()))
    }

    /// Atomically writes snapshots, idempotency replies and the partition's checkpoint in
    /// one write batch. Not fsynced (see the module documentation).
    pub fn commit(
        &self,
        topic: &str,
        partition: u32,
        next_offset: u64,
        snapshots: &[(String, String, Snapshot)],
        replies: &[(String, String, String, StoredReply)],
    ) -> Result<(), StoreError> {
        let (db, snapshots_ks) = self.engine.handles("snapshots", true)?;
        let replies_ks = self.keyspace("replies")?;
        let expiry_ks = self.keyspace("reply_expiry")?;
        let checkpoints_ks = self.keyspace("checkpoints")?;
        // Each keyspace's writes go to fjall in key order (`write_in_key_order`).
        let snapshot_writes = snapshots
            .iter()
            .map(|(ty, id, snap)| Ok((aggregate_key(ty, id), Some(encode(snap)?))))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut reply_writes = Vec::with_capacity(replies.len());
        let mut expiry_writes = Vec::with_capacity(replies.len());
        for (ty, id, key, reply) in replies {
            let k = reply_key(ty, id, key);
            let mut expiry = expiry_prefix(reply.expires_at_ms).to_vec();
            expiry.extend_from_slice(&k);
            reply_writes.push((k, Some(encode(reply)?)));
            expiry_writes.push((expiry, Some(Vec::new())));
        }
        let mut batch = db.batch();
        super::lsm::write_in_key_order(&mut batch, &snapshots_ks, snapshot_writes);
        super::lsm::write_in_key_order(&mut batch, &replies_ks, reply_writes);
        super::lsm::write_in_key_order(&mut batch, &expiry_ks, expiry_writes);
        batch.insert(
            &checkpoints_ks,
            checkpoint_key(topic, partition),
            next_offset.to_be_bytes(),
        );
        self.engine.written(batch.commit())
    }

    /// Removes replies that expired at or before `now_ms`; returns how many.
    pub fn purge_expired_replies(&self, now_ms: i64) -> Result<usize, StoreError> {
        let end = now_ms.checked_add(1).map(expiry_prefix);
        let mut purged = 0;
        let (db, expiry_ks) = self.engine.handles("reply_expiry", true)?;
        let replies_ks = self.keyspace("replies")?;
        let entries = match end {
            Some(end) => expiry_ks.range(..end.to_vec()),
            None => expiry_ks.range::<Vec<u8>, _>(..),
        };
        for item in entries {
            let expiry_key = item.key()?;
            let reply_key = &expiry_key[8.min(expiry_key.len())..];
            // The same reply may have been rewritten with a later expiry; only remove it if
            // the stored reply itself has expired, and drop the stale expiry entry either way.
            let still_live = match replies_ks.get(reply_key)? {
                Some(bytes) => {
                    let reply: StoredReply = decode(&bytes, || "idempotency reply".to_owned())?;
                    reply.expires_at_ms > now_ms
                }
                None => true,
            };
            let mut batch = db.batch();
            if !still_live {
                batch.remove(&replies_ks, reply_key);
            }
            batch.remove(&expiry_ks, expiry_key.as_ref());
            self.engine.written(batch.commit())?;
            if !still_live {
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// Writes everything to disk (an fsync of the journal).
    pub fn flush(&self) -> Result<(), StoreError> {
        let db = self.engine.database()?;
        self.engine.written(db.persist(fjall::PersistMode::SyncAll))
    }
}

/// The keyspaces, named as the sled trees of earlier versions were.
const TREES: [&str; 5] = [
    "snapshots",
    "replies",
    "reply_expiry",
    "checkpoints",
    "folded_versions",
];

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec_named(value)
        .map_err(|e| StoreError::corrupt("command store value", format!("cannot encode: {e}")))
}

fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // The same nesting bound as the record format, so corrupt bytes cannot overflow the stack.
    de.set_max_depth(128);
    T::deserialize(&mut de).map_err(|e| StoreError::corrupt(what(), e.to_string()))
}

/// `len u32 BE ‖ bytes`: length prefixes keep composite keys unambiguous.
fn push_part(key: &mut Vec<u8>, part: &str) {
    key.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
    key.extend_from_slice(part.as_bytes());
}

fn aggregate_key(aggregate_type: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::new();
    push_part(&mut key, aggregate_type);
    push_part(&mut key, id);
    key
}

fn reply_key(aggregate_type: &str, id: &str, idempotency_key: &str) -> Vec<u8> {
    let mut key = aggregate_key(aggregate_type, id);
    push_part(&mut key, idempotency_key);
    key
}

fn checkpoint_key(topic: &str, partition: u32) -> Vec<u8> {
    let mut key = Vec::new();
    push_part(&mut key, topic);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// An i64 as 8 bytes whose byte order matches numeric order (sign bit flipped).
fn expiry_prefix(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

/// Stores the reply as MessagePack `bin` rather than an array of integers.
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(hash: &str, expires_at_ms: i64) -> StoredReply {
        StoredReply {
            request_hash: hash.into(),
            reply: vec![0, 1, 2, 255],
            expires_at_ms,
        }
    }

    fn snap(version: u64) -> Snapshot {
        Snapshot {
            version,
            state: json!({"balance": 10, "rate": 0.5, "owner": "ann"}),
        }
    }

    #[test]
    fn commit_and_reopen_return_the_same() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = CommandStore::open(dir.path()).unwrap();
            assert_eq!(store.checkpoint("cqrsd.account", 0).unwrap(), None);
            assert_eq!(store.snapshot("account", "a").unwrap(), None);
            store
                .commit(
                    "cqrsd.account",
                    3,
                    42,
                    &[("account".into(), "a".into(), snap(7))],
                    &[(
                        "account".into(),
                        "a".into(),
                        "k1".into(),
                        reply("h1", 1_000),
                    )],
                )
                .unwrap();
            store.flush().unwrap();
        }
        let store = CommandStore::open(dir.path()).unwrap();
        assert_eq!(store.checkpoint("cqrsd.account", 3).unwrap(), Some(42));
        assert_eq!(store.checkpoint("cqrsd.account", 0).unwrap(), None);
        let s = store.snapshot("account", "a").unwrap().unwrap();
        assert_eq!(s, snap(7));
        assert!(s.state["balance"].is_u64() && s.state["rate"].is_f64());
        assert_eq!(
            store.idempotent_reply("account", "a", "k1").unwrap(),
            Some(reply("h1", 1_000))
        );
        // Keys are not confused across parts ("a"+"k1" vs "ak"+"1").
        assert_eq!(store.idempotent_reply("account", "ak", "1").unwrap(), None);
    }

    #[test]
    fn commit_is_atomic_with_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = CommandStore::open(dir.path()).unwrap();
        store
            .commit("t", 0, 1, &[("account".into(), "a".into(), snap(1))], &[])
            .unwrap();
        // A concurrent reader polls checkpoint then snapshot: whenever it sees checkpoint
        // N it must see the snapshot written with N (version N), never an older one.
        let reader = {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..2_000 {
                    let cp = store.checkpoint("t", 0).unwrap().unwrap();
                    let version = store.snapshot("account", "a").unwrap().unwrap().version;
                    assert!(version >= cp, "checkpoint {cp} ahead of snapshot {version}");
                }
            })
        };
        for n in 2..500 {
            store
                .commit("t", 0, n, &[("account".into(), "a".into(), snap(n))], &[])
                .unwrap();
        }
        reader.join().unwrap();
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(499));
    }

    #[test]
    fn purge_removes_only_expired_replies() {
        let dir = tempfile::tempdir().unwrap();
        let store = CommandStore::open(dir.path()).unwrap();
        let replies = vec![
            ("account".into(), "a".into(), "old".into(), reply("h", -5)),
            ("account".into(), "a".into(), "due".into(), reply("h", 100)),
            ("account".into(), "b".into(), "new".into(), reply("h", 200)),
            (
                "account".into(),
                "b".into(),
                "renewed".into(),
                reply("h", 50),
            ),
        ];
        store.commit("t", 0, 1, &[], &replies).unwrap();
        // Rewriting a reply with a later expiry leaves a stale expiry entry behind.
        store
            .commit(
                "t",
                0,
                2,
                &[],
                &[(
                    "account".into(),
                    "b".into(),
                    "renewed".into(),
                    reply("h", 300),
                )],
            )
            .unwrap();
        assert_eq!(store.purge_expired_replies(100).unwrap(), 2);
        assert_eq!(store.idempotent_reply("account", "a", "old").unwrap(), None);
        assert_eq!(store.idempotent_reply("account", "a", "due").unwrap(), None);
        assert!(
            store
                .idempotent_reply("account", "b", "new")
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .idempotent_reply("account", "b", "renewed")
                .unwrap()
                .is_some()
        );
        assert_eq!(store.purge_expired_replies(100).unwrap(), 0);
        assert_eq!(store.purge_expired_replies(i64::MAX).unwrap(), 2);
    }

    #[test]
    fn corrupt_snapshot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = CommandStore::open(dir.path()).unwrap();
        store
            .keyspace("snapshots")
            .unwrap()
            .insert(aggregate_key("account", "a"), [0xc1u8])
            .unwrap();
        assert!(matches!(
            store.snapshot("account", "a"),
            Err(StoreError::Corrupt { .. })
        ));
        store
            .keyspace("checkpoints")
            .unwrap()
            .insert(checkpoint_key("t", 0), [1u8])
            .unwrap();
        assert!(matches!(
            store.checkpoint("t", 0),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_sled_command_store_of_an_earlier_version_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = sled::open(dir.path().join("command")).unwrap();
            old.open_tree("snapshots")
                .unwrap()
                .insert(aggregate_key("account", "a"), encode(&snap(7)).unwrap())
                .unwrap();
            old.open_tree("checkpoints")
                .unwrap()
                .insert(checkpoint_key("t", 0), &42u64.to_be_bytes())
                .unwrap();
            old.open_tree("replies")
                .unwrap()
                .insert(
                    reply_key("account", "a", "k1"),
                    encode(&reply("h1", 1_000)).unwrap(),
                )
                .unwrap();
            old.flush().unwrap();
        }
        let store = CommandStore::open(dir.path()).unwrap();
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(42));
        assert_eq!(store.snapshot("account", "a").unwrap(), Some(snap(7)));
        assert_eq!(
            store.idempotent_reply("account", "a", "k1").unwrap(),
            Some(reply("h1", 1_000))
        );
        assert!(dir.path().join("command.sled-migrated").is_dir());
    }
}
