//! Command-side and query-side handlers run on their own runtimes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use cqrsd::daemon::RoutesHook;

use crate::harness::{InProcess, client};

/// Routes that let a test block the query runtime's threads at will.
fn blocking_routes(
    entered: std::sync::mpsc::Sender<()>,
    release: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
) -> RoutesHook {
    Box::new(move |_runtimes| {
        let query = Router::new().route(
            "/test/block",
            get(move || {
                let entered = entered.clone();
                let release = release.clone();
                async move {
                    // Deliberately blocks the worker thread, as a runaway
                    // query would, until the test releases it.
                    entered.send(()).unwrap();
                    let release = release.lock().unwrap();
                    release.recv_timeout(Duration::from_secs(60)).unwrap();
                    "released"
                }
            }),
        );
        let command = Router::new().route(
            "/test/command",
            post(|| async { std::thread::current().name().unwrap_or("?").to_owned() }),
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
async fn a_blocked_query_runtime_does_not_delay_commands() {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let daemon = InProcess::start(
        |config| {
            config.query.threads = 1;
            config.command.threads = 1;
        },
        Some(blocking_routes(entered_tx, release_rx)),
    );
    let http = client();

    // Occupy the query runtime's only thread.
    let blocked = tokio::spawn(http.get(daemon.url("/test/block")).send());
    tokio::task::spawn_blocking(move || entered_rx.recv_timeout(Duration::from_secs(30)).unwrap())
        .await
        .unwrap();

    // While it is blocked, a command-side request is answered, from a thread
    // of the command runtime.
    let command = http.post(daemon.url("/test/command")).send().await.unwrap();
    assert_eq!(command.status(), 200);
    assert_eq!(command.text().await.unwrap(), "cqrsd-command");
    // The query is still blocked: the command did not merely come after it.
    assert!(!blocked.is_finished());

    release_tx.send(()).unwrap();
    let blocked = blocked.await.unwrap().unwrap();
    assert_eq!(blocked.text().await.unwrap(), "released");
    daemon.stop();
}
