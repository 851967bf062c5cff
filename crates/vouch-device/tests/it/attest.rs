//! Attestation end to end: simulated terminals, clean and tampered, attest against a
//! real server; each tamper condition is caught with its own reason code.

use vouch_device::attest::{Challenge, SimulatedDeviceState, Tamper, TamperMonitor};
use vouch_device::sim::{self, Attestation};
use vouch_device::{DeviceError, DeviceIdentity, VouchClient};
use vouch_proto::SystemClock;
use vouch_proto::attest::{Command, CommandKind, EarStatus};
use vouch_proto::enrol::DeviceKind;

use crate::support::{Device, fixture, fixture_for};

fn reason_codes(attestation: &Attestation) -> Vec<&str> {
    attestation.outcome.reasons.iter().map(|r| r.code.as_str()).collect()
}

/// A device of `kind` with `tampers` applied gets `status` with exactly the expected
/// reasons, in the answer and in the signed ticket alike.
async fn check_caught(kind: DeviceKind, tampers: &[Tamper], status: EarStatus, expected_codes: &[&str]) {
    let fx = fixture_for(kind).await;
    let mut device = fx.device(tampers).await;
    let attestation = fx.attest(&mut device).await.unwrap();
    assert_eq!(attestation.outcome.status, status, "{:?}", attestation.outcome);
    let mut codes = reason_codes(&attestation);
    codes.sort_unstable();
    let mut expected = expected_codes.to_vec();
    expected.sort_unstable();
    assert_eq!(codes, expected, "{:?}", attestation.outcome);
    assert_eq!(attestation.claims.reasons, attestation.outcome.reasons);
    assert!(attestation.outcome.reasons.iter().all(|r| !r.text.is_empty()));
    assert_eq!(attestation.claims.sub, device.device_id);
}

/// Denied for the one tamper condition, and for nothing else.
async fn check_denied(kind: DeviceKind, tamper: Tamper) {
    check_caught(kind, &[tamper], EarStatus::Contraindicated, &[tamper.reason_code()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_terminal_is_approved_and_its_attestations_chain() {
    let fx = fixture().await;
    let mut terminal = fx.device(&[]).await;
    let first = fx.attest(&mut terminal).await.unwrap();
    assert_eq!(first.outcome.status, EarStatus::Affirming, "{:?}", first.outcome);
    assert!(first.outcome.reasons.is_empty(), "{:?}", first.outcome.reasons);
    let claims = &first.claims;
    assert_eq!(claims.cnf.jkt, terminal.identity.jwk().thumbprint());
    assert_eq!(claims.iss, fx.server.state.config.issuer);
    assert_eq!(claims.eat_profile, vouch_proto::attest::EAR_PROFILE);
    assert!(claims.exp > claims.iat && claims.exp == first.outcome.expires_at, "{claims:?}");
    assert!(!claims.conditions.operations.is_empty() && claims.conditions.max_amount_minor > 0, "{claims:?}");
    assert_eq!(terminal.monitor.prev_evidence_hash(), Some(first.evidence.hash.as_str()));

    // The second evidence carries the first's hash as the previous state.
    let second = fx.attest(&mut terminal).await.unwrap();
    assert_eq!(second.outcome.status, EarStatus::Affirming, "{:?}", second.outcome);
    assert_ne!(second.outcome.ticket_id, first.outcome.ticket_id);

    let history = fx.admin.attestations(&terminal.device_id).await.unwrap();
    let ids: Vec<&str> = history.iter().map(|a| a.attestation_id.as_str()).collect();
    assert_eq!(ids, [second.outcome.attestation_id.as_str(), first.outcome.attestation_id.as_str()]);
    assert!(history.iter().all(|a| a.status == EarStatus::Affirming));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooted_terminal_is_denied() {
    check_denied(DeviceKind::Terminal, Tamper::Root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debugged_terminal_is_denied() {
    check_denied(DeviceKind::Terminal, Tamper::Debugger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hooked_pos_app_is_denied() {
    // Terminals are asked about hooks and emulators only at random spot checks; a POS
    // app is asked every time.
    check_denied(DeviceKind::Pos, Tamper::Hook).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emulated_pos_app_is_denied() {
    check_denied(DeviceKind::Pos, Tamper::Emulator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_with_modified_code_is_denied() {
    check_denied(DeviceKind::Terminal, Tamper::ModifiedCode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_terminal_is_denied() {
    check_denied(DeviceKind::Terminal, Tamper::TamperSwitch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_with_an_old_os_patch_is_warned() {
    // An old patch level is a known weakness, not a compromise: the policy allows
    // small payments with a warning.
    check_caught(DeviceKind::Terminal, &[Tamper::OldPatch], EarStatus::Warning, &["os_patch_outdated"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_with_unknown_firmware_is_denied() {
    check_denied(DeviceKind::Terminal, Tamper::UnknownFirmware).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_with_disallowed_reader_firmware_is_denied() {
    check_denied(DeviceKind::Terminal, Tamper::ReaderFirmware).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooted_and_opened_terminal_is_denied_with_both_reasons() {
    check_caught(
        DeviceKind::Terminal,
        &[Tamper::Root, Tamper::TamperSwitch],
        EarStatus::Contraindicated,
        &["rooted", "tamper_switch_open"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_that_breaks_the_state_chain_is_denied() {
    let fx = fixture().await;
    let mut terminal = fx.device(&[]).await;
    fx.attest(&mut terminal).await.unwrap();
    // A device restored from an old image no longer knows its last evidence.
    let state = terminal.monitor.state().clone();
    terminal.monitor = TamperMonitor::resume(state, Some(vouch_proto::attest::evidence_hash("an older evidence")));
    let denied = fx.attest(&mut terminal).await.unwrap();
    assert_eq!(denied.outcome.status, EarStatus::Contraindicated);
    assert_eq!(reason_codes(&denied), ["broken_state_chain"], "{:?}", denied.outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_configured_for_another_merchant_is_denied() {
    let fx = fixture().await;
    let mut terminal = fx.device(&[]).await;
    let other = fx.admin.create_merchant("Elsewhere Ltd").await.unwrap();
    terminal.monitor.state_mut().merchant_profile.merchant_id = other.merchant_id;
    let denied = fx.attest(&mut terminal).await.unwrap();
    assert_eq!(denied.outcome.status, EarStatus::Contraindicated);
    assert_eq!(reason_codes(&denied), ["merchant_mismatch"], "{:?}", denied.outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_stops_verifying_when_its_device_is_suspended() {
    let fx = fixture().await;
    let mut terminal = fx.device(&[]).await;
    let approved = fx.attest(&mut terminal).await.unwrap();
    let ticket = &approved.outcome.ticket;
    let integrator_key = fx.admin.create_api_key(&["terminal"], "checkout").await.unwrap();
    let relying_party = VouchClient::new(&fx.server.url).unwrap().with_api_key(&integrator_key.api_key);

    let valid = relying_party.verify_ticket(ticket).await.unwrap();
    assert!(valid.valid, "{valid:?}");
    assert_eq!(valid.claims.as_ref().map(|c| c.jti.as_str()), Some(approved.outcome.ticket_id.as_str()));

    fx.admin.change_device_status(&terminal.device_id, "suspend", "reported stolen").await.unwrap();
    let refused = relying_party.verify_ticket(ticket).await.unwrap();
    assert!(!refused.valid, "{refused:?}");
    assert!(refused.reason.is_some(), "{refused:?}");
    // The signature is as good as ever: only the server knows the device's status.
    let jwks = fx.device_client.jwks().await.unwrap();
    sim::verify_ticket_with(ticket, &jwks, &SystemClock).unwrap();

    let not_active = fx.attest(&mut terminal).await.unwrap_err();
    assert_eq!(not_active.problem_reason(), Some("device-not-active"), "{not_active}");
    assert!(matches!(not_active, DeviceError::Problem { status: 403, .. }));

    fx.admin.change_device_status(&terminal.device_id, "reactivate", "found").await.unwrap();
    assert!(relying_party.verify_ticket(ticket).await.unwrap().valid);

    let mut forged = ticket.clone();
    forged.replace_range(forged.len() - 4.., "AAAA");
    assert!(!relying_party.verify_ticket(&forged).await.unwrap().valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_device_gets_no_challenge() {
    let fx = fixture().await;
    let identity = DeviceIdentity::generate(&fx.rng).unwrap();
    let mut stranger = Device {
        identity: identity.into(),
        device_id: "dev_never_enrolled".into(),
        monitor: TamperMonitor::new(SimulatedDeviceState::clean(DeviceKind::Terminal, &fx.merchant_id)),
    };
    let refused = fx.attest(&mut stranger).await.unwrap_err();
    assert_eq!(refused.problem_reason(), Some("unknown-device"), "{refused}");
    assert!(matches!(refused, DeviceError::Problem { status: 404, .. }));
}

/// Evidence the server cannot trust is refused outright, with no ticket. Each case
/// gets its own challenge, since a refusal may close the attestation it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_evidence_is_refused_without_a_ticket() {
    let fx = fixture().await;
    let terminal = fx.device(&[]).await;
    let (clock, rng, monitor, device_id) = (SystemClock, &fx.rng, &terminal.monitor, terminal.device_id.as_str());
    let key = terminal.identity.key();
    let other_key = DeviceIdentity::generate(rng).unwrap();
    let challenge = || async {
        let request = monitor.challenge_request(device_id, key, &clock, rng).unwrap();
        fx.device_client.request_attestation(&request).await.unwrap()
    };

    type Spoil = fn(&mut Challenge, &mut String);
    let cases: [(&str, Spoil); 5] = [
        ("a missing result", |c, _| drop(c.commands.pop())),
        ("an extra result", |c, _| {
            c.commands.push(Command { id: "extra".into(), kind: CommandKind::RootCheck, region: None })
        }),
        ("the wrong nonce", |c, _| c.nonce = "not-the-nonce".into()),
        ("another attestation's id", |c, _| c.attestation_id = "att_someone_else".into()),
        ("another device's id", |_, id| *id = "dev_someone_else".into()),
    ];
    for (what, spoil) in cases {
        let issued = challenge().await;
        let (mut answered, mut claimed_id) = (issued.clone(), device_id.to_owned());
        spoil(&mut answered, &mut claimed_id);
        let evidence = monitor.evidence(&answered, &claimed_id, key, &clock, rng).unwrap();
        let refused = fx.device_client.submit_evidence(&issued.attestation_id, &evidence.jws).await.unwrap_err();
        assert!(matches!(refused, DeviceError::Problem { status: 400..=499, .. }), "{what}: {refused}");
    }

    let issued = challenge().await;
    let foreign = monitor.evidence(&issued, device_id, other_key.key(), &clock, rng).unwrap();
    let refused = fx.device_client.submit_evidence(&issued.attestation_id, &foreign.jws).await.unwrap_err();
    assert!(matches!(refused, DeviceError::Problem { status: 400..=499, .. }), "wrong key: {refused}");

    let issued = challenge().await;
    assert!(!issued.commands.is_empty());
    let good = monitor.evidence(&issued, device_id, key, &clock, rng).unwrap();
    let outcome = fx.device_client.submit_evidence(&issued.attestation_id, &good.jws).await.unwrap();
    assert_eq!(outcome.status, EarStatus::Affirming, "{outcome:?}");
    let replayed = fx.device_client.submit_evidence(&issued.attestation_id, &good.jws).await.unwrap_err();
    assert!(matches!(replayed, DeviceError::Problem { status: 400..=499, .. }), "replay: {replayed}");
}

/// Tickets are standard EAR: the reference implementation's claim types parse them, and
/// an independent JOSE library verifies them against the published JWK Set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_parse_as_ear_and_verify_with_an_independent_jose_library() {
    let fx = fixture().await;
    let mut clean = fx.device(&[]).await;
    let mut tampered = fx.device(&[Tamper::Root]).await;
    for attestation in [fx.attest(&mut clean).await.unwrap(), fx.attest(&mut tampered).await.unwrap()] {
        let ticket = &attestation.outcome.ticket;
        let payload = ticket.split('.').nth(1).unwrap();
        let claims = vouch_proto::b64::decode("ticket", payload).unwrap();
        let ear: ear::Ear = serde_json::from_slice(&claims).unwrap();
        ear.validate().unwrap();
        assert_eq!(ear.profile, vouch_proto::attest::EAR_PROFILE);
        let appraisal = ear.submods.get("terminal").expect("a terminal appraisal");
        assert_eq!(appraisal.status.to_string(), attestation.outcome.status.as_str());

        let jwks: jsonwebtoken::jwk::JwkSet =
            serde_json::from_value(serde_json::to_value(fx.admin.jwks().await.unwrap()).unwrap()).unwrap();
        let header = jsonwebtoken::decode_header(ticket).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(header.kid.as_deref().unwrap()).unwrap()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_issuer(&[fx.server.state.config.issuer.as_str()]);
        let decoded = jsonwebtoken::decode::<serde_json::Value>(ticket, &key, &validation).unwrap();
        assert_eq!(decoded.claims["ear_status"], attestation.outcome.status.as_str());
    }
}
