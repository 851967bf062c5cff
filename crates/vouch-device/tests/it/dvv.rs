//! Temporary device verification values end to end: a consumer's wallet gets values
//! over its DPoP-bound session and a payment terminal spends them, through the SDK
//! against a real server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use vouch_device::attest::{SimulatedDeviceState, TamperMonitor};
use vouch_device::dvv::{Authorization, AuthorizationInput, IssuedDvv};
use vouch_device::sim;
use vouch_device::{DeviceIdentity, NewMerchant, PaymentTerminal, TerminalCreated, TokenSession, VouchClient, Wallet};
use vouch_proto::crypto::SystemRandom;
use vouch_proto::dvv::{AccountRef, Digits, Dvv};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::{Clock, SystemClock};

use crate::support::{RunningServer, start, start_configured};

pub const ACCOUNT: &str = "4895370012003478";
pub const CARD_ACCEPTOR_ID: &str = "CORNERCOFFEE001";
pub const GROCERY: &str = "5411";

/// A consumer's attested phone with one payment account, and a registered terminal
/// of a grocer.
pub struct Market {
    pub wallet: Wallet,
    pub account: AccountRef,
    pub terminal: TerminalCreated,
}

impl Market {
    /// Sets the parties up through `admin`; the phone attests and opens its session
    /// through `device_client`.
    pub async fn set_up(admin: &VouchClient, device_client: &VouchClient) -> Market {
        let rng = SystemRandom::new();
        let shop = NewMerchant {
            name: "Grocer".into(),
            card_acceptor_id: Some(CARD_ACCEPTOR_ID.into()),
            merchant_category: Some(GROCERY.into()),
        };
        let merchant = admin.create_merchant_with(&shop).await.unwrap();
        assert_eq!(merchant.card_acceptor_id.as_deref(), Some(CARD_ACCEPTOR_ID));
        assert_eq!(merchant.merchant_category.as_deref(), Some(GROCERY));

        let state = SimulatedDeviceState::clean(DeviceKind::Consumer, &merchant.merchant_id);
        admin.put_reference_values(&state.reference_values()).await.unwrap();
        let identity = Arc::new(DeviceIdentity::generate(&rng).unwrap());
        let phone = sim::enrol(admin, &identity, &state.profile(), &SystemClock, &rng).await.unwrap();
        let mut monitor = TamperMonitor::new(state);
        let attestation =
            sim::attest(device_client, &identity, &phone.device_id, &mut monitor, &SystemClock, &rng).await.unwrap();
        let ticket = &attestation.outcome.ticket;
        let session = TokenSession::open(device_client, identity, ticket, Arc::new(SystemClock), &rng).await.unwrap();

        let consumer = admin.create_consumer("Ada").await.unwrap();
        let linked = admin.add_consumer_device(&consumer.consumer_id, &phone.device_id).await.unwrap();
        assert_eq!(linked.device_id, phone.device_id);
        let account = AccountRef::parse(ACCOUNT).unwrap();
        let added = admin.add_payment_account(&consumer.consumer_id, &account).await.unwrap();
        assert_eq!(added.account_ref_last4, "3478");
        let terminal = admin.create_terminal(&merchant.merchant_id, "TERM0001").await.unwrap();
        assert_eq!(
            (terminal.card_acceptor_id.as_str(), terminal.iso_terminal_id.as_str()),
            (CARD_ACCEPTOR_ID, "TERM0001")
        );
        assert!(!format!("{terminal:?}").contains(&terminal.api_key), "Debug never shows the terminal's key");
        Market { wallet: Wallet::new(session), account, terminal }
    }

    /// The registered terminal, reaching the server at `base_url`.
    pub fn terminal_at(&self, base_url: &str) -> PaymentTerminal {
        PaymentTerminal::registered(base_url, &self.terminal, Arc::new(SystemClock)).unwrap()
    }

    pub async fn issue(&self) -> IssuedDvv {
        self.wallet.request_dvv(&self.account, Some(GROCERY)).await.unwrap()
    }

    /// A payment of 12.50 EUR with `dvv`.
    pub fn payment(&self, dvv: &Dvv) -> AuthorizationInput {
        AuthorizationInput {
            account_ref: self.account.clone(),
            dvv: dvv.clone(),
            amount_minor: 1250,
            currency: "978".into(),
            entry_mode: "071".into(),
            retrieval_reference: None,
        }
    }
}

async fn market(server: &RunningServer) -> Market {
    Market::set_up(&server.admin(), &VouchClient::new(&server.url).unwrap()).await
}

fn outcome(decided: &Authorization) -> (&str, &str) {
    (decided.response_code.as_str(), decided.reason.as_str())
}

/// `dvv` with its last digit changed: still a well-formed value, but not the one issued.
fn wrong(dvv: &Dvv) -> Dvv {
    let text = dvv.expose();
    let last = text.as_bytes()[text.len() - 1];
    let changed = format!("{}{}", &text[..text.len() - 1], char::from(b'0' + (last - b'0' + 1) % 10));
    Dvv::parse(&changed, Digits::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_value_is_approved_once_then_used_up_and_a_fresh_one_follows() {
    let server = start().await;
    let market = market(&server).await;
    let terminal = market.terminal_at(&server.url);
    let issued = market.issue().await;
    assert_eq!(issued.dvv.expose().len(), 6);
    assert_eq!((issued.max_uses, issued.assurance.level(), issued.account_ref_last4.as_str()), (1, 3, "3478"));
    assert!(issued.expires_at > SystemClock.now_unix());
    assert!(!format!("{issued:?}").contains(issued.dvv.expose()), "Debug never shows the value");

    let approved = terminal.authorize(&market.payment(&issued.dvv)).await.unwrap();
    assert_eq!(outcome(&approved), ("00", "approved"));
    assert!(approved.approved && approved.authorization_code.is_some(), "{approved:?}");
    assert_eq!((approved.stan.as_str(), approved.amount, approved.currency.as_str()), ("000001", 1250, "978"));
    assert_eq!(terminal.authorization(&approved.authorization_id).await.unwrap(), approved);

    let used_up = terminal.authorize(&market.payment(&issued.dvv)).await.unwrap();
    assert_eq!(outcome(&used_up), ("54", "dvv-used-up"));
    assert!(!used_up.approved && used_up.authorization_code.is_none(), "{used_up:?}");
    assert_eq!(used_up.stan, "000002");

    let fresh = market.issue().await;
    assert_ne!(fresh.dvv, issued.dvv);
    assert_eq!(outcome(&terminal.authorize(&market.payment(&fresh.dvv)).await.unwrap()), ("00", "approved"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_values_are_declined_then_lock_the_account_until_the_phone_asks_again() {
    let server = start_configured(|c| c.dvv_wrong_tries_max = 3).await;
    let market = market(&server).await;
    let terminal = market.terminal_at(&server.url);
    let issued = market.issue().await;
    let mut presented = issued.dvv.clone();
    for _ in 0..2 {
        presented = wrong(&presented);
        assert_eq!(outcome(&terminal.authorize(&market.payment(&presented)).await.unwrap()), ("05", "dvv-mismatch"));
    }
    let third = terminal.authorize(&market.payment(&wrong(&presented))).await.unwrap();
    assert_eq!(outcome(&third), ("75", "too-many-wrong-dvvs"));
    let locked = terminal.authorize(&market.payment(&issued.dvv)).await.unwrap();
    assert_eq!(outcome(&locked), ("75", "account-locked"), "even the right value");

    let fresh = market.issue().await;
    assert_eq!(outcome(&terminal.authorize(&market.payment(&fresh.dvv)).await.unwrap()), ("00", "approved"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_on_the_network_is_sent_again_and_decided_once() {
    let server = start().await;
    let market = market(&server).await;
    let upstream: SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    let (proxy, connections) = hang_up_once(upstream).await;
    let terminal = market.terminal_at(&format!("http://{proxy}"));
    let issued = market.issue().await;
    assert_eq!(issued.max_uses, 1, "a second decision would find the value used up");

    let decided = terminal.authorize(&market.payment(&issued.dvv)).await.unwrap();
    assert_eq!(connections.load(Ordering::SeqCst), 2, "the first answer was lost, so the request went again");
    assert_eq!(outcome(&decided), ("00", "approved"), "the retry got the first decision: {decided:?}");
    assert_eq!(decided.stan, "000001");
    let stored = server.state.store.authorization(&decided.authorization_id).await.unwrap();
    assert_eq!((stored.stan.as_str(), stored.response_code.as_str()), ("000001", "00"));

    let again = terminal.authorize(&market.payment(&issued.dvv)).await.unwrap();
    assert_eq!(outcome(&again), ("54", "dvv-used-up"), "the value was spent once");
}

/// A proxy to `upstream` that lets the first connection's request through, waits
/// until the server starts answering (so it has decided), and hangs up without
/// passing the answer on; later connections pass through whole. It counts connections.
async fn hang_up_once(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut server = TcpStream::connect(upstream).await.unwrap();
            if counted.fetch_add(1, Ordering::SeqCst) > 0 {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                continue;
            }
            tokio::spawn(async move {
                let (mut client_read, client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let forward = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut first_byte = [0u8; 1];
                let _ = server_read.read(&mut first_byte).await;
                forward.abort();
                drop(client_write);
            });
        }
    });
    (addr, connections)
}
