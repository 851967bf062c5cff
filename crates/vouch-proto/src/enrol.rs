//! Device enrolment: the proof-of-possession the device sends, and the
//! `device_credential` the server returns.
//!
//! The proof is a JWS (`typ` [`ENROLMENT_PROOF_TYP`]) signed by the key being enrolled,
//! which it carries in its `jwk` header, over the enrolment data and a single-use
//! server nonce. Signing with the enrolled key proves the device holds it; the nonce
//! makes a captured proof useless a second time.

use serde::{Deserialize, Serialize};

use crate::jws::{Header, UnverifiedJws};
use crate::{Clock, Jwk, ProtoError, SigningKey, VerifyingKey, crypto::SecureRandom, jwt};

pub const ENROLMENT_PROOF_TYP: &str = "vouch-enrolment+jwt";
pub const DEVICE_CREDENTIAL_TYP: &str = "vouch-device+jwt";
pub const MODEL_CHARS_MAX: usize = 64;
pub const FIRMWARE_CHARS_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Reader,
    Pos,
    Terminal,
    Consumer,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 4] = [DeviceKind::Reader, DeviceKind::Pos, DeviceKind::Terminal, DeviceKind::Consumer];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Reader => "reader",
            DeviceKind::Pos => "pos",
            DeviceKind::Terminal => "terminal",
            DeviceKind::Consumer => "consumer",
        }
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, ProtoError> {
        DeviceKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| ProtoError::ClaimMismatch {
            claim: "kind",
            found: s.to_owned(),
            expected: "reader, pos, terminal or consumer".to_owned(),
        })
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the device asserts about itself when it enrols.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentClaims {
    /// The single-use nonce the server handed out for this enrolment.
    pub nonce: String,
    pub kind: DeviceKind,
    pub model: String,
    pub firmware_version: String,
    pub merchant_id: String,
    pub iat: i64,
}

impl EnrolmentClaims {
    pub fn sign(&self, key: &SigningKey, rng: &dyn SecureRandom) -> Result<String, ProtoError> {
        let header = Header::es256(ENROLMENT_PROOF_TYP).with_jwk(key.verifying_key().to_jwk());
        jwt::encode(&header, self, key, rng)
    }

    fn check_fields(&self) -> Result<(), ProtoError> {
        for (name, value, max) in
            [("model", &self.model, MODEL_CHARS_MAX), ("firmware_version", &self.firmware_version, FIRMWARE_CHARS_MAX)]
        {
            if value.is_empty() || value.chars().count() > max || value.chars().any(char::is_control) {
                return Err(ProtoError::malformed(
                    "enrolment claims",
                    format!("{name} must be 1 to {max} printable characters"),
                ));
            }
        }
        Ok(())
    }
}

/// A verified enrolment proof: the claims and the key that signed them.
#[derive(Debug, Clone)]
pub struct VerifiedEnrolment {
    pub claims: EnrolmentClaims,
    pub key: VerifyingKey,
}

/// Checks the proof's type, its self-signature and its `iat` window. The caller
/// still has to consume the nonce (single use is the database's job).
pub fn verify_enrolment_proof(
    proof: &str,
    clock: &dyn Clock,
    iat_window_secs: i64,
) -> Result<VerifiedEnrolment, ProtoError> {
    let jws = UnverifiedJws::parse(proof)?;
    jws.header().expect_typ(ENROLMENT_PROOF_TYP)?;
    let (payload, key) = jws.verify_with_embedded_jwk()?;
    let claims: EnrolmentClaims = jwt::parse_claims(payload)?;
    claims.check_fields()?;
    jwt::check_issued_at(claims.iat, clock.now_unix(), iat_window_secs)?;
    Ok(VerifiedEnrolment { claims, key })
}

/// Confirmation claim (RFC 7800) naming the device's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    pub jwk: Jwk,
}

/// The server-signed JWT that binds a device id to its kind, merchant and key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCredentialClaims {
    pub iss: String,
    /// The device id.
    pub sub: String,
    pub kind: DeviceKind,
    pub merchant_id: String,
    pub cnf: Confirmation,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FixedClock, crypto::SystemRandom};

    fn claims(iat: i64) -> EnrolmentClaims {
        EnrolmentClaims {
            nonce: "n-1".into(),
            kind: DeviceKind::Reader,
            model: "R-100".into(),
            firmware_version: "1.2.3".into(),
            merchant_id: "m-1".into(),
            iat,
        }
    }

    #[test]
    fn proof_round_trip() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let proof = claims(1000).sign(&key, &rng).unwrap();
        let verified = verify_enrolment_proof(&proof, &FixedClock(1010), 60).unwrap();
        assert_eq!(verified.claims, claims(1000));
        assert_eq!(verified.key, key.verifying_key());
    }

    #[test]
    fn stale_or_retyped_proofs_are_refused() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let proof = claims(1000).sign(&key, &rng).unwrap();
        assert!(matches!(verify_enrolment_proof(&proof, &FixedClock(2000), 60), Err(ProtoError::StaleIssuedAt { .. })));
        let header = Header::es256("JWT").with_jwk(key.verifying_key().to_jwk());
        let retyped = jwt::encode(&header, &claims(1000), &key, &rng).unwrap();
        assert!(matches!(verify_enrolment_proof(&retyped, &FixedClock(1000), 60), Err(ProtoError::WrongType { .. })));
        let mut bad = claims(1000);
        bad.model = String::new();
        let proof = bad.sign(&key, &rng).unwrap();
        assert!(matches!(verify_enrolment_proof(&proof, &FixedClock(1000), 60), Err(ProtoError::Malformed { .. })));
    }

    #[test]
    fn proof_signed_by_another_key_than_its_jwk_is_refused() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let other = SigningKey::generate(&rng).unwrap();
        let header = Header::es256(ENROLMENT_PROOF_TYP).with_jwk(other.verifying_key().to_jwk());
        let proof = jwt::encode(&header, &claims(1000), &key, &rng).unwrap();
        assert_eq!(verify_enrolment_proof(&proof, &FixedClock(1000), 60).unwrap_err(), ProtoError::BadSignature);
    }
}
