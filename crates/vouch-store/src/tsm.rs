//! The trusted service manager: device makers' CAs registered as issuers and the
//! certificates they revoked, and each device's registration under its crypto secure
//! element with the last message counter accepted under it, and the payment
//! application releases.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::sql::{Placeholders, ROWS_PER_STATEMENT};
use crate::{Backend, Store, StoreError, Tx};

/// A device maker's CA, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmIssuer {
    pub id: String,
    pub name: String,
    pub subject: String,
    pub certificate_der: Vec<u8>,
    /// SHA-256 of `certificate_der`; a certificate registers once.
    pub fingerprint: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub created_at: i64,
}

/// A device's registration under its crypto secure element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmRegistration {
    pub device_id: String,
    pub registration_id: String,
    pub issuer_id: String,
    /// Serial of the secure element's certificate, lowercase hex.
    pub se_serial: String,
    /// The secure element's certified key, uncompressed SEC1 P-256.
    pub se_public_key: Vec<u8>,
    /// The device key sealed under the master key (AES-256-GCM).
    pub sealed_device_key: Vec<u8>,
    pub instrument: String,
    /// The highest message counter accepted under this registration; 0 before any.
    pub last_counter: i64,
    pub registered_at: i64,
}

const ISSUER_COLUMNS: &str = "id, name, subject, certificate_der, fingerprint, not_before, not_after, created_at";
const REGISTRATION_COLUMNS: &str = "device_id, registration_id, issuer_id, se_serial, se_public_key, \
                                    sealed_device_key, instrument, last_counter, registered_at";

fn issuer_from_row(row: &AnyRow) -> Result<TsmIssuer, StoreError> {
    Ok(TsmIssuer {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        subject: row.try_get("subject")?,
        certificate_der: row.try_get("certificate_der")?,
        fingerprint: row.try_get("fingerprint")?,
        not_before: row.try_get("not_before")?,
        not_after: row.try_get("not_after")?,
        created_at: row.try_get("created_at")?,
    })
}

fn registration_from_row(row: &AnyRow) -> Result<TsmRegistration, StoreError> {
    Ok(TsmRegistration {
        device_id: row.try_get("device_id")?,
        registration_id: row.try_get("registration_id")?,
        issuer_id: row.try_get("issuer_id")?,
        se_serial: row.try_get("se_serial")?,
        se_public_key: row.try_get("se_public_key")?,
        sealed_device_key: row.try_get("sealed_device_key")?,
        instrument: row.try_get("instrument")?,
        last_counter: row.try_get("last_counter")?,
        registered_at: row.try_get("registered_at")?,
    })
}

impl Tx {
    /// Registers a device maker's CA; false when its fingerprint is registered already.
    pub async fn insert_tsm_issuer(&mut self, issuer: &TsmIssuer) -> Result<bool, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO tsm_issuers ({ISSUER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (fingerprint) DO NOTHING"
        ));
        let inserted = sqlx::query(sql)
            .bind(&issuer.id)
            .bind(&issuer.name)
            .bind(&issuer.subject)
            .bind(&issuer.certificate_der)
            .bind(&issuer.fingerprint)
            .bind(issuer.not_before)
            .bind(issuer.not_after)
            .bind(issuer.created_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("TSM issuer", "TSM issuer"))?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Revokes the certificate of `serial` (lowercase hex) issued by `issuer_id`; false
    /// when it was revoked already.
    pub async fn insert_tsm_revocation(
        &mut self,
        issuer_id: &str,
        serial: &str,
        revoked_at: i64,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO tsm_revocations (issuer_id, serial, revoked_at) VALUES ($1, $2, $3) \
             ON CONFLICT (issuer_id, serial) DO NOTHING",
        )
        .bind(issuer_id)
        .bind(serial)
        .bind(revoked_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("TSM revocation", "TSM issuer"))?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Stores the device's registration, replacing any it had, `last_counter`
    /// included.
    pub async fn upsert_tsm_registration(&mut self, registration: &TsmRegistration) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO tsm_registrations ({REGISTRATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (device_id) DO UPDATE SET registration_id = excluded.registration_id, \
             issuer_id = excluded.issuer_id, se_serial = excluded.se_serial, \
             se_public_key = excluded.se_public_key, sealed_device_key = excluded.sealed_device_key, \
             instrument = excluded.instrument, last_counter = excluded.last_counter, \
             registered_at = excluded.registered_at"
        ));
        sqlx::query(sql)
            .bind(&registration.device_id)
            .bind(&registration.registration_id)
            .bind(&registration.issuer_id)
            .bind(&registration.se_serial)
            .bind(&registration.se_public_key)
            .bind(&registration.sealed_device_key)
            .bind(&registration.instrument)
            .bind(registration.last_counter)
            .bind(registration.registered_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("TSM registration", "device or TSM issuer"))?;
        Ok(())
    }

    /// Accepts message `counter` of the device: true, and the registration's last
    /// counter moved to it, only while `registration_id` is the device's registration
    /// and `counter` is above every counter accepted under it. On PostgreSQL the row
    /// lock makes concurrent messages of one device take turns, each checked against
    /// the counter the one before it committed.
    pub async fn advance_tsm_counter(
        &mut self,
        device_id: &str,
        registration_id: &str,
        counter: i64,
    ) -> Result<bool, StoreError> {
        let advanced = sqlx::query(
            "UPDATE tsm_registrations SET last_counter = $3 \
             WHERE device_id = $1 AND registration_id = $2 AND last_counter < $3",
        )
        .bind(device_id)
        .bind(registration_id)
        .bind(counter)
        .execute(self.conn())
        .await?;
        Ok(advanced.rows_affected() == 1)
    }
}

impl Store {
    /// Every registered issuer, oldest first.
    pub async fn tsm_issuers(&self) -> Result<Vec<TsmIssuer>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {ISSUER_COLUMNS} FROM tsm_issuers ORDER BY created_at, id"));
        let rows = sqlx::query(sql).fetch_all(self.pool()).await?;
        rows.iter().map(issuer_from_row).collect()
    }

    /// Those of `serials` that `issuer_id` revoked, in serial order, each once.
    pub async fn tsm_revoked(&self, issuer_id: &str, serials: &[String]) -> Result<Vec<String>, StoreError> {
        let postgres = self.backend == Backend::Postgres;
        let mut revoked = Vec::new();
        for chunk in serials.chunks(ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(postgres);
            let issuer = placeholders.next();
            let list = placeholders.list(chunk.len());
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT serial FROM tsm_revocations WHERE issuer_id = {issuer} AND serial IN ({list})"
            ));
            let mut select = sqlx::query_scalar::<_, String>(sql).bind(issuer_id);
            for serial in chunk {
                select = select.bind(serial);
            }
            revoked.extend(select.fetch_all(self.pool()).await?);
        }
        revoked.sort_unstable();
        revoked.dedup();
        Ok(revoked)
    }

    pub async fn tsm_registration(&self, device_id: &str) -> Result<Option<TsmRegistration>, StoreError> {
        let sql =
            sqlx::AssertSqlSafe(format!("SELECT {REGISTRATION_COLUMNS} FROM tsm_registrations WHERE device_id = $1"));
        let row = sqlx::query(sql).bind(device_id).fetch_optional(self.pool()).await?;
        row.as_ref().map(registration_from_row).transpose()
    }
}

/// A payment application release, as uploaded and signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmManifest {
    pub id: String,
    pub app_id: String,
    /// Released once per application.
    pub version: i64,
    /// SHA-256 of the code, lowercase hex.
    pub code_sha256: String,
    pub code_size: i64,
    pub se_profile: String,
    /// The manifest JWS the server signed.
    pub signed: String,
    pub created_at: i64,
}

const MANIFEST_COLUMNS: &str = "id, app_id, version, code_sha256, code_size, se_profile, signed, created_at";

fn manifest_from_row(row: &AnyRow) -> Result<TsmManifest, StoreError> {
    Ok(TsmManifest {
        id: row.try_get("id")?,
        app_id: row.try_get("app_id")?,
        version: row.try_get("version")?,
        code_sha256: row.try_get("code_sha256")?,
        code_size: row.try_get("code_size")?,
        se_profile: row.try_get("se_profile")?,
        signed: row.try_get("signed")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Tx {
    /// Records a release; false when the application has this version already.
    pub async fn insert_tsm_manifest(&mut self, manifest: &TsmManifest) -> Result<bool, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO tsm_manifests ({MANIFEST_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (app_id, version) DO NOTHING"
        ));
        let inserted = sqlx::query(sql)
            .bind(&manifest.id)
            .bind(&manifest.app_id)
            .bind(manifest.version)
            .bind(&manifest.code_sha256)
            .bind(manifest.code_size)
            .bind(&manifest.se_profile)
            .bind(&manifest.signed)
            .bind(manifest.created_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("TSM manifest", "TSM manifest"))?;
        Ok(inserted.rows_affected() == 1)
    }
}

impl Store {
    /// Every release, by application, then version.
    pub async fn tsm_manifests(&self) -> Result<Vec<TsmManifest>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {MANIFEST_COLUMNS} FROM tsm_manifests ORDER BY app_id, version"));
        let rows = sqlx::query(sql).fetch_all(self.pool()).await?;
        rows.iter().map(manifest_from_row).collect()
    }

    /// The release of `app_id` with the highest version, if any.
    pub async fn latest_tsm_manifest(&self, app_id: &str) -> Result<Option<TsmManifest>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {MANIFEST_COLUMNS} FROM tsm_manifests WHERE app_id = $1 ORDER BY version DESC LIMIT 1"
        ));
        let row = sqlx::query(sql).bind(app_id).fetch_optional(self.pool()).await?;
        row.as_ref().map(manifest_from_row).transpose()
    }
}
