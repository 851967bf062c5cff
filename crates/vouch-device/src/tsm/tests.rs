//! The secure elements and the payment app against a TSM played by the test: server
//! objects signed with a test key whose JWK Set the SEs pin, sealed with the same
//! `vouch_proto::tsm` functions the server uses.

use std::sync::Arc;

use serde::Serialize;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::hpke::HpkePublicKey;
use vouch_proto::jws::Header;
use vouch_proto::tsm::{
    AppManifest, DeviceKey, MANIFEST_TYP, ManifestClaims, MessageBody, PAYMENT_CERTIFICATE_TYP, PROVISION_TYP,
    PaymentCertificateClaims, ProvisionClaims, ProvisionedSecrets, TsmRefusal, message_counter, open_message,
    seal_app_delivery, seal_provisioning,
};
use vouch_proto::{FixedClock, JwkSet, ProtoError, SigningKey, b64, jwt};

use super::*;
use crate::DeviceError;
use crate::sim::tsm_app_manifest;

const NOW: i64 = 1_760_000_000;
const DEVICE: &str = "dev_phone";
const INSTRUMENT: &str = "tok_4111_visa_0042";
const FINGER: &[u8] = b"the user's right index finger";
const PROFILE: &str = "javacard-3.1";
const APP: &str = "com.bank.pay";

/// Vouch as the SEs see it: a signing key published under a kid.
struct TestTsm {
    key: SigningKey,
    kid: String,
    pinned: JwkSet,
    maker: DeviceMaker,
    rng: SystemRandom,
}

/// A provisioning the test made, with what the SE should end up holding.
struct Provisioning {
    answer: ProvisionAnswer,
    device_key: DeviceKey,
    payment_certificate: String,
}

impl TestTsm {
    fn new() -> Self {
        Self::with_kid("tsm-key-1")
    }

    fn with_kid(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let pinned = JwkSet { keys: vec![key.verifying_key().to_jwk().with_kid(kid)] };
        let maker = DeviceMaker::new("Acme Phones", Arc::new(FixedClock(NOW)), &rng).unwrap();
        TestTsm { key, kid: kid.to_owned(), pinned, maker, rng }
    }

    fn sign(&self, typ: &str, claims: &impl Serialize) -> String {
        jwt::encode(&Header::es256(typ).with_kid(&self.kid), claims, &self.key, &self.rng).unwrap()
    }

    fn crypto_se(&self) -> CryptoSe {
        CryptoSe::new(DEVICE, self.maker.issue_se("1", SeKind::Crypto).unwrap(), FINGER)
    }

    fn app_se(&self) -> AppSe {
        AppSe::new(DEVICE, self.maker.issue_se("2", SeKind::App).unwrap(), PROFILE)
    }

    fn payment_certificate(&self, device_id: &str, registration_id: &str) -> String {
        let claims = PaymentCertificateClaims {
            iss: "https://vouch.test".into(),
            sub: device_id.into(),
            registration_id: registration_id.into(),
            instrument: INSTRUMENT.into(),
            iat: NOW,
            exp: NOW + 86_400,
        };
        self.sign(PAYMENT_CERTIFICATE_TYP, &claims)
    }

    /// Provisions `se` as the server does, at `iat`; `edit` then changes the signed
    /// claims (and the answer with them), to make the bundles an SE must refuse.
    fn provision(
        &self,
        se: &CryptoSe,
        registration_id: &str,
        iat: i64,
        edit: impl FnOnce(&mut ProvisionClaims),
    ) -> Provisioning {
        let secrets = ProvisionedSecrets {
            device_key: DeviceKey::generate(&self.rng).unwrap(),
            payment_certificate: self.payment_certificate(se.device_id(), registration_id),
        };
        let sealed = seal_provisioning(
            &se.certificate().public_key(),
            se.device_id(),
            registration_id,
            &se.certificate().serial,
            &secrets,
            &self.rng,
        )
        .unwrap();
        let mut claims = ProvisionClaims {
            iss: "https://vouch.test".into(),
            iat,
            device_id: se.device_id().into(),
            registration_id: registration_id.into(),
            se_serial: se.certificate().serial.clone(),
            enc: b64::encode(sealed.enc),
            ciphertext: b64::encode(&sealed.ciphertext),
        };
        edit(&mut claims);
        let answer = ProvisionAnswer {
            registration_id: claims.registration_id.clone(),
            device_id: claims.device_id.clone(),
            se_serial: claims.se_serial.clone(),
            provisioning: self.sign(PROVISION_TYP, &claims),
            registered_at: iat,
        };
        Provisioning { answer, device_key: secrets.device_key, payment_certificate: secrets.payment_certificate }
    }

    fn provisioned_se(&self) -> (CryptoSe, Provisioning) {
        let mut se = self.crypto_se();
        let provisioning = self.provision(&se, "reg_1", NOW, |_| {});
        se.accept_provisioning(&provisioning.answer, &self.pinned).unwrap();
        (se, provisioning)
    }

    fn manifest_jws(&self, manifest_id: &str, manifest: &AppManifest) -> String {
        let claims = ManifestClaims {
            iss: "https://vouch.test".into(),
            iat: NOW,
            manifest_id: manifest_id.into(),
            manifest: manifest.clone(),
        };
        self.sign(MANIFEST_TYP, &claims)
    }

    /// `manifest_jws` sealed to `se` as the delivery of `manifest_id`.
    fn deliver(&self, se: &AppSe, manifest_id: &str, manifest: &AppManifest, manifest_jws: &str) -> AppDelivery {
        self.sealed_delivery(&se.certificate().public_key(), se.device_id(), manifest_id, manifest, manifest_jws)
    }

    fn sealed_delivery(
        &self,
        key: &HpkePublicKey,
        device_id: &str,
        manifest_id: &str,
        manifest: &AppManifest,
        manifest_jws: &str,
    ) -> AppDelivery {
        let sealed = seal_app_delivery(key, device_id, manifest_id, manifest_jws, &self.rng).unwrap();
        AppDelivery {
            manifest_id: manifest_id.into(),
            app_id: manifest.app_id.clone(),
            version: manifest.version,
            enc: b64::encode(sealed.enc),
            ciphertext: b64::encode(&sealed.ciphertext),
        }
    }

    /// Release `version` of the test app for `code`, signed and delivered to `se`.
    fn release(&self, se: &AppSe, version: u32, code: &[u8]) -> AppDelivery {
        let manifest = tsm_app_manifest(APP, version, code, PROFILE);
        let manifest_id = format!("man_{version}");
        self.deliver(se, &manifest_id, &manifest, &self.manifest_jws(&manifest_id, &manifest))
    }
}

fn code(version: u8) -> Vec<u8> {
    [b"payment applet v".as_slice(), &[version]].concat().repeat(64)
}

#[track_caller]
fn assert_se_refusal<T: std::fmt::Debug>(result: Result<T, DeviceError>, expected: SeRefusal) {
    match result {
        Err(e) => assert_eq!(e.se_refusal(), Some(expected), "{e}"),
        Ok(value) => panic!("expected {expected}, got {value:?}"),
    }
}

#[track_caller]
fn assert_tsm_refusal<T: std::fmt::Debug>(result: Result<T, DeviceError>, expected: TsmRefusal) {
    match result {
        Err(e) => assert_eq!(e.tsm_refusal(), Some(expected), "{e}"),
        Ok(value) => panic!("expected {}, got {value:?}", expected.as_str()),
    }
}

#[track_caller]
fn assert_proto<T: std::fmt::Debug>(result: Result<T, DeviceError>, expected: impl Fn(&ProtoError) -> bool) {
    match result {
        Err(DeviceError::Proto(e)) => assert!(expected(&e), "unexpected {e:?}"),
        other => panic!("expected a protocol refusal, got {other:?}"),
    }
}

#[test]
fn a_provisioned_se_releases_its_certificate_after_a_match_and_counts_messages() {
    let tsm = TestTsm::new();
    let (mut se, provisioning) = tsm.provisioned_se();
    assert!(se.is_provisioned());
    assert_eq!((se.registration_id(), se.instrument(), se.counter()), (Some("reg_1"), Some(INSTRUMENT), 0));

    assert_se_refusal(se.release_payment_certificate(b"someone else's finger"), SeRefusal::BiometricMismatch);
    assert_se_refusal(se.release_payment_certificate(b""), SeRefusal::BiometricMismatch);
    let certificate = se.release_payment_certificate(FINGER).unwrap();
    assert_eq!(certificate, provisioning.payment_certificate);

    let body =
        MessageBody { payment_certificate: certificate, provider_id: "sp_bank".into(), payload: b"pay 12.50".into() };
    for expected in 1..=3 {
        let envelope = se.seal_message(&body).unwrap();
        assert_eq!(message_counter(&envelope).unwrap(), expected);
        assert_eq!(open_message(&provisioning.device_key, DEVICE, &envelope).unwrap(), (expected, body.clone()));
        assert_eq!(se.counter(), expected);
    }
}

type ProtoCheck = fn(&ProtoError) -> bool;
type ClaimsEdit<'a> = Box<dyn Fn(&mut ProvisionClaims) + 'a>;

/// The claims a provisioning JWS carries, unverified.
fn claims_of(answer: &ProvisionAnswer) -> ProvisionClaims {
    let payload = answer.provisioning.split('.').nth(1).unwrap();
    jwt::parse_claims(&b64::decode("test", payload).unwrap()).unwrap()
}

fn flip_last(text: &str) -> String {
    let mut bytes = b64::decode("test", text).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    b64::encode(bytes)
}

#[test]
fn provisioning_not_signed_by_a_pinned_key_is_refused() {
    let tsm = TestTsm::new();
    let mut se = tsm.crypto_se();
    let claims = claims_of(&tsm.provision(&se, "reg_1", NOW, |_| {}).answer);
    let signed = |signer: &TestTsm, typ: &str| ProvisionAnswer {
        registration_id: claims.registration_id.clone(),
        device_id: claims.device_id.clone(),
        se_serial: claims.se_serial.clone(),
        provisioning: signer.sign(typ, &claims),
        registered_at: NOW,
    };
    let same_kid_other_key = TestTsm::new();
    let unpinned_kid = TestTsm::with_kid("tsm-key-9");
    let cases: [(&str, ProvisionAnswer, ProtoCheck); 3] = [
        ("another key under the pinned kid", signed(&same_kid_other_key, PROVISION_TYP), |e| {
            *e == ProtoError::BadSignature
        }),
        ("a key never pinned", signed(&unpinned_kid, PROVISION_TYP), |e| {
            matches!(e, ProtoError::UnknownSigningKey { .. })
        }),
        ("a payment certificate's type", signed(&tsm, PAYMENT_CERTIFICATE_TYP), |e| {
            matches!(e, ProtoError::WrongType { .. })
        }),
    ];
    for (case, answer, expected) in cases {
        match se.accept_provisioning(&answer, &tsm.pinned) {
            Err(DeviceError::Proto(e)) => assert!(expected(&e), "{case}: {e:?}"),
            other => panic!("{case}: {other:?}"),
        }
    }
    se.accept_provisioning(&signed(&tsm, PROVISION_TYP), &tsm.pinned).unwrap();
}

#[test]
fn provisioning_for_another_device_or_se_or_that_does_not_open_is_refused() {
    let tsm = TestTsm::new();
    let mut se = tsm.crypto_se();
    let other_se = tsm.crypto_se();

    let wrong_device = tsm.provision(&se, "reg_1", NOW, |c| c.device_id = "dev_other".into());
    assert_se_refusal(se.accept_provisioning(&wrong_device.answer, &tsm.pinned), SeRefusal::WrongDevice);
    let wrong_se = tsm.provision(&other_se, "reg_1", NOW, |_| {});
    assert_se_refusal(se.accept_provisioning(&wrong_se.answer, &tsm.pinned), SeRefusal::WrongSe);

    let sealed_elsewhere = claims_of(&wrong_se.answer);
    let cases: [(&str, ClaimsEdit); 4] = [
        ("a flipped ciphertext bit", Box::new(|c| c.ciphertext = flip_last(&c.ciphertext))),
        ("another enc", Box::new(|c| c.enc = flip_last(&c.enc))),
        ("another registration id", Box::new(|c| c.registration_id = "reg_2".into())),
        (
            "sealed to another SE's key",
            Box::new(|c| (c.enc, c.ciphertext) = (sealed_elsewhere.enc.clone(), sealed_elsewhere.ciphertext.clone())),
        ),
    ];
    for (case, edit) in cases {
        let provisioning = tsm.provision(&se, "reg_1", NOW, edit);
        let refused = se.accept_provisioning(&provisioning.answer, &tsm.pinned);
        assert_eq!(
            refused.as_ref().err().and_then(DeviceError::tsm_refusal),
            Some(TsmRefusal::ProvisioningNotAuthentic),
            "{case}: {refused:?}"
        );
    }

    let mut disagreeing = tsm.provision(&se, "reg_1", NOW, |_| {});
    disagreeing.answer.registration_id = "reg_9".into();
    assert!(
        matches!(se.accept_provisioning(&disagreeing.answer, &tsm.pinned), Err(DeviceError::Untrusted(_))),
        "the answer must say what Vouch signed"
    );

    assert!(!se.is_provisioned(), "nothing refused was kept");
    assert_se_refusal(se.release_payment_certificate(FINGER), SeRefusal::NotProvisioned);
    let body = MessageBody { payment_certificate: "x".into(), provider_id: "sp_bank".into(), payload: vec![1] };
    assert_se_refusal(se.seal_message(&body), SeRefusal::NotProvisioned);
}

#[test]
fn a_bundle_taken_before_or_older_than_the_one_held_is_refused_and_a_newer_one_restarts_the_counter() {
    let tsm = TestTsm::new();
    let mut se = tsm.crypto_se();
    let older = tsm.provision(&se, "reg_0", NOW - 60, |_| {});
    let first = tsm.provision(&se, "reg_1", NOW, |_| {});
    let newer = tsm.provision(&se, "reg_2", NOW + 60, |_| {});
    se.accept_provisioning(&first.answer, &tsm.pinned).unwrap();
    let body = MessageBody {
        payment_certificate: se.release_payment_certificate(FINGER).unwrap(),
        provider_id: "sp_bank".into(),
        payload: b"hello".into(),
    };
    se.seal_message(&body).unwrap();

    assert_se_refusal(se.accept_provisioning(&first.answer, &tsm.pinned), SeRefusal::ProvisioningReplayed);
    assert_se_refusal(se.accept_provisioning(&older.answer, &tsm.pinned), SeRefusal::ProvisioningReplayed);
    assert_eq!((se.registration_id(), se.counter()), (Some("reg_1"), 1), "a refused bundle changes nothing");

    se.accept_provisioning(&newer.answer, &tsm.pinned).unwrap();
    assert_eq!((se.registration_id(), se.counter()), (Some("reg_2"), 0));
    let body = MessageBody { payment_certificate: se.release_payment_certificate(FINGER).unwrap(), ..body };
    let envelope = se.seal_message(&body).unwrap();
    assert_eq!(open_message(&newer.device_key, DEVICE, &envelope).unwrap().0, 1, "under the new key, from 1");
}

#[test]
fn a_payment_certificate_for_another_device_or_registration_or_expired_when_sealed_is_refused() {
    let tsm = TestTsm::new();
    let mut se = tsm.crypto_se();
    for (device_id, registration_id) in [("dev_other", "reg_1"), (DEVICE, "reg_other")] {
        let secrets = ProvisionedSecrets {
            device_key: DeviceKey::generate(&tsm.rng).unwrap(),
            payment_certificate: tsm.payment_certificate(device_id, registration_id),
        };
        let sealed = seal_provisioning(
            &se.certificate().public_key(),
            DEVICE,
            "reg_1",
            &se.certificate().serial,
            &secrets,
            &tsm.rng,
        )
        .unwrap();
        let provisioning = tsm.provision(&se, "reg_1", NOW, |c| {
            (c.enc, c.ciphertext) = (b64::encode(sealed.enc), b64::encode(&sealed.ciphertext));
        });
        assert_se_refusal(se.accept_provisioning(&provisioning.answer, &tsm.pinned), SeRefusal::CertificateMismatch);
    }
    let after_expiry = tsm.provision(&se, "reg_1", NOW + 2 * 86_400, |_| {});
    assert_proto(se.accept_provisioning(&after_expiry.answer, &tsm.pinned), |e| {
        matches!(e, ProtoError::Expired { .. })
    });
    assert!(!se.is_provisioned());
}

#[test]
fn the_se_seals_only_messages_carrying_its_own_certificate() {
    let tsm = TestTsm::new();
    let (mut se, _) = tsm.provisioned_se();
    let foreign =
        [tsm.payment_certificate(DEVICE, "reg_other"), tsm.payment_certificate("dev_other", "reg_1"), String::new()];
    for payment_certificate in foreign {
        let body = MessageBody { payment_certificate, provider_id: "sp_bank".into(), payload: b"x".into() };
        assert_se_refusal(se.seal_message(&body), SeRefusal::ForeignCertificate);
    }
    assert_eq!(se.counter(), 0, "no counter is used by a refused message");
}

#[test]
fn a_release_installs_when_signed_and_matching_and_replaces_only_an_older_one() {
    let tsm = TestTsm::new();
    let mut se = tsm.app_se();
    let installed = se.install(&tsm.release(&se, 1, &code(1)), &code(1), &tsm.pinned).unwrap();
    assert_eq!((installed.manifest_id.as_str(), installed.manifest.version), ("man_1", 1));
    assert_eq!(se.payment_app(APP).unwrap().version(), 1);
    assert_tsm_refusal(se.install(&tsm.release(&se, 1, &code(1)), &code(1), &tsm.pinned), TsmRefusal::Downgrade);

    se.install(&tsm.release(&se, 3, &code(3)), &code(3), &tsm.pinned).unwrap();
    assert_tsm_refusal(se.install(&tsm.release(&se, 2, &code(2)), &code(2), &tsm.pinned), TsmRefusal::Downgrade);
    assert_eq!(se.installed().len(), 1, "one release per app");
    let app = se.payment_app(APP).unwrap();
    assert_eq!((app.app_id(), app.version(), app.manifest_id()), (APP, 3, "man_3"));
    assert_eq!(se.installed_app(APP).unwrap().code, code(3));
    assert_se_refusal(se.payment_app("com.other.app"), SeRefusal::AppNotInstalled);
}

#[test]
fn a_release_that_is_tampered_unsigned_or_not_for_this_se_is_refused() {
    let tsm = TestTsm::new();
    let mut se = tsm.app_se();
    let other_se = tsm.app_se();
    let manifest = tsm_app_manifest(APP, 1, &code(1), PROFILE);
    let signed = tsm.manifest_jws("man_1", &manifest);

    // The manifest's payload replaced, its signature kept: another code hash.
    let forged_manifest = AppManifest { code_sha256: "0".repeat(64), ..manifest.clone() };
    let forged_payload = tsm.manifest_jws("man_1", &forged_manifest);
    let parts: Vec<&str> = signed.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], forged_payload.split('.').nth(1).unwrap(), parts[2]);
    let delivery = tsm.deliver(&se, "man_1", &manifest, &tampered);
    assert_proto(se.install(&delivery, &code(1), &tsm.pinned), |e| *e == ProtoError::BadSignature);
    let unpinned = TestTsm::with_kid("tsm-key-9").manifest_jws("man_1", &manifest);
    let delivery = tsm.deliver(&se, "man_1", &manifest, &unpinned);
    assert_proto(se.install(&delivery, &code(1), &tsm.pinned), |e| matches!(e, ProtoError::UnknownSigningKey { .. }));

    // Signed, but the code is not the manifest's, or the manifest not for this SE.
    let delivery = tsm.deliver(&se, "man_1", &manifest, &signed);
    let mut altered = code(1);
    altered[0] ^= 1;
    assert_tsm_refusal(se.install(&delivery, &altered, &tsm.pinned), TsmRefusal::CodeHashMismatch);
    assert_tsm_refusal(se.install(&delivery, &code(1)[1..], &tsm.pinned), TsmRefusal::CodeSizeMismatch);
    let other_profile = AppManifest { se_profile: "globalplatform-2.3".into(), ..manifest.clone() };
    let delivery = tsm.deliver(&se, "man_1", &other_profile, &tsm.manifest_jws("man_1", &other_profile));
    assert_tsm_refusal(se.install(&delivery, &code(1), &tsm.pinned), TsmRefusal::WrongSeProfile);

    // The second channel: sealed to another SE or device, altered, or naming another release.
    let to_other_se = tsm.deliver(&other_se, "man_1", &manifest, &signed);
    assert_tsm_refusal(se.install(&to_other_se, &code(1), &tsm.pinned), TsmRefusal::DeliveryNotAuthentic);
    let for_other_device =
        tsm.sealed_delivery(&se.certificate().public_key(), "dev_other", "man_1", &manifest, &signed);
    assert_tsm_refusal(se.install(&for_other_device, &code(1), &tsm.pinned), TsmRefusal::DeliveryNotAuthentic);
    let mut altered_delivery = tsm.deliver(&se, "man_1", &manifest, &signed);
    altered_delivery.ciphertext = flip_last(&altered_delivery.ciphertext);
    assert_tsm_refusal(se.install(&altered_delivery, &code(1), &tsm.pinned), TsmRefusal::DeliveryNotAuthentic);
    let renamed = tsm.deliver(&se, "man_2", &manifest, &signed);
    assert_se_refusal(se.install(&renamed, &code(1), &tsm.pinned), SeRefusal::DeliveryMismatch);
    let other_version = AppDelivery { version: 2, ..tsm.deliver(&se, "man_1", &manifest, &signed) };
    assert_se_refusal(se.install(&other_version, &code(1), &tsm.pinned), SeRefusal::DeliveryMismatch);

    assert!(se.installed().is_empty(), "nothing refused was installed");
}

/// The whole local flow, and then nothing of the crypto SE's is found in what the app
/// SE stores, in any of the encodings it travels in.
#[test]
fn the_app_se_never_holds_the_device_key_registration_or_instrument() {
    let tsm = TestTsm::new();
    let (mut crypto_se, provisioning) = tsm.provisioned_se();
    let mut app_se = tsm.app_se();
    app_se.install(&tsm.release(&app_se, 1, &code(1)), &code(1), &tsm.pinned).unwrap();
    let app = app_se.payment_app(APP).unwrap();

    assert_se_refusal(app.message(&mut crypto_se, b"a stranger", "sp_bank", b"pay"), SeRefusal::BiometricMismatch);
    assert_eq!(crypto_se.counter(), 0, "no match, no message");
    let envelope = app.message(&mut crypto_se, FINGER, "sp_bank", b"pay 12.50 to shop 7").unwrap();
    let (counter, body) = open_message(&provisioning.device_key, DEVICE, &envelope).unwrap();
    assert_eq!(
        (counter, body.provider_id.as_str(), body.payload.as_slice()),
        (1, "sp_bank", &b"pay 12.50 to shop 7"[..])
    );
    assert_eq!(body.payment_certificate, provisioning.payment_certificate);

    let state = app_se.state_bytes();
    let contains = |needle: &[u8]| state.windows(needle.len()).any(|w| w == needle);
    assert!(contains(&code(1)) && contains(b"man_1"), "the state is what the app SE stores");
    let device_key = provisioning.device_key.as_bytes();
    let secrets: [(&str, Vec<u8>); 7] = [
        ("device key", device_key.to_vec()),
        ("device key, base64url", b64::encode(device_key).into_bytes()),
        ("registration id", b"reg_1".to_vec()),
        ("instrument", INSTRUMENT.as_bytes().to_vec()),
        ("payment certificate", provisioning.payment_certificate.clone().into_bytes()),
        (
            "payment certificate's payload",
            provisioning.payment_certificate.split('.').nth(1).unwrap().as_bytes().to_vec(),
        ),
        ("the message", envelope.clone()),
    ];
    for (what, secret) in secrets {
        assert!(!contains(&secret), "the app SE holds the {what}");
    }
    assert!(!format!("{app_se:?}{app:?}").contains(INSTRUMENT));
}

#[test]
fn debug_output_shows_no_secret() {
    let tsm = TestTsm::new();
    let (se, provisioning) = tsm.provisioned_se();
    let shown = format!("{se:?}");
    assert!(shown.contains(DEVICE) && shown.contains(&se.certificate().serial), "{shown}");
    for secret in [
        b64::encode(provisioning.device_key.as_bytes()),
        provisioning.payment_certificate.clone(),
        INSTRUMENT.to_owned(),
        "reg_1".to_owned(),
    ] {
        assert!(!shown.contains(&secret), "{shown}");
    }
}
