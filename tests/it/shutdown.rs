//! SIGTERM drains and exits 0; systemd hears READY=1 and STOPPING=1.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

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
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let daemon = InProcess::start(
        |_| {},
        Some(crate::harness::gate_routes(entered_tx, release.clone())),
    );
    let http = client();
    let in_flight = tokio::spawn(http.get(daemon.url("/test/gate")).send());
    entered.recv().await.unwrap();
    let addr = daemon.addr;
    let stopped = tokio::task::spawn_blocking(move || daemon.stop());
    // The shutdown has begun and waits for the request; let it finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stopped.is_finished(),
        "shutdown did not wait for the in-flight request"
    );
    release.add_permits(1);

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "released");
    stopped.await.unwrap();
    // Once stopped, the listener is gone.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn the_drain_is_bounded() {
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let daemon = InProcess::start(
        |c| c.http.drain_timeout_ms = 200,
        Some(crate::harness::gate_routes(entered_tx, release)),
    );
    let http = client();
    let stuck = tokio::spawn(http.get(daemon.url("/test/gate")).send());
    entered.recv().await.unwrap();
    // stop() returns although the request is never released: the drain gave up.
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
