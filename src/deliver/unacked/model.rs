//! The table driven against a model client and broker: events submitted (some twice) on a few topics, the
//! client sending the oldest queued request under a packet id from a small range (so ids are reused, even
//! while one is in flight), the broker answering per packet id in order (success, no subscribers, not
//! authorised, a permanent or a transient refusal), the connection lost and made again, what is due sent,
//! and time passing. The publisher's side of the protocol is followed: while paused it takes a new event
//! only when the table wants one as a probe.
//!
//! The model keeps its own account of what is held, released by a success, granted a retry or probing, and
//! checks at every step:
//! (a) nothing lost: each accepted event is unacknowledged (held ones included) or was reported once;
//! (b) every verdict is for the event the PUBACK was paired with, and says what its reply means;
//! (c) no duplicate: an event is never queued while a copy is queued or in flight on the same connection,
//!     and every send has a reason (new, a retry that came due, released by a success, a probe, a reconnect);
//! (d) every batch the table hands back (reconnect, due) is in seq order; a reconnect resends exactly what is
//!     unacknowledged and neither held nor refused as not authorised with no success since (nothing while
//!     paused): the first at once, the rest after the next PUBACK, with no new event taken in between;
//! (e) a refusal as not authorised is final exactly when a success came after the event's previous refusal
//!     (nothing refused for good without a success seen after its refusal), else the event is held;
//! (f) paused exactly when PAUSE_AFTER distinct events were refused since the last success; a success
//!     releases every held event;
//! (g) no storm: at most one probe in flight, probes PROBE_EVERY apart, a probe is the oldest held event or a
//!     new event on a topic with nothing unacknowledged, and while paused nothing but probes is sent.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::tests::Ev;
use super::*;

const TOPICS: [&str; 3] = ["t0", "t1", "t2"];

#[derive(Debug, Clone, Copy)]
enum Reply {
    Success,
    NoSubscribers,
    /// 0x87 not authorised.
    NotAuthorized,
    /// 0x90 topic name invalid.
    Invalid,
    /// 0x80 unspecified error, 0x97 quota exceeded.
    Transient,
}

#[derive(Debug, Clone)]
enum Op {
    /// The pipeline hands over a new event on the n-th topic.
    Submit(usize),
    /// It hands over the n-th unacknowledged one again.
    Resubmit(usize),
    /// It hands over the n-th one already reported (a replayed dead letter).
    Replay(usize),
    /// The client sends the oldest queued request as this packet id.
    Outgoing(u16),
    /// The broker answers the oldest publish in flight with the packet id of the n-th one in flight.
    PubAck {
        nth: usize,
        reply: Reply,
    },
    /// A PUBACK for a packet id with nothing in flight.
    Stray(u16),
    /// The connection is lost; a new one (clean start) republishes.
    Reconnect,
    /// What is due now is sent.
    Due,
    Advance(Duration),
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        4 => Just(Reply::Success),
        1 => Just(Reply::NoSubscribers),
        3 => Just(Reply::NotAuthorized),
        1 => Just(Reply::Invalid),
        2 => Just(Reply::Transient),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..TOPICS.len()).prop_map(Op::Submit),
        1 => any::<usize>().prop_map(Op::Resubmit),
        1 => any::<usize>().prop_map(Op::Replay),
        5 => (1u16..4).prop_map(Op::Outgoing),
        5 => (any::<usize>(), reply()).prop_map(|(nth, reply)| Op::PubAck { nth, reply }),
        1 => (1u16..6).prop_map(Op::Stray),
        1 => Just(Op::Reconnect),
        2 => Just(Op::Due),
        2 => prop_oneof![
            (0u64..2000).prop_map(Duration::from_millis),
            (1u64..70).prop_map(Duration::from_secs),
        ]
        .prop_map(Op::Advance),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    Acked,
    Refused,
}

struct World {
    u: Unacked<Ev>,
    now: Instant,
    next_seq: i64,
    topic: HashMap<i64, &'static str>,
    /// Submitted and accepted, not yet reported: must be exactly what the table holds.
    open: BTreeSet<i64>,
    /// Per seq: how many times it was accepted, and what was reported for it, in order.
    accepted: HashMap<i64, u32>,
    reports: BTreeMap<i64, Vec<Report>>,
    /// Requests queued to the client, oldest first.
    queue: VecDeque<i64>,
    /// Publishes on the wire, as (packet id, seq), in the order sent.
    wire: Vec<(u16, i64)>,
    /// Retries granted (RetryLater) not yet sent.
    granted: Vec<(Instant, i64)>,
    /// Transient refusals per seq since it was accepted, across connections.
    transient: HashMap<i64, u32>,
    /// Success verdicts so far, and per seq refused as not authorised the count at its last refusal.
    successes: u64,
    refused_at: HashMap<i64, u64>,
    /// Distinct events refused since the last success, and whether that paused publishing.
    streak: usize,
    paused: bool,
    /// Held (not in flight), and released by a success but not yet handed back.
    held: BTreeSet<i64>,
    released: BTreeSet<i64>,
    /// The probe in flight, and when the last probe went.
    probe: Option<i64>,
    last_probe: Option<Instant>,
    /// The rest of a reconnect's resend, waiting for a PUBACK.
    rest: BTreeSet<i64>,
}

impl World {
    fn new() -> World {
        World {
            u: Unacked::new(),
            now: Instant::now(),
            next_seq: 1,
            topic: HashMap::new(),
            open: BTreeSet::new(),
            accepted: HashMap::new(),
            reports: BTreeMap::new(),
            queue: VecDeque::new(),
            wire: Vec::new(),
            granted: Vec::new(),
            transient: HashMap::new(),
            successes: 0,
            refused_at: HashMap::new(),
            streak: 0,
            paused: false,
            held: BTreeSet::new(),
            released: BTreeSet::new(),
            probe: None,
            last_probe: None,
            rest: BTreeSet::new(),
        }
    }

    fn ev(&self, seq: i64) -> Ev {
        Ev(seq, self.topic[&seq])
    }

    /// (c): never a second copy on one connection.
    fn send(&mut self, seq: i64) {
        assert!(
            !self.queue.contains(&seq) && !self.wire.iter().any(|(_, s)| *s == seq),
            "(c) {seq} sent while a copy is queued or in flight"
        );
        assert!(!self.held.contains(&seq), "(c) {seq} sent while held");
        self.queue.push_back(seq);
    }

    /// (g): a probe goes now.
    fn probe_goes(&mut self, seq: i64) {
        assert_eq!(self.probe, None, "(g) a second probe in flight");
        if let Some(last) = self.last_probe {
            assert!(self.now >= last + PROBE_EVERY, "(g) probes {:?} apart", self.now - last);
        }
        self.probe = Some(seq);
        self.last_probe = Some(self.now);
    }

    /// The publisher takes a new event (or one again), as it does: always while not paused; while paused
    /// only when the table wants one as a probe.
    fn submit(&mut self, seq: i64) {
        if !self.u.accepting() && !self.u.wants_fresh(self.now) {
            return;
        }
        let fresh = !self.open.contains(&seq);
        let probe_wanted = self.u.wants_fresh(self.now);
        let topic = self.topic[&seq];
        let clear = !self.open.iter().any(|s| self.topic[s] == topic);
        match self.u.submit(self.ev(seq), self.now) {
            Submit::Send => {
                assert!(fresh, "(c) {seq} accepted again while unacknowledged");
                self.accept(seq);
                if self.paused {
                    assert!(probe_wanted && clear, "(g) {seq} sent while paused, not as a probe");
                    self.probe_goes(seq);
                }
                self.send(seq);
            }
            Submit::Held => {
                assert!(fresh, "(c) {seq} accepted again while unacknowledged");
                assert!(self.paused, "held on submit while not paused");
                assert!(
                    !(probe_wanted && clear),
                    "(g) {seq} on a free topic not taken as the probe"
                );
                self.accept(seq);
                self.held.insert(seq);
            }
            Submit::Duplicate => assert!(!fresh, "{seq} refused as a duplicate but not unacknowledged"),
        }
    }

    fn accept(&mut self, seq: i64) {
        self.open.insert(seq);
        *self.accepted.entry(seq).or_insert(0) += 1;
        self.transient.remove(&seq);
        self.refused_at.remove(&seq);
    }

    fn puback(&mut self, nth: usize, reply: Reply) {
        if self.wire.is_empty() {
            return;
        }
        let (pkid, _) = self.wire[nth % self.wire.len()];
        let oldest = self.wire.iter().position(|(p, _)| *p == pkid).expect("present");
        let (_, seq) = self.wire.remove(oldest);
        assert!(self.open.contains(&seq), "{seq} on the wire but not unacknowledged");
        if self.probe == Some(seq) {
            self.probe = None;
        }
        let class = match reply {
            Reply::Success | Reply::NoSubscribers => AckClass::Success,
            Reply::NotAuthorized => AckClass::NotAuthorized,
            Reply::Invalid => AckClass::Permanent,
            Reply::Transient => AckClass::Transient,
        };
        let verdict = self.u.on_puback(pkid, class, self.now);
        let report = self.verdict(seq, reply, verdict);
        // (d): a PUBACK lets the rest of the resend go (held instead if publishing is paused now).
        let rest = std::mem::take(&mut self.rest);
        if self.paused {
            self.held.extend(rest);
        } else {
            self.released.extend(rest);
        }
        let Some(report) = report else { return };
        self.open.remove(&seq);
        self.transient.remove(&seq);
        self.refused_at.remove(&seq);
        self.released.remove(&seq);
        self.reports.entry(seq).or_default().push(report);
    }

    /// Checks a verdict and keeps the model's account; the report, if the event is no longer ours.
    fn verdict(&mut self, seq: i64, reply: Reply, verdict: Option<Verdict<Ev>>) -> Option<Report> {
        Some(match (reply, verdict) {
            (Reply::Transient, Some(Verdict::RetryLater { seq: s, attempt, at })) => {
                let n = self.transient.entry(seq).or_insert(0);
                *n += 1;
                assert_eq!((s, attempt), (seq, *n), "retry of the wrong event or count");
                assert!(*n < TRANSIENT_ATTEMPTS);
                assert_eq!(at, self.now + retry_delay(attempt));
                self.granted.push((at, seq));
                return None;
            }
            (Reply::Transient, Some(Verdict::Refused(e))) => {
                assert_eq!(e.0, seq, "(b) refused {} for a PUBACK to {seq}", e.0);
                assert_eq!(self.transient.get(&seq).copied().unwrap_or(0) + 1, TRANSIENT_ATTEMPTS);
                Report::Refused
            }
            (Reply::NotAuthorized, Some(Verdict::Held { seq: s })) => {
                assert_eq!(s, seq, "(b) held {s} for a PUBACK to {seq}");
                let previous = self.refused_at.insert(seq, self.successes);
                assert!(
                    previous.is_none_or(|at| at == self.successes),
                    "(e) {seq} held though a success came after its previous refusal"
                );
                if previous.is_none() {
                    self.streak += 1;
                    if self.streak >= PAUSE_AFTER {
                        self.paused = true;
                    }
                }
                self.held.insert(seq);
                return None;
            }
            (Reply::NotAuthorized, Some(Verdict::Refused(e))) => {
                assert_eq!(e.0, seq, "(b) refused {} for a PUBACK to {seq}", e.0);
                let at = self.refused_at.get(&seq).copied();
                assert!(
                    at.is_some_and(|at| at < self.successes),
                    "(e) {seq} refused for good with no success after its refusal ({at:?}, {} successes)",
                    self.successes
                );
                Report::Refused
            }
            (Reply::Invalid, Some(Verdict::Refused(e))) => {
                assert_eq!(e.0, seq, "(b) refused {} for a PUBACK to {seq}", e.0);
                Report::Refused
            }
            (Reply::Success | Reply::NoSubscribers, Some(Verdict::Acked(e))) => {
                assert_eq!(e.0, seq, "(b) acknowledged {} for a PUBACK to {seq}", e.0);
                self.successes += 1;
                self.streak = 0;
                self.paused = false;
                // (f): a success releases every held event.
                self.released.append(&mut self.held);
                Report::Acked
            }
            (reply, verdict) => panic!("(b) {reply:?} to {seq} gave {verdict:?}"),
        })
    }

    fn due(&mut self) {
        let batch = self.u.due(self.now);
        assert!(
            batch.windows(2).all(|w| w[0] < w[1]),
            "(d) due not in seq order: {batch:?}"
        );
        let granted_due: BTreeSet<i64> = self
            .granted
            .iter()
            .filter(|(at, _)| *at <= self.now)
            .map(|(_, s)| *s)
            .collect();
        self.granted.retain(|(at, _)| *at > self.now);
        if self.paused {
            // Only probes go out while paused: a retry that came due is held.
            self.held.extend(granted_due.iter().copied());
        }
        let mut expected: BTreeSet<i64> = std::mem::take(&mut self.released);
        if !self.paused {
            expected.extend(granted_due.iter().copied());
        }
        let extra: Vec<i64> = batch.iter().copied().filter(|s| !expected.contains(s)).collect();
        let missing: Vec<i64> = expected.iter().copied().filter(|s| !batch.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "(f) released or due but not handed back: {missing:?}"
        );
        assert!(extra.len() <= 1, "(g) more than one probe at once: {extra:?}");
        if let Some(&seq) = extra.first() {
            assert_eq!(
                self.held.first(),
                Some(&seq),
                "(g) a probe that is not the oldest held event"
            );
            self.held.remove(&seq);
            self.probe_goes(seq);
        }
        for seq in batch {
            assert!(self.open.contains(&seq));
            self.send(seq);
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Submit(topic) => {
                let seq = self.next_seq;
                if !self.u.accepting() && !self.u.wants_fresh(self.now) {
                    return self.check();
                }
                self.next_seq += 1;
                self.topic.insert(seq, TOPICS[topic]);
                self.submit(seq);
            }
            Op::Resubmit(n) if !self.open.is_empty() => {
                let seq = *self.open.iter().nth(n % self.open.len()).expect("in range");
                let queued = self.queue.len();
                self.submit(seq);
                assert_eq!(self.queue.len(), queued, "(c) a duplicate was queued");
            }
            Op::Replay(n) => {
                let done: Vec<i64> = self
                    .reports
                    .keys()
                    .filter(|s| !self.open.contains(s))
                    .copied()
                    .collect();
                if !done.is_empty() {
                    self.submit(done[n % done.len()]);
                }
            }
            Op::Resubmit(_) => {}
            Op::Outgoing(pkid) => {
                if let Some(seq) = self.queue.pop_front() {
                    self.wire.push((pkid, seq));
                    self.u.on_outgoing(pkid);
                }
            }
            Op::PubAck { nth, reply } => self.puback(nth, reply),
            Op::Stray(pkid) => {
                if !self.wire.iter().any(|(p, _)| *p == pkid) {
                    assert_eq!(self.u.on_puback(pkid, AckClass::Success, self.now), None);
                }
            }
            Op::Reconnect => {
                self.queue.clear();
                self.wire.clear();
                self.granted.clear();
                self.released.clear();
                self.rest.clear();
                self.probe = None;
                let resend = self.u.reconnect(self.now);
                let expected: Vec<i64> = if self.paused {
                    Vec::new()
                } else {
                    self.open
                        .iter()
                        .copied()
                        .filter(|s| !self.held.contains(s) && self.refused_at.get(s) != Some(&self.successes))
                        .collect()
                };
                assert_eq!(
                    resend,
                    expected.iter().copied().take(1).collect::<Vec<_>>(),
                    "(d) the resend is the first of every unacknowledged event neither held nor refused with no \
                     success since, in seq order: {expected:?}"
                );
                for &seq in &self.open {
                    if !expected.contains(&seq) {
                        self.held.insert(seq);
                    }
                }
                self.rest = expected.into_iter().skip(1).collect();
                for seq in resend {
                    self.send(seq);
                }
            }
            Op::Due => self.due(),
            Op::Advance(d) => self.now += d,
        }
        self.check();
    }

    /// (a): each accepted event is unacknowledged or was reported once, and the table agrees.
    fn check(&self) {
        assert_eq!(self.u.len(), self.open.len());
        assert_eq!(self.u.is_empty(), self.open.is_empty());
        for seq in &self.open {
            assert!(self.u.contains(*seq), "(a) lost {seq}");
        }
        for (seq, n) in &self.accepted {
            let reported = self.reports.get(seq).map_or(0, Vec::len) as u32;
            let open = u32::from(self.open.contains(seq));
            assert_eq!(
                *n,
                reported + open,
                "(a) {seq}: accepted {n} times, reported {reported}, open {open}"
            );
        }
        assert_eq!(self.u.held_len(), self.held.len(), "held: {:?}", self.held);
        assert_eq!(self.u.paused_since().is_some(), self.paused, "(f) paused");
        assert_eq!(
            self.u.accepting(),
            !self.paused && self.rest.is_empty(),
            "(d) accepting"
        );
        if let Some(first) = self.granted.iter().map(|(at, _)| *at).min() {
            assert!(self.u.next_due().is_some_and(|t| t <= first), "a granted retry not due");
        }
        if !self.held.is_empty() && self.probe.is_none() {
            assert!(self.u.next_due().is_some(), "held with no probe to come");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// (a)-(g) at every step, and at the end, on a healthy connection, everything is acknowledged.
    #[test]
    fn nothing_lost_nothing_early_no_stray_resend_no_storm(ops in prop::collection::vec(op(), 1..200)) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
        }
        w.apply(Op::Reconnect);
        for round in 0..2 * TRANSIENT_ATTEMPTS {
            while !w.queue.is_empty() {
                w.apply(Op::Outgoing(1 + (round % 3) as u16));
            }
            while !w.wire.is_empty() {
                w.apply(Op::PubAck { nth: 0, reply: Reply::Success });
            }
            w.apply(Op::Due);
            w.apply(Op::Advance(Duration::from_secs(61)));
            w.apply(Op::Due);
        }
        prop_assert!(w.open.is_empty(), "never acknowledged: {:?}", w.open);
        prop_assert!(w.u.is_empty());
        prop_assert!(!w.paused);
        prop_assert!(w.reports.values().flatten().count() as u32 == w.accepted.values().sum::<u32>());
    }
}
