//! Issuing what a phone and a terminal carry offline: the phone's credential and the
//! terminal's certificate.

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
use vouch_proto::offline::TerminalCertificate;
use vouch_store::{
    Account, AccountKind, DeviceStatus, OfflineCredentialRecord, TRANSFER_AMOUNT_MAX_MINOR, Transfer, TransferOutcome,
    TransferRefusal,
};

use super::{OFFLINE_OPERATION, credential_of, currency_numeric, id_bytes, sign_wire, sign_with};
use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::keys::KeyStore;
use crate::registry::{check_currency, new_id};
use crate::token::DpopCaller;
use crate::{AppState, audit};

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
pub(super) async fn issue_credential(
    State(state): State<AppState>,
    caller: DpopCaller,
    ApiJson(body): ApiJson<CredentialRequest>,
) -> ApiResult<impl IntoResponse> {
    let issued = issue_checked(&state, &caller, body).await?;
    Ok((StatusCode::CREATED, [(CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(issued)))
}

async fn issue_checked(state: &AppState, caller: &DpopCaller, body: CredentialRequest) -> ApiResult<IssuedCredential> {
    check_currency(&body.currency)?;
    if currency_numeric(&body.currency).is_none() {
        return Err(ApiError::unprocessable("unsupported-currency", format!("{} is not supported", body.currency)));
    }
    let config = &state.config;
    let phone = caller.device_id();
    let Some(consumer_id) = state.store.consumer_of_device(phone).await? else {
        return Err(ApiError::forbidden("not-a-consumer-phone", "the calling device belongs to no consumer"));
    };
    require_offline_ticket(state, caller)?;
    let token = &caller.token;
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
        settled_minor: 0,
        counter_end: None,
        closed_at: None,
        closed_spent_minor: None,
        closed_settled_minor: None,
        refreshed_from: None,
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
                let record = OfflineCredentialRecord { counter_start, ..record };
                // Signed before anything is written: a credential is recorded only
                // together with the signature the phone receives.
                let signed = match sign_credential(&*keys, &record) {
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
                let record = OfflineCredentialRecord { reserve_account_id: reserve.id.clone(), ..record };
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
        Ok(Err(Refusal::Signing(e))) => return Err(e),
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
    Ok(IssuedCredential::new(&record, &bytes))
}

enum Refusal {
    NoFundingAccount,
    InsufficientFunds,
    Signing(ApiError),
}

impl IssuedCredential {
    /// The answer for `record`, whose signed credential is `signed`.
    pub(super) fn new(record: &OfflineCredentialRecord, signed: &[u8]) -> Self {
        IssuedCredential {
            credential: b64::encode(signed),
            credential_id: record.id.clone(),
            limit_minor: record.limit_minor,
            currency: record.currency.clone(),
            counter_start: record.counter_start,
            not_after: record.not_after,
        }
    }
}

/// The ticket checks before a credential is issued, at a sync too: the phone's
/// attestation is affirming, its ticket allows `offline`, and its risk is under the
/// configured threshold.
pub(super) fn require_offline_ticket(state: &AppState, caller: &DpopCaller) -> ApiResult<()> {
    caller.require_ticket(OFFLINE_OPERATION, state.config.offline_risk_threshold)
}

/// The COSE credential the phone receives for `record`.
pub(super) fn sign_credential(keys: &dyn KeyStore, record: &OfflineCredentialRecord) -> ApiResult<Vec<u8>> {
    sign_with(keys, &credential_of(record)?)
}

/// The id of the transfer that sets a credential's limit aside: one per credential.
pub fn reserve_transfer_id(credential_id: &str) -> String {
    format!("offline-reserve:{credential_id}")
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
pub(super) async fn issue_terminal_certificate(
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
