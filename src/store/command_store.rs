//! The command side's local state: aggregate snapshots, idempotency replies and the log
//! checkpoint they correspond to, in a sled database at `<data_dir>/command`.
//!
//! Everything here is derived from the event log, so it is not fsynced: after a crash the
//! write side replays the log from the last checkpoint that reached the disk. What matters
//! is that a checkpoint is never ahead of the snapshots and replies it covers, which the
//! single transaction in [`CommandStore::commit`] guarantees.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::TransactionError;

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

#[derive(Clone)]
pub struct CommandStore {
    db: sled::Db,
    snapshots: sled::Tree,
    replies: sled::Tree,
    /// `expires_at_ms (order-preserving) ‖ reply key` → empty, so purging does not scan
    /// every reply.
    reply_expiry: sled::Tree,
    checkpoints: sled::Tree,
    /// Per partition, the event versions its snapshots were folded with.
    folded_versions: sled::Tree,
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

    /// Opens (or creates) the store at `<data_dir>/command` with a sled page
    /// cache of `cache_bytes`. Blocking.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = super::open_db(&data_dir.join("command"), cache_bytes)?;
        Ok(Self {
            snapshots: db.open_tree("snapshots")?,
            replies: db.open_tree("replies")?,
            reply_expiry: db.open_tree("reply_expiry")?,
            checkpoints: db.open_tree("checkpoints")?,
            folded_versions: db.open_tree("folded_versions")?,
            db,
        })
    }

    pub fn snapshot(&self, aggregate_type: &str, id: &str) -> Result<Option<Snapshot>, StoreError> {
        let key = aggregate_key(aggregate_type, id);
        self.snapshots
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
        self.replies
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
        match self.checkpoints.get(checkpoint_key(topic, partition))? {
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
        match self.folded_versions.get(checkpoint_key(topic, partition))? {
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
        self.folded_versions
            .insert(checkpoint_key(topic, partition), versions.as_bytes())?;
        Ok(())
    }

    /// Atomically writes snapshots, idempotency replies and the partition's checkpoint in
    /// one sled transaction. Not fsynced (see the module documentation).
    pub fn commit(
        &self,
        topic: &str,
        partition: u32,
        next_offset: u64,
        snapshots: &[(String, String, Snapshot)],
        replies: &[(String, String, String, StoredReply)],
    ) -> Result<(), StoreError> {
        // Encode outside the transaction: the closure may run more than once.
        let snapshot_writes = snapshots
            .iter()
            .map(|(ty, id, snap)| Ok((aggregate_key(ty, id), encode(snap)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let reply_writes = replies
            .iter()
            .map(|(ty, id, key, reply)| {
                let k = reply_key(ty, id, key);
                let mut expiry = expiry_prefix(reply.expires_at_ms).to_vec();
                expiry.extend_from_slice(&k);
                Ok((k, expiry, encode(reply)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let checkpoint = checkpoint_key(topic, partition);

        let result: Result<(), TransactionError<()>> = (
            &self.snapshots,
            &self.replies,
            &self.reply_expiry,
            &self.checkpoints,
        )
            .transaction(|(snaps, reps, expiry, checkpoints)| {
                for (key, value) in &snapshot_writes {
                    snaps.insert(key.as_slice(), value.as_slice())?;
                }
                for (key, expiry_key, value) in &reply_writes {
                    reps.insert(key.as_slice(), value.as_slice())?;
                    expiry.insert(expiry_key.as_slice(), &[] as &[u8])?;
                }
                checkpoints.insert(checkpoint.as_slice(), &next_offset.to_be_bytes())?;
                Ok(())
            });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            // The closure never aborts.
            Err(TransactionError::Abort(())) => {
                Err(StoreError::Unavailable("commit aborted".into()))
            }
        }
    }

    /// Removes replies that expired at or before `now_ms`; returns how many.
    pub fn purge_expired_replies(&self, now_ms: i64) -> Result<usize, StoreError> {
        let end = now_ms.checked_add(1).map(expiry_prefix);
        let mut purged = 0;
        let entries = match end {
            Some(end) => self.reply_expiry.range(..end.to_vec()),
            None => self.reply_expiry.range::<Vec<u8>, _>(..),
        };
        for item in entries {
            let (expiry_key, _) = item?;
            let reply_key = &expiry_key[8.min(expiry_key.len())..];
            // The same reply may have been rewritten with a later expiry; only remove it if
            // the stored reply itself has expired, and drop the stale expiry entry either way.
            let still_live = match self.replies.get(reply_key)? {
                Some(bytes) => {
                    let reply: StoredReply = decode(&bytes, || "idempotency reply".to_owned())?;
                    reply.expires_at_ms > now_ms
                }
                None => true,
            };
            let result: Result<(), TransactionError<()>> = (&self.replies, &self.reply_expiry)
                .transaction(|(reps, expiry)| {
                    if !still_live {
                        reps.remove(reply_key)?;
                    }
                    expiry.remove(expiry_key.as_ref())?;
                    Ok(())
                });
            match result {
                Ok(()) => {}
                Err(TransactionError::Storage(e)) => return Err(e.into()),
                Err(TransactionError::Abort(())) => {
                    return Err(StoreError::Unavailable("purge aborted".into()));
                }
            }
            if !still_live {
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// Writes everything to disk (sled's flush; not an fsync, see the module docs).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

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
            .snapshots
            .insert(aggregate_key("account", "a"), &[0xc1u8][..])
            .unwrap();
        assert!(matches!(
            store.snapshot("account", "a"),
            Err(StoreError::Corrupt { .. })
        ));
        store
            .checkpoints
            .insert(checkpoint_key("t", 0), &[1u8][..])
            .unwrap();
        assert!(matches!(
            store.checkpoint("t", 0),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
