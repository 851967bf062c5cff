//! Operational endpoints: liveness, readiness, metrics, the OpenAPI document and the
//! JWK Set of the server's signing keys.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ApiError, ApiResult, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz)).routes(routes!(metrics)).routes(routes!(jwks))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` when the check passed.
    pub status: &'static str,
}

/// Liveness: the process is up and serving.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, body = Health),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
async fn readyz(State(state): State<AppState>) -> ApiResult<axum::Json<Health>> {
    state.store.ping().await.map_err(ApiError::unavailable)?;
    Ok(axum::Json(Health { status: "ok" }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.encode())
}

/// The server's public signing keys (RFC 7517), including retired keys still in
/// their overlap window.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "ops", responses(
    (status = 200, description = "JWK Set", body = Object, content_type = "application/jwk-set+json"),
))]
async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    let body = serde_json::to_string(&state.keys.jwk_set()).unwrap_or_else(|_| "{\"keys\":[]}".into());
    ([(header::CONTENT_TYPE, "application/jwk-set+json"), (header::CACHE_CONTROL, "public, max-age=60")], body)
}
