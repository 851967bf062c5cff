//! Offline credentials: the server's record of what it allowed a phone to pay offline,
//! and the payments settled under them.
//!
//! Settlement decides a whole batch of payments in one transaction: it locks the
//! batch's credentials ([`Tx::lock_offline_credentials`]), reads the stored payments
//! its payments could collide with ([`Tx::offline_payments_colliding`]), and inserts
//! the ones it settles with a statement that skips, rather than fails on, a payment
//! stored meanwhile ([`Tx::insert_offline_payments`]).

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::sql::{Placeholders, ROWS_PER_STATEMENT, rows_for_ids, sorted_unique};
use crate::{Backend, Store, StoreError, Tx};

/// Each credential of a phone gets its own range of counter values, this wide.
pub const COUNTER_RANGE: i64 = 1 << 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineCredentialRecord {
    pub id: String,
    pub device_id: String,
    pub consumer_id: String,
    pub reserve_account_id: String,
    /// Uncompressed SEC1 P-256 point.
    pub public_key: Vec<u8>,
    pub limit_minor: i64,
    pub currency: String,
    pub counter_start: i64,
    pub issued_at: i64,
    pub not_after: i64,
    pub revoked_at: Option<i64>,
}

const COLUMNS: &str = "id, device_id, consumer_id, reserve_account_id, public_key, limit_minor, currency, \
                       counter_start, issued_at, not_after, revoked_at";

fn from_row(row: &AnyRow) -> Result<OfflineCredentialRecord, StoreError> {
    Ok(OfflineCredentialRecord {
        id: row.try_get("id")?,
        device_id: row.try_get("device_id")?,
        consumer_id: row.try_get("consumer_id")?,
        reserve_account_id: row.try_get("reserve_account_id")?,
        public_key: row.try_get("public_key")?,
        limit_minor: row.try_get("limit_minor")?,
        currency: row.try_get("currency")?,
        counter_start: row.try_get("counter_start")?,
        issued_at: row.try_get("issued_at")?,
        not_after: row.try_get("not_after")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

impl Tx {
    /// Where the next credential of `device_id` starts counting: past every range
    /// given to its earlier credentials, so no two share a counter value.
    pub async fn next_counter_start(&mut self, device_id: &str) -> Result<i64, StoreError> {
        let highest: Option<i64> =
            sqlx::query_scalar("SELECT MAX(counter_start) FROM offline_credentials WHERE device_id = $1")
                .bind(device_id)
                .fetch_one(self.conn())
                .await?;
        Ok(highest.map_or(0, |start| start.saturating_add(COUNTER_RANGE)))
    }

    pub async fn insert_offline_credential(&mut self, record: &OfflineCredentialRecord) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO offline_credentials ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ));
        sqlx::query(sql)
            .bind(&record.id)
            .bind(&record.device_id)
            .bind(&record.consumer_id)
            .bind(&record.reserve_account_id)
            .bind(&record.public_key)
            .bind(record.limit_minor)
            .bind(&record.currency)
            .bind(record.counter_start)
            .bind(record.issued_at)
            .bind(record.not_after)
            .bind(record.revoked_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("offline credential", "device, consumer or account"))?;
        Ok(())
    }
}

/// A credential locked for the rest of a settlement's transaction, with what its
/// settled payments have moved so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedCredential {
    pub record: OfflineCredentialRecord,
    pub settled_minor: i64,
}

impl Tx {
    /// Locks the credentials among `ids` for this transaction and reads them, in id
    /// order; unknown ids are left out. On PostgreSQL the row locks are taken in id
    /// order, so settlements over the same credentials, on one instance or several,
    /// take turns without deadlocking, and each sees the payments the one before it
    /// committed. SQLite has one writer at a time and needs no lock.
    pub async fn lock_offline_credentials(&mut self, ids: &[&str]) -> Result<Vec<LockedCredential>, StoreError> {
        let lock = if self.postgres { " FOR UPDATE" } else { "" };
        let rows = rows_for_ids(self.postgres, self.conn(), &sorted_unique(ids), |list| {
            format!("SELECT {COLUMNS}, settled_minor FROM offline_credentials WHERE id IN ({list}) ORDER BY id{lock}")
        })
        .await?;
        rows.iter()
            .map(|row| Ok(LockedCredential { record: from_row(row)?, settled_minor: row.try_get("settled_minor")? }))
            .collect()
    }
}

impl Store {
    /// The credentials among `ids`, in id order; unknown ids are left out.
    pub async fn offline_credentials(&self, ids: &[&str]) -> Result<Vec<OfflineCredentialRecord>, StoreError> {
        let mut conn = self.pool().acquire().await?;
        let postgres = self.backend == Backend::Postgres;
        let rows = rows_for_ids(postgres, &mut conn, &sorted_unique(ids), |list| {
            format!("SELECT {COLUMNS} FROM offline_credentials WHERE id IN ({list}) ORDER BY id")
        })
        .await?;
        rows.iter().map(from_row).collect()
    }

    pub async fn offline_credential(&self, id: &str) -> Result<OfflineCredentialRecord, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM offline_credentials WHERE id = $1"));
        let row = sqlx::query(sql).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(from_row).transpose()?.ok_or(StoreError::NotFound { what: "offline credential" })
    }

    pub async fn offline_credentials_of_device(
        &self,
        device_id: &str,
    ) -> Result<Vec<OfflineCredentialRecord>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM offline_credentials WHERE device_id = $1 ORDER BY counter_start"
        ));
        let rows = sqlx::query(sql).bind(device_id).fetch_all(self.pool()).await?;
        rows.iter().map(from_row).collect()
    }
}

/// A settled offline payment, with the receipt the server signed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflinePaymentRecord {
    /// SHA-256 of the signed approval, hex; also the id of its transfer.
    pub payment_id: String,
    pub credential_id: String,
    pub counter: i64,
    /// The request's nonce, hex.
    pub nonce: String,
    pub amount_minor: i64,
    pub currency: String,
    pub merchant_id: String,
    pub terminal_id: String,
    pub receipt: Vec<u8>,
    pub settled_at: i64,
}

const PAYMENT_COLUMNS: &str =
    "payment_id, credential_id, counter, nonce, amount_minor, currency, merchant_id, terminal_id, receipt, settled_at";

fn payment_from_row(row: &AnyRow) -> Result<OfflinePaymentRecord, StoreError> {
    Ok(OfflinePaymentRecord {
        payment_id: row.try_get("payment_id")?,
        credential_id: row.try_get("credential_id")?,
        counter: row.try_get("counter")?,
        nonce: row.try_get("nonce")?,
        amount_minor: row.try_get("amount_minor")?,
        currency: row.try_get("currency")?,
        merchant_id: row.try_get("merchant_id")?,
        terminal_id: row.try_get("terminal_id")?,
        receipt: row.try_get("receipt")?,
        settled_at: row.try_get("settled_at")?,
    })
}

impl Tx {
    /// Counts each amount against its credential's limit, if the credential is not
    /// revoked and the amount fits what is left; returns how many credentials were
    /// spent (the others are left as they were). One statement, so concurrent
    /// settlements under one credential cannot together pass its limit.
    pub async fn spend_offline_credentials(&mut self, spends: &[(&str, i64)]) -> Result<usize, StoreError> {
        let mut spent = 0;
        for chunk in spends.chunks(ROWS_PER_STATEMENT) {
            let rows = Placeholders::new(self.postgres).derived_table(chunk.len(), &["id", "amount"]);
            let sql = sqlx::AssertSqlSafe(format!(
                "UPDATE offline_credentials SET settled_minor = settled_minor + spend.amount FROM ({rows}) AS spend \
                 WHERE offline_credentials.id = spend.id AND revoked_at IS NULL \
                 AND settled_minor + spend.amount <= limit_minor"
            ));
            let mut update = sqlx::query(sql);
            for (id, amount_minor) in chunk {
                update = update.bind(*id).bind(*amount_minor);
            }
            let rows = update.execute(self.conn()).await?.rows_affected();
            spent += usize::try_from(rows).unwrap_or(usize::MAX);
        }
        Ok(spent)
    }

    /// Revokes a credential at `now`; false if it was revoked already.
    pub async fn revoke_offline_credential(&mut self, id: &str, now: i64) -> Result<bool, StoreError> {
        let revoked =
            sqlx::query("UPDATE offline_credentials SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .bind(now)
                .execute(self.conn())
                .await?;
        Ok(revoked.rows_affected() == 1)
    }

    /// The stored payments that share a payment id, a nonce, or a credential and
    /// counter with any of `payments`, each once.
    pub async fn offline_payments_colliding(
        &mut self,
        payments: &[&OfflinePaymentRecord],
    ) -> Result<Vec<OfflinePaymentRecord>, StoreError> {
        let mut found: Vec<OfflinePaymentRecord> = Vec::new();
        for chunk in payments.chunks(ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.postgres);
            let ids = placeholders.list(chunk.len());
            let nonces = placeholders.list(chunk.len());
            let counters = placeholders.tuples(chunk.len(), 2);
            // Three lookups, each on its own unique index.
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {PAYMENT_COLUMNS} FROM offline_payments WHERE payment_id IN ({ids}) \
                 UNION ALL SELECT {PAYMENT_COLUMNS} FROM offline_payments WHERE nonce IN ({nonces}) \
                 UNION ALL SELECT {PAYMENT_COLUMNS} FROM offline_payments \
                 WHERE (credential_id, counter) IN (VALUES {counters})"
            ));
            let mut query = sqlx::query(sql);
            for payment in chunk {
                query = query.bind(&payment.payment_id);
            }
            for payment in chunk {
                query = query.bind(&payment.nonce);
            }
            for payment in chunk {
                query = query.bind(&payment.credential_id).bind(payment.counter);
            }
            for row in query.fetch_all(self.conn()).await? {
                let stored = payment_from_row(&row)?;
                if !found.iter().any(|p| p.payment_id == stored.payment_id) {
                    found.push(stored);
                }
            }
        }
        Ok(found)
    }

    /// Inserts `payments`, in their order, skipping each that collides with a stored
    /// payment (its id, its nonce, or its credential and counter) instead of failing;
    /// returns the ids of those inserted. On PostgreSQL a payment another transaction
    /// is inserting waits for that transaction to end.
    pub async fn insert_offline_payments(
        &mut self,
        payments: &[&OfflinePaymentRecord],
    ) -> Result<Vec<String>, StoreError> {
        let mut inserted = Vec::with_capacity(payments.len());
        for chunk in payments.chunks(ROWS_PER_STATEMENT) {
            let sql = sqlx::AssertSqlSafe(format!(
                "INSERT INTO offline_payments ({PAYMENT_COLUMNS}) VALUES {} ON CONFLICT DO NOTHING RETURNING payment_id",
                Placeholders::new(self.postgres).tuples(chunk.len(), 10)
            ));
            let mut insert = sqlx::query_scalar::<_, String>(sql);
            for payment in chunk {
                insert = insert
                    .bind(&payment.payment_id)
                    .bind(&payment.credential_id)
                    .bind(payment.counter)
                    .bind(&payment.nonce)
                    .bind(payment.amount_minor)
                    .bind(&payment.currency)
                    .bind(&payment.merchant_id)
                    .bind(&payment.terminal_id)
                    .bind(&payment.receipt)
                    .bind(payment.settled_at);
            }
            inserted.extend(insert.fetch_all(self.conn()).await?);
        }
        Ok(inserted)
    }

    /// The id of the oldest settlement account of `merchant_id` in `currency`, opened
    /// on first use under an id derived from both, so concurrent first uses open it once.
    pub async fn merchant_settlement_account_id(
        &mut self,
        merchant_id: &str,
        currency: &str,
        now: i64,
    ) -> Result<String, StoreError> {
        let existing: Option<String> = sqlx::query_scalar(
            "SELECT id FROM accounts WHERE merchant_id = $1 AND kind = 'merchant_settlement' AND currency = $2 \
             ORDER BY created_at, id LIMIT 1",
        )
        .bind(merchant_id)
        .bind(currency)
        .fetch_optional(self.conn())
        .await?;
        let id = match existing {
            Some(id) => id,
            None => {
                let id = format!("acc_settle_{merchant_id}_{currency}");
                sqlx::query(
                    "INSERT INTO accounts (id, kind, merchant_id, label, currency, overdraft_allowed, created_at) \
                     VALUES ($1, 'merchant_settlement', $2, 'offline settlement', $3, 0, $4) ON CONFLICT DO NOTHING",
                )
                .bind(&id)
                .bind(merchant_id)
                .bind(currency)
                .bind(now)
                .execute(self.conn())
                .await?;
                id
            }
        };
        Ok(id)
    }
}
