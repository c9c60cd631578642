//! The AsyncAPI 3.0 document of the messages at `/asyncapi.json`, without auth like
//! `/openapi.json` (built by `orderflow_shared::messaging::asyncapi`; `docs/asyncapi.json` is
//! a copy a test keeps identical).

use std::sync::LazyLock;

use axum::{Router, http::header, response::IntoResponse, routing::get};
use orderflow_shared::messaging::asyncapi;

use crate::AppState;

static DOCUMENT: LazyLock<String> = LazyLock::new(asyncapi::document_text);

pub fn router() -> Router<AppState> {
    Router::new().route("/asyncapi.json", get(document))
}

async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT.as_str())
}
