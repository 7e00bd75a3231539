//! The published migrations, statement by statement, and what each statement does to a business table: the
//! runner executes the bridge's own objects of a migration in one transaction, and each business-table
//! statement on its own terms (an index concurrently, a table's triggers in a transaction of their own, a
//! fence only while capture is attached). The migration files themselves stay exactly as published.
//!
//! The splitter knows just enough SQL to find the statements' ends: `--` and nested `/* */` comments, quoted
//! literals and identifiers, and dollar-quoted bodies (`$$ ... $$`, `$tag$ ... $tag$`), inside which a `;`
//! ends nothing. A statement that names a business table (`@schema@.`) outside those bodies and is none of
//! the kinds below is refused ([`Unsupported`]): the runner could not bound the locks it takes.

/// What one statement of a migration does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kind {
    /// Creates or changes only the bridge's own objects.
    Bridge,
    /// `CREATE [UNIQUE] INDEX [IF NOT EXISTS] name ON @schema@.table rest`: built concurrently, outside any
    /// transaction.
    Index {
        table: String,
        name: String,
        unique: bool,
        /// What follows the table: the method and columns, `(transaction_id)`.
        rest: String,
    },
    /// `CREATE [CONSTRAINT] TRIGGER name ... ON @schema@.table ...`: attached with the table's other
    /// triggers, in a transaction of that table's own.
    Trigger { table: String, name: String },
    /// `LOCK TABLE @schema@.a, ... IN ... MODE`: a fence against writers that run the bridge's functions
    /// while the migration replaces them; pointless (and skipped) while no capture trigger is attached.
    Fence { tables: Vec<String> },
}

/// One statement: its text as published (without the `;`), and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Statement {
    pub(super) text: String,
    pub(super) kind: Kind,
}

/// A statement names a business table in a way the runner cannot bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("statement touches a business table in a way the migration runner cannot bound: {0}")]
pub(crate) struct Unsupported(pub(crate) String);

const PLACEHOLDER: &str = "@schema@.";

/// Splits `sql` (a migration's template, before `@schema@` is replaced) into classified statements.
pub(super) fn statements(sql: &str) -> Result<Vec<Statement>, Unsupported> {
    scan(sql)
        .into_iter()
        .map(|(text, code)| {
            let kind = classify(&code).ok_or_else(|| Unsupported(first_line(&code)))?;
            Ok(Statement {
                text: text.trim().to_string(),
                kind,
            })
        })
        .collect()
}

fn first_line(code: &str) -> String {
    let flat: Vec<&str> = code.split_whitespace().collect();
    let mut s = flat.join(" ");
    if s.len() > 120 {
        let mut end = 120;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" ...");
    }
    s
}

/// The statements of `sql`, each as (published text, code only: comments, literals and bodies blanked).
/// Statements with no code (comments only) are left out.
fn scan(sql: &str) -> Vec<(&str, String)> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    let mut code = String::new();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'-' && next == Some(b'-') {
            i = sql[i..].find('\n').map_or(b.len(), |n| i + n);
            code.push(' ');
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            code.push(' ');
        } else if c == b'\'' || c == b'"' {
            // E'...' allows backslash escapes.
            let escapes = c == b'\'' && i > 0 && matches!(b[i - 1], b'E' | b'e') && (i < 2 || !ident(b[i - 2]));
            let from = i;
            i += 1;
            while i < b.len() {
                // A backslash escape (E'...') or a doubled quote: two bytes that do not end it.
                if (escapes && b[i] == b'\\') || (b[i] == c && b.get(i + 1) == Some(&c)) {
                    i += 2;
                } else if b[i] == c {
                    break;
                } else {
                    i += 1;
                }
            }
            i = (i + 1).min(b.len());
            // An identifier stays in the code (it may name a table); a literal's content does not.
            if c == b'"' {
                code.push_str(&sql[from..i]);
            } else {
                code.push_str(" '' ");
            }
        } else if let Some(tag) = (c == b'$' && (i == 0 || !ident(b[i - 1])))
            .then(|| dollar_tag(&sql[i..]))
            .flatten()
        {
            let body = i + tag.len();
            i = sql[body..].find(tag).map_or(b.len(), |n| body + n + tag.len());
            code.push_str(" $$ ");
        } else if c == b';' {
            if !code.trim().is_empty() {
                out.push((&sql[start..i], std::mem::take(&mut code)));
            }
            code.clear();
            i += 1;
            start = i;
        } else {
            let ch = sql[i..].chars().next().unwrap_or(' ');
            code.push(ch);
            i += ch.len_utf8();
        }
    }
    if !code.trim().is_empty() {
        out.push((&sql[start..], code));
    }
    out
}

/// `$$` or `$tag$` at the start of `s`.
fn dollar_tag(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('$')?;
    let end = rest.find('$')?;
    let tag = &rest[..end];
    let valid = tag.is_empty()
        || (tag.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    valid.then(|| &s[..end + 2])
}

/// The business table a target like `@schema@.products` names.
fn business_table(target: &str) -> Option<String> {
    let t = target.strip_prefix(PLACEHOLDER)?;
    (!t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then(|| t.to_string())
}

/// None: the statement names a business table outside the kinds the runner knows.
fn classify(code: &str) -> Option<Kind> {
    let words: Vec<&str> = code.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let is = |i: usize, w: &str| upper.get(i).is_some_and(|u| u == w);
    let touches_business = code.contains(PLACEHOLDER);
    let kind = if is(0, "CREATE") && (is(1, "INDEX") || (is(1, "UNIQUE") && is(2, "INDEX"))) {
        let unique = is(1, "UNIQUE");
        let mut at = if unique { 3 } else { 2 };
        if is(at, "IF") && is(at + 1, "NOT") && is(at + 2, "EXISTS") {
            at += 3;
        }
        let on = (at..upper.len()).find(|&i| upper[i] == "ON")?;
        let name = words.get(at).filter(|_| on == at + 1)?.to_string();
        match words.get(on + 1).and_then(|t| business_table(t)) {
            // The rest of the statement after the table, rebuilt from the code: refused if it had a literal.
            Some(table) if !words[on + 2..].iter().any(|w| w.contains("''") || w.contains("$$")) => Kind::Index {
                table,
                name,
                unique,
                rest: words[on + 2..].join(" "),
            },
            Some(_) => return None,
            None => Kind::Bridge,
        }
    } else if is(0, "CREATE") && (is(1, "TRIGGER") || (is(1, "CONSTRAINT") && is(2, "TRIGGER"))) {
        let at = if is(1, "TRIGGER") { 2 } else { 3 };
        let name = words.get(at)?.to_string();
        let on = (at..upper.len()).find(|&i| upper[i] == "ON")?;
        match words.get(on + 1).and_then(|t| business_table(t)) {
            Some(table) => Kind::Trigger { table, name },
            None => Kind::Bridge,
        }
    } else if is(0, "LOCK") && touches_business {
        let from = if is(1, "TABLE") { 2 } else { 1 };
        let mut tables = Vec::new();
        for w in words.iter().skip(from) {
            if w.eq_ignore_ascii_case("IN") {
                break;
            }
            for t in w.split(',').filter(|t| !t.is_empty()) {
                tables.push(business_table(t)?);
            }
        }
        Kind::Fence { tables }
    } else {
        Kind::Bridge
    };
    match kind {
        Kind::Bridge if touches_business => None,
        k => Some(k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_top_level_semicolons_only() {
        let sql = "-- a comment; not a statement\nCREATE TABLE a (x text DEFAULT 'a;b');\n\
                   CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM 1; END $$;\n\
                   /* block; /* nested; */ still */ SELECT $x$ ; $x$, \"we;ird\", E'it\\'s;';\n-- trailing";
        let s: Vec<String> = scan(sql).into_iter().map(|(t, _)| t.trim().to_string()).collect();
        assert_eq!(s.len(), 3, "{s:#?}");
        assert!(s[0].ends_with("DEFAULT 'a;b')"));
        assert!(s[1].ends_with("END $$"));
        assert!(s[2].ends_with("E'it\\'s;'"));
    }

    #[test]
    fn classifies_business_table_statements() {
        let k = |sql: &str| statements(sql).map(|s| s[0].kind.clone());
        assert_eq!(
            k("CREATE INDEX IF NOT EXISTS ix ON @schema@.transaction_items (transaction_id)"),
            Ok(Kind::Index {
                table: "transaction_items".into(),
                name: "ix".into(),
                unique: false,
                rest: "(transaction_id)".into()
            })
        );
        assert_eq!(
            k("CREATE INDEX ix ON delta_bridge.outbox (xact) WHERE xact IS NOT NULL"),
            Ok(Kind::Bridge)
        );
        assert_eq!(
            k(
                "CREATE CONSTRAINT TRIGGER t_upd AFTER UPDATE ON @schema@.products DEFERRABLE INITIALLY DEFERRED \
               FOR EACH ROW WHEN (OLD.stock IS DISTINCT FROM NEW.stock) EXECUTE FUNCTION delta_bridge.f()"
            ),
            Ok(Kind::Trigger {
                table: "products".into(),
                name: "t_upd".into()
            })
        );
        assert_eq!(
            k("LOCK TABLE @schema@.transactions, @schema@.transaction_items IN SHARE MODE"),
            Ok(Kind::Fence {
                tables: vec!["transactions".into(), "transaction_items".into()]
            })
        );
        // A body that names business tables is the bridge's own function.
        assert_eq!(
            k("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ SELECT 1 FROM @schema@.products $$"),
            Ok(Kind::Bridge)
        );
        assert!(k("ALTER TABLE @schema@.products ADD COLUMN x int").is_err());
    }

    /// Every published migration splits: its business-table statements are the ten capture triggers and the
    /// index of migration 1, migration 4's fence, the four delete triggers of migration 8, and migration 10's delete
    /// notes and move triggers.
    #[test]
    fn the_published_migrations_split() {
        let mut triggers = Vec::new();
        for (version, _, sql) in super::super::MIGRATIONS {
            let all = statements(sql).unwrap_or_else(|e| panic!("migration {version}: {e}"));
            for s in &all {
                match &s.kind {
                    Kind::Trigger { table, name } => triggers.push((*version, table.clone(), name.clone())),
                    Kind::Index { table, name, .. } => {
                        assert_eq!(
                            (*version, table.as_str(), name.as_str()),
                            (1, "transaction_items", "delta_bridge_items_by_sale")
                        )
                    }
                    Kind::Fence { tables } => assert_eq!((*version, tables.len()), (4, 2)),
                    Kind::Bridge => {}
                }
            }
        }
        assert_eq!(triggers.iter().filter(|(v, _, _)| *v == 1).count(), 10, "{triggers:?}");
        let deletes: Vec<(i32, &str, &str)> = triggers
            .iter()
            .filter(|(v, _, _)| *v != 1)
            .map(|(v, t, n)| (*v, t.as_str(), n.as_str()))
            .collect();
        assert_eq!(
            deletes,
            [
                (8, "products", "delta_bridge_capture_del"),
                (8, "inventory", "delta_bridge_capture_del"),
                (8, "transactions", "delta_bridge_a_note_del"),
                (8, "transactions", "delta_bridge_capture_del"),
                (10, "products", "delta_bridge_a_note_del"),
                (10, "inventory", "delta_bridge_a_note_del"),
                (10, "products", "delta_bridge_capture_move"),
                (10, "inventory", "delta_bridge_capture_move")
            ]
        );
    }
}
