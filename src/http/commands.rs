//! The command-side routes: `POST /commands/{aggregate}/{id}/{command}`,
//! `GET /aggregates/{aggregate}/{id}` and its `/events`. They run on the
//! command runtime (see `http::router`).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::problem::ApiError;
use crate::command::{CommandReply, CommandRequest, CommandSide, ExpectedVersion};

/// Most events one `/events` page returns.
const MAX_HISTORY_PAGE: usize = 10_000;
const DEFAULT_HISTORY_PAGE: usize = 1_000;

#[derive(OpenApi)]
#[openapi(
    paths(post_command, get_aggregate, get_events),
    components(schemas(
        CommandResponse,
        WireEvent,
        AggregateResponse,
        HistoryResponse,
        HistoryEvent
    ))
)]
struct CommandApi;

/// The routes, with their OpenAPI description.
pub fn routes(commands: CommandSide) -> (Router, utoipa::openapi::OpenApi) {
    let router = Router::new()
        .route("/commands/{aggregate}/{id}/{command}", post(post_command))
        .route("/aggregates/{aggregate}/{id}", get(get_aggregate))
        .route("/aggregates/{aggregate}/{id}/events", get(get_events))
        .with_state(commands);
    (router, openapi())
}

/// The OpenAPI description of the command routes (also served by nodes that
/// forward them).
pub fn openapi() -> utoipa::openapi::OpenApi {
    CommandApi::openapi()
}

/// The reply to an accepted command.
#[derive(Debug, Serialize, ToSchema)]
struct CommandResponse {
    aggregate: String,
    id: String,
    /// The aggregate's version after the command; also the `ETag`.
    version: u64,
    events: Vec<WireEvent>,
    /// Pass as `consistent_with` to a query to read this command's effects.
    position: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
struct WireEvent {
    #[serde(rename = "type")]
    event_type: String,
    version: u64,
    #[schema(value_type = Object)]
    data: serde_json::Value,
}

impl From<CommandReply> for CommandResponse {
    fn from(reply: CommandReply) -> Self {
        CommandResponse {
            aggregate: reply.aggregate,
            id: reply.id,
            version: reply.version,
            events: reply
                .events
                .into_iter()
                .map(|e| WireEvent {
                    event_type: e.event_type,
                    version: e.version,
                    data: e.data,
                })
                .collect(),
            position: reply.position,
        }
    }
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|value| {
            value.to_str().map_err(|_| {
                ApiError::BadRequest(format!("the {name} header is not visible ASCII"))
            })
        })
        .transpose()
}

/// `If-Match: "<version>"` or `If-Match: *`.
fn parse_if_match(headers: &HeaderMap) -> Result<Option<ExpectedVersion>, ApiError> {
    let Some(value) = header_text(headers, "if-match")? else {
        return Ok(None);
    };
    let value = value.trim();
    if value == "*" {
        return Ok(Some(ExpectedVersion::Exists));
    }
    let digits = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    digits.parse::<u64>().map(|v| Some(ExpectedVersion::Exact(v))).map_err(|_| {
        ApiError::BadRequest(format!(
            "If-Match must be a version in quotes (e.g. \"3\", as sent in ETag) or *, not `{value}`"
        ))
    })
}

/// Runs a command. The body is the command's JSON document, checked against
/// the command's schema, then the aggregate's rules.
#[utoipa::path(post, path = "/commands/{aggregate}/{id}/{command}", tag = "commands",
    params(
        ("aggregate" = String, Path, description = "Aggregate type"),
        ("id" = String, Path, description = "Aggregate id: 1-128 of A-Z a-z 0-9 _ - . : @", pattern = r"^[A-Za-z0-9_.:@-]{1,128}$"),
        ("command" = String, Path, description = "Command name"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Retries with the same key are applied once and get the first answer: 1-255 visible ASCII characters", pattern = r"^[!-~]{1,255}$"),
        ("If-Match" = Option<String>, Header, nullable = false, description = "Expected version, as in ETag (\"3\"), or * for any existing aggregate", pattern = r#"^(\*|"[0-9]{1,19}"|[0-9]{1,19})$"#),
    ),
    request_body(content = Object, content_type = "application/json"),
    responses(
        (status = 200, description = "Accepted; the events are durable", body = CommandResponse),
        (status = 400, description = "Malformed request or schema violations", body = super::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown aggregate type or command", body = super::Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match does not match the version", body = super::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = super::Problem, content_type = "application/problem+json"),
        (status = 415, description = "A Content-Type other than JSON", body = super::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Rejected by a rule, or Idempotency-Key reused with another body", body = super::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Event log unavailable or overloaded", body = super::Problem, content_type = "application/problem+json"),
    ))]
async fn post_command(
    State(commands): State<CommandSide>,
    Path((aggregate, id, command)): Path<(String, String, String)>,
    caller: Option<Extension<super::Caller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Some(content_type) = header_text(&headers, "content-type")? {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(content_type.to_owned()));
        }
    }
    let body: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "the command body is empty; send a JSON document".to_owned(),
        ));
    } else {
        serde_json::from_slice(&body)
            .map_err(|error| ApiError::BadRequest(format!("the body is not valid JSON: {error}")))?
    };
    let request = CommandRequest {
        aggregate,
        id,
        command,
        body,
        idempotency_key: header_text(&headers, "idempotency-key")?.map(str::to_owned),
        expected: parse_if_match(&headers)?,
        correlation_id: header_text(&headers, "x-correlation-id")?
            .or(header_text(&headers, "x-request-id")?)
            .map(str::to_owned),
        // The audit trail: the name of the token that sent the command
        // (never its secret); none when authentication is off.
        principal: caller.map(|Extension(super::Caller(name))| name),
    };
    let reply = commands.execute(request).await?;
    let version = reply.version;
    let mut response = Json(CommandResponse::from(reply)).into_response();
    response.headers_mut().insert(header::ETAG, etag(version));
    Ok(response)
}

#[derive(Debug, Serialize, ToSchema)]
struct AggregateResponse {
    aggregate: String,
    id: String,
    version: u64,
    #[schema(value_type = Object)]
    state: serde_json::Value,
}

/// An aggregate's current state and version, strongly consistent: it
/// includes every command acknowledged before the request.
#[utoipa::path(get, path = "/aggregates/{aggregate}/{id}", tag = "commands",
    params(("aggregate" = String, Path), ("id" = String, Path, pattern = r"^[A-Za-z0-9_.:@-]{1,128}$")),
    responses(
        (status = 200, description = "Current state", body = AggregateResponse),
        (status = 400, description = "Malformed aggregate id", body = super::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown aggregate type, or no such aggregate", body = super::Problem, content_type = "application/problem+json"),
    ))]
async fn get_aggregate(
    State(commands): State<CommandSide>,
    Path((aggregate, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let state = commands.state(&aggregate, &id).await?;
    let version = state.version;
    let mut response = Json(AggregateResponse {
        aggregate,
        id,
        version,
        state: state.state,
    })
    .into_response();
    response.headers_mut().insert(header::ETAG, etag(version));
    Ok(response)
}

#[derive(Debug, Deserialize, IntoParams)]
struct HistoryParams {
    /// First version to return (default 1); a signed 64-bit integer, as
    /// its `int64` format says, so at most 9223372036854775807.
    from_version: Option<u64>,
    /// Most events to return (default 1000, at most 10000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
struct HistoryResponse {
    aggregate: String,
    id: String,
    events: Vec<HistoryEvent>,
    /// Pass as `from_version` for the next page; null at the end.
    next_from_version: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
struct HistoryEvent {
    event_id: String,
    #[serde(rename = "type")]
    event_type: String,
    version: u64,
    timestamp: String,
    #[schema(value_type = Object)]
    data: serde_json::Value,
    command: String,
    command_id: String,
    idempotency_key: Option<String>,
    correlation_id: Option<String>,
    /// The name of the token that sent the command; null without authentication.
    principal: Option<String>,
    position: String,
}

/// An aggregate's events, oldest first.
#[utoipa::path(get, path = "/aggregates/{aggregate}/{id}/events", tag = "commands",
    params(("aggregate" = String, Path), ("id" = String, Path, pattern = r"^[A-Za-z0-9_.:@-]{1,128}$"), HistoryParams),
    responses(
        (status = 200, description = "The events", body = HistoryResponse),
        (status = 400, description = "Malformed aggregate id, from_version or limit", body = super::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown aggregate type, or no such aggregate", body = super::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The history index did not reach the log's end within [command] history_wait_ms (it is being built); retry after Retry-After", body = super::Problem, content_type = "application/problem+json"),
    ))]
async fn get_events(
    State(commands): State<CommandSide>,
    Path((aggregate, id)): Path<(String, String)>,
    Query(params): Query<HistoryParams>,
) -> Result<Json<HistoryResponse>, ApiError> {
    let from_version = params.from_version.unwrap_or(1);
    if i64::try_from(from_version).is_err() {
        return Err(ApiError::BadRequest(format!(
            "from_version must be at most {}",
            i64::MAX
        )));
    }
    let limit = params.limit.unwrap_or(DEFAULT_HISTORY_PAGE);
    if limit == 0 || limit > MAX_HISTORY_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_HISTORY_PAGE}"
        )));
    }
    let history = commands
        .history(&aggregate, &id, from_version, limit)
        .await?;
    let events = history
        .events
        .into_iter()
        .map(|(position, e)| HistoryEvent {
            event_id: e.event_id.to_string(),
            event_type: e.event_type,
            version: e.version,
            timestamp: e
                .timestamp
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            data: e.data,
            command: e.metadata.command,
            command_id: e.metadata.command_id.to_string(),
            idempotency_key: e.metadata.idempotency_key,
            correlation_id: e.metadata.correlation_id,
            principal: e.metadata.principal,
            position,
        })
        .collect();
    Ok(Json(HistoryResponse {
        aggregate,
        id,
        events,
        next_from_version: history.next_from_version,
    }))
}

/// The write side's entry point for policies (`projection::CommandSender`):
/// the same `CommandSide::execute` the command route calls, so a policy's
/// command goes through the same validation, rules and idempotency as a
/// client's; run on the command runtime, its failure given the status a
/// client would see.
pub struct PolicyCommands {
    commands: CommandSide,
    runtime: tokio::runtime::Handle,
    timeout: std::time::Duration,
}

impl PolicyCommands {
    pub fn new(
        commands: CommandSide,
        runtime: tokio::runtime::Handle,
        timeout: std::time::Duration,
    ) -> Self {
        PolicyCommands {
            commands,
            runtime,
            timeout,
        }
    }
}

impl crate::projection::CommandSender for PolicyCommands {
    fn send(
        &self,
        command: crate::projection::PolicyCommand,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::projection::SendAnswer> + Send>>
    {
        use crate::projection::SendAnswer;
        let request = CommandRequest {
            aggregate: command.aggregate,
            id: command.id,
            command: command.command,
            body: command.body,
            idempotency_key: Some(command.idempotency_key),
            expected: None,
            correlation_id: command.correlation_id,
            principal: Some(command.principal),
        };
        let commands = self.commands.clone();
        let timeout = self.timeout;
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, commands.execute(request)).await });
        Box::pin(async move {
            match task.await {
                Ok(Ok(Ok(_reply))) => SendAnswer::Accepted,
                Ok(Ok(Err(failure))) => {
                    let status = super::problem::command_status(&failure);
                    let detail = failure.to_string();
                    // The write side's own trouble (503, 500) may pass; the
                    // rest is the command's and stays.
                    if status >= 500 {
                        SendAnswer::Retry { detail }
                    } else {
                        SendAnswer::Refused { status, detail }
                    }
                }
                Ok(Err(_elapsed)) => SendAnswer::Retry {
                    detail: format!("no answer within {} ms", timeout.as_millis()),
                },
                Err(join) => SendAnswer::Retry {
                    detail: format!("the command task ended early: {join}"),
                },
            }
        })
    }
}
