//! Vouch's storage: one repository API over two back-ends, SQLite (the embedded
//! default) and PostgreSQL (shared by many server instances).
//!
//! Every query is written once, in SQL both back-ends accept, and runs through sqlx's
//! `Any` driver; only the DDL in `migrations/` differs per back-end, and the
//! placeholders of statements over many rows (`sql.rs`). Single-use and
//! uniqueness rules are constraints and conditional updates, never process memory, so
//! they hold across server instances.
//!
//! Writes go through a [`Tx`]: a capability consumes its nonce, writes its records and
//! appends its audit entry in one transaction, so a decision is never half-written.

mod attest;
mod audit;
mod dvv;
mod error;
mod group_commit;
mod ledger;
mod migrate;
mod offline;
mod registry;
mod secrets;
mod sql;
mod token;
mod tsm;

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor};
use tokio::sync::mpsc;

pub use attest::{AttestationRecord, ChallengeRecord, ChallengeRejection, ReferenceValues};
pub use audit::{AuditBreak, AuditEntry, AuditRecord, AuditReport, CHAIN_BATCH_ROWS, CHAIN_EVERY, chain_hash};
pub use dvv::{ACCOUNT_DVVS_MAX, AuthorizationRecord, Consumer, DvvRecord, IssueRefusal, PaymentAccount, Terminal};
pub use error::StoreError;
pub use group_commit::{BATCH_JOBS_MAX, BoxFuture, QUEUE_JOBS_MAX};
pub use ledger::{
    Account, AccountKind, TRANSFER_AMOUNT_MAX_MINOR, TRANSFER_BATCH_MAX, Transfer, TransferOutcome, TransferRefusal,
    issuer_account_id,
};
pub use offline::{
    COUNTER_RANGE, CloseRefusal, ClosedCredential, OfflineCredentialRecord, OfflinePaymentRecord, SpendRefusal,
};
pub use registry::{Device, DeviceFilter, DeviceStatus, Merchant, ServiceProvider};
pub use secrets::{ApiKeyRecord, NonceRejection, SigningKeyRecord};
pub use token::{ReaderSession, TokenSession, TokenSessionState};
pub use tsm::{
    DeliveryOutcome, OUTBOX_BATCH_MAX, OutboxCounts, OutboxFilter, OutboxMessage, OutboxStatus, TsmIssuer, TsmManifest,
    TsmRegistration, TsmSender,
};

/// Limits of the connection pool.
pub const SQLITE_CONNECTIONS_MAX: u32 = 8;
pub const POSTGRES_CONNECTIONS_DEFAULT: u32 = 16;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl { scheme: url.split(':').next().unwrap_or_default().to_owned() })
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { max_connections: POSTGRES_CONNECTIONS_DEFAULT }
    }
}

/// The handle the server holds: a pool plus the knowledge of which back-end it is.
#[derive(Debug, Clone)]
pub struct Store {
    /// Reads; on PostgreSQL also writes.
    pool: AnyPool,
    /// Write transactions (one connection on SQLite).
    writer: AnyPool,
    /// The group-commit queue (SQLite only; PostgreSQL groups concurrent commits itself).
    jobs: Option<mpsc::Sender<group_commit::Job>>,
    backend: Backend,
}

impl Store {
    /// Connects and applies pending migrations.
    pub async fn open(url: &str, options: StoreOptions) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let connect: AnyConnectOptions = url.parse()?;
        let (pool, writer) = match backend {
            Backend::Sqlite => {
                let readers = sqlite_pool(options.max_connections.min(SQLITE_CONNECTIONS_MAX))
                    .connect_with(connect.clone())
                    .await?;
                // SQLite has one writer at a time. Queueing writers on one connection in
                // this process is fair and wakes each in turn; letting them contend for
                // the file lock makes them sleep in SQLite's busy handler instead.
                let writer = sqlite_pool(1).connect_with(connect).await?;
                (readers, writer)
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(connect)
                    .await?;
                (pool.clone(), pool)
            }
        };
        let mut store = Store { pool, writer, jobs: None, backend };
        migrate::run(&store).await?;
        if backend == Backend::Sqlite {
            let (queue, jobs) = mpsc::channel(QUEUE_JOBS_MAX);
            // The writer holds a handle without the queue, so it stops once every
            // other handle is gone.
            tokio::spawn(group_commit::run_writer(store.clone(), jobs));
            store.jobs = Some(queue);
        }
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A write transaction. On SQLite it takes the write lock at once (`BEGIN
    /// IMMEDIATE`), so a transaction that reads before it writes cannot fail halfway
    /// on a lock upgrade.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let inner = match self.backend {
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.writer.begin().await?,
        };
        Ok(Tx { inner: TxInner::Transaction(inner), postgres: self.backend == Backend::Postgres })
    }

    /// Runs `work` in a transaction and returns its value once that transaction has
    /// committed. On SQLite, concurrent calls share one transaction and one fsync
    /// (group commit), each isolated in a savepoint: `work` failing undoes only its
    /// own writes. Use this for every write on a request path.
    pub async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<T, StoreError>> + Send + 'static,
    {
        self.submit(work, false).await
    }

    /// [`Store::write`] for work that undoes itself when it fails: exactly one SQL
    /// statement (a statement that fails undoes itself), or statements that keep a
    /// savepoint of their own ([`Tx::record_approval`]). On SQLite the job then skips
    /// the writer's savepoint. Any other work must use [`Store::write`].
    pub async fn write_statement<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<T, StoreError>> + Send + 'static,
    {
        self.submit(work, true).await
    }

    async fn submit<T, F>(&self, work: F, single_statement: bool) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<T, StoreError>> + Send + 'static,
    {
        let Some(queue) = &self.jobs else {
            // Work that undoes itself when it fails needs no transaction around it:
            // without one, it costs a single round trip on PostgreSQL.
            let mut tx = if single_statement {
                Tx {
                    inner: TxInner::Autocommit(self.writer.acquire().await?),
                    postgres: self.backend == Backend::Postgres,
                }
            } else {
                self.begin().await?
            };
            let value = work(&mut tx).await?;
            tx.commit().await?;
            return Ok(value);
        };
        let (job, answer) = group_commit::job(work, single_statement);
        let stopped = || StoreError::CommitFailed { detail: "the writer has stopped".into() };
        queue.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(crate) fn writer(&self) -> &AnyPool {
        &self.writer
    }
}

fn sqlite_pool(max_connections: u32) -> AnyPoolOptions {
    AnyPoolOptions::new().max_connections(max_connections).acquire_timeout(ACQUIRE_TIMEOUT).after_connect(|conn, _| {
        Box::pin(async move {
            // WAL lets readers run beside the writer; FULL makes every acknowledged
            // commit durable across power loss.
            conn.execute(sqlx::raw_sql(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
            ))
            .await?;
            Ok(())
        })
    })
}

/// One database transaction. Dropping it without [`Tx::commit`] rolls back.
#[derive(Debug)]
pub struct Tx {
    inner: TxInner,
    postgres: bool,
}

#[derive(Debug)]
enum TxInner {
    Transaction(sqlx::Transaction<'static, Any>),
    /// On PostgreSQL, for work of one statement ([`Store::write_statement`]): each
    /// statement commits by itself.
    Autocommit(sqlx::pool::PoolConnection<Any>),
}

impl Tx {
    pub async fn commit(self) -> Result<(), StoreError> {
        if let TxInner::Transaction(inner) = self.inner {
            inner.commit().await?;
        }
        Ok(())
    }

    pub(crate) fn conn(&mut self) -> &mut sqlx::AnyConnection {
        match &mut self.inner {
            TxInner::Transaction(inner) => inner,
            TxInner::Autocommit(conn) => conn,
        }
    }
}
