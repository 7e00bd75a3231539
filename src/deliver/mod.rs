//! Delivery: publishes events to the MQTT broker at QoS 1 (MQTT 5) and reports, for each one, whether the
//! broker acknowledged it (PUBACK < 0x80) or refused it. Owns the only record of what is unacknowledged.
//!
//! rumqttc's `publish()` returns when a request is queued, and on a connection error it silently drops what
//! was in flight (clean start). So this module keeps every event until its PUBACK, pairs PUBACKs with events
//! itself (outgoing publishes are paired FIFO with our requests, then by packet id), and after any fault
//! throws the client away, reconnects with backoff and republishes everything unacknowledged, in seq order.
//! It never decides that an event is done without a PUBACK; it never touches the database. The record
//! itself, and the pairing, is the pure `unacked` table; `session` drives the client and the clock, `puback`
//! turns PUBACKs into outcomes, `send` takes new events and queues publishes.
//!
//! A refusal as not authorised (0x87) is not final at once: the event is held until a later publish succeeds
//! (the account works, so the topic is refused: one more try, then the dead letters). Several events refused
//! with no success in between mean the bridge's own account is refused (an ACL slip): publishing pauses (no
//! new events are taken, so the pipeline backs up and the outbox keeps the backlog), `publishing_paused` is
//! 1 and an error is logged; one probe goes every 10 s, and the first success resumes publishing and sends
//! every held event again, in seq order. The rules are in `unacked`.
//!
//! A broker that crashes can lose what it had acknowledged (its row is gone from the outbox by then), so the
//! events acknowledged within `mqtt.republish_window` before the broker was last heard from are kept in the
//! pure `window`, and when the connection is lost they join the unacknowledged ones as copies: sent again in
//! the same seq-ordered resend, their PUBACKs reported to no one (acknowledged, they go back into the window;
//! refused, they are dropped).
//!
//! Only the leader publishes events, and the pipeline says who leads through a [`Lead`]: when its lead ends
//! the publisher drops the connection at once (rumqttc's queued requests die with it), sets aside what is
//! unacknowledged, and stands by on a new connection (for readiness) without taking or sending events. If the
//! pipeline leads again in the same [`Term`] (no other replica led meanwhile) what was set aside is sent
//! again; a new term drops it (the outbox still holds every row, and the new lead reads them).
//!
//! Copies are another matter: whoever leads now, the broker may have lost those acknowledged messages and
//! only this replica still holds them. So the copies a lost connection made are published right after the
//! next CONNACK even while this replica stands by, a new term keeps them (and the window), and a stop drains
//! them within its deadline. They are at-least-once redeliveries after a fault: the same event, with the same
//! `event_id`, counted on `delta_bridge_republished_copies_total`.

mod puback;
mod send;
mod session;
mod unacked;
mod window;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, PubAckReason};
use rumqttc::v5::ConnectionError;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::MqttConfig;
use crate::convert::Event;
use crate::health::Heard;
use crate::metrics::{FailureReason, Metrics};

use send::SendError;
use unacked::{AckClass, Sequenced, Submit, Unacked};
use window::{Weighed, Window};

/// A connection that lasted this long, or saw a success PUBACK, has proven itself: the reconnect backoff
/// starts again from its shortest delay. A broker that closes the connection right after each refusal (or
/// at once) is reconnected to with a growing delay instead.
const STABLE: Duration = Duration::from_secs(10);

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

/// One stretch of leading by the pipeline with one outbox tracker: a term goes on across a lapse in the lead
/// when no other replica led meanwhile, and a new one starts when another did. Events handed over and
/// outcomes reported carry their term, so that neither side mistakes the other's leftovers of an earlier
/// term for its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Term(pub(crate) u64);

/// What the pipeline tells the publisher (a watch channel: only the latest matters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Lead {
    pub(crate) term: Term,
    /// This replica leads now: the publisher sends. When false, it sends no event (and keeps what it holds of
    /// `term` until it leads again in that term, or another term begins), only the window's copies.
    pub(crate) leading: bool,
}

/// The publishing side of the bridge: runs until cancelled, then drains (waits up to `drain` for PUBACKs of
/// what is in flight; the rest stays unacknowledged in the outbox and is sent again by the next leader).
pub(crate) struct Publisher {
    cfg: MqttConfig,
    metrics: Arc<Metrics>,
    connected: Arc<AtomicBool>,
    /// When the broker last sent anything (the leader gives up the lead some time after).
    heard: Arc<Heard>,
    drain: Duration,
    /// The most events the pipeline hands over unacknowledged (its `max_pending`): sizes the request
    /// channel so that queuing a publish never fails while the broker is slow.
    max_pending: usize,
    /// The most bytes the republish window and its copies hold (`bridge.max_pending_bytes`).
    window_budget: u64,
}

/// The publisher's ends of its channels with the pipeline.
struct Io {
    events: mpsc::Receiver<(Term, Event)>,
    /// An event of a term the publisher had not followed yet when it took it (the pipeline moved on just
    /// then): taken first once it has.
    stash: Option<(Term, Event)>,
    outcomes: mpsc::UnboundedSender<(Term, Outcome)>,
    lead: watch::Receiver<Lead>,
    cancel: CancellationToken,
}

impl Io {
    fn leading(&self) -> bool {
        self.lead.borrow().leading
    }

    /// The next event handed over, without waiting.
    fn try_next(&mut self) -> Option<(Term, Event)> {
        self.stash.take().or_else(|| self.events.try_recv().ok())
    }
}

/// The next event handed over (the stashed one first); None once the pipeline is gone.
async fn next_event(
    stash: &mut Option<(Term, Event)>,
    events: &mut mpsc::Receiver<(Term, Event)>,
) -> Option<(Term, Event)> {
    match stash.take() {
        Some(ev) => Some(ev),
        None => events.recv().await,
    }
}

/// An entry of the unacknowledged table: an event the pipeline handed over, or a copy of one the broker had
/// acknowledged before the connection was lost (from the window: its row is gone, nothing is reported).
struct Sent {
    event: Event,
    copy: bool,
}

impl Sequenced for Sent {
    fn seq(&self) -> i64 {
        self.event.seq
    }
    fn topic(&self) -> &str {
        &self.event.topic
    }
}

impl Weighed for Event {
    fn seq(&self) -> i64 {
        self.seq
    }
    /// As the pipeline counts its pending bytes: payload and topic (the window adds its overhead per entry).
    fn bytes(&self) -> u64 {
        (self.payload.len() + self.topic.len()) as u64
    }
}

/// What the publisher holds: the events of one term, and the window and its copies (kept across terms).
struct Book {
    term: Term,
    unacked: Unacked<Sent>,
    window: Window<Event>,
}

impl Book {
    fn new(term: Term, span: Duration, budget: u64) -> Book {
        Book {
            term,
            unacked: Unacked::new(),
            window: Window::new(span, budget),
        }
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

enum SessionEnd {
    /// Stopping (drained, or nothing to drain), or the pipeline is gone.
    Done,
    /// The lead ended (or a new term began): the connection is dropped so that nothing more of it is sent.
    LeadEnded,
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

impl Publisher {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: MqttConfig,
        metrics: Arc<Metrics>,
        connected: Arc<AtomicBool>,
        heard: Arc<Heard>,
        drain: Duration,
        max_pending: usize,
        window_budget: u64,
    ) -> Publisher {
        Publisher {
            cfg,
            metrics,
            connected,
            heard,
            drain,
            max_pending,
            window_budget,
        }
    }

    pub(crate) async fn run(
        self,
        events: mpsc::Receiver<(Term, Event)>,
        outcomes: mpsc::UnboundedSender<(Term, Outcome)>,
        lead: watch::Receiver<Lead>,
        cancel: CancellationToken,
    ) {
        let mut io = Io {
            events,
            stash: None,
            outcomes,
            lead,
            cancel,
        };
        let mut book = self.book(Term::default());
        let mut backoff = Backoff::new();
        let mut draining = false;
        loop {
            if io.cancel.is_cancelled() && (draining || book.owes_nothing(io.leading())) {
                break;
            }
            let mut up_since = None;
            let end = self
                .session(&mut book, &mut io, &mut draining, &mut backoff, &mut up_since)
                .await;
            self.set_connected(false);
            match end {
                SessionEnd::Done => break,
                SessionEnd::LeadEnded => {
                    // Dropped by us, not lost: the broker lost nothing, so the window stays a window (it
                    // turns into copies only if a later connection is lost). Copies that were still out go
                    // again on the next connection, standing by or not.
                    tracing::info!(
                        unacked = book.unacked.len(),
                        copies = book.copies(),
                        window_bytes = book.window.bytes(),
                        "the lead ended: publishing stopped and the broker connection dropped; what was not \
                         acknowledged is set aside until this replica leads again"
                    );
                }
                SessionEnd::Failed(why) => {
                    if !book.unacked.settled() {
                        self.metrics.failure(FailureReason::Connection);
                    }
                    let copies = self.set_aside(&mut book);
                    if draining {
                        break;
                    }
                    if up_since.is_some_and(|t: tokio::time::Instant| t.elapsed() >= STABLE) {
                        backoff.reset();
                    }
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %why, retry_in = ?wait, unacked = book.unacked.len(), copies, "mqtt connection lost");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = io.cancel.cancelled() => {
                            if book.owes_nothing(io.leading()) { break; }
                            draining = true;
                        }
                    }
                }
            }
        }
        self.set_connected(false);
        let copies = book.copies();
        if book.unacked.len() > copies {
            tracing::info!(
                unacked = book.unacked.len() - copies,
                "stopping with events unacknowledged; they stay in the outbox"
            );
        }
        if copies > 0 {
            tracing::warn!(
                copies,
                "stopping with copies from the republish window not acknowledged again: if the broker lost \
                 them, they are lost (their rows left the outbox when the broker first acknowledged them)"
            );
        }
    }

    fn book(&self, term: Term) -> Book {
        Book::new(term, self.cfg.republish_window, self.window_budget)
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
        self.metrics.mqtt_connected.set(i64::from(up));
    }

    fn note_window(&self, book: &Book) {
        self.metrics.republish_window_bytes.set(book.window.bytes() as i64);
    }

    /// The broker sent something: it was alive just now, and the window's old entries may leave.
    fn heard_from(&self, book: &mut Book) {
        self.heard.now();
        book.window.expire(tokio::time::Instant::now().into_std());
        self.note_window(book);
    }

    /// The connection was lost: what the broker acknowledged within the republish window before it was last
    /// heard from joins the unacknowledged events as copies, to be sent on the next connection right after
    /// its CONNACK (with the unacknowledged events, in seq order, if this replica leads). Returns how many.
    fn set_aside(&self, book: &mut Book) -> usize {
        let now = tokio::time::Instant::now().into_std();
        // Counted back from the broker's last packet: it may have died then, a keep-alive before now.
        let last_heard = self.heard.last().unwrap_or(now);
        let copies = book.window.lost(last_heard, now);
        let n = copies.len();
        for event in copies {
            let seq = event.seq;
            if book.unacked.submit(Sent { event, copy: true }, now) == Submit::Duplicate {
                // The row was handed over again and is unacknowledged here: it goes again anyway.
                book.window.settled(seq);
            }
        }
        self.note_window(book);
        n
    }

    /// Follows the pipeline into `lead`'s term: a new term drops the events held of the previous one (another
    /// replica led in between; the outbox still holds every row that was not acknowledged), not the window
    /// nor its copies (the broker may have lost those, whoever leads, and only this replica holds them). Only
    /// while nothing of the old term is in flight on the current connection (before anything is sent on it,
    /// or standing by, when those are parked).
    fn follow(&self, book: &mut Book, lead: Lead) {
        if lead.term == book.term {
            return;
        }
        let dropped = book.unacked.retain(|s| s.copy);
        if dropped > 0 {
            tracing::info!(
                dropped,
                copies = book.copies(),
                "another replica has led since this one did: dropping the events set aside (their rows are read \
                 from the outbox again); the copies of the republish window still go"
            );
        }
        book.term = lead.term;
        if book.unacked.is_empty() {
            // Nothing left of the old term's publishing state (held events, a pause): start afresh.
            book.unacked = Unacked::new();
        }
        self.metrics
            .publishing_paused
            .set(i64::from(book.unacked.paused_since().is_some()));
        self.note_window(book);
    }

    /// Publishes these entries of the table, in this order, and counts the copies among them.
    fn send_all(&self, client: &rumqttc::v5::AsyncClient, book: &Book, seqs: &[i64]) -> Result<(), SendError> {
        let copies = send::send_all(client, &book.unacked, seqs)?;
        self.metrics.republished_copies.inc_by(copies);
        Ok(())
    }
}

impl Book {
    /// Copies from the window not yet acknowledged again.
    fn copies(&self) -> usize {
        self.unacked.count_where(|s| s.copy)
    }

    /// Nothing this replica should still send: what is unacknowledged is held (or parked), or, when it does
    /// not lead, only events of the outbox are (the new leader reads them again; copies it does not have).
    fn owes_nothing(&self, leading: bool) -> bool {
        self.unacked.settled_where(|s| leading || s.copy)
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
}
