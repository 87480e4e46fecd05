//! No-op routes for `cqrsd bench baseline-http`: a POST on the command side
//! and a GET on the query side that do no work, so their throughput is the
//! limit of the HTTP server, the middleware stack and the runtime dispatch
//! that every command and query pays. Mounted only by the in-process daemon
//! the load generator starts, through `StartOptions::extra_routes`.

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};

use super::ApiRoutes;

/// The no-op POST (command runtime): reads the body like a command does.
pub const POST_PATH: &str = "/bench/noop";
/// The no-op GET (query runtime).
pub const GET_PATH: &str = "/bench/noop-get";

/// The answer of both routes: a small JSON object, like a real reply.
const REPLY: &str = r#"{"ok":true}"#;

/// The routes, for `StartOptions::extra_routes`.
pub fn routes() -> ApiRoutes {
    ApiRoutes {
        command: Router::new().route(POST_PATH, post(|_body: Bytes| async { reply() })),
        query: Router::new().route(GET_PATH, get(|| async { reply() })),
        openapi: None,
        domain: None,
    }
}

fn reply() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        REPLY,
    )
}
