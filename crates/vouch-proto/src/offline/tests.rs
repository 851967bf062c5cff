use proptest::prelude::*;

use super::*;
use crate::crypto::SystemRandom;

const NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
const EUR: u16 = 978;
const SERVER_KID: &[u8] = b"server-1";

/// Keys and signed objects of one purchase, built the way the server, the POS and the
/// phone build them.
struct Purchase {
    rng: SystemRandom,
    server: SigningKey,
    terminal: SigningKey,
    phone: SigningKey,
    credential: Signed<OfflineCredential>,
    certificate: Signed<TerminalCertificate>,
    request: Signed<PaymentRequest>,
    approval: Signed<ConsumerApproval>,
    countersignature: Signed<MerchantCountersignature>,
}

fn credential_for(phone: &SigningKey) -> OfflineCredential {
    OfflineCredential {
        credential_id: [1; ID_BYTES],
        phone_key: phone.verifying_key(),
        limit_minor: 50_00,
        currency: EUR,
        counter_start: 100,
        not_after: NOW + 7 * 86_400,
        issued_at: NOW - 3_600,
    }
}

fn certificate_for(terminal: &SigningKey) -> TerminalCertificate {
    TerminalCertificate {
        terminal_id: [2; ID_BYTES],
        merchant_id: [3; ID_BYTES],
        merchant_name: "Café Zur Post".into(),
        terminal_key: terminal.verifying_key(),
        not_after: NOW + 365 * 86_400,
    }
}

fn request_for(certificate: &TerminalCertificate, amount_minor: u64) -> PaymentRequest {
    PaymentRequest {
        merchant_id: certificate.merchant_id,
        terminal_id: certificate.terminal_id,
        amount_minor,
        currency: EUR,
        nonce: [4; NONCE_BYTES],
        time: NOW,
    }
}

fn approval_for(request: &Signed<PaymentRequest>, credential: &OfflineCredential, time: i64) -> ConsumerApproval {
    ConsumerApproval {
        request_hash: sha256(request.bytes()),
        credential_id: credential.credential_id,
        counter: credential.counter_start + 3,
        time,
    }
}

fn purchase() -> Purchase {
    let rng = SystemRandom::new();
    let server = SigningKey::generate(&rng).unwrap();
    let terminal = SigningKey::generate(&rng).unwrap();
    let phone = SigningKey::generate(&rng).unwrap();
    let credential = credential_for(&phone).sign(Some(SERVER_KID), &server, &rng).unwrap();
    let certificate = certificate_for(&terminal).sign(Some(SERVER_KID), &server, &rng).unwrap();
    let request = request_for(certificate.value(), 12_50).sign(None, &terminal, &rng).unwrap();
    let approval = approval_for(&request, credential.value(), NOW + 5).sign(None, &phone, &rng).unwrap();
    let countersignature =
        MerchantCountersignature { digest: countersignature_digest(request.bytes(), approval.bytes()), time: NOW + 6 }
            .sign(None, &terminal, &rng)
            .unwrap();
    Purchase { rng, server, terminal, phone, credential, certificate, request, approval, countersignature }
}

impl Purchase {
    fn server_key(&self) -> impl FnOnce(Option<&[u8]>) -> Result<VerifyingKey, ProtoError> + '_ {
        |kid| match kid {
            Some(SERVER_KID) => Ok(self.server.verifying_key()),
            other => Err(ProtoError::UnknownSigningKey { kid: format!("{other:?}") }),
        }
    }
}

fn check_refused<T: std::fmt::Debug>(result: Result<T, ProtoError>, expected: OfflineCheck) {
    match result {
        Err(ProtoError::OfflineRefused { check, .. }) => assert_eq!(check, expected),
        other => panic!("expected {expected:?}, got {other:?}"),
    }
}

#[test]
fn a_whole_purchase_verifies_as_settlement_would() {
    let p = purchase();
    // The phone, offline, with only the pinned server key.
    let certificate = verify_terminal_certificate(p.certificate.bytes(), p.server_key(), NOW).unwrap();
    assert_eq!(certificate.value().merchant_name, "Café Zur Post");
    let request = verify_payment_request(p.request.bytes(), certificate.value()).unwrap();
    // The POS checks the approval against the credential before countersigning.
    let credential = verify_credential(p.credential.bytes(), p.server_key()).unwrap();
    let approval = verify_approval(p.approval.bytes(), &request, credential.value(), 50_00).unwrap();
    // Settlement checks the countersignature as well.
    let countersignature =
        verify_countersignature(p.countersignature.bytes(), &request, &approval, certificate.value()).unwrap();
    assert_eq!(countersignature.value(), p.countersignature.value());
    assert_eq!(approval.value(), p.approval.value());

    let receipt = SignedReceipt {
        payment_id: payment_id(approval.bytes()),
        transfer_id: [9; DIGEST_BYTES],
        amount_minor: request.value().amount_minor,
        currency: request.value().currency,
        settled_at: NOW + 60,
    }
    .sign(Some(SERVER_KID), &p.server, &p.rng)
    .unwrap();
    let verified = verify_receipt(receipt.bytes(), p.server_key()).unwrap();
    assert_eq!(verified.value().payment_id, sha256(p.approval.bytes()));
}

/// Legs (a) and (b) cross by sound, so each is kept small.
#[test]
fn legs_a_and_b_are_small() {
    let p = purchase();
    let sizes = [
        ("(a) payment request", p.request.bytes().len()),
        ("(b) consumer approval", p.approval.bytes().len()),
        ("(c) merchant countersignature", p.countersignature.bytes().len()),
        ("offline credential", p.credential.bytes().len()),
        ("terminal certificate", p.certificate.bytes().len()),
    ];
    let report = format!("{sizes:?}");
    // Everything but the 64-byte signature is fixed-size here, so the sizes are exact.
    assert_eq!(sizes[0].1, 144, "{report}");
    assert_eq!(sizes[1].1, 138, "{report}");
    assert!(sizes[0].1 < 200 && sizes[1].1 < 200, "{report}");
    assert!(sizes[2].1 < 200 && sizes[3].1 < 300 && sizes[4].1 < 300, "{report}");
}

#[test]
fn request_signed_by_another_key_is_refused() {
    let p = purchase();
    let other = SigningKey::generate(&p.rng).unwrap();
    let forged = request_for(p.certificate.value(), 12_50).sign(None, &other, &p.rng).unwrap();
    check_refused(verify_payment_request(forged.bytes(), p.certificate.value()), OfflineCheck::TerminalSignature);
}

#[test]
fn request_for_another_merchant_is_refused() {
    let p = purchase();
    let mut request = request_for(p.certificate.value(), 12_50);
    request.merchant_id = [7; ID_BYTES];
    let signed = request.sign(None, &p.terminal, &p.rng).unwrap();
    check_refused(verify_payment_request(signed.bytes(), p.certificate.value()), OfflineCheck::TerminalMismatch);
}

#[test]
fn tampered_amount_is_refused() {
    let p = purchase();
    // Rewrite the amount inside the signed bytes: 12_50 (0x19 0x04 0xe2) to 92_50 (0x19 0x24 0x22).
    let mut bytes = p.request.bytes().to_vec();
    let at = bytes.windows(3).position(|w| w == [0x19, 0x04, 0xe2]).unwrap();
    bytes[at + 1..at + 3].copy_from_slice(&[0x24, 0x22]);
    check_refused(verify_payment_request(&bytes, p.certificate.value()), OfflineCheck::TerminalSignature);
}

#[test]
fn expired_terminal_certificate_is_refused() {
    let p = purchase();
    let not_after = p.certificate.value().not_after;
    check_refused(
        verify_terminal_certificate(p.certificate.bytes(), p.server_key(), not_after + 1),
        OfflineCheck::TerminalCertificateExpired,
    );
    let mut late = request_for(p.certificate.value(), 1);
    late.time = not_after + 1;
    let late = late.sign(None, &p.terminal, &p.rng).unwrap();
    check_refused(
        verify_payment_request(late.bytes(), p.certificate.value()),
        OfflineCheck::TerminalCertificateExpired,
    );
}

#[test]
fn certificate_signed_by_another_server_key_is_refused() {
    let p = purchase();
    let other = SigningKey::generate(&p.rng).unwrap();
    let forged = certificate_for(&p.terminal).sign(Some(SERVER_KID), &other, &p.rng).unwrap();
    check_refused(verify_terminal_certificate(forged.bytes(), p.server_key(), NOW), OfflineCheck::ServerSignature);
    let forged = credential_for(&p.phone).sign(Some(SERVER_KID), &other, &p.rng).unwrap();
    check_refused(verify_credential(forged.bytes(), p.server_key()), OfflineCheck::ServerSignature);
}

#[test]
fn unknown_server_kid_is_passed_on() {
    let p = purchase();
    let signed = credential_for(&p.phone).sign(Some(b"old"), &p.server, &p.rng).unwrap();
    assert!(matches!(verify_credential(signed.bytes(), p.server_key()), Err(ProtoError::UnknownSigningKey { .. })));
}

#[test]
fn one_message_type_never_verifies_as_another() {
    let p = purchase();
    // A credential signed by the server is not a terminal certificate, and a
    // countersignature by the terminal is not a payment request.
    assert_eq!(
        verify_terminal_certificate(p.credential.bytes(), p.server_key(), NOW).unwrap_err(),
        refused(OfflineCheck::ServerSignature, "terminal certificate: signature does not verify")
    );
    check_refused(
        verify_payment_request(p.countersignature.bytes(), p.certificate.value()),
        OfflineCheck::TerminalSignature,
    );
}

#[test]
fn approval_for_another_request_is_refused() {
    let p = purchase();
    let request = verify_payment_request(p.request.bytes(), p.certificate.value()).unwrap();
    let mut other = request_for(p.certificate.value(), 12_50);
    other.nonce = [5; NONCE_BYTES];
    let other = other.sign(None, &p.terminal, &p.rng).unwrap();
    let approval = approval_for(&other, p.credential.value(), NOW).sign(None, &p.phone, &p.rng).unwrap();
    check_refused(verify_approval(approval.bytes(), &request, p.credential.value(), 50_00), OfflineCheck::RequestHash);
}

#[test]
fn approval_signed_by_another_phone_is_refused() {
    let p = purchase();
    let other = SigningKey::generate(&p.rng).unwrap();
    let approval = approval_for(&p.request, p.credential.value(), NOW).sign(None, &other, &p.rng).unwrap();
    check_refused(
        verify_approval(approval.bytes(), &p.request, p.credential.value(), 50_00),
        OfflineCheck::PhoneSignature,
    );
}

#[test]
fn approval_under_another_credential_is_refused() {
    let p = purchase();
    let mut other = p.credential.value().clone();
    other.credential_id = [8; ID_BYTES];
    check_refused(verify_approval(p.approval.bytes(), &p.request, &other, 50_00), OfflineCheck::CredentialId);
}

#[test]
fn counter_below_start_is_refused() {
    let p = purchase();
    let mut approval = approval_for(&p.request, p.credential.value(), NOW);
    approval.counter = p.credential.value().counter_start - 1;
    let approval = approval.sign(None, &p.phone, &p.rng).unwrap();
    check_refused(
        verify_approval(approval.bytes(), &p.request, p.credential.value(), 50_00),
        OfflineCheck::CounterBelowStart,
    );
    // The start itself is the first value allowed.
    let mut approval = approval_for(&p.request, p.credential.value(), NOW);
    approval.counter = p.credential.value().counter_start;
    let approval = approval.sign(None, &p.phone, &p.rng).unwrap();
    verify_approval(approval.bytes(), &p.request, p.credential.value(), 50_00).unwrap();
}

#[test]
fn credential_outside_its_validity_at_payment_time_is_refused() {
    let p = purchase();
    let credential = p.credential.value();
    let late = approval_for(&p.request, credential, credential.not_after + 1).sign(None, &p.phone, &p.rng).unwrap();
    check_refused(verify_approval(late.bytes(), &p.request, credential, 50_00), OfflineCheck::CredentialExpired);
    let early = approval_for(&p.request, credential, credential.issued_at - 1).sign(None, &p.phone, &p.rng).unwrap();
    check_refused(verify_approval(early.bytes(), &p.request, credential, 50_00), OfflineCheck::CredentialNotYetValid);
    let last = approval_for(&p.request, credential, credential.not_after).sign(None, &p.phone, &p.rng).unwrap();
    verify_approval(last.bytes(), &p.request, credential, 50_00).unwrap();
}

#[test]
fn over_limit_is_refused() {
    let p = purchase();
    // Over what remains of the limit.
    check_refused(
        verify_approval(p.approval.bytes(), &p.request, p.credential.value(), 12_49),
        OfflineCheck::OverLimit,
    );
    verify_approval(p.approval.bytes(), &p.request, p.credential.value(), 12_50).unwrap();
    // Over the credential's limit, whatever the caller says remains.
    let big = request_for(p.certificate.value(), 50_01).sign(None, &p.terminal, &p.rng).unwrap();
    let approval = approval_for(&big, p.credential.value(), NOW).sign(None, &p.phone, &p.rng).unwrap();
    check_refused(verify_approval(approval.bytes(), &big, p.credential.value(), u64::MAX), OfflineCheck::OverLimit);
}

#[test]
fn other_currency_is_refused() {
    let p = purchase();
    let mut request = request_for(p.certificate.value(), 1);
    request.currency = 840;
    let request = request.sign(None, &p.terminal, &p.rng).unwrap();
    let approval = approval_for(&request, p.credential.value(), NOW).sign(None, &p.phone, &p.rng).unwrap();
    check_refused(
        verify_approval(approval.bytes(), &request, p.credential.value(), 50_00),
        OfflineCheck::CurrencyMismatch,
    );
}

#[test]
fn countersignature_over_other_bytes_is_refused() {
    let p = purchase();
    let other_approval = approval_for(&p.request, p.credential.value(), NOW).sign(None, &p.phone, &p.rng).unwrap();
    // Signed by the right terminal, but over the request and another approval.
    check_refused(
        verify_countersignature(p.countersignature.bytes(), &p.request, &other_approval, p.certificate.value()),
        OfflineCheck::CountersignatureBinding,
    );
    // The right digest, signed by another key.
    let other = SigningKey::generate(&p.rng).unwrap();
    let forged = p.countersignature.value().clone().sign(None, &other, &p.rng).unwrap();
    check_refused(
        verify_countersignature(forged.bytes(), &p.request, &p.approval, p.certificate.value()),
        OfflineCheck::CountersignatureSignature,
    );
}

#[test]
fn countersignature_digest_is_sha256_of_the_concatenation() {
    let expected = sha256(b"abcdef");
    assert_eq!(countersignature_digest(b"abc", b"def"), expected);
}

#[test]
fn payloads_are_decoded_strictly() {
    let p = purchase();
    let good = p.request.value().to_cbor();
    PaymentRequest::from_cbor(&good).unwrap();
    let refused_as_payload = |bytes: &[u8]| check_refused(PaymentRequest::from_cbor(bytes), OfflineCheck::Payload);
    // Trailing byte, empty map, no input, extra key, missing key, wrong key order, not a map.
    let mut trailing = good.clone();
    trailing.push(0);
    refused_as_payload(&trailing);
    refused_as_payload(&[0xa0]);
    refused_as_payload(&[]);
    let mut fields = p.request.value().to_fields();
    fields.push(uint(1));
    let extra = encode_map(fields.clone());
    refused_as_payload(&extra);
    fields.truncate(5);
    refused_as_payload(&encode_map(fields));
    let swapped = Value::Map(vec![(uint(2), bstr(&[2; 16])), (uint(1), bstr(&[3; 16]))]);
    refused_as_payload(&encode_value(&swapped));
    refused_as_payload(&encode_value(&Value::Array(vec![])));
    // A nonce of 15 bytes, a currency over 999, an amount as a negative integer.
    let mut short_nonce = p.request.value().to_fields();
    short_nonce[4] = bstr(&[0; 15]);
    refused_as_payload(&encode_map(short_nonce));
    let mut big_currency = p.request.value().to_fields();
    big_currency[3] = uint(1000);
    refused_as_payload(&encode_map(big_currency));
    let mut negative = p.request.value().to_fields();
    negative[2] = int(-1);
    refused_as_payload(&encode_map(negative));
    // The amount written in 8 bytes instead of 2: valid CBOR, not deterministic.
    let at = good.windows(3).position(|w| w == [0x19, 0x04, 0xe2]).unwrap();
    let mut long = good[..at].to_vec();
    long.extend_from_slice(&[0x1b, 0, 0, 0, 0, 0, 0, 0x04, 0xe2]);
    long.extend_from_slice(&good[at + 3..]);
    refused_as_payload(&long);
}

#[test]
fn values_the_decoder_refuses_are_not_signed() {
    let p = purchase();
    let mut certificate = certificate_for(&p.terminal);
    certificate.merchant_name = "x".repeat(MERCHANT_NAME_BYTES_MAX + 1);
    check_refused(certificate.sign(Some(SERVER_KID), &p.server, &p.rng), OfflineCheck::Payload);
}

#[test]
fn both_sound_payloads_round_trip() {
    let p = purchase();
    let offer = PaymentOffer::new(&p.certificate, &p.request);
    let bytes = offer.to_bytes();
    assert_eq!(bytes.len(), p.certificate.bytes().len() + p.request.bytes().len());
    let parsed = PaymentOffer::parse(&bytes).unwrap();
    assert_eq!(parsed, offer);
    assert_eq!((parsed.certificate(), parsed.request()), (p.certificate.bytes(), p.request.bytes()));
    // What comes out verifies as the phone would verify it.
    let certificate = verify_terminal_certificate(parsed.certificate(), p.server_key(), NOW).unwrap();
    verify_payment_request(parsed.request(), certificate.value()).unwrap();

    let reply = ApprovalReply::new(&p.approval, &p.credential);
    let parsed = ApprovalReply::parse(&reply.to_bytes()).unwrap();
    assert_eq!(parsed, reply);
    assert_eq!((parsed.approval(), parsed.credential()), (p.approval.bytes(), p.credential.bytes()));
    let credential = verify_credential(parsed.credential(), p.server_key()).unwrap();
    verify_approval(parsed.approval(), &p.request, credential.value(), 50_00).unwrap();
}

/// Both sound payloads fit one vouch-sonic transmission (1,024 bytes) with room to spare.
#[test]
fn sound_payloads_are_small() {
    let p = purchase();
    let offer = PaymentOffer::new(&p.certificate, &p.request).to_bytes().len();
    let reply = ApprovalReply::new(&p.approval, &p.credential).to_bytes().len();
    assert!(offer < 512 && reply < 512, "offer {offer} bytes, reply {reply} bytes");
}

fn check_offer_refused(bytes: &[u8], expected: OfflineCheck, what: &str) {
    match PaymentOffer::parse(bytes) {
        Err(ProtoError::OfflineRefused { check, .. }) => assert_eq!(check, expected, "{what}"),
        other => panic!("{what}: expected {expected:?}, got {other:?}"),
    }
}

#[test]
fn a_sound_payload_is_exactly_two_complete_items() {
    let p = purchase();
    let (certificate, request) = (p.certificate.bytes(), p.request.bytes());
    let offer = PaymentOffer::new(&p.certificate, &p.request).to_bytes();
    // Cut anywhere, including right after the first item and before anything.
    for len in 0..offer.len() {
        check_offer_refused(&offer[..len], OfflineCheck::Sequence, &format!("cut to {len} bytes"));
    }
    check_offer_refused(certificate, OfflineCheck::Sequence, "one item");
    let mut trailing = offer.clone();
    trailing.push(0);
    check_offer_refused(&trailing, OfflineCheck::Sequence, "a trailing byte");
    check_offer_refused(&[offer.as_slice(), request].concat(), OfflineCheck::Sequence, "three items");
    check_offer_refused(&[offer.as_slice(), certificate].concat(), OfflineCheck::Sequence, "three items");
    // Swapped, or the other leg's payload: each item must carry what its place expects.
    check_offer_refused(&[request, certificate].concat(), OfflineCheck::Payload, "swapped");
    check_offer_refused(&ApprovalReply::new(&p.approval, &p.credential).to_bytes(), OfflineCheck::Payload, "leg (b)");
    let swapped = [p.credential.bytes(), p.approval.bytes()].concat();
    assert!(
        matches!(ApprovalReply::parse(&swapped), Err(ProtoError::OfflineRefused { check: OfflineCheck::Payload, .. })),
        "swapped leg (b)"
    );
    // An item that is CBOR but not a tagged COSE_Sign1 in Vouch's encoding.
    assert!(matches!(
        PaymentOffer::parse(&[&certificate[1..], request].concat()),
        Err(ProtoError::CoseRefused { why: crate::cose::CoseRefusal::Untagged, .. })
    ));
    let mut long_tag = vec![0xd8, 0x12];
    long_tag.extend_from_slice(&certificate[1..]);
    assert!(matches!(
        PaymentOffer::parse(&[long_tag.as_slice(), request].concat()),
        Err(ProtoError::CoseRefused { why: crate::cose::CoseRefusal::NonCanonical, .. })
    ));
}

#[test]
fn an_item_over_the_cose_limit_is_refused() {
    let p = purchase();
    // A well-formed tagged COSE_Sign1 whose payload alone is at the limit.
    let payload = vec![0u8; crate::cose::COSE_SIGN1_BYTES_MAX];
    let unsigned = coset::CoseSign1Builder::new()
        .protected(coset::HeaderBuilder::new().algorithm(coset::iana::Algorithm::ES256).build())
        .payload(payload)
        .signature(vec![0; 64])
        .build();
    let big = coset::TaggedCborSerializable::to_tagged_vec(unsigned).unwrap();
    let sequence = [big.as_slice(), p.request.bytes()].concat();
    assert!(sequence.len() <= OFFLINE_SEQUENCE_BYTES_MAX);
    assert!(matches!(
        PaymentOffer::parse(&sequence),
        Err(ProtoError::TooLarge { max: crate::cose::COSE_SIGN1_BYTES_MAX, .. })
    ));
    let whole = vec![0u8; OFFLINE_SEQUENCE_BYTES_MAX + 1];
    assert!(matches!(PaymentOffer::parse(&whole), Err(ProtoError::TooLarge { max: OFFLINE_SEQUENCE_BYTES_MAX, .. })));
}

fn encode_value(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    coset::cbor::ser::into_writer(value, &mut out).unwrap();
    out
}

fn encode_map(fields: Vec<Value>) -> Vec<u8> {
    encode_value(&Value::Map(fields.into_iter().zip(1u64..).map(|(v, k)| (uint(k), v)).collect()))
}

fn any_id() -> impl Strategy<Value = Id> {
    any::<[u8; ID_BYTES]>()
}

fn any_digest() -> impl Strategy<Value = Digest> {
    any::<[u8; DIGEST_BYTES]>()
}

fn any_key() -> impl Strategy<Value = VerifyingKey> {
    // Generating P-256 keys is slow next to the rest; a handful is enough.
    (0..4usize).prop_map(|i| {
        thread_local! {
            static KEYS: Vec<VerifyingKey> = (0..4)
                .map(|_| SigningKey::generate(&SystemRandom::new()).unwrap().verifying_key())
                .collect();
        }
        KEYS.with(|keys| keys[i])
    })
}

fn any_currency() -> impl Strategy<Value = u16> {
    0..=CURRENCY_CODE_MAX
}

thread_local! {
    /// Server, terminal and phone keys for property tests: generating keys per case is slow.
    static SIGNERS: (SigningKey, SigningKey, SigningKey) = {
        let rng = SystemRandom::new();
        (SigningKey::generate(&rng).unwrap(), SigningKey::generate(&rng).unwrap(), SigningKey::generate(&rng).unwrap())
    };
}

fn round_trips<T: WireType + PartialEq + std::fmt::Debug>(value: T) -> Result<(), TestCaseError> {
    prop_assert_eq!(T::from_cbor(&value.to_cbor())?, value);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn credential_round_trips(
        credential_id in any_id(), phone_key in any_key(), limit_minor in any::<u64>(), currency in any_currency(),
        counter_start in any::<u64>(), not_after in any::<i64>(), issued_at in any::<i64>(),
    ) {
        round_trips(OfflineCredential { credential_id, phone_key, limit_minor, currency, counter_start, not_after, issued_at })?;
    }

    #[test]
    fn certificate_round_trips(
        terminal_id in any_id(), merchant_id in any_id(), merchant_name in "\\PC{0,16}",
        terminal_key in any_key(), not_after in any::<i64>(),
    ) {
        round_trips(TerminalCertificate { terminal_id, merchant_id, merchant_name, terminal_key, not_after })?;
    }

    #[test]
    fn request_round_trips(
        merchant_id in any_id(), terminal_id in any_id(), amount_minor in any::<u64>(), currency in any_currency(),
        nonce in any::<[u8; NONCE_BYTES]>(), time in any::<i64>(),
    ) {
        round_trips(PaymentRequest { merchant_id, terminal_id, amount_minor, currency, nonce, time })?;
    }

    #[test]
    fn approval_round_trips(
        request_hash in any_digest(), credential_id in any_id(), counter in any::<u64>(), time in any::<i64>(),
    ) {
        round_trips(ConsumerApproval { request_hash, credential_id, counter, time })?;
    }

    #[test]
    fn countersignature_round_trips(digest in any_digest(), time in any::<i64>()) {
        round_trips(MerchantCountersignature { digest, time })?;
    }

    #[test]
    fn receipt_round_trips(
        payment_id in any_digest(), transfer_id in any_digest(), amount_minor in any::<u64>(), currency in any_currency(),
        settled_at in any::<i64>(),
    ) {
        round_trips(SignedReceipt { payment_id, transfer_id, amount_minor, currency, settled_at })?;
    }

    #[test]
    fn sound_payloads_round_trip(
        merchant_name in "\\PC{0,16}", amount_minor in any::<u64>(), nonce in any::<[u8; NONCE_BYTES]>(),
        counter in any::<u64>(), time in any::<i64>(), limit_minor in any::<u64>(),
    ) {
        SIGNERS.with(|(server, terminal, phone)| {
            let rng = SystemRandom::new();
            let certificate = TerminalCertificate { merchant_name, ..certificate_for(terminal) }
                .sign(Some(SERVER_KID), server, &rng).unwrap();
            let request = PaymentRequest { amount_minor, nonce, time, ..request_for(certificate.value(), 1) }
                .sign(None, terminal, &rng).unwrap();
            let offer = PaymentOffer::new(&certificate, &request);
            prop_assert_eq!(PaymentOffer::parse(&offer.to_bytes())?, offer);
            let credential = OfflineCredential { limit_minor, ..credential_for(phone) }
                .sign(Some(SERVER_KID), server, &rng).unwrap();
            let approval = ConsumerApproval { counter, time, ..approval_for(&request, credential.value(), time) }
                .sign(None, phone, &rng).unwrap();
            let reply = ApprovalReply::new(&approval, &credential);
            prop_assert_eq!(ApprovalReply::parse(&reply.to_bytes())?, reply);
            Ok(())
        })?;
    }

    #[test]
    fn arbitrary_sound_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = PaymentOffer::parse(&bytes);
        let _ = ApprovalReply::parse(&bytes);
    }

    #[test]
    fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = OfflineCredential::from_cbor(&bytes);
        let _ = TerminalCertificate::from_cbor(&bytes);
        let _ = PaymentRequest::from_cbor(&bytes);
        let _ = ConsumerApproval::from_cbor(&bytes);
        let _ = MerchantCountersignature::from_cbor(&bytes);
        let _ = SignedReceipt::from_cbor(&bytes);
    }
}
