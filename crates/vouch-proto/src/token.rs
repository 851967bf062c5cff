//! Bound access tokens and trusted signatures.
//!
//! An access token is a JWT (RFC 9068, `typ` `at+jwt`) signed by the server. It is
//! bound to the device's key by `cnf.jkt` (RFC 7638 thumbprint, RFC 9449 section 6),
//! to a session by `sid` (and a sub-session by `subsession_id`), and it carries the
//! attestation it was issued on. A signed digest is a JWS the server makes over a
//! document hash a bound client submits; it names who asked and in what state, so a
//! third party can check it later with the published JWK Set alone.

use serde::{Deserialize, Serialize};

use crate::attest::EarStatus;
use crate::{Clock, ProtoError, VerifyingKey, jwt};

pub const ACCESS_TOKEN_TYP: &str = "at+jwt";
pub const SIGNED_DIGEST_TYP: &str = "vouch-signed-digest+jwt";
/// `token_type` of every access token response (RFC 9449 section 5).
pub const TOKEN_TYPE_DPOP: &str = "DPoP";
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const DIGEST_ALG_SHA256: &str = "sha-256";

/// `cnf` of a DPoP-bound token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyConfirmation {
    pub jkt: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    pub iss: String,
    /// The device id.
    pub sub: String,
    pub aud: String,
    /// The device id again: devices are their own OAuth clients (RFC 9068 section 2.2).
    pub client_id: String,
    pub iat: i64,
    pub exp: i64,
    /// The token id.
    pub jti: String,
    pub cnf: KeyConfirmation,
    /// The session this token belongs to.
    pub sid: String,
    /// Set on tokens of a sub-session of `sid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsession_id: Option<String>,
    /// The attestation ticket the session was opened with.
    pub ticket_id: String,
    pub ear_status: EarStatus,
    pub risk: u8,
    /// What the ticket allows, e.g. `payment`, `session`, `dvv`, `offline`.
    pub operations: Vec<String>,
    pub max_amount_minor: i64,
}

/// Signature by a published key (found by `kid`), type, and expiry.
pub fn verify_access_token(
    token: &str,
    key_for_kid: impl Fn(&str) -> Option<VerifyingKey>,
    clock: &dyn Clock,
) -> Result<AccessTokenClaims, ProtoError> {
    let claims: AccessTokenClaims = jwt::verify_by_kid(token, ACCESS_TOKEN_TYP, key_for_kid)?;
    jwt::check_expiry(claims.exp, clock.now_unix(), 0)?;
    Ok(claims)
}

/// What `POST /v1/sign` signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDigestClaims {
    pub iss: String,
    pub iat: i64,
    pub jti: String,
    /// The device that asked.
    pub sub: String,
    /// base64url of the document's SHA-256.
    pub digest: String,
    pub digest_alg: String,
    pub cnf: KeyConfirmation,
    pub sid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsession_id: Option<String>,
    pub ticket_id: String,
    pub ear_status: EarStatus,
    pub risk: u8,
}

/// Signature by a published key and type. A signed digest does not expire: it records
/// what was true when it was made.
pub fn verify_signed_digest(
    token: &str,
    key_for_kid: impl Fn(&str) -> Option<VerifyingKey>,
) -> Result<SignedDigestClaims, ProtoError> {
    jwt::verify_by_kid(token, SIGNED_DIGEST_TYP, key_for_kid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SystemRandom;
    use crate::jws::Header;
    use crate::{FixedClock, SigningKey};

    fn claims() -> AccessTokenClaims {
        AccessTokenClaims {
            iss: "https://vouch.example".into(),
            sub: "dev_1".into(),
            aud: "https://vouch.example".into(),
            client_id: "dev_1".into(),
            iat: 1_000,
            exp: 1_600,
            jti: "at_1".into(),
            cnf: KeyConfirmation { jkt: "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I".into() },
            sid: "ses_1".into(),
            subsession_id: None,
            ticket_id: "tkt_1".into(),
            ear_status: EarStatus::Affirming,
            risk: 3,
            operations: vec!["payment".into()],
            max_amount_minor: 10_000,
        }
    }

    #[test]
    fn access_tokens_verify_by_kid_type_and_expiry() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let public = key.verifying_key();
        let lookup = |kid: &str| (kid == "k1").then_some(public);
        let token = jwt::encode(&Header::es256(ACCESS_TOKEN_TYP).with_kid("k1"), &claims(), &key, &rng).unwrap();
        assert_eq!(verify_access_token(&token, lookup, &FixedClock(1_600)).unwrap(), claims());
        assert!(matches!(verify_access_token(&token, lookup, &FixedClock(1_601)), Err(ProtoError::Expired { .. })));
        assert!(matches!(
            verify_access_token(&token, |_| None, &FixedClock(1_000)),
            Err(ProtoError::UnknownSigningKey { .. })
        ));
        let untyped = jwt::encode(&Header::es256("JWT").with_kid("k1"), &claims(), &key, &rng).unwrap();
        assert!(matches!(verify_access_token(&untyped, lookup, &FixedClock(1_000)), Err(ProtoError::WrongType { .. })));
        let no_kid = jwt::encode(&Header::es256(ACCESS_TOKEN_TYP), &claims(), &key, &rng).unwrap();
        assert!(matches!(verify_access_token(&no_kid, lookup, &FixedClock(1_000)), Err(ProtoError::Malformed { .. })));
        assert!(verify_signed_digest(&token, lookup).is_err(), "an access token is not a signed digest");
    }
}
