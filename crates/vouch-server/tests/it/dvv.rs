//! dvv: a validated phone gets temporary values, a terminal's authorization spends
//! them. One test per response code, per validity boundary (N-th and (N+1)-th use,
//! T-1 s and T+1 s on a pinned clock), per refusal of an issue, and per malformed field.

use serde_json::{Value, json};
use vouch_proto::enrol::DeviceKind;
use vouch_server::Config;

use crate::attest::{DeviceHealth, FIRMWARE, bare_fixture, fixture, reference_values};
use crate::support::{Reply, assert_problem};
use crate::token::{Holder, Session};

/// Two Luhn-valid payment tokens.
pub const ACCOUNT: &str = "4895370012003478";
pub const OTHER_ACCOUNT: &str = "4111111111111111";
pub const CARD_ACCEPTOR_ID: &str = "CORNERCOFFEE001";
pub const ISO_TERMINAL_ID: &str = "TERM0001";
pub const GROCERY: &str = "5411";

/// A consumer's attested phone with an open session and two accounts, and a terminal
/// of a grocery merchant.
pub struct Market {
    pub phone: Holder,
    pub session: Session,
    pub consumer_id: String,
    pub merchant_id: String,
    pub terminal_id: String,
    pub terminal_key: String,
    stan: u32,
}

impl Market {
    pub async fn new() -> Market {
        Self::on(Holder::on(fixture().await, DeviceKind::Consumer, &DeviceHealth::clean()).await).await
    }

    pub async fn with(configure: impl FnOnce(&mut Config), health: &DeviceHealth) -> Market {
        Self::with_policy(vouch_server::attest::DEFAULT_POLICY, configure, health).await
    }

    /// On a server whose appraisal policy is `rego`; the policy is compiled at start,
    /// so its file only lives that long.
    pub async fn with_policy(rego: &str, configure: impl FnOnce(&mut Config), health: &DeviceHealth) -> Market {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.rego");
        std::fs::write(&path, rego).unwrap();
        let fx = bare_fixture(|config| {
            config.attest_policy_file = Some(path);
            configure(config);
        })
        .await;
        fx.put_reference(&reference_values(FIRMWARE)).await;
        Self::on(Holder::on(fx, DeviceKind::Consumer, health).await).await
    }

    async fn on(mut phone: Holder) -> Market {
        let session = phone.session().await;
        let server = &phone.fx.server;
        let admin = Some(server.admin_key.as_str());
        let consumer = server.expect(201, "POST", "/v1/consumers", admin, Some(json!({"name": "Ada"}))).await;
        let consumer_id = consumer["consumer_id"].as_str().unwrap().to_owned();
        let device = json!({ "device_id": phone.device.device_id });
        server.expect(201, "POST", &format!("/v1/consumers/{consumer_id}/devices"), admin, Some(device)).await;
        for account in [ACCOUNT, OTHER_ACCOUNT] {
            let path = format!("/v1/consumers/{consumer_id}/payment-accounts");
            let created = server.expect(201, "POST", &path, admin, Some(json!({ "account_ref": account }))).await;
            assert_eq!(created["account_ref_last4"], account[12..]);
            assert!(!created.to_string().contains(account), "the reference is never returned: {created}");
        }
        let shop = json!({"name": "Grocer", "card_acceptor_id": CARD_ACCEPTOR_ID, "merchant_category": GROCERY});
        let merchant = server.expect(201, "POST", "/v1/merchants", admin, Some(shop)).await;
        let merchant_id = merchant["merchant_id"].as_str().unwrap().to_owned();
        let terminal = json!({ "iso_terminal_id": ISO_TERMINAL_ID });
        let terminal =
            server.expect(201, "POST", &format!("/v1/merchants/{merchant_id}/terminals"), admin, Some(terminal)).await;
        assert_eq!(terminal["card_acceptor_id"], CARD_ACCEPTOR_ID);
        Market {
            terminal_id: terminal["terminal_id"].as_str().unwrap().to_owned(),
            terminal_key: terminal["api_key"].as_str().unwrap().to_owned(),
            phone,
            session,
            consumer_id,
            merchant_id,
            stan: 0,
        }
    }

    pub async fn ask(&mut self, body: Value) -> Reply {
        let token = self.session.token.clone();
        let proof = self.phone.proof("POST", "/v1/dvv", Some(&token));
        self.phone.protected("/v1/dvv", Some(format!("DPoP {token}")), &[proof], body).await
    }

    /// A DVV for `account`, asserting it was issued.
    pub async fn issue(&mut self, account: &str) -> Value {
        let reply = self.ask(json!({ "account_ref": account })).await;
        assert_eq!(reply.status.as_u16(), 201, "issue: {}", reply.json);
        assert_eq!(reply.headers["cache-control"], "no-store");
        reply.json
    }

    /// An authorization request with the next STAN.
    pub fn request(&mut self, account: &str, dvv: &str, amount: i64) -> Value {
        self.stan += 1;
        json!({
            "merchant_id": self.merchant_id, "terminal_id": self.terminal_id,
            "stan": format!("{:06}", self.stan), "transmission_time": "1124103000",
            "amount": amount, "currency": "978", "account_ref": account, "dvv": dvv, "entry_mode": "071",
        })
    }

    pub async fn send(&self, request: &Value) -> Reply {
        let server = &self.phone.fx.server;
        server.call("POST", "/v1/authorizations", Some(&self.terminal_key), Some(request.clone())).await
    }

    /// Authorizes and returns `(response_code, reason)`.
    pub async fn authorize(&mut self, account: &str, dvv: &str, amount: i64) -> (String, String) {
        let request = self.request(account, dvv, amount);
        let reply = self.send(&request).await;
        assert_eq!(reply.status.as_u16(), 200, "authorize: {}", reply.json);
        let code = reply.json["response_code"].as_str().unwrap().to_owned();
        assert_eq!(reply.json["approved"], code == "00");
        assert_eq!(reply.json["authorization_code"].is_string(), code == "00", "{}", reply.json);
        (code, reply.json["reason"].as_str().unwrap().to_owned())
    }
}

fn dvv_of(issued: &Value) -> String {
    issued["dvv"].as_str().unwrap().to_owned()
}

/// A value that differs from `dvv` in its last digit.
fn wrong(dvv: &str) -> String {
    let last = dvv.as_bytes()[dvv.len() - 1];
    format!("{}{}", &dvv[..dvv.len() - 1], char::from(b'0' + (last - b'0' + 1) % 10))
}

fn outcome(code: &str, reason: &str) -> (String, String) {
    (code.to_owned(), reason.to_owned())
}

#[tokio::test]
async fn a_value_approves_once_and_a_fresh_one_follows() {
    let mut market = Market::new().await;
    let issued = market.issue(ACCOUNT).await;
    let dvv = dvv_of(&issued);
    assert_eq!(dvv.len(), 6);
    assert_eq!((issued["max_uses"].as_i64(), issued["assurance"].as_i64()), (Some(1), Some(3)));
    assert!(dvv.starts_with('3'), "the first digit is the assurance level");
    let now = vouch_proto::Clock::now_unix(&market.phone.fx.clock);
    assert_eq!(issued["expires_at"].as_i64(), Some(now + 300));
    assert_eq!(market.authorize(ACCOUNT, &dvv, 1250).await, outcome("00", "approved"));
    assert_eq!(market.authorize(ACCOUNT, &dvv, 1250).await, outcome("54", "dvv-used-up"));
    // Claim 1's second request: the phone asks again and is validated again.
    let again = dvv_of(&market.issue(ACCOUNT).await);
    assert_ne!(again, dvv);
    assert_eq!(market.authorize(ACCOUNT, &again, 1250).await, outcome("00", "approved"));
}

#[tokio::test]
async fn a_value_lasts_n_uses_or_t_seconds_whichever_ends_first() {
    let configure = |c: &mut Config| {
        c.dvv_policy.max_uses = 3;
        c.dvv_policy.ttl_secs = 120;
    };
    let mut market = Market::with(configure, &DeviceHealth::clean()).await;
    let dvv = dvv_of(&market.issue(ACCOUNT).await);
    for _ in 0..3 {
        assert_eq!(market.authorize(ACCOUNT, &dvv, 100).await, outcome("00", "approved"));
    }
    assert_eq!(market.authorize(ACCOUNT, &dvv, 100).await, outcome("54", "dvv-used-up"), "use N+1");

    let dvv = dvv_of(&market.issue(ACCOUNT).await);
    market.phone.advance(119);
    assert_eq!(market.authorize(ACCOUNT, &dvv, 100).await, outcome("00", "approved"), "T-1 s");
    market.phone.advance(2);
    assert_eq!(market.authorize(ACCOUNT, &dvv, 100).await, outcome("54", "dvv-expired"), "T+1 s");
}

#[tokio::test]
async fn a_category_policy_applies_where_the_phone_pays() {
    let configure = |c: &mut Config| {
        c.dvv_category_policies.insert("4111".into(), vouch_server::config::DvvPolicy { max_uses: 5, ttl_secs: 60 });
    };
    let mut market = Market::with(configure, &DeviceHealth::clean()).await;
    let reply = market.ask(json!({ "account_ref": ACCOUNT, "merchant_category": "4111" })).await;
    assert_eq!(reply.json["max_uses"], 5);
    // Issued for transit, presented at a grocer.
    let transit = dvv_of(&reply.json);
    assert_eq!(market.authorize(ACCOUNT, &transit, 100).await, outcome("05", "dvv-for-another-merchant-category"));
    let reply = market.ask(json!({ "account_ref": ACCOUNT, "merchant_category": GROCERY })).await;
    assert_eq!(reply.json["max_uses"], 1, "no policy for groceries: the global one, unrestricted");
    assert!(reply.json.get("merchant_category").is_none());
}

#[tokio::test]
async fn a_retry_gets_the_first_answer_and_counts_nothing_twice() {
    let configure = |c: &mut Config| c.dvv_policy.max_uses = 2;
    let mut market = Market::with(configure, &DeviceHealth::clean()).await;
    let dvv = dvv_of(&market.issue(ACCOUNT).await);
    let request = market.request(ACCOUNT, &dvv, 700);
    let first = market.send(&request).await.json;
    let retry = market.send(&request).await.json;
    assert_eq!(first["response_code"], "00");
    assert_eq!(retry, first, "the same authorization, code and authorization code");
    assert_eq!(market.authorize(ACCOUNT, &dvv, 700).await, outcome("00", "approved"), "the second use is still there");
    let mut changed = request.clone();
    changed["amount"] = json!(701);
    let duplicate = market.send(&changed).await.json;
    assert_eq!(
        (duplicate["response_code"].as_str(), duplicate["reason"].as_str()),
        (Some("94"), Some("duplicate-transmission"))
    );
    assert_eq!(duplicate["authorization_id"], first["authorization_id"]);
}

#[tokio::test]
async fn wrong_values_lock_the_account_until_the_phone_is_validated_again() {
    let mut market = Market::new().await;
    let dvv = dvv_of(&market.issue(ACCOUNT).await);
    assert_eq!(market.authorize(ACCOUNT, &wrong(&dvv), 100).await, outcome("05", "dvv-mismatch"));
    assert_eq!(market.authorize(ACCOUNT, "012345", 100).await, outcome("05", "dvv-mismatch"));
    assert_eq!(market.authorize(ACCOUNT, &wrong(&wrong(&dvv)), 100).await, outcome("75", "too-many-wrong-dvvs"));
    assert_eq!(market.authorize(ACCOUNT, &dvv, 100).await, outcome("75", "account-locked"), "even the right value");
    let fresh = dvv_of(&market.issue(ACCOUNT).await);
    assert_eq!(market.authorize(ACCOUNT, &fresh, 100).await, outcome("00", "approved"));
}

#[tokio::test]
async fn a_value_of_another_account_is_a_security_violation() {
    let mut market = Market::new().await;
    let other = dvv_of(&market.issue(OTHER_ACCOUNT).await);
    assert_eq!(market.authorize(ACCOUNT, &other, 100).await, outcome("63", "dvv-of-another-account"));
    assert_eq!(market.authorize(OTHER_ACCOUNT, &other, 100).await, outcome("00", "approved"));
}

#[tokio::test]
async fn unknown_and_invalid_accounts_and_amounts_over_the_limit_are_declined() {
    let mut market = Market::new().await;
    let issued = market.issue(ACCOUNT).await;
    let dvv = dvv_of(&issued);
    assert_eq!(market.authorize("4000000000000002", &dvv, 100).await, outcome("14", "unknown-account"));
    assert_eq!(market.authorize("4895370012003477", &dvv, 100).await, outcome("14", "invalid-account-ref"));
    let limit = issued["amount_limit_minor"].as_i64().unwrap();
    assert_eq!(limit, 100_000, "assurance 3 keeps the whole ticket limit");
    assert_eq!(market.authorize(ACCOUNT, &dvv, limit + 1).await, outcome("61", "over-dvv-limit"));
    assert_eq!(market.authorize(ACCOUNT, &dvv, limit).await, outcome("00", "approved"));
}

#[tokio::test]
async fn a_suspended_phone_values_stop_at_once() {
    let mut market = Market::new().await;
    let dvv = dvv_of(&market.issue(ACCOUNT).await);
    let device_id = market.phone.device.device_id.clone();
    market.phone.fx.change_status(&device_id, "suspend").await;
    assert_eq!(market.authorize(ACCOUNT, &dvv, 100).await, outcome("05", "phone-not-active"));
}

/// The default policy, except that medium signals alone leave a device affirming (with
/// their risk), as a deployment that grades phones by risk would have it.
pub fn risk_tolerant_policy() -> String {
    let policy =
        vouch_server::attest::DEFAULT_POLICY.replace("} else := \"warning\" if {\n\tcount(cautionary) > 0\n", "");
    assert_ne!(policy, vouch_server::attest::DEFAULT_POLICY, "the default policy still has the cautionary rule");
    policy
}

pub fn outdated_phone() -> DeviceHealth {
    DeviceHealth { os_patch_level: "2019-01-01".into(), ..DeviceHealth::clean() }
}

#[tokio::test]
async fn each_issue_refusal_names_its_reason() {
    let configure = |c: &mut Config| {
        c.attest_spot_check_share = 1.0;
        c.dvv_velocity_max = 2;
    };
    let mut market = Market::with_policy(&risk_tolerant_policy(), configure, &outdated_phone()).await;
    let risk = market.session.claims.risk;
    assert!(risk > 0 && risk < 25, "an outdated patch level is a medium signal: risk {risk}");
    let issued = market.issue(ACCOUNT).await;
    assert_eq!(issued["assurance"], 2);
    assert!(dvv_of(&issued).starts_with('2'));
    assert_eq!(issued["amount_limit_minor"], 100_000 * 2 / 3);
    market.issue(OTHER_ACCOUNT).await;
    let reply = market.ask(json!({ "account_ref": ACCOUNT })).await;
    assert_problem("velocity", &reply, 429, "velocity-exceeded");

    let cases = [
        (json!({ "account_ref": "4000000000000002" }), 403, "account-not-owned"),
        (json!({ "account_ref": "4895370012003477" }), 422, "invalid-account-ref"),
        (json!({ "account_ref": "48953700120034" }), 422, "invalid-account-ref"),
        (json!({ "account_ref": ACCOUNT, "merchant_category": "54" }), 422, "invalid-field"),
        (json!({ "account": ACCOUNT }), 422, "invalid-body"),
    ];
    for (body, status, problem) in cases {
        let reply = market.ask(body.clone()).await;
        assert_problem(&body.to_string(), &reply, status, problem);
    }
}

#[tokio::test]
async fn a_phone_over_the_risk_threshold_gets_nothing() {
    let configure = |c: &mut Config| {
        c.attest_spot_check_share = 1.0;
        c.dvv_risk_threshold = 10;
    };
    let mut market = Market::with_policy(&risk_tolerant_policy(), configure, &outdated_phone()).await;
    let reply = market.ask(json!({ "account_ref": ACCOUNT })).await;
    assert_problem("risk", &reply, 403, "risk-too-high");
}

#[tokio::test]
async fn a_phone_whose_ticket_is_not_affirming_gets_nothing() {
    let mut market = Market::with(|c| c.attest_spot_check_share = 1.0, &outdated_phone()).await;
    let reply = market.ask(json!({ "account_ref": ACCOUNT })).await;
    assert_problem("warning", &reply, 403, "ticket-not-affirming");
}

#[tokio::test]
async fn a_ticket_must_allow_dvv() {
    let policy = vouch_server::attest::DEFAULT_POLICY.replace(r#""token", "dvv", "offline""#, r#""token", "offline""#);
    let mut market = Market::with_policy(&policy, |_| {}, &DeviceHealth::clean()).await;
    let reply = market.ask(json!({ "account_ref": ACCOUNT })).await;
    assert_problem("no dvv operation", &reply, 403, "operation-not-allowed");
}

#[tokio::test]
async fn a_device_that_is_not_a_consumer_phone_gets_nothing() {
    let mut pos = Holder::on(fixture().await, DeviceKind::Pos, &DeviceHealth::clean()).await;
    let session = pos.session().await;
    let proof = pos.proof("POST", "/v1/dvv", Some(&session.token));
    let body = json!({ "account_ref": ACCOUNT });
    let reply = pos.protected("/v1/dvv", Some(format!("DPoP {}", session.token)), &[proof], body).await;
    assert_problem("pos", &reply, 403, "not-a-consumer-phone");
    let reply = pos.protected("/v1/dvv", None, &[], json!({ "account_ref": ACCOUNT })).await;
    assert_eq!(reply.status.as_u16(), 401);
}

#[tokio::test]
async fn malformed_authorizations_are_problems_not_decisions() {
    let mut market = Market::new().await;
    let dvv = dvv_of(&market.issue(ACCOUNT).await);
    let good = market.request(ACCOUNT, &dvv, 100);
    let mutate = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let cases = [
        ("stan", mutate("stan", json!("12345"))),
        ("transmission_time", mutate("transmission_time", json!("1324103000"))),
        ("transmission_time", mutate("transmission_time", json!("11241030"))),
        ("amount", mutate("amount", json!(0))),
        ("amount", mutate("amount", json!(1_000_000_000_000i64))),
        ("currency", mutate("currency", json!("EUR"))),
        ("account_ref", mutate("account_ref", json!("4895-3700-1200-3478"))),
        ("dvv", mutate("dvv", json!("12345"))),
        ("dvv", mutate("dvv", json!("12345a"))),
        ("entry_mode", mutate("entry_mode", json!("71"))),
        ("retrieval_reference", mutate("retrieval_reference", json!("short"))),
    ];
    for (field, body) in cases {
        let reply = market.send(&body).await;
        assert_problem(field, &reply, 422, "invalid-field");
        assert!(reply.json["detail"].as_str().unwrap().contains(field), "{field}: {}", reply.json);
    }
    let server = &market.phone.fx.server;
    let reply = market.send(&mutate("terminal_id", json!("trm_other"))).await;
    assert_problem("terminal", &reply, 403, "terminal-mismatch");
    let reply = server.call("POST", "/v1/authorizations", Some(&server.admin_key), Some(good.clone())).await;
    assert_problem("admin key", &reply, 403, "not-a-terminal-key");
    let reply = server.call("POST", "/v1/authorizations", None, Some(good.clone())).await;
    assert_eq!(reply.status.as_u16(), 401);
    let mut extra = good.clone();
    extra["pan"] = json!("4111111111111111");
    assert_problem("unknown field", &market.send(&extra).await, 422, "invalid-body");
    assert_eq!(market.authorize(ACCOUNT, &dvv, 100).await, outcome("00", "approved"), "nothing was spent");
}

#[tokio::test]
async fn a_terminal_reads_its_own_authorizations_only() {
    let mut market = Market::new().await;
    let dvv = dvv_of(&market.issue(ACCOUNT).await);
    let request = market.request(ACCOUNT, &dvv, 100);
    let decided = market.send(&request).await.json;
    let id = decided["authorization_id"].as_str().unwrap();
    let server = &market.phone.fx.server;
    let path = format!("/v1/authorizations/{id}");
    assert_eq!(server.expect(200, "GET", &path, Some(&market.terminal_key), None).await, decided);
    assert_eq!(server.expect(200, "GET", &path, Some(&server.admin_key), None).await, decided);
    let admin = Some(server.admin_key.as_str());
    let other = server
        .expect(
            201,
            "POST",
            &format!("/v1/merchants/{}/terminals", market.merchant_id),
            admin,
            Some(json!({"iso_terminal_id": "TERM0002"})),
        )
        .await;
    let reply = server.call("GET", &path, other["api_key"].as_str(), None).await;
    assert_problem("other terminal", &reply, 404, "not-found");
}

#[tokio::test]
async fn registering_parties_refuses_what_is_wrong() {
    let market = Market::new().await;
    let server = &market.phone.fx.server;
    let admin = Some(server.admin_key.as_str());
    let accounts = format!("/v1/consumers/{}/payment-accounts", market.consumer_id);
    let cases = [
        ("/v1/merchants".to_owned(), json!({"name": "X", "card_acceptor_id": "SHORT"}), 422, "invalid-field"),
        (
            "/v1/merchants".to_owned(),
            json!({"name": "X", "card_acceptor_id": CARD_ACCEPTOR_ID}),
            409,
            "card-acceptor-id-taken",
        ),
        ("/v1/merchants".to_owned(), json!({"name": "X", "merchant_category": "541"}), 422, "invalid-field"),
        (accounts.clone(), json!({"account_ref": ACCOUNT}), 409, "account-ref-registered"),
        (accounts, json!({"account_ref": "4895370012003477"}), 422, "invalid-account-ref"),
        (
            "/v1/consumers/cns_none/payment-accounts".to_owned(),
            json!({"account_ref": "4000000000000002"}),
            404,
            "not-found",
        ),
        (
            format!("/v1/merchants/{}/terminals", market.merchant_id),
            json!({"iso_terminal_id": ISO_TERMINAL_ID}),
            409,
            "terminal-id-taken",
        ),
        (
            format!("/v1/merchants/{}/terminals", market.merchant_id),
            json!({"iso_terminal_id": "T1"}),
            422,
            "invalid-field",
        ),
        (
            format!("/v1/consumers/{}/devices", market.consumer_id),
            json!({"device_id": market.phone.device.device_id}),
            409,
            "device-has-consumer",
        ),
        ("/v1/consumers".to_owned(), json!({"name": ""}), 422, "invalid-field"),
    ];
    for (path, body, status, problem) in cases {
        let reply = server.call("POST", &path, admin, Some(body.clone())).await;
        assert_problem(&format!("{path} {body}"), &reply, status, problem);
    }
    let plain = server.merchant("No ISO id").await;
    let reply = server
        .call("POST", &format!("/v1/merchants/{plain}/terminals"), admin, Some(json!({"iso_terminal_id": "TERM0009"})))
        .await;
    assert_problem("no card acceptor id", &reply, 422, "merchant-without-card-acceptor-id");
    let pos = market.phone.fx.enrol(DeviceKind::Pos).await;
    let reply = server
        .call(
            "POST",
            &format!("/v1/consumers/{}/devices", market.consumer_id),
            admin,
            Some(json!({"device_id": pos.device_id})),
        )
        .await;
    assert_problem("pos as phone", &reply, 422, "not-a-consumer-device");
}
