//! offline: what a phone and a terminal need from the server, while online, to make a
//! purchase offline. A terminal's key is certified by the server (COSE), so an offline
//! phone holding only the server's key can tell that a payment request comes from an
//! enrolled merchant and show the merchant's name. The wire types and their checks live
//! in `vouch_proto::offline`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_proto::b64;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::offline::{ID_BYTES, Id, TerminalCertificate, WireType};
use vouch_store::DeviceStatus;

use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::ApiPath;
use crate::{AppState, audit};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(issue_terminal_certificate))
}

/// The 16 bytes of the UUID behind a server id (`prefix_<32 hex digits>`).
pub fn id_bytes(id: &str) -> ApiResult<Id> {
    let hex = id.rsplit_once('_').map_or(id, |(_, hex)| hex);
    let uuid = uuid::Uuid::try_parse(hex)
        .map_err(|_| ApiError::internal(format!("id {id} does not end in a UUID of {ID_BYTES} bytes")))?;
    Ok(*uuid.as_bytes())
}

/// Signs a wire type with the server's active key. The payload is decoded again first,
/// so a value the verifier would refuse is never signed.
pub fn sign_wire<T: WireType>(state: &AppState, value: &T) -> ApiResult<Vec<u8>> {
    let payload = value.to_cbor();
    T::from_cbor(&payload).map_err(ApiError::internal)?;
    state.keys.sign_cose(&payload, T::AAD).map_err(ApiError::internal)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuedTerminalCertificate {
    /// base64url (unpadded) tagged COSE_Sign1 of a terminal certificate, signed by the
    /// server's active key (kid in the protected header).
    pub certificate: String,
    pub not_after: i64,
}

/// Certifies the identity key of an enrolled, active terminal, naming its merchant.
#[utoipa::path(post, path = "/v1/devices/{device_id}/terminal-certificate", tag = "offline",
    params(("device_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 201, body = IssuedTerminalCertificate),
        (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn issue_terminal_certificate(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(device_id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<IssuedTerminalCertificate>)> {
    caller.require(Scope::Admin)?;
    let device = state.store.device(&device_id).await?;
    if device.kind != DeviceKind::Terminal {
        return Err(ApiError::unprocessable(
            "not-a-terminal",
            format!("device {device_id} is a {}, not a terminal", device.kind.as_str()),
        ));
    }
    if device.status != DeviceStatus::Active {
        return Err(ApiError::conflict(
            "device-not-active",
            format!("device {device_id} is {}", device.status.as_str()),
        ));
    }
    let merchant = state.store.merchant(&device.merchant_id).await?;
    let merchant_name: String = merchant
        .name
        .chars()
        .scan(0, |len, c| {
            *len += c.len_utf8();
            (*len <= vouch_proto::offline::MERCHANT_NAME_BYTES_MAX).then_some(c)
        })
        .collect();
    let now = state.now();
    let certificate = TerminalCertificate {
        terminal_id: id_bytes(&device.id)?,
        merchant_id: id_bytes(&merchant.id)?,
        merchant_name,
        terminal_key: crate::attest::device_key(&device)?,
        not_after: now.saturating_add(state.config.terminal_certificate_ttl_secs),
    };
    let bytes = sign_wire(&state, &certificate)?;
    let detail = json!({ "merchant_id": merchant.id, "not_after": certificate.not_after });
    let entry = audit::entry(now, &caller.actor(), "terminal.certified", &device.id, detail);
    state.store.write(move |tx| Box::pin(async move { tx.append_audit(&entry).await })).await?;
    Ok((
        StatusCode::CREATED,
        Json(IssuedTerminalCertificate { certificate: b64::encode(&bytes), not_after: certificate.not_after }),
    ))
}
