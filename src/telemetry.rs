//! Diagnostics: the daemon's own log lines (`tracing`) and its metrics
//! (`metrics`, rendered in Prometheus text format on `/metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Latency buckets in seconds, from 50 µs to 10 s: commands and queries live
/// in the sub-millisecond range, so the low end is dense.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Batch-size buckets, for histograms that count records rather than time.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Sets up log output. `RUST_LOG` overrides the configured filter. Calling it
/// twice (as tests that start several daemons do) keeps the first setup.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // Logs go to stderr: under systemd both streams reach the journal, and on
    // a terminal stdout stays free for command output (`check`, `bench`).
    let result = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    drop(result);
}

/// The process-wide metrics recorder. The `metrics` facade allows one global
/// recorder per process, so every daemon in a process (tests start several)
/// shares it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_records".to_owned()), SIZE_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_size".to_owned()), SIZE_BUCKETS));
            match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(handle) => {
                    metrics::gauge!("cqrsd_build_info", "version" => env!("CARGO_PKG_VERSION"))
                        .set(1.0);
                    handle
                }
                Err(error) => {
                    // Another recorder is installed (only possible when cqrsd is
                    // embedded in a program that installed its own): keep
                    // serving with a private recorder rather than failing.
                    tracing::warn!(%error, "metrics recorder already installed; /metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}
