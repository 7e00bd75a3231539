//! The window driven against a naive model: events acknowledged (some again, as copies) with sizes that
//! fill the budget, time passing, connections lost and copies refused. The model keeps
//! its entries in a plain map and scans it, and checks at every step:
//! (a) the bytes counted are exactly those of the entries and the copies out, never above the budget;
//! (b) an entry leaves only by age (older than the span) or, when an acknowledgement needs room, as the
//!     oldest, and each one that leaves early is counted;
//! (c) a loss hands back, in seq order, exactly the entries acknowledged within the span before it;
//! (d) a copy stays counted until it is acknowledged again (an entry again, aged from then) or settled.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::tests::Ev;
use super::*;

const SPAN: Duration = Duration::from_secs(10);
const BUDGET: u64 = 200;

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
    Lost,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0i64..30, 1u64..80).prop_map(|(seq, size)| Op::Ack(seq, size)),
        2 => any::<usize>().prop_map(Op::AckCopy),
        1 => any::<usize>().prop_map(Op::Settle),
        3 => (0u64..4000).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
        1 => Just(Op::Expire),
        1 => Just(Op::Lost),
    ]
}

struct World {
    w: Window<Ev>,
    now: Instant,
    /// seq -> (acknowledged at, size).
    entries: BTreeMap<i64, (Instant, u64)>,
    /// Copies out: seq -> size.
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
        let mut expected = 0;
        let kept: u64 = self.entries.values().map(|(_, n)| n).sum::<u64>() + self.out.values().sum::<u64>();
        let mut kept = kept;
        let mut fits = true;
        while kept + size > BUDGET {
            // (b): the oldest leaves (ties by seq, as acknowledged at the same instant).
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(s, (at, _))| (*at, **s))
                .map(|(s, _)| *s);
            match oldest {
                Some(s) => {
                    let (at, n) = self.entries.remove(&s).expect("present");
                    assert!(self.young(at), "(b) only a young entry is counted as leaving early");
                    kept -= n;
                    expected += 1;
                }
                None => {
                    expected += 1;
                    fits = false;
                    break;
                }
            }
        }
        if fits {
            self.entries.insert(seq, (self.now, size));
        }
        assert_eq!(got, expected, "(b) entries that left early for {seq} ({size} bytes)");
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Ack(seq, size) => self.ack(seq, size),
            Op::AckCopy(n) if !self.out.is_empty() => {
                let (&seq, &size) = self.out.iter().nth(n % self.out.len()).expect("in range");
                self.ack(seq, size);
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
            Op::Lost => {
                let copies = self.w.lost(self.now);
                self.expire();
                let expected: Vec<i64> = self.entries.keys().copied().collect();
                let got: Vec<i64> = copies.iter().map(|e| e.0).collect();
                assert_eq!(got, expected, "(c) a loss hands back the young entries, in seq order");
                for e in copies {
                    assert_eq!(Some(e.1), self.entries.get(&e.0).map(|(_, n)| *n), "(c) the same event");
                    self.out.insert(e.0, e.1);
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
