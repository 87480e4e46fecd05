//! Entry points for the fuzz targets in `fuzz/`.
//!
//! The parsers of cursors and stream starts are private to the HTTP and query
//! layers; these thin wrappers reach them without widening those modules'
//! APIs. Each returns the input's canonical spelling, so a target can check
//! that parsing the canonical form gives it back. Not part of the daemon's
//! interface: nothing else should call them.

/// `from` / `Last-Event-ID` of `GET /events/stream` (`now`, `start`, a
/// position or a stream cursor), canonically spelled.
pub fn stream_start(value: &str) -> Result<String, String> {
    crate::http::stream::canonical_start(value)
}

/// A `GET /search/{name}` cursor, canonically spelled.
pub fn search_cursor(value: &str) -> Result<String, String> {
    crate::store::search::canonical_cursor(value).map_err(|e| e.to_string())
}

/// A view list cursor (`GET /views/{name}?cursor=`), canonically spelled
/// (lower-case hex), or `None` where the list query would reject it.
pub fn view_cursor(value: &str) -> Option<String> {
    crate::projection::unhex(value).map(|bytes| crate::projection::hex(&bytes))
}
