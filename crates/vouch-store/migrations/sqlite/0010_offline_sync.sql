-- Closing a credential at the phone's sync (POST /v1/offline/sync). Its limit is
-- lowered to what the phone says it spent, never below what has settled under it, and
-- `counter_end` is set to the phone's next unused counter: settlement refuses any
-- counter at or above it. `closed_at` makes the close happen once, whichever instance
-- runs it. A closed credential may be left with a limit of zero.
--
-- A close keeps what it was asked with (`counter_end`, `closed_spent_minor`) and what
-- had settled then (`closed_settled_minor`), and the credential issued for the rest
-- names the one it refreshes (`refreshed_from`, at most one each): a phone that lost
-- the answer and syncs again with the same arguments gets the same answer.
--
-- A phone's credentials each get a counter range of their own; the unique index keeps
-- two credentials issued at once on two instances from sharing one. Receipts are read
-- per phone in settlement order, credential by credential.
--
-- SQLite cannot change a CHECK in place, so the table is rebuilt under its own name:
-- the rows are set aside, the table dropped and created anew, and the rows put back.
-- Payments refer to it. Dropping it counts each payment's reference as broken; it is
-- checked at commit instead (defer_foreign_keys lasts until the end of this
-- transaction), and putting back the credential it names mends it. (Building the new
-- table under another name and renaming it would leave the count as it is, and the
-- commit would fail whenever a payment has settled.)
PRAGMA defer_foreign_keys = ON;
CREATE TEMP TABLE offline_credentials_before AS SELECT * FROM offline_credentials;
DROP TABLE offline_credentials;
CREATE TABLE offline_credentials (
    id                  TEXT PRIMARY KEY,
    device_id           TEXT NOT NULL REFERENCES devices(id),
    consumer_id         TEXT NOT NULL REFERENCES consumers(id),
    reserve_account_id  TEXT NOT NULL REFERENCES accounts(id),
    -- The phone's key, uncompressed SEC1 P-256 (65 bytes).
    public_key          BLOB NOT NULL,
    limit_minor         INTEGER NOT NULL,
    currency            TEXT NOT NULL,
    counter_start       INTEGER NOT NULL CHECK (counter_start >= 0),
    issued_at           INTEGER NOT NULL,
    not_after           INTEGER NOT NULL,
    revoked_at          INTEGER,
    settled_minor       INTEGER NOT NULL DEFAULT 0,
    counter_end         INTEGER,
    closed_at           INTEGER,
    closed_spent_minor  INTEGER,
    closed_settled_minor INTEGER,
    refreshed_from      TEXT REFERENCES offline_credentials(id),
    CHECK (not_after >= issued_at),
    CHECK (limit_minor > 0 OR (limit_minor = 0 AND closed_at IS NOT NULL)),
    CHECK (settled_minor >= 0 AND settled_minor <= limit_minor),
    CHECK ((counter_end IS NULL) = (closed_at IS NULL)
        AND (closed_spent_minor IS NULL) = (closed_at IS NULL)
        AND (closed_settled_minor IS NULL) = (closed_at IS NULL)),
    CHECK (counter_end IS NULL OR counter_end >= counter_start)
);
INSERT INTO offline_credentials (id, device_id, consumer_id, reserve_account_id, public_key, limit_minor,
        currency, counter_start, issued_at, not_after, revoked_at, settled_minor)
    SELECT id, device_id, consumer_id, reserve_account_id, public_key, limit_minor,
        currency, counter_start, issued_at, not_after, revoked_at, settled_minor
    FROM offline_credentials_before;
DROP TABLE offline_credentials_before;
CREATE UNIQUE INDEX offline_credentials_by_device ON offline_credentials (device_id, counter_start);
CREATE UNIQUE INDEX offline_credentials_refreshed_from ON offline_credentials (refreshed_from);
CREATE INDEX offline_payments_by_credential ON offline_payments (credential_id, settled_at, payment_id);
