-- The latest expiry of any token ever issued to a device (docs/provisioning.md). A rotation to a shorter
-- lifetime leaves the earlier, longer token cryptographically valid until its own `exp`: a revocation ban on
-- EMQX must outlast every token of the device, not only the current one. Kept as the maximum over issues.
ALTER TABLE delta_bridge.devices ADD COLUMN max_expires_at timestamptz;
-- Devices issued before this column existed: only the current token's expiry is known.
UPDATE delta_bridge.devices SET max_expires_at = expires_at;
ALTER TABLE delta_bridge.devices ALTER COLUMN max_expires_at SET NOT NULL;
