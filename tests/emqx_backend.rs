//! The EMQX backend against a model of EMQX 5.8.9 (tests/emqx_stub: its REST API v5 with the bans and
//! sessions it keeps, and its connect-time decision: bans, then the HTTP authenticator calling the bridge as
//! EMQX would, then the JWT authenticator on the bridge's JWKS; the EMQX source files it follows are named
//! there). EMQX itself cannot run on these machines. Checks the REST calls' shapes (Basic auth, ban then kick,
//! the ban lifted on re-issue, a refusing EMQX leaves the device unrevoked) and the contract: after a rotation,
//! a rotation to a shorter lifetime, a move to another branch, or a DELETE and a re-issue, no earlier password
//! of the device connects, the current one does; a DELETE never sends a ban that has already ended. Also covers
//! RS256 through the service: the token verifies against the JWKS with jsonwebtoken.

mod common;
mod emqx_stub;

use std::path::Path;

use common::{Env, InProcessBridge};
use delta_bridge::config::Config;
use emqx_stub::{Chain, Emqx, API_KEY, API_SECRET};
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const AUTHN_TOKEN: &str = "emqx-authn-secret-0123456789";
const BRANCH_A: &str = "BRN-MST-OSK00001";
const BRANCH_B: &str = "BRN-MST-OSK00002";

struct Setup {
    env: Env,
    emqx: Emqx,
    bridge: InProcessBridge,
    /// The chain as emqx/emqx.conf configures it.
    chain: Chain,
}

async fn start(tag: &str) -> Setup {
    start_with_secret(tag, API_SECRET).await
}

/// The bridge configured with `api_secret` as its EMQX API secret.
async fn start_with_secret(tag: &str, api_secret: &str) -> Setup {
    let env = Env::start(tag);
    let emqx = Emqx::start().await;
    let key = env.dir.join("rsa-signing-key.pem");
    let out = std::process::Command::new("openssl")
        .args(["genrsa", "2048"])
        .output()
        .expect("openssl");
    assert!(out.status.success());
    std::fs::write(&key, out.stdout).expect("key");
    let toml = env.config_toml(&format!(
        "[credentials]\nsigning_key_file = \"{}\"\nmin_ttl = \"1s\"\n\
         [broker]\nkind = \"emqx\"\napi_url = \"http://{}\"\napi_key = \"{API_KEY}\"\n",
        key.display(),
        emqx.addr
    ));
    let secrets: Vec<(String, String)> = [
        ("DELTA_BRIDGE__HTTP__ADMIN_TOKEN", ADMIN_TOKEN),
        ("DELTA_BRIDGE__BROKER__API_SECRET", api_secret),
        ("DELTA_BRIDGE__BROKER__AUTHN_TOKEN", AUTHN_TOKEN),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = Config::parse(&toml, Path::new("test.toml"), &secrets).expect("config");
    let bridge = env.bridge_with(cfg).await;
    let chain = Chain {
        authn_url: Some(format!("{}/api/v1/broker/authn", bridge.http)),
        authn_header: format!("Bearer {AUTHN_TOKEN}"),
        jwks_url: format!("{}/.well-known/jwks.json", bridge.http),
        iss: "delta-bridge".into(),
        aud: "mqtt".into(),
    };
    Setup {
        env,
        emqx,
        bridge,
        chain,
    }
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

impl Setup {
    /// Issues and returns the password (the JWT).
    async fn issue(&self, device: &str, branch: &str, ttl: u64) -> String {
        let body =
            json!({"device_id": device, "merchant_code": "MCH-MST-001", "branch_code": branch, "ttl_seconds": ttl});
        let (status, creds) = call(&self.bridge.http, reqwest::Method::POST, "/api/v1/devices", Some(body)).await;
        assert_eq!(status, 201, "{creds}");
        creds["password"].as_str().expect("password").to_string()
    }

    async fn delete(&self, device: &str) -> (u16, Value) {
        call(
            &self.bridge.http,
            reqwest::Method::DELETE,
            &format!("/api/v1/devices/{device}"),
            None,
        )
        .await
    }

    async fn accepted(&self, device: &str, password: &str, what: &str) {
        if let Err(e) = self.emqx.connect(&self.chain, device, device, password).await {
            panic!("{what}: refused ({e}) but must connect");
        }
    }

    /// Refused, and why.
    async fn refused(&self, device: &str, password: &str, what: &str) -> String {
        match self.emqx.connect(&self.chain, device, device, password).await {
            Ok(()) => panic!("{what}: connected but must be refused"),
            Err(e) => e,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emqx_backend_speaks_the_documented_api() {
    let s = start("emqx").await;
    let http = &s.bridge.http;
    let body =
        json!({"device_id": "tab-01", "merchant_code": "MCH-MST-001", "branch_code": BRANCH_B, "ttl_seconds": 3600});

    // A first issue: nothing is pushed, nothing to kick.
    let (status, creds) = call(http, reqwest::Method::POST, "/api/v1/devices", Some(body.clone())).await;
    assert_eq!(status, 201, "{creds}");
    assert!(s.emqx.take().is_empty(), "a first issue calls nothing on EMQX");

    // What EMQX checks: RS256 signature through the JWKS, exp/nbf, clientid = username, the acl claim.
    let token = creds["password"].as_str().expect("password");
    let claims = common::verify_with_jwks(http, token, jsonwebtoken::Algorithm::RS256).await;
    assert_eq!(claims["clientid"], "tab-01");
    assert_eq!(claims["username"], "tab-01");
    assert_eq!(
        claims["acl"],
        json!([{"permission": "allow", "action": "subscribe", "topic": "dev/MCH-MST-001/BRN-MST-OSK00002/#"},
               {"permission": "deny", "action": "all", "topic": "#"}])
    );
    let exp = claims["exp"].as_i64().expect("exp");
    s.accepted("tab-01", token, "the issued token").await;

    // Revoke: ban by client id until the credential has expired, then kick the connected client (204).
    let (status, _) = s.delete("tab-01").await;
    assert_eq!(status, 204);
    let seen = s.emqx.take();
    let calls: Vec<(&str, &str)> = seen.iter().map(|c| (c.method.as_str(), c.path.as_str())).collect();
    assert_eq!(
        calls,
        [("POST", "/api/v5/banned"), ("DELETE", "/api/v5/clients/tab-01")],
        "ban first, so the kicked device cannot reconnect in between"
    );
    assert!(!s.emqx.is_connected("tab-01"), "kicked");
    let ban = &seen[0].body;
    assert_eq!(ban["as"], "clientid");
    assert_eq!(ban["who"], "tab-01");
    let until = chrono::DateTime::parse_from_rfc3339(ban["until"].as_str().expect("until")).expect("RFC 3339");
    assert_eq!(until.timestamp(), exp + 60, "banned until the token is dead");
    let (_, rec) = call(http, reqwest::Method::GET, "/api/v1/devices/tab-01", None).await;
    assert_eq!(rec["revoked"], true);
    assert_eq!(s.delete("tab-01").await.0, 204, "again: EMQX's ALREADY_EXISTS is fine");
    let answers: Vec<(u16, Option<String>)> = s.emqx.take().into_iter().map(|c| (c.status, c.code)).collect();
    assert_eq!(
        answers,
        [
            (400, Some("ALREADY_EXISTS".to_string())),
            (404, Some("CLIENTID_NOT_FOUND".to_string()))
        ],
        "the second DELETE met EMQX's answers for an active ban and a client not connected"
    );

    // Re-issuing a revoked device lifts its ban; a rotation kicks before and after the commit.
    let (status, _) = call(http, reqwest::Method::POST, "/api/v1/devices", Some(body)).await;
    assert_eq!(status, 201);
    let seen = s.emqx.take();
    let calls: Vec<(&str, &str)> = seen.iter().map(|c| (c.method.as_str(), c.path.as_str())).collect();
    assert_eq!(
        calls,
        [
            ("DELETE", "/api/v5/banned/clientid/tab-01"),
            ("DELETE", "/api/v5/clients/tab-01"),
            ("DELETE", "/api/v5/clients/tab-01")
        ]
    );
    assert_eq!(s.emqx.ban_until("tab-01"), None);

    // An EMQX that refuses: 502, a JSON error without EMQX's text, and the device stays unrevoked.
    s.emqx.set_failing(true);
    let (status, body) = s.delete("tab-01").await;
    assert_eq!(status, 502, "{body}");
    assert!(!body["error"].as_str().expect("error").contains("INTERNAL_ERROR"));
    let (_, rec) = call(http, reqwest::Method::GET, "/api/v1/devices/tab-01", None).await;
    assert_eq!(rec["revoked"], false, "not recorded as revoked when EMQX did not ban");
    s.emqx.set_failing(false);

    let metrics = common::scrape(http).await;
    assert!(metrics.contains("delta_bridge_devices_issued_total 2"), "{metrics}");
    assert!(metrics.contains("delta_bridge_devices_revoked_total 1"));
    assert_eq!(
        common::sample(&metrics, "delta_bridge_broker_authn_total{result=\"ignore\"} "),
        Some(1.0),
        "{metrics}"
    );
    s.bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_earlier_password_connects_again() {
    let s = start("emqx-life").await;

    // Rotation: the first token is refused at once, the new one connects; the old session is kicked.
    let first = s.issue("pos-10", BRANCH_A, 3600).await;
    s.accepted("pos-10", &first, "first token").await;
    let second = s.issue("pos-10", BRANCH_A, 3600).await;
    assert!(!s.emqx.is_connected("pos-10"), "rotation ends the old session");
    s.refused("pos-10", &first, "rotated-away token").await;
    s.accepted("pos-10", &second, "current token").await;

    // Rotation to a shorter lifetime: the longer, earlier token is refused.
    let long = s.issue("pos-11", BRANCH_A, 86_400).await;
    let short = s.issue("pos-11", BRANCH_A, 60).await;
    s.refused("pos-11", &long, "longer rotated-away token").await;
    s.accepted("pos-11", &short, "shorter current token").await;
    // Revoked, the ban outlasts the longer token, not only the current one.
    let long_exp = common::verify_with_jwks(&s.bridge.http, &long, jsonwebtoken::Algorithm::RS256).await["exp"]
        .as_i64()
        .expect("exp");
    assert_eq!(s.delete("pos-11").await.0, 204);
    assert_eq!(
        s.emqx.ban_until("pos-11"),
        Some(long_exp + 60),
        "ban until the latest exp + 60 s"
    );

    // A move to another branch: the old branch's token is refused, the new one connects.
    let old_branch = s.issue("pos-12", BRANCH_A, 3600).await;
    let new_branch = s.issue("pos-12", BRANCH_B, 3600).await;
    s.refused("pos-12", &old_branch, "token of the old branch").await;
    s.accepted("pos-12", &new_branch, "token of the new branch").await;

    // DELETE, then issue again: the revoked token stays refused, though the ban had to be lifted.
    let revoked = s.issue("pos-13", BRANCH_A, 3600).await;
    assert_eq!(s.delete("pos-13").await.0, 204);
    assert_eq!(s.refused("pos-13", &revoked, "revoked token").await, "banned");
    let again = s.issue("pos-13", BRANCH_A, 3600).await;
    assert_eq!(s.emqx.ban_until("pos-13"), None, "lifted for the new token");
    let why = s.refused("pos-13", &revoked, "revoked token after a re-issue").await;
    assert!(why.contains("HTTP authenticator"), "{why}");
    s.accepted("pos-13", &again, "re-issued token").await;

    // Each earlier password once more, after everything: still refused.
    s.refused("pos-10", &first, "rotated-away token").await;
    s.refused("pos-12", &old_branch, "token of the old branch").await;
    let metrics = common::scrape(&s.bridge.http).await;
    let denied = common::sample(&metrics, "delta_bridge_broker_authn_total{result=\"deny\"} ").unwrap_or(0.0);
    assert_eq!(denied, 6.0, "{metrics}");
    s.bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_an_expired_device_and_the_bridge_unreachable() {
    let s = start("emqx-expired").await;

    // A device whose every token expired long ago: DELETE is 204 and no ban that has ended is sent.
    s.issue("pos-20", BRANCH_A, 3600).await;
    s.env
        .client()
        .await
        .execute(
            "UPDATE delta_bridge.devices SET expires_at = now() - interval '2 hours',
                    max_expires_at = now() - interval '2 hours' WHERE device_id = 'pos-20'",
            &[],
        )
        .await
        .expect("age the device");
    s.emqx.take();
    let before = chrono::Utc::now().timestamp();
    let (status, body) = s.delete("pos-20").await;
    assert_eq!(status, 204, "{body}");
    let ban = s
        .emqx
        .take()
        .into_iter()
        .find(|c| c.path == "/api/v5/banned")
        .expect("ban sent");
    let until = chrono::DateTime::parse_from_rfc3339(ban.body["until"].as_str().expect("until"))
        .expect("RFC 3339")
        .timestamp();
    assert!(until >= before + 59, "a ban in the future ({until} vs now {before})");

    // EMQX cannot reach the bridge (its HTTP authenticator then ignores): a revoked device stays out by its
    // ban, until every token it was issued has expired; the current token of a live device still connects.
    let revoked = s.issue("pos-21", BRANCH_A, 3600).await;
    assert_eq!(s.delete("pos-21").await.0, 204);
    let live = s.issue("pos-22", BRANCH_A, 3600).await;
    let mut unreachable = s.chain.clone();
    unreachable.authn_url = Some("http://127.0.0.1:9/api/v1/broker/authn".into());
    assert_eq!(
        s.emqx.connect(&unreachable, "pos-21", "pos-21", &revoked).await,
        Err("banned".into())
    );
    assert_eq!(s.emqx.connect(&unreachable, "pos-22", "pos-22", &live).await, Ok(()));

    // A wrong secret is 401 (EMQX: ignore, the JWT check decides), counted for the alert.
    let mut wrong = s.chain.clone();
    wrong.authn_header = "Bearer not-the-secret".into();
    let rotated = s.issue("pos-22", BRANCH_A, 3600).await;
    assert_eq!(
        s.emqx.connect(&wrong, "pos-22", "pos-22", &live).await,
        Ok(()),
        "fails open, as EMQX does: which is why the secret must match"
    );
    s.accepted("pos-22", &rotated, "current token").await;
    let metrics = common::scrape(&s.bridge.http).await;
    assert_eq!(
        common::sample(&metrics, "delta_bridge_broker_authn_total{result=\"unauthorized\"} "),
        Some(1.0),
        "{metrics}"
    );
    s.bridge.stop().await;
}

/// The model answers as EMQX 5.8.9 does (tests/emqx_stub names the EMQX source of each answer), so that the
/// backend's tests above meet real answers: credentials checked, a ban in the past refused, a duplicate ban
/// ALREADY_EXISTS, deleting a missing ban 404, kicking a connected client 204 and an unknown one 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_answers_as_emqx_5_8_9() {
    let emqx = Emqx::start().await;
    let base = format!("http://{}", emqx.addr);
    let http = reqwest::Client::new();
    let ban = |until: chrono::DateTime<chrono::Utc>| json!({"as": "clientid", "who": "pos-90", "until": until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)});
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let send = |method: reqwest::Method, path: &str, body: Option<Value>, secret: Option<&str>| {
        let mut req = http.request(method, format!("{base}{path}"));
        if let Some(secret) = secret {
            req = req.basic_auth(API_KEY, Some(secret));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            let www = resp
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let body: Value = serde_json::from_str(&resp.text().await.expect("text")).unwrap_or(Value::Null);
            (status, body, www)
        }
    };
    use reqwest::Method;

    // Credentials: none, or a wrong secret, is 401 BAD_API_KEY_OR_SECRET, and nothing happens.
    for secret in [None, Some("not-the-secret")] {
        let (status, body, www) = send(Method::POST, "/api/v5/banned", Some(ban(later)), secret).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("BAD_API_KEY_OR_SECRET")),
            "{body}"
        );
        assert_eq!(www.as_deref(), Some("Basic Realm=\"emqx-dashboard\""));
    }
    assert_eq!(emqx.ban_until("pos-90"), None);

    // A ban whose until has passed: 400 BAD_REQUEST.
    let past = chrono::Utc::now() - chrono::Duration::seconds(5);
    let (status, body, _) = send(Method::POST, "/api/v5/banned", Some(ban(past)), Some(API_SECRET)).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("BAD_REQUEST")), "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("Cannot create expired banned"));

    // A new ban: 200 with the ban; the same again while it lasts: 400 ALREADY_EXISTS, the old ban kept.
    let (status, body, _) = send(Method::POST, "/api/v5/banned", Some(ban(later)), Some(API_SECRET)).await;
    assert_eq!(status, 200, "{body}");
    let until = emqx.ban_until("pos-90").expect("banned");
    let longer = later + chrono::Duration::hours(1);
    let (status, body, _) = send(Method::POST, "/api/v5/banned", Some(ban(longer)), Some(API_SECRET)).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("ALREADY_EXISTS")), "{body}");
    let old: Value = serde_json::from_str(body["message"].as_str().expect("message")).expect("the old ban as JSON");
    assert_eq!(old["who"], "pos-90");
    assert_eq!(emqx.ban_until("pos-90"), Some(until), "never extended");

    // Deleting it: 204; deleting it again (or any missing ban): 404 NOT_FOUND.
    let path = "/api/v5/banned/clientid/pos-90";
    assert_eq!(send(Method::DELETE, path, None, Some(API_SECRET)).await.0, 204);
    let (status, body, _) = send(Method::DELETE, path, None, Some(API_SECRET)).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("NOT_FOUND")), "{body}");

    // Kicking: a connected client 204 (and it is gone), an unknown one 404 CLIENTID_NOT_FOUND.
    emqx.mark_connected("pos-91");
    assert_eq!(
        send(Method::DELETE, "/api/v5/clients/pos-91", None, Some(API_SECRET))
            .await
            .0,
        204
    );
    assert!(!emqx.is_connected("pos-91"));
    let (status, body, _) = send(Method::DELETE, "/api/v5/clients/pos-91", None, Some(API_SECRET)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("CLIENTID_NOT_FOUND")),
        "{body}"
    );
}

/// A bridge whose API secret EMQX does not know (e.g. a bootstrap file EMQX never read): every call is 401,
/// a DELETE answers 502 and the device is not recorded as revoked; a rotation is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_secret_revokes_nothing() {
    let s = start_with_secret("emqx-401", "not-the-emqx-api-secret").await;
    let first = s.issue("pos-30", BRANCH_A, 3600).await;
    s.accepted("pos-30", &first, "issued").await;
    s.emqx.take();
    let (status, body) = s.delete("pos-30").await;
    assert_eq!(status, 502, "{body}");
    let seen = s.emqx.take();
    assert_eq!(seen.len(), 1, "stops at the refused ban: {seen:?}");
    assert_eq!(
        (seen[0].status, seen[0].code.as_deref()),
        (401, Some("BAD_API_KEY_OR_SECRET"))
    );
    assert_eq!(s.emqx.ban_until("pos-30"), None);
    let (_, rec) = call(&s.bridge.http, reqwest::Method::GET, "/api/v1/devices/pos-30", None).await;
    assert_eq!(
        rec["revoked"], false,
        "not recorded as revoked when EMQX refused the credentials"
    );
    let body =
        json!({"device_id": "pos-30", "merchant_code": "MCH-MST-001", "branch_code": BRANCH_A, "ttl_seconds": 3600});
    let (status, _) = call(&s.bridge.http, reqwest::Method::POST, "/api/v1/devices", Some(body)).await;
    assert_eq!(
        status, 502,
        "a rotation cannot kick the old session: refused, nothing issued"
    );
    s.accepted("pos-30", &first, "the first token is still the current one")
        .await;
    s.bridge.stop().await;
}

/// A client id that already has a short ban (an operator's, from EMQX's dashboard) when the device is revoked:
/// EMQX answers ALREADY_EXISTS and never extends a ban, so the revoke lifts the short one and bans again until
/// the device's tokens expire. Otherwise, once the short ban lapsed, the revoked token would connect whenever
/// EMQX cannot reach the bridge's authenticator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_replaces_a_shorter_existing_ban() {
    let s = start("emqx-shortban").await;
    let token = s.issue("pos-77", BRANCH_A, 3600).await;
    let short = chrono::Utc::now() + chrono::Duration::seconds(2);
    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/v5/banned", s.emqx.addr))
        .basic_auth(API_KEY, Some(API_SECRET))
        .json(&json!({"as": "clientid", "who": "pos-77",
                      "until": short.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}))
        .send()
        .await
        .expect("ban");
    assert_eq!(resp.status().as_u16(), 200);
    s.emqx.take();
    let (status, body) = s.delete("pos-77").await;
    assert_eq!(status, 204, "{body}");
    let calls: Vec<_> = s
        .emqx
        .take()
        .iter()
        .map(|c| (c.method.clone(), c.path.clone(), c.status))
        .collect();
    eprintln!("calls {calls:?}");
    let until = s.emqx.ban_until("pos-77").expect("banned");
    let now = chrono::Utc::now().timestamp();
    assert!(
        until >= now + 3000,
        "the revoke's ban must last until the token expires; it ends in {} s",
        until - now
    );
    // Past the short ban, with the authenticator unreachable (EMQX fails open to the JWT check and bans).
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut unreachable = s.chain.clone();
    unreachable.authn_url = Some("http://127.0.0.1:9/api/v1/broker/authn".into());
    let got = s.emqx.connect(&unreachable, "pos-77", "pos-77", &token).await;
    assert!(got.is_err(), "the revoked token connected: {got:?}");
    // A second revoke meets the long ban: ALREADY_EXISTS that covers it, nothing lifted.
    let (status, body) = s.delete("pos-77").await;
    assert_eq!(status, 204, "{body}");
    assert!(
        !s.emqx
            .take()
            .iter()
            .any(|c| c.method == "DELETE" && c.path.starts_with("/api/v5/banned/")),
        "a ban that lasts long enough is not lifted"
    );
    s.bridge.stop().await;
}
