//! Every node is an edge server (DESIGN.md §7): a request for a side this
//! node does not run is forwarded to a healthy peer that runs it.
//!
//! The forwarding routes have the same templates as the routes they stand
//! for, so the guard authenticates and authorizes a request here, where it
//! arrives, exactly as the node that handles it will again. A forwarded
//! request carries `cqrsd-forwarded: 1`; a node that receives one for a side
//! it does not run answers 503 instead of forwarding it on, so a request
//! crosses at most one hop and no loop can form, whatever the peer lists say.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, get, on};
use bytes::Bytes;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::OpenApi;

use super::ApiRoutes;
use super::peers::{PeerClient, PeerView, Peers};
use super::problem::ApiError;
use crate::node::{OwnerLookup, OwnershipSource, Role, Side};

/// The header that marks a request one node forwarded to another.
pub const FORWARDED: HeaderName = HeaderName::from_static("cqrsd-forwarded");

/// The request headers a forward carries; everything else (hop-by-hop
/// headers, `Host`, `Accept-Encoding`: this node compresses its own answer)
/// stays behind.
const FORWARDED_HEADERS: [HeaderName; 8] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::IF_MATCH,
    HeaderName::from_static("idempotency-key"),
    HeaderName::from_static("last-event-id"),
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-correlation-id"),
];

/// Response headers that describe one connection, not the answer (RFC 9110
/// §7.6.1); the rest of a peer's answer is passed on as it is.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The routes of each side, as (method, template): what the edge mounts
/// for a side the node does not run. A unit test checks them against the
/// sides' OpenAPI paths, so a new route cannot be left unforwarded.
const COMMAND_ROUTES: [(MethodFilter, &str); 3] = [
    (MethodFilter::POST, "/commands/{aggregate}/{id}/{command}"),
    (MethodFilter::GET, "/aggregates/{aggregate}/{id}"),
    (MethodFilter::GET, "/aggregates/{aggregate}/{id}/events"),
];
const QUERY_ROUTES: [(MethodFilter, &str); 8] = [
    (MethodFilter::GET, "/views/{view}"),
    (MethodFilter::GET, "/views/{view}/{key}"),
    (MethodFilter::GET, "/aggregations/{name}"),
    (MethodFilter::GET, "/search/{name}"),
    (MethodFilter::GET, "/events/stream"),
    (MethodFilter::GET, "/admin/projections"),
    (MethodFilter::POST, "/admin/projections/{name}/rebuild"),
    (MethodFilter::POST, "/admin/projections/{name}/position"),
];

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("no healthy peer runs the {side} side; retry in {retry_after_secs} s")]
    NoPeer { side: Side, retry_after_secs: u64 },
    #[error(
        "this node does not run the {side} side, and a forwarded request is never forwarded again"
    )]
    NotServedHere { side: Side, retry_after_secs: u64 },
    #[error("peer {peer} did not answer within {timeout_ms} ms")]
    PeerTimeout { peer: String, timeout_ms: u64 },
    #[error("peer {peer} failed to answer: {reason}")]
    PeerFailed { peer: String, reason: String },
    #[error("cannot read the request body: {0}")]
    Body(String),
    /// No command node has published itself as the partition's owner yet,
    /// or the owner cannot be reached: the partition is moving.
    #[error(
        "partition {partition} has no reachable owner now ({reason}); retry in {retry_after_secs} s"
    )]
    NoOwner {
        partition: String,
        reason: String,
        retry_after_secs: u64,
    },
}

impl EdgeError {
    /// When a client should try again, for the errors that say.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            EdgeError::NoPeer {
                retry_after_secs, ..
            }
            | EdgeError::NotServedHere {
                retry_after_secs, ..
            }
            | EdgeError::NoOwner {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

/// What the edge needs from the configuration.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    pub role: Role,
    pub advertise_url: Option<String>,
    /// Canonical peer URLs (`node::canonical_url`).
    pub peers: Vec<String>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub health_interval: Duration,
    pub body_limit_bytes: usize,
    /// With several command nodes (`[node] ownership = "group"`): where
    /// each partition's commands go.
    pub owners: Option<OwnerRouting>,
}

/// How the edge finds the node that serves an aggregate's commands when
/// several command nodes share the partitions.
#[derive(Debug, Clone)]
pub struct OwnerRouting {
    pub lookup: Arc<dyn OwnerLookup>,
    pub partitions: u32,
    /// Each of the domain's aggregate types with its topic, as the log names
    /// it; a request for another type is not routed (wherever it goes, it is
    /// answered 404).
    pub topics: BTreeMap<String, String>,
    /// The `Retry-After` of a command whose partition has no owner now.
    pub retry_after_secs: u64,
}

/// Counts and latency of one side's forwards.
#[derive(Debug)]
struct SideStats {
    forwarded: AtomicU64,
    failed: AtomicU64,
    no_peer: AtomicU64,
    refused_forwarded: AtomicU64,
    /// Microseconds from sending to the peer's answer head.
    latency: Mutex<Histogram<u64>>,
}

impl SideStats {
    fn new() -> Self {
        Self {
            forwarded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            no_peer: AtomicU64::new(0),
            refused_forwarded: AtomicU64::new(0),
            // The bounds are constants HdrHistogram accepts (1 µs to 10 min).
            latency: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()),
        }
    }

    fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(micros.max(1));
    }
}

#[derive(Debug)]
struct Inner {
    role: Role,
    advertise_url: Option<String>,
    peers: Arc<Peers>,
    client: PeerClient,
    response_timeout: Duration,
    retry_after_secs: u64,
    body_limit_bytes: usize,
    /// Ends forwarded event streams when the daemon shuts down, as the
    /// local stream route does.
    shutdown: CancellationToken,
    command: SideStats,
    query: SideStats,
    owners: Option<OwnerRouting>,
    /// Commands and aggregate reads sent to their partition's owner.
    to_owner: SideStats,
    /// Answered 503 here: the partition had no reachable owner.
    no_owner: AtomicU64,
    /// A command node of a group: what it says about its partitions.
    ownership: std::sync::OnceLock<Arc<dyn OwnershipSource>>,
}

/// Why a request for a side this node does not run was answered here.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// Another node forwarded it: it is never forwarded again.
    ForwardedHere,
    /// No healthy peer runs the side.
    NoPeer,
}

impl Inner {
    fn stats(&self, side: Side) -> &SideStats {
        match side {
            Side::Command => &self.command,
            Side::Query => &self.query,
        }
    }

    /// Counts a refusal and gives its error (503 with Retry-After).
    fn refuse(&self, side: Side, refusal: Refusal) -> ApiError {
        let stats = self.stats(side);
        let (counter, reason) = match refusal {
            Refusal::ForwardedHere => (&stats.refused_forwarded, "forwarded_here"),
            Refusal::NoPeer => (&stats.no_peer, "no_peer"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("cqrsd_edge_refused_total", "side" => side.as_str(), "reason" => reason)
            .increment(1);
        let retry_after_secs = self.retry_after_secs;
        ApiError::Edge(match refusal {
            Refusal::ForwardedHere => EdgeError::NotServedHere {
                side,
                retry_after_secs,
            },
            Refusal::NoPeer => EdgeError::NoPeer {
                side,
                retry_after_secs,
            },
        })
    }
}

/// The edge of one node: its peers, their health, and the forwarding routes.
#[derive(Debug, Clone)]
pub struct Edge {
    inner: Arc<Inner>,
}

impl Edge {
    /// Starts checking the peers' health on `runtime` until `shutdown`.
    pub fn start(
        options: EdgeOptions,
        runtime: &tokio::runtime::Handle,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Edge {
        // The recorder is installed on first use; these gauges are set
        // before the router asks for it, and would be lost otherwise.
        crate::telemetry::metrics_handle();
        let client = super::peers::client(options.connect_timeout);
        let peers = Arc::new(Peers::new(options.peers));
        metrics::gauge!("cqrsd_node_role", "role" => options.role.as_str()).set(1.0);
        // A check is bounded by its interval too, so checks never pile up.
        let check_timeout = (options.connect_timeout + options.response_timeout)
            .min(options.health_interval.max(Duration::from_millis(100)));
        tracker.spawn_on(
            peers.clone().watch(
                client.clone(),
                options.health_interval,
                check_timeout,
                shutdown.clone(),
            ),
            runtime,
        );
        let retry_after_secs = options.health_interval.as_secs()
            + u64::from(options.health_interval.subsec_nanos() > 0);
        Edge {
            inner: Arc::new(Inner {
                role: options.role,
                advertise_url: options.advertise_url,
                peers,
                client,
                response_timeout: options.response_timeout,
                retry_after_secs: retry_after_secs.max(1),
                body_limit_bytes: options.body_limit_bytes,
                shutdown,
                command: SideStats::new(),
                query: SideStats::new(),
                owners: options.owners,
                to_owner: SideStats::new(),
                no_owner: AtomicU64::new(0),
                ownership: std::sync::OnceLock::new(),
            }),
        }
    }

    /// `GET /admin/node`, and a forwarding route for every route of each
    /// side this node does not run (on that side's runtime, as the real
    /// routes would be), with that side's OpenAPI paths: every node
    /// describes and serves the whole API.
    pub fn routes(&self) -> ApiRoutes {
        let mut routes = ApiRoutes {
            query: Router::new()
                .route("/admin/node", get(admin_node))
                .with_state(self.inner.clone()),
            openapi: Some(NodeApi::openapi()),
            ..ApiRoutes::default()
        };
        for side in Side::BOTH {
            if self.inner.role.runs(side) {
                continue;
            }
            let (templates, openapi): (&[(MethodFilter, &str)], _) = match side {
                Side::Command => (&COMMAND_ROUTES, super::commands::openapi()),
                Side::Query => (&QUERY_ROUTES, query_openapi()),
            };
            let mut router = Router::new();
            for (method, template) in templates {
                router = router.route(template, on(*method, forward));
            }
            let mut router = router.with_state((self.inner.clone(), side));
            if side == Side::Command {
                router = self.route_to_owners(router);
            }
            routes.merge(match side {
                Side::Command => ApiRoutes {
                    command: router,
                    openapi: Some(openapi),
                    ..ApiRoutes::default()
                },
                Side::Query => ApiRoutes {
                    query: router,
                    openapi: Some(openapi),
                    ..ApiRoutes::default()
                },
            });
        }
        routes
    }
}

impl Edge {
    /// Has `GET /admin/node` show what `source` says about this command
    /// node's partitions (set once, when the node has joined its group).
    pub fn report_ownership(&self, source: Arc<dyn OwnershipSource>) {
        let _ = self.inner.ownership.set(source);
    }

    /// With several command nodes, sends each command and aggregate read
    /// to its partition's owner before `router` (the local command routes,
    /// or the forwarding ones) sees it; without, `router` as it is.
    pub fn route_to_owners(&self, router: Router) -> Router {
        if self.inner.owners.is_none() {
            return router;
        }
        router.route_layer(axum::middleware::from_fn_with_state(
            self.inner.clone(),
            to_owner,
        ))
    }
}

/// Routes a command-side request by its aggregate's partition: served here
/// when this node owns it, else sent to the owner the map names (one hop:
/// a request forwarded here is always served here, where the write side
/// answers 503 with Retry-After for a partition it does not serve).
async fn to_owner(
    State(edge): State<Arc<Inner>>,
    Path(params): Path<BTreeMap<String, String>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(routing) = edge.owners.as_ref() else {
        return next.run(request).await;
    };
    let (Some(aggregate), Some(id)) = (params.get("aggregate"), params.get("id")) else {
        return next.run(request).await;
    };
    // A request the write side refuses anyway (unknown aggregate, bad id)
    // is not routed: it gets the same answer on any node.
    let Some(topic) = routing.topics.get(aggregate) else {
        return next.run(request).await;
    };
    if crate::command::validate_id(id).is_err() {
        return next.run(request).await;
    }
    let forwarded = request.headers().contains_key(&FORWARDED);
    if forwarded && edge.role.runs(Side::Command) {
        return next.run(request).await;
    }
    let partition = crate::log::partition_for(id, routing.partitions);
    let owner = routing.lookup.owner(topic, partition);
    if owner.is_some() && owner == edge.advertise_url && edge.role.runs(Side::Command) {
        return next.run(request).await;
    }
    if forwarded {
        return edge
            .refuse(Side::Command, Refusal::ForwardedHere)
            .into_response();
    }
    let no_owner = |reason: String| {
        edge.no_owner.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("cqrsd_edge_refused_total", "side" => "command", "reason" => "no_owner")
            .increment(1);
        ApiError::Edge(EdgeError::NoOwner {
            partition: format!("{topic}:{partition}"),
            reason,
            retry_after_secs: routing.retry_after_secs,
        })
        .into_response()
    };
    let Some(owner) = owner else {
        return no_owner("no command node has taken it".to_owned());
    };
    let (parts, body) = request.into_parts();
    let body = match read_body(&edge, body).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    // An owner that stops (SIGTERM) closes its idle keep-alive connections,
    // and a request written into one just then breaks off unanswered. A
    // read, or a command with an Idempotency-Key (the owner answers a second
    // copy with the first one's answer), is then sent again; any other
    // command's outcome is unknown: 502. The client's pool can hand out
    // another of those closing connections for the resend (seen under load
    // in the ownership SIGTERM test), so up to `RESENDS` times: once the
    // pool has none left, a new connection is answered or refused.
    const RESENDS: u32 = 3;
    let resendable = parts.method == Method::GET || parts.headers.contains_key("idempotency-key");
    let mut resent = 0;
    loop {
        match send(&edge, &edge.to_owner, Side::Command, &owner, &parts, &body).await {
            Ok(Sent::Answered(response)) => return response,
            Ok(Sent::Unreachable(reason)) => {
                return no_owner(format!("its owner {owner}: {reason}"));
            }
            Err(ApiError::Edge(EdgeError::PeerFailed { .. })) if resendable && resent < RESENDS => {
                resent += 1;
            }
            Err(error) => return error.into_response(),
        }
    }
}

/// What sending a request to one node came to.
enum Sent {
    Answered(Response),
    /// No connection could be made: nothing reached the node.
    Unreachable(String),
}

/// Reads a request body whole (bounded by the body limit).
async fn read_body(edge: &Inner, body: Body) -> Result<Bytes, ApiError> {
    match axum::body::to_bytes(body, edge.body_limit_bytes).await {
        Ok(body) => Ok(body),
        Err(error) if exceeds_limit(&error) => {
            Err(ApiError::PayloadTooLarge(edge.body_limit_bytes))
        }
        Err(error) => Err(EdgeError::Body(error.to_string()).into()),
    }
}

/// Sends a request to the node at `url` once, counting it in `stats`.
async fn send(
    edge: &Inner,
    stats: &SideStats,
    side: Side,
    url: &str,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Result<Sent, ApiError> {
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let outgoing = outgoing_request(&parts.method, url, path, &parts.headers, body)?;
    let started = Instant::now();
    let outcome = tokio::time::timeout(edge.response_timeout, edge.client.request(outgoing)).await;
    let elapsed = started.elapsed();
    let label = |outcome: String| {
        metrics::counter!("cqrsd_edge_forwarded_total", "side" => side.as_str(), "peer" => url.to_owned(), "outcome" => outcome)
            .increment(1);
    };
    match outcome {
        Ok(Ok(response)) => {
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
            stats.record(elapsed);
            metrics::histogram!("cqrsd_edge_forward_duration_seconds", "side" => side.as_str(), "peer" => url.to_owned())
                .record(elapsed.as_secs_f64());
            label(response.status().as_u16().to_string());
            Ok(Sent::Answered(incoming_response(response, &edge.shutdown)))
        }
        // Nothing reached the node: it is safe to send the request
        // elsewhere, even a command without an Idempotency-Key.
        Ok(Err(error)) if error.is_connect() => {
            label("unreachable".to_owned());
            Ok(Sent::Unreachable(format!("cannot connect: {error}")))
        }
        Ok(Err(error)) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            label("failed".to_owned());
            Err(EdgeError::PeerFailed {
                peer: url.to_owned(),
                reason: error.to_string(),
            }
            .into())
        }
        Err(_) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            label("timeout".to_owned());
            Err(EdgeError::PeerTimeout {
                peer: url.to_owned(),
                timeout_ms: u64::try_from(edge.response_timeout.as_millis()).unwrap_or(u64::MAX),
            }
            .into())
        }
    }
}

/// The OpenAPI paths of every query-side route.
fn query_openapi() -> utoipa::openapi::OpenApi {
    let mut openapi = super::queries::openapi();
    openapi.merge(super::search::openapi());
    openapi.merge(super::stream::openapi());
    openapi
}

/// Forwards one request to a healthy peer that runs `side`.
async fn forward(State((edge, side)): State<(Arc<Inner>, Side)>, request: Request) -> Response {
    match forward_to_peer(&edge, side, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn forward_to_peer(edge: &Inner, side: Side, request: Request) -> Result<Response, ApiError> {
    let stats = edge.stats(side);
    if request.headers().contains_key(&FORWARDED) {
        return Err(edge.refuse(side, Refusal::ForwardedHere));
    }
    let (parts, body) = request.into_parts();
    // The body is read whole (it is bounded by the body limit) so that a
    // forward that could not connect can be sent to another peer.
    let body = read_body(edge, body).await?;
    let mut tried = Vec::new();
    loop {
        let Some((index, peer)) = edge.peers.pick(side, &tried) else {
            return Err(edge.refuse(side, Refusal::NoPeer));
        };
        tried.push(index);
        match send(edge, stats, side, &peer.url, &parts, &body).await? {
            Sent::Answered(response) => return Ok(response),
            Sent::Unreachable(reason) => peer.mark_down(reason),
        }
    }
}

/// Whether reading a body failed because it is larger than the body limit
/// (a chunked body the length check up front could not see).
fn exceeds_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = current.source();
    }
    false
}

/// The request sent to `base`: the same method, path, query and body, the
/// headers that matter, and the mark that it was forwarded.
fn outgoing_request(
    method: &Method,
    base: &str,
    path: &str,
    headers: &axum::http::HeaderMap,
    body: &Bytes,
) -> Result<http::Request<Full<Bytes>>, EdgeError> {
    let mut builder = http::Request::builder()
        .method(method.clone())
        .uri(format!("{base}{path}"));
    for name in &FORWARDED_HEADERS {
        for value in headers.get_all(name) {
            builder = builder.header(name, value);
        }
    }
    builder
        .header(&FORWARDED, HeaderValue::from_static("1"))
        .body(Full::new(body.clone()))
        .map_err(|error| EdgeError::PeerFailed {
            peer: base.to_owned(),
            reason: format!("cannot build the request: {error}"),
        })
}

/// A peer's answer as this node's: status, end-to-end headers, and the body
/// streamed through as it arrives (an event stream stays a stream).
fn incoming_response(
    response: http::Response<hyper::body::Incoming>,
    shutdown: &CancellationToken,
) -> Response {
    let (mut parts, incoming) = response.into_parts();
    for name in &HOP_BY_HOP {
        parts.headers.remove(name);
    }
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    let body = if streaming {
        Body::from_stream(
            incoming
                .into_data_stream()
                .take_until(shutdown.clone().cancelled_owned()),
        )
    } else {
        Body::new(incoming)
    };
    Response::from_parts(parts, body)
}

#[derive(OpenApi)]
#[openapi(paths(admin_node))]
struct NodeApi;

/// One side's forwards, as `GET /admin/node` shows them.
#[derive(Debug, Serialize)]
struct ForwardView {
    /// Answered by a peer, whatever the status.
    forwarded: u64,
    /// Sent, but the peer timed out or broke the connection.
    failed: u64,
    /// Answered 503 here: no healthy peer ran the side.
    no_peer: u64,
    /// Forwarded here by another node, and answered 503 (never forwarded on).
    refused_forwarded: u64,
    /// Milliseconds from sending to the peer's answer head.
    latency_ms: Option<LatencyView>,
}

#[derive(Debug, Serialize)]
struct LatencyView {
    p50: f64,
    p99: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct NodeView {
    role: Role,
    advertise_url: Option<String>,
    /// The sides this node runs itself.
    runs: Vec<&'static str>,
    peers: Vec<PeerView>,
    /// By side: the forwards of requests for a side this node does not run.
    forwards: BTreeMap<&'static str, ForwardView>,
    /// With `[node] ownership = "group"`: how commands reach the
    /// partitions' owners, and, on a command node, its partitions.
    #[serde(skip_serializing_if = "Option::is_none")]
    ownership: Option<OwnershipView>,
}

/// The `ownership` member of `GET /admin/node`.
#[derive(Debug, Serialize)]
struct OwnershipView {
    /// Commands and aggregate reads sent to another node, their owner.
    to_owner: ForwardView,
    /// Answered 503 here because the partition had no reachable owner.
    no_owner: u64,
    /// On a command node: the partitions it serves now (`topic:partition`).
    #[serde(skip_serializing_if = "Option::is_none")]
    owned: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rebalances: Option<RebalanceView>,
}

#[derive(Debug, Serialize)]
struct RebalanceView {
    assignments: u64,
    revocations: u64,
    /// Revocations after this node's session had expired.
    lost: u64,
    /// Times another node fenced this one.
    fenced: u64,
    /// The last assignment's takeover, in milliseconds: from the assignment
    /// to every partition of it accepting commands.
    last_takeover_ms: Option<f64>,
}

/// This node's role, its peers and their health, and its forwards.
#[utoipa::path(get, path = "/admin/node", tag = "admin", operation_id = "getNode",
    responses((status = 200, description = "The role, the peers with their health, and forwarded-request counts and latency", content_type = "application/json")))]
async fn admin_node(State(edge): State<Arc<Inner>>) -> Json<NodeView> {
    let forwards = Side::BOTH
        .into_iter()
        .filter(|side| !edge.role.runs(*side))
        .map(|side| (side.as_str(), forward_view(edge.stats(side))))
        .collect();
    let ownership = edge.owners.as_ref().map(|_| {
        let report = edge.ownership.get().map(|source| source.report());
        OwnershipView {
            to_owner: forward_view(&edge.to_owner),
            no_owner: edge.no_owner.load(Ordering::Relaxed),
            owned: report.as_ref().map(|r| r.owned.clone()),
            rebalances: report.map(|r| RebalanceView {
                assignments: r.assignments,
                revocations: r.revocations,
                lost: r.lost,
                fenced: r.fenced,
                last_takeover_ms: r.last_takeover.map(|t| t.as_secs_f64() * 1000.0),
            }),
        }
    });
    let view = NodeView {
        role: edge.role,
        advertise_url: edge.advertise_url.clone(),
        runs: Side::BOTH
            .into_iter()
            .filter(|side| edge.role.runs(*side))
            .map(Side::as_str)
            .collect(),
        peers: edge.peers.views(),
        forwards,
        ownership,
    };
    Json(view)
}

/// One set of forwards' counts and latency.
fn forward_view(stats: &SideStats) -> ForwardView {
    let histogram = stats.latency.lock().unwrap_or_else(PoisonError::into_inner);
    let millis = |micros: u64| micros as f64 / 1000.0;
    let latency_ms = (!histogram.is_empty()).then(|| LatencyView {
        p50: millis(histogram.value_at_quantile(0.5)),
        p99: millis(histogram.value_at_quantile(0.99)),
        max: millis(histogram.max()),
    });
    ForwardView {
        forwarded: stats.forwarded.load(Ordering::Relaxed),
        failed: stats.failed.load(Ordering::Relaxed),
        no_peer: stats.no_peer.load(Ordering::Relaxed),
        refused_forwarded: stats.refused_forwarded.load(Ordering::Relaxed),
        latency_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(openapi: &utoipa::openapi::OpenApi) -> Vec<(String, String)> {
        let mut paths = Vec::new();
        for (path, item) in &openapi.paths.paths {
            if item.get.is_some() {
                paths.push(("GET".to_owned(), path.clone()));
            }
            if item.post.is_some() {
                paths.push(("POST".to_owned(), path.clone()));
            }
            assert!(
                item.put.is_none() && item.delete.is_none() && item.patch.is_none(),
                "{path}: the edge forwards only GET and POST routes"
            );
        }
        paths.sort();
        paths
    }

    fn listed(routes: &[(MethodFilter, &str)]) -> Vec<(String, String)> {
        let mut listed: Vec<(String, String)> = routes
            .iter()
            .map(|(method, path)| {
                let method = if *method == MethodFilter::POST {
                    "POST"
                } else {
                    "GET"
                };
                (method.to_owned(), (*path).to_owned())
            })
            .collect();
        listed.sort();
        listed
    }

    #[test]
    fn every_route_of_each_side_is_forwarded() {
        assert_eq!(
            listed(&COMMAND_ROUTES),
            paths(&super::super::commands::openapi())
        );
        assert_eq!(listed(&QUERY_ROUTES), paths(&query_openapi()));
    }

    #[test]
    fn a_forward_carries_the_headers_that_matter_and_its_mark() {
        let mut headers = axum::http::HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer t"),
            ("idempotency-key", "k1"),
            ("if-match", "\"3\""),
            ("last-event-id", "x:0:1"),
            ("content-type", "application/json"),
            ("x-request-id", "r1"),
            ("host", "edge:1"),
            ("accept-encoding", "gzip"),
            ("cookie", "c=1"),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let request = outgoing_request(
            &Method::POST,
            "http://peer:8080",
            "/commands/account/a/open?x=1",
            &headers,
            &Bytes::from_static(b"{}"),
        )
        .unwrap();
        assert_eq!(
            request.uri(),
            "http://peer:8080/commands/account/a/open?x=1"
        );
        assert_eq!(request.method(), Method::POST);
        let sent = request.headers();
        for name in [
            "authorization",
            "idempotency-key",
            "if-match",
            "last-event-id",
            "content-type",
            "x-request-id",
        ] {
            assert_eq!(sent[name], headers[name], "{name}");
        }
        for name in ["host", "accept-encoding", "cookie"] {
            assert!(!sent.contains_key(name), "{name} was forwarded");
        }
        assert_eq!(sent[&FORWARDED], "1");
    }
}
