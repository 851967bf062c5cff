//! Settling the offline payments terminals collected, a batch at a time, in three steps
//! so that a batch costs a few statements rather than several per payment:
//!
//! 1. Verification, spread over the cores ([`on_cores`]): each distinct terminal
//!    certificate once, then per payment the request, the approval against its
//!    credential (the batch's credentials are read in one query) and the
//!    countersignature. A payment that passes gets its receipt signed.
//! 2. Decision, in one write: the batch's credentials are locked and the stored payments
//!    that share an id, a nonce or a (credential, counter) with the batch are read; then
//!    each payment is decided in the order sent, against those and the batch's earlier
//!    payments ([`decide`]): already settled, credential revoked, double spend, nonce
//!    reused, over the remaining limit, or settled.
//! 3. Writing, in the same transaction: the settled payments in one statement that skips
//!    a payment colliding with one stored meanwhile (which is then decided against what
//!    it collided with), each credential's spend, the transfers, the revocations and the
//!    audit entries. No statement refuses on business grounds, so one payment's refusal
//!    never fails the others.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;
use utoipa::ToSchema;
use vouch_proto::cose::UnverifiedSign1;
use vouch_proto::offline::{
    ConsumerApproval, SignedReceipt, TerminalCertificate, WireType, payment_id, verify_approval,
    verify_countersignature, verify_payment_request, verify_terminal_certificate,
};
use vouch_proto::{ProtoError, VerifyingKey, b64, hex};
use vouch_store::{
    AuditEntry, OfflineCredentialRecord, OfflinePaymentRecord, SpendRefusal, StoreError, Transfer, TransferOutcome, Tx,
};

use super::{credential_of, currency_alpha, server_id, sign_wire};
use crate::auth::{ApiCaller, Scope};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::ApiJson;
use crate::keys::KeyStore;
use crate::{AppState, audit};

pub const SETTLEMENT_BATCH_MAX: usize = 1_000;

/// The body limit of a settlement request: a full batch of payments, each well under
/// 2 KiB in base64url, fits with room to spare; a batch over 1,000 is refused by count.
pub const SETTLEMENT_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettlementRequest {
    /// 1 to 1,000 payments, settled in order.
    pub payments: Vec<OfflinePayment>,
}

/// One offline payment as the terminal holds it: each field a base64url (unpadded)
/// tagged COSE_Sign1.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OfflinePayment {
    pub terminal_certificate: String,
    /// Leg (a), signed by the terminal.
    pub request: String,
    /// Leg (b), signed by the phone.
    pub approval: String,
    /// Leg (c), signed by the terminal.
    pub countersignature: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SettlementResults {
    /// One per payment, in the order sent.
    pub results: Vec<SettlementResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SettlementStatus {
    Settled,
    AlreadySettled,
    Refused,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SettlementResult {
    /// SHA-256 of the approval's bytes, hex; absent when the approval is not base64url.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    pub status: SettlementStatus,
    /// Why a payment was refused: the failed check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// base64url (unpadded) tagged COSE_Sign1 of the receipt, signed by the server's
    /// active key; the same bytes for every re-submission.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
    /// The ledger transfer: the payment id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
}

impl SettlementResult {
    fn refused(payment_id: Option<&str>, reason: &str, detail: impl Into<String>) -> Self {
        SettlementResult {
            payment_id: payment_id.map(str::to_owned),
            status: SettlementStatus::Refused,
            reason: Some(reason.to_owned()),
            detail: Some(detail.into()),
            receipt: None,
            transfer_id: None,
        }
    }

    fn with_receipt(status: SettlementStatus, payment: &OfflinePaymentRecord) -> Self {
        SettlementResult {
            payment_id: Some(payment.payment_id.clone()),
            status,
            reason: None,
            detail: None,
            receipt: Some(b64::encode(&payment.receipt)),
            transfer_id: Some(payment.payment_id.clone()),
        }
    }
}

/// Settles offline payments a terminal collected: each is verified leg by leg, then, in
/// one transaction for the whole batch, checked for a reused nonce and a reused
/// (credential, counter) — a double spend, which revokes the credential — and moved
/// from the consumer's offline reserve to the merchant's settlement account by a
/// transfer whose id is the payment id, with the signed receipt stored beside it. A
/// refused payment does not fail the others.
#[utoipa::path(post, path = "/v1/offline-payments", tag = "offline", request_body = SettlementRequest,
    security(("api_key" = ["terminal"])),
    responses((status = 200, body = SettlementResults),
        (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn settle_payments(
    State(state): State<AppState>,
    caller: ApiCaller,
    SettlementJson(body): SettlementJson,
) -> ApiResult<Json<SettlementResults>> {
    caller.require(Scope::Terminal)?;
    let count = body.payments.len();
    if !(1..=SETTLEMENT_BATCH_MAX).contains(&count) {
        return Err(ApiError::unprocessable(
            "invalid-batch",
            format!("payments must hold 1 to {SETTLEMENT_BATCH_MAX}, got {count}"),
        ));
    }
    let mut decoded = Vec::with_capacity(count);
    for (i, p) in body.payments.iter().enumerate() {
        let field = |name: &'static str, text: &str| {
            b64::decode(name, text).map_err(|e| ApiError::bad_request("invalid-base64", format!("payment {i}: {e}")))
        };
        decoded.push(Legs {
            certificate: field("terminal_certificate", &p.terminal_certificate)?,
            request: field("request", &p.request)?,
            approval: field("approval", &p.approval)?,
            countersignature: field("countersignature", &p.countersignature)?,
        });
    }
    let results = settle_batch(&state, &caller.actor(), decoded).await?;
    Ok(Json(SettlementResults { results }))
}

/// The settlement body, read under [`SETTLEMENT_BODY_BYTES_MAX`]: a full batch is far
/// over the default body limit.
pub(super) struct SettlementJson(SettlementRequest);

impl<S: Send + Sync> axum::extract::FromRequest<S> for SettlementJson {
    type Rejection = ApiError;

    async fn from_request(mut req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        DefaultBodyLimit::max(SETTLEMENT_BODY_BYTES_MAX).apply(&mut req);
        let ApiJson(body) = ApiJson::<SettlementRequest>::from_request(req, state).await?;
        Ok(SettlementJson(body))
    }
}

struct Legs {
    certificate: Vec<u8>,
    request: Vec<u8>,
    approval: Vec<u8>,
    countersignature: Vec<u8>,
}

/// A refused payment: the check that failed, and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    reason: &'static str,
    detail: String,
}

impl Refusal {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Refusal { reason, detail: detail.into() }
    }

    /// A leg that failed its check.
    fn of(e: &ProtoError) -> Self {
        let reason = match e {
            ProtoError::OfflineRefused { check, .. } => check.as_str(),
            ProtoError::UnknownSigningKey { .. } => "unknown-server-key",
            ProtoError::BadSignature => "bad-signature",
            _ => "malformed",
        };
        Refusal::new(reason, e.to_string())
    }

    fn nonce_reused() -> Self {
        Refusal::new("nonce-reused", "the request's nonce was settled before")
    }
}

/// What became of one payment.
#[derive(Debug)]
enum Outcome {
    Settled(OfflinePaymentRecord),
    AlreadySettled(OfflinePaymentRecord),
    Refused(Refusal),
}

impl Outcome {
    fn into_result(self, payment_id: &str) -> SettlementResult {
        match self {
            Outcome::Settled(payment) => SettlementResult::with_receipt(SettlementStatus::Settled, &payment),
            Outcome::AlreadySettled(payment) => {
                SettlementResult::with_receipt(SettlementStatus::AlreadySettled, &payment)
            }
            Outcome::Refused(refusal) => SettlementResult::refused(Some(payment_id), refusal.reason, refusal.detail),
        }
    }
}

async fn settle_batch(state: &AppState, actor: &str, batch: Vec<Legs>) -> ApiResult<Vec<SettlementResult>> {
    let now = state.now();
    let ids: Vec<String> = batch.iter().map(|legs| hex::encode(payment_id(&legs.approval))).collect();
    let checks = Arc::new(Checks {
        state: state.clone(),
        now,
        credentials: named_credentials(state, &batch).await?,
        certificates: verify_certificates(state, &batch, now).await?,
    });
    let mut checked = Vec::with_capacity(batch.len());
    for verified in on_cores(batch, move |legs| checks.check(&legs)).await? {
        checked.push(match verified {
            Ok(verified) => Ok(verified),
            Err(Stop::Refused(refusal)) => Err(refusal),
            Err(Stop::Fault(e)) => return Err(e),
        });
    }
    let outcomes = decide_and_write(state, actor, now, checked).await?;
    Ok(ids.iter().zip(outcomes).map(|(id, outcome)| outcome.into_result(id)).collect())
}

/// The cores verification is spread over, read once.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

/// Payments one verification task takes at the least, so a small batch stays whole.
const VERIFY_CHUNK_MIN: usize = 16;

/// The verification tasks of all settlements that run at once: one per core. More
/// would not verify faster, and would crowd out the batches' writes, whose many short
/// steps each wait for a core.
fn verifying() -> &'static Semaphore {
    static VERIFYING: OnceLock<Semaphore> = OnceLock::new();
    VERIFYING.get_or_init(|| Semaphore::new(cores()))
}

/// Runs `work` over `items` on the blocking pool and returns the results in order,
/// split in as many chunks as there are idle cores: a batch that arrives alone is
/// checked on every core, while batches that arrive together each take one, and none
/// waits for a second core to finish. Never on the threads serving requests.
async fn on_cores<T, R, F>(items: Vec<T>, work: F) -> ApiResult<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> R + Send + Sync + 'static,
{
    let idle = verifying().available_permits().clamp(1, cores());
    let chunk = items.len().div_ceil(idle).max(VERIFY_CHUNK_MIN);
    let work = Arc::new(work);
    let mut tasks = Vec::with_capacity(cores());
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        let part: Vec<T> = items.by_ref().take(chunk).collect();
        let work = Arc::clone(&work);
        let permit = verifying().acquire().await.map_err(ApiError::internal)?;
        tasks.push(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            part.into_iter().map(|item| work(item)).collect::<Vec<R>>()
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.extend(task.await.map_err(ApiError::internal)?);
    }
    Ok(results)
}

/// The server's published key a COSE kid names.
fn server_key(keys: &dyn KeyStore, kid: Option<&[u8]>) -> Result<VerifyingKey, ProtoError> {
    let kid = kid.and_then(|k| std::str::from_utf8(k).ok()).unwrap_or_default();
    keys.verifying_key(kid).ok_or_else(|| ProtoError::UnknownSigningKey { kid: kid.to_owned() })
}

/// The server id of the credential an approval names, read before its signature is
/// checked: the signature is checked with that credential's key.
fn approval_credential_id(approval: &[u8]) -> Result<String, ProtoError> {
    let sign1 = UnverifiedSign1::parse(approval)?;
    let approval = ConsumerApproval::from_cbor(sign1.payload_unverified())?;
    Ok(server_id("ocr", &approval.credential_id))
}

/// The credentials the batch's approvals name, in one query.
async fn named_credentials(state: &AppState, batch: &[Legs]) -> ApiResult<HashMap<String, OfflineCredentialRecord>> {
    let ids: Vec<String> = batch.iter().filter_map(|legs| approval_credential_id(&legs.approval).ok()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let records = state.store.offline_credentials(&ids).await?;
    Ok(records.into_iter().map(|record| (record.id.clone(), record)).collect())
}

/// Each distinct certificate of the batch, verified once: a terminal sends its
/// certificate with every payment.
async fn verify_certificates(
    state: &AppState,
    batch: &[Legs],
    now: i64,
) -> ApiResult<HashMap<Vec<u8>, Result<TerminalCertificate, Refusal>>> {
    let distinct: HashSet<&[u8]> = batch.iter().map(|legs| legs.certificate.as_slice()).collect();
    let distinct: Vec<Vec<u8>> = distinct.into_iter().map(<[u8]>::to_vec).collect();
    let keys = state.keys.clone();
    let verified = on_cores(distinct.clone(), move |bytes| {
        verify_terminal_certificate(&bytes, |kid| server_key(&*keys, kid), now)
            .map(|certificate| certificate.into_parts().1)
            .map_err(|e| Refusal::of(&e))
    })
    .await?;
    Ok(distinct.into_iter().zip(verified).collect())
}

/// Why checking a payment stopped: it was refused, or the server failed.
enum Stop {
    Refused(Refusal),
    Fault(ApiError),
}

impl From<ProtoError> for Stop {
    fn from(e: ProtoError) -> Self {
        Stop::Refused(Refusal::of(&e))
    }
}

impl From<ApiError> for Stop {
    fn from(e: ApiError) -> Self {
        Stop::Fault(e)
    }
}

/// A payment whose legs all verified, as it will be stored, receipt included.
#[derive(Debug)]
struct Verified {
    payment: OfflinePaymentRecord,
    reserve_account_id: String,
}

/// What checking a batch's payments needs besides their bytes.
struct Checks {
    state: AppState,
    now: i64,
    credentials: HashMap<String, OfflineCredentialRecord>,
    certificates: HashMap<Vec<u8>, Result<TerminalCertificate, Refusal>>,
}

impl Checks {
    /// The checks of a payment that need no more than its bytes and its credential, in
    /// order; a payment that passes them gets its receipt signed. The amount is checked
    /// here against the credential's limit, and against what is left of it when the
    /// payment is decided under the credential's lock.
    fn check(&self, legs: &Legs) -> Result<Verified, Stop> {
        let certificate = match self.certificates.get(&legs.certificate) {
            Some(Ok(certificate)) => certificate,
            Some(Err(refusal)) => return Err(Stop::Refused(refusal.clone())),
            None => return Err(Stop::Fault(ApiError::internal("a certificate of the batch was not verified"))),
        };
        let request = verify_payment_request(&legs.request, certificate)?;
        let credential_id = approval_credential_id(&legs.approval)?;
        let Some(record) = self.credentials.get(&credential_id) else {
            return Err(Stop::Refused(Refusal::new("unknown-credential", format!("no credential {credential_id}"))));
        };
        let credential = credential_of(record)?;
        let approval = verify_approval(&legs.approval, &request, &credential, credential.limit_minor)?;
        verify_countersignature(&legs.countersignature, &request, &approval, certificate)?;
        let r = request.value();
        let Some(currency) = currency_alpha(r.currency) else {
            return Err(Stop::Refused(Refusal::new("currency-mismatch", format!("currency {:03}", r.currency))));
        };
        let amount_minor = i64::try_from(r.amount_minor)
            .map_err(|_| ApiError::internal("an amount within a credential's limit fits i64"))?;
        let counter = i64::try_from(approval.value().counter)
            .map_err(|_| ApiError::internal("a counter within a credential's range fits i64"))?;
        let digest = payment_id(&legs.approval);
        let receipt = SignedReceipt {
            payment_id: digest,
            transfer_id: digest,
            amount_minor: r.amount_minor,
            currency: r.currency,
            settled_at: self.now,
        };
        Ok(Verified {
            payment: OfflinePaymentRecord {
                payment_id: hex::encode(digest),
                credential_id,
                counter,
                nonce: hex::encode(r.nonce),
                amount_minor,
                currency: currency.to_owned(),
                merchant_id: server_id("mch", &certificate.merchant_id),
                terminal_id: server_id("dev", &certificate.terminal_id),
                receipt: sign_wire(&self.state, &receipt)?,
                settled_at: self.now,
            },
            reserve_account_id: record.reserve_account_id.clone(),
        })
    }
}

/// Decides the verified payments against the ledger and writes what was decided, in one
/// write; refused ones pass through.
async fn decide_and_write(
    state: &AppState,
    actor: &str,
    now: i64,
    checked: Vec<Result<Verified, Refusal>>,
) -> ApiResult<Vec<Outcome>> {
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(checked.len());
    let mut verified = Vec::with_capacity(checked.len());
    for check in checked {
        match check {
            Ok(payment) => {
                outcomes.push(None);
                verified.push(Some(payment));
            }
            Err(refusal) => {
                outcomes.push(Some(Outcome::Refused(refusal)));
                verified.push(None);
            }
        }
    }
    if verified.iter().any(Option::is_some) {
        let actor = actor.to_owned();
        let written =
            state.store.write(move |tx| Box::pin(async move { write_batch(tx, &actor, now, verified).await })).await?;
        for (slot, outcome) in outcomes.iter_mut().zip(written) {
            if slot.is_none() {
                *slot = outcome;
            }
        }
    }
    outcomes.into_iter().map(|outcome| outcome.ok_or_else(|| ApiError::internal("a payment was not decided"))).collect()
}

/// What the stored payments, the payment's credential and the batch's earlier
/// payments make of a verified payment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Settle,
    /// Settled before: answered with the stored receipt.
    Stored(OfflinePaymentRecord),
    /// The same payment earlier in the batch: answered as that one is.
    SameAs(usize),
    /// Its (credential, counter) was spent by another payment: the credential is revoked.
    DoubleSpend {
        first_payment_id: String,
    },
    Refused(Refusal),
}

/// A credential as the batch's payments leave it.
struct Balance<'a> {
    record: &'a OfflineCredentialRecord,
    settled_minor: i64,
    revoked: bool,
}

/// Who holds each payment id, (credential, counter) and nonce so far: a stored payment
/// or one the batch settles.
#[derive(Default)]
struct Spent<'a> {
    ids: HashMap<&'a str, Result<&'a OfflinePaymentRecord, usize>>,
    counters: HashMap<(&'a str, i64), &'a str>,
    nonces: HashSet<&'a str>,
}

impl<'a> Spent<'a> {
    /// `holder` is the stored payment, or the batch's payment number `holder`.
    fn insert(&mut self, payment: &'a OfflinePaymentRecord, holder: Result<&'a OfflinePaymentRecord, usize>) {
        self.ids.insert(&payment.payment_id, holder);
        self.counters.insert((&payment.credential_id, payment.counter), &payment.payment_id);
        self.nonces.insert(&payment.nonce);
    }
}

/// Decides each verified payment of a batch in the order sent, as if the payments were
/// settled one after another: against the stored payments it could collide with, its
/// locked credential, and the payments of the batch settled before it.
fn decide(
    batch: &[Option<&OfflinePaymentRecord>],
    credentials: &[OfflineCredentialRecord],
    stored: &[OfflinePaymentRecord],
) -> Vec<Option<Decision>> {
    let mut balances: HashMap<&str, Balance> = credentials
        .iter()
        .map(|record| {
            let balance = Balance { record, settled_minor: record.settled_minor, revoked: record.revoked_at.is_some() };
            (record.id.as_str(), balance)
        })
        .collect();
    let mut spent = Spent::default();
    for payment in stored {
        spent.insert(payment, Ok(payment));
    }
    let mut decisions = Vec::with_capacity(batch.len());
    for (i, slot) in batch.iter().enumerate() {
        let Some(payment) = *slot else {
            decisions.push(None);
            continue;
        };
        let decision =
            match (spent.ids.get(payment.payment_id.as_str()), balances.get_mut(payment.credential_id.as_str())) {
                // A payment settled before is answered with its receipt, even once its
                // credential has been revoked or spent.
                (Some(Ok(stored)), _) => Decision::Stored((*stored).clone()),
                (Some(Err(first)), _) => Decision::SameAs(*first),
                // Credentials are never deleted: the one the payment verified against is there.
                (None, None) => Decision::Refused(Refusal::new("unknown-credential", "the credential is gone")),
                (None, Some(balance)) => against_credential(payment, balance, &spent),
            };
        if decision == Decision::Settle {
            spent.insert(payment, Err(i));
        }
        decisions.push(Some(decision));
    }
    decisions
}

/// The rules that need the ledger's state, in order, for a payment not settled before:
/// this is where each is applied, and the only place. A double spend revokes the
/// credential for the batch's later payments; a counter at or above the end a sync set
/// is refused; a settled payment counts against the credential's limit.
fn against_credential(payment: &OfflinePaymentRecord, balance: &mut Balance, spent: &Spent) -> Decision {
    let record = balance.record;
    if balance.revoked {
        return Decision::Refused(Refusal::new("credential-revoked", format!("credential {} is revoked", record.id)));
    }
    if let Some(first) = spent.counters.get(&(payment.credential_id.as_str(), payment.counter)) {
        balance.revoked = true;
        return Decision::DoubleSpend { first_payment_id: (*first).to_owned() };
    }
    if spent.nonces.contains(payment.nonce.as_str()) {
        return Decision::Refused(Refusal::nonce_reused());
    }
    if let Some(counter_end) = record.counter_end.filter(|end| payment.counter >= *end) {
        let refusal = SpendRefusal::CounterClosed { counter_end };
        return Decision::Refused(Refusal::new(refusal.reason(), refusal.to_string()));
    }
    let left = record.limit_minor.saturating_sub(balance.settled_minor);
    if payment.amount_minor > left {
        return Decision::Refused(Refusal::new(
            "over-limit",
            format!("amount {}, limit left {left}", payment.amount_minor),
        ));
    }
    balance.settled_minor += payment.amount_minor;
    Decision::Settle
}

/// What a payment that could not be inserted collided with, stored meanwhile by another
/// transaction.
fn collision(payment: &OfflinePaymentRecord, stored: &[OfflinePaymentRecord]) -> Option<Decision> {
    if let Some(same) = stored.iter().find(|s| s.payment_id == payment.payment_id) {
        return Some(Decision::Stored(same.clone()));
    }
    if let Some(first) =
        stored.iter().find(|s| s.credential_id == payment.credential_id && s.counter == payment.counter)
    {
        return Some(Decision::DoubleSpend { first_payment_id: first.payment_id.clone() });
    }
    stored.iter().any(|s| s.nonce == payment.nonce).then(|| Decision::Refused(Refusal::nonce_reused()))
}

/// Decides a batch's verified payments and writes the outcome (see the module header);
/// one outcome per verified payment, `None` where the batch had a refusal already.
async fn write_batch(
    tx: &mut Tx,
    actor: &str,
    now: i64,
    batch: Vec<Option<Verified>>,
) -> Result<Vec<Option<Outcome>>, StoreError> {
    let payments: Vec<Option<&OfflinePaymentRecord>> = batch.iter().map(|v| v.as_ref().map(|v| &v.payment)).collect();
    let named: Vec<&OfflinePaymentRecord> = payments.iter().flatten().copied().collect();
    let credential_ids: Vec<&str> = named.iter().map(|p| p.credential_id.as_str()).collect();
    let credentials = tx.lock_offline_credentials(&credential_ids).await?;
    let stored = tx.offline_payments_colliding(&named).await?;
    let mut decisions = decide(&payments, &credentials, &stored);

    // Inserted in nonce order: the one index two concurrent settlements over different
    // credentials can meet on, so each waits for the other in the same order.
    let mut settling: Vec<usize> =
        (0..batch.len()).filter(|&i| decisions[i].as_ref() == Some(&Decision::Settle)).collect();
    settling.sort_by_key(|&i| payments[i].map(|p| p.nonce.as_str()));
    let to_insert: Vec<&OfflinePaymentRecord> = settling.iter().filter_map(|&i| payments[i]).collect();
    let inserted: HashSet<String> = tx.insert_offline_payments(&to_insert).await?.into_iter().collect();
    let skipped: Vec<&OfflinePaymentRecord> =
        to_insert.iter().copied().filter(|p| !inserted.contains(&p.payment_id)).collect();
    if !skipped.is_empty() {
        let stored = tx.offline_payments_colliding(&skipped).await?;
        for &i in &settling {
            let Some(payment) = payments[i].filter(|p| !inserted.contains(&p.payment_id)) else { continue };
            let decision = collision(payment, &stored).ok_or_else(|| StoreError::Corrupt {
                what: "offline payment",
                detail: format!("payment {} was neither inserted nor found colliding", payment.payment_id),
            })?;
            decisions[i] = Some(decision);
        }
    }
    settling.retain(|&i| decisions[i].as_ref() == Some(&Decision::Settle));
    settling.sort_unstable();

    // Each credential's share: what its settled payments move, and their highest counter.
    let mut spent: HashMap<&str, (i64, i64)> = HashMap::new();
    for &i in &settling {
        if let Some(payment) = payments[i] {
            let (amount_minor, counter) = spent.entry(payment.credential_id.as_str()).or_default();
            *amount_minor += payment.amount_minor;
            *counter = (*counter).max(payment.counter);
        }
    }
    let mut spent: Vec<(&str, (i64, i64))> = spent.into_iter().collect();
    spent.sort_unstable();
    for (credential_id, (amount_minor, counter)) in spent {
        // The credential is locked and `decide` kept within its limit and counters.
        if let Err(refusal) = tx.spend_offline_credential(credential_id, counter, amount_minor).await? {
            return Err(StoreError::Corrupt {
                what: "offline credential",
                detail: format!("{credential_id} refused a spend decided under its lock: {refusal}"),
            });
        }
    }
    let merchants = settlement_accounts(tx, &settling, &payments, now).await?;
    let mut transfers = Vec::with_capacity(settling.len());
    for v in settling.iter().filter_map(|&i| batch[i].as_ref()) {
        let p = &v.payment;
        let Some(account_id) = merchants.get(&(p.merchant_id.as_str(), p.currency.as_str())) else {
            return Err(StoreError::Corrupt { what: "settlement account", detail: p.merchant_id.clone() });
        };
        transfers.push(Transfer {
            id: p.payment_id.clone(),
            debit_account_id: v.reserve_account_id.clone(),
            credit_account_id: account_id.clone(),
            amount_minor: p.amount_minor,
            currency: p.currency.clone(),
            reference: format!("offline-payment:{}", p.payment_id),
            created_at: now,
        });
    }
    for (transfer, outcome) in transfers.iter().zip(tx.post_transfers(&transfers).await?) {
        // Nothing else moves a reserve than its credentials' payments, each within its
        // limit: a refusal here fails the work and undoes it.
        if outcome != TransferOutcome::Posted {
            return Err(StoreError::Corrupt {
                what: "offline payment transfer",
                detail: format!("{}: {outcome:?}", transfer.id),
            });
        }
    }

    let mut entries = Vec::new();
    let mut revoked: HashSet<&str> = HashSet::new();
    for (i, decision) in decisions.iter().enumerate() {
        let Some(payment) = payments[i] else { continue };
        match decision {
            Some(Decision::Settle) => {
                let account_id = merchants.get(&(payment.merchant_id.as_str(), payment.currency.as_str()));
                let detail = json!({
                    "credential_id": payment.credential_id, "counter": payment.counter,
                    "amount_minor": payment.amount_minor, "currency": payment.currency,
                    "merchant_id": payment.merchant_id, "terminal_id": payment.terminal_id,
                    "account_id": account_id,
                });
                entries.push(audit::entry(now, actor, "offline.settled", &payment.payment_id, detail));
            }
            Some(Decision::DoubleSpend { first_payment_id }) => {
                let revoked_now = revoked.insert(payment.credential_id.as_str())
                    && tx.revoke_offline_credential(&payment.credential_id, now).await?;
                entries.push(double_spend_entry(now, actor, payment, first_payment_id, revoked_now));
            }
            _ => {}
        }
    }
    tx.append_audits(&entries).await?;

    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
    for (i, decision) in decisions.into_iter().enumerate() {
        let outcome = match (decision, &batch[i]) {
            (Some(Decision::Settle), Some(v)) => Outcome::Settled(v.payment.clone()),
            (Some(Decision::Stored(stored)), _) => Outcome::AlreadySettled(stored),
            (Some(Decision::SameAs(first)), _) => match outcomes.get(first) {
                Some(Some(Outcome::Settled(p) | Outcome::AlreadySettled(p))) => Outcome::AlreadySettled(p.clone()),
                Some(Some(Outcome::Refused(refusal))) => Outcome::Refused(refusal.clone()),
                _ => return Err(StoreError::Corrupt { what: "settlement batch", detail: format!("payment {i}") }),
            },
            (Some(Decision::DoubleSpend { first_payment_id }), Some(v)) => Outcome::Refused(Refusal::new(
                "double-spend",
                format!("counter {} of the credential was spent by payment {first_payment_id}", v.payment.counter),
            )),
            (Some(Decision::Refused(refusal)), _) => Outcome::Refused(refusal),
            (None, _) => {
                outcomes.push(None);
                continue;
            }
            (Some(_), None) => {
                return Err(StoreError::Corrupt { what: "settlement batch", detail: format!("payment {i}") });
            }
        };
        outcomes.push(Some(outcome));
    }
    Ok(outcomes)
}

/// The settlement account of each merchant and currency the settled payments credit,
/// opened on first use, in (merchant, currency) order.
async fn settlement_accounts<'a>(
    tx: &mut Tx,
    settling: &[usize],
    payments: &[Option<&'a OfflinePaymentRecord>],
    now: i64,
) -> Result<HashMap<(&'a str, &'a str), String>, StoreError> {
    let mut pairs: Vec<(&str, &str)> =
        settling.iter().filter_map(|&i| payments[i]).map(|p| (p.merchant_id.as_str(), p.currency.as_str())).collect();
    pairs.sort_unstable();
    pairs.dedup();
    let mut accounts = HashMap::with_capacity(pairs.len());
    for (merchant_id, currency) in pairs {
        accounts.insert((merchant_id, currency), tx.merchant_settlement_account_id(merchant_id, currency, now).await?);
    }
    Ok(accounts)
}

/// The fraud entry of a double spend.
fn double_spend_entry(
    now: i64,
    actor: &str,
    payment: &OfflinePaymentRecord,
    first_payment_id: &str,
    revoked: bool,
) -> AuditEntry {
    let detail = json!({
        "fraud": true, "payment_id": payment.payment_id, "first_payment_id": first_payment_id,
        "counter": payment.counter, "merchant_id": payment.merchant_id,
        "terminal_id": payment.terminal_id, "revoked": revoked,
    });
    audit::entry(now, actor, "offline.double_spend", &payment.credential_id, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(id: &str, limit_minor: i64, settled_minor: i64, revoked: bool) -> OfflineCredentialRecord {
        OfflineCredentialRecord {
            id: id.into(),
            device_id: "dev_phone".into(),
            consumer_id: "con_1".into(),
            reserve_account_id: "acc_reserve".into(),
            public_key: vec![4; 65],
            limit_minor,
            currency: "EUR".into(),
            counter_start: 0,
            issued_at: 0,
            not_after: 100,
            revoked_at: revoked.then_some(50),
            settled_minor,
            counter_end: None,
            closed_at: None,
            closed_spent_minor: None,
            closed_settled_minor: None,
            refreshed_from: None,
        }
    }

    /// Payment `id` under credential `credential`, counter `counter`, nonce `nonce`.
    fn payment(id: &str, credential: &str, counter: i64, nonce: &str, amount_minor: i64) -> OfflinePaymentRecord {
        OfflinePaymentRecord {
            payment_id: id.into(),
            credential_id: credential.into(),
            counter,
            nonce: nonce.into(),
            amount_minor,
            currency: "EUR".into(),
            merchant_id: "mch_1".into(),
            terminal_id: "dev_t".into(),
            receipt: id.as_bytes().to_vec(),
            settled_at: 60,
        }
    }

    fn refused(reason: &'static str) -> String {
        format!("refused {reason}")
    }

    /// Each decision in a word, for comparing with a table.
    fn words(decisions: &[Option<Decision>]) -> Vec<String> {
        decisions
            .iter()
            .map(|d| match d {
                None => "checked before".to_owned(),
                Some(Decision::Settle) => "settle".to_owned(),
                Some(Decision::Stored(p)) => format!("stored {}", p.payment_id),
                Some(Decision::SameAs(i)) => format!("same as {i}"),
                Some(Decision::DoubleSpend { first_payment_id }) => format!("double spend of {first_payment_id}"),
                Some(Decision::Refused(r)) => refused(r.reason),
            })
            .collect()
    }

    #[test]
    fn payments_are_decided_as_if_settled_one_after_another() {
        let credentials = [credential("ocr_a", 100, 40, false), credential("ocr_b", 100, 0, true)];
        let stored = [payment("p0", "ocr_a", 1, "n0", 40), payment("q0", "ocr_b", 1, "m0", 10)];
        let batch = [
            payment("p0", "ocr_a", 1, "n0", 40),
            payment("p1", "ocr_a", 2, "n1", 30),
            payment("p1", "ocr_a", 2, "n1", 30),
            payment("p2", "ocr_a", 3, "n0", 5),
            payment("p3", "ocr_a", 4, "n1", 5),
            payment("p4", "ocr_a", 5, "n4", 31),
            payment("p5", "ocr_a", 6, "n5", 30),
            payment("p6", "ocr_a", 2, "n6", 1),
            payment("p7", "ocr_a", 7, "n7", 1),
            payment("q0", "ocr_b", 1, "m0", 10),
            payment("q1", "ocr_b", 2, "m1", 10),
            payment("r1", "ocr_gone", 1, "o1", 10),
        ];
        let slots: Vec<Option<&OfflinePaymentRecord>> =
            batch.iter().enumerate().map(|(i, p)| (i != 3).then_some(p)).collect();
        let decisions = decide(&slots, &credentials, &stored);
        assert_eq!(
            words(&decisions),
            [
                "stored p0".to_owned(),
                "settle".to_owned(),
                "same as 1".to_owned(),
                "checked before".to_owned(),
                refused("nonce-reused"),
                // 40 stored and 30 settled leave 30 of the 100.
                refused("over-limit"),
                "settle".to_owned(),
                "double spend of p1".to_owned(),
                refused("credential-revoked"),
                // Settled before, under a credential revoked since.
                "stored q0".to_owned(),
                refused("credential-revoked"),
                refused("unknown-credential"),
            ]
        );
    }

    #[test]
    fn a_payment_skipped_at_insertion_is_decided_by_what_it_met() {
        let mine = payment("p1", "ocr_a", 2, "n1", 30);
        let check = |stored: &[OfflinePaymentRecord]| words(&[collision(&mine, stored)]);
        assert_eq!(check(&[payment("p1", "ocr_a", 2, "n1", 30)]), ["stored p1"]);
        assert_eq!(check(&[payment("p9", "ocr_a", 2, "n9", 30)]), ["double spend of p9"]);
        assert_eq!(check(&[payment("p9", "ocr_z", 9, "n1", 30)]), [refused("nonce-reused")]);
        assert_eq!(check(&[]), ["checked before"]);
    }
}
