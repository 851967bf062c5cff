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
ALTER TABLE offline_credentials
    ADD COLUMN counter_end BIGINT,
    ADD COLUMN closed_at BIGINT,
    ADD COLUMN closed_spent_minor BIGINT,
    ADD COLUMN closed_settled_minor BIGINT,
    ADD COLUMN refreshed_from TEXT REFERENCES offline_credentials(id),
    DROP CONSTRAINT offline_credentials_limit_minor_check,
    ADD CONSTRAINT offline_credentials_limit_minor_check
        CHECK (limit_minor > 0 OR (limit_minor = 0 AND closed_at IS NOT NULL)),
    ADD CONSTRAINT offline_credentials_settled_minor_check
        CHECK (settled_minor >= 0 AND settled_minor <= limit_minor),
    ADD CONSTRAINT offline_credentials_closed_check
        CHECK ((counter_end IS NULL) = (closed_at IS NULL)
            AND (closed_spent_minor IS NULL) = (closed_at IS NULL)
            AND (closed_settled_minor IS NULL) = (closed_at IS NULL)),
    ADD CONSTRAINT offline_credentials_counter_end_check
        CHECK (counter_end IS NULL OR counter_end >= counter_start);
DROP INDEX offline_credentials_by_device;
CREATE UNIQUE INDEX offline_credentials_by_device ON offline_credentials (device_id, counter_start);
CREATE UNIQUE INDEX offline_credentials_refreshed_from ON offline_credentials (refreshed_from);
CREATE INDEX offline_payments_by_credential ON offline_payments (credential_id, settled_at, payment_id);
