//! COSE_Sign1 (RFC 9052 section 4.2) restricted to ES256 (COSE algorithm -7), over the
//! one signature suite in [`crate::crypto`]. Objects are always tagged (CBOR tag 18) and
//! carry their payload; the signature is the fixed 64-byte `r || s` that
//! [`SigningKey::sign`] returns and RFC 9053 section 2.1 requires.
//!
//! When signing, the key id goes in the **protected** header, next to `alg`, so it is
//! covered by the signature. When verifying, a key id is also accepted from the
//! unprotected header (published examples put it there), but never from both.
//!
//! Input is refused before any signature check unless it is at most
//! [`COSE_SIGN1_BYTES_MAX`] bytes, one CBOR item with nothing after it, and in the one
//! encoding Vouch produces: decoding and encoding again must give the same bytes (shortest
//! lengths and integers, definite lengths, header maps in canonical order).

use coset::{
    AsCborValue, CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable,
    cbor::value::Value, iana,
};

use crate::{ProtoError, SigningKey, VerifyingKey, crypto::SecureRandom};

/// Upper bound on a COSE_Sign1 object we are willing to parse.
pub const COSE_SIGN1_BYTES_MAX: usize = 4 * 1024;
/// COSE algorithm identifier of ES256 (RFC 9053 section 2.1).
pub const ALG_ES256: i64 = -7;
/// CBOR tag of a COSE_Sign1 object (RFC 9052 section 2).
pub const TAG_COSE_SIGN1: u64 = 18;

const WHAT: &str = "COSE_Sign1";
const EXPECTED_ALG: &str = "-7 (ES256)";

/// Why a COSE_Sign1 object was refused before or instead of its signature check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoseRefusal {
    /// Not CBOR, or not the COSE_Sign1 structure.
    Malformed,
    /// Bytes left after the one CBOR item.
    TrailingBytes,
    /// Not wrapped in CBOR tag 18.
    Untagged,
    /// Valid CBOR, but not in the deterministic encoding Vouch produces.
    NonCanonical,
    /// No `alg` in the protected header.
    MissingAlgorithm,
    /// A `crit` header: no extension is understood here.
    CriticalHeader,
    /// A key id in both the protected and the unprotected header.
    AmbiguousKeyId,
    /// The payload is `nil` (detached), expected it inline.
    DetachedPayload,
    /// The signature is not the 64-byte `r || s` of ES256.
    SignatureLength,
}

impl CoseRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            CoseRefusal::Malformed => "malformed",
            CoseRefusal::TrailingBytes => "trailing-bytes",
            CoseRefusal::Untagged => "untagged",
            CoseRefusal::NonCanonical => "non-canonical",
            CoseRefusal::MissingAlgorithm => "missing-alg",
            CoseRefusal::CriticalHeader => "critical-header",
            CoseRefusal::AmbiguousKeyId => "ambiguous-kid",
            CoseRefusal::DetachedPayload => "detached-payload",
            CoseRefusal::SignatureLength => "signature-length",
        }
    }
}

fn refused(why: CoseRefusal, detail: impl ToString) -> ProtoError {
    ProtoError::CoseRefused { why, detail: detail.to_string() }
}

/// A verified COSE_Sign1: its payload and the key id it named, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub payload: Vec<u8>,
    pub kid: Option<Vec<u8>>,
}

/// Signs `payload` as a tagged COSE_Sign1 with protected header `{1: -7}`, plus `{4: kid}`
/// when a key id is given, and no external data.
pub fn sign1(
    payload: &[u8],
    kid: Option<&[u8]>,
    key: &SigningKey,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, ProtoError> {
    sign1_with_aad(payload, b"", kid, key, rng)
}

/// As [`sign1`], with external data (RFC 9052 section 4.3) that is signed but not sent:
/// the verifier must supply the same bytes. Vouch uses it to separate message types that
/// the same key signs, at no cost on the wire.
pub fn sign1_with_aad(
    payload: &[u8],
    aad: &[u8],
    kid: Option<&[u8]>,
    key: &SigningKey,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, ProtoError> {
    let mut protected = HeaderBuilder::new().algorithm(iana::Algorithm::ES256);
    if let Some(kid) = kid {
        protected = protected.key_id(kid.to_vec());
    }
    let unsigned = CoseSign1Builder::new().protected(protected.build()).payload(payload.to_vec()).build();
    let signature = key.sign(rng, &unsigned.tbs_data(aad))?;
    let signed = CoseSign1 { signature: signature.to_vec(), ..unsigned };
    let bytes = signed.to_tagged_vec().map_err(|e| ProtoError::malformed(WHAT, e))?;
    if bytes.len() > COSE_SIGN1_BYTES_MAX {
        return Err(ProtoError::TooLarge { what: WHAT, len: bytes.len(), max: COSE_SIGN1_BYTES_MAX });
    }
    Ok(bytes)
}

/// Parses, looks up the key for the object's key id with `key_for_kid`, and verifies with
/// no external data. The payload is only handed out once the signature verifies.
pub fn verify1<F>(bytes: &[u8], key_for_kid: F) -> Result<Verified, ProtoError>
where
    F: FnOnce(Option<&[u8]>) -> Result<VerifyingKey, ProtoError>,
{
    let sign1 = UnverifiedSign1::parse(bytes)?;
    let key = key_for_kid(sign1.kid())?;
    sign1.verify(&key, b"")?;
    Ok(sign1.into_verified())
}

/// A parsed COSE_Sign1 whose structure has been checked but whose signature has not.
#[derive(Debug, Clone)]
pub struct UnverifiedSign1 {
    inner: CoseSign1,
    payload: Vec<u8>,
    kid: Option<Vec<u8>>,
}

impl UnverifiedSign1 {
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        if bytes.len() > COSE_SIGN1_BYTES_MAX {
            return Err(ProtoError::TooLarge { what: WHAT, len: bytes.len(), max: COSE_SIGN1_BYTES_MAX });
        }
        let value = decode_one(WHAT, bytes)?;
        let Value::Tag(tag, inner) = value else {
            return Err(refused(CoseRefusal::Untagged, format!("expected CBOR tag {TAG_COSE_SIGN1}")));
        };
        if tag != TAG_COSE_SIGN1 {
            return Err(refused(CoseRefusal::Untagged, format!("tag {tag}, expected {TAG_COSE_SIGN1}")));
        }
        let sign1 = CoseSign1::from_cbor_value(*inner).map_err(|e| refused(CoseRefusal::Malformed, e))?;
        // Canonical form: the whole object, and the protected header inside its byte string.
        let reencoded = sign1.clone().to_tagged_vec().map_err(|e| refused(CoseRefusal::Malformed, e))?;
        if reencoded != bytes {
            return Err(refused(CoseRefusal::NonCanonical, "encoding again gives other bytes"));
        }
        if let Some(original) = &sign1.protected.original_data {
            let header_bytes = if sign1.protected.header.is_empty() {
                Vec::new()
            } else {
                sign1.protected.header.clone().to_vec().map_err(|e| refused(CoseRefusal::Malformed, e))?
            };
            if &header_bytes != original {
                return Err(refused(CoseRefusal::NonCanonical, "protected header: encoding again gives other bytes"));
            }
        }
        let protected = &sign1.protected.header;
        match &protected.alg {
            None => {
                return Err(refused(
                    CoseRefusal::MissingAlgorithm,
                    format!("no alg in the protected header, expected {EXPECTED_ALG}"),
                ));
            }
            Some(coset::Algorithm::Assigned(iana::Algorithm::ES256)) => {}
            Some(other) => {
                return Err(ProtoError::UnsupportedAlgorithm { found: algorithm_name(other), expected: EXPECTED_ALG });
            }
        }
        if !protected.crit.is_empty() || !sign1.unprotected.crit.is_empty() {
            return Err(refused(CoseRefusal::CriticalHeader, "critical extensions are not supported"));
        }
        let kid = match (protected.key_id.is_empty(), sign1.unprotected.key_id.is_empty()) {
            (true, true) => None,
            (false, true) => Some(protected.key_id.clone()),
            (true, false) => Some(sign1.unprotected.key_id.clone()),
            (false, false) => {
                return Err(refused(CoseRefusal::AmbiguousKeyId, "kid in both headers, expected one"));
            }
        };
        let Some(payload) = sign1.payload.clone() else {
            return Err(refused(CoseRefusal::DetachedPayload, "payload is nil, expected it inline"));
        };
        if sign1.signature.len() != crate::crypto::ES256_SIGNATURE_BYTES {
            return Err(refused(
                CoseRefusal::SignatureLength,
                format!(
                    "signature is {} bytes, expected {}",
                    sign1.signature.len(),
                    crate::crypto::ES256_SIGNATURE_BYTES
                ),
            ));
        }
        Ok(UnverifiedSign1 { inner: sign1, payload, kid })
    }

    /// The key id, from whichever header carried it.
    pub fn kid(&self) -> Option<&[u8]> {
        self.kid.as_deref()
    }

    /// The payload before its signature is checked: only for finding which key to
    /// verify with; never trust anything else in it.
    pub fn payload_unverified(&self) -> &[u8] {
        &self.payload
    }

    /// Verifies the signature over the Sig_structure with the given external data.
    pub fn verify(&self, key: &VerifyingKey, aad: &[u8]) -> Result<&[u8], ProtoError> {
        self.inner.verify_signature(aad, |signature, tbs| key.verify(tbs, signature))?;
        Ok(&self.payload)
    }

    fn into_verified(self) -> Verified {
        Verified { payload: self.payload, kid: self.kid }
    }
}

/// Verifies with a known key and external data, handing out the payload.
pub fn verify1_with_key(bytes: &[u8], key: &VerifyingKey, aad: &[u8]) -> Result<Verified, ProtoError> {
    let sign1 = UnverifiedSign1::parse(bytes)?;
    sign1.verify(key, aad)?;
    Ok(sign1.into_verified())
}

fn algorithm_name(alg: &coset::Algorithm) -> String {
    match alg {
        coset::Algorithm::Assigned(a) => (*a as i64).to_string(),
        coset::Algorithm::PrivateUse(n) => n.to_string(),
        coset::Algorithm::Text(t) => format!("{t:?}"),
    }
}

/// Decodes exactly one CBOR item from `bytes`, refusing anything after it.
pub(crate) fn decode_one(what: &'static str, bytes: &[u8]) -> Result<Value, ProtoError> {
    let mut rest = bytes;
    let value: Value = coset::cbor::de::from_reader(&mut rest).map_err(|e| ProtoError::malformed(what, e))?;
    if !rest.is_empty() {
        return Err(refused(
            CoseRefusal::TrailingBytes,
            format!("{what}: {} bytes after the CBOR item, expected none", rest.len()),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SystemRandom;
    use coset::Header;
    use proptest::prelude::*;

    fn hex(text: &str) -> Vec<u8> {
        crate::hex::decode(text).expect("hex digits")
    }

    struct Vector {
        key: VerifyingKey,
        kid: Vec<u8>,
        plaintext: Vec<u8>,
        cbor: Vec<u8>,
    }

    fn vector(json: &str) -> Vector {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let key = &v["input"]["sign0"]["key"];
        let coordinate = |name: &str| crate::b64::decode("x", key[name].as_str().unwrap()).unwrap();
        Vector {
            key: VerifyingKey::from_coordinates(&coordinate("x"), &coordinate("y")).unwrap(),
            kid: key["kid"].as_str().unwrap().as_bytes().to_vec(),
            plaintext: v["input"]["plaintext"].as_str().unwrap().as_bytes().to_vec(),
            cbor: hex(v["output"]["cbor"].as_str().unwrap()),
        }
    }

    /// cose-wg/Examples `ecdsa-examples/ecdsa-sig-01.json` ("ECDSA-01: ECDSA - P-256 -
    /// sign0"): a tagged COSE_Sign1, ES256, protected `{1: -7, 3: 0}`, kid `'11'`
    /// unprotected. ECDSA is randomized, so the known answer is the published signature
    /// verifying; signing is covered by the round trips.
    #[test]
    fn cose_wg_ecdsa_sig_01_verifies() {
        let v = vector(include_str!("../tests/data/cose_wg_ecdsa_sig_01.json"));
        let verified = verify1(&v.cbor, |kid| {
            assert_eq!(kid, Some(&b"11"[..]));
            Ok(v.key)
        })
        .unwrap();
        assert_eq!(verified.payload, v.plaintext);
        assert_eq!(verified.kid, Some(v.kid));

        let mut flipped = v.cbor.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(verify1(&flipped, |_| Ok(v.key)), Err(ProtoError::BadSignature));
    }

    /// cose-wg/Examples `sign1-tests/sign-pass-03.json`: the same object without its tag;
    /// Vouch only accepts tagged objects.
    #[test]
    fn cose_wg_untagged_example_is_refused() {
        let v = vector(include_str!("../tests/data/cose_wg_sign1_pass_03.json"));
        assert!(matches!(
            verify1(&v.cbor, |_| Ok(v.key)),
            Err(ProtoError::CoseRefused { why: CoseRefusal::Untagged, .. })
        ));
    }

    /// cose-wg/Examples `sign1-tests/sign-pass-01.json`: an empty protected header written
    /// as the bstr `h'A0'` rather than the zero-length bstr RFC 9052 section 3 asks for,
    /// and `alg` only in the unprotected header. Refused at the first of the two.
    #[test]
    fn cose_wg_unprotected_alg_example_is_refused() {
        let v = vector(include_str!("../tests/data/cose_wg_sign1_pass_01.json"));
        assert!(matches!(
            verify1(&v.cbor, |_| Ok(v.key)),
            Err(ProtoError::CoseRefused { why: CoseRefusal::NonCanonical, .. })
        ));
    }

    fn key() -> SigningKey {
        SigningKey::generate(&SystemRandom::new()).unwrap()
    }

    fn check_refused(bytes: &[u8], key: &VerifyingKey, why: CoseRefusal) {
        match verify1(bytes, |_| Ok(*key)) {
            Err(ProtoError::CoseRefused { why: found, .. }) => assert_eq!(found, why),
            other => panic!("expected {why:?}, got {other:?}"),
        }
    }

    /// Builds a tagged COSE_Sign1 by hand, signed over what it claims.
    fn hand_built(protected: Header, unprotected: Header, payload: Option<Vec<u8>>, key: &SigningKey) -> Vec<u8> {
        let unsigned = CoseSign1 {
            protected: coset::ProtectedHeader { original_data: None, header: protected },
            unprotected,
            payload,
            signature: Vec::new(),
        };
        let tbs = unsigned.tbs_data(b"");
        let signature = key.sign(&SystemRandom::new(), &tbs).unwrap().to_vec();
        CoseSign1 { signature, ..unsigned }.to_tagged_vec().unwrap()
    }

    #[test]
    fn sign1_puts_alg_and_kid_in_the_protected_header() {
        let key = key();
        let bytes = sign1(b"hello", Some(b"k1"), &key, &SystemRandom::new()).unwrap();
        let parsed = CoseSign1::from_tagged_slice(&bytes).unwrap();
        assert_eq!(parsed.protected.original_data.as_deref(), Some(&hex("a2012604426b31")[..]));
        assert!(parsed.unprotected.is_empty());
        let verified = verify1(&bytes, |kid| {
            assert_eq!(kid, Some(&b"k1"[..]));
            Ok(key.verifying_key())
        })
        .unwrap();
        assert_eq!(verified, Verified { payload: b"hello".to_vec(), kid: Some(b"k1".to_vec()) });
    }

    #[test]
    fn wrong_key_is_bad_signature() {
        let bytes = sign1(b"hello", None, &key(), &SystemRandom::new()).unwrap();
        assert_eq!(verify1(&bytes, |_| Ok(key().verifying_key())), Err(ProtoError::BadSignature));
    }

    #[test]
    fn other_external_data_is_bad_signature() {
        let key = key();
        let bytes = sign1_with_aad(b"hello", b"type a", None, &key, &SystemRandom::new()).unwrap();
        verify1_with_key(&bytes, &key.verifying_key(), b"type a").unwrap();
        assert_eq!(verify1_with_key(&bytes, &key.verifying_key(), b"type b"), Err(ProtoError::BadSignature));
    }

    #[test]
    fn key_lookup_failure_is_passed_on() {
        let bytes = sign1(b"hello", Some(b"gone"), &key(), &SystemRandom::new()).unwrap();
        let err = ProtoError::UnknownSigningKey { kid: "gone".into() };
        assert_eq!(verify1(&bytes, |_| Err(err.clone())), Err(err));
    }

    #[test]
    fn wrong_alg_is_refused() {
        let key = key();
        let bytes = hand_built(
            HeaderBuilder::new().algorithm(iana::Algorithm::ES384).build(),
            Header::default(),
            Some(b"x".to_vec()),
            &key,
        );
        assert_eq!(
            verify1(&bytes, |_| Ok(key.verifying_key())),
            Err(ProtoError::UnsupportedAlgorithm { found: "-35".into(), expected: EXPECTED_ALG })
        );
    }

    #[test]
    fn missing_alg_is_refused() {
        let key = key();
        let bytes = hand_built(Header::default(), Header::default(), Some(b"x".to_vec()), &key);
        check_refused(&bytes, &key.verifying_key(), CoseRefusal::MissingAlgorithm);
    }

    #[test]
    fn critical_header_is_refused() {
        let key = key();
        let protected =
            HeaderBuilder::new().algorithm(iana::Algorithm::ES256).add_critical(iana::HeaderParameter::Iv).build();
        let bytes = hand_built(protected, Header::default(), Some(b"x".to_vec()), &key);
        check_refused(&bytes, &key.verifying_key(), CoseRefusal::CriticalHeader);
    }

    #[test]
    fn kid_in_both_headers_is_refused() {
        let key = key();
        let protected = HeaderBuilder::new().algorithm(iana::Algorithm::ES256).key_id(b"a".to_vec()).build();
        let unprotected = HeaderBuilder::new().key_id(b"b".to_vec()).build();
        let bytes = hand_built(protected, unprotected, Some(b"x".to_vec()), &key);
        check_refused(&bytes, &key.verifying_key(), CoseRefusal::AmbiguousKeyId);
    }

    #[test]
    fn detached_payload_is_refused() {
        let key = key();
        let protected = HeaderBuilder::new().algorithm(iana::Algorithm::ES256).build();
        let bytes = hand_built(protected, Header::default(), None, &key);
        check_refused(&bytes, &key.verifying_key(), CoseRefusal::DetachedPayload);
    }

    #[test]
    fn short_signature_is_refused() {
        let key = key();
        let mut sign1 = CoseSign1::from_tagged_slice(&sign1(b"x", None, &key, &SystemRandom::new()).unwrap()).unwrap();
        sign1.signature.truncate(63);
        check_refused(&sign1.to_tagged_vec().unwrap(), &key.verifying_key(), CoseRefusal::SignatureLength);
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let key = key();
        let mut bytes = sign1(b"x", None, &key, &SystemRandom::new()).unwrap();
        bytes.push(0);
        check_refused(&bytes, &key.verifying_key(), CoseRefusal::TrailingBytes);
    }

    #[test]
    fn other_tag_and_no_tag_are_refused() {
        let key = key();
        let bytes = sign1(b"x", None, &key, &SystemRandom::new()).unwrap();
        // 0xd2 is tag 18; 0xd1 is tag 17 (COSE_Mac0).
        let mut other = bytes.clone();
        other[0] = 0xd1;
        check_refused(&other, &key.verifying_key(), CoseRefusal::Untagged);
        check_refused(&bytes[1..], &key.verifying_key(), CoseRefusal::Untagged);
    }

    #[test]
    fn non_canonical_encodings_are_refused() {
        let key = key();
        let bytes = sign1(b"x", None, &key, &SystemRandom::new()).unwrap();
        // The tag written with a one-byte argument (0xd8 0x12) instead of inline (0xd2).
        let mut long_tag = vec![0xd8, 0x12];
        long_tag.extend_from_slice(&bytes[1..]);
        check_refused(&long_tag, &key.verifying_key(), CoseRefusal::NonCanonical);
        // The array as indefinite length (0x9f ... 0xff) instead of 0x84.
        let mut indefinite = vec![0xd2, 0x9f];
        indefinite.extend_from_slice(&bytes[2..]);
        indefinite.push(0xff);
        check_refused(&indefinite, &key.verifying_key(), CoseRefusal::NonCanonical);
        // The protected header {1: -7} with -7 written in a one-byte argument (0x38 0x06).
        let protected = hex("a1013806");
        let mut sign1 = CoseSign1::from_tagged_slice(&bytes).unwrap();
        sign1.protected.original_data = Some(protected);
        let tbs = sign1.tbs_data(b"");
        sign1.signature = key.sign(&SystemRandom::new(), &tbs).unwrap().to_vec();
        check_refused(&sign1.to_tagged_vec().unwrap(), &key.verifying_key(), CoseRefusal::NonCanonical);
    }

    #[test]
    fn oversized_input_is_refused() {
        let key = key();
        let big = vec![0u8; COSE_SIGN1_BYTES_MAX + 1];
        assert!(matches!(
            verify1(&big, |_| Ok(key.verifying_key())),
            Err(ProtoError::TooLarge { max: COSE_SIGN1_BYTES_MAX, .. })
        ));
        assert!(matches!(
            sign1(&big, None, &key, &SystemRandom::new()),
            Err(ProtoError::TooLarge { max: COSE_SIGN1_BYTES_MAX, .. })
        ));
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        let key = key().verifying_key();
        for input in [&b""[..], b"\xd2", b"\xd2\x84", b"\xff", b"\xd2\x84\x40\xa0\xf6\x40", b"\x9f\x9f\x9f\x9f"] {
            assert!(verify1(input, |_| Ok(key)).is_err(), "{input:?}");
        }
        let deep = vec![0x81u8; COSE_SIGN1_BYTES_MAX];
        assert!(verify1(&deep, |_| Ok(key)).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn sign_then_verify_round_trips(
            payload in proptest::collection::vec(any::<u8>(), 0..1024),
            kid in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..32)),
        ) {
            let rng = SystemRandom::new();
            let key = SigningKey::generate(&rng).unwrap();
            let bytes = sign1(&payload, kid.as_deref(), &key, &rng).unwrap();
            let verified = verify1(&bytes, |found| {
                assert_eq!(found, kid.as_deref());
                Ok(key.verifying_key())
            }).unwrap();
            prop_assert_eq!(verified, Verified { payload, kid });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let rng = SystemRandom::new();
            let key = SigningKey::generate(&rng).unwrap().verifying_key();
            let _ = verify1(&bytes, |_| Ok(key));
        }
    }
}
