//! `vouch bench`: drives a flow with many concurrent clients and compares the
//! throughput with the machine's raw rate for the same flow's server-side signature
//! work, measured in the same run (absolute rates on a shared machine are noisy;
//! the ratio is what to compare).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use vouch_device::attest::{SimulatedDeviceState, TamperMonitor};
use vouch_device::sim::{self, DeviceProfile};
use vouch_device::{DeviceIdentity, VouchClient};
use vouch_proto::SigningKey;
use vouch_proto::SystemClock;
use vouch_proto::attest::EarStatus;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;

const CLIENTS_MAX: usize = 1_024;
const SECONDS_MAX: u64 = 3_600;
/// How long the raw crypto rate is sampled before a server scenario.
const CRYPTO_SAMPLE: Duration = Duration::from_secs(2);
const LATENCY_MAX_US: u64 = 60_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Raw ES256: one sign and one verify per operation, on every core.
    Crypto,
    /// Device enrolment: nonce, then a signed proof (server: 1 verify + 1 sign + 2 commits).
    Enroll,
    /// Attestation round trip: signed challenge request, signed evidence, ticket
    /// (server: 2 verifies + 1 sign + 2 writes; the crypto bound counts 1 verify + 1 sign).
    Attest,
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
    crypto_bound_ops_per_sec: f64,
    ratio: f64,
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
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} clients={} seconds={:.1} ops={} ops/s={:.0} p50={:.2}ms p99={:.2}ms p999={:.2}ms crypto_bound={:.0}/s ratio={:.3}",
            report.scenario,
            report.clients,
            report.seconds,
            report.ops,
            report.ops_per_sec,
            report.p50_ms,
            report.p99_ms,
            report.p999_ms,
            report.crypto_bound_ops_per_sec,
            report.ratio
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One sign and one verify per operation on `threads` threads for `duration`;
/// returns the operation count and a latency histogram in microseconds.
fn sign_verify_loop(threads: usize, duration: Duration) -> anyhow::Result<(u64, Histogram<u64>)> {
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
                    public.verify(&message, &signature)?;
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

/// The machine's rate for one sign plus one verify, all cores together.
async fn crypto_bound(duration: Duration) -> anyhow::Result<f64> {
    let (ops, _) = tokio::task::spawn_blocking(move || sign_verify_loop(cores(), duration)).await??;
    Ok(ops as f64 / duration.as_secs_f64())
}

async fn crypto(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let duration = Duration::from_secs(args.seconds);
    let threads = args.clients.min(cores());
    let (ops, histogram) = tokio::task::spawn_blocking(move || sign_verify_loop(threads, duration)).await??;
    let bound = crypto_bound(CRYPTO_SAMPLE).await?;
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
    let bound = crypto_bound(CRYPTO_SAMPLE).await?;

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
    let bound = crypto_bound(CRYPTO_SAMPLE).await?;

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

type ClientRun = tokio::task::JoinHandle<anyhow::Result<(u64, Histogram<u64>)>>;

async fn gather(clients: Vec<ClientRun>, failures: &AtomicU64, what: &str) -> anyhow::Result<(u64, Histogram<u64>)> {
    let mut total = 0;
    let mut histogram = Histogram::<u64>::new_with_max(LATENCY_MAX_US, 3)?;
    for client in clients {
        let (ops, h) = client.await??;
        total += ops;
        histogram.add(h)?;
    }
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
    let ops_per_sec = ops as f64 / duration.as_secs_f64();
    let quantile_ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1_000.0;
    BenchReport {
        scenario,
        clients,
        seconds: duration.as_secs_f64(),
        ops,
        ops_per_sec,
        p50_ms: quantile_ms(0.5),
        p99_ms: quantile_ms(0.99),
        p999_ms: quantile_ms(0.999),
        crypto_bound_ops_per_sec,
        ratio: if crypto_bound_ops_per_sec > 0.0 { ops_per_sec / crypto_bound_ops_per_sec } else { 0.0 },
    }
}
