//! A model of EMQX 5.8.9 for the EMQX backend's tests (EMQX itself cannot run on these machines): its REST
//! API v5 as far as delta-bridge uses it, with the state it changes, and its decision at MQTT connect time.
//! Follows EMQX's source at tag v5.8.9:
//! - bans: `apps/emqx_management/src/emqx_mgmt_api_banned.erl` (`banned/2`, `delete_banned/2`) and
//!   `apps/emqx/src/emqx_banned.erl` (`parse/1`, `create/1`) — 200 with the ban for a new one; a ban whose
//!   `until` is not in the future is 400 `BAD_REQUEST` ("Cannot create expired banned, ..."); an active ban for
//!   the same client id is 400 `ALREADY_EXISTS` whose message is the existing ban as JSON (it is never
//!   extended; an expired one is overwritten); deleting a ban that does not exist is 404 `NOT_FOUND`
//!   ("clientid: ID not found"), an existing one 204;
//! - kick: `apps/emqx_management/src/emqx_mgmt_api_clients.erl` (`kickout/1`) — `DELETE /api/v5/clients/{clientid}`
//!   is 204 for a connected client, 404 `CLIENTID_NOT_FOUND` "Client ID not found" otherwise;
//! - credentials: `apps/emqx_dashboard/src/emqx_dashboard.erl` (`api_key_authorize/4`) — every call needs
//!   Basic `api_key:api_secret`; anything else is 401 `BAD_API_KEY_OR_SECRET` "Check api_key/api_secret" with
//!   `WWW-Authenticate: Basic Realm="emqx-dashboard"` (a missing or non-Basic header: 401 too);
//! - connect: `apps/emqx/src/emqx_channel.erl` (`check_banned/2` before `authenticate/2`), the chain of
//!   `apps/emqx_auth/src/emqx_authn/emqx_authn_chains.erl` (`do_authenticate/3`: `ignore` goes on, anything
//!   else stops, the end of the chain refuses), the HTTP authenticator of
//!   `apps/emqx_auth_http/src/emqx_authn_http.erl` (`authenticate/2`: 204 allows, 200 with a JSON `result`
//!   allows, denies or ignores, any other status or a failed request ignores), then the JWT authenticator of
//!   `apps/emqx_auth_jwt/src/emqx_authn_jwt.erl` (`verify/5`: a signature no JWKS key verifies is `ignore`;
//!   `exp` must be after now and `nbf` not after now when present; each `verify_claims` entry must equal its
//!   rendered value, as emqx/emqx.conf sets them: clientid, username, iss, aud).
//!   The built-in-database authenticator first in the chain is left out: it ignores unknown usernames, and no
//!   device id is one of its accounts.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};

pub const API_KEY: &str = "delta-bridge";
pub const API_SECRET: &str = "emqx-api-secret-value";

/// One REST call as received, and the status the model answered.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: String,
    pub body: Value,
    pub status: u16,
    /// The `code` of the JSON error answered, if any.
    pub code: Option<String>,
}

#[derive(Default)]
struct Model {
    /// Client id -> `until` (unix seconds) of its ban.
    bans: HashMap<String, i64>,
    connected: HashSet<String>,
    seen: Vec<Seen>,
    /// Every REST call fails with 500 (an EMQX that refuses).
    fail: bool,
}

/// Where EMQX's HTTP authenticator and JWT authenticator point (emqx/emqx.conf).
#[derive(Clone)]
pub struct Chain {
    /// The HTTP authenticator's `url`; None: not configured (the chain is built-in database -> JWT).
    pub authn_url: Option<String>,
    /// The `Authorization` header value it sends.
    pub authn_header: String,
    pub jwks_url: String,
    pub iss: String,
    pub aud: String,
}

#[derive(Clone)]
pub struct Emqx {
    model: Arc<Mutex<Model>>,
    pub addr: SocketAddr,
}

impl Emqx {
    pub async fn start() -> Emqx {
        let model = Arc::new(Mutex::new(Model::default()));
        let app = Router::new().fallback(rest).with_state(model.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Emqx { model, addr }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().expect("model lock")
    }

    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut self.lock().seen)
    }

    pub fn set_failing(&self, fail: bool) {
        self.lock().fail = fail;
    }

    pub fn ban_until(&self, clientid: &str) -> Option<i64> {
        self.lock().bans.get(clientid).copied()
    }

    /// A client connected without going through [`Emqx::connect`] (for the REST model's own checks).
    pub fn mark_connected(&self, clientid: &str) {
        self.lock().connected.insert(clientid.to_string());
    }

    pub fn is_connected(&self, clientid: &str) -> bool {
        self.lock().connected.contains(clientid)
    }

    /// EMQX's decision for an MQTT CONNECT; Ok means CONNACK success (and the client counts as connected).
    pub async fn connect(&self, chain: &Chain, clientid: &str, username: &str, password: &str) -> Result<(), String> {
        let now = chrono::Utc::now().timestamp();
        if self.lock().bans.get(clientid).is_some_and(|until| *until > now) {
            return Err("banned".into());
        }
        let verdict = match &chain.authn_url {
            Some(url) => http_authenticator(url, &chain.authn_header, clientid, username, password).await,
            None => Step::Ignore,
        };
        let verdict = match verdict {
            Step::Ignore => jwt_authenticator(chain, clientid, username, password).await,
            decided => decided,
        };
        match verdict {
            Step::Allow => {
                self.lock().connected.insert(clientid.to_string());
                Ok(())
            }
            Step::Deny(why) => Err(why),
            Step::Ignore => Err("no authenticator accepted (end of chain)".into()),
        }
    }
}

enum Step {
    Allow,
    Deny(String),
    Ignore,
}

/// `emqx_authn_http:authenticate/2` with a POST and the JSON body template of emqx/emqx.conf.
async fn http_authenticator(url: &str, header: &str, clientid: &str, username: &str, password: &str) -> Step {
    let resp = reqwest::Client::new()
        .post(url)
        .header("Authorization", header)
        .header("Content-Type", "application/json")
        .timeout(Duration::from_secs(5))
        .body(json!({"clientid": clientid, "username": username, "password": password}).to_string())
        .send()
        .await;
    let Ok(resp) = resp else { return Step::Ignore };
    match resp.status().as_u16() {
        204 => Step::Allow,
        200 => {
            let json_body = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            match (json_body, body["result"].as_str()) {
                (true, Some("allow")) => Step::Allow,
                (true, Some("deny")) => Step::Deny("HTTP authenticator: deny".into()),
                _ => Step::Ignore,
            }
        }
        _ => Step::Ignore,
    }
}

/// `emqx_authn_jwt:authenticate/2` with `use_jwks = true`.
async fn jwt_authenticator(chain: &Chain, clientid: &str, username: &str, password: &str) -> Step {
    let Ok(resp) = reqwest::get(&chain.jwks_url).await else {
        return Step::Ignore;
    };
    let Ok(set) = resp.json::<jsonwebtoken::jwk::JwkSet>().await else {
        return Step::Ignore;
    };
    let Ok(header) = jsonwebtoken::decode_header(password) else {
        return Step::Ignore;
    };
    // Signature only here: EMQX tries every key of the set and ignores a token none of them verifies.
    let mut claims: Option<Value> = None;
    for jwk in &set.keys {
        let Ok(key) = jsonwebtoken::DecodingKey::from_jwk(jwk) else {
            continue;
        };
        let mut v = jsonwebtoken::Validation::new(header.alg);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        if let Ok(data) = jsonwebtoken::decode::<Value>(password, &key, &v) {
            claims = Some(data.claims);
            break;
        }
    }
    let Some(claims) = claims else { return Step::Ignore };
    let now = chrono::Utc::now().timestamp();
    if claims.get("exp").is_some_and(|e| e.as_i64().is_none_or(|e| now >= e)) {
        return Step::Deny("JWT: expired".into());
    }
    if claims.get("nbf").is_some_and(|n| n.as_i64().is_none_or(|n| n > now)) {
        return Step::Deny("JWT: not yet valid".into());
    }
    for (name, expected) in [
        ("clientid", clientid),
        ("username", username),
        ("iss", chain.iss.as_str()),
        ("aud", chain.aud.as_str()),
    ] {
        if claims.get(name).and_then(Value::as_str) != Some(expected) {
            return Step::Deny(format!("JWT: claim {name}"));
        }
    }
    Step::Allow
}

fn basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{API_KEY}:{API_SECRET}"))
    )
}

fn answer(status: StatusCode, body: Value) -> (StatusCode, Value) {
    (status, body)
}

/// EMQX's error answers: `{"code": ..., "message": ...}` (`emqx_dashboard_swagger:error_codes/2`).
fn error(status: StatusCode, code: &str, message: &str) -> (StatusCode, Value) {
    (status, json!({"code": code, "message": message}))
}

/// The REST API v5 calls delta-bridge makes, with EMQX's answers; each is recorded with its status.
async fn rest(
    State(model): State<Arc<Mutex<Model>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut seen = Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        status: 0,
        code: None,
    };
    let mut m = model.lock().expect("model lock");
    let (status, body) = decide(&mut m, &seen);
    seen.status = status.as_u16();
    seen.code = body["code"].as_str().map(str::to_string);
    m.seen.push(seen);
    let mut resp = if body.is_null() {
        status.into_response()
    } else {
        (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    };
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic Realm=\"emqx-dashboard\""),
        );
    }
    resp
}

fn decide(m: &mut Model, seen: &Seen) -> (StatusCode, Value) {
    if seen.authorization != basic() {
        return error(
            StatusCode::UNAUTHORIZED,
            "BAD_API_KEY_OR_SECRET",
            "Check api_key/api_secret",
        );
    }
    if m.fail {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", "refused");
    }
    let now = chrono::Utc::now().timestamp();
    match (seen.method.as_str(), seen.path.as_str()) {
        ("POST", "/api/v5/banned") => {
            let b = &seen.body;
            let until = b["until"]
                .as_str()
                .and_then(|u| chrono::DateTime::parse_from_rfc3339(u).ok())
                .map(|u| u.timestamp());
            let (Some("clientid"), Some(who), Some(until)) = (b["as"].as_str(), b["who"].as_str(), until) else {
                return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", "invalid ban");
            };
            if until <= now {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BAD_REQUEST",
                    &format!("Cannot create expired banned, {now} to {until}"),
                );
            }
            if let Some(old) = m.bans.get(who).filter(|u| **u > now) {
                // As EMQX's `emqx_banned:format/1`: times in RFC 3339 with the offset, to the second.
                let rfc3339 = |t: i64| {
                    chrono::DateTime::from_timestamp(t, 0)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, false))
                        .unwrap_or_default()
                };
                let old = json!({"as": "clientid", "who": who, "by": "delta-bridge", "reason": "",
                                 "at": rfc3339(now), "until": rfc3339(*old)})
                .to_string();
                return error(StatusCode::BAD_REQUEST, "ALREADY_EXISTS", &old);
            }
            m.bans.insert(who.to_string(), until);
            answer(StatusCode::OK, seen.body.clone())
        }
        ("DELETE", p) if p.starts_with("/api/v5/banned/clientid/") => {
            let who = &p["/api/v5/banned/clientid/".len()..];
            match m.bans.remove(who) {
                Some(_) => answer(StatusCode::NO_CONTENT, Value::Null),
                None => error(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    &format!("clientid: {who} not found"),
                ),
            }
        }
        ("DELETE", p) if p.starts_with("/api/v5/clients/") => {
            if m.connected.remove(&p["/api/v5/clients/".len()..]) {
                answer(StatusCode::NO_CONTENT, Value::Null)
            } else {
                error(StatusCode::NOT_FOUND, "CLIENTID_NOT_FOUND", "Client ID not found")
            }
        }
        _ => error(StatusCode::NOT_FOUND, "NOT_FOUND", "not modelled"),
    }
}
