//! EMQX (5.5+, written against 5.8): authentication and authorisation are stateless — EMQX verifies each
//! device's JWT through the bridge's JWKS and applies the `acl` claim — so issuing pushes nothing. Revoking
//! bans the client id until the credential expires (`POST /api/v5/banned`) and kicks its session
//! (`DELETE /api/v5/clients/{clientid}`), with the REST API v5 and Basic auth `api_key:api_secret`.
//! Re-issuing a revoked device lifts its ban. Never keeps state between calls.
//!
//! Limit of the stateless design: rotating a device's credentials does not invalidate the previous JWT on
//! EMQX before its `exp` (Mosquitto replaces the password at once). Revoke, then issue, to cut it off.

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{BrokerBackend, BrokerError, Grant, ADMIN_TIMEOUT};
use crate::config::{BrokerConfig, Secret};

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
        if !base.starts_with("http://") {
            // reqwest is built without TLS here (a TLS feature would also demand a process-wide rustls
            // provider from every other reqwest user); an https API goes through a local TLS sidecar.
            return Err(BrokerError::Config(
                "broker.api_url must be an http:// URL (EMQX's REST API on a private network, or a local TLS proxy)"
                    .into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(ADMIN_TIMEOUT)
            .build()
            .map_err(|e| BrokerError::Request(e.without_url()))?;
        Ok(Emqx {
            http,
            base: base.trim_end_matches('/').to_string(),
            key,
            secret,
        })
    }

    /// One API call; `ok` lists the statuses that count as success besides 2xx.
    async fn call(
        &self,
        method: Method,
        path: String,
        body: Option<Value>,
        ok: &[StatusCode],
    ) -> Result<(), BrokerError> {
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
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        // EMQX answers a duplicate ban with 400 ALREADY_EXISTS: the device is banned, which is the goal.
        if status == StatusCode::BAD_REQUEST && text.contains("ALREADY_EXISTS") {
            return Ok(());
        }
        Err(BrokerError::Http {
            method: method_name(&method),
            path,
            status: status.as_u16(),
            body: text.chars().take(300).collect(),
        })
    }
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
            Ok(())
        })
    }

    fn revoke<'a>(&'a self, device_id: &'a str, until: DateTime<Utc>) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            // Ban first, so that the kicked device cannot reconnect in between.
            self.call(
                Method::POST,
                "/api/v5/banned".into(),
                Some(ban_body(device_id, until)),
                &[],
            )
            .await?;
            self.call(
                Method::DELETE,
                format!("/api/v5/clients/{device_id}"),
                None,
                &[StatusCode::NOT_FOUND],
            )
            .await
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

    #[test]
    fn https_api_url_is_refused_at_start() {
        let cfg = BrokerConfig {
            kind: crate::config::BrokerKind::Emqx,
            admin_username: None,
            admin_password: None,
            api_url: Some("https://emqx:18084".into()),
            api_key: Some("k".into()),
            api_secret: Some(Secret::new("s")),
        };
        assert!(matches!(Emqx::new(&cfg), Err(BrokerError::Config(_))));
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
