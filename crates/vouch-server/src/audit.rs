//! Audit entries for security decisions and registry or key changes. Each is written
//! in the same transaction as the change it records (see `vouch_store::Tx::append_audit`);
//! a refusal is written with whatever the refusal itself changes (a burnt nonce).

use utoipa::ToSchema;
use vouch_store::{AuditEntry, Store};

use crate::error::ApiResult;

pub fn entry(at: i64, actor: &str, action: &str, subject: &str, detail: serde_json::Value) -> AuditEntry {
    AuditEntry {
        at,
        actor: actor.to_owned(),
        action: action.to_owned(),
        subject: subject.to_owned(),
        detail: detail.to_string(),
    }
}

/// The result of recomputing the audit chain.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct AuditVerification {
    pub rows_checked: i64,
    pub head_seq: i64,
    pub intact: bool,
    /// The first break, in words, naming the row.
    pub first_break: Option<String>,
    /// The sequence number of the first broken row.
    pub first_broken_seq: Option<i64>,
}

pub async fn verify(store: &Store) -> ApiResult<AuditVerification> {
    let report = store.verify_audit().await?;
    let first_broken_seq = report.first_break.as_ref().map(|b| match *b {
        vouch_store::AuditBreak::Edited { seq }
        | vouch_store::AuditBreak::Unlinked { seq }
        | vouch_store::AuditBreak::HeadMismatch { seq } => seq,
        vouch_store::AuditBreak::Missing { from, .. } => from,
        vouch_store::AuditBreak::Truncated { last_seq, .. } => last_seq + 1,
    });
    Ok(AuditVerification {
        rows_checked: report.rows_checked,
        head_seq: report.head_seq,
        intact: report.first_break.is_none(),
        first_break: report.first_break.map(|b| b.to_string()),
        first_broken_seq,
    })
}
