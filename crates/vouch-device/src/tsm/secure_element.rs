//! The phone's two secure elements, simulated. The [`CryptoSe`] keeps the device key,
//! the registration and the payment certificate, and seals messages; the [`AppSe`]
//! installs and runs the payment application. Each opens only what was sealed to its
//! own certified key, and trusts only what the server keys it is shown signed.

use serde::de::DeserializeOwned;
use vouch_proto::crypto::{constant_time_eq, sha256};
use vouch_proto::tsm::{
    AppManifest, DeviceKey, MANIFEST_TYP, ManifestClaims, MessageBody, PROVISION_TYP, ProvisionClaims, TsmRefusal,
    check_install, open_app_delivery, open_provisioning, seal_message, verify_payment_certificate,
};
use vouch_proto::{JwkSet, ProtoError, b64, jwt};
use zeroize::Zeroizing;

use super::{AppDelivery, PaymentApp, ProvisionAnswer, SeCertificate, SeRefusal, refused};
use crate::DeviceError;
use crate::token::key_lookup;

/// A server-signed JWS of type `typ` whose `kid` is among `pinned`, and its claims.
fn verify_pinned<C: DeserializeOwned>(token: &str, typ: &'static str, pinned: &JwkSet) -> Result<C, DeviceError> {
    Ok(jwt::verify_by_kid(token, typ, key_lookup(pinned))?)
}

/// What a provisioning left in the crypto SE.
struct Registration {
    device_key: DeviceKey,
    registration_id: String,
    instrument: String,
    /// The JWS, as the payment app puts it in messages.
    payment_certificate: String,
    /// The provisioning's `iat`: an older bundle never replaces this one.
    provisioned_at: i64,
    /// The counter of the last message sealed; the next is one above.
    counter: u64,
}

/// The crypto secure element: its certified HPKE key, its user's biometric template,
/// and once provisioned the device key, the registration, the payment certificate and
/// the message counter. None of these ever leaves it but the payment certificate, and
/// that only after a biometric match.
pub struct CryptoSe {
    device_id: String,
    certificate: SeCertificate,
    /// SHA-256 of the enrolled template.
    template_hash: Zeroizing<[u8; 32]>,
    registration: Option<Registration>,
}

impl std::fmt::Debug for CryptoSe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoSe")
            .field("device_id", &self.device_id)
            .field("se_serial", &self.certificate.serial)
            .field("provisioned", &self.registration.is_some())
            .field("counter", &self.counter())
            .finish_non_exhaustive()
    }
}

impl CryptoSe {
    /// The crypto SE of device `device_id`, with the key and chain its maker certified
    /// and its user's enrolled biometric `template`.
    pub fn new(device_id: &str, certificate: SeCertificate, template: &[u8]) -> Self {
        CryptoSe {
            device_id: device_id.to_owned(),
            certificate,
            template_hash: Zeroizing::new(sha256(template)),
            registration: None,
        }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Its certified key and chain, which the phone presents for provisioning.
    pub fn certificate(&self) -> &SeCertificate {
        &self.certificate
    }

    pub fn is_provisioned(&self) -> bool {
        self.registration.is_some()
    }

    pub fn registration_id(&self) -> Option<&str> {
        self.registration.as_ref().map(|r| r.registration_id.as_str())
    }

    /// The counter of the last message sealed, 0 before the first.
    pub fn counter(&self) -> u64 {
        self.registration.as_ref().map_or(0, |r| r.counter)
    }

    /// Takes a provisioning answer: the JWS signed by a key of `pinned`, for this
    /// device and this SE's certificate, newer than any taken before, agreeing with the
    /// answer; the bundle in it opens under this SE's key; the payment certificate in
    /// the bundle signed by a key of `pinned`, unexpired when the bundle was signed, for
    /// this device and registration. Then the SE holds the device key and the
    /// registration, and counts messages from 1.
    ///
    /// An SE has no clock it can trust, so it orders bundles by their `iat` and leaves
    /// the payment certificate's expiry after that to the server, which checks it on
    /// every message.
    pub fn accept_provisioning(&mut self, answer: &ProvisionAnswer, pinned: &JwkSet) -> Result<(), DeviceError> {
        let claims: ProvisionClaims = verify_pinned(&answer.provisioning, PROVISION_TYP, pinned)?;
        if claims.device_id != self.device_id {
            return Err(refused(
                SeRefusal::WrongDevice,
                format!("the bundle is for {}, this SE is in {}", claims.device_id, self.device_id),
            ));
        }
        if claims.se_serial != self.certificate.serial {
            return Err(refused(
                SeRefusal::WrongSe,
                format!(
                    "the bundle is for SE certificate {}, this SE's is {}",
                    claims.se_serial, self.certificate.serial
                ),
            ));
        }
        if answer.device_id != claims.device_id
            || answer.registration_id != claims.registration_id
            || answer.se_serial != claims.se_serial
        {
            return Err(DeviceError::Untrusted("the provisioning answer and its signed bundle disagree".into()));
        }
        if let Some(held) = &self.registration
            && (held.registration_id == claims.registration_id || claims.iat < held.provisioned_at)
        {
            return Err(refused(
                SeRefusal::ProvisioningReplayed,
                format!(
                    "registration {} issued at {}; the SE holds {} issued at {}",
                    claims.registration_id, claims.iat, held.registration_id, held.provisioned_at
                ),
            ));
        }
        let secrets = open_provisioning(self.certificate.key(), &claims)?;
        let certificate = verify_payment_certificate(&secrets.payment_certificate, key_lookup(pinned), claims.iat)?;
        if certificate.sub != self.device_id || certificate.registration_id != claims.registration_id {
            return Err(refused(
                SeRefusal::CertificateMismatch,
                format!(
                    "the payment certificate is for {} under {}, the bundle for {} under {}",
                    certificate.sub, certificate.registration_id, self.device_id, claims.registration_id
                ),
            ));
        }
        self.registration = Some(Registration {
            device_key: secrets.device_key,
            registration_id: claims.registration_id,
            instrument: certificate.instrument,
            payment_certificate: secrets.payment_certificate,
            provisioned_at: claims.iat,
            counter: 0,
        });
        Ok(())
    }

    /// The payment certificate, released only when `sample` matches the enrolled
    /// template.
    pub fn release_payment_certificate(&self, sample: &[u8]) -> Result<String, DeviceError> {
        let held = self.held()?;
        let sample_hash = Zeroizing::new(sha256(sample));
        if !constant_time_eq(&sample_hash[..], &self.template_hash[..]) {
            return Err(refused(SeRefusal::BiometricMismatch, "the sample does not match the enrolled template"));
        }
        Ok(held.payment_certificate.clone())
    }

    /// The payment instrument the SE was provisioned for, by reference.
    pub fn instrument(&self) -> Option<&str> {
        self.registration.as_ref().map(|r| r.instrument.as_str())
    }

    /// Seals `body` under the device key with the next counter, as the envelope the
    /// gateway passes to Vouch. Only a body carrying this SE's own payment certificate
    /// is sealed; the counter moves on only when the envelope is made.
    pub fn seal_message(&mut self, body: &MessageBody) -> Result<Vec<u8>, DeviceError> {
        let device_id = &self.device_id;
        let held = self
            .registration
            .as_mut()
            .ok_or_else(|| refused(SeRefusal::NotProvisioned, "no device key: provision the SE first"))?;
        if body.payment_certificate != held.payment_certificate {
            return Err(refused(SeRefusal::ForeignCertificate, "the message carries another payment certificate"));
        }
        let counter = held.counter.checked_add(1).ok_or_else(|| {
            DeviceError::Proto(ProtoError::TsmRefused {
                why: TsmRefusal::InvalidCounter,
                detail: "the message counter is used up: provision again".into(),
            })
        })?;
        let envelope = seal_message(&held.device_key, device_id, counter, body)?;
        held.counter = counter;
        Ok(envelope)
    }

    fn held(&self) -> Result<&Registration, DeviceError> {
        self.registration
            .as_ref()
            .ok_or_else(|| refused(SeRefusal::NotProvisioned, "no payment certificate: provision the SE first"))
    }
}

/// A payment application installed in an app SE: its signed release and code.
#[derive(Clone, PartialEq, Eq)]
pub struct InstalledApp {
    pub manifest_id: String,
    pub manifest: AppManifest,
    /// The manifest's JWS, as Vouch signed it.
    pub signed_manifest: String,
    pub code: Vec<u8>,
}

impl std::fmt::Debug for InstalledApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstalledApp")
            .field("manifest_id", &self.manifest_id)
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

/// The app secure element: its certified HPKE key, its profile, and the payment
/// applications installed in it. It holds nothing of the crypto SE's.
pub struct AppSe {
    device_id: String,
    certificate: SeCertificate,
    se_profile: String,
    installed: Vec<InstalledApp>,
}

impl std::fmt::Debug for AppSe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppSe")
            .field("device_id", &self.device_id)
            .field("se_serial", &self.certificate.serial)
            .field("se_profile", &self.se_profile)
            .field("installed", &self.installed)
            .finish_non_exhaustive()
    }
}

impl AppSe {
    /// The app SE of device `device_id`, with the key and chain its maker certified,
    /// running code of `se_profile` (e.g. `javacard-3.1`).
    pub fn new(device_id: &str, certificate: SeCertificate, se_profile: &str) -> Self {
        AppSe { device_id: device_id.to_owned(), certificate, se_profile: se_profile.to_owned(), installed: Vec::new() }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Its certified key and chain, which the phone presents to fetch an app.
    pub fn certificate(&self) -> &SeCertificate {
        &self.certificate
    }

    pub fn se_profile(&self) -> &str {
        &self.se_profile
    }

    pub fn installed(&self) -> &[InstalledApp] {
        &self.installed
    }

    pub fn installed_app(&self, app_id: &str) -> Option<&InstalledApp> {
        self.installed.iter().find(|app| app.manifest.app_id == app_id)
    }

    /// Installs `code` as the release `delivery` carries: the delivery opens under this
    /// SE's key for this device and its manifest id; the manifest inside is signed by
    /// a key of `pinned` and is the one the delivery names; and
    /// [`vouch_proto::tsm::check_install`] passes: the manifest's field rules, this SE's
    /// profile, a version above any installed, the code's size and hash. The release
    /// replaces an older one.
    pub fn install(
        &mut self,
        delivery: &AppDelivery,
        code: &[u8],
        pinned: &JwkSet,
    ) -> Result<&InstalledApp, DeviceError> {
        let enc = b64::decode("enc", &delivery.enc)?;
        let ciphertext = b64::decode("ciphertext", &delivery.ciphertext)?;
        let signed_manifest =
            open_app_delivery(self.certificate.key(), &self.device_id, &delivery.manifest_id, &enc, &ciphertext)?;
        let claims: ManifestClaims = verify_pinned(&signed_manifest, MANIFEST_TYP, pinned)?;
        let manifest = claims.manifest;
        if claims.manifest_id != delivery.manifest_id
            || manifest.app_id != delivery.app_id
            || manifest.version != delivery.version
        {
            return Err(refused(
                SeRefusal::DeliveryMismatch,
                format!(
                    "the delivery names {} ({} version {}), its signed manifest {} ({} version {})",
                    delivery.manifest_id,
                    delivery.app_id,
                    delivery.version,
                    claims.manifest_id,
                    manifest.app_id,
                    manifest.version
                ),
            ));
        }
        let installed_version = self.installed_app(&manifest.app_id).map(|app| app.manifest.version);
        check_install(&manifest, code, &self.se_profile, installed_version)?;
        let app = InstalledApp { manifest_id: claims.manifest_id, manifest, signed_manifest, code: code.to_vec() };
        self.installed.retain(|installed| installed.manifest.app_id != app.manifest.app_id);
        self.installed.push(app);
        // Invariant: pushed just above.
        Ok(self.installed.last().expect("the app just installed"))
    }

    /// The installed payment application `app_id`, ready to run.
    pub fn payment_app(&self, app_id: &str) -> Result<PaymentApp, DeviceError> {
        let app = self
            .installed_app(app_id)
            .ok_or_else(|| refused(SeRefusal::AppNotInstalled, format!("no app {app_id} is installed")))?;
        Ok(PaymentApp::new(&app.manifest_id, &app.manifest))
    }

    /// Everything this SE stores, byte for byte as held (each item length-prefixed):
    /// its device id, profile, chain and private key, and each installed app's manifest,
    /// signed manifest and code. A test reads it to show what never reaches the app SE.
    pub fn state_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut state = Zeroizing::new(Vec::new());
        let mut put = |item: &[u8]| {
            state.extend_from_slice(&(item.len() as u64).to_be_bytes());
            state.extend_from_slice(item);
        };
        put(self.device_id.as_bytes());
        put(self.se_profile.as_bytes());
        put(self.certificate.chain_pem.as_bytes());
        put(&self.certificate.leaf_der);
        put(self.certificate.serial.as_bytes());
        put(&self.certificate.key().to_bytes()[..]);
        for app in &self.installed {
            let m = &app.manifest;
            put(app.manifest_id.as_bytes());
            put(m.app_id.as_bytes());
            put(&m.version.to_be_bytes());
            put(m.code_sha256.as_bytes());
            put(&m.code_size.to_be_bytes());
            put(m.se_profile.as_bytes());
            put(app.signed_manifest.as_bytes());
            put(&app.code);
        }
        state
    }
}
