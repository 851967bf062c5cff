//! offline: what a phone and a terminal need from the server, while online, to make a
//! purchase offline. A terminal's key is certified by the server (COSE), so an offline
//! phone holding only the server's key can tell that a payment request comes from an
//! enrolled merchant and show the merchant's name. The wire types and their checks live
//! in `vouch_proto::offline`.
//!
//! A consumer's phone, over its DPoP-bound token, obtains an offline credential: the
//! server's signature over the phone's enrolled key, a limit and currency, a counter
//! start and an expiry. Issuing it moves the limit from the consumer's funding account to
//! their offline reserve account in the same transaction (the transfer's id is derived
//! from the credential's), with the credential's row and its audit entry, so whatever
//! the phone pays under it is already set aside.

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{CACHE_CONTROL, HeaderValue};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_proto::attest::EarStatus;
use vouch_proto::cose::UnverifiedSign1;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::offline::{
    ConsumerApproval, ID_BYTES, Id, OfflineCredential, SignedReceipt, TerminalCertificate, WireType, payment_id,
    verify_approval, verify_countersignature, verify_payment_request, verify_terminal_certificate,
};
use vouch_proto::{ProtoError, VerifyingKey, b64};
use vouch_store::{
    Account, AccountKind, DeviceStatus, OfflineCredentialRecord, OfflinePaymentRecord, TRANSFER_AMOUNT_MAX_MINOR,
    Transfer, TransferOutcome, TransferRefusal,
};

use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::keys::KeyStore;
use crate::registry::{check_currency, new_id};
use crate::token::DpopCaller;
use crate::{AppState, audit};

/// The operation a phone's ticket must allow.
const OFFLINE_OPERATION: &str = "offline";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(issue_terminal_certificate))
        .routes(routes!(issue_credential))
        .routes(routes!(settle_payments))
}

/// ISO 4217 numeric code of the alphabetic codes accounts are opened in; an offline
/// credential carries the numeric one.
const CURRENCIES: &[(&str, u16)] = &[
    ("AUD", 36),
    ("CAD", 124),
    ("CHF", 756),
    ("CZK", 203),
    ("DKK", 208),
    ("EUR", 978),
    ("GBP", 826),
    ("JPY", 392),
    ("NOK", 578),
    ("PLN", 985),
    ("SEK", 752),
    ("USD", 840),
];

pub fn currency_numeric(alpha: &str) -> Option<u16> {
    CURRENCIES.iter().find(|(code, _)| *code == alpha).map(|(_, numeric)| *numeric)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialRequest {
    /// ISO 4217 alphabetic code, e.g. `EUR`.
    pub currency: String,
    /// What the phone may pay offline under the credential, in minor units.
    pub limit_minor: i64,
    /// The consumer's funding account to set the limit aside from; by default their
    /// oldest funding account in the currency.
    pub funding_account_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuedCredential {
    /// base64url (unpadded) tagged COSE_Sign1 of the offline credential, signed by the
    /// server's active key (kid in the protected header).
    pub credential: String,
    pub credential_id: String,
    pub limit_minor: i64,
    pub currency: String,
    /// The first counter value the phone may use under this credential.
    pub counter_start: i64,
    pub not_after: i64,
}

/// Issues an offline credential to the calling consumer phone, moving its limit from
/// the consumer's funding account to their offline reserve.
#[utoipa::path(post, path = "/v1/offline/credentials", tag = "offline", request_body = CredentialRequest,
    params(("DPoP" = String, Header, description = "DPoP proof (RFC 9449) of the phone")),
    security(("dpop" = [])),
    responses((status = 201, body = IssuedCredential), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn issue_credential(
    State(state): State<AppState>,
    caller: DpopCaller,
    ApiJson(body): ApiJson<CredentialRequest>,
) -> ApiResult<impl IntoResponse> {
    let issued = issue_checked(&state, &caller, body).await?;
    Ok((StatusCode::CREATED, [(CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(issued)))
}

async fn issue_checked(state: &AppState, caller: &DpopCaller, body: CredentialRequest) -> ApiResult<IssuedCredential> {
    check_currency(&body.currency)?;
    let Some(currency_code) = currency_numeric(&body.currency) else {
        return Err(ApiError::unprocessable("unsupported-currency", format!("{} is not supported", body.currency)));
    };
    let config = &state.config;
    let phone = caller.device_id();
    let Some(consumer_id) = state.store.consumer_of_device(phone).await? else {
        return Err(ApiError::forbidden("not-a-consumer-phone", "the calling device belongs to no consumer"));
    };
    let token = &caller.token;
    if token.ear_status != EarStatus::Affirming {
        return Err(ApiError::forbidden(
            "ticket-not-affirming",
            format!("the phone's attestation is {}, expected affirming", token.ear_status.as_str()),
        ));
    }
    if !token.operations.iter().any(|op| op == OFFLINE_OPERATION) {
        return Err(ApiError::forbidden("operation-not-allowed", "the phone's ticket does not allow offline"));
    }
    if token.risk >= config.offline_risk_threshold {
        return Err(ApiError::forbidden(
            "risk-too-high",
            format!("the phone's risk {} is at or above the threshold {}", token.risk, config.offline_risk_threshold),
        ));
    }
    let limit_max = token.max_amount_minor.min(config.offline_limit_max_minor).min(TRANSFER_AMOUNT_MAX_MINOR);
    if !(1..=limit_max).contains(&body.limit_minor) {
        return Err(ApiError::unprocessable("invalid-limit", format!("limit_minor must be 1 to {limit_max}")));
    }
    let device = state.store.device(phone).await?;
    let phone_key = crate::attest::device_key(&device)?;
    let now = state.now();
    let credential_id = new_id("ocr");
    let not_after = now.saturating_add(config.offline_credential_ttl_secs);
    let reserve_account = Account::consumer(
        &new_id("acc"),
        AccountKind::ConsumerOfflineReserve,
        &consumer_id,
        AccountKind::ConsumerOfflineReserve.as_str(),
        &body.currency,
        now,
    );
    let record = OfflineCredentialRecord {
        id: credential_id.clone(),
        device_id: phone.to_owned(),
        consumer_id: consumer_id.clone(),
        reserve_account_id: String::new(),
        public_key: phone_key.sec1().to_vec(),
        limit_minor: body.limit_minor,
        currency: body.currency.clone(),
        counter_start: 0,
        issued_at: now,
        not_after,
        revoked_at: None,
    };
    let (actor, ticket_id, risk) = (format!("device:{phone}"), token.ticket_id.clone(), token.risk);
    let funding_account_id = body.funding_account_id;
    let keys = state.keys.clone();
    let written = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                let funding = match funding_account_id {
                    Some(id) => match tx.account(&id).await {
                        Ok(account) => Some(account),
                        Err(vouch_store::StoreError::NotFound { .. }) => None,
                        Err(e) => return Err(e),
                    },
                    None => tx.consumer_account(&consumer_id, AccountKind::ConsumerFunding, &record.currency).await?,
                };
                let Some(funding) = funding.filter(|a| {
                    a.kind == AccountKind::ConsumerFunding
                        && a.consumer_id.as_deref() == Some(consumer_id.as_str())
                        && a.currency == record.currency
                }) else {
                    return Ok(Err(Refusal::NoFundingAccount));
                };
                // Checked before anything is written, so a refusal leaves no trace;
                // the transfer checks again under the account's lock.
                if funding.balance_minor() < record.limit_minor {
                    return Ok(Err(Refusal::InsufficientFunds));
                }
                let counter_start = tx.next_counter_start(&record.device_id).await?;
                // Signed before anything is written: a credential is recorded only
                // together with the signature the phone receives.
                let signed = match sign_credential(&*keys, &record, counter_start, &phone_key, currency_code) {
                    Ok(signed) => signed,
                    Err(e) => return Ok(Err(Refusal::Signing(e))),
                };
                let reserve = match tx
                    .consumer_account(&consumer_id, AccountKind::ConsumerOfflineReserve, &record.currency)
                    .await?
                {
                    Some(reserve) => reserve,
                    None => {
                        tx.insert_account(&reserve_account).await?;
                        reserve_account
                    }
                };
                let record =
                    OfflineCredentialRecord { reserve_account_id: reserve.id.clone(), counter_start, ..record };
                let transfer = Transfer {
                    id: reserve_transfer_id(&record.id),
                    debit_account_id: funding.id.clone(),
                    credit_account_id: reserve.id.clone(),
                    amount_minor: record.limit_minor,
                    currency: record.currency.clone(),
                    reference: format!("offline-credential:{}", record.id),
                    created_at: now,
                };
                match tx.post_transfer(&transfer).await? {
                    TransferOutcome::Posted => {}
                    // Another request spent the funds between the check and the lock:
                    // failing the work undoes the reserve account opened above.
                    TransferOutcome::Refused(TransferRefusal::InsufficientFunds) => {
                        return Err(vouch_store::StoreError::Conflict { what: "funding" });
                    }
                    other => {
                        return Err(vouch_store::StoreError::Corrupt {
                            what: "offline reserve transfer",
                            detail: format!("{other:?}"),
                        });
                    }
                }
                tx.insert_offline_credential(&record).await?;
                let detail = json!({
                    "consumer_id": record.consumer_id, "funding_account_id": funding.id,
                    "reserve_account_id": reserve.id, "transfer_id": transfer.id,
                    "limit_minor": record.limit_minor, "currency": record.currency,
                    "counter_start": record.counter_start, "not_after": record.not_after,
                    "ticket_id": ticket_id, "risk": risk,
                });
                tx.append_audit(&audit::entry(now, &actor, "offline.credential_issued", &record.id, detail)).await?;
                Ok(Ok((record, signed)))
            })
        })
        .await;
    let (record, bytes) = match written {
        Ok(Ok(written)) => written,
        Ok(Err(Refusal::Signing(e))) => return Err(ApiError::internal(e)),
        Ok(Err(Refusal::NoFundingAccount)) => {
            return Err(ApiError::unprocessable(
                "no-funding-account",
                format!("the consumer has no funding account in {} to set the limit aside from", body.currency),
            ));
        }
        Ok(Err(Refusal::InsufficientFunds)) | Err(vouch_store::StoreError::Conflict { what: "funding" }) => {
            return Err(ApiError::conflict("insufficient-funds", "the funding account cannot cover the limit"));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(IssuedCredential {
        credential: b64::encode(&bytes),
        credential_id: record.id,
        limit_minor: record.limit_minor,
        currency: record.currency,
        counter_start: record.counter_start,
        not_after: record.not_after,
    })
}

enum Refusal {
    NoFundingAccount,
    InsufficientFunds,
    Signing(String),
}

/// The COSE credential for `record`, starting to count at `counter_start`.
fn sign_credential(
    keys: &dyn KeyStore,
    record: &OfflineCredentialRecord,
    counter_start: i64,
    phone_key: &VerifyingKey,
    currency: u16,
) -> Result<Vec<u8>, String> {
    let credential = OfflineCredential {
        credential_id: id_bytes(&record.id).map_err(|_| format!("credential id {} is not a UUID", record.id))?,
        phone_key: *phone_key,
        limit_minor: u64::try_from(record.limit_minor).map_err(|e| e.to_string())?,
        currency,
        counter_start: u64::try_from(counter_start).map_err(|e| e.to_string())?,
        not_after: record.not_after,
        issued_at: record.issued_at,
    };
    let payload = credential.to_cbor();
    OfflineCredential::from_cbor(&payload).map_err(|e| e.to_string())?;
    keys.sign_cose(&payload, OfflineCredential::AAD).map_err(|e| e.to_string())
}

/// The id of the transfer that sets a credential's limit aside: one per credential.
pub fn reserve_transfer_id(credential_id: &str) -> String {
    format!("offline-reserve:{credential_id}")
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

/// Most payments in one settlement request.
pub const SETTLEMENT_BATCH_MAX: usize = 1_000;

/// The body limit of a settlement request: a full batch of payments, each well under
/// 2 KiB in base64url, fits with room to spare; a batch over 1,000 is refused by count.
pub const SETTLEMENT_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettlementRequest {
    /// 1 to 1,000 payments, settled in order.
    pub payments: Vec<OfflinePayment>,
}

/// One offline payment as the terminal holds it: each field a base64url (unpadded)
/// tagged COSE_Sign1.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OfflinePayment {
    pub terminal_certificate: String,
    /// Leg (a), signed by the terminal.
    pub request: String,
    /// Leg (b), signed by the phone.
    pub approval: String,
    /// Leg (c), signed by the terminal.
    pub countersignature: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SettlementResults {
    /// One per payment, in the order sent.
    pub results: Vec<SettlementResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SettlementStatus {
    Settled,
    AlreadySettled,
    Refused,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SettlementResult {
    /// SHA-256 of the approval's bytes, hex; absent when the approval is not base64url.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    pub status: SettlementStatus,
    /// Why a payment was refused: the failed check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// base64url (unpadded) tagged COSE_Sign1 of the receipt, signed by the server's
    /// active key; the same bytes for every re-submission.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
    /// The ledger transfer: the payment id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
}

impl SettlementResult {
    fn refused(payment_id: Option<&str>, reason: &str, detail: impl Into<String>) -> Self {
        SettlementResult {
            payment_id: payment_id.map(str::to_owned),
            status: SettlementStatus::Refused,
            reason: Some(reason.to_owned()),
            detail: Some(detail.into()),
            receipt: None,
            transfer_id: None,
        }
    }

    fn with_receipt(status: SettlementStatus, payment: &OfflinePaymentRecord) -> Self {
        SettlementResult {
            payment_id: Some(payment.payment_id.clone()),
            status,
            reason: None,
            detail: None,
            receipt: Some(b64::encode(&payment.receipt)),
            transfer_id: Some(payment.payment_id.clone()),
        }
    }
}

/// Settles offline payments a terminal collected: each is verified leg by leg, then, in
/// one transaction, checked for a reused nonce and a reused (credential, counter) — a
/// double spend, which revokes the credential — and moved from the consumer's offline
/// reserve to the merchant's settlement account by a transfer whose id is the payment
/// id, with the signed receipt stored beside it. A refused payment does not fail the
/// others.
#[utoipa::path(post, path = "/v1/offline-payments", tag = "offline", request_body = SettlementRequest,
    security(("api_key" = ["terminal"])),
    responses((status = 200, body = SettlementResults),
        (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn settle_payments(
    State(state): State<AppState>,
    caller: ApiCaller,
    SettlementJson(body): SettlementJson,
) -> ApiResult<Json<SettlementResults>> {
    caller.require(Scope::Terminal)?;
    let count = body.payments.len();
    if !(1..=SETTLEMENT_BATCH_MAX).contains(&count) {
        return Err(ApiError::unprocessable(
            "invalid-batch",
            format!("payments must hold 1 to {SETTLEMENT_BATCH_MAX}, got {count}"),
        ));
    }
    let mut decoded = Vec::with_capacity(count);
    for (i, p) in body.payments.iter().enumerate() {
        let field = |name: &'static str, text: &str| {
            b64::decode(name, text).map_err(|e| ApiError::bad_request("invalid-base64", format!("payment {i}: {e}")))
        };
        decoded.push(Legs {
            certificate: field("terminal_certificate", &p.terminal_certificate)?,
            request: field("request", &p.request)?,
            approval: field("approval", &p.approval)?,
            countersignature: field("countersignature", &p.countersignature)?,
        });
    }
    let actor = caller.actor();
    let mut results = Vec::with_capacity(count);
    for legs in decoded {
        results.push(settle_one(&state, &actor, legs).await?);
    }
    Ok(Json(SettlementResults { results }))
}

/// The settlement body, read under [`SETTLEMENT_BODY_BYTES_MAX`]: a full batch is far
/// over the default body limit.
struct SettlementJson(SettlementRequest);

impl<S: Send + Sync> axum::extract::FromRequest<S> for SettlementJson {
    type Rejection = ApiError;

    async fn from_request(mut req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        DefaultBodyLimit::max(SETTLEMENT_BODY_BYTES_MAX).apply(&mut req);
        let ApiJson(body) = ApiJson::<SettlementRequest>::from_request(req, state).await?;
        Ok(SettlementJson(body))
    }
}

struct Legs {
    certificate: Vec<u8>,
    request: Vec<u8>,
    approval: Vec<u8>,
    countersignature: Vec<u8>,
}

/// Why a leg failed, as a refusal reason.
fn check_reason(e: &ProtoError) -> (String, String) {
    let reason = match e {
        ProtoError::OfflineRefused { check, .. } => check.as_str(),
        ProtoError::UnknownSigningKey { .. } => "unknown-server-key",
        ProtoError::BadSignature => "bad-signature",
        _ => "malformed",
    };
    (reason.to_owned(), e.to_string())
}

fn server_id(prefix: &str, bytes: &Id) -> String {
    format!("{prefix}_{}", uuid::Uuid::from_bytes(*bytes).simple())
}

fn currency_alpha(numeric: u16) -> Option<&'static str> {
    CURRENCIES.iter().find(|(_, code)| *code == numeric).map(|(alpha, _)| *alpha)
}

/// The credential as the phone holds it, rebuilt from its row.
fn credential_of(record: &OfflineCredentialRecord) -> ApiResult<OfflineCredential> {
    let corrupt = |what: &str| ApiError::internal(format!("offline credential {}: {what}", record.id));
    Ok(OfflineCredential {
        credential_id: id_bytes(&record.id)?,
        phone_key: VerifyingKey::from_sec1(&record.public_key).map_err(|_| corrupt("public key"))?,
        limit_minor: u64::try_from(record.limit_minor).map_err(|_| corrupt("limit"))?,
        currency: currency_numeric(&record.currency).ok_or_else(|| corrupt("currency"))?,
        counter_start: u64::try_from(record.counter_start).map_err(|_| corrupt("counter start"))?,
        not_after: record.not_after,
        issued_at: record.issued_at,
    })
}

enum Settled {
    New(OfflinePaymentRecord),
    Already(OfflinePaymentRecord),
    Refused(&'static str, String),
}

async fn settle_one(state: &AppState, actor: &str, legs: Legs) -> ApiResult<SettlementResult> {
    let digest = payment_id(&legs.approval);
    let payment_id = to_hex(digest);
    let pid = Some(payment_id.as_str());
    let refuse = |e: ProtoError| {
        let (reason, detail) = check_reason(&e);
        SettlementResult::refused(pid, &reason, detail)
    };
    let keys = state.keys.clone();
    let server_key = |kid: Option<&[u8]>| {
        let kid = kid.and_then(|k| std::str::from_utf8(k).ok()).unwrap_or_default();
        keys.verifying_key(kid).ok_or_else(|| ProtoError::UnknownSigningKey { kid: kid.to_owned() })
    };
    let now = state.now();
    let certificate = match verify_terminal_certificate(&legs.certificate, server_key, now) {
        Ok(c) => c,
        Err(e) => return Ok(refuse(e)),
    };
    let cert = certificate.value();
    let request = match verify_payment_request(&legs.request, cert) {
        Ok(r) => r,
        Err(e) => return Ok(refuse(e)),
    };
    // Which credential the approval names, to verify it against; read before its
    // signature is checked, with the credential's key.
    let approval_id = match UnverifiedSign1::parse(&legs.approval)
        .and_then(|sign1| ConsumerApproval::from_cbor(sign1.payload_unverified()))
    {
        Ok(approval) => approval.credential_id,
        Err(e) => return Ok(refuse(e)),
    };
    let credential_id = server_id("ocr", &approval_id);
    let record = match state.store.offline_credential(&credential_id).await {
        Ok(record) => record,
        Err(vouch_store::StoreError::NotFound { .. }) => {
            return Ok(SettlementResult::refused(pid, "unknown-credential", format!("no credential {credential_id}")));
        }
        Err(e) => return Err(e.into()),
    };
    // A payment settled before is answered with its receipt, even once the credential
    // has since been revoked or spent.
    if let Some(stored) = state.store.offline_payment(&payment_id).await? {
        return Ok(SettlementResult::with_receipt(SettlementStatus::AlreadySettled, &stored));
    }
    if record.revoked_at.is_some() {
        return Ok(SettlementResult::refused(
            pid,
            "credential-revoked",
            format!("credential {credential_id} is revoked"),
        ));
    }
    let credential = credential_of(&record)?;
    let settled = state.store.offline_credential_settled(&credential_id).await?;
    let remaining = u64::try_from(record.limit_minor.saturating_sub(settled)).unwrap_or(0);
    let approval = match verify_approval(&legs.approval, &request, &credential, remaining) {
        Ok(a) => a,
        Err(e) => return Ok(refuse(e)),
    };
    if let Err(e) = verify_countersignature(&legs.countersignature, &request, &approval, cert) {
        return Ok(refuse(e));
    }
    let r = request.value();
    let Some(currency) = currency_alpha(r.currency) else {
        return Ok(SettlementResult::refused(pid, "currency-mismatch", format!("currency {:03}", r.currency)));
    };
    let amount_minor = i64::try_from(r.amount_minor)
        .map_err(|_| ApiError::internal("an amount within a credential's limit fits i64"))?;
    let payment = OfflinePaymentRecord {
        payment_id: payment_id.clone(),
        credential_id: credential_id.clone(),
        counter: i64::try_from(approval.value().counter)
            .map_err(|_| ApiError::internal("a counter within a credential's range fits i64"))?,
        nonce: to_hex(r.nonce),
        amount_minor,
        currency: currency.to_owned(),
        merchant_id: server_id("mch", &cert.merchant_id),
        terminal_id: server_id("dev", &cert.terminal_id),
        receipt: Vec::new(),
        settled_at: now,
    };
    let receipt = SignedReceipt {
        payment_id: digest,
        transfer_id: digest,
        amount_minor: r.amount_minor,
        currency: r.currency,
        settled_at: now,
    };
    let receipt = sign_wire(state, &receipt)?;
    let (actor, reserve_account_id) = (actor.to_owned(), record.reserve_account_id.clone());
    let written = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if let Some(stored) = tx.offline_payment(&payment.payment_id).await? {
                    return Ok(Settled::Already(stored));
                }
                if let Some(first) = tx.offline_payment_by_counter(&payment.credential_id, payment.counter).await? {
                    let revoked = tx.revoke_offline_credential(&payment.credential_id, now).await?;
                    let detail = json!({
                        "fraud": true, "payment_id": payment.payment_id, "first_payment_id": first.payment_id,
                        "counter": payment.counter, "merchant_id": payment.merchant_id,
                        "terminal_id": payment.terminal_id, "revoked": revoked,
                    });
                    let entry = audit::entry(now, &actor, "offline.double_spend", &payment.credential_id, detail);
                    tx.append_audit(&entry).await?;
                    return Ok(Settled::Refused(
                        "double-spend",
                        format!(
                            "counter {} of the credential was spent by payment {}",
                            payment.counter, first.payment_id
                        ),
                    ));
                }
                if tx.offline_payment_by_nonce(&payment.nonce).await?.is_some() {
                    return Ok(Settled::Refused("nonce-reused", "the request's nonce was settled before".to_owned()));
                }
                if !tx.spend_offline_credential(&payment.credential_id, payment.amount_minor).await? {
                    return Ok(Settled::Refused(
                        "over-limit",
                        "the credential is revoked or its remaining limit is below the amount".to_owned(),
                    ));
                }
                let merchant = tx.merchant_settlement_account(&payment.merchant_id, &payment.currency, now).await?;
                let transfer = Transfer {
                    id: payment.payment_id.clone(),
                    debit_account_id: reserve_account_id,
                    credit_account_id: merchant.id.clone(),
                    amount_minor: payment.amount_minor,
                    currency: payment.currency.clone(),
                    reference: format!("offline-payment:{}", payment.payment_id),
                    created_at: now,
                };
                match tx.post_transfer(&transfer).await? {
                    TransferOutcome::Posted => {}
                    // Nothing else moves a reserve than its credentials' payments, each
                    // within its limit: a refusal here fails the work and undoes it.
                    other => {
                        return Err(vouch_store::StoreError::Corrupt {
                            what: "offline payment transfer",
                            detail: format!("{other:?}"),
                        });
                    }
                }
                let payment = OfflinePaymentRecord { receipt, ..payment };
                tx.insert_offline_payment(&payment).await?;
                let detail = json!({
                    "credential_id": payment.credential_id, "counter": payment.counter,
                    "amount_minor": payment.amount_minor, "currency": payment.currency,
                    "merchant_id": payment.merchant_id, "terminal_id": payment.terminal_id,
                    "account_id": merchant.id,
                });
                tx.append_audit(&audit::entry(now, &actor, "offline.settled", &payment.payment_id, detail)).await?;
                Ok(Settled::New(payment))
            })
        })
        .await;
    match written {
        Ok(Settled::New(payment)) => Ok(SettlementResult::with_receipt(SettlementStatus::Settled, &payment)),
        Ok(Settled::Already(payment)) => Ok(SettlementResult::with_receipt(SettlementStatus::AlreadySettled, &payment)),
        Ok(Settled::Refused(reason, detail)) => Ok(SettlementResult::refused(pid, reason, detail)),
        // Another instance settled the same payment, nonce or counter concurrently:
        // what it wrote decides.
        Err(vouch_store::StoreError::Conflict { .. }) => match state.store.offline_payment(&payment_id).await? {
            Some(stored) => Ok(SettlementResult::with_receipt(SettlementStatus::AlreadySettled, &stored)),
            None => Ok(SettlementResult::refused(pid, "conflict", "settled concurrently by another payment")),
        },
        Err(e) => Err(e.into()),
    }
}

fn to_hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
