//! The search projection: keeps a tantivy index of a view's documents.
//!
//! A search projection reads the same source partitions as its view, but it
//! never reads past the view's committed positions: for every event of a
//! batch that the view handles, it indexes the view's current document of
//! that key (or deletes it when the view has none). Because the view's data
//! and positions are committed together, a document read after the view's
//! positions always includes every event below them, so no change is missed;
//! a document that is newer than the batch is simply indexed early and
//! indexed again when its later events come by.
//!
//! The live index takes those documents from its view's [`Feed`], where the
//! view's live target put them after its commit, and reads no further than
//! the feed's positions; a document the feed does not have is read from the
//! view store (module `feed` says why both are exact).
//!
//! Tantivy commits are costly (fsync, new segments), so the keys that changed
//! are collected and their documents handed to the index writer together,
//! once per key, right before a commit, with the positions in the commit
//! payload (DESIGN.md §2 guarantee 5), at most every
//! `[projections] search_commit_interval_ms`. Queries only ever see committed
//! positions ([`Target::visible_positions`]), so `consistent_with` waits for
//! the data to be searchable, not merely applied.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::engine::{BatchStats, Engine, EngineSettings, SourceRecord, Target};
use super::feed::Feed;
use crate::domain::{Domain, ProjectionKind, SearchDef};
use crate::store::views::Positions;
use crate::store::{SearchIndex, StoreError, ViewStore};

/// The engine of one search projection.
pub struct SearchEngine {
    domain: Arc<Domain>,
    store: ViewStore,
    /// The feed of the view this projection indexes.
    feed: Option<Arc<Feed>>,
    name: String,
    commit_interval: Duration,
    writer_bytes: usize,
    writer_threads: usize,
}

impl SearchEngine {
    pub fn new(
        domain: Arc<Domain>,
        store: ViewStore,
        feed: Option<Arc<Feed>>,
        name: &str,
        settings: &EngineSettings,
    ) -> Self {
        Self {
            domain,
            store,
            feed,
            name: name.to_owned(),
            commit_interval: settings.search_commit_interval,
            writer_bytes: settings.search_writer_bytes,
            writer_threads: settings.search_writer_threads,
        }
    }

    fn def(&self) -> Result<&SearchDef, StoreError> {
        match self.domain.projection(&self.name).map(|p| p.kind()) {
            Some(ProjectionKind::Search(def)) => Ok(def),
            _ => Err(StoreError::InvalidRequest(format!(
                "{:?} is not a search projection",
                self.name
            ))),
        }
    }

    fn open(&self, generation: u64, live: bool) -> Result<SearchTarget, StoreError> {
        let def = self.def()?;
        let dir = self.store.search_dir(&self.name, generation);
        if !live {
            // A rebuild starts from nothing, whatever an interrupted one left.
            SearchIndex::remove(&dir)?;
        }
        let index =
            SearchIndex::open_with(&dir, def.fields(), self.writer_bytes, self.writer_threads)?;
        let committed = index.positions()?;
        if live {
            self.store
                .publish_search_reader(&self.name, index.reader())?;
        }
        Ok(SearchTarget {
            domain: self.domain.clone(),
            store: self.store.clone(),
            // A rebuild reads the view store alone: what the feed holds is
            // the live index's to take.
            feed: if live { self.feed.clone() } else { None },
            name: self.name.clone(),
            view: def.view().to_owned(),
            generation,
            index,
            applied: committed.clone(),
            committed,
            dirty_since: None,
            commit_interval: self.commit_interval,
            pending: BTreeMap::new(),
            batch_keys: Vec::new(),
        })
    }
}

impl Engine for SearchEngine {
    fn open_live(&self) -> Result<Box<dyn Target>, StoreError> {
        let generation = self.store.search_generation(&self.name)?;
        Ok(Box::new(self.open(generation, true)?))
    }

    fn open_rebuild(&self) -> Result<Box<dyn Target>, StoreError> {
        let generation = self.store.search_generation(&self.name)? + 1;
        Ok(Box::new(self.open(generation, false)?))
    }
}

/// One generation of a search index, written by its worker thread only.
struct SearchTarget {
    domain: Arc<Domain>,
    store: ViewStore,
    feed: Option<Arc<Feed>>,
    name: String,
    view: String,
    generation: u64,
    index: SearchIndex,
    /// Positions of everything handed to the index writer.
    applied: Positions,
    /// Positions in the index's last commit: what searches see.
    committed: Positions,
    /// When the first change not yet committed was made.
    dirty_since: Option<Instant>,
    commit_interval: Duration,
    /// The keys whose view documents changed since the last commit: they
    /// reach the index writer together, once each, just before the commit.
    /// With the document taken from the feed (`None` inside: deleted), or
    /// `None`: read it from the view store then.
    pending: BTreeMap<String, Option<Option<Json>>>,
    /// The distinct keys of the batch being applied (kept for its buffer).
    batch_keys: Vec<String>,
}

impl SearchTarget {
    /// Indexes the view document of every pending key, then commits the
    /// index with the applied positions. A document not taken from the feed
    /// is read now, after the view's positions passed `applied` (the read
    /// limit), so each includes at least the events below them. The keys
    /// stay pending until the commit succeeds, so a retry indexes them again.
    fn commit(&mut self) -> Result<(), StoreError> {
        let mut generation = None;
        for (key, taken) in &self.pending {
            let read;
            let doc = match taken {
                Some(doc) => doc,
                None => {
                    let generation = match &generation {
                        Some(generation) => generation,
                        None => generation.insert(self.store.live(&self.view)?),
                    };
                    read = generation.doc(key)?;
                    &read
                }
            };
            self.index.upsert(key, doc.as_ref())?;
        }
        drop(generation);
        self.index.commit(&self.applied)?;
        // How many documents each commit carries is what batching buys: a
        // catch-up should show few commits, each with many documents.
        metrics::counter!("cqrsd_search_commits_total", "projection" => self.name.clone())
            .increment(1);
        metrics::counter!("cqrsd_search_documents_total", "projection" => self.name.clone())
            .increment(self.pending.len() as u64);
        self.pending.clear();
        self.committed = self.applied.clone();
        self.dirty_since = None;
        Ok(())
    }
}

impl Target for SearchTarget {
    fn positions(&self) -> Result<Positions, StoreError> {
        Ok(self.applied.clone())
    }

    fn quarantine_count(&self) -> Result<u64, StoreError> {
        // Events the view cannot apply are quarantined by the view; the index
        // only copies the view's documents, which cannot fail.
        Ok(0)
    }

    fn read_limit(&self) -> Result<Option<Positions>, StoreError> {
        let generation = self.store.live(&self.view)?;
        let published = self
            .feed
            .as_ref()
            .and_then(|feed| feed.positions(generation.number));
        match published {
            Some(positions) => Ok(Some(positions)),
            None => Ok(Some(generation.positions()?)),
        }
    }

    fn apply(
        &mut self,
        records: &[SourceRecord],
        positions: &Positions,
    ) -> Result<BatchStats, StoreError> {
        let view = match self.domain.projection(&self.view).map(|p| p.kind()) {
            Some(ProjectionKind::View(def)) => def,
            _ => {
                return Err(StoreError::InvalidRequest(format!(
                    "search projection {:?} indexes {:?}, which is not a view",
                    self.name, self.view
                )));
            }
        };
        let mut stats = BatchStats::default();
        let mut seen = HashSet::new();
        self.batch_keys.clear();
        for record in records {
            // A record that does not decode is quarantined by the view, which
            // has no document for it either: there is nothing to index.
            let Ok(events) = &record.events else {
                continue;
            };
            for event in events {
                if view.handles(&event.event_type) {
                    stats.events += 1;
                    // The key of the view's document; an event whose key
                    // cannot be computed is quarantined by the view and
                    // changed no document.
                    let Ok(key) = view.key(&event.as_input(), &event.aggregate_type) else {
                        continue;
                    };
                    // Once per batch: the feed has at most one document
                    // per key, the latest, which covers all of the batch.
                    if !seen.contains(key.as_ref()) {
                        seen.insert(key.clone());
                        self.batch_keys.push(key.into_owned());
                    }
                }
            }
        }
        // A map, so a key changed many times before a commit is indexed
        // once, with its newest document: one taken now replaces an older
        // one, and a key the feed lacks is read at the commit.
        let taken = match &self.feed {
            Some(feed) if !self.batch_keys.is_empty() => {
                let generation = self.store.live(&self.view)?.number;
                feed.take(&self.name, generation, &self.batch_keys)
            }
            _ => vec![None; self.batch_keys.len()],
        };
        for (key, doc) in self.batch_keys.drain(..).zip(taken) {
            self.pending.insert(key, doc);
        }
        self.applied
            .extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        self.dirty_since.get_or_insert_with(Instant::now);
        self.flush(false)?;
        Ok(stats)
    }

    fn visible_positions(&self) -> Option<Positions> {
        Some(self.committed.clone())
    }

    fn flush(&mut self, force: bool) -> Result<Option<Instant>, StoreError> {
        let Some(since) = self.dirty_since else {
            return Ok(None);
        };
        // The configuration bounds the interval, so this only saturates on a
        // clock near its end; then the changes are committed at once.
        let due = since.checked_add(self.commit_interval);
        let Some(due) = due.filter(|due| !force && Instant::now() < *due) else {
            self.commit()?;
            return Ok(None);
        };
        Ok(Some(due))
    }

    fn promote(mut self: Box<Self>) -> Result<(), StoreError> {
        self.commit()?;
        let old = self.store.search_generation(&self.name)?;
        let reader = self.index.reader();
        let SearchTarget {
            store,
            name,
            generation,
            index,
            ..
        } = *self;
        // The writer holds the index's lock: it must be gone before the live
        // target reopens this generation.
        drop(index);
        store.set_search_generation(&name, generation, reader)?;
        if old != generation {
            // Searches that started before the swap keep their mapped files.
            if let Err(error) = SearchIndex::remove(&store.search_dir(&name, old)) {
                tracing::warn!(projection = %name, %error, "cannot remove the replaced search index");
            }
        }
        Ok(())
    }
}
