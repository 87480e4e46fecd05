//! The write side over HTTP: status codes and bodies, ordering under
//! concurrency, If-Match, idempotency, atomic multi-event commands.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Value, json};

use crate::for_each_backend;
use crate::harness::{Backend, Process, ProcessOptions, client, command, expect_problem, get_json};

for_each_backend!(
    every_command_status_code_has_its_body,
    concurrent_withdrawals_are_serialized,
    concurrent_if_match_writers_win_once_per_version,
    idempotent_retries_are_applied_once_even_after_a_restart,
    multi_event_commands_are_all_or_nothing,
    history_pages_and_unknown_aggregates,
    full_queues_answer_503,
);

async fn open(http: &reqwest::Client, base: &str, id: &str) {
    let response = command(
        http,
        base,
        &format!("account/{id}/open"),
        json!({"owner": "Ada"}),
    )
    .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

async fn deposit(http: &reqwest::Client, base: &str, id: &str, amount: Value) -> Value {
    let response = command(
        http,
        base,
        &format!("account/{id}/deposit"),
        json!({"amount": amount}),
    )
    .await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn every_command_status_code_has_its_body(backend: Backend) {
    let daemon = Process::start(ProcessOptions::backend(backend));
    let base = daemon.url("");
    let http = client();

    // 200: the reply, with the ETag of the new version and a position.
    let response = command(&http, &base, "account/a1/open", json!({"owner": "Ada"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"1\"");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["aggregate"], "account");
    assert_eq!(body["id"], "a1");
    assert_eq!(body["version"], 1);
    assert_eq!(
        body["events"],
        json!([{"type": "AccountOpened", "version": 1, "data": {"owner": "Ada"}}])
    );
    let position = body["position"].as_str().unwrap();
    // `<prefix>.account:<partition>:<offset>` (Kafka tests use their own prefixes).
    assert!(
        position.starts_with(match backend {
            Backend::Embedded => "cqrsd.account:",
            Backend::Kafka => "t",
        }) && position.contains(".account:"),
        "{position}"
    );

    // Numbers behave as users expect: 0 + 10.5 is 10.5, integers stay integers.
    deposit(&http, &base, "a1", json!(10.5)).await;
    deposit(&http, &base, "a1", json!(2)).await;
    let state = get_json(&http, &format!("{base}/aggregates/account/a1")).await;
    assert_eq!(state["state"]["balance"], json!(12.5));
    assert_eq!(state["version"], 3);

    // 400: malformed JSON.
    let response = http
        .post(format!("{base}/commands/account/a1/deposit"))
        .header("content-type", "application/json")
        .body("{\"amount\": ")
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, 400).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{problem}"
    );

    // 400: every schema violation, with its JSON path.
    let response = command(
        &http,
        &base,
        "account/a1/open",
        json!({"owner": "", "extra": 1}),
    )
    .await;
    let problem = expect_problem(response, 400).await;
    assert_eq!(problem["type"], "urn:cqrsd:problem:schema-violation");
    let paths: BTreeSet<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains("/owner"), "{problem}");
    assert!(
        paths.contains(""),
        "additionalProperties is reported at the root: {problem}"
    );
    assert!(
        problem["errors"].as_array().unwrap().len() >= 2,
        "{problem}"
    );

    // 400: a malformed id and a malformed If-Match.
    let response = command(&http, &base, "account/a%20b/open", json!({"owner": "x"})).await;
    expect_problem(response, 400).await;
    let response = http
        .post(format!("{base}/commands/account/a1/deposit"))
        .header("if-match", "three")
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    expect_problem(response, 400).await;

    // 404: unknown aggregate type, unknown command.
    let problem = expect_problem(
        command(&http, &base, "ledger/a1/open", json!({})).await,
        404,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("ledger"),
        "{problem}"
    );
    let problem = expect_problem(
        command(&http, &base, "account/a1/explode", json!({})).await,
        404,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("explode"),
        "{problem}"
    );

    // 412: If-Match names a version the aggregate is not at.
    let response = http
        .post(format!("{base}/commands/account/a1/deposit"))
        .header("if-match", "\"1\"")
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, 412).await;
    assert_eq!(problem["current_version"], 3);

    // 415: not JSON.
    let response = http
        .post(format!("{base}/commands/account/a1/deposit"))
        .header("content-type", "text/plain")
        .body("{\"amount\": 1}")
        .send()
        .await
        .unwrap();
    expect_problem(response, 415).await;

    // 422: a rule says no, with its message.
    let problem = expect_problem(
        command(&http, &base, "account/a1/withdraw", json!({"amount": 1000})).await,
        422,
    )
    .await;
    assert_eq!(problem["detail"], "insufficient funds");
    let problem = expect_problem(
        command(&http, &base, "account/a1/open", json!({"owner": "Bob"})).await,
        422,
    )
    .await;
    assert_eq!(problem["detail"], "account already exists");

    // None of the failures changed anything.
    let state = get_json(&http, &format!("{base}/aggregates/account/a1")).await;
    assert_eq!(state["version"], 3);
    assert_eq!(
        state["state"],
        json!({"balance": 12.5, "owner": "Ada", "status": "open"})
    );

    // The write side is visible in the metrics.
    let metrics = crate::harness::get_text(&http, &format!("{base}/metrics")).await;
    let log_metrics: &[&str] = match backend {
        Backend::Embedded => &[
            "cqrsd_log_group_commit_records_bucket",
            "cqrsd_log_append_seconds_bucket",
            "cqrsd_log_fsync_seconds_bucket",
        ],
        Backend::Kafka => &["cqrsd_kafka_produce_seconds_bucket"],
    };
    let command_metrics = [
        r#"cqrsd_commands_total{aggregate="account",command="deposit",outcome="accepted"} 2"#,
        r#"cqrsd_commands_total{aggregate="account",command="withdraw",outcome="rejected"} 1"#,
        r#"cqrsd_commands_total{aggregate="account",command="deposit",outcome="conflict"} 1"#,
        "cqrsd_command_duration_seconds_bucket",
        "cqrsd_command_batch_size_bucket",
        r#"cqrsd_aggregate_cache_total{result="hit"}"#,
        r#"cqrsd_aggregate_cache_total{result="miss"}"#,
    ];
    for needle in command_metrics.iter().chain(log_metrics) {
        assert!(
            metrics.contains(needle),
            "`{needle}` missing from /metrics:\n{metrics}"
        );
    }
}

async fn concurrent_withdrawals_are_serialized(backend: Backend) {
    let daemon = Process::start(ProcessOptions::backend(backend));
    let base = daemon.url("");
    let http = client();
    open(&http, &base, "shared").await;
    deposit(&http, &base, "shared", json!(100)).await;

    // 64 clients, 4 withdrawals of 1 each: 256 attempts on a balance of 100.
    let mut clients = Vec::new();
    for _ in 0..64 {
        let (http, base) = (http.clone(), base.clone());
        clients.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for _ in 0..4 {
                let response = command(
                    &http,
                    &base,
                    "account/shared/withdraw",
                    json!({"amount": 1}),
                )
                .await;
                match response.status().as_u16() {
                    200 => accepted.push(response.json::<Value>().await.unwrap()),
                    422 => {
                        let problem: Value = response.json().await.unwrap();
                        assert_eq!(problem["detail"], "insufficient funds");
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            accepted
        }));
    }
    let mut versions = Vec::new();
    for client in clients {
        for reply in client.await.unwrap() {
            versions.push(reply["version"].as_u64().unwrap());
        }
    }
    versions.sort_unstable();
    // Exactly the balance was withdrawn, and the replies' versions are 3..=102
    // with no gap and no duplicate.
    assert_eq!(versions, (3..=102).collect::<Vec<u64>>());
    let state = get_json(&http, &format!("{base}/aggregates/account/shared")).await;
    assert_eq!(state["state"]["balance"], 0);
    assert_eq!(state["version"], 102);
    let history = get_json(&http, &format!("{base}/aggregates/account/shared/events")).await;
    let logged: Vec<u64> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, (1..=102).collect::<Vec<u64>>());
}

async fn concurrent_if_match_writers_win_once_per_version(backend: Backend) {
    let daemon = Process::start(ProcessOptions::backend(backend));
    let base = daemon.url("");
    let http = client();
    open(&http, &base, "race").await;
    for version in 1..=5u64 {
        let mut writers = Vec::new();
        for _ in 0..16 {
            let (http, base) = (http.clone(), base.clone());
            writers.push(tokio::spawn(async move {
                http.post(format!("{base}/commands/account/race/deposit"))
                    .header("if-match", format!("\"{version}\""))
                    .json(&json!({"amount": 1}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        let mut statuses = HashMap::new();
        for writer in writers {
            *statuses.entry(writer.await.unwrap()).or_insert(0) += 1;
        }
        assert_eq!(
            statuses.get(&200),
            Some(&1),
            "version {version}: {statuses:?}"
        );
        assert_eq!(
            statuses.get(&412),
            Some(&15),
            "version {version}: {statuses:?}"
        );
    }
    let state = get_json(&http, &format!("{base}/aggregates/account/race")).await;
    assert_eq!(state["version"], 6);
    assert_eq!(state["state"]["balance"], 5);
}

async fn idempotent_retries_are_applied_once_even_after_a_restart(backend: Backend) {
    let daemon = Process::start(ProcessOptions::backend(backend));
    let base = daemon.url("");
    let http = client();
    open(&http, &base, "idem").await;
    let send = |http: reqwest::Client, base: String, amount: u64| async move {
        let response = http
            .post(format!("{base}/commands/account/idem/deposit"))
            .header("idempotency-key", "pay-42")
            .json(&json!({"amount": amount}))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let mut retries = Vec::new();
    for _ in 0..100 {
        retries.push(tokio::spawn(send(http.clone(), base.clone(), 7)));
    }
    let mut answers = BTreeSet::new();
    for retry in retries {
        let (status, body) = retry.await.unwrap();
        assert_eq!(status, 200, "{body}");
        answers.insert(body);
    }
    assert_eq!(answers.len(), 1, "100 identical answers: {answers:?}");
    let first = answers.into_iter().next().unwrap();
    let state = get_json(&http, &format!("{base}/aggregates/account/idem")).await;
    assert_eq!(state["state"]["balance"], 7, "applied once");

    // The same key with another body is refused, and changes nothing.
    let (status, body) = send(http.clone(), base.clone(), 8).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("idempotency-key-reused"), "{body}");

    // After a restart (here a crash), the retry still gets the first answer.
    let daemon = daemon.restart(true);
    daemon.ready().await;
    let base = daemon.url("");
    let (status, body) = send(http.clone(), base.clone(), 7).await;
    assert_eq!(status, 200);
    assert_eq!(body, first);
    // And once more after a clean restart, which checkpoints the answer.
    let daemon = daemon.restart(false);
    daemon.ready().await;
    let base = daemon.url("");
    let (status, body) = send(http.clone(), base.clone(), 7).await;
    assert_eq!(status, 200);
    assert_eq!(body, first);
    let state = get_json(&http, &format!("{base}/aggregates/account/idem")).await;
    assert_eq!(state["state"]["balance"], 7);
    assert_eq!(state["version"], 2);
}

const ORDERS: &str = r#"
[aggregates.order]
state = { status = "new", total = 0, note = "" }

[aggregates.order.commands.place]
schema = { type = "object", required = ["total"], properties = { total = { type = "integer" }, note = { type = "string" } } }
rules = [ { require = "state.status == 'new'", message = "already placed" } ]
emit = [
  { event = "OrderPlaced", data = { total = "command.total" } },
  { event = "OrderNoted", data = { note = "command.note" } },
]

[aggregates.order.events.OrderPlaced]
set = { status = "'placed'", total = "event.total" }
[aggregates.order.events.OrderNoted]
set = { note = "event.note" }
"#;

async fn multi_event_commands_are_all_or_nothing(backend: Backend) {
    let daemon = Process::start(ProcessOptions {
        domain: Some(ORDERS.to_owned()),
        ..ProcessOptions::backend(backend)
    });
    let base = daemon.url("");
    let http = client();

    // Both events, in one record, with consecutive versions.
    let reply: Value = command(
        &http,
        &base,
        "order/o1/place",
        json!({"total": 5, "note": "gift"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(reply["version"], 2);
    assert_eq!(reply["events"].as_array().unwrap().len(), 2);
    let history = get_json(&http, &format!("{base}/aggregates/order/o1/events")).await;
    let events = history["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0]["position"], events[1]["position"],
        "one record holds both"
    );
    assert_eq!(events[0]["type"], "OrderPlaced");
    assert_eq!(events[1]["type"], "OrderNoted");
    let state = get_json(&http, &format!("{base}/aggregates/order/o1")).await;
    assert_eq!(
        state["state"],
        json!({"status": "placed", "total": 5, "note": "gift"})
    );

    // The second event cannot be built (no `note`): neither is written.
    let response = command(&http, &base, "order/o2/place", json!({"total": 5})).await;
    let problem = expect_problem(response, 422).await;
    assert!(
        problem["place"].as_str().unwrap().contains("emit[1]"),
        "{problem}"
    );
    let response = http
        .get(format!("{base}/aggregates/order/o2/events"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 404).await;
    let response = http
        .get(format!("{base}/aggregates/order/o2"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 404).await;
}

async fn history_pages_and_unknown_aggregates(backend: Backend) {
    let daemon = Process::start(ProcessOptions::backend(backend));
    let base = daemon.url("");
    let http = client();
    open(&http, &base, "h").await;
    for amount in 1..=9 {
        deposit(&http, &base, "h", json!(amount)).await;
    }
    let page = get_json(
        &http,
        &format!("{base}/aggregates/account/h/events?limit=4"),
    )
    .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 4);
    assert_eq!(page["next_from_version"], 5);
    let page = get_json(
        &http,
        &format!("{base}/aggregates/account/h/events?from_version=5&limit=100"),
    )
    .await;
    let versions: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (5..=10).collect::<Vec<u64>>());
    assert_eq!(page["next_from_version"], Value::Null);

    for path in [
        "/aggregates/account/nobody",
        "/aggregates/account/nobody/events",
        "/aggregates/ledger/h",
    ] {
        expect_problem(http.get(format!("{base}{path}")).send().await.unwrap(), 404).await;
    }
    let response = http
        .get(format!("{base}/aggregates/account/h/events?limit=0"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 400).await;
}

async fn full_queues_answer_503(backend: Backend) {
    // A 20 ms group-commit wait makes every append slow, so the one-slot
    // queue fills for sure.
    let mut options = ProcessOptions::backend(backend);
    options
        .config
        .push_str("[command]\nqueue_depth = 1\nmax_batch = 1\n[log.embedded]\ngroup_commit_max_delay_us = 20000\n");
    let daemon = Process::start(options);
    let base = daemon.url("");
    let http = client();
    open(&http, &base, "busy").await;
    let mut senders = Vec::new();
    for _ in 0..200 {
        let (http, base) = (http.clone(), base.clone());
        senders.push(tokio::spawn(async move {
            let response =
                command(&http, &base, "account/busy/deposit", json!({"amount": 1})).await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }));
    }
    let (mut accepted, mut refused) = (0u64, 0u64);
    for sender in senders {
        let (status, body) = sender.await.unwrap();
        match status {
            200 => accepted += 1,
            503 => {
                assert_eq!(body["type"], "urn:cqrsd:problem:overloaded");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        refused > 0,
        "a one-command queue never filled under 200 concurrent commands"
    );
    // Refused commands changed nothing.
    let state = get_json(&http, &format!("{base}/aggregates/account/busy")).await;
    assert_eq!(state["state"]["balance"], accepted);
}
