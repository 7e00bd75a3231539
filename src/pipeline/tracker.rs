//! The outbox cursor and its gaps: which ids were skipped and must be looked at again, and which ids are
//! outstanding (read, not yet deleted or dead-lettered). Pure bookkeeping, so that the reasoning a loss or an
//! ordering bug would hide in can be tested against a model of out-of-order commits: no I/O, and no clock of
//! its own (the caller passes the time and each read's snapshot in).
//!
//! Outbox ids come from a sequence taken at commit, so they commit out of id order: a read (committed rows
//! with id > cursor, in id order, up to a limit) can pass an id whose transaction is still committing. Such a
//! skipped id becomes a gap, and every later read fetches the open gaps AND the rows after the cursor in one
//! statement, so in one snapshot and in id order. That is what keeps one row's events in commit order: a
//! later change of a row can only commit after the earlier one (it waits for the row lock), so any snapshot
//! that sees the later change sees the earlier one too, and both are dispatched from the same read, the
//! earlier (lower id) first. Reading the gaps in a separate statement would break exactly that. A read is
//! bounded (the room the caller has left): it returns the lowest ids of that union, so every row it leaves
//! is above every row it returns, and a later change it returns never overtakes an earlier one it left; the
//! gaps above its last row were not looked at, and stay open for the next read.
//!
//! A gap is closed when it is read, or when a read proves it never will be: the transaction that could
//! hold it had its transaction id before the read that skipped it ran (it wrote its business row before it
//! took the outbox id), so its id is below that read's `next_xid`; once a snapshot's `xmin` reaches that
//! value, every such transaction has ended, and a gap still not visible in that snapshot was rolled back.
//! A gap open for [`GAP_FORGET`] (a transaction stuck in its commit, or an `xmin` held back by a session
//! left idle in a transaction) is given up to the caller's periodic sweep of the ids <= cursor that are not
//! outstanding, which also finds what else escapes (more than [`MAX_GAPS`] open gaps, a row replayed from
//! the dead letters, rows a previous leader left) — possibly after a later change of the same row. It must
//! never hand out an outstanding id again: that row's event is still on its way to the broker.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

pub(crate) use crate::capture::outbox::Snapshot;

/// Gaps younger than this are probably commits in flight: the caller polls quickly while there are any.
const GAP_FAST: Duration = Duration::from_secs(2);
/// A gap not settled by then is left to the sweep (see the module's paragraph).
const GAP_FORGET: Duration = Duration::from_secs(60);
pub(crate) const GAP_FAST_EVERY: Duration = Duration::from_millis(5);
/// At most this many ids are tracked per jump of the cursor (and below the first row read); the sweep
/// covers the rest.
const GAP_MAX_JUMP: i64 = 1000;
/// Open gaps kept at most (the oldest, lowest ids are given to the sweep beyond it): only a transaction
/// that stays open while thousands of ids commit past it gets here.
const MAX_GAPS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Gap {
    /// When the id was first skipped (for the caller's polling pace only).
    since: Instant,
    /// The `next_xid` of the read that skipped it: once a snapshot's `xmin` reaches it, the gap is settled.
    horizon: i64,
}

pub(crate) struct Tracker {
    /// Highest id returned by a read.
    cursor: i64,
    /// Ids dispatched and not yet completed: never dispatched twice by this process.
    outstanding: HashSet<i64>,
    /// Skipped ids not yet read nor settled.
    gaps: BTreeMap<i64, Gap>,
}

impl Tracker {
    pub(crate) fn new() -> Tracker {
        Tracker {
            cursor: 0,
            outstanding: HashSet::new(),
            gaps: BTreeMap::new(),
        }
    }

    /// Where the next read's rows after the cursor start (exclusive).
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

    /// Every open gap: each read fetches them together with the rows after the cursor.
    pub(crate) fn gap_ids(&self) -> Vec<i64> {
        self.gaps.keys().copied().collect()
    }

    /// Records what one read returned — of the rows for the open gaps and the rows after the cursor, the
    /// `limit` lowest, in id order, all from the snapshot `snap` — and returns the ids to dispatch now, in the
    /// same order: those not already outstanding, which become outstanding. Ids the read passed over become
    /// gaps; gaps the snapshot settles are closed (only those the read looked at: when it returned `limit`
    /// rows, the gaps below its last row).
    pub(crate) fn observe(
        &mut self,
        ids: impl IntoIterator<Item = i64>,
        snap: Snapshot,
        limit: usize,
        now: Instant,
    ) -> Vec<i64> {
        let mut dispatch = Vec::new();
        let (mut count, mut last) = (0, None);
        for id in ids {
            count += 1;
            last = Some(id);
            if id > self.cursor {
                // Below the very first row read there may be commits in flight too: the same window.
                let from = if self.cursor > 0 {
                    (self.cursor + 1).max(id - GAP_MAX_JUMP)
                } else {
                    (id - GAP_MAX_JUMP).max(1)
                };
                for gap in from..id {
                    self.gaps.entry(gap).or_insert(Gap {
                        since: now,
                        horizon: snap.next_xid,
                    });
                }
                self.cursor = id;
            }
            self.gaps.remove(&id);
            if self.outstanding.insert(id) {
                dispatch.push(id);
            }
        }
        // Every open gap the read looked at is not in it: settled if no transaction that could still commit it
        // remains. Gaps opened by this read carry its own next_xid: settled now if nothing ran. A read cut at
        // `limit` rows did not look above its last row.
        let looked_upto = match last {
            Some(last) if count >= limit => last,
            _ => i64::MAX,
        };
        self.gaps.retain(|id, g| {
            (*id > looked_upto || g.horizon > snap.xmin) && now.saturating_duration_since(g.since) < GAP_FORGET
        });
        while self.gaps.len() > MAX_GAPS {
            self.gaps.pop_first();
        }
        dispatch
    }

    /// Records rows the sweep read (ids at or below the cursor) and returns those to dispatch.
    pub(crate) fn observe_swept(&mut self, ids: impl IntoIterator<Item = i64>) -> Vec<i64> {
        ids.into_iter()
            .filter(|id| {
                self.gaps.remove(id);
                self.outstanding.insert(*id)
            })
            .collect()
    }

    /// The row left the outbox (deleted after its PUBACK, or moved to the dead letters): if it comes back
    /// (a replayed dead letter), it is new again. Returns whether it was outstanding.
    pub(crate) fn complete(&mut self, id: i64) -> bool {
        self.outstanding.remove(&id)
    }

    /// Whether a recently skipped id is still open: probably a commit in flight, worth polling for soon.
    pub(crate) fn has_young_gaps(&self, now: Instant) -> bool {
        self.gaps
            .values()
            .any(|g| now.saturating_duration_since(g.since) < GAP_FAST)
    }

    /// Of the ids the sweep found at or below the cursor, those to read again: every one not outstanding,
    /// open gaps included (a replayed dead letter, a row a previous leader left, a gap beyond [`MAX_GAPS`]).
    pub(crate) fn sweep_missing<'a>(&'a self, ids: &'a [i64]) -> impl Iterator<Item = i64> + 'a {
        ids.iter().copied().filter(|id| !self.outstanding.contains(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot with transactions `xmin..next_xid` possibly running.
    fn snap(xmin: i64, next_xid: i64) -> Snapshot {
        Snapshot { xmin, next_xid }
    }

    #[test]
    fn the_first_read_watches_below_itself_too() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        assert_eq!(t.observe([5, 6, 9], snap(10, 12), 1000, t0), vec![5, 6, 9]);
        assert_eq!(t.cursor(), 9);
        // 1..4 below the first row, 7 and 8 passed over: a commit may be in flight for any of them.
        assert_eq!(t.gap_ids(), vec![1, 2, 3, 4, 7, 8]);
        // The next read's snapshot shows every transaction older than the first read's next_xid ended.
        assert!(t.observe([], snap(12, 13), 1000, t0).is_empty());
        assert!(t.gap_ids().is_empty());
    }

    #[test]
    fn nothing_running_means_nothing_to_wait_for() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe([1], snap(5, 5), 1000, t0);
        assert_eq!(t.observe([4], snap(5, 5), 1000, t0), vec![4]);
        assert!(t.gap_ids().is_empty(), "no transaction could still commit 2 or 3");
    }

    #[test]
    fn a_gap_stays_open_while_its_writer_may_commit_and_is_read_with_what_follows() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe([1], snap(5, 5), 1000, t0);
        // Transaction 5 holds id 2 and is committing: 3 is visible first.
        assert_eq!(t.observe([3], snap(5, 7), 1000, t0), vec![3]);
        assert_eq!(t.gap_ids(), vec![2]);
        assert!(t.has_young_gaps(t0));
        // Still running: the gap stays, and is read with every read.
        t.observe([], snap(5, 8), 1000, t0 + Duration::from_secs(30));
        assert_eq!(t.gap_ids(), vec![2]);
        assert!(!t.has_young_gaps(t0 + Duration::from_secs(30)));
        // It commits, and the same row changes again (id 4): one read returns both, in id order.
        assert_eq!(t.observe([2, 4], snap(8, 9), 1000, t0), vec![2, 4]);
        assert!(t.gap_ids().is_empty());
        assert_eq!(t.cursor(), 4);
    }

    #[test]
    fn a_rolled_back_gap_is_settled_by_the_snapshot() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe([1], snap(5, 5), 1000, t0);
        t.observe([3], snap(5, 7), 1000, t0);
        // xmin 6 < horizon 7: transaction 6 may hold it.
        t.observe([], snap(6, 8), 1000, t0);
        assert_eq!(t.gap_ids(), vec![2]);
        // xmin 7: everything that could hold id 2 ended, and it is not there: rolled back.
        t.observe([], snap(7, 8), 1000, t0);
        assert!(t.gap_ids().is_empty());
    }

    #[test]
    fn a_gap_held_open_too_long_is_left_to_the_sweep() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe([1], snap(5, 5), 1000, t0);
        t.observe([3], snap(5, 7), 1000, t0);
        t.observe([], snap(5, 8), 1000, t0 + GAP_FORGET - Duration::from_millis(1));
        assert_eq!(t.gap_ids(), vec![2]);
        t.observe([], snap(5, 8), 1000, t0 + GAP_FORGET);
        assert!(t.gap_ids().is_empty());
        assert_eq!(t.sweep_missing(&[1, 2, 3]).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn an_outstanding_id_is_never_dispatched_again() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        assert_eq!(t.observe([1, 2], snap(3, 3), 1000, t0), vec![1, 2]);
        assert!(t.observe_swept([1, 2]).is_empty());
        assert_eq!(t.sweep_missing(&[1, 2]).count(), 0);
        assert_eq!(t.outstanding_len(), 2);
        // Completed (deleted or dead-lettered): a replay brings it back, and then it is new.
        assert!(t.complete(1));
        assert!(!t.complete(1), "completing twice is harmless");
        assert_eq!(t.sweep_missing(&[1, 2]).collect::<Vec<_>>(), vec![1]);
        assert_eq!(t.observe_swept([1]), vec![1]);
    }

    #[test]
    fn the_sweep_rereads_open_gaps_too() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe([1], snap(3, 3), 1000, t0);
        t.observe([3], snap(3, 4), 1000, t0);
        assert_eq!(t.gap_ids(), vec![2]);
        assert_eq!(t.sweep_missing(&[1, 2, 3]).collect::<Vec<_>>(), vec![2]);
        assert_eq!(t.observe_swept([2]), vec![2]);
        assert!(t.gap_ids().is_empty());
    }

    #[test]
    fn a_read_cut_at_its_limit_leaves_the_gaps_above_its_last_row_open() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe([1], snap(5, 5), 1000, t0);
        // Transactions 5 and 6 commit ids 2 to 5 while 6 is read first.
        assert_eq!(t.observe([6], snap(5, 7), 1000, t0), vec![6]);
        assert_eq!(t.gap_ids(), vec![2, 3, 4, 5]);
        // Everything has committed (xmin 7), but the read was cut at 2 rows: 4 and 5 were not looked at.
        assert_eq!(t.observe([2, 3], snap(7, 8), 2, t0), vec![2, 3]);
        assert_eq!(
            t.gap_ids(),
            vec![4, 5],
            "not settled by a read that did not look at them"
        );
        // The next read, not cut, returns them; had one been rolled back, it would be settled now.
        assert_eq!(t.observe([4], snap(7, 8), 2, t0), vec![4]);
        assert!(t.gap_ids().is_empty(), "5 was looked at and is not there: rolled back");
    }

    #[test]
    fn a_long_jump_tracks_only_its_last_ids() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe([1], snap(3, 3), 1000, t0);
        t.observe([5000], snap(3, 9), 1000, t0);
        let gaps = t.gap_ids();
        assert_eq!(gaps.len() as i64, GAP_MAX_JUMP);
        assert_eq!(gaps.first(), Some(&(5000 - GAP_MAX_JUMP)));
        assert_eq!(gaps.last(), Some(&4999));
    }

    #[test]
    fn open_gaps_are_bounded() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe([1], snap(3, 3), 1000, t0);
        let mut id = 1;
        for _ in 0..(MAX_GAPS / 500 + 5) {
            id += 501;
            t.observe([id], snap(3, 9), 1000, t0);
        }
        assert_eq!(t.gap_ids().len(), MAX_GAPS);
        assert_eq!(
            t.gap_ids().last(),
            Some(&(id - 1)),
            "the newest kept, the oldest left to the sweep"
        );
    }
}

#[cfg(test)]
mod model;
