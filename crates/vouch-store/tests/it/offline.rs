use std::time::Duration;

use vouch_store::{Account, AccountKind, Consumer, OfflineCredentialRecord, OfflinePaymentRecord};

use crate::conformance;
use crate::harness::TestStore;
use crate::registry::{device, merchant};

fn credential(id: &str) -> OfflineCredentialRecord {
    OfflineCredentialRecord {
        id: id.into(),
        device_id: "p1".into(),
        consumer_id: "c1".into(),
        reserve_account_id: "reserve".into(),
        public_key: vec![4; 65],
        limit_minor: 1_000,
        currency: "EUR".into(),
        counter_start: 0,
        issued_at: 10,
        not_after: 1_000,
        revoked_at: None,
    }
}

fn payment(id: &str, credential_id: &str, counter: i64, nonce: &str) -> OfflinePaymentRecord {
    OfflinePaymentRecord {
        payment_id: id.into(),
        credential_id: credential_id.into(),
        counter,
        nonce: nonce.into(),
        amount_minor: 100,
        currency: "EUR".into(),
        merchant_id: "m1".into(),
        terminal_id: "dev_t".into(),
        receipt: format!("receipt of {id}").into_bytes(),
        settled_at: 50,
    }
}

/// Merchant `m1`, consumer `c1` with phone `p1`, reserve account `reserve`, and
/// credentials `ocr_a` and `ocr_b`.
async fn with_credentials(t: &TestStore) {
    let mut tx = t.store.begin().await.unwrap();
    tx.insert_merchant(&merchant("m1")).await.unwrap();
    tx.insert_device(&device("p1", "m1", "thumb-p1")).await.unwrap();
    tx.insert_consumer(&Consumer { id: "c1".into(), name: "Ada".into(), created_at: 1 }).await.unwrap();
    let reserve = Account::consumer("reserve", AccountKind::ConsumerOfflineReserve, "c1", "reserve", "EUR", 1);
    tx.insert_account(&reserve).await.unwrap();
    for id in ["ocr_a", "ocr_b"] {
        tx.insert_offline_credential(&credential(id)).await.unwrap();
    }
    tx.commit().await.unwrap();
}

async fn insert(t: &TestStore, payments: Vec<OfflinePaymentRecord>) -> Vec<String> {
    t.store
        .write(move |tx| {
            Box::pin(async move {
                let payments: Vec<&OfflinePaymentRecord> = payments.iter().collect();
                tx.insert_offline_payments(&payments).await
            })
        })
        .await
        .unwrap()
}

async fn colliding(t: &TestStore, payments: Vec<OfflinePaymentRecord>) -> Vec<String> {
    let mut tx = t.store.begin().await.unwrap();
    let payments: Vec<&OfflinePaymentRecord> = payments.iter().collect();
    let mut ids: Vec<String> =
        tx.offline_payments_colliding(&payments).await.unwrap().into_iter().map(|p| p.payment_id).collect();
    ids.sort();
    ids
}

conformance! {
    async fn credentials_are_read_and_locked_in_id_order(t: TestStore) {
        with_credentials(&t).await;
        let ids = ["ocr_b", "ocr_nope", "ocr_a", "ocr_b"];
        let read = t.store.offline_credentials(&ids).await.unwrap();
        assert_eq!(read, [credential("ocr_a"), credential("ocr_b")]);
        let mut tx = t.store.begin().await.unwrap();
        assert_eq!(tx.spend_offline_credentials(&[("ocr_b", 300)]).await.unwrap(), 1);
        let locked = tx.lock_offline_credentials(&ids).await.unwrap();
        let seen: Vec<(&str, i64)> = locked.iter().map(|l| (l.record.id.as_str(), l.settled_minor)).collect();
        assert_eq!(seen, [("ocr_a", 0), ("ocr_b", 300)]);
        assert!(tx.lock_offline_credentials(&[]).await.unwrap().is_empty());
    }

    async fn a_spend_stays_within_the_limit_of_a_credential_not_revoked(t: TestStore) {
        with_credentials(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        assert_eq!(tx.spend_offline_credentials(&[("ocr_a", 600), ("ocr_b", 1_000)]).await.unwrap(), 2);
        // 401 does not fit what is left of ocr_a; ocr_b is full; the unknown id is skipped.
        let spends = [("ocr_a", 401), ("ocr_b", 1), ("ocr_nope", 1)];
        assert_eq!(tx.spend_offline_credentials(&spends).await.unwrap(), 0);
        assert!(tx.revoke_offline_credential("ocr_a", 60).await.unwrap());
        assert_eq!(tx.spend_offline_credentials(&[("ocr_a", 1)]).await.unwrap(), 0, "revoked");
        let locked = tx.lock_offline_credentials(&["ocr_a", "ocr_b"]).await.unwrap();
        let seen: Vec<i64> = locked.iter().map(|l| l.settled_minor).collect();
        assert_eq!(seen, [600, 1_000]);
    }

    async fn an_insert_skips_each_payment_that_collides(t: TestStore) {
        with_credentials(&t).await;
        assert_eq!(insert(&t, vec![payment("p1", "ocr_a", 1, "n1")]).await, ["p1"]);
        let batch = vec![
            payment("p2", "ocr_a", 2, "n2"),
            // The same id, the same credential and counter, the same nonce.
            payment("p1", "ocr_b", 7, "n7"),
            payment("p3", "ocr_a", 1, "n3"),
            payment("p4", "ocr_b", 4, "n1"),
            payment("p5", "ocr_b", 1, "n5"),
        ];
        assert_eq!(insert(&t, batch.clone()).await, ["p2", "p5"]);
        // Each stored payment a batch collides with comes back once.
        assert_eq!(colliding(&t, batch).await, ["p1", "p2", "p5"]);
        assert_eq!(colliding(&t, vec![payment("p9", "ocr_a", 9, "n9")]).await, Vec::<String>::new());
        assert!(insert(&t, Vec::new()).await.is_empty());
    }

    async fn settlements_over_one_credential_take_turns(t: TestStore) {
        with_credentials(&t).await;
        let mut first = t.store.begin().await.unwrap();
        first.lock_offline_credentials(&["ocr_a"]).await.unwrap();
        first.insert_offline_payments(&[&payment("p1", "ocr_a", 1, "n1")]).await.unwrap();
        let store = t.store.clone();
        // A second settlement of another approval under the same counter.
        let second = tokio::spawn(async move {
            let mut tx = store.begin().await.unwrap();
            tx.lock_offline_credentials(&["ocr_a"]).await.unwrap();
            let seen = tx.offline_payments_colliding(&[&payment("p2", "ocr_a", 1, "n2")]).await.unwrap();
            seen.into_iter().map(|p| p.payment_id).collect::<Vec<_>>()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!second.is_finished(), "the second settlement waits for the first");
        first.commit().await.unwrap();
        assert_eq!(second.await.unwrap(), ["p1"], "and then sees the first's payment");
    }
}
