//! Fuzzes the compact JWS parser and the JWK parser behind it: arbitrary text must be
//! refused with an error, never a panic, and whatever parses must survive verification
//! attempts with its own embedded key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_proto::jws::UnverifiedJws;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(jws) = UnverifiedJws::parse(text) {
        let _ = jws.header().expect_typ("JWT");
        let _ = jws.verify_with_embedded_jwk();
    }
    let _ = serde_json::from_str::<vouch_proto::Jwk>(text);
});
