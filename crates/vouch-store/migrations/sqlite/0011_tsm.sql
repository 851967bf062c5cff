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
