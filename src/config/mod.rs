//! Configuration: a TOML file overlaid by `DELTA_BRIDGE__SECTION__KEY` environment variables, validated into
//! typed settings. Owns every default and every rule about what a valid value is; never touches the network.
//!
//! Each error names the key (`mqtt.url`) and what is wrong with it, so `check-config` and start-up can exit 2
//! with a message an operator can act on. Secrets (passwords, tokens, keys) may come from the TOML, the
//! environment, or a file (`<key>_file`), and are wrapped in [`Secret`] so that they never print.

mod conninfo;
mod pgtls;
mod raw;
mod render;
mod secret;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use conninfo::redact_postgres;
pub(crate) use pgtls::{split as split_pg_tls, RootCert, SslMode as PgSslMode};
pub use raw::ENV_PREFIX;
pub use secret::{redact_url, Secret};

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// First topic level, e.g. `dev`, `prod`.
    pub env: String,
    pub postgres: PostgresConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub credentials: CredentialsConfig,
    pub broker: BrokerConfig,
    pub bridge: BridgeConfig,
    pub catchup: CatchupConfig,
    pub load: LoadConfig,
    pub log: LogConfig,
}

#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Connection URL or libpq `key=value` string; passwords in it are redacted when printed. Must reach
    /// PostgreSQL directly (not through a transaction pooler): the bridge holds LISTEN and an advisory lock on
    /// one session.
    pub url: String,
    /// Overrides the password of `url`, in either form (so the URL can sit in a ConfigMap and the password in
    /// a Secret).
    pub password: Option<Secret>,
    /// Schema of the business tables (merchants, branches, products, ...).
    pub schema: String,
    pub connect_timeout: Duration,
    /// How long a migration waits for the migration lock (held by another replica's migration, or squatted)
    /// before it gives up with an error naming the holder.
    pub migrate_lock_timeout: Duration,
    /// How long each statement of a migration (or uninstall) waits for a table's lock before it gives way to
    /// the writers and tries again later: the longest a writer queues behind it.
    pub ddl_lock_timeout: Duration,
    /// How long a migration (or uninstall) keeps trying to get its table locks before it gives up with an
    /// error naming the table and who held it.
    pub ddl_deadline: Duration,
}

// Debug by hand where a field is a URL (it may carry a password) and by destructuring, so that a new field
// cannot be added without deciding how it prints.
impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let PostgresConfig {
            url,
            password,
            schema,
            connect_timeout,
            migrate_lock_timeout,
            ddl_lock_timeout,
            ddl_deadline,
        } = self;
        f.debug_struct("PostgresConfig")
            .field("url", &redact_postgres(url))
            .field("password", password)
            .field("schema", schema)
            .field("connect_timeout", connect_timeout)
            .field("migrate_lock_timeout", migrate_lock_timeout)
            .field("ddl_lock_timeout", ddl_lock_timeout)
            .field("ddl_deadline", ddl_deadline)
            .finish()
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// The client id, `{hostname}` and `{pid}` expanded.
    pub client_id: String,
    /// The client id as configured, before expansion (what `check-config` prints).
    pub client_id_template: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM file of CA certificates for mqtts:// (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    pub keep_alive: Duration,
    /// Upper bound on unacknowledged QoS 1 publishes on the wire (the broker's Receive Maximum caps it too).
    pub max_inflight: u16,
    /// Events the broker acknowledged this recently before the connection was lost are published again
    /// after the reconnect: a broker that crashes may lose what it had acknowledged and not yet saved. Zero
    /// turns it off.
    pub republish_window: Duration,
}

impl MqttConfig {
    /// Why replicas sharing this configuration may share one client id, if they may: the broker then gives
    /// each one's session to the other as it connects (each takes the other's session over, back and forth).
    /// None when `{hostname}` makes the id per replica.
    pub fn shared_client_id_risk(&self) -> Option<String> {
        let t = &self.client_id_template;
        if t.contains("{hostname}") {
            return None;
        }
        Some(if t.contains("{pid}") {
            format!(
                "mqtt.client_id {t:?} expands only {{pid}}: replicas in containers all run as pid 1, so they get one \
                 client id"
            )
        } else {
            format!(
                "mqtt.client_id is the fixed string {t:?}: every replica started with this configuration uses the \
                 same client id"
            )
        })
    }
}

impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let MqttConfig {
            url,
            client_id,
            client_id_template,
            username,
            password,
            ca_file,
            keep_alive,
            max_inflight,
            republish_window,
        } = self;
        f.debug_struct("MqttConfig")
            .field("url", &redact_url(url))
            .field("client_id", client_id)
            .field("client_id_template", client_id_template)
            .field("username", username)
            .field("password", password)
            .field("ca_file", ca_file)
            .field("keep_alive", keep_alive)
            .field("max_inflight", max_inflight)
            .field("republish_window", republish_window)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub admin_token: Option<Secret>,
    /// Connections served at once; one more is closed as soon as it is accepted. Bounds the memory hostile
    /// or stalled clients can pin (each holds at most a 64 KiB body and hyper's read buffer).
    pub max_connections: usize,
    /// PEM certificate chain (the server's first) of an https listener; set with `tls_key_file` or not at all.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`'s first certificate.
    pub tls_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsConfig {
    pub signing_key_file: Option<PathBuf>,
    pub ttl: Duration,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub audience: String,
    pub issuer: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Mosquitto,
    Emqx,
    None,
}

impl BrokerKind {
    /// The value of `broker.kind` that selects it.
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::Emqx => "emqx",
            BrokerKind::None => "none",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    pub kind: BrokerKind,
    pub admin_username: Option<String>,
    pub admin_password: Option<Secret>,
    pub api_url: Option<String>,
    /// PEM file of CA certificates for an `https://` `api_url` (default: the system's roots).
    pub api_ca_file: Option<PathBuf>,
    pub api_key: Option<String>,
    pub api_secret: Option<Secret>,
    /// The secret EMQX's HTTP authenticator sends (`Authorization: Bearer …`) when it asks the bridge about a
    /// device's password (`POST /api/v1/broker/authn`); required with `kind = "emqx"`.
    pub authn_token: Option<Secret>,
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let BrokerConfig {
            kind,
            admin_username,
            admin_password,
            api_url,
            api_ca_file,
            api_key,
            api_secret,
            authn_token,
        } = self;
        f.debug_struct("BrokerConfig")
            .field("kind", kind)
            .field("admin_username", admin_username)
            .field("admin_password", admin_password)
            .field("api_url", &api_url.as_deref().map(redact_url))
            .field("api_ca_file", api_ca_file)
            .field("api_key", api_key)
            .field("api_secret", api_secret)
            .field("authn_token", authn_token)
            .finish()
    }
}

/// Tuning of the data path; the defaults are what the benchmarks were run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// Outbox rows read per query.
    pub batch_size: u32,
    /// Events read but not yet acknowledged, at most; the reader waits beyond it (bounded memory).
    pub max_pending: usize,
    /// Bytes of those events (payload and topic), at most: the reader waits beyond it, so that large events
    /// (a sale of a thousand items) cannot fill memory where a count would allow it.
    pub max_pending_bytes: u64,
    /// Poll the outbox at least this often even without a wake-up (a safety net, not the latency path).
    pub poll_interval: Duration,
}

/// The change log of published events (devices catch up from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchupConfig {
    /// How long a published event stays in the change log (at least 1 s).
    pub retention: Duration,
    /// The time span of one partition of the change log, which is dropped whole once all of it is older than
    /// `retention`: one day, except in tests that need partitions to expire within seconds.
    pub partition_span: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadConfig {
    pub username: Option<String>,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

impl LogFormat {
    /// The value of `log.format` that selects it.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Auto => "auto",
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Whether loading a configuration reads the files its `<key>_file` secrets name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretFiles {
    /// Read them, as start-up does.
    Read,
    /// Check their paths' form only (`check-config --no-secret-files`, outside the pod where the Secret is
    /// mounted): such a secret is empty and [`Secret::is_unread`].
    FormOnly,
}

impl Config {
    /// Loads `path` (if any) and the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with(path, SecretFiles::Read)
    }

    /// Loads `path` (if any) and the process environment, reading secret files or not.
    pub fn load_with(path: Option<&Path>, files: SecretFiles) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from_with(path, &env, files)
    }

    /// Loads from a file and an explicit environment (tests pass their own).
    pub fn load_from(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        Self::load_from_with(path, env, SecretFiles::Read)
    }

    fn load_from_with(
        path: Option<&Path>,
        env: &[(String, String)],
        files: SecretFiles,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let origin = path.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("<none>"));
        Self::parse_with(&text, &origin, env, files)
    }

    pub fn parse(text: &str, origin: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        Self::parse_with(text, origin, env, SecretFiles::Read)
    }

    pub fn parse_with(
        text: &str,
        origin: &Path,
        env: &[(String, String)],
        files: SecretFiles,
    ) -> Result<Config, ConfigError> {
        let mut raw = raw::Raw::layer(text, origin, env)?;
        raw.read_files = files == SecretFiles::Read;
        raw.build()
    }

    /// The effective configuration as a config file, secrets redacted: what `check-config` prints.
    ///
    /// Every key is printed as the file takes it (durations as `"1h30m"`), by section, in a fixed order; unset
    /// optional keys as a `# key: not set` comment. No secret is printed in any form: one read from a file is
    /// printed as its `<key>_file` setting (the path), one given as a value is left out and a comment says where
    /// it was set (the config file, or the environment variable); a password in a URL reads `redacted`. So the
    /// text parsed again, with the same environment, gives the same configuration, except secrets written in
    /// the config file and passwords in URLs.
    pub fn redacted_toml(&self) -> String {
        render::redacted_toml(self)
    }

    /// The PostgreSQL URL or connection string with `postgres.password` applied: what connects, never what
    /// prints ([`redact_postgres`] it first).
    pub fn postgres_url(&self) -> String {
        match &self.postgres.password {
            None => self.postgres.url.clone(),
            Some(p) => conninfo::with_password(&self.postgres.url, p.expose()),
        }
    }
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
        let shown = redact_url(raw);
        let url = url::Url::parse(raw).map_err(|e| format!("{shown:?} is not a URL ({e})"))?;
        let (tls, default_port) = match url.scheme() {
            "mqtt" | "tcp" => (false, 1883),
            "mqtts" | "ssl" => (true, 8883),
            other => return Err(format!("scheme {other:?} is not mqtt:// or mqtts://")),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{shown:?} has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Ok(BrokerAddress {
            host,
            port: url.port().unwrap_or(default_port),
            tls,
        })
    }
}

#[cfg(test)]
mod tests;
