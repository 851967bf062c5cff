//! JWT (RFC 7519) on top of [`crate::jws`]: typed claims and the time checks every
//! Vouch token shares.

use serde::{Serialize, de::DeserializeOwned};

use crate::jws::{self, Header, UnverifiedJws};
use crate::{ProtoError, SigningKey, VerifyingKey, crypto::SecureRandom};

pub fn encode<C: Serialize>(
    header: &Header,
    claims: &C,
    key: &SigningKey,
    rng: &dyn SecureRandom,
) -> Result<String, ProtoError> {
    let payload = serde_json::to_vec(claims).map_err(|e| ProtoError::malformed("JWT claims", e))?;
    jws::sign(header, &payload, key, rng)
}

/// Verifies the signature with `key`, then parses the claims.
pub fn decode<C: DeserializeOwned>(jws: &UnverifiedJws, key: &VerifyingKey) -> Result<C, ProtoError> {
    parse_claims(jws.verify(key)?)
}

/// A server-signed token: its `typ`, its `kid` among `key_for_kid`'s keys, the
/// signature, then the claims. Time checks are the caller's, since they differ.
pub fn verify_by_kid<C: DeserializeOwned>(
    token: &str,
    typ: &'static str,
    key_for_kid: impl Fn(&str) -> Option<VerifyingKey>,
) -> Result<C, ProtoError> {
    let jws = UnverifiedJws::parse(token)?;
    jws.header().expect_typ(typ)?;
    let kid = jws.header().kid.as_deref().ok_or_else(|| ProtoError::Malformed {
        what: "server token",
        detail: "no kid, expected the id of a published signing key".into(),
    })?;
    let key = key_for_kid(kid).ok_or_else(|| ProtoError::UnknownSigningKey { kid: kid.to_owned() })?;
    decode(&jws, &key)
}

pub fn parse_claims<C: DeserializeOwned>(payload: &[u8]) -> Result<C, ProtoError> {
    serde_json::from_slice(payload).map_err(|e| ProtoError::malformed("JWT claims", e))
}

/// `exp` against `now`, allowing `leeway_secs` of clock skew. Vouch signs no token
/// that starts later than it is issued, so there is no `nbf` to check.
pub fn check_expiry(exp: i64, now: i64, leeway_secs: i64) -> Result<(), ProtoError> {
    if now > exp.saturating_add(leeway_secs) {
        return Err(ProtoError::Expired { exp, now });
    }
    Ok(())
}

/// `iat` must lie within `window_secs` of `now`, for proofs that carry no `exp`.
pub fn check_issued_at(iat: i64, now: i64, window_secs: i64) -> Result<(), ProtoError> {
    if iat.abs_diff(now) > window_secs.unsigned_abs() {
        return Err(ProtoError::StaleIssuedAt { iat, now, window_secs });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_window() {
        check_expiry(100, 100, 0).unwrap();
        check_expiry(100, 105, 5).unwrap();
        assert_eq!(check_expiry(100, 101, 0), Err(ProtoError::Expired { exp: 100, now: 101 }));
        assert_eq!(check_expiry(100, 106, 5), Err(ProtoError::Expired { exp: 100, now: 106 }));
        assert_eq!(check_expiry(i64::MAX, i64::MAX, 5), Ok(()));
        check_issued_at(1000, 1030, 60).unwrap();
        check_issued_at(1000, 940, 60).unwrap();
        assert!(check_issued_at(1000, 1061, 60).is_err());
        assert!(check_issued_at(i64::MIN, 0, 60).is_err());
    }
}
