//! Projection administration: quarantined events are reported and skipped,
//! rebuilds swap in without a failed or half-built query, metrics show lag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::{Value, json};

use crate::harness::{InProcess, client};
use crate::readside::{Writer, all_pages, wait_caught_up};

fn projection<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {report}"))
}

#[tokio::test]
async fn a_poison_event_is_quarantined_and_later_events_still_apply() {
    let daemon = InProcess::start(|_| {}, None);
    let http = client();
    let mut writer = Writer::new(daemon.log.clone());
    writer
        .append("p1", &[("AccountOpened", json!({"owner": "ada"}))])
        .await;
    // A string amount makes `doc.balance - event.amount` and `sum(event.amount)` fail.
    let poison = writer
        .append("p1", &[("MoneyWithdrawn", json!({"amount": "lots"}))])
        .await;
    // A record whose value does not decode at all.
    let mut garbage =
        cqrsd::log::encode(&writer.events[..1], cqrsd::log::Encoding::MessagePack).unwrap();
    garbage.value = b"\xc1 not msgpack".to_vec();
    let garbage = writer.append_record("p1", garbage).await;
    writer
        .append("p1", &[("MoneyDeposited", json!({"amount": 5}))])
        .await;

    let report = wait_caught_up(&http, &daemon.url("")).await;
    let doc: Value = http
        .get(daemon.url("/views/accounts/p1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["doc"]["balance"], json!(5), "{doc}");

    for name in ["accounts", "daily_flows"] {
        let p = projection(&report, name);
        assert_eq!(p["quarantine_count"], 2, "{p}");
        let quarantined = p["quarantined"].as_array().unwrap();
        let positions: Vec<&str> = quarantined
            .iter()
            .map(|q| q["position"].as_str().unwrap())
            .collect();
        assert!(positions.contains(&poison.as_str()), "{p}");
        assert!(positions.contains(&garbage.as_str()), "{p}");
        let bad = quarantined
            .iter()
            .find(|q| q["position"] == poison)
            .unwrap();
        assert_eq!(bad["event"]["data"]["amount"], "lots", "{bad}");
        assert!(!bad["reason"].as_str().unwrap().is_empty());
        let undecodable = quarantined
            .iter()
            .find(|q| q["position"] == garbage)
            .unwrap();
        assert!(undecodable["event"].is_null());
    }
    let rows: Value = http
        .get(daemon.url("/aggregations/daily_flows"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rows["rows"].as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows["rows"][0]["total"], json!(5));

    let metrics = http
        .get(daemon.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "cqrsd_projection_quarantined_total",
        "cqrsd_projection_events_total",
        "cqrsd_projection_lag",
        "cqrsd_projection_position",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    daemon.stop();
}

#[tokio::test]
async fn a_rebuild_under_query_load_never_shows_a_half_built_view() {
    let daemon = InProcess::start(
        |c| {
            c.projections.batch_size = 2;
            c.query.threads = 2;
        },
        None,
    );
    let http = client();
    let mut writer = Writer::new(daemon.log.clone());
    let accounts = 150;
    for i in 0..accounts {
        let id = format!("b{i:03}");
        writer
            .append(
                &id,
                &[("AccountOpened", json!({"owner": format!("o{}", i % 7)}))],
            )
            .await;
        writer
            .append(&id, &[("MoneyDeposited", json!({"amount": 3}))])
            .await;
    }
    wait_caught_up(&http, &daemon.url("")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (http, stop, queries) = (http.clone(), stop.clone(), queries.clone());
        let base = daemon.url("");
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let items = all_pages(&http, &format!("{base}/views/accounts?limit=1000")).await;
                assert_eq!(items.len(), accounts, "a query saw a partial view");
                assert!(items.iter().all(|(_, d)| d["balance"] == json!(3)));
                let response = http
                    .get(format!("{base}/aggregations/daily_flows"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                let rows: Value = response.json().await.unwrap();
                assert_eq!(rows["rows"][0]["count"], json!(accounts), "{rows}");
                queries.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Two requests at once: exactly one rebuild starts, the other is refused.
    let url = daemon.url("/admin/projections/accounts/rebuild");
    let (a, b) = tokio::join!(http.post(&url).send(), http.post(&url).send());
    let mut statuses = [a.unwrap().status().as_u16(), b.unwrap().status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 409]);
    let accepted = http
        .post(daemon.url("/admin/projections/daily_flows/rebuild"))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let body: Value = accepted.json().await.unwrap();
    assert_eq!(body["state"], "rebuilding");

    let report = wait_caught_up(&http, &daemon.url("")).await;
    for name in ["accounts", "daily_flows"] {
        let p = projection(&report, name);
        assert!(p["rebuild"].is_null(), "{report}");
        assert_eq!(p["generation"], 1, "the rebuilt generation is live: {p}");
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(queries.load(Ordering::Relaxed) > 0);

    let missing = http
        .post(daemon.url("/admin/projections/nope/rebuild"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    daemon.stop();
}

#[tokio::test]
async fn the_cli_rebuilds_offline_and_refuses_while_the_daemon_runs() {
    use crate::harness::{Process, ProcessOptions, run_cli};
    let mut daemon = Process::start(ProcessOptions::default());
    let data_dir = daemon.dir.path().join("data");
    let config = daemon.dir.path().join("rebuild.toml");
    std::fs::write(
        &config,
        format!("[storage]\ndata_dir = {:?}\n", data_dir.to_str().unwrap()),
    )
    .unwrap();
    let args = [
        "projections",
        "rebuild",
        "accounts",
        "--config",
        config.to_str().unwrap(),
    ];
    let (code, _, stderr) = run_cli(&args, daemon.dir.path());
    assert_ne!(code, 0);
    assert!(stderr.contains("stop the daemon"), "{stderr}");

    daemon.signal("TERM");
    assert_eq!(
        daemon.wait_exit(std::time::Duration::from_secs(15)).code(),
        Some(0)
    );
    let (code, stdout, stderr) = run_cli(&args, daemon.dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("rebuilt projection accounts"), "{stdout}");
    let (code, _, stderr) = run_cli(
        &[
            "projections",
            "rebuild",
            "nope",
            "--config",
            config.to_str().unwrap(),
        ],
        daemon.dir.path(),
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("nope"), "{stderr}");
}
