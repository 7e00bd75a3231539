//! From the raw layer to typed settings: every default and every rule about what a valid value is.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::Raw;
use super::*;

/// The most change-log partitions a retention may keep (`catchup.retention / catchup.partition_span`).
const MAX_LOG_PARTITIONS: u64 = 1000;

impl Raw {
    pub(super) fn build(self) -> Result<Config, ConfigError> {
        let env = self.non_empty("env", "dev")?;
        if !crate::convert::topic::is_valid_level(&env) {
            return Err(ConfigError::invalid(
                "env",
                "must be a topic level without '/', '+', '#' or spaces",
            ));
        }

        let pg_url = self.non_empty("postgres.url", "postgres://postgres@127.0.0.1:5432/postgres")?;
        let (pg_rest, _) =
            super::pgtls::split(&pg_url).map_err(|reason| ConfigError::invalid("postgres.url", reason))?;
        if pg_rest.parse::<tokio_postgres::Config>().is_err() || !conninfo::is_readable(&pg_url) {
            // Neither the string nor tokio-postgres's reason (which can quote a character or a keyword of it):
            // where a password sits in a string that does not parse is unknown (a percent-encoded key, a stray
            // word), so none of it is shown.
            return Err(ConfigError::invalid(
                "postgres.url",
                "is not a PostgreSQL connection URL or key=value connection string (not shown: it may hold a password)",
            ));
        }
        let schema = self.non_empty("postgres.schema", "public")?;
        let postgres = PostgresConfig {
            url: pg_url,
            password: self.secret("postgres.password")?,
            schema,
            connect_timeout: self.duration("postgres.connect_timeout", "10s")?,
            migrate_lock_timeout: self.duration("postgres.migrate_lock_timeout", "60s")?,
            ddl_lock_timeout: self.duration("postgres.ddl_lock_timeout", "1s")?,
            ddl_deadline: self.duration("postgres.ddl_deadline", "5m")?,
        };
        if let Some(p) = postgres.password.as_ref().filter(|p| !p.is_unread()) {
            // Appended last, so it wins over a password in the URL; a string ending in a lone backslash would
            // swallow the separator, so check that it reads back.
            let applied = super::pgtls::split(&conninfo::with_password(&postgres.url, p.expose()))
                .ok()
                .and_then(|(rest, _)| rest.parse::<tokio_postgres::Config>().ok());
            if applied.is_none_or(|c| c.get_password() != Some(p.expose().as_bytes())) {
                return Err(ConfigError::invalid(
                    "postgres.password",
                    "cannot be applied to postgres.url (does it end in a backslash?)",
                ));
            }
        }
        if postgres.migrate_lock_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "postgres.migrate_lock_timeout",
                "must be greater than 0",
            ));
        }
        // PostgreSQL's lock_timeout counts milliseconds (and 0 would mean: wait forever).
        if postgres.ddl_lock_timeout < Duration::from_millis(1) || postgres.ddl_lock_timeout > Duration::from_secs(600)
        {
            return Err(ConfigError::invalid(
                "postgres.ddl_lock_timeout",
                "must be between 1ms and 10m",
            ));
        }
        if postgres.ddl_deadline < postgres.ddl_lock_timeout {
            return Err(ConfigError::invalid(
                "postgres.ddl_deadline",
                "must be at least postgres.ddl_lock_timeout",
            ));
        }

        let mqtt_url = self.non_empty("mqtt.url", "mqtt://127.0.0.1:1883")?;
        BrokerAddress::parse(&mqtt_url).map_err(|reason| ConfigError::invalid("mqtt.url", reason))?;
        // Replicas sharing one configuration need distinct client ids (the broker disconnects the older of two
        // sessions with the same id): `{hostname}` and `{pid}` are expanded.
        let client_id_template = self.non_empty("mqtt.client_id", "delta-bridge-{hostname}-{pid}")?;
        let client_id = expand_client_id(&client_id_template);
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
            client_id_template,
            username: self.string("mqtt.username")?,
            password: self.secret("mqtt.password")?,
            ca_file: self.string("mqtt.ca_file")?.map(PathBuf::from),
            keep_alive,
            max_inflight: self.integer("mqtt.max_inflight", 100, 1, 65535)? as u16,
            republish_window: self.duration("mqtt.republish_window", "10s")?,
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
            if !t.is_unread() && t.expose().len() < 16 {
                return Err(ConfigError::invalid(
                    "http.admin_token",
                    "must be at least 16 characters",
                ));
            }
        }
        let http = HttpConfig {
            listen,
            admin_token,
            max_connections: self.integer("http.max_connections", 256, 1, 65_536)? as usize,
            tls_cert_file: self.string("http.tls_cert_file")?.map(PathBuf::from),
            tls_key_file: self.string("http.tls_key_file")?.map(PathBuf::from),
        };
        match (&http.tls_cert_file, &http.tls_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "http.tls_key_file",
                    "must be set with http.tls_cert_file (both or neither: the listener serves https with both)",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "http.tls_cert_file",
                    "must be set with http.tls_key_file (both or neither: the listener serves https with both)",
                ))
            }
            _ => {}
        }

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
            api_ca_file: self.string("broker.api_ca_file")?.map(PathBuf::from),
            api_key: self.string("broker.api_key")?,
            api_secret: self.secret("broker.api_secret")?,
            authn_token: self.secret("broker.authn_token")?,
        };
        if broker
            .authn_token
            .as_ref()
            .is_some_and(|t| !t.is_unread() && t.expose().len() < 16)
        {
            return Err(ConfigError::invalid(
                "broker.authn_token",
                "must be at least 16 characters",
            ));
        }
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
            // Without it EMQX cannot ask which token is a device's current one: a rotated-away or revoked
            // token would pass EMQX's JWT check until its exp (docs/provisioning.md).
            BrokerKind::Emqx if broker.authn_token.is_none() => {
                return Err(ConfigError::invalid(
                    "broker.authn_token",
                    "broker.kind = \"emqx\" needs authn_token (the secret of EMQX's HTTP authenticator, docs/deployment.md)",
                ))
            }
            _ => {}
        }
        let api_https = match broker
            .api_url
            .as_deref()
            .map(|u| url::Url::parse(u).map(|u| u.scheme().to_string()))
        {
            None => false,
            Some(Ok(scheme)) if scheme == "https" => true,
            Some(Ok(scheme)) if scheme == "http" => false,
            Some(_) => {
                return Err(ConfigError::invalid(
                    "broker.api_url",
                    "must be an http:// or https:// URL (EMQX's REST API, e.g. https://emqx:18084)",
                ))
            }
        };
        if broker.api_ca_file.is_some() && !api_https {
            return Err(ConfigError::invalid(
                "broker.api_ca_file",
                "is used only with an https:// broker.api_url",
            ));
        }

        let bridge = BridgeConfig {
            batch_size: self.integer("bridge.batch_size", 500, 1, 100_000)? as u32,
            max_pending: self.integer("bridge.max_pending", 10_000, 1, 10_000_000)? as usize,
            max_pending_bytes: self.bytes("bridge.max_pending_bytes", 64 << 20)?,
            poll_interval: self.duration("bridge.poll_interval", "500ms")?,
        };
        if bridge.max_pending_bytes < 1 << 20 {
            return Err(ConfigError::invalid(
                "bridge.max_pending_bytes",
                "must be at least 1MiB (one large event must fit)",
            ));
        }
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

        let catchup = CatchupConfig {
            retention: self.duration("catchup.retention", "7d")?,
            partition_span: self.duration("catchup.partition_span", "1d")?,
        };
        if catchup.retention < Duration::from_secs(1) {
            return Err(ConfigError::invalid("catchup.retention", "must be at least 1s"));
        }
        if catchup.partition_span < Duration::from_secs(1)
            || catchup.partition_span > Duration::from_secs(86_400)
            || 86_400 % catchup.partition_span.as_secs() != 0
            || catchup.partition_span.subsec_nanos() != 0
        {
            return Err(ConfigError::invalid(
                "catchup.partition_span",
                "must be a whole number of seconds that divides a day (1s to 1d)",
            ));
        }
        // Each partition is a table that every read of the whole log locks: thousands of them exhaust the
        // server's lock table (max_locks_per_transaction).
        if catchup.retention.as_secs() / catchup.partition_span.as_secs() > MAX_LOG_PARTITIONS {
            return Err(ConfigError::invalid(
                "catchup.partition_span",
                format!(
                    "too short for catchup.retention: at most {MAX_LOG_PARTITIONS} partitions may be kept \
                     (retention / partition_span)"
                ),
            ));
        }

        Ok(Config {
            env,
            postgres,
            mqtt,
            http,
            credentials,
            broker,
            bridge,
            catchup,
            load,
            log,
        })
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
