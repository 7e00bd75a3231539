//! What a device may do, as data: the one subscribe filter of its branch, the EMQX ACL claim (list format,
//! deny-all last) and the Mosquitto dynamic-security role ACLs. Pure; owns the rule that every id that ends
//! up in a topic or an ACL is checked against `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$` first, so no request or
//! database value can widen a device's rights with `/`, `+`, `#` or an EMQX `${placeholder}`.

use serde::Serialize;

/// True if `s` matches `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$` (device ids, merchant and branch codes).
pub(crate) fn is_valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// The only topic filter a device of this branch may subscribe to: `{env}/{merchant}/{branch}/#`.
/// Scoped by merchant too, since branch codes are unique only within a merchant.
pub(crate) fn subscribe_filter(env: &str, merchant: &str, branch: &str) -> String {
    crate::convert::topic::branch_filter(env, merchant, branch)
}

/// One rule of EMQX's JWT ACL claim, list format (EMQX 5.5+).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AclRule {
    pub permission: String,
    pub action: String,
    pub topic: String,
}

/// The device's rules: its own subscribe filter, then exactly the deny-all. EMQX falls through to
/// `authorization.no_match` (allow by default) when nothing matches, so the deny-all must close the list;
/// publishing is covered by it too (a device publishes nothing).
pub(crate) fn device_acl(env: &str, merchant: &str, branch: &str) -> Vec<AclRule> {
    vec![
        AclRule {
            permission: "allow".into(),
            action: "subscribe".into(),
            topic: subscribe_filter(env, merchant, branch),
        },
        AclRule {
            permission: "deny".into(),
            action: "all".into(),
            topic: "#".into(),
        },
    ]
}

/// Mosquitto dynamic-security role ACLs for the device's role: subscribePattern on its filter only. Every
/// other right comes from the plugin's default ACL access (publishClientSend and subscribe denied).
pub(crate) fn mosquitto_role_acls(env: &str, merchant: &str, branch: &str) -> serde_json::Value {
    serde_json::json!([{
        "acltype": "subscribePattern",
        "topic": subscribe_filter(env, merchant, branch),
        "priority": 0,
        "allow": true,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_contract_pattern() {
        for ok in ["a", "A9", "pos-01", "BRN-MST-OSK00001", "x.y_z-1", &"a".repeat(64)] {
            assert!(is_valid_id(ok), "{ok:?}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "a/b",
            "a+",
            "#",
            "a b",
            "${clientid}",
            "é",
            &"a".repeat(65),
            "a\n",
        ] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn acl_is_own_branch_then_deny_all_last() {
        let acl = device_acl("dev", "MCH-MST-001", "BRN-MST-OSK00001");
        let v = serde_json::to_value(&acl).expect("json");
        assert_eq!(
            v,
            serde_json::json!([
                {"permission": "allow", "action": "subscribe", "topic": "dev/MCH-MST-001/BRN-MST-OSK00001/#"},
                {"permission": "deny", "action": "all", "topic": "#"}
            ])
        );
        assert!(!v.to_string().contains("is_superuser"));
    }

    #[test]
    fn mosquitto_role_allows_only_the_branch_pattern() {
        let acls = mosquitto_role_acls("prod", "M1", "B1");
        assert_eq!(
            acls,
            serde_json::json!([{"acltype": "subscribePattern", "topic": "prod/M1/B1/#", "priority": 0, "allow": true}])
        );
    }
}
