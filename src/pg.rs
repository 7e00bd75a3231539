//! PostgreSQL sessions: connecting (plain or TLS), and delivering NOTIFY wake-ups from the connection task.
//! Owns nothing but the socket; what runs on a session is decided by the caller.

use std::error::Error as _;
use std::time::Duration;

use futures_util::stream::poll_fn;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PgSslMode, RootCert};
use crate::tls::{Roots, Verify};

/// Bounds each statement run through [`timed`] (the pipeline's reads, deletes and lock probes, the device
/// store's queries): a database that stops answering is a lost database. Migrations and the provisioning
/// transactions as a whole are not bounded by it.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Without tokio-postgres's reason, which can quote a character of the string (a password's).
    #[error("invalid postgres.url")]
    Url,
    /// Printed with its causes: tokio-postgres' own text is only the kind ("error performing TLS handshake"),
    /// the reason (a certificate from an unknown issuer, a host name it does not carry) is in the cause.
    #[error("cannot connect to PostgreSQL: {}", with_causes(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("PostgreSQL connection attempt timed out")]
    ConnectTimeout,
    #[error("PostgreSQL query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    #[error("PostgreSQL connection closed")]
    Closed,
    #[error("PostgreSQL TLS: {0}")]
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

/// Connects as `url` says, TLS included: `sslmode` and `sslrootcert` with libpq's meanings, `require` verifying
/// like `verify-full` (see `config::pgtls` for each mode and why).
pub async fn connect(url: &str, connect_timeout: Duration, app: &str) -> Result<Session, PgError> {
    // The TLS settings' reasons quote no value but the sslmode's.
    let (rest, tls) = crate::config::split_pg_tls(url).map_err(PgError::Tls)?;
    let mut cfg: tokio_postgres::Config = rest.parse().map_err(|_| PgError::Url)?;
    cfg.application_name(app);
    cfg.connect_timeout(connect_timeout);
    // Notice a dead peer (no RST) in seconds, not the kernel's default two hours.
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(5));
    cfg.keepalives_interval(Duration::from_secs(2));
    cfg.keepalives_retries(3);
    let verified = |verify| -> Result<MakeRustlsConnect, PgError> {
        let roots = match &tls.roots {
            Some(RootCert::File(path)) => Roots::File(path.clone()),
            _ => Roots::System,
        };
        let config = crate::tls::client_config(&roots, verify).map_err(|e| PgError::Tls(e.to_string()))?;
        Ok(MakeRustlsConnect::new(config))
    };
    match tls.mode {
        PgSslMode::Disable => {
            cfg.ssl_mode(SslMode::Disable);
            open(&cfg, NoTls, connect_timeout).await
        }
        PgSslMode::Prefer => {
            cfg.ssl_mode(SslMode::Prefer);
            let config = crate::tls::unverified_client_config().map_err(|e| PgError::Tls(e.to_string()))?;
            let unverified = MakeRustlsConnect::new(config);
            match open(&cfg, unverified, connect_timeout).await {
                // As libpq does: a server that accepts TLS but cannot complete a handshake with us (an old
                // protocol version, no common cipher) is tried again without TLS.
                Err(PgError::Connect(e)) if tls_failure(&e) => {
                    tracing::warn!(error = %e, "postgres TLS handshake failed; sslmode=prefer: connecting without TLS");
                    cfg.ssl_mode(SslMode::Disable);
                    open(&cfg, NoTls, connect_timeout).await
                }
                other => other,
            }
        }
        PgSslMode::Require | PgSslMode::VerifyFull => {
            cfg.ssl_mode(SslMode::Require);
            open(&cfg, verified(Verify::Full)?, connect_timeout).await
        }
        PgSslMode::VerifyCa => {
            cfg.ssl_mode(SslMode::Require);
            open(&cfg, verified(Verify::ChainOnly)?, connect_timeout).await
        }
    }
}

/// One connection attempt with `tls`, its connection task started.
async fn open<T>(cfg: &tokio_postgres::Config, tls: T, connect_timeout: Duration) -> Result<Session, PgError>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    let (client, conn) = timed_connect(cfg.connect(tls), connect_timeout).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = oneshot::channel();
    spawn_driver(conn, tx, closed_tx);
    Ok(Session {
        client,
        notifications: rx,
        closed: closed_rx,
    })
}

/// `error: cause: its cause…`, each text once (an io::Error prints the error it wraps).
fn with_causes(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Whether the attempt failed in the TLS handshake (rustls said no), rather than on the network or at login.
fn tls_failure(e: &tokio_postgres::Error) -> bool {
    let mut cause = e.source();
    while let Some(err) = cause {
        if err.is::<rustls::Error>() {
            return true;
        }
        // tokio-rustls wraps rustls' error in an io::Error, whose source() skips it.
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                return true;
            }
        }
        cause = err.source();
    }
    false
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
