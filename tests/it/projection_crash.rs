//! Guarantee 5: projections are effectively exactly-once. The daemon is
//! SIGKILLed while its projections are behind a load of commands, committing
//! small batches; after a restart every view and aggregation equals a fold
//! of the aggregates' histories and a full rebuild (no event skipped or
//! applied twice).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Backend, Process, ProcessOptions, assert_dense_versions, client, command};
use crate::readside::{all_pages, wait_caught_up};

const ACCOUNTS: usize = 20;
/// Accounts closed before the load, so the view holds both statuses.
const CLOSED: usize = 3;
const CLIENTS: usize = 12;
/// Small, so the projections commit many batches and the kill lands between them.
const BATCH_SIZE: usize = 7;
/// Acknowledged commands before the test starts looking for lag to kill in.
const MIN_LOAD: usize = 600;

/// (day, flow) → (count, total, largest).
type Flows = BTreeMap<(String, String), (u64, i64, i64)>;

fn account(n: usize) -> String {
    format!("acc{n:02}")
}

async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

/// Every event of account `id`, oldest first, following the pages.
async fn history(http: &reqwest::Client, base: &str, id: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut from = 1;
    loop {
        let page = get_json(
            http,
            &format!("{base}/aggregates/account/{id}/events?from_version={from}&limit=10000"),
        )
        .await;
        events.extend(page["events"].as_array().unwrap().iter().cloned());
        match page["next_from_version"].as_u64() {
            Some(next) => from = next,
            None => return events,
        }
    }
}

/// Folds the histories into the expected `accounts` documents
/// (id → {owner, status, balance}) and `daily_flows` rows.
fn fold(histories: &BTreeMap<String, Vec<Value>>) -> (BTreeMap<String, Value>, Flows) {
    let mut docs = BTreeMap::new();
    let mut flows = Flows::new();
    for (id, events) in histories {
        assert_dense_versions(events, id);
        let (mut owner, mut status, mut balance) = (Value::Null, "none", 0i64);
        for event in events {
            let kind = event["type"].as_str().unwrap();
            let amount = event["data"]["amount"].as_i64();
            match kind {
                "AccountOpened" => {
                    owner = event["data"]["owner"].clone();
                    status = "open";
                    balance = 0;
                }
                "MoneyDeposited" => balance += amount.unwrap(),
                "MoneyWithdrawn" => balance -= amount.unwrap(),
                "AccountClosed" => status = "closed",
                other => panic!("unexpected event {other}"),
            }
            if let Some(amount) = amount {
                let day = event["timestamp"].as_str().unwrap()[..10].to_owned();
                let entry = flows
                    .entry((day, kind.to_owned()))
                    .or_insert((0, 0, i64::MIN));
                entry.0 += 1;
                entry.1 += amount;
                entry.2 = entry.2.max(amount);
            }
        }
        if status != "none" {
            docs.insert(
                id.clone(),
                json!({"owner": owner, "status": status, "balance": balance}),
            );
        }
    }
    (docs, flows)
}

/// The whole `accounts` view, every page of it.
pub(crate) async fn read_view(http: &reqwest::Client, base: &str) -> BTreeMap<String, Value> {
    let items = all_pages(http, &format!("{base}/views/accounts?limit=6")).await;
    let count = items.len();
    let view: BTreeMap<String, Value> = items.into_iter().collect();
    assert_eq!(view.len(), count, "a key appeared on two pages");
    view
}

/// Every `daily_flows` row, keyed by (day, flow).
pub(crate) async fn read_flows(
    http: &reqwest::Client,
    base: &str,
) -> BTreeMap<(String, String), Value> {
    let body = get_json(http, &format!("{base}/aggregations/daily_flows")).await;
    let rows = body["rows"].as_array().unwrap();
    let flows: BTreeMap<(String, String), Value> = rows
        .iter()
        .map(|row| {
            let key = (
                row["day"].as_str().unwrap().to_owned(),
                row["flow"].as_str().unwrap().to_owned(),
            );
            (key, row.clone())
        })
        .collect();
    assert_eq!(flows.len(), rows.len(), "a group appeared twice: {body}");
    flows
}

pub(crate) fn projection<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {report}"))
}

pub(crate) fn total_lag(report: &Value, name: &str) -> u64 {
    projection(report, name)["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_u64().unwrap())
        .sum()
}

fn check_against_fold(
    view: &BTreeMap<String, Value>,
    flows: &BTreeMap<(String, String), Value>,
    expected_docs: &BTreeMap<String, Value>,
    expected_flows: &Flows,
) {
    let keys: Vec<&String> = view.keys().collect();
    assert_eq!(
        keys,
        expected_docs.keys().collect::<Vec<_>>(),
        "the view's keys differ from the aggregates"
    );
    for (id, expected) in expected_docs {
        let doc = &view[id];
        assert_eq!(doc["owner"], expected["owner"], "{id}: {doc}");
        assert_eq!(doc["status"], expected["status"], "{id}: {doc}");
        assert_eq!(
            doc["balance"].as_f64().unwrap(),
            expected["balance"].as_i64().unwrap() as f64,
            "{id}: the view's balance differs from the fold of its events: {doc} vs {expected}"
        );
    }
    assert_eq!(
        flows.keys().collect::<Vec<_>>(),
        expected_flows.keys().collect::<Vec<_>>(),
        "the aggregation's groups differ from the fold"
    );
    for (key, &(count, total, largest)) in expected_flows {
        let row = &flows[key];
        assert_eq!(row["count"], json!(count), "{key:?}: {row}");
        assert_eq!(
            row["total"].as_f64().unwrap(),
            total as f64,
            "{key:?}: {row}"
        );
        assert_eq!(
            row["largest"].as_f64().unwrap(),
            largest as f64,
            "{key:?}: {row}"
        );
        let average = row["average"].as_f64().unwrap();
        assert!(
            (average - total as f64 / count as f64).abs() < 1e-9,
            "{key:?}: {row}"
        );
    }
}

async fn projections_survive_sigkill_mid_batch_exactly_once(backend: Backend) {
    let mut options = ProcessOptions::backend(backend);
    options
        .config
        .push_str(&format!("\n[projections]\nbatch_size = {BATCH_SIZE}\n"));
    let daemon = Process::start(options);
    daemon.ready().await;
    let base = daemon.url("");
    let http = client();
    for n in 0..ACCOUNTS {
        let response = command(
            &http,
            &base,
            &format!("account/{}/open", account(n)),
            json!({"owner": format!("owner{}", n % 5)}),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    for n in 0..CLOSED {
        let response = command(
            &http,
            &base,
            &format!("account/{}/close", account(n)),
            json!({}),
        )
        .await;
        assert_eq!(response.status(), 200);
    }

    // Clients deposit and withdraw (integer amounts, so every sum is exact)
    // on the open accounts until the daemon dies under them. Withdrawals
    // beyond the balance are refused and emit nothing.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client_no in 0..CLIENTS {
        let (http, base, acknowledged) = (http.clone(), base.clone(), acknowledged.clone());
        clients.push(tokio::spawn(async move {
            for n in 0..1_000_000usize {
                let id = account(CLOSED + (client_no * 7 + n * 3) % (ACCOUNTS - CLOSED));
                let (verb, amount) = if n % 3 == 2 {
                    ("withdraw", 1 + (n * 5 + client_no) % 30)
                } else {
                    ("deposit", 1 + (n * 7 + client_no) % 50)
                };
                let sent = http
                    .post(format!("{base}/commands/account/{id}/{verb}"))
                    .json(&json!({ "amount": amount }))
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status() == 200 => {
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) if verb == "withdraw" && response.status().is_client_error() => {}
                    Ok(response) => panic!("unexpected status {}", response.status()),
                    Err(_) => return, // The daemon is gone.
                }
            }
        }));
    }

    // Once enough load has gone through, kill the daemon at a moment the
    // projections are seen behind the log.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.load(Ordering::Relaxed) < MIN_LOAD {
        assert!(Instant::now() < deadline, "the load never got going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lag_at_kill = loop {
        let report = get_json(&http, &format!("{base}/admin/projections")).await;
        let lag = (
            total_lag(&report, "accounts"),
            total_lag(&report, "daily_flows"),
        );
        if lag.0 > 0 && lag.1 > 0 {
            break lag;
        }
        assert!(
            Instant::now() < deadline,
            "the projections never fell behind the load: {report}"
        );
    };
    let daemon = daemon.restart(true);
    for client in clients {
        client.await.unwrap();
    }
    eprintln!(
        "killed after {} acknowledged commands, lag (accounts, daily_flows) {lag_at_kill:?}",
        acknowledged.load(Ordering::Relaxed)
    );
    daemon.ready().await;
    let base = daemon.url("");

    // The projections resume from the positions they committed with their
    // data, and catch up.
    let report = wait_caught_up(&http, &base).await;
    for name in ["accounts", "daily_flows"] {
        assert_eq!(projection(&report, name)["quarantine_count"], 0, "{report}");
    }
    let mut histories = BTreeMap::new();
    for n in 0..ACCOUNTS {
        let id = account(n);
        let events = history(&http, &base, &id).await;
        histories.insert(id, events);
    }
    let (expected_docs, expected_flows) = fold(&histories);
    let view = read_view(&http, &base).await;
    let flows = read_flows(&http, &base).await;
    check_against_fold(&view, &flows, &expected_docs, &expected_flows);

    // A full rebuild from offset 0 gives the same view and rows.
    assert_equal_to_a_rebuild(&http, &base, &view, &flows).await;
}

crate::for_each_backend!(projections_survive_sigkill_mid_batch_exactly_once);

/// Rebuilds the bank's `accounts` view and `daily_flows` aggregation from
/// offset 0 on the node at `base`, waits until both new generations are live
/// and caught up, and asserts that they hold what `view` and `flows` (read
/// before, caught up) held.
pub(crate) async fn assert_equal_to_a_rebuild(
    http: &reqwest::Client,
    base: &str,
    view: &BTreeMap<String, Value>,
    flows: &BTreeMap<(String, String), Value>,
) {
    let report = get_json(http, &format!("{base}/admin/projections")).await;
    let generations: Vec<u64> = ["accounts", "daily_flows"]
        .iter()
        .map(|name| projection(&report, name)["generation"].as_u64().unwrap())
        .collect();
    for name in ["accounts", "daily_flows"] {
        let response = http
            .post(format!("{base}/admin/projections/{name}/rebuild"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{name}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = get_json(http, &format!("{base}/admin/projections")).await;
        let done =
            ["accounts", "daily_flows"]
                .iter()
                .zip(&generations)
                .all(|(name, generation)| {
                    let p = projection(&report, name);
                    p["rebuild"].is_null()
                        && p["state"] == "running"
                        && p["generation"].as_u64() == Some(generation + 1)
                        && total_lag(&report, name) == 0
                });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rebuilds never finished: {report}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rebuilt_view = read_view(http, base).await;
    let rebuilt_flows = read_flows(http, base).await;
    assert_eq!(&rebuilt_view, view, "the view differs from a full rebuild");
    assert_eq!(
        &rebuilt_flows, flows,
        "the aggregation differs from a full rebuild"
    );
}
