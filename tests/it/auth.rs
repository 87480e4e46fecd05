//! Bearer tokens: every outcome of authentication and authorization, a token
//! revoked by a SIGHUP reload, the refusal of an open non-loopback listener,
//! `cqrsd token hash`, and the audit trail in event metadata.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::for_each_backend;
use crate::harness::{
    Backend, Process, ProcessOptions, client, cqrsd_bin, expect_problem, path_str, run_cli,
};

/// A new token and its `[[auth.tokens]]` entry.
pub struct TestToken {
    pub secret: String,
    pub entry: String,
}

pub fn token(name: &str, roles: &[&str], extra: &str) -> TestToken {
    let secret = cqrsd::auth::generate_token().unwrap();
    let roles: Vec<String> = roles.iter().map(|r| format!("\"{r}\"")).collect();
    let entry = format!(
        "[[auth.tokens]]\nname = \"{name}\"\nhash = \"{}\"\nroles = [{}]\n{extra}\n",
        cqrsd::auth::hash_token(&secret),
        roles.join(", ")
    );
    TestToken { secret, entry }
}

pub fn bearer(token: &TestToken) -> String {
    format!("Bearer {}", token.secret)
}

async fn post(
    http: &reqwest::Client,
    daemon: &Process,
    path: &str,
    auth: Option<&str>,
    body: serde_json::Value,
) -> reqwest::Response {
    let mut request = http.post(daemon.url(path)).json(&body);
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    request.send().await.unwrap()
}

async fn get(
    http: &reqwest::Client,
    daemon: &Process,
    path: &str,
    auth: Option<&str>,
) -> reqwest::Response {
    let mut request = http.get(daemon.url(path));
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authentication_and_authorization_outcome() {
    let writer = token("writer", &["command", "query"], "");
    let reader = token("reader", &["query"], "");
    let operator = token("operator", &["admin"], "");
    let teller = token(
        "teller",
        &["command", "query"],
        "aggregates = [\"loan\"]\nprojections = [\"ledger\"]",
    );
    let daemon = Process::start(ProcessOptions {
        config: [&writer, &reader, &operator, &teller]
            .iter()
            .map(|t| t.entry.as_str())
            .collect(),
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let http = client();
    let open = json!({"owner": "Ada"});

    // Probes answer without a token.
    assert_eq!(get(&http, &daemon, "/livez", None).await.status(), 200);
    assert_eq!(get(&http, &daemon, "/readyz", None).await.status(), 200);

    // No token, a malformed header, a wrong token: 401 with a challenge.
    for auth in [
        None,
        Some("Basic dXNlcjpwYXNz"),
        Some("Bearer"),
        Some("Bearer cqrsd_not-a-configured-token"),
    ] {
        let response = post(
            &http,
            &daemon,
            "/commands/account/a1/open",
            auth,
            open.clone(),
        )
        .await;
        let challenge = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        let problem = expect_problem(response, 401).await;
        assert_eq!(
            problem["type"], "urn:cqrsd:problem:unauthorized",
            "{auth:?}"
        );
    }
    // Nothing was executed.
    let response = get(
        &http,
        &daemon,
        "/aggregates/account/a1",
        Some(&bearer(&writer)),
    )
    .await;
    expect_problem(response, 404).await;

    // The right token without the role: 403, and nothing happens.
    let response = post(
        &http,
        &daemon,
        "/commands/account/a1/open",
        Some(&bearer(&reader)),
        open.clone(),
    )
    .await;
    let problem = expect_problem(response, 403).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("command"),
        "{problem}"
    );
    // The right role: accepted, and readable with the query role.
    let response = post(
        &http,
        &daemon,
        "/commands/account/a1/open",
        Some(&bearer(&writer)),
        open.clone(),
    )
    .await;
    assert_eq!(response.status(), 200);
    let response = get(
        &http,
        &daemon,
        "/aggregates/account/a1",
        Some(&bearer(&reader)),
    )
    .await;
    assert_eq!(response.status(), 200);

    // Restricted to other aggregate types and projections: 403.
    let response = post(
        &http,
        &daemon,
        "/commands/account/a2/open",
        Some(&bearer(&teller)),
        open.clone(),
    )
    .await;
    expect_problem(response, 403).await;
    let response = get(
        &http,
        &daemon,
        "/aggregates/account/a1",
        Some(&bearer(&teller)),
    )
    .await;
    expect_problem(response, 403).await;
    let response = get(&http, &daemon, "/views/accounts/a1", Some(&bearer(&teller))).await;
    expect_problem(response, 403).await;
    // The unfiltered stream covers every aggregate type: refused to it.
    let response = get(&http, &daemon, "/events/stream", Some(&bearer(&teller))).await;
    expect_problem(response, 403).await;

    // Operator routes need admin; /metrics is not public by default.
    expect_problem(get(&http, &daemon, "/metrics", None).await, 401).await;
    expect_problem(
        get(&http, &daemon, "/metrics", Some(&bearer(&reader))).await,
        403,
    )
    .await;
    assert_eq!(
        get(&http, &daemon, "/metrics", Some(&bearer(&operator)))
            .await
            .status(),
        200
    );
    expect_problem(
        get(&http, &daemon, "/admin/projections", Some(&bearer(&writer))).await,
        403,
    )
    .await;
    assert_eq!(
        get(
            &http,
            &daemon,
            "/admin/projections",
            Some(&bearer(&operator))
        )
        .await
        .status(),
        200
    );

    // The API description needs any valid token and declares the scheme.
    expect_problem(get(&http, &daemon, "/openapi.json", None).await, 401).await;
    let document: serde_json::Value = get(&http, &daemon, "/openapi.json", Some(&bearer(&reader)))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let post_command = &document["paths"]["/commands/account/{id}/open"]["post"];
    for status in ["401", "403", "429"] {
        assert!(
            post_command["responses"][status].is_object(),
            "{status} missing"
        );
    }
    assert_eq!(document["paths"]["/livez"]["get"]["security"], json!([{}]));

    // Unknown paths do not reveal themselves to strangers.
    expect_problem(get(&http, &daemon, "/nowhere", None).await, 401).await;
    expect_problem(
        get(&http, &daemon, "/nowhere", Some(&bearer(&reader))).await,
        404,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_public() {
    let reader = token("reader", &["query"], "");
    let daemon = Process::start(ProcessOptions {
        config: format!("[auth]\nmetrics_public = true\n{}", reader.entry),
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let http = client();
    assert_eq!(get(&http, &daemon, "/metrics", None).await.status(), 200);
    expect_problem(get(&http, &daemon, "/admin/projections", None).await, 401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_by_a_reload_is_refused_at_once() {
    let kept = token("kept", &["query"], "");
    let revoked = token("revoked", &["query"], "");
    let daemon = Process::start(ProcessOptions {
        config: format!("{}{}", kept.entry, revoked.entry),
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let http = client();
    let path = "/openapi.json";
    assert_eq!(
        get(&http, &daemon, path, Some(&bearer(&revoked)))
            .await
            .status(),
        200
    );

    let config = daemon.dir.path().join("config.toml");
    std::fs::write(&config, &kept.entry).unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(30));
    let response = get(&http, &daemon, path, Some(&bearer(&revoked))).await;
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    expect_problem(response, 401).await;
    assert_eq!(
        get(&http, &daemon, path, Some(&bearer(&kept)))
            .await
            .status(),
        200
    );

    // A configuration with a mistake is not applied: the tokens stay.
    std::fs::write(
        &config,
        "[[auth.tokens]]\nname = \"broken\"\nhash = \"sha256:nothex\"\nroles = [\"query\"]\n",
    )
    .unwrap();
    daemon.signal("HUP");
    let line = daemon.wait_for_log("configuration not reloaded", Duration::from_secs(30));
    assert!(line.contains("auth.tokens[0].hash"), "{line}");
    assert_eq!(
        get(&http, &daemon, path, Some(&bearer(&kept)))
            .await
            .status(),
        200
    );
}

#[test]
fn a_non_loopback_listener_without_tokens_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[http]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("auth.tokens"), "{stderr}");
    assert!(stderr.contains("allow_unauthenticated"), "{stderr}");
    // `serve` refuses the same file before it binds anything.
    let (code, _, stderr) = run_cli(&["serve", "--config", path_str(&config)], dir.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("auth.tokens"), "{stderr}");

    std::fs::write(
        &config,
        "[http]\nlisten = \"0.0.0.0:8080\"\n[auth]\nallow_unauthenticated = true\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("open to everyone"),
        "{stderr}"
    );

    // With a token, a public listener needs no exception.
    let entry = token("ops", &["admin"], "").entry;
    std::fs::write(
        &config,
        format!("[http]\nlisten = \"0.0.0.0:8080\"\n{entry}"),
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn check_names_every_token_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let good = token("same", &["query"], "").entry;
    std::fs::write(
        &config,
        format!(
            "{good}{good}[[auth.tokens]]\nname = \"bad name\"\nhash = \"md5:x\"\nroles = []\naggregates = []\nrols = 1\n"
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_eq!(code, 2, "{stdout}{stderr}");
    for expected in [
        "auth.tokens[1].name: `same` names another token too",
        "auth.tokens[1].hash: is the hash of another token too",
        "auth.tokens[2].name",
        "auth.tokens[2].hash",
        "auth.tokens[2].roles",
        "auth.tokens[2].aggregates",
        "rols: unknown key",
    ] {
        assert!(stderr.contains(expected), "`{expected}` not in:\n{stderr}");
    }
}

#[test]
fn token_hash_prints_a_token_and_the_entry_that_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run_cli(
        &["token", "hash", "--name", "ci", "--role", "query,admin"],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let secret = stdout
        .lines()
        .find_map(|line| line.strip_prefix("# cqrsd_"))
        .map(|rest| format!("cqrsd_{rest}"))
        .expect("a token line");
    let entry: String = stdout
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(
        entry.contains(&cqrsd::auth::hash_token(&secret)),
        "{stdout}"
    );
    assert!(entry.contains(r#"roles = ["query", "admin"]"#), "{stdout}");
    assert!(
        !entry.contains(&secret),
        "the secret must not be in the entry"
    );
    // The printed entry is a valid configuration.
    let config = dir.path().join("config.toml");
    std::fs::write(&config, &entry).unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");

    // --stdin hashes a given token and does not echo it.
    let mut child = Command::new(cqrsd_bin())
        .args(["token", "hash", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{secret}\n").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success());
    assert!(
        stdout.contains(&cqrsd::auth::hash_token(&secret)),
        "{stdout}"
    );
    assert!(!stdout.contains(&secret), "{stdout}");
}

/// Every event of a command names the token that sent it, never its secret.
async fn events_name_the_token_that_caused_them(backend: Backend) {
    let teller = token("teller-7", &["command", "query"], "");
    let mut options = ProcessOptions::backend(backend);
    options.config.push_str(&teller.entry);
    let daemon = Process::start(options);
    daemon.ready().await;
    let http = client();
    let auth = bearer(&teller);
    for (command, body) in [
        ("open", json!({"owner": "Ada"})),
        ("deposit", json!({"amount": 5})),
        ("deposit", json!({"amount": 7})),
    ] {
        let response = post(
            &http,
            &daemon,
            &format!("/commands/account/audited/{command}"),
            Some(&auth),
            body,
        )
        .await;
        assert_eq!(response.status(), 200, "{command}");
    }
    let response = get(
        &http,
        &daemon,
        "/aggregates/account/audited/events",
        Some(&auth),
    )
    .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains(&teller.secret), "the secret leaked: {text}");
    let history: serde_json::Value = serde_json::from_str(&text).unwrap();
    let events = history["events"].as_array().unwrap();
    assert_eq!(events.len(), 3, "{history}");
    for event in events {
        assert_eq!(event["principal"], "teller-7", "{event}");
    }
}

for_each_backend!(events_name_the_token_that_caused_them);
