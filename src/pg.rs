//! PostgreSQL sessions: connecting (plain or TLS), and delivering NOTIFY wake-ups from the connection task.
//! Owns nothing but the socket; what runs on a session is decided by the caller.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::poll_fn;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// Bounds each statement run through [`timed`] (the pipeline's reads, deletes and lock probes, the device
/// store's queries): a database that stops answering is a lost database. Migrations and the provisioning
/// transactions as a whole are not bounded by it.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Without tokio-postgres's reason, which can quote a character of the string (a password's).
    #[error("invalid postgres.url")]
    Url,
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("PostgreSQL connection attempt timed out")]
    ConnectTimeout,
    #[error("PostgreSQL query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    #[error("PostgreSQL connection closed")]
    Closed,
    #[error("TLS set-up failed: {0}")]
    Tls(String),
    #[error("unexpected answer from PostgreSQL: {0}")]
    Protocol(String),
}

/// One database session with its notification feed.
pub struct Session {
    pub client: Client,
    /// The payload of each NOTIFY received (empty: "look"; `replay`: rows were put back below the cursor).
    pub notifications: mpsc::UnboundedReceiver<String>,
    /// Resolves when the connection task ends (socket closed, server restarted).
    pub closed: oneshot::Receiver<()>,
}

pub async fn connect(url: &str, connect_timeout: Duration, app: &str) -> Result<Session, PgError> {
    let mut cfg: tokio_postgres::Config = url.parse().map_err(|_| PgError::Url)?;
    cfg.application_name(app);
    cfg.connect_timeout(connect_timeout);
    // Notice a dead peer (no RST) in seconds, not the kernel's default two hours.
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(5));
    cfg.keepalives_interval(Duration::from_secs(2));
    cfg.keepalives_retries(3);
    let (tx, rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = oneshot::channel();
    let client = match cfg.get_ssl_mode() {
        SslMode::Require => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config()?);
            let (client, conn) = timed_connect(cfg.connect(tls), connect_timeout).await?;
            spawn_driver(conn, tx, closed_tx);
            client
        }
        // disable and prefer: plain TCP (prefer without verification would give a false sense of security).
        _ => {
            let (client, conn) = timed_connect(cfg.connect(NoTls), connect_timeout).await?;
            spawn_driver(conn, tx, closed_tx);
            client
        }
    };
    Ok(Session {
        client,
        notifications: rx,
        closed: closed_rx,
    })
}

async fn timed_connect<F, T>(fut: F, limit: Duration) -> Result<T, PgError>
where
    F: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(PgError::Connect),
        Err(_) => Err(PgError::ConnectTimeout),
    }
}

fn spawn_driver<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: mpsc::UnboundedSender<String>,
    closed: oneshot::Sender<()>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut messages = poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().to_string());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "postgres connection ended");
                    break;
                }
            }
        }
        let _ = closed.send(());
    });
}

fn tls_config() -> Result<rustls::ClientConfig, PgError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Runs a query future under [`QUERY_TIMEOUT`].
pub async fn timed<T, F>(fut: F) -> Result<T, PgError>
where
    F: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
        Ok(r) => r.map_err(PgError::Query),
        Err(_) => Err(PgError::Timeout(QUERY_TIMEOUT)),
    }
}
