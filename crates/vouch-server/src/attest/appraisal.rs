//! Appraisal: the device's answers compared with known behaviour — the reference
//! values for its model and firmware, and its own history — giving signals with a
//! severity and a risk rating. Pure: the handler loads the inputs and the policy
//! turns the outcome into a verdict.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vouch_proto::attest::{Command, CommandKind, CommandResult, EvidenceClaims, Observation};

/// Faster than this between two attestations is not a device being carried.
const TRAVEL_KMH_MAX: f64 = 1_000.0;
/// Jumps shorter than this are GPS noise, whatever the time between them.
const TRAVEL_NOISE_KM: f64 = 50.0;
const EARTH_RADIUS_KM: f64 = 6_371.0;

/// Known-good values for one model and firmware version.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReferenceDocument {
    /// Region name to lowercase hex SHA-256.
    #[serde(default)]
    pub measurements: BTreeMap<String, String>,
    /// Oldest acceptable OS security patch, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_os_patch_level: Option<String>,
    /// Card reader firmware versions allowed with this terminal firmware.
    #[serde(default)]
    pub reader_firmware: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Location {
    pub lat: f64,
    pub lon: f64,
}

/// What a device reported, kept for its next appraisal.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Observations {
    pub firmware_version: String,
    pub measurements: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
}

/// The device's previous appraisal.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub evidence_hash: String,
    pub observations: Observations,
    pub at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    fn risk_weight(self) -> u32 {
        match self {
            Severity::Medium => 15,
            Severity::High => 35,
            Severity::Critical => 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// Stable reason code, e.g. `rooted`.
    pub code: &'static str,
    pub severity: Severity,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub signals: Vec<Signal>,
    /// 0 to 100.
    pub risk: u8,
    pub observations: Observations,
}

/// Why evidence does not answer its challenge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoverageError {
    #[error("command {id} was not answered")]
    Missing { id: String },
    #[error("result {id} answers no command of this challenge")]
    Unasked { id: String },
    #[error("command {id} was answered more than once")]
    Duplicate { id: String },
    #[error("result {id} is a {found:?} observation, the command asked for {asked:?}")]
    WrongKind { id: String, found: CommandKind, asked: CommandKind },
    #[error("result {id} measures region {found:?}, the command asked for {asked:?}")]
    WrongRegion { id: String, found: String, asked: String },
}

/// Every command answered exactly once, by an observation of the kind asked.
pub fn check_coverage(commands: &[Command], results: &[CommandResult]) -> Result<(), CoverageError> {
    let mut answered: BTreeMap<&str, &CommandResult> = BTreeMap::new();
    for result in results {
        if answered.insert(result.id.as_str(), result).is_some() {
            return Err(CoverageError::Duplicate { id: result.id.clone() });
        }
        if !commands.iter().any(|c| c.id == result.id) {
            return Err(CoverageError::Unasked { id: result.id.clone() });
        }
    }
    for command in commands {
        let result =
            answered.get(command.id.as_str()).ok_or_else(|| CoverageError::Missing { id: command.id.clone() })?;
        let found = result.observation.kind();
        if found != command.kind {
            return Err(CoverageError::WrongKind { id: command.id.clone(), found, asked: command.kind });
        }
        if let (Observation::Measure { region, .. }, Some(asked)) = (&result.observation, &command.region)
            && region != asked
        {
            return Err(CoverageError::WrongRegion {
                id: command.id.clone(),
                found: region.clone(),
                asked: asked.clone(),
            });
        }
    }
    Ok(())
}

pub struct AppraisalInput<'a> {
    pub evidence: &'a EvidenceClaims,
    pub registered_merchant_id: &'a str,
    /// `None` when nothing is known about this model and firmware.
    pub reference: Option<&'a ReferenceDocument>,
    pub history: Option<&'a History>,
    pub now: i64,
}

pub fn appraise(input: &AppraisalInput<'_>) -> Outcome {
    let evidence = input.evidence;
    let mut signals = Vec::new();
    let mut signal =
        |code: &'static str, severity: Severity, text: String| signals.push(Signal { code, severity, text });
    let mut observations =
        Observations { firmware_version: evidence.state.firmware_version.clone(), ..Default::default() };

    if input.reference.is_none() {
        signal(
            "unknown_firmware",
            Severity::Critical,
            format!("no reference values for firmware {}", evidence.state.firmware_version),
        );
    }
    for result in &evidence.results {
        match &result.observation {
            Observation::RootCheck { detected: true } => {
                signal("rooted", Severity::Critical, "the device is rooted or jailbroken".into())
            }
            Observation::DebuggerCheck { detected: true } => {
                signal("debugger_attached", Severity::Critical, "a debugger is attached".into())
            }
            Observation::HookCheck { detected: true } => {
                signal("hooked", Severity::Critical, "a hooking framework is active".into())
            }
            Observation::EmulatorCheck { detected: true } => {
                signal("emulator", Severity::Critical, "the device is an emulator".into())
            }
            Observation::TamperSwitch { open: true } => {
                signal("tamper_switch_open", Severity::Critical, "the tamper switch is open".into())
            }
            Observation::Measure { region, digest } => {
                observations.measurements.insert(region.clone(), digest.to_ascii_lowercase());
                let expected = input.reference.and_then(|r| r.measurements.get(region));
                if input.reference.is_some() && expected.is_none_or(|e| !e.eq_ignore_ascii_case(digest)) {
                    signal(
                        "measurement_mismatch",
                        Severity::Critical,
                        format!("region {region} does not match its reference measurement"),
                    );
                }
            }
            Observation::OsPatchLevel { patch_level } => {
                if let Some(minimum) = input.reference.and_then(|r| r.min_os_patch_level.as_deref())
                    && (!is_calendar_date(patch_level) || patch_level.as_str() < minimum)
                {
                    signal(
                        "os_patch_outdated",
                        Severity::Medium,
                        format!("OS patch level {patch_level} is older than {minimum}"),
                    );
                }
            }
            Observation::ReaderFirmware { version } => {
                if let Some(reference) = input.reference
                    && !reference.reader_firmware.iter().any(|allowed| allowed == version)
                {
                    signal(
                        "reader_firmware_not_allowed",
                        Severity::High,
                        format!("card reader firmware {version} is not allowed"),
                    );
                }
            }
            Observation::Geo { lat, lon } => {
                if lat.is_finite() && lon.is_finite() && lat.abs() <= 90.0 && lon.abs() <= 180.0 {
                    observations.location = Some(Location { lat: *lat, lon: *lon });
                } else {
                    signal("invalid_location", Severity::High, "the reported location is not on Earth".into());
                }
            }
            _ => {}
        }
    }
    if evidence.merchant_profile.merchant_id != input.registered_merchant_id {
        signal(
            "merchant_mismatch",
            Severity::High,
            "the merchant profile on the device is not the merchant it is enrolled for".into(),
        );
    }
    match (input.history, evidence.prev_evidence_hash.as_deref()) {
        (None, None) => {}
        (Some(history), Some(hash)) if history.evidence_hash == hash => {}
        (None, Some(_)) => signal(
            "broken_state_chain",
            Severity::High,
            "the device refers to previous evidence that was never accepted".into(),
        ),
        (Some(_), _) => signal(
            "broken_state_chain",
            Severity::High,
            "the previous-state hash does not match the last accepted evidence".into(),
        ),
    }
    if let Some(history) = input.history {
        let before = &history.observations;
        if is_older_version(&observations.firmware_version, &before.firmware_version) {
            signal(
                "firmware_downgrade",
                Severity::High,
                format!("firmware went from {} back to {}", before.firmware_version, observations.firmware_version),
            );
        }
        if before.firmware_version == observations.firmware_version {
            for (region, digest) in &observations.measurements {
                if before.measurements.get(region).is_some_and(|old| old != digest) {
                    signal(
                        "measurement_changed_without_update",
                        Severity::High,
                        format!("region {region} changed although the firmware did not"),
                    );
                }
            }
        }
        if let (Some(from), Some(to)) = (before.location, observations.location) {
            let km = distance_km(from, to);
            let hours = ((input.now - history.at).max(1) as f64) / 3_600.0;
            if km > TRAVEL_NOISE_KM && km / hours > TRAVEL_KMH_MAX {
                signal(
                    "impossible_travel",
                    Severity::High,
                    format!("moved {km:.0} km in {:.0} s since the last attestation", hours * 3_600.0),
                );
            }
        }
    }
    let risk = signals.iter().map(|s| s.severity.risk_weight()).sum::<u32>().min(100) as u8;
    Outcome { signals, risk, observations }
}

/// `YYYY-MM-DD` with a month of 01-12 and a day of 01-31; patch levels compare as text,
/// which is only sound for such dates.
pub fn is_calendar_date(text: &str) -> bool {
    let bytes = text.as_bytes();
    let shaped = bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| if i == 4 || i == 7 { *b == b'-' } else { b.is_ascii_digit() });
    let number = |range: std::ops::Range<usize>| text.get(range).and_then(|t| t.parse::<u8>().ok());
    shaped
        && number(5..7).is_some_and(|m| (1..=12).contains(&m))
        && number(8..10).is_some_and(|d| (1..=31).contains(&d))
}

/// Dotted numeric versions; anything else is not compared.
fn is_older_version(current: &str, previous: &str) -> bool {
    let parse = |v: &str| v.split('.').map(|part| part.parse::<u64>().ok()).collect::<Option<Vec<u64>>>();
    match (parse(current), parse(previous)) {
        (Some(current), Some(previous)) => current < previous,
        _ => false,
    }
}

fn distance_km(from: Location, to: Location) -> f64 {
    let (lat1, lat2) = (from.lat.to_radians(), to.lat.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (to.lon - from.lon).to_radians();
    let a = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vouch_proto::attest::{DeviceState, MerchantProfile};

    fn evidence(results: Vec<Observation>) -> EvidenceClaims {
        EvidenceClaims {
            attestation_id: "att".into(),
            device_id: "dev".into(),
            nonce: "n".into(),
            iat: 0,
            results: results
                .into_iter()
                .enumerate()
                .map(|(i, observation)| CommandResult { id: format!("c{}", i + 1), observation })
                .collect(),
            state: DeviceState { firmware_version: "2.0.0".into(), app_version: "1".into(), uptime_secs: 5 },
            prev_evidence_hash: None,
            merchant_profile: MerchantProfile { merchant_id: "m1".into(), mcc: None },
        }
    }

    fn reference() -> ReferenceDocument {
        ReferenceDocument {
            measurements: [("boot".to_owned(), "aa".to_owned())].into(),
            min_os_patch_level: Some("2026-01-01".into()),
            reader_firmware: vec!["3.1.0".into()],
        }
    }

    fn codes(
        evidence: &EvidenceClaims,
        reference: Option<&ReferenceDocument>,
        history: Option<&History>,
    ) -> Vec<&'static str> {
        let input = AppraisalInput { evidence, registered_merchant_id: "m1", reference, history, now: 10_000 };
        appraise(&input).signals.iter().map(|s| s.code).collect()
    }

    #[test]
    fn each_observation_maps_to_its_reason() {
        let r = reference();
        let cases: Vec<(Observation, &[&str])> = vec![
            (Observation::RootCheck { detected: true }, &["rooted"]),
            (Observation::RootCheck { detected: false }, &[]),
            (Observation::DebuggerCheck { detected: true }, &["debugger_attached"]),
            (Observation::HookCheck { detected: true }, &["hooked"]),
            (Observation::EmulatorCheck { detected: true }, &["emulator"]),
            (Observation::TamperSwitch { open: true }, &["tamper_switch_open"]),
            (Observation::Measure { region: "boot".into(), digest: "AA".into() }, &[]),
            (Observation::Measure { region: "boot".into(), digest: "bb".into() }, &["measurement_mismatch"]),
            (Observation::Measure { region: "other".into(), digest: "aa".into() }, &["measurement_mismatch"]),
            (Observation::OsPatchLevel { patch_level: "2025-12-01".into() }, &["os_patch_outdated"]),
            (Observation::OsPatchLevel { patch_level: "2026-02-01".into() }, &[]),
            (Observation::OsPatchLevel { patch_level: "soon".into() }, &["os_patch_outdated"]),
            (Observation::ReaderFirmware { version: "3.0.0".into() }, &["reader_firmware_not_allowed"]),
            (Observation::ReaderFirmware { version: "3.1.0".into() }, &[]),
            (Observation::Geo { lat: 91.0, lon: 0.0 }, &["invalid_location"]),
            (Observation::Geo { lat: f64::NAN, lon: 0.0 }, &["invalid_location"]),
        ];
        for (observation, expected) in cases {
            let e = evidence(vec![observation.clone()]);
            assert_eq!(codes(&e, Some(&r), None), expected, "{observation:?}");
        }
        assert_eq!(codes(&evidence(vec![]), None, None), ["unknown_firmware"]);
    }

    #[test]
    fn history_signals() {
        let r = reference();
        let before = History {
            evidence_hash: "h1".into(),
            observations: Observations {
                firmware_version: "2.1.0".into(),
                measurements: [("boot".to_owned(), "aa".to_owned())].into(),
                location: Some(Location { lat: 52.52, lon: 13.40 }),
            },
            at: 9_000,
        };
        let mut e = evidence(vec![
            Observation::Measure { region: "boot".into(), digest: "aa".into() },
            Observation::Geo { lat: 40.71, lon: -74.0 },
        ]);
        e.prev_evidence_hash = Some("h1".into());
        assert_eq!(codes(&e, Some(&r), Some(&before)), ["firmware_downgrade", "impossible_travel"]);
        e.prev_evidence_hash = Some("other".into());
        assert!(codes(&e, Some(&r), Some(&before)).contains(&"broken_state_chain"));
        e.prev_evidence_hash = None;
        assert!(codes(&e, Some(&r), Some(&before)).contains(&"broken_state_chain"));
        let mut fresh = evidence(vec![]);
        fresh.prev_evidence_hash = Some("h0".into());
        assert_eq!(codes(&fresh, Some(&r), None), ["broken_state_chain"]);

        let same_firmware = History {
            observations: Observations { firmware_version: "2.0.0".into(), ..before.observations.clone() },
            ..before.clone()
        };
        let mut changed = evidence(vec![Observation::Measure { region: "boot".into(), digest: "cc".into() }]);
        changed.prev_evidence_hash = Some("h1".into());
        assert_eq!(
            codes(&changed, Some(&r), Some(&same_firmware)),
            ["measurement_mismatch", "measurement_changed_without_update"]
        );
    }

    #[test]
    fn merchant_and_risk() {
        let mut e = evidence(vec![Observation::RootCheck { detected: true }, Observation::TamperSwitch { open: true }]);
        e.merchant_profile.merchant_id = "m2".into();
        let r = reference();
        let input =
            AppraisalInput { evidence: &e, registered_merchant_id: "m1", reference: Some(&r), history: None, now: 0 };
        let outcome = appraise(&input);
        assert_eq!(
            outcome.signals.iter().map(|s| s.code).collect::<Vec<_>>(),
            ["rooted", "tamper_switch_open", "merchant_mismatch"]
        );
        assert_eq!(outcome.risk, 100);
    }

    #[test]
    fn coverage() {
        let commands = vec![
            Command { id: "c1".into(), kind: CommandKind::RootCheck, region: None },
            Command { id: "c2".into(), kind: CommandKind::Measure, region: Some("boot".into()) },
        ];
        let result = |id: &str, observation| CommandResult { id: id.into(), observation };
        let root = Observation::RootCheck { detected: false };
        let boot = Observation::Measure { region: "boot".into(), digest: "aa".into() };
        check_coverage(&commands, &[result("c1", root.clone()), result("c2", boot.clone())]).unwrap();
        let cases = [
            (vec![result("c1", root.clone())], CoverageError::Missing { id: "c2".into() }),
            (
                vec![result("c1", root.clone()), result("c2", boot.clone()), result("c3", root.clone())],
                CoverageError::Unasked { id: "c3".into() },
            ),
            (
                vec![result("c1", root.clone()), result("c1", root.clone())],
                CoverageError::Duplicate { id: "c1".into() },
            ),
            (
                vec![result("c1", boot.clone()), result("c2", boot.clone())],
                CoverageError::WrongKind {
                    id: "c1".into(),
                    found: CommandKind::Measure,
                    asked: CommandKind::RootCheck,
                },
            ),
            (
                vec![
                    result("c1", root),
                    result("c2", Observation::Measure { region: "app".into(), digest: "aa".into() }),
                ],
                CoverageError::WrongRegion { id: "c2".into(), found: "app".into(), asked: "boot".into() },
            ),
        ];
        for (results, expected) in cases {
            assert_eq!(check_coverage(&commands, &results), Err(expected));
        }
    }
}
