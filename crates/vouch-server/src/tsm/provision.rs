//! Provisioning a phone's crypto secure element: its device key, its registration and
//! its payment certificate.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{CACHE_CONTROL, HeaderValue};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use vouch_proto::b64;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::hpke::HpkePublicKey;
use vouch_proto::jws::Header;
use vouch_proto::tsm::{
    DeviceKey, PAYMENT_CERTIFICATE_TYP, PROVISION_TYP, PaymentCertificateClaims, ProvisionClaims, ProvisionedSecrets,
    seal_provisioning,
};
use vouch_store::TsmRegistration;

use super::issuers::verified_secure_element;
use super::{TSM_OPERATION, refused};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::registry::{check_text, new_id};
use crate::token::DpopCaller;
use crate::{AppState, audit};

/// An instrument reference (a payment token, an account alias) is at most this long;
/// the card number itself never comes here.
const INSTRUMENT_CHARS_MAX: usize = 64;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    /// The crypto secure element's certificate chain, PEM, leaf first; the leaf's P-256
    /// key (key usage keyAgreement) is what the device key is sealed to.
    pub crypto_se_chain_pem: String,
    /// The payment instrument the payment certificate is for, by reference.
    pub instrument: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Provisioned {
    pub registration_id: String,
    pub device_id: String,
    /// The serial of the secure element's certificate, hex.
    pub se_serial: String,
    /// JWS (ES256, the server's key, `typ` `vouch-tsm-provision+jwt`) whose payload
    /// carries the HPKE-sealed device key and payment certificate.
    pub provisioning: String,
    pub registered_at: i64,
}

/// Provisions the calling phone's crypto secure element: a fresh 256-bit device key and
/// a payment certificate, sealed (HPKE) to the key of the SE's certified chain and
/// signed by the server. Provisioning again replaces the registration.
#[utoipa::path(post, path = "/v1/tsm/devices/{device_id}/provision", tag = "tsm", request_body = ProvisionRequest,
    params(("device_id" = String, Path), ("DPoP" = String, Header, description = "DPoP proof (RFC 9449) of the phone")),
    security(("dpop" = [])),
    responses((status = 201, body = Provisioned), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn provision_device(
    State(state): State<AppState>,
    caller: DpopCaller,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(body): ApiJson<ProvisionRequest>,
) -> ApiResult<impl IntoResponse> {
    require_own_phone(&state, &caller, &device_id).await?;
    check_text("instrument", &body.instrument, INSTRUMENT_CHARS_MAX)?;
    let (chain, issuer) = verified_secure_element(&state, "crypto_se_chain_pem", &body.crypto_se_chain_pem).await?;
    let se_key = HpkePublicKey::from_sec1(&chain.leaf_key).map_err(ApiError::internal)?;
    let se_serial = chain.serials.first().cloned().ok_or_else(|| ApiError::internal("a verified chain has a leaf"))?;

    let now = state.now();
    let registration_id = new_id("reg");
    let certificate = PaymentCertificateClaims {
        iss: state.config.issuer.clone(),
        sub: device_id.clone(),
        registration_id: registration_id.clone(),
        instrument: body.instrument.clone(),
        iat: now,
        exp: now.saturating_add(state.config.tsm_payment_certificate_ttl_secs),
    };
    let certificate = serde_json::to_vec(&certificate).map_err(ApiError::internal)?;
    let payment_certificate =
        state.keys.sign_jws(Header::es256(PAYMENT_CERTIFICATE_TYP), &certificate).map_err(ApiError::internal)?;
    let device_key = DeviceKey::generate(&*state.rng).map_err(ApiError::internal)?;
    let sealed_device_key = state.tsm.seal_device_key(&device_id, &registration_id, &device_key, &state.rng)?;
    let secrets = ProvisionedSecrets { device_key, payment_certificate };
    let sealed =
        seal_provisioning(&se_key, &device_id, &registration_id, &se_serial, &secrets, &*state.rng).map_err(refused)?;
    let claims = ProvisionClaims {
        iss: state.config.issuer.clone(),
        iat: now,
        device_id: device_id.clone(),
        registration_id: registration_id.clone(),
        se_serial: se_serial.clone(),
        enc: b64::encode(sealed.enc),
        ciphertext: b64::encode(&sealed.ciphertext),
    };
    let claims = serde_json::to_vec(&claims).map_err(ApiError::internal)?;
    let provisioning = state.keys.sign_jws(Header::es256(PROVISION_TYP), &claims).map_err(ApiError::internal)?;

    let record = TsmRegistration {
        device_id: device_id.clone(),
        registration_id: registration_id.clone(),
        issuer_id: issuer.id.clone(),
        se_serial: se_serial.clone(),
        se_public_key: chain.leaf_key.to_vec(),
        sealed_device_key,
        instrument: body.instrument,
        last_counter: 0,
        registered_at: now,
    };
    let replaced = state.store.tsm_registration(&device_id).await?.map(|previous| previous.registration_id);
    let detail = json!({
        "registration_id": registration_id, "issuer_id": issuer.id, "se_serial": se_serial, "replaced": replaced,
    });
    let entry = audit::entry(now, &format!("device:{device_id}"), "tsm.device_provisioned", &device_id, detail);
    state
        .store
        .write(move |tx| {
            Box::pin(async move {
                tx.upsert_tsm_registration(&record).await?;
                tx.append_audit(&entry).await
            })
        })
        .await?;
    let answer = Provisioned { registration_id, device_id, se_serial, provisioning, registered_at: now };
    Ok((StatusCode::CREATED, [(CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(answer)))
}

/// A consumer's phone provisions itself and fetches its own apps, with a ticket that
/// allows it; readers, POS apps and terminals hold no secure elements Vouch manages.
pub(super) async fn require_own_phone(state: &AppState, caller: &DpopCaller, device_id: &str) -> ApiResult<()> {
    if caller.device_id() != device_id {
        return Err(ApiError::forbidden("wrong-device", "a device may only be provisioned by itself"));
    }
    caller.require_ticket(TSM_OPERATION, state.config.tsm_risk_threshold)?;
    let device = state.store.device(device_id).await?;
    if device.kind != DeviceKind::Consumer {
        return Err(ApiError::forbidden(
            "not-a-phone",
            format!("the device is a {}; secure elements are provisioned in consumers' phones", device.kind),
        ));
    }
    Ok(())
}
