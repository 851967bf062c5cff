//! attest: tamper monitoring and attestation tickets. A device asks to be attested;
//! the server picks commands from its catalogue; the device runs them and signs what
//! it saw; the server appraises that against reference values, the device's history
//! and the Rego policy, and answers with a signed EAR ticket — approval or denial,
//! both stored and audited. Tickets are checked again at every use, against the
//! device's current status.

mod appraisal;
mod catalogue;
mod policy;

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_proto::attest::{
    self as wire, Appraisal, ChallengeRequestClaims, Command, EarStatus, Reason, TICKET_TYP, TicketClaims,
    TicketConfirmation, ValidityConditions, VerifierId,
};
use vouch_proto::crypto::{constant_time_eq, random_bytes};
use vouch_proto::jws::{Header, UnverifiedJws};
use vouch_proto::{Jwk, ProtoError, VerifyingKey, b64};
use vouch_store::{
    AttestationRecord, ChallengeRecord, ChallengeRejection, Device, DeviceStatus, ReferenceValues, StoreError,
};

pub use appraisal::ReferenceDocument;
pub use policy::{DEFAULT_POLICY, Policy, PolicyError};

use crate::AppState;
use crate::audit;
use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::registry::new_id;
use appraisal::{AppraisalInput, CoverageError, History, Observations, Signal};

const VERIFIER_DEVELOPER: &str = "vouch";
const REGIONS_MAX: usize = 32;
const TEXT_CHARS_MAX: usize = 128;
const HISTORY_LIMIT_MAX: u32 = 200;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_challenge))
        .routes(routes!(submit_evidence))
        .routes(routes!(verify_ticket))
        .routes(routes!(device_attestations))
        .routes(routes!(put_reference_values, list_reference_values))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    /// Compact JWS, `typ` `vouch-attestation-request+jwt`, signed by the device's
    /// identity key over `{device_id, iat}`.
    pub request: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChallengeView {
    pub attestation_id: String,
    /// Echo it in the evidence.
    pub nonce: String,
    /// What to run: `{id, kind, region?}`.
    #[schema(value_type = Vec<Object>)]
    pub commands: Vec<Command>,
    pub expires_at: i64,
}

/// Starts an attestation: answers with the commands the device must run.
#[utoipa::path(post, path = "/v1/attestations", tag = "attest", request_body = ChallengeRequest,
    responses((status = 201, body = ChallengeView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn create_challenge(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ChallengeRequest>,
) -> ApiResult<(StatusCode, Json<ChallengeView>)> {
    let jws =
        UnverifiedJws::parse(&body.request).map_err(|e| ApiError::bad_request("invalid-request", e.to_string()))?;
    let claims: ChallengeRequestClaims =
        wire::peek_claims(&jws).map_err(|e| ApiError::bad_request("invalid-request", e.to_string()))?;
    let device = known_device(&state, &claims.device_id).await?;
    wire::verify_challenge_request(&jws, &device_key(&device)?, &*state.clock, state.config.proof_iat_window_secs)
        .map_err(|e| signed_input_error("request", "invalid-request", e))?;
    require_active(&device)?;
    let reference = state.store.reference_values(&device.model, &device.firmware_version).await?;
    let regions: Vec<String> = match &reference {
        Some(values) => parse_reference(values)?.measurements.into_keys().collect(),
        None => Vec::new(),
    };
    let last_risk = state.store.attestations(&device.id, 1).await?.first().map(|a| a.risk);
    let commands =
        catalogue::choose(device.kind, &regions, last_risk, state.config.attest_spot_check_share, &state.rng);
    let now = state.now();
    let challenge = ChallengeRecord {
        id: new_id("att"),
        device_id: device.id,
        nonce: b64::encode(random_bytes::<32>(&*state.rng).map_err(ApiError::internal)?),
        commands: serde_json::to_string(&commands).map_err(ApiError::internal)?,
        created_at: now,
        expires_at: now + state.config.attest_challenge_ttl_secs,
        consumed_at: None,
    };
    let record = challenge.clone();
    state.store.write(move |tx| Box::pin(async move { tx.insert_challenge(&record).await })).await?;
    let view = ChallengeView {
        attestation_id: challenge.id,
        nonce: challenge.nonce,
        commands,
        expires_at: challenge.expires_at,
    };
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvidenceSubmission {
    /// Compact JWS, `typ` `vouch-evidence+jwt`, signed by the device's identity key.
    pub evidence: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReasonView {
    pub code: String,
    pub text: String,
}

/// The verdict: an approval or a denial, each with its signed ticket.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttestationVerdict {
    pub attestation_id: String,
    pub device_id: String,
    /// `affirming`, `warning` or `contraindicated`.
    pub status: String,
    /// EAR attestation result as a JWT (`typ` `vouch-ticket+jwt`).
    pub ticket: String,
    pub ticket_id: String,
    /// 0 (no risk) to 100.
    pub risk: u8,
    pub risk_signals: Vec<String>,
    pub reasons: Vec<ReasonView>,
    pub expires_at: i64,
}

/// Submits the signed results of the challenge's commands; answers with the verdict.
#[utoipa::path(post, path = "/v1/attestations/{attestation_id}/evidence", tag = "attest",
    request_body = EvidenceSubmission, params(("attestation_id" = String, Path)),
    responses((status = 200, body = AttestationVerdict), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn submit_evidence(
    State(state): State<AppState>,
    ApiPath(attestation_id): ApiPath<String>,
    ApiJson(body): ApiJson<EvidenceSubmission>,
) -> ApiResult<Json<AttestationVerdict>> {
    let challenge = match state.store.challenge(&attestation_id).await {
        Ok(challenge) => challenge,
        Err(StoreError::NotFound { .. }) => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown-attestation", "no such attestation"));
        }
        Err(e) => return Err(e.into()),
    };
    let now = state.now();
    match judge(&state, &challenge, &body.evidence, now).await {
        Ok(verdict) => Ok(Json(verdict)),
        Err(refusal) => {
            if refusal.status().is_client_error() {
                let detail =
                    json!({ "attestation_id": challenge.id, "reason": refusal.reason(), "detail": refusal.detail() });
                let entry = audit::entry(now, "device", "attestation.evidence_refused", &challenge.device_id, detail);
                if let Err(e) =
                    state.store.write(move |tx| Box::pin(async move { tx.append_audit(&entry).await })).await
                {
                    tracing::error!(error = %e, "could not audit refused evidence");
                }
            }
            Err(refusal)
        }
    }
}

async fn judge(
    state: &AppState,
    challenge: &ChallengeRecord,
    evidence: &str,
    now: i64,
) -> ApiResult<AttestationVerdict> {
    let device = state.store.device(&challenge.device_id).await?;
    require_active(&device)?;
    let device_key = device_key(&device)?;
    let jws = UnverifiedJws::parse(evidence).map_err(|e| ApiError::bad_request("invalid-evidence", e.to_string()))?;
    let claims =
        wire::verify_evidence(&jws, &device_key).map_err(|e| signed_input_error("evidence", "invalid-evidence", e))?;
    if claims.attestation_id != challenge.id || claims.device_id != device.id {
        return Err(ApiError::bad_request("evidence-mismatch", "the evidence names another attestation or device"));
    }
    if !constant_time_eq(claims.nonce.as_bytes(), challenge.nonce.as_bytes()) {
        return Err(ApiError::bad_request("nonce-mismatch", "the evidence does not echo this challenge's nonce"));
    }
    if challenge.consumed_at.is_some() {
        return Err(replayed());
    }
    if now > challenge.expires_at {
        return Err(late());
    }
    let commands: Vec<Command> = serde_json::from_str(&challenge.commands).map_err(ApiError::internal)?;
    appraisal::check_coverage(&commands, &claims.results).map_err(|e| match e {
        CoverageError::Missing { .. } => ApiError::unprocessable("incomplete-evidence", e.to_string()),
        other => ApiError::unprocessable("unexpected-result", other.to_string()),
    })?;

    let reference = match state.store.reference_values(&device.model, &claims.state.firmware_version).await? {
        Some(values) => Some(parse_reference(&values)?),
        None => None,
    };
    let last = state.store.attestations(&device.id, 1).await?.into_iter().next();
    let last_id = last.as_ref().map(|l| l.id.clone());
    let history = match last {
        Some(last) => Some(History {
            observations: serde_json::from_str::<Observations>(&last.observations).map_err(ApiError::internal)?,
            evidence_hash: last.evidence_hash,
            at: last.issued_at,
        }),
        None => None,
    };
    let outcome = appraisal::appraise(&AppraisalInput {
        evidence: &claims,
        registered_merchant_id: &device.merchant_id,
        reference: reference.as_ref(),
        history: history.as_ref(),
        now,
    });
    let decision = state
        .attest_policy
        .decide(&policy::PolicyInput {
            device: policy::PolicyDevice { kind: device.kind.as_str(), model: &device.model },
            signals: outcome
                .signals
                .iter()
                .map(|s| policy::PolicySignal { code: s.code, severity: s.severity.as_str() })
                .collect(),
            risk: outcome.risk,
        })
        .map_err(ApiError::internal)?;

    let reasons: Vec<Reason> =
        outcome.signals.iter().map(|s| Reason { code: s.code.to_owned(), text: s.text.clone() }).collect();
    let device_jwk = device_key.to_jwk();
    let ticket_claims = TicketClaims {
        eat_profile: wire::EAR_PROFILE.to_owned(),
        iss: state.config.issuer.clone(),
        sub: device.id.clone(),
        jti: new_id("tkt"),
        iat: now,
        exp: now + state.config.attest_ticket_ttl_secs,
        ear_verifier_id: VerifierId {
            developer: VERIFIER_DEVELOPER.to_owned(),
            build: format!("vouch {}", env!("CARGO_PKG_VERSION")),
        },
        ear_status: decision.status,
        submods: BTreeMap::from([(
            device.kind.as_str().to_owned(),
            Appraisal {
                ear_status: decision.status,
                ear_trustworthiness_vector: trust_vector(&outcome.signals),
                ear_appraisal_policy_id: decision.policy_ref(),
            },
        )]),
        cnf: TicketConfirmation { jkt: device_jwk.thumbprint(), jwk: device_jwk },
        risk: outcome.risk,
        risk_signals: outcome.signals.iter().map(|s| s.code.to_owned()).collect(),
        conditions: ValidityConditions { operations: decision.operations, max_amount_minor: decision.max_amount_minor },
        reasons,
        attestation_id: challenge.id.clone(),
    };
    let payload = serde_json::to_vec(&ticket_claims).map_err(ApiError::internal)?;
    let ticket = state.keys.sign_jws(Header::es256(TICKET_TYP), &payload).map_err(ApiError::internal)?;

    let status = decision.status.as_str();
    let reasons_json = serde_json::to_string(&ticket_claims.reasons).map_err(ApiError::internal)?;
    let mut record = AttestationRecord {
        id: challenge.id.clone(),
        device_id: device.id.clone(),
        status: status.to_owned(),
        risk: i64::from(outcome.risk),
        reasons: reasons_json,
        ticket_id: ticket_claims.jti.clone(),
        ticket: ticket.clone(),
        evidence_hash: wire::evidence_hash(evidence),
        observations: serde_json::to_string(&outcome.observations).map_err(ApiError::internal)?,
        issued_at: now,
        expires_at: ticket_claims.exp,
        audit_seq: 0,
    };
    let detail = json!({
        "attestation_id": challenge.id, "ticket_id": record.ticket_id, "risk": outcome.risk,
        "reasons": ticket_claims.risk_signals, "policy": decision_policy(&ticket_claims),
    });
    let entry =
        audit::entry(now, &format!("device:{}", device.id), &format!("attestation.{status}"), &device.id, detail);
    let written = state
        .store
        .write(move |tx| {
            Box::pin(async move {
                if let Err(rejection) = tx.consume_challenge(&record.id, now).await? {
                    return Ok(Err(Refusal::Challenge(rejection)));
                }
                // The appraisal judged the chain against `last_id`; another answer
                // landing since then would make that judgement stale.
                if tx.latest_attestation_id(&record.device_id).await? != last_id {
                    return Ok(Err(Refusal::ChainMoved));
                }
                record.audit_seq = tx.append_audit(&entry).await?;
                tx.insert_attestation(&record).await?;
                Ok(Ok(()))
            })
        })
        .await?;
    match written {
        Ok(()) => {}
        Err(Refusal::Challenge(ChallengeRejection::AlreadyAnswered)) => return Err(replayed()),
        Err(Refusal::Challenge(ChallengeRejection::Expired)) => return Err(late()),
        Err(Refusal::Challenge(ChallengeRejection::Unknown)) => return Err(ApiError::not_found("attestation")),
        Err(Refusal::ChainMoved) => {
            return Err(ApiError::conflict(
                "concurrent-attestation",
                "another attestation of this device was answered meanwhile; request a new challenge",
            ));
        }
    }
    Ok(AttestationVerdict {
        attestation_id: challenge.id.clone(),
        device_id: device.id,
        status: status.to_owned(),
        ticket,
        ticket_id: ticket_claims.jti,
        risk: outcome.risk,
        risk_signals: ticket_claims.risk_signals,
        reasons: ticket_claims.reasons.into_iter().map(|r| ReasonView { code: r.code, text: r.text }).collect(),
        expires_at: ticket_claims.exp,
    })
}

/// Why the final write refused evidence the appraisal accepted.
enum Refusal {
    Challenge(ChallengeRejection),
    ChainMoved,
}

fn decision_policy(claims: &TicketClaims) -> Option<&str> {
    claims.submods.values().next().map(|a| a.ear_appraisal_policy_id.as_str())
}

fn replayed() -> ApiError {
    ApiError::conflict("replayed-evidence", "this attestation has already been answered")
}

fn late() -> ApiError {
    ApiError::bad_request("late-evidence", "the challenge expired before the evidence arrived")
}

/// AR4SI trustworthiness claims (draft-ietf-rats-ar4si): 2 affirming, 32 warning,
/// 96 contraindicated, per component the signals speak about.
fn trust_vector(signals: &[Signal]) -> BTreeMap<String, i8> {
    const AFFIRMING: i8 = 2;
    const WARNING: i8 = 32;
    const CONTRAINDICATED: i8 = 96;
    let worst = |codes: &[&str], warning_codes: &[&str]| {
        if signals.iter().any(|s| codes.contains(&s.code)) {
            CONTRAINDICATED
        } else if signals.iter().any(|s| warning_codes.contains(&s.code)) {
            WARNING
        } else {
            AFFIRMING
        }
    };
    BTreeMap::from([
        ("instance-identity".to_owned(), AFFIRMING),
        (
            "configuration".to_owned(),
            worst(&["unknown_firmware", "merchant_mismatch"], &["os_patch_outdated", "reader_firmware_not_allowed"]),
        ),
        (
            "executables".to_owned(),
            worst(&["measurement_mismatch", "hooked", "measurement_changed_without_update", "firmware_downgrade"], &[]),
        ),
        ("hardware".to_owned(), worst(&["tamper_switch_open", "emulator"], &[])),
        ("runtime-opaque".to_owned(), worst(&["rooted", "debugger_attached"], &[])),
        ("sourced-data".to_owned(), worst(&["impossible_travel", "invalid_location", "broken_state_chain"], &[])),
    ])
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketToVerify {
    pub ticket: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TicketVerification {
    /// Authentic, unexpired, held by the device's current key, the device still active
    /// and the verdict not `contraindicated`.
    pub valid: bool,
    /// Why not, when not: `invalid-ticket`, `expired`, `unknown-device`,
    /// `device-not-active`, `key-mismatch`, `contraindicated`.
    pub reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub claims: Option<TicketClaims>,
}

/// Checks a ticket for a relying party, against the device's status now.
#[utoipa::path(post, path = "/v1/tickets/verify", tag = "attest", request_body = TicketToVerify,
    security(("api_key" = [])),
    responses((status = 200, body = TicketVerification), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn verify_ticket(
    State(state): State<AppState>,
    _caller: ApiCaller,
    ApiJson(body): ApiJson<TicketToVerify>,
) -> ApiResult<Json<TicketVerification>> {
    let verification = match check_ticket(&state, &body.ticket).await? {
        Ok(claims) if claims.ear_status == EarStatus::Contraindicated => {
            TicketVerification { valid: false, reason: Some("contraindicated".into()), claims: Some(claims) }
        }
        Ok(claims) => TicketVerification { valid: true, reason: None, claims: Some(claims) },
        Err(reason) => TicketVerification { valid: false, reason: Some(reason.to_owned()), claims: None },
    };
    Ok(Json(verification))
}

/// The check every capability makes before it trusts a ticket: signature by a
/// published key, expiry, and — now, not at issue — the device active and still
/// holding the key the ticket names. The inner error is the refusal reason. A phone
/// calling with a token issued on its ticket is checked against what the ticket
/// allowed by [`crate::token::DpopCaller::require_ticket`].
pub async fn check_ticket(state: &AppState, token: &str) -> ApiResult<Result<TicketClaims, &'static str>> {
    let claims = match wire::verify_ticket(token, |kid| state.keys.verifying_key(kid), &*state.clock) {
        Ok(claims) => claims,
        Err(ProtoError::Expired { .. }) => return Ok(Err("expired")),
        Err(_) => return Ok(Err("invalid-ticket")),
    };
    let device = match state.store.device(&claims.sub).await {
        Ok(device) => device,
        Err(StoreError::NotFound { .. }) => return Ok(Err("unknown-device")),
        Err(e) => return Err(e.into()),
    };
    if device.status != DeviceStatus::Active {
        return Ok(Err("device-not-active"));
    }
    if !constant_time_eq(claims.cnf.jkt.as_bytes(), device.key_thumbprint.as_bytes()) {
        return Ok(Err("key-mismatch"));
    }
    Ok(Ok(claims))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttestationSummary {
    pub attestation_id: String,
    pub status: String,
    pub risk: i64,
    pub reasons: Vec<ReasonView>,
    pub ticket_id: String,
    pub issued_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// 1 to 200 (default 50).
    pub limit: Option<u32>,
}

/// A device's attestation history, newest first.
#[utoipa::path(get, path = "/v1/devices/{device_id}/attestations", tag = "attest",
    params(("device_id" = String, Path), HistoryQuery), security(("api_key" = ["admin"])),
    responses((status = 200, body = [AttestationSummary]), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn device_attestations(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiPath(device_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<Vec<AttestationSummary>>> {
    caller.require(Scope::Admin)?;
    let limit = match query.limit {
        None => 50,
        Some(n @ 1..=HISTORY_LIMIT_MAX) => n,
        Some(n) => {
            return Err(ApiError::bad_request(
                "invalid-query",
                format!("limit {n} is outside 1..={HISTORY_LIMIT_MAX}"),
            ));
        }
    };
    state.store.device(&device_id).await?;
    let records = state.store.attestations(&device_id, limit).await?;
    let mut summaries = Vec::with_capacity(records.len());
    for record in records {
        summaries.push(AttestationSummary {
            reasons: serde_json::from_str(&record.reasons).map_err(ApiError::internal)?,
            attestation_id: record.id,
            status: record.status,
            risk: record.risk,
            ticket_id: record.ticket_id,
            issued_at: record.issued_at,
            expires_at: record.expires_at,
        });
    }
    Ok(Json(summaries))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReferenceValuesView {
    pub model: String,
    pub firmware_version: String,
    // Inlined, so the document lists one object with every property; a reference
    // would make it `allOf` two closed objects, which no body could satisfy.
    #[serde(flatten)]
    #[schema(inline)]
    pub values: ReferenceDocument,
}

/// Sets the known-good values for one model and firmware version.
#[utoipa::path(put, path = "/v1/reference-values", tag = "attest", request_body = ReferenceValuesView,
    security(("api_key" = ["admin"])),
    responses((status = 200, body = ReferenceValuesView), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn put_reference_values(
    State(state): State<AppState>,
    caller: ApiCaller,
    ApiJson(body): ApiJson<ReferenceValuesView>,
) -> ApiResult<Json<ReferenceValuesView>> {
    caller.require(Scope::Admin)?;
    validate_reference(&body)?;
    let now = state.now();
    let values = ReferenceValues {
        model: body.model.clone(),
        firmware_version: body.firmware_version.clone(),
        document: serde_json::to_string(&body.values).map_err(ApiError::internal)?,
        updated_at: now,
    };
    let detail = json!({ "model": body.model, "firmware_version": body.firmware_version, "values": body.values });
    let subject = format!("{}@{}", body.model, body.firmware_version);
    let entry = audit::entry(now, &caller.actor(), "reference_values.updated", &subject, detail);
    state
        .store
        .write(move |tx| {
            Box::pin(async move {
                tx.put_reference_values(&values).await?;
                tx.append_audit(&entry).await
            })
        })
        .await?;
    Ok(Json(body))
}

/// Lists reference values by model and firmware.
#[utoipa::path(get, path = "/v1/reference-values", tag = "attest", security(("api_key" = ["admin"])),
    responses((status = 200, body = [ReferenceValuesView]), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
async fn list_reference_values(
    State(state): State<AppState>,
    caller: ApiCaller,
) -> ApiResult<Json<Vec<ReferenceValuesView>>> {
    caller.require(Scope::Admin)?;
    let mut views = Vec::new();
    for values in state.store.all_reference_values().await? {
        views.push(ReferenceValuesView {
            values: parse_reference(&values)?,
            model: values.model,
            firmware_version: values.firmware_version,
        });
    }
    Ok(Json(views))
}

fn validate_reference(view: &ReferenceValuesView) -> ApiResult<()> {
    let invalid = |detail: String| Err(ApiError::unprocessable("invalid-field", detail));
    for (name, value) in [("model", &view.model), ("firmware_version", &view.firmware_version)] {
        if value.trim().is_empty() || value.chars().count() > TEXT_CHARS_MAX || value.chars().any(char::is_control) {
            return invalid(format!("{name} must be 1 to {TEXT_CHARS_MAX} printable characters"));
        }
    }
    if view.values.measurements.is_empty() || view.values.measurements.len() > REGIONS_MAX {
        return invalid(format!("measurements must name 1 to {REGIONS_MAX} regions"));
    }
    for (region, digest) in &view.values.measurements {
        if region.is_empty() || region.len() > TEXT_CHARS_MAX || !region.bytes().all(|b| b.is_ascii_graphic()) {
            return invalid(format!("region names must be 1 to {TEXT_CHARS_MAX} visible ASCII characters"));
        }
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return invalid(format!("measurement of {region} must be a SHA-256 in 64 hex digits"));
        }
    }
    if let Some(level) = &view.values.min_os_patch_level
        && !appraisal::is_calendar_date(level)
    {
        return invalid("min_os_patch_level must be a date, YYYY-MM-DD".into());
    }
    if view.values.reader_firmware.len() > REGIONS_MAX
        || view.values.reader_firmware.iter().any(|v| v.is_empty() || v.len() > TEXT_CHARS_MAX)
    {
        return invalid(format!(
            "reader_firmware lists at most {REGIONS_MAX} versions of 1 to {TEXT_CHARS_MAX} characters"
        ));
    }
    Ok(())
}

fn parse_reference(values: &ReferenceValues) -> ApiResult<ReferenceDocument> {
    serde_json::from_str(&values.document).map_err(ApiError::internal)
}

async fn known_device(state: &AppState, device_id: &str) -> ApiResult<Device> {
    match state.store.device(device_id).await {
        Ok(device) => Ok(device),
        Err(StoreError::NotFound { .. }) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "unknown-device", "no device is enrolled with this id"))
        }
        Err(e) => Err(e.into()),
    }
}

fn require_active(device: &Device) -> ApiResult<()> {
    if device.status == DeviceStatus::Active {
        Ok(())
    } else {
        Err(ApiError::forbidden("device-not-active", format!("the device is {}", device.status.as_str())))
    }
}

pub(crate) fn device_key(device: &Device) -> ApiResult<VerifyingKey> {
    let jwk: Jwk = serde_json::from_str(&device.public_jwk).map_err(ApiError::internal)?;
    jwk.verifying_key().map_err(ApiError::internal)
}

fn signed_input_error(what: &'static str, invalid_reason: &'static str, e: ProtoError) -> ApiError {
    match e {
        ProtoError::BadSignature => {
            ApiError::bad_request("bad-signature", format!("the {what} is not signed by the device's enrolled key"))
        }
        ProtoError::StaleIssuedAt { .. } => ApiError::bad_request("stale-request", e.to_string()),
        other => ApiError::bad_request(invalid_reason, format!("{what}: {other}")),
    }
}
