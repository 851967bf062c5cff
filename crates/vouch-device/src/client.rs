//! A typed HTTP client for Vouch's API. Refusals come back as
//! [`DeviceError::Problem`], carrying the server's problem document.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use vouch_proto::attest::{EarStatus, Reason, TicketClaims};
use vouch_proto::dvv::AccountRef;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::{Jwk, JwkSet};
use zeroize::Zeroizing;

use crate::DeviceError;
use crate::attest::{Challenge, ReferenceValues};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECTIONS_PER_HOST_MAX: usize = 256;
/// Bodies longer than this are cut in error messages.
const ERROR_BODY_CHARS_MAX: usize = 512;

#[derive(Debug, Clone, Deserialize)]
pub struct EnrolmentNonce {
    pub nonce: String,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrolledDevice {
    pub device_id: String,
    pub kind: DeviceKind,
    pub merchant_id: String,
    pub jwk: Jwk,
    pub device_credential: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MerchantRecord {
    pub merchant_id: String,
    pub name: String,
    /// ISO 8583 card acceptor id (DE 42), for merchants whose terminals authorize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_acceptor_id: Option<String>,
    /// ISO 18245 merchant category code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merchant_category: Option<String>,
    pub created_at: i64,
}

/// A merchant to register (`POST /v1/merchants`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NewMerchant {
    pub name: String,
    /// Exactly 15 printable ASCII characters, unique; needed before the merchant's
    /// terminals can authorize.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card_acceptor_id: Option<String>,
    /// 4 digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_category: Option<String>,
}

/// A consumer, who holds payment accounts and phones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerRecord {
    pub consumer_id: String,
    pub name: String,
    pub created_at: i64,
}

/// A phone made a consumer's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerDevice {
    pub consumer_id: String,
    pub device_id: String,
}

/// A consumer's payment account; the server keeps only the last four digits of its
/// reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentAccountRecord {
    pub payment_account_id: String,
    pub consumer_id: String,
    pub account_ref_last4: String,
    pub created_at: i64,
}

/// A terminal just registered, with its API key (scope `terminal`), shown this once.
#[derive(Clone, Serialize, Deserialize)]
pub struct TerminalCreated {
    pub terminal_id: String,
    pub merchant_id: String,
    pub card_acceptor_id: String,
    /// ISO 8583 terminal id (DE 41), 8 characters.
    pub iso_terminal_id: String,
    pub api_key: String,
}

impl std::fmt::Debug for TerminalCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalCreated")
            .field("terminal_id", &self.terminal_id)
            .field("merchant_id", &self.merchant_id)
            .field("card_acceptor_id", &self.card_acceptor_id)
            .field("iso_terminal_id", &self.iso_terminal_id)
            .finish_non_exhaustive()
    }
}

/// The server's COSE certificate of a terminal's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedTerminalCertificate {
    /// base64url (unpadded) tagged COSE_Sign1, signed by the server (kid in the
    /// protected header).
    pub certificate: String,
    pub not_after: i64,
}

impl IssuedTerminalCertificate {
    /// The COSE_Sign1's bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, DeviceError> {
        Ok(vouch_proto::b64::decode("certificate", &self.certificate)?)
    }
}

/// A ledger account and its running totals.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountRecord {
    pub account_id: String,
    /// `merchant_settlement`, `consumer_funding`, `consumer_offline_reserve` or `issuer`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merchant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<String>,
    pub label: String,
    pub currency: String,
    pub debits_minor: i64,
    pub credits_minor: i64,
    /// Credits minus debits.
    pub balance_minor: i64,
    pub created_at: i64,
}

/// A ledger transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub transfer_id: String,
    pub debit_account_id: String,
    pub credit_account_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub reference: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    pub kind: DeviceKind,
    pub merchant_id: String,
    pub model: String,
    pub firmware_version: String,
    pub status: String,
    pub key_thumbprint: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyCreated {
    pub key_id: String,
    pub api_key: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditVerification {
    pub rows_checked: i64,
    pub head_seq: i64,
    pub intact: bool,
    pub first_break: Option<String>,
    pub first_broken_seq: Option<i64>,
}

/// The server's verdict on a device's evidence. A denial is a verdict too: status
/// `contraindicated`, a signed ticket, and the reasons.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttestationOutcome {
    pub attestation_id: String,
    pub device_id: String,
    pub status: EarStatus,
    /// The signed ticket (JWT, `typ` `vouch-ticket+jwt`).
    pub ticket: String,
    pub ticket_id: String,
    pub risk: u8,
    #[serde(default)]
    pub risk_signals: Vec<String>,
    #[serde(default)]
    pub reasons: Vec<Reason>,
    pub expires_at: i64,
}

/// A relying party's check of a ticket (`POST /v1/tickets/verify`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketVerification {
    pub valid: bool,
    /// Why the ticket is not valid.
    pub reason: Option<String>,
    pub claims: Option<TicketClaims>,
}

/// One past attestation of a device, newest first in a history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttestationRecord {
    pub attestation_id: String,
    pub status: EarStatus,
    pub risk: u8,
    #[serde(default)]
    pub reasons: Vec<Reason>,
    pub ticket_id: Option<String>,
    pub issued_at: i64,
    pub expires_at: i64,
}

#[derive(Deserialize)]
struct ProblemBody {
    #[serde(rename = "type")]
    problem_type: String,
    detail: String,
    /// RFC 6749 error code, on OAuth and DPoP-protected endpoints.
    #[serde(default)]
    error: Option<String>,
}

/// How a request proves who sends it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Auth<'a> {
    /// The client's API key, if it has one (`Authorization: Bearer`).
    ApiKey,
    /// A DPoP proof (RFC 9449), with the access token it is bound to on protected
    /// requests (`Authorization: DPoP`). The API key is never sent alongside.
    Dpop { proof: &'a str, access_token: Option<&'a str> },
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Body<'a> {
    Empty,
    Json(&'a serde_json::Value),
    /// `application/x-www-form-urlencoded`, as OAuth endpoints take.
    Form(&'a [(&'a str, &'a str)]),
}

/// A whole answer: status, headers and body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The RFC 6749 `error` member of a problem document.
    pub(crate) fn oauth_error(&self) -> Option<String> {
        serde_json::from_slice::<ProblemBody>(&self.body).ok().and_then(|p| p.error)
    }

    /// A success as `T` (an empty body reads as JSON `null`); a refusal as
    /// [`DeviceError::Problem`].
    pub(crate) fn json<T: DeserializeOwned>(self) -> Result<T, DeviceError> {
        let Reply { status, body, .. } = self;
        if (200..300).contains(&status) {
            let json: &[u8] = if body.is_empty() { b"null" } else { &body };
            return serde_json::from_slice(json)
                .map_err(|e| DeviceError::UnexpectedResponse { status, body: format!("{e}: {}", truncate(&body)) });
        }
        match serde_json::from_slice::<ProblemBody>(&body) {
            Ok(problem) => Err(DeviceError::Problem {
                status,
                problem_type: problem.problem_type,
                detail: problem.detail,
                oauth_error: problem.error,
            }),
            Err(_) => Err(DeviceError::UnexpectedResponse { status, body: truncate(&body) }),
        }
    }
}

/// A connection to one Vouch server. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct VouchClient {
    base_url: String,
    api_key: Option<std::sync::Arc<Zeroizing<String>>>,
    http: reqwest::Client,
}

impl std::fmt::Debug for VouchClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VouchClient").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

impl VouchClient {
    pub fn new(base_url: &str) -> Result<Self, DeviceError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(CONNECTIONS_PER_HOST_MAX)
            .build()?;
        Ok(VouchClient { base_url: base_url.trim_end_matches('/').to_owned(), api_key: None, http })
    }

    /// Authenticates admin and integration calls with an API key.
    pub fn with_api_key(mut self, api_key: &str) -> Self {
        self.api_key = Some(std::sync::Arc::new(Zeroizing::new(api_key.trim().to_owned())));
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The absolute URL of `path` on this server.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub(crate) async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, DeviceError> {
        let body = body.as_ref().map_or(Body::Empty, Body::Json);
        self.execute(method, path, Auth::ApiKey, body).await?.json()
    }

    /// One request, answered whole, whatever its status.
    pub(crate) async fn execute(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Auth<'_>,
        body: Body<'_>,
    ) -> Result<Reply, DeviceError> {
        let mut request = self.http.request(method, self.url(path));
        match auth {
            Auth::ApiKey => {
                if let Some(key) = &self.api_key {
                    request = request.bearer_auth(key.as_str());
                }
            }
            Auth::Dpop { proof, access_token } => {
                request = request.header("DPoP", proof);
                if let Some(token) = access_token {
                    request = request.header(reqwest::header::AUTHORIZATION, format!("DPoP {token}"));
                }
            }
        }
        request = match body {
            Body::Empty => request,
            Body::Json(json) => request.json(json),
            Body::Form(fields) => request.form(fields),
        };
        let mut response = request.send().await?;
        let status = response.status().as_u16();
        let headers = std::mem::take(response.headers_mut());
        let body = response.bytes().await?.to_vec();
        Ok(Reply { status, headers, body })
    }

    pub async fn health(&self) -> Result<(), DeviceError> {
        self.send::<serde_json::Value>(reqwest::Method::GET, "/healthz", None).await.map(drop)
    }

    pub async fn jwks(&self) -> Result<JwkSet, DeviceError> {
        self.send(reqwest::Method::GET, "/.well-known/jwks.json", None).await
    }

    pub async fn create_merchant(&self, name: &str) -> Result<MerchantRecord, DeviceError> {
        self.send(reqwest::Method::POST, "/v1/merchants", Some(json!({ "name": name }))).await
    }

    /// Registers a merchant with the ISO 8583 identities its terminals need.
    pub async fn create_merchant_with(&self, merchant: &NewMerchant) -> Result<MerchantRecord, DeviceError> {
        self.send(reqwest::Method::POST, "/v1/merchants", Some(json!(merchant))).await
    }

    pub async fn merchants(&self) -> Result<Vec<MerchantRecord>, DeviceError> {
        self.send(reqwest::Method::GET, "/v1/merchants", None).await
    }

    pub async fn create_api_key(&self, scopes: &[&str], label: &str) -> Result<ApiKeyCreated, DeviceError> {
        self.send(reqwest::Method::POST, "/v1/api-keys", Some(json!({ "scopes": scopes, "label": label }))).await
    }

    pub async fn enrolment_nonce(&self) -> Result<EnrolmentNonce, DeviceError> {
        self.send(reqwest::Method::POST, "/v1/enrolment-nonces", None).await
    }

    pub async fn enrol(&self, proof: &str) -> Result<EnrolledDevice, DeviceError> {
        self.send(reqwest::Method::POST, "/v1/devices", Some(json!({ "proof": proof }))).await
    }

    pub async fn device(&self, device_id: &str) -> Result<DeviceRecord, DeviceError> {
        self.send(reqwest::Method::GET, &format!("/v1/devices/{}", path_segment(device_id)), None).await
    }

    pub async fn devices(&self, merchant_id: Option<&str>) -> Result<Vec<DeviceRecord>, DeviceError> {
        let path = match merchant_id {
            Some(id) => format!("/v1/devices?merchant_id={}", path_segment(id)),
            None => "/v1/devices".to_owned(),
        };
        self.send(reqwest::Method::GET, &path, None).await
    }

    /// `action` is `suspend`, `reactivate` or `revoke`.
    pub async fn change_device_status(
        &self,
        device_id: &str,
        action: &str,
        reason: &str,
    ) -> Result<DeviceRecord, DeviceError> {
        let path = format!("/v1/devices/{}/{}", path_segment(device_id), path_segment(action));
        self.send(reqwest::Method::POST, &path, Some(json!({ "reason": reason }))).await
    }

    pub async fn rotate_keys(&self) -> Result<String, DeviceError> {
        let rotated: serde_json::Value = self.send(reqwest::Method::POST, "/v1/keys/rotate", None).await?;
        rotated["kid"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| DeviceError::Untrusted("rotation answer has no kid".into()))
    }

    pub async fn verify_audit(&self) -> Result<AuditVerification, DeviceError> {
        self.send(reqwest::Method::GET, "/v1/audit/verify", None).await
    }

    /// Opens an attestation with a signed challenge request; needs no API key.
    pub async fn request_attestation(&self, request: &str) -> Result<Challenge, DeviceError> {
        self.send(reqwest::Method::POST, "/v1/attestations", Some(json!({ "request": request }))).await
    }

    /// Submits signed evidence for an open attestation; needs no API key.
    pub async fn submit_evidence(
        &self,
        attestation_id: &str,
        evidence: &str,
    ) -> Result<AttestationOutcome, DeviceError> {
        let path = format!("/v1/attestations/{}/evidence", path_segment(attestation_id));
        self.send(reqwest::Method::POST, &path, Some(json!({ "evidence": evidence }))).await
    }

    /// Asks the server whether a ticket is good now, device status included.
    pub async fn verify_ticket(&self, ticket: &str) -> Result<TicketVerification, DeviceError> {
        self.send(reqwest::Method::POST, "/v1/tickets/verify", Some(json!({ "ticket": ticket }))).await
    }

    pub async fn attestations(&self, device_id: &str) -> Result<Vec<AttestationRecord>, DeviceError> {
        let path = format!("/v1/devices/{}/attestations", path_segment(device_id));
        self.send(reqwest::Method::GET, &path, None).await
    }

    /// Registers (or replaces) the known-good values for one model and firmware.
    pub async fn put_reference_values(&self, values: &ReferenceValues) -> Result<ReferenceValues, DeviceError> {
        self.send(reqwest::Method::PUT, "/v1/reference-values", Some(json!(values))).await
    }

    pub async fn create_consumer(&self, name: &str) -> Result<ConsumerRecord, DeviceError> {
        self.send(reqwest::Method::POST, "/v1/consumers", Some(json!({ "name": name }))).await
    }

    /// Makes an enrolled, active device of kind `consumer` the consumer's phone.
    pub async fn add_consumer_device(&self, consumer_id: &str, device_id: &str) -> Result<ConsumerDevice, DeviceError> {
        let path = format!("/v1/consumers/{}/devices", path_segment(consumer_id));
        self.send(reqwest::Method::POST, &path, Some(json!({ "device_id": device_id }))).await
    }

    /// Registers a consumer's payment account by its payment token.
    pub async fn add_payment_account(
        &self,
        consumer_id: &str,
        account_ref: &AccountRef,
    ) -> Result<PaymentAccountRecord, DeviceError> {
        let path = format!("/v1/consumers/{}/payment-accounts", path_segment(consumer_id));
        let added: PaymentAccountRecord =
            self.send(reqwest::Method::POST, &path, Some(json!({ "account_ref": account_ref.expose() }))).await?;
        if added.account_ref_last4 != account_ref.last4() || added.consumer_id != consumer_id {
            return Err(DeviceError::Untrusted("the server registered another account".into()));
        }
        Ok(added)
    }

    /// Registers a terminal of a merchant that has a card acceptor id; the answer
    /// carries the terminal's API key.
    pub async fn create_terminal(
        &self,
        merchant_id: &str,
        iso_terminal_id: &str,
    ) -> Result<TerminalCreated, DeviceError> {
        let path = format!("/v1/merchants/{}/terminals", path_segment(merchant_id));
        self.send(reqwest::Method::POST, &path, Some(json!({ "iso_terminal_id": iso_terminal_id }))).await
    }

    /// Has the server certify the key of an enrolled, active terminal (COSE), so that
    /// offline phones can check its payment requests.
    pub async fn terminal_certificate(&self, device_id: &str) -> Result<IssuedTerminalCertificate, DeviceError> {
        let path = format!("/v1/devices/{}/terminal-certificate", path_segment(device_id));
        self.send(reqwest::Method::POST, &path, None).await
    }

    /// Opens a settlement account for a merchant, at zero.
    pub async fn create_merchant_account(
        &self,
        merchant_id: &str,
        label: &str,
        currency: &str,
    ) -> Result<AccountRecord, DeviceError> {
        let path = format!("/v1/merchants/{}/accounts", path_segment(merchant_id));
        self.send(reqwest::Method::POST, &path, Some(json!({ "label": label, "currency": currency }))).await
    }

    /// Opens a consumer's account, `consumer_funding` or `consumer_offline_reserve`, at zero.
    pub async fn create_consumer_account(
        &self,
        consumer_id: &str,
        kind: &str,
        currency: &str,
    ) -> Result<AccountRecord, DeviceError> {
        let path = format!("/v1/consumers/{}/accounts", path_segment(consumer_id));
        self.send(reqwest::Method::POST, &path, Some(json!({ "kind": kind, "currency": currency }))).await
    }

    /// Moves `amount_minor` from the currency's issuer account into a consumer's funding
    /// account; sent again with the same `transfer_id`, it moves nothing more.
    pub async fn fund_consumer(
        &self,
        consumer_id: &str,
        transfer_id: &str,
        account_id: &str,
        amount_minor: i64,
        currency: &str,
    ) -> Result<TransferRecord, DeviceError> {
        let path = format!("/v1/consumers/{}/funding", path_segment(consumer_id));
        let body = json!({
            "transfer_id": transfer_id, "account_id": account_id, "amount_minor": amount_minor, "currency": currency,
        });
        self.send(reqwest::Method::POST, &path, Some(body)).await
    }

    pub async fn account(&self, account_id: &str) -> Result<AccountRecord, DeviceError> {
        self.send(reqwest::Method::GET, &format!("/v1/accounts/{}", path_segment(account_id)), None).await
    }

    pub async fn reference_values(&self) -> Result<Vec<ReferenceValues>, DeviceError> {
        self.send(reqwest::Method::GET, "/v1/reference-values", None).await
    }
}

/// Ids are opaque to the client; anything outside the URL-safe set is refused rather
/// than spliced into a path.
pub(crate) fn path_segment(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')).collect()
}

fn truncate(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().take(ERROR_BODY_CHARS_MAX).collect()
}
