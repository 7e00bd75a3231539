//! Topic rendering: `{env}/{merchant_code}/{branch_code}/{stream}/updates`. Pure; owns the rule that no
//! database value can inject MQTT wildcards or extra levels into a topic.

use super::Stream;

/// True if `s` can stand as one topic level: non-empty, at most 128 bytes, no `/`, `+`, `#`, NUL or whitespace.
pub(crate) fn is_valid_level(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_whitespace() || c.is_control())
}

/// The update topic of a branch's stream, or why it cannot be built.
pub(crate) fn update_topic(env: &str, merchant: &str, branch: &str, stream: Stream) -> Result<String, String> {
    for (what, v) in [("merchant code", merchant), ("branch code", branch)] {
        if !is_valid_level(v) {
            return Err(format!(
                "{what} {} cannot be a topic level (empty, longer than 128 bytes, or contains '/', '+', '#', \
                 spaces or control characters)",
                super::shown(&serde_json::Value::String(v.to_string()))
            ));
        }
    }
    Ok(format!("{env}/{merchant}/{branch}/{}/updates", stream.as_str()))
}

/// The filter a device of this branch may subscribe to.
pub(crate) fn branch_filter(env: &str, merchant: &str, branch: &str) -> String {
    format!("{env}/{merchant}/{branch}/#")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_contract_example() {
        assert_eq!(
            update_topic("dev", "MCH-MST-001", "BRN-MST-OSK00001", Stream::Product).as_deref(),
            Ok("dev/MCH-MST-001/BRN-MST-OSK00001/product/updates")
        );
        assert_eq!(branch_filter("dev", "M", "B"), "dev/M/B/#");
    }

    #[test]
    fn refuses_injection() {
        for bad in ["", "a/b", "+", "#", "a b", "x\0"] {
            assert!(update_topic("dev", bad, "B", Stream::Inventory).is_err(), "{bad:?}");
            assert!(update_topic("dev", "M", bad, Stream::Inventory).is_err(), "{bad:?}");
        }
    }
}
