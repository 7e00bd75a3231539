-- The reference schema: what `delta-bridge demo`, the tests and the default mapping use.
-- The bridge attaches to these tables; it does not create them in a real deployment.
CREATE TABLE merchants (id bigserial PRIMARY KEY, code text NOT NULL UNIQUE, name text NOT NULL);
CREATE TABLE branches (id bigserial PRIMARY KEY, merchant_id bigint NOT NULL REFERENCES merchants(id),
  code text NOT NULL, name text NOT NULL, UNIQUE (merchant_id, code));
CREATE TABLE products (id bigserial PRIMARY KEY, branch_id bigint NOT NULL REFERENCES branches(id),
  name text NOT NULL, price numeric(14,2) NOT NULL DEFAULT 0, stock integer NOT NULL DEFAULT 0,
  updated_by text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE inventory (id bigserial PRIMARY KEY, branch_id bigint NOT NULL REFERENCES branches(id),
  product_id bigint NOT NULL REFERENCES products(id), quantity integer NOT NULL DEFAULT 0,
  updated_by text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE transactions (id bigserial PRIMARY KEY, branch_id bigint NOT NULL REFERENCES branches(id),
  transaction_code text NOT NULL UNIQUE, offline_id uuid UNIQUE, status text NOT NULL,
  grand_total numeric(14,2) NOT NULL, created_by text, device_id text,
  created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE transaction_items (id bigserial PRIMARY KEY,
  transaction_id bigint NOT NULL REFERENCES transactions(id) ON DELETE CASCADE,
  product_id bigint NOT NULL REFERENCES products(id), quantity integer NOT NULL, price numeric(14,2) NOT NULL);
