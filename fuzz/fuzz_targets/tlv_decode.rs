//! Fuzzes the BER-TLV decoder that reads card data from a reader: whatever bytes
//! arrive must be refused with an error, never a panic, and a sequence that decodes
//! must decode the same after it is encoded again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_proto::tlv;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = tlv::decode(data) {
        let encoded = tlv::encode(&items).expect("decoded items encode");
        assert_eq!(tlv::decode(&encoded), Ok(items));
    }
});
