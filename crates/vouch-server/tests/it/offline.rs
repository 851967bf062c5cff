//! offline: terminal certificates and offline credentials, checked as a phone and a
//! terminal would check them, with the server's key from the JWK Set.

use serde_json::{Value, json};
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::offline::{
    ConsumerApproval, MerchantCountersignature, OfflineCredential, PaymentRequest, TerminalCertificate, WireType,
    countersignature_digest, payment_id, verify_credential, verify_payment_request, verify_receipt,
    verify_terminal_certificate,
};
use vouch_proto::{ProtoError, VerifyingKey, b64};
use vouch_server::Config;
use vouch_server::offline::{RECEIPTS_CURSOR_LAG_SECS, SYNC_RECEIPTS_MAX};
use vouch_store::{OfflineCredentialRecord, OfflinePaymentRecord};

use crate::attest::{DeviceHealth, Enrolled, fixture};
use crate::dvv::{Market, outdated_phone, risk_tolerant_policy};
use crate::support::{Reply, TestServer, assert_problem};
use crate::token::{Holder, protected_request};

const CREDENTIALS: &str = "/v1/offline/credentials";
const SYNC: &str = "/v1/offline/sync";

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

/// A consumer phone with a session whose consumer has a funding account in EUR.
struct Wallet {
    market: Market,
    funding_id: String,
}

impl Wallet {
    async fn new(funded_minor: i64) -> Wallet {
        Self::on(Market::new().await, funded_minor).await
    }

    async fn on(market: Market, funded_minor: i64) -> Wallet {
        let server = &market.phone.fx.server;
        let admin = Some(server.admin_key.as_str());
        let consumer_id = &market.consumer_id;
        let body = json!({"kind": "consumer_funding", "currency": "EUR"});
        let path = format!("/v1/consumers/{consumer_id}/accounts");
        let account = server.expect(201, "POST", &path, admin, Some(body)).await;
        let funding_id = account["account_id"].as_str().unwrap().to_owned();
        if funded_minor > 0 {
            let body = json!({"transfer_id": "fund-1", "account_id": funding_id, "amount_minor": funded_minor,
                "currency": "EUR"});
            server.expect(201, "POST", &format!("/v1/consumers/{consumer_id}/funding"), admin, Some(body)).await;
        }
        Wallet { market, funding_id }
    }

    fn server(&self) -> &TestServer {
        &self.market.phone.fx.server
    }

    async fn ask(&mut self, body: Value) -> Reply {
        ask(&mut self.market.phone, &self.market.session.token.clone(), body).await
    }

    async fn sync(&mut self, body: Value) -> Reply {
        post_as(&mut self.market.phone, &self.market.session.token.clone(), SYNC, body).await
    }

    /// A sync answered 200, as a phone must keep it.
    async fn synced(&mut self, body: Value) -> Value {
        let reply = self.sync(body).await;
        assert_eq!(reply.status.as_u16(), 200, "{}", reply.json);
        assert_eq!(reply.headers["cache-control"], "no-store");
        reply.json
    }

    async fn balance(&self, account_id: &str) -> i64 {
        let admin = Some(self.server().admin_key.as_str());
        let account = self.server().expect(200, "GET", &format!("/v1/accounts/{account_id}"), admin, None).await;
        account["balance_minor"].as_i64().unwrap()
    }
}

async fn ask(phone: &mut Holder, token: &str, body: Value) -> Reply {
    post_as(phone, token, CREDENTIALS, body).await
}

/// A DPoP-protected POST of the phone.
async fn post_as(phone: &mut Holder, token: &str, path: &str, body: Value) -> Reply {
    let proof = phone.proof("POST", path, Some(token));
    phone.protected(path, Some(format!("DPoP {token}")), &[proof], body).await
}

#[tokio::test]
async fn a_credential_sets_its_limit_aside_and_verifies_with_the_server_key() {
    let mut wallet = Wallet::new(10_000).await;
    let mark = wallet.server().audit_mark().await;
    let reply = wallet.ask(json!({"currency": "EUR", "limit_minor": 4_000})).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.json);
    assert_eq!(reply.headers["cache-control"], "no-store");
    let issued = reply.json;
    let credential_id = issued["credential_id"].as_str().unwrap().to_owned();
    let bytes = b64::decode("credential", issued["credential"].as_str().unwrap()).unwrap();
    let credential = verify_credential(&bytes, server_key(wallet.server()).await).unwrap();
    let c = credential.value();
    let now = wallet.server().now();
    assert_eq!(c.credential_id, id_bytes(&credential_id));
    assert_eq!(c.phone_key, wallet.market.phone.key().verifying_key());
    assert_eq!((c.limit_minor, c.currency, c.counter_start), (4_000, 978, 0));
    assert_eq!((c.issued_at, c.not_after), (now, now + 7 * 24 * 3600));
    assert_eq!(
        (&issued["limit_minor"], &issued["currency"], &issued["counter_start"], &issued["not_after"]),
        (&json!(4_000), &json!("EUR"), &json!(0), &json!(c.not_after))
    );
    c.check_valid_at(now).unwrap();

    let record = wallet.server().state.store.offline_credential(&credential_id).await.unwrap();
    assert_eq!(record.public_key, c.phone_key.sec1());
    assert_eq!(record.device_id, wallet.market.phone.device.device_id);
    assert_eq!(wallet.balance(&wallet.funding_id.clone()).await, 6_000);
    assert_eq!(wallet.balance(&record.reserve_account_id).await, 4_000);
    assert!(wallet.server().state.store.ledger_imbalance().await.unwrap().is_empty());
    let transfer = wallet.server().state.store.transfer(&format!("offline-reserve:{credential_id}")).await.unwrap();
    assert_eq!(transfer.unwrap().amount_minor, 4_000);
    wallet.server().assert_audited("issued", mark, &[("offline.credential_issued", &credential_id)]).await;

    // A second credential uses the same reserve account and a counter range of its own.
    let second =
        wallet.ask(json!({"currency": "EUR", "limit_minor": 1_000, "funding_account_id": wallet.funding_id})).await;
    assert_eq!(second.status.as_u16(), 201, "{}", second.json);
    assert_eq!(second.json["counter_start"], 1_i64 << 32);
    let again = wallet.server().state.store.offline_credential(second.json["credential_id"].as_str().unwrap()).await;
    assert_eq!(again.unwrap().reserve_account_id, record.reserve_account_id);
    assert_eq!(wallet.balance(&record.reserve_account_id).await, 5_000);
    wallet.server().assert_audit_intact("after issuing").await;
}

#[tokio::test]
async fn each_credential_refusal_names_its_reason_and_writes_nothing() {
    let mut wallet = Wallet::new(500).await;
    let cases = [
        (json!({"currency": "EUR", "limit_minor": 501}), 409, "insufficient-funds"),
        (json!({"currency": "EUR", "limit_minor": 100_001}), 422, "invalid-limit"),
        (json!({"currency": "EUR", "limit_minor": 0}), 422, "invalid-limit"),
        (json!({"currency": "EUR", "limit_minor": -5}), 422, "invalid-limit"),
        (json!({"currency": "USD", "limit_minor": 100}), 422, "no-funding-account"),
        (
            json!({"currency": "EUR", "limit_minor": 100, "funding_account_id": "acc_issuer_EUR"}),
            422,
            "no-funding-account",
        ),
        (json!({"currency": "EUR", "limit_minor": 100, "funding_account_id": "acc_nope"}), 422, "no-funding-account"),
        (json!({"currency": "XXX", "limit_minor": 100}), 422, "unsupported-currency"),
        (json!({"currency": "eur", "limit_minor": 100}), 422, "invalid-field"),
        (json!({"currency": "EUR"}), 422, "invalid-body"),
        (json!({"currency": "EUR", "limit_minor": "100"}), 422, "invalid-body"),
        (json!({"currency": "EUR", "limit_minor": 100, "extra": 1}), 422, "invalid-body"),
    ];
    let mark = wallet.server().audit_mark().await;
    for (body, status, problem) in cases {
        let reply = wallet.ask(body.clone()).await;
        assert_problem(&body.to_string(), &reply, status, problem);
    }
    wallet.server().assert_audited("nothing refused is audited", mark, &[]).await;
    assert_eq!(wallet.balance(&wallet.funding_id.clone()).await, 500);
    let device_id = wallet.market.phone.device.device_id.clone();
    assert!(wallet.server().state.store.offline_credentials_of_device(&device_id).await.unwrap().is_empty());
    let admin = Some(wallet.server().admin_key.as_str());
    let accounts = wallet.server().state.store.ledger_imbalance().await.unwrap();
    assert!(accounts.is_empty());
    let reply =
        wallet.server().call("POST", CREDENTIALS, admin, Some(json!({"currency": "EUR", "limit_minor": 1}))).await;
    assert_eq!(reply.status.as_u16(), 401, "an API key is not a phone: {}", reply.json);
}

#[tokio::test]
async fn the_ticket_limit_and_the_configured_cap_bound_the_limit() {
    let market = Market::with(|c: &mut Config| c.offline_limit_max_minor = 10_000_000, &DeviceHealth::clean()).await;
    let mut wallet = Wallet::on(market, 1_000_000).await;
    let max = wallet.market.session.claims.max_amount_minor;
    let reply = wallet.ask(json!({"currency": "EUR", "limit_minor": max + 1})).await;
    assert_problem("over the ticket", &reply, 422, "invalid-limit");
    let reply = wallet.ask(json!({"currency": "EUR", "limit_minor": max})).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.json);

    let market = Market::with(|c: &mut Config| c.offline_limit_max_minor = 50, &DeviceHealth::clean()).await;
    let mut wallet = Wallet::on(market, 1_000).await;
    let reply = wallet.ask(json!({"currency": "EUR", "limit_minor": 51})).await;
    assert_problem("over the cap", &reply, 422, "invalid-limit");
}

#[tokio::test]
async fn a_ticket_must_allow_offline() {
    let policy = vouch_server::attest::DEFAULT_POLICY.replace(r#""token", "dvv", "offline""#, r#""token", "dvv""#);
    assert_ne!(policy, vouch_server::attest::DEFAULT_POLICY);
    let market = Market::with_policy(&policy, |_| {}, &DeviceHealth::clean()).await;
    let mut wallet = Wallet::on(market, 1_000).await;
    let reply = wallet.ask(json!({"currency": "EUR", "limit_minor": 100})).await;
    assert_problem("no offline operation", &reply, 403, "operation-not-allowed");
    let reply = wallet.sync(refresh_of(UNKNOWN_CREDENTIAL, 1, 0)).await;
    assert_problem("refresh", &reply, 403, "operation-not-allowed");
    // Receipts alone need no offline permission.
    assert_eq!(wallet.synced(json!({})).await["receipts"], json!([]));
}

#[tokio::test]
async fn a_device_that_is_not_a_consumer_phone_gets_no_credential() {
    let mut pos = Holder::on(fixture().await, DeviceKind::Pos, &DeviceHealth::clean()).await;
    let session = pos.session().await;
    let reply = ask(&mut pos, &session.token, json!({"currency": "EUR", "limit_minor": 100})).await;
    assert_problem("pos", &reply, 403, "not-a-consumer-phone");
}

#[tokio::test]
async fn a_risky_or_unaffirmed_phone_gets_no_credential() {
    let configure = |c: &mut Config| {
        c.attest_spot_check_share = 1.0;
        c.offline_risk_threshold = 1;
    };
    let market = Market::with_policy(&risk_tolerant_policy(), configure, &outdated_phone()).await;
    let mut wallet = Wallet::on(market, 1_000).await;
    let reply = wallet.ask(json!({"currency": "EUR", "limit_minor": 100})).await;
    assert_problem("risk", &reply, 403, "risk-too-high");
    let reply = wallet.sync(refresh_of(UNKNOWN_CREDENTIAL, 1, 0)).await;
    assert_problem("risk, refresh", &reply, 403, "risk-too-high");

    let market = Market::with(|c| c.attest_spot_check_share = 1.0, &outdated_phone()).await;
    let mut wallet = Wallet::on(market, 1_000).await;
    let reply = wallet.ask(json!({"currency": "EUR", "limit_minor": 100})).await;
    assert_problem("warning", &reply, 403, "ticket-not-affirming");
    let reply = wallet.sync(refresh_of(UNKNOWN_CREDENTIAL, 1, 0)).await;
    assert_problem("warning, refresh", &reply, 403, "ticket-not-affirming");
    assert_eq!(wallet.balance(&wallet.funding_id.clone()).await, 1_000);
}

const SETTLE: &str = "/v1/offline-payments";

/// A funded phone holding a credential, and a certified terminal of the merchant.
struct Shop {
    wallet: Wallet,
    terminal: Enrolled,
    certificate: Vec<u8>,
    credential_id: String,
    reserve_id: String,
    counter: u64,
    nonce: u8,
}

impl Shop {
    async fn new(limit_minor: i64) -> Shop {
        Self::on(Wallet::new(10_000).await, limit_minor).await
    }

    async fn on(mut wallet: Wallet, limit_minor: i64) -> Shop {
        let reply = wallet.ask(json!({"currency": "EUR", "limit_minor": limit_minor})).await;
        assert_eq!(reply.status.as_u16(), 201, "{}", reply.json);
        let credential_id = reply.json["credential_id"].as_str().unwrap().to_owned();
        let terminal = wallet.market.phone.fx.enrol(DeviceKind::Terminal).await;
        let server = wallet.server();
        let admin = Some(server.admin_key.as_str());
        let issued = server.expect(201, "POST", &certificate_path(&terminal.device_id), admin, None).await;
        let certificate = b64::decode("certificate", issued["certificate"].as_str().unwrap()).unwrap();
        let reserve_id = server.state.store.offline_credential(&credential_id).await.unwrap().reserve_account_id;
        Shop { wallet, terminal, certificate, credential_id, reserve_id, counter: 0, nonce: 0 }
    }

    fn server(&self) -> &TestServer {
        self.wallet.server()
    }

    fn cert(&self) -> TerminalCertificate {
        let sign1 = vouch_proto::cose::UnverifiedSign1::parse(&self.certificate).unwrap();
        TerminalCertificate::from_cbor(sign1.payload_unverified()).unwrap()
    }

    fn request(&mut self, amount_minor: u64) -> PaymentRequest {
        let cert = self.cert();
        self.nonce += 1;
        PaymentRequest {
            merchant_id: cert.merchant_id,
            terminal_id: cert.terminal_id,
            amount_minor,
            currency: 978,
            nonce: [self.nonce; 16],
            time: self.server().now(),
        }
    }

    /// The three legs of a payment of `request`, approved under `counter`.
    fn legs(&self, request: PaymentRequest, counter: u64) -> Value {
        self.legs_under(&self.credential_id, request, counter)
    }

    /// [`Shop::legs`], approved under the credential `credential_id`.
    fn legs_under(&self, credential_id: &str, request: PaymentRequest, counter: u64) -> Value {
        let rng = SystemRandom::new();
        let request = request.sign(None, &self.terminal.device.key, &rng).unwrap();
        let approval = ConsumerApproval {
            request_hash: vouch_proto::crypto::sha256(request.bytes()),
            credential_id: id_bytes(credential_id),
            counter,
            time: self.server().now(),
        }
        .sign(None, self.wallet.market.phone.key(), &rng)
        .unwrap();
        let countersignature = MerchantCountersignature {
            digest: countersignature_digest(request.bytes(), approval.bytes()),
            time: self.server().now(),
        }
        .sign(None, &self.terminal.device.key, &rng)
        .unwrap();
        json!({
            "terminal_certificate": b64::encode(&self.certificate),
            "request": b64::encode(request.bytes()),
            "approval": b64::encode(approval.bytes()),
            "countersignature": b64::encode(countersignature.bytes()),
        })
    }

    /// A fresh, valid payment of `amount_minor` under the next counter.
    fn payment(&mut self, amount_minor: u64) -> Value {
        let request = self.request(amount_minor);
        self.counter += 1;
        self.legs(request, self.counter)
    }

    async fn settle(&self, payments: &[Value]) -> Vec<Value> {
        let admin = Some(self.server().admin_key.as_str());
        let reply = self.server().expect(200, "POST", SETTLE, admin, Some(json!({"payments": payments}))).await;
        reply["results"].as_array().unwrap().clone()
    }

    async fn settle_one(&self, payment: &Value) -> Value {
        self.settle(std::slice::from_ref(payment)).await.remove(0)
    }

    async fn merchant_balance(&self) -> i64 {
        let id = format!("acc_settle_{}_EUR", self.wallet.market.phone.fx.merchant_id);
        self.wallet.balance(&id).await
    }
}

fn assert_refused(what: &str, result: &Value, reason: &str) {
    assert_eq!(result["status"], "refused", "{what}: {result}");
    assert_eq!(result["reason"], reason, "{what}: {result}");
    assert!(result.get("receipt").is_none(), "{what}: {result}");
}

#[tokio::test]
async fn a_payment_settles_once_with_a_receipt_that_verifies() {
    let mut shop = Shop::new(4_000).await;
    let payment = shop.payment(1_250);
    let approval = b64::decode("approval", payment["approval"].as_str().unwrap()).unwrap();
    let expected_id = vouch_proto::hex::encode(payment_id(&approval));
    let mark = shop.server().audit_mark().await;
    let result = shop.settle_one(&payment).await;
    assert_eq!(result["status"], "settled", "{result}");
    assert_eq!(result["payment_id"], expected_id.as_str());
    assert_eq!(result["transfer_id"], expected_id.as_str());
    shop.server().assert_audited("settled", mark, &[("offline.settled", &expected_id)]).await;
    assert_eq!(shop.merchant_balance().await, 1_250);
    assert_eq!(shop.wallet.balance(&shop.reserve_id.clone()).await, 2_750);
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
    let receipt_bytes = b64::decode("receipt", result["receipt"].as_str().unwrap()).unwrap();
    let receipt = verify_receipt(&receipt_bytes, server_key(shop.server()).await).unwrap();
    let r = receipt.value();
    assert_eq!(r.payment_id, payment_id(&approval));
    assert_eq!(r.transfer_id, payment_id(&approval));
    assert_eq!((r.amount_minor, r.currency, r.settled_at), (1_250, 978, shop.server().now()));
    let transfer = shop.server().state.store.transfer(&expected_id).await.unwrap().unwrap();
    assert_eq!((transfer.amount_minor, transfer.debit_account_id.as_str()), (1_250, shop.reserve_id.as_str()));

    // The same payment again: the same receipt, and nothing moves.
    let again = shop.settle_one(&payment).await;
    assert_eq!(again["status"], "already_settled", "{again}");
    assert_eq!(again["receipt"], result["receipt"]);
    assert_eq!(again["transfer_id"], result["transfer_id"]);
    assert_eq!(shop.merchant_balance().await, 1_250);
    assert_eq!(shop.wallet.balance(&shop.reserve_id.clone()).await, 2_750);
    shop.server().assert_audit_intact("after settling").await;
}

#[tokio::test]
async fn settlement_holds_on_postgres() {
    let Some(url) = crate::support::postgres_url().await else { return };
    let market = Market::with(|config| config.database_url = url, &DeviceHealth::clean()).await;
    let mut shop = Shop::on(Wallet::on(market, 10_000).await, 4_000).await;
    let payment = shop.payment(1_250);
    let result = shop.settle_one(&payment).await;
    assert_eq!(result["status"], "settled", "{result}");
    let again = shop.settle_one(&payment).await;
    assert_eq!((again["status"].as_str(), &again["receipt"]), (Some("already_settled"), &result["receipt"]));
    let mut reused = shop.request(300);
    reused.nonce = [shop.nonce - 1; 16];
    shop.counter += 1;
    let reused = shop.legs(reused, shop.counter);
    assert_refused("nonce", &shop.settle_one(&reused).await, "nonce-reused");
    let request = shop.request(500);
    let double = shop.legs(request, shop.counter - 1);
    assert_refused("double spend", &shop.settle_one(&double).await, "double-spend");
    let later = shop.payment(100);
    assert_refused("after revocation", &shop.settle_one(&later).await, "credential-revoked");
    assert_eq!(shop.merchant_balance().await, 1_250);
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
    shop.server().assert_audit_intact("on postgres").await;
}

/// The same batch sent twice at once: on PostgreSQL the two requests settle under one
/// credential concurrently, and each payment still settles once and revokes nothing.
#[tokio::test]
async fn the_same_batch_sent_twice_at_once_settles_each_payment_once_on_postgres() {
    let Some(url) = crate::support::postgres_url().await else { return };
    let market = Market::with(|config| config.database_url = url, &DeviceHealth::clean()).await;
    let mut shop = Shop::on(Wallet::on(market, 10_000).await, 4_000).await;
    let batch: Vec<Value> = (0..20).map(|_| shop.payment(100)).collect();
    let (first, second) = tokio::join!(shop.settle(&batch), shop.settle(&batch));
    for (a, b) in first.iter().zip(&second) {
        let mut statuses = [a["status"].as_str().unwrap(), b["status"].as_str().unwrap()];
        statuses.sort_unstable();
        assert_eq!(statuses, ["already_settled", "settled"], "{a} {b}");
        assert_eq!(a["receipt"], b["receipt"]);
    }
    let record = shop.server().state.store.offline_credential(&shop.credential_id).await.unwrap();
    assert_eq!((record.revoked_at, record.settled_minor), (None, 2_000));
    assert_eq!(shop.merchant_balance().await, 2_000);
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_double_spend_is_refused_revokes_the_credential_and_is_audited() {
    let mut shop = Shop::new(4_000).await;
    let first = shop.payment(1_000);
    assert_eq!(shop.settle_one(&first).await["status"], "settled");
    let request = shop.request(500);
    let double = shop.legs(request, shop.counter);
    let mark = shop.server().audit_mark().await;
    let result = shop.settle_one(&double).await;
    assert_refused("double spend", &result, "double-spend");
    let credential_id = shop.credential_id.clone();
    shop.server().assert_audited("fraud", mark, &[("offline.double_spend", &credential_id)]).await;
    let record = shop.server().state.store.offline_credential(&credential_id).await.unwrap();
    assert!(record.revoked_at.is_some());
    let later = shop.payment(100);
    assert_refused("after revocation", &shop.settle_one(&later).await, "credential-revoked");
    // What was settled before stays settled.
    assert_eq!(shop.settle_one(&first).await["status"], "already_settled");
    assert_eq!(shop.merchant_balance().await, 1_000);
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
}

/// `payment` with the last byte of one leg's signature flipped.
fn tampered(payment: &Value, leg: &'static str) -> Value {
    let mut bytes = b64::decode(leg, payment[leg].as_str().unwrap()).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    let mut payment = payment.clone();
    payment[leg] = json!(b64::encode(&bytes));
    payment
}

#[tokio::test]
async fn a_reused_nonce_and_an_amount_over_the_remaining_limit_are_refused() {
    let mut shop = Shop::new(1_000).await;
    let first = shop.payment(600);
    assert_eq!(shop.settle_one(&first).await["status"], "settled");
    // The same request (and nonce) approved again under a new counter.
    let mut request = shop.request(100);
    request.nonce = [shop.nonce - 1; 16];
    shop.counter += 1;
    let reused = shop.legs(request, shop.counter);
    assert_refused("reused nonce", &shop.settle_one(&reused).await, "nonce-reused");
    let over = shop.payment(401);
    assert_refused("over the remaining limit", &shop.settle_one(&over).await, "over-limit");
    let rest = shop.payment(400);
    assert_eq!(shop.settle_one(&rest).await["status"], "settled");
    assert_eq!(shop.merchant_balance().await, 1_000);
    assert_eq!(shop.wallet.balance(&shop.reserve_id.clone()).await, 0);
    let record = shop.server().state.store.offline_credential(&shop.credential_id).await.unwrap();
    assert!(record.revoked_at.is_none(), "a refusal other than a double spend revokes nothing");
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
}

#[tokio::test]
async fn each_tampered_leg_is_refused_and_moves_nothing() {
    let mut shop = Shop::new(4_000).await;
    let payment = shop.payment(500);
    for (leg, reason) in [
        ("terminal_certificate", "server-signature"),
        ("request", "terminal-signature"),
        ("approval", "phone-signature"),
        ("countersignature", "countersignature-signature"),
    ] {
        assert_refused(leg, &shop.settle_one(&tampered(&payment, leg)).await, reason);
    }
    // A request signed by another terminal's key, under this terminal's certificate.
    let other = shop.wallet.market.phone.fx.enrol(DeviceKind::Terminal).await;
    let rng = SystemRandom::new();
    let mut forged = payment.clone();
    let request = shop.request(500).sign(None, &other.device.key, &rng).unwrap();
    forged["request"] = json!(b64::encode(request.bytes()));
    assert_refused("another terminal's request", &shop.settle_one(&forged).await, "terminal-signature");
    // A certificate signed by another key under the server's kid.
    let kid = vouch_proto::cose::UnverifiedSign1::parse(&shop.certificate).unwrap().kid().unwrap().to_vec();
    let certificate = shop.cert().sign(Some(&kid), &other.device.key, &rng).unwrap();
    let mut forged = payment.clone();
    forged["terminal_certificate"] = json!(b64::encode(certificate.bytes()));
    assert_refused("certificate by another key", &shop.settle_one(&forged).await, "server-signature");
    let certificate = shop.cert().sign(None, &other.device.key, &rng).unwrap();
    forged["terminal_certificate"] = json!(b64::encode(certificate.bytes()));
    assert_refused("certificate with no server kid", &shop.settle_one(&forged).await, "unknown-server-key");
    assert_eq!(shop.wallet.balance(&shop.reserve_id.clone()).await, 4_000);
    // Untouched, the payment settles.
    assert_eq!(shop.settle_one(&payment).await["status"], "settled");
}

#[tokio::test]
async fn a_batch_settles_its_good_payments_and_refuses_its_bad_ones() {
    let mut shop = Shop::new(4_000).await;
    let good = shop.payment(300);
    let bad = tampered(&shop.payment(300), "approval");
    let also_good = shop.payment(200);
    let results = shop.settle(&[good.clone(), bad, also_good, good]).await;
    let statuses: Vec<&str> = results.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["settled", "refused", "settled", "already_settled"]);
    assert_eq!(results[1]["reason"], "phone-signature");
    assert_eq!(results[3]["receipt"], results[0]["receipt"]);
    assert_eq!(shop.merchant_balance().await, 500);
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_malformed_batch_is_a_problem_and_settlement_needs_a_terminal_key() {
    let mut shop = Shop::new(4_000).await;
    let payment = shop.payment(100);
    let admin_key = shop.server().admin_key.clone();
    let admin = Some(admin_key.as_str());
    let reply = shop.server().call("POST", SETTLE, admin, Some(json!({"payments": []}))).await;
    assert_problem("empty", &reply, 422, "invalid-batch");
    let many = vec![payment.clone(); 1_001];
    let reply = shop.server().call("POST", SETTLE, admin, Some(json!({"payments": many}))).await;
    assert_problem("over 1,000", &reply, 422, "invalid-batch");
    let mut broken = payment.clone();
    broken["approval"] = json!("not base64url!");
    let reply = shop.server().call("POST", SETTLE, admin, Some(json!({"payments": [payment, broken]}))).await;
    assert_problem("bad base64", &reply, 400, "invalid-base64");
    let payment = shop.payment(100);
    let reply = shop.server().call("POST", SETTLE, None, Some(json!({"payments": [payment.clone()]}))).await;
    assert_eq!(reply.status.as_u16(), 401);
    let terminal_key = Some(shop.wallet.market.terminal_key.as_str());
    let reply = shop.server().call("POST", SETTLE, terminal_key, Some(json!({"payments": [payment]}))).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.json);
    assert_eq!(reply.json["results"][0]["status"], "settled");
}

const UNKNOWN_CREDENTIAL: &str = "ocr_00000000000000000000000000000000";

/// A sync that closes and refreshes `credential_id`.
fn refresh_of(credential_id: &str, counter_next: u64, spent_minor: i64) -> Value {
    json!({"credential_id": credential_id, "counter_next": counter_next, "spent_minor": spent_minor})
}

impl Shop {
    /// Pays from now on under the credential `issued` answers with.
    fn pay_under(&mut self, issued: &Value) {
        self.credential_id = issued["credential_id"].as_str().unwrap().to_owned();
        self.counter = issued["counter_start"].as_u64().unwrap();
    }
}

#[tokio::test]
async fn a_sync_gives_the_phone_its_receipts_which_verify_with_the_server_key() {
    let mut shop = Shop::new(4_000).await;
    let answer = shop.wallet.synced(json!({})).await;
    assert_eq!(answer, json!({"receipts": [], "next_cursor": null, "more": false, "credential": null, "closed": null}));
    let payments = [shop.payment(1_000), shop.payment(500)];
    let settled = shop.settle(&payments).await;
    let answer = shop.wallet.synced(json!({})).await;
    assert_eq!(
        (&answer["more"], &answer["credential"], &answer["closed"]),
        (&json!(false), &Value::Null, &Value::Null)
    );
    let receipts = answer["receipts"].as_array().unwrap();
    assert_eq!(receipts.len(), 2);
    let key = server_key(shop.server()).await;
    let merchant_id = shop.wallet.market.phone.fx.merchant_id.clone();
    for (counter, amount_minor, result) in [(1, 1_000, &settled[0]), (2, 500, &settled[1])] {
        let receipt = receipts.iter().find(|r| r["payment_id"] == result["payment_id"]).unwrap();
        let expected = json!({
            "payment_id": result["payment_id"], "transfer_id": result["transfer_id"], "receipt": result["receipt"],
            "credential_id": shop.credential_id, "counter": counter, "amount_minor": amount_minor, "currency": "EUR",
            "merchant_id": merchant_id, "settled_at": receipt["settled_at"],
        });
        assert_eq!(receipt, &expected);
        let bytes = b64::decode("receipt", receipt["receipt"].as_str().unwrap()).unwrap();
        let verified = verify_receipt(&bytes, &key).unwrap();
        let r = verified.value();
        let hex = vouch_proto::hex::encode(r.payment_id);
        assert_eq!(
            (hex.as_str(), r.amount_minor, r.currency),
            (receipt["payment_id"].as_str().unwrap(), amount_minor, 978)
        );
        assert_eq!(r.settled_at, receipt["settled_at"].as_i64().unwrap());
    }
    drop(key);
    // The cursor stays behind the newest receipts, so one stamped earlier that commits
    // later is still read.
    assert_eq!(answer["next_cursor"], Value::Null);
    let late = OfflinePaymentRecord {
        payment_id: "0".repeat(64),
        nonce: "0".repeat(32),
        counter: 99,
        settled_at: shop.server().now() - 1,
        ..shop.server().state.store.offline_payment(settled[0]["payment_id"].as_str().unwrap()).await.unwrap().unwrap()
    };
    let store = shop.server().state.store.clone();
    store.write(move |tx| Box::pin(async move { tx.insert_offline_payments(&[&late]).await })).await.unwrap();
    let answer = shop.wallet.synced(json!({})).await;
    assert_eq!(answer["receipts"].as_array().unwrap().len(), 3);
    assert_eq!(answer["receipts"][0]["payment_id"], "0".repeat(64));
    let phone = &mut shop.wallet.market.phone;
    phone.fx.clock.advance(RECEIPTS_CURSOR_LAG_SECS + 1);
    // The server's nonce may have moved on by two windows meanwhile.
    phone.nonce = phone.fx.server.state.dpop.current_nonce(phone.fx.server.now()).unwrap();
    let answer = shop.wallet.synced(json!({})).await;
    let last = &answer["receipts"][2];
    let cursor = json!(format!("{}.{}", last["settled_at"], last["payment_id"].as_str().unwrap()));
    assert_eq!(answer["next_cursor"], cursor);
    let after = shop.wallet.synced(json!({"receipts_after": cursor})).await;
    assert_eq!((&after["receipts"], &after["next_cursor"], &after["more"]), (&json!([]), &cursor, &json!(false)));
}

#[tokio::test]
async fn receipts_come_a_page_at_a_time_after_the_cursor() {
    let mut shop = Shop::new(4_000).await;
    let payment = shop.payment(100);
    let newest = shop.settle_one(&payment).await;
    // More settled payments than one answer holds, all older than the one above.
    let (credential_id, merchant_id) = (shop.credential_id.clone(), shop.wallet.market.phone.fx.merchant_id.clone());
    let older: Vec<OfflinePaymentRecord> = (0..SYNC_RECEIPTS_MAX as i64)
        .map(|i| OfflinePaymentRecord {
            payment_id: format!("{:064x}", 1_000 - i),
            credential_id: credential_id.clone(),
            counter: 1_000 + i,
            nonce: format!("{i:032x}"),
            amount_minor: 1,
            currency: "EUR".into(),
            merchant_id: merchant_id.clone(),
            terminal_id: shop.terminal.device_id.clone(),
            receipt: vec![0xd2, 0x84],
            settled_at: 1_000 + i / 100,
        })
        .collect();
    shop.server()
        .state
        .store
        .write(move |tx| {
            Box::pin(async move {
                let older: Vec<&OfflinePaymentRecord> = older.iter().collect();
                tx.insert_offline_payments(&older).await.map(drop)
            })
        })
        .await
        .unwrap();
    let first = shop.wallet.synced(json!({})).await;
    let page = first["receipts"].as_array().unwrap();
    assert_eq!((page.len(), &first["more"]), (SYNC_RECEIPTS_MAX, &json!(true)));
    let positions: Vec<(i64, &str)> =
        page.iter().map(|r| (r["settled_at"].as_i64().unwrap(), r["payment_id"].as_str().unwrap())).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in (settled_at, payment_id) order");
    let second = shop.wallet.synced(json!({"receipts_after": first["next_cursor"]})).await;
    let rest = second["receipts"].as_array().unwrap();
    assert_eq!((rest.len(), &rest[0]["payment_id"], &second["more"]), (1, &newest["payment_id"], &json!(false)));
    // A phone that re-reads from an older cursor gets what it has again, by payment id.
    let midway = shop.wallet.synced(json!({"receipts_after": first["next_cursor"]})).await;
    assert_eq!(midway["receipts"], second["receipts"]);
    let cursor = format!("{}.{}", positions[249].0, positions[249].1);
    let again = shop.wallet.synced(json!({"receipts_after": cursor})).await;
    let again = again["receipts"].as_array().unwrap();
    assert_eq!((again.len(), &again[0]["payment_id"]), (251, &page[250]["payment_id"]));
}

#[tokio::test]
async fn a_sync_closes_the_credential_and_issues_the_rest_without_moving_money() {
    let mut shop = Shop::new(4_000).await;
    let old_id = shop.credential_id.clone();
    let payments = [shop.payment(1_000), shop.payment(500)];
    assert!(shop.settle(&payments).await.iter().all(|r| r["status"] == "settled"));
    // Approved offline under counter 3, not uploaded by the terminal yet.
    let pending = shop.payment(300);
    let store = &shop.server().state.store;
    let transfers = store.account_transfers(&shop.reserve_id, None, 100).await.unwrap().len();
    let mark = shop.server().audit_mark().await;
    let answer = shop.wallet.synced(refresh_of(&old_id, 4, 1_800)).await;
    assert_eq!(
        answer["closed"],
        json!({"credential_id": old_id, "limit_minor": 1_800, "counter_end": 4, "settled_minor": 1_500})
    );
    let issued = answer["credential"].clone();
    let new_id = issued["credential_id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, old_id);
    let now = shop.server().now();
    assert_eq!(
        (&issued["limit_minor"], &issued["currency"], &issued["counter_start"], &issued["not_after"]),
        (&json!(2_200), &json!("EUR"), &json!(1_i64 << 32), &json!(now + 7 * 24 * 3600))
    );
    let bytes = b64::decode("credential", issued["credential"].as_str().unwrap()).unwrap();
    let credential = verify_credential(&bytes, server_key(shop.server()).await).unwrap();
    let c = credential.value();
    assert_eq!(c.credential_id, id_bytes(&new_id));
    assert_eq!(c.phone_key, shop.wallet.market.phone.key().verifying_key());
    assert_eq!((c.limit_minor, c.currency, c.counter_start, c.issued_at), (2_200, 978, 1 << 32, now));
    assert_eq!(answer["receipts"].as_array().unwrap().len(), 2);
    shop.server().assert_audited("refreshed", mark, &[("offline.credential_refreshed", &old_id)]).await;
    // No money moved: the rest was in the reserve already.
    let store = &shop.server().state.store;
    assert_eq!(store.account_transfers(&shop.reserve_id, None, 100).await.unwrap().len(), transfers);
    assert_eq!(store.offline_credential(&new_id).await.unwrap().reserve_account_id, shop.reserve_id);
    assert_eq!(shop.wallet.balance(&shop.wallet.funding_id.clone()).await, 6_000);
    assert_eq!(shop.wallet.balance(&shop.reserve_id.clone()).await, 2_500);

    // Under the old credential a counter at or past the end is refused; one below settles.
    let late = shop.payment(100);
    assert_refused("counter past the end", &shop.settle_one(&late).await, "counter-closed");
    assert_eq!(shop.settle_one(&pending).await["status"], "settled");
    // The new credential pays the rest.
    shop.pay_under(&issued);
    let rest = shop.payment(2_200);
    assert_eq!(shop.settle_one(&rest).await["status"], "settled", "under {new_id}");
    assert_eq!((shop.merchant_balance().await, shop.wallet.balance(&shop.reserve_id.clone()).await), (4_000, 0));

    let again = shop.wallet.sync(refresh_of(&old_id, 4, 1_800)).await;
    assert_problem("a second refresh", &again, 409, "credential-closed");
    let later = shop.wallet.synced(json!({})).await;
    let mut counters: Vec<u64> =
        later["receipts"].as_array().unwrap().iter().map(|r| r["counter"].as_u64().unwrap()).collect();
    counters.sort_unstable();
    assert_eq!(counters, [1, 2, 3, (1 << 32) + 1]);
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
    shop.server().assert_audit_intact("after refreshing").await;
}

#[tokio::test]
async fn a_credential_spent_in_full_closes_with_nothing_to_refresh() {
    let mut shop = Shop::new(1_000).await;
    let payment = shop.payment(1_000);
    assert_eq!(shop.settle_one(&payment).await["status"], "settled");
    let answer = shop.wallet.synced(refresh_of(&shop.credential_id.clone(), 2, 600)).await;
    assert_eq!(answer["credential"], Value::Null);
    assert_eq!(
        answer["closed"],
        json!({"credential_id": shop.credential_id, "limit_minor": 1_000, "counter_end": 2, "settled_minor": 1_000})
    );
    let device_id = shop.wallet.market.phone.device.device_id.clone();
    assert_eq!(shop.server().state.store.offline_credentials_of_device(&device_id).await.unwrap().len(), 1);
    let again = shop.wallet.synced(refresh_of(&shop.credential_id.clone(), 2, 600)).await;
    assert_eq!((&again["closed"], &again["credential"]), (&answer["closed"], &Value::Null));
}

impl Wallet {
    /// The same sync sent twice at once, as by a phone that retries before the first
    /// answer has come.
    async fn sync_twice_at_once(&mut self, body: Value) -> (Reply, Reply) {
        let token = self.market.session.token.clone();
        let phone = &self.market.phone;
        let request = || {
            let proof = phone.proof("POST", SYNC, Some(&token));
            protected_request(SYNC, Some(format!("DPoP {token}")), &[proof], body.clone())
        };
        let (first, second) = (request(), request());
        tokio::join!(phone.fx.server.send(first), phone.fx.server.send(second))
    }
}

/// The offline credential an answer carries, checked with the server key.
async fn verified_credential(server: &TestServer, issued: &Value) -> OfflineCredential {
    let bytes = b64::decode("credential", issued["credential"].as_str().unwrap()).unwrap();
    verify_credential(&bytes, server_key(server).await).unwrap().value().clone()
}

#[tokio::test]
async fn a_sync_whose_answer_was_lost_is_answered_again() {
    let mut shop = Shop::new(4_000).await;
    let old_id = shop.credential_id.clone();
    let payment = shop.payment(1_000);
    assert_eq!(shop.settle_one(&payment).await["status"], "settled");
    let pending = shop.payment(300);
    let mark = shop.server().audit_mark().await;
    let first = shop.wallet.synced(refresh_of(&old_id, 3, 1_300)).await;
    // The answer is lost. Meanwhile the terminal uploads what the phone approved before.
    assert_eq!(shop.settle_one(&pending).await["status"], "settled");
    let store = shop.server().state.store.clone();
    let transfers = store.account_transfers(&shop.reserve_id, None, 100).await.unwrap();
    shop.wallet.market.phone.advance(60);
    let retry = shop.wallet.synced(refresh_of(&old_id, 3, 1_300)).await;
    // As the close found it, though more has settled under it since.
    let closed = json!({"credential_id": old_id, "limit_minor": 1_300, "counter_end": 3, "settled_minor": 1_000});
    assert_eq!((&first["closed"], &retry["closed"]), (&closed, &closed));
    let (issued, reissued) = (&first["credential"], &retry["credential"]);
    for field in ["credential_id", "limit_minor", "currency", "counter_start", "not_after"] {
        assert_eq!(reissued[field], issued[field], "{field}");
    }
    assert_eq!((&reissued["limit_minor"], &reissued["counter_start"]), (&json!(2_700), &json!(1_i64 << 32)));
    let credential = verified_credential(shop.server(), reissued).await;
    assert_eq!(credential, verified_credential(shop.server(), issued).await);
    assert_eq!(credential.credential_id, id_bytes(reissued["credential_id"].as_str().unwrap()));
    assert_eq!(retry["receipts"].as_array().unwrap().len(), 2);

    // Another counter_next or spent_minor is another close, which is not repeated.
    for (counter_next, spent_minor) in [(4, 1_300), (2, 1_300), (3, 1_400), (3, 1_000)] {
        let reply = shop.wallet.sync(refresh_of(&old_id, counter_next, spent_minor)).await;
        assert_problem(&format!("{counter_next}, {spent_minor}"), &reply, 409, "credential-closed");
    }
    let audited = [("offline.credential_refreshed", old_id.as_str()), ("offline.settled", "*")];
    shop.server().assert_audited("one refresh, nothing for its repeats", mark, &audited).await;
    assert_eq!(store.account_transfers(&shop.reserve_id, None, 100).await.unwrap(), transfers);
    assert_eq!(shop.wallet.balance(&shop.wallet.funding_id.clone()).await, 6_000);
    assert_eq!(shop.wallet.balance(&shop.reserve_id.clone()).await, 2_700);
    let device_id = shop.wallet.market.phone.device.device_id.clone();
    assert_eq!(store.offline_credentials_of_device(&device_id).await.unwrap().len(), 2);

    // Once a payment under the new credential settles, the phone has it: no repeat.
    shop.pay_under(reissued);
    let payment = shop.payment(200);
    assert_eq!(shop.settle_one(&payment).await["status"], "settled");
    let reply = shop.wallet.sync(refresh_of(&old_id, 3, 1_300)).await;
    assert_problem("the new credential is in use", &reply, 409, "credential-closed");
    assert!(store.ledger_imbalance().await.unwrap().is_empty());
    shop.server().assert_audit_intact("after a repeated sync").await;
}

#[tokio::test]
async fn a_lost_answer_is_not_repeated_once_its_credential_is_closed_or_revoked() {
    let mut shop = Shop::new(4_000).await;
    let first_id = shop.credential_id.clone();
    let first = shop.wallet.synced(refresh_of(&first_id, 1, 0)).await;
    let second_id = first["credential"]["credential_id"].as_str().unwrap().to_owned();
    // The phone got the answer after all, and closes the new credential at its next sync.
    let second = shop.wallet.synced(refresh_of(&second_id, 1 << 32, 0)).await;
    let reply = shop.wallet.sync(refresh_of(&first_id, 1, 0)).await;
    assert_problem("the new credential is closed", &reply, 409, "credential-closed");
    let again = shop.wallet.synced(refresh_of(&second_id, 1 << 32, 0)).await;
    assert_eq!(again["credential"]["credential_id"], second["credential"]["credential_id"]);

    let third_id = second["credential"]["credential_id"].as_str().unwrap().to_owned();
    let store = shop.server().state.store.clone();
    let revoked = store.write(move |tx| Box::pin(async move { tx.revoke_offline_credential(&third_id, 1).await }));
    assert!(revoked.await.unwrap());
    let reply = shop.wallet.sync(refresh_of(&second_id, 1 << 32, 0)).await;
    assert_problem("the new credential is revoked", &reply, 409, "credential-closed");
}

#[tokio::test]
async fn the_same_sync_sent_twice_at_once_closes_once_and_both_get_its_answer() {
    let mut shop = Shop::new(4_000).await;
    let old_id = shop.credential_id.clone();
    let mark = shop.server().audit_mark().await;
    let (first, second) = shop.wallet.sync_twice_at_once(refresh_of(&old_id, 1, 500)).await;
    assert_eq!((first.status.as_u16(), second.status.as_u16()), (200, 200), "{} {}", first.json, second.json);
    assert_eq!(
        (&first.json["closed"], &first.json["credential"]["credential_id"]),
        (&second.json["closed"], &second.json["credential"]["credential_id"])
    );
    shop.server().assert_audited("one refresh", mark, &[("offline.credential_refreshed", &old_id)]).await;
}

#[tokio::test]
async fn each_sync_refusal_names_its_reason_and_closes_nothing() {
    let mut shop = Shop::new(4_000).await;
    let payment = shop.payment(100);
    assert_eq!(shop.settle_one(&payment).await["status"], "settled");
    let id = shop.credential_id.clone();
    let cases = [
        (json!({"credential_id": id}), 422, "invalid-counter"),
        (json!({"credential_id": id, "counter_next": 2}), 422, "invalid-spent"),
        (json!({"credential_id": id, "spent_minor": 100}), 422, "invalid-counter"),
        (json!({"credential_id": id, "counter_next": -1, "spent_minor": 100}), 422, "invalid-counter"),
        (refresh_of(&id, (1 << 32) + 1, 100), 422, "invalid-counter"),
        // Counter 1 has settled, so the phone's next counter cannot be 1.
        (refresh_of(&id, 1, 100), 422, "invalid-counter"),
        (json!({"credential_id": id, "counter_next": 2, "spent_minor": -1}), 422, "invalid-spent"),
        (refresh_of(&id, 2, 4_001), 422, "invalid-spent"),
        (json!({"counter_next": 2}), 422, "invalid-counter"),
        (json!({"spent_minor": 100}), 422, "invalid-spent"),
        (json!({"receipts_after": "yesterday"}), 422, "invalid-cursor"),
        (json!({"receipts_after": format!("1.{}", "A".repeat(64))}), 422, "invalid-cursor"),
        (json!({"credential_id": id, "counter_next": "2", "spent_minor": 100}), 422, "invalid-body"),
        (json!({"credential_id": 7}), 422, "invalid-body"),
        (json!({"extra": 1}), 422, "invalid-body"),
        (refresh_of(UNKNOWN_CREDENTIAL, 2, 100), 404, "unknown-credential"),
    ];
    let other = shop.wallet.market.phone.fx.enrol(DeviceKind::Consumer).await;
    let mark = shop.server().audit_mark().await;
    for (body, status, problem) in cases {
        let reply = shop.wallet.sync(body.clone()).await;
        assert_problem(&body.to_string(), &reply, status, problem);
    }

    // Another phone's credential is unknown to this one.
    let record = shop.server().state.store.offline_credential(&id).await.unwrap();
    let theirs = OfflineCredentialRecord {
        id: "ocr_0123456789abcdef0123456789abcdef".into(),
        device_id: other.device_id.clone(),
        settled_minor: 0,
        ..record.clone()
    };
    let insert = theirs.clone();
    let store = &shop.server().state.store;
    store.write(move |tx| Box::pin(async move { tx.insert_offline_credential(&insert).await })).await.unwrap();
    let reply = shop.wallet.sync(refresh_of(&theirs.id, 1, 0)).await;
    assert_problem("another phone's", &reply, 404, "unknown-credential");
    shop.server().assert_audited("nothing refused is audited", mark, &[]).await;
    let after = shop.server().state.store.offline_credential(&id).await.unwrap();
    assert_eq!(after, record, "still open, its limit whole");

    // A double spend revokes the credential: it is not refreshed either.
    let request = shop.request(100);
    let double = shop.legs(request, 1);
    assert_refused("double spend", &shop.settle_one(&double).await, "double-spend");
    let reply = shop.wallet.sync(refresh_of(&id, 2, 100)).await;
    assert_problem("revoked", &reply, 409, "credential-revoked");
    let admin = Some(shop.server().admin_key.clone());
    let reply = shop.server().call("POST", SYNC, admin.as_deref(), Some(json!({}))).await;
    assert_eq!(reply.status.as_u16(), 401, "an API key is not a phone: {}", reply.json);
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
}

#[tokio::test]
async fn sync_holds_on_postgres() {
    let Some(url) = crate::support::postgres_url().await else { return };
    let market = Market::with(|config| config.database_url = url, &DeviceHealth::clean()).await;
    let mut shop = Shop::on(Wallet::on(market, 10_000).await, 4_000).await;
    let old_id = shop.credential_id.clone();
    let first = shop.payment(1_000);
    assert_eq!(shop.settle_one(&first).await["status"], "settled");
    let pending = shop.payment(300);
    let answer = shop.wallet.synced(refresh_of(&old_id, 3, 1_300)).await;
    assert_eq!(
        answer["closed"],
        json!({"credential_id": old_id, "limit_minor": 1_300, "counter_end": 3, "settled_minor": 1_000})
    );
    assert_eq!(
        (&answer["credential"]["limit_minor"], answer["receipts"].as_array().unwrap().len()),
        (&json!(2_700), 1)
    );
    let late = shop.payment(100);
    assert_refused("counter past the end", &shop.settle_one(&late).await, "counter-closed");
    assert_eq!(shop.settle_one(&pending).await["status"], "settled");
    // The same sync again, as after a lost answer, gets the same answer.
    let again = shop.wallet.synced(refresh_of(&old_id, 3, 1_300)).await;
    assert_eq!(
        (&again["closed"], &again["credential"]["credential_id"]),
        (&answer["closed"], &answer["credential"]["credential_id"])
    );
    assert_eq!(again["receipts"].as_array().unwrap().len(), 2);
    let other = shop.wallet.sync(refresh_of(&old_id, 3, 1_200)).await;
    assert_problem("a second refresh", &other, 409, "credential-closed");
    let (first, second) = shop
        .wallet
        .sync_twice_at_once(refresh_of(answer["credential"]["credential_id"].as_str().unwrap(), (1 << 32) + 1, 0))
        .await;
    assert_eq!((first.status.as_u16(), second.status.as_u16()), (200, 200), "{} {}", first.json, second.json);
    assert_eq!(first.json["credential"]["credential_id"], second.json["credential"]["credential_id"]);
    assert_eq!(shop.wallet.balance(&shop.reserve_id.clone()).await, 2_700);
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
    shop.server().assert_audit_intact("on postgres").await;
}

#[tokio::test]
async fn a_batch_of_100_settles_exactly_its_good_payments() {
    let mut shop = Shop::new(1_000).await;
    let reply = shop.wallet.ask(json!({"currency": "EUR", "limit_minor": 500})).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.json);
    let second_id = reply.json["credential_id"].as_str().unwrap().to_owned();
    let mut second_counter = reply.json["counter_start"].as_u64().unwrap();
    let earlier = shop.payment(10);
    let earlier_result = shop.settle_one(&earlier).await;
    assert_eq!(earlier_result["status"], "settled");
    let mark = shop.server().audit_mark().await;

    // (payment, expected status, expected reason)
    let mut batch: Vec<(Value, &str, &str)> = vec![(earlier, "already_settled", "")];
    let mut spent_counter = 0;
    for i in 1..=80 {
        if i % 10 != 0 {
            batch.push((shop.payment(10), "settled", ""));
            spent_counter = spent_counter.max(shop.counter);
            continue;
        }
        let case = match i / 10 {
            1 => (tampered(&shop.payment(10), "terminal_certificate"), "refused", "server-signature"),
            2 => (tampered(&shop.payment(10), "request"), "refused", "terminal-signature"),
            3 => (tampered(&shop.payment(10), "approval"), "refused", "phone-signature"),
            4 => (tampered(&shop.payment(10), "countersignature"), "refused", "countersignature-signature"),
            5 => {
                let request = shop.request(10);
                (shop.legs_under(UNKNOWN_CREDENTIAL, request, 1), "refused", "unknown-credential")
            }
            // The payment just before, again.
            6 => (batch.last().unwrap().0.clone(), "already_settled", ""),
            // The nonce of the payment just before, under a new counter.
            7 => {
                let mut request = shop.request(10);
                request.nonce = [shop.nonce - 1; 16];
                shop.counter += 1;
                (shop.legs(request, shop.counter), "refused", "nonce-reused")
            }
            _ => (shop.payment(1_001), "refused", "over-limit"),
        };
        batch.push(case);
    }
    // 730 of the 1,000 are spent by now: 300 is over what is left, 270 is exactly it.
    batch.push((shop.payment(300), "refused", "over-limit"));
    batch.push((shop.payment(270), "settled", ""));
    batch.push((shop.payment(1), "refused", "over-limit"));
    // Another request under a counter settled earlier in the batch, then a payment
    // under the credential it revoked.
    let request = shop.request(5);
    batch.push((shop.legs(request, spent_counter), "refused", "double-spend"));
    batch.push((shop.payment(10), "refused", "credential-revoked"));
    // The second credential settles on.
    while batch.len() < 100 {
        let request = shop.request(10);
        second_counter += 1;
        batch.push((shop.legs_under(&second_id, request, second_counter), "settled", ""));
    }

    let payments: Vec<Value> = batch.iter().map(|(payment, _, _)| payment.clone()).collect();
    let results = shop.settle(&payments).await;
    assert_eq!(results.len(), 100);
    let mut audited = Vec::new();
    for (i, ((_, status, reason), result)) in batch.iter().zip(&results).enumerate() {
        assert_eq!(result["status"], *status, "payment {i}: {result}");
        if *status == "refused" {
            assert_refused(&format!("payment {i}"), result, reason);
        } else {
            assert_eq!(result["transfer_id"], result["payment_id"], "payment {i}: {result}");
        }
        match (*status, *reason) {
            ("settled", _) => audited.push(("offline.settled", result["payment_id"].as_str().unwrap())),
            (_, "double-spend") => audited.push(("offline.double_spend", shop.credential_id.as_str())),
            _ => {}
        }
    }
    assert_eq!(results[0]["receipt"], earlier_result["receipt"]);
    assert_eq!(results[60]["receipt"], results[59]["receipt"]);
    shop.server().assert_audited("one entry per settled payment and the fraud", mark, &audited).await;

    // 10 before the batch, then 72 x 10 and 270 under the first credential, 14 x 10
    // under the second: exactly the good ones moved.
    assert_eq!(shop.merchant_balance().await, 10 + 720 + 270 + 140);
    assert_eq!(shop.wallet.balance(&shop.reserve_id.clone()).await, 1_500 - 1_140);
    let store = &shop.server().state.store;
    assert!(store.offline_credential(&shop.credential_id).await.unwrap().revoked_at.is_some());
    assert!(store.offline_credential(&second_id).await.unwrap().revoked_at.is_none());
    for result in results.iter().filter(|r| r["status"] == "settled") {
        let transfer = store.transfer(result["payment_id"].as_str().unwrap()).await.unwrap();
        assert!(transfer.is_some(), "settled without a transfer: {result}");
    }
    assert!(store.ledger_imbalance().await.unwrap().is_empty());
    shop.server().assert_audit_intact("after the batch").await;
}

#[tokio::test]
async fn two_instances_on_postgres_settle_overlapping_batches_once_and_catch_a_double_spend() {
    let Some(url) = crate::support::postgres_url().await else { return };
    let market = Market::with(|config| config.database_url = url, &DeviceHealth::clean()).await;
    let mut shop = Shop::on(Wallet::on(market, 10_000).await, 4_000).await;
    let other = shop.server().another_instance().await;
    let admin = Some(shop.server().admin_key.clone());
    let payments: Vec<Value> = (0..20).map(|_| shop.payment(10)).collect();
    let reversed: Vec<Value> = payments.iter().rev().cloned().collect();
    let (here, there) = tokio::join!(
        shop.server().call("POST", SETTLE, admin.as_deref(), Some(json!({"payments": payments}))),
        other.call("POST", SETTLE, admin.as_deref(), Some(json!({"payments": reversed}))),
    );
    assert_eq!((here.status.as_u16(), there.status.as_u16()), (200, 200), "{} {}", here.json, there.json);
    let there: Vec<&Value> = there.json["results"].as_array().unwrap().iter().rev().collect();
    for (i, (a, b)) in here.json["results"].as_array().unwrap().iter().zip(there).enumerate() {
        let mut statuses = [a["status"].as_str().unwrap(), b["status"].as_str().unwrap()];
        statuses.sort_unstable();
        assert_eq!(statuses, ["already_settled", "settled"], "payment {i}: {a} {b}");
        assert_eq!(a["receipt"], b["receipt"], "payment {i}");
    }
    assert_eq!(shop.merchant_balance().await, 200);

    // Two different approvals under one counter, one to each instance at once.
    shop.counter += 1;
    let request = shop.request(100);
    let first = shop.legs(request, shop.counter);
    let request = shop.request(200);
    let second = shop.legs(request, shop.counter);
    let mark = shop.server().audit_mark().await;
    let (a, b) = tokio::join!(
        shop.server().call("POST", SETTLE, admin.as_deref(), Some(json!({"payments": [first]}))),
        other.call("POST", SETTLE, admin.as_deref(), Some(json!({"payments": [second]}))),
    );
    let (a, b) = (&a.json["results"][0], &b.json["results"][0]);
    let (winner, loser, amount) = if a["status"] == "settled" { (a, b, 100) } else { (b, a, 200) };
    assert_eq!(winner["status"], "settled", "{a} {b}");
    assert_refused("the concurrent double spend", loser, "double-spend");
    let credential_id = shop.credential_id.clone();
    let audited = shop.server().audited_since(mark).await;
    let mut actions: Vec<&str> = audited.iter().map(|(action, _)| action.as_str()).collect();
    actions.sort_unstable();
    assert_eq!(actions, ["offline.double_spend", "offline.settled"], "{audited:?}");
    assert!(audited.contains(&("offline.double_spend".to_owned(), credential_id.clone())));
    let record = shop.server().state.store.offline_credential(&credential_id).await.unwrap();
    assert!(record.revoked_at.is_some(), "the double spend revoked the credential");
    assert_eq!(shop.merchant_balance().await, 200 + amount);
    assert!(shop.server().state.store.ledger_imbalance().await.unwrap().is_empty());
    shop.server().assert_audit_intact("two instances").await;
}
