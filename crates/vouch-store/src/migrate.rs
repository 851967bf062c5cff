//! Schema migrations, embedded in the binary and applied at start. Each back-end has its
//! own DDL; the version numbers are shared.

use sqlx::Executor;

use crate::{Backend, Store, StoreError};

struct Migration {
    version: i64,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: include_str!("../migrations/sqlite/0001_foundation.sql"),
        postgres: include_str!("../migrations/postgres/0001_foundation.sql"),
    },
    Migration {
        version: 2,
        sqlite: include_str!("../migrations/sqlite/0002_attest.sql"),
        postgres: include_str!("../migrations/postgres/0002_attest.sql"),
    },
    Migration {
        version: 3,
        sqlite: include_str!("../migrations/sqlite/0003_token.sql"),
        postgres: include_str!("../migrations/postgres/0003_token.sql"),
    },
    Migration {
        version: 4,
        sqlite: include_str!("../migrations/sqlite/0004_session.sql"),
        postgres: include_str!("../migrations/postgres/0004_session.sql"),
    },
    Migration {
        version: 5,
        sqlite: include_str!("../migrations/sqlite/0005_dvv.sql"),
        postgres: include_str!("../migrations/postgres/0005_dvv.sql"),
    },
    Migration {
        version: 6,
        sqlite: include_str!("../migrations/sqlite/0006_audit_pending.sql"),
        postgres: include_str!("../migrations/postgres/0006_audit_pending.sql"),
    },
    Migration {
        version: 7,
        sqlite: include_str!("../migrations/sqlite/0007_ledger.sql"),
        postgres: include_str!("../migrations/postgres/0007_ledger.sql"),
    },
    Migration {
        version: 8,
        sqlite: include_str!("../migrations/sqlite/0008_offline.sql"),
        postgres: include_str!("../migrations/postgres/0008_offline.sql"),
    },
    Migration {
        version: 9,
        sqlite: include_str!("../migrations/sqlite/0009_offline_payments.sql"),
        postgres: include_str!("../migrations/postgres/0009_offline_payments.sql"),
    },
    Migration {
        version: 10,
        sqlite: include_str!("../migrations/sqlite/0010_offline_sync.sql"),
        postgres: include_str!("../migrations/postgres/0010_offline_sync.sql"),
    },
    Migration {
        version: 11,
        sqlite: include_str!("../migrations/sqlite/0011_tsm.sql"),
        postgres: include_str!("../migrations/postgres/0011_tsm.sql"),
    },
];

/// Serialises concurrent starts of several instances on one PostgreSQL.
const POSTGRES_MIGRATION_LOCK: i64 = 0x766f_7563_6800;

pub(crate) async fn run(store: &Store) -> Result<(), StoreError> {
    let mut conn = store.writer().acquire().await?;
    if store.backend() == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)").bind(POSTGRES_MIGRATION_LOCK).execute(&mut *conn).await?;
    }
    let result = apply_pending(store.backend(), &mut conn, MIGRATIONS).await;
    if store.backend() == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock($1)").bind(POSTGRES_MIGRATION_LOCK).execute(&mut *conn).await?;
    }
    result
}

async fn apply_pending(
    backend: Backend,
    conn: &mut sqlx::AnyConnection,
    migrations: &[Migration],
) -> Result<(), StoreError> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await?;
    for migration in migrations {
        let applied: Option<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
            .bind(migration.version)
            .fetch_optional(&mut *conn)
            .await?;
        if applied.is_some() {
            continue;
        }
        let ddl = match backend {
            Backend::Sqlite => migration.sqlite,
            Backend::Postgres => migration.postgres,
        };
        let fail = |source| StoreError::Migration { version: migration.version, source };
        let begin = if backend == Backend::Sqlite { "BEGIN IMMEDIATE" } else { "BEGIN" };
        conn.execute(begin).await.map_err(fail)?;
        let applied = async {
            conn.execute(sqlx::raw_sql(ddl)).await?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(migration.version)
                .bind(unix_now())
                .execute(&mut *conn)
                .await
        }
        .await;
        match applied {
            Ok(_) => conn.execute("COMMIT").await.map_err(fail)?,
            Err(e) => {
                conn.execute("ROLLBACK").await.map_err(fail)?;
                return Err(fail(e));
            }
        };
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, Row};

    use super::*;

    /// Accounts opened before the ledger migration become merchant settlement
    /// accounts at zero.
    async fn accounts_survive_the_ledger_migration(backend: Backend, url: &str) {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
        let before_ledger = MIGRATIONS.iter().position(|m| m.version == 7).unwrap();
        apply_pending(backend, &mut conn, &MIGRATIONS[..before_ledger]).await.unwrap();
        conn.execute("INSERT INTO merchants (id, name, created_at) VALUES ('m1', 'Shop', 1)").await.unwrap();
        conn.execute(
            "INSERT INTO accounts (id, merchant_id, label, currency, created_at) \
             VALUES ('a1', 'm1', 'settlement', 'EUR', 2)",
        )
        .await
        .unwrap();
        apply_pending(backend, &mut conn, MIGRATIONS).await.unwrap();
        let row = sqlx::query(
            "SELECT kind, merchant_id, consumer_id, label, currency, debits_minor, credits_minor, created_at \
             FROM accounts WHERE id = 'a1'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let kind: String = row.get("kind");
        let merchant_id: Option<String> = row.get("merchant_id");
        let consumer_id: Option<String> = row.get("consumer_id");
        let (debits, credits, created_at): (i64, i64, i64) =
            (row.get("debits_minor"), row.get("credits_minor"), row.get("created_at"));
        assert_eq!(kind, "merchant_settlement");
        assert_eq!((merchant_id.as_deref(), consumer_id), (Some("m1"), None));
        assert_eq!((debits, credits, created_at), (0, 0, 2));
    }

    #[tokio::test]
    async fn sqlite_accounts_survive_the_ledger_migration() {
        let (url, _dir) = sqlite_url();
        accounts_survive_the_ledger_migration(Backend::Sqlite, &url).await;
    }

    #[tokio::test]
    async fn postgres_accounts_survive_the_ledger_migration() {
        let Some(url) = postgres_url().await else { return };
        accounts_survive_the_ledger_migration(Backend::Postgres, &url).await;
    }

    /// A credential and a payment under it written before the sync migration (which
    /// rebuilds the table on SQLite) read back the same, open, and still refer to each
    /// other; a credential may then name the one it refreshes, and only an existing one.
    async fn credentials_survive_the_sync_migration(backend: Backend, url: &str) {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
        if backend == Backend::Sqlite {
            conn.execute("PRAGMA foreign_keys = ON").await.unwrap();
        }
        let before_sync = MIGRATIONS.iter().position(|m| m.version == 10).unwrap();
        apply_pending(backend, &mut conn, &MIGRATIONS[..before_sync]).await.unwrap();
        conn.execute(sqlx::raw_sql(
            "INSERT INTO merchants (id, name, created_at) VALUES ('m1', 'Shop', 1); \
             INSERT INTO devices (id, kind, merchant_id, model, firmware_version, public_jwk, key_thumbprint, status, \
                 created_at, updated_at) VALUES ('d1', 'consumer', 'm1', 'phone', '1', '{}', 't1', 'active', 1, 1); \
             INSERT INTO consumers (id, name, created_at) VALUES ('c1', 'Ada', 1); \
             INSERT INTO accounts (id, kind, consumer_id, label, currency, created_at) \
                 VALUES ('a1', 'consumer_offline_reserve', 'c1', 'reserve', 'EUR', 1); \
             INSERT INTO offline_credentials (id, device_id, consumer_id, reserve_account_id, public_key, limit_minor, \
                 currency, counter_start, issued_at, not_after, settled_minor) \
                 VALUES ('ocr1', 'd1', 'c1', 'a1', 'k', 1000, 'EUR', 0, 2, 3, 100); \
             INSERT INTO offline_payments (payment_id, credential_id, counter, nonce, amount_minor, currency, \
                 merchant_id, terminal_id, receipt, settled_at) \
                 VALUES ('p1', 'ocr1', 1, 'n1', 100, 'EUR', 'm1', 't1', 'r', 4)",
        ))
        .await
        .unwrap();
        apply_pending(backend, &mut conn, MIGRATIONS).await.unwrap();
        let row = sqlx::query(
            "SELECT limit_minor, counter_start, issued_at, not_after, settled_minor, counter_end, closed_at, \
             closed_spent_minor, closed_settled_minor, refreshed_from FROM offline_credentials WHERE id = 'ocr1'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let kept: [i64; 5] =
            ["limit_minor", "counter_start", "issued_at", "not_after", "settled_minor"].map(|c| row.get(c));
        assert_eq!(kept, [1000, 0, 2, 3, 100]);
        let closing: [Option<i64>; 4] =
            ["counter_end", "closed_at", "closed_spent_minor", "closed_settled_minor"].map(|c| row.get(c));
        assert_eq!((closing, row.get::<Option<String>, _>("refreshed_from")), ([None; 4], None));
        let payment: String = sqlx::query_scalar(
            "SELECT p.payment_id FROM offline_payments p JOIN offline_credentials c ON c.id = p.credential_id",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(payment, "p1");
        let refreshing = |refreshed_from: &str| {
            sqlx::AssertSqlSafe(format!(
                "INSERT INTO offline_credentials (id, device_id, consumer_id, reserve_account_id, public_key, \
                 limit_minor, currency, counter_start, issued_at, not_after, refreshed_from) \
                 VALUES ('ocr2', 'd1', 'c1', 'a1', 'k', 900, 'EUR', 4294967296, 5, 6, '{refreshed_from}')"
            ))
        };
        let orphan = conn.execute(refreshing("ocr9")).await;
        assert!(orphan.is_err(), "a credential refreshes only an existing one");
        conn.execute(refreshing("ocr1")).await.unwrap();
        if backend == Backend::Sqlite {
            let broken: Vec<String> = sqlx::query_scalar("SELECT \"table\" FROM pragma_foreign_key_check")
                .fetch_all(&mut conn)
                .await
                .unwrap();
            assert!(broken.is_empty(), "{broken:?}");
        }
    }

    #[tokio::test]
    async fn sqlite_credentials_survive_the_sync_migration() {
        let (url, _dir) = sqlite_url();
        credentials_survive_the_sync_migration(Backend::Sqlite, &url).await;
    }

    #[tokio::test]
    async fn postgres_credentials_survive_the_sync_migration() {
        let Some(url) = postgres_url().await else { return };
        credentials_survive_the_sync_migration(Backend::Postgres, &url).await;
    }

    /// A fresh SQLite file, removed with the directory.
    fn sqlite_url() -> (String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (format!("sqlite://{}?mode=rwc", dir.path().join("vouch.db").display()), dir)
    }

    /// A fresh schema of the test PostgreSQL, if one is configured.
    async fn postgres_url() -> Option<String> {
        let Ok(base) = std::env::var("VOUCH_TEST_DATABASE_URL") else {
            eprintln!("skipping PostgreSQL case: VOUCH_TEST_DATABASE_URL is not set");
            return None;
        };
        sqlx::any::install_default_drivers();
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::AnyConnection::connect(&base).await.unwrap();
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).await.unwrap();
        let separator = if base.contains('?') { '&' } else { '?' };
        Some(format!("{base}{separator}options=-c%20search_path%3D{schema}"))
    }
}
