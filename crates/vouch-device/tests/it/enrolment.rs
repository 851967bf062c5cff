use vouch_device::sim::{self, DeviceProfile};
use vouch_device::{DeviceError, DeviceIdentity, VouchClient};
use vouch_proto::SystemClock;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;

use crate::support::start;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_enrols_and_its_credential_verifies_across_rotation() {
    let server = start().await;
    let admin = server.admin();
    admin.health().await.unwrap();
    let merchant = admin.create_merchant("Corner Shop").await.unwrap();
    let provision = admin.create_api_key(&["provision"], "factory line").await.unwrap();
    let factory = VouchClient::new(&server.url).unwrap().with_api_key(&provision.api_key);

    let rng = SystemRandom::new();
    let identity = DeviceIdentity::generate(&rng).unwrap();
    let profile = DeviceProfile::simulated(DeviceKind::Reader, &merchant.merchant_id);
    let enrolled = sim::enrol(&factory, &identity, &profile, &SystemClock, &rng).await.unwrap();
    assert_eq!(enrolled.kind, DeviceKind::Reader);
    assert_eq!(admin.device(&enrolled.device_id).await.unwrap().status, "active");

    let new_kid = admin.rotate_keys().await.unwrap();
    let jwks = admin.jwks().await.unwrap();
    assert_eq!(jwks.keys.len(), 2, "the retired key stays published");
    assert_eq!(jwks.keys[0].kid.as_deref(), Some(new_kid.as_str()));
    sim::verify_device_credential(&enrolled.device_credential, &jwks, &SystemClock).unwrap();

    let second = DeviceIdentity::generate(&rng).unwrap();
    let enrolled_after = sim::enrol(&factory, &second, &profile, &SystemClock, &rng).await.unwrap();
    let header = vouch_proto::jws::UnverifiedJws::parse(&enrolled_after.device_credential).unwrap();
    assert_eq!(header.header().kid.as_deref(), Some(new_kid.as_str()));

    let audit = admin.verify_audit().await.unwrap();
    assert!(audit.intact, "{audit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_enrolment_and_reused_key_are_refused() {
    let server = start().await;
    let admin = server.admin();
    let merchant = admin.create_merchant("Corner Shop").await.unwrap();
    let rng = SystemRandom::new();
    let identity = DeviceIdentity::generate(&rng).unwrap();
    let profile = DeviceProfile::simulated(DeviceKind::Terminal, &merchant.merchant_id);

    let proof = sim::enrolment_proof(&admin, &identity, &profile, &SystemClock, &rng).await.unwrap();
    admin.enrol(&proof).await.unwrap();
    let replay = admin.enrol(&proof).await.unwrap_err();
    assert_eq!(replay.problem_reason(), Some("replayed-enrolment"), "{replay}");

    let again = sim::enrol(&admin, &identity, &profile, &SystemClock, &rng).await.unwrap_err();
    assert_eq!(again.problem_reason(), Some("key-already-enrolled"), "{again}");
    assert!(matches!(again, DeviceError::Problem { status: 409, .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_and_revoked_devices_are_reported() {
    let server = start().await;
    let admin = server.admin();
    let merchant = admin.create_merchant("Corner Shop").await.unwrap();
    let rng = SystemRandom::new();
    let identity = DeviceIdentity::generate(&rng).unwrap();
    let profile = DeviceProfile::simulated(DeviceKind::Pos, &merchant.merchant_id);
    let enrolled = sim::enrol(&admin, &identity, &profile, &SystemClock, &rng).await.unwrap();
    let id = &enrolled.device_id;
    assert_eq!(admin.change_device_status(id, "suspend", "lost").await.unwrap().status, "suspended");
    assert_eq!(admin.change_device_status(id, "reactivate", "found").await.unwrap().status, "active");
    assert_eq!(admin.change_device_status(id, "revoke", "stolen").await.unwrap().status, "revoked");
    let refused = admin.change_device_status(id, "reactivate", "oops").await.unwrap_err();
    assert_eq!(refused.problem_reason(), Some("invalid-transition"));
    assert_eq!(admin.devices(Some(&merchant.merchant_id)).await.unwrap().len(), 1);
}

/// The credential is plain JOSE: a library that shares no code with Vouch verifies it
/// with nothing but the published JWK Set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_jose_library_verifies_the_device_credential() {
    let server = start().await;
    let admin = server.admin();
    let merchant = admin.create_merchant("Corner Shop").await.unwrap();
    let rng = SystemRandom::new();
    let identity = DeviceIdentity::generate(&rng).unwrap();
    let profile = DeviceProfile::simulated(DeviceKind::Consumer, &merchant.merchant_id);
    let enrolled = sim::enrol(&admin, &identity, &profile, &SystemClock, &rng).await.unwrap();

    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(serde_json::to_value(admin.jwks().await.unwrap()).unwrap()).unwrap();
    let header = jsonwebtoken::decode_header(&enrolled.device_credential).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("kid is published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_issuer(&[server.state.config.issuer.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "sub"]);
    let decoded = jsonwebtoken::decode::<serde_json::Value>(&enrolled.device_credential, &key, &validation).unwrap();
    assert_eq!(decoded.claims["sub"], enrolled.device_id.as_str());
    assert_eq!(decoded.claims["kind"], "consumer");
    assert_eq!(decoded.claims["cnf"]["jwk"]["x"], identity.jwk().x.as_str());

    let mut tampered = enrolled.device_credential.clone();
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    assert!(jsonwebtoken::decode::<serde_json::Value>(&tampered, &key, &validation).is_err());
}
