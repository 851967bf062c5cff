//! Operational endpoints: health, readiness, metrics, the JWK Set and the OpenAPI
//! document, which must describe every route the router serves.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::support::{busy_server, server};

/// Every operation the router serves, with path parameters written `{}`.
const OPERATIONS: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/.well-known/jwks.json"),
    ("post", "/v1/merchants"),
    ("get", "/v1/merchants"),
    ("get", "/v1/merchants/{}"),
    ("post", "/v1/merchants/{}/accounts"),
    ("get", "/v1/accounts/{}"),
    ("post", "/v1/service-providers"),
    ("get", "/v1/service-providers"),
    ("get", "/v1/service-providers/{}"),
    ("post", "/v1/enrolment-nonces"),
    ("post", "/v1/devices"),
    ("get", "/v1/devices"),
    ("get", "/v1/devices/{}"),
    ("post", "/v1/devices/{}/suspend"),
    ("post", "/v1/devices/{}/reactivate"),
    ("post", "/v1/devices/{}/revoke"),
    ("post", "/v1/api-keys"),
    ("delete", "/v1/api-keys/{}"),
    ("post", "/v1/keys/rotate"),
    ("get", "/v1/audit/verify"),
    ("post", "/v1/attestations"),
    ("post", "/v1/attestations/{}/evidence"),
    ("post", "/v1/tickets/verify"),
    ("get", "/v1/devices/{}/attestations"),
    ("put", "/v1/reference-values"),
    ("get", "/v1/reference-values"),
    ("post", "/v1/token"),
    ("post", "/v1/revoke"),
    ("post", "/v1/sessions/{}/end"),
    ("post", "/v1/sign"),
    ("post", "/v1/reader-sessions"),
    ("post", "/v1/consumers"),
    ("post", "/v1/consumers/{}/devices"),
    ("post", "/v1/consumers/{}/payment-accounts"),
    ("post", "/v1/merchants/{}/terminals"),
    ("post", "/v1/dvv"),
    ("post", "/v1/authorizations"),
    ("get", "/v1/authorizations/{}"),
    ("post", "/v1/consumers/{}/accounts"),
    ("post", "/v1/consumers/{}/funding"),
    ("get", "/v1/accounts/{}/transfers"),
    ("post", "/v1/devices/{}/terminal-certificate"),
    ("post", "/v1/offline/credentials"),
    ("post", "/v1/offline/sync"),
    ("post", "/v1/offline-payments"),
    ("post", "/v1/tsm/issuers"),
    ("get", "/v1/tsm/issuers"),
    ("post", "/v1/tsm/issuers/{}/revocations"),
    ("post", "/v1/tsm/devices/{}/provision"),
    ("post", "/v1/tsm/apps"),
    ("get", "/v1/tsm/apps"),
    ("post", "/v1/tsm/devices/{}/app"),
    ("post", "/v1/tsm/messages"),
    ("get", "/v1/tsm/outbox"),
    ("post", "/v1/tsm/outbox/{}/retry"),
];

/// Authenticated by the device's signature inside the body or its DPoP proof alone,
/// not by an API key or an access token.
const DEVICE_SIGNED: &[&str] =
    &["/v1/attestations", "/v1/attestations/{attestation_id}/evidence", "/v1/token", "/v1/revoke"];

/// Served outside the generated document: the document itself.
const SELF_DESCRIBING: &str = "/openapi.json";

/// `/v1/devices/{device_id}/suspend` -> `/v1/devices/{}/suspend`.
pub fn template(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("{}");
            }
            '}' => in_param = false,
            _ if !in_param => out.push(c),
            _ => {}
        }
    }
    out
}

/// The `(method, templated path)` pairs an OpenAPI document describes.
pub fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths object");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().expect("path item").keys();
            methods
                .filter(|m| ["get", "put", "post", "delete", "patch", "head", "options"].contains(&m.as_str()))
                .map(|m| (m.clone(), template(path)))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn health_and_readiness() {
    let server = server().await;
    for uri in ["/healthz", "/readyz"] {
        let reply = server.call("GET", uri, None, None).await;
        assert_eq!(reply.status.as_u16(), 200, "{uri}: {}", reply.json);
        assert_eq!(reply.json["status"], "ok", "{uri}");
        assert!(reply.content_type.starts_with("application/json"), "{uri}: {}", reply.content_type);
    }
}

#[tokio::test]
async fn jwk_set_is_public_and_well_formed() {
    let server = server().await;
    let reply = server.call("GET", "/.well-known/jwks.json", None, None).await;
    assert_eq!(reply.status.as_u16(), 200);
    assert_eq!(reply.content_type, "application/jwk-set+json");
    assert!(reply.headers.get("cache-control").is_some());
    let keys = reply.json["keys"].as_array().expect("keys array");
    assert_eq!(keys.len(), 1);
    for key in keys {
        assert_eq!(
            (&key["kty"], &key["crv"], &key["alg"], &key["use"]),
            (&"EC".into(), &"P-256".into(), &"ES256".into(), &"sig".into())
        );
        assert!(key["kid"].as_str().is_some_and(|k| !k.is_empty()), "{key}");
        assert!(key.get("d").is_none(), "the JWK Set publishes a private key: {key}");
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_template() {
    let server = busy_server().await;
    let merchant_id = server.merchant("Shop").await;
    server.expect(200, "GET", &format!("/v1/merchants/{merchant_id}"), Some(&server.admin_key), None).await;
    server.call("GET", "/no-such-route/secret-looking-id", None, None).await;
    let reply = server.call("GET", "/metrics", None, None).await;
    assert_eq!(reply.status.as_u16(), 200);
    assert!(reply.content_type.starts_with("text/plain"), "{}", reply.content_type);
    let text = reply.text;
    let line = |route: &str, method: &str, status: &str| {
        text.lines().find(|l| {
            l.starts_with("vouch_http_requests_total{")
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("method=\"{method}\""))
                && l.contains(&format!("status=\"{status}\""))
        })
    };
    let created =
        line("/v1/merchants", "POST", "201").unwrap_or_else(|| panic!("no POST /v1/merchants counter in\n{text}"));
    assert!(created.trim_end().ends_with(" 1"), "{created}");
    assert!(line("/v1/merchants/{merchant_id}", "GET", "200").is_some(), "no templated route in\n{text}");
    assert!(line("unmatched", "GET", "404").is_some(), "no unmatched route in\n{text}");
    assert!(!text.contains(&merchant_id) && !text.contains("secret-looking-id"), "raw paths leak into labels:\n{text}");
    assert!(text.contains("vouch_http_request_duration_seconds_bucket"), "no latency histogram in\n{text}");
}

#[tokio::test]
async fn openapi_document_describes_every_api_operation() {
    let server = server().await;
    let reply = server.call("GET", "/openapi.json", None, None).await;
    assert_eq!(reply.status.as_u16(), 200);
    assert!(reply.content_type.starts_with("application/json"), "{}", reply.content_type);
    let doc = reply.json;
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "Vouch");

    let documented = documented_operations(&doc);
    let served: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .filter(|(_, path)| *path != SELF_DESCRIBING)
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "documented vs served operations");

    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let context = format!("{method} {path}");
            let responses = operation["responses"].as_object().unwrap_or_else(|| panic!("{context}: no responses"));
            let with_schema = responses.values().filter(|r| {
                r["content"].as_object().is_some_and(|c| c.values().any(|media| media.get("schema").is_some()))
            });
            assert!(with_schema.count() >= 1, "{context}: no response has a schema: {operation}");
            // OpenAPI 3.1 requires a description on every response.
            for (status, response) in responses {
                assert!(
                    response["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{context} {status}: no description"
                );
            }
            // Every path parameter must appear in the path template.
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                if parameter["in"] == "path" {
                    let name = parameter["name"].as_str().unwrap();
                    assert!(path.contains(&format!("{{{name}}}")), "{context}: path parameter {name} not in the path");
                }
            }
            if path.starts_with("/v1/") {
                let problem = &responses.get("4XX").unwrap_or_else(|| panic!("{context}: no 4XX response"))["content"];
                assert!(problem.get("application/problem+json").is_some(), "{context}: 4XX is not a problem document");
                if !DEVICE_SIGNED.contains(&path.as_str()) {
                    assert!(operation["security"].as_array().is_some_and(|s| !s.is_empty()), "{context}: no security");
                }
            }
        }
    }
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object(), "no api_key security scheme");
    assert!(doc["components"]["securitySchemes"]["dpop"].is_object(), "no dpop security scheme");
    assert!(doc["components"]["schemas"]["Problem"].is_object(), "no Problem schema");
    // A body must be able to satisfy every schema: `allOf` over a closed object (no
    // additional properties) and anything that adds a property cannot be satisfied.
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        let closed_part = schema["allOf"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|part| part["additionalProperties"] == false || part["$ref"].is_string());
        assert!(!(closed_part && schema["allOf"].as_array().is_some_and(|a| a.len() > 1)), "{name}: {schema}");
    }
    let reference = &doc["components"]["schemas"]["ReferenceValuesView"];
    assert_eq!(reference["additionalProperties"], false, "{reference}");
    for property in ["model", "firmware_version", "measurements", "reader_firmware", "min_os_patch_level"] {
        assert!(reference["properties"][property].is_object(), "ReferenceValuesView lacks {property}");
    }
}

/// The operations in the table are really served: none answers 404 or 405.
#[tokio::test]
async fn every_listed_operation_is_routed() {
    let server = server().await;
    for (method, path) in OPERATIONS {
        let uri = path.replace("{}", "x_1");
        let reply = server.call(&method.to_uppercase(), &uri, None, None).await;
        let status = reply.status.as_u16();
        let device_signed = DEVICE_SIGNED.iter().any(|p| template(p) == *path);
        // Device-signed endpoints read the body first: an empty one is the wrong media type.
        let want = if device_signed {
            415
        } else if path.starts_with("/v1/") {
            401
        } else {
            200
        };
        assert_eq!(status, want, "{method} {uri}: {}", reply.json);
    }
}
