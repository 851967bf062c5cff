//! Single-use enrolment nonces, hashed API keys and sealed server signing keys.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Store, StoreError, Tx};

/// Why a nonce could not be consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceRejection {
    Unknown,
    Expired,
    AlreadyUsed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    /// SHA-256 of the secret part; the secret itself is never stored.
    pub secret_hash: Vec<u8>,
    /// Space-separated scope names.
    pub scopes: String,
    pub label: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    pub kid: String,
    /// PKCS#8 private key sealed under the master key (AES-256-GCM).
    pub sealed_pkcs8: Vec<u8>,
    pub public_jwk: String,
    pub created_at: i64,
    pub retired_at: Option<i64>,
    /// A retired key stays in the JWK Set until this time, so everything it signed
    /// can still be verified.
    pub publish_until: Option<i64>,
}

fn api_key_from_row(row: &AnyRow) -> Result<ApiKeyRecord, StoreError> {
    Ok(ApiKeyRecord {
        id: row.try_get("id")?,
        secret_hash: row.try_get("secret_hash")?,
        scopes: row.try_get("scopes")?,
        label: row.try_get("label")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn signing_key_from_row(row: &AnyRow) -> Result<SigningKeyRecord, StoreError> {
    Ok(SigningKeyRecord {
        kid: row.try_get("kid")?,
        sealed_pkcs8: row.try_get("sealed_pkcs8")?,
        public_jwk: row.try_get("public_jwk")?,
        created_at: row.try_get("created_at")?,
        retired_at: row.try_get("retired_at")?,
        publish_until: row.try_get("publish_until")?,
    })
}

impl Tx {
    pub async fn insert_enrolment_nonce(&mut self, nonce: &str, expires_at: i64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO enrolment_nonces (nonce, expires_at) VALUES ($1, $2)")
            .bind(nonce)
            .bind(expires_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("enrolment nonce", "nonce"))?;
        Ok(())
    }

    /// Marks the nonce used. The conditional update is the single-use guarantee: of
    /// two transactions racing for one nonce, on any number of instances, exactly one
    /// sees a row change.
    pub async fn consume_enrolment_nonce(
        &mut self,
        nonce: &str,
        now: i64,
    ) -> Result<Result<(), NonceRejection>, StoreError> {
        let consumed = sqlx::query(
            "UPDATE enrolment_nonces SET consumed_at = $1 WHERE nonce = $2 AND consumed_at IS NULL AND expires_at >= $1",
        )
        .bind(now)
        .bind(nonce)
        .execute(self.conn())
        .await?;
        if consumed.rows_affected() == 1 {
            return Ok(Ok(()));
        }
        let row = sqlx::query("SELECT expires_at, consumed_at FROM enrolment_nonces WHERE nonce = $1")
            .bind(nonce)
            .fetch_optional(self.conn())
            .await?;
        let rejection = match row {
            None => NonceRejection::Unknown,
            Some(row) if row.try_get::<Option<i64>, _>("consumed_at")?.is_some() => NonceRejection::AlreadyUsed,
            Some(_) => NonceRejection::Expired,
        };
        Ok(Err(rejection))
    }

    /// Deletes nonces that expired before `before`; returns how many.
    pub async fn purge_enrolment_nonces(&mut self, before: i64) -> Result<u64, StoreError> {
        let deleted =
            sqlx::query("DELETE FROM enrolment_nonces WHERE expires_at < $1").bind(before).execute(self.conn()).await?;
        Ok(deleted.rows_affected())
    }

    pub async fn insert_api_key(&mut self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, secret_hash, scopes, label, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.id)
        .bind(&key.secret_hash)
        .bind(&key.scopes)
        .bind(&key.label)
        .bind(key.created_at)
        .bind(key.revoked_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("API key", "API key"))?;
        Ok(())
    }

    pub async fn revoke_api_key(&mut self, id: &str, now: i64) -> Result<(), StoreError> {
        let updated = sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(self.conn())
            .await?;
        if updated.rows_affected() == 1 { Ok(()) } else { Err(StoreError::NotFound { what: "active API key" }) }
    }

    pub async fn count_api_keys(&mut self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM api_keys").fetch_one(self.conn()).await?)
    }

    /// Adds `new` as the active key and retires every other active key, keeping it
    /// published until `publish_until`.
    pub async fn rotate_signing_key(&mut self, new: &SigningKeyRecord, publish_until: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE signing_keys SET retired_at = $1, publish_until = $2 WHERE retired_at IS NULL")
            .bind(new.created_at)
            .bind(publish_until)
            .execute(self.conn())
            .await?;
        sqlx::query(
            "INSERT INTO signing_keys (kid, sealed_pkcs8, public_jwk, created_at, retired_at, publish_until) \
             VALUES ($1, $2, $3, $4, NULL, NULL)",
        )
        .bind(&new.kid)
        .bind(&new.sealed_pkcs8)
        .bind(&new.public_jwk)
        .bind(new.created_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("signing key", "signing key"))?;
        Ok(())
    }

    pub async fn signing_key_count(&mut self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM signing_keys").fetch_one(self.conn()).await?)
    }
}

impl Store {
    pub async fn api_key(&self, id: &str) -> Result<ApiKeyRecord, StoreError> {
        let row =
            sqlx::query("SELECT id, secret_hash, scopes, label, created_at, revoked_at FROM api_keys WHERE id = $1")
                .bind(id)
                .fetch_optional(self.pool())
                .await?;
        row.as_ref().map(api_key_from_row).transpose()?.ok_or(StoreError::NotFound { what: "API key" })
    }

    /// Keys to publish at `now`: the active one and every retired one still in its
    /// overlap window, newest first.
    pub async fn published_signing_keys(&self, now: i64) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT kid, sealed_pkcs8, public_jwk, created_at, retired_at, publish_until FROM signing_keys \
             WHERE retired_at IS NULL OR publish_until >= $1 \
             ORDER BY CASE WHEN retired_at IS NULL THEN 0 ELSE 1 END, created_at DESC, kid DESC",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(signing_key_from_row).collect()
    }
}
