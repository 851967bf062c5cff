//! The TSM endpoints: issuers, revocations, app releases, the gateway's messages and
//! the outbox for operators and integrators ([`VouchClient`], API key), and provisioning
//! and app delivery for the phone itself ([`TokenSession`], DPoP).

use serde::{Deserialize, Serialize};
use serde_json::json;
use vouch_proto::tsm::AppManifest;
use vouch_proto::{Jwk, b64};

use super::{APPS_PATH, ISSUERS_PATH, MESSAGES_PATH, OUTBOX_PATH};
use crate::client::path_segment;
use crate::token::Method;
use crate::{DeviceError, TokenSession, VouchClient};

/// A device maker's CA as Vouch registered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerRecord {
    pub issuer_id: String,
    pub name: String,
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub fingerprint_sha256: String,
    pub created_at: i64,
}

/// A certificate revoked under an issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    pub issuer_id: String,
    /// Lowercase hex.
    pub serial: String,
    pub revoked_at: i64,
}

/// The answer to provisioning: what the crypto SE checks and stores
/// ([`super::CryptoSe::accept_provisioning`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionAnswer {
    pub registration_id: String,
    pub device_id: String,
    /// The serial of the SE certificate the bundle is sealed to, lowercase hex.
    pub se_serial: String,
    /// JWS (`typ` [`vouch_proto::tsm::PROVISION_TYP`]) signed by the server's key.
    pub provisioning: String,
    pub registered_at: i64,
}

/// A payment application release Vouch signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub manifest_id: String,
    pub app_id: String,
    pub version: u32,
    pub code_sha256: String,
    pub code_size: u64,
    pub se_profile: String,
    /// JWS (`typ` [`vouch_proto::tsm::MANIFEST_TYP`]).
    pub manifest: String,
    pub created_at: i64,
}

/// The latest release of an app, its signed manifest sealed to the app SE's key: what
/// [`super::AppSe::install`] opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppDelivery {
    pub manifest_id: String,
    pub app_id: String,
    pub version: u32,
    /// HPKE encapsulated key, base64url.
    pub enc: String,
    /// base64url.
    pub ciphertext: String,
}

/// Vouch's answer to a message the gateway passed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayAccepted {
    pub message_id: String,
    pub provider_id: String,
    pub counter: u64,
    /// `queued`.
    pub status: String,
    /// This exact message was accepted before; the answer is the first one's.
    #[serde(default)]
    pub duplicate: bool,
}

/// Where a relayed message is on its way to its provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    Pending,
    Delivered,
    /// Given up on after the last attempt, or refused by the provider: an operator may
    /// send it back to pending.
    Dead,
}

impl OutboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Delivered => "delivered",
            OutboxStatus::Dead => "dead",
        }
    }
}

/// A message in the outbox, without its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub message_id: String,
    pub provider_id: String,
    pub device_id: String,
    pub counter: i64,
    pub status: OutboxStatus,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

/// One page of the outbox, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxPage {
    pub messages: Vec<OutboxEntry>,
    /// Set when there may be more: the next page's [`OutboxQuery::cursor`].
    pub next_cursor: Option<String>,
}

/// Which outbox messages to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxQuery {
    pub status: Option<OutboxStatus>,
    pub provider_id: Option<String>,
    pub cursor: Option<String>,
    /// 1 to 500; the server's default is 100.
    pub limit: Option<u32>,
}

impl OutboxQuery {
    /// The path with this query, its values percent-encoded.
    fn path(&self) -> String {
        let mut url = reqwest::Url::parse("http://vouch.invalid").expect("Invariant: a constant, valid URL");
        url.set_path(OUTBOX_PATH);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(status) = self.status {
                pairs.append_pair("status", status.as_str());
            }
            if let Some(provider_id) = &self.provider_id {
                pairs.append_pair("provider_id", provider_id);
            }
            if let Some(cursor) = &self.cursor {
                pairs.append_pair("cursor", cursor);
            }
            if let Some(limit) = self.limit {
                pairs.append_pair("limit", &limit.to_string());
            }
        }
        match url.query() {
            Some(query) if !query.is_empty() => format!("{OUTBOX_PATH}?{query}"),
            _ => OUTBOX_PATH.to_owned(),
        }
    }
}

/// A service provider (a bank, a processor) that receives relayed messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceProviderRecord {
    pub service_provider_id: String,
    pub name: String,
    pub endpoint: String,
    /// The P-256 key messages are sealed to (HPKE).
    pub public_jwk: Jwk,
    pub created_at: i64,
}

impl VouchClient {
    /// Registers a device maker's CA certificate (PEM); needs the admin scope. The same
    /// certificate again is refused with `issuer-exists`.
    pub async fn register_tsm_issuer(&self, name: &str, certificate_pem: &str) -> Result<IssuerRecord, DeviceError> {
        let body = json!({ "name": name, "certificate_pem": certificate_pem });
        self.send(Method::POST, ISSUERS_PATH, Some(body)).await
    }

    pub async fn tsm_issuers(&self) -> Result<Vec<IssuerRecord>, DeviceError> {
        self.send(Method::GET, ISSUERS_PATH, None).await
    }

    /// Revokes the certificate of serial `serial` (hex) under `issuer_id`: chains that
    /// hold it are refused from now on.
    pub async fn revoke_se_certificate(&self, issuer_id: &str, serial: &str) -> Result<RevocationRecord, DeviceError> {
        let path = format!("{ISSUERS_PATH}/{}/revocations", path_segment(issuer_id));
        self.send(Method::POST, &path, Some(json!({ "serial": serial }))).await
    }

    /// Has Vouch sign a payment application release; an app id and version signed
    /// before is refused with `manifest-exists`.
    pub async fn publish_tsm_app(&self, manifest: &AppManifest) -> Result<AppRecord, DeviceError> {
        self.send(Method::POST, APPS_PATH, Some(json!(manifest))).await
    }

    pub async fn tsm_apps(&self) -> Result<Vec<AppRecord>, DeviceError> {
        self.send(Method::GET, APPS_PATH, None).await
    }

    /// Passes on a device's message envelope as an SMS gateway does; needs the
    /// `gateway` scope. Refusals (`replayed-counter`, `message-not-authentic`,
    /// `unknown-provider`, …) are [`DeviceError::Problem`].
    pub async fn relay_tsm_message(&self, device_id: &str, envelope: &[u8]) -> Result<RelayAccepted, DeviceError> {
        let body = json!({ "device_id": device_id, "message": b64::encode(envelope) });
        self.send(Method::POST, MESSAGES_PATH, Some(body)).await
    }

    pub async fn tsm_outbox(&self, query: &OutboxQuery) -> Result<OutboxPage, DeviceError> {
        self.send(Method::GET, &query.path(), None).await
    }

    /// Sends a dead message back to pending, its attempts counted afresh.
    pub async fn retry_tsm_message(&self, message_id: &str) -> Result<OutboxEntry, DeviceError> {
        let path = format!("{OUTBOX_PATH}/{}/retry", path_segment(message_id));
        self.send(Method::POST, &path, None).await
    }

    /// Registers a service provider whose messages are delivered to `endpoint`, sealed
    /// to `public_jwk`.
    pub async fn create_service_provider(
        &self,
        name: &str,
        endpoint: &str,
        public_jwk: &Jwk,
    ) -> Result<ServiceProviderRecord, DeviceError> {
        let body = json!({ "name": name, "endpoint": endpoint, "public_jwk": public_jwk });
        self.send(Method::POST, "/v1/service-providers", Some(body)).await
    }

    pub async fn service_providers(&self) -> Result<Vec<ServiceProviderRecord>, DeviceError> {
        self.send(Method::GET, "/v1/service-providers", None).await
    }
}

impl TokenSession {
    /// Asks Vouch to provision this device's crypto SE, whose chain is
    /// `crypto_se_chain_pem`, for the payment instrument `instrument`. Refusals of the
    /// chain (`unknown-issuer`, `certificate-expired`, `wrong-key-usage`,
    /// `certificate-revoked`, …) are [`DeviceError::Problem`]. The answer is checked by
    /// the SE, which alone can open it.
    pub async fn provision_crypto_se(
        &self,
        crypto_se_chain_pem: &str,
        instrument: &str,
    ) -> Result<ProvisionAnswer, DeviceError> {
        let path = format!("/v1/tsm/devices/{}/provision", path_segment(self.device_id()));
        let body = json!({ "crypto_se_chain_pem": crypto_se_chain_pem, "instrument": instrument });
        self.request(Method::POST, &path, Some(&body)).await
    }

    /// Fetches the latest release of `app_id` sealed to the app SE whose chain is
    /// `app_se_chain_pem`. The crypto SE must be provisioned first (`not-provisioned`).
    pub async fn fetch_tsm_app(&self, app_id: &str, app_se_chain_pem: &str) -> Result<AppDelivery, DeviceError> {
        let path = format!("/v1/tsm/devices/{}/app", path_segment(self.device_id()));
        let body = json!({ "app_id": app_id, "app_se_chain_pem": app_se_chain_pem });
        self.request(Method::POST, &path, Some(&body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_queries_encode_their_values() {
        let cases = [
            (OutboxQuery::default(), "/v1/tsm/outbox"),
            (
                OutboxQuery { status: Some(OutboxStatus::Dead), limit: Some(50), ..OutboxQuery::default() },
                "/v1/tsm/outbox?status=dead&limit=50",
            ),
            (
                OutboxQuery {
                    provider_id: Some("sp_1".into()),
                    cursor: Some("1700000000.msg_a&b=c".into()),
                    ..OutboxQuery::default()
                },
                "/v1/tsm/outbox?provider_id=sp_1&cursor=1700000000.msg_a%26b%3Dc",
            ),
        ];
        for (query, expected) in cases {
            assert_eq!(query.path(), expected);
        }
    }

    #[test]
    fn outbox_entries_read_the_server_statuses() {
        let entry: OutboxEntry = serde_json::from_value(json!({
            "message_id": "msg_1", "provider_id": "sp_1", "device_id": "dev_1", "counter": 3,
            "status": "dead", "attempts": 8, "next_attempt_at": 10, "last_error": "503 Service Unavailable",
            "created_at": 1, "delivered_at": null,
        }))
        .unwrap();
        assert_eq!((entry.status, entry.attempts), (OutboxStatus::Dead, 8));
        let accepted: RelayAccepted = serde_json::from_value(json!({
            "message_id": "msg_1", "provider_id": "sp_1", "counter": 3, "status": "queued",
        }))
        .unwrap();
        assert!(!accepted.duplicate, "a first acceptance carries no duplicate member");
    }
}
