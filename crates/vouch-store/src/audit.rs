//! The append-only, hash-chained audit log.
//!
//! Row `n` stores `hash_n = SHA-256(domain || seq || at || actor || action || subject
//! || detail || hash_{n-1})`, each field length-prefixed so no two rows encode alike.
//! A one-row head (`audit_head`) holds the latest sequence number and hash; appending
//! updates it first, which serialises appenders across instances and lets a verifier
//! notice rows cut from the end.

use sqlx::Row;
use sqlx::any::AnyRow;
use vouch_proto::crypto::sha256;

use crate::sql::Placeholders;
use crate::{Store, StoreError, Tx};

const HASH_DOMAIN: &[u8] = b"vouch-audit-v1";
const VERIFY_PAGE_ROWS: i64 = 1_000;
const GENESIS_HASH: [u8; 32] = [0; 32];
/// Entries linked per chaining transaction.
pub const CHAIN_BATCH_ROWS: i64 = 500;
/// Rows per INSERT when linking (8 parameters each, well under every back-end's limit).
const CHAIN_INSERT_ROWS: usize = 100;
/// How often a server links what has been recorded.
pub const CHAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// What a caller records; the chain fields are added by [`Tx::append_audit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: i64,
    /// Who decided or asked: `api_key:<id>`, `device:<id>`, `system`.
    pub actor: String,
    /// What happened, dotted: `device.enrolled`, `key.rotated`.
    pub action: String,
    /// What it happened to.
    pub subject: String,
    /// JSON object with the particulars; never secrets.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: i64,
    pub entry: AuditEntry,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// The first place the chain stops holding together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditBreak {
    /// The row's contents no longer match its hash.
    Edited { seq: i64 },
    /// Rows `from..=to` are gone.
    Missing { from: i64, to: i64 },
    /// The row does not link to the row before it: inserted, reordered or rewritten.
    Unlinked { seq: i64 },
    /// The head says the chain is longer than the rows present.
    Truncated { head_seq: i64, last_seq: i64 },
    /// The last row's hash is not the one the head recorded: it was rewritten.
    HeadMismatch { seq: i64 },
}

impl std::fmt::Display for AuditBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditBreak::Edited { seq } => write!(f, "row {seq} was edited: its contents do not match its hash"),
            AuditBreak::Missing { from, to } if from == to => write!(f, "row {from} was deleted"),
            AuditBreak::Missing { from, to } => write!(f, "rows {from} to {to} were deleted"),
            AuditBreak::Unlinked { seq } => write!(
                f,
                "row {seq} does not link to row {prev}: row {prev} was rewritten with a new hash, or row {seq} was inserted",
                prev = seq - 1
            ),
            AuditBreak::HeadMismatch { seq } => {
                write!(f, "row {seq} was rewritten: its hash is not the one the chain head recorded")
            }
            AuditBreak::Truncated { head_seq, last_seq } => {
                write!(f, "rows {} to {head_seq} were deleted from the end", last_seq + 1)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    pub rows_checked: i64,
    pub head_seq: i64,
    pub first_break: Option<AuditBreak>,
}

pub fn chain_hash(seq: i64, entry: &AuditEntry, prev_hash: &[u8]) -> [u8; 32] {
    let mut encoded = Vec::with_capacity(128 + entry.detail.len());
    for field in [
        HASH_DOMAIN,
        &seq.to_be_bytes(),
        &entry.at.to_be_bytes(),
        entry.actor.as_bytes(),
        entry.action.as_bytes(),
        entry.subject.as_bytes(),
        entry.detail.as_bytes(),
        prev_hash,
    ] {
        // Invariant: no field approaches 4 GiB; the request body limit bounds them.
        encoded.extend_from_slice(&(field.len() as u32).to_be_bytes());
        encoded.extend_from_slice(field);
    }
    sha256(&encoded)
}

fn record_from_row(row: &AnyRow) -> Result<AuditRecord, StoreError> {
    Ok(AuditRecord {
        seq: row.try_get("seq")?,
        entry: AuditEntry {
            at: row.try_get("at")?,
            actor: row.try_get("actor")?,
            action: row.try_get("action")?,
            subject: row.try_get("subject")?,
            detail: row.try_get("detail")?,
        },
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

impl Tx {
    /// Records `entry` inside this transaction, so it commits or rolls back with the
    /// change it records. It joins the hash chain when [`Store::chain_audit`] next runs
    /// (the server does so every [`CHAIN_EVERY`], and before any read of the log): the
    /// chain's head is not touched here, so concurrent decisions never wait for each
    /// other's commit to record themselves. Returns the id the entry is recorded
    /// under: unique, and increasing from one transaction of a caller to its next.
    pub async fn append_audit(&mut self, entry: &AuditEntry) -> Result<i64, StoreError> {
        let id = sqlx::query_scalar(
            "INSERT INTO audit_pending (at, actor, action, subject, detail) VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(entry.at)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.subject)
        .bind(&entry.detail)
        .fetch_one(self.conn())
        .await?;
        Ok(id)
    }

    /// Records `entries` as [`Tx::append_audit`] does, in their order, with one
    /// statement per hundred entries.
    pub async fn append_audits(&mut self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        for chunk in entries.chunks(CHAIN_INSERT_ROWS) {
            let values = Placeholders::new(self.postgres).tuples(chunk.len(), 5);
            let sql = sqlx::AssertSqlSafe(format!(
                "INSERT INTO audit_pending (at, actor, action, subject, detail) VALUES {values}"
            ));
            let mut insert = sqlx::query(sql);
            for entry in chunk {
                insert = insert
                    .bind(entry.at)
                    .bind(&entry.actor)
                    .bind(&entry.action)
                    .bind(&entry.subject)
                    .bind(&entry.detail);
            }
            insert.execute(self.conn()).await?;
        }
        Ok(())
    }

    /// Links up to [`CHAIN_BATCH_ROWS`] recorded entries into the chain, in the order
    /// they are found, and moves the head; returns how many. The head is locked for
    /// the transaction, so chainers on several instances take turns and never link one
    /// entry twice.
    pub async fn chain_audit(&mut self) -> Result<usize, StoreError> {
        let lock = if self.postgres { " FOR UPDATE" } else { "" };
        let head = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT seq, hash FROM audit_head WHERE id = 1{lock}")))
            .fetch_one(self.conn())
            .await?;
        let (mut seq, mut prev_hash): (i64, Vec<u8>) = (head.try_get("seq")?, head.try_get("hash")?);
        let pending =
            sqlx::query("SELECT id, at, actor, action, subject, detail FROM audit_pending ORDER BY id LIMIT $1")
                .bind(CHAIN_BATCH_ROWS)
                .fetch_all(self.conn())
                .await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(pending.len());
        let mut links = Vec::with_capacity(pending.len());
        for row in &pending {
            ids.push(row.try_get::<i64, _>("id")?);
            let entry = AuditEntry {
                at: row.try_get("at")?,
                actor: row.try_get("actor")?,
                action: row.try_get("action")?,
                subject: row.try_get("subject")?,
                detail: row.try_get("detail")?,
            };
            seq += 1;
            let hash = chain_hash(seq, &entry, &prev_hash).to_vec();
            links.push(AuditRecord { seq, entry, prev_hash: std::mem::replace(&mut prev_hash, hash.clone()), hash });
        }
        for chunk in links.chunks(CHAIN_INSERT_ROWS) {
            let values = Placeholders::new(self.postgres).tuples(chunk.len(), 8);
            let sql = sqlx::AssertSqlSafe(format!(
                "INSERT INTO audit_log (seq, at, actor, action, subject, detail, prev_hash, hash) VALUES {values}"
            ));
            let mut insert = sqlx::query(sql);
            for link in chunk {
                insert = insert
                    .bind(link.seq)
                    .bind(link.entry.at)
                    .bind(&link.entry.actor)
                    .bind(&link.entry.action)
                    .bind(&link.entry.subject)
                    .bind(&link.entry.detail)
                    .bind(&link.prev_hash)
                    .bind(&link.hash);
            }
            insert.execute(self.conn()).await?;
        }
        for chunk in ids.chunks(CHAIN_INSERT_ROWS * 8) {
            let list = Placeholders::new(self.postgres).list(chunk.len());
            let sql = sqlx::AssertSqlSafe(format!("DELETE FROM audit_pending WHERE id IN ({list})"));
            let mut delete = sqlx::query(sql);
            for id in chunk {
                delete = delete.bind(*id);
            }
            delete.execute(self.conn()).await?;
        }
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(seq)
            .bind(prev_hash.as_slice())
            .execute(self.conn())
            .await?;
        Ok(links.len())
    }
}

impl Store {
    /// Links every entry recorded so far into the chain, batch by batch; returns how
    /// many.
    pub async fn chain_audit(&self) -> Result<usize, StoreError> {
        let mut chained = 0;
        loop {
            let batch = self.write(|tx| Box::pin(async move { tx.chain_audit().await })).await?;
            chained += batch;
            if batch < CHAIN_BATCH_ROWS as usize {
                return Ok(chained);
            }
        }
    }

    /// Chained entries after `after_seq`, in order. Entries recorded but not yet
    /// chained are chained first, so every committed entry is among them.
    pub async fn audit_records(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        self.chain_audit().await?;
        self.chained_records(after_seq, limit).await
    }

    async fn chained_records(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, subject, detail, prev_hash, hash FROM audit_log \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(record_from_row).collect()
    }

    /// Recomputes the whole chain, page by page, and reports the first break.
    pub async fn verify_audit(&self) -> Result<AuditReport, StoreError> {
        self.chain_audit().await?;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1").fetch_one(self.pool()).await?;
        let head_seq: i64 = head.try_get("seq")?;
        let head_hash: Vec<u8> = head.try_get("hash")?;
        let mut expected_seq = 1;
        let mut prev_hash = GENESIS_HASH.to_vec();
        let mut rows_checked = 0;
        loop {
            let page = self.chained_records(expected_seq - 1, VERIFY_PAGE_ROWS).await?;
            if page.is_empty() {
                break;
            }
            for record in page {
                if record.seq != expected_seq {
                    let first_break = Some(AuditBreak::Missing { from: expected_seq, to: record.seq - 1 });
                    return Ok(AuditReport { rows_checked, head_seq, first_break });
                }
                let recomputed = chain_hash(record.seq, &record.entry, &record.prev_hash);
                let first_break = if recomputed.as_slice() != record.hash {
                    Some(AuditBreak::Edited { seq: record.seq })
                } else if record.prev_hash != prev_hash {
                    Some(AuditBreak::Unlinked { seq: record.seq })
                } else {
                    None
                };
                if first_break.is_some() {
                    return Ok(AuditReport { rows_checked, head_seq, first_break });
                }
                rows_checked += 1;
                expected_seq += 1;
                prev_hash = record.hash;
            }
        }
        let last_seq = expected_seq - 1;
        let first_break = if last_seq < head_seq {
            Some(AuditBreak::Truncated { head_seq, last_seq })
        } else if prev_hash != head_hash {
            Some(AuditBreak::HeadMismatch { seq: last_seq })
        } else {
            None
        };
        Ok(AuditReport { rows_checked, head_seq, first_break })
    }
}
