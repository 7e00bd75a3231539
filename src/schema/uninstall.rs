//! `delta-bridge uninstall`: takes capture off the business tables, and with `--drop-schema` removes the
//! bridge's schema too.
//!
//! Every trigger that runs a function of the schema `delta_bridge` is dropped, whatever table it is on and
//! whichever version attached it (a newer version's too: an older binary can remove what a newer one
//! installed), one table per transaction with the migrations' short lock ([`super::ddl`]; `DROP TRIGGER`
//! takes an ACCESS EXCLUSIVE lock, which readers queue behind as well). The index on
//! `transaction_items (transaction_id)` stays: the business's own queries may have come to rely on it.
//!
//! Without `--drop-schema` the schema stays with everything in it (undelivered outbox rows, dead letters,
//! device records) and the trigger functions, which nothing calls any more: `migrate` (or `run`) attaches
//! the triggers again and capture resumes, with the same sequence. With it, the schema goes after the
//! command has said what is in it; a later install starts `seq` above every earlier one (see the parent
//! module).
//!
//! It runs under the migration lock (so no replica installs while it removes) and the leader lock (so no
//! replica starts publishing meanwhile). A replica that holds the leader lock makes it refuse, unless forced:
//! a running bridge would find its objects gone, and a restarting one would attach capture again.

use tokio_postgres::Client;

use super::ddl::{Body, Runner, Step};
use super::{describe, quote_ident, release, take_migrate_lock, Limits, MigrateError};
use crate::locks::{self, Holder};

/// What `uninstall` is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UninstallOptions {
    /// Also drop the schema `delta_bridge`.
    pub(crate) drop_schema: bool,
    /// Go on while a replica holds the leader lock.
    pub(crate) force: bool,
}

/// What an `uninstall` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// The tables whose capture triggers were dropped now.
    pub untriggered: Vec<String>,
    /// Whether the schema was dropped now.
    pub dropped_schema: bool,
}

/// Removes capture (see the module's doc). `say` is told what is about to be dropped, before it is.
pub(crate) async fn uninstall(
    client: &mut Client,
    limits: Limits,
    leader_lock: i64,
    opts: UninstallOptions,
    waiting: &mut (dyn FnMut(&[Holder]) + Send),
    say: &mut (dyn FnMut(&str) + Send),
) -> Result<Uninstalled, MigrateError> {
    take_migrate_lock(client, limits.migrate_lock, waiting).await?;
    let result = uninstall_locked(client, limits, leader_lock, opts, say).await;
    release(client, leader_lock).await;
    release(client, super::MIGRATE_LOCK).await;
    result
}

async fn uninstall_locked(
    client: &mut Client,
    limits: Limits,
    leader_lock: i64,
    opts: UninstallOptions,
    say: &mut (dyn FnMut(&str) + Send),
) -> Result<Uninstalled, MigrateError> {
    client.batch_execute("SET search_path = pg_catalog, pg_temp").await?;
    let runner = Runner::start(client, limits).await?;
    let leading: bool = !client
        .query_one("SELECT pg_catalog.pg_try_advisory_lock($1)", &[&leader_lock])
        .await?
        .try_get::<_, bool>(0)?;
    if leading {
        let (holders, heartbeats) = locks::leader_holders(client, leader_lock).await?;
        let described: Vec<String> = holders
            .iter()
            .map(|h| match h.leader_squat(heartbeats) {
                None => format!("{h}, leading"),
                Some(why) => format!("{h}, {why}"),
            })
            .collect();
        let holders = if described.is_empty() {
            describe(&holders, "a session that has just let go of it")
        } else {
            described.join("; ")
        };
        if !opts.force {
            return Err(MigrateError::Leading {
                lock: leader_lock,
                holders,
            });
        }
        tracing::warn!(%holders, "--force: removing capture although a session holds the leader lock");
    }
    // Every trigger running a function of the bridge's schema (a partition's clones go with their parent's).
    let rows = client
        .query(
            "SELECT t.tgrelid::regclass::text, t.tgname::text
               FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
              WHERE p.pronamespace = pg_catalog.to_regnamespace('delta_bridge')::oid AND t.tgparentid = 0
              ORDER BY 1, 2",
            &[],
        )
        .await?;
    let mut tables: Vec<(String, Vec<String>)> = Vec::new();
    for r in &rows {
        let (table, name): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        match tables.last_mut() {
            Some((t, names)) if *t == table => names.push(name),
            _ => tables.push((table, vec![name])),
        }
    }
    let mut done = Uninstalled::default();
    for (table, names) in tables {
        let sql: Vec<String> = names
            .iter()
            .map(|n| format!("DROP TRIGGER IF EXISTS {} ON {table}", quote_ident(n)))
            .collect();
        let step = Step {
            what: format!("removing the capture triggers from {table}"),
            tables: vec![table.clone()],
            all: vec![table.clone()],
            writes: vec![],
            body: Body::Tx(sql.join(";\n")),
        };
        runner
            .run(client, &step)
            .await
            .map_err(|e| MigrateError::of_step(&step.what, &step.tables, e))?;
        say(&format!(
            "removed the capture triggers from {table}: {}",
            names.join(", ")
        ));
        done.untriggered.push(table);
    }
    if done.untriggered.is_empty() {
        say("no capture trigger attached: nothing to remove");
    }
    if !opts.drop_schema {
        return Ok(done);
    }
    let contents = schema_contents(client).await?;
    let Some(contents) = contents else {
        say("schema delta_bridge does not exist: nothing to drop");
        return Ok(done);
    };
    say(&format!(
        "dropping schema delta_bridge and everything in it: {contents}"
    ));
    let step = Step {
        what: "dropping the schema delta_bridge".into(),
        tables: vec!["delta_bridge.outbox".into()],
        all: vec!["delta_bridge.outbox".into()],
        writes: vec![],
        body: Body::Tx("DROP SCHEMA delta_bridge CASCADE".into()),
    };
    runner
        .run(client, &step)
        .await
        .map_err(|e| MigrateError::of_step(&step.what, &step.tables, e))?;
    say("dropped schema delta_bridge");
    done.dropped_schema = true;
    Ok(done)
}

/// What the schema holds, table by table with its rows (counted up to a million), or None without a schema.
async fn schema_contents(client: &Client) -> Result<Option<String>, MigrateError> {
    let exists: bool = client
        .query_one("SELECT pg_catalog.to_regnamespace('delta_bridge') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let tables: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_class c
              WHERE c.relnamespace = pg_catalog.to_regnamespace('delta_bridge')::oid AND c.relkind IN ('r', 'p')
              ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut parts = Vec::new();
    for t in tables {
        let n: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM (SELECT 1 FROM delta_bridge.{} LIMIT 1000001) s",
                    quote_ident(&t)
                ),
                &[],
            )
            .await?
            .try_get(0)?;
        let count = match n {
            1 => "1 row".to_string(),
            n if n > 1_000_000 => "over 1000000 rows".to_string(),
            n => format!("{n} rows"),
        };
        let meaning = match t.as_str() {
            "outbox" => " (captured changes not yet published: they will never be)",
            "dead_letter" => " (events that could not be published)",
            "devices" => " (device credential records; the broker accounts stay on the broker)",
            "device_events" => " (the devices' credential history)",
            _ => "",
        };
        parts.push(format!("{t}: {count}{meaning}"));
    }
    parts.push("the capture functions and the outbox sequence".into());
    Ok(Some(parts.join("; ")))
}
