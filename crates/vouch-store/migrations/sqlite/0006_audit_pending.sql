-- Decisions record their audit entry here, in their own transaction, without
-- touching the chain's head; the chainer links entries into audit_log in batches, in
-- the order it finds them, and deletes them here in the same transaction. So
-- concurrent decisions never wait on one another's commit to be audited.
CREATE TABLE audit_pending (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    subject  TEXT NOT NULL,
    detail   TEXT NOT NULL
);

-- Entry ids order a device's attestation results, which recorded chain positions
-- before: new ids start above every position already used.
INSERT INTO sqlite_sequence (name, seq) SELECT 'audit_pending', COALESCE(MAX(seq), 0) FROM audit_log;
