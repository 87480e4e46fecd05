//! The operator's console in a real headless Chromium, driven over the W3C
//! WebDriver protocol (chromedriver on a loopback port), against a real
//! daemon serving the bank example; and the Grafana dashboard's metric names
//! against a real daemon's `/metrics`.
//!
//! The WebDriver client is the few endpoints these tests need, spoken with
//! reqwest, plus chromedriver's log endpoint: that is how the tests see the
//! browser's console errors and every request the page made.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::auth::{bearer, token};
use crate::harness::{Backend, Process, ProcessOptions, client, command, get_json, get_text};

/// How long a test waits for the page to show something before failing.
const PAGE_BOUND: Duration = Duration::from_secs(30);

/// One browser at a time: each is a few hundred megabytes and two cores'
/// worth of start-up.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The chromedriver binary: `CHROMEDRIVER`, else `chromedriver` on the PATH.
/// Without one the test fails in CI (`.ci/run` installs the browser) and
/// is skipped loudly elsewhere: README's `cargo test` must pass on a fresh
/// machine with nothing installed by hand, and a test suite that installs a
/// system browser by itself would surprise more than it helps.
fn chromedriver() -> Option<PathBuf> {
    let found = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join("chromedriver"))
                .find(|path| path.is_file())
        });
    if found.is_some() {
        return found;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let install = "the console tests need Chromium and chromedriver (Debian: apt-get install \
                   chromium chromium-driver), or CHROMEDRIVER set";
    if ci {
        panic!("{install}; in CI they must run");
    }
    // Straight to the process's stderr: the test runner keeps what a passing
    // test prints with `eprintln!`.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n!!!!! SKIPPING A BROWSER TEST: {install} !!!!!\n"
    );
    None
}

/// chromedriver in a child process with one headless Chromium session.
struct Browser {
    driver: Child,
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(chromedriver: &Path) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = client();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + PAGE_BOUND;
        loop {
            if let Ok(response) = http.get(format!("{base}/status")).send().await
                && let Ok(status) = response.json::<Value>().await
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,860",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"},
        }}});
        let mut browser = Browser {
            driver,
            http,
            session: String::new(),
            _profile: profile,
        };
        let created = browser
            .call("POST", &format!("{base}/session"), capabilities)
            .await;
        browser.session = format!(
            "{base}/session/{}",
            created["sessionId"].as_str().expect("a session id")
        );
        browser
    }

    /// One WebDriver call; a WebDriver error fails the test with its message.
    async fn call(&self, method: &str, url: &str, body: Value) -> Value {
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let response = request.send().await.expect("chromedriver answers");
        let status = response.status();
        let reply: Value = response.json().await.expect("a WebDriver reply");
        assert!(status.is_success(), "WebDriver {method} {url}: {reply}");
        reply["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(
            "POST",
            &format!("{}/url", self.session),
            json!({"url": url}),
        )
        .await;
    }

    /// Runs a script's body in the page and returns what it returns.
    async fn run(&self, script: &str) -> Value {
        self.call(
            "POST",
            &format!("{}/execute/sync", self.session),
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Fills the named inputs of a form (values passed as arguments, so
    /// they need no escaping) and submits it as a user would.
    async fn submit(&self, form: &str, fields: &[(&str, &str)]) {
        let fields: serde_json::Map<String, Value> = fields
            .iter()
            .map(|(selector, value)| ((*selector).to_owned(), json!(value)))
            .collect();
        self.call(
            "POST",
            &format!("{}/execute/sync", self.session),
            json!({
                "script": "for (const [selector, value] of Object.entries(arguments[1])) {
                               document.querySelector(selector).value = value;
                           }
                           document.querySelector(arguments[0]).requestSubmit();",
                "args": [form, fields],
            }),
        )
        .await;
    }

    /// Runs `script` until it returns something other than null or false,
    /// failing the test (with the page's error banner) after `PAGE_BOUND`.
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + PAGE_BOUND;
        loop {
            let value = self.run(script).await;
            if !value.is_null() && value != Value::Bool(false) {
                return value;
            }
            if Instant::now() > deadline {
                let banner = self
                    .run("return document.querySelector('#errors').textContent")
                    .await;
                panic!("the page never showed {what}; its errors: {banner}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The browser's log of one type (`browser`: the console; `performance`:
    /// DevTools events, among them every request).
    async fn log(&self, kind: &str) -> Vec<Value> {
        let entries = self
            .call(
                "POST",
                &format!("{}/se/log", self.session),
                json!({"type": kind}),
            )
            .await;
        entries.as_array().cloned().unwrap_or_default()
    }

    /// Saves a screenshot into `CQRSD_CONSOLE_SCREENSHOTS` (the README's
    /// images are made with `CQRSD_CONSOLE_SCREENSHOTS=docs`); without it,
    /// takes one anyway so a rendering failure still fails the test.
    async fn screenshot(&self, name: &str) {
        let png = self
            .call("GET", &format!("{}/screenshot", self.session), Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
        if let Some(dir) = std::env::var_os("CQRSD_CONSOLE_SCREENSHOTS") {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("console-{name}.png")), png).unwrap();
        }
    }
}

impl Drop for Browser {
    /// Ends the session, which closes Chromium, then stops chromedriver.
    /// Drop cannot wait on async work, so the DELETE is written by hand over
    /// a blocking socket, with a bound.
    fn drop(&mut self) {
        if let Some(path) = self.session.strip_prefix("http://")
            && let Some((host, path)) = path.split_once('/')
            && let Ok(mut stream) = std::net::TcpStream::connect(host)
        {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request =
                format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn now_millis() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

async fn send(http: &reqwest::Client, base: &str, path: &str, body: Value) {
    let response = command(http, base, path, body).await;
    assert_eq!(response.status(), 200, "{path}");
}

/// Asserts the console logged no error and the page asked nothing of any
/// host but the daemon's.
async fn assert_clean(browser: &Browser, origin: &str) {
    let errors: Vec<Value> = browser
        .log("browser")
        .await
        .into_iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let mut requests = BTreeSet::new();
    for entry in browser.log("performance").await {
        let message: Value =
            serde_json::from_str(entry["message"].as_str().unwrap_or("{}")).unwrap_or_default();
        let params = &message["message"]["params"];
        // Only what the console's page asked for: Chromium's own pages (the
        // new-tab page, say) make requests of their own.
        if message["message"]["method"] == "Network.requestWillBeSent"
            && params["documentURL"]
                .as_str()
                .is_some_and(|document| document.starts_with(origin))
        {
            let url = params["request"]["url"].as_str().unwrap_or_default();
            requests.insert(url.to_owned());
        }
    }
    assert!(
        requests
            .iter()
            .any(|url| url.ends_with("/console/console.js")),
        "{requests:?}"
    );
    for url in &requests {
        assert!(
            url.starts_with(origin) || url.starts_with("data:"),
            "a request to another host: {url}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_projections_aggregates_the_live_tail_and_the_node() {
    let Some(chromedriver) = chromedriver() else {
        return;
    };
    let _one = BROWSER.lock().await;
    let daemon = Process::start(ProcessOptions::backend(Backend::Embedded));
    daemon.ready().await;
    let http = client();
    let base = daemon.url("");
    send(&http, &base, "account/a1/open", json!({"owner": "Ada"})).await;
    send(&http, &base, "account/a1/deposit", json!({"amount": 10})).await;
    send(&http, &base, "account/a1/deposit", json!({"amount": 5})).await;

    let page = get_text(&http, &daemon.url("/console")).await;
    assert!(
        page.contains(r#"<meta name="cqrsd-auth" content="none">"#),
        "{page}"
    );

    let browser = Browser::start(&chromedriver).await;
    browser.goto(&daemon.url("/console")).await;
    // Without tokens it never asks for one.
    browser
        .wait_for(
            "the console without a login",
            "return document.querySelector('#login').hidden
                 && !document.querySelector('#app').hidden;",
        )
        .await;

    // Every projection, with its lag per partition, caught up.
    let report = get_json(&http, &daemon.url("/admin/projections")).await;
    let names: Vec<String> = report["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.len() >= 2, "{report}");
    for name in &names {
        browser
            .wait_for(
                &format!("projection {name} caught up"),
                &format!(
                    "const row = document.querySelector('tr[data-projection=\"{name}\"]');
                     if (!row) return null;
                     const lags = [...row.querySelectorAll('.lag')].map(l => l.textContent);
                     return lags.length > 0 && lags.every(l => l === '0')
                         && row.querySelector('.state').textContent.startsWith('running');"
                ),
            )
            .await;
    }
    browser.screenshot("projections").await;

    // A rebuild, from the button to its completion.
    let generation = |report: &Value| {
        report["projections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "accounts")
            .unwrap()["generation"]
            .as_u64()
            .unwrap()
    };
    let before = generation(&report);
    browser
        .run("document.querySelector('button.rebuild[data-projection=\"accounts\"]').click()")
        .await;
    browser
        .wait_for(
            "the rebuilt generation",
            &format!(
                "const row = document.querySelector('tr[data-projection=\"accounts\"]');
                 return row && row.querySelector('.generation').textContent === '{}'
                     && row.querySelector('.state').textContent.startsWith('running')
                     && !row.querySelector('.progress')
                     && !row.querySelector('button.rebuild').disabled;",
                before + 1
            ),
        )
        .await;
    let after = get_json(&http, &daemon.url("/admin/projections")).await;
    assert_eq!(generation(&after), before + 1, "{after}");

    // An aggregate: its state, its version and its history, two to a page.
    browser.run("location.hash = '#aggregate';").await;
    browser
        .submit(
            "#aggregate-form",
            &[
                ("#aggregate-type", "account"),
                ("#aggregate-id", "a1"),
                ("#aggregate-page-size", "2"),
            ],
        )
        .await;
    let first_page = browser
        .wait_for(
            "the aggregate",
            "if (document.querySelector('#aggregate-version').textContent !== '3') return null;
             const rows = [...document.querySelectorAll('#history-table tbody tr')];
             if (rows.length !== 2) return null;
             return {
               state: JSON.parse(document.querySelector('#aggregate-state').textContent),
               types: rows.map(r => r.querySelector('.type').textContent),
             };",
        )
        .await;
    assert_eq!(first_page["state"]["balance"], 15, "{first_page}");
    assert_eq!(first_page["state"]["owner"], "Ada", "{first_page}");
    assert_eq!(
        first_page["types"],
        json!(["AccountOpened", "MoneyDeposited"])
    );
    browser.screenshot("aggregate").await;
    browser
        .run("document.querySelector('#history-next').click()")
        .await;
    let second_page = browser
        .wait_for(
            "the second page of history",
            "const rows = [...document.querySelectorAll('#history-table tbody tr')];
             return rows.length === 1 && document.querySelector('#history-next').disabled
                 ? rows.map(r => r.dataset.version) : null;",
        )
        .await;
    assert_eq!(second_page, json!(["3"]));
    browser
        .run("document.querySelector('#history-prev').click()")
        .await;
    let back = browser
        .wait_for(
            "the first page again",
            "const rows = [...document.querySelectorAll('#history-table tbody tr')];
             return rows.length === 2 && document.querySelector('#history-prev').disabled
                 ? rows.map(r => r.dataset.version) : null;",
        )
        .await;
    assert_eq!(back, json!(["1", "2"]));

    // The live tail: a new event within a second of its command.
    browser
        .run(
            "location.hash = '#tail';
             document.querySelector('#tail-filter').value = 'account';
             document.querySelector('#tail-filter').dispatchEvent(new Event('change'));
             document.querySelector('#tail-toggle').click();",
        )
        .await;
    browser
        .wait_for(
            "the live tail connected",
            "return document.querySelector('#tail-status').textContent === 'live';",
        )
        .await;
    let sent_at = now_millis();
    send(&http, &base, "account/a2/open", json!({"owner": "Bob"})).await;
    let received_at = browser
        .wait_for(
            "the new event in the live tail",
            "const row = document.querySelector('#tail-table tr[data-id=\"a2\"]');
             return row ? Number(row.dataset.receivedAt) : null;",
        )
        .await
        .as_u64()
        .unwrap();
    eprintln!(
        "the live tail showed the event {} ms after the command was sent",
        received_at.saturating_sub(sent_at)
    );
    assert!(
        received_at.saturating_sub(sent_at) < 1000,
        "the event showed {} ms after the command was sent",
        received_at.saturating_sub(sent_at)
    );

    // Paused, then resumed: the events sent meanwhile all arrive, once each.
    browser
        .run("document.querySelector('#tail-toggle').click()")
        .await;
    browser
        .wait_for(
            "the tail paused",
            "return document.querySelector('#tail-status').textContent === 'paused';",
        )
        .await;
    send(&http, &base, "account/a2/deposit", json!({"amount": 1})).await;
    send(&http, &base, "account/a2/deposit", json!({"amount": 2})).await;
    browser
        .run("document.querySelector('#tail-toggle').click()")
        .await;
    let versions = browser
        .wait_for(
            "the events sent while paused",
            "const rows = [...document.querySelectorAll('#tail-table tr[data-id=\"a2\"]')];
             return rows.length >= 3 ? rows.map(r => r.dataset.version) : null;",
        )
        .await;
    // Newest first, each version once.
    assert_eq!(versions, json!(["3", "2", "1"]));
    browser.screenshot("tail").await;

    // The node: each component ready, and the charts drawn from samples.
    browser.run("location.hash = '#node';").await;
    browser
        .wait_for(
            "the node's components and charts",
            "const rows = [...document.querySelectorAll('#component-table tbody tr')];
             const drawn = ['commands', 'lookups', 'lag'].every(name =>
                 Number(document.querySelector('#chart-' + name).dataset.samples || 0) >= 2
                 && document.querySelector('#chart-' + name + ' polyline'));
             return rows.length > 0 && drawn
                 && document.querySelector('#node-status').textContent === 'ready'
                 && rows.every(r => r.querySelector('.ready-true'));",
        )
        .await;
    let commands_chart = browser
        .run("return document.querySelector('#chart-commands .value').textContent")
        .await;
    assert!(commands_chart.is_string(), "{commands_chart}");
    browser.screenshot("node").await;

    assert_clean(&browser, &daemon.url("/")).await;
    let banner = browser
        .run("return document.querySelector('#errors').textContent")
        .await;
    assert_eq!(banner, "", "the page shows an error");

    // An error of the API is shown with its reason, and goes once the
    // request that failed succeeds.
    browser.run("location.hash = '#aggregate';").await;
    browser
        .submit("#aggregate-form", &[("#aggregate-id", "nobody")])
        .await;
    browser
        .wait_for(
            "the API's 404",
            "const text = document.querySelector('#errors').textContent;
             return text.includes('/aggregates/account/nobody') && text.includes('404')
                 && document.querySelector('#aggregate-result').hidden;",
        )
        .await;
    browser
        .submit("#aggregate-form", &[("#aggregate-id", "a1")])
        .await;
    browser
        .wait_for(
            "the error cleared",
            "return document.querySelector('#errors').textContent === ''
                 && !document.querySelector('#aggregate-result').hidden;",
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_lists_quarantined_events_with_their_reasons() {
    let Some(chromedriver) = chromedriver() else {
        return;
    };
    let _one = BROWSER.lock().await;
    let daemon = crate::harness::InProcess::start(|_| {}, None);
    // The events below go straight into the log, as only the read side's
    // input: were they there when the write side restores, its restore would
    // fold the poison one and never be ready (its /readyz 503 is an error in
    // the page's log; seen in CI). So they are written once it has restored.
    daemon.ready().await;
    let http = client();
    let mut writer = crate::readside::Writer::new(daemon.log.clone());
    writer
        .append("q1", &[("AccountOpened", json!({"owner": "ada"}))])
        .await;
    // A string amount makes the views' arithmetic fail: a poison event.
    let poison = writer
        .append("q1", &[("MoneyWithdrawn", json!({"amount": "lots"}))])
        .await;
    let report = crate::readside::wait_caught_up(&http, &daemon.url("")).await;
    let accounts = report["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "accounts")
        .unwrap()
        .clone();
    let reason = accounts["quarantined"][0]["reason"]
        .as_str()
        .unwrap()
        .to_owned();

    let browser = Browser::start(&chromedriver).await;
    browser.goto(&daemon.url("/console")).await;
    let shown = browser
        .wait_for(
            "the quarantined event",
            "const row = document.querySelector('tr[data-projection=\"accounts\"]');
             const details = row && row.querySelector('details.quarantine');
             if (!details) return null;
             details.open = true;
             return { summary: details.querySelector('summary').textContent,
                      items: [...details.querySelectorAll('li')].map(li => li.textContent) };",
        )
        .await;
    assert_eq!(shown["summary"], "1 event", "{shown}");
    let item = shown["items"][0].as_str().unwrap();
    assert!(item.contains(&poison), "{item}");
    assert!(item.contains(&reason), "{item} lacks {reason}");
    browser.screenshot("quarantine").await;
    assert_clean(&browser, &daemon.url("/")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_console_asks_for_one_and_then_works() {
    let Some(chromedriver) = chromedriver() else {
        return;
    };
    let _one = BROWSER.lock().await;
    let operator = token("operator", &["admin", "query", "command"], "");
    let daemon = Process::start(ProcessOptions {
        config: format!("{}{}", Backend::Embedded.config(), operator.entry),
        ..ProcessOptions::default()
    });
    daemon.ready().await;
    let http = client();
    let opened = http
        .post(daemon.url("/commands/account/t1/open"))
        .header("authorization", bearer(&operator))
        .json(&json!({"owner": "Tess"}))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), 200);

    // The page and its assets need no token, and say so little: the page
    // knows only that a token is needed, and may load nothing from elsewhere.
    for (path, content_type) in [
        ("/console", "text/html; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
    ] {
        let response = http.get(daemon.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        let policy = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(policy.contains("default-src 'none'"), "{policy}");
        assert!(policy.contains("connect-src 'self'"), "{policy}");
        if path == "/console" {
            let page = response.text().await.unwrap();
            assert!(
                page.contains(r#"<meta name="cqrsd-auth" content="token">"#),
                "{page}"
            );
        }
    }
    let refused = http
        .get(daemon.url("/admin/projections"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let browser = Browser::start(&chromedriver).await;
    browser.goto(&daemon.url("/console")).await;
    browser
        .wait_for(
            "the login",
            "return !document.querySelector('#login').hidden
                 && document.querySelector('#app').hidden;",
        )
        .await;
    // Nothing but the page and its assets was asked for: no data without a token.
    let rows = browser
        .run("return document.querySelectorAll('#projection-table tbody tr').length")
        .await;
    assert_eq!(rows, 0);
    browser.screenshot("login").await;

    // A wrong token is refused, with the API's reason, and the login stays.
    browser
        .submit("#login-form", &[("#login-token", "not-a-token")])
        .await;
    browser
        .wait_for(
            "the refusal",
            "return !document.querySelector('#login').hidden
                 && document.querySelector('#login-error').textContent.length > 0;",
        )
        .await;

    browser
        .submit("#login-form", &[("#login-token", &operator.secret)])
        .await;
    browser
        .wait_for(
            "the projections with a token",
            "return document.querySelector('#login').hidden
                 && document.querySelectorAll('#projection-table tbody tr').length > 0;",
        )
        .await;
    // The token is kept for the tab: a reload does not ask again.
    browser.goto(&daemon.url("/console#aggregate")).await;
    browser
        .submit(
            "#aggregate-form",
            &[("#aggregate-type", "account"), ("#aggregate-id", "t1")],
        )
        .await;
    browser
        .wait_for(
            "the aggregate with a token",
            "return document.querySelector('#login').hidden
                 && document.querySelector('#aggregate-version').textContent === '1';",
        )
        .await;
}

/// Every metric name in the dashboard's expressions, from its JSON text.
fn dashboard_metric_names() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(crate::harness::repo_file("contrib/grafana/cqrsd.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut expressions = Vec::new();
    fn collect(value: &Value, into: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "definition", Value::String(text)) => into.push(text.clone()),
                        _ => collect(value, into),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| collect(item, into)),
            _ => {}
        }
    }
    collect(&dashboard, &mut expressions);
    assert!(expressions.len() >= 10, "{expressions:?}");
    // Without a PromQL parser, the mistakes a hand edit makes most: an
    // unbalanced bracket, or a variable the dashboard does not define.
    let variables: BTreeSet<String> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .chain(["__rate_interval".to_owned(), "__interval".to_owned()])
        .collect();
    for expression in &expressions {
        let mut open = Vec::new();
        let mut quoted = false;
        for c in expression.chars() {
            match c {
                '"' => quoted = !quoted,
                '(' | '{' | '[' if !quoted => open.push(c),
                ')' | '}' | ']' if !quoted => {
                    let expected = match c {
                        ')' => '(',
                        '}' => '{',
                        _ => '[',
                    };
                    assert_eq!(open.pop(), Some(expected), "unbalanced: {expression}");
                }
                _ => {}
            }
        }
        assert!(open.is_empty() && !quoted, "unbalanced: {expression}");
        for (at, _) in expression.match_indices('$') {
            let name: String = expression[at + 1..]
                .chars()
                .skip_while(|c| *c == '{')
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                variables.contains(&name),
                "${name} is not defined: {expression}"
            );
        }
    }
    let mut names = BTreeSet::new();
    for expression in &expressions {
        let mut rest = expression.as_str();
        while let Some(at) = rest.find("cqrsd_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_uses_is_exported() {
    let used = dashboard_metric_names();
    for panel in [
        "cqrsd_commands_total",
        "cqrsd_command_duration_seconds_bucket",
        "cqrsd_log_group_commit_records_bucket",
        "cqrsd_log_fsync_seconds_bucket",
        "cqrsd_http_requests_total",
        "cqrsd_http_request_duration_seconds_bucket",
        "cqrsd_projection_lag",
        "cqrsd_projection_events_total",
        "cqrsd_projection_quarantined_total",
    ] {
        assert!(used.contains(panel), "the dashboard does not chart {panel}");
    }

    let daemon = Process::start(ProcessOptions::backend(Backend::Embedded));
    daemon.ready().await;
    let http = client();
    let base = daemon.url("");
    send(&http, &base, "account/m1/open", json!({"owner": "Max"})).await;
    send(&http, &base, "account/m1/deposit", json!({"amount": 3})).await;
    let rejected = command(&http, &base, "account/m1/withdraw", json!({"amount": 99})).await;
    assert_eq!(rejected.status(), 422);
    get_json(&http, &daemon.url("/aggregates/account/m1")).await;
    let missing = http
        .get(daemon.url("/aggregates/account/nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    crate::readside::wait_caught_up(&http, &base).await;
    get_json(&http, &daemon.url("/views/accounts/m1")).await;

    let scrape = get_text(&http, &daemon.url("/metrics")).await;
    let exported: BTreeSet<&str> = scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics the daemon does not export: {missing:?}"
    );
    // The command latency panel is by outcome.
    assert!(
        scrape.lines().any(
            |line| line.starts_with("cqrsd_command_duration_seconds_bucket")
                && line.contains("outcome=\"rejected\"")
        ),
        "no command latency by outcome"
    );
}
