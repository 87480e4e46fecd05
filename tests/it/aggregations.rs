//! Aggregations equal a fold of the events, and survive a restart exactly.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::harness::{InProcess, client};
use crate::readside::{Writer, ts, wait_caught_up};

/// (day, flow) → (count, total, largest).
fn fold_flows(events: &[cqrsd::log::Event]) -> BTreeMap<(String, String), (u64, f64, f64)> {
    let mut groups: BTreeMap<(String, String), (u64, f64, f64)> = BTreeMap::new();
    for event in events {
        if event.event_type != "MoneyDeposited" && event.event_type != "MoneyWithdrawn" {
            continue;
        }
        let amount = event.data["amount"].as_f64().unwrap();
        let key = (
            event.timestamp.format("%Y-%m-%d").to_string(),
            event.event_type.clone(),
        );
        let entry = groups.entry(key).or_insert((0, 0.0, f64::MIN));
        entry.0 += 1;
        entry.1 += amount;
        entry.2 = entry.2.max(amount);
    }
    groups
}

async fn rows(http: &reqwest::Client, url: &str) -> Vec<Value> {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    let body: Value = response.json().await.unwrap();
    body["rows"].as_array().unwrap().clone()
}

fn check_rows(rows: &[Value], expected: &BTreeMap<(String, String), (u64, f64, f64)>) {
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    for row in rows {
        let key = (
            row["day"].as_str().unwrap().to_owned(),
            row["flow"].as_str().unwrap().to_owned(),
        );
        let (count, total, largest) = expected[&key];
        assert_eq!(row["count"], json!(count), "{row}");
        assert!(
            (row["total"].as_f64().unwrap() - total).abs() < 1e-9,
            "{row}"
        );
        assert_eq!(row["largest"].as_f64().unwrap(), largest, "{row}");
        let average = row["average"].as_f64().unwrap();
        assert!((average - total / count as f64).abs() < 1e-9, "{row}");
    }
}

#[tokio::test]
async fn aggregation_rows_equal_a_fold() {
    let daemon = InProcess::start(|c| c.projections.batch_size = 5, None);
    let http = client();
    let mut writer = Writer::new(daemon.log.clone());
    let days = ["2026-11-26T09:00:00Z", "2026-11-27T23:59:59Z"];
    for i in 0..30 {
        let id = format!("a{i}");
        let at = ts(days[i % 2]);
        writer
            .append_at(&id, &[("AccountOpened", json!({"owner": "x"}))], at)
            .await;
        // Integers and decimals mix in one sum.
        let amount = if i % 4 == 0 {
            json!(i * 10)
        } else {
            json!(i as f64 + 0.25)
        };
        writer
            .append_at(&id, &[("MoneyDeposited", json!({"amount": amount}))], at)
            .await;
        writer
            .append_at(&id, &[("MoneyWithdrawn", json!({"amount": 1}))], at)
            .await;
    }
    wait_caught_up(&http, &daemon.url("")).await;
    let expected = fold_flows(&writer.events);
    check_rows(
        &rows(&http, &daemon.url("/aggregations/daily_flows")).await,
        &expected,
    );

    let day: BTreeMap<_, _> = expected
        .iter()
        .filter(|((day, _), _)| day == "2026-11-27")
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    check_rows(
        &rows(
            &http,
            &daemon.url("/aggregations/daily_flows?day=2026-11-27"),
        )
        .await,
        &day,
    );
    let one: BTreeMap<_, _> = expected
        .iter()
        .filter(|((day, flow), _)| day == "2026-11-26" && flow == "MoneyWithdrawn")
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    check_rows(
        &rows(
            &http,
            &daemon.url("/aggregations/daily_flows?day=2026-11-26&flow=MoneyWithdrawn"),
        )
        .await,
        &one,
    );
    assert!(
        rows(
            &http,
            &daemon.url("/aggregations/daily_flows?day=1999-01-01")
        )
        .await
        .is_empty()
    );
    daemon.stop();
}

#[tokio::test]
async fn a_restart_neither_skips_nor_double_applies() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let config = {
        let data_dir = data_dir.clone();
        move |c: &mut cqrsd::config::Config| {
            c.storage.data_dir = data_dir.clone();
            c.projections.batch_size = 3;
            c.log.embedded.fsync = false;
        }
    };
    let http = client();
    let mut all_events = Vec::new();
    for round in 0..3 {
        let daemon = InProcess::start(config.clone(), None);
        let mut writer = Writer::new(daemon.log.clone());
        for i in 0..40 {
            // Each round opens its own accounts so versions start at 1.
            let id = format!("r{round}-{i}");
            writer
                .append(&id, &[("AccountOpened", json!({"owner": "x"}))])
                .await;
            writer
                .append(&id, &[("MoneyDeposited", json!({"amount": 2}))])
                .await;
        }
        all_events.append(&mut writer.events);
        drop(writer);
        if round == 2 {
            wait_caught_up(&http, &daemon.url("")).await;
            let expected = fold_flows(&all_events);
            check_rows(
                &rows(&http, &daemon.url("/aggregations/daily_flows")).await,
                &expected,
            );
            let listed =
                crate::readside::all_pages(&http, &daemon.url("/views/accounts?limit=1000")).await;
            assert_eq!(listed.len(), 120);
            assert!(listed.iter().all(|(_, d)| d["balance"] == json!(2)));
        }
        // Stopped while the projections may still be catching up.
        daemon.stop();
    }
}
