//! DPoP (RFC 9449): a proof, made fresh for each HTTP request, that the caller holds
//! the private key an access token is bound to.
//!
//! [`verify_proof`] makes every check of RFC 9449 section 4.3 that needs no storage:
//! header shape, `typ`, asymmetric `alg`, public `jwk`, signature, required claims,
//! `htm`, `htu` (scheme, host and path, without query and fragment), `iat` window,
//! server nonce, `ath` and the binding to the token's `cnf.jkt`. Single use of `jti` is
//! the caller's to enforce, in its database, with [`VerifiedProof::replay_key`].
//!
//! Server nonces (section 8) are stateless: [`NonceKey`] MACs a time window, so any
//! instance holding the same key accepts a nonce another instance issued.

use aws_lc_rs::hmac;
use serde::{Deserialize, Serialize};

use crate::crypto::{SecureRandom, constant_time_eq, random_bytes, sha256};
use crate::jws::{self, Header, UnverifiedJws};
use crate::{Clock, ProtoError, SigningKey, VerifyingKey, b64, jwt};

pub const PROOF_TYP: &str = "dpop+jwt";
/// The signature algorithms proofs may use, as advertised in `WWW-Authenticate`.
pub const SUPPORTED_ALGS: &str = jws::ALG_ES256;
const JTI_CHARS_MAX: usize = 256;
const NONCE_TAG_BYTES: usize = 16;
/// JWK members that only a private or symmetric key has.
const PRIVATE_JWK_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

/// Which check of RFC 9449 section 4.3 a proof failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DpopCheck {
    /// Not a well-formed compact JWT.
    Format,
    Typ,
    /// `none`, a MAC, or an algorithm this server does not support.
    Alg,
    /// No `jwk` header, or one holding private or symmetric key material.
    Jwk,
    Signature,
    /// A required claim (`jti`, `htm`, `htu`, `iat`) is missing or unusable.
    Claims,
    Htm,
    Htu,
    Iat,
    /// The server nonce is missing, unknown or stale: answer `use_dpop_nonce`.
    Nonce,
    /// `ath` missing or not the hash of the presented access token.
    Ath,
    /// The proof's key is not the one the access token is bound to.
    Binding,
}

impl DpopCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            DpopCheck::Format => "format",
            DpopCheck::Typ => "typ",
            DpopCheck::Alg => "alg",
            DpopCheck::Jwk => "jwk",
            DpopCheck::Signature => "signature",
            DpopCheck::Claims => "claims",
            DpopCheck::Htm => "htm",
            DpopCheck::Htu => "htu",
            DpopCheck::Iat => "iat",
            DpopCheck::Nonce => "nonce",
            DpopCheck::Ath => "ath",
            DpopCheck::Binding => "binding",
        }
    }
}

fn refuse(check: DpopCheck, detail: impl Into<String>) -> ProtoError {
    ProtoError::InvalidDpopProof { check, detail: detail.into() }
}

/// The claims of a DPoP proof (RFC 9449 section 4.2). Unknown claims are allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofClaims {
    pub jti: String,
    pub htm: String,
    pub htu: String,
    pub iat: i64,
    /// base64url SHA-256 of the access token, on requests that present one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ath: Option<String>,
    /// The last `DPoP-Nonce` the server sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

impl ProofClaims {
    /// Claims for one request, with a fresh 128-bit `jti`.
    pub fn for_request(
        method: &str,
        uri: &str,
        iat: i64,
        access_token: Option<&str>,
        nonce: Option<&str>,
        rng: &dyn SecureRandom,
    ) -> Result<Self, ProtoError> {
        Ok(ProofClaims {
            jti: b64::encode(random_bytes::<16>(rng)?),
            htm: method.to_owned(),
            htu: strip_query_and_fragment(uri).to_owned(),
            iat,
            ath: access_token.map(access_token_hash),
            nonce: nonce.map(str::to_owned),
        })
    }
}

/// Signs a proof with `key`, whose public half goes into the `jwk` header.
pub fn sign_proof(claims: &ProofClaims, key: &SigningKey, rng: &dyn SecureRandom) -> Result<String, ProtoError> {
    let header = Header::es256(PROOF_TYP).with_jwk(key.verifying_key().to_jwk());
    jwt::encode(&header, claims, key, rng)
}

/// `ath`: base64url SHA-256 of the access token's ASCII text (RFC 9449 section 4.2).
pub fn access_token_hash(access_token: &str) -> String {
    b64::encode(sha256(access_token.as_bytes()))
}

/// What the request the proof came with looks like, and what the server expects.
#[derive(Debug, Clone, Copy)]
pub struct ProofContext<'a> {
    /// The request method, compared exactly (methods are case-sensitive).
    pub method: &'a str,
    /// The absolute URI the request was made to, as the server is reached.
    pub uri: &'a str,
    /// The access token presented with the proof, if any: the proof must carry its
    /// `ath`, and its key must be `bound_jkt`.
    pub access_token: Option<&'a str>,
    /// The `cnf.jkt` of the presented access token.
    pub bound_jkt: Option<&'a str>,
    /// How far `iat` may lie from now, either way.
    pub iat_window_secs: i64,
    /// Require a nonce issued under this key.
    pub nonces: Option<&'a NonceKey>,
}

/// A proof that passed every stateless check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    pub key: VerifyingKey,
    /// RFC 7638 thumbprint of the proof's key.
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
}

impl VerifiedProof {
    /// The value whose single use the server records: `jti` scoped to the key, so one
    /// client cannot use up another's identifiers.
    pub fn replay_key(&self) -> [u8; 32] {
        sha256(format!("{}.{}", self.jkt, self.jti).as_bytes())
    }
}

#[derive(Deserialize)]
struct LenientHeader {
    typ: Option<String>,
    alg: Option<String>,
    jwk: Option<serde_json::Map<String, serde_json::Value>>,
}

/// RFC 9449 section 4.3, every check but `jti` single use.
pub fn verify_proof(proof: &str, context: &ProofContext<'_>, clock: &dyn Clock) -> Result<VerifiedProof, ProtoError> {
    // The strict parse decodes the header once on the way every good proof takes; only
    // a proof it refuses has its header read again, to name the check that failed.
    let jws = match UnverifiedJws::parse(proof) {
        Ok(jws) => jws,
        Err(e) => {
            check_header(proof)?;
            return Err(refuse(DpopCheck::Format, e.to_string()));
        }
    };
    check_typ(jws.header().typ.as_deref())?;
    let (payload, key) = jws.verify_with_embedded_jwk().map_err(|e| match e {
        ProtoError::BadSignature => refuse(DpopCheck::Signature, "the proof is not signed by its jwk"),
        other => refuse(DpopCheck::Jwk, other.to_string()),
    })?;
    let claims: ProofClaims = serde_json::from_slice(payload).map_err(|e| {
        refuse(DpopCheck::Claims, format!("expected jti, htm, htu (strings) and iat (integer seconds): {e}"))
    })?;
    if claims.jti.is_empty() || claims.jti.len() > JTI_CHARS_MAX {
        return Err(refuse(DpopCheck::Claims, format!("jti must be 1 to {JTI_CHARS_MAX} characters")));
    }
    if claims.htm != context.method {
        return Err(refuse(DpopCheck::Htm, format!("htm is {:?}, expected {:?}", claims.htm, context.method)));
    }
    check_htu(&claims.htu, context.uri)?;
    let now = clock.now_unix();
    jwt::check_issued_at(claims.iat, now, context.iat_window_secs)
        .map_err(|e| refuse(DpopCheck::Iat, e.to_string()))?;
    if let Some(nonces) = context.nonces {
        let nonce = claims.nonce.as_deref().ok_or_else(|| refuse(DpopCheck::Nonce, "the proof carries no nonce"))?;
        nonces.check(nonce, now)?;
    }
    let jkt = key.thumbprint();
    if let Some(access_token) = context.access_token {
        let ath = claims.ath.as_deref().ok_or_else(|| refuse(DpopCheck::Ath, "the proof carries no ath"))?;
        if !constant_time_eq(ath.as_bytes(), access_token_hash(access_token).as_bytes()) {
            return Err(refuse(DpopCheck::Ath, "ath is not the hash of the presented access token"));
        }
    }
    if let Some(bound) = context.bound_jkt
        && !constant_time_eq(bound.as_bytes(), jkt.as_bytes())
    {
        return Err(refuse(DpopCheck::Binding, "the proof's key is not the key the access token is bound to"));
    }
    Ok(VerifiedProof { key, jkt, jti: claims.jti, iat: claims.iat })
}

/// Names why the strict parse refused a proof: `typ`, `alg` or `jwk`, else `format`.
fn check_header(proof: &str) -> Result<(), ProtoError> {
    let header_b64 = proof.split('.').next().unwrap_or_default();
    let header: LenientHeader = b64::decode("DPoP header", header_b64)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or_else(|| refuse(DpopCheck::Format, "the proof is not a JWT with a JSON header"))?;
    check_typ(header.typ.as_deref())?;
    if header.alg.as_deref() != Some(jws::ALG_ES256) {
        return Err(refuse(DpopCheck::Alg, format!("alg is {:?}, expected {SUPPORTED_ALGS}", header.alg)));
    }
    let jwk = header.jwk.ok_or_else(|| refuse(DpopCheck::Jwk, "no jwk header, expected the signer's public key"))?;
    if let Some(member) = PRIVATE_JWK_MEMBERS.iter().find(|m| jwk.contains_key(**m)) {
        return Err(refuse(DpopCheck::Jwk, format!("the jwk holds private key material ({member:?})")));
    }
    Ok(())
}

fn check_typ(typ: Option<&str>) -> Result<(), ProtoError> {
    if typ.is_some_and(|t| t.eq_ignore_ascii_case(PROOF_TYP)) {
        Ok(())
    } else {
        Err(refuse(DpopCheck::Typ, format!("typ is {typ:?}, expected \"{PROOF_TYP}\"")))
    }
}

fn check_htu(htu: &str, request_uri: &str) -> Result<(), ProtoError> {
    let expected = normalize_uri(request_uri)
        .ok_or_else(|| refuse(DpopCheck::Htu, format!("cannot derive the request URI from {request_uri:?}")))?;
    match normalize_uri(htu) {
        Some(found) if found == expected => Ok(()),
        _ => Err(refuse(DpopCheck::Htu, format!("htu is {htu:?}, expected {expected:?}"))),
    }
}

fn strip_query_and_fragment(uri: &str) -> &str {
    uri.split(['?', '#']).next().unwrap_or_default()
}

/// RFC 3986 section 6.2.2 and 6.2.3 normalization of an absolute http(s) URI, with
/// query and fragment dropped (RFC 9449 section 4.3): scheme and host lowercased,
/// the default port removed, an empty path made `/`. `None` if it is not such a URI.
pub fn normalize_uri(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    let rest = strip_query_and_fragment(rest);
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (inside, after) = bracketed.split_once(']')?;
            let port = if after.is_empty() { None } else { Some(after.strip_prefix(':')?) };
            (format!("[{inside}]"), port)
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.to_owned(), None),
        },
    };
    if host.is_empty() || port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let host = host.to_ascii_lowercase();
    Some(match port.filter(|p| *p != default_port) {
        Some(port) => format!("{scheme}://{host}:{port}{path}"),
        None => format!("{scheme}://{host}{path}"),
    })
}

/// Issues and checks server nonces: base64url of a big-endian window number and a
/// truncated HMAC-SHA256 over it. A nonce is good in its window and the ones either
/// side, so a client is never refused for a rollover or for a few seconds of skew
/// between instances.
pub struct NonceKey {
    key: hmac::Key,
    window_secs: i64,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceKey").field("window_secs", &self.window_secs).finish_non_exhaustive()
    }
}

impl NonceKey {
    /// `secret` must be at least 32 bytes of key material shared by every instance.
    pub fn new(secret: &[u8], window_secs: i64) -> Result<Self, ProtoError> {
        if secret.len() < 32 || window_secs < 1 {
            return Err(ProtoError::InvalidKey(
                "a nonce key needs at least 32 bytes of secret and a window of 1 second or more".into(),
            ));
        }
        Ok(NonceKey { key: hmac::Key::new(hmac::HMAC_SHA256, secret), window_secs })
    }

    pub fn issue(&self, now: i64) -> String {
        let window = now.div_euclid(self.window_secs);
        let mut bytes = window.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.tag(window));
        b64::encode(bytes)
    }

    pub fn check(&self, nonce: &str, now: i64) -> Result<(), ProtoError> {
        let stale = || refuse(DpopCheck::Nonce, "the nonce is not one this server issued recently");
        let bytes = b64::decode("DPoP nonce", nonce).map_err(|_| stale())?;
        if bytes.len() != 8 + NONCE_TAG_BYTES {
            return Err(stale());
        }
        let (window_bytes, tag) = bytes.split_at(8);
        let window = i64::from_be_bytes(window_bytes.try_into().map_err(|_| stale())?);
        let current = now.div_euclid(self.window_secs);
        if window.abs_diff(current) > 1 || !constant_time_eq(tag, &self.tag(window)) {
            return Err(stale());
        }
        Ok(())
    }

    fn tag(&self, window: i64) -> [u8; NONCE_TAG_BYTES] {
        let mut input = b"vouch dpop nonce v1 ".to_vec();
        input.extend_from_slice(&window.to_be_bytes());
        let mac = hmac::sign(&self.key, &input);
        let mut tag = [0u8; NONCE_TAG_BYTES];
        tag.copy_from_slice(&mac.as_ref()[..NONCE_TAG_BYTES]);
        tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FixedClock;
    use crate::crypto::SystemRandom;

    /// RFC 9449 section 4.1, figure 4: the proof sent to the token endpoint.
    const RFC_TOKEN_PROOF: &str = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg";
    /// RFC 9449 section 7.1, figure 13: a proof for a protected resource, with `ath`.
    const RFC_RESOURCE_PROOF: &str = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA";
    /// RFC 9449 section 7.1, figure 12: the access token the resource proof hashes.
    const RFC_ACCESS_TOKEN: &str = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";
    /// RFC 9449 section 6.1: `cnf.jkt` of the example key.
    const RFC_JKT: &str = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";

    fn context<'a>(method: &'a str, uri: &'a str) -> ProofContext<'a> {
        ProofContext { method, uri, access_token: None, bound_jkt: None, iat_window_secs: 60, nonces: None }
    }

    fn check_of(result: Result<VerifiedProof, ProtoError>) -> DpopCheck {
        match result {
            Err(ProtoError::InvalidDpopProof { check, .. }) => check,
            other => panic!("expected a refused proof, got {other:?}"),
        }
    }

    #[test]
    fn rfc9449_token_request_proof() {
        let proof = verify_proof(
            RFC_TOKEN_PROOF,
            &context("POST", "https://server.example.com/token"),
            &FixedClock(1_562_262_616),
        )
        .unwrap();
        assert_eq!(proof.jkt, RFC_JKT);
        assert_eq!(proof.jti, "-BwC3ESc6acc2lTc");
        assert_eq!(proof.iat, 1_562_262_616);
    }

    #[test]
    fn rfc9449_resource_proof_with_ath() {
        assert_eq!(access_token_hash(RFC_ACCESS_TOKEN), "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo");
        let ctx = ProofContext {
            access_token: Some(RFC_ACCESS_TOKEN),
            bound_jkt: Some(RFC_JKT),
            ..context("GET", "https://resource.example.org/protectedresource?x=1")
        };
        let proof = verify_proof(RFC_RESOURCE_PROOF, &ctx, &FixedClock(1_562_262_618)).unwrap();
        assert_eq!(proof.jti, "e1j3V_bKic8-LAEB");
        let other_token = ProofContext { access_token: Some("another"), ..ctx };
        assert_eq!(
            check_of(verify_proof(RFC_RESOURCE_PROOF, &other_token, &FixedClock(1_562_262_618))),
            DpopCheck::Ath
        );
        let other_key = ProofContext { bound_jkt: Some("AAAA"), ..ctx };
        assert_eq!(
            check_of(verify_proof(RFC_RESOURCE_PROOF, &other_key, &FixedClock(1_562_262_618))),
            DpopCheck::Binding
        );
    }

    #[test]
    fn rfc9449_proof_checked_against_the_request() {
        let clock = FixedClock(1_562_262_616);
        let uri = "https://server.example.com/token";
        let cases = [
            (context("GET", uri), 1_562_262_616, DpopCheck::Htm),
            (context("post", uri), 1_562_262_616, DpopCheck::Htm),
            (context("POST", "https://server.example.com/other"), 1_562_262_616, DpopCheck::Htu),
            (context("POST", "https://other.example.com/token"), 1_562_262_616, DpopCheck::Htu),
            (context("POST", "http://server.example.com/token"), 1_562_262_616, DpopCheck::Htu),
            (context("POST", uri), 1_562_262_616 + 61, DpopCheck::Iat),
            (context("POST", uri), 1_562_262_616 - 61, DpopCheck::Iat),
            (
                ProofContext { access_token: Some(RFC_ACCESS_TOKEN), ..context("POST", uri) },
                1_562_262_616,
                DpopCheck::Ath,
            ),
        ];
        for (ctx, now, expected) in cases {
            assert_eq!(check_of(verify_proof(RFC_TOKEN_PROOF, &ctx, &FixedClock(now))), expected, "{ctx:?}");
        }
        let key = NonceKey::new(&[7; 32], 60).unwrap();
        let with_nonce = ProofContext { nonces: Some(&key), ..context("POST", uri) };
        assert_eq!(check_of(verify_proof(RFC_TOKEN_PROOF, &with_nonce, &clock)), DpopCheck::Nonce);
        let case_and_port = context("POST", "HTTPS://Server.Example.COM:443/token#frag");
        verify_proof(RFC_TOKEN_PROOF, &case_and_port, &clock).unwrap();
    }

    fn forge(header: serde_json::Value, claims: serde_json::Value, key: &SigningKey) -> String {
        let rng = SystemRandom::new();
        let signing_input = format!(
            "{}.{}",
            b64::encode(serde_json::to_vec(&header).unwrap()),
            b64::encode(serde_json::to_vec(&claims).unwrap())
        );
        let signature = key.sign(&rng, signing_input.as_bytes()).unwrap();
        format!("{signing_input}.{}", b64::encode(signature))
    }

    #[test]
    fn each_malformed_proof_names_its_check() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let other = SigningKey::generate(&rng).unwrap();
        let jwk = serde_json::to_value(key.verifying_key().to_jwk()).unwrap();
        let mut private_jwk = jwk.clone();
        private_jwk["d"] = "AAAA".into();
        let claims =
            serde_json::json!({"jti": "j1", "htm": "POST", "htu": "https://vouch.example/v1/sign", "iat": 1000});
        let header =
            |typ: &str, alg: &str, jwk: &serde_json::Value| serde_json::json!({"typ": typ, "alg": alg, "jwk": jwk});
        let good = forge(header("dpop+jwt", "ES256", &jwk), claims.clone(), &key);
        let (good_head, good_rest) = good.split_once('.').unwrap();
        let mut no_jti = claims.clone();
        no_jti.as_object_mut().unwrap().remove("jti");
        let mut string_iat = claims.clone();
        string_iat["iat"] = "1000".into();
        let cases = [
            ("x".to_owned(), DpopCheck::Format),
            (format!("{good_head}.{good_rest}.extra"), DpopCheck::Format),
            (forge(header("JWT", "ES256", &jwk), claims.clone(), &key), DpopCheck::Typ),
            (forge(serde_json::json!({"alg": "ES256", "jwk": jwk}), claims.clone(), &key), DpopCheck::Typ),
            (forge(header("dpop+jwt", "none", &jwk), claims.clone(), &key), DpopCheck::Alg),
            (forge(header("dpop+jwt", "HS256", &jwk), claims.clone(), &key), DpopCheck::Alg),
            (forge(header("dpop+jwt", "RS256", &jwk), claims.clone(), &key), DpopCheck::Alg),
            (forge(serde_json::json!({"typ": "dpop+jwt", "alg": "ES256"}), claims.clone(), &key), DpopCheck::Jwk),
            (forge(header("dpop+jwt", "ES256", &private_jwk), claims.clone(), &key), DpopCheck::Jwk),
            (forge(header("dpop+jwt", "ES256", &jwk), claims.clone(), &other), DpopCheck::Signature),
            (forge(header("dpop+jwt", "ES256", &jwk), no_jti, &key), DpopCheck::Claims),
            (forge(header("dpop+jwt", "ES256", &jwk), string_iat, &key), DpopCheck::Claims),
        ];
        let ctx = context("POST", "https://vouch.example/v1/sign");
        verify_proof(&good, &ctx, &FixedClock(1000)).unwrap();
        for (proof, expected) in cases {
            assert_eq!(check_of(verify_proof(&proof, &ctx, &FixedClock(1000))), expected, "{proof:.80}");
        }
    }

    #[test]
    fn signed_proofs_round_trip_with_nonce_and_ath() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let nonces = NonceKey::new(&[9; 32], 60).unwrap();
        let nonce = nonces.issue(5_000);
        let uri = "http://127.0.0.1:8700/v1/sign?draft=1";
        let claims = ProofClaims::for_request("POST", uri, 5_000, Some("token"), Some(&nonce), &rng).unwrap();
        assert_eq!(claims.htu, "http://127.0.0.1:8700/v1/sign");
        let proof = sign_proof(&claims, &key, &rng).unwrap();
        let jkt = key.verifying_key().thumbprint();
        let ctx = ProofContext {
            access_token: Some("token"),
            bound_jkt: Some(&jkt),
            nonces: Some(&nonces),
            ..context("POST", "http://127.0.0.1:8700/v1/sign")
        };
        let verified = verify_proof(&proof, &ctx, &FixedClock(5_030)).unwrap();
        assert_eq!(verified.jkt, jkt);
        assert_eq!(verified.jti, claims.jti);
        let other = ProofClaims::for_request("POST", uri, 5_000, Some("token"), Some(&nonce), &rng).unwrap();
        assert_ne!(
            verified.replay_key(),
            verify_proof(&sign_proof(&other, &key, &rng).unwrap(), &ctx, &FixedClock(5_000)).unwrap().replay_key()
        );
    }

    #[test]
    fn nonces_hold_for_their_window_and_its_neighbours() {
        let key = NonceKey::new(&[1; 32], 60).unwrap();
        let nonce = key.issue(6_000);
        key.check(&nonce, 6_000).unwrap();
        key.check(&nonce, 5_999).unwrap();
        key.check(&nonce, 6_119).unwrap();
        assert!(key.check(&nonce, 6_180).is_err());
        assert!(key.check(&nonce, 5_900).is_err());
        let other = NonceKey::new(&[2; 32], 60).unwrap();
        assert!(other.check(&nonce, 6_000).is_err());
        for junk in ["", "!!", "AAAA", &b64::encode([0u8; 24])] {
            assert!(key.check(junk, 6_000).is_err(), "{junk}");
        }
        assert!(NonceKey::new(&[1; 16], 60).is_err());
    }

    #[test]
    fn uris_normalize_per_rfc3986() {
        let cases = [
            ("https://Example.COM/a/b?q#f", Some("https://example.com/a/b")),
            ("HTTP://example.com:80", Some("http://example.com/")),
            ("http://example.com:8080/x", Some("http://example.com:8080/x")),
            ("https://example.com:443/", Some("https://example.com/")),
            ("http://[::1]:8700/v1", Some("http://[::1]:8700/v1")),
            ("http://[::1]/v1", Some("http://[::1]/v1")),
            ("ftp://example.com/", None),
            ("http://user@example.com/", None),
            ("/v1/sign", None),
            ("http:///path", None),
        ];
        for (uri, expected) in cases {
            assert_eq!(normalize_uri(uri).as_deref(), expected, "{uri}");
        }
    }
}
