//! systemd integration: `READY=1` once every component is ready,
//! `STOPPING=1` on shutdown, and watchdog pings. Without `NOTIFY_SOCKET`
//! (not under systemd) every notification is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::health::Health;

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// Sends `READY=1` once every registered component is ready.
pub(crate) async fn notify_when_ready(health: Health, shutdown: CancellationToken) {
    tokio::select! {
        () = health.wait_ready() => {
            tracing::info!("ready");
            send(&[NotifyState::Ready, NotifyState::Status("ready")]);
        }
        () = shutdown.cancelled() => {}
    }
}

/// Sends `STOPPING=1`.
pub(crate) fn notify_stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// Pings the watchdog at half its interval while the daemon runs. The pings
/// come from the HTTP runtime, so a wedged runtime stops them and systemd
/// restarts the service.
pub(crate) async fn watchdog(shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticks.tick() => send(&[NotifyState::Watchdog]),
            () = shutdown.cancelled() => return,
        }
    }
}
