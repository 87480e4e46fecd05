//! Loading the `[policies.<name>]` sections of a domain file (DESIGN.md
//! §3.2), once aggregates and projections are known: every aggregate,
//! command, event and variable a policy names is checked here, with its place.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value as Json;

use super::aggregate::Aggregate;
use super::expr::Var;
use super::load::{Problems, sources_events};
use super::policy::{Body, Policy, SendDef};
use super::projection::Projection;

/// A policy's `when`, ids and bodies see the event (and its aggregate id);
/// `on_rejected` sees the rejection too. Neither sees a state or a document:
/// a policy decides from the event alone, the command side decides the rest.
const POLICY_VARS: &[Var] = &[Var::Event, Var::Id];
const REJECTED_VARS: &[Var] = &[Var::Event, Var::Id, Var::Rejection];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    source: Vec<String>,
    on: Vec<String>,
    when: Option<String>,
    #[serde(default)]
    send: Vec<toml::Value>,
    #[serde(default)]
    on_rejected: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSend {
    aggregate: String,
    id: String,
    command: String,
    #[serde(default)]
    body: toml::Table,
}

pub(crate) fn load_policies(
    p: &mut Problems,
    raw: toml::Table,
    aggregates: &BTreeMap<String, Aggregate>,
    projections: &BTreeMap<String, Projection>,
) -> BTreeMap<String, Policy> {
    let mut policies = BTreeMap::new();
    for (name, value) in raw {
        let place = format!("policies.{name}");
        let mut ok = p.name(&place, &name);
        // Policies and projections share /admin/projections and the view
        // store's trees, so their names must differ.
        if projections.contains_key(&name) {
            p.add(
                &place,
                format!("a projection is also named `{name}`; policies and projections need distinct names"),
            );
            ok = false;
        }
        if let Some(policy) = load_policy(p, &place, &name, value, aggregates)
            && ok
        {
            policies.insert(name, policy);
        }
    }
    policies
}

fn load_policy(
    p: &mut Problems,
    place: &str,
    name: &str,
    value: toml::Value,
    aggregates: &BTreeMap<String, Aggregate>,
) -> Option<Policy> {
    let raw: RawPolicy = p.item(place, value)?;
    let known = sources_events(p, place, &raw.source, aggregates);
    if raw.on.is_empty() {
        p.add(format!("{place}.on"), "at least one event type is needed");
    }
    for (i, event) in raw.on.iter().enumerate() {
        if !known.contains(event) {
            p.add(
                format!("{place}.on[{i}]"),
                format!("no source aggregate of `{name}` has an event `{event}`"),
            );
        }
    }
    let when = match &raw.when {
        Some(source) => p.expr(&format!("{place}.when"), source, POLICY_VARS),
        None => None,
    };
    if raw.send.is_empty() {
        p.add(
            format!("{place}.send"),
            "at least one [[...send]] entry is needed",
        );
    }
    let send = load_sends(p, place, "send", raw.send, aggregates, POLICY_VARS);
    let on_rejected = load_sends(
        p,
        place,
        "on_rejected",
        raw.on_rejected,
        aggregates,
        REJECTED_VARS,
    );
    Some(Policy {
        name: name.to_owned(),
        sources: raw.source,
        on: raw.on,
        when,
        send,
        on_rejected,
    })
}

fn load_sends(
    p: &mut Problems,
    place: &str,
    what: &str,
    raw: Vec<toml::Value>,
    aggregates: &BTreeMap<String, Aggregate>,
    vars: &[Var],
) -> Vec<SendDef> {
    let mut out = Vec::new();
    for (i, value) in raw.into_iter().enumerate() {
        let at = format!("{place}.{what}[{i}]");
        let Some(send) = p.item::<RawSend>(&at, value) else {
            continue;
        };
        let schema = match aggregates.get(&send.aggregate) {
            None => {
                p.add(
                    format!("{at}.aggregate"),
                    format!("no aggregate named `{}`", send.aggregate),
                );
                None
            }
            Some(aggregate) => match aggregate.commands.get(&send.command) {
                None => {
                    p.add(
                        format!("{at}.command"),
                        format!(
                            "aggregate `{}` has no command `{}`",
                            send.aggregate, send.command
                        ),
                    );
                    None
                }
                Some(command) => Some(command.schema()),
            },
        };
        let id = p.expr(&format!("{at}.id"), &send.id, vars);
        let body_place = format!("{at}.body");
        // The fields as written, whether or not their expressions compile.
        let fields: Vec<String> = send.body.keys().cloned().collect();
        let body = load_body(p, &body_place, send.body, vars);
        if let Some(Some(schema)) = schema {
            check_fields(p, &body_place, &fields, schema);
        }
        if let Some(id) = id {
            out.push(SendDef {
                aggregate: send.aggregate,
                id,
                command: send.command,
                body,
            });
        }
    }
    out
}

fn load_body(
    p: &mut Problems,
    place: &str,
    table: toml::Table,
    vars: &[Var],
) -> Vec<(String, Body)> {
    let mut out = Vec::new();
    for (field, value) in table {
        let at = format!("{place}.{field}");
        match value {
            toml::Value::String(source) => {
                if let Some(e) = p.expr(&at, &source, vars) {
                    out.push((field, Body::Expr(e)));
                }
            }
            toml::Value::Table(inner) => {
                out.push((field, Body::Table(load_body(p, &at, inner, vars))));
            }
            other => p.add(
                &at,
                format!(
                    "expected a CEL expression (a string) or a table, found {}; write literals in CEL, e.g. \"'text'\" or \"1\"",
                    other.type_str()
                ),
            ),
        }
    }
    out
}

/// What a command's schema says about the top level of a body, checked at
/// load time so a misspelt field is an error here rather than a quarantined
/// event later: every required field is given, and with
/// `additionalProperties = false` no other field is.
fn check_fields(p: &mut Problems, place: &str, fields: &[String], schema: &Json) {
    let given = |field: &str| fields.iter().any(|f| f == field);
    if let Some(required) = schema.get("required").and_then(Json::as_array) {
        for field in required.iter().filter_map(Json::as_str) {
            if !given(field) {
                p.add(
                    place,
                    format!("the command's schema requires field `{field}`"),
                );
            }
        }
    }
    if schema.get("additionalProperties") == Some(&Json::Bool(false)) {
        let properties = schema.get("properties").and_then(Json::as_object);
        for field in fields {
            if !properties.is_some_and(|props| props.contains_key(field)) {
                p.add(
                    format!("{place}.{field}"),
                    format!("the command's schema has no field `{field}`"),
                );
            }
        }
    }
}
