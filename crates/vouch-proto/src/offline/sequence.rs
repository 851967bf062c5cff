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

use std::marker::PhantomData;

use super::{
    ConsumerApproval, OfflineCheck, OfflineCredential, PaymentRequest, Signed, TerminalCertificate, WireType, refused,
};
use crate::ProtoError;
use crate::cose::{COSE_SIGN1_BYTES_MAX, UnverifiedSign1};

/// Upper bound on a sound payload: two items at their limit.
pub const OFFLINE_SEQUENCE_BYTES_MAX: usize = 2 * COSE_SIGN1_BYTES_MAX;

const SEQUENCE: &str = "sound payload";

/// Two tagged COSE_Sign1 items back to back, the first carrying an `A`, the second a
/// `B`: made from two signed messages, or parsed from received bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPair<A, B> {
    first: Vec<u8>,
    second: Vec<u8>,
    _carries: PhantomData<(A, B)>,
}

/// Leg (a) as it crosses by sound: the terminal certificate, then the payment request.
pub type PaymentOffer = SignedPair<TerminalCertificate, PaymentRequest>;

/// Leg (b) as it crosses by sound: the consumer approval, then the offline credential
/// it is made under.
pub type ApprovalReply = SignedPair<ConsumerApproval, OfflineCredential>;

impl<A: WireType, B: WireType> SignedPair<A, B> {
    pub fn new(first: &Signed<A>, second: &Signed<B>) -> Self {
        SignedPair { first: first.bytes().to_vec(), second: second.bytes().to_vec(), _carries: PhantomData }
    }

    /// The CBOR sequence to send.
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.first.as_slice(), self.second.as_slice()].concat()
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        if bytes.len() > OFFLINE_SEQUENCE_BYTES_MAX {
            return Err(ProtoError::TooLarge { what: SEQUENCE, len: bytes.len(), max: OFFLINE_SEQUENCE_BYTES_MAX });
        }
        let (first, rest) = next_item::<A>(1, bytes)?;
        if rest.is_empty() {
            return Err(refused(
                OfflineCheck::Sequence,
                format!("{SEQUENCE}: a {} alone, expected a {} after it", A::WHAT, B::WHAT),
            ));
        }
        let (second, rest) = next_item::<B>(2, rest)?;
        if !rest.is_empty() {
            return Err(refused(
                OfflineCheck::Sequence,
                format!("{SEQUENCE}: {} bytes after the two items, expected none", rest.len()),
            ));
        }
        Ok(SignedPair { first: first.to_vec(), second: second.to_vec(), _carries: PhantomData })
    }
}

impl PaymentOffer {
    /// The terminal certificate's COSE_Sign1, not yet verified.
    pub fn certificate(&self) -> &[u8] {
        &self.first
    }

    /// The payment request's COSE_Sign1, not yet verified.
    pub fn request(&self) -> &[u8] {
        &self.second
    }
}

impl ApprovalReply {
    /// The consumer approval's COSE_Sign1, not yet verified.
    pub fn approval(&self) -> &[u8] {
        &self.first
    }

    /// The offline credential's COSE_Sign1, not yet verified.
    pub fn credential(&self) -> &[u8] {
        &self.second
    }
}

/// The first CBOR item of `bytes`, checked to be a COSE_Sign1 carrying a `T`, and what
/// follows it.
fn next_item<T: WireType>(position: u8, bytes: &[u8]) -> Result<(&[u8], &[u8]), ProtoError> {
    let mut rest = bytes;
    // Decoding reads exactly one item, so what is left tells where it ended.
    coset::cbor::de::from_reader::<coset::cbor::value::Value, _>(&mut rest).map_err(|e| {
        refused(
            OfflineCheck::Sequence,
            format!("{SEQUENCE}: item {position} ({}) is cut short or not CBOR: {e}", T::WHAT),
        )
    })?;
    let (item, rest) = bytes.split_at(bytes.len() - rest.len());
    let sign1 = UnverifiedSign1::parse(item)?;
    T::from_cbor(sign1.payload_unverified()).map_err(|e| match e {
        ProtoError::OfflineRefused { check, detail } => {
            ProtoError::OfflineRefused { check, detail: format!("{SEQUENCE}: item {position}: {detail}") }
        }
        other => other,
    })?;
    Ok((item, rest))
}
