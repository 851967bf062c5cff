//! offline: what a phone and a terminal need from the server, while online, to make a
//! purchase offline. A terminal's key is certified by the server (COSE), so an offline
//! phone holding only the server's key can tell that a payment request comes from an
//! enrolled merchant and show the merchant's name. The wire types and their checks live
//! in `vouch_proto::offline`.
//!
//! A consumer's phone, over its DPoP-bound token, obtains an offline credential: the
//! server's signature over the phone's enrolled key, a limit and currency, a counter
//! start and an expiry. Issuing it moves the limit from the consumer's funding account to
//! their offline reserve account in the same transaction (the transfer's id is derived
//! from the credential's), with the credential's row and its audit entry, so whatever
//! the phone pays under it is already set aside.
//!
//! `credential` issues both; `settle` settles what terminals collected; `sync` gives a
//! phone its receipts and closes and refreshes the credential it pays under.

mod credential;
mod settle;
mod sync;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vouch_proto::VerifyingKey;
pub(super) use vouch_proto::offline::currency_alpha;
pub use vouch_proto::offline::currency_numeric;
use vouch_proto::offline::{ID_BYTES, Id, OfflineCredential, WireType};
use vouch_store::OfflineCredentialRecord;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::keys::KeyStore;

pub use credential::{CredentialRequest, IssuedCredential, IssuedTerminalCertificate, reserve_transfer_id};
pub use settle::{
    OfflinePayment, SETTLEMENT_BATCH_MAX, SETTLEMENT_BODY_BYTES_MAX, SettlementRequest, SettlementResult,
    SettlementResults, SettlementStatus,
};
pub use sync::{
    ClosedCredentialView, OfflineReceipt, RECEIPTS_CURSOR_LAG_SECS, SYNC_RECEIPTS_MAX, SyncAnswer, SyncRequest,
};

/// The operation a phone's ticket must allow.
pub(super) const OFFLINE_OPERATION: &str = "offline";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(credential::issue_terminal_certificate))
        .routes(routes!(credential::issue_credential))
        .routes(routes!(settle::settle_payments))
        .routes(routes!(sync::sync))
}

/// The 16 bytes of the UUID behind a server id (`prefix_<32 hex digits>`).
pub fn id_bytes(id: &str) -> ApiResult<Id> {
    let hex = id.rsplit_once('_').map_or(id, |(_, hex)| hex);
    let uuid = uuid::Uuid::try_parse(hex)
        .map_err(|_| ApiError::internal(format!("id {id} does not end in a UUID of {ID_BYTES} bytes")))?;
    Ok(*uuid.as_bytes())
}

/// Signs a wire type with the server's active key. The payload is decoded again first,
/// so a value the verifier would refuse is never signed.
pub fn sign_wire<T: WireType>(state: &AppState, value: &T) -> ApiResult<Vec<u8>> {
    sign_with(&*state.keys, value)
}

/// [`sign_wire`] with the key store alone, for work inside a write that holds no state.
pub(super) fn sign_with<T: WireType>(keys: &dyn KeyStore, value: &T) -> ApiResult<Vec<u8>> {
    let payload = value.to_cbor();
    T::from_cbor(&payload).map_err(ApiError::internal)?;
    keys.sign_cose(&payload, T::AAD).map_err(ApiError::internal)
}

pub(super) fn server_id(prefix: &str, bytes: &Id) -> String {
    format!("{prefix}_{}", uuid::Uuid::from_bytes(*bytes).simple())
}

/// The credential as the phone holds it, rebuilt from its row; once the credential is
/// closed, with the lowered limit.
pub(super) fn credential_of(record: &OfflineCredentialRecord) -> ApiResult<OfflineCredential> {
    let corrupt = |what: &str| ApiError::internal(format!("offline credential {}: {what}", record.id));
    Ok(OfflineCredential {
        credential_id: id_bytes(&record.id)?,
        phone_key: VerifyingKey::from_sec1(&record.public_key).map_err(|_| corrupt("public key"))?,
        limit_minor: u64::try_from(record.limit_minor).map_err(|_| corrupt("limit"))?,
        currency: currency_numeric(&record.currency).ok_or_else(|| corrupt("currency"))?,
        counter_start: u64::try_from(record.counter_start).map_err(|_| corrupt("counter start"))?,
        not_after: record.not_after,
        issued_at: record.issued_at,
    })
}
