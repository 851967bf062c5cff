//! token: sessions from attestation tickets, sub-sessions, DPoP-protected requests and
//! their refusals, one per check of RFC 9449 section 4.3 and per `invalid_grant` cause.

use axum::body::Body;
use axum::http::Request;
use serde_json::{Value, json};
use vouch_proto::attest::EarStatus;
use vouch_proto::crypto::{SystemRandom, sha256};
use vouch_proto::dpop::{ProofClaims, sign_proof};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::token::{
    ACCESS_TOKEN_TYP, AccessTokenClaims, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN,
    verify_access_token, verify_signed_digest,
};
use vouch_proto::{Clock, SigningKey, b64};

use crate::attest::{Attest, DeviceHealth, Enrolled, fixture};
use crate::support::{Reply, assert_problem};

const HOST: &str = "vouch.test";
const FORM: &str = "application/x-www-form-urlencoded";

/// An attested device, its ticket, and the latest nonce the server gave it.
pub struct Holder {
    pub fx: Attest,
    pub device: Enrolled,
    pub ticket: String,
    pub nonce: String,
    pub rng: SystemRandom,
}

/// A session token and what came with it.
pub struct Session {
    pub token: String,
    pub claims: AccessTokenClaims,
}

/// A protected POST of `body` to `path` with exactly these headers.
pub fn protected_request(path: &str, authorization: Option<String>, proofs: &[String], body: Value) -> Request<Body> {
    let mut request = Request::post(path).header("host", HOST).header("content-type", "application/json");
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    for proof in proofs {
        request = request.header("dpop", proof.as_str());
    }
    request.body(Body::from(body.to_string())).unwrap()
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.bytes().map(|b| format!("%{b:02X}")).collect::<String>()))
        .collect::<Vec<_>>()
        .join("&")
}

impl Holder {
    async fn new() -> Holder {
        Self::with_health(&DeviceHealth::clean()).await
    }

    async fn with_health(health: &DeviceHealth) -> Holder {
        Self::on(fixture().await, DeviceKind::Pos, health).await
    }

    /// A device of `kind` in `health`, enrolled and attested on `fx`.
    pub async fn on(fx: Attest, kind: DeviceKind, health: &DeviceHealth) -> Holder {
        let mut device = fx.enrol(kind).await;
        let verdict = fx.attest(&mut device, health).await;
        let ticket = verdict["ticket"].as_str().unwrap().to_owned();
        let nonce = fx.server.state.dpop.current_nonce(fx.clock.now_unix()).expect("nonces are required by default");
        Holder { fx, device, ticket, nonce, rng: SystemRandom::new() }
    }

    /// Moves the clock; the device then holds a nonce of the new time, as it would after
    /// any answer from the server.
    pub fn advance(&mut self, secs: i64) {
        self.fx.clock.advance(secs);
        self.nonce = self.fx.server.state.dpop.current_nonce(self.fx.clock.now_unix()).unwrap();
    }

    pub fn key(&self) -> &SigningKey {
        &self.device.device.key
    }

    pub fn proof_claims(&self, method: &str, path: &str, token: Option<&str>) -> ProofClaims {
        let uri = format!("http://{HOST}{path}");
        ProofClaims::for_request(method, &uri, self.fx.clock.now_unix(), token, Some(&self.nonce), &self.rng).unwrap()
    }

    pub fn proof(&self, method: &str, path: &str, token: Option<&str>) -> String {
        sign_proof(&self.proof_claims(method, path, token), self.key(), &self.rng).unwrap()
    }

    pub async fn send(&mut self, request: Request<Body>) -> Reply {
        let reply = self.fx.server.send(request).await;
        if let Some(nonce) = reply.headers.get("dpop-nonce") {
            self.nonce = nonce.to_str().unwrap().to_owned();
        }
        reply
    }

    pub async fn token_request(&mut self, proofs: &[&str], body: String) -> Reply {
        let mut request = Request::post("/v1/token").header("host", HOST).header("content-type", FORM);
        for proof in proofs {
            request = request.header("dpop", *proof);
        }
        self.send(request.body(Body::from(body)).unwrap()).await
    }

    pub async fn grant(&mut self, ticket: &str) -> Reply {
        let proof = self.proof("POST", "/v1/token", None);
        self.token_request(&[&proof], form(&[("grant_type", GRANT_JWT_BEARER), ("assertion", ticket)])).await
    }

    async fn exchange(&mut self, subject: &str) -> Reply {
        let proof = self.proof("POST", "/v1/token", None);
        let body = form(&[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", subject),
            ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
        ]);
        self.token_request(&[&proof], body).await
    }

    async fn verified(&self, token: &str) -> AccessTokenClaims {
        let jwks = self.fx.server.jwks().await;
        verify_access_token(token, |kid| jwks.find(kid).and_then(|k| k.verifying_key().ok()), &self.fx.clock).unwrap()
    }

    pub async fn session(&mut self) -> Session {
        let ticket = self.ticket.clone();
        let reply = self.grant(&ticket).await;
        assert_eq!(reply.status.as_u16(), 200, "grant: {}", reply.json);
        let token = reply.json["access_token"].as_str().unwrap().to_owned();
        Session { claims: self.verified(&token).await, token }
    }

    async fn subsession(&mut self, session: &Session) -> Session {
        let reply = self.exchange(&session.token).await;
        assert_eq!(reply.status.as_u16(), 200, "exchange: {}", reply.json);
        let token = reply.json["access_token"].as_str().unwrap().to_owned();
        Session { claims: self.verified(&token).await, token }
    }

    /// A protected request with exactly these headers.
    pub async fn protected(
        &mut self,
        path: &str,
        authorization: Option<String>,
        proofs: &[String],
        body: Value,
    ) -> Reply {
        self.send(protected_request(path, authorization, proofs, body)).await
    }

    pub fn digest_body() -> Value {
        json!({ "digest": b64::encode(sha256(b"receipt 0042: 12.50 EUR")) })
    }

    pub async fn sign(&mut self, token: &str) -> Reply {
        let proof = self.proof("POST", "/v1/sign", Some(token));
        self.protected("/v1/sign", Some(format!("DPoP {token}")), &[proof], Self::digest_body()).await
    }

    async fn end(&mut self, token: &str, sid: &str) -> Reply {
        let path = format!("/v1/sessions/{sid}/end");
        let proof = self.proof("POST", &path, Some(token));
        self.protected(&path, Some(format!("DPoP {token}")), &[proof], json!({})).await
    }

    async fn revoke(&mut self, token: &str) -> Reply {
        let proof = self.proof("POST", "/v1/revoke", None);
        let request = Request::post("/v1/revoke")
            .header("host", HOST)
            .header("content-type", FORM)
            .header("dpop", proof)
            .body(Body::from(form(&[("token", token), ("token_type_hint", "access_token")])))
            .unwrap();
        self.send(request).await
    }
}

fn assert_oauth(context: &str, reply: &Reply, status: u16, error: &str, problem: &str) {
    assert_problem(context, reply, status, problem);
    assert_eq!(reply.json["error"].as_str(), Some(error), "{context}: {}", reply.json);
    assert!(reply.json["error_description"].as_str().is_some_and(|d| !d.is_empty()), "{context}: {}", reply.json);
    if status == 401 {
        let challenge =
            reply.headers.get("www-authenticate").map(|h| h.to_str().unwrap().to_owned()).unwrap_or_default();
        assert!(challenge.starts_with(&format!("DPoP error=\"{error}\"")), "{context}: challenge {challenge:?}");
    }
}

#[tokio::test]
async fn a_session_token_is_bound_to_the_key_the_session_and_the_attestation() {
    let mut holder = Holder::new().await;
    let ticket = holder.fx.verified_ticket(&holder.ticket).await;
    let mark = holder.fx.server.audit_mark().await;

    holder.nonce = "a nonce from long ago".into();
    let ticket_jwt = holder.ticket.clone();
    let stale = holder.grant(&ticket_jwt).await;
    assert_oauth("stale nonce", &stale, 400, "use_dpop_nonce", "use-dpop-nonce");
    assert!(stale.headers.contains_key("dpop-nonce"), "use_dpop_nonce comes with a fresh nonce");

    let reply = holder.grant(&ticket_jwt).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.json);
    assert_eq!(reply.json["token_type"], "DPoP");
    assert_eq!(reply.headers.get("cache-control").unwrap(), "no-store");
    assert!(reply.headers.contains_key("dpop-nonce"));
    let token = reply.json["access_token"].as_str().unwrap();
    let claims = holder.verified(token).await;
    assert_eq!(vouch_proto::jws::UnverifiedJws::parse(token).unwrap().header().typ.as_deref(), Some(ACCESS_TOKEN_TYP));
    assert_eq!(claims.cnf.jkt, holder.key().verifying_key().thumbprint());
    assert_eq!(claims.sub, holder.device.device_id);
    assert_eq!(reply.json["sid"].as_str(), Some(claims.sid.as_str()));
    assert_eq!(claims.subsession_id, None);
    assert_eq!(
        (claims.ticket_id.as_str(), claims.ear_status, claims.risk),
        (ticket.jti.as_str(), EarStatus::Affirming, ticket.risk)
    );
    assert!(claims.exp <= ticket.exp, "a token never outlives its ticket");
    assert_eq!(reply.json["expires_in"].as_i64(), Some(claims.exp - holder.fx.clock.now_unix()));
    holder.fx.server.assert_audited("grant", mark, &[("token.session_opened", &claims.sid)]).await;
    holder.fx.server.assert_audit_intact("grant").await;
}

#[tokio::test]
async fn tokens_never_outlive_their_ticket() {
    let mut holder = Holder::new().await;
    holder.advance(900 - 30);
    let session = holder.session().await;
    let ticket = holder.fx.verified_ticket(&holder.ticket).await;
    assert_eq!(session.claims.exp, ticket.exp);
}

#[tokio::test]
async fn a_signed_digest_names_the_device_its_session_and_its_state() {
    let mut holder = Holder::new().await;
    let session = holder.session().await;
    let reply = holder.sign(&session.token).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.json);
    let jwks = holder.fx.server.jwks().await;
    let signed = verify_signed_digest(reply.json["signature"].as_str().unwrap(), |kid| {
        jwks.find(kid).and_then(|k| k.verifying_key().ok())
    })
    .unwrap();
    assert_eq!(signed.digest, Holder::digest_body()["digest"]);
    assert_eq!(signed.digest_alg, "sha-256");
    assert_eq!(
        (signed.sub.as_str(), signed.sid.as_str()),
        (holder.device.device_id.as_str(), session.claims.sid.as_str())
    );
    assert_eq!(
        (signed.ticket_id.as_str(), signed.ear_status),
        (session.claims.ticket_id.as_str(), EarStatus::Affirming)
    );
    assert_eq!(signed.cnf.jkt, session.claims.cnf.jkt);

    for (digest, why) in [("AAAA", "short"), ("!!!", "not base64url"), (&b64::encode([0u8; 48])[..], "48 bytes")] {
        let proof = holder.proof("POST", "/v1/sign", Some(&session.token));
        let reply = holder
            .protected("/v1/sign", Some(format!("DPoP {}", session.token)), &[proof], json!({ "digest": digest }))
            .await;
        assert_problem(why, &reply, 422, "invalid-digest");
    }
}

#[tokio::test]
async fn sub_sessions_share_the_key_and_end_with_their_session() {
    let mut holder = Holder::new().await;
    let session = holder.session().await;
    let first = holder.subsession(&session).await;
    let second = holder.subsession(&session).await;
    assert_eq!(first.claims.sid, session.claims.sid);
    assert_eq!(first.claims.cnf, session.claims.cnf);
    assert!(first.claims.subsession_id.is_some() && first.claims.subsession_id != second.claims.subsession_id);
    assert!(first.claims.exp <= session.claims.exp);
    assert_eq!(holder.sign(&first.token).await.status.as_u16(), 200);

    let nested = holder.exchange(&first.token).await;
    assert_oauth("sub-session of a sub-session", &nested, 400, "invalid_grant", "not-a-session-token");

    let mark = holder.fx.server.audit_mark().await;
    let ended = holder.end(&first.token, &session.claims.sid).await;
    assert_eq!(ended.status.as_u16(), 200, "{}", ended.json);
    assert_eq!(ended.json["sessions_ended"], 3);
    holder.fx.server.assert_audited("end", mark, &[("token.session_ended", &session.claims.sid)]).await;
    for (token, name) in [(&session.token, "session"), (&first.token, "first"), (&second.token, "second")] {
        assert_oauth(name, &holder.sign(token).await, 401, "invalid_token", "session-ended");
    }
    assert_oauth("exchange after end", &holder.exchange(&session.token).await, 400, "invalid_grant", "session-ended");
}

#[tokio::test]
async fn a_session_is_ended_only_by_its_own_tokens() {
    let mut holder = Holder::new().await;
    let mine = holder.session().await;
    let other = holder.session().await;
    let refused = holder.end(&mine.token, &other.claims.sid).await;
    assert_problem("someone else's session", &refused, 403, "not-your-session");
    assert_eq!(holder.sign(&other.token).await.status.as_u16(), 200);
}

#[tokio::test]
async fn revoking_a_sub_session_token_ends_only_that_sub_session() {
    let mut holder = Holder::new().await;
    let session = holder.session().await;
    let revoked = holder.subsession(&session).await;
    let kept = holder.subsession(&session).await;
    let reply = holder.revoke(&revoked.token).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.text);
    assert_oauth("revoked", &holder.sign(&revoked.token).await, 401, "invalid_token", "session-ended");
    assert_eq!(holder.sign(&kept.token).await.status.as_u16(), 200);
    assert_eq!(holder.sign(&session.token).await.status.as_u16(), 200);

    assert_eq!(holder.revoke(&session.token).await.status.as_u16(), 200);
    for token in [&session.token, &kept.token] {
        assert_oauth("session revoked", &holder.sign(token).await, 401, "invalid_token", "session-ended");
    }
    assert_eq!(holder.revoke("not a token").await.status.as_u16(), 200, "RFC 7009: invalid tokens are not an error");
}

#[tokio::test]
async fn revocation_needs_the_key_the_token_is_bound_to() {
    let mut holder = Holder::new().await;
    let session = holder.session().await;
    let thief = SigningKey::generate(&holder.rng).unwrap();
    let proof = sign_proof(&holder.proof_claims("POST", "/v1/revoke", None), &thief, &holder.rng).unwrap();
    let request = Request::post("/v1/revoke")
        .header("host", HOST)
        .header("content-type", FORM)
        .header("dpop", proof)
        .body(Body::from(form(&[("token", &session.token)])))
        .unwrap();
    assert_oauth("thief", &holder.send(request).await, 400, "invalid_dpop_proof", "dpop-key-mismatch");
    assert_eq!(holder.sign(&session.token).await.status.as_u16(), 200);
}

#[tokio::test]
async fn a_suspended_device_s_tokens_stop_at_once() {
    let mut holder = Holder::new().await;
    let session = holder.session().await;
    holder.fx.change_status(&holder.device.device_id, "suspend").await;
    assert_oauth("suspended", &holder.sign(&session.token).await, 401, "invalid_token", "device-not-active");
    assert_oauth("exchange", &holder.exchange(&session.token).await, 400, "invalid_grant", "device-not-active");
    holder.fx.change_status(&holder.device.device_id, "reactivate").await;
    assert_eq!(holder.sign(&session.token).await.status.as_u16(), 200);
}

/// Every check of RFC 9449 section 4.3 at a protected resource, each refused with its
/// own reason.
#[tokio::test]
async fn each_dpop_check_at_a_protected_resource_has_its_own_reason() {
    let mut holder = Holder::new().await;
    let session = holder.session().await;
    let token = session.token.clone();
    let auth = Some(format!("DPoP {token}"));
    let thief = SigningKey::generate(&holder.rng).unwrap();
    let good = || holder.proof_claims("POST", "/v1/sign", Some(&token));
    let sign = |claims: &ProofClaims, key: &SigningKey| sign_proof(claims, key, &holder.rng).unwrap();
    let forge = |header: Value, claims: Value| {
        let input = format!("{}.{}", b64::encode(header.to_string()), b64::encode(claims.to_string()));
        let signature = holder.key().sign(&holder.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", b64::encode(signature))
    };
    let jwk = serde_json::to_value(holder.key().verifying_key().to_jwk()).unwrap();
    let claims_json = serde_json::to_value(good()).unwrap();
    let mut private_jwk = jwk.clone();
    private_jwk["d"] = json!("c2VjcmV0");
    let mut no_htu = claims_json.clone();
    no_htu.as_object_mut().unwrap().remove("htu");
    let now = holder.fx.clock.now_unix();
    let with = |edit: &dyn Fn(&mut ProofClaims)| {
        let mut claims = good();
        edit(&mut claims);
        sign(&claims, holder.key())
    };
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        ("no proof", vec![], "invalid_dpop_proof", "dpop-missing"),
        (
            "two proofs",
            vec![sign(&good(), holder.key()), sign(&good(), holder.key())],
            "invalid_dpop_proof",
            "dpop-multiple",
        ),
        ("not a JWT", vec!["garbage".into()], "invalid_dpop_proof", "dpop-format"),
        (
            "typ JWT",
            vec![forge(json!({"typ": "JWT", "alg": "ES256", "jwk": jwk}), claims_json.clone())],
            "invalid_dpop_proof",
            "dpop-typ",
        ),
        (
            "alg none",
            vec![forge(json!({"typ": "dpop+jwt", "alg": "none", "jwk": jwk}), claims_json.clone())],
            "invalid_dpop_proof",
            "dpop-alg",
        ),
        (
            "alg HS256",
            vec![forge(json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}), claims_json.clone())],
            "invalid_dpop_proof",
            "dpop-alg",
        ),
        (
            "no jwk",
            vec![forge(json!({"typ": "dpop+jwt", "alg": "ES256"}), claims_json.clone())],
            "invalid_dpop_proof",
            "dpop-jwk",
        ),
        (
            "private jwk",
            vec![forge(json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": private_jwk}), claims_json.clone())],
            "invalid_dpop_proof",
            "dpop-jwk",
        ),
        (
            "jwk of another key",
            vec![forge(
                json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": thief.verifying_key().to_jwk()}),
                claims_json.clone(),
            )],
            "invalid_dpop_proof",
            "dpop-signature",
        ),
        (
            "no htu",
            vec![forge(json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}), no_htu)],
            "invalid_dpop_proof",
            "dpop-claims",
        ),
        ("htm GET", vec![with(&|c| c.htm = "GET".into())], "invalid_dpop_proof", "dpop-htm"),
        (
            "htu of another endpoint",
            vec![with(&|c| c.htu = format!("http://{HOST}/v1/token"))],
            "invalid_dpop_proof",
            "dpop-htu",
        ),
        (
            "htu of another server",
            vec![with(&|c| c.htu = "http://elsewhere.test/v1/sign".into())],
            "invalid_dpop_proof",
            "dpop-htu",
        ),
        ("iat too old", vec![with(&|c| c.iat = now - 61)], "invalid_dpop_proof", "dpop-iat"),
        ("iat in the future", vec![with(&|c| c.iat = now + 61)], "invalid_dpop_proof", "dpop-iat"),
        ("no nonce", vec![with(&|c| c.nonce = None)], "use_dpop_nonce", "use-dpop-nonce"),
        ("forged nonce", vec![with(&|c| c.nonce = Some(b64::encode([1u8; 24])))], "use_dpop_nonce", "use-dpop-nonce"),
        ("no ath", vec![with(&|c| c.ath = None)], "invalid_dpop_proof", "dpop-ath"),
        (
            "ath of another token",
            vec![with(&|c| c.ath = Some(b64::encode(sha256(b"other"))))],
            "invalid_dpop_proof",
            "dpop-ath",
        ),
        ("proof by another key", vec![sign(&good(), &thief)], "invalid_dpop_proof", "dpop-key-mismatch"),
    ];
    for (name, proofs, error, problem) in cases {
        let reply = holder.protected("/v1/sign", auth.clone(), &proofs, Holder::digest_body()).await;
        assert_oauth(name, &reply, 401, error, problem);
        if error == "use_dpop_nonce" {
            assert!(reply.headers.contains_key("dpop-nonce"), "{name}: a fresh nonce comes with the refusal");
        }
    }

    let proof = holder.proof("POST", "/v1/sign", Some(&token));
    assert_eq!(
        holder
            .protected("/v1/sign", auth.clone(), std::slice::from_ref(&proof), Holder::digest_body())
            .await
            .status
            .as_u16(),
        200
    );
    let replay = holder.protected("/v1/sign", auth.clone(), &[proof], Holder::digest_body()).await;
    assert_oauth("replayed proof", &replay, 401, "invalid_dpop_proof", "dpop-replayed");

    let proof = holder.proof("POST", "/v1/sign", Some(&token));
    let bearer = holder
        .protected("/v1/sign", Some(format!("Bearer {token}")), std::slice::from_ref(&proof), Holder::digest_body())
        .await;
    assert_oauth("token as bearer", &bearer, 401, "invalid_token", "invalid-credentials");
    let missing = holder.protected("/v1/sign", None, &[proof], Holder::digest_body()).await;
    assert_problem("no Authorization", &missing, 401, "missing-credentials");
    assert_eq!(missing.headers.get("www-authenticate").unwrap(), "DPoP algs=\"ES256\"");
    let forged = format!("{}x", &token[..token.len() - 1]);
    let proof = holder.proof("POST", "/v1/sign", Some(&forged));
    let reply = holder.protected("/v1/sign", Some(format!("DPoP {forged}")), &[proof], Holder::digest_body()).await;
    assert_oauth("forged token", &reply, 401, "invalid_token", "invalid-token");

    holder.advance(601);
    let proof = holder.proof("POST", "/v1/sign", Some(&token));
    assert_oauth(
        "expired token",
        &holder.protected("/v1/sign", auth, &[proof], Holder::digest_body()).await,
        401,
        "invalid_token",
        "invalid-token",
    );
}

/// Each cause of `invalid_grant`, and the token endpoint's own refusals.
#[tokio::test]
async fn each_refused_grant_names_its_cause() {
    let mut holder = Holder::new().await;
    let ticket = holder.ticket.clone();
    let session = holder.session().await;
    let sub = holder.subsession(&session).await;

    let thief = SigningKey::generate(&holder.rng).unwrap();
    let thief_proof = sign_proof(&holder.proof_claims("POST", "/v1/token", None), &thief, &holder.rng).unwrap();
    let reply =
        holder.token_request(&[&thief_proof], form(&[("grant_type", GRANT_JWT_BEARER), ("assertion", &ticket)])).await;
    assert_oauth("ticket for another key", &reply, 400, "invalid_grant", "ticket-bound-to-another-key");
    let thief_proof = sign_proof(&holder.proof_claims("POST", "/v1/token", None), &thief, &holder.rng).unwrap();
    let body = form(&[
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", &session.token),
        ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
    ]);
    assert_oauth(
        "subject for another key",
        &holder.token_request(&[&thief_proof], body).await,
        400,
        "invalid_grant",
        "subject-token-bound-to-another-key",
    );

    assert_oauth(
        "not a ticket",
        &holder.grant("eyJhbGciOiJFUzI1NiJ9.e30.AAAA").await,
        400,
        "invalid_grant",
        "invalid-ticket",
    );
    assert_oauth(
        "an access token as ticket",
        &holder.grant(&session.token).await,
        400,
        "invalid_grant",
        "invalid-ticket",
    );
    assert_oauth(
        "sub-session as subject",
        &holder.exchange(&sub.token).await,
        400,
        "invalid_grant",
        "not-a-session-token",
    );
    assert_oauth("ticket as subject", &holder.exchange(&ticket).await, 400, "invalid_grant", "invalid-subject-token");

    let proof = holder.proof("POST", "/v1/token", None);
    let cases = [
        (
            "unknown grant",
            form(&[("grant_type", "password"), ("username", "x")]),
            "unsupported_grant_type",
            "unsupported-grant-type",
        ),
        ("no assertion", form(&[("grant_type", GRANT_JWT_BEARER)]), "invalid_request", "missing-parameter"),
        ("no subject", form(&[("grant_type", GRANT_TOKEN_EXCHANGE)]), "invalid_request", "missing-parameter"),
        (
            "subject of another type",
            form(&[
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("subject_token", &session.token),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ]),
            "invalid_request",
            "unsupported-token-type",
        ),
        ("no grant_type", form(&[("assertion", &ticket)]), "invalid_request", "invalid-form"),
    ];
    for (name, body, error, problem) in cases {
        assert_oauth(name, &holder.token_request(&[&proof], body).await, 400, error, problem);
    }
    let json_body = Request::post("/v1/token")
        .header("host", HOST)
        .header("content-type", "application/json")
        .header("dpop", holder.proof("POST", "/v1/token", None))
        .body(Body::from(json!({"grant_type": GRANT_JWT_BEARER, "assertion": ticket}).to_string()))
        .unwrap();
    assert_oauth("JSON body", &holder.send(json_body).await, 415, "invalid_request", "unsupported-media-type");

    let wrong_htu = holder.proof("POST", "/v1/sign", None);
    let body = form(&[("grant_type", GRANT_JWT_BEARER), ("assertion", &ticket)]);
    assert_oauth(
        "proof for another endpoint",
        &holder.token_request(&[&wrong_htu], body.clone()).await,
        400,
        "invalid_dpop_proof",
        "dpop-htu",
    );
    assert_oauth("no proof", &holder.token_request(&[], body.clone()).await, 400, "invalid_dpop_proof", "dpop-missing");
    let proof = holder.proof("POST", "/v1/token", None);
    assert_eq!(holder.token_request(&[&proof], body.clone()).await.status.as_u16(), 200);
    assert_oauth(
        "replayed proof",
        &holder.token_request(&[&proof], body).await,
        400,
        "invalid_dpop_proof",
        "dpop-replayed",
    );

    holder.fx.change_status(&holder.device.device_id, "suspend").await;
    assert_oauth("suspended device", &holder.grant(&ticket).await, 400, "invalid_grant", "device-not-active");
    holder.fx.change_status(&holder.device.device_id, "reactivate").await;
    holder.advance(901);
    assert_oauth("expired ticket", &holder.grant(&ticket).await, 400, "invalid_grant", "ticket-expired");
    assert_oauth(
        "expired subject",
        &holder.exchange(&session.token).await,
        400,
        "invalid_grant",
        "subject-token-expired",
    );
    holder.fx.server.assert_audit_intact("refusals").await;
}

#[tokio::test]
async fn a_denial_ticket_gets_no_token() {
    let mut health = DeviceHealth::clean();
    health.rooted = true;
    let mut holder = Holder::with_health(&health).await;
    let ticket = holder.ticket.clone();
    assert_eq!(holder.fx.verified_ticket(&ticket).await.ear_status, EarStatus::Contraindicated);
    let mark = holder.fx.server.audit_mark().await;
    assert_oauth("denial", &holder.grant(&ticket).await, 400, "invalid_grant", "ticket-denied");
    holder.fx.server.assert_audited("denial", mark, &[("token.grant_refused", &holder.device.device_id)]).await;
}

#[tokio::test]
async fn a_configured_public_url_is_what_htu_must_name() {
    let fx = crate::attest::bare_fixture(|config| config.public_url = Some("https://vouch.example".into())).await;
    fx.put_reference(&crate::attest::reference_values(crate::attest::FIRMWARE)).await;
    let mut device = fx.enrol(DeviceKind::Pos).await;
    let ticket = fx.attest(&mut device, &DeviceHealth::clean()).await["ticket"].as_str().unwrap().to_owned();
    let nonce = fx.server.state.dpop.current_nonce(fx.clock.now_unix()).unwrap();
    let rng = SystemRandom::new();
    let body = form(&[("grant_type", GRANT_JWT_BEARER), ("assertion", &ticket)]);
    let mut statuses = Vec::new();
    for uri in ["http://vouch.test/v1/token", "https://vouch.example/v1/token", "https://VOUCH.example:443/v1/token"] {
        let claims = ProofClaims::for_request("POST", uri, fx.clock.now_unix(), None, Some(&nonce), &rng).unwrap();
        let request = Request::post("/v1/token")
            .header("host", HOST)
            .header("content-type", FORM)
            .header("dpop", sign_proof(&claims, &device.device.key, &rng).unwrap())
            .body(Body::from(body.clone()))
            .unwrap();
        statuses.push(fx.server.send(request).await.status.as_u16());
    }
    assert_eq!(statuses, [400, 200, 200]);
}

/// Two servers on one database: a proof used at one is refused at the other.
#[tokio::test]
async fn a_proof_is_single_use_across_instances() {
    let mut holder = Holder::new().await;
    let session = holder.session().await;
    let second = vouch_server::router(
        vouch_server::build_state_with_clock(
            holder.fx.server.state.config.as_ref().clone(),
            None,
            std::sync::Arc::new(holder.fx.clock.clone()),
        )
        .await
        .unwrap(),
    );
    let proof = holder.proof("POST", "/v1/sign", Some(&session.token));
    let request = || {
        Request::post("/v1/sign")
            .header("host", HOST)
            .header("content-type", "application/json")
            .header("authorization", format!("DPoP {}", session.token))
            .header("dpop", proof.as_str())
            .body(Body::from(Holder::digest_body().to_string()))
            .unwrap()
    };
    assert_eq!(holder.send(request()).await.status.as_u16(), 200);
    let replayed = tower::ServiceExt::oneshot(second, request()).await.unwrap();
    assert_eq!(replayed.status().as_u16(), 401);
}

#[tokio::test]
async fn malformed_and_oversized_bodies_are_problem_documents() {
    let mut holder = Holder::new().await;
    let session = holder.session().await;
    let auth = Some(format!("DPoP {}", session.token));
    for (name, body, status, problem) in [
        ("not JSON", json!("{\"digest\":"), 400, "malformed-json"),
        ("an array", json!([1, 2]), 422, "invalid-body"),
        ("unknown member", json!({"digest": "x", "extra": 1}), 422, "invalid-body"),
        ("wrong type", json!({"digest": 7}), 422, "invalid-body"),
    ] {
        let proof = holder.proof("POST", "/v1/sign", Some(&session.token));
        let request = Request::post("/v1/sign")
            .header("host", HOST)
            .header("content-type", "application/json")
            .header("authorization", auth.clone().unwrap())
            .header("dpop", proof)
            .body(Body::from(match &body {
                Value::String(raw) => raw.clone(),
                other => other.to_string(),
            }))
            .unwrap();
        assert_problem(name, &holder.send(request).await, status, problem);
    }
    let proof = holder.proof("POST", "/v1/token", None);
    let huge = format!("grant_type={GRANT_JWT_BEARER}&assertion={}", "a".repeat(128 * 1024));
    assert_oauth(
        "oversized form",
        &holder.token_request(&[&proof], huge).await,
        413,
        "invalid_request",
        "body-too-large",
    );
    let proof = holder.proof("POST", "/v1/token", None);
    let twice = format!("grant_type={GRANT_JWT_BEARER}&grant_type=password");
    assert_oauth(
        "a parameter twice",
        &holder.token_request(&[&proof], twice).await,
        400,
        "invalid_request",
        "invalid-form",
    );
}

/// The verification cache never outlives the key: once the signing key is withdrawn
/// from the JWK Set, its tokens fail even though they verified before.
#[tokio::test]
async fn a_cached_token_fails_once_its_signing_key_is_withdrawn() {
    let mut holder = Holder::new().await;
    let session = holder.session().await;
    assert_eq!(holder.sign(&session.token).await.status.as_u16(), 200);
    let keys = holder.fx.server.state.keys.clone();
    keys.rotate(holder.fx.clock.now_unix(), 0, "test").await.unwrap();
    holder.advance(1);
    keys.refresh(holder.fx.clock.now_unix()).await.unwrap();
    assert_oauth("withdrawn key", &holder.sign(&session.token).await, 401, "invalid_token", "invalid-token");
    assert_oauth(
        "ticket of the withdrawn key",
        &holder.grant(&holder.ticket.clone()).await,
        400,
        "invalid_grant",
        "invalid-ticket",
    );
    let verdict = holder.fx.attest(&mut holder.device, &DeviceHealth::clean()).await;
    holder.ticket = verdict["ticket"].as_str().unwrap().to_owned();
    let fresh = holder.session().await;
    assert_eq!(holder.sign(&fresh.token).await.status.as_u16(), 200, "tokens of the new key work");
}
