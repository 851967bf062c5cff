//! ledger: consumer accounts, funding them from the issuer account of their currency,
//! and an account's transfers. Balances and the posting rules live in
//! `vouch_store::ledger`; every posting is audited in the transaction that makes it.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_store::{Account, AccountKind, TRANSFER_AMOUNT_MAX_MINOR, Transfer, TransferOutcome, TransferRefusal};

use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::registry::{AccountView, check_currency, check_text, new_id, open_account, page_limit};
use crate::{AppState, audit};

const LABEL_CHARS_MAX: usize = 128;
const TRANSFER_ID_CHARS_MAX: usize = 128;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_consumer_account))
        .routes(routes!(fund_consumer))
        .routes(routes!(list_account_transfers))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewConsumerAccount {
    /// `consumer_funding` or `consumer_offline_reserve`.
    pub kind: String,
    /// ISO 4217 alphabetic code, e.g. `EUR`.
    pub currency: String,
    /// Defaults to the kind.
    pub label: Option<String>,
}

/// Opens a funding or offline reserve account for a consumer, at zero.
#[utoipa::path(post, path = "/v1/consumers/{consumer_id}/accounts", tag = "ledger", request_body = NewConsumerAccount,
    params(("consumer_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 201, body = AccountView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn create_consumer_account(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(consumer_id): ApiPath<String>,
    ApiJson(body): ApiJson<NewConsumerAccount>,
) -> ApiResult<(StatusCode, Json<AccountView>)> {
    caller.require(Scope::Admin)?;
    let kind = match AccountKind::parse(&body.kind) {
        Some(kind @ (AccountKind::ConsumerFunding | AccountKind::ConsumerOfflineReserve)) => kind,
        _ => {
            return Err(ApiError::unprocessable(
                "invalid-field",
                "kind must be consumer_funding or consumer_offline_reserve",
            ));
        }
    };
    check_currency(&body.currency)?;
    let label = body.label.unwrap_or_else(|| kind.as_str().to_owned());
    check_text("label", &label, LABEL_CHARS_MAX)?;
    state.store.consumer(&consumer_id).await?;
    let now = state.now();
    let account = Account::consumer(&new_id("acc"), kind, &consumer_id, &label, &body.currency, now);
    let detail = json!({ "consumer_id": consumer_id, "kind": kind.as_str(), "currency": account.currency });
    Ok((StatusCode::CREATED, Json(open_account(&state, &caller, account, detail).await?.into())))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewFunding {
    /// Chosen by the caller; a retry with the same id and body is answered with the
    /// transfer made the first time.
    pub transfer_id: String,
    /// The consumer's funding account.
    pub account_id: String,
    /// In minor units of the currency; 1 to 10^12.
    pub amount_minor: i64,
    pub currency: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TransferView {
    pub transfer_id: String,
    pub debit_account_id: String,
    pub credit_account_id: String,
    pub amount_minor: i64,
    pub currency: String,
    /// What the transfer is for.
    pub reference: String,
    pub created_at: i64,
}

impl From<Transfer> for TransferView {
    fn from(t: Transfer) -> Self {
        TransferView {
            transfer_id: t.id,
            debit_account_id: t.debit_account_id,
            credit_account_id: t.credit_account_id,
            amount_minor: t.amount_minor,
            currency: t.currency,
            reference: t.reference,
            created_at: t.created_at,
        }
    }
}

/// Moves money from the issuer account of the currency into a consumer's funding
/// account. Idempotent by `transfer_id`: 201 the first time, 200 with the same body
/// on a repeat, 409 when the id was used for another transfer.
#[utoipa::path(post, path = "/v1/consumers/{consumer_id}/funding", tag = "ledger", request_body = NewFunding,
    params(("consumer_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 201, body = TransferView), (status = 200, body = TransferView),
        (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn fund_consumer(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(consumer_id): ApiPath<String>,
    ApiJson(body): ApiJson<NewFunding>,
) -> ApiResult<(StatusCode, Json<TransferView>)> {
    caller.require(Scope::Admin)?;
    check_text("transfer_id", &body.transfer_id, TRANSFER_ID_CHARS_MAX)?;
    check_currency(&body.currency)?;
    if !(1..=TRANSFER_AMOUNT_MAX_MINOR).contains(&body.amount_minor) {
        return Err(invalid_amount());
    }
    state.store.consumer(&consumer_id).await?;
    let account = state.store.account(&body.account_id).await?;
    if account.kind != AccountKind::ConsumerFunding || account.consumer_id.as_deref() != Some(consumer_id.as_str()) {
        return Err(ApiError::unprocessable("wrong-account", "account_id is not a funding account of this consumer"));
    }
    if account.currency != body.currency {
        return Err(ApiError::unprocessable(
            "currency-mismatch",
            format!("the account holds {}, not {}", account.currency, body.currency),
        ));
    }
    let now = state.now();
    let reference = format!("funding:{consumer_id}");
    let actor = caller.actor();
    let (wanted, outcome) = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                let issuer = tx.issuer_account(&body.currency, now).await?;
                let transfer = Transfer {
                    id: body.transfer_id,
                    debit_account_id: issuer.id,
                    credit_account_id: body.account_id,
                    amount_minor: body.amount_minor,
                    currency: body.currency,
                    reference,
                    created_at: now,
                };
                let outcome = tx.post_transfer(&transfer).await?;
                if outcome == TransferOutcome::Posted {
                    let detail = json!({
                        "consumer_id": consumer_id,
                        "debit_account_id": transfer.debit_account_id,
                        "credit_account_id": transfer.credit_account_id,
                        "amount_minor": transfer.amount_minor,
                        "currency": transfer.currency,
                    });
                    tx.append_audit(&audit::entry(now, &actor, "ledger.funded", &transfer.id, detail)).await?;
                }
                Ok((transfer, outcome))
            })
        })
        .await?;
    match outcome {
        TransferOutcome::Posted => Ok((StatusCode::CREATED, Json(wanted.into()))),
        TransferOutcome::AlreadyPosted(stored) if same_transfer(&stored, &wanted) => {
            Ok((StatusCode::OK, Json(stored.into())))
        }
        TransferOutcome::AlreadyPosted(_) => {
            Err(ApiError::conflict("transfer-id-used", "this transfer_id was used for another transfer"))
        }
        TransferOutcome::Refused(refusal) => Err(refused(refusal)),
    }
}

/// A retry is the same transfer whenever it was made.
fn same_transfer(stored: &Transfer, wanted: &Transfer) -> bool {
    Transfer { created_at: wanted.created_at, ..stored.clone() } == *wanted
}

fn refused(refusal: TransferRefusal) -> ApiError {
    match refusal {
        TransferRefusal::UnknownAccount => ApiError::not_found("account"),
        TransferRefusal::CurrencyMismatch => {
            ApiError::unprocessable("currency-mismatch", "the accounts hold another currency")
        }
        TransferRefusal::InsufficientFunds => {
            ApiError::unprocessable("insufficient-funds", "the debit account holds too little")
        }
        TransferRefusal::SameAccount => ApiError::unprocessable("same-account", "a transfer needs two accounts"),
        TransferRefusal::InvalidAmount => invalid_amount(),
    }
}

fn invalid_amount() -> ApiError {
    ApiError::unprocessable("invalid-amount", format!("amount_minor must be 1 to {TRANSFER_AMOUNT_MAX_MINOR}"))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TransferPageQuery {
    /// Return transfers made after this one (a transfer id from the previous page).
    pub after: Option<String>,
    /// Page size, 1 to 500 (default 100).
    pub limit: Option<u32>,
}

/// The transfers that debit or credit an account, oldest first.
#[utoipa::path(get, path = "/v1/accounts/{account_id}/transfers", tag = "ledger",
    params(("account_id" = String, Path), TransferPageQuery), security(("api_key" = ["admin"])),
    responses((status = 200, body = [TransferView]), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn list_account_transfers(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(account_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<TransferPageQuery>,
) -> ApiResult<Json<Vec<TransferView>>> {
    caller.require(Scope::Admin)?;
    let limit = page_limit(query.limit)?;
    state.store.account(&account_id).await?;
    let after = match &query.after {
        None => None,
        Some(id) => {
            let cursor = state
                .store
                .transfer(id)
                .await?
                .filter(|t| t.debit_account_id == account_id || t.credit_account_id == account_id);
            let cursor = cursor
                .ok_or_else(|| ApiError::bad_request("invalid-query", "after must be a transfer of this account"))?;
            Some(cursor.created_at)
        }
    };
    let page = state.store.account_transfers(&account_id, after.zip(query.after.as_deref()), limit).await?;
    Ok(Json(page.into_iter().map(TransferView::from).collect()))
}
