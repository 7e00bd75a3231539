//! The monitoring files match the bridge: every metric that grafana/dashboards/delta-bridge.json and
//! prometheus/alerts.yml query is exposed by a running bridge's /metrics (except EMQX's own `emqx_*` metrics
//! and Prometheus's `up`), the dashboard has the panels operators expect and an EMQX row that uses only EMQX
//! metric names verified in EMQX's source. PromQL syntax and the alerts' behaviour are checked by
//! scripts/check-observability (promtool).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::Env;
use serde_json::Value;

/// Panels the dashboard must have, by title (row "delta-bridge" unless noted).
const REQUIRED_PANELS: [&str; 13] = [
    "Events published /s by stream",
    "Commit-to-PUBACK latency (p50/p95/p99)",
    "Outbox backlog, oldest row age, dead letters",
    "Publish failures /s by reason",
    "Connections (PostgreSQL, MQTT)",
    "Leader",
    "Devices issued / revoked",
    "Payload size",
    "Process CPU",
    "Process memory (RSS)",
    // Row "Catch-up (change log and API)".
    "Change log: oldest event age",
    "Change log: bytes on disk",
    "Catch-up requests /s by endpoint and outcome",
];

/// Bridge series the dashboard must query: the metrics of docs/metrics.md that operators watch (all but the
/// outbox-read timing, a diagnostic) and the process metrics.
const REQUIRED_SERIES: [&str; 18] = [
    "delta_bridge_events_published_total",
    "delta_bridge_publish_failures_total",
    "delta_bridge_end_to_end_latency_seconds_bucket",
    "delta_bridge_outbox_backlog",
    "delta_bridge_outbox_oldest_age_seconds",
    "delta_bridge_dead_letters",
    "delta_bridge_postgres_connected",
    "delta_bridge_mqtt_connected",
    "delta_bridge_leader",
    "delta_bridge_devices_issued_total",
    "delta_bridge_devices_revoked_total",
    "delta_bridge_payload_bytes_bucket",
    "delta_bridge_change_log_oldest_age_seconds",
    "delta_bridge_change_log_bytes",
    "delta_bridge_change_log_reclaim_age_seconds",
    "delta_bridge_catchup_requests_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
];

/// EMQX metric names read in EMQX's source (emqx/emqx, apps/emqx_prometheus and apps/emqx/src/emqx_metrics.erl):
/// each one defined at tags v5.7.2 and v5.8.9, the versions the EMQX files are written for. Not
/// `emqx_packets_publish_dropped`: 5.9.0 removed it. The dashboard's EMQX row and the EMQX alerts may use only these.
const EMQX_VERIFIED: [&str; 12] = [
    "emqx_connections_count",
    "emqx_live_connections_count",
    "emqx_sessions_count",
    "emqx_messages_received",
    "emqx_messages_sent",
    "emqx_messages_dropped",
    "emqx_messages_dropped_no_subscribers",
    "emqx_delivery_dropped_queue_full",
    "emqx_delivery_dropped_too_large",
    "emqx_delivery_dropped_expired",
    "emqx_authentication_failure",
    "emqx_authorization_deny",
];

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------------------
// Metric names in a PromQL expression

/// Words that are PromQL operators, keywords or aggregations, never metric names, even when not followed by
/// `(` (`sum by (le) (...)`, `a and b`, `x offset 5m`).
const KEYWORDS: [&str; 22] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "atan2",
];

/// Keywords followed by a parenthesised list of label names (skipped as a whole).
const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Index just past the string literal starting at `i` (PromQL "...", '...' with escapes, `...` raw).
fn skip_string(s: &[char], i: usize) -> usize {
    let quote = s[i];
    let mut j = i + 1;
    while j < s.len() {
        if s[j] == '\\' && quote != '`' {
            j += 2;
            continue;
        }
        if s[j] == quote {
            return j + 1;
        }
        j += 1;
    }
    panic!("unterminated string in {:?}", s.iter().collect::<String>());
}

/// Index just past the `close` that ends the group opened at `i` (strings inside are skipped).
fn skip_group(s: &[char], i: usize, close: char) -> usize {
    let mut j = i + 1;
    while j < s.len() {
        match s[j] {
            '"' | '\'' | '`' => j = skip_string(s, j),
            c if c == close => return j + 1,
            _ => j += 1,
        }
    }
    panic!("unclosed {close:?} in {:?}", s.iter().collect::<String>());
}

/// The metric names an expression selects: identifiers outside label matchers `{...}`, ranges `[...]` and
/// strings that are not functions (followed by `(`), keywords, aggregations or the label lists of
/// by/without/on/ignoring/group_left/group_right; Grafana variables (`$x`, `${x}`) are skipped. Enough for the
/// expressions of this repository's dashboard and alerts (no `{__name__=...}` selectors).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let s: Vec<char> = expr.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&s, i);
        } else if c == '{' {
            i = skip_group(&s, i, '}');
        } else if c == '[' {
            i = skip_group(&s, i, ']');
        } else if c == '#' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '$' {
            i += 1;
            if i < s.len() && s[i] == '{' {
                i = skip_group(&s, i, '}');
            } else {
                while i < s.len() && is_ident_char(s[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // Numbers and durations: 0.99, 1e3, 0x1f, 5m, 1h30m.
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.' || s[i] == '_') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let mut next = i;
            while next < s.len() && s[next].is_whitespace() {
                next += 1;
            }
            let lower = word.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) {
                if s.get(next) == Some(&'(') {
                    i = skip_group(&s, next, ')');
                }
            } else if KEYWORDS.contains(&lower.as_str()) || s.get(next) == Some(&'(') {
                // an operator, aggregation or function
            } else {
                out.insert(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn extractor_finds_metrics_and_skips_functions_labels_and_keywords() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (job, instance, stream, le) \
             (rate(delta_bridge_end_to_end_latency_seconds_bucket{job=~\"$job\", le!=\"+Inf\"}[$__rate_interval]))) > 1"
        ),
        ["delta_bridge_end_to_end_latency_seconds_bucket"]
    );
    assert_eq!(
        names("delta_bridge_outbox_backlog > 1000 and deriv(delta_bridge_outbox_backlog[10m]) > 0"),
        ["delta_bridge_outbox_backlog"]
    );
    assert_eq!(
        names(
            "sum by (job) (delta_bridge_leader) == 0 or on (job) absent(up{job=\"delta-bridge\"}) \
             unless ignoring (instance) group_left (stream) process_cpu_seconds_total offset 5m * 3600"
        ),
        ["delta_bridge_leader", "process_cpu_seconds_total", "up"]
    );
    assert_eq!(
        names("sum(rate(x:recorded{a='}{'}[5m:1m])) without (reason) / ${var} + count(nan)"),
        ["x:recorded"]
    );
}

// ---------------------------------------------------------------------------------------------------------
// The expressions of the dashboard and the alerts

/// (where, expression) for every query of every panel, and the metric selector of every `label_values(...)`
/// template variable.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or("");
                assert!(!expr.trim().is_empty(), "panel {title:?} has a target without expr");
                out.push((format!("panel {title:?}"), expr.to_string()));
            }
            walk(p["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]), out);
        }
    }
    let mut out = Vec::new();
    walk(dash["panels"].as_array().expect("panels"), &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(def) = v["definition"].as_str() {
            if let Some(inner) = def.strip_prefix("label_values(").and_then(|d| d.strip_suffix(')')) {
                let selector = inner.rsplit_once(',').map_or(inner, |(sel, _label)| sel);
                out.push((format!("variable {}", v["name"]), selector.to_string()));
            }
        }
    }
    out
}

/// Every `expr:` of alerts.yml. A line-based reader instead of a YAML parser (no new dependency): it relies
/// on each expr being on ONE line (plain, "double-quoted" or 'single-quoted'), as alerts.yml says it keeps it.
fn alert_exprs(yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = String::from("?");
    for line in yaml.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        }
        let Some(v) = t.strip_prefix("expr:") else { continue };
        let v = v.trim();
        assert!(
            !v.is_empty() && !v.starts_with('|') && !v.starts_with('>'),
            "alert {alert}: expr must stay on one line (tests/observability.rs reads it line by line)"
        );
        let expr = if v.starts_with('"') {
            serde_json::from_str::<String>(v).unwrap_or_else(|e| panic!("alert {alert}: expr {v}: {e}"))
        } else if let Some(q) = v.strip_prefix('\'').and_then(|q| q.strip_suffix('\'')) {
            q.replace("''", "'")
        } else {
            v.to_string()
        };
        out.push((format!("alert {alert}"), expr));
    }
    out
}

fn panels_flat(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a [Value], out: &mut Vec<&'a Value>) {
        for p in panels {
            out.push(p);
            walk(p["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]), out);
        }
    }
    let mut out = Vec::new();
    walk(dash["panels"].as_array().expect("panels"), &mut out);
    out
}

#[test]
fn dashboard_has_the_required_panels_an_emqx_row_and_a_datasource_variable() {
    let dash: Value = serde_json::from_str(&repo_file("grafana/dashboards/delta-bridge.json")).expect("dashboard JSON");
    let panels = panels_flat(&dash);
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for t in REQUIRED_PANELS {
        assert!(
            titles.contains(&t),
            "dashboard has no panel titled {t:?}; it has {titles:?}"
        );
    }
    let row = |title: &str| {
        panels
            .iter()
            .find(|p| p["type"] == "row" && p["title"] == title)
            .unwrap_or_else(|| panic!("dashboard has no row {title:?}"))
    };
    let bridge_y = row("delta-bridge")["gridPos"]["y"].as_i64().expect("row y");
    let emqx_y = row("EMQX")["gridPos"]["y"].as_i64().expect("row y");
    assert!(bridge_y < emqx_y, "the delta-bridge row comes first");

    // Panels below the EMQX row query EMQX, and only names verified in EMQX's source; panels above it do not.
    let mut emqx_panels = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let y = p["gridPos"]["y"].as_i64().expect("panel y");
        let title = p["title"].as_str().unwrap_or("?");
        let names: BTreeSet<String> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| metric_names(t["expr"].as_str().unwrap_or("")))
            .collect();
        let in_emqx_row = y > emqx_y;
        if in_emqx_row {
            emqx_panels += 1;
        }
        for n in &names {
            assert_eq!(
                n.starts_with("emqx_"),
                in_emqx_row,
                "panel {title:?}: {n} is in the wrong row"
            );
            if n.starts_with("emqx_") {
                assert!(
                    EMQX_VERIFIED.contains(&n.as_str()),
                    "panel {title:?}: {n} is not a verified EMQX metric"
                );
            }
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {title:?}: datasource by variable"
            );
        }
    }
    assert!(emqx_panels >= 4, "the EMQX row has {emqx_panels} panels");

    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("job")["type"], "query");
    assert_eq!(var("instance")["type"], "query");
}

#[test]
fn every_alert_has_a_severity_and_annotations() {
    let yaml = repo_file("prometheus/alerts.yml");
    let count = |key: &str| yaml.lines().filter(|l| l.trim_start().starts_with(key)).count();
    let alerts = count("- alert:");
    assert!(alerts >= 9, "alerts.yml has {alerts} alerts");
    assert_eq!(alert_exprs(&yaml).len(), alerts, "one single-line expr per alert");
    for key in ["severity:", "summary:", "description:", "runbook:"] {
        assert_eq!(count(key), alerts, "every alert has {key}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Against a running bridge

/// Series names of a text exposition (`name{labels} value` or `name value`).
fn series_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_use_is_exposed_by_the_bridge() {
    let env = Env::start("observability");
    let bridge = env.bridge().await;
    let text = common::scrape(&bridge.http).await;
    let exposed = series_names(&text);

    let dash: Value = serde_json::from_str(&repo_file("grafana/dashboards/delta-bridge.json")).expect("dashboard JSON");
    let dash_exprs = dashboard_exprs(&dash);
    let alerts = alert_exprs(&repo_file("prometheus/alerts.yml"));
    assert!(dash_exprs.len() >= 20, "dashboard queries: {}", dash_exprs.len());
    assert!(alerts.len() >= 9, "alert expressions: {}", alerts.len());

    let dash_names: BTreeSet<String> = dash_exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    for s in REQUIRED_SERIES {
        assert!(dash_names.contains(s), "the dashboard does not query {s}");
    }

    let mut missing = Vec::new();
    let mut checked = BTreeSet::new();
    for (place, expr) in dash_exprs.iter().chain(&alerts) {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr}");
        for n in names {
            if n.starts_with("emqx_") {
                // EMQX's own metrics: only names verified in EMQX's source.
                if !EMQX_VERIFIED.contains(&n.as_str()) {
                    missing.push(format!("{place}: {n} (an EMQX name not verified in EMQX 5.8's source)"));
                }
                continue;
            }
            if n == "up" {
                continue; // made by Prometheus
            }
            // A histogram may be named by its base name; its series are _bucket/_sum/_count.
            if exposed.contains(&n) || exposed.contains(&format!("{n}_bucket")) {
                checked.insert(n);
            } else {
                missing.push(format!("{place}: {n}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics used but not exposed by the bridge:\n{}\n--- /metrics ---\n{text}",
        missing.join("\n")
    );
    assert!(checked.len() >= REQUIRED_SERIES.len(), "checked {checked:?}");
    bridge.stop().await;
}
