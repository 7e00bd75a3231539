//! The service's entry points, what the binary calls: `run` (wires configuration, migrations, the pipeline and
//! the HTTP server under one cancellation token), `migrate`, and `device issue`. The listener and the
//! cancellation token are arguments, so tests bind port 0, learn the real address, and stop it at will.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::health::Health;
use crate::http::{self, AppState};
use crate::locks::{self, Holder};
use crate::metrics::{Metrics, LOCK_MIGRATE};
use crate::pipeline;
use crate::provision::api::DeviceApi;
use crate::provision::{IssueRequest, IssuedCredentials, ProvisionError, Provisioner};
use crate::schema::MigrateError;
use crate::{pg, schema};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("HTTP listener: {0}")]
    Listener(#[from] std::io::Error),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// A migration failed or the business schema is missing: retrying would not help.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// Connects and applies migrations; returns the versions applied now. Waits at most
/// `postgres.migrate_lock_timeout` for the migration lock, logging who holds it meanwhile.
pub async fn migrate_once(cfg: &Config) -> Result<Vec<i32>, MigrateError> {
    migrate_reporting(cfg, &mut |_| {}).await
}

/// [`migrate_once`], calling `waiting` with the holders of the migration lock while it waits for it.
async fn migrate_reporting(
    cfg: &Config,
    waiting: &mut (dyn FnMut(&[Holder]) + Send),
) -> Result<Vec<i32>, MigrateError> {
    let mut s = pg::connect(&cfg.postgres_url(), cfg.postgres.connect_timeout, locks::MIGRATE_APP).await?;
    schema::migrate(
        &mut s.client,
        &cfg.postgres.schema,
        cfg.postgres.migrate_lock_timeout,
        waiting,
    )
    .await
}

/// `delta-bridge device issue`: the same code path as `POST /api/v1/devices`.
pub async fn issue_device(cfg: &Config, req: &IssueRequest) -> Result<IssuedCredentials, ServiceError> {
    let metrics = Arc::new(Metrics::new()?);
    let provisioner = Provisioner::from_config(cfg, metrics)?;
    Ok(provisioner.issue(req).await?)
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
/// database is unreachable (a missing table or a failed migration is final and returned). Cancelling
/// `cancel` at any point, during those retries included, stops whatever was started; [`Running::wait`] then
/// returns once it has.
pub async fn start(
    cfg: Config,
    migrate: bool,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<Running, ServiceError> {
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
            // While the migration waits for its lock, /metrics shows whether a session that is not another
            // bridge's migration holds it.
            let squatter = metrics.lock_squatter.with_label_values(&[LOCK_MIGRATE]);
            let mut waiting = |holders: &[Holder]| {
                squatter.set(i64::from(holders.iter().any(Holder::migrate_squat)));
            };
            let attempt = tokio::select! {
                r = migrate_reporting(&cfg, &mut waiting) => r,
                _ = cancel.cancelled() => {
                    tracker.close();
                    return Ok(Running { http_addr, tracker });
                }
            };
            match attempt {
                Ok(v) if v.is_empty() => break,
                Ok(v) => {
                    tracing::info!(versions = ?v, "database objects installed");
                    break;
                }
                Err(e) if !e.is_transient() => {
                    cancel.cancel();
                    tracker.close();
                    tracker.wait().await;
                    return Err(e.into());
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot migrate yet");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => {
                            tracker.close();
                            return Ok(Running { http_addr, tracker });
                        }
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
