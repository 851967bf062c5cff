//! Fuzzes what the trusted service manager reads from outside: secure elements' X.509
//! chains (as PEM and as DER, against a fixed registered CA), a device message's clear
//! header and its opening under a fixed key, and the HPKE encapsulated key of a relay.
//! Arbitrary bytes must be refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_proto::hpke::{self, HpkePrivateKey};
use vouch_proto::tsm::{DeviceKey, message_counter, open_message};
use vouch_proto::x509;

/// A self-signed P-256 CA certificate, so chains reach the signature and validity checks.
const REGISTERED_CA: &[u8] = include_bytes!("../corpus/tsm_inputs/registered_ca.der");
const NOW: i64 = 1_900_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = x509::pem_certificates(text);
        let _ = x509::canonical_serial(text);
    }
    let _ = x509::check_issuer(data, NOW);
    let half = data.len() / 2;
    let chain = vec![data[..half].to_vec(), data[half..].to_vec()];
    let _ = x509::verify_chain(&chain, &[REGISTERED_CA], NOW);
    let _ = x509::verify_chain(&[data.to_vec()], &[REGISTERED_CA, data], NOW);

    let _ = message_counter(data);
    let key = DeviceKey::from_bytes(&[7; 32]).expect("32 bytes");
    let _ = open_message(&key, "dev_fuzz", data);

    let recipient = HpkePrivateKey::derive(&[9; 32]).expect("32 bytes of ikm");
    let (enc, ciphertext) = data.split_at(data.len().min(65));
    let _ = hpke::open(&recipient, enc, b"info", b"aad", ciphertext);
});
