//! Reader sessions end to end: a card reader and a POS app that talk only through a
//! byte pipe get a channel through a real server, carry encrypted card reads over it,
//! and refuse every grant, handshake and record that is not what it should be.

use std::sync::Arc;

use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;
use vouch_device::attest::{ReferenceValues, SimulatedDeviceState, TamperMonitor};
use vouch_device::session::{
    CardReader, FramedPipe, PipeError, PosApp, PosSession, ReaderSession, SessionRefusal, SimulatedCard, card,
};
use vouch_device::sim::{self, DeviceProfile};
use vouch_device::{DeviceError, DeviceIdentity, TokenSession, VouchClient};
use vouch_proto::SystemClock;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::session::TamperState;

use crate::support::{RunningServer, start};

/// Registers the clean reference values of simulated readers and POS apps.
pub async fn register_reference_values(admin: &VouchClient) {
    for kind in [DeviceKind::Reader, DeviceKind::Pos] {
        admin.put_reference_values(&ReferenceValues::simulated(kind)).await.unwrap();
    }
}

/// Enrols a clean POS app of `merchant_id` and attests it: its key and its ticket.
pub async fn attested_pos(admin: &VouchClient, merchant_id: &str, rng: &SystemRandom) -> (Arc<DeviceIdentity>, String) {
    let state = SimulatedDeviceState::clean(DeviceKind::Pos, merchant_id);
    let identity = DeviceIdentity::generate(rng).unwrap();
    let enrolled = sim::enrol(admin, &identity, &state.profile(), &SystemClock, rng).await.unwrap();
    let mut monitor = TamperMonitor::new(state);
    let attestation =
        sim::attest(admin, &identity, &enrolled.device_id, &mut monitor, &SystemClock, rng).await.unwrap();
    (Arc::new(identity), attestation.outcome.ticket)
}

/// A POS app with a token session on `client`'s server.
pub async fn pos_app(client: &VouchClient, identity: &Arc<DeviceIdentity>, ticket: &str, rng: &SystemRandom) -> PosApp {
    let session = TokenSession::open(client, Arc::clone(identity), ticket, Arc::new(SystemClock), rng).await.unwrap();
    PosApp::new(session, ticket).unwrap()
}

/// A reader of `merchant_id`, enrolled, with the server's keys pinned.
pub async fn provisioned_reader(admin: &VouchClient, merchant_id: &str, rng: &SystemRandom) -> CardReader {
    let profile = DeviceProfile::simulated(DeviceKind::Reader, merchant_id);
    let identity = DeviceIdentity::generate(rng).unwrap();
    CardReader::provision(admin, identity, &profile, &SystemClock, rng).await.unwrap()
}

/// A server with one merchant and a POS app of it holding a token session.
struct Shop {
    server: RunningServer,
    admin: VouchClient,
    merchant_id: String,
    pos: PosApp,
    rng: SystemRandom,
}

impl Shop {
    async fn open() -> Shop {
        let server = start().await;
        let admin = server.admin();
        let merchant_id = admin.create_merchant("Corner Coffee").await.unwrap().merchant_id;
        register_reference_values(&admin).await;
        let rng = SystemRandom::new();
        let (identity, ticket) = attested_pos(&admin, &merchant_id, &rng).await;
        let pos = pos_app(&VouchClient::new(&server.url).unwrap(), &identity, &ticket, &rng).await;
        Shop { server, admin, merchant_id, pos, rng }
    }

    async fn reader(&self) -> CardReader {
        provisioned_reader(&self.admin, &self.merchant_id, &self.rng).await
    }
}

type Pipe = FramedPipe<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

/// The two ends of an in-memory byte pipe.
fn pipe() -> (Pipe, Pipe) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let ((a_read, a_write), (b_read, b_write)) = (tokio::io::split(a), tokio::io::split(b));
    (FramedPipe::new(a_read, a_write), FramedPipe::new(b_read, b_write))
}

type ReaderOutcome = Result<Option<ReaderSession>, DeviceError>;

/// Runs `reader` on its end of a pipe, tapping the test card once per amount.
fn spawn_reader(mut reader: CardReader, mut pipe: Pipe, amounts_minor: Vec<u64>) -> JoinHandle<ReaderOutcome> {
    tokio::spawn(async move {
        let mut card = SimulatedCard::test_card();
        reader.run_session(&mut pipe, &mut card, &amounts_minor, &SystemClock, &SystemRandom::new()).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validated_reader_and_pos_app_carry_encrypted_card_reads() {
    let shop = Shop::open().await;
    let reader = shop.reader().await;
    let reader_id = reader.device_id().to_owned();
    let (reader_end, mut pos_end) = pipe();
    let amounts = vec![340, 1_250];
    let reader_task = spawn_reader(reader, reader_end, amounts.clone());

    let pos = shop.pos.run_session(&mut pos_end).await.unwrap();
    let reader_session = reader_task.await.unwrap().unwrap().expect("a granted session");
    assert_eq!(reader_session.session_id, pos.session_id);
    assert!(pos.session_id.starts_with("rs_"), "{}", pos.session_id);
    assert_eq!(pos.reader_id, reader_id);
    assert_eq!(reader_session.pos_device_id, shop.pos.device_id());

    // The POS app decoded exactly what the card gave the reader.
    let mut card = SimulatedCard::test_card();
    let expected: Vec<_> = amounts.iter().map(|a| card.tap(*a, card::CURRENCY_EUR).unwrap()).collect();
    assert_eq!(pos.card_reads, expected);
    assert_eq!(pos.card_reads[0].masked_pan(), "476173******0010");
    assert_eq!((pos.records_received, pos.records_sent, pos.records_exchanged()), (2, 2, 4));
    assert_eq!((reader_session.records_sent, reader_session.records_received), (2, 2));

    let audit = shop.server.state.store.audit_records(0, 1_000).await.unwrap();
    assert!(
        audit.iter().any(|r| r.entry.action == "reader_session.granted" && r.entry.subject == pos.session_id),
        "the grant is audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_refuses_a_grant_for_another_reader() {
    let shop = Shop::open().await;
    let (mut meant, mut other) = (shop.reader().await, shop.reader().await);
    let hello = meant.hello(&SystemClock, &shop.rng).unwrap();
    let granted = shop.pos.request_session(&hello).await.unwrap();
    other.hello(&SystemClock, &shop.rng).unwrap();
    let refused = other.accept_grant(&granted.grant, &SystemClock).unwrap_err();
    assert_eq!(refused.session_refusal(), Some(SessionRefusal::GrantForAnotherReader), "{refused}");
    // The reader it was meant for still takes it.
    meant.accept_grant(&granted.grant, &SystemClock).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_grant_replayed_to_any_reader_is_refused() {
    let shop = Shop::open().await;
    let (mut reader, mut second) = (shop.reader().await, shop.reader().await);
    let hello = reader.hello(&SystemClock, &shop.rng).unwrap();
    let granted = shop.pos.request_session(&hello).await.unwrap();
    reader.accept_grant(&granted.grant, &SystemClock).unwrap();

    let again = reader.accept_grant(&granted.grant, &SystemClock).unwrap_err();
    assert_eq!(again.session_refusal(), Some(SessionRefusal::GrantAlreadyUsed), "{again}");
    second.hello(&SystemClock, &shop.rng).unwrap();
    let to_second = second.accept_grant(&granted.grant, &SystemClock).unwrap_err();
    assert_eq!(to_second.session_refusal(), Some(SessionRefusal::GrantForAnotherReader), "{to_second}");
    reader.hello(&SystemClock, &shop.rng).unwrap();
    let after_new_hello = reader.accept_grant(&granted.grant, &SystemClock).unwrap_err();
    assert_eq!(after_new_hello.session_refusal(), Some(SessionRefusal::GrantForAnotherHello), "{after_new_hello}");

    // Nor does the server grant the same hello twice.
    let refused = shop.pos.request_session(&hello).await.unwrap_err();
    assert_eq!(refused.problem_reason(), Some("reader-nonce-reused"), "{refused}");
}

/// A second server that has the reader enrolled grants its hello, but the reader
/// pinned the first server's keys only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_signed_by_another_server_is_refused() {
    let shop = Shop::open().await;
    let rogue = Shop::open().await;
    let identity = DeviceIdentity::generate(&shop.rng).unwrap();
    let profile = DeviceProfile::simulated(DeviceKind::Reader, &rogue.merchant_id);
    let enrolled = sim::enrol(&rogue.admin, &identity, &profile, &SystemClock, &shop.rng).await.unwrap();
    let pinned = shop.admin.jwks().await.unwrap();
    let mut reader = CardReader::new(identity, &enrolled.device_id, &profile.firmware_version, pinned).unwrap();
    let rogue_keys = rogue.admin.jwks().await.unwrap();
    assert!(rogue_keys.keys.iter().all(|k| reader.pinned_keys().find(k.kid.as_deref().unwrap()).is_none()));

    let hello = reader.hello(&SystemClock, &shop.rng).unwrap();
    let granted = rogue.pos.request_session(&hello).await.unwrap();
    let refused = reader.accept_grant(&granted.grant, &SystemClock).unwrap_err();
    assert_eq!(refused.session_refusal(), Some(SessionRefusal::GrantUnknownKey), "{refused}");
}

/// After the server rotates its signing key, grants come under the new key: a reader
/// that has not pinned it refuses them until it is re-provisioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_key_rotation_the_reader_takes_grants_once_it_pins_the_new_key() {
    let shop = Shop::open().await;
    let mut reader = shop.reader().await;
    let kid = shop.admin.rotate_keys().await.unwrap();
    assert!(reader.pinned_keys().find(&kid).is_none());
    let hello = reader.hello(&SystemClock, &shop.rng).unwrap();
    let granted = shop.pos.request_session(&hello).await.unwrap();
    let refused = reader.accept_grant(&granted.grant, &SystemClock).unwrap_err();
    assert_eq!(refused.session_refusal(), Some(SessionRefusal::GrantUnknownKey), "{refused}");

    reader.pin_keys(shop.admin.jwks().await.unwrap());
    assert!(reader.pinned_keys().keys.len() >= 2, "old and new keys pinned");
    reader.accept_grant(&granted.grant, &SystemClock).unwrap();
}

/// Relays frames from `from` to `to`, passing each through `spoil` with its index
/// among this direction's frames; closes `to` when `from` closes.
fn relay(mut from: Pipe, mut spoil: impl FnMut(usize, Vec<u8>) -> Vec<u8> + Send + 'static) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut index = 0;
        while let Ok(frame) = from.receive().await {
            if from.send(&spoil(index, frame)).await.is_err() {
                break;
            }
            index += 1;
        }
        let _ = from.close().await;
    })
}

/// A reader and a POS app with a relay between them that can spoil frames either way:
/// what each side's session ended with.
async fn session_through(
    shop: &Shop,
    to_pos: impl FnMut(usize, Vec<u8>) -> Vec<u8> + Send + 'static,
    to_reader: impl FnMut(usize, Vec<u8>) -> Vec<u8> + Send + 'static,
) -> (ReaderOutcome, Result<PosSession, DeviceError>) {
    let (reader_end, relay_reader_end) = pipe();
    let (relay_pos_end, mut pos_end) = pipe();
    let (from_reader, to_reader_writer) = relay_reader_end.into_parts();
    let (from_pos, to_pos_writer) = relay_pos_end.into_parts();
    let relays = [
        relay(FramedPipe::new(from_reader, to_pos_writer), to_pos),
        relay(FramedPipe::new(from_pos, to_reader_writer), to_reader),
    ];
    let reader_task = spawn_reader(shop.reader().await, reader_end, vec![340, 1_250]);
    let pos = shop.pos.run_session(&mut pos_end).await;
    let reader = reader_task.await.unwrap();
    for relay in relays {
        relay.await.unwrap();
    }
    (reader, pos)
}

/// The reader's frames: hello, handshake, card read 1, card read 2. The POS app's:
/// grant, handshake, acknowledgement 1, acknowledgement 2.
const FIRST_RECORD: usize = 2;

/// Sends the first record again in place of the second.
fn first_record_twice() -> impl FnMut(usize, Vec<u8>) -> Vec<u8> + Send + 'static {
    let mut first = None;
    move |index, frame| match index {
        FIRST_RECORD => {
            first = Some(frame.clone());
            frame
        }
        i if i == FIRST_RECORD + 1 => first.clone().unwrap_or(frame),
        _ => frame,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_or_replayed_records_end_the_channel() {
    let shop = Shop::open().await;
    let pass = |_: usize, frame: Vec<u8>| frame;

    // A bit flipped in the first card read: the POS app refuses it and hangs up.
    let flip = |index: usize, mut frame: Vec<u8>| {
        if index == FIRST_RECORD
            && let Some(last) = frame.last_mut()
        {
            *last ^= 0x01;
        }
        frame
    };
    let (reader, pos) = session_through(&shop, flip, pass).await;
    let pos = pos.unwrap_err();
    assert_eq!(pos.session_refusal(), Some(SessionRefusal::RecordAltered), "{pos}");
    assert!(matches!(reader, Err(DeviceError::Pipe(PipeError::Closed))), "the reader sees the end: {reader:?}");

    // The first acknowledgement again in place of the second: the reader refuses it.
    let (reader, pos) = session_through(&shop, pass, first_record_twice()).await;
    let reader = reader.unwrap_err();
    assert_eq!(reader.session_refusal(), Some(SessionRefusal::RecordReplayed), "{reader}");
    // The POS app saw both reads through, then the reader hang up.
    assert_eq!(pos.unwrap().card_reads.len(), 2);

    // The first card read again in place of the second: the POS app refuses it.
    let (reader, pos) = session_through(&shop, first_record_twice(), pass).await;
    let pos = pos.unwrap_err();
    assert_eq!(pos.session_refusal(), Some(SessionRefusal::RecordReplayed), "{pos}");
    assert!(matches!(reader, Err(DeviceError::Pipe(PipeError::Closed))), "{reader:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_made_for_another_session_fails() {
    let shop = Shop::open().await;
    // The POS app's first handshake message is replaced by one made under another grant.
    let (mut other_reader, pos) = (shop.reader().await, &shop.pos);
    let other_hello = other_reader.hello(&SystemClock, &shop.rng).unwrap();
    let other_grant = pos.request_session(&other_hello).await.unwrap();
    let foreign = pos.handshake(&other_grant).unwrap().write(&[]).unwrap();
    let swap = move |index: usize, frame: Vec<u8>| if index == 1 { foreign.clone() } else { frame };
    let (reader, pos) = session_through(&shop, |_, frame| frame, swap).await;
    let reader = reader.unwrap_err();
    assert_eq!(reader.session_refusal(), Some(SessionRefusal::HandshakeFailed), "{reader}");
    assert!(matches!(pos, Err(DeviceError::Pipe(PipeError::Closed))), "{pos:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_reader_is_refused_by_the_server_and_gets_no_grant() {
    let shop = Shop::open().await;
    let mut reader = shop.reader().await;
    reader.set_tamper(TamperState { switch_open: true });
    let (reader_end, mut pos_end) = pipe();
    let reader_task = spawn_reader(reader, reader_end, vec![340]);
    let refused = shop.pos.run_session(&mut pos_end).await.unwrap_err();
    assert_eq!(refused.problem_reason(), Some("reader-tampered"), "{refused}");
    assert_eq!(reader_task.await.unwrap().unwrap(), None, "the POS app hung up before any grant");
}
