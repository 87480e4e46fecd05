//! Query-side routes: views, aggregations, and projection administration.
//!
//! Handlers parse and check the request here, then read the view store on the query
//! runtime's blocking pool (`spawn_blocking`), never on an async worker.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{OpenApi, ToSchema};

use super::ApiRoutes;
use super::problem::{ApiError, Problem};
use crate::log::Position;
use crate::projection::{ListRequest, QueryError, ReadModels, SortOrder};

/// Quarantined events listed per projection by the admin API.
const MAX_QUARANTINED_LISTED: usize = 100;

#[derive(Debug, Clone)]
struct QueryState {
    models: ReadModels,
    consistency_timeout: Duration,
}

#[derive(OpenApi)]
#[openapi(
    paths(
        get_document,
        list_view,
        get_aggregation,
        admin_projections,
        rebuild_projection,
        move_policy_position
    ),
    components(schemas(
        ViewDocument,
        ViewPage,
        AggregationRows,
        ProjectionsReport,
        ProjectionInfo,
        PartitionInfo,
        QuarantinedEvent,
        RebuildInfo,
        RebuildAccepted,
        PolicyPositions,
        MovePositions
    ))
)]
struct QueryApi;

/// The query side's routes and their OpenAPI description.
pub fn query_routes(models: ReadModels, consistency_timeout: Duration) -> ApiRoutes {
    let state = QueryState {
        models,
        consistency_timeout,
    };
    let query = Router::new()
        .route("/views/{view}", get(list_view))
        .route("/views/{view}/{key}", get(get_document))
        .route("/aggregations/{name}", get(get_aggregation))
        .route("/admin/projections", get(admin_projections))
        .route(
            "/admin/projections/{name}/rebuild",
            post(rebuild_projection),
        )
        .route(
            "/admin/projections/{name}/position",
            post(move_policy_position),
        )
        .with_state(state);
    ApiRoutes {
        query,
        openapi: Some(openapi()),
        ..ApiRoutes::default()
    }
}

/// The OpenAPI description of these routes (also served by nodes that
/// forward them).
pub fn openapi() -> utoipa::openapi::OpenApi {
    QueryApi::openapi()
}

/// A view document.
#[derive(Debug, Serialize, ToSchema)]
struct ViewDocument {
    key: String,
    #[schema(value_type = Object)]
    doc: Value,
}

/// A page of a view; `next_cursor` is null on the last page.
#[derive(Debug, Serialize, ToSchema)]
struct ViewPage {
    items: Vec<ViewDocument>,
    next_cursor: Option<String>,
}

/// Rows of an aggregation: the group fields and the measures of each group.
#[derive(Debug, Serialize, ToSchema)]
struct AggregationRows {
    #[schema(value_type = Vec<Object>)]
    rows: Vec<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
struct ProjectionsReport {
    projections: Vec<ProjectionInfo>,
}

/// One projection's state, positions, lag and quarantine.
#[derive(Debug, Serialize, ToSchema)]
struct ProjectionInfo {
    name: String,
    kind: String,
    /// The live generation of the data; each finished rebuild adds one.
    generation: u64,
    /// starting, running, rebuilding or failed.
    state: String,
    error: Option<String>,
    partitions: Vec<PartitionInfo>,
    events_total: u64,
    events_per_sec: f64,
    quarantine_count: u64,
    quarantined: Vec<QuarantinedEvent>,
    rebuild: Option<RebuildInfo>,
}

#[derive(Debug, Serialize, ToSchema)]
struct PartitionInfo {
    topic: String,
    partition: u32,
    /// The next offset the projection reads.
    position: u64,
    /// Records appended but not yet applied.
    lag: u64,
}

/// An event the projection could not apply.
#[derive(Debug, Serialize, ToSchema)]
struct QuarantinedEvent {
    /// The record's position (`topic:partition:offset`).
    position: String,
    /// The event's index inside the record.
    index: u32,
    /// The event, or null when the record does not decode.
    #[schema(value_type = Object)]
    event: Option<Value>,
    reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
struct RebuildInfo {
    /// Events applied to the new generation so far.
    events: u64,
    /// Next offset of the new generation per `topic:partition`.
    #[schema(value_type = Object)]
    positions: serde_json::Map<String, Value>,
}

#[derive(Debug, Serialize, ToSchema)]
struct RebuildAccepted {
    projection: String,
    state: String,
}

/// Query-string parameters as (name, value) pairs, in order.
type Params = Vec<(String, String)>;

/// The query parameters, split into `consistent_with` and the rest.
fn split_params(params: Params) -> Result<(Option<Position>, Params), ApiError> {
    let mut position = None;
    let mut rest = Vec::new();
    for (name, value) in params {
        if name == "consistent_with" {
            let parsed = value
                .parse::<Position>()
                .map_err(|e| QueryError::BadParameter(format!("invalid consistent_with: {e}")))?;
            position = Some(parsed);
        } else {
            rest.push((name, value));
        }
    }
    Ok((position, rest))
}

async fn wait_consistent(
    state: &QueryState,
    projection: &str,
    position: Option<Position>,
) -> Result<(), ApiError> {
    if let Some(position) = position {
        state
            .models
            .wait_for(&[projection], &position, state.consistency_timeout)
            .await?;
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, QueryError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("query task failed: {e}")))?
        .map_err(ApiError::from)
}

/// One document of a view.
#[utoipa::path(get, path = "/views/{view}/{key}", tag = "queries",
    params(
        ("view" = String, Path, description = "The view"),
        ("key" = String, Path, description = "The document key: the aggregate id, or the value of the view's key expression"),
        ("consistent_with" = Option<String>, Query, description = "Wait until the view has passed this position (a command reply's `position`)", pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,248}:[0-9]{1,9}:[0-9]{1,19}$")
    ),
    responses(
        (status = 200, description = "The document", body = ViewDocument),
        (status = 400, description = "Malformed parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such view or document", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The view did not reach the position in time", body = Problem, content_type = "application/problem+json")
    ))]
async fn get_document(
    State(state): State<QueryState>,
    Path((view, key)): Path<(String, String)>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<ViewDocument>, ApiError> {
    let (position, rest) = split_params(params)?;
    if let Some((name, _)) = rest.first() {
        return Err(QueryError::BadParameter(format!(
            "unknown query parameter {name:?}; only consistent_with is accepted here"
        ))
        .into());
    }
    state.models.check_view(&view)?;
    wait_consistent(&state, &view, position).await?;
    let models = state.models.clone();
    let doc = {
        let (view, key) = (view.clone(), key.clone());
        blocking(move || models.get(&view, &key)).await?
    };
    Ok(Json(ViewDocument { key, doc }))
}

/// Lists a view, filtered and ordered by indexed fields, a page at a time.
///
/// Filters are query parameters named `where.<field>`, an equality filter on
/// an indexed field; the value is read as JSON when it parses, else as a
/// string. (Their names depend on the domain: `/openapi.json` lists them per
/// view, see `http::openapi`.)
#[utoipa::path(get, path = "/views/{view}", tag = "queries",
    params(
        ("view" = String, Path, description = "The view"),
        ("order" = Option<String>, Query, description = "`field` or `-field` (descending); an indexed field. Default: by key"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000, default 50", minimum = 1, maximum = 1000),
        ("cursor" = Option<String>, Query, description = "The next_cursor of the previous page"),
        ("consistent_with" = Option<String>, Query, description = "Wait until the view has passed this position (a command reply's `position`)", pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,248}:[0-9]{1,9}:[0-9]{1,19}$")
    ),
    responses(
        (status = 200, description = "A page", body = ViewPage),
        (status = 400, description = "Non-indexed field or malformed parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such view", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The view did not reach the position in time", body = Problem, content_type = "application/problem+json")
    ))]
async fn list_view(
    State(state): State<QueryState>,
    Path(view): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<ViewPage>, ApiError> {
    let (position, rest) = split_params(params)?;
    let mut request = ListRequest::default();
    for (name, value) in rest {
        if let Some(field) = name.strip_prefix("where.") {
            request
                .filters
                .push((field.to_owned(), crate::projection::parse_value(&value)));
        } else if name == "order" {
            let order = match value.strip_prefix('-') {
                Some(field) => (field.to_owned(), SortOrder::Descending),
                None => (value, SortOrder::Ascending),
            };
            request.order = Some(order);
        } else if name == "limit" {
            let limit = value.parse::<usize>().map_err(|_| {
                QueryError::BadParameter(format!("limit must be a positive integer, got {value:?}"))
            })?;
            request.limit = Some(limit);
        } else if name == "cursor" {
            request.cursor = Some(value);
        } else {
            return Err(QueryError::BadParameter(format!(
                "unknown query parameter {name:?}; use where.<field>, order, limit, cursor or consistent_with"
            ))
            .into());
        }
    }
    state.models.check_view(&view)?;
    wait_consistent(&state, &view, position).await?;
    let models = state.models.clone();
    let page = blocking(move || models.list(&view, &request)).await?;
    Ok(Json(ViewPage {
        items: page
            .items
            .into_iter()
            .map(|(key, doc)| ViewDocument { key, doc })
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// The rows of an aggregation, optionally restricted to group field values.
///
/// A query parameter named after a group field keeps only the groups with
/// that value. (Their names depend on the domain: `/openapi.json` lists them
/// per aggregation, see `http::openapi`.)
#[utoipa::path(get, path = "/aggregations/{name}", tag = "queries",
    params(
        ("name" = String, Path, description = "The aggregation"),
        ("consistent_with" = Option<String>, Query, description = "Wait until the aggregation has passed this position (a command reply's `position`)", pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,248}:[0-9]{1,9}:[0-9]{1,19}$")
    ),
    responses(
        (status = 200, description = "The rows", body = AggregationRows),
        (status = 400, description = "Unknown group field or malformed parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such aggregation", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The aggregation did not reach the position in time", body = Problem, content_type = "application/problem+json")
    ))]
async fn get_aggregation(
    State(state): State<QueryState>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<AggregationRows>, ApiError> {
    let (position, filters) = split_params(params)?;
    state.models.check_aggregation(&name)?;
    wait_consistent(&state, &name, position).await?;
    let models = state.models.clone();
    let rows = blocking(move || models.aggregation(&name, &filters)).await?;
    Ok(Json(AggregationRows { rows }))
}

/// Every projection: state, positions and lag per partition, events/s and
/// quarantined events.
#[utoipa::path(get, path = "/admin/projections", tag = "admin", operation_id = "listProjections",
    responses((status = 200, description = "The projections", body = ProjectionsReport)))]
async fn admin_projections(
    State(state): State<QueryState>,
) -> Result<Json<ProjectionsReport>, ApiError> {
    let models = state.models.clone();
    let reports = blocking(move || models.report(MAX_QUARANTINED_LISTED)).await?;
    let projections = reports
        .into_iter()
        .map(|r| ProjectionInfo {
            name: r.name,
            kind: r.kind.to_owned(),
            generation: r.generation,
            state: r.state.as_str().to_owned(),
            error: r.error,
            partitions: r
                .partitions
                .into_iter()
                .map(|(topic, partition, position, lag)| PartitionInfo {
                    topic,
                    partition,
                    position,
                    lag,
                })
                .collect(),
            events_total: r.events_total,
            events_per_sec: r.events_per_sec,
            quarantine_count: r.quarantine_count,
            quarantined: r
                .quarantined
                .into_iter()
                .map(|q| QuarantinedEvent {
                    position: Position::new(q.topic, q.partition, q.offset).to_string(),
                    index: q.index,
                    event: q.event,
                    reason: q.reason,
                })
                .collect(),
            rebuild: r.rebuild.map(|progress| RebuildInfo {
                events: progress.events,
                positions: progress
                    .positions
                    .into_iter()
                    .map(|((topic, partition), next)| (format!("{topic}:{partition}"), next.into()))
                    .collect(),
            }),
        })
        .collect();
    Ok(Json(ProjectionsReport { projections }))
}

/// Rebuilds a projection from offset 0 beside the live one, then swaps it in
/// atomically; queries keep reading the live data meanwhile. A policy is never
/// rebuilt: that would send every command it ever sent again.
#[utoipa::path(post, path = "/admin/projections/{name}/rebuild", tag = "admin", operation_id = "rebuildProjection",
    params(("name" = String, Path, description = "The projection")),
    responses(
        (status = 202, description = "The rebuild started", body = RebuildAccepted),
        (status = 404, description = "No such projection", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A rebuild is already running, or the name is a policy's (never rebuilt; move its position instead)", body = Problem, content_type = "application/problem+json")
    ))]
async fn rebuild_projection(
    State(state): State<QueryState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let projection_state = state.models.request_rebuild(&name)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RebuildAccepted {
            projection: name,
            state: projection_state.as_str().to_owned(),
        }),
    )
        .into_response())
}

/// Longest the position route waits for the policy's worker, which carries
/// the move out between two batches (a batch may be waiting for the write
/// side).
const MOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A policy's positions: `"<topic>:<partition>"` → the next offset to read,
/// as `/admin/projections` reports them.
#[derive(Debug, Serialize, ToSchema)]
struct PolicyPositions {
    policy: String,
    positions: std::collections::BTreeMap<String, u64>,
}

// The schema of a move's body says exactly what the handler parses (an
// object of non-negative integers, no other field), so a body the document
// calls well-formed is one the handler reads.
/// The body of a move: the new next offset to read of each partition to
/// move. Partitions not named stay where they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct MovePositions {
    /// `"<topic>:<partition>"` → the new next offset to read.
    positions: std::collections::BTreeMap<String, u64>,
}

/// Moves a policy's position forward: the events before the new position
/// are skipped, their commands never sent. A policy is never rebuilt (that
/// would send every command again); this is how an operator makes it pass
/// events it should not act on. Partitions not named stay where they are.
#[utoipa::path(post, path = "/admin/projections/{name}/position", tag = "admin", operation_id = "movePolicyPosition",
    params(("name" = String, Path, description = "The policy")),
    request_body(content = MovePositions, content_type = "application/json"),
    responses(
        (status = 200, description = "The policy's positions after the move", body = PolicyPositions),
        (status = 400, description = "Malformed body, an unknown partition, a position behind the policy's or past the end of the log", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such policy", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A projection, not a policy", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The policy's worker did not get to it in time", body = Problem, content_type = "application/problem+json")
    ))]
async fn move_policy_position(
    State(state): State<QueryState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<PolicyPositions>, ApiError> {
    let request: MovePositions = serde_json::from_slice(&body).map_err(|error| {
        QueryError::BadParameter(format!(
            "the body must be {{\"positions\": {{\"<topic>:<partition>\": <next offset>}}}}: {error}"
        ))
    })?;
    let mut positions = crate::store::views::Positions::new();
    for (key, offset) in request.positions {
        let parsed = key.rsplit_once(':').and_then(|(topic, partition)| {
            Some((topic.to_owned(), partition.parse::<u32>().ok()?))
        });
        let Some(key) = parsed else {
            return Err(QueryError::BadParameter(format!(
                "{key:?} is not \"<topic>:<partition>\""
            ))
            .into());
        };
        positions.insert(key, offset);
    }
    let receiver = state.models.request_move(&name, positions)?;
    let moved = match tokio::time::timeout(MOVE_TIMEOUT, receiver).await {
        Ok(Ok(result)) => result?,
        Ok(Err(_)) => {
            return Err(QueryError::Unavailable("the policy's worker stopped".to_owned()).into());
        }
        Err(_) => {
            return Err(QueryError::Unavailable(format!(
                "the policy's worker did not get to the request within {} s (it may be waiting for the write side); see GET /admin/projections before asking again",
                MOVE_TIMEOUT.as_secs()
            ))
            .into());
        }
    };
    Ok(Json(PolicyPositions {
        policy: name,
        positions: moved
            .into_iter()
            .map(|((topic, partition), next)| (format!("{topic}:{partition}"), next))
            .collect(),
    }))
}
