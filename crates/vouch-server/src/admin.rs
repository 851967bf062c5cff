//! Administration over HTTP: API keys, signing-key rotation and audit verification.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::audit::{self, AuditVerification};
use crate::auth::{self, ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath};

const LABEL_CHARS_MAX: usize = 128;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_api_key))
        .routes(routes!(revoke_api_key))
        .routes(routes!(rotate_keys))
        .routes(routes!(verify_audit))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    pub scopes: Vec<Scope>,
    pub label: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    pub key_id: String,
    /// The key itself. Shown once; only its hash is stored.
    pub api_key: String,
    pub scopes: Vec<Scope>,
}

/// Creates a scoped API key.
#[utoipa::path(post, path = "/v1/api-keys", tag = "admin", request_body = NewApiKey, security(("api_key" = ["admin"])),
    responses((status = 201, body = CreatedApiKey), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn create_api_key(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<NewApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    caller.require(Scope::Admin)?;
    if body.scopes.is_empty() {
        return Err(ApiError::unprocessable("invalid-field", "scopes must name at least one scope"));
    }
    if body.label.trim().is_empty() || body.label.chars().count() > LABEL_CHARS_MAX {
        return Err(ApiError::unprocessable(
            "invalid-field",
            format!("label must be 1 to {LABEL_CHARS_MAX} characters"),
        ));
    }
    let key =
        auth::create_api_key(&state.store, &state.rng, None, &body.scopes, &body.label, state.now(), &caller.actor())
            .await?;
    let created =
        CreatedApiKey { key_id: key.record.id.clone(), api_key: key.plaintext.to_string(), scopes: body.scopes };
    Ok((StatusCode::CREATED, Json(created)))
}

/// Revokes an API key at once.
#[utoipa::path(delete, path = "/v1/api-keys/{key_id}", tag = "admin", params(("key_id" = String, Path)),
    security(("api_key" = ["admin"])),
    responses((status = 204), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn revoke_api_key(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(key_id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    caller.require(Scope::Admin)?;
    let now = state.now();
    let entry = audit::entry(now, &caller.actor(), "api_key.revoked", &key_id, serde_json::json!({}));
    let revoked = key_id.clone();
    state
        .store
        .write(move |tx| {
            Box::pin(async move {
                tx.revoke_api_key(&revoked, now).await?;
                tx.append_audit(&entry).await
            })
        })
        .await?;
    state.api_keys.forget(&key_id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RotatedKey {
    /// The new active signing key.
    pub kid: String,
}

/// Rotates the server signing key; the old key stays published until what it
/// signed has expired.
#[utoipa::path(post, path = "/v1/keys/rotate", tag = "admin", security(("api_key" = ["admin"])),
    responses((status = 200, body = RotatedKey), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn rotate_keys(State(state): State<AppState>, caller: ApiCaller) -> ApiResult<Json<RotatedKey>> {
    caller.require(Scope::Admin)?;
    let now = state.now();
    let kid = state.keys.rotate(now, state.config.key_overlap_secs(), &caller.actor()).await.map_err(|e| match e {
        crate::keys::KeyError::Store(vouch_store::StoreError::Conflict { .. }) => {
            ApiError::conflict("concurrent-rotation", "another rotation is in progress; retry")
        }
        other => ApiError::internal(other),
    })?;
    Ok(Json(RotatedKey { kid }))
}

/// Recomputes the audit hash chain and names the first broken row.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "admin", security(("api_key" = ["admin"])),
    responses((status = 200, body = AuditVerification), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn verify_audit(State(state): State<AppState>, caller: ApiCaller) -> ApiResult<Json<AuditVerification>> {
    caller.require(Scope::Admin)?;
    Ok(Json(audit::verify(&state.store).await?))
}
