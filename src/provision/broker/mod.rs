//! Broker backends behind one interface: what a broker must be told when a device is issued, revoked or its
//! credential expires. `mosquitto` pushes a client and a role per device through the dynamic-security plugin;
//! `emqx` pushes nothing per device (EMQX asks the bridge which token is current, then checks the JWT
//! through the JWKS), kicks on every rotation, bans and kicks on revocation; `none` only issues credentials. Backends never touch the database: the caller holds the
//! device's row lock and commits only after the broker agreed.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;

use crate::config::{BrokerKind, Config, Secret};

pub(crate) mod emqx;
pub(crate) mod mosquitto;

/// Every broker admin call is bounded by this.
pub(crate) const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker admin connection failed: {0}")]
    Connect(String),
    #[error("broker refused {command}: {error}")]
    Refused { command: String, error: String },
    #[error("broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("EMQX API {method} {path} answered HTTP {status}: {body}")]
    Http {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("EMQX API request failed: {0}")]
    Request(#[source] reqwest::Error),
    #[error("invalid broker settings: {0}")]
    Config(String),
    /// The name belongs to a broker account delta-bridge did not create (the bridge's own, an operator's).
    #[error("broker account {0} exists and is not a delta-bridge device")]
    NotOurs(String),
}

/// What a broker is told when credentials are issued (first time or rotation).
#[derive(Debug)]
pub(crate) struct Grant {
    pub device_id: String,
    /// The JWT, which is the MQTT password.
    pub password: Secret,
    pub env: String,
    pub merchant_code: String,
    pub branch_code: String,
    /// The device was revoked or expired before: a ban or a removal may have to be undone.
    pub reinstated: bool,
    /// The device had credentials before (a rotation, a move, a reinstatement): a session may use them.
    pub rotation: bool,
}

pub(crate) trait BrokerBackend: Send + Sync {
    fn kind(&self) -> &'static str;

    /// Lets the device connect with `grant.password` (replacing any earlier password) and subscribe to its
    /// branch only.
    fn grant<'a>(&'a self, grant: &'a Grant) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Called after a rotation is committed (the new token is the device's current one): ends any session of
    /// the device again, in case it reconnected with its earlier token between `grant` and the commit.
    /// Mosquitto ends sessions itself when the password changes.
    fn issued<'a>(&'a self, _device_id: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    /// Disconnects the device and keeps it out (until `until` at least, when its credential expires anyway).
    fn revoke<'a>(&'a self, device_id: &'a str, until: DateTime<Utc>) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// True for brokers that do not read the JWT's `exp` (Mosquitto): the expiry sweep must remove expired
    /// credentials from them.
    fn needs_expiry_sweep(&self) -> bool;

    /// Removes expired credentials (called by the sweep only when `needs_expiry_sweep`).
    fn expire<'a>(&'a self, device_ids: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>>;
}

/// The backend named by `broker.kind`.
pub(crate) fn from_config(cfg: &Config) -> Result<Arc<dyn BrokerBackend>, BrokerError> {
    Ok(match cfg.broker.kind {
        BrokerKind::Mosquitto => Arc::new(mosquitto::Mosquitto::new(cfg)?),
        BrokerKind::Emqx => Arc::new(emqx::Emqx::new(&cfg.broker)?),
        BrokerKind::None => Arc::new(NoBroker),
    })
}

/// `broker.kind = "none"`: credentials only; the broker is configured by other means.
pub(crate) struct NoBroker;

impl BrokerBackend for NoBroker {
    fn kind(&self) -> &'static str {
        "none"
    }
    fn grant<'a>(&'a self, _: &'a Grant) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
    fn revoke<'a>(&'a self, _: &'a str, _: DateTime<Utc>) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
    fn needs_expiry_sweep(&self) -> bool {
        false
    }
    fn expire<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}
