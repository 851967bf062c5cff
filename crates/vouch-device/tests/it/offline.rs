//! Offline payments end to end: a funded phone holding a credential and certified
//! terminals, set up through the SDK against a real server; the legs cross by sound or
//! as bytes, and the terminals settle what they collected.

use std::sync::Arc;

use vouch_device::offline::sound::SoundChannel;
use vouch_device::offline::{OfflineRefusal, SettlementOutcome};
use vouch_device::sim::{self, OfflineFunds, OfflinePhone};
use vouch_device::{DeviceError, DeviceIdentity, OfflinePos, VouchClient};
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::offline::{ApprovalReply, OfflineCheck, WireType, payment_id, verify_receipt};
use vouch_proto::{ProtoError, SystemClock};
use vouch_sonic::Profile;

use crate::support::{Fixture, fixture_for};

const LIMIT_MINOR: i64 = 5_000;

/// A server with a merchant ("Corner Coffee") and the consumer phone model's
/// reference values.
async fn shop() -> Fixture {
    fixture_for(DeviceKind::Consumer).await
}

async fn phone(fx: &Fixture) -> OfflinePhone {
    let funds = OfflineFunds { currency: "EUR".into(), funded_minor: 10_000, limit_minor: LIMIT_MINOR };
    sim::offline_phone(&fx.admin, &fx.device_client, &fx.merchant_id, &funds, Arc::new(SystemClock), &fx.rng)
        .await
        .unwrap()
}

async fn terminal(fx: &Fixture) -> OfflinePos {
    sim::offline_terminal(&fx.admin, &fx.merchant_id, Arc::new(SystemClock), &fx.rng).await.unwrap()
}

async fn balance(fx: &Fixture, account_id: &str) -> i64 {
    fx.admin.account(account_id).await.unwrap().balance_minor
}

fn settlement_account(fx: &Fixture) -> String {
    format!("acc_settle_{}_EUR", fx.merchant_id)
}

/// Pays `amount_minor` at `pos` with the legs passed as bytes; the queued payment's id.
fn pay(phone: &mut OfflinePhone, pos: &mut OfflinePos, amount_minor: u64) -> String {
    let sale = pos.offer(amount_minor, "EUR").unwrap();
    let prompt = phone.wallet.review(sale.leg_a()).unwrap();
    let leg_b = phone.wallet.approve(&prompt).unwrap();
    pos.accept(&sale, &leg_b).unwrap().payment_id
}

#[track_caller]
fn assert_check<T: std::fmt::Debug>(result: Result<T, DeviceError>, expected: OfflineCheck) {
    match result {
        Err(e) => assert_eq!(e.offline_check(), Some(expected), "{e}"),
        Ok(value) => panic!("expected {expected:?}, accepted {value:?}"),
    }
}

#[track_caller]
fn assert_refusal<T: std::fmt::Debug>(result: Result<T, DeviceError>, expected: OfflineRefusal) {
    match result {
        Err(e) => assert_eq!(e.offline_refusal(), Some(expected), "{e}"),
        Ok(value) => panic!("expected {expected}, accepted {value:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_crosses_a_noisy_room_settles_once_and_its_receipt_verifies() {
    let fx = shop().await;
    let mut phone = phone(&fx).await;
    let mut pos = terminal(&fx).await;
    let reserve_before = phone.wallet.remaining_minor().unwrap();

    let counter = phone.wallet.next_counter().unwrap();
    let mut to_phone = SoundChannel::new(Profile::Audible, 48_000).unwrap().with_noise(0.0, 1);
    let mut to_pos = SoundChannel::new(Profile::Audible, 48_000).unwrap().with_noise(0.0, 2);
    let purchase =
        sim::offline_purchase(&mut pos, &mut phone.wallet, 1_250, "EUR", &mut to_phone, &mut to_pos).unwrap();
    let prompt = &purchase.prompt;
    assert_eq!(
        (prompt.merchant_name.as_str(), prompt.amount_minor, prompt.currency.as_str()),
        ("Corner Coffee", 1_250, "EUR")
    );
    assert_eq!((prompt.merchant_id.clone(), prompt.terminal_id.clone()), (pos.merchant_id(), pos.terminal_id()));
    assert_eq!(phone.wallet.next_counter(), Some(counter + 1), "a counter is used once");
    assert_eq!(phone.wallet.remaining_minor(), Some(reserve_before - 1_250));
    let (leg_a, leg_b) = (&purchase.leg_a, &purchase.leg_b);
    assert!(leg_a.audio_secs > 0.5 && leg_b.audio_secs > 0.5, "{} s, {} s", leg_a.audio_secs, leg_b.audio_secs);
    let queued = &purchase.payment;
    let approval = ApprovalReply::parse(&leg_b.bytes).unwrap();
    assert_eq!(queued.payment_id, vouch_proto::hex::encode(payment_id(approval.approval())));
    assert_eq!(queued.counter, counter);
    assert_eq!(phone.wallet.approved()[0].payment_id, queued.payment_id);

    let settlement = pos.settle().await.unwrap();
    assert_eq!((settlement.batches, settlement.settled.len(), settlement.refused.len()), (1, 1, 0));
    assert!(pos.queue().is_empty());
    let settled = &settlement.settled[0];
    let jwks = fx.admin.jwks().await.unwrap();
    let receipt = verify_receipt(&settled.receipt, |kid| jwks.cose_key(kid)).unwrap();
    assert_eq!(vouch_proto::hex::encode(receipt.value().payment_id), queued.payment_id);
    assert_eq!((receipt.value().amount_minor, receipt.value().currency), (1_250, 978));
    assert_eq!(balance(&fx, &settlement_account(&fx)).await, 1_250);

    // The answer was lost, say: the same payment again moves nothing and gets the same receipt.
    let again = pos.submit(std::slice::from_ref(&settled.payment)).await.unwrap();
    match &again[..] {
        [SettlementOutcome::Settled { receipt, first_time: false, transfer_id, .. }] => {
            assert_eq!((receipt, transfer_id), (&settled.receipt, &settled.transfer_id));
        }
        other => panic!("expected the same receipt, got {other:?}"),
    }
    assert_eq!(balance(&fx, &settlement_account(&fx)).await, 1_250);
    assert!(pos.settle().await.unwrap().settled.is_empty(), "nothing is left to settle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_spent_twice_is_a_double_spend_that_revokes_the_credential() {
    let fx = shop().await;
    let mut phone = phone(&fx).await;
    let (mut first_shop, mut second_shop) = (terminal(&fx).await, terminal(&fx).await);
    let counter = phone.wallet.next_counter().unwrap();
    pay(&mut phone, &mut first_shop, 1_000);
    // The phone was restored from a backup taken before that approval.
    phone.wallet.restore_counter(counter).unwrap();
    let sale = first_shop.offer(500, "EUR").unwrap();
    let prompt = phone.wallet.review(sale.leg_a()).unwrap();
    let reused = phone.wallet.approve(&prompt).unwrap();
    // A terminal that took the counter once refuses it at once.
    assert_refusal(first_shop.accept(&sale, &reused), OfflineRefusal::CounterReused);
    // Another terminal cannot know: settlement catches it.
    let sale = second_shop.offer(500, "EUR").unwrap();
    let prompt = phone.wallet.review(sale.leg_a()).unwrap();
    phone.wallet.restore_counter(counter).unwrap();
    let leg_b = phone.wallet.approve(&prompt).unwrap();
    second_shop.accept(&sale, &leg_b).unwrap();

    assert_eq!(first_shop.settle().await.unwrap().settled.len(), 1);
    let caught = second_shop.settle().await.unwrap();
    assert_eq!(caught.refused.len(), 1, "{caught:?}");
    assert_eq!(caught.refused[0].1, "double-spend");
    let later = pay(&mut phone, &mut second_shop, 100);
    let refused = second_shop.settle().await.unwrap().refused;
    assert_eq!((refused[0].0.payment_id.as_str(), refused[0].1.as_str()), (later.as_str(), "credential-revoked"));
    assert_eq!(balance(&fx, &settlement_account(&fx)).await, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wallet_refuses_requests_that_do_not_check_out() {
    let fx = shop().await;
    let mut phone = phone(&fx).await;
    let pos = terminal(&fx).await;
    let rng = SystemRandom::new();
    let sale = pos.offer(1_250, "EUR").unwrap();
    let offer = vouch_proto::offline::PaymentOffer::parse(sale.leg_a()).unwrap();

    // An enrolled terminal the server never certified signs its own request, and
    // presents another terminal's certificate or one it made itself under the server's kid.
    let stranger = DeviceIdentity::generate(&rng).unwrap();
    let profile = sim::DeviceProfile::simulated(DeviceKind::Terminal, &fx.merchant_id);
    sim::enrol(&fx.admin, &stranger, &profile, &SystemClock, &rng).await.unwrap();
    let request = sale.request().clone().sign(None, stranger.key(), &rng).unwrap();
    let borrowed = [offer.certificate(), request.bytes()].concat();
    assert_check(phone.wallet.review(&borrowed), OfflineCheck::TerminalSignature);
    let kid = vouch_proto::cose::UnverifiedSign1::parse(offer.certificate()).unwrap().kid().unwrap().to_vec();
    let forged = vouch_proto::offline::TerminalCertificate {
        terminal_key: stranger.key().verifying_key(),
        ..pos.certificate().clone()
    }
    .sign(Some(&kid), stranger.key(), &rng)
    .unwrap();
    assert_check(phone.wallet.review(&[forged.bytes(), request.bytes()].concat()), OfflineCheck::ServerSignature);
    // A certificate under a server key the phone never pinned.
    let unpinned = pos.certificate().clone().sign(Some(b"not-pinned"), stranger.key(), &rng).unwrap();
    match phone.wallet.review(&[unpinned.bytes(), request.bytes()].concat()) {
        Err(DeviceError::Proto(ProtoError::UnknownSigningKey { kid })) => assert_eq!(kid, "not-pinned"),
        other => panic!("expected an unknown key, got {other:?}"),
    }

    // The amount rewritten inside the signed request.
    let mut tampered = sale.leg_a().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_check(phone.wallet.review(&tampered), OfflineCheck::TerminalSignature);
    // More than is left, and another currency.
    let over = pos.offer(LIMIT_MINOR as u64 + 1, "EUR").unwrap();
    assert_check(phone.wallet.review(over.leg_a()), OfflineCheck::OverLimit);
    let dollars = pos.offer(100, "USD").unwrap();
    assert_check(phone.wallet.review(dollars.leg_a()), OfflineCheck::CurrencyMismatch);
    // Nothing refused used a counter; what checks out still pays.
    let counter = phone.wallet.next_counter();
    pay(&mut phone, &mut terminal(&fx).await, LIMIT_MINOR as u64 - 1);
    assert_eq!(phone.wallet.next_counter(), counter.map(|c| c + 1));
    let over = pos.offer(2, "EUR").unwrap();
    assert_check(phone.wallet.review(over.leg_a()), OfflineCheck::OverLimit);
    // One credential at a time.
    assert_refusal(phone.wallet.obtain_credential("EUR", 100).await, OfflineRefusal::CredentialHeld);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pos_refuses_approvals_that_do_not_check_out() {
    let fx = shop().await;
    let (mut phone, mut other_phone) = (phone(&fx).await, phone(&fx).await);
    let mut pos = terminal(&fx).await;
    let sale = pos.offer(700, "EUR").unwrap();
    let leg_b = phone.wallet.approve(&phone.wallet.review(sale.leg_a()).unwrap()).unwrap();
    let reply = ApprovalReply::parse(&leg_b).unwrap();

    let mut tampered = reply.approval().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_check(pos.accept(&sale, &[&tampered, reply.credential()].concat()), OfflineCheck::PhoneSignature);
    // The approval under another phone's credential, and that phone's approval under this one's.
    let others = other_phone.wallet.approve(&other_phone.wallet.review(sale.leg_a()).unwrap()).unwrap();
    let others = ApprovalReply::parse(&others).unwrap();
    assert_check(pos.accept(&sale, &[reply.approval(), others.credential()].concat()), OfflineCheck::PhoneSignature);
    assert_check(pos.accept(&sale, &[others.approval(), reply.credential()].concat()), OfflineCheck::PhoneSignature);
    // An approval of another sale.
    let other_sale = pos.offer(700, "EUR").unwrap();
    assert_check(pos.accept(&other_sale, &leg_b), OfflineCheck::RequestHash);
    // Not two items.
    assert_check(pos.accept(&sale, reply.approval()), OfflineCheck::Sequence);
    assert!(pos.queue().is_empty(), "nothing refused was queued");

    pos.accept(&sale, &leg_b).unwrap();
    let settled = pos.settle().await.unwrap();
    assert_eq!(settled.settled.len(), 1);
    assert_eq!(balance(&fx, &settlement_account(&fx)).await, 700);
}

/// A terminal whose certificate is for another key is refused when it is set up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_holds_only_its_own_certificate() {
    let fx = shop().await;
    let pos = terminal(&fx).await;
    let certificate = {
        let id = pos.terminal_id();
        fx.admin.terminal_certificate(&id).await.unwrap().bytes().unwrap()
    };
    let client = VouchClient::new(&fx.server.url).unwrap();
    let someone = DeviceIdentity::generate(&fx.rng).unwrap();
    let jwks = fx.admin.jwks().await.unwrap();
    let refused = OfflinePos::new(client, someone, &certificate, jwks, Arc::new(SystemClock));
    assert!(matches!(refused, Err(DeviceError::Untrusted(_))), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_brings_the_phone_its_receipts_and_a_refreshed_credential() {
    let fx = shop().await;
    let mut phone = phone(&fx).await;
    let (mut early, mut late) = (terminal(&fx).await, terminal(&fx).await);
    let first_credential = phone.wallet.credential_id().unwrap().to_owned();
    let start = phone.wallet.next_counter().unwrap();
    let settled_first = pay(&mut phone, &mut early, 1_250);
    let settled_later = pay(&mut phone, &mut late, 250);
    assert_eq!(early.settle().await.unwrap().settled.len(), 1);

    let report = phone.wallet.sync().await.unwrap();
    assert_eq!((report.new_receipts, report.matched, report.unmatched.len()), (1, 1, 0), "{report:?}");
    let closed = report.closed.clone().unwrap();
    assert_eq!(closed.credential_id, first_credential);
    assert_eq!((closed.counter_end, closed.limit_minor, closed.settled_minor), (start + 2, 1_500, 1_250));
    let refreshed = report.refreshed.clone().unwrap();
    assert_ne!(refreshed, first_credential);
    assert_eq!(phone.wallet.credential_id(), Some(refreshed.as_str()));
    assert_eq!(phone.wallet.credential().unwrap().limit_minor, LIMIT_MINOR as u64 - 1_500);
    assert!(phone.wallet.next_counter().unwrap() >= start + 2);
    let approved = &phone.wallet.approved()[0];
    assert_eq!(approved.payment_id, settled_first);
    assert_eq!(approved.receipt.as_ref().unwrap().receipt, early.settled()[0].receipt, "the POS's receipt bytes");
    assert!(phone.wallet.approved()[1].receipt.is_none());

    // What was approved before the close still settles; the next sync brings it.
    assert_eq!(late.settle().await.unwrap().settled.len(), 1);
    let report = phone.wallet.sync().await.unwrap();
    assert_eq!((report.new_receipts, report.matched), (1, 1), "{report:?}");
    assert_eq!(phone.wallet.approved()[1].payment_id, settled_later);
    assert!(phone.wallet.approved()[1].receipt.is_some());
    // The refreshed credential pays, and nothing is read twice.
    pay(&mut phone, &mut early, 100);
    assert_eq!(early.settle().await.unwrap().settled.len(), 1);
    let report = phone.wallet.sync().await.unwrap();
    assert_eq!((report.new_receipts, report.matched), (1, 1), "{report:?}");
    assert!(phone.wallet.approved().iter().all(|p| p.receipt.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_credential_is_dropped_at_sync_and_its_receipts_still_arrive() {
    let fx = shop().await;
    let mut phone = phone(&fx).await;
    let (mut first_shop, mut second_shop) = (terminal(&fx).await, terminal(&fx).await);
    let counter = phone.wallet.next_counter().unwrap();
    pay(&mut phone, &mut first_shop, 1_000);
    phone.wallet.restore_counter(counter).unwrap();
    pay(&mut phone, &mut second_shop, 500);
    assert_eq!(first_shop.settle().await.unwrap().settled.len(), 1);
    assert_eq!(second_shop.settle().await.unwrap().refused[0].1, "double-spend");

    let report = phone.wallet.sync().await.unwrap();
    assert_eq!(report.dropped.as_deref(), Some("credential-revoked"), "{report:?}");
    assert_eq!((report.new_receipts, report.matched, report.refreshed), (1, 1, None));
    assert!(phone.wallet.credential().is_none());
    assert_refusal(phone.wallet.review(first_shop.offer(100, "EUR").unwrap().leg_a()), OfflineRefusal::NoCredential);
}
