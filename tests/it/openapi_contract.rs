//! `/openapi.json`: the regression tests for the mismatches schemathesis
//! found between the document and what the server does (issue 7), and the
//! document typed for the domain (issue 16), pinned for the bank example and
//! for the shop domain of `openapi_shop.toml`, and checked against real
//! answers.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Process, ProcessOptions, client, command, get_json};

/// The second domain: see the file's header for what it exercises.
pub const SHOP_DOMAIN: &str = include_str!("openapi_shop.toml");

fn parameter<'a>(document: &'a Value, path: &str, method: &str, name: &str) -> &'a Value {
    document["paths"][path][method]["parameters"]
        .as_array()
        .unwrap_or_else(|| panic!("{method} {path} has no parameters"))
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"))
}

#[tokio::test]
async fn the_document_describes_what_the_server_answers() {
    let daemon = Process::start(ProcessOptions::default());
    let doc = get_json(&client(), &daemon.url("/openapi.json")).await;
    let command = "/commands/account/{id}/open";

    // Optional headers are strings, never null: a client sending the text
    // "null" as If-Match gets a 400, so null must not be a valid value.
    for header in ["If-Match", "Idempotency-Key"] {
        let schema = &parameter(&doc, command, "post", header)["schema"];
        assert_eq!(schema["type"], "string", "{header}: {schema}");
        assert!(schema["pattern"].is_string(), "{header}: {schema}");
    }
    let last_event_id = &parameter(&doc, "/events/stream", "get", "Last-Event-ID")["schema"];
    assert_eq!(last_event_id["type"], "string");

    // Answers the server gives that were undocumented.
    let responses = |path: &str, method: &str| doc["paths"][path][method]["responses"].clone();
    assert!(responses(command, "post")["415"].is_object());
    for path in [
        "/aggregates/account/{id}",
        "/aggregates/account/{id}/events",
    ] {
        assert!(responses(path, "get")["400"].is_object(), "{path}");
        let id = &parameter(&doc, path, "get", "id")["schema"];
        assert!(id["pattern"].is_string(), "{path}: {id}");
    }

    // Limits the server enforces with a 400.
    for (path, name, max) in [
        ("/aggregates/account/{id}/events", "limit", 10_000),
        ("/views/accounts", "limit", 1000),
        ("/search/account_search", "limit", 1000),
    ] {
        let schema = &parameter(&doc, path, "get", name)["schema"];
        assert_eq!(schema["minimum"], 1, "{path} {name}: {schema}");
        assert_eq!(schema["maximum"], max, "{path} {name}: {schema}");
    }
    for path in [
        "/views/accounts",
        "/views/accounts/{key}",
        "/aggregations/daily_flows",
        "/search/account_search",
    ] {
        let schema = &parameter(&doc, path, "get", "consistent_with")["schema"];
        assert!(schema["pattern"].is_string(), "{path}: {schema}");
    }

    // from_version is documented as int64: a larger version is refused, not
    // read as an unsigned one (issue 16: schemathesis reached the history of
    // a real aggregate type once the document named it).
    let history = parameter(
        &doc,
        "/aggregates/account/{id}/events",
        "get",
        "from_version",
    );
    assert_eq!(history["schema"]["format"], "int64");
    let beyond = daemon.url("/aggregates/account/a/events?from_version=9223372036854775808");
    crate::harness::expect_problem(client().get(beyond).send().await.unwrap(), 400).await;

    // No parameter literally named after a placeholder: the server would
    // refuse `where.<field>` or `<group field>` as sent.
    for path in ["/views/accounts", "/aggregations/daily_flows"] {
        for p in doc["paths"][path]["get"]["parameters"].as_array().unwrap() {
            assert!(!p["name"].as_str().unwrap().contains('<'), "{path}: {p}");
        }
    }
}

/// What a `$ref` names in `document`, followed until it is no reference.
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    let mut schema = schema;
    for _ in 0..16 {
        let Some(target) = schema["$ref"].as_str() else {
            return schema;
        };
        let pointer = target.strip_prefix('#').expect("a local reference");
        schema = document
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{target} names nothing in the document"));
    }
    panic!("a reference cycle at {schema}");
}

fn operation<'a>(document: &'a Value, path: &str, method: &str) -> &'a Value {
    let operation = &document["paths"][path][method];
    assert!(operation.is_object(), "no {method} {path} in the document");
    operation
}

fn request_schema<'a>(document: &'a Value, path: &str) -> &'a Value {
    let body = &operation(document, path, "post")["requestBody"];
    assert_eq!(body["required"], true, "{path}");
    resolve(document, &body["content"]["application/json"]["schema"])
}

fn ok_schema<'a>(document: &'a Value, path: &str, method: &str) -> &'a Value {
    let schema = &operation(document, path, method)["responses"]["200"]["content"]["application/json"]
        ["schema"];
    resolve(document, schema)
}

fn parameter_names(document: &Value, path: &str, method: &str) -> BTreeSet<String> {
    operation(document, path, method)["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|name| (*name).to_owned()).collect()
}

/// The command schema as the domain file declares it (TOML → JSON).
fn declared_schema(domain: &str, aggregate: &str, command: &str) -> Value {
    let table: toml::Table = domain.parse().unwrap();
    serde_json::to_value(&table["aggregates"][aggregate]["commands"][command]["schema"]).unwrap()
}

/// Checks the structure every domain document shares: the paths are exactly
/// the domain's, every reference resolves, operation ids are unique lower
/// camel case, and every operation has one declared tag.
fn assert_well_formed(document: &Value, paths: &[&str]) {
    let actual: BTreeSet<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(actual, paths.iter().copied().collect::<BTreeSet<_>>());
    fn references<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match value {
                        Value::String(target) if key == "$ref" => found.push(target),
                        _ => references(value, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| references(item, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    references(document, &mut found);
    assert!(!found.is_empty());
    for target in found {
        let pointer = target.strip_prefix('#').unwrap();
        assert!(
            document.pointer(pointer).is_some(),
            "{target} resolves to nothing"
        );
    }
    let tags: BTreeSet<&str> = document["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tag| tag["name"].as_str().unwrap())
        .collect();
    let mut ids = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let id = operation["operationId"].as_str().unwrap();
            assert!(
                id.chars().next().unwrap().is_ascii_lowercase()
                    && id.chars().all(|c| c.is_ascii_alphanumeric()),
                "{method} {path}: {id}"
            );
            assert!(ids.insert(id.to_owned()), "{id} is used twice");
            let operation_tags = operation["tags"].as_array().unwrap();
            assert_eq!(operation_tags.len(), 1, "{method} {path}");
            assert!(
                tags.contains(operation_tags[0].as_str().unwrap()),
                "{method} {path}"
            );
        }
    }
}

/// What the document's schema (a reference) says is wrong with an instance.
fn schema_errors(document: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    // The document itself is the root, so every `#/components/...` reference
    // resolves; its other members are keywords a validator ignores.
    let mut root = document.clone();
    root["$ref"] = schema["$ref"].clone();
    assert!(root["$ref"].is_string(), "not a reference: {schema}");
    let validator = jsonschema::validator_for(&root).unwrap();
    validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect()
}

/// Validates a real answer against the document's schema for it.
fn assert_matches(document: &Value, schema: &Value, instance: &Value) {
    let errors = schema_errors(document, schema, instance);
    assert!(
        errors.is_empty(),
        "{instance} does not match {schema}: {errors:?}"
    );
}

fn ok_ref<'a>(document: &'a Value, path: &str, method: &str) -> &'a Value {
    &operation(document, path, method)["responses"]["200"]["content"]["application/json"]["schema"]
}

#[tokio::test]
async fn the_bank_document_is_typed_for_the_domain_and_true_to_its_answers() {
    let daemon = Process::start(ProcessOptions::default());
    daemon.ready().await;
    let http = client();
    let doc = get_json(&http, &daemon.url("/openapi.json")).await;
    assert_well_formed(
        &doc,
        &[
            "/admin/node",
            "/admin/projections",
            "/admin/projections/{name}/rebuild",
            "/admin/projections/{name}/position",
            "/aggregates/account/{id}",
            "/aggregates/account/{id}/events",
            "/aggregations/daily_flows",
            "/commands/account/{id}/close",
            "/commands/account/{id}/deposit",
            "/commands/account/{id}/open",
            "/commands/account/{id}/withdraw",
            "/events/stream",
            "/livez",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/search/account_search",
            "/views/accounts",
            "/views/accounts/{key}",
        ],
    );
    let bank = cqrsd::domain::EXAMPLE_DOMAIN;

    // One operation per command, its body the command's schema as declared.
    for (command, id) in [
        ("open", "openAccount"),
        ("deposit", "depositAccount"),
        ("withdraw", "withdrawAccount"),
        ("close", "closeAccount"),
    ] {
        let path = format!("/commands/account/{{id}}/{command}");
        let post = operation(&doc, &path, "post");
        assert_eq!(post["operationId"], id);
        assert_eq!(post["tags"], json!(["account"]));
        assert_eq!(
            *request_schema(&doc, &path),
            declared_schema(bank, "account", command),
            "{command}"
        );
        assert_eq!(
            parameter_names(&doc, &path, "post"),
            names(&["id", "Idempotency-Key", "If-Match"])
        );
        // Every operation on the same account is reachable from the reply.
        let links = post["responses"]["200"]["links"].as_object().unwrap();
        assert_eq!(
            links["getAccount"]["parameters"]["id"],
            "$response.body#/id"
        );
        assert_eq!(links.len(), 6, "{command}: {links:?}");
    }

    // The reply's events are the event types the command emits, typed.
    let reply = ok_schema(&doc, "/commands/account/{id}/deposit", "post");
    assert_eq!(reply["properties"]["aggregate"]["const"], "account");
    let events = &reply["properties"]["events"];
    assert_eq!(
        (events["minItems"].clone(), events["maxItems"].clone()),
        (json!(1), json!(1))
    );
    let variants = events["items"]["oneOf"].as_array().unwrap();
    assert_eq!(variants.len(), 1);
    let deposited = resolve(&doc, &variants[0]);
    assert_eq!(deposited["properties"]["type"]["const"], "MoneyDeposited");
    assert_eq!(
        deposited["properties"]["data"],
        json!({
            "type": "object",
            "required": ["amount"],
            "additionalProperties": false,
            "properties": {"amount": {"type": "number", "exclusiveMinimum": 0}},
        })
    );
    assert_eq!(
        events["items"]["discriminator"],
        json!({"propertyName": "type", "mapping": {"MoneyDeposited": variants[0]["$ref"]}})
    );

    // The state's shape, from the initial state's types.
    let account = ok_schema(&doc, "/aggregates/account/{id}", "get");
    assert_eq!(
        operation(&doc, "/aggregates/account/{id}", "get")["operationId"],
        "getAccount"
    );
    assert_eq!(
        *resolve(&doc, &account["properties"]["state"]),
        json!({
            "type": "object",
            "required": ["balance", "owner", "status"],
            "additionalProperties": false,
            "properties": {
                "balance": {"type": "number"},
                "owner": {"type": "string"},
                "status": {"type": "string"},
            },
        })
    );
    let history = ok_schema(&doc, "/aggregates/account/{id}/events", "get");
    let history_event = resolve(&doc, &history["properties"]["events"]["items"]);
    assert_eq!(
        history_event["properties"]["type"]["enum"],
        json!([
            "AccountClosed",
            "AccountOpened",
            "MoneyDeposited",
            "MoneyWithdrawn"
        ])
    );

    // The view: exactly its indexed fields as filters, `order` an enum of them.
    let list = "/views/accounts";
    assert_eq!(operation(&doc, list, "get")["operationId"], "listAccounts");
    assert_eq!(
        parameter_names(&doc, list, "get"),
        names(&[
            "order",
            "limit",
            "cursor",
            "consistent_with",
            "where.owner",
            "where.status"
        ])
    );
    assert_eq!(
        parameter(&doc, list, "get", "order")["schema"]["enum"],
        json!(["owner", "-owner", "status", "-status"])
    );
    assert_eq!(
        parameter_names(&doc, "/views/accounts/{key}", "get"),
        names(&["key", "consistent_with"])
    );
    let view_doc = resolve(
        &doc,
        &ok_schema(&doc, "/views/accounts/{key}", "get")["properties"]["doc"],
    );
    let fields: BTreeSet<String> = view_doc["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(fields, names(&["balance", "opened_at", "owner", "status"]));

    // The aggregation: its group fields; its rows: group fields and measures.
    let aggregation = "/aggregations/daily_flows";
    assert_eq!(
        parameter_names(&doc, aggregation, "get"),
        names(&["consistent_with", "day", "flow"])
    );
    let row = resolve(
        &doc,
        &ok_schema(&doc, aggregation, "get")["properties"]["rows"]["items"],
    );
    assert_eq!(row["properties"]["count"]["type"], "integer");
    assert_eq!(
        row["required"],
        json!(["average", "count", "day", "flow", "largest", "total"])
    );

    // The search: its keyword and number fields as filters, not its text field.
    let search = "/search/account_search";
    assert_eq!(
        parameter_names(&doc, search, "get"),
        names(&[
            "q",
            "limit",
            "cursor",
            "consistent_with",
            "status",
            "balance"
        ])
    );
    assert_eq!(
        parameter(&doc, search, "get", "balance")["schema"]["type"],
        "number"
    );
    assert_eq!(
        parameter(&doc, search, "get", "status")["schema"]["type"],
        "string"
    );

    // The stream's aggregate types and the projections to rebuild, as enums.
    assert_eq!(
        parameter(&doc, "/events/stream", "get", "aggregate")["schema"]["enum"],
        json!(["account"])
    );
    assert_eq!(
        parameter(&doc, "/admin/projections/{name}/rebuild", "post", "name")["schema"]["enum"],
        json!(["account_search", "accounts", "daily_flows"])
    );

    // No tokens configured: no security declared, no 401 or 403 described.
    assert!(doc.get("security").is_none(), "{}", doc["security"]);
    assert!(doc["components"].get("securitySchemes").is_none());
    let responses = &operation(&doc, "/commands/account/{id}/open", "post")["responses"];
    assert!(responses.get("401").is_none() && responses.get("403").is_none());
    assert!(responses["429"].is_object());
    // The generic types the domain's replaced are gone.
    for generic in [
        "CommandResponse",
        "WireEvent",
        "ViewDocument",
        "AggregationRows",
    ] {
        assert!(
            doc["components"]["schemas"].get(generic).is_none(),
            "{generic}"
        );
    }

    // A policy's move body is described as the handler parses it: an
    // object of non-negative integers and no other member, so a body the
    // document accepts is never refused as malformed.
    let move_body = &operation(&doc, "/admin/projections/{name}/position", "post")["requestBody"]["content"]
        ["application/json"]["schema"];
    assert!(schema_errors(&doc, move_body, &json!({"positions": {"account:0": 3}})).is_empty());
    for malformed in [
        json!({"positions": {"account:0": []}}),
        json!({"positions": {"account:0": -1}}),
        json!({"policy": "", "positions": {}}),
        json!({}),
    ] {
        assert!(
            !schema_errors(&doc, move_body, &malformed).is_empty(),
            "{malformed}"
        );
    }

    // Real answers match the schemas.
    let base = daemon.url("");
    let open = command(&http, &base, "account/ada/open", json!({"owner": "Ada"})).await;
    assert_eq!(open.status(), 200);
    let open: Value = open.json().await.unwrap();
    assert_matches(
        &doc,
        ok_ref(&doc, "/commands/account/{id}/open", "post"),
        &open,
    );
    let deposit = command(&http, &base, "account/ada/deposit", json!({"amount": 10.5})).await;
    let deposit: Value = deposit.json().await.unwrap();
    assert_matches(
        &doc,
        ok_ref(&doc, "/commands/account/{id}/deposit", "post"),
        &deposit,
    );
    let position = deposit["position"].as_str().unwrap();
    for (path, url) in [
        (
            "/aggregates/account/{id}",
            "/aggregates/account/ada".to_owned(),
        ),
        (
            "/aggregates/account/{id}/events",
            "/aggregates/account/ada/events".to_owned(),
        ),
        (
            "/views/accounts/{key}",
            format!("/views/accounts/ada?consistent_with={position}"),
        ),
        (
            "/views/accounts",
            format!("/views/accounts?where.owner=Ada&order=-status&consistent_with={position}"),
        ),
        (
            "/aggregations/daily_flows",
            format!("/aggregations/daily_flows?flow=MoneyDeposited&consistent_with={position}"),
        ),
        (
            "/search/account_search",
            format!("/search/account_search?q=ada&status=open&consistent_with={position}"),
        ),
    ] {
        let answer = get_json(&http, &daemon.url(&url)).await;
        assert_matches(&doc, ok_ref(&doc, path, "get"), &answer);
    }
}

#[tokio::test]
async fn the_shop_document_is_typed_for_the_domain_and_declares_bearer_tokens() {
    let token = crate::auth::token("client", &["command", "query", "admin"], "");
    let daemon = Process::start(ProcessOptions {
        config: token.entry.clone(),
        domain: Some(SHOP_DOMAIN.to_owned()),
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let http = client();
    let bearer = format!("Bearer {}", token.secret);
    let get = |path: String| {
        let request = http.get(daemon.url(&path)).header("authorization", &bearer);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200, "GET {path}");
            response.json::<Value>().await.unwrap()
        }
    };
    let doc = get("/openapi.json".to_owned()).await;
    assert_well_formed(
        &doc,
        &[
            "/admin/node",
            "/admin/projections",
            "/admin/projections/{name}/rebuild",
            "/admin/projections/{name}/position",
            "/aggregates/customer/{id}",
            "/aggregates/customer/{id}/events",
            "/aggregates/order/{id}",
            "/aggregates/order/{id}/events",
            "/aggregations/sales",
            "/commands/customer/{id}/register",
            "/commands/order/{id}/add_gift",
            "/commands/order/{id}/add_line",
            "/commands/order/{id}/pay",
            "/commands/order/{id}/place",
            "/events/stream",
            "/livez",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/search/order_search",
            "/views/customer_orders",
            "/views/customer_orders/{key}",
            "/views/order_log",
            "/views/order_log/{key}",
            "/views/orders",
            "/views/orders/{key}",
        ],
    );
    let ids: Vec<&str> = [
        "/commands/order/{id}/place",
        "/commands/order/{id}/add_line",
        "/commands/order/{id}/add_gift",
        "/commands/customer/{id}/register",
    ]
    .iter()
    .map(|path| {
        operation(&doc, path, "post")["operationId"]
            .as_str()
            .unwrap()
    })
    .collect();
    assert_eq!(
        ids,
        [
            "placeOrder",
            "addLineOrder",
            "addGiftOrder",
            "registerCustomer"
        ]
    );

    // Tokens configured: bearer declared, with its 401 and 403; probes open.
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer"})
    );
    let responses = &operation(&doc, "/views/orders", "get")["responses"];
    assert!(responses["401"].is_object() && responses["403"].is_object());
    assert_eq!(operation(&doc, "/livez", "get")["security"], json!([{}]));

    // A schema with local references: they point into the document now,
    // at the schema's own `$defs`.
    let place = request_schema(&doc, "/commands/order/{id}/place");
    let mut declared = declared_schema(SHOP_DOMAIN, "order", "place");
    // Its definitions are components of their own, as generators expect.
    let definitions = declared.as_object_mut().unwrap().remove("$defs").unwrap();
    declared["properties"]["lines"]["items"]["$ref"] =
        json!("#/components/schemas/OrderPlaceCommandLine");
    assert_eq!(*place, declared);
    assert_eq!(
        doc["components"]["schemas"]["OrderPlaceCommandLine"],
        definitions["line"]
    );
    let line = resolve(&doc, &place["properties"]["lines"]["items"]);
    assert_eq!(
        line["properties"]["qty"],
        json!({"type": "integer", "minimum": 1})
    );

    // `place` emits OrderPlaced always and OrderNoted when there is a note.
    let reply = ok_schema(&doc, "/commands/order/{id}/place", "post");
    let events = &reply["properties"]["events"];
    assert_eq!(
        (events["minItems"].clone(), events["maxItems"].clone()),
        (json!(1), json!(2))
    );
    let types: Vec<&str> = events["items"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|variant| {
            resolve(&doc, variant)["properties"]["type"]["const"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(types, ["OrderNoted", "OrderPlaced"]);
    let mapped = events["items"]["discriminator"]["mapping"]["OrderPlaced"]
        .as_str()
        .unwrap();
    let placed = doc.pointer(mapped.strip_prefix('#').unwrap()).unwrap();
    // `customer` copies the command's field, `lines` is computed.
    assert_eq!(
        placed["properties"]["data"]["properties"],
        json!({"customer": {"type": "string", "minLength": 1}, "lines": {}})
    );
    // LineAdded comes from two commands: `gift` only from one, so it is
    // optional; `price` is computed in one, so its type is unknown.
    let added = ok_schema(&doc, "/commands/order/{id}/add_gift", "post")["properties"]["events"]
        ["items"]["oneOf"][0]
        .clone();
    let added = resolve(&doc, &added);
    assert_eq!(
        added["properties"]["data"]["required"],
        json!(["price", "sku"])
    );
    assert_eq!(
        added["properties"]["data"]["properties"],
        json!({"gift": {}, "price": {}, "sku": {"type": "string", "minLength": 1}})
    );
    let pay = &ok_schema(&doc, "/commands/order/{id}/pay", "post")["properties"]["events"];
    assert_eq!(
        (pay["minItems"].clone(), pay["maxItems"].clone()),
        (json!(1), json!(1))
    );

    // The state of every type of initial value.
    let order = ok_schema(&doc, "/aggregates/order/{id}", "get");
    assert_eq!(
        resolve(&doc, &order["properties"]["state"])["properties"],
        json!({
            "customer": {"type": "string"},
            "lines": {"type": "number"},
            "paid": {"type": "boolean"},
            "status": {"type": "string"},
            "tags": {"type": "array"},
            "total": {"type": "number"},
        })
    );

    // A view without indexes has no `order` and no filters.
    assert_eq!(
        parameter_names(&doc, "/views/order_log", "get"),
        names(&["limit", "cursor", "consistent_with"])
    );
    assert_eq!(
        parameter(&doc, "/views/customer_orders", "get", "order")["schema"]["enum"],
        json!(["name", "-name"])
    );
    assert_eq!(
        parameter_names(&doc, "/aggregations/sales", "get"),
        names(&["consistent_with", "month", "sku"])
    );
    let row = resolve(
        &doc,
        &ok_schema(&doc, "/aggregations/sales", "get")["properties"]["rows"]["items"],
    );
    assert_eq!(
        row["properties"]["cheapest"]["type"],
        json!(["number", "null"])
    );
    assert_eq!(
        parameter_names(&doc, "/search/order_search", "get"),
        names(&["q", "limit", "cursor", "consistent_with", "status", "total"])
    );
    let hit = resolve(
        &doc,
        &ok_schema(&doc, "/search/order_search", "get")["properties"]["hits"]["items"],
    );
    assert_eq!(
        hit["properties"]["doc"],
        ok_schema(&doc, "/views/orders/{key}", "get")["properties"]["doc"]
    );
    assert_eq!(
        parameter(&doc, "/events/stream", "get", "aggregate")["schema"]["enum"],
        json!(["customer", "order"])
    );

    // Real answers match: a reply with both events, then a gift line.
    let send = |path: &str, body: Value| {
        http.post(daemon.url(&format!("/commands/{path}")))
            .header("authorization", &bearer)
            .json(&body)
            .send()
    };
    let placed = send(
        "order/o-1/place",
        json!({"customer": "c-1", "lines": [{"sku": "apple", "qty": 2}], "note": "ring twice"}),
    )
    .await
    .unwrap();
    assert_eq!(placed.status(), 200);
    let placed: Value = placed.json().await.unwrap();
    assert_eq!(placed["events"].as_array().unwrap().len(), 2);
    assert_matches(
        &doc,
        ok_ref(&doc, "/commands/order/{id}/place", "post"),
        &placed,
    );
    let gift: Value = send("order/o-1/add_gift", json!({"sku": "pear"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_matches(
        &doc,
        ok_ref(&doc, "/commands/order/{id}/add_gift", "post"),
        &gift,
    );
    let state = get("/aggregates/order/o-1".to_owned()).await;
    assert_matches(&doc, ok_ref(&doc, "/aggregates/order/{id}", "get"), &state);
    let position = gift["position"].as_str().unwrap();
    let rows = get(format!(
        "/aggregations/sales?sku=pear&consistent_with={position}"
    ))
    .await;
    assert_eq!(rows["rows"].as_array().unwrap().len(), 1, "{rows}");
    assert_matches(&doc, ok_ref(&doc, "/aggregations/sales", "get"), &rows);
}

/// The document follows the tokens a reload adds: bearer is declared once
/// there are tokens, and not before.
#[tokio::test]
async fn a_reload_that_adds_tokens_declares_bearer_security() {
    let daemon = Process::start(ProcessOptions::default());
    daemon.ready().await;
    let http = client();
    let before = get_json(&http, &daemon.url("/openapi.json")).await;
    assert!(before.get("security").is_none());

    let token = crate::auth::token("reader", &["query"], "");
    std::fs::write(daemon.dir.path().join("config.toml"), &token.entry).unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(30));
    let after: Value = http
        .get(daemon.url("/openapi.json"))
        .header("authorization", format!("Bearer {}", token.secret))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(after["security"], json!([{"bearer": []}]));
    let open =
        |doc: &Value| doc["paths"]["/commands/account/{id}/open"]["post"]["responses"].clone();
    assert!(open(&before).get("401").is_none());
    assert!(open(&after)["401"].is_object() && open(&after)["403"].is_object());
    let paths = |doc: &Value| {
        doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(paths(&before), paths(&after));
}
