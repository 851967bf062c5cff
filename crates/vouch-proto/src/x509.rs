//! X.509 certificates of secure elements and of the device makers' CAs that vouch for them:
//! the checks of RFC 5280 section 6 this service needs, sans-IO (the time is a parameter).
//!
//! A device maker registers its CA ([`check_issuer`]); a secure element presents its chain,
//! leaf first ([`verify_chain`]). Parsing is x509-parser's; every signature is verified
//! with aws-lc-rs, the crate's one crypto back-end. Keys are EC P-256 or P-384 with ECDSA
//! over SHA-256 or SHA-384; the leaf's key is P-256, since it is the key the secure element
//! is sealed to.
//!
//! Names are matched as their DER bytes, as webpki does, not by RFC 5280's case-folding
//! comparison: a CA writes its name in its certificates the way it wrote it in its own.
//!
//! Serial numbers are given in one canonical text form, which the server stores and matches
//! revocations on: lowercase hex, two digits per byte, of the minimal DER INTEGER content of
//! the serial (so `00` leads when the first byte of the magnitude is 0x80 or above, and no
//! other zero byte leads). [`canonical_serial`] brings an operator's text to that form.

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA384_ASN1, ECDSA_P384_SHA256_ASN1, ECDSA_P384_SHA384_ASN1,
    EcdsaVerificationAlgorithm, UnparsedPublicKey,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{KeyUsage, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
    Oid,
};
use x509_parser::prelude::FromDer;

use crate::{ProtoError, VerifyingKey, crypto::sha256, pem};

/// Most certificates a secure element may present: its own and up to three intermediates.
pub const CHAIN_MAX: usize = 4;
/// Largest DER certificate accepted; an EC certificate is well under 2 KiB.
pub const CERTIFICATE_BYTES_MAX: usize = 16 * 1024;
/// Longest serial number, in DER INTEGER content bytes. RFC 5280 allows 20; the margin is
/// for makers' CAs that do not keep to it.
pub const SERIAL_BYTES_MAX: usize = 32;
/// Length of an uncompressed SEC1 P-256 point.
const P256_POINT_BYTES: usize = 65;

/// Why a certificate or chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateRefusal {
    /// Not a DER X.509 certificate, or one that breaks a rule of its encoding.
    Malformed,
    /// The chain does not end at a registered CA, or a certificate is not issued by the next.
    UnknownIssuer,
    /// A signature does not verify under the issuer's key, or uses an unsupported algorithm.
    BadSignature,
    Expired,
    NotYetValid,
    /// keyUsage lacks what the certificate's place needs (keyCertSign for a CA,
    /// keyAgreement for the leaf), or the leaf is a CA.
    WrongKeyUsage,
    /// A certificate that issues another is not a CA (basicConstraints cA).
    NotCa,
    /// The key is not EC P-256 or P-384 (P-256 for the leaf).
    UnsupportedKey,
    /// More than [`CHAIN_MAX`] certificates, or more intermediates than a CA's pathLenConstraint allows.
    ChainTooLong,
    /// A critical extension this module does not process (only basicConstraints and keyUsage).
    UnsupportedCriticalExtension,
}

impl CertificateRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateRefusal::Malformed => "malformed-certificate",
            CertificateRefusal::UnknownIssuer => "unknown-issuer",
            CertificateRefusal::BadSignature => "bad-certificate-signature",
            CertificateRefusal::Expired => "certificate-expired",
            CertificateRefusal::NotYetValid => "certificate-not-yet-valid",
            CertificateRefusal::WrongKeyUsage => "wrong-key-usage",
            CertificateRefusal::NotCa => "not-a-ca",
            CertificateRefusal::UnsupportedKey => "unsupported-key",
            CertificateRefusal::ChainTooLong => "chain-too-long",
            CertificateRefusal::UnsupportedCriticalExtension => "unsupported-critical-extension",
        }
    }
}

fn refused(why: CertificateRefusal, detail: impl ToString) -> ProtoError {
    ProtoError::CertificateRefused { why, detail: detail.to_string() }
}

/// The DER of every `CERTIFICATE` block in `text`, in order; at least one.
pub fn pem_certificates(text: &str) -> Result<Vec<Vec<u8>>, ProtoError> {
    let blocks = pem::decode_all("CERTIFICATE", text).map_err(|e| refused(CertificateRefusal::Malformed, e))?;
    if blocks.is_empty() {
        return Err(refused(CertificateRefusal::Malformed, "no -----BEGIN CERTIFICATE----- block"));
    }
    Ok(blocks.iter().map(|der| der.to_vec()).collect())
}

/// A registered device maker's CA, as [`check_issuer`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerCertificate {
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the DER.
    pub fingerprint: [u8; 32],
}

/// A device maker's CA as registered: CA (basicConstraints cA) with keyCertSign, EC P-256
/// or P-384 key, valid at `now`.
pub fn check_issuer(der: &[u8], now: i64) -> Result<IssuerCertificate, ProtoError> {
    let cert = Certificate::parse(der, "the maker's certificate")?;
    cert.check_ca()?;
    cert.check_time(now)?;
    Ok(IssuerCertificate {
        subject: cert.x509.subject().to_string(),
        not_before: cert.not_before(),
        not_after: cert.not_after(),
        fingerprint: sha256(der),
    })
}

/// What a verified chain says about its secure element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChain {
    /// P-256, uncompressed SEC1.
    pub leaf_key: [u8; P256_POINT_BYTES],
    pub leaf_subject: String,
    /// The canonical serial (module doc) of each presented certificate below the
    /// registered CA, leaf first.
    pub serials: Vec<String>,
    /// Index into `issuers` of the registered CA the chain ends at.
    pub issuer: usize,
    /// The leaf's.
    pub not_after: i64,
}

/// Leaf first; each certificate signed by the next (issuer DN == subject DN and the
/// signature verifies), the last by one of `issuers` (DER of registered CA certificates).
/// Every certificate valid at `now` (inclusive bounds); intermediates and issuers CA with
/// keyCertSign; the leaf not a CA, its key P-256, with keyUsage present and including
/// keyAgreement.
///
/// A chain may end with a copy of the registered CA itself, as chains sent with their
/// root do: it is then taken as that CA and not as one of the presented certificates.
pub fn verify_chain(chain: &[Vec<u8>], issuers: &[&[u8]], now: i64) -> Result<VerifiedChain, ProtoError> {
    if chain.len() > CHAIN_MAX {
        return Err(refused(
            CertificateRefusal::ChainTooLong,
            format!("{} certificates presented, at most {CHAIN_MAX}", chain.len()),
        ));
    }
    let mut presented = chain
        .iter()
        .enumerate()
        .map(|(index, der)| Certificate::parse(der, &format!("certificate {index} of the chain")))
        .collect::<Result<Vec<_>, _>>()?;
    let registered = issuers
        .iter()
        .enumerate()
        .map(|(index, der)| Certificate::parse(der, &format!("registered CA {index}")))
        .collect::<Result<Vec<_>, _>>()?;

    // A copy of a registered CA at the end stands for that CA; the leaf never does.
    let anchor_copy = match presented.split_last() {
        Some((last, below)) if !below.is_empty() => registered.iter().position(|ca| ca.der == last.der),
        _ => None,
    };
    if anchor_copy.is_some() {
        presented.pop();
    }
    let Some((leaf, intermediates)) = presented.split_first() else {
        return Err(refused(CertificateRefusal::Malformed, "no certificate presented"));
    };

    leaf.check_time(now)?;
    let leaf_key = leaf.check_leaf()?;
    for (position, intermediate) in intermediates.iter().enumerate() {
        intermediate.check_time(now)?;
        intermediate.check_ca()?;
        intermediate.check_path_len(&intermediates[..position])?;
    }
    for pair in presented.windows(2) {
        if let [subject, issuer] = pair {
            subject.check_issued_by(issuer)?;
        }
    }

    let top = intermediates.last().unwrap_or(leaf);
    let issuer = match anchor_copy {
        Some(index) => {
            top.check_issued_by(&registered[index])?;
            index
        }
        None => issued_by_registered(top, &registered)?,
    };
    let ca = &registered[issuer];
    ca.check_time(now)?;
    ca.check_ca()?;
    ca.check_path_len(intermediates)?;

    Ok(VerifiedChain {
        leaf_key,
        leaf_subject: leaf.x509.subject().to_string(),
        serials: presented.iter().map(|cert| cert.serial.clone()).collect(),
        issuer,
        not_after: leaf.not_after(),
    })
}

/// The index of the registered CA that issued `cert`: named as its issuer and whose key
/// verifies its signature (a maker may have registered several keys under one name).
fn issued_by_registered(cert: &Certificate<'_>, registered: &[Certificate<'_>]) -> Result<usize, ProtoError> {
    let mut refusal = None;
    for (index, ca) in registered.iter().enumerate() {
        if ca.x509.subject().as_raw() != cert.x509.issuer().as_raw() {
            continue;
        }
        match cert.check_issued_by(ca) {
            Ok(()) => return Ok(index),
            Err(e) => refusal = Some(e),
        }
    }
    Err(refusal.unwrap_or_else(|| {
        refused(
            CertificateRefusal::UnknownIssuer,
            format!("{} is issued by {}, which is not a registered CA", cert.what, cert.x509.issuer()),
        )
    }))
}

/// The canonical form (module doc) of a serial number written by an operator: hex digits,
/// in either case, optionally in colon-separated groups as OpenSSL prints them, read as a
/// non-negative integer.
pub fn canonical_serial(text: &str) -> Result<String, ProtoError> {
    let digits: String = text.trim().chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ProtoError::malformed("certificate serial", format!("{text:?} is not hex digits")));
    }
    let significant = digits.trim_start_matches('0');
    if significant.len() > 2 * SERIAL_BYTES_MAX {
        return Err(ProtoError::malformed(
            "certificate serial",
            format!("{} significant hex digits, at most {}", significant.len(), 2 * SERIAL_BYTES_MAX),
        ));
    }
    let mut nibbles: Vec<u8> =
        significant.chars().filter_map(|c| c.to_digit(16).and_then(|digit| u8::try_from(digit).ok())).collect();
    if nibbles.len() % 2 == 1 {
        nibbles.insert(0, 0);
    }
    let magnitude: Vec<u8> =
        nibbles.chunks_exact(2).map(|pair| pair.iter().fold(0, |byte, nibble| (byte << 4) | nibble)).collect();
    Ok(serial_text(&magnitude))
}

/// Lowercase hex of the minimal DER INTEGER content of a non-negative big-endian magnitude.
fn serial_text(magnitude: &[u8]) -> String {
    let significant: Vec<u8> = magnitude.iter().copied().skip_while(|b| *b == 0).collect();
    let mut out = String::with_capacity(2 * (significant.len() + 1));
    if significant.first().is_none_or(|first| *first >= 0x80) {
        out.push_str("00");
    }
    out.push_str(&crate::hex::encode(&significant));
    out
}

#[derive(Clone, Copy, Debug)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }
}

/// An EC public key of a supported curve, checked to be a point on it.
#[derive(Clone, Copy, Debug)]
struct EcKey<'a> {
    curve: Curve,
    point: &'a [u8],
}

/// A parsed certificate with the parts every check needs.
#[derive(Debug)]
struct Certificate<'a> {
    /// How refusals name it, e.g. "certificate 1 of the chain".
    what: String,
    der: &'a [u8],
    x509: X509Certificate<'a>,
    serial: String,
    /// basicConstraints: `Some(pathLenConstraint)` for a CA.
    ca: Option<Option<u32>>,
    key_usage: Option<KeyUsage>,
}

impl<'a> Certificate<'a> {
    /// Parses `der` whole and checks what RFC 5280 asks of its encoding that x509-parser
    /// leaves to the caller.
    fn parse(der: &'a [u8], what: &str) -> Result<Self, ProtoError> {
        let malformed = |detail: String| refused(CertificateRefusal::Malformed, format!("{what}: {detail}"));
        if der.len() > CERTIFICATE_BYTES_MAX {
            return Err(malformed(format!("{} bytes, over the limit of {CERTIFICATE_BYTES_MAX}", der.len())));
        }
        let (rest, x509) =
            X509Certificate::from_der(der).map_err(|e| malformed(format!("not a DER certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(malformed(format!("{} bytes after the certificate", rest.len())));
        }
        if x509.signature_algorithm != x509.tbs_certificate.signature {
            return Err(malformed("the signature algorithm differs from the one inside the signed part".into()));
        }
        let serial = match x509.raw_serial() {
            [] => return Err(malformed("empty serial number".into())),
            [first, ..] if *first >= 0x80 => {
                return Err(malformed("negative serial number, expected a positive integer (RFC 5280 4.1.2.2)".into()));
            }
            raw if raw.len() > SERIAL_BYTES_MAX => {
                return Err(malformed(format!("serial number of {} bytes, at most {SERIAL_BYTES_MAX}", raw.len())));
            }
            raw => serial_text(raw),
        };
        x509.extensions_map().map_err(|e| malformed(format!("extensions: {e}")))?;
        let mut ca = None;
        let mut key_usage = None;
        for extension in x509.extensions() {
            match extension.parsed_extension() {
                ParsedExtension::ParseError { error } => {
                    return Err(malformed(format!("extension {}: {error}", extension.oid)));
                }
                ParsedExtension::BasicConstraints(constraints) => {
                    ca = constraints.ca.then_some(constraints.path_len_constraint);
                }
                ParsedExtension::KeyUsage(usage) => {
                    key_usage = Some(*usage);
                }
                _ if extension.critical => {
                    return Err(refused(
                        CertificateRefusal::UnsupportedCriticalExtension,
                        format!("{what}: critical extension {} is not one Vouch processes", extension.oid),
                    ));
                }
                _ => {}
            }
        }
        Ok(Certificate { what: what.to_owned(), der, x509, serial, ca, key_usage })
    }

    fn not_before(&self) -> i64 {
        self.x509.validity().not_before.timestamp()
    }

    fn not_after(&self) -> i64 {
        self.x509.validity().not_after.timestamp()
    }

    fn check_time(&self, now: i64) -> Result<(), ProtoError> {
        if now < self.not_before() {
            return Err(refused(
                CertificateRefusal::NotYetValid,
                format!("{} is valid from {}, now is {now}", self.what, self.not_before()),
            ));
        }
        if now > self.not_after() {
            return Err(refused(
                CertificateRefusal::Expired,
                format!("{} expired at {}, now is {now}", self.what, self.not_after()),
            ));
        }
        Ok(())
    }

    /// A CA that may sign certificates, with a key this module verifies with.
    fn check_ca(&self) -> Result<(), ProtoError> {
        if self.ca.is_none() {
            return Err(refused(
                CertificateRefusal::NotCa,
                format!("{} is not a CA, expected basicConstraints with cA true", self.what),
            ));
        }
        if !self.key_usage.is_some_and(|usage| usage.key_cert_sign()) {
            return Err(refused(
                CertificateRefusal::WrongKeyUsage,
                format!("{} lacks keyUsage keyCertSign, which a CA needs to issue certificates", self.what),
            ));
        }
        self.public_key().map(|_| ())
    }

    /// A CA's pathLenConstraint against the certificates below it, leaf excluded; self-issued
    /// ones do not count (RFC 5280 4.2.1.9).
    fn check_path_len(&self, below: &[Certificate<'_>]) -> Result<(), ProtoError> {
        let Some(Some(max)) = self.ca else {
            return Ok(());
        };
        let counted = below.iter().filter(|cert| !cert.self_issued()).count();
        if !u32::try_from(counted).is_ok_and(|counted| counted <= max) {
            return Err(refused(
                CertificateRefusal::ChainTooLong,
                format!(
                    "{} allows {max} intermediates below it (pathLenConstraint), the chain has {counted}",
                    self.what
                ),
            ));
        }
        Ok(())
    }

    /// The secure element's own certificate: an end entity with a P-256 key for key agreement.
    fn check_leaf(&self) -> Result<[u8; P256_POINT_BYTES], ProtoError> {
        if self.ca.is_some() {
            return Err(refused(
                CertificateRefusal::WrongKeyUsage,
                format!("{} is a CA, expected a secure element's end-entity certificate", self.what),
            ));
        }
        let key = self.public_key()?;
        if !matches!(key.curve, Curve::P256) {
            return Err(refused(
                CertificateRefusal::UnsupportedKey,
                format!(
                    "{} has a {} key, expected P-256 (the key provisioning is sealed to)",
                    self.what,
                    key.curve.name()
                ),
            ));
        }
        let point = VerifyingKey::from_sec1(key.point)
            .map_err(|e| refused(CertificateRefusal::UnsupportedKey, format!("{}: {e}", self.what)))?;
        if !self.key_usage.is_some_and(|usage| usage.key_agreement()) {
            return Err(refused(
                CertificateRefusal::WrongKeyUsage,
                format!("{} lacks keyUsage keyAgreement", self.what),
            ));
        }
        Ok(*point.sec1())
    }

    fn self_issued(&self) -> bool {
        self.x509.subject().as_raw() == self.x509.issuer().as_raw()
    }

    fn public_key(&self) -> Result<EcKey<'_>, ProtoError> {
        let spki = self.x509.public_key();
        let unsupported = |found: String| {
            refused(
                CertificateRefusal::UnsupportedKey,
                format!("{} has {found}, expected an EC P-256 or P-384 key", self.what),
            )
        };
        if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
            return Err(unsupported(format!("a key of algorithm {}", spki.algorithm.algorithm)));
        }
        let curve = spki.algorithm.parameters.as_ref().and_then(|parameters| Oid::try_from(parameters).ok());
        let curve = match curve {
            Some(oid) if oid == OID_EC_P256 => Curve::P256,
            Some(oid) if oid == OID_NIST_EC_P384 => Curve::P384,
            Some(oid) => return Err(unsupported(format!("an EC key on curve {oid}"))),
            None => return Err(unsupported("an EC key without a named curve".into())),
        };
        let point: &[u8] = &spki.subject_public_key.data;
        let on_curve: &'static EcdsaVerificationAlgorithm = match curve {
            Curve::P256 => &ECDSA_P256_SHA256_ASN1,
            Curve::P384 => &ECDSA_P384_SHA384_ASN1,
        };
        UnparsedPublicKey::new(on_curve, point)
            .parse()
            .map_err(|_| unsupported(format!("an EC key that is not a point on {}", curve.name())))?;
        Ok(EcKey { curve, point })
    }

    /// `issuer` is named as this certificate's issuer and its key verifies the signature.
    fn check_issued_by(&self, issuer: &Certificate<'_>) -> Result<(), ProtoError> {
        if self.x509.issuer().as_raw() != issuer.x509.subject().as_raw() {
            return Err(refused(
                CertificateRefusal::UnknownIssuer,
                format!(
                    "{} is issued by {}, but {} is {}",
                    self.what,
                    self.x509.issuer(),
                    issuer.what,
                    issuer.x509.subject()
                ),
            ));
        }
        let key = issuer.public_key()?;
        let signature_algorithm = &self.x509.signature_algorithm;
        let hash_is_sha256 = if signature_algorithm.parameters.is_some() {
            None
        } else if signature_algorithm.algorithm == OID_SIG_ECDSA_WITH_SHA256 {
            Some(true)
        } else if signature_algorithm.algorithm == OID_SIG_ECDSA_WITH_SHA384 {
            Some(false)
        } else {
            None
        };
        let algorithm: &'static EcdsaVerificationAlgorithm = match (key.curve, hash_is_sha256) {
            (Curve::P256, Some(true)) => &ECDSA_P256_SHA256_ASN1,
            (Curve::P256, Some(false)) => &ECDSA_P256_SHA384_ASN1,
            (Curve::P384, Some(true)) => &ECDSA_P384_SHA256_ASN1,
            (Curve::P384, Some(false)) => &ECDSA_P384_SHA384_ASN1,
            (_, None) => {
                return Err(refused(
                    CertificateRefusal::BadSignature,
                    format!(
                        "{} is signed with algorithm {}, expected ecdsa-with-SHA256 or ecdsa-with-SHA384 without parameters",
                        self.what, signature_algorithm.algorithm
                    ),
                ));
            }
        };
        UnparsedPublicKey::new(algorithm, key.point)
            .verify(self.x509.tbs_certificate.as_ref(), &self.x509.signature_value.data)
            .map_err(|_| {
                refused(
                    CertificateRefusal::BadSignature,
                    format!("the signature on {} does not verify under the key of {}", self.what, issuer.what),
                )
            })
    }
}

#[cfg(test)]
mod tests;
