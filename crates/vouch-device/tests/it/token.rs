//! Tokens end to end: a device trades its attestation ticket for a DPoP-bound session,
//! derives sub-sessions, has digests signed, and ends or revokes what it opened; the
//! server refuses replayed proofs, and tokens of ended sessions or inactive devices.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use vouch_device::attest::Tamper;
use vouch_device::token::{Method, SIGN_PATH};
use vouch_device::{DeviceError, TokenSession};
use vouch_proto::attest::EarStatus;
use vouch_proto::crypto::sha256;
use vouch_proto::dpop::{ProofClaims, sign_proof};
use vouch_proto::token::verify_signed_digest;
use vouch_proto::{Clock, SystemClock, b64};
use vouch_server::Config;

use crate::support::{Device, Fixture, fixture, fixture_on, start_configured};

/// Enrols a clean terminal, attests it and opens a session with its ticket.
async fn open_session(fx: &Fixture) -> (Device, TokenSession) {
    let mut device = fx.device(&[]).await;
    let session = open(fx, &mut device, Arc::new(SystemClock)).await.unwrap();
    (device, session)
}

async fn open(fx: &Fixture, device: &mut Device, clock: Arc<dyn Clock>) -> Result<TokenSession, DeviceError> {
    let attestation = fx.attest(device).await?;
    let ticket = &attestation.outcome.ticket;
    TokenSession::open(&fx.device_client, Arc::clone(&device.identity), ticket, clock, &fx.rng).await
}

fn digest(document: &str) -> [u8; 32] {
    sha256(document.as_bytes())
}

/// A refusal with this status, OAuth error and problem reason.
#[track_caller]
fn assert_refused(error: &DeviceError, status: u16, oauth_error: &str, reason: &str) {
    assert!(matches!(error, DeviceError::Problem { status: s, .. } if *s == status), "{error}");
    assert_eq!(error.oauth_error(), Some(oauth_error), "{error}");
    assert_eq!(error.problem_reason(), Some(reason), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_token_is_bound_to_the_device_and_gets_digests_signed() {
    let fx = fixture().await;
    let (device, session) = open_session(&fx).await;
    let claims = session.claims();
    assert_eq!(claims.sub, device.device_id);
    assert_eq!(claims.client_id, device.device_id);
    assert_eq!(claims.cnf.jkt, device.identity.jwk().thumbprint());
    assert_eq!(claims.ear_status, EarStatus::Affirming);
    assert_eq!(claims.iss, fx.server.state.config.issuer);
    assert!(claims.sid.starts_with("ses_") && claims.subsession_id.is_none(), "{claims:?}");
    assert!(claims.exp > claims.iat && claims.exp - claims.iat <= fx.server.state.config.access_token_ttl_secs);
    assert!(session.nonce().is_some(), "the server's nonce is remembered");

    let signed = session.sign_digest(&digest("invoice 42")).await.unwrap();
    // Anyone holding the published keys can check it later.
    let jwks = fx.admin.jwks().await.unwrap();
    let checked =
        verify_signed_digest(&signed.signature, |kid| jwks.find(kid).and_then(|k| k.verifying_key().ok())).unwrap();
    assert_eq!(checked, signed.claims);
    assert_eq!(checked.digest, b64::encode(digest("invoice 42")));
    assert_eq!((checked.sub.as_str(), checked.sid.as_str()), (device.device_id.as_str(), claims.sid.as_str()));
    assert_eq!(checked.ticket_id, claims.ticket_id);
    assert_eq!(checked.subsession_id, None);
    // Each request has its own proof, so the same token signs again.
    session.sign_digest(&digest("invoice 43")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subsession_shares_the_key_and_session_and_signs_as_itself() {
    let fx = fixture().await;
    let (_device, session) = open_session(&fx).await;
    let sub = session.subsession().await.unwrap();
    let sub_id = sub.subsession_id().unwrap();
    assert!(sub_id.starts_with("sub_"), "{sub_id}");
    assert_eq!(sub.sid(), session.sid());
    assert_eq!(sub.claims().cnf, session.claims().cnf);
    assert_ne!(sub.access_token(), session.access_token());

    let signed = sub.sign_digest(&digest("receipt")).await.unwrap();
    assert_eq!(signed.claims.subsession_id.as_deref(), Some(sub_id.as_str()));
    assert_eq!(signed.claims.sid, session.sid());

    // Asked of a sub-session, a sub-session is derived from the session: a sibling.
    let sibling = sub.subsession().await.unwrap();
    assert_eq!(sibling.sid(), session.sid());
    assert_ne!(sibling.subsession_id(), Some(sub_id));
    sibling.sign_digest(&digest("receipt")).await.unwrap();
    session.sign_digest(&digest("receipt")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_proof_is_refused() {
    let fx = fixture().await;
    let (_device, session) = open_session(&fx).await;
    let body = serde_json::json!({ "digest": b64::encode(digest("once")) });
    let proof = session.proof(&Method::POST, SIGN_PATH).unwrap();
    let first: serde_json::Value = session.send_with_proof(Method::POST, SIGN_PATH, Some(&body), &proof).await.unwrap();
    assert!(first["signature"].is_string(), "{first}");
    let replayed =
        session.send_with_proof::<serde_json::Value>(Method::POST, SIGN_PATH, Some(&body), &proof).await.unwrap_err();
    assert_refused(&replayed, 401, "invalid_dpop_proof", "dpop-replayed");
    // The token is as good as before; only the proof was spent.
    session.sign_digest(&digest("once")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_the_session_stops_its_tokens_and_its_subsessions_tokens() {
    let fx = fixture().await;
    let (_device, session) = open_session(&fx).await;
    let sub = session.subsession().await.unwrap();
    sub.sign_digest(&digest("before")).await.unwrap();

    let ended = session.end().await.unwrap();
    assert_eq!(ended.sid, session.sid());
    assert_eq!(ended.sessions_ended, 2, "the session and its sub-session: {ended:?}");
    for handle in [&session, &sub] {
        let refused = handle.sign_digest(&digest("after")).await.unwrap_err();
        assert_refused(&refused, 401, "invalid_token", "session-ended");
    }
    let refused = session.subsession().await.unwrap_err();
    assert_refused(&refused, 400, "invalid_grant", "session-ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subsession_token_ends_its_whole_session() {
    let fx = fixture().await;
    let (_device, session) = open_session(&fx).await;
    let sub = session.subsession().await.unwrap();
    let ended = sub.end().await.unwrap();
    assert_eq!(ended.sid, session.sid());
    let refused = session.sign_digest(&digest("after")).await.unwrap_err();
    assert_refused(&refused, 401, "invalid_token", "session-ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_subsession_token_ends_only_that_subsession() {
    let fx = fixture().await;
    let (_device, session) = open_session(&fx).await;
    let (revoked, kept) = (session.subsession().await.unwrap(), session.subsession().await.unwrap());
    revoked.revoke().await.unwrap();
    let refused = revoked.sign_digest(&digest("after")).await.unwrap_err();
    assert_refused(&refused, 401, "invalid_token", "session-ended");
    kept.sign_digest(&digest("after")).await.unwrap();
    session.sign_digest(&digest("after")).await.unwrap();

    // Revoking the session's token ends the rest.
    session.revoke().await.unwrap();
    for handle in [&session, &kept] {
        let refused = handle.sign_digest(&digest("later")).await.unwrap_err();
        assert_refused(&refused, 401, "invalid_token", "session-ended");
    }
    // Revocation answers 200 for a token that is no longer good (RFC 7009 section 2.2).
    session.revoke().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_devices_tokens_are_refused() {
    let fx = fixture().await;
    let (mut device, session) = open_session(&fx).await;
    let sub = session.subsession().await.unwrap();
    let ticket = fx.attest(&mut device).await.unwrap().outcome.ticket;
    fx.admin.change_device_status(&device.device_id, "suspend", "reported stolen").await.unwrap();
    for handle in [&session, &sub] {
        let refused = handle.sign_digest(&digest("stolen")).await.unwrap_err();
        assert_refused(&refused, 401, "invalid_token", "device-not-active");
    }
    let refused = session.subsession().await.unwrap_err();
    assert_refused(&refused, 400, "invalid_grant", "device-not-active");
    let refused =
        TokenSession::open(&fx.device_client, Arc::clone(&device.identity), &ticket, Arc::new(SystemClock), &fx.rng)
            .await
            .unwrap_err();
    assert_refused(&refused, 400, "invalid_grant", "device-not-active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_ticket_gets_no_token() {
    let fx = fixture().await;
    let mut rooted = fx.device(&[Tamper::Root]).await;
    let refused = open(&fx, &mut rooted, Arc::new(SystemClock)).await.unwrap_err();
    assert_refused(&refused, 400, "invalid_grant", "ticket-denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_is_only_good_with_its_own_key() {
    let fx = fixture().await;
    let mut device = fx.device(&[]).await;
    let ticket = fx.attest(&mut device).await.unwrap().outcome.ticket;
    let other = fx.device(&[]).await;
    let refused =
        TokenSession::open(&fx.device_client, Arc::clone(&other.identity), &ticket, Arc::new(SystemClock), &fx.rng)
            .await
            .unwrap_err();
    assert!(matches!(refused, DeviceError::Untrusted(_)), "{refused}");
}

/// With tokens shorter-lived than the renewal margin, every use renews: a new session
/// from the ticket, and for a sub-session a new exchange under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_renew_before_they_expire() {
    let server = start_configured(|config: &mut Config| config.access_token_ttl_secs = 3).await;
    let fx = fixture_on(server, vouch_proto::enrol::DeviceKind::Terminal).await;
    let (_device, session) = open_session(&fx).await;
    let first_sid = session.sid();
    let signed = session.sign_digest(&digest("renewed")).await.unwrap();
    assert_ne!(session.sid(), first_sid, "a renewal opens a new session");
    assert_eq!(signed.claims.sid, session.sid(), "signed under the renewed token");

    let sub = session.subsession().await.unwrap();
    let first_sub = sub.subsession_id();
    let signed = sub.sign_digest(&digest("renewed")).await.unwrap();
    assert_ne!(sub.subsession_id(), first_sub);
    assert_eq!(signed.claims.subsession_id, sub.subsession_id());
    assert_eq!(signed.claims.sid, session.sid(), "renewed under the session's renewed token");
}

/// A device clock that can be moved forward.
#[derive(Debug, Default)]
struct MovableClock {
    ahead_secs: AtomicI64,
}

impl Clock for MovableClock {
    fn now_unix(&self) -> i64 {
        SystemClock.now_unix() + self.ahead_secs.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_ticket_asks_for_a_new_attestation() {
    let fx = fixture().await;
    let clock = Arc::new(MovableClock::default());
    let mut device = fx.device(&[]).await;
    let attestation = fx.attest(&mut device).await.unwrap();
    let ticket = &attestation.outcome.ticket;
    let open = || TokenSession::open(&fx.device_client, Arc::clone(&device.identity), ticket, clock.clone(), &fx.rng);
    let session = open().await.unwrap();
    let sub = session.subsession().await.unwrap();

    let past_ticket = attestation.outcome.expires_at - SystemClock.now_unix() + 1;
    clock.ahead_secs.store(past_ticket, Ordering::Relaxed);
    for handle in [&session, &sub] {
        let expired = handle.sign_digest(&digest("late")).await.unwrap_err();
        assert!(
            matches!(expired, DeviceError::TicketExpired { expired_at } if expired_at == attestation.outcome.expires_at),
            "{expired}"
        );
    }
    assert!(matches!(open().await.unwrap_err(), DeviceError::TicketExpired { .. }));
}

/// Nonces go stale after a window or two; a request made with a stale one is answered
/// with a fresh nonce and sent again, unseen by the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_nonce_is_replaced_without_the_caller_noticing() {
    let server = start_configured(|config: &mut Config| config.dpop_nonce_window_secs = 1).await;
    let fx = fixture_on(server, vouch_proto::enrol::DeviceKind::Terminal).await;
    let (device, session) = open_session(&fx).await;
    let stale = session.nonce().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    session.sign_digest(&digest("after a pause")).await.unwrap();
    assert_ne!(session.nonce().unwrap(), stale);

    // What the retry answered: a 401 challenge with a new nonce.
    let url = format!("{}{SIGN_PATH}", fx.server.url);
    let rng = &fx.rng;
    let token = session.access_token();
    let claims =
        ProofClaims::for_request("POST", &url, SystemClock.now_unix(), Some(&token), Some(&stale), rng).unwrap();
    let proof = sign_proof(&claims, device.identity.key(), rng).unwrap();
    let body = serde_json::json!({ "digest": b64::encode(digest("stale")) });
    let refused =
        session.send_with_proof::<serde_json::Value>(Method::POST, SIGN_PATH, Some(&body), &proof).await.unwrap_err();
    assert_refused(&refused, 401, "use_dpop_nonce", "use-dpop-nonce");
}
