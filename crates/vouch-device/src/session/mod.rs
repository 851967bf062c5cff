//! Reader sessions on the device side (seed 000): a card reader and a POS app that talk
//! only through a byte pipe, and open an encrypted channel only once the server has
//! validated both.
//!
//! The conversation, frame by frame ([`pipe`]):
//!
//! 1. reader → POS app: the reader's signed hello (its id, its Noise static key, its
//!    firmware and tamper state, a fresh nonce);
//! 2. the POS app asks the server for a grant (`POST /v1/reader-sessions`, with its
//!    attestation ticket and its own static key, DPoP-protected), and checks it;
//! 3. POS app → reader: the grant, which the reader checks against the server keys it
//!    pinned at provisioning, its own id and its last hello's nonce; a grant is used
//!    once;
//! 4. POS app → reader, reader → POS app: `Noise_KK_25519_ChaChaPoly_SHA256` with the
//!    static keys the grant names and its session id as prologue;
//! 5. records: for each card tapped, the reader sends the encrypted card read (BER-TLV,
//!    [`card`]) and the POS app answers with an encrypted acknowledgement. The reader
//!    ends the session by closing the pipe.
//!
//! Any record out of order, replayed or altered ends the channel, and each side ends
//! the session by closing its end of the pipe, so the other learns it is over.

pub mod card;
pub mod pipe;

use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use vouch_proto::crypto::SystemRandom;
use vouch_proto::jws::UnverifiedJws;
use vouch_proto::session::{
    GrantClaims, Handshake, NOISE_KEY_BYTES, NoiseKeypair, ReaderHelloClaims, RecordRefusal, SecureChannel,
    TamperState, decode_static_key, verify_grant,
};
use vouch_proto::{Clock, JwkSet, ProtoError, b64, jwt};

pub use card::{CardRead, SimulatedCard};
pub use pipe::{FramedPipe, PipeError};

use crate::sim::{self, DeviceProfile};
use crate::token::Method;
use crate::{DeviceError, DeviceIdentity, TokenSession, VouchClient};

pub const READER_SESSIONS_PATH: &str = "/v1/reader-sessions";
/// The most card reads one session carries; a reader that wants more opens another.
pub const CARD_READS_MAX: usize = 64;

/// Why a reader refused a grant, or a side of a channel refused what arrived. The
/// session is over either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SessionRefusal {
    /// Not a grant: not a JWS, the wrong type, no key id, or claims of the wrong shape.
    GrantMalformed,
    /// Signed by a key the reader did not pin: another server, or a key it never got.
    GrantUnknownKey,
    /// Names a pinned key but that key did not sign it.
    GrantBadSignature,
    GrantExpired,
    /// For another reader's hello.
    GrantForAnotherReader,
    /// For this reader, but not for its last hello: an old grant, or one for a clone.
    GrantForAnotherHello,
    /// The reader has said no hello a grant could answer.
    GrantWithoutHello,
    /// This reader's hello has been granted and the grant used once already.
    GrantAlreadyUsed,
    /// The peer's handshake message was not made with the keys and the session the
    /// grant names.
    HandshakeFailed,
    /// A record that has been opened before.
    RecordReplayed,
    /// A record from further ahead than the next one.
    RecordOutOfOrder,
    /// The next record, but it does not authenticate.
    RecordAltered,
    /// Too short to be a record.
    RecordMalformed,
    /// The channel was closed by an earlier refused record.
    ChannelClosed,
    /// More than [`CARD_READS_MAX`] card reads in one session.
    TooManyCardReads,
}

impl SessionRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionRefusal::GrantMalformed => "grant-malformed",
            SessionRefusal::GrantUnknownKey => "grant-unknown-key",
            SessionRefusal::GrantBadSignature => "grant-bad-signature",
            SessionRefusal::GrantExpired => "grant-expired",
            SessionRefusal::GrantForAnotherReader => "grant-for-another-reader",
            SessionRefusal::GrantForAnotherHello => "grant-for-another-hello",
            SessionRefusal::GrantWithoutHello => "grant-without-hello",
            SessionRefusal::GrantAlreadyUsed => "grant-already-used",
            SessionRefusal::HandshakeFailed => "handshake-failed",
            SessionRefusal::RecordReplayed => "record-replayed",
            SessionRefusal::RecordOutOfOrder => "record-out-of-order",
            SessionRefusal::RecordAltered => "record-altered",
            SessionRefusal::RecordMalformed => "record-malformed",
            SessionRefusal::ChannelClosed => "channel-closed",
            SessionRefusal::TooManyCardReads => "too-many-card-reads",
        }
    }
}

impl std::fmt::Display for SessionRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn refused(refusal: SessionRefusal, detail: impl ToString) -> DeviceError {
    DeviceError::Session { refusal, detail: detail.to_string() }
}

/// A grant the reader checked and accepted: the POS app's key to run the handshake
/// against, under the grant's session.
#[derive(Debug, Clone)]
pub struct AcceptedGrant {
    claims: GrantClaims,
    pos_key: [u8; NOISE_KEY_BYTES],
}

impl AcceptedGrant {
    pub fn claims(&self) -> &GrantClaims {
        &self.claims
    }

    pub fn session_id(&self) -> &str {
        &self.claims.session_id
    }
}

/// The nonce of the reader's last hello, and whether a grant has answered it.
#[derive(Debug, Clone)]
struct LastHello {
    nonce: String,
    granted: bool,
}

/// A simulated card reader: an enrolled identity key, a Noise static key, its firmware
/// and tamper sensors, and the server keys pinned when it was provisioned. Several
/// keys may be pinned, so a server key rotation with overlap keeps working.
#[derive(Debug)]
pub struct CardReader {
    identity: DeviceIdentity,
    device_id: String,
    noise: NoiseKeypair,
    firmware_version: String,
    tamper: TamperState,
    pinned_keys: JwkSet,
    last_hello: Option<LastHello>,
}

/// What the reader saw of a session that ran to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderSession {
    pub session_id: String,
    pub pos_device_id: String,
    pub records_sent: u64,
    pub records_received: u64,
}

impl CardReader {
    /// A reader with a new Noise static key and its enclosure closed.
    pub fn new(
        identity: DeviceIdentity,
        device_id: &str,
        firmware_version: &str,
        pinned_keys: JwkSet,
    ) -> Result<Self, DeviceError> {
        Ok(CardReader {
            identity,
            device_id: device_id.to_owned(),
            noise: NoiseKeypair::generate()?,
            firmware_version: firmware_version.to_owned(),
            tamper: TamperState { switch_open: false },
            pinned_keys,
            last_hello: None,
        })
    }

    /// Enrols a simulated reader and pins the server's published keys, as a reader
    /// is provisioned at the factory.
    pub async fn provision(
        client: &VouchClient,
        identity: DeviceIdentity,
        profile: &DeviceProfile,
        clock: &dyn Clock,
        rng: &SystemRandom,
    ) -> Result<Self, DeviceError> {
        let enrolled = sim::enrol(client, &identity, profile, clock, rng).await?;
        let pinned = client.jwks().await?;
        CardReader::new(identity, &enrolled.device_id, &profile.firmware_version, pinned)
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn static_key(&self) -> &[u8; NOISE_KEY_BYTES] {
        self.noise.public()
    }

    pub fn tamper(&self) -> TamperState {
        self.tamper
    }

    /// What the tamper sensors report from now on, e.g. the enclosure opened.
    pub fn set_tamper(&mut self, tamper: TamperState) {
        self.tamper = tamper;
    }

    pub fn pinned_keys(&self) -> &JwkSet {
        &self.pinned_keys
    }

    /// Pins `keys` too, as a re-provisioning after a server key rotation does; keys
    /// already pinned under the same id stay as they were.
    pub fn pin_keys(&mut self, keys: JwkSet) {
        self.pinned_keys.pin(keys);
    }

    /// A fresh signed hello. Only a grant for the latest hello is accepted.
    pub fn hello(&mut self, clock: &dyn Clock, rng: &SystemRandom) -> Result<String, DeviceError> {
        let claims = ReaderHelloClaims::new(
            &self.device_id,
            self.noise.public(),
            &self.firmware_version,
            self.tamper,
            clock.now_unix(),
            rng,
        )?;
        let hello = claims.sign(self.identity.key(), rng)?;
        self.last_hello = Some(LastHello { nonce: claims.nonce, granted: false });
        Ok(hello)
    }

    /// Checks a grant: signed by a pinned server key, unexpired, for this reader and
    /// its last hello, and not used before. Every refusal has its own
    /// [`SessionRefusal`].
    pub fn accept_grant(&mut self, grant: &str, clock: &dyn Clock) -> Result<AcceptedGrant, DeviceError> {
        let last = self
            .last_hello
            .as_ref()
            .ok_or_else(|| refused(SessionRefusal::GrantWithoutHello, "this reader has said no hello"))?;
        let pinned = |kid: &str| self.pinned_keys.find(kid).and_then(|jwk| jwk.verifying_key().ok());
        let (claims, pos_key) =
            verify_grant(grant, pinned, &self.device_id, &last.nonce, clock).map_err(grant_refusal)?;
        if last.granted {
            return Err(refused(
                SessionRefusal::GrantAlreadyUsed,
                format!("grant {} was used before", claims.session_id),
            ));
        }
        if let Some(last) = &mut self.last_hello {
            last.granted = true;
        }
        Ok(AcceptedGrant { claims, pos_key })
    }

    /// Answers the POS app's first handshake message; the second message to send back
    /// and the established channel.
    pub fn respond(&self, accepted: &AcceptedGrant, message: &[u8]) -> Result<(Vec<u8>, SecureChannel), DeviceError> {
        let mut handshake = Handshake::reader(&self.noise, &accepted.pos_key, &accepted.claims.session_id)?;
        handshake.read(message).map_err(|e| refused(SessionRefusal::HandshakeFailed, e))?;
        let answer = handshake.write(&[])?;
        Ok((answer, handshake.into_channel()?))
    }

    /// Runs the reader's side of a session over `pipe`: hello, grant, handshake, then
    /// one card read per amount, each acknowledged. `None` when the POS app closed the
    /// pipe before sending a grant (the server refused, or the POS app gave up).
    /// The pipe is closed when this returns, whatever the outcome.
    pub async fn run_session<R, W>(
        &mut self,
        pipe: &mut FramedPipe<R, W>,
        card: &mut SimulatedCard,
        amounts_minor: &[u64],
        clock: &dyn Clock,
        rng: &SystemRandom,
    ) -> Result<Option<ReaderSession>, DeviceError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let outcome = async {
            if amounts_minor.len() > CARD_READS_MAX {
                let detail = format!("{} card reads, at most {CARD_READS_MAX} per session", amounts_minor.len());
                return Err(refused(SessionRefusal::TooManyCardReads, detail));
            }
            let hello = self.hello(clock, rng)?;
            pipe.send(hello.as_bytes()).await?;
            let grant = match pipe.receive().await {
                Err(PipeError::Closed) => return Ok(None),
                other => other?,
            };
            let grant = std::str::from_utf8(&grant).map_err(|e| refused(SessionRefusal::GrantMalformed, e))?;
            let accepted = self.accept_grant(grant, clock)?;
            let (answer, mut channel) = self.respond(&accepted, &pipe.receive().await?)?;
            pipe.send(&answer).await?;
            for amount_minor in amounts_minor {
                let read = card.tap(*amount_minor, card::CURRENCY_EUR)?;
                pipe.send(&channel.seal(&read.to_tlv()?)?).await?;
                let acknowledgement = open_record(&mut channel, &pipe.receive().await?)?;
                if card::acknowledged_atc(&acknowledgement)? != read.atc {
                    return Err(DeviceError::Untrusted("the POS app acknowledged another card read".into()));
                }
            }
            Ok(Some(ReaderSession {
                session_id: accepted.claims.session_id,
                pos_device_id: accepted.claims.pos_device_id,
                records_sent: channel.records_sent(),
                records_received: channel.records_received(),
            }))
        }
        .await;
        // The peer learns that the session is over; it may have gone already.
        let _ = pipe.close().await;
        outcome
    }
}

fn grant_refusal(e: ProtoError) -> DeviceError {
    let refusal = match &e {
        ProtoError::BadSignature => SessionRefusal::GrantBadSignature,
        ProtoError::UnknownSigningKey { .. } => SessionRefusal::GrantUnknownKey,
        ProtoError::Expired { .. } => SessionRefusal::GrantExpired,
        ProtoError::ClaimMismatch { claim: "reader_id", .. } => SessionRefusal::GrantForAnotherReader,
        ProtoError::ClaimMismatch { claim: "reader_nonce", .. } => SessionRefusal::GrantForAnotherHello,
        _ => SessionRefusal::GrantMalformed,
    };
    refused(refusal, e)
}

/// Opens the next record; a refusal says whether the record was replayed, skipped
/// ahead or altered. The channel is closed after any refusal.
fn open_record(channel: &mut SecureChannel, record: &[u8]) -> Result<Vec<u8>, DeviceError> {
    channel.open(record).map_err(|e| {
        let refusal = match &e {
            ProtoError::RecordRefused { why: RecordRefusal::Replayed, .. } => SessionRefusal::RecordReplayed,
            ProtoError::RecordRefused { why: RecordRefusal::OutOfOrder, .. } => SessionRefusal::RecordOutOfOrder,
            ProtoError::RecordRefused { why: RecordRefusal::Malformed, .. } => SessionRefusal::RecordMalformed,
            ProtoError::ChannelClosed => SessionRefusal::ChannelClosed,
            _ => SessionRefusal::RecordAltered,
        };
        refused(refusal, e)
    })
}

/// The server's answer to `POST /v1/reader-sessions`.
#[derive(Debug, Deserialize)]
struct GrantResponse {
    session_id: String,
    grant: String,
    reader_id: String,
    reader_static_key: String,
    expires_at: i64,
}

/// A grant the POS app got and checked: signed by a published server key, for the
/// hello it forwarded, naming this POS app and its static key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionGrant {
    pub session_id: String,
    /// The compact JWS to hand to the reader.
    pub grant: String,
    pub reader_id: String,
    pub reader_static_key: [u8; NOISE_KEY_BYTES],
    pub expires_at: i64,
    pub claims: GrantClaims,
}

/// A simulated POS app: an open token session (its DPoP key is its identity key),
/// the attestation ticket the server judges it by, and a Noise static key.
#[derive(Debug)]
pub struct PosApp {
    session: TokenSession,
    ticket: String,
    noise: NoiseKeypair,
}

/// What the POS app saw of a session that ran to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PosSession {
    pub session_id: String,
    pub reader_id: String,
    pub card_reads: Vec<CardRead>,
    pub records_sent: u64,
    pub records_received: u64,
}

impl PosSession {
    /// Records both ways.
    pub fn records_exchanged(&self) -> u64 {
        self.records_sent + self.records_received
    }
}

impl PosApp {
    /// A POS app with a new Noise static key. `ticket` is its attestation ticket,
    /// bound to the key `session` was opened with.
    pub fn new(session: TokenSession, ticket: &str) -> Result<Self, DeviceError> {
        Ok(PosApp { session, ticket: ticket.to_owned(), noise: NoiseKeypair::generate()? })
    }

    pub fn device_id(&self) -> &str {
        self.session.device_id()
    }

    pub fn static_key(&self) -> &[u8; NOISE_KEY_BYTES] {
        self.noise.public()
    }

    /// Asks the server for a channel with the reader that said `reader_hello`, and
    /// checks the grant before trusting it. A refusal is [`DeviceError::Problem`] with
    /// the server's reason (`reader-tampered`, `reader-nonce-reused`, …).
    pub async fn request_session(&self, reader_hello: &str) -> Result<SessionGrant, DeviceError> {
        // The POS app cannot check the reader's signature (the server does), but it
        // holds the server to the hello it forwarded.
        let hello: ReaderHelloClaims = jwt::parse_claims(UnverifiedJws::parse(reader_hello)?.payload_unverified())?;
        let body = json!({
            "reader_hello": reader_hello,
            "pos_ticket": self.ticket,
            "pos_static_key": b64::encode(self.noise.public()),
        });
        let answer: GrantResponse = self.session.request(Method::POST, READER_SESSIONS_PATH, Some(&body)).await?;
        let clock = self.session.clock();
        let (claims, pos_key) = self
            .session
            .check_signed(|keys| verify_grant(&answer.grant, keys, &hello.reader_id, &hello.nonce, clock))
            .await?;
        let reader_static_key = decode_static_key("reader_static_key", &answer.reader_static_key)?;
        if pos_key != *self.noise.public() || claims.pos_device_id != self.device_id() {
            return Err(DeviceError::Untrusted("the grant names another POS app".into()));
        }
        if claims.reader_static_key != hello.static_key || answer.reader_static_key != hello.static_key {
            return Err(DeviceError::Untrusted("the grant names another reader key than the hello".into()));
        }
        if claims.session_id != answer.session_id
            || claims.reader_id != answer.reader_id
            || claims.exp != answer.expires_at
        {
            return Err(DeviceError::Untrusted("the grant and the answer disagree".into()));
        }
        Ok(SessionGrant {
            session_id: answer.session_id,
            grant: answer.grant,
            reader_id: answer.reader_id,
            reader_static_key,
            expires_at: answer.expires_at,
            claims,
        })
    }

    /// The initiator's side of the handshake for a granted session.
    pub fn handshake(&self, granted: &SessionGrant) -> Result<Handshake, DeviceError> {
        Ok(Handshake::pos(&self.noise, &granted.reader_static_key, &granted.session_id)?)
    }

    /// Runs the POS app's side of a session over `pipe`: takes the reader's hello,
    /// gets and forwards the grant, runs the handshake, then opens each card read and
    /// acknowledges it until the reader closes the pipe. A server refusal comes back
    /// as [`DeviceError::Problem`]. The pipe is closed when this returns, whatever
    /// the outcome.
    pub async fn run_session<R, W>(&self, pipe: &mut FramedPipe<R, W>) -> Result<PosSession, DeviceError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let outcome = async {
            let hello = pipe.receive().await?;
            let hello = std::str::from_utf8(&hello)
                .map_err(|e| ProtoError::Malformed { what: "reader hello", detail: e.to_string() })?;
            let granted = self.request_session(hello).await?;
            pipe.send(granted.grant.as_bytes()).await?;
            let mut handshake = self.handshake(&granted)?;
            pipe.send(&handshake.write(&[])?).await?;
            handshake.read(&pipe.receive().await?).map_err(|e| refused(SessionRefusal::HandshakeFailed, e))?;
            let mut channel = handshake.into_channel()?;
            let mut card_reads = Vec::new();
            loop {
                let record = match pipe.receive().await {
                    Err(PipeError::Closed) => break,
                    other => other?,
                };
                if card_reads.len() == CARD_READS_MAX {
                    let detail = format!("the reader sent more than {CARD_READS_MAX} card reads");
                    return Err(refused(SessionRefusal::TooManyCardReads, detail));
                }
                let read = CardRead::from_tlv(&open_record(&mut channel, &record)?)?;
                pipe.send(&channel.seal(&card::acknowledgement(&read)?)?).await?;
                card_reads.push(read);
            }
            Ok(PosSession {
                session_id: granted.session_id,
                reader_id: granted.reader_id,
                card_reads,
                records_sent: channel.records_sent(),
                records_received: channel.records_received(),
            })
        }
        .await;
        // The peer learns that the session is over; it may have gone already.
        let _ = pipe.close().await;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use vouch_proto::jws::Header;
    use vouch_proto::session::GRANT_TYP;
    use vouch_proto::{FixedClock, SigningKey};

    use super::*;

    const NOW: i64 = 1_800_000_000;

    /// A server key under `kid`, as a JWK Set publishes it.
    struct ServerKey {
        kid: &'static str,
        key: SigningKey,
    }

    impl ServerKey {
        fn new(kid: &'static str, rng: &SystemRandom) -> Self {
            ServerKey { kid, key: SigningKey::generate(rng).unwrap() }
        }

        fn jwks(keys: &[&ServerKey]) -> JwkSet {
            JwkSet { keys: keys.iter().map(|k| k.key.verifying_key().to_jwk().with_kid(k.kid)).collect() }
        }

        /// A grant as the server makes one for `hello`, signed under `kid` by this key.
        fn grant(&self, kid: &str, hello: &str, pos_key: &[u8; 32], rng: &SystemRandom) -> String {
            let hello: ReaderHelloClaims =
                jwt::parse_claims(UnverifiedJws::parse(hello).unwrap().payload_unverified()).unwrap();
            let claims = GrantClaims {
                iss: "https://vouch.example".into(),
                session_id: format!("rs_{}", &hello.nonce[..8]),
                reader_id: hello.reader_id,
                reader_nonce: hello.nonce,
                reader_static_key: hello.static_key,
                pos_device_id: "dev_pos".into(),
                pos_static_key: b64::encode(pos_key),
                iat: NOW,
                exp: NOW + 120,
            };
            jwt::encode(&Header::es256(GRANT_TYP).with_kid(kid), &claims, &self.key, rng).unwrap()
        }
    }

    fn new_reader(device_id: &str, pinned: JwkSet, rng: &SystemRandom) -> CardReader {
        CardReader::new(DeviceIdentity::generate(rng).unwrap(), device_id, "1.4.2", pinned).unwrap()
    }

    #[track_caller]
    fn assert_refused<T: std::fmt::Debug>(result: Result<T, DeviceError>, expected: SessionRefusal) {
        match result {
            Err(e) => assert_eq!(e.session_refusal(), Some(expected), "{e}"),
            Ok(value) => panic!("expected {expected}, accepted {value:?}"),
        }
    }

    #[test]
    fn a_reader_accepts_a_grant_from_any_pinned_key_once() {
        let rng = SystemRandom::new();
        let (old, new) = (ServerKey::new("k-old", &rng), ServerKey::new("k-new", &rng));
        let mut reader = new_reader("dev_r1", ServerKey::jwks(&[&old]), &rng);
        reader.pin_keys(ServerKey::jwks(&[&old, &new]));
        assert_eq!(reader.pinned_keys().keys.len(), 2, "a key pinned twice is kept once");
        let clock = FixedClock(NOW);
        let pos_key = [7u8; 32];
        for server in [&old, &new] {
            let hello = reader.hello(&clock, &rng).unwrap();
            let grant = server.grant(server.kid, &hello, &pos_key, &rng);
            let accepted = reader.accept_grant(&grant, &clock).unwrap();
            assert_eq!(accepted.pos_key, pos_key);
            assert_eq!(accepted.claims().reader_id, "dev_r1");
            assert_refused(reader.accept_grant(&grant, &clock), SessionRefusal::GrantAlreadyUsed);
        }
    }

    #[test]
    fn each_way_a_grant_can_be_wrong_has_its_own_refusal() {
        let rng = SystemRandom::new();
        let server = ServerKey::new("k1", &rng);
        let stranger = ServerKey::new("k2", &rng);
        let clock = FixedClock(NOW);
        let pos_key = [7u8; 32];
        let mut reader = new_reader("dev_r1", ServerKey::jwks(&[&server]), &rng);
        let mut other = new_reader("dev_r2", ServerKey::jwks(&[&server]), &rng);
        assert_refused(reader.accept_grant("x", &clock), SessionRefusal::GrantWithoutHello);

        let old_hello = reader.hello(&clock, &rng).unwrap();
        let hello = reader.hello(&clock, &rng).unwrap();
        let other_hello = other.hello(&clock, &rng).unwrap();
        let cases = [
            ("not a JWS", "not.a.grant".to_owned(), SessionRefusal::GrantMalformed),
            (
                "another server's key",
                stranger.grant(stranger.kid, &hello, &pos_key, &rng),
                SessionRefusal::GrantUnknownKey,
            ),
            (
                "a pinned kid, another key",
                stranger.grant(server.kid, &hello, &pos_key, &rng),
                SessionRefusal::GrantBadSignature,
            ),
            (
                "for another reader",
                server.grant(server.kid, &other_hello, &pos_key, &rng),
                SessionRefusal::GrantForAnotherReader,
            ),
            (
                "for an earlier hello",
                server.grant(server.kid, &old_hello, &pos_key, &rng),
                SessionRefusal::GrantForAnotherHello,
            ),
        ];
        for (name, grant, expected) in cases {
            let result = reader.accept_grant(&grant, &clock);
            assert_eq!(result.as_ref().err().and_then(DeviceError::session_refusal), Some(expected), "{name}");
        }
        let grant = server.grant(server.kid, &hello, &pos_key, &rng);
        assert_refused(reader.accept_grant(&grant, &FixedClock(NOW + 121)), SessionRefusal::GrantExpired);
        // None of the refusals used the hello up.
        reader.accept_grant(&grant, &clock).unwrap();
    }

    fn channels() -> (SecureChannel, SecureChannel) {
        let (pos_key, reader_key) = (NoiseKeypair::generate().unwrap(), NoiseKeypair::generate().unwrap());
        let mut pos = Handshake::pos(&pos_key, reader_key.public(), "rs_1").unwrap();
        let mut reader = Handshake::reader(&reader_key, pos_key.public(), "rs_1").unwrap();
        reader.read(&pos.write(&[]).unwrap()).unwrap();
        pos.read(&reader.write(&[]).unwrap()).unwrap();
        (pos.into_channel().unwrap(), reader.into_channel().unwrap())
    }

    #[test]
    fn a_refused_record_says_how_it_was_wrong() {
        type Spoil = fn(&mut SecureChannel, &mut SecureChannel) -> Vec<u8>;
        let cases: [(Spoil, SessionRefusal); 4] = [
            (
                |sender, receiver| {
                    let first = sender.seal(b"one").unwrap();
                    open_record(receiver, &first).unwrap();
                    first
                },
                SessionRefusal::RecordReplayed,
            ),
            (
                |sender, _| {
                    sender.seal(b"one").unwrap();
                    sender.seal(b"two").unwrap()
                },
                SessionRefusal::RecordOutOfOrder,
            ),
            (
                |sender, _| {
                    let mut record = sender.seal(b"one").unwrap();
                    if let Some(last) = record.last_mut() {
                        *last ^= 1;
                    }
                    record
                },
                SessionRefusal::RecordAltered,
            ),
            (|_, _| vec![0u8; 10], SessionRefusal::RecordMalformed),
        ];
        for (spoil, expected) in cases {
            let (mut sender, mut receiver) = channels();
            let bad = spoil(&mut sender, &mut receiver);
            assert_refused(open_record(&mut receiver, &bad), expected);
            let good = sender.seal(b"later").unwrap();
            assert_refused(open_record(&mut receiver, &good), SessionRefusal::ChannelClosed);
        }
    }
}
