//! Hostile clients (issue 7): hundreds of slowloris connections, oversized and
//! overfull request heads, deeply nested JSON, huge numbers, invalid UTF-8
//! and NUL bytes. The daemon answers each with a clear problem (or drops the
//! connection), changes nothing, and keeps serving everyone else.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Process, ProcessOptions, client, command, expect_problem};

/// Half-open connections in the slowloris test: well above a typical
/// per-process default of 256, well below `[http] max_connections`.
const SLOW_CLIENTS: usize = 300;

/// Reads a whole response (the server closes the connection after it, as the
/// requests below ask) with a bound, so a hung server fails the test.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buffer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut buffer))
        .await
        .expect("the server neither answered nor closed the connection")
        .ok();
    String::from_utf8_lossy(&buffer).into_owned()
}

/// Asserts the normal API answers: a health check, a command and a read.
async fn others_are_served(http: &reqwest::Client, base: &str, id: &str) {
    assert_eq!(
        http.get(format!("{base}/livez"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let response = command(
        http,
        base,
        &format!("account/{id}/open"),
        json!({"owner": "Ada"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let response = http
        .get(format!("{base}/aggregates/account/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_slowloris_connections_do_not_starve_other_clients() {
    // A long header-read timeout keeps every slow connection open for the
    // whole test, so the other clients are served *while* they are open.
    let daemon = Process::start(ProcessOptions {
        config: "[http]\nheader_read_timeout_ms = 120000\n".to_owned(),
        ..ProcessOptions::default()
    });
    let addr = daemon.addr;
    let mut slow = Vec::with_capacity(SLOW_CLIENTS);
    for _ in 0..SLOW_CLIENTS {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    // Each slow client trickles one more header, a byte at a time, between
    // the other clients' requests; none ever completes its head meanwhile.
    let http = client();
    let base = daemon.url("");
    for (round, byte) in b"X-Slow: 1\r\n".iter().enumerate() {
        for stream in &mut slow {
            stream.write_all(&[*byte]).await.unwrap();
        }
        others_are_served(&http, &base, &format!("busy-{round}")).await;
    }
    // The slow clients were connected all along: finishing their heads now
    // gets each one its answer.
    for stream in &mut slow {
        stream
            .write_all(b"Connection: close\r\n\r\n")
            .await
            .unwrap();
    }
    for stream in &mut slow {
        let answer = read_response(stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_limit_full_of_slowloris_clients_frees_itself() {
    // Every connection slot is taken by a client that never finishes its
    // head; more wait in the listen backlog. The header-read timeout frees
    // the slots, so a normal client that queued behind all of them is still
    // answered, and every slow client is disconnected.
    let daemon = Process::start(ProcessOptions {
        config: "[http]\nmax_connections = 16\nheader_read_timeout_ms = 300\n".to_owned(),
        ..ProcessOptions::default()
    });
    let mut slow = Vec::new();
    for _ in 0..64 {
        let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
        stream
            .write_all(b"POST /commands/account/x/open HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    others_are_served(&client(), &daemon.url(""), "after-the-flood").await;
    for stream in &mut slow {
        let answer = read_response(stream).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
}

/// Sends raw bytes as one request and returns the status line and the body.
async fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may refuse the head before reading all of it and close;
    // a failed write is then expected, and the answer is still read.
    let _ = stream.write_all(request).await;
    read_response(&mut stream).await
}

/// Heads beyond hyper's limits (100 header lines; a read buffer of 64 KiB,
/// which a head arriving in few reads may exceed up to about twice) are
/// refused by hyper itself with a bare 431 before any route or middleware
/// runs, so that answer has no problem body; the connection is closed after it.
#[tokio::test]
async fn oversized_and_overfull_heads_get_431() {
    let daemon = Process::start(ProcessOptions::default());
    let http = client();

    let big = http
        .get(daemon.url("/livez"))
        .header("x-big", "a".repeat(256 * 1024))
        .send()
        .await;
    let mut many = http.get(daemon.url("/livez"));
    for i in 0..200 {
        many = many.header(format!("x-h{i}"), "1");
    }
    // The client may see the close before it reads the 431.
    for response in [big, many.send().await].into_iter().flatten() {
        assert_eq!(response.status(), 431);
    }

    // Far beyond any limit, as raw bytes: answered or closed, never a hang.
    let mut huge = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Huge: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 4 * 1024 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let answer = raw_request(daemon.addr, &huge).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    let mut overfull = b"GET /livez HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..1000 {
        overfull.extend_from_slice(format!("X-H{i}: 1\r\n").as_bytes());
    }
    overfull.extend_from_slice(b"\r\n");
    let answer = raw_request(daemon.addr, &overfull).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    others_are_served(&http, &daemon.url(""), "after-big-heads").await;
}

#[tokio::test]
async fn deeply_nested_json_is_a_400_problem() {
    let daemon = Process::start(ProcessOptions::default());
    let http = client();
    let base = daemon.url("");
    for body in [
        "[".repeat(100_000),
        "{\"a\":".repeat(50_000),
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("{{\"amount\": {}1{}}}", "[".repeat(1000), "]".repeat(1000)),
    ] {
        let response = http
            .post(format!("{base}/commands/account/deep/deposit"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        expect_problem(response, 400).await;
    }
    // Nothing was created, and the daemon still serves.
    expect_problem(
        http.get(format!("{base}/aggregates/account/deep"))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    others_are_served(&http, &base, "after-deep-json").await;
}

#[tokio::test]
async fn huge_numbers_are_refused_or_computed_never_a_500() {
    let daemon = Process::start(ProcessOptions::default());
    let http = client();
    let base = daemon.url("");
    let open = command(&http, &base, "account/big/open", json!({"owner": "Ada"})).await;
    assert_eq!(open.status(), 200);

    // Not representable as a JSON number serde_json accepts: 400.
    for amount in ["1e400", "-1e400", &"9".repeat(500)] {
        let response = http
            .post(format!("{base}/commands/account/big/deposit"))
            .header("content-type", "application/json")
            .body(format!("{{\"amount\": {amount}}}"))
            .send()
            .await
            .unwrap();
        expect_problem(response, 400).await;
    }
    // Representable, but the sum overflows: the command cannot be evaluated
    // (422), and the state keeps its last good value.
    for amount in [json!(i64::MAX), json!(u64::MAX), json!(1.7e308)] {
        let first = command(
            &http,
            &base,
            "account/big/deposit",
            json!({ "amount": amount }),
        )
        .await;
        let status = first.status().as_u16();
        assert!(status == 200 || status == 422, "{status}");
        if status == 422 {
            expect_problem(first, 422).await;
        }
        let second = command(
            &http,
            &base,
            "account/big/deposit",
            json!({ "amount": amount }),
        )
        .await;
        expect_problem(second, 422).await;
    }
    let state: Value = http
        .get(format!("{base}/aggregates/account/big"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(state["state"]["balance"].is_number(), "{state}");
    others_are_served(&http, &base, "after-huge-numbers").await;
}

#[tokio::test]
async fn invalid_utf8_and_nul_bytes_are_400_problems() {
    let daemon = Process::start(ProcessOptions::default());
    let http = client();
    let base = daemon.url("");

    // A body that is not UTF-8.
    let response = http
        .post(format!("{base}/commands/account/utf/open"))
        .header("content-type", "application/json")
        .body(b"{\"owner\": \"\xff\xfe\"}".to_vec())
        .send()
        .await
        .unwrap();
    expect_problem(response, 400).await;
    // A NUL inside a JSON string is valid JSON; the owner is stored as sent.
    let response = command(
        &http,
        &base,
        "account/nul/open",
        json!({"owner": "a\u{0}b"}),
    )
    .await;
    assert_eq!(response.status(), 200);

    // Ids with NUL, invalid UTF-8, or characters ids may not have.
    for id in ["a%00b", "%FF%FE", "a%0Ab", "%C0%80", "a%20b"] {
        let response = command(
            &http,
            &base,
            &format!("account/{id}/open"),
            json!({"owner": "x"}),
        )
        .await;
        expect_problem(response, 400).await;
        let response = http
            .get(format!("{base}/aggregates/account/{id}"))
            .send()
            .await
            .unwrap();
        expect_problem(response, 400).await;
    }
    // The same in aggregate type, command and view names: never a 500.
    for path in [
        "/commands/%00/x/open",
        "/commands/account/x/%FF",
        "/aggregates/%FF/x",
        "/views/%00/x",
        "/views/accounts/%FF",
        "/search/%00?q=x",
        "/aggregations/%FF",
        "/events/stream?from=%00",
    ] {
        let response = if path.starts_with("/commands") {
            http.post(format!("{base}{path}")).json(&json!({})).send()
        } else {
            http.get(format!("{base}{path}")).send()
        }
        .await
        .unwrap();
        let status = response.status().as_u16();
        assert!((400..500).contains(&status), "{path}: {status}");
        expect_problem(response, status).await;
    }
    // Raw bytes that are not even a valid request line.
    let answer = raw_request(
        daemon.addr,
        b"GET /views/\xff\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    others_are_served(&http, &base, "after-bad-bytes").await;
}
