//! TLS to every peer, end to end, with certificates each test makes (its own CA and a second, unrelated one):
//! PostgreSQL with `ssl = on` and each `sslmode`, and Mosquitto with a TLS listener (the https side, the EMQX
//! REST API and the bridge's own listener, is tests/https.rs). Each refusal (a certificate from another CA, or for another host
//! name) is shown failing, and where the bridge runs as a process, staying unready and saying why.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::certs::{certs, ServerCert};
use common::{of_type, Env, Subscriber};
use delta_bridge::config::Config;
use delta_harness::servers::{free_port, Mosquitto, ServerTls};
use delta_harness::stack::StackOptions;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

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
