//! `settle`: terminals settling offline payments through `POST /v1/offline-payments` in
//! batches of [`BATCH_PAYMENTS`]. Each client is a terminal of a merchant of its own,
//! settling what four phones of one consumer paid at it; every payment is signed (legs
//! (a), (b) and (c)) and every batch's body is encoded before the clock starts, so in
//! the measured window the client only sends bodies and reads answers. The server
//! verifies four signatures per payment (the terminal certificate, the request, the
//! approval and the countersignature) and signs one receipt: the crypto bound is the
//! rate of 4 ES256 verifies + 1 sign per payment on all cores.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use vouch_device::{DeviceIdentity, OfflineWallet, VouchClient, sim};
use vouch_proto::crypto::{SystemRandom, random_bytes, sha256};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::offline::{
    ConsumerApproval, Id, MerchantCountersignature, PaymentRequest, TerminalCertificate, WireType,
    countersignature_digest, payment_id, verify_terminal_certificate,
};
use vouch_proto::{Clock, SigningKey, SystemClock, b64, hex};
use vouch_server::offline::{SettlementResults, SettlementStatus};

use super::{
    BenchArgs, BenchClient, BenchReport, CRYPTO_SAMPLE, OpFuture, bench_http, bench_server, bound_devices, cores,
    crypto_bound, gather_all, measure, report,
};

/// Payments per settlement request.
pub(super) const BATCH_PAYMENTS: usize = 100;
/// Phones paying at each terminal; a batch holds payments of each.
const PHONES_PER_LANE: usize = 4;
const AMOUNT_MINOR: u64 = 1;
const CURRENCY: &str = "EUR";
const CURRENCY_NUMERIC: u16 = 978;
/// The highest limit a credential gets under an affirming ticket of the default policy.
const CREDENTIAL_LIMIT_MAX_MINOR: u64 = 100_000;
/// Payments signed per payment the crypto bound allows in the run: the server skips
/// a certificate's verification when a batch repeats it, so it can beat the bound a little.
const PAYMENTS_PER_BOUND: f64 = 1.5;
const SETTLE_PATH: &str = "/v1/offline-payments";

pub(super) async fn settle(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let (admin, _local) = bench_server(args).await?;
    let bound = crypto_bound(4, CRYPTO_SAMPLE).await?;
    let duration = Duration::from_secs(args.seconds);
    let batches_per_lane = pool_batches(bound, duration, args.clients);
    let payments_per_phone = (batches_per_lane * BATCH_PAYMENTS).div_ceil(PHONES_PER_LANE);
    let limit_minor = u64::try_from(payments_per_phone)? * AMOUNT_MINOR;
    if limit_minor > CREDENTIAL_LIMIT_MAX_MINOR {
        bail!(
            "each phone would pay {limit_minor} minor units, over the credential limit of \
             {CREDENTIAL_LIMIT_MAX_MINOR}; raise --clients or lower --seconds"
        );
    }
    let lanes = lanes(&admin, args.clients, limit_minor).await?;
    let lanes = sign_all(lanes, batches_per_lane).await?;

    let deadline = Instant::now() + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let http = bench_http()?;
    let url = format!("{}{SETTLE_PATH}", admin.base_url());
    let runs = lanes
        .into_iter()
        .map(|lane| {
            let client = Terminal { http: http.clone(), url: url.clone(), lane };
            tokio::spawn(measure(client, deadline, stop.clone()))
        })
        .collect();
    let (batches, histogram) = gather_all(runs).await?;
    let payments = batches * u64::try_from(BATCH_PAYMENTS)?;
    let mut report = report("settle", args.clients, duration, payments, &histogram, bound);
    report.batch_payments = Some(BATCH_PAYMENTS);
    Ok(report)
}

/// Batches each lane signs ahead: enough that the run cannot use them up.
fn pool_batches(bound_per_sec: f64, duration: Duration, lanes: usize) -> usize {
    let payments = bound_per_sec * duration.as_secs_f64() * PAYMENTS_PER_BOUND;
    ((payments / (lanes * BATCH_PAYMENTS) as f64).ceil() as usize).max(1)
}

/// A phone with its offline credential.
struct Phone {
    identity: Arc<DeviceIdentity>,
    credential_id: Id,
    counter_start: u64,
}

/// A certified terminal of its own merchant, its API key, and the phones that pay at it.
struct Setup {
    terminal_id: String,
    terminal: DeviceIdentity,
    certificate: Vec<u8>,
    certified: TerminalCertificate,
    api_key: String,
    phones: Vec<Phone>,
}

/// A terminal's signed batches.
struct Lane {
    terminal_id: String,
    api_key: String,
    batches: Vec<SignedBatch>,
}

/// A settlement request's JSON body and the ids of its payments, in order.
#[derive(Debug, Clone, Default)]
struct SignedBatch {
    body: Vec<u8>,
    payment_ids: Vec<String>,
}

async fn lanes(admin: &VouchClient, count: usize, limit_minor: u64) -> anyhow::Result<Vec<Setup>> {
    let (_, mut phones) = bound_devices(admin, count * PHONES_PER_LANE, DeviceKind::Consumer).await?;
    let jwks = admin.jwks().await?;
    let rng = SystemRandom::new();
    let mut lanes = Vec::with_capacity(count);
    for i in 0..count {
        let merchant = admin.create_merchant(&format!("Bench shop {i}")).await?;
        let terminal = DeviceIdentity::generate(&rng)?;
        let profile = sim::DeviceProfile::simulated(DeviceKind::Terminal, &merchant.merchant_id);
        let enrolled = sim::enrol(admin, &terminal, &profile, &SystemClock, &rng).await?;
        let certificate = admin.terminal_certificate(&enrolled.device_id).await?.bytes()?;
        let certified = verify_terminal_certificate(&certificate, |kid| jwks.cose_key(kid), SystemClock.now_unix())
            .context("setup: the terminal certificate does not verify")?
            .into_parts()
            .1;
        let api_key = admin.create_api_key(&["terminal"], &format!("bench terminal {i}")).await?.api_key;

        let consumer = admin.create_consumer(&format!("Bench consumer {i}")).await?;
        let funding = admin.create_consumer_account(&consumer.consumer_id, "consumer_funding", CURRENCY).await?;
        let total = i64::try_from(limit_minor * u64::try_from(PHONES_PER_LANE)?)?;
        let transfer_id = format!("bench-fund-{}", consumer.consumer_id);
        admin.fund_consumer(&consumer.consumer_id, &transfer_id, &funding.account_id, total, CURRENCY).await?;
        let mut lane_phones = Vec::with_capacity(PHONES_PER_LANE);
        for phone in phones.drain(..PHONES_PER_LANE) {
            admin.add_consumer_device(&consumer.consumer_id, &phone.device_id).await?;
            let mut wallet = OfflineWallet::new(phone.session, jwks.clone());
            let credential = wallet
                .obtain_credential(CURRENCY, i64::try_from(limit_minor)?)
                .await
                .context("setup: issuing an offline credential")?;
            lane_phones.push(Phone {
                identity: phone.identity,
                credential_id: credential.credential_id,
                counter_start: credential.counter_start,
            });
        }
        lanes.push(Setup {
            terminal_id: enrolled.device_id,
            terminal,
            certificate,
            certified,
            api_key,
            phones: lane_phones,
        });
    }
    Ok(lanes)
}

/// Signs `batches` batches for every lane, the work spread over all cores.
async fn sign_all(lanes: Vec<Setup>, batches: usize) -> anyhow::Result<Vec<Lane>> {
    let lanes = Arc::new(lanes);
    let threads = cores();
    let workers: Vec<_> = (0..threads)
        .map(|worker| {
            let lanes = Arc::clone(&lanes);
            tokio::task::spawn_blocking(move || {
                let rng = SystemRandom::new();
                let mut signed = Vec::new();
                for (l, lane) in lanes.iter().enumerate() {
                    for b in (0..batches).filter(|b| (l * batches + b) % threads == worker) {
                        signed.push((l, b, sign_batch(lane, b, &rng)?));
                    }
                }
                anyhow::Ok(signed)
            })
        })
        .collect();
    let mut signed: Vec<Vec<SignedBatch>> = lanes.iter().map(|_| vec![SignedBatch::default(); batches]).collect();
    for worker in workers {
        for (l, b, batch) in worker.await?? {
            signed[l][b] = batch;
        }
    }
    let lanes = Arc::into_inner(lanes).context("a signing worker outlived its task")?;
    Ok(lanes
        .into_iter()
        .zip(signed)
        .map(|(setup, batches)| Lane { terminal_id: setup.terminal_id, api_key: setup.api_key, batches })
        .collect())
}

/// Batch number `batch` of a lane: its JSON body and its payment ids, in order.
fn sign_batch(lane: &Setup, batch: usize, rng: &SystemRandom) -> anyhow::Result<SignedBatch> {
    let certificate = b64::encode(&lane.certificate);
    let now = SystemClock.now_unix();
    let mut payments = Vec::with_capacity(BATCH_PAYMENTS);
    let mut ids = Vec::with_capacity(BATCH_PAYMENTS);
    for i in batch * BATCH_PAYMENTS..(batch + 1) * BATCH_PAYMENTS {
        let phone = &lane.phones[i % PHONES_PER_LANE];
        let counter = phone.counter_start + u64::try_from(i / PHONES_PER_LANE)?;
        let (request, approval, countersignature) =
            sign_payment(&lane.terminal, &lane.certified, phone, counter, now, rng)?;
        ids.push(hex::encode(payment_id(&approval)));
        payments.push(json!({
            "terminal_certificate": certificate,
            "request": b64::encode(&request),
            "approval": b64::encode(&approval),
            "countersignature": b64::encode(&countersignature),
        }));
    }
    Ok(SignedBatch { body: serde_json::to_vec(&json!({ "payments": payments }))?, payment_ids: ids })
}

/// Legs (a), (b) and (c) of one payment of [`AMOUNT_MINOR`] with a fresh nonce.
fn sign_payment(
    terminal: &DeviceIdentity,
    certified: &TerminalCertificate,
    phone: &Phone,
    counter: u64,
    now: i64,
    rng: &SystemRandom,
) -> anyhow::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let terminal_key: &SigningKey = terminal.key();
    let request = PaymentRequest {
        merchant_id: certified.merchant_id,
        terminal_id: certified.terminal_id,
        amount_minor: AMOUNT_MINOR,
        currency: CURRENCY_NUMERIC,
        nonce: random_bytes(rng)?,
        time: now,
    }
    .sign(None, terminal_key, rng)?;
    let approval = ConsumerApproval {
        request_hash: sha256(request.bytes()),
        credential_id: phone.credential_id,
        counter,
        time: now,
    }
    .sign(None, phone.identity.key(), rng)?;
    let countersignature =
        MerchantCountersignature { digest: countersignature_digest(request.bytes(), approval.bytes()), time: now }
            .sign(None, terminal_key, rng)?;
    Ok((request.into_parts().0, approval.into_parts().0, countersignature.into_parts().0))
}

/// One terminal sending its signed batches, each answered with every payment settled.
struct Terminal {
    http: reqwest::Client,
    url: String,
    lane: Lane,
}

impl BenchClient for Terminal {
    fn device_id(&self) -> &str {
        &self.lane.terminal_id
    }

    fn request(&mut self, op: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let Some(SignedBatch { body, payment_ids: ids }) =
                self.lane.batches.get_mut(usize::try_from(op)?).map(std::mem::take)
            else {
                bail!("the signed payments ran out before the run ended");
            };
            let response = self
                .http
                .post(&self.url)
                .bearer_auth(&self.lane.api_key)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let bytes = response.bytes().await?;
            if status != reqwest::StatusCode::OK {
                let text: String = String::from_utf8_lossy(&bytes).chars().take(super::ERROR_BODY_CHARS_MAX).collect();
                bail!("POST {SETTLE_PATH} answered {status}: {text}");
            }
            let answer: SettlementResults = serde_json::from_slice(&bytes)?;
            if answer.results.len() != ids.len() {
                bail!("{} results for {} payments", answer.results.len(), ids.len());
            }
            for (result, id) in answer.results.iter().zip(&ids) {
                if result.status != SettlementStatus::Settled || result.payment_id.as_deref() != Some(id.as_str()) {
                    bail!("payment {id} not settled: {:?} {:?} {:?}", result.status, result.reason, result.detail);
                }
            }
            Ok(())
        })
    }
}
