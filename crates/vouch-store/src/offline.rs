//! Offline credentials: the server's record of what it allowed a phone to pay offline.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Store, StoreError, Tx};

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

impl Store {
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
