//! `GET /search/{name}`: full-text search over a search projection.
//!
//! The projection pool owns each index's writer and hands this module reader
//! handles (the live index's, looked up per request, since a rebuild swaps in
//! another); searching blocks on disk reads, so it runs on the blocking pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::problem::{ApiError, Problem};
use crate::log::Position;
use crate::projection::{QueryError, ReadModels};
use crate::store::{SearchError, SearchPage, SearchReader};

/// Hits per page when the request does not say.
const DEFAULT_LIMIT: usize = 20;

/// Finds the live reader of a search projection by name.
type Lookup = Arc<dyn Fn(&str) -> Result<SearchReader, ApiError> + Send + Sync>;

#[derive(Clone)]
struct SearchState {
    lookup: Lookup,
    /// The read models that `consistent_with` waits on, and for how long.
    consistency: Option<(ReadModels, Duration)>,
}

/// The search route over the pool's search projections, ready to be merged
/// into the query router.
pub fn routes(models: ReadModels, consistency_timeout: Duration) -> Router {
    let lookup_models = models.clone();
    let lookup: Lookup = Arc::new(move |name: &str| Ok(lookup_models.search_reader(name)?));
    Router::new()
        .route("/search/{name}", get(search))
        .with_state(SearchState {
            lookup,
            consistency: Some((models, consistency_timeout)),
        })
}

/// The search route over fixed indexes, without `consistent_with` (there are
/// no positions to wait for).
pub fn fixed_routes(indexes: HashMap<String, SearchReader>) -> Router {
    let lookup: Lookup = Arc::new(move |name: &str| {
        indexes
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no search projection {name:?}")))
    });
    Router::new()
        .route("/search/{name}", get(search))
        .with_state(SearchState {
            lookup,
            consistency: None,
        })
}

/// The OpenAPI description of the search route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    SearchApi::openapi()
}

#[derive(OpenApi)]
#[openapi(paths(search), components(schemas(SearchResponse, SearchHitBody)))]
struct SearchApi;

#[derive(Debug, Serialize, ToSchema)]
struct SearchResponse {
    hits: Vec<SearchHitBody>,
    /// Pass back as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
struct SearchHitBody {
    key: String,
    score: f32,
    #[schema(value_type = Object)]
    doc: serde_json::Value,
}

impl From<SearchPage> for SearchResponse {
    fn from(page: SearchPage) -> Self {
        SearchResponse {
            hits: page
                .hits
                .into_iter()
                .map(|hit| SearchHitBody {
                    key: hit.key,
                    score: hit.score,
                    doc: hit.doc,
                })
                .collect(),
            next_cursor: page.next_cursor,
        }
    }
}

impl From<SearchError> for ApiError {
    fn from(error: SearchError) -> Self {
        match error {
            // A failing index is the server's trouble, not the request's: 503.
            SearchError::Store(error) => QueryError::Unavailable(error.to_string()).into(),
            bad => ApiError::BadRequest(bad.to_string()),
        }
    }
}

/// Searches a search projection, best hits first.
///
/// Every query parameter other than `q`, `limit`, `cursor` and
/// `consistent_with` is an exact-match filter on a keyword or number field.
#[utoipa::path(get, path = "/search/{name}", tag = "queries",
    params(
        ("name" = String, Path, description = "The search projection"),
        ("q" = Option<String>, Query, description = "Query over the text fields; empty matches everything"),
        ("limit" = Option<usize>, Query, description = "Hits per page, 1 to 1000 (default 20)", minimum = 1, maximum = 1000),
        ("cursor" = Option<String>, Query, description = "The previous page's next_cursor"),
        ("consistent_with" = Option<String>, Query, description = "Wait until the index has committed this position (a command reply's `position`)", pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,248}:[0-9]{1,9}:[0-9]{1,19}$"),
    ),
    responses(
        (status = 200, description = "A page of hits", body = SearchResponse),
        (status = 400, description = "Malformed query, filter, limit, cursor or position", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such search projection", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The index is unavailable", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The index did not reach consistent_with in time", body = Problem, content_type = "application/problem+json")
    ))]
async fn search(
    State(state): State<SearchState>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<SearchResponse>, ApiError> {
    (state.lookup)(&name)?;
    let mut query = None;
    let mut limit = None;
    let mut cursor = None;
    let mut position = None;
    let mut filters = Vec::new();
    for (key, value) in params {
        let slot = match key.as_str() {
            "q" => &mut query,
            "limit" => &mut limit,
            "cursor" => &mut cursor,
            "consistent_with" => &mut position,
            _ => {
                filters.push((key, value));
                continue;
            }
        };
        if slot.replace(value).is_some() {
            return Err(ApiError::BadRequest(format!(
                "the parameter {key:?} is given more than once"
            )));
        }
    }
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(text) => text.parse().map_err(|_| {
            ApiError::BadRequest(format!("limit {text:?} is not a non-negative integer"))
        })?,
    };
    if let Some(text) = position {
        let position = text.parse::<Position>().map_err(|e| {
            QueryError::BadParameter(format!("invalid consistent_with {text:?}: {e}"))
        })?;
        if let Some((models, timeout)) = &state.consistency {
            models.wait_for(&[&name], &position, *timeout).await?;
        }
    }
    // Looked up again after the wait: a rebuild may have swapped in another
    // index meanwhile, and only the live one has reached the position.
    let reader = (state.lookup)(&name)?;
    let page = tokio::task::spawn_blocking(move || {
        reader.search(
            query.as_deref().unwrap_or(""),
            &filters,
            limit,
            cursor.as_deref(),
        )
    })
    .await
    .map_err(|_| ApiError::Internal("the search task failed".to_owned()))??;
    Ok(Json(page.into()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;
    use crate::domain::SearchFieldKind;
    use crate::store::SearchIndex;

    async fn get_json(router: &Router, uri: &str) -> (StatusCode, serde_json::Value) {
        let response = router
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn searches_pages_and_rejects_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let fields = [
            ("owner".to_owned(), SearchFieldKind::Text),
            ("status".to_owned(), SearchFieldKind::Keyword),
        ];
        let mut index = SearchIndex::open(dir.path(), &fields).unwrap();
        for n in 0..3 {
            let doc = serde_json::json!({"owner": format!("ann {n}"), "status": "open"});
            index.upsert(&format!("k{n}"), Some(&doc)).unwrap();
        }
        index.commit(&BTreeMap::new()).unwrap();
        let router = fixed_routes(HashMap::from([("people".to_owned(), index.reader())]));

        let (status, body) = get_json(&router, "/search/people?q=ann&limit=2&status=open").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["hits"].as_array().unwrap().len(), 2);
        assert!(body["hits"][0]["score"].is_number());
        assert_eq!(body["hits"][0]["doc"]["status"], "open");
        let cursor = body["next_cursor"].as_str().unwrap();
        let (_, body) = get_json(
            &router,
            &format!("/search/people?q=ann&limit=2&status=open&cursor={cursor}"),
        )
        .await;
        assert_eq!(body["hits"].as_array().unwrap().len(), 1);
        assert!(body["next_cursor"].is_null());

        let (status, _) = get_json(&router, "/search/nope?q=ann").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        for bad in [
            "q=%22unclosed",
            "owner=ann",
            "limit=x",
            "limit=0",
            "cursor=zzz",
            "q=a&q=b",
            "consistent_with=nope",
        ] {
            let (status, body) = get_json(&router, &format!("/search/people?{bad}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
            assert_eq!(body["status"], 400);
        }
    }
}
