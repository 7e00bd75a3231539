//! TLS to every peer, end to end, with certificates each test makes (its own CA and a second, unrelated one):
//! PostgreSQL with `ssl = on` and each `sslmode`, Mosquitto with a TLS listener, and the EMQX REST API
//! served over https by a recording stub. Each refusal (a certificate from another CA, or for another host
//! name) is shown failing, and where the bridge runs as a process, staying unready and saying why.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::certs::{ServerCert, TestCa};
use common::{of_type, Env, Subscriber};
use delta_bridge::config::Config;
use delta_harness::servers::{free_port, Mosquitto, ServerTls};
use delta_harness::stack::StackOptions;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// The test's CA, an unrelated CA, and a server certificate from the first for `localhost` only (no IP
/// address: connecting to 127.0.0.1 is connecting to a name the certificate does not carry).
struct Certs {
    ca: TestCa,
    other: TestCa,
    localhost: ServerCert,
}

fn certs(dir: &Path) -> Certs {
    let ca = TestCa::new(dir, "good");
    let other = TestCa::new(dir, "other");
    let localhost = ca.issue("localhost", &["DNS:localhost"]);
    Certs { ca, other, localhost }
}

fn pg_url(env: &Env, host: &str, params: &str) -> String {
    format!("postgres://postgres@{host}:{}/{}?{params}", env.pg.port, env.db)
}

/// Whether this session is encrypted, as the server sees it.
async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .expect("pg_stat_ssl")
        .try_get(0)
        .expect("ssl column")
}

async fn pg_connect(url: &str) -> Result<delta_bridge::pg::Session, String> {
    delta_bridge::pg::connect(url, Duration::from_secs(10), "tls-test")
        .await
        .map_err(|e| e.to_string())
}

/// Waits until the bridge process `tag` has logged `needle` at least `times` times; returns its log.
async fn wait_logged(env: &Env, tag: &str, needle: &str, times: usize) -> String {
    let start = Instant::now();
    loop {
        let log = env.log(tag);
        if log.matches(needle).count() >= times {
            return log;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{needle:?} not logged {times} times:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn readyz(http: &str) -> u16 {
    reqwest::get(format!("{http}/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_carries_events_over_tls_and_refuses_a_wrong_name_or_ca() {
    let dir = common::temp_dir("pg-tls-certs");
    let c = certs(&dir);
    let env = Env::start_with(StackOptions {
        pg_tls: Some(ServerTls {
            cert: c.localhost.cert.clone(),
            key: c.localhost.key.clone(),
        }),
        ..StackOptions::new("pg-tls")
    });
    let (ca, other) = (c.ca.cert.display().to_string(), c.other.cert.display().to_string());

    // The bridge on verify-full with the test's CA: ready, events flow, and every session it holds is encrypted.
    let url = pg_url(&env, "localhost", &format!("sslmode=verify-full&sslrootcert={ca}"));
    let toml = env.config_toml("").replace(&env.pg_url(), &url);
    let cfg = Config::parse(&toml, Path::new("test.toml"), &[]).expect("config");
    let bridge = env.bridge_with(cfg).await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-pg-tls", "dev/#").await;
    let db = env.client().await;
    db.batch_execute("UPDATE products SET price = 77.5 WHERE id = 2")
        .await
        .expect("write");
    let msgs = sub
        .wait_for(WAIT, "product_updated", |m| !of_type(m, "product_updated").is_empty())
        .await;
    assert_eq!(
        of_type(&msgs, "product_updated")[0].payload["data"]["price"],
        json!(77.5)
    );
    let sessions = db
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name LIKE 'delta-bridge%'",
            &[],
        )
        .await
        .expect("sessions");
    let (tls, all): (i64, i64) = (sessions.try_get(0).expect("tls"), sessions.try_get(1).expect("all"));
    assert!(all >= 1 && tls == all, "{tls} of the bridge's {all} sessions use TLS");
    sub.stop().await;
    bridge.stop().await;

    // The same in key=value form.
    let s = pg_connect(&format!(
        "host=localhost port={} user=postgres dbname={} sslmode=verify-full sslrootcert='{ca}'",
        env.pg.port, env.db
    ))
    .await
    .expect("key=value form with verify-full");
    assert!(encrypted(&s.client).await);

    // 127.0.0.1 is not a name the certificate carries: verify-full and require refuse it, verify-ca does not
    // look at names.
    for mode in ["verify-full", "require"] {
        let err = pg_connect(&pg_url(&env, "127.0.0.1", &format!("sslmode={mode}&sslrootcert={ca}")))
            .await
            .err()
            .unwrap_or_else(|| panic!("{mode} accepted a certificate for another name"));
        assert!(err.contains("not valid for name"), "{mode}: {err}");
    }
    let s = pg_connect(&pg_url(
        &env,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .expect("verify-ca checks the chain only");
    assert!(encrypted(&s.client).await);

    // A certificate from a CA the client was not given: refused by every verifying mode.
    for mode in ["verify-full", "verify-ca", "require"] {
        let err = pg_connect(&pg_url(
            &env,
            "localhost",
            &format!("sslmode={mode}&sslrootcert={other}"),
        ))
        .await
        .err()
        .unwrap_or_else(|| panic!("{mode} accepted a certificate from an unknown CA"));
        assert!(
            err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
            "{mode}: {err}"
        );
    }
    // require without sslrootcert verifies against the system's roots, which do not hold the test's CA.
    let err = pg_connect(&pg_url(&env, "localhost", "sslmode=require")).await.err();
    assert!(err.is_some_and(|e| e.contains("UnknownIssuer")), "require verifies");

    // prefer (and no sslmode) encrypts with any certificate; disable does not encrypt.
    for params in ["sslmode=prefer", "application_name=x"] {
        let s = pg_connect(&pg_url(&env, "127.0.0.1", params)).await.expect(params);
        assert!(encrypted(&s.client).await, "{params}: TLS when the server offers it");
    }
    let s = pg_connect(&pg_url(&env, "localhost", "sslmode=disable"))
        .await
        .expect("disable");
    assert!(!encrypted(&s.client).await);

    // A bridge given the wrong CA never becomes ready, and its log says why, at each retry.
    let wrong = pg_url(&env, "localhost", &format!("sslmode=verify-full&sslrootcert={other}"));
    let mut process = env.bridge_process_with("wrong-ca", &[("DELTA_BRIDGE__POSTGRES__URL", &wrong)]);
    let log = wait_logged(&env, "wrong-ca", "invalid peer certificate: UnknownIssuer", 2).await;
    assert_ne!(
        readyz(&process.http).await,
        200,
        "ready with an unverifiable database:\n{log}"
    );
    assert!(
        process.child.try_wait().expect("wait").is_none(),
        "it keeps retrying:\n{log}"
    );
    process.kill();
    drop(env);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_falls_back_to_plain_against_a_server_without_tls() {
    let env = Env::start("pg-plain");
    for params in ["sslmode=prefer", "application_name=x"] {
        let s = pg_connect(&pg_url(&env, "127.0.0.1", params)).await.expect(params);
        assert!(!encrypted(&s.client).await, "{params}");
    }
    for mode in ["require", "verify-full"] {
        let err = pg_connect(&pg_url(&env, "127.0.0.1", &format!("sslmode={mode}")))
            .await
            .err();
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("server does not support TLS")),
            "{mode}: {err:?}"
        );
    }
    // The bridge itself on prefer, against this server: ready.
    let toml = env
        .config_toml("")
        .replace(&env.pg_url(), &pg_url(&env, "127.0.0.1", "sslmode=prefer"));
    let bridge = env
        .bridge_with(Config::parse(&toml, Path::new("test.toml"), &[]).expect("config"))
        .await;
    bridge.stop().await;
}

/// A broker with its plain listener (for the test's subscriber) and a TLS listener on `tls_port`.
fn tls_broker(dir: &Path, cert: &ServerCert, tls_port: u16) -> Mosquitto {
    std::fs::create_dir_all(dir).expect("broker dir");
    for (from, to) in [(&cert.cert, "broker.crt"), (&cert.key, "broker.key")] {
        std::fs::copy(from, dir.join(to)).expect("copy certificate");
    }
    let crt = dir.join("broker.crt");
    Mosquitto::start_with(
        dir,
        &format!(
            "allow_anonymous true\nlistener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            crt.display(),
            crt.display(),
            dir.join("broker.key").display()
        ),
    )
    .expect("mosquitto with a TLS listener")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_carries_events_and_a_wrong_ca_or_name_is_refused() {
    let dir = common::temp_dir("mqtt-tls-certs");
    let c = certs(&dir);
    let tls_port = free_port().expect("port");
    let cert = c.localhost.clone();
    let env = Env::start_with_mqtt("mqtt-tls", move |d| tls_broker(d, &cert, tls_port));
    let mqtts = format!("mqtts://localhost:{tls_port}");

    // mqtts:// with the test's CA: ready, and events reach a device.
    let toml = env
        .config_toml("")
        .replace(&env.mqtt.url(), &mqtts)
        .replace("[mqtt]\n", &format!("[mqtt]\nca_file = \"{}\"\n", c.ca.cert.display()));
    let bridge = env
        .bridge_with(Config::parse(&toml, Path::new("test.toml"), &[]).expect("config"))
        .await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-mqtts", "dev/#").await;
    env.client()
        .await
        .batch_execute("UPDATE inventory SET quantity = 4 WHERE id = 3")
        .await
        .expect("write");
    sub.wait_for(WAIT, "quantity_updated", |m| !of_type(m, "quantity_updated").is_empty())
        .await;
    sub.stop().await;
    bridge.stop().await;

    // The right CA but another name (127.0.0.1): the handshake fails on the name.
    let mut cfg = env.config();
    cfg.mqtt.url = format!("mqtts://127.0.0.1:{tls_port}");
    cfg.mqtt.ca_file = Some(c.ca.cert.clone());
    let err = first_connection_error(&cfg).await;
    assert!(err.contains("not valid for name"), "{err}");

    // The wrong CA: a bridge process that never becomes ready and says why at each retry.
    let other = c.other.cert.display().to_string();
    let mut process = env.bridge_process_with(
        "wrong-ca",
        &[
            ("DELTA_BRIDGE__MQTT__URL", &mqtts),
            ("DELTA_BRIDGE__MQTT__CA_FILE", &other),
        ],
    );
    let log = wait_logged(&env, "wrong-ca", "invalid peer certificate: UnknownIssuer", 2).await;
    assert!(log.contains("mqtt connection lost"), "{log}");
    assert_ne!(
        readyz(&process.http).await,
        200,
        "ready with an unverifiable broker:\n{log}"
    );
    assert!(
        process.child.try_wait().expect("wait").is_none(),
        "it keeps retrying:\n{log}"
    );
    process.kill();
    drop(env);
    let _ = std::fs::remove_dir_all(dir);
}

/// What a client built from `cfg`'s `[mqtt]` gets on its first connection attempt (it must fail).
async fn first_connection_error(cfg: &Config) -> String {
    let opts = delta_bridge::mqtt::mqtt_options(&cfg.mqtt, "tls-probe", None, None).expect("options");
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 10);
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await.expect("an answer") {
            Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))) => {
                panic!("connected to a broker whose certificate does not match")
            }
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// A recording stand-in for EMQX's REST API, over https only.
#[derive(Clone, Default)]
struct Stub {
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

async fn record(
    axum::extract::State(stub): axum::extract::State<Stub>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> (axum::http::StatusCode, String) {
    stub.seen
        .lock()
        .expect("lock")
        .push((method.to_string(), uri.path().to_string()));
    (axum::http::StatusCode::OK, "{}".into())
}

/// Accepts TCP, completes the TLS handshake, hands the stream to axum; a failed handshake is dropped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

fn server_config(cert: &ServerCert) -> rustls::ServerConfig {
    let chain = rustls_pemfile::certs(&mut std::fs::read(&cert.cert).expect("cert").as_slice())
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM certificate");
    let key = rustls_pemfile::private_key(&mut std::fs::read(&cert.key).expect("key").as_slice())
        .expect("PEM key")
        .expect("a key");
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config")
}

async fn start_https_stub(cert: &ServerCert) -> (Stub, u16) {
    let stub = Stub::default();
    let app = axum::Router::new().fallback(record).with_state(stub.clone());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = tcp.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(cert)));
    tokio::spawn(async move {
        let _ = axum::serve(TlsListener { tcp, acceptor }, app).await;
    });
    (stub, port)
}

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

async fn api(http: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> u16 {
    let mut req = reqwest::Client::new()
        .request(method, format!("{http}{path}"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.expect("device API").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emqx_api_over_https_is_verified_against_its_ca_file() {
    let env = Env::start("emqx-tls");
    let dir = env.dir.join("certs");
    let c = certs(&dir);
    let (stub, port) = start_https_stub(&c.localhost).await;
    let key = dir.join("signing.pem");
    let out = std::process::Command::new("openssl")
        .args(["genrsa", "2048"])
        .output()
        .expect("openssl");
    assert!(out.status.success());
    std::fs::write(&key, out.stdout).expect("key");
    let bridge_for = |api_url: String, ca: &PathBuf| {
        let toml = env.config_toml(&format!(
            "[credentials]\nsigning_key_file = \"{}\"\n[broker]\nkind = \"emqx\"\napi_url = \"{api_url}\"\n\
             api_ca_file = \"{}\"\napi_key = \"k\"\napi_secret = \"emqx-secret\"\n",
            key.display(),
            ca.display()
        ));
        let env_vars = [("DELTA_BRIDGE__HTTP__ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string())];
        Config::parse(&toml, Path::new("test.toml"), &env_vars).expect("config")
    };
    let device = |id: &str| json!({"device_id": id, "merchant_code": "MCH-MST-001", "branch_code": "BRN-MST-OSK00001", "ttl_seconds": 3600});

    // The right CA and name: a revocation bans and kicks over https.
    let bridge = env
        .bridge_with(bridge_for(format!("https://localhost:{port}"), &c.ca.cert))
        .await;
    for id in ["tab-ok", "tab-ca", "tab-name"] {
        assert_eq!(
            api(&bridge.http, reqwest::Method::POST, "/api/v1/devices", Some(device(id))).await,
            201
        );
    }
    assert_eq!(
        api(&bridge.http, reqwest::Method::DELETE, "/api/v1/devices/tab-ok", None).await,
        204
    );
    let seen = std::mem::take(&mut *stub.seen.lock().expect("lock"));
    assert_eq!(
        seen,
        [
            ("POST".to_string(), "/api/v5/banned".to_string()),
            ("DELETE".to_string(), "/api/v5/clients/tab-ok".to_string())
        ]
    );
    bridge.stop().await;

    // Another CA, or a name the certificate does not carry: no request reaches the API, the revocation fails.
    for (url, ca, id) in [
        (format!("https://localhost:{port}"), &c.other.cert, "tab-ca"),
        (format!("https://127.0.0.1:{port}"), &c.ca.cert, "tab-name"),
    ] {
        let bridge = env.bridge_with(bridge_for(url.clone(), ca)).await;
        let path = format!("/api/v1/devices/{id}");
        assert_eq!(
            api(&bridge.http, reqwest::Method::DELETE, &path, None).await,
            502,
            "{url}"
        );
        assert!(
            stub.seen.lock().expect("lock").is_empty(),
            "{url}: a request went through"
        );
        bridge.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_serves_https_only_with_its_certificate() {
    let env = Env::start("http-tls");
    let dir = env.dir.join("certs");
    let c = certs(&dir);
    let toml = env.config_toml("").replace(
        "[http]\n",
        &format!(
            "[http]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            c.localhost.cert.display(),
            c.localhost.key.display()
        ),
    );
    let cfg = Config::parse(&toml, Path::new("test.toml"), &[]).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let cancel = tokio_util::sync::CancellationToken::new();
    let running = delta_bridge::service::start(cfg.clone(), true, listener, cancel.clone())
        .await
        .expect("bridge starts");

    // With the test's CA, by the name in the certificate: ready, and the metrics are there.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&c.ca.cert).expect("CA")).expect("PEM");
    let trusting = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .expect("client");
    let https = format!("https://localhost:{port}");
    let start = Instant::now();
    loop {
        match trusting.get(format!("{https}/readyz")).send().await {
            Ok(r) if r.status() == 200 => break,
            other => assert!(start.elapsed() < WAIT, "not ready over https: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = trusting
        .get(format!("{https}/metrics"))
        .send()
        .await
        .expect("https /metrics")
        .text()
        .await
        .expect("body");
    assert!(metrics.contains("delta_bridge_postgres_connected 1"), "{metrics}");

    // Plain http to it gets no answer; a client that does not trust the CA refuses the certificate.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(plain.is_err(), "plain http answered: {plain:?}");
    let untrusting = reqwest::Client::new().get(format!("{https}/healthz")).send().await;
    let err = untrusting.expect_err("a certificate from an unknown CA was accepted");
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    // None of that hurt the listener.
    let again = trusting
        .get(format!("{https}/healthz"))
        .send()
        .await
        .expect("https again");
    assert_eq!(again.status(), 200);
    cancel.cancel();
    running.wait().await.expect("clean stop");

    // A key that is not the certificate's: start-up fails, naming the keys and the file.
    let mut wrong = cfg;
    wrong.http.tls_key_file = Some(dir.join("other-ca.key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let err = delta_bridge::service::start(wrong, false, listener, tokio_util::sync::CancellationToken::new())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("http.tls_key_file") && err.contains("other-ca.key"),
        "{err}"
    );
}

#[test]
fn half_an_https_configuration_exits_2_naming_the_missing_key() {
    let dir = common::temp_dir("http-tls-cfg");
    for (text, missing) in [
        ("[http]\ntls_cert_file = \"/tls/cert.pem\"\n", "http.tls_key_file"),
        ("[http]\ntls_key_file = \"/tls/key.pem\"\n", "http.tls_cert_file"),
    ] {
        let path = dir.join("half.toml");
        std::fs::write(&path, text).expect("write");
        for command in ["check-config", "run"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_delta-bridge"))
                .arg("--config")
                .arg(&path)
                .arg(command)
                .output()
                .expect("run");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {text:?}: {err}");
            assert!(err.contains(missing), "{command} {text:?}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
