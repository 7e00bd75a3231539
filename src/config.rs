//! Configuration: a TOML file overlaid by `DELTA_BRIDGE__SECTION__KEY` environment variables, validated into
//! typed settings. Owns every default and every rule about what a valid value is; never touches the network.
//!
//! Each error names the key (`mqtt.url`) and what is wrong with it, so `check-config` and start-up can exit 2
//! with a message an operator can act on. Secrets (passwords, tokens, keys) may come from the TOML, the
//! environment, or a file (`<key>_file`), and are wrapped in [`Secret`] so that they never print.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use toml::Value;

/// Prefix of the environment overrides: `DELTA_BRIDGE__POSTGRES__URL` sets `postgres.url`.
pub const ENV_PREFIX: &str = "DELTA_BRIDGE__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// A secret value: shown as `<redacted>` by Debug, Display and Serialize.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// First topic level, e.g. `dev`, `prod`.
    pub env: String,
    pub postgres: PostgresConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub credentials: CredentialsConfig,
    pub broker: BrokerConfig,
    pub bridge: BridgeConfig,
    pub load: LoadConfig,
    pub log: LogConfig,
}

#[derive(Clone, Serialize)]
pub struct PostgresConfig {
    /// Connection URL; a password in it is redacted when printed. Must reach PostgreSQL directly (not through
    /// a transaction pooler): the bridge holds LISTEN and an advisory lock on one session.
    #[serde(serialize_with = "ser_redacted_url")]
    pub url: String,
    /// Overrides the password of `url` (so the URL can sit in a ConfigMap and the password in a Secret).
    pub password: Option<Secret>,
    /// Schema of the business tables (merchants, branches, products, ...).
    pub schema: String,
    pub connect_timeout: Duration,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password)
            .field("schema", &self.schema)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    #[serde(serialize_with = "ser_redacted_url")]
    pub url: String,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM file of CA certificates for mqtts:// (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    pub keep_alive: Duration,
    /// Upper bound on unacknowledged QoS 1 publishes on the wire (the broker's Receive Maximum caps it too).
    pub max_inflight: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub admin_token: Option<Secret>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CredentialsConfig {
    pub signing_key_file: Option<PathBuf>,
    pub ttl: Duration,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub audience: String,
    pub issuer: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Mosquitto,
    Emqx,
    None,
}

#[derive(Debug, Clone, Serialize)]
pub struct BrokerConfig {
    pub kind: BrokerKind,
    pub admin_username: Option<String>,
    pub admin_password: Option<Secret>,
    pub api_url: Option<String>,
    pub api_key: Option<String>,
    pub api_secret: Option<Secret>,
}

/// Tuning of the data path; the defaults are what the benchmarks were run with.
#[derive(Debug, Clone, Serialize)]
pub struct BridgeConfig {
    /// Outbox rows read per query.
    pub batch_size: u32,
    /// Events read but not yet acknowledged, at most; the reader waits beyond it (bounded memory).
    pub max_pending: usize,
    /// Poll the outbox at least this often even without a wake-up (a safety net, not the latency path).
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadConfig {
    pub username: Option<String>,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Keys this version knows; anything else is a typo worth an error rather than a silently ignored setting.
const KNOWN: &[(&str, &[&str])] = &[
    ("", &["env"]),
    (
        "postgres",
        &["url", "password", "password_file", "schema", "connect_timeout"],
    ),
    (
        "mqtt",
        &[
            "url",
            "client_id",
            "username",
            "password",
            "password_file",
            "ca_file",
            "keep_alive",
            "max_inflight",
        ],
    ),
    ("http", &["listen", "admin_token", "admin_token_file"]),
    (
        "credentials",
        &["signing_key_file", "ttl", "min_ttl", "max_ttl", "audience", "issuer"],
    ),
    (
        "broker",
        &[
            "kind",
            "admin_username",
            "admin_password",
            "admin_password_file",
            "api_url",
            "api_key",
            "api_secret",
            "api_secret_file",
        ],
    ),
    ("bridge", &["batch_size", "max_pending", "poll_interval"]),
    ("load", &["username", "password", "password_file"]),
    ("log", &["format", "level"]),
];

impl Config {
    /// Loads `path` (if any) and the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(path, &env)
    }

    /// Loads from a file and an explicit environment (tests pass their own).
    pub fn load_from(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let origin = path.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("<none>"));
        Self::parse(&text, &origin, env)
    }

    pub fn parse(text: &str, origin: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut flat = flatten(&table)?;
        for (k, v) in env {
            if let Some(rest) = k.strip_prefix(ENV_PREFIX) {
                let key = rest
                    .split("__")
                    .map(str::to_ascii_lowercase)
                    .collect::<Vec<_>>()
                    .join(".");
                flat.insert(key, Value::String(v.clone()));
            }
        }
        for key in flat.keys() {
            let (section, name) = key.rsplit_once('.').unwrap_or(("", key));
            let known = KNOWN.iter().any(|(s, names)| *s == section && names.contains(&name));
            if !known {
                return Err(ConfigError::invalid(
                    key,
                    "unknown key (see README, Configuration reference)",
                ));
            }
        }
        Raw { flat }.build()
    }

    /// The effective configuration as TOML, secrets redacted: what `check-config` prints.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }

    /// The PostgreSQL URL with `postgres.password` applied.
    pub fn postgres_url(&self) -> String {
        match &self.postgres.password {
            None => self.postgres.url.clone(),
            Some(p) => match url::Url::parse(&self.postgres.url) {
                Ok(mut u) => {
                    let _ = u.set_password(Some(p.expose()));
                    u.to_string()
                }
                Err(_) => self.postgres.url.clone(),
            },
        }
    }
}

fn flatten(table: &toml::Table) -> Result<BTreeMap<String, Value>, ConfigError> {
    let mut out = BTreeMap::new();
    for (k, v) in table {
        match v {
            Value::Table(inner) => {
                for (k2, v2) in inner {
                    if matches!(v2, Value::Table(_)) {
                        return Err(ConfigError::invalid(&format!("{k}.{k2}"), "unknown section"));
                    }
                    out.insert(format!("{k}.{k2}"), v2.clone());
                }
            }
            other => {
                out.insert(k.clone(), other.clone());
            }
        }
    }
    Ok(out)
}

fn ser_redacted_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// Where the broker is, from `mqtt://host:port` or `mqtts://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddress {
    pub fn parse(raw: &str) -> Result<BrokerAddress, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL ({e})"))?;
        let (tls, default_port) = match url.scheme() {
            "mqtt" | "tcp" => (false, 1883),
            "mqtts" | "ssl" => (true, 8883),
            other => return Err(format!("scheme {other:?} is not mqtt:// or mqtts://")),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{raw:?} has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Ok(BrokerAddress {
            host,
            port: url.port().unwrap_or(default_port),
            tls,
        })
    }
}

/// Replaces the password of a URL with `<redacted>`; unparsable URLs are redacted whole if they contain '@'.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        Ok(_) => raw.to_string(),
        Err(_) if raw.contains('@') => "<redacted>".to_string(),
        Err(_) => raw.to_string(),
    }
}

fn expand_client_id(template: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "local".to_string());
    template
        .replace("{hostname}", &host)
        .replace("{pid}", &std::process::id().to_string())
}

/// Flat view over the merged file and environment, with typed accessors that name the key on error.
struct Raw {
    flat: BTreeMap<String, Value>,
}

impl Raw {
    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.flat.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ConfigError::invalid(
                key,
                format!("expected a string, found {}", other.type_str()),
            )),
        }
    }

    fn string_or(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        Ok(self.string(key)?.unwrap_or_else(|| default.to_string()))
    }

    fn non_empty(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        let v = self.string_or(key, default)?;
        if v.trim().is_empty() {
            return Err(ConfigError::invalid(key, "must not be empty"));
        }
        Ok(v)
    }

    fn integer(&self, key: &str, default: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
        let v = match self.flat.get(key) {
            None => default,
            Some(Value::Integer(i)) => *i,
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map_err(|_| ConfigError::invalid(key, format!("expected a whole number, found {s:?}")))?,
            Some(other) => {
                return Err(ConfigError::invalid(
                    key,
                    format!("expected a whole number, found {}", other.type_str()),
                ))
            }
        };
        if v < min || v > max {
            return Err(ConfigError::invalid(key, format!("{v} is out of range [{min}, {max}]")));
        }
        Ok(v)
    }

    fn duration(&self, key: &str, default: &str) -> Result<Duration, ConfigError> {
        let text = match self.flat.get(key) {
            None => default.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Integer(i)) if *i >= 0 => format!("{i}s"),
            Some(other) => {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "expected a duration such as \"30s\" or \"24h\", found {}",
                        other.type_str()
                    ),
                ))
            }
        };
        humantime::parse_duration(text.trim()).map_err(|e| {
            ConfigError::invalid(
                key,
                format!("{text:?} is not a duration ({e}); use e.g. \"30s\", \"24h\""),
            )
        })
    }

    /// A secret from `key` or from the file named by `key_file` (trailing newline trimmed); not both.
    fn secret(&self, key: &str) -> Result<Option<Secret>, ConfigError> {
        let file_key = format!("{key}_file");
        let direct = self.string(key)?;
        let file = self.string(&file_key)?;
        match (direct, file) {
            (Some(_), Some(_)) => Err(ConfigError::invalid(
                key,
                format!("set either {key} or {file_key}, not both"),
            )),
            (Some(v), None) => Ok(Some(Secret(v))),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| ConfigError::invalid(&file_key, format!("cannot read {path}: {e}")))?;
                Ok(Some(Secret(text.trim_end_matches(['\n', '\r']).to_string())))
            }
            (None, None) => Ok(None),
        }
    }

    fn build(self) -> Result<Config, ConfigError> {
        let env = self.non_empty("env", "dev")?;
        if !crate::convert::topic::is_valid_level(&env) {
            return Err(ConfigError::invalid(
                "env",
                "must be a topic level without '/', '+', '#' or spaces",
            ));
        }

        let pg_url = self.non_empty("postgres.url", "postgres://postgres@127.0.0.1:5432/postgres")?;
        if pg_url.parse::<tokio_postgres::Config>().is_err() {
            return Err(ConfigError::invalid(
                "postgres.url",
                format!("{:?} is not a PostgreSQL connection URL", redact_url(&pg_url)),
            ));
        }
        let schema = self.non_empty("postgres.schema", "public")?;
        let postgres = PostgresConfig {
            url: pg_url,
            password: self.secret("postgres.password")?,
            schema,
            connect_timeout: self.duration("postgres.connect_timeout", "10s")?,
        };

        let mqtt_url = self.non_empty("mqtt.url", "mqtt://127.0.0.1:1883")?;
        BrokerAddress::parse(&mqtt_url).map_err(|reason| ConfigError::invalid("mqtt.url", reason))?;
        // Replicas sharing one configuration need distinct client ids (the broker disconnects the older of two
        // sessions with the same id): `{hostname}` and `{pid}` are expanded.
        let client_id = expand_client_id(&self.non_empty("mqtt.client_id", "delta-bridge-{hostname}-{pid}")?);
        if client_id.contains(['+', '#', '/']) || client_id.len() > 128 {
            return Err(ConfigError::invalid(
                "mqtt.client_id",
                "must be at most 128 characters without '/', '+' or '#'",
            ));
        }
        let keep_alive = self.duration("mqtt.keep_alive", "5s")?;
        if keep_alive < Duration::from_secs(5) {
            // rumqttc refuses (panics on) shorter intervals.
            return Err(ConfigError::invalid("mqtt.keep_alive", "must be at least 5s"));
        }
        let mqtt = MqttConfig {
            url: mqtt_url,
            client_id,
            username: self.string("mqtt.username")?,
            password: self.secret("mqtt.password")?,
            ca_file: self.string("mqtt.ca_file")?.map(PathBuf::from),
            keep_alive,
            max_inflight: self.integer("mqtt.max_inflight", 100, 1, 65535)? as u16,
        };

        let listen_text = self.non_empty("http.listen", "0.0.0.0:8080")?;
        let listen = listen_text.parse().map_err(|_| {
            ConfigError::invalid(
                "http.listen",
                format!("{listen_text:?} is not an address such as 0.0.0.0:8080"),
            )
        })?;
        let admin_token = self.secret("http.admin_token")?;
        if let Some(t) = &admin_token {
            if t.expose().len() < 16 {
                return Err(ConfigError::invalid(
                    "http.admin_token",
                    "must be at least 16 characters",
                ));
            }
        }
        let http = HttpConfig { listen, admin_token };

        let credentials = CredentialsConfig {
            signing_key_file: self.string("credentials.signing_key_file")?.map(PathBuf::from),
            ttl: self.duration("credentials.ttl", "24h")?,
            min_ttl: self.duration("credentials.min_ttl", "60s")?,
            max_ttl: self.duration("credentials.max_ttl", "30d")?,
            audience: self.non_empty("credentials.audience", "mqtt")?,
            issuer: self.non_empty("credentials.issuer", "delta-bridge")?,
        };
        if credentials.min_ttl > credentials.max_ttl {
            return Err(ConfigError::invalid(
                "credentials.min_ttl",
                "must not exceed credentials.max_ttl",
            ));
        }
        if credentials.ttl < credentials.min_ttl || credentials.ttl > credentials.max_ttl {
            return Err(ConfigError::invalid(
                "credentials.ttl",
                "must lie within [min_ttl, max_ttl]",
            ));
        }

        let kind = match self.string_or("broker.kind", "none")?.as_str() {
            "mosquitto" => BrokerKind::Mosquitto,
            "emqx" => BrokerKind::Emqx,
            "none" => BrokerKind::None,
            other => {
                return Err(ConfigError::invalid(
                    "broker.kind",
                    format!("{other:?} is not one of \"mosquitto\", \"emqx\", \"none\""),
                ))
            }
        };
        let broker = BrokerConfig {
            kind,
            admin_username: self.string("broker.admin_username")?,
            admin_password: self.secret("broker.admin_password")?,
            api_url: self.string("broker.api_url")?,
            api_key: self.string("broker.api_key")?,
            api_secret: self.secret("broker.api_secret")?,
        };
        match kind {
            BrokerKind::Mosquitto if broker.admin_username.is_none() || broker.admin_password.is_none() => {
                return Err(ConfigError::invalid(
                    "broker.admin_username",
                    "broker.kind = \"mosquitto\" needs admin_username and admin_password (dynamic-security admin)",
                ))
            }
            BrokerKind::Emqx if broker.api_url.is_none() || broker.api_key.is_none() || broker.api_secret.is_none() => {
                return Err(ConfigError::invalid(
                    "broker.api_url",
                    "broker.kind = \"emqx\" needs api_url, api_key and api_secret (REST API v5)",
                ))
            }
            _ => {}
        }

        let bridge = BridgeConfig {
            batch_size: self.integer("bridge.batch_size", 500, 1, 100_000)? as u32,
            max_pending: self.integer("bridge.max_pending", 10_000, 1, 10_000_000)? as usize,
            poll_interval: self.duration("bridge.poll_interval", "500ms")?,
        };
        if bridge.poll_interval.is_zero() {
            return Err(ConfigError::invalid("bridge.poll_interval", "must be greater than 0"));
        }

        let load = LoadConfig {
            username: self.string("load.username")?,
            password: self.secret("load.password")?,
        };

        let format = match self.string_or("log.format", "auto")?.as_str() {
            "auto" => LogFormat::Auto,
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                return Err(ConfigError::invalid(
                    "log.format",
                    format!("{other:?} is not one of \"auto\", \"json\", \"text\""),
                ))
            }
        };
        let log = LogConfig {
            format,
            level: self.non_empty("log.level", "info")?,
        };

        Ok(Config {
            env,
            postgres,
            mqtt,
            http,
            credentials,
            broker,
            bridge,
            load,
            log,
        })
    }
}

#[cfg(test)]
mod tests {
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
}
