//! Node roles (DESIGN.md §7): a command node and query nodes on one broker,
//! each an edge that forwards what it does not run. Real processes, the test
//! broker, and clients that send to any node.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::auth::{TestToken, token};
use crate::harness::{
    Process, client, expect_problem, free_port, kafka_brokers, kafka_config, node_url as url,
    path_str, run_cli, skip_kafka,
};

/// Starts one node of `role` on `port`, on the shared `log` section.
fn node(log: &str, role: &str, port: u16, peers: &[u16], extra: &str) -> Process {
    crate::harness::start_node(
        log,
        role,
        port,
        peers,
        &format!("response_timeout_ms = 10000\n{extra}"),
    )
}

/// GETs `path` on `node`, with a bearer token when given.
async fn send_get(
    http: &reqwest::Client,
    node: &Process,
    path: &str,
    token: Option<&str>,
) -> reqwest::Response {
    let mut request = http.get(node.url(path));
    if let Some(secret) = token {
        request = request.bearer_auth(secret);
    }
    request.send().await.unwrap()
}

/// Waits until `/admin/node` shows every peer of `node` healthy.
async fn peers_healthy(http: &reqwest::Client, node: &Process, admin: Option<&str>) {
    for _ in 0..600 {
        let response = send_get(http, node, "/admin/node", admin).await;
        let body: Value = response.json().await.unwrap();
        let peers = body["peers"].as_array().unwrap();
        if peers.iter().all(|peer| peer["healthy"] == true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the peers of {} never became healthy", node.addr);
}

async fn post_json(
    http: &reqwest::Client,
    node: &Process,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = http.post(node.url(path)).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// A command that must succeed; its reply.
async fn accepted(http: &reqwest::Client, node: &Process, path: &str, body: Value) -> Value {
    let response = post_json(http, node, path, body, &[]).await;
    assert_eq!(response.status(), 200, "POST {path} via {}", node.addr);
    response.json().await.unwrap()
}

async fn get(http: &reqwest::Client, node: &Process, path: &str) -> (u16, Value) {
    let response = send_get(http, node, path, None).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every document of the accounts view on `node`, by key.
async fn accounts(http: &reqwest::Client, node: &Process) -> BTreeMap<String, Value> {
    let (status, body) = get(http, node, "/views/accounts?limit=1000").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["next_cursor"].is_null(),
        "one page holds every account"
    );
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["key"].as_str().unwrap().to_owned(),
                item["doc"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_node_and_two_query_nodes_serve_clients_on_any_node() {
    if skip_kafka() {
        return;
    }
    let log = kafka_config(&kafka_brokers());
    let (c, q1, q2) = (free_port(), free_port(), free_port());
    let command = node(&log, "command", c, &[q1, q2], "");
    let query1 = node(&log, "query", q1, &[c, q2], "");
    let query2 = node(&log, "query", q2, &[c, q1], "");
    let http = client();
    for node in [&command, &query1, &query2] {
        node.ready().await;
        peers_healthy(&http, node, None).await;
    }
    // A query node runs no write side, a command node no read models: each
    // is ready without the other's component, and never opened its stores.
    let (_, readyz) = get(&http, &query1, "/readyz").await;
    assert_eq!(readyz["role"], "query");
    assert!(readyz["components"].get("command").is_none(), "{readyz}");
    assert!(
        readyz["components"]["projections"]["ready"] == true,
        "{readyz}"
    );
    let (_, readyz) = get(&http, &command, "/readyz").await;
    assert_eq!(readyz["role"], "command");
    assert!(
        readyz["components"].get("projections").is_none(),
        "{readyz}"
    );
    let data = |node: &Process, store: &str| node.dir.path().join("data").join(store).exists();
    assert!(!data(&command, "views") && !data(&command, "search"));
    assert!(data(&query1, "views") && !data(&query1, "command"));
    let nodes = [&command, &query1, &query2];

    // Commands through every node: each is acknowledged with a position.
    let mut last_positions = BTreeMap::new();
    for i in 0..12usize {
        let id = format!("acct-{i}");
        let opened = accepted(
            &http,
            nodes[i % 3],
            &format!("/commands/account/{id}/open"),
            json!({"owner": format!("owner-{i}")}),
        )
        .await;
        assert_eq!(opened["version"], 1);
        let deposited = accepted(
            &http,
            nodes[(i + 1) % 3],
            &format!("/commands/account/{id}/deposit"),
            json!({"amount": i + 1}),
        )
        .await;
        assert_eq!(deposited["version"], 2);
        last_positions.insert(id, deposited["position"].as_str().unwrap().to_owned());
    }

    // The position of any node's reply makes either query node show the write.
    for (id, position) in &last_positions {
        let i: usize = id.strip_prefix("acct-").unwrap().parse().unwrap();
        for node in [&query1, &query2] {
            let (status, body) = get(
                &http,
                node,
                &format!("/views/accounts/{id}?consistent_with={position}"),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["doc"]["owner"], format!("owner-{i}"), "{body}");
            assert_eq!(body["doc"]["balance"], json!(i + 1), "{body}");
        }
        // Forwarded to the command node from either query node: each
        // acknowledged command is in the log exactly once.
        let (status, history) = get(
            &http,
            nodes[i % 3],
            &format!("/aggregates/account/{id}/events"),
        )
        .await;
        assert_eq!(status, 200, "{history}");
        let events = history["events"].as_array().unwrap();
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["AccountOpened", "MoneyDeposited"], "{history}");
        assert_ne!(events[0]["command_id"], events[1]["command_id"]);
    }
    // Both replicas hold the same documents.
    let replica1 = accounts(&http, &query1).await;
    assert_eq!(replica1.len(), 12);
    assert_eq!(replica1, accounts(&http, &query2).await);
    // A command node serves views by forwarding them.
    assert_eq!(replica1, accounts(&http, &command).await);

    // An idempotent retry sent through other nodes gets the first answer.
    let key = [("idempotency-key", "retry-1")];
    let path = "/commands/account/acct-0/deposit";
    let first = post_json(&http, &query1, path, json!({"amount": 5}), &key).await;
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    for node in [&query2, &command] {
        let retry = post_json(&http, node, path, json!({"amount": 5}), &key).await;
        assert_eq!(retry.status(), 200);
        assert_eq!(retry.json::<Value>().await.unwrap(), first);
    }
    let (_, state) = get(&http, &query2, "/aggregates/account/acct-0").await;
    assert_eq!(
        state["version"], 3,
        "the retries were applied once: {state}"
    );
    assert_eq!(state["state"]["balance"], 6, "{state}");

    // A stream asked of the command node streams through from a query node.
    let mut stream = http
        .get(command.url("/events/stream?from=start&aggregate=account"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut text = String::new();
    while !text.contains("acct-11") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.chunk())
            .await
            .expect("the forwarded stream stalled")
            .unwrap()
            .expect("the forwarded stream ended");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(stream);

    // The edges counted what they forwarded, and say so.
    let (_, admin) = get(&http, &query1, "/admin/node").await;
    assert_eq!(admin["role"], "query");
    assert_eq!(admin["runs"], json!(["query"]));
    assert_eq!(admin["advertise_url"], url(q1));
    assert!(
        admin["forwards"]["command"]["forwarded"].as_u64().unwrap() >= 8,
        "{admin}"
    );
    assert!(
        admin["forwards"]["command"]["latency_ms"]["p99"].is_number(),
        "{admin}"
    );
    let roles: Vec<&str> = admin["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["command", "query"]);
    let metrics = send_get(&http, &command, "/metrics", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cqrsd_edge_forwarded_total{side=\"query\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("cqrsd_node_role{role=\"command\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cqrsd_node_peer_healthy{peer="),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_query_node_catches_up_and_its_command_node_refuses_queries_meanwhile() {
    if skip_kafka() {
        return;
    }
    let log = kafka_config(&kafka_brokers());
    let (c, q) = (free_port(), free_port());
    let command = node(&log, "command", c, &[q], "");
    let query = node(&log, "query", q, &[c], "");
    let http = client();
    for node in [&command, &query] {
        node.ready().await;
        peers_healthy(&http, node, None).await;
    }
    let mut positions = Vec::new();
    for i in 0..6 {
        let opened = accepted(
            &http,
            &query,
            &format!("/commands/account/k-{i}/open"),
            json!({"owner": "ada"}),
        )
        .await;
        positions.push(opened["position"].as_str().unwrap().to_owned());
    }
    let last = accepted(
        &http,
        &command,
        "/commands/account/k-0/deposit",
        json!({"amount": 1}),
    )
    .await;
    positions.push(last["position"].as_str().unwrap().to_owned());
    for position in &positions {
        let (status, body) = get(
            &http,
            &query,
            &format!("/views/accounts?consistent_with={position}&limit=1"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let before = accounts(&http, &query).await;

    // A forwarded request is never forwarded again: a node answers one for
    // a side it does not run with 503, so no loop can form.
    let marked = http
        .get(command.url("/views/accounts"))
        .header("cqrsd-forwarded", "1")
        .send()
        .await
        .unwrap();
    assert!(marked.headers().contains_key("retry-after"));
    let problem = expect_problem(marked, 503).await;
    assert_eq!(problem["type"], "urn:cqrsd:problem:not-served-here");
    let marked = post_json(
        &http,
        &query,
        "/commands/account/k-9/open",
        json!({"owner": "eve"}),
        &[("cqrsd-forwarded", "1")],
    )
    .await;
    expect_problem(marked, 503).await;
    let (_, admin) = get(&http, &command, "/admin/node").await;
    assert_eq!(
        admin["forwards"]["query"]["refused_forwarded"], 1,
        "{admin}"
    );

    query.signal("KILL");
    let query = {
        let mut query = query;
        query.wait_exit(Duration::from_secs(30));
        query
    };
    // While the query node is down, the command node still takes commands,
    // and answers queries (its only peer is gone) with 503 and Retry-After.
    for i in 0..6 {
        accepted(
            &http,
            &command,
            &format!("/commands/account/k-{i}/deposit"),
            json!({"amount": 10}),
        )
        .await;
    }
    for path in [
        "/views/accounts",
        "/search/account_search?q=ada",
        "/events/stream",
    ] {
        let response = send_get(&http, &command, path, None).await;
        assert_eq!(
            response.headers()["retry-after"].to_str().unwrap(),
            "1",
            "{path}"
        );
        let problem = expect_problem(response, 503).await;
        assert_eq!(problem["type"], "urn:cqrsd:problem:no-peer", "{problem}");
        assert_eq!(problem["side"], "query");
    }
    let last = accepted(
        &http,
        &command,
        "/commands/account/k-5/deposit",
        json!({"amount": 1}),
    )
    .await;
    let position = last["position"].as_str().unwrap().to_owned();

    // Restarted, it catches up and serves the same answers.
    let query = query.respawn(Duration::from_secs(30));
    query.ready().await;
    let (status, doc) = get(
        &http,
        &query,
        &format!("/views/accounts/k-5?consistent_with={position}"),
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["doc"]["balance"], 11, "{doc}");
    let after = accounts(&http, &query).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (id, doc) in &after {
        let (_, state) = get(&http, &query, &format!("/aggregates/account/{id}")).await;
        assert_eq!(doc["balance"], state["state"]["balance"], "{id}");
        assert_eq!(doc["owner"], before[id]["owner"], "{id}");
    }
    // And the command node routes queries to it again.
    peers_healthy(&http, &command, None).await;
    assert_eq!(accounts(&http, &command).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_where_a_request_arrives_and_where_it_is_handled() {
    if skip_kafka() {
        return;
    }
    let log = kafka_config(&kafka_brokers());
    let reader = token("reader", &["query"], "");
    let writer = token("writer", &["command"], "");
    let admin = token("ops", &["admin"], "");
    // A token only the query node knows: accepted there, refused where the
    // command is handled.
    let edge_only = token("edge-only", &["command"], "");
    let shared = |extra: &[&TestToken]| {
        [&reader, &writer, &admin]
            .into_iter()
            .chain(extra.iter().copied())
            .map(|t| t.entry.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (c, q) = (free_port(), free_port());
    let command = node(&log, "command", c, &[q], &shared(&[]));
    let query = node(&log, "query", q, &[c], &shared(&[&edge_only]));
    let http = client();
    for node in [&command, &query] {
        node.ready().await;
        peers_healthy(&http, node, Some(&admin.secret)).await;
    }
    let bearer = |t: &TestToken| format!("Bearer {}", t.secret);
    let open = |node: &Process, id: &str, auth: String| {
        let request = http
            .post(node.url(&format!("/commands/account/{id}/open")))
            .header("authorization", auth)
            .json(&json!({"owner": "ada"}));
        async move { request.send().await.unwrap() }
    };

    // A query token sent to a query node for a command: refused there.
    expect_problem(open(&query, "t-1", bearer(&reader)).await, 403).await;
    // And never forwarded: the query node forwarded nothing, the command
    // node saw no command, and the aggregate does not exist.
    let node_view: Value = send_get(&http, &query, "/admin/node", Some(&admin.secret))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        node_view["forwards"]["command"]["forwarded"], 0,
        "{node_view}"
    );
    let metrics = send_get(&http, &command, "/metrics", Some(&admin.secret))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("route=\"/commands/{aggregate}/{id}/{command}\""),
        "{metrics}"
    );
    let missing = send_get(
        &http,
        &query,
        "/aggregates/account/t-1",
        Some(&reader.secret),
    )
    .await;
    expect_problem(missing, 404).await;

    // A command token through the query node is forwarded and accepted.
    assert_eq!(open(&query, "t-2", bearer(&writer)).await.status(), 200);
    // A token the query node accepts but the command node does not know is
    // refused where the command is handled.
    expect_problem(open(&query, "t-3", bearer(&edge_only)).await, 401).await;
    // No token at all is refused on arrival, on either node.
    let anonymous = send_get(&http, &command, "/views/accounts", None).await;
    expect_problem(anonymous, 401).await;
    // A query token asks the command node for a view: forwarded, answered.
    let view = send_get(&http, &command, "/views/accounts", Some(&reader.secret)).await;
    assert_eq!(view.status(), 200);
    // GET /admin/node needs the admin role, like every operations route.
    let refused = send_get(&http, &query, "/admin/node", Some(&writer.secret)).await;
    expect_problem(refused, 403).await;
}

#[test]
fn check_refuses_roles_without_kafka_and_bad_node_urls_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[node]\nrole = \"query\"\nadvertise_url = \"http://10.0.0.5:8080\"\n\
         peers = [\"http://10.0.0.5:8080/\", \"10.0.0.6:8080\"]\n",
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_eq!(code, 2, "{stderr}");
    for key in ["node.role:", "node.peers[0]:", "node.peers[1]:"] {
        assert!(stderr.contains(key), "{key} missing from: {stderr}");
    }
    assert!(stderr.contains("kafka"), "{stderr}");

    std::fs::write(
        &config,
        "[log]\nbackend = \"kafka\"\n[node]\nrole = \"command\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(stderr.contains("with no node.peers"), "{stderr}");
}

/// A query node learns where a partition ends only from the broker, never
/// from appends of its own. The test broker can report a high watermark
/// behind records it has acknowledged until the next write moves it, so the
/// end of a burst of concurrent commands stayed invisible on query nodes for
/// as long as nothing else was written (44 of 2,000 accounts in a
/// measurement). Every command of a burst must become readable there, with
/// the reply's position, although nothing is written after the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_burst_of_commands_reaches_a_query_node_with_no_later_write() {
    if skip_kafka() {
        return;
    }
    let log = kafka_config(&kafka_brokers());
    let (c, q) = (free_port(), free_port());
    let command = node(&log, "command", c, &[q], "");
    let query = node(
        &log,
        "query",
        q,
        &[c],
        "[query]\nconsistency_timeout_ms = 5000\n",
    );
    let http = client();
    for node in [&command, &query] {
        node.ready().await;
        peers_healthy(&http, node, None).await;
    }
    const ACCOUNTS: usize = 600;
    const CLIENTS: usize = 48;
    let replies: Vec<(String, String)> = futures::future::join_all((0..CLIENTS).map(|client| {
        let http = http.clone();
        let command = &command;
        async move {
            let mut replies = Vec::new();
            for n in (client..ACCOUNTS).step_by(CLIENTS) {
                let id = format!("burst-{n}");
                let reply = accepted(
                    &http,
                    command,
                    &format!("/commands/account/{id}/open"),
                    json!({"owner": id}),
                )
                .await;
                replies.push((id, reply["position"].as_str().unwrap().to_owned()));
            }
            replies
        }
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    assert_eq!(replies.len(), ACCOUNTS);
    for (id, position) in &replies {
        let (status, body) = get(
            &http,
            &query,
            &format!("/views/accounts/{id}?consistent_with={position}"),
        )
        .await;
        assert_eq!(status, 200, "{id} at {position} on the query node: {body}");
        assert_eq!(body["doc"]["owner"], id.as_str());
    }
}
