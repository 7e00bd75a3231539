//! The tracker driven against a model outbox: ids taken from a sequence commit out of order or roll back,
//! rows leave when completed and dead letters come back, and the pipeline's reads (cursor, gap re-reads, the
//! idle look, the sweep) interleave with all of that and with time passing, past GAP_FAST and GAP_FORGET.
//! The reads are written the way the pipeline makes them, against what the model says is in the outbox.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    /// A writer takes the next id from the sequence; its transaction is open.
    Allocate,
    /// The n-th open transaction (modulo how many are open) commits, or rolls back.
    Commit(usize),
    Rollback(usize),
    /// The cursor read, with this limit.
    CursorRead(usize),
    /// `gaps_due`, then the read of those ids.
    GapRead,
    /// The idle path's last look: the cursor read and the young gaps at once.
    IdleRead(usize),
    /// The sweep, paging `page` ids at a time, stopping once `cap` are missing (the batch size).
    Sweep {
        page: usize,
        cap: usize,
    },
    /// The sweep with a full gap re-read between its listing and its fetch (they are separate statements):
    /// its fetch then returns rows that were dispatched meanwhile.
    SplitSweep {
        page: usize,
        cap: usize,
    },
    /// The n-th outstanding id leaves the outbox: deleted after its PUBACK, or dead-lettered.
    Complete {
        nth: usize,
        dead: bool,
    },
    /// The n-th dead letter is put back in the outbox with its id.
    Replay(usize),
    Advance(Duration),
}

fn advance() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..10).prop_map(Duration::from_millis),
        (0u64..3000).prop_map(Duration::from_millis),
        Just(GAP_FAST),
        Just(GAP_FORGET),
        (1u64..120).prop_map(Duration::from_secs),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Allocate),
        4 => any::<usize>().prop_map(Op::Commit),
        1 => any::<usize>().prop_map(Op::Rollback),
        3 => (1usize..6).prop_map(Op::CursorRead),
        2 => Just(Op::GapRead),
        2 => (1usize..6).prop_map(Op::IdleRead),
        1 => (1usize..5, 1usize..8).prop_map(|(page, cap)| Op::Sweep { page, cap }),
        1 => (1usize..5, 1usize..8).prop_map(|(page, cap)| Op::SplitSweep { page, cap }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(nth, dead)| Op::Complete { nth, dead }),
        1 => any::<usize>().prop_map(Op::Replay),
        3 => advance().prop_map(Op::Advance),
    ]
}

struct World {
    t: Tracker,
    start: Instant,
    now: Instant,
    next_id: i64,
    open: Vec<i64>,
    committed: BTreeSet<i64>,
    /// Committed rows still in the outbox: what every read sees.
    outbox: BTreeSet<i64>,
    /// Dispatched and not completed, by the model's count.
    outstanding: BTreeSet<i64>,
    dead: BTreeSet<i64>,
    /// The first id a cursor read returned: ids below it were never passed over by the cursor.
    first_read: Option<i64>,
}

impl World {
    fn new() -> World {
        let start = Instant::now();
        World {
            t: Tracker::new(start),
            start,
            now: start,
            next_id: 1,
            open: Vec::new(),
            committed: BTreeSet::new(),
            outbox: BTreeSet::new(),
            outstanding: BTreeSet::new(),
            dead: BTreeSet::new(),
            first_read: None,
        }
    }

    /// `SELECT … WHERE id > cursor ORDER BY id LIMIT n`
    fn read_after(&self, limit: usize) -> Vec<i64> {
        self.outbox.range(self.t.cursor() + 1..).take(limit).copied().collect()
    }

    /// `SELECT … WHERE id = ANY(ids) ORDER BY id`
    fn read_ids(&self, ids: &[i64]) -> Vec<i64> {
        let wanted: BTreeSet<i64> = ids.iter().copied().collect();
        wanted.intersection(&self.outbox).copied().collect()
    }

    fn take(&mut self, read: Vec<i64>, from_cursor_read: bool) {
        if from_cursor_read && self.first_read.is_none() {
            self.first_read = read.first().copied();
        }
        let dispatched = self.t.observe(read.iter().copied(), from_cursor_read, self.now);
        // The pipeline pairs them with the rows it read by walking both in order.
        let in_read_order: Vec<i64> = read.iter().copied().filter(|id| dispatched.contains(id)).collect();
        assert_eq!(dispatched, in_read_order, "not a subsequence of the read");
        for id in dispatched {
            assert!(
                self.committed.contains(&id),
                "(b) dispatched {id}, which never committed"
            );
            assert!(
                self.outstanding.insert(id),
                "(a) dispatched {id} again while outstanding"
            );
        }
        for id in read {
            assert!(
                self.outstanding.contains(&id),
                "read {id} and neither dispatched it nor had it"
            );
        }
    }

    fn sweep(&mut self, page: usize, cap: usize) {
        let missing = self.sweep_listing(page, cap);
        if !missing.is_empty() {
            let rows = self.read_ids(&missing);
            self.take(rows, false);
        }
    }

    fn sweep_listing(&self, page: usize, cap: usize) -> Vec<i64> {
        let mut after = 0;
        let mut missing = Vec::new();
        loop {
            let cursor = self.t.cursor();
            let ids: Vec<i64> = self
                .outbox
                .range(after + 1..)
                .take_while(|id| **id <= cursor)
                .take(page)
                .copied()
                .collect();
            let done = ids.len() < page;
            if let Some(last) = ids.last() {
                after = *last;
            }
            missing.extend(self.t.sweep_missing(&ids));
            if done || missing.len() >= cap {
                break;
            }
        }
        missing
    }

    fn gap_read(&mut self) {
        if let Some(ids) = self.t.gaps_due(self.now) {
            assert!(!ids.is_empty(), "an empty re-read is not due");
            let rows = self.read_ids(&ids);
            self.take(rows, false);
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Allocate => {
                self.open.push(self.next_id);
                self.next_id += 1;
            }
            Op::Commit(n) if !self.open.is_empty() => {
                let id = self.open.remove(n % self.open.len());
                self.committed.insert(id);
                self.outbox.insert(id);
            }
            Op::Rollback(n) if !self.open.is_empty() => {
                self.open.remove(n % self.open.len());
            }
            Op::Commit(_) | Op::Rollback(_) => {}
            Op::CursorRead(limit) => {
                let rows = self.read_after(limit);
                self.take(rows, true);
            }
            Op::GapRead => self.gap_read(),
            Op::IdleRead(limit) => {
                let young = self.t.young_gaps(self.now);
                let rows = self.read_after(limit);
                let late = self.read_ids(&young);
                self.take(rows, true);
                self.take(late, false);
            }
            Op::Sweep { page, cap } => self.sweep(page, cap),
            Op::SplitSweep { page, cap } => {
                let missing = self.sweep_listing(page, cap);
                let gaps = self.read_ids(&self.t.gap_ids());
                self.take(gaps, false);
                let rows = self.read_ids(&missing);
                self.take(rows, false);
            }
            Op::Complete { nth, dead } if !self.outstanding.is_empty() => {
                let id = *self
                    .outstanding
                    .iter()
                    .nth(nth % self.outstanding.len())
                    .expect("in range");
                assert!(
                    self.t.complete(id),
                    "(d) completed {id}, which the tracker never dispatched"
                );
                self.outstanding.remove(&id);
                self.outbox.remove(&id);
                if dead {
                    self.dead.insert(id);
                }
            }
            Op::Complete { .. } => {}
            Op::Replay(n) if !self.dead.is_empty() => {
                let id = *self.dead.iter().nth(n % self.dead.len()).expect("in range");
                self.dead.remove(&id);
                self.outbox.insert(id);
            }
            Op::Replay(_) => {}
            Op::Advance(d) => self.now += d,
        }
        self.check();
    }

    /// (d), and what the tracker's other claims rest on.
    fn check(&self) {
        assert_eq!(self.t.outstanding_len(), self.outstanding.len());
        for id in &self.outstanding {
            assert!(
                self.t.is_outstanding(*id),
                "{id} dispatched, not completed, and not outstanding"
            );
        }
        for gap in self.t.gap_ids() {
            assert!(
                gap < self.t.cursor(),
                "gap {gap} not below the cursor {}",
                self.t.cursor()
            );
            assert!(!self.outstanding.contains(&gap), "gap {gap} is outstanding");
        }
        let cursor = self.t.cursor();
        assert!(
            cursor == 0 || self.committed.contains(&cursor),
            "the cursor {cursor} is not a row's id"
        );
    }

    fn commit_all(&mut self) {
        while !self.open.is_empty() {
            self.apply(Op::Commit(0));
        }
    }

    fn drain_cursor(&mut self) {
        loop {
            let rows = self.read_after(5);
            let n = rows.len();
            self.take(rows, true);
            if n < 5 {
                break;
            }
        }
    }

    fn not_dispatched(&self, above: i64) -> Vec<i64> {
        self.outbox
            .range(above + 1..)
            .filter(|id| !self.outstanding.contains(id))
            .copied()
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// (a) (b) (d) at every step; (c) nothing lost: once every transaction has ended, reads and sweeps as
    /// the pipeline makes them dispatch every committed row still in the outbox.
    #[test]
    fn nothing_dispatched_twice_nothing_invented_nothing_lost(ops in prop::collection::vec(op(), 1..200)) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
        }
        w.commit_all();
        loop {
            let before = w.outstanding.len();
            w.drain_cursor();
            w.apply(Op::Advance(GAP_SLOW_EVERY));
            w.gap_read();
            w.sweep(3, 5);
            if w.outstanding.len() == before {
                break;
            }
        }
        prop_assert_eq!(w.not_dispatched(0), Vec::<i64>::new(), "committed and never dispatched");
    }

    /// Without any sweep, the gap re-reads alone find every row that commits within GAP_FORGET of being
    /// passed over (the sweep is for what commits later, and for what lies below the first read).
    #[test]
    fn gaps_alone_find_late_commits(ops in prop::collection::vec(op(), 1..200)) {
        let mut w = World::new();
        let horizon = GAP_FORGET - GAP_SLOW_EVERY - Duration::from_secs(1);
        for op in ops {
            match op {
                Op::Advance(d) if w.now + d - w.start >= horizon => {}
                Op::Sweep { .. } | Op::SplitSweep { .. } | Op::Replay(_) => {}
                op => w.apply(op),
            }
        }
        w.commit_all();
        w.drain_cursor();
        w.apply(Op::Advance(GAP_SLOW_EVERY));
        w.gap_read();
        w.drain_cursor();
        let floor = w.first_read.unwrap_or(0);
        prop_assert_eq!(w.not_dispatched(floor), Vec::<i64>::new(), "passed over and not found again");
    }
}
