//! Attestation (RFC 9334 roles: the device is the attester, Vouch the verifier):
//! the challenge request, the command catalogue, the evidence the device signs, and
//! the attestation ticket, an EAR (draft-ietf-rats-ear) signed as a JWT.
//!
//! Wire format: JWS compact (ES256). The device signs requests and evidence with its
//! enrolled identity key; the server signs tickets with its published key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::jws::{Header, UnverifiedJws};
use crate::{Clock, Jwk, ProtoError, SigningKey, VerifyingKey, b64, crypto::SecureRandom, crypto::sha256, jwt};

pub const CHALLENGE_REQUEST_TYP: &str = "vouch-attestation-request+jwt";
pub const EVIDENCE_TYP: &str = "vouch-evidence+jwt";
pub const TICKET_TYP: &str = "vouch-ticket+jwt";
/// The EAR profile the tickets follow.
pub const EAR_PROFILE: &str = "tag:ietf.org,2026:rats/ear#04";
pub const COMMANDS_MAX: usize = 32;
const TEXT_CHARS_MAX: usize = 128;

/// What the server can ask a device to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// SHA-256 of a named code or firmware region.
    Measure,
    RootCheck,
    DebuggerCheck,
    HookCheck,
    EmulatorCheck,
    /// The physical tamper switch of a terminal or reader.
    TamperSwitch,
    OsPatchLevel,
    Geo,
    ReaderFirmware,
}

impl CommandKind {
    pub const ALL: [CommandKind; 9] = [
        CommandKind::Measure,
        CommandKind::RootCheck,
        CommandKind::DebuggerCheck,
        CommandKind::HookCheck,
        CommandKind::EmulatorCheck,
        CommandKind::TamperSwitch,
        CommandKind::OsPatchLevel,
        CommandKind::Geo,
        CommandKind::ReaderFirmware,
    ];
}

/// One command of a challenge. `region` names what `measure` hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub kind: CommandKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// What the device observed when it ran a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Observation {
    Measure {
        region: String,
        digest: String,
    },
    RootCheck {
        detected: bool,
    },
    DebuggerCheck {
        detected: bool,
    },
    HookCheck {
        detected: bool,
    },
    EmulatorCheck {
        detected: bool,
    },
    TamperSwitch {
        open: bool,
    },
    /// ISO 8601 date of the OS security patch, e.g. `2026-09-01`.
    OsPatchLevel {
        patch_level: String,
    },
    Geo {
        lat: f64,
        lon: f64,
    },
    ReaderFirmware {
        version: String,
    },
}

impl Observation {
    pub fn kind(&self) -> CommandKind {
        match self {
            Observation::Measure { .. } => CommandKind::Measure,
            Observation::RootCheck { .. } => CommandKind::RootCheck,
            Observation::DebuggerCheck { .. } => CommandKind::DebuggerCheck,
            Observation::HookCheck { .. } => CommandKind::HookCheck,
            Observation::EmulatorCheck { .. } => CommandKind::EmulatorCheck,
            Observation::TamperSwitch { .. } => CommandKind::TamperSwitch,
            Observation::OsPatchLevel { .. } => CommandKind::OsPatchLevel,
            Observation::Geo { .. } => CommandKind::Geo,
            Observation::ReaderFirmware { .. } => CommandKind::ReaderFirmware,
        }
    }
}

/// serde cannot combine `deny_unknown_fields` with `flatten`; the observation itself
/// refuses unknown fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The id of the command this answers.
    pub id: String,
    #[serde(flatten)]
    pub observation: Observation,
}

/// The device's own account of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    pub firmware_version: String,
    pub app_version: String,
    pub uptime_secs: u64,
}

/// The merchant configuration saved on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantProfile {
    pub merchant_id: String,
    /// ISO 18245 merchant category code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcc: Option<String>,
}

/// Payload of `POST /v1/attestations`: the device asks to be attested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequestClaims {
    pub device_id: String,
    pub iat: i64,
}

/// Payload of `POST /v1/attestations/{id}/evidence`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceClaims {
    pub attestation_id: String,
    pub device_id: String,
    /// The challenge's nonce, echoed.
    pub nonce: String,
    pub iat: i64,
    pub results: Vec<CommandResult>,
    pub state: DeviceState,
    /// [`evidence_hash`] of the device's previous evidence; absent on its first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_evidence_hash: Option<String>,
    pub merchant_profile: MerchantProfile,
}

/// SHA-256 of a compact evidence JWS, base64url: chains each evidence to the one before.
pub fn evidence_hash(evidence_jws: &str) -> String {
    b64::encode(sha256(evidence_jws.as_bytes()))
}

pub fn sign_challenge_request(
    claims: &ChallengeRequestClaims,
    key: &SigningKey,
    rng: &dyn SecureRandom,
) -> Result<String, ProtoError> {
    jwt::encode(&Header::es256(CHALLENGE_REQUEST_TYP), claims, key, rng)
}

pub fn sign_evidence(claims: &EvidenceClaims, key: &SigningKey, rng: &dyn SecureRandom) -> Result<String, ProtoError> {
    jwt::encode(&Header::es256(EVIDENCE_TYP), claims, key, rng)
}

/// Reads the device id from a challenge request before its key is known; the caller
/// then verifies with [`verify_challenge_request`].
pub fn peek_claims<C: serde::de::DeserializeOwned>(jws: &UnverifiedJws) -> Result<C, ProtoError> {
    jwt::parse_claims(jws.payload_unverified())
}

/// Type, signature by the enrolled key, and `iat` within `window_secs`.
pub fn verify_challenge_request(
    jws: &UnverifiedJws,
    key: &VerifyingKey,
    clock: &dyn Clock,
    window_secs: i64,
) -> Result<ChallengeRequestClaims, ProtoError> {
    jws.header().expect_typ(CHALLENGE_REQUEST_TYP)?;
    let claims: ChallengeRequestClaims = jwt::decode(jws, key)?;
    jwt::check_issued_at(claims.iat, clock.now_unix(), window_secs)?;
    Ok(claims)
}

/// Type, signature and field limits of evidence. Freshness, coverage and the
/// appraisal are the verifier's job.
pub fn verify_evidence(jws: &UnverifiedJws, key: &VerifyingKey) -> Result<EvidenceClaims, ProtoError> {
    jws.header().expect_typ(EVIDENCE_TYP)?;
    let claims: EvidenceClaims = jwt::decode(jws, key)?;
    if claims.results.len() > COMMANDS_MAX {
        return Err(ProtoError::TooLarge { what: "evidence results", len: claims.results.len(), max: COMMANDS_MAX });
    }
    let texts = [&claims.state.firmware_version, &claims.state.app_version, &claims.merchant_profile.merchant_id];
    if texts.iter().any(|t| t.is_empty() || t.chars().count() > TEXT_CHARS_MAX) {
        return Err(ProtoError::malformed(
            "evidence",
            format!("state and profile fields must be 1 to {TEXT_CHARS_MAX} characters"),
        ));
    }
    Ok(claims)
}

/// EAR trust tiers (draft-ietf-rats-ear section 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EarStatus {
    Affirming,
    Warning,
    Contraindicated,
    None,
}

impl EarStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EarStatus::Affirming => "affirming",
            EarStatus::Warning => "warning",
            EarStatus::Contraindicated => "contraindicated",
            EarStatus::None => "none",
        }
    }
}

/// `ear_verifier_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifierId {
    pub developer: String,
    pub build: String,
}

/// One appraised component (`submods` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appraisal {
    pub ear_status: EarStatus,
    /// AR4SI trustworthiness claims, e.g. `{"executables": 2, "hardware": 96}`.
    pub ear_trustworthiness_vector: BTreeMap<String, i8>,
    pub ear_appraisal_policy_id: String,
}

/// Why a device was denied or warned: a stable code and words for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub code: String,
    pub text: String,
}

/// Confirmation (RFC 7800): the ticket is only good in the hands of this key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketConfirmation {
    /// RFC 7638 thumbprint of the device key.
    pub jkt: String,
    pub jwk: Jwk,
}

/// What a ticket allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidityConditions {
    /// Operations a relying party may allow, e.g. `payment`, `session`, `dvv`, `offline`.
    pub operations: Vec<String>,
    /// Largest payment amount, in minor units.
    pub max_amount_minor: i64,
}

/// An attestation ticket: EAR claims plus Vouch's binding and validity claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    pub eat_profile: String,
    pub iss: String,
    /// The device id.
    pub sub: String,
    /// The ticket id.
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
    pub ear_verifier_id: VerifierId,
    pub ear_status: EarStatus,
    pub submods: BTreeMap<String, Appraisal>,
    pub cnf: TicketConfirmation,
    /// 0 (no risk) to 100.
    pub risk: u8,
    pub risk_signals: Vec<String>,
    pub conditions: ValidityConditions,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<Reason>,
    pub attestation_id: String,
}

/// Checks a ticket's type, its signature by one of `keys` (by `kid`), and its expiry.
/// The device's current status is the relying party's second check.
pub fn verify_ticket(
    token: &str,
    key_for_kid: impl Fn(&str) -> Option<VerifyingKey>,
    clock: &dyn Clock,
) -> Result<TicketClaims, ProtoError> {
    let claims: TicketClaims = jwt::verify_by_kid(token, TICKET_TYP, key_for_kid)?;
    jwt::check_expiry(claims.exp, clock.now_unix(), 0)?;
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FixedClock;
    use crate::crypto::SystemRandom;

    fn claims() -> EvidenceClaims {
        EvidenceClaims {
            attestation_id: "att_1".into(),
            device_id: "dev_1".into(),
            nonce: "n".into(),
            iat: 1_000,
            results: vec![
                CommandResult { id: "c1".into(), observation: Observation::RootCheck { detected: false } },
                CommandResult {
                    id: "c2".into(),
                    observation: Observation::Measure { region: "boot".into(), digest: "ab".into() },
                },
                CommandResult { id: "c3".into(), observation: Observation::Geo { lat: 52.5, lon: 13.4 } },
            ],
            state: DeviceState { firmware_version: "1.0.0".into(), app_version: "2".into(), uptime_secs: 9 },
            prev_evidence_hash: Some("h".into()),
            merchant_profile: MerchantProfile { merchant_id: "m".into(), mcc: Some("5812".into()) },
        }
    }

    #[test]
    fn evidence_round_trips_and_binds_to_the_key() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let token = sign_evidence(&claims(), &key, &rng).unwrap();
        let jws = UnverifiedJws::parse(&token).unwrap();
        assert_eq!(verify_evidence(&jws, &key.verifying_key()).unwrap(), claims());
        let other = SigningKey::generate(&rng).unwrap();
        assert_eq!(verify_evidence(&jws, &other.verifying_key()).unwrap_err(), ProtoError::BadSignature);
        assert_eq!(evidence_hash(&token).len(), 43);
    }

    #[test]
    fn results_are_tagged_by_kind_and_refuse_unknown_fields() {
        let json = serde_json::to_value(&claims().results[1]).unwrap();
        assert_eq!(json, serde_json::json!({"id": "c2", "kind": "measure", "region": "boot", "digest": "ab"}));
        let wrong: Result<CommandResult, _> =
            serde_json::from_str(r#"{"id":"c1","kind":"root_check","detected":true,"x":1}"#);
        assert!(wrong.is_err());
        let unknown: Result<CommandResult, _> = serde_json::from_str(r#"{"id":"c1","kind":"telepathy"}"#);
        assert!(unknown.is_err());
    }

    #[test]
    fn challenge_requests_are_typed_and_fresh() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let request = ChallengeRequestClaims { device_id: "dev_1".into(), iat: 1_000 };
        let token = sign_challenge_request(&request, &key, &rng).unwrap();
        let jws = UnverifiedJws::parse(&token).unwrap();
        assert_eq!(peek_claims::<ChallengeRequestClaims>(&jws).unwrap(), request);
        verify_challenge_request(&jws, &key.verifying_key(), &FixedClock(1_030), 60).unwrap();
        assert!(verify_challenge_request(&jws, &key.verifying_key(), &FixedClock(2_000), 60).is_err());
        let evidence = sign_evidence(&claims(), &key, &rng).unwrap();
        let as_request = UnverifiedJws::parse(&evidence).unwrap();
        assert!(matches!(
            verify_challenge_request(&as_request, &key.verifying_key(), &FixedClock(1_000), 60),
            Err(ProtoError::WrongType { .. })
        ));
    }
}
