//! `/console`: the operator's console, one web page served by the daemon.
//!
//! The page, its style sheet and its script are compiled into the binary, so
//! the console works on a machine with no internet and nothing it loads can
//! change under a running daemon. The page itself holds no data: every figure
//! it shows comes from the guarded API, called by the script with the token
//! the operator typed (kept in the tab's `sessionStorage` only). Its assets
//! therefore need no token, and a Content-Security-Policy forbids the page
//! any request to another origin.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::security::LiveSettings;

const PAGE: &str = include_str!("console/index.html");
const STYLE: &str = include_str!("console/console.css");
const SCRIPT: &str = include_str!("console/console.js");

/// The marker in the page that says whether the API wants a token.
const AUTH_MARKER: &str = "{{auth}}";

/// Everything the page may load comes from the daemon itself; the icon is an
/// empty `data:` URL so the browser does not ask for `/favicon.ico`.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The console's routes. They are open (see `guard::policy`), and they are
/// not dispatched to the command or query runtime: serving a constant is
/// cheaper than the hop.
pub(crate) fn routes(settings: LiveSettings) -> Router {
    Router::new()
        .route("/console", get(page))
        .route("/console/console.css", get(style))
        .route("/console/console.js", get(script))
        .with_state(settings)
}

/// The page, told whether tokens are configured so that it asks for one only
/// when the API needs it (a reload may add or remove every token, so this is
/// decided per request).
async fn page(State(settings): State<LiveSettings>) -> Response {
    let tokens = settings.current().tokens.is_some();
    let page = PAGE.replace(AUTH_MARKER, if tokens { "token" } else { "none" });
    asset(page, "text/html; charset=utf-8")
}

async fn style() -> Response {
    asset(STYLE.to_owned(), "text/css; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT.to_owned(), "text/javascript; charset=utf-8")
}

fn asset(body: String, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The assets change with the binary only; revalidating costs little and
    // never shows a page of an older daemon after an upgrade.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_only_its_own_assets() {
        assert!(PAGE.contains(AUTH_MARKER));
        assert!(PAGE.contains("/console/console.js"));
        assert!(PAGE.contains("/console/console.css"));
        // The only absolute URL allowed is SVG's namespace, a name that is
        // never fetched.
        for asset in [PAGE, STYLE, SCRIPT] {
            let stripped = asset.replace("http://www.w3.org/2000/svg", "");
            assert!(!stripped.contains("http://"), "an absolute URL in an asset");
            assert!(
                !stripped.contains("https://"),
                "an absolute URL in an asset"
            );
            assert!(!stripped.contains("//cdn"), "a CDN in an asset");
        }
    }
}
