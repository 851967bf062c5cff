//! `authorize`: DVV authorizations from terminals. No signatures are on this path, so
//! its bounds are its two parts, each measured alone in the same run: HTTP (`GET
//! /healthz` at the same concurrency) and the decision with its database work (called
//! in-process, no HTTP).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use vouch_device::VouchClient;
use vouch_proto::dvv::AccountRef;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::iso8583::TransmissionTime;
use vouch_proto::{Clock, SystemClock};
use vouch_server::dvv::{AuthorizationRequest, Channel};

use super::{
    BenchArgs, BenchClient, BenchReport, CRYPTO_SAMPLE, ERROR_BODY_CHARS_MAX, OpFuture, PartBounds, bench_http,
    bound_devices, gather_all, measure, measured,
};

/// Uses per bench DVV and how long it lasts: enough for any run the bench allows.
const BENCH_DVV_USES: i64 = 1_000_000;
const BENCH_DVV_TTL_SECS: i64 = 2 * 3600;
const AMOUNT_MINOR: i64 = 1_250;
/// The in-process decision sample uses this transmission time, so its retry keys never
/// meet those of the HTTP run.
const SAMPLE_TRANSMISSION_TIME: &str = "0101000000";

/// A terminal of its own and a phone's DVV for each client.
struct Lane {
    terminal_id: String,
    merchant_id: String,
    terminal_key: String,
    account_ref: String,
    dvv: String,
}

pub(super) async fn authorize(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if args.target.is_some() {
        bail!("authorize measures its database bound in-process; run it without --target");
    }
    let local = crate::demo::start_local_with(args.database.as_deref(), 10_000_000, |config| {
        config.dvv_policy.max_uses = BENCH_DVV_USES;
        config.dvv_policy.ttl_secs = BENCH_DVV_TTL_SECS;
    })
    .await?;
    let url = local.url.clone();
    let admin = Admin { client: VouchClient::new(&url)?.with_api_key(&local.admin_key), key: local.admin_key.clone() };
    let lanes = lanes(&admin, args.clients).await?;
    let http = bench_http()?;
    let http_bound = healthz_rate(&http, &url, args.clients).await?;
    let db_bound = decision_rate(&local.state, &lanes).await?;

    let duration = Duration::from_secs(args.seconds);
    let deadline = Instant::now() + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = lanes
        .into_iter()
        .map(|lane| {
            let client = AuthorizeClient { http: http.clone(), url: format!("{url}/v1/authorizations"), lane };
            tokio::spawn(measure(client, deadline, stop.clone()))
        })
        .collect();
    let (total, histogram) = gather_all(clients).await?;
    let mut report = measured("authorize", args.clients, duration, total, &histogram);
    report.parts = Some(PartBounds {
        http_bound_ops_per_sec: http_bound,
        db_bound_ops_per_sec: db_bound,
        http_share: report.ops_per_sec / http_bound,
        db_share: report.ops_per_sec / db_bound,
    });
    Ok(report)
}

/// The admin client and its key, for the set-up calls the SDK has no method for.
struct Admin {
    client: VouchClient,
    key: String,
}

async fn admin_post(admin: &Admin, path: &str, body: Value) -> anyhow::Result<Value> {
    let response = bench_http()?
        .post(format!("{}{path}", admin.client.base_url()))
        .bearer_auth(&admin.key)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    if status != reqwest::StatusCode::CREATED {
        bail!("setup: POST {path} answered {status}: {}", text.chars().take(ERROR_BODY_CHARS_MAX).collect::<String>());
    }
    Ok(serde_json::from_str(&text)?)
}

fn text(value: &Value, key: &str) -> anyhow::Result<String> {
    value[key].as_str().map(str::to_owned).with_context(|| format!("setup: no {key} in {value}"))
}

/// One consumer with `count` attested phones, one account and one DVV each, and a
/// terminal per phone at one merchant.
async fn lanes(admin: &Admin, count: usize) -> anyhow::Result<Vec<Lane>> {
    let (_, phones) = bound_devices(&admin.client, count, DeviceKind::Consumer).await?;
    let run = SystemClock.now_unix() % 1_000_000_000;
    let consumer = admin_post(admin, "/v1/consumers", json!({ "name": "Bench consumer" })).await?;
    let consumer_id = text(&consumer, "consumer_id")?;
    let shop =
        json!({ "name": "Bench grocer", "card_acceptor_id": format!("BENCH{run:010}"), "merchant_category": "5411" });
    let merchant_id = text(&admin_post(admin, "/v1/merchants", shop).await?, "merchant_id")?;
    let mut lanes = Vec::with_capacity(count);
    for (i, phone) in phones.into_iter().enumerate() {
        admin_post(admin, &format!("/v1/consumers/{consumer_id}/devices"), json!({ "device_id": phone.device_id }))
            .await?;
        let account_ref = AccountRef::with_check_digit(&format!("4{run:09}{i:05}"))?;
        let accounts = format!("/v1/consumers/{consumer_id}/payment-accounts");
        admin_post(admin, &accounts, json!({ "account_ref": account_ref.expose() })).await?;
        let terminal = json!({ "iso_terminal_id": format!("BT{i:06}") });
        let terminal = admin_post(admin, &format!("/v1/merchants/{merchant_id}/terminals"), terminal).await?;
        let issued: Value = phone
            .session
            .request(Method::POST, "/v1/dvv", Some(&json!({ "account_ref": account_ref.expose() })))
            .await
            .context("setup: issuing a DVV")?;
        lanes.push(Lane {
            terminal_id: text(&terminal, "terminal_id")?,
            merchant_id: merchant_id.clone(),
            terminal_key: text(&terminal, "api_key")?,
            account_ref: account_ref.expose().to_owned(),
            dvv: text(&issued, "dvv")?,
        });
    }
    Ok(lanes)
}

/// Requests per second of `GET /healthz` from `clients` concurrent clients: what HTTP
/// and the client cost alone.
async fn healthz_rate(http: &reqwest::Client, url: &str, clients: usize) -> anyhow::Result<f64> {
    let deadline = Instant::now() + CRYPTO_SAMPLE;
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url) = (http.clone(), format!("{url}/healthz"));
            tokio::spawn(async move {
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    http.get(&url).send().await?.error_for_status()?.bytes().await?;
                    ops += 1;
                }
                anyhow::Ok(ops)
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker.await??;
    }
    Ok(total as f64 / CRYPTO_SAMPLE.as_secs_f64())
}

/// Decisions per second with the server's own code and database, no HTTP: one task per
/// lane, each approving with its lane's DVV.
async fn decision_rate(state: &vouch_server::AppState, lanes: &[Lane]) -> anyhow::Result<f64> {
    let deadline = Instant::now() + CRYPTO_SAMPLE;
    let mut workers = Vec::with_capacity(lanes.len());
    for lane in lanes {
        let (terminal, merchant) = state.store.terminal(&lane.terminal_id).await?;
        let (state, account_ref, dvv) = (state.clone(), lane.account_ref.clone(), lane.dvv.clone());
        workers.push(tokio::spawn(async move {
            let mut ops = 0u64;
            while Instant::now() < deadline {
                let request = AuthorizationRequest {
                    stan: format!("{:06}", ops % 1_000_000),
                    transmission_time: SAMPLE_TRANSMISSION_TIME.to_owned(),
                    amount_minor: AMOUNT_MINOR,
                    currency: "978".to_owned(),
                    account_ref: account_ref.clone(),
                    dvv: dvv.clone(),
                    entry_mode: "071".to_owned(),
                    retrieval_reference: None,
                    channel: Channel::Http,
                };
                let record = vouch_server::dvv::decide(&state, &terminal, &merchant, request)
                    .await
                    .map_err(|e| anyhow::anyhow!("in-process decision failed: {e}"))?;
                if record.response_code != "00" {
                    bail!("in-process decision declined: {} {}", record.response_code, record.reason);
                }
                ops += 1;
            }
            anyhow::Ok(ops)
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += worker.await??;
    }
    Ok(total as f64 / CRYPTO_SAMPLE.as_secs_f64())
}

#[derive(Deserialize)]
struct AuthorizeAnswer {
    response_code: String,
    reason: String,
    authorization_code: Option<String>,
    stan: String,
}

struct AuthorizeClient {
    http: reqwest::Client,
    url: String,
    lane: Lane,
}

impl BenchClient for AuthorizeClient {
    fn device_id(&self) -> &str {
        &self.lane.terminal_id
    }

    fn request(&mut self, op: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let stan = format!("{:06}", op % 1_000_000);
            let body = json!({
                "merchant_id": self.lane.merchant_id, "terminal_id": self.lane.terminal_id, "stan": stan,
                "transmission_time": TransmissionTime::from_unix_secs(SystemClock.now_unix()).to_string(),
                "amount": AMOUNT_MINOR, "currency": "978", "account_ref": self.lane.account_ref,
                "dvv": self.lane.dvv, "entry_mode": "071",
            });
            let response = self.http.post(&self.url).bearer_auth(&self.lane.terminal_key).json(&body).send().await?;
            let status = response.status();
            let bytes = response.bytes().await?;
            if status != reqwest::StatusCode::OK {
                let text: String = String::from_utf8_lossy(&bytes).chars().take(ERROR_BODY_CHARS_MAX).collect();
                bail!("POST /v1/authorizations answered {status}: {text}");
            }
            let answer: AuthorizeAnswer = serde_json::from_slice(&bytes)?;
            if answer.response_code != "00" || answer.authorization_code.is_none() || answer.stan != stan {
                bail!("not approved: {} {} (stan {})", answer.response_code, answer.reason, answer.stan);
            }
            Ok(())
        })
    }
}
