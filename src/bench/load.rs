//! The load engine: closed loop (a fixed number of clients, each sending its
//! next operation when the previous one is answered) and open loop (sends at
//! a fixed rate whatever the answers do), with latencies in an HdrHistogram.
//!
//! In the open loop a latency is measured from the operation's *intended*
//! send time, not from the moment it was actually sent: when the server (or
//! the generator itself) falls behind, the wait counts as latency, so a
//! stall is not hidden by coordinated omission.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Lowest and highest latencies the histograms keep apart: 1 µs to 10 min,
/// three significant digits.
const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 600_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;

/// Most operations of an open loop in flight at once. Past it the scheduler
/// waits for a free slot; the wait is counted in the latency of the delayed
/// operations (from their intended time), so it bounds memory without
/// hiding anything.
pub const MAX_IN_FLIGHT: usize = 4096;

/// Recorded latencies, in microseconds.
#[derive(Debug, Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        Self {
            // The bounds are constants that HdrHistogram accepts.
            histogram: Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
                .expect("valid histogram bounds"),
        }
    }

    /// Records one latency; values past the highest trackable one are kept
    /// as that one rather than dropped.
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(LOWEST_US, HIGHEST_US);
        self.histogram.saturating_record(us);
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at `quantile` (0.0..=1.0) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// What a load run did.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Operations answered successfully (their latencies are recorded).
    pub ok: u64,
    /// Operations that failed or got an unexpected answer.
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies: Latencies,
}

impl Stats {
    /// Successful operations per second.
    pub fn throughput(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.ok as f64 / seconds
        } else {
            0.0
        }
    }

    pub fn p50_ms(&self) -> f64 {
        self.latencies.quantile_ms(0.50)
    }

    pub fn p99_ms(&self) -> f64 {
        self.latencies.quantile_ms(0.99)
    }

    pub fn p999_ms(&self) -> f64 {
        self.latencies.quantile_ms(0.999)
    }

    fn add(&mut self, ok: bool, latency: Duration) {
        if ok {
            self.ok += 1;
            self.latencies.record(latency);
        } else {
            self.errors += 1;
        }
    }

    fn merge(&mut self, other: &Stats) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.latencies.merge(&other.latencies);
    }
}

/// The intended send times of an open loop: operation `i` is due at
/// `start + i / rate`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    interval: Duration,
    count: u64,
}

impl Schedule {
    /// `rate` operations per second for `duration`; the number of operations
    /// is fixed up front, so the loop is bounded in count as well as time.
    pub fn new(start: Instant, rate: f64, duration: Duration) -> Schedule {
        let rate = rate.max(0.001);
        let count = (rate * duration.as_secs_f64()).floor().max(1.0) as u64;
        Schedule {
            start,
            interval: Duration::from_secs_f64(1.0 / rate),
            count,
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// When operation `i` is due.
    pub fn due(&self, i: u64) -> Instant {
        self.start + self.interval.mul_f64(i as f64)
    }
}

/// The latency of an operation due at `intended` and answered at `answered`
/// (zero if it was answered "before" it was due, which only clock rounding
/// can cause).
pub fn latency_from_intended(intended: Instant, answered: Instant) -> Duration {
    answered.saturating_duration_since(intended)
}

/// Runs `clients` concurrent loops for `duration`; each calls `op(client,
/// sequence)` and waits for it before the next call. `op` resolves to
/// whether the operation succeeded. Every loop is also bounded in count.
pub async fn closed_loop<F, Fut>(clients: usize, duration: Duration, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients.max(1) {
        let op = op.clone();
        tasks.spawn(async move {
            let mut stats = Stats::default();
            for sequence in 0..u64::from(u32::MAX) {
                let sent = Instant::now();
                if sent >= deadline {
                    break;
                }
                let ok = op(client, sequence).await;
                stats.add(ok, sent.elapsed());
            }
            stats
        });
    }
    let mut total = Stats::default();
    while let Some(result) = tasks.join_next().await {
        if let Ok(stats) = result {
            total.merge(&stats);
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// Sends `op(sequence)` at `rate` per second for `duration` (open loop),
/// each latency measured from the operation's intended send time. Waits for
/// every sent operation to be answered before returning.
pub async fn open_loop<F, Fut>(rate: f64, duration: Duration, op: F) -> Stats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let started = Instant::now();
    let schedule = Schedule::new(started, rate, duration);
    let mut tasks = tokio::task::JoinSet::new();
    let mut total = Stats::default();
    for i in 0..schedule.count() {
        let intended = schedule.due(i);
        tokio::time::sleep_until(intended).await;
        // Closed only if dropped, which cannot happen while this runs.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let op = op.clone();
        tasks.spawn(async move {
            let ok = op(i).await;
            drop(permit);
            (ok, latency_from_intended(intended, Instant::now()))
        });
        // Collect finished operations as we go, so the set stays small.
        while let Some(Ok((ok, latency))) = tasks.try_join_next() {
            total.add(ok, latency);
        }
    }
    while let Some(result) = tasks.join_next().await {
        if let Ok((ok, latency)) = result {
            total.add(ok, latency);
        }
    }
    total.elapsed = started.elapsed();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let mut latencies = Latencies::new();
        for ms in 1..=1000_u64 {
            latencies.record(Duration::from_millis(ms));
        }
        assert_eq!(latencies.count(), 1000);
        let p50 = latencies.quantile_ms(0.50);
        let p99 = latencies.quantile_ms(0.99);
        let p999 = latencies.quantile_ms(0.999);
        // Three significant digits: within 0.1 % of the exact value.
        assert!((p50 - 500.0).abs() <= 0.5, "{p50}");
        assert!((p99 - 990.0).abs() <= 1.0, "{p99}");
        assert!((p999 - 999.0).abs() <= 1.0, "{p999}");
        assert_eq!(Latencies::new().quantile_ms(0.99), 0.0);
    }

    #[test]
    fn huge_latencies_are_kept_not_dropped() {
        let mut latencies = Latencies::new();
        latencies.record(Duration::from_secs(100_000));
        latencies.record(Duration::ZERO);
        assert_eq!(latencies.count(), 2);
        assert!(latencies.quantile_ms(1.0) >= 599_000.0);
    }

    #[test]
    fn merged_stats_add_up() {
        let mut a = Stats::default();
        a.add(true, Duration::from_millis(1));
        a.add(false, Duration::from_millis(1));
        let mut b = Stats::default();
        b.add(true, Duration::from_millis(3));
        a.merge(&b);
        assert_eq!((a.ok, a.errors, a.latencies.count()), (2, 1, 2));
        a.elapsed = Duration::from_secs(2);
        assert_eq!(a.throughput(), 1.0);
    }

    #[test]
    fn the_schedule_spaces_sends_evenly_and_is_bounded() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 1000.0, Duration::from_secs(2));
        assert_eq!(schedule.count(), 2000);
        assert_eq!(schedule.due(0), start);
        assert_eq!(schedule.due(1) - start, Duration::from_millis(1));
        assert_eq!(schedule.due(1500) - start, Duration::from_millis(1500));
        // A very low rate still sends one operation.
        assert_eq!(Schedule::new(start, 0.1, Duration::from_secs(1)).count(), 1);
    }

    #[test]
    fn latency_counts_from_the_intended_time_not_the_actual_send() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 100.0, Duration::from_secs(1));
        // Operation 10 was due at +100 ms; the generator stalled and sent it
        // at +400 ms; it was answered at +401 ms. Its latency is 301 ms, not 1 ms.
        let answered = start + Duration::from_millis(401);
        assert_eq!(
            latency_from_intended(schedule.due(10), answered),
            Duration::from_millis(301)
        );
        assert_eq!(
            latency_from_intended(answered, schedule.due(10)),
            Duration::ZERO
        );
    }

    // The two tests below run in real time and assert only bounds that load
    // on the machine cannot break: a slower machine makes latencies larger
    // and counts smaller, never the other way round.

    #[tokio::test]
    async fn open_loop_counts_a_stall_in_the_latency_of_every_delayed_operation() {
        // A "server" that answers one operation at a time and stalls 500 ms
        // on the first: operations due at 100..400 ms wait behind it. Their
        // latencies run from their intended times (at least 400, 300, 200,
        // 100 ms); a closed loop would have hidden them by not sending.
        let server = Arc::new(tokio::sync::Mutex::new(()));
        let stats = open_loop(10.0, Duration::from_secs(1), move |i| {
            let server = server.clone();
            async move {
                let _serving = server.lock().await;
                if i == 0 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                true
            }
        })
        .await;
        assert_eq!((stats.ok, stats.errors), (10, 0));
        assert!(stats.latencies.quantile_ms(1.0) >= 499.0);
        // At most five operations can be under 100 ms: the sixth smallest
        // latency is one of the delayed ones.
        assert!(stats.latencies.quantile_ms(0.6) >= 99.0);
        assert!(stats.latencies.quantile_ms(0.9) >= 399.0);
    }

    #[tokio::test]
    async fn closed_loop_runs_each_client_until_the_deadline() {
        let stats = closed_loop(4, Duration::from_secs(1), |_, _| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            true
        })
        .await;
        // Each client starts operations of at least 100 ms until 1 s has
        // passed: at least one each, at most ten each.
        assert!((4..=40).contains(&stats.ok), "{}", stats.ok);
        assert!(stats.p50_ms() >= 99.0, "{}", stats.p50_ms());
        assert!(stats.elapsed >= Duration::from_secs(1));
    }
}
