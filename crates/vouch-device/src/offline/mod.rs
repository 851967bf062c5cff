//! Offline payments on the device side (seed 001, second part): the consumer's
//! [`OfflineWallet`] and the merchant's [`OfflinePos`], which complete a purchase with
//! neither of them online, and settle it later.
//!
//! While online, the phone obtains an offline credential over its DPoP-bound session
//! and the terminal holds a certificate of its key; both pin the server's keys (the
//! JWK Set). Offline, by sound ([`sound`]):
//!
//! 1. POS -> phone, leg (a): the terminal certificate and a payment request with a fresh
//!    random nonce ([`vouch_proto::offline::PaymentOffer`]);
//! 2. the phone checks the certificate with its pinned server key and the request with
//!    the certified key, shows the merchant's name and the amount, and on approval signs
//!    leg (b) under its next counter;
//! 3. phone -> POS, leg (b): the approval and the credential
//!    ([`vouch_proto::offline::ApprovalReply`]); the POS checks the approval against the
//!    credential, countersigns (c) and queues the payment.
//!
//! Back online, the POS settles its queue in batches (`POST /v1/offline-payments`) and
//! the phone syncs (`POST /v1/offline/sync`): each gets the server's signed receipts,
//! which it verifies with the pinned keys, and the phone a refreshed credential.

mod pos;
pub mod sound;
mod wallet;

use vouch_proto::offline::Digest;

use vouch_proto::hex;

pub use pos::{OfflinePos, PendingSale, QueuedPayment, SettledPayment, Settlement, SettlementOutcome};
pub use wallet::{ApprovedPayment, ClosedCredential, OfflineWallet, PaymentPrompt, PhoneReceipt, SyncReport};

pub const CREDENTIALS_PATH: &str = "/v1/offline/credentials";
pub const SYNC_PATH: &str = "/v1/offline/sync";
pub const SETTLEMENT_PATH: &str = "/v1/offline-payments";
/// Most payments the server settles in one request.
pub const SETTLEMENT_BATCH_MAX: usize = 1_000;

/// Why a wallet or a POS could not take a step with what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OfflineRefusal {
    /// The wallet holds no credential to pay under.
    NoCredential,
    /// The wallet holds a credential already: sync to close it before obtaining another.
    CredentialHeld,
    /// The POS has taken a payment under this credential and counter before: the second
    /// would be refused at settlement as a double spend.
    CounterReused,
    /// A currency with no ISO 4217 numeric code known here.
    UnsupportedCurrency,
    /// The POS holds as many unsettled payments as it may: settle first.
    QueueFull,
}

impl OfflineRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            OfflineRefusal::NoCredential => "no-credential",
            OfflineRefusal::CredentialHeld => "credential-held",
            OfflineRefusal::CounterReused => "counter-reused",
            OfflineRefusal::UnsupportedCurrency => "unsupported-currency",
            OfflineRefusal::QueueFull => "queue-full",
        }
    }
}

impl std::fmt::Display for OfflineRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn refused(refusal: OfflineRefusal, detail: impl ToString) -> crate::DeviceError {
    crate::DeviceError::Offline { refusal, detail: detail.to_string() }
}

/// A server id from the UUID bytes a wire type carries: `prefix_<32 hex digits>`.
fn server_id(prefix: &str, bytes: &[u8]) -> String {
    format!("{prefix}_{}", hex::encode(bytes))
}

/// A payment id as the server names it: the hex of SHA-256 of the approval's bytes.
fn payment_id_text(payment_id: &Digest) -> String {
    hex::encode(payment_id)
}
