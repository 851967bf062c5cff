//! The trusted service manager: device makers' CAs registered as issuers, with the
//! certificates they revoked; each device's registration under its crypto secure
//! element, with the last message counter accepted under it; the payment application
//! releases; and the outbox of messages relayed to service providers.
//!
//! A message is accepted once: its counter advances the registration's by a
//! conditional update, and it enters the outbox under a unique (registration,
//! counter), both in the request's write with its audit entry. The registration is the
//! device's current one, which the store fills in, so a device provisioned again
//! counts its messages from the start without colliding with what it sent before.
//!
//! Delivery is leased: [`Store::claim_outbox`] hands each due message to one worker at
//! a time, and [`Store::record_deliveries`] applies an outcome only while the worker's
//! lease holds, so instances on one PostgreSQL share the outbox without delivering a
//! message twice at once or overwriting each other's outcomes. Both are short
//! transactions of their own, apart from any request.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::sql::{Placeholders, ROWS_PER_STATEMENT};
use crate::{Backend, DeviceStatus, Store, StoreError, Tx};

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

/// [`REGISTRATION_COLUMNS`] of the registration aliased `r`.
const SENDER_COLUMNS: &str = "r.device_id, r.registration_id, r.issuer_id, r.se_serial, r.se_public_key, \
                              r.sealed_device_key, r.instrument, r.last_counter, r.registered_at";

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

    /// A message's sender in one read: the device's registration, the device's status
    /// now, and whether its secure element's certificate has been revoked since (under
    /// its CA or any registration of the same CA name).
    pub async fn tsm_sender(&self, device_id: &str) -> Result<Option<TsmSender>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {SENDER_COLUMNS}, d.status AS device_status, \
                    CASE WHEN EXISTS (SELECT 1 FROM tsm_revocations v \
                                      JOIN tsm_issuers revoking ON revoking.id = v.issuer_id \
                                      JOIN tsm_issuers own ON own.id = r.issuer_id \
                                      WHERE v.serial = r.se_serial AND revoking.subject = own.subject) \
                         THEN 1 ELSE 0 END AS se_revoked \
             FROM tsm_registrations r JOIN devices d ON d.id = r.device_id WHERE r.device_id = $1"
        ));
        let Some(row) = sqlx::query(sql).bind(device_id).fetch_optional(self.pool()).await? else {
            return Ok(None);
        };
        let status: String = row.try_get("device_status")?;
        let device_status = DeviceStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt { what: "device status", detail: format!("{device_id}: {status:?}") })?;
        let se_revoked = row.try_get::<i64, _>("se_revoked")? != 0;
        Ok(Some(TsmSender { registration: registration_from_row(&row)?, device_status, se_revoked }))
    }
}

/// Who a message comes from, as [`Store::tsm_sender`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmSender {
    pub registration: TsmRegistration,
    pub device_status: DeviceStatus,
    pub se_revoked: bool,
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

/// The most messages [`Store::claim_outbox`] claims, and outcomes
/// [`Store::record_deliveries`] takes, at once.
pub const OUTBOX_BATCH_MAX: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxStatus {
    /// Waiting for a delivery, or being delivered under a lease.
    Pending,
    /// A provider acknowledged it.
    Delivered,
    /// Given up on; an admin may put it back to pending.
    Dead,
}

impl OutboxStatus {
    pub const ALL: [OutboxStatus; 3] = [OutboxStatus::Pending, OutboxStatus::Delivered, OutboxStatus::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Delivered => "delivered",
            OutboxStatus::Dead => "dead",
        }
    }

    /// `None` for anything but `pending`, `delivered` or `dead`.
    pub fn parse(text: &str) -> Option<Self> {
        OutboxStatus::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

/// A device's message on its way to a service provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub id: String,
    pub provider_id: String,
    pub device_id: String,
    pub counter: i64,
    /// SHA-256 of the envelope the device sent.
    pub envelope_hash: Vec<u8>,
    /// The message sealed to the provider's key (HPKE encapsulated key and ciphertext).
    pub enc: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub status: OutboxStatus,
    /// Deliveries begun, counted as each is claimed.
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered {
        at: i64,
    },
    /// Failed; to be tried again from `next_attempt_at`.
    Retry {
        next_attempt_at: i64,
        error: String,
    },
    /// Failed for good.
    Dead {
        error: String,
    },
}

/// Which messages [`Store::outbox_page`] lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxFilter {
    pub status: Option<OutboxStatus>,
    pub provider_id: Option<String>,
}

/// How many messages there are in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounts {
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
}

const OUTBOX_COLUMNS: &str = "id, provider_id, device_id, counter, envelope_hash, enc, ciphertext, status, attempts, \
                              next_attempt_at, last_error, created_at, delivered_at";

fn outbox_from_row(row: &AnyRow) -> Result<OutboxMessage, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(OutboxMessage {
        id: row.try_get("id")?,
        provider_id: row.try_get("provider_id")?,
        device_id: row.try_get("device_id")?,
        counter: row.try_get("counter")?,
        envelope_hash: row.try_get("envelope_hash")?,
        enc: row.try_get("enc")?,
        ciphertext: row.try_get("ciphertext")?,
        status: OutboxStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt { what: "outbox status", detail: status.clone() })?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        delivered_at: row.try_get("delivered_at")?,
    })
}

async fn fetch_outbox_message_at(
    conn: &mut sqlx::AnyConnection,
    device_id: &str,
    counter: i64,
) -> Result<Option<OutboxMessage>, StoreError> {
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {OUTBOX_COLUMNS} FROM tsm_outbox \
         WHERE registration_id = (SELECT registration_id FROM tsm_registrations WHERE device_id = $1) \
         AND counter = $2"
    ));
    let row = sqlx::query(sql).bind(device_id).bind(counter).fetch_optional(conn).await?;
    row.as_ref().map(outbox_from_row).transpose()
}

impl Tx {
    /// Queues `message` under the device's current registration; false when a message
    /// with its counter is queued under that registration already, and
    /// [`StoreError::MissingReference`] when the device has none.
    pub async fn insert_outbox_message(&mut self, message: &OutboxMessage) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO tsm_outbox (id, provider_id, device_id, registration_id, counter, envelope_hash, enc, \
             ciphertext, status, attempts, next_attempt_at, last_error, created_at, delivered_at) \
             SELECT $1, $2, $3, registration_id, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13 \
             FROM tsm_registrations WHERE device_id = $3 \
             ON CONFLICT (registration_id, counter) DO NOTHING",
        )
        .bind(&message.id)
        .bind(&message.provider_id)
        .bind(&message.device_id)
        .bind(message.counter)
        .bind(&message.envelope_hash)
        .bind(&message.enc)
        .bind(&message.ciphertext)
        .bind(message.status.as_str())
        .bind(message.attempts)
        .bind(message.next_attempt_at)
        .bind(&message.last_error)
        .bind(message.created_at)
        .bind(message.delivered_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("outbox message", "service provider or device"))?;
        if inserted.rows_affected() == 1 {
            return Ok(true);
        }
        let registered: Option<i64> = sqlx::query_scalar("SELECT 1 FROM tsm_registrations WHERE device_id = $1")
            .bind(&message.device_id)
            .fetch_optional(self.conn())
            .await?;
        match registered {
            Some(_) => Ok(false),
            None => Err(StoreError::MissingReference { what: "outbox message", missing: "TSM registration" }),
        }
    }

    /// The message with `counter` under the device's current registration, if queued.
    pub async fn outbox_message_at(
        &mut self,
        device_id: &str,
        counter: i64,
    ) -> Result<Option<OutboxMessage>, StoreError> {
        fetch_outbox_message_at(self.conn(), device_id, counter).await
    }

    /// Puts a dead message back to pending, due at `now`, with no attempts made; its
    /// last error stays. False when it is not dead.
    pub async fn retry_outbox(&mut self, id: &str, now: i64) -> Result<bool, StoreError> {
        let retried = sqlx::query(
            "UPDATE tsm_outbox SET status = 'pending', attempts = 0, next_attempt_at = $2 \
             WHERE id = $1 AND status = 'dead'",
        )
        .bind(id)
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(retried.rows_affected() == 1)
    }
}

impl Store {
    /// The message with `counter` under the device's current registration, if queued.
    pub async fn outbox_message_at(&self, device_id: &str, counter: i64) -> Result<Option<OutboxMessage>, StoreError> {
        let mut conn = self.pool().acquire().await?;
        fetch_outbox_message_at(&mut conn, device_id, counter).await
    }

    pub async fn outbox_message(&self, id: &str) -> Result<Option<OutboxMessage>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {OUTBOX_COLUMNS} FROM tsm_outbox WHERE id = $1"));
        let row = sqlx::query(sql).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(outbox_from_row).transpose()
    }

    /// Leases up to `limit` (at most [`OUTBOX_BATCH_MAX`]) pending messages due at
    /// `now` and not leased (or whose lease ended before `now`) to `lease_id` until
    /// `now + lease_secs`, counts an attempt on each, and returns them, earliest due
    /// first. One statement, its own transaction: on PostgreSQL it skips the rows
    /// another claim has locked rather than waiting, so claimers on several instances
    /// never get the same message and never wait on each other; on SQLite the write
    /// lock makes claims take turns.
    pub async fn claim_outbox(
        &self,
        now: i64,
        lease_secs: i64,
        limit: i64,
        lease_id: &str,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let limit = limit.min(OUTBOX_BATCH_MAX as i64);
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let lease_id = lease_id.to_owned();
        let mut claimed = self
            .write_statement(move |tx| {
                Box::pin(async move {
                    let lock = if tx.postgres { " FOR UPDATE SKIP LOCKED" } else { "" };
                    let sql = sqlx::AssertSqlSafe(format!(
                        "UPDATE tsm_outbox SET lease_id = $1, lease_until = $2 + $3, attempts = attempts + 1 \
                         WHERE id IN (SELECT id FROM tsm_outbox WHERE status = 'pending' AND next_attempt_at <= $2 \
                         AND (lease_until IS NULL OR lease_until < $2) ORDER BY next_attempt_at, id LIMIT $4{lock}) \
                         RETURNING {OUTBOX_COLUMNS}"
                    ));
                    let rows = sqlx::query(sql)
                        .bind(&lease_id)
                        .bind(now)
                        .bind(lease_secs)
                        .bind(limit)
                        .fetch_all(tx.conn())
                        .await?;
                    rows.iter().map(outbox_from_row).collect::<Result<Vec<_>, _>>()
                })
            })
            .await?;
        claimed.sort_unstable_by(|a, b| (a.next_attempt_at, &a.id).cmp(&(b.next_attempt_at, &b.id)));
        Ok(claimed)
    }

    /// Applies each outcome to its message while the message is still leased to
    /// `lease_id`, and ends the lease; an outcome whose lease has passed to another
    /// claim is skipped. Of several outcomes for one message the first counts. All in
    /// one transaction, one statement per 250 outcomes; returns how many applied.
    pub async fn record_deliveries(
        &self,
        lease_id: &str,
        outcomes: &[(String, DeliveryOutcome)],
    ) -> Result<usize, StoreError> {
        if outcomes.len() > OUTBOX_BATCH_MAX {
            return Err(StoreError::TooMany { what: "delivery outcomes", max: OUTBOX_BATCH_MAX, got: outcomes.len() });
        }
        let mut outcomes = outcomes.to_vec();
        // Stable, so the first outcome of a message stays first; in id order, the
        // order PostgreSQL locks the rows in.
        outcomes.sort_by(|a, b| a.0.cmp(&b.0));
        outcomes.dedup_by(|later, earlier| later.0 == earlier.0);
        let lease_id = lease_id.to_owned();
        // One statement undoes itself when it fails, and needs no transaction around it.
        let single_statement = outcomes.len() <= ROWS_PER_STATEMENT;
        self.submit(
            move |tx| {
                Box::pin(async move {
                    let mut applied = 0;
                    for chunk in outcomes.chunks(ROWS_PER_STATEMENT) {
                        applied += tx.record_delivery_chunk(&lease_id, chunk).await?;
                    }
                    Ok(applied)
                })
            },
            single_statement,
        )
        .await
    }

    /// One page of messages matching `filter`, newest first by (`created_at`, id),
    /// after the message at `before` (its `created_at` and id) when given.
    pub async fn outbox_page(
        &self,
        filter: &OutboxFilter,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        // Only the conditions given, so each filter is answered from its own index.
        let mut placeholders = Placeholders::new(self.backend == Backend::Postgres);
        let mut conditions = Vec::new();
        if filter.status.is_some() {
            conditions.push(format!("status = {}", placeholders.next()));
        }
        if filter.provider_id.is_some() {
            conditions.push(format!("provider_id = {}", placeholders.next()));
        }
        if before.is_some() {
            conditions.push(format!("(created_at, id) < ({}, {})", placeholders.next(), placeholders.next()));
        }
        let conditions =
            if conditions.is_empty() { String::new() } else { format!(" WHERE {}", conditions.join(" AND ")) };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM tsm_outbox{conditions} ORDER BY created_at DESC, id DESC LIMIT {}",
            placeholders.next()
        ));
        let mut query = sqlx::query(sql);
        if let Some(status) = filter.status {
            query = query.bind(status.as_str());
        }
        if let Some(provider_id) = &filter.provider_id {
            query = query.bind(provider_id.as_str());
        }
        if let Some((created_at, id)) = before {
            query = query.bind(created_at).bind(id);
        }
        let rows = query.bind(limit).fetch_all(self.pool()).await?;
        rows.iter().map(outbox_from_row).collect()
    }

    pub async fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS messages FROM tsm_outbox GROUP BY status")
            .fetch_all(self.pool())
            .await?;
        let mut counts = OutboxCounts::default();
        for row in &rows {
            let status: String = row.try_get("status")?;
            let messages: i64 = row.try_get("messages")?;
            match OutboxStatus::parse(&status) {
                Some(OutboxStatus::Pending) => counts.pending = messages,
                Some(OutboxStatus::Delivered) => counts.delivered = messages,
                Some(OutboxStatus::Dead) => counts.dead = messages,
                None => return Err(StoreError::Corrupt { what: "outbox status", detail: status }),
            }
        }
        Ok(counts)
    }

    /// The earliest time a pending message can be claimed: when it is due, or, while
    /// it is leased, once the lease has ended. `None` when nothing is pending.
    pub async fn earliest_outbox_due(&self) -> Result<Option<i64>, StoreError> {
        let due = sqlx::query_scalar(
            "SELECT MIN(CASE WHEN lease_until >= next_attempt_at THEN lease_until + 1 ELSE next_attempt_at END) \
             FROM tsm_outbox WHERE status = 'pending'",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(due)
    }
}

impl Tx {
    /// Applies one chunk of [`Store::record_deliveries`] in one statement.
    async fn record_delivery_chunk(
        &mut self,
        lease_id: &str,
        outcomes: &[(String, DeliveryOutcome)],
    ) -> Result<usize, StoreError> {
        // Made, and bound, in the order they appear in the statement.
        let mut placeholders = Placeholders::new(self.postgres);
        let rows = placeholders
            .derived_table(outcomes.len(), &["id", "status", "next_attempt_at", "last_error", "delivered_at"]);
        let lease = placeholders.next();
        // Every outcome ends the lease; a delivered message keeps the error of the
        // attempt before it, if any.
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE tsm_outbox SET status = outcome.status, \
             next_attempt_at = COALESCE(outcome.next_attempt_at, tsm_outbox.next_attempt_at), \
             last_error = COALESCE(outcome.last_error, tsm_outbox.last_error), \
             delivered_at = outcome.delivered_at, lease_id = NULL, lease_until = NULL \
             FROM ({rows}) AS outcome WHERE tsm_outbox.id = outcome.id AND tsm_outbox.lease_id = {lease}"
        ));
        let mut update = sqlx::query(sql);
        for (id, outcome) in outcomes {
            let (status, next_attempt_at, error, delivered_at) = match outcome {
                DeliveryOutcome::Delivered { at } => (OutboxStatus::Delivered, None, None, Some(*at)),
                DeliveryOutcome::Retry { next_attempt_at, error } => {
                    (OutboxStatus::Pending, Some(*next_attempt_at), Some(error.as_str()), None)
                }
                DeliveryOutcome::Dead { error } => (OutboxStatus::Dead, None, Some(error.as_str()), None),
            };
            update =
                update.bind(id.as_str()).bind(status.as_str()).bind(next_attempt_at).bind(error).bind(delivered_at);
        }
        update = update.bind(lease_id);
        let applied = update.execute(self.conn()).await?;
        Ok(applied.rows_affected() as usize)
    }
}
