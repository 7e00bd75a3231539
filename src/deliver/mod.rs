//! Delivery: publishes events to the MQTT broker at QoS 1 (MQTT 5) and reports, for each one, whether the
//! broker acknowledged it (PUBACK < 0x80) or refused it. Owns the only record of what is unacknowledged.
//!
//! rumqttc's `publish()` returns when a request is queued, and on a connection error it silently drops what
//! was in flight (clean start). So this module keeps every event until its PUBACK, pairs PUBACKs with events
//! itself (outgoing publishes are paired FIFO with our requests, then by packet id), and after any fault
//! throws the client away, reconnects with backoff and republishes everything unacknowledged, in seq order.
//! It never decides that an event is done without a PUBACK; it never touches the database.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop};
use rumqttc::Outgoing;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::MqttConfig;
use crate::convert::Event;
use crate::metrics::{FailureReason, Metrics};
use crate::mqtt::mqtt_options;

/// What became of one event.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// PUBACK with a success code (0x00, or 0x10 "no matching subscribers").
    Acked(Event),
    /// Refused for good: PUBACK >= 0x80, an invalid topic, or larger than the broker accepts.
    Rejected {
        event: Event,
        reason: FailureReason,
        detail: String,
    },
}

/// The publishing side of the bridge: runs until cancelled, then drains (waits up to `drain` for PUBACKs of
/// what is in flight; the rest stays unacknowledged in the outbox and is sent again by the next leader).
pub(crate) struct Publisher {
    cfg: MqttConfig,
    metrics: Arc<Metrics>,
    connected: Arc<AtomicBool>,
    drain: Duration,
    /// The most events the pipeline hands over unacknowledged (its `max_pending`): sizes the request
    /// channel so that queuing a publish never fails while the broker is slow.
    max_pending: usize,
    /// Transient refusals so far, per seq (kept across reconnects).
    attempts: std::sync::Mutex<HashMap<i64, u32>>,
}

/// A refusal the broker may not repeat (overload, quota, an internal error) is retried this many times, with
/// backoff, before the event is dead-lettered; refusals that will not change (not authorised, invalid topic
/// or payload) are dead-lettered at once.
const TRANSIENT_ATTEMPTS: u32 = 8;

fn transient(reason: &PubAckReason) -> bool {
    matches!(
        reason,
        PubAckReason::UnspecifiedError
            | PubAckReason::ImplementationSpecificError
            | PubAckReason::QuotaExceeded
            | PubAckReason::PacketIdentifierInUse
    )
}

fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}

impl Publisher {
    pub(crate) fn new(
        cfg: MqttConfig,
        metrics: Arc<Metrics>,
        connected: Arc<AtomicBool>,
        drain: Duration,
        max_pending: usize,
    ) -> Publisher {
        Publisher {
            cfg,
            metrics,
            connected,
            drain,
            max_pending,
            attempts: Default::default(),
        }
    }

    pub(crate) async fn run(
        self,
        mut events: mpsc::Receiver<Event>,
        outcomes: mpsc::UnboundedSender<Outcome>,
        cancel: CancellationToken,
    ) {
        // BTreeMap: republished in seq order after a reconnect, so one row's events keep their order.
        let mut unacked: BTreeMap<i64, Event> = BTreeMap::new();
        let mut backoff = Backoff::new();
        let mut draining = false;
        loop {
            if cancel.is_cancelled() && (unacked.is_empty() || draining) {
                break;
            }
            match self
                .session(
                    &mut unacked,
                    &mut events,
                    &outcomes,
                    &cancel,
                    &mut draining,
                    &mut backoff,
                )
                .await
            {
                SessionEnd::Done => break,
                SessionEnd::Failed(why) => {
                    self.set_connected(false);
                    if !unacked.is_empty() {
                        self.metrics.failure(FailureReason::Connection);
                    }
                    if draining {
                        break;
                    }
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %why, retry_in = ?wait, unacked = unacked.len(), "mqtt connection lost");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => { if unacked.is_empty() { break; } draining = true; }
                    }
                }
            }
        }
        self.set_connected(false);
        if !unacked.is_empty() {
            tracing::info!(
                unacked = unacked.len(),
                "stopping with events unacknowledged; they stay in the outbox"
            );
        }
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
        self.metrics.mqtt_connected.set(i64::from(up));
    }

    async fn session(
        &self,
        unacked: &mut BTreeMap<i64, Event>,
        events: &mut mpsc::Receiver<Event>,
        outcomes: &mpsc::UnboundedSender<Outcome>,
        cancel: &CancellationToken,
        draining: &mut bool,
        backoff: &mut Backoff,
    ) -> SessionEnd {
        let username = self.cfg.username.as_deref();
        let password = self.cfg.password.as_ref().map(|s| s.expose());
        let mut opts = match mqtt_options(&self.cfg, &self.cfg.client_id, username, password) {
            Ok(o) => o,
            Err(e) => return SessionEnd::Failed(e),
        };
        opts.set_outgoing_inflight_upper_limit(self.cfg.max_inflight);
        // Our own bound (the bridge's max_pending) keeps the request channel from filling; a margin for
        // the republish after reconnect, which sends every unacknowledged event at once.
        let cap = unacked.len().max(self.max_pending) + 1024;
        let (client, eventloop) = AsyncClient::new(opts, cap);
        let (loop_tx, mut loop_rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(eventloop, loop_tx));
        let _abort = AbortOnDrop(driver);

        // Wait for CONNACK before sending anything.
        let max_packet = loop {
            tokio::select! {
                ev = loop_rx.recv() => match ev {
                    Some(Ok(MqttEvent::Incoming(Packet::ConnAck(ack)))) => {
                        break ack.properties.and_then(|p| p.max_packet_size);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return SessionEnd::Failed(e),
                    None => return SessionEnd::Failed("event loop ended".into()),
                },
                _ = cancel.cancelled(), if !*draining => {
                    if unacked.is_empty() { return SessionEnd::Done; }
                    *draining = true;
                }
            }
        };
        self.set_connected(true);
        backoff.reset();
        tracing::info!(url = %crate::config::redact_url(&self.cfg.url), unacked = unacked.len(), "mqtt connected");

        let mut pending_out: VecDeque<i64> = VecDeque::new();
        let mut inflight: HashMap<u16, VecDeque<i64>> = HashMap::new();
        // Events refused for now, to be sent again at the given time.
        let mut retry_at: Vec<(tokio::time::Instant, i64)> = Vec::new();
        let seqs: Vec<i64> = unacked.keys().copied().collect();
        for seq in seqs {
            if let Some(ev) = unacked.get(&seq) {
                if let Err(e) = send(&client, ev) {
                    return SessionEnd::Failed(e);
                }
                pending_out.push_back(seq);
            }
        }
        let drain_deadline = tokio::time::sleep(self.drain);
        tokio::pin!(drain_deadline);
        let mut drain_armed = *draining;
        if drain_armed {
            drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.drain);
        }
        loop {
            if *draining && unacked.is_empty() {
                let _ = client.try_disconnect();
                return SessionEnd::Done;
            }
            let next_retry = retry_at
                .iter()
                .map(|(t, _)| *t)
                .min()
                .unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                biased;
                ev = loop_rx.recv() => match ev {
                    Some(Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid)))) => {
                        if let Some(seq) = pending_out.pop_front() {
                            inflight.entry(pkid).or_default().push_back(seq);
                        }
                    }
                    Some(Ok(MqttEvent::Incoming(Packet::PubAck(ack)))) => {
                        let seq = inflight.get_mut(&ack.pkid).and_then(VecDeque::pop_front);
                        let refused_for_now = transient(&ack.reason);
                        if let Some(s) = seq.filter(|s| refused_for_now && unacked.contains_key(s)) {
                            let n = self.attempts.lock().map(|mut a| { let n = a.entry(s).or_insert(0); *n += 1; *n }).unwrap_or(TRANSIENT_ATTEMPTS);
                            if n < TRANSIENT_ATTEMPTS {
                                self.metrics.failure(FailureReason::Retried);
                                tracing::warn!(seq = s, reason = ?ack.reason, attempt = n, "broker refused a publish for now; retrying");
                                retry_at.push((tokio::time::Instant::now() + retry_delay(n), s));
                                continue;
                            }
                        }
                        if let Some(event) = seq.and_then(|s| unacked.remove(&s)) {
                            if let Ok(mut a) = self.attempts.lock() {
                                a.remove(&event.seq);
                            }
                            let outcome = match ack.reason {
                                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Outcome::Acked(event),
                                other => {
                                    let detail = match ack.properties.and_then(|p| p.reason_string) {
                                        Some(s) => format!("broker refused the publish: {other:?} ({s})"),
                                        None => format!("broker refused the publish: {other:?}"),
                                    };
                                    Outcome::Rejected { event, reason: FailureReason::Rejected, detail }
                                }
                            };
                            if outcomes.send(outcome).is_err() {
                                return SessionEnd::Done;
                            }
                        }
                    }
                    Some(Ok(MqttEvent::Incoming(Packet::Disconnect(d)))) => {
                        return SessionEnd::Failed(format!("broker disconnected us: {:?}", d.reason_code));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return SessionEnd::Failed(e),
                    None => return SessionEnd::Failed("event loop ended".into()),
                },
                _ = cancel.cancelled(), if !*draining => {
                    *draining = true;
                    drain_armed = true;
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.drain);
                }
                _ = tokio::time::sleep_until(next_retry), if !retry_at.is_empty() => {
                    let now = tokio::time::Instant::now();
                    let (due, later): (Vec<_>, Vec<_>) = retry_at.drain(..).partition(|(t, _)| *t <= now);
                    retry_at = later;
                    for (_, s) in due {
                        if let Some(ev) = unacked.get(&s) {
                            if let Err(e) = send(&client, ev) {
                                return SessionEnd::Failed(e);
                            }
                            pending_out.push_back(s);
                        }
                    }
                }
                _ = &mut drain_deadline, if drain_armed => {
                    let _ = client.try_disconnect();
                    return SessionEnd::Done;
                }
                ev = events.recv(), if !*draining => match ev {
                    Some(event) => {
                        if unacked.contains_key(&event.seq) {
                            continue; // re-read by a new leader session while still in flight here
                        }
                        if let Some(max) = max_packet {
                            // topic + payload + properties + fixed header: refuse what the broker would
                            // refuse, instead of looping on a connection it would drop.
                            let size = event.payload.len() + event.topic.len() + event.event_id.len() + 64;
                            if size > max as usize {
                                let detail = format!("payload of {size} bytes exceeds the broker's maximum packet size {max}");
                                if outcomes.send(Outcome::Rejected { event, reason: FailureReason::TooLarge, detail }).is_err() {
                                    return SessionEnd::Done;
                                }
                                continue;
                            }
                        }
                        if let Err(e) = send(&client, &event) {
                            let detail = e.clone();
                            if e.starts_with("invalid topic") {
                                if outcomes.send(Outcome::Rejected { event, reason: FailureReason::Rejected, detail }).is_err() {
                                    return SessionEnd::Done;
                                }
                                continue;
                            }
                            unacked.insert(event.seq, event);
                            return SessionEnd::Failed(detail);
                        }
                        pending_out.push_back(event.seq);
                        unacked.insert(event.seq, event);
                    }
                    None => { *draining = true; drain_armed = true; drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.drain); }
                },
            }
        }
    }
}

enum SessionEnd {
    Done,
    Failed(String),
}

fn send(client: &AsyncClient, ev: &Event) -> Result<(), String> {
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".to_string()),
        user_properties: vec![("event_id".to_string(), ev.event_id.clone())],
        ..Default::default()
    };
    client
        .try_publish_with_properties(ev.topic.clone(), QoS::AtLeastOnce, false, ev.payload.clone(), props)
        .map_err(|e| match e {
            rumqttc::v5::ClientError::TryRequest(_) if !valid_topic(&ev.topic) => {
                format!("invalid topic {:?}", ev.topic)
            }
            other => format!("cannot queue publish: {other}"),
        })
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#'])
}

/// Drives the rumqttc event loop in its own task: `EventLoop::poll` must not be dropped mid-way, so it is
/// never raced in a `select!`; events reach the publisher through a channel instead.
async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Result<MqttEvent, String>>) {
    loop {
        match eventloop.poll().await {
            Ok(ev) => {
                if tx.send(Ok(ev)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_that_can_change_are_retried() {
        assert!(transient(&PubAckReason::QuotaExceeded));
        assert!(transient(&PubAckReason::UnspecifiedError));
        assert!(transient(&PubAckReason::ImplementationSpecificError));
        assert!(!transient(&PubAckReason::NotAuthorized));
        assert!(!transient(&PubAckReason::TopicNameInvalid));
        assert!(!transient(&PubAckReason::PayloadFormatInvalid));
        let total: Duration = (1..TRANSIENT_ATTEMPTS).map(retry_delay).sum();
        assert!(
            total >= Duration::from_secs(60) && total <= Duration::from_secs(300),
            "{total:?}"
        );
    }
}
