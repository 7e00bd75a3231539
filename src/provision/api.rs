//! The provisioning HTTP API (docs/api.md): `POST /api/v1/devices`, `GET`/`DELETE
//! /api/v1/devices/{device_id}` behind the admin bearer token, and the public `GET /.well-known/jwks.json`.
//! Owns status codes and the JSON error shape; never answers with a database or broker message (those are
//! logged), and refuses every device call when no admin token is configured rather than run open.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::broker::BrokerError;
use super::{IssueRequest, ProvisionError, Provisioner};
use crate::config::Secret;

/// What the device routes need: the admin token and the provisioner.
pub(crate) struct DeviceApi {
    pub admin_token: Option<Secret>,
    pub provisioner: Arc<Provisioner>,
}

/// The device routes with their own state, ready to merge into the service's router.
pub(crate) fn routes(api: Arc<DeviceApi>) -> Router {
    Router::new()
        .route("/api/v1/devices", post(issue))
        .route("/api/v1/devices/{device_id}", get(show).delete(revoke))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(api)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// Checks `Authorization: Bearer <admin_token>` in constant time (hashes of equal length are compared, so
/// neither the content nor the length of the token leaks through timing).
fn authorize(api: &DeviceApi, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(expected) = &api.admin_token else {
        return Err(Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "device API disabled: http.admin_token is not configured",
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok: bool = Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.expose().as_bytes()))
        .into();
    if ok && !given.is_empty() {
        Ok(())
    } else {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        Err(Box::new(r))
    }
}

/// Maps an outcome to a status; internal errors are logged and answered with a fixed text.
fn failure(e: ProvisionError, what: &str) -> Response {
    match e {
        ProvisionError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        ProvisionError::NotFound(m) => error(StatusCode::NOT_FOUND, m),
        ProvisionError::Disabled(m) => error(StatusCode::SERVICE_UNAVAILABLE, m),
        ProvisionError::Store(e) => {
            tracing::error!(error = %e, "{what}: device store failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "device store unavailable")
        }
        ProvisionError::Broker(BrokerError::NotOurs(name)) => error(
            StatusCode::CONFLICT,
            format!("{name} names a broker account that delta-bridge does not manage"),
        ),
        ProvisionError::Broker(e) => {
            tracing::error!(error = %e, "{what}: broker admin failed");
            error(StatusCode::BAD_GATEWAY, "broker did not accept the change")
        }
        ProvisionError::Key(e) => {
            tracing::error!(error = %e, "{what}: signing failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign credentials")
        }
    }
}

async fn issue(State(api): State<Arc<DeviceApi>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorize(&api, &headers) {
        return *r;
    }
    let req: IssueRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"device_id\", \"merchant_code\", \"branch_code\", \"ttl_seconds\"?}}: {e}"),
            )
        }
    };
    match api.provisioner.issue(&req).await {
        Ok(c) => (StatusCode::CREATED, Json(c)).into_response(),
        Err(e) => failure(e, "issue"),
    }
}

async fn show(State(api): State<Arc<DeviceApi>>, headers: HeaderMap, Path(device_id): Path<String>) -> Response {
    if let Err(r) = authorize(&api, &headers) {
        return *r;
    }
    match api.provisioner.get(&device_id).await {
        Ok(v) => (StatusCode::OK, Json(v)).into_response(),
        Err(e) => failure(e, "get"),
    }
}

async fn revoke(State(api): State<Arc<DeviceApi>>, headers: HeaderMap, Path(device_id): Path<String>) -> Response {
    if let Err(r) = authorize(&api, &headers) {
        return *r;
    }
    match api.provisioner.revoke(&device_id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => failure(e, "revoke"),
    }
}

async fn jwks(State(api): State<Arc<DeviceApi>>) -> Response {
    match api.provisioner.jwks() {
        Ok(v) => ([(header::CACHE_CONTROL, "public, max-age=300")], Json(v)).into_response(),
        Err(e) => failure(e, "jwks"),
    }
}
