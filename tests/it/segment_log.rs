//! The embedded log's files under faults: a `kill -9` in the middle of group
//! commits followed by a torn tail, a damaged record before valid ones, and a
//! data directory that still holds the sled log of earlier versions.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::crash::deposit_until_killed;
use crate::harness::{
    Process, ProcessOptions, assert_dense_versions, client, command, cqrsd_bin, get_json,
};

const ACCOUNTS: usize = 4;
const CLIENTS: usize = 16;

fn options() -> ProcessOptions {
    ProcessOptions {
        config: "[log]\nbackend = \"embedded\"\n".to_owned(),
        ..ProcessOptions::default()
    }
}

/// Every segment file (`*.log`) under the data directory's segment log.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("data").join("eventlog")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every idempotency key found in the accounts' histories; each must appear once.
async fn logged_keys(http: &reqwest::Client, base: &str) -> HashSet<String> {
    let mut keys = HashSet::new();
    for account in 0..ACCOUNTS {
        let history = get_json(
            http,
            &format!("{base}/aggregates/account/acc{account}/events?limit=10000"),
        )
        .await;
        let events = history["events"].as_array().unwrap();
        assert_dense_versions(events, &format!("acc{account}"));
        for event in events {
            if let Some(key) = event["idempotency_key"].as_str() {
                assert!(keys.insert(key.to_owned()), "{key} applied twice");
            }
        }
        let state = get_json(http, &format!("{base}/aggregates/account/acc{account}")).await;
        assert_eq!(state["version"], events.len() as u64);
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_group_commits_then_a_torn_tail_loses_nothing_acknowledged() {
    let daemon = Process::start(options());
    let http = client();
    let (acknowledged, clients) =
        deposit_until_killed(&http, &daemon.url(""), ACCOUNTS, CLIENTS, 300).await;
    let mut daemon = daemon;
    daemon.signal("KILL");
    daemon.wait_exit(Duration::from_secs(30));
    for client in clients {
        client.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 50,
        "too little load: {}",
        acknowledged.len()
    );
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    drop(daemon);

    // What a crash in the middle of a write leaves at the end of a segment: the
    // start of a frame, garbage, zeros. Each partition's last segment gets one.
    let files = segments(dir.path());
    let mut damaged = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let len = std::fs::metadata(path).unwrap().len();
        if len == 0 {
            continue;
        }
        let mut tail: Vec<u8> = match damaged.len() % 3 {
            0 => vec![0, 0, 1, 40, 0xAB, 0xCD, 0xEF, 0x01, 0, 0],
            1 => (0..777u32)
                .map(|b| (b.wrapping_mul(2_654_435_761) >> 11) as u8)
                .collect(),
            _ => vec![0; 3000],
        };
        tail.push(i as u8);
        let mut bytes = std::fs::read(path).unwrap();
        bytes.extend_from_slice(&tail);
        std::fs::write(path, &bytes).unwrap();
        damaged.push((path.clone(), len));
    }
    assert!(!damaged.is_empty());

    let daemon = Process::start_in(dir, options());
    daemon.ready().await;
    for (path, len) in &damaged {
        assert_eq!(
            std::fs::metadata(path).unwrap().len(),
            *len,
            "{}",
            path.display()
        );
    }
    let found = logged_keys(&http, &daemon.url("")).await;
    for key in &acknowledged {
        assert!(found.contains(key), "acknowledged command {key} lost");
    }
    // The log takes commands again where it stopped.
    let response = command(
        &http,
        &daemon.url(""),
        "account/acc0/deposit",
        json!({"amount": 1}),
    )
    .await;
    assert_eq!(response.status(), 200);
}

/// Runs `cqrsd serve` on the directory of a stopped daemon and returns its
/// exit code and standard error; it must not start.
fn serve_expecting_failure(dir: &Path) -> (Option<i32>, String) {
    let output = Command::new(cqrsd_bin())
        .args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .env("CQRSD__HTTP__LISTEN", "127.0.0.1:0")
        .env("CQRSD__STORAGE__DATA_DIR", dir.join("data"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_before_valid_ones_refuses_to_start_naming_file_and_byte() {
    let daemon = Process::start(options());
    let http = client();
    let base = daemon.url("");
    assert_eq!(
        command(&http, &base, "account/acc0/open", json!({"owner": "x"}))
            .await
            .status(),
        200
    );
    for _ in 0..4 {
        let response = command(&http, &base, "account/acc0/deposit", json!({"amount": 1})).await;
        assert_eq!(response.status(), 200);
    }
    let mut daemon = daemon;
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(30));
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    drop(daemon);

    let path = segments(dir.path())
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // Frames start with their length (u32 BE, after which come the CRC and the
    // rest); the third record starts after the first two.
    let frame_len =
        |at: usize| 8 + u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let second = frame_len(0);
    let third = second + frame_len(second);
    assert!(third < bytes.len(), "fewer than three records");
    bytes[second + 40] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();

    let (code, stderr) = serve_expecting_failure(dir.path());
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains(&format!("at byte {second}")), "{stderr}");
    // The file was left as it was: nothing is cut when valid records follow.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn a_legacy_sled_log_is_refused_naming_the_migration_command() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), "").unwrap();
    let legacy = dir.path().join("data").join("log");
    std::fs::create_dir_all(&legacy).unwrap();
    std::fs::write(legacy.join("conf"), b"segment_size: 524288\n").unwrap();
    let (code, stderr) = serve_expecting_failure(dir.path());
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("cqrsd log migrate"), "{stderr}");
    assert!(!dir.path().join("data").join("eventlog").exists());
}

/// A sled database in the layout of the embedded log before segment files:
/// `meta` (`format` → "1", `topic/<topic>` → partition count) and one tree per
/// partition from offset (u64 BE) to `version 1 ‖ CRC-32 ‖ body`.
fn write_legacy_log(data_dir: &Path, records: &[(u32, u64, cqrsd::log::Record)]) {
    let db = sled::open(data_dir.join("log")).unwrap();
    let meta = db.open_tree("meta").unwrap();
    meta.insert("format", "1").unwrap();
    meta.insert("topic/cqrsd.account", &8u32.to_be_bytes())
        .unwrap();
    for (partition, offset, record) in records {
        let mut body = Vec::new();
        body.extend_from_slice(&record.timestamp_ms.to_be_bytes());
        body.extend_from_slice(&(record.key.len() as u32).to_be_bytes());
        body.extend_from_slice(record.key.as_bytes());
        body.extend_from_slice(&(record.headers.len() as u32).to_be_bytes());
        for (name, value) in &record.headers {
            body.extend_from_slice(&(name.len() as u32).to_be_bytes());
            body.extend_from_slice(name.as_bytes());
            body.extend_from_slice(&(value.len() as u32).to_be_bytes());
            body.extend_from_slice(value);
        }
        body.extend_from_slice(&(record.value.len() as u32).to_be_bytes());
        body.extend_from_slice(&record.value);
        let mut frame = vec![1u8];
        frame.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        frame.extend_from_slice(&body);
        db.open_tree(format!("p/cqrsd.account/{partition}"))
            .unwrap()
            .insert(offset.to_be_bytes(), frame)
            .unwrap();
    }
    db.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_migrate_converts_a_sled_log_keeping_offsets_aggregates_and_views() {
    use cqrsd::log::{Encoding, Event, EventMetadata, encode, partition_for};

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[storage]\ndata_dir = \"data\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Three accounts: opened, then deposits of 1, 2, 3, ... one command per record.
    let mut ends = [0u64; 8];
    let mut records = Vec::new();
    let mut expected = Vec::new();
    for account in 0..3u64 {
        let id = format!("acc{account}");
        let partition = partition_for(&id, 8);
        let mut balance = 0;
        for version in 1..=(4 + account) {
            let (event_type, data) = if version == 1 {
                (
                    "AccountOpened",
                    json!({"owner": format!("owner {account}")}),
                )
            } else {
                balance += version - 1;
                ("MoneyDeposited", json!({"amount": version - 1}))
            };
            let event = Event {
                event_id: uuid::Uuid::now_v7(),
                aggregate_type: "account".into(),
                aggregate_id: id.clone(),
                version,
                event_type: event_type.into(),
                schema_version: 1,
                timestamp: chrono::DateTime::from_timestamp_millis(1_764_000_000_000).unwrap(),
                data,
                metadata: EventMetadata {
                    command: if version == 1 { "open" } else { "deposit" }.into(),
                    command_id: uuid::Uuid::now_v7(),
                    idempotency_key: None,
                    correlation_id: None,
                    request_hash: "h".into(),
                    principal: None,
                },
            };
            let offset = ends[partition as usize];
            ends[partition as usize] += 1;
            records.push((
                partition,
                offset,
                encode(&[event], Encoding::MessagePack).unwrap(),
            ));
        }
        expected.push((id, partition, 4 + account, balance));
    }
    write_legacy_log(&data, &records);

    // Refused as it is, then converted.
    let (code, stderr) = serve_expecting_failure(dir.path());
    assert_ne!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) =
        crate::harness::run_cli(&["log", "migrate", "--config", "config.toml"], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("migrated {} record(s)", records.len())),
        "{stdout}"
    );
    assert!(data.join("log.sled-migrated").exists());
    assert!(!data.join("log").exists());
    // A second run has nothing to do and says so.
    let (code, _, stderr) =
        crate::harness::run_cli(&["log", "migrate", "--config", "config.toml"], dir.path());
    assert_ne!(code, 0);
    assert!(stderr.contains("nothing to migrate"), "{stderr}");

    let daemon = Process::start_in(dir, options());
    daemon.ready().await;
    let http = client();
    let base = daemon.url("");
    for (id, partition, version, balance) in &expected {
        let state = get_json(&http, &format!("{base}/aggregates/account/{id}")).await;
        assert_eq!(state["version"], *version, "{state}");
        assert_eq!(state["state"]["balance"], *balance, "{state}");
        let history = get_json(&http, &format!("{base}/aggregates/account/{id}/events")).await;
        let positions: Vec<&str> = history["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["position"].as_str().unwrap())
            .collect();
        let old: Vec<String> = records
            .iter()
            .filter(|(_, _, r)| r.key == *id)
            .map(|(p, o, _)| format!("cqrsd.account:{p}:{o}"))
            .collect();
        assert_eq!(positions, old, "positions moved");
        assert!(
            old.iter()
                .all(|p| p.starts_with(&format!("cqrsd.account:{partition}:")))
        );
        let last = old.last().unwrap();
        let view = get_json(
            &http,
            &format!("{base}/views/accounts/{id}?consistent_with={last}"),
        )
        .await;
        assert_eq!(view["doc"]["balance"], *balance, "{view}");
    }
    // The next command continues at the next offset of its partition.
    let reply = command(&http, &base, "account/acc0/deposit", json!({"amount": 5})).await;
    assert_eq!(reply.status(), 200);
    let reply: serde_json::Value = reply.json().await.unwrap();
    let p0 = expected[0].1;
    assert_eq!(
        reply["position"],
        format!("cqrsd.account:{p0}:{}", ends[p0 as usize])
    );
}

/// A small tmpfs, unmounted on drop (tests run as root here and in CI).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_loses_nothing_and_recovers_without_a_restart() {
    let disk = SmallDisk::mount(48 << 20);
    let data = disk.dir.path().join("data");
    // Small segments, so preallocation (64 KiB ahead) runs out soon after the
    // disk is full.
    let daemon = Process::start(ProcessOptions {
        config: "[log]\nbackend = \"embedded\"\n[log.embedded]\nsegment_bytes = 65536\n".to_owned(),
        env: vec![(
            "CQRSD__STORAGE__DATA_DIR".to_owned(),
            data.display().to_string(),
        )],
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let http = client();
    let base = daemon.url("");
    assert_eq!(
        command(&http, &base, "account/acc0/open", json!({"owner": "x"}))
            .await
            .status(),
        200
    );
    let mut acknowledged = 1u64;
    let deposit = async |http: &reqwest::Client| {
        command(http, &base, "account/acc0/deposit", json!({"amount": 1}))
            .await
            .status()
    };
    for _ in 0..20 {
        assert_eq!(deposit(&http).await, 200);
        acknowledged += 1;
    }
    // Fill the disk.
    let filler = disk.dir.path().join("filler");
    {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0xEEu8; 256 << 10];
        while file.write_all(&block).is_ok() {}
    }
    let mut refused = 0;
    for _ in 0..2000 {
        match deposit(&http).await.as_u16() {
            200 => acknowledged += 1,
            503 => {
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(refused, 3, "the disk never filled up");

    // Space is freed: the same daemon takes commands again.
    std::fs::remove_file(&filler).unwrap();
    let mut recovered = false;
    for _ in 0..50 {
        match deposit(&http).await.as_u16() {
            200 => {
                acknowledged += 1;
                recovered = true;
                break;
            }
            503 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(recovered, "commands still refused after space was freed");
    for _ in 0..5 {
        assert_eq!(deposit(&http).await, 200);
        acknowledged += 1;
    }
    let state = get_json(&http, &format!("{base}/aggregates/account/acc0")).await;
    assert_eq!(state["version"], acknowledged, "{state}");
    assert_eq!(state["state"]["balance"], acknowledged - 1, "{state}");
    let history = get_json(&http, &format!("{base}/aggregates/account/acc0/events")).await;
    assert_eq!(
        history["events"].as_array().unwrap().len() as u64,
        acknowledged
    );
    // The read side failed its writes too while the disk was full; it takes
    // them again in the same process and holds every acknowledged deposit.
    crate::readside::wait_caught_up(&http, &base).await;
    let view = get_json(&http, &format!("{base}/views/accounts/acc0")).await;
    assert_eq!(view["doc"]["balance"], acknowledged - 1, "{view}");
    drop(daemon);
    drop(disk);
}
