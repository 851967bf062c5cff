//! Vouch's storage: one repository API over two back-ends, SQLite (the embedded
//! default) and PostgreSQL (shared by many server instances).
//!
//! Every query is written once, in SQL both back-ends accept, and runs through sqlx's
//! `Any` driver; only the DDL in `migrations/` differs per back-end. Single-use and
//! uniqueness rules are constraints and conditional updates, never process memory, so
//! they hold across server instances.
//!
//! Writes go through a [`Tx`]: a capability consumes its nonce, writes its records and
//! appends its audit entry in one transaction, so a decision is never half-written.

mod audit;
mod error;
mod migrate;
mod registry;
mod secrets;

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor};

pub use audit::{AuditBreak, AuditEntry, AuditRecord, AuditReport, GENESIS_HASH, chain_hash};
pub use error::StoreError;
pub use registry::{Account, Device, DeviceFilter, DeviceStatus, Merchant, ServiceProvider};
pub use secrets::{ApiKeyRecord, NonceRejection, SigningKeyRecord};

/// Limits of the connection pool.
pub const SQLITE_CONNECTIONS_MAX: u32 = 8;
pub const POSTGRES_CONNECTIONS_DEFAULT: u32 = 16;
const BUSY_TIMEOUT_MS: u32 = 5_000;
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
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Connects and applies pending migrations.
    pub async fn open(url: &str, options: StoreOptions) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let connect: AnyConnectOptions = url.parse()?;
        let pool = match backend {
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(options.max_connections.min(SQLITE_CONNECTIONS_MAX))
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL lets readers run beside the one writer; FULL makes every
                            // acknowledged commit durable across power loss.
                            conn.execute(sqlx::raw_sql(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                            ))
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(connect)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(connect)
                    .await?
            }
        };
        debug_assert_eq!(BUSY_TIMEOUT_MS, 5_000, "keep the PRAGMA above in step");
        let store = Store { pool, backend };
        migrate::run(&store).await?;
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
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(Tx { inner })
    }

    /// Round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// One database transaction. Dropping it without [`Tx::commit`] rolls back.
#[derive(Debug)]
pub struct Tx {
    inner: sqlx::Transaction<'static, Any>,
}

impl Tx {
    pub async fn commit(self) -> Result<(), StoreError> {
        self.inner.commit().await?;
        Ok(())
    }

    pub(crate) fn conn(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.inner
    }
}
