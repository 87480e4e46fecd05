//! Projections, the pure part: which events they handle and what each event
//! changes. Storing the results is another module's job.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::aggregate::EventInput;
use super::error::ApplyError;
use super::expr::{self, EventVar, Expression, Vars};

/// A read model fed by the events of its source aggregates.
#[derive(Debug)]
pub struct Projection {
    pub(crate) name: String,
    pub(crate) kind: ProjectionKind,
    pub(crate) sources: Vec<String>,
}

impl Projection {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> &ProjectionKind {
        &self.kind
    }

    /// The aggregate types whose events feed this projection. For a search
    /// projection these are its view's sources.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// Whether an aggregate's first event (`version` 1) always finds its
    /// document absent: true for a view keyed by aggregate id with a single
    /// source aggregate type. Only that aggregate's own events reach its
    /// document then, and the write side numbers them from 1, so nothing can
    /// have been stored under the key before. The read side skips the read of
    /// such a document. A keyed view, or one over several aggregate types
    /// (whose ids may coincide), can find a document there, and must read it:
    /// a document taken as absent would be overwritten and its old index
    /// entries left behind.
    pub fn first_event_finds_no_document(&self) -> bool {
        match &self.kind {
            ProjectionKind::View(def) => !def.is_keyed() && self.sources.len() == 1,
            _ => false,
        }
    }
}

#[derive(Debug)]
pub enum ProjectionKind {
    View(ViewDef),
    Aggregation(AggregationDef),
    Search(SearchDef),
}

/// A view: one JSON document per key, by default the aggregate id, or the
/// value of the view's `key` expression (or of one handler's) over the event
/// (DESIGN.md §3.1).
#[derive(Debug)]
pub struct ViewDef {
    pub(crate) name: String,
    pub(crate) indexes: Vec<String>,
    pub(crate) on: BTreeMap<String, ViewHandler>,
    /// The view's `key`; `None` keys documents by aggregate id.
    pub(crate) key: Option<Expression>,
    /// Handlers with a `key` of their own, which overrides the view's.
    pub(crate) handler_keys: BTreeMap<String, Expression>,
}

/// The longest document key a key expression may give, in bytes.
pub const MAX_VIEW_KEY_BYTES: usize = 512;

#[derive(Debug)]
pub(crate) enum ViewHandler {
    Set(Vec<(String, Expression)>),
    Delete,
}

/// The change a view makes to the document of `event.aggregate_id`.
#[derive(Debug, Clone, PartialEq)]
pub enum ViewChange {
    Put(Json),
    Delete,
    Unchanged,
}

impl ViewDef {
    /// The document fields usable in filters and sorting.
    pub fn indexes(&self) -> &[String] {
        &self.indexes
    }

    pub fn handles(&self, event_type: &str) -> bool {
        self.on.contains_key(event_type)
    }

    /// Whether some document is keyed by something other than the aggregate id.
    pub fn is_keyed(&self) -> bool {
        self.key.is_some() || !self.handler_keys.is_empty()
    }

    /// The key of the document `event` changes: its handler's `key`, else
    /// the view's, else the aggregate id. A key is a non-empty string or a
    /// number (as its decimal text) of at most [`MAX_VIEW_KEY_BYTES`];
    /// anything else, like an expression that fails, is an error with its
    /// place, which the read side quarantines as a poison event.
    pub fn key<'e>(
        &self,
        event: &EventInput<'e>,
        aggregate_type: &str,
    ) -> Result<Cow<'e, str>, ApplyError> {
        let (expression, place) = match self.handler_keys.get(event.event_type) {
            Some(expression) => (
                expression,
                format!("projections.{}.on.{}.key", self.name, event.event_type),
            ),
            None => match &self.key {
                Some(expression) => (expression, format!("projections.{}.key", self.name)),
                None => return Ok(Cow::Borrowed(event.aggregate_id)),
            },
        };
        let vars = Vars {
            event: Some(EventVar {
                input: *event,
                aggregate_type,
            }),
            id: Some(event.aggregate_id),
            ..Vars::default()
        };
        let error = |reason: String| ApplyError::Evaluation {
            place: place.clone(),
            reason,
        };
        let key = match expression.eval_json(&vars).map_err(error)? {
            Json::String(key) => key,
            Json::Number(n) => n.to_string(),
            other => {
                return Err(error(format!(
                    "a document key must be a string or a number, got {other}"
                )));
            }
        };
        if key.is_empty() || key.len() > MAX_VIEW_KEY_BYTES {
            return Err(error(format!(
                "a document key must have 1 to {MAX_VIEW_KEY_BYTES} bytes, got {}",
                key.len()
            )));
        }
        Ok(Cow::Owned(key))
    }

    /// The fields some handler of this view sets.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        let mut fields: Vec<&str> = self
            .on
            .values()
            .flat_map(|h| match h {
                ViewHandler::Set(set) => set.iter().map(|(f, _)| f.as_str()).collect(),
                ViewHandler::Delete => Vec::new(),
            })
            .collect();
        fields.sort_unstable();
        fields.dedup();
        fields.into_iter()
    }

    /// What `event` does to the current document `doc` (None if absent).
    /// Handlers see `doc` as an empty object when there is no document yet.
    pub fn apply(
        &self,
        doc: Option<&Json>,
        event: &EventInput<'_>,
        aggregate_type: &str,
    ) -> Result<ViewChange, ApplyError> {
        let Some(handler) = self.on.get(event.event_type) else {
            return Ok(ViewChange::Unchanged);
        };
        match handler {
            ViewHandler::Delete if doc.is_some() => Ok(ViewChange::Delete),
            ViewHandler::Delete => Ok(ViewChange::Unchanged),
            ViewHandler::Set(set) => {
                let values = self.eval_handler(set, doc, event, aggregate_type)?;
                let mut fields = match doc {
                    Some(Json::Object(fields)) => fields.clone(),
                    _ => serde_json::Map::new(),
                };
                expr::assign(&mut fields, values);
                Ok(ViewChange::Put(Json::Object(fields)))
            }
        }
    }

    /// [`ViewDef::apply`] on the document where it is (`None`: absent): the
    /// fields a handler sets are replaced, the rest is not copied. Returns
    /// whether the document changed; on an error it is unchanged.
    pub fn apply_in_place(
        &self,
        doc: &mut Option<Json>,
        event: &EventInput<'_>,
        aggregate_type: &str,
    ) -> Result<bool, ApplyError> {
        let Some(handler) = self.on.get(event.event_type) else {
            return Ok(false);
        };
        match handler {
            ViewHandler::Delete => Ok(doc.take().is_some()),
            ViewHandler::Set(set) => {
                let values = self.eval_handler(set, doc.as_ref(), event, aggregate_type)?;
                if let Json::Object(fields) =
                    doc.get_or_insert_with(|| Json::Object(serde_json::Map::new()))
                {
                    expr::assign(fields, values);
                }
                Ok(true)
            }
        }
    }

    /// The new values of a `set` handler's fields.
    fn eval_handler<'s>(
        &self,
        set: &'s [(String, Expression)],
        doc: Option<&Json>,
        event: &EventInput<'_>,
        aggregate_type: &str,
    ) -> Result<Vec<(&'s str, Json)>, ApplyError> {
        let place = || format!("projections.{}.on.{}", self.name, event.event_type);
        if doc.is_some_and(|doc| !doc.is_object()) {
            return Err(ApplyError::Evaluation {
                place: place(),
                reason: "the current document is not a JSON object".to_owned(),
            });
        }
        // The current document as it is, an empty one when there is none (an
        // empty map does not allocate).
        let empty = Json::Object(serde_json::Map::new());
        let vars = Vars {
            doc: Some(doc.unwrap_or(&empty)),
            event: Some(EventVar {
                input: *event,
                aggregate_type,
            }),
            id: Some(event.aggregate_id),
            ..Vars::default()
        };
        expr::eval_set(set, &vars, &place)
    }
}

/// An aggregation: measures kept per group, updated incrementally.
#[derive(Debug)]
pub struct AggregationDef {
    pub(crate) name: String,
    pub(crate) events: Vec<String>,
    pub(crate) group_fields: Vec<String>,
    pub(crate) group_by: Vec<Expression>,
    pub(crate) measures: Vec<Measure>,
}

/// One measure of an aggregation.
#[derive(Debug)]
pub struct Measure {
    pub name: String,
    pub kind: MeasureKind,
    pub(crate) input: Option<Expression>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureKind {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

impl MeasureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MeasureKind::Count => "count",
            MeasureKind::Sum => "sum",
            MeasureKind::Min => "min",
            MeasureKind::Max => "max",
            MeasureKind::Avg => "avg",
        }
    }
}

/// The group key of one event (group field → value) and, per measure in
/// order, its input number (`None` for `count`, which has none).
pub type AggregationInput = (
    serde_json::Map<String, Json>,
    Vec<Option<serde_json::Number>>,
);

impl AggregationDef {
    pub fn handles(&self, event_type: &str) -> bool {
        self.events.iter().any(|e| e == event_type)
    }

    pub fn group_fields(&self) -> &[String] {
        &self.group_fields
    }

    pub fn measures(&self) -> &[Measure] {
        &self.measures
    }

    /// Evaluates the group key and the measures' inputs for one event.
    /// Numbers keep their kind: an integer input stays an integer.
    pub fn evaluate(
        &self,
        event: &EventInput<'_>,
        aggregate_type: &str,
    ) -> Result<AggregationInput, ApplyError> {
        let place = || format!("projections.{}", self.name);
        let vars = Vars {
            event: Some(EventVar {
                input: *event,
                aggregate_type,
            }),
            id: Some(event.aggregate_id),
            ..Vars::default()
        };
        let mut group = serde_json::Map::new();
        for (field, expression) in self.group_fields.iter().zip(&self.group_by) {
            let value = expression
                .eval_json(&vars)
                .map_err(|reason| ApplyError::Evaluation {
                    place: format!("{}.group_by.{field}", place()),
                    reason,
                })?;
            group.insert(field.clone(), value);
        }
        let mut inputs = Vec::with_capacity(self.measures.len());
        for measure in &self.measures {
            let Some(expression) = &measure.input else {
                inputs.push(None);
                continue;
            };
            let here = || format!("{}.measures.{}", place(), measure.name);
            match expression.eval_json(&vars) {
                Ok(Json::Number(n)) => inputs.push(Some(n)),
                Ok(other) => {
                    return Err(ApplyError::Evaluation {
                        place: here(),
                        reason: format!("expected a number, got {other}"),
                    });
                }
                Err(reason) => {
                    return Err(ApplyError::Evaluation {
                        place: here(),
                        reason,
                    });
                }
            }
        }
        Ok((group, inputs))
    }
}

/// A full-text search index over a view's documents.
#[derive(Debug)]
pub struct SearchDef {
    pub(crate) view: String,
    pub(crate) fields: Vec<(String, SearchFieldKind)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchFieldKind {
    /// Tokenized full text.
    Text,
    /// One exact term.
    Keyword,
    Number,
}

impl SearchDef {
    /// The view projection whose documents are indexed.
    pub fn view(&self) -> &str {
        &self.view
    }

    pub fn fields(&self) -> &[(String, SearchFieldKind)] {
        &self.fields
    }
}
