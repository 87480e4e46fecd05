//! Authentication, authorization and rate limiting of each request.
//!
//! Runs after routing, so the matched route template says what a request
//! needs: [`policy`] is the one table from routes to roles. The settings are
//! read once per request from the reloadable handle, so a token revoked by a
//! reload is refused from the next request on.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::ApiError;
use crate::auth::{Requirement, Role, Target};
use crate::security::LiveSettings;

/// The name of the token that sent a request; handlers put it into the
/// metadata of the events they cause. Absent when authentication is off.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// What a route needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Policy {
    /// No token, no rate limit: probes must work whatever the settings.
    Open,
    /// Any valid token, whatever its roles.
    AnyToken,
    Need(Requirement),
}

/// The access policy of a route template. Routes not listed here need the
/// admin role, so a route added without a decision fails closed.
fn policy(
    template: Option<&str>,
    param: impl Fn(&str) -> Option<String>,
    query_param: impl Fn(&str) -> Option<String>,
    metrics_public: bool,
) -> Policy {
    let need = |role, target| Policy::Need(Requirement { role, target });
    // A parameter that cannot be read (not UTF-8 once decoded) names no
    // aggregate or projection a restricted token is allowed: it fails closed.
    let named = |name: &str, make: fn(String) -> Target| make(param(name).unwrap_or_default());
    let Some(template) = template else {
        // No route matched: a 404 to a client with a token, a 401 to one
        // without (which learns nothing about the routes).
        return Policy::AnyToken;
    };
    match template {
        "/livez" | "/readyz" => Policy::Open,
        // The console's page and assets hold no data; the page calls the
        // guarded API below with the operator's token.
        "/console" | "/console/console.css" | "/console/console.js" => Policy::Open,
        "/metrics" if metrics_public => Policy::Open,
        "/metrics" => need(Role::Admin, Target::Any),
        // The API description is useful to every client, and to nobody else.
        "/openapi.json" => Policy::AnyToken,
        "/commands/{aggregate}/{id}/{command}" => {
            need(Role::Command, named("aggregate", Target::Aggregate))
        }
        "/aggregates/{aggregate}/{id}" | "/aggregates/{aggregate}/{id}/events" => {
            need(Role::Query, named("aggregate", Target::Aggregate))
        }
        "/views/{view}" | "/views/{view}/{key}" => {
            need(Role::Query, named("view", Target::Projection))
        }
        "/aggregations/{name}" | "/search/{name}" => {
            need(Role::Query, named("name", Target::Projection))
        }
        "/events/stream" => need(
            Role::Query,
            query_param("aggregate").map_or(Target::EveryAggregate, Target::Aggregate),
        ),
        "/admin/projections/{name}/rebuild" | "/admin/projections/{name}/position" => {
            need(Role::Admin, named("name", Target::Projection))
        }
        // The node's role, peers and forwards: operators only.
        "/admin/node" => need(Role::Admin, Target::Any),
        _ => need(Role::Admin, Target::Any),
    }
}

/// Authenticates the bearer token, checks the route's role and the token's
/// restrictions, and takes one request from the caller's rate limit.
pub(crate) async fn guard(
    State(settings): State<LiveSettings>,
    request: Request,
    next: Next,
) -> Response {
    let security = settings.current();
    let (mut parts, body) = request.into_parts();
    let template = parts
        .extensions
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let params = RawPathParams::from_request_parts(&mut parts, &())
        .await
        .ok();
    let param = |name: &str| {
        params.as_ref().and_then(|params| {
            params
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_owned())
        })
    };
    let query_param = |name: &str| {
        let axum::extract::Query(map) = axum::extract::Query::<
            std::collections::HashMap<String, String>,
        >::try_from_uri(&parts.uri)
        .ok()?;
        map.get(name).cloned()
    };
    let policy = policy(
        template.as_deref(),
        param,
        query_param,
        security.metrics_public,
    );
    if policy == Policy::Open {
        drop(security);
        return next.run(Request::from_parts(parts, body)).await;
    }

    let caller = match &security.tokens {
        None => None,
        Some(tokens) => {
            let header = parts
                .headers
                .get(axum::http::header::AUTHORIZATION)
                .map(|value| value.as_bytes());
            let principal = match tokens.authenticate(header) {
                Ok(principal) => principal,
                Err(error) => return ApiError::from(error).into_response(),
            };
            if let Policy::Need(requirement) = &policy
                && let Err(error) = principal.authorize(requirement)
            {
                return ApiError::from(error).into_response();
            }
            Some(principal.name.clone())
        }
    };

    if let Some(limiter) = &security.rate_limit {
        // Without authentication the client's address is the only identity.
        let key = match &caller {
            Some(name) => format!("token:{name}"),
            None => parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(
                    || "address:unknown".to_owned(),
                    |peer| format!("address:{}", peer.0.ip()),
                ),
        };
        if let Err(wait) = limiter.check(&key) {
            metrics::counter!("cqrsd_http_rate_limited_total").increment(1);
            return ApiError::RateLimited(wait).into_response();
        }
    }

    if let Some(name) = caller {
        parts.extensions.insert(Caller(name));
    }
    // A long request (an event stream) must not pin settings a reload replaced.
    drop(security);
    next.run(Request::from_parts(parts, body)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_of(template: &str, params: &[(&str, &str)], query: &[(&str, &str)]) -> Policy {
        let lookup = |pairs: &[(&str, &str)], name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        };
        policy(
            Some(template),
            |name| lookup(params, name),
            |name| lookup(query, name),
            false,
        )
    }

    #[test]
    fn every_route_has_the_intended_policy() {
        let need = |role, target| Policy::Need(Requirement { role, target });
        assert_eq!(policy_of("/livez", &[], &[]), Policy::Open);
        assert_eq!(policy_of("/readyz", &[], &[]), Policy::Open);
        for asset in ["/console", "/console/console.css", "/console/console.js"] {
            assert_eq!(policy_of(asset, &[], &[]), Policy::Open);
        }
        assert_eq!(
            policy_of("/metrics", &[], &[]),
            need(Role::Admin, Target::Any)
        );
        assert_eq!(policy_of("/openapi.json", &[], &[]), Policy::AnyToken);
        assert_eq!(
            policy_of(
                "/commands/{aggregate}/{id}/{command}",
                &[("aggregate", "account")],
                &[]
            ),
            need(Role::Command, Target::Aggregate("account".into()))
        );
        assert_eq!(
            policy_of(
                "/aggregates/{aggregate}/{id}/events",
                &[("aggregate", "account")],
                &[]
            ),
            need(Role::Query, Target::Aggregate("account".into()))
        );
        assert_eq!(
            policy_of("/views/{view}/{key}", &[("view", "accounts")], &[]),
            need(Role::Query, Target::Projection("accounts".into()))
        );
        assert_eq!(
            policy_of("/search/{name}", &[("name", "people")], &[]),
            need(Role::Query, Target::Projection("people".into()))
        );
        assert_eq!(
            policy_of("/events/stream", &[], &[]),
            need(Role::Query, Target::EveryAggregate)
        );
        assert_eq!(
            policy_of("/events/stream", &[], &[("aggregate", "account")]),
            need(Role::Query, Target::Aggregate("account".into()))
        );
        assert_eq!(
            policy_of("/admin/projections", &[], &[]),
            need(Role::Admin, Target::Any)
        );
        assert_eq!(
            policy_of("/admin/node", &[], &[]),
            need(Role::Admin, Target::Any)
        );
        assert_eq!(
            policy_of(
                "/admin/projections/{name}/position",
                &[("name", "reserve_stock")],
                &[]
            ),
            need(Role::Admin, Target::Projection("reserve_stock".into()))
        );
        assert_eq!(
            policy_of("/some/new/route", &[], &[]),
            need(Role::Admin, Target::Any)
        );
        assert_eq!(policy(None, |_| None, |_| None, false), Policy::AnyToken);
        // An unreadable parameter matches no restriction's allowed names.
        assert_eq!(
            policy(Some("/views/{view}"), |_| None, |_| None, false),
            need(Role::Query, Target::Projection(String::new()))
        );
        assert_eq!(
            policy(Some("/metrics"), |_| None, |_| None, true),
            Policy::Open
        );
    }
}
