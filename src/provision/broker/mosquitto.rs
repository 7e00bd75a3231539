//! Mosquitto through its dynamic-security plugin: JSON commands published to `$CONTROL/dynamic-security/v1`
//! by the plugin's admin (`broker.admin_username`), answers read from `.../response`. Each device gets a
//! client (username = client id = device id, client id bound, password = its JWT) and a role of its own
//! allowing `subscribePattern` on its branch filter; everything else falls to the plugin's default ACL
//! access (no publishing, no other subscription). Never keeps a connection or any state between calls:
//! each call connects, sends one command batch, waits for its answer and disconnects.
//!
//! Rotation deletes and re-creates the client and its role in one batch (the plugin applies a batch in
//! order, and deleting a client disconnects its sessions), which also moves a device to a new branch.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use serde_json::{json, Value};

use super::{BrokerBackend, BrokerError, Grant, ADMIN_TIMEOUT};
use crate::config::{Config, MqttConfig, Secret};
use crate::provision::acl;

const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";

pub(crate) struct Mosquitto {
    mqtt: MqttConfig,
    username: String,
    password: Secret,
}

impl Mosquitto {
    pub(crate) fn new(cfg: &Config) -> Result<Mosquitto, BrokerError> {
        let username = cfg
            .broker
            .admin_username
            .clone()
            .ok_or_else(|| BrokerError::Config("broker.admin_username is required for mosquitto".into()))?;
        let password = cfg
            .broker
            .admin_password
            .clone()
            .ok_or_else(|| BrokerError::Config("broker.admin_password is required for mosquitto".into()))?;
        Ok(Mosquitto {
            mqtt: cfg.mqtt.clone(),
            username,
            password,
        })
    }

    /// Sends one batch and checks every answer ("not found" on a delete is fine).
    async fn run(&self, commands: Vec<Value>) -> Result<(), BrokerError> {
        let responses = self.run_raw(&commands).await?;
        check_responses(&commands, &responses)
    }

    /// For each id: true when no client of that name exists or it is one of our devices (has the device's
    /// role). Keeps a device id from replacing or deleting the bridge's own account or an operator's.
    async fn ours(&self, device_ids: &[String]) -> Result<Vec<bool>, BrokerError> {
        let commands: Vec<Value> = device_ids
            .iter()
            .map(|id| json!({"command": "getClient", "username": id}))
            .collect();
        let answers = self.run_raw(&commands).await?;
        Ok(device_ids
            .iter()
            .enumerate()
            .map(|(i, id)| answers.get(i).is_some_and(|a| is_ours(a, id)))
            .collect())
    }

    async fn run_raw(&self, commands: &[Value]) -> Result<Vec<Value>, BrokerError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let correlation = crate::provision::credentials::new_jti();
        let commands: Vec<Value> = commands
            .iter()
            .cloned()
            .map(|mut c| {
                if let Value::Object(m) = &mut c {
                    m.insert("correlationData".into(), Value::String(correlation.clone()));
                }
                c
            })
            .collect();
        let expected = commands.len();
        let payload = json!({ "commands": commands }).to_string();
        tokio::time::timeout(ADMIN_TIMEOUT, self.exchange(&payload, &correlation, expected))
            .await
            .map_err(|_| BrokerError::Timeout(ADMIN_TIMEOUT))?
    }

    async fn exchange(&self, payload: &str, correlation: &str, expected: usize) -> Result<Vec<Value>, BrokerError> {
        let client_id = format!(
            "{}{}",
            crate::provision::reserved::ADMIN_CLIENT_PREFIX,
            &correlation[..8]
        );
        let opts = crate::mqtt::mqtt_options(
            &self.mqtt,
            &client_id,
            Some(&self.username),
            Some(self.password.expose()),
        )
        .map_err(|e| BrokerError::Connect(e.to_string()))?;
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        let mut answers: Vec<Value> = Vec::new();
        let result = loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != ConnectReturnCode::Success {
                        break Err(BrokerError::Connect(format!("CONNACK {:?}", ack.code)));
                    }
                    if let Err(e) = client
                        .subscribe_many(vec![Filter::new(RESPONSE_TOPIC, QoS::AtLeastOnce)])
                        .await
                    {
                        break Err(BrokerError::Connect(e.to_string()));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let granted = ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)));
                    if !granted {
                        break Err(BrokerError::Refused {
                            command: format!("subscribe {RESPONSE_TOPIC}"),
                            error: format!("{:?} (is broker.admin_username the dynsec admin?)", ack.return_codes),
                        });
                    }
                    if let Err(e) = client
                        .publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, payload.to_string())
                        .await
                    {
                        break Err(BrokerError::Connect(e.to_string()));
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if !matches!(ack.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers) {
                        break Err(BrokerError::Refused {
                            command: format!("publish {CONTROL_TOPIC}"),
                            error: format!("{:?}", ack.reason),
                        });
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.as_ref() == RESPONSE_TOPIC.as_bytes() => {
                    let doc: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if let Some(list) = doc["responses"].as_array() {
                        answers.extend(list.iter().filter(|r| r["correlationData"] == correlation).cloned());
                    }
                    if answers.len() >= expected {
                        break Ok(std::mem::take(&mut answers));
                    }
                }
                Ok(_) => {}
                Err(e) => break Err(BrokerError::Connect(e.to_string())),
            }
        };
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
        result
    }
}

impl BrokerBackend for Mosquitto {
    fn kind(&self) -> &'static str {
        "mosquitto"
    }

    fn grant<'a>(&'a self, grant: &'a Grant) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let ids = [grant.device_id.clone()];
            if self.ours(&ids).await? != [true] {
                return Err(BrokerError::NotOurs(grant.device_id.clone()));
            }
            self.run(grant_commands(grant)).await
        })
    }

    fn revoke<'a>(&'a self, device_id: &'a str, _until: DateTime<Utc>) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let ids = [device_id.to_string()];
            if self.ours(&ids).await? != [true] {
                return Err(BrokerError::NotOurs(device_id.to_string()));
            }
            self.run(remove_commands(&ids)).await
        })
    }

    fn needs_expiry_sweep(&self) -> bool {
        true
    }

    fn expire<'a>(&'a self, device_ids: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let ours = self.ours(device_ids).await?;
            let mine: Vec<String> = device_ids
                .iter()
                .zip(ours)
                .filter(|(_, ours)| *ours)
                .map(|(id, _)| id.clone())
                .collect();
            self.run(remove_commands(&mine)).await
        })
    }
}

/// The dynamic-security role of a device.
pub(crate) fn role_name(device_id: &str) -> String {
    format!("delta-bridge-device-{device_id}")
}

/// Remove whatever exists, then create the role and the client: one batch, applied in order.
pub(crate) fn grant_commands(g: &Grant) -> Vec<Value> {
    let role = role_name(&g.device_id);
    let mut cmds = remove_commands(std::slice::from_ref(&g.device_id));
    cmds.push(json!({
        "command": "createRole",
        "rolename": role,
        "textdescription": "delta-bridge device: subscribe to its own branch only",
        "acls": acl::mosquitto_role_acls(&g.env, &g.merchant_code, &g.branch_code),
    }));
    cmds.push(json!({
        "command": "createClient",
        "username": g.device_id,
        "clientid": g.device_id,
        "password": g.password.expose(),
        "roles": [{"rolename": role, "priority": 0}],
    }));
    cmds
}

/// Deleting the client disconnects every session using it.
pub(crate) fn remove_commands(device_ids: &[String]) -> Vec<Value> {
    device_ids
        .iter()
        .flat_map(|id| {
            [
                json!({"command": "deleteClient", "username": id}),
                json!({"command": "deleteRole", "rolename": role_name(id)}),
            ]
        })
        .collect()
}

/// A `getClient` answer for `device_id`: absent, or carrying the device's role.
fn is_ours(answer: &Value, device_id: &str) -> bool {
    if answer.get("error").is_some() {
        // "Client not found"; any other error is caught when the real commands run.
        return true;
    }
    let role = role_name(device_id);
    answer["data"]["client"]["roles"]
        .as_array()
        .is_some_and(|roles| roles.iter().any(|r| r["rolename"] == role.as_str()))
}

/// Every command answered, and without an error other than "not found" for a delete.
fn check_responses(commands: &[Value], responses: &[Value]) -> Result<(), BrokerError> {
    for (i, cmd) in commands.iter().enumerate() {
        let name = cmd["command"].as_str().unwrap_or("?");
        // The plugin answers in command order; fall back to that when names repeat.
        let answer = responses.get(i).filter(|r| r["command"] == name);
        let Some(answer) = answer else {
            return Err(BrokerError::Refused {
                command: name.to_string(),
                error: "no answer".into(),
            });
        };
        if let Some(err) = answer.get("error").and_then(Value::as_str) {
            let tolerated = name.starts_with("delete") && err.to_ascii_lowercase().contains("not found");
            if !tolerated {
                return Err(BrokerError::Refused {
                    command: name.to_string(),
                    error: err.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            device_id: "pos-01".into(),
            password: Secret::new("jwt"),
            env: "dev".into(),
            merchant_code: "M1".into(),
            branch_code: "B1".into(),
            reinstated: false,
            rotation: false,
        }
    }

    #[test]
    fn grant_replaces_client_and_role_in_order() {
        let cmds = grant_commands(&grant());
        let names: Vec<&str> = cmds.iter().filter_map(|c| c["command"].as_str()).collect();
        assert_eq!(names, ["deleteClient", "deleteRole", "createRole", "createClient"]);
        assert_eq!(cmds[2]["acls"][0]["topic"], "dev/M1/B1/#");
        assert_eq!(cmds[2]["acls"][0]["acltype"], "subscribePattern");
        assert_eq!(cmds[3]["clientid"], "pos-01");
        assert_eq!(cmds[3]["username"], "pos-01");
        assert_eq!(cmds[3]["roles"][0]["rolename"], "delta-bridge-device-pos-01");
    }

    #[test]
    fn only_our_own_clients_are_touched() {
        assert!(is_ours(
            &json!({"command": "getClient", "error": "Client not found"}),
            "pos-01"
        ));
        assert!(is_ours(
            &json!({"command": "getClient", "data": {"client": {"username": "pos-01",
                "roles": [{"rolename": "delta-bridge-device-pos-01"}]}}}),
            "pos-01"
        ));
        assert!(!is_ours(
            &json!({"command": "getClient", "data": {"client": {"username": "bridge",
                "roles": [{"rolename": "bridge-publisher"}]}}}),
            "bridge"
        ));
        assert!(!is_ours(
            &json!({"command": "getClient", "data": {"client": {"username": "admin"}}}),
            "admin"
        ));
    }

    #[test]
    fn not_found_on_delete_is_fine_other_errors_are_not() {
        let cmds = grant_commands(&grant());
        let ok = vec![
            json!({"command": "deleteClient", "error": "Client not found"}),
            json!({"command": "deleteRole", "error": "Role not found"}),
            json!({"command": "createRole"}),
            json!({"command": "createClient"}),
        ];
        assert!(check_responses(&cmds, &ok).is_ok());
        let mut bad = ok.clone();
        bad[3] = json!({"command": "createClient", "error": "Client already exists"});
        assert!(check_responses(&cmds, &bad).is_err());
        assert!(check_responses(&cmds, &ok[..2]).is_err(), "missing answers");
    }
}
