//! Several server instances on one PostgreSQL: single-use and uniqueness rules hold
//! across them because the database enforces them.

use vouch_device::sim::{self, DeviceProfile};
use vouch_device::{DeviceIdentity, VouchClient};
use vouch_proto::SystemClock;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
use vouch_server::Config;

use crate::support::{RunningServer, start_with};

const POSTGRES_URL_VAR: &str = "VOUCH_TEST_DATABASE_URL";
const MASTER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

async fn two_instances_on_postgres() -> Option<(RunningServer, RunningServer)> {
    let Ok(base) = std::env::var(POSTGRES_URL_VAR) else {
        eprintln!("skipping PostgreSQL case: {POSTGRES_URL_VAR} is not set");
        return None;
    };
    let url = vouch_store_schema(&base).await;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_data_dir(dir.path());
        config.database_url = url.clone();
        instances.push(start_with(config, Some(MASTER_KEY), Some(dir)).await);
    }
    let second = instances.pop()?;
    Some((instances.pop()?, second))
}

/// A private schema per test, so runs never see each other's rows.
async fn vouch_store_schema(base: &str) -> String {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let schema = format!("e2e_{}", uuid::Uuid::new_v4().simple());
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(base).await.unwrap();
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).await.unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}options=-c%20search_path%3D{schema}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_device_enrolling_on_two_instances_at_once_succeeds_once() {
    let Some((first, second)) = two_instances_on_postgres().await else { return };
    // Only one instance bootstrapped the admin key; it works on both.
    let admin_key = if first.admin_key.is_empty() { &second.admin_key } else { &first.admin_key };
    let clients = [&first, &second].map(|s| VouchClient::new(&s.url).unwrap().with_api_key(admin_key));
    let merchant = clients[0].create_merchant("Shared Shop").await.unwrap();
    let rng = SystemRandom::new();
    let identity = DeviceIdentity::generate(&rng).unwrap();
    let profile = DeviceProfile::simulated(DeviceKind::Reader, &merchant.merchant_id);
    let proofs = [
        sim::enrolment_proof(&clients[0], &identity, &profile, &SystemClock, &rng).await.unwrap(),
        sim::enrolment_proof(&clients[1], &identity, &profile, &SystemClock, &rng).await.unwrap(),
    ];
    let (a, b) = tokio::join!(clients[0].enrol(&proofs[0]), clients[1].enrol(&proofs[1]));
    let outcomes = [a, b];
    let winners = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(winners, 1, "{outcomes:?}");
    let loser = outcomes.into_iter().find_map(Result::err).unwrap();
    assert_eq!(loser.problem_reason(), Some("key-already-enrolled"), "{loser}");

    // Both instances sign with the one active key and publish the same set.
    let jwks = [clients[0].jwks().await.unwrap(), clients[1].jwks().await.unwrap()];
    assert_eq!(jwks[0], jwks[1]);
    assert_eq!(first.state.store.verify_audit().await.unwrap().first_break, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_is_used_once_across_instances() {
    let Some((first, second)) = two_instances_on_postgres().await else { return };
    let admin_key = if first.admin_key.is_empty() { &second.admin_key } else { &first.admin_key };
    let clients = [&first, &second].map(|s| VouchClient::new(&s.url).unwrap().with_api_key(admin_key));
    let merchant = clients[0].create_merchant("Shared Shop").await.unwrap();
    let rng = SystemRandom::new();
    let identity = DeviceIdentity::generate(&rng).unwrap();
    let profile = DeviceProfile::simulated(DeviceKind::Pos, &merchant.merchant_id);
    let proof = sim::enrolment_proof(&clients[0], &identity, &profile, &SystemClock, &rng).await.unwrap();
    let (a, b) = tokio::join!(clients[0].enrol(&proof), clients[1].enrol(&proof));
    let outcomes = [a, b];
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    let loser = outcomes.into_iter().find_map(Result::err).unwrap();
    assert_eq!(loser.problem_reason(), Some("replayed-enrolment"), "{loser}");
}
