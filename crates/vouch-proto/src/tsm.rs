//! Trusted service manager: the wire types and pure functions of its three channels. The
//! server and the device SDK both call these, so the two ends of each channel cannot drift.
//!
//! - Provisioning: Vouch makes a random device key and seals it, with the device's payment
//!   certificate ([`ProvisionedSecrets`]), in HPKE base mode ([`crate::hpke`]) to the key in
//!   the certificate of the device's crypto secure element. The sealed bytes travel in
//!   [`ProvisionClaims`], the payload of a JWS Vouch signs (typ [`PROVISION_TYP`]): base mode
//!   does not say who sealed, the signature does.
//! - App delivery: a payment application release ([`AppManifest`]) signed by Vouch (typ
//!   [`MANIFEST_TYP`]) and sealed to the key of the device's app secure element, which installs
//!   the code only under [`check_install`]. Nothing of the crypto SE crosses this channel.
//! - Messages: the payment app seals a [`MessageBody`] under the device key (AES-256-GCM, with
//!   the counter in a clear header so Vouch can refuse replays before decrypting), Vouch opens
//!   it and seals the body again, in HPKE base mode, to the service provider's key
//!   ([`RelayEnvelope`]).
//!
//! Every HPKE `info` and AEAD `aad` names its channel and version and the ids it is bound
//! to, joined by a 0x00 byte, so a ciphertext made for one channel, device, registration,
//! secure element or provider never opens as another. Ids therefore never hold a NUL byte.

use aws_lc_rs::aead;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{
    ProtoError, b64,
    crypto::{SecureRandom, VerifyingKey, sha256},
    hpke::{self, HpkePrivateKey, HpkePublicKey, Sealed},
    jws, jwt,
};

pub const PROVISION_TYP: &str = "vouch-tsm-provision+jwt";
pub const MANIFEST_TYP: &str = "vouch-tsm-manifest+jwt";
pub const PAYMENT_CERTIFICATE_TYP: &str = "vouch-payment-certificate+jwt";
pub const DEVICE_KEY_BYTES: usize = 32;
/// Largest message envelope a device may send: header, ciphertext and tag.
pub const MESSAGE_BYTES_MAX: usize = 8192;
/// Largest payload a [`MessageBody`] may carry.
pub const PAYLOAD_BYTES_MAX: usize = 4096;
/// Longest payment certificate (a JWS) Vouch provisions and a message may carry: with it, a
/// payload of [`PAYLOAD_BYTES_MAX`] still fits a message.
pub const PAYMENT_CERTIFICATE_BYTES_MAX: usize = 2048;
/// Longest app id and SE profile name.
pub const APP_ID_BYTES_MAX: usize = 64;
pub const SE_PROFILE_BYTES_MAX: usize = 64;
/// Largest payment application code a manifest may describe.
pub const CODE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Version byte that opens every message envelope.
const MESSAGE_VERSION: u8 = 0x01;
/// Version byte and big-endian counter.
const MESSAGE_HEADER_BYTES: usize = 1 + 8;
const MESSAGE_TAG_BYTES: usize = 16;
const PROVISIONED_SECRETS_BYTES_MAX: usize = DEVICE_KEY_BYTES + PAYMENT_CERTIFICATE_BYTES_MAX;

const PROVISION_LABEL: &str = "vouch tsm provision v1";
const APP_LABEL: &str = "vouch tsm app v1";
const MESSAGE_LABEL: &str = "vouch tsm message v1";
const RELAY_LABEL: &str = "vouch tsm relay v1";

/// Why a TSM object was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TsmRefusal {
    /// A message envelope or body that is not what the format says.
    MalformedMessage,
    /// A message that does not authenticate under the device key (or, relayed, the provider key).
    MessageNotAuthentic,
    /// A message counter of 0: counters start at 1.
    InvalidCounter,
    /// The code's SHA-256 is not the manifest's.
    CodeHashMismatch,
    /// The code's length is not the manifest's.
    CodeSizeMismatch,
    /// The manifest is for another kind of app secure element.
    WrongSeProfile,
    /// The manifest's version is not above the installed one.
    Downgrade,
    /// A manifest field breaks its rule.
    InvalidManifest,
    /// The sealed provisioning does not open under this SE's key and registration.
    ProvisioningNotAuthentic,
    /// The sealed app delivery does not open under this app SE's key, device and manifest.
    DeliveryNotAuthentic,
}

impl TsmRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            TsmRefusal::MalformedMessage => "malformed-message",
            TsmRefusal::MessageNotAuthentic => "message-not-authentic",
            TsmRefusal::InvalidCounter => "invalid-counter",
            TsmRefusal::CodeHashMismatch => "code-hash-mismatch",
            TsmRefusal::CodeSizeMismatch => "code-size-mismatch",
            TsmRefusal::WrongSeProfile => "wrong-se-profile",
            TsmRefusal::Downgrade => "downgrade",
            TsmRefusal::InvalidManifest => "invalid-manifest",
            TsmRefusal::ProvisioningNotAuthentic => "provisioning-not-authentic",
            TsmRefusal::DeliveryNotAuthentic => "delivery-not-authentic",
        }
    }
}

fn refused(why: TsmRefusal, detail: impl ToString) -> ProtoError {
    ProtoError::TsmRefused { why, detail: detail.to_string() }
}

/// `parts` joined by a 0x00 byte. A part holding a NUL byte could make two different lists
/// join to the same bytes, so it is refused.
fn joined(parts: &[&str]) -> Result<Vec<u8>, ProtoError> {
    match parts.iter().find(|part| part.contains('\0')) {
        Some(part) => Err(ProtoError::malformed("TSM identifier", format!("{part:?} holds a NUL byte"))),
        None => Ok(parts.join("\0").into_bytes()),
    }
}

/// The 256-bit key Vouch makes for a device and provisions to its crypto SE only.
#[derive(Clone)]
pub struct DeviceKey(Zeroizing<[u8; DEVICE_KEY_BYTES]>);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

impl DeviceKey {
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, ProtoError> {
        let mut key = Zeroizing::new([0u8; DEVICE_KEY_BYTES]);
        rng.fill(&mut key[..]).map_err(|_| ProtoError::Rng)?;
        Ok(DeviceKey(key))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtoError> {
        let key: [u8; DEVICE_KEY_BYTES] = bytes.try_into().map_err(|_| {
            ProtoError::InvalidKey(format!("device key is {} bytes, expected {DEVICE_KEY_BYTES}", bytes.len()))
        })?;
        Ok(DeviceKey(Zeroizing::new(key)))
    }

    pub fn as_bytes(&self) -> &[u8; DEVICE_KEY_BYTES] {
        &self.0
    }

    fn aead(&self) -> Result<aead::LessSafeKey, ProtoError> {
        aead::UnboundKey::new(&aead::AES_256_GCM, &self.0[..])
            .map(aead::LessSafeKey::new)
            .map_err(|_| ProtoError::InvalidKey("AES-256-GCM refused the device key".into()))
    }
}

/// Payload of the provisioning JWS (typ [`PROVISION_TYP`], signed by Vouch's key). `enc` and
/// `ciphertext` are base64url.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProvisionClaims {
    pub iss: String,
    pub iat: i64,
    pub device_id: String,
    pub registration_id: String,
    pub se_serial: String,
    pub enc: String,
    pub ciphertext: String,
}

/// What the crypto SE decrypts: the device key and its payment certificate (a JWS), encoded
/// as the 32 key bytes followed by the certificate's UTF-8.
#[derive(Debug, Clone)]
pub struct ProvisionedSecrets {
    pub device_key: DeviceKey,
    pub payment_certificate: String,
}

impl ProvisionedSecrets {
    fn encode(&self) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
        let certificate_len = self.payment_certificate.len();
        if certificate_len > PAYMENT_CERTIFICATE_BYTES_MAX {
            return Err(ProtoError::TooLarge {
                what: "payment certificate",
                len: certificate_len,
                max: PAYMENT_CERTIFICATE_BYTES_MAX,
            });
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(DEVICE_KEY_BYTES + certificate_len));
        bytes.extend_from_slice(self.device_key.as_bytes());
        bytes.extend_from_slice(self.payment_certificate.as_bytes());
        Ok(bytes)
    }

    fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        const WHAT: &str = "provisioned secrets";
        let (Some(key), Some(certificate)) = (bytes.get(..DEVICE_KEY_BYTES), bytes.get(DEVICE_KEY_BYTES..)) else {
            return Err(ProtoError::malformed(
                WHAT,
                format!("{} bytes, expected the 32-byte device key first", bytes.len()),
            ));
        };
        if certificate.is_empty() {
            return Err(ProtoError::malformed(WHAT, "no payment certificate after the device key"));
        }
        let payment_certificate = std::str::from_utf8(certificate)
            .map_err(|e| ProtoError::malformed(WHAT, format!("payment certificate is not UTF-8: {e}")))?;
        Ok(ProvisionedSecrets {
            device_key: DeviceKey::from_bytes(key)?,
            payment_certificate: payment_certificate.into(),
        })
    }
}

/// Seals the device key and payment certificate to the crypto SE's certified key.
/// info = `"vouch tsm provision v1" 0x00 device_id 0x00 registration_id`; aad = `se_serial`.
pub fn seal_provisioning(
    se_key: &HpkePublicKey,
    device_id: &str,
    registration_id: &str,
    se_serial: &str,
    secrets: &ProvisionedSecrets,
    rng: &dyn SecureRandom,
) -> Result<Sealed, ProtoError> {
    let info = joined(&[PROVISION_LABEL, device_id, registration_id])?;
    hpke::seal(se_key, &info, se_serial.as_bytes(), &secrets.encode()?, rng)
}

/// The crypto SE's side of [`seal_provisioning`], once the JWS holding `claims` has verified.
pub fn open_provisioning(se_key: &HpkePrivateKey, claims: &ProvisionClaims) -> Result<ProvisionedSecrets, ProtoError> {
    let enc = b64::decode("provisioning enc", &claims.enc)?;
    let ciphertext = b64::decode("provisioning ciphertext", &claims.ciphertext)?;
    let max = PROVISIONED_SECRETS_BYTES_MAX + hpke::TAG_BYTES;
    if ciphertext.len() > max {
        return Err(ProtoError::TooLarge { what: "provisioning ciphertext", len: ciphertext.len(), max });
    }
    let info = joined(&[PROVISION_LABEL, &claims.device_id, &claims.registration_id])?;
    let secrets = hpke::open(se_key, &enc, &info, claims.se_serial.as_bytes(), &ciphertext)
        .map_err(|e| refused(TsmRefusal::ProvisioningNotAuthentic, e))?;
    ProvisionedSecrets::decode(&secrets)
}

/// Payload of the payment certificate JWS (typ [`PAYMENT_CERTIFICATE_TYP`], Vouch's key).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PaymentCertificateClaims {
    pub iss: String,
    /// The device id.
    pub sub: String,
    pub registration_id: String,
    pub instrument: String,
    pub iat: i64,
    pub exp: i64,
}

/// A payment certificate's signature (by the key `key_for_kid` names), type and expiry
/// checked; whose device and registration it names is the caller's to compare.
pub fn verify_payment_certificate(
    certificate: &str,
    key_for_kid: impl Fn(&str) -> Option<VerifyingKey>,
    now: i64,
) -> Result<PaymentCertificateClaims, ProtoError> {
    if certificate.len() > PAYMENT_CERTIFICATE_BYTES_MAX {
        return Err(ProtoError::TooLarge {
            what: "payment certificate",
            len: certificate.len(),
            max: PAYMENT_CERTIFICATE_BYTES_MAX,
        });
    }
    let claims: PaymentCertificateClaims = jwt::verify_by_kid(certificate, PAYMENT_CERTIFICATE_TYP, key_for_kid)?;
    jwt::check_expiry(claims.exp, now, 0)?;
    Ok(claims)
}

/// A payment application release, as an administrator uploads it. `code_sha256` is lowercase hex.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AppManifest {
    pub app_id: String,
    pub version: u32,
    pub code_sha256: String,
    pub code_size: u64,
    pub se_profile: String,
}

impl AppManifest {
    /// Field rules: `app_id` 1 to 64 of `A-Z a-z 0-9 . _ -`, `version` at least 1,
    /// `code_sha256` 64 lowercase hex digits, `code_size` 1 byte to 64 MiB, `se_profile`
    /// 1 to 64 bytes without control characters.
    pub fn check(&self) -> Result<(), ProtoError> {
        let invalid = |detail: String| Err(refused(TsmRefusal::InvalidManifest, detail));
        let id_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.app_id.is_empty() || self.app_id.len() > APP_ID_BYTES_MAX || !self.app_id.chars().all(id_char) {
            return invalid(format!("app_id {:?} is not 1 to {APP_ID_BYTES_MAX} of A-Z a-z 0-9 . _ -", self.app_id));
        }
        if self.version == 0 {
            return invalid("version is 0, expected at least 1".into());
        }
        let hex_digit = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if self.code_sha256.len() != 64 || !self.code_sha256.chars().all(hex_digit) {
            return invalid(format!("code_sha256 {:?} is not 64 lowercase hex digits", self.code_sha256));
        }
        if !(1..=CODE_BYTES_MAX).contains(&self.code_size) {
            return invalid(format!("code_size is {}, expected 1 to {CODE_BYTES_MAX} bytes", self.code_size));
        }
        if self.se_profile.is_empty()
            || self.se_profile.len() > SE_PROFILE_BYTES_MAX
            || self.se_profile.chars().any(char::is_control)
        {
            return invalid(format!(
                "se_profile {:?} is not 1 to {SE_PROFILE_BYTES_MAX} bytes without control characters",
                self.se_profile
            ));
        }
        Ok(())
    }
}

/// Payload of the manifest JWS (typ [`MANIFEST_TYP`]): the manifest's fields plus who
/// signed it, when, and the id Vouch gave the release.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ManifestClaims {
    pub iss: String,
    pub iat: i64,
    pub manifest_id: String,
    #[serde(flatten)]
    pub manifest: AppManifest,
}

/// The lowercase hex SHA-256 a manifest names its code by.
pub fn code_sha256(code: &[u8]) -> String {
    crate::hex::encode(sha256(code))
}

/// The app SE's install rule, once the manifest's signature has verified: the manifest's
/// fields valid, made for this SE profile, a version above any installed one, and the code of
/// the manifest's size and SHA-256.
pub fn check_install(
    manifest: &AppManifest,
    code: &[u8],
    se_profile: &str,
    installed_version: Option<u32>,
) -> Result<(), ProtoError> {
    manifest.check()?;
    if manifest.se_profile != se_profile {
        return Err(refused(
            TsmRefusal::WrongSeProfile,
            format!("manifest is for SE profile {:?}, this SE is {se_profile:?}", manifest.se_profile),
        ));
    }
    if let Some(installed) = installed_version
        && manifest.version <= installed
    {
        return Err(refused(
            TsmRefusal::Downgrade,
            format!("version {} is not above the installed version {installed}", manifest.version),
        ));
    }
    if code.len() as u64 != manifest.code_size {
        return Err(refused(
            TsmRefusal::CodeSizeMismatch,
            format!("code is {} bytes, the manifest says {}", code.len(), manifest.code_size),
        ));
    }
    let digest = code_sha256(code);
    if digest != manifest.code_sha256 {
        return Err(refused(
            TsmRefusal::CodeHashMismatch,
            format!("code SHA-256 is {digest}, the manifest says {}", manifest.code_sha256),
        ));
    }
    Ok(())
}

/// Seals the signed manifest to the app SE's certified key: the second channel, which
/// carries nothing of the crypto SE. info = `"vouch tsm app v1" 0x00 device_id`; aad = `manifest_id`.
pub fn seal_app_delivery(
    app_se_key: &HpkePublicKey,
    device_id: &str,
    manifest_id: &str,
    manifest_jws: &str,
    rng: &dyn SecureRandom,
) -> Result<Sealed, ProtoError> {
    if manifest_jws.len() > jws::COMPACT_BYTES_MAX {
        return Err(ProtoError::TooLarge {
            what: "manifest JWS",
            len: manifest_jws.len(),
            max: jws::COMPACT_BYTES_MAX,
        });
    }
    let info = joined(&[APP_LABEL, device_id])?;
    hpke::seal(app_se_key, &info, manifest_id.as_bytes(), manifest_jws.as_bytes(), rng)
}

/// The app SE's side of [`seal_app_delivery`]: the manifest JWS, still to be verified.
pub fn open_app_delivery(
    app_se_key: &HpkePrivateKey,
    device_id: &str,
    manifest_id: &str,
    enc: &[u8],
    ciphertext: &[u8],
) -> Result<String, ProtoError> {
    let max = jws::COMPACT_BYTES_MAX + hpke::TAG_BYTES;
    if ciphertext.len() > max {
        return Err(ProtoError::TooLarge { what: "app delivery ciphertext", len: ciphertext.len(), max });
    }
    let info = joined(&[APP_LABEL, device_id])?;
    let manifest_jws = hpke::open(app_se_key, enc, &info, manifest_id.as_bytes(), ciphertext)
        .map_err(|e| refused(TsmRefusal::DeliveryNotAuthentic, e))?;
    String::from_utf8(manifest_jws.to_vec())
        .map_err(|e| ProtoError::malformed("manifest JWS", format!("not UTF-8: {}", e.utf8_error())))
}

/// What a device sends (as JSON, inside the device-key AEAD) and a provider receives.
/// `payload` is base64url in JSON.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MessageBody {
    pub payment_certificate: String,
    pub provider_id: String,
    #[serde(with = "base64url")]
    pub payload: Vec<u8>,
}

mod base64url {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&crate::b64::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        crate::b64::decode("payload", &String::deserialize(deserializer)?).map_err(D::Error::custom)
    }
}

/// The first field of `body` over its limit, as (what, length, limit).
fn oversized_field(body: &MessageBody) -> Option<(&'static str, usize, usize)> {
    [
        ("message payload", body.payload.len(), PAYLOAD_BYTES_MAX),
        ("payment certificate", body.payment_certificate.len(), PAYMENT_CERTIFICATE_BYTES_MAX),
    ]
    .into_iter()
    .find(|(_, len, max)| len > max)
}

fn body_json(body: &MessageBody) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
    if let Some((what, len, max)) = oversized_field(body) {
        return Err(ProtoError::TooLarge { what, len, max });
    }
    serde_json::to_vec(body).map(Zeroizing::new).map_err(|e| ProtoError::malformed("message body", e))
}

fn parse_body(json: &[u8]) -> Result<MessageBody, ProtoError> {
    let body: MessageBody =
        serde_json::from_slice(json).map_err(|e| refused(TsmRefusal::MalformedMessage, format!("body: {e}")))?;
    if let Some((what, len, max)) = oversized_field(&body) {
        return Err(refused(TsmRefusal::MalformedMessage, format!("{what} is {len} bytes, over the limit of {max}")));
    }
    Ok(body)
}

/// The envelope's clear header, `0x01 || counter`, and the ciphertext after it.
struct MessageHeader<'a> {
    header: [u8; MESSAGE_HEADER_BYTES],
    counter: u64,
    ciphertext: &'a [u8],
}

fn message_header(envelope: &[u8]) -> Result<MessageHeader<'_>, ProtoError> {
    if envelope.len() > MESSAGE_BYTES_MAX {
        return Err(refused(
            TsmRefusal::MalformedMessage,
            format!("envelope is {} bytes, over the limit of {MESSAGE_BYTES_MAX}", envelope.len()),
        ));
    }
    let (Some(header), Some(ciphertext)) =
        (envelope.first_chunk::<MESSAGE_HEADER_BYTES>(), envelope.get(MESSAGE_HEADER_BYTES..))
    else {
        return Err(short_envelope(envelope.len()));
    };
    if ciphertext.len() < MESSAGE_TAG_BYTES {
        return Err(short_envelope(envelope.len()));
    }
    if header[0] != MESSAGE_VERSION {
        return Err(refused(
            TsmRefusal::MalformedMessage,
            format!("envelope version is {}, expected {MESSAGE_VERSION}", header[0]),
        ));
    }
    let mut counter = [0u8; 8];
    counter.copy_from_slice(&header[1..]);
    let counter = u64::from_be_bytes(counter);
    check_counter(counter)?;
    Ok(MessageHeader { header: *header, counter, ciphertext })
}

fn short_envelope(len: usize) -> ProtoError {
    refused(
        TsmRefusal::MalformedMessage,
        format!(
            "envelope is {len} bytes, shorter than its {MESSAGE_HEADER_BYTES}-byte header and {MESSAGE_TAG_BYTES}-byte tag"
        ),
    )
}

fn check_counter(counter: u64) -> Result<(), ProtoError> {
    if counter == 0 {
        return Err(refused(TsmRefusal::InvalidCounter, "counter is 0, expected at least 1"));
    }
    Ok(())
}

/// `"vouch tsm message v1" 0x00 device_id 0x00 || header`.
fn message_aad(device_id: &str, header: &[u8; MESSAGE_HEADER_BYTES]) -> Result<Vec<u8>, ProtoError> {
    let mut aad = joined(&[MESSAGE_LABEL, device_id])?;
    aad.push(0x00);
    aad.extend_from_slice(header);
    Ok(aad)
}

/// Four zero bytes then the counter: the device key never seals two messages under one
/// counter, so no nonce repeats under a key.
fn message_nonce(counter: u64) -> aead::Nonce {
    let mut nonce = [0u8; aead::NONCE_LEN];
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(nonce)
}

/// Seals a message under the device key: `0x01 || counter (u64 BE) || AES-256-GCM(body JSON)`.
/// The counter must be at least 1 and above every counter this device key sealed before.
pub fn seal_message(key: &DeviceKey, device_id: &str, counter: u64, body: &MessageBody) -> Result<Vec<u8>, ProtoError> {
    check_counter(counter)?;
    let json = body_json(body)?;
    let len = MESSAGE_HEADER_BYTES + json.len() + MESSAGE_TAG_BYTES;
    if len > MESSAGE_BYTES_MAX {
        return Err(ProtoError::TooLarge { what: "message envelope", len, max: MESSAGE_BYTES_MAX });
    }
    let mut header = [MESSAGE_VERSION; MESSAGE_HEADER_BYTES];
    header[1..].copy_from_slice(&counter.to_be_bytes());
    let aad = message_aad(device_id, &header)?;
    let mut sealed = Zeroizing::new(json.to_vec());
    key.aead()?
        .seal_in_place_append_tag(message_nonce(counter), aead::Aad::from(aad), &mut *sealed)
        .map_err(|_| ProtoError::malformed("message body", "AES-256-GCM sealing failed"))?;
    let mut envelope = Vec::with_capacity(len);
    envelope.extend_from_slice(&header);
    envelope.extend_from_slice(&sealed);
    Ok(envelope)
}

/// The counter from an envelope's clear header, before any decryption, so a replay is
/// refused without touching the key. Checks the size and version too.
pub fn message_counter(envelope: &[u8]) -> Result<u64, ProtoError> {
    message_header(envelope).map(|parsed| parsed.counter)
}

/// Opens a device's envelope: its counter and body.
pub fn open_message(key: &DeviceKey, device_id: &str, envelope: &[u8]) -> Result<(u64, MessageBody), ProtoError> {
    let parsed = message_header(envelope)?;
    let aad = message_aad(device_id, &parsed.header)?;
    let mut buffer = Zeroizing::new(parsed.ciphertext.to_vec());
    let json = key
        .aead()?
        .open_in_place(message_nonce(parsed.counter), aead::Aad::from(aad), &mut buffer[..])
        .map_err(|_| {
            refused(TsmRefusal::MessageNotAuthentic, "envelope does not authenticate under this device's key and id")
        })?;
    Ok((parsed.counter, parse_body(json)?))
}

/// What Vouch posts to a provider (JSON; header `Idempotency-Key` = `message_id`). `enc` and
/// `ciphertext` are base64url.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RelayEnvelope {
    pub message_id: String,
    pub provider_id: String,
    pub device_id: String,
    pub counter: u64,
    pub enc: String,
    pub ciphertext: String,
    pub created_at: i64,
}

/// `message_id 0x00 device_id 0x00 || counter (u64 BE)`.
fn relay_aad(message_id: &str, device_id: &str, counter: u64) -> Result<Vec<u8>, ProtoError> {
    let mut aad = joined(&[message_id, device_id])?;
    aad.push(0x00);
    aad.extend_from_slice(&counter.to_be_bytes());
    Ok(aad)
}

/// Seals a device's message body again, to the provider's registered key.
/// info = `"vouch tsm relay v1" 0x00 provider_id`; aad as [`RelayEnvelope`]'s fields bind it.
pub fn seal_relay(
    provider_key: &HpkePublicKey,
    message_id: &str,
    provider_id: &str,
    device_id: &str,
    counter: u64,
    body: &MessageBody,
    rng: &dyn SecureRandom,
) -> Result<Sealed, ProtoError> {
    let json = body_json(body)?;
    let len = json.len() + hpke::TAG_BYTES;
    if len > MESSAGE_BYTES_MAX {
        return Err(ProtoError::TooLarge { what: "relay ciphertext", len, max: MESSAGE_BYTES_MAX });
    }
    let info = joined(&[RELAY_LABEL, provider_id])?;
    hpke::seal(provider_key, &info, &relay_aad(message_id, device_id, counter)?, &json, rng)
}

/// The provider's side of [`seal_relay`]. Refuses a body addressed to another provider.
pub fn open_relay(provider_key: &HpkePrivateKey, envelope: &RelayEnvelope) -> Result<MessageBody, ProtoError> {
    let enc = b64::decode("relay enc", &envelope.enc)?;
    let ciphertext = b64::decode("relay ciphertext", &envelope.ciphertext)?;
    if ciphertext.len() > MESSAGE_BYTES_MAX {
        return Err(refused(
            TsmRefusal::MalformedMessage,
            format!("relay ciphertext is {} bytes, over the limit of {MESSAGE_BYTES_MAX}", ciphertext.len()),
        ));
    }
    let info = joined(&[RELAY_LABEL, &envelope.provider_id])?;
    let aad = relay_aad(&envelope.message_id, &envelope.device_id, envelope.counter)?;
    let json = hpke::open(provider_key, &enc, &info, &aad, &ciphertext)
        .map_err(|e| refused(TsmRefusal::MessageNotAuthentic, e))?;
    let body = parse_body(&json)?;
    if body.provider_id != envelope.provider_id {
        return Err(refused(
            TsmRefusal::MessageNotAuthentic,
            format!("body is addressed to provider {:?}, relayed to {:?}", body.provider_id, envelope.provider_id),
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SystemRandom;
    use proptest::prelude::*;

    const DEVICE: &str = "dev_1";
    const REGISTRATION: &str = "reg_1";
    const SE_SERIAL: &str = "0a1b2c";
    const CERTIFICATE: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJkZXZfMSJ9.c2ln";

    fn check_refused<T: std::fmt::Debug>(result: Result<T, ProtoError>, expected: TsmRefusal) {
        match result {
            Err(ProtoError::TsmRefused { why, .. }) => assert_eq!(why, expected),
            other => panic!("expected {}, got {other:?}", expected.as_str()),
        }
    }

    #[test]
    fn a_payment_certificate_verifies_only_signed_typed_and_unexpired() {
        let rng = SystemRandom::new();
        let server = crate::crypto::SigningKey::generate(&rng).unwrap();
        let claims = PaymentCertificateClaims {
            iss: "https://vouch.test".into(),
            sub: DEVICE.into(),
            registration_id: REGISTRATION.into(),
            instrument: "tok_1".into(),
            iat: 1_000,
            exp: 2_000,
        };
        let sign = |typ: &str| {
            let header = jws::Header::es256(typ).with_kid("k1");
            jws::sign(&header, &serde_json::to_vec(&claims).unwrap(), &server, &rng).unwrap()
        };
        let key = |kid: &str| (kid == "k1").then(|| server.verifying_key());
        let certificate = sign(PAYMENT_CERTIFICATE_TYP);
        assert_eq!(verify_payment_certificate(&certificate, key, 2_000).unwrap(), claims);
        assert!(matches!(verify_payment_certificate(&certificate, key, 2_001), Err(ProtoError::Expired { .. })));
        assert!(matches!(
            verify_payment_certificate(&certificate, |_| None, 1_500),
            Err(ProtoError::UnknownSigningKey { .. })
        ));
        let other = crate::crypto::SigningKey::generate(&rng).unwrap().verifying_key();
        assert!(matches!(
            verify_payment_certificate(&certificate, |_| Some(other), 1_500),
            Err(ProtoError::BadSignature)
        ));
        assert!(matches!(
            verify_payment_certificate(&sign(MANIFEST_TYP), key, 1_500),
            Err(ProtoError::WrongType { .. })
        ));
        let oversize = "a".repeat(PAYMENT_CERTIFICATE_BYTES_MAX + 1);
        assert!(matches!(verify_payment_certificate(&oversize, key, 1_500), Err(ProtoError::TooLarge { .. })));
    }

    /// Applies each change to a fresh copy of `base`; `run` must refuse every result for `why`.
    fn check_each_refused<T: Clone, R: std::fmt::Debug>(
        base: &T,
        changes: &[fn(&mut T)],
        why: TsmRefusal,
        run: impl Fn(&T) -> Result<R, ProtoError>,
    ) {
        for change in changes {
            let mut changed = base.clone();
            change(&mut changed);
            check_refused(run(&changed), why);
        }
    }

    fn secrets(rng: &SystemRandom) -> ProvisionedSecrets {
        ProvisionedSecrets { device_key: DeviceKey::generate(rng).unwrap(), payment_certificate: CERTIFICATE.into() }
    }

    fn claims(sealed: &Sealed) -> ProvisionClaims {
        ProvisionClaims {
            iss: "https://vouch.example".into(),
            iat: 1_700_000_000,
            device_id: DEVICE.into(),
            registration_id: REGISTRATION.into(),
            se_serial: SE_SERIAL.into(),
            enc: b64::encode(sealed.enc),
            ciphertext: b64::encode(&sealed.ciphertext),
        }
    }

    fn body(payload: &[u8]) -> MessageBody {
        MessageBody { payment_certificate: CERTIFICATE.into(), provider_id: "prov_1".into(), payload: payload.to_vec() }
    }

    fn manifest(code: &[u8]) -> AppManifest {
        AppManifest {
            app_id: "com.example.pay".into(),
            version: 3,
            code_sha256: code_sha256(code),
            code_size: code.len() as u64,
            se_profile: "vouch-app-se-1".into(),
        }
    }

    #[test]
    fn refusal_names_are_the_api_names() {
        let all = [
            (TsmRefusal::MalformedMessage, "malformed-message"),
            (TsmRefusal::MessageNotAuthentic, "message-not-authentic"),
            (TsmRefusal::InvalidCounter, "invalid-counter"),
            (TsmRefusal::CodeHashMismatch, "code-hash-mismatch"),
            (TsmRefusal::CodeSizeMismatch, "code-size-mismatch"),
            (TsmRefusal::WrongSeProfile, "wrong-se-profile"),
            (TsmRefusal::Downgrade, "downgrade"),
            (TsmRefusal::InvalidManifest, "invalid-manifest"),
            (TsmRefusal::ProvisioningNotAuthentic, "provisioning-not-authentic"),
            (TsmRefusal::DeliveryNotAuthentic, "delivery-not-authentic"),
        ];
        for (why, name) in all {
            assert_eq!(why.as_str(), name);
        }
        let error = refused(TsmRefusal::Downgrade, "version 1 is not above 2");
        assert_eq!(error.to_string(), "TSM refused (downgrade): version 1 is not above 2");
    }

    #[test]
    fn device_key_is_32_bytes_and_never_shown() {
        let rng = SystemRandom::new();
        let key = DeviceKey::generate(&rng).unwrap();
        assert_eq!(DeviceKey::from_bytes(key.as_bytes()).unwrap().as_bytes(), key.as_bytes());
        assert!(matches!(DeviceKey::from_bytes(&[0u8; 31]), Err(ProtoError::InvalidKey(_))));
        assert_eq!(format!("{key:?}"), "DeviceKey(..)");
        assert!(format!("{:?}", secrets(&rng)).contains("device_key: DeviceKey(..)"));
    }

    #[test]
    fn provisioning_opens_only_for_its_se_device_registration_and_serial() {
        let rng = SystemRandom::new();
        let se = HpkePrivateKey::generate(&rng).unwrap();
        let sent = secrets(&rng);
        let sealed = seal_provisioning(&se.public_key(), DEVICE, REGISTRATION, SE_SERIAL, &sent, &rng).unwrap();
        let opened = open_provisioning(&se, &claims(&sealed)).unwrap();
        assert_eq!(opened.device_key.as_bytes(), sent.device_key.as_bytes());
        assert_eq!(opened.payment_certificate, CERTIFICATE);

        let other_se = HpkePrivateKey::generate(&rng).unwrap();
        check_refused(open_provisioning(&other_se, &claims(&sealed)), TsmRefusal::ProvisioningNotAuthentic);
        let rebound: [fn(&mut ProvisionClaims); 4] = [
            |c| c.device_id = "dev_2".into(),
            |c| c.registration_id = "reg_2".into(),
            |c| c.se_serial = "0a1b2d".into(),
            |c| c.enc = b64::encode([4u8; 64]),
        ];
        check_each_refused(&claims(&sealed), &rebound, TsmRefusal::ProvisioningNotAuthentic, |changed| {
            open_provisioning(&se, changed)
        });
        let mut garbled = claims(&sealed);
        garbled.ciphertext.push('!');
        assert!(matches!(open_provisioning(&se, &garbled), Err(ProtoError::Malformed { .. })));
    }

    #[test]
    fn provisioned_secrets_are_bounded_and_decoded_strictly() {
        let rng = SystemRandom::new();
        let se = HpkePrivateKey::generate(&rng).unwrap();
        let oversized = ProvisionedSecrets {
            device_key: DeviceKey::generate(&rng).unwrap(),
            payment_certificate: "a".repeat(PAYMENT_CERTIFICATE_BYTES_MAX + 1),
        };
        assert!(matches!(
            seal_provisioning(&se.public_key(), DEVICE, REGISTRATION, SE_SERIAL, &oversized, &rng),
            Err(ProtoError::TooLarge { what: "payment certificate", .. })
        ));
        let longest =
            ProvisionedSecrets { payment_certificate: "a".repeat(PAYMENT_CERTIFICATE_BYTES_MAX), ..oversized };
        let sealed = seal_provisioning(&se.public_key(), DEVICE, REGISTRATION, SE_SERIAL, &longest, &rng).unwrap();
        assert_eq!(open_provisioning(&se, &claims(&sealed)).unwrap().payment_certificate, longest.payment_certificate);
        let mut padded = claims(&sealed);
        padded.ciphertext = b64::encode([0u8; PROVISIONED_SECRETS_BYTES_MAX + hpke::TAG_BYTES + 1]);
        assert!(matches!(open_provisioning(&se, &padded), Err(ProtoError::TooLarge { .. })));
        let info = joined(&[PROVISION_LABEL, DEVICE, REGISTRATION]).unwrap();
        for plaintext in [&[7u8; 31][..], &[7u8; 32][..], &[[7u8; 32].as_slice(), &[0xff]].concat()[..]] {
            let sealed = hpke::seal(&se.public_key(), &info, SE_SERIAL.as_bytes(), plaintext, &rng).unwrap();
            assert!(
                matches!(open_provisioning(&se, &claims(&sealed)), Err(ProtoError::Malformed { .. })),
                "{plaintext:?}"
            );
        }
    }

    #[test]
    fn ids_with_a_nul_byte_are_refused() {
        let rng = SystemRandom::new();
        let se = HpkePrivateKey::generate(&rng).unwrap();
        assert!(matches!(
            seal_provisioning(&se.public_key(), "dev\0reg", "x", SE_SERIAL, &secrets(&rng), &rng),
            Err(ProtoError::Malformed { what: "TSM identifier", .. })
        ));
        let key = DeviceKey::generate(&rng).unwrap();
        assert!(matches!(seal_message(&key, "dev\0", 1, &body(b"")), Err(ProtoError::Malformed { .. })));
    }

    #[test]
    fn manifest_claims_put_the_manifest_fields_at_the_top_level() {
        let claims = ManifestClaims {
            iss: "https://vouch.example".into(),
            iat: 1_700_000_000,
            manifest_id: "man_1".into(),
            manifest: manifest(b"code"),
        };
        let json = serde_json::to_value(&claims).unwrap();
        assert_eq!(json["app_id"], "com.example.pay");
        assert_eq!(json["version"], 3);
        assert_eq!(json["manifest_id"], "man_1");
        assert_eq!(serde_json::from_value::<ManifestClaims>(json).unwrap(), claims);
    }

    #[test]
    fn manifest_field_rules() {
        manifest(b"code").check().unwrap();
        let broken: [fn(&mut AppManifest); 10] = [
            |m| m.app_id = String::new(),
            |m| m.app_id = "a".repeat(APP_ID_BYTES_MAX + 1),
            |m| m.app_id = "com/example".into(),
            |m| m.version = 0,
            |m| m.code_sha256 = m.code_sha256.to_uppercase(),
            |m| m.code_sha256.truncate(63),
            |m| m.code_size = 0,
            |m| m.code_size = CODE_BYTES_MAX + 1,
            |m| m.se_profile = String::new(),
            |m| m.se_profile = "profile\n".into(),
        ];
        check_each_refused(&manifest(b"code"), &broken, TsmRefusal::InvalidManifest, AppManifest::check);
        let mut longest = manifest(b"code");
        longest.app_id = "a".repeat(APP_ID_BYTES_MAX);
        longest.se_profile = "Acme SE 2".into();
        longest.code_size = CODE_BYTES_MAX;
        longest.check().unwrap();
    }

    #[test]
    fn install_rules() {
        let code = b"payment application code";
        let good = manifest(code);
        check_install(&good, code, "vouch-app-se-1", None).unwrap();
        check_install(&good, code, "vouch-app-se-1", Some(2)).unwrap();
        check_refused(check_install(&good, code, "vouch-app-se-1", Some(3)), TsmRefusal::Downgrade);
        check_refused(check_install(&good, code, "vouch-app-se-1", Some(4)), TsmRefusal::Downgrade);
        check_refused(check_install(&good, code, "other-se", None), TsmRefusal::WrongSeProfile);
        check_refused(check_install(&good, &code[1..], "vouch-app-se-1", None), TsmRefusal::CodeSizeMismatch);
        let mut tampered = *code;
        tampered[0] ^= 1;
        check_refused(check_install(&good, &tampered, "vouch-app-se-1", None), TsmRefusal::CodeHashMismatch);
        let mut invalid = good.clone();
        invalid.version = 0;
        check_refused(check_install(&invalid, code, "vouch-app-se-1", None), TsmRefusal::InvalidManifest);
    }

    #[test]
    fn app_delivery_opens_only_for_its_app_se_device_and_manifest() {
        let rng = SystemRandom::new();
        let app_se = HpkePrivateKey::generate(&rng).unwrap();
        let jws = "eyJhbGciOiJFUzI1NiJ9.eyJhcHBfaWQiOiJjb20uZXhhbXBsZS5wYXkifQ.c2ln";
        let sealed = seal_app_delivery(&app_se.public_key(), DEVICE, "man_1", jws, &rng).unwrap();
        assert_eq!(open_app_delivery(&app_se, DEVICE, "man_1", &sealed.enc, &sealed.ciphertext).unwrap(), jws);

        let crypto_se = HpkePrivateKey::generate(&rng).unwrap();
        check_refused(
            open_app_delivery(&crypto_se, DEVICE, "man_1", &sealed.enc, &sealed.ciphertext),
            TsmRefusal::DeliveryNotAuthentic,
        );
        check_refused(
            open_app_delivery(&app_se, "dev_2", "man_1", &sealed.enc, &sealed.ciphertext),
            TsmRefusal::DeliveryNotAuthentic,
        );
        check_refused(
            open_app_delivery(&app_se, DEVICE, "man_2", &sealed.enc, &sealed.ciphertext),
            TsmRefusal::DeliveryNotAuthentic,
        );
        let oversized = "a".repeat(jws::COMPACT_BYTES_MAX + 1);
        assert!(matches!(
            seal_app_delivery(&app_se.public_key(), DEVICE, "man_1", &oversized, &rng),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn message_round_trips_and_binds_device_key_and_header() {
        let rng = SystemRandom::new();
        let key = DeviceKey::generate(&rng).unwrap();
        let sent = body(b"card data");
        let envelope = seal_message(&key, DEVICE, 7, &sent).unwrap();
        assert_eq!(envelope[..MESSAGE_HEADER_BYTES], [1, 0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(message_counter(&envelope).unwrap(), 7);
        assert_eq!(open_message(&key, DEVICE, &envelope).unwrap(), (7, sent));

        let other_device_key = DeviceKey::generate(&rng).unwrap();
        check_refused(open_message(&other_device_key, DEVICE, &envelope), TsmRefusal::MessageNotAuthentic);
        check_refused(open_message(&key, "dev_2", &envelope), TsmRefusal::MessageNotAuthentic);
        let mut replayed_as_later = envelope.clone();
        replayed_as_later[MESSAGE_HEADER_BYTES - 1] = 8;
        assert_eq!(message_counter(&replayed_as_later).unwrap(), 8);
        check_refused(open_message(&key, DEVICE, &replayed_as_later), TsmRefusal::MessageNotAuthentic);
        let mut flipped = envelope.clone();
        *flipped.last_mut().unwrap() ^= 1;
        check_refused(open_message(&key, DEVICE, &flipped), TsmRefusal::MessageNotAuthentic);
    }

    #[test]
    fn envelope_header_refusals() {
        let rng = SystemRandom::new();
        let key = DeviceKey::generate(&rng).unwrap();
        let envelope = seal_message(&key, DEVICE, 1, &body(b"x")).unwrap();

        check_refused(seal_message(&key, DEVICE, 0, &body(b"x")), TsmRefusal::InvalidCounter);
        let mut counter_zero = envelope.clone();
        counter_zero[MESSAGE_HEADER_BYTES - 1] = 0;
        check_refused(message_counter(&counter_zero), TsmRefusal::InvalidCounter);
        check_refused(open_message(&key, DEVICE, &counter_zero), TsmRefusal::InvalidCounter);

        let mut other_version = envelope.clone();
        other_version[0] = 2;
        check_refused(message_counter(&other_version), TsmRefusal::MalformedMessage);
        check_refused(open_message(&key, DEVICE, &other_version), TsmRefusal::MalformedMessage);

        for short in
            [&[][..], &envelope[..MESSAGE_HEADER_BYTES], &envelope[..MESSAGE_HEADER_BYTES + MESSAGE_TAG_BYTES - 1]]
        {
            check_refused(message_counter(short), TsmRefusal::MalformedMessage);
        }
        let mut oversized = envelope.clone();
        oversized.resize(MESSAGE_BYTES_MAX + 1, 0);
        check_refused(message_counter(&oversized), TsmRefusal::MalformedMessage);
        check_refused(open_message(&key, DEVICE, &oversized), TsmRefusal::MalformedMessage);
    }

    #[test]
    fn message_size_limits() {
        let rng = SystemRandom::new();
        let key = DeviceKey::generate(&rng).unwrap();
        let largest = MessageBody {
            payment_certificate: "a".repeat(PAYMENT_CERTIFICATE_BYTES_MAX),
            provider_id: "p".repeat(64),
            payload: vec![0xab; PAYLOAD_BYTES_MAX],
        };
        let envelope = seal_message(&key, DEVICE, 1, &largest).unwrap();
        assert!(envelope.len() <= MESSAGE_BYTES_MAX);
        assert_eq!(open_message(&key, DEVICE, &envelope).unwrap().1, largest);

        assert!(matches!(
            seal_message(&key, DEVICE, 1, &body(&[0; PAYLOAD_BYTES_MAX + 1])),
            Err(ProtoError::TooLarge { what: "message payload", .. })
        ));
        let long_certificate =
            MessageBody { payment_certificate: "a".repeat(PAYMENT_CERTIFICATE_BYTES_MAX + 1), ..body(b"x") };
        assert!(matches!(
            seal_message(&key, DEVICE, 1, &long_certificate),
            Err(ProtoError::TooLarge { what: "payment certificate", .. })
        ));
        let long_provider = MessageBody { provider_id: "p".repeat(MESSAGE_BYTES_MAX), ..body(b"x") };
        assert!(matches!(
            seal_message(&key, DEVICE, 1, &long_provider),
            Err(ProtoError::TooLarge { what: "message envelope", .. })
        ));
    }

    /// Seals `json` as a device would, to test what a body that authenticates may still hold.
    fn seal_raw(key: &DeviceKey, counter: u64, json: &[u8]) -> Vec<u8> {
        let mut header = [MESSAGE_VERSION; MESSAGE_HEADER_BYTES];
        header[1..].copy_from_slice(&counter.to_be_bytes());
        let mut sealed = json.to_vec();
        key.aead()
            .unwrap()
            .seal_in_place_append_tag(
                message_nonce(counter),
                aead::Aad::from(message_aad(DEVICE, &header).unwrap()),
                &mut sealed,
            )
            .unwrap();
        [&header[..], &sealed].concat()
    }

    #[test]
    fn authentic_but_malformed_bodies_are_refused() {
        let rng = SystemRandom::new();
        let key = DeviceKey::generate(&rng).unwrap();
        let too_long = b64::encode([0u8; PAYLOAD_BYTES_MAX + 1]);
        let long_certificate = "a".repeat(PAYMENT_CERTIFICATE_BYTES_MAX + 1);
        let bodies = [
            "not json".to_string(),
            r#"{"payment_certificate":"c","provider_id":"p"}"#.to_string(),
            r#"{"payment_certificate":"c","provider_id":"p","payload":"+/+/"}"#.to_string(),
            r#"{"payment_certificate":"c","provider_id":"p","payload":"","extra":1}"#.to_string(),
            format!(r#"{{"payment_certificate":"c","provider_id":"p","payload":"{too_long}"}}"#),
            format!(r#"{{"payment_certificate":"{long_certificate}","provider_id":"p","payload":""}}"#),
        ];
        for json in bodies {
            check_refused(
                open_message(&key, DEVICE, &seal_raw(&key, 1, json.as_bytes())),
                TsmRefusal::MalformedMessage,
            );
        }
        let good = r#"{"payment_certificate":"c","provider_id":"p","payload":"AQI"}"#;
        let (_, opened) = open_message(&key, DEVICE, &seal_raw(&key, 1, good.as_bytes())).unwrap();
        assert_eq!(opened.payload, [1, 2]);
    }

    fn relay(sealed: &Sealed) -> RelayEnvelope {
        RelayEnvelope {
            message_id: "msg_1".into(),
            provider_id: "prov_1".into(),
            device_id: DEVICE.into(),
            counter: 7,
            enc: b64::encode(sealed.enc),
            ciphertext: b64::encode(&sealed.ciphertext),
            created_at: 1_700_000_000,
        }
    }

    #[test]
    fn relay_opens_only_for_its_provider_message_device_and_counter() {
        let rng = SystemRandom::new();
        let provider = HpkePrivateKey::generate(&rng).unwrap();
        let sent = body(b"card data");
        let sealed = seal_relay(&provider.public_key(), "msg_1", "prov_1", DEVICE, 7, &sent, &rng).unwrap();
        assert_eq!(open_relay(&provider, &relay(&sealed)).unwrap(), sent);

        let other_provider = HpkePrivateKey::generate(&rng).unwrap();
        check_refused(open_relay(&other_provider, &relay(&sealed)), TsmRefusal::MessageNotAuthentic);
        let rebound: [fn(&mut RelayEnvelope); 4] = [
            |r| r.message_id = "msg_2".into(),
            |r| r.provider_id = "prov_2".into(),
            |r| r.device_id = "dev_2".into(),
            |r| r.counter = 8,
        ];
        check_each_refused(&relay(&sealed), &rebound, TsmRefusal::MessageNotAuthentic, |changed| {
            open_relay(&provider, changed)
        });

        let misaddressed = seal_relay(
            &provider.public_key(),
            "msg_1",
            "prov_1",
            DEVICE,
            7,
            &MessageBody { provider_id: "prov_2".into(), ..body(b"x") },
            &rng,
        )
        .unwrap();
        check_refused(open_relay(&provider, &relay(&misaddressed)), TsmRefusal::MessageNotAuthentic);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn message_and_relay_round_trip(
            counter in 1u64..,
            device_id in "[a-z0-9_]{1,40}",
            provider_id in "[a-z0-9_]{1,40}",
            payload in proptest::collection::vec(any::<u8>(), 0..PAYLOAD_BYTES_MAX),
        ) {
            let rng = SystemRandom::new();
            let key = DeviceKey::generate(&rng).unwrap();
            let sent = MessageBody { provider_id: provider_id.clone(), ..body(&payload) };
            let envelope = seal_message(&key, &device_id, counter, &sent).unwrap();
            prop_assert_eq!(message_counter(&envelope).unwrap(), counter);
            let (opened_counter, opened) = open_message(&key, &device_id, &envelope).unwrap();
            prop_assert_eq!(opened_counter, counter);
            prop_assert_eq!(&opened, &sent);

            let provider = HpkePrivateKey::generate(&rng).unwrap();
            let sealed = seal_relay(&provider.public_key(), "msg_1", &provider_id, &device_id, counter, &opened, &rng).unwrap();
            let envelope = RelayEnvelope { provider_id, device_id, counter, ..relay(&sealed) };
            prop_assert_eq!(open_relay(&provider, &envelope).unwrap(), sent);
        }

        #[test]
        fn provisioning_round_trips(
            key in any::<[u8; DEVICE_KEY_BYTES]>(),
            certificate in "[A-Za-z0-9._-]{1,2048}",
            registration_id in "[a-z0-9_]{1,40}",
        ) {
            let rng = SystemRandom::new();
            let se = HpkePrivateKey::generate(&rng).unwrap();
            let sent = ProvisionedSecrets { device_key: DeviceKey::from_bytes(&key).unwrap(), payment_certificate: certificate };
            let sealed = seal_provisioning(&se.public_key(), DEVICE, &registration_id, SE_SERIAL, &sent, &rng).unwrap();
            let opened = open_provisioning(&se, &ProvisionClaims { registration_id, ..claims(&sealed) }).unwrap();
            prop_assert_eq!(opened.device_key.as_bytes(), &key);
            prop_assert_eq!(opened.payment_certificate, sent.payment_certificate);
        }

        #[test]
        fn arbitrary_envelopes_never_panic(envelope in proptest::collection::vec(any::<u8>(), 0..128)) {
            let key = DeviceKey::from_bytes(&[9u8; DEVICE_KEY_BYTES]).unwrap();
            let _ = message_counter(&envelope);
            prop_assert!(open_message(&key, DEVICE, &envelope).is_err());
        }
    }
}
