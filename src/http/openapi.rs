//! `/openapi.json` for the loaded domain (DESIGN.md §4).
//!
//! The handlers' descriptions, derived by utoipa, are templates: one generic
//! operation per route (`/commands/{aggregate}/{id}/{command}`, ...). Here
//! each template becomes one operation per name the domain declares, with
//! the domain's schemas, parameters and enums, so a client generated from the
//! document is typed for the domain and a fuzzer sends requests for names
//! that exist. The routes themselves stay generic; only the document names
//! what exists. Then [`secure`] adds what the server's current security
//! settings ask for.
//!
//! The document is plain JSON by then: a domain's schemas are JSON already,
//! and utoipa's typed model has no place for a schema written elsewhere.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::domain::{Aggregate, Command, Domain, MeasureKind, ProjectionKind, SearchFieldKind};

const COMMAND: &str = "/commands/{aggregate}/{id}/{command}";
const AGGREGATE: &str = "/aggregates/{aggregate}/{id}";
const HISTORY: &str = "/aggregates/{aggregate}/{id}/events";
const DOCUMENT: &str = "/views/{view}/{key}";
const LIST: &str = "/views/{view}";
const AGGREGATION: &str = "/aggregations/{name}";
const SEARCH: &str = "/search/{name}";
const STREAM: &str = "/events/stream";
const REBUILD: &str = "/admin/projections/{name}/rebuild";
const MOVE_POSITION: &str = "/admin/projections/{name}/position";

/// Query parameters the search route reads itself: a search field of one of
/// these names cannot be used as a filter, so it gets no parameter.
const SEARCH_PARAMETERS: [&str; 4] = ["q", "limit", "cursor", "consistent_with"];

const PROBLEM_REF: &str = "#/components/schemas/Problem";

/// Replaces the generic routes' operations of `document` with one operation
/// per command, aggregate, view, aggregation and search of `domain`. A
/// generic route whose template is missing (a router without it) is skipped.
pub(crate) fn describe_domain(document: &mut Value, domain: &Domain) {
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let mut take = |path: &str, method: &str| paths.remove(path).map(|item| item[method].clone());
    let templates = Templates {
        command: take(COMMAND, "post"),
        aggregate: take(AGGREGATE, "get"),
        history: take(HISTORY, "get"),
        document: take(DOCUMENT, "get"),
        list: take(LIST, "get"),
        aggregation: take(AGGREGATION, "get"),
        search: take(SEARCH, "get"),
    };
    let generic = document
        .pointer("/components/schemas")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = Described {
        schema_names: Names::new(generic.keys().cloned()),
        operation_ids: Names::new(operation_ids(document)),
        generic,
        paths: Map::new(),
        schemas: Map::new(),
        tags: BTreeMap::new(),
    };
    for aggregate in domain.aggregates() {
        out.aggregate(&templates, aggregate);
    }
    out.projections(&templates, domain);

    if let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) {
        if let Some(stream) = paths.get_mut(STREAM).and_then(|item| item.get_mut("get")) {
            let aggregates: Vec<&str> = domain.aggregates().map(Aggregate::name).collect();
            if !aggregates.is_empty() {
                set_parameter_schema(
                    stream,
                    "aggregate",
                    json!({"type": "string", "enum": aggregates}),
                );
            }
        }
        if let Some(rebuild) = paths.get_mut(REBUILD).and_then(|item| item.get_mut("post")) {
            let names: Vec<&str> = domain.projections().map(|p| p.name()).collect();
            if !names.is_empty() {
                set_parameter_schema(rebuild, "name", json!({"type": "string", "enum": names}));
            }
        }
        // Only a policy's position moves.
        if let Some(moves) = paths
            .get_mut(MOVE_POSITION)
            .and_then(|item| item.get_mut("post"))
        {
            let names: Vec<&str> = domain.policies().map(|p| p.name()).collect();
            if !names.is_empty() {
                set_parameter_schema(moves, "name", json!({"type": "string", "enum": names}));
            }
        }
        paths.append(&mut out.paths);
    }
    let schemas = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut);
    if let Some(schemas) = schemas {
        schemas.append(&mut out.schemas);
    }
    let mut tags: Vec<Value> = out
        .tags
        .into_iter()
        .map(|(name, description)| json!({"name": name, "description": description.join("; ")}))
        .collect();
    for (name, description) in [
        ("events", "The live event stream"),
        ("admin", "Projection administration"),
        ("operations", "Probes, metrics and this document"),
    ] {
        tags.push(json!({"name": name, "description": description}));
    }
    document["tags"] = Value::Array(tags);
    prune_schemas(document);
}

/// The generic operations, each a template for the domain's names.
struct Templates {
    command: Option<Value>,
    aggregate: Option<Value>,
    history: Option<Value>,
    document: Option<Value>,
    list: Option<Value>,
    aggregation: Option<Value>,
    search: Option<Value>,
}

/// What the domain adds to the document.
struct Described {
    /// The generic component schemas, which the domain's ones start from.
    generic: Map<String, Value>,
    schema_names: Names,
    operation_ids: Names,
    paths: Map<String, Value>,
    schemas: Map<String, Value>,
    /// Tag name → what it groups (a name may be an aggregate and a projection).
    tags: BTreeMap<String, Vec<String>>,
}

impl Described {
    fn tag(&mut self, name: &str, description: String) {
        self.tags
            .entry(name.to_owned())
            .or_default()
            .push(description);
    }

    /// A schema added under a new name (the first free candidate); the `$ref` to it.
    fn add_schema(&mut self, candidates: &[String], schema: impl FnOnce(&str) -> Value) -> Value {
        let name = self.schema_names.claim(candidates);
        let value = schema(&name);
        self.schemas.insert(name.clone(), value);
        schema_ref(&name)
    }

    /// A generic component schema with some of its properties replaced.
    fn generic_with(&self, name: &str, properties: Value) -> Value {
        let mut schema = self
            .generic
            .get(name)
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"}));
        if let (Some(target), Value::Object(replaced)) = (
            schema.get_mut("properties").and_then(Value::as_object_mut),
            properties,
        ) {
            for (key, value) in replaced {
                target.insert(key, value);
            }
        }
        schema
    }

    /// One operation per command, the aggregate's state and its history.
    fn aggregate(&mut self, templates: &Templates, aggregate: &Aggregate) {
        let name = aggregate.name();
        let type_name = pascal(name);
        self.tag(
            name,
            format!("Commands, state and history of the `{name}` aggregate"),
        );
        let get_id = self.operation_ids.claim(&[format!("get{type_name}")]);
        let history_id = self.operation_ids.claim(&[format!("get{type_name}Events")]);
        let command_ids: Vec<(&Command, String)> = aggregate
            .command_names()
            .filter_map(|command| aggregate.command(command))
            .map(|command| {
                let id = self.operation_ids.claim(&[
                    format!("{}{type_name}", camel(command.name())),
                    format!("{}{}", camel(name), pascal(command.name())),
                ]);
                (command, id)
            })
            .collect();
        let events = self.event_schemas(aggregate);

        // Every command's reply names the aggregate id, which every other
        // operation on the aggregate takes: links let a client (and a
        // stateful fuzzer) follow one aggregate through its life.
        let mut links = Map::new();
        for (_, id) in &command_ids {
            links.insert(id.clone(), link(id, "id"));
        }
        links.insert(get_id.clone(), link(&get_id, "id"));
        links.insert(history_id.clone(), link(&history_id, "id"));

        if let Some(template) = &templates.command {
            for (command, operation_id) in &command_ids {
                let command_name = command.name();
                let command_type = pascal(command_name);
                let body = self.command_schema(
                    &format!("{type_name}{command_type}Command"),
                    command.schema().unwrap_or(&json!({})),
                );
                let reply = self.reply_schema(aggregate, command, &events);
                let reply =
                    self.add_schema(&[format!("{type_name}{command_type}Reply")], |_| reply);
                let mut operation = specialise(
                    template,
                    &["aggregate", "command"],
                    operation_id,
                    name,
                    &format!("Runs `{command_name}` on the `{name}` aggregate `id`"),
                );
                operation["requestBody"] = json!({
                    "required": true,
                    "content": {"application/json": {"schema": body}},
                });
                set_ok_schema(&mut operation, reply);
                if let Some(responses) = operation["responses"].as_object_mut() {
                    // The aggregate type and command exist; a new id is a new aggregate.
                    responses.remove("404");
                    if let Some(ok) = responses.get_mut("200") {
                        ok["links"] = Value::Object(links.clone());
                    }
                }
                self.paths.insert(
                    format!("/commands/{name}/{{id}}/{command_name}"),
                    json!({"post": operation}),
                );
            }
        }

        if let Some(template) = &templates.aggregate {
            let state = self.add_schema(&[format!("{type_name}State")], |_| {
                state_schema(aggregate.initial_state())
            });
            let response = self.generic_with(
                "AggregateResponse",
                json!({"aggregate": constant(name), "state": state}),
            );
            let response = self.add_schema(std::slice::from_ref(&type_name), |_| response);
            let mut operation = specialise(
                template,
                &["aggregate"],
                &get_id,
                name,
                &format!("The current state and version of the `{name}` aggregate `id`"),
            );
            set_ok_schema(&mut operation, response);
            set_response_description(
                &mut operation,
                "404",
                "No such aggregate: no command was accepted for this id",
            );
            self.paths.insert(
                format!("/aggregates/{name}/{{id}}"),
                json!({"get": operation}),
            );
        }

        if let Some(template) = &templates.history {
            let names: Vec<&str> = aggregate.event_names().collect();
            let mut event = self.generic_with("HistoryEvent", json!({}));
            if !names.is_empty() {
                event["properties"]["type"] = json!({"type": "string", "enum": names});
            }
            let event = self.add_schema(&[format!("{type_name}HistoryEvent")], |_| event);
            let history = self.generic_with(
                "HistoryResponse",
                json!({"aggregate": constant(name), "events": {"type": "array", "items": event}}),
            );
            let history = self.add_schema(&[format!("{type_name}History")], |_| history);
            let mut operation = specialise(
                template,
                &["aggregate"],
                &history_id,
                name,
                &format!("The events of the `{name}` aggregate `id`, oldest first"),
            );
            set_ok_schema(&mut operation, history);
            set_response_description(
                &mut operation,
                "404",
                "No such aggregate: no command was accepted for this id",
            );
            self.paths.insert(
                format!("/aggregates/{name}/{{id}}/events"),
                json!({"get": operation}),
            );
        }
    }

    /// A command's JSON Schema as a component; the `$ref` to it. Its
    /// definitions (`$defs`, or draft 7's `definitions`) become components
    /// of their own, as generators expect, and its local references
    /// (`#/...`) are pointed at the same places in the document. A schema
    /// with an `$id` of its own resolves its references itself and is kept
    /// as written.
    fn command_schema(&mut self, name: &str, schema: &Value) -> Value {
        let name = self.schema_names.claim(&[name.to_owned()]);
        let base = format!("#/components/schemas/{name}");
        let mut schema = schema.clone();
        if mentions_key(&schema, &["$id"]) {
            self.schemas.insert(name.clone(), schema);
            return schema_ref(&name);
        }
        let mut moved = Vec::new();
        let mut targets = Vec::new();
        for keyword in ["$defs", "definitions"] {
            let Some(Value::Object(definitions)) =
                schema.as_object_mut().and_then(|map| map.remove(keyword))
            else {
                continue;
            };
            for (definition, value) in definitions {
                let component = self
                    .schema_names
                    .claim(&[format!("{name}{}", pascal(&definition))]);
                targets.push((
                    format!("#/{keyword}/{definition}"),
                    format!("#/components/schemas/{component}"),
                ));
                moved.push((component, value));
            }
        }
        rebase_refs(&mut schema, &base, &targets);
        self.schemas.insert(name.clone(), schema);
        for (component, mut value) in moved {
            rebase_refs(&mut value, &base, &targets);
            self.schemas.insert(component, value);
        }
        schema_ref(&name)
    }

    /// The schema of each event type the aggregate's commands emit, as a
    /// command reply carries it: its data has exactly the fields of its
    /// `emit` entries; a field that only copies a command field has that
    /// field's schema. Event type → `$ref`.
    fn event_schemas(&mut self, aggregate: &Aggregate) -> BTreeMap<String, Value> {
        // Per event type, per emit entry: field → schema it copies, if any.
        let mut emits: BTreeMap<&str, Vec<BTreeMap<&str, Value>>> = BTreeMap::new();
        for command in aggregate
            .command_names()
            .filter_map(|command| aggregate.command(command))
        {
            for emit in command.emits() {
                let fields = emit
                    .fields
                    .iter()
                    .map(|(field, copied)| {
                        let schema = copied
                            .and_then(|copied| command.schema()?.get("properties")?.get(copied))
                            .filter(|schema| !mentions_key(schema, &["$ref", "$dynamicRef"]))
                            .cloned()
                            .unwrap_or_else(|| json!({}));
                        (*field, schema)
                    })
                    .collect();
                emits.entry(emit.event).or_default().push(fields);
            }
        }
        let type_name = pascal(aggregate.name());
        let mut refs = BTreeMap::new();
        for (event, entries) in emits {
            let mut properties: BTreeMap<&str, Value> = BTreeMap::new();
            for (field, schema) in entries.iter().flatten() {
                match properties.get(field) {
                    // Two entries that disagree say nothing about the value.
                    Some(known) if known != schema => {
                        properties.insert(field, json!({}));
                    }
                    Some(_) => {}
                    None => {
                        properties.insert(field, schema.clone());
                    }
                }
            }
            let required: Vec<&str> = properties
                .keys()
                .copied()
                .filter(|field| entries.iter().all(|entry| entry.contains_key(field)))
                .collect();
            let event_type = pascal(event);
            let schema = json!({
                "type": "object",
                "description": format!("The event `{event}` of the `{}` aggregate", aggregate.name()),
                "required": ["type", "version", "data"],
                "properties": {
                    "type": constant(event),
                    "version": {"type": "integer", "minimum": 1, "description": "The aggregate's version after this event"},
                    "data": {
                        "type": "object",
                        "required": required,
                        "additionalProperties": false,
                        "properties": properties,
                    },
                },
            });
            let reference = self.add_schema(
                &[event_type.clone(), format!("{type_name}{event_type}")],
                |_| schema,
            );
            refs.insert(event.to_owned(), reference);
        }
        refs
    }

    /// A command's reply: the generic reply whose `events` are the event
    /// types this command emits, as many as its `emit` entries at most and as
    /// its unconditional ones at least.
    fn reply_schema(
        &self,
        aggregate: &Aggregate,
        command: &Command,
        events: &BTreeMap<String, Value>,
    ) -> Value {
        let emits: Vec<_> = command.emits().collect();
        let types: BTreeSet<&str> = emits.iter().map(|emit| emit.event).collect();
        let unconditional = emits.iter().filter(|emit| !emit.conditional).count();
        let mut list = json!({
            "type": "array",
            "minItems": unconditional,
            "maxItems": emits.len(),
        });
        let variants: Vec<Value> = types
            .iter()
            .filter_map(|event| events.get(*event).cloned())
            .collect();
        if !variants.is_empty() {
            let mapping: Map<String, Value> = types
                .iter()
                .filter_map(|event| {
                    let reference = events.get(*event)?.get("$ref")?.clone();
                    Some(((*event).to_owned(), reference))
                })
                .collect();
            list["items"] = json!({
                "oneOf": variants,
                "discriminator": {"propertyName": "type", "mapping": mapping},
            });
        }
        self.generic_with(
            "CommandResponse",
            json!({"aggregate": constant(aggregate.name()), "events": list}),
        )
    }

    /// The operations of every view, aggregation and search.
    fn projections(&mut self, templates: &Templates, domain: &Domain) {
        // A search's hits are its view's documents: every view's document
        // schema first, whatever order the projections come in.
        let mut documents = BTreeMap::new();
        for projection in domain.projections() {
            if let ProjectionKind::View(view) = projection.kind() {
                let name = projection.name();
                let properties: Map<String, Value> =
                    view.fields().map(|f| (f.to_owned(), json!({}))).collect();
                let doc = json!({
                    "type": "object",
                    "description": format!("A document of the `{name}` view"),
                    "properties": properties,
                });
                let doc = self.add_schema(&[format!("{}Doc", pascal(name))], |_| doc);
                documents.insert(name.to_owned(), doc);
            }
        }
        for projection in domain.projections() {
            let name = projection.name();
            let type_name = pascal(name);
            match projection.kind() {
                ProjectionKind::View(view) => {
                    let Some(doc) = documents.get(name).cloned() else {
                        continue;
                    };
                    self.tag(name, format!("The `{name}` view"));
                    let document = self.generic_with("ViewDocument", json!({"doc": doc}));
                    let document = self.add_schema(&[format!("{type_name}Document")], |_| document);
                    if let Some(template) = &templates.document {
                        let id = self
                            .operation_ids
                            .claim(&[format!("get{type_name}Document")]);
                        let mut operation = specialise(
                            template,
                            &["view"],
                            &id,
                            name,
                            &format!("One document of the `{name}` view"),
                        );
                        set_ok_schema(&mut operation, document.clone());
                        set_response_description(&mut operation, "404", "No such document");
                        self.paths
                            .insert(format!("/views/{name}/{{key}}"), json!({"get": operation}));
                    }
                    if let Some(template) = &templates.list {
                        let page = self.generic_with(
                            "ViewPage",
                            json!({"items": {"type": "array", "items": document}}),
                        );
                        let page = self.add_schema(&[format!("{type_name}Page")], |_| page);
                        let id = self.operation_ids.claim(&[format!("list{type_name}")]);
                        let mut operation = specialise(
                            template,
                            &["view"],
                            &id,
                            name,
                            &format!(
                                "Lists the `{name}` view, filtered and ordered by its indexed fields, a page at a time"
                            ),
                        );
                        operation["description"] = Value::String(
                            "Each `where.<field>` parameter keeps the documents whose indexed \
                             field equals its value (read as JSON when it parses, else as a \
                             string)."
                                .to_owned(),
                        );
                        let indexes = view.indexes();
                        if indexes.is_empty() {
                            remove_parameter(&mut operation, "order");
                        } else {
                            let orders: Vec<String> = indexes
                                .iter()
                                .flat_map(|field| [field.clone(), format!("-{field}")])
                                .collect();
                            set_parameter_schema(
                                &mut operation,
                                "order",
                                json!({"type": "string", "enum": orders}),
                            );
                        }
                        for field in indexes {
                            add_parameter(
                                &mut operation,
                                filter_parameter(
                                    &format!("where.{field}"),
                                    &format!("Only documents whose `{field}` equals this value"),
                                    json!({"type": "string"}),
                                ),
                            );
                        }
                        set_ok_schema(&mut operation, page);
                        remove_response(&mut operation, "404");
                        self.paths
                            .insert(format!("/views/{name}"), json!({"get": operation}));
                    }
                }
                ProjectionKind::Aggregation(aggregation) => {
                    let Some(template) = &templates.aggregation else {
                        continue;
                    };
                    self.tag(name, format!("The `{name}` aggregation"));
                    let mut properties = Map::new();
                    for field in aggregation.group_fields() {
                        properties.insert(field.clone(), json!({}));
                    }
                    for measure in aggregation.measures() {
                        let schema = match measure.kind {
                            MeasureKind::Count => json!({"type": "integer", "minimum": 1}),
                            MeasureKind::Sum => json!({"type": "number"}),
                            MeasureKind::Min | MeasureKind::Max | MeasureKind::Avg => {
                                json!({"type": ["number", "null"]})
                            }
                        };
                        properties.insert(measure.name.clone(), schema);
                    }
                    let required: Vec<&String> = properties.keys().collect();
                    let row = json!({
                        "type": "object",
                        "description": format!("One group of the `{name}` aggregation: its group fields and measures"),
                        "required": required,
                        "properties": properties,
                    });
                    let row = self.add_schema(&[format!("{type_name}Row")], |_| row);
                    let rows = self.generic_with(
                        "AggregationRows",
                        json!({"rows": {"type": "array", "items": row}}),
                    );
                    let rows = self.add_schema(&[format!("{type_name}Rows")], |_| rows);
                    let id = self.operation_ids.claim(&[format!("get{type_name}")]);
                    let mut operation = specialise(
                        template,
                        &["name"],
                        &id,
                        name,
                        &format!("The rows of the `{name}` aggregation"),
                    );
                    operation["description"] = Value::String(
                        "A group field parameter keeps only the groups with that value (read \
                         as JSON when it parses, else as a string)."
                            .to_owned(),
                    );
                    for field in aggregation.group_fields() {
                        if field == "consistent_with" {
                            continue;
                        }
                        add_parameter(
                            &mut operation,
                            filter_parameter(
                                field,
                                &format!("Only the groups whose `{field}` equals this value"),
                                json!({"type": "string"}),
                            ),
                        );
                    }
                    set_ok_schema(&mut operation, rows);
                    remove_response(&mut operation, "404");
                    self.paths
                        .insert(format!("/aggregations/{name}"), json!({"get": operation}));
                }
                ProjectionKind::Search(search) => {
                    let Some(template) = &templates.search else {
                        continue;
                    };
                    self.tag(name, format!("Full-text search `{name}`"));
                    let doc = documents
                        .get(search.view())
                        .cloned()
                        .unwrap_or_else(|| json!({"type": "object"}));
                    let hit = self.generic_with("SearchHitBody", json!({"doc": doc}));
                    let hit = self.add_schema(&[format!("{type_name}Hit")], |_| hit);
                    let hits = self.generic_with(
                        "SearchResponse",
                        json!({"hits": {"type": "array", "items": hit}}),
                    );
                    let hits = self.add_schema(&[format!("{type_name}Hits")], |_| hits);
                    let id = self.operation_ids.claim(&[format!("search{type_name}")]);
                    let mut operation = specialise(
                        template,
                        &["name"],
                        &id,
                        name,
                        &format!(
                            "Searches the documents of the `{}` view, best hits first",
                            search.view()
                        ),
                    );
                    let text: Vec<&str> = search
                        .fields()
                        .iter()
                        .filter(|(_, kind)| *kind == SearchFieldKind::Text)
                        .map(|(field, _)| field.as_str())
                        .collect();
                    if text.is_empty() {
                        remove_parameter(&mut operation, "q");
                    } else {
                        set_parameter_description(
                            &mut operation,
                            "q",
                            &format!(
                                "Query over the text fields ({}); empty matches everything",
                                text.join(", ")
                            ),
                        );
                    }
                    operation["description"] = Value::String(
                        "Each keyword or number field parameter keeps the hits whose field \
                         equals its value exactly."
                            .to_owned(),
                    );
                    for (field, kind) in search.fields() {
                        let schema = match kind {
                            SearchFieldKind::Text => continue,
                            SearchFieldKind::Keyword => json!({"type": "string"}),
                            SearchFieldKind::Number => json!({"type": "number"}),
                        };
                        if SEARCH_PARAMETERS.contains(&field.as_str()) {
                            continue;
                        }
                        add_parameter(
                            &mut operation,
                            filter_parameter(
                                field,
                                &format!("Only hits whose `{field}` equals this value"),
                                schema,
                            ),
                        );
                    }
                    set_ok_schema(&mut operation, hits);
                    remove_response(&mut operation, "404");
                    self.paths
                        .insert(format!("/search/{name}"), json!({"get": operation}));
                }
            }
        }
    }
}

/// Declares what the server's security settings ask of a client: with
/// tokens, the bearer scheme on every operation but the open ones, and the
/// 401 and 403 problems; the 429 of the rate limit on every operation that
/// is rate limited (all but the open ones), since a reload may turn the
/// limit on. The open operations are the probes, and `/metrics` when it is
/// public (see `guard::policy`). Added over the whole document, so no
/// operation can miss them.
pub(crate) fn secure(document: &mut Value, tokens: bool, metrics_public: bool) {
    if tokens {
        let components = &mut document["components"];
        if !components.is_object() {
            *components = json!({});
        }
        components["securitySchemes"] = json!({"bearer": {"type": "http", "scheme": "bearer"}});
        document["security"] = json!([{"bearer": []}]);
    }
    let problem = |description: &str| {
        let mut content = Map::new();
        content.insert(
            super::problem::PROBLEM_JSON.to_owned(),
            json!({"schema": schema_ref_to(PROBLEM_REF)}),
        );
        json!({"description": description, "content": content})
    };
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let open =
            matches!(path.as_str(), "/livez" | "/readyz") || (path == "/metrics" && metrics_public);
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (_, operation) in item.iter_mut() {
            if open {
                if tokens {
                    // An empty requirement: these answer without a token.
                    operation["security"] = json!([{}]);
                }
                continue;
            }
            let Some(responses) = operation
                .get_mut("responses")
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            let mut added = vec![("429", "Rate limit exceeded; see Retry-After")];
            if tokens {
                added.push(("401", "No valid bearer token"));
                added.push((
                    "403",
                    "The token lacks the role, or may not touch this aggregate or projection",
                ));
            }
            for (status, description) in added {
                responses
                    .entry(status.to_owned())
                    .or_insert_with(|| problem(description));
            }
        }
    }
}

/// Unique names: the first free candidate, else the last one with a number.
struct Names {
    taken: BTreeSet<String>,
}

impl Names {
    fn new(taken: impl IntoIterator<Item = String>) -> Names {
        Names {
            taken: taken.into_iter().collect(),
        }
    }

    fn claim(&mut self, candidates: &[String]) -> String {
        for candidate in candidates {
            if self.taken.insert(candidate.clone()) {
                return candidate.clone();
            }
        }
        let base = candidates.last().cloned().unwrap_or_default();
        (2u64..)
            .map(|n| format!("{base}{n}"))
            .find(|candidate| self.taken.insert(candidate.clone()))
            .unwrap_or(base)
    }
}

/// The operation ids `document` uses already.
fn operation_ids(document: &Value) -> Vec<String> {
    let mut ids = Vec::new();
    if let Some(paths) = document.get("paths").and_then(Value::as_object) {
        for item in paths.values().filter_map(Value::as_object) {
            for operation in item.values() {
                if let Some(id) = operation.get("operationId").and_then(Value::as_str) {
                    ids.push(id.to_owned());
                }
            }
        }
    }
    ids
}

/// `account_events` → `AccountEvents`: the domain's names as type names
/// (names are `[A-Za-z_][A-Za-z0-9_]*`, so this is all a generator needs).
fn pascal(name: &str) -> String {
    let joined: String = name
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    if joined.is_empty() {
        name.to_owned()
    } else {
        joined
    }
}

/// `account_events` → `accountEvents`.
fn camel(name: &str) -> String {
    let pascal = pascal(name);
    let mut chars = pascal.chars();
    chars
        .next()
        .map(|first| first.to_ascii_lowercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

fn schema_ref(name: &str) -> Value {
    schema_ref_to(&format!("#/components/schemas/{name}"))
}

fn schema_ref_to(target: &str) -> Value {
    json!({"$ref": target})
}

fn constant(value: &str) -> Value {
    json!({"type": "string", "const": value})
}

/// A link from a command reply to `operation_id`, whose `parameter` is the
/// reply's aggregate id.
fn link(operation_id: &str, parameter: &str) -> Value {
    json!({
        "operationId": operation_id,
        "parameters": {parameter: "$response.body#/id"},
    })
}

/// The state's shape from the initial state: every field is always there
/// (handlers may only set declared fields, never remove one), with the type
/// of its initial value. Numbers are `number`: integers stay integers, but
/// adding a decimal gives a decimal.
fn state_schema(initial: &Value) -> Value {
    let Some(fields) = initial.as_object() else {
        return json!({"type": "object"});
    };
    let properties: Map<String, Value> = fields
        .iter()
        .map(|(field, value)| {
            let schema = match value {
                Value::Null => json!({}),
                Value::Bool(_) => json!({"type": "boolean"}),
                Value::Number(_) => json!({"type": "number"}),
                Value::String(_) => json!({"type": "string"}),
                Value::Array(_) => json!({"type": "array"}),
                Value::Object(_) => json!({"type": "object"}),
            };
            (field.clone(), schema)
        })
        .collect();
    let required: Vec<&String> = fields.keys().collect();
    json!({
        "type": "object",
        "required": required,
        "additionalProperties": false,
        "properties": properties,
    })
}

/// Points the local references (`#` and `#/...`) of a schema written to
/// stand alone at their places in the document: a reference to one of
/// `moved` (a definition and its component) at that component, any other at
/// the same place under `base`, where the schema now is.
fn rebase_refs(value: &mut Value, base: &str, moved: &[(String, String)]) {
    match value {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(target)
                        if (key == "$ref" || key == "$dynamicRef")
                            && (target == "#" || target.starts_with("#/")) =>
                    {
                        let definition = moved.iter().find_map(|(from, to)| {
                            let rest = target.strip_prefix(from.as_str())?;
                            (rest.is_empty() || rest.starts_with('/'))
                                .then(|| format!("{to}{rest}"))
                        });
                        *target = definition.unwrap_or_else(|| format!("{base}{}", &target[1..]));
                    }
                    _ => rebase_refs(value, base, moved),
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| rebase_refs(item, base, moved)),
        _ => {}
    }
}

/// Whether any object inside `value` has one of `keys`.
fn mentions_key(value: &Value, keys: &[&str]) -> bool {
    match value {
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| keys.contains(&key.as_str()) || mentions_key(value, keys)),
        Value::Array(items) => items.iter().any(|item| mentions_key(item, keys)),
        _ => false,
    }
}

/// A template made one operation: the path parameters the concrete path
/// fixes removed, with its own id, tag and summary.
fn specialise(template: &Value, fixed: &[&str], id: &str, tag: &str, summary: &str) -> Value {
    let mut operation = template.clone();
    if let Some(parameters) = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        parameters.retain(|p| !(p["in"] == "path" && fixed.iter().any(|name| p["name"] == *name)));
    }
    operation["operationId"] = Value::String(id.to_owned());
    operation["tags"] = json!([tag]);
    operation["summary"] = Value::String(summary.to_owned());
    if let Some(map) = operation.as_object_mut() {
        map.remove("description");
    }
    operation
}

fn parameter_mut<'a>(operation: &'a mut Value, name: &str) -> Option<&'a mut Value> {
    operation
        .get_mut("parameters")?
        .as_array_mut()?
        .iter_mut()
        .find(|p| p["name"] == name)
}

fn set_parameter_schema(operation: &mut Value, name: &str, schema: Value) {
    if let Some(parameter) = parameter_mut(operation, name) {
        parameter["schema"] = schema;
    }
}

fn set_parameter_description(operation: &mut Value, name: &str, description: &str) {
    if let Some(parameter) = parameter_mut(operation, name) {
        parameter["description"] = Value::String(description.to_owned());
    }
}

fn remove_parameter(operation: &mut Value, name: &str) {
    if let Some(parameters) = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        parameters.retain(|p| p["name"] != name);
    }
}

/// An optional query parameter that filters on a field of the domain.
fn filter_parameter(name: &str, description: &str, schema: Value) -> Value {
    json!({
        "name": name,
        "in": "query",
        "required": false,
        "description": description,
        "schema": schema,
    })
}

fn add_parameter(operation: &mut Value, parameter: Value) {
    match operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        Some(parameters) => parameters.push(parameter),
        None => operation["parameters"] = json!([parameter]),
    }
}

/// Points the 200 answer's JSON body at `schema`.
fn set_ok_schema(operation: &mut Value, schema: Value) {
    if let Some(content) = operation
        .pointer_mut("/responses/200/content/application~1json")
        .and_then(Value::as_object_mut)
    {
        content.insert("schema".to_owned(), schema);
    }
}

fn set_response_description(operation: &mut Value, status: &str, description: &str) {
    if let Some(response) = operation
        .get_mut("responses")
        .and_then(|responses| responses.get_mut(status))
    {
        response["description"] = Value::String(description.to_owned());
    }
}

/// Drops an answer the concrete operation cannot give (a 404 for a name
/// that now exists).
fn remove_response(operation: &mut Value, status: &str) {
    if let Some(responses) = operation
        .get_mut("responses")
        .and_then(Value::as_object_mut)
    {
        responses.remove(status);
    }
}

/// Removes the component schemas nothing refers to any more (the generic
/// ones the domain's replaced), so a generator makes no types for them.
fn prune_schemas(document: &mut Value) {
    const PREFIX: &str = "#/components/schemas/";
    fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match value {
                        Value::String(target) if key == "$ref" => {
                            if let Some(rest) = target.strip_prefix(PREFIX) {
                                found.push(rest.split('/').next().unwrap_or(rest));
                            }
                        }
                        _ => refs(value, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| refs(item, found)),
            _ => {}
        }
    }
    let Some(schemas) = document
        .pointer("/components/schemas")
        .and_then(Value::as_object)
    else {
        return;
    };
    let mut pending = Vec::new();
    if let Some(paths) = document.get("paths") {
        refs(paths, &mut pending);
    }
    let mut used: BTreeSet<String> = BTreeSet::new();
    while let Some(name) = pending.pop() {
        if used.insert(name.to_owned())
            && let Some(schema) = schemas.get(name)
        {
            refs(schema, &mut pending);
        }
    }
    // The problem document is what every error is; the security answers
    // added later refer to it too.
    used.insert("Problem".to_owned());
    if let Some(schemas) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        schemas.retain(|name, _| used.contains(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_type_and_method_names() {
        assert_eq!(pascal("daily_flows"), "DailyFlows");
        assert_eq!(pascal("AccountOpened"), "AccountOpened");
        assert_eq!(pascal("_"), "_");
        assert_eq!(camel("open"), "open");
        assert_eq!(camel("Close_all"), "closeAll");
    }

    #[test]
    fn names_are_unique() {
        let mut names = Names::new(["Problem".to_owned()]);
        assert_eq!(
            names.claim(&["Problem".to_owned(), "AccountProblem".to_owned()]),
            "AccountProblem"
        );
        assert_eq!(
            names.claim(&["AccountProblem".to_owned()]),
            "AccountProblem2"
        );
        assert_eq!(names.claim(&["AB".to_owned()]), "AB");
        assert_eq!(names.claim(&["AB".to_owned()]), "AB2");
    }

    #[test]
    fn local_references_follow_the_schema_into_the_components() {
        let mut described = Described {
            generic: Map::new(),
            schema_names: Names::new(["Problem".to_owned()]),
            operation_ids: Names::new([]),
            paths: Map::new(),
            schemas: Map::new(),
            tags: BTreeMap::new(),
        };
        let schema = json!({
            "$defs": {"amount": {"type": "number"}, "pair": {"items": {"$ref": "#/$defs/amount"}}},
            "properties": {
                "a": {"$ref": "#/$defs/amount"},
                "p": {"$ref": "#/$defs/pair"},
                "b": {"$ref": "#"},
                "c": {"$ref": "https://example.org/other.json"},
                "d": {"$ref": "#/properties/a"},
                "$ref": {"type": "string"},
            },
        });
        let reference = described.command_schema("PayCommand", &schema);
        assert_eq!(
            reference,
            json!({"$ref": "#/components/schemas/PayCommand"})
        );
        let schemas = &described.schemas;
        let rebased = &schemas["PayCommand"];
        assert!(rebased.get("$defs").is_none());
        let properties = &rebased["properties"];
        assert_eq!(
            properties["a"]["$ref"],
            "#/components/schemas/PayCommandAmount"
        );
        assert_eq!(
            properties["p"]["$ref"],
            "#/components/schemas/PayCommandPair"
        );
        assert_eq!(properties["b"]["$ref"], "#/components/schemas/PayCommand");
        assert_eq!(properties["c"]["$ref"], "https://example.org/other.json");
        assert_eq!(
            properties["d"]["$ref"],
            "#/components/schemas/PayCommand/properties/a"
        );
        assert_eq!(properties["$ref"], json!({"type": "string"}));
        assert_eq!(schemas["PayCommandAmount"], json!({"type": "number"}));
        assert_eq!(
            schemas["PayCommandPair"]["items"]["$ref"],
            "#/components/schemas/PayCommandAmount"
        );

        let with_id =
            json!({"$id": "urn:x", "$defs": {"a": {}}, "properties": {"a": {"$ref": "#/$defs/a"}}});
        described.command_schema("Other", &with_id);
        assert_eq!(described.schemas["Other"], with_id);
    }

    #[test]
    fn security_is_declared_only_with_tokens() {
        let document = json!({
            "paths": {
                "/livez": {"get": {"responses": {"200": {"description": "ok"}}}},
                "/metrics": {"get": {"responses": {"200": {"description": "ok"}}}},
                "/views/a": {"get": {"responses": {"200": {"description": "ok"}}}},
            },
            "components": {"schemas": {}},
        });
        let mut open = document.clone();
        secure(&mut open, false, false);
        assert!(open.get("security").is_none());
        assert!(open["components"].get("securitySchemes").is_none());
        let responses = &open["paths"]["/views/a"]["get"]["responses"];
        assert!(responses["429"].is_object() && responses.get("401").is_none());
        assert!(open["paths"]["/livez"]["get"].get("security").is_none());

        let mut guarded = document.clone();
        secure(&mut guarded, true, true);
        assert_eq!(guarded["security"], json!([{"bearer": []}]));
        assert_eq!(
            guarded["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let responses = &guarded["paths"]["/views/a"]["get"]["responses"];
        assert!(responses["401"].is_object() && responses["403"].is_object());
        for open in ["/livez", "/metrics"] {
            assert_eq!(
                guarded["paths"][open]["get"]["security"],
                json!([{}]),
                "{open}"
            );
            assert!(
                guarded["paths"][open]["get"]["responses"]
                    .get("401")
                    .is_none()
            );
        }
        let mut private_metrics = document;
        secure(&mut private_metrics, true, false);
        assert!(private_metrics["paths"]["/metrics"]["get"]["responses"]["401"].is_object());
    }
}
