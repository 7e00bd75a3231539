//! The table driven against a model client and broker: events submitted (some twice), the client sending
//! the oldest queued request under a packet id from a small range (so ids are reused, even while one is in
//! flight), the broker answering per packet id in order (success, no subscribers, a permanent or a transient
//! refusal), the connection lost and made again, scheduled retries, and time passing.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::tests::Ev;
use super::*;

#[derive(Debug, Clone, Copy)]
enum Reply {
    Success,
    NoSubscribers,
    /// 0x87 not authorised.
    NotAuthorized,
    /// 0x80 unspecified error, 0x97 quota exceeded.
    Transient,
}

#[derive(Debug, Clone)]
enum Op {
    /// The pipeline hands over a new event.
    Submit,
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
    /// The retries due now are sent.
    Retry,
    Advance(Duration),
}

fn op() -> impl Strategy<Value = Op> {
    let reply = prop_oneof![
        4 => Just(Reply::Success),
        1 => Just(Reply::NoSubscribers),
        1 => Just(Reply::NotAuthorized),
        3 => Just(Reply::Transient),
    ];
    prop_oneof![
        4 => Just(Op::Submit),
        1 => any::<usize>().prop_map(Op::Resubmit),
        1 => any::<usize>().prop_map(Op::Replay),
        5 => (1u16..4).prop_map(Op::Outgoing),
        5 => (any::<usize>(), reply).prop_map(|(nth, reply)| Op::PubAck { nth, reply }),
        1 => (1u16..6).prop_map(Op::Stray),
        1 => Just(Op::Reconnect),
        2 => Just(Op::Retry),
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
    /// Submitted and accepted, not yet reported: must be exactly what the table holds.
    open: BTreeSet<i64>,
    /// Per seq: how many times it was accepted, and what was reported for it, in order.
    accepted: HashMap<i64, u32>,
    reports: BTreeMap<i64, Vec<Report>>,
    /// Requests queued to the client, oldest first.
    queue: VecDeque<i64>,
    /// Publishes on the wire, as (packet id, seq), in the order sent.
    wire: Vec<(u16, i64)>,
    /// Per seq, publishes sent on this connection, and retries granted (RetryLater) not yet sent.
    sent: HashMap<i64, u32>,
    granted: Vec<(Instant, i64)>,
    /// Transient refusals per seq since it was accepted, across connections.
    transient: HashMap<i64, u32>,
}

impl World {
    fn new() -> World {
        World {
            u: Unacked::new(),
            now: Instant::now(),
            next_seq: 1,
            open: BTreeSet::new(),
            accepted: HashMap::new(),
            reports: BTreeMap::new(),
            queue: VecDeque::new(),
            wire: Vec::new(),
            sent: HashMap::new(),
            granted: Vec::new(),
            transient: HashMap::new(),
        }
    }

    /// (c): one publish per event per connection, plus one per retry granted and come due.
    fn send(&mut self, seq: i64, retry: bool) {
        let sent = self.sent.entry(seq).or_insert(0);
        *sent += 1;
        if retry {
            let i = self
                .granted
                .iter()
                .position(|(at, s)| *s == seq && *at <= self.now)
                .unwrap_or_else(|| panic!("(c) {seq} sent again with no retry due"));
            self.granted.remove(i);
        } else {
            assert_eq!(*sent, 1, "(c) {seq} sent twice on one connection");
        }
        self.queue.push_back(seq);
    }

    fn submit(&mut self, seq: i64) {
        let fresh = !self.open.contains(&seq);
        match self.u.submit(Ev(seq)) {
            Submit::Send => {
                assert!(fresh, "(c) {seq} accepted again while unacknowledged");
                self.open.insert(seq);
                *self.accepted.entry(seq).or_insert(0) += 1;
                self.transient.remove(&seq);
                self.sent.remove(&seq);
                self.send(seq, false);
            }
            Submit::Duplicate => assert!(!fresh, "{seq} refused as a duplicate but not unacknowledged"),
        }
    }

    fn puback(&mut self, nth: usize, reply: Reply) {
        if self.wire.is_empty() {
            return;
        }
        let (pkid, _) = self.wire[nth % self.wire.len()];
        let oldest = self.wire.iter().position(|(p, _)| *p == pkid).expect("present");
        let (_, seq) = self.wire.remove(oldest);
        assert!(self.open.contains(&seq), "{seq} on the wire but not unacknowledged");
        let class = match reply {
            Reply::Success | Reply::NoSubscribers => AckClass::Success,
            Reply::NotAuthorized => AckClass::Permanent,
            Reply::Transient => AckClass::Transient,
        };
        let verdict = self.u.on_puback(pkid, class, self.now);
        let report = match (reply, verdict) {
            (Reply::Transient, Some(Verdict::RetryLater { seq: s, attempt, at })) => {
                let n = self.transient.entry(seq).or_insert(0);
                *n += 1;
                assert_eq!((s, attempt), (seq, *n), "retry of the wrong event or count");
                assert!(*n < TRANSIENT_ATTEMPTS);
                assert_eq!(at, self.now + retry_delay(attempt));
                self.granted.push((at, seq));
                return;
            }
            (Reply::Transient, Some(Verdict::Refused(e))) => {
                assert_eq!(e.0, seq, "(b) refused {} for a PUBACK to {seq}", e.0);
                assert_eq!(self.transient.get(&seq).copied().unwrap_or(0) + 1, TRANSIENT_ATTEMPTS);
                Report::Refused
            }
            (Reply::NotAuthorized, Some(Verdict::Refused(e))) => {
                assert_eq!(e.0, seq, "(b) refused {} for a PUBACK to {seq}", e.0);
                Report::Refused
            }
            (Reply::Success | Reply::NoSubscribers, Some(Verdict::Acked(e))) => {
                assert_eq!(e.0, seq, "(b) acknowledged {} for a PUBACK to {seq}", e.0);
                Report::Acked
            }
            (reply, verdict) => panic!("(b) {reply:?} to {seq} gave {verdict:?}"),
        };
        self.open.remove(&seq);
        self.transient.remove(&seq);
        self.reports.entry(seq).or_default().push(report);
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Submit => {
                let seq = self.next_seq;
                self.next_seq += 1;
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
                self.sent.clear();
                let resend = self.u.reconnect();
                let expected: Vec<i64> = self.open.iter().copied().collect();
                assert_eq!(
                    resend, expected,
                    "(d) the resend is every unacknowledged event, in seq order"
                );
                for seq in resend {
                    self.send(seq, false);
                }
            }
            Op::Retry => {
                let due_before: usize = self.granted.iter().filter(|(at, _)| *at <= self.now).count();
                let due = self.u.due_retries(self.now);
                assert_eq!(due.len(), due_before, "a retry that came due was not handed back");
                for seq in due {
                    assert!(self.open.contains(&seq));
                    self.send(seq, true);
                }
            }
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
        assert_eq!(self.u.next_retry(), self.granted.iter().map(|(at, _)| *at).min());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// (a)-(d) at every step, and at the end, on a healthy connection, everything is acknowledged.
    #[test]
    fn nothing_lost_nothing_early_no_stray_resend(ops in prop::collection::vec(op(), 1..200)) {
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
            w.apply(Op::Advance(Duration::from_secs(61)));
            w.apply(Op::Retry);
        }
        prop_assert!(w.open.is_empty(), "never acknowledged: {:?}", w.open);
        prop_assert!(w.u.is_empty());
        prop_assert!(w.reports.values().flatten().count() as u32 == w.accepted.values().sum::<u32>());
    }
}
