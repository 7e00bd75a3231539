//! What every request goes through before a route sees it, and every answer on its way out.
//!
//! - [`bounded_body`]: a body of at most [`BODY_LIMIT`] bytes that arrives within [`BODY_TIMEOUT`], read here
//!   and handed on in full. A declared `Content-Length` over the limit is answered 413 before a byte of the
//!   body is read (and before any authentication: a client without a token cannot make the bridge buffer
//!   more than the limit); a chunked body is cut off at the limit. Cutting a body short closes the
//!   connection, since the rest of the request can no longer be told apart from the next one.
//! - [`json_errors`]: every error answer, whatever produced it (axum's own rejections of a bad path, a
//!   wrong method, an unknown route; the limits above), is `{"error": "..."}` with a JSON content type, so a
//!   client can read every failure the same way.
//!
//! The two numbers are part of the API's contract (docs/api.md), not settings.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::json;
use tokio::time::Instant;

/// The largest request body the API reads.
pub(crate) const BODY_LIMIT: usize = 64 * 1024;

/// How long a request's body may take to arrive once its headers have.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest error text of the framework's own that is passed on as the message (axum's rejections are a
/// line); anything longer, or not text, is replaced by the status's reason phrase.
const MAX_FRAMEWORK_MESSAGE: usize = 1024;

/// The API's error shape: `{"error": message}`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// An error after which the connection cannot carry another request (the body was not read to its end).
fn closing(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = error(status, message);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn too_large() -> Response {
    closing(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {BODY_LIMIT} bytes"),
    )
}

/// The declared length, when there is one that parses (hyper has already refused a malformed one).
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Reads the request body under [`BODY_LIMIT`] and [`BODY_TIMEOUT`], then runs the route with it in memory.
pub(crate) async fn bounded_body(req: Request, next: Next) -> Response {
    let deadline = Instant::now() + BODY_TIMEOUT;
    if content_length(req.headers()).is_some_and(|n| n > BODY_LIMIT as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let mut chunks = body.into_data_stream();
    let mut buf = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(None) => break,
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() > BODY_LIMIT {
                    return too_large();
                }
                buf.extend_from_slice(&chunk);
            }
            // The client closed the connection mid-body, or sent a malformed chunk: most likely nobody reads
            // this answer, but if someone does it says what happened.
            Ok(Some(Err(_))) => return closing(StatusCode::BAD_REQUEST, "request body could not be read"),
            Err(_) => {
                return closing(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body not received within {}s", BODY_TIMEOUT.as_secs()),
                )
            }
        }
    }
    next.run(Request::from_parts(parts, Body::from(buf))).await
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Turns an error answer that is not JSON (the framework's: empty or plain text) into `{"error": "..."}`,
/// keeping its status and headers (`Allow` on a 405). The framework's text, when it is a short line, is the
/// message; otherwise the status's reason phrase is.
pub(crate) async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(resp.headers()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_FRAMEWORK_MESSAGE)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let message = text.unwrap_or_else(|| {
        status
            .canonical_reason()
            .map_or_else(|| format!("status {}", status.as_u16()), str::to_ascii_lowercase)
    });
    let json = error(status, message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, json.into_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn framework_errors_become_json_with_their_headers() {
        let mut plain = (StatusCode::BAD_REQUEST, "Invalid URL: bad escape").into_response();
        plain
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET,HEAD"));
        let r = json_errors(plain).await;
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(r.headers()[header::ALLOW], "GET,HEAD");
        let body = axum::body::to_bytes(r.into_body(), 4096).await.expect("body");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).expect("json"),
            json!({"error": "Invalid URL: bad escape"})
        );

        let empty = StatusCode::METHOD_NOT_ALLOWED.into_response();
        let body = axum::body::to_bytes(json_errors(empty).await.into_body(), 4096)
            .await
            .expect("body");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).expect("json"),
            json!({"error": "method not allowed"})
        );
    }

    #[tokio::test]
    async fn successes_and_json_errors_pass_unchanged() {
        let ok = (StatusCode::OK, "plain text is fine here").into_response();
        let r = json_errors(ok).await;
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        let api = error(StatusCode::CONFLICT, "taken");
        let body = axum::body::to_bytes(json_errors(api).await.into_body(), 4096)
            .await
            .expect("body");
        assert_eq!(body, r#"{"error":"taken"}"#);
    }
}
