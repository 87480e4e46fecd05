//! Loading a domain file: TOML, then the shape of each item, then the links
//! between items. Every problem is collected, none stops the others from
//! being found, so one `cqrsd check` lists them all.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value as Json;

use super::aggregate::{Aggregate, Command, EVENT_META_FIELDS, Emit, EventHandler, Rule, Upcast};
use super::error::DomainError;
use super::expr::{Expression, Var};
use super::policy::Policy;
use super::projection::{
    AggregationDef, Measure, MeasureKind, Projection, ProjectionKind, SearchDef, SearchFieldKind,
    ViewDef, ViewHandler,
};

/// Variables by place: a rule sees the command, an event handler does not
/// (replaying the log has no command), projections see neither state nor
/// command (they only have events and their own documents).
const COMMAND_VARS: &[Var] = &[Var::State, Var::Command, Var::Id, Var::Meta, Var::Now];
const HANDLER_VARS: &[Var] = &[Var::State, Var::Event, Var::Id];
const VIEW_VARS: &[Var] = &[Var::Event, Var::Doc, Var::Id];
const AGGREGATION_VARS: &[Var] = &[Var::Event, Var::Id];
/// A view's key picks the document, so it cannot read one.
const VIEW_KEY_VARS: &[Var] = &[Var::Event, Var::Id];
/// An upcast step sees only the old event (its data and envelope).
const UPCAST_VARS: &[Var] = &[Var::Event, Var::Id];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    aggregates: toml::Table,
    #[serde(default)]
    projections: toml::Table,
    #[serde(default)]
    policies: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregate {
    #[serde(default)]
    state: toml::Table,
    #[serde(default)]
    commands: toml::Table,
    #[serde(default)]
    events: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    schema: Option<toml::Value>,
    #[serde(default)]
    rules: Vec<toml::Value>,
    #[serde(default)]
    emit: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    require: String,
    message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmit {
    event: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
    when: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    #[serde(default)]
    set: BTreeMap<String, String>,
    version: Option<i64>,
    #[serde(default)]
    upcast: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpcast {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKind {
    #[serde(rename = "kind")]
    _kind: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawView {
    #[serde(rename = "kind")]
    _kind: String,
    source: RawSources,
    key: Option<String>,
    #[serde(default)]
    indexes: Vec<String>,
    #[serde(default)]
    on: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawViewHandler {
    set: Option<BTreeMap<String, String>>,
    key: Option<String>,
    #[serde(default)]
    delete: bool,
}

/// `source`: one aggregate type, or a list of them.
#[derive(Deserialize)]
#[serde(transparent)]
struct RawSources(toml::Value);

impl RawSources {
    /// The source names; anything but a string or a list of strings is
    /// reported at `<place>.source`.
    fn names(self, p: &mut Problems, place: &str) -> Vec<String> {
        match self.0 {
            toml::Value::String(source) => vec![source],
            toml::Value::Array(items) => {
                let mut names = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        toml::Value::String(source) => names.push(source),
                        other => p.add(
                            format!("{place}.source[{i}]"),
                            format!("expected an aggregate name, found {}", other.type_str()),
                        ),
                    }
                }
                names
            }
            other => {
                p.add(
                    format!("{place}.source"),
                    format!(
                        "expected an aggregate name or a list of them, found {}",
                        other.type_str()
                    ),
                );
                Vec::new()
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregation {
    #[serde(rename = "kind")]
    _kind: String,
    source: RawSources,
    events: Vec<String>,
    #[serde(default)]
    group_by: BTreeMap<String, String>,
    measures: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSearch {
    #[serde(rename = "kind")]
    _kind: String,
    view: String,
    fields: BTreeMap<String, String>,
}

/// Collects problems with their places.
#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<DomainError>);

impl Problems {
    pub(crate) fn add(&mut self, place: impl Into<String>, reason: impl Into<String>) {
        self.0.push(DomainError::new(place, reason));
    }

    /// Deserializes one item, recording serde's complaint at its place.
    pub(crate) fn item<T: DeserializeOwned>(
        &mut self,
        place: &str,
        value: toml::Value,
    ) -> Option<T> {
        match value.try_into::<T>() {
            Ok(item) => Some(item),
            Err(error) => {
                self.add(place, error.message().trim().to_owned());
                None
            }
        }
    }

    fn table(&mut self, place: &str, value: toml::Value) -> Option<toml::Table> {
        match value {
            toml::Value::Table(table) => Some(table),
            other => {
                self.add(
                    place,
                    format!("expected a table, found {}", other.type_str()),
                );
                None
            }
        }
    }

    pub(crate) fn name(&mut self, place: &str, name: &str) -> bool {
        if is_name(name) {
            true
        } else {
            self.add(
                place,
                format!("`{name}` is not a valid name (letters, digits and `_`, not starting with a digit)"),
            );
            false
        }
    }

    pub(crate) fn expr(
        &mut self,
        place: &str,
        source: &str,
        allowed: &[Var],
    ) -> Option<Expression> {
        match Expression::compile(source, allowed) {
            Ok(e) => Some(e),
            Err(reason) => {
                self.add(place, reason);
                None
            }
        }
    }
}

/// Names of aggregates, commands, events, projections and fields:
/// `^[A-Za-z_][A-Za-z0-9_]*$`, so they are safe in URLs, topic names and CEL.
pub(crate) fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The line and column (both from 1) of a byte offset.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

pub(crate) type Loaded = (
    BTreeMap<String, Aggregate>,
    BTreeMap<String, Projection>,
    BTreeMap<String, Policy>,
);

pub(crate) fn load(source: &str) -> Result<Loaded, Vec<DomainError>> {
    let mut p = Problems::default();
    let table: toml::Table = match toml::from_str(source) {
        Ok(t) => t,
        Err(error) => {
            let place = match error.span() {
                Some(span) => {
                    let (line, col) = line_col(source, span.start);
                    format!("line {line}, column {col}")
                }
                None => String::new(),
            };
            p.add(place, error.message().trim().to_owned());
            return Err(p.0);
        }
    };
    let Some(file) = p.item::<RawFile>("", toml::Value::Table(table)) else {
        return Err(p.0);
    };
    let mut aggregates = BTreeMap::new();
    for (name, value) in file.aggregates {
        let place = format!("aggregates.{name}");
        let ok = p.name(&place, &name);
        if let Some(aggregate) = load_aggregate(&mut p, &place, &name, value)
            && ok
        {
            aggregates.insert(name, aggregate);
        }
    }
    let mut projections = BTreeMap::new();
    let mut searches = Vec::new();
    for (name, value) in file.projections {
        let place = format!("projections.{name}");
        let ok = p.name(&place, &name);
        match load_projection(&mut p, &place, &name, value, &aggregates) {
            Some(projection) if ok => {
                if matches!(projection.kind, ProjectionKind::Search(_)) {
                    searches.push(name.clone());
                }
                projections.insert(name, projection);
            }
            _ => {}
        }
    }
    // Search projections refer to views, so they are checked once every
    // view is known.
    for name in searches {
        let place = format!("projections.{name}");
        let (view_name, fields) = match projections.get(&name).map(|s| &s.kind) {
            Some(ProjectionKind::Search(search)) => (search.view.clone(), search.fields.clone()),
            _ => continue,
        };
        let sources = match projections.get(&view_name) {
            Some(Projection {
                kind: ProjectionKind::View(view),
                sources,
                ..
            }) => {
                let set: BTreeSet<&str> = view.fields().collect();
                for (field, _) in &fields {
                    if !set.contains(field.as_str()) {
                        p.add(
                            format!("{place}.fields.{field}"),
                            format!("view `{view_name}` never sets field `{field}`"),
                        );
                    }
                }
                sources.clone()
            }
            Some(_) => {
                p.add(
                    format!("{place}.view"),
                    format!("projection `{view_name}` is not a view"),
                );
                continue;
            }
            None => {
                p.add(
                    format!("{place}.view"),
                    format!("no view projection named `{view_name}`"),
                );
                continue;
            }
        };
        if let Some(search) = projections.get_mut(&name) {
            search.sources = sources;
        }
    }
    let policies =
        super::policy_load::load_policies(&mut p, file.policies, &aggregates, &projections);
    if p.0.is_empty() {
        Ok((aggregates, projections, policies))
    } else {
        Err(p.0)
    }
}

fn load_aggregate(
    p: &mut Problems,
    place: &str,
    name: &str,
    value: toml::Value,
) -> Option<Aggregate> {
    let raw: RawAggregate = p.item(place, value)?;
    let state = match serde_json::to_value(&raw.state) {
        Ok(state) => state,
        Err(error) => {
            p.add(format!("{place}.state"), error.to_string());
            Json::Object(serde_json::Map::new())
        }
    };
    let state_fields: BTreeSet<String> = raw.state.keys().cloned().collect();
    for field in &state_fields {
        p.name(&format!("{place}.state.{field}"), field);
    }

    let mut events = BTreeMap::new();
    for (event, value) in raw.events {
        let here = format!("{place}.events.{event}");
        let ok = p.name(&here, &event);
        let Some(raw_event) = p.item::<RawEvent>(&here, value) else {
            continue;
        };
        let mut set = Vec::new();
        for (field, source) in raw_event.set {
            let at = format!("{here}.set.{field}");
            if !state_fields.contains(&field) {
                p.add(
                    &at,
                    format!("field `{field}` is not in the state of aggregate `{name}`; declare it in [{place}] state"),
                );
            }
            if let Some(e) = p.expr(&at, &source, HANDLER_VARS) {
                set.push((field, e));
            }
        }
        let (version, upcasts) = load_upcasts(p, &here, raw_event.version, raw_event.upcast);
        if ok {
            events.insert(
                event,
                EventHandler {
                    set,
                    version,
                    upcasts,
                },
            );
        }
    }

    let mut commands = BTreeMap::new();
    let mut emitted = BTreeSet::new();
    // Event type -> every data field some `emit` entry gives it: the shape of
    // the event type's current version, which upcast steps are checked against.
    let mut emitted_fields: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (command, value) in raw.commands {
        let here = format!("{place}.commands.{command}");
        let ok = p.name(&here, &command);
        let Some(raw_command) = p.item::<RawCommand>(&here, value) else {
            continue;
        };
        let (schema_json, schema) = match raw_command.schema {
            None => (None, None),
            Some(schema) => match serde_json::to_value(&schema) {
                Err(error) => {
                    p.add(format!("{here}.schema"), error.to_string());
                    (None, None)
                }
                Ok(json) => match jsonschema::validator_for(&json) {
                    Ok(validator) => (Some(json), Some(validator)),
                    Err(error) => {
                        p.add(
                            format!("{here}.schema"),
                            format!("invalid JSON Schema: {error}"),
                        );
                        (None, None)
                    }
                },
            },
        };
        let mut rules = Vec::new();
        for (i, value) in raw_command.rules.into_iter().enumerate() {
            let at = format!("{here}.rules[{i}]");
            let Some(rule) = p.item::<RawRule>(&at, value) else {
                continue;
            };
            if let Some(require) = p.expr(&format!("{at}.require"), &rule.require, COMMAND_VARS) {
                rules.push(Rule {
                    require,
                    message: rule.message,
                });
            }
        }
        let mut emit = Vec::new();
        for (i, value) in raw_command.emit.into_iter().enumerate() {
            let at = format!("{here}.emit[{i}]");
            let Some(raw_emit) = p.item::<RawEmit>(&at, value) else {
                continue;
            };
            emitted.insert(raw_emit.event.clone());
            emitted_fields
                .entry(raw_emit.event.clone())
                .or_default()
                .extend(raw_emit.data.keys().cloned());
            if !events.contains_key(&raw_emit.event) {
                p.add(
                    &at,
                    format!(
                        "event `{}` is not declared: add a handler [{place}.events.{}]",
                        raw_emit.event, raw_emit.event
                    ),
                );
            }
            let mut data = Vec::new();
            let mut copied = BTreeMap::new();
            for (field, source) in raw_emit.data {
                if let Some(copy) = source
                    .trim()
                    .strip_prefix("command.")
                    .filter(|rest| is_name(rest))
                {
                    copied.insert(field.clone(), copy.to_owned());
                }
                let field_at = format!("{at}.data.{field}");
                p.name(&field_at, &field);
                if EVENT_META_FIELDS.contains(&field.as_str()) {
                    p.add(
                        &field_at,
                        format!("`{field}` is reserved for event metadata (`event.{field}`)"),
                    );
                }
                if let Some(e) = p.expr(&field_at, &source, COMMAND_VARS) {
                    data.push((field, e));
                }
            }
            let when = match &raw_emit.when {
                Some(source) => p.expr(&format!("{at}.when"), source, COMMAND_VARS),
                None => None,
            };
            emit.push(Emit {
                event: raw_emit.event,
                data,
                copied,
                when,
            });
        }
        if ok {
            commands.insert(
                command.clone(),
                Command {
                    name: command,
                    schema_json,
                    schema,
                    rules,
                    emit,
                },
            );
        }
    }
    for (event, handler) in &events {
        if let Some(current) = emitted_fields.get(event) {
            check_upcast_fields(p, &format!("{place}.events.{event}"), handler, current);
        }
    }
    for event in events.keys() {
        if !emitted.contains(event) {
            p.add(
                format!("{place}.events.{event}"),
                format!("event `{event}` is never emitted by a command of `{name}`"),
            );
        }
    }
    Some(Aggregate {
        name: name.to_owned(),
        initial_state: state,
        commands,
        events,
    })
}

/// An event type's `version` (1 unless declared) and its upcast steps, one
/// per older version: `upcast.<n>` turns version n into n + 1. A missing
/// step, a step beyond the version, a reserved or invalid field name and CEL
/// errors are reported with their place.
fn load_upcasts(
    p: &mut Problems,
    place: &str,
    version: Option<i64>,
    raw: toml::Table,
) -> (u64, Vec<Upcast>) {
    let version = match version {
        None => 1,
        Some(v) => match u64::try_from(v) {
            Ok(v) if v >= 1 => v,
            _ => {
                p.add(
                    format!("{place}.version"),
                    format!("version must be a whole number from 1, not {v}"),
                );
                1
            }
        },
    };
    let mut steps: BTreeMap<u64, Upcast> = BTreeMap::new();
    for (step, value) in raw {
        let at = format!("{place}.upcast.{step}");
        let Some(n) = step.parse::<u64>().ok().filter(|n| *n >= 1) else {
            p.add(
                &at,
                format!("`{step}` is not a version: upcast steps are named by the version they start from (1, 2, ...)"),
            );
            continue;
        };
        if n >= version {
            p.add(
                &at,
                format!(
                    "the event is at version {version}, so there is no version {} for this step to turn version {n} into; raise `version` or remove the step",
                    n + 1
                ),
            );
        }
        let Some(raw_step) = p.item::<RawUpcast>(&at, value) else {
            continue;
        };
        if raw_step.set.is_empty() && raw_step.remove.is_empty() {
            p.add(&at, "a step needs `set = {...}`, `remove = [...]` or both");
        }
        let mut set = Vec::new();
        for (field, source) in raw_step.set {
            let field_at = format!("{at}.set.{field}");
            p.name(&field_at, &field);
            if EVENT_META_FIELDS.contains(&field.as_str()) {
                p.add(
                    &field_at,
                    format!("`{field}` is reserved for event metadata (`event.{field}`)"),
                );
            }
            if raw_step.remove.contains(&field) {
                p.add(
                    &field_at,
                    format!("`{field}` is both set and removed by this step"),
                );
            }
            if let Some(e) = p.expr(&field_at, &source, UPCAST_VARS) {
                set.push((field, e));
            }
        }
        for (i, field) in raw_step.remove.iter().enumerate() {
            p.name(&format!("{at}.remove[{i}]"), field);
        }
        steps.insert(
            n,
            Upcast {
                set,
                remove: raw_step.remove,
            },
        );
    }
    let mut upcasts = Vec::new();
    for n in 1..version {
        match steps.remove(&n) {
            Some(step) => upcasts.push(step),
            None => p.add(
                format!("{place}.upcast"),
                format!(
                    "the event is at version {version}, but there is no step [{place}.upcast.{n}] to turn version {n} into version {}",
                    n + 1
                ),
            ),
        }
    }
    (version, upcasts)
}

/// The field checks of upcast steps that the domain file makes knowable:
/// a field that a step sets and no later step removes ends up in events of
/// the current version, so some `emit` entry must give it; and a field that
/// an earlier step removed (and none set again since) cannot be in a step's
/// input, so removing it again names a field that is not there.
fn check_upcast_fields(
    p: &mut Problems,
    place: &str,
    handler: &EventHandler,
    current: &BTreeSet<String>,
) {
    let version = handler.version;
    for (n, step) in (1u64..).zip(&handler.upcasts) {
        let later = handler
            .upcasts
            .get(usize::try_from(n).unwrap_or(usize::MAX)..);
        for (field, _) in &step.set {
            let removed_later = later
                .unwrap_or(&[])
                .iter()
                .any(|s| s.remove.contains(field));
            if !removed_later && !current.contains(field) {
                p.add(
                    format!("{place}.upcast.{n}.set.{field}"),
                    format!(
                        "events at version {version} have no field `{field}` (no emit entry gives it), so this step sets a field the current version does not have"
                    ),
                );
            }
        }
        for (i, field) in step.remove.iter().enumerate() {
            let earlier = &handler.upcasts[..usize::try_from(n - 1).unwrap_or(0)];
            let gone = earlier
                .iter()
                .rev()
                .find_map(|s| {
                    if s.set.iter().any(|(f, _)| f == field) {
                        Some(false)
                    } else if s.remove.contains(field) {
                        Some(true)
                    } else {
                        None
                    }
                })
                .unwrap_or(false);
            if gone {
                p.add(
                    format!("{place}.upcast.{n}.remove[{i}]"),
                    format!(
                        "version {n} events cannot have field `{field}`: an earlier step removed it"
                    ),
                );
            }
        }
    }
}

/// Checks `source` and returns the events the source aggregates emit.
pub(crate) fn sources_events(
    p: &mut Problems,
    place: &str,
    sources: &[String],
    aggregates: &BTreeMap<String, Aggregate>,
) -> BTreeSet<String> {
    let mut events = BTreeSet::new();
    if sources.is_empty() {
        p.add(
            format!("{place}.source"),
            "at least one source aggregate is needed",
        );
    }
    for (i, source) in sources.iter().enumerate() {
        match aggregates.get(source) {
            Some(aggregate) => events.extend(aggregate.events.keys().cloned()),
            None => p.add(
                format!("{place}.source[{i}]"),
                format!("no aggregate named `{source}`"),
            ),
        }
    }
    events
}

fn load_projection(
    p: &mut Problems,
    place: &str,
    name: &str,
    value: toml::Value,
    aggregates: &BTreeMap<String, Aggregate>,
) -> Option<Projection> {
    let table = p.table(place, value)?;
    let kind = match table.get("kind") {
        Some(toml::Value::String(kind)) => kind.clone(),
        _ => {
            let only_kind: toml::Table = table
                .iter()
                .filter(|(k, _)| k.as_str() == "kind")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            p.item::<RawKind>(place, toml::Value::Table(only_kind))?;
            return None;
        }
    };
    let value = toml::Value::Table(table);
    match kind.as_str() {
        "view" => {
            let raw: RawView = p.item(place, value)?;
            let sources = raw.source.names(p, place);
            let known = sources_events(p, place, &sources, aggregates);
            let key = match &raw.key {
                Some(source) => p.expr(&format!("{place}.key"), source, VIEW_KEY_VARS),
                None => None,
            };
            let mut handler_keys = BTreeMap::new();
            let mut on = BTreeMap::new();
            for (event, value) in raw.on {
                let here = format!("{place}.on.{event}");
                if !known.contains(&event) {
                    p.add(
                        &here,
                        format!("no source aggregate of `{name}` has an event `{event}`"),
                    );
                }
                let Some(handler) = p.item::<RawViewHandler>(&here, value) else {
                    continue;
                };
                if let Some(source) = &handler.key
                    && let Some(e) = p.expr(&format!("{here}.key"), source, VIEW_KEY_VARS)
                {
                    handler_keys.insert(event.clone(), e);
                }
                let handler = match (handler.set, handler.delete) {
                    (Some(_), true) => {
                        p.add(&here, "a handler either sets fields or deletes, not both");
                        continue;
                    }
                    (None, true) => ViewHandler::Delete,
                    (None, false) => {
                        p.add(&here, "a handler needs `set = {...}` or `delete = true`");
                        continue;
                    }
                    (Some(set), false) => {
                        let mut fields = Vec::new();
                        for (field, source) in set {
                            let at = format!("{here}.set.{field}");
                            p.name(&at, &field);
                            if let Some(e) = p.expr(&at, &source, VIEW_VARS) {
                                fields.push((field, e));
                            }
                        }
                        ViewHandler::Set(fields)
                    }
                };
                on.insert(event, handler);
            }
            let view = ViewDef {
                name: name.to_owned(),
                indexes: raw.indexes,
                on,
                key,
                handler_keys,
            };
            let set: BTreeSet<&str> = view.fields().collect();
            for (i, index) in view.indexes.iter().enumerate() {
                if !set.contains(index.as_str()) {
                    p.add(
                        format!("{place}.indexes[{i}]"),
                        format!("the view never sets field `{index}`"),
                    );
                }
            }
            Some(Projection {
                name: name.to_owned(),
                kind: ProjectionKind::View(view),
                sources,
            })
        }
        "aggregation" => {
            let raw: RawAggregation = p.item(place, value)?;
            let sources = raw.source.names(p, place);
            let known = sources_events(p, place, &sources, aggregates);
            if raw.events.is_empty() {
                p.add(format!("{place}.events"), "at least one event is needed");
            }
            for (i, event) in raw.events.iter().enumerate() {
                if !known.contains(event) {
                    p.add(
                        format!("{place}.events[{i}]"),
                        format!("no source aggregate of `{name}` has an event `{event}`"),
                    );
                }
            }
            let mut group_fields = Vec::new();
            let mut group_by = Vec::new();
            for (field, source) in raw.group_by {
                let at = format!("{place}.group_by.{field}");
                p.name(&at, &field);
                if let Some(e) = p.expr(&at, &source, AGGREGATION_VARS) {
                    group_fields.push(field);
                    group_by.push(e);
                }
            }
            if raw.measures.is_empty() {
                p.add(
                    format!("{place}.measures"),
                    "at least one measure is needed",
                );
            }
            let mut measures = Vec::new();
            for (measure, source) in raw.measures {
                let at = format!("{place}.measures.{measure}");
                p.name(&at, &measure);
                if group_fields.contains(&measure) {
                    p.add(&at, format!("`{measure}` is also a group_by field"));
                }
                if let Some(m) = parse_measure(p, &at, measure, &source) {
                    measures.push(m);
                }
            }
            Some(Projection {
                name: name.to_owned(),
                kind: ProjectionKind::Aggregation(AggregationDef {
                    name: name.to_owned(),
                    events: raw.events,
                    group_fields,
                    group_by,
                    measures,
                }),
                sources,
            })
        }
        "search" => {
            let raw: RawSearch = p.item(place, value)?;
            let mut fields = Vec::new();
            for (field, kind) in raw.fields {
                let at = format!("{place}.fields.{field}");
                let kind = match kind.as_str() {
                    "text" => SearchFieldKind::Text,
                    "keyword" => SearchFieldKind::Keyword,
                    "number" => SearchFieldKind::Number,
                    other => {
                        p.add(
                            &at,
                            format!(
                                "unknown field kind `{other}`: expected text, keyword or number"
                            ),
                        );
                        continue;
                    }
                };
                fields.push((field, kind));
            }
            // The sources are the view's, filled in once views are known.
            Some(Projection {
                name: name.to_owned(),
                kind: ProjectionKind::Search(SearchDef {
                    view: raw.view,
                    fields,
                }),
                sources: Vec::new(),
            })
        }
        other => {
            p.add(
                format!("{place}.kind"),
                format!("unknown projection kind `{other}`: expected view, aggregation or search"),
            );
            None
        }
    }
}

/// `count`, or `sum(<CEL>)`, `min(...)`, `max(...)`, `avg(...)`.
fn parse_measure(p: &mut Problems, place: &str, name: String, source: &str) -> Option<Measure> {
    let source = source.trim();
    if source == "count" {
        return Some(Measure {
            name,
            kind: MeasureKind::Count,
            input: None,
        });
    }
    let unknown = || {
        format!(
            "unknown measure `{source}`: expected count, sum(<expr>), min(<expr>), max(<expr>) or avg(<expr>)"
        )
    };
    let Some((kind, rest)) = source.split_once('(') else {
        p.add(place, unknown());
        return None;
    };
    let kind = match kind.trim() {
        "sum" => MeasureKind::Sum,
        "min" => MeasureKind::Min,
        "max" => MeasureKind::Max,
        "avg" => MeasureKind::Avg,
        _ => {
            p.add(place, unknown());
            return None;
        }
    };
    let Some(inner) = rest.strip_suffix(')') else {
        p.add(place, unknown());
        return None;
    };
    let input = p.expr(place, inner, AGGREGATION_VARS)?;
    Some(Measure {
        name,
        kind,
        input: Some(input),
    })
}
