//! Opens a fresh store per test case: a temporary SQLite file, or a private schema in
//! the PostgreSQL database named by `VOUCH_TEST_DATABASE_URL`.

use sqlx::Executor;
use vouch_store::{Store, StoreOptions};

pub const POSTGRES_URL_VAR: &str = "VOUCH_TEST_DATABASE_URL";

/// Keeps the temporary directory alive as long as the store.
pub struct TestStore {
    pub store: Store,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("vouch.db").display());
    let store = Store::open(&url, StoreOptions::default()).await.unwrap();
    TestStore { store, url, _dir: Some(dir) }
}

/// `None` (with a notice) when no PostgreSQL is configured.
pub async fn postgres() -> Option<TestStore> {
    let Ok(base) = std::env::var(POSTGRES_URL_VAR) else {
        eprintln!("skipping PostgreSQL case: {POSTGRES_URL_VAR} is not set");
        return None;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    sqlx::any::install_default_drivers();
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&base).await.unwrap();
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).await.unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    let store = Store::open(&url, StoreOptions { max_connections: 8 }).await.unwrap();
    Some(TestStore { store, url, _dir: None })
}

/// Declares one async test case that runs once per back-end, as
/// `<name>::sqlite` and `<name>::postgres`.
#[macro_export]
macro_rules! conformance {
    ($(async fn $name:ident($store:ident: $ty:ty) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn case($store: $ty) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                case($crate::harness::sqlite().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(store) = $crate::harness::postgres().await {
                    case(store).await;
                }
            }
        }
    )*};
}
