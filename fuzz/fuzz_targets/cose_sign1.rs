//! Fuzzes the COSE_Sign1 parser, the offline payment payloads carried inside it and the
//! two-item sequences that cross by sound: arbitrary bytes must be refused with an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_proto::cose::UnverifiedSign1;
use vouch_proto::offline::{
    ApprovalReply, ConsumerApproval, MerchantCountersignature, OfflineCredential, PaymentOffer, PaymentRequest,
    SignedReceipt, TerminalCertificate, WireType,
};

fn payloads(bytes: &[u8]) {
    let _ = OfflineCredential::from_cbor(bytes);
    let _ = TerminalCertificate::from_cbor(bytes);
    let _ = PaymentRequest::from_cbor(bytes);
    let _ = ConsumerApproval::from_cbor(bytes);
    let _ = MerchantCountersignature::from_cbor(bytes);
    let _ = SignedReceipt::from_cbor(bytes);
}

fuzz_target!(|data: &[u8]| {
    let _ = PaymentOffer::parse(data);
    let _ = ApprovalReply::parse(data);
    match UnverifiedSign1::parse(data) {
        Ok(sign1) => {
            let _ = sign1.kid();
            payloads(sign1.payload_unverified());
        }
        Err(_) => payloads(data),
    }
});
