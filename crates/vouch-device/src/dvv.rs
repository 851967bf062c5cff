//! Temporary device verification values on the device side. A consumer's [`Wallet`]
//! asks the server for a value over its DPoP-bound session and checks what comes back;
//! a [`PaymentTerminal`] carries the value in an authorization request, numbering its
//! requests with STANs and sending one again, unchanged, when the network fails, so
//! that the server's retry key (terminal, STAN, transmission time) answers it with the
//! first decision instead of deciding twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use vouch_proto::Clock;
use vouch_proto::dvv::{AccountRef, Assurance, Digits, Dvv};
use vouch_proto::iso8583::TransmissionTime;
use zeroize::Zeroizing;

use crate::client::{Auth, Body, path_segment};
use crate::token::Method;
use crate::{DeviceError, TerminalCreated, TokenSession, VouchClient};

pub const DVV_PATH: &str = "/v1/dvv";
pub const AUTHORIZATIONS_PATH: &str = "/v1/authorizations";
/// ISO 8583 DE 39 for an approval.
pub const APPROVED: &str = "00";
/// STANs run from 000001 to this and wrap to 000001.
pub const STAN_MAX: u32 = 999_999;
/// How many times an authorization that failed on the network is sent again.
const NETWORK_RETRIES_MAX: usize = 1;
const NETWORK_RETRY_DELAY: Duration = Duration::from_millis(100);

/// A value the server issued to this phone, checked. The value is zeroized when
/// dropped and never shown by `Debug`.
#[derive(Debug, Clone)]
pub struct IssuedDvv {
    /// What the phone hands to the terminal.
    pub dvv: Dvv,
    pub dvv_id: String,
    /// How many authorizations it is good for.
    pub max_uses: i64,
    /// Unix seconds; it is good until then.
    pub expires_at: i64,
    /// How much the server trusted the phone; the value's first digit.
    pub assurance: Assurance,
    /// The largest amount, in minor units, it authorizes.
    pub amount_limit_minor: i64,
    pub account_ref_last4: String,
    /// Set when the value authorizes only at merchants of this category.
    pub merchant_category: Option<String>,
}

/// The answer to `POST /v1/dvv` as sent; [`check_issued`] makes it an [`IssuedDvv`].
#[derive(Deserialize)]
struct IssuedDvvResponse {
    dvv: String,
    dvv_id: String,
    max_uses: i64,
    expires_at: i64,
    assurance: u8,
    amount_limit_minor: i64,
    account_ref_last4: String,
    #[serde(default)]
    merchant_category: Option<String>,
}

/// A consumer's phone with an open session: it asks for values for its consumer's
/// payment accounts. The server validates the phone again at every request.
#[derive(Debug, Clone)]
pub struct Wallet {
    session: TokenSession,
}

impl Wallet {
    pub fn new(session: TokenSession) -> Self {
        Wallet { session }
    }

    pub fn session(&self) -> &TokenSession {
        &self.session
    }

    /// Asks for a value for `account_ref`; `merchant_category` names where the phone
    /// is about to pay, so a policy for that category may apply. Refusals
    /// (`risk-too-high`, `velocity-exceeded`, `account-not-owned`, …) arrive as
    /// [`DeviceError::Problem`]; an answer that does not check out as
    /// [`DeviceError::Untrusted`].
    pub async fn request_dvv(
        &self,
        account_ref: &AccountRef,
        merchant_category: Option<&str>,
    ) -> Result<IssuedDvv, DeviceError> {
        let mut body = json!({ "account_ref": account_ref.expose() });
        if let Some(category) = merchant_category {
            body["merchant_category"] = json!(category);
        }
        let response: IssuedDvvResponse = self.session.request(Method::POST, DVV_PATH, Some(&body)).await?;
        check_issued(response, account_ref, merchant_category, self.session.clock().now_unix())
    }
}

/// What a phone checks before it trusts a value: digits only, the first one its
/// assurance level, still good now, good for one use at least, and for the account
/// (and category) it asked about.
fn check_issued(
    mut response: IssuedDvvResponse,
    account_ref: &AccountRef,
    merchant_category: Option<&str>,
    now: i64,
) -> Result<IssuedDvv, DeviceError> {
    let untrusted = |what: &str| DeviceError::Untrusted(format!("the issued DVV {what}"));
    let raw = Zeroizing::new(std::mem::take(&mut response.dvv));
    let length = u8::try_from(raw.len()).map_err(|_| untrusted("is too long"))?;
    let digits = Digits::new(length).map_err(|_| untrusted("has a length no server issues"))?;
    let dvv = Dvv::parse(&raw, digits).map_err(|_| untrusted("is not digits led by an assurance level"))?;
    let assurance = Assurance::new(response.assurance).map_err(|_| untrusted("has an assurance out of range"))?;
    if dvv.assurance()? != assurance {
        return Err(untrusted("does not start with its assurance level"));
    }
    if response.expires_at <= now {
        return Err(untrusted("has expired already"));
    }
    if response.max_uses < 1 {
        return Err(untrusted("is good for no use"));
    }
    if response.amount_limit_minor < 0 {
        return Err(untrusted("has a negative amount limit"));
    }
    if response.account_ref_last4 != account_ref.last4() {
        return Err(untrusted("is for another account"));
    }
    if let Some(issued_for) = &response.merchant_category
        && merchant_category != Some(issued_for.as_str())
    {
        return Err(untrusted("is for another merchant category"));
    }
    Ok(IssuedDvv {
        dvv,
        dvv_id: response.dvv_id,
        max_uses: response.max_uses,
        expires_at: response.expires_at,
        assurance,
        amount_limit_minor: response.amount_limit_minor,
        account_ref_last4: response.account_ref_last4,
        merchant_category: response.merchant_category,
    })
}

/// What a payment asks the terminal to authorize.
#[derive(Debug, Clone)]
pub struct AuthorizationInput {
    /// The payment account, as its 16-digit payment token (DE 2).
    pub account_ref: AccountRef,
    /// The value the phone handed over.
    pub dvv: Dvv,
    /// DE 4, in minor units.
    pub amount_minor: i64,
    /// ISO 4217 numeric currency code (DE 49), e.g. `978`.
    pub currency: String,
    /// POS entry mode (DE 22), e.g. `071` contactless.
    pub entry_mode: String,
    /// DE 37; the server makes one when `None`.
    pub retrieval_reference: Option<String>,
}

/// One authorization request with its retry key fixed: sent again, it is the same
/// request, and the server answers it with its first decision.
#[derive(Clone)]
pub struct AuthorizationRequest {
    /// DE 11, 6 digits.
    pub stan: String,
    /// DE 7, UTC `MMDDhhmmss`.
    pub transmission_time: String,
    body: serde_json::Value,
}

impl std::fmt::Debug for AuthorizationRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizationRequest")
            .field("stan", &self.stan)
            .field("transmission_time", &self.transmission_time)
            .finish_non_exhaustive()
    }
}

/// The server's decision. A decline is a decision too: `approved` is false and
/// `response_code` says why (`05`, `54`, `75`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorization {
    pub authorization_id: String,
    /// ISO 8583 response code (DE 39).
    pub response_code: String,
    /// Why, in words a program can match: `approved`, `dvv-mismatch`, `dvv-used-up`, …
    pub reason: String,
    pub approved: bool,
    /// DE 38, on approvals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_code: Option<String>,
    pub retrieval_reference: String,
    pub terminal_id: String,
    pub stan: String,
    pub transmission_time: String,
    pub amount: i64,
    pub currency: String,
    pub created_at: i64,
}

/// A merchant's terminal that authorizes payments over HTTP with its own API key.
/// Shared by reference between tasks: STANs come from one counter.
pub struct PaymentTerminal {
    client: VouchClient,
    merchant_id: String,
    terminal_id: String,
    clock: Arc<dyn Clock>,
    /// The last STAN handed out; 0 before the first.
    stan: AtomicU32,
}

impl std::fmt::Debug for PaymentTerminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentTerminal")
            .field("server", &self.client.base_url())
            .field("merchant_id", &self.merchant_id)
            .field("terminal_id", &self.terminal_id)
            .field("stan", &self.stan.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PaymentTerminal {
    /// The terminal `terminal_id` of `merchant_id` on the server at `base_url`,
    /// authenticating with its API key.
    pub fn new(
        base_url: &str,
        api_key: &str,
        merchant_id: &str,
        terminal_id: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, DeviceError> {
        Ok(PaymentTerminal {
            client: VouchClient::new(base_url)?.with_api_key(api_key),
            merchant_id: merchant_id.to_owned(),
            terminal_id: terminal_id.to_owned(),
            clock,
            stan: AtomicU32::new(0),
        })
    }

    /// The terminal the server just registered.
    pub fn registered(base_url: &str, created: &TerminalCreated, clock: Arc<dyn Clock>) -> Result<Self, DeviceError> {
        Self::new(base_url, &created.api_key, &created.merchant_id, &created.terminal_id, clock)
    }

    /// Continues numbering after `last_stan`, as a terminal does after a restart.
    pub fn with_last_stan(self, last_stan: u32) -> Self {
        self.stan.store(last_stan % (STAN_MAX + 1), Ordering::Relaxed);
        self
    }

    pub fn terminal_id(&self) -> &str {
        &self.terminal_id
    }

    pub fn merchant_id(&self) -> &str {
        &self.merchant_id
    }

    /// The next STAN, 000001 to 999999, wrapping.
    pub fn next_stan(&self) -> String {
        let previous = self.stan.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(next_stan(last)));
        // Invariant: the closure always returns `Some`, so the update always succeeds.
        let last = previous.unwrap_or_else(|last| last);
        format!("{:06}", next_stan(last))
    }

    /// Authorizes `input` under a new STAN and the clock's transmission time; a
    /// request that fails on the network is sent once more, unchanged.
    pub async fn authorize(&self, input: &AuthorizationInput) -> Result<Authorization, DeviceError> {
        self.submit(&self.prepare(input)).await
    }

    /// Fixes the retry key of a request without sending it.
    pub fn prepare(&self, input: &AuthorizationInput) -> AuthorizationRequest {
        let stan = self.next_stan();
        let transmission_time = TransmissionTime::from_unix_secs(self.clock.now_unix()).to_string();
        let mut body = json!({
            "merchant_id": self.merchant_id,
            "terminal_id": self.terminal_id,
            "stan": stan,
            "transmission_time": transmission_time,
            "amount": input.amount_minor,
            "currency": input.currency,
            "account_ref": input.account_ref.expose(),
            "dvv": input.dvv.expose(),
            "entry_mode": input.entry_mode,
        });
        if let Some(rrn) = &input.retrieval_reference {
            body["retrieval_reference"] = json!(rrn);
        }
        AuthorizationRequest { stan, transmission_time, body }
    }

    /// Sends `request` (again, for a retry): a network failure is retried once with
    /// the same STAN and transmission time, which the server answers with its first
    /// decision if the first attempt reached it.
    pub async fn submit(&self, request: &AuthorizationRequest) -> Result<Authorization, DeviceError> {
        let mut retries = 0;
        let reply = loop {
            match self.client.execute(Method::POST, AUTHORIZATIONS_PATH, Auth::ApiKey, Body::Json(&request.body)).await
            {
                Err(DeviceError::Http(_)) if retries < NETWORK_RETRIES_MAX => {
                    retries += 1;
                    tokio::time::sleep(NETWORK_RETRY_DELAY).await;
                }
                other => break other?,
            }
        };
        let decided: Authorization = reply.json()?;
        if decided.terminal_id != self.terminal_id
            || decided.stan != request.stan
            || decided.transmission_time != request.transmission_time
        {
            return Err(DeviceError::Untrusted("the authorization answers another request".into()));
        }
        if decided.approved != (decided.response_code == APPROVED) {
            return Err(DeviceError::Untrusted("the authorization's approval and response code disagree".into()));
        }
        Ok(decided)
    }

    /// One of this terminal's past authorizations.
    pub async fn authorization(&self, authorization_id: &str) -> Result<Authorization, DeviceError> {
        let path = format!("{AUTHORIZATIONS_PATH}/{}", path_segment(authorization_id));
        self.client.execute(Method::GET, &path, Auth::ApiKey, Body::Empty).await?.json()
    }
}

fn next_stan(last: u32) -> u32 {
    if last >= STAN_MAX { 1 } else { last + 1 }
}

#[cfg(test)]
mod tests {
    use vouch_proto::FixedClock;

    use super::*;

    const ACCOUNT: &str = "4895370012003478";
    const NOW: i64 = 1_700_000_000;

    fn response(dvv: &str, assurance: u8) -> IssuedDvvResponse {
        IssuedDvvResponse {
            dvv: dvv.to_owned(),
            dvv_id: "dvv_1".into(),
            max_uses: 1,
            expires_at: NOW + 300,
            assurance,
            amount_limit_minor: 100_000,
            account_ref_last4: "3478".into(),
            merchant_category: None,
        }
    }

    fn check(response: IssuedDvvResponse, category: Option<&str>) -> Result<IssuedDvv, DeviceError> {
        check_issued(response, &AccountRef::parse(ACCOUNT).unwrap(), category, NOW)
    }

    #[test]
    fn an_issued_value_is_checked_before_it_is_trusted() {
        let issued = check(response("312345", 3), None).unwrap();
        assert_eq!((issued.dvv.expose(), issued.assurance.level()), ("312345", 3));
        assert!(!format!("{issued:?}").contains("312345"), "Debug never shows the value");

        let with = |change: fn(&mut IssuedDvvResponse)| {
            let mut r = response("312345", 3);
            change(&mut r);
            r
        };
        let cases: [(&str, IssuedDvvResponse, Option<&str>); 11] = [
            ("letters", response("31234a", 3), None),
            ("too short", response("312", 3), None),
            ("too long", response("3123456789012", 3), None),
            ("no assurance digit", response("012345", 0), None),
            ("first digit is not the assurance", response("212345", 3), None),
            ("expired", with(|r| r.expires_at = NOW), None),
            ("no use", with(|r| r.max_uses = 0), None),
            ("negative limit", with(|r| r.amount_limit_minor = -1), None),
            ("another account", with(|r| r.account_ref_last4 = "1111".into()), None),
            ("category not asked for", with(|r| r.merchant_category = Some("4111".into())), None),
            ("another category", with(|r| r.merchant_category = Some("4111".into())), Some("5411")),
        ];
        for (what, response, category) in cases {
            assert!(matches!(check(response, category), Err(DeviceError::Untrusted(_))), "{what}");
        }
        let restricted = with(|r| r.merchant_category = Some("4111".into()));
        assert_eq!(check(restricted, Some("4111")).unwrap().merchant_category.as_deref(), Some("4111"));
    }

    #[test]
    fn stans_are_six_digits_and_wrap_past_999999() {
        let terminal =
            PaymentTerminal::new("http://127.0.0.1:8700", "k", "mch_1", "trm_1", Arc::new(FixedClock(NOW))).unwrap();
        assert_eq!([terminal.next_stan(), terminal.next_stan()], ["000001", "000002"]);
        let terminal = terminal.with_last_stan(STAN_MAX - 1);
        assert_eq!([terminal.next_stan(), terminal.next_stan(), terminal.next_stan()], ["999999", "000001", "000002"]);
    }

    #[test]
    fn a_prepared_request_carries_its_retry_key_and_the_payment() {
        // 2023-11-14 22:13:20 UTC.
        let terminal =
            PaymentTerminal::new("http://127.0.0.1:8700", "k", "mch_1", "trm_1", Arc::new(FixedClock(NOW))).unwrap();
        let input = AuthorizationInput {
            account_ref: AccountRef::parse(ACCOUNT).unwrap(),
            dvv: Dvv::parse("312345", Digits::default()).unwrap(),
            amount_minor: 1250,
            currency: "978".into(),
            entry_mode: "071".into(),
            retrieval_reference: None,
        };
        let request = terminal.prepare(&input);
        assert_eq!((request.stan.as_str(), request.transmission_time.as_str()), ("000001", "1114221320"));
        assert_eq!(
            request.body,
            json!({
                "merchant_id": "mch_1", "terminal_id": "trm_1", "stan": "000001", "transmission_time": "1114221320",
                "amount": 1250, "currency": "978", "account_ref": ACCOUNT, "dvv": "312345", "entry_mode": "071",
            })
        );
        assert!(!format!("{request:?}").contains("312345"), "Debug never shows the value");
        assert_eq!(terminal.prepare(&input).stan, "000002");
    }
}
