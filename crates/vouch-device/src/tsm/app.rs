//! The payment application, as it runs in the app SE. It holds no secret: for each
//! message it asks the crypto SE for the payment certificate, which the SE releases
//! only after a biometric match, and has the SE seal the message under the device key.

use vouch_proto::tsm::{AppManifest, MessageBody};

use super::CryptoSe;
use crate::DeviceError;

/// An installed release of a payment application ([`super::AppSe::payment_app`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentApp {
    manifest_id: String,
    app_id: String,
    version: u32,
}

impl PaymentApp {
    pub(super) fn new(manifest_id: &str, manifest: &AppManifest) -> Self {
        PaymentApp { manifest_id: manifest_id.to_owned(), app_id: manifest.app_id.clone(), version: manifest.version }
    }

    pub fn manifest_id(&self) -> &str {
        &self.manifest_id
    }

    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// A message of `payload` for the service provider `provider_id`, once the user
    /// presented `sample` to the crypto SE: the envelope an SMS gateway carries to
    /// Vouch. Nothing of it stays in the app.
    pub fn message(
        &self,
        crypto_se: &mut CryptoSe,
        sample: &[u8],
        provider_id: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, DeviceError> {
        let body = MessageBody {
            payment_certificate: crypto_se.release_payment_certificate(sample)?,
            provider_id: provider_id.to_owned(),
            payload: payload.to_vec(),
        };
        crypto_se.seal_message(&body)
    }
}
