//! Vouch's protocol core. Everything here is sans-IO: it takes bytes, a [`Clock`]
//! and a random source, and returns bytes or decisions. The server and the device
//! SDK both call it; neither the network, a database nor an async runtime appear here.

pub mod attest;
pub mod b64;
pub mod clock;
pub mod cose;
pub mod crypto;
pub mod dpop;
pub mod dvv;
pub mod enrol;
mod error;
pub mod hex;
pub mod hpke;
pub mod iso8583;
pub mod jwk;
pub mod jws;
pub mod jwt;
pub mod offline;
pub mod pem;
pub mod session;
pub mod tlv;
pub mod token;
pub mod tsm;
pub mod x509;

pub use clock::{Clock, FixedClock, SystemClock};
pub use crypto::{SigningKey, VerifyingKey};
pub use error::ProtoError;
pub use jwk::{Jwk, JwkSet};
