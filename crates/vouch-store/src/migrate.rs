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
];

/// Serialises concurrent starts of several instances on one PostgreSQL.
const POSTGRES_MIGRATION_LOCK: i64 = 0x766f_7563_6800;

pub(crate) async fn run(store: &Store) -> Result<(), StoreError> {
    let mut conn = store.writer().acquire().await?;
    if store.backend() == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)").bind(POSTGRES_MIGRATION_LOCK).execute(&mut *conn).await?;
    }
    let result = apply_pending(store, &mut conn).await;
    if store.backend() == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock($1)").bind(POSTGRES_MIGRATION_LOCK).execute(&mut *conn).await?;
    }
    result
}

async fn apply_pending(store: &Store, conn: &mut sqlx::AnyConnection) -> Result<(), StoreError> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await?;
    for migration in MIGRATIONS {
        let applied: Option<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
            .bind(migration.version)
            .fetch_optional(&mut *conn)
            .await?;
        if applied.is_some() {
            continue;
        }
        let ddl = match store.backend() {
            Backend::Sqlite => migration.sqlite,
            Backend::Postgres => migration.postgres,
        };
        let fail = |source| StoreError::Migration { version: migration.version, source };
        let begin = if store.backend() == Backend::Sqlite { "BEGIN IMMEDIATE" } else { "BEGIN" };
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
