//! Merchants, devices and service providers. Accounts are in [`crate::ledger`].

use sqlx::any::AnyRow;
use sqlx::{Executor, Row};
use vouch_proto::enrol::DeviceKind;

use crate::{Store, StoreError, Tx};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merchant {
    pub id: String,
    pub name: String,
    /// ISO 8583 DE 42, 15 characters; unique. Needed before the merchant's terminals
    /// can authorize.
    pub card_acceptor_id: Option<String>,
    /// ISO 18245 merchant category code, 4 digits.
    pub merchant_category: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    Active,
    Suspended,
    Revoked,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::Suspended => "suspended",
            DeviceStatus::Revoked => "revoked",
        }
    }

    pub const ALL: [DeviceStatus; 3] = [DeviceStatus::Active, DeviceStatus::Suspended, DeviceStatus::Revoked];

    /// `None` for anything but `active`, `suspended` or `revoked`.
    pub fn parse(text: &str) -> Option<Self> {
        DeviceStatus::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: String,
    pub kind: DeviceKind,
    pub merchant_id: String,
    pub model: String,
    pub firmware_version: String,
    /// The identity key as a public JWK (JSON text).
    pub public_jwk: String,
    /// RFC 7638 thumbprint of the identity key; unique, so a key enrols once.
    pub key_thumbprint: String,
    pub status: DeviceStatus,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceProvider {
    pub id: String,
    pub name: String,
    pub endpoint: String,
    pub public_jwk: String,
    pub created_at: i64,
}

/// Which devices to list, and one page of them (keyset pagination by id).
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub merchant_id: Option<String>,
    pub kind: Option<DeviceKind>,
    pub status: Option<DeviceStatus>,
    pub after_id: Option<String>,
    pub limit: u32,
}

const DEVICE_COLUMNS: &str =
    "id, kind, merchant_id, model, firmware_version, public_jwk, key_thumbprint, status, created_at, updated_at";

fn device_from_row(row: &AnyRow) -> Result<Device, StoreError> {
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    Ok(Device {
        id: row.try_get("id")?,
        kind: kind.parse().map_err(|_| StoreError::Corrupt { what: "device kind", detail: kind })?,
        merchant_id: row.try_get("merchant_id")?,
        model: row.try_get("model")?,
        firmware_version: row.try_get("firmware_version")?,
        public_jwk: row.try_get("public_jwk")?,
        key_thumbprint: row.try_get("key_thumbprint")?,
        status: DeviceStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt { what: "device status", detail: status.clone() })?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(crate) const MERCHANT_COLUMNS: &str = "id, name, card_acceptor_id, merchant_category, created_at";

pub(crate) fn merchant_from_row(row: &AnyRow) -> Result<Merchant, StoreError> {
    Ok(Merchant {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        card_acceptor_id: row.try_get("card_acceptor_id")?,
        merchant_category: row.try_get("merchant_category")?,
        created_at: row.try_get("created_at")?,
    })
}

fn provider_from_row(row: &AnyRow) -> Result<ServiceProvider, StoreError> {
    Ok(ServiceProvider {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        endpoint: row.try_get("endpoint")?,
        public_jwk: row.try_get("public_jwk")?,
        created_at: row.try_get("created_at")?,
    })
}

async fn fetch_device<'e>(executor: impl Executor<'e, Database = sqlx::Any>, id: &str) -> Result<Device, StoreError> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"));
    let row = sqlx::query(sql).bind(id).fetch_optional(executor).await?;
    row.as_ref().map(device_from_row).transpose()?.ok_or(StoreError::NotFound { what: "device" })
}

impl Tx {
    pub async fn insert_merchant(&mut self, merchant: &Merchant) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO merchants (id, name, card_acceptor_id, merchant_category, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&merchant.id)
        .bind(&merchant.name)
        .bind(&merchant.card_acceptor_id)
        .bind(&merchant.merchant_category)
        .bind(merchant.created_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("merchant", "merchant"))?;
        Ok(())
    }

    /// Fails with [`StoreError::Conflict`] when the key is already enrolled.
    pub async fn insert_device(&mut self, device: &Device) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO devices (id, kind, merchant_id, model, firmware_version, public_jwk, key_thumbprint, \
             status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&device.id)
        .bind(device.kind.as_str())
        .bind(&device.merchant_id)
        .bind(&device.model)
        .bind(&device.firmware_version)
        .bind(&device.public_jwk)
        .bind(&device.key_thumbprint)
        .bind(device.status.as_str())
        .bind(device.created_at)
        .bind(device.updated_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("device", "merchant"))?;
        Ok(())
    }

    pub async fn device(&mut self, id: &str) -> Result<Device, StoreError> {
        fetch_device(self.conn(), id).await
    }

    /// Moves a device to `status` if its current status is one of `from`; returns
    /// the updated device. Revocation is final because no transition leaves it.
    pub async fn set_device_status(
        &mut self,
        id: &str,
        from: &[DeviceStatus],
        status: DeviceStatus,
        now: i64,
    ) -> Result<Device, StoreError> {
        let current = self.device(id).await?;
        if !from.contains(&current.status) {
            return Err(StoreError::StatusTransition { from: current.status.as_str(), to: status.as_str() });
        }
        let updated = sqlx::query("UPDATE devices SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4")
            .bind(status.as_str())
            .bind(now)
            .bind(id)
            .bind(current.status.as_str())
            .execute(self.conn())
            .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::Conflict { what: "concurrent device status change" });
        }
        self.device(id).await
    }

    pub async fn insert_service_provider(&mut self, provider: &ServiceProvider) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO service_providers (id, name, endpoint, public_jwk, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&provider.id)
        .bind(&provider.name)
        .bind(&provider.endpoint)
        .bind(&provider.public_jwk)
        .bind(provider.created_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("service provider", "service provider"))?;
        Ok(())
    }
}

impl Store {
    pub async fn device(&self, id: &str) -> Result<Device, StoreError> {
        fetch_device(self.pool(), id).await
    }

    pub async fn devices(&self, filter: &DeviceFilter) -> Result<Vec<Device>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} FROM devices \
             WHERE ($1 IS NULL OR merchant_id = $1) AND ($2 IS NULL OR kind = $2) \
             AND ($3 IS NULL OR status = $3) AND ($4 IS NULL OR id > $4) ORDER BY id LIMIT $5"
        ));
        let rows = sqlx::query(sql)
            .bind(filter.merchant_id.as_deref())
            .bind(filter.kind.map(DeviceKind::as_str))
            .bind(filter.status.map(DeviceStatus::as_str))
            .bind(filter.after_id.as_deref())
            .bind(i64::from(filter.limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(device_from_row).collect()
    }

    pub async fn merchant(&self, id: &str) -> Result<Merchant, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {MERCHANT_COLUMNS} FROM merchants WHERE id = $1")))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(merchant_from_row).transpose()?.ok_or(StoreError::NotFound { what: "merchant" })
    }

    pub async fn merchants(&self, after_id: Option<&str>, limit: u32) -> Result<Vec<Merchant>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MERCHANT_COLUMNS} FROM merchants WHERE ($1 IS NULL OR id > $1) ORDER BY id LIMIT $2"
        )))
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(merchant_from_row).collect()
    }

    pub async fn service_provider(&self, id: &str) -> Result<ServiceProvider, StoreError> {
        let row = sqlx::query("SELECT id, name, endpoint, public_jwk, created_at FROM service_providers WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(provider_from_row).transpose()?.ok_or(StoreError::NotFound { what: "service provider" })
    }

    pub async fn service_providers(&self) -> Result<Vec<ServiceProvider>, StoreError> {
        let rows =
            sqlx::query("SELECT id, name, endpoint, public_jwk, created_at FROM service_providers ORDER BY name")
                .fetch_all(self.pool())
                .await?;
        rows.iter().map(provider_from_row).collect()
    }
}
