-- ISO 8583 identities: a merchant's card acceptor id (DE 42) and category code
-- (ISO 18245), a terminal's id (DE 41) within its merchant.
ALTER TABLE merchants ADD COLUMN card_acceptor_id TEXT;
ALTER TABLE merchants ADD COLUMN merchant_category TEXT;
CREATE UNIQUE INDEX merchants_by_card_acceptor ON merchants (card_acceptor_id);

-- A terminal authenticates with its own API key, which names it.
CREATE TABLE terminals (
    id               TEXT PRIMARY KEY,
    merchant_id      TEXT NOT NULL REFERENCES merchants(id),
    iso_terminal_id  TEXT NOT NULL,
    api_key_id       TEXT NOT NULL UNIQUE REFERENCES api_keys(id),
    created_at       BIGINT NOT NULL,
    UNIQUE (merchant_id, iso_terminal_id)
);

CREATE TABLE consumers (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- A consumer's phones: devices of kind consumer, each owned by one consumer.
CREATE TABLE consumer_devices (
    device_id    TEXT PRIMARY KEY REFERENCES devices(id),
    consumer_id  TEXT NOT NULL REFERENCES consumers(id),
    created_at   BIGINT NOT NULL
);
CREATE INDEX consumer_devices_by_consumer ON consumer_devices (consumer_id);

-- Payment accounts are known by a keyed hash of their reference; the reference
-- itself is never stored. Wrong DVVs are counted here and lock the account.
CREATE TABLE payment_accounts (
    id               TEXT PRIMARY KEY,
    consumer_id      TEXT NOT NULL REFERENCES consumers(id),
    ref_hash         BYTEA NOT NULL UNIQUE,
    ref_last4        TEXT NOT NULL,
    wrong_dvv_tries  BIGINT NOT NULL DEFAULT 0,
    locked_at        BIGINT,
    created_at       BIGINT NOT NULL
);

-- Issued values, by keyed hash. A use is counted by a conditional update
-- (uses < max_uses, not expired, not superseded), so two instances can never both
-- take the last use.
CREATE TABLE dvvs (
    id                  TEXT PRIMARY KEY,
    payment_account_id  TEXT NOT NULL REFERENCES payment_accounts(id),
    device_id           TEXT NOT NULL REFERENCES devices(id),
    ticket_id           TEXT NOT NULL,
    value_hash          BYTEA NOT NULL,
    assurance           BIGINT NOT NULL CHECK (assurance BETWEEN 1 AND 9),
    merchant_category   TEXT,
    amount_limit_minor  BIGINT NOT NULL,
    max_uses            BIGINT NOT NULL CHECK (max_uses > 0),
    uses                BIGINT NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
    issued_at           BIGINT NOT NULL,
    expires_at          BIGINT NOT NULL,
    superseded_at       BIGINT
);
CREATE INDEX dvvs_by_account ON dvvs (payment_account_id, expires_at);
CREATE INDEX dvvs_by_value ON dvvs (value_hash, expires_at);
CREATE INDEX dvvs_by_device ON dvvs (device_id, issued_at);

-- Every authorization decision. The unique key makes a retried request (same
-- terminal, STAN and transmission time) find the first answer, on any instance.
CREATE TABLE authorizations (
    id                  TEXT PRIMARY KEY,
    terminal_id         TEXT NOT NULL REFERENCES terminals(id),
    stan                TEXT NOT NULL,
    transmission_time   TEXT NOT NULL,
    request_hash        BYTEA NOT NULL,
    payment_account_id  TEXT,
    dvv_id              TEXT,
    amount_minor        BIGINT NOT NULL,
    currency            TEXT NOT NULL,
    entry_mode          TEXT NOT NULL,
    response_code       TEXT NOT NULL,
    reason              TEXT NOT NULL,
    authorization_code  TEXT,
    retrieval_reference TEXT NOT NULL,
    channel             TEXT NOT NULL,
    created_at          BIGINT NOT NULL,
    UNIQUE (terminal_id, stan, transmission_time)
);
CREATE INDEX authorizations_by_account ON authorizations (payment_account_id, created_at);
