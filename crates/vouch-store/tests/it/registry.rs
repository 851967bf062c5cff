use vouch_proto::enrol::DeviceKind;
use vouch_store::{Account, Device, DeviceFilter, DeviceStatus, Merchant, ServiceProvider, StoreError};

use crate::conformance;
use crate::harness::TestStore;

pub fn merchant(id: &str) -> Merchant {
    Merchant {
        id: id.into(),
        name: format!("Shop {id}"),
        card_acceptor_id: None,
        merchant_category: None,
        created_at: 100,
    }
}

pub fn device(id: &str, merchant_id: &str, thumbprint: &str) -> Device {
    Device {
        id: id.into(),
        kind: DeviceKind::Reader,
        merchant_id: merchant_id.into(),
        model: "R-100".into(),
        firmware_version: "1.0.0".into(),
        public_jwk: "{}".into(),
        key_thumbprint: thumbprint.into(),
        status: DeviceStatus::Active,
        created_at: 100,
        updated_at: 100,
    }
}

conformance! {
    async fn merchant_and_account_round_trip(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_merchant(&merchant("m1")).await.unwrap();
        let account = Account::merchant_settlement("a1", "m1", "settlement", "EUR", 5);
        tx.insert_account(&account).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(t.store.merchant("m1").await.unwrap(), merchant("m1"));
        assert_eq!(t.store.account("a1").await.unwrap(), account);
        assert_eq!(t.store.merchants(None, 10).await.unwrap().len(), 1);
        assert!(matches!(t.store.merchant("nope").await, Err(StoreError::NotFound { .. })));
    }

    async fn duplicate_merchant_conflicts(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_merchant(&merchant("m1")).await.unwrap();
        assert!(matches!(tx.insert_merchant(&merchant("m1")).await, Err(StoreError::Conflict { .. })));
    }

    async fn account_for_unknown_merchant_is_refused(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        let account = Account::merchant_settlement("a1", "ghost", "x", "EUR", 5);
        assert!(matches!(tx.insert_account(&account).await, Err(StoreError::MissingReference { .. })));
    }

    async fn a_key_enrols_once(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_merchant(&merchant("m1")).await.unwrap();
        tx.insert_device(&device("d1", "m1", "thumb")).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = t.store.begin().await.unwrap();
        assert!(matches!(tx.insert_device(&device("d2", "m1", "thumb")).await, Err(StoreError::Conflict { .. })));
    }

    async fn device_status_transitions(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_merchant(&merchant("m1")).await.unwrap();
        tx.insert_device(&device("d1", "m1", "t1")).await.unwrap();
        let suspended = tx.set_device_status("d1", &[DeviceStatus::Active], DeviceStatus::Suspended, 200).await.unwrap();
        assert_eq!((suspended.status, suspended.updated_at), (DeviceStatus::Suspended, 200));
        tx.set_device_status("d1", &[DeviceStatus::Active, DeviceStatus::Suspended], DeviceStatus::Revoked, 300).await.unwrap();
        let refused = tx.set_device_status("d1", &[DeviceStatus::Suspended], DeviceStatus::Active, 400).await;
        assert!(matches!(refused, Err(StoreError::StatusTransition { from: "revoked", to: "active" })));
        assert!(matches!(tx.set_device_status("ghost", &[DeviceStatus::Active], DeviceStatus::Revoked, 1).await, Err(StoreError::NotFound { .. })));
    }

    async fn device_listing_filters_and_pages(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_merchant(&merchant("m1")).await.unwrap();
        tx.insert_merchant(&merchant("m2")).await.unwrap();
        for i in 0..5 {
            tx.insert_device(&device(&format!("d{i}"), if i % 2 == 0 { "m1" } else { "m2" }, &format!("t{i}"))).await.unwrap();
        }
        tx.set_device_status("d0", &[DeviceStatus::Active], DeviceStatus::Suspended, 1).await.unwrap();
        tx.commit().await.unwrap();
        let all = t.store.devices(&DeviceFilter { limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["d0", "d1", "d2", "d3", "d4"]);
        let m1 = t.store.devices(&DeviceFilter { merchant_id: Some("m1".into()), limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(m1.len(), 3);
        let active_m1 = t.store.devices(&DeviceFilter { merchant_id: Some("m1".into()), status: Some(DeviceStatus::Active), limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(active_m1.len(), 2);
        let page = t.store.devices(&DeviceFilter { after_id: Some("d1".into()), limit: 2, ..Default::default() }).await.unwrap();
        assert_eq!(page.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["d2", "d3"]);
        let terminals = t.store.devices(&DeviceFilter { kind: Some(DeviceKind::Terminal), limit: 10, ..Default::default() }).await.unwrap();
        assert!(terminals.is_empty());
    }

    async fn uncommitted_writes_vanish(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_merchant(&merchant("m1")).await.unwrap();
        drop(tx);
        assert!(matches!(t.store.merchant("m1").await, Err(StoreError::NotFound { .. })));
    }

    async fn service_providers(t: TestStore) {
        let provider = ServiceProvider { id: "sp1".into(), name: "Bank".into(), endpoint: "https://bank.example/in".into(), public_jwk: "{}".into(), created_at: 1 };
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_service_provider(&provider).await.unwrap();
        tx.commit().await.unwrap();
        // A failed statement aborts a PostgreSQL transaction, so each refusal gets its own.
        let mut tx = t.store.begin().await.unwrap();
        let twin = ServiceProvider { id: "sp2".into(), ..provider.clone() };
        assert!(matches!(tx.insert_service_provider(&twin).await, Err(StoreError::Conflict { .. })));
        drop(tx);
        assert_eq!(t.store.service_provider("sp1").await.unwrap(), provider);
        assert_eq!(t.store.service_providers().await.unwrap(), vec![provider]);
    }

    async fn concurrent_enrolments_of_one_key_have_one_winner(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_merchant(&merchant("m1")).await.unwrap();
        tx.commit().await.unwrap();
        let attempts = (0..8).map(|i| {
            let store = t.store.clone();
            tokio::spawn(async move {
                let mut tx = store.begin().await?;
                tx.insert_device(&device(&format!("d{i}"), "m1", "same-key")).await?;
                tx.commit().await
            })
        });
        let mut winners = 0;
        for attempt in attempts {
            match attempt.await.unwrap() {
                Ok(()) => winners += 1,
                Err(StoreError::Conflict { .. }) => {}
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert_eq!(winners, 1);
    }
}

conformance! {
    async fn grouped_writes_commit_together_and_fail_alone(t: TestStore) {
        t.store.write(|tx| Box::pin(async move { tx.insert_merchant(&merchant("m1")).await })).await.unwrap();
        let writes: Vec<_> = (0..60)
            .map(|i| {
                let store = t.store.clone();
                // Every sixth device reuses one key: exactly one of those may enrol.
                let thumbprint = if i % 6 == 0 { "shared".to_owned() } else { format!("t{i}") };
                tokio::spawn(async move {
                    store
                        .write(move |tx| {
                            Box::pin(async move {
                                tx.insert_device(&device(&format!("d{i:02}"), "m1", &thumbprint)).await?;
                                let entry = vouch_store::AuditEntry {
                                    at: i,
                                    actor: "test".into(),
                                    action: "device.enrolled".into(),
                                    subject: format!("d{i:02}"),
                                    detail: "{}".into(),
                                };
                                tx.append_audit(&entry).await
                            })
                        })
                        .await
                })
            })
            .collect();
        let mut committed = 0;
        for write in writes {
            match write.await.unwrap() {
                Ok(_) => committed += 1,
                Err(StoreError::Conflict { .. }) => {}
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert_eq!(committed, 51);
        let devices = t.store.devices(&DeviceFilter { limit: 100, ..Default::default() }).await.unwrap();
        assert_eq!(devices.len(), 51);
        let report = t.store.verify_audit().await.unwrap();
        assert_eq!((report.rows_checked, report.first_break), (51, None));
    }
}

/// SQLite only: there the writer is shared, so one panicking job must not take down
/// every later write (on PostgreSQL the job runs in its caller's task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_write_fails_alone_and_the_writer_goes_on() {
    let t = crate::harness::sqlite().await;
    let failed = t
        .store
        .write::<(), _>(|tx| {
            Box::pin(async move {
                tx.insert_merchant(&merchant("m0")).await?;
                panic!("a job that panics mid-write");
            })
        })
        .await;
    assert!(matches!(failed, Err(StoreError::CommitFailed { .. })), "{failed:?}");
    t.store.write(|tx| Box::pin(async move { tx.insert_merchant(&merchant("m1")).await })).await.unwrap();
    assert!(matches!(t.store.merchant("m0").await, Err(StoreError::NotFound { .. })));
    assert_eq!(t.store.merchant("m1").await.unwrap(), merchant("m1"));
}
