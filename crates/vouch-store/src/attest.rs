//! Attestation records: reference values per model and firmware, single-use
//! challenges, and the results (tickets) with what each device last reported.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Store, StoreError, Tx};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceValues {
    pub model: String,
    pub firmware_version: String,
    /// JSON document: measurements, minimum OS patch level, allowed reader firmware.
    pub document: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeRecord {
    pub id: String,
    pub device_id: String,
    pub nonce: String,
    /// JSON array of the commands asked.
    pub commands: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub consumed_at: Option<i64>,
}

/// Why a challenge could not be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeRejection {
    Unknown,
    Expired,
    AlreadyAnswered,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationRecord {
    /// The challenge this answers.
    pub id: String,
    pub device_id: String,
    pub status: String,
    pub risk: i64,
    /// JSON array of `{code, text}`.
    pub reasons: String,
    pub ticket_id: String,
    pub ticket: String,
    pub evidence_hash: String,
    /// JSON: firmware, measurements and location as reported, for the next appraisal.
    pub observations: String,
    pub issued_at: i64,
    pub expires_at: i64,
    /// The id its audit entry was recorded under ([`crate::Tx::append_audit`]); orders a
    /// device's results.
    pub audit_seq: i64,
}

const RESULT_COLUMNS: &str = "id, device_id, status, risk, reasons, ticket_id, ticket, evidence_hash, observations, \
     issued_at, expires_at, audit_seq";

fn result_from_row(row: &AnyRow) -> Result<AttestationRecord, StoreError> {
    Ok(AttestationRecord {
        id: row.try_get("id")?,
        device_id: row.try_get("device_id")?,
        status: row.try_get("status")?,
        risk: row.try_get("risk")?,
        reasons: row.try_get("reasons")?,
        ticket_id: row.try_get("ticket_id")?,
        ticket: row.try_get("ticket")?,
        evidence_hash: row.try_get("evidence_hash")?,
        observations: row.try_get("observations")?,
        issued_at: row.try_get("issued_at")?,
        expires_at: row.try_get("expires_at")?,
        audit_seq: row.try_get("audit_seq")?,
    })
}

fn challenge_from_row(row: &AnyRow) -> Result<ChallengeRecord, StoreError> {
    Ok(ChallengeRecord {
        id: row.try_get("id")?,
        device_id: row.try_get("device_id")?,
        nonce: row.try_get("nonce")?,
        commands: row.try_get("commands")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        consumed_at: row.try_get("consumed_at")?,
    })
}

fn reference_from_row(row: &AnyRow) -> Result<ReferenceValues, StoreError> {
    Ok(ReferenceValues {
        model: row.try_get("model")?,
        firmware_version: row.try_get("firmware_version")?,
        document: row.try_get("document")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Tx {
    pub async fn put_reference_values(&mut self, values: &ReferenceValues) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO reference_values (model, firmware_version, document, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (model, firmware_version) DO UPDATE SET document = excluded.document, updated_at = excluded.updated_at",
        )
        .bind(&values.model)
        .bind(&values.firmware_version)
        .bind(&values.document)
        .bind(values.updated_at)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    pub async fn insert_challenge(&mut self, challenge: &ChallengeRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO attestation_challenges (id, device_id, nonce, commands, created_at, expires_at, consumed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, NULL)",
        )
        .bind(&challenge.id)
        .bind(&challenge.device_id)
        .bind(&challenge.nonce)
        .bind(&challenge.commands)
        .bind(challenge.created_at)
        .bind(challenge.expires_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("challenge", "device"))?;
        Ok(())
    }

    /// Marks the challenge answered. The conditional update is what makes a challenge
    /// single-use across instances.
    pub async fn consume_challenge(
        &mut self,
        id: &str,
        now: i64,
    ) -> Result<Result<(), ChallengeRejection>, StoreError> {
        let consumed = sqlx::query(
            "UPDATE attestation_challenges SET consumed_at = $1 WHERE id = $2 AND consumed_at IS NULL AND expires_at >= $1",
        )
        .bind(now)
        .bind(id)
        .execute(self.conn())
        .await?;
        if consumed.rows_affected() == 1 {
            return Ok(Ok(()));
        }
        let row = sqlx::query("SELECT consumed_at FROM attestation_challenges WHERE id = $1")
            .bind(id)
            .fetch_optional(self.conn())
            .await?;
        Ok(Err(match row {
            None => ChallengeRejection::Unknown,
            Some(row) if row.try_get::<Option<i64>, _>("consumed_at")?.is_some() => ChallengeRejection::AlreadyAnswered,
            Some(_) => ChallengeRejection::Expired,
        }))
    }

    pub async fn insert_attestation(&mut self, record: &AttestationRecord) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO attestation_results ({RESULT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ));
        sqlx::query(sql)
            .bind(&record.id)
            .bind(&record.device_id)
            .bind(&record.status)
            .bind(record.risk)
            .bind(&record.reasons)
            .bind(&record.ticket_id)
            .bind(&record.ticket)
            .bind(&record.evidence_hash)
            .bind(&record.observations)
            .bind(record.issued_at)
            .bind(record.expires_at)
            .bind(record.audit_seq)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("attestation", "challenge"))?;
        Ok(())
    }
}

impl Tx {
    /// The device's latest result as seen inside this transaction, so a writer can tell
    /// whether another answer landed since it read the history.
    pub async fn latest_attestation_id(&mut self, device_id: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM attestation_results WHERE device_id = $1 ORDER BY audit_seq DESC LIMIT 1",
        )
        .bind(device_id)
        .fetch_optional(self.conn())
        .await?)
    }
}

impl Store {
    pub async fn reference_values(
        &self,
        model: &str,
        firmware_version: &str,
    ) -> Result<Option<ReferenceValues>, StoreError> {
        let row = sqlx::query(
            "SELECT model, firmware_version, document, updated_at FROM reference_values \
             WHERE model = $1 AND firmware_version = $2",
        )
        .bind(model)
        .bind(firmware_version)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(reference_from_row).transpose()
    }

    pub async fn all_reference_values(&self) -> Result<Vec<ReferenceValues>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, firmware_version, document, updated_at FROM reference_values ORDER BY model, firmware_version",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(reference_from_row).collect()
    }

    pub async fn challenge(&self, id: &str) -> Result<ChallengeRecord, StoreError> {
        let row = sqlx::query(
            "SELECT id, device_id, nonce, commands, created_at, expires_at, consumed_at \
             FROM attestation_challenges WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(challenge_from_row).transpose()?.ok_or(StoreError::NotFound { what: "attestation" })
    }

    /// The device's most recent attestations, newest first.
    pub async fn attestations(&self, device_id: &str, limit: u32) -> Result<Vec<AttestationRecord>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RESULT_COLUMNS} FROM attestation_results WHERE device_id = $1 \
             ORDER BY audit_seq DESC LIMIT $2"
        ));
        let rows = sqlx::query(sql).bind(device_id).bind(i64::from(limit)).fetch_all(self.pool()).await?;
        rows.iter().map(result_from_row).collect()
    }
}
