//! An MQTT 5 subscription held the way a device holds one: subscribe after every CONNACK that resumes no
//! session, hand each message to a callback, keep reconnecting after errors. Serves the demo's device, the
//! load harness and the tests. Reports the broker's verdict on the subscription (SUBACK) so callers wait for it
//! instead of sleeping, and see a refusal (0x87) or a failed connection as an error. Never publishes.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("subscription to {filter} refused: {codes}")]
    Refused { filter: String, codes: String },
    #[error("cannot connect to the broker: {0}")]
    Connect(String),
    #[error("no SUBACK from the broker within {0:?}")]
    Timeout(Duration),
}

/// A live subscription; dropping it stops it.
pub struct Subscription {
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Subscription {
    /// Asks the broker to end the session cleanly (best effort), then stops.
    pub async fn stop(self) {
        let _ = self.client.disconnect().await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects with `opts`, subscribes to `filter` at QoS 1 and waits up to `wait` for the broker's verdict.
/// Every message received from then on goes to `on_message`, across reconnections.
pub async fn subscribe<F>(
    opts: MqttOptions,
    filter: &str,
    wait: Duration,
    mut on_message: F,
) -> Result<Subscription, SubscribeError>
where
    F: FnMut(Publish) + Send + 'static,
{
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let (verdict_tx, verdict_rx) = oneshot::channel::<Result<(), SubscribeError>>();
    let requests = client.clone();
    let wanted = filter.to_string();
    let task = tokio::spawn(async move {
        let mut verdict = Some(verdict_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if !ack.session_present {
                        let _ = requests
                            .subscribe_many(vec![Filter::new(wanted.clone(), QoS::AtLeastOnce)])
                            .await;
                    } else if let Some(v) = verdict.take() {
                        let _ = v.send(Ok(())); // the resumed session still holds the subscription
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if let Some(v) = verdict.take() {
                        let granted = ack
                            .return_codes
                            .iter()
                            .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                        let _ = v.send(if granted {
                            Ok(())
                        } else {
                            Err(SubscribeError::Refused {
                                filter: wanted.clone(),
                                codes: format!("{:?}", ack.return_codes),
                            })
                        });
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => on_message(p),
                Ok(_) => {}
                Err(e) => {
                    if let Some(v) = verdict.take() {
                        let _ = v.send(Err(SubscribeError::Connect(e.to_string())));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let subscription = Subscription { client, task };
    match tokio::time::timeout(wait, verdict_rx).await {
        Ok(Ok(Ok(()))) => Ok(subscription),
        Ok(Ok(Err(e))) => Err(e),
        _ => Err(SubscribeError::Timeout(wait)),
    }
}
