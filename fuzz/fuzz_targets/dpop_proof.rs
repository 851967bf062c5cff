//! Fuzzes DPoP proof verification (RFC 9449 section 4.3) and the server nonce and URI
//! checks it runs: whatever a client puts in the `DPoP` header must be refused with an
//! error naming a check, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_proto::FixedClock;
use vouch_proto::dpop::{NonceKey, ProofContext, normalize_uri, verify_proof};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(nonces) = NonceKey::new(&[7; 32], 60) else {
        return;
    };
    let _ = nonces.check(text, 1_562_262_616);
    let _ = normalize_uri(text);
    let context = ProofContext {
        method: "POST",
        uri: "https://server.example.com/token",
        access_token: Some("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
        bound_jkt: Some("0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"),
        iat_window_secs: 60,
        nonces: Some(&nonces),
    };
    let _ = verify_proof(text, &context, &FixedClock(1_562_262_616));
    let _ = verify_proof(
        text,
        &ProofContext { nonces: None, access_token: None, bound_jkt: None, ..context },
        &FixedClock(1_562_262_616),
    );
});
