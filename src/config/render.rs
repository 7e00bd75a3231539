//! What `check-config` prints: the effective configuration in the form the config file takes, secrets left out.
//!
//! Each section is destructured whole, so that a new setting cannot be added without deciding how it prints.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use toml::Value;

use super::secret::SecretSource;
use super::*;

pub(super) fn redacted_toml(cfg: &Config) -> String {
    let Config {
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
    } = cfg;
    let mut t = Toml::default();
    t.set("env", env.as_str());

    let PostgresConfig {
        url,
        password,
        schema,
        connect_timeout,
        migrate_lock_timeout,
        ddl_lock_timeout,
        ddl_deadline,
    } = postgres;
    t.section("postgres");
    t.set("url", redact_postgres(url));
    t.secret("password", password.as_ref());
    t.set("schema", schema.as_str());
    t.duration("connect_timeout", *connect_timeout);
    t.duration("migrate_lock_timeout", *migrate_lock_timeout);
    t.duration("ddl_lock_timeout", *ddl_lock_timeout);
    t.duration("ddl_deadline", *ddl_deadline);

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
    } = mqtt;
    t.section("mqtt");
    t.set("url", redact_url(url));
    let expanded =
        (client_id != client_id_template).then(|| format!("expands to {} here", Value::from(client_id.as_str())));
    t.set_noted("client_id", client_id_template.as_str(), expanded.as_deref());
    t.opt("username", username.as_deref());
    t.secret("password", password.as_ref());
    t.opt("ca_file", ca_file.as_deref().map(path));
    t.duration("keep_alive", *keep_alive);
    t.set("max_inflight", i64::from(*max_inflight));
    t.duration("republish_window", *republish_window);

    let HttpConfig {
        listen,
        admin_token,
        max_connections,
        tls_cert_file,
        tls_key_file,
    } = http;
    t.section("http");
    t.set("listen", listen.to_string());
    t.secret("admin_token", admin_token.as_ref());
    t.set("max_connections", *max_connections as i64);
    t.opt("tls_cert_file", tls_cert_file.as_deref().map(path));
    t.opt("tls_key_file", tls_key_file.as_deref().map(path));

    let CredentialsConfig {
        signing_key_file,
        ttl,
        min_ttl,
        max_ttl,
        audience,
        issuer,
    } = credentials;
    t.section("credentials");
    t.opt("signing_key_file", signing_key_file.as_deref().map(path));
    t.duration("ttl", *ttl);
    t.duration("min_ttl", *min_ttl);
    t.duration("max_ttl", *max_ttl);
    t.set("audience", audience.as_str());
    t.set("issuer", issuer.as_str());

    let BrokerConfig {
        kind,
        admin_username,
        admin_password,
        api_url,
        api_ca_file,
        api_key,
        api_secret,
        authn_token,
    } = broker;
    t.section("broker");
    t.set("kind", kind.name());
    t.opt("admin_username", admin_username.as_deref());
    t.secret("admin_password", admin_password.as_ref());
    t.opt("api_url", api_url.as_deref().map(redact_url));
    t.opt("api_ca_file", api_ca_file.as_deref().map(path));
    t.opt("api_key", api_key.as_deref());
    t.secret("api_secret", api_secret.as_ref());
    t.secret("authn_token", authn_token.as_ref());

    let BridgeConfig {
        batch_size,
        max_pending,
        max_pending_bytes,
        poll_interval,
    } = bridge;
    t.section("bridge");
    t.set("batch_size", i64::from(*batch_size));
    t.set("max_pending", *max_pending as i64);
    t.set("max_pending_bytes", super::raw::format_bytes(*max_pending_bytes));
    t.duration("poll_interval", *poll_interval);

    let CatchupConfig {
        retention,
        partition_span,
    } = catchup;
    t.section("catchup");
    t.duration("retention", *retention);
    t.duration("partition_span", *partition_span);

    let LoadConfig { username, password } = load;
    t.section("load");
    t.opt("username", username.as_deref());
    t.secret("password", password.as_ref());

    let LogConfig { format, level } = log;
    t.section("log");
    t.set("format", format.name());
    t.set("level", level.as_str());
    t.0
}

/// A duration as the config file takes it, in whole units from days to nanoseconds: `"1h30m"`, `"250ms"`.
pub(super) fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    let mut out = String::new();
    let mut secs = d.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            let _ = write!(out, "{}{unit}", secs / size);
            secs %= size;
        }
    }
    let nanos = d.subsec_nanos();
    for (unit, n) in [
        ("ms", nanos / 1_000_000),
        ("us", nanos / 1_000 % 1_000),
        ("ns", nanos % 1_000),
    ] {
        if n > 0 {
            let _ = write!(out, "{n}{unit}");
        }
    }
    out
}

fn path(p: &Path) -> String {
    // Paths come from the config as strings, so this loses nothing.
    p.to_string_lossy().into_owned()
}

/// A TOML document written line by line (comments included, which the `toml` serializer cannot write).
#[derive(Default)]
struct Toml(String);

impl Toml {
    fn section(&mut self, name: &str) {
        let _ = write!(self.0, "\n[{name}]\n");
    }

    /// `key = value`, the value quoted and escaped as TOML requires.
    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.set_noted(key, value, None);
    }

    /// `key = value  # note`.
    fn set_noted(&mut self, key: &str, value: impl Into<Value>, note: Option<&str>) {
        let _ = write!(self.0, "{key} = {}", value.into());
        let _ = match note {
            Some(note) => writeln!(self.0, "  # {note}"),
            None => writeln!(self.0),
        };
    }

    fn note(&mut self, key: &str, text: &str) {
        let _ = writeln!(self.0, "# {key}: {text}");
    }

    fn opt(&mut self, key: &str, value: Option<impl Into<Value>>) {
        match value {
            Some(v) => self.set(key, v),
            None => self.note(key, "not set"),
        }
    }

    fn duration(&mut self, key: &str, d: Duration) {
        self.set(key, format_duration(d));
    }

    /// Never the value: the file it is read from (`<key>_file`, which reads it again), or where it was set.
    fn secret(&mut self, key: &str, secret: Option<&Secret>) {
        match secret.map(Secret::source) {
            None => self.note(key, "not set"),
            Some(SecretSource::File(p) | SecretSource::Unread(p)) => self.set(&format!("{key}_file"), path(p)),
            Some(SecretSource::Environment(var)) => self.note(key, &format!("set by {var}, not printed")),
            Some(SecretSource::Inline) => self.note(key, "set in the config file, not printed"),
        }
    }
}
