//! The persisted history index behind `GET /aggregates/{a}/{id}/events`:
//! derived from the log by a background indexer, it survives `kill -9` in the
//! middle of indexing without a gap or a duplicate, equals a rebuild from the
//! log when its directory is deleted, and a history read waits for it, so a
//! command's events are in the history as soon as the command is answered.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::crash::deposit_until_killed;
use crate::for_each_backend;
use crate::harness::{
    Backend, Process, ProcessOptions, assert_dense_versions, client, command, get_json,
};

for_each_backend!(
    sigkill_mid_indexing_leaves_an_index_equal_to_a_rebuild,
    a_history_holds_a_command_as_soon_as_it_is_answered,
);

const ACCOUNTS: usize = 6;
const CLIENTS: usize = 16;

/// Every account's whole history, following the pages.
async fn histories(http: &reqwest::Client, base: &str) -> BTreeMap<String, Vec<Value>> {
    let mut all = BTreeMap::new();
    for account in 0..ACCOUNTS {
        let id = format!("acc{account}");
        let mut events = Vec::new();
        let mut from = 1;
        loop {
            let page = get_json(
                http,
                &format!("{base}/aggregates/account/{id}/events?from_version={from}&limit=500"),
            )
            .await;
            events.extend(page["events"].as_array().unwrap().iter().cloned());
            match page["next_from_version"].as_u64() {
                Some(next) => from = next,
                None => break,
            }
        }
        assert_dense_versions(&events, &id);
        all.insert(id, events);
    }
    all
}

async fn sigkill_mid_indexing_leaves_an_index_equal_to_a_rebuild(backend: Backend) {
    let daemon = Process::start(ProcessOptions::backend(backend));
    let base = daemon.url("");
    let http = client();
    // An indexer starts on its partition's first history read: ask for every
    // account's (none exists yet) so that each indexer tails the log while
    // commands land, committing a batch per read; the kill lands among those
    // commits.
    for account in 0..ACCOUNTS {
        let asked = http
            .get(format!("{base}/aggregates/account/acc{account}/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(asked.status(), 404);
    }
    let (acknowledged, clients) = deposit_until_killed(&http, &base, ACCOUNTS, CLIENTS, 400).await;
    let daemon = daemon.restart(true);
    for client in clients {
        client.await.unwrap();
    }
    daemon.ready().await;
    let base = daemon.url("");
    let after_crash = histories(&http, &base).await;

    // Every acknowledged command is in its history exactly once.
    let mut found: HashMap<String, usize> = HashMap::new();
    for events in after_crash.values() {
        for event in events {
            if let Some(key) = event["idempotency_key"].as_str() {
                *found.entry(key.to_owned()).or_default() += 1;
            }
        }
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 50,
        "too little load: {}",
        acknowledged.len()
    );
    for key in &acknowledged {
        assert_eq!(found.get(key), Some(&1), "command {key} lost or duplicated");
    }
    // The state agrees with the history.
    for (id, events) in &after_crash {
        let state = get_json(&http, &format!("{base}/aggregates/account/{id}")).await;
        assert_eq!(state["version"], events.len() as u64, "{id}");
    }

    // An operator deletes the index while the daemon is stopped: it is rebuilt
    // from the log, and the first reads wait for the rebuild.
    let daemon = daemon.restart_after(|dir| {
        let index = dir.join("data").join("history");
        assert!(index.is_dir(), "no history index at {}", index.display());
        std::fs::remove_dir_all(index).unwrap();
    });
    daemon.ready().await;
    let rebuilt = histories(&http, &daemon.url("")).await;
    assert_eq!(
        after_crash, rebuilt,
        "the index after the crash differs from a rebuild"
    );
}

async fn a_history_holds_a_command_as_soon_as_it_is_answered(backend: Backend) {
    let daemon = Process::start(ProcessOptions::backend(backend));
    let base = daemon.url("");
    let http = client();
    let response = command(&http, &base, "account/rw/open", json!({"owner": "o"})).await;
    assert_eq!(response.status(), 200);
    for n in 1..=30u64 {
        let response = command(&http, &base, "account/rw/deposit", json!({"amount": n})).await;
        assert_eq!(response.status(), 200);
        let reply: Value = response.json().await.unwrap();
        // Read right after the answer: no retry, no sleep.
        let page = get_json(
            &http,
            &format!("{base}/aggregates/account/rw/events?from_version={}", n + 1),
        )
        .await;
        let events = page["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "deposit {n} missing from its history");
        assert_eq!(events[0]["version"], reply["version"]);
        assert_eq!(events[0]["position"], reply["position"]);
    }
}
