//! The durable outbox: relayed messages delivered to their providers' endpoints, each
//! with its message id as idempotency key, retried with exponential backoff until the
//! provider acknowledges (any 2xx), and set aside as dead after the configured number
//! of attempts or an answer that says retrying cannot help.
//!
//! Any number of instances deliver from one database: a batch is claimed under a lease
//! (`Store::claim_outbox`) and its outcomes recorded only while the lease holds, so a
//! message is in flight from one instance at a time. A provider may still see a message
//! twice (an acknowledgement lost on the way back, a lease that ran out); the
//! idempotency key lets it tell.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use vouch_proto::b64;
use vouch_proto::crypto::random_bytes;
use vouch_proto::tsm::RelayEnvelope;
use vouch_store::{DeliveryOutcome, OutboxFilter, OutboxMessage, OutboxStatus, StoreError};

use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiPath, ApiQuery};
use crate::registry::page_limit;
use crate::{AppState, audit};

/// Messages claimed and delivered concurrently in one round.
const DELIVERY_BATCH: i64 = 128;
/// How often a worker looks for due retries and for messages queued by other instances.
const DELIVERY_POLL: Duration = Duration::from_secs(1);
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryRound {
    pub claimed: usize,
    pub delivered: usize,
    pub retried: usize,
    pub dead: usize,
}

/// Runs delivery rounds until aborted: at once when a message is queued here, every
/// second otherwise, back to back while there is more than a batch to deliver.
pub fn spawn_delivery(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match deliver_due(&state).await {
                Ok(round) if round.claimed as i64 == DELIVERY_BATCH => continue,
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "relayed message delivery round failed"),
            }
            tokio::select! {
                () = state.tsm.wake.notified() => {}
                () = tokio::time::sleep(DELIVERY_POLL) => {}
            }
        }
    })
}

/// One round: claims the messages due now and delivers them concurrently.
pub async fn deliver_due(state: &AppState) -> Result<DeliveryRound, StoreError> {
    let config = &state.config;
    let lease_id = uuid::Uuid::new_v4().simple().to_string();
    let lease_secs = config.tsm_delivery_timeout_secs.saturating_mul(2).saturating_add(5);
    let claimed = state.store.claim_outbox(state.now(), lease_secs, DELIVERY_BATCH, &lease_id).await?;
    let mut round = DeliveryRound { claimed: claimed.len(), ..DeliveryRound::default() };
    if claimed.is_empty() {
        return Ok(round);
    }
    let mut endpoints = HashMap::new();
    for message in &claimed {
        if !endpoints.contains_key(&message.provider_id) {
            let provider = state.store.service_provider(&message.provider_id).await?;
            endpoints.insert(provider.id, provider.endpoint);
        }
    }
    let mut in_flight = tokio::task::JoinSet::new();
    for message in claimed {
        let endpoint = endpoints[&message.provider_id].clone();
        let http = state.tsm.http.clone();
        in_flight.spawn(async move {
            let answer = post(&http, &endpoint, &message).await;
            (message, answer)
        });
    }
    let mut outcomes = Vec::with_capacity(round.claimed);
    while let Some(joined) = in_flight.join_next().await {
        let Ok((message, answer)) = joined else { continue };
        let outcome = outcome(state, &message, answer);
        match &outcome {
            DeliveryOutcome::Delivered { .. } => round.delivered += 1,
            DeliveryOutcome::Retry { error, next_attempt_at } => {
                round.retried += 1;
                tracing::info!(message_id = %message.id, provider_id = %message.provider_id, attempts = message.attempts,
                    next_attempt_at, error, "relayed message not delivered; will retry");
            }
            DeliveryOutcome::Dead { error } => {
                round.dead += 1;
                tracing::warn!(message_id = %message.id, provider_id = %message.provider_id, attempts = message.attempts,
                    error, "relayed message dead-lettered");
            }
        }
        outcomes.push((message.id, outcome));
    }
    state.store.record_deliveries(&lease_id, &outcomes).await?;
    state.metrics.observe_deliveries(&round);
    Ok(round)
}

/// What the provider's endpoint answered: its status, or why there was none.
type Answer = Result<StatusCode, String>;

async fn post(http: &reqwest::Client, endpoint: &str, message: &OutboxMessage) -> Answer {
    let envelope = RelayEnvelope {
        message_id: message.id.clone(),
        provider_id: message.provider_id.clone(),
        device_id: message.device_id.clone(),
        counter: u64::try_from(message.counter).map_err(|_| "stored counter out of range".to_owned())?,
        enc: b64::encode(&message.enc),
        ciphertext: b64::encode(&message.ciphertext),
        created_at: message.created_at,
    };
    let sent = http.post(endpoint).header(IDEMPOTENCY_KEY, &message.id).json(&envelope).send().await;
    match sent {
        Ok(response) => Ok(response.status()),
        Err(e) if e.is_timeout() => Err("the provider did not answer in time".to_owned()),
        Err(e) if e.is_connect() => Err("cannot connect to the provider".to_owned()),
        Err(e) => Err(format!("sending to the provider failed: {e}")),
    }
}

fn outcome(state: &AppState, message: &OutboxMessage, answer: Answer) -> DeliveryOutcome {
    let config = &state.config;
    let error = match answer {
        Ok(status) if status.is_success() => return DeliveryOutcome::Delivered { at: state.now() },
        Ok(status) if !retryable(status) => {
            return DeliveryOutcome::Dead { error: format!("the provider answered {status}; retrying cannot help") };
        }
        Ok(status) => format!("the provider answered {status}"),
        Err(why) => why,
    };
    if message.attempts >= config.tsm_delivery_attempts_max {
        return DeliveryOutcome::Dead {
            error: format!("{error} (attempt {} of {})", message.attempts, config.tsm_delivery_attempts_max),
        };
    }
    let delay = backoff_secs(config.tsm_retry_base_secs, config.tsm_retry_max_secs, message.attempts, jitter(state));
    DeliveryOutcome::Retry { next_attempt_at: state.now().saturating_add(delay), error }
}

/// Server errors and "try later" answers are worth retrying; any other answer (a client
/// error, or a redirect, which is not followed) says the delivery itself is refused.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || matches!(status, StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS)
}

/// `base * 2^(attempts - 1)` capped at `max`, then somewhere in its upper half, so
/// messages that failed together do not all come back together.
fn backoff_secs(base: i64, max: i64, attempts: i64, jitter: u8) -> i64 {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let delay = base.saturating_mul(1_i64 << exponent).min(max).max(1);
    let half = delay / 2;
    delay - half + half * i64::from(jitter) / 255
}

fn jitter(state: &AppState) -> u8 {
    random_bytes::<1>(&*state.rng).map_or(255, |[b]| b)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OutboxQuery {
    /// `pending`, `delivered` or `dead`.
    pub status: Option<String>,
    pub provider_id: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutboxView {
    pub message_id: String,
    pub provider_id: String,
    pub device_id: String,
    pub counter: i64,
    /// `pending`, `delivered` or `dead`.
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

impl From<OutboxMessage> for OutboxView {
    fn from(m: OutboxMessage) -> Self {
        OutboxView {
            message_id: m.id,
            provider_id: m.provider_id,
            device_id: m.device_id,
            counter: m.counter,
            status: m.status.as_str().to_owned(),
            attempts: m.attempts,
            next_attempt_at: m.next_attempt_at,
            last_error: m.last_error,
            created_at: m.created_at,
            delivered_at: m.delivered_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutboxPage {
    pub messages: Vec<OutboxView>,
    /// Present when there may be more: pass it as `cursor`.
    pub next_cursor: Option<String>,
}

/// The outbox for operators, newest first: what is pending, delivered or dead, and why.
/// It shows no message content.
#[utoipa::path(get, path = "/v1/tsm/outbox", tag = "tsm", params(OutboxQuery), security(("api_key" = ["admin"])),
    responses((status = 200, body = OutboxPage), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn list_outbox(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiQuery(query): ApiQuery<OutboxQuery>,
) -> ApiResult<Json<OutboxPage>> {
    caller.require(Scope::Admin)?;
    let limit = page_limit(query.limit)?;
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(OutboxStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request("invalid-query", format!("status {text:?} is not pending, delivered or dead"))
        })?),
    };
    let before = query.cursor.as_deref().map(parse_cursor).transpose()?;
    let filter = OutboxFilter { status, provider_id: query.provider_id };
    let messages = state.store.outbox_page(&filter, before, i64::from(limit)).await?;
    let next_cursor = (messages.len() == limit as usize)
        .then(|| messages.last().map(|m| format!("{}.{}", m.created_at, m.id)))
        .flatten();
    Ok(Json(OutboxPage { messages: messages.into_iter().map(OutboxView::from).collect(), next_cursor }))
}

fn parse_cursor(text: &str) -> ApiResult<(i64, String)> {
    let invalid = || ApiError::bad_request("invalid-cursor", "cursor must be a next_cursor of this endpoint");
    let (at, id) = text.split_once('.').ok_or_else(invalid)?;
    let at = at.parse::<i64>().map_err(|_| invalid())?;
    if id.is_empty() || id.len() > 64 {
        return Err(invalid());
    }
    Ok((at, id.to_owned()))
}

/// Puts a dead message back in the queue, its attempts counted afresh.
#[utoipa::path(post, path = "/v1/tsm/outbox/{message_id}/retry", tag = "tsm",
    params(("message_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 200, body = OutboxView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn retry_message(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(message_id): ApiPath<String>,
) -> ApiResult<Json<OutboxView>> {
    caller.require(Scope::Admin)?;
    let now = state.now();
    let entry = audit::entry(now, &caller.actor(), "tsm.message_requeued", &message_id, json!({}));
    let id = message_id.clone();
    let requeued = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if !tx.retry_outbox(&id, now).await? {
                    return Ok(false);
                }
                tx.append_audit(&entry).await?;
                Ok(true)
            })
        })
        .await?;
    if !requeued {
        return match state.store.outbox_message(&message_id).await? {
            Some(message) => Err(ApiError::conflict(
                "not-dead",
                format!("the message is {}; only a dead message is retried", message.status.as_str()),
            )),
            None => Err(ApiError::not_found("message")),
        };
    }
    state.tsm.wake.notify_one();
    let message = state.store.outbox_message(&message_id).await?.ok_or_else(|| ApiError::not_found("message"))?;
    Ok(Json(message.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stays_in_the_upper_half() {
        assert_eq!(backoff_secs(2, 600, 1, 255), 2);
        assert_eq!(backoff_secs(2, 600, 2, 255), 4);
        assert_eq!(backoff_secs(2, 600, 4, 255), 16);
        assert_eq!(backoff_secs(2, 600, 4, 0), 8);
        assert_eq!(backoff_secs(2, 600, 20, 255), 600);
        assert_eq!(backoff_secs(2, 600, 1_000, 0), 300);
        for jitter in 0..=255 {
            let delay = backoff_secs(1, 600, 1, jitter);
            assert_eq!(delay, 1, "a one-second delay cannot be halved");
        }
    }

    #[test]
    fn only_server_errors_and_try_later_answers_are_retried() {
        for status in [500, 502, 503, 504, 408, 425, 429] {
            assert!(retryable(StatusCode::from_u16(status).unwrap()), "{status}");
        }
        for status in [400, 401, 403, 404, 409, 413, 422, 301] {
            assert!(!retryable(StatusCode::from_u16(status).unwrap()), "{status}");
        }
    }
}
