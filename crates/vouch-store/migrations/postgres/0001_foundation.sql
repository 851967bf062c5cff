CREATE TABLE merchants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE accounts (
    id           TEXT PRIMARY KEY,
    merchant_id  TEXT NOT NULL REFERENCES merchants(id),
    label        TEXT NOT NULL,
    currency     TEXT NOT NULL,
    created_at   BIGINT NOT NULL
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
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX devices_by_merchant ON devices (merchant_id, id);

CREATE TABLE service_providers (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    endpoint    TEXT NOT NULL,
    public_jwk  TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE enrolment_nonces (
    nonce        TEXT PRIMARY KEY,
    expires_at   BIGINT NOT NULL,
    consumed_at  BIGINT
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    secret_hash  BYTEA NOT NULL,
    scopes       TEXT NOT NULL,
    label        TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);

CREATE TABLE signing_keys (
    kid            TEXT PRIMARY KEY,
    sealed_pkcs8   BYTEA NOT NULL,
    public_jwk     TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    retired_at     BIGINT,
    publish_until  BIGINT
);
-- Exactly one active key: two instances bootstrapping or rotating at once cannot
-- both install one.
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys ((retired_at IS NULL)) WHERE retired_at IS NULL;

CREATE TABLE audit_log (
    seq        BIGINT PRIMARY KEY,
    at         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    detail     TEXT NOT NULL,
    prev_hash  BYTEA NOT NULL,
    hash       BYTEA NOT NULL
);

CREATE TABLE audit_head (
    id    BIGINT PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  BYTEA NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
