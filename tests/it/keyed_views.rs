//! Keyed and multi-source views (DESIGN.md §3.1), against the real binary on
//! both log backends: a view keyed by the customer over the order and
//! customer streams equals a fold of both streams' histories, also after a
//! SIGKILL while it catches up and after a rebuild; `consistent_with` with a
//! position of either source waits for it; lists, filters, cursors and
//! search work over the keyed documents; a key that cannot be computed
//! quarantines its event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Backend, Process, ProcessOptions, client, command, get_json};
use crate::readside::{all_pages, wait_caught_up};

const SHOP: &str = r#"
[aggregates.customer]
state = { name = "" }
[aggregates.customer.commands.register]
schema = { type = "object", required = ["name"], properties = { name = { type = "string" } } }
emit = [ { event = "CustomerRegistered", data = { name = "command.name" } } ]
[aggregates.customer.events.CustomerRegistered]
set = { name = "event.name" }

[aggregates.order]
state = { customer = "", total = 0 }
[aggregates.order.commands.place]
schema = { type = "object", required = ["customer", "total"], properties = { customer = { type = "string" }, total = { type = "integer" } } }
emit = [ { event = "OrderPlaced", data = { customer = "command.customer", total = "command.total" } } ]
[aggregates.order.events.OrderPlaced]
set = { customer = "event.customer", total = "event.total" }

# Each field is written by one source only, and the counters commute, so the
# documents do not depend on how the two streams interleave.
[projections.customer_orders]
kind = "view"
source = ["order", "customer"]
key = "event.customer"
indexes = ["orders", "name"]
[projections.customer_orders.on.OrderPlaced]
set = { orders = "(has(doc.orders) ? doc.orders : 0) + 1", spent = "(has(doc.spent) ? doc.spent : 0) + event.total" }
[projections.customer_orders.on.CustomerRegistered]
key = "event.aggregate_id"
set = { name = "event.name" }

[projections.customer_search]
kind = "search"
view = "customer_orders"
fields = { name = "text", orders = "number" }
"#;

const CUSTOMERS: usize = 12;
/// Small, so the view commits many batches and the kill lands between them.
const BATCH_SIZE: usize = 5;
const CLIENTS: usize = 6;
/// Acknowledged orders before the test starts looking for lag to kill in.
const MIN_LOAD: usize = 300;

fn customer(n: usize) -> String {
    format!("c-{n:02}")
}

fn start(backend: Backend) -> Process {
    let mut options = ProcessOptions {
        domain: Some(SHOP.to_owned()),
        ..ProcessOptions::backend(backend)
    };
    options
        .config
        .push_str(&format!("\n[projections]\nbatch_size = {BATCH_SIZE}\n"));
    Process::start(options)
}

async fn ok(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Sends a command that must succeed and returns the position of its record.
async fn position_of(http: &reqwest::Client, base: &str, path: &str, body: Value) -> String {
    let reply = ok(command(http, base, path, body).await).await;
    reply["position"].as_str().unwrap().to_owned()
}

/// The whole view, every page of it, by key.
async fn read_view(http: &reqwest::Client, base: &str) -> BTreeMap<String, Value> {
    let items = all_pages(http, &format!("{base}/views/customer_orders?limit=5")).await;
    let count = items.len();
    let view: BTreeMap<String, Value> = items.into_iter().collect();
    assert_eq!(view.len(), count, "a key appeared on two pages");
    view
}

/// Every event of one aggregate, from its history.
async fn history(http: &reqwest::Client, base: &str, aggregate: &str, id: &str) -> Vec<Value> {
    let page = get_json(
        http,
        &format!("{base}/aggregates/{aggregate}/{id}/events?limit=1000"),
    )
    .await;
    assert!(page["next_from_version"].is_null());
    page["events"].as_array().unwrap().clone()
}

/// The view as a fold of the histories of every customer and order.
async fn fold(http: &reqwest::Client, base: &str, orders: &[String]) -> BTreeMap<String, Value> {
    let mut docs: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for n in 0..CUSTOMERS {
        for event in history(http, base, "customer", &customer(n)).await {
            docs.entry(customer(n))
                .or_default()
                .insert("name".into(), event["data"]["name"].clone());
        }
    }
    for id in orders {
        let response = http
            .get(format!("{base}/aggregates/order/{id}/events"))
            .send()
            .await
            .unwrap();
        if response.status() == 404 {
            continue; // Sent, but killed before it was written.
        }
        let page: Value = ok(response).await;
        for event in page["events"].as_array().unwrap() {
            let key = event["data"]["customer"].as_str().unwrap().to_owned();
            let doc = docs.entry(key).or_default();
            let orders = doc.get("orders").and_then(Value::as_i64).unwrap_or(0);
            let spent = doc.get("spent").and_then(Value::as_i64).unwrap_or(0);
            doc.insert("orders".into(), json!(orders + 1));
            doc.insert(
                "spent".into(),
                json!(spent + event["data"]["total"].as_i64().unwrap()),
            );
        }
    }
    docs.into_iter()
        .map(|(key, doc)| (key, Value::Object(doc)))
        .collect()
}

/// The view's entry in an `/admin/projections` report.
fn customer_orders(report: &Value) -> Value {
    report["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "customer_orders")
        .unwrap_or_else(|| panic!("customer_orders missing from {report}"))
        .clone()
}

fn lag(report: &Value) -> u64 {
    customer_orders(report)["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_u64().unwrap())
        .sum()
}

async fn a_keyed_view_over_two_sources_equals_its_fold_and_a_rebuild_after_sigkill(
    backend: Backend,
) {
    let daemon = start(backend);
    daemon.ready().await;
    let base = daemon.url("");
    let http = client();
    // Half the customers register before their orders, half while orders
    // for them are being placed.
    for n in 0..CUSTOMERS / 2 {
        let path = format!("customer/{}/register", customer(n));
        ok(command(&http, &base, &path, json!({"name": format!("name {n}")})).await).await;
    }
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client_no in 0..CLIENTS {
        let (http, base, acknowledged) = (http.clone(), base.clone(), acknowledged.clone());
        clients.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0..100_000usize {
                let id = format!("o-{client_no}-{n}");
                let body = json!({
                    "customer": customer((client_no * 5 + n * 7) % CUSTOMERS),
                    "total": 1 + (n * 3 + client_no) % 40,
                });
                sent.push(id.clone());
                let response = http
                    .post(format!("{base}/commands/order/{id}/place"))
                    .json(&body)
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status() == 200 => {
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => panic!("unexpected status {}", response.status()),
                    Err(_) => return sent, // The daemon is gone.
                }
                if client_no == 0 && n < CUSTOMERS / 2 {
                    let path = format!("customer/{}/register", customer(CUSTOMERS / 2 + n));
                    let body = json!({"name": format!("name {}", CUSTOMERS / 2 + n)});
                    let response = http
                        .post(format!("{base}/commands/{path}"))
                        .json(&body)
                        .send()
                        .await;
                    if response.is_err() {
                        return sent;
                    }
                }
            }
            sent
        }));
    }
    // Kill the daemon once the load went through and, as far as can be
    // seen, the view is behind the log.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.load(Ordering::Relaxed) < MIN_LOAD {
        assert!(Instant::now() < deadline, "the load never got going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let report = get_json(&http, &format!("{base}/admin/projections")).await;
        if lag(&report) > 0 {
            break;
        }
    }
    daemon.signal("KILL");
    let mut orders = Vec::new();
    for task in clients {
        orders.extend(task.await.unwrap());
    }
    let daemon = daemon.respawn(Duration::from_secs(30));
    daemon.ready().await;
    let base = daemon.url("");
    wait_caught_up(&http, &base).await;

    let expected = fold(&http, &base, &orders).await;
    assert_eq!(expected.len(), CUSTOMERS);
    assert_eq!(
        read_view(&http, &base).await,
        expected,
        "the view after SIGKILL differs from the fold of its two sources"
    );

    // A rebuild (beside the live generation) gives the same documents.
    let rebuild = http
        .post(format!("{base}/admin/projections/customer_orders/rebuild"))
        .send()
        .await
        .unwrap();
    assert_eq!(rebuild.status(), 202);
    let report = wait_caught_up(&http, &base).await;
    let view = customer_orders(&report);
    assert_eq!(view["generation"], 1, "{view}");
    assert_eq!(view["quarantine_count"], 0, "{view}");
    assert_eq!(read_view(&http, &base).await, expected);

    // And so does a clean restart.
    let daemon = daemon.restart(false);
    daemon.ready().await;
    let base = daemon.url("");
    wait_caught_up(&http, &base).await;
    assert_eq!(read_view(&http, &base).await, expected);
}

async fn consistent_with_filters_search_and_poison_keys_on_a_keyed_view(backend: Backend) {
    let daemon = start(backend);
    daemon.ready().await;
    let base = daemon.url("");
    let http = client();

    // A position of the order topic: the read waits for the order partition.
    for (n, total) in [(1, 10), (2, 5), (3, 7)] {
        let position = position_of(
            &http,
            &base,
            &format!("order/o-{n}/place"),
            json!({"customer": "ada", "total": total}),
        )
        .await;
        assert!(position.contains(".order:"), "{position}");
        let doc = get_json(
            &http,
            &format!("{base}/views/customer_orders/ada?consistent_with={position}"),
        )
        .await;
        assert_eq!(doc["key"], "ada");
        assert_eq!(doc["doc"]["orders"], n, "{doc}");
    }
    // A position of the customer topic: the read waits for that partition.
    let position = position_of(
        &http,
        &base,
        "customer/ada/register",
        json!({"name": "Ada Lovelace"}),
    )
    .await;
    assert!(position.contains(".customer:"), "{position}");
    let doc = get_json(
        &http,
        &format!("{base}/views/customer_orders/ada?consistent_with={position}"),
    )
    .await;
    assert_eq!(
        doc["doc"],
        json!({"name": "Ada Lovelace", "orders": 3, "spent": 22}),
        "{doc}"
    );
    let position = position_of(
        &http,
        &base,
        "order/o-4/place",
        json!({"customer": "bob", "total": 1}),
    )
    .await;

    // Filters and ordering on an indexed field of keyed documents.
    let listed = all_pages(
        &http,
        &format!("{base}/views/customer_orders?order=-orders&limit=1&consistent_with={position}"),
    )
    .await;
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["ada", "bob"]);
    let filtered = get_json(
        &http,
        &format!("{base}/views/customer_orders?where.orders=1"),
    )
    .await;
    assert_eq!(filtered["items"][0]["key"], "bob", "{filtered}");
    assert_eq!(filtered["items"].as_array().unwrap().len(), 1);

    // Search over the keyed view finds the customer's document.
    let found = get_json(
        &http,
        &format!("{base}/search/customer_search?q=lovelace&consistent_with={position}"),
    )
    .await;
    assert_eq!(found["hits"][0]["key"], "ada", "{found}");
    assert_eq!(found["hits"][0]["doc"]["orders"], 3, "{found}");

    // A key that is not a usable string is a poison event: quarantined with
    // its reason, and nothing else changes.
    let position = position_of(
        &http,
        &base,
        "order/o-5/place",
        json!({"customer": "", "total": 1}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let report = get_json(&http, &format!("{base}/admin/projections")).await;
        let view = customer_orders(&report);
        if view["quarantine_count"] == 1 {
            break view;
        }
        assert!(Instant::now() < deadline, "never quarantined: {report}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = view["quarantined"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("projections.customer_orders.key") && reason.contains("1 to 512 bytes"),
        "{view}"
    );
    let listed = all_pages(
        &http,
        &format!("{base}/views/customer_orders?limit=10&consistent_with={position}"),
    )
    .await;
    assert_eq!(listed.len(), 2, "{listed:?}");
}

crate::for_each_backend!(
    a_keyed_view_over_two_sources_equals_its_fold_and_a_rebuild_after_sigkill,
    consistent_with_filters_search_and_poison_keys_on_a_keyed_view,
);
