//! The trusted service manager on the device side (seed 003). A phone has two secure
//! elements: a crypto SE ([`CryptoSe`]) that holds keys and its user's biometric
//! template, and an app SE ([`AppSe`]) that runs the payment application
//! ([`PaymentApp`]). Each carries an X.509 certificate of its HPKE key from its maker
//! ([`DeviceMaker`] makes them for tests, demos and benchmarks).
//!
//! 1. Provisioning: the phone sends the crypto SE's chain
//!    (`POST /v1/tsm/devices/{id}/provision`); Vouch answers with a JWS it signs, whose
//!    claims carry the device key and the payment certificate sealed with HPKE to the
//!    SE's certified key. The SE checks the signature against the server keys it
//!    pinned, that the bundle is for its device and its certificate, and opens it.
//! 2. The payment app: the phone fetches the latest release of an app
//!    (`POST /v1/tsm/devices/{id}/app`) sealed to the app SE's key: a second channel the
//!    crypto SE never sees. The app SE installs it only if Vouch signed the manifest and
//!    the code matches its hash and size, for this SE's profile, above any version
//!    installed.
//! 3. Messages: the payment app asks the crypto SE for the payment certificate, which
//!    it releases only after a biometric match, and has it seal a message (certificate,
//!    provider, payload) under the device key with the next counter. An SMS gateway
//!    passes the envelope to Vouch (`POST /v1/tsm/messages`), which re-encrypts it for
//!    the service provider and delivers it; the provider's side is [`ProviderReceiver`].
//!
//! The device key, the registration and the payment instrument live in the crypto SE
//! alone: the app SE and the payment app never hold them.

mod app;
mod client;
mod maker;
mod provider;
mod secure_element;
#[cfg(test)]
mod tests;

pub use app::PaymentApp;
pub use client::{
    AppDelivery, AppRecord, IssuerRecord, OutboxEntry, OutboxPage, OutboxQuery, OutboxStatus, ProvisionAnswer,
    RelayAccepted, RevocationRecord, ServiceProviderRecord,
};
pub use maker::{DeviceMaker, SeCertificate, SeIssuance, SeKind};
pub use provider::{ProviderReceiver, ReceivedMessage, ReceiverMode, ReceiverStats};
pub use secure_element::{AppSe, CryptoSe, InstalledApp};

pub const ISSUERS_PATH: &str = "/v1/tsm/issuers";
pub const APPS_PATH: &str = "/v1/tsm/apps";
pub const MESSAGES_PATH: &str = "/v1/tsm/messages";
pub const OUTBOX_PATH: &str = "/v1/tsm/outbox";

/// Why a secure element would not take a step with what it holds or was given. What
/// it was shown and found not authentic or not installable is [`crate::DeviceError::Proto`]
/// instead (a bad signature, an unknown key, a refused [`vouch_proto::tsm::TsmRefusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SeRefusal {
    /// A provisioning bundle signed for another device than the one the SE is in.
    WrongDevice,
    /// A provisioning bundle for another SE certificate than this SE's.
    WrongSe,
    /// A provisioning bundle the SE has accepted already, or older than the one it holds:
    /// taking it would roll the device key and its counter back.
    ProvisioningReplayed,
    /// The payment certificate in a bundle is not for the registration it came with.
    CertificateMismatch,
    /// The SE holds no device key yet.
    NotProvisioned,
    /// The biometric sample does not match the template.
    BiometricMismatch,
    /// A message whose payment certificate is not the one this SE holds.
    ForeignCertificate,
    /// An app delivery whose signed manifest names another manifest or app than the
    /// delivery does.
    DeliveryMismatch,
    /// No app of that id is installed.
    AppNotInstalled,
}

impl SeRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            SeRefusal::WrongDevice => "wrong-device",
            SeRefusal::WrongSe => "wrong-se",
            SeRefusal::ProvisioningReplayed => "provisioning-replayed",
            SeRefusal::CertificateMismatch => "certificate-mismatch",
            SeRefusal::NotProvisioned => "not-provisioned",
            SeRefusal::BiometricMismatch => "biometric-mismatch",
            SeRefusal::ForeignCertificate => "foreign-certificate",
            SeRefusal::DeliveryMismatch => "delivery-mismatch",
            SeRefusal::AppNotInstalled => "app-not-installed",
        }
    }
}

impl std::fmt::Display for SeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn refused(refusal: SeRefusal, detail: impl ToString) -> crate::DeviceError {
    crate::DeviceError::Se { refusal, detail: detail.to_string() }
}
