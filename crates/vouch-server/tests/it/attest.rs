//! attest: a device asks for a challenge, answers it with signed evidence, and gets a
//! verdict with an EAR ticket. The device's side is built here from a simple account
//! of its health, clean unless a switch says otherwise, so every reason code can be
//! provoked on its own.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};
use vouch_proto::attest::{
    self as wire, ChallengeRequestClaims, Command, CommandKind, CommandResult, DeviceState, EAR_PROFILE, EarStatus,
    EvidenceClaims, MerchantProfile, Observation, TicketClaims,
};
use vouch_proto::crypto::{SystemRandom, sha256};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::jws::UnverifiedJws;
use vouch_proto::{Clock, SigningKey};
use vouch_server::Config;

use crate::support::{Reply, TestClock, TestDevice, TestServer, server_with_clock};

/// The model and firmware every `TestDevice` enrols with.
pub const MODEL: &str = "R-100";
pub const FIRMWARE: &str = "1.2.3";
pub const READER_FIRMWARE: &str = "3.1.0";
pub const MIN_OS_PATCH_LEVEL: &str = "2026-01-01";
pub const POLICY_ID: &str = "vouch-attest-default@1";
const BERLIN: (f64, f64) = (52.52, 13.405);
const NEW_YORK: (f64, f64) = (40.713, -74.006);

pub fn hex_sha256(text: &str) -> String {
    vouch_proto::hex::encode(sha256(text.as_bytes()))
}

/// What measuring `region` gives on a device running `firmware`, genuine or patched.
pub fn region_digest(region: &str, firmware: &str, patched: bool) -> String {
    let image = if patched { "patched" } else { "genuine" };
    hex_sha256(&format!("{image} {region} of firmware {firmware}"))
}

/// Known-good values for `MODEL` at `firmware`: two measured regions, a minimum patch
/// level and one allowed reader firmware.
pub fn reference_values(firmware: &str) -> Value {
    json!({
        "model": MODEL,
        "firmware_version": firmware,
        "measurements": {
            "boot": region_digest("boot", firmware, false),
            "payment_app": region_digest("payment_app", firmware, false),
        },
        "min_os_patch_level": MIN_OS_PATCH_LEVEL,
        "reader_firmware": [READER_FIRMWARE],
    })
}

/// What a device finds when it runs its commands. `clean()` is a genuine device in
/// Berlin on `FIRMWARE`; each field is one way to spoil it.
#[derive(Debug, Clone)]
pub struct DeviceHealth {
    pub rooted: bool,
    pub debugger_attached: bool,
    pub hooked: bool,
    pub emulator: bool,
    pub tamper_switch_open: bool,
    /// A region whose code was changed.
    pub patched_region: Option<&'static str>,
    pub os_patch_level: String,
    pub reader_firmware: String,
    pub location: (f64, f64),
    pub firmware_version: String,
    /// The merchant profile saved on the device; `None` is the one it is enrolled for.
    pub merchant_id: Option<String>,
    /// Names previous evidence the server never saw instead of the last one it accepted.
    pub broken_chain: bool,
}

impl DeviceHealth {
    pub fn clean() -> Self {
        DeviceHealth {
            rooted: false,
            debugger_attached: false,
            hooked: false,
            emulator: false,
            tamper_switch_open: false,
            patched_region: None,
            os_patch_level: "2026-03-01".into(),
            reader_firmware: READER_FIRMWARE.into(),
            location: BERLIN,
            firmware_version: FIRMWARE.into(),
            merchant_id: None,
            broken_chain: false,
        }
    }

    /// The device's honest answer to one command.
    pub fn observe(&self, command: &Command) -> Observation {
        match command.kind {
            CommandKind::Measure => {
                let region = command.region.clone().expect("measure names a region");
                let patched = self.patched_region == Some(region.as_str());
                Observation::Measure { digest: region_digest(&region, &self.firmware_version, patched), region }
            }
            CommandKind::RootCheck => Observation::RootCheck { detected: self.rooted },
            CommandKind::DebuggerCheck => Observation::DebuggerCheck { detected: self.debugger_attached },
            CommandKind::HookCheck => Observation::HookCheck { detected: self.hooked },
            CommandKind::EmulatorCheck => Observation::EmulatorCheck { detected: self.emulator },
            CommandKind::TamperSwitch => Observation::TamperSwitch { open: self.tamper_switch_open },
            CommandKind::OsPatchLevel => Observation::OsPatchLevel { patch_level: self.os_patch_level.clone() },
            CommandKind::Geo => Observation::Geo { lat: self.location.0, lon: self.location.1 },
            CommandKind::ReaderFirmware => Observation::ReaderFirmware { version: self.reader_firmware.clone() },
        }
    }

    /// One result per command, in order.
    pub fn answer(&self, commands: &[Command]) -> Vec<CommandResult> {
        commands.iter().map(|c| CommandResult { id: c.id.clone(), observation: self.observe(c) }).collect()
    }
}

/// The 201 answer to a challenge request.
#[derive(Debug, Clone, Deserialize)]
pub struct Challenge {
    pub attestation_id: String,
    pub nonce: String,
    pub commands: Vec<Command>,
    pub expires_at: i64,
}

/// An enrolled device and the hash of the last evidence the server accepted from it.
pub struct Enrolled {
    pub device: TestDevice,
    pub device_id: String,
    pub last_evidence_hash: Option<String>,
}

/// A server on a hand-moved clock with one merchant.
pub struct Attest {
    pub server: TestServer,
    pub clock: TestClock,
    pub merchant_id: String,
    pub rng: SystemRandom,
}

/// A fixture whose server knows the reference values of `FIRMWARE`.
pub async fn fixture() -> Attest {
    let attest = bare_fixture(|_| {}).await;
    attest.put_reference(&reference_values(FIRMWARE)).await;
    attest
}

/// A fixture with no reference values, on a configuration `configure` adjusts.
pub async fn bare_fixture(configure: impl FnOnce(&mut Config)) -> Attest {
    let clock = TestClock::starting_now();
    let server = server_with_clock(
        |config| {
            config.rate_limit_per_sec = 100_000;
            config.rate_limit_burst = 100_000;
            configure(config);
        },
        Arc::new(clock.clone()),
    )
    .await;
    let merchant_id = server.merchant("Corner Coffee").await;
    Attest { server, clock, merchant_id, rng: SystemRandom::new() }
}

impl Attest {
    pub fn admin(&self) -> Option<&str> {
        Some(&self.server.admin_key)
    }

    pub async fn put_reference(&self, values: &Value) {
        let stored = self.server.expect(200, "PUT", "/v1/reference-values", self.admin(), Some(values.clone())).await;
        assert_eq!(&stored, values);
    }

    pub async fn enrol(&self, kind: DeviceKind) -> Enrolled {
        let device = TestDevice::new(kind);
        let enrolled = self.server.enrol(&device, &self.merchant_id).await;
        let device_id = enrolled["device_id"].as_str().unwrap().to_owned();
        Enrolled { device, device_id, last_evidence_hash: None }
    }

    /// A challenge request for `device_id` signed by `key`, issued `age_secs` ago.
    pub fn challenge_request(&self, key: &SigningKey, device_id: &str, age_secs: i64) -> String {
        let claims = ChallengeRequestClaims { device_id: device_id.to_owned(), iat: self.clock.now_unix() - age_secs };
        wire::sign_challenge_request(&claims, key, &self.rng).unwrap()
    }

    pub async fn request_challenge(&self, request: &str) -> Reply {
        self.server.call("POST", "/v1/attestations", None, Some(json!({ "request": request }))).await
    }

    pub async fn challenge(&self, device: &Enrolled) -> Challenge {
        let reply = self.request_challenge(&self.challenge_request(&device.device.key, &device.device_id, 0)).await;
        assert_eq!(reply.status.as_u16(), 201, "challenge: {}", reply.json);
        serde_json::from_value(reply.json).unwrap()
    }

    /// What `device` in `health` signs in answer to `challenge`.
    pub fn evidence_claims(&self, device: &Enrolled, challenge: &Challenge, health: &DeviceHealth) -> EvidenceClaims {
        let prev_evidence_hash = if health.broken_chain {
            Some(wire::evidence_hash("evidence the server never saw"))
        } else {
            device.last_evidence_hash.clone()
        };
        EvidenceClaims {
            attestation_id: challenge.attestation_id.clone(),
            device_id: device.device_id.clone(),
            nonce: challenge.nonce.clone(),
            iat: self.clock.now_unix(),
            results: health.answer(&challenge.commands),
            state: DeviceState {
                firmware_version: health.firmware_version.clone(),
                app_version: "4.2.0".into(),
                uptime_secs: 3_600,
            },
            prev_evidence_hash,
            merchant_profile: MerchantProfile {
                merchant_id: health.merchant_id.clone().unwrap_or_else(|| self.merchant_id.clone()),
                mcc: Some("5812".into()),
            },
        }
    }

    pub fn sign_evidence(&self, key: &SigningKey, claims: &EvidenceClaims) -> String {
        wire::sign_evidence(claims, key, &self.rng).unwrap()
    }

    pub async fn submit(&self, attestation_id: &str, evidence: &str) -> Reply {
        let uri = format!("/v1/attestations/{attestation_id}/evidence");
        self.server.call("POST", &uri, None, Some(json!({ "evidence": evidence }))).await
    }

    /// A whole attestation of `device` in `health`; returns the 200 verdict.
    pub async fn attest(&self, device: &mut Enrolled, health: &DeviceHealth) -> Value {
        let challenge = self.challenge(device).await;
        let evidence = self.sign_evidence(&device.device.key, &self.evidence_claims(device, &challenge, health));
        let reply = self.submit(&challenge.attestation_id, &evidence).await;
        assert_eq!(reply.status.as_u16(), 200, "evidence: {}", reply.json);
        assert_eq!(reply.json["attestation_id"].as_str(), Some(challenge.attestation_id.as_str()));
        assert_eq!(reply.json["device_id"].as_str(), Some(device.device_id.as_str()));
        device.last_evidence_hash = Some(wire::evidence_hash(&evidence));
        reply.json
    }

    /// The ticket's claims, verified against the published JWK Set.
    pub async fn verified_ticket(&self, ticket: &str) -> TicketClaims {
        let jwks = self.server.jwks().await;
        wire::verify_ticket(ticket, |kid| jwks.find(kid).and_then(|jwk| jwk.verifying_key().ok()), &self.clock)
            .unwrap_or_else(|e| panic!("ticket does not verify: {e}"))
    }

    /// What `/v1/tickets/verify` says: `(valid, reason)`.
    pub async fn ticket_check(&self, ticket: &str) -> (bool, Option<String>) {
        let body = json!({ "ticket": ticket });
        let reply = self.server.expect(200, "POST", "/v1/tickets/verify", self.admin(), Some(body)).await;
        (reply["valid"].as_bool().unwrap(), reply["reason"].as_str().map(str::to_owned))
    }

    pub async fn change_status(&self, device_id: &str, action: &str) {
        let uri = format!("/v1/devices/{device_id}/{action}");
        self.server.expect(200, "POST", &uri, self.admin(), Some(json!({"reason": "checked"}))).await;
    }

    pub async fn history(&self, device_id: &str) -> Value {
        let uri = format!("/v1/devices/{device_id}/attestations");
        self.server.expect(200, "GET", &uri, self.admin(), None).await
    }
}

pub fn reason_codes(verdict: &Value) -> Vec<String> {
    verdict["reasons"].as_array().unwrap().iter().map(|r| r["code"].as_str().unwrap().to_owned()).collect()
}

fn unverified_payload(ticket: &str) -> Value {
    serde_json::from_slice(UnverifiedJws::parse(ticket).unwrap().payload_unverified()).unwrap()
}

#[tokio::test]
async fn a_clean_terminal_is_affirmed_with_an_ear_ticket_bound_to_its_key() {
    let fx = fixture().await;
    let mut terminal = fx.enrol(DeviceKind::Terminal).await;
    let mark = fx.server.audit_mark().await;
    let verdict = fx.attest(&mut terminal, &DeviceHealth::clean()).await;
    assert_eq!(verdict["status"], "affirming", "{verdict}");
    assert_eq!(verdict["risk"], 0);
    assert_eq!(verdict["reasons"], json!([]));
    assert_eq!(verdict["risk_signals"], json!([]));

    let ticket = verdict["ticket"].as_str().unwrap();
    let claims = fx.verified_ticket(ticket).await;
    assert_eq!(claims.eat_profile, EAR_PROFILE);
    assert_eq!(claims.eat_profile, "tag:ietf.org,2026:rats/ear#04");
    assert_eq!(claims.ear_status, EarStatus::Affirming);
    assert_eq!(claims.sub, terminal.device_id);
    assert_eq!(claims.jti, verdict["ticket_id"].as_str().unwrap());
    assert_eq!(claims.attestation_id, verdict["attestation_id"].as_str().unwrap());
    assert_eq!(claims.exp, verdict["expires_at"].as_i64().unwrap());
    assert!(claims.exp > claims.iat && claims.exp <= claims.iat + 900, "iat {} exp {}", claims.iat, claims.exp);
    assert_eq!(claims.cnf.jkt, terminal.device.key.verifying_key().thumbprint());
    assert_eq!(claims.cnf.jwk, terminal.device.key.verifying_key().to_jwk());
    assert!(claims.conditions.operations.contains(&"payment".to_owned()), "{:?}", claims.conditions);
    assert!(claims.conditions.max_amount_minor > 0);
    assert!(claims.reasons.is_empty());

    // The wire names, as an off-the-shelf JWT library sees them.
    let payload = unverified_payload(ticket);
    let appraisal = &payload["submods"]["terminal"];
    assert_eq!(appraisal["ear_status"], "affirming", "{payload}");
    assert_eq!(appraisal["ear_appraisal_policy_id"], POLICY_ID);
    let vector = appraisal["ear_trustworthiness_vector"].as_object().unwrap();
    assert!(!vector.is_empty() && vector.values().all(|v| v == 2), "{vector:?}");
    assert_eq!(payload["cnf"]["jkt"], claims.cnf.jkt);

    // The second attestation chains to the first.
    fx.clock.advance(60);
    let second = fx.attest(&mut terminal, &DeviceHealth::clean()).await;
    assert_eq!(second["status"], "affirming", "{second}");
    assert_ne!(second["ticket_id"], verdict["ticket_id"]);

    let history = fx.history(&terminal.device_id).await;
    let ids: Vec<&str> = history.as_array().unwrap().iter().map(|a| a["attestation_id"].as_str().unwrap()).collect();
    let expected = [second["attestation_id"].as_str().unwrap(), verdict["attestation_id"].as_str().unwrap()];
    assert_eq!(ids, expected, "history is not newest first: {history}");
    assert_eq!(history[0]["status"], "affirming");
    assert_eq!(history[1]["ticket_id"], verdict["ticket_id"]);

    let device = terminal.device_id.as_str();
    fx.server.assert_audited("two approvals", mark, &[("attestation.affirming", device); 2]).await;
    fx.server.assert_audit_intact("after attestations").await;
}

#[tokio::test]
async fn tickets_are_checked_against_the_device_status_at_use() {
    let fx = fixture().await;
    let mut terminal = fx.enrol(DeviceKind::Terminal).await;
    let verdict = fx.attest(&mut terminal, &DeviceHealth::clean()).await;
    let ticket = verdict["ticket"].as_str().unwrap();
    let device = terminal.device_id.as_str();

    assert_eq!(fx.ticket_check(ticket).await, (true, None));
    fx.change_status(device, "suspend").await;
    assert_eq!(fx.ticket_check(ticket).await, (false, Some("device-not-active".into())));
    fx.change_status(device, "reactivate").await;
    assert_eq!(fx.ticket_check(ticket).await, (true, None));
    fx.change_status(device, "revoke").await;
    assert_eq!(fx.ticket_check(ticket).await, (false, Some("device-not-active".into())));
    // The signature alone still verifies: the status check is what stops it.
    fx.verified_ticket(ticket).await;
}

#[tokio::test]
async fn tickets_expire_and_forgeries_are_invalid() {
    let fx = fixture().await;
    let mut terminal = fx.enrol(DeviceKind::Terminal).await;
    let verdict = fx.attest(&mut terminal, &DeviceHealth::clean()).await;
    let ticket = verdict["ticket"].as_str().unwrap().to_owned();

    // Re-signed by the device itself instead of the server.
    let jws = UnverifiedJws::parse(&ticket).unwrap();
    let forged = vouch_proto::jws::sign(jws.header(), jws.payload_unverified(), &terminal.device.key, &fx.rng).unwrap();
    for (name, token) in [("forged", forged.as_str()), ("garbage", "not.a.ticket"), ("empty", "")] {
        assert_eq!(fx.ticket_check(token).await, (false, Some("invalid-ticket".into())), "{name}");
    }
    let no_key = json!({ "ticket": ticket });
    let reply = fx.server.call("POST", "/v1/tickets/verify", None, Some(no_key)).await;
    assert_eq!(reply.status.as_u16(), 401, "{}", reply.json);

    let exp = verdict["expires_at"].as_i64().unwrap();
    fx.clock.advance(exp - fx.clock.now_unix());
    assert_eq!(fx.ticket_check(&ticket).await, (true, None), "valid up to its exp");
    fx.clock.advance(1);
    assert_eq!(fx.ticket_check(&ticket).await, (false, Some("expired".into())));
}

/// Attests a fresh `kind` device once per entry of `history`, a minute apart, all but the
/// last affirmed; asserts the last verdict is `status` with exactly the reasons `codes`, in the answer, the
/// signed ticket, the history and the audit log.
async fn check_verdict(fx: &Attest, kind: DeviceKind, history: &[DeviceHealth], status: &str, codes: &[&str]) {
    let mut device = fx.enrol(kind).await;
    let (last, before) = history.split_last().unwrap();
    for health in before {
        let earlier = fx.attest(&mut device, health).await;
        assert_eq!(earlier["status"], "affirming", "earlier attestation: {earlier}");
        fx.clock.advance(60);
    }
    let mark = fx.server.audit_mark().await;
    let verdict = fx.attest(&mut device, last).await;
    assert_eq!(verdict["status"], status, "{verdict}");
    assert_eq!(reason_codes(&verdict), codes, "{verdict}");
    assert_eq!(verdict["risk_signals"], json!(codes));
    assert!(verdict["reasons"].as_array().unwrap().iter().all(|r| !r["text"].as_str().unwrap().is_empty()));
    assert!(verdict["risk"].as_u64().unwrap() > 0, "{verdict}");

    let claims = fx.verified_ticket(verdict["ticket"].as_str().unwrap()).await;
    assert_eq!(claims.ear_status.as_str(), status);
    assert_eq!(claims.reasons.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(), codes);
    let appraisal = &claims.submods[kind.as_str()];
    assert_eq!(appraisal.ear_status.as_str(), status);
    assert_eq!(appraisal.ear_appraisal_policy_id, POLICY_ID);
    // Some component is no longer affirmed (AR4SI: 2 affirming, 32 warning, 96 contraindicated).
    let worst = appraisal.ear_trustworthiness_vector.values().max().copied();
    assert!(worst.is_some_and(|w| w >= 32), "{:?}", appraisal.ear_trustworthiness_vector);

    let (valid, reason) = fx.ticket_check(verdict["ticket"].as_str().unwrap()).await;
    if status == "contraindicated" {
        assert_eq!((valid, reason.as_deref()), (false, Some("contraindicated")));
        assert!(claims.conditions.operations.is_empty(), "{:?}", claims.conditions);
        assert_eq!(claims.conditions.max_amount_minor, 0);
    } else {
        assert_eq!((valid, reason), (true, None));
    }
    let history = fx.history(&device.device_id).await;
    assert_eq!(history[0]["attestation_id"], verdict["attestation_id"]);
    assert_eq!(history[0]["status"], status);
    assert_eq!(history[0]["reasons"], verdict["reasons"]);
    let action = format!("attestation.{status}");
    fx.server.assert_audited(status, mark, &[(action.as_str(), device.device_id.as_str())]).await;
}

async fn check_denied(kind: DeviceKind, spoil: impl FnOnce(&mut DeviceHealth), code: &str) {
    let mut health = DeviceHealth::clean();
    spoil(&mut health);
    check_verdict(&fixture().await, kind, &[health], "contraindicated", &[code]).await;
}

#[tokio::test]
async fn a_rooted_terminal_is_denied() {
    check_denied(DeviceKind::Terminal, |h| h.rooted = true, "rooted").await;
}

#[tokio::test]
async fn a_terminal_with_a_debugger_is_denied() {
    check_denied(DeviceKind::Terminal, |h| h.debugger_attached = true, "debugger_attached").await;
}

#[tokio::test]
async fn a_hooked_pos_app_is_denied() {
    check_denied(DeviceKind::Pos, |h| h.hooked = true, "hooked").await;
}

#[tokio::test]
async fn a_pos_app_on_an_emulator_is_denied() {
    check_denied(DeviceKind::Pos, |h| h.emulator = true, "emulator").await;
}

#[tokio::test]
async fn a_patched_region_is_denied() {
    check_denied(DeviceKind::Terminal, |h| h.patched_region = Some("payment_app"), "measurement_mismatch").await;
}

#[tokio::test]
async fn an_open_tamper_switch_is_denied() {
    check_denied(DeviceKind::Terminal, |h| h.tamper_switch_open = true, "tamper_switch_open").await;
}

#[tokio::test]
async fn a_reader_firmware_not_allowed_is_denied() {
    check_denied(DeviceKind::Terminal, |h| h.reader_firmware = "3.0.9".into(), "reader_firmware_not_allowed").await;
}

#[tokio::test]
async fn another_merchants_profile_is_denied() {
    check_denied(DeviceKind::Terminal, |h| h.merchant_id = Some("mch_elsewhere".into()), "merchant_mismatch").await;
}

#[tokio::test]
async fn first_evidence_naming_a_previous_one_is_denied() {
    check_denied(DeviceKind::Terminal, |h| h.broken_chain = true, "broken_state_chain").await;
}

#[tokio::test]
async fn an_outdated_os_patch_is_a_warning_not_a_denial() {
    let mut outdated = DeviceHealth::clean();
    outdated.os_patch_level = "2025-11-01".into();
    let fx = fixture().await;
    check_verdict(&fx, DeviceKind::Terminal, &[outdated.clone()], "warning", &["os_patch_outdated"]).await;
    // A warning ticket allows small payments only.
    let mut device = fx.enrol(DeviceKind::Pos).await;
    let verdict = fx.attest(&mut device, &outdated).await;
    let claims = fx.verified_ticket(verdict["ticket"].as_str().unwrap()).await;
    assert_eq!(claims.conditions.operations, ["payment"]);
    assert!(claims.conditions.max_amount_minor > 0 && claims.conditions.max_amount_minor < 100_000);
}

#[tokio::test]
async fn firmware_without_reference_values_is_denied() {
    let fx = bare_fixture(|_| {}).await;
    check_verdict(&fx, DeviceKind::Terminal, &[DeviceHealth::clean()], "contraindicated", &["unknown_firmware"]).await;
}

#[tokio::test]
async fn a_wrong_previous_evidence_hash_is_denied() {
    let mut broken = DeviceHealth::clean();
    broken.broken_chain = true;
    let fx = fixture().await;
    check_verdict(
        &fx,
        DeviceKind::Terminal,
        &[DeviceHealth::clean(), broken],
        "contraindicated",
        &["broken_state_chain"],
    )
    .await;
}

#[tokio::test]
async fn going_back_to_older_firmware_is_denied() {
    let fx = fixture().await;
    fx.put_reference(&reference_values("1.2.2")).await;
    let mut older = DeviceHealth::clean();
    older.firmware_version = "1.2.2".into();
    // The older firmware is known and clean on its own.
    check_verdict(
        &fx,
        DeviceKind::Terminal,
        &[DeviceHealth::clean(), older],
        "contraindicated",
        &["firmware_downgrade"],
    )
    .await;
}

#[tokio::test]
async fn a_device_on_two_continents_a_minute_apart_is_denied() {
    let fx = bare_fixture(|config| config.attest_spot_check_share = 1.0).await;
    fx.put_reference(&reference_values(FIRMWARE)).await;
    let mut moved = DeviceHealth::clean();
    moved.location = NEW_YORK;
    check_verdict(
        &fx,
        DeviceKind::Terminal,
        &[DeviceHealth::clean(), moved],
        "contraindicated",
        &["impossible_travel"],
    )
    .await;
}

#[tokio::test]
async fn a_risky_device_gets_the_full_scan_next_time() {
    let fx = fixture().await;
    let mut terminal = fx.enrol(DeviceKind::Terminal).await;
    let kinds = |challenge: &Challenge| challenge.commands.iter().map(|c| c.kind).collect::<Vec<_>>();
    let mut rooted = DeviceHealth::clean();
    rooted.rooted = true;
    let verdict = fx.attest(&mut terminal, &rooted).await;
    assert_eq!(verdict["status"], "contraindicated");
    let next = fx.challenge(&terminal).await;
    for kind in [CommandKind::Geo, CommandKind::HookCheck, CommandKind::EmulatorCheck, CommandKind::TamperSwitch] {
        assert!(kinds(&next).contains(&kind), "{kind:?} not asked after a denial: {:?}", next.commands);
    }
    let regions: Vec<_> = next.commands.iter().filter_map(|c| c.region.as_deref()).collect();
    assert_eq!(regions, ["boot", "payment_app"], "the regions of the reference values");
    assert!(next.expires_at > fx.clock.now_unix());
}
