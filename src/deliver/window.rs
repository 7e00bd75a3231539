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

/// What one entry costs beyond its own bytes: its place in the maps and the rest of the event it holds (ids,
/// times, the event id's string, the allocations' headers; estimated at 300-350 bytes, rounded up). Counted so
/// that a window of tiny events is bounded in real memory too.
pub(crate) const WINDOW_ENTRY_OVERHEAD: u64 = 512;

pub(crate) struct Window<E> {
    /// How long an acknowledged event is kept; zero: nothing is.
    span: Duration,
    /// Most bytes of entries and copies out.
    budget: u64,
    /// Counted for each entry or copy out beside its own bytes.
    overhead: u64,
    /// Acknowledged, by (when, seq): the oldest first.
    acked: BTreeMap<(Instant, i64), E>,
    /// When each entry of `acked` was acknowledged.
    at: HashMap<i64, Instant>,
    /// Copies handed out by `lost` and not yet settled, with their cost.
    out: HashMap<i64, u64>,
    /// Cost of `out`.
    out_bytes: u64,
    /// Cost of `acked` and `out`.
    bytes: u64,
}

impl<E: Weighed> Window<E> {
    pub(crate) fn new(span: Duration, budget: u64) -> Window<E> {
        Window::with_overhead(span, budget, WINDOW_ENTRY_OVERHEAD)
    }

    /// A window that counts `overhead` bytes for each entry beside its own (the service's is
    /// [`WINDOW_ENTRY_OVERHEAD`]).
    pub(crate) fn with_overhead(span: Duration, budget: u64, overhead: u64) -> Window<E> {
        Window {
            span,
            budget,
            overhead,
            acked: BTreeMap::new(),
            at: HashMap::new(),
            out: HashMap::new(),
            out_bytes: 0,
            bytes: 0,
        }
    }

    /// What `e` costs here: its bytes and the overhead of an entry.
    fn cost(&self, e: &E) -> u64 {
        e.bytes().saturating_add(self.overhead)
    }

    /// Bytes of the entries and of the copies out (each with its overhead).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Acknowledged entries held (copies out not included).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.acked.len()
    }

    /// The broker acknowledged `event` at `now` (for the first time, or a copy again). Returns how many
    /// entries left early for want of room: the oldest, or only this one if even an empty window (but for
    /// the copies out) cannot hold it; then nothing else leaves.
    pub(crate) fn acked(&mut self, event: E, now: Instant) -> u64 {
        let seq = event.seq();
        self.forget(seq);
        if self.span.is_zero() {
            return 0;
        }
        self.expire(now);
        let size = self.cost(&event);
        if self.out_bytes.saturating_add(size) > self.budget {
            // Would not fit even if every entry left: none does, for nothing.
            return 1;
        }
        let mut evicted = 0;
        while self.bytes + size > self.budget {
            // The copies out leave room for it (checked above): the loop ends before the entries run out.
            let Some(((_, oldest), e)) = self.acked.pop_first() else {
                break;
            };
            self.at.remove(&oldest);
            self.bytes -= self.cost(&e);
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
            self.bytes -= self.cost(&e);
        }
    }

    /// The connection was lost, noticed at `noticed`; the broker last sent anything at `last_heard` (it may
    /// have died right after, a keep-alive before the loss is noticed): every entry acknowledged within the
    /// span before `last_heard`, and any acknowledged after it, in seq order, to be published again. Older
    /// ones leave. They leave the window as entries and stay counted as copies out until [`Window::acked`]
    /// or [`Window::settled`].
    pub(crate) fn lost(&mut self, last_heard: Instant, noticed: Instant) -> Vec<E> {
        self.expire(last_heard.min(noticed));
        self.at.clear();
        let mut copies: Vec<E> = std::mem::take(&mut self.acked).into_values().collect();
        copies.sort_unstable_by_key(|e| e.seq());
        for e in &copies {
            // Counted already: they move from the entries to the copies out.
            let cost = self.cost(e);
            self.out.insert(e.seq(), cost);
            self.out_bytes += cost;
        }
        copies
    }

    /// A copy handed out by [`Window::lost`] is done without a new acknowledgement (the broker refused it, or
    /// the same row was handed over again as a new event): it no longer counts.
    pub(crate) fn settled(&mut self, seq: i64) {
        if let Some(n) = self.out.remove(&seq) {
            self.bytes -= n;
            self.out_bytes -= n;
        }
    }

    /// Removes `seq`, as an entry or a copy out.
    fn forget(&mut self, seq: i64) {
        self.settled(seq);
        if let Some(at) = self.at.remove(&seq) {
            if let Some(e) = self.acked.remove(&(at, seq)) {
                self.bytes -= self.cost(&e);
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

    /// A window that counts no overhead: the sizes below are what it holds.
    fn plain(budget: u64) -> Window<Ev> {
        Window::with_overhead(SPAN, budget, 0)
    }

    fn seqs(v: &[Ev]) -> Vec<i64> {
        v.iter().map(|e| e.0).collect()
    }

    #[test]
    fn entries_leave_by_age_and_a_loss_hands_back_the_recent_ones_in_seq_order() {
        let t0 = Instant::now();
        let mut w = plain(1000);
        w.acked(Ev(5, 10), t0);
        w.acked(Ev(3, 10), t0 + Duration::from_secs(4));
        w.acked(Ev(4, 10), t0 + Duration::from_secs(8));
        assert_eq!((w.len(), w.bytes()), (3, 30));
        // At +12 s the first is 12 s old: gone; 3 (8 s) and 4 (4 s) are handed back, in seq order.
        let copies = w.lost(t0 + Duration::from_secs(12), t0 + Duration::from_secs(12));
        assert_eq!(seqs(&copies), vec![3, 4]);
        assert_eq!(w.len(), 0);
        assert_eq!(w.bytes(), 20, "the copies out still count");
        assert!(
            w.lost(t0 + Duration::from_secs(13), t0 + Duration::from_secs(13))
                .is_empty(),
            "handed back once"
        );
    }

    #[test]
    fn an_entry_exactly_as_old_as_the_span_is_still_handed_back() {
        let t0 = Instant::now();
        let mut w = plain(1000);
        w.acked(Ev(1, 1), t0);
        w.expire(t0 + SPAN);
        assert_eq!(w.len(), 1);
        w.expire(t0 + SPAN + Duration::from_nanos(1));
        assert_eq!((w.len(), w.bytes()), (0, 0));
    }

    #[test]
    fn beyond_the_budget_the_oldest_leave_early_and_are_counted() {
        let t0 = Instant::now();
        let mut w = plain(100);
        for seq in 1..=3 {
            assert_eq!(w.acked(Ev(seq, 30), t0 + Duration::from_secs(seq as u64)), 0);
        }
        assert_eq!(w.bytes(), 90);
        // 50 more: the two oldest (1 and 2) make room.
        assert_eq!(w.acked(Ev(9, 50), t0 + Duration::from_secs(5)), 2);
        assert_eq!(w.bytes(), 80);
        assert_eq!(
            seqs(&w.lost(t0 + Duration::from_secs(6), t0 + Duration::from_secs(6))),
            vec![3, 9]
        );
        // Larger than the room the copies out leave: not kept, counted; the copies out are not evicted.
        assert_eq!(w.acked(Ev(10, 21), t0 + Duration::from_secs(7)), 1);
        assert_eq!(w.bytes(), 80);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn copies_count_until_acknowledged_again_or_settled() {
        let t0 = Instant::now();
        let mut w = plain(100);
        w.acked(Ev(1, 40), t0);
        w.acked(Ev(2, 40), t0);
        assert_eq!(seqs(&w.lost(t0, t0)), vec![1, 2]);
        // While both copies are out, a new entry only fits in what they leave.
        assert_eq!(w.acked(Ev(3, 40), t0), 1, "no room: the new one leaves at once");
        assert_eq!(w.bytes(), 80);
        // The broker takes copy 1 again, at +20 s: an entry again, from then.
        w.acked(Ev(1, 40), t0 + Duration::from_secs(20));
        assert_eq!((w.len(), w.bytes()), (1, 80));
        // Copy 2 refused: settled, no longer counted, and not handed back by the next loss.
        w.settled(2);
        assert_eq!(w.bytes(), 40);
        assert_eq!(
            seqs(&w.lost(t0 + Duration::from_secs(25), t0 + Duration::from_secs(25))),
            vec![1]
        );
        w.settled(2);
        assert_eq!(w.bytes(), 40, "settling twice is harmless");
    }

    #[test]
    fn the_same_row_acknowledged_again_is_one_entry() {
        let t0 = Instant::now();
        let mut w = plain(100);
        w.acked(Ev(1, 30), t0);
        w.acked(Ev(1, 30), t0 + Duration::from_secs(9));
        assert_eq!((w.len(), w.bytes()), (1, 30));
        // Aged from the second acknowledgement.
        assert_eq!(
            seqs(&w.lost(t0 + Duration::from_secs(15), t0 + Duration::from_secs(15))),
            vec![1]
        );
    }

    #[test]
    fn a_loss_is_counted_back_from_the_last_packet_heard_not_from_when_it_was_noticed() {
        let t0 = Instant::now();
        let mut w = plain(1000);
        w.acked(Ev(1, 10), t0);
        w.acked(Ev(2, 10), t0 + Duration::from_secs(4));
        w.acked(Ev(3, 10), t0 + Duration::from_secs(9));
        // The broker was last heard at +9 s (and died then); the loss is noticed a keep-alive later, at +20 s:
        // everything acknowledged within the span before +9 s goes again, though older than the span at +20 s.
        let heard = t0 + Duration::from_secs(9);
        let copies = w.lost(heard, t0 + Duration::from_secs(20));
        assert_eq!(seqs(&copies), vec![1, 2, 3]);
        assert_eq!(w.bytes(), 30);
    }

    #[test]
    fn a_loss_hands_back_what_was_acknowledged_after_the_last_packet_heard_and_drops_the_old() {
        let t0 = Instant::now();
        let mut w = plain(1000);
        w.acked(Ev(1, 10), t0);
        w.acked(Ev(2, 10), t0 + Duration::from_secs(12));
        w.acked(Ev(3, 10), t0 + Duration::from_secs(15));
        // Heard at +11 s: 1 is 11 s older (gone); 2 and 3, acknowledged after it, go again all the same.
        let copies = w.lost(t0 + Duration::from_secs(11), t0 + Duration::from_secs(16));
        assert_eq!(seqs(&copies), vec![2, 3]);
        assert_eq!((w.len(), w.bytes()), (0, 20));
    }

    #[test]
    fn an_event_that_cannot_fit_beside_the_copies_out_evicts_nothing() {
        let t0 = Instant::now();
        let mut w = plain(100);
        w.acked(Ev(1, 40), t0);
        assert_eq!(seqs(&w.lost(t0, t0)), vec![1]);
        w.acked(Ev(2, 20), t0);
        w.acked(Ev(3, 20), t0);
        assert_eq!((w.len(), w.bytes()), (2, 80));
        // 61 bytes beside the 40 of the copy out: it could not fit even in an empty window. Counted as the one
        // that left; the entries stay.
        assert_eq!(w.acked(Ev(4, 61), t0), 1);
        assert_eq!((w.len(), w.bytes()), (2, 80));
        // 60 fits once both entries leave.
        assert_eq!(w.acked(Ev(5, 60), t0), 2);
        assert_eq!((w.len(), w.bytes()), (1, 100));
    }

    #[test]
    fn each_entry_costs_a_fixed_overhead_so_tiny_events_are_bounded_too() {
        let t0 = Instant::now();
        let budget = 10 * (WINDOW_ENTRY_OVERHEAD + 1);
        let mut w = Window::new(SPAN, budget);
        let mut evicted = 0;
        for seq in 0..100 {
            evicted += w.acked(Ev(seq, 1), t0);
        }
        assert_eq!(
            w.len(),
            10,
            "an entry of 1 byte costs {} bytes",
            WINDOW_ENTRY_OVERHEAD + 1
        );
        assert_eq!(w.bytes(), budget);
        assert_eq!(evicted, 90);
        // The copies out are counted with the same overhead.
        assert_eq!(seqs(&w.lost(t0, t0)), (90..100).collect::<Vec<_>>());
        assert_eq!(w.bytes(), budget);
        w.settled(99);
        assert_eq!(w.bytes(), budget - WINDOW_ENTRY_OVERHEAD - 1);
    }

    #[test]
    fn a_zero_span_keeps_nothing() {
        let t0 = Instant::now();
        let mut w = Window::with_overhead(Duration::ZERO, 100, 0);
        assert_eq!(w.acked(Ev(1, 30), t0), 0);
        assert_eq!((w.len(), w.bytes()), (0, 0));
        assert!(w.lost(t0, t0).is_empty());
    }
}

#[cfg(test)]
mod model;
