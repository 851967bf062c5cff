//! The SMS gateway's inbound webhook: a phone's message, sealed under its device key,
//! opened, checked and queued re-encrypted for the service provider it names.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use vouch_proto::b64;
use vouch_proto::crypto::sha256;
use vouch_proto::tsm::{
    MESSAGE_BYTES_MAX, MessageBody, message_counter, open_message, seal_relay, verify_payment_certificate,
};
use vouch_store::{DeviceStatus, OutboxMessage, OutboxStatus, TsmRegistration, TsmSender};

use super::refused;
use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::ApiJson;
use crate::registry::new_id;
use crate::{AppState, audit};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayMessage {
    /// The device the gateway received the message from.
    pub device_id: String,
    /// The message as the device sent it, base64url: version, counter, AES-256-GCM
    /// ciphertext under the device key.
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageAccepted {
    pub message_id: String,
    pub provider_id: String,
    pub counter: u64,
    /// `queued`: in the outbox, to be delivered to the provider. To a gateway's retry,
    /// where the message is now: `queued`, `delivered` or `dead`.
    pub status: String,
    /// Set when this exact message was accepted before (a gateway's retry); the answer
    /// names the first one's message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

impl MessageAccepted {
    fn of(stored: &OutboxMessage, duplicate: bool) -> ApiResult<Self> {
        Ok(MessageAccepted {
            message_id: stored.id.clone(),
            provider_id: stored.provider_id.clone(),
            counter: u64::try_from(stored.counter).map_err(ApiError::internal)?,
            status: match stored.status {
                OutboxStatus::Pending => "queued",
                OutboxStatus::Delivered => "delivered",
                OutboxStatus::Dead => "dead",
            }
            .to_owned(),
            duplicate,
        })
    }
}

/// Accepts a phone's encrypted message from the SMS gateway: opens it under the
/// device's key, refuses a counter not above the last one, checks the payment
/// certificate inside, and queues it sealed (HPKE) to the named service provider's key
/// for delivery. The exact same message again gets the first answer.
#[utoipa::path(post, path = "/v1/tsm/messages", tag = "tsm", request_body = GatewayMessage,
    security(("api_key" = ["gateway"])),
    responses((status = 202, body = MessageAccepted), (status = 200, body = MessageAccepted, description = "accepted before"),
        (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn accept_message(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<GatewayMessage>,
) -> ApiResult<(StatusCode, Json<MessageAccepted>)> {
    caller.require(Scope::Gateway)?;
    let envelope = decode_envelope(&body.message)?;
    let counter = message_counter(&envelope).map_err(refused)?;
    let device_id = body.device_id;
    let Some(TsmSender { registration, device_status, se_revoked }) = state.store.tsm_sender(&device_id).await? else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown-device", "no provisioned device has this id"));
    };
    if device_status != DeviceStatus::Active {
        return Err(ApiError::forbidden("device-not-active", format!("the device is {}", device_status.as_str())));
    }
    if se_revoked {
        return Err(ApiError::forbidden(
            "certificate-revoked",
            format!(
                "the certificate {} of the device's crypto SE is revoked; provision a new SE",
                registration.se_serial
            ),
        ));
    }
    let key =
        state.tsm.unseal_device_key(&device_id, &registration.registration_id, &registration.sealed_device_key)?;
    let (_, message) = open_message(&key, &device_id, &envelope).map_err(refused)?;
    let envelope_hash = sha256(&envelope);
    let stored_counter = i64::try_from(counter)
        .map_err(|_| ApiError::unprocessable("invalid-counter", "the counter is above 2^63 - 1"))?;
    if stored_counter <= registration.last_counter {
        return replayed(&state, &device_id, stored_counter, &envelope_hash).await;
    }
    check_payment_certificate(&state, &registration, &message)?;
    let Some(provider_key) = state.tsm.provider_key(&state.store, &message.provider_id).await? else {
        return Err(ApiError::unprocessable(
            "unknown-provider",
            format!("no service provider {} is registered", message.provider_id),
        ));
    };

    let now = state.now();
    let message_id = new_id("msg");
    let sealed =
        seal_relay(&provider_key, &message_id, &message.provider_id, &device_id, counter, &message, &*state.rng)
            .map_err(refused)?;
    let record = OutboxMessage {
        id: message_id,
        provider_id: message.provider_id.clone(),
        device_id: device_id.clone(),
        counter: stored_counter,
        envelope_hash: envelope_hash.to_vec(),
        enc: sealed.enc.to_vec(),
        ciphertext: sealed.ciphertext,
        status: OutboxStatus::Pending,
        attempts: 0,
        next_attempt_at: now,
        last_error: None,
        created_at: now,
        delivered_at: None,
    };
    let detail = json!({ "message_id": record.id, "provider_id": record.provider_id, "counter": counter });
    let entry = audit::entry(now, &caller.actor(), "tsm.message_accepted", &device_id, detail);
    let accepted = MessageAccepted::of(&record, false)?;
    let registration_id = registration.registration_id;
    let queued = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if !tx.advance_tsm_counter(&record.device_id, &registration_id, record.counter).await?
                    || !tx.insert_outbox_message(&record).await?
                {
                    return Ok(false);
                }
                tx.append_audit(&entry).await?;
                Ok(true)
            })
        })
        .await?;
    if !queued {
        // Another request took this counter between the check and the write.
        return replayed(&state, &device_id, stored_counter, &envelope_hash).await;
    }
    state.tsm.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

fn decode_envelope(text: &str) -> ApiResult<Vec<u8>> {
    // base64 grows by a third; anything longer cannot decode within the limit.
    if text.len() > MESSAGE_BYTES_MAX.div_ceil(3) * 4 {
        return Err(ApiError::unprocessable(
            "malformed-message",
            format!("message is over the limit of {MESSAGE_BYTES_MAX} bytes"),
        ));
    }
    b64::decode("message", text).map_err(|_| ApiError::unprocessable("malformed-message", "message is not base64url"))
}

/// A counter at or below the device's last: the same message again (a gateway's retry)
/// gets its first answer; anything else is a replay.
async fn replayed(
    state: &AppState,
    device_id: &str,
    counter: i64,
    envelope_hash: &[u8; 32],
) -> ApiResult<(StatusCode, Json<MessageAccepted>)> {
    match state.store.outbox_message_at(device_id, counter).await? {
        Some(stored) if stored.envelope_hash == envelope_hash => {
            Ok((StatusCode::OK, Json(MessageAccepted::of(&stored, true)?)))
        }
        _ => Err(ApiError::conflict(
            "replayed-counter",
            format!("counter {counter} is not above the device's last accepted counter"),
        )),
    }
}

/// The payment certificate in a message is the one this device's crypto SE was given:
/// signed by the server, for this device and its current registration, unexpired.
fn check_payment_certificate(state: &AppState, registration: &TsmRegistration, message: &MessageBody) -> ApiResult<()> {
    let invalid = |detail: String| ApiError::unprocessable("invalid-payment-certificate", detail);
    let now = state.now();
    let claims = state
        .tsm
        .payment_certificates
        .verified(&*state.keys, now, sha256(message.payment_certificate.as_bytes()), |key_for_kid| {
            verify_payment_certificate(&message.payment_certificate, key_for_kid, now)
        })
        .map_err(|e| invalid(e.to_string()))?;
    if claims.sub != registration.device_id || claims.registration_id != registration.registration_id {
        return Err(invalid("the payment certificate is not this device's current one".to_owned()));
    }
    Ok(())
}
