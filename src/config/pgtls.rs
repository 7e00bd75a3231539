//! `sslmode` and `sslrootcert` in `postgres.url`, with libpq's names and meanings (and two stricter rules,
//! below). tokio-postgres knows only `disable|prefer|require` and no `sslrootcert`, so both parameters are
//! taken out of the connection string here, in either of its forms (`postgres://…?sslmode=…` or
//! `host=… sslmode=…`), and the rest goes to tokio-postgres untouched.
//!
//! What each mode does in this bridge:
//! - `disable`: plain TCP.
//! - `prefer` (also when `sslmode` is not given, as in libpq): TLS if the server offers it, plain TCP if it does
//!   not or the TLS handshake fails; the server's certificate is not checked. Protects against a passive
//!   eavesdropper only.
//! - `require`: TLS, and — stricter than libpq, whose `require` checks nothing unless a root certificate file
//!   exists — the certificate chain and the host name are verified, against `sslrootcert` or the system's
//!   roots. Deployments written for earlier versions of the bridge rely on that verification; a weaker
//!   `require` would silently drop it.
//! - `verify-ca`: TLS, the chain verified against `sslrootcert` (required), the host name not.
//! - `verify-full`: TLS, chain and host name verified, against `sslrootcert` or the system's roots.
//!
//! Refused as contradictions: `verify-ca` without `sslrootcert` (a chain to any public CA, for any host, proves
//! nothing), `sslrootcert=system` with `verify-ca`, `prefer` or `disable` (as libpq refuses it), and a
//! `sslrootcert` file with `prefer` or `disable`, where it would never be used.

use std::path::PathBuf;

/// The `sslmode` of `postgres.url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // The value is not quoted: a value that swallowed its neighbours (`sslmode=require\\ password=…`)
            // would print them.
            _ => return Err("sslmode is not one of disable, prefer, require, verify-ca, verify-full".into()),
        })
    }

    /// Its name in a connection string.
    pub(crate) fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The CA certificates a verifying mode trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootCert {
    /// `sslrootcert=system`, or no `sslrootcert` with `require`/`verify-full`.
    System,
    /// `sslrootcert=PATH`: the PEM certificates in that file, and no others.
    File(PathBuf),
}

/// How the bridge connects to PostgreSQL, from a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PgTls {
    pub(crate) mode: SslMode,
    /// What verifies the server (`require`, `verify-ca`, `verify-full`); `None` for `disable` and `prefer`.
    pub(crate) roots: Option<RootCert>,
}

/// Splits a connection string into what tokio-postgres is given (the same string without `sslmode` and
/// `sslrootcert`) and the TLS settings. The error says what is wrong, without repeating the string.
pub(crate) fn split(conn: &str) -> Result<(String, PgTls), String> {
    let (rest, mode, root) = match url_body(conn) {
        Some(query_at) => split_url(conn, query_at)?,
        None => split_key_values(conn)?,
    };
    let mode_given = mode.is_some();
    let root = match root.as_deref() {
        None => None,
        Some("") => return Err("sslrootcert is empty".into()),
        Some("system") => Some(RootCert::System),
        Some(path) => Some(RootCert::File(PathBuf::from(path))),
    };
    let mode = match (mode, &root) {
        (Some(m), _) => m,
        // libpq: sslrootcert=system makes verify-full the default.
        (None, Some(RootCert::System)) => SslMode::VerifyFull,
        (None, _) => SslMode::Prefer,
    };
    let roots = match (mode, root) {
        (SslMode::Disable | SslMode::Prefer | SslMode::VerifyCa, Some(RootCert::System)) => {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full (or require), not {}: any public CA's certificate \
                 would do otherwise",
                mode.name()
            ))
        }
        (SslMode::Disable | SslMode::Prefer, Some(RootCert::File(_))) => {
            let given = if mode_given {
                format!("sslmode={}", mode.name())
            } else {
                "no sslmode (prefer)".to_string()
            };
            return Err(format!(
                "sslrootcert is used only with sslmode=verify-full, verify-ca or require; with {given} the server's \
                 certificate is never checked"
            ));
        }
        (SslMode::Disable | SslMode::Prefer, None) => None,
        (SslMode::VerifyCa, None) => {
            return Err(
                "sslmode=verify-ca needs sslrootcert=PATH (a chain to any public CA, for any host, proves nothing)"
                    .into(),
            )
        }
        (SslMode::Require | SslMode::VerifyFull, None) => Some(RootCert::System),
        (_, Some(root)) => Some(root),
    };
    Ok((rest, PgTls { mode, roots }))
}

/// For a `postgres://` or `postgresql://` URL, where its query string would start (after the credentials, as
/// tokio-postgres reads it); `None` for the key=value form.
fn url_body(conn: &str) -> Option<usize> {
    let body = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|p| conn.strip_prefix(p).map(|_| p.len()))?;
    Some(conn[body..].find('@').map_or(body, |at| body + at + 1))
}

type Split = (String, Option<SslMode>, Option<String>);

fn split_url(conn: &str, from: usize) -> Result<Split, String> {
    let Some(q) = conn[from..].find('?').map(|i| from + i) else {
        return Ok((conn.to_string(), None, None));
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for param in conn[q + 1..].split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match decode(key)?.as_str() {
            "sslmode" => mode = Some(SslMode::parse(&decode(value)?)?),
            "sslrootcert" => root = Some(decode(value)?),
            _ => kept.push(param),
        }
    }
    let mut rest = conn[..q].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, mode, root))
}

fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| "a URL parameter is not UTF-8 once percent-decoded".to_string())
}

/// The key=value form (`host=db port=5432 sslmode=verify-full sslrootcert='/etc/ca dir/ca.pem'`), read with
/// libpq's rules: values quoted with `'`, backslash escapes inside and outside quotes. The pairs other than
/// `sslmode` and `sslrootcert` are kept as written.
fn split_key_values(conn: &str) -> Result<Split, String> {
    let (mut mode, mut root) = (None, None);
    let mut rest = String::new();
    let mut chars = conn.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else { break };
        let mut key_end = start;
        while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key_end = i + c.len_utf8();
        }
        let key = &conn[start..key_end];
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Not quoted: a stray word may be a password pasted in the wrong place.
            return Err("a parameter has no '=' and value".into());
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut end = conn.len();
        let mut closed = !quoted;
        while let Some(&(i, c)) = chars.peek() {
            if (quoted && c == '\'') || (!quoted && c.is_whitespace()) {
                end = i + usize::from(quoted);
                if quoted {
                    chars.next();
                    closed = true;
                }
                break;
            }
            chars.next();
            if c == '\\' {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        if !closed {
            return Err("a quoted value has no closing quote".into());
        }
        match key {
            "sslmode" => mode = Some(SslMode::parse(&value)?),
            "sslrootcert" => root = Some(value),
            _ => {
                if !rest.is_empty() {
                    rest.push(' ');
                }
                rest.push_str(&conn[start..end]);
            }
        }
    }
    Ok((rest, mode, root))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(mode: SslMode, roots: Option<RootCert>) -> PgTls {
        PgTls { mode, roots }
    }

    fn file(p: &str) -> Option<RootCert> {
        Some(RootCert::File(PathBuf::from(p)))
    }

    #[test]
    fn url_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, t) =
            split("postgres://u:p%40ss@db:5432/mstore?application_name=x&sslmode=verify-full&sslrootcert=%2Fca%20dir%2Fca.pem&connect_timeout=3")
                .expect("valid");
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db:5432/mstore?application_name=x&connect_timeout=3"
        );
        assert_eq!(t, tls(SslMode::VerifyFull, file("/ca dir/ca.pem")));
        let (rest, t) = split("postgresql://db/mstore?sslmode=disable").expect("valid");
        assert_eq!(
            (rest.as_str(), t),
            ("postgresql://db/mstore", tls(SslMode::Disable, None))
        );
    }

    #[test]
    fn key_value_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, t) = split(
            "host=db port=5432  sslmode = verify-ca sslrootcert='/etc/my ca/ca.pem' password='it\\'s' dbname=mstore",
        )
        .expect("valid");
        assert_eq!(rest, "host=db port=5432 password='it\\'s' dbname=mstore");
        assert_eq!(t, tls(SslMode::VerifyCa, file("/etc/my ca/ca.pem")));
        assert!(rest.parse::<tokio_postgres::Config>().is_ok());
        let (_, t) = split("host=db sslrootcert=/ca.pem sslmode=require").expect("valid");
        assert_eq!(t, tls(SslMode::Require, file("/ca.pem")));
        assert!(split("host=db sslrootcert='/ca.pem").is_err(), "unterminated quote");
        assert!(split("host=db sslmode").is_err());
    }

    #[test]
    fn defaults_follow_libpq() {
        assert_eq!(split("postgres://db/x").expect("valid").1, tls(SslMode::Prefer, None));
        assert_eq!(split("host=db").expect("valid").1, tls(SslMode::Prefer, None));
        assert_eq!(
            split("postgres://db/x?sslrootcert=system").expect("valid").1,
            tls(SslMode::VerifyFull, Some(RootCert::System))
        );
        assert_eq!(
            split("postgres://db/x?sslmode=require").expect("valid").1,
            tls(SslMode::Require, Some(RootCert::System))
        );
        assert_eq!(
            split("postgres://db/x?sslmode=verify-full").expect("valid").1,
            tls(SslMode::VerifyFull, Some(RootCert::System))
        );
    }

    #[test]
    fn contradictions_are_refused_with_a_reason() {
        for (url, says) in [
            ("postgres://db/x?sslmode=allow", "not one of"),
            ("postgres://db/x?sslmode=verify-ca", "needs sslrootcert"),
            (
                "postgres://db/x?sslmode=verify-ca&sslrootcert=system",
                "needs sslmode=verify-full",
            ),
            (
                "postgres://db/x?sslmode=prefer&sslrootcert=system",
                "needs sslmode=verify-full",
            ),
            ("postgres://db/x?sslrootcert=/ca.pem", "no sslmode (prefer)"),
            ("host=db sslmode=disable sslrootcert=/ca.pem", "with sslmode=disable"),
            ("postgres://db/x?sslrootcert=", "empty"),
        ] {
            let err = split(url).expect_err(url);
            assert!(err.contains(says), "{url}: {err}");
        }
    }
}
