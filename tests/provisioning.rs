//! Device provisioning end to end (docs/api.md, docs/provisioning.md): a real Mosquitto with the dynamic-security plugin, a real
//! PostgreSQL and the bridge, all started here. Devices are provisioned through the HTTP API (and the CLI) and
//! then connect over MQTT 5 with what they were given; tokens are verified with jsonwebtoken, an
//! implementation independent of the bridge's own signing code.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::dynsec::{self, ctrl, BRIDGE_PASSWORD, DYNSEC_ADMIN, DYNSEC_ADMIN_PASSWORD};
use common::{Env, InProcessBridge};
use delta_bridge::config::Config;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet, PubAckReason, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const OWN: &str = "dev/MCH-MST-001/BRN-MST-OSK00001/#";
const WAIT: Duration = Duration::from_secs(20);

/// Mosquitto 2.0.11 with `max_queued_messages 0` (the harness's setting) closes an MQTT 5 client's connection
/// right after refusing its QoS 1 publish with PUBACK 0x87, and the PUBACK is then often lost with the socket.
/// A large finite bound (the last setting wins) keeps the refusal observable.
const QUEUE_BOUND: &str = "max_queued_messages 1000000\n";

/// PostgreSQL and a Mosquitto that authenticates through dynamic security only.
fn dynsec_env(tag: &str) -> Env {
    dynsec::env(tag, QUEUE_BOUND)
}

/// A fresh EC P-256 key made by the openssl CLI (SEC1 PEM), in the test's directory.
fn signing_key(env: &Env) -> PathBuf {
    let out = Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let path = env.dir.join("device-signing-key.pem");
    std::fs::write(&path, out.stdout).expect("key");
    path
}

fn config_text(env: &Env, key: &Path) -> String {
    env.config_toml(&format!(
        "[credentials]\nsigning_key_file = \"{}\"\nmin_ttl = \"1s\"\n\
         [broker]\nkind = \"mosquitto\"\nadmin_username = \"{DYNSEC_ADMIN}\"\n",
        key.display()
    ))
}

fn secrets_env() -> Vec<(String, String)> {
    [
        ("DELTA_BRIDGE__MQTT__USERNAME", "bridge"),
        ("DELTA_BRIDGE__MQTT__PASSWORD", BRIDGE_PASSWORD),
        ("DELTA_BRIDGE__HTTP__ADMIN_TOKEN", ADMIN_TOKEN),
        ("DELTA_BRIDGE__BROKER__ADMIN_PASSWORD", DYNSEC_ADMIN_PASSWORD),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn start(tag: &str) -> (Env, InProcessBridge) {
    let env = dynsec_env(tag);
    let key = signing_key(&env);
    let cfg = Config::parse(&config_text(&env, &key), Path::new("test.toml"), &secrets_env()).expect("config");
    let bridge = env.bridge_with(cfg).await;
    (env, bridge)
}

/// The admin side of the API.
struct Api {
    http: String,
    client: reqwest::Client,
}

impl Api {
    fn new(bridge: &InProcessBridge) -> Api {
        Api {
            http: bridge.http.clone(),
            client: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.http));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let resp = req.send().await.expect("http");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body expected: {text}"))
        };
        (status, value)
    }

    async fn issue(&self, body: Value) -> (u16, Value) {
        self.send(
            reqwest::Method::POST,
            "/api/v1/devices",
            Some(ADMIN_TOKEN),
            Some(body.to_string()),
        )
        .await
    }

    async fn issue_ok(&self, device: &str, ttl: Option<u64>) -> Value {
        let mut body = json!({"device_id": device, "merchant_code": "MCH-MST-001", "branch_code": "BRN-MST-OSK00001"});
        if let Some(t) = ttl {
            body["ttl_seconds"] = json!(t);
        }
        let (status, v) = self.issue(body).await;
        assert_eq!(status, 201, "{v}");
        v
    }

    async fn get(&self, device: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await
    }

    async fn delete(&self, device: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::DELETE,
            &format!("/api/v1/devices/{device}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await
    }
}

/// An MQTT 5 device. The event loop stops at its first error (no silent reconnect), so a disconnection
/// is observable.
struct Device {
    client: AsyncClient,
    packets: mpsc::UnboundedReceiver<Result<Packet, String>>,
    received: Vec<Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connects; Err(reason) when the broker refuses (or anything else fails).
    async fn connect(env: &Env, client_id: &str, username: &str, password: &str) -> Result<Device, String> {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", env.mqtt.port);
        opts.set_credentials(username, password);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_start(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let reason = match e {
                            ConnectionError::ConnectionRefused(code) => format!("refused {code:?}"),
                            other => other.to_string(),
                        };
                        let _ = tx.send(Err(reason));
                        return;
                    }
                }
            }
        });
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .map_err(|_| "no CONNACK".to_string())?
            .ok_or("event loop ended")?;
        match first {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok(Device {
                client,
                packets: rx,
                received: Vec::new(),
                task,
            }),
            Ok(other) => Err(format!("unexpected {other:?}")),
            Err(e) => Err(e),
        }
    }

    async fn next(&mut self, limit: Duration) -> Option<Result<Packet, String>> {
        tokio::time::timeout(limit, self.packets.recv()).await.ok().flatten()
    }

    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe_many(vec![Filter::new(filter, QoS::AtLeastOnce)])
            .await
            .expect("subscribe request");
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(Ok(Packet::SubAck(ack))) => return ack.return_codes[0],
                Some(Ok(Packet::Publish(p))) => self.received.push(p),
                Some(Ok(_)) => {}
                other => panic!("no SUBACK for {filter}: {other:?}"),
            }
        }
    }

    async fn publish(&mut self, topic: &str) -> PubAckReason {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, "{}")
            .await
            .expect("publish request");
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(Ok(Packet::PubAck(ack))) => return ack.reason,
                Some(Ok(Packet::Publish(p))) => self.received.push(p),
                Some(Ok(_)) => {}
                other => panic!("no PUBACK for {topic}: {other:?}"),
            }
        }
    }

    /// Waits for a message satisfying `pred`.
    async fn wait_message(&mut self, what: &str, pred: impl Fn(&Publish) -> bool) -> Publish {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(p) = self.received.iter().find(|p| pred(p)) {
                return p.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(Ok(Packet::Publish(p))) => self.received.push(p),
                Some(Ok(_)) => {}
                other => panic!("waiting for {what}: {other:?}"),
            }
        }
    }

    /// True if the broker ends the session (DISCONNECT or closed socket) within `limit`.
    async fn disconnected_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(Ok(Packet::Disconnect(_))) | Some(Err(_)) => return true,
                Some(Ok(_)) => {}
                None => return Instant::now() < deadline,
            }
        }
    }

    fn stop(self) {
        self.task.abort();
    }
}

async fn refused(env: &Env, client_id: &str, username: &str, password: &str) -> String {
    match Device::connect(env, client_id, username, password).await {
        Ok(d) => {
            d.stop();
            panic!("{username} connected with a password that must be refused")
        }
        Err(e) => {
            assert!(
                e.contains("NotAuthorized") || e.contains("BadUserNamePassword"),
                "refused for the wrong reason: {e}"
            );
            e
        }
    }
}

/// Verifies the token against the bridge's JWKS with jsonwebtoken (independent of the bridge's signer).
async fn verify_with_jwks(api: &Api, token: &str) -> Value {
    common::verify_with_jwks(&api.http, token, jsonwebtoken::Algorithm::ES256).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioned_device_hears_its_own_branch_only() {
    let (env, bridge) = start("prov-acl").await;
    let api = Api::new(&bridge);

    let creds = api.issue_ok("pos-01", None).await;
    let fields: Vec<&String> = creds.as_object().expect("object").keys().collect();
    assert_eq!(
        fields,
        [
            "acl",
            "client_id",
            "device_id",
            "expires_at",
            "password",
            "topics",
            "username"
        ],
        "exactly the fields docs/api.md lists"
    );
    assert_eq!(creds["device_id"], "pos-01");
    assert_eq!(creds["client_id"], "pos-01");
    assert_eq!(creds["username"], "pos-01");
    assert_eq!(creds["topics"], json!({"subscribe": [OWN]}));
    let acl = json!([
        {"permission": "allow", "action": "subscribe", "topic": OWN},
        {"permission": "deny", "action": "all", "topic": "#"}
    ]);
    assert_eq!(creds["acl"], acl);
    let token = creds["password"].as_str().expect("password");

    // The claims docs/provisioning.md lists, checked by an independent implementation.
    let claims = verify_with_jwks(&api, token).await;
    for k in ["sub", "clientid", "username"] {
        assert_eq!(claims[k], "pos-01", "{k}");
    }
    assert_eq!(claims["aud"], "mqtt");
    assert_eq!(claims["iss"], "delta-bridge");
    assert_eq!(claims["acl"], acl, "deny-all last");
    assert!(claims.get("is_superuser").is_none());
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    let (iat, nbf, exp) = (
        claims["iat"].as_i64().expect("iat"),
        claims["nbf"].as_i64().expect("nbf"),
        claims["exp"].as_i64().expect("exp"),
    );
    assert_eq!(exp - iat, 86400, "credentials.ttl by default");
    assert_eq!(iat - nbf, 60, "nbf back-dated for clock skew");
    assert!((iat - chrono::Utc::now().timestamp()).abs() < 30);
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(creds["expires_at"].as_str().expect("expires_at")).expect("RFC 3339");
    assert_eq!(expires_at.timestamp(), exp);

    // Connects with exactly what it was given, over MQTT 5.
    let mut device = Device::connect(&env, "pos-01", "pos-01", token)
        .await
        .expect("device connects");
    assert_eq!(
        device.subscribe(OWN).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    for other in [
        "dev/MCH-MST-001/BRN-MST-OSK00002/#",   // another branch of its merchant
        "dev/MCH-OTHER-002/BRN-MST-OSK00001/#", // the same branch code under another merchant
        "#",
        "dev/+/BRN-MST-OSK00001/#",
        "dev/MCH-MST-001/#",
    ] {
        assert_eq!(
            device.subscribe(other).await,
            SubscribeReasonCode::NotAuthorized,
            "{other}"
        );
    }
    for topic in [
        "dev/MCH-MST-001/BRN-MST-OSK00001/product/updates",
        "dev/MCH-MST-001/BRN-MST-OSK00001/transaction/updates",
    ] {
        assert_eq!(device.publish(topic).await, PubAckReason::NotAuthorized, "{topic}");
    }

    // A stock change of the same branch code under the other merchant first, then its own.
    let db = env.client().await;
    db.batch_execute(
        "UPDATE products SET stock = 5 WHERE id = (SELECT min(id) FROM products WHERE branch_id = 3);
         UPDATE products SET stock = 77 WHERE id = (SELECT min(id) FROM products WHERE branch_id = 1);",
    )
    .await
    .expect("stock changes");
    let own = device
        .wait_message("its own stock change", |p| {
            serde_json::from_slice::<Value>(&p.payload)
                .is_ok_and(|v| v["event_type"] == "stock_updated" && v["data"]["new_stock"] == 77)
        })
        .await;
    assert_eq!(own.topic.as_ref(), b"dev/MCH-MST-001/BRN-MST-OSK00001/product/updates");
    // Anything that had slipped through would have been delivered by now as well.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(Some(Ok(p))) = tokio::time::timeout(Duration::from_millis(100), device.packets.recv()).await {
        if let Packet::Publish(p) = p {
            device.received.push(p);
        }
    }
    for p in &device.received {
        assert!(
            p.topic.starts_with(b"dev/MCH-MST-001/BRN-MST-OSK00001/"),
            "foreign message {:?}",
            String::from_utf8_lossy(&p.topic)
        );
    }
    device.stop();

    // A wrong password, and the right one under another client id, are refused.
    refused(&env, "pos-01", "pos-01", "wrong-password").await;
    refused(&env, "pos-99", "pos-01", token).await;

    let metrics = common::scrape(&bridge.http).await;
    assert_eq!(
        common::sample(&metrics, "delta_bridge_devices_issued_total "),
        Some(1.0)
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_revocation_and_expiry_lock_the_device_out() {
    let (env, bridge) = start("prov-life").await;
    let api = Api::new(&bridge);

    // Re-issuing rotates: the old password stops working, the new one works.
    let first = api.issue_ok("pos-02", None).await;
    let old = first["password"].as_str().expect("password").to_string();
    let mut d = Device::connect(&env, "pos-02", "pos-02", &old)
        .await
        .expect("first password works");
    let second = api.issue_ok("pos-02", None).await;
    let new = second["password"].as_str().expect("password").to_string();
    assert_ne!(old, new);
    assert!(
        d.disconnected_within(Duration::from_secs(5)).await,
        "rotation ends the old session"
    );
    d.stop();
    refused(&env, "pos-02", "pos-02", &old).await;
    let (status, rec) = api.get("pos-02").await;
    assert_eq!(status, 200);
    assert_eq!(rec["rotations"], 1);
    assert_eq!(rec["revoked"], false);
    assert!(!rec.to_string().contains(&new), "the record never shows the password");
    assert!(rec.get("password").is_none());

    // DELETE: a connected device is disconnected within 5 s and cannot come back.
    let mut d = Device::connect(&env, "pos-02", "pos-02", &new)
        .await
        .expect("new password works");
    assert_eq!(d.subscribe(OWN).await, SubscribeReasonCode::Success(QoS::AtLeastOnce));
    let t0 = Instant::now();
    let (status, body) = api.delete("pos-02").await;
    assert_eq!(status, 204, "{body}");
    assert!(
        d.disconnected_within(Duration::from_secs(5).saturating_sub(t0.elapsed()))
            .await,
        "disconnected within 5 s of DELETE"
    );
    d.stop();
    refused(&env, "pos-02", "pos-02", &new).await;
    let (status, rec) = api.get("pos-02").await;
    assert_eq!(status, 200, "a revoked device's record stays");
    assert_eq!(rec["revoked"], true);
    assert!(rec["revoked_at"].is_string());
    assert_eq!(api.delete("pos-02").await.0, 204, "DELETE is idempotent");

    // An expired credential: the sweep removes it from Mosquitto (which ignores exp) promptly.
    let short = api.issue_ok("pos-03", Some(2)).await;
    let pw = short["password"].as_str().expect("password").to_string();
    let mut d = Device::connect(&env, "pos-03", "pos-03", &pw)
        .await
        .expect("valid before expiry");
    assert!(
        d.disconnected_within(Duration::from_secs(20)).await,
        "session ended after expiry"
    );
    d.stop();
    refused(&env, "pos-03", "pos-03", &pw).await;
    let (_, rec) = api.get("pos-03").await;
    assert_eq!(rec["expired"], true);
    assert_eq!(rec["revoked"], false);

    // Issuing again reinstates a revoked device (the history stays in delta_bridge.device_events).
    let again = api.issue_ok("pos-02", None).await;
    let d = Device::connect(&env, "pos-02", "pos-02", again["password"].as_str().expect("pw"))
        .await
        .expect("re-issued device connects");
    d.stop();
    let (_, rec) = api.get("pos-02").await;
    assert_eq!(rec["revoked"], false);
    let events: Vec<String> = env
        .client()
        .await
        .query(
            "SELECT event FROM delta_bridge.device_events WHERE device_id = 'pos-02' ORDER BY id",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, ["issued", "rotated", "revoked", "revoked", "rotated"]);

    let metrics = common::scrape(&bridge.http).await;
    assert_eq!(
        common::sample(&metrics, "delta_bridge_devices_issued_total "),
        Some(4.0)
    );
    assert_eq!(
        common::sample(&metrics, "delta_bridge_devices_revoked_total "),
        Some(1.0)
    );
    bridge.stop().await;
}

fn assert_error(status: u16, body: &Value, expected: u16, what: &str) {
    assert_eq!(status, expected, "{what}: {body}");
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("{what}: JSON object expected, got {body}"));
    assert_eq!(obj.len(), 1, "{what}: only \"error\": {body}");
    let msg = obj["error"].as_str().expect("error is a string");
    for leak in ["relation", "SQL", "postgres", "syntax", "duplicate key"] {
        assert!(!msg.contains(leak), "{what}: database text in {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_status_codes() {
    let (env, bridge) = start("prov-api").await;
    let api = Api::new(&bridge);
    let good = json!({"device_id": "pos-10", "merchant_code": "MCH-MST-001", "branch_code": "BRN-MST-OSK00001"});
    use reqwest::Method;

    // 401 without the token, with a wrong one, or with another scheme; on every device route.
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        let (s, b) = api
            .send(Method::POST, "/api/v1/devices", token, Some(good.to_string()))
            .await;
        assert_error(s, &b, 401, "POST without a valid token");
        let (s, b) = api.send(Method::GET, "/api/v1/devices/pos-10", token, None).await;
        assert_error(s, &b, 401, "GET without a valid token");
        let (s, b) = api.send(Method::DELETE, "/api/v1/devices/pos-10", token, None).await;
        assert_error(s, &b, 401, "DELETE without a valid token");
    }
    let basic = api
        .client
        .post(format!("{}/api/v1/devices", api.http))
        .header("Authorization", format!("Basic {ADMIN_TOKEN}"))
        .body(good.to_string())
        .send()
        .await
        .expect("http");
    assert_eq!(basic.status().as_u16(), 401);

    // 400: ids outside ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$, ttl outside [min_ttl, max_ttl], bad bodies.
    let long = "a".repeat(65);
    for (field, bad) in [
        ("device_id", "a/b"),
        ("device_id", "dev+1"),
        ("device_id", "#"),
        ("device_id", ""),
        ("device_id", "-lead"),
        ("device_id", long.as_str()),
        ("merchant_code", "MCH/../x"),
        ("branch_code", "+"),
        ("branch_code", "${clientid}"),
    ] {
        let mut body = good.clone();
        body[field] = json!(bad);
        let (s, b) = api.issue(body).await;
        assert_error(s, &b, 400, &format!("{field} = {bad:?}"));
    }
    for ttl in [json!(0), json!(30 * 86400 + 1), json!(-5), json!("60")] {
        let mut body = good.clone();
        body["ttl_seconds"] = ttl.clone();
        let (s, b) = api.issue(body).await;
        assert_error(s, &b, 400, &format!("ttl_seconds {ttl}"));
    }
    for raw in ["not json", "{}", "{\"device_id\": \"x\"}", "[]"] {
        let (s, b) = api
            .send(Method::POST, "/api/v1/devices", Some(ADMIN_TOKEN), Some(raw.into()))
            .await;
        assert_error(s, &b, 400, raw);
    }
    let (s, b) = api.get("a+b").await;
    assert_error(s, &b, 400, "GET with an invalid id");

    // 404: unknown merchant, unknown branch, a branch of another merchant; never-issued devices.
    for (m, br) in [
        ("MCH-NOPE", "BRN-MST-OSK00001"),
        ("MCH-MST-001", "BRN-NOPE"),
        ("MCH-OTHER-002", "BRN-MST-OSK00002"),
    ] {
        let (s, b) = api
            .issue(json!({"device_id": "pos-10", "merchant_code": m, "branch_code": br}))
            .await;
        assert_error(s, &b, 404, &format!("{m}/{br}"));
    }
    // The bridge's own accounts are reserved ids (400, tests/reserved_ids.rs); an operator's account on the
    // broker is never taken over (409).
    ctrl(&env, &["createClient", "grafana", "-p", "grafana-secret"]);
    for (name, status) in [("bridge", 400), ("admin", 400), ("grafana", 409)] {
        let mut body = good.clone();
        body["device_id"] = json!(name);
        let (s, b) = api.issue(body).await;
        assert_error(s, &b, status, &format!("device id {name}"));
    }
    let op = Device::connect(&env, "grafana-1", "grafana", "grafana-secret")
        .await
        .expect("the operator's account still works");
    op.stop();

    let (s, b) = api.get("never-issued").await;
    assert_error(s, &b, 404, "GET never issued");
    let (s, b) = api.delete("never-issued").await;
    assert_error(s, &b, 404, "DELETE never issued");

    // The bounds themselves are accepted; the other merchant's branch of the same code is a different branch.
    let mut body = good.clone();
    body["ttl_seconds"] = json!(30 * 86400);
    assert_eq!(api.issue(body).await.0, 201);
    let (s, other) = api
        .issue(json!({"device_id": "pos-11", "merchant_code": "MCH-OTHER-002", "branch_code": "BRN-MST-OSK00001"}))
        .await;
    assert_eq!(s, 201);
    assert_eq!(
        other["topics"]["subscribe"],
        json!(["dev/MCH-OTHER-002/BRN-MST-OSK00001/#"])
    );

    // GET shows the record, never the password.
    let (s, rec) = api.get("pos-10").await;
    assert_eq!(s, 200);
    assert_eq!(rec["device_id"], "pos-10");
    assert_eq!(rec["revoked"], false);
    assert!(rec.get("password").is_none());

    // The JWKS is public and lists the signing key.
    let jwks: Value = reqwest::get(format!("{}/.well-known/jwks.json", bridge.http))
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    assert_eq!(jwks["keys"][0]["kty"], "EC");
    assert_eq!(jwks["keys"][0]["alg"], "ES256");
    assert!(jwks["keys"][0].get("d").is_none(), "never the private part");

    // A broker that refuses (here: wrong admin password) gives 502 and changes nothing.
    bridge.stop().await;
    let key = env.dir.join("device-signing-key.pem");
    let mut secrets = secrets_env();
    secrets.retain(|(k, _)| k != "DELTA_BRIDGE__BROKER__ADMIN_PASSWORD");
    secrets.push((
        "DELTA_BRIDGE__BROKER__ADMIN_PASSWORD".into(),
        "wrong-admin-password".into(),
    ));
    let cfg = Config::parse(&config_text(&env, &key), Path::new("test.toml"), &secrets).expect("config");
    let bridge = env.bridge_with(cfg).await;
    let api = Api::new(&bridge);
    let (s, b) = api
        .issue(json!({"device_id": "pos-12", "merchant_code": "MCH-MST-001", "branch_code": "BRN-MST-OSK00001"}))
        .await;
    assert_error(s, &b, 502, "broker refused the admin");
    assert_eq!(
        api.get("pos-12").await.0,
        404,
        "nothing recorded when the broker refused"
    );
    bridge.stop().await;

    // Without http.admin_token the device API refuses instead of running open.
    let mut secrets = secrets_env();
    secrets.retain(|(k, _)| k != "DELTA_BRIDGE__HTTP__ADMIN_TOKEN");
    let cfg = Config::parse(&config_text(&env, &key), Path::new("test.toml"), &secrets).expect("config");
    let bridge = env.bridge_with(cfg).await;
    let api = Api::new(&bridge);
    let (s, b) = api
        .send(Method::POST, "/api/v1/devices", None, Some(good.to_string()))
        .await;
    assert_error(s, &b, 503, "no admin token configured");
    let (s, b) = api.send(Method::GET, "/api/v1/devices/pos-10", Some(""), None).await;
    assert_error(s, &b, 503, "no admin token configured");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_issue_cli_prints_what_the_api_returns() {
    let (env, bridge) = start("prov-cli").await; // also applies the migrations
    let key = env.dir.join("device-signing-key.pem");
    let cfg_path = env.dir.join("cli.toml");
    std::fs::write(&cfg_path, config_text(&env, &key)).expect("config file");
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_delta-bridge"));
        cmd.arg("--config").arg(&cfg_path).args(["device", "issue"]).args(args);
        for (k, v) in secrets_env() {
            cmd.env(k, v);
        }
        cmd.output().expect("run delta-bridge")
    };
    let out = run(&[
        "--device-id",
        "cli-01",
        "--merchant",
        "MCH-MST-001",
        "--branch",
        "BRN-MST-OSK00001",
        "--ttl",
        "1h",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let creds: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let api = Api::new(&bridge);
    let from_api = api.issue_ok("api-01", None).await;
    let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
    assert_eq!(keys(&creds), keys(&from_api), "the same JSON shape as the API");
    let claims = verify_with_jwks(&api, creds["password"].as_str().expect("pw")).await;
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        3600
    );
    let d = Device::connect(&env, "cli-01", "cli-01", creds["password"].as_str().expect("pw"))
        .await
        .expect("CLI-issued device connects");
    d.stop();
    assert_eq!(api.get("cli-01").await.0, 200, "recorded like any other");

    let out = run(&[
        "--device-id",
        "cli/02",
        "--merchant",
        "MCH-MST-001",
        "--branch",
        "BRN-MST-OSK00001",
    ]);
    assert_eq!(out.status.code(), Some(2), "an invalid id is a usage error");
    let out = run(&[
        "--device-id",
        "cli-02",
        "--merchant",
        "MCH-MST-001",
        "--branch",
        "BRN-MST-OSK00001",
        "--ttl",
        "40d",
    ]);
    assert_eq!(out.status.code(), Some(2), "ttl above max_ttl");
    let out = run(&[
        "--device-id",
        "cli-02",
        "--merchant",
        "MCH-NOPE",
        "--branch",
        "BRN-MST-OSK00001",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("merchant MCH-NOPE not found"));
    bridge.stop().await;
}
