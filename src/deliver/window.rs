//! The republish window: events the broker acknowledged recently, kept so that they can be published again
//! after the connection to the broker is lost. Pure bookkeeping like `unacked`: no I/O, no clock of its own.
//!
//! A PUBACK says the broker took the message, not that it is safe: a broker that is killed loses what it had
//! acknowledged and not yet written to disk (Mosquitto saves its state every `autosave_interval`), among it
//! messages queued for a subscriber's persistent session that is offline. The row is already deleted from the
//! outbox by then, so only this window can send it again. When the connection is lost, [`Window::lost`] hands
//! back every event acknowledged within the span before the loss; the caller publishes those copies with the
//! unacknowledged events, in seq order (a row's event whose original the broker lost is first delivered by
//! its copy, so it must go before that row's later events). A copy is the same event: same bytes, same
//! `event_id`, so a subscriber that had the original sees a recognisable duplicate.
//!
//! Memory is bounded in bytes: acknowledged entries leave by age (older than the span) and, beyond the
//! budget, the oldest leave early (counted, so that an operator sees a window too small for the traffic).
//! Copies handed out stay counted until they are acknowledged again (then they are entries again, from the
//! new PUBACK's time: the broker took them again and may lose them again) or settled otherwise (refused, or
//! the same row handed over again as a new event), so that the window and its copies together never hold
//! more than the budget.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// What the window keeps: anything with the outbox id it came from and a size in bytes.
pub(crate) trait Weighed {
    fn seq(&self) -> i64;
    /// What the entry costs (payload and topic): the same value every time it is asked.
    fn bytes(&self) -> u64;
}

pub(crate) struct Window<E> {
    /// How long an acknowledged event is kept; zero: nothing is.
    span: Duration,
    /// Most bytes of entries and copies out.
    budget: u64,
    /// Acknowledged, by (when, seq): the oldest first.
    acked: BTreeMap<(Instant, i64), E>,
    /// When each entry of `acked` was acknowledged.
    at: HashMap<i64, Instant>,
    /// Copies handed out by `lost` and not yet settled, with their size.
    out: HashMap<i64, u64>,
    /// Bytes of `acked` and `out`.
    bytes: u64,
}

impl<E: Weighed> Window<E> {
    pub(crate) fn new(span: Duration, budget: u64) -> Window<E> {
        Window {
            span,
            budget,
            acked: BTreeMap::new(),
            at: HashMap::new(),
            out: HashMap::new(),
            bytes: 0,
        }
    }

    /// Bytes of the entries and of the copies out.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Acknowledged entries held (copies out not included).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.acked.len()
    }

    /// The broker acknowledged `event` at `now` (for the first time, or a copy again). Returns how many
    /// entries left early for want of room: the oldest, or this one if even an empty window (but for the
    /// copies out) cannot hold it.
    pub(crate) fn acked(&mut self, event: E, now: Instant) -> u64 {
        let seq = event.seq();
        self.forget(seq);
        if self.span.is_zero() {
            return 0;
        }
        self.expire(now);
        let size = event.bytes();
        let mut evicted = 0;
        while self.bytes + size > self.budget {
            let Some(((_, oldest), e)) = self.acked.pop_first() else {
                return evicted + 1;
            };
            self.at.remove(&oldest);
            self.bytes -= e.bytes();
            evicted += 1;
        }
        self.at.insert(seq, now);
        self.acked.insert((now, seq), event);
        self.bytes += size;
        evicted
    }

    /// Entries acknowledged more than the span before `now` leave.
    pub(crate) fn expire(&mut self, now: Instant) {
        let Some(cutoff) = now.checked_sub(self.span) else {
            return;
        };
        while let Some(entry) = self.acked.first_entry() {
            let (at, seq) = *entry.key();
            if at >= cutoff {
                break;
            }
            let e = entry.remove();
            self.at.remove(&seq);
            self.bytes -= e.bytes();
        }
    }

    /// The connection was lost at `now` (or the lead set aside): every entry acknowledged within the span
    /// before it, in seq order, to be published again. They leave the window as entries and stay counted as
    /// copies out until [`Window::acked`] or [`Window::settled`].
    pub(crate) fn lost(&mut self, now: Instant) -> Vec<E> {
        self.expire(now);
        self.at.clear();
        let mut copies: Vec<E> = std::mem::take(&mut self.acked).into_values().collect();
        copies.sort_unstable_by_key(|e| e.seq());
        for e in &copies {
            // Counted already: they move from the entries to the copies out.
            self.out.insert(e.seq(), e.bytes());
        }
        copies
    }

    /// A copy handed out by [`Window::lost`] is done without a new acknowledgement (the broker refused it, or
    /// the same row was handed over again as a new event): it no longer counts.
    pub(crate) fn settled(&mut self, seq: i64) {
        if let Some(n) = self.out.remove(&seq) {
            self.bytes -= n;
        }
    }

    /// Removes `seq`, as an entry or a copy out.
    fn forget(&mut self, seq: i64) {
        self.settled(seq);
        if let Some(at) = self.at.remove(&seq) {
            if let Some(e) = self.acked.remove(&(at, seq)) {
                self.bytes -= e.bytes();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event: its seq and its size.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) struct Ev(pub(super) i64, pub(super) u64);
    impl Weighed for Ev {
        fn seq(&self) -> i64 {
            self.0
        }
        fn bytes(&self) -> u64 {
            self.1
        }
    }

    const SPAN: Duration = Duration::from_secs(10);

    fn seqs(v: &[Ev]) -> Vec<i64> {
        v.iter().map(|e| e.0).collect()
    }

    #[test]
    fn entries_leave_by_age_and_a_loss_hands_back_the_recent_ones_in_seq_order() {
        let t0 = Instant::now();
        let mut w = Window::new(SPAN, 1000);
        w.acked(Ev(5, 10), t0);
        w.acked(Ev(3, 10), t0 + Duration::from_secs(4));
        w.acked(Ev(4, 10), t0 + Duration::from_secs(8));
        assert_eq!((w.len(), w.bytes()), (3, 30));
        // At +12 s the first is 12 s old: gone; 3 (8 s) and 4 (4 s) are handed back, in seq order.
        let copies = w.lost(t0 + Duration::from_secs(12));
        assert_eq!(seqs(&copies), vec![3, 4]);
        assert_eq!(w.len(), 0);
        assert_eq!(w.bytes(), 20, "the copies out still count");
        assert!(w.lost(t0 + Duration::from_secs(13)).is_empty(), "handed back once");
    }

    #[test]
    fn an_entry_exactly_as_old_as_the_span_is_still_handed_back() {
        let t0 = Instant::now();
        let mut w = Window::new(SPAN, 1000);
        w.acked(Ev(1, 1), t0);
        w.expire(t0 + SPAN);
        assert_eq!(w.len(), 1);
        w.expire(t0 + SPAN + Duration::from_nanos(1));
        assert_eq!((w.len(), w.bytes()), (0, 0));
    }

    #[test]
    fn beyond_the_budget_the_oldest_leave_early_and_are_counted() {
        let t0 = Instant::now();
        let mut w = Window::new(SPAN, 100);
        for seq in 1..=3 {
            assert_eq!(w.acked(Ev(seq, 30), t0 + Duration::from_secs(seq as u64)), 0);
        }
        assert_eq!(w.bytes(), 90);
        // 50 more: the two oldest (1 and 2) make room.
        assert_eq!(w.acked(Ev(9, 50), t0 + Duration::from_secs(5)), 2);
        assert_eq!(w.bytes(), 80);
        assert_eq!(seqs(&w.lost(t0 + Duration::from_secs(6))), vec![3, 9]);
        // Larger than the room the copies out leave: not kept, counted; the copies out are not evicted.
        assert_eq!(w.acked(Ev(10, 21), t0 + Duration::from_secs(7)), 1);
        assert_eq!(w.bytes(), 80);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn copies_count_until_acknowledged_again_or_settled() {
        let t0 = Instant::now();
        let mut w = Window::new(SPAN, 100);
        w.acked(Ev(1, 40), t0);
        w.acked(Ev(2, 40), t0);
        assert_eq!(seqs(&w.lost(t0)), vec![1, 2]);
        // While both copies are out, a new entry only fits in what they leave.
        assert_eq!(w.acked(Ev(3, 40), t0), 1, "no room: the new one leaves at once");
        assert_eq!(w.bytes(), 80);
        // The broker takes copy 1 again, at +20 s: an entry again, from then.
        w.acked(Ev(1, 40), t0 + Duration::from_secs(20));
        assert_eq!((w.len(), w.bytes()), (1, 80));
        // Copy 2 refused: settled, no longer counted, and not handed back by the next loss.
        w.settled(2);
        assert_eq!(w.bytes(), 40);
        assert_eq!(seqs(&w.lost(t0 + Duration::from_secs(25))), vec![1]);
        w.settled(2);
        assert_eq!(w.bytes(), 40, "settling twice is harmless");
    }

    #[test]
    fn the_same_row_acknowledged_again_is_one_entry() {
        let t0 = Instant::now();
        let mut w = Window::new(SPAN, 100);
        w.acked(Ev(1, 30), t0);
        w.acked(Ev(1, 30), t0 + Duration::from_secs(9));
        assert_eq!((w.len(), w.bytes()), (1, 30));
        // Aged from the second acknowledgement.
        assert_eq!(seqs(&w.lost(t0 + Duration::from_secs(15))), vec![1]);
    }

    #[test]
    fn a_zero_span_keeps_nothing() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::ZERO, 100);
        assert_eq!(w.acked(Ev(1, 30), t0), 0);
        assert_eq!((w.len(), w.bytes()), (0, 0));
        assert!(w.lost(t0).is_empty());
    }
}

#[cfg(test)]
mod model;
