//! Offline payments: the wire types and the pure checks of a purchase made while the
//! consumer's phone is offline, and of its settlement.
//!
//! Every message is a CBOR map with small integer keys `1..=n`, in order, inside a tagged
//! ES256 COSE_Sign1 ([`crate::cose`]). Ids are the 16 bytes of the UUID behind the server's
//! id, hashes are 32-byte SHA-256 digests, public keys are uncompressed SEC1 P-256 points
//! (65 bytes; what [`VerifyingKey::sec1`] holds, so no point decompression is needed),
//! amounts are minor units, currencies ISO 4217 numeric codes, times Unix seconds.
//!
//! A purchase has three legs:
//! - (a) [`PaymentRequest`], signed by the terminal, whose key a [`TerminalCertificate`]
//!   from the server vouches for;
//! - (b) [`ConsumerApproval`], signed by the phone with the key in its
//!   [`OfflineCredential`], binding SHA-256 of the exact signed bytes of (a);
//! - (c) [`MerchantCountersignature`], signed by the terminal over
//!   [`countersignature_digest`]: SHA-256 of the bytes of (a) followed directly by the
//!   bytes of (b). Each is one complete CBOR item, so the concatenation is a CBOR
//!   sequence (RFC 8742) that splits one way only.
//!
//! Each message type is signed with its own COSE external data ([`WireType::AAD`]), so a
//! signature made for one type never verifies as another, even under the same key, at no
//! cost on the wire. Legs (a) and (b) carry no key id: the verifier already knows the key
//! from the certificate or the credential. Server-signed objects carry the server's kid.
//!
//! Legs (a) and (b) cross by sound together with what their receiver needs to check them
//! offline: [`PaymentOffer`] (certificate + request) and [`ApprovalReply`] (approval +
//! credential), each a CBOR sequence of two COSE_Sign1 items.
//!
//! Payloads are decoded strictly: exactly the expected keys, in the deterministic
//! encoding (decoding and encoding again gives the same bytes), fixed-length byte strings
//! where the field is fixed-length.

mod sequence;

use coset::cbor::value::{Integer, Value};

use crate::{
    ProtoError, SigningKey, VerifyingKey, cose,
    crypto::{SecureRandom, sha256},
};

pub use sequence::{ApprovalReply, OFFLINE_SEQUENCE_BYTES_MAX, PaymentOffer, SignedPair};

pub const ID_BYTES: usize = 16;
pub const NONCE_BYTES: usize = 16;
pub const DIGEST_BYTES: usize = 32;
pub const P256_SEC1_BYTES: usize = 65;
pub const MERCHANT_NAME_BYTES_MAX: usize = 64;
/// ISO 4217 numeric codes are three digits.
pub const CURRENCY_CODE_MAX: u16 = 999;

/// ISO 4217 numeric code of each alphabetic code accounts are opened in: credentials
/// and requests carry the numeric one, people and the HTTP API the alphabetic one.
const CURRENCIES: &[(&str, u16)] = &[
    ("AUD", 36),
    ("CAD", 124),
    ("CHF", 756),
    ("CZK", 203),
    ("DKK", 208),
    ("EUR", 978),
    ("GBP", 826),
    ("JPY", 392),
    ("NOK", 578),
    ("PLN", 985),
    ("SEK", 752),
    ("USD", 840),
];

/// The ISO 4217 numeric code of a supported alphabetic one, e.g. `EUR` -> 978.
pub fn currency_numeric(alpha: &str) -> Option<u16> {
    CURRENCIES.iter().find(|(code, _)| *code == alpha).map(|(_, numeric)| *numeric)
}

/// The alphabetic code of a supported ISO 4217 numeric one, e.g. 978 -> `EUR`.
pub fn currency_alpha(numeric: u16) -> Option<&'static str> {
    CURRENCIES.iter().find(|(_, code)| *code == numeric).map(|(alpha, _)| *alpha)
}

/// A server id on the wire: the 16 bytes of its UUID.
pub type Id = [u8; ID_BYTES];
pub type Digest = [u8; DIGEST_BYTES];

/// Which check of an offline payment failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OfflineCheck {
    /// The payload is not the expected CBOR map.
    Payload,
    /// The server's signature on a credential, certificate or receipt.
    ServerSignature,
    /// The terminal certificate has expired (at verification, or at the request's time).
    TerminalCertificateExpired,
    /// The terminal's signature on the payment request.
    TerminalSignature,
    /// The request names another merchant or terminal than the certificate.
    TerminalMismatch,
    /// The phone's signature on the approval.
    PhoneSignature,
    /// The approval hashes another payment request.
    RequestHash,
    /// The approval names another credential.
    CredentialId,
    /// The approval's counter is below the credential's counter start.
    CounterBelowStart,
    /// The credential was not yet issued at the payment's time.
    CredentialNotYetValid,
    /// The credential had expired at the payment's time.
    CredentialExpired,
    /// The request's currency is not the credential's.
    CurrencyMismatch,
    /// The amount is over the credential's limit or the remaining limit.
    OverLimit,
    /// The terminal's signature on the countersignature.
    CountersignatureSignature,
    /// The countersignature covers other bytes than this request and approval.
    CountersignatureBinding,
    /// A sound payload is not exactly two complete COSE_Sign1 items.
    Sequence,
}

impl OfflineCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            OfflineCheck::Payload => "payload",
            OfflineCheck::ServerSignature => "server-signature",
            OfflineCheck::TerminalCertificateExpired => "terminal-certificate-expired",
            OfflineCheck::TerminalSignature => "terminal-signature",
            OfflineCheck::TerminalMismatch => "terminal-mismatch",
            OfflineCheck::PhoneSignature => "phone-signature",
            OfflineCheck::RequestHash => "request-hash",
            OfflineCheck::CredentialId => "credential-id",
            OfflineCheck::CounterBelowStart => "counter-below-start",
            OfflineCheck::CredentialNotYetValid => "credential-not-yet-valid",
            OfflineCheck::CredentialExpired => "credential-expired",
            OfflineCheck::CurrencyMismatch => "currency-mismatch",
            OfflineCheck::OverLimit => "over-limit",
            OfflineCheck::CountersignatureSignature => "countersignature-signature",
            OfflineCheck::CountersignatureBinding => "countersignature-binding",
            OfflineCheck::Sequence => "sequence",
        }
    }
}

fn refused(check: OfflineCheck, detail: impl ToString) -> ProtoError {
    ProtoError::OfflineRefused { check, detail: detail.to_string() }
}

/// A message together with the exact bytes that were signed: only signing or one of the
/// `verify_*` functions makes one, so holding it means the signature was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<T> {
    bytes: Vec<u8>,
    value: T,
}

impl<T> Signed<T> {
    /// The tagged COSE_Sign1, as sent.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn value(&self) -> &T {
        &self.value
    }

    pub fn into_parts(self) -> (Vec<u8>, T) {
        (self.bytes, self.value)
    }
}

/// A message type: its CBOR payload and the COSE external data it is signed with.
pub trait WireType: Sized {
    const WHAT: &'static str;
    /// External data of the Sig_structure, one per type.
    const AAD: &'static [u8];

    fn to_fields(&self) -> Vec<Value>;
    fn from_fields(fields: Fields) -> Result<Self, ProtoError>;

    /// The CBOR payload: a map with keys `1..=n` in order.
    fn to_cbor(&self) -> Vec<u8> {
        let map =
            self.to_fields().into_iter().zip(1u8..).map(|(value, key)| (Value::Integer(key.into()), value)).collect();
        let mut out = Vec::new();
        // Invariant: writing integers, byte and text strings to a Vec cannot fail.
        coset::cbor::ser::into_writer(&Value::Map(map), &mut out).expect("CBOR into a Vec");
        out
    }

    fn from_cbor(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut rest = bytes;
        let value: Value = coset::cbor::de::from_reader(&mut rest)
            .map_err(|e| refused(OfflineCheck::Payload, format!("{}: not CBOR: {e}", Self::WHAT)))?;
        if !rest.is_empty() {
            return Err(refused(OfflineCheck::Payload, format!("{}: {} bytes after the map", Self::WHAT, rest.len())));
        }
        let Value::Map(entries) = value else {
            return Err(refused(OfflineCheck::Payload, format!("{}: expected a map", Self::WHAT)));
        };
        let mut values = Vec::with_capacity(entries.len());
        for (expected, (key, value)) in (1u8..).zip(entries) {
            if key != Value::Integer(expected.into()) {
                return Err(refused(
                    OfflineCheck::Payload,
                    format!("{}: key {key:?} where key {expected} was expected", Self::WHAT),
                ));
            }
            values.push(value);
        }
        let message = Self::from_fields(Fields { what: Self::WHAT, values: values.into_iter(), position: 0 })?;
        if message.to_cbor() != bytes {
            return Err(refused(OfflineCheck::Payload, format!("{}: not in deterministic CBOR encoding", Self::WHAT)));
        }
        Ok(message)
    }

    /// Signs the payload as a COSE_Sign1 with this type's external data. Values the
    /// decoder would refuse (a currency over 999, a name too long) are refused here too.
    fn sign(self, kid: Option<&[u8]>, key: &SigningKey, rng: &dyn SecureRandom) -> Result<Signed<Self>, ProtoError> {
        let payload = self.to_cbor();
        Self::from_cbor(&payload)?;
        let bytes = cose::sign1_with_aad(&payload, Self::AAD, kid, key, rng)?;
        Ok(Signed { bytes, value: self })
    }
}

/// The values of a payload map in key order, read off one by one.
#[derive(Debug)]
pub struct Fields {
    what: &'static str,
    values: std::vec::IntoIter<Value>,
    position: usize,
}

impl Fields {
    fn next(&mut self, name: &str) -> Result<Value, ProtoError> {
        self.position += 1;
        self.values
            .next()
            .ok_or_else(|| refused(OfflineCheck::Payload, format!("{}: no key {} ({name})", self.what, self.position)))
    }

    fn wrong(&self, name: &str, expected: &str) -> ProtoError {
        refused(OfflineCheck::Payload, format!("{}: {name} (key {}) is not {expected}", self.what, self.position))
    }

    fn bytes<const N: usize>(&mut self, name: &str) -> Result<[u8; N], ProtoError> {
        match self.next(name)? {
            Value::Bytes(b) => b.try_into().map_err(|_| self.wrong(name, &format!("a {N}-byte string"))),
            _ => Err(self.wrong(name, &format!("a {N}-byte string"))),
        }
    }

    fn uint(&mut self, name: &str) -> Result<u64, ProtoError> {
        match self.next(name)? {
            Value::Integer(i) => u64::try_from(i).map_err(|_| self.wrong(name, "an unsigned 64-bit integer")),
            _ => Err(self.wrong(name, "an unsigned 64-bit integer")),
        }
    }

    fn time(&mut self, name: &str) -> Result<i64, ProtoError> {
        match self.next(name)? {
            Value::Integer(i) => i64::try_from(i).map_err(|_| self.wrong(name, "a 64-bit time in seconds")),
            _ => Err(self.wrong(name, "a 64-bit time in seconds")),
        }
    }

    fn currency(&mut self, name: &str) -> Result<u16, ProtoError> {
        match u16::try_from(self.uint(name)?) {
            Ok(code) if code <= CURRENCY_CODE_MAX => Ok(code),
            _ => Err(self.wrong(name, "an ISO 4217 numeric code (0-999)")),
        }
    }

    fn key(&mut self, name: &str) -> Result<VerifyingKey, ProtoError> {
        let point: [u8; P256_SEC1_BYTES] = self.bytes(name)?;
        VerifyingKey::from_sec1(&point)
            .map_err(|e| refused(OfflineCheck::Payload, format!("{}: {name}: {e}", self.what)))
    }

    fn text(&mut self, name: &str, max: usize) -> Result<String, ProtoError> {
        match self.next(name)? {
            Value::Text(t) if t.len() <= max => Ok(t),
            _ => Err(self.wrong(name, &format!("a text string of at most {max} bytes"))),
        }
    }

    fn end(mut self) -> Result<(), ProtoError> {
        if self.values.next().is_some() {
            return Err(refused(
                OfflineCheck::Payload,
                format!("{}: more than the {} expected keys", self.what, self.position),
            ));
        }
        Ok(())
    }
}

fn bstr(bytes: &[u8]) -> Value {
    Value::Bytes(bytes.to_vec())
}

fn uint(n: u64) -> Value {
    Value::Integer(Integer::from(n))
}

fn int(n: i64) -> Value {
    Value::Integer(Integer::from(n))
}

/// The phone's permission to pay offline, signed by the server (with its kid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineCredential {
    pub credential_id: Id,
    pub phone_key: VerifyingKey,
    pub limit_minor: u64,
    pub currency: u16,
    /// The first counter value the phone may use under this credential.
    pub counter_start: u64,
    /// Last second at which a payment may be made under it.
    pub not_after: i64,
    pub issued_at: i64,
}

impl OfflineCredential {
    /// Whether a payment made at `time` falls within the credential's validity.
    pub fn check_valid_at(&self, time: i64) -> Result<(), ProtoError> {
        if time < self.issued_at {
            return Err(refused(
                OfflineCheck::CredentialNotYetValid,
                format!("payment at {time}, credential issued at {}", self.issued_at),
            ));
        }
        if time > self.not_after {
            return Err(refused(
                OfflineCheck::CredentialExpired,
                format!("payment at {time}, credential valid until {}", self.not_after),
            ));
        }
        Ok(())
    }
}

impl WireType for OfflineCredential {
    const WHAT: &'static str = "offline credential";
    const AAD: &'static [u8] = b"vouch/offline/credential/v1";

    fn to_fields(&self) -> Vec<Value> {
        vec![
            bstr(&self.credential_id),
            bstr(self.phone_key.sec1()),
            uint(self.limit_minor),
            uint(self.currency.into()),
            uint(self.counter_start),
            int(self.not_after),
            int(self.issued_at),
        ]
    }

    fn from_fields(mut f: Fields) -> Result<Self, ProtoError> {
        let credential = OfflineCredential {
            credential_id: f.bytes("credential id")?,
            phone_key: f.key("phone key")?,
            limit_minor: f.uint("limit")?,
            currency: f.currency("currency")?,
            counter_start: f.uint("counter start")?,
            not_after: f.time("not after")?,
            issued_at: f.time("issued at")?,
        };
        f.end()?;
        Ok(credential)
    }
}

/// The server's certificate of a terminal's key (with the server's kid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalCertificate {
    pub terminal_id: Id,
    pub merchant_id: Id,
    /// Shown to the consumer on the phone before approving.
    pub merchant_name: String,
    pub terminal_key: VerifyingKey,
    pub not_after: i64,
}

impl WireType for TerminalCertificate {
    const WHAT: &'static str = "terminal certificate";
    const AAD: &'static [u8] = b"vouch/offline/terminal-certificate/v1";

    fn to_fields(&self) -> Vec<Value> {
        vec![
            bstr(&self.terminal_id),
            bstr(&self.merchant_id),
            Value::Text(self.merchant_name.clone()),
            bstr(self.terminal_key.sec1()),
            int(self.not_after),
        ]
    }

    fn from_fields(mut f: Fields) -> Result<Self, ProtoError> {
        let certificate = TerminalCertificate {
            terminal_id: f.bytes("terminal id")?,
            merchant_id: f.bytes("merchant id")?,
            merchant_name: f.text("merchant name", MERCHANT_NAME_BYTES_MAX)?,
            terminal_key: f.key("terminal key")?,
            not_after: f.time("not after")?,
        };
        f.end()?;
        Ok(certificate)
    }
}

/// Leg (a): the terminal asks for a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequest {
    pub merchant_id: Id,
    pub terminal_id: Id,
    pub amount_minor: u64,
    pub currency: u16,
    pub nonce: [u8; NONCE_BYTES],
    pub time: i64,
}

impl WireType for PaymentRequest {
    const WHAT: &'static str = "payment request";
    const AAD: &'static [u8] = b"vouch/offline/payment-request/v1";

    fn to_fields(&self) -> Vec<Value> {
        vec![
            bstr(&self.merchant_id),
            bstr(&self.terminal_id),
            uint(self.amount_minor),
            uint(self.currency.into()),
            bstr(&self.nonce),
            int(self.time),
        ]
    }

    fn from_fields(mut f: Fields) -> Result<Self, ProtoError> {
        let request = PaymentRequest {
            merchant_id: f.bytes("merchant id")?,
            terminal_id: f.bytes("terminal id")?,
            amount_minor: f.uint("amount")?,
            currency: f.currency("currency")?,
            nonce: f.bytes("nonce")?,
            time: f.time("time")?,
        };
        f.end()?;
        Ok(request)
    }
}

/// Leg (b): the phone approves one payment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerApproval {
    /// SHA-256 of the exact signed bytes (the whole COSE_Sign1) of leg (a).
    pub request_hash: Digest,
    pub credential_id: Id,
    /// The phone's monotonic counter; each value is spent at most once per credential.
    pub counter: u64,
    pub time: i64,
}

impl WireType for ConsumerApproval {
    const WHAT: &'static str = "consumer approval";
    const AAD: &'static [u8] = b"vouch/offline/consumer-approval/v1";

    fn to_fields(&self) -> Vec<Value> {
        vec![bstr(&self.request_hash), bstr(&self.credential_id), uint(self.counter), int(self.time)]
    }

    fn from_fields(mut f: Fields) -> Result<Self, ProtoError> {
        let approval = ConsumerApproval {
            request_hash: f.bytes("request hash")?,
            credential_id: f.bytes("credential id")?,
            counter: f.uint("counter")?,
            time: f.time("time")?,
        };
        f.end()?;
        Ok(approval)
    }
}

/// Leg (c): the terminal countersigns a request and the approval it checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerchantCountersignature {
    /// [`countersignature_digest`] of legs (a) and (b).
    pub digest: Digest,
    pub time: i64,
}

impl WireType for MerchantCountersignature {
    const WHAT: &'static str = "merchant countersignature";
    const AAD: &'static [u8] = b"vouch/offline/merchant-countersignature/v1";

    fn to_fields(&self) -> Vec<Value> {
        vec![bstr(&self.digest), int(self.time)]
    }

    fn from_fields(mut f: Fields) -> Result<Self, ProtoError> {
        let countersignature = MerchantCountersignature { digest: f.bytes("digest")?, time: f.time("time")? };
        f.end()?;
        Ok(countersignature)
    }
}

/// The server's receipt of a settled payment (with the server's kid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedReceipt {
    /// [`payment_id`]: SHA-256 of the signed approval's bytes.
    pub payment_id: Digest,
    pub transfer_id: Digest,
    pub amount_minor: u64,
    pub currency: u16,
    pub settled_at: i64,
}

impl WireType for SignedReceipt {
    const WHAT: &'static str = "receipt";
    const AAD: &'static [u8] = b"vouch/offline/receipt/v1";

    fn to_fields(&self) -> Vec<Value> {
        vec![
            bstr(&self.payment_id),
            bstr(&self.transfer_id),
            uint(self.amount_minor),
            uint(self.currency.into()),
            int(self.settled_at),
        ]
    }

    fn from_fields(mut f: Fields) -> Result<Self, ProtoError> {
        let receipt = SignedReceipt {
            payment_id: f.bytes("payment id")?,
            transfer_id: f.bytes("transfer id")?,
            amount_minor: f.uint("amount")?,
            currency: f.currency("currency")?,
            settled_at: f.time("settled at")?,
        };
        f.end()?;
        Ok(receipt)
    }
}

/// A payment's id: SHA-256 of the exact bytes of its signed approval (leg (b)).
pub fn payment_id(approval_bytes: &[u8]) -> Digest {
    sha256(approval_bytes)
}

/// What leg (c) signs: SHA-256(bytes of (a) || bytes of (b)), each the whole tagged
/// COSE_Sign1 as sent, with nothing between them.
pub fn countersignature_digest(request_bytes: &[u8], approval_bytes: &[u8]) -> Digest {
    let mut both = Vec::with_capacity(request_bytes.len() + approval_bytes.len());
    both.extend_from_slice(request_bytes);
    both.extend_from_slice(approval_bytes);
    sha256(&both)
}

/// Verifies a COSE_Sign1 of type `T` with a known key; a signature that does not verify
/// is refused as `check`.
fn verify_with<T: WireType>(bytes: &[u8], key: &VerifyingKey, check: OfflineCheck) -> Result<Signed<T>, ProtoError> {
    let verified = cose::verify1_with_key(bytes, key, T::AAD).map_err(|e| match e {
        ProtoError::BadSignature => refused(check, format!("{}: signature does not verify", T::WHAT)),
        other => other,
    })?;
    Ok(Signed { bytes: bytes.to_vec(), value: T::from_cbor(&verified.payload)? })
}

/// Verifies a server-signed object, with the server key its kid names.
fn verify_server_signed<T, F>(bytes: &[u8], server_key_for_kid: F) -> Result<Signed<T>, ProtoError>
where
    T: WireType,
    F: FnOnce(Option<&[u8]>) -> Result<VerifyingKey, ProtoError>,
{
    let sign1 = cose::UnverifiedSign1::parse(bytes)?;
    let key = server_key_for_kid(sign1.kid())?;
    verify_with(bytes, &key, OfflineCheck::ServerSignature)
}

/// Verifies an offline credential's server signature. Its validity in time is checked
/// separately, at the payment's time ([`OfflineCredential::check_valid_at`]).
pub fn verify_credential<F>(bytes: &[u8], server_key_for_kid: F) -> Result<Signed<OfflineCredential>, ProtoError>
where
    F: FnOnce(Option<&[u8]>) -> Result<VerifyingKey, ProtoError>,
{
    verify_server_signed(bytes, server_key_for_kid)
}

/// Verifies a terminal certificate's server signature and that it has not expired at `now`.
pub fn verify_terminal_certificate<F>(
    bytes: &[u8],
    server_key_for_kid: F,
    now: i64,
) -> Result<Signed<TerminalCertificate>, ProtoError>
where
    F: FnOnce(Option<&[u8]>) -> Result<VerifyingKey, ProtoError>,
{
    let certificate: Signed<TerminalCertificate> = verify_server_signed(bytes, server_key_for_kid)?;
    if now > certificate.value.not_after {
        return Err(refused(
            OfflineCheck::TerminalCertificateExpired,
            format!("now {now}, certificate valid until {}", certificate.value.not_after),
        ));
    }
    Ok(certificate)
}

/// Verifies leg (a): signed by the certified terminal key, naming the certificate's
/// merchant and terminal, made while the certificate was valid.
pub fn verify_payment_request(
    bytes: &[u8],
    certificate: &TerminalCertificate,
) -> Result<Signed<PaymentRequest>, ProtoError> {
    let request: Signed<PaymentRequest> =
        verify_with(bytes, &certificate.terminal_key, OfflineCheck::TerminalSignature)?;
    let r = &request.value;
    if r.merchant_id != certificate.merchant_id || r.terminal_id != certificate.terminal_id {
        return Err(refused(
            OfflineCheck::TerminalMismatch,
            "request names another merchant or terminal than its certificate",
        ));
    }
    if r.time > certificate.not_after {
        return Err(refused(
            OfflineCheck::TerminalCertificateExpired,
            format!("request at {}, certificate valid until {}", r.time, certificate.not_after),
        ));
    }
    Ok(request)
}

/// Verifies leg (b) against the verified request and the phone's credential: the phone's
/// signature, the hash of the request's bytes, the credential id, the counter at or above
/// the credential's start, the approval's time within the credential's validity (the
/// payment's time), the currency, and the amount within both the credential's limit and
/// `remaining_limit_minor` (what is left of it, known to the caller).
pub fn verify_approval(
    bytes: &[u8],
    request: &Signed<PaymentRequest>,
    credential: &OfflineCredential,
    remaining_limit_minor: u64,
) -> Result<Signed<ConsumerApproval>, ProtoError> {
    let approval: Signed<ConsumerApproval> = verify_with(bytes, &credential.phone_key, OfflineCheck::PhoneSignature)?;
    let a = &approval.value;
    if a.request_hash != sha256(&request.bytes) {
        return Err(refused(OfflineCheck::RequestHash, "the approval hashes another payment request"));
    }
    if a.credential_id != credential.credential_id {
        return Err(refused(OfflineCheck::CredentialId, "the approval names another credential"));
    }
    if a.counter < credential.counter_start {
        return Err(refused(
            OfflineCheck::CounterBelowStart,
            format!("counter {}, expected at least {}", a.counter, credential.counter_start),
        ));
    }
    credential.check_valid_at(a.time)?;
    let r = &request.value;
    if r.currency != credential.currency {
        return Err(refused(
            OfflineCheck::CurrencyMismatch,
            format!("request in {:03}, credential in {:03}", r.currency, credential.currency),
        ));
    }
    let limit = credential.limit_minor.min(remaining_limit_minor);
    if r.amount_minor > limit {
        return Err(refused(OfflineCheck::OverLimit, format!("amount {}, limit left {limit}", r.amount_minor)));
    }
    Ok(approval)
}

/// Verifies leg (c): signed by the certified terminal key over exactly this request and
/// approval.
pub fn verify_countersignature(
    bytes: &[u8],
    request: &Signed<PaymentRequest>,
    approval: &Signed<ConsumerApproval>,
    certificate: &TerminalCertificate,
) -> Result<Signed<MerchantCountersignature>, ProtoError> {
    let countersignature: Signed<MerchantCountersignature> =
        verify_with(bytes, &certificate.terminal_key, OfflineCheck::CountersignatureSignature)?;
    if countersignature.value.digest != countersignature_digest(&request.bytes, &approval.bytes) {
        return Err(refused(
            OfflineCheck::CountersignatureBinding,
            "countersigned other bytes than this request and approval",
        ));
    }
    Ok(countersignature)
}

/// Verifies a receipt's server signature.
pub fn verify_receipt<F>(bytes: &[u8], server_key_for_kid: F) -> Result<Signed<SignedReceipt>, ProtoError>
where
    F: FnOnce(Option<&[u8]>) -> Result<VerifyingKey, ProtoError>,
{
    verify_server_signed(bytes, server_key_for_kid)
}

#[cfg(test)]
mod tests;
