//! SIGTERM drains and exits 0; systemd hears READY=1 and STOPPING=1.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use axum::Router;
use axum::routing::get;

use crate::harness::{InProcess, Process, ProcessOptions, client, expect_problem};

#[test]
fn sigterm_exits_zero_and_systemd_is_told_ready_then_stopping() {
    let sockets = tempfile::tempdir().unwrap();
    let socket_path = sockets.path().join("notify.sock");
    let notify = UnixDatagram::bind(&socket_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let mut daemon = Process::start(ProcessOptions {
        env: vec![(
            "NOTIFY_SOCKET".to_owned(),
            socket_path.to_str().unwrap().to_owned(),
        )],
        ..ProcessOptions::default()
    });
    let mut buffer = [0u8; 4096];
    let received = notify.recv(&mut buffer).expect("no READY=1 from cqrsd");
    let message = String::from_utf8_lossy(&buffer[..received]).into_owned();
    assert!(message.lines().any(|line| line == "READY=1"), "{message}");

    daemon.signal("TERM");
    let received = notify.recv(&mut buffer).expect("no STOPPING=1 from cqrsd");
    let message = String::from_utf8_lossy(&buffer[..received]).into_owned();
    assert!(
        message.lines().any(|line| line == "STOPPING=1"),
        "{message}"
    );
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn sigint_exits_zero() {
    let mut daemon = Process::start(ProcessOptions::default());
    daemon.signal("INT");
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[tokio::test]
async fn in_flight_requests_finish_during_the_drain() {
    let routes: cqrsd::daemon::RoutesHook = Box::new(|_| cqrsd::http::ApiRoutes {
        query: Router::new().route(
            "/test/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "finished"
            }),
        ),
        ..Default::default()
    });
    let daemon = InProcess::start(|_| {}, Some(routes));
    let http = client();
    let in_flight = tokio::spawn(http.get(daemon.url("/test/slow")).send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = daemon.addr;
    let stopped = tokio::task::spawn_blocking(move || daemon.stop());

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "finished");
    stopped.await.unwrap();
    // Once stopped, the listener is gone.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn the_drain_is_bounded() {
    let routes: cqrsd::daemon::RoutesHook = Box::new(|_| cqrsd::http::ApiRoutes {
        query: Router::new().route(
            "/test/forever",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "never"
            }),
        ),
        ..Default::default()
    });
    let daemon = InProcess::start(|c| c.http.drain_timeout_ms = 200, Some(routes));
    let http = client();
    let stuck = tokio::spawn(http.get(daemon.url("/test/forever")).send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // stop() returns although the request never finishes: the drain gave up.
    tokio::task::spawn_blocking(move || daemon.stop())
        .await
        .unwrap();
    // The stuck request is cut off: either its connection closes, or its
    // handler is cancelled and it is told the server is shutting down.
    match stuck.await.unwrap() {
        Err(_) => {}
        Ok(response) => {
            let body = expect_problem(response, 503).await;
            assert_eq!(body["type"], "urn:cqrsd:problem:shutting-down");
        }
    }
}
