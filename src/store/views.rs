//! The read models of view and aggregation projections, in a fjall database
//! (an LSM tree) at `<data_dir>/views`.
//!
//! Layout:
//! - keyspace `meta`: `live/<projection>` → the live generation (u64 big-endian);
//! - keyspace `view#<projection>#<generation>`, one per generation, with key prefixes:
//!   - `d` ‖ id → the document (JSON);
//!   - `i` ‖ field length (u16 BE) ‖ field ‖ encoded value ‖ id → empty (secondary index);
//!   - `g` ‖ encoded group values → the group's measure states (JSON);
//!   - `p` ‖ topic ‖ 0x00 ‖ partition (u32 BE) → the next offset to read (u64 BE);
//!   - `q` ‖ topic ‖ 0x00 ‖ partition (u32 BE) ‖ offset (u64 BE) ‖ event index (u32 BE)
//!     → a quarantined event (JSON).
//!
//! Encoded values sort as the values do (see [`encode_value`]), so an index range
//! scan returns documents in field order, and then by id.
//!
//! Each projection has one writer (its worker thread), which commits a batch of
//! changes and the new positions in one fjall write batch: a batch is one
//! checksummed record of the database's journal, recovered whole or not at
//! all, so data and positions never disagree after a crash (DESIGN.md §2
//! guarantee 5). Rebuilds fill generation N+1 beside N and switch `meta` with
//! one write; the journal is one sequence for every keyspace, so a recovered
//! switch always comes with the generation it names.
//!
//! Why fjall and not sled (which the command store and the history index
//! still use): a catch-up over a million new documents is random inserts into
//! a growing tree, and sled 0.34 spent about 8 µs of CPU per key on them, under
//! one process-wide lock that also stopped every other sled user of the process
//! (BENCHMARKS.md, "What bounds the 1M-aggregate ready time"). An LSM tree
//! takes a batch into its journal and memtable and sorts it into files in the
//! background, so the cost of a write no longer grows with the tree.
//!
//! Data directories of earlier versions hold the views in sled; [`ViewStore::open`]
//! converts them once, keeping every document, index entry and position
//! (policies' too), so no projection starts again from the log.
//!
//! The same `meta` keyspace records the live generation of each search index
//! (`search-live/<projection>`); the indexes themselves are tantivy
//! directories at `<data_dir>/search/<projection>/<generation>` (see
//! [`super::search`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fjall::{Keyspace, PersistMode};

use super::lsm::Engine;
use serde_json::Value as Json;

use super::StoreError;

const LIVE_PREFIX: &str = "live/";
const SEARCH_LIVE_PREFIX: &str = "search-live/";
pub const DOC: u8 = b'd';
pub const INDEX: u8 = b'i';
pub const GROUP: u8 = b'g';
const POSITION: u8 = b'p';
const QUARANTINE: u8 = b'q';

/// How often commits make the journal durable. A commit reaches the operating
/// system at once (a crash of the process loses nothing); this bounds what a
/// power loss can take back, as sled's `flush_every_ms` did. What is lost that
/// way is only re-read from the log: positions and data go back together.
const SYNC_INTERVAL: Duration = Duration::from_millis(500);

/// Entries of a scan, as (full key, value), in the order asked for.
pub type Entries = Box<dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>>>;

/// Where a projection is in one partition: (topic, partition) → next offset.
pub type Positions = BTreeMap<(String, u32), u64>;

/// The fjall database of every view and aggregation; cheap to clone.
#[derive(Clone)]
pub struct ViewStore {
    engine: Arc<Engine>,
    /// The live generation's keyspace of each projection, so queries find it
    /// without reading `meta`; replaced as a whole when a rebuild swaps generations.
    live: Arc<RwLock<HashMap<String, Generation>>>,
    data_dir: PathBuf,
    /// The reader of each search projection's live index, replaced when a
    /// rebuilt index is swapped in, so searches always find the live one.
    search_readers: Arc<RwLock<HashMap<String, super::SearchReader>>>,
    sync: Arc<Sync>,
}

/// When the journal was last made durable, in milliseconds since `start`.
struct Sync {
    start: Instant,
    last_ms: AtomicU64,
}

impl std::fmt::Debug for ViewStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewStore").finish_non_exhaustive()
    }
}

/// One generation of one projection's data.
#[derive(Clone)]
pub struct Generation {
    pub number: u64,
    /// The keyspace's name; its handle is asked of the engine per operation,
    /// so a reopen after a failed write reaches every generation.
    name: String,
    engine: Arc<Engine>,
    /// Counts the clones of this generation, so a swap can wait for the
    /// queries that still read the old one.
    readers: Arc<()>,
    sync: Arc<Sync>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

/// A quarantined event: what could not be applied, where, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quarantined {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    /// The event's index inside its record.
    pub index: u32,
    /// The event as decoded, or `None` when the record itself does not decode.
    pub event: Option<Json>,
    pub reason: String,
}

/// The changes of one batch, written atomically with the new positions.
#[derive(Debug, Default)]
pub struct ChangeSet {
    /// id → (document before the batch, document after it); `None` is absent.
    pub docs: HashMap<String, (Option<Json>, Option<Json>)>,
    /// Indexed fields of the view, to maintain index entries.
    pub indexes: Vec<String>,
    /// Encoded group key → measure states.
    pub groups: HashMap<Vec<u8>, Json>,
    pub quarantined: Vec<Quarantined>,
    pub positions: Positions,
}

fn lock_err<T>(_: T) -> StoreError {
    StoreError::Unavailable("a view store lock was poisoned".to_owned())
}

/// The keyspace of one generation. Projection names are `[A-Za-z0-9_]+`
/// (domain load checks them), so `#` separates the parts unambiguously; fjall
/// takes names of at most 255 bytes, so a longer projection name is cut and
/// told apart by a hash of the whole name (FNV-1a: stable across builds, which
/// the standard library's hasher does not promise).
fn keyspace_name(projection: &str, generation: u64) -> String {
    let name = format!("view#{projection}#{generation}");
    if name.len() <= 255 {
        return name;
    }
    let hash = projection.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("view#{}~{hash:016x}#{generation}", &projection[..200])
}

fn corrupt(what: &str, detail: impl Into<String>) -> StoreError {
    StoreError::corrupt(what.to_owned(), detail)
}

impl ViewStore {
    /// Opens (or creates) the store at `<data_dir>/views`. Blocking. Fails while
    /// another process (a running daemon) holds it.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(data_dir, super::VIEW_STORE_CACHE_BYTES)
    }

    /// Opens the store with a block cache of `cache_bytes`, converting a sled
    /// view store of an earlier version first. Blocking.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        super::lsm::convert_sled(
            data_dir,
            "views",
            cache_bytes,
            super::lsm::VIEW_MEMTABLE_BYTES,
            keyspace_of_sled_tree,
        )?;
        let engine = Engine::open(
            &data_dir.join("views"),
            cache_bytes,
            super::lsm::VIEW_MEMTABLE_BYTES,
        )?;
        let store = Self {
            engine: Arc::new(engine),
            live: Arc::default(),
            data_dir: data_dir.to_owned(),
            search_readers: Arc::default(),
            sync: Arc::new(Sync {
                start: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
        };
        store.drop_stale_generations()?;
        Ok(store)
    }

    /// Deletes generations older than the live one of their projection: a
    /// crash between a rebuild's switch and its deletion of the old generation
    /// leaves one behind, which nothing would read again. Blocking.
    fn drop_stale_generations(&self) -> Result<(), StoreError> {
        let db = self.engine.database()?;
        let meta = self.meta()?;
        for name in db.list_keyspace_names() {
            let name: &str = &name;
            let Some(rest) = name.strip_prefix("view#") else {
                continue;
            };
            let Some((projection, number)) = rest.rsplit_once('#') else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            if keyspace_name(projection, number) != name {
                continue;
            }
            let key = format!("{LIVE_PREFIX}{projection}");
            let Some(live) = meta.get(&key)? else {
                continue;
            };
            let live = decode_u64(&live).ok_or_else(|| corrupt(&key, "not 8 bytes"))?;
            if number < live {
                self.engine.delete_keyspace(name)?;
            }
        }
        Ok(())
    }

    /// The `meta` keyspace, for one operation.
    fn meta(&self) -> Result<Keyspace, StoreError> {
        Ok(self.engine.handles("meta", true)?.1)
    }

    /// A generation's handle, its keyspace created if it does not exist.
    fn generation(&self, projection: &str, number: u64) -> Result<Generation, StoreError> {
        let name = keyspace_name(projection, number);
        self.engine.handles(&name, true)?;
        Ok(Generation {
            number,
            name,
            engine: self.engine.clone(),
            readers: Arc::default(),
            sync: self.sync.clone(),
        })
    }

    /// The directory of one generation of a search index.
    pub fn search_dir(&self, projection: &str, generation: u64) -> PathBuf {
        self.data_dir
            .join("search")
            .join(projection)
            .join(generation.to_string())
    }

    /// The live generation of a search index (0 until a rebuild swaps one in).
    /// Blocking.
    pub fn search_generation(&self, projection: &str) -> Result<u64, StoreError> {
        let key = format!("{SEARCH_LIVE_PREFIX}{projection}");
        match self.meta()?.get(&key)? {
            Some(bytes) => decode_u64(&bytes).ok_or_else(|| corrupt(&key, "not 8 bytes")),
            None => Ok(0),
        }
    }

    /// Makes `generation` the live search index with one durable write. The
    /// caller has committed that index and dropped its writer. Blocking.
    pub fn set_search_generation(
        &self,
        projection: &str,
        generation: u64,
        reader: super::SearchReader,
    ) -> Result<(), StoreError> {
        let (db, meta) = self.engine.handles("meta", true)?;
        self.engine.written(meta.insert(
            format!("{SEARCH_LIVE_PREFIX}{projection}"),
            generation.to_be_bytes(),
        ))?;
        self.engine.written(db.persist(PersistMode::SyncAll))?;
        self.publish_search_reader(projection, reader)
    }

    /// Makes `reader` the one searches of `projection` use.
    pub fn publish_search_reader(
        &self,
        projection: &str,
        reader: super::SearchReader,
    ) -> Result<(), StoreError> {
        self.search_readers
            .write()
            .map_err(lock_err)?
            .insert(projection.to_owned(), reader);
        Ok(())
    }

    /// The reader of a search projection's live index, if it is open; never
    /// blocks on disk.
    pub fn search_reader(&self, projection: &str) -> Option<super::SearchReader> {
        self.search_readers.read().ok()?.get(projection).cloned()
    }

    /// The live generation of a projection, created empty (generation 0) on first use.
    /// Blocking.
    pub fn live(&self, projection: &str) -> Result<Generation, StoreError> {
        if let Some(generation) = self.live.read().map_err(lock_err)?.get(projection) {
            return Ok(generation.clone());
        }
        let key = format!("{LIVE_PREFIX}{projection}");
        let meta = self.meta()?;
        let number = match meta.get(&key)? {
            Some(bytes) => decode_u64(&bytes).ok_or_else(|| corrupt(&key, "not 8 bytes"))?,
            None => {
                self.engine.written(meta.insert(&key, 0u64.to_be_bytes()))?;
                0
            }
        };
        let generation = self.generation(projection, number)?;
        self.live
            .write()
            .map_err(lock_err)?
            .insert(projection.to_owned(), generation.clone());
        Ok(generation)
    }

    /// The live generation of a projection if it was opened already; never blocks
    /// on disk, so queries can look it up on any thread.
    pub fn live_cached(&self, projection: &str) -> Option<Generation> {
        self.live.read().ok()?.get(projection).cloned()
    }

    /// A fresh generation beside the live one, emptied in case an interrupted
    /// rebuild left data behind. Blocking.
    pub fn new_generation(&self, projection: &str) -> Result<Generation, StoreError> {
        let live = self.live(projection)?;
        let generation = self.generation(projection, live.number + 1)?;
        let (_, tree) = self.engine.handles(&generation.name, false)?;
        self.engine.written(tree.clear())?;
        Ok(generation)
    }

    /// Makes `generation` the live one with one atomic write, then drops the old
    /// generation once no reader holds it any more (bounded wait). Blocking.
    pub fn swap(&self, projection: &str, generation: &Generation) -> Result<(), StoreError> {
        let old = self.live(projection)?;
        let (db, meta) = self.engine.handles("meta", true)?;
        self.engine.written(meta.insert(
            format!("{LIVE_PREFIX}{projection}"),
            generation.number.to_be_bytes(),
        ))?;
        // One journal for every keyspace: this makes the new generation's
        // batches durable together with the switch that names it.
        self.engine.written(db.persist(PersistMode::SyncAll))?;
        self.live
            .write()
            .map_err(lock_err)?
            .insert(projection.to_owned(), generation.clone());
        // Queries clone the generation they read, so waiting for the last clone
        // keeps a query that started before the swap from finding its keyspace
        // gone (it would answer 503, never wrong data: a deleted keyspace is
        // never brought back empty).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&old.readers) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.engine.delete_keyspace(&old.name)
    }

    /// Flushes everything to disk. Blocking.
    pub fn flush(&self) -> Result<(), StoreError> {
        let db = self.engine.database()?;
        self.engine.written(db.persist(PersistMode::SyncAll))
    }
}

impl Generation {
    /// This generation's keyspace, for one operation.
    fn tree(&self) -> Result<Keyspace, StoreError> {
        Ok(self.engine.handles(&self.name, false)?.1)
    }

    /// The stored positions of this generation. Blocking.
    pub fn positions(&self) -> Result<Positions, StoreError> {
        let mut out = Positions::new();
        for item in self.tree()?.prefix([POSITION]) {
            let (key, value) = item.into_inner()?;
            let rest = &key[1..];
            let split = rest.iter().position(|b| *b == 0);
            let (Some(split), Some(offset)) = (split, decode_u64(&value)) else {
                return Err(corrupt("projection position", "malformed entry"));
            };
            let topic = String::from_utf8_lossy(&rest[..split]).into_owned();
            let partition = rest[split + 1..]
                .try_into()
                .map(u32::from_be_bytes)
                .map_err(|_| corrupt("projection position", "malformed partition"))?;
            out.insert((topic, partition), offset);
        }
        Ok(out)
    }

    /// The current document of `id`. Blocking.
    pub fn doc(&self, id: &str) -> Result<Option<Json>, StoreError> {
        let mut key = vec![DOC];
        key.extend_from_slice(id.as_bytes());
        self.tree()?
            .get(key)?
            .map(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(|e| corrupt(&format!("document {id}"), e.to_string()))
            })
            .transpose()
    }

    /// The current document whose id has these bytes. Blocking.
    pub fn doc_by_key(&self, id: &[u8]) -> Result<Option<Json>, StoreError> {
        let mut key = vec![DOC];
        key.extend_from_slice(id);
        self.tree()?
            .get(key)?
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| corrupt("document", e.to_string()))
            })
            .transpose()
    }

    /// The measure states of a group. Blocking.
    pub fn group(&self, key: &[u8]) -> Result<Option<Json>, StoreError> {
        let mut full = vec![GROUP];
        full.extend_from_slice(key);
        self.tree()?
            .get(full)?
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| corrupt("group", e.to_string()))
            })
            .transpose()
    }

    /// Every quarantined event, in log order. Blocking.
    pub fn quarantined(&self, max: usize) -> Result<Vec<Quarantined>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree()?.prefix([QUARANTINE]).take(max) {
            let value = item.value()?;
            out.push(
                serde_json::from_slice(&value)
                    .map_err(|e| corrupt("quarantine entry", e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// How many events are quarantined. Blocking.
    pub fn quarantine_count(&self) -> Result<u64, StoreError> {
        let mut count = 0;
        for item in self.tree()?.prefix([QUARANTINE]) {
            item.key()?;
            count += 1;
        }
        Ok(count)
    }

    /// Writes a batch's changes and its positions in one atomic write batch. Blocking.
    pub fn commit(&self, changes: &ChangeSet) -> Result<(), StoreError> {
        let (db, tree) = self.engine.handles(&self.name, false)?;
        let tree = &tree;
        // Gathered first, then handed to fjall in key order (`write_in_key_order`).
        let mut writes: Vec<super::lsm::Write> =
            Vec::with_capacity(changes.docs.len() * (1 + changes.indexes.len()));
        for (id, (before, after)) in &changes.docs {
            if before == after {
                continue;
            }
            // Only the index entries whose indexed value changed are written:
            // most events change a field that is not indexed (a balance),
            // and rewriting every entry tripled the writes of such a batch.
            let old_keys: Vec<Vec<u8>> = before
                .iter()
                .flat_map(|doc| index_keys(&changes.indexes, doc, id))
                .collect();
            let new_keys: Vec<Vec<u8>> = after
                .iter()
                .flat_map(|doc| index_keys(&changes.indexes, doc, id))
                .collect();
            for key in &new_keys {
                if !old_keys.contains(key) {
                    writes.push((key.clone(), Some(Vec::new())));
                }
            }
            for key in old_keys {
                if !new_keys.contains(&key) {
                    writes.push((key, None));
                }
            }
            let mut doc_key = vec![DOC];
            doc_key.extend_from_slice(id.as_bytes());
            match after {
                Some(after) => {
                    let bytes = serde_json::to_vec(after)
                        .map_err(|e| corrupt(&format!("document {id}"), e.to_string()))?;
                    writes.push((doc_key, Some(bytes)));
                }
                None => writes.push((doc_key, None)),
            }
        }
        for (key, state) in &changes.groups {
            let mut full = vec![GROUP];
            full.extend_from_slice(key);
            let bytes = serde_json::to_vec(state).map_err(|e| corrupt("group", e.to_string()))?;
            writes.push((full, Some(bytes)));
        }
        for entry in &changes.quarantined {
            let mut key = vec![QUARANTINE];
            key.extend_from_slice(&partition_key(&entry.topic, entry.partition));
            key.extend_from_slice(&entry.offset.to_be_bytes());
            key.extend_from_slice(&entry.index.to_be_bytes());
            let bytes = serde_json::to_vec(entry)
                .map_err(|e| corrupt("quarantine entry", e.to_string()))?;
            writes.push((key, Some(bytes)));
        }
        for ((topic, partition), offset) in &changes.positions {
            let mut key = vec![POSITION];
            key.extend_from_slice(&partition_key(topic, *partition));
            writes.push((key, Some(offset.to_be_bytes().to_vec())));
        }
        let mut batch = db.batch();
        super::lsm::write_in_key_order(&mut batch, tree, writes);
        self.engine.written(batch.commit())?;
        // The batch is committed now, whatever the sync below does: were its
        // failure returned, the caller would apply the batch's events again.
        if let Err(error) = self.sync_if_due(&db) {
            tracing::warn!(%error, "the view store's periodic sync failed");
        }
        Ok(())
    }

    /// Makes the journal durable when the last time is `SYNC_INTERVAL` ago.
    fn sync_if_due(&self, db: &fjall::Database) -> Result<(), StoreError> {
        let now = u64::try_from(self.sync.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.sync.last_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(SYNC_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(last) >= interval
            && self
                .sync
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.engine.written(db.persist(PersistMode::SyncData))?;
        }
        Ok(())
    }

    /// Entries of the keyspace whose keys start with `prefix`, in key order (or
    /// reversed), strictly after `after` (before it when reversed), as full keys.
    /// Blocking.
    pub fn scan(&self, prefix: &[u8], after: Option<&[u8]>, reverse: bool) -> Entries {
        use std::ops::Bound;
        let upper = prefix_end(prefix);
        let (lower, upper) = match (after, reverse) {
            (Some(after), false) => (Bound::Excluded(after.to_vec()), upper),
            (Some(after), true) => (
                Bound::Included(prefix.to_vec()),
                Bound::Excluded(after.to_vec()),
            ),
            (None, _) => (Bound::Included(prefix.to_vec()), upper),
        };
        let tree = match self.tree() {
            Ok(tree) => tree,
            Err(error) => {
                return Box::new(std::iter::once(Err(error)));
            }
        };
        let range = tree.range::<Vec<u8>, _>((lower, upper));
        let iter: Box<dyn Iterator<Item = fjall::Guard>> = if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        Box::new(iter.map(|item| {
            let (key, value) = item.into_inner()?;
            Ok((key.to_vec(), value.to_vec()))
        }))
    }
}

/// The keyspace the sled tree `tree` of an earlier version's view store goes to.
fn keyspace_of_sled_tree(tree: &str) -> Option<String> {
    if tree == "meta" {
        return Some(tree.to_owned());
    }
    let (projection, number) = tree.strip_prefix("view/")?.rsplit_once('/')?;
    Some(keyspace_name(projection, number.parse().ok()?))
}

/// The exclusive upper bound of all keys starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> std::ops::Bound<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return std::ops::Bound::Excluded(end);
        }
    }
    std::ops::Bound::Unbounded
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

fn partition_key(topic: &str, partition: u32) -> Vec<u8> {
    let mut key = topic.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// The prefix of every index entry of `field`.
pub fn index_prefix(field: &str) -> Vec<u8> {
    let mut key = vec![INDEX];
    let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(field.as_bytes());
    key
}

/// The index entries of a document: one per indexed field, a missing field
/// indexed as "missing" (sorting first) so ordering by a field lists every document.
fn index_keys<'a>(
    indexes: &'a [String],
    doc: &'a Json,
    id: &'a str,
) -> impl Iterator<Item = Vec<u8>> + 'a {
    indexes.iter().map(move |field| {
        let mut key = index_prefix(field);
        encode_value(doc.get(field), &mut key);
        key.extend_from_slice(id.as_bytes());
        key
    })
}

/// Encodes a JSON value so that byte order is value order: missing < null <
/// false < true < numbers (by value) < strings (by bytes) < arrays/objects.
/// Every encoding is self-delimiting, so whatever follows it (an id) does not
/// change the order of the values.
pub fn encode_value(value: Option<&Json>, out: &mut Vec<u8>) {
    match value {
        None => out.push(0x00),
        Some(Json::Null) => out.push(0x01),
        Some(Json::Bool(false)) => out.push(0x02),
        Some(Json::Bool(true)) => out.push(0x03),
        Some(Json::Number(n)) => {
            out.push(0x04);
            let f = n.as_f64().unwrap_or(0.0);
            // Normalise -0.0 so that 0 and -0.0 are one value.
            let f = if f == 0.0 { 0.0 } else { f };
            let bits = f.to_bits();
            let ordered = if bits >> 63 == 1 {
                !bits
            } else {
                bits | (1 << 63)
            };
            out.extend_from_slice(&ordered.to_be_bytes());
        }
        Some(Json::String(s)) => {
            out.push(0x05);
            escape(s.as_bytes(), out);
        }
        Some(other) => {
            out.push(0x06);
            escape(other.to_string().as_bytes(), out);
        }
    }
}

/// Escapes 0x00 as 0x00 0xFF and terminates with 0x00 0x00, which keeps the
/// byte order of the original and marks its end unambiguously.
fn escape(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

/// The length of the encoded value at the start of `bytes`, if well formed.
pub fn encoded_len(bytes: &[u8]) -> Option<usize> {
    match bytes.first()? {
        0x00..=0x03 => Some(1),
        0x04 => (bytes.len() >= 9).then_some(9),
        0x05 | 0x06 => {
            let mut i = 1;
            while i + 1 < bytes.len() {
                match (bytes[i], bytes[i + 1]) {
                    (0, 0) => return Some(i + 2),
                    (0, 0xFF) => i += 2,
                    _ => i += 1,
                }
            }
            None
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc(v: &Json) -> Vec<u8> {
        let mut out = Vec::new();
        encode_value(Some(v), &mut out);
        out
    }

    #[test]
    fn encoded_values_sort_like_values() {
        let values = [
            json!(null),
            json!(false),
            json!(true),
            json!(-1e300),
            json!(-2.5),
            json!(-1),
            json!(0),
            json!(0.5),
            json!(3),
            json!(1e300),
            json!(""),
            json!("a"),
            json!("a\u{0}b"),
            json!("ab"),
            json!("b"),
            json!([1]),
        ];
        for pair in values.windows(2) {
            assert!(enc(&pair[0]) < enc(&pair[1]), "{} < {}", pair[0], pair[1]);
        }
        assert_eq!(enc(&json!(5)), enc(&json!(5.0)));
        for v in &values {
            let mut e = enc(v);
            let len = e.len();
            e.extend_from_slice(b"id");
            assert_eq!(encoded_len(&e), Some(len), "{v}");
        }
    }

    #[test]
    fn a_batch_commits_docs_indexes_and_positions_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let live = store.live("accounts").unwrap();
        let mut changes = ChangeSet {
            indexes: vec!["owner".to_owned()],
            ..ChangeSet::default()
        };
        changes
            .docs
            .insert("a1".to_owned(), (None, Some(json!({"owner": "ada"}))));
        changes.positions.insert(("t".to_owned(), 2), 7);
        live.commit(&changes).unwrap();
        assert_eq!(live.doc("a1").unwrap(), Some(json!({"owner": "ada"})));
        assert_eq!(live.positions().unwrap()[&("t".to_owned(), 2)], 7);
        let entries: Vec<_> = live
            .scan(&index_prefix("owner"), None, false)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(entries.len(), 1);

        let next = store.new_generation("accounts").unwrap();
        assert!(next.positions().unwrap().is_empty());
        drop(live);
        store.swap("accounts", &next).unwrap();
        assert_eq!(store.live("accounts").unwrap().number, 1);
        assert_eq!(store.live("accounts").unwrap().doc("a1").unwrap(), None);
    }

    #[test]
    fn index_entries_follow_only_the_indexed_values_that_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let live = store.live("accounts").unwrap();
        let indexes = vec!["owner".to_owned(), "status".to_owned()];
        let commit = |before: Option<Json>, after: Option<Json>| {
            let mut changes = ChangeSet {
                indexes: indexes.clone(),
                ..ChangeSet::default()
            };
            changes.docs.insert("a1".to_owned(), (before, after));
            live.commit(&changes).unwrap();
        };
        let index = |field: &str| -> Vec<Vec<u8>> {
            live.scan(&index_prefix(field), None, false)
                .map(|entry| entry.unwrap().0.to_vec())
                .collect()
        };
        let entry = |field: &str, value: Json| {
            let mut key = index_prefix(field);
            encode_value(Some(&value), &mut key);
            key.extend_from_slice(b"a1");
            key
        };
        let open = json!({"owner": "ada", "status": "open", "balance": 0});
        commit(None, Some(open.clone()));
        // A change of an unindexed field keeps both entries.
        let richer = json!({"owner": "ada", "status": "open", "balance": 5});
        commit(Some(open), Some(richer.clone()));
        assert_eq!(index("owner"), vec![entry("owner", json!("ada"))]);
        assert_eq!(index("status"), vec![entry("status", json!("open"))]);
        // A change of one indexed field moves that entry only.
        let closed = json!({"owner": "ada", "status": "closed", "balance": 5});
        commit(Some(richer), Some(closed.clone()));
        assert_eq!(index("owner"), vec![entry("owner", json!("ada"))]);
        assert_eq!(index("status"), vec![entry("status", json!("closed"))]);
        // A deletion removes every entry.
        commit(Some(closed), None);
        assert!(index("owner").is_empty());
        assert!(index("status").is_empty());
        assert_eq!(live.doc("a1").unwrap(), None);
    }

    #[test]
    fn a_sled_view_store_of_an_earlier_version_is_converted_with_everything_in_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout earlier versions wrote: `meta` and one tree per generation.
            let old = sled::open(dir.path().join("views")).unwrap();
            let meta = old.open_tree("meta").unwrap();
            meta.insert("live/accounts", &1u64.to_be_bytes()).unwrap();
            meta.insert("search-live/search", &3u64.to_be_bytes())
                .unwrap();
            let tree = old.open_tree("view/accounts/1").unwrap();
            tree.insert(b"da1", br#"{"owner":"ada"}"#).unwrap();
            let mut position = vec![POSITION];
            position.extend_from_slice(&partition_key("cqrsd.account", 2));
            tree.insert(position, &7u64.to_be_bytes()).unwrap();
            old.flush().unwrap();
        }
        let store = ViewStore::open(dir.path()).unwrap();
        let live = store.live("accounts").unwrap();
        assert_eq!(live.number, 1);
        assert_eq!(live.doc("a1").unwrap(), Some(json!({"owner": "ada"})));
        assert_eq!(
            live.positions().unwrap()[&("cqrsd.account".to_owned(), 2)],
            7
        );
        assert_eq!(store.search_generation("search").unwrap(), 3);
        assert!(
            dir.path()
                .join("views.sled-migrated")
                .join("conf")
                .is_file()
        );
        assert!(!dir.path().join("views.fjall-migrating").exists());
        drop((live, store));
        // Opened again, nothing is converted twice and everything is there.
        let store = ViewStore::open(dir.path()).unwrap();
        let live = store.live("accounts").unwrap();
        assert_eq!(live.doc("a1").unwrap(), Some(json!({"owner": "ada"})));
    }

    #[test]
    fn a_conversion_cut_between_its_renames_is_finished_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = sled::open(dir.path().join("views")).unwrap();
            let tree = old.open_tree("view/accounts/0").unwrap();
            tree.insert(b"da1", br#"{"owner":"ada"}"#).unwrap();
            old.flush().unwrap();
        }
        drop(ViewStore::open(dir.path()).unwrap());
        // The state a crash after the first rename leaves.
        std::fs::rename(
            dir.path().join("views"),
            dir.path().join("views.fjall-migrating"),
        )
        .unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let live = store.live("accounts").unwrap();
        assert_eq!(live.doc("a1").unwrap(), Some(json!({"owner": "ada"})));
        assert!(!dir.path().join("views.fjall-migrating").exists());
    }

    #[test]
    fn a_generation_older_than_the_live_one_is_deleted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ViewStore::open(dir.path()).unwrap();
            let mut changes = ChangeSet::default();
            changes
                .docs
                .insert("a1".to_owned(), (None, Some(json!({"n": 0}))));
            store.live("accounts").unwrap().commit(&changes).unwrap();
            let next = store.new_generation("accounts").unwrap();
            next.commit(&changes).unwrap();
            // A crash between the switch and the deletion of generation 0.
            store
                .meta()
                .unwrap()
                .insert("live/accounts", 1u64.to_be_bytes())
                .unwrap();
            store.flush().unwrap();
        }
        let store = ViewStore::open(dir.path()).unwrap();
        let names: Vec<String> = store
            .engine
            .database()
            .unwrap()
            .list_keyspace_names()
            .iter()
            .map(|name| name.to_string())
            .collect();
        assert!(names.contains(&keyspace_name("accounts", 1)), "{names:?}");
        assert!(!names.contains(&keyspace_name("accounts", 0)), "{names:?}");
        assert_eq!(store.live("accounts").unwrap().number, 1);
    }

    #[test]
    fn long_projection_names_get_distinct_keyspaces_within_the_limit() {
        let long = "p".repeat(300);
        let longer = format!("{long}q");
        let a = keyspace_name(&long, 3);
        let b = keyspace_name(&longer, 3);
        assert!(a.len() <= 255 && b.len() <= 255);
        assert_ne!(a, b);
        assert_eq!(keyspace_name("accounts", 3), "view#accounts#3");
    }
}
