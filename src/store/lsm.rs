//! What the fjall stores (the view store and the command store) share: how a
//! database is opened, how its keyspaces are sized, and the one-time
//! conversion of the sled databases that earlier versions wrote.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::StoreError;

/// The in-memory write buffer (memtable) of each keyspace of the view store.
/// fjall's default is 64 MiB per keyspace; the view store has a keyspace per
/// projection and a rebuild one more, so the default alone could hold
/// hundreds of MiB. fjall keeps up to four sealed memtables per keyspace
/// besides the active one, so this also sets the worst case of its memory.
/// Measured at 1M aggregates (BENCHMARKS.md, "fjall's memtable size" and
/// "Results at ea790a6"): 8 MiB lowered the peak RSS by 35–70 MiB but made
/// the catch-up 1.5–3 s slower (more, smaller sorted files to compact); 24
/// MiB was slower too, at 505 MiB.
pub(crate) const VIEW_MEMTABLE_BYTES: u64 = 16 << 20;

/// The same for the command store. Its large writes are the startup
/// restore's snapshots, once per aggregate, while the projections catch up
/// beside it; at 8 MiB instead of 16 the 1M-aggregate peak RSS was 489–504
/// MiB instead of 508–521, at the same ready time (BENCHMARKS.md, "Results
/// at ea790a6").
pub(crate) const COMMAND_MEMTABLE_BYTES: u64 = 8 << 20;

/// The journal's bound before fjall flushes memtables to free it (fjall's
/// default is 512 MiB, its minimum 64 MiB): the journal is disk that holds
/// nothing the sorted files do not, once flushed.
const JOURNAL_BYTES: u64 = 64 << 20;

/// How long opening a database waits for a lock that is being released.
const LOCK_RELEASE_WAIT: Duration = Duration::from_secs(3);

/// The options of every keyspace cqrsd creates. Data blocks are not
/// compressed: the documents, groups and snapshots are small and compress
/// little (the data directory of `cqrsd bench projection --events 1000000
/// --aggregates 1000000` was 2.22–2.36× the payload without, 2.36–2.38×
/// with lz4), while every flush and compaction paid for it: the 1M-aggregate
/// catch-up was ready in 18.3–19.1 s without, 19.5–20.3 s with, alternated
/// in one sitting (BENCHMARKS.md, "Results of the previous round").
pub(crate) fn keyspace_options(memtable_bytes: u64) -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .max_memtable_size(memtable_bytes)
        .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
}

/// One write of a batch: a key and its new value, or `None` to remove it.
pub(crate) type Write = (Vec<u8>, Option<Vec<u8>>);

/// Adds `writes` to `batch` for `keyspace` in key order. fjall's memtable is
/// a skip list: consecutive inserts of nearby keys walk nodes still in the
/// CPU's caches, where the order the stores gather their writes in (a hash
/// map's) sent every insert to a random place (BENCHMARKS.md, "Results at
/// ea790a6", "Sorted commits": 40 % less commit CPU for fresh documents). The
/// order changes nothing else: the sort is stable, so a key written twice
/// keeps its last write.
pub(crate) fn write_in_key_order(
    batch: &mut fjall::OwnedWriteBatch,
    keyspace: &Keyspace,
    mut writes: Vec<Write>,
) {
    writes.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, value) in writes {
        match value {
            Some(value) => batch.insert(keyspace, key, value),
            None => batch.remove(keyspace, key),
        }
    }
}

/// Opens (or creates) the fjall database at `path` with a block cache of
/// `cache_bytes`. fjall releases its file lock when the last handle is
/// dropped, so a reopen in the same process (a restarted in-process daemon, a
/// test) can find it still held for a moment: that is retried briefly.
/// Another process holding it still fails, once the wait is over. Blocking.
pub(crate) fn open(path: &Path, cache_bytes: u64) -> Result<Database, StoreError> {
    let deadline = Instant::now() + LOCK_RELEASE_WAIT;
    loop {
        match Database::builder(path)
            .cache_size(cache_bytes)
            .max_journaling_size(JOURNAL_BYTES)
            .open()
        {
            Err(fjall::Error::Locked) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(fjall::Error::Locked) => {
                return Err(StoreError::Unavailable(format!(
                    "{} is locked by another process (a running cqrsd?)",
                    path.display()
                )));
            }
            result => return Ok(result?),
        }
    }
}

/// Converts the sled database of earlier versions at `<data_dir>/<name>` (a
/// directory with sled's `conf` and `db` files) into a fjall database at the
/// same place, copying each sled tree into the keyspace `keyspace` names for it
/// (`None` skips a tree, such as sled's own default tree). Every entry carries
/// over, so nothing derived has to be derived again. Blocking; runs once.
///
/// Crash-safe by construction: the copy is written to `<name>.fjall-migrating`
/// (deleted and redone if a crash cut it short), the sled database is then
/// renamed to `<name>.sled-migrated` (kept, in case it is wanted back), and the
/// copy renamed to `<name>`. A crash between the renames finds the copy done
/// and only renames it.
pub(crate) fn convert_sled(
    data_dir: &Path,
    name: &str,
    cache_bytes: u64,
    memtable_bytes: u64,
    keyspace: impl Fn(&str) -> Option<String>,
) -> Result<(), StoreError> {
    let old_dir = data_dir.join(name);
    let copy = data_dir.join(format!("{name}.fjall-migrating"));
    let kept = data_dir.join(format!("{name}.sled-migrated"));
    let is_sled = old_dir.join("conf").is_file() && old_dir.join("db").is_file();
    if !is_sled {
        if !old_dir.exists() && copy.exists() && kept.exists() {
            std::fs::rename(&copy, &old_dir)?;
        }
        return Ok(());
    }
    if copy.exists() {
        std::fs::remove_dir_all(&copy)?;
    }
    tracing::warn!(
        path = %old_dir.display(),
        "converting a store of an earlier cqrsd version from sled to fjall; this runs once"
    );
    let started = Instant::now();
    let mut entries = 0u64;
    {
        let old = super::open_db(&old_dir, cache_bytes)?;
        let new = open(&copy, cache_bytes)?;
        for tree_name in old.tree_names() {
            let Some(target) = keyspace(&String::from_utf8_lossy(&tree_name)) else {
                continue;
            };
            let tree = old.open_tree(&tree_name)?;
            let target = new.keyspace(&target, || keyspace_options(memtable_bytes))?;
            let mut batch = new.batch();
            for item in tree.iter() {
                let (key, value) = item?;
                batch.insert(&target, key.to_vec(), value.to_vec());
                entries += 1;
                if batch.len() >= 10_000 {
                    std::mem::replace(&mut batch, new.batch()).commit()?;
                }
            }
            batch.commit()?;
        }
        new.persist(PersistMode::SyncAll)?;
    }
    std::fs::rename(&old_dir, &kept)?;
    std::fs::rename(&copy, &old_dir)?;
    tracing::warn!(
        entries,
        seconds = started.elapsed().as_secs_f64(),
        kept = %kept.display(),
        "converted the store to fjall; the sled copy is kept and may be deleted"
    );
    Ok(())
}

/// An open fjall database that reopens itself after a failed write.
///
/// fjall poisons a database whose journal write or sync failed (a full disk,
/// say): every later write is refused until the database is opened again.
/// The daemon must take writes again once space is freed, without a restart,
/// so a failed write drops this process's handles and opens the database
/// again, which recovers it from its journal; until that succeeds every
/// operation tries it again. Callers never keep handles across operations:
/// they ask for them per operation, so a reopen reaches everyone.
pub(crate) struct Engine {
    path: PathBuf,
    cache_bytes: u64,
    /// Each keyspace's memtable bound (`VIEW_MEMTABLE_BYTES`, `COMMAND_MEMTABLE_BYTES`).
    memtable_bytes: u64,
    open: RwLock<Option<Open>>,
}

struct Open {
    db: Database,
    keyspaces: HashMap<String, Keyspace>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn poisoned_lock<T>(_: T) -> StoreError {
    StoreError::Unavailable("a storage engine lock was poisoned".to_owned())
}

impl Engine {
    /// Opens the database at `path`, whose keyspaces buffer up to
    /// `memtable_bytes` each in memory. Blocking.
    pub(crate) fn open(
        path: &Path,
        cache_bytes: u64,
        memtable_bytes: u64,
    ) -> Result<Self, StoreError> {
        let db = open(path, cache_bytes)?;
        Ok(Self {
            path: path.to_owned(),
            cache_bytes,
            memtable_bytes,
            open: RwLock::new(Some(Open {
                db,
                keyspaces: HashMap::new(),
            })),
        })
    }

    /// The database and one of its keyspaces, for one operation. A keyspace
    /// that does not exist is created when `create`, and otherwise refused
    /// (a generation deleted by a rebuild's swap is never brought back empty).
    /// Blocking the first time a keyspace is asked for.
    pub(crate) fn handles(
        &self,
        name: &str,
        create: bool,
    ) -> Result<(Database, Keyspace), StoreError> {
        if let Some(open) = self.open.read().map_err(poisoned_lock)?.as_ref()
            && let Some(keyspace) = open.keyspaces.get(name)
        {
            return Ok((open.db.clone(), keyspace.clone()));
        }
        let mut guard = self.open.write().map_err(poisoned_lock)?;
        let open = self.reopened(&mut guard)?;
        if !create && !open.db.keyspace_exists(name) {
            return Err(StoreError::Unavailable(format!(
                "{} has no keyspace {name} (it was deleted)",
                self.path.display()
            )));
        }
        let memtable_bytes = self.memtable_bytes;
        let keyspace = open
            .db
            .keyspace(name, || keyspace_options(memtable_bytes))?;
        open.keyspaces.insert(name.to_owned(), keyspace.clone());
        Ok((open.db.clone(), keyspace))
    }

    /// The database, for one operation.
    pub(crate) fn database(&self) -> Result<Database, StoreError> {
        if let Some(open) = self.open.read().map_err(poisoned_lock)?.as_ref() {
            return Ok(open.db.clone());
        }
        let mut guard = self.open.write().map_err(poisoned_lock)?;
        Ok(self.reopened(&mut guard)?.db.clone())
    }

    /// The open database, opened again first if a failed write closed it.
    fn reopened<'a>(&self, guard: &'a mut Option<Open>) -> Result<&'a mut Open, StoreError> {
        if guard.is_none() {
            let db = open(&self.path, self.cache_bytes)?;
            tracing::warn!(path = %self.path.display(), "reopened a store after a failed write");
            *guard = Some(Open {
                db,
                keyspaces: HashMap::new(),
            });
        }
        guard
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".to_owned()))
    }

    /// Deletes the keyspace `name` and forgets its handle, so that a later
    /// [`Engine::handles`] without `create` refuses it. Blocking.
    pub(crate) fn delete_keyspace(&self, name: &str) -> Result<(), StoreError> {
        let (db, keyspace) = self.handles(name, false)?;
        if let Some(open) = self.open.write().map_err(poisoned_lock)?.as_mut() {
            open.keyspaces.remove(name);
        }
        self.written(db.delete_keyspace(keyspace))
    }

    /// The result of a write. A failed write (an I/O error, or a database
    /// poisoned by an earlier one) closes this process's handles, so that the
    /// next operation opens the database again (see the type's documentation).
    pub(crate) fn written<T>(&self, result: fjall::Result<T>) -> Result<T, StoreError> {
        result.map_err(|error| {
            if matches!(
                error,
                fjall::Error::Poisoned | fjall::Error::Io(_) | fjall::Error::Storage(_)
            )
                && let Ok(mut guard) = self.open.write()
            {
                tracing::warn!(path = %self.path.display(), %error, "a store write failed; reopening it");
                *guard = None;
            }
            error.into()
        })
    }
}
