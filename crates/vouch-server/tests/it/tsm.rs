//! tsm: the trusted service manager's endpoints, with what they hand out checked the way
//! its receivers check it — device makers' CAs registered; a phone's crypto secure
//! element provisioned and opening its sealed device key; payment apps signed and
//! sealed to the app secure element; the gateway's messages queued sealed for their
//! provider; and the outbox delivering them to a provider the test runs on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header::{CONNECTION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PublicKeyData, SerialNumber, SignatureAlgorithm, date_time_ymd,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vouch_proto::crypto::{SystemRandom, random_bytes, sha256};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::hpke::{HpkePrivateKey, HpkePublicKey};
use vouch_proto::jws::Header;
use vouch_proto::tsm::{
    AppManifest, DeviceKey, MANIFEST_TYP, MESSAGE_BYTES_MAX, ManifestClaims, MessageBody, PAYMENT_CERTIFICATE_TYP,
    PROVISION_TYP, PaymentCertificateClaims, ProvisionClaims, RelayEnvelope, TsmRefusal, check_install, code_sha256,
    open_app_delivery, open_provisioning, open_relay, seal_message, verify_payment_certificate,
};
use vouch_proto::{Clock, JwkSet, ProtoError, VerifyingKey, b64, jwt};
use vouch_server::Config;
use vouch_server::attest::DEFAULT_POLICY;
use vouch_server::tsm::{DeliveryRound, IDEMPOTENCY_KEY, deliver_due};
use vouch_store::{OutboxFilter, OutboxMessage, OutboxStatus};

use crate::attest::{DeviceHealth, FIRMWARE, bare_fixture, reference_values};
use crate::dvv::Market;
use crate::support::{Reply, TestServer, assert_problem, postgres_url};
use crate::token::{Holder, Session};

const ISSUERS: &str = "/v1/tsm/issuers";
const APPS: &str = "/v1/tsm/apps";
const MESSAGES: &str = "/v1/tsm/messages";
const OUTBOX: &str = "/v1/tsm/outbox";
const DAY: i64 = 24 * 3600;
const INSTRUMENT: &str = "tok_4111_card_1";
const SE_PROFILE: &str = "javacard-3.1";
const APP_CODE: &[u8] = b"payment application, release 2: EMV contactless kernel";
const NO_DEVICE: &str = "dev_00000000000000000000000000000000";

// ---- Certificates ----

/// The validity of a certificate a test does not date otherwise: from a day before
/// the server's time to a year after it.
fn validity(now: i64) -> (i64, i64) {
    (now - DAY, now + 365 * DAY)
}

fn certificate_params(common_name: &str, window: (i64, i64)) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Maker");
    params.distinguished_name.push(DnType::CommonName, common_name);
    set_validity(&mut params, window);
    params
}

fn set_validity(params: &mut CertificateParams, (not_before, not_after): (i64, i64)) {
    let unix = |secs: i64| date_time_ymd(1970, 1, 1) + Duration::from_secs(secs.unsigned_abs());
    params.not_before = unix(not_before);
    params.not_after = unix(not_after);
}

/// A secure element's leaf, for key agreement, valid over `window`.
fn leaf_params(window: (i64, i64)) -> CertificateParams {
    let mut params = certificate_params("Secure Element", window);
    params.key_usages = vec![KeyUsagePurpose::KeyAgreement];
    params
}

/// A secure element's HPKE key as the public key its certificate certifies.
struct CertifiedKey<'a>(&'a HpkePublicKey);

impl PublicKeyData for CertifiedKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.sec1()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// A device maker's CA, which certifies secure elements.
struct Maker {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
    pem: String,
}

impl Maker {
    fn new(common_name: &str, window: (i64, i64)) -> Maker {
        let mut params = certificate_params(common_name, window);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self::self_signed(params, KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap())
    }

    /// The CA's certificate made again for `window`, with its name and key: what a maker
    /// registers before the certificate it has runs out.
    fn renewed(&self, window: (i64, i64)) -> Maker {
        let mut params = self.params.clone();
        set_validity(&mut params, window);
        Self::self_signed(params, KeyPair::from_pem(&self.key.serialize_pem()).unwrap())
    }

    fn self_signed(params: CertificateParams, key: KeyPair) -> Maker {
        let certificate = params.self_signed(&key).unwrap();
        Maker { der: certificate.der().to_vec(), pem: certificate.pem(), params, key }
    }

    /// A secure element with a fresh key, certified by this maker as `leaf` says.
    fn certify(&self, leaf: CertificateParams) -> SecureElement {
        let key = HpkePrivateKey::generate(&SystemRandom::new()).unwrap();
        let certificate =
            leaf.signed_by(&CertifiedKey(&key.public_key()), &Issuer::from_params(&self.params, &self.key)).unwrap();
        SecureElement { key, chain_pem: certificate.pem() }
    }

    /// A secure element certified for key agreement, valid at `now`.
    fn secure_element(&self, now: i64) -> SecureElement {
        self.certify(leaf_params(validity(now)))
    }
}

/// A secure element: its key, and the chain it presents.
struct SecureElement {
    key: HpkePrivateKey,
    chain_pem: String,
}

async fn register_issuer(server: &TestServer, name: &str, pem: &str) -> Reply {
    let body = json!({ "name": name, "certificate_pem": pem });
    server.call("POST", ISSUERS, Some(&server.admin_key), Some(body)).await
}

// ---- A phone and its secure elements ----

/// A consumer phone with a session, on a server where its maker's CA is registered.
struct Phone {
    holder: Holder,
    session: Session,
    maker: Maker,
}

/// What provisioning gave the crypto SE, opened as the SE opens it: the JWS checked
/// against the published keys, then the HPKE seal opened with the SE's key.
struct Provisioned {
    answer: Value,
    claims: ProvisionClaims,
    device_key: DeviceKey,
    payment_certificate: String,
}

impl Phone {
    async fn new() -> Phone {
        Self::on(|_| {}).await
    }

    async fn on(configure: impl FnOnce(&mut Config)) -> Phone {
        let fx = bare_fixture(configure).await;
        fx.put_reference(&reference_values(FIRMWARE)).await;
        let mut holder = Holder::on(fx, DeviceKind::Consumer, &DeviceHealth::clean()).await;
        let session = holder.session().await;
        Self::holding(holder, session).await
    }

    async fn holding(holder: Holder, session: Session) -> Phone {
        let maker = Maker::new("Maker Root", validity(holder.fx.clock.now_unix()));
        let registered = register_issuer(&holder.fx.server, "Maker", &maker.pem).await;
        assert_eq!(registered.status.as_u16(), 201, "issuer: {}", registered.json);
        Phone { holder, session, maker }
    }

    fn server(&self) -> &TestServer {
        &self.holder.fx.server
    }

    fn admin(&self) -> Option<&str> {
        Some(&self.server().admin_key)
    }

    fn device_id(&self) -> String {
        self.holder.device.device_id.clone()
    }

    fn now(&self) -> i64 {
        self.holder.fx.clock.now_unix()
    }

    fn secure_element(&self) -> SecureElement {
        self.maker.secure_element(self.now())
    }

    /// A DPoP-protected POST with the phone's session.
    async fn post(&mut self, path: &str, body: Value) -> Reply {
        let token = self.session.token.clone();
        let proof = self.holder.proof("POST", path, Some(&token));
        self.holder.protected(path, Some(format!("DPoP {token}")), &[proof], body).await
    }

    async fn provision(&mut self, se: &SecureElement) -> Reply {
        let body = json!({ "crypto_se_chain_pem": se.chain_pem, "instrument": INSTRUMENT });
        self.post(&provision_path(&self.device_id()), body).await
    }

    async fn provisioned(&mut self, se: &SecureElement) -> Provisioned {
        let reply = self.provision(se).await;
        assert_eq!(reply.status.as_u16(), 201, "provision: {}", reply.json);
        assert_eq!(reply.headers["cache-control"], "no-store");
        let jwks = self.server().jwks().await;
        let jws = reply.json["provisioning"].as_str().unwrap();
        let claims: ProvisionClaims = jwt::verify_by_kid(jws, PROVISION_TYP, published(&jwks)).unwrap();
        let secrets = open_provisioning(&se.key, &claims).unwrap();
        Provisioned {
            answer: reply.json,
            claims,
            device_key: secrets.device_key,
            payment_certificate: secrets.payment_certificate,
        }
    }

    async fn fetch_app(&mut self, app_id: &str, app_se: &SecureElement) -> Reply {
        let body = json!({ "app_id": app_id, "app_se_chain_pem": app_se.chain_pem });
        self.post(&format!("/v1/tsm/devices/{}/app", self.device_id()), body).await
    }

    /// Asserts nothing was audited since `mark` and the phone has no registration.
    async fn assert_not_provisioned(&self, context: &str, mark: i64) {
        self.server().assert_audited(context, mark, &[]).await;
        let registration = self.server().state.store.tsm_registration(&self.device_id()).await.unwrap();
        assert!(registration.is_none(), "{context}: a registration was stored");
    }
}

fn provision_path(device_id: &str) -> String {
    format!("/v1/tsm/devices/{device_id}/provision")
}

fn published(jwks: &JwkSet) -> impl Fn(&str) -> Option<VerifyingKey> + '_ {
    |kid| jwks.find(kid).and_then(|jwk| jwk.verifying_key().ok())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// Asserts no file of the server's data directory holds `secret`, raw or in base64url.
/// `witness` is something stored, so the scan is known to have read the database.
fn assert_not_stored(server: &TestServer, witness: &str, what: &str, secret: &[u8]) {
    let encoded = b64::encode(secret);
    let mut witnessed = false;
    for entry in std::fs::read_dir(&server.state.config.data_dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        witnessed |= contains(&bytes, witness.as_bytes());
        assert!(!contains(&bytes, secret), "{what} is in {}", path.display());
        assert!(!contains(&bytes, encoded.as_bytes()), "{what} (base64url) is in {}", path.display());
    }
    assert!(witnessed, "{witness} is in no file of the data directory: the scan missed the database");
}

/// Asserts the outbox row of `message_id` and every audit entry are free of `payload`,
/// raw or in base64url: what a database other than SQLite's files can be checked for.
async fn assert_payload_not_in_rows(server: &TestServer, message_id: &str, payload: &[u8]) {
    let encoded = b64::encode(payload);
    let holds = |bytes: &[u8]| contains(bytes, payload) || contains(bytes, encoded.as_bytes());
    let stored = server.state.store.outbox_message(message_id).await.unwrap().unwrap();
    let last_error = stored.last_error.unwrap_or_default();
    let columns = [("enc", &stored.enc[..]), ("ciphertext", &stored.ciphertext), ("last_error", last_error.as_bytes())];
    for (column, bytes) in columns {
        assert!(!holds(bytes), "the payload is in the outbox's {column}");
    }
    for record in server.audit().await {
        assert!(!holds(record.entry.detail.as_bytes()), "the payload is in audit entry {}", record.entry.action);
    }
}

// ---- A service provider's endpoint ----

/// A request the provider's endpoint received, and what it answered: `None` when it
/// stalled instead.
#[derive(Debug, Clone)]
struct Received {
    idempotency_key: Option<String>,
    content_type: Option<String>,
    envelope: RelayEnvelope,
    answered: Option<u16>,
}

/// What the endpoint shares with its handler: the status to answer (or to stall,
/// answering long after any delivery timeout), and every request.
struct Inbox {
    answer: AtomicU16,
    stalled: AtomicBool,
    received: Mutex<Vec<Received>>,
}

/// Longer than any delivery timeout a test sets.
const STALL: Duration = Duration::from_secs(30);

/// A service provider registered on the server, whose endpoint runs on 127.0.0.1 and
/// can be stopped (its port then refuses connections) and started again on that port.
struct Provider {
    id: String,
    key: HpkePrivateKey,
    addr: SocketAddr,
    inbox: Arc<Inbox>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

async fn receive(
    State(inbox): State<Arc<Inbox>>,
    headers: HeaderMap,
    Json(envelope): Json<RelayEnvelope>,
) -> impl axum::response::IntoResponse {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    let status = inbox.answer.load(Ordering::SeqCst);
    let stalled = inbox.stalled.load(Ordering::SeqCst);
    let received = Received {
        idempotency_key: header(IDEMPOTENCY_KEY),
        content_type: header(CONTENT_TYPE.as_str()),
        envelope,
        answered: (!stalled).then_some(status),
    };
    inbox.received.lock().unwrap().push(received);
    if stalled {
        tokio::time::sleep(STALL).await;
    }
    // One request per connection: a stopped endpoint leaves no kept-alive connection
    // behind for the next delivery to reuse.
    (StatusCode::from_u16(status).unwrap(), [(CONNECTION, HeaderValue::from_static("close"))])
}

impl Provider {
    /// Starts an endpoint answering 200 and registers it as provider `name`.
    async fn start(server: &TestServer, name: &str) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = HpkePrivateKey::generate(&SystemRandom::new()).unwrap();
        let inbox = Arc::new(Inbox {
            answer: AtomicU16::new(200),
            stalled: AtomicBool::new(false),
            received: Mutex::new(Vec::new()),
        });
        let mut provider =
            Provider { id: String::new(), key, addr: listener.local_addr().unwrap(), inbox, running: None };
        provider.serve(listener);
        let public_jwk = VerifyingKey::from_sec1(provider.key.public_key().sec1()).unwrap().to_jwk();
        let body =
            json!({ "name": name, "endpoint": format!("http://{}/relay", provider.addr), "public_jwk": public_jwk });
        let created = server.expect(201, "POST", "/v1/service-providers", Some(&server.admin_key), Some(body)).await;
        provider.id = created["service_provider_id"].as_str().unwrap().to_owned();
        provider
    }

    fn serve(&mut self, listener: TcpListener) {
        let app = axum::Router::new().route("/relay", axum::routing::post(receive)).with_state(self.inbox.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        self.running = Some((stop, task));
    }

    fn answer(&self, status: u16) {
        self.inbox.stalled.store(false, Ordering::SeqCst);
        self.inbox.answer.store(status, Ordering::SeqCst);
    }

    fn stall(&self) {
        self.inbox.stalled.store(true, Ordering::SeqCst);
    }

    /// Closes the endpoint: its port refuses connections until [`Provider::restart`].
    async fn stop(&mut self) {
        let (stop, task) = self.running.take().expect("the endpoint is running");
        stop.send(()).unwrap();
        task.await.unwrap();
    }

    /// Listens again on the same port, answering `status`.
    async fn restart(&mut self, status: u16) {
        self.answer(status);
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn received(&self) -> Vec<Received> {
        self.inbox.received.lock().unwrap().clone()
    }

    fn answers(&self) -> Vec<Option<u16>> {
        self.received().iter().map(|r| r.answered).collect()
    }

    fn acknowledged(&self) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.answered.is_some_and(|status| (200..300).contains(&status))).collect()
    }
}

// ---- A phone whose messages reach a provider ----

/// A provisioned phone, a provider listening for its messages and a gateway's API key.
struct Relay {
    phone: Phone,
    provisioned: Provisioned,
    provider: Provider,
    gateway_key: String,
    /// The last counter the crypto SE sealed under.
    counter: u64,
}

impl Relay {
    async fn new() -> Relay {
        Self::on(|_| {}).await
    }

    async fn on(configure: impl FnOnce(&mut Config)) -> Relay {
        let mut phone = Phone::on(configure).await;
        let se = phone.secure_element();
        let provisioned = phone.provisioned(&se).await;
        let provider = Provider::start(phone.server(), "Bank").await;
        let (_, gateway_key) = phone.server().api_key(&["gateway"]).await;
        Relay { phone, provisioned, provider, gateway_key, counter: 0 }
    }

    fn server(&self) -> &TestServer {
        self.phone.server()
    }

    fn device_id(&self) -> String {
        self.phone.device_id()
    }

    fn now(&self) -> i64 {
        self.phone.now()
    }

    fn advance(&self, secs: i64) {
        self.phone.holder.fx.clock.advance(secs);
    }

    /// A body with the phone's payment certificate, for the relay's provider.
    fn body(&self, payload: &[u8]) -> MessageBody {
        MessageBody {
            payment_certificate: self.provisioned.payment_certificate.clone(),
            provider_id: self.provider.id.clone(),
            payload: payload.to_vec(),
        }
    }

    /// `body` sealed by the crypto SE under its device key and its next counter.
    fn seal(&mut self, body: &MessageBody) -> Vec<u8> {
        self.counter += 1;
        seal_message(&self.provisioned.device_key, &self.device_id(), self.counter, body).unwrap()
    }

    fn message(&mut self, payload: &[u8]) -> Vec<u8> {
        let body = self.body(payload);
        self.seal(&body)
    }

    async fn send(&self, envelope: &[u8]) -> Reply {
        self.send_to(self.server(), envelope).await
    }

    /// What the gateway posts for the phone to `server`.
    async fn send_to(&self, server: &TestServer, envelope: &[u8]) -> Reply {
        let body = gateway_message(&self.device_id(), envelope);
        server.call("POST", MESSAGES, Some(&self.gateway_key), Some(body)).await
    }

    /// Sends a new message with `payload`, asserting it was queued; its message id.
    async fn queue(&mut self, payload: &[u8]) -> String {
        let envelope = self.message(payload);
        let reply = self.send(&envelope).await;
        assert_eq!(reply.status.as_u16(), 202, "message: {}", reply.json);
        reply.json["message_id"].as_str().unwrap().to_owned()
    }

    async fn deliver(&self) -> DeliveryRound {
        deliver_due(&self.server().state).await.unwrap()
    }

    async fn stored(&self, message_id: &str) -> OutboxMessage {
        self.server().state.store.outbox_message(message_id).await.unwrap().expect("the message is in the outbox")
    }

    /// Asserts nothing was audited since `mark`, the outbox holds `queued` messages and
    /// the device's last counter is `last_counter`.
    async fn assert_unchanged(&self, context: &str, mark: i64, queued: usize, last_counter: i64) {
        let server = self.server();
        server.assert_audited(context, mark, &[]).await;
        let outbox = server.state.store.outbox_page(&OutboxFilter::default(), None, 500).await.unwrap();
        assert_eq!(outbox.len(), queued, "{context}: outbox");
        let registration = server.state.store.tsm_registration(&self.device_id()).await.unwrap().unwrap();
        assert_eq!(registration.last_counter, last_counter, "{context}: last counter");
    }
}

fn gateway_message(device_id: &str, envelope: &[u8]) -> Value {
    json!({ "device_id": device_id, "message": b64::encode(envelope) })
}

// ---- Issuers ----

#[tokio::test]
async fn a_registered_issuer_shows_its_certificate() {
    let fx = bare_fixture(|_| {}).await;
    let server = &fx.server;
    let now = server.now();
    let maker = Maker::new("Maker Root", validity(now));
    let mark = server.audit_mark().await;
    let reply = register_issuer(server, "Maker", &maker.pem).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.json);
    let issuer_id = reply.json["issuer_id"].as_str().unwrap();
    assert!(issuer_id.starts_with("iss_"), "{issuer_id}");
    let (not_before, not_after) = validity(now);
    let expected = json!({
        "issuer_id": issuer_id, "name": "Maker", "subject": "O=Maker, CN=Maker Root",
        "not_before": not_before, "not_after": not_after, "fingerprint_sha256": vouch_proto::hex::encode(sha256(&maker.der)),
        "created_at": now,
    });
    assert_eq!(reply.json, expected);
    server.assert_audited("registered", mark, &[("tsm.issuer_registered", issuer_id)]).await;
    let listed = server.expect(200, "GET", ISSUERS, Some(&server.admin_key), None).await;
    assert_eq!(listed, json!([expected]));
}

#[tokio::test]
async fn each_issuer_refusal_names_its_reason_and_writes_nothing() {
    let fx = bare_fixture(|_| {}).await;
    let server = &fx.server;
    let now = server.now();
    let maker = Maker::new("Maker Root", validity(now));
    assert_eq!(register_issuer(server, "Maker", &maker.pem).await.status.as_u16(), 201);
    let other = Maker::new("Other Root", validity(now));
    let not_der = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    let cases = [
        ("the same CA again", "Maker again", maker.pem.clone(), 409, "issuer-exists"),
        ("a secure element's certificate", "Maker", maker.secure_element(now).chain_pem, 422, "not-a-ca"),
        ("no PEM block", "Maker", "not a certificate".to_owned(), 422, "malformed-certificate"),
        ("a block that is not DER", "Maker", not_der.to_owned(), 422, "malformed-certificate"),
        ("two certificates", "Maker", format!("{}{}", other.pem, maker.pem), 422, "invalid-field"),
        ("an empty name", "", other.pem.clone(), 422, "invalid-field"),
    ];
    let mark = server.audit_mark().await;
    for (context, name, pem, status, problem) in cases {
        assert_problem(context, &register_issuer(server, name, &pem).await, status, problem);
    }
    server.assert_audited("nothing refused is audited", mark, &[]).await;
    assert_eq!(server.state.store.tsm_issuers().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_ca_past_its_validity_is_not_registered() {
    let fx = bare_fixture(|_| {}).await;
    let now = fx.server.now();
    let maker = Maker::new("Maker Root", (now - DAY, now + 60));
    fx.clock.advance(61);
    let mark = fx.server.audit_mark().await;
    assert_problem("expired", &register_issuer(&fx.server, "Maker", &maker.pem).await, 422, "certificate-expired");
    fx.server.assert_audited("nothing refused is audited", mark, &[]).await;
    assert!(fx.server.state.store.tsm_issuers().await.unwrap().is_empty());
}

#[tokio::test]
async fn only_an_admin_key_manages_issuers() {
    let fx = bare_fixture(|_| {}).await;
    let server = &fx.server;
    let maker = Maker::new("Maker Root", validity(server.now()));
    let body = json!({ "name": "Maker", "certificate_pem": maker.pem });
    let revocation = json!({ "serial": "01" });
    let revocations = "/v1/tsm/issuers/iss_00000000000000000000000000000000/revocations";
    let (_, gateway) = server.api_key(&["gateway"]).await;
    let (_, provision) = server.api_key(&["provision"]).await;
    let mark = server.audit_mark().await;
    for (scope, key) in [("gateway", gateway), ("provision", provision)] {
        let key = Some(key.as_str());
        let reply = server.call("POST", ISSUERS, key, Some(body.clone())).await;
        assert_problem(scope, &reply, 403, "insufficient-scope");
        assert_problem(scope, &server.call("GET", ISSUERS, key, None).await, 403, "insufficient-scope");
        let reply = server.call("POST", revocations, key, Some(revocation.clone())).await;
        assert_problem(scope, &reply, 403, "insufficient-scope");
    }
    assert_problem("no key", &server.call("POST", ISSUERS, None, Some(body)).await, 401, "missing-credentials");
    server.assert_audited("nothing refused is audited", mark, &[]).await;
    assert!(server.state.store.tsm_issuers().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_revoked_serial_is_kept_canonical_and_refuses_its_secure_element() {
    let mut phone = Phone::new().await;
    let issuer_id = phone.server().state.store.tsm_issuers().await.unwrap()[0].id.clone();
    let mut leaf = leaf_params(validity(phone.now()));
    leaf.serial_number = Some(SerialNumber::from_slice(&[0xa1, 0xb2]));
    let se = phone.maker.certify(leaf);
    let path = format!("{ISSUERS}/{issuer_id}/revocations");
    let server = phone.server();
    let mark = server.audit_mark().await;
    let revoked = server.expect(201, "POST", &path, phone.admin(), Some(json!({ "serial": "A1:B2" }))).await;
    assert_eq!(revoked, json!({ "issuer_id": issuer_id, "serial": "00a1b2", "revoked_at": phone.now() }));
    server.assert_audited("revoked", mark, &[("tsm.certificate_revoked", &issuer_id)]).await;

    let mark = server.audit_mark().await;
    let again = server.call("POST", &path, phone.admin(), Some(json!({ "serial": "00a1b2" }))).await;
    assert_problem("the same serial again", &again, 409, "already-revoked");
    let cases = [
        ("not hex", path.clone(), json!({ "serial": "A1:XZ" }), 422, "invalid-serial"),
        ("too long", path.clone(), json!({ "serial": "ab".repeat(40) }), 422, "invalid-serial"),
        ("empty", path.clone(), json!({ "serial": "" }), 422, "invalid-serial"),
        ("unknown issuer", format!("{ISSUERS}/iss_nope/revocations"), json!({ "serial": "01" }), 404, "not-found"),
    ];
    for (context, path, body, status, problem) in cases {
        assert_problem(context, &server.call("POST", &path, phone.admin(), Some(body)).await, status, problem);
    }
    server.assert_audited("nothing refused is audited", mark, &[]).await;

    let reply = phone.provision(&se).await;
    assert_problem("revoked secure element", &reply, 403, "certificate-revoked");
    phone.assert_not_provisioned("revoked", mark).await;
}

// ---- Provisioning ----

#[tokio::test]
async fn provisioning_seals_a_device_key_and_payment_certificate_to_the_crypto_se() {
    let mut phone = Phone::on(|config| config.tsm_payment_certificate_ttl_secs = 30 * DAY).await;
    let se = phone.secure_element();
    let mark = phone.server().audit_mark().await;
    let provisioned = phone.provisioned(&se).await;
    let (server, device_id, now) = (phone.server(), phone.device_id(), phone.now());
    let claims = &provisioned.claims;
    let registration_id = claims.registration_id.as_str();
    assert!(registration_id.starts_with("reg_"), "{registration_id}");
    assert_eq!(
        provisioned.answer,
        json!({
            "registration_id": registration_id, "device_id": device_id, "se_serial": claims.se_serial,
            "provisioning": provisioned.answer["provisioning"], "registered_at": now,
        })
    );
    assert_eq!(
        (claims.iss.as_str(), claims.iat, claims.device_id.as_str()),
        (server.state.config.issuer.as_str(), now, device_id.as_str())
    );

    let jwks = server.jwks().await;
    let certificate = verify_payment_certificate(&provisioned.payment_certificate, published(&jwks), now).unwrap();
    let expected = PaymentCertificateClaims {
        iss: server.state.config.issuer.clone(),
        sub: device_id.clone(),
        registration_id: registration_id.to_owned(),
        instrument: INSTRUMENT.to_owned(),
        iat: now,
        exp: now + 30 * DAY,
    };
    assert_eq!(certificate, expected);
    let other = phone.secure_element();
    assert!(open_provisioning(&other.key, claims).is_err(), "another secure element opens the device key");

    let stored = server.state.store.tsm_registration(&device_id).await.unwrap().unwrap();
    let issuer_id = &server.state.store.tsm_issuers().await.unwrap()[0].id;
    assert_eq!(
        (
            &stored.registration_id,
            &stored.issuer_id,
            &stored.se_serial,
            stored.instrument.as_str(),
            stored.last_counter
        ),
        (&claims.registration_id, issuer_id, &claims.se_serial, INSTRUMENT, 0)
    );
    assert_eq!(stored.se_public_key, se.key.public_key().sec1());
    let device_key = provisioned.device_key.as_bytes();
    assert!(!contains(&stored.sealed_device_key, device_key), "the device key is stored in the clear");
    assert_not_stored(server, registration_id, "the device key", device_key);
    server.assert_audited("provisioned", mark, &[("tsm.device_provisioned", &device_id)]).await;
    server.assert_audit_intact("provisioned").await;
}

#[tokio::test]
async fn the_se_serial_is_the_leaf_s_canonical_serial() {
    let mut phone = Phone::new().await;
    let mut leaf = leaf_params(validity(phone.now()));
    leaf.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x42, 0x99]));
    let se = phone.maker.certify(leaf);
    let provisioned = phone.provisioned(&se).await;
    assert_eq!(provisioned.claims.se_serial, "4299");
    assert_eq!(provisioned.answer["se_serial"], "4299");
}

#[tokio::test]
async fn each_provisioning_refusal_names_its_reason_and_writes_nothing() {
    let mut phone = Phone::new().await;
    let now = phone.now();
    let good = phone.secure_element().chain_pem;
    let mut no_key_agreement = leaf_params(validity(now));
    no_key_agreement.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let long_instrument = "x".repeat(65);
    let cases = [
        (
            "an unregistered maker",
            Maker::new("Other Root", validity(now)).secure_element(now).chain_pem,
            INSTRUMENT,
            422,
            "unknown-issuer",
        ),
        (
            "a leaf without keyAgreement",
            phone.maker.certify(no_key_agreement).chain_pem,
            INSTRUMENT,
            422,
            "wrong-key-usage",
        ),
        ("not PEM", "a chain".to_owned(), INSTRUMENT, 422, "malformed-certificate"),
        ("an empty instrument", good.clone(), "", 422, "invalid-field"),
        ("an instrument over 64 characters", good.clone(), long_instrument.as_str(), 422, "invalid-field"),
    ];
    let other = phone.holder.fx.enrol(DeviceKind::Consumer).await;
    let mark = phone.server().audit_mark().await;
    let path = provision_path(&phone.device_id());
    for (context, chain, instrument, status, problem) in cases {
        let reply = phone.post(&path, json!({ "crypto_se_chain_pem": chain, "instrument": instrument })).await;
        assert_problem(context, &reply, status, problem);
    }
    let body = json!({ "crypto_se_chain_pem": good, "instrument": INSTRUMENT });
    let reply = phone.post(&provision_path(&other.device_id), body.clone()).await;
    assert_problem("another device's path", &reply, 403, "wrong-device");
    let reply = phone.server().call("POST", &path, None, Some(body.clone())).await;
    assert_problem("no token", &reply, 401, "missing-credentials");
    let token = phone.session.token.clone();
    let reply = phone.holder.protected(&path, Some(format!("DPoP {token}")), &[], body.clone()).await;
    assert_problem("no DPoP proof", &reply, 401, "dpop-missing");
    phone.assert_not_provisioned("refused", mark).await;
    let other = phone.server().state.store.tsm_registration(&other.device_id).await.unwrap();
    assert!(other.is_none());
}

#[tokio::test]
async fn only_a_consumers_phone_is_provisioned() {
    let fx = bare_fixture(|_| {}).await;
    fx.put_reference(&reference_values(FIRMWARE)).await;
    let mut holder = Holder::on(fx, DeviceKind::Pos, &DeviceHealth::clean()).await;
    let session = holder.session().await;
    let mut pos = Phone::holding(holder, session).await;
    let se = pos.secure_element();
    let mark = pos.server().audit_mark().await;
    assert_problem("a POS app", &pos.provision(&se).await, 403, "not-a-phone");
    pos.assert_not_provisioned("a POS app", mark).await;
}

#[tokio::test]
async fn an_se_certificate_past_its_validity_is_refused() {
    let mut phone = Phone::new().await;
    let now = phone.now();
    let se = phone.maker.certify(leaf_params((now - DAY, now + 60)));
    phone.holder.advance(61);
    let mark = phone.server().audit_mark().await;
    assert_problem("expired", &phone.provision(&se).await, 422, "certificate-expired");
    phone.assert_not_provisioned("expired", mark).await;
}

#[tokio::test]
async fn an_se_certificate_is_refused_until_its_validity_starts() {
    let mut phone = Phone::new().await;
    let now = phone.now();
    let se = phone.maker.certify(leaf_params((now + 60, now + DAY)));
    let mark = phone.server().audit_mark().await;
    assert_problem("not yet valid", &phone.provision(&se).await, 422, "certificate-not-yet-valid");
    phone.assert_not_provisioned("not yet valid", mark).await;
    phone.holder.advance(60);
    phone.provisioned(&se).await;
}

#[tokio::test]
async fn a_renewed_ca_certifies_its_secure_elements_once_its_old_certificate_runs_out() {
    let mut phone = Phone::new().await;
    let now = phone.now();
    let maker = Maker::new("Renewing Root", (now - DAY, now + 60));
    assert_eq!(register_issuer(phone.server(), "Renewing", &maker.pem).await.status.as_u16(), 201);
    let se = maker.secure_element(now);
    phone.holder.advance(61);
    let mark = phone.server().audit_mark().await;
    assert_problem("the CA ran out", &phone.provision(&se).await, 422, "certificate-expired");
    phone.assert_not_provisioned("the CA ran out", mark).await;

    let renewed = maker.renewed(validity(now));
    assert_eq!(register_issuer(phone.server(), "Renewing", &renewed.pem).await.status.as_u16(), 201);
    let provisioned = phone.provisioned(&se).await;
    let stored = phone.server().state.store.tsm_registration(&phone.device_id()).await.unwrap().unwrap();
    let issuers = phone.server().state.store.tsm_issuers().await.unwrap();
    let renewed_id = issuers.iter().find(|issuer| issuer.certificate_der == renewed.der).map(|issuer| &issuer.id);
    assert_eq!(Some(&stored.issuer_id), renewed_id, "{}", provisioned.answer);
}

#[tokio::test]
async fn a_serial_revoked_under_a_ca_stays_revoked_under_its_renewal() {
    let mut phone = Phone::new().await;
    let now = phone.now();
    let maker = Maker::new("Renewing Root", (now - DAY, now + 60));
    let registered = register_issuer(phone.server(), "Renewing", &maker.pem).await;
    let issuer_id = registered.json["issuer_id"].as_str().unwrap();
    let mut leaf = leaf_params(validity(now));
    leaf.serial_number = Some(SerialNumber::from_slice(&[0x0c, 0x0d]));
    let se = maker.certify(leaf);
    let path = format!("{ISSUERS}/{issuer_id}/revocations");
    phone.server().expect(201, "POST", &path, phone.admin(), Some(json!({ "serial": "0c0d" }))).await;
    let renewed = maker.renewed(validity(now));
    assert_eq!(register_issuer(phone.server(), "Renewing", &renewed.pem).await.status.as_u16(), 201);
    phone.holder.advance(61);
    let mark = phone.server().audit_mark().await;
    assert_problem("revoked before the renewal", &phone.provision(&se).await, 403, "certificate-revoked");
    phone.assert_not_provisioned("revoked", mark).await;
}

#[tokio::test]
async fn a_ticket_must_allow_tsm() {
    let policy = DEFAULT_POLICY.replace(r#""offline", "tsm""#, r#""offline""#);
    assert_ne!(policy, DEFAULT_POLICY, "the default policy no longer lists tsm last");
    let market = Market::with_policy(&policy, |_| {}, &DeviceHealth::clean()).await;
    let mut phone = Phone::holding(market.phone, market.session).await;
    let se = phone.secure_element();
    let mark = phone.server().audit_mark().await;
    assert_problem("provision", &phone.provision(&se).await, 403, "operation-not-allowed");
    assert_problem("app", &phone.fetch_app("wallet", &se).await, 403, "operation-not-allowed");
    phone.assert_not_provisioned("no tsm operation", mark).await;
}

// ---- Payment apps ----

fn manifest(app_id: &str, version: u32, code: &[u8]) -> Value {
    json!({
        "app_id": app_id, "version": version, "code_sha256": code_sha256(code), "code_size": code.len(),
        "se_profile": SE_PROFILE,
    })
}

#[tokio::test]
async fn a_signed_manifest_verifies_with_the_published_key() {
    let fx = bare_fixture(|_| {}).await;
    let server = &fx.server;
    let mark = server.audit_mark().await;
    let view = server.expect(201, "POST", APPS, fx.admin(), Some(manifest("wallet", 1, APP_CODE))).await;
    let manifest_id = view["manifest_id"].as_str().unwrap();
    assert!(manifest_id.starts_with("man_"), "{manifest_id}");
    let jwks = server.jwks().await;
    let claims: ManifestClaims =
        jwt::verify_by_kid(view["manifest"].as_str().unwrap(), MANIFEST_TYP, published(&jwks)).unwrap();
    let signed = AppManifest {
        app_id: "wallet".into(),
        version: 1,
        code_sha256: code_sha256(APP_CODE),
        code_size: APP_CODE.len() as u64,
        se_profile: SE_PROFILE.into(),
    };
    let expected = ManifestClaims {
        iss: server.state.config.issuer.clone(),
        iat: server.now(),
        manifest_id: manifest_id.to_owned(),
        manifest: signed,
    };
    assert_eq!(claims, expected);
    let mut fields = manifest("wallet", 1, APP_CODE);
    fields["manifest_id"] = json!(manifest_id);
    fields["manifest"] = view["manifest"].clone();
    fields["created_at"] = json!(server.now());
    assert_eq!(view, fields);
    server.assert_audited("signed", mark, &[("tsm.app_signed", manifest_id)]).await;
    assert_eq!(server.expect(200, "GET", APPS, fx.admin(), None).await, json!([view]));
}

#[tokio::test]
async fn each_manifest_refusal_names_its_reason_and_writes_nothing() {
    let fx = bare_fixture(|_| {}).await;
    let server = &fx.server;
    server.expect(201, "POST", APPS, fx.admin(), Some(manifest("wallet", 1, APP_CODE))).await;
    let with = |field: &str, value: Value| {
        let mut body = manifest("wallet", 2, APP_CODE);
        body[field] = value;
        body
    };
    let cases = [
        ("the same version again", manifest("wallet", 1, APP_CODE), 409, "manifest-exists"),
        ("an empty app_id", with("app_id", json!("")), 422, "invalid-manifest"),
        ("an app_id with a slash", with("app_id", json!("wallet/2")), 422, "invalid-manifest"),
        ("an app_id over 64", with("app_id", json!("w".repeat(65))), 422, "invalid-manifest"),
        ("version 0", with("version", json!(0)), 422, "invalid-manifest"),
        (
            "an uppercase hash",
            with("code_sha256", json!(code_sha256(APP_CODE).to_uppercase())),
            422,
            "invalid-manifest",
        ),
        ("a short hash", with("code_sha256", json!("ab".repeat(31))), 422, "invalid-manifest"),
        ("no code", with("code_size", json!(0)), 422, "invalid-manifest"),
        ("code over 64 MiB", with("code_size", json!(64 * 1024 * 1024 + 1)), 422, "invalid-manifest"),
        ("an empty profile", with("se_profile", json!("")), 422, "invalid-manifest"),
        ("a profile with a newline", with("se_profile", json!("javacard\n3.1")), 422, "invalid-manifest"),
        ("a negative version", with("version", json!(-1)), 422, "invalid-body"),
        ("an unknown field", with("signature", json!("x")), 422, "invalid-body"),
    ];
    let (_, gateway) = server.api_key(&["gateway"]).await;
    let mark = server.audit_mark().await;
    for (context, body, status, problem) in cases {
        assert_problem(context, &server.call("POST", APPS, fx.admin(), Some(body)).await, status, problem);
    }
    let reply = server.call("POST", APPS, Some(&gateway), Some(manifest("wallet", 2, APP_CODE))).await;
    assert_problem("a gateway key", &reply, 403, "insufficient-scope");
    assert_problem(
        "a gateway key lists",
        &server.call("GET", APPS, Some(&gateway), None).await,
        403,
        "insufficient-scope",
    );
    server.assert_audited("nothing refused is audited", mark, &[]).await;
    assert_eq!(server.state.store.tsm_manifests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_newest_release_reaches_the_app_se_sealed_to_its_key() {
    let mut phone = Phone::new().await;
    let crypto_se = phone.secure_element();
    phone.provisioned(&crypto_se).await;
    let first_release = b"payment application, release 1";
    phone.server().expect(201, "POST", APPS, phone.admin(), Some(manifest("wallet", 1, first_release))).await;
    let newest = phone.server().expect(201, "POST", APPS, phone.admin(), Some(manifest("wallet", 2, APP_CODE))).await;
    let app_se = phone.secure_element();
    let mark = phone.server().audit_mark().await;
    let reply = phone.fetch_app("wallet", &app_se).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.json);
    let manifest_id = newest["manifest_id"].as_str().unwrap();
    assert_eq!(
        (&reply.json["manifest_id"], &reply.json["app_id"], &reply.json["version"]),
        (&json!(manifest_id), &json!("wallet"), &json!(2))
    );
    let enc = b64::decode("enc", reply.json["enc"].as_str().unwrap()).unwrap();
    let ciphertext = b64::decode("ciphertext", reply.json["ciphertext"].as_str().unwrap()).unwrap();
    let device_id = phone.device_id();
    let jws = open_app_delivery(&app_se.key, &device_id, manifest_id, &enc, &ciphertext).unwrap();
    assert_eq!(jws, newest["manifest"].as_str().unwrap());
    assert!(
        open_app_delivery(&crypto_se.key, &device_id, manifest_id, &enc, &ciphertext).is_err(),
        "the crypto SE opens what is sealed to the app SE"
    );

    let jwks = phone.server().jwks().await;
    let claims: ManifestClaims = jwt::verify_by_kid(&jws, MANIFEST_TYP, published(&jwks)).unwrap();
    check_install(&claims.manifest, APP_CODE, SE_PROFILE, Some(1)).unwrap();
    let mut tampered = APP_CODE.to_vec();
    tampered[0] ^= 0x01;
    match check_install(&claims.manifest, &tampered, SE_PROFILE, Some(1)) {
        Err(ProtoError::TsmRefused { why: TsmRefusal::CodeHashMismatch, .. }) => {}
        other => panic!("tampered code: {other:?}"),
    }
    phone.server().assert_audited("delivered", mark, &[("tsm.app_delivered", &device_id)]).await;
}

#[tokio::test]
async fn each_app_delivery_refusal_names_its_reason_and_writes_nothing() {
    let mut phone = Phone::new().await;
    phone.server().expect(201, "POST", APPS, phone.admin(), Some(manifest("wallet", 1, APP_CODE))).await;
    let (crypto_se, app_se) = (phone.secure_element(), phone.secure_element());
    let mark = phone.server().audit_mark().await;
    assert_problem("not provisioned", &phone.fetch_app("wallet", &app_se).await, 409, "not-provisioned");
    phone.server().assert_audited("not provisioned", mark, &[]).await;

    phone.provisioned(&crypto_se).await;
    let stranger = Maker::new("Other Root", validity(phone.now())).secure_element(phone.now());
    let cases = [
        ("an app never signed", "atm", &app_se, 404, "unknown-app"),
        ("the crypto SE's own chain", "wallet", &crypto_se, 422, "same-secure-element"),
        ("an unregistered maker's SE", "wallet", &stranger, 422, "unknown-issuer"),
    ];
    let mark = phone.server().audit_mark().await;
    for (context, app_id, se, status, problem) in cases {
        assert_problem(context, &phone.fetch_app(app_id, se).await, status, problem);
    }
    let body = json!({ "app_id": "wallet", "app_se_chain_pem": app_se.chain_pem });
    let reply = phone.post(&format!("/v1/tsm/devices/{NO_DEVICE}/app"), body).await;
    assert_problem("another device's path", &reply, 403, "wrong-device");
    phone.server().assert_audited("nothing refused is audited", mark, &[]).await;
}

// ---- Messages from the gateway ----

#[tokio::test]
async fn a_message_is_queued_sealed_for_its_provider_and_its_payload_is_stored_nowhere() {
    let mut relay = Relay::new().await;
    let payload: [u8; 48] = random_bytes(&SystemRandom::new()).unwrap();
    let body = relay.body(&payload);
    let envelope = relay.seal(&body);
    let mark = relay.server().audit_mark().await;
    let reply = relay.send(&envelope).await;
    assert_eq!(reply.status.as_u16(), 202, "{}", reply.json);
    let message_id = reply.json["message_id"].as_str().unwrap().to_owned();
    assert!(message_id.starts_with("msg_"), "{message_id}");
    let expected =
        json!({ "message_id": message_id, "provider_id": relay.provider.id, "counter": 1, "status": "queued" });
    assert_eq!(reply.json, expected);

    let (device_id, now) = (relay.device_id(), relay.now());
    let stored = relay.stored(&message_id).await;
    assert_eq!(
        (
            stored.status,
            stored.attempts,
            stored.counter,
            stored.next_attempt_at,
            stored.created_at,
            stored.delivered_at
        ),
        (OutboxStatus::Pending, 0, 1, now, now, None)
    );
    assert_eq!(
        (stored.provider_id.as_str(), stored.device_id.as_str()),
        (relay.provider.id.as_str(), device_id.as_str())
    );
    assert_eq!(stored.envelope_hash, sha256(&envelope));
    let relayed = RelayEnvelope {
        message_id: message_id.clone(),
        provider_id: relay.provider.id.clone(),
        device_id: device_id.clone(),
        counter: 1,
        enc: b64::encode(&stored.enc),
        ciphertext: b64::encode(&stored.ciphertext),
        created_at: now,
    };
    assert_eq!(open_relay(&relay.provider.key, &relayed).unwrap(), body, "only the provider's key opens it");
    let registration = relay.server().state.store.tsm_registration(&device_id).await.unwrap().unwrap();
    assert_eq!(registration.last_counter, 1);
    relay.server().assert_audited("accepted", mark, &[("tsm.message_accepted", &device_id)]).await;
    assert_payload_not_in_rows(relay.server(), &message_id, &payload).await;
    assert_not_stored(relay.server(), &message_id, "the payload", &payload);
}

#[tokio::test]
async fn the_same_message_again_gets_its_first_answer_and_a_used_counter_is_a_replay() {
    let mut relay = Relay::new().await;
    let envelope = relay.message(b"pay 12.50 EUR");
    let first = relay.send(&envelope).await;
    assert_eq!(first.status.as_u16(), 202, "{}", first.json);
    let mark = relay.server().audit_mark().await;
    let again = relay.send(&envelope).await;
    assert_eq!(again.status.as_u16(), 200, "{}", again.json);
    let mut expected = first.json.clone();
    expected["duplicate"] = json!(true);
    assert_eq!(again.json, expected);

    relay.counter = 0;
    let reused = relay.message(b"pay 99.00 EUR");
    assert_problem("a used counter", &relay.send(&reused).await, 409, "replayed-counter");
    relay.assert_unchanged("duplicate and replay", mark, 1, 1).await;

    // A retry after delivery says where the message is now.
    relay.deliver().await;
    let late = relay.send(&envelope).await;
    assert_eq!((late.status.as_u16(), &late.json["status"]), (200, &json!("delivered")), "{}", late.json);

    relay.counter = 5;
    relay.queue(b"pay 1.00 EUR").await;
    relay.counter = 3;
    let lower = relay.message(b"pay 2.00 EUR");
    let mark = relay.server().audit_mark().await;
    assert_problem("a counter below the last", &relay.send(&lower).await, 409, "replayed-counter");
    relay.assert_unchanged("lower counter", mark, 2, 6).await;
}

#[tokio::test]
async fn each_message_refusal_names_its_reason_and_writes_nothing() {
    let mut relay = Relay::new().await;
    let device_id = relay.device_id();
    let unprovisioned = relay.phone.holder.fx.enrol(DeviceKind::Consumer).await.device_id;
    let body = relay.body(b"pay 12.50 EUR");
    let stranger_key = DeviceKey::generate(&SystemRandom::new()).unwrap();
    let under_another_key = seal_message(&stranger_key, &device_id, 1, &body).unwrap();
    let under_another_id = seal_message(&relay.provisioned.device_key, &unprovisioned, 1, &body).unwrap();
    let mut flipped = seal_message(&relay.provisioned.device_key, &device_id, 1, &body).unwrap();
    *flipped.last_mut().unwrap() ^= 0x01;
    let mut other_header = seal_message(&relay.provisioned.device_key, &device_id, 1, &body).unwrap();
    other_header[8] = 2;
    let nobody = MessageBody { provider_id: "sp_00000000000000000000000000000000".into(), ..body.clone() };
    let to_nobody = seal_message(&relay.provisioned.device_key, &device_id, 1, &nobody).unwrap();
    let beyond = seal_message(&relay.provisioned.device_key, &device_id, u64::MAX, &body).unwrap();
    let counter_zero = [&[1_u8][..], &[0; 8], &[0; 32]].concat();
    let version_two = [&[2_u8][..], &1_u64.to_be_bytes(), &[0; 32]].concat();
    let message = |envelope: &[u8]| gateway_message(&device_id, envelope);
    let cases = [
        ("another device's key", message(&under_another_key), 422, "message-not-authentic"),
        ("sealed for another device id", message(&under_another_id), 422, "message-not-authentic"),
        ("a flipped ciphertext bit", message(&flipped), 422, "message-not-authentic"),
        ("a counter changed in the header", message(&other_header), 422, "message-not-authentic"),
        ("an unknown provider", message(&to_nobody), 422, "unknown-provider"),
        ("counter 0", message(&counter_zero), 422, "invalid-counter"),
        ("a counter over 2^63 - 1", message(&beyond), 422, "invalid-counter"),
        ("version 2", message(&version_two), 422, "malformed-message"),
        ("shorter than a header and tag", message(&[1, 0, 0]), 422, "malformed-message"),
        ("over the size limit", message(&vec![1; MESSAGE_BYTES_MAX + 1]), 422, "malformed-message"),
        (
            "longer than any message in base64",
            json!({ "device_id": device_id, "message": "A".repeat(11_000) }),
            422,
            "malformed-message",
        ),
        ("not base64url", json!({ "device_id": device_id, "message": "bm90+base64/" }), 422, "malformed-message"),
        ("a device never provisioned", gateway_message(&unprovisioned, &under_another_id), 404, "unknown-device"),
        ("no such device", gateway_message(NO_DEVICE, &under_another_id), 404, "unknown-device"),
        ("an unknown field", json!({ "device_id": device_id, "message": "AQ", "sms": 1 }), 422, "invalid-body"),
    ];
    let mark = relay.server().audit_mark().await;
    for (context, body, status, problem) in cases {
        let reply = relay.server().call("POST", MESSAGES, Some(&relay.gateway_key), Some(body)).await;
        assert_problem(context, &reply, status, problem);
    }
    relay.assert_unchanged("refused", mark, 0, 0).await;
    relay.queue(b"the first counter is still free").await;
}

#[tokio::test]
async fn a_suspended_device_s_messages_are_refused() {
    let mut relay = Relay::new().await;
    let envelope = relay.message(b"pay 12.50 EUR");
    relay.phone.holder.fx.change_status(&relay.device_id(), "suspend").await;
    let mark = relay.server().audit_mark().await;
    assert_problem("suspended", &relay.send(&envelope).await, 403, "device-not-active");
    relay.assert_unchanged("suspended", mark, 0, 0).await;
}

#[tokio::test]
async fn a_secure_element_revoked_after_provisioning_sends_no_more_messages() {
    let mut relay = Relay::new().await;
    relay.queue(b"before the revocation").await;
    let envelope = relay.message(b"after the revocation");
    let issuer_id = relay.server().state.store.tsm_issuers().await.unwrap()[0].id.clone();
    let serial = relay.provisioned.claims.se_serial.clone();
    let path = format!("{ISSUERS}/{issuer_id}/revocations");
    relay.server().expect(201, "POST", &path, relay.phone.admin(), Some(json!({ "serial": serial }))).await;
    let mark = relay.server().audit_mark().await;
    assert_problem("revoked", &relay.send(&envelope).await, 403, "certificate-revoked");
    relay.assert_unchanged("revoked", mark, 1, 1).await;
}

#[tokio::test]
async fn only_a_gateway_key_posts_messages() {
    let mut relay = Relay::new().await;
    let envelope = relay.message(b"pay 12.50 EUR");
    let body = gateway_message(&relay.device_id(), &envelope);
    let server = relay.server();
    let (_, provision) = server.api_key(&["provision"]).await;
    let mark = server.audit_mark().await;
    let reply = server.call("POST", MESSAGES, Some(&provision), Some(body.clone())).await;
    assert_problem("a provisioning key", &reply, 403, "insufficient-scope");
    let reply = server.call("POST", MESSAGES, None, Some(body.clone())).await;
    assert_problem("no key", &reply, 401, "missing-credentials");
    relay.assert_unchanged("refused", mark, 0, 0).await;
    assert_eq!(relay.send(&envelope).await.status.as_u16(), 202);
}

#[tokio::test]
async fn a_payment_certificate_must_be_this_device_s_current_one() {
    let mut relay = Relay::on(|config| config.tsm_payment_certificate_ttl_secs = 3_600).await;
    let other = relay.phone.holder.fx.enrol(DeviceKind::Consumer).await;
    let server = relay.server();
    let now = relay.now();
    let registration_id = relay.provisioned.claims.registration_id.clone();
    let sign = |typ: &str, sub: &str, registration_id: &str| {
        let claims = PaymentCertificateClaims {
            iss: server.state.config.issuer.clone(),
            sub: sub.to_owned(),
            registration_id: registration_id.to_owned(),
            instrument: INSTRUMENT.to_owned(),
            iat: now,
            exp: now + 3_600,
        };
        server.state.keys.sign_jws(Header::es256(typ), &serde_json::to_vec(&claims).unwrap()).unwrap()
    };
    let cases = [
        ("another device's", sign(PAYMENT_CERTIFICATE_TYP, &other.device_id, &registration_id)),
        (
            "another registration's",
            sign(PAYMENT_CERTIFICATE_TYP, &relay.device_id(), "reg_00000000000000000000000000000000"),
        ),
        ("a manifest's type", sign(MANIFEST_TYP, &relay.device_id(), &registration_id)),
        ("not a JWS", "not.a.certificate".to_owned()),
    ];
    let mark = relay.server().audit_mark().await;
    for (context, payment_certificate) in cases {
        let body = MessageBody { payment_certificate, ..relay.body(b"pay 12.50 EUR") };
        let envelope = relay.seal(&body);
        assert_problem(context, &relay.send(&envelope).await, 422, "invalid-payment-certificate");
    }
    relay.advance(3_601);
    let expired = relay.message(b"pay 12.50 EUR");
    assert_problem("expired", &relay.send(&expired).await, 422, "invalid-payment-certificate");
    relay.assert_unchanged("refused", mark, 0, 0).await;
}

#[tokio::test]
async fn provisioning_again_replaces_the_key_the_certificate_and_the_counter() {
    let mut relay = Relay::new().await;
    relay.queue(b"first").await;
    relay.queue(b"second").await;
    let se = relay.phone.secure_element();
    let renewed = relay.phone.provisioned(&se).await;
    let previous = std::mem::replace(&mut relay.provisioned, renewed);
    let registration_id = relay.provisioned.claims.registration_id.clone();
    assert_ne!(registration_id, previous.claims.registration_id);
    assert_ne!(relay.provisioned.device_key.as_bytes(), previous.device_key.as_bytes());
    let replaced = relay.server().audit().await.last().unwrap().entry.detail.clone();
    let replaced: Value = serde_json::from_str(&replaced).unwrap();
    assert_eq!(replaced["replaced"], json!(previous.claims.registration_id));

    relay.counter = 0;
    let message_id = relay.queue(b"third").await;
    assert_eq!(relay.stored(&message_id).await.counter, 1, "the counter starts again under the new registration");

    let body = relay.body(b"under the old key");
    let old_key = seal_message(&previous.device_key, &relay.device_id(), 2, &body).unwrap();
    let old_certificate = MessageBody { payment_certificate: previous.payment_certificate.clone(), ..body };
    let old_certificate = relay.seal(&old_certificate);
    let mark = relay.server().audit_mark().await;
    assert_problem("the old key", &relay.send(&old_key).await, 422, "message-not-authentic");
    assert_problem("the old certificate", &relay.send(&old_certificate).await, 422, "invalid-payment-certificate");
    relay.assert_unchanged("refused", mark, 3, 1).await;
}

// ---- Delivery ----

fn retry_path(message_id: &str) -> String {
    format!("{OUTBOX}/{message_id}/retry")
}

#[tokio::test]
async fn a_message_is_delivered_once_with_its_id_as_idempotency_key() {
    let mut relay = Relay::new().await;
    let body = relay.body(b"pay 12.50 EUR");
    let envelope = relay.seal(&body);
    let reply = relay.send(&envelope).await;
    let message_id = reply.json["message_id"].as_str().unwrap().to_owned();

    assert_eq!(relay.deliver().await, DeliveryRound { claimed: 1, delivered: 1, retried: 0, dead: 0 });
    let received = relay.provider.received();
    assert_eq!(received.len(), 1, "{received:?}");
    let request = &received[0];
    assert_eq!(request.idempotency_key.as_deref(), Some(message_id.as_str()));
    assert_eq!(request.content_type.as_deref(), Some("application/json"));
    let relayed = &request.envelope;
    assert_eq!(
        (relayed.message_id.as_str(), relayed.provider_id.as_str(), relayed.device_id.as_str()),
        (message_id.as_str(), relay.provider.id.as_str(), relay.device_id().as_str())
    );
    assert_eq!((relayed.counter, relayed.created_at), (1, relay.now()));
    assert_eq!(open_relay(&relay.provider.key, relayed).unwrap(), body);

    let stored = relay.stored(&message_id).await;
    assert_eq!(
        (stored.status, stored.attempts, stored.delivered_at, stored.last_error),
        (OutboxStatus::Delivered, 1, Some(relay.now()), None)
    );
    relay.advance(DAY);
    assert_eq!(relay.deliver().await, DeliveryRound::default());
    assert_eq!(relay.provider.received().len(), 1);
}

#[tokio::test]
async fn a_provider_that_is_down_gets_the_message_once_after_it_comes_back() {
    let mut relay = Relay::new().await;
    let message_id = relay.queue(b"pay 12.50 EUR").await;
    relay.provider.answer(503);
    assert_eq!(relay.deliver().await, DeliveryRound { claimed: 1, retried: 1, ..DeliveryRound::default() });
    let first = relay.stored(&message_id).await;
    assert_eq!(
        (first.status, first.attempts, first.last_error.as_deref()),
        (OutboxStatus::Pending, 1, Some("the provider answered 503 Service Unavailable"))
    );
    let delay = first.next_attempt_at - relay.now();
    assert!((1..=2).contains(&delay), "the first retry waits half to all of the 2 s base: {delay}");
    assert_eq!(relay.deliver().await.claimed, 0, "a message is not retried before it is due");

    relay.provider.stop().await;
    relay.advance(delay);
    assert_eq!(relay.deliver().await, DeliveryRound { claimed: 1, retried: 1, ..DeliveryRound::default() });
    let second = relay.stored(&message_id).await;
    assert_eq!(
        (second.status, second.attempts, second.last_error.as_deref()),
        (OutboxStatus::Pending, 2, Some("cannot connect to the provider"))
    );
    let delay = second.next_attempt_at - relay.now();
    assert!((2..=4).contains(&delay), "the second retry waits twice as long: {delay}");

    relay.provider.restart(200).await;
    relay.advance(delay);
    assert_eq!(relay.deliver().await, DeliveryRound { claimed: 1, delivered: 1, ..DeliveryRound::default() });
    assert_eq!(relay.stored(&message_id).await.status, OutboxStatus::Delivered);
    relay.advance(DAY);
    assert_eq!(relay.deliver().await.claimed, 0);
    assert_eq!(relay.provider.answers(), [Some(503), Some(200)], "the closed port saw nothing");
    let acknowledged = relay.provider.acknowledged();
    assert_eq!(acknowledged[0].idempotency_key.as_deref(), Some(message_id.as_str()));
}

#[tokio::test]
async fn a_provider_refusing_a_message_makes_it_dead_at_once_until_an_admin_requeues_it() {
    let mut relay = Relay::new().await;
    let message_id = relay.queue(b"pay 12.50 EUR").await;
    relay.provider.answer(400);
    assert_eq!(relay.deliver().await, DeliveryRound { claimed: 1, dead: 1, ..DeliveryRound::default() });
    let dead = relay.stored(&message_id).await;
    let error = "the provider answered 400 Bad Request; retrying cannot help";
    assert_eq!((dead.status, dead.attempts, dead.last_error.as_deref()), (OutboxStatus::Dead, 1, Some(error)));
    relay.advance(DAY);
    assert_eq!(relay.deliver().await.claimed, 0, "a dead message is not retried");

    let server = relay.server();
    let admin = Some(server.admin_key.as_str());
    let mark = server.audit_mark().await;
    let view = server.expect(200, "POST", &retry_path(&message_id), admin, None).await;
    assert_eq!(
        (&view["message_id"], &view["status"], &view["attempts"], &view["next_attempt_at"], &view["last_error"]),
        (&json!(message_id), &json!("pending"), &json!(0), &json!(relay.now()), &json!(error))
    );
    server.assert_audited("requeued", mark, &[("tsm.message_requeued", &message_id)]).await;
    let mark = server.audit_mark().await;
    let reply = server.call("POST", &retry_path(&message_id), admin, None).await;
    assert_problem("a pending message", &reply, 409, "not-dead");

    relay.provider.answer(200);
    assert_eq!(relay.deliver().await.delivered, 1);
    let reply = server.call("POST", &retry_path(&message_id), admin, None).await;
    assert_problem("a delivered message", &reply, 409, "not-dead");
    let reply = server.call("POST", &retry_path("msg_00000000000000000000000000000000"), admin, None).await;
    assert_problem("an unknown message", &reply, 404, "not-found");
    let reply = server.call("POST", &retry_path(&message_id), Some(&relay.gateway_key), None).await;
    assert_problem("a gateway key", &reply, 403, "insufficient-scope");
    server.assert_audited("nothing refused is audited", mark, &[]).await;
    assert_eq!(relay.provider.answers(), [Some(400), Some(200)]);
}

#[tokio::test]
async fn a_provider_failing_every_attempt_makes_the_message_dead_after_the_last() {
    let mut relay = Relay::on(|config| config.tsm_delivery_attempts_max = 3).await;
    let message_id = relay.queue(b"pay 12.50 EUR").await;
    relay.provider.answer(500);
    for attempt in 1..=2 {
        assert_eq!(relay.deliver().await.retried, 1, "attempt {attempt}");
        let stored = relay.stored(&message_id).await;
        assert_eq!((stored.status, stored.attempts), (OutboxStatus::Pending, attempt));
        relay.advance(stored.next_attempt_at - relay.now());
    }
    assert_eq!(relay.deliver().await, DeliveryRound { claimed: 1, dead: 1, ..DeliveryRound::default() });
    let dead = relay.stored(&message_id).await;
    let error = "the provider answered 500 Internal Server Error (attempt 3 of 3)";
    assert_eq!((dead.status, dead.attempts, dead.last_error.as_deref()), (OutboxStatus::Dead, 3, Some(error)));
    let keys: Vec<Option<String>> = relay.provider.received().into_iter().map(|r| r.idempotency_key).collect();
    assert_eq!(keys, vec![Some(message_id); 3], "every attempt carries the same idempotency key");
    assert!(relay.provider.acknowledged().is_empty());
}

#[tokio::test]
async fn a_provider_too_slow_to_answer_gets_the_message_again_under_the_same_idempotency_key() {
    let mut relay = Relay::on(|config| config.tsm_delivery_timeout_secs = 1).await;
    let message_id = relay.queue(b"pay 12.50 EUR").await;
    relay.provider.stall();
    assert_eq!(relay.deliver().await, DeliveryRound { claimed: 1, retried: 1, ..DeliveryRound::default() });
    let stored = relay.stored(&message_id).await;
    assert_eq!(
        (stored.status, stored.attempts, stored.last_error.as_deref()),
        (OutboxStatus::Pending, 1, Some("the provider did not answer in time"))
    );
    relay.provider.answer(200);
    relay.advance(stored.next_attempt_at - relay.now());
    assert_eq!(relay.deliver().await.delivered, 1);
    assert_eq!(relay.provider.answers(), [None, Some(200)]);
    let keys: Vec<Option<String>> = relay.provider.received().into_iter().map(|r| r.idempotency_key).collect();
    assert_eq!(keys, vec![Some(message_id); 2], "the provider can tell the second for the first");
}

#[tokio::test]
async fn another_server_on_the_same_data_delivers_what_was_queued_and_opens_the_device_keys() {
    let mut relay = Relay::new().await;
    relay.provider.answer(503);
    let message_id = relay.queue(b"before").await;
    assert_eq!(relay.deliver().await.retried, 1);
    let restarted = relay.server().another_instance().await;
    relay.provider.answer(200);
    relay.advance(DAY);
    let round = deliver_due(&restarted.state).await.unwrap();
    assert_eq!(round, DeliveryRound { claimed: 1, delivered: 1, ..DeliveryRound::default() });
    assert_eq!(relay.stored(&message_id).await.status, OutboxStatus::Delivered);
    let next = relay.message(b"after");
    let reply = relay.send_to(&restarted, &next).await;
    assert_eq!(reply.status.as_u16(), 202, "the device key sealed by the first opens: {}", reply.json);
}

/// `GET /v1/tsm/outbox?query`: the message ids and the next cursor.
async fn outbox_page(server: &TestServer, query: &str) -> (Vec<String>, Option<String>) {
    let page = server.expect(200, "GET", &format!("{OUTBOX}?{query}"), Some(&server.admin_key), None).await;
    let ids = page["messages"].as_array().unwrap().iter().map(|m| m["message_id"].as_str().unwrap().to_owned());
    (ids.collect(), page["next_cursor"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn the_outbox_lists_newest_first_by_status_and_provider_in_pages() {
    let mut relay = Relay::new().await;
    let processor = Provider::start(relay.server(), "Processor").await;
    processor.answer(400);
    let mut ids = Vec::new();
    let bank = relay.provider.id.clone();
    for provider_id in [&bank, &bank, &processor.id] {
        let body = MessageBody { provider_id: provider_id.clone(), ..relay.body(b"pay") };
        let envelope = relay.seal(&body);
        ids.push(relay.send(&envelope).await.json["message_id"].as_str().unwrap().to_owned());
        relay.advance(1);
    }
    assert_eq!(relay.deliver().await, DeliveryRound { claimed: 3, delivered: 2, dead: 1, retried: 0 });
    for _ in 0..2 {
        ids.push(relay.queue(b"pay").await);
        relay.advance(1);
    }
    let ids = <[String; 5]>::try_from(ids).unwrap();
    let [m1, m2, m3, m4, m5] = ids.each_ref().map(String::as_str);
    let server = relay.server();

    let (all, cursor) = outbox_page(server, "").await;
    assert_eq!((all, cursor.as_deref()), (vec![m5.to_owned(), m4.into(), m3.into(), m2.into(), m1.into()], None));
    assert_eq!(outbox_page(server, "status=pending").await.0, [m5, m4]);
    assert_eq!(outbox_page(server, "status=delivered").await.0, [m2, m1]);
    assert_eq!(outbox_page(server, "status=dead").await.0, [m3]);
    assert_eq!(outbox_page(server, &format!("provider_id={}", processor.id)).await.0, [m3]);
    let query = format!("status=delivered&provider_id={}", processor.id);
    assert!(outbox_page(server, &query).await.0.is_empty());

    let (first, cursor) = outbox_page(server, "limit=2").await;
    assert_eq!(first, [m5, m4]);
    let (second, cursor) = outbox_page(server, &format!("limit=2&cursor={}", cursor.unwrap())).await;
    assert_eq!(second, [m3, m2]);
    let (third, cursor) = outbox_page(server, &format!("limit=2&cursor={}", cursor.unwrap())).await;
    assert_eq!((third, cursor), (vec![m1.to_owned()], None));

    let page = server.expect(200, "GET", &format!("{OUTBOX}?status=dead"), Some(&server.admin_key), None).await;
    let dead = relay.stored(m3).await;
    let expected = json!({
        "message_id": m3, "provider_id": processor.id, "device_id": relay.device_id(), "counter": 3,
        "status": "dead", "attempts": 1, "next_attempt_at": dead.next_attempt_at, "last_error": dead.last_error,
        "created_at": dead.created_at, "delivered_at": null,
    });
    assert_eq!(page, json!({ "messages": [expected], "next_cursor": null }));

    let cases = [
        ("status=sent", 400, "invalid-query"),
        ("limit=0", 400, "invalid-query"),
        ("limit=501", 400, "invalid-query"),
        ("cursor=yesterday", 400, "invalid-cursor"),
        ("cursor=soon.msg_1", 400, "invalid-cursor"),
        ("cursor=1700000000.", 400, "invalid-cursor"),
        ("limit=many", 400, "invalid-query"),
        ("colour=red", 400, "invalid-query"),
    ];
    for (query, status, problem) in cases {
        let reply = server.call("GET", &format!("{OUTBOX}?{query}"), Some(&server.admin_key), None).await;
        assert_problem(query, &reply, status, problem);
    }
    let reply = server.call("GET", OUTBOX, Some(&relay.gateway_key), None).await;
    assert_problem("a gateway key", &reply, 403, "insufficient-scope");
}

// ---- PostgreSQL ----

#[tokio::test]
async fn messages_are_queued_deduplicated_and_delivered_once_on_postgres() {
    let Some(url) = postgres_url().await else { return };
    let mut relay = Relay::on(|config| config.database_url = url).await;
    let payload: [u8; 48] = random_bytes(&SystemRandom::new()).unwrap();
    let body = relay.body(&payload);
    let envelope = relay.seal(&body);
    let first = relay.send(&envelope).await;
    assert_eq!(first.status.as_u16(), 202, "{}", first.json);
    let message_id = first.json["message_id"].as_str().unwrap().to_owned();
    let again = relay.send(&envelope).await;
    assert_eq!(
        (again.status.as_u16(), &again.json["message_id"], &again.json["duplicate"]),
        (200, &json!(message_id), &json!(true))
    );
    relay.counter = 0;
    let reused = relay.message(b"pay 99.00 EUR");
    let mark = relay.server().audit_mark().await;
    assert_problem("a used counter", &relay.send(&reused).await, 409, "replayed-counter");
    relay.assert_unchanged("replay", mark, 1, 1).await;

    relay.provider.answer(503);
    assert_eq!(relay.deliver().await.retried, 1);
    relay.provider.answer(200);
    relay.advance(relay.stored(&message_id).await.next_attempt_at - relay.now());
    assert_eq!(relay.deliver().await.delivered, 1);
    assert_eq!(relay.stored(&message_id).await.status, OutboxStatus::Delivered);
    let acknowledged = relay.provider.acknowledged();
    assert_eq!(acknowledged.len(), 1);
    assert_eq!(open_relay(&relay.provider.key, &acknowledged[0].envelope).unwrap(), body);
    assert_payload_not_in_rows(relay.server(), &message_id, &payload).await;
    relay.server().assert_audit_intact("on postgres").await;
}

#[tokio::test]
async fn two_instances_on_postgres_deliver_each_message_once_and_share_the_replay_check() {
    let Some(url) = postgres_url().await else { return };
    let mut relay = Relay::on(|config| config.database_url = url).await;
    let other = relay.server().another_instance().await;

    let envelope = relay.message(b"first");
    let first = relay.send(&envelope).await;
    assert_eq!(first.status.as_u16(), 202, "{}", first.json);
    let again = relay.send_to(&other, &envelope).await;
    assert_eq!((again.status.as_u16(), &again.json["message_id"]), (200, &first.json["message_id"]));
    relay.counter = 0;
    let replay = relay.message(b"replayed");
    assert_problem("a replay at the other instance", &relay.send_to(&other, &replay).await, 409, "replayed-counter");

    let here = relay.message(b"here");
    relay.counter -= 1;
    let there = relay.message(b"there");
    let (here, there) = tokio::join!(relay.send(&here), relay.send_to(&other, &there));
    let mut statuses = [here.status.as_u16(), there.status.as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 409], "one counter sent to both instances at once: {} {}", here.json, there.json);

    for _ in 0..30 {
        relay.queue(b"pay").await;
    }
    let mut delivered = 0;
    loop {
        let (a, b) = tokio::join!(deliver_due(&relay.server().state), deliver_due(&other.state));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a.retried + b.retried, a.dead + b.dead), (0, 0));
        delivered += a.delivered + b.delivered;
        if a.claimed + b.claimed == 0 {
            break;
        }
    }
    assert_eq!(delivered, 32);
    let mut ids: Vec<String> = relay.provider.received().into_iter().map(|r| r.envelope.message_id).collect();
    assert_eq!(ids.len(), 32, "each delivery once");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 32, "no message twice");
    let counts = relay.server().state.store.outbox_counts().await.unwrap();
    assert_eq!((counts.pending, counts.delivered, counts.dead), (0, 32, 0));
    relay.server().assert_audit_intact("two instances").await;
}
