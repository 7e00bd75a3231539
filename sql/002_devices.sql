-- Provisioned devices (docs/provisioning.md). One row per device id: the current credential's jti and lifetime,
-- how often it was rotated, and whether it was revoked or expired on the broker. The bridge keeps no other
-- state; every replica reads and writes here. device_events keeps the history for audit.
CREATE TABLE delta_bridge.devices (
    device_id        text PRIMARY KEY,
    merchant_code    text NOT NULL,
    branch_code      text NOT NULL,
    jti              text NOT NULL,
    key_id           text NOT NULL,
    first_issued_at  timestamptz NOT NULL,
    issued_at        timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    rotations        integer NOT NULL DEFAULT 0,
    rotated_at       timestamptz,
    revoked_at       timestamptz,
    -- set when the expiry sweep removed an expired credential from a broker that does not read `exp`
    expired_at       timestamptz
);

-- The expiry sweep looks only at live credentials.
CREATE INDEX devices_live_expiry ON delta_bridge.devices (expires_at)
    WHERE revoked_at IS NULL AND expired_at IS NULL;

CREATE TABLE delta_bridge.device_events (
    id          bigserial PRIMARY KEY,
    device_id   text NOT NULL,
    event       text NOT NULL CHECK (event IN ('issued', 'rotated', 'revoked', 'expired')),
    jti         text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_events_device ON delta_bridge.device_events (device_id, at);
