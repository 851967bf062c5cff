//! The one signature suite: ECDSA P-256 with SHA-256 (JOSE `ES256`, COSE `-7`),
//! through aws-lc-rs. Signatures are the fixed 64-byte `r || s` form JOSE and COSE use.

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, UnparsedPublicKey,
};
use zeroize::Zeroizing;

use crate::{Jwk, ProtoError, b64, pem};

/// The random source every operation takes as a parameter (sealed by aws-lc-rs).
pub use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// Length of an uncompressed SEC1 P-256 point: `0x04 || x || y`.
const P256_POINT_BYTES: usize = 65;
const P256_COORDINATE_BYTES: usize = 32;
pub const ES256_SIGNATURE_BYTES: usize = 64;

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub fn random_bytes<const N: usize>(rng: &dyn SecureRandom) -> Result<[u8; N], ProtoError> {
    let mut out = [0u8; N];
    rng.fill(&mut out).map_err(|_| ProtoError::Rng)?;
    Ok(out)
}

/// Constant-time equality, for secrets and MACs.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A P-256 private key. The PKCS#8 encoding is kept only in zeroizing buffers.
pub struct SigningKey {
    pair: EcdsaKeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("public", &self.verifying_key()).finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, ProtoError> {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng).map_err(|_| ProtoError::Rng)?;
        Self::from_pkcs8_der(pkcs8.as_ref())
    }

    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, ProtoError> {
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map(|pair| SigningKey { pair })
            .map_err(|e| ProtoError::InvalidKey(format!("not a PKCS#8 P-256 private key: {e}")))
    }

    pub fn from_pkcs8_pem(text: &str) -> Result<Self, ProtoError> {
        Self::from_pkcs8_der(&pem::decode("PRIVATE KEY", text)?)
    }

    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
        self.pair
            .to_pkcs8v1()
            .map(|doc| Zeroizing::new(doc.as_ref().to_vec()))
            .map_err(|_| ProtoError::InvalidKey("key cannot be exported as PKCS#8".into()))
    }

    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, ProtoError> {
        Ok(pem::encode("PRIVATE KEY", &self.to_pkcs8_der()?))
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        let mut point = [0u8; P256_POINT_BYTES];
        point.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey { point }
    }

    pub fn sign(&self, rng: &dyn SecureRandom, message: &[u8]) -> Result<[u8; ES256_SIGNATURE_BYTES], ProtoError> {
        let signature = self.pair.sign(rng, message).map_err(|_| ProtoError::Rng)?;
        let mut out = [0u8; ES256_SIGNATURE_BYTES];
        // Invariant: the FIXED signing algorithm always yields 64 bytes.
        out.copy_from_slice(signature.as_ref());
        Ok(out)
    }
}

/// A P-256 public key, held as its uncompressed SEC1 point and checked to be on the curve.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyingKey {
    point: [u8; P256_POINT_BYTES],
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", b64::encode(self.point))
    }
}

impl VerifyingKey {
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, ProtoError> {
        let point: [u8; P256_POINT_BYTES] = bytes.try_into().map_err(|_| {
            ProtoError::InvalidKey(format!(
                "P-256 public key is {} bytes, expected {P256_POINT_BYTES} (uncompressed)",
                bytes.len()
            ))
        })?;
        if point[0] != 0x04 {
            return Err(ProtoError::InvalidKey("P-256 public key is not an uncompressed point".into()));
        }
        // Parsing through aws-lc rejects points that are not on the curve.
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .parse()
            .map_err(|_| ProtoError::InvalidKey("point is not on the P-256 curve".into()))?;
        Ok(VerifyingKey { point })
    }

    pub fn from_coordinates(x: &[u8], y: &[u8]) -> Result<Self, ProtoError> {
        if x.len() != P256_COORDINATE_BYTES || y.len() != P256_COORDINATE_BYTES {
            return Err(ProtoError::InvalidKey(format!(
                "P-256 coordinates are {} and {} bytes, expected {P256_COORDINATE_BYTES} each",
                x.len(),
                y.len()
            )));
        }
        let mut point = [0u8; P256_POINT_BYTES];
        point[0] = 0x04;
        point[1..33].copy_from_slice(x);
        point[33..].copy_from_slice(y);
        Self::from_sec1(&point)
    }

    pub fn sec1(&self) -> &[u8; P256_POINT_BYTES] {
        &self.point
    }

    pub fn x(&self) -> &[u8] {
        &self.point[1..33]
    }

    pub fn y(&self) -> &[u8] {
        &self.point[33..]
    }

    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), ProtoError> {
        if signature.len() != ES256_SIGNATURE_BYTES {
            return Err(ProtoError::BadSignature);
        }
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.point)
            .verify(message, signature)
            .map_err(|_| ProtoError::BadSignature)
    }

    pub fn to_jwk(&self) -> Jwk {
        Jwk::from_verifying_key(self)
    }

    /// RFC 7638 SHA-256 thumbprint, base64url.
    pub fn thumbprint(&self) -> String {
        self.to_jwk().thumbprint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let sig = key.sign(&rng, b"payload").unwrap();
        key.verifying_key().verify(b"payload", &sig).unwrap();
        assert_eq!(key.verifying_key().verify(b"payloaD", &sig), Err(ProtoError::BadSignature));
        assert_eq!(key.verifying_key().verify(b"payload", &sig[..63]), Err(ProtoError::BadSignature));
    }

    #[test]
    fn pkcs8_pem_round_trip() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        let back = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.verifying_key(), key.verifying_key());
    }

    #[test]
    fn off_curve_point_is_refused() {
        let mut point = [1u8; P256_POINT_BYTES];
        point[0] = 4;
        assert!(matches!(VerifyingKey::from_sec1(&point), Err(ProtoError::InvalidKey(_))));
        assert!(matches!(VerifyingKey::from_sec1(&point[..33]), Err(ProtoError::InvalidKey(_))));
    }

    #[test]
    fn constant_time_eq_compares_length_and_content() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
