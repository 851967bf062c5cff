//! The device SDK: an HTTP client for Vouch's API, device key handling, and
//! simulators that behave like real devices so integrators can try every flow.
//!
//! It depends on the protocol core (`vouch-proto`) and never on the server crate.

mod client;
mod error;
pub mod identity;
pub mod sim;

pub use client::{
    ApiKeyCreated, AuditVerification, DeviceRecord, EnrolledDevice, EnrolmentNonce, MerchantRecord, VouchClient,
};
pub use error::DeviceError;
pub use identity::DeviceIdentity;
