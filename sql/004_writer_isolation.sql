-- delta-bridge migration 4: a writer with DML rights on the business tables cannot reach the bridge's
-- bookkeeping, functions or operators. Replaces the capture functions of migration 1 (the triggers stay).
--
-- * The per-transaction sale bookkeeping no longer lives in transaction-local settings, which any writer can
--   set to anything, but in two tables of this schema that writers cannot read or write:
--     sale_notes  the sales this transaction touched (through their row or their items) and has not captured
--                 yet, and whether it inserted them;
--     sale_dirty  one row while sale_notes has any for the transaction: the one lookup a capture needs.
--   Both are keyed by the transaction's own id, pg_current_xact_id(). Capture deletes the rows it consumes, in
--   the same transaction that wrote them, so no row of either table ever commits: no other session sees them,
--   nothing accumulates, and a rolled-back savepoint takes its notes with it. UNLOGGED, since no row outlives
--   its transaction: writing them costs no WAL and a crash has nothing to recover.
-- * A sale's outbox row names the transaction that wrote it (xact) and the sale (sale_id). When capture runs
--   again in the same transaction (after SET CONSTRAINTS ... IMMEDIATE it runs per statement), it finds that
--   row through outbox_sale_by_xact and updates it: a sale still yields one event per transaction, and the
--   only state kept between captures is the outbox row itself.
-- * The stock and quantity events of a transaction that wrote sales name the highest-numbered sale it touched
--   (through the sale's row or its items) that still exists: one lookup in that index, not a setting.
-- * Every function is SECURITY DEFINER with SET search_path = pg_catalog, pg_temp: every function, operator
--   and type name in them resolves in pg_catalog first (pg_temp is searched for tables and types only, after
--   pg_catalog, never for functions or operators; tables are always schema-qualified here), so nothing a
--   writer creates in public or anywhere else runs inside them, as the owner or as anyone. No function sets a
--   setting any more, so the SET clause (which would undo a set_config(.., true) made inside it) loses nothing.
-- * The functions that look up this transaction's rows (in sale_dirty, sale_notes and the outbox) run with
--   enable_seqscan = off. Those tables look empty to the planner most of the time (their rows live for one
--   transaction, the outbox's for milliseconds), so it would plan a sequential scan, keep that plan for the
--   session, and then scan a whole table per row once one transaction or a bridge outage fills it: quadratic.
--   With the setting every lookup goes through its index whatever the statistics say.
-- * EXECUTE on every function of this schema is revoked from PUBLIC, also on functions that the owner creates
--   here later (default privileges). PostgreSQL checks EXECUTE on a trigger function when a trigger is
--   created, not when it fires (checked on PostgreSQL 15 by tests/security.rs): the triggers on the business
--   tables keep capturing every writer's changes, while a writer can neither call a bridge function nor attach
--   one to a table of its own. replay() is for operators: the owner grants EXECUTE on it to their role.
-- * Each trigger function checks TG_RELID against the business table it is written for (or a partition of it,
--   to which PostgreSQL clones the table's triggers; attaching one takes the table's owner) and does nothing
--   anywhere else, in case someone allowed to attach it puts it on another table.
-- * The writer's settings still read are delta_bridge.reason, .transaction_id and .actor (they describe the
--   writer's own changes, in its own transaction) and .no_wake (two-phase commit). USAGE on the schema stays
--   granted to PUBLIC (migration 1): it lets an operator's role be granted single objects and gives nothing by
--   itself.
--
-- @schema@ is replaced by the (quoted) schema of the business tables before this runs, and @schema_literal@ by
-- the same with its single quotes doubled, for use inside a string literal ('@schema_literal@.products').

-- Writers in flight when this runs: a transaction that noted sales the old way (in settings) must commit under
-- the functions that read them. SHARE waits for every transaction that wrote sales or items and holds new ones
-- until this commits. Taken before anything of the bridge is locked, so that a writer committing meanwhile
-- (its capture writes the outbox) cannot deadlock with this migration.
LOCK TABLE @schema@.transactions, @schema@.transaction_items IN SHARE MODE;

CREATE UNLOGGED TABLE delta_bridge.sale_notes (
    xact    xid8    NOT NULL,
    sale_id bigint  NOT NULL,
    created boolean NOT NULL,
    PRIMARY KEY (xact, sale_id)
);
CREATE UNLOGGED TABLE delta_bridge.sale_dirty (
    xact    xid8    PRIMARY KEY
);
-- Every row is deleted by the transaction that wrote it: vacuum often, like the outbox.
ALTER TABLE delta_bridge.sale_notes SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE delta_bridge.sale_dirty SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0);

ALTER TABLE delta_bridge.outbox ADD COLUMN xact xid8, ADD COLUMN sale_id bigint;
CREATE INDEX outbox_sale_by_xact ON delta_bridge.outbox (xact, sale_id) WHERE xact IS NOT NULL;

CREATE OR REPLACE FUNCTION delta_bridge.wake_key() RETURNS bigint
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS
$$ SELECT 7234298723001::bigint $$;

-- Unchanged but for SECURITY DEFINER: whoever the owner grants EXECUTE to may replay, without rights of its own
-- on the outbox and the dead letters.
ALTER FUNCTION delta_bridge.replay(bigint[]) SECURITY DEFINER;

-- As in migration 1, now SECURITY DEFINER: a writer needs no right on the advisory-lock key or on NOTIFY.
CREATE OR REPLACE FUNCTION delta_bridge.wake() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF coalesce(current_setting('delta_bridge.no_wake', true), '') IN ('on', 'true', '1') THEN
        RETURN;
    END IF;
    IF NOT pg_try_advisory_xact_lock_shared(7234298723001) THEN   -- wake_key()
        PERFORM pg_notify('delta_bridge_wake', '');
    END IF;
END $$;

-- The writer's context for its own events: its settings and role at capture, and the sale its transaction
-- wrote (or NULL). Settings set with set_config(.., true) read back as '' once their transaction is over:
-- '' means unset.
DROP FUNCTION delta_bridge.ctx();
CREATE FUNCTION delta_bridge.ctx(p_sale bigint) RETURNS json
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT json_build_object(
        'reason',         nullif(current_setting('delta_bridge.reason', true), ''),
        'transaction_id', nullif(current_setting('delta_bridge.transaction_id', true), ''),
        'actor',          nullif(current_setting('delta_bridge.actor', true), ''),
        'db_user',        CASE WHEN current_setting('role') = 'none' THEN session_user::text
                               ELSE current_setting('role') END,
        'sale_id',        p_sale)
$$;

-- Immediate (not deferred) bookkeeping: the sales a row change touches, noted for this transaction.
CREATE OR REPLACE FUNCTION delta_bridge.note_sale() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    x xid8;
    tbl oid := TG_RELID;
    a bigint;          -- the sale a row belongs to now
    b bigint;          -- and the one it belonged to (an item moved, or deleted)
    is_new boolean := false;
    added boolean := false;
BEGIN
    IF tbl NOT IN ('@schema_literal@.transactions'::regclass, '@schema_literal@.transaction_items'::regclass) THEN
        -- A partition (its triggers are clones of the table's), or a table that is none of ours.
        tbl := (SELECT a.relid FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid IN ('@schema_literal@.transactions'::regclass, '@schema_literal@.transaction_items'::regclass));
    END IF;
    IF TG_LEVEL <> 'ROW' OR tbl IS NULL THEN
        RETURN NULL;
    ELSIF tbl = '@schema_literal@.transactions'::regclass THEN
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            a := NEW.id;
            is_new := TG_OP = 'INSERT';
        END IF;
    ELSE
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            a := NEW.transaction_id;
        END IF;
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            b := OLD.transaction_id;
        END IF;
    END IF;
    x := pg_current_xact_id();
    IF a IS NOT NULL THEN
        INSERT INTO delta_bridge.sale_notes AS s (xact, sale_id, created) VALUES (x, a, is_new)
            ON CONFLICT (xact, sale_id) DO UPDATE SET created = true WHERE EXCLUDED.created AND NOT s.created;
        added := FOUND;
    END IF;
    IF b IS NOT NULL AND b IS DISTINCT FROM a THEN
        INSERT INTO delta_bridge.sale_notes (xact, sale_id, created) VALUES (x, b, false)
            ON CONFLICT (xact, sale_id) DO NOTHING;
        added := added OR FOUND;
    END IF;
    -- A note that existed already has its sale_dirty row already.
    IF added THEN
        INSERT INTO delta_bridge.sale_dirty (xact) VALUES (x) ON CONFLICT (xact) DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

-- One event per sale noted since the last flush, with its row and items as this transaction sees them now. It
-- takes no lock: a lock taken here, at commit, could deadlock with the writer's own locks and fail its
-- transaction (a lock taken earlier could too). Two transactions that change one sale without conflicting
-- row locks (one adds items, the other changes its status) and commit within the same few milliseconds may
-- each snapshot the sale without the other's change; writers that lock the sale row before adding items are
-- not affected.
CREATE FUNCTION delta_bridge.flush_sales(p_xact xid8) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE
    n record; t record; its json; m text; b text; row_id bigint;
    c json := delta_bridge.ctx(NULL);
    -- Rows to update exist only if an earlier flush in this transaction wrote some (immediate mode).
    earlier boolean := EXISTS (SELECT 1 FROM delta_bridge.outbox o WHERE o.xact = p_xact);
BEGIN
    DELETE FROM delta_bridge.sale_dirty WHERE xact = p_xact;
    FOR n IN WITH noted AS (DELETE FROM delta_bridge.sale_notes WHERE xact = p_xact RETURNING sale_id, created)
             SELECT sale_id, created FROM noted ORDER BY sale_id
    LOOP
        row_id := NULL;
        IF earlier THEN
            SELECT o.id INTO row_id FROM delta_bridge.outbox o WHERE o.xact = p_xact AND o.sale_id = n.sale_id;
        END IF;
        SELECT * INTO t FROM @schema@.transactions WHERE id = n.sale_id;
        IF NOT FOUND THEN
            -- Deleted in this transaction: nothing to tell, and nothing told earlier in it either.
            IF row_id IS NOT NULL THEN
                DELETE FROM delta_bridge.outbox WHERE id = row_id;
            END IF;
            CONTINUE;
        END IF;
        SELECT coalesce(json_agg(json_build_object('product_id', i.product_id, 'quantity', i.quantity,
                                                   'price', i.price) ORDER BY i.id), '[]'::json)
          INTO its FROM @schema@.transaction_items i WHERE i.transaction_id = n.sale_id;
        SELECT mm.code, bb.code INTO m, b
          FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
         WHERE bb.id = t.branch_id;
        IF row_id IS NOT NULL THEN
            UPDATE delta_bridge.outbox
               SET op = CASE WHEN n.created THEN 'INSERT' ELSE op END, merchant_code = m, branch_code = b,
                   new_row = row_to_json(t), items = its, ctx = c
             WHERE id = row_id;
        ELSE
            INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, new_row, items, ctx, xact, sale_id)
            VALUES ('sale', CASE WHEN n.created THEN 'INSERT' ELSE 'UPDATE' END, m, b, row_to_json(t), its, c,
                    p_xact, n.sale_id);
        END IF;
    END LOOP;
    PERFORM delta_bridge.wake();
END $$;

-- Deferred, fires once per touched row at commit (per statement after SET CONSTRAINTS ... IMMEDIATE): the
-- first firing that finds notes flushes them all, the others find none.
CREATE OR REPLACE FUNCTION delta_bridge.capture_sales() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE x xid8;
BEGIN
    IF TG_LEVEL <> 'ROW' THEN
        RETURN NULL;
    END IF;
    IF TG_RELID NOT IN ('@schema_literal@.transactions'::regclass, '@schema_literal@.transaction_items'::regclass)
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid IN ('@schema_literal@.transactions'::regclass, '@schema_literal@.transaction_items'::regclass)) THEN
        RETURN NULL;
    END IF;
    x := pg_current_xact_id();
    IF EXISTS (SELECT 1 FROM delta_bridge.sale_dirty d WHERE d.xact = x) THEN
        PERFORM delta_bridge.flush_sales(x);
    END IF;
    RETURN NULL;
END $$;

-- The stock and quantity captures run once per changed row: everything they need is inline (no nested calls
-- of functions with a SET clause). The sale of the transaction: the noted sales are flushed first, then the
-- highest-numbered sale with an event from this transaction is taken (NULL if none).

-- products: INSERT -> product; stock changed -> stock; name or price changed -> product (both may happen).
CREATE OR REPLACE FUNCTION delta_bridge.capture_product() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE x xid8; sale bigint; c json; m text; b text;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_OP NOT IN ('INSERT', 'UPDATE') THEN
        RETURN NULL;
    END IF;
    IF TG_RELID <> '@schema_literal@.products'::regclass
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.products'::regclass) THEN
        RETURN NULL;
    END IF;
    x := pg_current_xact_id();
    IF EXISTS (SELECT 1 FROM delta_bridge.sale_dirty d WHERE d.xact = x) THEN
        PERFORM delta_bridge.flush_sales(x);
    END IF;
    sale := (SELECT o.sale_id FROM delta_bridge.outbox o WHERE o.xact = x ORDER BY o.sale_id DESC LIMIT 1);
    c := json_build_object(
        'reason',         nullif(current_setting('delta_bridge.reason', true), ''),
        'transaction_id', nullif(current_setting('delta_bridge.transaction_id', true), ''),
        'actor',          nullif(current_setting('delta_bridge.actor', true), ''),
        'db_user',        CASE WHEN current_setting('role') = 'none' THEN session_user::text
                               ELSE current_setting('role') END,
        'sale_id',        sale);
    SELECT mm.code, bb.code INTO m, b
      FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
     WHERE bb.id = NEW.branch_id;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, new_row, ctx)
        VALUES ('product', TG_OP, m, b, row_to_json(NEW), c);
    ELSE
        IF NEW.stock IS DISTINCT FROM OLD.stock THEN
            INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, new_row, ctx)
            VALUES ('stock', TG_OP, m, b, row_to_json(OLD), row_to_json(NEW), c);
        END IF;
        IF NEW.name IS DISTINCT FROM OLD.name OR NEW.price IS DISTINCT FROM OLD.price THEN
            INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, new_row, ctx)
            VALUES ('product', TG_OP, m, b, row_to_json(OLD), row_to_json(NEW), c);
        END IF;
    END IF;
    -- wake(), inline.
    IF coalesce(current_setting('delta_bridge.no_wake', true), '') NOT IN ('on', 'true', '1')
       AND NOT pg_try_advisory_xact_lock_shared(7234298723001) THEN
        PERFORM pg_notify('delta_bridge_wake', '');
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION delta_bridge.capture_inventory() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE x xid8; sale bigint; c json; m text; b text; pname text;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_OP NOT IN ('INSERT', 'UPDATE') THEN
        RETURN NULL;
    END IF;
    IF TG_RELID <> '@schema_literal@.inventory'::regclass
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.inventory'::regclass) THEN
        RETURN NULL;
    END IF;
    x := pg_current_xact_id();
    IF EXISTS (SELECT 1 FROM delta_bridge.sale_dirty d WHERE d.xact = x) THEN
        PERFORM delta_bridge.flush_sales(x);
    END IF;
    sale := (SELECT o.sale_id FROM delta_bridge.outbox o WHERE o.xact = x ORDER BY o.sale_id DESC LIMIT 1);
    c := json_build_object(
        'reason',         nullif(current_setting('delta_bridge.reason', true), ''),
        'transaction_id', nullif(current_setting('delta_bridge.transaction_id', true), ''),
        'actor',          nullif(current_setting('delta_bridge.actor', true), ''),
        'db_user',        CASE WHEN current_setting('role') = 'none' THEN session_user::text
                               ELSE current_setting('role') END,
        'sale_id',        sale);
    SELECT mm.code, bb.code INTO m, b
      FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
     WHERE bb.id = NEW.branch_id;
    SELECT p.name INTO pname FROM @schema@.products p WHERE p.id = NEW.product_id;
    INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, product_name, old_row, new_row, ctx)
    VALUES ('quantity', TG_OP, m, b, pname, CASE WHEN TG_OP = 'UPDATE' THEN row_to_json(OLD) END,
            row_to_json(NEW), c);
    IF coalesce(current_setting('delta_bridge.no_wake', true), '') NOT IN ('on', 'true', '1')
       AND NOT pg_try_advisory_xact_lock_shared(7234298723001) THEN
        PERFORM pg_notify('delta_bridge_wake', '');
    END IF;
    RETURN NULL;
END $$;

-- No longer used: enqueue_sales took its bookkeeping from settings the writer controls (replaced by
-- flush_sales); enqueue is inline in the captures above.
DROP FUNCTION delta_bridge.enqueue_sales(text, text);
DROP FUNCTION delta_bridge.enqueue(text, text, bigint, bigint, json, json, json);

-- Nothing in this schema is callable by PUBLIC, now or later (for functions the migrating role creates).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA delta_bridge FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA delta_bridge REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
