use vouch_store::{StoreError, TsmIssuer, TsmManifest, TsmRegistration};

use crate::conformance;
use crate::harness::TestStore;
use crate::registry::{device, merchant};

fn issuer(id: &str, fingerprint_byte: u8, created_at: i64) -> TsmIssuer {
    TsmIssuer {
        id: id.into(),
        name: format!("Maker {id}"),
        subject: format!("CN=Maker {id} CA"),
        certificate_der: vec![0x30, fingerprint_byte],
        fingerprint: vec![fingerprint_byte; 32],
        not_before: 10,
        not_after: 10_000,
        created_at,
    }
}

fn registration(device_id: &str, registration_id: &str, registered_at: i64) -> TsmRegistration {
    TsmRegistration {
        device_id: device_id.into(),
        registration_id: registration_id.into(),
        issuer_id: "iss1".into(),
        se_serial: format!("5e{registered_at:x}"),
        se_public_key: vec![4; 65],
        sealed_device_key: format!("sealed key of {registration_id}").into_bytes(),
        instrument: "card-1".into(),
        last_counter: 0,
        registered_at,
    }
}

/// Merchant `m1` with devices `d1` and `d2`, and issuer `iss1`.
async fn with_devices(t: &TestStore) {
    let mut tx = t.store.begin().await.unwrap();
    tx.insert_merchant(&merchant("m1")).await.unwrap();
    tx.insert_device(&device("d1", "m1", "t1")).await.unwrap();
    tx.insert_device(&device("d2", "m1", "t2")).await.unwrap();
    assert!(tx.insert_tsm_issuer(&issuer("iss1", 1, 100)).await.unwrap());
    tx.commit().await.unwrap();
}

/// Registers `registration` as the request path does, in a write of its own.
async fn register(t: &TestStore, registration: TsmRegistration) {
    t.store.write(move |tx| Box::pin(async move { tx.upsert_tsm_registration(&registration).await })).await.unwrap();
}

async fn advance(t: &TestStore, device_id: &'static str, registration_id: &'static str, counter: i64) -> bool {
    t.store
        .write(move |tx| Box::pin(async move { tx.advance_tsm_counter(device_id, registration_id, counter).await }))
        .await
        .unwrap()
}

conformance! {
    async fn an_issuer_certificate_registers_once(t: TestStore) {
        with_devices(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        assert!(!tx.insert_tsm_issuer(&issuer("iss2", 1, 200)).await.unwrap(), "same fingerprint");
        assert!(tx.insert_tsm_issuer(&issuer("iss3", 3, 50)).await.unwrap());
        assert!(tx.insert_tsm_issuer(&issuer("iss0", 2, 100)).await.unwrap());
        tx.commit().await.unwrap();
        let issuers = t.store.tsm_issuers().await.unwrap();
        let ids: Vec<&str> = issuers.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["iss3", "iss0", "iss1"], "by created_at, then id");
        assert_eq!(issuers[2], issuer("iss1", 1, 100));

        let mut tx = t.store.begin().await.unwrap();
        let short = TsmIssuer { fingerprint: vec![9; 31], ..issuer("iss4", 9, 1) };
        assert!(tx.insert_tsm_issuer(&short).await.is_err(), "a fingerprint is a SHA-256");
    }

    async fn a_certificate_is_revoked_once_under_its_issuer(t: TestStore) {
        with_devices(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_tsm_issuer(&issuer("iss2", 2, 100)).await.unwrap();
        assert!(tx.insert_tsm_revocation("iss1", "0a", 300).await.unwrap());
        assert!(!tx.insert_tsm_revocation("iss1", "0a", 301).await.unwrap(), "revoked already");
        assert!(tx.insert_tsm_revocation("iss1", "0c", 302).await.unwrap());
        assert!(tx.insert_tsm_revocation("iss2", "0b", 303).await.unwrap());
        tx.commit().await.unwrap();
        let serials = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let chain = serials(&["0c", "0b", "0a", "0c", "0d"]);
        assert_eq!(t.store.tsm_revoked("iss1", &chain).await.unwrap(), ["0a", "0c"]);
        assert_eq!(t.store.tsm_revoked("iss2", &chain).await.unwrap(), ["0b"]);
        assert!(t.store.tsm_revoked("iss1", &serials(&["0b"])).await.unwrap().is_empty());
        assert!(t.store.tsm_revoked("iss1", &[]).await.unwrap().is_empty());

        let mut tx = t.store.begin().await.unwrap();
        let orphan = tx.insert_tsm_revocation("iss9", "0a", 300).await;
        assert!(matches!(orphan, Err(StoreError::MissingReference { .. })), "{orphan:?}");
    }

    async fn provisioning_again_replaces_the_registration(t: TestStore) {
        with_devices(&t).await;
        assert_eq!(t.store.tsm_registration("d1").await.unwrap(), None);
        register(&t, registration("d1", "reg1", 200)).await;
        assert!(advance(&t, "d1", "reg1", 7).await);
        let first = t.store.tsm_registration("d1").await.unwrap().unwrap();
        assert_eq!(first, TsmRegistration { last_counter: 7, ..registration("d1", "reg1", 200) });

        let again = TsmRegistration { instrument: "card-2".into(), ..registration("d1", "reg2", 300) };
        register(&t, again.clone()).await;
        assert_eq!(t.store.tsm_registration("d1").await.unwrap(), Some(again), "new key, counter from the start");
        assert_eq!(t.store.tsm_registration("d2").await.unwrap(), None);

        let mut tx = t.store.begin().await.unwrap();
        let taken = tx.upsert_tsm_registration(&registration("d2", "reg2", 400)).await;
        assert!(matches!(taken, Err(StoreError::Conflict { .. })), "a registration id names one device: {taken:?}");
        drop(tx);
        for (device_id, issuer_id) in [("d9", "iss1"), ("d2", "iss9")] {
            let mut tx = t.store.begin().await.unwrap();
            let orphan = TsmRegistration { issuer_id: issuer_id.into(), ..registration(device_id, "reg3", 400) };
            let refused = tx.upsert_tsm_registration(&orphan).await;
            assert!(matches!(refused, Err(StoreError::MissingReference { .. })), "{refused:?}");
        }
    }

    async fn the_counter_only_increases_and_only_for_the_current_registration(t: TestStore) {
        with_devices(&t).await;
        register(&t, registration("d1", "reg1", 200)).await;
        assert!(!advance(&t, "d1", "reg1", 0).await, "counters start at 1");
        assert!(advance(&t, "d1", "reg1", 1).await);
        assert!(!advance(&t, "d1", "reg1", 1).await, "replayed");
        assert!(advance(&t, "d1", "reg1", 5).await, "gaps are allowed");
        assert!(!advance(&t, "d1", "reg1", 3).await, "below the last");
        assert!(!advance(&t, "d2", "reg1", 9).await, "another device's registration");
        assert!(!advance(&t, "d9", "reg1", 9).await, "an unknown device");

        register(&t, registration("d1", "reg2", 300)).await;
        assert!(!advance(&t, "d1", "reg1", 6).await, "a replaced registration accepts nothing");
        assert!(advance(&t, "d1", "reg2", 1).await, "the new one counts from the start");
        assert_eq!(t.store.tsm_registration("d1").await.unwrap().unwrap().last_counter, 1);
    }

    async fn concurrent_messages_under_one_counter_are_accepted_once(t: TestStore) {
        with_devices(&t).await;
        register(&t, registration("d1", "reg1", 200)).await;
        let advances: Vec<_> = (0..8)
            .map(|_| {
                let store = t.store.clone();
                tokio::spawn(async move {
                    store
                        .write(|tx| Box::pin(async move { tx.advance_tsm_counter("d1", "reg1", 1).await }))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut accepted = 0;
        for advance in advances {
            accepted += usize::from(advance.await.unwrap());
        }
        assert_eq!(accepted, 1);
    }
}

fn manifest(id: &str, app_id: &str, version: i64, created_at: i64) -> TsmManifest {
    TsmManifest {
        id: id.into(),
        app_id: app_id.into(),
        version,
        code_sha256: format!("{version:064x}"),
        code_size: 1_024 * version,
        se_profile: "app-se-1".into(),
        signed: format!("eyJ.{id}.sig"),
        created_at,
    }
}

conformance! {
    async fn an_application_version_is_released_once_and_the_highest_is_the_latest(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        assert!(tx.insert_tsm_manifest(&manifest("man1", "wallet", 1, 100)).await.unwrap());
        assert!(tx.insert_tsm_manifest(&manifest("man3", "wallet", 3, 110)).await.unwrap());
        assert!(tx.insert_tsm_manifest(&manifest("man2", "wallet", 2, 120)).await.unwrap());
        assert!(!tx.insert_tsm_manifest(&manifest("man4", "wallet", 2, 130)).await.unwrap(), "version 2 again");
        assert!(tx.insert_tsm_manifest(&manifest("man5", "loyalty", 1, 140)).await.unwrap());
        tx.commit().await.unwrap();

        assert_eq!(t.store.latest_tsm_manifest("wallet").await.unwrap(), Some(manifest("man3", "wallet", 3, 110)));
        assert_eq!(t.store.latest_tsm_manifest("loyalty").await.unwrap().unwrap().id, "man5");
        assert_eq!(t.store.latest_tsm_manifest("transit").await.unwrap(), None);
        let all = t.store.tsm_manifests().await.unwrap();
        let listed: Vec<(&str, i64)> = all.iter().map(|m| (m.app_id.as_str(), m.version)).collect();
        assert_eq!(listed, [("loyalty", 1), ("wallet", 1), ("wallet", 2), ("wallet", 3)]);
        assert_eq!(all[2], manifest("man2", "wallet", 2, 120));

        for refused in [
            TsmManifest { version: 0, ..manifest("man6", "transit", 0, 1) },
            TsmManifest { code_sha256: "ab".into(), ..manifest("man7", "transit", 1, 1) },
            TsmManifest { code_size: 0, ..manifest("man8", "transit", 1, 1) },
        ] {
            let mut tx = t.store.begin().await.unwrap();
            assert!(tx.insert_tsm_manifest(&refused).await.is_err(), "{refused:?}");
        }
        assert!(t.store.tsm_manifests().await.unwrap().iter().all(|m| m.app_id != "transit"));
    }
}
