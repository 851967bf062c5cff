use vouch_store::{ApiKeyRecord, NonceRejection, SigningKeyRecord, StoreError};

use crate::conformance;
use crate::harness::TestStore;

fn signing_key(kid: &str, created_at: i64) -> SigningKeyRecord {
    SigningKeyRecord {
        kid: kid.into(),
        sealed_pkcs8: vec![1, 2, 3],
        public_jwk: format!("{{\"kid\":\"{kid}\"}}"),
        created_at,
        retired_at: None,
        publish_until: None,
    }
}

conformance! {
    async fn nonce_is_single_use(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_enrolment_nonce("n1", 100).await.unwrap();
        tx.insert_enrolment_nonce("n2", 100).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = t.store.begin().await.unwrap();
        assert_eq!(tx.consume_enrolment_nonce("n1", 50).await.unwrap(), Ok(()));
        assert_eq!(tx.consume_enrolment_nonce("n1", 51).await.unwrap(), Err(NonceRejection::AlreadyUsed));
        assert_eq!(tx.consume_enrolment_nonce("n2", 101).await.unwrap(), Err(NonceRejection::Expired));
        assert_eq!(tx.consume_enrolment_nonce("n3", 50).await.unwrap(), Err(NonceRejection::Unknown));
        assert_eq!(tx.purge_enrolment_nonces(200).await.unwrap(), 2);
    }

    async fn racing_consumers_of_one_nonce_have_one_winner(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_enrolment_nonce("n1", 100).await.unwrap();
        tx.commit().await.unwrap();
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let store = t.store.clone();
                tokio::spawn(async move {
                    let mut tx = store.begin().await.unwrap();
                    let outcome = tx.consume_enrolment_nonce("n1", 50).await.unwrap();
                    tx.commit().await.unwrap();
                    outcome
                })
            })
            .collect();
        let mut winners = 0;
        for racer in racers {
            if racer.await.unwrap().is_ok() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);
    }

    async fn api_keys(t: TestStore) {
        let key = ApiKeyRecord { id: "k1".into(), secret_hash: vec![9; 32], scopes: "admin".into(), label: "bootstrap".into(), created_at: 1, revoked_at: None };
        let mut tx = t.store.begin().await.unwrap();
        assert_eq!(tx.count_api_keys().await.unwrap(), 0);
        tx.insert_api_key(&key).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = t.store.begin().await.unwrap();
        assert!(matches!(tx.insert_api_key(&key).await, Err(StoreError::Conflict { .. })));
        drop(tx);
        assert_eq!(t.store.api_key("k1").await.unwrap(), key);
        let mut tx = t.store.begin().await.unwrap();
        tx.revoke_api_key("k1", 7).await.unwrap();
        assert!(matches!(tx.revoke_api_key("k1", 8).await, Err(StoreError::NotFound { .. })));
        tx.commit().await.unwrap();
        assert_eq!(t.store.api_key("k1").await.unwrap().revoked_at, Some(7));
    }

    async fn rotation_keeps_old_keys_published_for_their_overlap(t: TestStore) {
        let mut tx = t.store.begin().await.unwrap();
        tx.rotate_signing_key(&signing_key("k1", 100), 0).await.unwrap();
        tx.rotate_signing_key(&signing_key("k2", 200), 500).await.unwrap();
        tx.commit().await.unwrap();
        let published = t.store.published_signing_keys(300).await.unwrap();
        assert_eq!(published.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(), ["k2", "k1"]);
        assert_eq!(published[0].retired_at, None);
        assert_eq!((published[1].retired_at, published[1].publish_until), (Some(200), Some(500)));
        let later = t.store.published_signing_keys(501).await.unwrap();
        assert_eq!(later.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(), ["k2"]);
    }
}
