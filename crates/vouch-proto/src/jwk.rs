//! JSON Web Keys (RFC 7517) for P-256, key sets, and RFC 7638 thumbprints.

use serde::{Deserialize, Serialize};

use crate::{ProtoError, VerifyingKey, b64, crypto::sha256};

/// A public P-256 JWK. Private members are refused at parse time, so a value of this
/// type can never carry a private key by accident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawJwk")]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub y: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    d: Option<serde::de::IgnoredAny>,
    kid: Option<String>,
    #[serde(rename = "use")]
    key_use: Option<String>,
    alg: Option<String>,
}

impl TryFrom<RawJwk> for Jwk {
    type Error = ProtoError;

    fn try_from(raw: RawJwk) -> Result<Self, ProtoError> {
        if raw.d.is_some() {
            return Err(ProtoError::InvalidKey("JWK holds a private key (\"d\"), expected a public key".into()));
        }
        if raw.kty != "EC" {
            return Err(ProtoError::UnsupportedAlgorithm { found: raw.kty, expected: "kty EC" });
        }
        let crv = raw.crv.unwrap_or_default();
        if crv != "P-256" {
            return Err(ProtoError::UnsupportedAlgorithm { found: crv, expected: "crv P-256" });
        }
        let (Some(x), Some(y)) = (raw.x, raw.y) else {
            return Err(ProtoError::InvalidKey("EC JWK without x or y".into()));
        };
        let jwk = Jwk { kty: raw.kty, crv, x, y, kid: raw.kid, key_use: raw.key_use, alg: raw.alg };
        jwk.verifying_key()?;
        Ok(jwk)
    }
}

impl Jwk {
    pub fn from_verifying_key(key: &VerifyingKey) -> Self {
        Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: b64::encode(key.x()),
            y: b64::encode(key.y()),
            kid: None,
            key_use: None,
            alg: None,
        }
    }

    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self.key_use = Some("sig".into());
        self.alg = Some("ES256".into());
        self
    }

    pub fn verifying_key(&self) -> Result<VerifyingKey, ProtoError> {
        VerifyingKey::from_coordinates(&b64::decode("JWK x", &self.x)?, &b64::decode("JWK y", &self.y)?)
    }

    /// RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace.
    pub fn thumbprint(&self) -> String {
        let canonical = format!(r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#, self.crv, self.kty, self.x, self.y);
        b64::encode(sha256(canonical.as_bytes()))
    }
}

/// A JWK Set (RFC 7517 section 5), as published at `/.well-known/jwks.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

impl JwkSet {
    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }

    /// The key a COSE object's key id names: Vouch's COSE kid is the UTF-8 of the JWK's
    /// `kid`. No kid, or one not in the set, is [`ProtoError::UnknownSigningKey`].
    pub fn cose_key(&self, kid: Option<&[u8]>) -> Result<VerifyingKey, ProtoError> {
        let kid = kid.map(String::from_utf8_lossy).unwrap_or_default();
        self.find(&kid).ok_or_else(|| ProtoError::UnknownSigningKey { kid: kid.into_owned() })?.verifying_key()
    }

    /// Adds the keys of `keys` whose id is not in the set yet: pinning again, e.g.
    /// after a server key rotation, never replaces a key pinned before.
    pub fn pin(&mut self, keys: JwkSet) {
        for key in keys.keys {
            let known = key.kid.as_deref().is_some_and(|kid| self.find(kid).is_some());
            if !known {
                self.keys.push(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public key of RFC 9449 section 4.1's example proof, and its thumbprint
    /// from section 6.1 (`cnf.jkt`).
    #[test]
    fn rfc9449_thumbprint_vector() {
        let jwk: Jwk = serde_json::from_str(
            r#"{"kty":"EC","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs","y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA","crv":"P-256"}"#,
        )
        .unwrap();
        assert_eq!(jwk.thumbprint(), "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I");
    }

    #[test]
    fn a_cose_kid_names_a_key_and_pinning_again_keeps_the_first() {
        let rng = crate::crypto::SystemRandom::new();
        let key = |kid: &str| crate::SigningKey::generate(&rng).unwrap().verifying_key().to_jwk().with_kid(kid);
        let (first, second) = (key("k1"), key("k2"));
        let mut pinned = JwkSet { keys: vec![first.clone()] };
        assert_eq!(pinned.cose_key(Some(b"k1")), first.verifying_key());
        for kid in [None, Some(&b"k2"[..])] {
            assert!(matches!(pinned.cose_key(kid), Err(ProtoError::UnknownSigningKey { .. })), "{kid:?}");
        }
        pinned.pin(JwkSet { keys: vec![key("k1"), second.clone()] });
        assert_eq!(pinned.keys, [first, second]);
    }

    #[test]
    fn private_and_foreign_keys_are_refused() {
        let cases = [
            (
                r#"{"kty":"EC","crv":"P-256","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs","y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA","d":"AAAA"}"#,
                "private",
            ),
            (r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#, "kty"),
            (r#"{"kty":"EC","crv":"P-384","x":"AA","y":"AA"}"#, "crv"),
            (r#"{"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA"}"#, "coordinates"),
            (r#"{"kty":"oct","k":"c2VjcmV0"}"#, "symmetric"),
        ];
        for (json, why) in cases {
            assert!(serde_json::from_str::<Jwk>(json).is_err(), "{why} key accepted");
        }
    }
}
