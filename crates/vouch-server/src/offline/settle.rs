//! Settling the offline payments terminals collected.

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use vouch_proto::cose::UnverifiedSign1;
use vouch_proto::offline::{
    ConsumerApproval, SignedReceipt, WireType, payment_id, verify_approval, verify_countersignature,
    verify_payment_request, verify_terminal_certificate,
};
use vouch_proto::{ProtoError, b64};
use vouch_store::{OfflinePaymentRecord, Transfer, TransferOutcome};

use super::{credential_of, currency_alpha, server_id, sign_wire, to_hex};
use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::ApiJson;
use crate::{AppState, audit};

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
pub(super) async fn settle_payments(
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
pub(super) struct SettlementJson(SettlementRequest);

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
                // Settlements under one credential take turns from here, so each finds
                // what the one before it committed.
                tx.lock_offline_credential(&payment.credential_id).await?;
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
                let spent = tx.spend_offline_credential(&payment.credential_id, payment.counter, payment.amount_minor);
                if let Err(refused) = spent.await? {
                    return Ok(Settled::Refused(refused.reason(), refused.to_string()));
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
