//! Payment applications: manifests signed with the server's key, and their delivery to
//! a phone's app secure element over a second channel sealed to that SE's key.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use vouch_proto::b64;
use vouch_proto::hpke::HpkePublicKey;
use vouch_proto::jws::Header;
use vouch_proto::tsm::{AppManifest, MANIFEST_TYP, ManifestClaims, seal_app_delivery};
use vouch_store::TsmManifest;

use super::issuers::verified_secure_element;
use super::provision::require_own_phone;
use super::refused;
use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::registry::new_id;
use crate::token::DpopCaller;
use crate::{AppState, audit};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewManifest {
    /// 1 to 64 of `A-Z a-z 0-9 . _ -`.
    pub app_id: String,
    /// Releases of an app are numbered upwards from 1; an app SE never installs an
    /// older one over a newer.
    pub version: u32,
    /// SHA-256 of the application code, lowercase hex.
    pub code_sha256: String,
    /// The code's size in bytes.
    pub code_size: u64,
    /// The secure element profile the code runs on, e.g. `javacard-3.1`.
    pub se_profile: String,
}

impl From<NewManifest> for AppManifest {
    fn from(m: NewManifest) -> Self {
        AppManifest {
            app_id: m.app_id,
            version: m.version,
            code_sha256: m.code_sha256,
            code_size: m.code_size,
            se_profile: m.se_profile,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ManifestView {
    pub manifest_id: String,
    pub app_id: String,
    pub version: u32,
    pub code_sha256: String,
    pub code_size: u64,
    pub se_profile: String,
    /// JWS (ES256, the server's key, `typ` `vouch-tsm-manifest+jwt`).
    pub manifest: String,
    pub created_at: i64,
}

impl TryFrom<&TsmManifest> for ManifestView {
    type Error = ApiError;

    fn try_from(m: &TsmManifest) -> ApiResult<Self> {
        let out_of_range =
            |field: &str| ApiError::internal(format!("stored manifest {} has {field} out of range", m.id));
        Ok(ManifestView {
            manifest_id: m.id.clone(),
            app_id: m.app_id.clone(),
            version: u32::try_from(m.version).map_err(|_| out_of_range("version"))?,
            code_sha256: m.code_sha256.clone(),
            code_size: u64::try_from(m.code_size).map_err(|_| out_of_range("code_size"))?,
            se_profile: m.se_profile.clone(),
            manifest: m.signed.clone(),
            created_at: m.created_at,
        })
    }
}

/// Signs a payment application release with the server's key.
#[utoipa::path(post, path = "/v1/tsm/apps", tag = "tsm", request_body = NewManifest,
    security(("api_key" = ["admin"])),
    responses((status = 201, body = ManifestView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn sign_manifest(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<NewManifest>,
) -> ApiResult<(StatusCode, Json<ManifestView>)> {
    caller.require(Scope::Admin)?;
    let manifest = AppManifest::from(body);
    manifest.check().map_err(refused)?;
    let now = state.now();
    let claims = ManifestClaims {
        iss: state.config.issuer.clone(),
        iat: now,
        manifest_id: new_id("man"),
        manifest: manifest.clone(),
    };
    let payload = serde_json::to_vec(&claims).map_err(ApiError::internal)?;
    let signed = state.keys.sign_jws(Header::es256(MANIFEST_TYP), &payload).map_err(ApiError::internal)?;
    let record = TsmManifest {
        id: claims.manifest_id.clone(),
        app_id: manifest.app_id.clone(),
        version: i64::from(manifest.version),
        code_sha256: manifest.code_sha256.clone(),
        code_size: i64::try_from(manifest.code_size).map_err(ApiError::internal)?,
        se_profile: manifest.se_profile.clone(),
        signed,
        created_at: now,
    };
    let detail = json!({ "app_id": record.app_id, "version": record.version, "code_sha256": record.code_sha256 });
    let entry = audit::entry(now, &caller.actor(), "tsm.app_signed", &record.id, detail);
    let view = ManifestView::try_from(&record)?;
    let inserted = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if !tx.insert_tsm_manifest(&record).await? {
                    return Ok(false);
                }
                tx.append_audit(&entry).await?;
                Ok(true)
            })
        })
        .await?;
    if !inserted {
        return Err(ApiError::conflict(
            "manifest-exists",
            format!("{} version {} is already signed", view.app_id, view.version),
        ));
    }
    Ok((StatusCode::CREATED, Json(view)))
}

/// Lists signed payment application releases.
#[utoipa::path(get, path = "/v1/tsm/apps", tag = "tsm", security(("api_key" = ["admin"])),
    responses((status = 200, body = [ManifestView]), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn list_manifests(
    State(state): State<AppState>,
    caller: ApiCaller,
) -> ApiResult<Json<Vec<ManifestView>>> {
    caller.require(Scope::Admin)?;
    let manifests = state.store.tsm_manifests().await?;
    Ok(Json(manifests.iter().map(ManifestView::try_from).collect::<ApiResult<_>>()?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppDeliveryRequest {
    pub app_id: String,
    /// The app secure element's certificate chain, PEM, leaf first.
    pub app_se_chain_pem: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AppDelivery {
    pub manifest_id: String,
    pub app_id: String,
    pub version: u32,
    /// HPKE encapsulated key (base64url) and ciphertext (base64url) of the manifest's JWS,
    /// sealed to the app SE's certified key.
    pub enc: String,
    pub ciphertext: String,
}

/// The newest release of an app for the calling phone's app secure element, sealed to
/// the key of its certified chain. The phone's crypto SE must be provisioned first, and
/// the app SE must be another secure element than it.
#[utoipa::path(post, path = "/v1/tsm/devices/{device_id}/app", tag = "tsm", request_body = AppDeliveryRequest,
    params(("device_id" = String, Path), ("DPoP" = String, Header, description = "DPoP proof (RFC 9449) of the phone")),
    security(("dpop" = [])),
    responses((status = 200, body = AppDelivery), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn deliver_app(
    State(state): State<AppState>,
    caller: DpopCaller,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(body): ApiJson<AppDeliveryRequest>,
) -> ApiResult<Json<AppDelivery>> {
    require_own_phone(&state, &caller, &device_id).await?;
    let Some(registration) = state.store.tsm_registration(&device_id).await? else {
        return Err(ApiError::conflict("not-provisioned", "the device's crypto secure element is not provisioned"));
    };
    let (chain, _) = verified_secure_element(&state, "app_se_chain_pem", &body.app_se_chain_pem).await?;
    if chain.leaf_key.as_slice() == registration.se_public_key.as_slice() {
        return Err(ApiError::unprocessable(
            "same-secure-element",
            "the app secure element presents the crypto secure element's key; they must be separate",
        ));
    }
    let Some(manifest) = state.store.latest_tsm_manifest(&body.app_id).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown-app",
            format!("no release of {} is signed", body.app_id),
        ));
    };
    let view = ManifestView::try_from(&manifest)?;
    let app_se_key = HpkePublicKey::from_sec1(&chain.leaf_key).map_err(ApiError::internal)?;
    let sealed =
        seal_app_delivery(&app_se_key, &device_id, &view.manifest_id, &view.manifest, &*state.rng).map_err(refused)?;
    let now = state.now();
    let detail = json!({ "manifest_id": view.manifest_id, "app_id": view.app_id, "version": view.version,
                         "app_se_serial": chain.serials.first() });
    let entry = audit::entry(now, &format!("device:{device_id}"), "tsm.app_delivered", &device_id, detail);
    state.store.write(move |tx| Box::pin(async move { tx.append_audit(&entry).await })).await?;
    Ok(Json(AppDelivery {
        manifest_id: view.manifest_id,
        app_id: view.app_id,
        version: view.version,
        enc: b64::encode(sealed.enc),
        ciphertext: b64::encode(&sealed.ciphertext),
    }))
}
