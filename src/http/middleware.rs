//! Request middleware: runtime dispatch, load shedding, timeouts, metrics, and
//! the conversion of every error response into a problem body.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

use super::problem::{ApiError, PROBLEM_JSON, Problem};

/// Runs the rest of the request (extractors and handler) on another runtime.
///
/// The connection itself stays on the HTTP runtime; only the handler's work
/// moves, so blocking or saturating one side's runtime cannot delay the other
/// side's handlers.
pub(crate) async fn dispatch(
    State(runtime): State<Handle>,
    request: Request,
    next: Next,
) -> Response {
    match runtime.spawn(next.run(request)).await {
        Ok(response) => response,
        Err(error) if error.is_panic() => {
            ApiError::Internal("a request handler panicked".to_owned()).into_response()
        }
        // The target runtime cancelled the handler: it is shutting down.
        Err(_) => ApiError::ShuttingDown.into_response(),
    }
}

/// Answers 503 at once when the server already handles its configured
/// maximum of requests, rather than queueing without bound.
pub(crate) async fn shed_load(
    State(permits): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = permits.try_acquire() else {
        metrics::counter!("cqrsd_http_shed_total").increment(1);
        return ApiError::Overloaded.into_response();
    };
    next.run(request).await
}

/// Bounds the time a request may take, including reading its body.
pub(crate) async fn timeout(
    State(limit): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let millis = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
            ApiError::Timeout(millis).into_response()
        }
    }
}

/// Counts requests by route and status and records their latency. Routes are
/// the matched templates (`/views/{view}/{key}`), never raw paths, so the
/// label set stays bounded whatever clients send.
pub(crate) async fn record_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("cqrsd_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("cqrsd_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Error bodies longer than this are not quoted in the problem's detail.
const MAX_QUOTED_ERROR: usize = 4096;

/// Turns every error response that is not already a problem (a framework
/// rejection, a body-limit 413, a 405) into one, keeping the original text as
/// the detail, so clients see a single error format.
pub(crate) async fn problem_for_errors(
    State(body_limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The body limit's own text ("length limit exceeded") does not say
        // what the limit is; clients need that to split their request.
        return ApiError::PayloadTooLarge(body_limit).into_response();
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let detail = match http_body_util::Limited::new(body, MAX_QUOTED_ERROR)
        .collect()
        .await
    {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes())
            .trim()
            .to_owned(),
        Err(_) => String::new(),
    };
    let detail = if detail.is_empty() {
        default_detail(status)
    } else {
        detail
    };
    let mut problem = Problem::from_status(status, detail).into_response();
    // Headers such as `Allow` (405) or `Retry-After` still matter to clients.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            problem.headers_mut().insert(name, value.clone());
        }
    }
    problem
}

fn default_detail(status: StatusCode) -> String {
    match status {
        StatusCode::METHOD_NOT_ALLOWED => "this method is not allowed on this resource".to_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    }
}

/// The tracing span of one request, carrying its request id so every log line
/// of the request can be found from the id a client reports.
pub(crate) fn request_span(request: &axum::http::Request<Body>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        method = %request.method(),
        uri = %request.uri().path(),
        request_id = %request_id,
    )
}
