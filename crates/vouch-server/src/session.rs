//! session: a POS app asks for a channel with a card reader (seed 000). The server
//! validates both — the reader's signed hello against its enrolment, reference values
//! and tamper state; the POS app's attestation ticket against its DPoP key — and
//! answers with a signed grant naming the two static keys. The reader checks the grant
//! against its pinned server keys; then the two run Noise KK between themselves. The
//! server never sees a channel key. Grants and refusals are audited.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_proto::ProtoError;
use vouch_proto::attest::EarStatus;
use vouch_proto::crypto::constant_time_eq;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::jws::{Header, UnverifiedJws};
use vouch_proto::session::{self as wire, GRANT_TYP, GrantClaims, ReaderHelloClaims};
use vouch_store::{Device, DeviceStatus, ReaderSession, StoreError};

use crate::AppState;
use crate::attest::{check_ticket, device_key};
use crate::audit;
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::ApiJson;
use crate::registry::new_id;
use crate::token::DpopCaller;

/// The operation a POS ticket must allow.
const SESSION_OPERATION: &str = "session";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(open_reader_session))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReaderSessionRequest {
    /// Compact JWS, `typ` `vouch-reader-hello+jwt`, signed by the reader's identity key:
    /// `{reader_id, static_key, firmware_version, tamper: {switch_open}, nonce, iat}`.
    pub reader_hello: String,
    /// The POS app's attestation ticket, bound to the key of the caller's DPoP proof.
    pub pos_ticket: String,
    /// base64url of the POS app's static X25519 key for the channel.
    pub pos_static_key: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReaderSessionGrant {
    pub session_id: String,
    /// Compact JWS, `typ` `vouch-reader-grant+jwt`, by a key of the JWK Set: hand it to
    /// the reader, which checks it against its pinned server keys.
    pub grant: String,
    pub reader_id: String,
    /// base64url of the reader's static X25519 key, from its hello: the key the POS app
    /// runs the handshake against.
    pub reader_static_key: String,
    pub expires_at: i64,
}

/// Validates a card reader and the calling POS app, and grants them a channel.
#[utoipa::path(post, path = "/v1/reader-sessions", tag = "session", request_body = ReaderSessionRequest,
    params(("DPoP" = String, Header, description = "DPoP proof (RFC 9449) of the POS app")),
    security(("dpop" = [])),
    responses((status = 201, body = ReaderSessionGrant), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn open_reader_session(
    State(state): State<AppState>,
    caller: DpopCaller,
    ApiJson(body): ApiJson<ReaderSessionRequest>,
) -> ApiResult<(StatusCode, Json<ReaderSessionGrant>)> {
    match grant(&state, &caller, &body).await {
        Ok(granted) => Ok((StatusCode::CREATED, Json(granted))),
        Err(refusal) => {
            if refusal.status().is_client_error() {
                let detail = json!({ "pos_device_id": caller.device_id(), "reason": refusal.reason(), "detail": refusal.detail() });
                let entry = audit::entry(
                    state.now(),
                    &format!("device:{}", caller.device_id()),
                    "reader_session.refused",
                    caller.device_id(),
                    detail,
                );
                if let Err(e) =
                    state.store.write(move |tx| Box::pin(async move { tx.append_audit(&entry).await })).await
                {
                    tracing::error!(error = %e, "could not audit a refused reader session");
                }
            }
            Err(refusal)
        }
    }
}

async fn grant(state: &AppState, caller: &DpopCaller, body: &ReaderSessionRequest) -> ApiResult<ReaderSessionGrant> {
    let pos = state.store.device(caller.device_id()).await?;
    if pos.kind != DeviceKind::Pos {
        return Err(ApiError::forbidden("not-a-pos", "reader sessions are asked for by POS apps"));
    }
    let (reader, hello) = check_reader(state, &body.reader_hello).await?;
    check_pos_ticket(state, caller, &body.pos_ticket).await?;
    if reader.merchant_id != pos.merchant_id {
        return Err(ApiError::forbidden(
            "merchant-mismatch",
            "the reader and the POS app belong to different merchants",
        ));
    }
    wire::decode_static_key("pos_static_key", &body.pos_static_key)
        .map_err(|e| ApiError::unprocessable("invalid-static-key", e.to_string()))?;

    let now = state.now();
    let claims = GrantClaims {
        iss: state.config.issuer.clone(),
        session_id: new_id("rs"),
        reader_id: reader.id.clone(),
        reader_nonce: hello.nonce.clone(),
        reader_static_key: hello.static_key.clone(),
        pos_device_id: pos.id.clone(),
        pos_static_key: body.pos_static_key.clone(),
        iat: now,
        exp: now.saturating_add(state.config.reader_grant_ttl_secs),
    };
    let payload = serde_json::to_vec(&claims).map_err(ApiError::internal)?;
    let grant = state.keys.sign_jws(Header::es256(GRANT_TYP), &payload).map_err(ApiError::internal)?;
    let record = ReaderSession {
        id: claims.session_id.clone(),
        reader_id: reader.id.clone(),
        reader_nonce: hello.nonce.clone(),
        pos_device_id: pos.id.clone(),
        token_sid: caller.token.sid.clone(),
        created_at: now,
        expires_at: claims.exp,
    };
    let entry = audit::entry(
        now,
        &format!("device:{}", pos.id),
        "reader_session.granted",
        &claims.session_id,
        json!({ "reader_id": reader.id, "pos_device_id": pos.id, "exp": claims.exp }),
    );
    let written = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                match tx.insert_reader_session(&record).await {
                    Ok(()) => {}
                    Err(StoreError::Conflict { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                }
                tx.append_audit(&entry).await?;
                Ok(true)
            })
        })
        .await?;
    if !written {
        return Err(ApiError::conflict(
            "reader-nonce-reused",
            "this reader hello has been granted before; the reader must say hello anew",
        ));
    }
    Ok(ReaderSessionGrant {
        session_id: claims.session_id,
        grant,
        reader_id: claims.reader_id,
        reader_static_key: claims.reader_static_key,
        expires_at: claims.exp,
    })
}

/// The reader: enrolled as a reader, active, the hello signed by its key and fresh,
/// its firmware known-good for its model, its case closed.
async fn check_reader(state: &AppState, hello: &str) -> ApiResult<(Device, ReaderHelloClaims)> {
    let invalid = |e: ProtoError| ApiError::bad_request("invalid-reader-hello", e.to_string());
    let jws = UnverifiedJws::parse(hello).map_err(invalid)?;
    let reader_id = wire::peek_reader_id(&jws).map_err(invalid)?;
    let reader = match state.store.device(&reader_id).await {
        Ok(reader) => reader,
        Err(StoreError::NotFound { .. }) => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown-reader", "no reader is enrolled with this id"));
        }
        Err(e) => return Err(e.into()),
    };
    if reader.kind != DeviceKind::Reader {
        return Err(ApiError::unprocessable("not-a-reader", "the hello names a device that is not a card reader"));
    }
    if reader.status != DeviceStatus::Active {
        return Err(ApiError::forbidden("reader-not-active", format!("the reader is {}", reader.status.as_str())));
    }
    let claims =
        wire::verify_reader_hello(&jws, &device_key(&reader)?, &*state.clock, state.config.proof_iat_window_secs)
            .map_err(|e| match e {
                ProtoError::BadSignature => ApiError::bad_request(
                    "bad-reader-signature",
                    "the hello is not signed by the reader's enrolled key",
                ),
                ProtoError::StaleIssuedAt { .. } => ApiError::bad_request("stale-reader-hello", e.to_string()),
                other => invalid(other),
            })?;
    if state.store.reference_values(&reader.model, &claims.firmware_version).await?.is_none() {
        return Err(ApiError::forbidden(
            "firmware-not-allowed",
            format!("firmware {} of {} has no reference values", claims.firmware_version, reader.model),
        ));
    }
    if claims.tamper.switch_open {
        return Err(ApiError::forbidden("reader-tampered", "the reader reports its enclosure open"));
    }
    Ok((reader, claims))
}

/// The POS app's ticket: valid now, affirming, held by the key that signed this
/// request's DPoP proof, and allowing sessions.
async fn check_pos_ticket(state: &AppState, caller: &DpopCaller, ticket: &str) -> ApiResult<()> {
    let claims = match check_ticket(state, ticket).await? {
        Ok(claims) => claims,
        Err("expired") => return Err(ApiError::forbidden("pos-ticket-expired", "the POS app's ticket has expired")),
        Err(why) => {
            return Err(ApiError::forbidden("invalid-pos-ticket", format!("the POS app's ticket is not valid: {why}")));
        }
    };
    match claims.ear_status {
        EarStatus::Affirming => {}
        EarStatus::Contraindicated => {
            return Err(ApiError::forbidden("pos-ticket-denied", "the POS app's ticket is a denial"));
        }
        other => {
            return Err(ApiError::forbidden(
                "pos-ticket-not-affirming",
                format!("the POS app's ticket is {}, expected affirming", other.as_str()),
            ));
        }
    }
    if !constant_time_eq(claims.cnf.jkt.as_bytes(), caller.proof.jkt.as_bytes()) || claims.sub != caller.device_id() {
        return Err(ApiError::forbidden(
            "pos-ticket-bound-to-another-key",
            "the ticket is not bound to the key that signed this request",
        ));
    }
    if !claims.conditions.operations.iter().any(|op| op == SESSION_OPERATION) {
        return Err(ApiError::forbidden(
            "pos-ticket-operation-not-allowed",
            "the POS app's ticket does not allow sessions",
        ));
    }
    Ok(())
}
