use super::*;

#[test]
fn parses_broker_urls() {
    assert_eq!(
        BrokerAddress::parse("mqtt://127.0.0.1:1883"),
        Ok(BrokerAddress {
            host: "127.0.0.1".into(),
            port: 1883,
            tls: false
        })
    );
    assert_eq!(
        BrokerAddress::parse("mqtts://emqx").map(|a| (a.port, a.tls)),
        Ok((8883, true))
    );
    assert!(BrokerAddress::parse("http://x").is_err());
    assert!(BrokerAddress::parse("nonsense").is_err());
}

fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Config::parse(text, Path::new("test.toml"), &env)
}

fn key_of(e: ConfigError) -> String {
    match e {
        ConfigError::Invalid { key, .. } => key,
        other => panic!("expected an invalid-key error, got {other}"),
    }
}

#[test]
fn defaults_are_valid() {
    let c = parse("", &[]).expect("defaults");
    assert_eq!(c.env, "dev");
    assert!(c.mqtt.client_id.starts_with("delta-bridge-"), "{}", c.mqtt.client_id);
    assert!(c.mqtt.client_id.ends_with(&format!("-{}", std::process::id())));
    assert_eq!(c.credentials.ttl, Duration::from_secs(86400));
    assert_eq!(c.broker.kind, BrokerKind::None);
}

#[test]
fn environment_overrides_file() {
    let c = parse(
        "[postgres]\nurl = \"postgres://a@h/db\"\n",
        &[
            ("DELTA_BRIDGE__POSTGRES__URL", "postgres://b@h/db2"),
            ("DELTA_BRIDGE__ENV", "prod"),
        ],
    )
    .expect("valid");
    assert_eq!(c.postgres.url, "postgres://b@h/db2");
    assert_eq!(c.env, "prod");
}

#[test]
fn errors_name_the_key() {
    assert_eq!(
        key_of(parse("[mqtt]\nurl = \"http://x\"\n", &[]).unwrap_err()),
        "mqtt.url"
    );
    assert_eq!(
        key_of(parse("[credentials]\nttl = \"forever\"\n", &[]).unwrap_err()),
        "credentials.ttl"
    );
    assert_eq!(
        key_of(parse("[mqtt]\nmax_inflight = \"many\"\n", &[]).unwrap_err()),
        "mqtt.max_inflight"
    );
    assert_eq!(
        key_of(parse("[postgress]\nurl = \"x\"\n", &[]).unwrap_err()),
        "postgress.url"
    );
    assert_eq!(key_of(parse("env = \"a/b\"\n", &[]).unwrap_err()), "env");
    assert_eq!(
        key_of(parse("[http]\nlisten = \"nowhere\"\n", &[]).unwrap_err()),
        "http.listen"
    );
    assert_eq!(
        key_of(parse("[broker]\nkind = \"rabbit\"\n", &[]).unwrap_err()),
        "broker.kind"
    );
    assert_eq!(key_of(parse("[postgres]\nurl = 5\n", &[]).unwrap_err()), "postgres.url");
    assert_eq!(
        key_of(parse("[mqtt]\nkeep_alive = \"2s\"\n", &[]).unwrap_err()),
        "mqtt.keep_alive"
    );
}

#[test]
fn secrets_never_print() {
    let c = parse(
        "[postgres]\nurl = \"postgres://u:hunter2@h/db\"\n[mqtt]\npassword = \"s3cret-mqtt\"\n\
         [http]\nadmin_token = \"0123456789abcdef-token\"\n",
        &[],
    )
    .expect("valid");
    let shown = format!("{}\n{:?}", c.redacted_toml(), c);
    for secret in ["hunter2", "s3cret-mqtt", "0123456789abcdef-token"] {
        assert!(!shown.contains(secret), "{secret} leaked in {shown}");
    }
    assert_eq!(c.mqtt.password.as_ref().map(Secret::expose), Some("s3cret-mqtt"));
}

#[test]
fn secret_from_file() {
    let dir = std::env::temp_dir().join(format!("db-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let f = dir.join("pw");
    std::fs::write(&f, "from-file\n").expect("write");
    let c = parse("", &[("DELTA_BRIDGE__MQTT__PASSWORD_FILE", f.to_str().expect("utf8"))]).expect("valid");
    assert_eq!(c.mqtt.password.as_ref().map(Secret::expose), Some("from-file"));
    let e = parse("", &[("DELTA_BRIDGE__MQTT__PASSWORD_FILE", "/nonexistent/pw")]).unwrap_err();
    assert_eq!(key_of(e), "mqtt.password_file");
}

#[test]
fn password_override_applies_to_url() {
    let c = parse(
        "[postgres]\nurl = \"postgres://u@h:5432/db\"\npassword = \"p@ss\"\n",
        &[],
    )
    .expect("valid");
    assert!(
        c.postgres_url().starts_with("postgres://u:p%40ss@h:5432/db"),
        "{}",
        c.postgres_url()
    );
}

#[test]
fn redact_url_hides_every_password() {
    assert_eq!(redact_url("postgres://u:hunter2@h/db"), "postgres://u:redacted@h/db");
    assert_eq!(
        redact_url("postgres://u@h/db?sslmode=require&password=hunter2"),
        "postgres://u@h/db?sslmode=require&password=redacted"
    );
    assert_eq!(redact_url("host=h user=u password=hunter2"), "<redacted>");
    assert_eq!(redact_url("mqtt://u:hunter2@"), "<redacted>");
    // Nothing to hide: unchanged, byte for byte.
    assert_eq!(redact_url("postgres://u@h:5432/db"), "postgres://u@h:5432/db");
    assert_eq!(redact_url("mqtt://127.0.0.1:1883"), "mqtt://127.0.0.1:1883");
    let e = BrokerAddress::parse("mqtt://u:hunter2@").unwrap_err();
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn debug_never_prints_secrets() {
    let dir = std::env::temp_dir().join(format!("db-cfg-debug-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "token-from-file-0123456789\n").expect("write");
    let c = parse(
        "[postgres]\nurl = \"postgres://u:pg-userinfo-pw@h/db?password=pg-query-pw\"\n\
         [mqtt]\nurl = \"mqtt://u:mqtt-userinfo-pw@broker:1883\"\n\
         [broker]\nkind = \"emqx\"\napi_url = \"http://k:api-userinfo-pw@emqx:18083\"\napi_key = \"k\"\n\
         api_secret = \"api-secret-toml\"\n",
        &[
            ("DELTA_BRIDGE__MQTT__PASSWORD", "mqtt-pw-env"),
            ("DELTA_BRIDGE__LOAD__PASSWORD", "load-pw-env"),
            (
                "DELTA_BRIDGE__HTTP__ADMIN_TOKEN_FILE",
                token_file.to_str().expect("utf8"),
            ),
        ],
    )
    .expect("valid");
    let shown = format!("{c:?}\n{c:#?}");
    for secret in [
        "pg-userinfo-pw",
        "pg-query-pw",
        "mqtt-userinfo-pw",
        "api-userinfo-pw",
        "api-secret-toml",
        "mqtt-pw-env",
        "load-pw-env",
        "token-from-file",
    ] {
        assert!(!shown.contains(secret), "{secret} leaked in {shown}");
    }
    assert!(shown.contains("mqtt://u:redacted@broker:1883"), "{shown}");
    let _ = std::fs::remove_dir_all(dir);
}
