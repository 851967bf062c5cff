//! DPoP at the HTTP edge (RFC 9449): proofs checked against the request, the single
//! use of each proof recorded in the database, server nonces, and [`DpopCaller`], the
//! extractor every device-facing endpoint takes to know who is calling.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, HOST, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::Response;
use vouch_proto::ProtoError;
use vouch_proto::attest::EarStatus;
use vouch_proto::crypto::sha256;
use vouch_proto::dpop::{self, DpopCheck, NonceKey, ProofContext, VerifiedProof};
use vouch_proto::token::{AccessTokenClaims, verify_access_token};
use vouch_store::TokenSessionState;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::keys::{Expiring, VerifiedCache};

pub const DPOP_HEADER: HeaderName = HeaderName::from_static("dpop");
pub const DPOP_NONCE_HEADER: HeaderName = HeaderName::from_static("dpop-nonce");
/// Verified access tokens kept in memory; beyond this, expired ones are dropped, and if
/// that is not enough, all of them.
const TOKEN_CACHE_ENTRIES_MAX: usize = 100_000;
const NONCE_KEY_LABEL: &str = "vouch/dpop-nonce/v1";
const DESCRIPTION_CHARS_MAX: usize = 200;

/// Where a proof is presented: the token endpoint answers refusals with 400 (RFC 6749
/// section 5.2), protected resources with 401 and a `WWW-Authenticate` challenge
/// (RFC 9449 section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    Resource,
}

/// What DPoP needs to keep between requests: the nonce key and the cache of verified
/// access tokens, by SHA-256 of the token.
pub struct DpopState {
    nonces: Option<NonceKey>,
    verified_tokens: VerifiedCache<AccessTokenClaims>,
}

impl std::fmt::Debug for DpopState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopState").field("nonces", &self.nonces).finish_non_exhaustive()
    }
}

impl DpopState {
    /// Every instance given the same master key derives the same nonce key, so a nonce
    /// one instance issued is good at all of them.
    pub fn new(master: &crate::keys::MasterKey, nonce_required: bool, window_secs: i64) -> Result<Self, ProtoError> {
        let nonces =
            if nonce_required { Some(NonceKey::new(&*master.derive(NONCE_KEY_LABEL), window_secs)?) } else { None };
        Ok(DpopState { nonces, verified_tokens: VerifiedCache::new(TOKEN_CACHE_ENTRIES_MAX) })
    }

    /// The nonce proofs must carry now, when nonces are required.
    pub fn current_nonce(&self, now: i64) -> Option<String> {
        self.nonces.as_ref().map(|n| n.issue(now))
    }

    fn nonce_header(&self, now: i64) -> Option<HeaderValue> {
        self.current_nonce(now).and_then(|nonce| HeaderValue::from_str(&nonce).ok())
    }

    /// The token's signature is checked once and remembered by the token's hash; its
    /// expiry, and that its signing key is still published, on every call.
    fn verified_token(
        &self,
        state: &AppState,
        token: &str,
        hash: [u8; 32],
    ) -> Result<Arc<AccessTokenClaims>, ProtoError> {
        self.verified_tokens.verified(&*state.keys, state.now(), hash, |key_for_kid| {
            verify_access_token(token, key_for_kid, &*state.clock)
        })
    }
}

impl Expiring for AccessTokenClaims {
    fn exp(&self) -> i64 {
        self.exp
    }
}

/// The absolute URI the client addressed, for `htu`: the configured public URL, or
/// `http://` and the `Host` header.
fn request_uri(state: &AppState, head: &RequestHead<'_>) -> ApiResult<String> {
    let path = head.uri.path();
    if let Some(base) = &state.config.public_url {
        return Ok(format!("{base}{path}"));
    }
    let host = head
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| head.uri.authority().map(|a| a.as_str()))
        .ok_or_else(|| ApiError::bad_request("missing-host", "the request names no host to check htu against"))?;
    Ok(format!("http://{host}{path}"))
}

/// The parts of a request a proof is checked against.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl<'a> From<&'a Parts> for RequestHead<'a> {
    fn from(parts: &'a Parts) -> Self {
        RequestHead { method: &parts.method, uri: &parts.uri, headers: &parts.headers }
    }
}

/// The one `DPoP` header (RFC 9449 section 4.3, check 1).
fn single_proof(headers: &HeaderMap, endpoint: Endpoint) -> ApiResult<&str> {
    let mut proofs = headers.get_all(DPOP_HEADER).iter();
    match (proofs.next(), proofs.next()) {
        (Some(proof), None) => proof
            .to_str()
            .map_err(|_| refusal(endpoint, "invalid_dpop_proof", "dpop-format", "the DPoP header is not ASCII")),
        (None, _) => {
            Err(refusal(endpoint, "invalid_dpop_proof", "dpop-missing", "expected a DPoP header with a proof"))
        }
        (Some(_), Some(_)) => {
            Err(refusal(endpoint, "invalid_dpop_proof", "dpop-multiple", "expected exactly one DPoP header"))
        }
    }
}

/// Verifies the request's proof, statelessly: everything but single use. With an
/// access token, the proof must carry its `ath`; with `bound_jkt`, be made by that key.
pub fn check_proof(
    state: &AppState,
    head: RequestHead<'_>,
    endpoint: Endpoint,
    access_token: Option<&str>,
    bound_jkt: Option<&str>,
) -> ApiResult<VerifiedProof> {
    let proof = single_proof(head.headers, endpoint)?;
    let uri = request_uri(state, &head)?;
    let context = ProofContext {
        method: head.method.as_str(),
        uri: &uri,
        access_token,
        bound_jkt,
        iat_window_secs: state.config.dpop_iat_window_secs,
        nonces: state.dpop.nonces.as_ref(),
    };
    dpop::verify_proof(proof, &context, &*state.clock).map_err(|e| proof_refused(state, endpoint, e))
}

/// Until when a proof could still be accepted, and so must be remembered.
pub fn proof_expiry(state: &AppState, proof: &VerifiedProof) -> i64 {
    proof.iat.saturating_add(state.config.dpop_iat_window_secs)
}

pub fn replayed(endpoint: Endpoint) -> ApiError {
    refusal(endpoint, "invalid_dpop_proof", "dpop-replayed", "this DPoP proof has been used before; make a fresh one")
}

fn proof_refused(state: &AppState, endpoint: Endpoint, e: ProtoError) -> ApiError {
    let ProtoError::InvalidDpopProof { check, detail } = e else {
        return refusal(endpoint, "invalid_dpop_proof", "dpop-format", e.to_string());
    };
    let reason = match check {
        DpopCheck::Format => "dpop-format",
        DpopCheck::Typ => "dpop-typ",
        DpopCheck::Alg => "dpop-alg",
        DpopCheck::Jwk => "dpop-jwk",
        DpopCheck::Signature => "dpop-signature",
        DpopCheck::Claims => "dpop-claims",
        DpopCheck::Htm => "dpop-htm",
        DpopCheck::Htu => "dpop-htu",
        DpopCheck::Iat => "dpop-iat",
        DpopCheck::Ath => "dpop-ath",
        DpopCheck::Binding => "dpop-key-mismatch",
        DpopCheck::Nonce => {
            let refused = refusal(endpoint, "use_dpop_nonce", "use-dpop-nonce", detail);
            return match state.dpop.nonce_header(state.now()) {
                Some(nonce) => refused.with_header(DPOP_NONCE_HEADER, nonce),
                None => refused,
            };
        }
        _ => "dpop-format",
    };
    refusal(endpoint, "invalid_dpop_proof", reason, detail)
}

/// A refusal in the form the endpoint owes: 400 with the OAuth error at the token
/// endpoint; 401 with a `WWW-Authenticate: DPoP` challenge at a protected resource.
pub fn refusal(endpoint: Endpoint, error: &'static str, reason: &'static str, detail: impl Into<String>) -> ApiError {
    let detail = detail.into();
    match endpoint {
        Endpoint::Token => ApiError::oauth(StatusCode::BAD_REQUEST, error, reason, detail),
        Endpoint::Resource => {
            let challenge = format!(
                "DPoP error=\"{error}\", error_description=\"{}\", algs=\"{}\"",
                quoted_string_safe(&detail),
                dpop::SUPPORTED_ALGS
            );
            let refused = ApiError::oauth(StatusCode::UNAUTHORIZED, error, reason, detail);
            match HeaderValue::from_str(&challenge) {
                Ok(value) => refused.with_header(WWW_AUTHENTICATE, value),
                Err(_) => refused,
            }
        }
    }
}

/// Keeps a description inside an RFC 9110 quoted-string: printable ASCII, no quote or
/// backslash.
fn quoted_string_safe(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
        .take(DESCRIPTION_CHARS_MAX)
        .collect()
}

/// A caller of a protected endpoint: its access token verified (signature, type,
/// expiry), its proof verified against this request and the token's key, the session
/// and sub-session open and the device active now, and the proof recorded as used.
#[derive(Debug, Clone)]
pub struct DpopCaller {
    pub token: Arc<AccessTokenClaims>,
    pub proof: VerifiedProof,
}

impl DpopCaller {
    pub fn device_id(&self) -> &str {
        &self.token.sub
    }

    /// What a phone's token must show before it is given something to pay with: the
    /// attestation it was issued on is affirming, its ticket allows `operation`, and
    /// its risk is under `risk_threshold`. (The ticket itself was checked, by
    /// [`crate::attest::check_ticket`], when the token was issued.)
    pub fn require_ticket(&self, operation: &str, risk_threshold: u8) -> ApiResult<()> {
        let token = &self.token;
        if token.ear_status != EarStatus::Affirming {
            return Err(ApiError::forbidden(
                "ticket-not-affirming",
                format!("the phone's attestation is {}, expected affirming", token.ear_status.as_str()),
            ));
        }
        if !token.operations.iter().any(|op| op == operation) {
            return Err(ApiError::forbidden(
                "operation-not-allowed",
                format!("the phone's ticket does not allow {operation}"),
            ));
        }
        if token.risk >= risk_threshold {
            return Err(ApiError::forbidden(
                "risk-too-high",
                format!("the phone's risk {} is at or above the threshold {risk_threshold}", token.risk),
            ));
        }
        Ok(())
    }
}

impl FromRequestParts<AppState> for DpopCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = dpop_authorization(&parts.headers)?;
        let hash = sha256(token.as_bytes());
        let claims = state.dpop.verified_token(state, token, hash).map_err(|e| {
            let detail = match e {
                ProtoError::Expired { .. } => "the access token has expired".to_owned(),
                other => format!("the access token is not valid: {other}"),
            };
            refusal(Endpoint::Resource, "invalid_token", "invalid-token", detail)
        })?;
        let proof =
            check_proof(state, RequestHead::from(&*parts), Endpoint::Resource, Some(token), Some(&claims.cnf.jkt))?;
        // One statement records the proof only while the session is live; the reason
        // is read only when nothing was recorded.
        let (replay_key, expires_at) = (proof.replay_key(), proof_expiry(state, &proof));
        let (sid, subsession_id) = (claims.sid.clone(), claims.subsession_id.clone());
        let recorded = state
            .store
            .write_statement(move |tx| {
                Box::pin(async move {
                    tx.record_dpop_proof_if_live(&replay_key, expires_at, &sid, subsession_id.as_deref()).await
                })
            })
            .await?;
        if !recorded {
            return Err(match state.store.token_session_state(&claims.sid, claims.subsession_id.as_deref()).await? {
                TokenSessionState::Live => replayed(Endpoint::Resource),
                TokenSessionState::Ended => {
                    refusal(Endpoint::Resource, "invalid_token", "session-ended", "the token's session has ended")
                }
                TokenSessionState::DeviceInactive => refusal(
                    Endpoint::Resource,
                    "invalid_token",
                    "device-not-active",
                    "the token's device is suspended or revoked",
                ),
                TokenSessionState::Unknown => {
                    refusal(Endpoint::Resource, "invalid_token", "invalid-token", "the token's session is unknown")
                }
            });
        }
        Ok(DpopCaller { token: claims, proof })
    }
}

/// `Authorization: DPoP <token>`. A DPoP-bound token presented as a bearer token is
/// refused (RFC 9449 section 7.2).
fn dpop_authorization(headers: &HeaderMap) -> ApiResult<&str> {
    let Some(header) = headers.get(AUTHORIZATION) else {
        let challenge = format!("DPoP algs=\"{}\"", dpop::SUPPORTED_ALGS);
        return Err(ApiError::unauthorized("missing-credentials", "expected Authorization: DPoP <access token>")
            .with_header(
                WWW_AUTHENTICATE,
                HeaderValue::from_str(&challenge).unwrap_or(HeaderValue::from_static("DPoP")),
            ));
    };
    header
        .to_str()
        .ok()
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("DPoP"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            refusal(
                Endpoint::Resource,
                "invalid_token",
                "invalid-credentials",
                "expected Authorization: DPoP <access token>; DPoP-bound tokens are never bearer tokens",
            )
        })
}

/// Gives every answer to a request that carried DPoP material, and every DPoP
/// challenge, a fresh `DPoP-Nonce`, so clients always hold one that works.
pub async fn attach_nonce(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let carried_dpop = request.headers().contains_key(DPOP_HEADER)
        || request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|h| h.as_bytes().get(..5))
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"DPoP "));
    let mut response = next.run(request).await;
    let challenged = response.headers().get(WWW_AUTHENTICATE).is_some_and(|h| h.as_bytes().starts_with(b"DPoP"));
    if (carried_dpop || challenged)
        && !response.headers().contains_key(DPOP_NONCE_HEADER)
        && let Some(nonce) = state.dpop.nonce_header(state.now())
    {
        response.headers_mut().insert(DPOP_NONCE_HEADER, nonce);
    }
    response
}
