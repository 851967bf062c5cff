-- The trusted service manager. A device maker's CA is registered as an issuer (its
-- certificate's SHA-256 fingerprint registers once); certificates it issued are revoked
-- by serial, once each.
CREATE TABLE tsm_issuers (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    subject          TEXT NOT NULL,
    certificate_der  BLOB NOT NULL,
    fingerprint      BLOB NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
    not_before       INTEGER NOT NULL,
    not_after        INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    CHECK (not_after >= not_before)
);
CREATE INDEX tsm_issuers_by_created ON tsm_issuers (created_at, id);

CREATE TABLE tsm_revocations (
    issuer_id   TEXT NOT NULL REFERENCES tsm_issuers(id),
    -- Lowercase hex of the certificate's serial number.
    serial      TEXT NOT NULL,
    revoked_at  INTEGER NOT NULL,
    PRIMARY KEY (issuer_id, serial)
);

-- A device's registration under its crypto secure element: one per device, replaced
-- when the device is provisioned again (a new registration id, a new device key, and
-- the message counter from the start). The device key is kept sealed under the master
-- key. A message is accepted only above the last counter, by a conditional update on
-- the current registration, so each counter is accepted once whichever instance
-- receives it.
CREATE TABLE tsm_registrations (
    device_id          TEXT PRIMARY KEY REFERENCES devices(id),
    registration_id    TEXT NOT NULL UNIQUE,
    issuer_id          TEXT NOT NULL REFERENCES tsm_issuers(id),
    se_serial          TEXT NOT NULL,
    -- The crypto secure element's certified key, uncompressed SEC1 P-256 (65 bytes).
    se_public_key      BLOB NOT NULL,
    sealed_device_key  BLOB NOT NULL,
    instrument         TEXT NOT NULL,
    last_counter       INTEGER NOT NULL CHECK (last_counter >= 0),
    registered_at      INTEGER NOT NULL
);

-- Payment application releases, each with the manifest the server signed when it was
-- uploaded. A version of an application is released once.
CREATE TABLE tsm_manifests (
    id           TEXT PRIMARY KEY,
    app_id       TEXT NOT NULL,
    version      INTEGER NOT NULL CHECK (version >= 1),
    -- SHA-256 of the code, lowercase hex.
    code_sha256  TEXT NOT NULL CHECK (length(code_sha256) = 64),
    code_size    INTEGER NOT NULL CHECK (code_size > 0),
    se_profile   TEXT NOT NULL,
    -- The manifest JWS.
    signed       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    UNIQUE (app_id, version)
);

-- Messages from devices on their way to service providers, sealed to the provider's
-- key: what the device sent is kept only as its SHA-256, and no plaintext at all. A
-- message is stored once per registration and counter; the registration is the
-- device's current one when the message is accepted, so a device provisioned again
-- counts from the start without colliding with its earlier messages.
--
-- A delivery worker leases the pending messages that are due (`lease_id`, until
-- `lease_until`), one lease per message at a time whichever instance claims it, and
-- records each outcome only while its lease holds. A lease left by a worker that
-- stopped ends at `lease_until`, and the message is claimed again.
CREATE TABLE tsm_outbox (
    id               TEXT PRIMARY KEY,
    provider_id      TEXT NOT NULL REFERENCES service_providers(id),
    device_id        TEXT NOT NULL REFERENCES devices(id),
    registration_id  TEXT NOT NULL,
    counter          INTEGER NOT NULL CHECK (counter >= 1),
    envelope_hash    BLOB NOT NULL CHECK (length(envelope_hash) = 32),
    enc              BLOB NOT NULL,
    ciphertext       BLOB NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         INTEGER NOT NULL CHECK (attempts >= 0),
    next_attempt_at  INTEGER NOT NULL,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    delivered_at     INTEGER,
    lease_id         TEXT,
    lease_until      INTEGER,
    UNIQUE (registration_id, counter),
    CHECK ((status = 'delivered') = (delivered_at IS NOT NULL)),
    CHECK ((lease_id IS NULL) = (lease_until IS NULL)),
    CHECK (status = 'pending' OR lease_id IS NULL)
);
-- The worker's query: only pending messages, so the index stays the size of the
-- backlog however many have been delivered.
CREATE INDEX tsm_outbox_due ON tsm_outbox (next_attempt_at, id) WHERE status = 'pending';
-- The admin listing, newest first, whole or by status or by provider.
CREATE INDEX tsm_outbox_by_created ON tsm_outbox (created_at, id);
CREATE INDEX tsm_outbox_by_status ON tsm_outbox (status, created_at, id);
CREATE INDEX tsm_outbox_by_provider ON tsm_outbox (provider_id, created_at, id);
