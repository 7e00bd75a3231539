//! Device ids the bridge keeps for itself. A device's id is its MQTT client id and username, so a device named
//! like one of the bridge's own clients would take over that client's session (the broker disconnects the
//! older of two sessions with one client id, both reconnect, and so on: a ping-pong with the publisher), and
//! one named like one of its accounts could replace or revoke the account. Such ids are refused as invalid
//! requests, before anything is looked up.
//!
//! Compared exactly (case and every byte), as Mosquitto and EMQX compare client ids and usernames: `Bridge` is
//! a different client from `bridge` to them, and so a valid device id. The client id template's `{hostname}`
//! and `{pid}` stand for any host name and any process id, so that every replica's client id is kept, not only
//! the one this process expanded (`device issue` runs in a process of its own).

use crate::config::{BrokerKind, Config};

/// Prefix of the client ids the Mosquitto backend connects with (followed by 8 characters of a UUID).
pub(crate) const ADMIN_CLIENT_PREFIX: &str = "delta-bridge-admin-";

/// The bridge's own names, each with the setting it comes from.
pub(crate) struct Reserved {
    /// Exact names: usernames, and this process's client id.
    names: Vec<(String, String)>,
    /// Client id templates, `{hostname}` and `{pid}` unexpanded.
    templates: Vec<(String, String)>,
}

impl Reserved {
    pub(crate) fn from_config(cfg: &Config) -> Reserved {
        let mut names = vec![(cfg.mqtt.client_id.clone(), "mqtt.client_id".to_string())];
        for (name, key) in [
            (&cfg.mqtt.username, "mqtt.username"),
            (&cfg.broker.admin_username, "broker.admin_username"),
            (&cfg.load.username, "load.username"),
        ] {
            if let Some(n) = name {
                names.push((n.clone(), key.to_string()));
            }
        }
        let mut templates = vec![(cfg.mqtt.client_id_template.clone(), "mqtt.client_id".to_string())];
        if cfg.broker.kind == BrokerKind::Mosquitto {
            templates.push((
                format!("{ADMIN_CLIENT_PREFIX}{{hostname}}"),
                "the client id of delta-bridge's dynamic-security admin".to_string(),
            ));
        }
        Reserved { names, templates }
    }

    /// Why `device_id` cannot be a device's id; None when it can.
    pub(crate) fn refusal(&self, device_id: &str) -> Option<String> {
        let setting = self
            .names
            .iter()
            .find(|(n, _)| n == device_id)
            .or_else(|| self.templates.iter().find(|(t, _)| matches_template(t, device_id)))
            .map(|(_, setting)| setting)?;
        Some(format!(
            "device_id {device_id:?} is reserved: it is one of delta-bridge's own MQTT client ids or usernames \
             ({setting}), and a device with it would take over or replace that client"
        ))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `{hostname}`: one or more characters.
    Host,
    /// `{pid}`: one or more ASCII digits.
    Pid,
}

fn tokens(template: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("{hostname}") {
            out.push(Token::Host);
            rest = r;
        } else if let Some(r) = rest.strip_prefix("{pid}") {
            out.push(Token::Pid);
            rest = r;
        } else {
            out.push(Token::Char(c));
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Whether some expansion of `template` is `id`. Dynamic programming over (token, character) pairs, so a
/// template of many placeholders costs no more than its length times the id's.
pub(crate) fn matches_template(template: &str, id: &str) -> bool {
    let t = tokens(template);
    let s: Vec<char> = id.chars().collect();
    // ok[i][j]: t[i..] matches s[j..].
    let mut ok = vec![vec![false; s.len() + 1]; t.len() + 1];
    ok[t.len()][s.len()] = true;
    for i in (0..t.len()).rev() {
        for j in (0..=s.len()).rev() {
            ok[i][j] = match t[i] {
                Token::Char(c) => s.get(j) == Some(&c) && ok[i + 1][j + 1],
                // One character, then either the placeholder ends or it goes on.
                Token::Host => j < s.len() && (ok[i + 1][j + 1] || ok[i][j + 1]),
                Token::Pid => s.get(j).is_some_and(char::is_ascii_digit) && (ok[i + 1][j + 1] || ok[i][j + 1]),
            };
        }
    }
    ok[0][0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_every_expansion_and_nothing_else() {
        let t = "delta-bridge-{hostname}-{pid}";
        for id in [
            "delta-bridge-host-1",
            "delta-bridge-pod-7f9c-abc-12345",
            "delta-bridge---0",
        ] {
            assert!(matches_template(t, id), "{id}");
        }
        for id in [
            "delta-bridge-host-",
            "delta-bridge--1",
            "delta-bridge-host-12a",
            "Delta-bridge-h-1",
            "delta-bridge",
        ] {
            assert!(!matches_template(t, id), "{id}");
        }
        assert!(matches_template("bridge-a", "bridge-a"));
        assert!(
            !matches_template("bridge-a", "bridge-A"),
            "exact, as the brokers compare"
        );
        assert!(!matches_template("bridge-a", "bridge-a2"));
        assert!(matches_template("{pid}", "42") && !matches_template("{pid}", "") && !matches_template("{pid}", "x"));
        // Many placeholders stay cheap.
        let many = "{hostname}".repeat(60);
        assert!(matches_template(&many, &"a".repeat(64)));
        assert!(!matches_template(&many, &"a".repeat(59)));
    }
}
