//! Administration: API keys through their life, signing-key rotation with overlap, and
//! audit verification.

use serde_json::json;
use vouch_proto::enrol::DeviceKind;

use crate::support::{Case, TestDevice, busy_server};

#[tokio::test]
async fn an_api_key_is_created_used_and_revoked() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let merchant_id = server.merchant("Shop").await;

    let mark = server.audit_mark().await;
    let body = json!({"scopes": ["provision"], "label": "factory line 3"});
    let created = server.expect(201, "POST", "/v1/api-keys", admin, Some(body)).await;
    let key_id = created["key_id"].as_str().unwrap().to_owned();
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    assert_eq!(created["scopes"], json!(["provision"]));
    assert!(api_key.starts_with(&format!("vouch_{key_id}_")), "{api_key}");
    server.assert_audited("key creation", mark, &[("api_key.created", &key_id)]).await;
    let row = server.audit().await.pop().unwrap();
    assert_eq!(row.entry.actor, "api_key:bootstrap");
    assert!(!row.entry.detail.contains(&api_key[api_key.len() - 20..]), "the audit log holds the secret");
    let stored = server.state.store.api_key(&key_id).await.unwrap();
    assert!(!stored.secret_hash.is_empty() && stored.secret_hash != api_key.as_bytes(), "the key is not stored hashed");

    // Used for what its scope allows.
    let device = TestDevice::new(DeviceKind::Reader);
    let nonce = server.nonce(&api_key).await;
    let enrolled = server.enrol_proof(&api_key, &device.proof(&nonce, &merchant_id, server.now())).await;
    assert_eq!(enrolled.status.as_u16(), 201, "{}", enrolled.json);
    let enrolment = server.audit().await.pop().unwrap();
    assert_eq!(
        (enrolment.entry.action.as_str(), enrolment.entry.actor.clone()),
        ("device.enrolled", format!("api_key:{key_id}"))
    );

    // Revoked: refused at once, everywhere.
    let mark = server.audit_mark().await;
    let reply = server.call("DELETE", &format!("/v1/api-keys/{key_id}"), admin, None).await;
    assert_eq!(reply.status.as_u16(), 204);
    assert!(reply.text.is_empty(), "204 with a body: {}", reply.text);
    server.assert_audited("key revocation", mark, &[("api_key.revoked", &key_id)]).await;
    for case in [
        Case::new("revoked key: nonce", "POST", "/v1/enrolment-nonces").key(&api_key),
        Case::new("revoked key: enrol", "POST", "/v1/devices").key(&api_key).json(json!({"proof": "a.b.c"})),
    ] {
        server.check(&case, 401, "invalid-credentials").await;
    }
    server.assert_audit_intact("after the key's life").await;
}

#[tokio::test]
async fn an_admin_key_made_over_the_api_can_do_admin_work() {
    let server = busy_server().await;
    let (_, admin2) = server.api_key(&["admin"]).await;
    let (_, both) = server.api_key(&["provision", "terminal"]).await;
    server.expect(201, "POST", "/v1/merchants", Some(&admin2), Some(json!({"name": "Shop"}))).await;
    server.expect(201, "POST", "/v1/enrolment-nonces", Some(&both), None).await;
    server
        .check(&Case::new("provision+terminal key", "GET", "/v1/merchants").key(&both), 403, "insufficient-scope")
        .await;
    // The bootstrap key can be revoked by another admin key, and is then refused.
    server.expect(204, "DELETE", "/v1/api-keys/bootstrap", Some(&admin2), None).await;
    server
        .check(
            &Case::new("revoked bootstrap", "GET", "/v1/merchants").key(&server.admin_key),
            401,
            "invalid-credentials",
        )
        .await;
}

#[tokio::test]
async fn key_rotation_publishes_both_keys_and_signs_with_the_new_one() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let merchant_id = server.merchant("Shop").await;
    let jwks = server.jwks().await;
    assert_eq!(jwks.keys.len(), 1, "{jwks:?}");
    let first_kid = jwks.keys[0].kid.clone().unwrap();
    assert_eq!((jwks.keys[0].alg.as_deref(), jwks.keys[0].key_use.as_deref()), (Some("ES256"), Some("sig")));

    let old = server.enrol(&TestDevice::new(DeviceKind::Reader), &merchant_id).await;
    let old_credential = old["device_credential"].as_str().unwrap().to_owned();
    assert_eq!(server.verify_credential(&old_credential).await.0, first_kid);

    let mark = server.audit_mark().await;
    let rotated = server.expect(200, "POST", "/v1/keys/rotate", admin, None).await;
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, first_kid);
    server.assert_audited("rotation", mark, &[("key.rotated", &new_kid)]).await;

    let jwks = server.jwks().await;
    let mut kids: Vec<String> = jwks.keys.iter().map(|k| k.kid.clone().unwrap()).collect();
    kids.sort();
    let mut want = vec![first_kid.clone(), new_kid.clone()];
    want.sort();
    assert_eq!(kids, want, "the JWK Set after rotation");
    assert!(jwks.keys.iter().all(|k| k.alg.as_deref() == Some("ES256")));

    // What the old key signed still verifies; what is signed now carries the new kid.
    let (kid, claims) = server.verify_credential(&old_credential).await;
    assert_eq!((kid, claims.sub.as_str()), (first_kid.clone(), old["device_id"].as_str().unwrap()));
    let new = server.enrol(&TestDevice::new(DeviceKind::Pos), &merchant_id).await;
    let (kid, claims) = server.verify_credential(new["device_credential"].as_str().unwrap()).await;
    assert_eq!((kid, claims.sub.as_str()), (new_kid.clone(), new["device_id"].as_str().unwrap()));

    // A second rotation keeps every key whose credentials have not expired.
    let third = server.expect(200, "POST", "/v1/keys/rotate", admin, None).await["kid"].as_str().unwrap().to_owned();
    let jwks = server.jwks().await;
    for kid in [&first_kid, &new_kid, &third] {
        assert!(jwks.find(kid).is_some(), "{kid} is not published: {jwks:?}");
    }
    server.verify_credential(&old_credential).await;
    server.assert_audit_intact("after rotations").await;
}

#[tokio::test]
async fn audit_verification_reports_an_intact_chain() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let report = server.expect(200, "GET", "/v1/audit/verify", admin, None).await;
    assert_eq!(report["intact"], json!(true), "{report}");
    assert_eq!(report["first_break"], json!(null));
    assert_eq!(report["first_broken_seq"], json!(null));
    let rows = server.audit().await;
    assert_eq!(report["rows_checked"].as_i64(), Some(rows.len() as i64));
    assert_eq!(report["head_seq"].as_i64(), rows.last().map(|r| r.seq));
    // Each row links to the one before it.
    for pair in rows.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash, "row {} does not link to {}", pair[1].seq, pair[0].seq);
        assert_eq!(pair[1].seq, pair[0].seq + 1);
    }
    server.merchant("Shop").await;
    let report = server.expect(200, "GET", "/v1/audit/verify", admin, None).await;
    assert_eq!(report["rows_checked"].as_i64(), Some(rows.len() as i64 + 1), "{report}");
    assert_eq!(report["intact"], json!(true));
}
