//! Aggregates: commands decide which events happen, event handlers fold
//! events into the aggregate's state.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value as Json;

use super::error::{ApplyError, CommandError, Violation};
use super::expr::{self, EventVar, Expression, Vars};

/// An aggregate type: its initial state, commands and event handlers.
#[derive(Debug)]
pub struct Aggregate {
    pub(crate) name: String,
    pub(crate) initial_state: Json,
    pub(crate) commands: BTreeMap<String, Command>,
    pub(crate) events: BTreeMap<String, EventHandler>,
}

/// A command of an aggregate.
#[derive(Debug)]
pub struct Command {
    pub(crate) name: String,
    /// The schema as written, for API documentation.
    pub(crate) schema_json: Option<Json>,
    pub(crate) schema: Option<jsonschema::Validator>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) emit: Vec<Emit>,
}

#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) require: Expression,
    pub(crate) message: String,
}

#[derive(Debug)]
pub(crate) struct Emit {
    pub(crate) event: String,
    pub(crate) data: Vec<(String, Expression)>,
    /// The data fields whose expression is only `command.<field>`: they carry
    /// that field of the (validated) command body unchanged, so the
    /// command's schema describes them too. Field → command field.
    pub(crate) copied: BTreeMap<String, String>,
    pub(crate) when: Option<Expression>,
}

/// One `emit` entry of a command, as the API documentation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmitShape<'a> {
    pub event: &'a str,
    /// The event's data fields in order, each with the command body field it
    /// copies unchanged, if its expression is only `command.<field>`.
    pub fields: Vec<(&'a str, Option<&'a str>)>,
    /// Whether the entry has a `when` condition, so a command may not emit it.
    pub conditional: bool,
}

/// How one event type changes the state: each `set` field is replaced by its
/// expression's value, the others are kept.
#[derive(Debug)]
pub(crate) struct EventHandler {
    pub(crate) set: Vec<(String, Expression)>,
    /// The current version of the event type's data (DESIGN.md §3.3): new
    /// events are written with it.
    pub(crate) version: u64,
    /// `upcasts[i]` turns version `i + 1` into version `i + 2`; there is one
    /// step for each older version, so `upcasts.len() == version - 1`.
    pub(crate) upcasts: Vec<Upcast>,
}

/// One upcast step of an event type (version n -> n + 1): the fields set
/// (added or replaced) from the old event, then the fields removed.
#[derive(Debug)]
pub(crate) struct Upcast {
    pub(crate) set: Vec<(String, Expression)>,
    pub(crate) remove: Vec<String>,
}

/// What a command is run with, besides its body and the current state.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub aggregate_id: String,
    /// The aggregate's version before the command (0 for a new aggregate).
    pub version: u64,
    pub now: DateTime<Utc>,
    /// Request metadata, visible to expressions as `meta`.
    pub meta: Json,
}

/// The outcome of an accepted command.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The new events, in order; empty if the command changed nothing.
    pub events: Vec<NewEvent>,
    /// The state after applying `events` in order.
    pub new_state: Json,
}

/// An event decided by a command, not yet recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_type: String,
    /// A JSON object.
    pub data: Json,
}

/// A recorded event, as handed to `apply` functions.
#[derive(Debug, Clone, Copy)]
pub struct EventInput<'a> {
    pub event_type: &'a str,
    pub data: &'a Json,
    pub aggregate_id: &'a str,
    pub version: u64,
    pub timestamp: DateTime<Utc>,
}

/// The names an event's metadata takes in the `event` variable; event data
/// may not use them, so `event.type` always means the event type.
pub(crate) const EVENT_META_FIELDS: [&str; 5] = [
    "type",
    "aggregate_id",
    "aggregate_type",
    "version",
    "timestamp",
];

impl EventInput<'_> {
    /// The `event` variable: the event's data with its metadata beside it.
    pub(crate) fn cel_variable(&self, aggregate_type: &str) -> cel::Value {
        let mut fields = match self.data {
            Json::Object(map) => map.clone(),
            _ => serde_json::Map::new(),
        };
        fields.insert("type".into(), Json::from(self.event_type));
        fields.insert("aggregate_id".into(), Json::from(self.aggregate_id));
        fields.insert("aggregate_type".into(), Json::from(aggregate_type));
        fields.insert("version".into(), Json::from(self.version));
        let mut value = expr::from_json(&Json::Object(fields));
        if let cel::Value::Map(map) = &mut value {
            std::sync::Arc::make_mut(&mut map.map).insert(
                cel::objects::Key::String(std::sync::Arc::new("timestamp".to_owned())),
                expr::timestamp(self.timestamp),
            );
        }
        value
    }
}

impl Command {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The command's JSON Schema as written in the domain file, if any.
    pub fn schema(&self) -> Option<&Json> {
        self.schema_json.as_ref()
    }

    /// The event types this command may emit, in order, possibly repeated.
    pub fn emitted_events(&self) -> impl Iterator<Item = &str> {
        self.emit.iter().map(|e| e.event.as_str())
    }

    /// The command's `emit` entries: each event type with its data fields.
    pub fn emits(&self) -> impl Iterator<Item = EmitShape<'_>> {
        self.emit.iter().map(|e| EmitShape {
            event: &e.event,
            fields: e
                .data
                .iter()
                .map(|(field, _)| (field.as_str(), e.copied.get(field).map(String::as_str)))
                .collect(),
            conditional: e.when.is_some(),
        })
    }

    fn validate(&self, body: &Json) -> Result<(), CommandError> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        let violations: Vec<Violation> = schema
            .iter_errors(body)
            .map(|error| Violation {
                path: error.instance_path().as_str().to_owned(),
                message: error.to_string(),
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(CommandError::Schema(violations))
        }
    }
}

impl Aggregate {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state of an aggregate that has no events yet: a JSON object.
    pub fn initial_state(&self) -> &Json {
        &self.initial_state
    }

    pub fn command(&self, name: &str) -> Option<&Command> {
        self.commands.get(name)
    }

    pub fn command_names(&self) -> impl Iterator<Item = &str> {
        self.commands.keys().map(String::as_str)
    }

    pub fn event_names(&self) -> impl Iterator<Item = &str> {
        self.events.keys().map(String::as_str)
    }

    /// The current version of an event type's data (1 unless declared, and
    /// for an event type the aggregate does not have).
    pub fn event_version(&self, event_type: &str) -> u64 {
        self.events
            .get(event_type)
            .map_or(1, |handler| handler.version)
    }

    /// The event types above version 1 with their versions, as
    /// `Type=version` sorted and joined by `,` (empty when every event type
    /// is at version 1). A state folded under other versions folded other
    /// shapes of data, so the write side replays a partition whose
    /// snapshots were folded under different versions.
    pub fn event_versions(&self) -> String {
        self.events
            .iter()
            .filter(|(_, handler)| handler.version > 1)
            .map(|(name, handler)| format!("{name}={}", handler.version))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The data of `event`, stored at `schema_version`, brought to the
    /// event type's current version by its upcast steps in order; `None`
    /// when the data is current already (or the event type is unknown here,
    /// which the event's handlers report), so events at the current version
    /// cost one lookup. An event from a newer domain (a version above the
    /// current one) or a step that fails is an error with its place.
    pub fn upcast(
        &self,
        event: &EventInput<'_>,
        schema_version: u64,
    ) -> Result<Option<Json>, ApplyError> {
        let Some(handler) = self.events.get(event.event_type) else {
            return Ok(None);
        };
        if schema_version == handler.version {
            return Ok(None);
        }
        let place = || format!("aggregates.{}.events.{}", self.name, event.event_type);
        if schema_version == 0 || schema_version > handler.version {
            return Err(ApplyError::Evaluation {
                place: place(),
                reason: format!(
                    "the event was written at version {schema_version}, but this domain knows versions 1 to {}",
                    handler.version
                ),
            });
        }
        let mut data = match event.data {
            Json::Object(fields) => Json::Object(fields.clone()),
            _ => Json::Object(serde_json::Map::new()),
        };
        // Steps are numbered from 1, and the loader made sure there is one
        // for every version below the current one.
        let first = usize::try_from(schema_version - 1).unwrap_or(usize::MAX);
        let steps = handler.upcasts.get(first..).unwrap_or(&[]);
        for (step, upcast) in (schema_version..).zip(steps) {
            let values = {
                let vars = Vars {
                    event: Some(EventVar {
                        input: EventInput {
                            data: &data,
                            ..*event
                        },
                        aggregate_type: &self.name,
                    }),
                    id: Some(event.aggregate_id),
                    ..Vars::default()
                };
                let here = || format!("{}.upcast.{step}", place());
                expr::eval_set(&upcast.set, &vars, &here)?
            };
            if let Json::Object(fields) = &mut data {
                expr::assign(fields, values);
                for field in &upcast.remove {
                    fields.remove(field);
                }
            }
        }
        Ok(Some(data))
    }

    fn find_command(&self, command: &str) -> Result<&Command, CommandError> {
        self.commands
            .get(command)
            .ok_or_else(|| CommandError::UnknownCommand {
                command: command.to_owned(),
            })
    }

    /// Validates a command body against the command's JSON Schema only.
    /// Every violation is returned, each with its JSON Pointer.
    pub fn validate(&self, command: &str, body: &Json) -> Result<(), CommandError> {
        self.find_command(command)?.validate(body)
    }

    /// Runs a command: schema, then rules, then `emit` (with `when`), then
    /// folds the new events over `state` to give the new state. A rejected
    /// command emits nothing.
    pub fn execute(
        &self,
        command: &str,
        state: &Json,
        body: &Json,
        ctx: &CommandContext,
    ) -> Result<Decision, CommandError> {
        let cmd = self.find_command(command)?;
        cmd.validate(body)?;
        self.decide(cmd, state, body, ctx)
    }

    /// Runs a command whose body already passed [`Aggregate::validate`]:
    /// rules, `emit`, then the fold. The write side validates on the request's
    /// own thread and decides on the partition's single writer, so the
    /// writer does not pay for schema validation twice.
    pub fn execute_validated(
        &self,
        command: &str,
        state: &Json,
        body: &Json,
        ctx: &CommandContext,
    ) -> Result<Decision, CommandError> {
        let cmd = self.find_command(command)?;
        self.decide(cmd, state, body, ctx)
    }

    fn decide(
        &self,
        cmd: &Command,
        state: &Json,
        body: &Json,
        ctx: &CommandContext,
    ) -> Result<Decision, CommandError> {
        let vars = Vars {
            state: Some(state),
            command: Some(body),
            id: Some(&ctx.aggregate_id),
            meta: Some(&ctx.meta),
            now: Some(ctx.now),
            ..Vars::default()
        };
        // Spelled out only for an error message: a decision allocates no
        // place names.
        let place = || format!("aggregates.{}.commands.{}", self.name, cmd.name);
        for (i, rule) in cmd.rules.iter().enumerate() {
            let allowed =
                rule.require
                    .eval_bool(&vars)
                    .map_err(|reason| CommandError::Evaluation {
                        place: format!("{}.rules[{i}]", place()),
                        reason,
                    })?;
            if !allowed {
                return Err(CommandError::Rejected {
                    message: rule.message.clone(),
                });
            }
        }
        let mut events = Vec::with_capacity(cmd.emit.len());
        for (i, emit) in cmd.emit.iter().enumerate() {
            let here = || format!("{}.emit[{i}]", place());
            if let Some(when) = &emit.when {
                let wanted = when
                    .eval_bool(&vars)
                    .map_err(|reason| CommandError::Evaluation {
                        place: format!("{}.when", here()),
                        reason,
                    })?;
                if !wanted {
                    continue;
                }
            }
            let mut data = serde_json::Map::new();
            for (field, expression) in &emit.data {
                let value =
                    expression
                        .eval_json(&vars)
                        .map_err(|reason| CommandError::Evaluation {
                            place: format!("{}.data.{field}", here()),
                            reason,
                        })?;
                data.insert(field.clone(), value);
            }
            events.push(NewEvent {
                event_type: emit.event.clone(),
                data: Json::Object(data),
            });
        }
        let mut new_state = state.clone();
        for (i, event) in events.iter().enumerate() {
            let input = EventInput {
                event_type: &event.event_type,
                data: &event.data,
                aggregate_id: &ctx.aggregate_id,
                version: ctx.version.saturating_add(i as u64).saturating_add(1),
                timestamp: ctx.now,
            };
            self.apply_in_place(&mut new_state, &input)
                .map_err(|e| match e {
                    ApplyError::UnknownEvent { event_type } => CommandError::Evaluation {
                        place: place(),
                        reason: format!("no handler for event `{event_type}`"),
                    },
                    ApplyError::Evaluation { place, reason } => {
                        CommandError::Evaluation { place, reason }
                    }
                })?;
        }
        Ok(Decision { events, new_state })
    }

    /// Applies one recorded event to a state, as when replaying the log.
    pub fn apply(&self, state: &Json, event: &EventInput<'_>) -> Result<Json, ApplyError> {
        let mut new_state = state.clone();
        self.apply_in_place(&mut new_state, event)?;
        Ok(new_state)
    }

    /// [`Aggregate::apply`] on the state where it is: the fields a handler
    /// sets are replaced, the rest is not copied. On an error the state is
    /// unchanged.
    pub fn apply_in_place(
        &self,
        state: &mut Json,
        event: &EventInput<'_>,
    ) -> Result<(), ApplyError> {
        let handler =
            self.events
                .get(event.event_type)
                .ok_or_else(|| ApplyError::UnknownEvent {
                    event_type: event.event_type.to_owned(),
                })?;
        let place = || format!("aggregates.{}.events.{}", self.name, event.event_type);
        if !state.is_object() {
            return Err(ApplyError::Evaluation {
                place: place(),
                reason: "the state is not a JSON object".to_owned(),
            });
        }
        let vars = Vars {
            state: Some(state),
            event: Some(EventVar {
                input: *event,
                aggregate_type: &self.name,
            }),
            id: Some(event.aggregate_id),
            ..Vars::default()
        };
        let values = expr::eval_set(&handler.set, &vars, &place)?;
        drop(vars);
        if let Json::Object(fields) = state {
            expr::assign(fields, values);
        }
        Ok(())
    }
}
