//! offline: terminal certificates and offline credentials, checked as a phone and a
//! terminal would check them, with the server's key from the JWK Set.

use serde_json::json;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::offline::{PaymentRequest, WireType, verify_payment_request, verify_terminal_certificate};
use vouch_proto::{ProtoError, VerifyingKey, b64};

use crate::attest::fixture;
use crate::support::{TestServer, assert_problem};

/// The server's key named by a COSE kid, from the published JWK Set.
pub async fn server_key(server: &TestServer) -> impl Fn(Option<&[u8]>) -> Result<VerifyingKey, ProtoError> {
    let jwks = server.jwks().await;
    move |kid| {
        let kid = std::str::from_utf8(kid.expect("server-signed objects name their kid")).unwrap();
        Ok(jwks.find(kid).unwrap_or_else(|| panic!("kid {kid} is not published")).verifying_key().unwrap())
    }
}

fn id_bytes(id: &str) -> [u8; 16] {
    *uuid::Uuid::try_parse(id.rsplit_once('_').unwrap().1).unwrap().as_bytes()
}

fn certificate_path(device_id: &str) -> String {
    format!("/v1/devices/{device_id}/terminal-certificate")
}

#[tokio::test]
async fn a_terminal_certificate_lets_a_phone_check_a_payment_request() {
    let fx = fixture().await;
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let server = &fx.server;
    let admin = Some(server.admin_key.as_str());
    let mark = server.audit_mark().await;
    let issued = server.expect(201, "POST", &certificate_path(&terminal.device_id), admin, None).await;
    server.assert_audited("certified", mark, &[("terminal.certified", &terminal.device_id)]).await;
    let bytes = b64::decode("certificate", issued["certificate"].as_str().unwrap()).unwrap();
    let now = server.now();
    let certificate = verify_terminal_certificate(&bytes, server_key(server).await, now).unwrap();
    let cert = certificate.value();
    assert_eq!(cert.terminal_id, id_bytes(&terminal.device_id));
    assert_eq!(cert.merchant_id, id_bytes(&fx.merchant_id));
    assert_eq!(cert.terminal_key, terminal.device.key.verifying_key());
    assert_eq!(issued["not_after"], cert.not_after);
    assert_eq!(cert.not_after, now + 30 * 24 * 3600);
    let merchant = server.expect(200, "GET", &format!("/v1/merchants/{}", fx.merchant_id), admin, None).await;
    assert_eq!(merchant["name"], cert.merchant_name.as_str());

    let request = PaymentRequest {
        merchant_id: cert.merchant_id,
        terminal_id: cert.terminal_id,
        amount_minor: 1250,
        currency: 978,
        nonce: [7; 16],
        time: now,
    };
    let signed = request.clone().sign(None, &terminal.device.key, &SystemRandom::new()).unwrap();
    let checked = verify_payment_request(signed.bytes(), cert).unwrap();
    assert_eq!(checked.value(), &request);
    let other = fx.enrol(DeviceKind::Terminal).await;
    let forged = request.sign(None, &other.device.key, &SystemRandom::new()).unwrap();
    assert!(verify_payment_request(forged.bytes(), cert).is_err(), "another terminal's key is not certified");
    assert!(verify_terminal_certificate(&bytes, server_key(server).await, cert.not_after + 1).is_err());
}

#[tokio::test]
async fn only_an_enrolled_active_terminal_is_certified() {
    let fx = fixture().await;
    let server = &fx.server;
    let admin = Some(server.admin_key.as_str());
    let pos = fx.enrol(DeviceKind::Pos).await;
    let reply = server.call("POST", &certificate_path(&pos.device_id), admin, None).await;
    assert_problem("pos", &reply, 422, "not-a-terminal");
    let phone = fx.enrol(DeviceKind::Consumer).await;
    let reply = server.call("POST", &certificate_path(&phone.device_id), admin, None).await;
    assert_problem("phone", &reply, 422, "not-a-terminal");
    let reply = server.call("POST", &certificate_path("dev_00000000000000000000000000000000"), admin, None).await;
    assert_problem("unknown", &reply, 404, "not-found");
    let terminal = fx.enrol(DeviceKind::Terminal).await;
    let suspend = format!("/v1/devices/{}/suspend", terminal.device_id);
    server.expect(200, "POST", &suspend, admin, Some(json!({"reason": "lost"}))).await;
    let mark = server.audit_mark().await;
    let reply = server.call("POST", &certificate_path(&terminal.device_id), admin, None).await;
    server.assert_audited("nothing refused is audited", mark, &[]).await;
    assert_problem("suspended", &reply, 409, "device-not-active");
    let reply = server.call("POST", &certificate_path(&terminal.device_id), None, None).await;
    assert_eq!(reply.status.as_u16(), 401);
}
