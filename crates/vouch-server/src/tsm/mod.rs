//! tsm: the trusted service manager. A phone has two secure elements: a crypto SE that
//! holds keys and the user's biometric template, and an app SE that runs the payment
//! application. Vouch provisions the first, signs what the second runs, and relays the
//! phone's encrypted messages to the service provider (a bank, a processor) they name,
//! re-encrypted for that provider alone.
//!
//! `issuers` registers device makers' CA certificates and checks the X.509 chains the
//! secure elements present against them; `provision` gives a crypto SE its device key
//! (HPKE base mode to the SE's certified key, inside a JWS signed by the server's key, so
//! the SE can tell who sent it) and its payment certificate; `apps` signs payment
//! application manifests and delivers one sealed to an app SE's certified key;
//! `messages` takes what an SMS gateway forwards, opens it under the device key, refuses
//! replays and queues it re-encrypted for its provider; `outbox` delivers the queue with
//! retries, backoff and a dead-letter state. The wire types and their checks live in
//! `vouch_proto::tsm`. No plaintext message is stored or logged: the outbox holds only
//! what is sealed to the provider.

mod apps;
mod issuers;
mod messages;
mod outbox;
mod provision;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_proto::ProtoError;
use vouch_proto::hpke::HpkePublicKey;
use vouch_proto::tsm::{DeviceKey, PaymentCertificateClaims};
use vouch_store::{Store, StoreError};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::keys::{Expiring, MasterKey, SealingKey, VerifiedCache};

pub use apps::{AppDelivery, AppDeliveryRequest, ManifestView, NewManifest};
pub use issuers::{IssuerView, NewIssuer, NewRevocation, RevocationView};
pub use messages::{GatewayMessage, MessageAccepted};
pub use outbox::{DeliveryRound, IDEMPOTENCY_KEY, OutboxPage, OutboxView, deliver_due, spawn_delivery};
pub use provision::{ProvisionRequest, Provisioned};

/// The operation a phone's ticket must allow to be provisioned and to get apps.
const TSM_OPERATION: &str = "tsm";
const DEVICE_KEY_SEAL_LABEL: &str = "vouch tsm device-key seal v1";
const DEVICE_KEY_SEAL_AAD: &[u8] = b"vouch tsm device key v1\0";
const PAYMENT_CERTIFICATE_CACHE_ENTRIES_MAX: usize = 100_000;
/// How long a provider's key is used from memory before it is read again.
const PROVIDER_KEY_TTL: Duration = Duration::from_secs(60);
const PROVIDER_KEYS_MAX: usize = 10_000;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(issuers::register_issuer, issuers::list_issuers))
        .routes(routes!(issuers::revoke_certificate))
        .routes(routes!(provision::provision_device))
        .routes(routes!(apps::sign_manifest, apps::list_manifests))
        .routes(routes!(apps::deliver_app))
        .routes(routes!(messages::accept_message))
        .routes(routes!(outbox::list_outbox))
        .routes(routes!(outbox::retry_message))
}

/// What the TSM keeps beside the store: the key that seals device keys at rest (derived
/// from the master key, so every instance given the same master key opens them), the
/// payment certificates whose signature verified (a phone sends the same one with each
/// message), the providers' keys (read once a minute, not once a message), the HTTP client that delivers to providers, and the signal that wakes the delivery
/// worker when a message is queued.
pub struct TsmState {
    device_key_seal: SealingKey,
    payment_certificates: VerifiedCache<PaymentCertificateClaims>,
    provider_keys: Mutex<HashMap<String, (Instant, HpkePublicKey)>>,
    http: reqwest::Client,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for TsmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TsmState").finish_non_exhaustive()
    }
}

impl TsmState {
    pub fn new(master: &MasterKey, delivery_timeout: Duration) -> Result<Self, reqwest::Error> {
        let device_key_seal = SealingKey::new(&master.derive(DEVICE_KEY_SEAL_LABEL));
        let http = reqwest::Client::builder()
            .timeout(delivery_timeout)
            .connect_timeout(delivery_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(TsmState {
            device_key_seal,
            payment_certificates: VerifiedCache::new(PAYMENT_CERTIFICATE_CACHE_ENTRIES_MAX),
            provider_keys: Mutex::new(HashMap::new()),
            http,
            wake: tokio::sync::Notify::new(),
        })
    }

    /// The HPKE key of the service provider `provider_id`; `None` when none is registered.
    async fn provider_key(&self, store: &Store, provider_id: &str) -> ApiResult<Option<HpkePublicKey>> {
        let lock = || self.provider_keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((read_at, key)) = lock().get(provider_id)
            && read_at.elapsed() < PROVIDER_KEY_TTL
        {
            return Ok(Some(key.clone()));
        }
        let provider = match store.service_provider(provider_id).await {
            Ok(provider) => provider,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let jwk: vouch_proto::jwk::Jwk = serde_json::from_str(&provider.public_jwk).map_err(ApiError::internal)?;
        let key = jwk.verifying_key().map_err(ApiError::internal)?;
        let key = HpkePublicKey::from_sec1(key.sec1()).map_err(ApiError::internal)?;
        let mut keys = lock();
        if keys.len() >= PROVIDER_KEYS_MAX {
            keys.clear();
        }
        keys.insert(provider.id, (Instant::now(), key.clone()));
        Ok(Some(key))
    }

    /// Sealed bound to the device and its registration, so a sealed key copied to
    /// another row does not open.
    fn seal_device_key(
        &self,
        device_id: &str,
        registration_id: &str,
        key: &DeviceKey,
        rng: &SystemRandom,
    ) -> ApiResult<Vec<u8>> {
        self.device_key_seal
            .seal(&device_key_aad(device_id, registration_id), key.as_bytes(), rng)
            .map_err(ApiError::internal)
    }

    fn unseal_device_key(&self, device_id: &str, registration_id: &str, sealed: &[u8]) -> ApiResult<DeviceKey> {
        let fail = || ApiError::internal(format!("the stored key of device {device_id} does not open"));
        let key = self.device_key_seal.open(&device_key_aad(device_id, registration_id), sealed).ok_or_else(fail)?;
        DeviceKey::from_bytes(&key).map_err(|_| fail())
    }
}

impl Expiring for PaymentCertificateClaims {
    fn exp(&self) -> i64 {
        self.exp
    }
}

fn device_key_aad(device_id: &str, registration_id: &str) -> Vec<u8> {
    [DEVICE_KEY_SEAL_AAD, device_id.as_bytes(), b"\0", registration_id.as_bytes()].concat()
}

/// A refusal by the protocol checks as a 422 naming the check; anything else the
/// server's own failure.
fn refused(e: ProtoError) -> ApiError {
    match e {
        ProtoError::TsmRefused { why, detail } => ApiError::unprocessable(why.as_str(), detail),
        ProtoError::CertificateRefused { why, detail } => ApiError::unprocessable(why.as_str(), detail),
        other => ApiError::internal(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TsmState {
        let master = MasterKey::from_hex(&"ab".repeat(32)).unwrap();
        TsmState::new(&master, Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn a_sealed_device_key_opens_only_for_its_device_and_registration() {
        let rng = SystemRandom::new();
        let tsm = state();
        let key = DeviceKey::generate(&rng).unwrap();
        let sealed = tsm.seal_device_key("dev_1", "reg_1", &key, &rng).unwrap();
        assert_eq!(tsm.unseal_device_key("dev_1", "reg_1", &sealed).unwrap().as_bytes(), key.as_bytes());
        assert!(tsm.unseal_device_key("dev_2", "reg_1", &sealed).is_err());
        assert!(tsm.unseal_device_key("dev_1", "reg_2", &sealed).is_err());
        assert!(tsm.unseal_device_key("dev_1", "reg_1", &sealed[..20]).is_err());
        let other = MasterKey::from_hex(&"cd".repeat(32)).unwrap();
        let other = TsmState::new(&other, Duration::from_secs(1)).unwrap();
        assert!(other.unseal_device_key("dev_1", "reg_1", &sealed).is_err());
    }
}
