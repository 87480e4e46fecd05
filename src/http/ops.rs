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

/// Renders the full OpenAPI document once, at startup.
pub(crate) fn openapi_document(extra: Option<utoipa::openapi::OpenApi>) -> String {
    let mut document = OpsApi::openapi();
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    if let Some(extra) = extra {
        document.merge(extra);
    }
    describe_security(&mut document);
    document.to_json().unwrap_or_else(|_| "{}".to_owned())
}

/// Declares the bearer scheme for every operation but the probes, and the
/// 401, 403 and 429 problems every guarded operation can answer (see
/// `guard::policy`). Added here, over the whole document, so no operation
/// can miss them. Without configured tokens the server asks for none; the
/// document describes the API with authentication on.
fn describe_security(document: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    document.security = Some(vec![SecurityRequirement::new(
        "bearer",
        Vec::<String>::new(),
    )]);
    let problem = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                super::problem::PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build()
    };
    for (path, item) in document.paths.paths.iter_mut() {
        let open = matches!(path.as_str(), "/livez" | "/readyz");
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            if open {
                // An empty requirement: these answer without a token.
                operation.security = Some(vec![SecurityRequirement::default()]);
                continue;
            }
            let responses = &mut operation.responses.responses;
            for (status, description) in [
                ("401", "No valid bearer token"),
                (
                    "403",
                    "The token lacks the role, or may not touch this aggregate or projection",
                ),
                ("429", "Rate limit exceeded; see Retry-After"),
            ] {
                responses
                    .entry(status.to_owned())
                    .or_insert_with(|| problem(description).into());
            }
        }
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
#[utoipa::path(get, path = "/livez", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Liveness)))]
async fn livez() -> Json<Liveness> {
    Json(Liveness { status: "ok" })
}

/// Readiness: 200 once every component (event log, command side, projections)
/// reports ready; 503 with each component's state before that.
#[utoipa::path(get, path = "/readyz", tag = "operations",
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
#[utoipa::path(get, path = "/metrics", tag = "operations",
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
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json(State(state): State<OpsState>) -> Response {
    let mut response = state.openapi.as_str().to_owned().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
