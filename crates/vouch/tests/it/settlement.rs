//! Offline settlement against real `vouch serve` processes: a funded phone holding an
//! offline credential and a certified terminal, set up over HTTP as an operator, the
//! phone and the terminal would, and payments signed with their keys.
//!
//! The crash test kills the server with SIGKILL in the middle of a settlement run,
//! restarts it on the same database and submits everything again: every payment settles
//! exactly once, and what was answered before the kill was durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vouch_device::attest::{SimulatedDeviceState, TamperMonitor};
use vouch_device::token::Method;
use vouch_device::{DeviceIdentity, TokenSession, VouchClient, sim};
use vouch_proto::crypto::{SystemRandom, random_bytes, sha256};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::offline::{
    ConsumerApproval, Id, MerchantCountersignature, PaymentRequest, WireType, countersignature_digest, payment_id,
};
use vouch_proto::{Clock, SystemClock, b64};

use crate::serve::{ServeProcess, postgres_schema};

/// Payments per settlement request, as a terminal uploads them.
pub const BATCH_PAYMENTS: usize = 100;
/// Concurrent requests of one terminal to one server.
const SUBMITTERS: usize = 4;
/// No rate limit gets in the way of a terminal uploading its day.
pub const UNLIMITED: [(&str, &str); 2] = [("VOUCH_RATE_LIMIT_PER_SEC", "100000"), ("VOUCH_RATE_LIMIT_BURST", "100000")];
const CURRENCY_EUR: u16 = 978;

/// A funded phone holding an offline credential, and a certified terminal whose API
/// key uploads what it collects.
pub struct OfflineShop {
    pub terminal_api_key: String,
    pub funding_account_id: String,
    pub reserve_account_id: String,
    pub funded_minor: i64,
    pub limit_minor: i64,
    phone: Arc<DeviceIdentity>,
    terminal: DeviceIdentity,
    certificate: String,
    merchant_id: Id,
    terminal_id: Id,
    credential_id: Id,
    counter_start: u64,
}

/// A POST with an API key that must succeed; its JSON answer.
async fn post(http: &reqwest::Client, url: &str, key: &str, body: Value) -> Value {
    let response = http.post(url).bearer_auth(key).json(&body).send().await.unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "POST {url}: {status} {answer}");
    answer
}

async fn get(http: &reqwest::Client, url: &str, key: &str) -> Value {
    let response = http.get(url).bearer_auth(key).send().await.unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "GET {url}: {status} {answer}");
    answer
}

/// The 16 bytes of the UUID behind a server id (`prefix_<32 hex digits>`).
fn id_bytes(id: &str) -> Id {
    let hex = id.rsplit_once('_').map_or(id, |(_, hex)| hex);
    assert_eq!(hex.len(), 32, "{id}");
    std::array::from_fn(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
}

impl OfflineShop {
    /// Sets the parties up on the server at `url`: a merchant, its certified terminal,
    /// a consumer whose attested phone holds a credential of `limit_minor` EUR set
    /// aside from `funded_minor`.
    pub async fn set_up(url: &str, admin_key: &str, funded_minor: i64, limit_minor: i64) -> OfflineShop {
        let (admin, devices) = (VouchClient::new(url).unwrap().with_api_key(admin_key), VouchClient::new(url).unwrap());
        let (http, rng) = (reqwest::Client::new(), SystemRandom::new());
        let merchant = admin.create_merchant("Offline Shop").await.unwrap();
        let phone_state = SimulatedDeviceState::clean(DeviceKind::Consumer, &merchant.merchant_id);
        admin.put_reference_values(&phone_state.reference_values()).await.unwrap();
        let phone = Arc::new(DeviceIdentity::generate(&rng).unwrap());
        let enrolled = sim::enrol(&admin, &phone, &phone_state.profile(), &SystemClock, &rng).await.unwrap();
        let mut monitor = TamperMonitor::new(phone_state);
        let attestation =
            sim::attest(&devices, &phone, &enrolled.device_id, &mut monitor, &SystemClock, &rng).await.unwrap();
        let consumer = admin.create_consumer("Offline shopper").await.unwrap();
        admin.add_consumer_device(&consumer.consumer_id, &enrolled.device_id).await.unwrap();

        let accounts = format!("{url}/v1/consumers/{}/accounts", consumer.consumer_id);
        let mut opened = Vec::new();
        for kind in ["consumer_funding", "consumer_offline_reserve"] {
            let account = post(&http, &accounts, admin_key, json!({"kind": kind, "currency": "EUR"})).await;
            opened.push(account["account_id"].as_str().unwrap().to_owned());
        }
        let [funding_account_id, reserve_account_id] = <[String; 2]>::try_from(opened).unwrap();
        let funding = json!({"transfer_id": "offline-funding", "account_id": funding_account_id,
            "amount_minor": funded_minor, "currency": "EUR"});
        post(&http, &format!("{url}/v1/consumers/{}/funding", consumer.consumer_id), admin_key, funding).await;

        let ticket = &attestation.outcome.ticket;
        let session =
            TokenSession::open(&devices, Arc::clone(&phone), ticket, Arc::new(SystemClock), &rng).await.unwrap();
        let body = json!({"currency": "EUR", "limit_minor": limit_minor, "funding_account_id": funding_account_id});
        let issued: Value = session.request(Method::POST, "/v1/offline/credentials", Some(&body)).await.unwrap();

        let terminal = DeviceIdentity::generate(&rng).unwrap();
        let terminal_state = SimulatedDeviceState::clean(DeviceKind::Terminal, &merchant.merchant_id);
        let terminal_device =
            sim::enrol(&admin, &terminal, &terminal_state.profile(), &SystemClock, &rng).await.unwrap().device_id;
        let path = format!("{url}/v1/devices/{terminal_device}/terminal-certificate");
        let certificate = post(&http, &path, admin_key, json!({})).await["certificate"].as_str().unwrap().to_owned();
        let terminal_api_key = admin.create_api_key(&["terminal"], "offline uploads").await.unwrap().api_key;
        OfflineShop {
            terminal_api_key,
            funding_account_id,
            reserve_account_id,
            funded_minor,
            limit_minor,
            phone,
            terminal,
            certificate,
            merchant_id: id_bytes(&merchant.merchant_id),
            terminal_id: id_bytes(&terminal_device),
            credential_id: id_bytes(issued["credential_id"].as_str().unwrap()),
            counter_start: issued["counter_start"].as_u64().unwrap(),
        }
    }

    /// `count` payments of 1 each, as the terminal uploads them, under the counters
    /// from the credential's start on, each with a nonce of its own; by payment id.
    pub fn payments(&self, count: usize) -> Vec<(String, Value)> {
        let rng = SystemRandom::new();
        let run: [u8; 8] = random_bytes(&rng).unwrap();
        let (terminal, phone) = (self.terminal.key(), self.phone.key());
        (0..count as u64)
            .map(|i| {
                let mut nonce = [0; 16];
                nonce[..8].copy_from_slice(&run);
                nonce[8..].copy_from_slice(&i.to_be_bytes());
                let time = SystemClock.now_unix();
                let request = PaymentRequest {
                    merchant_id: self.merchant_id,
                    terminal_id: self.terminal_id,
                    amount_minor: 1,
                    currency: CURRENCY_EUR,
                    nonce,
                    time,
                };
                let request = request.sign(None, terminal, &rng).unwrap();
                let approval = ConsumerApproval {
                    request_hash: sha256(request.bytes()),
                    credential_id: self.credential_id,
                    counter: self.counter_start + i,
                    time,
                };
                let approval = approval.sign(None, phone, &rng).unwrap();
                let digest = countersignature_digest(request.bytes(), approval.bytes());
                let countersignature = MerchantCountersignature { digest, time }.sign(None, terminal, &rng).unwrap();
                let payment = json!({
                    "terminal_certificate": self.certificate,
                    "request": b64::encode(request.bytes()),
                    "approval": b64::encode(approval.bytes()),
                    "countersignature": b64::encode(countersignature.bytes()),
                });
                (vouch_proto::hex::encode(payment_id(approval.bytes())), payment)
            })
            .collect()
    }
}

/// Settlement request bodies of `payments`, `BATCH_PAYMENTS` each.
pub fn batches<'a>(payments: impl IntoIterator<Item = &'a Value>) -> Vec<Value> {
    let payments: Vec<&Value> = payments.into_iter().collect();
    payments.chunks(BATCH_PAYMENTS).map(|batch| json!({ "payments": batch })).collect()
}

/// Uploads `batches` to the server at `url` from [`SUBMITTERS`] concurrent requests, each
/// taking the next batch not yet sent, until all are sent or one fails (the server is
/// gone); `answered` counts the batches answered so far. The results by batch.
pub async fn upload(url: &str, key: &str, batches: Arc<Vec<Value>>, answered: Arc<AtomicUsize>) -> Vec<Vec<Value>> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let mut submitters = tokio::task::JoinSet::new();
    for _ in 0..SUBMITTERS {
        let (http, url, key) = (http.clone(), format!("{url}/v1/offline-payments"), key.to_owned());
        let (batches, next, answered) = (Arc::clone(&batches), Arc::clone(&next), Arc::clone(&answered));
        submitters.spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(batch) = batches.get(i) else { break };
                let Ok(response) = http.post(&url).bearer_auth(&key).json(batch).send().await else { break };
                assert_eq!(response.status().as_u16(), 200, "batch {i}");
                let Ok(answer) = response.json::<Value>().await else { break };
                results.push(answer["results"].as_array().unwrap().clone());
                answered.fetch_add(1, Ordering::SeqCst);
            }
            results
        });
    }
    submitters.join_all().await.into_iter().flatten().collect()
}

/// Each payment's result, by payment id.
pub fn by_payment(results: &[Vec<Value>]) -> HashMap<String, Value> {
    results.iter().flatten().map(|r| (r["payment_id"].as_str().unwrap().to_owned(), r.clone())).collect()
}

/// Every transfer that debits or credits `account_id`, oldest first.
async fn transfers_of(http: &reqwest::Client, url: &str, admin_key: &str, account_id: &str) -> Vec<Value> {
    let mut transfers: Vec<Value> = Vec::new();
    loop {
        let after = transfers.last().map(|t| format!("&after={}", t["transfer_id"].as_str().unwrap()));
        let page_url = format!("{url}/v1/accounts/{account_id}/transfers?limit=500{}", after.unwrap_or_default());
        let page = get(http, &page_url, admin_key).await.as_array().unwrap().clone();
        if page.is_empty() {
            return transfers;
        }
        transfers.extend(page);
    }
}

/// The ledger after a run: each payment is exactly one transfer of 1 from the reserve
/// to the merchant, the balances are what the payments moved, all balances sum to
/// zero, and the audit chain verifies.
pub async fn assert_settled_once(server: &ServeProcess, admin_key: &str, shop: &OfflineShop, payment_ids: &[String]) {
    let (http, url, reserve) = (reqwest::Client::new(), &server.url, &shop.reserve_account_id);
    let transfers = transfers_of(&http, url, admin_key, reserve).await;
    let paid: Vec<&Value> = transfers.iter().filter(|t| t["debit_account_id"] == reserve.as_str()).collect();
    assert_eq!(paid.len(), payment_ids.len(), "one transfer per payment");
    let ids: HashSet<&str> = paid.iter().map(|t| t["transfer_id"].as_str().unwrap()).collect();
    assert_eq!(ids, payment_ids.iter().map(String::as_str).collect::<HashSet<_>>());
    assert!(paid.iter().all(|t| t["amount_minor"] == 1));
    let merchants: HashSet<&str> = paid.iter().map(|t| t["credit_account_id"].as_str().unwrap()).collect();
    let [merchant] = merchants.into_iter().collect::<Vec<_>>()[..] else { panic!("one merchant account") };
    let balance = |account_id: String| {
        let http = http.clone();
        async move { get(&http, &format!("{url}/v1/accounts/{account_id}"), admin_key).await["balance_minor"].clone() }
    };
    let sum = payment_ids.len() as i64;
    assert_eq!(balance(merchant.to_owned()).await, sum);
    assert_eq!(balance(reserve.clone()).await, shop.limit_minor - sum);
    assert_eq!(balance(shop.funding_account_id.clone()).await, shop.funded_minor - shop.limit_minor);
    let options = vouch_store::StoreOptions { max_connections: 2 };
    let store = vouch_store::Store::open(&server.database_url(), options).await.unwrap();
    assert_eq!(store.ledger_imbalance().await.unwrap(), [], "balances sum to zero");
    store.close().await;
    let audit = VouchClient::new(url).unwrap().with_api_key(admin_key).verify_audit().await.unwrap();
    assert!(audit.intact, "{audit:?}");
}

const CRASH_PAYMENTS: usize = 10_000;
/// Batches answered before the kill; the run has 100.
const KILL_AFTER_BATCHES: usize = 30;
const CRASH_FUNDED_MINOR: i64 = 20_000;
const CRASH_LIMIT_MINOR: i64 = 12_000;

/// Settles 10,000 payments through a server killed with SIGKILL once 30 of its 100
/// batches are answered, then restarted on the same database, and submits them all
/// again.
fn crash_and_resubmit(database: Option<&str>) {
    let started = Instant::now();
    let mut server = ServeProcess::start_with(database, &UNLIMITED);
    let admin_key = server.admin_key.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let shop = runtime.block_on(OfflineShop::set_up(&server.url, &admin_key, CRASH_FUNDED_MINOR, CRASH_LIMIT_MINOR));
    let payments = shop.payments(CRASH_PAYMENTS);
    let payment_ids: Vec<String> = payments.iter().map(|(id, _)| id.clone()).collect();
    let batches = Arc::new(batches(payments.iter().map(|(_, p)| p)));
    let set_up = started.elapsed();

    let answered = Arc::new(AtomicUsize::new(0));
    let before = runtime.block_on(async {
        let (url, key) = (server.url.clone(), shop.terminal_api_key.clone());
        let (batches, counter) = (Arc::clone(&batches), Arc::clone(&answered));
        let uploading = tokio::spawn(async move { upload(&url, &key, batches, counter).await });
        while answered.load(Ordering::SeqCst) < KILL_AFTER_BATCHES {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.kill();
        uploading.await.unwrap()
    });
    let before = by_payment(&before);
    assert!(before.len() < CRASH_PAYMENTS, "the kill came mid-run: {} answered", before.len());
    assert!(before.values().all(|r| r["status"] == "settled"), "a first submission settles");

    server.restart();
    let after = runtime.block_on(upload(&server.url, &shop.terminal_api_key, batches, Arc::new(AtomicUsize::new(0))));
    let after = by_payment(&after);
    assert_eq!(after.len(), CRASH_PAYMENTS, "every batch answered after the restart");
    let mut counts: BTreeMap<(&str, bool), usize> = BTreeMap::new();
    for (id, result) in &after {
        let status = result["status"].as_str().unwrap();
        assert!(status == "settled" || status == "already_settled", "{result}");
        if let Some(first) = before.get(id) {
            // What was answered before the kill had committed.
            assert_eq!((status, &result["receipt"]), ("already_settled", &first["receipt"]), "{id}");
        }
        *counts.entry((status, before.contains_key(id))).or_default() += 1;
    }
    runtime.block_on(assert_settled_once(&server, &admin_key, &shop, &payment_ids));
    eprintln!(
        "crash run on {}: set-up and signing {set_up:?}, total {:?}; answered before the kill {}, \
         settled after it {}, settled before it but unanswered {}",
        if database.is_some() { "PostgreSQL" } else { "SQLite" },
        started.elapsed(),
        before.len(),
        counts.get(&("settled", false)).unwrap_or(&0),
        counts.get(&("already_settled", false)).unwrap_or(&0),
    );
}

mod a_server_killed_mid_run_settles_every_payment_once {
    use super::*;

    #[test]
    fn sqlite() {
        crash_and_resubmit(None);
    }

    #[test]
    fn postgres() {
        let Some(url) = postgres_schema() else { return };
        crash_and_resubmit(Some(&url));
    }
}
