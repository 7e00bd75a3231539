//! The HTTP surface: /healthz, /readyz, /metrics, and the device API's routes (their handlers live with
//! provisioning). Serves on the listener it is given, so tests can bind port 0, until the cancellation
//! token fires. Never returns a database or broker error text to a client.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::provision::api::DeviceApi;

#[derive(Clone)]
pub(crate) struct AppState {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub devices: Arc<DeviceApi>,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state.clone())
        .merge(crate::provision::api::routes(state.devices))
}

pub(crate) async fn serve(listener: TcpListener, state: AppState, cancel: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
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
    (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))).into_response()
}
