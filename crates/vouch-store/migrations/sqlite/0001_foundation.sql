CREATE TABLE merchants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE accounts (
    id           TEXT PRIMARY KEY,
    merchant_id  TEXT NOT NULL REFERENCES merchants(id),
    label        TEXT NOT NULL,
    currency     TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);

CREATE TABLE devices (
    id                TEXT PRIMARY KEY,
    kind              TEXT NOT NULL CHECK (kind IN ('reader', 'pos', 'terminal', 'consumer')),
    merchant_id       TEXT NOT NULL REFERENCES merchants(id),
    model             TEXT NOT NULL,
    firmware_version  TEXT NOT NULL,
    public_jwk        TEXT NOT NULL,
    key_thumbprint    TEXT NOT NULL UNIQUE,
    status            TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX devices_by_merchant ON devices (merchant_id, id);

CREATE TABLE service_providers (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    endpoint    TEXT NOT NULL,
    public_jwk  TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE enrolment_nonces (
    nonce        TEXT PRIMARY KEY,
    expires_at   INTEGER NOT NULL,
    consumed_at  INTEGER
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    secret_hash  BLOB NOT NULL,
    scopes       TEXT NOT NULL,
    label        TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);

CREATE TABLE signing_keys (
    kid            TEXT PRIMARY KEY,
    sealed_pkcs8   BLOB NOT NULL,
    public_jwk     TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    retired_at     INTEGER,
    publish_until  INTEGER
);
-- Exactly one active key: two instances bootstrapping or rotating at once cannot
-- both install one.
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys ((retired_at IS NULL)) WHERE retired_at IS NULL;

CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    detail     TEXT NOT NULL,
    prev_hash  BLOB NOT NULL,
    hash       BLOB NOT NULL
);

CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  BLOB NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, X'0000000000000000000000000000000000000000000000000000000000000000');
