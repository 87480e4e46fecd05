//! The other nodes this one forwards to, and their health and roles, learned
//! in the background from each peer's `/readyz` (DESIGN.md §7).
//!
//! A peer is chosen for a side only when its last check answered 200 and
//! named a role that runs that side; a peer never checked, not ready, or
//! unreachable is skipped. A forward that cannot connect marks its peer
//! down at once, so clients do not wait for the next check to stop using it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::node::{Role, Side};

/// The pooled keep-alive client every request to a peer goes through.
pub(crate) type PeerClient = Client<HttpConnector, Full<Bytes>>;

/// Most bytes of a peer's `/readyz` body that are read.
const MAX_READYZ_BODY: usize = 64 * 1024;

/// Builds the client: keep-alive connections pooled per peer, connecting
/// within `connect_timeout`.
pub(crate) fn client(connect_timeout: Duration) -> PeerClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// What the last check (or forward) learned about a peer.
#[derive(Debug, Clone, Default)]
struct PeerState {
    healthy: bool,
    /// The role its `/readyz` named; kept while it is down, for display.
    role: Option<Role>,
    checked_at: Option<Instant>,
    error: Option<String>,
}

/// One peer.
#[derive(Debug)]
pub(crate) struct Peer {
    /// The canonical base URL, `http://host:port`; also its metric label.
    pub url: String,
    state: Mutex<PeerState>,
}

impl Peer {
    fn state(&self) -> PeerState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, healthy: bool, role: Option<Role>, error: Option<String>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.healthy = healthy;
        if role.is_some() {
            state.role = role;
        }
        state.error = error;
        state.checked_at = Some(Instant::now());
        metrics::gauge!("cqrsd_node_peer_healthy", "peer" => self.url.clone()).set(if healthy {
            1.0
        } else {
            0.0
        });
    }

    /// Takes the peer out of rotation until a check finds it healthy again.
    pub fn mark_down(&self, error: String) {
        self.set(false, None, Some(error));
    }

    fn serves(&self, side: Side) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.healthy && state.role.is_some_and(|role| role.runs(side))
    }
}

/// A peer as `GET /admin/node` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct PeerView {
    url: String,
    healthy: bool,
    role: Option<Role>,
    /// Milliseconds since the last check; absent before the first.
    checked_ms_ago: Option<u64>,
    error: Option<String>,
}

/// Every configured peer.
#[derive(Debug)]
pub(crate) struct Peers {
    peers: Vec<Peer>,
    next: AtomicUsize,
}

impl Peers {
    /// `urls` are canonical (`node::canonical_url`), as config validation left them.
    pub fn new(urls: impl IntoIterator<Item = String>) -> Self {
        let peers = urls
            .into_iter()
            .map(|url| {
                metrics::gauge!("cqrsd_node_peer_healthy", "peer" => url.clone()).set(0.0);
                Peer {
                    url,
                    state: Mutex::new(PeerState::default()),
                }
            })
            .collect();
        Self {
            peers,
            next: AtomicUsize::new(0),
        }
    }

    /// The next healthy peer that runs `side`, round-robin, skipping the
    /// indexes in `tried`; with its index.
    pub fn pick(&self, side: Side, tried: &[usize]) -> Option<(usize, &Peer)> {
        let count = self.peers.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|step| (start + step) % count)
            .filter(|index| !tried.contains(index))
            .map(|index| (index, &self.peers[index]))
            .find(|(_, peer)| peer.serves(side))
    }

    pub fn views(&self) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|peer| {
                let state = peer.state();
                PeerView {
                    url: peer.url.clone(),
                    healthy: state.healthy,
                    role: state.role,
                    checked_ms_ago: state
                        .checked_at
                        .map(|at| u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)),
                    error: state.error,
                }
            })
            .collect()
    }

    /// Checks every peer's `/readyz` each `interval` until `stop`; each
    /// check is bounded by `timeout`.
    pub async fn watch(
        self: std::sync::Arc<Self>,
        client: PeerClient,
        interval: Duration,
        timeout: Duration,
        stop: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            let checks = self.peers.iter().map(|peer| async {
                let outcome = tokio::time::timeout(timeout, check(&client, &peer.url)).await;
                match outcome {
                    Ok(Ok(role)) => peer.set(true, Some(role), None),
                    Ok(Err((role, error))) => peer.set(false, role, Some(error)),
                    Err(_) => peer.set(
                        false,
                        None,
                        Some(format!(
                            "/readyz did not answer within {} ms",
                            timeout.as_millis()
                        )),
                    ),
                }
            });
            tokio::select! {
                _ = futures::future::join_all(checks) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// One `/readyz` check: the peer's role when it is ready; otherwise the
/// role if it named one, and why it is not usable.
async fn check(client: &PeerClient, base: &str) -> Result<Role, (Option<Role>, String)> {
    let request = http::Request::get(format!("{base}/readyz"))
        .body(Full::new(Bytes::new()))
        .map_err(|error| (None, format!("cannot build the request: {error}")))?;
    let response = client
        .request(request)
        .await
        .map_err(|error| (None, format!("unreachable: {error}")))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_READYZ_BODY)
        .collect()
        .await
        .map_err(|error| (None, format!("cannot read /readyz: {error}")))?
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let role = json["role"].as_str().and_then(Role::parse);
    if status != http::StatusCode::OK {
        return Err((role, format!("not ready (/readyz answered {status})")));
    }
    role.ok_or_else(|| {
        (
            None,
            "its /readyz names no role (a cqrsd without [node] support?)".to_owned(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_healthy_peers_of_a_serving_role_are_picked_in_turn() {
        let peers = Peers::new([
            "http://a:1".into(),
            "http://b:1".into(),
            "http://c:1".into(),
        ]);
        assert!(
            peers.pick(Side::Query, &[]).is_none(),
            "nothing checked yet"
        );
        peers.peers[0].set(true, Some(Role::Command), None);
        peers.peers[1].set(true, Some(Role::Query), None);
        peers.peers[2].set(true, Some(Role::All), None);
        let mut picked: Vec<&str> = (0..4)
            .map(|_| peers.pick(Side::Query, &[]).unwrap().1.url.as_str())
            .collect();
        picked.sort_unstable();
        picked.dedup();
        assert_eq!(picked, vec!["http://b:1", "http://c:1"]);
        assert_eq!(peers.pick(Side::Query, &[1, 2]).map(|(i, _)| i), None);
        peers.peers[1].mark_down("refused".into());
        peers.peers[2].mark_down("refused".into());
        assert!(peers.pick(Side::Query, &[]).is_none());
        // A peer that went down keeps its last known role for display.
        assert_eq!(peers.views()[1].role, Some(Role::Query));
        assert_eq!(peers.pick(Side::Command, &[]).unwrap().0, 0);
    }
}
