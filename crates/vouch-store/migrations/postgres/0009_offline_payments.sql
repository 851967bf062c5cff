-- Settled offline payments. A payment's id is SHA-256 of its signed approval, and is
-- also the id of its ledger transfer, so a re-submission finds the row and gets the
-- receipt stored with it. A (credential, counter) pair and a request nonce are each
-- used once: a second approval under the same pair is a double spend.
CREATE TABLE offline_payments (
    payment_id      TEXT PRIMARY KEY,
    credential_id   TEXT NOT NULL REFERENCES offline_credentials(id),
    counter         BIGINT NOT NULL CHECK (counter >= 0),
    -- The payment request's nonce, hex.
    nonce           TEXT NOT NULL UNIQUE,
    amount_minor    BIGINT NOT NULL CHECK (amount_minor > 0),
    currency        TEXT NOT NULL,
    merchant_id     TEXT NOT NULL REFERENCES merchants(id),
    terminal_id     TEXT NOT NULL,
    -- The server-signed COSE receipt, as returned.
    receipt         BYTEA NOT NULL,
    settled_at      BIGINT NOT NULL,
    UNIQUE (credential_id, counter)
);
-- What a credential's settled payments have moved, raised in the same statement that
-- checks it against the limit.
ALTER TABLE offline_credentials ADD COLUMN settled_minor BIGINT NOT NULL DEFAULT 0;
