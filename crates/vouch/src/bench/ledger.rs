//! `ledger`: transfers alone, through the store's batch posting (`Tx::post_transfers`
//! inside `Store::write`, as the server posts them), for several batch sizes in turn.
//! Each client moves 1 minor unit at a time from a funding account of its own to a
//! merchant settlement account of its own, so clients share no account.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::Serialize;
use vouch_device::VouchClient;
use vouch_proto::{Clock, SystemClock};
use vouch_store::{Backend, Store, TRANSFER_AMOUNT_MAX_MINOR, Transfer, TransferOutcome};

use super::{BenchArgs, BenchClient, OpFuture, gather_all, measure};

/// Transfers per `post_transfers` call, each size measured for `--seconds`.
const BATCH_SIZES: [usize; 4] = [1, 10, 100, 1_000];
const CURRENCY: &str = "EUR";

#[derive(Debug, Serialize)]
pub(super) struct LedgerReport {
    scenario: &'static str,
    database: &'static str,
    clients: usize,
    /// Measurement time of each batch size.
    seconds: f64,
    runs: Vec<LedgerRun>,
}

#[derive(Debug, Serialize)]
struct LedgerRun {
    batch_size: usize,
    transfers: u64,
    transfers_per_sec: f64,
    /// Per batch, from the write's start until its transaction committed.
    p50_ms: f64,
    p99_ms: f64,
}

impl LedgerReport {
    pub(super) fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(self)?);
            return Ok(());
        }
        for run in &self.runs {
            println!(
                "ledger database={} clients={} seconds={:.1} batch={} transfers={} transfers/s={:.0} \
                 p50={:.2}ms p99={:.2}ms",
                self.database,
                self.clients,
                self.seconds,
                run.batch_size,
                run.transfers,
                run.transfers_per_sec,
                run.p50_ms,
                run.p99_ms
            );
        }
        Ok(())
    }
}

/// One client's two accounts.
#[derive(Debug, Clone)]
struct Lane {
    funding_id: String,
    settlement_id: String,
}

pub(super) async fn ledger(args: &BenchArgs) -> anyhow::Result<LedgerReport> {
    if args.target.is_some() {
        bail!("ledger posts through the store in-process; run it without --target");
    }
    let local = crate::demo::start_local(args.database.as_deref(), 10_000_000).await?;
    let admin = VouchClient::new(&local.url)?.with_api_key(&local.admin_key);
    let lanes = lanes(&admin, args.clients).await?;
    let store = local.state.store.clone();
    // Transfer ids of this run, so that runs on one database never meet.
    let run = SystemClock.now_unix();
    let duration = Duration::from_secs(args.seconds);
    let mut runs = Vec::with_capacity(BATCH_SIZES.len());
    let mut posted = 0u64;
    for batch_size in BATCH_SIZES {
        let deadline = Instant::now() + duration;
        let stop = Arc::new(AtomicBool::new(false));
        let clients = lanes
            .iter()
            .enumerate()
            .map(|(i, lane)| {
                let client = Poster {
                    store: store.clone(),
                    lane: lane.clone(),
                    name: format!("lane {i}"),
                    id_prefix: format!("bench-{run}-{batch_size}-{i}"),
                    batch_size,
                };
                tokio::spawn(measure(client, deadline, stop.clone()))
            })
            .collect();
        let (batches, histogram) = gather_all(clients).await?;
        let transfers = batches * u64::try_from(batch_size)?;
        posted += transfers;
        runs.push(row(batch_size, transfers, duration, &histogram));
    }
    check_ledger(&store, &lanes, posted).await?;
    let database = match store.backend() {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    Ok(LedgerReport { scenario: "ledger", database, clients: args.clients, seconds: duration.as_secs_f64(), runs })
}

fn row(batch_size: usize, transfers: u64, duration: Duration, histogram: &Histogram<u64>) -> LedgerRun {
    let quantile_ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1_000.0;
    LedgerRun {
        batch_size,
        transfers,
        transfers_per_sec: transfers as f64 / duration.as_secs_f64(),
        p50_ms: quantile_ms(0.5),
        p99_ms: quantile_ms(0.99),
    }
}

/// A consumer with a funding account holding the most one transfer can move, and a
/// merchant with a settlement account, per client.
async fn lanes(admin: &VouchClient, count: usize) -> anyhow::Result<Vec<Lane>> {
    let mut lanes = Vec::with_capacity(count);
    for i in 0..count {
        let consumer = admin.create_consumer(&format!("Ledger consumer {i}")).await?;
        let funding = admin.create_consumer_account(&consumer.consumer_id, "consumer_funding", CURRENCY).await?;
        let transfer_id = format!("bench-fund-{}", consumer.consumer_id);
        admin
            .fund_consumer(
                &consumer.consumer_id,
                &transfer_id,
                &funding.account_id,
                TRANSFER_AMOUNT_MAX_MINOR,
                CURRENCY,
            )
            .await?;
        let merchant = admin.create_merchant(&format!("Ledger merchant {i}")).await?;
        let settlement = admin.create_merchant_account(&merchant.merchant_id, "bench settlement", CURRENCY).await?;
        lanes.push(Lane { funding_id: funding.account_id, settlement_id: settlement.account_id });
    }
    Ok(lanes)
}

/// Every transfer moved exactly its unit, and the ledger still sums to zero.
async fn check_ledger(store: &Store, lanes: &[Lane], posted: u64) -> anyhow::Result<()> {
    let mut credited = 0u64;
    for lane in lanes {
        credited += u64::try_from(store.account(&lane.settlement_id).await?.balance_minor())?;
    }
    if credited != posted {
        bail!("the settlement accounts hold {credited} minor units after {posted} transfers of one unit");
    }
    let imbalance = store.ledger_imbalance().await?;
    if !imbalance.is_empty() {
        bail!("the ledger does not sum to zero: {imbalance:?}");
    }
    Ok(())
}

/// One client posting batches of `batch_size` transfers, each of which must post.
struct Poster {
    store: Store,
    lane: Lane,
    name: String,
    id_prefix: String,
    batch_size: usize,
}

impl BenchClient for Poster {
    fn device_id(&self) -> &str {
        &self.name
    }

    fn request(&mut self, op: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let now = SystemClock.now_unix();
            let batch: Vec<Transfer> = (0..self.batch_size)
                .map(|i| Transfer {
                    id: format!("{}-{op}-{i}", self.id_prefix),
                    debit_account_id: self.lane.funding_id.clone(),
                    credit_account_id: self.lane.settlement_id.clone(),
                    amount_minor: 1,
                    currency: CURRENCY.to_owned(),
                    reference: "bench".to_owned(),
                    created_at: now,
                })
                .collect();
            let outcomes = self.store.write(move |tx| Box::pin(async move { tx.post_transfers(&batch).await })).await?;
            if let Some(refused) = outcomes.iter().find(|o| **o != TransferOutcome::Posted) {
                bail!("a transfer was not posted: {refused:?}");
            }
            Ok(())
        })
    }
}
