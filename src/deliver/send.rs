//! Taking a new event from the pipeline and queuing publishes to the client. What the broker could not take
//! (larger than its maximum packet size, a topic it cannot accept) is refused here, before it is sent, instead
//! of looping on a connection the broker would drop.

use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ClientError};

use crate::convert::Event;
use crate::metrics::FailureReason;

use super::unacked::{Submit, Unacked};
use super::{Book, Io, Outcome, Publisher, Sent, SessionEnd, Term};

/// The request channel is closed or full: the connection is given up.
#[derive(Debug, thiserror::Error)]
#[error("cannot queue publish: {0}")]
pub(super) struct SendError(Box<ClientError>);

impl Publisher {
    /// A new event from the pipeline: dropped if it was handed over in an earlier term (its lead is over, and
    /// its row is read again), refused at once if the broker could not take it, else recorded and published
    /// (or held, while paused). One of a term the publisher has not followed yet (the pipeline began it just
    /// now) ends this connection, which belongs to the term before: it is taken first on the next.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn take(
        &self,
        client: &AsyncClient,
        book: &mut Book,
        io: &mut Io,
        term: Term,
        event: Event,
        max_packet: Option<u32>,
        now: std::time::Instant,
    ) -> Result<(), SessionEnd> {
        if term < book.term {
            return Ok(());
        }
        if term > book.term {
            io.stash = Some((term, event));
            return Err(SessionEnd::LeadEnded);
        }
        if let Some(held) = book.unacked.get_mut(event.seq) {
            // Re-read by a new leader session while still unacknowledged here. If what is here is a copy from
            // the window (the row's deletion had not happened), it becomes the event: its PUBACK is reported.
            if held.copy {
                held.copy = false;
                book.window.settled(event.seq);
                self.note_window(book);
            }
            return Ok(());
        }
        let refuse = |event: Event, reason: FailureReason, detail: String| {
            io.outcomes
                .send((term, Outcome::Rejected { event, reason, detail }))
                .map_err(|_| SessionEnd::Done)
        };
        if let Some(max) = max_packet {
            // topic + payload + properties + fixed header: refuse what the broker would refuse, instead of
            // looping on a connection it would drop.
            let size = event.payload.len() + event.topic.len() + event.event_id.len() + 64;
            if size > max as usize {
                let detail = format!("payload of {size} bytes exceeds the broker's maximum packet size {max}");
                return refuse(event, FailureReason::TooLarge, detail);
            }
        }
        if !valid_topic(&event.topic) {
            let detail = format!("invalid topic {:?}", event.topic);
            return refuse(event, FailureReason::Rejected, detail);
        }
        let seq = event.seq;
        if book.unacked.submit(Sent { event, copy: false }, now) == Submit::Send {
            // Not sent on a queue error: recorded all the same, and sent after the reconnect.
            send_all(client, &book.unacked, &[seq]).map_err(|e| SessionEnd::Failed(e.into()))?;
        }
        Ok(())
    }
}

/// Publishes these entries of the table, in this order. Returns how many of them were copies from the window.
pub(super) fn send_all(client: &AsyncClient, unacked: &Unacked<Sent>, seqs: &[i64]) -> Result<u64, SendError> {
    let mut copies = 0;
    for seq in seqs {
        if let Some(sent) = unacked.get(*seq) {
            send(client, &sent.event)?;
            copies += u64::from(sent.copy);
        }
    }
    Ok(copies)
}

/// The topic is checked before (`valid_topic`), so any error is the request channel's. A copy from the
/// window goes through here too: the same bytes and properties as the first time.
fn send(client: &AsyncClient, ev: &Event) -> Result<(), SendError> {
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".to_string()),
        user_properties: vec![("event_id".to_string(), ev.event_id.clone())],
        ..Default::default()
    };
    client
        .try_publish_with_properties(ev.topic.clone(), QoS::AtLeastOnce, false, ev.payload.clone(), props)
        .map_err(|e| SendError(Box::new(e)))
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_topic_the_broker_would_refuse_is_invalid() {
        assert!(valid_topic("dev/merchant/branch/delta"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("dev/+/delta"));
        assert!(!valid_topic("dev/#"));
    }
}
