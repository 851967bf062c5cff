//! A phone's sync: the receipts of what settled under its credentials and, when the
//! phone names the credential it pays under, that credential closed and the rest of its
//! limit issued again as a new credential, in one write.
//!
//! Closing lowers the old credential's limit to what the phone says it spent (never
//! below what has settled) and ends its counters at the phone's next unused one, so
//! payments the phone made before the sync still settle and nothing made after it under
//! the old credential does. The rest is already in the consumer's offline reserve, so
//! the new credential moves no money.
//!
//! A credential closes once, but the answer can be lost on the way to the phone, which
//! then holds no credential for the rest. So a sync that names a closed credential with
//! the arguments that closed it is answered again as the first time was, from what the
//! close recorded, while the new credential is unused: neither closed nor revoked, and
//! nothing settled under it (which would show the phone has it).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{CACHE_CONTROL, HeaderValue};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use vouch_proto::b64;
use vouch_store::{COUNTER_RANGE, CloseRefusal, OfflineCredentialRecord, OfflinePaymentRecord, StoreError};

use super::IssuedCredential;
use super::credential::{require_offline_ticket, sign_credential};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::ApiJson;
use crate::registry::new_id;
use crate::token::DpopCaller;
use crate::{AppState, audit};

/// Most receipts in one answer.
pub const SYNC_RECEIPTS_MAX: usize = 500;

/// How far behind the clock the cursor stays. A receipt's `settled_at` is stamped before
/// its write commits, so a receipt stamped T can appear after others stamped T or later
/// have been read. The cursor passes only receipts older than this, so a phone reads the
/// most recent ones again (and drops them by payment id) instead of missing one that
/// committed late.
pub const RECEIPTS_CURSOR_LAG_SECS: i64 = 60;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// The credential the phone pays under now, to close and refresh.
    pub credential_id: Option<String>,
    /// Required with `credential_id`: the phone's next unused counter under it; every
    /// counter below may have been spent.
    pub counter_next: Option<i64>,
    /// Required with `credential_id`: what the phone approved under it in total, in
    /// minor units.
    pub spent_minor: Option<i64>,
    /// The `next_cursor` of an earlier answer: only the receipts after it.
    pub receipts_after: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SyncAnswer {
    /// Payments settled under any credential of the phone, oldest first, at most 500.
    pub receipts: Vec<OfflineReceipt>,
    /// Where the next sync picks up (`receipts_after`). It stays a minute behind the
    /// newest receipts, which the next sync returns again; null while the phone sent no
    /// cursor and has no receipt older than that.
    pub next_cursor: Option<String>,
    /// Further receipts follow the last one here.
    pub more: bool,
    /// The new credential for the rest of the closed one's limit, as
    /// `POST /v1/offline/credentials` answers; null when nothing was closed or nothing
    /// is left.
    pub credential: Option<IssuedCredential>,
    /// The credential this sync closed, or the sync it repeats closed; null when none
    /// was named.
    pub closed: Option<ClosedCredentialView>,
}

/// A settled offline payment and its receipt.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OfflineReceipt {
    /// SHA-256 of the approval's bytes, hex.
    pub payment_id: String,
    /// The ledger transfer: the payment id.
    pub transfer_id: String,
    /// base64url (unpadded) tagged COSE_Sign1 of the receipt, signed by the server's
    /// key: the same bytes the terminal got.
    pub receipt: String,
    pub credential_id: String,
    pub counter: i64,
    pub amount_minor: i64,
    pub currency: String,
    pub merchant_id: String,
    pub settled_at: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClosedCredentialView {
    pub credential_id: String,
    /// The lowered limit: what payments under it may settle in total.
    pub limit_minor: i64,
    /// No payment under a counter at or above this settles.
    pub counter_end: i64,
    /// What had settled under it when it closed.
    pub settled_minor: i64,
}

/// Gives the calling phone the receipts of its settled offline payments and, with
/// `credential_id`, closes that credential and issues the rest of its limit as a new one.
/// Repeated with the same `credential_id`, `counter_next` and `spent_minor` while the new
/// credential is unused, it answers with the same closed credential and new credential.
#[utoipa::path(post, path = "/v1/offline/sync", tag = "offline", request_body = SyncRequest,
    params(("DPoP" = String, Header, description = "DPoP proof (RFC 9449) of the phone")),
    security(("dpop" = [])),
    responses((status = 200, body = SyncAnswer), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn sync(
    State(state): State<AppState>,
    caller: DpopCaller,
    ApiJson(body): ApiJson<SyncRequest>,
) -> ApiResult<impl IntoResponse> {
    let after = body.receipts_after.as_deref().map(parse_cursor).transpose()?;
    let (credential, closed) = match closing(&body)? {
        Some(closing) => refresh(&state, &caller, closing).await?,
        None => (None, None),
    };
    let after = after.as_ref().map(|(settled_at, payment_id)| (*settled_at, payment_id.as_str()));
    let page_max = u32::try_from(SYNC_RECEIPTS_MAX + 1).map_err(ApiError::internal)?;
    let mut payments = state.store.offline_payments_of_device(caller.device_id(), after, page_max).await?;
    let more = payments.len() > SYNC_RECEIPTS_MAX;
    payments.truncate(SYNC_RECEIPTS_MAX);
    let settled_before = state.now().saturating_sub(RECEIPTS_CURSOR_LAG_SECS);
    let next_cursor = match payments.iter().take_while(|p| p.settled_at < settled_before).last() {
        Some(last_settled) => Some(cursor_of(last_settled)),
        // A full page of recent receipts: the phone moves on rather than read it again.
        None if more => payments.last().map(cursor_of),
        None => body.receipts_after,
    };
    let answer = SyncAnswer {
        receipts: payments.into_iter().map(OfflineReceipt::from).collect(),
        next_cursor,
        more,
        credential,
        closed,
    };
    // The answer may hold a credential: no cache may keep it.
    Ok((StatusCode::OK, [(CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(answer)))
}

impl From<OfflinePaymentRecord> for OfflineReceipt {
    fn from(payment: OfflinePaymentRecord) -> Self {
        OfflineReceipt {
            transfer_id: payment.payment_id.clone(),
            payment_id: payment.payment_id,
            receipt: b64::encode(&payment.receipt),
            credential_id: payment.credential_id,
            counter: payment.counter,
            amount_minor: payment.amount_minor,
            currency: payment.currency,
            merchant_id: payment.merchant_id,
            settled_at: payment.settled_at,
        }
    }
}

/// A cursor is the position of a receipt: `<settled_at>.<payment_id>`.
fn cursor_of(payment: &OfflinePaymentRecord) -> String {
    format!("{}.{}", payment.settled_at, payment.payment_id)
}

fn parse_cursor(cursor: &str) -> ApiResult<(i64, String)> {
    let invalid =
        || ApiError::unprocessable("invalid-cursor", "receipts_after must be a next_cursor of an earlier sync");
    let (settled_at, payment_id) = cursor.split_once('.').ok_or_else(invalid)?;
    let settled_at = settled_at.parse().map_err(|_| invalid())?;
    let hex = payment_id.len() == 64 && payment_id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !hex {
        return Err(invalid());
    }
    Ok((settled_at, payment_id.to_owned()))
}

/// What the phone says of the credential it stops paying under.
struct Closing {
    credential_id: String,
    counter_next: i64,
    spent_minor: i64,
}

fn invalid_counter(detail: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid-counter", detail)
}

fn invalid_spent(detail: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid-spent", detail)
}

/// The closing the request asks for, if any: `counter_next` and `spent_minor` come
/// with `credential_id` and only with it.
fn closing(body: &SyncRequest) -> ApiResult<Option<Closing>> {
    let Some(credential_id) = &body.credential_id else {
        if body.counter_next.is_some() {
            return Err(invalid_counter("counter_next goes with credential_id"));
        }
        if body.spent_minor.is_some() {
            return Err(invalid_spent("spent_minor goes with credential_id"));
        }
        return Ok(None);
    };
    let counter_next = body
        .counter_next
        .filter(|counter| *counter >= 0)
        .ok_or_else(|| invalid_counter("counter_next, 0 or more, is required with credential_id"))?;
    let spent_minor = body
        .spent_minor
        .filter(|spent| *spent >= 0)
        .ok_or_else(|| invalid_spent("spent_minor, 0 or more, is required with credential_id"))?;
    Ok(Some(Closing { credential_id: credential_id.clone(), counter_next, spent_minor }))
}

fn close_refused(refusal: CloseRefusal, credential_id: &str) -> ApiError {
    match refusal {
        CloseRefusal::Unknown => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown-credential",
            format!("the phone holds no credential {credential_id}"),
        ),
        CloseRefusal::Revoked => {
            ApiError::conflict("credential-revoked", format!("credential {credential_id} is revoked"))
        }
        CloseRefusal::Closed => ApiError::conflict(
            "credential-closed",
            format!(
                "credential {credential_id} was closed at an earlier sync, answered again only to the same \
                 counter_next and spent_minor while the credential it issued is unused"
            ),
        ),
        CloseRefusal::CounterSpent { highest } => {
            invalid_counter(format!("a payment under counter {highest} has settled, so counter_next must be above it"))
        }
    }
}

type Refreshed = (Option<IssuedCredential>, Option<ClosedCredentialView>);

/// Closes the named credential and issues the rest of its limit as a new one, after the
/// same ticket checks as issuing.
async fn refresh(state: &AppState, caller: &DpopCaller, closing: Closing) -> ApiResult<Refreshed> {
    require_offline_ticket(state, caller)?;
    let phone = caller.device_id();
    // Refused from the row as read now, before anything is written; the close checks
    // its state again in the write.
    let open = match state.store.offline_credential(&closing.credential_id).await {
        Ok(record) if record.device_id == phone => record,
        Ok(_) | Err(StoreError::NotFound { .. }) => {
            return Err(close_refused(CloseRefusal::Unknown, &closing.credential_id));
        }
        Err(e) => return Err(e.into()),
    };
    if open.revoked_at.is_some() || open.closed_at.is_some() {
        return closed_before(state, &open, &closing).await;
    }
    let Closing { credential_id, counter_next, spent_minor } = closing;
    let counter_max = open.counter_start.saturating_add(COUNTER_RANGE);
    if !(open.counter_start..=counter_max).contains(&counter_next) {
        return Err(invalid_counter(format!("counter_next must be {} to {counter_max}", open.counter_start)));
    }
    if spent_minor > open.limit_minor {
        return Err(invalid_spent(format!("spent_minor must be 0 to the credential's limit {}", open.limit_minor)));
    }
    let now = state.now();
    let (fresh_id, not_after) = (new_id("ocr"), now.saturating_add(state.config.offline_credential_ttl_secs));
    let (actor, ticket_id, risk) = (format!("device:{phone}"), caller.token.ticket_id.clone(), caller.token.risk);
    let (keys, device_id) = (state.keys.clone(), phone.to_owned());
    let written = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                let closed = match tx
                    .close_offline_credential(&credential_id, &device_id, counter_next, spent_minor, now)
                    .await?
                {
                    Ok(closed) => closed,
                    Err(refusal) => return Ok(Err((refusal, credential_id))),
                };
                let old = &closed.record;
                let fresh = if closed.released_minor > 0 {
                    let record = OfflineCredentialRecord {
                        id: fresh_id,
                        limit_minor: closed.released_minor,
                        counter_start: tx.next_counter_start(&device_id).await?,
                        issued_at: now,
                        not_after,
                        revoked_at: None,
                        settled_minor: 0,
                        counter_end: None,
                        closed_at: None,
                        closed_spent_minor: None,
                        closed_settled_minor: None,
                        refreshed_from: Some(old.id.clone()),
                        ..old.clone()
                    };
                    // Signed before its row is written; failing the work undoes the
                    // close as well, so the phone can sync again.
                    let signed = sign_credential(&*keys, &record).map_err(|e| StoreError::CommitFailed {
                        detail: format!("the refreshed credential was not signed: {e}"),
                    })?;
                    tx.insert_offline_credential(&record).await?;
                    Some((record, signed))
                } else {
                    None
                };
                let detail = json!({
                    "refreshed_as": fresh.as_ref().map(|(record, _)| &record.id),
                    "limit_minor": old.limit_minor, "released_minor": closed.released_minor,
                    "settled_minor": old.settled_minor, "spent_minor": spent_minor, "counter_end": old.counter_end,
                    "reserve_account_id": old.reserve_account_id,
                    "counter_start": fresh.as_ref().map(|(record, _)| record.counter_start),
                    "not_after": fresh.as_ref().map(|(record, _)| record.not_after),
                    "ticket_id": ticket_id, "risk": risk,
                });
                tx.append_audit(&audit::entry(now, &actor, "offline.credential_refreshed", &old.id, detail)).await?;
                Ok(Ok((closed.record, fresh)))
            })
        })
        .await?;
    let (closed, fresh) = match written {
        Ok(written) => written,
        // Another sync closed it since it was read above: perhaps this phone's own,
        // whose answer it has not had yet.
        Err((CloseRefusal::Closed, credential_id)) => {
            let closed = state.store.offline_credential(&credential_id).await?;
            return closed_before(state, &closed, &Closing { credential_id, counter_next, spent_minor }).await;
        }
        Err((refusal, credential_id)) => return Err(close_refused(refusal, &credential_id)),
    };
    let fresh = fresh.map(|(record, signed)| IssuedCredential::new(&record, &signed));
    Ok((fresh, Some(closed_view(&closed)?)))
}

/// The answer for a credential of the phone that is no longer open: refused if it is
/// revoked, or closed by a sync with other arguments, or if the credential that sync
/// issued for the rest has been used, closed or revoked since; otherwise the answer
/// that sync gave, again. Nothing is written, so nothing is audited: the close and the
/// credential it issued were audited when they were written, and a repeated answer
/// changes neither.
async fn closed_before(state: &AppState, record: &OfflineCredentialRecord, closing: &Closing) -> ApiResult<Refreshed> {
    if record.revoked_at.is_some() {
        return Err(close_refused(CloseRefusal::Revoked, &record.id));
    }
    let refused = || close_refused(CloseRefusal::Closed, &record.id);
    if (record.counter_end, record.closed_spent_minor) != (Some(closing.counter_next), Some(closing.spent_minor)) {
        return Err(refused());
    }
    let fresh = match state.store.offline_credential_refreshed_from(&record.id).await? {
        Some(fresh) if fresh.revoked_at.is_some() || fresh.closed_at.is_some() || fresh.settled_minor > 0 => {
            return Err(refused());
        }
        // The same credential: its id, limit, counters and expiry are the row's; only
        // the signature is new.
        Some(fresh) => Some(IssuedCredential::new(&fresh, &sign_credential(&*state.keys, &fresh)?)),
        None => None,
    };
    Ok((fresh, Some(closed_view(record)?)))
}

/// What the phone is told of a credential a sync closed, from what the close recorded.
fn closed_view(record: &OfflineCredentialRecord) -> ApiResult<ClosedCredentialView> {
    let (Some(counter_end), Some(settled_minor)) = (record.counter_end, record.closed_settled_minor) else {
        return Err(ApiError::internal(format!("offline credential {} is not closed", record.id)));
    };
    Ok(ClosedCredentialView {
        credential_id: record.id.clone(),
        limit_minor: record.limit_minor,
        counter_end,
        settled_minor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vouch_proto::hex;

    #[test]
    fn a_cursor_reads_back_as_the_position_it_names() {
        let payment_id = hex::encode([0xab; 32]);
        let cursor = format!("1700000000.{payment_id}");
        assert_eq!(parse_cursor(&cursor).unwrap(), (1_700_000_000, payment_id.clone()));
        for bad in ["", "1700000000", "x.{payment_id}", &format!("1.{}", &payment_id[1..]), &cursor.to_uppercase()] {
            let bad = bad.replace("{payment_id}", &payment_id);
            assert_eq!(parse_cursor(&bad).unwrap_err().reason(), "invalid-cursor", "{bad}");
        }
    }
}
