//! The service's entry points, what the binary calls: `run` (wires configuration, migrations, the pipeline and
//! the HTTP server under one cancellation token), `migrate`, `uninstall`, and `device issue`. The listener and the
//! cancellation token are arguments, so tests bind port 0, learn the real address, and stop it at will.
//!
//! Every task `run` starts is essential and supervised: if one ends (panics, fails, or returns) while the bridge
//! is not stopping, the supervisor stops the others and [`Running::wait`] returns [`TaskDied`], which the
//! binary turns into exit code 1. The process then exits within 10 s, and with it the leader's PostgreSQL
//! session and so the leader lock: a replica never stays leader without a pipeline or a publisher.

use std::any::Any;
use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::capture::outbox::LEADER_LOCK;
use crate::config::{BrokerAddress, Config, ConfigError, RootCert, SecretFiles};
use crate::health::Health;
use crate::http::{self, AppState};
use crate::locks::{self, Holder};
use crate::metrics::{Metrics, LOCK_MIGRATE};
use crate::pipeline;
use crate::provision::api::DeviceApi;
use crate::provision::credentials::SigningKeys;
use crate::provision::{IssueRequest, IssuedCredentials, ProvisionError, Provisioner};
use crate::schema::{Limits, MigrateError, Migrated, UninstallOptions, Uninstalled};
use crate::tls::{self, Roots, TlsError, Verify};
use crate::{pg, schema};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("HTTP listener: {0}")]
    Listener(#[from] std::io::Error),
    /// The https listener's certificate or key cannot be used.
    #[error("https listener (http.tls_cert_file, http.tls_key_file): {0}")]
    HttpTls(String),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// A migration failed or the business schema is missing: retrying would not help.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// Connects, applies migrations and attaches what is missing of capture; says what it did. Waits at most
/// `postgres.migrate_lock_timeout` for the migration lock, logging who holds it meanwhile; each statement on
/// a business table waits at most `postgres.ddl_lock_timeout` for its lock, and is tried again until
/// `postgres.ddl_deadline`.
pub async fn migrate_once(cfg: &Config) -> Result<Migrated, MigrateError> {
    migrate_reporting(cfg, &mut |_| {}).await
}

fn limits(cfg: &Config) -> Limits {
    Limits {
        migrate_lock: cfg.postgres.migrate_lock_timeout,
        ddl_lock: cfg.postgres.ddl_lock_timeout,
        ddl_deadline: cfg.postgres.ddl_deadline,
    }
}

/// [`migrate_once`], calling `waiting` with the holders of the migration lock while it waits for it.
async fn migrate_reporting(
    cfg: &Config,
    waiting: &mut (dyn FnMut(&[Holder]) + Send),
) -> Result<Migrated, MigrateError> {
    let mut s = pg::connect(&cfg.postgres_url(), cfg.postgres.connect_timeout, locks::MIGRATE_APP).await?;
    schema::migrate(&mut s.client, &cfg.postgres.schema, limits(cfg), waiting).await
}

/// For `run --no-migrate`: refuses a database migrated by a newer version.
async fn check_schema_version(cfg: &Config) -> Result<Migrated, MigrateError> {
    let s = pg::connect(&cfg.postgres_url(), cfg.postgres.connect_timeout, locks::MIGRATE_APP).await?;
    schema::check_version(&s.client).await?;
    Ok(Migrated::default())
}

/// `delta-bridge uninstall`: removes the capture triggers from the business tables and, with `drop_schema`,
/// the schema `delta_bridge`; `say` is told what is about to be dropped before it is. Refuses while a replica
/// holds the leader lock, unless `force`. Idempotent.
pub async fn uninstall(
    cfg: &Config,
    drop_schema: bool,
    force: bool,
    say: &mut (dyn FnMut(&str) + Send),
) -> Result<Uninstalled, MigrateError> {
    let mut s = pg::connect(&cfg.postgres_url(), cfg.postgres.connect_timeout, locks::UNINSTALL_APP).await?;
    let opts = UninstallOptions { drop_schema, force };
    schema::uninstall(&mut s.client, limits(cfg), LEADER_LOCK, opts, &mut |_| {}, say).await
}

/// `delta-bridge device issue`: the same code path as `POST /api/v1/devices`.
pub async fn issue_device(cfg: &Config, req: &IssueRequest) -> Result<IssuedCredentials, ServiceError> {
    let metrics = Arc::new(Metrics::new()?);
    let provisioner = Provisioner::from_config(cfg, metrics)?;
    Ok(provisioner.issue(req).await?)
}

/// An essential task of the bridge ended while the bridge was not stopping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {task} task died: {why}")]
pub struct TaskDied {
    /// `pipeline`, `publisher`, `http` or `device-expiry`.
    pub task: &'static str,
    pub why: String,
}

/// After a task died, how long the others get to stop before [`Running::wait`] returns anyway. Short: once a
/// task is dead nothing the others finish is recorded (the publisher's PUBACKs no longer reach the outbox, the
/// pipeline's reads no longer reach the broker), so a long drain only delays the standby's takeover, and the
/// process must be gone within 10 s of the death even on a loaded machine.
const STOP_AFTER_DEATH: Duration = Duration::from_secs(3);

/// A running bridge: its real HTTP address, and the handle to wait for it.
pub struct Running {
    pub http_addr: SocketAddr,
    tracker: TaskTracker,
    supervisor: Supervisor,
}

impl Running {
    /// Waits until every task has ended. Ok after a clean shutdown (the cancellation token was cancelled);
    /// Err when a task died, once the others have stopped (at most 3 s later).
    pub async fn wait(self) -> Result<(), TaskDied> {
        tokio::select! {
            _ = self.tracker.wait() => {}
            _ = async {
                self.supervisor.death.cancelled().await;
                tokio::time::sleep(self.supervisor.stop_after).await;
            } => tracing::warn!("tasks still running {:?} after a task died; not waiting for them", self.supervisor.stop_after),
        }
        match self
            .supervisor
            .died
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            Some((d, _)) => Err(d),
            None => Ok(()),
        }
    }
}

/// Spawns the essential tasks and watches their JoinHandles: the first that ends while `cancel` is not
/// cancelled is recorded, and `cancel` is cancelled so that the others stop.
#[derive(Clone)]
struct Supervisor {
    cancel: CancellationToken,
    /// Cancelled when a task died.
    death: CancellationToken,
    /// The death reported by [`Running::wait`], with its rank.
    died: Arc<Mutex<Option<(TaskDied, Rank)>>>,
    /// [`STOP_AFTER_DEATH`] (shorter in tests).
    stop_after: Duration,
}

impl Supervisor {
    fn new(cancel: CancellationToken) -> Supervisor {
        Supervisor {
            cancel,
            death: CancellationToken::new(),
            died: Arc::default(),
            stop_after: STOP_AFTER_DEATH,
        }
    }

    fn spawn<F, E>(&self, tracker: &TaskTracker, task: &'static str, fut: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let handle = tokio::spawn(fut);
        let this = self.clone();
        tracker.spawn(async move {
            let (why, rank) = match handle.await {
                Ok(Ok(())) if this.cancel.is_cancelled() => return,
                Ok(Ok(())) => ("it returned while the bridge was running".to_string(), Rank::Returned),
                Ok(Err(e)) => (e.to_string(), Rank::Failed),
                Err(e) => match e.try_into_panic() {
                    Ok(payload) => (format!("panicked: {}", panic_message(payload.as_ref())), Rank::Panicked),
                    Err(e) => (e.to_string(), Rank::Panicked),
                },
            };
            this.died(TaskDied { task, why }, rank);
        });
    }

    /// Records the first death, unless a later one ranks higher: when one task dies the others that depend on
    /// it follow (the publisher returns once the pipeline that fed it is gone; the pipeline fails once the
    /// publisher is), and the report should name the cause.
    fn died(&self, death: TaskDied, rank: Rank) {
        tracing::error!(task = death.task, why = %death.why, "an essential task died; stopping the bridge, which exits 1");
        let mut died = self.died.lock().unwrap_or_else(PoisonError::into_inner);
        if died.as_ref().is_none_or(|(_, r)| *r < rank) {
            *died = Some((death, rank));
        }
        drop(died);
        self.death.cancel();
        self.cancel.cancel();
    }
}

/// How a task died, from the most likely consequence of another's death to the most likely cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    Returned,
    Failed,
    Panicked,
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// For tasks that end only when cancelled: returning at all is what the supervisor looks for.
async fn infallible(fut: impl Future<Output = ()>) -> Result<(), Infallible> {
    fut.await;
    Ok(())
}

/// Starts everything. With `migrate`, installs/upgrades the database objects first, retrying while the
/// database is unreachable (a missing table or a failed migration is final and returned); without, checks
/// that the database was not migrated by a newer version (final too). Cancelling
/// `cancel` at any point, during those retries included, stops whatever was started; [`Running::wait`] then
/// returns once it has.
pub async fn start(
    cfg: Config,
    migrate: bool,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<Running, ServiceError> {
    if let Some(why) = cfg.mqtt.shared_client_id_risk() {
        tracing::warn!(
            client_id = %cfg.mqtt.client_id,
            "{why}. Two replicas with one MQTT client id take each other's broker session over, back and forth, \
             and neither publishes for long: give each replica its own (the default \
             delta-bridge-{{hostname}}-{{pid}} does)"
        );
    }
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::new()?);
    metrics
        .change_log_reclaim_age
        .set((cfg.catchup.retention + cfg.catchup.partition_span).as_secs_f64());
    let health = Arc::new(Health::default());
    let http_addr = listener.local_addr()?;
    let tracker = TaskTracker::new();
    let supervisor = Supervisor::new(cancel.clone());
    let provisioner = Arc::new(Provisioner::from_config(&cfg, metrics.clone())?);
    let https = match (&cfg.http.tls_cert_file, &cfg.http.tls_key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(
            crate::tls::server_config(cert, key).map_err(|e| ServiceError::HttpTls(e.to_string()))?,
        )),
        _ => None,
    };
    let devices = Arc::new(DeviceApi {
        admin_token: cfg.http.admin_token.clone(),
        authn_token: cfg.broker.authn_token.clone(),
        provisioner: provisioner.clone(),
        throttle: Default::default(),
        calls: TaskTracker::new(),
    });
    let state = AppState {
        health: health.clone(),
        metrics: metrics.clone(),
        catchup: Arc::new(crate::catchup::CatchupApi::new(&cfg, devices.clone(), metrics.clone())),
        devices,
    };
    supervisor.spawn(
        &tracker,
        "http",
        http::serve(listener, state, cfg.http.max_connections, https, cancel.clone()),
    );
    {
        let mut backoff = Backoff::new();
        loop {
            // While the migration waits for its lock, /metrics shows whether a session that is not another
            // bridge's migration holds it.
            let squatter = metrics.lock_squatter.with_label_values(&[LOCK_MIGRATE]);
            let mut waiting = |holders: &[Holder]| {
                squatter.set(i64::from(holders.iter().any(Holder::migrate_squat)));
            };
            let prepare = async {
                if migrate {
                    migrate_reporting(&cfg, &mut waiting).await
                } else {
                    check_schema_version(&cfg).await
                }
            };
            let attempt = tokio::select! {
                r = prepare => r,
                _ = cancel.cancelled() => {
                    tracker.close();
                    return Ok(Running { http_addr, tracker, supervisor });
                }
            };
            squatter.set(0); // not waiting any more, however the attempt ended
            match attempt {
                Ok(v) if v.is_empty() => break,
                Ok(v) => {
                    tracing::info!(versions = ?v.applied, attached = ?v.attached, "database objects installed");
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
                            return Ok(Running { http_addr, tracker, supervisor });
                        }
                    }
                }
            }
        }
    }
    if provisioner.needs_expiry_sweep() && provisioner.has_keys() {
        supervisor.spawn(
            &tracker,
            "device-expiry",
            infallible(provisioner.run_expiry_sweep(cancel.clone())),
        );
    }
    let (pipeline, publisher) = pipeline::tasks(cfg, metrics, health, cancel);
    supervisor.spawn(&tracker, "publisher", infallible(publisher));
    supervisor.spawn(&tracker, "pipeline", pipeline);
    tracker.close();
    Ok(Running {
        http_addr,
        tracker,
        supervisor,
    })
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

/// What start-up reads from the files the configuration names, before it connects anywhere: the device-signing
/// key (`credentials.signing_key_file`), the CA bundles of TLS peers (`mqtt.ca_file` for an `mqtts://` URL,
/// `broker.api_ca_file` for an `https://` REST API, the `sslrootcert` of `postgres.url`) and the bridge's own
/// certificate and key (`http.tls_cert_file`, `http.tls_key_file`). `run` and `check-config` both call it, so
/// that a configuration `check-config` passes is not refused at start-up for its files. With
/// [`SecretFiles::FormOnly`] (a config checked outside the pod) no file is read: their paths must be non-empty.
/// Each error names its key and the reason.
pub fn check_files(cfg: &Config, files: SecretFiles) -> Result<(), ConfigError> {
    let bad = |key: &str, reason: String| ConfigError::Invalid {
        key: key.to_string(),
        reason,
    };
    let named = [
        (
            "credentials.signing_key_file",
            cfg.credentials.signing_key_file.as_deref(),
        ),
        ("mqtt.ca_file", cfg.mqtt.ca_file.as_deref()),
        ("broker.api_ca_file", cfg.broker.api_ca_file.as_deref()),
        ("http.tls_cert_file", cfg.http.tls_cert_file.as_deref()),
        ("http.tls_key_file", cfg.http.tls_key_file.as_deref()),
    ];
    for (key, path) in named {
        if path.is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(bad(key, "is empty (a file path)".into()));
        }
    }
    if files == SecretFiles::FormOnly {
        return Ok(());
    }
    if let Some(path) = &cfg.credentials.signing_key_file {
        SigningKeys::load(path).map_err(|e| bad("credentials.signing_key_file", e.to_string()))?;
    }
    let mqtt = BrokerAddress::parse(&cfg.mqtt.url).map_err(|e| bad("mqtt.url", e))?;
    if mqtt.tls {
        let key = if cfg.mqtt.ca_file.is_some() {
            "mqtt.ca_file"
        } else {
            "mqtt.url"
        };
        tls::client_config(&Roots::from_option(cfg.mqtt.ca_file.as_deref()), Verify::Full)
            .map_err(|e| bad(key, e.to_string()))?;
    }
    // The REST API client (EMQX: its CA bundle for https://), exactly as start-up builds it.
    if let Err(e) = crate::provision::broker::from_config(cfg) {
        let text = match e {
            crate::provision::broker::BrokerError::Config(why) => why,
            other => other.to_string(),
        };
        return Err(match text.split_once(": ") {
            Some((key, reason)) if key.starts_with("broker.") && !key.contains(' ') => bad(key, reason.into()),
            _ => bad("broker.kind", text),
        });
    }
    if let (Some(cert), Some(key)) = (&cfg.http.tls_cert_file, &cfg.http.tls_key_file) {
        tls::server_config(cert, key).map_err(|e| match e {
            TlsError::KeyFile { .. } => bad("http.tls_key_file", e.to_string()),
            _ => bad("http.tls_cert_file", e.to_string()),
        })?;
    }
    let (_, pg_tls) = crate::config::split_pg_tls(&cfg.postgres.url).map_err(|e| bad("postgres.url", e))?;
    if let Some(RootCert::File(path)) = &pg_tls.roots {
        tls::client_config(&Roots::File(path.clone()), Verify::Full)
            .map_err(|e| bad("postgres.url", format!("sslrootcert: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(supervisor: Supervisor, tracker: TaskTracker) -> Running {
        tracker.close();
        Running {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tracker,
            supervisor,
        }
    }

    /// A task that runs until cancelled, like the bridge's own.
    async fn until(cancel: CancellationToken) -> Result<(), Infallible> {
        cancel.cancelled().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_clean_shutdown_is_ok() {
        let cancel = CancellationToken::new();
        let (sup, tracker) = (Supervisor::new(cancel.clone()), TaskTracker::new());
        sup.spawn(&tracker, "a", until(cancel.clone()));
        sup.spawn(&tracker, "b", until(cancel.clone()));
        cancel.cancel();
        assert_eq!(running(sup, tracker).wait().await, Ok(()));
    }

    #[tokio::test]
    async fn a_panicking_task_stops_the_others_and_is_reported() {
        let cancel = CancellationToken::new();
        let (sup, tracker) = (Supervisor::new(cancel.clone()), TaskTracker::new());
        sup.spawn(&tracker, "steady", until(cancel.clone()));
        sup.spawn(&tracker, "doomed", async {
            tokio::task::yield_now().await;
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<(), Infallible>(())
        });
        let r = tokio::time::timeout(Duration::from_secs(5), running(sup, tracker).wait())
            .await
            .expect("wait returns");
        assert_eq!(
            r,
            Err(TaskDied {
                task: "doomed",
                why: "panicked: boom".into()
            })
        );
        assert!(cancel.is_cancelled(), "the others were told to stop");
    }

    #[tokio::test]
    async fn a_failure_is_reported_rather_than_a_return_it_caused() {
        let sup = Supervisor::new(CancellationToken::new());
        let died = |task, why: &str| TaskDied { task, why: why.into() };
        sup.died(died("publisher", "returned"), Rank::Returned);
        sup.died(died("pipeline", "the publisher is gone"), Rank::Failed);
        sup.died(died("publisher", "panicked: boom"), Rank::Panicked);
        sup.died(died("http", "panicked: later"), Rank::Panicked);
        sup.died(died("other", "returned"), Rank::Returned);
        let recorded = sup.died.lock().expect("lock").clone();
        assert_eq!(recorded, Some((died("publisher", "panicked: boom"), Rank::Panicked)));
    }

    #[tokio::test]
    async fn a_task_that_fails_or_returns_while_running_died() {
        let cancel = CancellationToken::new();
        let (sup, tracker) = (Supervisor::new(cancel.clone()), TaskTracker::new());
        sup.spawn(&tracker, "failing", async { Err::<(), _>("no more publisher") });
        let r = running(sup, tracker).wait().await;
        assert_eq!(
            r.map_err(|d| d.to_string()),
            Err("the failing task died: no more publisher".into())
        );

        let cancel = CancellationToken::new();
        let (sup, tracker) = (Supervisor::new(cancel.clone()), TaskTracker::new());
        sup.spawn(&tracker, "quitter", infallible(async {}));
        let r = running(sup, tracker).wait().await;
        assert_eq!(r.map_err(|d| d.task), Err("quitter"));
        assert!(cancel.is_cancelled());
    }

    #[tokio::test]
    async fn wait_gives_up_on_tasks_that_do_not_stop_after_a_death() {
        let cancel = CancellationToken::new();
        let sup = Supervisor {
            stop_after: Duration::from_millis(50),
            ..Supervisor::new(cancel.clone())
        };
        let tracker = TaskTracker::new();
        sup.spawn(&tracker, "stubborn", infallible(std::future::pending::<()>()));
        sup.spawn(&tracker, "quitter", infallible(async {}));
        let r = running(sup, tracker).wait().await;
        assert_eq!(r.map_err(|d| d.task), Err("quitter"));
    }
}
