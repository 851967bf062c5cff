//! The two payloads that cross by sound, each a CBOR sequence (RFC 8742) of two tagged
//! COSE_Sign1 items written back to back:
//! - leg (a), POS -> phone: [`PaymentOffer`], the terminal certificate then the payment
//!   request, so an offline phone can check the request with only its pinned server key;
//! - leg (b), phone -> POS: [`ApprovalReply`], the consumer approval then the phone's
//!   offline credential, so the POS can check the approval before it countersigns.
//!
//! Parsing is strict: exactly two complete items, nothing after them, each within
//! [`COSE_SIGN1_BYTES_MAX`], each a COSE_Sign1 in Vouch's one encoding whose payload is
//! the message expected at its place. Signatures are not checked here: the `verify_*`
//! functions of [`crate::offline`] do that with the bytes this hands out.

use super::{
    ConsumerApproval, OfflineCheck, OfflineCredential, PaymentRequest, Signed, TerminalCertificate, WireType, refused,
};
use crate::ProtoError;
use crate::cose::{COSE_SIGN1_BYTES_MAX, UnverifiedSign1};

/// Upper bound on a sound payload: two items at their limit.
pub const OFFLINE_SEQUENCE_BYTES_MAX: usize = 2 * COSE_SIGN1_BYTES_MAX;

/// Leg (a) as it crosses by sound: the terminal certificate, then the payment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentOffer {
    certificate: Vec<u8>,
    request: Vec<u8>,
}

impl PaymentOffer {
    const WHAT: &'static str = "payment offer";

    pub fn new(certificate: &Signed<TerminalCertificate>, request: &Signed<PaymentRequest>) -> Self {
        PaymentOffer { certificate: certificate.bytes().to_vec(), request: request.bytes().to_vec() }
    }

    /// The CBOR sequence to send.
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.certificate.as_slice(), self.request.as_slice()].concat()
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let (certificate, request) = split::<TerminalCertificate, PaymentRequest>(Self::WHAT, bytes)?;
        Ok(PaymentOffer { certificate, request })
    }

    /// The terminal certificate's COSE_Sign1, not yet verified.
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// The payment request's COSE_Sign1, not yet verified.
    pub fn request(&self) -> &[u8] {
        &self.request
    }
}

/// Leg (b) as it crosses by sound: the consumer approval, then the offline credential it
/// is made under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalReply {
    approval: Vec<u8>,
    credential: Vec<u8>,
}

impl ApprovalReply {
    const WHAT: &'static str = "approval reply";

    pub fn new(approval: &Signed<ConsumerApproval>, credential: &Signed<OfflineCredential>) -> Self {
        ApprovalReply { approval: approval.bytes().to_vec(), credential: credential.bytes().to_vec() }
    }

    /// The CBOR sequence to send.
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.approval.as_slice(), self.credential.as_slice()].concat()
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let (approval, credential) = split::<ConsumerApproval, OfflineCredential>(Self::WHAT, bytes)?;
        Ok(ApprovalReply { approval, credential })
    }

    /// The consumer approval's COSE_Sign1, not yet verified.
    pub fn approval(&self) -> &[u8] {
        &self.approval
    }

    /// The offline credential's COSE_Sign1, not yet verified.
    pub fn credential(&self) -> &[u8] {
        &self.credential
    }
}

/// Splits `bytes` into exactly two items, the first a `A`, the second a `B`.
fn split<A: WireType, B: WireType>(what: &'static str, bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ProtoError> {
    if bytes.len() > OFFLINE_SEQUENCE_BYTES_MAX {
        return Err(ProtoError::TooLarge { what, len: bytes.len(), max: OFFLINE_SEQUENCE_BYTES_MAX });
    }
    let (first, rest) = next_item::<A>(what, 1, bytes)?;
    if rest.is_empty() {
        return Err(refused(OfflineCheck::Sequence, format!("{what}: one item, expected a {} after it", B::WHAT)));
    }
    let (second, rest) = next_item::<B>(what, 2, rest)?;
    if !rest.is_empty() {
        return Err(refused(
            OfflineCheck::Sequence,
            format!("{what}: {} bytes after the two items, expected none", rest.len()),
        ));
    }
    Ok((first.to_vec(), second.to_vec()))
}

/// The first CBOR item of `bytes`, checked to be a COSE_Sign1 carrying a `T`, and what
/// follows it.
fn next_item<'a, T: WireType>(
    what: &'static str,
    position: u8,
    bytes: &'a [u8],
) -> Result<(&'a [u8], &'a [u8]), ProtoError> {
    let mut rest = bytes;
    // Decoding reads exactly one item, so what is left tells where it ended.
    coset::cbor::de::from_reader::<coset::cbor::value::Value, _>(&mut rest).map_err(|e| {
        refused(OfflineCheck::Sequence, format!("{what}: item {position} ({}) is cut short or not CBOR: {e}", T::WHAT))
    })?;
    let (item, rest) = bytes.split_at(bytes.len() - rest.len());
    let sign1 = UnverifiedSign1::parse(item)?;
    T::from_cbor(sign1.payload_unverified()).map_err(|e| match e {
        ProtoError::OfflineRefused { check, detail } => {
            ProtoError::OfflineRefused { check, detail: format!("{what}: item {position}: {detail}") }
        }
        other => other,
    })?;
    Ok((item, rest))
}
