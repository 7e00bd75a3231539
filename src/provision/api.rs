//! The provisioning HTTP API (docs/api.md): `POST /api/v1/devices`, `GET`/`DELETE
//! /api/v1/devices/{device_id}` behind the admin bearer token, and the public `GET /.well-known/jwks.json`.
//! Owns status codes and the JSON error shape; never answers with a database or broker message (those are
//! logged), and refuses every device call when no admin token is configured rather than run open. Failed
//! authentication is limited per client address ([`super::throttle`]). `POST /api/v1/broker/authn` is EMQX's
//! HTTP authenticator asking about a password ([`super::authn`]), behind its own secret (`broker.authn_token`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::task::TaskTracker;

use super::broker::BrokerError;
use super::throttle::{AuthThrottle, Verdict};
use super::{IssueRequest, ProvisionError, Provisioner};
use crate::config::Secret;

/// What the device routes need: the admin token, the provisioner, the record of failed authentication, and
/// the device calls in progress.
pub(crate) struct DeviceApi {
    pub admin_token: Option<Secret>,
    /// The secret EMQX's HTTP authenticator sends; None: the authn endpoint answers 503.
    pub authn_token: Option<Secret>,
    pub provisioner: Arc<Provisioner>,
    pub throttle: AuthThrottle,
    /// Issue and revoke run in tasks of their own, tracked here, not in the connection's: a connection dropped
    /// at shutdown (or by its client) must not cut a call between the broker's change and the database's
    /// commit (the broker would hold a credential nobody received, or the record name one the broker no
    /// longer has). The server waits for them when it stops ([`crate::http::serve`]).
    pub calls: TaskTracker,
}

/// `call` run to its end whatever becomes of the request that started it; None if its task failed (a panic,
/// or the runtime stopping under it), logged.
async fn detached<T: Send + 'static>(
    api: &DeviceApi,
    what: &str,
    call: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    match api.calls.spawn(call).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "{what}: the call's task failed");
            None
        }
    }
}

fn task_failed() -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

/// The device routes with their own state, ready to merge into the service's router.
pub(crate) fn routes(api: Arc<DeviceApi>) -> Router {
    Router::new()
        .route("/api/v1/devices", post(issue))
        .route("/api/v1/devices/{device_id}", get(show).delete(revoke))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/api/v1/broker/authn", post(broker_authn))
        .with_state(api)
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// The token of an `Authorization: Bearer <token>` header; the scheme in any case (RFC 7235).
pub(crate) fn bearer_token(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim_start_matches(' '))
}

/// `given` equals `expected`, compared in constant time through hashes of equal length (neither the content nor
/// the length of the secret leaks through timing); an empty `given` never matches.
pub(crate) fn secret_matches(given: &str, expected: &Secret) -> bool {
    let same: bool = Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.expose().as_bytes()))
        .into();
    same && !given.is_empty()
}

/// Checks `Authorization: Bearer <admin_token>` in constant time (hashes of equal length are compared, so
/// neither the content nor the length of the token leaks through timing), unless the client's address has
/// failed too often lately: then 429 without comparing.
pub(crate) fn authorize(api: &DeviceApi, client: SocketAddr, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(expected) = &api.admin_token else {
        return Err(Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "device API disabled: http.admin_token is not configured",
        )));
    };
    let now = Instant::now();
    let given = bearer_token(headers);
    let compare = || {
        let ok: bool = Sha256::digest(given.as_bytes())
            .ct_eq(&Sha256::digest(expected.expose().as_bytes()))
            .into();
        ok && !given.is_empty()
    };
    match api.throttle.check(client.ip(), now, compare) {
        Verdict::Passed => Ok(()),
        Verdict::Limited(wait) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many failed authentications from this address; retry in {secs}s"),
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            Err(Box::new(r))
        }
        Verdict::Failed { last } => {
            if last {
                tracing::warn!(client = %client.ip(), "failed admin authentications: answering this address 429 for a while");
            }
            let mut r = error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Err(Box::new(r))
        }
    }
}

/// `application/json`, or a JSON type such as `application/merge-patch+json`, with or without parameters.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
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

async fn issue(
    State(api): State<Arc<DeviceApi>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&api, client, &headers) {
        return *r;
    }
    if !is_json(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be sent with Content-Type: application/json",
        );
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
    let provisioner = api.provisioner.clone();
    match detached(&api, "issue", async move { provisioner.issue(&req).await }).await {
        Some(Ok(c)) => (StatusCode::CREATED, Json(c)).into_response(),
        Some(Err(e)) => failure(e, "issue"),
        None => task_failed(),
    }
}

async fn show(
    State(api): State<Arc<DeviceApi>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(device_id): Path<String>,
) -> Response {
    if let Err(r) = authorize(&api, client, &headers) {
        return *r;
    }
    match api.provisioner.get(&device_id).await {
        Ok(v) => (StatusCode::OK, Json(v)).into_response(),
        Err(e) => failure(e, "get"),
    }
}

async fn revoke(
    State(api): State<Arc<DeviceApi>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(device_id): Path<String>,
) -> Response {
    if let Err(r) = authorize(&api, client, &headers) {
        return *r;
    }
    let provisioner = api.provisioner.clone();
    match detached(&api, "revoke", async move { provisioner.revoke(&device_id).await }).await {
        Some(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Some(Err(e)) => failure(e, "revoke"),
        None => task_failed(),
    }
}

async fn jwks(State(api): State<Arc<DeviceApi>>) -> Response {
    match api.provisioner.jwks() {
        Ok(v) => ([(header::CACHE_CONTROL, "public, max-age=300")], Json(v)).into_response(),
        Err(e) => failure(e, "jwks"),
    }
}

/// What EMQX's HTTP authenticator sends (the body template of docs/deployment.md).
#[derive(serde::Deserialize)]
struct AuthnRequest {
    clientid: String,
    username: String,
    password: String,
}

/// `POST /api/v1/broker/authn`: 200 `{"result": "deny" | "ignore"}` (never 204, which EMQX takes as allow),
/// 401 for a wrong secret, 400 for a body that is not the documented one, 503 when unconfigured or the device
/// store cannot be read. EMQX treats every status but 200 and 204 as ignore (docs/api.md). No throttle: EMQX is
/// the only caller, and a throttle by address would lock out the broker itself.
async fn broker_authn(State(api): State<Arc<DeviceApi>>, headers: HeaderMap, body: Bytes) -> Response {
    let count = |result: &str| api.provisioner.count_authn(result);
    let Some(expected) = &api.authn_token else {
        count("unavailable");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker authentication disabled: broker.authn_token is not configured",
        );
    };
    if !secret_matches(bearer_token(&headers), expected) {
        count("unauthorized");
        tracing::warn!("broker authn call with a missing or wrong secret (check broker.authn_token and EMQX's HTTP authenticator header)");
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let req: AuthnRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "body must be {\"clientid\", \"username\", \"password\"} (strings)",
            )
        }
    };
    match api.provisioner.authn(&req.clientid, &req.username, &req.password).await {
        Ok(verdict) => {
            count(verdict.result());
            if let super::authn::Verdict::Deny(why) = verdict {
                tracing::info!(clientid = %req.clientid, reason = why, "broker authn: token refused");
            }
            (StatusCode::OK, Json(json!({"result": verdict.result()}))).into_response()
        }
        Err(e) => {
            count("unavailable");
            tracing::error!(error = %e, "broker authn: device store unavailable; EMQX falls back to the JWT check and bans");
            error(StatusCode::SERVICE_UNAVAILABLE, "device store unavailable")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).expect("header value"));
        h
    }

    #[test]
    fn the_bearer_scheme_in_any_case_the_token_exactly() {
        for (value, token) in [
            ("Bearer abc", "abc"),
            ("bearer abc", "abc"),
            ("BEARER abc", "abc"),
            ("Bearer   abc", "abc"),
            ("Bearer ABC", "ABC"),
            ("Basic abc", ""),
            ("Bearerabc", ""),
            ("Bearer", ""),
            ("abc", ""),
        ] {
            assert_eq!(bearer_token(&headers(header::AUTHORIZATION, value)), token, "{value:?}");
        }
        assert_eq!(bearer_token(&HeaderMap::new()), "");
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/merge-patch+json",
        ] {
            assert!(is_json(&headers(header::CONTENT_TYPE, ok)), "{ok}");
        }
        for no in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonp",
            "text/json",
            "",
        ] {
            assert!(!is_json(&headers(header::CONTENT_TYPE, no)), "{no:?}");
        }
        assert!(!is_json(&HeaderMap::new()));
    }
}
