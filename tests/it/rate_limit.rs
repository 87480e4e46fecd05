//! Rate limits: a burst, then 429 with Retry-After, per token (or per client
//! address without tokens); probes are never limited.
//!
//! The sustained rate is one request per 1000 s, so no request can be
//! refilled while a test runs: the outcome does not depend on timing.

use crate::auth::token;
use crate::harness::{Process, ProcessOptions, client, expect_problem};

const LIMIT: &str = "[rate_limit]\nrequests_per_second = 0.001\nburst = 3\n";

async fn expect_limited(response: reqwest::Response) {
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The next request is a whole refill period (1000 s) away.
    assert!(retry_after > 900 && retry_after <= 1000, "{retry_after}");
    let problem = expect_problem(response, 429).await;
    assert_eq!(problem["type"], "urn:cqrsd:problem:rate-limited");
    assert_eq!(problem["retry_after"], retry_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_gets_its_own_burst_then_429() {
    let first = token("first", &["query"], "");
    let second = token("second", &["query"], "");
    let daemon = Process::start(ProcessOptions {
        config: format!("{LIMIT}{}{}", first.entry, second.entry),
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let http = client();
    let send = |secret: &str| {
        http.get(daemon.url("/aggregates/account/nobody"))
            .header("authorization", format!("Bearer {secret}"))
            .send()
    };
    for _ in 0..3 {
        // Within the burst: answered (404: there is no such aggregate).
        assert_eq!(send(&first.secret).await.unwrap().status(), 404);
    }
    expect_limited(send(&first.secret).await.unwrap()).await;
    // Another token has a bucket of its own.
    assert_eq!(send(&second.secret).await.unwrap().status(), 404);
    // Probes are not limited, whoever asks.
    for _ in 0..5 {
        assert_eq!(
            http.get(daemon.url("/livez"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    // A request without a valid token is refused before it can use up a
    // token's requests.
    let response = http.get(daemon.url("/openapi.json")).send().await.unwrap();
    expect_problem(response, 401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_client_address_is_limited() {
    let daemon = Process::start(ProcessOptions {
        config: LIMIT.to_owned(),
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let http = client();
    for _ in 0..3 {
        let response = http.get(daemon.url("/openapi.json")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let response = http
        .post(daemon.url("/commands/account/a1/open"))
        .json(&serde_json::json!({"owner": "Ada"}))
        .send()
        .await
        .unwrap();
    expect_limited(response).await;
    assert_eq!(
        http.get(daemon.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
