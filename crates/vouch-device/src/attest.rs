//! The device side of attestation: a simulated device state, the tamper monitoring
//! component that runs the server's commands against it, and the signed evidence that
//! answers a challenge.
//!
//! The monitor is sans-IO like the protocol core: it takes commands, a clock and a
//! random source and returns results and signed evidence. [`crate::sim::attest`] drives
//! it over HTTP.
//!
//! A real device measures its own memory and asks its OS and hardware; the simulator
//! reads the same answers from a [`SimulatedDeviceState`], which starts clean and can be
//! made rooted, debugged, hooked and so on with [`Tamper`] conditions, so an integrator
//! can watch the server catch each one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vouch_proto::attest::{
    COMMANDS_MAX, ChallengeRequestClaims, Command, CommandKind, CommandResult, DeviceState, EvidenceClaims,
    MerchantProfile, Observation, evidence_hash, sign_challenge_request, sign_evidence,
};
use vouch_proto::crypto::{SecureRandom, sha256};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::{Clock, SigningKey};

use crate::DeviceError;
use crate::sim::DeviceProfile;

/// The code regions every simulated device holds, in the order they are measured.
pub const REGIONS: [&str; 3] = ["bootloader", "firmware", "payment_app"];
/// The region the `modified_code` tamper patches.
pub const PATCHED_REGION: &str = "payment_app";
/// What `measure` reports for a region the device does not have. It is deliberately not
/// a digest: hashing nothing would give the SHA-256 of the empty string, which reads as
/// "this region is present and empty" — a claim the device cannot make — and could even
/// match a reference value registered for an empty region.
pub const MISSING_REGION_DIGEST: &str = "missing";

/// The OS patch level of a clean simulated device, and the oldest one its reference
/// values allow. ISO 8601 dates compare correctly as strings.
const CLEAN_OS_PATCH_LEVEL: &str = "2026-11-01";
const MIN_OS_PATCH_LEVEL: &str = "2026-05-01";
const OLD_OS_PATCH_LEVEL: &str = "2023-02-05";
const CLEAN_READER_FIRMWARE: &str = "3.1.0";
const ALLOWED_READER_FIRMWARE: [&str; 2] = ["3.0.4", "3.1.0"];
const OLD_READER_FIRMWARE: &str = "2.2.9";
/// A firmware version no reference values are ever registered for.
const UNKNOWN_FIRMWARE_VERSION: &str = "9.9.9-unsigned";
const CLEAN_APP_VERSION: &str = "2.7.0";
const CLEAN_UPTIME_SECS: u64 = 86_400;
/// ISO 18245 "eating places and restaurants": the demo's merchants are cafés.
const SIMULATED_MCC: &str = "5812";
/// Bytes of each simulated code region.
const REGION_BYTES: usize = 4096;

/// A way a device can be compromised, as the simulator fakes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tamper {
    /// Root access (su binary, unlocked bootloader).
    Root,
    /// A debugger attached to the payment app.
    Debugger,
    /// A hooking framework (Frida, Xposed) injected into the payment app.
    Hook,
    /// Running in an emulator rather than on hardware.
    Emulator,
    /// The payment app's code region patched in memory.
    ModifiedCode,
    /// The enclosure opened: the physical tamper switch tripped.
    TamperSwitch,
    /// An OS security patch level older than the reference values allow.
    OldPatch,
    /// A firmware build the server holds no reference values for.
    UnknownFirmware,
    /// A card reader firmware outside the allowed list.
    ReaderFirmware,
}

impl Tamper {
    pub const ALL: [Tamper; 9] = [
        Tamper::Root,
        Tamper::Debugger,
        Tamper::Hook,
        Tamper::Emulator,
        Tamper::ModifiedCode,
        Tamper::TamperSwitch,
        Tamper::OldPatch,
        Tamper::UnknownFirmware,
        Tamper::ReaderFirmware,
    ];

    /// The name used on the command line (`--tamper root,debugger`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tamper::Root => "root",
            Tamper::Debugger => "debugger",
            Tamper::Hook => "hook",
            Tamper::Emulator => "emulator",
            Tamper::ModifiedCode => "modified_code",
            Tamper::TamperSwitch => "tamper_switch",
            Tamper::OldPatch => "old_patch",
            Tamper::UnknownFirmware => "unknown_firmware",
            Tamper::ReaderFirmware => "reader_firmware",
        }
    }

    /// The reason code the server gives when it catches this condition.
    pub fn reason_code(self) -> &'static str {
        match self {
            Tamper::Root => "rooted",
            Tamper::Debugger => "debugger_attached",
            Tamper::Hook => "hooked",
            Tamper::Emulator => "emulator",
            Tamper::ModifiedCode => "measurement_mismatch",
            Tamper::TamperSwitch => "tamper_switch_open",
            Tamper::OldPatch => "os_patch_outdated",
            Tamper::UnknownFirmware => "unknown_firmware",
            Tamper::ReaderFirmware => "reader_firmware_not_allowed",
        }
    }

    /// Parses a comma-separated list such as `root,debugger`; blanks are skipped and
    /// repeats collapse, so the result is sorted and unique.
    pub fn parse_list(list: &str) -> Result<Vec<Tamper>, UnknownTamper> {
        let mut tampers = list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Tamper>, _>>()?;
        tampers.sort_unstable();
        tampers.dedup();
        Ok(tampers)
    }
}

impl std::fmt::Display for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Tamper {
    type Err = UnknownTamper;

    fn from_str(s: &str) -> Result<Self, UnknownTamper> {
        // `-` is accepted too because command lines tend to spell words that way.
        let name = s.trim().replace('-', "_");
        Tamper::ALL.into_iter().find(|t| t.as_str() == name).ok_or_else(|| UnknownTamper(s.to_owned()))
    }
}

/// A tamper condition name that is not one of [`Tamper::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown tamper condition {0:?}, expected one of root, debugger, hook, emulator, modified_code, tamper_switch, old_patch, unknown_firmware, reader_firmware"
)]
pub struct UnknownTamper(pub String);

/// Known-good values for one model and firmware, in the shape of
/// `PUT /v1/reference-values`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceValues {
    pub model: String,
    pub firmware_version: String,
    /// Region name to lowercase hex SHA-256.
    pub measurements: BTreeMap<String, String>,
    /// ISO 8601 date; older patch levels are outdated.
    pub min_os_patch_level: String,
    pub reader_firmware: Vec<String>,
}

impl ReferenceValues {
    /// The known-good values of a clean simulated device of `kind`.
    pub fn simulated(kind: DeviceKind) -> Self {
        // The merchant is not part of the image, so any id gives the same values.
        SimulatedDeviceState::clean(kind, "any merchant").reference_values()
    }
}

/// Everything a simulated device can be asked about.
#[derive(Clone, PartialEq)]
pub struct SimulatedDeviceState {
    pub kind: DeviceKind,
    pub model: String,
    pub firmware_version: String,
    pub app_version: String,
    pub uptime_secs: u64,
    /// ISO 8601 date of the OS security patch.
    pub os_patch_level: String,
    /// Code regions by name, as `measure` hashes them.
    pub regions: BTreeMap<String, Vec<u8>>,
    pub lat: f64,
    pub lon: f64,
    pub reader_firmware: String,
    pub rooted: bool,
    pub debugger_attached: bool,
    pub hooked: bool,
    pub emulator: bool,
    /// Devices without a physical switch (a POS app, a phone) report it closed: nothing
    /// they can sense has been opened.
    pub tamper_switch_open: bool,
    pub merchant_profile: MerchantProfile,
}

impl std::fmt::Debug for SimulatedDeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Region bytes are long and say nothing to a reader; their sizes do.
        let regions: BTreeMap<&str, usize> = self.regions.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
        f.debug_struct("SimulatedDeviceState")
            .field("kind", &self.kind)
            .field("model", &self.model)
            .field("firmware_version", &self.firmware_version)
            .field("os_patch_level", &self.os_patch_level)
            .field("region_bytes", &regions)
            .field("reader_firmware", &self.reader_firmware)
            .field("rooted", &self.rooted)
            .field("debugger_attached", &self.debugger_attached)
            .field("hooked", &self.hooked)
            .field("emulator", &self.emulator)
            .field("tamper_switch_open", &self.tamper_switch_open)
            .field("merchant_profile", &self.merchant_profile)
            .finish_non_exhaustive()
    }
}

impl SimulatedDeviceState {
    /// An untouched device of `kind` owned by `merchant_id`, with the model and firmware
    /// [`DeviceProfile::simulated`] enrols with.
    pub fn clean(kind: DeviceKind, merchant_id: &str) -> Self {
        let profile = DeviceProfile::simulated(kind, merchant_id);
        let regions = REGIONS
            .iter()
            .map(|region| ((*region).to_owned(), region_image(&profile.model, &profile.firmware_version, region)))
            .collect();
        SimulatedDeviceState {
            kind,
            model: profile.model,
            firmware_version: profile.firmware_version,
            app_version: CLEAN_APP_VERSION.into(),
            uptime_secs: CLEAN_UPTIME_SECS,
            os_patch_level: CLEAN_OS_PATCH_LEVEL.into(),
            regions,
            lat: 52.3731,
            lon: 4.8922,
            reader_firmware: CLEAN_READER_FIRMWARE.into(),
            rooted: false,
            debugger_attached: false,
            hooked: false,
            emulator: false,
            tamper_switch_open: false,
            merchant_profile: MerchantProfile { merchant_id: merchant_id.into(), mcc: Some(SIMULATED_MCC.into()) },
        }
    }

    pub fn apply(&mut self, tamper: Tamper) {
        match tamper {
            Tamper::Root => self.rooted = true,
            Tamper::Debugger => self.debugger_attached = true,
            Tamper::Hook => self.hooked = true,
            Tamper::Emulator => self.emulator = true,
            Tamper::ModifiedCode => {
                // A two-byte NOP patch, as a cracked app would carry: same size, other hash.
                let region = self.regions.entry(PATCHED_REGION.to_owned()).or_default();
                match region.get_mut(..2) {
                    Some(head) => head.copy_from_slice(&[0x90, 0x90]),
                    None => region.extend_from_slice(&[0x90, 0x90]),
                }
            }
            Tamper::TamperSwitch => self.tamper_switch_open = true,
            Tamper::OldPatch => self.os_patch_level = OLD_OS_PATCH_LEVEL.into(),
            Tamper::UnknownFirmware => {
                // A rebuilt firmware changes both the version and the image.
                self.firmware_version = UNKNOWN_FIRMWARE_VERSION.into();
                for region in REGIONS {
                    self.regions.insert(region.to_owned(), region_image(&self.model, &self.firmware_version, region));
                }
            }
            Tamper::ReaderFirmware => self.reader_firmware = OLD_READER_FIRMWARE.into(),
        }
    }

    pub fn with_tampers(mut self, tampers: &[Tamper]) -> Self {
        for tamper in tampers {
            self.apply(*tamper);
        }
        self
    }

    /// What the device enrols as.
    pub fn profile(&self) -> DeviceProfile {
        DeviceProfile {
            kind: self.kind,
            model: self.model.clone(),
            firmware_version: self.firmware_version.clone(),
            merchant_id: self.merchant_profile.merchant_id.clone(),
        }
    }

    /// The known-good values for this state's model and firmware, measured from its
    /// regions. Take them from a clean state: measured from a tampered one they would
    /// bless the tampering.
    pub fn reference_values(&self) -> ReferenceValues {
        ReferenceValues {
            model: self.model.clone(),
            firmware_version: self.firmware_version.clone(),
            measurements: self.regions.iter().map(|(name, bytes)| (name.clone(), hex_sha256(bytes))).collect(),
            min_os_patch_level: MIN_OS_PATCH_LEVEL.into(),
            reader_firmware: ALLOWED_READER_FIRMWARE.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    fn device_state(&self) -> DeviceState {
        DeviceState {
            firmware_version: self.firmware_version.clone(),
            app_version: self.app_version.clone(),
            uptime_secs: self.uptime_secs,
        }
    }
}

/// Deterministic bytes for a region, so every simulated device of one model and firmware
/// measures the same and the reference values can be computed rather than stored.
fn region_image(model: &str, firmware_version: &str, region: &str) -> Vec<u8> {
    let seed = format!("{model}\n{firmware_version}\n{region}\n");
    seed.bytes().cycle().take(REGION_BYTES).collect()
}

fn hex_sha256(bytes: &[u8]) -> String {
    vouch_proto::hex::encode(sha256(bytes))
}

/// A challenge the server issued (`POST /v1/attestations`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub attestation_id: String,
    pub nonce: String,
    pub commands: Vec<Command>,
    pub expires_at: i64,
}

/// Evidence signed and ready to submit, with the hash the next evidence will chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedEvidence {
    pub jws: String,
    pub hash: String,
}

/// The tamper monitoring component: runs the server's commands against the device and
/// signs what it saw. It remembers the hash of its last accepted evidence, which the
/// next evidence carries as the device's previous state.
#[derive(Debug, Clone)]
pub struct TamperMonitor {
    state: SimulatedDeviceState,
    prev_evidence_hash: Option<String>,
}

impl TamperMonitor {
    /// A monitor that has never sent evidence.
    pub fn new(state: SimulatedDeviceState) -> Self {
        TamperMonitor { state, prev_evidence_hash: None }
    }

    /// A monitor continuing a chain, e.g. after a restart.
    pub fn resume(state: SimulatedDeviceState, prev_evidence_hash: Option<String>) -> Self {
        TamperMonitor { state, prev_evidence_hash }
    }

    pub fn state(&self) -> &SimulatedDeviceState {
        &self.state
    }

    /// For changing the device between attestations (tampering with it, moving it).
    pub fn state_mut(&mut self) -> &mut SimulatedDeviceState {
        &mut self.state
    }

    pub fn prev_evidence_hash(&self) -> Option<&str> {
        self.prev_evidence_hash.as_deref()
    }

    /// Signs the request that opens an attestation.
    pub fn challenge_request(
        &self,
        device_id: &str,
        key: &SigningKey,
        clock: &dyn Clock,
        rng: &dyn SecureRandom,
    ) -> Result<String, DeviceError> {
        let claims = ChallengeRequestClaims { device_id: device_id.to_owned(), iat: clock.now_unix() };
        Ok(sign_challenge_request(&claims, key, rng)?)
    }

    /// Runs one command. A `measure` without a region, or of a region the device lacks,
    /// answers [`MISSING_REGION_DIGEST`].
    pub fn run(&self, command: &Command) -> CommandResult {
        let s = &self.state;
        let observation = match command.kind {
            CommandKind::Measure => {
                let region = command.region.clone().unwrap_or_default();
                let digest = s.regions.get(&region).map_or_else(|| MISSING_REGION_DIGEST.to_owned(), |b| hex_sha256(b));
                Observation::Measure { region, digest }
            }
            CommandKind::RootCheck => Observation::RootCheck { detected: s.rooted },
            CommandKind::DebuggerCheck => Observation::DebuggerCheck { detected: s.debugger_attached },
            CommandKind::HookCheck => Observation::HookCheck { detected: s.hooked },
            CommandKind::EmulatorCheck => Observation::EmulatorCheck { detected: s.emulator },
            CommandKind::TamperSwitch => Observation::TamperSwitch { open: s.tamper_switch_open },
            CommandKind::OsPatchLevel => Observation::OsPatchLevel { patch_level: s.os_patch_level.clone() },
            CommandKind::Geo => Observation::Geo { lat: s.lat, lon: s.lon },
            CommandKind::ReaderFirmware => Observation::ReaderFirmware { version: s.reader_firmware.clone() },
        };
        CommandResult { id: command.id.clone(), observation }
    }

    /// Runs every command of a challenge, in order. A challenge longer than the protocol
    /// allows is refused rather than answered with evidence the server would refuse.
    pub fn run_all(&self, commands: &[Command]) -> Result<Vec<CommandResult>, DeviceError> {
        if commands.len() > COMMANDS_MAX {
            return Err(DeviceError::Untrusted(format!(
                "challenge has {} commands, the protocol allows {COMMANDS_MAX}",
                commands.len()
            )));
        }
        Ok(commands.iter().map(|c| self.run(c)).collect())
    }

    /// Runs the challenge's commands and signs the evidence. The chain does not move
    /// until [`TamperMonitor::record_accepted`]: evidence the server refused is not the
    /// previous state it knows.
    pub fn evidence(
        &self,
        challenge: &Challenge,
        device_id: &str,
        key: &SigningKey,
        clock: &dyn Clock,
        rng: &dyn SecureRandom,
    ) -> Result<SignedEvidence, DeviceError> {
        let claims = EvidenceClaims {
            attestation_id: challenge.attestation_id.clone(),
            device_id: device_id.to_owned(),
            nonce: challenge.nonce.clone(),
            iat: clock.now_unix(),
            results: self.run_all(&challenge.commands)?,
            state: self.state.device_state(),
            prev_evidence_hash: self.prev_evidence_hash.clone(),
            merchant_profile: self.state.merchant_profile.clone(),
        };
        let jws = sign_evidence(&claims, key, rng)?;
        let hash = evidence_hash(&jws);
        Ok(SignedEvidence { jws, hash })
    }

    /// The server appraised `evidence` (whatever its verdict), so it is now the
    /// previous state.
    pub fn record_accepted(&mut self, evidence: &SignedEvidence) {
        self.prev_evidence_hash = Some(evidence.hash.clone());
    }
}

#[cfg(test)]
mod tests {
    use vouch_proto::FixedClock;
    use vouch_proto::attest::verify_evidence;
    use vouch_proto::crypto::SystemRandom;
    use vouch_proto::jws::UnverifiedJws;

    use super::*;

    fn command(id: &str, kind: CommandKind) -> Command {
        Command { id: id.into(), kind, region: None }
    }

    fn measure(id: &str, region: &str) -> Command {
        Command { id: id.into(), kind: CommandKind::Measure, region: Some(region.into()) }
    }

    /// One command of every kind, measuring every region.
    fn full_challenge() -> Challenge {
        let mut commands: Vec<Command> =
            REGIONS.iter().enumerate().map(|(i, r)| measure(&format!("m{i}"), r)).collect();
        for (i, kind) in CommandKind::ALL.into_iter().filter(|k| *k != CommandKind::Measure).enumerate() {
            commands.push(command(&format!("c{i}"), kind));
        }
        Challenge { attestation_id: "att_1".into(), nonce: "n0nce".into(), commands, expires_at: 1_900_000_000 }
    }

    fn observations(state: SimulatedDeviceState) -> Vec<Observation> {
        let monitor = TamperMonitor::new(state);
        monitor.run_all(&full_challenge().commands).unwrap().into_iter().map(|r| r.observation).collect()
    }

    #[test]
    fn tamper_lists_parse_and_unknown_names_are_refused() {
        let check =
            |input: &str, expected: &[Tamper]| assert_eq!(Tamper::parse_list(input).unwrap(), expected, "{input}");
        check("root,debugger", &[Tamper::Root, Tamper::Debugger]);
        check(" tamper-switch , root,,root ", &[Tamper::Root, Tamper::TamperSwitch]);
        check("", &[]);
        for tamper in Tamper::ALL {
            check(tamper.as_str(), &[tamper]);
            assert_eq!(tamper.to_string().parse::<Tamper>(), Ok(tamper));
        }
        assert_eq!(Tamper::parse_list("root,jailbreak"), Err(UnknownTamper("jailbreak".into())));
    }

    #[test]
    fn a_clean_device_answers_every_command_clean_and_matches_its_reference_values() {
        let state = SimulatedDeviceState::clean(DeviceKind::Terminal, "m_1");
        let reference = state.reference_values();
        assert_eq!(reference.model, "VT-900 terminal");
        assert_eq!(reference.measurements.len(), REGIONS.len());
        assert!(reference.reader_firmware.contains(&state.reader_firmware));
        assert!(state.os_patch_level >= reference.min_os_patch_level);
        for observation in observations(state) {
            match observation {
                Observation::Measure { region, digest } => assert_eq!(reference.measurements[&region], digest),
                Observation::RootCheck { detected }
                | Observation::DebuggerCheck { detected }
                | Observation::HookCheck { detected }
                | Observation::EmulatorCheck { detected } => assert!(!detected),
                Observation::TamperSwitch { open } => assert!(!open),
                Observation::OsPatchLevel { patch_level } => assert_eq!(patch_level, CLEAN_OS_PATCH_LEVEL),
                Observation::Geo { .. } => {}
                Observation::ReaderFirmware { version } => assert_eq!(version, CLEAN_READER_FIRMWARE),
            }
        }
    }

    #[test]
    fn each_kind_has_its_own_model_and_measurements() {
        let references: Vec<ReferenceValues> =
            DeviceKind::ALL.into_iter().map(|k| SimulatedDeviceState::clean(k, "m_1").reference_values()).collect();
        for (i, a) in references.iter().enumerate() {
            for b in &references[i + 1..] {
                assert_ne!(a.model, b.model);
                assert_ne!(a.measurements, b.measurements);
            }
        }
        // The merchant is not part of the image: every device of a model measures alike.
        assert_eq!(
            SimulatedDeviceState::clean(DeviceKind::Pos, "m_1").reference_values(),
            ReferenceValues::simulated(DeviceKind::Pos)
        );
    }

    /// Each tamper changes exactly the observations that reveal it.
    #[test]
    fn each_tamper_shows_in_its_own_observations_only() {
        let clean_state = SimulatedDeviceState::clean(DeviceKind::Terminal, "m_1");
        let clean = observations(clean_state.clone());
        for tamper in Tamper::ALL {
            let tampered_state = clean_state.clone().with_tampers(&[tamper]);
            let changed: Vec<CommandKind> = observations(tampered_state.clone())
                .iter()
                .zip(&clean)
                .filter(|(t, c)| t != c)
                .map(|(t, _)| t.kind())
                .collect();
            let expected: &[CommandKind] = match tamper {
                Tamper::Root => &[CommandKind::RootCheck],
                Tamper::Debugger => &[CommandKind::DebuggerCheck],
                Tamper::Hook => &[CommandKind::HookCheck],
                Tamper::Emulator => &[CommandKind::EmulatorCheck],
                Tamper::ModifiedCode => &[CommandKind::Measure],
                Tamper::TamperSwitch => &[CommandKind::TamperSwitch],
                Tamper::OldPatch => &[CommandKind::OsPatchLevel],
                Tamper::UnknownFirmware => &[CommandKind::Measure, CommandKind::Measure, CommandKind::Measure],
                Tamper::ReaderFirmware => &[CommandKind::ReaderFirmware],
            };
            assert_eq!(changed, expected, "{tamper}");
            let firmware_changed = tampered_state.firmware_version != clean_state.firmware_version;
            assert_eq!(firmware_changed, tamper == Tamper::UnknownFirmware, "{tamper}");
        }
    }

    #[test]
    fn modified_code_changes_one_region_and_keeps_its_size() {
        let clean = SimulatedDeviceState::clean(DeviceKind::Reader, "m_1");
        let tampered = clean.clone().with_tampers(&[Tamper::ModifiedCode]);
        for region in REGIONS {
            assert_eq!(tampered.regions[region].len(), clean.regions[region].len());
            assert_eq!(tampered.regions[region] == clean.regions[region], region != PATCHED_REGION, "{region}");
        }
    }

    #[test]
    fn a_missing_region_is_reported_missing_not_hashed() {
        let monitor = TamperMonitor::new(SimulatedDeviceState::clean(DeviceKind::Terminal, "m_1"));
        for command in [measure("x", "secure_boot_rom"), command("y", CommandKind::Measure)] {
            let result = monitor.run(&command);
            let Observation::Measure { digest, .. } = result.observation else { panic!("{result:?}") };
            assert_eq!(digest, MISSING_REGION_DIGEST);
        }
        assert_ne!(hex_sha256(b""), MISSING_REGION_DIGEST);
        assert_eq!(hex_sha256(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn evidence_is_signed_echoes_the_challenge_and_answers_every_command_in_order() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let monitor = TamperMonitor::new(SimulatedDeviceState::clean(DeviceKind::Terminal, "m_1"));
        let challenge = full_challenge();
        let signed = monitor.evidence(&challenge, "dev_1", &key, &FixedClock(1_800_000_000), &rng).unwrap();
        assert_eq!(signed.hash, evidence_hash(&signed.jws));

        let claims = verify_evidence(&UnverifiedJws::parse(&signed.jws).unwrap(), &key.verifying_key()).unwrap();
        assert_eq!(claims.attestation_id, "att_1");
        assert_eq!(claims.device_id, "dev_1");
        assert_eq!(claims.nonce, "n0nce");
        assert_eq!(claims.iat, 1_800_000_000);
        assert_eq!(claims.prev_evidence_hash, None);
        assert_eq!(claims.merchant_profile.merchant_id, "m_1");
        assert_eq!(claims.state.firmware_version, "1.4.2");
        let ids: Vec<&str> = claims.results.iter().map(|r| r.id.as_str()).collect();
        let expected: Vec<&str> = challenge.commands.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, expected);

        let other = SigningKey::generate(&rng).unwrap();
        assert!(verify_evidence(&UnverifiedJws::parse(&signed.jws).unwrap(), &other.verifying_key()).is_err());
    }

    #[test]
    fn each_evidence_chains_to_the_last_accepted_one() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let clock = FixedClock(1_800_000_000);
        let mut monitor = TamperMonitor::new(SimulatedDeviceState::clean(DeviceKind::Pos, "m_1"));
        let challenge = full_challenge();
        let first = monitor.evidence(&challenge, "dev_1", &key, &clock, &rng).unwrap();
        // Refused evidence is not recorded, so a retry still chains to nothing.
        let retry = monitor.evidence(&challenge, "dev_1", &key, &clock, &rng).unwrap();
        let prev = |e: &SignedEvidence| {
            verify_evidence(&UnverifiedJws::parse(&e.jws).unwrap(), &key.verifying_key()).unwrap().prev_evidence_hash
        };
        assert_eq!(prev(&retry), None);
        monitor.record_accepted(&first);
        let second = monitor.evidence(&challenge, "dev_1", &key, &clock, &rng).unwrap();
        assert_eq!(prev(&second), Some(first.hash.clone()));
        assert_eq!(monitor.prev_evidence_hash(), Some(first.hash.as_str()));

        let resumed = TamperMonitor::resume(monitor.state().clone(), Some(second.hash.clone()));
        let third = resumed.evidence(&challenge, "dev_1", &key, &clock, &rng).unwrap();
        assert_eq!(prev(&third), Some(second.hash));
    }

    #[test]
    fn an_oversized_challenge_is_refused() {
        let monitor = TamperMonitor::new(SimulatedDeviceState::clean(DeviceKind::Terminal, "m_1"));
        let commands: Vec<Command> =
            (0..=COMMANDS_MAX).map(|i| command(&format!("c{i}"), CommandKind::RootCheck)).collect();
        assert!(matches!(monitor.run_all(&commands), Err(DeviceError::Untrusted(_))));
        assert_eq!(monitor.run_all(&commands[..COMMANDS_MAX]).unwrap().len(), COMMANDS_MAX);
    }

    #[test]
    fn the_challenge_request_names_the_device_and_is_signed_by_its_key() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let monitor = TamperMonitor::new(SimulatedDeviceState::clean(DeviceKind::Terminal, "m_1"));
        let request = monitor.challenge_request("dev_1", &key, &FixedClock(1_800_000_000), &rng).unwrap();
        let jws = UnverifiedJws::parse(&request).unwrap();
        let claims =
            vouch_proto::attest::verify_challenge_request(&jws, &key.verifying_key(), &FixedClock(1_800_000_010), 60)
                .unwrap();
        assert_eq!(claims, ChallengeRequestClaims { device_id: "dev_1".into(), iat: 1_800_000_000 });
    }
}
