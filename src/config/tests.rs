use std::path::PathBuf;

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
    assert_eq!(c.postgres.migrate_lock_timeout, Duration::from_secs(60));
    assert_eq!(c.postgres.ddl_lock_timeout, Duration::from_secs(1));
    assert_eq!(c.postgres.ddl_deadline, Duration::from_secs(300));
    assert_eq!(c.http.max_connections, 256);
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
    for bad in ["0", "-1", "65537", "\"many\""] {
        assert_eq!(
            key_of(parse(&format!("[http]\nmax_connections = {bad}\n"), &[]).unwrap_err()),
            "http.max_connections",
            "{bad}"
        );
    }
    assert_eq!(
        key_of(parse("[broker]\nkind = \"rabbit\"\n", &[]).unwrap_err()),
        "broker.kind"
    );
    assert_eq!(key_of(parse("[postgres]\nurl = 5\n", &[]).unwrap_err()), "postgres.url");
    assert_eq!(
        key_of(parse("[mqtt]\nkeep_alive = \"2s\"\n", &[]).unwrap_err()),
        "mqtt.keep_alive"
    );
    assert_eq!(
        key_of(parse("[mqtt]\nrepublish_window = \"a while\"\n", &[]).unwrap_err()),
        "mqtt.republish_window"
    );
    assert_eq!(
        key_of(parse("[mqtt]\nrepublish_window = -1\n", &[]).unwrap_err()),
        "mqtt.republish_window"
    );
    assert_eq!(
        key_of(parse("[postgres]\nmigrate_lock_timeout = \"0s\"\n", &[]).unwrap_err()),
        "postgres.migrate_lock_timeout"
    );
    assert_eq!(
        key_of(parse("", &[("DELTA_BRIDGE__POSTGRES__MIGRATE_LOCK_TIMEOUT", "soon")]).unwrap_err()),
        "postgres.migrate_lock_timeout"
    );
    assert_eq!(
        key_of(parse("[postgres]\nddl_lock_timeout = \"0s\"\n", &[]).unwrap_err()),
        "postgres.ddl_lock_timeout"
    );
    assert_eq!(
        key_of(parse("[postgres]\nddl_lock_timeout = \"2s\"\nddl_deadline = \"1s\"\n", &[]).unwrap_err()),
        "postgres.ddl_deadline"
    );
}

#[test]
fn tls_settings_are_checked_with_the_key_and_the_reason() {
    for (toml, key, says) in [
        (
            "[postgres]\nurl = \"postgres://db/x?sslmode=verify-ca\"\n",
            "postgres.url",
            "needs sslrootcert",
        ),
        (
            "[postgres]\nurl = \"host=db sslmode=verify-any\"\n",
            "postgres.url",
            "not one of",
        ),
        (
            "[postgres]\nurl = \"postgres://db/x?sslcert=/c.pem\"\n",
            "postgres.url",
            "not a PostgreSQL connection URL",
        ),
        (
            "[broker]\napi_url = \"http://emqx:18083\"\napi_ca_file = \"/ca.pem\"\n",
            "broker.api_ca_file",
            "https://",
        ),
        ("[broker]\napi_url = \"ftp://emqx\"\n", "broker.api_url", "https://"),
        (
            "[http]\ntls_cert_file = \"/tls/cert.pem\"\n",
            "http.tls_key_file",
            "both or neither",
        ),
        (
            "[http]\ntls_key_file = \"/tls/key.pem\"\n",
            "http.tls_cert_file",
            "both or neither",
        ),
    ] {
        match parse(toml, &[]) {
            Err(ConfigError::Invalid { key: k, reason }) => {
                assert_eq!(k, key, "{toml}");
                assert!(reason.contains(says), "{toml}: {reason}");
            }
            other => panic!("{toml}: {other:?}"),
        }
    }
    let ok = parse(
        "[postgres]\nurl = \"postgres://db/x?sslmode=verify-full&sslrootcert=/ca.pem\"\n\
         [broker]\napi_url = \"https://emqx:18084\"\napi_ca_file = \"/emqx-ca.pem\"\n\
         [http]\ntls_cert_file = \"/tls/cert.pem\"\ntls_key_file = \"/tls/key.pem\"\n",
        &[],
    )
    .expect("valid");
    assert_eq!(ok.broker.api_ca_file.as_deref(), Some(Path::new("/emqx-ca.pem")));
    assert!(ok.redacted_toml().contains("api_ca_file = \"/emqx-ca.pem\"\n"));
    assert!(ok
        .redacted_toml()
        .contains("tls_cert_file = \"/tls/cert.pem\"\ntls_key_file = \"/tls/key.pem\"\n"));
    // A URL with TLS settings and a password prints whole, the password hidden (not "<redacted>" for a string
    // tokio-postgres alone would not read), and postgres.password applies to it.
    let c = parse(
        "[postgres]\nurl = \"postgres://u:hunter2@db/x?sslmode=verify-full&sslrootcert=/ca.pem\"\npassword = \"pw2\"\n",
        &[],
    )
    .expect("valid");
    assert!(
        c.redacted_toml()
            .contains("url = \"postgres://u:redacted@db/x?sslmode=verify-full&sslrootcert=/ca.pem\""),
        "{}",
        c.redacted_toml()
    );
    assert_eq!(
        c.postgres_url(),
        "postgres://u:pw2@db/x?sslmode=verify-full&sslrootcert=/ca.pem"
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

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("db-cfg-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    dir
}

fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A secret in every place one can be: the config file, the environment, `<key>_file` files (named by the file
/// and by the environment), URL userinfo and a URL query. Returns the config, its environment, the secrets.
fn secrets_everywhere() -> (Config, Vec<(String, String)>, Vec<&'static str>) {
    let dir = temp_dir("secrets");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "token-from-file-0123456789\n").expect("write");
    let admin_file = dir.join("admin");
    std::fs::write(&admin_file, "admin-pw-from-file\n").expect("write");
    let text = format!(
        "[postgres]\nurl = \"postgres://u:pg-userinfo-pw@h/db?password=pg-query-pw\"\npassword = \"pg-toml-pw\"\n\
         [mqtt]\nurl = \"mqtt://u:mqtt-userinfo-pw@broker:1883\"\n\
         [http]\nadmin_token_file = {:?}\n\
         [broker]\nkind = \"mosquitto\"\nadmin_username = \"admin\"\n\
         api_url = \"http://k:api-userinfo-pw@emqx:18083\"\napi_key = \"k\"\napi_secret = \"api-secret-toml\"\n\
         authn_token = \"authn-secret-toml\"\n",
        token_file.to_str().expect("utf8"),
    );
    let env = owned(&[
        ("DELTA_BRIDGE__MQTT__PASSWORD", "mqtt-pw-env"),
        ("DELTA_BRIDGE__LOAD__PASSWORD", "load-pw-env"),
        (
            "DELTA_BRIDGE__BROKER__ADMIN_PASSWORD_FILE",
            admin_file.to_str().expect("utf8"),
        ),
    ]);
    let cfg = Config::parse(&text, Path::new("test.toml"), &env).expect("valid");
    assert_eq!(
        cfg.http.admin_token.as_ref().map(Secret::expose),
        Some("token-from-file-0123456789")
    );
    let secrets = vec![
        "pg-userinfo-pw",
        "pg-query-pw",
        "pg-toml-pw",
        "mqtt-userinfo-pw",
        "mqtt-pw-env",
        "token-from-file",
        "admin-pw-from-file",
        "api-userinfo-pw",
        "api-secret-toml",
        "authn-secret-toml",
        "load-pw-env",
    ];
    (cfg, env, secrets)
}

#[test]
fn debug_never_prints_secrets() {
    let (c, _, secrets) = secrets_everywhere();
    let shown = format!("{c:?}\n{c:#?}");
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret} leaked in {shown}");
    }
    assert!(shown.contains("mqtt://u:redacted@broker:1883"), "{shown}");
}

#[test]
fn check_config_never_prints_secrets_and_says_where_each_is() {
    let (c, env, secrets) = secrets_everywhere();
    let shown = c.redacted_toml();
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret} leaked in {shown}");
    }
    for line in [
        "url = \"postgres://u:redacted@h/db?password=redacted\"",
        "# password: set in the config file, not printed",
        "url = \"mqtt://u:redacted@broker:1883\"",
        "# password: set by DELTA_BRIDGE__MQTT__PASSWORD, not printed",
        "api_url = \"http://k:redacted@emqx:18083/\"",
        "# api_secret: set in the config file, not printed",
        "# authn_token: set in the config file, not printed",
        "# password: set by DELTA_BRIDGE__LOAD__PASSWORD, not printed",
    ] {
        assert!(shown.lines().any(|l| l == line), "no line {line:?} in\n{shown}");
    }
    // Secrets read from files are printed as the file's name, which reads the same secret again.
    let again = Config::parse(&shown, Path::new("printed.toml"), &env).expect("the output is a valid config");
    assert_eq!(again.http.admin_token, c.http.admin_token);
    assert_eq!(again.broker.admin_password, c.broker.admin_password);
    assert_eq!(again.mqtt.password, c.mqtt.password);
    assert_eq!(again.postgres.password, None);
}

/// Every section with values other than the defaults, durations of several units, a string that needs escaping,
/// and secrets from the file, the environment and files.
const EVERY_SECTION: &str = r#"
env = "prod"
[postgres]
url = "postgres://bridge@db.internal:6432/mstore?sslmode=require"
password = "pg-secret"
schema = "shop \"eu\""
connect_timeout = "250ms"
migrate_lock_timeout = "2m30s"
ddl_lock_timeout = "750ms"
ddl_deadline = "12m"
[mqtt]
url = "mqtts://broker.internal:8883"
client_id = "bridge-{hostname}-{pid}"
username = "bridge"
ca_file = "/etc/ssl/broker-ca.pem"
keep_alive = "1h30m"
max_inflight = 7
republish_window = "2500ms"
[http]
listen = "[::1]:9090"
max_connections = 17
[credentials]
signing_key_file = "/keys/signing.pem"
ttl = "36h"
min_ttl = 90
max_ttl = "7d"
audience = "devices"
issuer = "bridge-prod"
[broker]
kind = "emqx"
admin_username = "admin"
api_url = "http://emqx:18083"
api_key = "key-1"
api_secret = "emqx-secret"
authn_token = "emqx-authn-secret"
[bridge]
max_pending = 1234
poll_interval = "1500ms"
[load]
username = "loader"
[log]
format = "json"
level = "info,delta_bridge=debug"
"#;

/// `cfg` with every secret removed, for comparing what is left.
fn without_secrets(mut cfg: Config) -> Config {
    cfg.postgres.password = None;
    cfg.mqtt.password = None;
    cfg.http.admin_token = None;
    cfg.broker.admin_password = None;
    cfg.broker.api_secret = None;
    cfg.broker.authn_token = None;
    cfg.load.password = None;
    cfg
}

#[test]
fn check_config_output_parses_back_to_the_same_config() {
    let dir = temp_dir("roundtrip");
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, "admin-token-0123456789\n").expect("write");
    let mut env = owned(&[
        ("DELTA_BRIDGE__MQTT__PASSWORD", "mqtt-secret"),
        ("DELTA_BRIDGE__BROKER__ADMIN_PASSWORD", "admin-secret"),
        ("DELTA_BRIDGE__BRIDGE__BATCH_SIZE", "42"),
        ("DELTA_BRIDGE__LOAD__PASSWORD", "load-secret"),
    ]);
    env.push((
        "DELTA_BRIDGE__HTTP__ADMIN_TOKEN_FILE".into(),
        token_file.to_str().expect("utf8").into(),
    ));
    let first = Config::parse(EVERY_SECTION, Path::new("every.toml"), &env).expect("valid");
    assert_eq!(first.mqtt.keep_alive, Duration::from_secs(5400));
    assert_eq!(first.bridge.batch_size, 42);
    assert_eq!(first.http.max_connections, 17);
    let printed = first.redacted_toml();

    // Parsed again with no environment, only a secret the emqx broker requires (the config file held it, so
    // the output does not): everything but the secrets is the same...
    let only_secret = owned(&[
        ("DELTA_BRIDGE__BROKER__API_SECRET", "another"),
        ("DELTA_BRIDGE__BROKER__AUTHN_TOKEN", "another-authn-token"),
    ]);
    let bare = Config::parse(&printed, Path::new("printed.toml"), &only_secret).expect("printed config is valid");
    assert_eq!(
        without_secrets(bare.clone()),
        without_secrets(first.clone()),
        "{printed}"
    );
    // ... and the secret read from a file is back: the output names the file.
    assert_eq!(bare.http.admin_token, first.http.admin_token);

    // With the same environment plus the two secrets the config file held, it is the same configuration.
    env.push(("DELTA_BRIDGE__POSTGRES__PASSWORD".into(), "pg-secret".into()));
    env.push(("DELTA_BRIDGE__BROKER__API_SECRET".into(), "emqx-secret".into()));
    env.push(("DELTA_BRIDGE__BROKER__AUTHN_TOKEN".into(), "emqx-authn-secret".into()));
    let again = Config::parse(&printed, Path::new("printed.toml"), &env).expect("valid");
    assert_eq!(again, first, "{printed}");
    assert_eq!(again.postgres_url(), first.postgres_url());
}

#[test]
fn check_config_prints_durations_as_the_file_takes_them() {
    let c = parse(EVERY_SECTION, &[("DELTA_BRIDGE__POSTGRES__CONNECT_TIMEOUT", "1m 0.5s")]).expect("valid");
    let printed = c.redacted_toml();
    for line in [
        "connect_timeout = \"1m500ms\"",
        "migrate_lock_timeout = \"2m30s\"",
        "keep_alive = \"1h30m\"",
        "republish_window = \"2s500ms\"",
        "ttl = \"1d12h\"",
        "min_ttl = \"1m30s\"",
        "max_ttl = \"7d\"",
        "poll_interval = \"1s500ms\"",
    ] {
        assert!(printed.lines().any(|l| l == line), "no line {line:?} in\n{printed}");
    }
    assert!(!printed.contains("secs") && !printed.contains("nanos"), "{printed}");
    let defaults = parse("", &[]).expect("valid").redacted_toml();
    for line in [
        "connect_timeout = \"10s\"",
        "keep_alive = \"5s\"",
        "republish_window = \"10s\"",
        "poll_interval = \"500ms\"",
    ] {
        assert!(defaults.lines().any(|l| l == line), "no line {line:?} in\n{defaults}");
    }
}

#[test]
fn durations_format_in_humantime_units_and_parse_back() {
    use render::format_duration;
    let cases = [
        (Duration::ZERO, "0s"),
        (Duration::from_millis(250), "250ms"),
        (Duration::from_secs(10), "10s"),
        (Duration::from_secs(5400), "1h30m"),
        (Duration::from_secs(86_400), "1d"),
        (Duration::from_secs(30 * 86_400), "30d"),
        (Duration::new(90_061, 500_000_000), "1d1h1m1s500ms"),
        (Duration::new(1, 1_000), "1s1us"),
        (Duration::from_nanos(1_002_003), "1ms2us3ns"),
    ];
    for (d, text) in cases {
        assert_eq!(format_duration(d), text);
    }
    let mut d = Duration::from_nanos(7);
    while d < Duration::from_secs(400 * 86_400) {
        let text = format_duration(d);
        assert_eq!(humantime::parse_duration(&text).ok(), Some(d), "{text}");
        d = d * 3 + Duration::from_nanos(1);
    }
}

#[test]
fn check_config_prints_every_key_in_order() {
    let c = parse("[mqtt]\nclient_id = \"bridge-a\"\n", &[]).expect("valid");
    let expected = r#"env = "dev"

[postgres]
url = "postgres://postgres@127.0.0.1:5432/postgres"
# password: not set
schema = "public"
connect_timeout = "10s"
migrate_lock_timeout = "1m"
ddl_lock_timeout = "1s"
ddl_deadline = "5m"

[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "bridge-a"
# username: not set
# password: not set
# ca_file: not set
keep_alive = "5s"
max_inflight = 100
republish_window = "10s"

[http]
listen = "0.0.0.0:8080"
# admin_token: not set
max_connections = 256
# tls_cert_file: not set
# tls_key_file: not set

[credentials]
# signing_key_file: not set
ttl = "1d"
min_ttl = "1m"
max_ttl = "30d"
audience = "mqtt"
issuer = "delta-bridge"

[broker]
kind = "none"
# admin_username: not set
# admin_password: not set
# api_url: not set
# api_ca_file: not set
# api_key: not set
# api_secret: not set
# authn_token: not set

[bridge]
batch_size = 500
max_pending = 10000
max_pending_bytes = "64MiB"
poll_interval = "500ms"

[catchup]
retention = "7d"
partition_span = "1d"

[load]
# username: not set
# password: not set

[log]
format = "auto"
level = "info"
"#;
    assert_eq!(c.redacted_toml(), expected);
    // The default client id is a template: printed as such, with what it expands to here.
    let c = parse("", &[]).expect("valid");
    let line = format!(
        "client_id = \"delta-bridge-{{hostname}}-{{pid}}\"  # expands to \"{}\" here",
        c.mqtt.client_id
    );
    assert!(
        c.redacted_toml().lines().any(|l| l == line),
        "no {line:?} in\n{}",
        c.redacted_toml()
    );
}

#[test]
fn every_broker_kind_and_log_format_prints_as_the_file_takes_it() {
    for format in ["auto", "json", "text"] {
        let c = parse(&format!("[log]\nformat = \"{format}\"\n"), &[]).expect("valid");
        let again = parse(&c.redacted_toml(), &[]).expect("valid");
        assert_eq!(again.log.format, c.log.format);
        assert_eq!(c.log.format.name(), format);
    }
    let authn = temp_dir("broker-kinds").join("authn-token");
    std::fs::write(&authn, "0123456789abcdef\n").expect("write");
    let emqx = format!(
        "kind = \"emqx\"\napi_url = \"http://e\"\napi_key = \"k\"\napi_secret_file = \"/dev/null\"\nauthn_token_file = {:?}",
        authn.to_str().expect("utf8")
    );
    for kind in [
        "kind = \"none\"",
        "kind = \"mosquitto\"\nadmin_username = \"a\"\nadmin_password_file = \"/dev/null\"",
        emqx.as_str(),
    ] {
        let c = parse(&format!("[broker]\n{kind}\n"), &[]).expect("valid");
        let again = parse(&c.redacted_toml(), &[]).expect("valid");
        assert_eq!(again.broker, c.broker);
    }
}

#[test]
fn emqx_needs_an_authn_token_of_16_characters() {
    let emqx = "[broker]\nkind = \"emqx\"\napi_url = \"http://e\"\napi_key = \"k\"\napi_secret = \"s\"\n";
    for (extra, ok) in [
        ("", false),
        ("authn_token = \"0123456789abcde\"\n", false),
        ("authn_token = \"0123456789abcdef\"\n", true),
    ] {
        match parse(&format!("{emqx}{extra}"), &[]) {
            Ok(_) => assert!(ok, "{extra:?} accepted"),
            Err(e) => {
                assert!(!ok, "{extra:?}: {e}");
                assert!(e.to_string().contains("broker.authn_token"), "{e}");
            }
        }
    }
}

#[test]
fn a_syntax_error_names_the_place_but_does_not_quote_the_line() {
    for (text, place) in [
        ("[postgres]\npassword = \"hunter2\n", "line 2, column "),
        ("[postgres]\npassword = hunter2\n", "line 2, column 12"),
        ("[http\n", "line 1, column "),
    ] {
        let e = parse(text, &[]).unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(matches!(e, ConfigError::Syntax { .. }), "{shown}");
        assert!(shown.contains(place), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}

#[test]
fn sizes_parse_in_the_units_people_write_and_print_back_the_same() {
    use super::raw::{format_bytes, parse_bytes};
    assert_eq!(parse_bytes("64MiB"), Some(64 << 20));
    assert_eq!(parse_bytes("512 KiB"), Some(512 << 10));
    assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
    assert_eq!(parse_bytes("2000000"), Some(2_000_000));
    assert_eq!(parse_bytes("3MB"), Some(3_000_000));
    assert_eq!(parse_bytes("lots"), None);
    assert_eq!(parse_bytes("1PiB"), None);
    assert_eq!(parse_bytes("99999999999999999999GiB"), None);
    for n in [1u64 << 20, 3 << 30, 1_500_000, 12345] {
        assert_eq!(parse_bytes(&format_bytes(n)), Some(n));
    }
    let c = parse("[bridge]\nmax_pending_bytes = \"8MiB\"\n", &[]).expect("valid");
    assert_eq!(c.bridge.max_pending_bytes, 8 << 20);
    let c = parse("", &[("DELTA_BRIDGE__BRIDGE__MAX_PENDING_BYTES", "2GiB")]).expect("valid");
    assert_eq!(c.bridge.max_pending_bytes, 2 << 30);
    assert_eq!(
        key_of(parse("[bridge]\nmax_pending_bytes = \"10KiB\"\n", &[]).expect_err("too small")),
        "bridge.max_pending_bytes"
    );
    assert_eq!(
        key_of(parse("[bridge]\nmax_pending_bytes = true\n", &[]).expect_err("not a size")),
        "bridge.max_pending_bytes"
    );
}

#[test]
fn the_republish_window_defaults_to_ten_seconds_and_zero_turns_it_off() {
    assert_eq!(
        parse("", &[]).expect("valid").mqtt.republish_window,
        Duration::from_secs(10)
    );
    let off = parse("[mqtt]\nrepublish_window = \"0s\"\n", &[]).expect("valid");
    assert_eq!(off.mqtt.republish_window, Duration::ZERO);
    assert!(off.redacted_toml().lines().any(|l| l == "republish_window = \"0s\""));
    let env = parse("", &[("DELTA_BRIDGE__MQTT__REPUBLISH_WINDOW", "1m")]).expect("valid");
    assert_eq!(env.mqtt.republish_window, Duration::from_secs(60));
}

#[test]
fn a_client_id_without_the_hostname_is_reported_as_one_replicas_may_share() {
    let id = |t: &str| {
        let c = parse(&format!("[mqtt]\nclient_id = {t:?}\n"), &[]).expect("valid");
        c.mqtt.shared_client_id_risk()
    };
    assert_eq!(
        parse("", &[]).expect("valid").mqtt.shared_client_id_risk(),
        None,
        "the default"
    );
    assert_eq!(id("bridge-{hostname}"), None);
    let fixed = id("bridge-a").expect("a fixed id is reported");
    assert!(fixed.contains("fixed string \"bridge-a\""), "{fixed}");
    let pid = id("bridge-{pid}").expect("{pid} alone is reported");
    assert!(pid.contains("pid 1"), "{pid}");
}

#[test]
fn form_only_reads_no_secret_file_and_still_checks_the_rest() {
    let text = "[mqtt]\npassword_file = \"/secrets/mqtt-password\"\n\
                [broker]\nkind = \"emqx\"\napi_url = \"https://emqx:18084\"\napi_key = \"k\"\n\
                api_secret_file = \"/secrets/emqx-api-secret\"\nauthn_token_file = \"/secrets/broker-authn-token\"\n";
    // Read (start-up): the missing file is refused, naming its key.
    let err = Config::parse(text, Path::new("test.toml"), &[]).expect_err("files read");
    assert!(err.to_string().starts_with("mqtt.password_file: cannot read"), "{err}");
    // Form only: accepted, each secret unread and empty, printed as its _file setting.
    let cfg = Config::parse_with(text, Path::new("test.toml"), &[], SecretFiles::FormOnly).expect("form only");
    for s in [&cfg.mqtt.password, &cfg.broker.api_secret, &cfg.broker.authn_token] {
        let s = s.as_ref().expect("set");
        assert!(s.is_unread() && s.expose().is_empty());
    }
    let printed = cfg.redacted_toml();
    assert!(
        printed.contains("password_file = \"/secrets/mqtt-password\""),
        "{printed}"
    );
    // An empty path is refused; other keys are validated as ever.
    let empty = text.replace("/secrets/emqx-api-secret", "");
    let err = Config::parse_with(&empty, Path::new("test.toml"), &[], SecretFiles::FormOnly).expect_err("empty");
    assert!(err.to_string().starts_with("broker.api_secret_file: is empty"), "{err}");
    let bad = text.replace("https://emqx", "ftp://emqx");
    let err = Config::parse_with(&bad, Path::new("test.toml"), &[], SecretFiles::FormOnly).expect_err("url");
    assert!(err.to_string().starts_with("broker.api_url"), "{err}");
}

#[test]
fn the_change_log_retention_defaults_to_seven_days_and_takes_any_duration_from_one_second() {
    let c = parse("", &[]).expect("valid");
    assert_eq!(c.catchup.retention, Duration::from_secs(7 * 86_400));
    assert_eq!(c.catchup.partition_span, Duration::from_secs(86_400));
    assert!(c.redacted_toml().lines().any(|l| l == "retention = \"7d\""));
    let c = parse("[catchup]\nretention = \"1s\"\n", &[]).expect("valid");
    assert_eq!(c.catchup.retention, Duration::from_secs(1));
    let c = parse("", &[("DELTA_BRIDGE__CATCHUP__RETENTION", "36h")]).expect("valid");
    assert_eq!(c.catchup.retention, Duration::from_secs(36 * 3600));
    for bad in ["\"a while\"", "\"500ms\"", "\"0s\"", "-1", "true"] {
        assert_eq!(
            key_of(parse(&format!("[catchup]\nretention = {bad}\n"), &[]).expect_err(bad)),
            "catchup.retention",
            "{bad}"
        );
    }
    let c = parse("[catchup]\npartition_span = \"2s\"\nretention = \"1m\"\n", &[]).expect("valid");
    assert_eq!(c.catchup.partition_span, Duration::from_secs(2));
    // Too many partitions for the retention (each is a table every read of the log locks).
    let c = parse("[catchup]\npartition_span = \"10m\"\nretention = \"6d\"\n", &[]).expect("864 partitions");
    assert_eq!(c.catchup.partition_span, Duration::from_secs(600));
    assert_eq!(
        key_of(parse("[catchup]\npartition_span = \"60s\"\n", &[]).expect_err("10,080 partitions")),
        "catchup.partition_span"
    );
    for bad in ["\"0s\"", "\"7s\"", "\"2d\"", "\"1500ms\""] {
        assert_eq!(
            key_of(parse(&format!("[catchup]\npartition_span = {bad}\n"), &[]).expect_err(bad)),
            "catchup.partition_span",
            "{bad}"
        );
    }
}
