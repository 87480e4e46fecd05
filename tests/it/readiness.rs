//! `/readyz` (and so systemd's READY=1) waits until the projections have
//! caught up with the log at startup.

use serde_json::{Value, json};

use crate::harness::{Backend, Process, ProcessOptions, client, command, expect_problem, get_json};

const ACCOUNTS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_until_the_projections_have_caught_up() {
    // The search index makes its work visible only every 10 s, so after a
    // crash that lost its uncommitted work it needs at least that long to
    // catch up again: a window in which the daemon must not claim readiness.
    let mut options = ProcessOptions::backend(Backend::Embedded);
    options
        .config
        .push_str("[projections]\nsearch_commit_interval_ms = 10000\n");
    let daemon = Process::start(options);
    let http = client();
    daemon.ready().await;
    for n in 0..ACCOUNTS {
        let response = command(
            &http,
            &daemon.url(""),
            &format!("account/r{n}/open"),
            json!({"owner": "Ada"}),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    let daemon = daemon.restart(true);

    let response = http.get(daemon.url("/readyz")).send().await.unwrap();
    let problem = expect_problem(response, 503).await;
    assert_eq!(
        problem["components"]["projections"]["ready"], false,
        "{problem}"
    );

    daemon.ready().await;
    // Ready means caught up: every account is in the view and in the index.
    let page = get_json(&http, &daemon.url("/views/accounts?limit=1000")).await;
    assert_eq!(page["items"].as_array().unwrap().len(), ACCOUNTS);
    let hits: Value = get_json(
        &http,
        &daemon.url("/search/account_search?q=ada&limit=1000"),
    )
    .await;
    assert_eq!(hits["hits"].as_array().unwrap().len(), ACCOUNTS);
}
