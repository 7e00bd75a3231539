//! `delta-bridge run`: wires configuration, migrations, the pipeline and the HTTP server under one
//! cancellation token. The listener is an argument so tests can bind port 0 and learn the real address.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::health::Health;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::pipeline;
use crate::provision::api::DeviceApi;
use crate::provision::Provisioner;
use crate::{pg, schema};

/// Connects and applies migrations; returns the versions applied now.
pub async fn migrate_once(cfg: &Config) -> anyhow::Result<Vec<i32>> {
    let mut s = pg::connect(
        &cfg.postgres_url(),
        cfg.postgres.connect_timeout,
        "delta-bridge-migrate",
    )
    .await?;
    Ok(schema::migrate(&mut s.client, &cfg.postgres.schema).await?)
}

/// A running bridge: its real HTTP address, and the handle to wait for it.
pub struct Running {
    pub http_addr: SocketAddr,
    tracker: TaskTracker,
}

impl Running {
    pub async fn wait(self) {
        self.tracker.wait().await;
    }
}

/// Starts everything. With `migrate`, installs/upgrades the database objects first, retrying while the
/// database is unreachable (a missing table or a failed migration is final and returned).
pub async fn start(
    cfg: Config,
    migrate: bool,
    listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::new()?);
    let health = Arc::new(Health::default());
    let http_addr = listener.local_addr()?;
    let tracker = TaskTracker::new();
    let provisioner = Arc::new(Provisioner::from_config(&cfg, metrics.clone())?);
    let state = AppState {
        health: health.clone(),
        metrics: metrics.clone(),
        devices: Arc::new(DeviceApi {
            admin_token: cfg.http.admin_token.clone(),
            provisioner: provisioner.clone(),
        }),
    };
    {
        let cancel = cancel.clone();
        tracker.spawn(async move {
            if let Err(e) = http::serve(listener, state, cancel).await {
                tracing::error!(error = %e, "http server failed");
            }
        });
    }
    if migrate {
        let mut backoff = Backoff::new();
        loop {
            match migrate_once(&cfg).await {
                Ok(v) if v.is_empty() => break,
                Ok(v) => {
                    tracing::info!(versions = ?v, "database objects installed");
                    break;
                }
                Err(e)
                    if e.downcast_ref::<schema::MigrateError>()
                        .is_some_and(|m| !matches!(m, schema::MigrateError::Pg(_))) =>
                {
                    cancel.cancel();
                    tracker.close();
                    tracker.wait().await;
                    return Err(e);
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot migrate yet");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => { tracker.close(); tracker.wait().await; return Ok(Running { http_addr, tracker }); }
                    }
                }
            }
        }
    }
    if provisioner.needs_expiry_sweep() && provisioner.has_keys() {
        tracker.spawn(provisioner.run_expiry_sweep(cancel.clone()));
    }
    tracker.spawn(pipeline::run(cfg, metrics, health, cancel));
    tracker.close();
    Ok(Running { http_addr, tracker })
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
