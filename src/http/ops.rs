//! Operations endpoints: liveness, readiness, metrics and the OpenAPI document.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::OpsState;
use super::problem::{ApiError, FieldError, Problem};

/// The OpenAPI description of the operations endpoints; the command and query
/// sides merge their own paths into it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "cqrsd",
        description = "A CQRS / event-sourcing backend declared in TOML.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0")
    ),
    paths(livez, readyz, metrics, openapi_json),
    components(schemas(Problem, FieldError, Liveness, Readiness))
)]
struct OpsApi;

/// The OpenAPI document in each of the forms the security settings call
/// for, rendered once at startup; `/openapi.json` serves the one that
/// matches the settings in force (a SIGHUP may add or remove every token).
#[derive(Debug)]
pub(crate) struct Documents {
    /// Indexed by [tokens configured][metrics public].
    rendered: [[String; 2]; 2],
}

impl Documents {
    fn get(&self, tokens: bool, metrics_public: bool) -> &str {
        &self.rendered[usize::from(tokens)][usize::from(metrics_public)]
    }
}

/// Builds the document: the operations endpoints, the given routes' generic
/// operations, and, with a domain, those made one operation per name the
/// domain declares (see `openapi`).
pub(crate) fn openapi_documents(
    extra: Option<utoipa::openapi::OpenApi>,
    domain: Option<&crate::domain::Domain>,
) -> Documents {
    let mut document = OpsApi::openapi();
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    if let Some(extra) = extra {
        document.merge(extra);
    }
    let mut document = serde_json::to_value(&document).unwrap_or_else(|_| serde_json::json!({}));
    if let Some(domain) = domain {
        super::openapi::describe_domain(&mut document, domain);
    }
    let render = |tokens: bool, metrics_public: bool| {
        let mut document = document.clone();
        super::openapi::secure(&mut document, tokens, metrics_public);
        serde_json::to_string(&document).unwrap_or_else(|_| "{}".to_owned())
    };
    Documents {
        rendered: [
            [render(false, false), render(false, true)],
            [render(true, false), render(true, true)],
        ],
    }
}

pub(crate) fn routes(state: OpsState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .with_state(state)
}

#[derive(Debug, Serialize, ToSchema)]
struct Liveness {
    status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
struct Readiness {
    status: &'static str,
    /// This node's role (`all`, `command` or `query`, DESIGN.md §7): other
    /// nodes learn from it which requests they may forward here.
    role: &'static str,
    /// Each component's readiness and a short explanation.
    #[schema(value_type = Object)]
    components: serde_json::Value,
}

/// Liveness: answers as long as the process serves HTTP at all.
#[utoipa::path(get, path = "/livez", tag = "operations", operation_id = "getLiveness",
    responses((status = 200, description = "The process is alive", body = Liveness)))]
async fn livez() -> Json<Liveness> {
    Json(Liveness { status: "ok" })
}

/// Readiness: 200 once every component (event log, command side, projections)
/// reports ready; 503 with each component's state before that.
#[utoipa::path(get, path = "/readyz", tag = "operations", operation_id = "getReadiness",
    responses(
        (status = 200, description = "Every component is ready", body = Readiness),
        (status = 503, description = "Some component is not ready", body = Problem, content_type = "application/problem+json")
    ))]
async fn readyz(State(state): State<OpsState>) -> Response {
    let components = serde_json::to_value(state.health.snapshot()).unwrap_or_default();
    if state.health.is_ready() {
        Json(Readiness {
            status: "ready",
            role: state.role.as_str(),
            components,
        })
        .into_response()
    } else {
        ApiError::NotReady { components }.into_response()
    }
}

/// Metrics in the Prometheus text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "getMetrics",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<OpsState>) -> Response {
    for (name, handle) in [
        ("command", &state.runtimes.command),
        ("query", &state.runtimes.query),
    ] {
        let runtime = handle.metrics();
        metrics::gauge!("cqrsd_runtime_workers", "runtime" => name)
            .set(runtime.num_workers() as f64);
        metrics::gauge!("cqrsd_runtime_alive_tasks", "runtime" => name)
            .set(runtime.num_alive_tasks() as f64);
        metrics::gauge!("cqrsd_runtime_global_queue_depth", "runtime" => name)
            .set(runtime.global_queue_depth() as f64);
    }
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", operation_id = "getOpenApi",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json(State(state): State<OpsState>) -> Response {
    let security = state.settings.current();
    let document = state
        .openapi
        .get(security.tokens.is_some(), security.metrics_public);
    let mut response = document.to_owned().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
