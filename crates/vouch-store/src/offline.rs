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
    /// What settled payments have moved under it; never above `limit_minor`.
    pub settled_minor: i64,
    /// Set when the credential was closed at a sync: no counter at or above it settles.
    /// It is the `counter_next` the sync named.
    pub counter_end: Option<i64>,
    pub closed_at: Option<i64>,
    /// Set with `closed_at`: the `spent_minor` the sync named.
    pub closed_spent_minor: Option<i64>,
    /// Set with `closed_at`: what had settled under it when it closed.
    pub closed_settled_minor: Option<i64>,
    /// The credential this one was issued for the rest of, when it closed.
    pub refreshed_from: Option<String>,
}

const COLUMNS: &str = "id, device_id, consumer_id, reserve_account_id, public_key, limit_minor, currency, \
                       counter_start, issued_at, not_after, revoked_at, settled_minor, counter_end, closed_at, \
                       closed_spent_minor, closed_settled_minor, refreshed_from";

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
        settled_minor: row.try_get("settled_minor")?,
        counter_end: row.try_get("counter_end")?,
        closed_at: row.try_get("closed_at")?,
        closed_spent_minor: row.try_get("closed_spent_minor")?,
        closed_settled_minor: row.try_get("closed_settled_minor")?,
        refreshed_from: row.try_get("refreshed_from")?,
    })
}

async fn fetch_credential(
    conn: &mut sqlx::AnyConnection,
    id: &str,
) -> Result<Option<OfflineCredentialRecord>, StoreError> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM offline_credentials WHERE id = $1"));
    let row = sqlx::query(sql).bind(id).fetch_optional(conn).await?;
    row.as_ref().map(from_row).transpose()
}

/// Why a credential was not closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseRefusal {
    /// No credential of this id belongs to the device.
    Unknown,
    Revoked,
    /// It was closed before: a credential is closed once.
    Closed,
    /// A payment under a counter at or above the requested end has settled; `highest`
    /// is the highest such counter.
    CounterSpent {
        highest: i64,
    },
}

/// A credential as it was closed, and how much of its limit the close released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedCredential {
    pub record: OfflineCredentialRecord,
    /// The limit before the close minus the limit after: money in the reserve that no
    /// payment under the closed credential can take any more.
    pub released_minor: i64,
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
            "INSERT INTO offline_credentials ({COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
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
            .bind(record.settled_minor)
            .bind(record.counter_end)
            .bind(record.closed_at)
            .bind(record.closed_spent_minor)
            .bind(record.closed_settled_minor)
            .bind(&record.refreshed_from)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert(
                "offline credential",
                "device, consumer, account or refreshed credential",
            ))?;
        Ok(())
    }

    pub async fn offline_credential(&mut self, id: &str) -> Result<Option<OfflineCredentialRecord>, StoreError> {
        fetch_credential(self.conn(), id).await
    }

    /// Closes credential `id` of `device_id` at `now`, as its phone syncs: the limit is
    /// lowered to `spent_minor`, or to what has settled under it when that is more (and
    /// never raised), and the counter range ends at `counter_end`; `spent_minor` and
    /// what had settled are kept with it. One conditional statement, computed on the row
    /// as it is when the statement runs, so a credential is closed once even when
    /// instances race, and settlements that land before the close stay within the
    /// lowered limit.
    pub async fn close_offline_credential(
        &mut self,
        id: &str,
        device_id: &str,
        counter_end: i64,
        spent_minor: i64,
        now: i64,
    ) -> Result<Result<ClosedCredential, CloseRefusal>, StoreError> {
        // After any settlement under way under it, so the payments checked below are
        // all those committed; the limit changes only here, once, so the limit read now
        // is the one closed.
        self.lock_offline_credentials(&[id]).await?;
        let Some(open) = self.offline_credential(id).await?.filter(|r| r.device_id == device_id) else {
            return Ok(Err(CloseRefusal::Unknown));
        };
        let closed = sqlx::query(
            "UPDATE offline_credentials SET \
             limit_minor = CASE WHEN settled_minor >= $3 THEN settled_minor \
                                WHEN $3 <= limit_minor THEN $3 ELSE limit_minor END, \
             counter_end = $2, closed_at = $4, closed_spent_minor = $3, closed_settled_minor = settled_minor \
             WHERE id = $1 AND revoked_at IS NULL AND closed_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM offline_payments WHERE credential_id = $1 AND counter >= $2)",
        )
        .bind(id)
        .bind(counter_end)
        .bind(spent_minor)
        .bind(now)
        .execute(self.conn())
        .await?;
        let record = self.offline_credential(id).await?.ok_or(StoreError::NotFound { what: "offline credential" })?;
        if closed.rows_affected() == 0 {
            let refusal = if record.revoked_at.is_some() {
                CloseRefusal::Revoked
            } else if record.closed_at.is_some() {
                CloseRefusal::Closed
            } else {
                let highest: Option<i64> =
                    sqlx::query_scalar("SELECT MAX(counter) FROM offline_payments WHERE credential_id = $1")
                        .bind(id)
                        .fetch_one(self.conn())
                        .await?;
                CloseRefusal::CounterSpent { highest: highest.unwrap_or(counter_end) }
            };
            return Ok(Err(refusal));
        }
        let released_minor = open.limit_minor.saturating_sub(record.limit_minor);
        Ok(Ok(ClosedCredential { record, released_minor }))
    }
}

impl Tx {
    /// Locks the credentials among `ids` for this transaction and reads them, in id
    /// order; unknown ids are left out. On PostgreSQL the row locks are taken in id
    /// order, so settlements and closes over the same credentials, on one instance or
    /// several, take turns without deadlocking, and each sees what the one before it
    /// committed (read committed). SQLite has one writer at a time and needs no lock.
    pub async fn lock_offline_credentials(&mut self, ids: &[&str]) -> Result<Vec<OfflineCredentialRecord>, StoreError> {
        let lock = if self.postgres { " FOR UPDATE" } else { "" };
        let rows = rows_for_ids(self.postgres, self.conn(), &sorted_unique(ids), |list| {
            format!("SELECT {COLUMNS} FROM offline_credentials WHERE id IN ({list}) ORDER BY id{lock}")
        })
        .await?;
        rows.iter().map(from_row).collect()
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
        let mut conn = self.pool().acquire().await?;
        fetch_credential(&mut conn, id).await?.ok_or(StoreError::NotFound { what: "offline credential" })
    }

    /// The credential issued for the rest of `id`'s limit when `id` closed, if any.
    pub async fn offline_credential_refreshed_from(
        &self,
        id: &str,
    ) -> Result<Option<OfflineCredentialRecord>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM offline_credentials WHERE refreshed_from = $1"));
        let row = sqlx::query(sql).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(from_row).transpose()
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

/// Why a payment was not counted against its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendRefusal {
    /// The credential is revoked, or what is left of its limit is below the amount.
    OverLimit,
    /// The credential was closed at a sync, ending its counters at `counter_end`.
    CounterClosed { counter_end: i64 },
}

impl SpendRefusal {
    /// The refusal reason a settlement answers with.
    pub fn reason(self) -> &'static str {
        match self {
            SpendRefusal::OverLimit => "over-limit",
            SpendRefusal::CounterClosed { .. } => "counter-closed",
        }
    }
}

impl std::fmt::Display for SpendRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpendRefusal::OverLimit => {
                f.write_str("the credential is revoked or its remaining limit is below the amount")
            }
            SpendRefusal::CounterClosed { counter_end } => {
                write!(f, "the credential was closed at a sync: its counters end below {counter_end}")
            }
        }
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
    /// Counts `amount_minor`, paid under counters up to `counter`, against the
    /// credential's limit, if it is not revoked, the amount fits what is left and the
    /// counter is below the end set by a close; nothing is written otherwise. One
    /// statement, so concurrent payments under one credential cannot together pass its
    /// limit, and none slips past a close. Settlement decides a batch under the
    /// credential's lock and then spends each credential's share at once, with its
    /// highest counter.
    pub async fn spend_offline_credential(
        &mut self,
        id: &str,
        counter: i64,
        amount_minor: i64,
    ) -> Result<Result<(), SpendRefusal>, StoreError> {
        let spent = sqlx::query(
            "UPDATE offline_credentials SET settled_minor = settled_minor + $3 \
             WHERE id = $1 AND revoked_at IS NULL AND settled_minor + $3 <= limit_minor \
             AND (counter_end IS NULL OR $2 < counter_end)",
        )
        .bind(id)
        .bind(counter)
        .bind(amount_minor)
        .execute(self.conn())
        .await?;
        if spent.rows_affected() == 1 {
            return Ok(Ok(()));
        }
        let counter_end = self.offline_credential(id).await?.and_then(|r| r.counter_end);
        Ok(Err(match counter_end {
            Some(counter_end) if counter >= counter_end => SpendRefusal::CounterClosed { counter_end },
            _ => SpendRefusal::OverLimit,
        }))
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

impl Store {
    pub async fn offline_payment(&self, payment_id: &str) -> Result<Option<OfflinePaymentRecord>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {PAYMENT_COLUMNS} FROM offline_payments WHERE payment_id = $1"));
        let row = sqlx::query(sql).bind(payment_id).fetch_optional(self.pool()).await?;
        row.as_ref().map(payment_from_row).transpose()
    }

    /// One page of the payments settled under any credential of `device_id`, in
    /// (`settled_at`, `payment_id`) order, after that position when `after` is given.
    pub async fn offline_payments_of_device(
        &self,
        device_id: &str,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<OfflinePaymentRecord>, StoreError> {
        let (after_settled_at, after_id) = after.unzip();
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {PAYMENT_COLUMNS} FROM offline_payments \
             WHERE credential_id IN (SELECT id FROM offline_credentials WHERE device_id = $1) \
             AND ($2 IS NULL OR settled_at > $2 OR (settled_at = $2 AND payment_id > $3)) \
             ORDER BY settled_at, payment_id LIMIT $4"
        ));
        let rows = sqlx::query(sql)
            .bind(device_id)
            .bind(after_settled_at)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(payment_from_row).collect()
    }
}
