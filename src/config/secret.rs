//! [`Secret`] (a value that never prints) and [`redact_url`] (a URL with its password hidden).

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// A secret value: shown as `<redacted>` by Debug and Serialize. It remembers where it came from, which is what
/// `check-config` prints instead of the value. Two secrets are equal when their values are.
#[derive(Clone)]
pub struct Secret {
    value: String,
    source: SecretSource,
}

/// Where a configured secret came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SecretSource {
    /// Given as a value: in the config file, or by [`Secret::new`].
    Inline,
    /// The environment variable named.
    Environment(String),
    /// Read from the file named (a `<key>_file` setting).
    File(PathBuf),
    /// Named by a `<key>_file` setting that was not read (`check-config --no-secret-files`); the value is empty.
    Unread(PathBuf),
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self::from_source(s, SecretSource::Inline)
    }
    pub(super) fn from_source(s: impl Into<String>, source: SecretSource) -> Self {
        Secret {
            value: s.into(),
            source,
        }
    }
    pub fn expose(&self) -> &str {
        &self.value
    }
    pub(super) fn source(&self) -> &SecretSource {
        &self.source
    }
    /// True for a secret whose file was not read ([`SecretFiles::FormOnly`](super::SecretFiles)): its value
    /// is empty and only its path was checked.
    pub fn is_unread(&self) -> bool {
        matches!(self.source, SecretSource::Unread(_))
    }
}
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}
impl Eq for Secret {}
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

/// A URL (`mqtt.url`, `broker.api_url`) fit to print: the password in its userinfo and the value of any query
/// parameter named like a secret (`password`, `secret`, `token`) read `redacted`. Text that is not a URL is
/// redacted whole if it has an '@' or the word "password", and so is a URL with an '@' anywhere but after its
/// userinfo: `mqtt://u:12#x@h` is host `u`, port 12 to the parser, but its author meant password `12#x`.
/// PostgreSQL connection strings have their own rules: [`super::redact_postgres`].
pub fn redact_url(raw: &str) -> String {
    let Ok(mut u) = url::Url::parse(raw) else {
        let risky = raw.contains('@') || raw.to_ascii_lowercase().contains("password");
        return if risky {
            "<redacted>".to_string()
        } else {
            raw.to_string()
        };
    };
    let has_userinfo = !u.username().is_empty() || u.password().is_some();
    if raw.matches('@').count() > usize::from(has_userinfo) {
        return "<redacted>".to_string();
    }
    let mut changed = false;
    if u.password().is_some() {
        let _ = u.set_password(Some("redacted"));
        changed = true;
    }
    let is_secret = |k: &str| {
        let k = k.to_ascii_lowercase();
        ["password", "secret", "token"].iter().any(|s| k.contains(s))
    };
    if u.query_pairs().any(|(k, _)| is_secret(&k)) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret(&k) {
                    "redacted".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
        changed = true;
    }
    if changed {
        u.to_string()
    } else {
        raw.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn an_at_sign_where_no_userinfo_was_read_redacts_the_whole_url() {
        // The parser reads host `u`, port 12 and a fragment; the author meant password `12#x`.
        assert_eq!(redact_url("mqtt://u:12#x@h:1883"), "<redacted>");
        assert_eq!(redact_url("http://u:12?x@emqx:18083"), "<redacted>");
        assert_eq!(redact_url("http://k:p@ss@emqx:18083"), "<redacted>");
        assert_eq!(redact_url("http://k:pw@emqx:18083/"), "http://k:redacted@emqx:18083/");
        assert_eq!(
            redact_url("http://emqx:18083/?api_secret=s&token=t&x=1"),
            "http://emqx:18083/?api_secret=redacted&token=redacted&x=1"
        );
        assert_eq!(redact_url("mqtts://broker:8883"), "mqtts://broker:8883");
    }
}
