use vouch_store::{
    ApiKeyRecord, AuditEntry, AuthorizationRecord, Consumer, DvvRecord, IssueRefusal, Merchant, PaymentAccount,
    StoreError, Terminal,
};

use crate::conformance;
use crate::harness::TestStore;
use crate::registry::{device, merchant};

fn value(id: &str, account: &str, device_id: &str, issued_at: i64, max_uses: i64) -> DvvRecord {
    DvvRecord {
        id: id.into(),
        payment_account_id: account.into(),
        device_id: device_id.into(),
        ticket_id: "tkt".into(),
        value_hash: vec![id.len() as u8; 32],
        assurance: 3,
        merchant_category: None,
        amount_limit_minor: 10_000,
        max_uses,
        uses: 0,
        issued_at,
        expires_at: issued_at + 300,
        superseded_at: None,
    }
}

fn authorization(id: &str, stan: &str, code: &str) -> AuthorizationRecord {
    AuthorizationRecord {
        id: id.into(),
        terminal_id: "term1".into(),
        stan: stan.into(),
        transmission_time: "1124103000".into(),
        request_hash: vec![1; 32],
        payment_account_id: Some("pac1".into()),
        dvv_id: None,
        amount_minor: 1250,
        currency: "978".into(),
        entry_mode: "071".into(),
        response_code: code.into(),
        reason: "approved".into(),
        authorization_code: Some("A1B2C3".into()),
        retrieval_reference: "000000000001".into(),
        channel: "http".into(),
        created_at: 100,
    }
}

/// A merchant with a terminal, a consumer with phone `d1` and account `pac1`.
async fn with_parties(t: &TestStore) {
    let mut tx = t.store.begin().await.unwrap();
    let shop = Merchant {
        card_acceptor_id: Some("SHOP00000000001".into()),
        merchant_category: Some("5411".into()),
        ..merchant("m1")
    };
    tx.insert_merchant(&shop).await.unwrap();
    tx.insert_device(&device("d1", "m1", "t1")).await.unwrap();
    let key = ApiKeyRecord {
        id: "k1".into(),
        secret_hash: vec![9; 32],
        scopes: "terminal".into(),
        label: "terminal".into(),
        created_at: 1,
        revoked_at: None,
    };
    tx.insert_api_key(&key).await.unwrap();
    let terminal = Terminal {
        id: "term1".into(),
        merchant_id: "m1".into(),
        iso_terminal_id: "TERM0001".into(),
        api_key_id: "k1".into(),
        created_at: 1,
    };
    tx.insert_terminal(&terminal).await.unwrap();
    tx.insert_consumer(&Consumer { id: "c1".into(), name: "Ada".into(), created_at: 1 }).await.unwrap();
    tx.link_consumer_device("d1", "c1", 1).await.unwrap();
    let account = PaymentAccount {
        id: "pac1".into(),
        consumer_id: "c1".into(),
        ref_hash: vec![5; 32],
        ref_last4: "3478".into(),
        wrong_dvv_tries: 0,
        locked_at: None,
        created_at: 1,
    };
    tx.insert_payment_account(&account).await.unwrap();
    tx.commit().await.unwrap();
}

conformance! {
    async fn parties_are_found_by_their_keys_and_iso_ids(t: TestStore) {
        with_parties(&t).await;
        let (terminal, shop) = t.store.terminal_by_api_key("k1").await.unwrap().unwrap();
        assert_eq!((terminal.id.as_str(), shop.card_acceptor_id.as_deref()), ("term1", Some("SHOP00000000001")));
        let (by_iso, _) = t.store.terminal_by_iso_ids("SHOP00000000001", "TERM0001").await.unwrap().unwrap();
        assert_eq!(by_iso, terminal);
        assert!(t.store.terminal_by_iso_ids("SHOP00000000001", "TERM0002").await.unwrap().is_none());
        assert_eq!(t.store.consumer_of_device("d1").await.unwrap().as_deref(), Some("c1"));
        assert_eq!(t.store.payment_account_by_ref_hash(&[5; 32]).await.unwrap().unwrap().id, "pac1");
        let mut tx = t.store.begin().await.unwrap();
        assert!(matches!(tx.link_consumer_device("d1", "c1", 2).await, Err(StoreError::Conflict { .. })));
    }

    async fn a_value_gives_exactly_its_uses_to_racing_requests(t: TestStore) {
        with_parties(&t).await;
        t.store.write(|tx| Box::pin(async move { tx.issue_dvv(&value("v1", "pac1", "d1", 100, 3), 0, 10).await })).await.unwrap().unwrap();
        let racers: Vec<_> = (0..12)
            .map(|_| {
                let store = t.store.clone();
                tokio::spawn(async move { store.write(|tx| Box::pin(async move { tx.take_dvv_use("v1", 150).await })).await.unwrap() })
            })
            .collect();
        let mut taken = 0;
        for racer in racers {
            taken += usize::from(racer.await.unwrap());
        }
        assert_eq!(taken, 3);
        assert_eq!(t.store.dvv("v1").await.unwrap().uses, 3);
    }

    async fn an_expired_or_superseded_value_gives_no_use(t: TestStore) {
        with_parties(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        tx.issue_dvv(&value("v1", "pac1", "d1", 100, 5), 0, 10).await.unwrap().unwrap();
        assert!(!tx.take_dvv_use("v1", 400).await.unwrap(), "expires_at is 400: not valid at 400");
        assert!(tx.take_dvv_use("v1", 399).await.unwrap());
        tx.issue_dvv(&value("v22", "pac1", "d1", 200, 5), 0, 10).await.unwrap().unwrap();
        assert!(!tx.take_dvv_use("v1", 201).await.unwrap(), "superseded by v22");
        assert!(tx.take_dvv_use("v22", 201).await.unwrap());
        tx.commit().await.unwrap();
        let (account, recent) = t.store.account_with_dvvs(&[5; 32], 0).await.unwrap().unwrap();
        assert_eq!(account.id, "pac1");
        assert_eq!(recent.iter().map(|(d, _)| d.id.as_str()).collect::<Vec<_>>(), ["v22", "v1"]);
        assert_eq!(recent[1].0.superseded_at, Some(200));
        assert!(recent.iter().all(|(_, phone_active)| *phone_active));
        let (_, older) = t.store.account_with_dvvs(&[5; 32], 150).await.unwrap().unwrap();
        assert_eq!(older.len(), 1, "only values issued after `since`");
        let (_, none) = t.store.account_with_dvvs(&[5; 32], 1_000).await.unwrap().unwrap();
        assert!(none.is_empty(), "an account without values is still found");
        assert!(t.store.account_with_dvvs(&[6; 32], 0).await.unwrap().is_none());
    }

    async fn issuing_is_limited_per_phone_and_window(t: TestStore) {
        with_parties(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        for i in 0..3 {
            tx.issue_dvv(&value(&format!("v{i}"), "pac1", "d1", 100 + i, 1), 50, 3).await.unwrap().unwrap();
        }
        assert_eq!(
            tx.issue_dvv(&value("v9", "pac1", "d1", 110, 1), 50, 3).await.unwrap(),
            Err(IssueRefusal::TooManyRequests { limit: 3 })
        );
        tx.issue_dvv(&value("v9", "pac1", "d1", 110, 1), 105, 3).await.unwrap().unwrap();
    }

    async fn wrong_values_lock_the_account_until_a_new_issue(t: TestStore) {
        with_parties(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        assert!(!tx.count_wrong_dvv("pac1", 3, 10).await.unwrap());
        assert!(!tx.count_wrong_dvv("pac1", 3, 11).await.unwrap());
        tx.clear_wrong_dvvs("pac1").await.unwrap();
        for _ in 0..2 {
            assert!(!tx.count_wrong_dvv("pac1", 3, 12).await.unwrap());
        }
        assert!(tx.count_wrong_dvv("pac1", 3, 13).await.unwrap());
        assert!(tx.count_wrong_dvv("pac1", 3, 14).await.unwrap());
        tx.commit().await.unwrap();
        let account = t.store.payment_account_by_ref_hash(&[5; 32]).await.unwrap().unwrap();
        assert_eq!((account.wrong_dvv_tries, account.locked_at), (4, Some(13)));
        let mut tx = t.store.begin().await.unwrap();
        assert!(matches!(tx.count_wrong_dvv("nope", 3, 1).await, Err(StoreError::NotFound { .. })));
        drop(tx);
        t.store.write(|tx| Box::pin(async move { tx.issue_dvv(&value("v1", "pac1", "d1", 100, 1), 0, 10).await })).await.unwrap().unwrap();
        let account = t.store.payment_account_by_ref_hash(&[5; 32]).await.unwrap().unwrap();
        assert_eq!((account.wrong_dvv_tries, account.locked_at), (0, None));
    }

    async fn a_retry_key_holds_one_answer(t: TestStore) {
        with_parties(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_authorization(&authorization("auth1", "000001", "00")).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = t.store.begin().await.unwrap();
        assert!(matches!(tx.insert_authorization(&authorization("auth2", "000001", "05")).await, Err(StoreError::Conflict { .. })));
        drop(tx);
        let first = t.store.authorization_by_key("term1", "000001", "1124103000").await.unwrap().unwrap();
        assert_eq!(first, authorization("auth1", "000001", "00"));
        assert!(t.store.authorization_by_key("term1", "000002", "1124103000").await.unwrap().is_none());
        assert_eq!(t.store.authorization("auth1").await.unwrap(), first);
    }

    async fn approvals_take_a_use_each_and_the_rest_are_used_up(t: TestStore) {
        with_parties(&t).await;
        t.store.write(|tx| Box::pin(async move { tx.issue_dvv(&value("v1", "pac1", "d1", 100, 3), 0, 10).await })).await.unwrap().unwrap();
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let store = t.store.clone();
                tokio::spawn(async move {
                    let approved = AuthorizationRecord { dvv_id: Some("v1".into()), ..authorization(&format!("auth{i}"), &format!("{i:06}"), "00") };
                    let entry = AuditEntry { at: 150, actor: "terminal:term1".into(), action: "authorization.decided".into(), subject: approved.id.clone(), detail: "{\"ok\":true}".into() };
                    store
                        .write_statement(move |tx| {
                            Box::pin(async move { tx.record_approval("v1", 150, &approved, ("54", "dvv-used-up"), &entry, "{\"ok\":false}").await })
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut taken = 0;
        for racer in racers {
            taken += usize::from(racer.await.unwrap());
        }
        assert_eq!(taken, 3);
        assert_eq!(t.store.dvv("v1").await.unwrap().uses, 3);
        let mut codes = Vec::new();
        for i in 0..8 {
            let record = t.store.authorization(&format!("auth{i}")).await.unwrap();
            assert_eq!(record.authorization_code.is_some(), record.response_code == "00", "{record:?}");
            codes.push(record.response_code);
        }
        codes.sort();
        assert_eq!(codes, ["00", "00", "00", "54", "54", "54", "54", "54"]);
        let audited = t.store.audit_records(0, 100).await.unwrap();
        let declined = audited.iter().filter(|r| r.entry.detail == "{\"ok\":false}").count();
        assert_eq!((audited.len(), declined), (8, 5), "one entry per decision, saying which");
    }

    async fn an_approval_under_a_used_retry_key_changes_nothing(t: TestStore) {
        with_parties(&t).await;
        t.store.write(|tx| Box::pin(async move { tx.issue_dvv(&value("v1", "pac1", "d1", 100, 3), 0, 10).await })).await.unwrap().unwrap();
        t.store.write(|tx| Box::pin(async move { tx.insert_authorization(&authorization("first", "000001", "05")).await })).await.unwrap();
        let again = AuthorizationRecord { dvv_id: Some("v1".into()), ..authorization("again", "000001", "00") };
        let entry = AuditEntry { at: 150, actor: "t".into(), action: "a".into(), subject: "again".into(), detail: "{}".into() };
        let refused = t
            .store
            .write_statement(move |tx| Box::pin(async move { tx.record_approval("v1", 150, &again, ("54", "x"), &entry, "{}").await }))
            .await;
        assert!(matches!(refused, Err(StoreError::Conflict { .. })), "{refused:?}");
        assert_eq!(t.store.dvv("v1").await.unwrap().uses, 0, "no use taken");
        assert!(t.store.audit_records(0, 10).await.unwrap().is_empty(), "nothing audited");
        assert!(matches!(t.store.authorization("again").await, Err(StoreError::NotFound { .. })));
    }

    async fn a_live_value_of_another_account_is_found(t: TestStore) {
        with_parties(&t).await;
        t.store.write(|tx| Box::pin(async move { tx.issue_dvv(&value("v1", "pac1", "d1", 100, 1), 0, 10).await })).await.unwrap().unwrap();
        let hash = vec![2; 32];
        assert_eq!(t.store.live_dvv_elsewhere(&hash, "pac2", 150).await.unwrap().as_deref(), Some("pac1"));
        assert!(t.store.live_dvv_elsewhere(&hash, "pac1", 150).await.unwrap().is_none());
        assert!(t.store.live_dvv_elsewhere(&hash, "pac2", 400).await.unwrap().is_none());
    }
}
