//! RFC 9457 problem details: the one place where errors become HTTP statuses.
//!
//! Handlers return [`ApiError`]; the middleware turns any other error response
//! (a framework rejection, a 404 from the router, a 413 from the body limit)
//! into a problem as well, so a client never sees an error in another shape.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::command::CommandFailure;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem details body (RFC 9457).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct Problem {
    /// A URI naming the kind of problem; `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Every violation, for validation problems.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Extra members that some problems carry (e.g. the components not ready).
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = Object)]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

/// One violation inside a request, located by a JSON Pointer.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl Problem {
    /// A problem whose type is implied by its status alone.
    pub fn from_status(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            problem_type: "about:blank".to_owned(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            extensions: serde_json::Map::new(),
        }
    }

    fn typed(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            problem_type: format!("urn:cqrsd:problem:{slug}"),
            title: title.to_owned(),
            ..Self::from_status(status, detail)
        }
    }

    pub fn with_extension(mut self, key: &str, value: serde_json::Value) -> Self {
        self.extensions.insert(key.to_owned(), value);
        self
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

/// Everything a request can fail with, grouped by meaning. Each later
/// boundary (command side, query side) adds its own variant wrapping its own
/// error enum; the status of each is decided in [`ApiError::to_problem`] only.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("unsupported content type `{0}`; send application/json")]
    UnsupportedMediaType(String),
    #[error(transparent)]
    Command(#[from] crate::command::CommandFailure),
    #[error("the request timed out after {0} ms")]
    Timeout(u64),
    #[error("the server is handling too many requests; retry later")]
    Overloaded,
    #[error("the server is shutting down; retry on another instance or later")]
    ShuttingDown,
    #[error("the request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("not ready")]
    NotReady { components: serde_json::Value },
    #[error("internal error: {0}")]
    Internal(String),
    /// The query side: views, aggregations and projection administration.
    #[error(transparent)]
    Query(#[from] crate::projection::QueryError),
    /// No valid token (401), or a token that may not do this (403).
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The token (or client address) has used up its requests; the wait
    /// until the next one is allowed.
    #[error("too many requests; retry in {} s", retry_after_secs(*.0))]
    RateLimited(std::time::Duration),
    /// A request this node forwards to a peer (DESIGN.md §7).
    #[error(transparent)]
    Edge(#[from] super::edge::EdgeError),
}

/// The `Retry-After` of a history read whose index is behind: the indexer
/// writes thousands of records per batch, so a second covers most lags.
const HISTORY_RETRY_SECS: u64 = 1;

/// `Retry-After` is in whole seconds; rounding up keeps a client that obeys
/// it from arriving before its next request is allowed.
fn retry_after_secs(wait: std::time::Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

impl ApiError {
    /// The single mapping from errors to HTTP statuses and problem bodies.
    pub fn to_problem(&self) -> Problem {
        let detail = self.to_string();
        match self {
            ApiError::NotFound(_) => Problem::from_status(StatusCode::NOT_FOUND, detail),
            ApiError::BadRequest(_) => Problem::from_status(StatusCode::BAD_REQUEST, detail),
            ApiError::UnsupportedMediaType(_) => {
                Problem::from_status(StatusCode::UNSUPPORTED_MEDIA_TYPE, detail)
            }
            ApiError::Command(failure) => command_problem(failure, detail),
            ApiError::Timeout(_) => Problem::typed(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "Request timed out",
                detail,
            ),
            ApiError::Overloaded => Problem::typed(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Server overloaded",
                detail,
            ),
            ApiError::ShuttingDown => Problem::typed(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting-down",
                "Shutting down",
                detail,
            ),
            ApiError::PayloadTooLarge(_) => {
                Problem::from_status(StatusCode::PAYLOAD_TOO_LARGE, detail)
            }
            ApiError::NotReady { components } => Problem::typed(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "Not ready",
                "some components are not ready yet",
            )
            .with_extension("components", components.clone()),
            ApiError::Internal(_) => Problem::from_status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "an internal error occurred; it has been logged",
            ),
            ApiError::Query(error) => query_problem(error, detail),
            ApiError::Auth(error) if error.is_unauthenticated() => Problem::typed(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                detail,
            ),
            ApiError::Auth(_) => {
                Problem::typed(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
            }
            ApiError::RateLimited(wait) => Problem::typed(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                detail,
            )
            .with_extension("retry_after", serde_json::json!(retry_after_secs(*wait))),
            ApiError::Edge(error) => edge_problem(error, detail),
        }
    }
}

/// The statuses of forwarding failures: no peer to send to (or a forwarded
/// request for a side this node does not run) is 503 with Retry-After; a
/// peer that was sent the request but timed out is 504, one that broke off
/// is 502; an unreadable request body is the client's 400.
fn edge_problem(error: &super::edge::EdgeError, detail: String) -> Problem {
    use super::edge::EdgeError as E;
    match error {
        E::NoPeer { side, .. } => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-peer",
            "No peer available",
            detail,
        )
        .with_extension("side", serde_json::json!(side.as_str())),
        E::NotServedHere { side, .. } => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-served-here",
            "Side not run by this node",
            detail,
        )
        .with_extension("side", serde_json::json!(side.as_str())),
        E::PeerTimeout { .. } => Problem::typed(
            StatusCode::GATEWAY_TIMEOUT,
            "peer-timeout",
            "Peer timed out",
            detail,
        ),
        E::PeerFailed { .. } => Problem::typed(
            StatusCode::BAD_GATEWAY,
            "peer-failed",
            "Peer failed",
            detail,
        ),
        E::Body(_) => Problem::from_status(StatusCode::BAD_REQUEST, detail),
        E::NoOwner { partition, .. } => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "partition-moving",
            "Partition not served here",
            detail,
        )
        .with_extension("partition", serde_json::json!(partition)),
    }
}

/// The statuses of the write side's failures (DESIGN.md §4).
/// The status a client would get for a command failure: what a policy acts
/// on (`rejection.status`, retry or quarantine), so policies and clients
/// see the same answers.
pub(crate) fn command_status(failure: &CommandFailure) -> u16 {
    command_problem(failure, String::new()).status
}

fn command_problem(failure: &CommandFailure, detail: String) -> Problem {
    match failure {
        CommandFailure::UnknownAggregate(_)
        | CommandFailure::UnknownCommand { .. }
        | CommandFailure::NotFound { .. } => Problem::from_status(StatusCode::NOT_FOUND, detail),
        CommandFailure::InvalidRequest(_) => Problem::from_status(StatusCode::BAD_REQUEST, detail),
        CommandFailure::Schema(violations) => Problem {
            errors: violations
                .iter()
                .map(|v| FieldError {
                    path: v.path.clone(),
                    message: v.message.clone(),
                })
                .collect(),
            ..Problem::typed(
                StatusCode::BAD_REQUEST,
                "schema-violation",
                "Schema violation",
                detail,
            )
        },
        CommandFailure::Rejected(_) => Problem::typed(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected",
            "Command rejected",
            detail,
        ),
        CommandFailure::Evaluation { place, .. } => Problem::typed(
            StatusCode::UNPROCESSABLE_ENTITY,
            "evaluation-failed",
            "Command could not be evaluated",
            detail,
        )
        .with_extension("place", serde_json::Value::String(place.clone())),
        CommandFailure::VersionMismatch { actual, .. } => Problem::typed(
            StatusCode::PRECONDITION_FAILED,
            "version-mismatch",
            "Version mismatch",
            detail,
        )
        .with_extension("current_version", serde_json::Value::from(*actual)),
        CommandFailure::IdempotencyConflict => Problem::typed(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            detail,
        ),
        CommandFailure::Overloaded => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Server overloaded",
            detail,
        ),
        CommandFailure::Unavailable(_) => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "log-unavailable",
            "Event log unavailable",
            detail,
        ),
        CommandFailure::Moving { .. } => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "partition-moving",
            "Partition not served here",
            detail,
        ),
        CommandFailure::HistoryBehind { lag } => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "history-behind",
            "History index behind the log",
            detail,
        )
        .with_extension("lag", serde_json::Value::from(*lag)),
        CommandFailure::ShuttingDown => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting-down",
            "Shutting down",
            detail,
        ),
        CommandFailure::Upcast(_) => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "upcast-failed",
            "Stored event cannot be upcast",
            detail,
        ),
        CommandFailure::Internal(_) => Problem::from_status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "an internal error occurred; it has been logged",
        ),
    }
}

/// The statuses of the query side's errors.
fn query_problem(error: &crate::projection::QueryError, detail: String) -> Problem {
    use crate::projection::QueryError as Q;
    match error {
        Q::UnknownView(_)
        | Q::UnknownAggregation(_)
        | Q::UnknownProjection(_)
        | Q::UnknownSearch(_)
        | Q::NoDocument { .. } => {
            Problem::from_status(StatusCode::NOT_FOUND, detail)
        }
        Q::NotIndexed { field, indexed, .. } => Problem::typed(
            StatusCode::BAD_REQUEST,
            "not-indexed",
            "Field not indexed",
            detail,
        )
        .with_extension("field", serde_json::json!(field))
        .with_extension("indexed", serde_json::json!(indexed)),
        Q::BadParameter(_) => Problem::from_status(StatusCode::BAD_REQUEST, detail),
        Q::NotConsistent { lag, .. } => Problem::typed(
            StatusCode::GATEWAY_TIMEOUT,
            "not-consistent",
            "Read models not caught up",
            detail,
        )
        .with_extension(
            "lag",
            lag.iter()
                .map(|(projection, position, lag)| {
                    serde_json::json!({"projection": projection, "next_offset": position, "lag": lag})
                })
                .collect(),
        ),
        Q::RebuildRunning(_)
        | Q::NotRebuildable(_)
        | Q::PolicyNotRebuildable(_)
        | Q::NotAPolicy(_) => {
            Problem::from_status(StatusCode::CONFLICT, detail)
        }
        Q::Unavailable(_) => Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "read-models-unavailable",
            "Read models unavailable",
            detail,
        ),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(reason) | ApiError::Command(CommandFailure::Internal(reason)) => {
                tracing::error!(%reason, "internal error");
            }
            _ => {}
        }
        let mut response = self.to_problem().into_response();
        match &self {
            // RFC 6750: a 401 names the scheme, and `invalid_token` when a
            // token was sent but is not (or no longer) valid.
            ApiError::Auth(error) if error.is_unauthenticated() => {
                let challenge = match error {
                    crate::auth::AuthError::Missing => "Bearer realm=\"cqrsd\"",
                    _ => "Bearer realm=\"cqrsd\", error=\"invalid_token\"",
                };
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            ApiError::RateLimited(wait) => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*wait)),
                );
            }
            ApiError::Command(CommandFailure::Moving {
                retry_after_secs, ..
            }) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Command(CommandFailure::HistoryBehind { .. }) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(HISTORY_RETRY_SECS));
            }
            ApiError::Edge(error) => {
                if let Some(secs) = error.retry_after_secs() {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_serialize_with_the_rfc_9457_members() {
        let problem = ApiError::NotReady {
            components: serde_json::json!({"http": "starting"}),
        }
        .to_problem();
        let json = serde_json::to_value(&problem).unwrap();
        assert_eq!(json["type"], "urn:cqrsd:problem:not-ready");
        assert_eq!(json["status"], 503);
        assert_eq!(json["components"]["http"], "starting");
        assert!(json.get("errors").is_none());
    }

    #[test]
    fn auth_failures_are_401_or_403_and_rate_limits_429_with_retry_after() {
        use crate::auth::{AuthError, Role};
        let response = ApiError::Auth(AuthError::InvalidToken).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(
            response.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let forbidden = ApiError::Auth(AuthError::MissingRole {
            token: "ci".to_owned(),
            role: Role::Admin,
        });
        assert_eq!(forbidden.to_problem().status, 403);
        let response =
            ApiError::RateLimited(std::time::Duration::from_millis(1500)).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn a_history_index_behind_the_log_is_503_with_retry_after() {
        let response = ApiError::Command(CommandFailure::HistoryBehind { lag: 7 }).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }

    #[test]
    fn forwarding_failures_are_503_with_retry_after_or_gateway_errors() {
        use crate::http::edge::EdgeError;
        use crate::node::Side;
        for error in [
            EdgeError::NoPeer {
                side: Side::Query,
                retry_after_secs: 2,
            },
            EdgeError::NotServedHere {
                side: Side::Command,
                retry_after_secs: 2,
            },
        ] {
            let response = ApiError::Edge(error).into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "2");
            assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        }
        let timeout = ApiError::Edge(EdgeError::PeerTimeout {
            peer: "http://a:1".to_owned(),
            timeout_ms: 10,
        });
        assert_eq!(timeout.to_problem().status, 504);
        let failed = ApiError::Edge(EdgeError::PeerFailed {
            peer: "http://a:1".to_owned(),
            reason: "reset".to_owned(),
        })
        .into_response();
        assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
        assert!(!failed.headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn internal_errors_do_not_leak_their_reason() {
        let problem = ApiError::Internal("secret path /etc/x".to_owned()).to_problem();
        assert_eq!(problem.status, 500);
        assert!(!problem.detail.contains("secret"));
    }
}
