use vouch_store::{DeviceStatus, ReaderSession, StoreError, TokenSession, TokenSessionState};

use crate::conformance;
use crate::harness::TestStore;
use crate::registry::{device, merchant};

fn session(id: &str, parent_id: Option<&str>, device_id: &str) -> TokenSession {
    TokenSession {
        id: id.into(),
        parent_id: parent_id.map(str::to_owned),
        device_id: device_id.into(),
        key_thumbprint: "jkt".into(),
        ticket_id: "tkt_1".into(),
        created_at: 100,
        expires_at: 700,
        ended_at: None,
    }
}

async fn with_device(t: &TestStore) {
    let mut tx = t.store.begin().await.unwrap();
    tx.insert_merchant(&merchant("m1")).await.unwrap();
    tx.insert_device(&device("d1", "m1", "t1")).await.unwrap();
    tx.commit().await.unwrap();
}

conformance! {
    async fn a_dpop_proof_is_recorded_once_and_purged_after_its_window(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        assert!(tx.record_dpop_proof(&[1; 32], 100).await.unwrap());
        assert!(!tx.record_dpop_proof(&[1; 32], 100).await.unwrap());
        assert!(tx.record_dpop_proof(&[2; 32], 300).await.unwrap());
        // The transaction is still usable after a replay (PostgreSQL would abort it on
        // a failed statement).
        assert!(tx.record_dpop_proof(&[3; 32], 300).await.unwrap());
        tx.commit().await.unwrap();
        let mut tx = t.store.begin().await.unwrap();
        assert_eq!(tx.purge_dpop_proofs(200).await.unwrap(), 1);
        assert!(tx.record_dpop_proof(&[1; 32], 400).await.unwrap(), "a purged proof is outside its window anyway");
        assert!(!tx.record_dpop_proof(&[2; 32], 400).await.unwrap());
    }

    async fn racing_uses_of_one_proof_have_one_winner(t: TestStore) {
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let store = t.store.clone();
                tokio::spawn(async move {
                    store.write(|tx| Box::pin(async move { tx.record_dpop_proof(&[7; 32], 100).await })).await.unwrap()
                })
            })
            .collect();
        let mut winners = 0;
        for racer in racers {
            winners += usize::from(racer.await.unwrap());
        }
        assert_eq!(winners, 1);
    }

    async fn ending_a_session_ends_its_subsessions(t: TestStore) {
        with_device(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_token_session(&session("s1", None, "d1")).await.unwrap();
        tx.insert_token_session(&session("s1a", Some("s1"), "d1")).await.unwrap();
        tx.insert_token_session(&session("s1b", Some("s1"), "d1")).await.unwrap();
        tx.insert_token_session(&session("s2", None, "d1")).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(t.store.token_session_state("s1", None).await.unwrap(), TokenSessionState::Live);
        assert_eq!(t.store.token_session_state("s1", Some("s1a")).await.unwrap(), TokenSessionState::Live);
        assert_eq!(t.store.token_session_state("s1", Some("s2x")).await.unwrap(), TokenSessionState::Unknown);
        assert_eq!(t.store.token_session_state("ghost", None).await.unwrap(), TokenSessionState::Unknown);

        let mut tx = t.store.begin().await.unwrap();
        assert_eq!(tx.end_token_session("s1a", 200).await.unwrap(), 1);
        tx.commit().await.unwrap();
        assert_eq!(t.store.token_session_state("s1", Some("s1a")).await.unwrap(), TokenSessionState::Ended);
        assert_eq!(t.store.token_session_state("s1", Some("s1b")).await.unwrap(), TokenSessionState::Live, "a sibling lives on");

        let mut tx = t.store.begin().await.unwrap();
        assert_eq!(tx.end_token_session("s1", 300).await.unwrap(), 2);
        assert!(!tx.token_session_open("s1").await.unwrap());
        assert!(tx.token_session_open("s2").await.unwrap());
        tx.commit().await.unwrap();
        assert_eq!(t.store.token_session_state("s1", None).await.unwrap(), TokenSessionState::Ended);
        assert_eq!(t.store.token_session_state("s1", Some("s1b")).await.unwrap(), TokenSessionState::Ended);
        assert_eq!(t.store.token_session_state("s2", None).await.unwrap(), TokenSessionState::Live);
        assert_eq!(t.store.token_session("s1b").await.unwrap().ended_at, Some(300));
        assert!(matches!(t.store.token_session("ghost").await, Err(StoreError::NotFound { .. })));
    }

    async fn a_suspended_device_has_no_live_sessions(t: TestStore) {
        with_device(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_token_session(&session("s1", None, "d1")).await.unwrap();
        tx.set_device_status("d1", &[DeviceStatus::Active], DeviceStatus::Suspended, 200).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(t.store.token_session_state("s1", None).await.unwrap(), TokenSessionState::DeviceInactive);
    }

    async fn sessions_need_a_known_device_and_parent(t: TestStore) {
        with_device(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        let orphan = tx.insert_token_session(&session("s1", None, "ghost")).await;
        assert!(matches!(orphan, Err(StoreError::MissingReference { .. })), "{orphan:?}");
    }

    async fn a_reader_nonce_is_granted_once(t: TestStore) {
        with_device(&t).await;
        let grant = |id: &str, nonce: &str| ReaderSession {
            id: id.into(),
            reader_id: "d1".into(),
            reader_nonce: nonce.into(),
            pos_device_id: "d1".into(),
            token_sid: "ses_1".into(),
            created_at: 100,
            expires_at: 220,
        };
        t.store.write(move |tx| Box::pin(async move { tx.insert_reader_session(&grant("rs1", "n1")).await })).await.unwrap();
        let again = t.store.write(move |tx| Box::pin(async move { tx.insert_reader_session(&grant("rs2", "n1")).await })).await;
        assert!(matches!(again, Err(StoreError::Conflict { .. })), "{again:?}");
        t.store.write(move |tx| Box::pin(async move { tx.insert_reader_session(&grant("rs3", "n2")).await })).await.unwrap();
    }

    async fn a_proof_is_recorded_only_for_a_live_session(t: TestStore) {
        with_device(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_token_session(&session("s1", None, "d1")).await.unwrap();
        tx.insert_token_session(&session("s1a", Some("s1"), "d1")).await.unwrap();
        tx.commit().await.unwrap();
        let record = |key: u8, sid: &'static str, sub: Option<&'static str>| {
            let store = t.store.clone();
            async move {
                store
                    .write_statement(move |tx| Box::pin(async move { tx.record_dpop_proof_if_live(&[key; 32], 100, sid, sub).await }))
                    .await
                    .unwrap()
            }
        };
        assert!(record(1, "s1", None).await);
        assert!(!record(1, "s1", None).await, "a replay records nothing");
        assert!(record(2, "s1", Some("s1a")).await);
        assert!(!record(3, "s1", Some("ghost")).await, "an unknown sub-session records nothing");
        assert!(!record(4, "ghost", None).await);
        let mut tx = t.store.begin().await.unwrap();
        tx.end_token_session("s1a", 200).await.unwrap();
        tx.commit().await.unwrap();
        assert!(!record(5, "s1", Some("s1a")).await, "an ended sub-session records nothing");
        assert!(record(6, "s1", None).await, "its session lives on");
        let mut tx = t.store.begin().await.unwrap();
        tx.set_device_status("d1", &[DeviceStatus::Active], DeviceStatus::Suspended, 300).await.unwrap();
        tx.commit().await.unwrap();
        assert!(!record(7, "s1", None).await, "a suspended device records nothing");
    }
}
