-- The ledger. An account belongs to a merchant (settlement), to a consumer (funding,
-- offline reserve), or is the issuer account of a currency: money enters the system
-- from issuer accounts, the only ones that may go below zero, so the balances of a
-- currency always sum to zero. Balances are kept as running debits and credits,
-- moved only by transfers. Existing accounts are merchant settlement accounts.
ALTER TABLE accounts
    ADD COLUMN kind TEXT NOT NULL DEFAULT 'merchant_settlement' CHECK (kind IN
        ('merchant_settlement', 'consumer_funding', 'consumer_offline_reserve', 'issuer')),
    ADD COLUMN consumer_id TEXT REFERENCES consumers(id),
    ADD COLUMN debits_minor BIGINT NOT NULL DEFAULT 0 CHECK (debits_minor >= 0),
    ADD COLUMN credits_minor BIGINT NOT NULL DEFAULT 0 CHECK (credits_minor >= 0),
    ADD COLUMN overdraft_allowed BIGINT NOT NULL DEFAULT 0,
    ALTER COLUMN merchant_id DROP NOT NULL;
ALTER TABLE accounts
    ALTER COLUMN kind DROP DEFAULT,
    ADD CHECK (overdraft_allowed = CASE WHEN kind = 'issuer' THEN 1 ELSE 0 END),
    ADD CHECK ((kind = 'merchant_settlement' AND merchant_id IS NOT NULL AND consumer_id IS NULL)
        OR (kind IN ('consumer_funding', 'consumer_offline_reserve') AND consumer_id IS NOT NULL AND merchant_id IS NULL)
        OR (kind = 'issuer' AND merchant_id IS NULL AND consumer_id IS NULL)),
    -- The last guard: transfers check the balance before they debit.
    ADD CHECK (overdraft_allowed = 1 OR debits_minor <= credits_minor);
CREATE INDEX accounts_by_merchant ON accounts (merchant_id) WHERE merchant_id IS NOT NULL;
CREATE INDEX accounts_by_consumer ON accounts (consumer_id) WHERE consumer_id IS NOT NULL;
CREATE UNIQUE INDEX accounts_one_issuer_per_currency ON accounts (currency) WHERE kind = 'issuer';

-- Immutable double-entry transfers. The primary key makes a transfer id apply at
-- most once, whichever instance posts it.
CREATE TABLE transfers (
    id                 TEXT PRIMARY KEY,
    debit_account_id   TEXT NOT NULL REFERENCES accounts(id),
    credit_account_id  TEXT NOT NULL REFERENCES accounts(id),
    amount_minor       BIGINT NOT NULL CHECK (amount_minor > 0),
    currency           TEXT NOT NULL,
    reference          TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    CHECK (debit_account_id <> credit_account_id)
);
CREATE INDEX transfers_by_debit_account ON transfers (debit_account_id, created_at, id);
CREATE INDEX transfers_by_credit_account ON transfers (credit_account_id, created_at, id);
