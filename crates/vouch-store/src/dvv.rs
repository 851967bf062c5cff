//! Consumers, their phones and payment accounts; terminals; issued device
//! verification values and the authorizations that use them.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::registry::{MERCHANT_COLUMNS, merchant_from_row};
use crate::{AuditEntry, Merchant, Store, StoreError, Tx};

/// A point-of-sale terminal of a merchant, and the API key it authenticates with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminal {
    pub id: String,
    pub merchant_id: String,
    /// ISO 8583 DE 41, 8 characters, unique within its merchant.
    pub iso_terminal_id: String,
    pub api_key_id: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

/// A consumer's payment account. Only a keyed hash of its reference is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentAccount {
    pub id: String,
    pub consumer_id: String,
    pub ref_hash: Vec<u8>,
    pub ref_last4: String,
    /// Wrong values presented since the last approval or issue.
    pub wrong_dvv_tries: i64,
    pub locked_at: Option<i64>,
    pub created_at: i64,
}

/// An issued value, by keyed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DvvRecord {
    pub id: String,
    pub payment_account_id: String,
    pub device_id: String,
    pub ticket_id: String,
    pub value_hash: Vec<u8>,
    pub assurance: i64,
    /// When set, the value only authorizes at merchants of this category.
    pub merchant_category: Option<String>,
    pub amount_limit_minor: i64,
    pub max_uses: i64,
    pub uses: i64,
    pub issued_at: i64,
    pub expires_at: i64,
    /// Set when a later issue to the same phone and account replaced it.
    pub superseded_at: Option<i64>,
}

/// Why an issue was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueRefusal {
    /// The phone has asked for `limit` values within the velocity window already.
    TooManyRequests { limit: i64 },
}

/// One authorization decision, as answered to the terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationRecord {
    pub id: String,
    pub terminal_id: String,
    /// ISO 8583 DE 11.
    pub stan: String,
    /// ISO 8583 DE 7, `MMDDhhmmss`.
    pub transmission_time: String,
    /// SHA-256 of the request's fields, so a different request reusing a retry key is
    /// told apart from a retry.
    pub request_hash: Vec<u8>,
    pub payment_account_id: Option<String>,
    pub dvv_id: Option<String>,
    pub amount_minor: i64,
    /// ISO 4217 numeric code.
    pub currency: String,
    /// ISO 8583 DE 22.
    pub entry_mode: String,
    /// ISO 8583 DE 39.
    pub response_code: String,
    pub reason: String,
    /// ISO 8583 DE 38, on approvals.
    pub authorization_code: Option<String>,
    /// ISO 8583 DE 37.
    pub retrieval_reference: String,
    /// `http` or `iso8583`.
    pub channel: String,
    pub created_at: i64,
}

const TERMINAL_COLUMNS: &str = "t.id, t.merchant_id, t.iso_terminal_id, t.api_key_id, t.created_at";
const ACCOUNT_COLUMNS: &str = "id, consumer_id, ref_hash, ref_last4, wrong_dvv_tries, locked_at, created_at";
const DVV_COLUMNS: &str = "id, payment_account_id, device_id, ticket_id, value_hash, assurance, merchant_category, \
                           amount_limit_minor, max_uses, uses, issued_at, expires_at, superseded_at";
const AUTHORIZATION_COLUMNS: &str = "id, terminal_id, stan, transmission_time, request_hash, payment_account_id, \
     dvv_id, amount_minor, currency, entry_mode, response_code, reason, authorization_code, retrieval_reference, \
     channel, created_at";
/// How many of an account's recent values an authorization compares against.
pub const ACCOUNT_DVVS_MAX: i64 = 32;

fn terminal_with_merchant(row: &AnyRow) -> Result<(Terminal, Merchant), StoreError> {
    let terminal = Terminal {
        id: row.try_get("tid")?,
        merchant_id: row.try_get("merchant_id")?,
        iso_terminal_id: row.try_get("iso_terminal_id")?,
        api_key_id: row.try_get("api_key_id")?,
        created_at: row.try_get("tcreated")?,
    };
    Ok((terminal, merchant_from_row(row)?))
}

fn account_from_row(row: &AnyRow) -> Result<PaymentAccount, StoreError> {
    Ok(PaymentAccount {
        id: row.try_get("id")?,
        consumer_id: row.try_get("consumer_id")?,
        ref_hash: row.try_get("ref_hash")?,
        ref_last4: row.try_get("ref_last4")?,
        wrong_dvv_tries: row.try_get("wrong_dvv_tries")?,
        locked_at: row.try_get("locked_at")?,
        created_at: row.try_get("created_at")?,
    })
}

fn dvv_from_row(row: &AnyRow) -> Result<DvvRecord, StoreError> {
    dvv_from_prefixed_row(row, "")
}

/// A value from columns named `<prefix><column>`.
fn dvv_from_prefixed_row(row: &AnyRow, prefix: &str) -> Result<DvvRecord, StoreError> {
    let column = |name: &str| format!("{prefix}{name}");
    Ok(DvvRecord {
        id: row.try_get(column("id").as_str())?,
        payment_account_id: row.try_get(column("payment_account_id").as_str())?,
        device_id: row.try_get(column("device_id").as_str())?,
        ticket_id: row.try_get(column("ticket_id").as_str())?,
        value_hash: row.try_get(column("value_hash").as_str())?,
        assurance: row.try_get(column("assurance").as_str())?,
        merchant_category: row.try_get(column("merchant_category").as_str())?,
        amount_limit_minor: row.try_get(column("amount_limit_minor").as_str())?,
        max_uses: row.try_get(column("max_uses").as_str())?,
        uses: row.try_get(column("uses").as_str())?,
        issued_at: row.try_get(column("issued_at").as_str())?,
        expires_at: row.try_get(column("expires_at").as_str())?,
        superseded_at: row.try_get(column("superseded_at").as_str())?,
    })
}

fn authorization_from_row(row: &AnyRow) -> Result<AuthorizationRecord, StoreError> {
    Ok(AuthorizationRecord {
        id: row.try_get("id")?,
        terminal_id: row.try_get("terminal_id")?,
        stan: row.try_get("stan")?,
        transmission_time: row.try_get("transmission_time")?,
        request_hash: row.try_get("request_hash")?,
        payment_account_id: row.try_get("payment_account_id")?,
        dvv_id: row.try_get("dvv_id")?,
        amount_minor: row.try_get("amount_minor")?,
        currency: row.try_get("currency")?,
        entry_mode: row.try_get("entry_mode")?,
        response_code: row.try_get("response_code")?,
        reason: row.try_get("reason")?,
        authorization_code: row.try_get("authorization_code")?,
        retrieval_reference: row.try_get("retrieval_reference")?,
        channel: row.try_get("channel")?,
        created_at: row.try_get("created_at")?,
    })
}

fn terminal_query(condition: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(format!(
        "SELECT t.id AS tid, t.merchant_id, t.iso_terminal_id, t.api_key_id, t.created_at AS tcreated, \
         m.{} FROM terminals t JOIN merchants m ON m.id = t.merchant_id WHERE {condition}",
        MERCHANT_COLUMNS.replace(", ", ", m.")
    ))
}

impl Tx {
    pub async fn insert_terminal(&mut self, terminal: &Terminal) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO terminals ({}) VALUES ($1, $2, $3, $4, $5)",
            TERMINAL_COLUMNS.replace("t.", "")
        ));
        sqlx::query(sql)
            .bind(&terminal.id)
            .bind(&terminal.merchant_id)
            .bind(&terminal.iso_terminal_id)
            .bind(&terminal.api_key_id)
            .bind(terminal.created_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("terminal", "merchant or API key"))?;
        Ok(())
    }

    pub async fn insert_consumer(&mut self, consumer: &Consumer) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO consumers (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&consumer.id)
            .bind(&consumer.name)
            .bind(consumer.created_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("consumer", "consumer"))?;
        Ok(())
    }

    /// Makes a phone one consumer's. [`StoreError::Conflict`] if it belongs to one already.
    pub async fn link_consumer_device(
        &mut self,
        device_id: &str,
        consumer_id: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO consumer_devices (device_id, consumer_id, created_at) VALUES ($1, $2, $3)")
            .bind(device_id)
            .bind(consumer_id)
            .bind(now)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("consumer device", "device or consumer"))?;
        Ok(())
    }

    /// [`StoreError::Conflict`] if the reference is registered already.
    pub async fn insert_payment_account(&mut self, account: &PaymentAccount) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO payment_accounts ({ACCOUNT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ));
        sqlx::query(sql)
            .bind(&account.id)
            .bind(&account.consumer_id)
            .bind(&account.ref_hash)
            .bind(&account.ref_last4)
            .bind(account.wrong_dvv_tries)
            .bind(account.locked_at)
            .bind(account.created_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("payment account", "consumer"))?;
        Ok(())
    }

    /// Records an issued value: refuses when the phone has had `velocity_max` values
    /// since `velocity_since`; otherwise supersedes the phone's live values for the
    /// account and clears the account's wrong tries and lock, since the phone has just
    /// passed validation again.
    pub async fn issue_dvv(
        &mut self,
        dvv: &DvvRecord,
        velocity_since: i64,
        velocity_max: i64,
    ) -> Result<Result<(), IssueRefusal>, StoreError> {
        let recent: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dvvs WHERE device_id = $1 AND issued_at > $2")
            .bind(&dvv.device_id)
            .bind(velocity_since)
            .fetch_one(self.conn())
            .await?;
        if recent >= velocity_max {
            return Ok(Err(IssueRefusal::TooManyRequests { limit: velocity_max }));
        }
        sqlx::query(
            "UPDATE dvvs SET superseded_at = $1 WHERE payment_account_id = $2 AND device_id = $3 \
             AND superseded_at IS NULL AND expires_at > $1 AND uses < max_uses",
        )
        .bind(dvv.issued_at)
        .bind(&dvv.payment_account_id)
        .bind(&dvv.device_id)
        .execute(self.conn())
        .await?;
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO dvvs ({DVV_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ));
        sqlx::query(sql)
            .bind(&dvv.id)
            .bind(&dvv.payment_account_id)
            .bind(&dvv.device_id)
            .bind(&dvv.ticket_id)
            .bind(&dvv.value_hash)
            .bind(dvv.assurance)
            .bind(&dvv.merchant_category)
            .bind(dvv.amount_limit_minor)
            .bind(dvv.max_uses)
            .bind(dvv.uses)
            .bind(dvv.issued_at)
            .bind(dvv.expires_at)
            .bind(dvv.superseded_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("DVV", "payment account or device"))?;
        sqlx::query(
            "UPDATE payment_accounts SET wrong_dvv_tries = 0, locked_at = NULL \
             WHERE id = $1 AND (wrong_dvv_tries > 0 OR locked_at IS NOT NULL)",
        )
        .bind(&dvv.payment_account_id)
        .execute(self.conn())
        .await?;
        Ok(Ok(()))
    }

    /// Takes one use of a value in one conditional statement: `false` when it has none
    /// left, has expired or was superseded — decided by the database, so concurrent
    /// requests on any number of instances never take more uses than there are.
    pub async fn take_dvv_use(&mut self, dvv_id: &str, now: i64) -> Result<bool, StoreError> {
        let taken = sqlx::query(
            "UPDATE dvvs SET uses = uses + 1 WHERE id = $1 AND uses < max_uses AND expires_at > $2 \
             AND superseded_at IS NULL",
        )
        .bind(dvv_id)
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    /// An approval's whole write: takes one use of `dvv_id` and records `approved`, or,
    /// when the value has no use left (another request took the last one), the same
    /// authorization declined with `used_up` (code, reason) and no authorization code;
    /// and `audit`, whose detail is `declined_detail` for a decline. Returns whether the
    /// use was taken.
    ///
    /// One call to the database, to be run with [`Store::write_statement`]: on SQLite a
    /// list of statements under a savepoint of their own (each call to the connection's
    /// thread costs more than the statements; the write lock makes the check and the
    /// use one step), on PostgreSQL one statement that commits by itself.
    pub async fn record_approval(
        &mut self,
        dvv_id: &str,
        now: i64,
        approved: &AuthorizationRecord,
        used_up: (&str, &str),
        audit: &AuditEntry,
        declined_detail: &str,
    ) -> Result<bool, StoreError> {
        let sql = if self.postgres {
            // One statement: PostgreSQL runs no statement lists with parameters, and one
            // statement commits by itself. The update's row lock decides between
            // concurrent approvals; every part sees the others' results, not the table.
            sqlx::AssertSqlSafe(format!(
                "WITH used AS ( \
                   UPDATE dvvs SET uses = uses + 1 \
                   WHERE id = $19 AND uses < max_uses AND expires_at > $20 AND superseded_at IS NULL \
                   RETURNING id), \
                 decided AS ( \
                   INSERT INTO authorizations ({AUTHORIZATION_COLUMNS}) \
                   SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
                          CASE WHEN flag.ok THEN $11 ELSE $17 END, CASE WHEN flag.ok THEN $12 ELSE $18 END, \
                          CASE WHEN flag.ok THEN $13 END, $14, $15, $16 \
                   FROM (SELECT EXISTS (SELECT 1 FROM used) AS ok) AS flag \
                   RETURNING response_code), \
                 audited AS ( \
                   INSERT INTO audit_pending (at, actor, action, subject, detail) \
                   SELECT $21, $22, $23, $24, CASE WHEN response_code = $11 THEN $25 ELSE $26 END FROM decided) \
                 SELECT response_code FROM decided"
            ))
        } else {
            sqlx::AssertSqlSafe(format!(
                "SAVEPOINT approval; \
             INSERT INTO authorizations ({AUTHORIZATION_COLUMNS}) \
               SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
                      CASE WHEN flag.ok THEN $11 ELSE $17 END, CASE WHEN flag.ok THEN $12 ELSE $18 END, \
                      CASE WHEN flag.ok THEN $13 END, $14, $15, $16 \
               FROM (SELECT EXISTS (SELECT 1 FROM dvvs WHERE id = $19 AND uses < max_uses \
                     AND expires_at > $20 AND superseded_at IS NULL) AS ok) AS flag; \
             UPDATE dvvs SET uses = uses + 1 \
               WHERE id = $19 AND EXISTS (SELECT 1 FROM authorizations WHERE id = $1 AND response_code = $11); \
             INSERT INTO audit_pending (at, actor, action, subject, detail) \
               SELECT $21, $22, $23, $24, CASE WHEN response_code = $11 THEN $25 ELSE $26 END \
               FROM authorizations WHERE id = $1; \
             RELEASE approval; \
             SELECT response_code FROM authorizations WHERE id = $1"
            ))
        };
        let outcome = sqlx::query_scalar::<_, String>(sql)
            .bind(&approved.id)
            .bind(&approved.terminal_id)
            .bind(&approved.stan)
            .bind(&approved.transmission_time)
            .bind(&approved.request_hash)
            .bind(&approved.payment_account_id)
            .bind(&approved.dvv_id)
            .bind(approved.amount_minor)
            .bind(&approved.currency)
            .bind(&approved.entry_mode)
            .bind(&approved.response_code)
            .bind(&approved.reason)
            .bind(&approved.authorization_code)
            .bind(&approved.retrieval_reference)
            .bind(&approved.channel)
            .bind(approved.created_at)
            .bind(used_up.0)
            .bind(used_up.1)
            .bind(dvv_id)
            .bind(now)
            .bind(audit.at)
            .bind(&audit.actor)
            .bind(&audit.action)
            .bind(&audit.subject)
            .bind(&audit.detail)
            .bind(declined_detail)
            .fetch_all(self.conn())
            .await;
        match outcome {
            // The rows of the final SELECT: every statement before it ran.
            Ok(codes) => Ok(codes.last().map(String::as_str) == Some(approved.response_code.as_str())),
            Err(e) => {
                if !self.postgres {
                    // Nothing of the approval may stay in the batch's transaction.
                    sqlx::raw_sql("ROLLBACK TO approval; RELEASE approval").execute(self.conn()).await?;
                }
                Err(StoreError::on_insert("authorization", "terminal")(e))
            }
        }
    }

    /// Counts a wrong value against the account and locks it at `tries_max`; returns
    /// whether the account is locked now.
    pub async fn count_wrong_dvv(&mut self, account_id: &str, tries_max: i64, now: i64) -> Result<bool, StoreError> {
        let locked: Option<i64> = sqlx::query_scalar(
            "UPDATE payment_accounts SET wrong_dvv_tries = wrong_dvv_tries + 1, \
             locked_at = CASE WHEN locked_at IS NULL AND wrong_dvv_tries + 1 >= $2 THEN $3 ELSE locked_at END \
             WHERE id = $1 RETURNING locked_at",
        )
        .bind(account_id)
        .bind(tries_max)
        .bind(now)
        .fetch_optional(self.conn())
        .await?
        .ok_or(StoreError::NotFound { what: "payment account" })?;
        Ok(locked.is_some())
    }

    /// Clears the wrong tries after a right value.
    pub async fn clear_wrong_dvvs(&mut self, account_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE payment_accounts SET wrong_dvv_tries = 0 WHERE id = $1 AND wrong_dvv_tries > 0")
            .bind(account_id)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    /// [`StoreError::Conflict`] if another request with the same retry key was decided
    /// first (on any instance); the caller answers with that one.
    pub async fn insert_authorization(&mut self, record: &AuthorizationRecord) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO authorizations ({AUTHORIZATION_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        ));
        sqlx::query(sql)
            .bind(&record.id)
            .bind(&record.terminal_id)
            .bind(&record.stan)
            .bind(&record.transmission_time)
            .bind(&record.request_hash)
            .bind(&record.payment_account_id)
            .bind(&record.dvv_id)
            .bind(record.amount_minor)
            .bind(&record.currency)
            .bind(&record.entry_mode)
            .bind(&record.response_code)
            .bind(&record.reason)
            .bind(&record.authorization_code)
            .bind(&record.retrieval_reference)
            .bind(&record.channel)
            .bind(record.created_at)
            .execute(self.conn())
            .await
            .map_err(StoreError::on_insert("authorization", "terminal"))?;
        Ok(())
    }
}

impl Store {
    /// The terminal an API key belongs to, with its merchant.
    pub async fn terminal_by_api_key(&self, api_key_id: &str) -> Result<Option<(Terminal, Merchant)>, StoreError> {
        let row = sqlx::query(terminal_query("t.api_key_id = $1")).bind(api_key_id).fetch_optional(self.pool()).await?;
        row.as_ref().map(terminal_with_merchant).transpose()
    }

    /// The terminal an ISO 8583 message names by DE 42 and DE 41.
    pub async fn terminal_by_iso_ids(
        &self,
        card_acceptor_id: &str,
        iso_terminal_id: &str,
    ) -> Result<Option<(Terminal, Merchant)>, StoreError> {
        let row = sqlx::query(terminal_query("m.card_acceptor_id = $1 AND t.iso_terminal_id = $2"))
            .bind(card_acceptor_id)
            .bind(iso_terminal_id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(terminal_with_merchant).transpose()
    }

    pub async fn terminal(&self, id: &str) -> Result<(Terminal, Merchant), StoreError> {
        let row = sqlx::query(terminal_query("t.id = $1")).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(terminal_with_merchant).transpose()?.ok_or(StoreError::NotFound { what: "terminal" })
    }

    pub async fn consumer(&self, id: &str) -> Result<Consumer, StoreError> {
        let row = sqlx::query("SELECT id, name, created_at FROM consumers WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        let row = row.ok_or(StoreError::NotFound { what: "consumer" })?;
        Ok(Consumer { id: row.try_get("id")?, name: row.try_get("name")?, created_at: row.try_get("created_at")? })
    }

    /// The consumer a phone belongs to, if any.
    pub async fn consumer_of_device(&self, device_id: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT consumer_id FROM consumer_devices WHERE device_id = $1")
            .bind(device_id)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn payment_account_by_ref_hash(&self, ref_hash: &[u8]) -> Result<Option<PaymentAccount>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {ACCOUNT_COLUMNS} FROM payment_accounts WHERE ref_hash = $1"));
        let row = sqlx::query(sql).bind(ref_hash).fetch_optional(self.pool()).await?;
        row.as_ref().map(account_from_row).transpose()
    }

    pub async fn payment_accounts_of(&self, consumer_id: &str) -> Result<Vec<PaymentAccount>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM payment_accounts WHERE consumer_id = $1 ORDER BY id"
        ));
        let rows = sqlx::query(sql).bind(consumer_id).fetch_all(self.pool()).await?;
        rows.iter().map(account_from_row).collect()
    }

    /// The account with this reference hash and its most recent values (up to
    /// [`ACCOUNT_DVVS_MAX`]) issued after `since`, newest first, each with whether its
    /// phone is still active: used-up, expired and superseded values included, so a
    /// refusal can say why. One query, as every authorization asks it.
    pub async fn account_with_dvvs(
        &self,
        ref_hash: &[u8],
        since: i64,
    ) -> Result<Option<(PaymentAccount, Vec<(DvvRecord, bool)>)>, StoreError> {
        let account_columns = ACCOUNT_COLUMNS.split(", ").map(|c| format!("a.{c}")).collect::<Vec<_>>().join(", ");
        let dvv_columns =
            DVV_COLUMNS.split(", ").map(|c| format!("v.{c} AS v_{}", c.trim())).collect::<Vec<_>>().join(", ");
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {account_columns}, {dvv_columns}, d.status AS device_status FROM payment_accounts a \
             LEFT JOIN dvvs v ON v.payment_account_id = a.id AND v.issued_at > $2 \
             LEFT JOIN devices d ON d.id = v.device_id \
             WHERE a.ref_hash = $1 ORDER BY v.issued_at DESC, v.id DESC LIMIT $3"
        ));
        let rows = sqlx::query(sql).bind(ref_hash).bind(since).bind(ACCOUNT_DVVS_MAX).fetch_all(self.pool()).await?;
        let Some(first) = rows.first() else { return Ok(None) };
        let account = account_from_row(first)?;
        let mut dvvs = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<String>, _>("v_id")?.is_none() {
                continue;
            }
            let active = row.try_get::<Option<String>, _>("device_status")?.as_deref() == Some("active");
            dvvs.push((dvv_from_prefixed_row(row, "v_")?, active));
        }
        Ok(Some((account, dvvs)))
    }

    /// The account of a live value with this hash, other than `account_id`: a value
    /// presented for the wrong account.
    pub async fn live_dvv_elsewhere(
        &self,
        value_hash: &[u8],
        account_id: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT payment_account_id FROM dvvs WHERE value_hash = $1 AND expires_at > $2 \
             AND uses < max_uses AND superseded_at IS NULL AND payment_account_id <> $3 LIMIT 1",
        )
        .bind(value_hash)
        .bind(now)
        .bind(account_id)
        .fetch_optional(self.pool())
        .await?)
    }

    pub async fn dvv(&self, id: &str) -> Result<DvvRecord, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {DVV_COLUMNS} FROM dvvs WHERE id = $1"));
        let row = sqlx::query(sql).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(dvv_from_row).transpose()?.ok_or(StoreError::NotFound { what: "DVV" })
    }

    pub async fn authorization(&self, id: &str) -> Result<AuthorizationRecord, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {AUTHORIZATION_COLUMNS} FROM authorizations WHERE id = $1"));
        let row = sqlx::query(sql).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(authorization_from_row).transpose()?.ok_or(StoreError::NotFound { what: "authorization" })
    }

    /// The answer first given to a retry key.
    pub async fn authorization_by_key(
        &self,
        terminal_id: &str,
        stan: &str,
        transmission_time: &str,
    ) -> Result<Option<AuthorizationRecord>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {AUTHORIZATION_COLUMNS} FROM authorizations \
             WHERE terminal_id = $1 AND stan = $2 AND transmission_time = $3"
        ));
        let row =
            sqlx::query(sql).bind(terminal_id).bind(stan).bind(transmission_time).fetch_optional(self.pool()).await?;
        row.as_ref().map(authorization_from_row).transpose()
    }
}
