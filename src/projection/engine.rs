//! The seam between the projection pool and a read model's storage.
//!
//! The pool reads the log, decodes records and hands them to a [`Target`]
//! (one generation of one projection's storage), which applies them and
//! commits its data together with the new positions. Views and aggregations
//! are stored in the view store ([`StoreEngine`]); search indexes in tantivy
//! ([`super::search::SearchEngine`], positions in the commit payload).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::domain::{Domain, ProjectionKind};
use crate::log::Event;
use crate::store::views::{ChangeSet, Generation, Positions, Quarantined, encode_value};
use crate::store::{StoreError, ViewStore};

use super::cache::WorkingSet;
use super::feed::{Feed, Feeds};
use super::measures;

/// One record read from a source partition, decoded or not.
#[derive(Debug)]
pub struct SourceRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    /// The record's events, or why the record does not decode.
    pub events: Result<Vec<Event>, String>,
}

/// What applying one batch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    /// Events of the projection's sources seen (applied or quarantined).
    pub events: u64,
    pub quarantined: u64,
}

/// A projection's storage: opens the live generation, or a new one to rebuild into.
pub trait Engine: Send {
    fn open_live(&self) -> Result<Box<dyn Target>, StoreError>;
    fn open_rebuild(&self) -> Result<Box<dyn Target>, StoreError>;
}

/// One generation of a projection's storage, written by one thread only.
pub trait Target: Send {
    /// The next offset of each partition already applied.
    fn positions(&self) -> Result<Positions, StoreError>;
    fn quarantine_count(&self) -> Result<u64, StoreError>;
    /// Applies `records` and commits the result with `positions` atomically.
    /// Events that cannot be applied are quarantined in the same commit.
    /// Some targets buffer what `apply` did and commit it later, in
    /// [`Target::flush`]; positions are then committed with the data.
    fn apply(
        &mut self,
        records: &[SourceRecord],
        positions: &Positions,
    ) -> Result<BatchStats, StoreError>;
    /// The next offset, per partition, that must not be read yet; `None` lets
    /// the pool read up to the end of the log. A target derived from another
    /// projection's data reads no further than that projection has committed.
    fn read_limit(&self) -> Result<Option<Positions>, StoreError> {
        Ok(None)
    }
    /// The positions whose effects queries see, when that is less than what
    /// was applied (buffered targets); `None` means everything applied.
    fn visible_positions(&self) -> Option<Positions> {
        None
    }
    /// Commits buffered changes if they are due, or at once with `force`.
    /// Returns when the changes still buffered are due.
    fn flush(&mut self, _force: bool) -> Result<Option<Instant>, StoreError> {
        Ok(None)
    }
    /// Moves the stored positions forward without applying what lies
    /// between: only policies allow it (an operator's explicit skip).
    fn move_positions(&mut self, _positions: &Positions) -> Result<(), StoreError> {
        Err(StoreError::InvalidRequest(
            "only a policy's position can be moved".to_owned(),
        ))
    }
    /// Makes this (rebuilt) generation the live one and drops the old one.
    fn promote(self: Box<Self>) -> Result<(), StoreError>;
}

/// How a projection's storage behaves; the same for every projection of a pool.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// How often, at most, a search index commits.
    pub search_commit_interval: Duration,
    /// The bytes of documents and groups one view or aggregation keeps in
    /// memory in front of the view store (its working set).
    pub cache_bytes: usize,
    /// The memory a search index's writer buffers before it writes a segment.
    pub search_writer_bytes: usize,
    /// The indexing threads of a search index's writer.
    pub search_writer_threads: usize,
}

/// The engine of a projection, or `None` when there is no such projection.
/// A view's live target publishes its commits to `feeds` and a search
/// projection's live target takes its view's documents from there.
pub fn engine_for(
    domain: &Arc<Domain>,
    store: &ViewStore,
    feeds: &Feeds,
    name: &str,
    settings: &EngineSettings,
) -> Option<Box<dyn Engine>> {
    match domain.projection(name)?.kind() {
        ProjectionKind::View(_) | ProjectionKind::Aggregation(_) => Some(Box::new(StoreEngine {
            domain: domain.clone(),
            store: store.clone(),
            feed: feeds.of(name),
            name: name.to_owned(),
            cache_bytes: settings.cache_bytes,
        })),
        ProjectionKind::Search(def) => Some(Box::new(super::search::SearchEngine::new(
            domain.clone(),
            store.clone(),
            feeds.of(def.view()),
            name,
            settings,
        ))),
    }
}

/// Views and aggregations in the view store.
pub struct StoreEngine {
    domain: Arc<Domain>,
    store: ViewStore,
    /// Where the live target of a view with search projections publishes.
    feed: Option<Arc<Feed>>,
    name: String,
    cache_bytes: usize,
}

impl Engine for StoreEngine {
    fn open_live(&self) -> Result<Box<dyn Target>, StoreError> {
        let generation = self.store.live(&self.name)?;
        if let Some(feed) = &self.feed {
            feed.attach(generation.number, generation.positions()?);
        }
        Ok(Box::new(StoreTarget {
            domain: self.domain.clone(),
            store: self.store.clone(),
            name: self.name.clone(),
            feed: self.feed.clone(),
            generation,
            cache: WorkingSet::new(self.cache_bytes),
        }))
    }

    fn open_rebuild(&self) -> Result<Box<dyn Target>, StoreError> {
        // A rebuild's documents are not what the search projections index
        // (they index the live generation), so it publishes nothing.
        Ok(Box::new(StoreTarget {
            domain: self.domain.clone(),
            store: self.store.clone(),
            name: self.name.clone(),
            feed: None,
            generation: self.store.new_generation(&self.name)?,
            cache: WorkingSet::new(self.cache_bytes),
        }))
    }
}

struct StoreTarget {
    domain: Arc<Domain>,
    store: ViewStore,
    name: String,
    /// The feed this (live) target publishes its commits to.
    feed: Option<Arc<Feed>>,
    generation: Generation,
    /// The committed documents and groups this generation touched lately.
    cache: WorkingSet,
}

impl Drop for StoreTarget {
    fn drop(&mut self) {
        // A target is dropped after a failed write (which may still have
        // landed) and before a swap: either way, only the store knows now.
        if let Some(feed) = &self.feed {
            feed.detach(self.generation.number);
        }
    }
}

fn event_json(event: &Event) -> Option<serde_json::Value> {
    serde_json::to_value(event).ok()
}

/// The quarantine entry of event `index` of `record` for projection (or
/// policy) `name`, logged as it is made.
pub(super) fn quarantined(
    name: &str,
    record: &SourceRecord,
    index: usize,
    event: Option<&Event>,
    reason: String,
) -> Quarantined {
    tracing::warn!(projection = %name, topic = %record.topic, partition = record.partition,
        offset = record.offset, index, %reason, "event quarantined");
    Quarantined {
        topic: record.topic.clone(),
        partition: record.partition,
        offset: record.offset,
        index: u32::try_from(index).unwrap_or(u32::MAX),
        event: event.and_then(event_json),
        reason,
    }
}

impl Target for StoreTarget {
    fn positions(&self) -> Result<Positions, StoreError> {
        self.generation.positions()
    }

    fn quarantine_count(&self) -> Result<u64, StoreError> {
        self.generation.quarantine_count()
    }

    fn apply(
        &mut self,
        records: &[SourceRecord],
        positions: &Positions,
    ) -> Result<BatchStats, StoreError> {
        let projection = self
            .domain
            .projection(&self.name)
            .ok_or_else(|| StoreError::InvalidRequest(format!("no projection {}", self.name)))?;
        // A view's documents carry index entries; the indexed fields are the
        // same for every document of the batch.
        let mut changes = ChangeSet {
            indexes: match projection.kind() {
                ProjectionKind::View(def) => def.indexes().to_vec(),
                _ => Vec::new(),
            },
            ..ChangeSet::default()
        };
        let first_event_finds_no_document = projection.first_event_finds_no_document();
        let mut stats = BatchStats::default();
        let quarantine = |changes: &mut ChangeSet,
                          record: &SourceRecord,
                          index: usize,
                          event: Option<&Event>,
                          reason: String| {
            changes
                .quarantined
                .push(quarantined(&self.name, record, index, event, reason));
        };
        for record in records {
            let events = match &record.events {
                Ok(events) => events,
                Err(reason) => {
                    stats.events += 1;
                    quarantine(&mut changes, record, 0, None, reason.clone());
                    continue;
                }
            };
            for (index, event) in events.iter().enumerate() {
                match projection.kind() {
                    ProjectionKind::View(def) => {
                        if !def.handles(&event.event_type) {
                            continue;
                        }
                        stats.events += 1;
                        let input = event.as_input();
                        // The document's key: the aggregate id, or what the
                        // view's key expression says; one that cannot be
                        // computed makes the event a poison event.
                        let key = match def.key(&input, &event.aggregate_type) {
                            Ok(key) => key,
                            Err(error) => {
                                quarantine(
                                    &mut changes,
                                    record,
                                    index,
                                    Some(event),
                                    error.to_string(),
                                );
                                continue;
                            }
                        };
                        // A document seen earlier in the batch is read where it
                        // is; one seen first is loaded once and recorded as it
                        // was (the "before" that its old index entries follow).
                        // An aggregate's first event needs no read where the
                        // domain says its document cannot exist yet: with a
                        // million new aggregates that read (memtables, then every
                        // table's bloom filter) was a tenth of the view's time.
                        if !changes.docs.contains_key(key.as_ref()) {
                            let stored = if first_event_finds_no_document && event.version == 1 {
                                None
                            } else {
                                match self.cache.take_doc(&key) {
                                    Some(cached) => cached,
                                    None => self.generation.doc(&key)?,
                                }
                            };
                            changes
                                .docs
                                .insert(key.clone().into_owned(), (stored.clone(), stored));
                        }
                        // The handler changes the batch's copy of the document
                        // where it is; the copy from before the batch stays.
                        let applied = match changes.docs.get_mut(key.as_ref()) {
                            Some((_, after)) => {
                                def.apply_in_place(after, &input, &event.aggregate_type)
                            }
                            None => Ok(false),
                        };
                        if let Err(error) = applied {
                            quarantine(&mut changes, record, index, Some(event), error.to_string());
                        }
                    }
                    ProjectionKind::Aggregation(def) => {
                        if !def.handles(&event.event_type) {
                            continue;
                        }
                        stats.events += 1;
                        let (group, inputs) =
                            match def.evaluate(&event.as_input(), &event.aggregate_type) {
                                Ok(evaluated) => evaluated,
                                Err(error) => {
                                    quarantine(
                                        &mut changes,
                                        record,
                                        index,
                                        Some(event),
                                        error.to_string(),
                                    );
                                    continue;
                                }
                            };
                        let mut key = Vec::new();
                        for field in def.group_fields() {
                            encode_value(group.get(field), &mut key);
                        }
                        let mut state = match changes.groups.get(&key) {
                            Some(state) => state.clone(),
                            None => match self.cache.take_group(&key) {
                                Some(state) => state,
                                None => match self.generation.group(&key)? {
                                    Some(state) => state,
                                    None => measures::new_group(def, group),
                                },
                            },
                        };
                        if let Err(reason) = measures::update(&mut state, &inputs) {
                            quarantine(&mut changes, record, index, Some(event), reason);
                            continue;
                        }
                        changes.groups.insert(key, state);
                    }
                    ProjectionKind::Search(_) => {}
                }
            }
        }
        stats.quarantined = changes.quarantined.len() as u64;
        changes.positions = positions.clone();
        if let Err(error) = self.generation.commit(&changes) {
            // The write may still land (see `Drop`): the feed forgets now,
            // before a search could take a document older than the store's.
            if let Some(feed) = &self.feed {
                feed.detach(self.generation.number);
            }
            return Err(error);
        }
        // Committed: the batch's values are what the view store holds now. (Had the
        // commit failed, they would be dropped here with `changes`, and the
        // cache would not know them.)
        if let Some(feed) = &self.feed {
            let docs = changes.docs.iter().map(|(id, (_, after))| (id, after));
            feed.publish(self.generation.number, &changes.positions, docs);
        }
        for (id, (_, after)) in changes.docs {
            self.cache.put_doc(id, after);
        }
        for (key, state) in changes.groups {
            self.cache.put_group(key, state);
        }
        Ok(stats)
    }

    fn promote(self: Box<Self>) -> Result<(), StoreError> {
        self.store.swap(&self.name, &self.generation)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value as Json, json};

    use super::*;
    use crate::domain::EXAMPLE_DOMAIN;
    use crate::store::views::GROUP;

    fn event(id: &str, event_type: &str, data: Json, version: u64) -> Event {
        crate::bench::target::bench_event(id, version, event_type, 0, data)
    }

    fn apply(target: &mut dyn Target, offset: u64, event: Event) -> BatchStats {
        let record = SourceRecord {
            topic: "t".to_owned(),
            partition: 0,
            offset,
            events: Ok(vec![event]),
        };
        let positions = [(("t".to_owned(), 0), offset + 1)].into_iter().collect();
        target.apply(&[record], &positions).unwrap()
    }

    /// Writes `after` over an `accounts` document behind the projections'
    /// backs (which nothing but these tests does); `before` is what the
    /// store holds, for its index entries.
    fn overwrite(generation: &Generation, key: &str, before: Option<Json>, after: Option<Json>) {
        generation
            .commit(&ChangeSet {
                docs: [(key.to_owned(), (before, after))].into_iter().collect(),
                indexes: vec!["owner".to_owned(), "status".to_owned()],
                ..ChangeSet::default()
            })
            .unwrap();
    }

    fn target(store: &ViewStore, name: &str, cache_bytes: usize) -> Box<dyn Target> {
        target_of(EXAMPLE_DOMAIN, store, name, cache_bytes)
    }

    fn target_of(
        domain: &str,
        store: &ViewStore,
        name: &str,
        cache_bytes: usize,
    ) -> Box<dyn Target> {
        let domain = Arc::new(Domain::from_toml_str(domain).unwrap());
        let feeds = Feeds::new(&domain, 1 << 20);
        live_targets(&domain, store, &feeds, &[name], cache_bytes)
            .pop()
            .unwrap()
    }

    /// The live targets of `names`, publishing to and reading from `feeds`.
    fn live_targets(
        domain: &Arc<Domain>,
        store: &ViewStore,
        feeds: &Feeds,
        names: &[&str],
        cache_bytes: usize,
    ) -> Vec<Box<dyn Target>> {
        let settings = EngineSettings {
            search_commit_interval: Duration::from_secs(1),
            cache_bytes,
            search_writer_bytes: 64 << 20,
            search_writer_threads: 1,
        };
        names
            .iter()
            .map(|name| {
                engine_for(domain, store, feeds, name, &settings)
                    .unwrap()
                    .open_live()
                    .unwrap()
            })
            .collect()
    }

    /// A search indexes the document its view committed, handed over by the
    /// feed, and reads the view store only for what the feed does not hold:
    /// a document changed in the store behind both projections' backs
    /// (which nothing but this test does) is not what gets indexed while
    /// the feed has the committed one, and is what gets indexed without a
    /// feed.
    #[test]
    fn a_search_indexes_the_documents_its_view_handed_over() {
        let domain = Arc::new(Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap());
        for with_feed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let store = ViewStore::open(dir.path()).unwrap();
            let feeds = if with_feed {
                Feeds::new(&domain, 1 << 20)
            } else {
                Feeds::default()
            };
            let names = ["accounts", "account_search"];
            let mut targets = live_targets(&domain, &store, &feeds, &names, 1 << 20);
            let opened = event("acc-1", "AccountOpened", json!({"owner": "Ada"}), 1);
            apply(targets[0].as_mut(), 0, opened.clone());
            let generation = store.live("accounts").unwrap();
            let planted = json!({"owner": "Zed", "balance": 0, "status": "open"});
            overwrite(&generation, "acc-1", None, Some(planted));
            let search = targets[1].as_mut();
            assert_eq!(
                search.read_limit().unwrap(),
                Some([(("t".to_owned(), 0), 1)].into_iter().collect())
            );
            apply(search, 0, opened);
            search.flush(true).unwrap();
            let reader = store.search_reader("account_search").unwrap();
            let hits = |query: &str| {
                let page = reader.search(query, &[], 10, None).unwrap();
                page.hits.into_iter().map(|hit| hit.key).collect::<Vec<_>>()
            };
            let (indexed, not_indexed) = if with_feed {
                ("ada", "zed")
            } else {
                ("zed", "ada")
            };
            assert_eq!(hits(indexed), vec!["acc-1".to_owned()], "{with_feed}");
            assert_eq!(hits(not_indexed), Vec::<String>::new(), "{with_feed}");
        }
    }

    /// The working set is what a batch reads: a document changed in the view store
    /// behind the projection's back (which nothing but this test does) is not
    /// read again while it is cached, and is read again without a cache.
    #[test]
    fn a_batch_reads_the_store_only_for_documents_not_in_its_working_set() {
        for cache_bytes in [1 << 20, 0] {
            let dir = tempfile::tempdir().unwrap();
            let store = ViewStore::open(dir.path()).unwrap();
            let mut accounts = target(&store, "accounts", cache_bytes);
            let opened = event("acc-1", "AccountOpened", json!({"owner": "Ada"}), 1);
            apply(accounts.as_mut(), 0, opened);
            let generation = store.live("accounts").unwrap();
            let doc = generation.doc("acc-1").unwrap();
            assert!(doc.is_some());
            overwrite(&generation, "acc-1", doc, None);
            let deposit = event("acc-1", "MoneyDeposited", json!({"amount": 25}), 2);
            let stats = apply(accounts.as_mut(), 1, deposit);
            let after = generation.doc("acc-1").unwrap();
            if cache_bytes > 0 {
                // Applied to the cached document, and committed.
                assert_eq!(stats.quarantined, 0);
                let after = after.unwrap();
                assert_eq!(
                    (&after["owner"], &after["balance"]),
                    (&json!("Ada"), &json!(25))
                );
            } else {
                // Read from the store: there is no document, so no balance to add to.
                assert_eq!(stats.quarantined, 1);
                assert_eq!(after, None);
            }
            assert_eq!(
                generation.positions().unwrap(),
                [(("t".to_owned(), 0), 2)].into_iter().collect()
            );
        }
    }

    /// An account's first event finds no document, so the batch does not
    /// look: a document planted under a new account's id behind the
    /// projection's back (which nothing but this test does) is neither read
    /// from the cache nor from the store, and the new document replaces it.
    #[test]
    fn an_aggregates_first_event_reads_no_document_in_a_view_of_its_own() {
        for cache_bytes in [1 << 20, 0] {
            let dir = tempfile::tempdir().unwrap();
            let store = ViewStore::open(dir.path()).unwrap();
            let mut accounts = target(&store, "accounts", cache_bytes);
            // The planted document, cached too: an earlier event of the
            // batch stream (not the first of its aggregate) loads it.
            let generation = store.live("accounts").unwrap();
            let planted = json!({"owner": "Zed", "planted": true, "balance": 7});
            overwrite(&generation, "acc-9", None, Some(planted));
            let deposit = event("acc-9", "MoneyDeposited", json!({"amount": 1}), 2);
            apply(accounts.as_mut(), 0, deposit);
            let opened = event("acc-9", "AccountOpened", json!({"owner": "Ada"}), 1);
            apply(accounts.as_mut(), 1, opened);
            let doc = generation.doc("acc-9").unwrap().unwrap();
            assert_eq!(doc["owner"], json!("Ada"));
            assert_eq!(doc["balance"], json!(0));
            assert_eq!(doc.get("planted"), None, "{doc}");
        }
    }

    /// Where documents are keyed by something else than the aggregate id,
    /// a first event may find another aggregate's document and must read it.
    #[test]
    fn a_first_event_reads_the_document_of_a_keyed_view() {
        const SHOP: &str = r#"
[aggregates.order]
state = { customer = "" }
[aggregates.order.commands.place]
emit = [ { event = "OrderPlaced", data = { customer = "command.customer" } } ]
[aggregates.order.events.OrderPlaced]
set = { customer = "event.customer" }

[projections.customer_orders]
kind = "view"
source = ["order"]
key = "event.customer"
[projections.customer_orders.on.OrderPlaced]
set = { orders = "(has(doc.orders) ? doc.orders : 0) + 1" }
"#;
        for cache_bytes in [1 << 20, 0] {
            let dir = tempfile::tempdir().unwrap();
            let store = ViewStore::open(dir.path()).unwrap();
            let mut orders = target_of(SHOP, &store, "customer_orders", cache_bytes);
            for (offset, order) in ["o-1", "o-2"].into_iter().enumerate() {
                let mut placed = event(order, "OrderPlaced", json!({"customer": "c-1"}), 1);
                placed.aggregate_type = "order".to_owned();
                let stats = apply(orders.as_mut(), offset as u64, placed);
                assert_eq!(stats.quarantined, 0);
            }
            let doc = store.live("customer_orders").unwrap().doc("c-1").unwrap();
            assert_eq!(doc.unwrap()["orders"], json!(2));
        }
    }

    /// The same for aggregation groups.
    #[test]
    fn a_batch_reads_the_store_only_for_groups_not_in_its_working_set() {
        for cache_bytes in [1 << 20, 0] {
            let dir = tempfile::tempdir().unwrap();
            let store = ViewStore::open(dir.path()).unwrap();
            let mut flows = target(&store, "daily_flows", cache_bytes);
            let deposit = || event("acc-1", "MoneyDeposited", json!({"amount": 25}), 2);
            apply(flows.as_mut(), 0, deposit());
            let generation = store.live("daily_flows").unwrap();
            let (key, _) = generation
                .scan(&[GROUP], None, false)
                .next()
                .unwrap()
                .unwrap();
            let key = key[1..].to_vec();
            let stored = generation.group(&key).unwrap().unwrap();
            // Behind the projection's back, the group is set to other states.
            let mut other = stored.clone();
            other["measures"][0]["count"] = json!(100);
            generation
                .commit(&ChangeSet {
                    groups: [(key.clone(), other)].into_iter().collect(),
                    ..ChangeSet::default()
                })
                .unwrap();
            apply(flows.as_mut(), 1, deposit());
            let count = generation.group(&key).unwrap().unwrap()["measures"][0]["count"].clone();
            assert_eq!(
                count,
                json!(if cache_bytes > 0 { 2 } else { 101 }),
                "{stored}"
            );
        }
    }
}
