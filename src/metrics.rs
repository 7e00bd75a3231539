//! Prometheus metrics (docs/metrics.md), in one registry owned by the process. Every series exists from
//! start-up (counters at 0 for each known label value) so dashboards and alerts never see "no data".
//! Labels are low-cardinality by construction: streams, failure reasons; never a device, merchant or branch.

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::convert::Stream;

/// The `result` label of `delta_bridge_broker_authn_total`: `deny` (a superseded, revoked or misused token of
/// this bridge), `ignore` (left to the broker's JWT authenticator), `unavailable` (the device store could not
/// be read: answered 503, which EMQX treats as ignore), `unauthorized` (the caller's secret was wrong).
pub(crate) const AUTHN_RESULTS: [&str; 4] = ["deny", "ignore", "unavailable", "unauthorized"];

/// Why an event was not (yet) delivered: the `reason` label of `delta_bridge_publish_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureReason {
    /// The broker connection failed with events in flight (they are republished).
    Connection,
    /// PUBACK >= 0x80 that will not change, or a topic the broker cannot take (dead-lettered).
    Rejected,
    /// The captured row cannot be converted into an event, or not even read (dead-lettered before publishing).
    Unconvertible,
    /// Over the broker's maximum packet size (dead-lettered).
    TooLarge,
    /// A refusal the broker may not repeat (0x80, 0x83, 0x91, 0x97): sent again with backoff.
    Retried,
    /// Refused as not authorised (0x87) with no success since its previous refusal: held, not dead-lettered
    /// (the topic or the bridge's whole account may be refused; several in a row pause publishing).
    Held,
}

impl FailureReason {
    pub(crate) const ALL: [FailureReason; 6] = [
        FailureReason::Connection,
        FailureReason::Rejected,
        FailureReason::Unconvertible,
        FailureReason::TooLarge,
        FailureReason::Retried,
        FailureReason::Held,
    ];

    /// The label value, also the `reason` column of `delta_bridge.dead_letter`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailureReason::Connection => "connection",
            FailureReason::Rejected => "rejected",
            FailureReason::Unconvertible => "unconvertible",
            FailureReason::TooLarge => "too_large",
            FailureReason::Retried => "retried",
            FailureReason::Held => "held",
        }
    }
}

/// The `lock` label values of `delta_bridge_lock_squatter`.
pub(crate) const LOCK_LEADER: &str = "leader";
pub(crate) const LOCK_MIGRATE: &str = "migrate";

/// The `endpoint` label of `delta_bridge_catchup_requests_total` (the catch-up routes).
pub(crate) const CATCHUP_ENDPOINTS: [&str; 2] = ["changes", "snapshot"];
/// The `outcome` label of `delta_bridge_catchup_requests_total`.
pub(crate) const CATCHUP_OUTCOMES: [&str; 7] = [
    "ok",
    "resync_required",
    "bad_request",
    "unauthorized",
    "not_found",
    "unavailable",
    "error",
];

pub(crate) struct Metrics {
    registry: Registry,
    pub events_published: IntCounterVec,
    pub publish_failures: IntCounterVec,
    pub end_to_end_latency: HistogramVec,
    pub payload_bytes: HistogramVec,
    pub outbox_backlog: IntGauge,
    /// Age of the oldest outbox row (captured, not yet acknowledged), by the database clock; 0 when empty.
    pub outbox_oldest_age: Gauge,
    /// Rows waiting in delta_bridge.dead_letter.
    pub dead_letters: IntGauge,
    /// Age of the oldest event in the change log (0 while it is empty).
    pub change_log_oldest_age: Gauge,
    /// Bytes on disk of the change log's partitions (indexes included).
    pub change_log_bytes: IntGauge,
    /// `catchup.retention` plus one `catchup.partition_span`: the age past which the oldest event should have
    /// been dropped with its partition (set at start-up, on every replica, for the alert that compares).
    pub change_log_reclaim_age: Gauge,
    pub pending_bytes: IntGauge,
    pub republish_window_bytes: IntGauge,
    pub republish_window_evicted: IntCounter,
    pub republished_copies: IntCounter,
    pub postgres_connected: IntGauge,
    pub mqtt_connected: IntGauge,
    pub publishing_paused: IntGauge,
    pub leader: IntGauge,
    /// By `lock`: [`LOCK_LEADER`] or [`LOCK_MIGRATE`].
    pub lock_squatter: IntGaugeVec,
    pub devices_issued: IntCounter,
    pub devices_revoked: IntCounter,
    /// By `result`: one of [`AUTHN_RESULTS`], the answers to EMQX's HTTP authenticator.
    pub broker_authn: IntCounterVec,
    /// By `endpoint` and `outcome` ([`CATCHUP_ENDPOINTS`], [`CATCHUP_OUTCOMES`]).
    pub catchup_requests: IntCounterVec,
    pub outbox_poll_seconds: Histogram,
    /// Duration of one numbering transaction (branch_seq given to a read's new events, committed).
    pub numbering_seconds: Histogram,
    /// Open HTTP connections (at most `http.max_connections`).
    pub http_connections: IntGauge,
    /// HTTP connections closed at once because `http.max_connections` were open.
    pub http_connections_refused: IntCounter,
}

impl Metrics {
    pub(crate) fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let events_published = IntCounterVec::new(
            Opts::new(
                "delta_bridge_events_published_total",
                "Events acknowledged by the broker (PUBACK < 0x80)",
            ),
            &["stream"],
        )?;
        let publish_failures = IntCounterVec::new(
            Opts::new(
                "delta_bridge_publish_failures_total",
                "Events not delivered at an attempt, by reason",
            ),
            &["reason"],
        )?;
        // 1 ms .. ~16 s: resolves the 1 ms - 10 s range the alerts and the dashboard look at.
        let end_to_end_latency = HistogramVec::new(
            HistogramOpts::new(
                "delta_bridge_end_to_end_latency_seconds",
                "From the change's commit-time capture in the database to the broker's PUBACK",
            )
            .buckets(exponential_buckets(0.001, 2.0, 15)?),
            &["stream"],
        )?;
        let payload_bytes = HistogramVec::new(
            HistogramOpts::new("delta_bridge_payload_bytes", "Size of published payloads")
                .buckets(exponential_buckets(64.0, 4.0, 9)?),
            &["stream"],
        )?;
        let outbox_backlog = IntGauge::new(
            "delta_bridge_outbox_backlog",
            "Captured events not yet acknowledged by the broker",
        )?;
        let outbox_oldest_age = Gauge::new(
            "delta_bridge_outbox_oldest_age_seconds",
            "Age of the oldest captured event not yet acknowledged by the broker, in seconds (0 when none); updated by the leader, 0 on a standby",
        )?;
        let dead_letters = IntGauge::new(
            "delta_bridge_dead_letters",
            "Rows waiting in delta_bridge.dead_letter until replayed or deleted; updated by the leader, 0 on a standby",
        )?;
        let change_log_oldest_age = Gauge::new(
            "delta_bridge_change_log_oldest_age_seconds",
            "Age of the oldest event kept in the change log, in seconds (0 while the log is empty); updated by the leader",
        )?;
        let change_log_bytes = IntGauge::new(
            "delta_bridge_change_log_bytes",
            "Bytes on disk of the change log's partitions, indexes included; updated by the leader",
        )?;
        let change_log_reclaim_age = Gauge::new(
            "delta_bridge_change_log_reclaim_age_seconds",
            "catchup.retention plus one catchup.partition_span, in seconds: the change log's oldest event should never be older (its partition is dropped by then)",
        )?;
        let pending_bytes = IntGauge::new(
            "delta_bridge_pending_bytes",
            "Bytes (payloads and topics) of events read and not yet acknowledged (bounded by bridge.max_pending_bytes)",
        )?;
        let republish_window_bytes = IntGauge::new(
            "delta_bridge_republish_window_bytes",
            "Bytes (payloads and topics, and 256 per event for its bookkeeping) of acknowledged events kept to publish again after a lost broker connection, copies being sent again included (bounded by bridge.max_pending_bytes)",
        )?;
        let republish_window_evicted = IntCounter::new(
            "delta_bridge_republish_window_evicted_total",
            "Acknowledged events that left the republish window before mqtt.republish_window had passed, for want of room",
        )?;
        let republished_copies = IntCounter::new(
            "delta_bridge_republished_copies_total",
            "Copies of acknowledged events published again from the republish window after a lost broker connection (same event_id; whether this replica leads or not)",
        )?;
        let postgres_connected = IntGauge::new("delta_bridge_postgres_connected", "1 while PostgreSQL is connected")?;
        let mqtt_connected = IntGauge::new("delta_bridge_mqtt_connected", "1 while the MQTT broker is connected")?;
        let publishing_paused = IntGauge::new(
            "delta_bridge_publishing_paused",
            "1 while publishing is paused because the broker refuses the bridge's account (not authorised) on every topic tried",
        )?;
        let leader = IntGauge::new("delta_bridge_leader", "1 on the replica that publishes")?;
        let lock_squatter = IntGaugeVec::new(
            Opts::new(
                "delta_bridge_lock_squatter",
                "1 while a session that is not a live bridge replica holds the bridge's advisory lock (leader, or migrate while a migration waits)",
            ),
            &["lock"],
        )?;
        let devices_issued = IntCounter::new("delta_bridge_devices_issued_total", "Device credentials issued")?;
        let devices_revoked = IntCounter::new("delta_bridge_devices_revoked_total", "Device credentials revoked")?;
        let broker_authn = IntCounterVec::new(
            Opts::new(
                "delta_bridge_broker_authn_total",
                "Answers to the broker's HTTP authenticator (POST /api/v1/broker/authn), by result",
            ),
            &["result"],
        )?;
        let catchup_requests = IntCounterVec::new(
            Opts::new(
                "delta_bridge_catchup_requests_total",
                "Calls of the catch-up API (GET /api/v1/changes and /api/v1/snapshot), by endpoint and outcome",
            ),
            &["endpoint", "outcome"],
        )?;
        let outbox_poll_seconds = Histogram::with_opts(
            HistogramOpts::new("delta_bridge_outbox_poll_seconds", "Duration of one outbox read")
                .buckets(exponential_buckets(0.0001, 4.0, 9)?),
        )?;
        let numbering_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "delta_bridge_numbering_seconds",
                "Duration of one transaction giving a read's new events their branch_seq, commit included",
            )
            .buckets(exponential_buckets(0.0001, 4.0, 9)?),
        )?;
        registry.register(Box::new(events_published.clone()))?;
        registry.register(Box::new(publish_failures.clone()))?;
        registry.register(Box::new(end_to_end_latency.clone()))?;
        registry.register(Box::new(payload_bytes.clone()))?;
        registry.register(Box::new(outbox_backlog.clone()))?;
        registry.register(Box::new(outbox_oldest_age.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(change_log_oldest_age.clone()))?;
        registry.register(Box::new(change_log_bytes.clone()))?;
        registry.register(Box::new(change_log_reclaim_age.clone()))?;
        registry.register(Box::new(pending_bytes.clone()))?;
        registry.register(Box::new(republish_window_bytes.clone()))?;
        registry.register(Box::new(republish_window_evicted.clone()))?;
        registry.register(Box::new(republished_copies.clone()))?;
        registry.register(Box::new(postgres_connected.clone()))?;
        registry.register(Box::new(mqtt_connected.clone()))?;
        registry.register(Box::new(publishing_paused.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(lock_squatter.clone()))?;
        let http_connections = IntGauge::new(
            "delta_bridge_http_connections",
            "Open HTTP connections (at most http.max_connections)",
        )?;
        let http_connections_refused = IntCounter::new(
            "delta_bridge_http_connections_refused_total",
            "HTTP connections closed as soon as accepted because http.max_connections were open",
        )?;
        registry.register(Box::new(devices_issued.clone()))?;
        registry.register(Box::new(devices_revoked.clone()))?;
        registry.register(Box::new(broker_authn.clone()))?;
        registry.register(Box::new(catchup_requests.clone()))?;
        registry.register(Box::new(outbox_poll_seconds.clone()))?;
        registry.register(Box::new(numbering_seconds.clone()))?;
        registry.register(Box::new(http_connections.clone()))?;
        registry.register(Box::new(http_connections_refused.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;

        for s in Stream::ALL {
            events_published.with_label_values(&[s.as_str()]);
            end_to_end_latency.with_label_values(&[s.as_str()]);
            payload_bytes.with_label_values(&[s.as_str()]);
        }
        for r in FailureReason::ALL {
            publish_failures.with_label_values(&[r.as_str()]);
        }
        for lock in [LOCK_LEADER, LOCK_MIGRATE] {
            lock_squatter.with_label_values(&[lock]);
        }
        for r in AUTHN_RESULTS {
            broker_authn.with_label_values(&[r]);
        }
        for e in CATCHUP_ENDPOINTS {
            for o in CATCHUP_OUTCOMES {
                catchup_requests.with_label_values(&[e, o]);
            }
        }
        Ok(Metrics {
            registry,
            events_published,
            publish_failures,
            end_to_end_latency,
            payload_bytes,
            outbox_backlog,
            outbox_oldest_age,
            dead_letters,
            change_log_oldest_age,
            change_log_bytes,
            change_log_reclaim_age,
            pending_bytes,
            republish_window_bytes,
            republish_window_evicted,
            republished_copies,
            postgres_connected,
            mqtt_connected,
            publishing_paused,
            leader,
            lock_squatter,
            devices_issued,
            devices_revoked,
            broker_authn,
            catchup_requests,
            outbox_poll_seconds,
            numbering_seconds,
            http_connections,
            http_connections_refused,
        })
    }

    pub(crate) fn failure(&self, reason: FailureReason) {
        self.publish_failures.with_label_values(&[reason.as_str()]).inc();
    }

    /// The text exposition format served on /metrics.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# encode error: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exposed_from_start() {
        let m = Metrics::new().expect("metrics");
        let text = m.render();
        for name in [
            "delta_bridge_events_published_total{stream=\"product\"} 0",
            "delta_bridge_events_published_total{stream=\"transaction\"} 0",
            "delta_bridge_publish_failures_total{reason=\"rejected\"} 0",
            "delta_bridge_end_to_end_latency_seconds_bucket{stream=\"inventory\",le=\"0.001\"} 0",
            "delta_bridge_outbox_backlog 0",
            "delta_bridge_outbox_oldest_age_seconds 0",
            "delta_bridge_dead_letters 0",
            "delta_bridge_pending_bytes 0",
            "delta_bridge_republish_window_bytes 0",
            "delta_bridge_republish_window_evicted_total 0",
            "delta_bridge_republished_copies_total 0",
            "delta_bridge_postgres_connected 0",
            "delta_bridge_mqtt_connected 0",
            "delta_bridge_publishing_paused 0",
            "delta_bridge_publish_failures_total{reason=\"held\"} 0",
            "delta_bridge_leader 0",
            "delta_bridge_lock_squatter{lock=\"leader\"} 0",
            "delta_bridge_lock_squatter{lock=\"migrate\"} 0",
            "delta_bridge_devices_issued_total 0",
            "delta_bridge_devices_revoked_total 0",
            "delta_bridge_broker_authn_total{result=\"deny\"} 0",
            "delta_bridge_broker_authn_total{result=\"unavailable\"} 0",
            "delta_bridge_catchup_requests_total{endpoint=\"changes\",outcome=\"resync_required\"} 0",
            "delta_bridge_catchup_requests_total{endpoint=\"snapshot\",outcome=\"ok\"} 0",
            "delta_bridge_payload_bytes_bucket{stream=\"product\",le=\"64\"} 0",
            "delta_bridge_http_connections 0",
            "delta_bridge_http_connections_refused_total 0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
