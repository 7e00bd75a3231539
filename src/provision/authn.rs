//! The answer to EMQX's HTTP authenticator (`POST /api/v1/broker/authn`, docs/api.md): is this password a
//! token the bridge signed that must no longer work? EMQX's JWT authenticator checks only a token's signature,
//! `exp`, `nbf` and fixed claims, so without this a rotated-away, revoked or moved device's token would connect
//! until its `exp`. The answer is `deny` for such a token and `ignore` for everything else, so that EMQX's JWT
//! authenticator, next in the chain, decides with the token's own `acl` claim. Never answers `allow`.
//!
//! What EMQX does with the answer, as read in EMQX v5.8.9:
//! - `apps/emqx_auth_http/src/emqx_authn_http.erl`, `authenticate/2` and `body_to_auth_data/1`: a 200 with
//!   a JSON body `{"result": "deny"}` refuses the client (`{error, not_authorized}`); `"ignore"` (or a missing
//!   or unknown result, or a body that is not JSON) passes to the next authenticator; **a 204 accepts the
//!   client** (so this endpoint never answers 204); any other status, a timeout or a connection failure is
//!   `ignore`: EMQX fails open to the next authenticator when the bridge cannot answer.
//! - `apps/emqx_auth/src/emqx_authn/emqx_authn_chains.erl`, `do_authenticate/3`: `ignore` goes on to the next
//!   authenticator of the chain; any other result stops the chain; past the last one the client is refused.
//! - `apps/emqx/src/emqx_channel.erl`, the connect pipeline: `check_banned/2` runs before `authenticate/2`,
//!   so a ban by client id refuses every password of the device, whatever this endpoint answers.
//!
//! Every call does bounded work: one signature check and one primary-key read, no write, on at most
//! [`AUTHN_CONNECTIONS`] database sessions kept open between calls, within [`AUTHN_DEADLINE`]. No cache: every
//! replica reads the same row, so a rotation or revocation takes effect on the next connect on every replica.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::credentials::Claims;
use super::store::{self, StoreError};
use super::{acl, ProvisionError, Provisioner};
use crate::pg;

/// Database sessions the endpoint uses at most at once (and keeps open between calls).
pub(crate) const AUTHN_CONNECTIONS: usize = 4;
/// A call that cannot be answered within this is answered 503 (EMQX: ignore). Below the 5 s `request_timeout`
/// the deployment sets on EMQX's side, so the bridge, not EMQX, decides when to give up.
pub(crate) const AUTHN_DEADLINE: Duration = Duration::from_secs(3);

/// How far past its `exp` (or before its `nbf`) a device token is still taken by the catch-up API: clock
/// skew between the device, the bridge and the database, and no more.
pub(crate) const TOKEN_LEEWAY_SECS: i64 = 5;

/// What the endpoint answers (HTTP 200 with `{"result": …}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A token of this bridge that must not connect; the reason is logged, never sent.
    Deny(&'static str),
    /// Not this bridge's business, or the device's current token: EMQX's JWT authenticator decides.
    Ignore,
}

impl Verdict {
    pub(crate) fn result(self) -> &'static str {
        match self {
            Verdict::Deny(_) => "deny",
            Verdict::Ignore => "ignore",
        }
    }
}

/// The database sessions of the endpoint: at most [`AUTHN_CONNECTIONS`], reused, a broken one dropped.
pub(crate) struct Sessions {
    permits: Semaphore,
    idle: Mutex<Vec<pg::Session>>,
}

impl Sessions {
    pub(crate) fn new() -> Sessions {
        Sessions {
            permits: Semaphore::new(AUTHN_CONNECTIONS),
            idle: Mutex::new(Vec::with_capacity(AUTHN_CONNECTIONS)),
        }
    }
}

/// The pure part of the decision: `claims` verified as signed by this bridge, `rec` the device's record.
pub(crate) fn decide(
    env: &str,
    clientid: &str,
    username: &str,
    claims: &Claims,
    rec: Option<&store::DeviceRecord>,
) -> Verdict {
    if claims.clientid != clientid || claims.username != username || claims.sub != clientid {
        return Verdict::Deny("token presented under another client id or username");
    }
    let Some(rec) = rec else {
        return Verdict::Deny("no such device");
    };
    if rec.revoked_at.is_some() {
        return Verdict::Deny("device revoked");
    }
    if rec.jti != claims.jti {
        return Verdict::Deny("not the device's current token");
    }
    if claims.acl != acl::device_acl(env, &rec.merchant_code, &rec.branch_code) {
        return Verdict::Deny("token for another merchant or branch");
    }
    Verdict::Ignore
}

impl Provisioner {
    /// Counts one answer in `delta_bridge_broker_authn_total{result}`.
    pub(crate) fn count_authn(&self, result: &str) {
        self.metrics.broker_authn.with_label_values(&[result]).inc();
    }

    /// Decides about one connect attempt. Err only when the device store cannot be read in time.
    pub(crate) async fn authn(
        &self,
        clientid: &str,
        username: &str,
        password: &str,
    ) -> Result<Verdict, ProvisionError> {
        let Some(claims) = self.keys.as_ref().and_then(|k| k.verify(password)) else {
            return Ok(Verdict::Ignore);
        };
        if !acl::is_valid_id(&claims.sub) {
            return Ok(Verdict::Deny("token for an invalid device id"));
        }
        let rec = tokio::time::timeout(AUTHN_DEADLINE, self.read_device(&claims.sub))
            .await
            .map_err(|_| StoreError::Pg(pg::PgError::Timeout(AUTHN_DEADLINE)))??;
        Ok(decide(&self.env, clientid, username, &claims, rec.as_ref()))
    }

    /// The first half of a catch-up call's device check, without the database: the token's claims when it is
    /// signed by one of this bridge's keys, for this bridge's issuer and audience, within its `exp`/`nbf` with
    /// at most [`TOKEN_LEEWAY_SECS`] of leeway (what EMQX checks itself), for a valid device id; else why not
    /// (HTTP 401; logged, never sent). Run before a database session is taken, so that a flood of forged
    /// tokens costs no session. [`Provisioner::device_scope`] is the second half.
    pub(crate) fn device_claims(&self, token: &str, now: i64) -> Result<Claims, &'static str> {
        let claims = self
            .keys
            .as_ref()
            .and_then(|k| k.verify(token))
            .ok_or("not a token signed by this bridge")?;
        if claims.iss != self.credentials.issuer || claims.aud != self.credentials.audience {
            return Err("token for another issuer or audience");
        }
        if now >= claims.exp.saturating_add(TOKEN_LEEWAY_SECS) {
            return Err("token expired");
        }
        if now.saturating_add(TOKEN_LEEWAY_SECS) < claims.nbf {
            return Err("token not valid yet");
        }
        if !acl::is_valid_id(&claims.sub) {
            return Err("token for an invalid device id");
        }
        Ok(claims)
    }

    /// The merchant and branch that `claims` (from [`Provisioner::device_claims`]) may read, from the device's
    /// record, or why not: the same decision as [`Provisioner::authn`] (the device's current `jti`, not revoked,
    /// its own branch). The record is read on `client` on every call, never cached, so a revocation or a
    /// rotation takes effect on the next call.
    pub(crate) async fn device_scope<C: tokio_postgres::GenericClient>(
        &self,
        client: &C,
        claims: &Claims,
    ) -> Result<Result<(String, String), &'static str>, ProvisionError> {
        let rec = store::get(client, &claims.sub).await?;
        match decide(&self.env, &claims.clientid, &claims.username, claims, rec.as_ref()) {
            Verdict::Deny(why) => Ok(Err(why)),
            Verdict::Ignore => match rec {
                Some(r) => Ok(Ok((r.merchant_code, r.branch_code))),
                None => Ok(Err("no such device")),
            },
        }
    }

    async fn read_device(&self, device_id: &str) -> Result<Option<store::DeviceRecord>, ProvisionError> {
        let sessions = &self.authn_sessions;
        let _permit = sessions
            .permits
            .acquire()
            .await
            .map_err(|_| ProvisionError::Disabled("shutting down"))?;
        let reused = sessions.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let session = match reused {
            Some(s) if !s.client.is_closed() => s,
            _ => pg::connect(&self.pg_url, self.connect_timeout, "delta-bridge-authn").await?,
        };
        let rec = store::get(&session.client, device_id).await?;
        // Kept only after a successful read: an error may mean a broken session.
        sessions.idle.lock().unwrap_or_else(|p| p.into_inner()).push(session);
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn rec(jti: &str, branch: &str, revoked: bool) -> store::DeviceRecord {
        let now = Utc::now();
        store::DeviceRecord {
            device_id: "pos-01".into(),
            merchant_code: "M1".into(),
            branch_code: branch.into(),
            jti: jti.into(),
            key_id: "k".into(),
            first_issued_at: now,
            issued_at: now,
            expires_at: now,
            rotations: 0,
            rotated_at: None,
            revoked_at: revoked.then_some(now),
            expired_at: None,
            max_expires_at: now,
        }
    }

    fn claims(jti: &str, branch: &str) -> Claims {
        Claims::for_device(
            "pos-01",
            acl::device_acl("dev", "M1", branch),
            "delta-bridge",
            "mqtt",
            Utc::now().timestamp(),
            3600,
            jti.into(),
        )
    }

    #[test]
    fn only_the_current_token_of_a_live_device_is_left_to_the_jwt_check() {
        let c = claims("j1", "B1");
        let d = |r: Option<&store::DeviceRecord>, id: &str, user: &str| decide("dev", id, user, &c, r);
        assert_eq!(d(Some(&rec("j1", "B1", false)), "pos-01", "pos-01"), Verdict::Ignore);
        for (verdict, why) in [
            (d(Some(&rec("j2", "B1", false)), "pos-01", "pos-01"), "rotated away"),
            (d(Some(&rec("j1", "B1", true)), "pos-01", "pos-01"), "revoked"),
            (d(Some(&rec("j1", "B2", false)), "pos-01", "pos-01"), "moved"),
            (d(None, "pos-01", "pos-01"), "unknown"),
            (d(Some(&rec("j1", "B1", false)), "pos-02", "pos-01"), "other client id"),
            (d(Some(&rec("j1", "B1", false)), "pos-01", "pos-02"), "other username"),
        ] {
            assert!(matches!(verdict, Verdict::Deny(_)), "{why}: {verdict:?}");
            assert_eq!(verdict.result(), "deny");
        }
    }
}
