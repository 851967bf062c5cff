//! The trusted service manager's outbox across a crash: messages accepted while their
//! provider is down survive a SIGKILL of `vouch serve`, and the restarted server
//! delivers each of them, once, when the provider is back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vouch_device::VouchClient;
use vouch_device::attest::SimulatedDeviceState;
use vouch_device::sim::{self, TsmPhoneSetup};
use vouch_device::tsm::{OutboxQuery, OutboxStatus, ReceiverMode};
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::{Clock, SystemClock};

use crate::serve::{ServeProcess, postgres_schema};

const MESSAGES: usize = 20;
/// Retries come quickly and a lease held by the killed server runs out soon.
const FAST_RETRIES: [(&str, &str); 3] =
    [("VOUCH_TSM_RETRY_BASE_SECS", "1"), ("VOUCH_TSM_RETRY_MAX_SECS", "2"), ("VOUCH_TSM_DELIVERY_TIMEOUT_SECS", "2")];
const DELIVERY_WAIT: Duration = Duration::from_secs(90);

fn outbox_survives_a_crash(database: Option<&str>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut server = ServeProcess::start_with(database, &FAST_RETRIES);
    let admin_key = server.admin_key.clone();
    let rng = SystemRandom::new();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    let (mut phone, provider, sent) = runtime.block_on(async {
        let admin = VouchClient::new(&server.url).unwrap().with_api_key(&admin_key);
        let merchant = admin.create_merchant("Phone shop").await.unwrap();
        let phones = SimulatedDeviceState::clean(DeviceKind::Consumer, &merchant.merchant_id);
        admin.put_reference_values(&phones.reference_values()).await.unwrap();
        let (maker, _) = sim::tsm_maker(&admin, "Maker", clock.clone(), &rng).await.unwrap();
        let code = b"payment application".to_vec();
        admin.publish_tsm_app(&sim::tsm_app_manifest("pay.app", 1, &code, "javacard-3.1")).await.unwrap();
        let setup = TsmPhoneSetup {
            instrument: "tok_restart".into(),
            app_id: "pay.app".into(),
            code,
            se_profile: "javacard-3.1".into(),
        };
        let devices = VouchClient::new(&server.url).unwrap();
        let mut phone =
            sim::tsm_phone(&admin, &devices, &merchant.merchant_id, &maker, &setup, clock.clone(), &rng).await.unwrap();
        let provider = sim::tsm_provider(&admin, "Bank", &rng).await.unwrap();
        provider.receiver.set_mode(ReceiverMode::Down);
        let gateway = sim::tsm_gateway(&admin, "SMS gateway").await.unwrap();
        let mut sent = BTreeSet::new();
        for i in 0..MESSAGES {
            let payload = format!("instruction {i}");
            let envelope = phone.message(provider.provider_id(), payload.as_bytes()).unwrap();
            gateway.relay_tsm_message(&phone.device_id, &envelope).await.unwrap();
            sent.insert(payload);
        }
        // Every message has met the provider down at least once before the crash.
        let deadline = Instant::now() + DELIVERY_WAIT;
        loop {
            let page = admin.tsm_outbox(&OutboxQuery::default()).await.unwrap();
            if page.messages.len() == MESSAGES && page.messages.iter().all(|m| m.attempts >= 1) {
                assert!(page.messages.iter().all(|m| m.status == OutboxStatus::Pending), "{page:?}");
                break;
            }
            assert!(Instant::now() < deadline, "the messages were not tried while the provider was down");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(provider.receiver.stats().received, 0);
        (phone, provider, sent)
    });

    server.kill();
    provider.receiver.set_mode(ReceiverMode::Up);
    server.restart();

    runtime.block_on(async {
        let received = provider.receiver.wait_for(MESSAGES as u64, DELIVERY_WAIT).await.unwrap();
        let payloads: BTreeSet<String> =
            received.iter().map(|m| String::from_utf8(m.body.payload.clone()).unwrap()).collect();
        assert_eq!(payloads, sent, "each message delivered after the restart");
        let admin = VouchClient::new(&server.url).unwrap().with_api_key(&admin_key);
        let deadline = Instant::now() + DELIVERY_WAIT;
        loop {
            let delivered = OutboxQuery { status: Some(OutboxStatus::Delivered), ..OutboxQuery::default() };
            if admin.tsm_outbox(&delivered).await.unwrap().messages.len() == MESSAGES {
                break;
            }
            assert!(Instant::now() < deadline, "the outbox did not record every delivery");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stats = provider.receiver.stats();
        assert_eq!(stats.received, MESSAGES as u64, "each message recorded once: {stats:?}");

        // The restarted server still refuses what the first one accepted.
        let gateway = sim::tsm_gateway(&admin, "SMS gateway after the restart").await.unwrap();
        let envelope = phone.message(provider.provider_id(), b"after the restart").unwrap();
        gateway.relay_tsm_message(&phone.device_id, &envelope).await.unwrap();
        let again = gateway.relay_tsm_message(&phone.device_id, &envelope).await.unwrap();
        assert!(again.duplicate, "the same message again is answered as the first");
        provider.receiver.wait_for(MESSAGES as u64 + 1, DELIVERY_WAIT).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(provider.receiver.stats().received, MESSAGES as u64 + 1);
    });
}

mod messages_queued_before_a_crash_are_delivered_once_after_it {
    use super::*;

    #[test]
    fn sqlite() {
        outbox_survives_a_crash(None);
    }

    #[test]
    fn postgres() {
        let Some(url) = postgres_schema() else { return };
        outbox_survives_a_crash(Some(&url));
    }
}
