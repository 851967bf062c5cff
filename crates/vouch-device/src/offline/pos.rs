//! The merchant's terminal: makes payment requests, checks approvals against the
//! phone's credential before it countersigns, and settles what it collected.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use vouch_proto::crypto::{SystemRandom, random_bytes};
use vouch_proto::offline::{
    ApprovalReply, Id, MerchantCountersignature, NONCE_BYTES, PaymentOffer, PaymentRequest, SignedReceipt,
    TerminalCertificate, WireType, countersignature_digest, currency_numeric, payment_id, verify_approval,
    verify_credential, verify_receipt, verify_terminal_certificate,
};
use vouch_proto::{Clock, JwkSet, ProtoError, b64};

use super::{OfflineRefusal, SETTLEMENT_BATCH_MAX, SETTLEMENT_PATH, payment_id_text, refused, server_id};
use crate::client::{Auth, Body};
use crate::token::Method;
use crate::{DeviceError, DeviceIdentity, VouchClient};

/// Most payments a terminal holds unsettled.
pub const QUEUE_MAX: usize = 100_000;

/// A payment request made and sent, waiting for the phone's answer.
#[derive(Debug, Clone)]
pub struct PendingSale {
    request: vouch_proto::offline::Signed<PaymentRequest>,
    leg_a: Vec<u8>,
}

impl PendingSale {
    /// Leg (a) to send: the terminal certificate and the signed request.
    pub fn leg_a(&self) -> &[u8] {
        &self.leg_a
    }

    pub fn request(&self) -> &PaymentRequest {
        self.request.value()
    }
}

/// A payment approved and countersigned, as it is settled: each leg the exact bytes
/// signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedPayment {
    /// Hex SHA-256 of the approval's bytes, as the server names the payment.
    pub payment_id: String,
    pub terminal_certificate: Vec<u8>,
    pub request: Vec<u8>,
    pub approval: Vec<u8>,
    pub countersignature: Vec<u8>,
    pub credential_id: String,
    pub counter: u64,
    pub amount_minor: u64,
    /// ISO 4217 numeric.
    pub currency: u16,
}

impl QueuedPayment {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "terminal_certificate": b64::encode(&self.terminal_certificate),
            "request": b64::encode(&self.request),
            "approval": b64::encode(&self.approval),
            "countersignature": b64::encode(&self.countersignature),
        })
    }
}

/// What settlement did with one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettlementOutcome {
    /// Settled, by this submission (`first_time`) or an earlier one; the receipt is
    /// verified with the pinned keys.
    Settled { receipt: Vec<u8>, transfer_id: String, settled_at: i64, first_time: bool },
    /// Refused for good, with the server's reason (`double-spend`, `credential-revoked`, …).
    Refused { reason: String, detail: String },
}

/// A settled payment and its verified receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledPayment {
    pub payment: QueuedPayment,
    /// The tagged COSE_Sign1 receipt.
    pub receipt: Vec<u8>,
    pub transfer_id: String,
    pub settled_at: i64,
}

/// What one [`OfflinePos::settle`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Requests sent, one per batch.
    pub batches: usize,
    pub settled: Vec<SettledPayment>,
    /// Payments the server refused, with its reason.
    pub refused: Vec<(QueuedPayment, String)>,
}

#[derive(Debug, Deserialize)]
struct SettlementResults {
    results: Vec<SettlementResult>,
}

#[derive(Debug, Deserialize)]
struct SettlementResult {
    payment_id: Option<String>,
    status: String,
    reason: Option<String>,
    detail: Option<String>,
    receipt: Option<String>,
    transfer_id: Option<String>,
}

/// A merchant's terminal taking payments offline: its enrolled identity key, the
/// server's certificate of that key, the server keys it pinned, and a client with its
/// terminal API key for settling.
pub struct OfflinePos {
    client: VouchClient,
    identity: DeviceIdentity,
    certificate: vouch_proto::offline::Signed<TerminalCertificate>,
    pinned_keys: JwkSet,
    clock: Arc<dyn Clock>,
    rng: SystemRandom,
    queue: Vec<QueuedPayment>,
    settled: Vec<SettledPayment>,
    /// What this terminal took under each credential, settled or not, and the
    /// counters it took.
    taken_minor: HashMap<Id, u64>,
    counters: HashSet<(Id, u64)>,
}

impl std::fmt::Debug for OfflinePos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfflinePos")
            .field("server", &self.client.base_url())
            .field("terminal_id", &self.terminal_id())
            .field("queued", &self.queue.len())
            .field("settled", &self.settled.len())
            .finish_non_exhaustive()
    }
}

impl OfflinePos {
    /// A terminal holding `certificate` (the tagged COSE_Sign1 from
    /// [`VouchClient::terminal_certificate`]), which must verify with `pinned_keys`, be
    /// unexpired and certify `identity`'s key. `client` carries the terminal API key.
    pub fn new(
        client: VouchClient,
        identity: DeviceIdentity,
        certificate: &[u8],
        pinned_keys: JwkSet,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, DeviceError> {
        let certificate = verify_terminal_certificate(certificate, |kid| pinned_keys.cose_key(kid), clock.now_unix())?;
        if certificate.value().terminal_key != identity.key().verifying_key() {
            return Err(DeviceError::Untrusted("the terminal certificate is for another key".into()));
        }
        Ok(OfflinePos {
            client,
            identity,
            certificate,
            pinned_keys,
            clock,
            rng: SystemRandom::new(),
            queue: Vec::new(),
            settled: Vec::new(),
            taken_minor: HashMap::new(),
            counters: HashSet::new(),
        })
    }

    pub fn certificate(&self) -> &TerminalCertificate {
        self.certificate.value()
    }

    /// The terminal's device id.
    pub fn terminal_id(&self) -> String {
        server_id("dev", &self.certificate.value().terminal_id)
    }

    pub fn merchant_id(&self) -> String {
        server_id("mch", &self.certificate.value().merchant_id)
    }

    /// Payments approved and countersigned, not yet settled or refused.
    pub fn queue(&self) -> &[QueuedPayment] {
        &self.queue
    }

    /// Payments settled, each with its verified receipt.
    pub fn settled(&self) -> &[SettledPayment] {
        &self.settled
    }

    /// Asks for `amount_minor` of `currency` (ISO 4217 alphabetic): a request with a
    /// fresh random nonce, signed now, with the certificate that vouches for it.
    pub fn offer(&self, amount_minor: u64, currency: &str) -> Result<PendingSale, DeviceError> {
        let Some(currency) = currency_numeric(currency) else {
            return Err(refused(OfflineRefusal::UnsupportedCurrency, format!("{currency} has no known numeric code")));
        };
        let now = self.clock.now_unix();
        let cert = self.certificate.value();
        if now > cert.not_after {
            return Err(DeviceError::Proto(ProtoError::OfflineRefused {
                check: vouch_proto::offline::OfflineCheck::TerminalCertificateExpired,
                detail: format!("the terminal certificate expired at {}", cert.not_after),
            }));
        }
        let request = PaymentRequest {
            merchant_id: cert.merchant_id,
            terminal_id: cert.terminal_id,
            amount_minor,
            currency,
            nonce: random_bytes::<NONCE_BYTES>(&self.rng)?,
            time: now,
        }
        .sign(None, self.identity.key(), &self.rng)?;
        let leg_a = PaymentOffer::new(&self.certificate, &request).to_bytes();
        Ok(PendingSale { request, leg_a })
    }

    /// Checks leg (b) for `sale`: the credential signed by a pinned server key, the
    /// approval signed with its key for exactly this request, under this credential,
    /// within its validity, currency and what is left of its limit after what this
    /// terminal took under it, with a counter this terminal has not seen under it. Then
    /// countersigns (c) and queues the payment.
    pub fn accept(&mut self, sale: &PendingSale, leg_b: &[u8]) -> Result<QueuedPayment, DeviceError> {
        if self.queue.len() >= QUEUE_MAX {
            return Err(refused(OfflineRefusal::QueueFull, format!("{QUEUE_MAX} payments wait for settlement")));
        }
        let reply = ApprovalReply::parse(leg_b)?;
        let credential = verify_credential(reply.credential(), |kid| self.pinned_keys.cose_key(kid))?;
        let c = credential.value();
        let taken = self.taken_minor.get(&c.credential_id).copied().unwrap_or(0);
        let approval = verify_approval(reply.approval(), &sale.request, c, c.limit_minor.saturating_sub(taken))?;
        let counter = approval.value().counter;
        if self.counters.contains(&(c.credential_id, counter)) {
            return Err(refused(
                OfflineRefusal::CounterReused,
                format!("counter {counter} of credential {} was taken before", server_id("ocr", &c.credential_id)),
            ));
        }
        let countersignature = MerchantCountersignature {
            digest: countersignature_digest(sale.request.bytes(), approval.bytes()),
            time: self.clock.now_unix(),
        }
        .sign(None, self.identity.key(), &self.rng)?;
        let amount_minor = sale.request.value().amount_minor;
        let payment = QueuedPayment {
            payment_id: payment_id_text(&payment_id(approval.bytes())),
            terminal_certificate: self.certificate.bytes().to_vec(),
            request: sale.request.bytes().to_vec(),
            approval: approval.bytes().to_vec(),
            countersignature: countersignature.bytes().to_vec(),
            credential_id: server_id("ocr", &c.credential_id),
            counter,
            amount_minor,
            currency: sale.request.value().currency,
        };
        self.counters.insert((c.credential_id, counter));
        self.taken_minor.insert(c.credential_id, taken.saturating_add(amount_minor));
        self.queue.push(payment.clone());
        Ok(payment)
    }

    /// Settles the queue in batches of at most [`SETTLEMENT_BATCH_MAX`], oldest first.
    /// A batch leaves the queue only once its answer has arrived and checked out; if it
    /// is lost, calling this again sends the same batch, and the server answers each
    /// payment it settled before with the same receipt.
    pub async fn settle(&mut self) -> Result<Settlement, DeviceError> {
        let mut done = Settlement::default();
        while !self.queue.is_empty() {
            let batch_len = self.queue.len().min(SETTLEMENT_BATCH_MAX);
            let outcomes = self.submit(&self.queue[..batch_len]).await?;
            done.batches += 1;
            let batch: Vec<QueuedPayment> = self.queue.drain(..batch_len).collect();
            for (payment, outcome) in batch.into_iter().zip(outcomes) {
                match outcome {
                    SettlementOutcome::Settled { receipt, transfer_id, settled_at, .. } => {
                        let settled = SettledPayment { payment, receipt, transfer_id, settled_at };
                        self.settled.push(settled.clone());
                        done.settled.push(settled);
                    }
                    SettlementOutcome::Refused { reason, .. } => done.refused.push((payment, reason)),
                }
            }
        }
        Ok(done)
    }

    /// Sends `payments` (1 to [`SETTLEMENT_BATCH_MAX`]) for settlement as they are, and
    /// checks each answer: the receipt of a settled payment must verify with a pinned
    /// key (or, for a key published since, one the server publishes now) and name the
    /// payment, its transfer and its amount. Sending the same payments again is safe.
    pub async fn submit(&self, payments: &[QueuedPayment]) -> Result<Vec<SettlementOutcome>, DeviceError> {
        let body = json!({ "payments": payments.iter().map(QueuedPayment::to_json).collect::<Vec<_>>() });
        let reply = self.client.execute(Method::POST, SETTLEMENT_PATH, Auth::ApiKey, Body::Json(&body)).await?;
        let answer: SettlementResults = reply.json()?;
        if answer.results.len() != payments.len() {
            return Err(DeviceError::Untrusted(format!(
                "{} settlement results for {} payments",
                answer.results.len(),
                payments.len()
            )));
        }
        let mut published = None;
        let mut outcomes = Vec::with_capacity(payments.len());
        for (payment, result) in payments.iter().zip(answer.results) {
            if result.payment_id.as_deref() != Some(payment.payment_id.as_str()) {
                return Err(DeviceError::Untrusted(format!(
                    "a settlement result answers another payment than {}",
                    payment.payment_id
                )));
            }
            let first_time = match result.status.as_str() {
                "settled" => true,
                "already_settled" => false,
                "refused" => {
                    outcomes.push(SettlementOutcome::Refused {
                        reason: result.reason.unwrap_or_default(),
                        detail: result.detail.unwrap_or_default(),
                    });
                    continue;
                }
                other => return Err(DeviceError::Untrusted(format!("settlement status {other:?}"))),
            };
            let receipt = b64::decode("receipt", result.receipt.as_deref().unwrap_or_default())?;
            let signed = match verify_receipt(&receipt, |kid| self.pinned_keys.cose_key(kid)) {
                Err(ProtoError::UnknownSigningKey { .. }) => {
                    let keys: &JwkSet = match &published {
                        Some(keys) => keys,
                        None => published.insert(self.client.jwks().await?),
                    };
                    verify_receipt(&receipt, |kid| keys.cose_key(kid))?
                }
                other => other?,
            };
            let transfer_id = result.transfer_id.unwrap_or_default();
            check_receipt(signed.value(), payment, &transfer_id)?;
            outcomes.push(SettlementOutcome::Settled {
                settled_at: signed.value().settled_at,
                receipt,
                transfer_id,
                first_time,
            });
        }
        Ok(outcomes)
    }
}

/// A receipt names the payment, the transfer the answer names, and the amount and
/// currency asked for.
fn check_receipt(receipt: &SignedReceipt, payment: &QueuedPayment, transfer_id: &str) -> Result<(), DeviceError> {
    if payment_id_text(&receipt.payment_id) != payment.payment_id
        || payment_id_text(&receipt.transfer_id) != transfer_id
        || receipt.amount_minor != payment.amount_minor
        || receipt.currency != payment.currency
    {
        return Err(DeviceError::Untrusted(format!(
            "the receipt of payment {} names another payment",
            payment.payment_id
        )));
    }
    Ok(())
}
