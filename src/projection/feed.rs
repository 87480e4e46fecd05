//! The documents a view hands to the search projections over it.
//!
//! A search projection indexes its view's documents. Reading each one back
//! from the view store after the view committed it was the largest part of a
//! search worker's time with a million new aggregates (a point read through
//! fjall's memtables and tables, then the JSON parse). The view's live
//! generation already holds every document it committed, so it copies each
//! into a [`Feed`], and the search takes it from there.
//!
//! The invariant that keeps this exact: under the feed's lock, every document
//! it holds is the view's latest committed one for its key as of the feed's
//! positions, because the view publishes a commit's documents and its
//! positions together, after the commit succeeded. A search reads no further
//! than the feed's positions ([`Feed::positions`]), so a document taken from
//! the feed includes every event the search has seen of it. Where the feed
//! has no document (it was full, or the view's target was replaced), the
//! search reads the view store, as before, and gets at least as new a one.
//! When a view's live target goes away (an error, a rebuild's swap), the feed
//! forgets everything: a failed write may still have landed in the store, so
//! only the store knows what is committed then.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value as Json;

use super::cache::{allocation, heap_size};
use crate::domain::{Domain, ProjectionKind};
use crate::store::views::Positions;

/// Every view's feed that a search projection reads, by view name.
#[derive(Debug, Clone, Default)]
pub struct Feeds {
    by_view: Arc<BTreeMap<String, Arc<Feed>>>,
}

impl Feeds {
    /// A feed for every view with a search projection over it, holding at
    /// most about `budget` bytes of documents for each search projection.
    pub fn new(domain: &Domain, budget: usize) -> Self {
        let mut subscribers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for projection in domain.projections() {
            if let ProjectionKind::Search(def) = projection.kind() {
                subscribers
                    .entry(def.view().to_owned())
                    .or_default()
                    .push(projection.name().to_owned());
            }
        }
        let by_view = subscribers
            .into_iter()
            .map(|(view, searches)| (view, Arc::new(Feed::new(searches, budget))))
            .collect();
        Self {
            by_view: Arc::new(by_view),
        }
    }

    /// The feed of `view`, if some search projection reads it.
    pub(super) fn of(&self, view: &str) -> Option<Arc<Feed>> {
        self.by_view.get(view).cloned()
    }
}

/// One view's committed documents on their way to its search projections.
#[derive(Debug)]
pub(super) struct Feed {
    state: Mutex<State>,
    budget: usize,
}

#[derive(Debug, Default)]
struct State {
    /// The view generation whose live target publishes here; `None` while
    /// no live target is attached, when the feed holds nothing.
    generation: Option<u64>,
    /// The positions of the last commit published.
    positions: Positions,
    /// Per search projection, the documents it has not taken yet.
    searches: BTreeMap<String, Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// `None`: the view has no document of that key (it was deleted).
    docs: HashMap<String, Option<Json>>,
    bytes: usize,
}

impl Pending {
    fn clear(&mut self) {
        self.docs.clear();
        self.bytes = 0;
    }
}

fn size(key: &str, doc: &Option<Json>) -> usize {
    allocation(key.len()) + doc.as_ref().map_or(0, heap_size) + ENTRY_OVERHEAD
}

/// What a map entry costs beside its key's bytes and the document's
/// allocations: the key's and document's inline parts (56 bytes) in a hash
/// table kept between half and seven eighths full, and its control byte.
const ENTRY_OVERHEAD: usize = 88;

impl Feed {
    fn new(searches: Vec<String>, budget: usize) -> Self {
        let searches = searches
            .into_iter()
            .map(|name| (name, Pending::default()))
            .collect();
        Self {
            state: Mutex::new(State {
                searches,
                ..State::default()
            }),
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock can at most leave documents newer than the
        // positions (they are written first), which is still exact, so a
        // poisoned lock is used as it is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts publishing for the live target of `generation`, committed up
    /// to `positions`.
    pub(super) fn attach(&self, generation: u64, positions: Positions) {
        let mut state = self.lock();
        state.generation = Some(generation);
        state.positions = positions;
        state.searches.values_mut().for_each(Pending::clear);
    }

    /// Forgets everything: the live target of `generation` is gone. A newer
    /// target that attached already is left alone.
    pub(super) fn detach(&self, generation: u64) {
        let mut state = self.lock();
        if state.generation == Some(generation) {
            state.generation = None;
            state.searches.values_mut().for_each(Pending::clear);
        }
    }

    /// Hands over the documents a commit of `generation` stored, with the
    /// positions committed with them. A document whose key the feed holds
    /// replaces the older one; a new key is left out once a search's
    /// documents fill the budget (that search reads it from the store).
    pub(super) fn publish<'d>(
        &self,
        generation: u64,
        positions: &Positions,
        docs: impl Iterator<Item = (&'d String, &'d Option<Json>)> + Clone,
    ) {
        let mut state = self.lock();
        if state.generation != Some(generation) {
            return;
        }
        let budget = self.budget;
        for pending in state.searches.values_mut() {
            for (key, doc) in docs.clone() {
                let added = size(key, doc);
                if let Some(old) = pending.docs.get_mut(key.as_str()) {
                    let removed = size(key, old);
                    *old = doc.clone();
                    pending.bytes = pending.bytes + added - removed;
                } else if pending.bytes + added <= budget {
                    pending.docs.insert(key.clone(), doc.clone());
                    pending.bytes += added;
                }
            }
        }
        // A batch's positions name the partitions it read; the others stay.
        state
            .positions
            .extend(positions.iter().map(|(key, offset)| (key.clone(), *offset)));
    }

    /// The positions a search may read up to, if the live target of the view
    /// generation `generation` publishes here.
    pub(super) fn positions(&self, generation: u64) -> Option<Positions> {
        let state = self.lock();
        (state.generation == Some(generation)).then(|| state.positions.clone())
    }

    /// Takes search `search`'s documents of `keys` out of the feed, if the
    /// feed publishes generation `generation`: for each key, `Some(doc)`
    /// when the feed has it (`doc` is `None` for a deleted document), `None`
    /// when the search must read the view store.
    pub(super) fn take(
        &self,
        search: &str,
        generation: u64,
        keys: &[String],
    ) -> Vec<Option<Option<Json>>> {
        let mut state = self.lock();
        let attached = state.generation == Some(generation);
        match state.searches.get_mut(search) {
            Some(pending) if attached => keys
                .iter()
                .map(|key| {
                    let doc = pending.docs.remove(key.as_str())?;
                    pending.bytes -= size(key, &doc);
                    Some(doc)
                })
                .collect(),
            _ => vec![None; keys.len()],
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn feed(budget: usize) -> Feed {
        Feed::new(vec!["search".to_owned()], budget)
    }

    fn positions(offset: u64) -> Positions {
        [(("t".to_owned(), 0), offset)].into_iter().collect()
    }

    fn docs(entries: &[(&str, Option<Json>)]) -> Vec<(String, Option<Json>)> {
        entries
            .iter()
            .map(|(key, doc)| ((*key).to_owned(), doc.clone()))
            .collect()
    }

    fn publish(feed: &Feed, generation: u64, offset: u64, docs: &[(String, Option<Json>)]) {
        feed.publish(
            generation,
            &positions(offset),
            docs.iter().map(|(key, doc)| (key, doc)),
        );
    }

    fn keys(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|key| (*key).to_owned()).collect()
    }

    #[test]
    fn a_search_takes_the_latest_committed_document_once() {
        let feed = feed(1 << 20);
        assert_eq!(feed.positions(1), None);
        feed.attach(1, positions(0));
        publish(&feed, 1, 1, &docs(&[("a", Some(json!({"n": 1})))]));
        publish(
            &feed,
            1,
            2,
            &docs(&[("a", Some(json!({"n": 2}))), ("b", None)]),
        );
        assert_eq!(feed.positions(1), Some(positions(2)));
        let taken = feed.take("search", 1, &keys(&["a", "b", "c"]));
        assert_eq!(taken, vec![Some(Some(json!({"n": 2}))), Some(None), None]);
        // Taken: the next batch that sees "a" reads the store.
        assert_eq!(feed.take("search", 1, &keys(&["a"])), vec![None]);
        assert_eq!(feed.lock().searches["search"].bytes, 0);
    }

    #[test]
    fn nothing_is_held_for_another_generation_or_after_a_detach() {
        let feed = feed(1 << 20);
        // A target that is not (or no longer) attached publishes nothing.
        publish(&feed, 1, 1, &docs(&[("a", Some(json!(1)))]));
        assert_eq!(feed.take("search", 1, &keys(&["a"])), vec![None]);
        feed.attach(1, positions(0));
        publish(&feed, 1, 1, &docs(&[("a", Some(json!(1)))]));
        // A search reading another generation of the view takes nothing.
        assert_eq!(feed.take("search", 2, &keys(&["a"])), vec![None]);
        assert_eq!(feed.positions(2), None);
        // A detach of an older generation leaves the newer one alone.
        feed.detach(0);
        assert_eq!(feed.positions(1), Some(positions(1)));
        feed.detach(1);
        assert_eq!(feed.positions(1), None);
        assert_eq!(feed.take("search", 1, &keys(&["a"])), vec![None]);
    }

    /// A full feed leaves new keys to the store, but never keeps an old
    /// document of a key that a later commit changed.
    #[test]
    fn a_full_feed_replaces_what_it_holds_and_leaves_out_the_rest() {
        let one = size("a", &Some(json!({"n": 1})));
        let feed = feed(one);
        feed.attach(1, positions(0));
        publish(
            &feed,
            1,
            1,
            &docs(&[("a", Some(json!({"n": 1}))), ("b", Some(json!({"n": 1})))]),
        );
        publish(&feed, 1, 2, &docs(&[("a", Some(json!({"n": 3})))]));
        let taken = feed.take("search", 1, &keys(&["a", "b"]));
        assert_eq!(taken, vec![Some(Some(json!({"n": 3}))), None]);
    }

    /// The feed's budget counts what its documents really take.
    #[test]
    fn the_bytes_counted_are_about_the_bytes_allocated() {
        use crate::projection::cache::tests::{SHAPES, allocated_here, assert_close};
        for shape in SHAPES {
            let value: Json = serde_json::from_str(shape).expect("a JSON shape");
            let committed: Vec<(String, Option<Json>)> = (0..10_000)
                .map(|i| (format!("account-{i:06}"), Some(value.clone())))
                .collect();
            let feed = feed(usize::MAX);
            feed.attach(1, positions(0));
            let before = allocated_here();
            publish(&feed, 1, 1, &committed);
            let counted = feed.lock().searches["search"].bytes;
            assert_close(shape, counted, allocated_here() - before);
        }
    }
}
