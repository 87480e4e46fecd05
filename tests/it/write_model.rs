//! The write side against a model (issue 7): random sequences of bank
//! commands on a few accounts, with random retries, `If-Match` values and
//! idempotency keys, sent to the real daemon over HTTP. Every reply (status,
//! version, events) and every final state must equal what a simple in-memory
//! model of DESIGN.md's rules predicts.

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use serde_json::{Value, json};

use crate::for_each_backend;
use crate::harness::{Backend, Process, ProcessOptions, client};

for_each_backend!(command_sequences_match_the_model);

/// Few cases of moderate length keep the suite well under a minute per
/// backend; shrinking is bounded for the same reason.
const CASES: u32 = 32;
const MAX_STEPS: usize = 40;
const ACCOUNTS: usize = 3;

/// Amounts include 0 (refused by the schema) and halves, which exercise the
/// integer/decimal arithmetic of balances and are exact in binary.
const AMOUNTS: [f64; 6] = [0.0, 1.0, 2.0, 5.0, 0.5, 2.5];

#[derive(Debug, Clone)]
enum Op {
    /// `open` with an owner; an empty owner breaks the schema's minLength.
    Open {
        empty_owner: bool,
    },
    Deposit(usize),
    Withdraw(usize),
    Close,
}

#[derive(Debug, Clone)]
enum Key {
    None,
    Fresh,
    /// The key of the last keyed request on this account (fresh if none):
    /// the same body replays the first answer, another body is a conflict.
    Reuse,
}

#[derive(Debug, Clone)]
enum IfMatch {
    None,
    Current,
    Stale,
    Star,
}

#[derive(Debug, Clone)]
enum Step {
    Send {
        account: usize,
        op: Op,
        key: Key,
        if_match: IfMatch,
    },
    /// The previous request again, byte for byte (a client retry).
    Retry,
}

fn step() -> impl Strategy<Value = Step> {
    let op = prop_oneof![
        3 => Just(Op::Open { empty_owner: false }),
        1 => Just(Op::Open { empty_owner: true }),
        4 => (0..AMOUNTS.len()).prop_map(Op::Deposit),
        4 => (0..AMOUNTS.len()).prop_map(Op::Withdraw),
        2 => Just(Op::Close),
    ];
    let key = prop_oneof![Just(Key::None), Just(Key::Fresh), Just(Key::Reuse)];
    let if_match = prop_oneof![
        3 => Just(IfMatch::None),
        2 => Just(IfMatch::Current),
        1 => Just(IfMatch::Stale),
        1 => Just(IfMatch::Star),
    ];
    prop_oneof![
        6 => (0..ACCOUNTS, op, key, if_match).prop_map(|(account, op, key, if_match)| Step::Send {
            account,
            op,
            key,
            if_match
        }),
        1 => Just(Step::Retry),
    ]
}

/// One HTTP request as sent, so a retry can send it again.
#[derive(Debug, Clone)]
struct Request {
    account: usize,
    command: &'static str,
    body: Value,
    key: Option<String>,
    if_match: Option<String>,
}

/// What the daemon must answer: a status, and for a 200 the version and
/// event types.
#[derive(Debug, Clone, PartialEq)]
struct Reply {
    status: u16,
    version: Option<u64>,
    events: Vec<String>,
}

impl Reply {
    fn error(status: u16) -> Reply {
        Reply {
            status,
            version: None,
            events: Vec::new(),
        }
    }
}

/// One account as DESIGN.md §3's example domain defines it.
#[derive(Debug, Clone)]
struct Account {
    version: u64,
    status: &'static str,
    balance: f64,
    owner: String,
    last_key: Option<String>,
    /// Accepted keyed commands: key → (command, body, first reply).
    answers: HashMap<String, (&'static str, Value, Reply)>,
}

impl Default for Account {
    fn default() -> Self {
        Account {
            version: 0,
            status: "none",
            balance: 0.0,
            owner: String::new(),
            last_key: None,
            answers: HashMap::new(),
        }
    }
}

impl Account {
    /// The write side's order: schema (before the writer), stored idempotent
    /// answer, `If-Match`, rules, then the events.
    fn handle(&mut self, request: &Request) -> Reply {
        let amount = request.body.get("amount").and_then(Value::as_f64);
        let schema_ok = match request.command {
            "open" => request.body["owner"]
                .as_str()
                .is_some_and(|o| !o.is_empty()),
            "deposit" | "withdraw" => amount.is_some_and(|a| a > 0.0),
            _ => true,
        };
        if !schema_ok {
            return Reply::error(400);
        }
        if let Some(key) = &request.key
            && let Some((command, body, reply)) = self.answers.get(key)
        {
            return if *command == request.command && *body == request.body {
                reply.clone()
            } else {
                Reply::error(422)
            };
        }
        match request.if_match.as_deref() {
            None => {}
            Some("*") if self.version == 0 => return Reply::error(412),
            Some("*") => {}
            Some(tag) if tag != format!("\"{}\"", self.version) => return Reply::error(412),
            Some(_) => {}
        }
        let amount = amount.unwrap_or(0.0);
        let (allowed, event) = match request.command {
            "open" => (self.status == "none", "AccountOpened"),
            "deposit" => (self.status == "open", "MoneyDeposited"),
            "withdraw" => (
                self.status == "open" && self.balance >= amount,
                "MoneyWithdrawn",
            ),
            _ => (
                self.status == "open" && self.balance == 0.0,
                "AccountClosed",
            ),
        };
        if !allowed {
            return Reply::error(422);
        }
        match request.command {
            "open" => {
                self.status = "open";
                self.owner = request.body["owner"].as_str().unwrap().to_owned();
            }
            "deposit" => self.balance += amount,
            "withdraw" => self.balance -= amount,
            _ => self.status = "closed",
        }
        self.version += 1;
        let reply = Reply {
            status: 200,
            version: Some(self.version),
            events: vec![event.to_owned()],
        };
        if let Some(key) = &request.key {
            self.answers.insert(
                key.clone(),
                (request.command, request.body.clone(), reply.clone()),
            );
        }
        reply
    }
}

fn amount_json(index: usize) -> Value {
    let amount = AMOUNTS[index];
    // Whole amounts go as JSON integers, as a client would send them.
    if amount.fract() == 0.0 {
        json!(amount as i64)
    } else {
        json!(amount)
    }
}

/// Builds the request of a step from the model's current view of the account.
fn request_of(
    account_index: usize,
    op: &Op,
    key: &Key,
    if_match: &IfMatch,
    account: &mut Account,
    next_key: &mut u64,
) -> Request {
    let (command, body) = match op {
        Op::Open { empty_owner } => (
            "open",
            json!({"owner": if *empty_owner { "" } else { "Ada" }}),
        ),
        Op::Deposit(i) => ("deposit", json!({"amount": amount_json(*i)})),
        Op::Withdraw(i) => ("withdraw", json!({"amount": amount_json(*i)})),
        Op::Close => ("close", json!({})),
    };
    let mut fresh = || {
        *next_key += 1;
        format!("k-{next_key}")
    };
    let key = match key {
        Key::None => None,
        Key::Fresh => Some(fresh()),
        Key::Reuse => Some(account.last_key.clone().unwrap_or_else(fresh)),
    };
    if key.is_some() {
        account.last_key.clone_from(&key);
    }
    let if_match = match if_match {
        IfMatch::None => None,
        IfMatch::Current => Some(format!("\"{}\"", account.version)),
        IfMatch::Stale => Some(format!("\"{}\"", account.version + 1)),
        IfMatch::Star => Some("*".to_owned()),
    };
    Request {
        account: account_index,
        command,
        body,
        key,
        if_match,
    }
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    request: &Request,
) -> Result<Reply, String> {
    let mut builder = http
        .post(format!("{base}/commands/account/{id}/{}", request.command))
        .json(&request.body);
    if let Some(key) = &request.key {
        builder = builder.header("idempotency-key", key);
    }
    if let Some(tag) = &request.if_match {
        builder = builder.header("if-match", tag);
    }
    let response = builder.send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let etag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        if content_type != "application/problem+json" || body["status"] != status {
            return Err(format!("{status} is not a problem: {content_type} {body}"));
        }
        return Ok(Reply::error(status));
    }
    let version = body["version"].as_u64();
    if etag != version.map(|v| format!("\"{v}\"")) {
        return Err(format!("ETag {etag:?} does not name version {version:?}"));
    }
    let events = body["events"]
        .as_array()
        .ok_or_else(|| format!("no events in {body}"))?
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("?").to_owned())
        .collect();
    Ok(Reply {
        status,
        version,
        events,
    })
}

/// Runs one case on fresh account ids and compares every reply, then every
/// account's state, with the model.
async fn run_case(
    http: &reqwest::Client,
    base: &str,
    case: u64,
    steps: &[Step],
) -> Result<(), TestCaseError> {
    let ids: Vec<String> = (0..ACCOUNTS)
        .map(|i| format!("case{case}-acc{i}"))
        .collect();
    let mut accounts = vec![Account::default(); ACCOUNTS];
    let mut next_key = 0;
    let mut previous: Option<Request> = None;
    for (n, step) in steps.iter().enumerate() {
        let request = match step {
            Step::Retry => match &previous {
                Some(request) => request.clone(),
                None => continue,
            },
            Step::Send {
                account,
                op,
                key,
                if_match,
            } => request_of(
                *account,
                op,
                key,
                if_match,
                &mut accounts[*account],
                &mut next_key,
            ),
        };
        let expected = accounts[request.account].handle(&request);
        let actual = send(http, base, &ids[request.account], &request)
            .await
            .map_err(TestCaseError::fail)?;
        prop_assert_eq!(&actual, &expected, "step {} {:?}", n, request);
        previous = Some(request);
    }
    for (id, account) in ids.iter().zip(&accounts) {
        let response = http
            .get(format!("{base}/aggregates/account/{id}"))
            .send()
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        if account.version == 0 {
            prop_assert_eq!(response.status().as_u16(), 404, "{} should not exist", id);
            continue;
        }
        prop_assert_eq!(response.status().as_u16(), 200);
        let body: Value = response
            .json()
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(body["version"].as_u64(), Some(account.version), "{}", id);
        prop_assert_eq!(body["state"]["status"].as_str(), Some(account.status));
        prop_assert_eq!(
            body["state"]["owner"].as_str(),
            Some(account.owner.as_str())
        );
        prop_assert_eq!(body["state"]["balance"].as_f64(), Some(account.balance));
    }
    Ok(())
}

async fn command_sequences_match_the_model(backend: Backend) {
    let daemon = Process::start(ProcessOptions::backend(backend));
    daemon.ready().await;
    let base = daemon.url("");
    let runtime = tokio::runtime::Handle::current();
    // proptest's runner is synchronous: it runs on a blocking thread, and each
    // case drives its async requests on the test's runtime.
    tokio::task::spawn_blocking(move || {
        let http = client();
        let mut runner = TestRunner::new(Config {
            cases: CASES,
            max_shrink_iters: 256,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/it/write_model.proptest-regressions"
            )))),
            ..Config::default()
        });
        // Every case, shrunk ones included, gets account ids of its own, so
        // the daemon's state never leaks from one case into the next.
        let case = std::cell::Cell::new(0u64);
        let result = runner.run(&prop::collection::vec(step(), 1..=MAX_STEPS), |steps| {
            case.set(case.get() + 1);
            runtime.block_on(run_case(&http, &base, case.get(), &steps))
        });
        if let Err(error) = result {
            panic!("{error}");
        }
    })
    .await
    .unwrap();
}
