//! Starting daemons for tests: the real binary as a child process, or an
//! in-process daemon with test routes.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cqrsd::config::Config;
use cqrsd::daemon::{Daemon, RoutesHook, StartOptions};
use cqrsd::log::EventLog;
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
}

/// Options for starting a child daemon.
#[derive(Default)]
pub struct ProcessOptions {
    /// Extra `config.toml` text; `[storage] data_dir` and `[http] listen` are set by the harness.
    pub config: String,
    pub env: Vec<(String, String)>,
}

impl Process {
    pub fn start(options: ProcessOptions) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, &options.config).unwrap();
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
        for (key, value) in &options.env {
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
        }
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
    pub dir: tempfile::TempDir,
    /// The daemon's event log, for tests that append records directly.
    pub log: EventLog,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    /// Starts a daemon on a free loopback port; `adjust` edits the test config.
    pub fn start(adjust: impl FnOnce(&mut Config), routes: Option<RoutesHook>) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.http.listen = "127.0.0.1:0".to_owned();
        config.storage.data_dir = dir.path().join("data");
        adjust(&mut config);
        let (started_tx, started_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let options = StartOptions {
                handle_signals: false,
                extra_routes: routes,
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
            dir,
            log,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
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
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
