//! The registry's happy paths: merchants, accounts, service providers, device
//! lifecycle, list filters and pagination.

use serde_json::{Value, json};
use vouch_proto::enrol::DeviceKind;

use crate::support::{TestDevice, busy_server};

fn ids(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v[field].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn merchants_and_accounts_are_created_read_and_listed() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let created = server.expect(201, "POST", "/v1/merchants", admin, Some(json!({"name": "Café Zoë"}))).await;
    let merchant_id = created["merchant_id"].as_str().unwrap().to_owned();
    assert!(merchant_id.starts_with("mch_"), "{merchant_id}");
    assert_eq!(created["name"], "Café Zoë");
    assert!((created["created_at"].as_i64().unwrap() - server.now()).abs() <= 5);
    let read = server.expect(200, "GET", &format!("/v1/merchants/{merchant_id}"), admin, None).await;
    assert_eq!(read, created);

    let account = server
        .expect(
            201,
            "POST",
            &format!("/v1/merchants/{merchant_id}/accounts"),
            admin,
            Some(json!({"label": "Takings", "currency": "EUR"})),
        )
        .await;
    let account_id = account["account_id"].as_str().unwrap();
    assert!(account_id.starts_with("acc_"), "{account_id}");
    assert_eq!(
        (&account["merchant_id"], &account["label"], &account["currency"]),
        (&json!(merchant_id), &json!("Takings"), &json!("EUR"))
    );
    let read = server.expect(200, "GET", &format!("/v1/accounts/{account_id}"), admin, None).await;
    assert_eq!(read, account);

    let list = server.expect(200, "GET", "/v1/merchants", admin, None).await;
    assert_eq!(list, json!([created]));
}

#[tokio::test]
async fn merchant_list_pages_by_id() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let mut created = Vec::new();
    for n in 0..5 {
        created.push(server.merchant(&format!("Shop {n}")).await);
    }
    created.sort();
    let all = ids(&server.expect(200, "GET", "/v1/merchants", admin, None).await, "merchant_id");
    assert_eq!(all, created, "merchants are listed by id");
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let uri = match &after {
            Some(after) => format!("/v1/merchants?limit=2&after={after}"),
            None => "/v1/merchants?limit=2".to_owned(),
        };
        let page = ids(&server.expect(200, "GET", &uri, admin, None).await, "merchant_id");
        assert!(page.len() <= 2, "{uri}: {page:?}");
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        paged.extend(page);
    }
    assert_eq!(paged, created);
    let tail = server.expect(200, "GET", &format!("/v1/merchants?after={}", created[4]), admin, None).await;
    assert_eq!(tail, json!([]));
}

#[tokio::test]
async fn service_providers_are_created_read_and_listed_by_name() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let mut created = Vec::new();
    for name in ["Zeta Bank", "Alpha Processing", "Mid Bank"] {
        let jwk = TestDevice::new(DeviceKind::Terminal).key.verifying_key().to_jwk();
        let body = json!({"name": name, "endpoint": "https://sp.example/inbox", "public_jwk": jwk});
        let provider = server.expect(201, "POST", "/v1/service-providers", admin, Some(body)).await;
        let id = provider["service_provider_id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("sp_"), "{id}");
        assert_eq!(provider["public_jwk"], serde_json::to_value(&jwk).unwrap());
        assert_eq!(provider["endpoint"], "https://sp.example/inbox");
        let read = server.expect(200, "GET", &format!("/v1/service-providers/{id}"), admin, None).await;
        assert_eq!(read, provider);
        created.push(provider);
    }
    let list = server.expect(200, "GET", "/v1/service-providers", admin, None).await;
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Alpha Processing", "Mid Bank", "Zeta Bank"]);
}

#[tokio::test]
async fn a_device_is_suspended_reactivated_and_revoked() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let merchant_id = server.merchant("Corner shop").await;
    let device_id = server.enrol(&TestDevice::new(DeviceKind::Reader), &merchant_id).await["device_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let enrolled = server.expect(200, "GET", &format!("/v1/devices/{device_id}"), admin, None).await;
    for (action, status, audited) in [
        ("suspend", "suspended", "device.suspended"),
        ("reactivate", "active", "device.reactivated"),
        ("suspend", "suspended", "device.suspended"),
        ("revoke", "revoked", "device.revoked"),
    ] {
        let mark = server.audit_mark().await;
        let reason = format!("{action}: checked by support");
        let uri = format!("/v1/devices/{device_id}/{action}");
        let changed = server.expect(200, "POST", &uri, admin, Some(json!({ "reason": reason }))).await;
        assert_eq!(changed["status"], status, "{action}: {changed}");
        assert_eq!(changed["device_id"], json!(device_id));
        assert_eq!(changed["jwk"], enrolled["jwk"], "{action} changed the key");
        assert_eq!(changed["created_at"], enrolled["created_at"]);
        assert!(changed["updated_at"].as_i64() >= enrolled["updated_at"].as_i64());
        assert_eq!(server.device_status(&device_id).await, status);
        server.assert_audited(action, mark, &[(audited, &device_id)]).await;
        let row = server.audit().await.pop().unwrap();
        assert_eq!(serde_json::from_str::<Value>(&row.entry.detail).unwrap()["reason"], json!(reason));
        assert_eq!(row.entry.actor, "api_key:bootstrap");
    }
    server.assert_audit_intact("after the lifecycle").await;
}

#[tokio::test]
async fn device_list_filters_and_pages() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let shop = server.merchant("Shop").await;
    let market = server.merchant("Market").await;
    let mut by_merchant: Vec<(String, DeviceKind, String)> = Vec::new();
    for (kind, merchant) in [
        (DeviceKind::Reader, &shop),
        (DeviceKind::Pos, &shop),
        (DeviceKind::Reader, &market),
        (DeviceKind::Terminal, &market),
        (DeviceKind::Consumer, &market),
    ] {
        let enrolled = server.enrol(&TestDevice::new(kind), merchant).await;
        by_merchant.push((enrolled["device_id"].as_str().unwrap().to_owned(), kind, merchant.clone()));
    }
    let suspended = by_merchant[2].0.clone();
    server
        .expect(200, "POST", &format!("/v1/devices/{suspended}/suspend"), admin, Some(json!({"reason": "lost"})))
        .await;
    let expect = |filter: &dyn Fn(&(String, DeviceKind, String)) -> bool| {
        let mut ids: Vec<String> = by_merchant.iter().filter(|d| filter(d)).map(|d| d.0.clone()).collect();
        ids.sort();
        ids
    };
    let cases: Vec<(String, Vec<String>)> = vec![
        ("/v1/devices".into(), expect(&|_| true)),
        (format!("/v1/devices?merchant_id={shop}"), expect(&|d| d.2 == shop)),
        ("/v1/devices?kind=reader".into(), expect(&|d| d.1 == DeviceKind::Reader)),
        ("/v1/devices?status=suspended".into(), vec![suspended.clone()]),
        ("/v1/devices?status=active".into(), expect(&|d| d.0 != suspended)),
        ("/v1/devices?status=revoked".into(), vec![]),
        (format!("/v1/devices?merchant_id={market}&kind=reader&status=active"), vec![]),
        (
            format!("/v1/devices?merchant_id={market}&kind=terminal"),
            expect(&|d| d.2 == market && d.1 == DeviceKind::Terminal),
        ),
        ("/v1/devices?merchant_id=mch_missing".into(), vec![]),
    ];
    for (uri, want) in cases {
        let listed = ids(&server.expect(200, "GET", &uri, admin, None).await, "device_id");
        assert_eq!(listed, want, "{uri}");
    }
    let all = expect(&|_| true);
    let first = ids(&server.expect(200, "GET", "/v1/devices?limit=2", admin, None).await, "device_id");
    assert_eq!(first, all[..2]);
    let second = ids(
        &server.expect(200, "GET", &format!("/v1/devices?limit=2&after={}", all[1]), admin, None).await,
        "device_id",
    );
    assert_eq!(second, all[2..4]);
    let rest = ids(
        &server.expect(200, "GET", &format!("/v1/devices?limit=2&after={}", all[3]), admin, None).await,
        "device_id",
    );
    assert_eq!(rest, all[4..]);
    let active_page = ids(
        &server.expect(200, "GET", &format!("/v1/devices?status=active&limit=1&after={}", all[1]), admin, None).await,
        "device_id",
    );
    let next_active = all[2..].iter().find(|id| **id != suspended).cloned();
    assert_eq!(active_page, next_active.into_iter().collect::<Vec<_>>());
}

#[tokio::test]
async fn reads_append_nothing_to_the_audit_log() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let merchant_id = server.merchant("Shop").await;
    let device_id =
        server.enrol(&TestDevice::new(DeviceKind::Pos), &merchant_id).await["device_id"].as_str().unwrap().to_owned();
    let mark = server.audit_mark().await;
    for uri in [
        "/v1/merchants".to_owned(),
        format!("/v1/merchants/{merchant_id}"),
        "/v1/devices".to_owned(),
        format!("/v1/devices/{device_id}"),
        "/v1/service-providers".to_owned(),
        "/v1/audit/verify".to_owned(),
        "/.well-known/jwks.json".to_owned(),
    ] {
        server.expect(200, "GET", &uri, admin, None).await;
    }
    server.assert_audited("reads", mark, &[]).await;
}
