//! `GET /api/v1/openapi.json`: the API's OpenAPI 3.1 document, compiled in from `docs/openapi.json` and
//! served byte for byte, without authentication. The file in the repository is the one source: the binary
//! cannot drift from it, and tests/openapi.rs checks both what is served and that the running bridge keeps
//! to it.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// Where the document is served.
pub(crate) const PATH: &str = "/api/v1/openapi.json";

/// The document, as kept in docs/openapi.json.
pub(crate) const DOCUMENT: &str = include_str!("../docs/openapi.json");

/// The route, ready to merge into the service's router (it needs no state).
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(PATH, get(document))
}

async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_and_names_its_own_path() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON");
        assert!(
            doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")),
            "openapi: {}",
            doc["openapi"]
        );
        assert!(doc["paths"].get(PATH).is_some(), "the document lists {PATH}");
    }
}
