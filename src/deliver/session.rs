//! One connection to the broker: connect and wait for the CONNACK, send again at once the copies a lost
//! connection made of the republish window (whoever leads), stand by while this replica does not lead, then
//! publish (send again what is unacknowledged, take new events, pair PUBACKs) until the connection fails, the
//! lead ends, or the bridge stops and has drained. rumqttc's client and event loop live exactly as
//! long as the connection: dropping them is what keeps anything still queued in them from being sent after
//! the lead ended.

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, ConnectionError, Event as MqttEvent, EventLoop};
use rumqttc::Outgoing;
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::mqtt::mqtt_options;

use super::{next_event, Book, Io, Publisher, SessionEnd, SessionError};

/// While paused, the new events looked at for a probe on a topic with nothing unacknowledged (the others are
/// held), at most, per probe: a burst of changes on a refused topic ahead of the others is passed this many
/// at a time, without sending any.
const PROBE_LOOKAHEAD: usize = 100;

impl Publisher {
    pub(super) async fn session(
        &self,
        book: &mut Book,
        io: &mut Io,
        draining: &mut bool,
        backoff: &mut Backoff,
        up_since: &mut Option<tokio::time::Instant>,
    ) -> SessionEnd {
        let username = self.cfg.username.as_deref();
        let password = self.cfg.password.as_ref().map(|s| s.expose());
        let mut opts = match mqtt_options(&self.cfg, &self.cfg.client_id, username, password) {
            Ok(o) => o,
            Err(e) => return SessionEnd::Failed(SessionError::Options(e)),
        };
        opts.set_outgoing_inflight_upper_limit(self.cfg.max_inflight);
        // Every request this connection can queue: the copies, the events of the term (those unacknowledged,
        // or as many as the pipeline hands over: its max_pending), and a margin. A full request channel is a
        // failed publish, which would cost the connection.
        let copies = book.copies();
        let cap = copies + (book.unacked.len() - copies).max(self.max_pending) + 1024;
        let (client, eventloop) = AsyncClient::new(opts, cap);
        let (loop_tx, mut loop_rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(eventloop, loop_tx));
        let _abort = AbortOnDrop(driver);

        // Wait for CONNACK before sending anything.
        let max_packet = loop {
            tokio::select! {
                ev = loop_rx.recv() => match ev {
                    Some(Ok(MqttEvent::Incoming(Packet::ConnAck(ack)))) => {
                        self.heard_from(book);
                        break ack.properties.and_then(|p| p.max_packet_size);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return SessionEnd::Failed(e.into()),
                    None => return SessionEnd::Failed(SessionError::LoopEnded),
                },
                _ = io.cancel.cancelled(), if !*draining => {
                    if book.owes_nothing(io.leading()) { return SessionEnd::Done; }
                    *draining = true;
                }
            }
        };
        self.set_connected(true);
        *up_since = Some(tokio::time::Instant::now());
        tracing::info!(
            url = %crate::config::redact_url(&self.cfg.url),
            unacked = book.unacked.len(),
            held = book.unacked.held_len(),
            paused = book.unacked.paused_since().is_some(),
            leading = io.leading(),
            "mqtt connected"
        );
        // The pipeline's term first (a new one drops the events of the old, not the copies); then everything
        // unacknowledged goes again if this replica leads, else the copies alone, the events being parked.
        let lead = *io.lead.borrow_and_update();
        self.follow(book, lead);
        let mut standing_by = !lead.leading;
        let now = tokio::time::Instant::now().into_std();
        let resend = if standing_by {
            book.unacked.reconnect_only(now, |s| s.copy)
        } else {
            book.unacked.reconnect(now)
        };
        if standing_by {
            tracing::info!(
                copies = book.copies(),
                set_aside = book.unacked.len() - book.copies(),
                "standing by: another replica leads (or none yet); only the copies of the republish window are sent"
            );
        }
        if let Err(e) = self.send_all(&client, book, &resend) {
            return SessionEnd::Failed(e.into());
        }
        let drain_deadline = tokio::time::sleep(self.drain);
        tokio::pin!(drain_deadline);
        let mut drain_armed = *draining;
        if drain_armed {
            drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.drain);
        }
        loop {
            if *draining && book.unacked.settled() {
                let _ = client.try_disconnect();
                return SessionEnd::Done;
            }
            let next_due = book.unacked.next_due();
            let accepting = !*draining && !standing_by && book.unacked.accepting();
            tokio::select! {
                biased;
                changed = io.lead.changed() => {
                    if changed.is_err() {
                        return SessionEnd::Done; // the pipeline is gone
                    }
                    let lead = *io.lead.borrow_and_update();
                    if !standing_by {
                        if !lead.leading || lead.term != book.term {
                            return SessionEnd::LeadEnded;
                        }
                        continue;
                    }
                    // Standing by, nothing of the term in flight here: a new term drops its parked events.
                    self.follow(book, lead);
                    if lead.leading {
                        standing_by = false;
                        let due = book.unacked.unpark(tokio::time::Instant::now().into_std());
                        tracing::info!(unacked = book.unacked.len(), "leading: publishing on the same connection");
                        if let Err(e) = self.send_all(&client, book, &due) {
                            return SessionEnd::Failed(e.into());
                        }
                    }
                }
                ev = loop_rx.recv() => match ev {
                    Some(Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid)))) => book.unacked.on_outgoing(pkid),
                    Some(Ok(MqttEvent::Incoming(Packet::PubAck(ack)))) => {
                        self.heard.now();
                        let due = match self.on_puback(book, ack, backoff, &io.outcomes) {
                            Ok(due) => due,
                            Err(end) => return end,
                        };
                        if let Err(e) = self.send_all(&client, book, &due) {
                            return SessionEnd::Failed(e.into());
                        }
                    }
                    Some(Ok(MqttEvent::Incoming(Packet::Disconnect(d)))) => {
                        return SessionEnd::Failed(SessionError::Disconnected(d.reason_code));
                    }
                    Some(Ok(MqttEvent::Incoming(_))) => self.heard_from(book),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return SessionEnd::Failed(e.into()),
                    None => return SessionEnd::Failed(SessionError::LoopEnded),
                },
                _ = io.cancel.cancelled(), if !*draining => {
                    *draining = true;
                    drain_armed = true;
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.drain);
                }
                _ = tokio::time::sleep_until(next_due.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std)), if next_due.is_some() => {
                    let now = tokio::time::Instant::now().into_std();
                    // Paused, and the probe due is a new event: the first waiting on a free topic, if any.
                    for _ in 0..PROBE_LOOKAHEAD {
                        if *draining || standing_by || !book.unacked.wants_fresh(now) {
                            break;
                        }
                        let Some((term, event)) = io.try_next() else { break };
                        if let Err(end) = self.take(&client, book, io, term, event, max_packet, now) {
                            return end;
                        }
                    }
                    let due = book.unacked.due(now);
                    if let Err(e) = self.send_all(&client, book, &due) {
                        return SessionEnd::Failed(e.into());
                    }
                }
                _ = &mut drain_deadline, if drain_armed => {
                    let _ = client.try_disconnect();
                    return SessionEnd::Done;
                }
                ev = next_event(&mut io.stash, &mut io.events), if accepting => match ev {
                    Some((term, event)) => {
                        crate::fault::check(crate::fault::Task::Publisher, &event.payload);
                        let now = tokio::time::Instant::now().into_std();
                        if let Err(end) = self.take(&client, book, io, term, event, max_packet, now) {
                            return end;
                        }
                    }
                    None => { *draining = true; drain_armed = true; drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.drain); }
                },
            }
        }
    }
}

/// Drives the rumqttc event loop in its own task: `EventLoop::poll` must not be dropped mid-way, so it is
/// never raced in a `select!`; events reach the publisher through a channel instead.
///
/// When the broker closes the connection right after a PUBACK (Mosquitto 2.0.11 does after a refusal when
/// `max_queued_messages` is 0), rumqttc reads both in one go and returns the error first, leaving the PUBACK
/// in its buffer (`state.events`): those events happened before the error, so they are forwarded first.
/// Otherwise the refusal would never be seen and the event sent again on every reconnect.
async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Result<MqttEvent, ConnectionError>>) {
    loop {
        match eventloop.poll().await {
            Ok(ev) => {
                if tx.send(Ok(ev)).is_err() {
                    return;
                }
            }
            Err(e) => {
                for ev in eventloop.state.events.drain(..) {
                    let _ = tx.send(Ok(ev));
                }
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
