//! The ledger over HTTP: consumer accounts, funding from the issuer account, balances
//! and an account's transfers, and a problem document for each bad input.

use serde_json::{Value, json};

use crate::support::{TestServer, assert_problem, busy_server};

struct Parties {
    consumer_id: String,
    funding_id: String,
    reserve_id: String,
}

async fn parties(server: &TestServer) -> Parties {
    let admin = Some(server.admin_key.as_str());
    let consumer = server.expect(201, "POST", "/v1/consumers", admin, Some(json!({"name": "Ada"}))).await;
    let consumer_id = consumer["consumer_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/consumers/{consumer_id}/accounts");
    let mut ids = Vec::new();
    for kind in ["consumer_funding", "consumer_offline_reserve"] {
        let account = server.expect(201, "POST", &path, admin, Some(json!({"kind": kind, "currency": "EUR"}))).await;
        assert_eq!((&account["kind"], &account["consumer_id"]), (&json!(kind), &json!(consumer_id)));
        assert_eq!((&account["balance_minor"], &account["debits_minor"]), (&json!(0), &json!(0)));
        assert!(account.get("merchant_id").is_none(), "{account}");
        ids.push(account["account_id"].as_str().unwrap().to_owned());
    }
    let [funding_id, reserve_id] = ids.try_into().unwrap();
    Parties { consumer_id, funding_id, reserve_id }
}

fn funding(transfer_id: &str, account_id: &str, amount_minor: i64) -> Value {
    json!({"transfer_id": transfer_id, "account_id": account_id, "amount_minor": amount_minor, "currency": "EUR"})
}

#[tokio::test]
async fn funding_moves_money_from_the_issuer_once() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let p = parties(&server).await;
    let path = format!("/v1/consumers/{}/funding", p.consumer_id);
    let mark = server.audit_mark().await;
    let first = server.expect(201, "POST", &path, admin, Some(funding("fund-1", &p.funding_id, 2_500))).await;
    assert_eq!(
        (&first["debit_account_id"], &first["credit_account_id"]),
        (&json!("acc_issuer_EUR"), &json!(p.funding_id))
    );
    let again = server.expect(200, "POST", &path, admin, Some(funding("fund-1", &p.funding_id, 2_500))).await;
    assert_eq!(again, first);
    let reply = server.call("POST", &path, admin, Some(funding("fund-1", &p.funding_id, 2_501))).await;
    assert_problem("another transfer under a used id", &reply, 409, "transfer-id-used");
    server.assert_audited("one posting, one entry", mark, &[("ledger.funded", "fund-1")]).await;
    server.assert_audit_intact("after funding").await;

    let account = server.expect(200, "GET", &format!("/v1/accounts/{}", p.funding_id), admin, None).await;
    assert_eq!((&account["credits_minor"], &account["balance_minor"]), (&json!(2_500), &json!(2_500)));
    let issuer = server.expect(200, "GET", "/v1/accounts/acc_issuer_EUR", admin, None).await;
    assert_eq!((&issuer["kind"], &issuer["balance_minor"]), (&json!("issuer"), &json!(-2_500)));
    assert!(server.state.store.ledger_imbalance().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_account_lists_its_transfers_oldest_first_by_page() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let p = parties(&server).await;
    let path = format!("/v1/consumers/{}/funding", p.consumer_id);
    for n in 0..3 {
        server.expect(201, "POST", &path, admin, Some(funding(&format!("fund-{n}"), &p.funding_id, 100 + n))).await;
    }
    let list = format!("/v1/accounts/{}/transfers", p.funding_id);
    let first = server.expect(200, "GET", &format!("{list}?limit=2"), admin, None).await;
    let ids = |page: &Value| {
        page.as_array().unwrap().iter().map(|t| t["transfer_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&first), ["fund-0", "fund-1"]);
    let rest = server.expect(200, "GET", &format!("{list}?limit=2&after=fund-1"), admin, None).await;
    assert_eq!(ids(&rest), ["fund-2"]);
    assert_eq!(rest[0]["amount_minor"], 102);
    let empty = server.expect(200, "GET", &format!("/v1/accounts/{}/transfers", p.reserve_id), admin, None).await;
    assert_eq!(empty, json!([]));
}

#[tokio::test]
async fn bad_ledger_input_gets_a_problem_document() {
    let server = busy_server().await;
    let admin = Some(server.admin_key.as_str());
    let p = parties(&server).await;
    let merchant_id = server.merchant("Grocer").await;
    let shop = server
        .expect(
            201,
            "POST",
            &format!("/v1/merchants/{merchant_id}/accounts"),
            admin,
            Some(json!({"label": "Takings", "currency": "EUR"})),
        )
        .await;
    let shop_id = shop["account_id"].as_str().unwrap();
    let other = server.expect(201, "POST", "/v1/consumers", admin, Some(json!({"name": "Bo"}))).await;
    let other_id = other["consumer_id"].as_str().unwrap();
    let usd = server
        .expect(
            201,
            "POST",
            &format!("/v1/consumers/{}/accounts", p.consumer_id),
            admin,
            Some(json!({"kind": "consumer_funding", "currency": "USD"})),
        )
        .await;
    let usd_id = usd["account_id"].as_str().unwrap();
    let fund = format!("/v1/consumers/{}/funding", p.consumer_id);
    let accounts = format!("/v1/consumers/{}/accounts", p.consumer_id);
    let cases: Vec<(String, Value, u16, &str)> = vec![
        (accounts.clone(), json!({"kind": "issuer", "currency": "EUR"}), 422, "invalid-field"),
        (accounts.clone(), json!({"kind": "merchant_settlement", "currency": "EUR"}), 422, "invalid-field"),
        (accounts.clone(), json!({"kind": "consumer_funding", "currency": "euro"}), 422, "invalid-field"),
        (accounts.clone(), json!({"kind": "consumer_funding", "currency": "EUR", "label": ""}), 422, "invalid-field"),
        (
            "/v1/consumers/ghost/accounts".into(),
            json!({"kind": "consumer_funding", "currency": "EUR"}),
            404,
            "not-found",
        ),
        (fund.clone(), funding("f1", &p.funding_id, 0), 422, "invalid-amount"),
        (fund.clone(), funding("f1", &p.funding_id, -5), 422, "invalid-amount"),
        (fund.clone(), funding("f1", &p.funding_id, 1_000_000_000_001), 422, "invalid-amount"),
        (fund.clone(), funding("f1", &p.funding_id, i64::MAX), 422, "invalid-amount"),
        (fund.clone(), funding("", &p.funding_id, 5), 422, "invalid-field"),
        (fund.clone(), funding("f1", "ghost", 5), 404, "not-found"),
        (fund.clone(), funding("f1", &p.reserve_id, 5), 422, "wrong-account"),
        (fund.clone(), funding("f1", shop_id, 5), 422, "wrong-account"),
        (fund.clone(), funding("f1", usd_id, 5), 422, "currency-mismatch"),
        (format!("/v1/consumers/{other_id}/funding"), funding("f1", &p.funding_id, 5), 422, "wrong-account"),
        ("/v1/consumers/ghost/funding".into(), funding("f1", &p.funding_id, 5), 404, "not-found"),
    ];
    let mark = server.audit_mark().await;
    for (path, body, status, problem) in cases {
        let reply = server.call("POST", &path, admin, Some(body.clone())).await;
        assert_problem(&format!("{path} {body}"), &reply, status, problem);
    }
    server.assert_audited("nothing refused is audited", mark, &[]).await;
    let reply = server.call("GET", "/v1/accounts/ghost/transfers", admin, None).await;
    assert_problem("unknown account", &reply, 404, "not-found");
    let reply = server.call("GET", &format!("/v1/accounts/{}/transfers?after=nope", p.funding_id), admin, None).await;
    assert_problem("unknown cursor", &reply, 400, "invalid-query");
    let reply = server.call("GET", &format!("/v1/accounts/{}/transfers?limit=0", p.funding_id), admin, None).await;
    assert_problem("empty page", &reply, 400, "invalid-query");
    let (_, reader) = server.api_key(&["terminal"]).await;
    let reply = server.call("POST", &fund, Some(&reader), Some(funding("f1", &p.funding_id, 5))).await;
    assert_eq!(reply.status.as_u16(), 403, "{}", reply.json);
    assert_eq!(
        server.expect(200, "GET", &format!("/v1/accounts/{}", p.funding_id), admin, None).await["credits_minor"],
        0
    );
}
