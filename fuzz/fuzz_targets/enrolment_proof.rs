//! Fuzzes enrolment proof verification, the first thing the server does with an
//! untrusted device's request body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_proto::FixedClock;
use vouch_proto::enrol::verify_enrolment_proof;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = verify_enrolment_proof(text, &FixedClock(1_700_000_000), 300);
    }
});
