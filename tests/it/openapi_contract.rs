//! Regression tests for the mismatches schemathesis found between
//! `/openapi.json` and what the server does (issue 7). Each assertion names
//! something the server answers that the document once did not describe.

use serde_json::Value;

use crate::harness::{Process, ProcessOptions, client, get_json};

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
    let command = "/commands/{aggregate}/{id}/{command}";

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
        "/aggregates/{aggregate}/{id}",
        "/aggregates/{aggregate}/{id}/events",
    ] {
        assert!(responses(path, "get")["400"].is_object(), "{path}");
        let id = &parameter(&doc, path, "get", "id")["schema"];
        assert!(id["pattern"].is_string(), "{path}: {id}");
    }

    // Limits the server enforces with a 400.
    for (path, name, max) in [
        ("/aggregates/{aggregate}/{id}/events", "limit", 10_000),
        ("/views/{view}", "limit", 1000),
        ("/search/{name}", "limit", 1000),
    ] {
        let schema = &parameter(&doc, path, "get", name)["schema"];
        assert_eq!(schema["minimum"], 1, "{path} {name}: {schema}");
        assert_eq!(schema["maximum"], max, "{path} {name}: {schema}");
    }
    for path in [
        "/views/{view}",
        "/views/{view}/{key}",
        "/aggregations/{name}",
        "/search/{name}",
    ] {
        let schema = &parameter(&doc, path, "get", "consistent_with")["schema"];
        assert!(schema["pattern"].is_string(), "{path}: {schema}");
    }

    // No parameter literally named after a placeholder: the server would
    // refuse `where.<field>` or `<group field>` as sent.
    for path in ["/views/{view}", "/aggregations/{name}"] {
        for p in doc["paths"][path]["get"]["parameters"].as_array().unwrap() {
            assert!(!p["name"].as_str().unwrap().contains('<'), "{path}: {p}");
        }
    }
}
