//! Queries over the read models: one document, filtered and ordered pages of
//! a view (through its secondary indexes only), aggregation rows, and the
//! read-your-writes wait on positions.

use std::time::Duration;

use serde_json::Value as Json;

use super::{ProjectionHandle, ReadModels, measures};
use crate::domain::ProjectionKind;
use crate::log::Position;
use crate::store::StoreError;
use crate::store::views::{DOC, encode_value, encoded_len, index_prefix};

/// The default and the largest page size.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 1000;
/// Index entries one page may examine before it returns what it has with a
/// cursor, so a selective filter cannot make one request scan a whole view.
const MAX_EXAMINED: usize = 10_000;
const CURSOR_VERSION: u8 = 1;

/// Why a query failed, grouped by what the client does about it.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no view named {0:?}")]
    UnknownView(String),
    #[error("no aggregation named {0:?}")]
    UnknownAggregation(String),
    #[error("no projection named {0:?}")]
    UnknownProjection(String),
    #[error("no search projection named {0:?}")]
    UnknownSearch(String),
    #[error("view {view:?} has no document with key {key:?}")]
    NoDocument { view: String, key: String },
    #[error(
        "field {field:?} is not indexed in view {view:?}; filters and ordering use indexed fields only: {}",
        indexed.join(", ")
    )]
    NotIndexed {
        view: String,
        field: String,
        indexed: Vec<String>,
    },
    #[error("{0}")]
    BadParameter(String),
    #[error("the read models did not reach position {position} within {timeout_ms} ms")]
    NotConsistent {
        position: String,
        timeout_ms: u64,
        /// (projection, next offset, lag) for each projection that is behind.
        lag: Vec<(String, u64, u64)>,
    },
    #[error("a rebuild of projection {0:?} is already running")]
    RebuildRunning(String),
    #[error("projection {0:?} cannot be rebuilt by the projection pool")]
    NotRebuildable(String),
    #[error(
        "{0:?} is a policy: a rebuild would read its sources from the start and send every command again; move its position forward instead (POST /admin/projections/{0}/position)"
    )]
    PolicyNotRebuildable(String),
    #[error(
        "{0:?} is not a policy: only a policy's position can be moved (a projection would miss the events it skips)"
    )]
    NotAPolicy(String),
    #[error("the read models are unavailable: {0}")]
    Unavailable(String),
}

impl From<StoreError> for QueryError {
    fn from(error: StoreError) -> Self {
        QueryError::Unavailable(error.to_string())
    }
}

/// Sort direction of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortOrder {
    Ascending,
    Descending,
}

/// A list query on a view.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    /// Field → value, all of which must match.
    pub filters: Vec<(String, Json)>,
    pub order: Option<(String, SortOrder)>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub items: Vec<(String, Json)>,
    pub next_cursor: Option<String>,
}

fn encoded(value: Option<&Json>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_value(value, &mut out);
    out
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

impl ReadModels {
    fn view_def(&self, view: &str) -> Result<&crate::domain::ViewDef, QueryError> {
        match self.domain.projection(view).map(|p| p.kind()) {
            Some(ProjectionKind::View(def)) if self.projections.contains_key(view) => Ok(def),
            _ => Err(QueryError::UnknownView(view.to_owned())),
        }
    }

    /// Checks that a view exists without touching disk.
    pub fn check_view(&self, view: &str) -> Result<(), QueryError> {
        self.view_def(view).map(|_| ())
    }

    /// Checks that an aggregation exists without touching disk.
    pub fn check_aggregation(&self, name: &str) -> Result<&[String], QueryError> {
        match self.domain.projection(name).map(|p| p.kind()) {
            Some(ProjectionKind::Aggregation(def)) if self.projections.contains_key(name) => {
                Ok(def.group_fields())
            }
            _ => Err(QueryError::UnknownAggregation(name.to_owned())),
        }
    }

    /// The reader of a search projection's live index; never blocks on disk.
    pub fn search_reader(&self, name: &str) -> Result<crate::store::SearchReader, QueryError> {
        match self.domain.projection(name).map(|p| p.kind()) {
            Some(ProjectionKind::Search(_)) if self.projections.contains_key(name) => {}
            _ => return Err(QueryError::UnknownSearch(name.to_owned())),
        }
        self.store.search_reader(name).ok_or_else(|| {
            QueryError::Unavailable(format!("the search index {name:?} is not open"))
        })
    }

    /// One document of a view. Blocking.
    pub fn get(&self, view: &str, key: &str) -> Result<Json, QueryError> {
        self.view_def(view)?;
        let generation = self.store.live(view)?;
        generation.doc(key)?.ok_or_else(|| QueryError::NoDocument {
            view: view.to_owned(),
            key: key.to_owned(),
        })
    }

    /// A page of a view, filtered and ordered through its indexes. Blocking.
    pub fn list(&self, view: &str, request: &ListRequest) -> Result<Page, QueryError> {
        let def = self.view_def(view)?;
        let indexed = def.indexes();
        let check = |field: &str| {
            if indexed.iter().any(|i| i == field) {
                Ok(())
            } else {
                Err(QueryError::NotIndexed {
                    view: view.to_owned(),
                    field: field.to_owned(),
                    indexed: indexed.to_vec(),
                })
            }
        };
        for (field, _) in &request.filters {
            check(field)?;
        }
        if let Some((field, _)) = &request.order {
            check(field)?;
        }
        let limit = request.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(QueryError::BadParameter(format!(
                "limit must be between 1 and {MAX_LIMIT}, got {limit}"
            )));
        }

        // The scan: the order field's index (narrowed to the filter value when
        // the same field is filtered), else the first filter's index (ordered by
        // key within the value), else the documents themselves (by key).
        let filter_on = |field: &str| request.filters.iter().find(|(f, _)| f == field);
        let (index_field, prefix, reverse) = match (&request.order, request.filters.first()) {
            (Some((field, order)), _) => {
                let mut prefix = index_prefix(field);
                if let Some((_, value)) = filter_on(field) {
                    encode_value(Some(value), &mut prefix);
                }
                (
                    Some(field.as_str()),
                    prefix,
                    *order == SortOrder::Descending,
                )
            }
            (None, Some((field, value))) => {
                let mut prefix = index_prefix(field);
                encode_value(Some(value), &mut prefix);
                (Some(field.as_str()), prefix, false)
            }
            (None, None) => (None, vec![DOC], false),
        };
        let after = match &request.cursor {
            None => None,
            Some(cursor) => {
                let bytes = unhex(cursor)
                    .filter(|b| b.first() == Some(&CURSOR_VERSION))
                    .map(|b| b[1..].to_vec())
                    .filter(|key| key.starts_with(&prefix))
                    .ok_or_else(|| {
                        QueryError::BadParameter(
                            "invalid cursor: pass the next_cursor of the same query unchanged"
                                .to_owned(),
                        )
                    })?;
                Some(bytes)
            }
        };
        let wanted: Vec<(&str, Vec<u8>)> = request
            .filters
            .iter()
            .map(|(f, v)| (f.as_str(), encoded(Some(v))))
            .collect();
        let generation = self.store.live(view)?;
        let field_prefix_len = index_field.map(|f| index_prefix(f).len());
        let mut items = Vec::new();
        let mut last_key: Option<Vec<u8>> = None;
        let mut next_cursor = None;
        let mut examined = 0;
        for entry in generation.scan(&prefix, after.as_deref(), reverse) {
            let (key, value) = entry?;
            examined += 1;
            let (id, doc, sort_value) = match field_prefix_len {
                Some(len) => {
                    let rest = &key[len..];
                    let Some(value_len) = encoded_len(rest) else {
                        continue;
                    };
                    let id = String::from_utf8_lossy(&rest[value_len..]).into_owned();
                    (
                        id,
                        generation.doc_by_key(&rest[value_len..])?,
                        Some(rest[..value_len].to_vec()),
                    )
                }
                None => {
                    let id = String::from_utf8_lossy(&key[1..]).into_owned();
                    let doc = serde_json::from_slice(&value).ok();
                    (id, doc, None)
                }
            };
            // The index entry and the document are read separately; a document
            // that changed in between is listed where its current value puts it.
            let matches = doc.as_ref().is_some_and(|doc| {
                let sort_ok = match (index_field, &sort_value) {
                    (Some(field), Some(sort)) => encoded(doc.get(field)) == *sort,
                    _ => true,
                };
                sort_ok && wanted.iter().all(|(f, v)| encoded(doc.get(*f)) == *v)
            });
            if matches {
                if items.len() == limit {
                    next_cursor = last_key.take();
                    break;
                }
                if let Some(doc) = doc {
                    items.push((id, doc));
                }
                last_key = Some(key.to_vec());
            }
            if examined >= MAX_EXAMINED {
                next_cursor = Some(key.to_vec());
                break;
            }
        }
        Ok(Page {
            items,
            next_cursor: next_cursor.map(|key| {
                let mut bytes = vec![CURSOR_VERSION];
                bytes.extend_from_slice(&key);
                hex(&bytes)
            }),
        })
    }

    /// The rows of an aggregation whose group fields equal the given values.
    /// A value matches when it equals the parsed JSON value or, for a string
    /// group value, the raw text. Blocking.
    pub fn aggregation(
        &self,
        name: &str,
        filters: &[(String, String)],
    ) -> Result<Vec<Json>, QueryError> {
        let group_fields = self.check_aggregation(name)?;
        for (field, _) in filters {
            if !group_fields.iter().any(|g| g == field) {
                return Err(QueryError::BadParameter(format!(
                    "aggregation {name:?} has no group field {field:?}; its group fields are: {}",
                    group_fields.join(", ")
                )));
            }
        }
        let Some(ProjectionKind::Aggregation(def)) = self.domain.projection(name).map(|p| p.kind())
        else {
            return Err(QueryError::UnknownAggregation(name.to_owned()));
        };
        let wanted: Vec<(&str, Vec<u8>, Vec<u8>)> = filters
            .iter()
            .map(|(field, raw)| {
                let parsed = parse_value(raw);
                (
                    field.as_str(),
                    encoded(Some(&parsed)),
                    encoded(Some(&Json::String(raw.clone()))),
                )
            })
            .collect();
        let generation = self.store.live(name)?;
        let mut rows = Vec::new();
        for entry in generation.scan(&[crate::store::views::GROUP], None, false) {
            let (_, value) = entry?;
            let state: Json = serde_json::from_slice(&value)
                .map_err(|e| QueryError::Unavailable(format!("corrupt group: {e}")))?;
            let group = state.get("group");
            let keep = wanted.iter().all(|(field, parsed, raw)| {
                let actual = encoded(group.and_then(|g| g.get(*field)));
                actual == *parsed || actual == *raw
            });
            if keep {
                rows.push(measures::row(def, &state));
            }
        }
        Ok(rows)
    }

    /// Waits until every named projection has passed `position` (its next
    /// offset in that partition is beyond the position's offset), at most
    /// `timeout`. Projections that do not read the position's topic are
    /// trivially there.
    pub async fn wait_for(
        &self,
        projections: &[&str],
        position: &Position,
        timeout: Duration,
    ) -> Result<(), QueryError> {
        let handles: Vec<&std::sync::Arc<ProjectionHandle>> = projections
            .iter()
            .filter_map(|name| self.projections.get(*name))
            .filter(|h| h.topics.contains(&position.topic))
            .collect();
        if !handles.is_empty() && position.partition >= self.log.partitions() {
            return Err(QueryError::BadParameter(format!(
                "position {position} names partition {}, but topics have {} partitions",
                position.partition,
                self.log.partitions()
            )));
        }
        let key = (position.topic.clone(), position.partition);
        let reached = |positions: &crate::store::views::Positions| {
            positions
                .get(&key)
                .is_some_and(|next| *next > position.offset)
        };
        let waits = handles.iter().map(|handle| {
            let mut receiver = handle.positions.subscribe();
            async move {
                // An error means the pool stopped: there is nothing left to wait for.
                let _ = receiver.wait_for(|p| reached(p)).await;
            }
        });
        let all = futures::future::join_all(waits);
        if tokio::time::timeout(timeout, all).await.is_ok()
            && handles.iter().all(|h| reached(&h.positions.borrow()))
        {
            return Ok(());
        }
        let end = self
            .log
            .end_offset(&position.topic, position.partition)
            .unwrap_or(0);
        let lag = handles
            .iter()
            .filter(|h| !reached(&h.positions.borrow()))
            .map(|h| {
                let next = h.positions.borrow().get(&key).copied().unwrap_or(0);
                (h.name.clone(), next, end.saturating_sub(next))
            })
            .collect();
        Err(QueryError::NotConsistent {
            position: position.to_string(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            lag,
        })
    }
}

/// A query-string value as JSON when it parses as JSON (numbers, booleans,
/// null, quoted strings), else as the string itself.
pub fn parse_value(raw: &str) -> Json {
    serde_json::from_str(raw).unwrap_or_else(|_| Json::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_through_hex() {
        let bytes = vec![0, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)), Some(bytes));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("é1"), None);
    }

    #[test]
    fn values_parse_as_json_when_they_can() {
        assert_eq!(parse_value("5"), Json::from(5));
        assert_eq!(parse_value("true"), Json::Bool(true));
        assert_eq!(parse_value("null"), Json::Null);
        assert_eq!(parse_value("ada"), Json::from("ada"));
        assert_eq!(parse_value("2026-11-26"), Json::from("2026-11-26"));
    }
}
