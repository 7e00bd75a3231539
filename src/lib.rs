//! delta-bridge: committed PostgreSQL row changes to per-branch MQTT delta topics, at least once.
//!
//! The data path, in the order a change travels:
//! - [`capture`]: triggers (installed by [`schema`]) write each committed change to an outbox table in the
//!   writer's own transaction; this module reads, deletes and dead-letters outbox rows.
//! - [`convert`]: an outbox row becomes a device event (topic + JSON payload). Pure functions.
//! - [`deliver`]: QoS 1 publishing over MQTT 5, with our own record of what the broker acknowledged.
//! - [`pipeline`]: ties them together on the leader replica; deletes a row only after its PUBACK,
//!   dead-letters what cannot be converted or is refused.
//!
//! Beside it, the provisioning side: [`provision`] (device credentials, ACLs, broker accounts, and the device
//! API's handlers). The surface: [`http`] (routes: health, readiness, metrics, the device API), [`openapi`]
//! (the API's OpenAPI document), [`metrics`], [`health`]. Wiring: [`service`] (what the binary calls),
//! [`config`] (file + environment, validated).
//!
//! Plumbing, imported by the domain modules and importing none of them: [`pg`] (PostgreSQL sessions),
//! [`locks`] (who holds the bridge's advisory locks; the leader's heartbeat), [`schema`] (migrations of the
//! bridge's own objects, from `sql/`, the capture triggers with short locks, uninstall), [`mqtt`] (client
//! options), [`tls`] (CA roots and certificate checks of every TLS connection), [`backoff`].
//!
//! The public API is what the `delta-bridge` binary, `delta-load` and the tests use: [`config`], [`service`],
//! the device request and response types, the connection helpers [`pg::connect`] and
//! [`mqtt::mqtt_options`], and [`LEADER_LOCK`] and [`MIGRATE_LOCK`] (for operators' and tests' look-ups in
//! `pg_locks`).

// Narrowest visibility first: an item is `pub` only if the binary, delta-load or the tests use it.
#![warn(unreachable_pub)]

pub(crate) mod backoff;
pub(crate) mod capture;
pub(crate) mod catchup;
pub mod config;
pub(crate) mod convert;
pub(crate) mod deliver;
pub(crate) mod fault;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod locks;
pub(crate) mod metrics;
pub mod mqtt;
pub(crate) mod openapi;
pub mod pg;
pub(crate) mod pipeline;
pub(crate) mod provision;
pub(crate) mod schema;
pub mod service;
pub(crate) mod tls;

pub use capture::outbox::LEADER_LOCK;
pub use provision::{IssueRequest, IssuedCredentials, ProvisionError};
pub use schema::{MigrateError, Migrated, Uninstalled, MIGRATE_LOCK};
