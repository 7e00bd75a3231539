//! What a PUBACK means: the table's verdict on the entry it pairs with, reported to the pipeline for an
//! event of the outbox, never for a copy from the republish window (its row is gone: acknowledged again, the
//! copy goes back into the window; refused, it is dropped, not dead-lettered, since the broker had
//! acknowledged the event once). Also the logs and metrics of refusals that hold an event or pause publishing.

use std::time::Instant;

use rumqttc::v5::mqttbytes::v5::{PubAck, PubAckReason};
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::convert::Event;
use crate::metrics::FailureReason;

use super::unacked::{Unacked, Verdict, PAUSE_AFTER, PROBE_EVERY};
use super::window::Window;
use super::{ack_class, Book, Outcome, Publisher, Sent, SessionEnd, Term};

impl Publisher {
    /// Pairs a PUBACK, reports what it settled and returns what is due to be sent now (held events a success
    /// released, the rest of a reconnect's resend).
    pub(super) fn on_puback(
        &self,
        book: &mut Book,
        ack: PubAck,
        backoff: &mut Backoff,
        outcomes: &mpsc::UnboundedSender<(Term, Outcome)>,
    ) -> Result<Vec<i64>, SessionEnd> {
        let now = tokio::time::Instant::now().into_std();
        let was_paused = book.unacked.paused_since();
        let verdict = book.unacked.on_puback(ack.pkid, ack_class(&ack.reason), now);
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
                self.note_held(
                    &book.unacked,
                    seq,
                    &ack.reason,
                    reason_string.as_deref(),
                    was_paused.is_some(),
                );
                None
            }
            Some(verdict) => {
                if matches!(verdict, Verdict::Acked(_)) {
                    backoff.reset();
                }
                let refusal = || match &reason_string {
                    Some(s) => format!("broker refused the publish: {:?} ({s})", ack.reason),
                    None => format!("broker refused the publish: {:?}", ack.reason),
                };
                let (outcome, evicted) = settle(verdict, &mut book.window, now, refusal);
                self.metrics.republish_window_evicted.inc_by(evicted);
                self.note_window(book);
                outcome
            }
        };
        if let Some(o) = outcome {
            if outcomes.send((book.term, o)).is_err() {
                return Err(SessionEnd::Done);
            }
        }
        // After a success: the held events, once more (all of them when resuming).
        let due = book.unacked.due(now);
        if let (Some(since), None) = (was_paused, book.unacked.paused_since()) {
            self.metrics.publishing_paused.set(0);
            tracing::info!(
                paused_for = ?now.saturating_duration_since(since),
                resending = due.len(),
                "publishing resumed: the broker accepted a publish; sending the held events again, in seq order"
            );
        }
        Ok(due)
    }

    /// Logs a refusal as not authorised (an error with the topic and the broker's reason when it pauses
    /// publishing) and keeps the paused metric.
    fn note_held(
        &self,
        unacked: &Unacked<Sent>,
        seq: i64,
        reason: &PubAckReason,
        reason_string: Option<&str>,
        was_paused: bool,
    ) {
        let topic = unacked.get(seq).map_or("", |e| e.event.topic.as_str());
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

/// A final verdict (acknowledged, or refused for good): for an event of the outbox, the outcome to report, and
/// an acknowledged one is kept in the window; for a copy, nothing to report (acknowledged, it goes back into
/// the window as acknowledged now; refused, it is dropped). Returns the outcome and how many entries left the
/// window early for want of room. `refusal` says why the broker refused, for the dead letter.
fn settle(
    verdict: Verdict<Sent>,
    window: &mut Window<Event>,
    now: Instant,
    refusal: impl FnOnce() -> String,
) -> (Option<Outcome>, u64) {
    match verdict {
        Verdict::Acked(Sent { event, copy }) => {
            if copy {
                return (None, window.acked(event, now));
            }
            let evicted = window.acked(event.clone(), now);
            (Some(Outcome::Acked(event)), evicted)
        }
        Verdict::Refused(Sent { event, copy: true }) => {
            tracing::warn!(
                seq = event.seq,
                topic = %event.topic,
                detail = %refusal(),
                "broker refused an event published again from the republish window; dropped (it had \
                 acknowledged it before, and its row has left the outbox)"
            );
            window.settled(event.seq);
            (None, 0)
        }
        Verdict::Refused(Sent { event, copy: false }) => (
            Some(Outcome::Rejected {
                event,
                reason: FailureReason::Rejected,
                detail: refusal(),
            }),
            0,
        ),
        Verdict::RetryLater { .. } | Verdict::Held { .. } => (None, 0),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::convert::Stream;

    fn event(seq: i64) -> Event {
        Event {
            seq,
            branch_seq: 1,
            warning: None,
            stream: Stream::Product,
            topic: "dev/m/b/product".into(),
            event_id: format!("i-{seq}"),
            payload: bytes::Bytes::from_static(b"{\"stock\":1}"),
            captured_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("a valid time"),
        }
    }

    fn sent(seq: i64, copy: bool) -> Sent {
        Sent {
            event: event(seq),
            copy,
        }
    }

    fn window() -> Window<Event> {
        Window::new(Duration::from_secs(10), 1 << 20)
    }

    const REFUSED: fn() -> String = || "broker refused the publish: TopicNameInvalid".to_string();

    #[test]
    fn an_acknowledged_event_is_reported_and_kept_in_the_window() {
        let now = Instant::now();
        let mut w = window();
        let (outcome, evicted) = settle(Verdict::Acked(sent(1, false)), &mut w, now, REFUSED);
        assert!(matches!(outcome, Some(Outcome::Acked(e)) if e == event(1)));
        assert_eq!((evicted, w.len()), (0, 1));
        assert_eq!(w.lost(now, now), vec![event(1)], "published again after a loss");
    }

    #[test]
    fn an_acknowledged_copy_reports_nothing_and_goes_back_into_the_window() {
        let t0 = Instant::now();
        let mut w = window();
        w.acked(event(1), t0);
        let copies = w.lost(t0, t0);
        let copy = Sent {
            event: copies.into_iter().next().expect("one copy"),
            copy: true,
        };
        let later = t0 + Duration::from_secs(8);
        let (outcome, _) = settle(Verdict::Acked(copy), &mut w, later, REFUSED);
        assert!(outcome.is_none(), "its row is gone: no second outcome");
        assert_eq!(w.len(), 1, "acknowledged again: kept from now");
        assert_eq!(
            w.lost(later + Duration::from_secs(9), later + Duration::from_secs(9)),
            vec![event(1)]
        );
    }

    #[test]
    fn a_refused_copy_is_dropped_not_dead_lettered() {
        let t0 = Instant::now();
        let mut w = window();
        w.acked(event(1), t0);
        let copy = Sent {
            event: w.lost(t0, t0).into_iter().next().expect("one copy"),
            copy: true,
        };
        assert!(w.bytes() > 0, "counted while out");
        let (outcome, _) = settle(Verdict::Refused(copy), &mut w, t0, REFUSED);
        assert!(outcome.is_none(), "no dead letter for a copy");
        assert_eq!((w.len(), w.bytes()), (0, 0), "dropped");
    }

    #[test]
    fn a_refused_event_is_reported_with_the_brokers_reason_and_not_kept() {
        let now = Instant::now();
        let mut w = window();
        let (outcome, _) = settle(Verdict::Refused(sent(2, false)), &mut w, now, REFUSED);
        match outcome {
            Some(Outcome::Rejected {
                event: e,
                reason,
                detail,
            }) => {
                assert_eq!(e, event(2));
                assert_eq!(reason, FailureReason::Rejected);
                assert_eq!(detail, REFUSED());
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(w.len(), 0);
    }
}
