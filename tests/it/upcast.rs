//! Event versions and upcasting (DESIGN.md §3.3), against the real binary on
//! both log backends: events written by a domain at version 1 of an event
//! type and read after the domain moved to version 2 give the same states,
//! views, history and event-stream payloads as events written at version 2;
//! an event no upcaster can convert is quarantined by projections and keeps
//! its partition's commands and history at a clear 503.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};

use crate::harness::{Backend, Process, ProcessOptions, client, command, get_json};
use crate::readside::wait_caught_up;

/// Version 1: deposits carry an `amount` in units.
const V1: &str = r#"
[aggregates.account]
state = { balance = 0, deposits = 0 }
[aggregates.account.commands.deposit]
schema = { type = "object", required = ["amount"], properties = { amount = { type = "number" } } }
emit = [ { event = "MoneyDeposited", data = { amount = "command.amount", note = "'v1'" } } ]
[aggregates.account.events.MoneyDeposited]
set = { balance = "state.balance + event.amount", deposits = "state.deposits + 1" }
"#;

/// Version 2: deposits carry `cents`; version 1 deposits are upcast. The
/// view is new in this domain, so it is built from the whole log.
const V2: &str = r#"
[aggregates.account]
state = { balance = 0, deposits = 0 }
[aggregates.account.commands.deposit]
schema = { type = "object", required = ["cents"], properties = { cents = { type = "integer" } } }
emit = [ { event = "MoneyDeposited", data = { cents = "command.cents", note = "'v1'" } } ]
[aggregates.account.events.MoneyDeposited]
version = 2
set = { balance = "state.balance + event.cents", deposits = "state.deposits + 1" }
[aggregates.account.events.MoneyDeposited.upcast.1]
set = { cents = "int(event.amount * 100)" }
remove = ["amount"]

[projections.balances]
kind = "view"
source = "account"
indexes = ["cents"]
[projections.balances.on.MoneyDeposited]
set = { cents = "(has(doc.cents) ? doc.cents : 0) + event.cents", last = "event.cents" }
"#;

fn start(backend: Backend, domain: &str) -> Process {
    Process::start(ProcessOptions {
        domain: Some(domain.to_owned()),
        ..ProcessOptions::backend(backend)
    })
}

/// Stops the daemon, replaces its domain file, and starts it again.
fn restart_with(daemon: Process, domain: &'static str) -> Process {
    daemon.restart_after(|dir| std::fs::write(dir.join("domain.toml"), domain).unwrap())
}

async fn deposit(http: &reqwest::Client, daemon: &Process, id: &str, body: Value) -> Value {
    let response = command(
        http,
        &daemon.url(""),
        &format!("account/{id}/deposit"),
        body,
    )
    .await;
    assert_eq!(response.status(), 200, "deposit on {id}");
    response.json().await.unwrap()
}

/// The events' types and data, without ids, timestamps and positions.
fn shapes(history: &Value) -> Vec<(Value, Value, Value)> {
    history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].clone(), e["version"].clone(), e["data"].clone()))
        .collect()
}

/// Reads `count` event-stream messages from the start of the log and
/// returns each message's data (the streamed event), bounded in time.
async fn streamed(daemon: &Process, count: usize) -> Vec<Value> {
    let response = reqwest::Client::new()
        .get(daemon.url("/events/stream?from=start"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while messages.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, body.next())
            .await
            .expect("the event stream sent too few events in time")
            .expect("the event stream ended early")
            .unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    messages.push(serde_json::from_str::<Value>(data.trim_start()).unwrap());
                }
            }
        }
    }
    messages
}

async fn version_1_events_read_as_version_2(backend: Backend) {
    let http = client();
    let daemon = start(backend, V1);
    daemon.ready().await;
    deposit(&http, &daemon, "old-1", json!({"amount": 1.5})).await;
    deposit(&http, &daemon, "old-1", json!({"amount": 2.25})).await;
    let before = get_json(&http, &daemon.url("/aggregates/account/old-1")).await;
    assert_eq!(before["state"]["balance"], json!(3.75), "{before}");

    let daemon = restart_with(daemon, V2);
    daemon.ready().await;
    deposit(&http, &daemon, "new-1", json!({"cents": 150})).await;
    deposit(&http, &daemon, "new-1", json!({"cents": 225})).await;

    // States: the restore folded the old events again, through the upcaster.
    let old = get_json(&http, &daemon.url("/aggregates/account/old-1")).await;
    let new = get_json(&http, &daemon.url("/aggregates/account/new-1")).await;
    assert_eq!(
        old["state"],
        json!({"balance": 375, "deposits": 2}),
        "{old}"
    );
    assert_eq!(old["state"], new["state"]);
    assert_eq!(old["version"], new["version"]);

    // History: the same types, versions and data.
    let old_history = get_json(&http, &daemon.url("/aggregates/account/old-1/events")).await;
    let new_history = get_json(&http, &daemon.url("/aggregates/account/new-1/events")).await;
    assert_eq!(
        shapes(&old_history)[0].2,
        json!({"cents": 150, "note": "v1"}),
        "{old_history}"
    );
    assert_eq!(shapes(&old_history), shapes(&new_history));

    // Views: a projection reading the old events sees version 2 only.
    wait_caught_up(&http, &daemon.url("")).await;
    let old_doc = get_json(&http, &daemon.url("/views/balances/old-1")).await;
    let new_doc = get_json(&http, &daemon.url("/views/balances/new-1")).await;
    assert_eq!(
        old_doc["doc"],
        json!({"cents": 375, "last": 225}),
        "{old_doc}"
    );
    assert_eq!(old_doc["doc"], new_doc["doc"]);
    let report = get_json(&http, &daemon.url("/admin/projections")).await;
    assert_eq!(report["projections"][0]["quarantine_count"], 0, "{report}");

    // The event stream: the same payloads for both aggregates.
    let messages = streamed(&daemon, 4).await;
    let data_of = |id: &str| -> Vec<Value> {
        messages
            .iter()
            .filter(|m| m["id"] == id)
            .map(|m| json!([m["type"], m["version"], m["data"]]))
            .collect()
    };
    assert_eq!(data_of("old-1").len(), 2, "{messages:?}");
    assert_eq!(data_of("old-1"), data_of("new-1"));

    // The old aggregate lives on at version 2, also across another restart
    // (which does not fold the partition again).
    let reply = deposit(&http, &daemon, "old-1", json!({"cents": 25})).await;
    assert_eq!(reply["version"], 3, "{reply}");
    let daemon = daemon.restart(false);
    daemon.ready().await;
    let old = get_json(&http, &daemon.url("/aggregates/account/old-1")).await;
    assert_eq!(
        old["state"],
        json!({"balance": 400, "deposits": 3}),
        "{old}"
    );
    assert_eq!(old["version"], 3);
}

async fn an_event_no_upcaster_converts_is_quarantined_and_refused_clearly(backend: Backend) {
    let http = client();
    let daemon = start(backend, V1);
    daemon.ready().await;
    // Valid at version 1, but 1e300 * 100 is no integer: the upcast fails.
    deposit(&http, &daemon, "bad-1", json!({"amount": 1e300})).await;

    // The daemon serves, but its write side never becomes ready.
    let daemon = restart_with(daemon, V2);

    // The view quarantines the record with the upcaster's reason.
    let deadline = Instant::now() + Duration::from_secs(30);
    let balances = loop {
        let report = get_json(&http, &daemon.url("/admin/projections")).await;
        let balances = report["projections"][0].clone();
        if balances["quarantine_count"] == 1 {
            break balances;
        }
        assert!(Instant::now() < deadline, "never quarantined: {report}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = balances["quarantined"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("cannot be upcast") && reason.contains("upcast.1.set.cents"),
        "{balances}"
    );
    let missing = http
        .get(daemon.url("/views/balances/bad-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // The history and the partition's commands: 503 with the reason, no 500.
    let history = http
        .get(daemon.url("/aggregates/account/bad-1/events"))
        .send()
        .await
        .unwrap();
    let problem = crate::harness::expect_problem(history, 503).await;
    assert!(
        problem["type"].as_str().unwrap().ends_with("upcast-failed"),
        "{problem}"
    );
    assert!(
        problem["detail"].as_str().unwrap().contains("upcast.1"),
        "{problem}"
    );
    let refused = command(
        &http,
        &daemon.url(""),
        "account/bad-1/deposit",
        json!({"cents": 1}),
    )
    .await;
    let problem = crate::harness::expect_problem(refused, 503).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("cannot be upcast"),
        "{problem}"
    );
    // The event stream reports the record and stops there, never skips it.
    let messages = streamed(&daemon, 1).await;
    assert!(
        messages[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("cannot be upcast")),
        "{messages:?}"
    );

    // Not ready: the write side has a partition it could not restore.
    let ready = http.get(daemon.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
}

crate::for_each_backend!(
    version_1_events_read_as_version_2,
    an_event_no_upcaster_converts_is_quarantined_and_refused_clearly,
);
