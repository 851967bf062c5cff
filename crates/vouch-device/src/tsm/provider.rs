//! A service provider's receiver of relayed messages: an HTTP endpoint that Vouch
//! delivers [`RelayEnvelope`]s to, which it opens with its HPKE key. Vouch delivers at
//! least once, so the receiver records each message once by its idempotency key and
//! acknowledges every delivery of it. It can be switched down (503) or to failing
//! (500), as a provider's outage looks to Vouch, and back.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use vouch_proto::hpke::{HpkePrivateKey, HpkePublicKey};
use vouch_proto::tsm::{MessageBody, RelayEnvelope, open_relay};
use vouch_proto::{Jwk, VerifyingKey};

use crate::DeviceError;
use crate::token::lock;

/// The largest delivery read: an envelope carries at most a message body of
/// [`vouch_proto::tsm::MESSAGE_BYTES_MAX`], sealed and in base64url.
pub const RELAY_BODY_BYTES_MAX: usize = 64 * 1024;
/// How many message ids are remembered to recognise a delivery made again; the oldest
/// are forgotten first, long after Vouch has stopped retrying them.
pub const REMEMBERED_IDS_MAX: usize = 1_000_000;
/// How many received messages are kept for the caller to read; the oldest are dropped
/// first.
pub const KEPT_MESSAGES_MAX: usize = 100_000;
const IDEMPOTENCY_KEY: &str = "idempotency-key";
const PROBLEM_JSON: &str = "application/problem+json";

/// How the receiver answers deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReceiverMode {
    /// Opens, records and acknowledges them.
    Up,
    /// 503 Service Unavailable to every delivery.
    Down,
    /// 500 Internal Server Error to every delivery.
    Failing,
}

/// A message a provider received and opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub provider_id: String,
    pub device_id: String,
    pub counter: u64,
    /// When Vouch accepted it, Unix seconds.
    pub created_at: i64,
    /// What the device sent: its payment certificate, the provider's id and the payload.
    pub body: MessageBody,
}

/// What the receiver has answered since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Messages recorded, each once.
    pub received: u64,
    /// Deliveries of a message recorded before, acknowledged again.
    pub duplicates: u64,
    /// Deliveries answered 503 or 500 while down or failing.
    pub unavailable: u64,
    /// Deliveries refused with a 4xx: not an envelope, no idempotency key, or not
    /// opening under the provider's key.
    pub refused: u64,
}

struct Inbox {
    mode: ReceiverMode,
    seen: HashSet<String>,
    /// `seen` in the order recorded, to forget the oldest.
    seen_order: VecDeque<String>,
    kept: VecDeque<ReceivedMessage>,
    stats: ReceiverStats,
}

struct Shared {
    key: HpkePrivateKey,
    inbox: Mutex<Inbox>,
    /// How many messages have been recorded, for those waiting on them.
    received: watch::Sender<u64>,
}

impl Shared {
    /// Records `message` unless its id was recorded before; whether it was new.
    fn record(&self, message: ReceivedMessage) -> bool {
        let mut inbox = lock(&self.inbox);
        if !inbox.seen.insert(message.message_id.clone()) {
            inbox.stats.duplicates += 1;
            return false;
        }
        inbox.seen_order.push_back(message.message_id.clone());
        if inbox.seen_order.len() > REMEMBERED_IDS_MAX
            && let Some(oldest) = inbox.seen_order.pop_front()
        {
            inbox.seen.remove(&oldest);
        }
        inbox.kept.push_back(message);
        if inbox.kept.len() > KEPT_MESSAGES_MAX {
            inbox.kept.pop_front();
        }
        inbox.stats.received += 1;
        self.received.send_replace(inbox.stats.received);
        true
    }
}

/// A provider's receiver on a local port. It stops when dropped.
pub struct ProviderReceiver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    public_jwk: Jwk,
    stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for ProviderReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderReceiver")
            .field("addr", &self.addr)
            .field("mode", &self.mode())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for ProviderReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The server task may have ended already; then there is nothing to stop.
            let _ = stop.send(());
        }
    }
}

impl ProviderReceiver {
    /// Listens on `addr` (port 0 for a free one) with the provider's HPKE `key`.
    pub async fn bind(addr: SocketAddr, key: HpkePrivateKey) -> Result<Self, DeviceError> {
        let listener =
            TcpListener::bind(addr).await.map_err(|source| DeviceError::Listen { addr: addr.to_string(), source })?;
        Self::start(listener, key)
    }

    /// Serves deliveries on `listener` with the provider's HPKE `key`.
    pub fn start(listener: TcpListener, key: HpkePrivateKey) -> Result<Self, DeviceError> {
        let addr = listener.local_addr().map_err(|source| DeviceError::Listen { addr: "listener".into(), source })?;
        let public_jwk = Jwk::from_verifying_key(&VerifyingKey::from_sec1(key.public_key().sec1())?);
        let shared = Arc::new(Shared {
            key,
            inbox: Mutex::new(Inbox {
                mode: ReceiverMode::Up,
                seen: HashSet::new(),
                seen_order: VecDeque::new(),
                kept: VecDeque::new(),
                stats: ReceiverStats::default(),
            }),
            received: watch::Sender::new(0),
        });
        let router = axum::Router::new()
            .route("/", post(receive))
            .layer(DefaultBodyLimit::max(RELAY_BODY_BYTES_MAX))
            .with_state(Arc::clone(&shared));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    // A dropped sender stops the server as a sent stop does.
                    let _ = stopped.await;
                })
                .await
        });
        Ok(ProviderReceiver { shared, addr, public_jwk, stop: Some(stop) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of the address it listens on, to register as the provider's endpoint
    /// where Vouch reaches it there (behind a proxy, register the proxy's URL).
    pub fn endpoint(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn public_key(&self) -> HpkePublicKey {
        self.shared.key.public_key()
    }

    /// The provider's public key as the JWK Vouch registers.
    pub fn public_jwk(&self) -> &Jwk {
        &self.public_jwk
    }

    pub fn mode(&self) -> ReceiverMode {
        lock(&self.shared.inbox).mode
    }

    pub fn set_mode(&self, mode: ReceiverMode) {
        lock(&self.shared.inbox).mode = mode;
    }

    pub fn stats(&self) -> ReceiverStats {
        lock(&self.shared.inbox).stats
    }

    /// The messages kept, oldest first.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        lock(&self.shared.inbox).kept.iter().cloned().collect()
    }

    /// Waits until `count` messages have been received since the start, then gives
    /// the messages kept; [`DeviceError::Timeout`] if they are not all in by `timeout`.
    pub async fn wait_for(&self, count: u64, timeout: Duration) -> Result<Vec<ReceivedMessage>, DeviceError> {
        let mut received = self.shared.received.subscribe();
        match tokio::time::timeout(timeout, received.wait_for(|n| *n >= count)).await {
            // Invariant: `shared` holds the sender, so the channel is open while `self` is.
            Ok(Ok(_)) | Ok(Err(_)) => Ok(self.messages()),
            Err(_) => Err(DeviceError::Timeout { waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) }),
        }
    }

    /// Takes the messages kept, waiting for one if there is none: for a caller that
    /// handles each message once, as it comes.
    pub async fn next_messages(&self) -> Vec<ReceivedMessage> {
        // Subscribed before looking, so a message recorded after the look wakes it.
        let mut received = self.shared.received.subscribe();
        loop {
            let taken: Vec<ReceivedMessage> = lock(&self.shared.inbox).kept.drain(..).collect();
            if !taken.is_empty() {
                return taken;
            }
            if received.changed().await.is_err() {
                return Vec::new();
            }
        }
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    {
        let mut inbox = lock(&shared.inbox);
        let status = match inbox.mode {
            ReceiverMode::Up => None,
            ReceiverMode::Down => Some(StatusCode::SERVICE_UNAVAILABLE),
            ReceiverMode::Failing => Some(StatusCode::INTERNAL_SERVER_ERROR),
        };
        if let Some(status) = status {
            inbox.stats.unavailable += 1;
            return problem(status, "provider-unavailable", "the provider is not taking messages now");
        }
    }
    let refused = |reason: &str, detail: String| {
        lock(&shared.inbox).stats.refused += 1;
        problem(StatusCode::BAD_REQUEST, reason, &detail)
    };
    let Some(key) = headers.get(IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok()) else {
        return refused("missing-idempotency-key", "no Idempotency-Key header, expected the message id".into());
    };
    let envelope: RelayEnvelope = match serde_json::from_slice(&body) {
        Ok(envelope) => envelope,
        Err(e) => return refused("malformed-envelope", format!("not a relay envelope: {e}")),
    };
    if envelope.message_id != key {
        return refused(
            "idempotency-key-mismatch",
            format!("Idempotency-Key {key:?} is not the envelope's message id {:?}", envelope.message_id),
        );
    }
    {
        let mut inbox = lock(&shared.inbox);
        if inbox.seen.contains(key) {
            inbox.stats.duplicates += 1;
            return acknowledged(key, "duplicate");
        }
    }
    let message = match open_relay(&shared.key, &envelope) {
        Ok(body) => ReceivedMessage {
            message_id: envelope.message_id,
            provider_id: envelope.provider_id,
            device_id: envelope.device_id,
            counter: envelope.counter,
            created_at: envelope.created_at,
            body,
        },
        Err(e) => return refused("message-not-authentic", format!("the envelope does not open: {e}")),
    };
    let message_id = message.message_id.clone();
    let status = if shared.record(message) { "received" } else { "duplicate" };
    acknowledged(&message_id, status)
}

fn acknowledged(message_id: &str, status: &str) -> Response {
    (StatusCode::OK, axum::Json(json!({ "message_id": message_id, "status": status }))).into_response()
}

/// An RFC 9457 problem document.
fn problem(status: StatusCode, reason: &str, detail: &str) -> Response {
    let body = json!({
        "type": format!("urn:vouch:problem:{reason}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use vouch_proto::b64;
    use vouch_proto::crypto::SystemRandom;
    use vouch_proto::tsm::seal_relay;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    struct Delivery {
        envelope: RelayEnvelope,
        body: MessageBody,
    }

    /// An envelope as Vouch makes it for the provider whose key is `key`.
    fn delivery(key: &HpkePublicKey, message_id: &str, counter: u64) -> Delivery {
        let body = MessageBody {
            payment_certificate: "eyJ.certificate.sig".into(),
            provider_id: "sp_bank".into(),
            payload: format!("payload {counter}").into_bytes(),
        };
        let sealed = seal_relay(key, message_id, "sp_bank", "dev_phone", counter, &body, &SystemRandom::new()).unwrap();
        let envelope = RelayEnvelope {
            message_id: message_id.into(),
            provider_id: "sp_bank".into(),
            device_id: "dev_phone".into(),
            counter,
            enc: b64::encode(sealed.enc),
            ciphertext: b64::encode(&sealed.ciphertext),
            created_at: 1_760_000_000,
        };
        Delivery { envelope, body }
    }

    async fn receiver() -> ProviderReceiver {
        let key = HpkePrivateKey::generate(&SystemRandom::new()).unwrap();
        ProviderReceiver::bind(SocketAddr::from(([127, 0, 0, 1], 0)), key).await.unwrap()
    }

    /// Posts `body` as Vouch does, with `key` as the Idempotency-Key: the status and
    /// the answer's `status` or problem type.
    async fn post(receiver: &ProviderReceiver, key: Option<&str>, body: &[u8]) -> (u16, String) {
        let mut request = reqwest::Client::new()
            .post(receiver.endpoint())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let answer: serde_json::Value = response.json().await.unwrap();
        let said = answer.get("status").filter(|s| s.is_string()).or_else(|| answer.get("type"));
        (status, said.and_then(|s| s.as_str()).unwrap_or_default().to_owned())
    }

    async fn deliver(receiver: &ProviderReceiver, delivery: &Delivery) -> (u16, String) {
        let body = serde_json::to_vec(&delivery.envelope).unwrap();
        post(receiver, Some(&delivery.envelope.message_id), &body).await
    }

    #[tokio::test]
    async fn a_message_delivered_twice_is_recorded_once_and_acknowledged_both_times() {
        let receiver = receiver().await;
        let first = delivery(&receiver.public_key(), "msg_1", 1);
        assert_eq!(deliver(&receiver, &first).await, (200, "received".into()));
        assert_eq!(deliver(&receiver, &first).await, (200, "duplicate".into()));
        let second = delivery(&receiver.public_key(), "msg_2", 2);
        assert_eq!(deliver(&receiver, &second).await, (200, "received".into()));

        let received = receiver.wait_for(2, WAIT).await.unwrap();
        let seen: Vec<(&str, u64, &MessageBody)> =
            received.iter().map(|m| (m.message_id.as_str(), m.counter, &m.body)).collect();
        assert_eq!(seen, [("msg_1", 1, &first.body), ("msg_2", 2, &second.body)]);
        assert_eq!(received[0].device_id, "dev_phone");
        let stats = receiver.stats();
        assert_eq!((stats.received, stats.duplicates, stats.refused), (2, 1, 0));
        assert_eq!(receiver.next_messages().await.len(), 2, "taken once");
        assert!(receiver.messages().is_empty());
    }

    #[tokio::test]
    async fn a_receiver_switched_down_or_failing_answers_5xx_and_records_nothing_until_it_is_up() {
        let receiver = receiver().await;
        let message = delivery(&receiver.public_key(), "msg_1", 1);
        let cases = [
            (ReceiverMode::Down, 503, "urn:vouch:problem:provider-unavailable"),
            (ReceiverMode::Failing, 500, "urn:vouch:problem:provider-unavailable"),
            (ReceiverMode::Up, 200, "received"),
        ];
        for (mode, status, said) in cases {
            receiver.set_mode(mode);
            assert_eq!(receiver.mode(), mode);
            assert_eq!(deliver(&receiver, &message).await, (status, said.to_owned()), "{mode:?}");
        }
        let stats = receiver.stats();
        assert_eq!((stats.unavailable, stats.received), (2, 1));
        assert_eq!(receiver.wait_for(1, WAIT).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn deliveries_that_cannot_be_taken_are_refused_with_a_4xx() {
        let receiver = receiver().await;
        let stranger = HpkePrivateKey::generate(&SystemRandom::new()).unwrap();
        let good = delivery(&receiver.public_key(), "msg_1", 1);
        let good_json = serde_json::to_vec(&good.envelope).unwrap();
        let for_another_provider = delivery(&stranger.public_key(), "msg_2", 2);
        let relabelled = RelayEnvelope { counter: 9, ..good.envelope.clone() };
        let cases: [(&str, Option<&str>, Vec<u8>, &str); 5] = [
            ("no idempotency key", None, good_json.clone(), "missing-idempotency-key"),
            ("another idempotency key", Some("msg_9"), good_json, "idempotency-key-mismatch"),
            ("not JSON", Some("msg_1"), b"{not json".to_vec(), "malformed-envelope"),
            (
                "sealed to another provider",
                Some("msg_2"),
                serde_json::to_vec(&for_another_provider.envelope).unwrap(),
                "message-not-authentic",
            ),
            ("another counter", Some("msg_1"), serde_json::to_vec(&relabelled).unwrap(), "message-not-authentic"),
        ];
        for (case, key, body, reason) in cases {
            let (status, said) = post(&receiver, key, &body).await;
            assert_eq!((status, said), (400, format!("urn:vouch:problem:{reason}")), "{case}");
        }
        let stats = receiver.stats();
        assert_eq!((stats.refused, stats.received), (5, 0));
        assert!(matches!(receiver.wait_for(1, Duration::from_millis(50)).await, Err(DeviceError::Timeout { .. })));
        assert_eq!(deliver(&receiver, &good).await, (200, "received".into()), "a refusal does not mark the id seen");
    }

    #[tokio::test]
    async fn the_public_jwk_is_the_hpke_key() {
        let receiver = receiver().await;
        let from_jwk = receiver.public_jwk().verifying_key().unwrap();
        assert_eq!(from_jwk.sec1(), receiver.public_key().sec1());
        assert!(receiver.endpoint().starts_with("http://127.0.0.1:"));
    }

    #[tokio::test]
    async fn a_dropped_receiver_stops_listening() {
        let receiver = receiver().await;
        let endpoint = receiver.endpoint();
        drop(receiver);
        let client = reqwest::Client::new();
        let mut refused = false;
        for _ in 0..50 {
            if client.post(&endpoint).body("{}").send().await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "still answering at {endpoint}");
    }
}
