//! token: access tokens bound to the device's key (DPoP, RFC 9449), to a session and
//! its sub-sessions, and carrying the attestation they were issued on.
//!
//! A device trades its attestation ticket for a session token (`jwt-bearer`, RFC
//! 7523) with a proof made by the key the ticket names; it derives sub-session tokens
//! from it (token exchange, RFC 8693). Ending the session (or revoking its token, RFC
//! 7009) stops every token of it at once, on every instance, because each protected
//! request reads the session's row. `POST /v1/sign` is the first protected endpoint:
//! the server signs a document digest and names who asked and in what state.

mod dpop;

use axum::Json;
use axum::extract::State;
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_proto::attest::{EarStatus, TicketClaims};
use vouch_proto::crypto::constant_time_eq;
use vouch_proto::dpop::VerifiedProof;
use vouch_proto::jws::Header;
use vouch_proto::token::{
    ACCESS_TOKEN_TYP, AccessTokenClaims, DIGEST_ALG_SHA256, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE, KeyConfirmation,
    SIGNED_DIGEST_TYP, SignedDigestClaims, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_DPOP, verify_access_token,
};
use vouch_proto::{ProtoError, b64};
use vouch_store::{TokenSession, TokenSessionState};

pub use dpop::{DpopCaller, DpopState, Endpoint, attach_nonce};

use crate::AppState;
use crate::attest::check_ticket;
use crate::audit;
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiForm, ApiJson, ApiPath};
use crate::registry::new_id;
use dpop::{RequestHead, check_proof, proof_expiry, replayed};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(token))
        .routes(routes!(revoke))
        .routes(routes!(end_session))
        .routes(routes!(sign_digest))
}

/// An OAuth token request (RFC 6749 section 4.1.3 form encoding). Parameters the
/// grant does not use are ignored, as OAuth requires.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenRequest {
    /// `urn:ietf:params:oauth:grant-type:jwt-bearer` (a session, from an attestation
    /// ticket) or `urn:ietf:params:oauth:grant-type:token-exchange` (a sub-session).
    pub grant_type: String,
    /// jwt-bearer: the device's attestation ticket.
    pub assertion: Option<String>,
    /// token-exchange: the session's access token.
    pub subject_token: Option<String>,
    /// token-exchange: `urn:ietf:params:oauth:token-type:access_token`.
    pub subject_token_type: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// A JWT (`typ` `at+jwt`) bound to the proof's key by `cnf.jkt`.
    pub access_token: String,
    /// Always `DPoP`.
    pub token_type: String,
    pub expires_in: i64,
    /// The session the token belongs to.
    pub sid: String,
    /// Set on sub-session tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsession_id: Option<String>,
    /// Token exchange answers name what they issued (RFC 8693 section 2.2.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_token_type: Option<String>,
}

/// Issues an access token: a session from an attestation ticket, or a sub-session from
/// the session's token. Both need a DPoP proof by the device's key.
#[utoipa::path(post, path = "/v1/token", tag = "token",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    params(("DPoP" = String, Header, description = "DPoP proof (RFC 9449) made by the key the ticket or subject token is bound to")),
    responses(
        (status = 200, body = TokenResponse, headers(("DPoP-Nonce" = String, description = "The nonce to put in the next proof"))),
        (status = "4XX", body = Problem, content_type = "application/problem+json",
            description = "Refused: a problem document whose `error` is the OAuth error code (`invalid_grant`, `invalid_dpop_proof`, `use_dpop_nonce` with a `DPoP-Nonce` header, `invalid_request`, `unsupported_grant_type`)")))]
async fn token(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ApiForm(form): ApiForm<TokenRequest>,
) -> ApiResult<(HeaderMap, Json<TokenResponse>)> {
    let head = RequestHead { method: &method, uri: &uri, headers: &headers };
    let issued = match form.grant_type.as_str() {
        GRANT_JWT_BEARER => {
            let ticket = required(form.assertion.as_deref(), "assertion")?;
            let proof = check_proof(&state, head, Endpoint::Token, None, None)?;
            open_session(&state, proof, ticket).await?
        }
        GRANT_TOKEN_EXCHANGE => {
            let subject = required(form.subject_token.as_deref(), "subject_token")?;
            if form.subject_token_type.as_deref() != Some(TOKEN_TYPE_ACCESS_TOKEN) {
                return Err(ApiError::oauth(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "unsupported-token-type",
                    format!("subject_token_type must be {TOKEN_TYPE_ACCESS_TOKEN}"),
                ));
            }
            open_subsession(&state, head, subject).await?
        }
        other => {
            return Err(ApiError::oauth(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "unsupported-grant-type",
                format!("grant_type {other:?} is not supported; expected {GRANT_JWT_BEARER} or {GRANT_TOKEN_EXCHANGE}"),
            ));
        }
    };
    Ok((no_store(), Json(issued)))
}

fn required<'a>(value: Option<&'a str>, name: &str) -> ApiResult<&'a str> {
    value.filter(|v| !v.is_empty()).ok_or_else(|| {
        ApiError::oauth(StatusCode::BAD_REQUEST, "invalid_request", "missing-parameter", format!("{name} is required"))
    })
}

/// Token responses must not be cached (RFC 6749 section 5.1).
fn no_store() -> HeaderMap {
    HeaderMap::from_iter([(CACHE_CONTROL, HeaderValue::from_static("no-store"))])
}

/// Refuses a grant with `invalid_grant`, naming the reason, and audits the refusal
/// under `actor` and `subject`.
async fn refuse_grant(state: &AppState, actor: &str, subject: &str, reason: &'static str, detail: String) -> ApiError {
    let entry =
        audit::entry(state.now(), actor, "token.grant_refused", subject, json!({ "reason": reason, "detail": detail }));
    if let Err(e) = state.store.write(move |tx| Box::pin(async move { tx.append_audit(&entry).await })).await {
        tracing::error!(error = %e, "could not audit a refused grant");
    }
    ApiError::oauth(StatusCode::BAD_REQUEST, "invalid_grant", reason, detail)
}

/// The device a refused ticket claims to be for, to file the refusal under; the claim
/// is unverified, so it is only ever a label.
fn claimed_subject(ticket: &str) -> String {
    const SUBJECT_CHARS_MAX: usize = 64;
    vouch_proto::jws::UnverifiedJws::parse(ticket)
        .ok()
        .and_then(|jws| serde_json::from_slice::<serde_json::Value>(jws.payload_unverified()).ok())
        .and_then(|claims| claims["sub"].as_str().map(str::to_owned))
        .filter(|sub| sub.len() <= SUBJECT_CHARS_MAX && sub.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .map_or_else(|| "unknown".to_owned(), |sub| format!("claimed:{sub}"))
}

async fn open_session(state: &AppState, proof: VerifiedProof, ticket: &str) -> ApiResult<TokenResponse> {
    let claims = match check_ticket(state, ticket).await? {
        Ok(claims) => claims,
        Err(why) => {
            let (reason, detail) = match why {
                "expired" => ("ticket-expired", "the attestation ticket has expired; attest again"),
                "unknown-device" => ("unknown-device", "the ticket names a device that is not enrolled"),
                "device-not-active" => ("device-not-active", "the ticket's device is suspended or revoked"),
                "key-mismatch" => ("ticket-key-mismatch", "the ticket names a key the device no longer holds"),
                _ => ("invalid-ticket", "the assertion is not an attestation ticket signed by this server"),
            };
            let subject = claimed_subject(ticket);
            return Err(refuse_grant(state, "unauthenticated", &subject, reason, detail.to_owned()).await);
        }
    };
    if claims.ear_status == EarStatus::Contraindicated {
        let detail = "the ticket is a denial (contraindicated); no token is issued on it".to_owned();
        return Err(refuse_grant(state, &format!("device:{}", claims.sub), &claims.sub, "ticket-denied", detail).await);
    }
    if !constant_time_eq(claims.cnf.jkt.as_bytes(), proof.jkt.as_bytes()) {
        let detail = "the DPoP proof is made by another key than the one the ticket is bound to".to_owned();
        let reason = "ticket-bound-to-another-key";
        return Err(refuse_grant(state, &format!("proof-key:{}", proof.jkt), &claims.sub, reason, detail).await);
    }
    let now = state.now();
    let session = TokenSession {
        id: new_id("ses"),
        parent_id: None,
        device_id: claims.sub.clone(),
        key_thumbprint: proof.jkt.clone(),
        ticket_id: claims.jti.clone(),
        created_at: now,
        expires_at: now.saturating_add(state.config.access_token_ttl_secs).min(claims.exp),
        ended_at: None,
    };
    let access = access_token_claims(state, &claims, &session);
    let entry = audit::entry(
        now,
        &format!("device:{}", claims.sub),
        "token.session_opened",
        &session.id,
        json!({ "ticket_id": claims.jti, "jkt": proof.jkt, "ear_status": claims.ear_status.as_str(), "exp": session.expires_at }),
    );
    let (replay_key, proof_expires_at) = (proof.replay_key(), proof_expiry(state, &proof));
    let record = session.clone();
    let first_use = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if !tx.record_dpop_proof(&replay_key, proof_expires_at).await? {
                    return Ok(false);
                }
                tx.insert_token_session(&record).await?;
                tx.append_audit(&entry).await?;
                Ok(true)
            })
        })
        .await?;
    if !first_use {
        return Err(replayed(Endpoint::Token));
    }
    issue(state, &access, None)
}

async fn open_subsession(state: &AppState, head: RequestHead<'_>, subject_token: &str) -> ApiResult<TokenResponse> {
    let invalid_grant =
        |reason, detail: &str| ApiError::oauth(StatusCode::BAD_REQUEST, "invalid_grant", reason, detail.to_owned());
    let subject = match verify_access_token(subject_token, |kid| state.keys.verifying_key(kid), &*state.clock) {
        Ok(subject) => subject,
        Err(ProtoError::Expired { .. }) => {
            return Err(invalid_grant("subject-token-expired", "the subject token has expired"));
        }
        Err(_) => {
            return Err(invalid_grant(
                "invalid-subject-token",
                "the subject token is not an access token of this server",
            ));
        }
    };
    if subject.subsession_id.is_some() {
        return Err(invalid_grant(
            "not-a-session-token",
            "sub-sessions derive from the session's token, not another sub-session's",
        ));
    }
    let proof = check_proof(state, head, Endpoint::Token, None, None)?;
    if !constant_time_eq(subject.cnf.jkt.as_bytes(), proof.jkt.as_bytes()) {
        return Err(invalid_grant(
            "subject-token-bound-to-another-key",
            "the DPoP proof is made by another key than the one the subject token is bound to",
        ));
    }
    match state.store.token_session_state(&subject.sid, None).await? {
        TokenSessionState::Live => {}
        TokenSessionState::Ended => {
            return Err(invalid_grant("session-ended", "the subject token's session has ended"));
        }
        TokenSessionState::DeviceInactive => {
            return Err(invalid_grant("device-not-active", "the subject token's device is suspended or revoked"));
        }
        TokenSessionState::Unknown => {
            return Err(invalid_grant("invalid-subject-token", "the subject token's session is unknown"));
        }
    }
    let now = state.now();
    let session = TokenSession {
        id: new_id("sub"),
        parent_id: Some(subject.sid.clone()),
        device_id: subject.sub.clone(),
        key_thumbprint: proof.jkt.clone(),
        ticket_id: subject.ticket_id.clone(),
        created_at: now,
        expires_at: now.saturating_add(state.config.access_token_ttl_secs).min(subject.exp),
        ended_at: None,
    };
    let access = AccessTokenClaims {
        jti: new_id("at"),
        iat: now,
        exp: session.expires_at,
        subsession_id: Some(session.id.clone()),
        ..subject.clone()
    };
    let entry = audit::entry(
        now,
        &format!("device:{}", subject.sub),
        "token.subsession_opened",
        &session.id,
        json!({ "sid": subject.sid, "exp": session.expires_at }),
    );
    let (replay_key, proof_expires_at) = (proof.replay_key(), proof_expiry(state, &proof));
    let record = session.clone();
    let outcome = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if !tx.record_dpop_proof(&replay_key, proof_expires_at).await? {
                    return Ok(Err(replayed(Endpoint::Token)));
                }
                // Checked again inside the write, so a sub-session cannot open under a
                // session that ended after the read above.
                let Some(parent) = record.parent_id.as_deref() else {
                    return Ok(Err(ApiError::internal("a sub-session without a parent")));
                };
                if !tx.token_session_open(parent).await? {
                    return Ok(Err(ApiError::oauth(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "session-ended",
                        "the subject token's session has ended",
                    )));
                }
                tx.insert_token_session(&record).await?;
                tx.append_audit(&entry).await?;
                Ok(Ok(()))
            })
        })
        .await?;
    outcome?;
    issue(state, &access, Some(TOKEN_TYPE_ACCESS_TOKEN))
}

fn access_token_claims(state: &AppState, ticket: &TicketClaims, session: &TokenSession) -> AccessTokenClaims {
    AccessTokenClaims {
        iss: state.config.issuer.clone(),
        sub: ticket.sub.clone(),
        aud: state.config.issuer.clone(),
        client_id: ticket.sub.clone(),
        iat: session.created_at,
        exp: session.expires_at,
        jti: new_id("at"),
        cnf: KeyConfirmation { jkt: session.key_thumbprint.clone() },
        sid: session.id.clone(),
        subsession_id: None,
        ticket_id: ticket.jti.clone(),
        ear_status: ticket.ear_status,
        risk: ticket.risk,
        operations: ticket.conditions.operations.clone(),
        max_amount_minor: ticket.conditions.max_amount_minor,
    }
}

fn issue(state: &AppState, claims: &AccessTokenClaims, issued_token_type: Option<&str>) -> ApiResult<TokenResponse> {
    let payload = serde_json::to_vec(claims).map_err(ApiError::internal)?;
    let access_token = state.keys.sign_jws(Header::es256(ACCESS_TOKEN_TYP), &payload).map_err(ApiError::internal)?;
    Ok(TokenResponse {
        access_token,
        token_type: TOKEN_TYPE_DPOP.to_owned(),
        expires_in: claims.exp.saturating_sub(state.now()).max(0),
        sid: claims.sid.clone(),
        subsession_id: claims.subsession_id.clone(),
        issued_token_type: issued_token_type.map(str::to_owned),
    })
}

/// RFC 7009 revocation request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RevocationRequest {
    pub token: String,
    /// Only `access_token` is meaningful here; other hints are ignored.
    pub token_type_hint: Option<String>,
}

/// Revokes an access token (RFC 7009): a session token ends its session and every
/// sub-session, a sub-session token its sub-session. The DPoP proof, made by the key
/// the token is bound to, is the client's authentication. A token that is not valid
/// anyway is answered 200, as RFC 7009 section 2.2 says.
#[utoipa::path(post, path = "/v1/revoke", tag = "token",
    request_body(content = RevocationRequest, content_type = "application/x-www-form-urlencoded"),
    params(("DPoP" = String, Header, description = "DPoP proof (RFC 9449) made by the key the token is bound to")),
    responses((status = 200, description = "Revoked, or not a valid token"),
        (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn revoke(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ApiForm(form): ApiForm<RevocationRequest>,
) -> ApiResult<(HeaderMap, ())> {
    let Ok(claims) = verify_access_token(&form.token, |kid| state.keys.verifying_key(kid), &*state.clock) else {
        return Ok((no_store(), ()));
    };
    let head = RequestHead { method: &method, uri: &uri, headers: &headers };
    let proof = check_proof(&state, head, Endpoint::Token, None, Some(&claims.cnf.jkt))?;
    let ended = claims.subsession_id.clone().unwrap_or_else(|| claims.sid.clone());
    end(&state, &claims, &ended, "token.revoked", Some(&proof)).await?;
    Ok((no_store(), ()))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionEnded {
    pub sid: String,
    pub ended_at: i64,
    /// The session and sub-sessions that were still open.
    pub sessions_ended: u64,
}

/// Ends a session and all its sub-sessions; every token of them fails from now on.
/// Called with a token of the session or of one of its sub-sessions.
#[utoipa::path(post, path = "/v1/sessions/{sid}/end", tag = "token", params(("sid" = String, Path)),
    security(("dpop" = [])),
    responses((status = 200, body = SessionEnded), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn end_session(
    State(state): State<AppState>,
    caller: DpopCaller,
    ApiPath(sid): ApiPath<String>,
) -> ApiResult<Json<SessionEnded>> {
    if !constant_time_eq(caller.token.sid.as_bytes(), sid.as_bytes()) {
        return Err(ApiError::forbidden("not-your-session", "a session is ended with a token of that session"));
    }
    let (sessions_ended, ended_at) = end(&state, &caller.token, &sid, "token.session_ended", None).await?;
    Ok(Json(SessionEnded { sid, ended_at, sessions_ended }))
}

/// Ends `session_id` (and its sub-sessions) and audits it; `unrecorded_proof`, when
/// the caller's proof is not yet recorded as used, is recorded in the same write.
/// Returns how many were still open, and when they ended.
async fn end(
    state: &AppState,
    token: &AccessTokenClaims,
    session_id: &str,
    action: &'static str,
    unrecorded_proof: Option<&VerifiedProof>,
) -> ApiResult<(u64, i64)> {
    let now = state.now();
    let entry = audit::entry(
        now,
        &format!("device:{}", token.sub),
        action,
        session_id,
        json!({ "sid": token.sid, "token_id": token.jti }),
    );
    let proof = unrecorded_proof.map(|proof| (proof.replay_key(), proof_expiry(state, proof)));
    let session_id = session_id.to_owned();
    let ended = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if let Some((replay_key, expires_at)) = proof
                    && !tx.record_dpop_proof(&replay_key, expires_at).await?
                {
                    return Ok(None);
                }
                let ended = tx.end_token_session(&session_id, now).await?;
                tx.append_audit(&entry).await?;
                Ok(Some(ended))
            })
        })
        .await?;
    ended.map(|count| (count, now)).ok_or_else(|| replayed(Endpoint::Token))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// base64url (no padding) of the document's SHA-256.
    pub digest: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignResponse {
    /// Compact JWS, `typ` `vouch-signed-digest+jwt`, by a key of the JWK Set: the
    /// digest, the device, its session and its attestation status at signing time.
    pub signature: String,
}

/// Signs a document digest for a bound, attested device.
#[utoipa::path(post, path = "/v1/sign", tag = "token", request_body = SignRequest,
    params(("DPoP" = String, Header, description = "DPoP proof (RFC 9449) with ath and the latest DPoP-Nonce")),
    security(("dpop" = [])),
    responses((status = 200, body = SignResponse), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn sign_digest(
    State(state): State<AppState>,
    caller: DpopCaller,
    ApiJson(body): ApiJson<SignRequest>,
) -> ApiResult<Json<SignResponse>> {
    let digest_bytes = b64::decode("digest", &body.digest).ok().filter(|d| d.len() == 32);
    if digest_bytes.is_none() {
        return Err(ApiError::unprocessable("invalid-digest", "digest must be base64url of a 32-byte SHA-256"));
    }
    let token = &caller.token;
    let claims = SignedDigestClaims {
        iss: state.config.issuer.clone(),
        iat: state.now(),
        jti: new_id("sig"),
        sub: token.sub.clone(),
        digest: body.digest,
        digest_alg: DIGEST_ALG_SHA256.to_owned(),
        cnf: KeyConfirmation { jkt: token.cnf.jkt.clone() },
        sid: token.sid.clone(),
        subsession_id: token.subsession_id.clone(),
        ticket_id: token.ticket_id.clone(),
        ear_status: token.ear_status,
        risk: token.risk,
    };
    let payload = serde_json::to_vec(&claims).map_err(ApiError::internal)?;
    let signature = state.keys.sign_jws(Header::es256(SIGNED_DIGEST_TYP), &payload).map_err(ApiError::internal)?;
    Ok(Json(SignResponse { signature }))
}
