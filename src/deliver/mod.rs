//! Delivery: publishes events to the MQTT broker at QoS 1 (MQTT 5) and reports, for each one, whether the
//! broker acknowledged it (PUBACK < 0x80) or refused it. Owns the only record of what is unacknowledged.
//!
//! rumqttc's `publish()` returns when a request is queued, and on a connection error it silently drops what
//! was in flight (clean start). So this module keeps every event until its PUBACK, pairs PUBACKs with events
//! itself (outgoing publishes are paired FIFO with our requests, then by packet id), and after any fault
//! throws the client away, reconnects with backoff and republishes everything unacknowledged, in seq order.
//! It never decides that an event is done without a PUBACK; it never touches the database. The record
//! itself, and the pairing, is the pure `unacked` table; this module drives the client and the clock.
//!
//! A refusal as not authorised (0x87) is not final at once: the event is held until a later publish succeeds
//! (the account works, so the topic is refused: one more try, then the dead letters). Several events refused
//! with no success in between mean the bridge's own account is refused (an ACL slip): publishing pauses (no
//! new events are taken, so the pipeline backs up and the outbox keeps the backlog), `publishing_paused` is
//! 1 and an error is logged; one probe goes every 10 s, and the first success resumes publishing and sends
//! every held event again, in seq order. The rules are in `unacked`.

mod unacked;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ClientError, ConnectionError, Event as MqttEvent, EventLoop};
use rumqttc::Outgoing;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::MqttConfig;
use crate::convert::Event;
use crate::metrics::{FailureReason, Metrics};
use crate::mqtt::mqtt_options;

use unacked::{AckClass, Sequenced, Submit, Unacked, Verdict, PAUSE_AFTER, PROBE_EVERY};

/// A connection that lasted this long, or saw a success PUBACK, has proven itself: the reconnect backoff
/// starts again from its shortest delay. A broker that closes the connection right after each refusal (or
/// at once) is reconnected to with a growing delay instead.
const STABLE: Duration = Duration::from_secs(10);

/// While paused, the new events looked at for a probe on a topic with nothing unacknowledged (the others are
/// held), at most, per probe: a burst of changes on a refused topic ahead of the others is passed this many
/// at a time, without sending any.
const PROBE_LOOKAHEAD: usize = 100;

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
}

impl Sequenced for Event {
    fn seq(&self) -> i64 {
        self.seq
    }
    fn topic(&self) -> &str {
        &self.topic
    }
}

/// A refusal the broker may not repeat (overload, quota, an internal error) is retried with backoff before
/// the event is dead-lettered; not authorised is held (the topic or the whole account may be refused, see
/// `unacked`); refusals that will not change (invalid topic or payload) are dead-lettered at once.
fn ack_class(reason: &PubAckReason) -> AckClass {
    match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => AckClass::Success,
        PubAckReason::UnspecifiedError
        | PubAckReason::ImplementationSpecificError
        | PubAckReason::QuotaExceeded
        | PubAckReason::PacketIdentifierInUse => AckClass::Transient,
        PubAckReason::NotAuthorized => AckClass::NotAuthorized,
        PubAckReason::TopicNameInvalid | PubAckReason::PayloadFormatInvalid => AckClass::Permanent,
    }
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
        }
    }

    pub(crate) async fn run(
        self,
        mut events: mpsc::Receiver<Event>,
        outcomes: mpsc::UnboundedSender<Outcome>,
        cancel: CancellationToken,
    ) {
        let mut unacked = Unacked::new();
        let mut backoff = Backoff::new();
        let mut draining = false;
        loop {
            if cancel.is_cancelled() && (unacked.settled() || draining) {
                break;
            }
            let mut up_since = None;
            match self
                .session(
                    &mut unacked,
                    &mut events,
                    &outcomes,
                    &cancel,
                    &mut draining,
                    &mut backoff,
                    &mut up_since,
                )
                .await
            {
                SessionEnd::Done => break,
                SessionEnd::Failed(why) => {
                    self.set_connected(false);
                    if !unacked.settled() {
                        self.metrics.failure(FailureReason::Connection);
                    }
                    if draining {
                        break;
                    }
                    if up_since.is_some_and(|t: tokio::time::Instant| t.elapsed() >= STABLE) {
                        backoff.reset();
                    }
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %why, retry_in = ?wait, unacked = unacked.len(), "mqtt connection lost");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => { if unacked.settled() { break; } draining = true; }
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

    #[allow(clippy::too_many_arguments)]
    async fn session(
        &self,
        unacked: &mut Unacked<Event>,
        events: &mut mpsc::Receiver<Event>,
        outcomes: &mpsc::UnboundedSender<Outcome>,
        cancel: &CancellationToken,
        draining: &mut bool,
        backoff: &mut Backoff,
        up_since: &mut Option<tokio::time::Instant>,
    ) -> SessionEnd {
        let username = self.cfg.username.as_deref();
        let password = self.cfg.password.as_ref().map(|s| s.expose());
        let mut opts = match mqtt_options(&self.cfg, &self.cfg.client_id, username, password) {
            Ok(o) => o,
            Err(e) => return SessionEnd::Failed(SessionError::Options(e)),
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
                    Some(Err(e)) => return SessionEnd::Failed(e.into()),
                    None => return SessionEnd::Failed(SessionError::LoopEnded),
                },
                _ = cancel.cancelled(), if !*draining => {
                    if unacked.settled() { return SessionEnd::Done; }
                    *draining = true;
                }
            }
        };
        self.set_connected(true);
        *up_since = Some(tokio::time::Instant::now());
        tracing::info!(
            url = %crate::config::redact_url(&self.cfg.url),
            unacked = unacked.len(),
            held = unacked.held_len(),
            paused = unacked.paused_since().is_some(),
            "mqtt connected"
        );

        let resend = unacked.reconnect(tokio::time::Instant::now().into_std());
        if let Err(e) = send_all(&client, unacked, &resend) {
            return SessionEnd::Failed(e.into());
        }
        let drain_deadline = tokio::time::sleep(self.drain);
        tokio::pin!(drain_deadline);
        let mut drain_armed = *draining;
        if drain_armed {
            drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.drain);
        }
        loop {
            if *draining && unacked.settled() {
                let _ = client.try_disconnect();
                return SessionEnd::Done;
            }
            let next_due = unacked.next_due();
            let accepting = !*draining && unacked.accepting();
            tokio::select! {
                biased;
                ev = loop_rx.recv() => match ev {
                    Some(Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid)))) => unacked.on_outgoing(pkid),
                    Some(Ok(MqttEvent::Incoming(Packet::PubAck(ack)))) => {
                        let now = tokio::time::Instant::now().into_std();
                        let was_paused = unacked.paused_since();
                        let verdict = unacked.on_puback(ack.pkid, ack_class(&ack.reason), now);
                        let reason_string = ack.properties.and_then(|p| p.reason_string);
                        let outcome = match verdict {
                            None => None,
                            Some(Verdict::RetryLater { seq, attempt, .. }) => {
                                self.metrics.failure(FailureReason::Retried);
                                tracing::warn!(seq, reason = ?ack.reason, attempt, "broker refused a publish for now; retrying");
                                None
                            }
                            Some(Verdict::Held { seq }) => {
                                self.metrics.failure(FailureReason::Held);
                                self.note_held(unacked, seq, &ack.reason, reason_string.as_deref(), was_paused.is_some());
                                None
                            }
                            Some(Verdict::Acked(event)) => {
                                backoff.reset();
                                Some(Outcome::Acked(event))
                            }
                            Some(Verdict::Refused(event)) => {
                                let detail = match reason_string {
                                    Some(s) => format!("broker refused the publish: {:?} ({s})", ack.reason),
                                    None => format!("broker refused the publish: {:?}", ack.reason),
                                };
                                Some(Outcome::Rejected { event, reason: FailureReason::Rejected, detail })
                            }
                        };
                        if let Some(o) = outcome {
                            if outcomes.send(o).is_err() {
                                return SessionEnd::Done;
                            }
                        }
                        // After a success: the held events, once more (all of them when resuming).
                        let due = unacked.due(now);
                        if let (Some(since), None) = (was_paused, unacked.paused_since()) {
                            self.metrics.publishing_paused.set(0);
                            tracing::info!(
                                paused_for = ?now.saturating_duration_since(since),
                                resending = due.len(),
                                "publishing resumed: the broker accepted a publish; sending the held events again, in seq order"
                            );
                        }
                        if let Err(e) = send_all(&client, unacked, &due) {
                            return SessionEnd::Failed(e.into());
                        }
                    }
                    Some(Ok(MqttEvent::Incoming(Packet::Disconnect(d)))) => {
                        return SessionEnd::Failed(SessionError::Disconnected(d.reason_code));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return SessionEnd::Failed(e.into()),
                    None => return SessionEnd::Failed(SessionError::LoopEnded),
                },
                _ = cancel.cancelled(), if !*draining => {
                    *draining = true;
                    drain_armed = true;
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.drain);
                }
                _ = tokio::time::sleep_until(next_due.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std)), if next_due.is_some() => {
                    let now = tokio::time::Instant::now().into_std();
                    // Paused, and the probe due is a new event: the first waiting on a free topic, if any.
                    for _ in 0..PROBE_LOOKAHEAD {
                        if *draining || !unacked.wants_fresh(now) {
                            break;
                        }
                        let Ok(event) = events.try_recv() else { break };
                        if let Err(end) = self.take(&client, unacked, outcomes, event, max_packet, now) {
                            return end;
                        }
                    }
                    let due = unacked.due(now);
                    if let Err(e) = send_all(&client, unacked, &due) {
                        return SessionEnd::Failed(e.into());
                    }
                }
                _ = &mut drain_deadline, if drain_armed => {
                    let _ = client.try_disconnect();
                    return SessionEnd::Done;
                }
                ev = events.recv(), if accepting => match ev {
                    Some(event) => {
                        crate::fault::check(crate::fault::Task::Publisher, &event.payload);
                        let now = tokio::time::Instant::now().into_std();
                        if let Err(end) = self.take(&client, unacked, outcomes, event, max_packet, now) {
                            return end;
                        }
                    }
                    None => { *draining = true; drain_armed = true; drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.drain); }
                },
            }
        }
    }

    /// A new event from the pipeline: refused at once if the broker could not take it, else recorded and
    /// published (or held, while paused).
    fn take(
        &self,
        client: &AsyncClient,
        unacked: &mut Unacked<Event>,
        outcomes: &mpsc::UnboundedSender<Outcome>,
        event: Event,
        max_packet: Option<u32>,
        now: std::time::Instant,
    ) -> Result<(), SessionEnd> {
        if unacked.contains(event.seq) {
            return Ok(()); // re-read by a new leader session while still unacknowledged here
        }
        let refuse = |event: Event, reason: FailureReason, detail: String| {
            outcomes
                .send(Outcome::Rejected { event, reason, detail })
                .map_err(|_| SessionEnd::Done)
        };
        if let Some(max) = max_packet {
            // topic + payload + properties + fixed header: refuse what the broker would refuse, instead of
            // looping on a connection it would drop.
            let size = event.payload.len() + event.topic.len() + event.event_id.len() + 64;
            if size > max as usize {
                let detail = format!("payload of {size} bytes exceeds the broker's maximum packet size {max}");
                return refuse(event, FailureReason::TooLarge, detail);
            }
        }
        if !valid_topic(&event.topic) {
            let detail = format!("invalid topic {:?}", event.topic);
            return refuse(event, FailureReason::Rejected, detail);
        }
        let seq = event.seq;
        if unacked.submit(event, now) == Submit::Send {
            // Not sent on a queue error: recorded all the same, and sent after the reconnect.
            send_all(client, unacked, &[seq]).map_err(|e| SessionEnd::Failed(e.into()))?;
        }
        Ok(())
    }

    /// Logs a refusal as not authorised (an error with the topic and the broker's reason when it pauses
    /// publishing) and keeps the paused metric.
    fn note_held(
        &self,
        unacked: &Unacked<Event>,
        seq: i64,
        reason: &PubAckReason,
        reason_string: Option<&str>,
        was_paused: bool,
    ) {
        let topic = unacked.get(seq).map_or("", |e| e.topic.as_str());
        let reason_string = reason_string.unwrap_or("");
        let held = unacked.held_len();
        match unacked.paused_since() {
            Some(_) if !was_paused => {
                self.metrics.publishing_paused.set(1);
                tracing::error!(
                    seq,
                    topic,
                    reason = ?reason,
                    reason_string,
                    held,
                    "publishing paused: the broker refused {PAUSE_AFTER} events in a row as not authorised with no \
                     success in between, so it refuses the bridge's own account, not one topic. Check the bridge \
                     account's publish ACL on the broker against `env` (the first topic level). Nothing is \
                     dead-lettered while paused; the backlog waits in the outbox; one probe every {PROBE_EVERY:?}, \
                     and the first success resumes"
                );
            }
            Some(_) => {
                tracing::debug!(seq, topic, reason = ?reason, reason_string, held, "still not authorised; publishing stays paused")
            }
            None => tracing::warn!(
                seq,
                topic,
                reason = ?reason,
                reason_string,
                held,
                "broker refused a publish as not authorised; held until a publish succeeds, then tried once more"
            ),
        }
    }
}

enum SessionEnd {
    Done,
    Failed(SessionError),
}

/// Why a connection was given up (and everything unacknowledged will be sent again on the next).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Options(#[from] crate::mqtt::MqttSetupError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("event loop ended")]
    LoopEnded,
    #[error("broker disconnected us: {0:?}")]
    Disconnected(DisconnectReasonCode),
    #[error(transparent)]
    Send(#[from] SendError),
}

/// The request channel is closed or full: the connection is given up.
#[derive(Debug, thiserror::Error)]
#[error("cannot queue publish: {0}")]
struct SendError(Box<ClientError>);

/// Publishes these events of the table, in this order.
fn send_all(client: &AsyncClient, unacked: &Unacked<Event>, seqs: &[i64]) -> Result<(), SendError> {
    for seq in seqs {
        if let Some(ev) = unacked.get(*seq) {
            send(client, ev)?;
        }
    }
    Ok(())
}

/// The topic is checked before (`valid_topic`), so any error is the request channel's.
fn send(client: &AsyncClient, ev: &Event) -> Result<(), SendError> {
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".to_string()),
        user_properties: vec![("event_id".to_string(), ev.event_id.clone())],
        ..Default::default()
    };
    client
        .try_publish_with_properties(ev.topic.clone(), QoS::AtLeastOnce, false, ev.payload.clone(), props)
        .map_err(|e| SendError(Box::new(e)))
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#'])
}

/// Drives the rumqttc event loop in its own task: `EventLoop::poll` must not be dropped mid-way, so it is
/// never raced in a `select!`; events reach the publisher through a channel instead.
///
/// When the broker closes the connection right after a PUBACK (Mosquitto 2.0.11 does after a refusal when
/// `max_queued_messages` is 0), rumqttc reads both in one go and returns the error first, leaving the PUBACK
/// in its buffer (`state.events`): those events happened before the error, so they are forwarded first.
/// Otherwise the refusal would never be seen and the event sent again on every reconnect.
async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Result<MqttEvent, ConnectionError>>) {
    loop {
        match eventloop.poll().await {
            Ok(ev) => {
                if tx.send(Ok(ev)).is_err() {
                    return;
                }
            }
            Err(e) => {
                for ev in eventloop.state.events.drain(..) {
                    let _ = tx.send(Ok(ev));
                }
                let _ = tx.send(Err(e));
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
    fn only_refusals_that_can_change_are_retried_or_held() {
        assert_eq!(ack_class(&PubAckReason::Success), AckClass::Success);
        assert_eq!(ack_class(&PubAckReason::NoMatchingSubscribers), AckClass::Success);
        assert_eq!(ack_class(&PubAckReason::QuotaExceeded), AckClass::Transient);
        assert_eq!(ack_class(&PubAckReason::UnspecifiedError), AckClass::Transient);
        assert_eq!(
            ack_class(&PubAckReason::ImplementationSpecificError),
            AckClass::Transient
        );
        assert_eq!(ack_class(&PubAckReason::NotAuthorized), AckClass::NotAuthorized);
        assert_eq!(ack_class(&PubAckReason::TopicNameInvalid), AckClass::Permanent);
        assert_eq!(ack_class(&PubAckReason::PayloadFormatInvalid), AckClass::Permanent);
    }

    #[test]
    fn only_a_topic_the_broker_would_refuse_is_invalid() {
        assert!(valid_topic("dev/merchant/branch/delta"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("dev/+/delta"));
        assert!(!valid_topic("dev/#"));
    }
}
