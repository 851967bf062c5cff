//! Several server instances on one PostgreSQL: single-use and uniqueness rules hold
//! across them because the database enforces them.

use vouch_device::sim::{self, DeviceProfile};
use vouch_device::{DeviceIdentity, VouchClient};
use vouch_proto::SystemClock;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
use vouch_server::Config;

use crate::support::{RunningServer, postgres_database, start_with};

const MASTER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// Two server instances on one PostgreSQL schema, and an admin client for each. A
/// server stops when its handle is dropped, so tests keep both bound.
struct Instances {
    first: RunningServer,
    second: RunningServer,
    clients: [VouchClient; 2],
}

async fn two_instances_on_postgres() -> Option<Instances> {
    two_instances_configured(|_| {}).await
}

/// As [`two_instances_on_postgres`], with `configure` applied to both instances.
async fn two_instances_configured(configure: impl Fn(&mut Config)) -> Option<Instances> {
    let url = postgres_database().await?;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_data_dir(dir.path());
        config.database_url = url.clone();
        configure(&mut config);
        instances.push(start_with(config, Some(MASTER_KEY), Some(dir)).await);
    }
    let second = instances.pop()?;
    let first = instances.pop()?;
    // Only one instance bootstrapped the admin key; it works on both.
    let admin_key = if first.admin_key.is_empty() { second.admin_key.clone() } else { first.admin_key.clone() };
    let clients = [&first, &second].map(|s| VouchClient::new(&s.url).unwrap().with_api_key(&admin_key));
    Some(Instances { first, second, clients })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_device_enrolling_on_two_instances_at_once_succeeds_once() {
    let Some(Instances { first, second: _running, clients }) = two_instances_on_postgres().await else { return };
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
    let Some(Instances { first: _first, second: _second, clients }) = two_instances_on_postgres().await else { return };
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

/// `POST` `body` to `url`; the status and the JSON answer.
async fn post_json(http: &reqwest::Client, url: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = http.post(url).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_evidence_sent_to_both_instances_at_once_is_accepted_exactly_once() {
    use vouch_proto::Clock;
    use vouch_proto::attest::{self, ChallengeRequestClaims, Command, CommandKind, CommandResult, Observation};

    let Some(Instances { first, second, clients: [admin, _] }) = two_instances_on_postgres().await else { return };
    let merchant = admin.create_merchant("Shared Shop").await.unwrap();
    let rng = SystemRandom::new();
    let identity = DeviceIdentity::generate(&rng).unwrap();
    let profile = DeviceProfile::simulated(DeviceKind::Terminal, &merchant.merchant_id);
    let proof = sim::enrolment_proof(&admin, &identity, &profile, &SystemClock, &rng).await.unwrap();
    let device_id = admin.enrol(&proof).await.unwrap().device_id;

    // The challenge comes from instance one; the device answers it as the protocol says.
    let http = reqwest::Client::new();
    let request = ChallengeRequestClaims { device_id: device_id.clone(), iat: SystemClock.now_unix() };
    let request = attest::sign_challenge_request(&request, identity.key(), &rng).unwrap();
    let (status, challenge) =
        post_json(&http, &format!("{}/v1/attestations", first.url), serde_json::json!({ "request": request })).await;
    assert_eq!(status, 201, "{challenge}");
    let attestation_id = challenge["attestation_id"].as_str().unwrap().to_owned();
    let commands: Vec<Command> = serde_json::from_value(challenge["commands"].clone()).unwrap();
    let results = commands
        .iter()
        .map(|command| CommandResult {
            id: command.id.clone(),
            observation: match command.kind {
                CommandKind::Measure => {
                    Observation::Measure { region: command.region.clone().unwrap_or_default(), digest: "00".repeat(32) }
                }
                CommandKind::RootCheck => Observation::RootCheck { detected: false },
                CommandKind::DebuggerCheck => Observation::DebuggerCheck { detected: false },
                CommandKind::HookCheck => Observation::HookCheck { detected: false },
                CommandKind::EmulatorCheck => Observation::EmulatorCheck { detected: false },
                CommandKind::TamperSwitch => Observation::TamperSwitch { open: false },
                CommandKind::OsPatchLevel => Observation::OsPatchLevel { patch_level: "2026-03-01".into() },
                CommandKind::Geo => Observation::Geo { lat: 48.86, lon: 2.35 },
                CommandKind::ReaderFirmware => Observation::ReaderFirmware { version: "3.1.0".into() },
            },
        })
        .collect();
    let claims = attest::EvidenceClaims {
        attestation_id: attestation_id.clone(),
        device_id: device_id.clone(),
        nonce: challenge["nonce"].as_str().unwrap().to_owned(),
        iat: SystemClock.now_unix(),
        results,
        state: attest::DeviceState {
            firmware_version: profile.firmware_version.clone(),
            app_version: "1.0.0".into(),
            uptime_secs: 60,
        },
        prev_evidence_hash: None,
        merchant_profile: attest::MerchantProfile { merchant_id: merchant.merchant_id.clone(), mcc: None },
    };
    let evidence = attest::sign_evidence(&claims, identity.key(), &rng).unwrap();
    let body = serde_json::json!({ "evidence": evidence });
    let urls = [&first.url, &second.url].map(|base| format!("{base}/v1/attestations/{attestation_id}/evidence"));
    let (a, b) = tokio::join!(post_json(&http, &urls[0], body.clone()), post_json(&http, &urls[1], body.clone()));
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    let (accepted, refused) = if a.0 == 200 { (a.1, b.1) } else { (b.1, a.1) };
    assert_eq!(accepted["attestation_id"].as_str(), Some(attestation_id.as_str()), "{accepted}");
    assert_eq!(refused["type"], "urn:vouch:problem:replayed-evidence", "{refused}");

    let history = first.state.store.attestations(&device_id, 10).await.unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].ticket_id, accepted["ticket_id"].as_str().unwrap());
    let audit = first.state.store.audit_records(0, 1000).await.unwrap();
    let decisions: Vec<&str> = audit
        .iter()
        .filter(|r| r.entry.subject == device_id && r.entry.action.starts_with("attestation."))
        .map(|r| r.entry.action.as_str())
        .collect();
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert!(decisions.contains(&"attestation.evidence_refused"), "{decisions:?}");
    assert_eq!(first.state.store.verify_audit().await.unwrap().first_break, None);
}

/// The whole attestation flow through the SDK on PostgreSQL, alternating instances: a
/// clean terminal is approved on one, chains its next evidence through the other, and a
/// tampered terminal is denied; every ticket is checked where it was not issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_works_end_to_end_across_instances() {
    use vouch_device::attest::{SimulatedDeviceState, Tamper, TamperMonitor};
    use vouch_proto::attest::EarStatus;

    let Some(Instances { first, second: _running, clients }) = two_instances_on_postgres().await else { return };
    let merchant = clients[0].create_merchant("Shared Shop").await.unwrap();
    let clean = SimulatedDeviceState::clean(DeviceKind::Terminal, &merchant.merchant_id);
    clients[1].put_reference_values(&clean.reference_values()).await.unwrap();
    let rng = SystemRandom::new();

    let identity = DeviceIdentity::generate(&rng).unwrap();
    let device = sim::enrol(&clients[0], &identity, &clean.profile(), &SystemClock, &rng).await.unwrap();
    let mut monitor = TamperMonitor::new(clean.clone());
    for round in 0..2 {
        let (attesting, checking) = (&clients[round % 2], &clients[(round + 1) % 2]);
        let attestation =
            sim::attest(attesting, &identity, &device.device_id, &mut monitor, &SystemClock, &rng).await.unwrap();
        assert_eq!(attestation.outcome.status, EarStatus::Affirming, "round {round}: {:?}", attestation.outcome);
        assert!(checking.verify_ticket(&attestation.outcome.ticket).await.unwrap().valid);
    }

    let rooted_identity = DeviceIdentity::generate(&rng).unwrap();
    let rooted_state = clean.with_tampers(&[Tamper::Root]);
    let rooted = sim::enrol(&clients[1], &rooted_identity, &rooted_state.profile(), &SystemClock, &rng).await.unwrap();
    let mut rooted_monitor = TamperMonitor::new(rooted_state);
    let denial = sim::attest(&clients[1], &rooted_identity, &rooted.device_id, &mut rooted_monitor, &SystemClock, &rng)
        .await
        .unwrap();
    assert_eq!(denial.outcome.status, EarStatus::Contraindicated);
    assert_eq!(denial.outcome.reasons.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(), ["rooted"]);
    assert!(!clients[0].verify_ticket(&denial.outcome.ticket).await.unwrap().valid);
    assert_eq!(first.state.store.verify_audit().await.unwrap().first_break, None);
}

/// A DPoP proof is single-use across instances: one proof sent to both at once, the
/// second reached under the first's host name as behind a load balancer, is accepted
/// once and refused once as a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_proof_is_used_once_across_instances() {
    use std::sync::Arc;

    use vouch_device::TokenSession;
    use vouch_device::attest::{SimulatedDeviceState, TamperMonitor};
    use vouch_device::token::{Method, SIGN_PATH};

    let Some(Instances { first, second, clients }) = two_instances_on_postgres().await else { return };
    let merchant = clients[0].create_merchant("Shared Shop").await.unwrap();
    let clean = SimulatedDeviceState::clean(DeviceKind::Terminal, &merchant.merchant_id);
    clients[0].put_reference_values(&clean.reference_values()).await.unwrap();
    let rng = SystemRandom::new();
    let identity = Arc::new(DeviceIdentity::generate(&rng).unwrap());
    let device = sim::enrol(&clients[0], &identity, &clean.profile(), &SystemClock, &rng).await.unwrap();
    let mut monitor = TamperMonitor::new(clean);
    let attestation =
        sim::attest(&clients[1], &identity, &device.device_id, &mut monitor, &SystemClock, &rng).await.unwrap();
    let ticket = &attestation.outcome.ticket;
    let session = TokenSession::open(&clients[0], identity, ticket, Arc::new(SystemClock), &rng).await.unwrap();

    let proof = session.proof(&Method::POST, SIGN_PATH).unwrap();
    let host = first.url.trim_start_matches("http://");
    let authorization = format!("DPoP {}", session.access_token());
    let body = serde_json::json!({ "digest": vouch_proto::b64::encode([7u8; 32]) });
    let http = reqwest::Client::new();
    let send = |base: &str| {
        http.post(format!("{base}{SIGN_PATH}"))
            .header(reqwest::header::HOST, host)
            .header(reqwest::header::AUTHORIZATION, &authorization)
            .header("DPoP", &proof)
            .json(&body)
            .send()
    };
    let (a, b) = tokio::join!(send(&first.url), send(&second.url));
    let mut answers = Vec::new();
    for response in [a.unwrap(), b.unwrap()] {
        answers.push((response.status().as_u16(), response.json::<serde_json::Value>().await.unwrap()));
    }
    answers.sort_by_key(|(status, _)| *status);
    let [(200, signed), (401, refused)] = &answers[..] else { panic!("expected one 200 and one 401: {answers:?}") };
    assert!(signed["signature"].is_string(), "{signed}");
    assert_eq!(refused["type"], "urn:vouch:problem:dpop-replayed", "{refused}");
    assert_eq!(refused["error"], "invalid_dpop_proof", "{refused}");

    // Only the proof was spent: the session goes on with fresh ones.
    session.sign_digest(&[8u8; 32]).await.unwrap();
    assert_eq!(second.state.store.verify_audit().await.unwrap().first_break, None);
}

/// A reader's hello is granted once across instances: a POS app with a session on each
/// instance gets the grant from the first, and the same hello sent to the second is
/// refused; the reader takes the grant with the keys it pinned from the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_hello_is_granted_once_across_instances() {
    use crate::session::{attested_pos, pos_app, provisioned_reader, register_reference_values};

    let Some(Instances { first, second, clients }) = two_instances_on_postgres().await else { return };
    let merchant = clients[0].create_merchant("Shared Shop").await.unwrap();
    register_reference_values(&clients[0]).await;
    let rng = SystemRandom::new();
    let (identity, ticket) = attested_pos(&clients[0], &merchant.merchant_id, &rng).await;
    let pos_on_first = pos_app(&VouchClient::new(&first.url).unwrap(), &identity, &ticket, &rng).await;
    let pos_on_second = pos_app(&VouchClient::new(&second.url).unwrap(), &identity, &ticket, &rng).await;
    let mut reader = provisioned_reader(&clients[1], &merchant.merchant_id, &rng).await;

    let hello = reader.hello(&SystemClock, &rng).unwrap();
    let granted = pos_on_first.request_session(&hello).await.unwrap();
    let refused = pos_on_second.request_session(&hello).await.unwrap_err();
    assert!(matches!(refused, vouch_device::DeviceError::Problem { status: 409, .. }), "{refused}");
    assert_eq!(refused.problem_reason(), Some("reader-nonce-reused"), "{refused}");
    let accepted = reader.accept_grant(&granted.grant, &SystemClock).unwrap();
    assert_eq!(accepted.session_id(), granted.session_id);

    // A fresh hello is granted on the second instance.
    let hello = reader.hello(&SystemClock, &rng).unwrap();
    let again = pos_on_second.request_session(&hello).await.unwrap();
    assert_ne!(again.session_id, granted.session_id);
    assert_eq!(first.state.store.verify_audit().await.unwrap().first_break, None);
}

/// One value good for 10 uses, presented 50 times at once with distinct STANs through
/// both instances: the database counts the uses, so exactly 10 are approved and 40
/// find it used up; an approved request sent again gets its first answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_value_good_for_ten_uses_is_approved_ten_times_across_instances() {
    use std::sync::Arc;

    use crate::dvv::Market;

    let configure = |config: &mut Config| config.dvv_policy.max_uses = 10;
    let Some(Instances { first, second, clients }) = two_instances_configured(configure).await else { return };
    let market = Market::set_up(&clients[0], &VouchClient::new(&second.url).unwrap()).await;
    let issued = market.issue().await;
    assert_eq!(issued.max_uses, 10);
    let terminals = [Arc::new(market.terminal_at(&first.url)), Arc::new(market.terminal_at(&second.url))];
    // One terminal numbers every request, so the STANs are distinct whichever
    // instance gets them.
    let requests: Vec<_> = (0..50).map(|_| terminals[0].prepare(&market.payment(&issued.dvv))).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, request) in requests.iter().enumerate() {
        let (terminal, request) = (Arc::clone(&terminals[i % 2]), request.clone());
        tasks.spawn(async move { (request.clone(), terminal.submit(&request).await.unwrap()) });
    }
    let decided = tasks.join_all().await;
    let count = |code: &str| decided.iter().filter(|(_, d)| d.response_code == code).count();
    assert_eq!((count("00"), count("54")), (10, 40), "{decided:?}");
    assert!(decided.iter().all(|(_, d)| d.response_code == "00" || d.reason == "dvv-used-up"), "{decided:?}");
    let mut stans: Vec<&str> = decided.iter().map(|(request, _)| request.stan.as_str()).collect();
    stans.sort_unstable();
    stans.dedup();
    assert_eq!(stans.len(), 50);

    let (request, approved) = decided.iter().find(|(_, d)| d.approved).unwrap();
    for terminal in &terminals {
        let retried = terminal.submit(request).await.unwrap();
        assert_eq!(&retried, approved, "the same authorization id, code and authorization code");
    }
    assert_eq!(first.state.store.verify_audit().await.unwrap().first_break, None);
}
