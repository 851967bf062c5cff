//! Fuzzes the COSE_Sign1 parser and the offline payment payloads inside it: arbitrary
//! bytes must be refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_proto::cose::UnverifiedSign1;

fuzz_target!(|data: &[u8]| {
    if let Ok(sign1) = UnverifiedSign1::parse(data) {
        let _ = sign1.kid();
        let _ = sign1.payload_unverified();
    }
});
