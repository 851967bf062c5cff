//! The trusted service manager end to end: a device maker's CA registered, a phone's
//! secure elements provisioned and given the payment app through the SDK, and messages
//! passed on by an SMS gateway and relayed to a provider's receiver, against a real
//! server.

use std::sync::Arc;
use std::time::Duration;

use vouch_device::sim::{self, TsmPhone, TsmPhoneSetup, TsmProvider};
use vouch_device::tsm::{DeviceMaker, IssuerRecord, OutboxEntry, OutboxQuery, OutboxStatus, ReceiverMode, SeKind};
use vouch_device::{DeviceError, VouchClient};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::tsm::{TsmRefusal, verify_payment_certificate};
use vouch_proto::{Clock, SystemClock};

use crate::support::{Fixture, fixture_on, postgres_database, start_configured};

const APP: &str = "com.bank.pay";
const PROFILE: &str = "javacard-3.1";
const INSTRUMENT: &str = "tok_4111_visa_0042";
const WAIT: Duration = Duration::from_secs(20);

fn code(version: u8) -> Vec<u8> {
    [b"payment applet v".as_slice(), &[version]].concat().repeat(100)
}

/// A server that retries a delivery after a second, and gives up after two tries; a
/// merchant and the consumer phone model's reference values; a device maker whose CA is
/// registered; release 1 of the payment app; a provider's receiver; a gateway.
struct Tsm {
    fx: Fixture,
    maker: DeviceMaker,
    issuer: IssuerRecord,
    provider: TsmProvider,
    gateway: VouchClient,
}

impl Tsm {
    /// On PostgreSQL when `database` names one, else on SQLite.
    async fn start(database: Option<String>) -> Tsm {
        let server = start_configured(|config| {
            if let Some(url) = database {
                config.database_url = url;
            }
            config.tsm_retry_base_secs = 1;
            config.tsm_retry_max_secs = 1;
            config.tsm_delivery_attempts_max = 2;
        })
        .await;
        let fx = fixture_on(server, DeviceKind::Consumer).await;
        let (maker, issuer) = sim::tsm_maker(&fx.admin, "Acme Phones", Arc::new(SystemClock), &fx.rng).await.unwrap();
        let release = fx.admin.publish_tsm_app(&sim::tsm_app_manifest(APP, 1, &code(1), PROFILE)).await.unwrap();
        assert_eq!((release.app_id.as_str(), release.version), (APP, 1));
        let provider = sim::tsm_provider(&fx.admin, "First Bank", &fx.rng).await.unwrap();
        let gateway = sim::tsm_gateway(&fx.admin, "SMS gateway").await.unwrap();
        Tsm { fx, maker, issuer, provider, gateway }
    }

    async fn phone_of(&self, maker: &DeviceMaker) -> Result<TsmPhone, DeviceError> {
        let setup = TsmPhoneSetup {
            instrument: INSTRUMENT.into(),
            app_id: APP.into(),
            code: code(1),
            se_profile: PROFILE.into(),
        };
        let fx = &self.fx;
        let clock = Arc::new(SystemClock);
        sim::tsm_phone(&fx.admin, &fx.device_client, &fx.merchant_id, maker, &setup, clock, &fx.rng).await
    }

    async fn phone(&self) -> TsmPhone {
        self.phone_of(&self.maker).await.unwrap()
    }

    fn provider_id(&self) -> &str {
        self.provider.provider_id()
    }

    async fn outbox_entry(&self, message_id: &str) -> OutboxEntry {
        let page = self.fx.admin.tsm_outbox(&OutboxQuery::default()).await.unwrap();
        page.messages.into_iter().find(|m| m.message_id == message_id).unwrap()
    }

    /// Polls the outbox until `message_id` is in `status` with at least `attempts`, the
    /// last one's outcome recorded: a pending message counts its attempt when it is
    /// claimed, and shows the failure only once the attempt is over.
    async fn wait_for_outbox(&self, message_id: &str, status: OutboxStatus, attempts: i64) -> OutboxEntry {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let entry = self.outbox_entry(message_id).await;
            let attempted = entry.attempts >= attempts;
            let recorded = status != OutboxStatus::Pending || attempts == 0 || entry.last_error.is_some();
            if entry.status == status && attempted && recorded {
                return entry;
            }
            assert!(tokio::time::Instant::now() < deadline, "still {entry:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[track_caller]
fn assert_problem<T: std::fmt::Debug>(result: Result<T, DeviceError>, status: u16, reason: &str) {
    match result {
        Err(e) => {
            let found = match &e {
                DeviceError::Problem { status, .. } => Some(*status),
                _ => None,
            };
            assert_eq!((found, e.problem_reason()), (Some(status), Some(reason)), "{e}");
        }
        Ok(value) => panic!("expected {status} {reason}, got {value:?}"),
    }
}

async fn a_message_reaches_its_provider_once_and_an_older_counter_is_refused(database: Option<String>) {
    let tsm = Tsm::start(database).await;
    let mut phone = tsm.phone().await;
    assert_eq!(phone.crypto_se.instrument(), Some(INSTRUMENT));
    assert_eq!((phone.app.app_id(), phone.app.version()), (APP, 1));

    let first = phone.message(tsm.provider_id(), b"pay 12.50 to shop 7").unwrap();
    let second = phone.message(tsm.provider_id(), b"pay 3.20 to shop 9").unwrap();
    let accepted = tsm.gateway.relay_tsm_message(&phone.device_id, &second).await.unwrap();
    assert_eq!((accepted.counter, accepted.provider_id.as_str(), accepted.duplicate), (2, tsm.provider_id(), false));
    let again = tsm.gateway.relay_tsm_message(&phone.device_id, &second).await.unwrap();
    assert_eq!((again.message_id.as_str(), again.duplicate), (accepted.message_id.as_str(), true));
    assert_problem(tsm.gateway.relay_tsm_message(&phone.device_id, &first).await, 409, "replayed-counter");

    let received = tsm.provider.receiver.wait_for(1, WAIT).await.unwrap();
    let message = &received[0];
    assert_eq!(
        (message.message_id.as_str(), message.device_id.as_str()),
        (accepted.message_id.as_str(), phone.device_id.as_str())
    );
    assert_eq!((message.counter, message.body.payload.as_slice()), (2, &b"pay 3.20 to shop 9"[..]));
    let jwks = tsm.fx.admin.jwks().await.unwrap();
    let certificate = verify_payment_certificate(
        &message.body.payment_certificate,
        |kid| jwks.find(kid).and_then(|jwk| jwk.verifying_key().ok()),
        SystemClock.now_unix(),
    )
    .unwrap();
    assert_eq!(
        (certificate.sub.as_str(), Some(certificate.registration_id.as_str()), certificate.instrument.as_str()),
        (phone.device_id.as_str(), phone.crypto_se.registration_id(), INSTRUMENT)
    );
    let delivered = tsm.wait_for_outbox(&accepted.message_id, OutboxStatus::Delivered, 1).await;
    assert!(delivered.delivered_at.is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tsm.provider.receiver.stats().received, 1);
    assert_eq!(tsm.provider.receiver.stats().duplicates, 0, "an acknowledged message is not delivered again");
}

async fn a_provider_that_is_down_gets_the_message_once_it_is_back(database: Option<String>) {
    let tsm = Tsm::start(database).await;
    let mut phone = tsm.phone().await;
    let receiver = &tsm.provider.receiver;
    receiver.set_mode(ReceiverMode::Down);
    let envelope = phone.message(tsm.provider_id(), b"pay 40.00").unwrap();
    let accepted = tsm.gateway.relay_tsm_message(&phone.device_id, &envelope).await.unwrap();
    let waiting = tsm.wait_for_outbox(&accepted.message_id, OutboxStatus::Pending, 1).await;
    assert!(waiting.last_error.is_some(), "{waiting:?}");

    receiver.set_mode(ReceiverMode::Up);
    let received = receiver.wait_for(1, WAIT).await.unwrap();
    assert_eq!(received[0].message_id, accepted.message_id);
    tsm.wait_for_outbox(&accepted.message_id, OutboxStatus::Delivered, 2).await;
    let stats = receiver.stats();
    assert!(stats.unavailable >= 1, "{stats:?}");
    assert_eq!((stats.received, stats.duplicates), (1, 0));
}

async fn a_message_dead_after_its_last_attempt_is_delivered_when_an_operator_retries_it(database: Option<String>) {
    let tsm = Tsm::start(database).await;
    let mut phone = tsm.phone().await;
    let receiver = &tsm.provider.receiver;
    receiver.set_mode(ReceiverMode::Failing);
    let envelope = phone.message(tsm.provider_id(), b"pay 7.00").unwrap();
    let accepted = tsm.gateway.relay_tsm_message(&phone.device_id, &envelope).await.unwrap();
    let dead = tsm.wait_for_outbox(&accepted.message_id, OutboxStatus::Dead, 2).await;
    assert_eq!(dead.attempts, 2);
    let dead_page = OutboxQuery { status: Some(OutboxStatus::Dead), ..OutboxQuery::default() };
    let listed = tsm.fx.admin.tsm_outbox(&dead_page).await.unwrap();
    assert_eq!(
        listed.messages.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(),
        [accepted.message_id.as_str()]
    );

    receiver.set_mode(ReceiverMode::Up);
    let retried = tsm.fx.admin.retry_tsm_message(&accepted.message_id).await.unwrap();
    assert_eq!((retried.status, retried.attempts), (OutboxStatus::Pending, 0));
    assert_eq!(receiver.wait_for(1, WAIT).await.unwrap()[0].message_id, accepted.message_id);
    tsm.wait_for_outbox(&accepted.message_id, OutboxStatus::Delivered, 1).await;
    assert_problem(tsm.fx.admin.retry_tsm_message(&accepted.message_id).await, 409, "not-dead");
}

async fn an_se_of_an_unregistered_maker_or_with_a_revoked_certificate_is_not_provisioned(database: Option<String>) {
    let tsm = Tsm::start(database).await;
    let stranger = DeviceMaker::new("Unknown Phones", Arc::new(SystemClock), &tsm.fx.rng).unwrap();
    assert_problem(tsm.phone_of(&stranger).await, 422, "unknown-issuer");
    assert_eq!(tsm.fx.admin.tsm_issuers().await.unwrap(), std::slice::from_ref(&tsm.issuer));
    assert_problem(tsm.fx.admin.register_tsm_issuer("again", &tsm.maker.ca_pem()).await, 409, "issuer-exists");

    let phone = tsm.phone().await;
    let serial = &phone.crypto_se.certificate().serial;
    let revoked = tsm.fx.admin.revoke_se_certificate(&tsm.issuer.issuer_id, serial).await.unwrap();
    assert_eq!(&revoked.serial, serial);
    let chain = &phone.crypto_se.certificate().chain_pem;
    assert_problem(phone.session.provision_crypto_se(chain, INSTRUMENT).await, 403, "certificate-revoked");
    let fresh = tsm.maker.issue_se(&phone.device_id, SeKind::Crypto).unwrap();
    let answer = phone.session.provision_crypto_se(&fresh.chain_pem, INSTRUMENT).await.unwrap();
    assert_eq!(answer.se_serial, fresh.serial, "another certificate of the maker is still good");
}

async fn the_app_se_installs_a_newer_release_over_the_second_channel(database: Option<String>) {
    let tsm = Tsm::start(database).await;
    let mut phone = tsm.phone().await;
    let admin = &tsm.fx.admin;
    let release_1 = sim::tsm_app_manifest(APP, 1, &code(1), PROFILE);
    assert_problem(admin.publish_tsm_app(&release_1).await, 409, "manifest-exists");
    let release_2 = admin.publish_tsm_app(&sim::tsm_app_manifest(APP, 2, &code(2), PROFILE)).await.unwrap();
    assert_eq!(admin.tsm_apps().await.unwrap().len(), 2);

    let delivery = phone.session.fetch_tsm_app(APP, &phone.app_se.certificate().chain_pem).await.unwrap();
    assert_eq!((delivery.manifest_id.as_str(), delivery.version), (release_2.manifest_id.as_str(), 2));
    let refused = phone.app_se.install(&delivery, &code(1), &phone.pinned_keys).unwrap_err();
    assert_eq!(refused.tsm_refusal(), Some(TsmRefusal::CodeHashMismatch), "{refused}");
    let installed = phone.app_se.install(&delivery, &code(2), &phone.pinned_keys).unwrap();
    assert_eq!(installed.manifest.version, 2);
    assert_problem(
        phone.session.fetch_tsm_app("com.other.app", &phone.app_se.certificate().chain_pem).await,
        404,
        "unknown-app",
    );
}

/// A test of each behaviour above on SQLite and, when `VOUCH_TEST_DATABASE_URL` is set,
/// on PostgreSQL.
macro_rules! on_sqlite_and_postgres {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(None).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(url) = super::postgres_database().await else { return };
                super::$name(Some(url)).await;
            }
        }
    )*};
}

on_sqlite_and_postgres!(
    a_message_reaches_its_provider_once_and_an_older_counter_is_refused,
    a_provider_that_is_down_gets_the_message_once_it_is_back,
    a_message_dead_after_its_last_attempt_is_delivered_when_an_operator_retries_it,
    an_se_of_an_unregistered_maker_or_with_a_revoked_certificate_is_not_provisioned,
    the_app_se_installs_a_newer_release_over_the_second_channel,
);
