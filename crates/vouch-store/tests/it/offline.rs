use std::time::Duration;

use vouch_proto::enrol::DeviceKind;
use vouch_store::{
    Account, AccountKind, CloseRefusal, Consumer, OfflineCredentialRecord, OfflinePaymentRecord, SpendRefusal,
    StoreError,
};

use crate::conformance;
use crate::harness::TestStore;
use crate::registry::{device, merchant};

/// Credential `id` of phone `device_id`, limit 1,000, counters from `counter_start`.
fn credential(id: &str, device_id: &str, counter_start: i64) -> OfflineCredentialRecord {
    OfflineCredentialRecord {
        id: id.into(),
        device_id: device_id.into(),
        consumer_id: "c1".into(),
        reserve_account_id: "reserve".into(),
        public_key: vec![4; 65],
        limit_minor: 1_000,
        currency: "EUR".into(),
        counter_start,
        issued_at: 100,
        not_after: 1_000,
        revoked_at: None,
        settled_minor: 0,
        counter_end: None,
        closed_at: None,
        closed_spent_minor: None,
        closed_settled_minor: None,
        refreshed_from: None,
    }
}

fn payment(payment_id: &str, credential_id: &str, counter: i64, settled_at: i64) -> OfflinePaymentRecord {
    OfflinePaymentRecord {
        payment_id: payment_id.into(),
        credential_id: credential_id.into(),
        counter,
        nonce: format!("nonce-{payment_id}"),
        amount_minor: 100,
        currency: "EUR".into(),
        merchant_id: "m1".into(),
        terminal_id: "t1".into(),
        receipt: vec![0xd2, counter as u8],
        settled_at,
    }
}

/// Merchant `m1`; consumer `c1` with phones `d1` and `d2` and reserve account
/// `reserve`; credential `ocr1` of `d1`.
async fn with_credential(t: &TestStore) {
    let mut tx = t.store.begin().await.unwrap();
    tx.insert_merchant(&merchant("m1")).await.unwrap();
    tx.insert_consumer(&Consumer { id: "c1".into(), name: "Ada".into(), created_at: 1 }).await.unwrap();
    for (id, thumbprint) in [("d1", "t1"), ("d2", "t2")] {
        tx.insert_device(&vouch_store::Device { kind: DeviceKind::Consumer, ..device(id, "m1", thumbprint) })
            .await
            .unwrap();
    }
    let reserve = Account::consumer("reserve", AccountKind::ConsumerOfflineReserve, "c1", "reserve", "EUR", 1);
    tx.insert_account(&reserve).await.unwrap();
    tx.insert_offline_credential(&credential("ocr1", "d1", 0)).await.unwrap();
    tx.commit().await.unwrap();
}

/// Settles `payment` as settlement does: counted against its credential, then recorded.
async fn settle(t: &TestStore, payment: OfflinePaymentRecord) -> Result<(), SpendRefusal> {
    t.store
        .write(move |tx| {
            Box::pin(async move {
                let spent = tx.spend_offline_credential(&payment.credential_id, payment.counter, payment.amount_minor);
                if let Err(refusal) = spent.await? {
                    return Ok(Err(refusal));
                }
                tx.insert_offline_payments(&[&payment]).await?;
                Ok(Ok(()))
            })
        })
        .await
        .unwrap()
}

async fn close(
    t: &TestStore,
    id: &'static str,
    device_id: &'static str,
    counter_end: i64,
    spent_minor: i64,
) -> Result<vouch_store::ClosedCredential, CloseRefusal> {
    t.store
        .write(move |tx| {
            Box::pin(async move { tx.close_offline_credential(id, device_id, counter_end, spent_minor, 500).await })
        })
        .await
        .unwrap()
}

conformance! {
    async fn closing_lowers_the_limit_to_what_was_spent_and_ends_the_counters(t: TestStore) {
        with_credential(&t).await;
        settle(&t, payment("p1", "ocr1", 1, 200)).await.unwrap();
        let closed = close(&t, "ocr1", "d1", 5, 300).await.unwrap();
        assert_eq!(closed.released_minor, 700);
        let r = &closed.record;
        assert_eq!((r.limit_minor, r.settled_minor, r.counter_end, r.closed_at), (300, 100, Some(5), Some(500)));
        assert_eq!((r.closed_spent_minor, r.closed_settled_minor), (Some(300), Some(100)));
        assert_eq!(t.store.offline_credential("ocr1").await.unwrap(), closed.record);
        assert_eq!(close(&t, "ocr1", "d1", 6, 300).await.unwrap_err(), CloseRefusal::Closed);

        // Counters below the end settle up to the lowered limit; none at or above it.
        let refused = settle(&t, payment("p2", "ocr1", 5, 201)).await.unwrap_err();
        assert_eq!(refused, SpendRefusal::CounterClosed { counter_end: 5 });
        assert_eq!(refused.reason(), "counter-closed");
        settle(&t, payment("p3", "ocr1", 4, 202)).await.unwrap();
        settle(&t, payment("p4", "ocr1", 3, 203)).await.unwrap();
        let refused = settle(&t, payment("p5", "ocr1", 2, 204)).await.unwrap_err();
        assert_eq!((refused, refused.reason()), (SpendRefusal::OverLimit, "over-limit"));
        assert_eq!(t.store.offline_credential("ocr1").await.unwrap().settled_minor, 300);
        // What the close was asked with and found stays as it was.
        let r = t.store.offline_credential("ocr1").await.unwrap();
        assert_eq!((r.counter_end, r.closed_spent_minor, r.closed_settled_minor), (Some(5), Some(300), Some(100)));
    }

    async fn a_credential_refreshes_at_most_one_other_which_finds_it(t: TestStore) {
        with_credential(&t).await;
        close(&t, "ocr1", "d1", 3, 200).await.unwrap();
        let fresh = OfflineCredentialRecord { refreshed_from: Some("ocr1".into()), ..credential("ocr2", "d1", 1 << 32) };
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_offline_credential(&fresh).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(t.store.offline_credential_refreshed_from("ocr1").await.unwrap(), Some(fresh));
        assert_eq!(t.store.offline_credential_refreshed_from("ocr2").await.unwrap(), None);
        assert_eq!(t.store.offline_credential_refreshed_from("ocr9").await.unwrap(), None);

        let mut tx = t.store.begin().await.unwrap();
        let second = OfflineCredentialRecord { refreshed_from: Some("ocr1".into()), ..credential("ocr3", "d1", 2 << 32) };
        let refused = tx.insert_offline_credential(&second).await;
        assert!(matches!(refused, Err(StoreError::Conflict { .. })), "{refused:?}");
        drop(tx);
        let mut tx = t.store.begin().await.unwrap();
        let orphan = OfflineCredentialRecord { refreshed_from: Some("ocr9".into()), ..credential("ocr4", "d1", 3 << 32) };
        let refused = tx.insert_offline_credential(&orphan).await;
        assert!(matches!(refused, Err(StoreError::MissingReference { .. })), "{refused:?}");
    }

    async fn closing_never_goes_below_what_settled_nor_above_the_limit(t: TestStore) {
        with_credential(&t).await;
        settle(&t, payment("p1", "ocr1", 0, 200)).await.unwrap();
        settle(&t, payment("p2", "ocr1", 1, 200)).await.unwrap();
        let closed = close(&t, "ocr1", "d1", 2, 50).await.unwrap();
        assert_eq!((closed.record.limit_minor, closed.released_minor), (200, 800));

        let mut tx = t.store.begin().await.unwrap();
        tx.insert_offline_credential(&credential("ocr2", "d1", 1 << 32)).await.unwrap();
        tx.insert_offline_credential(&credential("ocr3", "d1", 2 << 32)).await.unwrap();
        tx.commit().await.unwrap();
        let closed = close(&t, "ocr2", "d1", 1 << 32, 5_000).await.unwrap();
        assert_eq!((closed.record.limit_minor, closed.released_minor), (1_000, 0));
        // Nothing spent, nothing settled: the whole limit is released.
        let closed = close(&t, "ocr3", "d1", 2 << 32, 0).await.unwrap();
        assert_eq!((closed.record.limit_minor, closed.released_minor), (0, 1_000));
        assert_eq!(settle(&t, payment("p3", "ocr3", 2 << 32, 201)).await, Err(SpendRefusal::CounterClosed { counter_end: 2 << 32 }));
    }

    async fn only_an_open_credential_of_the_phone_closes(t: TestStore) {
        with_credential(&t).await;
        assert_eq!(close(&t, "ocr1", "d2", 1, 0).await.unwrap_err(), CloseRefusal::Unknown);
        assert_eq!(close(&t, "ocr9", "d1", 1, 0).await.unwrap_err(), CloseRefusal::Unknown);
        settle(&t, payment("p1", "ocr1", 7, 200)).await.unwrap();
        let refused = close(&t, "ocr1", "d1", 7, 100).await.unwrap_err();
        assert_eq!(refused, CloseRefusal::CounterSpent { highest: 7 });
        let revoked = t.store.write(|tx| Box::pin(async move { tx.revoke_offline_credential("ocr1", 300).await }));
        assert!(revoked.await.unwrap());
        assert_eq!(close(&t, "ocr1", "d1", 8, 100).await.unwrap_err(), CloseRefusal::Revoked);
        let record = t.store.offline_credential("ocr1").await.unwrap();
        assert_eq!((record.limit_minor, record.counter_end, record.closed_at), (1_000, None, None));
    }

    async fn concurrent_closes_close_a_credential_once(t: TestStore) {
        with_credential(&t).await;
        let closes: Vec<_> = (0..8).map(|i| {
            let store = t.store.clone();
            tokio::spawn(async move {
                store
                    .write(move |tx| {
                        Box::pin(async move { tx.close_offline_credential("ocr1", "d1", 10 + i, 100, 500).await })
                    })
                    .await
                    .unwrap()
            })
        }).collect();
        let mut outcomes = Vec::new();
        for close in closes {
            outcomes.push(close.await.unwrap());
        }
        let closed: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(closed.len(), 1, "{outcomes:?}");
        assert_eq!(closed[0].released_minor, 900);
        assert!(outcomes.iter().filter_map(|o| o.as_ref().err()).all(|r| *r == CloseRefusal::Closed), "{outcomes:?}");
        assert_eq!(t.store.offline_credential("ocr1").await.unwrap(), closed[0].record);
    }

    async fn a_phone_s_credentials_never_share_a_counter_range(t: TestStore) {
        with_credential(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        let twin = tx.insert_offline_credential(&credential("ocr2", "d1", 0)).await;
        assert!(matches!(twin, Err(StoreError::Conflict { .. })), "{twin:?}");
        drop(tx);
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_offline_credential(&credential("ocr3", "d2", 0)).await.unwrap();
        assert_eq!(tx.next_counter_start("d1").await.unwrap(), 1 << 32);
        tx.commit().await.unwrap();
    }

    async fn receipts_of_a_phone_come_in_settlement_order_a_page_at_a_time(t: TestStore) {
        with_credential(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_offline_credential(&credential("ocr2", "d1", 1 << 32)).await.unwrap();
        tx.insert_offline_credential(&credential("ocr3", "d2", 0)).await.unwrap();
        for p in [
            payment("b", "ocr1", 1, 300),
            payment("a", "ocr2", 1 << 32, 300),
            payment("c", "ocr1", 2, 100),
            payment("d", "ocr3", 1, 200),
            payment("e", "ocr2", (1 << 32) + 1, 400),
        ] {
            tx.insert_offline_payments(&[&p]).await.unwrap();
        }
        tx.commit().await.unwrap();
        let ids = |page: &[OfflinePaymentRecord]| page.iter().map(|p| p.payment_id.clone()).collect::<Vec<_>>();
        let all = t.store.offline_payments_of_device("d1", None, 10).await.unwrap();
        assert_eq!(ids(&all), ["c", "a", "b", "e"]);
        assert_eq!(all[0], payment("c", "ocr1", 2, 100));
        let first = t.store.offline_payments_of_device("d1", None, 2).await.unwrap();
        assert_eq!(ids(&first), ["c", "a"]);
        let rest = t.store.offline_payments_of_device("d1", Some((300, "a")), 2).await.unwrap();
        assert_eq!(ids(&rest), ["b", "e"]);
        assert!(t.store.offline_payments_of_device("d1", Some((400, "e")), 2).await.unwrap().is_empty());
        assert_eq!(ids(&t.store.offline_payments_of_device("d2", None, 10).await.unwrap()), ["d"]);
        assert!(t.store.offline_payments_of_device("d9", None, 10).await.unwrap().is_empty());
    }
}

/// Credential `id` of phone `p1`, limit 1,000, the `index`-th counter range.
fn batch_credential(id: &str, index: i64) -> OfflineCredentialRecord {
    OfflineCredentialRecord { issued_at: 10, ..credential(id, "p1", index << 32) }
}

fn batch_payment(id: &str, credential_id: &str, counter: i64, nonce: &str) -> OfflinePaymentRecord {
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
    for (index, id) in ["ocr_a", "ocr_b"].into_iter().enumerate() {
        tx.insert_offline_credential(&batch_credential(id, index as i64)).await.unwrap();
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
        assert_eq!(read, [batch_credential("ocr_a", 0), batch_credential("ocr_b", 1)]);
        let mut tx = t.store.begin().await.unwrap();
        tx.spend_offline_credential("ocr_b", 1 << 32, 300).await.unwrap().unwrap();
        let locked = tx.lock_offline_credentials(&ids).await.unwrap();
        let seen: Vec<(&str, i64)> = locked.iter().map(|l| (l.id.as_str(), l.settled_minor)).collect();
        assert_eq!(seen, [("ocr_a", 0), ("ocr_b", 300)]);
        assert!(tx.lock_offline_credentials(&[]).await.unwrap().is_empty());
    }

    async fn a_spend_stays_within_the_limit_of_a_credential_not_revoked(t: TestStore) {
        with_credentials(&t).await;
        let mut tx = t.store.begin().await.unwrap();
        tx.spend_offline_credential("ocr_a", 1, 600).await.unwrap().unwrap();
        tx.spend_offline_credential("ocr_b", 1 << 32, 1_000).await.unwrap().unwrap();
        // 401 does not fit what is left of ocr_a; ocr_b is full; an unknown id spends nothing.
        for (id, counter, amount) in [("ocr_a", 2, 401), ("ocr_b", (1 << 32) + 1, 1), ("ocr_nope", 1, 1)] {
            let refused = tx.spend_offline_credential(id, counter, amount).await.unwrap();
            assert_eq!(refused, Err(SpendRefusal::OverLimit), "{id}");
        }
        assert!(tx.revoke_offline_credential("ocr_a", 60).await.unwrap());
        assert_eq!(tx.spend_offline_credential("ocr_a", 3, 1).await.unwrap(), Err(SpendRefusal::OverLimit), "revoked");
        let locked = tx.lock_offline_credentials(&["ocr_a", "ocr_b"]).await.unwrap();
        let seen: Vec<i64> = locked.iter().map(|l| l.settled_minor).collect();
        assert_eq!(seen, [600, 1_000]);
    }

    async fn an_insert_skips_each_payment_that_collides(t: TestStore) {
        with_credentials(&t).await;
        assert_eq!(insert(&t, vec![batch_payment("p1", "ocr_a", 1, "n1")]).await, ["p1"]);
        let batch = vec![
            batch_payment("p2", "ocr_a", 2, "n2"),
            // The same id, the same credential and counter, the same nonce.
            batch_payment("p1", "ocr_b", 7, "n7"),
            batch_payment("p3", "ocr_a", 1, "n3"),
            batch_payment("p4", "ocr_b", 4, "n1"),
            batch_payment("p5", "ocr_b", 1, "n5"),
        ];
        assert_eq!(insert(&t, batch.clone()).await, ["p2", "p5"]);
        // Each stored payment a batch collides with comes back once.
        assert_eq!(colliding(&t, batch).await, ["p1", "p2", "p5"]);
        assert_eq!(colliding(&t, vec![batch_payment("p9", "ocr_a", 9, "n9")]).await, Vec::<String>::new());
        assert!(insert(&t, Vec::new()).await.is_empty());
    }

    async fn settlements_over_one_credential_take_turns(t: TestStore) {
        with_credentials(&t).await;
        let mut first = t.store.begin().await.unwrap();
        first.lock_offline_credentials(&["ocr_a"]).await.unwrap();
        first.insert_offline_payments(&[&batch_payment("p1", "ocr_a", 1, "n1")]).await.unwrap();
        let store = t.store.clone();
        // A second settlement of another approval under the same counter.
        let second = tokio::spawn(async move {
            let mut tx = store.begin().await.unwrap();
            tx.lock_offline_credentials(&["ocr_a"]).await.unwrap();
            let seen = tx.offline_payments_colliding(&[&batch_payment("p2", "ocr_a", 1, "n2")]).await.unwrap();
            seen.into_iter().map(|p| p.payment_id).collect::<Vec<_>>()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!second.is_finished(), "the second settlement waits for the first");
        first.commit().await.unwrap();
        assert_eq!(second.await.unwrap(), ["p1"], "and then sees the first's payment");
    }
}
