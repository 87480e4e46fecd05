//! `cqrsd bench`: a load generator in the product binary.
//!
//! It drives a running daemon (`--url`) or starts one in this process on a
//! temporary data directory, runs a scenario for a bounded time, and reports
//! throughput and HdrHistogram percentiles next to the limit measured in the
//! same run (the no-op HTTP routes, a raw log scan, a raw Kafka producer), as
//! a table or, with `--json`, one JSON object per scenario.
//!
//! Errors here end the command with a message, like startup errors, so this
//! front end uses `anyhow` as `cli` and `daemon` do.

pub mod load;
mod policy;
mod scenarios;
pub mod target;

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

/// The scenarios of `cqrsd bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Durable deposits on the bank example, many accounts, `--clients` clients.
    Commands,
    /// A no-op POST and GET through the same server and middleware: the HTTP limit.
    BaselineHttp,
    /// Key lookups on the `accounts` view.
    Queries,
    /// Command p99 at a fixed rate, alone and then under a saturating query flood.
    Isolation,
    /// Events/s into a view, an aggregation and a search index from a pre-filled log.
    Projection,
    /// Time from start to ready with a pre-filled log.
    Restart,
    /// Time to rebuild the `accounts` view from a pre-filled log.
    Rebuild,
    /// Commands/s on Kafka next to a raw librdkafka producer on the same broker.
    Kafka,
    /// Orders/s through the shop's policy chain next to orders/s without
    /// policies (not part of `all`).
    Policy,
    /// Every scenario above, in that order.
    All,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Commands => "commands",
            Scenario::BaselineHttp => "baseline-http",
            Scenario::Queries => "queries",
            Scenario::Isolation => "isolation",
            Scenario::Projection => "projection",
            Scenario::Restart => "restart",
            Scenario::Rebuild => "rebuild",
            Scenario::Kafka => "kafka",
            Scenario::Policy => "policy",
            Scenario::All => "all",
        }
    }
}

/// What `cqrsd bench` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub scenario: Scenario,
    /// Length of each measured phase.
    pub duration: Duration,
    pub json: bool,
    /// A running daemon; without it one is started in this process.
    pub url: Option<String>,
    /// Open loop at this many operations per second instead of closed-loop clients.
    pub rate: Option<f64>,
    pub clients: usize,
    /// Events pre-filled for projection, restart and rebuild.
    pub events: u64,
    /// Aggregates (accounts): opened before the command scenarios, spread
    /// over the pre-filled events for the read-side ones.
    pub aggregates: Option<u64>,
    /// Kafka brokers for the `kafka` scenario; else a Tansu broker is started if found.
    pub brokers: Option<String>,
}

/// The result of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    /// Operations per second (commands, requests, events).
    pub throughput: f64,
    pub unit: String,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Operations done successfully, and failed ones.
    pub operations: u64,
    pub errors: u64,
    /// The limit this number is divided by, measured in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Why the scenario did not run, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Scenario-specific numbers (footprint, second phases, seconds).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Report {
    fn new(scenario: Scenario, unit: &str) -> Report {
        Report {
            scenario: scenario.name().to_owned(),
            throughput: 0.0,
            unit: unit.to_owned(),
            p50_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            operations: 0,
            errors: 0,
            limit: None,
            limit_name: None,
            ratio: None,
            skipped: None,
            extra: Map::new(),
        }
    }

    fn skipped(scenario: Scenario, why: impl Into<String>) -> Report {
        let mut report = Report::new(scenario, "");
        report.skipped = Some(why.into());
        report
    }

    fn with_stats(mut self, stats: &load::Stats) -> Report {
        self.throughput = stats.throughput();
        self.p50_ms = stats.p50_ms();
        self.p99_ms = stats.p99_ms();
        self.p999_ms = stats.p999_ms();
        self.operations = stats.ok;
        self.errors = stats.errors;
        self
    }

    fn with_limit(mut self, name: &str, limit: f64) -> Report {
        self.limit = Some(limit);
        self.limit_name = Some(name.to_owned());
        self.ratio = (limit > 0.0).then(|| self.throughput / limit);
        self
    }

    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.extra.insert(key.to_owned(), value.into());
    }
}

/// Runs the scenario(s); prints each report as it is done (a JSON line with
/// `--json`, else a table row) and returns them.
pub fn run(options: &Options) -> anyhow::Result<Vec<Report>> {
    let list: Vec<Scenario> = match options.scenario {
        Scenario::All => vec![
            Scenario::BaselineHttp,
            Scenario::Commands,
            Scenario::Queries,
            Scenario::Isolation,
            Scenario::Projection,
            Scenario::Restart,
            Scenario::Rebuild,
            Scenario::Kafka,
        ],
        one => vec![one],
    };
    if !options.json {
        print_header();
    }
    let mut reports = Vec::new();
    let mut read_side_done = false;
    for scenario in list {
        let batch = match scenario {
            // One pre-fill serves all three read-side scenarios of `all`.
            Scenario::Projection | Scenario::Restart | Scenario::Rebuild
                if options.scenario == Scenario::All =>
            {
                if read_side_done {
                    continue;
                }
                read_side_done = true;
                scenarios::read_side(
                    options,
                    &[Scenario::Projection, Scenario::Restart, Scenario::Rebuild],
                )?
            }
            Scenario::Projection | Scenario::Restart | Scenario::Rebuild => {
                scenarios::read_side(options, &[scenario])?
            }
            other => vec![scenarios::run_one(options, other)?],
        };
        for report in batch {
            if options.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_row(&report);
            }
            reports.push(report);
        }
    }
    Ok(reports)
}

fn print_header() {
    println!(
        "{:<14} {:>12} {:<11} {:>8} {:>8} {:>8} {:>12} {:<16} {:>6}  notes",
        "scenario",
        "throughput",
        "unit",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "limit",
        "limit of",
        "ratio"
    );
}

fn print_row(report: &Report) {
    if let Some(why) = &report.skipped {
        println!("{:<14} skipped: {why}", report.scenario);
        return;
    }
    let notes: Vec<String> = report
        .extra
        .iter()
        .map(|(key, value)| match value {
            Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() => format!("{key}={f:.2}"),
                _ => format!("{key}={n}"),
            },
            other => format!("{key}={other}"),
        })
        .collect();
    println!(
        "{:<14} {:>12.0} {:<11} {:>8.2} {:>8.2} {:>8.2} {:>12} {:<16} {:>6}  {}{}",
        report.scenario,
        report.throughput,
        report.unit,
        report.p50_ms,
        report.p99_ms,
        report.p999_ms,
        report.limit.map_or_else(String::new, |l| format!("{l:.0}")),
        report.limit_name.as_deref().unwrap_or(""),
        report.ratio.map_or_else(String::new, |r| format!("{r:.2}")),
        if report.errors > 0 {
            format!("errors={} ", report.errors)
        } else {
            String::new()
        },
        notes.join(" ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_serializes_with_the_fields_the_issue_names() {
        let mut stats = load::Stats {
            ok: 10,
            elapsed: Duration::from_secs(2),
            ..load::Stats::default()
        };
        stats.latencies.record(Duration::from_millis(3));
        let mut report = Report::new(Scenario::Commands, "commands/s")
            .with_stats(&stats)
            .with_limit("baseline POST", 20.0);
        report.set("rss_mib", 12);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["scenario"], "commands");
        assert_eq!(json["throughput"], 5.0);
        assert_eq!(json["ratio"], 0.25);
        assert_eq!(json["rss_mib"], 12);
        for key in ["p50_ms", "p99_ms", "p999_ms"] {
            assert!((json[key].as_f64().unwrap() - 3.0).abs() < 0.01, "{key}");
        }
        let skipped = serde_json::to_value(Report::skipped(Scenario::Kafka, "no broker")).unwrap();
        assert_eq!(skipped["skipped"], "no broker");
        assert_eq!(skipped["throughput"], 0.0);
    }
}
