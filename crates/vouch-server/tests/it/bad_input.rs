//! Bad input, endpoint by endpoint and class by class: every refusal is a 4xx problem
//! document of a stable type, and none of them changes anything.

use serde_json::{Value, json};
use vouch_proto::enrol::DeviceKind;

use crate::support::{Case, TestDevice, TestServer, busy_server, server_with};

/// What the tables refer to: one of everything, and keys of each kind.
struct Fixture {
    server: TestServer,
    merchant_id: String,
    account_id: String,
    provider_id: String,
    device_id: String,
    provision_key: String,
    terminal_key: String,
    provision_key_id: String,
    revoked_key: String,
}

async fn fixture() -> Fixture {
    let server = busy_server().await;
    let admin = server.admin_key.clone();
    let merchant_id = server.merchant("Fixture shop").await;
    let account = server
        .expect(
            201,
            "POST",
            &format!("/v1/merchants/{merchant_id}/accounts"),
            Some(&admin),
            Some(json!({"label": "takings", "currency": "EUR"})),
        )
        .await;
    let provider =
        server.expect(201, "POST", "/v1/service-providers", Some(&admin), Some(provider_body("Fixture bank"))).await;
    let device_id = server.enrol(&TestDevice::new(DeviceKind::Reader), &merchant_id).await["device_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (provision_key_id, provision_key) = server.api_key(&["provision"]).await;
    let (_, terminal_key) = server.api_key(&["terminal"]).await;
    let (revoked_id, revoked_key) = server.api_key(&["admin"]).await;
    server.expect(204, "DELETE", &format!("/v1/api-keys/{revoked_id}"), Some(&admin), None).await;
    Fixture {
        merchant_id,
        account_id: account["account_id"].as_str().unwrap().to_owned(),
        provider_id: provider["service_provider_id"].as_str().unwrap().to_owned(),
        device_id,
        provision_key,
        terminal_key,
        provision_key_id,
        revoked_key,
        server,
    }
}

fn provider_body(name: &str) -> Value {
    let key = TestDevice::new(DeviceKind::Terminal).key.verifying_key().to_jwk();
    json!({"name": name, "endpoint": "https://bank.example/inbox", "public_jwk": key})
}

/// An endpoint that takes a JSON body: a body it accepts, and one with a field of the
/// wrong type.
struct BodyEndpoint {
    uri: String,
    valid: Value,
    wrong_types: Value,
}

fn body_endpoints(f: &Fixture) -> Vec<BodyEndpoint> {
    let device = &f.device_id;
    let status_change = |action: &str| BodyEndpoint {
        uri: format!("/v1/devices/{device}/{action}"),
        valid: json!({"reason": "checked"}),
        wrong_types: json!({"reason": true}),
    };
    vec![
        BodyEndpoint { uri: "/v1/merchants".into(), valid: json!({"name": "Shop"}), wrong_types: json!({"name": 5}) },
        BodyEndpoint {
            uri: format!("/v1/merchants/{}/accounts", f.merchant_id),
            valid: json!({"label": "float", "currency": "EUR"}),
            wrong_types: json!({"label": "float", "currency": 978}),
        },
        BodyEndpoint {
            uri: "/v1/service-providers".into(),
            valid: provider_body("Valid bank"),
            wrong_types: json!({"name": ["x"], "endpoint": "https://x.example", "public_jwk": "not a jwk"}),
        },
        BodyEndpoint { uri: "/v1/devices".into(), valid: json!({"proof": "a.b.c"}), wrong_types: json!({"proof": 1}) },
        status_change("suspend"),
        status_change("reactivate"),
        status_change("revoke"),
        BodyEndpoint {
            uri: "/v1/api-keys".into(),
            valid: json!({"scopes": ["provision"], "label": "ci"}),
            wrong_types: json!({"scopes": "provision", "label": "ci"}),
        },
    ]
}

/// One more than the default 64 KiB limit, as a JSON document.
fn oversized_json() -> Vec<u8> {
    format!("{{\"pad\":\"{}\"}}", "x".repeat(64 * 1024)).into_bytes()
}

/// The body cut short before its closing brace.
fn truncated(valid: &Value) -> String {
    let text = valid.to_string();
    text[..text.len() - 1].to_owned()
}

/// The body with its first field given twice.
fn duplicated_field(valid: &Value) -> String {
    let (name, value) = valid.as_object().unwrap().iter().next().unwrap();
    let text = valid.to_string();
    format!("{{{}:{value},{}", json!(name), &text[1..])
}

fn with_extra_field(valid: &Value) -> Value {
    let mut body = valid.clone();
    body.as_object_mut().unwrap().insert("surprise".into(), json!(1));
    body
}

#[tokio::test]
async fn malformed_bodies_are_refused_on_every_endpoint_that_takes_one() {
    let f = fixture().await;
    let admin = f.server.admin_key.clone();
    let devices_before = f.server.device_ids().await;
    let audit_before = f.server.audit_mark().await;
    for endpoint in body_endpoints(&f) {
        let case = |class: &str| Case::new(format!("{class} body"), "POST", endpoint.uri.clone()).key(&admin);
        let json_type = Some("application/json");
        let table: Vec<(Case, u16, &str)> = vec![
            (case("truncated JSON").raw(json_type, truncated(&endpoint.valid)), 400, "malformed-json"),
            (case("not JSON").raw(json_type, "name=Shop"), 400, "malformed-json"),
            (case("empty").raw(json_type, ""), 400, "malformed-json"),
            (case("trailing garbage").raw(json_type, format!("{} x", endpoint.valid)), 400, "malformed-json"),
            (case("wrong types").json(endpoint.wrong_types.clone()), 422, "invalid-body"),
            (case("null").json(Value::Null), 422, "invalid-body"),
            (case("array").json(json!([endpoint.valid])), 422, "invalid-body"),
            (case("missing fields").json(json!({})), 422, "invalid-body"),
            (case("duplicate field").raw(json_type, duplicated_field(&endpoint.valid)), 422, "invalid-body"),
            (case("unknown field").json(with_extra_field(&endpoint.valid)), 422, "invalid-body"),
            (case("oversized").raw(json_type, oversized_json()), 413, "body-too-large"),
            (case("no content type").raw(None, endpoint.valid.to_string()), 415, "unsupported-media-type"),
            (
                case("text content type").raw(Some("text/plain"), endpoint.valid.to_string()),
                415,
                "unsupported-media-type",
            ),
        ];
        for (case, status, problem) in &table {
            f.server.check(case, *status, problem).await;
        }
    }
    assert_eq!(f.server.device_ids().await, devices_before, "a refused body changed the device list");
    assert_eq!(f.server.device_status(&f.device_id).await, "active");
    f.server.assert_audited("refused bodies", audit_before, &[]).await;
    f.server.assert_audit_intact("after refused bodies").await;
}

/// Every endpoint that needs an API key, with a body it would accept.
fn protected_endpoints(f: &Fixture) -> Vec<(&'static str, String, Option<Value>)> {
    let device = &f.device_id;
    let reason = || Some(json!({"reason": "checked"}));
    vec![
        ("POST", "/v1/merchants".into(), Some(json!({"name": "Shop"}))),
        ("GET", "/v1/merchants".into(), None),
        ("GET", format!("/v1/merchants/{}", f.merchant_id), None),
        ("POST", format!("/v1/merchants/{}/accounts", f.merchant_id), Some(json!({"label": "x", "currency": "EUR"}))),
        ("GET", format!("/v1/accounts/{}", f.account_id), None),
        ("POST", "/v1/service-providers".into(), Some(provider_body("Scoped bank"))),
        ("GET", "/v1/service-providers".into(), None),
        ("GET", format!("/v1/service-providers/{}", f.provider_id), None),
        ("POST", "/v1/enrolment-nonces".into(), None),
        ("POST", "/v1/devices".into(), Some(json!({"proof": "a.b.c"}))),
        ("GET", "/v1/devices".into(), None),
        ("GET", format!("/v1/devices/{device}"), None),
        ("POST", format!("/v1/devices/{device}/suspend"), reason()),
        ("POST", format!("/v1/devices/{device}/reactivate"), reason()),
        ("POST", format!("/v1/devices/{device}/revoke"), reason()),
        ("POST", "/v1/api-keys".into(), Some(json!({"scopes": ["admin"], "label": "x"}))),
        ("DELETE", format!("/v1/api-keys/{}", f.provision_key_id), None),
        ("POST", "/v1/keys/rotate".into(), None),
        ("GET", "/v1/audit/verify".into(), None),
    ]
}

/// The scope each endpoint needs beyond authentication.
fn needs_provision_only(method: &str, uri: &str) -> bool {
    (method, uri) == ("POST", "/v1/enrolment-nonces") || (method, uri) == ("POST", "/v1/devices")
}

#[tokio::test]
async fn every_protected_endpoint_refuses_missing_bad_and_revoked_keys() {
    let f = fixture().await;
    let (known_id, known_key) = f.server.api_key(&["admin"]).await;
    let wrong_secret = format!("vouch_{known_id}_{}", "A".repeat(43));
    let authorizations: Vec<(&str, Option<String>, &str)> = vec![
        ("no Authorization", None, "missing-credentials"),
        ("not Bearer", Some(format!("Basic {}", known_key)), "invalid-credentials"),
        ("Bearer without a key", Some("Bearer ".into()), "invalid-credentials"),
        ("garbage key", Some("Bearer garbage".into()), "invalid-credentials"),
        ("unknown key id", Some(format!("Bearer vouch_0123456789abcdef_{}", "A".repeat(43))), "invalid-credentials"),
        ("wrong secret", Some(format!("Bearer {wrong_secret}")), "invalid-credentials"),
        ("over-long key id", Some(format!("Bearer vouch_{}_secret", "a".repeat(33))), "invalid-credentials"),
        ("revoked key", Some(format!("Bearer {}", f.revoked_key)), "invalid-credentials"),
    ];
    let devices_before = f.server.device_ids().await;
    let audit_before = f.server.audit_mark().await;
    for (method, uri, body) in protected_endpoints(&f) {
        for (name, authorization, problem) in &authorizations {
            let mut case = Case::new(*name, method, uri.clone());
            if let Some(authorization) = authorization {
                case = case.authorization(authorization.clone());
            }
            if let Some(body) = &body {
                case = case.json(body.clone());
            }
            f.server.check(&case, 401, problem).await;
        }
    }
    assert_eq!(f.server.device_ids().await, devices_before);
    assert_eq!(f.server.device_status(&f.device_id).await, "active");
    f.server.assert_audited("unauthenticated calls", audit_before, &[]).await;
    // The key whose secret was guessed still works.
    f.server.expect(200, "GET", "/v1/merchants", Some(&known_key), None).await;
}

#[tokio::test]
async fn every_protected_endpoint_refuses_a_key_without_its_scope() {
    let f = fixture().await;
    let devices_before = f.server.device_ids().await;
    let jwks_before = f.server.jwks().await;
    let audit_before = f.server.audit_mark().await;
    for (method, uri, body) in protected_endpoints(&f) {
        let (key, name) = if needs_provision_only(method, &uri) {
            (&f.terminal_key, "terminal key")
        } else {
            (&f.provision_key, "provision key")
        };
        let mut case = Case::new(name, method, uri.clone()).key(key);
        if let Some(body) = body {
            case = case.json(body);
        }
        f.server.check(&case, 403, "insufficient-scope").await;
    }
    assert_eq!(f.server.device_ids().await, devices_before);
    assert_eq!(f.server.device_status(&f.device_id).await, "active");
    assert_eq!(f.server.jwks().await, jwks_before, "a refused rotation changed the JWK Set");
    f.server.assert_audited("out-of-scope calls", audit_before, &[]).await;
    // The provision key that was refused its own revocation still works.
    f.server.nonce(&f.provision_key).await;
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let f = fixture().await;
    let admin = f.server.admin_key.clone();
    let reason = json!({"reason": "checked"});
    let table = [
        Case::new("merchant", "GET", "/v1/merchants/mch_missing").key(&admin),
        Case::new("account", "GET", "/v1/accounts/acc_missing").key(&admin),
        Case::new("account of an unknown merchant", "POST", "/v1/merchants/mch_missing/accounts")
            .key(&admin)
            .json(json!({"label": "x", "currency": "EUR"})),
        Case::new("service provider", "GET", "/v1/service-providers/sp_missing").key(&admin),
        Case::new("device", "GET", "/v1/devices/dev_missing").key(&admin),
        Case::new("suspend", "POST", "/v1/devices/dev_missing/suspend").key(&admin).json(reason.clone()),
        Case::new("reactivate", "POST", "/v1/devices/dev_missing/reactivate").key(&admin).json(reason.clone()),
        Case::new("revoke", "POST", "/v1/devices/dev_missing/revoke").key(&admin).json(reason),
        Case::new("api key", "DELETE", "/v1/api-keys/0123456789abcdef").key(&admin),
        Case::new("route", "GET", "/v1/nothing-here").key(&admin),
        Case::new("route without a key", "GET", "/v2/merchants"),
    ];
    let audit_before = f.server.audit_mark().await;
    for case in &table {
        f.server.check(case, 404, "not-found").await;
    }
    f.server.assert_audited("lookups of unknown ids", audit_before, &[]).await;
}

#[tokio::test]
async fn undecodable_paths_and_methods_are_refused() {
    let f = fixture().await;
    let admin = f.server.admin_key.clone();
    f.server.check(&Case::new("non-UTF-8 id", "GET", "/v1/merchants/%FF").key(&admin), 400, "invalid-path").await;
    f.server.check(&Case::new("non-UTF-8 id", "GET", "/v1/devices/%C3%28").key(&admin), 400, "invalid-path").await;
    for (method, uri) in [
        ("PUT", "/v1/merchants".to_owned()),
        ("DELETE", format!("/v1/devices/{}", f.device_id)),
        ("GET", "/v1/keys/rotate".to_owned()),
        ("POST", "/v1/audit/verify".to_owned()),
        ("PATCH", "/v1/enrolment-nonces".to_owned()),
    ] {
        f.server.check(&Case::new("wrong method", method, uri).key(&admin), 405, "method-not-allowed").await;
    }
}

#[tokio::test]
async fn field_values_are_validated() {
    let f = fixture().await;
    let admin = f.server.admin_key.clone();
    let device = &f.device_id;
    let merchant = &f.merchant_id;
    let accounts = format!("/v1/merchants/{merchant}/accounts");
    let provider =
        |name: &str, endpoint: &str, jwk: Value| json!({"name": name, "endpoint": endpoint, "public_jwk": jwk});
    let good_jwk = provider_body("x")["public_jwk"].clone();
    let mut private_jwk = good_jwk.clone();
    private_jwk["d"] = json!("AAAA");
    let mut off_curve_jwk = good_jwk.clone();
    off_curve_jwk["y"] = good_jwk["x"].clone();
    let post = |name: &str, uri: &str, body: Value| Case::new(name, "POST", uri).key(&admin).json(body);
    let table: Vec<(Case, u16, &str)> = vec![
        (post("empty name", "/v1/merchants", json!({"name": ""})), 422, "invalid-field"),
        (post("blank name", "/v1/merchants", json!({"name": "   "})), 422, "invalid-field"),
        (post("long name", "/v1/merchants", json!({"name": "n".repeat(129)})), 422, "invalid-field"),
        (post("control char in name", "/v1/merchants", json!({"name": "a\u{7}b"})), 422, "invalid-field"),
        (post("lowercase currency", &accounts, json!({"label": "x", "currency": "eur"})), 422, "invalid-field"),
        (post("long currency", &accounts, json!({"label": "x", "currency": "EURO"})), 422, "invalid-field"),
        (post("empty label", &accounts, json!({"label": "", "currency": "EUR"})), 422, "invalid-field"),
        (
            post("ftp endpoint", "/v1/service-providers", provider("B", "ftp://bank.example", good_jwk.clone())),
            422,
            "invalid-field",
        ),
        (
            post("private JWK", "/v1/service-providers", provider("B", "https://b.example", private_jwk)),
            422,
            "invalid-body",
        ),
        (
            post("off-curve JWK", "/v1/service-providers", provider("B", "https://b.example", off_curve_jwk)),
            422,
            "invalid-body",
        ),
        (
            post(
                "RSA JWK",
                "/v1/service-providers",
                provider("B", "https://b.example", json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})),
            ),
            422,
            "invalid-body",
        ),
        (post("duplicate provider name", "/v1/service-providers", provider_body("Fixture bank")), 409, "conflict"),
        (post("no scopes", "/v1/api-keys", json!({"scopes": [], "label": "x"})), 422, "invalid-field"),
        (post("unknown scope", "/v1/api-keys", json!({"scopes": ["root"], "label": "x"})), 422, "invalid-body"),
        (post("blank label", "/v1/api-keys", json!({"scopes": ["admin"], "label": " "})), 422, "invalid-field"),
        (
            post("long label", "/v1/api-keys", json!({"scopes": ["admin"], "label": "l".repeat(129)})),
            422,
            "invalid-field",
        ),
        (post("empty reason", &format!("/v1/devices/{device}/suspend"), json!({"reason": ""})), 422, "invalid-field"),
        (
            post("long reason", &format!("/v1/devices/{device}/revoke"), json!({"reason": "r".repeat(513)})),
            422,
            "invalid-field",
        ),
    ];
    let audit_before = f.server.audit_mark().await;
    for (case, status, problem) in &table {
        f.server.check(case, *status, problem).await;
    }
    f.server.assert_audited("refused field values", audit_before, &[]).await;
    assert_eq!(f.server.device_status(device).await, "active");
    let merchants = f.server.expect(200, "GET", "/v1/merchants", Some(&admin), None).await;
    assert_eq!(merchants.as_array().unwrap().len(), 1, "a refused merchant was stored: {merchants}");
    let providers = f.server.expect(200, "GET", "/v1/service-providers", Some(&admin), None).await;
    assert_eq!(providers.as_array().unwrap().len(), 1, "a refused provider was stored: {providers}");
}

#[tokio::test]
async fn invalid_query_parameters_are_refused() {
    let f = fixture().await;
    let admin = f.server.admin_key.clone();
    let queries = [
        "/v1/devices?limit=0",
        "/v1/devices?limit=501",
        "/v1/devices?limit=abc",
        "/v1/devices?limit=-1",
        "/v1/devices?limit=99999999999",
        "/v1/devices?status=bogus",
        "/v1/devices?status=ACTIVE",
        "/v1/devices?kind=bogus",
        "/v1/devices?kind=",
        "/v1/devices?colour=blue",
        "/v1/merchants?limit=0",
        "/v1/merchants?limit=abc",
        "/v1/merchants?limit=501",
        "/v1/merchants?sort=name",
    ];
    for uri in queries {
        f.server.check(&Case::new("bad query", "GET", uri).key(&admin), 400, "invalid-query").await;
    }
    for uri in ["/v1/devices?limit=1", "/v1/devices?limit=500&status=active&kind=reader", "/v1/merchants?limit=500"] {
        f.server.expect(200, "GET", uri, Some(&admin), None).await;
    }
}

#[tokio::test]
async fn invalid_status_transitions_conflict() {
    let f = fixture().await;
    let admin = f.server.admin_key.clone();
    let device = f.device_id.clone();
    let change = |action: &str| {
        Case::new(format!("{action} from the current status"), "POST", format!("/v1/devices/{device}/{action}"))
            .key(&admin)
            .json(json!({"reason": "checked"}))
    };
    let refuse = |action: &str| {
        let case = change(action);
        let server = &f.server;
        async move {
            let mark = server.audit_mark().await;
            server.check(&case, 409, "invalid-transition").await;
            server.assert_audited(&case.name, mark, &[]).await;
        }
    };
    // Active: reactivating makes no sense.
    refuse("reactivate").await;
    assert_eq!(f.server.send_case(&change("suspend")).await.status.as_u16(), 200);
    // Suspended: suspending again is refused.
    refuse("suspend").await;
    assert_eq!(f.server.send_case(&change("revoke")).await.status.as_u16(), 200);
    // Revoked is final.
    for action in ["reactivate", "suspend", "revoke"] {
        refuse(action).await;
    }
    assert_eq!(f.server.device_status(&device).await, "revoked");
    f.server.assert_audit_intact("after refused transitions").await;
}

#[tokio::test]
async fn revoking_an_api_key_twice_is_not_found() {
    let f = fixture().await;
    let admin = f.server.admin_key.clone();
    let (key_id, _) = f.server.api_key(&["terminal"]).await;
    let revoke = Case::new("revoke", "DELETE", format!("/v1/api-keys/{key_id}")).key(&admin);
    assert_eq!(f.server.send_case(&revoke).await.status.as_u16(), 204);
    let mark = f.server.audit_mark().await;
    f.server.check(&revoke, 404, "not-found").await;
    f.server.assert_audited("second revocation", mark, &[]).await;
}

#[tokio::test]
async fn rate_limit_refuses_with_retry_after_per_key() {
    let server = server_with(|config| {
        config.rate_limit_per_sec = 1;
        config.rate_limit_burst = 1;
    })
    .await;
    let admin = server.admin_key.clone();
    // The one token of the admin key's bucket makes a provision key.
    let created = server
        .expect(201, "POST", "/v1/api-keys", Some(&admin), Some(json!({"scopes": ["provision"], "label": "p"})))
        .await;
    let provision = created["api_key"].as_str().unwrap().to_owned();
    // Whether or not a slow write let the bucket refill, of two calls in a row the second is refused.
    let list = Case::new("call in a burst", "GET", "/v1/merchants").key(&admin);
    server.send_case(&list).await;
    let mark = server.audit_mark().await;
    let limited = server.check(&list, 429, "rate-limited").await;
    let retry_after =
        limited.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    assert!(retry_after.is_some_and(|secs| secs >= 1), "Retry-After is {:?}", limited.headers.get("retry-after"));
    // A refused write changes nothing.
    let write = Case::new("limited write", "POST", "/v1/merchants").key(&admin).json(json!({"name": "S"}));
    server.check(&write, 429, "rate-limited").await;
    server.assert_audited("rate-limited write", mark, &[]).await;
    assert!(server.state.store.merchants(None, 10).await.unwrap().is_empty());
    // Buckets are per key, and a refused key is refused before any bucket is touched.
    server.expect(201, "POST", "/v1/enrolment-nonces", Some(&provision), None).await;
    server.check(&Case::new("bad key", "GET", "/v1/merchants").key("vouch_abc_def"), 401, "invalid-credentials").await;
    server.expect(200, "GET", "/healthz", None, None).await;
}
