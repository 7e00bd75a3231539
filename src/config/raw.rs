//! The raw layer: the TOML file flattened to `section.key`, overlaid by `DELTA_BRIDGE__SECTION__KEY` variables,
//! checked against the keys this version knows, with typed accessors that name the key on error.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use toml::Value;

use super::secret::SecretSource;
use super::{ConfigError, Secret};

/// Prefix of the environment overrides: `DELTA_BRIDGE__POSTGRES__URL` sets `postgres.url`.
pub const ENV_PREFIX: &str = "DELTA_BRIDGE__";

/// Keys this version knows; anything else is a typo worth an error rather than a silently ignored setting.
const KNOWN: &[(&str, &[&str])] = &[
    ("", &["env"]),
    (
        "postgres",
        &[
            "url",
            "password",
            "password_file",
            "schema",
            "connect_timeout",
            "migrate_lock_timeout",
            "ddl_lock_timeout",
            "ddl_deadline",
        ],
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
            "republish_window",
        ],
    ),
    (
        "http",
        &[
            "listen",
            "admin_token",
            "admin_token_file",
            "max_connections",
            "tls_cert_file",
            "tls_key_file",
        ],
    ),
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
            "api_ca_file",
            "api_key",
            "api_secret",
            "api_secret_file",
            "authn_token",
            "authn_token_file",
        ],
    ),
    (
        "bridge",
        &["batch_size", "max_pending", "max_pending_bytes", "poll_interval"],
    ),
    ("catchup", &["retention", "partition_span"]),
    ("load", &["username", "password", "password_file"]),
    ("log", &["format", "level"]),
];

/// Flat view over the merged file and environment, with typed accessors that name the key on error.
pub(super) struct Raw {
    flat: BTreeMap<String, Value>,
    /// Whether `<key>_file` secrets are read (false: their paths are checked for form only).
    pub(super) read_files: bool,
    /// Keys set by the environment, and the variable that set each.
    from_env: BTreeMap<String, String>,
}

impl Raw {
    /// Parses `text` (from `origin`, for messages), overlays `env`, and refuses keys this version does not know.
    pub(super) fn layer(text: &str, origin: &Path, env: &[(String, String)]) -> Result<Raw, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: origin.to_path_buf(),
            message: syntax_message(text, &e),
        })?;
        let mut flat = flatten(&table)?;
        let mut from_env = BTreeMap::new();
        for (k, v) in env {
            if let Some(rest) = k.strip_prefix(ENV_PREFIX) {
                let key = rest
                    .split("__")
                    .map(str::to_ascii_lowercase)
                    .collect::<Vec<_>>()
                    .join(".");
                flat.insert(key.clone(), Value::String(v.clone()));
                from_env.insert(key, k.clone());
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
        Ok(Raw {
            flat,
            read_files: true,
            from_env,
        })
    }
}

/// Where and what, without the offending line that `toml` quotes: the line may hold a secret.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return e.message().to_string();
    };
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {}", e.message())
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

impl Raw {
    pub(super) fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.flat.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ConfigError::invalid(
                key,
                format!("expected a string, found {}", other.type_str()),
            )),
        }
    }

    pub(super) fn string_or(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        Ok(self.string(key)?.unwrap_or_else(|| default.to_string()))
    }

    pub(super) fn non_empty(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        let v = self.string_or(key, default)?;
        if v.trim().is_empty() {
            return Err(ConfigError::invalid(key, "must not be empty"));
        }
        Ok(v)
    }

    pub(super) fn integer(&self, key: &str, default: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
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

    /// A size in bytes: a whole number, or a string with a unit ("64MiB", "512KiB", "1GiB", "2000000B").
    pub(super) fn bytes(&self, key: &str, default: u64) -> Result<u64, ConfigError> {
        match self.flat.get(key) {
            None => Ok(default),
            Some(Value::Integer(i)) if *i >= 0 => Ok(*i as u64),
            Some(Value::String(s)) => parse_bytes(s).ok_or_else(|| {
                ConfigError::invalid(
                    key,
                    format!("{s:?} is not a size; use e.g. \"64MiB\", \"1GiB\" or a number of bytes"),
                )
            }),
            Some(other) => Err(ConfigError::invalid(
                key,
                format!("expected a size such as \"64MiB\", found {}", other.type_str()),
            )),
        }
    }

    pub(super) fn duration(&self, key: &str, default: &str) -> Result<Duration, ConfigError> {
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
    pub(super) fn secret(&self, key: &str) -> Result<Option<Secret>, ConfigError> {
        let file_key = format!("{key}_file");
        let direct = self.string(key)?;
        let file = self.string(&file_key)?;
        match (direct, file) {
            (Some(_), Some(_)) => Err(ConfigError::invalid(
                key,
                format!("set either {key} or {file_key}, not both"),
            )),
            (Some(v), None) => {
                let source = match self.from_env.get(key) {
                    Some(var) => SecretSource::Environment(var.clone()),
                    None => SecretSource::Inline,
                };
                Ok(Some(Secret::from_source(v, source)))
            }
            (None, Some(path)) if !self.read_files => {
                if path.trim().is_empty() {
                    return Err(ConfigError::invalid(&file_key, "is empty (a file path)"));
                }
                Ok(Some(Secret::from_source("", SecretSource::Unread(path.into()))))
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| ConfigError::invalid(&file_key, format!("cannot read {path}: {e}")))?;
                let value = text.trim_end_matches(['\n', '\r']);
                Ok(Some(Secret::from_source(value, SecretSource::File(path.into()))))
            }
            (None, None) => Ok(None),
        }
    }
}

/// "64MiB" -> 67108864. Binary units (KiB, MiB, GiB) and their decimal cousins (kB, MB, GB); "B" or none.
pub(super) fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// The inverse, in the largest binary unit that divides the size.
pub(super) fn format_bytes(n: u64) -> String {
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= factor && n % factor == 0 {
            return format!("{}{unit}", n / factor);
        }
    }
    format!("{n}B")
}
