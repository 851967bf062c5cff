//! A device maker's certificate authority, as a phone maker runs one at its factory:
//! it certifies the HPKE key each secure element generated for itself. Tests, demos
//! and benchmarks use it to make SEs whose chains Vouch can check.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SerialNumber, SignatureAlgorithm,
};
use vouch_proto::Clock;
use vouch_proto::crypto::{SystemRandom, random_bytes};
use vouch_proto::hpke::{HpkePrivateKey, HpkePublicKey};

use crate::DeviceError;

/// How long a maker's CA certificate is valid.
const CA_VALIDITY_SECS: i64 = 20 * 365 * 86_400;
/// How long an SE certificate is valid: the life of the phone.
const SE_VALIDITY_SECS: i64 = 10 * 365 * 86_400;
/// Certificates start this long before they are made, so that a verifier whose clock
/// is a little behind the factory's accepts them at once.
const BACKDATE_SECS: i64 = 3_600;
const SERIAL_BYTES: usize = 16;

/// Which secure element of a phone a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeKind {
    /// Holds the device key, the payment certificate and the biometric template.
    Crypto,
    /// Runs the payment application.
    App,
}

impl SeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SeKind::Crypto => "crypto",
            SeKind::App => "app",
        }
    }
}

impl std::fmt::Display for SeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an SE certificate says beyond its key and subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeIssuance {
    /// Unix seconds, inclusive.
    pub not_before: i64,
    /// Unix seconds, inclusive.
    pub not_after: i64,
    /// Whether key usage includes keyAgreement, which Vouch requires of an SE key it
    /// seals to. Without it, key usage is digitalSignature alone.
    pub key_agreement: bool,
}

impl SeIssuance {
    /// A certificate as the factory makes it at `now`: valid for the phone's life,
    /// for key agreement.
    pub fn at(now: i64) -> Self {
        SeIssuance {
            not_before: now - BACKDATE_SECS,
            not_after: now.saturating_add(SE_VALIDITY_SECS),
            key_agreement: true,
        }
    }
}

/// A secure element's certified key: the chain it presents and the private key it
/// keeps, which only the SE it is given to uses (zeroized, never shown by `Debug`).
#[derive(Debug)]
pub struct SeCertificate {
    /// PEM, leaf first.
    pub chain_pem: String,
    /// The leaf certificate's DER.
    pub leaf_der: Vec<u8>,
    /// The leaf's serial number: lowercase hex of its DER INTEGER content, as Vouch
    /// names it in a registration and a revocation.
    pub serial: String,
    pub kind: SeKind,
    key: HpkePrivateKey,
}

impl SeCertificate {
    /// The certified key.
    pub fn public_key(&self) -> HpkePublicKey {
        self.key.public_key()
    }

    pub(super) fn key(&self) -> &HpkePrivateKey {
        &self.key
    }
}

/// A device maker's CA: a self-signed P-256 CA certificate with keyCertSign, whose PEM
/// an admin registers with Vouch as an issuer.
#[derive(Debug)]
pub struct DeviceMaker {
    name: String,
    ca: CertifiedIssuer<'static, KeyPair>,
    clock: Arc<dyn Clock>,
    rng: SystemRandom,
}

impl DeviceMaker {
    /// A maker named `name` with a new CA key, its certificate valid from `clock`'s now.
    pub fn new(name: &str, clock: Arc<dyn Clock>, rng: &SystemRandom) -> Result<Self, DeviceError> {
        let now = clock.now_unix();
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(name, &format!("{name} SE CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = datetime(now - BACKDATE_SECS)?;
        params.not_after = datetime(now.saturating_add(CA_VALIDITY_SECS))?;
        params.serial_number = Some(serial(rng)?.0);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(certificate_error)?;
        let ca = CertifiedIssuer::self_signed(params, key).map_err(certificate_error)?;
        Ok(DeviceMaker { name: name.to_owned(), ca, clock, rng: rng.clone() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CA certificate, PEM, as registered with Vouch.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn ca_der(&self) -> &[u8] {
        self.ca.der()
    }

    /// A new secure element of `kind`: it generates its HPKE key, and the CA certifies
    /// the public half for key agreement, valid from now for the phone's life.
    /// `serial_hint` names the SE in the certificate's subject; the serial number itself
    /// is random, so SEs named alike never share one.
    pub fn issue_se(&self, serial_hint: &str, kind: SeKind) -> Result<SeCertificate, DeviceError> {
        self.issue_se_with(serial_hint, kind, &SeIssuance::at(self.clock.now_unix()))
    }

    /// [`DeviceMaker::issue_se`] with the validity and key usage of `issuance`, to make
    /// the certificates a verifier must refuse.
    pub fn issue_se_with(
        &self,
        serial_hint: &str,
        kind: SeKind,
        issuance: &SeIssuance,
    ) -> Result<SeCertificate, DeviceError> {
        let key = HpkePrivateKey::generate(&self.rng)?;
        let (serial_number, serial) = serial(&self.rng)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(&self.name, &format!("{} {kind} SE {serial_hint}", self.name));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = if issuance.key_agreement {
            vec![KeyUsagePurpose::KeyAgreement]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = datetime(issuance.not_before)?;
        params.not_after = datetime(issuance.not_after)?;
        params.serial_number = Some(serial_number);
        let leaf = params.signed_by(&SePublicKey(key.public_key()), &self.ca).map_err(certificate_error)?;
        Ok(SeCertificate { chain_pem: leaf.pem(), leaf_der: leaf.der().to_vec(), key, serial, kind })
    }
}

/// An SE's HPKE public key as the subject key of its certificate: an EC P-256 key
/// (id-ecPublicKey, prime256v1) whose point is the HPKE key's, so the certificate
/// certifies exactly the key the SE opens with.
struct SePublicKey(HpkePublicKey);

impl PublicKeyData for SePublicKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.sec1()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn subject(organization: &str, common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, organization);
    name.push(DnType::CommonName, common_name);
    name
}

/// A random positive serial whose first byte has its top bit clear and is not zero, so
/// its DER INTEGER content is exactly these bytes; and their lowercase hex.
fn serial(rng: &SystemRandom) -> Result<(SerialNumber, String), DeviceError> {
    let mut bytes = random_bytes::<SERIAL_BYTES>(rng)?;
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    Ok((SerialNumber::from_slice(&bytes), vouch_proto::hex::encode(bytes)))
}

fn datetime(unix_secs: i64) -> Result<time::OffsetDateTime, DeviceError> {
    time::OffsetDateTime::from_unix_timestamp(unix_secs)
        .map_err(|e| DeviceError::Certificate(format!("validity time {unix_secs}: {e}")))
}

fn certificate_error(e: rcgen::Error) -> DeviceError {
    DeviceError::Certificate(e.to_string())
}

#[cfg(test)]
mod tests {
    use vouch_proto::x509::{CertificateRefusal, VerifiedChain, check_issuer, pem_certificates, verify_chain};
    use vouch_proto::{FixedClock, ProtoError};

    use super::*;

    const NOW: i64 = 1_760_000_000;

    fn maker() -> DeviceMaker {
        maker_named("Acme Phones")
    }

    fn maker_named(name: &str) -> DeviceMaker {
        DeviceMaker::new(name, Arc::new(FixedClock(NOW)), &SystemRandom::new()).unwrap()
    }

    #[test]
    fn every_se_gets_a_fresh_positive_serial_and_its_chain_in_pem() {
        let maker = maker();
        let crypto = maker.issue_se("phone-1", SeKind::Crypto).unwrap();
        let app = maker.issue_se("phone-1", SeKind::App).unwrap();
        assert_eq!((crypto.kind, app.kind), (SeKind::Crypto, SeKind::App));
        assert_ne!(crypto.serial, app.serial, "a hint reused never reuses a serial");
        for se in [&crypto, &app] {
            assert_eq!(se.serial.len(), 2 * SERIAL_BYTES);
            assert!(matches!(se.serial.as_bytes()[0], b'4'..=b'7'), "{}: positive, no leading zero", se.serial);
            let pem_der = vouch_proto::pem::decode("CERTIFICATE", &se.chain_pem).unwrap();
            assert_eq!(&pem_der[..], &se.leaf_der[..]);
        }
        let ca_der = vouch_proto::pem::decode("CERTIFICATE", &maker.ca_pem()).unwrap();
        assert_eq!(&ca_der[..], maker.ca_der());
        assert_eq!(maker.name(), "Acme Phones");
    }

    /// What Vouch makes of a chain the maker issued, checked against the maker's CA.
    fn verified(maker: &DeviceMaker, se: &SeCertificate, now: i64) -> Result<VerifiedChain, ProtoError> {
        let chain = pem_certificates(&se.chain_pem).unwrap();
        verify_chain(&chain, &[maker.ca_der()], now)
    }

    #[test]
    fn vouch_accepts_the_makers_chains_and_its_ca_and_reads_the_ses_key_and_serial() {
        let maker = maker();
        let issuer = check_issuer(&pem_certificates(&maker.ca_pem()).unwrap()[0], NOW).unwrap();
        assert!(issuer.subject.contains("Acme Phones SE CA"), "{}", issuer.subject);
        for kind in [SeKind::Crypto, SeKind::App] {
            let se = maker.issue_se("phone-1", kind).unwrap();
            let chain = verified(&maker, &se, NOW).unwrap();
            assert_eq!(&chain.leaf_key, se.public_key().sec1());
            assert_eq!(chain.serials, std::slice::from_ref(&se.serial));
            assert_eq!(chain.not_after, NOW + SE_VALIDITY_SECS);
            assert!(chain.leaf_subject.contains(&format!("{kind} SE phone-1")), "{}", chain.leaf_subject);
        }
    }

    #[test]
    fn vouch_refuses_what_the_maker_issues_outside_the_rules() {
        let maker = maker();
        let other_maker = maker_named("Other Phones");
        let namesake = self::maker();
        let factory = SeIssuance::at(NOW);
        let cases = [
            (SeIssuance { not_after: NOW - 1, ..factory }, &maker, CertificateRefusal::Expired),
            (SeIssuance { not_before: NOW + 1, ..factory }, &maker, CertificateRefusal::NotYetValid),
            (SeIssuance { key_agreement: false, ..factory }, &maker, CertificateRefusal::WrongKeyUsage),
            (factory, &other_maker, CertificateRefusal::UnknownIssuer),
            (factory, &namesake, CertificateRefusal::BadSignature),
        ];
        for (issuance, issued_by, expected) in cases {
            let se = issued_by.issue_se_with("phone-1", SeKind::Crypto, &issuance).unwrap();
            match verified(&maker, &se, NOW) {
                Err(ProtoError::CertificateRefused { why, .. }) => assert_eq!(why, expected, "{issuance:?}"),
                other => panic!("{issuance:?}: expected {expected:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_factory_issuance_is_valid_for_the_phones_life_from_an_hour_ago() {
        assert_eq!(
            SeIssuance::at(NOW),
            SeIssuance { not_before: NOW - 3_600, not_after: NOW + SE_VALIDITY_SECS, key_agreement: true }
        );
        assert!(matches!(datetime(i64::MAX), Err(DeviceError::Certificate(_))));
    }
}
