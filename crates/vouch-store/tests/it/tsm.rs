use std::collections::HashSet;
use std::time::Duration;

use vouch_store::{
    DeliveryOutcome, OUTBOX_BATCH_MAX, OutboxCounts, OutboxFilter, OutboxMessage, OutboxStatus, ServiceProvider,
    StoreError, TsmIssuer, TsmManifest, TsmRegistration,
};

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

fn message(id: &str, device_id: &str, counter: i64, created_at: i64) -> OutboxMessage {
    OutboxMessage {
        id: id.into(),
        provider_id: "sp1".into(),
        device_id: device_id.into(),
        counter,
        envelope_hash: vec![counter as u8; 32],
        enc: vec![4; 65],
        ciphertext: format!("sealed {id}").into_bytes(),
        status: OutboxStatus::Pending,
        attempts: 0,
        next_attempt_at: created_at,
        last_error: None,
        created_at,
        delivered_at: None,
    }
}

/// [`with_devices`], providers `sp1` and `sp2`, and `d1` and `d2` registered as
/// `reg1` and `reg2`.
async fn with_registrations(t: &TestStore) {
    with_devices(t).await;
    let mut tx = t.store.begin().await.unwrap();
    for id in ["sp1", "sp2"] {
        let provider = ServiceProvider {
            id: id.into(),
            name: format!("Provider {id}"),
            endpoint: format!("https://{id}.example/relay"),
            public_jwk: "{}".into(),
            created_at: 1,
        };
        tx.insert_service_provider(&provider).await.unwrap();
    }
    tx.upsert_tsm_registration(&registration("d1", "reg1", 10)).await.unwrap();
    tx.upsert_tsm_registration(&registration("d2", "reg2", 10)).await.unwrap();
    tx.commit().await.unwrap();
}

/// Queues `message` as the request path does, in a write of its own.
async fn queue(t: &TestStore, message: OutboxMessage) -> Result<bool, StoreError> {
    t.store.write(move |tx| Box::pin(async move { tx.insert_outbox_message(&message).await })).await
}

/// An operator's requeue, as the server makes it: inside a write.
async fn retry(t: &TestStore, id: &'static str, now: i64) -> bool {
    t.store.write(move |tx| Box::pin(async move { tx.retry_outbox(id, now).await })).await.unwrap()
}

async fn queue_all(t: &TestStore, messages: Vec<OutboxMessage>) {
    let mut tx = t.store.begin().await.unwrap();
    for message in &messages {
        assert!(tx.insert_outbox_message(message).await.unwrap(), "{}", message.id);
    }
    tx.commit().await.unwrap();
}

fn ids(messages: &[OutboxMessage]) -> Vec<&str> {
    messages.iter().map(|m| m.id.as_str()).collect()
}

fn delivered(id: &str, at: i64) -> (String, DeliveryOutcome) {
    (id.into(), DeliveryOutcome::Delivered { at })
}

conformance! {
    async fn a_message_is_queued_once_per_registration_and_counter(t: TestStore) {
        with_registrations(&t).await;
        assert!(queue(&t, message("m1", "d1", 1, 100)).await.unwrap());
        assert!(!queue(&t, message("m2", "d1", 1, 101)).await.unwrap(), "the same counter again");
        assert!(queue(&t, message("m3", "d1", 2, 102)).await.unwrap());
        assert!(queue(&t, message("m4", "d2", 1, 103)).await.unwrap(), "another device's counter");
        assert_eq!(t.store.outbox_message("m1").await.unwrap(), Some(message("m1", "d1", 1, 100)));
        assert_eq!(t.store.outbox_message("m2").await.unwrap(), None);
        assert_eq!(t.store.outbox_message_at("d1", 1).await.unwrap(), Some(message("m1", "d1", 1, 100)));
        assert_eq!(t.store.outbox_message_at("d2", 1).await.unwrap().unwrap().id, "m4");
        assert_eq!(t.store.outbox_message_at("d1", 3).await.unwrap(), None);
        let mut tx = t.store.begin().await.unwrap();
        assert_eq!(tx.outbox_message_at("d1", 2).await.unwrap().unwrap().id, "m3");
        drop(tx);

        // Provisioned again, the device counts from the start.
        register(&t, registration("d1", "reg1b", 200)).await;
        assert_eq!(t.store.outbox_message_at("d1", 1).await.unwrap(), None);
        assert!(queue(&t, message("m5", "d1", 1, 201)).await.unwrap());
        assert_eq!(t.store.outbox_message_at("d1", 1).await.unwrap().unwrap().id, "m5");
        assert_eq!(t.store.outbox_message("m1").await.unwrap().unwrap().counter, 1, "earlier messages stay");

        let mut tx = t.store.begin().await.unwrap();
        tx.insert_device(&device("d3", "m1", "t3")).await.unwrap();
        tx.commit().await.unwrap();
        let unregistered = queue(&t, message("m6", "d3", 1, 300)).await;
        assert!(matches!(unregistered, Err(StoreError::MissingReference { missing: "TSM registration", .. })), "{unregistered:?}");
        let unknown_provider = queue(&t, OutboxMessage { provider_id: "sp9".into(), ..message("m7", "d1", 2, 300) }).await;
        assert!(matches!(unknown_provider, Err(StoreError::MissingReference { .. })), "{unknown_provider:?}");
        assert!(queue(&t, message("m8", "d1", 0, 300)).await.is_err(), "counters start at 1");
    }

    async fn a_lease_holds_a_message_until_it_ends_and_only_its_outcome_applies(t: TestStore) {
        with_registrations(&t).await;
        let mut later = message("m3", "d1", 3, 100);
        later.next_attempt_at = 200;
        queue_all(&t, vec![message("m2", "d1", 2, 100), message("m1", "d1", 1, 100), later]).await;

        let claimed = t.store.claim_outbox(150, 30, 10, "lease-a").await.unwrap();
        assert_eq!(ids(&claimed), ["m1", "m2"], "the due ones, earliest first");
        assert!(claimed.iter().all(|m| m.attempts == 1 && m.status == OutboxStatus::Pending));
        assert!(t.store.claim_outbox(170, 30, 10, "lease-b").await.unwrap().is_empty());
        assert!(t.store.claim_outbox(180, 30, 10, "lease-b").await.unwrap().is_empty(), "the lease lasts to its end");

        // Lease a ended at 180; b takes one message over.
        let taken = t.store.claim_outbox(181, 30, 1, "lease-b").await.unwrap();
        assert_eq!((ids(&taken), taken[0].attempts), (vec!["m1"], 2));
        let retry = DeliveryOutcome::Retry { next_attempt_at: 300, error: "503 Service Unavailable".into() };
        let applied = t.store.record_deliveries("lease-a", &[delivered("m1", 185), ("m2".into(), retry)]).await.unwrap();
        assert_eq!(applied, 1, "m1 is b's now");
        let m1 = t.store.outbox_message("m1").await.unwrap().unwrap();
        assert_eq!((m1.status, m1.delivered_at), (OutboxStatus::Pending, None));
        let m2 = t.store.outbox_message("m2").await.unwrap().unwrap();
        assert_eq!((m2.next_attempt_at, m2.last_error.as_deref()), (300, Some("503 Service Unavailable")));

        // Of two outcomes for one message the first counts.
        let outcomes = [delivered("m1", 190), ("m1".into(), DeliveryOutcome::Dead { error: "gone".into() })];
        assert_eq!(t.store.record_deliveries("lease-b", &outcomes).await.unwrap(), 1);
        let m1 = t.store.outbox_message("m1").await.unwrap().unwrap();
        assert_eq!((m1.status, m1.delivered_at, m1.attempts), (OutboxStatus::Delivered, Some(190), 2));
        assert_eq!(t.store.record_deliveries("lease-b", &[delivered("m1", 191)]).await.unwrap(), 0, "the lease ended");
        assert_eq!(t.store.record_deliveries("lease-b", &[]).await.unwrap(), 0);

        // m2 is due again at 300, m3 since 200.
        assert_eq!(ids(&t.store.claim_outbox(299, 30, 10, "lease-c").await.unwrap()), ["m3"]);
        let again = t.store.claim_outbox(300, 30, 10, "lease-c").await.unwrap();
        assert_eq!((ids(&again), again[0].attempts), (vec!["m2"], 2));
        assert!(t.store.claim_outbox(1_000, 30, 0, "lease-d").await.unwrap().is_empty());

        let too_many: Vec<_> = (0..=OUTBOX_BATCH_MAX).map(|i| delivered(&format!("m{i}"), 1)).collect();
        let refused = t.store.record_deliveries("lease-c", &too_many).await;
        assert!(matches!(refused, Err(StoreError::TooMany { .. })), "{refused:?}");
    }

    async fn concurrent_claims_never_share_a_message(t: TestStore) {
        with_registrations(&t).await;
        queue_all(&t, (1..=300).map(|i| message(&format!("m{i:03}"), "d1", i, 100)).collect()).await;
        let claims: Vec<_> = ["lease-x", "lease-y"]
            .into_iter()
            .map(|lease| {
                let store = t.store.clone();
                tokio::spawn(async move { (lease, store.claim_outbox(150, 30, 200, lease).await.unwrap()) })
            })
            .collect();
        let mut seen = HashSet::new();
        let mut leases = Vec::new();
        for claim in claims {
            let (lease, claimed) = claim.await.unwrap();
            for m in &claimed {
                assert!(seen.insert(m.id.clone()), "{} claimed twice", m.id);
                assert_eq!(m.attempts, 1);
            }
            leases.push(lease);
        }
        assert_eq!(seen.len(), 300);

        // Each lease records all 300 outcomes, over more than one statement; only its
        // own apply.
        let all: Vec<_> = (1..=300).map(|i| delivered(&format!("m{i:03}"), 160)).collect();
        let mut applied = 0;
        for lease in leases {
            applied += t.store.record_deliveries(lease, &all).await.unwrap();
        }
        assert_eq!(applied, 300);
        assert_eq!(t.store.outbox_counts().await.unwrap(), OutboxCounts { pending: 0, delivered: 300, dead: 0 });
    }

    async fn a_dead_message_is_retried_only_by_an_admin(t: TestStore) {
        with_registrations(&t).await;
        queue_all(&t, vec![message("m1", "d1", 1, 100), message("m2", "d1", 2, 100)]).await;
        t.store.claim_outbox(100, 30, 10, "lease-a").await.unwrap();
        let outcomes = [("m1".into(), DeliveryOutcome::Dead { error: "410 Gone".into() }), delivered("m2", 101)];
        assert_eq!(t.store.record_deliveries("lease-a", &outcomes).await.unwrap(), 2);
        let dead = t.store.outbox_message("m1").await.unwrap().unwrap();
        assert_eq!((dead.status, dead.attempts, dead.last_error.as_deref()), (OutboxStatus::Dead, 1, Some("410 Gone")));
        assert!(t.store.claim_outbox(10_000, 30, 10, "lease-b").await.unwrap().is_empty());
        assert_eq!(t.store.outbox_counts().await.unwrap(), OutboxCounts { pending: 0, delivered: 1, dead: 1 });

        assert!(!retry(&t, "m2", 500).await, "delivered");
        assert!(!retry(&t, "m9", 500).await, "unknown");
        assert!(retry(&t, "m1", 500).await);
        assert!(!retry(&t, "m1", 501).await, "pending already");
        let retried = t.store.outbox_message("m1").await.unwrap().unwrap();
        let expected = OutboxMessage { next_attempt_at: 500, last_error: Some("410 Gone".into()), ..message("m1", "d1", 1, 100) };
        assert_eq!(retried, expected);
        assert!(t.store.claim_outbox(499, 30, 10, "lease-c").await.unwrap().is_empty());
        assert_eq!(ids(&t.store.claim_outbox(500, 30, 10, "lease-c").await.unwrap()), ["m1"]);
    }

    async fn the_earliest_due_counts_a_lease_until_it_ends(t: TestStore) {
        with_registrations(&t).await;
        assert_eq!(t.store.earliest_outbox_due().await.unwrap(), None);
        assert_eq!(t.store.outbox_counts().await.unwrap(), OutboxCounts::default());
        let mut later = message("m2", "d1", 2, 100);
        later.next_attempt_at = 200;
        queue_all(&t, vec![message("m1", "d1", 1, 100), later]).await;
        assert_eq!(t.store.earliest_outbox_due().await.unwrap(), Some(100));
        t.store.claim_outbox(120, 30, 1, "lease-a").await.unwrap();
        assert_eq!(t.store.earliest_outbox_due().await.unwrap(), Some(151), "m1 once its lease has ended");
        let retry = DeliveryOutcome::Retry { next_attempt_at: 400, error: "timeout".into() };
        t.store.record_deliveries("lease-a", &[("m1".into(), retry)]).await.unwrap();
        assert_eq!(t.store.earliest_outbox_due().await.unwrap(), Some(200));
        t.store.claim_outbox(200, 30, 10, "lease-b").await.unwrap();
        t.store.record_deliveries("lease-b", &[delivered("m2", 201)]).await.unwrap();
        assert_eq!(t.store.earliest_outbox_due().await.unwrap(), Some(400), "delivered messages are not due");
        assert_eq!(t.store.outbox_counts().await.unwrap(), OutboxCounts { pending: 1, delivered: 1, dead: 0 });
    }

    async fn the_outbox_pages_newest_first_by_status_and_provider(t: TestStore) {
        with_registrations(&t).await;
        let mut messages = Vec::new();
        for (i, created_at) in [300, 100, 200, 300, 200].into_iter().enumerate() {
            let mut m = message(&format!("m{i}"), "d1", i as i64 + 1, created_at);
            if i % 2 == 1 {
                m.provider_id = "sp2".into();
            }
            messages.push(m);
        }
        queue_all(&t, messages).await;
        t.store.claim_outbox(200, 30, 10, "lease-a").await.unwrap();
        t.store.record_deliveries("lease-a", &[delivered("m1", 250), delivered("m4", 250)]).await.unwrap();

        let page = |status: Option<OutboxStatus>, provider: Option<&str>, before: Option<(i64, &str)>, limit: i64| {
            let filter = OutboxFilter { status, provider_id: provider.map(str::to_owned) };
            let before = before.map(|(at, id)| (at, id.to_owned()));
            let store = t.store.clone();
            async move { store.outbox_page(&filter, before, limit).await.unwrap() }
        };
        let all = page(None, None, None, 10).await;
        assert_eq!(ids(&all), ["m3", "m0", "m4", "m2", "m1"]);
        assert_eq!(ids(&page(None, None, None, 2).await), ["m3", "m0"]);
        assert_eq!(ids(&page(None, None, Some((300, "m0")), 2).await), ["m4", "m2"]);
        assert_eq!(ids(&page(None, None, Some((200, "m2")), 2).await), ["m1"]);
        assert!(page(None, None, Some((100, "m1")), 2).await.is_empty());
        assert_eq!(ids(&page(Some(OutboxStatus::Delivered), None, None, 10).await), ["m4", "m1"]);
        assert_eq!(ids(&page(Some(OutboxStatus::Pending), None, Some((300, "m3")), 10).await), ["m0", "m2"]);
        assert_eq!(ids(&page(None, Some("sp2"), None, 10).await), ["m3", "m1"]);
        assert_eq!(ids(&page(Some(OutboxStatus::Pending), Some("sp1"), None, 10).await), ["m0", "m2"]);
        assert!(page(Some(OutboxStatus::Dead), None, None, 10).await.is_empty());
        assert!(page(None, None, None, 0).await.is_empty());
        assert_eq!(all[0].status, OutboxStatus::Pending);
    }
}

/// A claim of another instance in flight holds its rows until it commits; a claim
/// meanwhile takes the others without waiting. (On SQLite claims take turns on the
/// one writer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_skips_what_another_claim_holds_on_postgres() {
    let Some(t) = crate::harness::postgres().await else { return };
    with_registrations(&t).await;
    queue_all(&t, vec![message("m1", "d1", 1, 100), message("m2", "d1", 2, 100), message("m3", "d1", 3, 100)]).await;
    let mut other = <sqlx::AnyConnection as sqlx::Connection>::connect(&t.url).await.unwrap();
    let mut held = sqlx::Connection::begin(&mut other).await.unwrap();
    sqlx::query("SELECT id FROM tsm_outbox WHERE id = 'm2' FOR UPDATE").execute(&mut *held).await.unwrap();
    let claim = tokio::time::timeout(Duration::from_secs(5), t.store.claim_outbox(150, 30, 10, "lease-a"));
    let claimed = claim.await.expect("the claim does not wait for the held row").unwrap();
    assert_eq!(ids(&claimed), ["m1", "m3"]);
    held.commit().await.unwrap();
    assert_eq!(ids(&t.store.claim_outbox(150, 30, 10, "lease-b").await.unwrap()), ["m2"]);
}

#[test]
fn an_outbox_status_reads_back_from_its_name() {
    for status in OutboxStatus::ALL {
        assert_eq!(OutboxStatus::parse(status.as_str()), Some(status));
    }
    assert_eq!(OutboxStatus::ALL.map(OutboxStatus::as_str), ["pending", "delivered", "dead"]);
    assert_eq!(OutboxStatus::parse("Pending"), None);
}
