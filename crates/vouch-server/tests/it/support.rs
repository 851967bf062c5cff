//! A fresh server state on a temporary SQLite database, and request helpers.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::{DEVICE_CREDENTIAL_TYP, DeviceCredentialClaims, DeviceKind, EnrolmentClaims};
use vouch_proto::jws::UnverifiedJws;
use vouch_proto::{Clock, JwkSet, SigningKey, SystemClock, jwt};
use vouch_server::{AppState, Config, build_state, build_state_with_clock, router};
use vouch_store::AuditRecord;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";
pub const PROBLEM_TYPE_PREFIX: &str = "urn:vouch:problem:";

pub struct TestServer {
    pub state: AppState,
    pub router: Router,
    pub admin_key: String,
    _dir: tempfile::TempDir,
}

pub async fn server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::for_data_dir(dir.path());
    let state = build_state(config, None).await.unwrap();
    let admin_key = std::fs::read_to_string(dir.path().join(vouch_server::ADMIN_KEY_FILE)).unwrap().trim().to_owned();
    TestServer { router: router(state.clone()), state, admin_key, _dir: dir }
}

/// A server whose configuration `configure` adjusts, on the system clock.
pub async fn server_with(configure: impl FnOnce(&mut Config)) -> TestServer {
    server_with_clock(configure, Arc::new(SystemClock)).await
}

/// A server whose configuration `configure` adjusts and whose time is `clock`.
pub async fn server_with_clock(configure: impl FnOnce(&mut Config), clock: Arc<dyn Clock>) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_data_dir(dir.path());
    configure(&mut config);
    let state = build_state_with_clock(config, None, clock).await.unwrap();
    let admin_key = std::fs::read_to_string(dir.path().join(vouch_server::ADMIN_KEY_FILE)).unwrap().trim().to_owned();
    TestServer { router: router(state.clone()), state, admin_key, _dir: dir }
}

/// A database URL naming a private schema in the PostgreSQL of
/// `VOUCH_TEST_DATABASE_URL`; `None`, with a notice, when that is not set.
pub async fn postgres_url() -> Option<String> {
    use sqlx::Executor;
    let Ok(base) = std::env::var("VOUCH_TEST_DATABASE_URL") else {
        eprintln!("skipping PostgreSQL case: VOUCH_TEST_DATABASE_URL is not set");
        return None;
    };
    sqlx::any::install_default_drivers();
    let schema = format!("srv_{}", uuid::Uuid::new_v4().simple());
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&base).await.unwrap();
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).await.unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{separator}options=-c%20search_path%3D{schema}"))
}

/// A server for tests that make many calls with one key: the rate limit is out of the way.
pub async fn busy_server() -> TestServer {
    server_with(|config| {
        config.rate_limit_per_sec = 100_000;
        config.rate_limit_burst = 100_000;
    })
    .await
}

/// A clock the test moves by hand; clones share the same time.
#[derive(Debug, Clone)]
pub struct TestClock(Arc<AtomicI64>);

impl TestClock {
    pub fn starting_now() -> Self {
        TestClock(Arc::new(AtomicI64::new(SystemClock.now_unix())))
    }

    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now_unix(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub json: serde_json::Value,
    pub headers: HeaderMap,
    /// The body as text (lossy), for non-JSON answers such as `/metrics`.
    pub text: String,
}

/// A request body as a test wants to send it, including the wrong ways.
#[derive(Debug, Clone)]
pub enum Payload {
    Empty,
    /// Serialized, with `Content-Type: application/json`.
    Json(Value),
    /// These bytes, with this `Content-Type` (or none).
    Raw {
        content_type: Option<&'static str>,
        bytes: Vec<u8>,
    },
}

/// One request of a table of bad-input cases.
#[derive(Debug, Clone)]
pub struct Case {
    /// Names the case in failure messages.
    pub name: String,
    pub method: &'static str,
    pub uri: String,
    /// The whole `Authorization` header value, if any.
    pub authorization: Option<String>,
    pub body: Payload,
}

impl Case {
    pub fn new(name: impl Into<String>, method: &'static str, uri: impl Into<String>) -> Self {
        Case { name: name.into(), method, uri: uri.into(), authorization: None, body: Payload::Empty }
    }

    pub fn key(mut self, api_key: &str) -> Self {
        self.authorization = Some(format!("Bearer {api_key}"));
        self
    }

    pub fn authorization(mut self, header: impl Into<String>) -> Self {
        self.authorization = Some(header.into());
        self
    }

    pub fn json(mut self, body: Value) -> Self {
        self.body = Payload::Json(body);
        self
    }

    pub fn raw(mut self, content_type: Option<&'static str>, bytes: impl Into<Vec<u8>>) -> Self {
        self.body = Payload::Raw { content_type, bytes: bytes.into() };
        self
    }

    fn request(&self) -> Request<Body> {
        let mut builder = Request::builder().method(self.method).uri(&self.uri);
        if let Some(authorization) = &self.authorization {
            builder = builder.header("authorization", authorization.as_str());
        }
        let request = match &self.body {
            Payload::Empty => builder.body(Body::empty()),
            Payload::Json(value) => {
                builder.header("content-type", "application/json").body(Body::from(value.to_string()))
            }
            Payload::Raw { content_type, bytes } => {
                if let Some(content_type) = content_type {
                    builder = builder.header("content-type", *content_type);
                }
                builder.body(Body::from(bytes.clone()))
            }
        };
        request.unwrap()
    }
}

/// Asserts `reply` is an RFC 9457 problem document of `status` whose type is
/// `urn:vouch:problem:<problem>`, with a matching numeric status and a non-empty detail.
pub fn assert_problem(context: &str, reply: &Reply, status: u16, problem: &str) {
    assert_eq!(reply.status.as_u16(), status, "{context}: status; body {}", reply.json);
    assert_eq!(reply.content_type, PROBLEM_CONTENT_TYPE, "{context}: content type; body {}", reply.json);
    let problem_type = reply.json["type"].as_str().unwrap_or_default();
    assert!(problem_type.starts_with(PROBLEM_TYPE_PREFIX), "{context}: problem type {problem_type:?}");
    assert_eq!(problem_type, format!("{PROBLEM_TYPE_PREFIX}{problem}"), "{context}: problem type; body {}", reply.json);
    assert_eq!(reply.json["status"].as_u64(), Some(u64::from(status)), "{context}: numeric status in {}", reply.json);
    let detail = reply.json["detail"].as_str().unwrap_or_default();
    assert!(!detail.trim().is_empty(), "{context}: empty detail in {}", reply.json);
    assert!(reply.json["title"].as_str().is_some_and(|t| !t.is_empty()), "{context}: no title in {}", reply.json);
}

/// A device identity key and what it claims about itself.
pub struct TestDevice {
    pub key: SigningKey,
    pub kind: DeviceKind,
    pub model: String,
    pub firmware_version: String,
}

impl TestDevice {
    pub fn new(kind: DeviceKind) -> Self {
        TestDevice {
            key: SigningKey::generate(&SystemRandom::new()).unwrap(),
            kind,
            model: "R-100".into(),
            firmware_version: "1.2.3".into(),
        }
    }

    pub fn claims(&self, nonce: &str, merchant_id: &str, iat: i64) -> EnrolmentClaims {
        EnrolmentClaims {
            nonce: nonce.to_owned(),
            kind: self.kind,
            model: self.model.clone(),
            firmware_version: self.firmware_version.clone(),
            merchant_id: merchant_id.to_owned(),
            iat,
        }
    }

    pub fn proof(&self, nonce: &str, merchant_id: &str, iat: i64) -> String {
        self.claims(nonce, merchant_id, iat).sign(&self.key, &SystemRandom::new()).unwrap()
    }
}

impl TestServer {
    pub async fn send(&self, request: Request<Body>) -> Reply {
        let context = format!("{} {}", request.method(), request.uri());
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let content_type =
            response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{context} answered 500: {text}");
        Reply { status, content_type, json, headers, text }
    }

    pub async fn call(&self, method: &str, uri: &str, key: Option<&str>, body: Option<serde_json::Value>) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        let request = match body {
            Some(body) => builder.header("content-type", "application/json").body(Body::from(body.to_string())),
            None => builder.body(Body::empty()),
        };
        self.send(request.unwrap()).await
    }

    /// Sends `case` and asserts the answer is the problem document `problem` with `status`.
    pub async fn check(&self, case: &Case, status: u16, problem: &str) -> Reply {
        let reply = self.send(case.request()).await;
        assert_problem(&format!("{} ({} {})", case.name, case.method, case.uri), &reply, status, problem);
        reply
    }

    /// Sends `case` and returns the reply, asserting nothing but "no 500".
    pub async fn send_case(&self, case: &Case) -> Reply {
        self.send(case.request()).await
    }

    /// Calls and asserts the status, naming the call on failure.
    pub async fn expect(&self, status: u16, method: &str, uri: &str, key: Option<&str>, body: Option<Value>) -> Value {
        let reply = self.call(method, uri, key, body).await;
        assert_eq!(reply.status.as_u16(), status, "{method} {uri}: {}", reply.json);
        reply.json
    }

    pub fn now(&self) -> i64 {
        self.state.now()
    }

    /// A second server on this one's configuration and clock: on a PostgreSQL
    /// `database_url`, two instances sharing one database (and, through the same data
    /// directory, one master key). It appraises with the default policy: a test's policy
    /// file lives only as long as the first server's start.
    pub async fn another_instance(&self) -> TestServer {
        let mut config = (*self.state.config).clone();
        config.attest_policy_file = None;
        let state = build_state_with_clock(config, None, self.state.clock.clone()).await.unwrap();
        TestServer {
            router: router(state.clone()),
            state,
            admin_key: self.admin_key.clone(),
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    pub async fn merchant(&self, name: &str) -> String {
        let body = self.expect(201, "POST", "/v1/merchants", Some(&self.admin_key), Some(json!({"name": name}))).await;
        body["merchant_id"].as_str().unwrap().to_owned()
    }

    /// A new API key with `scopes`: `(key_id, api_key)`.
    pub async fn api_key(&self, scopes: &[&str]) -> (String, String) {
        let body = json!({"scopes": scopes, "label": format!("test {}", scopes.join("+"))});
        let created = self.expect(201, "POST", "/v1/api-keys", Some(&self.admin_key), Some(body)).await;
        (created["key_id"].as_str().unwrap().to_owned(), created["api_key"].as_str().unwrap().to_owned())
    }

    pub async fn nonce(&self, key: &str) -> String {
        let created = self.expect(201, "POST", "/v1/enrolment-nonces", Some(key), None).await;
        created["nonce"].as_str().unwrap().to_owned()
    }

    pub async fn enrol_proof(&self, key: &str, proof: &str) -> Reply {
        self.call("POST", "/v1/devices", Some(key), Some(json!({ "proof": proof }))).await
    }

    /// Enrols `device` for `merchant_id` with a fresh nonce; returns the 201 body.
    pub async fn enrol(&self, device: &TestDevice, merchant_id: &str) -> Value {
        let nonce = self.nonce(&self.admin_key).await;
        let reply = self.enrol_proof(&self.admin_key, &device.proof(&nonce, merchant_id, self.now())).await;
        assert_eq!(reply.status.as_u16(), 201, "enrolment: {}", reply.json);
        reply.json
    }

    /// Ids of every device, in list order.
    pub async fn device_ids(&self) -> Vec<String> {
        let list = self.expect(200, "GET", "/v1/devices?limit=500", Some(&self.admin_key), None).await;
        list.as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap().to_owned()).collect()
    }

    pub async fn device_status(&self, device_id: &str) -> String {
        let device = self.expect(200, "GET", &format!("/v1/devices/{device_id}"), Some(&self.admin_key), None).await;
        device["status"].as_str().unwrap().to_owned()
    }

    pub async fn audit(&self) -> Vec<AuditRecord> {
        self.state.store.audit_records(0, 1000).await.unwrap()
    }

    /// The sequence number of the newest audit row (0 when there is none).
    pub async fn audit_mark(&self) -> i64 {
        self.audit().await.last().map_or(0, |r| r.seq)
    }

    /// The audit rows appended after `mark`, as `(action, subject)`.
    pub async fn audited_since(&self, mark: i64) -> Vec<(String, String)> {
        let rows = self.state.store.audit_records(mark, 1000).await.unwrap();
        rows.into_iter().map(|r| (r.entry.action, r.entry.subject)).collect()
    }

    /// Asserts exactly these `(action, subject)` rows were appended after `mark`;
    /// a subject of `"*"` matches any.
    pub async fn assert_audited(&self, context: &str, mark: i64, expected: &[(&str, &str)]) {
        let rows = self.audited_since(mark).await;
        let matches = rows.len() == expected.len()
            && rows.iter().zip(expected).all(|((action, subject), (want_action, want_subject))| {
                action == want_action && (*want_subject == "*" || subject == want_subject)
            });
        assert!(matches, "{context}: audited {rows:?}, expected {expected:?}");
    }

    /// Asserts `GET /v1/audit/verify` reports an intact chain covering every row.
    pub async fn assert_audit_intact(&self, context: &str) {
        let report = self.expect(200, "GET", "/v1/audit/verify", Some(&self.admin_key), None).await;
        assert_eq!(report["intact"], json!(true), "{context}: {report}");
        let rows = self.audit().await.len() as i64;
        assert_eq!(report["rows_checked"].as_i64(), Some(rows), "{context}: {report}");
    }

    pub async fn jwks(&self) -> JwkSet {
        let reply = self.call("GET", "/.well-known/jwks.json", None, None).await;
        assert_eq!(reply.status.as_u16(), 200);
        serde_json::from_value(reply.json).unwrap()
    }

    /// Verifies a device credential against the published JWK Set; returns its `kid`
    /// and claims.
    pub async fn verify_credential(&self, credential: &str) -> (String, DeviceCredentialClaims) {
        let jws = UnverifiedJws::parse(credential).unwrap();
        assert_eq!(jws.header().typ.as_deref(), Some(DEVICE_CREDENTIAL_TYP));
        let kid = jws.header().kid.clone().expect("credential names its kid");
        let jwks = self.jwks().await;
        let jwk = jwks.find(&kid).unwrap_or_else(|| panic!("kid {kid} is not in the JWK Set {jwks:?}"));
        let claims: DeviceCredentialClaims = jwt::decode(&jws, &jwk.verifying_key().unwrap())
            .unwrap_or_else(|e| panic!("credential does not verify with {kid}: {e}"));
        (kid, claims)
    }
}
