-- A session is opened by a token grant; its sub-sessions point at it. Ending a
-- session sets ended_at on it and on every sub-session, and each protected request
-- checks the rows of its token, so an ended session fails everywhere at once.
CREATE TABLE token_sessions (
    id              TEXT PRIMARY KEY,
    parent_id       TEXT REFERENCES token_sessions(id),
    device_id       TEXT NOT NULL REFERENCES devices(id),
    key_thumbprint  TEXT NOT NULL,
    ticket_id       TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    ended_at        BIGINT
);
CREATE INDEX token_sessions_by_parent ON token_sessions (parent_id);

-- DPoP proofs seen, by SHA-256 of (key thumbprint, jti). The primary key is what
-- makes a proof single-use across instances; rows are purged once the proof's iat
-- has left the acceptance window.
CREATE TABLE dpop_proofs (
    replay_key  BYTEA PRIMARY KEY,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX dpop_proofs_by_expiry ON dpop_proofs (expires_at);
