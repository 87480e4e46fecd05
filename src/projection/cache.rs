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
        let size = allocation(id.len()) + doc.as_ref().map_or(0, heap_size) + ENTRY_OVERHEAD;
        self.docs.put(id, doc, size);
        self.evict();
    }

    /// Remembers a group's committed measure states.
    pub(super) fn put_group(&mut self, key: Vec<u8>, state: Json) {
        let size = allocation(key.len()) + heap_size(&state) + ENTRY_OVERHEAD;
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

/// What one cached entry costs beyond its key's bytes and its value: the
/// LRU's node (the key's and value's inline parts, two links, the size) and
/// its hash slot.
const ENTRY_OVERHEAD: usize = 112;

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

/// About how many bytes are allocated behind a JSON value (its inline part,
/// `size_of::<Json>()`, lives in the map entry that holds it), as the
/// allocator hands them out.
///
/// serde_json keeps an object's members in a `BTreeMap`, whose every node
/// holds room for eleven keys and values whether it uses one or eleven, so a
/// small document costs a whole node (632 bytes on 64-bit) before its
/// strings. Counting members instead under-counted a four-field document by
/// about 40 %, and the working sets and feeds held that much more than their
/// share of `cache_mib`. The unit test below checks this model against what a
/// counting allocator sees.
pub(super) fn heap_size(value: &Json) -> usize {
    const VALUE: usize = std::mem::size_of::<Json>();
    match value {
        Json::String(s) => allocation(s.len()),
        Json::Array(items) if items.is_empty() => 0,
        // A parsed array's vector grows by doubling from four elements.
        Json::Array(items) => {
            items.len().max(4).next_power_of_two() * VALUE
                + items.iter().map(heap_size).sum::<usize>()
        }
        Json::Object(fields) => {
            btree_nodes(fields.len())
                + fields
                    .iter()
                    .map(|(key, item)| allocation(key.len()) + heap_size(item))
                    .sum::<usize>()
        }
        _ => 0,
    }
}

/// The nodes of a `BTreeMap<String, Json>` with `members` entries: one leaf
/// up to eleven, then about 120 bytes a member (leaves filled by half to
/// two thirds, and the internal nodes above them), at least the two leaves
/// and one internal node of the first split.
fn btree_nodes(members: usize) -> usize {
    const LEAF: usize = 632;
    const FIRST_SPLIT: usize = 2 * LEAF + 728;
    match members {
        0 => 0,
        1..=11 => LEAF,
        _ => (members * 120).max(FIRST_SPLIT),
    }
}

/// What the allocator hands out for `len` bytes: nothing for none, else at
/// least 8 and, above that, the next multiple of 16 (jemalloc's small size
/// classes are that or coarser).
pub(super) fn allocation(len: usize) -> usize {
    match len {
        0 => 0,
        1..=8 => 8,
        _ => len.next_multiple_of(16),
    }
}

#[cfg(test)]
pub(super) mod tests {
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
        let one = allocation("k0000".len()) + heap_size(&doc) + ENTRY_OVERHEAD;
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

    /// Shapes of documents and measure states: the bank's account, a wide
    /// record, nesting with arrays, a long text.
    pub(in crate::projection) const SHAPES: [&str; 4] = [
        r#"{"owner":"owner 123456","status":"open","balance":0,"opened_at":"2026-12-04T10:00:00.123456Z"}"#,
        r#"{"f00":1,"f01":2,"f02":"three","f03":4.5,"f04":true,"f05":null,"f06":"seven",
            "f07":8,"f08":9,"f09":"ten","f10":11,"f11":12,"f12":"thirteen","f13":14,
            "f14":15,"f15":16,"f16":"seventeen","f17":18,"f18":19,"f19":"twenty"}"#,
        r#"{"id":"a-1","tags":["x","y","z"],"address":{"street":"Main Street 1","city":"Berlin"},
            "amounts":[1,2,3,4,5,6,7,8,9,10],"count":{"n":3}}"#,
        r#"{"title":"a title","body":"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum."}"#,
    ];

    /// The bytes this thread holds allocated, as jemalloc counts them.
    pub(in crate::projection) fn allocated_here() -> i64 {
        use tikv_jemalloc_ctl::thread::{allocatedp, deallocatedp};
        let allocated = allocatedp::read().expect("jemalloc stats").get();
        let deallocated = deallocatedp::read().expect("jemalloc stats").get();
        allocated as i64 - deallocated as i64
    }

    /// Asserts that `counted` is within a quarter of `allocated`.
    pub(in crate::projection) fn assert_close(shape: &str, counted: usize, allocated: i64) {
        let ratio = counted as f64 / allocated as f64;
        assert!(
            (0.8..1.25).contains(&ratio),
            "counted {counted} bytes for {allocated} allocated ({ratio:.2}) with {shape}"
        );
    }

    #[test]
    fn the_bytes_counted_are_about_the_bytes_allocated() {
        for shape in SHAPES {
            let value: Json = serde_json::from_str(shape).expect("a JSON shape");
            let mut docs = WorkingSet::new(usize::MAX);
            let before = allocated_here();
            for i in 0..10_000 {
                docs.put_doc(format!("account-{i:06}"), Some(value.clone()));
            }
            assert_close(shape, docs.bytes(), allocated_here() - before);
            drop(docs);

            let mut groups = WorkingSet::new(usize::MAX);
            let before = allocated_here();
            for i in 0..10_000u32 {
                groups.put_group(i.to_be_bytes().repeat(4), value.clone());
            }
            assert_close(shape, groups.bytes(), allocated_here() - before);
        }
    }
}
