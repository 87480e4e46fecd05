//! The REST API: one listener, routes for commands, queries and operations,
//! and the middleware a public-facing server needs.
//!
//! This module is the only one that knows HTTP and JSON wire types. Connection
//! handling runs on the HTTP runtime; each command-side handler runs on the
//! command runtime and each query-side handler on the query runtime, so a flood
//! on one side cannot starve the other even though one address serves both.

pub mod commands;
mod console;
pub mod edge;
mod guard;
mod middleware;
pub mod noop;
mod openapi;
mod ops;
mod peers;
pub mod problem;
mod queries;
pub mod search;
mod server;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::runtime::Handle;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use guard::Caller;
pub use problem::{ApiError, FieldError, Problem};
pub use queries::query_routes;
pub use server::{HttpServer, ServerOptions};

use crate::domain::Domain;
use crate::health::Health;
use crate::security::LiveSettings;

/// Handles of the runtimes that handlers are dispatched to.
#[derive(Debug, Clone)]
pub struct Runtimes {
    pub command: Handle,
    pub query: Handle,
}

/// The routes of each side, already given their state. Later parts of the
/// daemon (the command side, the query side) contribute them; tests may add
/// their own to probe the dispatch machinery.
#[derive(Default)]
pub struct ApiRoutes {
    pub command: Router,
    pub query: Router,
    /// OpenAPI paths and schemas of these routes, merged into `/openapi.json`.
    pub openapi: Option<utoipa::openapi::OpenApi>,
    /// The domain the routes serve: `/openapi.json` describes one operation
    /// per name it declares instead of the generic routes.
    pub domain: Option<Arc<Domain>>,
}

impl ApiRoutes {
    /// Adds another part's routes and OpenAPI paths to these.
    pub fn merge(&mut self, other: ApiRoutes) {
        self.command = std::mem::take(&mut self.command).merge(other.command);
        self.query = std::mem::take(&mut self.query).merge(other.query);
        self.openapi = match (self.openapi.take(), other.openapi) {
            (Some(mut mine), Some(theirs)) => {
                mine.merge(theirs);
                Some(mine)
            }
            (mine, theirs) => mine.or(theirs),
        };
        if self.domain.is_none() {
            self.domain = other.domain;
        }
    }
}

impl std::fmt::Debug for ApiRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiRoutes").finish_non_exhaustive()
    }
}

/// What the operations endpoints need.
#[derive(Debug, Clone)]
pub(crate) struct OpsState {
    health: Health,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    runtimes: Runtimes,
    openapi: Arc<ops::Documents>,
    settings: LiveSettings,
    /// This node's role, named by `/readyz` so peers learn what it runs.
    role: crate::node::Role,
}

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub body_limit_bytes: usize,
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
}

/// Builds the whole API: operations endpoints, the given command and query
/// routes (each dispatched onto its runtime), and the middleware stack.
/// `settings` decides, per request, who may do what and how often; `role`
/// is this node's, as `/readyz` reports it.
pub fn router(
    routes: ApiRoutes,
    runtimes: Runtimes,
    health: Health,
    limits: RequestLimits,
    settings: LiveSettings,
    role: crate::node::Role,
) -> Router {
    let openapi = ops::openapi_documents(routes.openapi, routes.domain.as_deref());
    let ops_state = OpsState {
        health,
        metrics: crate::telemetry::metrics_handle(),
        runtimes: runtimes.clone(),
        openapi: Arc::new(openapi),
        settings: settings.clone(),
        role,
    };
    let command = routes.command.layer(axum::middleware::from_fn_with_state(
        runtimes.command,
        middleware::dispatch,
    ));
    let query = routes.query.layer(axum::middleware::from_fn_with_state(
        runtimes.query,
        middleware::dispatch,
    ));

    // Load shedding covers the API only: operations endpoints must keep
    // answering under overload, or a supervisor would restart a busy daemon.
    let concurrency = Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests));
    let api = command
        .merge(query)
        .layer(axum::middleware::from_fn_with_state(
            concurrency,
            middleware::shed_load,
        ));
    Router::new()
        .merge(ops::routes(ops_state))
        .merge(console::routes(settings.clone()))
        .merge(api)
        .fallback(|| async { ApiError::NotFound("no such resource".to_owned()) })
        // Innermost of the common layers: it runs after routing (it needs the
        // matched route) and before load shedding and dispatch, so a refused
        // request costs neither a permit nor a hop to another runtime; its
        // 401/403/429 still pass through metrics and the request timeout.
        .layer(axum::middleware::from_fn_with_state(settings, guard::guard))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(middleware::request_span))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(CompressionLayer::new())
                .layer(axum::middleware::from_fn_with_state(
                    limits.body_limit_bytes,
                    middleware::problem_for_errors,
                ))
                .layer(axum::middleware::from_fn(middleware::record_metrics))
                .layer(axum::middleware::from_fn_with_state(
                    limits.request_timeout,
                    middleware::timeout,
                ))
                .layer(DefaultBodyLimit::max(limits.body_limit_bytes))
                .layer(tower_http::limit::RequestBodyLimitLayer::new(
                    limits.body_limit_bytes,
                )),
        )
}
