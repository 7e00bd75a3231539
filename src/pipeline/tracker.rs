//! The outbox cursor and its gaps: which ids were skipped and must be looked at again, and which ids are
//! outstanding (read, not yet deleted or dead-lettered). Pure bookkeeping, so that the reasoning a loss bug
//! would hide in can be tested against a model of out-of-order commits: no I/O, and no clock of its own
//! (the caller passes the time in).
//!
//! Outbox ids come from a sequence taken before commit, so they commit out of id order: the cursor read
//! (committed rows with id > cursor, in id order, up to a limit) can pass an id whose transaction is still
//! open. Such a skipped id becomes a gap, re-read every few milliseconds while young (its writer is probably
//! committing right now), then every second, and forgotten after [`GAP_FORGET`]; what commits later still
//! is found by the caller's periodic sweep of the ids <= cursor that are not outstanding. It must never hand
//! out an outstanding id again: that row's event is still on its way to the broker.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// How long a skipped id is re-read quickly (a concurrent writer about to commit), then slowly.
const GAP_FAST: Duration = Duration::from_secs(2);
pub(crate) const GAP_FAST_EVERY: Duration = Duration::from_millis(5);
const GAP_SLOW_EVERY: Duration = Duration::from_secs(1);
const GAP_FORGET: Duration = Duration::from_secs(60);
/// At most this many ids are tracked per jump of the cursor; the sweep covers the rest.
const GAP_MAX_JUMP: i64 = 1000;

pub(crate) struct Tracker {
    /// Highest id returned by a cursor read.
    cursor: i64,
    /// Ids dispatched and not yet completed: never dispatched twice by this process.
    outstanding: HashSet<i64>,
    /// Skipped ids, with when they were first skipped.
    gaps: BTreeMap<i64, Instant>,
    last_gap_check: Instant,
    last_young_check: Instant,
}

impl Tracker {
    pub(crate) fn new(now: Instant) -> Tracker {
        Tracker {
            cursor: 0,
            outstanding: HashSet::new(),
            gaps: BTreeMap::new(),
            last_gap_check: now,
            last_young_check: now,
        }
    }

    /// Where the next cursor read starts (exclusive).
    pub(crate) fn cursor(&self) -> i64 {
        self.cursor
    }

    pub(crate) fn outstanding_len(&self) -> usize {
        self.outstanding.len()
    }

    #[cfg(test)]
    fn is_outstanding(&self, id: i64) -> bool {
        self.outstanding.contains(&id)
    }

    #[cfg(test)]
    fn gap_ids(&self) -> Vec<i64> {
        self.gaps.keys().copied().collect()
    }

    /// Records the ids one read returned, in the order read, and returns those to dispatch now (in the
    /// same order): the ones not already outstanding, which become outstanding. `from_cursor_read`: the
    /// rows came from the cursor read, so ids it passed over become gaps and the cursor moves.
    pub(crate) fn observe(
        &mut self,
        ids: impl IntoIterator<Item = i64>,
        from_cursor_read: bool,
        now: Instant,
    ) -> Vec<i64> {
        let mut dispatch = Vec::new();
        for id in ids {
            if from_cursor_read && id > self.cursor {
                // Before the first read there is nothing to have skipped: what lies below it is the
                // sweep's (which runs at once when this replica starts to lead).
                if self.cursor > 0 {
                    let from = (self.cursor + 1).max(id - GAP_MAX_JUMP);
                    for gap in from..id {
                        self.gaps.entry(gap).or_insert(now);
                    }
                }
                self.cursor = id;
            }
            self.gaps.remove(&id);
            if self.outstanding.insert(id) {
                dispatch.push(id);
            }
        }
        self.gaps.retain(|_, t| now.saturating_duration_since(*t) < GAP_FORGET);
        dispatch
    }

    /// The row left the outbox (deleted after its PUBACK, or moved to the dead letters): if it comes back
    /// (a replayed dead letter), it is new again. Returns whether it was outstanding.
    pub(crate) fn complete(&mut self, id: i64) -> bool {
        self.outstanding.remove(&id)
    }

    /// Skipped ids young enough that a writer is probably committing them right now.
    pub(crate) fn young_gaps(&self, now: Instant) -> Vec<i64> {
        self.gaps
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) < GAP_FAST)
            .map(|(id, _)| *id)
            .collect()
    }

    pub(crate) fn has_young_gaps(&self, now: Instant) -> bool {
        self.gaps.values().any(|t| now.saturating_duration_since(*t) < GAP_FAST)
    }

    /// The gaps to re-read now, if any: the young ones every few milliseconds, all of them every second.
    pub(crate) fn gaps_due(&mut self, now: Instant) -> Option<Vec<i64>> {
        if self.gaps.is_empty() {
            return None;
        }
        if now.saturating_duration_since(self.last_gap_check) >= GAP_SLOW_EVERY {
            self.last_gap_check = now;
            self.last_young_check = now;
            return Some(self.gaps.keys().copied().collect());
        }
        if now.saturating_duration_since(self.last_young_check) >= GAP_FAST_EVERY {
            let young = self.young_gaps(now);
            self.last_young_check = now;
            return (!young.is_empty()).then_some(young);
        }
        None
    }

    /// Of the ids the sweep found at or below the cursor, those to read again: every one not outstanding,
    /// known gaps included (a late commit, a replayed dead letter, a row a previous leader left).
    pub(crate) fn sweep_missing<'a>(&'a self, ids: &'a [i64]) -> impl Iterator<Item = i64> + 'a {
        ids.iter().copied().filter(|id| !self.outstanding.contains(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_read_skips_nothing() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        assert_eq!(t.observe([5, 6, 9], true, t0), vec![5, 6, 9]);
        assert_eq!(t.cursor(), 9);
        // 7 and 8 were passed over by this read: they are gaps. 1..4 lie below the first read: the sweep's.
        assert_eq!(t.gap_ids(), vec![7, 8]);
    }

    #[test]
    fn skipped_ids_become_gaps_until_read() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.observe([1], true, t0);
        assert_eq!(t.observe([4], true, t0), vec![4]);
        assert_eq!(t.gap_ids(), vec![2, 3]);
        assert_eq!(t.young_gaps(t0), vec![2, 3]);
        // A gap read does not move the cursor.
        assert_eq!(t.observe([3], false, t0 + ms(5)), vec![3]);
        assert_eq!(t.cursor(), 4);
        assert_eq!(t.gap_ids(), vec![2]);
    }

    #[test]
    fn an_outstanding_id_is_never_dispatched_again() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        assert_eq!(t.observe([1, 2], true, t0), vec![1, 2]);
        assert!(t.observe([1, 2], false, t0).is_empty());
        assert_eq!(t.sweep_missing(&[1, 2]).count(), 0);
        assert_eq!(t.outstanding_len(), 2);
        // Completed (deleted or dead-lettered): a replay brings it back, and then it is new.
        assert!(t.complete(1));
        assert!(!t.complete(1), "completing twice is harmless");
        assert_eq!(t.sweep_missing(&[1, 2]).collect::<Vec<_>>(), vec![1]);
        assert_eq!(t.observe([1], false, t0), vec![1]);
    }

    #[test]
    fn the_sweep_rereads_known_gaps_too() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.observe([1, 3], true, t0);
        assert_eq!(t.gap_ids(), vec![2]);
        assert_eq!(t.sweep_missing(&[1, 2, 3]).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn young_gaps_often_all_gaps_every_second() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        assert_eq!(t.gaps_due(t0 + ms(10)), None, "no gaps, nothing due");
        t.observe([1, 3], true, t0);
        assert_eq!(t.gaps_due(t0 + ms(10)), Some(vec![2]));
        assert_eq!(t.gaps_due(t0 + ms(12)), None, "young ones every 5 ms");
        assert_eq!(t.gaps_due(t0 + ms(15)), Some(vec![2]));
        // Once old, only the slow pass reads it.
        t.observe([6], true, t0 + ms(2500));
        assert_eq!(t.young_gaps(t0 + ms(2500)), vec![4, 5]);
        assert!(t.has_young_gaps(t0 + ms(2500)));
        assert_eq!(
            t.gaps_due(t0 + ms(2500)),
            Some(vec![2, 4, 5]),
            "a second since the last full pass"
        );
        assert_eq!(t.gaps_due(t0 + ms(2505)), Some(vec![4, 5]));
        assert_eq!(t.gaps_due(t0 + ms(5000)), Some(vec![2, 4, 5]));
        assert!(!t.has_young_gaps(t0 + ms(5000)));
        assert_eq!(t.gaps_due(t0 + ms(5005)), None, "nothing young");
    }

    #[test]
    fn gaps_are_forgotten_after_a_minute() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.observe([1, 3], true, t0);
        t.observe([], true, t0 + GAP_FORGET - ms(1));
        assert_eq!(t.gap_ids(), vec![2]);
        t.observe([], true, t0 + GAP_FORGET);
        assert!(t.gap_ids().is_empty());
        assert_eq!(t.gaps_due(t0 + GAP_FORGET + GAP_SLOW_EVERY), None);
    }

    #[test]
    fn a_long_jump_tracks_only_its_last_ids() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.observe([1], true, t0);
        t.observe([5000], true, t0);
        let gaps = t.gap_ids();
        assert_eq!(gaps.len() as i64, GAP_MAX_JUMP);
        assert_eq!(gaps.first(), Some(&(5000 - GAP_MAX_JUMP)));
        assert_eq!(gaps.last(), Some(&4999));
    }

    #[test]
    fn a_gap_that_was_read_is_not_a_gap_again() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.observe([1, 3], true, t0);
        t.observe([2], false, t0);
        // A cursor read never returns ids at or below the cursor, but if one did it must not reopen gaps.
        t.observe([2, 3], true, t0);
        assert!(t.gap_ids().is_empty());
        assert_eq!(t.cursor(), 3);
    }
}

#[cfg(test)]
mod model;
