//! `cqrsd bench`: the load generator runs its scenarios against the real
//! binary and reports the JSON the issue asks for. No timing is asserted:
//! only the shape, that work was done, and that the work really happened.

use serde_json::Value;

use crate::harness::{Process, ProcessOptions, client, kafka_brokers, run_cli, skip_kafka};

/// Runs `cqrsd bench <args> --json` and returns its one JSON object per scenario.
fn bench(args: &[&str]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, stdout, stderr) = run_cli(&all, dir.path());
    assert_eq!(code, 0, "cqrsd {all:?} failed:\n{stdout}\n{stderr}");
    stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn assert_shape(report: &Value, scenario: &str) {
    assert_eq!(report["scenario"], scenario, "{report}");
    for key in ["throughput", "p50_ms", "p99_ms", "p999_ms"] {
        assert!(report[key].is_number(), "{key} missing in {report}");
    }
    assert!(report["skipped"].is_null(), "{report}");
    assert!(report["throughput"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["operations"].as_u64().unwrap() > 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_against_a_running_daemon_really_append_the_deposits() {
    let daemon = Process::start(ProcessOptions::default());
    daemon.ready().await;
    let url = daemon.url("");
    let reports = tokio::task::spawn_blocking(move || {
        bench(&[
            "commands",
            "--url",
            &url,
            "--duration",
            "1",
            "--aggregates",
            "20",
            "--clients",
            "4",
        ])
    })
    .await
    .unwrap();
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_shape(report, "commands");
    assert!(report["limit"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["ratio"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["half_rate_p99_ms"].is_number(), "{report}");
    // The latency limit: the baseline POST (here one the schema rejects)
    // sent at the same rate in the same run.
    assert!(report["half_rate_baseline_p99_ms"].is_number(), "{report}");
    assert!(
        report["half_rate_baseline_throughput"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(report["half_rate_baseline_errors"], 0, "{report}");
    // Every counted deposit is in an account's history: the versions beyond
    // the opening event add up to at least the successful deposits of both phases.
    let prefix = report["account_prefix"].as_str().unwrap();
    let http = client();
    let mut deposits = 0;
    for i in 0..20 {
        let url = daemon.url(&format!("/aggregates/account/{prefix}-{i}"));
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "account {i} was not opened");
        let body: Value = response.json().await.unwrap();
        deposits += body["version"].as_u64().unwrap() - 1;
    }
    let counted = report["operations"].as_u64().unwrap()
        + (report["half_rate_throughput"].as_f64().unwrap() > 0.0) as u64;
    assert!(
        deposits >= counted,
        "{deposits} deposits in the log, {counted} counted"
    );
}

#[test]
fn baseline_http_starts_its_own_daemon_and_reports_footprint() {
    let reports = bench(&["baseline-http", "--duration", "1", "--clients", "4"]);
    let report = &reports[0];
    assert_shape(report, "baseline-http");
    assert!(report["get_throughput"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["post"], "no-op POST");
    assert!(report["peak_rss_mib"].as_u64().unwrap() > 0, "{report}");
    assert!(report["disk_bytes"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn queries_and_isolation_run_in_process() {
    let queries = bench(&[
        "queries",
        "--duration",
        "1",
        "--aggregates",
        "30",
        "--clients",
        "4",
    ]);
    assert_shape(&queries[0], "queries");
    assert_eq!(queries[0]["limit_name"], "no-op GET");
    let isolation = bench(&[
        "isolation",
        "--duration",
        "1",
        "--aggregates",
        "30",
        "--clients",
        "4",
        "--rate",
        "50",
    ]);
    assert_shape(&isolation[0], "isolation");
    assert!(isolation[0]["p99_alone_ms"].is_number());
    assert!(isolation[0]["flood_queries_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn read_side_scenarios_project_restart_and_rebuild_a_prefilled_log() {
    let small = ["--events", "3000", "--aggregates", "100", "--duration", "1"];
    for scenario in ["projection", "restart", "rebuild"] {
        let mut args = vec![scenario];
        args.extend_from_slice(&small);
        let reports = bench(&args);
        assert_eq!(reports.len(), 1, "{reports:?}");
        let report = &reports[0];
        assert_eq!(report["scenario"], scenario);
        assert!(report["throughput"].as_f64().unwrap() > 0.0, "{report}");
        assert_eq!(report["operations"], 3000, "{report}");
        assert!(
            report["disk_per_payload"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        // The log alone is part of the data directory, and holds at least
        // the payload it frames.
        let log = report["log_disk_per_payload"].as_f64().unwrap();
        assert!(
            log >= 1.0 && log <= report["disk_per_payload"].as_f64().unwrap(),
            "{report}"
        );
        if scenario == "projection" {
            assert!(report["search_events_per_s"].as_f64().unwrap() > 0.0);
            assert!(report["aggregation_events_per_s"].as_f64().unwrap() > 0.0);
        } else {
            assert!(report["seconds"].as_f64().unwrap() > 0.0);
        }
    }
}

#[test]
fn kafka_compares_commands_with_a_raw_producer_on_the_same_broker() {
    if skip_kafka() {
        return;
    }
    let brokers = kafka_brokers();
    let reports = bench(&[
        "kafka",
        "--brokers",
        &brokers,
        "--duration",
        "1",
        "--aggregates",
        "10",
        "--clients",
        "4",
    ]);
    let report = &reports[0];
    assert_shape(report, "kafka");
    assert!(
        report["raw_produce_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(report["limit"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn bad_arguments_are_refused_without_running() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_cli(&["bench", "commands", "--rate", "0"], dir.path());
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = run_cli(&["bench", "nonsense"], dir.path());
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = run_cli(
        &[
            "bench",
            "commands",
            "--url",
            "http://example.invalid:8080",
            "--duration",
            "1",
        ],
        dir.path(),
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("loopback"), "{stderr}");
}

/// `cqrsd bench policy` runs the shop with and without its policies and
/// reports orders through the chain next to orders without policies.
#[test]
fn policy_reports_the_chain_next_to_the_write_side_alone() {
    let reports = bench(&["policy", "--duration", "1", "--clients", "2"]);
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_eq!(report["scenario"], "policy", "{report}");
    assert!(report["throughput"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["operations"].as_u64().unwrap() > 0, "{report}");
    assert!(report["limit"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["policy_commands_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(report["errors"], 0, "{report}");
}
