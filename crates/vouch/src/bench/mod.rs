//! `vouch bench`: drives a flow with many concurrent clients and compares the
//! throughput with the machine's raw rate for the same flow's server-side signature
//! work, measured in the same run (absolute rates on a shared machine are noisy;
//! the ratio is what to compare).

mod authorize;
mod ledger;
mod relay;
mod settle;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use vouch_device::attest::{SimulatedDeviceState, TamperMonitor};
use vouch_device::session::{CardReader, READER_SESSIONS_PATH};
use vouch_device::sim::{self, DeviceProfile};
use vouch_device::token::{SIGN_PATH, TOKEN_PATH};
use vouch_device::{DeviceIdentity, TokenSession, VouchClient};
use vouch_proto::attest::EarStatus;
use vouch_proto::crypto::{SystemRandom, sha256};
use vouch_proto::dpop::{ProofClaims, sign_proof};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::jws::UnverifiedJws;
use vouch_proto::session::{GRANT_TYP, GrantClaims, NoiseKeypair};
use vouch_proto::token::{
    ACCESS_TOKEN_TYP, AccessTokenClaims, GRANT_JWT_BEARER, SIGNED_DIGEST_TYP, SignedDigestClaims, TOKEN_TYPE_DPOP,
};
use vouch_proto::{Clock, SigningKey, SystemClock, b64};

const CLIENTS_MAX: usize = 1_024;
const SECONDS_MAX: u64 = 3_600;
/// How long the raw crypto rate is sampled before a server scenario.
const CRYPTO_SAMPLE: Duration = Duration::from_secs(2);
const LATENCY_MAX_US: u64 = 60_000_000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Tokens and tickets must outlast the run by this much, or the bench refuses to start
/// rather than count expiry refusals.
const EXPIRY_MARGIN_SECS: i64 = 30;
/// Bodies longer than this are cut in error messages.
const ERROR_BODY_CHARS_MAX: usize = 512;
const DPOP_HEADER: &str = "DPoP";
const DPOP_NONCE_HEADER: &str = "DPoP-Nonce";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Raw ES256: one sign and one verify per operation, on every core.
    Crypto,
    /// Device enrolment: nonce, then a signed proof (server: 1 verify + 1 sign + 2 commits).
    Enroll,
    /// Attestation round trip: signed challenge request, signed evidence, ticket
    /// (server: 2 verifies + 1 sign + 2 writes; the crypto bound counts 1 verify + 1 sign).
    Attest,
    /// DPoP-protected request: `POST /v1/sign` with a fresh proof (server: 1 verify + 1 sign,
    /// 1 read + 1 write; the access token's verification is cached).
    Dpop,
    /// Token issue: jwt-bearer grant with the device's ticket and a fresh proof
    /// (server: 2 verifies + 1 sign, 1 read + 1 write; the crypto bound counts all three).
    Token,
    /// Reader session grant: `POST /v1/reader-sessions` from a POS app with a fresh reader
    /// hello and proof (server: 3 verifies — proof, POS ticket, hello — + 1 sign, 3 reads
    /// + 1 write; the crypto bound counts 2 verifies + 1 sign, as the target defines it).
    Session,
    /// DVV authorization over HTTP: `POST /v1/authorizations` from a terminal (server: no
    /// signatures; 4 reads + 1 write of 3 statements). Its bounds are HTTP (`GET
    /// /healthz` at the same concurrency) and the database (the decision called
    /// in-process, without HTTP), both measured in the same run. JSON keys:
    /// `http_bound_ops_per_sec`, `db_bound_ops_per_sec`, `http_share`, `db_share`.
    Authorize,
    /// DVV authorization over ISO 8583: the `authorize` lanes, each client a payment
    /// switch holding one connection to the listener and sending 0100s (DE 7 now, a STAN
    /// of its own per request), each answered 0110 `00` with DE 38 (server: the same
    /// decision). Its bounds are the transport (0800 echo tests over as many
    /// connections) and the database, as for `authorize`. JSON keys:
    /// `transport_bound_ops_per_sec`, `db_bound_ops_per_sec`, `transport_share`,
    /// `db_share`.
    #[value(name = "authorize-iso8583")]
    AuthorizeIso8583,
    /// Offline payments settled by terminals, `POST /v1/offline-payments` in batches of
    /// 100 signed before the clock starts (server per payment: 4 verifies — terminal
    /// certificate, request, approval, countersignature — + 1 sign for the receipt; the
    /// crypto bound counts all five). `ops` are payments, latencies are per batch.
    Settle,
    /// Phones' messages relayed by the trusted service manager: `POST /v1/tsm/messages`
    /// from SMS gateway lanes, one provisioned phone each, every message sealed under its
    /// device key before the clock starts; the server opens it and delivers it sealed
    /// (HPKE) to a provider on a local port (server per message: one AES-256-GCM open +
    /// one HPKE seal, which the crypto bound counts). `ops` are messages accepted; the
    /// ratio is of `delivered_ops_per_sec`, accepted messages over the time until the
    /// provider held them all.
    Relay,
    /// Ledger transfers alone, posted in-process through the store's batch posting, for
    /// batch sizes 1, 10, 100 and 1,000, each for `--seconds`. Prints a line per batch
    /// size (JSON: one object, `runs` holding a row per batch size).
    Ledger,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    scenario: Scenario,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Measurement time.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Database for the in-process server (default: a temporary SQLite file).
    #[arg(long)]
    database: Option<String>,
    /// Drive this running server instead of an in-process one.
    #[arg(long)]
    target: Option<String>,
    /// Admin API key for --target.
    #[arg(long, env = "VOUCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    scenario: &'static str,
    clients: usize,
    seconds: f64,
    ops: u64,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// The machine's rate for the flow's signature work; absent where it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    crypto_bound_ops_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    /// For flows that deliver what they accept later (`relay`): accepted operations over
    /// the time from the start until the last was delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered_ops_per_sec: Option<f64>,
    /// Payments per request, for flows that send them in batches; latencies are per batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_payments: Option<usize>,
    /// For flows without signatures: the rates of their two parts alone and the share
    /// of each operation's time each accounts for (`ops_per_sec / part rate`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    parts: Option<PartBounds>,
}

/// The two parts of a flow without signatures: carrying a request and its answer
/// (`transport`) and the decision with its database work.
#[derive(Debug)]
struct PartBounds {
    transport: Transport,
    transport_bound_ops_per_sec: f64,
    db_bound_ops_per_sec: f64,
    transport_share: f64,
    db_share: f64,
}

impl PartBounds {
    fn new(ops_per_sec: f64, transport: Transport, transport_bound: f64, db_bound: f64) -> PartBounds {
        let share = |bound: f64| if bound > 0.0 { ops_per_sec / bound } else { 0.0 };
        PartBounds {
            transport,
            transport_bound_ops_per_sec: transport_bound,
            db_bound_ops_per_sec: db_bound,
            transport_share: share(transport_bound),
            db_share: share(db_bound),
        }
    }
}

/// What a transport bound measured, which names its keys in the report.
#[derive(Debug, Clone, Copy)]
enum Transport {
    /// `GET /healthz`: `http_bound_ops_per_sec`, `http_share` (`authorize`).
    Http,
    /// ISO 8583 0800 echo tests: `transport_bound_ops_per_sec`, `transport_share`.
    Iso8583Echo,
}

impl Transport {
    /// The prefix of its keys in the text line.
    fn label(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Iso8583Echo => "transport",
        }
    }

    /// Its bound's and its share's JSON keys.
    fn keys(self) -> (&'static str, &'static str) {
        match self {
            Transport::Http => ("http_bound_ops_per_sec", "http_share"),
            Transport::Iso8583Echo => ("transport_bound_ops_per_sec", "transport_share"),
        }
    }
}

impl Serialize for PartBounds {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (bound_key, share_key) = self.transport.keys();
        let mut map = serializer.serialize_map(Some(4))?;
        map.serialize_entry(bound_key, &self.transport_bound_ops_per_sec)?;
        map.serialize_entry("db_bound_ops_per_sec", &self.db_bound_ops_per_sec)?;
        map.serialize_entry(share_key, &self.transport_share)?;
        map.serialize_entry("db_share", &self.db_share)?;
        map.end()
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if !(1..=CLIENTS_MAX).contains(&args.clients) {
        bail!("--clients must be 1 to {CLIENTS_MAX}");
    }
    if !(1..=SECONDS_MAX).contains(&args.seconds) {
        bail!("--seconds must be 1 to {SECONDS_MAX}");
    }
    let report = match args.scenario {
        Scenario::Crypto => crypto(&args).await?,
        Scenario::Enroll => enroll(&args).await?,
        Scenario::Attest => attest(&args).await?,
        Scenario::Dpop => dpop(&args).await?,
        Scenario::Token => token(&args).await?,
        Scenario::Session => session(&args).await?,
        Scenario::Authorize => authorize::authorize(&args).await?,
        Scenario::AuthorizeIso8583 => authorize::authorize_iso8583(&args).await?,
        Scenario::Settle => settle::settle(&args).await?,
        Scenario::Relay => relay::relay(&args).await?,
        Scenario::Ledger => {
            ledger::ledger(&args).await?.print(args.json)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let bounds = match (&report.crypto_bound_ops_per_sec, &report.ratio, &report.parts) {
            (Some(bound), Some(ratio), _) => format!("crypto_bound={bound:.0}/s ratio={ratio:.3}"),
            (_, _, Some(parts)) => format!(
                "{transport}_bound={:.0}/s db_bound={:.0}/s {transport}_share={:.2} db_share={:.2}",
                parts.transport_bound_ops_per_sec,
                parts.db_bound_ops_per_sec,
                parts.transport_share,
                parts.db_share,
                transport = parts.transport.label(),
            ),
            _ => String::new(),
        };
        let batch = report.batch_payments.map(|n| format!(" batch={n}")).unwrap_or_default();
        let delivered = report.delivered_ops_per_sec.map(|r| format!(" delivered/s={r:.0}")).unwrap_or_default();
        println!(
            "{} clients={}{batch} seconds={:.1} ops={} ops/s={:.0}{delivered} p50={:.2}ms p99={:.2}ms p999={:.2}ms {bounds}",
            report.scenario,
            report.clients,
            report.seconds,
            report.ops,
            report.ops_per_sec,
            report.p50_ms,
            report.p99_ms,
            report.p999_ms,
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One sign and `verifies` verifies per operation on `threads` threads for `duration`;
/// returns the operation count and a latency histogram in microseconds.
fn signature_loop(threads: usize, verifies: usize, duration: Duration) -> anyhow::Result<(u64, Histogram<u64>)> {
    let rng = SystemRandom::new();
    let key = Arc::new(SigningKey::generate(&rng)?);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let key = key.clone();
            let stop = stop.clone();
            std::thread::spawn(move || -> anyhow::Result<(u64, Histogram<u64>)> {
                let rng = SystemRandom::new();
                let public = key.verifying_key();
                let mut histogram = Histogram::new_with_max(LATENCY_MAX_US, 3)?;
                let mut ops = 0u64;
                let message = [7u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let signature = key.sign(&rng, &message)?;
                    for _ in 0..verifies {
                        public.verify(&message, &signature)?;
                    }
                    histogram.saturating_record(started.elapsed().as_micros() as u64);
                    ops += 1;
                }
                Ok((ops, histogram))
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut histogram = Histogram::new_with_max(LATENCY_MAX_US, 3)?;
    for worker in workers {
        let (ops, h) = worker.join().map_err(|_| anyhow::anyhow!("crypto worker panicked"))??;
        total += ops;
        histogram.add(h)?;
    }
    Ok((total, histogram))
}

/// The machine's rate for one sign plus `verifies` verifies, all cores together.
async fn crypto_bound(verifies: usize, duration: Duration) -> anyhow::Result<f64> {
    let (ops, _) = tokio::task::spawn_blocking(move || signature_loop(cores(), verifies, duration)).await??;
    Ok(ops as f64 / duration.as_secs_f64())
}

async fn crypto(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let duration = Duration::from_secs(args.seconds);
    let threads = args.clients.min(cores());
    let (ops, histogram) = tokio::task::spawn_blocking(move || signature_loop(threads, 1, duration)).await??;
    let bound = crypto_bound(1, CRYPTO_SAMPLE).await?;
    Ok(report("crypto", threads, duration, ops, &histogram, bound))
}

/// The server to drive: a running one (`--target`) or one started in-process, which
/// lives as long as the returned handle.
async fn bench_server(args: &BenchArgs) -> anyhow::Result<(VouchClient, Option<crate::demo::LocalServer>)> {
    let (url, api_key, local) = match &args.target {
        Some(url) => (url.clone(), args.api_key.clone().context("--target needs --api-key (admin scope)")?, None),
        None => {
            let local = crate::demo::start_local(args.database.as_deref(), 10_000_000).await?;
            (local.url.clone(), local.admin_key.clone(), Some(local))
        }
    };
    Ok((VouchClient::new(&url)?.with_api_key(&api_key), local))
}

async fn enroll(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let (admin, _local) = bench_server(args).await?;
    let merchant = admin.create_merchant("Bench merchant").await?;
    let bound = crypto_bound(1, CRYPTO_SAMPLE).await?;

    let duration = Duration::from_secs(args.seconds);
    let deadline = Instant::now() + duration;
    let failures = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            let client = admin.clone();
            let merchant_id = merchant.merchant_id.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                let rng = SystemRandom::new();
                let profile = DeviceProfile::simulated(DeviceKind::Terminal, &merchant_id);
                let mut histogram = Histogram::<u64>::new_with_max(LATENCY_MAX_US, 3)?;
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    let identity = DeviceIdentity::generate(&rng)?;
                    let started = Instant::now();
                    let proof = sim::enrolment_proof(&client, &identity, &profile, &SystemClock, &rng).await;
                    let outcome = match proof {
                        Ok(proof) => client.enrol(&proof).await.map(drop),
                        Err(e) => Err(e),
                    };
                    match outcome {
                        Ok(()) => {
                            histogram.saturating_record(started.elapsed().as_micros() as u64);
                            ops += 1;
                        }
                        Err(e) => {
                            if failures.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("enrolment failed: {e}");
                            }
                        }
                    }
                }
                anyhow::Ok((ops, histogram))
            })
        })
        .collect();
    let (total, histogram) = gather(clients, &failures, "enrolments").await?;
    Ok(report("enroll", args.clients, duration, total, &histogram, bound))
}

async fn attest(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let (admin, _local) = bench_server(args).await?;
    let merchant = admin.create_merchant("Bench merchant").await?;
    let clean = SimulatedDeviceState::clean(DeviceKind::Terminal, &merchant.merchant_id);
    admin.put_reference_values(&clean.reference_values()).await?;
    let rng = SystemRandom::new();
    let mut devices = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let identity = DeviceIdentity::generate(&rng)?;
        let enrolled = sim::enrol(&admin, &identity, &clean.profile(), &SystemClock, &rng).await?;
        devices.push((identity, enrolled.device_id, TamperMonitor::new(clean.clone())));
    }
    let bound = crypto_bound(1, CRYPTO_SAMPLE).await?;

    let duration = Duration::from_secs(args.seconds);
    let deadline = Instant::now() + duration;
    let failures = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = devices
        .into_iter()
        .map(|(identity, device_id, mut monitor)| {
            let client = admin.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                let rng = SystemRandom::new();
                let mut histogram = Histogram::<u64>::new_with_max(LATENCY_MAX_US, 3)?;
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let outcome = async {
                        let request = monitor.challenge_request(&device_id, identity.key(), &SystemClock, &rng)?;
                        let challenge = client.request_attestation(&request).await?;
                        let evidence = monitor.evidence(&challenge, &device_id, identity.key(), &SystemClock, &rng)?;
                        let verdict = client.submit_evidence(&challenge.attestation_id, &evidence.jws).await?;
                        monitor.record_accepted(&evidence);
                        anyhow::Ok(verdict.status)
                    }
                    .await;
                    match outcome {
                        Ok(EarStatus::Affirming) => {
                            histogram.saturating_record(started.elapsed().as_micros() as u64);
                            ops += 1;
                        }
                        other => {
                            if failures.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("attestation did not affirm: {other:?}");
                            }
                        }
                    }
                }
                anyhow::Ok((ops, histogram))
            })
        })
        .collect();
    let (total, histogram) = gather(clients, &failures, "attestations").await?;
    Ok(report("attest", args.clients, duration, total, &histogram, bound))
}

/// A device ready for the token scenarios, set up before anything is measured:
/// enrolled, attested, and holding a session opened through the SDK.
struct BoundDevice {
    identity: Arc<DeviceIdentity>,
    device_id: String,
    ticket: String,
    ticket_expires_at: i64,
    session: TokenSession,
}

/// `count` clean devices of `kind` of one new merchant, each enrolled, attested and
/// with a session open; and the merchant's id.
async fn bound_devices(
    admin: &VouchClient,
    count: usize,
    kind: DeviceKind,
) -> anyhow::Result<(String, Vec<BoundDevice>)> {
    let merchant = admin.create_merchant("Bench merchant").await?;
    let clean = SimulatedDeviceState::clean(kind, &merchant.merchant_id);
    admin.put_reference_values(&clean.reference_values()).await?;
    // Devices call the attestation and token endpoints without an API key.
    let device_client = VouchClient::new(admin.base_url())?;
    let rng = SystemRandom::new();
    let mut devices = Vec::with_capacity(count);
    for _ in 0..count {
        let identity = Arc::new(DeviceIdentity::generate(&rng)?);
        let enrolled = sim::enrol(admin, &identity, &clean.profile(), &SystemClock, &rng).await?;
        let mut monitor = TamperMonitor::new(clean.clone());
        let attestation =
            sim::attest(&device_client, &identity, &enrolled.device_id, &mut monitor, &SystemClock, &rng).await?;
        if attestation.outcome.status != EarStatus::Affirming {
            bail!("setup: device {} was not affirmed: {:?}", enrolled.device_id, attestation.outcome.status);
        }
        let ticket = attestation.outcome.ticket;
        let session =
            TokenSession::open(&device_client, Arc::clone(&identity), &ticket, Arc::new(SystemClock), &rng).await?;
        devices.push(BoundDevice {
            identity,
            device_id: enrolled.device_id,
            ticket,
            ticket_expires_at: attestation.claims.exp,
            session,
        });
    }
    Ok((merchant.merchant_id, devices))
}

/// Refuses a run that would end after `expires_at` (Unix seconds): an expiry refusal
/// mid-run would be a failure of the bench, not of the server.
fn check_outlasts(what: &str, expires_at: i64, duration: Duration) -> anyhow::Result<()> {
    let now = SystemClock.now_unix();
    let needed = i64::try_from(duration.as_secs())?.saturating_add(EXPIRY_MARGIN_SECS);
    if expires_at.saturating_sub(now) < needed {
        bail!(
            "the {what} expire {}s from now, and the run needs {needed}s; lower --seconds",
            expires_at.saturating_sub(now)
        );
    }
    Ok(())
}

fn bench_http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build()?)
}

enum Payload<'a> {
    Json(&'a serde_json::Value),
    Form(&'a [(&'a str, &'a str)]),
}

/// One device's DPoP requests with no more client work than the protocol needs: a
/// fresh proof per request (new `jti`, `ath` when a token is presented, and the latest
/// `DPoP-Nonce`, read from every answer so no request is refused for want of one).
/// Anything but the expected status with a body that parses is an error.
struct ProofSender {
    http: reqwest::Client,
    base_url: String,
    identity: Arc<DeviceIdentity>,
    nonce: Option<String>,
    rng: SystemRandom,
}

impl ProofSender {
    fn new(http: reqwest::Client, base_url: &str, device: &BoundDevice) -> Self {
        ProofSender {
            http,
            base_url: base_url.to_owned(),
            identity: Arc::clone(&device.identity),
            nonce: device.session.nonce(),
            rng: SystemRandom::new(),
        }
    }

    async fn post<T: DeserializeOwned>(
        &mut self,
        path: &str,
        access_token: Option<&str>,
        payload: Payload<'_>,
        expected: reqwest::StatusCode,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base_url);
        let now = SystemClock.now_unix();
        let claims = ProofClaims::for_request("POST", &url, now, access_token, self.nonce.as_deref(), &self.rng)?;
        let proof = sign_proof(&claims, self.identity.key(), &self.rng)?;
        let mut request = self.http.post(&url).header(DPOP_HEADER, proof);
        if let Some(token) = access_token {
            request = request.header(reqwest::header::AUTHORIZATION, format!("DPoP {token}"));
        }
        request = match payload {
            Payload::Json(json) => request.json(json),
            Payload::Form(form) => request.form(form),
        };
        let response = request.send().await?;
        let status = response.status();
        if let Some(nonce) = response.headers().get(DPOP_NONCE_HEADER).and_then(|v| v.to_str().ok()) {
            self.nonce = Some(nonce.to_owned());
        }
        let body = response.bytes().await?;
        if status != expected {
            let text: String = String::from_utf8_lossy(&body).chars().take(ERROR_BODY_CHARS_MAX).collect();
            bail!("POST {path} answered {status}: {text}");
        }
        serde_json::from_slice(&body).with_context(|| format!("POST {path}: unexpected answer"))
    }
}

#[derive(Deserialize)]
struct SignAnswer {
    signature: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    token_type: String,
    sid: String,
}

/// The claims of a server JWS of type `typ`, read without checking the signature: the
/// bench checks what came back, but a verify per answer would add client work that a
/// device holding the JWK Set does only when it needs to.
fn unverified_claims<C: DeserializeOwned>(jws: &str, typ: &'static str) -> anyhow::Result<C> {
    let jws = UnverifiedJws::parse(jws)?;
    jws.header().expect_typ(typ)?;
    Ok(serde_json::from_slice(jws.payload_unverified())?)
}

fn check_signed_digest(answer: &SignAnswer, digest: &str, token: &AccessTokenClaims) -> anyhow::Result<()> {
    let claims: SignedDigestClaims = unverified_claims(&answer.signature, SIGNED_DIGEST_TYP)?;
    if claims.digest != digest || claims.sub != token.sub || claims.sid != token.sid || claims.cnf.jkt != token.cnf.jkt
    {
        bail!("the signed digest names another digest, device or session: {claims:?}");
    }
    Ok(())
}

fn check_issued_token(answer: &TokenAnswer, device_id: &str, jkt: &str) -> anyhow::Result<()> {
    if !answer.token_type.eq_ignore_ascii_case(TOKEN_TYPE_DPOP) {
        bail!("token_type is {:?}, expected {TOKEN_TYPE_DPOP}", answer.token_type);
    }
    let claims: AccessTokenClaims = unverified_claims(&answer.access_token, ACCESS_TOKEN_TYP)?;
    if claims.sub != device_id || claims.cnf.jkt != jkt || claims.sid != answer.sid {
        bail!("the access token is not for this device, key and session: {claims:?}");
    }
    Ok(())
}

/// One client of a scenario: the request it repeats, with everything that request
/// needs, checked answer included.
trait BenchClient: Send + 'static {
    fn device_id(&self) -> &str;

    /// Sends request number `op` and checks the answer.
    fn request(&mut self, op: u64) -> OpFuture<'_>;
}

type OpFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// Runs `client` until the deadline or another client's failure, timing each request;
/// a failure stops every client and fails the run.
async fn measure<C: BenchClient>(
    mut client: C,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, Histogram<u64>)> {
    let mut histogram = Histogram::<u64>::new_with_max(LATENCY_MAX_US, 3)?;
    let mut ops = 0u64;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        if let Err(e) = client.request(ops).await {
            return Err(client_failed(&stop, client.device_id(), ops, e));
        }
        histogram.saturating_record(started.elapsed().as_micros() as u64);
        ops += 1;
    }
    Ok((ops, histogram))
}

/// `dpop`: a digest signed through `POST /v1/sign`.
struct SignClient {
    sender: ProofSender,
    access_token: String,
    token: AccessTokenClaims,
    device_id: String,
}

impl BenchClient for SignClient {
    fn device_id(&self) -> &str {
        &self.device_id
    }

    fn request(&mut self, op: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let digest = b64::encode(sha256(format!("{} document {op}", self.device_id).as_bytes()));
            let body = json!({ "digest": digest });
            let answer: SignAnswer = self
                .sender
                .post(SIGN_PATH, Some(&self.access_token), Payload::Json(&body), reqwest::StatusCode::OK)
                .await?;
            check_signed_digest(&answer, &digest, &self.token)
        })
    }
}

/// `token`: a session opened with the device's ticket.
struct GrantClient {
    sender: ProofSender,
    jkt: String,
    device_id: String,
    ticket: String,
}

impl BenchClient for GrantClient {
    fn device_id(&self) -> &str {
        &self.device_id
    }

    fn request(&mut self, _op: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let form = [("grant_type", GRANT_JWT_BEARER), ("assertion", self.ticket.as_str())];
            let answer: TokenAnswer =
                self.sender.post(TOKEN_PATH, None, Payload::Form(&form), reqwest::StatusCode::OK).await?;
            check_issued_token(&answer, &self.device_id, &self.jkt)
        })
    }
}

/// `session`: a grant for a fresh hello of the client's card reader.
struct ReaderSessionClient {
    sender: ProofSender,
    access_token: String,
    device_id: String,
    ticket: String,
    reader: CardReader,
    pos_static_key: String,
    rng: SystemRandom,
}

impl BenchClient for ReaderSessionClient {
    fn device_id(&self) -> &str {
        &self.device_id
    }

    fn request(&mut self, _op: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let hello = self.reader.hello(&SystemClock, &self.rng)?;
            let body =
                json!({ "reader_hello": hello, "pos_ticket": self.ticket, "pos_static_key": self.pos_static_key });
            let answer: GrantAnswer = self
                .sender
                .post(
                    READER_SESSIONS_PATH,
                    Some(&self.access_token),
                    Payload::Json(&body),
                    reqwest::StatusCode::CREATED,
                )
                .await?;
            let claims: GrantClaims = unverified_claims(&answer.grant, GRANT_TYP)?;
            if claims.session_id != answer.session_id
                || claims.reader_id != self.reader.device_id()
                || claims.pos_device_id != self.device_id
                || claims.pos_static_key != self.pos_static_key
            {
                bail!("the grant names another session, reader or POS app: {claims:?}");
            }
            Ok(())
        })
    }
}

/// Records one client's failure and stops the others: a refused request fails the run.
fn client_failed(stop: &AtomicBool, device_id: &str, op: u64, e: anyhow::Error) -> anyhow::Error {
    stop.store(true, Ordering::Relaxed);
    e.context(format!("device {device_id}, request {}", op + 1))
}

async fn dpop(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let (admin, _local) = bench_server(args).await?;
    let (_, devices) = bound_devices(&admin, args.clients, DeviceKind::Terminal).await?;
    let http = bench_http()?;
    let bound = crypto_bound(1, CRYPTO_SAMPLE).await?;

    let duration = Duration::from_secs(args.seconds);
    for device in &devices {
        check_outlasts("access tokens", device.session.claims().exp, duration)?;
    }
    let deadline = Instant::now() + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = devices
        .into_iter()
        .map(|device| {
            let client = SignClient {
                sender: ProofSender::new(http.clone(), admin.base_url(), &device),
                access_token: device.session.access_token(),
                token: device.session.claims(),
                device_id: device.device_id,
            };
            tokio::spawn(measure(client, deadline, stop.clone()))
        })
        .collect();
    let (total, histogram) = gather_all(clients).await?;
    Ok(report("dpop", args.clients, duration, total, &histogram, bound))
}

async fn token(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let (admin, _local) = bench_server(args).await?;
    let (_, devices) = bound_devices(&admin, args.clients, DeviceKind::Terminal).await?;
    let http = bench_http()?;
    // Proof and ticket verified, access token signed: all three are counted.
    let bound = crypto_bound(2, CRYPTO_SAMPLE).await?;

    let duration = Duration::from_secs(args.seconds);
    for device in &devices {
        check_outlasts("attestation tickets", device.ticket_expires_at, duration)?;
    }
    let deadline = Instant::now() + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = devices
        .into_iter()
        .map(|device| {
            let client = GrantClient {
                sender: ProofSender::new(http.clone(), admin.base_url(), &device),
                jkt: device.identity.jwk().thumbprint(),
                device_id: device.device_id,
                ticket: device.ticket,
            };
            tokio::spawn(measure(client, deadline, stop.clone()))
        })
        .collect();
    let (total, histogram) = gather_all(clients).await?;
    Ok(report("token", args.clients, duration, total, &histogram, bound))
}

#[derive(Deserialize)]
struct GrantAnswer {
    session_id: String,
    grant: String,
}

async fn session(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let (admin, _local) = bench_server(args).await?;
    let (merchant_id, devices) = bound_devices(&admin, args.clients, DeviceKind::Pos).await?;
    let reader_state = SimulatedDeviceState::clean(DeviceKind::Reader, &merchant_id);
    admin.put_reference_values(&reader_state.reference_values()).await?;
    let rng = SystemRandom::new();
    let mut readers = Vec::with_capacity(devices.len());
    for _ in &devices {
        let identity = DeviceIdentity::generate(&rng)?;
        readers.push(CardReader::provision(&admin, identity, &reader_state.profile(), &SystemClock, &rng).await?);
    }
    let http = bench_http()?;
    // The target counts the POS ticket and the reader hello verified and the grant
    // signed; the proof's verify is left out, so the bound is 2 verifies + 1 sign.
    let bound = crypto_bound(2, CRYPTO_SAMPLE).await?;

    let duration = Duration::from_secs(args.seconds);
    for device in &devices {
        check_outlasts("access tokens", device.session.claims().exp, duration)?;
        check_outlasts("attestation tickets", device.ticket_expires_at, duration)?;
    }
    let deadline = Instant::now() + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = devices
        .into_iter()
        .zip(readers)
        .map(|(device, reader)| {
            let client = ReaderSessionClient {
                sender: ProofSender::new(http.clone(), admin.base_url(), &device),
                access_token: device.session.access_token(),
                device_id: device.device_id,
                ticket: device.ticket,
                reader,
                pos_static_key: b64::encode(NoiseKeypair::generate()?.public()),
                rng: SystemRandom::new(),
            };
            anyhow::Ok(tokio::spawn(measure(client, deadline, stop.clone())))
        })
        .collect::<anyhow::Result<_>>()?;
    let (total, histogram) = gather_all(clients).await?;
    Ok(report("session", args.clients, duration, total, &histogram, bound))
}

type ClientRun = tokio::task::JoinHandle<anyhow::Result<(u64, Histogram<u64>)>>;

/// Every client's operations and latencies; the first client error fails the run.
async fn gather_all(clients: Vec<ClientRun>) -> anyhow::Result<(u64, Histogram<u64>)> {
    let mut total = 0;
    let mut histogram = Histogram::<u64>::new_with_max(LATENCY_MAX_US, 3)?;
    for client in clients {
        let (ops, h) = client.await??;
        total += ops;
        histogram.add(h)?;
    }
    Ok((total, histogram))
}

async fn gather(clients: Vec<ClientRun>, failures: &AtomicU64, what: &str) -> anyhow::Result<(u64, Histogram<u64>)> {
    let (total, histogram) = gather_all(clients).await?;
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("{failed} {what} failed during the run");
    }
    Ok((total, histogram))
}

fn report(
    scenario: &'static str,
    clients: usize,
    duration: Duration,
    ops: u64,
    histogram: &Histogram<u64>,
    crypto_bound_ops_per_sec: f64,
) -> BenchReport {
    let mut report = measured(scenario, clients, duration, ops, histogram);
    report.crypto_bound_ops_per_sec = Some(crypto_bound_ops_per_sec);
    report.ratio =
        Some(if crypto_bound_ops_per_sec > 0.0 { report.ops_per_sec / crypto_bound_ops_per_sec } else { 0.0 });
    report
}

fn measured(
    scenario: &'static str,
    clients: usize,
    duration: Duration,
    ops: u64,
    histogram: &Histogram<u64>,
) -> BenchReport {
    let quantile_ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1_000.0;
    BenchReport {
        scenario,
        clients,
        seconds: duration.as_secs_f64(),
        ops,
        ops_per_sec: ops as f64 / duration.as_secs_f64(),
        p50_ms: quantile_ms(0.5),
        p99_ms: quantile_ms(0.99),
        p999_ms: quantile_ms(0.999),
        crypto_bound_ops_per_sec: None,
        ratio: None,
        delivered_ops_per_sec: None,
        batch_payments: None,
        parts: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_bounds_name_their_transport_in_stable_keys() {
        let keys = |transport| {
            let parts = PartBounds::new(50.0, transport, 200.0, 100.0);
            let value = serde_json::to_value(&parts).unwrap();
            let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            (keys, value)
        };
        let (http, value) = keys(Transport::Http);
        assert_eq!(http, ["db_bound_ops_per_sec", "db_share", "http_bound_ops_per_sec", "http_share"]);
        assert_eq!((value["http_share"].as_f64(), value["db_share"].as_f64()), (Some(0.25), Some(0.5)));
        let (echo, _) = keys(Transport::Iso8583Echo);
        assert_eq!(echo, ["db_bound_ops_per_sec", "db_share", "transport_bound_ops_per_sec", "transport_share"]);
    }
}
