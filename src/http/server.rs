//! The HTTP server's connections, by hand rather than through `axum::serve`, for what a hostile or broken
//! client must not be able to do to the bridge:
//!
//! - hold a connection without sending a request: headers must arrive within [`HEADER_TIMEOUT`] of the
//!   connection opening or of the previous answer (idle keep-alive connections included), else hyper closes
//!   it (the body's own deadline is [`super::limits`]'s);
//! - hold a connection by not reading the answers: a write that makes no progress for
//!   [`super::wire::WRITE_STALL`], or stays behind for [`super::wire::WRITE_BEHIND`], closes it;
//! - open connections without end: at most `http.max_connections` are served, one more is closed as soon as
//!   it is accepted and counted in `delta_bridge_http_connections_refused_total`, so the memory clients can
//!   pin stays bounded (each holds at most hyper's read buffer, [`MAX_BUF`], and a 64 KiB body);
//! - with TLS (`http.tls_cert_file`), hold a connection in the handshake: it must complete within
//!   [`HEADER_TIMEOUT`] too, in the connection's own task, so a slow handshake delays no one else's accept;
//! - keep the process from stopping: once the cancellation token fires the listener is closed, idle
//!   connections are closed, requests in progress get [`SHUTDOWN_GRACE`] to finish, and whatever is left
//!   then is dropped. The rest of the bridge (the publisher's drain) stops in parallel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::Wire;
use crate::metrics::Metrics;

/// How long a client may take to send a request's headers, from the moment the connection is open or the
/// previous answer was sent.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// After the bridge is told to stop, how long requests in progress get before their connections are dropped.
/// Short enough that the process exits well within 15 s whatever clients do; long enough for a device call
/// (a database round trip and a broker call) to finish.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// hyper's read buffer per connection (one read may take it to twice this). hyper's default (~400 KiB)
/// times a few hundred connections would not fit the container.
pub(crate) const MAX_BUF: usize = 32 * 1024;

/// A request's headers at most; larger ones are answered 431 and the connection closed.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;

/// How often the refusal of connections over the cap is logged, at most.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts a connection in `delta_bridge_http_connections` for as long as it lives, however its task ends.
struct Open(Arc<Metrics>);

impl Open {
    fn new(metrics: Arc<Metrics>) -> Open {
        metrics.http_connections.inc();
        Open(metrics)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.http_connections.dec();
    }
}

/// Serves `router` on `listener` until `cancel` fires, then stops within [`SHUTDOWN_GRACE`] (and a moment).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    metrics: Arc<Metrics>,
    tls: Option<TlsAcceptor>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(max_connections));
    let connections = TaskTracker::new();
    let mut refused_since_log: u64 = 0;
    let mut last_log: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Closed at once, before anything is read: a refused client costs no task and no buffer.
            drop(stream);
            metrics.http_connections_refused.inc();
            refused_since_log += 1;
            if last_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                tracing::warn!(
                    max_connections,
                    refused = refused_since_log,
                    "HTTP connections refused: http.max_connections are open"
                );
                refused_since_log = 0;
                last_log = Some(Instant::now());
            }
            continue;
        };
        let open = Open::new(metrics.clone());
        let router = router.clone();
        let cancel = cancel.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => connection(stream, peer, router, cancel).await,
                Some(tls) => {
                    if let Some(stream) = handshake(&tls, stream, peer, &cancel).await {
                        connection(stream, peer, router, cancel).await;
                    }
                }
            }
            drop((open, permit));
        });
    }
    drop(listener);
    connections.close();
    // Each connection enforces the grace period itself; this bound only guards against a task that does not.
    if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after the shutdown grace period; leaving them");
    }
    Ok(())
}

/// A failed accept: the client's own failure (it reset the connection before we took it) is nothing; running
/// out of file descriptors or memory is worth a pause rather than a busy loop.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %e, "cannot accept an HTTP connection; retrying in 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The TLS handshake of an accepted connection, within [`HEADER_TIMEOUT`]; None when it fails (a client that
/// speaks plain HTTP, trusts another certificate, or stalls) or the bridge is stopping.
async fn handshake(
    tls: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    cancel: &CancellationToken,
) -> Option<TlsStream<TcpStream>> {
    tokio::select! {
        r = tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)) => match r {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                // The client's business (a plain-HTTP client, one that refused our certificate), not an operator's.
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        },
        _ = cancel.cancelled() => None,
    }
}

/// One connection: HTTP/1.1 with the header timeout, the write deadlines and JSON for hyper's own error
/// answers ([`super::wire`]), the peer's address in each request's extensions (for the device API's limit on
/// failed authentication), and the shutdown deadline.
pub(super) async fn connection<S>(stream: S, peer: SocketAddr, router: Router, cancel: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let service = service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        service.call(req)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .max_header_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(Wire::new(stream)), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = cancel.cancelled() => {
            // Idle connections close now; one with a request in progress after its answer, if that comes in time.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::debug!(%peer, "HTTP connection dropped at shutdown");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        // Timeouts, resets, malformed requests: the client's business, not an operator's.
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}
