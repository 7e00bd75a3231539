//! The only record of what the broker has not acknowledged: every event handed to the publisher stays here
//! until a PUBACK paired with it says how it ended. Pure bookkeeping, so that the pairing and the
//! republishing a loss bug would hide in can be tested against a model without a broker: no I/O, no MQTT
//! client, and no clock of its own (the caller passes the time in).
//!
//! The client tells us a packet id only when a publish goes out (`Outgoing::Publish(pkid)`, in the order
//! the requests were queued), and packet ids are reused as soon as they are acknowledged, so requests are
//! paired FIFO with outgoing publishes, then FIFO per packet id with PUBACKs. It must never let an event go
//! without a PUBACK for it: after any connection error everything unacknowledged is sent again, in seq
//! order, so one row's events keep their order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A refusal the broker may not repeat (overload, quota, an internal error) is retried this many times, with
/// backoff, before the event is refused for good; refusals that will not change (not authorised, invalid
/// topic or payload) are final at once.
pub(crate) const TRANSIENT_ATTEMPTS: u32 = 8;

pub(crate) fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}

/// What is published: anything with the outbox id it came from.
pub(crate) trait Sequenced {
    fn seq(&self) -> i64;
}

/// What a PUBACK's reason code means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckClass {
    /// Delivered (0x00, or 0x10 "no matching subscribers").
    Success,
    /// Refused for now: worth sending again later.
    Transient,
    /// Refused for good.
    Permanent,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Submit {
    /// Recorded and queued: the caller publishes it now.
    Send,
    /// Already unacknowledged here; the copy in flight will be reported.
    Duplicate,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict<E> {
    /// A success PUBACK for it: no longer ours.
    Acked(E),
    /// Refused for good (or transiently, once too often): no longer ours.
    Refused(E),
    /// Refused for now; `due_retries` hands it back at `at`.
    RetryLater { seq: i64, attempt: u32, at: Instant },
}

pub(crate) struct Unacked<E> {
    /// A BTreeMap: a reconnect republishes in seq order.
    events: BTreeMap<i64, E>,
    /// Transient refusals so far, per seq, kept across reconnects so that a flapping connection does not
    /// retry an event for ever.
    attempts: HashMap<i64, u32>,
    /// Requests queued to the client whose publish has not gone out yet, in the order they were queued.
    pending_out: VecDeque<i64>,
    /// Gone out, by packet id. A FIFO per packet id, so that the pairing would hold even if an id's next use
    /// reached us before the PUBACK that freed it.
    inflight: HashMap<u16, VecDeque<i64>>,
    /// Refused for now, to be sent again at the given time.
    retry_at: Vec<(Instant, i64)>,
}

impl<E: Sequenced> Unacked<E> {
    pub(crate) fn new() -> Unacked<E> {
        Unacked {
            events: BTreeMap::new(),
            attempts: HashMap::new(),
            pending_out: VecDeque::new(),
            inflight: HashMap::new(),
            retry_at: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub(crate) fn contains(&self, seq: i64) -> bool {
        self.events.contains_key(&seq)
    }

    pub(crate) fn get(&self, seq: i64) -> Option<&E> {
        self.events.get(&seq)
    }

    /// Records an event the caller is about to queue to the client, unless it is already here.
    pub(crate) fn submit(&mut self, event: E) -> Submit {
        let seq = event.seq();
        if self.events.contains_key(&seq) {
            return Submit::Duplicate;
        }
        self.events.insert(seq, event);
        self.pending_out.push_back(seq);
        Submit::Send
    }

    /// The client sent the oldest queued request as packet `pkid`.
    pub(crate) fn on_outgoing(&mut self, pkid: u16) {
        if let Some(seq) = self.pending_out.pop_front() {
            self.inflight.entry(pkid).or_default().push_back(seq);
        }
    }

    /// A PUBACK for `pkid`. `None`: nothing of ours was in flight with that id, or it is no longer ours.
    pub(crate) fn on_puback(&mut self, pkid: u16, class: AckClass, now: Instant) -> Option<Verdict<E>> {
        let queue = self.inflight.get_mut(&pkid)?;
        let seq = queue.pop_front();
        if queue.is_empty() {
            self.inflight.remove(&pkid);
        }
        let seq = seq?;
        if class == AckClass::Transient && self.events.contains_key(&seq) {
            let n = self.attempts.entry(seq).or_insert(0);
            *n += 1;
            if *n < TRANSIENT_ATTEMPTS {
                let (attempt, at) = (*n, now + retry_delay(*n));
                self.retry_at.push((at, seq));
                return Some(Verdict::RetryLater { seq, attempt, at });
            }
        }
        let event = self.events.remove(&seq)?;
        self.attempts.remove(&seq);
        Some(match class {
            AckClass::Success => Verdict::Acked(event),
            AckClass::Transient | AckClass::Permanent => Verdict::Refused(event),
        })
    }

    /// When the next refused-for-now event is due.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.retry_at.iter().map(|(t, _)| *t).min()
    }

    /// The refused-for-now events due at `now`, queued again: the caller publishes them, in this order.
    pub(crate) fn due_retries(&mut self, now: Instant) -> Vec<i64> {
        let (due, later): (Vec<_>, Vec<_>) = self.retry_at.drain(..).partition(|(t, _)| *t <= now);
        self.retry_at = later;
        let due: Vec<i64> = due
            .into_iter()
            .map(|(_, seq)| seq)
            .filter(|seq| self.events.contains_key(seq))
            .collect();
        self.pending_out.extend(&due);
        due
    }

    /// A new connection (clean start): nothing is in flight any more, so every unacknowledged event is
    /// queued again, retries included; the caller publishes them, in this order (seq order).
    pub(crate) fn reconnect(&mut self) -> Vec<i64> {
        self.inflight.clear();
        self.retry_at.clear();
        self.pending_out = self.events.keys().copied().collect();
        self.pending_out.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Ev(pub(super) i64);
    impl Sequenced for Ev {
        fn seq(&self) -> i64 {
            self.0
        }
    }

    #[test]
    fn acknowledged_in_the_order_they_went_out() {
        let now = Instant::now();
        let mut u = Unacked::new();
        assert_eq!(u.submit(Ev(1)), Submit::Send);
        assert_eq!(u.submit(Ev(2)), Submit::Send);
        assert_eq!(u.submit(Ev(1)), Submit::Duplicate);
        u.on_outgoing(7);
        u.on_outgoing(8);
        assert_eq!(u.on_puback(8, AckClass::Success, now), Some(Verdict::Acked(Ev(2))));
        assert_eq!(
            u.on_puback(8, AckClass::Success, now),
            None,
            "nothing else went out as 8"
        );
        assert_eq!(u.len(), 1);
        assert_eq!(u.on_puback(7, AckClass::Permanent, now), Some(Verdict::Refused(Ev(1))));
        assert!(u.is_empty());
    }

    #[test]
    fn a_reused_packet_id_pairs_first_in_first_out() {
        let now = Instant::now();
        let mut u = Unacked::new();
        u.submit(Ev(1));
        u.submit(Ev(2));
        // The client freed 1 and reused it before its PUBACK reached us.
        u.on_outgoing(1);
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Success, now), Some(Verdict::Acked(Ev(1))));
        assert_eq!(u.on_puback(1, AckClass::Success, now), Some(Verdict::Acked(Ev(2))));
    }

    #[test]
    fn a_transient_refusal_is_retried_then_refused() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        u.submit(Ev(5));
        let mut now = t0;
        for attempt in 1..TRANSIENT_ATTEMPTS {
            u.on_outgoing(1);
            let at = now + retry_delay(attempt);
            assert_eq!(
                u.on_puback(1, AckClass::Transient, now),
                Some(Verdict::RetryLater { seq: 5, attempt, at })
            );
            assert_eq!(u.next_retry(), Some(at));
            assert!(u.due_retries(at - Duration::from_millis(1)).is_empty());
            now = at;
            assert_eq!(u.due_retries(now), vec![5]);
            assert_eq!(u.next_retry(), None);
        }
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Transient, now), Some(Verdict::Refused(Ev(5))));
        assert!(u.is_empty());
    }

    #[test]
    fn attempts_survive_a_reconnect_and_end_with_the_event() {
        let now = Instant::now();
        let mut u = Unacked::new();
        u.submit(Ev(5));
        for _ in 1..TRANSIENT_ATTEMPTS {
            u.on_outgoing(1);
            assert!(matches!(
                u.on_puback(1, AckClass::Transient, now),
                Some(Verdict::RetryLater { .. })
            ));
            assert_eq!(u.reconnect(), vec![5], "a reconnect sends it at once");
            assert_eq!(u.next_retry(), None);
        }
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Transient, now), Some(Verdict::Refused(Ev(5))));
        // Back again (a replayed dead letter): a fresh count.
        u.submit(Ev(5));
        u.on_outgoing(1);
        assert!(matches!(
            u.on_puback(1, AckClass::Transient, now),
            Some(Verdict::RetryLater { attempt: 1, .. })
        ));
    }

    #[test]
    fn a_reconnect_resends_everything_in_seq_order_and_forgets_the_old_packet_ids() {
        let now = Instant::now();
        let mut u = Unacked::new();
        for seq in [3, 1, 2] {
            u.submit(Ev(seq));
        }
        u.on_outgoing(1);
        u.on_outgoing(2);
        assert_eq!(u.reconnect(), vec![1, 2, 3]);
        assert_eq!(
            u.on_puback(1, AckClass::Success, now),
            None,
            "a packet id of the old connection"
        );
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Success, now), Some(Verdict::Acked(Ev(1))));
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn only_a_transient_refusal_waits() {
        let now = Instant::now();
        let mut u = Unacked::new();
        u.submit(Ev(1));
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Permanent, now), Some(Verdict::Refused(Ev(1))));
        assert_eq!(u.next_retry(), None);
        let total: Duration = (1..TRANSIENT_ATTEMPTS).map(retry_delay).sum();
        assert!(
            total >= Duration::from_secs(60) && total <= Duration::from_secs(300),
            "{total:?}"
        );
    }
}

#[cfg(test)]
mod model;
