//! The authorization decision, the same for HTTP and ISO 8583: the value presented
//! for an account is matched in constant time against the account's recent values,
//! its use counted by a conditional update, and the answer recorded under the retry
//! key (terminal, STAN, transmission time) with its audit entry in one transaction.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use vouch_proto::crypto::{constant_time_eq, random_bytes};
use vouch_proto::dvv::{AccountRef, Dvv};
use vouch_store::{AuthorizationRecord, DvvRecord, Merchant, PaymentAccount, StoreError, Terminal};

use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::registry::new_id;
use crate::{AppState, audit};

/// How far back an authorization looks for the account's values, so an old value is
/// answered "expired" rather than "wrong".
const LOOKBACK_SECS: i64 = 24 * 3600;
const AUTHORIZATION_CODE_CHARS: usize = 6;
const RETRIEVAL_REFERENCE_DIGITS: usize = 12;
const AMOUNT_MINOR_MAX: i64 = 999_999_999_999;
const USED_UP: &str = "dvv-used-up";

/// ISO 8583 (DE 39) response codes Vouch answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseCode {
    Approved,
    InvalidMerchant,
    DoNotHonor,
    InvalidAccount,
    FormatError,
    Expired,
    OverLimit,
    SecurityViolation,
    TriesExceeded,
    DuplicateTransmission,
    SystemMalfunction,
}

impl ResponseCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseCode::Approved => "00",
            ResponseCode::InvalidMerchant => "03",
            ResponseCode::DoNotHonor => "05",
            ResponseCode::InvalidAccount => "14",
            ResponseCode::FormatError => "30",
            ResponseCode::Expired => "54",
            ResponseCode::OverLimit => "61",
            ResponseCode::SecurityViolation => "63",
            ResponseCode::TriesExceeded => "75",
            ResponseCode::DuplicateTransmission => "94",
            ResponseCode::SystemMalfunction => "96",
        }
    }
}

/// Which way a request came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Http,
    Iso8583,
}

impl Channel {
    fn as_str(self) -> &'static str {
        match self {
            Channel::Http => "http",
            Channel::Iso8583 => "iso8583",
        }
    }
}

/// An authorization request whose fields are well-formed (the edge checked them);
/// whether they are right is [`decide`]'s question.
#[derive(Debug, Clone)]
pub struct AuthorizationRequest {
    /// DE 11, 6 digits.
    pub stan: String,
    /// DE 7, `MMDDhhmmss`.
    pub transmission_time: String,
    pub amount_minor: i64,
    /// ISO 4217 numeric.
    pub currency: String,
    /// DE 2 as presented.
    pub account_ref: String,
    /// The value as presented: digits of the configured length.
    pub dvv: String,
    /// DE 22, 3 digits.
    pub entry_mode: String,
    /// DE 37, when the terminal set one.
    pub retrieval_reference: Option<String>,
    pub channel: Channel,
}

/// What the decision does to the database besides recording the answer.
enum Plan {
    /// The value matched and passed every check: take one use.
    Approve {
        dvv_id: String,
        clear_wrong_tries: bool,
    },
    /// A wrong value: count it against the account, which may lock it.
    CountWrong {
        code: ResponseCode,
        reason: &'static str,
    },
    Decline {
        code: ResponseCode,
        reason: &'static str,
    },
}

/// Decides one authorization for `terminal` and records it. A retry of a request
/// already decided gets the first answer; a different request under the same retry
/// key gets `94`.
pub async fn decide(
    state: &AppState,
    terminal: &Terminal,
    merchant: &Merchant,
    request: AuthorizationRequest,
) -> ApiResult<AuthorizationRecord> {
    let fingerprint = state.dvv.keys.request_fingerprint(&[
        request.amount_minor.to_string().as_bytes(),
        request.currency.as_bytes(),
        request.account_ref.as_bytes(),
        request.dvv.as_bytes(),
        request.entry_mode.as_bytes(),
    ]);
    // A retry is found by the retry key's unique constraint when its answer is
    // written, not by a read first: retries are rare, and every request would pay it.
    let now = state.now();
    let (account, dvv, plan) = plan(state, merchant, &request, now).await?;
    let mut record = AuthorizationRecord {
        id: new_id("aut"),
        terminal_id: terminal.id.clone(),
        stan: request.stan.clone(),
        transmission_time: request.transmission_time.clone(),
        request_hash: fingerprint.to_vec(),
        payment_account_id: account.as_ref().map(|a| a.id.clone()),
        dvv_id: dvv.as_ref().map(|d| d.id.clone()),
        amount_minor: request.amount_minor,
        currency: request.currency.clone(),
        entry_mode: request.entry_mode.clone(),
        response_code: String::new(),
        reason: String::new(),
        authorization_code: None,
        retrieval_reference: match &request.retrieval_reference {
            Some(rrn) => rrn.clone(),
            None => random_digits(state, RETRIEVAL_REFERENCE_DIGITS)?,
        },
        channel: request.channel.as_str().to_owned(),
        created_at: now,
    };
    let authorization_code = random_code(state)?;
    let tries_max = state.config.dvv_wrong_tries_max;
    let actor = format!("terminal:{}", terminal.id);
    let account_last4 = account.as_ref().map(|a| a.ref_last4.clone());
    let entry = move |record: &AuthorizationRecord| {
        let detail = json!({
            "response_code": record.response_code, "reason": record.reason, "stan": record.stan,
            "transmission_time": record.transmission_time, "amount_minor": record.amount_minor,
            "currency": record.currency, "payment_account_id": record.payment_account_id,
            "account_ref_last4": account_last4, "dvv_id": record.dvv_id, "channel": record.channel,
        });
        audit::entry(now, &actor, "authorization.decided", &record.id, detail)
    };
    let written = match plan {
        // The common case, written in one call to the database.
        Plan::Approve { dvv_id, clear_wrong_tries: false } => {
            record.response_code = ResponseCode::Approved.as_str().to_owned();
            record.reason = "approved".to_owned();
            record.authorization_code = Some(authorization_code);
            let approved = entry(&record);
            let used_up = AuthorizationRecord {
                response_code: ResponseCode::Expired.as_str().to_owned(),
                reason: USED_UP.to_owned(),
                authorization_code: None,
                ..record.clone()
            };
            let declined_detail = entry(&used_up).detail;
            state
                .store
                .write_statement(move |tx| {
                    Box::pin(async move {
                        let code = (ResponseCode::Expired.as_str(), USED_UP);
                        let taken =
                            tx.record_approval(&dvv_id, now, &record, code, &approved, &declined_detail).await?;
                        Ok(if taken { record } else { used_up })
                    })
                })
                .await
        }
        plan => {
            state
                .store
                .write(move |tx| {
                    Box::pin(async move {
                        let (code, reason) = match plan {
                            Plan::Approve { dvv_id, clear_wrong_tries } => {
                                if tx.take_dvv_use(&dvv_id, now).await? {
                                    if clear_wrong_tries && let Some(account) = &record.payment_account_id {
                                        tx.clear_wrong_dvvs(account).await?;
                                    }
                                    record.authorization_code = Some(authorization_code);
                                    (ResponseCode::Approved, "approved")
                                } else {
                                    // Another request took the last use, or the value ran
                                    // out between the read and now.
                                    (ResponseCode::Expired, USED_UP)
                                }
                            }
                            Plan::CountWrong { code, reason } => {
                                let account = record.payment_account_id.as_deref().unwrap_or_default();
                                if tx.count_wrong_dvv(account, tries_max, now).await? {
                                    (ResponseCode::TriesExceeded, "too-many-wrong-dvvs")
                                } else {
                                    (code, reason)
                                }
                            }
                            Plan::Decline { code, reason } => (code, reason),
                        };
                        record.response_code = code.as_str().to_owned();
                        record.reason = reason.to_owned();
                        tx.insert_authorization(&record).await?;
                        tx.append_audit(&entry(&record)).await?;
                        Ok(record)
                    })
                })
                .await
        }
    };
    match written {
        Ok(record) => Ok(record),
        // A retry decided on another instance (or connection) first: its answer stands.
        Err(StoreError::Conflict { .. }) => {
            let first =
                state.store.authorization_by_key(&terminal.id, &request.stan, &request.transmission_time).await?;
            let first = first.ok_or_else(|| ApiError::internal("an authorization conflicted but cannot be read"))?;
            Ok(answer_retry(state, first, &fingerprint).await)
        }
        Err(e) => Err(e.into()),
    }
}

/// The first answer for a retry, or `94` for a different request reusing its key
/// (audited, not recorded: the key holds the first answer).
async fn answer_retry(state: &AppState, first: AuthorizationRecord, fingerprint: &[u8]) -> AuthorizationRecord {
    if constant_time_eq(&first.request_hash, fingerprint) {
        return first;
    }
    let detail = json!({ "stan": first.stan, "transmission_time": first.transmission_time, "first": first.id });
    let entry =
        audit::entry(state.now(), &format!("terminal:{}", first.terminal_id), "authorization.duplicate", "-", detail);
    if let Err(e) = state.store.write(move |tx| Box::pin(async move { tx.append_audit(&entry).await })).await {
        tracing::error!(error = %e, "could not audit a duplicate transmission");
    }
    AuthorizationRecord {
        response_code: ResponseCode::DuplicateTransmission.as_str().to_owned(),
        reason: "duplicate-transmission".to_owned(),
        authorization_code: None,
        ..first
    }
}

/// Everything that can be read before the transaction: the account, the value that
/// matches, and what to do.
async fn plan(
    state: &AppState,
    merchant: &Merchant,
    request: &AuthorizationRequest,
    now: i64,
) -> ApiResult<(Option<PaymentAccount>, Option<DvvRecord>, Plan)> {
    let decline = |code, reason| Plan::Decline { code, reason };
    let Ok(account_ref) = AccountRef::parse(&request.account_ref) else {
        return Ok((None, None, decline(ResponseCode::InvalidAccount, "invalid-account-ref")));
    };
    let keys = &state.dvv.keys;
    let found = state.store.account_with_dvvs(&keys.account_hash(&account_ref), now - LOOKBACK_SECS).await?;
    let Some((account, recent)) = found else {
        return Ok((None, None, decline(ResponseCode::InvalidAccount, "unknown-account")));
    };
    if account.locked_at.is_some() {
        return Ok((Some(account), None, decline(ResponseCode::TriesExceeded, "account-locked")));
    }
    let presented = match Dvv::parse(&request.dvv, state.dvv.digits) {
        Ok(dvv) => keys.stored_hash(&dvv),
        // Not a value Vouch could have issued (its assurance digit is 0).
        Err(_) => {
            let plan = Plan::CountWrong { code: ResponseCode::DoNotHonor, reason: "dvv-mismatch" };
            return Ok((Some(account), None, plan));
        }
    };
    // Every candidate is compared, so the time taken does not depend on which matched.
    let matched = recent.into_iter().fold(None, |found, (dvv, phone_active)| {
        if constant_time_eq(&dvv.value_hash, &presented) && found.is_none() { Some((dvv, phone_active)) } else { found }
    });
    let Some((dvv, phone_active)) = matched else {
        let plan = match state.store.live_dvv_elsewhere(&presented, &account.id, now).await? {
            Some(_) => Plan::CountWrong { code: ResponseCode::SecurityViolation, reason: "dvv-of-another-account" },
            None => Plan::CountWrong { code: ResponseCode::DoNotHonor, reason: "dvv-mismatch" },
        };
        return Ok((Some(account), None, plan));
    };
    let plan = if dvv.superseded_at.is_some() {
        decline(ResponseCode::Expired, "dvv-superseded")
    } else if now >= dvv.expires_at {
        decline(ResponseCode::Expired, "dvv-expired")
    } else if dvv.uses >= dvv.max_uses {
        decline(ResponseCode::Expired, USED_UP)
    } else if dvv.merchant_category.is_some() && dvv.merchant_category != merchant.merchant_category {
        decline(ResponseCode::DoNotHonor, "dvv-for-another-merchant-category")
    } else if request.amount_minor > dvv.amount_limit_minor {
        decline(ResponseCode::OverLimit, "over-dvv-limit")
    } else if !phone_active {
        decline(ResponseCode::DoNotHonor, "phone-not-active")
    } else {
        Plan::Approve { dvv_id: dvv.id.clone(), clear_wrong_tries: account.wrong_dvv_tries > 0 }
    };
    Ok((Some(account), Some(dvv), plan))
}

fn random_digits(state: &AppState, count: usize) -> ApiResult<String> {
    let bytes = random_bytes::<16>(&*state.rng).map_err(ApiError::internal)?;
    Ok(bytes.iter().take(count).map(|b| char::from(b'0' + b % 10)).collect())
}

/// DE 38: six characters of `0-9A-Z`.
fn random_code(state: &AppState) -> ApiResult<String> {
    const ALPHABET: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let bytes = random_bytes::<AUTHORIZATION_CODE_CHARS>(&*state.rng).map_err(ApiError::internal)?;
    Ok(bytes.iter().map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()])).collect())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationBody {
    /// The terminal's merchant (`mch_…`).
    pub merchant_id: String,
    /// The calling terminal (`trm_…`); must be the one the API key belongs to.
    pub terminal_id: String,
    /// System trace audit number (ISO 8583 DE 11): 6 digits.
    pub stan: String,
    /// Transmission date and time (DE 7), UTC `MMDDhhmmss`. With `terminal_id` and
    /// `stan` it is the retry key: a request sent again gets the first answer.
    pub transmission_time: String,
    /// Amount in minor units (DE 4), 1 to 999999999999.
    pub amount: i64,
    /// ISO 4217 numeric currency code (DE 49), e.g. `978`.
    pub currency: String,
    /// The payment account's 16-digit payment token (DE 2).
    pub account_ref: String,
    /// The value the phone handed over.
    pub dvv: String,
    /// POS entry mode (DE 22): 3 digits, e.g. `071` contactless.
    pub entry_mode: String,
    /// Retrieval reference number (DE 37): 12 letters or digits; one is made when absent.
    pub retrieval_reference: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuthorizationView {
    pub authorization_id: String,
    /// ISO 8583 response code (DE 39): `00` approved, `05` do not honor, `14` invalid
    /// account, `54` expired or used up, `61` over limit, `63` security violation, `75`
    /// too many wrong values, `94` duplicate transmission.
    pub response_code: String,
    /// Why, in words a program can match: `approved`, `dvv-mismatch`, `dvv-expired`, …
    pub reason: String,
    pub approved: bool,
    /// DE 38, on approvals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_code: Option<String>,
    pub retrieval_reference: String,
    pub terminal_id: String,
    pub stan: String,
    pub transmission_time: String,
    pub amount: i64,
    pub currency: String,
    pub created_at: i64,
}

impl From<AuthorizationRecord> for AuthorizationView {
    fn from(r: AuthorizationRecord) -> Self {
        AuthorizationView {
            approved: r.response_code == ResponseCode::Approved.as_str(),
            authorization_id: r.id,
            response_code: r.response_code,
            reason: r.reason,
            authorization_code: r.authorization_code,
            retrieval_reference: r.retrieval_reference,
            terminal_id: r.terminal_id,
            stan: r.stan,
            transmission_time: r.transmission_time,
            amount: r.amount_minor,
            currency: r.currency,
            created_at: r.created_at,
        }
    }
}

/// Authorizes a payment whose request carries a DVV. Declines are answers (200 with
/// their response code); malformed requests are problems.
#[utoipa::path(post, path = "/v1/authorizations", tag = "dvv", request_body = AuthorizationBody,
    security(("api_key" = ["terminal"])),
    responses((status = 200, body = AuthorizationView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn authorize_http(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<AuthorizationBody>,
) -> ApiResult<Json<AuthorizationView>> {
    caller.require(Scope::Terminal)?;
    let known = calling_terminal(&state, &caller).await?;
    let (terminal, merchant) = &*known;
    if body.terminal_id != terminal.id || body.merchant_id != merchant.id {
        return Err(ApiError::forbidden(
            "terminal-mismatch",
            "terminal_id and merchant_id must name the terminal this API key belongs to",
        ));
    }
    let request = check_body(&state, body)?;
    Ok(Json(decide(&state, terminal, merchant, request).await?.into()))
}

async fn calling_terminal(state: &AppState, caller: &ApiCaller) -> ApiResult<std::sync::Arc<(Terminal, Merchant)>> {
    state
        .dvv
        .terminal(&state.store, super::TerminalKey::ApiKey(caller.key_id.clone()))
        .await?
        .ok_or_else(|| ApiError::forbidden("not-a-terminal-key", "this API key does not belong to a terminal"))
}

fn check_body(state: &AppState, body: AuthorizationBody) -> ApiResult<AuthorizationRequest> {
    let invalid =
        |field: &str, expected: &str| ApiError::unprocessable("invalid-field", format!("{field} must be {expected}"));
    let digits = |text: &str, count: usize| text.len() == count && text.bytes().all(|b| b.is_ascii_digit());
    if !digits(&body.stan, 6) {
        return Err(invalid("stan", "6 digits"));
    }
    if vouch_proto::iso8583::TransmissionTime::parse(&body.transmission_time).is_err() {
        return Err(invalid("transmission_time", "a UTC date and time as MMDDhhmmss"));
    }
    if !(1..=AMOUNT_MINOR_MAX).contains(&body.amount) {
        return Err(invalid("amount", "1 to 999999999999 minor units"));
    }
    if !digits(&body.currency, 3) {
        return Err(invalid("currency", "an ISO 4217 numeric code such as 978"));
    }
    if !digits(&body.account_ref, vouch_proto::dvv::ACCOUNT_REF_DIGITS) {
        return Err(invalid("account_ref", "16 digits"));
    }
    if !digits(&body.dvv, usize::from(state.dvv.digits.count())) {
        return Err(ApiError::unprocessable(
            "invalid-field",
            format!("dvv must be {} digits", state.dvv.digits.count()),
        ));
    }
    if !digits(&body.entry_mode, 3) {
        return Err(invalid("entry_mode", "3 digits (ISO 8583 DE 22)"));
    }
    if let Some(rrn) = &body.retrieval_reference
        && (rrn.len() != RETRIEVAL_REFERENCE_DIGITS || !rrn.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        return Err(invalid("retrieval_reference", "12 letters or digits"));
    }
    Ok(AuthorizationRequest {
        stan: body.stan,
        transmission_time: body.transmission_time,
        amount_minor: body.amount,
        currency: body.currency,
        account_ref: body.account_ref,
        dvv: body.dvv,
        entry_mode: body.entry_mode,
        retrieval_reference: body.retrieval_reference,
        channel: Channel::Http,
    })
}

/// One authorization, for the terminal that asked for it.
#[utoipa::path(get, path = "/v1/authorizations/{authorization_id}", tag = "dvv",
    params(("authorization_id" = String, Path)), security(("api_key" = ["terminal"])),
    responses((status = 200, body = AuthorizationView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn get_authorization(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(authorization_id): ApiPath<String>,
) -> ApiResult<Json<AuthorizationView>> {
    caller.require(Scope::Terminal)?;
    let record = state.store.authorization(&authorization_id).await?;
    if caller.require(Scope::Admin).is_err() {
        let known = calling_terminal(&state, &caller).await?;
        if known.0.id != record.terminal_id {
            return Err(ApiError::not_found("authorization"));
        }
    }
    Ok(Json(record.into()))
}
