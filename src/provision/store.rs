//! The device records in PostgreSQL (`delta_bridge.devices`, `delta_bridge.device_events`) and the lookup of
//! merchants and branches in the business tables. Owns every provisioning query; never talks to a broker,
//! never stores a token (only its `jti`), and its errors never reach an HTTP client as text.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_postgres::{GenericClient, Row};

use crate::pg::{timed, PgError};
use crate::schema::quote_ident;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Pg(#[from] PgError),
}

/// Whether a merchant/branch pair exists; branch codes are unique only within their merchant.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Found,
    NoMerchant,
    NoBranch,
}

/// One device as recorded.
#[derive(Debug, Clone)]
pub(crate) struct DeviceRecord {
    pub device_id: String,
    pub merchant_code: String,
    pub branch_code: String,
    pub jti: String,
    pub key_id: String,
    pub first_issued_at: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub rotations: i32,
    pub rotated_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub expired_at: Option<DateTime<Utc>>,
    /// The latest `exp` of any token ever issued to this device (a revocation must outlast them all).
    pub max_expires_at: DateTime<Utc>,
}

const COLUMNS: &str = "device_id, merchant_code, branch_code, jti, key_id, first_issued_at, issued_at, \
                       expires_at, rotations, rotated_at, revoked_at, expired_at, max_expires_at";

impl DeviceRecord {
    /// A column of an unexpected type or an unexpected NULL is an error of the query, never a panic.
    fn from_row(r: &Row) -> Result<DeviceRecord, PgError> {
        Ok(DeviceRecord {
            device_id: r.try_get(0)?,
            merchant_code: r.try_get(1)?,
            branch_code: r.try_get(2)?,
            jti: r.try_get(3)?,
            key_id: r.try_get(4)?,
            first_issued_at: r.try_get(5)?,
            issued_at: r.try_get(6)?,
            expires_at: r.try_get(7)?,
            rotations: r.try_get(8)?,
            rotated_at: r.try_get(9)?,
            revoked_at: r.try_get(10)?,
            expired_at: r.try_get(11)?,
            max_expires_at: r.try_get(12)?,
        })
    }

    /// The record as `GET /api/v1/devices/{id}` shows it: never a password.
    pub(crate) fn to_json(&self, env: &str, now: DateTime<Utc>) -> Value {
        let ts = |t: &DateTime<Utc>| super::rfc3339(*t);
        json!({
            "device_id": self.device_id,
            "client_id": self.device_id,
            "username": self.device_id,
            "merchant_code": self.merchant_code,
            "branch_code": self.branch_code,
            "topics": {"subscribe": [super::acl::subscribe_filter(env, &self.merchant_code, &self.branch_code)]},
            "jti": self.jti,
            "key_id": self.key_id,
            "first_issued_at": ts(&self.first_issued_at),
            "issued_at": ts(&self.issued_at),
            "expires_at": ts(&self.expires_at),
            "expired": self.expires_at <= now,
            "rotations": self.rotations,
            "rotated_at": self.rotated_at.as_ref().map(ts),
            "revoked": self.revoked_at.is_some(),
            "revoked_at": self.revoked_at.as_ref().map(ts),
        })
    }
}

/// Looks the pair up in the business tables of `schema`.
pub(crate) async fn lookup_branch<C: GenericClient>(
    c: &C,
    schema: &str,
    merchant: &str,
    branch: &str,
) -> Result<Lookup, StoreError> {
    let s = quote_ident(schema);
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {s}.merchants WHERE code = $1),
                EXISTS (SELECT 1 FROM {s}.merchants m JOIN {s}.branches b ON b.merchant_id = m.id
                        WHERE m.code = $1 AND b.code = $2)"
    );
    let row = timed(c.query_one(&sql, &[&merchant, &branch])).await?;
    let found = |i: usize| row.try_get::<_, bool>(i).map_err(PgError::from);
    Ok(match (found(0)?, found(1)?) {
        (false, _) => Lookup::NoMerchant,
        (true, false) => Lookup::NoBranch,
        (true, true) => Lookup::Found,
    })
}

pub(crate) async fn get<C: GenericClient>(c: &C, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM delta_bridge.devices WHERE device_id = $1");
    let row = timed(c.query_opt(&sql, &[&device_id])).await?;
    Ok(row.as_ref().map(DeviceRecord::from_row).transpose()?)
}

/// Reads and row-locks a device inside the caller's transaction, so that issuing, revoking and the expiry
/// sweep of one device never interleave across replicas.
pub(crate) async fn lock<C: GenericClient>(c: &C, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
    // Serialises the first issue of a new id too (no row to lock yet).
    timed(c.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('delta_bridge.devices:' || $1, 0))",
        &[&device_id],
    ))
    .await?;
    let sql = format!("SELECT {COLUMNS} FROM delta_bridge.devices WHERE device_id = $1 FOR UPDATE");
    let row = timed(c.query_opt(&sql, &[&device_id])).await?;
    Ok(row.as_ref().map(DeviceRecord::from_row).transpose()?)
}

/// What an issue writes.
pub(crate) struct Issued<'a> {
    pub device_id: &'a str,
    pub merchant_code: &'a str,
    pub branch_code: &'a str,
    pub jti: &'a str,
    pub key_id: &'a str,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Records a first issue or a rotation (which also clears a revocation or expiry: the device is live again).
pub(crate) async fn record_issue<C: GenericClient>(
    c: &C,
    i: &Issued<'_>,
    rotation: bool,
) -> Result<DeviceRecord, StoreError> {
    let sql = format!(
        "INSERT INTO delta_bridge.devices AS d
             (device_id, merchant_code, branch_code, jti, key_id, first_issued_at, issued_at, expires_at,
              max_expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $7)
         ON CONFLICT (device_id) DO UPDATE SET
             merchant_code = EXCLUDED.merchant_code, branch_code = EXCLUDED.branch_code,
             jti = EXCLUDED.jti, key_id = EXCLUDED.key_id, issued_at = EXCLUDED.issued_at,
             expires_at = EXCLUDED.expires_at,
             max_expires_at = greatest(d.max_expires_at, EXCLUDED.expires_at), rotations = d.rotations + 1, rotated_at = EXCLUDED.issued_at,
             revoked_at = NULL, expired_at = NULL
         RETURNING {COLUMNS}"
    );
    let row = timed(c.query_one(
        &sql,
        &[
            &i.device_id,
            &i.merchant_code,
            &i.branch_code,
            &i.jti,
            &i.key_id,
            &i.issued_at,
            &i.expires_at,
        ],
    ))
    .await?;
    event(c, i.device_id, if rotation { "rotated" } else { "issued" }, Some(i.jti)).await?;
    Ok(DeviceRecord::from_row(&row)?)
}

/// Marks a device revoked (keeping the first revocation time). The caller holds the row lock.
pub(crate) async fn record_revoke<C: GenericClient>(c: &C, device_id: &str) -> Result<(), StoreError> {
    timed(c.execute(
        "UPDATE delta_bridge.devices SET revoked_at = coalesce(revoked_at, now()) WHERE device_id = $1",
        &[&device_id],
    ))
    .await?;
    event(c, device_id, "revoked", None).await
}

/// Live credentials past their expiry, locked for this sweep (others skip them).
pub(crate) async fn lock_expired<C: GenericClient>(c: &C, limit: i64) -> Result<Vec<String>, StoreError> {
    let rows = timed(c.query(
        "SELECT device_id FROM delta_bridge.devices
          WHERE revoked_at IS NULL AND expired_at IS NULL AND expires_at <= now()
          ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        &[&limit],
    ))
    .await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(PgError::from)?)
}

pub(crate) async fn record_expired<C: GenericClient>(c: &C, device_id: &str) -> Result<(), StoreError> {
    timed(c.execute(
        "UPDATE delta_bridge.devices SET expired_at = now() WHERE device_id = $1",
        &[&device_id],
    ))
    .await?;
    event(c, device_id, "expired", None).await
}

/// When the next live credential expires, if any.
pub(crate) async fn next_expiry<C: GenericClient>(c: &C) -> Result<Option<DateTime<Utc>>, StoreError> {
    let row = timed(c.query_one(
        "SELECT min(expires_at) FROM delta_bridge.devices WHERE revoked_at IS NULL AND expired_at IS NULL",
        &[],
    ))
    .await?;
    Ok(row.try_get(0).map_err(PgError::from)?)
}

async fn event<C: GenericClient>(c: &C, device_id: &str, event: &str, jti: Option<&str>) -> Result<(), StoreError> {
    timed(c.execute(
        "INSERT INTO delta_bridge.device_events (device_id, event, jti) VALUES ($1, $2, $3)",
        &[&device_id, &event, &jti],
    ))
    .await?;
    Ok(())
}
