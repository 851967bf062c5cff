//! Device enrolment: the credential a good proof earns, and every way a proof is refused
//! without a partial write.

use std::sync::Arc;

use serde_json::json;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::{DeviceKind, ENROLMENT_PROOF_TYP};
use vouch_proto::jws::{self, Header};
use vouch_proto::{SigningKey, jwt};

use crate::support::{Case, TestClock, TestDevice, TestServer, assert_problem, busy_server, server_with_clock};

#[tokio::test]
async fn enrolment_returns_a_credential_that_verifies_against_the_jwk_set() {
    let server = busy_server().await;
    let merchant_id = server.merchant("Corner shop").await;
    for kind in DeviceKind::ALL {
        let device = TestDevice::new(kind);
        let (_, provision) = server.api_key(&["provision"]).await;
        let nonce = server.nonce(&provision).await;
        let mark = server.audit_mark().await;
        let reply = server.enrol_proof(&provision, &device.proof(&nonce, &merchant_id, server.now())).await;
        assert_eq!(reply.status.as_u16(), 201, "{kind}: {}", reply.json);
        let enrolled = reply.json;
        let device_id = enrolled["device_id"].as_str().unwrap();
        let device_jwk = device.key.verifying_key().to_jwk();
        assert_eq!(enrolled["kind"], json!(kind.as_str()));
        assert_eq!(enrolled["merchant_id"], json!(merchant_id));
        assert_eq!(enrolled["jwk"], serde_json::to_value(&device_jwk).unwrap());

        let (kid, claims) = server.verify_credential(enrolled["device_credential"].as_str().unwrap()).await;
        assert_eq!(claims.sub, device_id);
        assert_eq!(claims.kind, kind);
        assert_eq!(claims.merchant_id, merchant_id);
        assert_eq!(claims.cnf.jwk, device_jwk, "cnf.jwk is not the enrolled key");
        assert_eq!(claims.iss, server.state.config.issuer);
        assert!(claims.exp > claims.iat, "exp {} is not after iat {}", claims.exp, claims.iat);
        assert!((claims.iat - server.now()).abs() <= 5, "iat {} is not now", claims.iat);
        assert!(!claims.jti.is_empty());
        assert!(server.jwks().await.find(&kid).is_some());

        let stored =
            server.expect(200, "GET", &format!("/v1/devices/{device_id}"), Some(&server.admin_key), None).await;
        assert_eq!(stored["status"], "active");
        assert_eq!(stored["kind"], json!(kind.as_str()));
        assert_eq!(stored["model"], "R-100");
        assert_eq!(stored["firmware_version"], "1.2.3");
        assert_eq!(stored["key_thumbprint"], json!(device_jwk.thumbprint()));
        assert_eq!(stored["jwk"], serde_json::to_value(&device_jwk).unwrap());
        server.assert_audited("enrolment", mark, &[("device.enrolled", device_id)]).await;
    }
    assert_eq!(server.device_ids().await.len(), DeviceKind::ALL.len());
    server.assert_audit_intact("after enrolments").await;
}

/// Runs one refused enrolment and checks it added no device and appended exactly one
/// audit row, `device.enrolment_refused`, to an intact chain.
struct Refusal<'a> {
    server: &'a TestServer,
    key: String,
}

impl Refusal<'_> {
    async fn check(&self, name: &str, proof: &str, status: u16, problem: &str) {
        let devices_before = self.server.device_ids().await;
        let mark = self.server.audit_mark().await;
        let case = Case::new(name, "POST", "/v1/devices").key(&self.key).json(json!({ "proof": proof }));
        self.server.check(&case, status, problem).await;
        assert_eq!(self.server.device_ids().await, devices_before, "{name}: the device list changed");
        self.server.assert_audited(name, mark, &[("device.enrolment_refused", "-")]).await;
        self.server.assert_audit_intact(name).await;
    }
}

/// Signs `claims` (any JSON) with `key` under `header`.
fn signed_with(header: &Header, claims: &serde_json::Value, key: &SigningKey) -> String {
    jws::sign(header, claims.to_string().as_bytes(), key, &SystemRandom::new()).unwrap()
}

#[tokio::test]
async fn proofs_that_do_not_verify_are_refused_without_a_write() {
    let server = busy_server().await;
    let merchant_id = server.merchant("Corner shop").await;
    let (_, provision) = server.api_key(&["provision"]).await;
    let refusal = Refusal { server: &server, key: provision.clone() };
    let device = TestDevice::new(DeviceKind::Pos);
    let other = TestDevice::new(DeviceKind::Pos);
    let now = server.now();
    let nonce = server.nonce(&provision).await;
    let claims = serde_json::to_value(device.claims(&nonce, &merchant_id, now)).unwrap();
    let own_header = Header::es256(ENROLMENT_PROOF_TYP).with_jwk(device.key.verifying_key().to_jwk());

    // Signed by a key other than the one in its `jwk` header.
    let foreign_header = Header::es256(ENROLMENT_PROOF_TYP).with_jwk(other.key.verifying_key().to_jwk());
    refusal.check("foreign key", &signed_with(&foreign_header, &claims, &device.key), 400, "bad-signature").await;
    // A valid proof whose claims were swapped after signing.
    let good = device.proof(&nonce, &merchant_id, now);
    let mut tampered_claims = claims.clone();
    tampered_claims["merchant_id"] = json!("mch_elsewhere");
    let swapped_payload = signed_with(&own_header, &tampered_claims, &device.key);
    let parts: Vec<&str> = good.split('.').collect();
    let swapped: Vec<&str> = swapped_payload.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], swapped[1], parts[2]);
    refusal.check("tampered claims", &tampered, 400, "bad-signature").await;
    // A signature of the right length that is all zeros.
    let zero_signature = format!("{}.{}.{}", parts[0], parts[1], vouch_proto::b64::encode([0u8; 64]));
    refusal.check("zero signature", &zero_signature, 400, "bad-signature").await;

    // Stale and future `iat`.
    let window = server.state.config.proof_iat_window_secs;
    refusal.check("stale iat", &device.proof(&nonce, &merchant_id, now - window - 60), 400, "stale-proof").await;
    refusal.check("future iat", &device.proof(&nonce, &merchant_id, now + window + 60), 400, "stale-proof").await;

    // Not the proof it should be.
    let wrong_typ = Header::es256("JWT").with_jwk(device.key.verifying_key().to_jwk());
    refusal.check("wrong typ", &signed_with(&wrong_typ, &claims, &device.key), 400, "invalid-proof").await;
    let no_jwk = Header::es256(ENROLMENT_PROOF_TYP);
    refusal.check("no jwk header", &signed_with(&no_jwk, &claims, &device.key), 400, "invalid-proof").await;
    let mut bad_kind = claims.clone();
    bad_kind["kind"] = json!("toaster");
    refusal.check("unknown kind", &signed_with(&own_header, &bad_kind, &device.key), 400, "invalid-proof").await;
    let mut extra = claims.clone();
    extra["admin"] = json!(true);
    refusal.check("unknown claim", &signed_with(&own_header, &extra, &device.key), 400, "invalid-proof").await;
    let mut missing = claims.clone();
    missing.as_object_mut().unwrap().remove("nonce");
    refusal.check("missing nonce", &signed_with(&own_header, &missing, &device.key), 400, "invalid-proof").await;
    let mut empty_model = claims.clone();
    empty_model["model"] = json!("");
    refusal.check("empty model", &signed_with(&own_header, &empty_model, &device.key), 400, "invalid-proof").await;
    let mut long_firmware = claims.clone();
    long_firmware["firmware_version"] = json!("9".repeat(65));
    refusal.check("long firmware", &signed_with(&own_header, &long_firmware, &device.key), 400, "invalid-proof").await;
    refusal.check("iat at the epoch", &device.proof(&nonce, &merchant_id, 0), 400, "stale-proof").await;
    refusal.check("iat i64::MIN", &device.proof(&nonce, &merchant_id, i64::MIN), 400, "stale-proof").await;
    refusal.check("iat i64::MAX", &device.proof(&nonce, &merchant_id, i64::MAX), 400, "stale-proof").await;
    let mut float_iat = claims.clone();
    float_iat["iat"] = json!(now as f64 + 0.5);
    refusal.check("fractional iat", &signed_with(&own_header, &float_iat, &device.key), 400, "invalid-proof").await;
    for (name, proof) in [
        ("empty proof", String::new()),
        ("not a JWS", "not-a-jws".to_owned()),
        ("two parts", "a.b".to_owned()),
        ("four parts", format!("{good}.x")),
        ("bad base64", "!!.??.**".to_owned()),
        ("alg none", format!("{}.{}.", vouch_proto::b64::encode(br#"{"alg":"none"}"#), parts[1])),
        ("over 16 KiB", format!("{}.{}.{}", parts[0], "A".repeat(17 * 1024), parts[2])),
    ] {
        refusal.check(name, &proof, 400, "invalid-proof").await;
    }

    // A proof that does not verify names no nonce the server can trust, so none is spent.
    let reply = server.enrol_proof(&provision, &good).await;
    assert_eq!(reply.status.as_u16(), 201, "the untouched nonce no longer enrols: {}", reply.json);
}

#[tokio::test]
async fn nonce_merchant_and_key_refusals_are_audited_and_burn_the_nonce() {
    let server = busy_server().await;
    let merchant_id = server.merchant("Corner shop").await;
    let (_, provision) = server.api_key(&["provision"]).await;
    let refusal = Refusal { server: &server, key: provision.clone() };
    let now = server.now();
    let device = TestDevice::new(DeviceKind::Reader);

    refusal.check("unknown nonce", &device.proof("never-issued", &merchant_id, now), 400, "unknown-nonce").await;

    // A verified proof gets one attempt: refused for its merchant, its nonce is spent.
    let burnt = server.nonce(&provision).await;
    refusal.check("unknown merchant", &device.proof(&burnt, "mch_missing", now), 422, "unknown-merchant").await;
    refusal.check("retry after a refusal", &device.proof(&burnt, &merchant_id, now), 409, "replayed-enrolment").await;

    // Replay: the same proof twice, and the used nonce in a fresh proof by another key.
    let nonce = server.nonce(&provision).await;
    let proof = device.proof(&nonce, &merchant_id, now);
    let first = server.enrol_proof(&provision, &proof).await;
    assert_eq!(first.status.as_u16(), 201, "{}", first.json);
    refusal.check("replayed proof", &proof, 409, "replayed-enrolment").await;
    let other = TestDevice::new(DeviceKind::Reader);
    refusal.check("reused nonce", &other.proof(&nonce, &merchant_id, now), 409, "replayed-enrolment").await;

    // The same key enrolled again under a new nonce, which that refusal spends.
    let again = server.nonce(&provision).await;
    refusal.check("key enrolled twice", &device.proof(&again, &merchant_id, now), 409, "key-already-enrolled").await;
    refusal
        .check("nonce of a refused duplicate", &other.proof(&again, &merchant_id, now), 409, "replayed-enrolment")
        .await;
    // Also when it claims another kind and merchant.
    let elsewhere = server.merchant("Elsewhere").await;
    let mut twin = TestDevice::new(DeviceKind::Terminal);
    twin.key = SigningKey::from_pkcs8_der(&device.key.to_pkcs8_der().unwrap()).unwrap();
    let again = server.nonce(&provision).await;
    refusal
        .check("key enrolled twice elsewhere", &twin.proof(&again, &elsewhere, now), 409, "key-already-enrolled")
        .await;

    assert_eq!(server.device_ids().await, vec![first.json["device_id"].as_str().unwrap().to_owned()]);
    // The refusals are recorded with their reason.
    let reasons: Vec<String> = server
        .audit()
        .await
        .iter()
        .filter(|r| r.entry.action == "device.enrolment_refused")
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.entry.detail).unwrap()["reason"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "unknown-nonce",
            "unknown-merchant",
            "replayed-enrolment",
            "replayed-enrolment",
            "replayed-enrolment",
            "key-already-enrolled",
            "replayed-enrolment",
            "key-already-enrolled",
        ]
    );
}

#[tokio::test]
async fn a_key_without_the_provision_scope_cannot_enrol_or_get_nonces() {
    let server = busy_server().await;
    let merchant_id = server.merchant("Corner shop").await;
    let (_, terminal) = server.api_key(&["terminal"]).await;
    let nonce = server.nonce(&server.admin_key).await;
    let device = TestDevice::new(DeviceKind::Terminal);
    let proof = device.proof(&nonce, &merchant_id, server.now());
    let enrol = Case::new("terminal key enrols", "POST", "/v1/devices").key(&terminal).json(json!({ "proof": proof }));
    server.check(&enrol, 403, "insufficient-scope").await;
    server
        .check(
            &Case::new("terminal key nonce", "POST", "/v1/enrolment-nonces").key(&terminal),
            403,
            "insufficient-scope",
        )
        .await;
    assert!(server.device_ids().await.is_empty());
    // The nonce was not spent by the refused call.
    let reply = server.enrol_proof(&server.admin_key, &proof).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.json);
}

#[tokio::test]
async fn an_expired_nonce_is_refused() {
    let clock = TestClock::starting_now();
    let server = server_with_clock(|config| config.enrolment_nonce_ttl_secs = 30, Arc::new(clock.clone())).await;
    let merchant_id = server.merchant("Corner shop").await;
    let refusal = Refusal { server: &server, key: server.admin_key.clone() };
    let device = TestDevice::new(DeviceKind::Consumer);

    let issued = server.expect(201, "POST", "/v1/enrolment-nonces", Some(&server.admin_key), None).await;
    assert_eq!(issued["expires_at"].as_i64(), Some(server.now() + 30), "{issued}");
    let expired = issued["nonce"].as_str().unwrap().to_owned();
    let on_time = server.nonce(&server.admin_key).await;
    clock.advance(31);
    refusal.check("expired nonce", &device.proof(&expired, &merchant_id, server.now()), 400, "expired-nonce").await;
    // An expired nonce stays expired: a refusal does not turn it into a used one.
    refusal
        .check("expired nonce again", &device.proof(&expired, &merchant_id, server.now()), 400, "expired-nonce")
        .await;

    // At its expiry second a nonce still works.
    clock.advance(-1);
    let reply = server.enrol_proof(&server.admin_key, &device.proof(&on_time, &merchant_id, server.now())).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.json);
    // The credential is dated by the server's clock.
    let (_, claims) = server.verify_credential(reply.json["device_credential"].as_str().unwrap()).await;
    assert_eq!(claims.iat, server.now());
    assert_eq!(claims.exp, server.now() + server.state.config.device_credential_ttl_secs);
}

#[tokio::test]
async fn a_proof_is_judged_by_the_server_clock() {
    let clock = TestClock::starting_now();
    let server = server_with_clock(|config| config.proof_iat_window_secs = 10, Arc::new(clock.clone())).await;
    let merchant_id = server.merchant("Corner shop").await;
    let device = TestDevice::new(DeviceKind::Reader);
    let nonce = server.nonce(&server.admin_key).await;
    let proof = device.proof(&nonce, &merchant_id, server.now());
    clock.advance(11);
    let reply = server.enrol_proof(&server.admin_key, &proof).await;
    assert_problem("proof older than the window", &reply, 400, "stale-proof");
    clock.advance(-1);
    let reply = server.enrol_proof(&server.admin_key, &proof).await;
    assert_eq!(reply.status.as_u16(), 201, "a proof at the window's edge: {}", reply.json);
}

/// A proof built by hand, as a client in another language would, enrols too.
#[tokio::test]
async fn a_hand_built_proof_enrols() {
    let server = busy_server().await;
    let merchant_id = server.merchant("Corner shop").await;
    let device = TestDevice::new(DeviceKind::Pos);
    let nonce = server.nonce(&server.admin_key).await;
    let header = Header::es256(ENROLMENT_PROOF_TYP).with_jwk(device.key.verifying_key().to_jwk());
    let claims = json!({
        "nonce": nonce, "kind": "pos", "model": "P-1", "firmware_version": "7",
        "merchant_id": merchant_id, "iat": server.now(),
    });
    let proof = jwt::encode(&header, &claims, &device.key, &SystemRandom::new()).unwrap();
    let reply = server.enrol_proof(&server.admin_key, &proof).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.json);
    assert_eq!(reply.json["kind"], "pos");
}

/// Of concurrent enrolments racing for one nonce, exactly one wins; the rest are
/// refused as replays and audited, and nothing else is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enrolments_spend_a_nonce_once() {
    let server = busy_server().await;
    let merchant_id = server.merchant("Corner shop").await;
    let nonce = server.nonce(&server.admin_key).await;
    let now = server.now();
    let proofs: Vec<String> =
        (0..4).map(|_| TestDevice::new(DeviceKind::Reader).proof(&nonce, &merchant_id, now)).collect();
    let mark = server.audit_mark().await;
    let key = server.admin_key.as_str();
    let (a, b, c, d) = tokio::join!(
        server.enrol_proof(key, &proofs[0]),
        server.enrol_proof(key, &proofs[1]),
        server.enrol_proof(key, &proofs[2]),
        server.enrol_proof(key, &proofs[3]),
    );
    let replies = [a, b, c, d];
    let winners = replies.iter().filter(|r| r.status.as_u16() == 201).count();
    assert_eq!(winners, 1, "{:?}", replies.iter().map(|r| &r.json).collect::<Vec<_>>());
    for reply in replies.iter().filter(|r| r.status.as_u16() != 201) {
        assert_problem("losing racer", reply, 409, "replayed-enrolment");
    }
    assert_eq!(server.device_ids().await.len(), 1);
    let mut actions: Vec<String> = server.audited_since(mark).await.into_iter().map(|(action, _)| action).collect();
    actions.sort();
    assert_eq!(
        actions,
        ["device.enrolled", "device.enrolment_refused", "device.enrolment_refused", "device.enrolment_refused"]
    );
    server.assert_audit_intact("after the race").await;
}

/// One key enrolled concurrently under several nonces becomes one device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enrolments_of_one_key_make_one_device() {
    let server = busy_server().await;
    let merchant_id = server.merchant("Corner shop").await;
    let device = TestDevice::new(DeviceKind::Pos);
    let mut proofs = Vec::new();
    for _ in 0..3 {
        proofs.push(device.proof(&server.nonce(&server.admin_key).await, &merchant_id, server.now()));
    }
    let key = server.admin_key.as_str();
    let (a, b, c) = tokio::join!(
        server.enrol_proof(key, &proofs[0]),
        server.enrol_proof(key, &proofs[1]),
        server.enrol_proof(key, &proofs[2])
    );
    let replies = [a, b, c];
    assert_eq!(replies.iter().filter(|r| r.status.as_u16() == 201).count(), 1);
    for reply in replies.iter().filter(|r| r.status.as_u16() != 201) {
        assert_problem("second enrolment of the key", reply, 409, "key-already-enrolled");
    }
    assert_eq!(server.device_ids().await.len(), 1);
    server.assert_audit_intact("after the race").await;
}
