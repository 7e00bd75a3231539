//! The HTTP surface: /healthz, /readyz, /metrics, the device API's routes (their handlers live with
//! provisioning) and the catch-up API's (in `catchup`). Serves on the listener it is given, so tests can bind port 0, until the cancellation
//! token fires. Never returns a database or broker error text to a client.
//!
//! - [`server`]: connections (TLS when configured, header timeout, connection cap, shutdown deadline).
//! - [`limits`]: the request body's size and time limits, and JSON for every error answer.
//! - [`wire`]: the connection's bytes: a client that does not read its answers is let go, and hyper's own
//!   error answers (to requests it cannot parse) are JSON too.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub(crate) mod limits;
pub(crate) mod server;
pub(crate) mod wire;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::provision::api::DeviceApi;

#[derive(Clone)]
pub(crate) struct AppState {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub devices: Arc<DeviceApi>,
    pub catchup: Arc<crate::catchup::CatchupApi>,
}

/// Every route, behind the body limits, with every error answer in JSON (the layers wrap the routes and the
/// fallback alike: the last added runs first).
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::openapi::routes())
        .fallback(not_found)
        .with_state(state.clone())
        .merge(crate::provision::api::routes(state.devices))
        .merge(crate::catchup::routes(state.catchup))
        .layer(middleware::from_fn(limits::bounded_body))
        .layer(middleware::map_response(limits::json_errors))
}

/// After the connections are gone at shutdown, how long device calls still running get to finish (they run
/// in tasks of their own, [`DeviceApi::calls`]). With [`server::SHUTDOWN_GRACE`] and its second, the HTTP
/// side is done within 12 s of the signal, inside the 15 s the process has.
const DEVICE_CALL_GRACE: Duration = Duration::from_secs(6);

/// Serves the routes on `listener` with at most `max_connections` connections, over TLS when `tls` is given
/// (https only: a plain request gets no answer), until `cancel` fires; returns within a few seconds of that
/// ([`server::SHUTDOWN_GRACE`], then [`DEVICE_CALL_GRACE`] for device calls whose connection is gone).
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    max_connections: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let metrics = state.metrics.clone();
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let calls = state.devices.calls.clone();
    let served = server::serve(listener, router(state), max_connections, metrics, tls, cancel).await;
    calls.close();
    if tokio::time::timeout(DEVICE_CALL_GRACE, calls.wait()).await.is_err() {
        tracing::warn!(
            running = calls.len(),
            "device calls still running at shutdown; the broker and the device records may disagree for them"
        );
    }
    served
}

async fn healthz() -> Response {
    (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    let pg = s.health.postgres.load(std::sync::atomic::Ordering::SeqCst);
    let mqtt = s.health.mqtt.load(std::sync::atomic::Ordering::SeqCst);
    let code = if s.health.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"postgres": pg, "mqtt": mqtt}))).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    limits::error(StatusCode::NOT_FOUND, "not found")
}
