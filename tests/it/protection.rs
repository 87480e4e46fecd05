//! What a public-facing server needs: slowloris and header limits, request
//! timeouts, load shedding, body limits on streamed bodies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};

use crate::harness::{InProcess, Process, ProcessOptions, client, expect_problem};

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let daemon = Process::start(ProcessOptions {
        config: "[http]\nheader_read_timeout_ms = 500\n".to_owned(),
        ..ProcessOptions::default()
    });
    let addr = daemon.addr;
    // A slowloris client: a partial request head, then silence.
    let slow = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buffer = Vec::new();
        // The server closes the connection (possibly after a 408); a read
        // timeout here means it kept the connection open.
        stream
            .read_to_end(&mut buffer)
            .map(|_| String::from_utf8_lossy(&buffer).into_owned())
    });
    // Meanwhile other clients are served.
    let live = client().get(daemon.url("/livez")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let answer = slow
        .await
        .unwrap()
        .expect("the half-open connection was never closed");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let daemon = Process::start(ProcessOptions::default());
    let response = client()
        .get(daemon.url("/livez"))
        .header("x-big", "a".repeat(128 * 1024))
        .send()
        .await;
    // hyper answers 431 or closes the connection; either way the daemon lives on.
    if let Ok(response) = response {
        assert_eq!(response.status(), 431);
    }
    let live = client().get(daemon.url("/livez")).send().await.unwrap();
    assert_eq!(live.status(), 200);
}

fn slow_routes() -> cqrsd::daemon::RoutesHook {
    Box::new(|_runtimes| {
        let query = Router::new().route(
            "/test/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "slow"
            }),
        );
        let command = Router::new().route(
            "/test/echo",
            post(|body: Bytes| async move { body.len().to_string() }),
        );
        cqrsd::http::ApiRoutes {
            command,
            query,
            openapi: None,
            domain: None,
        }
    })
}

#[tokio::test]
async fn slow_handlers_are_answered_503_at_the_request_timeout() {
    let daemon = InProcess::start(|c| c.http.request_timeout_ms = 200, Some(slow_routes()));
    let response = client().get(daemon.url("/test/slow")).send().await.unwrap();
    let body = expect_problem(response, 503).await;
    assert_eq!(body["type"], "urn:cqrsd:problem:timeout");
    daemon.stop();
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_are_shed() {
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let daemon = InProcess::start(
        |c| c.http.max_concurrent_requests = 1,
        Some(crate::harness::gate_routes(entered_tx, release.clone())),
    );
    let http = client();
    // Ready first, so the /readyz check below tells shedding from startup.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http
        .get(daemon.url("/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let first = tokio::spawn(http.get(daemon.url("/test/gate")).send());
    entered.recv().await.unwrap();

    // The only permit is held: the next API request is refused at once.
    let response = http.get(daemon.url("/test/gate")).send().await.unwrap();
    let body = expect_problem(response, 503).await;
    assert_eq!(body["type"], "urn:cqrsd:problem:overloaded");
    // Operations endpoints are never shed.
    assert_eq!(
        http.get(daemon.url("/livez"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(daemon.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    release.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    // With the permit back, requests are served again.
    let again = tokio::spawn(http.get(daemon.url("/test/gate")).send());
    entered.recv().await.unwrap();
    release.add_permits(1);
    assert_eq!(again.await.unwrap().unwrap().status(), 200);
    daemon.stop();
}

#[tokio::test]
async fn streamed_bodies_over_the_limit_are_refused_with_413() {
    let daemon = InProcess::start(|c| c.http.body_limit_bytes = 1000, Some(slow_routes()));
    let http = client();
    // Within the limit: accepted.
    let ok = http
        .post(daemon.url("/test/echo"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.text().await.unwrap(), "1000");
    // Chunked (no Content-Length), so only counting the streamed bytes can catch it.
    let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 200])));
    let response = http
        .post(daemon.url("/test/echo"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    expect_problem(response, 413).await;
    daemon.stop();
}
