-- Offline credentials: the server's permission to a consumer's phone to pay offline up
-- to a limit, under the phone's enrolled identity key. Issuing one moves the limit from
-- the consumer's funding account to their offline reserve account in the same
-- transaction, so settling what the phone pays can never overdraw.
CREATE TABLE offline_credentials (
    id                  TEXT PRIMARY KEY,
    device_id           TEXT NOT NULL REFERENCES devices(id),
    consumer_id         TEXT NOT NULL REFERENCES consumers(id),
    reserve_account_id  TEXT NOT NULL REFERENCES accounts(id),
    -- The phone's key, uncompressed SEC1 P-256 (65 bytes).
    public_key          BYTEA NOT NULL,
    limit_minor         BIGINT NOT NULL CHECK (limit_minor > 0),
    currency            TEXT NOT NULL,
    counter_start       BIGINT NOT NULL CHECK (counter_start >= 0),
    issued_at           BIGINT NOT NULL,
    not_after           BIGINT NOT NULL,
    revoked_at          BIGINT,
    CHECK (not_after >= issued_at)
);
CREATE INDEX offline_credentials_by_device ON offline_credentials (device_id, counter_start);
