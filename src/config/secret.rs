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
