//! The seam between the projection pool and a read model's storage.
//!
//! The pool reads the log, decodes records and hands them to a [`Target`]
//! (one generation of one projection's storage), which applies them and
//! commits its data together with the new positions. Views and aggregations
//! are stored in sled ([`SledEngine`]); search indexes in tantivy
//! ([`super::search::SearchEngine`], positions in the commit payload).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::domain::{Domain, ProjectionKind, ViewChange};
use crate::log::Event;
use crate::store::views::{ChangeSet, Generation, Positions, Quarantined, encode_value};
use crate::store::{StoreError, ViewStore};

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
    /// Makes this (rebuilt) generation the live one and drops the old one.
    fn promote(self: Box<Self>) -> Result<(), StoreError>;
}

/// The engine of a projection, or `None` when there is no such projection.
/// Search indexes commit at most every `search_commit_interval`.
pub fn engine_for(
    domain: &Arc<Domain>,
    store: &ViewStore,
    name: &str,
    search_commit_interval: Duration,
) -> Option<Box<dyn Engine>> {
    match domain.projection(name)?.kind() {
        ProjectionKind::View(_) | ProjectionKind::Aggregation(_) => Some(Box::new(SledEngine {
            domain: domain.clone(),
            store: store.clone(),
            name: name.to_owned(),
        })),
        ProjectionKind::Search(_) => Some(Box::new(super::search::SearchEngine::new(
            domain.clone(),
            store.clone(),
            name,
            search_commit_interval,
        ))),
    }
}

/// Views and aggregations in the sled view store.
pub struct SledEngine {
    domain: Arc<Domain>,
    store: ViewStore,
    name: String,
}

impl Engine for SledEngine {
    fn open_live(&self) -> Result<Box<dyn Target>, StoreError> {
        Ok(Box::new(SledTarget {
            domain: self.domain.clone(),
            store: self.store.clone(),
            name: self.name.clone(),
            generation: self.store.live(&self.name)?,
        }))
    }

    fn open_rebuild(&self) -> Result<Box<dyn Target>, StoreError> {
        Ok(Box::new(SledTarget {
            domain: self.domain.clone(),
            store: self.store.clone(),
            name: self.name.clone(),
            generation: self.store.new_generation(&self.name)?,
        }))
    }
}

struct SledTarget {
    domain: Arc<Domain>,
    store: ViewStore,
    name: String,
    generation: Generation,
}

fn event_json(event: &Event) -> Option<serde_json::Value> {
    serde_json::to_value(event).ok()
}

impl Target for SledTarget {
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
        let mut stats = BatchStats::default();
        let quarantine = |changes: &mut ChangeSet,
                          record: &SourceRecord,
                          index: usize,
                          event: Option<&Event>,
                          reason: String| {
            tracing::warn!(projection = %self.name, topic = %record.topic, partition = record.partition,
                offset = record.offset, index, %reason, "event quarantined");
            changes.quarantined.push(Quarantined {
                topic: record.topic.clone(),
                partition: record.partition,
                offset: record.offset,
                index: u32::try_from(index).unwrap_or(u32::MAX),
                event: event.and_then(event_json),
                reason,
            });
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
                        // A document seen earlier in the batch is read where it
                        // is; one seen first is loaded once and recorded as it
                        // was (the "before" that its old index entries follow).
                        if !changes.docs.contains_key(&event.aggregate_id) {
                            let stored = self.generation.doc(&event.aggregate_id)?;
                            changes
                                .docs
                                .insert(event.aggregate_id.clone(), (stored.clone(), stored));
                        }
                        let current = changes
                            .docs
                            .get(&event.aggregate_id)
                            .and_then(|(_, after)| after.as_ref());
                        let change =
                            match def.apply(current, &event.as_input(), &event.aggregate_type) {
                                Ok(change) => change,
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
                        let after = match change {
                            ViewChange::Put(doc) => Some(doc),
                            ViewChange::Delete => None,
                            ViewChange::Unchanged => continue,
                        };
                        if let Some(entry) = changes.docs.get_mut(&event.aggregate_id) {
                            entry.1 = after;
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
                            None => match self.generation.group(&key)? {
                                Some(state) => state,
                                None => measures::new_group(def, group),
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
        self.generation.commit(&changes)?;
        Ok(stats)
    }

    fn promote(self: Box<Self>) -> Result<(), StoreError> {
        let SledTarget {
            store,
            name,
            generation,
            ..
        } = *self;
        store.swap(&name, &generation)
    }
}
