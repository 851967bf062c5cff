//! JWS compact serialization (RFC 7515) restricted to ES256. Parsing checks the shape
//! and the algorithm; the payload is only handed out after the signature verifies.

use serde::{Deserialize, Serialize};

use crate::{Jwk, ProtoError, SigningKey, VerifyingKey, b64, crypto::SecureRandom};

/// Upper bound on a compact JWS we are willing to parse.
pub const COMPACT_BYTES_MAX: usize = 16 * 1024;
pub const ALG_ES256: &str = "ES256";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwk: Option<Jwk>,
    /// Critical extensions are never understood here, so their presence fails the
    /// token, as RFC 7515 section 4.1.11 requires.
    #[serde(default, skip_serializing)]
    crit: Option<serde_json::Value>,
}

impl Header {
    pub fn es256(typ: impl Into<String>) -> Self {
        Header { alg: ALG_ES256.into(), typ: Some(typ.into()), kid: None, jwk: None, crit: None }
    }

    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    pub fn with_jwk(mut self, jwk: Jwk) -> Self {
        self.jwk = Some(jwk);
        self
    }

    /// Refuses the token unless its `typ` is exactly `expected`.
    pub fn expect_typ(&self, expected: &'static str) -> Result<(), ProtoError> {
        if self.typ.as_deref().is_some_and(|t| t.eq_ignore_ascii_case(expected)) {
            Ok(())
        } else {
            Err(ProtoError::WrongType { found: self.typ.clone(), expected })
        }
    }
}

pub fn sign(header: &Header, payload: &[u8], key: &SigningKey, rng: &dyn SecureRandom) -> Result<String, ProtoError> {
    let header_json = serde_json::to_vec(header).map_err(|e| ProtoError::malformed("JWS header", e))?;
    let mut token = format!("{}.{}", b64::encode(header_json), b64::encode(payload));
    let signature = key.sign(rng, token.as_bytes())?;
    token.push('.');
    token.push_str(&b64::encode(signature));
    Ok(token)
}

/// A parsed compact JWS whose signature has not been checked yet.
#[derive(Debug, Clone)]
pub struct UnverifiedJws {
    header: Header,
    signing_input: String,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

impl UnverifiedJws {
    pub fn parse(token: &str) -> Result<Self, ProtoError> {
        if token.len() > COMPACT_BYTES_MAX {
            return Err(ProtoError::TooLarge { what: "JWS", len: token.len(), max: COMPACT_BYTES_MAX });
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ProtoError::malformed("JWS", "expected three dot-separated parts"));
        };
        let header_json = b64::decode("JWS header", header_b64)?;
        let header: Header =
            serde_json::from_slice(&header_json).map_err(|e| ProtoError::malformed("JWS header", e))?;
        if header.alg != ALG_ES256 {
            return Err(ProtoError::UnsupportedAlgorithm { found: header.alg, expected: ALG_ES256 });
        }
        if header.crit.is_some() {
            return Err(ProtoError::malformed("JWS header", "critical extensions are not supported"));
        }
        Ok(UnverifiedJws {
            header,
            signing_input: format!("{header_b64}.{payload_b64}"),
            payload: b64::decode("JWS payload", payload_b64)?,
            signature: b64::decode("JWS signature", signature_b64)?,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The payload before its signature is checked: only for finding which key to
    /// verify with (such as a device id); never trust anything else in it.
    pub fn payload_unverified(&self) -> &[u8] {
        &self.payload
    }

    /// Verifies the signature and hands out the payload.
    pub fn verify(&self, key: &VerifyingKey) -> Result<&[u8], ProtoError> {
        key.verify(self.signing_input.as_bytes(), &self.signature)?;
        Ok(&self.payload)
    }

    /// Verifies with the key embedded in the `jwk` header (proof-of-possession tokens).
    pub fn verify_with_embedded_jwk(&self) -> Result<(&[u8], VerifyingKey), ProtoError> {
        let jwk = self.header.jwk.as_ref().ok_or_else(|| {
            ProtoError::malformed("JWS header", "no \"jwk\" member, expected the signer's public key")
        })?;
        let key = jwk.verifying_key()?;
        Ok((self.verify(&key)?, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SystemRandom;

    /// RFC 7515 appendix A.3: the ES256 example.
    #[test]
    fn rfc7515_a3_es256_vector() {
        let token = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";
        let jwk: Jwk = serde_json::from_str(
            r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#,
        )
        .unwrap();
        let jws = UnverifiedJws::parse(token).unwrap();
        let payload = jws.verify(&jwk.verifying_key().unwrap()).unwrap();
        assert!(payload.starts_with(b"{\"iss\":\"joe\""));
    }

    /// RFC 9449 section 4.1: the example DPoP proof, verified with its embedded key.
    #[test]
    fn rfc9449_example_proof_verifies_with_embedded_jwk() {
        let token = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg";
        let jws = UnverifiedJws::parse(token).unwrap();
        jws.header().expect_typ("dpop+jwt").unwrap();
        let (payload, key) = jws.verify_with_embedded_jwk().unwrap();
        assert!(payload.windows(4).any(|w| w == b"POST"));
        assert_eq!(key.thumbprint(), "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let good = sign(&Header::es256("JWT"), b"{}", &key, &rng).unwrap();
        let (head, rest) = good.split_once('.').unwrap();
        let none_header = b64::encode(br#"{"alg":"none"}"#);
        let hs_header = b64::encode(br#"{"alg":"HS256"}"#);
        let crit_header = b64::encode(br#"{"alg":"ES256","crit":["exp"]}"#);
        let cases = [
            String::new(),
            "a.b".into(),
            format!("{good}.extra"),
            format!("{none_header}.{rest}"),
            format!("{hs_header}.{rest}"),
            format!("{crit_header}.{rest}"),
            format!("!!.{rest}"),
            format!("{head}.%%.sig"),
            "x".repeat(COMPACT_BYTES_MAX + 1),
        ];
        for case in cases {
            assert!(UnverifiedJws::parse(&case).is_err(), "accepted {case:.60}");
        }
    }

    #[test]
    fn wrong_key_or_altered_payload_fails() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let other = SigningKey::generate(&rng).unwrap();
        let token = sign(&Header::es256("JWT"), br#"{"a":1}"#, &key, &rng).unwrap();
        let jws = UnverifiedJws::parse(&token).unwrap();
        assert_eq!(jws.verify(&other.verifying_key()), Err(ProtoError::BadSignature));
        let parts: Vec<&str> = token.split('.').collect();
        let altered = format!("{}.{}.{}", parts[0], b64::encode(br#"{"a":2}"#), parts[2]);
        let jws = UnverifiedJws::parse(&altered).unwrap();
        assert_eq!(jws.verify(&key.verifying_key()), Err(ProtoError::BadSignature));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn sign_parse_verify_round_trip(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let rng = SystemRandom::new();
            let key = SigningKey::generate(&rng).unwrap();
            let token = sign(&Header::es256("test"), &payload, &key, &rng).unwrap();
            let jws = UnverifiedJws::parse(&token).unwrap();
            proptest::prop_assert_eq!(jws.verify(&key.verifying_key()).unwrap(), &payload[..]);
        }
    }
}
