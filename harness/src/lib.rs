//! delta-harness: the tools around delta-bridge that are not the service. Nothing here ships in the service
//! binary built without its default `demo` feature, and nothing here uses the service's internals: it talks
//! to a bridge the way users and devices do (its config file, HTTP, MQTT, the database).
//!
//! - [`servers`]: private PostgreSQL and Mosquitto servers on free loopback ports, from the system's binaries.
//! - [`stack`]: the one set-up of "private servers + reference schema + bridge config" that the tests, the
//!   benchmarks, `delta-load`'s tests and the demo share.
//! - [`subscriber`]: an MQTT 5 subscription held the way a device holds one.
//! - [`devices`]: simulated offline-first devices (persistent sessions, catch-up through the API) for the
//!   load engine and the demo.
//! - [`loadgen`]: the load engine behind `delta-load`, the benchmarks and the fault tests.
//! - [`schemas`]: the payload JSON Schemas of `docs/schemas/`, which every received message is checked against.
//! - [`chaos`]: crash faults on a schedule (leader, broker, database, lost session) under the load, with a
//!   probe that measures each recovery; behind `benches/chaos.rs` and `tests/chaos.rs`.
//! - [`demo`]: `delta-bridge demo`, the one-command tour (runs the bridge binary as a child process).

pub mod chaos;
pub mod demo;
pub mod devices;
pub mod loadgen;
pub mod schemas;
pub mod servers;
pub mod stack;
pub mod subscriber;
