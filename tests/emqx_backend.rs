//! The EMQX backend against a local stub of EMQX's REST API v5 (EMQX itself cannot run on these machines):
//! the stub records every request and the test asserts the documented shapes — nothing pushed on issue,
//! ban (`POST /api/v5/banned`) then kick (`DELETE /api/v5/clients/{clientid}`) on revoke, the ban lifted on
//! re-issue, Basic auth `api_key:api_secret` on each — and that a refusing EMQX leaves the device unrevoked.
//! Also covers RS256 through the service: the token verifies against the JWKS with jsonwebtoken.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Router;
use base64::Engine;
use common::Env;
use delta_bridge::config::Config;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const API_KEY: &str = "delta-bridge";
const API_SECRET: &str = "emqx-api-secret-value";

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: String,
    body: Value,
}

#[derive(Clone, Default)]
struct Stub {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// When set, every call fails with 500 (an EMQX that is down or refuses).
    fail: Arc<AtomicBool>,
}

impl Stub {
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

async fn record(
    State(stub): State<Stub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let seen = Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    stub.seen.lock().expect("lock").push(seen.clone());
    if stub.fail.load(Ordering::SeqCst) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"code\":\"INTERNAL_ERROR\"}".into(),
        );
    }
    // What EMQX 5.8 answers: a created ban echoes it; an absent client or ban is 404.
    match (seen.method.as_str(), seen.path.as_str()) {
        ("POST", "/api/v5/banned") => (StatusCode::OK, seen.body.to_string()),
        ("DELETE", p) if p.starts_with("/api/v5/clients/") => {
            (StatusCode::NOT_FOUND, "{\"code\":\"CLIENTID_NOT_FOUND\"}".into())
        }
        ("DELETE", p) if p.starts_with("/api/v5/banned/clientid/") => (StatusCode::NO_CONTENT, String::new()),
        _ => (StatusCode::NOT_FOUND, "{\"code\":\"NOT_FOUND\"}".into()),
    }
}

async fn start_stub() -> (Stub, SocketAddr) {
    let stub = Stub::default();
    let app = Router::new().fallback(record).with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (stub, addr)
}

async fn call(http: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{http}{path}"))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"));
    if let Some(b) = body {
        req = req.header("Content-Type", "application/json").body(b.to_string());
    }
    let resp = req.send().await.expect("http");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("text");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn issue_body(device: &str) -> Value {
    json!({"device_id": device, "merchant_code": "MCH-MST-001", "branch_code": "BRN-MST-OSK00002", "ttl_seconds": 3600})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emqx_backend_speaks_the_documented_api() {
    let env = Env::start("emqx");
    let (stub, addr) = start_stub().await;
    let key = env.dir.join("rsa-signing-key.pem");
    let out = std::process::Command::new("openssl")
        .args(["genrsa", "2048"])
        .output()
        .expect("openssl");
    assert!(out.status.success());
    std::fs::write(&key, out.stdout).expect("key");
    let toml = env.config_toml(&format!(
        "[credentials]\nsigning_key_file = \"{}\"\n[broker]\nkind = \"emqx\"\napi_url = \"http://{addr}\"\napi_key = \"{API_KEY}\"\n",
        key.display()
    ));
    let secrets: Vec<(String, String)> = [
        ("DELTA_BRIDGE__HTTP__ADMIN_TOKEN", ADMIN_TOKEN),
        ("DELTA_BRIDGE__BROKER__API_SECRET", API_SECRET),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = Config::parse(&toml, Path::new("test.toml"), &secrets).expect("config");
    let bridge = env.bridge_with(cfg).await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{API_KEY}:{API_SECRET}"))
    );

    // Issue: stateless on EMQX, nothing is pushed.
    let (status, creds) = call(
        &bridge.http,
        reqwest::Method::POST,
        "/api/v1/devices",
        Some(issue_body("tab-01")),
    )
    .await;
    assert_eq!(status, 201, "{creds}");
    assert!(stub.take().is_empty(), "issuing calls nothing on EMQX");

    // What EMQX checks: RS256 signature through the JWKS, exp/nbf, clientid = username, the acl claim.
    let token = creds["password"].as_str().expect("password");
    let claims = common::verify_with_jwks(&bridge.http, token, jsonwebtoken::Algorithm::RS256).await;
    assert_eq!(claims["clientid"], "tab-01");
    assert_eq!(claims["username"], "tab-01");
    assert_eq!(
        claims["acl"],
        json!([{"permission": "allow", "action": "subscribe", "topic": "dev/MCH-MST-001/BRN-MST-OSK00002/#"},
               {"permission": "deny", "action": "all", "topic": "#"}])
    );
    let exp = claims["exp"].as_i64().expect("exp");

    // Revoke: ban by client id until the credential has expired, then kick (404 = not connected = fine).
    let (status, _) = call(&bridge.http, reqwest::Method::DELETE, "/api/v1/devices/tab-01", None).await;
    assert_eq!(status, 204);
    let seen = stub.take();
    let calls: Vec<(String, String)> = seen.iter().map(|s| (s.method.clone(), s.path.clone())).collect();
    assert_eq!(
        calls,
        [
            ("POST".to_string(), "/api/v5/banned".to_string()),
            ("DELETE".to_string(), "/api/v5/clients/tab-01".to_string())
        ],
        "ban first, so the kicked device cannot reconnect in between"
    );
    for s in &seen {
        assert_eq!(s.authorization, basic, "Basic auth with api_key:api_secret");
    }
    let ban = &seen[0].body;
    assert_eq!(ban["as"], "clientid");
    assert_eq!(ban["who"], "tab-01");
    let until = chrono::DateTime::parse_from_rfc3339(ban["until"].as_str().expect("until")).expect("RFC 3339");
    assert_eq!(until.timestamp(), exp + 60, "banned until the token is dead");
    let (_, rec) = call(&bridge.http, reqwest::Method::GET, "/api/v1/devices/tab-01", None).await;
    assert_eq!(rec["revoked"], true);

    // Re-issuing a revoked device lifts its ban.
    let (status, _) = call(
        &bridge.http,
        reqwest::Method::POST,
        "/api/v1/devices",
        Some(issue_body("tab-01")),
    )
    .await;
    assert_eq!(status, 201);
    let seen = stub.take();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("DELETE", "/api/v5/banned/clientid/tab-01")
    );
    assert_eq!(seen[0].authorization, basic);

    // An EMQX that refuses: 502, a JSON error without EMQX's text, and the device stays unrevoked.
    stub.fail.store(true, Ordering::SeqCst);
    let (status, body) = call(&bridge.http, reqwest::Method::DELETE, "/api/v1/devices/tab-01", None).await;
    assert_eq!(status, 502, "{body}");
    assert!(!body["error"].as_str().expect("error").contains("INTERNAL_ERROR"));
    let (_, rec) = call(&bridge.http, reqwest::Method::GET, "/api/v1/devices/tab-01", None).await;
    assert_eq!(rec["revoked"], false, "not recorded as revoked when EMQX did not ban");
    stub.fail.store(false, Ordering::SeqCst);

    let metrics = common::scrape(&bridge.http).await;
    assert!(metrics.contains("delta_bridge_devices_issued_total 2"), "{metrics}");
    assert!(metrics.contains("delta_bridge_devices_revoked_total 1"));
    bridge.stop().await;
}
