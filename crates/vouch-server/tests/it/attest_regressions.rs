//! Regression tests for attestation defects found and fixed:
//!
//! 1. `min_os_patch_level` must be a calendar date: anything else would sort above every
//!    real patch level and mark every device of the model `os_patch_outdated`.
//! 2. A challenge request of the wrong `typ` is refused as `invalid-request`, not as
//!    evidence.
//! 3. Reference values must name at least one measured region; with none, the catalogue
//!    would measure default regions that the appraisal then finds missing.
//! 4. A device's previous state is the result answered last (by audit sequence), not
//!    the one whose challenge was created last.

use serde_json::json;
use vouch_proto::attest as wire;
use vouch_proto::enrol::DeviceKind;

use crate::attest::{DeviceHealth, FIRMWARE, MODEL, fixture, reason_codes, reference_values};
use crate::support::Case;

#[tokio::test]
async fn patch_levels_that_are_not_dates_are_refused() {
    let fx = fixture().await;
    let admin = fx.server.admin_key.clone();
    for level in ["abcd-ef-gh", "2026-1a-01", "2026-13-01"] {
        let mut values = reference_values(FIRMWARE);
        values["min_os_patch_level"] = json!(level);
        let case = Case::new(level, "PUT", "/v1/reference-values").key(&admin).json(values);
        fx.server.check(&case, 422, "invalid-field").await;
    }
}

#[tokio::test]
async fn a_challenge_request_of_the_wrong_type_is_an_invalid_request() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let claims = wire::ChallengeRequestClaims { device_id: terminal.device_id.clone(), iat: fx.server.now() };
    let request = vouch_proto::jwt::encode(
        &vouch_proto::jws::Header::es256(wire::EVIDENCE_TYP),
        &claims,
        &terminal.device.key,
        &fx.rng,
    )
    .unwrap();
    let case = Case::new("evidence typ", "POST", "/v1/attestations").json(json!({ "request": request }));
    fx.server.check(&case, 400, "invalid-request").await;
}

#[tokio::test]
async fn reference_values_without_measurements_do_not_deny_every_device() {
    let fx = crate::attest::bare_fixture(|_| {}).await;
    let values = json!({
        "model": MODEL, "firmware_version": FIRMWARE, "measurements": {},
        "min_os_patch_level": "2026-01-01", "reader_firmware": ["3.1.0"],
    });
    let reply = fx.server.call("PUT", "/v1/reference-values", fx.admin(), Some(values)).await;
    if reply.status.as_u16() == 422 {
        // Refusing a document that can only deny is a fix too.
        return;
    }
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.json);
    let mut terminal = fx.enrol(DeviceKind::Terminal).await;
    let verdict = fx.attest(&mut terminal, &DeviceHealth::clean()).await;
    let codes = reason_codes(&verdict);
    assert!(!codes.contains(&"measurement_mismatch".to_owned()), "{}: {codes:?}", verdict["status"]);
}

#[tokio::test]
async fn the_chain_follows_the_order_evidence_was_answered_in() {
    let fx = fixture().await;
    let mut terminal = fx.enrol(DeviceKind::Terminal).await;
    let clean = DeviceHealth::clean();
    let older = fx.challenge(&terminal).await;
    let newer = fx.challenge(&terminal).await;
    // The newer challenge is answered first, the older one second, in the same second.
    for challenge in [&newer, &older] {
        let evidence = fx.sign_evidence(&terminal.device.key, &fx.evidence_claims(&terminal, challenge, &clean));
        let reply = fx.submit(&challenge.attestation_id, &evidence).await;
        assert_eq!(reply.json["status"], "affirming", "{}", reply.json);
        terminal.last_evidence_hash = Some(wire::evidence_hash(&evidence));
    }
    // The device chains to the evidence it sent last.
    let verdict = fx.attest(&mut terminal, &clean).await;
    assert_eq!(verdict["status"], "affirming", "{:?}", reason_codes(&verdict));
}
