//! Device simulators. A simulated device enrols the way a real one does: it fetches a
//! nonce, signs the enrolment with its own key, and checks the credential it gets
//! against the server's published keys before trusting it. It attests the same way:
//! its [`TamperMonitor`] answers the server's commands, and it checks the ticket it
//! gets back before trusting it. The parties of an offline payment are set up the
//! same way: a certified terminal ([`offline_terminal`]) and a funded consumer phone
//! holding a credential ([`offline_phone`]), and run a purchase with both legs
//! carried by sound ([`offline_purchase`]). The TSM's parties likewise: a device
//! maker whose CA Vouch trusts ([`tsm_maker`]), a phone whose crypto SE is provisioned
//! and whose app SE runs the payment app ([`tsm_phone`]), a service provider receiving
//! relayed messages ([`tsm_provider`]) and the SMS gateway that passes messages on
//! ([`tsm_gateway`]).

use std::net::SocketAddr;
use std::sync::Arc;

use vouch_proto::attest::{TicketClaims, verify_ticket};
use vouch_proto::crypto::{SystemRandom, random_bytes};
use vouch_proto::enrol::{DEVICE_CREDENTIAL_TYP, DeviceCredentialClaims, DeviceKind, EnrolmentClaims};
use vouch_proto::hpke::HpkePrivateKey;
use vouch_proto::jws::UnverifiedJws;
use vouch_proto::tsm::AppManifest;
use vouch_proto::{Clock, JwkSet, jwt};
use zeroize::Zeroizing;

use crate::attest::{Challenge, SignedEvidence, SimulatedDeviceState, TamperMonitor};
use crate::offline::sound::{Heard, SoundChannel};
use crate::offline::{PaymentPrompt, QueuedPayment};
use crate::tsm::{
    AppSe, CryptoSe, DeviceMaker, IssuerRecord, PaymentApp, ProviderReceiver, SeKind, ServiceProviderRecord,
};
use crate::{
    AttestationOutcome, DeviceError, DeviceIdentity, EnrolledDevice, OfflinePos, OfflineWallet, TokenSession,
    VouchClient,
};

/// What a simulated device says about itself.
#[derive(Debug, Clone)]
pub struct DeviceProfile {
    pub kind: DeviceKind,
    pub model: String,
    pub firmware_version: String,
    pub merchant_id: String,
}

impl DeviceProfile {
    pub fn simulated(kind: DeviceKind, merchant_id: &str) -> Self {
        let model = match kind {
            DeviceKind::Reader => "VR-200 card reader",
            DeviceKind::Pos => "VouchPOS app",
            DeviceKind::Terminal => "VT-900 terminal",
            DeviceKind::Consumer => "wallet phone",
        };
        DeviceProfile { kind, model: model.into(), firmware_version: "1.4.2".into(), merchant_id: merchant_id.into() }
    }
}

/// Makes the enrolment proof for `profile` over a fresh server nonce.
pub async fn enrolment_proof(
    client: &VouchClient,
    identity: &DeviceIdentity,
    profile: &DeviceProfile,
    clock: &dyn Clock,
    rng: &SystemRandom,
) -> Result<String, DeviceError> {
    let nonce = client.enrolment_nonce().await?;
    let claims = EnrolmentClaims {
        nonce: nonce.nonce,
        kind: profile.kind,
        model: profile.model.clone(),
        firmware_version: profile.firmware_version.clone(),
        merchant_id: profile.merchant_id.clone(),
        iat: clock.now_unix(),
    };
    Ok(claims.sign(identity.key(), rng)?)
}

/// Enrols and checks the returned credential: signed by a published server key, for
/// this device's key, kind and merchant.
pub async fn enrol(
    client: &VouchClient,
    identity: &DeviceIdentity,
    profile: &DeviceProfile,
    clock: &dyn Clock,
    rng: &SystemRandom,
) -> Result<EnrolledDevice, DeviceError> {
    let proof = enrolment_proof(client, identity, profile, clock, rng).await?;
    let enrolled = client.enrol(&proof).await?;
    let jwks = client.jwks().await?;
    let claims = verify_device_credential(&enrolled.device_credential, &jwks, clock)?;
    if claims.cnf.jwk.thumbprint() != identity.jwk().thumbprint()
        || claims.kind != profile.kind
        || claims.merchant_id != profile.merchant_id
        || claims.sub != enrolled.device_id
    {
        return Err(DeviceError::Untrusted("device credential does not describe this device".into()));
    }
    Ok(enrolled)
}

/// Verifies a `device_credential` against a JWK Set and the clock.
pub fn verify_device_credential(
    credential: &str,
    jwks: &JwkSet,
    clock: &dyn Clock,
) -> Result<DeviceCredentialClaims, DeviceError> {
    let jws = UnverifiedJws::parse(credential)?;
    jws.header().expect_typ(DEVICE_CREDENTIAL_TYP)?;
    let kid = jws.header().kid.as_deref().ok_or_else(|| DeviceError::Untrusted("credential has no kid".into()))?;
    let key = jwks
        .find(kid)
        .ok_or_else(|| DeviceError::Untrusted(format!("credential signed by unpublished key {kid}")))?
        .verifying_key()?;
    let claims: DeviceCredentialClaims = jwt::decode(&jws, &key)?;
    jwt::check_expiry(claims.exp, clock.now_unix(), 0)?;
    Ok(claims)
}

/// One finished attestation: the challenge, the server's verdict, the ticket's claims as checked by the
/// device, and the evidence that earned them.
#[derive(Debug, Clone)]
pub struct Attestation {
    pub challenge: Challenge,
    pub outcome: AttestationOutcome,
    pub claims: TicketClaims,
    pub evidence: SignedEvidence,
}

/// Runs one attestation: asks for a challenge, lets `monitor` run its commands, submits
/// the signed evidence, and checks the returned ticket — approval or denial — against
/// the published keys, bound to this device and this attestation. On a verdict the
/// evidence becomes the monitor's previous state, whatever the verdict was.
pub async fn attest(
    client: &VouchClient,
    identity: &DeviceIdentity,
    device_id: &str,
    monitor: &mut TamperMonitor,
    clock: &dyn Clock,
    rng: &SystemRandom,
) -> Result<Attestation, DeviceError> {
    let request = monitor.challenge_request(device_id, identity.key(), clock, rng)?;
    let challenge = client.request_attestation(&request).await?;
    let evidence = monitor.evidence(&challenge, device_id, identity.key(), clock, rng)?;
    let outcome = client.submit_evidence(&challenge.attestation_id, &evidence.jws).await?;
    monitor.record_accepted(&evidence);

    let jwks = client.jwks().await?;
    let claims = verify_ticket_with(&outcome.ticket, &jwks, clock)?;
    if claims.sub != device_id || claims.cnf.jkt != identity.jwk().thumbprint() {
        return Err(DeviceError::Untrusted("ticket is not bound to this device".into()));
    }
    if claims.attestation_id != challenge.attestation_id
        || outcome.attestation_id != challenge.attestation_id
        || outcome.device_id != device_id
    {
        return Err(DeviceError::Untrusted("ticket answers another attestation".into()));
    }
    if claims.ear_status != outcome.status || claims.jti != outcome.ticket_id {
        return Err(DeviceError::Untrusted("ticket and verdict disagree".into()));
    }
    Ok(Attestation { challenge, outcome, claims, evidence })
}

/// Verifies a ticket's type, signature by a key of `jwks`, and expiry. Whether the
/// device is still active is the server's to say (`VouchClient::verify_ticket`).
pub fn verify_ticket_with(ticket: &str, jwks: &JwkSet, clock: &dyn Clock) -> Result<TicketClaims, DeviceError> {
    Ok(verify_ticket(ticket, |kid| jwks.find(kid).and_then(|jwk| jwk.verifying_key().ok()), clock)?)
}

/// A terminal of `merchant_id` ready to take payments offline: enrolled with a new key,
/// that key certified by the server, the server's keys pinned, and a new API key of
/// scope `terminal` to settle with. `admin` needs the admin scope.
pub async fn offline_terminal(
    admin: &VouchClient,
    merchant_id: &str,
    clock: Arc<dyn Clock>,
    rng: &SystemRandom,
) -> Result<OfflinePos, DeviceError> {
    let identity = DeviceIdentity::generate(rng)?;
    let profile = DeviceProfile::simulated(DeviceKind::Terminal, merchant_id);
    let enrolled = enrol(admin, &identity, &profile, &*clock, rng).await?;
    let certificate = admin.terminal_certificate(&enrolled.device_id).await?.bytes()?;
    let label = format!("offline terminal {}", enrolled.device_id);
    let api_key = admin.create_api_key(&["terminal"], &label).await?;
    let client = VouchClient::new(admin.base_url())?.with_api_key(&api_key.api_key);
    OfflinePos::new(client, identity, &certificate, admin.jwks().await?, clock)
}

/// What a simulated consumer is given to pay offline with.
#[derive(Debug, Clone)]
pub struct OfflineFunds {
    /// ISO 4217 alphabetic, e.g. `EUR`.
    pub currency: String,
    /// Put in the consumer's funding account.
    pub funded_minor: i64,
    /// Set aside for the phone's credential.
    pub limit_minor: i64,
}

/// A consumer's phone that pays offline, and who it belongs to.
#[derive(Debug)]
pub struct OfflinePhone {
    pub wallet: OfflineWallet,
    pub device_id: String,
    pub consumer_id: String,
    pub funding_account_id: String,
}

/// A consumer's phone ready to pay offline: enrolled under `merchant_id` and attested
/// clean, with a session open; the phone of a new consumer whose new funding account
/// holds `funds.funded_minor`; and holding a credential of `funds.limit_minor` checked
/// against the server keys it pinned. `admin` needs the admin scope, and the server the
/// clean reference values of the consumer phone model; the phone attests through
/// `device_client`, which holds no API key.
pub async fn offline_phone(
    admin: &VouchClient,
    device_client: &VouchClient,
    merchant_id: &str,
    funds: &OfflineFunds,
    clock: Arc<dyn Clock>,
    rng: &SystemRandom,
) -> Result<OfflinePhone, DeviceError> {
    let (device_id, session) = attested_phone(admin, device_client, merchant_id, clock, rng).await?;
    let consumer = admin.create_consumer("Simulated consumer").await?;
    admin.add_consumer_device(&consumer.consumer_id, &device_id).await?;
    let funding = admin.create_consumer_account(&consumer.consumer_id, "consumer_funding", &funds.currency).await?;
    let transfer_id = format!("funding-{}", funding.account_id);
    admin
        .fund_consumer(&consumer.consumer_id, &transfer_id, &funding.account_id, funds.funded_minor, &funds.currency)
        .await?;
    let mut wallet = OfflineWallet::new(session, admin.jwks().await?);
    wallet.obtain_credential(&funds.currency, funds.limit_minor).await?;
    Ok(OfflinePhone { wallet, device_id, consumer_id: consumer.consumer_id, funding_account_id: funding.account_id })
}

/// A consumer's phone enrolled under `merchant_id` and attested clean, with a session
/// open; the server needs the clean reference values of the consumer phone model. The
/// phone attests through `device_client`, which holds no API key.
async fn attested_phone(
    admin: &VouchClient,
    device_client: &VouchClient,
    merchant_id: &str,
    clock: Arc<dyn Clock>,
    rng: &SystemRandom,
) -> Result<(String, TokenSession), DeviceError> {
    let state = SimulatedDeviceState::clean(DeviceKind::Consumer, merchant_id);
    let identity = Arc::new(DeviceIdentity::generate(rng)?);
    let phone = enrol(admin, &identity, &state.profile(), &*clock, rng).await?;
    let mut monitor = TamperMonitor::new(state);
    let attestation = attest(device_client, &identity, &phone.device_id, &mut monitor, &*clock, rng).await?;
    let session = TokenSession::open(device_client, identity, &attestation.outcome.ticket, clock, rng).await?;
    Ok((phone.device_id, session))
}

/// A purchase made offline, as both sides saw it.
#[derive(Debug, Clone)]
pub struct SoundPurchase {
    /// What the phone showed the consumer.
    pub prompt: PaymentPrompt,
    /// What the POS queued for settlement.
    pub payment: QueuedPayment,
    /// Leg (a) as the phone heard it, and how long it sounded.
    pub leg_a: Heard,
    /// Leg (b) as the POS heard it.
    pub leg_b: Heard,
}

impl SoundPurchase {
    /// The audio time of both legs.
    pub fn sound_secs(&self) -> f64 {
        self.leg_a.audio_secs + self.leg_b.audio_secs
    }
}

/// One purchase of `amount_minor` of `currency` with both legs carried by sound: the
/// POS asks over `to_phone`, the phone checks the request and, as a consumer who
/// approves what checks out, approves it over `to_pos`, and the POS checks the
/// approval, countersigns and queues the payment.
pub fn offline_purchase(
    pos: &mut OfflinePos,
    wallet: &mut OfflineWallet,
    amount_minor: u64,
    currency: &str,
    to_phone: &mut SoundChannel,
    to_pos: &mut SoundChannel,
) -> Result<SoundPurchase, DeviceError> {
    let sale = pos.offer(amount_minor, currency)?;
    let leg_a = to_phone.carry(sale.leg_a())?;
    let prompt = wallet.review(&leg_a.bytes)?;
    let leg_b = to_pos.carry(&wallet.approve(&prompt)?)?;
    let payment = pos.accept(&sale, &leg_b.bytes)?;
    Ok(SoundPurchase { prompt, payment, leg_a, leg_b })
}

/// A device maker whose CA Vouch trusts: made with a new CA key and registered as a
/// TSM issuer. `admin` needs the admin scope.
pub async fn tsm_maker(
    admin: &VouchClient,
    name: &str,
    clock: Arc<dyn Clock>,
    rng: &SystemRandom,
) -> Result<(DeviceMaker, IssuerRecord), DeviceError> {
    let maker = DeviceMaker::new(name, clock, rng)?;
    let issuer = admin.register_tsm_issuer(name, &maker.ca_pem()).await?;
    Ok((maker, issuer))
}

/// The manifest of release `version` of `app_id`: `code`'s SHA-256 and size, for app SEs
/// of `se_profile`. An admin publishes it with [`VouchClient::publish_tsm_app`].
pub fn tsm_app_manifest(app_id: &str, version: u32, code: &[u8], se_profile: &str) -> AppManifest {
    AppManifest {
        app_id: app_id.to_owned(),
        version,
        code_sha256: vouch_proto::tsm::code_sha256(code),
        code_size: code.len() as u64,
        se_profile: se_profile.to_owned(),
    }
}

/// What a simulated phone is provisioned with and installs.
#[derive(Clone)]
pub struct TsmPhoneSetup {
    /// The payment instrument its payment certificate is for, by reference.
    pub instrument: String,
    /// The payment app to install: published already, with this code.
    pub app_id: String,
    pub code: Vec<u8>,
    /// Its app SE's profile.
    pub se_profile: String,
}

impl std::fmt::Debug for TsmPhoneSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TsmPhoneSetup")
            .field("app_id", &self.app_id)
            .field("code_bytes", &self.code.len())
            .field("se_profile", &self.se_profile)
            .finish_non_exhaustive()
    }
}

/// A phone with both secure elements set up by Vouch: its crypto SE provisioned, its
/// payment app installed in its app SE, and its user, whose finger matches the crypto
/// SE's template.
pub struct TsmPhone {
    pub device_id: String,
    pub session: TokenSession,
    pub crypto_se: CryptoSe,
    pub app_se: AppSe,
    pub app: PaymentApp,
    /// The server keys the phone pinned when it was set up.
    pub pinned_keys: JwkSet,
    finger: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for TsmPhone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TsmPhone")
            .field("device_id", &self.device_id)
            .field("crypto_se", &self.crypto_se)
            .field("app_se", &self.app_se)
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl TsmPhone {
    /// The user touches the sensor and the payment app sends `payload` to the service
    /// provider `provider_id`: the envelope for the SMS gateway.
    pub fn message(&mut self, provider_id: &str, payload: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.app.message(&mut self.crypto_se, &self.finger, provider_id, payload)
    }
}

/// A consumer's phone enrolled under `merchant_id` and attested clean, whose two SEs
/// `maker` certified: the crypto SE provisioned for `setup.instrument` and the answer
/// checked by the SE against the server keys the phone pinned; then the latest release
/// of `setup.app_id` fetched over the second channel and installed in the app SE, which
/// checks it against `setup.code`. `admin` needs the admin scope, and the server the
/// clean reference values of the consumer phone model and `maker`'s CA as an issuer;
/// the phone talks to it through `device_client`, which holds no API key.
pub async fn tsm_phone(
    admin: &VouchClient,
    device_client: &VouchClient,
    merchant_id: &str,
    maker: &DeviceMaker,
    setup: &TsmPhoneSetup,
    clock: Arc<dyn Clock>,
    rng: &SystemRandom,
) -> Result<TsmPhone, DeviceError> {
    let (device_id, session) = attested_phone(admin, device_client, merchant_id, clock, rng).await?;
    let pinned_keys = device_client.jwks().await?;
    let finger = Zeroizing::new(random_bytes::<32>(rng)?.to_vec());
    let mut crypto_se = CryptoSe::new(&device_id, maker.issue_se(&device_id, SeKind::Crypto)?, &finger);
    let answer = session.provision_crypto_se(&crypto_se.certificate().chain_pem, &setup.instrument).await?;
    crypto_se.accept_provisioning(&answer, &pinned_keys)?;
    let mut app_se = AppSe::new(&device_id, maker.issue_se(&device_id, SeKind::App)?, &setup.se_profile);
    let delivery = session.fetch_tsm_app(&setup.app_id, &app_se.certificate().chain_pem).await?;
    app_se.install(&delivery, &setup.code, &pinned_keys)?;
    let app = app_se.payment_app(&setup.app_id)?;
    Ok(TsmPhone { device_id, session, crypto_se, app_se, app, pinned_keys, finger })
}

/// A service provider that receives relayed messages: a [`ProviderReceiver`] with a new
/// HPKE key on a free local port, registered with Vouch at that endpoint and key.
#[derive(Debug)]
pub struct TsmProvider {
    pub receiver: ProviderReceiver,
    pub record: ServiceProviderRecord,
}

impl TsmProvider {
    pub fn provider_id(&self) -> &str {
        &self.record.service_provider_id
    }
}

/// Starts a provider's receiver on `127.0.0.1` and registers it as `name`; `admin`
/// needs the admin scope.
pub async fn tsm_provider(admin: &VouchClient, name: &str, rng: &SystemRandom) -> Result<TsmProvider, DeviceError> {
    let key = HpkePrivateKey::generate(rng)?;
    let receiver = ProviderReceiver::bind(SocketAddr::from(([127, 0, 0, 1], 0)), key).await?;
    let record = admin.create_service_provider(name, &receiver.endpoint(), receiver.public_jwk()).await?;
    Ok(TsmProvider { receiver, record })
}

/// A client for an SMS gateway: a new API key of scope `gateway`, which passes devices'
/// messages to Vouch ([`VouchClient::relay_tsm_message`]). `admin` needs the admin scope.
pub async fn tsm_gateway(admin: &VouchClient, label: &str) -> Result<VouchClient, DeviceError> {
    let api_key = admin.create_api_key(&["gateway"], label).await?;
    Ok(VouchClient::new(admin.base_url())?.with_api_key(&api_key.api_key))
}
