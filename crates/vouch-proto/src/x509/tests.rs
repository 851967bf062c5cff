use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SerialNumber, SignatureAlgorithm, date_time_ymd,
};

use super::*;

fn now() -> i64 {
    date_time_ymd(2030, 1, 1).unix_timestamp()
}

/// A certificate made for a test, with what is needed to issue others under it.
struct Made {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

impl Made {
    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    fn timestamps(&self) -> (i64, i64) {
        (self.params.not_before.unix_timestamp(), self.params.not_after.unix_timestamp())
    }
}

fn params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Maker");
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.not_before = date_time_ymd(2025, 1, 1);
    params.not_after = date_time_ymd(2040, 1, 1);
    params
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = params(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn leaf_params(common_name: &str) -> CertificateParams {
    let mut params = params(common_name);
    params.key_usages = vec![KeyUsagePurpose::KeyAgreement];
    params
}

fn self_signed(params: CertificateParams, algorithm: &'static SignatureAlgorithm) -> Made {
    let key = KeyPair::generate_for(algorithm).unwrap();
    let der = params.self_signed(&key).unwrap().der().to_vec();
    Made { params, key, der }
}

fn signed(params: CertificateParams, algorithm: &'static SignatureAlgorithm, by: &Made) -> Made {
    let key = KeyPair::generate_for(algorithm).unwrap();
    let der = params.signed_by(&key, &by.issuer()).unwrap().der().to_vec();
    Made { params, key, der }
}

fn root() -> Made {
    self_signed(ca_params("Maker Root"), &PKCS_ECDSA_P256_SHA256)
}

fn leaf_under(ca: &Made) -> Made {
    signed(leaf_params("SE 0001"), &PKCS_ECDSA_P256_SHA256, ca)
}

fn why<T: std::fmt::Debug>(result: Result<T, ProtoError>) -> CertificateRefusal {
    match result {
        Err(ProtoError::CertificateRefused { why, .. }) => why,
        other => panic!("expected a certificate refusal, got {other:?}"),
    }
}

fn verify(chain: &[&Made], issuers: &[&Made], now: i64) -> Result<VerifiedChain, ProtoError> {
    let chain: Vec<Vec<u8>> = chain.iter().map(|made| made.der.clone()).collect();
    let issuers: Vec<&[u8]> = issuers.iter().map(|made| made.der.as_slice()).collect();
    verify_chain(&chain, &issuers, now)
}

#[test]
fn leaf_signed_by_a_registered_ca_verifies() {
    let root = root();
    let mut params = leaf_params("SE 0001");
    params.serial_number = Some(SerialNumber::from_slice(&[0x80, 0x01]));
    let leaf = signed(params, &PKCS_ECDSA_P256_SHA256, &root);

    let verified = verify(&[&leaf], &[&root], now()).unwrap();
    assert_eq!(verified.leaf_key.as_slice(), leaf.key.public_key_raw());
    assert_eq!(verified.leaf_subject, "O=Maker, CN=SE 0001");
    assert_eq!(verified.serials, ["008001"]);
    assert_eq!(verified.issuer, 0);
    assert_eq!(verified.not_after, leaf.timestamps().1);
}

#[test]
fn leaf_and_intermediate_end_at_the_right_registered_ca() {
    let other = self_signed(ca_params("Other Root"), &PKCS_ECDSA_P256_SHA256);
    let root = self_signed(ca_params("Maker Root"), &PKCS_ECDSA_P384_SHA384);
    let intermediate = signed(ca_params("Maker SE CA"), &PKCS_ECDSA_P384_SHA384, &root);
    let leaf = leaf_under(&intermediate);

    let verified = verify(&[&leaf, &intermediate], &[&other, &root], now()).unwrap();
    assert_eq!(verified.issuer, 1);
    assert_eq!(verified.serials.len(), 2);
    assert_eq!(verified.leaf_key.as_slice(), leaf.key.public_key_raw());
}

#[test]
fn a_copy_of_the_registered_ca_at_the_end_stands_for_it() {
    let root = root();
    let intermediate = signed(ca_params("Maker SE CA"), &PKCS_ECDSA_P256_SHA256, &root);
    let leaf = leaf_under(&intermediate);

    // The root sent along with the chain.
    let verified = verify(&[&leaf, &intermediate, &root], &[&root], now()).unwrap();
    assert_eq!((verified.issuer, verified.serials.len()), (0, 2));
    // The maker registered its intermediate, and the chain carries it.
    let verified = verify(&[&leaf, &intermediate], &[&intermediate], now()).unwrap();
    assert_eq!((verified.issuer, verified.serials.len()), (0, 1));
}

#[test]
fn a_ca_that_is_not_registered_is_an_unknown_issuer() {
    let root = root();
    let other = self_signed(ca_params("Other Root"), &PKCS_ECDSA_P256_SHA256);
    let leaf = leaf_under(&root);
    assert_eq!(why(verify(&[&leaf], &[&other], now())), CertificateRefusal::UnknownIssuer);
    assert_eq!(why(verify(&[&leaf], &[], now())), CertificateRefusal::UnknownIssuer);

    // Presented out of order: the second certificate did not issue the first.
    let intermediate = signed(ca_params("Maker SE CA"), &PKCS_ECDSA_P256_SHA256, &root);
    assert_eq!(why(verify(&[&leaf, &intermediate], &[&root], now())), CertificateRefusal::UnknownIssuer);
}

#[test]
fn a_signature_by_another_key_under_the_same_name_is_refused() {
    let root = root();
    let impostor = self_signed(ca_params("Maker Root"), &PKCS_ECDSA_P256_SHA256);
    let leaf = leaf_under(&impostor);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::BadSignature);

    // With both registered under the one name, the one whose key verifies is chosen.
    assert_eq!(verify(&[&leaf], &[&root, &impostor], now()).unwrap().issuer, 1);
}

#[test]
fn a_tampered_certificate_is_refused() {
    let root = root();
    let mut leaf = leaf_under(&root);
    // The last byte is the end of the signature's s value.
    let last = leaf.der.len() - 1;
    leaf.der[last] ^= 0x01;
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::BadSignature);

    // A byte inside the signed part (the leaf's common name) breaks only the signature.
    let mut leaf = leaf_under(&root);
    let at = leaf.der.windows(7).position(|w| w == b"SE 0001").unwrap();
    leaf.der[at] = b'X';
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::BadSignature);
}

#[test]
fn validity_bounds_are_inclusive() {
    let root = root();
    let leaf = leaf_under(&root);
    let (not_before, not_after) = leaf.timestamps();
    verify(&[&leaf], &[&root], not_before).unwrap();
    verify(&[&leaf], &[&root], not_after).unwrap();
    assert_eq!(why(verify(&[&leaf], &[&root], not_before - 1)), CertificateRefusal::NotYetValid);
    assert_eq!(why(verify(&[&leaf], &[&root], not_after + 1)), CertificateRefusal::Expired);
}

#[test]
fn an_expired_or_not_yet_valid_certificate_anywhere_is_refused() {
    let root = root();
    let mut expired = leaf_params("SE 0001");
    expired.not_after = date_time_ymd(2029, 12, 31);
    let leaf = signed(expired, &PKCS_ECDSA_P256_SHA256, &root);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::Expired);

    let mut early = leaf_params("SE 0001");
    early.not_before = date_time_ymd(2030, 1, 2);
    let leaf = signed(early, &PKCS_ECDSA_P256_SHA256, &root);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::NotYetValid);

    let mut expired = ca_params("Maker SE CA");
    expired.not_after = date_time_ymd(2029, 12, 31);
    let intermediate = signed(expired, &PKCS_ECDSA_P256_SHA256, &root);
    let leaf = leaf_under(&intermediate);
    assert_eq!(why(verify(&[&leaf, &intermediate], &[&root], now())), CertificateRefusal::Expired);

    // The registered CA itself has expired since it was registered.
    let mut expired = ca_params("Maker Root");
    expired.not_after = date_time_ymd(2029, 12, 31);
    let root = self_signed(expired, &PKCS_ECDSA_P256_SHA256);
    let leaf = leaf_under(&root);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::Expired);
}

#[test]
fn the_leaf_must_be_for_key_agreement() {
    let root = root();
    let mut signing = leaf_params("SE 0001");
    signing.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let leaf = signed(signing, &PKCS_ECDSA_P256_SHA256, &root);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::WrongKeyUsage);

    let mut no_key_usage = leaf_params("SE 0001");
    no_key_usage.key_usages = Vec::new();
    let leaf = signed(no_key_usage, &PKCS_ECDSA_P256_SHA256, &root);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::WrongKeyUsage);
}

#[test]
fn a_leaf_that_is_a_ca_is_refused() {
    let root = root();
    let mut ca = leaf_params("SE 0001");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyAgreement, KeyUsagePurpose::KeyCertSign];
    let leaf = signed(ca, &PKCS_ECDSA_P256_SHA256, &root);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::WrongKeyUsage);

    // basicConstraints with cA false is an end entity.
    let mut explicit = leaf_params("SE 0001");
    explicit.is_ca = IsCa::ExplicitNoCa;
    let leaf = signed(explicit, &PKCS_ECDSA_P256_SHA256, &root);
    verify(&[&leaf], &[&root], now()).unwrap();
}

#[test]
fn an_intermediate_must_be_a_ca_that_signs_certificates() {
    let root = root();
    let mut not_ca = params("Maker SE CA");
    not_ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let intermediate = signed(not_ca, &PKCS_ECDSA_P256_SHA256, &root);
    let leaf = leaf_under(&intermediate);
    assert_eq!(why(verify(&[&leaf, &intermediate], &[&root], now())), CertificateRefusal::NotCa);

    let mut no_cert_sign = ca_params("Maker SE CA");
    no_cert_sign.key_usages = vec![KeyUsagePurpose::CrlSign];
    let intermediate = signed(no_cert_sign, &PKCS_ECDSA_P256_SHA256, &root);
    let leaf = leaf_under(&intermediate);
    assert_eq!(why(verify(&[&leaf, &intermediate], &[&root], now())), CertificateRefusal::WrongKeyUsage);
}

#[test]
fn the_leaf_key_must_be_p256() {
    let root = root();
    let leaf = signed(leaf_params("SE 0001"), &PKCS_ECDSA_P384_SHA384, &root);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::UnsupportedKey);

    let leaf = signed(leaf_params("SE 0001"), &PKCS_ED25519, &root);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::UnsupportedKey);
}

#[test]
fn more_than_chain_max_certificates_are_refused() {
    let root = root();
    let mut chain = vec![root];
    for depth in 0..CHAIN_MAX {
        let next = signed(ca_params(&format!("Maker CA {depth}")), &PKCS_ECDSA_P256_SHA256, chain.last().unwrap());
        chain.push(next);
    }
    let leaf = leaf_under(chain.last().unwrap());
    let root = chain.remove(0);
    let mut presented: Vec<&Made> = chain.iter().rev().collect();
    presented.insert(0, &leaf);
    assert_eq!(presented.len(), CHAIN_MAX + 1);
    assert_eq!(why(verify(&presented, &[&root], now())), CertificateRefusal::ChainTooLong);

    // CHAIN_MAX is accepted.
    presented.pop();
    verify(&presented, &[chain.first().unwrap()], now()).unwrap();
}

#[test]
fn path_length_constraints_are_kept() {
    let mut constrained = ca_params("Maker Root");
    constrained.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let root = self_signed(constrained, &PKCS_ECDSA_P256_SHA256);
    let intermediate = signed(ca_params("Maker SE CA"), &PKCS_ECDSA_P256_SHA256, &root);
    let leaf = leaf_under(&intermediate);
    assert_eq!(why(verify(&[&leaf, &intermediate], &[&root], now())), CertificateRefusal::ChainTooLong);
    // pathLenConstraint 0 still lets the CA issue leaves.
    verify(&[&leaf_under(&root)], &[&root], now()).unwrap();
}

#[test]
fn garbage_and_trailing_bytes_are_malformed() {
    let root = root();
    let garbage = vec![vec![0x30, 0x03, 0x02, 0x01, 0x01]];
    assert_eq!(why(verify_chain(&garbage, &[&root.der], now())), CertificateRefusal::Malformed);
    assert_eq!(why(verify_chain(&[b"not DER".to_vec()], &[&root.der], now())), CertificateRefusal::Malformed);
    assert_eq!(why(verify_chain(&[], &[&root.der], now())), CertificateRefusal::Malformed);

    let mut trailing = leaf_under(&root);
    trailing.der.push(0);
    assert_eq!(why(verify(&[&trailing], &[&root], now())), CertificateRefusal::Malformed);

    let leaf = leaf_under(&root);
    assert_eq!(why(verify_chain(&[leaf.der], &[&[0x30, 0x00]], now())), CertificateRefusal::Malformed);
}

#[test]
fn a_negative_serial_is_malformed() {
    let root = root();
    let mut params = leaf_params("SE 0001");
    params.serial_number = Some(SerialNumber::from_slice(&[0x12, 0x34, 0x56]));
    let mut leaf = signed(params, &PKCS_ECDSA_P256_SHA256, &root);
    let at = leaf.der.windows(5).position(|w| w == [0x02, 0x03, 0x12, 0x34, 0x56]).unwrap();
    leaf.der[at + 2] = 0x92;
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::Malformed);
}

#[test]
fn an_unprocessed_critical_extension_is_refused() {
    let root = root();
    let mut params = leaf_params("SE 0001");
    // An arbitrary private-arc extension whose meaning this module cannot know.
    let mut extension = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
    extension.set_criticality(true);
    params.custom_extensions = vec![extension];
    let leaf = signed(params.clone(), &PKCS_ECDSA_P256_SHA256, &root);
    assert_eq!(why(verify(&[&leaf], &[&root], now())), CertificateRefusal::UnsupportedCriticalExtension);

    // The same extension not marked critical is ignored.
    params.custom_extensions[0].set_criticality(false);
    let leaf = signed(params, &PKCS_ECDSA_P256_SHA256, &root);
    verify(&[&leaf], &[&root], now()).unwrap();
}

#[test]
fn check_issuer_accepts_a_ca() {
    for algorithm in [&PKCS_ECDSA_P256_SHA256, &PKCS_ECDSA_P384_SHA384] {
        let root = self_signed(ca_params("Maker Root"), algorithm);
        let issuer = check_issuer(&root.der, now()).unwrap();
        assert_eq!(
            issuer,
            IssuerCertificate {
                subject: "O=Maker, CN=Maker Root".into(),
                not_before: root.timestamps().0,
                not_after: root.timestamps().1,
                fingerprint: sha256(&root.der),
            }
        );
    }
    // An intermediate may be registered as a maker's CA too.
    let intermediate = signed(ca_params("Maker SE CA"), &PKCS_ECDSA_P256_SHA256, &root());
    check_issuer(&intermediate.der, now()).unwrap();
}

#[test]
fn check_issuer_refusals() {
    let root = root();
    let cases: Vec<(&str, Vec<u8>, i64, CertificateRefusal)> = vec![
        ("a leaf", leaf_under(&root).der, now(), CertificateRefusal::NotCa),
        ("an expired CA", root.der.clone(), root.timestamps().1 + 1, CertificateRefusal::Expired),
        ("a CA not yet valid", root.der.clone(), root.timestamps().0 - 1, CertificateRefusal::NotYetValid),
        (
            "a CA without keyCertSign",
            {
                let mut params = ca_params("Maker Root");
                params.key_usages = vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
                self_signed(params, &PKCS_ECDSA_P256_SHA256).der
            },
            now(),
            CertificateRefusal::WrongKeyUsage,
        ),
        (
            "a CA without keyUsage",
            {
                let mut params = ca_params("Maker Root");
                params.key_usages = Vec::new();
                self_signed(params, &PKCS_ECDSA_P256_SHA256).der
            },
            now(),
            CertificateRefusal::WrongKeyUsage,
        ),
        (
            "an Ed25519 CA",
            self_signed(ca_params("Maker Root"), &PKCS_ED25519).der,
            now(),
            CertificateRefusal::UnsupportedKey,
        ),
        ("garbage", b"garbage".to_vec(), now(), CertificateRefusal::Malformed),
    ];
    for (case, der, at, expected) in cases {
        assert_eq!(why(check_issuer(&der, at)), expected, "{case}");
    }
}

#[test]
fn pem_certificates_in_order() {
    let root = root();
    let leaf = leaf_under(&root);
    let text = format!("{}\n{}", *pem::encode("CERTIFICATE", &leaf.der), *pem::encode("CERTIFICATE", &root.der));
    assert_eq!(pem_certificates(&text).unwrap(), [leaf.der, root.der]);

    assert_eq!(why(pem_certificates("no certificate")), CertificateRefusal::Malformed);
    assert_eq!(
        why(pem_certificates("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")),
        CertificateRefusal::Malformed
    );
}

#[test]
fn serials_have_one_canonical_form() {
    let cases = [
        ("80:01", "008001"),
        ("008001", "008001"),
        ("00:00:80:01", "008001"),
        ("7F01", "7f01"),
        ("0001", "01"),
        ("abc", "0abc"),
        ("0", "00"),
        (" A1:B2 ", "00a1b2"),
    ];
    for (text, canonical) in cases {
        assert_eq!(canonical_serial(text).unwrap(), canonical, "{text}");
    }
    for bad in ["", ":", "xyz", "12 34", "0x12", "1".repeat(2 * SERIAL_BYTES_MAX + 1).as_str()] {
        assert!(matches!(canonical_serial(bad), Err(ProtoError::Malformed { .. })), "{bad:?}");
    }

    // What an operator copies from OpenSSL matches what a verified chain reports.
    let root = root();
    let mut params = leaf_params("SE 0001");
    params.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x9a, 0x0b]));
    let leaf = signed(params, &PKCS_ECDSA_P256_SHA256, &root);
    let serials = verify(&[&leaf], &[&root], now()).unwrap().serials;
    assert_eq!(serials, [canonical_serial("9A:0B").unwrap()]);
}
