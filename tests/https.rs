//! https both ways, with certificates each test makes: the bridge calling the EMQX REST API over https (a
//! recording stub served with rustls) with `broker.api_ca_file`, and the bridge's own listener serving https
//! with `http.tls_cert_file`/`http.tls_key_file`. Each refusal (another CA, another host name, plain HTTP) is
//! shown failing.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::certs::{certs, ServerCert};
use common::Env;
use delta_bridge::config::Config;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

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
             api_ca_file = \"{}\"\napi_key = \"k\"\napi_secret = \"emqx-secret\"\n\
             authn_token = \"authn-token-for-emqx-0123\"\n",
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
