//! Admin and integration callers: scoped API keys, stored as SHA-256 hashes and
//! compared in constant time, with a per-key rate limit.
//!
//! A key reads `vouch_<id>_<secret>`: the id finds the record, the secret (32 random
//! bytes) is what is hashed. Devices never use API keys; they sign.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vouch_proto::b64;
use vouch_proto::crypto::{SystemRandom, constant_time_eq, random_bytes, sha256};
use vouch_store::{ApiKeyRecord, BoxFuture, Store, StoreError, Tx};
use zeroize::Zeroizing;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

const KEY_PREFIX: &str = "vouch_";
const KEY_ID_CHARS_MAX: usize = 32;
const KEY_SECRET_CHARS_MAX: usize = 64;
pub const BOOTSTRAP_KEY_ID: &str = "bootstrap";
/// Buckets kept in memory; beyond this, idle ones are dropped.
const RATE_BUCKETS_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything, including the registry, keys and other API keys.
    Admin,
    /// Enrolling devices.
    Provision,
    /// Terminal and acquirer integrations.
    Terminal,
    /// SMS gateways forwarding phones' messages to the trusted service manager.
    Gateway,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Provision => "provision",
            Scope::Terminal => "terminal",
            Scope::Gateway => "gateway",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        [Scope::Admin, Scope::Provision, Scope::Terminal, Scope::Gateway].into_iter().find(|s| s.as_str() == text)
    }
}

/// An authenticated API key holder.
#[derive(Debug, Clone)]
pub struct ApiCaller {
    pub key_id: String,
    scopes: Vec<Scope>,
}

impl ApiCaller {
    /// `admin` satisfies every scope.
    pub fn require(&self, scope: Scope) -> ApiResult<()> {
        if self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin) {
            Ok(())
        } else {
            Err(ApiError::forbidden("insufficient-scope", format!("this API key lacks the {} scope", scope.as_str())))
        }
    }

    /// How the audit log names this caller.
    pub fn actor(&self) -> String {
        format!("api_key:{}", self.key_id)
    }
}

impl FromRequestParts<AppState> for ApiCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing-credentials", "expected Authorization: Bearer <API key>"))?;
        // The scheme name is case-insensitive (RFC 9110 section 11.1).
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
            .map(|(_, key)| key)
            .ok_or_else(|| ApiError::unauthorized("invalid-credentials", "expected Authorization: Bearer <API key>"))?;
        let (id, secret) = split_key(presented.trim())
            .ok_or_else(|| ApiError::unauthorized("invalid-credentials", "API key is malformed"))?;
        let record = match state.api_keys.get(id) {
            Some(record) => record,
            None => match state.store.api_key(id).await {
                Ok(record) => state.api_keys.put(record),
                Err(StoreError::NotFound { .. }) => {
                    return Err(ApiError::unauthorized("invalid-credentials", "API key is not valid"));
                }
                Err(e) => return Err(ApiError::internal(e)),
            },
        };
        if !constant_time_eq(&sha256(secret.as_bytes()), &record.secret_hash) || record.revoked_at.is_some() {
            return Err(ApiError::unauthorized("invalid-credentials", "API key is not valid"));
        }
        state.rate_limiter.check(id)?;
        let scopes = record.scopes.split(' ').filter_map(Scope::parse).collect();
        Ok(ApiCaller { key_id: record.id.clone(), scopes })
    }
}

/// API key records read in the last [`API_KEY_CACHE_TTL`]: the secret is still checked
/// on every request, but the record is not read again for each. A key revoked on this
/// instance is forgotten at once; on another instance, within the TTL.
#[derive(Debug, Default)]
pub struct ApiKeyCache {
    records: Mutex<HashMap<String, (Instant, Arc<ApiKeyRecord>)>>,
}

pub const API_KEY_CACHE_TTL: Duration = Duration::from_secs(1);
/// Records kept; beyond this the cache starts afresh.
const API_KEY_CACHE_MAX: usize = 10_000;

impl ApiKeyCache {
    fn get(&self, id: &str) -> Option<Arc<ApiKeyRecord>> {
        let records = self.lock();
        let (read_at, record) = records.get(id)?;
        (read_at.elapsed() < API_KEY_CACHE_TTL).then(|| Arc::clone(record))
    }

    fn put(&self, record: ApiKeyRecord) -> Arc<ApiKeyRecord> {
        let record = Arc::new(record);
        let mut records = self.lock();
        if records.len() >= API_KEY_CACHE_MAX {
            records.clear();
        }
        records.insert(record.id.clone(), (Instant::now(), Arc::clone(&record)));
        record
    }

    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Arc<ApiKeyRecord>)>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn split_key(presented: &str) -> Option<(&str, &str)> {
    let (id, secret) = presented.strip_prefix(KEY_PREFIX)?.split_once('_')?;
    let id_ok = !id.is_empty() && id.len() <= KEY_ID_CHARS_MAX && id.bytes().all(|b| b.is_ascii_alphanumeric());
    let secret_ok = !secret.is_empty() && secret.len() <= KEY_SECRET_CHARS_MAX;
    (id_ok && secret_ok).then_some((id, secret))
}

/// A freshly made API key: the record to store and the one-time plaintext.
#[derive(Debug)]
pub struct NewApiKey {
    pub record: ApiKeyRecord,
    pub plaintext: Zeroizing<String>,
}

pub fn new_api_key(
    rng: &SystemRandom,
    id: Option<&str>,
    scopes: &[Scope],
    label: &str,
    now: i64,
) -> Result<NewApiKey, ApiError> {
    let id = match id {
        Some(id) => id.to_owned(),
        None => vouch_proto::hex::encode(random_bytes::<8>(rng).map_err(ApiError::internal)?),
    };
    let secret = Zeroizing::new(b64::encode(random_bytes::<32>(rng).map_err(ApiError::internal)?));
    let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    Ok(NewApiKey {
        plaintext: Zeroizing::new(format!("{KEY_PREFIX}{id}_{}", secret.as_str())),
        record: ApiKeyRecord {
            id,
            secret_hash: sha256(secret.as_bytes()).to_vec(),
            scopes: scopes.join(" "),
            label: label.to_owned(),
            created_at: now,
            revoked_at: None,
        },
    })
}

/// Creates and audits an API key, and runs `also` with its id in the same transaction
/// (to record what the key belongs to); returns the plaintext, shown exactly once.
pub async fn create_api_key_in<F>(
    store: &Store,
    rng: &SystemRandom,
    scopes: &[Scope],
    label: &str,
    now: i64,
    actor: &str,
    also: F,
) -> Result<NewApiKey, ApiError>
where
    F: for<'t> FnOnce(&'t mut Tx, String) -> BoxFuture<'t, Result<(), StoreError>> + Send + 'static,
{
    let key = new_api_key(rng, None, scopes, label, now)?;
    insert_api_key(store, &key, now, actor, also).await?;
    Ok(key)
}

async fn insert_api_key<F>(store: &Store, key: &NewApiKey, now: i64, actor: &str, also: F) -> Result<(), StoreError>
where
    F: for<'t> FnOnce(&'t mut Tx, String) -> BoxFuture<'t, Result<(), StoreError>> + Send + 'static,
{
    let detail = serde_json::json!({ "scopes": key.record.scopes, "label": key.record.label });
    let entry = crate::audit::entry(now, actor, "api_key.created", &key.record.id, detail);
    let record = key.record.clone();
    store
        .write(move |tx| {
            Box::pin(async move {
                tx.insert_api_key(&record).await?;
                tx.append_audit(&entry).await?;
                also(tx, record.id).await
            })
        })
        .await
}

/// Creates and audits an API key; returns the plaintext, shown exactly once.
pub async fn create_api_key(
    store: &Store,
    rng: &SystemRandom,
    id: Option<&str>,
    scopes: &[Scope],
    label: &str,
    now: i64,
    actor: &str,
) -> Result<NewApiKey, ApiError> {
    let key = new_api_key(rng, id, scopes, label, now)?;
    insert_api_key(store, &key, now, actor, |_, _| Box::pin(async { Ok(()) })).await?;
    Ok(key)
}

/// Token buckets per API key. Per instance: with N instances a key gets up to N
/// times the rate, which bounds abuse without a shared counter on every request.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32) -> Self {
        RateLimiter { per_sec: f64::from(per_sec), burst: f64::from(burst), buckets: Mutex::new(HashMap::new()) }
    }

    pub fn check(&self, key: &str) -> ApiResult<()> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if buckets.len() >= RATE_BUCKETS_MAX && !buckets.contains_key(key) {
            let full_after_secs = self.burst / self.per_sec;
            buckets.retain(|_, b| now.duration_since(b.refilled_at).as_secs_f64() < full_after_secs);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: self.burst, refilled_at: now });
        let elapsed = now.duration_since(bucket.refilled_at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.refilled_at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let retry_after_secs = ((1.0 - bucket.tokens) / self.per_sec).ceil() as u64;
            Err(ApiError::rate_limited(retry_after_secs.max(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vouch_proto::crypto::SystemRandom;

    #[test]
    fn key_format_round_trip() {
        let rng = SystemRandom::new();
        let key = new_api_key(&rng, None, &[Scope::Provision], "ci", 1).unwrap();
        let (id, secret) = split_key(&key.plaintext).unwrap();
        assert_eq!(id, key.record.id);
        assert_eq!(sha256(secret.as_bytes()).to_vec(), key.record.secret_hash);
        assert_eq!(key.record.scopes, "provision");
    }

    #[test]
    fn malformed_keys_are_refused() {
        for presented in ["", "vouch_", "vouch_abc", "vouch__secret", "other_abc_def", "vouch_a-b_secret"] {
            assert!(split_key(presented).is_none(), "{presented}");
        }
        assert!(split_key(&format!("vouch_abc_{}", "s".repeat(65))).is_none());
    }

    #[test]
    fn rate_limiter_allows_burst_then_refuses() {
        let limiter = RateLimiter::new(1, 3);
        for _ in 0..3 {
            limiter.check("k").unwrap();
        }
        let refused = limiter.check("k").unwrap_err();
        assert_eq!(refused.status().as_u16(), 429);
        limiter.check("other").unwrap();
    }

    #[test]
    fn admin_satisfies_every_scope() {
        let admin = ApiCaller { key_id: "a".into(), scopes: vec![Scope::Admin] };
        admin.require(Scope::Terminal).unwrap();
        let provision = ApiCaller { key_id: "p".into(), scopes: vec![Scope::Provision] };
        provision.require(Scope::Provision).unwrap();
        assert_eq!(provision.require(Scope::Admin).unwrap_err().status().as_u16(), 403);
    }
}
