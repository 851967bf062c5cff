//! Request extractors whose rejections are problem documents, so a malformed body,
//! path or query gets the same RFC 9457 answer as every other error.

use axum::body::Bytes;
use axum::extract::rejection::{FormRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON object body with problem-document rejections. Stricter than `axum::Json`:
/// the body must be an object, because serde would otherwise accept an array in
/// place of a struct.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "expected Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", "request body is over the size limit")
            } else {
                ApiError::bad_request("unreadable-body", rejection.body_text())
            }
        })?;
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => {}
            Some(_) if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() => {
                return Err(ApiError::unprocessable("invalid-body", "the body must be a JSON object"));
            }
            Some(_) => return Err(ApiError::bad_request("malformed-json", "the body is not JSON")),
            None => return Err(ApiError::bad_request("malformed-json", "the body is empty, expected a JSON object")),
        }
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::unprocessable("invalid-body", e.to_string()),
            _ => ApiError::bad_request("malformed-json", e.to_string()),
        })
    }
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.get(essence.len().saturating_sub(5)..).is_some_and(|tail| tail.eq_ignore_ascii_case("+json"))
}

/// `axum::extract::Path` with problem-document rejections.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| ApiPath(value))
            .map_err(|e: PathRejection| ApiError::bad_request("invalid-path", e.body_text()))
    }
}

/// `axum::extract::Query` with problem-document rejections.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|e: QueryRejection| ApiError::bad_request("invalid-query", e.body_text()))
    }
}

/// An `application/x-www-form-urlencoded` body, as OAuth endpoints take (RFC 6749
/// section 3.2). Rejections are problem documents carrying the OAuth error code
/// `invalid_request`.
#[derive(Debug)]
pub struct ApiForm<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiForm<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let invalid = |status, reason, detail: String| ApiError::oauth(status, "invalid_request", reason, detail);
        axum::Form::<T>::from_request(req, state).await.map(|axum::Form(value)| ApiForm(value)).map_err(
            |rejection: FormRejection| match rejection {
                FormRejection::InvalidFormContentType(_) => invalid(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    "expected Content-Type: application/x-www-form-urlencoded".into(),
                ),
                other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => invalid(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    "request body is over the size limit".into(),
                ),
                other => invalid(StatusCode::BAD_REQUEST, "invalid-form", other.body_text()),
            },
        )
    }
}
