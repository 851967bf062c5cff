//! Device makers' CA certificates, and the checks of the chains secure elements present.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use vouch_proto::hex;
use vouch_proto::x509::{self, VerifiedChain};
use vouch_store::TsmIssuer;

use super::refused;
use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::registry::{NAME_CHARS_MAX, check_text, new_id};
use crate::{AppState, audit};

/// A PEM chain no longer than this is read at all.
const CHAIN_PEM_CHARS_MAX: usize = 16 * 1024;
/// A serial as OpenSSL prints it: at most 20 octets (RFC 5280 4.1.2.2) in hex with colons.
const SERIAL_TEXT_CHARS_MAX: usize = 64;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewIssuer {
    pub name: String,
    /// The device maker's CA certificate, PEM (one `CERTIFICATE` block).
    pub certificate_pem: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuerView {
    pub issuer_id: String,
    pub name: String,
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the certificate's DER, hex.
    pub fingerprint_sha256: String,
    pub created_at: i64,
}

impl From<&TsmIssuer> for IssuerView {
    fn from(issuer: &TsmIssuer) -> Self {
        IssuerView {
            issuer_id: issuer.id.clone(),
            name: issuer.name.clone(),
            subject: issuer.subject.clone(),
            not_before: issuer.not_before,
            not_after: issuer.not_after,
            fingerprint_sha256: hex::encode(&issuer.fingerprint),
            created_at: issuer.created_at,
        }
    }
}

/// Registers a device maker's CA: secure elements whose chains end at it can be
/// provisioned.
#[utoipa::path(post, path = "/v1/tsm/issuers", tag = "tsm", request_body = NewIssuer,
    security(("api_key" = ["admin"])),
    responses((status = 201, body = IssuerView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn register_issuer(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<NewIssuer>,
) -> ApiResult<(StatusCode, Json<IssuerView>)> {
    caller.require(Scope::Admin)?;
    check_text("name", &body.name, NAME_CHARS_MAX)?;
    let mut certificates = pem_chain("certificate_pem", &body.certificate_pem)?;
    if certificates.len() != 1 {
        return Err(ApiError::unprocessable(
            "invalid-field",
            format!("certificate_pem holds {} certificates, expected exactly one", certificates.len()),
        ));
    }
    let der = certificates.remove(0);
    let now = state.now();
    let checked = x509::check_issuer(&der, now).map_err(refused)?;
    let issuer = TsmIssuer {
        id: new_id("iss"),
        name: body.name,
        subject: checked.subject,
        certificate_der: der,
        fingerprint: checked.fingerprint.to_vec(),
        not_before: checked.not_before,
        not_after: checked.not_after,
        created_at: now,
    };
    let detail = json!({ "name": issuer.name, "subject": issuer.subject, "fingerprint_sha256": hex::encode(&issuer.fingerprint) });
    let entry = audit::entry(now, &caller.actor(), "tsm.issuer_registered", &issuer.id, detail);
    let record = issuer.clone();
    let inserted = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if !tx.insert_tsm_issuer(&record).await? {
                    return Ok(false);
                }
                tx.append_audit(&entry).await?;
                Ok(true)
            })
        })
        .await?;
    if !inserted {
        return Err(ApiError::conflict("issuer-exists", "this CA certificate is already registered"));
    }
    Ok((StatusCode::CREATED, Json(IssuerView::from(&issuer))))
}

/// Lists the registered device makers' CAs.
#[utoipa::path(get, path = "/v1/tsm/issuers", tag = "tsm", security(("api_key" = ["admin"])),
    responses((status = 200, body = [IssuerView]), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn list_issuers(State(state): State<AppState>, caller: ApiCaller) -> ApiResult<Json<Vec<IssuerView>>> {
    caller.require(Scope::Admin)?;
    Ok(Json(state.store.tsm_issuers().await?.iter().map(IssuerView::from).collect()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRevocation {
    /// The serial number of a certificate issued under this CA (or under one of its
    /// intermediates), hex.
    pub serial: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevocationView {
    pub issuer_id: String,
    pub serial: String,
    pub revoked_at: i64,
}

/// Revokes a secure element's (or an intermediate's) certificate: chains holding it
/// are refused from now on.
#[utoipa::path(post, path = "/v1/tsm/issuers/{issuer_id}/revocations", tag = "tsm", request_body = NewRevocation,
    params(("issuer_id" = String, Path)), security(("api_key" = ["admin"])),
    responses((status = 201, body = RevocationView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn revoke_certificate(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(issuer_id): ApiPath<String>,
    ApiJson(body): ApiJson<NewRevocation>,
) -> ApiResult<(StatusCode, Json<RevocationView>)> {
    caller.require(Scope::Admin)?;
    if body.serial.len() > SERIAL_TEXT_CHARS_MAX {
        return Err(ApiError::unprocessable(
            "invalid-serial",
            format!("serial is over {SERIAL_TEXT_CHARS_MAX} characters"),
        ));
    }
    let serial =
        x509::canonical_serial(&body.serial).map_err(|e| ApiError::unprocessable("invalid-serial", e.to_string()))?;
    if !state.store.tsm_issuers().await?.iter().any(|issuer| issuer.id == issuer_id) {
        return Err(ApiError::not_found("issuer"));
    }
    let now = state.now();
    let entry = audit::entry(now, &caller.actor(), "tsm.certificate_revoked", &issuer_id, json!({ "serial": serial }));
    let revocation = RevocationView { issuer_id, serial, revoked_at: now };
    let (issuer_id, serial) = (revocation.issuer_id.clone(), revocation.serial.clone());
    let inserted = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if !tx.insert_tsm_revocation(&issuer_id, &serial, now).await? {
                    return Ok(false);
                }
                tx.append_audit(&entry).await?;
                Ok(true)
            })
        })
        .await?;
    if !inserted {
        return Err(ApiError::conflict("already-revoked", "this serial is already revoked under this issuer"));
    }
    Ok((StatusCode::CREATED, Json(revocation)))
}

/// A secure element's chain checked against the registered issuers now: signatures,
/// validity, key usage, and none of its certificates revoked.
pub(super) async fn verified_secure_element(
    state: &AppState,
    field: &'static str,
    chain_pem: &str,
) -> ApiResult<(VerifiedChain, TsmIssuer)> {
    let chain = pem_chain(field, chain_pem)?;
    let now = state.now();
    let mut issuers = state.store.tsm_issuers().await?;
    // A maker renews its CA certificate under the same name and key, and the chain check
    // takes the first registered CA that signed the chain: those valid now go first, so
    // one that ran out is what a refusal names only when no other signed the chain.
    issuers.sort_by_key(|issuer| !(issuer.not_before..=issuer.not_after).contains(&now));
    let anchors: Vec<&[u8]> = issuers.iter().map(|issuer| issuer.certificate_der.as_slice()).collect();
    let verified = x509::verify_chain(&chain, &anchors, now).map_err(refused)?;
    let issuer = issuers
        .get(verified.issuer)
        .cloned()
        .ok_or_else(|| ApiError::internal("the verified chain names an issuer outside the list"))?;
    // A serial names one certificate per issuer name (RFC 5280 4.1.2.2), so what was
    // revoked under one registration of a CA stays revoked under its renewals.
    for same_ca in issuers.iter().filter(|other| other.subject == issuer.subject) {
        let revoked = state.store.tsm_revoked(&same_ca.id, &verified.serials).await?;
        if let Some(serial) = revoked.first() {
            return Err(ApiError::forbidden(
                "certificate-revoked",
                format!("certificate {serial} of {field} is revoked"),
            ));
        }
    }
    Ok((verified, issuer))
}

fn pem_chain(field: &str, text: &str) -> ApiResult<Vec<Vec<u8>>> {
    if text.len() > CHAIN_PEM_CHARS_MAX {
        return Err(ApiError::unprocessable(
            "invalid-field",
            format!("{field} is {} characters, over the limit of {CHAIN_PEM_CHARS_MAX}", text.len()),
        ));
    }
    x509::pem_certificates(text).map_err(|e| ApiError::unprocessable("malformed-certificate", format!("{field}: {e}")))
}
