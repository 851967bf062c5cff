//! session: the card reader's signed hello, the server's grant, and the encrypted
//! channel between a reader and a POS app (seed 000).
//!
//! Wire format: the hello and the grant are compact JWS (ES256), like every other
//! signed object a device exchanges with Vouch over HTTP. The channel is
//! `Noise_KK_25519_ChaChaPoly_SHA256` (through `snow`): both sides know each other's
//! static X25519 key before they start — the POS app from the reader's signed hello,
//! the reader from the server's grant — and the grant's `session_id` is the Noise
//! prologue, so a handshake only completes under the grant it was made for. The
//! server never holds a channel key.
//!
//! Records carry an explicit 64-bit counter and must arrive in order: anything out of
//! order, replayed or altered closes the channel for good.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::SecureRandom;
use crate::jws::{Header, UnverifiedJws};
use crate::{Clock, ProtoError, SigningKey, VerifyingKey, b64, jwt};

pub const READER_HELLO_TYP: &str = "vouch-reader-hello+jwt";
pub const GRANT_TYP: &str = "vouch-reader-grant+jwt";
pub const NOISE_PARAMS: &str = "Noise_KK_25519_ChaChaPoly_SHA256";
pub const NOISE_KEY_BYTES: usize = 32;
const NONCE_BYTES_MIN: usize = 16;
const NONCE_BYTES_MAX: usize = 64;
const TEXT_CHARS_MAX: usize = 128;
/// Largest Noise message (Noise specification section 3).
const NOISE_MESSAGE_BYTES_MAX: usize = 65_535;
const TAG_BYTES: usize = 16;
const COUNTER_BYTES: usize = 8;
/// Largest plaintext one record carries.
pub const RECORD_PLAINTEXT_BYTES_MAX: usize = NOISE_MESSAGE_BYTES_MAX - TAG_BYTES;

/// What the reader reports of its tamper sensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TamperState {
    /// The enclosure switch: open means someone opened the case.
    pub switch_open: bool,
}

/// The reader's hello, signed by its enrolled identity key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReaderHelloClaims {
    pub reader_id: String,
    /// base64url of the reader's static X25519 key for the channel, signed here by its identity key.
    pub static_key: String,
    pub firmware_version: String,
    pub tamper: TamperState,
    /// base64url of 16 to 64 fresh random bytes; single use at the server.
    pub nonce: String,
    pub iat: i64,
}

impl ReaderHelloClaims {
    /// A hello with a fresh 32-byte nonce.
    pub fn new(
        reader_id: &str,
        static_key: &[u8; NOISE_KEY_BYTES],
        firmware_version: &str,
        tamper: TamperState,
        iat: i64,
        rng: &dyn SecureRandom,
    ) -> Result<Self, ProtoError> {
        Ok(ReaderHelloClaims {
            reader_id: reader_id.to_owned(),
            static_key: b64::encode(static_key),
            firmware_version: firmware_version.to_owned(),
            tamper,
            nonce: b64::encode(crate::crypto::random_bytes::<32>(rng)?),
            iat,
        })
    }

    pub fn sign(&self, key: &SigningKey, rng: &dyn SecureRandom) -> Result<String, ProtoError> {
        jwt::encode(&Header::es256(READER_HELLO_TYP), self, key, rng)
    }

    pub fn static_key_bytes(&self) -> Result<[u8; NOISE_KEY_BYTES], ProtoError> {
        decode_static_key("reader static_key", &self.static_key)
    }
}

/// Reads the reader id before its key is known; verify with [`verify_reader_hello`].
pub fn peek_reader_id(jws: &UnverifiedJws) -> Result<String, ProtoError> {
    #[derive(Deserialize)]
    struct Peek {
        reader_id: String,
    }
    let peek: Peek = jwt::parse_claims(jws.payload_unverified())?;
    Ok(peek.reader_id)
}

/// Type, signature by the reader's enrolled key, `iat` within `window_secs`, and field
/// shapes. Whether the nonce is unused, the firmware allowed and the reader active is
/// the server's to decide.
pub fn verify_reader_hello(
    jws: &UnverifiedJws,
    key: &VerifyingKey,
    clock: &dyn Clock,
    window_secs: i64,
) -> Result<ReaderHelloClaims, ProtoError> {
    jws.header().expect_typ(READER_HELLO_TYP)?;
    let claims: ReaderHelloClaims = jwt::decode(jws, key)?;
    jwt::check_issued_at(claims.iat, clock.now_unix(), window_secs)?;
    claims.static_key_bytes()?;
    let nonce = b64::decode("reader nonce", &claims.nonce)?;
    if !(NONCE_BYTES_MIN..=NONCE_BYTES_MAX).contains(&nonce.len()) {
        return Err(ProtoError::malformed(
            "reader hello",
            format!("nonce is {} bytes, expected {NONCE_BYTES_MIN} to {NONCE_BYTES_MAX}", nonce.len()),
        ));
    }
    for (name, text) in [("reader_id", &claims.reader_id), ("firmware_version", &claims.firmware_version)] {
        if text.is_empty() || text.chars().count() > TEXT_CHARS_MAX || text.chars().any(char::is_control) {
            return Err(ProtoError::malformed(
                "reader hello",
                format!("{name} must be 1 to {TEXT_CHARS_MAX} printable characters"),
            ));
        }
    }
    Ok(claims)
}

/// Decodes a base64url X25519 public key.
pub fn decode_static_key(what: &'static str, text: &str) -> Result<[u8; NOISE_KEY_BYTES], ProtoError> {
    b64::decode(what, text)?.try_into().map_err(|bytes: Vec<u8>| {
        ProtoError::InvalidKey(format!("{what} is {} bytes, expected {NOISE_KEY_BYTES} (X25519)", bytes.len()))
    })
}

/// The server's permission for one POS app and one reader to open a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantClaims {
    pub iss: String,
    pub session_id: String,
    pub reader_id: String,
    /// The nonce of the hello this grant answers.
    pub reader_nonce: String,
    /// base64url of the reader's static X25519 key, as its hello named it.
    pub reader_static_key: String,
    pub pos_device_id: String,
    /// base64url of the POS app's static X25519 key: the only key the reader accepts.
    pub pos_static_key: String,
    pub iat: i64,
    pub exp: i64,
}

/// The reader's check of a grant: type, signature by one of its pinned server keys
/// (by `kid`, so a rotation with overlap keeps working), expiry, and that it answers
/// this reader's own hello. Returns the POS app's static key to accept.
pub fn verify_grant(
    token: &str,
    pinned_key: impl Fn(&str) -> Option<VerifyingKey>,
    reader_id: &str,
    reader_nonce: &str,
    clock: &dyn Clock,
) -> Result<(GrantClaims, [u8; NOISE_KEY_BYTES]), ProtoError> {
    let claims: GrantClaims = jwt::verify_by_kid(token, GRANT_TYP, pinned_key)?;
    jwt::check_expiry(claims.exp, clock.now_unix(), 0)?;
    if claims.reader_id != reader_id {
        return Err(ProtoError::ClaimMismatch {
            claim: "reader_id",
            found: claims.reader_id,
            expected: reader_id.to_owned(),
        });
    }
    if !crate::crypto::constant_time_eq(claims.reader_nonce.as_bytes(), reader_nonce.as_bytes()) {
        return Err(ProtoError::ClaimMismatch {
            claim: "reader_nonce",
            found: claims.reader_nonce,
            expected: reader_nonce.to_owned(),
        });
    }
    let pos_key = decode_static_key("grant pos_static_key", &claims.pos_static_key)?;
    Ok((claims, pos_key))
}

/// Why the channel refused a record; any of them closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordRefusal {
    /// A counter already received.
    Replayed,
    /// A counter beyond the next one: a record was dropped or held back.
    OutOfOrder,
    /// The expected counter, but the ciphertext or tag does not authenticate.
    Altered,
    /// Too short or too long to be a record.
    Malformed,
}

impl RecordRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordRefusal::Replayed => "replayed",
            RecordRefusal::OutOfOrder => "out-of-order",
            RecordRefusal::Altered => "altered",
            RecordRefusal::Malformed => "malformed",
        }
    }
}

fn record_refused(why: RecordRefusal, detail: String) -> ProtoError {
    ProtoError::RecordRefused { why, detail }
}

/// A static X25519 key pair for the channel. The private half is zeroized on drop.
pub struct NoiseKeypair {
    private: Zeroizing<Vec<u8>>,
    public: [u8; NOISE_KEY_BYTES],
}

impl std::fmt::Debug for NoiseKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseKeypair").field("public", &b64::encode(self.public)).finish_non_exhaustive()
    }
}

impl NoiseKeypair {
    /// A new key pair from snow's resolver (the operating system's random source).
    pub fn generate() -> Result<Self, ProtoError> {
        let pair = builder()?.generate_keypair().map_err(|e| channel_error("key generation", e))?;
        let public =
            pair.public.as_slice().try_into().map_err(|_| ProtoError::InvalidKey("X25519 public key".into()))?;
        Ok(NoiseKeypair { private: Zeroizing::new(pair.private), public })
    }

    pub fn public(&self) -> &[u8; NOISE_KEY_BYTES] {
        &self.public
    }
}

fn builder() -> Result<snow::Builder<'static>, ProtoError> {
    let params = NOISE_PARAMS.parse().map_err(|e| channel_error("Noise parameters", e))?;
    Ok(snow::Builder::new(params))
}

fn channel_error(what: &str, e: impl std::fmt::Display) -> ProtoError {
    ProtoError::Channel(format!("{what}: {e}"))
}

/// The two-message KK handshake. The POS app initiates; the reader responds.
pub struct Handshake {
    state: snow::HandshakeState,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake").field("initiator", &self.state.is_initiator()).finish_non_exhaustive()
    }
}

impl Handshake {
    /// The POS app's side: it knows the reader's key from the hello the server accepted.
    pub fn pos(local: &NoiseKeypair, reader_key: &[u8; NOISE_KEY_BYTES], session_id: &str) -> Result<Self, ProtoError> {
        Self::build(local, reader_key, session_id, true)
    }

    /// The reader's side: it knows the POS app's key from the grant it verified.
    pub fn reader(local: &NoiseKeypair, pos_key: &[u8; NOISE_KEY_BYTES], session_id: &str) -> Result<Self, ProtoError> {
        Self::build(local, pos_key, session_id, false)
    }

    fn build(local: &NoiseKeypair, remote: &[u8], session_id: &str, initiator: bool) -> Result<Self, ProtoError> {
        let builder = builder()?
            .local_private_key(&local.private)
            .and_then(|b| b.remote_public_key(remote))
            .and_then(|b| b.prologue(session_id.as_bytes()))
            .map_err(|e| channel_error("handshake set-up", e))?;
        let state = if initiator { builder.build_initiator() } else { builder.build_responder() }
            .map_err(|e| channel_error("handshake set-up", e))?;
        Ok(Handshake { state })
    }

    /// The next handshake message to send, carrying `payload` (encrypted).
    pub fn write(&mut self, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
        let mut message = vec![0u8; NOISE_MESSAGE_BYTES_MAX];
        let len = self.state.write_message(payload, &mut message).map_err(|e| channel_error("handshake", e))?;
        message.truncate(len);
        Ok(message)
    }

    /// Reads the peer's handshake message; fails if it was not made with the keys and
    /// the session this side expects.
    pub fn read(&mut self, message: &[u8]) -> Result<Vec<u8>, ProtoError> {
        let mut payload = vec![0u8; NOISE_MESSAGE_BYTES_MAX];
        let len = self.state.read_message(message, &mut payload).map_err(|e| channel_error("handshake", e))?;
        payload.truncate(len);
        Ok(payload)
    }

    pub fn is_finished(&self) -> bool {
        self.state.is_handshake_finished()
    }

    pub fn into_channel(self) -> Result<SecureChannel, ProtoError> {
        let transport = self.state.into_stateless_transport_mode().map_err(|e| channel_error("handshake", e))?;
        Ok(SecureChannel { transport, sent: 0, received: 0, closed: false })
    }
}

/// The established channel. Each record is its counter (8 bytes, big-endian) and the
/// ChaCha20-Poly1305 ciphertext under that counter as nonce.
pub struct SecureChannel {
    transport: snow::StatelessTransportState,
    sent: u64,
    received: u64,
    closed: bool,
}

impl std::fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureChannel")
            .field("sent", &self.sent)
            .field("received", &self.received)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl SecureChannel {
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, ProtoError> {
        if self.closed {
            return Err(ProtoError::ChannelClosed);
        }
        if plaintext.len() > RECORD_PLAINTEXT_BYTES_MAX {
            return Err(ProtoError::TooLarge {
                what: "record plaintext",
                len: plaintext.len(),
                max: RECORD_PLAINTEXT_BYTES_MAX,
            });
        }
        let mut record = vec![0u8; COUNTER_BYTES + plaintext.len() + TAG_BYTES];
        record[..COUNTER_BYTES].copy_from_slice(&self.sent.to_be_bytes());
        let len = self
            .transport
            .write_message(self.sent, plaintext, &mut record[COUNTER_BYTES..])
            .map_err(|e| channel_error("seal", e))?;
        record.truncate(COUNTER_BYTES + len);
        self.sent = self.sent.checked_add(1).ok_or(ProtoError::ChannelClosed)?;
        Ok(record)
    }

    /// Opens the next record. A record out of order, replayed or altered closes the
    /// channel: every later call fails too.
    pub fn open(&mut self, record: &[u8]) -> Result<Vec<u8>, ProtoError> {
        if self.closed {
            return Err(ProtoError::ChannelClosed);
        }
        let result = self.open_next(record);
        if result.is_err() {
            self.closed = true;
        }
        result
    }

    fn open_next(&mut self, record: &[u8]) -> Result<Vec<u8>, ProtoError> {
        if record.len() < COUNTER_BYTES + TAG_BYTES || record.len() > COUNTER_BYTES + NOISE_MESSAGE_BYTES_MAX {
            return Err(record_refused(
                RecordRefusal::Malformed,
                format!("a record of {} bytes is not a record", record.len()),
            ));
        }
        let (counter, ciphertext) = record.split_at(COUNTER_BYTES);
        let mut counter_bytes = [0u8; COUNTER_BYTES];
        counter_bytes.copy_from_slice(counter);
        let counter = u64::from_be_bytes(counter_bytes);
        if counter != self.received {
            let why = if counter < self.received { RecordRefusal::Replayed } else { RecordRefusal::OutOfOrder };
            return Err(record_refused(why, format!("record {counter} arrived, expected record {}", self.received)));
        }
        let mut plaintext = vec![0u8; ciphertext.len()];
        let len = self
            .transport
            .read_message(counter, ciphertext, &mut plaintext)
            .map_err(|_| record_refused(RecordRefusal::Altered, format!("record {counter} does not authenticate")))?;
        plaintext.truncate(len);
        self.received += 1;
        Ok(plaintext)
    }

    pub fn records_sent(&self) -> u64 {
        self.sent
    }

    pub fn records_received(&self) -> u64 {
        self.received
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FixedClock;
    use crate::crypto::SystemRandom;

    fn hex(text: &str) -> Vec<u8> {
        crate::hex::decode(text).expect("hex digits")
    }

    /// The Cacophony test vector for `Noise_KK_25519_ChaChaPoly_SHA256`, as published
    /// with snow (`tests/vectors/cacophony.txt`): fixed static and ephemeral keys, two
    /// handshake messages and four transport messages.
    #[test]
    fn cacophony_vector_for_kk() {
        let vector: serde_json::Value =
            serde_json::from_str(include_str!("../tests/data/noise_kk_cacophony.json")).unwrap();
        let field = |name: &str| hex(vector[name].as_str().unwrap());
        let (init_static, init_ephemeral, resp_static, resp_ephemeral, prologue) = (
            field("init_static"),
            field("init_ephemeral"),
            field("resp_static"),
            field("resp_ephemeral"),
            field("init_prologue"),
        );
        let (init_remote, resp_remote) = (field("init_remote_static"), field("resp_remote_static"));
        fn build<'a>(local: &'a [u8], ephemeral: &'a [u8], remote: &'a [u8], prologue: &'a [u8]) -> snow::Builder<'a> {
            builder()
                .unwrap()
                .local_private_key(local)
                .unwrap()
                .remote_public_key(remote)
                .unwrap()
                .prologue(prologue)
                .unwrap()
                .fixed_ephemeral_key_for_testing_only(ephemeral)
        }
        let mut initiator = build(&init_static, &init_ephemeral, &init_remote, &prologue).build_initiator().unwrap();
        let mut responder = build(&resp_static, &resp_ephemeral, &resp_remote, &prologue).build_responder().unwrap();
        let messages = vector["messages"].as_array().unwrap();
        let mut buffer = [0u8; 1024];
        let mut payload = [0u8; 1024];
        for (i, message) in messages.iter().take(2).enumerate() {
            let (sender, receiver) =
                if i % 2 == 0 { (&mut initiator, &mut responder) } else { (&mut responder, &mut initiator) };
            let len = sender.write_message(&hex(message["payload"].as_str().unwrap()), &mut buffer).unwrap();
            assert_eq!(buffer[..len], hex(message["ciphertext"].as_str().unwrap())[..], "handshake message {i}");
            receiver.read_message(&buffer[..len], &mut payload).unwrap();
        }
        assert_eq!(initiator.get_handshake_hash(), &field("handshake_hash")[..]);
        let initiator = initiator.into_stateless_transport_mode().unwrap();
        let responder = responder.into_stateless_transport_mode().unwrap();
        for (i, message) in messages.iter().enumerate().skip(2) {
            let sender = if i % 2 == 0 { &initiator } else { &responder };
            let nonce = (i as u64 - 2) / 2;
            let len = sender.write_message(nonce, &hex(message["payload"].as_str().unwrap()), &mut buffer).unwrap();
            assert_eq!(buffer[..len], hex(message["ciphertext"].as_str().unwrap())[..], "transport message {i}");
        }
    }

    fn channels(session_for_reader: &str) -> Result<(SecureChannel, SecureChannel), ProtoError> {
        let pos_key = NoiseKeypair::generate()?;
        let reader_key = NoiseKeypair::generate()?;
        let mut pos = Handshake::pos(&pos_key, reader_key.public(), "ses_1")?;
        let mut reader = Handshake::reader(&reader_key, pos_key.public(), session_for_reader)?;
        reader.read(&pos.write(b"")?)?;
        pos.read(&reader.write(b"")?)?;
        assert!(pos.is_finished() && reader.is_finished());
        Ok((pos.into_channel()?, reader.into_channel()?))
    }

    #[test]
    fn records_flow_both_ways_in_order() {
        let (mut pos, mut reader) = channels("ses_1").unwrap();
        for i in 0..3u8 {
            let record = pos.seal(&[i; 40]).unwrap();
            assert_eq!(reader.open(&record).unwrap(), vec![i; 40]);
            let answer = reader.seal(b"ack").unwrap();
            assert_eq!(pos.open(&answer).unwrap(), b"ack");
        }
        assert_eq!((pos.records_sent(), reader.records_received()), (3, 3));
    }

    #[test]
    fn a_handshake_under_another_session_fails() {
        assert!(matches!(channels("ses_2"), Err(ProtoError::Channel(_))));
    }

    #[test]
    fn a_handshake_with_an_unexpected_key_fails() {
        let pos_key = NoiseKeypair::generate().unwrap();
        let reader_key = NoiseKeypair::generate().unwrap();
        let impostor = NoiseKeypair::generate().unwrap();
        let mut pos = Handshake::pos(&impostor, reader_key.public(), "ses_1").unwrap();
        let mut reader = Handshake::reader(&reader_key, pos_key.public(), "ses_1").unwrap();
        assert!(reader.read(&pos.write(b"").unwrap()).is_err());
    }

    #[test]
    fn replayed_reordered_or_altered_records_close_the_channel() {
        type Spoil = fn(&mut SecureChannel, &mut SecureChannel) -> Vec<u8>;
        let cases: [(RecordRefusal, Spoil); 4] = [
            (RecordRefusal::Replayed, |pos, reader| {
                let first = pos.seal(b"one").unwrap();
                reader.open(&first).unwrap();
                first
            }),
            (RecordRefusal::OutOfOrder, |pos, _| {
                pos.seal(b"one").unwrap();
                pos.seal(b"two").unwrap()
            }),
            (RecordRefusal::Altered, |pos, _| {
                let mut record = pos.seal(b"one").unwrap();
                let last = record.len() - 1;
                record[last] ^= 1;
                record
            }),
            (RecordRefusal::OutOfOrder, |pos, _| {
                let mut record = pos.seal(b"one").unwrap();
                record[7] = 1;
                record
            }),
        ];
        for (expected, spoil) in cases {
            let (mut pos, mut reader) = channels("ses_1").unwrap();
            let bad = spoil(&mut pos, &mut reader);
            assert!(
                matches!(reader.open(&bad), Err(ProtoError::RecordRefused { why, .. }) if why == expected),
                "{expected:?}"
            );
            let next = pos.seal(b"later").unwrap();
            assert_eq!(reader.open(&next), Err(ProtoError::ChannelClosed), "{expected:?}: the channel stays closed");
        }
        let (_, mut reader) = channels("ses_1").unwrap();
        assert!(matches!(reader.open(&[0u8; 5]), Err(ProtoError::RecordRefused { why: RecordRefusal::Malformed, .. })));
    }

    fn hello(rng: &SystemRandom, iat: i64) -> ReaderHelloClaims {
        let tamper = TamperState { switch_open: false };
        ReaderHelloClaims::new("dev_r1", &[9; 32], "3.1.0", tamper, iat, rng).unwrap()
    }

    #[test]
    fn reader_hellos_are_typed_signed_and_fresh() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng).unwrap();
        let claims = hello(&rng, 1_000);
        let token = claims.sign(&key, &rng).unwrap();
        let jws = UnverifiedJws::parse(&token).unwrap();
        assert_eq!(peek_reader_id(&jws).unwrap(), "dev_r1");
        assert_eq!(verify_reader_hello(&jws, &key.verifying_key(), &FixedClock(1_010), 60).unwrap(), claims);
        let other = SigningKey::generate(&rng).unwrap();
        assert_eq!(
            verify_reader_hello(&jws, &other.verifying_key(), &FixedClock(1_010), 60),
            Err(ProtoError::BadSignature)
        );
        assert!(matches!(
            verify_reader_hello(&jws, &key.verifying_key(), &FixedClock(2_000), 60),
            Err(ProtoError::StaleIssuedAt { .. })
        ));
        let mut short_key = claims.clone();
        short_key.static_key = b64::encode([1u8; 31]);
        let mut short_nonce = claims.clone();
        short_nonce.nonce = b64::encode([1u8; 8]);
        let mut empty_firmware = claims;
        empty_firmware.firmware_version = String::new();
        for bad in [short_key, short_nonce, empty_firmware] {
            let jws = UnverifiedJws::parse(&bad.sign(&key, &rng).unwrap()).unwrap();
            assert!(verify_reader_hello(&jws, &key.verifying_key(), &FixedClock(1_000), 60).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn grants_are_checked_against_pinned_keys_and_the_reader_s_own_hello() {
        let rng = SystemRandom::new();
        let server = SigningKey::generate(&rng).unwrap();
        let public = server.verifying_key();
        let claims = GrantClaims {
            iss: "https://vouch.example".into(),
            session_id: "rs_1".into(),
            reader_id: "dev_r1".into(),
            reader_nonce: "n1".into(),
            reader_static_key: b64::encode([9u8; 32]),
            pos_device_id: "dev_p1".into(),
            pos_static_key: b64::encode([7u8; 32]),
            iat: 1_000,
            exp: 1_060,
        };
        let grant = jwt::encode(&Header::es256(GRANT_TYP).with_kid("k1"), &claims, &server, &rng).unwrap();
        let pinned = |kid: &str| (kid == "k1").then_some(public);
        let (verified, pos_key) = verify_grant(&grant, pinned, "dev_r1", "n1", &FixedClock(1_030)).unwrap();
        assert_eq!((verified, pos_key), (claims, [7u8; 32]));
        let refusals = [
            verify_grant(&grant, pinned, "dev_r2", "n1", &FixedClock(1_030)),
            verify_grant(&grant, pinned, "dev_r1", "n2", &FixedClock(1_030)),
            verify_grant(&grant, pinned, "dev_r1", "n1", &FixedClock(1_061)),
            verify_grant(&grant, |_| None, "dev_r1", "n1", &FixedClock(1_030)),
        ];
        assert!(matches!(refusals[0], Err(ProtoError::ClaimMismatch { claim: "reader_id", .. })));
        assert!(matches!(refusals[1], Err(ProtoError::ClaimMismatch { claim: "reader_nonce", .. })));
        assert!(matches!(refusals[2], Err(ProtoError::Expired { .. })));
        assert!(matches!(refusals[3], Err(ProtoError::UnknownSigningKey { .. })));
    }
}
