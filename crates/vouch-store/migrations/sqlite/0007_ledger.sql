-- The ledger. An account belongs to a merchant (settlement), to a consumer (funding,
-- offline reserve), or is the issuer account of a currency: money enters the system
-- from issuer accounts, the only ones that may go below zero, so the balances of a
-- currency always sum to zero. Balances are kept as running debits and credits,
-- moved only by transfers.
--
-- SQLite cannot relax NOT NULL in place, so the table is rebuilt; nothing refers to
-- accounts yet. Existing accounts are merchant settlement accounts.
CREATE TABLE accounts_ledger (
    id                 TEXT PRIMARY KEY,
    kind               TEXT NOT NULL CHECK (kind IN
                           ('merchant_settlement', 'consumer_funding', 'consumer_offline_reserve', 'issuer')),
    merchant_id        TEXT REFERENCES merchants(id),
    consumer_id        TEXT REFERENCES consumers(id),
    label              TEXT NOT NULL,
    currency           TEXT NOT NULL,
    debits_minor       INTEGER NOT NULL DEFAULT 0 CHECK (debits_minor >= 0),
    credits_minor      INTEGER NOT NULL DEFAULT 0 CHECK (credits_minor >= 0),
    overdraft_allowed  INTEGER NOT NULL DEFAULT 0 CHECK (overdraft_allowed = (kind = 'issuer')),
    created_at         INTEGER NOT NULL,
    CHECK ((kind = 'merchant_settlement' AND merchant_id IS NOT NULL AND consumer_id IS NULL)
        OR (kind IN ('consumer_funding', 'consumer_offline_reserve') AND consumer_id IS NOT NULL AND merchant_id IS NULL)
        OR (kind = 'issuer' AND merchant_id IS NULL AND consumer_id IS NULL)),
    -- The last guard: transfers check the balance before they debit.
    CHECK (overdraft_allowed = 1 OR debits_minor <= credits_minor)
);
INSERT INTO accounts_ledger (id, kind, merchant_id, label, currency, created_at)
    SELECT id, 'merchant_settlement', merchant_id, label, currency, created_at FROM accounts;
DROP TABLE accounts;
ALTER TABLE accounts_ledger RENAME TO accounts;
CREATE INDEX accounts_by_merchant ON accounts (merchant_id) WHERE merchant_id IS NOT NULL;
CREATE INDEX accounts_by_consumer ON accounts (consumer_id) WHERE consumer_id IS NOT NULL;
CREATE UNIQUE INDEX accounts_one_issuer_per_currency ON accounts (currency) WHERE kind = 'issuer';

-- Immutable double-entry transfers. The primary key makes a transfer id apply at
-- most once, whichever instance posts it.
CREATE TABLE transfers (
    id                 TEXT PRIMARY KEY,
    debit_account_id   TEXT NOT NULL REFERENCES accounts(id),
    credit_account_id  TEXT NOT NULL REFERENCES accounts(id),
    amount_minor       INTEGER NOT NULL CHECK (amount_minor > 0),
    currency           TEXT NOT NULL,
    reference          TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    CHECK (debit_account_id <> credit_account_id)
);
CREATE INDEX transfers_by_debit_account ON transfers (debit_account_id, created_at, id);
CREATE INDEX transfers_by_credit_account ON transfers (credit_account_id, created_at, id);
