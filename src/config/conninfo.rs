//! `postgres.url` read the way tokio-postgres (the parser that connects) reads it: a `postgres://` URL or
//! libpq's `key=value` connection string. Two jobs: hiding every password in it before it is printed or logged
//! ([`redact_postgres`]), and applying `postgres.password` to either form ([`with_password`]).
//!
//! A general URL parser will not do for either: tokio-postgres takes everything up to the first `@` as user
//! and password, so `postgres://u:1234/x@h/db` is user `u` with password `1234/x`, where a URL library sees
//! host `u`, port 1234 and a path that it would print; and a `key=value` string is no URL at all.

use std::ops::Range;

const PREFIXES: [&str; 2] = ["postgres://", "postgresql://"];

/// What replaces a password.
const REDACTED: &str = "redacted";

/// `raw` fit to print: every password in it (URL userinfo, a `password` or `sslpassword` query parameter, a
/// `password=` keyword, quoted or not) reads `redacted`. A string the bridge would refuse is `<redacted>`
/// whole: how it would have been read is unknown, so where a password sits in it is too (tokio-postgres
/// percent-decodes a query key, so `pass%77ord=` is one; no rule about what a password looks like will do).
pub fn redact_postgres(raw: &str) -> String {
    if !parses(raw) {
        return "<redacted>".to_string();
    }
    let spans = secret_spans(raw);
    let Some(mut spans) = spans else {
        return "<redacted>".to_string();
    };
    spans.sort_by_key(|s| std::cmp::Reverse(s.start));
    let mut out = raw.to_string();
    for s in spans {
        out.replace_range(s, REDACTED);
    }
    out
}

/// `raw` with `password` applied, overriding any password in it. In a URL with a user it becomes the
/// userinfo's password (percent-encoded); in a URL without one, or whose query sets a password (read after
/// the userinfo), a `password` query parameter appended; in a connection string a `password='…'` keyword
/// appended (tokio-postgres keeps the last). [`super::validate`] checks that the result reads back to it.
pub(super) fn with_password(raw: &str, password: &str) -> String {
    let encoded = percent_encode(password);
    let Some(rest) = url_rest(raw) else {
        let escaped = password.replace('\\', "\\\\").replace('\'', "\\'");
        return format!("{raw} password='{escaped}'");
    };
    let base = raw.len() - rest.len();
    let at = rest.find('@');
    let query_sets_password = url_spans(rest, base)
        .iter()
        .any(|s| at.is_none_or(|at| s.start > base + at));
    match at {
        Some(at) if !query_sets_password => {
            let user_end = rest[..at].find(':').unwrap_or(at);
            format!("{}:{encoded}{}", &raw[..base + user_end], &raw[base + at..])
        }
        _ => {
            let after_credentials = at.map_or(0, |at| at + 1);
            let sep = match rest[after_credentials..].find('?') {
                None => "?",
                Some(_) if rest.ends_with(['?', '&']) => "",
                Some(_) => "&",
            };
            format!("{raw}{sep}password={encoded}")
        }
    }
}

/// Whether the bridge reads `raw`: tokio-postgres, once `sslmode` and `sslrootcert` are taken out
/// (`super::pgtls`: tokio-postgres knows neither `verify-*` nor `sslrootcert`).
pub(super) fn parses(raw: &str) -> bool {
    super::pgtls::split(raw).is_ok_and(|(rest, _)| rest.parse::<tokio_postgres::Config>().is_ok())
}

/// True when `raw` reads as one of the two forms to the end. tokio-postgres stops reading a `key=value`
/// string, without an error, at a keyword that is missing (`host=h =x`): what follows would be ignored,
/// `postgres.password` appended after it too.
pub(super) fn is_readable(raw: &str) -> bool {
    secret_spans(raw).is_some()
}

/// The part after `postgres://` or `postgresql://`; None for the `key=value` form.
fn url_rest(raw: &str) -> Option<&str> {
    PREFIXES.iter().find_map(|p| raw.strip_prefix(p))
}

/// Byte ranges of the secret values in a string tokio-postgres accepts; None if it does not read as either
/// form after all.
fn secret_spans(raw: &str) -> Option<Vec<Range<usize>>> {
    match url_rest(raw) {
        Some(rest) => Some(url_spans(rest, raw.len() - rest.len())),
        None => keyword_spans(raw),
    }
}

fn is_secret_key(key: &str) -> bool {
    key.to_ascii_lowercase().contains("password")
}

/// The URL form, `rest` starting at byte `base` of the whole string.
fn url_spans(rest: &str, base: usize) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut pos = 0;
    if let Some(at) = rest.find('@') {
        // tokio-postgres: user and password end at the first '@'. A URL library (and so an operator reading
        // the URL) ends the authority at '/', '?' or '#' and splits it at its last '@': the password is hidden
        // up to whichever reaches further.
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let end = rest[..authority_end].rfind('@').map_or(at, |last| last.max(at));
        if let Some(colon) = rest[..at].find(':') {
            spans.push(base + colon + 1..base + end);
        }
        pos = end + 1;
    }
    // The host ends at '/' or '?', the path at '?': the query starts at the first '?' after the credentials.
    let Some(q) = rest[pos..].find('?') else {
        return spans;
    };
    let mut i = pos + q + 1;
    while i < rest.len() {
        let param_end = rest[i..].find('&').map_or(rest.len(), |e| i + e);
        let param = &rest[i..param_end];
        if let Some(eq) = param.find('=') {
            if is_secret_key(&percent_decode(&param[..eq])) {
                spans.push(base + i + eq + 1..base + param_end);
            }
        }
        i = param_end + 1;
    }
    spans
}

/// The `key=value` form, tokenised as tokio-postgres does: keywords end at whitespace or '='; a value is
/// quoted ('…', with backslash escapes) or runs to the next whitespace (backslash escapes too). Whitespace is
/// Unicode's, as there: a no-break space separates two parameters.
fn keyword_spans(raw: &str) -> Option<Vec<Range<usize>>> {
    let mut it = raw.char_indices().peekable();
    let mut spans = Vec::new();
    let at = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| it.peek().map_or(raw.len(), |&(i, _)| i);
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut it);
        let key_start = at(&mut it);
        while it.next_if(|&(_, c)| !c.is_whitespace() && c != '=').is_some() {}
        let key = &raw[key_start..at(&mut it)];
        if key.is_empty() {
            return it.peek().is_none().then_some(spans);
        }
        skip_ws(&mut it);
        it.next_if(|&(_, c)| c == '=')?;
        skip_ws(&mut it);
        let value_start = at(&mut it);
        if it.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match it.next()?.1 {
                    '\\' => {
                        it.next();
                    }
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while let Some((_, c)) = it.next_if(|&(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    it.next();
                }
            }
        }
        let value_end = at(&mut it);
        if value_end == value_start {
            return None;
        }
        if is_secret_key(key) {
            spans.push(value_start..value_end);
        }
    }
}

/// `%XX` decoded (bytes that do not form UTF-8 replaced): enough to recognise a key such as `pass%77ord`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every byte but the URL-unreserved ones as `%XX`, so a password can hold anything.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The password tokio-postgres reads from `raw`.
    fn password_of(raw: &str) -> Option<String> {
        let c: tokio_postgres::Config = raw.parse().expect("valid");
        c.get_password().map(|p| String::from_utf8_lossy(p).into_owned())
    }

    /// Strings tokio-postgres accepts, each with the password it reads from them: none may survive redaction.
    const WITH_PASSWORDS: &[(&str, &str)] = &[
        ("postgres://u:hunter2@h/db", "hunter2"),
        ("postgresql://u:hun%40ter2@h:5432/db?sslmode=disable", "hun@ter2"),
        ("postgres://u@h/db?sslmode=require&password=hunter2", "hunter2"),
        ("postgres://u@h/db?pass%77ord=hunter2&application_name=a", "hunter2"),
        ("postgres:///db?host=/tmp&password=hunter2", "hunter2"),
        ("postgres://u@h/db?password=12#x", "12#x"),
        // A URL library reads host `u`, port 1234 (or an authority up to '?' or '#') and no password.
        ("postgres://u:1234/x@h:5/db", "1234/x"),
        ("postgres://u:1234?x@h/db", "1234?x"),
        ("postgres://u:12#x@h/db", "12#x"),
        ("postgres://u:pw@h1:5432,h2:5433/db", "pw"),
        ("host=h user=u password=hunter2 dbname=d", "hunter2"),
        ("host=h password = 'hun ter\\'2' dbname=d", "hun ter'2"),
        ("host=h password=hun\\ ter2", "hun ter2"),
        ("password='hunter2'", "hunter2"),
        // A no-break space separates parameters to tokio-postgres.
        ("dbname=x\u{a0}password=hunter2", "hunter2"),
    ];

    #[test]
    fn redaction_hides_every_password_tokio_postgres_reads() {
        for (raw, pw) in WITH_PASSWORDS {
            assert_eq!(password_of(raw).as_deref(), Some(*pw), "{raw}");
            let shown = redact_postgres(raw);
            for part in pw.split(['#', '?', '/', ' ', '\'']).chain([*pw]) {
                assert!(!shown.contains(part), "{part:?} of {raw:?} in {shown:?}");
            }
            assert!(shown.contains(REDACTED), "{raw:?} -> {shown:?}");
        }
    }

    #[test]
    fn redaction_keeps_everything_else() {
        for (raw, shown) in [
            ("postgres://u:hunter2@h/db", "postgres://u:redacted@h/db"),
            (
                "postgres://u@h/db?sslmode=require&password=hunter2&application_name=a",
                "postgres://u@h/db?sslmode=require&password=redacted&application_name=a",
            ),
            ("postgres://u:p@ss@h/db", "postgres://u:redacted@h/db"),
            (
                "host=h user=u password='a b' dbname=d",
                "host=h user=u password=redacted dbname=d",
            ),
            // Nothing to hide: unchanged, byte for byte.
            ("postgres://u@h:5432/db", "postgres://u@h:5432/db"),
            ("host=/tmp user=u dbname=d", "host=/tmp user=u dbname=d"),
            // Refused: never shown, even without a word that looks like a password.
            ("localhost", "<redacted>"),
            ("postgres://h/db?pass%77ord=hunter2&bogus=1", "<redacted>"),
            ("host=h password='unterminated", "<redacted>"),
            ("postgres://u@h/db?password=a&b", "<redacted>"),
        ] {
            assert_eq!(redact_postgres(raw), shown, "{raw}");
        }
    }

    #[test]
    fn a_string_with_ignored_trailing_text_is_not_readable() {
        assert!("host=h =x".parse::<tokio_postgres::Config>().is_ok());
        assert!(!is_readable("host=h =x"));
        assert_eq!(redact_postgres("host=h =hunter2"), "<redacted>");
        for (raw, _) in WITH_PASSWORDS {
            assert!(is_readable(raw), "{raw}");
        }
    }

    #[test]
    fn the_password_applies_to_either_form_and_wins() {
        let nasty = "p@ss:w/o?r#d&x='y\\z ü%41";
        for raw in [
            "postgres://u@h:5432/db",
            "postgres://u:old@h/db",
            "postgres://h/db",
            "postgres://",
            "postgres://u@h/db?sslmode=disable",
            "postgres://u@h/db?",
            "postgres://u:old@h/db?password=old2&application_name=a",
            "postgres://u:1234/x@h:5/db",
            "host=h user=u dbname=d",
            "host=h password=old dbname=d",
            "host=h password='o l d'",
            "dbname=x\u{a0}password=old",
        ] {
            let applied = with_password(raw, nasty);
            assert_eq!(password_of(&applied).as_deref(), Some(nasty), "{raw} -> {applied}");
            let before: tokio_postgres::Config = raw.parse().expect("valid");
            let after: tokio_postgres::Config = applied.parse().expect("valid");
            assert_eq!(before.get_user(), after.get_user(), "{raw}");
            assert_eq!(before.get_hosts(), after.get_hosts(), "{raw}");
            assert_eq!(before.get_dbname(), after.get_dbname(), "{raw}");
            assert!(!redact_postgres(&applied).contains("p@ss"), "{applied}");
        }
        assert_eq!(with_password("postgres://u@h/db", "p@ss"), "postgres://u:p%40ss@h/db");
    }

    /// What `check-config` and Debug print for a configuration.
    fn printed(url: &str, password: Option<&str>) -> (String, String) {
        let mut env = vec![("DELTA_BRIDGE__POSTGRES__URL".to_string(), url.to_string())];
        if let Some(p) = password {
            env.push(("DELTA_BRIDGE__POSTGRES__PASSWORD".into(), p.into()));
        }
        let c = crate::config::Config::parse("", std::path::Path::new("t.toml"), &env).expect("valid");
        (format!("{}\n{c:?}\n{c:#?}", c.redacted_toml()), c.postgres_url())
    }

    #[test]
    fn check_config_and_debug_never_print_a_postgres_password() {
        for (raw, pw) in WITH_PASSWORDS {
            let (shown, _) = printed(raw, None);
            assert!(!shown.contains(pw), "{pw:?} of {raw:?} in {shown}");
        }
        let (shown, url) = printed("host=h user=u dbname=d", Some("pg-override-pw"));
        assert!(!shown.contains("pg-override-pw"), "{shown}");
        assert!(shown.contains("url = \"host=h user=u dbname=d\""), "{shown}");
        assert_eq!(
            password_of(&url).as_deref(),
            Some("pg-override-pw"),
            "applied to key=value"
        );
    }

    /// Strings the bridge refuses, each holding a secret that no rule about "password" or '@' would spot:
    /// tokio-postgres percent-decodes a URL's query keys, a libpq value can swallow the next pair with a
    /// backslash, and a stray word may be a password pasted in the wrong place. The error names the key and
    /// the reason and quotes none of it.
    #[test]
    fn a_string_that_is_refused_is_never_echoed() {
        for raw in [
            "postgres://h/db?pass%77ord=SECRETX&sslmode=bogus",
            "postgres://h/db?pass%77ord=SECRETX&bogus=1",
            "postgres://h/db?sslmode=SECRETX",
            "host=h pass%77ord=SECRETX",
            "host=h sslmode=require\\ password=SECRETX",
            "host=h SECRETX",
            "host=h user='SECRETX",
            "SECRETX",
        ] {
            let env = [("DELTA_BRIDGE__POSTGRES__URL".to_string(), raw.to_string())];
            let e = crate::config::Config::parse("", std::path::Path::new("t.toml"), &env).unwrap_err();
            let shown = e.to_string();
            assert!(shown.starts_with("postgres.url: "), "{raw:?}: {shown}");
            assert!(!shown.contains("SECRETX"), "{raw:?}: {shown}");
            assert!(!redact_postgres(raw).contains("SECRETX"), "{raw:?}");
        }
    }

    #[test]
    fn a_password_that_cannot_be_applied_is_refused_naming_the_key() {
        let env = [
            (
                "DELTA_BRIDGE__POSTGRES__URL".to_string(),
                "host=h dbname=d\\".to_string(),
            ),
            ("DELTA_BRIDGE__POSTGRES__PASSWORD".to_string(), "pw".to_string()),
        ];
        let e = crate::config::Config::parse("", std::path::Path::new("t.toml"), &env).unwrap_err();
        assert!(e.to_string().starts_with("postgres.password: "), "{e}");
    }
}
