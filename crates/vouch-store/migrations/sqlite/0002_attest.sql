CREATE TABLE reference_values (
    model             TEXT NOT NULL,
    firmware_version  TEXT NOT NULL,
    document          TEXT NOT NULL,
    updated_at        INTEGER NOT NULL,
    PRIMARY KEY (model, firmware_version)
);

CREATE TABLE attestation_challenges (
    id           TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL REFERENCES devices(id),
    nonce        TEXT NOT NULL UNIQUE,
    commands     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    consumed_at  INTEGER
);

CREATE TABLE attestation_results (
    id                TEXT PRIMARY KEY REFERENCES attestation_challenges(id),
    device_id         TEXT NOT NULL REFERENCES devices(id),
    status            TEXT NOT NULL CHECK (status IN ('affirming', 'warning', 'contraindicated')),
    risk              INTEGER NOT NULL,
    reasons           TEXT NOT NULL,
    ticket_id         TEXT NOT NULL UNIQUE,
    ticket            TEXT NOT NULL,
    evidence_hash     TEXT NOT NULL,
    observations      TEXT NOT NULL,
    issued_at         INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    -- The audit entry written with this result: a total order of answers across
    -- instances, which the previous-state chain follows.
    audit_seq         INTEGER NOT NULL UNIQUE
);
CREATE INDEX attestation_results_by_device ON attestation_results (device_id, audit_seq);
