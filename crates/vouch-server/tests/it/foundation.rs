use serde_json::json;

use crate::support::server;

#[tokio::test]
async fn health_and_unknown_routes() {
    let server = server().await;
    let reply = server.call("GET", "/healthz", None, None).await;
    assert_eq!((reply.status.as_u16(), reply.json["status"].as_str()), (200, Some("ok")));
    let reply = server.call("GET", "/nope", None, None).await;
    assert_eq!(reply.status.as_u16(), 404);
    assert_eq!(reply.content_type, "application/problem+json");
    let reply = server.call("DELETE", "/healthz", None, None).await;
    assert_eq!(reply.status.as_u16(), 405);
    assert_eq!(reply.content_type, "application/problem+json");
}

#[tokio::test]
async fn merchant_needs_admin_key() {
    let server = server().await;
    let reply = server.call("POST", "/v1/merchants", None, Some(json!({"name": "Shop"}))).await;
    assert_eq!(reply.status.as_u16(), 401);
    let reply = server.call("POST", "/v1/merchants", Some(&server.admin_key), Some(json!({"name": "Shop"}))).await;
    assert_eq!(reply.status.as_u16(), 201, "{:?}", reply.json);
}
