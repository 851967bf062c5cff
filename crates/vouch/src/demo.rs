//! `vouch demo`: starts a server in-process on a free port with a temporary SQLite
//! database, and its ISO 8583 listener on another, and walks through Vouch's flows with
//! the device SDK, printing each step.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use vouch_device::attest::{ReferenceValues, SimulatedDeviceState, Tamper, TamperMonitor};
use vouch_device::dvv::{Authorization, AuthorizationInput};
use vouch_device::iso8583::{self, APPROVED, AuthorizationMessage, Iso8583Client};
use vouch_device::offline::sound::SoundChannel;
use vouch_device::offline::{OfflinePos, SettlementOutcome};
use vouch_device::session::{CardReader, FramedPipe, PosApp, PosSession, ReaderSession, SimulatedCard};
use vouch_device::sim::{self, DeviceProfile, OfflineFunds, TsmPhoneSetup};
use vouch_device::token::{Method, SIGN_PATH};
use vouch_device::tsm::{OutboxEntry, OutboxQuery, OutboxStatus, ReceiverMode};
use vouch_device::{
    DeviceError, DeviceIdentity, MerchantRecord, NewMerchant, PaymentTerminal, TerminalCreated, TokenSession,
    VouchClient, Wallet,
};
use vouch_proto::attest::EarStatus;
use vouch_proto::crypto::{SystemRandom, sha256};
use vouch_proto::dvv::{AccountRef, Digits, Dvv};
use vouch_proto::enrol::DeviceKind;
use vouch_proto::offline::verify_receipt;
use vouch_proto::session::{NOISE_PARAMS, TamperState};
use vouch_proto::{Clock, SystemClock, b64};
use vouch_server::dvv::iso8583::Iso8583Listener;
use vouch_sonic::Profile;

/// ISO 18245: grocery stores and supermarkets.
const GROCERY: &str = "5411";
/// ISO 8583 data elements the demo reads from answers.
const STAN_FIELD: u8 = 11;
const AUTHORIZATION_CODE_FIELD: u8 = 38;
const RESPONSE_CODE_FIELD: u8 = 39;

/// An in-process server on a free port, with its ISO 8583 listener on another, stopped
/// when dropped.
pub struct LocalServer {
    pub url: String,
    pub admin_key: String,
    /// Where the ISO 8583 listener (plain TCP) accepts; `None` when the configuration
    /// leaves `iso8583_listen` unset.
    pub iso8583_addr: Option<SocketAddr>,
    /// The server's state, for measurements that bypass HTTP.
    pub state: vouch_server::AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Held so the temporary database lives as long as the server.
    _data_dir: tempfile::TempDir,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a server on `database_url`, or on a temporary SQLite file when `None`, with
/// HTTP and ISO 8583 each on a free loopback port.
pub async fn start_local(database_url: Option<&str>, rate_limit_per_sec: u32) -> anyhow::Result<LocalServer> {
    start_local_with(database_url, rate_limit_per_sec, |_| {}).await
}

/// [`start_local`] on a configuration `configure` adjusts; clearing `iso8583_listen`
/// leaves the ISO 8583 listener closed.
pub async fn start_local_with(
    database_url: Option<&str>,
    rate_limit_per_sec: u32,
    configure: impl FnOnce(&mut vouch_server::Config),
) -> anyhow::Result<LocalServer> {
    let data_dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut config = vouch_server::Config::for_data_dir(data_dir.path());
    config.listen = listener.local_addr()?;
    let iso8583_socket = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let iso8583_bound = iso8583_socket.local_addr()?;
    config.iso8583_listen = Some(iso8583_bound);
    config.rate_limit_per_sec = rate_limit_per_sec;
    config.rate_limit_burst = rate_limit_per_sec.saturating_mul(2);
    if let Some(url) = database_url {
        config.database_url = url.to_owned();
    }
    configure(&mut config);
    let master_env = std::env::var(vouch_server::config::MASTER_KEY_ENV).ok();
    let state = vouch_server::build_state(config, master_env.as_deref()).await?;
    let key_path = data_dir.path().join(vouch_server::ADMIN_KEY_FILE);
    let admin_key = std::fs::read_to_string(&key_path)
        .with_context(|| format!("{} (an existing database needs its own admin key)", key_path.display()))?
        .trim()
        .to_owned();
    let iso8583 = match state.config.iso8583_listen {
        Some(addr) if addr == iso8583_bound => Some(Iso8583Listener::on(iso8583_socket, &state.config)?),
        // `configure` moved or closed it.
        _ => Iso8583Listener::bind(&state.config).await?,
    };
    let iso8583_addr = iso8583.as_ref().map(Iso8583Listener::local_addr).transpose()?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(vouch_server::serve_with_iso8583(listener, iso8583, state.clone(), async move {
        let _ = stopped.await;
    }));
    Ok(LocalServer { url, admin_key, iso8583_addr, state, stop: Some(stop), _data_dir: data_dir })
}

struct Steps {
    done: usize,
}

impl Steps {
    fn pass(&mut self, what: &str) {
        self.done += 1;
        println!("[{:>2}] ok   {what}", self.done);
    }
}

pub async fn run() -> anyhow::Result<ExitCode> {
    let server = start_local(None, 1_000).await?;
    let mut steps = Steps { done: 0 };
    let rng = SystemRandom::new();
    let iso8583 = server.iso8583_addr.map_or_else(|| "closed".to_owned(), |addr| addr.to_string());
    println!("Vouch demo: server at {} (ISO 8583 at {iso8583}) on a temporary SQLite database", server.url);

    let admin = VouchClient::new(&server.url)?.with_api_key(&server.admin_key);
    admin.health().await?;
    steps.pass("server healthy; bootstrap admin key read from DATA_DIR/admin.key");

    let merchant = admin.create_merchant("Corner Coffee").await?;
    steps.pass(&format!("merchant registered: {} ({})", merchant.name, merchant.merchant_id));

    let provision = admin.create_api_key(&["provision"], "device factory").await?;
    let factory = VouchClient::new(&server.url)?.with_api_key(&provision.api_key);
    steps.pass(&format!("provision-scoped API key created: {}", provision.key_id));

    let mut enrolled = Vec::new();
    for kind in [DeviceKind::Reader, DeviceKind::Pos, DeviceKind::Terminal] {
        let identity = DeviceIdentity::generate(&rng)?;
        let profile = DeviceProfile::simulated(kind, &merchant.merchant_id);
        let device = sim::enrol(&factory, &identity, &profile, &SystemClock, &rng).await?;
        steps.pass(&format!(
            "{kind} enrolled with proof of possession: {} (key {})",
            device.device_id,
            &device.jwk.thumbprint()[..12]
        ));
        enrolled.push((identity, profile, device));
    }
    let (reader_identity, reader_profile, reader) = &enrolled[0];
    steps.pass("each device credential verified against /.well-known/jwks.json");

    let proof = sim::enrolment_proof(&factory, reader_identity, reader_profile, &SystemClock, &rng).await?;
    match factory.enrol(&proof).await {
        Err(e) if e.problem_reason() == Some("key-already-enrolled") => {
            steps.pass("second enrolment of the same key refused: key-already-enrolled")
        }
        other => bail!("a re-enrolled key was not refused: {other:?}"),
    }
    match factory.enrol(&proof).await {
        Err(e) if e.problem_reason() == Some("replayed-enrolment") => {
            steps.pass("replayed enrolment proof refused: replayed-enrolment")
        }
        other => bail!("a replayed proof was not refused: {other:?}"),
    }

    admin.change_device_status(&reader.device_id, "suspend", "reported lost").await?;
    admin.change_device_status(&reader.device_id, "reactivate", "found at the counter").await?;
    let revoked = admin.change_device_status(&enrolled[2].2.device_id, "revoke", "decommissioned").await?;
    steps.pass(&format!("reader suspended then reactivated; terminal {}", revoked.status));

    let kid = admin.rotate_keys().await?;
    let jwks = admin.jwks().await?;
    sim::verify_device_credential(&reader.device_credential, &jwks, &SystemClock)?;
    steps.pass(&format!(
        "signing key rotated to {kid}; old credentials still verify ({} keys published)",
        jwks.keys.len()
    ));

    attestation_steps(&server, &admin, &factory, &merchant.merchant_id, &mut steps, &rng).await?;
    token_steps(&server, &factory, &merchant.merchant_id, &mut steps, &rng).await?;
    session_steps(&server, &admin, &factory, &merchant.merchant_id, &mut steps, &rng).await?;
    dvv_steps(&server, &admin, &factory, &merchant.merchant_id, &mut steps, &rng).await?;
    offline_steps(&server, &admin, &merchant, &mut steps, &rng).await?;
    tsm_steps(&server, &admin, &merchant.merchant_id, &mut steps, &rng).await?;

    let audit = admin.verify_audit().await?;
    if !audit.intact {
        bail!("audit chain broken: {:?}", audit.first_break);
    }
    steps.pass(&format!("audit hash chain intact over {} decisions", audit.rows_checked));

    println!("demo complete: {} steps passed, 0 failed", steps.done);
    Ok(ExitCode::SUCCESS)
}

/// Seed 002: a clean terminal is approved, a tampered one denied with its reasons, and
/// an approval stops counting the moment its device is suspended.
async fn attestation_steps(
    server: &LocalServer,
    admin: &VouchClient,
    factory: &VouchClient,
    merchant_id: &str,
    steps: &mut Steps,
    rng: &SystemRandom,
) -> anyhow::Result<()> {
    let clean_state = SimulatedDeviceState::clean(DeviceKind::Terminal, merchant_id);
    let reference = admin.put_reference_values(&clean_state.reference_values()).await?;
    steps.pass(&format!(
        "reference values registered for {} firmware {}: {} measured regions, OS patch >= {}",
        reference.model,
        reference.firmware_version,
        reference.measurements.len(),
        reference.min_os_patch_level
    ));

    // Devices attest with their own signatures; they hold no API key.
    let device_client = VouchClient::new(&server.url)?;
    let clean_identity = DeviceIdentity::generate(rng)?;
    let clean = sim::enrol(factory, &clean_identity, &clean_state.profile(), &SystemClock, rng).await?;
    let mut monitor = TamperMonitor::new(clean_state);
    let approved =
        sim::attest(&device_client, &clean_identity, &clean.device_id, &mut monitor, &SystemClock, rng).await?;
    if approved.outcome.status != EarStatus::Affirming {
        bail!("the clean terminal was not approved: {:?}", approved.outcome);
    }
    steps.pass(&format!(
        "clean terminal {} attested: {} after {} commands, risk {}, ticket {} verified (expires in {} s)",
        clean.device_id,
        approved.outcome.status.as_str(),
        approved.challenge.commands.len(),
        approved.outcome.risk,
        approved.outcome.ticket_id,
        approved.claims.exp - approved.claims.iat
    ));

    let tampers = [Tamper::Root, Tamper::TamperSwitch];
    let tampered_state = SimulatedDeviceState::clean(DeviceKind::Terminal, merchant_id).with_tampers(&tampers);
    let tampered_identity = DeviceIdentity::generate(rng)?;
    let tampered = sim::enrol(factory, &tampered_identity, &tampered_state.profile(), &SystemClock, rng).await?;
    let mut tampered_monitor = TamperMonitor::new(tampered_state);
    let denied =
        sim::attest(&device_client, &tampered_identity, &tampered.device_id, &mut tampered_monitor, &SystemClock, rng)
            .await?;
    let codes: Vec<&str> = denied.outcome.reasons.iter().map(|r| r.code.as_str()).collect();
    if denied.outcome.status != EarStatus::Contraindicated || tampers.iter().any(|t| !codes.contains(&t.reason_code()))
    {
        bail!("the tampered terminal was not denied for its tampering: {:?}", denied.outcome);
    }
    steps.pass(&format!(
        "rooted, opened terminal {} denied: {} with signed reasons {}",
        tampered.device_id,
        denied.outcome.status.as_str(),
        codes.join(", ")
    ));

    let ticket = &approved.outcome.ticket;
    let before = admin.verify_ticket(ticket).await?;
    if !before.valid {
        bail!("the clean terminal's ticket did not verify: {before:?}");
    }
    admin.change_device_status(&clean.device_id, "suspend", "reported stolen").await?;
    let after = admin.verify_ticket(ticket).await?;
    if after.valid {
        bail!("a suspended device's ticket still verified: {after:?}");
    }
    steps.pass(&format!(
        "clean ticket valid at /v1/tickets/verify; after suspending the terminal: refused ({})",
        after.reason.as_deref().unwrap_or("no reason given")
    ));

    let history = admin.attestations(&clean.device_id).await?;
    let latest = history.first().map_or("none", |a| a.status.as_str());
    steps.pass(&format!("attestation history of {}: {} recorded, latest {latest}", clean.device_id, history.len()));
    Ok(())
}

/// Seed 001 (first part): a clean terminal trades its ticket for a DPoP-bound session, derives a
/// sub-session and has a receipt signed; a replayed proof is refused, and once the
/// session ends neither its token nor the sub-session's works.
async fn token_steps(
    server: &LocalServer,
    factory: &VouchClient,
    merchant_id: &str,
    steps: &mut Steps,
    rng: &SystemRandom,
) -> anyhow::Result<()> {
    let (terminal_id, _, session) = attested_session(server, factory, DeviceKind::Terminal, merchant_id, rng).await?;
    let claims = session.claims();
    steps.pass(&format!(
        "terminal {} traded its ticket for session {}: token bound to its key {} (DPoP), expires in {} s",
        terminal_id,
        claims.sid,
        &claims.cnf.jkt[..12],
        claims.exp - claims.iat
    ));

    let subsession = session.subsession().await?;
    steps.pass(&format!(
        "sub-session {} derived by token exchange: same key, same session",
        subsession.subsession_id().unwrap_or_default()
    ));

    let receipt = sha256(b"receipt 0001: 1 flat white, 3.40 EUR");
    let signed = subsession.sign_digest(&receipt).await?;
    steps.pass(&format!(
        "receipt digest signed for sub-session {} ({}), signature verified against /.well-known/jwks.json",
        signed.claims.subsession_id.as_deref().unwrap_or_default(),
        signed.claims.jti
    ));

    let body = serde_json::json!({ "digest": b64::encode(receipt) });
    let proof = session.proof(&Method::POST, SIGN_PATH)?;
    session.send_with_proof::<serde_json::Value>(Method::POST, SIGN_PATH, Some(&body), &proof).await?;
    match session.send_with_proof::<serde_json::Value>(Method::POST, SIGN_PATH, Some(&body), &proof).await {
        Err(e) if e.problem_reason() == Some("dpop-replayed") => {
            steps.pass("replayed DPoP proof refused: dpop-replayed")
        }
        other => bail!("a replayed DPoP proof was not refused: {other:?}"),
    }

    let ended = session.end().await?;
    for (what, handle) in [("session", &session), ("sub-session", &subsession)] {
        match handle.sign_digest(&receipt).await {
            Err(e) if e.oauth_error() == Some("invalid_token") => {}
            other => bail!("the {what} token still worked after its session ended: {other:?}"),
        }
    }
    steps.pass(&format!(
        "session {} ended ({} sessions): session and sub-session tokens refused with invalid_token",
        ended.sid, ended.sessions_ended
    ));
    Ok(())
}

/// A clean device of `kind` enrolled by the factory, attested, and holding a token
/// session opened with its ticket: its id, its attestation and the session.
async fn attested_session(
    server: &LocalServer,
    factory: &VouchClient,
    kind: DeviceKind,
    merchant_id: &str,
    rng: &SystemRandom,
) -> anyhow::Result<(String, sim::Attestation, TokenSession)> {
    // Devices attest and use their tokens with their own signatures; they hold no API key.
    let device_client = VouchClient::new(&server.url)?;
    let state = SimulatedDeviceState::clean(kind, merchant_id);
    let identity = Arc::new(DeviceIdentity::generate(rng)?);
    let device = sim::enrol(factory, &identity, &state.profile(), &SystemClock, rng).await?;
    let mut monitor = TamperMonitor::new(state);
    let attestation =
        sim::attest(&device_client, &identity, &device.device_id, &mut monitor, &SystemClock, rng).await?;
    let ticket = &attestation.outcome.ticket;
    let session = TokenSession::open(&device_client, identity, ticket, Arc::new(SystemClock), rng).await?;
    Ok((device.device_id, attestation, session))
}

/// Seed 000: a card reader and a POS app that share only a byte pipe get a channel once
/// the server has validated both, and carry an encrypted card read over it; a reader
/// whose enclosure is open gets no grant.
async fn session_steps(
    server: &LocalServer,
    admin: &VouchClient,
    factory: &VouchClient,
    merchant_id: &str,
    steps: &mut Steps,
    rng: &SystemRandom,
) -> anyhow::Result<()> {
    for kind in [DeviceKind::Reader, DeviceKind::Pos] {
        admin.put_reference_values(&ReferenceValues::simulated(kind)).await?;
    }
    let (_, attestation, session) = attested_session(server, factory, DeviceKind::Pos, merchant_id, rng).await?;
    let pos = PosApp::new(session, &attestation.outcome.ticket)?;
    let reader_profile = DeviceProfile::simulated(DeviceKind::Reader, merchant_id);
    let reader =
        CardReader::provision(factory, DeviceIdentity::generate(rng)?, &reader_profile, &SystemClock, rng).await?;
    let reader_id = reader.device_id().to_owned();
    steps.pass(&format!(
        "POS app {} attested {}; card reader {reader_id} provisioned with {} pinned server keys",
        pos.device_id(),
        attestation.outcome.status.as_str(),
        reader.pinned_keys().keys.len()
    ));

    let (reader_outcome, pos_outcome) = run_pair(reader, &pos).await?;
    let (reader_session, pos_session) = match (reader_outcome, pos_outcome) {
        (Ok(Some(reader_session)), Ok(pos_session)) => (reader_session, pos_session),
        other => bail!("the clean reader and POS app got no session: {other:?}"),
    };
    if reader_session.session_id != pos_session.session_id {
        bail!("the reader and the POS app ran different sessions: {reader_session:?} {pos_session:?}");
    }
    steps.pass(&format!(
        "reader hello and POS ticket validated: grant {} checked by the reader against its pinned keys",
        pos_session.session_id
    ));
    let Some(read) = pos_session.card_reads.first() else { bail!("no card read arrived: {pos_session:?}") };
    steps.pass(&format!(
        "{NOISE_PARAMS} over the byte pipe: encrypted card read ({} bytes of TLV: card {}, {}.{:02} EUR, ATC {}) \
         decoded by the POS app and acknowledged, {} records",
        read.to_tlv()?.len(),
        read.masked_pan(),
        read.amount_minor / 100,
        read.amount_minor % 100,
        read.atc,
        pos_session.records_exchanged()
    ));

    let mut opened =
        CardReader::provision(factory, DeviceIdentity::generate(rng)?, &reader_profile, &SystemClock, rng).await?;
    opened.set_tamper(TamperState { switch_open: true });
    let opened_id = opened.device_id().to_owned();
    match run_pair(opened, &pos).await? {
        (Ok(None), Err(e)) if e.problem_reason() == Some("reader-tampered") => steps.pass(&format!(
            "reader {opened_id} with its enclosure open refused by the server: reader-tampered; it got no grant"
        )),
        other => bail!("the opened reader was not refused: {other:?}"),
    }
    Ok(())
}

/// Seed 004: a consumer's phone, validated again at each request, gets a short value
/// that a terminal's authorization carries back; the server counts its uses, so a
/// used-up or wrong value is declined and the phone asks for a fresh one.
async fn dvv_steps(
    server: &LocalServer,
    admin: &VouchClient,
    factory: &VouchClient,
    merchant_id: &str,
    steps: &mut Steps,
    rng: &SystemRandom,
) -> anyhow::Result<()> {
    let shop = NewMerchant {
        name: "Corner Grocer".into(),
        card_acceptor_id: Some("CORNERGROCER001".into()),
        merchant_category: Some(GROCERY.into()),
    };
    let grocer = admin.create_merchant_with(&shop).await?;
    let registered = admin.create_terminal(&grocer.merchant_id, "TERM0001").await?;
    steps.pass(&format!(
        "merchant {} registered as card acceptor {} (category {GROCERY}); terminal {} ({}) with its own API key",
        grocer.merchant_id, registered.card_acceptor_id, registered.terminal_id, registered.iso_terminal_id
    ));

    admin.put_reference_values(&ReferenceValues::simulated(DeviceKind::Consumer)).await?;
    let (phone_id, attestation, session) =
        attested_session(server, factory, DeviceKind::Consumer, merchant_id, rng).await?;
    let consumer = admin.create_consumer("Ada").await?;
    admin.add_consumer_device(&consumer.consumer_id, &phone_id).await?;
    let account = AccountRef::parse("4895370012003478")?;
    admin.add_payment_account(&consumer.consumer_id, &account).await?;
    steps.pass(&format!(
        "consumer {} with phone {phone_id} (attested {}) and payment account {account}",
        consumer.consumer_id,
        attestation.outcome.status.as_str()
    ));

    let wallet = Wallet::new(session);
    let issued = wallet.request_dvv(&account, Some(GROCERY)).await?;
    steps.pass(&format!(
        "phone validated again and issued DVV {} for {account}: assurance {} (its first digit), {} use(s) or {} s, \
         up to {}.{:02} EUR",
        issued.dvv.expose(),
        issued.assurance.level(),
        issued.max_uses,
        issued.expires_at - SystemClock.now_unix(),
        issued.amount_limit_minor / 100,
        issued.amount_limit_minor % 100
    ));

    let terminal = PaymentTerminal::registered(&server.url, &registered, Arc::new(SystemClock))?;
    let payment = |dvv: &Dvv| AuthorizationInput {
        account_ref: account.clone(),
        dvv: dvv.clone(),
        amount_minor: 1250,
        currency: "978".into(),
        entry_mode: "071".into(),
        retrieval_reference: None,
    };
    let approved = expect_code(terminal.authorize(&payment(&issued.dvv)).await?, "00")?;
    steps.pass(&format!(
        "terminal {} authorized 12.50 EUR with it: 00 approved, authorization code {}, STAN {}",
        registered.iso_terminal_id,
        approved.authorization_code.as_deref().unwrap_or_default(),
        approved.stan
    ));

    let used_up = expect_code(terminal.authorize(&payment(&issued.dvv)).await?, "54")?;
    steps.pass(&format!("the same DVV again: declined 54 ({})", used_up.reason));

    let wrong = another_value(&issued.dvv)?;
    let mismatch = expect_code(terminal.authorize(&payment(&wrong)).await?, "05")?;
    steps.pass(&format!(
        "a wrong DVV: declined 05 ({}); {} wrong ones in a row lock the account with 75",
        mismatch.reason, server.state.config.dvv_wrong_tries_max
    ));

    let fresh = wallet.request_dvv(&account, Some(GROCERY)).await?;
    let renewed = expect_code(terminal.authorize(&payment(&fresh.dvv)).await?, "00")?;
    steps.pass(&format!(
        "after it ran out the phone asked again: fresh DVV {} approved 00 (authorization {})",
        fresh.dvv.expose(),
        renewed.authorization_id
    ));

    iso8583_exchange_steps(server, &registered, &terminal, &wallet, &account, steps).await
}

/// A payment switch on the ISO 8583 listener: an echo test, then the terminal's next
/// payment as an 0100 carrying a fresh DVV in DE 48, decided as over HTTP. The 0100
/// takes the terminal's next STAN: with DE 7 and the terminal, DE 11 is the retry key
/// both channels share.
async fn iso8583_exchange_steps(
    server: &LocalServer,
    registered: &TerminalCreated,
    terminal: &PaymentTerminal,
    wallet: &Wallet,
    account: &AccountRef,
    steps: &mut Steps,
) -> anyhow::Result<()> {
    let addr = server.iso8583_addr.context("the demo server has no ISO 8583 listener")?;
    let mut switch = Iso8583Client::connect(addr, None).await?;
    let echoed = switch.send(&iso8583::echo(1)?).await?;
    if echoed.get(RESPONSE_CODE_FIELD) != Some(APPROVED) {
        bail!("the echo test was not answered 00: {:?}", echoed.get(RESPONSE_CODE_FIELD));
    }
    steps.pass(&format!(
        "payment switch connected to the ISO 8583 listener at {addr}: 0800 echo test answered {} {APPROVED}",
        echoed.mti()
    ));

    let fresh = wallet.request_dvv(account, Some(GROCERY)).await?;
    let request = AuthorizationMessage {
        account_ref: account.expose().to_owned(),
        amount_minor: 1250,
        currency_numeric: "978".into(),
        stan: terminal.next_stan().parse()?,
        iso_terminal_id: registered.iso_terminal_id.clone(),
        card_acceptor_id: registered.card_acceptor_id.clone(),
        dvv: fresh.dvv.expose().to_owned(),
        ..AuthorizationMessage::default()
    };
    let answer = switch.send(&request.to_message()?).await?;
    let code = answer.get(RESPONSE_CODE_FIELD).unwrap_or_default();
    let Some(authorization_code) = answer.get(AUTHORIZATION_CODE_FIELD).filter(|_| code == APPROVED) else {
        bail!("the 0100 was not approved with an authorization code: DE 39 {code:?}");
    };
    switch.close().await?;
    steps.pass(&format!(
        "another fresh DVV sent by the switch as an 0100 for terminal {} (DE 48): {} approved {code}, \
         authorization code {authorization_code} (DE 38), STAN {}",
        registered.iso_terminal_id,
        answer.mti(),
        answer.get(STAN_FIELD).unwrap_or_default()
    ));
    Ok(())
}

/// White noise mixed into each leg of the offline purchase, full-band SNR in dB.
const OFFLINE_SNR_DB: f64 = 5.0;

/// Seed 001 (second part): a funded phone holding an offline credential pays a
/// certified terminal with neither online, legs (a) and (b) crossing a noisy room by
/// sound; the terminal settles once with a signed receipt, a re-submission moves
/// nothing, the phone's sync brings it the receipt and a refreshed credential, and a
/// counter spent twice is caught and revokes the credential.
async fn offline_steps(
    server: &LocalServer,
    admin: &VouchClient,
    merchant: &MerchantRecord,
    steps: &mut Steps,
    rng: &SystemRandom,
) -> anyhow::Result<()> {
    let device_client = VouchClient::new(&server.url)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let funds = OfflineFunds { currency: "EUR".into(), funded_minor: 10_000, limit_minor: 5_000 };
    let mut phone =
        sim::offline_phone(admin, &device_client, &merchant.merchant_id, &funds, clock.clone(), rng).await?;
    let credential = phone.wallet.credential().context("the phone holds no credential")?.clone();
    let funding = admin.account(&phone.funding_account_id).await?;
    steps.pass(&format!(
        "phone {} of consumer {} got offline credential {} for {} (counters from {}, valid {} days), \
         checked against its {} pinned server keys; funding account left with {}",
        phone.device_id,
        phone.consumer_id,
        phone.wallet.credential_id().unwrap_or_default(),
        money(credential.limit_minor, &funds.currency),
        credential.counter_start,
        (credential.not_after - credential.issued_at) / 86_400,
        phone.wallet.pinned_keys().keys.len(),
        money(u64::try_from(funding.balance_minor)?, &funds.currency)
    ));

    let mut pos = sim::offline_terminal(admin, &merchant.merchant_id, clock.clone(), rng).await?;
    steps.pass(&format!(
        "terminal {} of {} certified by the server (COSE, valid {} days), settling with a terminal-scoped API key",
        pos.terminal_id(),
        pos.certificate().merchant_name,
        (pos.certificate().not_after - clock.now_unix()) / 86_400
    ));

    let mut to_phone = SoundChannel::new(Profile::Audible, 48_000)?.with_noise(OFFLINE_SNR_DB, 1);
    let mut to_pos = SoundChannel::new(Profile::Audible, 48_000)?.with_noise(OFFLINE_SNR_DB, 2);
    let purchase = sim::offline_purchase(&mut pos, &mut phone.wallet, 1_250, "EUR", &mut to_phone, &mut to_pos)?;
    let prompt = &purchase.prompt;
    steps.pass(&format!(
        "leg (a), certificate + request ({} bytes), sent as {:.2} s of {} audio with white noise at {OFFLINE_SNR_DB} dB \
         SNR, decoded and checked by the phone offline: it shows {} asking {}",
        purchase.leg_a.bytes.len(),
        purchase.leg_a.audio_secs,
        to_phone.profile(),
        prompt.merchant_name,
        money(prompt.amount_minor, &prompt.currency)
    ));
    steps.pass(&format!(
        "leg (b), approval under counter {} + credential ({} bytes), {:.2} s of audio with noise, decoded; \
         the terminal checked it against the credential, countersigned and queued payment {}",
        purchase.payment.counter,
        purchase.leg_b.bytes.len(),
        purchase.leg_b.audio_secs,
        short(&purchase.payment.payment_id)
    ));

    let settlement = pos.settle().await?;
    let Some(settled) = settlement.settled.first() else {
        bail!("the offline payment was not settled: {:?}", settlement.refused)
    };
    let jwks = admin.jwks().await?;
    verify_receipt(&settled.receipt, |kid| jwks.cose_key(kid))?;
    let shop_account = format!("acc_settle_{}_EUR", merchant.merchant_id);
    let shop_balance = admin.account(&shop_account).await?.balance_minor;
    steps.pass(&format!(
        "settled in {} batch: transfer {} from the offline reserve, receipt ({} bytes) verified against \
         /.well-known/jwks.json; merchant's settlement account {}",
        settlement.batches,
        short(&settled.transfer_id),
        settled.receipt.len(),
        money(u64::try_from(shop_balance)?, "EUR")
    ));

    match &pos.submit(std::slice::from_ref(&settled.payment)).await?[..] {
        [SettlementOutcome::Settled { receipt, first_time: false, .. }] if *receipt == settled.receipt => {}
        other => bail!("a re-submitted payment was not answered with its receipt: {other:?}"),
    }
    if admin.account(&shop_account).await?.balance_minor != shop_balance {
        bail!("a re-submitted payment moved money");
    }
    steps.pass("the same payment re-submitted: already settled, the same receipt, nothing moved");

    let synced = phone.wallet.sync().await?;
    let same_receipt = phone.wallet.approved().first().and_then(|p| p.receipt.as_ref()).map(|r| &r.receipt);
    if synced.matched != 1 || same_receipt != Some(&settled.receipt) {
        bail!("the phone's sync did not bring the POS's receipt: {synced:?}");
    }
    let closed = synced.closed.context("the sync closed no credential")?;
    let refreshed = phone.wallet.credential().context("the sync refreshed no credential")?;
    steps.pass(&format!(
        "back online, the phone synced: its receipt verified with its pinned keys (the POS's very bytes); \
         credential closed at counter {} with its limit lowered to {}, refreshed as {} for the {} left",
        closed.counter_end,
        money(closed.limit_minor, "EUR"),
        phone.wallet.credential_id().unwrap_or_default(),
        money(refreshed.limit_minor, "EUR")
    ));

    double_spend_steps(&mut phone, &mut pos, admin, &merchant.merchant_id, clock, steps, rng).await
}

/// A phone restored from a backup approves a second purchase, at another terminal,
/// under a counter it spent already: settlement refuses it and revokes the credential.
async fn double_spend_steps(
    phone: &mut sim::OfflinePhone,
    first_shop: &mut OfflinePos,
    admin: &VouchClient,
    merchant_id: &str,
    clock: Arc<dyn Clock>,
    steps: &mut Steps,
    rng: &SystemRandom,
) -> anyhow::Result<()> {
    let counter = phone.wallet.next_counter().context("the phone holds no credential")?;
    let mut quiet = SoundChannel::new(Profile::Audible, 48_000)?;
    let mut second_shop = sim::offline_terminal(admin, merchant_id, clock, rng).await?;
    let mut buy = |pos: &mut OfflinePos, wallet: &mut vouch_device::OfflineWallet| {
        let mut back = quiet.clone();
        sim::offline_purchase(pos, wallet, 300, "EUR", &mut quiet, &mut back)
    };
    buy(first_shop, &mut phone.wallet)?;
    phone.wallet.restore_counter(counter)?;
    buy(&mut second_shop, &mut phone.wallet)?;
    first_shop.settle().await?;
    let caught = second_shop.settle().await?;
    let reason = caught.refused.first().map(|(_, reason)| reason.as_str());
    if reason != Some("double-spend") {
        bail!("the double spend was not refused: {caught:?}");
    }
    buy(first_shop, &mut phone.wallet)?;
    let after = first_shop.settle().await?;
    if after.refused.first().map(|(_, reason)| reason.as_str()) != Some("credential-revoked") {
        bail!("the revoked credential still paid: {after:?}");
    }
    steps.pass(&format!(
        "phone restored to counter {counter} paid two terminals with it: the second refused as double-spend, \
         the credential revoked (its next payment refused credential-revoked)"
    ));
    Ok(())
}

/// `amount_minor` of `currency`, e.g. `12.50 EUR`.
/// Seed 003: a device maker's CA registered, a payment app signed, a phone's crypto SE
/// provisioned and its app SE given the app over a second channel, a message relayed to
/// a provider that opens it, a replay and a forgery answered, and a provider that was
/// down receiving its message once it is back.
async fn tsm_steps(
    server: &LocalServer,
    admin: &VouchClient,
    merchant_id: &str,
    steps: &mut Steps,
    rng: &SystemRandom,
) -> anyhow::Result<()> {
    const APP_ID: &str = "pay.wallet";
    const SE_PROFILE: &str = "javacard-3.1";
    const INSTRUMENT: &str = "tok_4111_demo";
    let device_client = VouchClient::new(&server.url)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (maker, issuer) = sim::tsm_maker(admin, "Acme Secure Elements", clock.clone(), rng).await?;
    steps.pass(&format!(
        "device maker's CA registered as secure element issuer {} ({})",
        issuer.issuer_id, issuer.subject
    ));

    let code = b"payment application code, release 1".to_vec();
    let release = admin.publish_tsm_app(&sim::tsm_app_manifest(APP_ID, 1, &code, SE_PROFILE)).await?;
    steps.pass(&format!(
        "payment app {APP_ID} v{} signed with the server's key (manifest {}, code SHA-256 {}...)",
        release.version,
        release.manifest_id,
        &release.code_sha256[..16]
    ));

    let setup =
        TsmPhoneSetup { instrument: INSTRUMENT.into(), app_id: APP_ID.into(), code, se_profile: SE_PROFILE.into() };
    let mut phone = sim::tsm_phone(admin, &device_client, merchant_id, &maker, &setup, clock, rng).await?;
    steps.pass(&format!(
        "phone {} provisioned: its crypto SE (certificate {}) checked the server's signature and opened its \
         256-bit device key and payment certificate, sealed to it with HPKE; registration {}",
        phone.device_id,
        phone.crypto_se.certificate().serial,
        phone.crypto_se.registration_id().unwrap_or_default()
    ));
    let held = phone.app_se.state_bytes();
    let registration = phone.crypto_se.registration_id().unwrap_or_default().as_bytes().to_vec();
    if [registration.as_slice(), INSTRUMENT.as_bytes()].iter().any(|secret| contains(&held, secret)) {
        bail!("the app SE holds the crypto SE's registration or instrument");
    }
    steps.pass(&format!(
        "app SE (certificate {}) installed {APP_ID} v{} from a second channel sealed to its own key, after checking \
         the manifest's signature and the code's hash; it holds no device key, registration or instrument",
        phone.app_se.certificate().serial,
        phone.app.version()
    ));

    let provider = sim::tsm_provider(admin, "First Bank", rng).await?;
    let gateway = sim::tsm_gateway(admin, "SMS gateway").await?;
    let envelope = phone.message(provider.provider_id(), b"pay 12.50 EUR to Corner Coffee")?;
    let accepted = gateway.relay_tsm_message(&phone.device_id, &envelope).await?;
    let received = provider.receiver.wait_for(1, Duration::from_secs(30)).await?;
    let opened = received.last().context("the provider received nothing")?;
    steps.pass(&format!(
        "fingerprint matched; the crypto SE sealed a message (counter {}) that the SMS gateway passed in; Vouch \
         opened it, re-encrypted it for {} and delivered it (Idempotency-Key {}); the provider opened {:?}",
        accepted.counter,
        provider.record.name,
        accepted.message_id,
        String::from_utf8_lossy(&opened.body.payload)
    ));

    let again = gateway.relay_tsm_message(&phone.device_id, &envelope).await?;
    let mut forged = envelope.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    match gateway.relay_tsm_message(&phone.device_id, &forged).await {
        Err(e) if e.problem_reason() == Some("message-not-authentic") && again.duplicate => steps.pass(&format!(
            "the same SMS replayed: answered as before ({}), not delivered again; a forged one refused: \
             message-not-authentic",
            again.message_id
        )),
        other => bail!("a replay or a forgery was not answered as such: {:?} / {other:?}", again.duplicate),
    }

    let intercepted = phone.message(provider.provider_id(), b"pay 1.00 EUR to Corner Coffee")?;
    let newer = phone.message(provider.provider_id(), b"pay 2.00 EUR to Corner Coffee")?;
    let accepted = gateway.relay_tsm_message(&phone.device_id, &newer).await?;
    provider.receiver.wait_for(2, Duration::from_secs(30)).await?;
    match gateway.relay_tsm_message(&phone.device_id, &intercepted).await {
        Err(e) if e.problem_reason() == Some("replayed-counter") => steps.pass(&format!(
            "an intercepted SMS replayed after a newer one (counter {}) was accepted: refused, replayed-counter",
            accepted.counter
        )),
        other => bail!("an older counter was not refused: {other:?}"),
    }

    provider.receiver.set_mode(ReceiverMode::Down);
    let envelope = phone.message(provider.provider_id(), b"pay 3.20 EUR to Corner Coffee")?;
    let queued = gateway.relay_tsm_message(&phone.device_id, &envelope).await?;
    // An attempt counts when the message is claimed; its failure shows once it is over.
    let waiting =
        outbox_entry_when(admin, &queued.message_id, |entry| entry.attempts >= 1 && entry.last_error.is_some()).await?;
    steps.pass(&format!(
        "provider down: message {} kept in the outbox ({} attempt failed: {}; retried with backoff)",
        waiting.message_id,
        waiting.attempts,
        waiting.last_error.as_deref().unwrap_or("no answer")
    ));
    provider.receiver.set_mode(ReceiverMode::Up);
    provider.receiver.wait_for(3, Duration::from_secs(60)).await?;
    let delivered =
        outbox_entry_when(admin, &queued.message_id, |entry| entry.status == OutboxStatus::Delivered).await?;
    let stats = provider.receiver.stats();
    steps.pass(&format!(
        "provider back: the message delivered after {} attempts, received once ({} messages in all)",
        delivered.attempts, stats.received
    ));
    Ok(())
}

/// The outbox entry of `message_id` once `ready` holds of it, polling for up to a minute.
async fn outbox_entry_when(
    admin: &VouchClient,
    message_id: &str,
    ready: impl Fn(&OutboxEntry) -> bool,
) -> anyhow::Result<OutboxEntry> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = admin.tsm_outbox(&OutboxQuery::default()).await?;
        if let Some(entry) = page.messages.into_iter().find(|m| m.message_id == message_id)
            && ready(&entry)
        {
            return Ok(entry);
        }
        if std::time::Instant::now() > deadline {
            bail!("outbox entry {message_id} did not reach the expected state in time");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|window| window == needle)
}

fn money(amount_minor: u64, currency: &str) -> String {
    format!("{}.{:02} {currency}", amount_minor / 100, amount_minor % 100)
}

/// The start of a long hex id, for a line a person reads.
fn short(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

/// `dvv` with its last digit changed: well-formed, but not the value issued.
fn another_value(dvv: &Dvv) -> anyhow::Result<Dvv> {
    let text = dvv.expose();
    let (head, last) = text.split_at(text.len().saturating_sub(1));
    let last = last.parse::<u8>()?;
    let changed = format!("{head}{}", (last + 1) % 10);
    Ok(Dvv::parse(&changed, Digits::new(u8::try_from(changed.len())?)?)?)
}

/// `decided`, if its response code is `code`.
fn expect_code(decided: Authorization, code: &str) -> anyhow::Result<Authorization> {
    if decided.response_code != code {
        bail!("expected response code {code}, got {} ({})", decided.response_code, decided.reason);
    }
    Ok(decided)
}

/// Runs `reader` and `pos` against each other over an in-memory byte pipe, one card
/// read of 3.40 EUR.
async fn run_pair(
    mut reader: CardReader,
    pos: &PosApp,
) -> anyhow::Result<(Result<Option<ReaderSession>, DeviceError>, Result<PosSession, DeviceError>)> {
    let (reader_end, pos_end) = tokio::io::duplex(64 * 1024);
    let (reader_read, reader_write) = tokio::io::split(reader_end);
    let (pos_read, pos_write) = tokio::io::split(pos_end);
    let reader_task = tokio::spawn(async move {
        let mut pipe = FramedPipe::new(reader_read, reader_write);
        let mut card = SimulatedCard::test_card();
        reader.run_session(&mut pipe, &mut card, &[340], &SystemClock, &SystemRandom::new()).await
    });
    let pos_outcome = pos.run_session(&mut FramedPipe::new(pos_read, pos_write)).await;
    Ok((reader_task.await?, pos_outcome))
}
