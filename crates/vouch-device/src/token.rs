//! Bound access tokens on the device side. A [`TokenSession`] opens a session with an
//! attestation ticket (RFC 7523 JWT bearer grant), derives sub-sessions from it
//! (RFC 8693 token exchange), proves possession of the device key with a fresh DPoP
//! proof on every request (RFC 9449), follows the server's nonces, renews its token
//! before it expires, and ends or revokes (RFC 7009) what it opened.
//!
//! Every token and signature the server returns is checked against the published JWK
//! Set, bound to this device's key, before it is trusted.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::json;
use vouch_proto::attest::verify_ticket;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::dpop::{ProofClaims, sign_proof};
use vouch_proto::token::{
    AccessTokenClaims, DIGEST_ALG_SHA256, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE, SignedDigestClaims,
    TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_DPOP, verify_access_token, verify_signed_digest,
};
use vouch_proto::{Clock, JwkSet, ProtoError, VerifyingKey, b64};

pub use reqwest::Method;

use crate::client::{Auth, Body, Reply, path_segment};
use crate::{DeviceError, DeviceIdentity, VouchClient};

pub const TOKEN_PATH: &str = "/v1/token";
pub const REVOKE_PATH: &str = "/v1/revoke";
pub const SIGN_PATH: &str = "/v1/sign";
/// A token this close to its expiry is renewed before use, so that it cannot expire
/// on its way to the server.
pub const RENEW_MARGIN_SECS: i64 = 5;
/// How many times one request is sent again with a nonce the server just gave.
const NONCE_RETRIES_MAX: usize = 1;
const DPOP_NONCE_HEADER: &str = "DPoP-Nonce";
const DPOP_SCHEME: &str = "DPoP";
const USE_DPOP_NONCE: &str = "use_dpop_nonce";
const TICKET_EXPIRED_REASON: &str = "ticket-expired";

/// A digest the server signed for this device (`POST /v1/sign`), checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedDigest {
    /// Compact JWS, `typ` `vouch-signed-digest+jwt`.
    pub signature: String,
    pub claims: SignedDigestClaims,
}

/// The answer to `POST /v1/sessions/{sid}/end`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionEnded {
    pub sid: String,
    pub ended_at: i64,
    /// The session and the sub-sessions that were still open.
    pub sessions_ended: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    sid: String,
    #[serde(default)]
    subsession_id: Option<String>,
    #[serde(default)]
    issued_token_type: Option<String>,
}

#[derive(Deserialize)]
struct SignResponse {
    signature: String,
}

/// What every handle of one opened session shares: the server, the device key, the
/// latest server nonce and the published keys.
#[derive(Debug)]
struct Shared {
    client: VouchClient,
    identity: Arc<DeviceIdentity>,
    /// RFC 7638 thumbprint of the device key: every token must be bound to it.
    jkt: String,
    device_id: String,
    clock: Arc<dyn Clock>,
    rng: SystemRandom,
    /// The latest `DPoP-Nonce` the server sent.
    nonce: Mutex<Option<String>>,
    jwks: Mutex<Option<JwkSet>>,
}

/// The attestation ticket a session was opened with; it also renews the session.
#[derive(Debug)]
struct Ticket {
    jwt: String,
    id: String,
    expires_at: i64,
}

#[derive(Clone)]
struct Grant {
    access_token: String,
    claims: AccessTokenClaims,
}

struct State {
    grant: Grant,
    /// Ended or revoked by this device: never renewed again.
    ended: bool,
}

/// A session with the server, or a sub-session of one, holding a DPoP-bound access
/// token. Clones share the token, so a renewal by one is seen by all.
///
/// A session renews itself with its ticket, which opens a new session (a new `sid`);
/// a sub-session renews by exchanging its parent's current token. Once its ticket has
/// expired a session fails with [`DeviceError::TicketExpired`]: attest again.
#[derive(Clone)]
pub struct TokenSession {
    shared: Arc<Shared>,
    ticket: Arc<Ticket>,
    /// The session a sub-session was derived from; `None` for a session.
    parent: Option<Box<TokenSession>>,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for TokenSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("TokenSession")
            .field("device_id", &self.shared.device_id)
            .field("sid", &state.grant.claims.sid)
            .field("subsession_id", &state.grant.claims.subsession_id)
            .field("exp", &state.grant.claims.exp)
            .field("ended", &state.ended)
            .finish_non_exhaustive()
    }
}

impl TokenSession {
    /// Opens a session with an attestation ticket whose `cnf` is `identity`'s key.
    /// The ticket is checked against the published keys first; an expired one gives
    /// [`DeviceError::TicketExpired`], a denial the server's `invalid_grant`.
    pub async fn open(
        client: &VouchClient,
        identity: Arc<DeviceIdentity>,
        ticket: &str,
        clock: Arc<dyn Clock>,
        rng: &SystemRandom,
    ) -> Result<Self, DeviceError> {
        let mut shared = Shared {
            client: client.clone(),
            jkt: identity.jwk().thumbprint(),
            identity,
            device_id: String::new(),
            clock,
            rng: rng.clone(),
            nonce: Mutex::new(None),
            jwks: Mutex::new(None),
        };
        let checked = shared.with_published_keys(|jwks| verify_ticket(ticket, key_lookup(jwks), &*shared.clock)).await;
        let claims = match checked {
            Err(DeviceError::Proto(ProtoError::Expired { exp, .. })) => {
                return Err(DeviceError::TicketExpired { expired_at: exp });
            }
            other => other?,
        };
        if claims.cnf.jkt != shared.jkt {
            return Err(DeviceError::Untrusted("the ticket is bound to another key than this device's".into()));
        }
        shared.device_id = claims.sub;
        let ticket = Ticket { jwt: ticket.to_owned(), id: claims.jti, expires_at: claims.exp };
        let grant = shared.grant_session(&ticket).await?;
        Ok(TokenSession {
            shared: Arc::new(shared),
            ticket: Arc::new(ticket),
            parent: None,
            state: Arc::new(Mutex::new(State { grant, ended: false })),
        })
    }

    /// Derives a sub-session by exchanging the session's token (sub-sessions derive
    /// from the session, never from another sub-session, so on a sub-session handle
    /// this makes a sibling). It shares the key and the nonce, and ends with the
    /// session.
    pub async fn subsession(&self) -> Result<TokenSession, DeviceError> {
        let mut session = self;
        while let Some(parent) = &session.parent {
            session = parent;
        }
        let subject = session.current().await?;
        let grant = self.shared.exchange(&subject).await?;
        Ok(TokenSession {
            shared: Arc::clone(&self.shared),
            ticket: Arc::clone(&self.ticket),
            parent: Some(Box::new(session.clone())),
            state: Arc::new(Mutex::new(State { grant, ended: false })),
        })
    }

    /// Has the server sign a SHA-256 `digest` for this device and session, and checks
    /// the signature names them.
    pub async fn sign_digest(&self, digest: &[u8; 32]) -> Result<SignedDigest, DeviceError> {
        let grant = self.current().await?;
        let body = json!({ "digest": b64::encode(digest) });
        let SignResponse { signature } = self.request_with(&grant, Method::POST, SIGN_PATH, Body::Json(&body)).await?;
        let claims = self.shared.with_published_keys(|jwks| verify_signed_digest(&signature, key_lookup(jwks))).await?;
        let expected = &grant.claims;
        if claims.sub != self.shared.device_id
            || claims.cnf.jkt != self.shared.jkt
            || claims.sid != expected.sid
            || claims.subsession_id != expected.subsession_id
            || claims.ticket_id != expected.ticket_id
        {
            return Err(DeviceError::Untrusted("the signed digest names another device or session".into()));
        }
        if claims.digest != b64::encode(digest) || claims.digest_alg != DIGEST_ALG_SHA256 {
            return Err(DeviceError::Untrusted("the signature is over another digest".into()));
        }
        Ok(SignedDigest { signature, claims })
    }

    /// A DPoP-protected request to `path` with a JSON body, for any capability's
    /// endpoint: the token is renewed first if it is about to expire, and a request
    /// the server answers with a new nonce is sent once more with it.
    pub async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, DeviceError> {
        let grant = self.current().await?;
        self.request_with(&grant, method, path, body.map_or(Body::Empty, Body::Json)).await
    }

    /// Ends the session this handle belongs to, with all its sub-sessions.
    pub async fn end(&self) -> Result<SessionEnded, DeviceError> {
        let grant = self.current().await?;
        let path = format!("/v1/sessions/{}/end", path_segment(&grant.claims.sid));
        let ended: SessionEnded = self.request_with(&grant, Method::POST, &path, Body::Empty).await?;
        lock(&self.state).ended = true;
        if let Some(session) = &self.parent {
            lock(&session.state).ended = true;
        }
        if ended.sid != grant.claims.sid {
            return Err(DeviceError::Untrusted("the server ended another session".into()));
        }
        Ok(ended)
    }

    /// Revokes this handle's token (RFC 7009): a session's ends the session and its
    /// sub-sessions, a sub-session's ends only that sub-session.
    pub async fn revoke(&self) -> Result<(), DeviceError> {
        let token = self.access_token();
        let form = [("token", token.as_str()), ("token_type_hint", "access_token")];
        let reply = self.shared.send(Method::POST, REVOKE_PATH, None, Body::Form(&form)).await?;
        finish::<IgnoredAny>(reply)?;
        lock(&self.state).ended = true;
        Ok(())
    }

    /// A proof for one request to `path` with the current token and nonce, as
    /// [`TokenSession::request`] makes them. With [`TokenSession::send_with_proof`]
    /// it lets a caller see what the server does with a proof sent twice.
    pub fn proof(&self, method: &Method, path: &str) -> Result<String, DeviceError> {
        self.shared.proof(method, path, Some(&self.access_token()))
    }

    /// Sends exactly one protected request with `proof` and the current token: no
    /// renewal, no retry.
    pub async fn send_with_proof<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        proof: &str,
    ) -> Result<T, DeviceError> {
        let token = self.access_token();
        let auth = Auth::Dpop { proof, access_token: Some(&token) };
        let reply = self.shared.client.execute(method, path, auth, body.map_or(Body::Empty, Body::Json)).await?;
        self.shared.remember_nonce(&reply);
        finish(reply)
    }

    /// The current access token (JWT, `typ` `at+jwt`).
    pub fn access_token(&self) -> String {
        lock(&self.state).grant.access_token.clone()
    }

    /// The current token's claims, as checked when it was issued.
    pub fn claims(&self) -> AccessTokenClaims {
        lock(&self.state).grant.claims.clone()
    }

    pub fn sid(&self) -> String {
        lock(&self.state).grant.claims.sid.clone()
    }

    /// Set on sub-session handles.
    pub fn subsession_id(&self) -> Option<String> {
        lock(&self.state).grant.claims.subsession_id.clone()
    }

    pub fn device_id(&self) -> &str {
        &self.shared.device_id
    }

    /// The latest `DPoP-Nonce` the server sent.
    pub fn nonce(&self) -> Option<String> {
        lock(&self.shared.nonce).clone()
    }

    pub(crate) fn clock(&self) -> &dyn Clock {
        &*self.shared.clock
    }

    /// The device key the session proves possession of; capabilities that sign for the
    /// device (an offline approval) sign with it too.
    pub(crate) fn identity(&self) -> &DeviceIdentity {
        &self.shared.identity
    }

    pub(crate) fn client(&self) -> &VouchClient {
        &self.shared.client
    }

    /// Checks an object the server signed against the published keys this session
    /// holds, fetching them again when it names a key published since.
    pub(crate) async fn check_signed<T>(
        &self,
        check: impl Fn(&dyn Fn(&str) -> Option<VerifyingKey>) -> Result<T, ProtoError>,
    ) -> Result<T, DeviceError> {
        self.shared.with_published_keys(|jwks| check(&key_lookup(jwks))).await
    }

    /// The token to use now, renewed if it is about to expire.
    async fn current(&self) -> Result<Grant, DeviceError> {
        let (grant, ended) = {
            let state = lock(&self.state);
            (state.grant.clone(), state.ended)
        };
        if ended {
            return Ok(grant);
        }
        match renewal(self.shared.clock.now_unix(), grant.claims.exp, self.ticket.expires_at) {
            Renewal::NotNeeded => Ok(grant),
            Renewal::TicketExpired => Err(DeviceError::TicketExpired { expired_at: self.ticket.expires_at }),
            Renewal::Needed => {
                let renewed = match &self.parent {
                    None => self.shared.grant_session(&self.ticket).await?,
                    Some(parent) => {
                        let subject = Box::pin(parent.current()).await?;
                        self.shared.exchange(&subject).await?
                    }
                };
                lock(&self.state).grant = renewed.clone();
                Ok(renewed)
            }
        }
    }

    async fn request_with<T: DeserializeOwned>(
        &self,
        grant: &Grant,
        method: Method,
        path: &str,
        body: Body<'_>,
    ) -> Result<T, DeviceError> {
        finish(self.shared.send(method, path, Some(&grant.access_token), body).await?)
    }
}

impl Shared {
    /// RFC 7523 grant: a new session for the ticket.
    async fn grant_session(&self, ticket: &Ticket) -> Result<Grant, DeviceError> {
        let form = [("grant_type", GRANT_JWT_BEARER), ("assertion", ticket.jwt.as_str())];
        let response: TokenResponse = match finish(self.send(Method::POST, TOKEN_PATH, None, Body::Form(&form)).await?)
        {
            // Expired by the server's clock, not yet by this device's.
            Err(e) if e.problem_reason() == Some(TICKET_EXPIRED_REASON) => {
                return Err(DeviceError::TicketExpired { expired_at: ticket.expires_at });
            }
            other => other?,
        };
        let grant = self.accept(response).await?;
        if grant.claims.subsession_id.is_some() || grant.claims.ticket_id != ticket.id {
            return Err(DeviceError::Untrusted("the token is not for a session on this ticket".into()));
        }
        Ok(grant)
    }

    /// RFC 8693 exchange: a sub-session of `subject`'s session.
    async fn exchange(&self, subject: &Grant) -> Result<Grant, DeviceError> {
        let form = [
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", subject.access_token.as_str()),
            ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
        ];
        let response: TokenResponse = finish(self.send(Method::POST, TOKEN_PATH, None, Body::Form(&form)).await?)?;
        if response.issued_token_type.as_deref().is_some_and(|t| t != TOKEN_TYPE_ACCESS_TOKEN) {
            return Err(DeviceError::Untrusted("the exchange issued something other than an access token".into()));
        }
        let grant = self.accept(response).await?;
        if grant.claims.sid != subject.claims.sid || grant.claims.subsession_id.is_none() {
            return Err(DeviceError::Untrusted("the token is not for a sub-session of this session".into()));
        }
        Ok(grant)
    }

    /// Checks an issued token: a DPoP token signed by a published key, for this device
    /// and bound to its key, saying what the response says.
    async fn accept(&self, response: TokenResponse) -> Result<Grant, DeviceError> {
        if !response.token_type.eq_ignore_ascii_case(TOKEN_TYPE_DPOP) {
            return Err(DeviceError::Untrusted(format!("token_type is {:?}, expected DPoP", response.token_type)));
        }
        let token = response.access_token;
        let claims =
            self.with_published_keys(|jwks| verify_access_token(&token, key_lookup(jwks), &*self.clock)).await?;
        if claims.cnf.jkt != self.jkt || claims.sub != self.device_id || claims.client_id != self.device_id {
            return Err(DeviceError::Untrusted("the access token is not bound to this device".into()));
        }
        if claims.sid != response.sid || claims.subsession_id != response.subsession_id {
            return Err(DeviceError::Untrusted("the access token and the response disagree".into()));
        }
        Ok(Grant { access_token: token, claims })
    }

    /// One DPoP request; answered with `use_dpop_nonce`, it is made again with the
    /// nonce the server sent.
    async fn send(
        &self,
        method: Method,
        path: &str,
        access_token: Option<&str>,
        body: Body<'_>,
    ) -> Result<Reply, DeviceError> {
        let mut retries = 0;
        loop {
            let proof = self.proof(&method, path, access_token)?;
            let auth = Auth::Dpop { proof: &proof, access_token };
            let reply = self.client.execute(method.clone(), path, auth, body).await?;
            self.remember_nonce(&reply);
            if retries < NONCE_RETRIES_MAX && asks_for_nonce(&reply) {
                retries += 1;
                continue;
            }
            return Ok(reply);
        }
    }

    fn proof(&self, method: &Method, path: &str, access_token: Option<&str>) -> Result<String, DeviceError> {
        let nonce = lock(&self.nonce).clone();
        let url = self.client.url(path);
        let claims = ProofClaims::for_request(
            method.as_str(),
            &url,
            self.clock.now_unix(),
            access_token,
            nonce.as_deref(),
            &self.rng,
        )?;
        Ok(sign_proof(&claims, self.identity.key(), &self.rng)?)
    }

    fn remember_nonce(&self, reply: &Reply) {
        if let Some(nonce) = reply.header(DPOP_NONCE_HEADER) {
            *lock(&self.nonce) = Some(nonce.to_owned());
        }
    }

    /// Runs `check` with the published keys, fetching them when none are known yet or
    /// when the object names a key published since.
    async fn with_published_keys<T>(&self, check: impl Fn(&JwkSet) -> Result<T, ProtoError>) -> Result<T, DeviceError> {
        let cached = lock(&self.jwks).clone();
        if let Some(jwks) = cached {
            match check(&jwks) {
                Err(ProtoError::UnknownSigningKey { .. }) => {}
                other => return Ok(other?),
            }
        }
        let jwks = self.client.jwks().await?;
        let checked = check(&jwks);
        *lock(&self.jwks) = Some(jwks);
        Ok(checked?)
    }
}

/// The key a server-signed object's `kid` names among `jwks`.
pub(crate) fn key_lookup(jwks: &JwkSet) -> impl Fn(&str) -> Option<VerifyingKey> + '_ {
    |kid| jwks.find(kid).and_then(|jwk| jwk.verifying_key().ok())
}

/// The guarded values are replaced whole, so a panic elsewhere cannot leave one half
/// written: a poisoned lock is still good to read.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    NotNeeded,
    Needed,
    TicketExpired,
}

/// Whether a token expiring at `token_exp` must be renewed at `now`. A token never
/// outlives its ticket, so one that expires with the ticket is used while it lasts.
fn renewal(now: i64, token_exp: i64, ticket_exp: i64) -> Renewal {
    if now >= ticket_exp {
        Renewal::TicketExpired
    } else if now + RENEW_MARGIN_SECS < token_exp || token_exp >= ticket_exp {
        Renewal::NotNeeded
    } else {
        Renewal::Needed
    }
}

/// The server wants a proof with the nonce it sent: a 400 from the token endpoint
/// (RFC 9449 section 8) or a 401 challenge from a protected one (section 9).
fn asks_for_nonce(reply: &Reply) -> bool {
    matches!(reply.status, 400 | 401)
        && reply.header(DPOP_NONCE_HEADER).is_some()
        && (reply.oauth_error().as_deref() == Some(USE_DPOP_NONCE)
            || challenge_error(reply).as_deref() == Some(USE_DPOP_NONCE))
}

fn challenge_error(reply: &Reply) -> Option<String> {
    let header = reply.header(reqwest::header::WWW_AUTHENTICATE.as_str())?;
    challenge_param(header, DPOP_SCHEME, "error")
}

/// The answer as `T`; a refusal whose problem document carries no OAuth error gets
/// the one from the `WWW-Authenticate` challenge.
fn finish<T: DeserializeOwned>(reply: Reply) -> Result<T, DeviceError> {
    let challenged = challenge_error(&reply);
    match reply.json() {
        Err(DeviceError::Problem { status, problem_type, detail, oauth_error: None }) => {
            Err(DeviceError::Problem { status, problem_type, detail, oauth_error: challenged })
        }
        other => other,
    }
}

/// The value of auth-param `param` of the first `scheme` challenge in a
/// `WWW-Authenticate` value (RFC 9110 section 11.6.1); names compare without case.
fn challenge_param(header: &str, scheme: &str, param: &str) -> Option<String> {
    parse_challenges(header)
        .into_iter()
        .find(|challenge| challenge.scheme.eq_ignore_ascii_case(scheme))?
        .params
        .into_iter()
        .find_map(|(name, value)| name.eq_ignore_ascii_case(param).then_some(value))
}

#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

/// Challenges are `scheme [param=value, …]`, separated by commas like the params:
/// a token not followed by `=` starts a new challenge. Token68 credentials are not
/// used by any scheme Vouch speaks and read as params with empty values.
fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut challenges: Vec<Challenge> = Vec::new();
    let mut rest = header;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let (word, after) = take_token(rest);
        if word.is_empty() {
            break;
        }
        let after_ws = after.trim_start_matches([' ', '\t']);
        match after_ws.strip_prefix('=') {
            Some(value_start) => {
                let (value, after_value) = take_value(value_start.trim_start_matches([' ', '\t']));
                if let Some(challenge) = challenges.last_mut() {
                    challenge.params.push((word.to_owned(), value));
                }
                rest = after_value;
            }
            None => {
                challenges.push(Challenge { scheme: word.to_owned(), params: Vec::new() });
                rest = after;
            }
        }
    }
    challenges
}

/// RFC 9110 `token` characters.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn take_token(text: &str) -> (&str, &str) {
    let end = text.find(|c| !is_tchar(c)).unwrap_or(text.len());
    text.split_at(end)
}

/// A `token` or a `quoted-string` with its escapes undone; an unterminated quote runs
/// to the end.
fn take_value(text: &str) -> (String, &str) {
    let Some(quoted) = text.strip_prefix('"') else {
        let (token, rest) = take_token(text);
        return (token.to_owned(), rest);
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (value, &quoted[i + 1..]),
            '\\' => value.extend(chars.next().map(|(_, escaped)| escaped)),
            other => value.push(other),
        }
    }
    (value, "")
}

#[cfg(test)]
mod tests {
    use vouch_proto::dpop::{NonceKey, ProofContext, verify_proof};
    use vouch_proto::{FixedClock, SystemClock};

    use super::*;

    #[test]
    fn www_authenticate_challenges_parse() {
        let cases: [(&str, Option<&str>); 9] = [
            (
                r#"DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof""#,
                Some("use_dpop_nonce"),
            ),
            (r#"DPoP algs="ES256", error="invalid_token""#, Some("invalid_token")),
            (r#"dpop ERROR = "invalid_token""#, Some("invalid_token")),
            ("DPoP error=invalid_dpop_proof, algs=ES256", Some("invalid_dpop_proof")),
            (
                r#"Bearer realm="vouch", error="invalid_request", DPoP algs="ES256", error="use_dpop_nonce""#,
                Some("use_dpop_nonce"),
            ),
            (r#"DPoP error_description="say \"nonce\", please", error="use_dpop_nonce""#, Some("use_dpop_nonce")),
            (r#"Bearer error="invalid_token""#, None),
            (r#"DPoP algs="ES256""#, None),
            ("", None),
        ];
        for (header, expected) in cases {
            assert_eq!(challenge_param(header, "DPoP", "error").as_deref(), expected, "{header}");
        }
        assert_eq!(
            parse_challenges(r#"Basic realm="a, b", DPoP error="x\\y", algs=ES256"#),
            [
                Challenge { scheme: "Basic".into(), params: vec![("realm".into(), "a, b".into())] },
                Challenge {
                    scheme: "DPoP".into(),
                    params: vec![("error".into(), "x\\y".into()), ("algs".into(), "ES256".into())]
                },
            ]
        );
        // Junk never loops or panics.
        for junk in ["=", "\"", "DPoP error=\"unterminated", ",,,", "DPoP ===", "DPoP error=\u{e9}"] {
            let _ = parse_challenges(junk);
        }
    }

    #[test]
    fn tokens_renew_before_they_expire_but_never_past_the_ticket() {
        let cases = [
            // (now, token exp, ticket exp)
            (1_000, 1_600, 1_900, Renewal::NotNeeded),
            (1_594, 1_600, 1_900, Renewal::NotNeeded),
            (1_595, 1_600, 1_900, Renewal::Needed),
            (1_700, 1_600, 1_900, Renewal::Needed),
            (1_898, 1_900, 1_900, Renewal::NotNeeded),
            (1_900, 1_900, 1_900, Renewal::TicketExpired),
            (2_000, 1_600, 1_900, Renewal::TicketExpired),
        ];
        for (now, token_exp, ticket_exp, expected) in cases {
            assert_eq!(
                renewal(now, token_exp, ticket_exp),
                expected,
                "now {now}, token {token_exp}, ticket {ticket_exp}"
            );
        }
    }

    fn shared(rng: &SystemRandom, now: i64) -> Shared {
        let identity = Arc::new(DeviceIdentity::generate(rng).unwrap());
        Shared {
            client: VouchClient::new("http://127.0.0.1:8700/").unwrap(),
            jkt: identity.jwk().thumbprint(),
            identity,
            device_id: "dev_1".into(),
            clock: Arc::new(FixedClock(now)),
            rng: rng.clone(),
            nonce: Mutex::new(None),
            jwks: Mutex::new(None),
        }
    }

    #[test]
    fn proofs_carry_the_url_token_hash_and_latest_nonce() {
        let rng = SystemRandom::new();
        let shared = shared(&rng, SystemClock.now_unix());
        let nonces = NonceKey::new(&[3; 32], 60).unwrap();
        *lock(&shared.nonce) = Some(nonces.issue(SystemClock.now_unix()));
        let proof = shared.proof(&Method::POST, "/v1/sign?x=1", Some("the-token")).unwrap();
        let context = ProofContext {
            method: "POST",
            uri: "http://127.0.0.1:8700/v1/sign",
            access_token: Some("the-token"),
            bound_jkt: Some(&shared.jkt),
            iat_window_secs: 60,
            nonces: Some(&nonces),
        };
        let verified = verify_proof(&proof, &context, &SystemClock).unwrap();
        assert_eq!(verified.jkt, shared.jkt);
        let again = shared.proof(&Method::POST, "/v1/sign", Some("the-token")).unwrap();
        assert_ne!(verify_proof(&again, &context, &SystemClock).unwrap().jti, verified.jti, "a fresh jti per proof");

        let token_proof = shared.proof(&Method::POST, TOKEN_PATH, None).unwrap();
        let token_context =
            ProofContext { uri: "http://127.0.0.1:8700/v1/token", access_token: None, bound_jkt: None, ..context };
        verify_proof(&token_proof, &token_context, &SystemClock).unwrap();
        let with_token = ProofContext { access_token: Some("the-token"), ..token_context };
        assert!(verify_proof(&token_proof, &with_token, &SystemClock).is_err(), "no ath at the token endpoint");
    }

    fn reply(status: u16, headers: &[(&'static str, &str)], body: serde_json::Value) -> Reply {
        let mut map = reqwest::header::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        Reply { status, headers: map, body: serde_json::to_vec(&body).unwrap() }
    }

    #[test]
    fn nonce_challenges_are_recognised_and_remembered() {
        let problem = |error: &str| json!({"type": "urn:vouch:problem:x", "title": "x", "status": 400, "detail": "d", "error": error});
        let nonce_header = ("dpop-nonce", "n2");
        let challenge = ("www-authenticate", r#"DPoP error="use_dpop_nonce", algs="ES256""#);
        let cases = [
            (reply(400, &[nonce_header], problem("use_dpop_nonce")), true),
            (reply(401, &[nonce_header, challenge], problem("use_dpop_nonce")), true),
            (reply(401, &[nonce_header, challenge], json!({})), true),
            (reply(400, &[], problem("use_dpop_nonce")), false),
            (reply(400, &[nonce_header], problem("invalid_dpop_proof")), false),
            (reply(401, &[nonce_header, ("www-authenticate", r#"DPoP error="invalid_token""#)], json!({})), false),
            (reply(200, &[nonce_header], json!({})), false),
        ];
        for (i, (reply, expected)) in cases.iter().enumerate() {
            assert_eq!(asks_for_nonce(reply), *expected, "case {i}");
        }

        let rng = SystemRandom::new();
        let shared = shared(&rng, 1_000);
        shared.remember_nonce(&cases[0].0);
        assert_eq!(lock(&shared.nonce).as_deref(), Some("n2"));
        shared.remember_nonce(&reply(200, &[], json!({})));
        assert_eq!(lock(&shared.nonce).as_deref(), Some("n2"), "an answer without a nonce keeps the last one");
    }

    #[test]
    fn a_refusal_takes_its_oauth_error_from_the_challenge_when_the_body_has_none() {
        let body = json!({"type": "urn:vouch:problem:invalid-token", "title": "t", "status": 401, "detail": "ended"});
        let refused = reply(401, &[("www-authenticate", r#"DPoP error="invalid_token""#)], body.clone());
        let error = finish::<IgnoredAny>(refused).unwrap_err();
        assert_eq!(error.oauth_error(), Some("invalid_token"));
        assert_eq!(error.problem_reason(), Some("invalid-token"));
        let mut with_error = body;
        with_error["error"] = "invalid_dpop_proof".into();
        let refused = reply(401, &[("www-authenticate", r#"DPoP error="invalid_token""#)], with_error);
        assert_eq!(finish::<IgnoredAny>(refused).unwrap_err().oauth_error(), Some("invalid_dpop_proof"));
        assert!(finish::<IgnoredAny>(reply(200, &[], json!(null))).is_ok());
    }
}
