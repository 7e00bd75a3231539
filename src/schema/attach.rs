//! Attaching capture to the business tables: the indexes the migrations create on them, built concurrently,
//! and the capture triggers, one table per transaction. Checked on every `migrate`, each trigger by name and
//! each index by validity, so that only what is missing is done (see the parent module).

use tokio_postgres::Client;

use super::ddl::{self, Body, Runner, Step};
use super::split::{Kind, Statement};
use super::{quote_ident, substitute, MigrateError};

/// Builds what is missing of the business-table indexes and attaches the missing capture triggers, one table
/// per transaction, in the order the migrations name them. Returns what it did.
pub(super) async fn attach(
    client: &mut Client,
    schema: &str,
    runner: &Runner,
    plans: &[Vec<Statement>],
) -> Result<Vec<String>, MigrateError> {
    let statements = plans.iter().flatten();
    let mut done = Vec::new();
    let qualified = |t: &str| format!("{}.{}", quote_ident(schema), quote_ident(t));
    for s in statements.clone() {
        let Kind::Index {
            table,
            name,
            unique,
            rest,
        } = &s.kind
        else {
            continue;
        };
        let index = qualified(name);
        if ddl::index_valid(client, &index).await? == Some(true) {
            continue;
        }
        let step = Step {
            what: format!("building index {schema}.{name}"),
            tables: vec![format!("{schema}.{table}")],
            all: vec![],
            writes: vec![qualified(table)],
            body: Body::Index {
                create: format!(
                    "CREATE {}INDEX CONCURRENTLY IF NOT EXISTS {} ON {} {}",
                    if *unique { "UNIQUE " } else { "" },
                    quote_ident(name),
                    qualified(table),
                    substitute(rest, schema)
                ),
                index,
            },
        };
        runner
            .run(client, &step)
            .await
            .map_err(|e| MigrateError::of_step(&step.what, &step.tables, e))?;
        done.push(format!("index {schema}.{name}"));
    }
    // Each table's triggers, the latest definition of each name, in the order the tables first appear.
    let mut tables: Vec<(&str, Vec<(&str, &str)>)> = Vec::new();
    for s in statements {
        if let Kind::Trigger { table, name } = &s.kind {
            let at = match tables.iter().position(|(t, _)| t == table) {
                Some(at) => at,
                None => {
                    tables.push((table, Vec::new()));
                    tables.len() - 1
                }
            };
            let triggers = &mut tables[at].1;
            triggers.retain(|(n, _)| n != name);
            triggers.push((name, &s.text));
        }
    }
    for (table, triggers) in tables {
        let present: Vec<String> = client
            .query(
                "SELECT tgname::text FROM pg_catalog.pg_trigger
                  WHERE tgrelid = pg_catalog.to_regclass($1)::oid AND NOT tgisinternal",
                &[&qualified(table)],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let missing: Vec<String> = triggers
            .iter()
            .filter(|(name, _)| !present.iter().any(|p| p == name))
            .map(|(_, text)| substitute(text, schema))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let step = Step {
            what: format!("attaching the capture triggers to {schema}.{table}"),
            tables: vec![format!("{schema}.{table}")],
            all: vec![],
            writes: vec![qualified(table)],
            body: Body::Tx(missing.join(";\n")),
        };
        runner
            .run(client, &step)
            .await
            .map_err(|e| MigrateError::of_step(&step.what, &step.tables, e))?;
        done.push(format!("capture triggers on {schema}.{table}"));
    }
    Ok(done)
}
