//! The one set-up that the tests, the benchmarks, `delta-load`'s own test and the demo share: a fresh
//! directory, a private PostgreSQL with database `mstore` holding the reference schema (and, if asked, seed
//! rows), a private Mosquitto, and the bridge configuration that points at them. Dropping a [`Stack`] stops
//! both servers and removes the directory it created (kept, and said so, when a test is panicking).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rumqttc::v5::MqttOptions;

use crate::loadgen::Target;
use crate::servers::{ExtraListen, LocalEnvError, Mosquitto, Postgres, ServerTls};

/// The business tables the bridge attaches to (`sql/reference_schema.sql`).
pub const REFERENCE_SCHEMA: &str = include_str!("../../sql/reference_schema.sql");

/// The database every stack creates.
pub const DATABASE: &str = "mstore";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new, empty directory `{temp}/delta-bridge-{tag}-{pid}-{n}` for one stack.
pub fn temp_dir(tag: &str) -> std::io::Result<PathBuf> {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("delta-bridge-{tag}-{}-{n}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Starts a broker in the directory it is given.
pub type StartBroker<'a> = Box<dyn FnOnce(&Path) -> Result<Mosquitto, LocalEnvError> + 'a>;

/// How to start a stack.
pub struct StackOptions<'a> {
    /// Names the directory.
    pub tag: &'a str,
    /// Commits wait for the disk (benchmarks); off for tests, where a killed server still recovers.
    pub durable: bool,
    /// SQL run after the reference schema (sample merchants, branches, products).
    pub seed: Option<&'a str>,
    /// Starts the broker in the directory it is given (default: [`Mosquitto::start`]).
    pub mqtt: Option<StartBroker<'a>>,
    /// An existing directory to work in instead of a new temporary one; the stack then creates and removes
    /// only its own `pg/` and `mqtt/` inside it.
    pub dir: Option<PathBuf>,
    /// Addresses both servers listen on besides 127.0.0.1 (e.g. the host side of a test's veth pairs, for a
    /// bridge in a network namespace). A custom `mqtt` starter gets them passed to it by the caller.
    pub listen_also: Vec<ExtraListen>,
    /// PostgreSQL offers TLS with this certificate (`ssl = on`; plain connections are still accepted).
    pub pg_tls: Option<ServerTls>,
}

impl<'a> StackOptions<'a> {
    pub fn new(tag: &'a str) -> Self {
        StackOptions {
            tag,
            durable: false,
            seed: None,
            mqtt: None,
            dir: None,
            listen_also: Vec::new(),
            pg_tls: None,
        }
    }
}

/// Private servers with the reference schema, in a directory of their own.
pub struct Stack {
    pub dir: PathBuf,
    pub pg: Postgres,
    pub mqtt: Mosquitto,
    /// Leave the servers' files behind on drop (logs and data, for inspection).
    pub keep: bool,
    /// The directory is ours (a new temporary one): removed whole on drop.
    owns_dir: bool,
}

impl Stack {
    pub fn start(opts: StackOptions<'_>) -> Result<Stack, LocalEnvError> {
        let owns_dir = opts.dir.is_none();
        let dir = match opts.dir {
            Some(d) => d,
            None => temp_dir(opts.tag).map_err(|e| LocalEnvError::Failed {
                what: "temp dir".into(),
                detail: e.to_string(),
            })?,
        };
        let pg = Postgres::start_tls(&dir.join("pg"), opts.durable, &opts.listen_also, opts.pg_tls.as_ref())?;
        let mqtt = match opts.mqtt {
            Some(start) => start(&dir.join("mqtt"))?,
            None => Mosquitto::start_on(&dir.join("mqtt"), "allow_anonymous true\n", &opts.listen_also)?,
        };
        pg.psql("postgres", &format!("CREATE DATABASE {DATABASE}"))?;
        pg.psql(DATABASE, REFERENCE_SCHEMA)?;
        if let Some(seed) = opts.seed {
            pg.psql(DATABASE, seed)?;
        }
        Ok(Stack {
            dir,
            pg,
            mqtt,
            keep: false,
            owns_dir,
        })
    }

    /// `postgres://postgres@127.0.0.1:PORT/mstore`
    pub fn pg_url(&self) -> String {
        self.pg.url(DATABASE)
    }

    /// A bridge configuration pointing at this stack: `env`, `[postgres]`, `[mqtt]` and `[http]` (in that
    /// order, so that callers append further sections).
    pub fn bridge_toml(&self, env: &str, client_id: &str, listen: &str) -> String {
        format!(
            "env = \"{env}\"\n[postgres]\nurl = \"{}\"\n[mqtt]\nurl = \"{}\"\nclient_id = \"{client_id}\"\n[http]\nlisten = \"{listen}\"\n",
            self.pg_url(),
            self.mqtt.url(),
        )
    }

    /// What the load engine needs to drive this stack (anonymous MQTT, plain PostgreSQL).
    pub fn load_target(&self, env: &str) -> Target {
        let mut mqtt = MqttOptions::new("delta-load", "127.0.0.1", self.mqtt.port);
        mqtt.set_keep_alive(Duration::from_secs(5));
        Target::new(
            env,
            mqtt,
            Target::plain_postgres(self.pg_url(), Duration::from_secs(10)),
        )
    }
}

/// The accounts a dynamic-security Mosquitto needs beside the devices that the bridge provisions: `bridge`
/// (publishes under `dev/#`, nothing else) and `loadgen` (the load harness's listener, subscribes to `dev/#`).
/// The demo and the tests that run devices set their broker up with this.
pub fn dynsec_accounts(
    mqtt: &Mosquitto,
    admin_password: &str,
    bridge_password: &str,
    load_password: &str,
) -> Result<(), LocalEnvError> {
    for args in [
        vec!["createRole", "bridge-publisher"],
        vec!["addRoleACL", "bridge-publisher", "publishClientSend", "dev/#", "allow"],
        vec!["createClient", "bridge", "-p", bridge_password],
        vec!["addClientRole", "bridge", "bridge-publisher"],
        vec!["createRole", "load-listener"],
        vec!["addRoleACL", "load-listener", "subscribePattern", "dev/#", "allow"],
        vec!["createClient", "loadgen", "-p", load_password],
        vec!["addClientRole", "loadgen", "load-listener"],
    ] {
        mqtt.dynsec("admin", admin_password, &args)?;
    }
    Ok(())
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.pg.stop(true);
        self.mqtt.stop(true);
        if std::thread::panicking() {
            eprintln!("test environment kept for inspection: {}", self.dir.display());
        } else if self.keep {
        } else if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            let _ = std::fs::remove_dir_all(self.dir.join("pg"));
            let _ = std::fs::remove_dir_all(self.dir.join("mqtt"));
        }
    }
}
