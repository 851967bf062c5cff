//! Token sessions and sub-sessions, the single-use record of DPoP proofs, and the
//! grants that let a POS app open a channel with a card reader.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{DeviceStatus, Store, StoreError, Tx};

/// What a protected request finds when it looks up its token's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSessionState {
    Live,
    /// The session, or the sub-session, has ended.
    Ended,
    /// The device is suspended or revoked.
    DeviceInactive,
    /// No such session (or sub-session of it).
    Unknown,
}

/// A session opened by a token grant, or (with `parent_id`) one of its sub-sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSession {
    pub id: String,
    pub parent_id: Option<String>,
    pub device_id: String,
    /// RFC 7638 thumbprint of the key every token of the session is bound to.
    pub key_thumbprint: String,
    pub ticket_id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub ended_at: Option<i64>,
}

const SESSION_COLUMNS: &str = "id, parent_id, device_id, key_thumbprint, ticket_id, created_at, expires_at, ended_at";

fn session_from_row(row: &AnyRow) -> Result<TokenSession, StoreError> {
    Ok(TokenSession {
        id: row.try_get("id")?,
        parent_id: row.try_get("parent_id")?,
        device_id: row.try_get("device_id")?,
        key_thumbprint: row.try_get("key_thumbprint")?,
        ticket_id: row.try_get("ticket_id")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        ended_at: row.try_get("ended_at")?,
    })
}

impl Tx {
    /// Records a DPoP proof as used. `false` if it was used before, on any instance:
    /// the primary key decides, and `ON CONFLICT DO NOTHING` keeps a PostgreSQL
    /// transaction usable after a replay.
    pub async fn record_dpop_proof(&mut self, replay_key: &[u8], expires_at: i64) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO dpop_proofs (replay_key, expires_at) VALUES ($1, $2) ON CONFLICT (replay_key) DO NOTHING",
        )
        .bind(replay_key)
        .bind(expires_at)
        .execute(self.conn())
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Records a DPoP proof as used, in one statement, only if the token's session (and
    /// sub-session, when given) is open and its device active. `false` when nothing was
    /// recorded: the proof was used before, or the session is not live
    /// ([`Store::token_session_state`] tells which).
    pub async fn record_dpop_proof_if_live(
        &mut self,
        replay_key: &[u8],
        expires_at: i64,
        sid: &str,
        subsession_id: Option<&str>,
    ) -> Result<bool, StoreError> {
        let expected: i64 = if subsession_id.is_some_and(|id| id != sid) { 2 } else { 1 };
        let inserted = sqlx::query(
            "INSERT INTO dpop_proofs (replay_key, expires_at) SELECT $1, $2 \
             WHERE (SELECT COUNT(*) FROM token_sessions s JOIN devices d ON d.id = s.device_id \
                    WHERE s.id IN ($3, $4) AND s.ended_at IS NULL AND d.status = 'active') = $5 \
             ON CONFLICT (replay_key) DO NOTHING",
        )
        .bind(replay_key)
        .bind(expires_at)
        .bind(sid)
        .bind(subsession_id.unwrap_or(sid))
        .bind(expected)
        .execute(self.conn())
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Deletes proofs whose acceptance window closed before `before`; returns how many.
    pub async fn purge_dpop_proofs(&mut self, before: i64) -> Result<u64, StoreError> {
        let deleted =
            sqlx::query("DELETE FROM dpop_proofs WHERE expires_at < $1").bind(before).execute(self.conn()).await?;
        Ok(deleted.rows_affected())
    }

    pub async fn insert_token_session(&mut self, session: &TokenSession) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO token_sessions ({SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ));
        sqlx::query(sql)
            .bind(&session.id)
            .bind(&session.parent_id)
            .bind(&session.device_id)
            .bind(&session.key_thumbprint)
            .bind(&session.ticket_id)
            .bind(session.created_at)
            .bind(session.expires_at)
            .bind(session.ended_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("token session", "device or session"))?;
        Ok(())
    }

    /// Ends a session and every sub-session of it (or one sub-session); returns how
    /// many were still open.
    pub async fn end_token_session(&mut self, id: &str, now: i64) -> Result<u64, StoreError> {
        let ended = sqlx::query(
            "UPDATE token_sessions SET ended_at = $1 WHERE (id = $2 OR parent_id = $2) AND ended_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(self.conn())
        .await?;
        Ok(ended.rows_affected())
    }

    /// Whether `id` is open, read inside this transaction: a sub-session is only
    /// opened under a session that has not ended.
    pub async fn token_session_open(&mut self, id: &str) -> Result<bool, StoreError> {
        let open: Option<i64> = sqlx::query_scalar("SELECT 1 FROM token_sessions WHERE id = $1 AND ended_at IS NULL")
            .bind(id)
            .fetch_optional(self.conn())
            .await?;
        Ok(open.is_some())
    }
}

impl Store {
    /// Whether the session and, when given, its sub-session are open and their device
    /// active. Every protected request asks, so ending a session or suspending a
    /// device stops its tokens at once on every instance.
    pub async fn token_session_state(
        &self,
        sid: &str,
        subsession_id: Option<&str>,
    ) -> Result<TokenSessionState, StoreError> {
        let rows = sqlx::query(
            "SELECT s.ended_at, d.status FROM token_sessions s JOIN devices d ON d.id = s.device_id \
             WHERE s.id IN ($1, $2)",
        )
        .bind(sid)
        .bind(subsession_id.unwrap_or(sid))
        .fetch_all(self.pool())
        .await?;
        let expected = if subsession_id.is_some_and(|id| id != sid) { 2 } else { 1 };
        if rows.len() != expected {
            return Ok(TokenSessionState::Unknown);
        }
        let mut state = TokenSessionState::Live;
        for row in &rows {
            if row.try_get::<Option<i64>, _>("ended_at")?.is_some() {
                return Ok(TokenSessionState::Ended);
            }
            if row.try_get::<String, _>("status")? != DeviceStatus::Active.as_str() {
                state = TokenSessionState::DeviceInactive;
            }
        }
        Ok(state)
    }

    pub async fn token_session(&self, id: &str) -> Result<TokenSession, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {SESSION_COLUMNS} FROM token_sessions WHERE id = $1"));
        let row = sqlx::query(sql).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(session_from_row).transpose()?.ok_or(StoreError::NotFound { what: "session" })
    }
}

/// A grant for a POS app and a card reader to open a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderSession {
    pub id: String,
    pub reader_id: String,
    /// The nonce of the reader hello the grant answers; one grant per nonce.
    pub reader_nonce: String,
    pub pos_device_id: String,
    /// The POS app's token session the grant was asked in.
    pub token_sid: String,
    pub created_at: i64,
    pub expires_at: i64,
}

impl Tx {
    /// Records a grant. [`StoreError::Conflict`] if the reader's nonce was granted
    /// before, on any instance.
    pub async fn insert_reader_session(&mut self, session: &ReaderSession) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO reader_sessions (id, reader_id, reader_nonce, pos_device_id, token_sid, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&session.id)
        .bind(&session.reader_id)
        .bind(&session.reader_nonce)
        .bind(&session.pos_device_id)
        .bind(&session.token_sid)
        .bind(session.created_at)
        .bind(session.expires_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("reader session", "device"))?;
        Ok(())
    }
}
