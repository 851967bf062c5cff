//! The registry: merchants, their settlement accounts (balances and transfers are in
//! `ledger`), service providers, and devices with their enrolment (proof of
//! possession over a single-use nonce) and lifecycle (active, suspended, revoked).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_proto::enrol::{
    Confirmation, DEVICE_CREDENTIAL_TYP, DeviceCredentialClaims, DeviceKind, verify_enrolment_proof,
};
use vouch_proto::jws::Header;
use vouch_proto::{Jwk, ProtoError, b64, crypto::random_bytes};
use vouch_store::{Account, Device, DeviceFilter, DeviceStatus, Merchant, NonceRejection, ServiceProvider};

use crate::AppState;
use crate::audit;
use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery};

pub(crate) const NAME_CHARS_MAX: usize = 128;
const REASON_CHARS_MAX: usize = 512;
const ENDPOINT_CHARS_MAX: usize = 2048;
const PAGE_LIMIT_MAX: u32 = 500;
const PAGE_LIMIT_DEFAULT: u32 = 100;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_merchant, list_merchants))
        .routes(routes!(get_merchant))
        .routes(routes!(create_account))
        .routes(routes!(get_account))
        .routes(routes!(create_service_provider, list_service_providers))
        .routes(routes!(get_service_provider))
        .routes(routes!(create_enrolment_nonce))
        .routes(routes!(enrol_device, list_devices))
        .routes(routes!(get_device))
        .routes(routes!(suspend_device))
        .routes(routes!(reactivate_device))
        .routes(routes!(revoke_device))
}

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

pub fn check_text(field: &str, value: &str, max_chars: usize) -> ApiResult<()> {
    if value.trim().is_empty() || value.chars().count() > max_chars || value.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "invalid-field",
            format!("{field} must be 1 to {max_chars} printable characters"),
        ));
    }
    Ok(())
}

/// An ISO 4217 alphabetic code: three upper-case letters.
pub fn check_currency(value: &str) -> ApiResult<()> {
    if value.len() != 3 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ApiError::unprocessable("invalid-field", "currency must be an ISO 4217 code such as EUR"));
    }
    Ok(())
}

pub const CARD_ACCEPTOR_ID_CHARS: usize = 15;
pub const ISO_TERMINAL_ID_CHARS: usize = 8;

/// An ISO 8583 `ans` identifier of a fixed length: printable ASCII, not all spaces.
pub fn check_iso_id(field: &str, value: &str, chars: usize) -> ApiResult<()> {
    if value.len() != chars || !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) || value.trim().is_empty() {
        return Err(ApiError::unprocessable(
            "invalid-field",
            format!("{field} must be exactly {chars} printable ASCII characters"),
        ));
    }
    Ok(())
}

pub fn check_merchant_category(value: &str) -> ApiResult<()> {
    if value.len() != 4 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::unprocessable("invalid-field", "merchant_category must be a 4-digit ISO 18245 code"));
    }
    Ok(())
}

pub(crate) fn page_limit(limit: Option<u32>) -> ApiResult<u32> {
    match limit {
        None => Ok(PAGE_LIMIT_DEFAULT),
        Some(n @ 1..=PAGE_LIMIT_MAX) => Ok(n),
        Some(n) => Err(ApiError::bad_request("invalid-query", format!("limit {n} is outside 1..={PAGE_LIMIT_MAX}"))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Return items whose id sorts after this one.
    pub after: Option<String>,
    /// Page size, 1 to 500 (default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMerchant {
    pub name: String,
    /// ISO 8583 card acceptor id (DE 42): exactly 15 printable ASCII characters,
    /// unique. Required before the merchant's terminals can authorize.
    pub card_acceptor_id: Option<String>,
    /// ISO 18245 merchant category code, 4 digits.
    pub merchant_category: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MerchantView {
    pub merchant_id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card_acceptor_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_category: Option<String>,
    pub created_at: i64,
}

impl From<Merchant> for MerchantView {
    fn from(m: Merchant) -> Self {
        MerchantView {
            merchant_id: m.id,
            name: m.name,
            card_acceptor_id: m.card_acceptor_id,
            merchant_category: m.merchant_category,
            created_at: m.created_at,
        }
    }
}

/// Registers a merchant.
#[utoipa::path(post, path = "/v1/merchants", tag = "registry", request_body = NewMerchant,
    security(("api_key" = ["admin"])),
    responses((status = 201, body = MerchantView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn create_merchant(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<NewMerchant>,
) -> ApiResult<(StatusCode, Json<MerchantView>)> {
    caller.require(Scope::Admin)?;
    check_text("name", &body.name, NAME_CHARS_MAX)?;
    if let Some(id) = &body.card_acceptor_id {
        check_iso_id("card_acceptor_id", id, CARD_ACCEPTOR_ID_CHARS)?;
    }
    if let Some(category) = &body.merchant_category {
        check_merchant_category(category)?;
    }
    let now = state.now();
    let merchant = Merchant {
        id: new_id("mch"),
        name: body.name,
        card_acceptor_id: body.card_acceptor_id,
        merchant_category: body.merchant_category,
        created_at: now,
    };
    let detail = json!({
        "name": merchant.name, "card_acceptor_id": merchant.card_acceptor_id,
        "merchant_category": merchant.merchant_category,
    });
    let entry = audit::entry(now, &caller.actor(), "merchant.created", &merchant.id, detail);
    let record = merchant.clone();
    state
        .store
        .write(move |tx| {
            Box::pin(async move {
                tx.insert_merchant(&record).await?;
                tx.append_audit(&entry).await
            })
        })
        .await
        .map_err(|e| match e {
            vouch_store::StoreError::Conflict { .. } => {
                ApiError::conflict("card-acceptor-id-taken", "another merchant has this card_acceptor_id")
            }
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(merchant.into())))
}

/// Lists merchants, by id.
#[utoipa::path(get, path = "/v1/merchants", tag = "registry", params(PageQuery),
    security(("api_key" = ["admin"])),
    responses((status = 200, body = [MerchantView]), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn list_merchants(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<Json<Vec<MerchantView>>> {
    caller.require(Scope::Admin)?;
    let merchants = state.store.merchants(query.after.as_deref(), page_limit(query.limit)?).await?;
    Ok(Json(merchants.into_iter().map(MerchantView::from).collect()))
}

/// One merchant.
#[utoipa::path(get, path = "/v1/merchants/{merchant_id}", tag = "registry",
    params(("merchant_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 200, body = MerchantView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn get_merchant(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(merchant_id): ApiPath<String>,
) -> ApiResult<Json<MerchantView>> {
    caller.require(Scope::Admin)?;
    Ok(Json(state.store.merchant(&merchant_id).await?.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    pub label: String,
    /// ISO 4217 alphabetic code, e.g. `EUR`.
    pub currency: String,
}

/// A ledger account. The owner is `merchant_id` or `consumer_id`, as the kind says;
/// an issuer account has neither.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    pub account_id: String,
    /// `merchant_settlement`, `consumer_funding`, `consumer_offline_reserve` or `issuer`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<String>,
    pub label: String,
    pub currency: String,
    pub debits_minor: i64,
    pub credits_minor: i64,
    /// Credits minus debits; below zero only for an issuer account.
    pub balance_minor: i64,
    pub created_at: i64,
}

impl From<Account> for AccountView {
    fn from(a: Account) -> Self {
        AccountView {
            balance_minor: a.balance_minor(),
            account_id: a.id,
            kind: a.kind.as_str().to_owned(),
            merchant_id: a.merchant_id,
            consumer_id: a.consumer_id,
            label: a.label,
            currency: a.currency,
            debits_minor: a.debits_minor,
            credits_minor: a.credits_minor,
            created_at: a.created_at,
        }
    }
}

/// Opens an account for a merchant.
#[utoipa::path(post, path = "/v1/merchants/{merchant_id}/accounts", tag = "registry", request_body = NewAccount,
    params(("merchant_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 201, body = AccountView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn create_account(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(merchant_id): ApiPath<String>,
    ApiJson(body): ApiJson<NewAccount>,
) -> ApiResult<(StatusCode, Json<AccountView>)> {
    caller.require(Scope::Admin)?;
    check_text("label", &body.label, NAME_CHARS_MAX)?;
    check_currency(&body.currency)?;
    state.store.merchant(&merchant_id).await?;
    let now = state.now();
    let account = Account::merchant_settlement(&new_id("acc"), &merchant_id, &body.label, &body.currency, now);
    let detail = json!({ "merchant_id": account.merchant_id, "currency": account.currency });
    Ok((StatusCode::CREATED, Json(open_account(&state, &caller, account, detail).await?.into())))
}

/// Records a new account with its audit entry, in one write.
pub(crate) async fn open_account(
    state: &AppState,
    caller: &ApiCaller,
    account: Account,
    detail: serde_json::Value,
) -> ApiResult<Account> {
    let entry = audit::entry(account.created_at, &caller.actor(), "account.created", &account.id, detail);
    let record = account.clone();
    state
        .store
        .write(move |tx| {
            Box::pin(async move {
                tx.insert_account(&record).await?;
                tx.append_audit(&entry).await
            })
        })
        .await?;
    Ok(account)
}

/// One account.
#[utoipa::path(get, path = "/v1/accounts/{account_id}", tag = "registry",
    params(("account_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 200, body = AccountView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn get_account(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(account_id): ApiPath<String>,
) -> ApiResult<Json<AccountView>> {
    caller.require(Scope::Admin)?;
    Ok(Json(state.store.account(&account_id).await?.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewServiceProvider {
    pub name: String,
    /// Where messages for this provider are delivered (`https://`).
    pub endpoint: String,
    /// The provider's P-256 public key as a JWK.
    #[schema(value_type = Object)]
    pub public_jwk: Jwk,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceProviderView {
    pub service_provider_id: String,
    pub name: String,
    pub endpoint: String,
    #[schema(value_type = Object)]
    pub public_jwk: serde_json::Value,
    pub created_at: i64,
}

impl From<ServiceProvider> for ServiceProviderView {
    fn from(p: ServiceProvider) -> Self {
        ServiceProviderView {
            service_provider_id: p.id,
            name: p.name,
            endpoint: p.endpoint,
            public_jwk: serde_json::from_str(&p.public_jwk).unwrap_or(serde_json::Value::Null),
            created_at: p.created_at,
        }
    }
}

/// Registers a service provider (a bank or processor that receives relayed messages).
#[utoipa::path(post, path = "/v1/service-providers", tag = "registry", request_body = NewServiceProvider,
    security(("api_key" = ["admin"])),
    responses((status = 201, body = ServiceProviderView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn create_service_provider(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<NewServiceProvider>,
) -> ApiResult<(StatusCode, Json<ServiceProviderView>)> {
    caller.require(Scope::Admin)?;
    check_text("name", &body.name, NAME_CHARS_MAX)?;
    check_text("endpoint", &body.endpoint, ENDPOINT_CHARS_MAX)?;
    if !(body.endpoint.starts_with("https://") || body.endpoint.starts_with("http://")) {
        return Err(ApiError::unprocessable("invalid-field", "endpoint must be an http:// or https:// URL"));
    }
    let now = state.now();
    let public_jwk = serde_json::to_string(&body.public_jwk).map_err(ApiError::internal)?;
    let provider =
        ServiceProvider { id: new_id("sp"), name: body.name, endpoint: body.endpoint, public_jwk, created_at: now };
    let detail = json!({ "name": provider.name, "endpoint": provider.endpoint });
    let entry = audit::entry(now, &caller.actor(), "service_provider.created", &provider.id, detail);
    let record = provider.clone();
    state
        .store
        .write(move |tx| {
            Box::pin(async move {
                tx.insert_service_provider(&record).await?;
                tx.append_audit(&entry).await
            })
        })
        .await?;
    Ok((StatusCode::CREATED, Json(provider.into())))
}

/// Lists service providers, by name.
#[utoipa::path(get, path = "/v1/service-providers", tag = "registry", security(("api_key" = ["admin"])),
    responses((status = 200, body = [ServiceProviderView]), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn list_service_providers(
    State(state): State<AppState>,
    caller: ApiCaller,
) -> ApiResult<Json<Vec<ServiceProviderView>>> {
    caller.require(Scope::Admin)?;
    Ok(Json(state.store.service_providers().await?.into_iter().map(ServiceProviderView::from).collect()))
}

/// One service provider.
#[utoipa::path(get, path = "/v1/service-providers/{service_provider_id}", tag = "registry",
    params(("service_provider_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 200, body = ServiceProviderView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn get_service_provider(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ServiceProviderView>> {
    caller.require(Scope::Admin)?;
    Ok(Json(state.store.service_provider(&id).await?.into()))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrolmentNonce {
    /// Single use; goes into the enrolment proof's `nonce` claim.
    pub nonce: String,
    pub expires_at: i64,
}

/// Hands out a single-use nonce for one device enrolment.
#[utoipa::path(post, path = "/v1/enrolment-nonces", tag = "registry", security(("api_key" = ["provision"])),
    responses((status = 201, body = EnrolmentNonce), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn create_enrolment_nonce(
    State(state): State<AppState>,
    caller: ApiCaller,
) -> ApiResult<(StatusCode, Json<EnrolmentNonce>)> {
    caller.require(Scope::Provision)?;
    let nonce = b64::encode(random_bytes::<32>(&*state.rng).map_err(ApiError::internal)?);
    let expires_at = state.now() + state.config.enrolment_nonce_ttl_secs;
    let record = nonce.clone();
    state.store.write(move |tx| Box::pin(async move { tx.insert_enrolment_nonce(&record, expires_at).await })).await?;
    Ok((StatusCode::CREATED, Json(EnrolmentNonce { nonce, expires_at })))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentRequest {
    /// Compact JWS, `typ` `vouch-enrolment+jwt`, signed by the key being enrolled
    /// (carried in its `jwk` header) over `{nonce, kind, model, firmware_version,
    /// merchant_id, iat}`.
    pub proof: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrolledDevice {
    pub device_id: String,
    /// `reader`, `pos`, `terminal` or `consumer`.
    #[schema(value_type = String)]
    pub kind: DeviceKind,
    pub merchant_id: String,
    #[schema(value_type = Object)]
    pub jwk: Jwk,
    /// Server-signed JWT binding the device id, kind, merchant and key (`cnf.jwk`);
    /// verify it with `/.well-known/jwks.json`.
    pub device_credential: String,
}

/// Enrols a device that proves possession of its identity key.
#[utoipa::path(post, path = "/v1/devices", tag = "registry", request_body = EnrolmentRequest,
    security(("api_key" = ["provision"])),
    responses((status = 201, body = EnrolledDevice), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn enrol_device(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<EnrolmentRequest>,
) -> ApiResult<(StatusCode, Json<EnrolledDevice>)> {
    caller.require(Scope::Provision)?;
    let now = state.now();
    let outcome = match verify_enrolment_proof(&body.proof, &*state.clock, state.config.proof_iat_window_secs) {
        Ok(verified) => {
            let nonce = verified.claims.nonce.clone();
            enrol_verified(&state, &caller, verified, now).await.map_err(|refusal| (refusal, Some(nonce)))
        }
        Err(e) => Err((enrolment_proof_error(e), None)),
    };
    match outcome {
        Ok(enrolled) => Ok((StatusCode::CREATED, Json(enrolled))),
        Err((refusal, nonce)) => {
            if refusal.status().is_client_error() {
                record_refused_enrolment(&state, &caller, nonce.as_deref(), &refusal, now).await;
            }
            Err(refusal)
        }
    }
}

/// Audits a refused enrolment and burns its nonce in the same transaction: a proof
/// gets one attempt, whatever its outcome, so a refused proof cannot be retried
/// later when circumstances change.
async fn record_refused_enrolment(
    state: &AppState,
    caller: &ApiCaller,
    nonce: Option<&str>,
    refusal: &ApiError,
    now: i64,
) {
    let detail = serde_json::json!({ "reason": refusal.reason(), "detail": refusal.detail() });
    let entry = audit::entry(now, &caller.actor(), "device.enrolment_refused", "-", detail);
    let nonce = nonce.map(str::to_owned);
    let recorded = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if let Some(nonce) = nonce {
                    // Used, expired or unknown are all fine: the point is that it is used now.
                    let _ = tx.consume_enrolment_nonce(&nonce, now).await?;
                }
                tx.append_audit(&entry).await
            })
        })
        .await;
    if let Err(e) = recorded {
        tracing::error!(error = %e, "could not record a refused enrolment");
    }
}

fn enrolment_proof_error(e: ProtoError) -> ApiError {
    match e {
        ProtoError::BadSignature => ApiError::bad_request("bad-signature", "enrolment proof signature does not verify"),
        ProtoError::StaleIssuedAt { .. } => ApiError::bad_request("stale-proof", e.to_string()),
        other => ApiError::bad_request("invalid-proof", other.to_string()),
    }
}

async fn enrol_verified(
    state: &AppState,
    caller: &ApiCaller,
    verified: vouch_proto::enrol::VerifiedEnrolment,
    now: i64,
) -> ApiResult<EnrolledDevice> {
    let claims = verified.claims;
    let jwk = verified.key.to_jwk();
    let device = Device {
        id: new_id("dev"),
        kind: claims.kind,
        merchant_id: claims.merchant_id,
        model: claims.model,
        firmware_version: claims.firmware_version,
        public_jwk: serde_json::to_string(&jwk).map_err(ApiError::internal)?,
        key_thumbprint: jwk.thumbprint(),
        status: DeviceStatus::Active,
        created_at: now,
        updated_at: now,
    };
    // Signed before the write so the single writer never waits on a signature; if the
    // write fails the credential is dropped unseen.
    let credential_claims = DeviceCredentialClaims {
        iss: state.config.issuer.clone(),
        sub: device.id.clone(),
        kind: device.kind,
        merchant_id: device.merchant_id.clone(),
        cnf: Confirmation { jwk: jwk.clone() },
        iat: now,
        exp: now + state.config.device_credential_ttl_secs,
        jti: new_id("crd"),
    };
    let payload = serde_json::to_vec(&credential_claims).map_err(ApiError::internal)?;
    let device_credential =
        state.keys.sign_jws(Header::es256(DEVICE_CREDENTIAL_TYP), &payload).map_err(ApiError::internal)?;
    let detail = json!({
        "kind": device.kind, "merchant_id": device.merchant_id, "model": device.model,
        "firmware_version": device.firmware_version, "key_thumbprint": device.key_thumbprint,
    });
    let entry = audit::entry(now, &caller.actor(), "device.enrolled", &device.id, detail);
    let record = device.clone();
    let nonce = claims.nonce;
    let written = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if let Err(rejection) = tx.consume_enrolment_nonce(&nonce, now).await? {
                    return Ok(Err(rejection));
                }
                tx.insert_device(&record).await?;
                tx.append_audit(&entry).await?;
                Ok(Ok(()))
            })
        })
        .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(NonceRejection::Unknown)) => {
            return Err(ApiError::bad_request("unknown-nonce", "the enrolment nonce was not issued here"));
        }
        Ok(Err(NonceRejection::Expired)) => {
            return Err(ApiError::bad_request("expired-nonce", "the enrolment nonce has expired"));
        }
        Ok(Err(NonceRejection::AlreadyUsed)) => {
            return Err(ApiError::conflict("replayed-enrolment", "the enrolment nonce has already been used"));
        }
        Err(vouch_store::StoreError::Conflict { .. }) => {
            return Err(ApiError::conflict("key-already-enrolled", "this key is already enrolled as another device"));
        }
        Err(vouch_store::StoreError::MissingReference { .. }) => {
            return Err(ApiError::unprocessable("unknown-merchant", "merchant_id names no registered merchant"));
        }
        Err(other) => return Err(other.into()),
    }
    Ok(EnrolledDevice {
        device_id: device.id,
        kind: device.kind,
        merchant_id: device.merchant_id,
        jwk,
        device_credential,
    })
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    pub device_id: String,
    #[schema(value_type = String)]
    pub kind: DeviceKind,
    pub merchant_id: String,
    pub model: String,
    pub firmware_version: String,
    /// `active`, `suspended` or `revoked`.
    pub status: String,
    #[schema(value_type = Object)]
    pub jwk: serde_json::Value,
    /// RFC 7638 thumbprint of the identity key.
    pub key_thumbprint: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<Device> for DeviceView {
    fn from(d: Device) -> Self {
        DeviceView {
            device_id: d.id,
            kind: d.kind,
            merchant_id: d.merchant_id,
            model: d.model,
            firmware_version: d.firmware_version,
            status: d.status.as_str().to_owned(),
            jwk: serde_json::from_str(&d.public_jwk).unwrap_or(serde_json::Value::Null),
            key_thumbprint: d.key_thumbprint,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeviceQuery {
    pub merchant_id: Option<String>,
    /// `reader`, `pos`, `terminal` or `consumer`.
    pub kind: Option<String>,
    /// `active`, `suspended` or `revoked`.
    pub status: Option<String>,
    pub after: Option<String>,
    pub limit: Option<u32>,
}

/// Lists devices, by id, optionally filtered.
#[utoipa::path(get, path = "/v1/devices", tag = "registry", params(DeviceQuery), security(("api_key" = ["admin"])),
    responses((status = 200, body = [DeviceView]), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn list_devices(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiQuery(query): ApiQuery<DeviceQuery>,
) -> ApiResult<Json<Vec<DeviceView>>> {
    caller.require(Scope::Admin)?;
    let kind = query
        .kind
        .map(|k| k.parse::<DeviceKind>())
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid-query", e.to_string()))?;
    let status = query
        .status
        .map(|text| {
            DeviceStatus::parse(&text).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid-query",
                    format!("status {text:?} is not one of active, suspended, revoked"),
                )
            })
        })
        .transpose()?;
    let filter = DeviceFilter {
        merchant_id: query.merchant_id,
        kind,
        status,
        after_id: query.after,
        limit: page_limit(query.limit)?,
    };
    Ok(Json(state.store.devices(&filter).await?.into_iter().map(DeviceView::from).collect()))
}

/// One device.
#[utoipa::path(get, path = "/v1/devices/{device_id}", tag = "registry",
    params(("device_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 200, body = DeviceView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn get_device(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(device_id): ApiPath<String>,
) -> ApiResult<Json<DeviceView>> {
    caller.require(Scope::Admin)?;
    Ok(Json(state.store.device(&device_id).await?.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusChange {
    /// Why; kept in the audit log.
    pub reason: String,
}

/// Suspends an active device: its credentials and tickets stop validating until it is
/// reactivated.
#[utoipa::path(post, path = "/v1/devices/{device_id}/suspend", tag = "registry", request_body = StatusChange,
    params(("device_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 200, body = DeviceView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn suspend_device(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(body): ApiJson<StatusChange>,
) -> ApiResult<Json<DeviceView>> {
    change_status(&state, &caller, &device_id, &body, Transition::Suspend).await
}

/// Returns a suspended device to service.
#[utoipa::path(post, path = "/v1/devices/{device_id}/reactivate", tag = "registry", request_body = StatusChange,
    params(("device_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 200, body = DeviceView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn reactivate_device(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(body): ApiJson<StatusChange>,
) -> ApiResult<Json<DeviceView>> {
    change_status(&state, &caller, &device_id, &body, Transition::Reactivate).await
}

/// Revokes a device for good.
#[utoipa::path(post, path = "/v1/devices/{device_id}/revoke", tag = "registry", request_body = StatusChange,
    params(("device_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 200, body = DeviceView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn revoke_device(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(body): ApiJson<StatusChange>,
) -> ApiResult<Json<DeviceView>> {
    change_status(&state, &caller, &device_id, &body, Transition::Revoke).await
}

/// The lifecycle moves an admin can make. Revocation is final: nothing leaves `revoked`.
#[derive(Debug, Clone, Copy)]
enum Transition {
    Suspend,
    Reactivate,
    Revoke,
}

impl Transition {
    fn from(self) -> &'static [DeviceStatus] {
        match self {
            Transition::Suspend => &[DeviceStatus::Active],
            Transition::Reactivate => &[DeviceStatus::Suspended],
            Transition::Revoke => &[DeviceStatus::Active, DeviceStatus::Suspended],
        }
    }

    fn to(self) -> DeviceStatus {
        match self {
            Transition::Suspend => DeviceStatus::Suspended,
            Transition::Reactivate => DeviceStatus::Active,
            Transition::Revoke => DeviceStatus::Revoked,
        }
    }

    fn audit_action(self) -> &'static str {
        match self {
            Transition::Suspend => "device.suspended",
            Transition::Reactivate => "device.reactivated",
            Transition::Revoke => "device.revoked",
        }
    }
}

async fn change_status(
    state: &AppState,
    caller: &ApiCaller,
    device_id: &str,
    change: &StatusChange,
    transition: Transition,
) -> ApiResult<Json<DeviceView>> {
    caller.require(Scope::Admin)?;
    check_text("reason", &change.reason, REASON_CHARS_MAX)?;
    let now = state.now();
    let detail = json!({ "reason": change.reason });
    let entry = audit::entry(now, &caller.actor(), transition.audit_action(), device_id, detail);
    let device_id = device_id.to_owned();
    let device = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                let device = tx.set_device_status(&device_id, transition.from(), transition.to(), now).await?;
                tx.append_audit(&entry).await?;
                Ok(device)
            })
        })
        .await?;
    Ok(Json(device.into()))
}
