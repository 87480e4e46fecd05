//! `GET /search/{name}` against a real in-process daemon: the search
//! projection follows the `accounts` view, ranks with BM25, filters on
//! keyword fields, pages cleanly, honours `consistent_with`, survives a
//! restart exactly, and rebuilds to the same results.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{InProcess, client, expect_problem};
use crate::readside::{Writer, wait_caught_up};

/// Every hit of a search, following cursors: (key, score, doc) in order.
async fn search_all(http: &reqwest::Client, url: &str) -> Vec<(String, f64, Value)> {
    let mut hits = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_url = match &cursor {
            Some(cursor) => format!("{url}&cursor={cursor}"),
            None => url.to_owned(),
        };
        let response = http.get(&page_url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{page_url}");
        let page: Value = response.json().await.unwrap();
        for hit in page["hits"].as_array().unwrap() {
            hits.push((
                hit["key"].as_str().unwrap().to_owned(),
                hit["score"].as_f64().unwrap(),
                hit["doc"].clone(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return hits,
        }
    }
}

fn keys(hits: &[(String, f64, Value)]) -> Vec<&str> {
    hits.iter().map(|(key, _, _)| key.as_str()).collect()
}

fn key_set(hits: &[(String, f64, Value)]) -> BTreeSet<&str> {
    hits.iter().map(|(key, _, _)| key.as_str()).collect()
}

/// Hits by key with their documents, for comparisons that ignore scores
/// (BM25 statistics depend on the index's segments and deleted documents).
fn docs(hits: &[(String, f64, Value)]) -> BTreeMap<String, Value> {
    hits.iter()
        .map(|(key, _, doc)| (key.clone(), doc.clone()))
        .collect()
}

#[tokio::test]
async fn search_follows_the_view_ranks_filters_and_pages() {
    let daemon = InProcess::start(|_| {}, None);
    let http = client();
    let base = daemon.url("/search/account_search");
    let mut writer = Writer::new(daemon.log.clone());
    writer
        .append("a1", &[("AccountOpened", json!({"owner": "Ada Lovelace"}))])
        .await;
    writer
        .append("a2", &[("AccountOpened", json!({"owner": "Ada Byron"}))])
        .await;
    writer
        .append("g1", &[("AccountOpened", json!({"owner": "Grace Hopper"}))])
        .await;
    let last = writer
        .append(
            "g2",
            &[("AccountOpened", json!({"owner": "Grace Lovelace"}))],
        )
        .await;

    // consistent_with waits for the index's commit, so the last account is there.
    let hits = search_all(&http, &format!("{base}?q=grace&consistent_with={last}")).await;
    assert_eq!(key_set(&hits), BTreeSet::from(["g1", "g2"]));
    assert_eq!(
        hits.iter().find(|h| h.0 == "g2").unwrap().2["owner"],
        "Grace Lovelace"
    );

    // A document matching both terms ranks above those matching one.
    let hits = search_all(&http, &format!("{base}?q=ada%20lovelace")).await;
    assert_eq!(key_set(&hits), BTreeSet::from(["a1", "a2", "g2"]));
    assert_eq!(keys(&hits)[0], "a1", "{hits:?}");
    assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1), "{hits:?}");
    assert!(
        search_all(&http, &format!("{base}?q=nobody"))
            .await
            .is_empty()
    );

    // A change updates the indexed document: closing moves it between filters.
    let closed = writer.append("a2", &[("AccountClosed", json!({}))]).await;
    let hits = search_all(
        &http,
        &format!("{base}?q=ada&status=closed&consistent_with={closed}"),
    )
    .await;
    assert_eq!(keys(&hits), ["a2"]);
    assert_eq!(hits[0].2["status"], "closed");
    let hits = search_all(&http, &format!("{base}?q=ada&status=open")).await;
    assert_eq!(keys(&hits), ["a1"]);
    let deposit = writer
        .append("g1", &[("MoneyDeposited", json!({"amount": 42}))])
        .await;
    let hits = search_all(
        &http,
        &format!("{base}?balance=42&consistent_with={deposit}"),
    )
    .await;
    assert_eq!(keys(&hits), ["g1"]);

    // Paging yields every hit exactly once, across pages of ties.
    let mut last = String::new();
    for n in 0..23 {
        last = writer
            .append(
                &format!("p{n:02}"),
                &[("AccountOpened", json!({"owner": format!("Pat Paged {n}")}))],
            )
            .await;
    }
    let hits = search_all(
        &http,
        &format!("{base}?q=paged&limit=5&consistent_with={last}"),
    )
    .await;
    assert_eq!(hits.len(), 23);
    let unique = key_set(&hits);
    assert_eq!(unique.len(), 23);
    assert!(unique.iter().all(|key| key.starts_with('p')));
    // The empty query matches every document.
    let all = search_all(&http, &format!("{base}?q=&limit=7")).await;
    assert_eq!(all.len(), 27);
}

#[tokio::test]
async fn unknown_searches_and_bad_queries_are_problems() {
    let daemon = InProcess::start(|_| {}, None);
    let http = client();
    for name in ["nope", "accounts", "daily_flows"] {
        let response = http
            .get(daemon.url(&format!("/search/{name}?q=x")))
            .send()
            .await
            .unwrap();
        expect_problem(response, 404).await;
    }
    for bad in [
        "q=%22unclosed",
        "q=owner%3A",
        "owner=ada",
        "nosuchfield=1",
        "balance=lots",
        "limit=0",
        "limit=-1",
        "limit=100000",
        "cursor=%21%21",
        "q=a&q=b",
        "consistent_with=garbage",
        "consistent_with=cqrsd.account%3A999%3A0",
    ] {
        let response = http
            .get(daemon.url(&format!("/search/account_search?{bad}")))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert_eq!(status, 400, "{bad}");
        expect_problem(response, 400).await;
    }
    // The OpenAPI document describes the route, once per search projection.
    let api: Value = http
        .get(daemon.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        api["paths"]["/search/account_search"]["get"].is_object(),
        "{api}"
    );
}

#[tokio::test]
async fn a_deleted_view_document_leaves_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let domain = cqrsd::domain::EXAMPLE_DOMAIN.replace(
        "[projections.accounts.on.AccountClosed]\nset = { status = \"'closed'\" }",
        "[projections.accounts.on.AccountClosed]\ndelete = true",
    );
    assert_ne!(domain, cqrsd::domain::EXAMPLE_DOMAIN);
    let path = dir.path().join("domain.toml");
    std::fs::write(&path, domain).unwrap();
    let daemon = InProcess::start(|config| config.domain.path = Some(path), None);
    let http = client();
    let base = daemon.url("/search/account_search");
    let mut writer = Writer::new(daemon.log.clone());
    writer
        .append("d1", &[("AccountOpened", json!({"owner": "Dora Deleted"}))])
        .await;
    let opened = writer
        .append("d2", &[("AccountOpened", json!({"owner": "Dora Kept"}))])
        .await;
    let hits = search_all(&http, &format!("{base}?q=dora&consistent_with={opened}")).await;
    assert_eq!(key_set(&hits), BTreeSet::from(["d1", "d2"]));
    let closed = writer.append("d1", &[("AccountClosed", json!({}))]).await;
    let hits = search_all(&http, &format!("{base}?q=dora&consistent_with={closed}")).await;
    assert_eq!(keys(&hits), ["d2"]);
}

/// Waits until `name` reports generation `generation` and is running.
async fn wait_rebuilt(http: &reqwest::Client, daemon: &InProcess, name: &str, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report: Value = http
            .get(daemon.url("/admin/projections"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let projection = report["projections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone();
        if projection["generation"] == generation && projection["state"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "never rebuilt: {projection}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn search_positions(report: &Value) -> Value {
    report["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "account_search")
        .map(|p| p["partitions"].clone())
        .unwrap()
}

#[tokio::test]
async fn a_restart_resumes_exactly_and_equals_a_rebuild() {
    let queries = ["q=", "q=ada", "q=grace%20hopper", "status=closed"];
    let daemon = InProcess::start(|_| {}, None);
    let http = client();
    let mut writer = Writer::new(daemon.log.clone());
    for n in 0..12 {
        let owner = if n % 2 == 0 { "Ada" } else { "Grace Hopper" };
        writer
            .append(
                &format!("r{n}"),
                &[("AccountOpened", json!({"owner": format!("{owner} {n}")}))],
            )
            .await;
    }
    writer.append("r3", &[("AccountClosed", json!({}))]).await;
    let before_report = wait_caught_up(&http, &daemon.url("")).await;
    let mut before = Vec::new();
    for query in queries {
        let url = daemon.url(&format!("/search/account_search?{query}"));
        before.push(docs(&search_all(&http, &url).await));
    }
    assert_eq!(before[0].len(), 12);
    // The writer's handle on the log would keep it locked against the restart.
    drop(writer);
    let dir = daemon.stop_keeping_data();

    let daemon = InProcess::start_in(dir, |_| {}, None);
    // The committed positions are where the first daemon stopped.
    let report = wait_caught_up(&http, &daemon.url("")).await;
    assert_eq!(search_positions(&report), search_positions(&before_report));
    for (query, expected) in queries.iter().zip(&before) {
        let url = daemon.url(&format!("/search/account_search?{query}"));
        assert_eq!(&docs(&search_all(&http, &url).await), expected, "{query}");
    }

    // More changes after the restart, then a rebuild gives the same results.
    let mut writer = Writer::new(daemon.log.clone());
    let last = writer
        .append("late", &[("AccountOpened", json!({"owner": "Ada Late"}))])
        .await;
    let mut after = Vec::new();
    for query in queries {
        let url = daemon.url(&format!(
            "/search/account_search?{query}&consistent_with={last}"
        ));
        after.push(search_all(&http, &url).await);
    }
    assert_eq!(after[0].len(), 13);
    assert!(key_set(&after[1]).contains("late"));
    let response = http
        .post(daemon.url("/admin/projections/account_search/rebuild"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    wait_rebuilt(&http, &daemon, "account_search", 1).await;
    for (query, expected) in queries.iter().zip(&after) {
        let url = daemon.url(&format!("/search/account_search?{query}"));
        let rebuilt = search_all(&http, &url).await;
        assert_eq!(docs(&rebuilt), docs(expected), "{query}");
    }
    // The best hit for a two-term query is still one matching both terms.
    let url = daemon.url("/search/account_search?q=grace%20hopper");
    let best = search_all(&http, &url).await;
    assert!(
        best[0].2["owner"]
            .as_str()
            .unwrap()
            .starts_with("Grace Hopper")
    );
}

/// The value of a counter in a Prometheus scrape (0 when absent).
fn counter(scrape: &str, name_and_labels: &str) -> u64 {
    scrape
        .lines()
        .find_map(|line| {
            line.strip_prefix(name_and_labels)?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |value| value as u64)
}

async fn search_counters(http: &reqwest::Client, base: &str) -> (u64, u64) {
    let scrape = crate::harness::get_text(http, &format!("{base}/metrics")).await;
    (
        counter(
            &scrape,
            r#"cqrsd_search_commits_total{projection="account_search"}"#,
        ),
        counter(
            &scrape,
            r#"cqrsd_search_documents_total{projection="account_search"}"#,
        ),
    )
}

/// Issue 12 item 5: during a catch-up, documents reach tantivy once per
/// changed key and commit, not once per event, in a few large commits; and a
/// single write is still searchable through `consistent_with`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_indexes_each_changed_document_once_per_commit() {
    use crate::harness::{Process, ProcessOptions, command};
    const OTHERS: usize = 30;
    const DEPOSITS: usize = 1500;
    let daemon = Process::start(ProcessOptions::default());
    let base = daemon.url("");
    let http = client();
    for n in 0..OTHERS {
        let response = command(
            &http,
            &base,
            &format!("account/o{n}/open"),
            json!({"owner": "other"}),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    let response = command(&http, &base, "account/hot/open", json!({"owner": "hot"})).await;
    assert_eq!(response.status(), 200);
    let mut senders = Vec::new();
    for _ in 0..8 {
        let (http, base) = (http.clone(), base.clone());
        senders.push(tokio::spawn(async move {
            for _ in 0..DEPOSITS / 8 {
                let response =
                    command(&http, &base, "account/hot/deposit", json!({"amount": 1})).await;
                assert_eq!(response.status(), 200);
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let report = wait_caught_up(&http, &base).await;
    let generation = report["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "account_search")
        .unwrap()["generation"]
        .as_u64()
        .unwrap();
    let (commits_before, documents_before) = search_counters(&http, &base).await;

    // A rebuild catches up over the whole log: every event again.
    let response = http
        .post(format!("{base}/admin/projections/account_search/rebuild"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = wait_caught_up(&http, &base).await;
        let search = report["projections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "account_search")
            .unwrap()
            .clone();
        if search["generation"].as_u64() == Some(generation + 1) {
            break;
        }
        assert!(Instant::now() < deadline, "never rebuilt: {search}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (commits_after, documents_after) = search_counters(&http, &base).await;
    let (commits, documents) = (
        commits_after - commits_before,
        documents_after - documents_before,
    );
    let changed_keys = OTHERS as u64 + 1;
    let events = changed_keys + (DEPOSITS / 8 * 8) as u64;
    // Every key reached the new index, and each at most once per commit ...
    assert!(
        documents >= changed_keys,
        "{documents} documents for {changed_keys} keys"
    );
    assert!(
        documents <= changed_keys * commits,
        "{documents} documents in {commits} commits of at most {changed_keys} keys"
    );
    // ... so far fewer documents than events went to tantivy (the log is
    // read 1,000 records at a time, so a batch holds hundreds of the hot
    // account's deposits), and the commits were few.
    assert!(
        documents * 10 < events,
        "{documents} documents for {events} events: not batched"
    );
    assert!(
        commits * 100 < events,
        "{commits} commits for {events} events"
    );

    // A single write is still searchable right after its answer.
    let response = command(
        &http,
        &base,
        "account/fresh/open",
        json!({"owner": "zelda"}),
    )
    .await;
    let reply: Value = response.json().await.unwrap();
    let position = reply["position"].as_str().unwrap();
    let hits = search_all(
        &http,
        &format!("{base}/search/account_search?q=zelda&consistent_with={position}"),
    )
    .await;
    assert_eq!(keys(&hits), ["fresh"]);
}
