//! [`Secret`] (a value that never prints) and [`redact_url`] (a URL with its password hidden).

use std::fmt;

use serde::Serialize;

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

/// A URL (or PostgreSQL connection string) fit to print: the password in its userinfo and any `password`
/// query parameter read `redacted`; text that is not a URL is redacted whole if it has an '@' or a password.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut u) = url::Url::parse(raw) else {
        let risky = raw.contains('@') || raw.to_ascii_lowercase().contains("password");
        return if risky {
            "<redacted>".to_string()
        } else {
            raw.to_string()
        };
    };
    let mut changed = false;
    if u.password().is_some() {
        let _ = u.set_password(Some("redacted"));
        changed = true;
    }
    let is_password = |k: &str| k.to_ascii_lowercase().contains("password");
    if u.query_pairs().any(|(k, _)| is_password(&k)) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_password(&k) {
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
