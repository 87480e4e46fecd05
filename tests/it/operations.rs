//! `/livez`, `/readyz`, `/metrics`, `/openapi.json` and the problem format of
//! errors, against the real binary.

use crate::harness::{Process, ProcessOptions, client, expect_problem};

#[tokio::test]
async fn operations_endpoints_answer() {
    let daemon = Process::start(ProcessOptions::default());
    let http = client();

    let live = http.get(daemon.url("/livez")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    assert_eq!(
        live.json::<serde_json::Value>().await.unwrap()["status"],
        "ok"
    );

    // The daemon listens before its components are ready (a loaded machine
    // shows /readyz 503 for a moment): wait for readiness, then read it.
    daemon.ready().await;
    let ready = http.get(daemon.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["components"]["http"]["ready"], true);

    let openapi = http.get(daemon.url("/openapi.json")).send().await.unwrap();
    assert_eq!(openapi.status(), 200);
    let openapi: serde_json::Value = openapi.json().await.unwrap();
    assert!(
        openapi["openapi"].as_str().unwrap().starts_with("3.1"),
        "{openapi}"
    );
    for path in ["/livez", "/readyz", "/metrics", "/openapi.json"] {
        assert!(
            openapi["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(openapi["components"]["schemas"]["Problem"].is_object());

    // The requests above are counted by route and status.
    let metrics = http.get(daemon.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.text().await.unwrap();
    let livez_count = text
        .lines()
        .find(|line| {
            line.starts_with("cqrsd_http_requests_total")
                && line.contains(r#"route="/livez""#)
                && line.contains(r#"status="200""#)
        })
        .unwrap_or_else(|| panic!("no request counter for /livez in:\n{text}"));
    assert!(livez_count.ends_with(" 1"), "{livez_count}");
    assert!(
        text.contains("cqrsd_http_request_duration_seconds_bucket"),
        "no latency histogram"
    );
    assert!(
        text.contains(r#"cqrsd_runtime_workers{runtime="command"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"cqrsd_runtime_workers{runtime="query"} 1"#),
        "{text}"
    );
    assert!(text.contains("cqrsd_build_info"), "{text}");
}

#[tokio::test]
async fn errors_are_problem_documents() {
    let daemon = Process::start(ProcessOptions::default());
    let http = client();

    let missing = http.get(daemon.url("/no/such/thing")).send().await.unwrap();
    let body = expect_problem(missing, 404).await;
    assert_eq!(body["title"], "Not Found");

    let wrong_method = http.delete(daemon.url("/livez")).send().await.unwrap();
    assert_eq!(wrong_method.headers()["allow"], "GET,HEAD");
    expect_problem(wrong_method, 405).await;

    // Each response carries a request id a client can report.
    let response = http.get(daemon.url("/livez")).send().await.unwrap();
    assert!(!response.headers()["x-request-id"].is_empty());
    let given = http
        .get(daemon.url("/livez"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "abc-123");
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let daemon = Process::start(ProcessOptions {
        config: "[http]\nbody_limit_bytes = 1024\n".to_owned(),
        ..ProcessOptions::default()
    });
    let response = client()
        .post(daemon.url("/commands/account/a1/open"))
        .header("content-type", "application/json")
        .body(vec![b' '; 4096])
        .send()
        .await
        .unwrap();
    let body = expect_problem(response, 413).await;
    assert_eq!(
        body["detail"],
        "the request body exceeds the limit of 1024 bytes"
    );
}

#[tokio::test]
async fn responses_are_compressed_when_asked() {
    let daemon = Process::start(ProcessOptions::default());
    let response = client()
        .get(daemon.url("/openapi.json"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
}
