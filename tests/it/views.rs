//! Views: documents, filters, ordering and paging equal a fold of the events;
//! read-your-writes with `consistent_with`; bad queries are 400 problems.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::harness::{InProcess, client, expect_problem};
use crate::readside::{Writer, all_pages, comparable, fold_accounts, wait_caught_up};

const OWNERS: [&str; 4] = ["ada", "bob", "cy", "dee"];

async fn seed(writer: &mut Writer, count: usize) {
    for i in 0..count {
        let id = format!("acc-{i:03}");
        writer
            .append(&id, &[("AccountOpened", json!({"owner": OWNERS[i % 4]}))])
            .await;
        writer
            .append(
                &id,
                &[("MoneyDeposited", json!({"amount": i as f64 + 0.5}))],
            )
            .await;
        if i % 3 == 0 {
            writer
                .append(
                    &id,
                    &[
                        ("MoneyWithdrawn", json!({"amount": 0.5})),
                        ("AccountClosed", json!({})),
                    ],
                )
                .await;
        }
    }
}

#[tokio::test]
async fn documents_filters_ordering_and_pages_equal_a_fold() {
    let daemon = InProcess::start(|c| c.projections.batch_size = 7, None);
    let http = client();
    let base = daemon.url("");
    let mut writer = Writer::new(daemon.log.clone());
    seed(&mut writer, 60).await;
    wait_caught_up(&http, &base).await;
    let expected = fold_accounts(&writer.events);

    for (id, doc) in &expected {
        let response = http
            .get(daemon.url(&format!("/views/accounts/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["key"], json!(id));
        assert_eq!(comparable(&body["doc"]), *doc, "{id}");
    }

    // Paging by key while new accounts are opened and existing ones change:
    // every account that existed before is listed exactly once.
    let appender = {
        let mut writer = Writer::new(daemon.log.clone());
        tokio::spawn(async move {
            for i in 0..40 {
                writer
                    .append(
                        &format!("new-{i:03}"),
                        &[("AccountOpened", json!({"owner": "eve"}))],
                    )
                    .await;
                writer
                    .append(
                        &format!("acc-{:03}", i + 1),
                        &[("MoneyDeposited", json!({"amount": 1}))],
                    )
                    .await;
            }
        })
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (key, _) in all_pages(&http, &daemon.url("/views/accounts?limit=7")).await {
        *seen.entry(key).or_default() += 1;
    }
    for (key, _) in all_pages(&http, &daemon.url("/views/accounts?limit=5&order=owner")).await {
        assert!(key.starts_with("acc-") || key.starts_with("new-"));
    }
    appender.await.unwrap();
    assert!(seen.values().all(|n| *n == 1), "duplicates: {seen:?}");
    for id in expected.keys() {
        assert_eq!(seen.get(id), Some(&1), "{id} missing");
    }

    // Once quiet, filters and orders equal the fold exactly.
    wait_caught_up(&http, &base).await;
    let expected = fold_accounts(&writer_events(&writer, &daemon).await);
    let listed = all_pages(&http, &daemon.url("/views/accounts?limit=1000")).await;
    assert_eq!(listed.len(), expected.len());

    let mut open_desc: Vec<(String, String)> = expected
        .iter()
        .filter(|(_, d)| d["status"] == "open")
        .map(|(id, d)| (d["owner"].as_str().unwrap().to_owned(), id.clone()))
        .collect();
    open_desc.sort();
    open_desc.reverse();
    let got = all_pages(
        &http,
        &daemon.url("/views/accounts?where.status=open&order=-owner&limit=6"),
    )
    .await;
    let got: Vec<(String, String)> = got
        .into_iter()
        .map(|(id, d)| (d["owner"].as_str().unwrap().to_owned(), id))
        .collect();
    assert_eq!(got, open_desc);

    let bobs: Vec<String> = expected
        .iter()
        .filter(|(_, d)| d["owner"] == "bob")
        .map(|(id, _)| id.clone())
        .collect();
    let got: Vec<String> = all_pages(
        &http,
        &daemon.url("/views/accounts?where.owner=bob&limit=4"),
    )
    .await
    .into_iter()
    .map(|(id, _)| id)
    .collect();
    assert_eq!(got, bobs);

    let closed_bobs = all_pages(
        &http,
        &daemon.url("/views/accounts?where.owner=bob&where.status=closed"),
    )
    .await;
    assert!(!closed_bobs.is_empty());
    assert!(
        closed_bobs
            .iter()
            .all(|(_, d)| d["owner"] == "bob" && d["status"] == "closed")
    );
    daemon.stop();
}

/// The events appended by the seeding writer and the concurrent appender,
/// read back from the log so the fold covers both.
async fn writer_events(_writer: &Writer, daemon: &InProcess) -> Vec<cqrsd::log::Event> {
    let log = daemon.log.clone();
    tokio::task::spawn_blocking(move || {
        let topic = log.topic("account");
        let mut events = Vec::new();
        for partition in 0..log.partitions() {
            for (_, record) in log.read(&topic, partition, 0, usize::MAX).unwrap() {
                events.extend(cqrsd::log::decode(&record.headers, &record.value).unwrap());
            }
        }
        events
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn bad_queries_are_problems() {
    let daemon = InProcess::start(|_| {}, None);
    let http = client();
    let mut writer = Writer::new(daemon.log.clone());
    writer
        .append("a1", &[("AccountOpened", json!({"owner": "ada"}))])
        .await;

    let get = |path: &str| http.get(daemon.url(path)).send();
    let body = expect_problem(get("/views/accounts?where.balance=5").await.unwrap(), 400).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("balance") && detail.contains("owner") && detail.contains("status"),
        "{detail}"
    );
    assert_eq!(body["field"], "balance");
    expect_problem(get("/views/accounts?order=-balance").await.unwrap(), 400).await;
    expect_problem(get("/views/accounts?limit=0").await.unwrap(), 400).await;
    expect_problem(get("/views/accounts?limit=1001").await.unwrap(), 400).await;
    expect_problem(get("/views/accounts?limit=x").await.unwrap(), 400).await;
    expect_problem(get("/views/accounts?cursor=zz").await.unwrap(), 400).await;
    expect_problem(get("/views/accounts?cursor=01").await.unwrap(), 400).await;
    expect_problem(get("/views/accounts?bogus=1").await.unwrap(), 400).await;
    expect_problem(
        get("/views/accounts?consistent_with=nope").await.unwrap(),
        400,
    )
    .await;
    expect_problem(
        get("/views/accounts/a1?consistent_with=cqrsd.account:x:1")
            .await
            .unwrap(),
        400,
    )
    .await;
    expect_problem(get("/views/nope").await.unwrap(), 404).await;
    expect_problem(get("/views/daily_flows").await.unwrap(), 404).await;
    expect_problem(get("/views/accounts/missing").await.unwrap(), 404).await;
    expect_problem(
        get("/aggregations/daily_flows?color=red").await.unwrap(),
        400,
    )
    .await;
    expect_problem(get("/aggregations/accounts").await.unwrap(), 404).await;

    let openapi: Value = get("/openapi.json").await.unwrap().json().await.unwrap();
    for path in [
        "/views/accounts",
        "/views/accounts/{key}",
        "/aggregations/daily_flows",
        "/admin/projections",
        "/admin/projections/{name}/rebuild",
    ] {
        assert!(openapi["paths"][path].is_object(), "{path} missing");
    }
    daemon.stop();
}

#[tokio::test]
async fn consistent_with_right_after_an_append_sees_it() {
    let daemon = InProcess::start(|c| c.query.consistency_timeout_ms = 10_000, None);
    let http = client();
    let mut writer = Writer::new(daemon.log.clone());
    for i in 0..40 {
        let id = format!("rw-{i}");
        let position = writer
            .append(&id, &[("AccountOpened", json!({"owner": format!("o{i}")}))])
            .await;
        let response = http
            .get(daemon.url(&format!("/views/accounts/{id}?consistent_with={position}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{id} at {position}");
        let position = writer
            .append(&id, &[("MoneyDeposited", json!({"amount": 2}))])
            .await;
        let rows: Value = http
            .get(daemon.url(&format!(
                "/aggregations/daily_flows?flow=MoneyDeposited&consistent_with={position}"
            )))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(rows["rows"][0]["count"], json!(i + 1), "{rows}");
    }
    daemon.stop();
}

#[tokio::test]
async fn consistent_with_a_position_not_reached_is_a_504_with_the_lag() {
    let daemon = InProcess::start(|c| c.query.consistency_timeout_ms = 200, None);
    let http = client();
    let response = http
        .get(daemon.url("/views/accounts/x?consistent_with=cqrsd.account:0:1000"))
        .send()
        .await
        .unwrap();
    let body = expect_problem(response, 504).await;
    assert_eq!(body["lag"][0]["projection"], "accounts", "{body}");
    // A position on a topic the view does not read is trivially reached.
    let response = http
        .get(daemon.url("/views/accounts/x?consistent_with=cqrsd.other:0:1000"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 404).await;
    daemon.stop();
}
