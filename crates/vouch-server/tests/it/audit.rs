//! Every registry and key change appends exactly one audit row, naming what changed,
//! written in the same transaction as the change; the chain stays intact throughout.

use serde_json::{Value, json};
use vouch_proto::enrol::DeviceKind;

use crate::support::{TestDevice, TestServer, busy_server};

/// Makes one call and asserts it answered `status` and appended exactly one row,
/// `action` on the subject that `subject` picks from the reply.
async fn one_row(
    server: &TestServer,
    (method, uri, body): (&str, &str, Option<Value>),
    status: u16,
    action: &str,
    subject: impl FnOnce(&Value) -> String,
) -> Value {
    let mark = server.audit_mark().await;
    let reply = server.expect(status, method, uri, Some(&server.admin_key), body).await;
    let subject = subject(&reply);
    server.assert_audited(&format!("{method} {uri}"), mark, &[(action, &subject)]).await;
    let row = server.audit().await.pop().unwrap();
    assert_eq!(row.entry.actor, "api_key:bootstrap", "{action}");
    assert!((row.entry.at - server.now()).abs() <= 5, "{action} dated {}", row.entry.at);
    assert!(
        serde_json::from_str::<Value>(&row.entry.detail).is_ok_and(|d| d.is_object()),
        "{action}: {}",
        row.entry.detail
    );
    reply
}

fn field(name: &'static str) -> impl FnOnce(&Value) -> String {
    move |reply| reply[name].as_str().unwrap_or_else(|| panic!("no {name} in {reply}")).to_owned()
}

#[tokio::test]
async fn each_change_appends_one_row() {
    let server = busy_server().await;
    let merchant = one_row(
        &server,
        ("POST", "/v1/merchants", Some(json!({"name": "Shop"}))),
        201,
        "merchant.created",
        field("merchant_id"),
    )
    .await;
    let merchant_id = merchant["merchant_id"].as_str().unwrap().to_owned();
    let accounts = format!("/v1/merchants/{merchant_id}/accounts");
    one_row(
        &server,
        ("POST", &accounts, Some(json!({"label": "x", "currency": "GBP"}))),
        201,
        "account.created",
        field("account_id"),
    )
    .await;
    let jwk = TestDevice::new(DeviceKind::Terminal).key.verifying_key().to_jwk();
    let provider = json!({"name": "Bank", "endpoint": "https://bank.example", "public_jwk": jwk});
    one_row(
        &server,
        ("POST", "/v1/service-providers", Some(provider)),
        201,
        "service_provider.created",
        field("service_provider_id"),
    )
    .await;
    let key = json!({"scopes": ["terminal"], "label": "acquirer"});
    let key_id =
        one_row(&server, ("POST", "/v1/api-keys", Some(key)), 201, "api_key.created", field("key_id")).await["key_id"]
            .as_str()
            .unwrap()
            .to_owned();
    one_row(&server, ("DELETE", &format!("/v1/api-keys/{key_id}"), None), 204, "api_key.revoked", |_| key_id.clone())
        .await;

    // A nonce is not a registry change; the enrolment that spends it is.
    let mark = server.audit_mark().await;
    let nonce = server.nonce(&server.admin_key).await;
    server.assert_audited("nonce", mark, &[]).await;
    let device = TestDevice::new(DeviceKind::Reader);
    let proof = device.proof(&nonce, &merchant_id, server.now());
    let enrolled = one_row(
        &server,
        ("POST", "/v1/devices", Some(json!({ "proof": proof }))),
        201,
        "device.enrolled",
        field("device_id"),
    )
    .await;
    let row = server.audit().await.pop().unwrap();
    let detail: Value = serde_json::from_str(&row.entry.detail).unwrap();
    assert_eq!(detail["key_thumbprint"], json!(device.key.verifying_key().thumbprint()), "{detail}");
    assert_eq!(detail["merchant_id"], json!(merchant_id));
    let device_id = enrolled["device_id"].as_str().unwrap().to_owned();
    let reason = || Some(json!({"reason": "routine"}));
    for (action, audited) in
        [("suspend", "device.suspended"), ("reactivate", "device.reactivated"), ("revoke", "device.revoked")]
    {
        one_row(&server, ("POST", &format!("/v1/devices/{device_id}/{action}"), reason()), 200, audited, |_| {
            device_id.clone()
        })
        .await;
    }
    one_row(&server, ("POST", "/v1/keys/rotate", None), 200, "key.rotated", field("kid")).await;

    // A refused enrolment is a decision too: one row, nothing else.
    let mark = server.audit_mark().await;
    let reply = server.enrol_proof(&server.admin_key, &proof).await;
    assert_eq!(reply.status.as_u16(), 409);
    server.assert_audited("replay", mark, &[("device.enrolment_refused", "-")]).await;
    let detail: Value = serde_json::from_str(&server.audit().await.pop().unwrap().entry.detail).unwrap();
    assert_eq!(detail["reason"], "replayed-enrolment", "{detail}");

    let actions: Vec<String> = server.audit().await.into_iter().map(|r| r.entry.action).collect();
    assert_eq!(
        actions,
        [
            "key.rotated",
            "api_key.created",
            "merchant.created",
            "account.created",
            "service_provider.created",
            "api_key.created",
            "api_key.revoked",
            "device.enrolled",
            "device.suspended",
            "device.reactivated",
            "device.revoked",
            "key.rotated",
            "device.enrolment_refused",
        ],
        "the whole log, from the first start"
    );
    server.assert_audit_intact("after every change").await;
}

#[tokio::test]
async fn the_audit_log_never_holds_a_secret() {
    let server = busy_server().await;
    let (_, api_key) = server.api_key(&["provision"]).await;
    server.expect(200, "POST", "/v1/keys/rotate", Some(&server.admin_key), None).await;
    // `vouch_<id>_<secret>`; the id has no `_`, the base64url secret may.
    let secret_of = |key: &str| key.strip_prefix("vouch_").unwrap().split_once('_').unwrap().1.to_owned();
    let (secret, bootstrap_secret) = (secret_of(&api_key), secret_of(&server.admin_key));
    assert!(secret.len() >= 40 && bootstrap_secret.len() >= 40);
    for row in server.audit().await {
        for needle in [&secret, &bootstrap_secret] {
            assert!(
                !row.entry.detail.contains(needle.as_str()),
                "row {} holds a secret: {}",
                row.seq,
                row.entry.detail
            );
        }
    }
}
