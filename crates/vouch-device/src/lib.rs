//! The device SDK: an HTTP client for Vouch's API, device key handling, the tamper
//! monitoring component that answers attestation challenges (`attest`), the token
//! client through which a device uses its sessions (`token`), the card reader and POS
//! app that open an encrypted channel once the server has validated both (`session`), the
//! ISO 8583 client a payment switch uses towards Vouch's listener (`iso8583`), the
//! consumer's wallet and the payment terminal of temporary verification values (`dvv`),
//! the consumer's phone and the merchant's terminal that pay and are paid offline, with
//! the legs carried by sound (`offline`), a phone's crypto and app secure elements with
//! its payment app, and the service provider's receiver of relayed messages (`tsm`), and
//! simulators that behave like real devices so integrators can try every flow.
//!
//! It depends on the protocol core (`vouch-proto`) and never on the server crate.

pub mod attest;
mod client;
pub mod dvv;
mod error;
pub mod identity;
pub mod iso8583;
pub mod offline;
pub mod session;
pub mod sim;
pub mod token;
pub mod tsm;

pub use client::{
    AccountRecord, ApiKeyCreated, AttestationOutcome, AttestationRecord, AuditVerification, ConsumerDevice,
    ConsumerRecord, DeviceRecord, EnrolledDevice, EnrolmentNonce, IssuedTerminalCertificate, MerchantRecord,
    NewMerchant, PaymentAccountRecord, TerminalCreated, TicketVerification, TransferRecord, VouchClient,
};
pub use dvv::{PaymentTerminal, Wallet};
pub use error::DeviceError;
pub use identity::DeviceIdentity;
pub use offline::{OfflinePos, OfflineWallet};
pub use token::TokenSession;
