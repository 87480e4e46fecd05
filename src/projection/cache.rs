//! A projection's working set: the documents and aggregation groups it has
//! touched lately, kept in memory in front of the view store and bounded in bytes.
//!
//! The cache holds committed values only. A batch takes the values it needs
//! out of the cache (or reads them from the view store on a miss), changes them, and
//! puts them back only once their commit has succeeded; a failed commit thus
//! leaves nothing uncommitted behind, and the retry reads the view store again. One
//! target (one projection generation, written by one thread) owns its cache,
//! so a swap to a rebuilt generation starts with an empty one.

use std::hash::Hash;

use lru::LruCache;
use serde_json::Value as Json;

/// Documents (`None`: known to be absent) and groups, least recently used
/// first out once the budget is spent.
#[derive(Debug)]
pub(super) struct WorkingSet {
    docs: Lru<String, Option<Json>>,
    groups: Lru<Vec<u8>, Json>,
    budget: usize,
}

impl WorkingSet {
    /// A cache of at most about `budget` bytes (0 keeps nothing).
    pub(super) fn new(budget: usize) -> Self {
        Self {
            docs: Lru::new(),
            groups: Lru::new(),
            budget,
        }
    }

    /// Takes the committed document of `id` out of the cache: `None` on a
    /// miss, `Some(None)` when the document is known to be absent.
    pub(super) fn take_doc(&mut self, id: &str) -> Option<Option<Json>> {
        self.docs.take(id)
    }

    /// Takes the committed measure states of a group out of the cache.
    pub(super) fn take_group(&mut self, key: &[u8]) -> Option<Json> {
        self.groups.take(key)
    }

    /// Remembers a committed document (or its absence).
    pub(super) fn put_doc(&mut self, id: String, doc: Option<Json>) {
        let size = id.len() + doc.as_ref().map_or(0, approximate_size) + ENTRY_OVERHEAD;
        self.docs.put(id, doc, size);
        self.evict();
    }

    /// Remembers a group's committed measure states.
    pub(super) fn put_group(&mut self, key: Vec<u8>, state: Json) {
        let size = key.len() + approximate_size(&state) + ENTRY_OVERHEAD;
        self.groups.put(key, state, size);
        self.evict();
    }

    /// The bytes the cache holds, as estimated.
    pub(super) fn bytes(&self) -> usize {
        self.docs.bytes + self.groups.bytes
    }

    fn evict(&mut self) {
        while self.bytes() > self.budget {
            // Documents and groups share one budget; the larger part gives way.
            let docs_first = self.docs.bytes >= self.groups.bytes;
            let evicted = if docs_first {
                self.docs.pop_oldest()
            } else {
                self.groups.pop_oldest()
            };
            if !(evicted || self.docs.pop_oldest() || self.groups.pop_oldest()) {
                break;
            }
        }
    }
}

/// What one cached entry costs beyond its key and value: the LRU's node and
/// hash slot, and the value's allocation headers.
const ENTRY_OVERHEAD: usize = 96;

/// An LRU map that counts the bytes of what it holds.
#[derive(Debug)]
struct Lru<K: Hash + Eq, V> {
    entries: LruCache<K, (V, usize)>,
    bytes: usize,
}

impl<K: Hash + Eq, V> Lru<K, V> {
    fn new() -> Self {
        Self {
            entries: LruCache::unbounded(),
            bytes: 0,
        }
    }

    fn take<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (value, size) = self.entries.pop(key)?;
        self.bytes -= size;
        Some(value)
    }

    fn put(&mut self, key: K, value: V, size: usize) {
        if let Some((_, old)) = self.entries.put(key, (value, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
    }

    fn pop_oldest(&mut self) -> bool {
        match self.entries.pop_lru() {
            Some((_, (_, size))) => {
                self.bytes -= size;
                true
            }
            None => false,
        }
    }
}

/// About how many bytes a JSON value takes in memory: the value itself, its
/// strings, and per object member the key and the map's node share.
pub(super) fn approximate_size(value: &Json) -> usize {
    const VALUE: usize = std::mem::size_of::<Json>();
    VALUE
        + match value {
            Json::String(s) => s.len(),
            Json::Array(items) => items.iter().map(approximate_size).sum(),
            Json::Object(fields) => fields
                .iter()
                .map(|(key, item)| 24 + 16 + key.len() + approximate_size(item))
                .sum(),
            _ => 0,
        }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn values_come_out_once_and_go_back_after_their_commit() {
        let mut cache = WorkingSet::new(1 << 20);
        assert_eq!(cache.take_doc("a"), None);
        cache.put_doc("a".to_owned(), Some(json!({"n": 1})));
        cache.put_doc("gone".to_owned(), None);
        // Taken out for a batch: a second look misses until it is put back.
        assert_eq!(cache.take_doc("a"), Some(Some(json!({"n": 1}))));
        assert_eq!(cache.take_doc("a"), None);
        assert_eq!(cache.take_doc("gone"), Some(None));
        cache.put_group(vec![1, 2], json!({"count": 3}));
        assert_eq!(cache.take_group(&[1, 2]), Some(json!({"count": 3})));
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn the_budget_bounds_the_bytes_and_evicts_the_least_recently_used() {
        let doc = json!({"owner": "Ada", "status": "open", "balance": 100});
        let one = "k0000".len() + approximate_size(&doc) + ENTRY_OVERHEAD;
        let mut cache = WorkingSet::new(one * 10);
        for i in 0..100 {
            cache.put_doc(format!("k{i:04}"), Some(doc.clone()));
            assert!(cache.bytes() <= one * 10);
        }
        // The last ten are kept, the older ones evicted.
        assert!(cache.take_doc("k0099").is_some());
        assert!(cache.take_doc("k0090").is_some());
        assert!(cache.take_doc("k0089").is_none());
        // A zero budget keeps nothing.
        let mut none = WorkingSet::new(0);
        none.put_doc("a".to_owned(), Some(doc));
        assert_eq!(none.bytes(), 0);
        assert_eq!(none.take_doc("a"), None);
    }
}
