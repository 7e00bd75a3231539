//! Provisioning: per-device MQTT credentials (a signed JWT), the ACL that keeps a device on its own branch,
//! the record of every device in PostgreSQL and the broker-side set-up, beside the data path and independent
//! of it. One code path serves `POST /api/v1/devices` and `delta-bridge device issue`.
//!
//! - [`acl`]: what a device may subscribe to, as EMQX and Mosquitto rules (pure).
//! - [`credentials`]: keys, claims, JWS, JWKS (pure).
//! - [`store`]: device records (PostgreSQL).
//! - [`broker`]: Mosquitto dynamic security, EMQX REST API, or nothing.
//! - [`api`]: the HTTP handlers.
//! - [`authn`]: the answer to EMQX's HTTP authenticator (which token of a device is current).
//! - [`reserved`]: the ids the bridge keeps for itself (pure).
//! - [`throttle`]: the per-address limit on failed admin authentication.
//!
//! The service keeps no state of its own: each call reads and locks the device's row, talks to the broker,
//! and commits only once the broker agreed, so any replica can serve any call. Never returns a database or
//! broker error text to a caller; those are logged.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, CredentialsConfig, Secret};
use crate::metrics::Metrics;
use crate::pg;

pub(crate) mod acl;
pub(crate) mod api;
pub(crate) mod authn;
pub(crate) mod broker;
pub(crate) mod credentials;
pub(crate) mod reserved;
pub(crate) mod store;
pub(crate) mod throttle;

use acl::AclRule;
use broker::{BrokerBackend, BrokerError, Grant};
use credentials::{Claims, KeyError, SigningKeys};
use store::{Lookup, StoreError};

/// Mosquitto does not read `exp`: the sweep runs at least this often (a credential stops working within 60 s of its expiry).
const SWEEP_MAX_INTERVAL: Duration = Duration::from_secs(15);
const SWEEP_BATCH: i64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The request is wrong (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// A device, merchant or branch does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// Provisioning is not configured (HTTP 503).
    #[error("{0}")]
    Disabled(&'static str),
    #[error("device store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Broker(#[from] BrokerError),
    #[error("signing: {0}")]
    Key(#[from] KeyError),
}

impl From<pg::PgError> for ProvisionError {
    fn from(e: pg::PgError) -> Self {
        ProvisionError::Store(StoreError::Pg(e))
    }
}

impl From<tokio_postgres::Error> for ProvisionError {
    fn from(e: tokio_postgres::Error) -> Self {
        ProvisionError::Store(StoreError::Pg(pg::PgError::Query(e)))
    }
}

/// The body of `POST /api/v1/devices`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    pub device_id: String,
    pub merchant_code: String,
    pub branch_code: String,
    /// Absent: `credentials.ttl`. Present, it must be a whole number (see [`whole_seconds`]).
    #[serde(default, deserialize_with = "whole_seconds")]
    pub ttl_seconds: Option<u64>,
}

/// `ttl_seconds` as the API documents it (docs/openapi.json: a JSON Schema `integer`): any JSON number
/// without a fractional part, so `3600.0` and `3.6e3` are 3600 as in JSON Schema, and nothing else: `null`,
/// a fraction, a negative number or a string are refused (400) rather than read as "the default". Only
/// called when the key is present. A whole number too large for u64 saturates, so that it is refused as out
/// of bounds like any other too-large value.
fn whole_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::{Error, Unexpected};
    let n = serde_json::Number::deserialize(d)?;
    if let Some(u) = n.as_u64() {
        return Ok(Some(u));
    }
    match n.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 => {
            // `as` saturates at u64::MAX for whole floats beyond it.
            Ok(Some(f as u64))
        }
        Some(f) => Err(D::Error::invalid_value(
            Unexpected::Float(f),
            &"a whole number of seconds, not negative",
        )),
        None => Err(D::Error::invalid_value(
            Unexpected::Other(&n.to_string()),
            &"a whole number of seconds, not negative",
        )),
    }
}

/// The 201 answer (and what `device issue` prints).
#[derive(Debug, Clone, Serialize)]
pub struct IssuedCredentials {
    pub device_id: String,
    pub client_id: String,
    pub username: String,
    /// The JWT.
    pub password: String,
    pub expires_at: String,
    pub topics: Topics,
    pub acl: Vec<AclRule>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Topics {
    pub subscribe: Vec<String>,
}

/// RFC 3339 UTC, whole seconds (JWT times are whole seconds).
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Checks a request's ids and ttl; returns the lifetime in seconds.
pub(crate) fn validate(req: &IssueRequest, cfg: &CredentialsConfig) -> Result<i64, ProvisionError> {
    for (field, v) in [
        ("device_id", &req.device_id),
        ("merchant_code", &req.merchant_code),
        ("branch_code", &req.branch_code),
    ] {
        if !acl::is_valid_id(v) {
            return Err(ProvisionError::Invalid(format!(
                "{field} must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$"
            )));
        }
    }
    let (min, max) = (cfg.min_ttl.as_secs(), cfg.max_ttl.as_secs());
    let ttl = match req.ttl_seconds {
        None => cfg.ttl.as_secs(),
        Some(t) if t < min || t > max => {
            return Err(ProvisionError::Invalid(format!(
                "ttl_seconds must be between {min} and {max}"
            )))
        }
        Some(t) => t,
    };
    i64::try_from(ttl).map_err(|_| ProvisionError::Invalid("ttl_seconds is too large".into()))
}

/// How long a revocation must keep a device out: past the expiry of every token it was ever issued (a
/// rotation to a shorter lifetime leaves the longer one valid), plus the clock skew `nbf` allows, and never in
/// the past (EMQX refuses a ban that has already ended).
pub(crate) fn revoke_until(rec: &store::DeviceRecord, now: DateTime<Utc>) -> DateTime<Utc> {
    let margin = chrono::Duration::seconds(60);
    (rec.max_expires_at.max(rec.expires_at) + margin).max(now + margin)
}

fn check_id(device_id: &str) -> Result<(), ProvisionError> {
    if acl::is_valid_id(device_id) {
        Ok(())
    } else {
        Err(ProvisionError::Invalid(
            "device_id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$".into(),
        ))
    }
}

pub(crate) struct Provisioner {
    env: String,
    pg_url: String,
    schema: String,
    connect_timeout: Duration,
    credentials: CredentialsConfig,
    /// The bridge's own client ids and broker accounts: never a device id, so issuing cannot take over, replace
    /// or revoke them.
    reserved: reserved::Reserved,
    /// None when `credentials.signing_key_file` is not set: issuing and the JWKS answer 503.
    keys: Option<SigningKeys>,
    broker: Arc<dyn BrokerBackend>,
    metrics: Arc<Metrics>,
    /// The database sessions of [`authn`], apart from the admin calls' so that a connect storm cannot starve them.
    authn_sessions: authn::Sessions,
}

impl Provisioner {
    /// Loads the signing keys and sets up the broker backend; fails on an unusable key file.
    pub(crate) fn from_config(cfg: &Config, metrics: Arc<Metrics>) -> Result<Provisioner, ProvisionError> {
        let keys = match &cfg.credentials.signing_key_file {
            Some(path) => Some(SigningKeys::load(path)?),
            None => None,
        };
        Ok(Provisioner {
            env: cfg.env.clone(),
            pg_url: cfg.postgres_url(),
            schema: cfg.postgres.schema.clone(),
            connect_timeout: cfg.postgres.connect_timeout,
            credentials: cfg.credentials.clone(),
            reserved: reserved::Reserved::from_config(cfg),
            keys,
            broker: broker::from_config(cfg)?,
            metrics,
            authn_sessions: authn::Sessions::new(),
        })
    }

    pub(crate) fn has_keys(&self) -> bool {
        self.keys.is_some()
    }

    /// A reserved id is a wrong request (HTTP 400, `device issue` exit 2), whatever the broker holds.
    fn check_not_reserved(&self, device_id: &str) -> Result<(), ProvisionError> {
        match self.reserved.refusal(device_id) {
            Some(why) => Err(ProvisionError::Invalid(why)),
            None => Ok(()),
        }
    }

    async fn connect(&self) -> Result<pg::Session, ProvisionError> {
        Ok(pg::connect(&self.pg_url, self.connect_timeout, "delta-bridge-provision").await?)
    }

    /// Issues (or rotates) a device's credentials.
    pub(crate) async fn issue(&self, req: &IssueRequest) -> Result<IssuedCredentials, ProvisionError> {
        let ttl = validate(req, &self.credentials)?;
        self.check_not_reserved(&req.device_id)?;
        let keys = self.keys.as_ref().ok_or(ProvisionError::Disabled(
            "credentials.signing_key_file is not configured",
        ))?;
        let mut session = self.connect().await?;
        let tx = session.client.transaction().await?;
        match store::lookup_branch(&tx, &self.schema, &req.merchant_code, &req.branch_code).await? {
            Lookup::Found => {}
            Lookup::NoMerchant => {
                return Err(ProvisionError::NotFound(format!(
                    "merchant {} not found",
                    req.merchant_code
                )))
            }
            Lookup::NoBranch => {
                return Err(ProvisionError::NotFound(format!(
                    "branch {} of merchant {} not found",
                    req.branch_code, req.merchant_code
                )))
            }
        }
        let previous = store::lock(&tx, &req.device_id).await?;
        let now = Utc::now().timestamp();
        let issued_at = Utc.timestamp_opt(now, 0).single().unwrap_or_else(Utc::now);
        let expires_at = Utc
            .timestamp_opt(now + ttl, 0)
            .single()
            .ok_or_else(|| ProvisionError::Invalid("ttl_seconds is too large".into()))?;
        let acl = acl::device_acl(&self.env, &req.merchant_code, &req.branch_code);
        let jti = credentials::new_jti();
        let claims = Claims::for_device(
            &req.device_id,
            acl.clone(),
            &self.credentials.issuer,
            &self.credentials.audience,
            now,
            ttl,
            jti.clone(),
        );
        let token = keys.sign(&claims)?;
        store::record_issue(
            &tx,
            &store::Issued {
                device_id: &req.device_id,
                merchant_code: &req.merchant_code,
                branch_code: &req.branch_code,
                jti: &jti,
                key_id: keys.kid(),
                issued_at,
                expires_at,
            },
            previous.is_some(),
        )
        .await?;
        let grant = Grant {
            device_id: req.device_id.clone(),
            password: Secret::new(token.clone()),
            env: self.env.clone(),
            merchant_code: req.merchant_code.clone(),
            branch_code: req.branch_code.clone(),
            reinstated: previous
                .as_ref()
                .is_some_and(|p| p.revoked_at.is_some() || p.expired_at.is_some()),
            rotation: previous.is_some(),
        };
        self.broker.grant(&grant).await?;
        tx.commit().await?;
        if grant.rotation {
            // After the commit, a session ended here can only come back with the token now current. `grant`
            // already ended the device's session, so a failure here leaves only a reconnect in between.
            if let Err(e) = self.broker.issued(&req.device_id).await {
                tracing::warn!(device_id = %req.device_id, error = %e, "could not end the device's session after the rotation");
            }
        }
        self.metrics.devices_issued.inc();
        tracing::info!(
            device_id = %req.device_id,
            rotation = previous.is_some(),
            expires_at = %rfc3339(expires_at),
            broker = self.broker.kind(),
            "device credentials issued"
        );
        Ok(IssuedCredentials {
            device_id: req.device_id.clone(),
            client_id: req.device_id.clone(),
            username: req.device_id.clone(),
            password: token,
            expires_at: rfc3339(expires_at),
            topics: Topics {
                subscribe: vec![acl::subscribe_filter(&self.env, &req.merchant_code, &req.branch_code)],
            },
            acl,
        })
    }

    /// The device record, never its password.
    pub(crate) async fn get(&self, device_id: &str) -> Result<Value, ProvisionError> {
        check_id(device_id)?;
        let session = self.connect().await?;
        let rec = store::get(&session.client, device_id)
            .await?
            .ok_or_else(|| ProvisionError::NotFound(format!("device {device_id} not found")))?;
        Ok(rec.to_json(&self.env, Utc::now()))
    }

    /// Revokes: the broker disconnects the device and keeps it out; the record stays, marked revoked.
    pub(crate) async fn revoke(&self, device_id: &str) -> Result<(), ProvisionError> {
        check_id(device_id)?;
        self.check_not_reserved(device_id)?;
        let mut session = self.connect().await?;
        let tx = session.client.transaction().await?;
        let rec = store::lock(&tx, device_id)
            .await?
            .ok_or_else(|| ProvisionError::NotFound(format!("device {device_id} not found")))?;
        // Again on a revoked device too: cheap, and it repairs a broker that lost the revocation.
        self.broker.revoke(device_id, revoke_until(&rec, Utc::now())).await?;
        store::record_revoke(&tx, device_id).await?;
        tx.commit().await?;
        if rec.revoked_at.is_none() {
            self.metrics.devices_revoked.inc();
            tracing::info!(device_id, broker = self.broker.kind(), "device revoked");
        }
        Ok(())
    }

    /// The JWKS document.
    pub(crate) fn jwks(&self) -> Result<Value, ProvisionError> {
        self.keys
            .as_ref()
            .map(SigningKeys::jwks)
            .ok_or(ProvisionError::Disabled(
                "credentials.signing_key_file is not configured",
            ))
    }

    /// True when expired credentials must be removed from the broker by [`Provisioner::run_expiry_sweep`].
    pub(crate) fn needs_expiry_sweep(&self) -> bool {
        self.broker.needs_expiry_sweep()
    }

    /// Removes expired credentials from the broker; returns how many, and when the next one expires.
    pub(crate) async fn sweep_once(&self) -> Result<(usize, Option<DateTime<Utc>>), ProvisionError> {
        let mut session = self.connect().await?;
        let mut total = 0;
        loop {
            let tx = session.client.transaction().await?;
            let due = store::lock_expired(&tx, SWEEP_BATCH).await?;
            if due.is_empty() {
                break;
            }
            self.broker.expire(&due).await?;
            for id in &due {
                store::record_expired(&tx, id).await?;
            }
            tx.commit().await?;
            total += due.len();
            tracing::info!(devices = ?due, "expired device credentials removed from the broker");
        }
        let next = store::next_expiry(&session.client).await?;
        Ok((total, next))
    }

    /// Runs the expiry sweep until cancelled: woken at the next expiry, and at least every 15 s (another
    /// replica may issue a shorter credential meanwhile). Every replica may run it; rows are claimed with
    /// SKIP LOCKED.
    pub(crate) async fn run_expiry_sweep(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let wait = match self.sweep_once().await {
                Ok((_, next)) => next
                    .and_then(|t| (t - Utc::now()).to_std().ok())
                    .map_or(SWEEP_MAX_INTERVAL, |d| {
                        (d + Duration::from_millis(200)).min(SWEEP_MAX_INTERVAL)
                    }),
                Err(e) => {
                    tracing::warn!(error = %e, "device expiry sweep failed; retrying");
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait.max(Duration::from_millis(200))) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests;
