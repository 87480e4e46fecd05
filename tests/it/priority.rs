//! Projection threads, and the tantivy threads of search indexes, run at
//! `[projections] nice`, so a busy machine schedules the command and query
//! threads first; the rest of the daemon keeps its normal priority.

use std::collections::BTreeMap;

use crate::for_each_backend;
use crate::harness::{Backend, Process, ProcessOptions};

/// The nice values of the daemon's threads, by thread name (several threads
/// may share a name: all their values are listed).
fn nice_by_thread(pid: u32) -> BTreeMap<String, Vec<i64>> {
    let mut threads: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        // A thread can end between the listing and the reads.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue;
        };
        // `stat` is "tid (comm) state ...": nice is field 19, the 17th after
        // the closing parenthesis (comm itself may contain spaces).
        let after = &stat[stat.rfind(')').unwrap() + 1..];
        let nice: i64 = after.split_whitespace().nth(16).unwrap().parse().unwrap();
        threads
            .entry(comm.trim().to_owned())
            .or_default()
            .push(nice);
    }
    threads
}

fn assert_nice(threads: &BTreeMap<String, Vec<i64>>, prefix: &str, expected: i64) {
    let matching: Vec<(&String, &Vec<i64>)> = threads
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .collect();
    assert!(
        !matching.is_empty(),
        "no thread named {prefix}*: {threads:?}"
    );
    for (name, values) in matching {
        assert!(
            values.iter().all(|nice| *nice == expected),
            "thread {name} has nice {values:?}, expected {expected}: {threads:?}"
        );
    }
}

async fn projection_threads_run_at_the_configured_nice_value(backend: Backend) {
    let daemon = Process::start(ProcessOptions::backend(backend));
    daemon.ready().await;
    let threads = nice_by_thread(daemon.child.id());
    // The default is 10 for the projection worker and the search index's
    // indexing threads, 0 for the threads that serve requests.
    assert_nice(&threads, "cqrsd-projectio", 10);
    assert_nice(&threads, "thrd-tantivy", 10);
    assert_nice(&threads, "cqrsd-http", 0);
    assert_nice(&threads, "cqrsd-command", 0);
    assert_nice(&threads, "cqrsd-query", 0);

    let mut options = ProcessOptions::backend(backend);
    options.config.push_str("[projections]\nnice = 3\n");
    let daemon = Process::start(options);
    daemon.ready().await;
    let threads = nice_by_thread(daemon.child.id());
    assert_nice(&threads, "cqrsd-projectio", 3);
    assert_nice(&threads, "thrd-tantivy", 3);
    assert_nice(&threads, "cqrsd-command", 0);
}

for_each_backend!(projection_threads_run_at_the_configured_nice_value);
