//! `authorize` and `authorize-iso8583`: DVV authorizations from terminals, over HTTP or
//! from payment switches over ISO 8583, on the same lanes. No signatures are on this
//! path, so the bounds are its two parts, each measured alone in the same run: the
//! transport (`GET /healthz`, or 0800 echo tests, at the same concurrency) and the
//! decision with its database work (called in-process, no transport).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::json;
use vouch_device::iso8583::{self, APPROVED, AuthorizationMessage, Iso8583Client};
use vouch_device::{NewMerchant, VouchClient, Wallet};
use vouch_proto::dvv::AccountRef;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::iso8583::{Message, TransmissionTime};
use vouch_proto::{Clock, SystemClock};
use vouch_server::dvv::iso8583::CONNECTIONS_MAX;
use vouch_server::dvv::{AuthorizationRequest, Channel};

use super::{
    BenchArgs, BenchClient, BenchReport, CRYPTO_SAMPLE, ERROR_BODY_CHARS_MAX, OpFuture, PartBounds, Transport,
    bench_http, bound_devices, gather_all, measure, measured,
};

/// Uses per bench DVV and how long it lasts: enough for any run the bench allows.
const BENCH_DVV_USES: i64 = 1_000_000;
const BENCH_DVV_TTL_SECS: i64 = 2 * 3600;
const AMOUNT_MINOR: i64 = 1_250;
const CURRENCY: &str = "978";
/// The in-process decision sample uses this transmission time, so its retry keys never
/// meet those of the measured run.
const SAMPLE_TRANSMISSION_TIME: &str = "0101000000";
/// ISO 8583 data elements the switch sets per request or checks in answers.
const STAN_FIELD: u8 = 11;
const TRANSMISSION_TIME_FIELD: u8 = 7;
const AUTHORIZATION_CODE_FIELD: u8 = 38;
const RESPONSE_CODE_FIELD: u8 = 39;

/// A terminal of its own and a phone's DVV for each client.
struct Lane {
    terminal_id: String,
    merchant_id: String,
    terminal_key: String,
    /// DE 41 and DE 42, as ISO 8583 names the terminal.
    iso_terminal_id: String,
    card_acceptor_id: String,
    account_ref: String,
    dvv: String,
}

pub(super) async fn authorize(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let (local, lanes) = start(args, "authorize").await?;
    let http = bench_http()?;
    let http_bound = healthz_rate(&http, &local.url, args.clients).await?;
    let db_bound = decision_rate(&local.state, &lanes, Channel::Http).await?;
    let url = format!("{}/v1/authorizations", local.url);
    let clients =
        lanes.into_iter().map(|lane| AuthorizeClient { http: http.clone(), url: url.clone(), lane }).collect();
    run_lanes(args, "authorize", clients, Transport::Http, http_bound, db_bound).await
}

pub(super) async fn authorize_iso8583(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if args.clients > CONNECTIONS_MAX {
        bail!("authorize-iso8583 holds one connection per client; the listener serves at most {CONNECTIONS_MAX}");
    }
    let (local, lanes) = start(args, "authorize-iso8583").await?;
    let addr = local.iso8583_addr.context("the in-process server opened no ISO 8583 listener")?;
    let connections = connect_all(addr, lanes.len()).await?;
    let (echo_bound, connections) = echo_rate(connections).await?;
    let db_bound = decision_rate(&local.state, &lanes, Channel::Iso8583).await?;
    let clients = lanes
        .into_iter()
        .zip(connections)
        .map(|(lane, connection)| SwitchClient::new(lane, connection))
        .collect::<anyhow::Result<_>>()?;
    run_lanes(args, "authorize-iso8583", clients, Transport::Iso8583Echo, echo_bound, db_bound).await
}

/// The in-process server, configured for DVVs of many uses, and one lane per client.
async fn start(args: &BenchArgs, scenario: &str) -> anyhow::Result<(crate::demo::LocalServer, Vec<Lane>)> {
    if args.target.is_some() {
        bail!("{scenario} measures its database bound in-process; run it without --target");
    }
    let local = crate::demo::start_local_with(args.database.as_deref(), 10_000_000, |config| {
        config.dvv_policy.max_uses = BENCH_DVV_USES;
        config.dvv_policy.ttl_secs = BENCH_DVV_TTL_SECS;
    })
    .await?;
    let admin = VouchClient::new(&local.url)?.with_api_key(&local.admin_key);
    let lanes = lanes(&admin, args.clients).await?;
    Ok((local, lanes))
}

/// Runs `clients` for the measured time and reports their rate against the two bounds.
async fn run_lanes<C: BenchClient>(
    args: &BenchArgs,
    scenario: &'static str,
    clients: Vec<C>,
    transport: Transport,
    transport_bound: f64,
    db_bound: f64,
) -> anyhow::Result<BenchReport> {
    let duration = Duration::from_secs(args.seconds);
    let deadline = Instant::now() + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let runs = clients.into_iter().map(|client| tokio::spawn(measure(client, deadline, stop.clone()))).collect();
    let (total, histogram) = gather_all(runs).await?;
    let mut report = measured(scenario, args.clients, duration, total, &histogram);
    report.parts = Some(PartBounds::new(report.ops_per_sec, transport, transport_bound, db_bound));
    Ok(report)
}

/// DE 11 for request number `op`: six digits, wrapping past 999999.
fn stan(op: u64) -> String {
    format!("{:06}", op % 1_000_000)
}

/// One consumer with `count` attested phones, one account and one DVV each, and a
/// terminal per phone at one merchant.
async fn lanes(admin: &VouchClient, count: usize) -> anyhow::Result<Vec<Lane>> {
    let (_, phones) = bound_devices(admin, count, DeviceKind::Consumer).await?;
    let run = SystemClock.now_unix() % 1_000_000_000;
    let consumer = admin.create_consumer("Bench consumer").await?;
    let shop = NewMerchant {
        name: "Bench grocer".into(),
        card_acceptor_id: Some(format!("BENCH{run:010}")),
        merchant_category: Some("5411".into()),
    };
    let merchant = admin.create_merchant_with(&shop).await?;
    let mut lanes = Vec::with_capacity(count);
    for (i, phone) in phones.into_iter().enumerate() {
        admin.add_consumer_device(&consumer.consumer_id, &phone.device_id).await?;
        let account_ref = AccountRef::with_check_digit(&format!("4{run:09}{i:05}"))?;
        admin.add_payment_account(&consumer.consumer_id, &account_ref).await?;
        let terminal = admin.create_terminal(&merchant.merchant_id, &format!("BT{i:06}")).await?;
        let issued =
            Wallet::new(phone.session).request_dvv(&account_ref, None).await.context("setup: issuing a DVV")?;
        lanes.push(Lane {
            terminal_id: terminal.terminal_id,
            merchant_id: merchant.merchant_id.clone(),
            terminal_key: terminal.api_key,
            iso_terminal_id: terminal.iso_terminal_id,
            card_acceptor_id: terminal.card_acceptor_id,
            account_ref: account_ref.expose().to_owned(),
            dvv: issued.dvv.expose().to_owned(),
        });
    }
    Ok(lanes)
}

/// What `workers` did per second over the sample ([`CRYPTO_SAMPLE`], which each runs
/// for), and what each hands back.
async fn sampled_rate<T>(
    workers: Vec<tokio::task::JoinHandle<anyhow::Result<(u64, T)>>>,
) -> anyhow::Result<(f64, Vec<T>)> {
    let mut total = 0;
    let mut returned = Vec::with_capacity(workers.len());
    for worker in workers {
        let (ops, value) = worker.await??;
        total += ops;
        returned.push(value);
    }
    Ok((total as f64 / CRYPTO_SAMPLE.as_secs_f64(), returned))
}

/// Requests per second of `GET /healthz` from `clients` concurrent clients: what HTTP
/// and the client cost alone.
async fn healthz_rate(http: &reqwest::Client, url: &str, clients: usize) -> anyhow::Result<f64> {
    let deadline = Instant::now() + CRYPTO_SAMPLE;
    let workers = (0..clients)
        .map(|_| {
            let (http, url) = (http.clone(), format!("{url}/healthz"));
            tokio::spawn(async move {
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    http.get(&url).send().await?.error_for_status()?.bytes().await?;
                    ops += 1;
                }
                anyhow::Ok((ops, ()))
            })
        })
        .collect();
    Ok(sampled_rate(workers).await?.0)
}

/// `count` connections to the ISO 8583 listener at `addr`.
async fn connect_all(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<Iso8583Client>> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        connections.push(Iso8583Client::connect(addr, None).await.context("connecting to the ISO 8583 listener")?);
    }
    Ok(connections)
}

/// Echo tests (0800) per second, each connection sending one at a time: what ISO 8583
/// framing, the listener and the client cost alone. The connections come back for the
/// measured run, so the listener never holds more than one per client.
async fn echo_rate(connections: Vec<Iso8583Client>) -> anyhow::Result<(f64, Vec<Iso8583Client>)> {
    let deadline = Instant::now() + CRYPTO_SAMPLE;
    let workers = connections
        .into_iter()
        .map(|mut connection| {
            tokio::spawn(async move {
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    let stan = u32::try_from(ops % 1_000_000)?;
                    let answer = connection.send(&iso8583::echo(stan)?).await?;
                    if answer.get(RESPONSE_CODE_FIELD) != Some(APPROVED) {
                        bail!("echo test answered {:?}", answer.get(RESPONSE_CODE_FIELD));
                    }
                    ops += 1;
                }
                anyhow::Ok((ops, connection))
            })
        })
        .collect();
    sampled_rate(workers).await
}

/// Decisions per second with the server's own code and database, no transport: one
/// task per lane, each approving with its lane's DVV, recorded as from `channel`.
async fn decision_rate(state: &vouch_server::AppState, lanes: &[Lane], channel: Channel) -> anyhow::Result<f64> {
    let deadline = Instant::now() + CRYPTO_SAMPLE;
    let mut workers = Vec::with_capacity(lanes.len());
    for lane in lanes {
        let (terminal, merchant) = state.store.terminal(&lane.terminal_id).await?;
        let (state, account_ref, dvv) = (state.clone(), lane.account_ref.clone(), lane.dvv.clone());
        workers.push(tokio::spawn(async move {
            let mut ops = 0u64;
            while Instant::now() < deadline {
                let request = AuthorizationRequest {
                    stan: stan(ops),
                    transmission_time: SAMPLE_TRANSMISSION_TIME.to_owned(),
                    amount_minor: AMOUNT_MINOR,
                    currency: CURRENCY.to_owned(),
                    account_ref: account_ref.clone(),
                    dvv: dvv.clone(),
                    entry_mode: "071".to_owned(),
                    retrieval_reference: None,
                    channel,
                };
                let record = vouch_server::dvv::decide(&state, &terminal, &merchant, request)
                    .await
                    .map_err(|e| anyhow::anyhow!("in-process decision failed: {e}"))?;
                if record.response_code != "00" {
                    bail!("in-process decision declined: {} {}", record.response_code, record.reason);
                }
                ops += 1;
            }
            anyhow::Ok((ops, ()))
        }));
    }
    Ok(sampled_rate(workers).await?.0)
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
            let stan = stan(op);
            let body = json!({
                "merchant_id": self.lane.merchant_id, "terminal_id": self.lane.terminal_id, "stan": stan,
                "transmission_time": TransmissionTime::from_unix_secs(SystemClock.now_unix()).to_string(),
                "amount": AMOUNT_MINOR, "currency": CURRENCY, "account_ref": self.lane.account_ref,
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

/// `authorize-iso8583`: a payment switch's 0100s for one lane on its own connection.
struct SwitchClient {
    connection: Iso8583Client,
    /// The lane's 0100; DE 7 and DE 11 change per request.
    request: Message,
    lane: Lane,
}

impl SwitchClient {
    fn new(lane: Lane, connection: Iso8583Client) -> anyhow::Result<SwitchClient> {
        let request = AuthorizationMessage {
            account_ref: lane.account_ref.clone(),
            amount_minor: u64::try_from(AMOUNT_MINOR)?,
            currency_numeric: CURRENCY.to_owned(),
            iso_terminal_id: lane.iso_terminal_id.clone(),
            card_acceptor_id: lane.card_acceptor_id.clone(),
            dvv: lane.dvv.clone(),
            ..AuthorizationMessage::default()
        }
        .to_message()?;
        Ok(SwitchClient { connection, request, lane })
    }
}

impl BenchClient for SwitchClient {
    fn device_id(&self) -> &str {
        &self.lane.terminal_id
    }

    fn request(&mut self, op: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let stan = stan(op);
            let now = TransmissionTime::from_unix_secs(SystemClock.now_unix()).to_string();
            self.request.set(TRANSMISSION_TIME_FIELD, now)?.set(STAN_FIELD, stan.as_str())?;
            let answer = self.connection.send(&self.request).await?;
            let code = answer.get(RESPONSE_CODE_FIELD).unwrap_or_default();
            if code != APPROVED
                || answer.get(AUTHORIZATION_CODE_FIELD).is_none()
                || answer.get(STAN_FIELD) != Some(&stan)
            {
                bail!("0110 not approved: DE 39 {code:?} (DE 11 {:?})", answer.get(STAN_FIELD));
            }
            Ok(())
        })
    }
}
