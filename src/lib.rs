//! delta-bridge: committed PostgreSQL row changes to per-branch MQTT delta topics, at least once.
//!
//! The data path, one module each:
//! - [`capture`]: triggers write each committed change to an outbox table in the writer's own transaction;
//!   the leader replica reads it (woken by NOTIFY only when idle).
//! - [`convert`]: an outbox row becomes a device event (topic + JSON payload) — pure functions.
//! - [`deliver`]: QoS 1 publishing over MQTT 5 with our own record of what the broker acknowledged.
//! - [`bridge`]: the pipeline tying them together: deletes a row only after its PUBACK, dead-letters what
//!   cannot be converted or is refused.
//!
//! Beside it: [`provision`] (device credentials, ACLs and broker accounts, behind the device API),
//! [`config`] (file + environment, validated), [`http`] (health, readiness, metrics),
//! [`metrics`], [`localenv`] (private PostgreSQL and Mosquitto for the demo and tests), [`loadgen`]
//! (the load harness behind `delta-load` and `demo`), [`subscriber`] (a device-like MQTT subscription for
//! both and the tests), [`demo`].

pub mod backoff;
pub mod capture;
pub mod config;
pub mod convert;
pub mod deliver;
pub mod health;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod pg;
pub mod pipeline;
pub mod provision;
pub mod schema;
pub mod service;
