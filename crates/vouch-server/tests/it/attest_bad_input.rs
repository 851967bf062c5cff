//! attest, bad input: every refused challenge request, evidence or reference document is
//! a 4xx problem naming the reason. Refused evidence writes one
//! `attestation.evidence_refused` audit row and nothing else: no attestation is stored
//! and the challenge can still be answered.

use serde_json::{Value, json};
use vouch_proto::SigningKey;
use vouch_proto::attest::{self as wire, CommandResult, EVIDENCE_TYP, EvidenceClaims, Observation};
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::jws::{self, Header};

use crate::attest::{Attest, Challenge, DeviceHealth, Enrolled, FIRMWARE, fixture, reference_values};
use crate::support::Case;

/// Evidence signed as a JWT of type `typ` over any JSON payload.
fn signed(key: &SigningKey, typ: &str, payload: &Value) -> String {
    jws::sign(&Header::es256(typ), payload.to_string().as_bytes(), key, &SystemRandom::new()).unwrap()
}

impl Attest {
    /// Asserts the challenge is unanswered and the device has no attestation.
    async fn assert_unanswered(&self, context: &str, device: &Enrolled, challenge: &Challenge) {
        let stored = self.server.state.store.challenge(&challenge.attestation_id).await.unwrap();
        assert_eq!(stored.consumed_at, None, "{context}: the challenge was consumed");
        assert_eq!(self.history(&device.device_id).await, json!([]), "{context}: an attestation was stored");
    }

    /// Answers `challenge` correctly and expects it accepted.
    async fn answer_clean(&self, device: &Enrolled, challenge: &Challenge) -> Value {
        let claims = self.evidence_claims(device, challenge, &DeviceHealth::clean());
        let reply = self.submit(&challenge.attestation_id, &self.sign_evidence(&device.device.key, &claims)).await;
        assert_eq!(reply.status.as_u16(), 200, "the challenge is still open: {}", reply.json);
        reply.json
    }
}

#[tokio::test]
async fn refused_evidence_leaves_the_challenge_open() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let challenge = fx.challenge(&terminal).await;
    let other_challenge = fx.challenge(&terminal).await;
    let other_device = fx.enrol(DeviceKind::Terminal).await;
    let key = &terminal.device.key;
    let good = fx.evidence_claims(&terminal, &challenge, &DeviceHealth::clean());
    let with = |change: &dyn Fn(&mut EvidenceClaims)| {
        let mut claims = good.clone();
        change(&mut claims);
        fx.sign_evidence(key, &claims)
    };
    let result = |id: &str, observation: Observation| CommandResult { id: id.into(), observation };
    let first = good.results[0].clone();
    let mut unknown_field = serde_json::to_value(&good).unwrap();
    unknown_field["firmware_signed_by"] = json!("me");
    let mut no_nonce = serde_json::to_value(&good).unwrap();
    no_nonce.as_object_mut().unwrap().remove("nonce");

    let table: Vec<(&str, String, u16, &str)> = vec![
        ("not a JWS", "evidence".into(), 400, "invalid-evidence"),
        ("two parts", "e30.e30".into(), 400, "invalid-evidence"),
        ("empty", String::new(), 400, "invalid-evidence"),
        (
            "request typ",
            signed(key, wire::CHALLENGE_REQUEST_TYP, &serde_json::to_value(&good).unwrap()),
            400,
            "invalid-evidence",
        ),
        ("plain JWT typ", signed(key, "JWT", &serde_json::to_value(&good).unwrap()), 400, "invalid-evidence"),
        ("unknown claim", signed(key, EVIDENCE_TYP, &unknown_field), 400, "invalid-evidence"),
        ("missing nonce", signed(key, EVIDENCE_TYP, &no_nonce), 400, "invalid-evidence"),
        ("empty merchant", with(&|c| c.merchant_profile.merchant_id.clear()), 400, "invalid-evidence"),
        ("over-long app version", with(&|c| c.state.app_version = "v".repeat(129)), 400, "invalid-evidence"),
        (
            "too many results",
            with(&|c| c.results = (0..33).map(|i| result(&format!("c{i}"), first.observation.clone())).collect()),
            400,
            "invalid-evidence",
        ),
        ("another key", fx.sign_evidence(&other_device.device.key, &good), 400, "bad-signature"),
        ("wrong nonce", with(&|c| c.nonce = other_challenge.nonce.clone()), 400, "nonce-mismatch"),
        (
            "another attestation",
            with(&|c| c.attestation_id = other_challenge.attestation_id.clone()),
            400,
            "evidence-mismatch",
        ),
        ("another device", with(&|c| c.device_id = other_device.device_id.clone()), 400, "evidence-mismatch"),
        (
            "a missing command",
            with(&|c| {
                c.results.pop();
            }),
            422,
            "incomplete-evidence",
        ),
        ("no results", with(&|c| c.results.clear()), 422, "incomplete-evidence"),
        (
            "an extra result",
            with(&|c| c.results.push(result("c99", Observation::RootCheck { detected: false }))),
            422,
            "unexpected-result",
        ),
        ("a duplicate result", with(&|c| c.results.push(first.clone())), 422, "unexpected-result"),
        (
            "a result of the wrong kind",
            with(&|c| c.results[0].observation = Observation::TamperSwitch { open: false }),
            422,
            "unexpected-result",
        ),
        (
            "a measurement of another region",
            with(&|c| {
                let measured = c.results.iter_mut().find(|r| matches!(r.observation, Observation::Measure { .. }));
                measured.unwrap().observation =
                    Observation::Measure { region: "bootloader".into(), digest: "00".into() };
            }),
            422,
            "unexpected-result",
        ),
    ];
    let mark = fx.server.audit_mark().await;
    let uri = format!("/v1/attestations/{}/evidence", challenge.attestation_id);
    for (name, evidence, status, problem) in &table {
        let case = Case::new(*name, "POST", uri.clone()).json(json!({ "evidence": evidence }));
        fx.server.check(&case, *status, problem).await;
    }
    let refused = vec![("attestation.evidence_refused", terminal.device_id.as_str()); table.len()];
    fx.server.assert_audited("refused evidence", mark, &refused).await;
    fx.assert_unanswered("after refused evidence", &terminal, &challenge).await;
    assert_eq!(fx.history(&other_device.device_id).await, json!([]));

    let verdict = fx.answer_clean(&terminal, &challenge).await;
    assert_eq!(verdict["status"], "affirming", "{verdict}");
    fx.server.assert_audit_intact("after refused evidence").await;
}

#[tokio::test]
async fn late_evidence_is_refused() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let challenge = fx.challenge(&terminal).await;
    let evidence =
        fx.sign_evidence(&terminal.device.key, &fx.evidence_claims(&terminal, &challenge, &DeviceHealth::clean()));
    fx.clock.advance(challenge.expires_at - fx.server.now() + 1);
    let mark = fx.server.audit_mark().await;
    let case = Case::new("late", "POST", format!("/v1/attestations/{}/evidence", challenge.attestation_id))
        .json(json!({ "evidence": evidence }));
    fx.server.check(&case, 400, "late-evidence").await;
    fx.server.assert_audited("late", mark, &[("attestation.evidence_refused", terminal.device_id.as_str())]).await;
    fx.assert_unanswered("late", &terminal, &challenge).await;
}

#[tokio::test]
async fn evidence_on_the_last_second_is_accepted() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let challenge = fx.challenge(&terminal).await;
    fx.clock.advance(challenge.expires_at - fx.server.now());
    fx.answer_clean(&terminal, &challenge).await;
}

#[tokio::test]
async fn replayed_evidence_is_refused() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let challenge = fx.challenge(&terminal).await;
    let evidence =
        fx.sign_evidence(&terminal.device.key, &fx.evidence_claims(&terminal, &challenge, &DeviceHealth::clean()));
    let mark = fx.server.audit_mark().await;
    let first = fx.submit(&challenge.attestation_id, &evidence).await;
    assert_eq!(first.status.as_u16(), 200, "{}", first.json);
    let case = Case::new("replay", "POST", format!("/v1/attestations/{}/evidence", challenge.attestation_id))
        .json(json!({ "evidence": evidence }));
    fx.server.check(&case, 409, "replayed-evidence").await;
    let device = terminal.device_id.as_str();
    let expected = [("attestation.affirming", device), ("attestation.evidence_refused", device)];
    fx.server.assert_audited("replay", mark, &expected).await;
    let history = fx.history(device).await;
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
    assert_eq!(history[0]["ticket_id"], first.json["ticket_id"]);
}

#[tokio::test]
async fn evidence_of_a_device_suspended_meanwhile_is_refused() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let challenge = fx.challenge(&terminal).await;
    fx.change_status(&terminal.device_id, "suspend").await;
    let evidence =
        fx.sign_evidence(&terminal.device.key, &fx.evidence_claims(&terminal, &challenge, &DeviceHealth::clean()));
    let mark = fx.server.audit_mark().await;
    let case = Case::new("suspended", "POST", format!("/v1/attestations/{}/evidence", challenge.attestation_id))
        .json(json!({ "evidence": evidence }));
    fx.server.check(&case, 403, "device-not-active").await;
    fx.server.assert_audited("suspended", mark, &[("attestation.evidence_refused", terminal.device_id.as_str())]).await;
    fx.assert_unanswered("suspended", &terminal, &challenge).await;
    fx.change_status(&terminal.device_id, "reactivate").await;
    fx.answer_clean(&terminal, &challenge).await;
}

#[tokio::test]
async fn evidence_for_an_unknown_attestation_is_not_found() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let challenge = fx.challenge(&terminal).await;
    let evidence =
        fx.sign_evidence(&terminal.device.key, &fx.evidence_claims(&terminal, &challenge, &DeviceHealth::clean()));
    let mark = fx.server.audit_mark().await;
    for id in ["att_missing", "x", &"a".repeat(300)] {
        let case = Case::new("unknown id", "POST", format!("/v1/attestations/{id}/evidence"))
            .json(json!({ "evidence": evidence }));
        fx.server.check(&case, 404, "unknown-attestation").await;
    }
    fx.server.assert_audited("unknown attestations", mark, &[]).await;
    fx.assert_unanswered("unknown attestations", &terminal, &challenge).await;
}

#[tokio::test]
async fn refused_challenge_requests_write_nothing() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let suspended = fx.enrol(DeviceKind::Terminal).await;
    let revoked = fx.enrol(DeviceKind::Pos).await;
    fx.change_status(&suspended.device_id, "suspend").await;
    fx.change_status(&revoked.device_id, "revoke").await;
    let key = &terminal.device.key;
    let id = terminal.device_id.as_str();
    let window = fx.server.state.config.proof_iat_window_secs;
    let table: Vec<(&str, String, u16, &str)> = vec![
        ("unknown device", fx.challenge_request(key, "dev_missing", 0), 404, "unknown-device"),
        (
            "suspended device",
            fx.challenge_request(&suspended.device.key, &suspended.device_id, 0),
            403,
            "device-not-active",
        ),
        ("revoked device", fx.challenge_request(&revoked.device.key, &revoked.device_id, 0), 403, "device-not-active"),
        ("another key", fx.challenge_request(&suspended.device.key, id, 0), 400, "bad-signature"),
        ("stale iat", fx.challenge_request(key, id, window + 1), 400, "stale-request"),
        ("future iat", fx.challenge_request(key, id, -(window + 1)), 400, "stale-request"),
        ("not a JWS", "request".into(), 400, "invalid-request"),
        ("empty", String::new(), 400, "invalid-request"),
        (
            "no device id",
            signed(key, wire::CHALLENGE_REQUEST_TYP, &json!({"iat": fx.server.now()})),
            400,
            "invalid-request",
        ),
        (
            "unknown claim",
            signed(key, wire::CHALLENGE_REQUEST_TYP, &json!({"device_id": id, "iat": fx.server.now(), "risk": 0})),
            400,
            "invalid-request",
        ),
    ];
    let mark = fx.server.audit_mark().await;
    for (name, request, status, problem) in &table {
        let case = Case::new(*name, "POST", "/v1/attestations").json(json!({ "request": request }));
        fx.server.check(&case, *status, problem).await;
    }
    fx.server.assert_audited("refused challenge requests", mark, &[]).await;
    // Inside the window either way is fine.
    for age in [window, -window] {
        let reply = fx.request_challenge(&fx.challenge_request(key, id, age)).await;
        assert_eq!(reply.status.as_u16(), 201, "iat {age} s ago: {}", reply.json);
    }
}

/// A body it accepts for each endpoint that takes one, and the same with a field of the
/// wrong type.
fn body_endpoints(
    fx: &Attest,
    terminal: &Enrolled,
    challenge: &Challenge,
) -> Vec<(&'static str, String, Value, Value)> {
    let request = fx.challenge_request(&terminal.device.key, &terminal.device_id, 0);
    let evidence =
        fx.sign_evidence(&terminal.device.key, &fx.evidence_claims(terminal, challenge, &DeviceHealth::clean()));
    let mut wrong_reference = reference_values(FIRMWARE);
    wrong_reference["measurements"] = json!(["boot"]);
    vec![
        ("POST", "/v1/attestations".into(), json!({ "request": request }), json!({ "request": 7 })),
        (
            "POST",
            format!("/v1/attestations/{}/evidence", challenge.attestation_id),
            json!({ "evidence": evidence }),
            json!({ "evidence": ["a", "b", "c"] }),
        ),
        ("PUT", "/v1/reference-values".into(), reference_values(FIRMWARE), wrong_reference),
    ]
}

#[tokio::test]
async fn malformed_bodies_are_refused() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let challenge = fx.challenge(&terminal).await;
    let admin = fx.server.admin_key.clone();
    let oversized = format!("{{\"pad\":\"{}\"}}", "x".repeat(64 * 1024));
    let mark = fx.server.audit_mark().await;
    for (method, uri, valid, wrong_types) in body_endpoints(&fx, &terminal, &challenge) {
        let case = |class: &str| {
            let case = Case::new(format!("{class} body"), method, uri.clone());
            if method == "PUT" { case.key(&admin) } else { case }
        };
        let text = valid.to_string();
        let (first_name, first_value) = valid.as_object().unwrap().iter().next().unwrap();
        let duplicated = format!("{{{}:{first_value},{}", json!(first_name), &text[1..]);
        let mut extra = valid.clone();
        extra["surprise"] = json!(1);
        let json_type = Some("application/json");
        let table: Vec<(Case, u16, &str)> = vec![
            (case("truncated JSON").raw(json_type, text[..text.len() - 1].to_owned()), 400, "malformed-json"),
            (case("not JSON").raw(json_type, "request=x"), 400, "malformed-json"),
            (case("empty").raw(json_type, ""), 400, "malformed-json"),
            (case("trailing garbage").raw(json_type, format!("{text} x")), 400, "malformed-json"),
            (case("wrong types").json(wrong_types), 422, "invalid-body"),
            (case("null").json(Value::Null), 422, "invalid-body"),
            (case("a string").json(json!("a.b.c")), 422, "invalid-body"),
            (case("missing fields").json(json!({})), 422, "invalid-body"),
            (case("duplicate field").raw(json_type, duplicated), 422, "invalid-body"),
            (case("unknown field").json(extra), 422, "invalid-body"),
            (case("oversized").raw(json_type, oversized.clone()), 413, "body-too-large"),
            (case("no content type").raw(None, text.clone()), 415, "unsupported-media-type"),
            (case("text content type").raw(Some("text/plain"), text.clone()), 415, "unsupported-media-type"),
        ];
        for (case, status, problem) in &table {
            fx.server.check(case, *status, problem).await;
        }
    }
    fx.server.assert_audited("malformed bodies", mark, &[]).await;
    fx.assert_unanswered("after malformed bodies", &terminal, &challenge).await;
    let references = fx.server.expect(200, "GET", "/v1/reference-values", Some(&admin), None).await;
    assert_eq!(references, json!([reference_values(FIRMWARE)]));
}

#[tokio::test]
async fn invalid_reference_values_are_refused() {
    let fx = fixture().await;
    let admin = fx.server.admin_key.clone();
    let with = |change: &dyn Fn(&mut Value)| {
        let mut values = reference_values("2.0.0");
        change(&mut values);
        values
    };
    let digest = |d: Value| move |v: &mut Value| v["measurements"]["boot"] = d.clone();
    let table: Vec<(&str, Value)> = vec![
        ("short digest", with(&digest(json!("ab".repeat(31))))),
        ("long digest", with(&digest(json!("ab".repeat(33))))),
        ("non-hex digest", with(&digest(json!("zz".repeat(32))))),
        ("prefixed digest", with(&digest(json!(format!("sha256:{}", "ab".repeat(28)))))),
        ("empty digest", with(&digest(json!("")))),
        ("empty region", with(&|v| v["measurements"] = json!({"": "ab".repeat(32)}))),
        ("region with a space", with(&|v| v["measurements"] = json!({"boot loader": "ab".repeat(32)}))),
        (
            "too many regions",
            with(&|v| {
                v["measurements"] = (0..33).map(|i| (format!("region{i}"), json!("ab".repeat(32)))).collect();
            }),
        ),
        ("slashed patch level", with(&|v| v["min_os_patch_level"] = json!("2026/01/01"))),
        ("compact patch level", with(&|v| v["min_os_patch_level"] = json!("20260101"))),
        ("short patch level", with(&|v| v["min_os_patch_level"] = json!("2026-1-1"))),
        ("empty patch level", with(&|v| v["min_os_patch_level"] = json!(""))),
        ("empty reader firmware", with(&|v| v["reader_firmware"] = json!([""]))),
        (
            "too many reader firmwares",
            with(&|v| v["reader_firmware"] = (0..33).map(|i| json!(format!("3.{i}"))).collect()),
        ),
        ("empty model", with(&|v| v["model"] = json!(""))),
        ("blank firmware", with(&|v| v["firmware_version"] = json!("  "))),
        ("long model", with(&|v| v["model"] = json!("m".repeat(129)))),
        ("control character in model", with(&|v| v["model"] = json!("R\u{1}100"))),
    ];
    let mark = fx.server.audit_mark().await;
    for (name, body) in table {
        let case = Case::new(name, "PUT", "/v1/reference-values").key(&admin).json(body);
        fx.server.check(&case, 422, "invalid-field").await;
    }
    // Values of the wrong type are the body's fault.
    for (name, body) in [
        ("digest as a number", with(&|v| v["measurements"]["boot"] = json!(7))),
        ("patch level as a number", with(&|v| v["min_os_patch_level"] = json!(20260101))),
        ("reader firmware as a string", with(&|v| v["reader_firmware"] = json!("3.1.0"))),
    ] {
        let case = Case::new(name, "PUT", "/v1/reference-values").key(&admin).json(body);
        fx.server.check(&case, 422, "invalid-body").await;
    }
    fx.server.assert_audited("invalid reference values", mark, &[]).await;
    let stored = fx.server.expect(200, "GET", "/v1/reference-values", Some(&admin), None).await;
    assert_eq!(stored, json!([reference_values(FIRMWARE)]), "a refused document was stored");

    // Digests in capitals are hex too, and only the admin scope may set them.
    let upper = with(&|v| v["measurements"]["boot"] = json!("AB".repeat(32)));
    fx.server.expect(200, "PUT", "/v1/reference-values", Some(&admin), Some(upper)).await;
    let (_, terminal_key) = fx.server.api_key(&["terminal"]).await;
    let case =
        Case::new("terminal key", "PUT", "/v1/reference-values").key(&terminal_key).json(reference_values(FIRMWARE));
    fx.server.check(&case, 403, "insufficient-scope").await;
    fx.server.check(&Case::new("no key", "GET", "/v1/reference-values"), 401, "missing-credentials").await;
}

#[tokio::test]
async fn history_queries_are_checked() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let admin = fx.server.admin_key.clone();
    let uri = format!("/v1/devices/{}/attestations", terminal.device_id);
    for query in ["?limit=0", "?limit=201", "?limit=x", "?since=0"] {
        let case = Case::new(query, "GET", format!("{uri}{query}")).key(&admin);
        fx.server.check(&case, 400, "invalid-query").await;
    }
    let case = Case::new("unknown device", "GET", "/v1/devices/dev_missing/attestations").key(&admin);
    fx.server.check(&case, 404, "not-found").await;
    let (_, terminal_key) = fx.server.api_key(&["terminal"]).await;
    fx.server.check(&Case::new("terminal key", "GET", uri.clone()).key(&terminal_key), 403, "insufficient-scope").await;
    fx.server.expect(200, "GET", &format!("{uri}?limit=200"), Some(&admin), None).await;
}
