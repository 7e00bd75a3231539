//! EMQX (5.7.2 to 5.8.x, written against 5.8.9), REST API v5 with Basic auth `api_key:api_secret`. EMQX verifies each
//! device's JWT through the bridge's JWKS and applies its `acl` claim, but its JWT authenticator cannot tell
//! a device's current token from an earlier one (EMQX v5.8.9, `apps/emqx_auth_jwt/src/emqx_authn_jwt.erl`,
//! `verify_claims/2`: signature, `exp`, `nbf` and fixed claim values only). So EMQX asks the bridge first, on
//! every connect, through its HTTP authenticator ([`crate::provision::authn`]), and this backend only has to:
//! - on a rotation (any issue of a device that had credentials): kick the device's session
//!   (`DELETE /api/v5/clients/{clientid}`) before the commit, so that a session opened with an earlier token
//!   has to authenticate again, and once more after it, for a reconnect in between;
//! - on revoke: ban the client id (`POST /api/v5/banned`) until every token the device was ever issued has
//!   expired, then kick. The ban is the backstop for when EMQX cannot reach the bridge (its HTTP authenticator
//!   then passes the client on to the JWT check). A ban never ends in the past: EMQX refuses those (400);
//! - on a re-issue after revoke: lift the ban (`DELETE /api/v5/banned/clientid/{clientid}`; 404 if it lapsed),
//!   since a ban by client id refuses the new token too (EMQX v5.8.9, `apps/emqx/src/emqx_banned.erl`).
//!
//! Never keeps state between calls.

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{BrokerBackend, BrokerError, Grant, ADMIN_TIMEOUT};
use crate::config::{BrokerConfig, Secret};
use crate::tls::{Roots, Verify};

pub(crate) struct Emqx {
    http: reqwest::Client,
    base: String,
    key: String,
    secret: Secret,
}

impl Emqx {
    pub(crate) fn new(cfg: &BrokerConfig) -> Result<Emqx, BrokerError> {
        let need = |what: &str| BrokerError::Config(format!("broker.{what} is required for emqx"));
        let base = cfg.api_url.clone().ok_or_else(|| need("api_url"))?;
        let key = cfg.api_key.clone().ok_or_else(|| need("api_key"))?;
        let secret = cfg.api_secret.clone().ok_or_else(|| need("api_secret"))?;
        let mut http = reqwest::Client::builder().timeout(ADMIN_TIMEOUT);
        if base.starts_with("https://") {
            // The API is verified like every TLS peer of the bridge (chain and host name, against
            // broker.api_ca_file or the system's roots), with our own rustls configuration: reqwest's
            // defaults would trust no root at all in this build.
            let roots = Roots::from_option(cfg.api_ca_file.as_deref());
            let tls = crate::tls::client_config(&roots, Verify::Full)
                .map_err(|e| BrokerError::Config(format!("broker.api_ca_file: {e}")))?;
            http = http.use_preconfigured_tls(tls).https_only(true);
        } else if !base.starts_with("http://") {
            return Err(BrokerError::Config(
                "broker.api_url must be an http:// or https:// URL".into(),
            ));
        }
        let http = http.build().map_err(|e| BrokerError::Request(e.without_url()))?;
        Ok(Emqx {
            http,
            base: base.trim_end_matches('/').to_string(),
            key,
            secret,
        })
    }

    /// Ends the device's session, if any (404: not connected).
    async fn kick(&self, device_id: &str) -> Result<(), BrokerError> {
        // Device ids are [A-Za-z0-9_.-] (checked before any call): safe in a path as they are.
        self.call(
            Method::DELETE,
            format!("/api/v5/clients/{device_id}"),
            None,
            &[StatusCode::NOT_FOUND],
        )
        .await
    }

    /// One API call; `ok` lists the statuses that count as success besides 2xx.
    async fn call(
        &self,
        method: Method,
        path: String,
        body: Option<Value>,
        ok: &[StatusCode],
    ) -> Result<(), BrokerError> {
        match self.answer(method, path, body, ok).await? {
            Answer::Done => Ok(()),
            Answer::Refused(e) => Err(shortened(e)),
        }
    }

    /// Bans the device until `until`. EMQX never extends or shortens a ban that is still active: a second
    /// `POST /api/v5/banned` for the same client id answers 400 `ALREADY_EXISTS` with the existing ban as its
    /// message (EMQX v5.8.9, `apps/emqx/src/emqx_banned.erl`, `create/1`; `apps/emqx_management/src/
    /// emqx_mgmt_api_banned.erl`, `banned/2`). An existing ban that ends at or after `until` (or never) does
    /// the job; one that ends earlier (an operator's short ban, an earlier revoke's) would lapse while a revoked
    /// token is still valid, so it is lifted and the ban created again. A ban that keeps coming back in between
    /// (someone else banning the same id) is an error rather than a loop.
    async fn ban(&self, device_id: &str, until: DateTime<Utc>) -> Result<(), BrokerError> {
        for _ in 0..3 {
            let body = ban_body(device_id, until);
            match self
                .answer(Method::POST, "/api/v5/banned".into(), Some(body), &[])
                .await?
            {
                Answer::Done => return Ok(()),
                Answer::Refused(BrokerError::Http { status: 400, body, .. })
                    if error_code(&body).as_deref() == Some("ALREADY_EXISTS") =>
                {
                    if existing_ban_covers(&body, until) {
                        return Ok(());
                    }
                    self.call(
                        Method::DELETE,
                        format!("/api/v5/banned/clientid/{device_id}"),
                        None,
                        &[StatusCode::NOT_FOUND],
                    )
                    .await?;
                }
                Answer::Refused(e) => return Err(shortened(e)),
            }
        }
        Err(BrokerError::Http {
            method: "POST",
            path: "/api/v5/banned".into(),
            status: 400,
            body: "ALREADY_EXISTS: an earlier, shorter ban of this client id kept coming back after it was lifted"
                .into(),
        })
    }

    /// One API call, a refusal returned as a value (the whole error body kept, for [`Emqx::ban`]).
    async fn answer(
        &self,
        method: Method,
        path: String,
        body: Option<Value>,
        ok: &[StatusCode],
    ) -> Result<Answer, BrokerError> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .basic_auth(&self.key, Some(self.secret.expose()));
        if let Some(b) = &body {
            req = req.json(b);
        }
        // reqwest's error prints the URL, userinfo and all: broker.api_url may carry the API secret there.
        let resp = req.send().await.map_err(|e| BrokerError::Request(e.without_url()))?;
        let status = resp.status();
        if status.is_success() || ok.contains(&status) {
            return Ok(Answer::Done);
        }
        let text = resp.text().await.unwrap_or_default();
        // At most a few KiB kept: enough for an EMQX error (and the ban it quotes), bounded for anything else.
        Ok(Answer::Refused(BrokerError::Http {
            method: method_name(&method),
            path,
            status: status.as_u16(),
            body: text.chars().take(4096).collect(),
        }))
    }
}

/// An error as reported (logs, the API's 502): the first 300 characters of EMQX's answer.
fn shortened(e: BrokerError) -> BrokerError {
    match e {
        BrokerError::Http {
            method,
            path,
            status,
            body,
        } => BrokerError::Http {
            method,
            path,
            status,
            body: body.chars().take(300).collect(),
        },
        other => other,
    }
}

/// What an API call came to, short of a failure to reach EMQX.
enum Answer {
    Done,
    Refused(BrokerError),
}

/// Whether the ban quoted in an `ALREADY_EXISTS` answer (its `message`: the ban as JSON, `until` an RFC 3339
/// time or `"infinity"`) lasts at least until `until`. Anything unreadable counts as not: the ban is then
/// made again, which is safe.
fn existing_ban_covers(error_body: &str, until: DateTime<Utc>) -> bool {
    let Some(message) = serde_json::from_str::<Value>(error_body)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_string))
    else {
        return false;
    };
    let Ok(ban) = serde_json::from_str::<Value>(&message) else {
        return false;
    };
    match ban.get("until").and_then(Value::as_str) {
        Some("infinity") => true,
        Some(t) => DateTime::parse_from_rfc3339(t).is_ok_and(|t| t >= until),
        None => false,
    }
}

/// The `code` of an EMQX error answer (`{"code": ..., "message": ...}`), if it is one.
fn error_code(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    v.get("code")?.as_str().map(str::to_string)
}

/// `until`, or a minute from now if that is later: EMQX refuses a ban whose `until` is not in the future
/// (EMQX v5.8.9, `apps/emqx/src/emqx_banned.erl`, `parse/1`).
pub(crate) fn ban_until(until: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    until.max(now + chrono::Duration::seconds(60))
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        _ => "GET",
    }
}

/// The body of `POST /api/v5/banned` for a device.
pub(crate) fn ban_body(device_id: &str, until: DateTime<Utc>) -> Value {
    json!({
        "as": "clientid",
        "who": device_id,
        "by": "delta-bridge",
        "reason": "device credentials revoked",
        "until": until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
}

impl BrokerBackend for Emqx {
    fn kind(&self) -> &'static str {
        "emqx"
    }

    fn grant<'a>(&'a self, grant: &'a Grant) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            if grant.reinstated {
                // Device ids are [A-Za-z0-9_.-] (checked before any call): safe in a path as they are.
                self.call(
                    Method::DELETE,
                    format!("/api/v5/banned/clientid/{}", grant.device_id),
                    None,
                    &[StatusCode::NOT_FOUND],
                )
                .await?;
            }
            if grant.rotation {
                self.kick(&grant.device_id).await?;
            }
            Ok(())
        })
    }

    fn issued<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.kick(device_id))
    }

    fn revoke<'a>(&'a self, device_id: &'a str, until: DateTime<Utc>) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            // Ban first, so that the kicked device cannot reconnect in between.
            self.ban(device_id, ban_until(until, Utc::now())).await?;
            self.kick(device_id).await
        })
    }

    fn needs_expiry_sweep(&self) -> bool {
        // EMQX checks `exp` at connect and, with disconnect_after_expire, disconnects at expiry.
        false
    }

    fn expire<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emqx_at(url: &str, ca: Option<&str>) -> BrokerConfig {
        BrokerConfig {
            kind: crate::config::BrokerKind::Emqx,
            admin_username: None,
            admin_password: None,
            api_url: Some(url.into()),
            api_ca_file: ca.map(Into::into),
            api_key: Some("k".into()),
            api_secret: Some(Secret::new("s")),
            authn_token: Some(Secret::new("t")),
        }
    }

    #[test]
    fn an_unreadable_api_ca_file_is_refused_at_start_with_its_key() {
        let cfg = emqx_at("https://emqx:18084", Some("/nonexistent/emqx-ca.pem"));
        match Emqx::new(&cfg) {
            Err(BrokerError::Config(why)) => {
                assert!(
                    why.contains("broker.api_ca_file") && why.contains("/nonexistent/emqx-ca.pem"),
                    "{why}"
                )
            }
            other => panic!("expected a configuration error, got {:?}", other.map(|_| ())),
        }
        assert!(matches!(
            Emqx::new(&emqx_at("ftp://emqx", None)),
            Err(BrokerError::Config(_))
        ));
    }

    #[test]
    fn an_existing_ban_covers_only_when_it_lasts_as_long() {
        let until = DateTime::parse_from_rfc3339("2026-12-03T12:00:00Z")
            .expect("t")
            .with_timezone(&Utc);
        let answer = |ban_until: &str| {
            let ban = json!({"as": "clientid", "who": "pos-1", "until": ban_until}).to_string();
            json!({"code": "ALREADY_EXISTS", "message": ban}).to_string()
        };
        assert!(existing_ban_covers(&answer("infinity"), until));
        assert!(existing_ban_covers(&answer("2026-12-03T12:00:00+00:00"), until));
        assert!(
            existing_ban_covers(&answer("2026-12-03T21:00:00+09:00"), until),
            "same instant"
        );
        assert!(!existing_ban_covers(&answer("2026-12-03T11:59:59Z"), until), "shorter");
        assert!(!existing_ban_covers(&answer("soon"), until));
        assert!(!existing_ban_covers(
            r#"{"code":"ALREADY_EXISTS","message":"not json"}"#,
            until
        ));
        assert!(!existing_ban_covers("{}", until));
    }

    #[test]
    fn only_the_code_already_exists_counts() {
        assert_eq!(
            error_code(r#"{"code":"ALREADY_EXISTS","message":"{\"who\":\"pos-1\"}"}"#),
            Some("ALREADY_EXISTS".into())
        );
        assert_eq!(
            error_code(r#"{"code": "BAD_REQUEST", "message": "ALREADY_EXISTS expired"}"#),
            Some("BAD_REQUEST".into())
        );
        assert_eq!(error_code("ALREADY_EXISTS"), None);
    }

    #[test]
    fn a_ban_never_ends_in_the_past() {
        let now = Utc::now();
        let later = now + chrono::Duration::hours(2);
        assert_eq!(ban_until(later, now), later);
        let past = now - chrono::Duration::hours(2);
        assert_eq!(ban_until(past, now), now + chrono::Duration::seconds(60));
    }

    #[test]
    fn ban_body_is_by_clientid_until_expiry() {
        let until = DateTime::parse_from_rfc3339("2030-01-02T03:04:05Z")
            .expect("date")
            .with_timezone(&Utc);
        assert_eq!(
            ban_body("pos-01", until),
            json!({"as": "clientid", "who": "pos-01", "by": "delta-bridge",
                   "reason": "device credentials revoked", "until": "2030-01-02T03:04:05Z"})
        );
    }
}
