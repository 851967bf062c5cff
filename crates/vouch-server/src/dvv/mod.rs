//! dvv: temporary device verification values (seed 004). A consumer's phone, validated
//! over its DPoP-bound token, asks for a value for one of its consumer's payment
//! accounts; the server runs its tests on the phone again at every request and issues a
//! short numeric value, good for N authorizations or T seconds, whose first digit is
//! the assurance it found. A terminal's authorization request (HTTP here, ISO 8583 in
//! `iso8583`) carries the value back; `authorize` decides, counting the use in the
//! database. Only keyed hashes of values and account references are stored.

mod authorize;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
pub mod iso8583;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{CACHE_CONTROL, HeaderValue};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_proto::crypto::random_bytes;
use vouch_proto::dvv::{AccountRef, Assurance, Digits, DvvKeys, ISSUE_NONCE_BYTES};
use vouch_proto::enrol::DeviceKind;
use vouch_store::{Consumer, DeviceStatus, DvvRecord, IssueRefusal, Merchant, PaymentAccount, StoreError, Terminal};

pub use authorize::{AuthorizationRequest, Channel, ResponseCode, decide};

use crate::auth::{ApiCaller, Scope, create_api_key_in};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::keys::MasterKey;
use crate::registry::{ISO_TERMINAL_ID_CHARS, check_iso_id, check_merchant_category, check_text, new_id};
use crate::token::DpopCaller;
use crate::{AppState, audit};

const KEYS_LABEL: &str = "vouch/dvv/v1";
/// The operation a phone's ticket must allow.
const DVV_OPERATION: &str = "dvv";
const CONSUMER_NAME_CHARS_MAX: usize = 200;

/// Terminals remembered by API key; beyond this many the memory starts afresh.
const TERMINAL_CACHE_MAX: usize = 10_000;

/// The server's DVV keys and value length, shared by every handler, and the terminals
/// seen by API key: a terminal and its merchant never change once registered (the key's
/// revocation is checked on every request by the API key itself), so an authorization
/// need not read them again.
#[derive(Debug)]
pub struct DvvState {
    keys: DvvKeys,
    digits: Digits,
    terminals: Mutex<HashMap<TerminalKey, Arc<(Terminal, Merchant)>>>,
}

/// How a request names its terminal: by the API key it holds (HTTP) or by its ISO 8583
/// ids, DE 42 and DE 41.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum TerminalKey {
    ApiKey(String),
    IsoIds { card_acceptor_id: String, iso_terminal_id: String },
}

impl DvvState {
    pub fn new(master: &MasterKey, digits: u8) -> Result<Self, vouch_proto::ProtoError> {
        Ok(DvvState {
            keys: DvvKeys::new(&*master.derive(KEYS_LABEL))?,
            digits: Digits::new(digits)?,
            terminals: Mutex::new(HashMap::new()),
        })
    }

    /// The terminal a key names, if any.
    pub(crate) async fn terminal(
        &self,
        store: &vouch_store::Store,
        key: TerminalKey,
    ) -> Result<Option<Arc<(Terminal, Merchant)>>, StoreError> {
        if let Some(known) = self.lock_terminals().get(&key) {
            return Ok(Some(Arc::clone(known)));
        }
        let found = match &key {
            TerminalKey::ApiKey(id) => store.terminal_by_api_key(id).await?,
            TerminalKey::IsoIds { card_acceptor_id, iso_terminal_id } => {
                store.terminal_by_iso_ids(card_acceptor_id, iso_terminal_id).await?
            }
        };
        let Some(found) = found else { return Ok(None) };
        let found = Arc::new(found);
        let mut terminals = self.lock_terminals();
        if terminals.len() >= TERMINAL_CACHE_MAX {
            terminals.clear();
        }
        terminals.insert(key, Arc::clone(&found));
        Ok(Some(found))
    }

    fn lock_terminals(&self) -> std::sync::MutexGuard<'_, HashMap<TerminalKey, Arc<(Terminal, Merchant)>>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.terminals.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_consumer))
        .routes(routes!(add_consumer_device))
        .routes(routes!(add_payment_account))
        .routes(routes!(create_terminal))
        .routes(routes!(issue))
        .routes(routes!(authorize::authorize_http))
        .routes(routes!(authorize::get_authorization))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewConsumer {
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConsumerView {
    pub consumer_id: String,
    pub name: String,
    pub created_at: i64,
}

/// Registers a consumer, who holds payment accounts and phones.
#[utoipa::path(post, path = "/v1/consumers", tag = "dvv", request_body = NewConsumer,
    security(("api_key" = ["admin"])),
    responses((status = 201, body = ConsumerView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn create_consumer(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<NewConsumer>,
) -> ApiResult<(StatusCode, Json<ConsumerView>)> {
    caller.require(Scope::Admin)?;
    check_text("name", &body.name, CONSUMER_NAME_CHARS_MAX)?;
    let now = state.now();
    let consumer = Consumer { id: new_id("cns"), name: body.name, created_at: now };
    let entry = audit::entry(now, &caller.actor(), "consumer.created", &consumer.id, json!({}));
    let record = consumer.clone();
    state
        .store
        .write(move |tx| {
            Box::pin(async move {
                tx.insert_consumer(&record).await?;
                tx.append_audit(&entry).await
            })
        })
        .await?;
    let view = ConsumerView { consumer_id: consumer.id, name: consumer.name, created_at: consumer.created_at };
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewConsumerDevice {
    /// An enrolled device of kind `consumer`.
    pub device_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConsumerDeviceView {
    pub consumer_id: String,
    pub device_id: String,
}

/// Makes an enrolled phone (a device of kind `consumer`) one consumer's.
#[utoipa::path(post, path = "/v1/consumers/{consumer_id}/devices", tag = "dvv", request_body = NewConsumerDevice,
    params(("consumer_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 201, body = ConsumerDeviceView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn add_consumer_device(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(consumer_id): ApiPath<String>,
    ApiJson(body): ApiJson<NewConsumerDevice>,
) -> ApiResult<(StatusCode, Json<ConsumerDeviceView>)> {
    caller.require(Scope::Admin)?;
    state.store.consumer(&consumer_id).await?;
    let device = state.store.device(&body.device_id).await?;
    if device.kind != DeviceKind::Consumer {
        return Err(ApiError::unprocessable(
            "not-a-consumer-device",
            "only devices of kind consumer belong to consumers",
        ));
    }
    if device.status != DeviceStatus::Active {
        return Err(ApiError::unprocessable("device-not-active", format!("the device is {}", device.status.as_str())));
    }
    let now = state.now();
    let entry =
        audit::entry(now, &caller.actor(), "consumer.device_added", &consumer_id, json!({ "device_id": device.id }));
    let (device_id, owner) = (device.id.clone(), consumer_id.clone());
    state
        .store
        .write(move |tx| {
            Box::pin(async move {
                tx.link_consumer_device(&device_id, &owner, now).await?;
                tx.append_audit(&entry).await
            })
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => {
                ApiError::conflict("device-has-consumer", "this phone already belongs to a consumer")
            }
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(ConsumerDeviceView { consumer_id, device_id: device.id })))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPaymentAccount {
    /// 16-digit, Luhn-valid payment token. Never a card number.
    pub account_ref: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PaymentAccountView {
    pub payment_account_id: String,
    pub consumer_id: String,
    /// The last four digits; the reference itself is not kept.
    pub account_ref_last4: String,
    pub created_at: i64,
}

impl From<PaymentAccount> for PaymentAccountView {
    fn from(a: PaymentAccount) -> Self {
        PaymentAccountView {
            payment_account_id: a.id,
            consumer_id: a.consumer_id,
            account_ref_last4: a.ref_last4,
            created_at: a.created_at,
        }
    }
}

/// Registers a consumer's payment account by its payment token.
#[utoipa::path(post, path = "/v1/consumers/{consumer_id}/payment-accounts", tag = "dvv", request_body = NewPaymentAccount,
    params(("consumer_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 201, body = PaymentAccountView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn add_payment_account(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(consumer_id): ApiPath<String>,
    ApiJson(body): ApiJson<NewPaymentAccount>,
) -> ApiResult<(StatusCode, Json<PaymentAccountView>)> {
    caller.require(Scope::Admin)?;
    let account_ref = parse_account_ref(&body.account_ref)?;
    state.store.consumer(&consumer_id).await?;
    let now = state.now();
    let account = PaymentAccount {
        id: new_id("pac"),
        consumer_id,
        ref_hash: state.dvv.keys.account_hash(&account_ref).to_vec(),
        ref_last4: account_ref.last4().to_owned(),
        wrong_dvv_tries: 0,
        locked_at: None,
        created_at: now,
    };
    let detail = json!({ "consumer_id": account.consumer_id, "account_ref_last4": account.ref_last4 });
    let entry = audit::entry(now, &caller.actor(), "payment_account.created", &account.id, detail);
    let record = account.clone();
    state
        .store
        .write(move |tx| {
            Box::pin(async move {
                tx.insert_payment_account(&record).await?;
                tx.append_audit(&entry).await
            })
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => {
                ApiError::conflict("account-ref-registered", "this account reference is registered already")
            }
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(account.into())))
}

fn parse_account_ref(text: &str) -> ApiResult<AccountRef> {
    AccountRef::parse(text).map_err(|e| ApiError::unprocessable("invalid-account-ref", e.to_string()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTerminal {
    /// ISO 8583 terminal id (DE 41): exactly 8 printable ASCII characters, unique
    /// within the merchant.
    pub iso_terminal_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TerminalCreated {
    pub terminal_id: String,
    pub merchant_id: String,
    pub card_acceptor_id: String,
    pub iso_terminal_id: String,
    /// The terminal's API key (scope `terminal`), shown this once.
    pub api_key: String,
}

/// Registers a terminal of a merchant that has a card acceptor id, with its own API key.
#[utoipa::path(post, path = "/v1/merchants/{merchant_id}/terminals", tag = "dvv", request_body = NewTerminal,
    params(("merchant_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 201, body = TerminalCreated), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn create_terminal(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(merchant_id): ApiPath<String>,
    ApiJson(body): ApiJson<NewTerminal>,
) -> ApiResult<(StatusCode, Json<TerminalCreated>)> {
    caller.require(Scope::Admin)?;
    check_iso_id("iso_terminal_id", &body.iso_terminal_id, ISO_TERMINAL_ID_CHARS)?;
    let merchant = state.store.merchant(&merchant_id).await?;
    let Some(card_acceptor_id) = merchant.card_acceptor_id else {
        return Err(ApiError::unprocessable(
            "merchant-without-card-acceptor-id",
            "register the merchant with a card_acceptor_id before its terminals",
        ));
    };
    let now = state.now();
    let terminal_id = new_id("trm");
    let label = format!("terminal {terminal_id}");
    let terminal = Terminal {
        id: terminal_id.clone(),
        merchant_id: merchant.id.clone(),
        iso_terminal_id: body.iso_terminal_id,
        api_key_id: String::new(),
        created_at: now,
    };
    let detail = json!({ "merchant_id": terminal.merchant_id, "iso_terminal_id": terminal.iso_terminal_id });
    let entry = audit::entry(now, &caller.actor(), "terminal.created", &terminal.id, detail);
    let key = create_api_key_in(&state.store, &state.rng, &[Scope::Terminal], &label, now, &caller.actor(), {
        let terminal = terminal.clone();
        move |tx, api_key_id| {
            Box::pin(async move {
                tx.insert_terminal(&Terminal { api_key_id, ..terminal }).await?;
                tx.append_audit(&entry).await?;
                Ok(())
            })
        }
    })
    .await
    .map_err(|e| match e.reason() {
        "conflict" => ApiError::conflict("terminal-id-taken", "the merchant has a terminal with this iso_terminal_id"),
        _ => e,
    })?;
    Ok((
        StatusCode::CREATED,
        Json(TerminalCreated {
            terminal_id,
            merchant_id: merchant.id,
            card_acceptor_id,
            iso_terminal_id: terminal.iso_terminal_id,
            api_key: key.plaintext.to_string(),
        }),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DvvRequest {
    /// The payment account, as its 16-digit payment token.
    pub account_ref: String,
    /// ISO 18245 category of the merchant the phone is about to pay; where a policy
    /// for it is configured, the value follows that policy and authorizes only there.
    pub merchant_category: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuedDvv {
    /// The value to hand to the terminal. Its first digit is `assurance`.
    pub dvv: String,
    pub dvv_id: String,
    pub max_uses: i64,
    pub expires_at: i64,
    /// 1 (lowest) to 3: how much the server trusted the phone.
    pub assurance: u8,
    /// The largest amount, in minor units, the value authorizes.
    pub amount_limit_minor: i64,
    pub account_ref_last4: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_category: Option<String>,
}

/// Validates the calling phone and issues a temporary DVV for one of its consumer's
/// accounts.
#[utoipa::path(post, path = "/v1/dvv", tag = "dvv", request_body = DvvRequest,
    params(("DPoP" = String, Header, description = "DPoP proof (RFC 9449) of the phone")),
    security(("dpop" = [])),
    responses((status = 201, body = IssuedDvv), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn issue(
    State(state): State<AppState>,
    caller: DpopCaller,
    ApiJson(body): ApiJson<DvvRequest>,
) -> ApiResult<impl IntoResponse> {
    match issue_checked(&state, &caller, &body).await {
        Ok(issued) => {
            // The value is a credential: no cache may keep it.
            Ok((StatusCode::CREATED, [(CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(issued)))
        }
        Err(refusal) => {
            if refusal.status().is_client_error() {
                let detail = json!({ "reason": refusal.reason(), "detail": refusal.detail() });
                let entry =
                    audit::entry(state.now(), &format!("device:{}", caller.device_id()), "dvv.refused", "-", detail);
                if let Err(e) =
                    state.store.write(move |tx| Box::pin(async move { tx.append_audit(&entry).await })).await
                {
                    tracing::error!(error = %e, "could not audit a refused DVV request");
                }
            }
            Err(refusal)
        }
    }
}

/// The request (account of the phone's consumer) and the validation tests on the
/// phone (affirming ticket allowing `dvv`, risk under the threshold, velocity), then
/// the value.
async fn issue_checked(state: &AppState, caller: &DpopCaller, body: &DvvRequest) -> ApiResult<IssuedDvv> {
    let account_ref = parse_account_ref(&body.account_ref)?;
    if let Some(category) = &body.merchant_category {
        check_merchant_category(category)?;
    }
    let config = &state.config;
    let phone = caller.device_id();
    let Some(consumer_id) = state.store.consumer_of_device(phone).await? else {
        return Err(ApiError::forbidden("not-a-consumer-phone", "the calling device belongs to no consumer"));
    };
    let account = match state.store.payment_account_by_ref_hash(&state.dvv.keys.account_hash(&account_ref)).await? {
        Some(account) if account.consumer_id == consumer_id => account,
        _ => {
            return Err(ApiError::forbidden(
                "account-not-owned",
                "no payment account with this reference belongs to this phone's consumer",
            ));
        }
    };
    caller.require_ticket(DVV_OPERATION, config.dvv_risk_threshold)?;
    let token = &caller.token;
    let assurance = assurance_for(token.risk, config.dvv_risk_threshold);
    let category_policy = body.merchant_category.as_ref().and_then(|c| config.dvv_category_policies.get(c));
    let policy = category_policy.copied().unwrap_or(config.dvv_policy);
    let now = state.now();
    let nonce = random_bytes::<ISSUE_NONCE_BYTES>(&*state.rng).map_err(ApiError::internal)?;
    let dvv = state.dvv.keys.derive(&nonce, &account_ref, assurance, state.dvv.digits);
    let record = DvvRecord {
        id: new_id("dvv"),
        payment_account_id: account.id.clone(),
        device_id: phone.to_owned(),
        ticket_id: token.ticket_id.clone(),
        value_hash: state.dvv.keys.stored_hash(&dvv).to_vec(),
        assurance: i64::from(assurance.level()),
        merchant_category: category_policy.and(body.merchant_category.clone()),
        amount_limit_minor: amount_limit(token.max_amount_minor, assurance),
        max_uses: policy.max_uses,
        uses: 0,
        issued_at: now,
        expires_at: now.saturating_add(policy.ttl_secs),
        superseded_at: None,
    };
    let detail = json!({
        "payment_account_id": account.id, "account_ref_last4": account.ref_last4, "assurance": assurance.level(),
        "max_uses": record.max_uses, "expires_at": record.expires_at, "ticket_id": record.ticket_id,
        "risk": token.risk,
    });
    let entry = audit::entry(now, &format!("device:{phone}"), "dvv.issued", &record.id, detail);
    let (velocity_since, velocity_max) = (now - config.dvv_velocity_window_secs, config.dvv_velocity_max);
    let stored = record.clone();
    let issued = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if let Err(refusal) = tx.issue_dvv(&stored, velocity_since, velocity_max).await? {
                    return Ok(Err(refusal));
                }
                tx.append_audit(&entry).await?;
                Ok(Ok(()))
            })
        })
        .await?;
    if let Err(IssueRefusal::TooManyRequests { limit }) = issued {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "velocity-exceeded",
            format!("this phone has had {limit} values within {} s", config.dvv_velocity_window_secs),
        ));
    }
    Ok(IssuedDvv {
        dvv: dvv.expose().to_owned(),
        dvv_id: record.id,
        max_uses: record.max_uses,
        expires_at: record.expires_at,
        assurance: assurance.level(),
        amount_limit_minor: record.amount_limit_minor,
        account_ref_last4: account.ref_last4,
        merchant_category: record.merchant_category,
    })
}

/// Three levels below the refusal threshold: the lowest fifth of it is level 3, up to
/// half of it level 2, the rest level 1.
fn assurance_for(risk: u8, threshold: u8) -> Assurance {
    let (risk, threshold) = (u32::from(risk), u32::from(threshold));
    let level = if risk * 5 < threshold {
        3
    } else if risk * 2 < threshold {
        2
    } else {
        1
    };
    // Invariant: 1 to 3 are valid levels.
    Assurance::new(level).expect("levels 1 to 3 are valid")
}

/// A value issued at a lower assurance authorizes less: level/3 of the ticket's limit.
fn amount_limit(ticket_limit_minor: i64, assurance: Assurance) -> i64 {
    ticket_limit_minor.saturating_mul(i64::from(assurance.level())) / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assurance_falls_as_risk_nears_the_threshold() {
        let level = |risk| assurance_for(risk, 50).level();
        assert_eq!([level(0), level(9), level(10), level(24), level(25), level(49)], [3, 3, 2, 2, 1, 1]);
        assert_eq!(assurance_for(0, 1).level(), 3);
    }

    #[test]
    fn lower_assurance_authorizes_less() {
        let limit = |level| amount_limit(90_000, Assurance::new(level).unwrap());
        assert_eq!([limit(1), limit(2), limit(3)], [30_000, 60_000, 90_000]);
        assert_eq!(amount_limit(i64::MAX, Assurance::new(3).unwrap()), i64::MAX / 3);
    }
}
