//! Read-side throughput of cqrsd on the bank domain.
//!
//! ```text
//! cargo run --release --example projection_throughput -- [--events N] [--accounts M] [--workers W] [--seconds S]
//! ```
//!
//! 1. Fills an embedded log in a temporary data directory with N bank events
//!    (one event per record, `fsync = false`) through an in-process daemon
//!    whose domain has no projections.
//! 2. Starts a daemon with the full bank domain on that data and times, per
//!    projection, how long it takes to catch up with the whole log (polling
//!    `GET /admin/projections`), and the time to `/readyz` 200.
//! 3. Measures `GET /views/accounts/{id}` and `GET /livez` at a fixed
//!    concurrency with keep-alive connections (a tiny std-only HTTP/1.1
//!    client, one thread per connection).
//! 4. Times `POST /admin/projections/accounts/rebuild` until the new
//!    generation is live.
//! 5. Prints a table, one JSON line, the peak RSS and the disk bytes of the
//!    data directory per byte of event payload.
//!
//! Every loop is bounded in count and time; only loopback addresses are used.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::{DateTime, TimeZone as _, Utc};
use cqrsd::config::Config;
use cqrsd::daemon::{Daemon, StartOptions};
use cqrsd::log::{Encoding, Event, EventLog, EventMetadata, encode, partition_for};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Records per `EventLog::append` call during the fill.
const FILL_BATCH: usize = 4096;
/// Longest wait for the projections to catch up, or for a rebuild.
const CATCH_UP_BOUND: Duration = Duration::from_secs(3600);
/// How often the admin API is polled.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Connections (one thread each) of the key-lookup load.
const CONNECTIONS: usize = 32;
const OWNERS: [&str; 8] = [
    "ada lovelace",
    "bob marley",
    "cy twombly",
    "dee dee ramone",
    "eve online",
    "fay wray",
    "gus grissom",
    "hal jordan",
];

struct Args {
    events: u64,
    accounts: u64,
    workers: Option<usize>,
    seconds: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        events: 1_000_000,
        accounts: 10_000,
        workers: None,
        seconds: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => args.events = value.parse()?,
            "--accounts" => args.accounts = value.parse()?,
            "--workers" => args.workers = Some(value.parse()?),
            "--seconds" => args.seconds = value.parse()?,
            _ => bail!(
                "unknown flag {flag}; usage: [--events N] [--accounts M] [--workers W] [--seconds S]"
            ),
        }
    }
    if args.accounts == 0 || args.events < args.accounts {
        bail!("--events must be at least --accounts, and --accounts at least 1");
    }
    Ok(args)
}

/// A small deterministic generator (xorshift64*), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn account_id(i: u64) -> String {
    format!("acc-{i:07}")
}

/// A daemon running on its own thread, as the integration tests start one.
struct Running {
    addr: SocketAddr,
    log: EventLog,
    shutdown: CancellationToken,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn start(config: Config) -> anyhow::Result<Running> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let daemon = match Daemon::start(config, StartOptions::default()) {
                Ok(daemon) => daemon,
                Err(error) => {
                    let message = format!("{error:#}");
                    let _ = tx.send(Err(error));
                    bail!(message);
                }
            };
            let _ = tx.send(Ok((
                daemon.local_addr(),
                daemon.log().clone(),
                daemon.shutdown_token(),
            )));
            daemon.wait()
        });
        let (addr, log, shutdown) = rx
            .recv_timeout(Duration::from_secs(120))
            .context("the daemon did not start in time")??;
        Ok(Running {
            addr,
            log,
            shutdown,
            thread,
        })
    }

    fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the daemon thread panicked"))?
    }
}

fn config(dir: &Path, domain: &Path, fsync: bool, workers: Option<usize>) -> Config {
    let mut config = Config::default();
    config.http.listen = "127.0.0.1:0".to_owned();
    config.storage.data_dir = dir.join("data");
    config.domain.path = Some(domain.to_owned());
    config.log.embedded.fsync = fsync;
    if let Some(workers) = workers {
        config.projections.workers = workers;
    }
    config
}

struct Fill {
    /// Next offset per partition after the fill.
    ends: HashMap<u32, u64>,
    payload_bytes: u64,
    seconds: f64,
}

fn event(id: &str, version: u64, event_type: &str, timestamp: DateTime<Utc>, data: Value) -> Event {
    Event {
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "account".to_owned(),
        aggregate_id: id.to_owned(),
        version,
        event_type: event_type.to_owned(),
        schema_version: 1,
        timestamp,
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

/// Appends the bank events, one per record, in batches per partition.
fn fill(log: &EventLog, args: &Args) -> anyhow::Result<Fill> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let topic = log.topic("account");
    let partitions = log.partitions();
    let mut pending: HashMap<u32, Vec<cqrsd::log::Record>> = HashMap::new();
    let mut ends: HashMap<u32, u64> = HashMap::new();
    let mut versions = vec![0_u64; args.accounts as usize];
    let mut balances = vec![0_i64; args.accounts as usize];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut payload_bytes = 0_u64;
    // A year of events, in time order.
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let step_ms = (365 * 86_400_000 / args.events as i64).max(1);
    let started = Instant::now();
    let mut flush = |partition: u32, records: Vec<cqrsd::log::Record>| -> anyhow::Result<()> {
        let offsets = runtime.block_on(log.append(&topic, partition, records))?;
        if let Some(last) = offsets.last() {
            ends.insert(partition, last + 1);
        }
        Ok(())
    };
    for n in 0..args.events {
        let timestamp = start + chrono::Duration::milliseconds(n as i64 * step_ms);
        let (i, event_type, data) = if n < args.accounts {
            let owner = OWNERS[(n % OWNERS.len() as u64) as usize];
            (
                n,
                "AccountOpened",
                json!({ "owner": format!("{owner} {n}") }),
            )
        } else {
            let i = rng.below(args.accounts);
            let amount = 1 + rng.below(500) as i64;
            // Mostly deposits; a withdrawal only when the balance allows it.
            if rng.below(3) == 0 && balances[i as usize] >= amount {
                balances[i as usize] -= amount;
                (i, "MoneyWithdrawn", json!({ "amount": amount }))
            } else {
                balances[i as usize] += amount;
                (i, "MoneyDeposited", json!({ "amount": amount }))
            }
        };
        let id = account_id(i);
        versions[i as usize] += 1;
        let record = encode(
            &[event(
                &id,
                versions[i as usize],
                event_type,
                timestamp,
                data,
            )],
            Encoding::MessagePack,
        )?;
        payload_bytes += record.value.len() as u64;
        let partition = partition_for(&id, partitions);
        let batch = pending.entry(partition).or_default();
        batch.push(record);
        if batch.len() >= FILL_BATCH {
            let records = std::mem::take(batch);
            flush(partition, records)?;
        }
        if (n + 1) % 200_000 == 0 {
            eprintln!(
                "  filled {} events ({:.1} s)",
                n + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    for (partition, records) in pending {
        if !records.is_empty() {
            flush(partition, records)?;
        }
    }
    Ok(Fill {
        ends,
        payload_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A keep-alive HTTP/1.1 connection on loopback: just enough client for
/// status codes and small bodies.
struct Conn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        anyhow::ensure!(addr.ip().is_loopback(), "only loopback addresses");
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            addr,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request and reads the whole response: (status, body).
    fn request(&mut self, method: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
            self.addr
        );
        self.reader.get_mut().write_all(head.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .context("no status line")?
            .parse()?;
        let mut length: Option<usize> = None;
        let mut chunked = false;
        for _ in 0..100 {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').context("bad header")?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse()?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        let mut body = Vec::new();
        if chunked {
            for _ in 0..100_000 {
                line.clear();
                self.reader.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim(), 16)?;
                let start = body.len();
                body.resize(start + size + 2, 0);
                self.reader.read_exact(&mut body[start..])?;
                body.truncate(start + size);
                if size == 0 {
                    break;
                }
            }
        } else {
            body.resize(length.unwrap_or(0), 0);
            self.reader.read_exact(&mut body)?;
        }
        Ok((status, body))
    }

    fn get_json(&mut self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.request("GET", path)?;
        anyhow::ensure!(status == 200, "GET {path}: {status}");
        Ok(serde_json::from_slice(&body)?)
    }
}

/// Whether a projection's reported positions reach the ends of the fill.
fn caught_up(projection: &Value, ends: &HashMap<u32, u64>) -> bool {
    let Some(partitions) = projection["partitions"].as_array() else {
        return false;
    };
    ends.iter().all(|(partition, end)| {
        partitions.iter().any(|p| {
            p["partition"].as_u64() == Some(u64::from(*partition))
                && p["position"].as_u64().is_some_and(|pos| pos >= *end)
        })
    })
}

struct CatchUp {
    seconds: HashMap<String, f64>,
    events_total: HashMap<String, u64>,
    ready_seconds: f64,
}

/// Polls `/admin/projections` and `/readyz` from `started` until every
/// projection has reached the ends of the log.
fn wait_catch_up(
    addr: SocketAddr,
    started: Instant,
    ends: &HashMap<u32, u64>,
) -> anyhow::Result<CatchUp> {
    let mut conn = Conn::open(addr)?;
    let mut seconds = HashMap::new();
    let mut events_total = HashMap::new();
    let mut ready_seconds = None;
    let mut last_print = Instant::now();
    while started.elapsed() < CATCH_UP_BOUND {
        if ready_seconds.is_none() && conn.request("GET", "/readyz")?.0 == 200 {
            ready_seconds = Some(started.elapsed().as_secs_f64());
        }
        let report = conn.get_json("/admin/projections")?;
        let projections = report["projections"].as_array().context("no projections")?;
        for projection in projections {
            let name = projection["name"].as_str().unwrap_or("?").to_owned();
            if !seconds.contains_key(&name) && caught_up(projection, ends) {
                seconds.insert(name.clone(), started.elapsed().as_secs_f64());
                events_total.insert(name, projection["events_total"].as_u64().unwrap_or(0));
            }
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            last_print = Instant::now();
            let progress: Vec<String> = projections
                .iter()
                .map(|p| {
                    format!(
                        "{}={} ({:.0}/s)",
                        p["name"].as_str().unwrap_or("?"),
                        p["events_total"],
                        p["events_per_sec"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect();
            eprintln!(
                "  {:.0} s: {}",
                started.elapsed().as_secs_f64(),
                progress.join(", ")
            );
        }
        if seconds.len() == projections.len() && ready_seconds.is_some() {
            return Ok(CatchUp {
                seconds,
                events_total,
                ready_seconds: ready_seconds.unwrap_or_default(),
            });
        }
        std::thread::sleep(POLL_EVERY);
    }
    bail!("the projections did not catch up within {CATCH_UP_BOUND:?}")
}

struct Load {
    requests: u64,
    errors: u64,
    per_sec: f64,
    p50_us: u64,
    p99_us: u64,
}

/// `CONNECTIONS` threads, each on one keep-alive connection, send GETs made
/// by `path` for `duration`; latencies are recorded per request.
fn load(
    addr: SocketAddr,
    duration: Duration,
    path: impl Fn(&mut Rng) -> String + Send + Sync + 'static,
) -> anyhow::Result<Load> {
    let path = Arc::new(path);
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..CONNECTIONS {
        let path = path.clone();
        let stop = stop.clone();
        threads.push(std::thread::spawn(
            move || -> anyhow::Result<(Vec<u32>, u64)> {
                let mut conn = Conn::open(addr)?;
                let mut rng = Rng(0xDEAD_BEEF ^ ((t as u64 + 1) << 32));
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut errors = 0;
                // Bounded by the stop flag and by a count.
                for _ in 0..50_000_000_u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let p = path(&mut rng);
                    let sent = Instant::now();
                    let (status, _) = conn.request("GET", &p)?;
                    latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    if status != 200 {
                        errors += 1;
                    }
                }
                Ok((latencies, errors))
            },
        ));
    }
    let started = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for thread in threads {
        let (latencies, e) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        all.extend(latencies);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> u64 {
        if all.is_empty() {
            return 0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        u64::from(all[i])
    };
    Ok(Load {
        requests: all.len() as u64,
        errors,
        per_sec: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

fn projection<'a>(report: &'a Value, name: &str) -> Option<&'a Value> {
    report["projections"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// Requests a rebuild of `name` and waits until a new generation is live
/// and caught up; returns the seconds it took.
fn rebuild(addr: SocketAddr, name: &str, ends: &HashMap<u32, u64>) -> anyhow::Result<f64> {
    let mut conn = Conn::open(addr)?;
    let before = conn.get_json("/admin/projections")?;
    let generation = projection(&before, name)
        .and_then(|p| p["generation"].as_u64())
        .context("no generation")?;
    let started = Instant::now();
    let (status, body) = conn.request("POST", &format!("/admin/projections/{name}/rebuild"))?;
    anyhow::ensure!(
        status == 202,
        "rebuild: {status} {}",
        String::from_utf8_lossy(&body)
    );
    while started.elapsed() < CATCH_UP_BOUND {
        let report = conn.get_json("/admin/projections")?;
        let p = projection(&report, name).context("projection gone")?;
        if p["generation"].as_u64().is_some_and(|g| g > generation)
            && p["state"] == "running"
            && caught_up(p, ends)
        {
            return Ok(started.elapsed().as_secs_f64());
        }
        std::thread::sleep(POLL_EVERY);
    }
    bail!("the rebuild did not finish within {CATCH_UP_BOUND:?}")
}

fn status_kb(field: &str) -> u64 {
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

fn dir_bytes(path: &Path) -> u64 {
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
                // Allocated blocks, not the apparent size (sled preallocates).
                use std::os::unix::fs::MetadataExt as _;
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dir = tempfile::tempdir()?;
    let full_domain = dir.path().join("bank.toml");
    let bare_domain = dir.path().join("bank-no-projections.toml");
    let source = cqrsd::domain::EXAMPLE_DOMAIN;
    let cut = source
        .find("\n[projections.")
        .context("the example domain has no projections")?;
    std::fs::write(&full_domain, source)?;
    std::fs::write(&bare_domain, &source[..cut])?;

    eprintln!(
        "filling {} events over {} accounts (fsync off, no projections)",
        args.events, args.accounts
    );
    let filler = Running::start(config(dir.path(), &bare_domain, false, None))?;
    let filled = fill(&filler.log, &args)?;
    filler.stop()?;
    let log_bytes = dir_bytes(&dir.path().join("data"));
    eprintln!(
        "filled in {:.1} s ({:.0} events/s); {} payload bytes, {} bytes on disk",
        filled.seconds,
        args.events as f64 / filled.seconds,
        filled.payload_bytes,
        log_bytes
    );
    let rss_after_fill_kb = status_kb("VmRSS:");

    eprintln!("starting the full bank domain; waiting for the projections to catch up");
    let started = Instant::now();
    let daemon = Running::start(config(dir.path(), &full_domain, true, args.workers))?;
    let caught = wait_catch_up(daemon.addr, started, &filled.ends)?;
    let names = ["accounts", "daily_flows", "account_search"];

    let seconds = Duration::from_secs(args.seconds);
    eprintln!("GET /views/accounts/{{id}}: {CONNECTIONS} connections, {seconds:?}");
    let accounts = args.accounts;
    let views = load(daemon.addr, seconds, move |rng| {
        format!("/views/accounts/{}", account_id(rng.below(accounts)))
    })?;
    eprintln!("GET /livez: {CONNECTIONS} connections, {seconds:?}");
    let livez = load(daemon.addr, seconds, |_| "/livez".to_owned())?;

    eprintln!("rebuilding accounts");
    let rebuild_seconds = rebuild(daemon.addr, "accounts", &filled.ends)?;
    let data_bytes = dir_bytes(&dir.path().join("data"));
    let rss_kb = status_kb("VmRSS:");
    let hwm_kb = status_kb("VmHWM:");
    daemon.stop()?;

    let workers = args
        .workers
        .unwrap_or(Config::default().projections.workers);
    println!();
    println!(
        "cqrsd read side: {} events, {} accounts, projection workers {workers}",
        args.events, args.accounts
    );
    println!(
        "fill (no projections, fsync off): {:.1} s, {:.0} events/s",
        filled.seconds,
        args.events as f64 / filled.seconds
    );
    println!("{:<44} {:>12} {:>14}", "measure", "seconds", "events/s");
    for name in names {
        let s = caught.seconds.get(name).copied().unwrap_or(f64::NAN);
        println!(
            "{:<44} {:>12.1} {:>14.0}",
            format!("catch-up {name} (from daemon start)"),
            s,
            args.events as f64 / s
        );
    }
    println!(
        "{:<44} {:>12.1}",
        "/readyz 200 (from daemon start)", caught.ready_seconds
    );
    println!(
        "{:<44} {:>12.1} {:>14.0}",
        "rebuild accounts until new generation live",
        rebuild_seconds,
        args.events as f64 / rebuild_seconds
    );
    println!(
        "{:<44} {:>12} {:>10} {:>10} {:>8}",
        "HTTP, 32 keep-alive connections", "req/s", "p50 us", "p99 us", "errors"
    );
    for (label, l) in [("GET /views/accounts/{id}", &views), ("GET /livez", &livez)] {
        println!(
            "{:<44} {:>12.0} {:>10} {:>10} {:>8}",
            label, l.per_sec, l.p50_us, l.p99_us, l.errors
        );
    }
    println!(
        "RSS: VmHWM {} MiB (whole process, fill included), VmRSS after fill {} MiB, at end {} MiB",
        hwm_kb / 1024,
        rss_after_fill_kb / 1024,
        rss_kb / 1024
    );
    println!(
        "disk: log only {} MiB ({:.2} B/B payload); all data after rebuild {} MiB ({:.2} B/B payload); payload {} MiB",
        log_bytes >> 20,
        log_bytes as f64 / filled.payload_bytes as f64,
        data_bytes >> 20,
        data_bytes as f64 / filled.payload_bytes as f64,
        filled.payload_bytes >> 20
    );
    let catch_up: serde_json::Map<String, Value> = names
        .iter()
        .map(|n| {
            let s = caught.seconds.get(*n).copied().unwrap_or(f64::NAN);
            (
                (*n).to_owned(),
                json!({ "seconds": s, "events_per_sec": args.events as f64 / s,
                        "events_total": caught.events_total.get(*n) }),
            )
        })
        .collect();
    let summary = json!({
        "events": args.events,
        "accounts": args.accounts,
        "workers": workers,
        "fill_seconds": filled.seconds,
        "catch_up": catch_up,
        "readyz_seconds": caught.ready_seconds,
        "rebuild_accounts_seconds": rebuild_seconds,
        "views_get": { "rps": views.per_sec, "p50_us": views.p50_us, "p99_us": views.p99_us,
                       "requests": views.requests, "errors": views.errors },
        "livez_get": { "rps": livez.per_sec, "p50_us": livez.p50_us, "p99_us": livez.p99_us,
                       "requests": livez.requests, "errors": livez.errors },
        "connections": CONNECTIONS,
        "vm_hwm_kb": hwm_kb,
        "payload_bytes": filled.payload_bytes,
        "log_disk_bytes": log_bytes,
        "data_disk_bytes": data_bytes,
        "disk_per_payload_byte": data_bytes as f64 / filled.payload_bytes as f64,
    });
    println!("{summary}");
    Ok(())
}
