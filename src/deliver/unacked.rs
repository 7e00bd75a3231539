//! The only record of what the broker has not acknowledged: every event handed to the publisher stays here
//! until a PUBACK paired with it says how it ended. Pure bookkeeping, so that the pairing and the
//! republishing a loss bug would hide in can be tested against a model without a broker: no I/O, no MQTT
//! client, and no clock of its own (the caller passes the time in).
//!
//! The client tells us a packet id only when a publish goes out (`Outgoing::Publish(pkid)`, in the order
//! the requests were queued), and packet ids are reused as soon as they are acknowledged, so requests are
//! paired FIFO with outgoing publishes, then FIFO per packet id with PUBACKs. It must never let an event go
//! without a PUBACK for it: after any connection error everything unacknowledged (but what is held, below)
//! is sent again, in seq order, so one row's events keep their order.
//!
//! A refusal as not authorised (0x87) says nothing by itself about whether the topic or the bridge's whole
//! account is refused. PUBACKs come back in the order the broker processed the publishes, so a success after
//! a refusal shows that the account works: the refused event is *held* (kept, not reported) until a success,
//! then sent once more, and refused for good only if it is refused again after that success (topic-specific:
//! it goes to the dead letters). [`PAUSE_AFTER`] distinct events refused with no success in between mean the
//! account itself is refused: publishing is *paused* (the caller takes no new events, see [`accepting`]),
//! and one probe goes out every [`PROBE_EVERY`], alternately the oldest held event and a new event on a topic
//! with nothing unacknowledged (so that a pause caused by one forbidden topic cannot last while other topics
//! work). Any success ends the pause and sends every held event again, in seq order.
//!
//! A broker may close the connection right after a refusal (Mosquitto 2.0.11 with `max_queued_messages 0`
//! does); the client then often fails writing the next publish before it reads the PUBACK, which is lost.
//! So a reconnect never sends a held event (refused with no success since), and sends nothing at all while
//! paused: those wait for a success or a probe. An event in its one more try (refused, then a success) is
//! sent again like any unacknowledged one. And a reconnect sends one event first and the rest only after a
//! PUBACK for it (no new events meanwhile, see [`accepting`]): with a single publish in flight, the PUBACK of
//! a refusal is read before the connection closes, so each reconnect to such a broker learns one verdict
//! instead of losing them all.
//!
//! [`accepting`]: Unacked::accepting

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A refusal the broker may not repeat (overload, quota, an internal error) is retried this many times, with
/// backoff, before the event is refused for good; refusals that will not change (invalid topic or payload)
/// are final at once. Not authorised is neither: see the module documentation.
pub(crate) const TRANSIENT_ATTEMPTS: u32 = 8;

/// Distinct events refused as not authorised with no success in between that pause publishing. One or two
/// refused events in a row are what a single forbidden topic looks like; an account without rights refuses
/// everything in flight, usually far more than three.
pub(crate) const PAUSE_AFTER: usize = 3;

/// While events are held: at most one probe in flight, and one probe per this interval.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(10);

pub(crate) fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}

/// What is published: anything with the outbox id it came from and a topic.
pub(crate) trait Sequenced {
    fn seq(&self) -> i64;
    fn topic(&self) -> &str;
}

/// What a PUBACK's reason code means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckClass {
    /// Delivered (0x00, or 0x10 "no matching subscribers").
    Success,
    /// Refused for now: worth sending again later.
    Transient,
    /// 0x87: the topic, or the whole account, is refused.
    NotAuthorized,
    /// Refused for good.
    Permanent,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Submit {
    /// Recorded and queued: the caller publishes it now.
    Send,
    /// Already unacknowledged here; the copy in flight will be reported.
    Duplicate,
    /// Paused: recorded and held, sent when publishing resumes (or as a probe).
    Held,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict<E> {
    /// A success PUBACK for it: no longer ours.
    Acked(E),
    /// Refused for good (or transiently, once too often): no longer ours.
    Refused(E),
    /// Refused for now; `due` hands it back at `at`.
    RetryLater { seq: i64, attempt: u32, at: Instant },
    /// Refused as not authorised with no success since its previous refusal: still ours, held.
    Held { seq: i64 },
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
    /// Success PUBACKs so far: what "a success since its refusal" is measured against.
    successes: u64,
    /// Per seq refused as not authorised (and still here): `successes` at its last refusal.
    refused_at: HashMap<i64, u64>,
    /// Not in flight, waiting for a success, a probe or the resume: refused events, and events taken while
    /// paused. Seq order.
    held: BTreeSet<i64>,
    /// Held events released by a success, for `due` to hand back.
    released: Vec<i64>,
    /// Distinct events refused as not authorised since the last success.
    streak: usize,
    /// Paused since.
    paused: Option<Instant>,
    /// The probe in flight.
    probe: Option<i64>,
    /// When the next probe may go (while events are held, or paused).
    probe_at: Option<Instant>,
    /// While paused: the next probe is a new event rather than the oldest held one.
    fresh_next: bool,
    /// The rest of a reconnect's resend, until a PUBACK for its first event (or any) on the new connection.
    after_first_ack: Vec<i64>,
    /// Not to be sent on this connection (see [`Unacked::reconnect_only`]): neither queued, in flight nor
    /// held, until [`Unacked::unpark`].
    parked: BTreeSet<i64>,
}

impl<E: Sequenced> Unacked<E> {
    pub(crate) fn new() -> Unacked<E> {
        Unacked {
            events: BTreeMap::new(),
            attempts: HashMap::new(),
            pending_out: VecDeque::new(),
            inflight: HashMap::new(),
            retry_at: Vec::new(),
            successes: 0,
            refused_at: HashMap::new(),
            held: BTreeSet::new(),
            released: Vec::new(),
            streak: 0,
            paused: None,
            probe: None,
            probe_at: None,
            fresh_next: false,
            after_first_ack: Vec::new(),
            parked: BTreeSet::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Events held (not in flight, not reported).
    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Nothing in flight, queued or waiting for a retry: only held (or parked) events are left, which no
    /// PUBACK will settle while nothing else is sent (a caller that drains may stop).
    pub(crate) fn settled(&self) -> bool {
        self.events.len() == self.held.len() + self.parked.len()
    }

    /// Like [`Unacked::settled`], looking only at the entries `wanted` says yes to (the others may be sent or
    /// not).
    pub(crate) fn settled_where(&self, wanted: impl Fn(&E) -> bool) -> bool {
        self.events
            .iter()
            .all(|(seq, e)| self.held.contains(seq) || self.parked.contains(seq) || !wanted(e))
    }

    /// How many entries `which` says yes to.
    pub(crate) fn count_where(&self, which: impl Fn(&E) -> bool) -> usize {
        self.events.values().filter(|e| which(e)).count()
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, seq: i64) -> bool {
        self.events.contains_key(&seq)
    }

    pub(crate) fn get(&self, seq: i64) -> Option<&E> {
        self.events.get(&seq)
    }

    /// The entry itself, to change what it carries (not its seq or topic: the pairing and the order rely on
    /// them).
    pub(crate) fn get_mut(&mut self, seq: i64) -> Option<&mut E> {
        self.events.get_mut(&seq)
    }

    /// When publishing was paused, if it is.
    pub(crate) fn paused_since(&self) -> Option<Instant> {
        self.paused
    }

    /// Whether the caller should take new events: not while paused (except one as a probe when
    /// [`Unacked::wants_fresh`] says so), nor while a reconnect's resend waits for its first PUBACK (they
    /// would overtake it).
    pub(crate) fn accepting(&self) -> bool {
        self.paused.is_none() && self.after_first_ack.is_empty()
    }

    /// Paused, and the probe due now is a new event: the caller takes one, if it has one waiting, and hands
    /// it to `submit` (again, while this holds and it has more waiting, up to a bound of its own: an event
    /// on a topic with something unacknowledged is held, not sent) before calling `due`, which sends the
    /// oldest held event as the probe if no new one went.
    pub(crate) fn wants_fresh(&self, now: Instant) -> bool {
        self.paused.is_some()
            && self.probe.is_none()
            && self.probe_at.is_some_and(|t| t <= now)
            && (self.fresh_next || self.held.is_empty())
    }

    /// Records an event the caller is about to queue to the client, unless it is already here. While paused
    /// it is held instead, unless it is the new-event probe and no unacknowledged event shares its topic (a
    /// row's events share a topic, so a probe never overtakes an older event of its row).
    pub(crate) fn submit(&mut self, event: E, now: Instant) -> Submit {
        let seq = event.seq();
        if self.events.contains_key(&seq) {
            return Submit::Duplicate;
        }
        if self.paused.is_some() {
            let fresh = self.wants_fresh(now);
            let clear = !self.events.values().any(|e| e.topic() == event.topic());
            self.events.insert(seq, event);
            if fresh && clear {
                self.pending_out.push_back(seq);
                self.probe = Some(seq);
                self.probe_at = Some(now + PROBE_EVERY);
                self.fresh_next = false;
                return Submit::Send;
            }
            // Not a probe: held. While the probe is still wanted, the caller may offer the next new event.
            self.held.insert(seq);
            return Submit::Held;
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
    /// Call `due` after it: the held events a success released, and the rest of a reconnect's resend, wait
    /// there.
    pub(crate) fn on_puback(&mut self, pkid: u16, class: AckClass, now: Instant) -> Option<Verdict<E>> {
        let queue = self.inflight.get_mut(&pkid)?;
        let seq = queue.pop_front();
        if queue.is_empty() {
            self.inflight.remove(&pkid);
        }
        let seq = seq?;
        if !self.events.contains_key(&seq) {
            return None;
        }
        let verdict = self.verdict(seq, class, now);
        if self.probe == Some(seq) {
            self.probe = None;
            self.arm_probe(now);
        }
        // The connection answers: the rest of the resend goes (is held, if this paused publishing).
        let rest = std::mem::take(&mut self.after_first_ack);
        if self.paused.is_some() {
            self.held.extend(rest);
            self.arm_probe(now);
        } else {
            self.released.extend(rest);
        }
        verdict
    }

    fn verdict(&mut self, seq: i64, class: AckClass, now: Instant) -> Option<Verdict<E>> {
        match class {
            AckClass::Transient => {
                let n = self.attempts.entry(seq).or_insert(0);
                *n += 1;
                if *n < TRANSIENT_ATTEMPTS {
                    let (attempt, at) = (*n, now + retry_delay(*n));
                    self.retry_at.push((at, seq));
                    return Some(Verdict::RetryLater { seq, attempt, at });
                }
            }
            AckClass::Success => {
                self.successes += 1;
                self.streak = 0;
                self.paused = None;
                self.fresh_next = false;
                self.probe_at = None;
                self.released.extend(std::mem::take(&mut self.held));
            }
            AckClass::NotAuthorized => {
                let previous = self.refused_at.insert(seq, self.successes);
                match previous {
                    // Refused after a success that came after its previous refusal: the topic is refused.
                    Some(at) if at < self.successes => {}
                    // Refused again with no success since (a probe): the account still is.
                    Some(_) => return Some(self.hold(seq, now)),
                    None => {
                        self.streak += 1;
                        if self.streak >= PAUSE_AFTER && self.paused.is_none() {
                            self.paused = Some(now);
                            self.fresh_next = false;
                        }
                        return Some(self.hold(seq, now));
                    }
                }
            }
            AckClass::Permanent => {}
        }
        let event = self.events.remove(&seq)?;
        self.attempts.remove(&seq);
        self.refused_at.remove(&seq);
        Some(match class {
            AckClass::Success => Verdict::Acked(event),
            AckClass::Transient | AckClass::NotAuthorized | AckClass::Permanent => Verdict::Refused(event),
        })
    }

    fn hold(&mut self, seq: i64, now: Instant) -> Verdict<E> {
        self.held.insert(seq);
        self.arm_probe(now);
        Verdict::Held { seq }
    }

    /// Events held or paused, and no probe scheduled or in flight: the next one goes in `PROBE_EVERY`.
    fn arm_probe(&mut self, now: Instant) {
        if self.probe.is_none() && self.probe_at.is_none() && (!self.held.is_empty() || self.paused.is_some()) {
            self.probe_at = Some(now + PROBE_EVERY);
        }
    }

    /// When `due` next has something to hand back (besides what a success released).
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let probe = self.probe_at.filter(|_| self.probe.is_none());
        self.retry_at.iter().map(|(t, _)| *t).chain(probe).min()
    }

    /// What to send now, queued again, in seq order: held events a success released, the refused-for-now
    /// events due at `now` (held instead while paused), and the held probe when one is due. The caller
    /// publishes them, in this order.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<i64> {
        let mut due = std::mem::take(&mut self.released);
        if self.retry_at.iter().any(|(t, _)| *t <= now) {
            let (ready, later): (Vec<_>, Vec<_>) = self.retry_at.drain(..).partition(|(t, _)| *t <= now);
            self.retry_at = later;
            let ready = ready
                .into_iter()
                .map(|(_, seq)| seq)
                .filter(|seq| self.events.contains_key(seq));
            if self.paused.is_some() {
                // Only probes go out while paused.
                self.held.extend(ready);
            } else {
                due.extend(ready);
            }
        }
        if self.probe.is_none() && self.probe_at.is_some_and(|t| t <= now) {
            match self.held.pop_first() {
                Some(seq) => {
                    due.push(seq);
                    self.probe = Some(seq);
                    self.probe_at = Some(now + PROBE_EVERY);
                    self.fresh_next = true;
                }
                None if self.paused.is_some() => {
                    // Nothing held to probe with (the probe was refused for now): a new event next time.
                    self.probe_at = Some(now + PROBE_EVERY);
                    self.fresh_next = true;
                }
                None => self.probe_at = None,
            }
        }
        due.retain(|seq| self.events.contains_key(seq));
        due.sort_unstable();
        due.dedup();
        self.pending_out.extend(&due);
        due
    }

    /// A new connection (clean start): nothing is in flight any more, so every unacknowledged event is
    /// queued again, retries included, except what the broker refused as not authorised with no success
    /// since (held until a success or a probe), and nothing at all while paused (everything is held for the
    /// probe). Only the first goes now, the caller publishes it; `due` hands back the rest, in seq order,
    /// after a PUBACK.
    pub(crate) fn reconnect(&mut self, now: Instant) -> Vec<i64> {
        self.reconnect_only(now, |_| true)
    }

    /// [`Unacked::reconnect`] for the entries `send` says yes to; the others are *parked*: not sent on this
    /// connection (not even as a probe, nor released by a success) until [`Unacked::unpark`], or dropped by
    /// [`Unacked::retain`]. A parked event that was held is held again, if it still has to be, when it is
    /// unparked.
    pub(crate) fn reconnect_only(&mut self, now: Instant, send: impl Fn(&E) -> bool) -> Vec<i64> {
        self.inflight.clear();
        self.retry_at.clear();
        self.released.clear();
        self.after_first_ack.clear();
        self.parked.clear();
        self.probe = None;
        let paused = self.paused.is_some();
        let mut resend = Vec::new();
        for (&seq, e) in &self.events {
            if !send(e) {
                self.held.remove(&seq);
                self.parked.insert(seq);
                continue;
            }
            if self.held.contains(&seq) {
                continue;
            }
            if paused || self.refused_at.get(&seq) == Some(&self.successes) {
                self.held.insert(seq);
            } else {
                resend.push(seq);
            }
        }
        self.arm_probe(now);
        if resend.len() > 1 {
            self.after_first_ack = resend.split_off(1);
        }
        self.pending_out = resend.iter().copied().collect();
        resend
    }

    /// The parked events may go on this connection now: each is held if it has to be (paused, or refused as
    /// not authorised with no success since), else queued; those to publish now are handed back, in seq
    /// order. If the reconnect's resend still waits for its first PUBACK, they wait with it (after it).
    pub(crate) fn unpark(&mut self, now: Instant) -> Vec<i64> {
        let paused = self.paused.is_some();
        let mut send = Vec::new();
        for seq in std::mem::take(&mut self.parked) {
            if !self.events.contains_key(&seq) {
                continue;
            }
            if paused || self.refused_at.get(&seq) == Some(&self.successes) {
                self.held.insert(seq);
            } else {
                send.push(seq);
            }
        }
        self.arm_probe(now);
        if !self.after_first_ack.is_empty() {
            self.after_first_ack.extend(send);
            return Vec::new();
        }
        self.pending_out.extend(&send);
        send
    }

    /// Drops the entries `keep` says no to. Only for entries not queued or in flight on this connection
    /// (parked ones, or between connections): the pairing of what is in flight is not touched.
    pub(crate) fn retain(&mut self, keep: impl Fn(&E) -> bool) -> usize {
        let dropped: Vec<i64> = self.events.iter().filter(|(_, e)| !keep(e)).map(|(s, _)| *s).collect();
        for seq in &dropped {
            self.events.remove(seq);
            self.attempts.remove(seq);
            self.refused_at.remove(seq);
            self.held.remove(seq);
            self.parked.remove(seq);
        }
        let kept = |seq: &i64| dropped.binary_search(seq).is_err();
        self.released.retain(kept);
        self.after_first_ack.retain(kept);
        self.retry_at.retain(|(_, seq)| kept(seq));
        if self.probe.is_some_and(|p| !kept(&p)) {
            self.probe = None;
        }
        dropped.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event: its seq and its topic.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Ev(pub(super) i64, pub(super) &'static str);
    impl Sequenced for Ev {
        fn seq(&self) -> i64 {
            self.0
        }
        fn topic(&self) -> &str {
            self.1
        }
    }

    /// An event on topic "t".
    fn ev(seq: i64) -> Ev {
        Ev(seq, "t")
    }

    /// Copies on topic "c", events of the outbox on topic "e".
    fn copy(e: &Ev) -> bool {
        e.1 == "c"
    }

    #[test]
    fn a_reconnect_that_sends_only_some_parks_the_rest_until_unparked() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        for (seq, topic) in [(1, "e"), (2, "c"), (3, "e"), (4, "c")] {
            u.submit(Ev(seq, topic), t0);
        }
        // Standing by: the copies go (the first at once, the other after a PUBACK), the events are parked.
        assert_eq!(u.reconnect_only(t0, copy), vec![2]);
        assert!(!u.settled(), "a copy is in flight");
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Success, t0), Some(Verdict::Acked(Ev(2, "c"))));
        assert_eq!(u.due(t0), vec![4], "the rest of the resend: copies only");
        u.on_outgoing(2);
        assert_eq!(u.on_puback(2, AckClass::Success, t0), Some(Verdict::Acked(Ev(4, "c"))));
        assert!(u.due(t0).is_empty(), "a success releases no parked event");
        assert!(u.settled(), "only parked events left: a drain may stop");
        assert!(u.settled_where(copy));
        assert_eq!(u.count_where(|e| !copy(e)), 2);
        // The lead comes: the parked events go, in seq order.
        assert_eq!(u.unpark(t0), vec![1, 3]);
        assert!(!u.settled());
        u.on_outgoing(3);
        u.on_outgoing(4);
        assert_eq!(u.on_puback(3, AckClass::Success, t0), Some(Verdict::Acked(Ev(1, "e"))));
        assert_eq!(u.on_puback(4, AckClass::Success, t0), Some(Verdict::Acked(Ev(3, "e"))));
        assert!(u.is_empty());
    }

    #[test]
    fn unparked_events_wait_behind_a_resend_that_waits_for_its_first_puback() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        for (seq, topic) in [(1, "c"), (2, "c"), (3, "e")] {
            u.submit(Ev(seq, topic), t0);
        }
        assert_eq!(u.reconnect_only(t0, copy), vec![1]);
        assert!(u.unpark(t0).is_empty(), "they would overtake the resend");
        assert!(!u.accepting());
        u.on_outgoing(1);
        u.on_puback(1, AckClass::Success, t0);
        assert_eq!(u.due(t0), vec![2, 3]);
        assert!(u.accepting());
    }

    #[test]
    fn a_parked_event_held_as_not_authorised_stays_held_when_unparked() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        u.submit(Ev(1, "e"), t0);
        u.on_outgoing(1);
        assert_eq!(
            u.on_puback(1, AckClass::NotAuthorized, t0),
            Some(Verdict::Held { seq: 1 })
        );
        u.submit(Ev(2, "c"), t0);
        assert_eq!(u.reconnect_only(t0, copy), vec![2]);
        assert!(u.unpark(t0).is_empty(), "refused with no success since: held again");
        assert_eq!(u.held_len(), 1);
    }

    #[test]
    fn retain_drops_the_parked_events_and_keeps_the_copies_in_flight() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        for (seq, topic) in [(1, "e"), (2, "c"), (3, "e")] {
            u.submit(Ev(seq, topic), t0);
        }
        assert_eq!(u.reconnect_only(t0, copy), vec![2]);
        u.on_outgoing(9);
        // A new term: the events of the old one go, the copy in flight stays paired.
        assert_eq!(u.retain(copy), 2);
        assert_eq!(u.len(), 1);
        assert!(u.unpark(t0).is_empty(), "nothing parked any more");
        assert_eq!(u.on_puback(9, AckClass::Success, t0), Some(Verdict::Acked(Ev(2, "c"))));
        assert!(u.is_empty() && u.settled());
    }

    #[test]
    fn acknowledged_in_the_order_they_went_out() {
        let now = Instant::now();
        let mut u = Unacked::new();
        assert_eq!(u.submit(ev(1), now), Submit::Send);
        assert_eq!(u.submit(ev(2), now), Submit::Send);
        assert_eq!(u.submit(ev(1), now), Submit::Duplicate);
        u.on_outgoing(7);
        u.on_outgoing(8);
        assert_eq!(u.on_puback(8, AckClass::Success, now), Some(Verdict::Acked(ev(2))));
        assert_eq!(
            u.on_puback(8, AckClass::Success, now),
            None,
            "nothing else went out as 8"
        );
        assert_eq!(u.len(), 1);
        assert_eq!(u.on_puback(7, AckClass::Permanent, now), Some(Verdict::Refused(ev(1))));
        assert!(u.is_empty());
    }

    #[test]
    fn a_reused_packet_id_pairs_first_in_first_out() {
        let now = Instant::now();
        let mut u = Unacked::new();
        u.submit(ev(1), now);
        u.submit(ev(2), now);
        // The client freed 1 and reused it before its PUBACK reached us.
        u.on_outgoing(1);
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Success, now), Some(Verdict::Acked(ev(1))));
        assert_eq!(u.on_puback(1, AckClass::Success, now), Some(Verdict::Acked(ev(2))));
    }

    #[test]
    fn a_transient_refusal_is_retried_then_refused() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        u.submit(ev(5), t0);
        let mut now = t0;
        for attempt in 1..TRANSIENT_ATTEMPTS {
            u.on_outgoing(1);
            let at = now + retry_delay(attempt);
            assert_eq!(
                u.on_puback(1, AckClass::Transient, now),
                Some(Verdict::RetryLater { seq: 5, attempt, at })
            );
            assert_eq!(u.next_due(), Some(at));
            assert!(u.due(at - Duration::from_millis(1)).is_empty());
            now = at;
            assert_eq!(u.due(now), vec![5]);
            assert_eq!(u.next_due(), None);
        }
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Transient, now), Some(Verdict::Refused(ev(5))));
        assert!(u.is_empty());
    }

    #[test]
    fn attempts_survive_a_reconnect_and_end_with_the_event() {
        let now = Instant::now();
        let mut u = Unacked::new();
        u.submit(ev(5), now);
        for _ in 1..TRANSIENT_ATTEMPTS {
            u.on_outgoing(1);
            assert!(matches!(
                u.on_puback(1, AckClass::Transient, now),
                Some(Verdict::RetryLater { .. })
            ));
            assert_eq!(u.reconnect(now), vec![5], "a reconnect sends it at once");
            assert_eq!(u.next_due(), None);
        }
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Transient, now), Some(Verdict::Refused(ev(5))));
        // Back again (a replayed dead letter): a fresh count.
        u.submit(ev(5), now);
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
            u.submit(ev(seq), now);
        }
        u.on_outgoing(1);
        u.on_outgoing(2);
        assert_eq!(u.reconnect(now), vec![1], "the first, alone");
        assert!(!u.accepting(), "no new event before the rest");
        assert_eq!(
            u.on_puback(1, AckClass::Success, now),
            None,
            "a packet id of the old connection"
        );
        assert!(u.due(now).is_empty());
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Transient, now).map(|_| ()), Some(()));
        assert_eq!(u.due(now), vec![2, 3], "the rest after a PUBACK, whatever it said");
        assert!(u.accepting());
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Success, now), Some(Verdict::Acked(ev(2))));
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn only_a_transient_refusal_waits() {
        let now = Instant::now();
        let mut u = Unacked::new();
        u.submit(ev(1), now);
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, AckClass::Permanent, now), Some(Verdict::Refused(ev(1))));
        assert_eq!(u.next_due(), None);
        let total: Duration = (1..TRANSIENT_ATTEMPTS).map(retry_delay).sum();
        assert!(
            total >= Duration::from_secs(60) && total <= Duration::from_secs(300),
            "{total:?}"
        );
    }

    /// Sends whatever is queued as packet ids 1, 2, ... and answers each with `class`, in order.
    fn answer(u: &mut Unacked<Ev>, classes: &[AckClass], now: Instant) -> Vec<Option<Verdict<Ev>>> {
        for pkid in 1..=classes.len() as u16 {
            u.on_outgoing(pkid);
        }
        classes
            .iter()
            .zip(1u16..)
            .map(|(class, pkid)| u.on_puback(pkid, *class, now))
            .collect()
    }

    use AckClass::{NotAuthorized as Denied, Success as Ok_};

    #[test]
    fn a_topic_refused_while_others_work_is_held_tried_once_more_then_refused() {
        let now = Instant::now();
        let mut u = Unacked::new();
        u.submit(Ev(1, "forbidden"), now);
        u.submit(Ev(2, "allowed"), now);
        let verdicts = answer(&mut u, &[Denied], now);
        assert_eq!(verdicts, vec![Some(Verdict::Held { seq: 1 })], "held, not reported");
        assert_eq!(u.due(now), Vec::<i64>::new(), "not sent again before a success");
        assert_eq!(u.len(), 2);
        u.on_outgoing(2);
        assert_eq!(u.on_puback(2, Ok_, now), Some(Verdict::Acked(Ev(2, "allowed"))));
        assert_eq!(u.due(now), vec![1], "a success: one more try");
        assert_eq!(
            answer(&mut u, &[Denied], now),
            vec![Some(Verdict::Refused(Ev(1, "forbidden")))]
        );
        assert!(u.is_empty() && u.paused_since().is_none());
    }

    #[test]
    fn a_refusal_with_no_success_since_is_not_final() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        u.submit(ev(1), t0);
        assert_eq!(answer(&mut u, &[Denied], t0), vec![Some(Verdict::Held { seq: 1 })]);
        // Nothing else to send: the held event is probed every PROBE_EVERY, one at a time.
        assert_eq!(u.next_due(), Some(t0 + PROBE_EVERY));
        assert!(u.due(t0 + PROBE_EVERY - Duration::from_millis(1)).is_empty());
        let t1 = t0 + PROBE_EVERY;
        assert_eq!(u.due(t1), vec![1]);
        assert_eq!(u.next_due(), None, "one probe in flight");
        assert_eq!(answer(&mut u, &[Denied], t1), vec![Some(Verdict::Held { seq: 1 })]);
        assert_eq!(u.paused_since(), None, "one event refused twice is not three events");
        assert_eq!(u.next_due(), Some(t1 + PROBE_EVERY));
        // The account works again: the probe is acknowledged.
        assert_eq!(u.due(t1 + PROBE_EVERY), vec![1]);
        assert_eq!(
            answer(&mut u, &[Ok_], t1 + PROBE_EVERY),
            vec![Some(Verdict::Acked(ev(1)))]
        );
        assert!(u.is_empty());
        assert_eq!(u.next_due(), None);
    }

    #[test]
    fn refusals_with_no_success_in_between_pause_and_a_probe_goes_every_ten_seconds() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        for seq in 1..=5 {
            u.submit(Ev(seq, ["a", "b", "c"][seq as usize % 3]), t0);
        }
        let verdicts = answer(&mut u, &[Denied, Denied], t0);
        assert!(verdicts.iter().all(|v| matches!(v, Some(Verdict::Held { .. }))));
        assert!(
            u.accepting() && u.paused_since().is_none(),
            "two refused events do not pause"
        );
        for pkid in 3..=5 {
            u.on_outgoing(pkid);
        }
        assert_eq!(u.on_puback(3, Denied, t0), Some(Verdict::Held { seq: 3 }));
        assert_eq!(u.paused_since(), Some(t0), "the third pauses");
        assert!(!u.accepting());
        assert_eq!(u.on_puback(4, Denied, t0), Some(Verdict::Held { seq: 4 }));
        assert_eq!(u.on_puback(5, Denied, t0), Some(Verdict::Held { seq: 5 }));
        assert_eq!((u.len(), u.held_len()), (5, 5), "nothing reported, nothing lost");
        assert!(u.settled());

        // A reconnect sends nothing.
        assert_eq!(u.reconnect(t0), Vec::<i64>::new());
        // The first probe: the oldest held event, 10 s after the first refusal; one in flight.
        let t1 = t0 + PROBE_EVERY;
        assert!(!u.wants_fresh(t1), "the held probe first");
        assert_eq!(u.due(t1), vec![1]);
        assert!(u.due(t1 + Duration::from_secs(5)).is_empty(), "one probe in flight");
        // Lost with the connection (a broker that drops it after a refusal): held again, not resent.
        assert_eq!(u.reconnect(t1), Vec::<i64>::new());
        assert!(
            u.due(t1 + Duration::from_secs(9)).is_empty(),
            "no new probe before 10 s"
        );
        // The next probe is a new event, if one on a free topic comes.
        let t2 = t1 + PROBE_EVERY;
        assert!(u.wants_fresh(t2));
        assert_eq!(u.submit(Ev(6, "d"), t2), Submit::Send);
        assert!(u.due(t2).is_empty(), "the new event is the probe");
        assert_eq!(answer(&mut u, &[Denied], t2), vec![Some(Verdict::Held { seq: 6 })]);
        // Then the oldest held again; the account works again: resume, every held event in seq order.
        let t3 = t2 + PROBE_EVERY;
        assert!(!u.wants_fresh(t3));
        assert_eq!(u.due(t3), vec![1]);
        assert_eq!(answer(&mut u, &[Ok_], t3), vec![Some(Verdict::Acked(Ev(1, "b")))]);
        assert_eq!(u.paused_since(), None);
        assert!(u.accepting());
        assert_eq!(u.due(t3), vec![2, 3, 4, 5, 6]);
        let verdicts = answer(&mut u, &[Ok_; 5], t3);
        assert!(verdicts.iter().all(|v| matches!(v, Some(Verdict::Acked(_)))));
        assert!(u.is_empty());
        assert_eq!(u.next_due(), None);
    }

    #[test]
    fn while_paused_a_new_event_on_a_topic_with_an_unacknowledged_event_is_held_not_sent() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        for seq in 1..=3 {
            u.submit(Ev(seq, "row"), t0);
        }
        answer(&mut u, &[Denied; 3], t0);
        assert!(u.paused_since().is_some());
        let t1 = t0 + PROBE_EVERY;
        assert_eq!(u.due(t1), vec![1]);
        answer(&mut u, &[Denied], t1);
        let t2 = t1 + PROBE_EVERY;
        assert!(u.wants_fresh(t2));
        // Same topic (could be the same row): sending it first could overtake an older event of its row.
        assert_eq!(u.submit(Ev(4, "row"), t2), Submit::Held);
        assert!(u.wants_fresh(t2), "the next new event may still be the probe");
        assert_eq!(u.due(t2), vec![1], "none came: the held probe goes");
        assert!(!u.wants_fresh(t2 + PROBE_EVERY));
        // Not a probe slot: taken while paused, held.
        assert_eq!(u.submit(Ev(5, "other"), t2), Submit::Held);
        assert_eq!(answer(&mut u, &[Ok_], t2), vec![Some(Verdict::Acked(Ev(1, "row")))]);
        assert_eq!(u.due(t2), vec![2, 3, 4, 5]);
    }

    #[test]
    fn a_burst_on_one_forbidden_topic_pauses_until_a_new_event_elsewhere_succeeds() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        for seq in 1..=3 {
            u.submit(Ev(seq, "forbidden"), t0);
        }
        answer(&mut u, &[Denied; 3], t0);
        assert!(u.paused_since().is_some());
        let t1 = t0 + PROBE_EVERY;
        assert_eq!(u.due(t1), vec![1]);
        assert_eq!(answer(&mut u, &[Denied], t1), vec![Some(Verdict::Held { seq: 1 })]);
        let t2 = t1 + PROBE_EVERY;
        assert_eq!(u.submit(Ev(4, "allowed"), t2), Submit::Send);
        assert_eq!(answer(&mut u, &[Ok_], t2), vec![Some(Verdict::Acked(Ev(4, "allowed")))]);
        assert!(u.paused_since().is_none());
        assert_eq!(u.due(t2), vec![1, 2, 3], "one more try each");
        let verdicts = answer(&mut u, &[Denied; 3], t2);
        assert!(
            verdicts.iter().all(|v| matches!(v, Some(Verdict::Refused(_)))),
            "refused for good: {verdicts:?}"
        );
        assert!(u.paused_since().is_none(), "final refusals do not pause");
        assert!(u.is_empty());
    }

    #[test]
    fn a_reconnect_does_not_resend_what_the_broker_refused_with_no_success_since() {
        let now = Instant::now();
        let mut u = Unacked::new();
        for seq in 1..=3 {
            u.submit(ev(seq), now);
        }
        u.on_outgoing(1);
        assert_eq!(u.on_puback(1, Denied, now), Some(Verdict::Held { seq: 1 }));
        assert_eq!(u.reconnect(now), vec![2], "the held one waits");
        answer(&mut u, &[Ok_], now);
        assert_eq!(
            u.due(now),
            vec![1, 3],
            "a success: one more try, and the rest of the resend"
        );
        // Its one more try is lost with the connection: sent again like anything unacknowledged.
        assert_eq!(u.reconnect(now), vec![1]);
        assert_eq!(u.held_len(), 0);
        assert_eq!(answer(&mut u, &[Denied], now), vec![Some(Verdict::Refused(ev(1)))]);
        assert_eq!(u.due(now), vec![3]);
    }

    #[test]
    fn a_reconnect_to_a_broker_that_drops_the_connection_after_each_refusal_learns_one_refusal_each_time() {
        let now = Instant::now();
        let mut u = Unacked::new();
        for seq in 1..=6 {
            u.submit(ev(seq), now);
        }
        for pkid in 1..=6 {
            u.on_outgoing(pkid);
        }
        // The broker refused 1 and closed the connection; the client lost the PUBACK writing 2.
        for first in 1..=3 {
            assert_eq!(u.reconnect(now), vec![first], "one event in flight");
            assert_eq!(answer(&mut u, &[Denied], now), vec![Some(Verdict::Held { seq: first })]);
            // The rest went out (and was lost with the connection closed after the refusal) ...
            if first < 3 {
                assert_eq!(u.due(now), ((first + 1)..=6).collect::<Vec<_>>());
                assert_eq!(u.held_len(), first as usize);
            }
        }
        // ... except after the third refusal, which pauses: then it is held.
        assert!(u.paused_since().is_some());
        assert!(u.due(now).is_empty());
        assert_eq!(u.held_len(), 6);
        assert!(u.reconnect(now).is_empty());
    }

    #[test]
    fn while_paused_a_retry_that_comes_due_is_held() {
        let t0 = Instant::now();
        let mut u = Unacked::new();
        for seq in 1..=4 {
            u.submit(ev(seq), t0);
        }
        assert!(matches!(
            answer(&mut u, &[AckClass::Transient], t0)[0],
            Some(Verdict::RetryLater { .. })
        ));
        for pkid in 2..=4 {
            u.on_outgoing(pkid);
            u.on_puback(pkid, Denied, t0);
        }
        assert!(u.paused_since().is_some());
        assert!(u.due(t0 + retry_delay(1)).is_empty(), "held, not sent");
        assert_eq!(u.held_len(), 4);
        assert!(u.settled());
    }
}

#[cfg(test)]
mod model;
