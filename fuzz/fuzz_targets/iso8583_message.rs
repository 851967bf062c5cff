//! Fuzzes the ISO 8583 codec: whatever a payment switch sends must be refused with an
//! error naming the part that is wrong, never a panic, and a message that is accepted
//! must read back the same after it is written out again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_proto::iso8583::{AdditionalData, Message, split_frame};

fuzz_target!(|data: &[u8]| {
    let _ = split_frame(data);
    if let Ok(message) = Message::decode(data) {
        let encoded = message.encode();
        assert_eq!(Message::decode(&encoded).as_ref(), Ok(&message));
        if let Some(de48) = message.get(48) {
            if let Ok(additional) = AdditionalData::parse(de48) {
                assert_eq!(additional.encode(), de48);
            }
        }
    } else {
        let _ = Message::decode_or_salvage(data);
    }
});
