//! session: a POS app asks for a channel with a card reader; the server validates both
//! and grants it, or refuses with a reason of its own for each way either side is
//! wrong. The granted pair then runs Noise KK with the keys the grant names.

use serde_json::{Value, json};
use vouch_proto::b64;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::session::{Handshake, NoiseKeypair, ReaderHelloClaims, TamperState, verify_grant};
use vouch_proto::{Clock, SigningKey};

use crate::attest::{DeviceHealth, Enrolled, FIRMWARE, bare_fixture, fixture, reference_values};
use crate::support::{Reply, assert_problem};
use crate::token::{Holder, Session};

const PATH: &str = "/v1/reader-sessions";

/// A POS app with an open token session, a reader of the same merchant, and their
/// channel keys.
struct Pairing {
    pos: Holder,
    session: Session,
    reader: Enrolled,
    reader_noise: NoiseKeypair,
    pos_noise: NoiseKeypair,
}

impl Pairing {
    async fn new() -> Pairing {
        Self::on(Holder::on(fixture().await, DeviceKind::Pos, &DeviceHealth::clean()).await).await
    }

    async fn on(mut pos: Holder) -> Pairing {
        let session = pos.session().await;
        let reader = pos.fx.enrol(DeviceKind::Reader).await;
        Pairing {
            pos,
            session,
            reader,
            reader_noise: NoiseKeypair::generate().unwrap(),
            pos_noise: NoiseKeypair::generate().unwrap(),
        }
    }

    fn hello_claims(&self) -> ReaderHelloClaims {
        let now = self.pos.fx.clock.now_unix();
        let tamper = TamperState { switch_open: false };
        ReaderHelloClaims::new(&self.reader.device_id, self.reader_noise.public(), FIRMWARE, tamper, now, &self.pos.rng)
            .unwrap()
    }

    fn sign_hello(&self, claims: &ReaderHelloClaims, key: &SigningKey) -> String {
        claims.sign(key, &self.pos.rng).unwrap()
    }

    fn hello(&self) -> String {
        self.sign_hello(&self.hello_claims(), &self.reader.device.key)
    }

    fn body(&self, hello: &str) -> Value {
        json!({ "reader_hello": hello, "pos_ticket": self.pos.ticket, "pos_static_key": b64::encode(self.pos_noise.public()) })
    }

    async fn ask(&mut self, body: Value) -> Reply {
        let token = self.session.token.clone();
        let proof = self.pos.proof("POST", PATH, Some(&token));
        self.pos.protected(PATH, Some(format!("DPoP {token}")), &[proof], body).await
    }
}

#[tokio::test]
async fn a_validated_pair_gets_a_grant_and_runs_noise_kk_with_it() {
    let mut pairing = Pairing::new().await;
    let claims = pairing.hello_claims();
    let hello = pairing.sign_hello(&claims, &pairing.reader.device.key);
    let mark = pairing.pos.fx.server.audit_mark().await;
    let reply = pairing.ask(pairing.body(&hello)).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.json);
    let session_id = reply.json["session_id"].as_str().unwrap().to_owned();
    assert_eq!(reply.json["reader_static_key"].as_str(), Some(claims.static_key.as_str()));

    // The reader's side: the grant against its pinned keys, its id and its nonce.
    let jwks = pairing.pos.fx.server.jwks().await;
    let pinned = |kid: &str| jwks.find(kid).and_then(|k| k.verifying_key().ok());
    let grant = reply.json["grant"].as_str().unwrap();
    let (granted, pos_key) =
        verify_grant(grant, pinned, &pairing.reader.device_id, &claims.nonce, &pairing.pos.fx.clock).unwrap();
    assert_eq!(granted.session_id, session_id);
    assert_eq!(&pos_key, pairing.pos_noise.public());
    assert_eq!(granted.pos_device_id, pairing.pos.device.device_id);
    pairing.pos.fx.server.assert_audited("grant", mark, &[("reader_session.granted", &session_id)]).await;

    let mut pos = Handshake::pos(&pairing.pos_noise, pairing.reader_noise.public(), &session_id).unwrap();
    let mut reader = Handshake::reader(&pairing.reader_noise, &pos_key, &granted.session_id).unwrap();
    reader.read(&pos.write(b"").unwrap()).unwrap();
    pos.read(&reader.write(b"").unwrap()).unwrap();
    let (mut pos, mut reader) = (pos.into_channel().unwrap(), reader.into_channel().unwrap());
    let card_read = reader.seal(b"\x5a\x08\x47\x61\x73\x90\x01\x01\x00\x10").unwrap();
    assert_eq!(pos.open(&card_read).unwrap(), b"\x5a\x08\x47\x61\x73\x90\x01\x01\x00\x10");

    let again = pairing.ask(pairing.body(&hello)).await;
    assert_problem("the same hello again", &again, 409, "reader-nonce-reused");
    pairing.pos.fx.server.assert_audit_intact("grant").await;
}

#[tokio::test]
async fn each_way_a_reader_can_be_wrong_has_its_own_reason() {
    let mut pairing = Pairing::new().await;
    let stranger = SigningKey::generate(&pairing.pos.rng).unwrap();
    let mut unknown = pairing.hello_claims();
    unknown.reader_id = "dev_unknown".into();
    let mut old_firmware = pairing.hello_claims();
    old_firmware.firmware_version = "0.9.0".into();
    let mut opened = pairing.hello_claims();
    opened.tamper.switch_open = true;
    let mut stale = pairing.hello_claims();
    stale.iat -= 3_600;
    let mut pos_as_reader = pairing.hello_claims();
    pos_as_reader.reader_id = pairing.pos.device.device_id.clone();
    let key = &pairing.reader.device.key;
    let cases = [
        ("not a JWS", "garbage".to_owned(), 400, "invalid-reader-hello"),
        ("unknown reader", pairing.sign_hello(&unknown, &stranger), 404, "unknown-reader"),
        ("signed by another key", pairing.sign_hello(&pairing.hello_claims(), &stranger), 400, "bad-reader-signature"),
        ("stale hello", pairing.sign_hello(&stale, key), 400, "stale-reader-hello"),
        ("firmware without reference values", pairing.sign_hello(&old_firmware, key), 403, "firmware-not-allowed"),
        ("enclosure open", pairing.sign_hello(&opened, key), 403, "reader-tampered"),
        ("a POS as the reader", pairing.sign_hello(&pos_as_reader, pairing.pos.key()), 422, "not-a-reader"),
    ];
    let mark = pairing.pos.fx.server.audit_mark().await;
    for (name, hello, status, problem) in cases {
        assert_problem(name, &pairing.ask(pairing.body(&hello)).await, status, problem);
    }
    let refused = pairing.pos.fx.server.audited_since(mark).await;
    assert_eq!(refused.len(), 7, "every refusal is audited: {refused:?}");
    assert!(refused.iter().all(|(action, _)| action == "reader_session.refused"), "{refused:?}");

    let mut bad_key = pairing.body(&pairing.hello());
    bad_key["pos_static_key"] = json!(b64::encode([1u8; 16]));
    assert_problem("short POS static key", &pairing.ask(bad_key).await, 422, "invalid-static-key");

    pairing.pos.fx.change_status(&pairing.reader.device_id, "revoke").await;
    assert_problem("revoked reader", &pairing.ask(pairing.body(&pairing.hello())).await, 403, "reader-not-active");
}

#[tokio::test]
async fn a_reader_of_another_merchant_is_refused() {
    let mut pairing = Pairing::new().await;
    let other_merchant = pairing.pos.fx.server.merchant("Other shop").await;
    let device = crate::support::TestDevice::new(DeviceKind::Reader);
    let enrolled = pairing.pos.fx.server.enrol(&device, &other_merchant).await;
    pairing.reader =
        Enrolled { device, device_id: enrolled["device_id"].as_str().unwrap().to_owned(), last_evidence_hash: None };
    assert_problem("other merchant", &pairing.ask(pairing.body(&pairing.hello())).await, 403, "merchant-mismatch");
}

#[tokio::test]
async fn each_way_a_pos_ticket_can_be_wrong_has_its_own_reason() {
    let mut pairing = Pairing::new().await;

    // Another POS app's ticket, with this POS app's token.
    let mut other = pairing.pos.fx.enrol(DeviceKind::Pos).await;
    let other_ticket =
        pairing.pos.fx.attest(&mut other, &DeviceHealth::clean()).await["ticket"].as_str().unwrap().to_owned();
    let mut body = pairing.body(&pairing.hello());
    body["pos_ticket"] = json!(other_ticket);
    assert_problem("another POS app's ticket", &pairing.ask(body).await, 403, "pos-ticket-bound-to-another-key");

    let mut body = pairing.body(&pairing.hello());
    body["pos_ticket"] = json!("not.a.ticket");
    assert_problem("not a ticket", &pairing.ask(body).await, 403, "invalid-pos-ticket");

    // A denial issued after the session opened.
    let mut rooted = DeviceHealth::clean();
    rooted.rooted = true;
    let denial = pairing.pos.fx.attest(&mut pairing.pos.device, &rooted).await["ticket"].as_str().unwrap().to_owned();
    let mut body = pairing.body(&pairing.hello());
    body["pos_ticket"] = json!(denial);
    assert_problem("denied POS app", &pairing.ask(body).await, 403, "pos-ticket-denied");

    // The ticket the session was opened with expires before the token does.
    pairing.pos.advance(800);
    let fresh = pairing.pos.fx.attest(&mut pairing.pos.device, &DeviceHealth::clean()).await["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let old_ticket = std::mem::replace(&mut pairing.pos.ticket, fresh);
    pairing.session = pairing.pos.session().await;
    pairing.pos.advance(150);
    let mut body = pairing.body(&pairing.hello());
    body["pos_ticket"] = json!(old_ticket);
    assert_problem("expired POS ticket", &pairing.ask(body).await, 403, "pos-ticket-expired");
}

#[tokio::test]
async fn a_pos_ticket_must_allow_sessions() {
    let policy = vouch_server::attest::DEFAULT_POLICY.replace(
        r#"operations := ["payment", "session", "token", "dvv", "offline", "tsm"] if status == "affirming""#,
        r#"operations := ["payment", "token"] if status == "affirming""#,
    );
    assert_ne!(policy, vouch_server::attest::DEFAULT_POLICY, "the default policy still lists the operations");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-sessions.rego");
    std::fs::write(&path, policy).unwrap();
    let fx = bare_fixture(|config| config.attest_policy_file = Some(path)).await;
    fx.put_reference(&reference_values(FIRMWARE)).await;
    let mut pairing = Pairing::on(Holder::on(fx, DeviceKind::Pos, &DeviceHealth::clean()).await).await;
    let body = pairing.body(&pairing.hello());
    assert_problem("no session operation", &pairing.ask(body).await, 403, "pos-ticket-operation-not-allowed");
}

#[tokio::test]
async fn only_a_pos_app_asks_for_reader_sessions() {
    let mut pairing =
        Pairing::on(Holder::on(fixture().await, DeviceKind::Terminal, &DeviceHealth::clean()).await).await;
    let body = pairing.body(&pairing.hello());
    assert_problem("a terminal", &pairing.ask(body).await, 403, "not-a-pos");
}
