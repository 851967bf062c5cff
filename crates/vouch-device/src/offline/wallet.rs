//! The consumer's phone: obtains offline credentials, approves payment requests that
//! check out against its pinned server keys, and syncs its receipts.

use serde::{Deserialize, Serialize};
use serde_json::json;
use vouch_proto::crypto::{SystemRandom, sha256};
use vouch_proto::offline::{
    ApprovalReply, ConsumerApproval, OfflineCheck, OfflineCredential, PaymentOffer, PaymentRequest, Signed, WireType,
    currency_alpha, currency_numeric, payment_id, verify_credential, verify_payment_request, verify_receipt,
    verify_terminal_certificate,
};
use vouch_proto::{JwkSet, ProtoError, b64};

use super::{CREDENTIALS_PATH, OfflineRefusal, SYNC_PATH, payment_id_text, refused, server_id};
use crate::token::Method;
use crate::{DeviceError, TokenSession};

/// Most answers one sync reads (500 receipts each), so a sync always ends; what is
/// left is read by the next one, from the cursor.
const SYNC_PAGES_MAX: usize = 200;
/// Why a sync would not close the credential held: the wallet can no longer pay under
/// it, so it drops it.
const CREDENTIAL_GONE: [&str; 3] = ["credential-revoked", "credential-closed", "unknown-credential"];

/// The answer to `POST /v1/offline/credentials`, and a refreshed credential in a sync.
#[derive(Debug, Deserialize)]
struct IssuedCredential {
    credential: String,
    credential_id: String,
    limit_minor: i64,
    currency: String,
    counter_start: i64,
    not_after: i64,
}

#[derive(Debug, Serialize)]
struct SyncRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    credential_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    counter_next: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spent_minor: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    receipts_after: Option<&'a str>,
}

#[derive(Debug, Deserialize)]
struct SyncResponse {
    receipts: Vec<SyncedReceipt>,
    next_cursor: Option<String>,
    more: bool,
    credential: Option<IssuedCredential>,
    closed: Option<ClosedCredential>,
}

#[derive(Debug, Deserialize)]
struct SyncedReceipt {
    payment_id: String,
    transfer_id: String,
    receipt: String,
    credential_id: String,
    counter: u64,
    amount_minor: u64,
    currency: String,
    merchant_id: String,
    settled_at: i64,
}

/// A credential closed by a sync: what may still settle under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedCredential {
    pub credential_id: String,
    /// Lowered to what the phone approved or the server settled, whichever is more.
    pub limit_minor: u64,
    /// Settlement refuses counters from here on.
    pub counter_end: u64,
    pub settled_minor: u64,
}

/// The credential the wallet pays under, with what it has spent of it.
#[derive(Debug, Clone)]
struct HeldCredential {
    signed: Signed<OfflineCredential>,
    id: String,
    /// The next counter to approve with; every one below is spent.
    next_counter: u64,
    spent_minor: u64,
}

impl HeldCredential {
    fn remaining_minor(&self) -> u64 {
        self.signed.value().limit_minor.saturating_sub(self.spent_minor)
    }
}

/// A payment request that checked out, as the consumer is shown it before approving.
#[derive(Debug, Clone)]
pub struct PaymentPrompt {
    /// The name the server certified for the terminal's merchant.
    pub merchant_name: String,
    pub merchant_id: String,
    pub terminal_id: String,
    pub amount_minor: u64,
    /// ISO 4217 alphabetic code, e.g. `EUR`.
    pub currency: String,
    request: Signed<PaymentRequest>,
}

/// The server's receipt for a payment, verified with a pinned key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneReceipt {
    /// The tagged COSE_Sign1, the same bytes the POS got.
    pub receipt: Vec<u8>,
    pub transfer_id: String,
    pub merchant_id: String,
    pub settled_at: i64,
}

/// A payment the phone approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovedPayment {
    /// Hex SHA-256 of the signed approval, as the server names the payment.
    pub payment_id: String,
    pub credential_id: String,
    pub counter: u64,
    pub amount_minor: u64,
    pub currency: String,
    pub merchant_name: String,
    pub merchant_id: String,
    pub approved_at: i64,
    /// Set by the sync that brought its receipt.
    pub receipt: Option<PhoneReceipt>,
}

/// What one sync brought.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Receipts not seen before, each verified.
    pub new_receipts: usize,
    /// Of those, the ones for payments this wallet approved.
    pub matched: usize,
    /// Payment ids of settled payments this wallet has no record of (approved before it
    /// was restored from a backup, say).
    pub unmatched: Vec<String>,
    /// The credential the sync closed.
    pub closed: Option<ClosedCredential>,
    /// The refreshed credential the wallet now pays under; `None` when nothing was left.
    pub refreshed: Option<String>,
    /// The server's reason for not closing the credential the wallet held
    /// (`credential-revoked`, …): the wallet dropped it.
    pub dropped: Option<String>,
}

/// A consumer's phone that pays offline. Its session is the phone's DPoP-bound token
/// session; `pinned_keys` the server keys it checks credentials, terminal certificates
/// and receipts against, offline as online.
#[derive(Debug)]
pub struct OfflineWallet {
    session: TokenSession,
    pinned_keys: JwkSet,
    rng: SystemRandom,
    credential: Option<HeldCredential>,
    approved: Vec<ApprovedPayment>,
    unmatched: Vec<String>,
    receipts_cursor: Option<String>,
}

impl OfflineWallet {
    pub fn new(session: TokenSession, pinned_keys: JwkSet) -> Self {
        OfflineWallet {
            session,
            pinned_keys,
            rng: SystemRandom::new(),
            credential: None,
            approved: Vec::new(),
            unmatched: Vec::new(),
            receipts_cursor: None,
        }
    }

    /// Pins the server keys the session's server publishes now, as a phone does while
    /// online.
    pub async fn pinning_published_keys(session: TokenSession) -> Result<Self, DeviceError> {
        let keys = session.client().jwks().await?;
        Ok(Self::new(session, keys))
    }

    pub fn session(&self) -> &TokenSession {
        &self.session
    }

    pub fn pinned_keys(&self) -> &JwkSet {
        &self.pinned_keys
    }

    /// Pins `keys` too; keys pinned under the same id stay as they were.
    pub fn pin_keys(&mut self, keys: JwkSet) {
        self.pinned_keys.pin(keys);
    }

    /// The credential the wallet pays under.
    pub fn credential(&self) -> Option<&OfflineCredential> {
        self.credential.as_ref().map(|held| held.signed.value())
    }

    pub fn credential_id(&self) -> Option<&str> {
        self.credential.as_ref().map(|held| held.id.as_str())
    }

    /// The next counter the wallet approves with. A phone persists it after each
    /// approval and restores it with [`OfflineWallet::restore_counter`].
    pub fn next_counter(&self) -> Option<u64> {
        self.credential.as_ref().map(|held| held.next_counter)
    }

    /// What is left of the credential's limit.
    pub fn remaining_minor(&self) -> Option<u64> {
        self.credential.as_ref().map(HeldCredential::remaining_minor)
    }

    pub fn approved(&self) -> &[ApprovedPayment] {
        &self.approved
    }

    /// Settled payments the wallet had no record of, as syncs reported them.
    pub fn unmatched_receipts(&self) -> &[String] {
        &self.unmatched
    }

    /// Where the next sync reads receipts from; a phone persists it with the counter.
    pub fn receipts_cursor(&self) -> Option<&str> {
        self.receipts_cursor.as_deref()
    }

    /// Continues counting from `next_counter`, as a phone does after a restart with the
    /// value it persisted. A value below one already approved with reuses that counter:
    /// settlement refuses the second payment as a double spend and revokes the credential.
    pub fn restore_counter(&mut self, next_counter: u64) -> Result<(), DeviceError> {
        let held = self.credential.as_mut().ok_or_else(|| refused(OfflineRefusal::NoCredential, "no credential"))?;
        let start = held.signed.value().counter_start;
        if next_counter < start {
            return Err(check_failed(
                OfflineCheck::CounterBelowStart,
                format!("counter {next_counter}, the credential starts at {start}"),
            ));
        }
        held.next_counter = next_counter;
        Ok(())
    }

    /// Obtains a credential of `limit_minor` in `currency` (ISO 4217 alphabetic) while
    /// online; the server moves the limit from the consumer's funding account to their
    /// offline reserve. The credential is checked against the pinned keys before it is
    /// held. Refusals (`insufficient-funds`, `risk-too-high`, …) are
    /// [`DeviceError::Problem`].
    pub async fn obtain_credential(
        &mut self,
        currency: &str,
        limit_minor: i64,
    ) -> Result<&OfflineCredential, DeviceError> {
        if let Some(held) = &self.credential {
            return Err(refused(OfflineRefusal::CredentialHeld, format!("holds {}; sync to close it first", held.id)));
        }
        let body = json!({ "currency": currency, "limit_minor": limit_minor });
        let issued: IssuedCredential = self.session.request(Method::POST, CREDENTIALS_PATH, Some(&body)).await?;
        let held = self.check_issued(issued, 0).await?;
        Ok(self.credential.insert(held).signed.value())
    }

    /// Checks leg (a): the terminal certificate against the pinned server keys and
    /// unexpired now, the request signed by the certified key for its merchant and
    /// terminal, in the credential's currency and within what is left of its limit,
    /// while the credential is valid. What passes is shown to the consumer.
    pub fn review(&self, leg_a: &[u8]) -> Result<PaymentPrompt, DeviceError> {
        let held = self.held()?;
        let now = self.session.clock().now_unix();
        let offer = PaymentOffer::parse(leg_a)?;
        let certificate = verify_terminal_certificate(offer.certificate(), |kid| self.pinned_keys.cose_key(kid), now)?;
        let request = verify_payment_request(offer.request(), certificate.value())?;
        check_payable(held, request.value(), now)?;
        let cert = certificate.value();
        Ok(PaymentPrompt {
            merchant_name: cert.merchant_name.clone(),
            merchant_id: server_id("mch", &cert.merchant_id),
            terminal_id: server_id("dev", &cert.terminal_id),
            amount_minor: request.value().amount_minor,
            currency: currency_text(request.value().currency),
            request,
        })
    }

    /// The consumer approved `prompt`: signs leg (b) under the next counter, which is
    /// used up whatever happens next, and returns the bytes to send. The checks of
    /// [`OfflineWallet::review`] are made again, since another approval may have spent
    /// the limit since.
    pub fn approve(&mut self, prompt: &PaymentPrompt) -> Result<Vec<u8>, DeviceError> {
        let now = self.session.clock().now_unix();
        let held = self.credential.as_mut().ok_or_else(|| refused(OfflineRefusal::NoCredential, "no credential"))?;
        check_payable(held, prompt.request.value(), now)?;
        let counter = held.next_counter;
        held.next_counter = counter
            .checked_add(1)
            .ok_or_else(|| check_failed(OfflineCheck::OverLimit, "the credential's counters are used up"))?;
        let approval = ConsumerApproval {
            request_hash: sha256(prompt.request.bytes()),
            credential_id: held.signed.value().credential_id,
            counter,
            time: now,
        }
        .sign(None, self.session.identity().key(), &self.rng)?;
        let amount_minor = prompt.request.value().amount_minor;
        held.spent_minor = held.spent_minor.saturating_add(amount_minor);
        self.approved.push(ApprovedPayment {
            payment_id: payment_id_text(&payment_id(approval.bytes())),
            credential_id: held.id.clone(),
            counter,
            amount_minor,
            currency: prompt.currency.clone(),
            merchant_name: prompt.merchant_name.clone(),
            merchant_id: prompt.merchant_id.clone(),
            approved_at: now,
            receipt: None,
        });
        Ok(ApprovalReply::new(&approval, &held.signed).to_bytes())
    }

    /// Back online: reads the receipts settled since the last sync and verifies each
    /// with the pinned keys, matching it to the payment it approved; and, holding a
    /// credential, closes it at its next counter and what was spent under it and adopts
    /// the refreshed one for the rest of the limit, checked like any credential. The
    /// credential is kept until an answer checks out, so a sync whose answer was lost is
    /// simply called again: the server answers the same close with the same refreshed
    /// credential. A credential the server will not close (revoked after a double spend,
    /// unknown to it) is dropped, and the receipts are read all the same.
    pub async fn sync(&mut self) -> Result<SyncReport, DeviceError> {
        let mut report = SyncReport::default();
        let first = match self.sync_page(true).await {
            Err(e) if matches!(e.problem_reason(), Some(reason) if CREDENTIAL_GONE.contains(&reason)) => {
                report.dropped = e.problem_reason().map(str::to_owned);
                self.credential = None;
                self.sync_page(false).await?
            }
            other => other?,
        };
        let mut page = first.0;
        if let Some(sent) = first.1 {
            let closed = page
                .closed
                .take()
                .ok_or_else(|| DeviceError::Untrusted("the sync did not say it closed the credential".into()))?;
            if closed.credential_id != sent.id
                || closed.counter_end != sent.next_counter
                || closed.limit_minor < sent.spent_minor
            {
                return Err(DeviceError::Untrusted("the sync closed the credential otherwise than asked".into()));
            }
            self.credential = None;
            if let Some(issued) = page.credential.take() {
                let held = self.check_issued(issued, sent.next_counter).await?;
                report.refreshed = Some(held.id.clone());
                self.credential = Some(held);
            }
            report.closed = Some(closed);
        }
        for _ in 0..SYNC_PAGES_MAX {
            self.take_receipts(&page.receipts, &mut report).await?;
            if let Some(cursor) = page.next_cursor.take() {
                self.receipts_cursor = Some(cursor);
            }
            if !page.more {
                break;
            }
            page = self.sync_page(false).await?.0;
        }
        Ok(report)
    }

    /// One sync request; with `close`, for the credential held. Also what it closed.
    async fn sync_page(&self, close: bool) -> Result<(SyncResponse, Option<HeldCredential>), DeviceError> {
        let held = self.credential.as_ref().filter(|_| close);
        let body = SyncRequest {
            credential_id: held.map(|h| h.id.as_str()),
            counter_next: held.map(|h| h.next_counter),
            spent_minor: held.map(|h| h.spent_minor),
            receipts_after: self.receipts_cursor.as_deref(),
        };
        let body = serde_json::to_value(&body).map_err(|e| DeviceError::Untrusted(e.to_string()))?;
        let page: SyncResponse = self.session.request(Method::POST, SYNC_PATH, Some(&body)).await?;
        Ok((page, held.cloned()))
    }

    async fn take_receipts(&mut self, receipts: &[SyncedReceipt], report: &mut SyncReport) -> Result<(), DeviceError> {
        for synced in receipts {
            let known = self.approved.iter().any(|p| p.payment_id == synced.payment_id && p.receipt.is_some())
                || self.unmatched.contains(&synced.payment_id);
            // An older cursor reads receipts again: they are dropped by payment id.
            if known {
                continue;
            }
            let receipt = self.check_receipt(synced).await?;
            report.new_receipts += 1;
            match self.approved.iter_mut().find(|p| p.payment_id == synced.payment_id) {
                Some(payment) => {
                    if payment.credential_id != synced.credential_id
                        || payment.counter != synced.counter
                        || payment.amount_minor != synced.amount_minor
                    {
                        return Err(DeviceError::Untrusted(format!(
                            "the receipt of payment {} names another credential, counter or amount than approved",
                            synced.payment_id
                        )));
                    }
                    payment.receipt = Some(receipt);
                    report.matched += 1;
                }
                None => {
                    self.unmatched.push(synced.payment_id.clone());
                    report.unmatched.push(synced.payment_id.clone());
                }
            }
        }
        Ok(())
    }

    /// A synced receipt, verified with the pinned keys and agreeing with the answer.
    async fn check_receipt(&mut self, synced: &SyncedReceipt) -> Result<PhoneReceipt, DeviceError> {
        let bytes = b64::decode("receipt", &synced.receipt)?;
        let signed = self.verify_online(|keys| verify_receipt(&bytes, |kid| keys.cose_key(kid))).await?;
        let r = signed.value();
        if payment_id_text(&r.payment_id) != synced.payment_id
            || payment_id_text(&r.transfer_id) != synced.transfer_id
            || r.amount_minor != synced.amount_minor
            || currency_numeric(&synced.currency) != Some(r.currency)
            || r.settled_at != synced.settled_at
        {
            return Err(DeviceError::Untrusted(format!(
                "the receipt of payment {} and the answer disagree",
                synced.payment_id
            )));
        }
        Ok(PhoneReceipt {
            receipt: bytes,
            transfer_id: synced.transfer_id.clone(),
            merchant_id: synced.merchant_id.clone(),
            settled_at: synced.settled_at,
        })
    }

    /// Checks an issued credential: signed by a pinned key, for this phone's key, as the
    /// answer describes it, with counters from `counter_floor` on.
    async fn check_issued(
        &mut self,
        issued: IssuedCredential,
        counter_floor: u64,
    ) -> Result<HeldCredential, DeviceError> {
        let bytes = b64::decode("credential", &issued.credential)?;
        let signed = self.verify_online(|keys| verify_credential(&bytes, |kid| keys.cose_key(kid))).await?;
        let c = signed.value();
        let untrusted = |what: &str| DeviceError::Untrusted(format!("the offline credential {what}"));
        if c.phone_key != self.session.identity().key().verifying_key() {
            return Err(untrusted("is for another key than this phone's"));
        }
        if server_id("ocr", &c.credential_id) != issued.credential_id
            || i64::try_from(c.limit_minor).ok() != Some(issued.limit_minor)
            || currency_numeric(&issued.currency) != Some(c.currency)
            || i64::try_from(c.counter_start).ok() != Some(issued.counter_start)
            || c.not_after != issued.not_after
        {
            return Err(untrusted("and the answer disagree"));
        }
        if c.counter_start < counter_floor {
            return Err(untrusted("reuses counters of the one it replaces"));
        }
        // Only expiry: a phone's clock a little behind the server's would find a fresh
        // credential not yet issued, and approvals wait for that anyway (`review`).
        if self.session.clock().now_unix() > c.not_after {
            return Err(untrusted("has expired already"));
        }
        Ok(HeldCredential { next_counter: c.counter_start, spent_minor: 0, id: issued.credential_id, signed })
    }

    /// Verifies a server-signed object with the pinned keys; online, a key published
    /// since they were pinned (a rotation) is fetched and pinned too.
    async fn verify_online<T>(&mut self, verify: impl Fn(&JwkSet) -> Result<T, ProtoError>) -> Result<T, DeviceError> {
        match verify(&self.pinned_keys) {
            Err(ProtoError::UnknownSigningKey { .. }) => {
                let published = self.session.client().jwks().await?;
                self.pin_keys(published);
                Ok(verify(&self.pinned_keys)?)
            }
            other => Ok(other?),
        }
    }

    fn held(&self) -> Result<&HeldCredential, DeviceError> {
        self.credential.as_ref().ok_or_else(|| refused(OfflineRefusal::NoCredential, "no credential"))
    }
}

/// Whether `request` can be paid under `held` at `now`.
fn check_payable(held: &HeldCredential, request: &PaymentRequest, now: i64) -> Result<(), DeviceError> {
    let credential = held.signed.value();
    credential.check_valid_at(now)?;
    if request.currency != credential.currency {
        return Err(check_failed(
            OfflineCheck::CurrencyMismatch,
            format!(
                "the request is in {}, the credential in {}",
                currency_text(request.currency),
                currency_text(credential.currency)
            ),
        ));
    }
    let remaining = held.remaining_minor();
    if request.amount_minor > remaining {
        return Err(check_failed(
            OfflineCheck::OverLimit,
            format!("amount {}, {remaining} left of the credential's limit", request.amount_minor),
        ));
    }
    Ok(())
}

fn check_failed(check: OfflineCheck, detail: impl Into<String>) -> DeviceError {
    DeviceError::Proto(ProtoError::OfflineRefused { check, detail: detail.into() })
}

/// The alphabetic code of a numeric currency, or the number where none is known.
fn currency_text(numeric: u16) -> String {
    currency_alpha(numeric).map_or_else(|| format!("{numeric:03}"), str::to_owned)
}
