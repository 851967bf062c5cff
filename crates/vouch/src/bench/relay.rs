//! `relay`: phones' messages through the trusted service manager. Each client is an SMS
//! gateway lane for one provisioned phone, posting that phone's messages (sealed by
//! its crypto SE under the device key before the clock starts) to `POST
//! /v1/tsm/messages`; the server opens each, queues it sealed (HPKE) to the provider's
//! key and delivers it to a provider receiver on a local port, which opens it. `ops`
//! are messages accepted; the run then waits until the provider has received every one,
//! and `delivered_ops_per_sec` is what reached the provider over the whole time.
//!
//! The crypto bound is the server's per-message work: the device message's AES-256-GCM
//! open and one HPKE seal (an ephemeral P-256 key, one ECDH, the key schedule and
//! AES-128-GCM) on all cores; the payment certificate's signature is verified once per
//! certificate, not per message.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vouch_device::tsm::{CryptoSe, ProvisionAnswer, SeKind};
use vouch_device::{TokenSession, sim};
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::hpke::HpkePrivateKey;
use vouch_proto::tsm::{DeviceKey, MessageBody, open_message, seal_message, seal_relay};
use vouch_proto::{SystemClock, b64};

use super::{
    BenchArgs, BenchClient, BenchReport, CRYPTO_SAMPLE, OpFuture, bench_http, bench_server, bound_devices, cores,
    gather_all, measure, report,
};

const MESSAGES_PATH: &str = "/v1/tsm/messages";
/// A simulated fingerprint template; every crypto SE of the run enrols the same one.
const TEMPLATE: &[u8] = b"bench fingerprint template";
const PAYLOAD_BYTES: usize = 160;
/// Messages sealed per message the crypto bound allows in the run.
const MESSAGES_PER_BOUND: f64 = 1.5;
/// How long the run waits, after the clock stops, for the provider to receive what was accepted.
const DELIVERY_WAIT: Duration = Duration::from_secs(120);

pub(super) async fn relay(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let (admin, _local) = bench_server(args).await?;
    let rng = SystemRandom::new();
    let provider = sim::tsm_provider(&admin, "Bench bank", &rng).await?;
    let (maker, _) = sim::tsm_maker(&admin, "Bench maker", Arc::new(SystemClock), &rng).await?;
    let gateway_key = admin.create_api_key(&["gateway"], "bench gateway").await?.api_key;
    let (_, phones) = bound_devices(&admin, args.clients, DeviceKind::Consumer).await?;
    let jwks = admin.jwks().await?;
    let bound = crypto_bound(CRYPTO_SAMPLE).await?;
    let duration = Duration::from_secs(args.seconds);
    let per_lane = ((bound * duration.as_secs_f64() * MESSAGES_PER_BOUND) / args.clients as f64).ceil() as usize;

    let mut lanes = Vec::with_capacity(phones.len());
    for (i, phone) in phones.into_iter().enumerate() {
        let certificate = maker.issue_se(&format!("bench-{i}"), SeKind::Crypto)?;
        let mut se = CryptoSe::new(&phone.device_id, certificate, TEMPLATE);
        let answer = provision(&phone.session, &se).await?;
        se.accept_provisioning(&answer, &jwks).context("setup: the crypto SE refused its provisioning")?;
        let payment_certificate = se.release_payment_certificate(TEMPLATE)?;
        let mut bodies = Vec::with_capacity(per_lane);
        for m in 0..per_lane {
            let body = MessageBody {
                payment_certificate: payment_certificate.clone(),
                provider_id: provider.provider_id().to_owned(),
                payload: payload(i, m),
            };
            let envelope = se.seal_message(&body)?;
            bodies.push(serde_json::to_vec(&serde_json::json!({
                "device_id": phone.device_id, "message": b64::encode(&envelope),
            }))?);
        }
        lanes.push(Gateway {
            http: bench_http()?,
            url: format!("{}{MESSAGES_PATH}", admin.base_url()),
            api_key: gateway_key.clone(),
            device_id: phone.device_id,
            bodies,
        });
    }

    let started = Instant::now();
    let deadline = started + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let runs = lanes.into_iter().map(|lane| tokio::spawn(measure(lane, deadline, stop.clone()))).collect();
    let (accepted, histogram) = gather_all(runs).await?;
    let receiver = &provider.receiver;
    receiver
        .wait_for(accepted, DELIVERY_WAIT)
        .await
        .with_context(|| format!("the provider did not receive all {accepted} accepted messages"))?;
    let delivered_in = started.elapsed();
    let stats = receiver.stats();
    if stats.received != accepted || stats.refused != 0 {
        bail!("the provider received {} messages and refused {} of {accepted} accepted", stats.received, stats.refused);
    }
    let mut report = report("relay", args.clients, duration, accepted, &histogram, bound);
    let delivered_per_sec = accepted as f64 / delivered_in.as_secs_f64();
    report.delivered_ops_per_sec = Some(delivered_per_sec);
    report.ratio = Some(if bound > 0.0 { delivered_per_sec / bound } else { 0.0 });
    Ok(report)
}

async fn provision(session: &TokenSession, se: &CryptoSe) -> anyhow::Result<ProvisionAnswer> {
    let chain = &se.certificate().chain_pem;
    session.provision_crypto_se(chain, "tok_bench").await.context("setup: provisioning a crypto SE")
}

/// A payload distinct per lane and message, as a real one would be.
fn payload(lane: usize, message: usize) -> Vec<u8> {
    let mut payload = format!("lane {lane} message {message} ").into_bytes();
    payload.resize(PAYLOAD_BYTES, b'.');
    payload
}

/// The rate of the server's per-message crypto (device message open, HPKE seal to the
/// provider) on all cores.
async fn crypto_bound(duration: Duration) -> anyhow::Result<f64> {
    let threads = cores();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let rng = SystemRandom::new();
                let device_key = DeviceKey::generate(&rng)?;
                let provider = HpkePrivateKey::generate(&rng)?.public_key();
                let body = MessageBody {
                    payment_certificate: "x".repeat(600),
                    provider_id: "sp_bench".into(),
                    payload: payload(0, 0),
                };
                let envelope = seal_message(&device_key, "dev_bench", 1, &body)?;
                let deadline = Instant::now() + duration;
                let mut ops = 0;
                while Instant::now() < deadline {
                    let (counter, opened) = open_message(&device_key, "dev_bench", &envelope)?;
                    seal_relay(&provider, "msg_bench", "sp_bench", "dev_bench", counter, &opened, &rng)?;
                    ops += 1;
                }
                Ok(ops)
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker.await??;
    }
    Ok(total as f64 / duration.as_secs_f64())
}

/// One phone's messages posted by the gateway, each answered `202 Accepted`.
struct Gateway {
    http: reqwest::Client,
    url: String,
    api_key: String,
    device_id: String,
    bodies: Vec<Vec<u8>>,
}

impl BenchClient for Gateway {
    fn device_id(&self) -> &str {
        &self.device_id
    }

    fn request(&mut self, op: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let Some(body) = self.bodies.get_mut(usize::try_from(op)?).map(std::mem::take) else {
                bail!("the sealed messages ran out before the run ended");
            };
            let response = self
                .http
                .post(&self.url)
                .bearer_auth(&self.api_key)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await?;
            let status = response.status();
            if status != reqwest::StatusCode::ACCEPTED {
                let text: String = response.text().await?.chars().take(super::ERROR_BODY_CHARS_MAX).collect();
                bail!("POST {MESSAGES_PATH} answered {status}: {text}");
            }
            Ok(())
        })
    }
}
