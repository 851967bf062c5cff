//! Fuzzes the COSE_Sign1 parser and the offline payment payloads carried inside it:
//! arbitrary bytes must be refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_proto::cose::UnverifiedSign1;
use vouch_proto::offline::{
    ConsumerApproval, MerchantCountersignature, OfflineCredential, PaymentRequest, SignedReceipt, TerminalCertificate,
    WireType,
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
    match UnverifiedSign1::parse(data) {
        Ok(sign1) => {
            let _ = sign1.kid();
            payloads(sign1.payload_unverified());
        }
        Err(_) => payloads(data),
    }
});
