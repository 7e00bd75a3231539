//! The catch-up API for devices back from offline (docs/api.md): `GET /api/v1/changes` (the events of the
//! caller's branch after a `branch_seq`, exactly as MQTT carried them, from the change log) and
//! `GET /api/v1/snapshot` (the branch's products and inventory, paged, each page with the `branch_seq` it
//! includes). Authenticated with the device's own token (its branch comes from its record, never from the
//! request) or with the admin token and explicit `merchant_code` + `branch_code`.
//!
//! Bounded: at most [`CATCHUP_CONNECTIONS`] database sessions (kept open between calls, apart from the
//! pipeline's and the device API's), at most [`MAX_WAITING`] calls waiting for one and for no longer than
//! [`SESSION_WAIT`], every statement under a server-side timeout; past that a call is answered 503 at once,
//! never queued. The device's record is read on every call (no cache), so a revocation or a rotation takes
//! effect on the next call. Reads only: a standby replica serves these endpoints as well as the leader.

pub(crate) mod query;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pg;
use crate::provision::acl::is_valid_id;
use crate::provision::api::{authorize, bearer_token, error, secret_matches, DeviceApi};
use crate::provision::store::{self, Lookup};
use query::{Changes, Cursor, QueryError};

/// Database sessions the catch-up endpoints use at most at once.
pub(crate) const CATCHUP_CONNECTIONS: usize = 4;
/// Calls that may wait for a session at once; one more is answered 503 without waiting.
pub(crate) const MAX_WAITING: usize = 32;
/// How long a call waits for a session before it is answered 503.
pub(crate) const SESSION_WAIT: Duration = Duration::from_secs(2);
/// The server-side `statement_timeout` of the endpoints' sessions: a page that takes longer is given up.
const STATEMENT_TIMEOUT_MS: u32 = 5_000;
/// Page sizes: the default and the largest accepted (a larger `limit` is a 400, not silently cut).
pub(crate) const DEFAULT_LIMIT: i64 = 500;
pub(crate) const MAX_LIMIT: i64 = 1_000;
/// The payload bytes a `/changes` page holds at most (its first event always, however large): a page of
/// [`MAX_LIMIT`] large events would otherwise be held whole in memory, and sent whole.
pub(crate) const PAGE_BYTES: usize = 4 << 20;

/// What the catch-up routes need: the device API (its admin token, throttle and provisioner, whose token
/// checks are reused), the sessions, and where to read.
pub(crate) struct CatchupApi {
    pub devices: Arc<DeviceApi>,
    pub metrics: Arc<Metrics>,
    pg_url: String,
    schema: String,
    connect_timeout: Duration,
    retention: Duration,
    sessions: Sessions,
}

impl CatchupApi {
    pub(crate) fn new(cfg: &Config, devices: Arc<DeviceApi>, metrics: Arc<Metrics>) -> CatchupApi {
        CatchupApi {
            devices,
            metrics,
            pg_url: cfg.postgres_url(),
            schema: cfg.postgres.schema.clone(),
            connect_timeout: cfg.postgres.connect_timeout,
            retention: cfg.catchup.retention,
            sessions: Sessions {
                permits: Semaphore::new(CATCHUP_CONNECTIONS),
                waiting: AtomicUsize::new(0),
                idle: Mutex::new(Vec::with_capacity(CATCHUP_CONNECTIONS)),
            },
        }
    }
}

/// The endpoints' database sessions: at most [`CATCHUP_CONNECTIONS`], reused, a broken one dropped.
struct Sessions {
    permits: Semaphore,
    waiting: AtomicUsize,
    idle: Mutex<Vec<pg::Session>>,
}

/// One session held by one call; given back with [`Lease::keep`] only after a call that went well (an error
/// may mean a broken session).
struct Lease<'a> {
    _permit: SemaphorePermit<'a>,
    session: pg::Session,
    sessions: &'a Sessions,
}

impl Lease<'_> {
    fn keep(self) {
        let Lease { session, sessions, .. } = self;
        sessions.idle.lock().unwrap_or_else(|p| p.into_inner()).push(session);
    }
}

/// Gives the session back after a call that went well or was refused on its merits (a refused token, an unknown
/// branch, a row that cannot be shown: the session is fine, and dropping it would make every retry of an old
/// token open a new database connection); drops it after a database error, which may mean it is broken.
fn keep_unless_broken<T>(lease: Lease<'_>, r: Result<T, CatchupError>) -> Result<T, CatchupError> {
    match &r {
        Ok(_)
        | Err(CatchupError::Unauthorized(_))
        | Err(CatchupError::NotFound(_))
        | Err(CatchupError::Query(QueryError::Row(..))) => lease.keep(),
        Err(_) => drop(lease),
    }
    r
}

/// Why a call fails; each maps to one status and one `outcome`.
#[derive(Debug, thiserror::Error)]
enum CatchupError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid bearer token")]
    Unauthorized(&'static str),
    #[error("{0}")]
    NotFound(String),
    /// The admin check's own answer: 429 (throttled) or 503 (no admin token configured).
    #[error("refused by the admin check")]
    Refused(Box<Response>),
    /// Every session busy and too many calls waiting already.
    #[error("too many catch-up calls at once; retry shortly")]
    Busy,
    #[error("database unavailable: {0}")]
    Pg(#[from] pg::PgError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Provision(#[from] crate::provision::ProvisionError),
}

impl From<tokio_postgres::Error> for CatchupError {
    fn from(e: tokio_postgres::Error) -> Self {
        CatchupError::Pg(pg::PgError::Query(e))
    }
}

impl CatchupError {
    fn respond(self, endpoint: &str) -> (Response, &'static str) {
        match self {
            CatchupError::BadRequest(m) => (error(StatusCode::BAD_REQUEST, m), "bad_request"),
            CatchupError::Unauthorized(why) => {
                tracing::info!(endpoint, reason = why, "catch-up call refused");
                let mut r = error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                (r, "unauthorized")
            }
            CatchupError::NotFound(m) => (error(StatusCode::NOT_FOUND, m), "not_found"),
            CatchupError::Refused(r) => {
                let outcome = if r.status() == StatusCode::TOO_MANY_REQUESTS {
                    "unauthorized"
                } else {
                    "unavailable"
                };
                (*r, outcome)
            }
            CatchupError::Busy => {
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many catch-up calls at once; retry shortly",
                );
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
                (r, "unavailable")
            }
            CatchupError::Query(QueryError::Row(table, id, why)) => {
                tracing::error!(endpoint, table, row_id = id, reason = %why, "snapshot: a row cannot be shown");
                (error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"), "error")
            }
            e => {
                tracing::warn!(endpoint, error = %e, "catch-up call: database unavailable");
                let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable; retry shortly");
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
                (r, "unavailable")
            }
        }
    }
}

/// The catch-up routes with their own state, ready to merge into the service's router.
pub(crate) fn routes(api: Arc<CatchupApi>) -> Router {
    Router::new()
        .route("/api/v1/changes", get(changes))
        .route("/api/v1/snapshot", get(snapshot))
        .with_state(api)
}

/// Who calls, once the token is checked (the device's record is read later, on the call's session).
enum Caller {
    Device(Box<crate::provision::credentials::Claims>),
    Admin(String, String),
}

/// The query's parameters in order (a repeated one: its first value).
type Params = Vec<(String, String)>;

fn parse_query(query: Option<&str>) -> Params {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A non-negative integer written in decimal digits only (no sign, no space), at most 2^63 - 1 (the maximum
/// the document declares).
fn non_negative(name: &str, v: &str) -> Result<i64, CatchupError> {
    let bad = || CatchupError::BadRequest(format!("{name} must be an integer from 0 to 9223372036854775807"));
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    v.parse::<i64>().map_err(|_| bad())
}

fn limit(params: &Params, min: i64) -> Result<i64, CatchupError> {
    let Some(v) = param(params, "limit") else {
        return Ok(DEFAULT_LIMIT);
    };
    let n = non_negative("limit", v)?;
    if n < min || n > MAX_LIMIT {
        return Err(CatchupError::BadRequest(format!(
            "limit must be between {min} and {MAX_LIMIT}"
        )));
    }
    Ok(n)
}

impl CatchupApi {
    async fn lease(&self) -> Result<Lease<'_>, CatchupError> {
        let s = &self.sessions;
        let permit = match s.permits.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                if s.waiting.fetch_add(1, Ordering::SeqCst) >= MAX_WAITING {
                    s.waiting.fetch_sub(1, Ordering::SeqCst);
                    return Err(CatchupError::Busy);
                }
                let got = tokio::time::timeout(SESSION_WAIT, s.permits.acquire()).await;
                s.waiting.fetch_sub(1, Ordering::SeqCst);
                match got {
                    Ok(Ok(p)) => p,
                    _ => return Err(CatchupError::Busy),
                }
            }
        };
        let reused = s.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let session = match reused {
            Some(session) if !session.client.is_closed() => session,
            _ => {
                let session = pg::connect(&self.pg_url, self.connect_timeout, "delta-bridge-catchup").await?;
                pg::timed(session.client.batch_execute(&format!(
                    "SET statement_timeout = {STATEMENT_TIMEOUT_MS}; SET idle_in_transaction_session_timeout = {STATEMENT_TIMEOUT_MS}"
                )))
                .await?;
                session
            }
        };
        Ok(Lease {
            _permit: permit,
            session,
            sessions: s,
        })
    }

    /// Who calls, before any database session is taken: a device token's verified claims, or the admin token
    /// with the `merchant_code` and `branch_code` parameters it requires. A token that is not the admin token
    /// and has the shape of a JWT is taken as a device's, anything else as a try at the admin token (whose
    /// failures count toward the per-address throttle).
    fn authenticate(&self, client: SocketAddr, headers: &HeaderMap, params: &Params) -> Result<Caller, CatchupError> {
        let token = bearer_token(headers);
        // The admin token first (in constant time), so that one which happens to have two dots is still the
        // admin's; only a token that is not it and has the shape of a JWT is checked as a device's.
        let is_admin = self
            .devices
            .admin_token
            .as_ref()
            .is_some_and(|expected| secret_matches(token, expected));
        if !is_admin && token.split('.').count() == 3 {
            let now = chrono::Utc::now().timestamp();
            return self
                .devices
                .provisioner
                .device_claims(token, now)
                .map(|c| Caller::Device(Box::new(c)))
                .map_err(CatchupError::Unauthorized);
        }
        if let Err(r) = authorize(&self.devices, client, headers) {
            // 429 (this address failed too often) and 503 (no admin token configured) pass through as they are.
            return Err(match r.status() {
                StatusCode::UNAUTHORIZED => CatchupError::Unauthorized("not the admin token"),
                _ => CatchupError::Refused(r),
            });
        }
        match (param(params, "merchant_code"), param(params, "branch_code")) {
            // As for issuing: a code outside the id pattern names no branch a device or a topic can have (and
            // one with a NUL byte could not even be looked up).
            (Some(m), Some(b)) if !is_valid_id(m) || !is_valid_id(b) => Err(CatchupError::BadRequest(
                "merchant_code and branch_code must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$".into(),
            )),
            (Some(m), Some(b)) => Ok(Caller::Admin(m.to_string(), b.to_string())),
            _ => Err(CatchupError::BadRequest(
                "with the admin token, merchant_code and branch_code are required".into(),
            )),
        }
    }

    /// The merchant and branch the caller may read: a device's own, from its record (never from the request;
    /// a revoked or rotated-away token is refused here), or the admin's, which must name an existing branch.
    async fn scope(&self, lease: &Lease<'_>, caller: Caller) -> Result<(String, String), CatchupError> {
        let (m, b) = match caller {
            Caller::Device(claims) => {
                return self
                    .devices
                    .provisioner
                    .device_scope(&lease.session.client, &claims)
                    .await?
                    .map_err(CatchupError::Unauthorized)
            }
            Caller::Admin(m, b) => (m, b),
        };
        match store::lookup_branch(&lease.session.client, &self.schema, &m, &b).await {
            Ok(Lookup::Found) => Ok((m, b)),
            Ok(_) => Err(CatchupError::NotFound(format!("branch {b} of merchant {m} not found"))),
            Err(store::StoreError::Pg(e)) => Err(CatchupError::Pg(e)),
        }
    }

    fn count(&self, endpoint: &str, outcome: &str) {
        self.metrics
            .catchup_requests
            .with_label_values(&[endpoint, outcome])
            .inc();
    }

    fn finish(&self, endpoint: &'static str, r: Result<Response, CatchupError>) -> Response {
        let (resp, outcome) = match r {
            Ok(resp) => {
                let outcome = if resp.status() == StatusCode::GONE {
                    "resync_required"
                } else {
                    "ok"
                };
                (resp, outcome)
            }
            Err(e) => e.respond(endpoint),
        };
        self.count(endpoint, outcome);
        resp
    }
}

async fn changes(
    State(api): State<Arc<CatchupApi>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let params = parse_query(query.as_deref());
    let r = changes_page(&api, client, &headers, &params).await;
    api.finish("changes", r)
}

async fn changes_page(
    api: &CatchupApi,
    client: SocketAddr,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response, CatchupError> {
    let after = non_negative(
        "after",
        param(params, "after").ok_or_else(|| CatchupError::BadRequest("after is required".into()))?,
    )?;
    let limit = limit(params, 0)?;
    let caller = api.authenticate(client, headers, params)?;
    let mut lease = api.lease().await?;
    let page = async {
        let (merchant, branch) = api.scope(&lease, caller).await?;
        let page = query::changes(
            &mut lease.session.client,
            &merchant,
            &branch,
            after,
            limit,
            PAGE_BYTES,
            api.retention,
        )
        .await?;
        Ok(page)
    }
    .await;
    let page = keep_unless_broken(lease, page)?;
    let (events, last_seq) = match page {
        // Exactly the `Error` shape every error has; what the client does about it is in docs/api.md.
        Changes::Expired => return Ok(error(StatusCode::GONE, "resync_required")),
        Changes::Page { events, last_seq } => (events, last_seq),
    };
    let next_after = events.last().map_or(after, |(n, _)| *n);
    let up_to_date = next_after >= last_seq;
    // The payloads are written as they are, byte for byte what MQTT carried: parsed and printed again, a
    // number could come back in another form.
    let mut body = Vec::with_capacity(64 + events.iter().map(|(_, p)| p.len() + 1).sum::<usize>());
    body.extend_from_slice(b"{\"events\":[");
    for (i, (_, payload)) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(payload);
    }
    body.extend_from_slice(format!("],\"next_after\":{next_after},\"up_to_date\":{up_to_date}}}").as_bytes());
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response())
}

async fn snapshot(
    State(api): State<Arc<CatchupApi>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let params = parse_query(query.as_deref());
    let r = snapshot_page(&api, client, &headers, &params).await;
    api.finish("snapshot", r)
}

async fn snapshot_page(
    api: &CatchupApi,
    client: SocketAddr,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response, CatchupError> {
    let cursor = match param(params, "cursor") {
        None => Cursor::Products(Cursor::START),
        Some(c) => {
            Cursor::parse(c).ok_or_else(|| CatchupError::BadRequest("cursor is not one this API gave out".into()))?
        }
    };
    let limit = limit(params, 1)?;
    let caller = api.authenticate(client, headers, params)?;
    let mut lease = api.lease().await?;
    let page = async {
        let (merchant, branch) = api.scope(&lease, caller).await?;
        let page = query::snapshot(
            &mut lease.session.client,
            &api.schema,
            &merchant,
            &branch,
            cursor,
            limit,
        )
        .await?;
        Ok(page)
    }
    .await;
    let page = keep_unless_broken(lease, page)?;
    // Serialised from structs, not through a `Value` (whose map would sort the keys): the objects keep the
    // events' key order.
    Ok((
        StatusCode::OK,
        Json(SnapshotPage {
            as_of: page.as_of,
            products: &page.products,
            inventory: &page.inventory,
            next_cursor: page.next.map(Cursor::render),
        }),
    )
        .into_response())
}

#[derive(serde::Serialize)]
struct SnapshotPage<'a> {
    as_of: i64,
    products: &'a [crate::convert::SnapshotProduct],
    inventory: &'a [query::SnapshotInventory],
    next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_non_negative_integers() {
        for (v, n) in [("0", 0), ("7", 7), ("0012", 12), ("9223372036854775807", i64::MAX)] {
            assert_eq!(non_negative("after", v).ok(), Some(n), "{v}");
        }
        for bad in ["", "-1", "+1", "1.0", "1e3", " 1", "0x10", "abc", "9223372036854775808"] {
            assert!(non_negative("after", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_default_and_bounds() {
        let p = |v: &str| vec![("limit".to_string(), v.to_string())];
        assert_eq!(limit(&Vec::new(), 0).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(limit(&p("1000"), 0).ok(), Some(1000));
        assert_eq!(limit(&p("0"), 0).ok(), Some(0));
        assert!(limit(&p("0"), 1).is_err());
        assert!(limit(&p("1001"), 0).is_err());
    }
}
