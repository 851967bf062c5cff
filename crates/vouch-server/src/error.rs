//! The one error type handlers return. 4xx answers are RFC 9457 problem documents with
//! a specific, safe message; 5xx answers are opaque and their cause is logged.

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vouch_store::StoreError;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";
const PROBLEM_TYPE_PREFIX: &str = "urn:vouch:problem:";

/// RFC 9457 problem details.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// `urn:vouch:problem:<reason>`; the reason is stable and machine-readable.
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// On the OAuth endpoints and DPoP-protected requests: the RFC 6749 section 5.2
    /// error code (`invalid_grant`, `invalid_dpop_proof`, `use_dpop_nonce`, …), so an
    /// off-the-shelf OAuth client reads the refusal as it expects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    reason: &'static str,
    detail: String,
    oauth_error: Option<&'static str>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, reason: &'static str, detail: impl Into<String>) -> Self {
        ApiError { status, reason, detail: detail.into(), oauth_error: None, headers: Vec::new() }
    }

    /// A refusal that also carries an RFC 6749 error code; the detail becomes its
    /// `error_description`.
    pub fn oauth(status: StatusCode, error: &'static str, reason: &'static str, detail: impl Into<String>) -> Self {
        ApiError { oauth_error: Some(error), ..Self::new(status, reason, detail) }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn bad_request(reason: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason, detail)
    }

    pub fn unauthorized(reason: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, reason, detail)
    }

    pub fn forbidden(reason: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, reason, detail)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", format!("{what} not found"))
    }

    pub fn conflict(reason: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, reason, detail)
    }

    pub fn unprocessable(reason: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, reason, detail)
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", "too many requests for this API key")
            .with_header(header::RETRY_AFTER, HeaderValue::from(retry_after_secs))
    }

    /// An internal failure: the cause goes to the log, the caller sees nothing of it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }

    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(%cause, "dependency unavailable");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "a dependency is unavailable")
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn reason(&self) -> &'static str {
        self.reason
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub fn oauth_error(&self) -> Option<&'static str> {
        self.oauth_error
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.reason, self.detail)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { what } => ApiError::not_found(what),
            StoreError::Conflict { what } => ApiError::conflict("conflict", format!("{what} already exists")),
            StoreError::MissingReference { what, missing } => {
                ApiError::unprocessable("unknown-reference", format!("{what} refers to an unknown {missing}"))
            }
            StoreError::StatusTransition { from, to } => {
                ApiError::conflict("invalid-transition", format!("a {from} device cannot become {to}"))
            }
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error").to_owned();
        let problem = Problem {
            problem_type: format!("{PROBLEM_TYPE_PREFIX}{}", self.reason),
            title,
            status: self.status.as_u16(),
            error: self.oauth_error.map(str::to_owned),
            error_description: self.oauth_error.map(|_| self.detail.clone()),
            detail: self.detail,
        };
        let mut response = (self.status, Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
