//! The window driven against a naive model: events acknowledged (some again, as copies) with sizes that
//! fill the budget, time passing, connections lost and copies refused. The model keeps
//! its entries in a plain map and scans it, and checks at every step:
//! (a) the bytes counted are exactly those of the entries and the copies out, never above the budget;
//! (b) an entry leaves only by age (older than the span) or, when an acknowledgement needs room, as the
//!     oldest, and each one that leaves early is counted; an event that cannot fit beside the copies out
//!     makes nothing leave and is counted as the one that left;
//! (c) a loss hands back, in seq order, exactly the entries acknowledged within the span before the last packet
//!     heard (which may be a while before the loss is noticed), or after it;
//! (d) a copy stays counted until it is acknowledged again (an entry again, aged from then) or settled.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::tests::Ev;
use super::*;

const SPAN: Duration = Duration::from_secs(10);
/// Room for a few entries with their overhead (the service's [`WINDOW_ENTRY_OVERHEAD`]).
const BUDGET: u64 = 3 * WINDOW_ENTRY_OVERHEAD + 200;

/// What the window counts for an entry of `size` bytes.
fn cost(size: u64) -> u64 {
    size + WINDOW_ENTRY_OVERHEAD
}

#[derive(Debug, Clone)]
enum Op {
    /// The broker acknowledges an event (seq, size): a new one, or one of the same row again.
    Ack(i64, u64),
    /// It acknowledges the n-th copy out.
    AckCopy(usize),
    /// The n-th copy out is refused, or handed over again as a new event.
    Settle(usize),
    Advance(Duration),
    Expire,
    /// The connection is lost, noticed now; the broker was last heard this long before.
    Lost(Duration),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0i64..30, 1u64..300).prop_map(|(seq, size)| Op::Ack(seq, size)),
        2 => any::<usize>().prop_map(Op::AckCopy),
        1 => any::<usize>().prop_map(Op::Settle),
        3 => (0u64..4000).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
        1 => Just(Op::Expire),
        1 => (0u64..6000).prop_map(|ms| Op::Lost(Duration::from_millis(ms))),
    ]
}

struct World {
    w: Window<Ev>,
    now: Instant,
    /// seq -> (acknowledged at, cost).
    entries: BTreeMap<i64, (Instant, u64)>,
    /// Copies out: seq -> cost.
    out: BTreeMap<i64, u64>,
}

impl World {
    fn young(&self, at: Instant) -> bool {
        self.now.checked_sub(SPAN).is_none_or(|cutoff| at >= cutoff)
    }

    fn expire(&mut self) {
        let now = self.now;
        self.entries
            .retain(|_, (at, _)| now.checked_sub(SPAN).is_none_or(|cutoff| *at >= cutoff));
    }

    fn ack(&mut self, seq: i64, size: u64) {
        let got = self.w.acked(Ev(seq, size), self.now);
        self.entries.remove(&seq);
        self.out.remove(&seq);
        self.expire();
        let size = cost(size);
        let out: u64 = self.out.values().sum();
        if out + size > BUDGET {
            // (b): it could not fit even in an empty window: nothing leaves, it alone is counted.
            assert_eq!(
                got, 1,
                "(b) {seq} ({size} bytes) does not fit beside {out} bytes of copies out"
            );
            return;
        }
        let mut expected = 0;
        let mut kept = self.entries.values().map(|(_, n)| n).sum::<u64>() + out;
        while kept + size > BUDGET {
            // (b): the oldest leaves (ties by seq, as acknowledged at the same instant).
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(s, (at, _))| (*at, **s))
                .map(|(s, _)| *s)
                .expect("the copies out leave room, so entries remain while it does not fit");
            let (at, n) = self.entries.remove(&oldest).expect("present");
            assert!(self.young(at), "(b) only a young entry is counted as leaving early");
            kept -= n;
            expected += 1;
        }
        self.entries.insert(seq, (self.now, size));
        assert_eq!(got, expected, "(b) entries that left early for {seq} ({size} bytes)");
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Ack(seq, size) => self.ack(seq, size),
            Op::AckCopy(n) if !self.out.is_empty() => {
                let (&seq, &c) = self.out.iter().nth(n % self.out.len()).expect("in range");
                self.ack(seq, c - WINDOW_ENTRY_OVERHEAD);
            }
            Op::Settle(n) if !self.out.is_empty() => {
                let seq = *self.out.keys().nth(n % self.out.len()).expect("in range");
                self.w.settled(seq);
                self.out.remove(&seq);
            }
            Op::AckCopy(_) | Op::Settle(_) => {}
            Op::Advance(d) => self.now += d,
            Op::Expire => {
                self.w.expire(self.now);
                self.expire();
            }
            Op::Lost(back) => {
                let heard = self.now.checked_sub(back).unwrap_or(self.now);
                let copies = self.w.lost(heard, self.now);
                let from = heard.checked_sub(SPAN);
                let expected: Vec<i64> = self
                    .entries
                    .iter()
                    .filter(|(_, (at, _))| from.is_none_or(|from| *at >= from))
                    .map(|(s, _)| *s)
                    .collect();
                let got: Vec<i64> = copies.iter().map(|e| e.0).collect();
                assert_eq!(
                    got, expected,
                    "(c) a loss hands back the entries young at the last packet heard, in seq order"
                );
                for e in copies {
                    let kept = self.entries.get(&e.0).map(|(_, n)| *n);
                    assert_eq!(Some(cost(e.1)), kept, "(c) the same event");
                    self.out.insert(e.0, cost(e.1));
                }
                self.entries.clear();
            }
        }
        self.check();
    }

    /// (a), (d).
    fn check(&self) {
        let counted: u64 = self.entries.values().map(|(_, n)| n).sum::<u64>() + self.out.values().sum::<u64>();
        assert_eq!(self.w.bytes(), counted, "(a)(d) bytes counted");
        assert!(self.w.bytes() <= BUDGET, "(a) over the budget: {}", self.w.bytes());
        assert_eq!(self.w.len(), self.entries.len(), "(b) entries held");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// (a)-(d) at every step.
    #[test]
    fn entries_leave_by_age_or_for_room_and_a_loss_hands_back_the_recent_ones(ops in prop::collection::vec(op(), 1..200)) {
        let mut world = World {
            w: Window::new(SPAN, BUDGET),
            now: Instant::now(),
            entries: BTreeMap::new(),
            out: BTreeMap::new(),
        };
        for op in ops {
            world.apply(op);
        }
        // Whatever happened, everything that is not a copy out leaves once it is old.
        world.now += SPAN + Duration::from_nanos(1);
        world.apply(Op::Expire);
        prop_assert_eq!(world.w.len(), 0);
        prop_assert_eq!(world.w.bytes(), world.out.values().sum::<u64>());
    }
}
