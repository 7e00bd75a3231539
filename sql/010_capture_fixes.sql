-- delta-bridge migration 10: fixes to delete capture (migration 8), and rows that move to another branch.
--
-- * A row's INSERT or UPDATE capture skipped its event whenever the row could not be found by id at commit.
--   That lost events of rows whose id changed later in the transaction (and left a row_born note behind), and
--   cost a scan per captured row where id has no index. Now an immediate AFTER DELETE trigger on products and
--   inventory (note_row_gone) counts the deletes of each id in row_gone, and each DELETE capture takes one
--   off when it runs at commit. So while an INSERT or UPDATE capture runs, a count for its id means a delete
--   of that id is still to be told after it; only then is the row looked up, and only a row that is gone is
--   skipped (its delete says what there is to say, or nothing if it was born here). Every other capture pays
--   one index probe into a table that is empty but for transactions deleting rows right now.
--   row_gone is written only by these SECURITY DEFINER functions and emptied by the transaction that wrote it.
-- * A sale that existed before the transaction, deleted, inserted again under the same id, flushed
--   (SET CONSTRAINTS ... IMMEDIATE) and deleted again published nothing: the flush wrote a "created" row
--   without the marker that the sale existed before. The flush now keeps the deleted row (sale_gone) as the
--   outbox row's old_row, and the second delete keeps the first deleted row: the one devices know.
-- * The stock and quantity events' sale lookup skips a transaction's deleted sales through an index.
-- * A products row whose branch_id changes publishes product_deleted to the old branch and product_updated to
--   the new one; an inventory row whose branch_id changes inventory_deleted to the old branch and
--   quantity_updated (as a new row: old_quantity 0) to the new one; one whose product_id changes
--   quantity_updated. New triggers fire for those changes when the triggers of migration 1 do not.
--
-- @schema@ is replaced by the (quoted) schema of the business tables before this runs, and @schema_literal@ by
-- the same with its single quotes doubled, for use inside a string literal ('@schema_literal@.products').

CREATE UNLOGGED TABLE delta_bridge.row_gone (
    xact   xid8    NOT NULL,
    tbl    text    NOT NULL,      -- products | inventory
    row_id bigint  NOT NULL,
    n      integer NOT NULL,      -- deletes of this id by this transaction whose capture has not run yet
    PRIMARY KEY (xact, tbl, row_id)
);
ALTER TABLE delta_bridge.row_gone SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0);

-- The stock and quantity events' sale: the highest live sale row this transaction wrote. Without the
-- condition in the index the lookup walks over every deleted sale of the transaction first. Built plainly
-- (the outbox is the bridge's own table and holds only what is not published yet: migrate with the bridge
-- caught up, and the build takes moments).
CREATE INDEX outbox_live_sale_by_xact ON delta_bridge.outbox (xact, sale_id) WHERE xact IS NOT NULL AND op <> 'DELETE';

-- Immediate: counts the deletes of a products or inventory row (see above).
CREATE FUNCTION delta_bridge.note_row_gone() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE t text;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_OP <> 'DELETE' THEN
        RETURN NULL;
    END IF;
    IF TG_RELID = '@schema_literal@.products'::regclass
       OR EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.products'::regclass) THEN
        t := 'products';
    ELSIF TG_RELID = '@schema_literal@.inventory'::regclass
       OR EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.inventory'::regclass) THEN
        t := 'inventory';
    ELSE
        RETURN NULL;
    END IF;
    INSERT INTO delta_bridge.row_gone AS g (xact, tbl, row_id, n) VALUES (pg_current_xact_id(), t, OLD.id, 1)
        ON CONFLICT (xact, tbl, row_id) DO UPDATE SET n = g.n + 1;
    RETURN NULL;
END $$;

-- As migration 8, except: the first delete of a sale that existed before keeps its row even after the sale was
-- inserted again and flushed (that flush stored it as the outbox row's old_row).
CREATE OR REPLACE FUNCTION delta_bridge.note_sale_gone() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE x xid8;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_OP <> 'DELETE' THEN
        RETURN NULL;
    END IF;
    IF TG_RELID <> '@schema_literal@.transactions'::regclass
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.transactions'::regclass) THEN
        RETURN NULL;
    END IF;
    x := pg_current_xact_id();
    -- Born in this transaction (noted as created, or published as created by an earlier flush without the
    -- marker old_row): nothing to tell. Existed before and already kept by an earlier flush (old_row): the
    -- flush at commit takes that row, the one the devices know.
    IF NOT EXISTS (SELECT 1 FROM delta_bridge.sale_notes s WHERE s.xact = x AND s.sale_id = OLD.id AND s.created)
       AND NOT EXISTS (SELECT 1 FROM delta_bridge.outbox o
                        WHERE o.xact = x AND o.sale_id = OLD.id
                          AND ((o.op = 'INSERT' AND o.old_row IS NULL) OR o.old_row IS NOT NULL)) THEN
        INSERT INTO delta_bridge.sale_gone (xact, sale_id, old_row) VALUES (x, OLD.id, row_to_json(OLD))
            ON CONFLICT (xact, sale_id) DO NOTHING;
    END IF;
    INSERT INTO delta_bridge.sale_notes (xact, sale_id, created) VALUES (x, OLD.id, false)
        ON CONFLICT (xact, sale_id) DO NOTHING;
    INSERT INTO delta_bridge.sale_dirty (xact) VALUES (x) ON CONFLICT (xact) DO NOTHING;
    RETURN NULL;
END $$;

-- As migration 8, and: a sale that exists and was deleted earlier in this transaction keeps the deleted row as
-- old_row (it existed before the transaction); a sale that is gone and whose outbox row has an old_row is told
-- as deleted with that row.
CREATE OR REPLACE FUNCTION delta_bridge.flush_sales(p_xact xid8) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE
    n record; t record; its json; m text; b text; row_id bigint; row_op text; row_old json; gone json;
    c json := delta_bridge.ctx(NULL);
    -- Rows to update exist only if an earlier flush in this transaction wrote some (immediate mode).
    earlier boolean := EXISTS (SELECT 1 FROM delta_bridge.outbox o WHERE o.xact = p_xact);
    -- One lookup per flush: most transactions delete no sale.
    any_gone boolean := EXISTS (SELECT 1 FROM delta_bridge.sale_gone g WHERE g.xact = p_xact);
BEGIN
    DELETE FROM delta_bridge.sale_dirty WHERE xact = p_xact;
    FOR n IN WITH noted AS (DELETE FROM delta_bridge.sale_notes WHERE xact = p_xact RETURNING sale_id, created)
             SELECT sale_id, created FROM noted ORDER BY sale_id
    LOOP
        row_id := NULL;
        row_op := NULL;
        row_old := NULL;
        IF earlier THEN
            SELECT o.id, o.op, o.old_row INTO row_id, row_op, row_old FROM delta_bridge.outbox o
             WHERE o.xact = p_xact AND o.sale_id = n.sale_id;
        END IF;
        gone := NULL;
        IF any_gone THEN
            DELETE FROM delta_bridge.sale_gone g WHERE g.xact = p_xact AND g.sale_id = n.sale_id
                RETURNING g.old_row INTO gone;
        END IF;
        SELECT * INTO t FROM @schema@.transactions WHERE id = n.sale_id;
        IF NOT FOUND THEN
            IF gone IS NULL AND row_op = 'DELETE' THEN
                -- Told already by an earlier flush (immediate mode): the items that ON DELETE CASCADE removed
                -- after it noted the sale again.
                CONTINUE;
            ELSIF gone IS NULL AND row_old IS NOT NULL THEN
                -- Existed before the transaction, deleted, inserted again, flushed, deleted again: the first
                -- deleted row, kept by that flush, is the one to tell.
                gone := row_old;
            ELSIF gone IS NULL THEN
                -- Inserted and deleted in this transaction: nothing to tell, and nothing told earlier in it.
                IF row_id IS NOT NULL THEN
                    DELETE FROM delta_bridge.outbox WHERE id = row_id;
                END IF;
                CONTINUE;
            END IF;
            SELECT mm.code, bb.code INTO m, b
              FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
             WHERE bb.id = (gone ->> 'branch_id')::bigint;
            IF row_id IS NOT NULL THEN
                -- An earlier flush told transaction_updated: it becomes the delete (one event per transaction).
                UPDATE delta_bridge.outbox
                   SET op = 'DELETE', merchant_code = m, branch_code = b, old_row = gone, new_row = NULL,
                       items = NULL, ctx = c
                 WHERE id = row_id;
            ELSE
                INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, ctx, xact, sale_id)
                VALUES ('sale', 'DELETE', m, b, gone, c, p_xact, n.sale_id);
            END IF;
            CONTINUE;
        END IF;
        SELECT coalesce(json_agg(json_build_object('product_id', i.product_id, 'quantity', i.quantity,
                                                   'price', i.price) ORDER BY i.id), '[]'::json)
          INTO its FROM @schema@.transaction_items i WHERE i.transaction_id = n.sale_id;
        SELECT mm.code, bb.code INTO m, b
          FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
         WHERE bb.id = t.branch_id;
        -- old_row, on a sale that exists, says that it existed before the transaction (a delete told earlier
        -- in it, or a delete noted in sale_gone, then inserted again): a later delete in this transaction is
        -- then told with that row. Conversion ignores it otherwise.
        IF row_id IS NOT NULL THEN
            UPDATE delta_bridge.outbox
               SET op = CASE WHEN n.created THEN 'INSERT' WHEN op = 'DELETE' THEN 'UPDATE' ELSE op END,
                   merchant_code = m, branch_code = b, new_row = row_to_json(t), items = its, ctx = c,
                   old_row = coalesce(old_row, gone)
             WHERE id = row_id;
        ELSE
            INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, new_row, items, ctx,
                                             xact, sale_id)
            VALUES ('sale', CASE WHEN n.created THEN 'INSERT' ELSE 'UPDATE' END, m, b, gone, row_to_json(t), its,
                    c, p_xact, n.sale_id);
        END IF;
    END LOOP;
    -- Kept rows of sales not noted here (none is expected) must not outlive the transaction either.
    IF any_gone THEN
        DELETE FROM delta_bridge.sale_gone g WHERE g.xact = p_xact;
    END IF;
    PERFORM delta_bridge.wake();
END $$;

-- products: INSERT -> product; stock changed -> stock; name or price changed -> product (both may happen);
-- branch_id changed -> product DELETE to the old branch and product (no old_row: published whatever changed)
-- to the new; DELETE -> product with op DELETE. An INSERT or UPDATE whose id is deleted later in this
-- transaction and is gone at commit publishes nothing (but a move still tells the branch it left).
CREATE OR REPLACE FUNCTION delta_bridge.capture_product() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE
    x xid8; sale bigint; c json; m text; b text; r record;
    moved boolean := false;
    gone boolean := false;        -- deleted later in this transaction, and not there at commit
    left_only boolean := false;   -- moved, then deleted: only the branch it left is told here
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_OP NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
        RETURN NULL;
    END IF;
    IF TG_RELID <> '@schema_literal@.products'::regclass
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.products'::regclass) THEN
        RETURN NULL;
    END IF;
    x := pg_current_xact_id();
    IF TG_OP = 'DELETE' THEN
        r := OLD;
        -- This delete is told now: one fewer to come for the id.
        UPDATE delta_bridge.row_gone g SET n = g.n - 1
         WHERE g.xact = x AND g.tbl = 'products' AND g.row_id = OLD.id AND g.n > 1;
        IF NOT FOUND THEN
            DELETE FROM delta_bridge.row_gone g WHERE g.xact = x AND g.tbl = 'products' AND g.row_id = OLD.id;
        END IF;
        -- Born in this transaction (its INSERT capture found it gone): nothing to tell.
        UPDATE delta_bridge.row_born rb SET n = rb.n - 1
         WHERE rb.xact = x AND rb.tbl = 'products' AND rb.row_id = OLD.id AND rb.n > 1;
        IF FOUND THEN
            RETURN NULL;
        END IF;
        DELETE FROM delta_bridge.row_born rb WHERE rb.xact = x AND rb.tbl = 'products' AND rb.row_id = OLD.id;
        IF FOUND THEN
            RETURN NULL;
        END IF;
    ELSE
        r := NEW;
        moved := TG_OP = 'UPDATE' AND NEW.branch_id IS DISTINCT FROM OLD.branch_id;
        -- Two statements, not one: the row lookup is not even planned unless a delete is noted (planned with
        -- enable_seqscan off on a table without an index on id, its cost alone would make it JIT-compiled).
        IF EXISTS (SELECT 1 FROM delta_bridge.row_gone g WHERE g.xact = x AND g.tbl = 'products' AND g.row_id = NEW.id) THEN
            gone := NOT EXISTS (SELECT 1 FROM @schema@.products p WHERE p.id = NEW.id);
        END IF;
        IF gone THEN
            -- Deleted later in this transaction: its DELETE capture decides, knowing whether it was born here.
            IF TG_OP = 'INSERT' THEN
                INSERT INTO delta_bridge.row_born AS rb (xact, tbl, row_id, n) VALUES (x, 'products', NEW.id, 1)
                    ON CONFLICT (xact, tbl, row_id) DO UPDATE SET n = rb.n + 1;
                RETURN NULL;
            END IF;
            -- The delete goes to the branch the row was in last; the branch it left hears it here, unless
            -- the row was born in this transaction.
            IF NOT moved OR EXISTS (SELECT 1 FROM delta_bridge.row_born rb
                                     WHERE rb.xact = x AND rb.tbl = 'products' AND rb.row_id = NEW.id) THEN
                RETURN NULL;
            END IF;
            left_only := true;
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM delta_bridge.sale_dirty d WHERE d.xact = x) THEN
        PERFORM delta_bridge.flush_sales(x);
    END IF;
    sale := (SELECT o.sale_id FROM delta_bridge.outbox o WHERE o.xact = x AND o.op <> 'DELETE'
              ORDER BY o.sale_id DESC LIMIT 1);
    c := json_build_object(
        'reason',         nullif(current_setting('delta_bridge.reason', true), ''),
        'transaction_id', nullif(current_setting('delta_bridge.transaction_id', true), ''),
        'actor',          nullif(current_setting('delta_bridge.actor', true), ''),
        'db_user',        CASE WHEN current_setting('role') = 'none' THEN session_user::text
                               ELSE current_setting('role') END,
        'sale_id',        sale);
    IF moved THEN
        SELECT mm.code, bb.code INTO m, b
          FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
         WHERE bb.id = OLD.branch_id;
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, ctx)
        VALUES ('product', 'DELETE', m, b, row_to_json(OLD), c);
    END IF;
    IF NOT left_only THEN
        SELECT mm.code, bb.code INTO m, b
          FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
         WHERE bb.id = r.branch_id;
    END IF;
    IF left_only THEN
        NULL;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, new_row, ctx)
        VALUES ('product', TG_OP, m, b, row_to_json(NEW), c);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, ctx)
        VALUES ('product', TG_OP, m, b, row_to_json(OLD), c);
    ELSIF moved THEN
        -- New to that branch's devices: the whole product, whatever changed (no old_row to compare).
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

-- inventory: INSERT or quantity changed -> quantity; branch_id changed -> quantity DELETE to the old branch and
-- quantity as a new row (no old_row: old_quantity 0) to the new; product_id changed -> quantity; DELETE ->
-- quantity with op DELETE. Rows deleted later in the transaction as for products.
CREATE OR REPLACE FUNCTION delta_bridge.capture_inventory() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE
    x xid8; sale bigint; c json; m text; b text; pname text; r record;
    moved boolean := false;
    gone boolean := false;
    left_only boolean := false;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_OP NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
        RETURN NULL;
    END IF;
    IF TG_RELID <> '@schema_literal@.inventory'::regclass
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.inventory'::regclass) THEN
        RETURN NULL;
    END IF;
    x := pg_current_xact_id();
    IF TG_OP = 'DELETE' THEN
        r := OLD;
        UPDATE delta_bridge.row_gone g SET n = g.n - 1
         WHERE g.xact = x AND g.tbl = 'inventory' AND g.row_id = OLD.id AND g.n > 1;
        IF NOT FOUND THEN
            DELETE FROM delta_bridge.row_gone g WHERE g.xact = x AND g.tbl = 'inventory' AND g.row_id = OLD.id;
        END IF;
        UPDATE delta_bridge.row_born rb SET n = rb.n - 1
         WHERE rb.xact = x AND rb.tbl = 'inventory' AND rb.row_id = OLD.id AND rb.n > 1;
        IF FOUND THEN
            RETURN NULL;
        END IF;
        DELETE FROM delta_bridge.row_born rb WHERE rb.xact = x AND rb.tbl = 'inventory' AND rb.row_id = OLD.id;
        IF FOUND THEN
            RETURN NULL;
        END IF;
    ELSE
        r := NEW;
        moved := TG_OP = 'UPDATE' AND NEW.branch_id IS DISTINCT FROM OLD.branch_id;
        -- Two statements, not one: the row lookup is not even planned unless a delete is noted (planned with
        -- enable_seqscan off on a table without an index on id, its cost alone would make it JIT-compiled).
        IF EXISTS (SELECT 1 FROM delta_bridge.row_gone g WHERE g.xact = x AND g.tbl = 'inventory' AND g.row_id = NEW.id) THEN
            gone := NOT EXISTS (SELECT 1 FROM @schema@.inventory i WHERE i.id = NEW.id);
        END IF;
        IF gone THEN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO delta_bridge.row_born AS rb (xact, tbl, row_id, n) VALUES (x, 'inventory', NEW.id, 1)
                    ON CONFLICT (xact, tbl, row_id) DO UPDATE SET n = rb.n + 1;
                RETURN NULL;
            END IF;
            IF NOT moved OR EXISTS (SELECT 1 FROM delta_bridge.row_born rb
                                     WHERE rb.xact = x AND rb.tbl = 'inventory' AND rb.row_id = NEW.id) THEN
                RETURN NULL;
            END IF;
            left_only := true;
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM delta_bridge.sale_dirty d WHERE d.xact = x) THEN
        PERFORM delta_bridge.flush_sales(x);
    END IF;
    sale := (SELECT o.sale_id FROM delta_bridge.outbox o WHERE o.xact = x AND o.op <> 'DELETE'
              ORDER BY o.sale_id DESC LIMIT 1);
    c := json_build_object(
        'reason',         nullif(current_setting('delta_bridge.reason', true), ''),
        'transaction_id', nullif(current_setting('delta_bridge.transaction_id', true), ''),
        'actor',          nullif(current_setting('delta_bridge.actor', true), ''),
        'db_user',        CASE WHEN current_setting('role') = 'none' THEN session_user::text
                               ELSE current_setting('role') END,
        'sale_id',        sale);
    IF moved THEN
        SELECT mm.code, bb.code INTO m, b
          FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
         WHERE bb.id = OLD.branch_id;
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, ctx)
        VALUES ('quantity', 'DELETE', m, b, row_to_json(OLD), c);
    END IF;
    IF left_only THEN
        NULL;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT mm.code, bb.code INTO m, b
          FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
         WHERE bb.id = r.branch_id;
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, ctx)
        VALUES ('quantity', TG_OP, m, b, row_to_json(OLD), c);
    ELSE
        SELECT mm.code, bb.code INTO m, b
          FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
         WHERE bb.id = r.branch_id;
        SELECT p.name INTO pname FROM @schema@.products p WHERE p.id = NEW.product_id;
        -- A row new to its branch (inserted, or moved there) has no old_row: old_quantity 0.
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, product_name, old_row, new_row, ctx)
        VALUES ('quantity', CASE WHEN moved THEN 'INSERT' ELSE TG_OP END, m, b, pname,
                CASE WHEN TG_OP = 'UPDATE' AND NOT moved THEN row_to_json(OLD) END, row_to_json(NEW), c);
    END IF;
    IF coalesce(current_setting('delta_bridge.no_wake', true), '') NOT IN ('on', 'true', '1')
       AND NOT pg_try_advisory_xact_lock_shared(7234298723001) THEN
        PERFORM pg_notify('delta_bridge_wake', '');
    END IF;
    RETURN NULL;
END $$;

-- As migration 4 does: nothing here is callable by PUBLIC.
REVOKE ALL ON FUNCTION delta_bridge.note_row_gone() FROM PUBLIC;

-- Named to sort before the DELETE captures: when a writer makes one of those immediate, the count is there
-- before it runs.
CREATE TRIGGER delta_bridge_a_note_del AFTER DELETE ON @schema@.products
    FOR EACH ROW EXECUTE FUNCTION delta_bridge.note_row_gone();
CREATE TRIGGER delta_bridge_a_note_del AFTER DELETE ON @schema@.inventory
    FOR EACH ROW EXECUTE FUNCTION delta_bridge.note_row_gone();

-- Moves: the UPDATE triggers of migration 1 fire on stock, name or price (products) and quantity (inventory);
-- these fire on a move when those do not, so a row change runs one capture.
CREATE CONSTRAINT TRIGGER delta_bridge_capture_move AFTER UPDATE ON @schema@.products
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.branch_id IS DISTINCT FROM NEW.branch_id
          AND (OLD.stock, OLD.name, OLD.price) IS NOT DISTINCT FROM (NEW.stock, NEW.name, NEW.price))
    EXECUTE FUNCTION delta_bridge.capture_product();
CREATE CONSTRAINT TRIGGER delta_bridge_capture_move AFTER UPDATE ON @schema@.inventory
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.branch_id, OLD.product_id) IS DISTINCT FROM (NEW.branch_id, NEW.product_id)
          AND OLD.quantity IS NOT DISTINCT FROM NEW.quantity)
    EXECUTE FUNCTION delta_bridge.capture_inventory();
