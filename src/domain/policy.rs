//! Policies, the pure part (DESIGN.md §3.2): which events a policy reacts to
//! and which commands it sends for each. Sending them, and remembering what
//! was sent, is the read side's job.

use serde_json::Value as Json;

use super::aggregate::EventInput;
use super::error::ApplyError;
use super::expr::{EventVar, Expression, Vars};

/// A declared process manager: events of its sources in, commands out.
#[derive(Debug)]
pub struct Policy {
    pub(crate) name: String,
    pub(crate) sources: Vec<String>,
    pub(crate) on: Vec<String>,
    pub(crate) when: Option<Expression>,
    pub(crate) send: Vec<SendDef>,
    pub(crate) on_rejected: Vec<SendDef>,
}

/// One `send` or `on_rejected` entry.
#[derive(Debug)]
pub(crate) struct SendDef {
    pub(crate) aggregate: String,
    pub(crate) id: Expression,
    pub(crate) command: String,
    pub(crate) body: Vec<(String, Body)>,
}

/// A body field: an expression, or a table of fields (for commands whose
/// schema wants nested objects).
#[derive(Debug)]
pub(crate) enum Body {
    Expr(Expression),
    Table(Vec<(String, Body)>),
}

/// A command a policy decided to send, with its target.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedCommand {
    pub aggregate: String,
    pub id: String,
    pub command: String,
    pub body: Json,
}

impl Policy {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The aggregate types whose events the policy reads.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// Whether an event of this type is one the policy reacts to.
    pub fn handles(&self, event_type: &str) -> bool {
        self.on.iter().any(|e| e == event_type)
    }

    /// The number of `send` entries: the idempotency key of the `n`-th
    /// `on_rejected` command of the send `i` is numbered after them.
    pub fn sends(&self) -> usize {
        self.send.len()
    }

    pub fn has_on_rejected(&self) -> bool {
        !self.on_rejected.is_empty()
    }

    /// The `on_rejected` entries per rejected send.
    pub fn rejected_sends(&self) -> usize {
        self.on_rejected.len()
    }

    /// The commands one event sends, in order: none when `when` says no.
    pub fn plan(
        &self,
        event: &EventInput<'_>,
        aggregate_type: &str,
    ) -> Result<Vec<PlannedCommand>, ApplyError> {
        let vars = event_vars(event, aggregate_type, None);
        if let Some(when) = &self.when {
            let go = when
                .eval_bool(&vars)
                .map_err(|reason| ApplyError::Evaluation {
                    place: format!("policies.{}.when", self.name),
                    reason,
                })?;
            if !go {
                return Ok(Vec::new());
            }
        }
        self.evaluate("send", &self.send, &vars)
    }

    /// The commands sent when a send of this event was rejected, with the
    /// `rejection` variable bound (`status`, `detail`, `aggregate`, `id`,
    /// `command`).
    pub fn plan_rejected(
        &self,
        event: &EventInput<'_>,
        aggregate_type: &str,
        rejection: &Json,
    ) -> Result<Vec<PlannedCommand>, ApplyError> {
        let vars = event_vars(event, aggregate_type, Some(rejection));
        self.evaluate("on_rejected", &self.on_rejected, &vars)
    }

    fn evaluate(
        &self,
        what: &str,
        entries: &[SendDef],
        vars: &Vars<'_>,
    ) -> Result<Vec<PlannedCommand>, ApplyError> {
        entries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let place = format!("policies.{}.{what}[{i}]", self.name);
                let id = match entry.id.eval_json(vars) {
                    Ok(Json::String(id)) => id,
                    // An integer id is the digits a client would write in the URL.
                    Ok(Json::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
                    Ok(other) => {
                        return Err(ApplyError::Evaluation {
                            place: format!("{place}.id"),
                            reason: format!("expected a string, got {other}"),
                        });
                    }
                    Err(reason) => {
                        return Err(ApplyError::Evaluation {
                            place: format!("{place}.id"),
                            reason,
                        });
                    }
                };
                let body = eval_body(&entry.body, vars, &format!("{place}.body"))?;
                Ok(PlannedCommand {
                    aggregate: entry.aggregate.clone(),
                    id,
                    command: entry.command.clone(),
                    body,
                })
            })
            .collect()
    }
}

/// A policy's variables: the event (with its aggregate id as `id`) and, in
/// `on_rejected`, the rejection.
fn event_vars<'a>(
    event: &EventInput<'a>,
    aggregate_type: &'a str,
    rejection: Option<&'a Json>,
) -> Vars<'a> {
    Vars {
        event: Some(EventVar {
            input: *event,
            aggregate_type,
        }),
        id: Some(event.aggregate_id),
        rejection,
        ..Vars::default()
    }
}

fn eval_body(fields: &[(String, Body)], vars: &Vars<'_>, place: &str) -> Result<Json, ApplyError> {
    let mut out = serde_json::Map::new();
    for (field, body) in fields {
        let at = format!("{place}.{field}");
        let value = match body {
            Body::Expr(expression) => expression
                .eval_json(vars)
                .map_err(|reason| ApplyError::Evaluation { place: at, reason })?,
            Body::Table(inner) => eval_body(inner, vars, &at)?,
        };
        out.insert(field.clone(), value);
    }
    Ok(Json::Object(out))
}
