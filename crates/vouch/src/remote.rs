//! Commands that talk to a running server over its API, as an integrator's scripts
//! would: merchants, devices, and the device simulators (`vouch sim`).

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use vouch_device::attest::{ReferenceValues, SimulatedDeviceState, Tamper, TamperMonitor};
use vouch_device::offline::sound::SoundChannel;
use vouch_device::session::{CardReader, FramedPipe, PosApp, SimulatedCard};
use vouch_device::sim::{self, DeviceProfile, OfflineFunds};
use vouch_device::{DeviceError, DeviceIdentity, NewMerchant, TokenSession, VouchClient, Wallet};
use vouch_proto::crypto::SystemRandom;
use vouch_proto::dvv::AccountRef;
use vouch_proto::enrol::DeviceKind;
use vouch_proto::session::TamperState;
use vouch_proto::{Clock, JwkSet, SystemClock, b64};
use vouch_sonic::Profile;

#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// Base URL of the Vouch server.
    #[arg(long, env = "VOUCH_SERVER", default_value = "http://127.0.0.1:8700")]
    server: String,
    /// API key (see DATA_DIR/admin.key for the bootstrap admin key).
    #[arg(long, env = "VOUCH_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl RemoteArgs {
    fn client(&self) -> anyhow::Result<VouchClient> {
        Ok(VouchClient::new(&self.server)?.with_api_key(&self.api_key))
    }

    fn print<T: Serialize + std::fmt::Debug>(&self, value: &T, text: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string(value)?);
        } else {
            println!("{}", text(value));
        }
        Ok(())
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum MerchantCommand {
    /// Register a merchant.
    Create {
        #[command(flatten)]
        remote: RemoteArgs,
        #[arg(long)]
        name: String,
    },
    /// List merchants.
    List {
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// Enrol a device with a key of its own (the simulator's enrolment, with a merchant you name).
    Enrol {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// List devices.
    List {
        #[command(flatten)]
        remote: RemoteArgs,
        #[arg(long)]
        merchant_id: Option<String>,
    },
    /// Suspend a device.
    Suspend(StatusArgs),
    /// Reactivate a suspended device.
    Reactivate(StatusArgs),
    /// Revoke a device for good.
    Revoke(StatusArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    device_id: String,
    #[arg(long, default_value = "changed with the vouch CLI")]
    reason: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// reader, pos, terminal or consumer.
    #[arg(long)]
    kind: DeviceKind,
    /// PKCS#8 PEM P-256 private key; a new key is generated when omitted.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Write the (new) device key here as PKCS#8 PEM, mode 0600.
    #[arg(long)]
    save_key: Option<PathBuf>,
    /// The owning merchant; a new simulated merchant is registered when omitted (needs the admin scope).
    #[arg(long)]
    merchant_id: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum SimCommand {
    /// Enrol a simulated device and print {device_id, kind, jwk, device_credential}.
    Enroll {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Run one attestation of a simulated device, enrolling it first if needed, and print
    /// {device_id, status, ticket, reasons}. A denial is an answer, not a failure: the
    /// exit status is 0 whatever the verdict.
    Attest(AttestArgs),
    /// Attest a simulated device as `sim attest` does, open a session with its ticket
    /// and derive one sub-session; print {device_id, access_token, sid,
    /// subsession_token}. The tokens are DPoP-bound to the device key.
    Token(AttestArgs),
    /// Run a card reader and a POS app as two processes that talk only through a byte
    /// pipe: enrol both, attest the POS app, have the server grant the session, and
    /// carry one encrypted card read; print {session_id, status, reasons,
    /// records_exchanged}. A refusal is an answer, not a failure: the exit status is 0.
    Session(SessionArgs),
    /// Set up (or reuse) a consumer with an attested phone and a payment account, and
    /// a merchant with a card acceptor id and a terminal; have the phone obtain one DVV
    /// and print {account_ref, dvv, max_uses, expires_at, merchant_id, terminal_id,
    /// card_acceptor_id, iso_terminal_id, terminal_api_key} without using it, for a
    /// terminal to present with POST /v1/authorizations.
    Dvv(DvvArgs),
    /// Set up a merchant with a certified terminal and a funded consumer phone holding an
    /// offline credential; run one purchase with legs (a) and (b) carried by sound with
    /// white noise mixed in, then settle it; print {payment_id, transfer_id, receipt,
    /// settled, sound_seconds}. The receipt (base64url COSE_Sign1) verifies with the
    /// server's key from the JWK Set. A refusal is an answer: settled is false, exit 0.
    Offline(OfflineArgs),
    /// The card reader's side of `sim session`, speaking frames over stdin and stdout.
    #[command(hide = true)]
    ReaderProcess(ReaderProcessArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct SessionArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// The reader reports its enclosure open; the server refuses the session.
    #[arg(long)]
    tamper_reader: bool,
    /// The amount of the simulated card read, in minor units of EUR.
    #[arg(long, default_value_t = 340)]
    amount_minor: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DvvArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// PKCS#8 PEM P-256 key of the consumer's phone, created when missing. The phone's
    /// enrolment is kept in KEY.vouch.json and the consumer, account, merchant and
    /// terminal in KEY.dvv.json (mode 0600: it holds the terminal's API key), so runs
    /// reuse them. Without it everything is set up anew.
    #[arg(long)]
    key: Option<PathBuf>,
    /// ISO 18245 category of the simulated merchant; the phone names it when it asks.
    #[arg(long, default_value = "5411")]
    merchant_category: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct OfflineArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// The purchase, in minor units of EUR (at most the credential's 50.00 EUR).
    #[arg(long, default_value_t = 1_250)]
    amount_minor: u64,
    /// Full-band SNR of the white noise mixed into each leg's recording, in dB.
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    snr_db: f64,
    /// Frequency band of the sound link.
    #[arg(long, value_enum, default_value = "audible")]
    profile: crate::sonic_cmd::ProfileArg,
    /// Seed of the noise generator, so a run can be repeated.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReaderProcessArgs {
    /// The reader's identity key, PKCS#8 PEM.
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    device_id: String,
    #[arg(long)]
    firmware_version: String,
    /// The JWK Set of server keys the reader pinned when it was provisioned.
    #[arg(long)]
    pinned_keys: PathBuf,
    #[arg(long)]
    tamper_switch_open: bool,
    #[arg(long)]
    amount_minor: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AttestArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// PKCS#8 PEM P-256 device key, created when missing. The enrolment and the previous
    /// evidence hash are kept beside it in KEY.vouch.json, so runs reuse one device.
    /// Without it a new device is enrolled on every run.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Comma-separated tamper conditions to simulate: root, debugger, hook, emulator,
    /// modified_code, tamper_switch, old_patch, unknown_firmware, reader_firmware. The
    /// server decides which checks each kind faces (a terminal meets hook and emulator
    /// checks only at random), so a condition it does not ask about goes unseen.
    #[arg(long, value_delimiter = ',')]
    tamper: Vec<Tamper>,
    /// reader, pos, terminal or consumer.
    #[arg(long, default_value = "terminal")]
    kind: DeviceKind,
    /// The owning merchant of a new device; a simulated merchant is registered when omitted.
    #[arg(long)]
    merchant_id: Option<String>,
}

pub async fn merchant(command: MerchantCommand) -> anyhow::Result<ExitCode> {
    match command {
        MerchantCommand::Create { remote, name } => {
            let merchant = remote.client()?.create_merchant(&name).await?;
            remote.print(&merchant, |m| format!("{} {}", m.merchant_id, m.name))?;
        }
        MerchantCommand::List { remote } => {
            let merchants = remote.client()?.merchants().await?;
            remote.print(&merchants, |list| {
                list.iter().map(|m| format!("{} {}", m.merchant_id, m.name)).collect::<Vec<_>>().join("\n")
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn device(command: DeviceCommand) -> anyhow::Result<ExitCode> {
    let (remote, action, args) = match command {
        DeviceCommand::Enrol { remote, device } => return enrol(&remote, &device).await,
        DeviceCommand::List { remote, merchant_id } => {
            let devices = remote.client()?.devices(merchant_id.as_deref()).await?;
            remote.print(&devices, |list| {
                list.iter()
                    .map(|d| format!("{} {} {} {} {}", d.device_id, d.kind, d.status, d.merchant_id, d.model))
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        DeviceCommand::Suspend(args) => (args.remote.clone(), "suspend", args),
        DeviceCommand::Reactivate(args) => (args.remote.clone(), "reactivate", args),
        DeviceCommand::Revoke(args) => (args.remote.clone(), "revoke", args),
    };
    let device = remote.client()?.change_device_status(&args.device_id, action, &args.reason).await?;
    remote.print(&device, |d| format!("{} {}", d.device_id, d.status))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn sim(command: SimCommand) -> anyhow::Result<ExitCode> {
    match command {
        SimCommand::Enroll { remote, device } => enrol(&remote, &device).await,
        SimCommand::Attest(args) => attest(&args).await,
        SimCommand::Token(args) => token(&args).await,
        SimCommand::Session(args) => session(&args).await,
        SimCommand::Dvv(args) => dvv(&args).await,
        SimCommand::Offline(args) => offline(&args).await,
        SimCommand::ReaderProcess(args) => reader_process(&args).await,
    }
}

#[derive(Debug, Serialize)]
struct EnrolOutput {
    device_id: String,
    kind: DeviceKind,
    merchant_id: String,
    jwk: vouch_proto::Jwk,
    device_credential: String,
}

async fn enrol(remote: &RemoteArgs, args: &DeviceArgs) -> anyhow::Result<ExitCode> {
    let client = remote.client()?;
    let rng = SystemRandom::new();
    let identity = match &args.key {
        Some(path) => DeviceIdentity::load_pem(path)?,
        None => DeviceIdentity::generate(&rng)?,
    };
    if let Some(path) = &args.save_key {
        identity.save_pem(path)?;
    }
    let merchant_id = match &args.merchant_id {
        Some(id) => id.clone(),
        None => client.create_merchant("Simulated merchant").await.context("registering a merchant")?.merchant_id,
    };
    let profile = DeviceProfile::simulated(args.kind, &merchant_id);
    let enrolled = sim::enrol(&client, &identity, &profile, &SystemClock, &rng).await?;
    let output = EnrolOutput {
        device_id: enrolled.device_id,
        kind: enrolled.kind,
        merchant_id: enrolled.merchant_id,
        jwk: enrolled.jwk,
        device_credential: enrolled.device_credential,
    };
    remote.print(&output, |o| format!("enrolled {} {} for merchant {}", o.kind, o.device_id, o.merchant_id))?;
    Ok(ExitCode::SUCCESS)
}

/// What `sim attest --key` remembers between runs, beside the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SimDeviceFile {
    server: String,
    device_id: String,
    kind: DeviceKind,
    merchant_id: String,
    prev_evidence_hash: Option<String>,
}

/// The `sim attest` output. `device_id`, `status`, `ticket` and `reasons` are the
/// stable contract; the rest is there for people and may grow.
#[derive(Debug, Serialize)]
struct AttestOutput {
    device_id: String,
    status: vouch_proto::attest::EarStatus,
    ticket: String,
    reasons: Vec<vouch_proto::attest::Reason>,
    attestation_id: String,
    ticket_id: String,
    risk: u8,
    risk_signals: Vec<String>,
    expires_at: i64,
    tampers: Vec<Tamper>,
    enrolled: bool,
}

/// A simulated device after one attestation, as `sim attest` and `sim token` run it.
struct AttestedDevice {
    identity: DeviceIdentity,
    enrolment: Enrolment,
    attestation: sim::Attestation,
}

/// Loads or creates the device key, enrols the device unless its state file says it
/// is enrolled on this server, attests it, and remembers the evidence chain.
async fn attest_device(client: &VouchClient, args: &AttestArgs, rng: &SystemRandom) -> anyhow::Result<AttestedDevice> {
    let (identity, state_path) = match &args.key {
        Some(path) => (load_or_create_key(path, rng)?, Some(state_file_path(path))),
        None => (DeviceIdentity::generate(rng)?, None),
    };
    let remembered = match &state_path {
        Some(path) => read_state_file(path)?.filter(|f| f.server == client.base_url() && f.kind == args.kind),
        None => None,
    };
    let remembered_prev = remembered.as_ref().and_then(|f| f.prev_evidence_hash.clone());
    ensure_reference_values(client, args.kind).await?;

    let mut enrolment = match remembered {
        Some(file) => Enrolment { device_id: file.device_id, merchant_id: file.merchant_id, fresh: false },
        None => enrol_for_attestation(client, &identity, args, rng).await?,
    };
    let device_state =
        |merchant_id: &str| SimulatedDeviceState::clean(args.kind, merchant_id).with_tampers(&args.tamper);
    let mut monitor = TamperMonitor::resume(device_state(&enrolment.merchant_id), remembered_prev);
    let outcome = sim::attest(client, &identity, &enrolment.device_id, &mut monitor, &SystemClock, rng).await;
    let attestation = match outcome {
        // The remembered enrolment belongs to a database that is gone (a fresh server
        // on the same address): enrol again and start a new chain.
        Err(e) if !enrolment.fresh && e.problem_reason() == Some("unknown-device") => {
            enrolment = enrol_for_attestation(client, &identity, args, rng).await?;
            monitor = TamperMonitor::new(device_state(&enrolment.merchant_id));
            sim::attest(client, &identity, &enrolment.device_id, &mut monitor, &SystemClock, rng).await?
        }
        other => other?,
    };
    if let Some(path) = &state_path {
        let file = SimDeviceFile {
            server: client.base_url().to_owned(),
            device_id: enrolment.device_id.clone(),
            kind: args.kind,
            merchant_id: enrolment.merchant_id.clone(),
            prev_evidence_hash: monitor.prev_evidence_hash().map(str::to_owned),
        };
        write_state_file(path, &file)?;
    }
    Ok(AttestedDevice { identity, enrolment, attestation })
}

async fn attest(args: &AttestArgs) -> anyhow::Result<ExitCode> {
    let remote = &args.remote;
    let client = remote.client()?;
    let AttestedDevice { enrolment, attestation, .. } = attest_device(&client, args, &SystemRandom::new()).await?;
    let outcome = attestation.outcome;
    let output = AttestOutput {
        device_id: enrolment.device_id,
        status: outcome.status,
        ticket: outcome.ticket,
        reasons: outcome.reasons,
        attestation_id: outcome.attestation_id,
        ticket_id: outcome.ticket_id,
        risk: outcome.risk,
        risk_signals: outcome.risk_signals,
        expires_at: outcome.expires_at,
        tampers: args.tamper.clone(),
        enrolled: enrolment.fresh,
    };
    remote.print(&output, |o| {
        let mut text = format!("{} {}: {} (risk {})", args.kind, o.device_id, o.status.as_str(), o.risk);
        for reason in &o.reasons {
            text.push_str(&format!("\n  {}: {}", reason.code, reason.text));
        }
        text.push_str(&format!("\nticket {} (the JWT is in --json)", o.ticket_id));
        text
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The `sim token` output. `device_id`, `access_token`, `sid` and `subsession_token`
/// are the stable contract; the rest is there for people and may grow.
#[derive(Debug, Serialize)]
struct TokenOutput {
    device_id: String,
    access_token: String,
    sid: String,
    subsession_token: String,
    subsession_id: Option<String>,
    /// Always `DPoP`: the tokens are only good with proofs made by the device key.
    token_type: &'static str,
    expires_at: i64,
    ticket_id: String,
    status: vouch_proto::attest::EarStatus,
    enrolled: bool,
}

async fn token(args: &AttestArgs) -> anyhow::Result<ExitCode> {
    let remote = &args.remote;
    let client = remote.client()?;
    let rng = SystemRandom::new();
    let AttestedDevice { identity, enrolment, attestation } = attest_device(&client, args, &rng).await?;
    let outcome = attestation.outcome;
    let session = TokenSession::open(&client, Arc::new(identity), &outcome.ticket, Arc::new(SystemClock), &rng)
        .await
        .with_context(|| format!("opening a session with a {} ticket", outcome.status.as_str()))?;
    let subsession = session.subsession().await.context("deriving a sub-session")?;
    let claims = session.claims();
    let output = TokenOutput {
        device_id: enrolment.device_id,
        access_token: session.access_token(),
        sid: claims.sid,
        subsession_token: subsession.access_token(),
        subsession_id: subsession.subsession_id(),
        token_type: vouch_proto::token::TOKEN_TYPE_DPOP,
        expires_at: claims.exp,
        ticket_id: outcome.ticket_id,
        status: outcome.status,
        enrolled: enrolment.fresh,
    };
    remote.print(&output, |o| {
        format!(
            "{} {}: session {} (expires in {} s), sub-session {}\nDPoP-bound tokens (in --json): only the device key can use them",
            args.kind,
            o.device_id,
            o.sid,
            o.expires_at - SystemClock.now_unix(),
            o.subsession_id.as_deref().unwrap_or("none"),
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The `sim session` output: exactly these keys.
#[derive(Debug, Serialize)]
struct SessionOutput {
    /// `None` when the server refused.
    session_id: Option<String>,
    /// `granted` or `refused`.
    status: &'static str,
    /// The server's problem reasons, e.g. `reader-tampered`.
    reasons: Vec<String>,
    /// Channel records, both ways.
    records_exchanged: u64,
}

/// How long the reader and the POS app may take to finish a session.
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the reader process may take to exit once the POS app has hung up.
const READER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets up a merchant with a reader and an attested POS app, starts the reader as a
/// child process of this binary on a byte pipe (its stdin and stdout), and runs the
/// POS app here.
async fn session(args: &SessionArgs) -> anyhow::Result<ExitCode> {
    let remote = &args.remote;
    let client = remote.client()?;
    let rng = SystemRandom::new();
    let merchant_id = client.create_merchant("Simulated merchant").await.context("registering a merchant")?.merchant_id;
    let device = |kind| AttestArgs {
        remote: remote.clone(),
        key: None,
        tamper: Vec::new(),
        kind,
        merchant_id: Some(merchant_id.clone()),
    };
    let AttestedDevice { identity, attestation, .. } = attest_device(&client, &device(DeviceKind::Pos), &rng).await?;
    let ticket = attestation.outcome.ticket;
    let token_session =
        TokenSession::open(&client, Arc::new(identity), &ticket, Arc::new(SystemClock), &rng).await.with_context(
            || format!("opening the POS app's session with a {} ticket", attestation.outcome.status.as_str()),
        )?;
    let pos = PosApp::new(token_session, &ticket)?;

    ensure_reference_values(&client, DeviceKind::Reader).await?;
    let reader_identity = DeviceIdentity::generate(&rng)?;
    let reader = enrol_for_attestation(&client, &reader_identity, &device(DeviceKind::Reader), &rng).await?;
    // What the reader is provisioned with: its key and the server keys it pins.
    let provisioning = tempfile::tempdir()?;
    let key_path = provisioning.path().join("reader.pem");
    reader_identity.save_pem(&key_path)?;
    let pinned_path = provisioning.path().join("pinned-keys.json");
    std::fs::write(&pinned_path, serde_json::to_vec(&client.jwks().await?)?)?;

    let firmware_version = DeviceProfile::simulated(DeviceKind::Reader, &merchant_id).firmware_version;
    let mut command = tokio::process::Command::new(std::env::current_exe().context("finding this binary")?);
    command
        .args(["sim", "reader-process", "--device-id", &reader.device_id, "--firmware-version", &firmware_version])
        .arg("--key")
        .arg(&key_path)
        .arg("--pinned-keys")
        .arg(&pinned_path)
        .args(["--amount-minor", &args.amount_minor.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if args.tamper_reader {
        command.arg("--tamper-switch-open");
    }
    let mut child = command.spawn().context("starting the reader process")?;
    let (to_reader, from_reader) = child.stdin.take().zip(child.stdout.take()).context("the reader's pipe")?;
    let mut pipe = FramedPipe::new(from_reader, to_reader);
    let outcome = tokio::time::timeout(SESSION_TIMEOUT, pos.run_session(&mut pipe)).await;
    // Hanging up closes the reader's stdin, so it ends too.
    drop(pipe);
    let reader_exit = tokio::time::timeout(READER_EXIT_TIMEOUT, child.wait_with_output())
        .await
        .context("the reader process did not exit")??;
    let reader_log = String::from_utf8_lossy(&reader_exit.stderr).trim().to_owned();
    let outcome =
        outcome.map_err(|_| anyhow::anyhow!("no session within {SESSION_TIMEOUT:?}; reader: {reader_log}"))?;
    if !reader_exit.status.success() {
        bail!("the reader process failed ({}): {reader_log}", reader_exit.status);
    }
    let (output, card_read) = match outcome {
        Ok(session) => {
            let output = SessionOutput {
                session_id: Some(session.session_id.clone()),
                status: "granted",
                reasons: Vec::new(),
                records_exchanged: session.records_exchanged(),
            };
            (output, session.card_reads.into_iter().next())
        }
        Err(e) => match e.problem_reason() {
            Some(reason) => {
                let output = SessionOutput {
                    session_id: None,
                    status: "refused",
                    reasons: vec![reason.to_owned()],
                    records_exchanged: 0,
                };
                (output, None)
            }
            None => return Err(e).context(format!("the POS app's side of the session; reader: {reader_log}")),
        },
    };
    remote.print(&output, |o| {
        let mut text = match &o.session_id {
            Some(id) => {
                format!("reader {} and POS app {}: session {id} {}", reader.device_id, pos.device_id(), o.status)
            }
            None => format!(
                "reader {} and POS app {}: {} ({})",
                reader.device_id,
                pos.device_id(),
                o.status,
                o.reasons.join(", ")
            ),
        };
        if let Some(read) = &card_read {
            text.push_str(&format!(
                "\nencrypted card read: card {}, {}.{:02} EUR, ATC {}; {} records over Noise KK",
                read.masked_pan(),
                read.amount_minor / 100,
                read.amount_minor % 100,
                read.atc,
                o.records_exchanged
            ));
        }
        text
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The reader of `sim session`: frames on stdin and stdout, a line for people on stderr.
async fn reader_process(args: &ReaderProcessArgs) -> anyhow::Result<ExitCode> {
    let identity = DeviceIdentity::load_pem(&args.key)?;
    let pinned: JwkSet = serde_json::from_slice(
        &std::fs::read(&args.pinned_keys).with_context(|| format!("reading {}", args.pinned_keys.display()))?,
    )
    .context("the pinned keys are not a JWK Set")?;
    let mut reader = CardReader::new(identity, &args.device_id, &args.firmware_version, pinned)?;
    reader.set_tamper(TamperState { switch_open: args.tamper_switch_open });
    let mut pipe = FramedPipe::new(tokio::io::stdin(), tokio::io::stdout());
    let mut card = SimulatedCard::test_card();
    let rng = SystemRandom::new();
    match reader.run_session(&mut pipe, &mut card, &[args.amount_minor], &SystemClock, &rng).await? {
        Some(session) => eprintln!(
            "reader {}: session {} with POS app {}: {} records sent, {} received",
            args.device_id, session.session_id, session.pos_device_id, session.records_sent, session.records_received
        ),
        None => eprintln!("reader {}: the POS app hung up before any grant", args.device_id),
    }
    Ok(ExitCode::SUCCESS)
}

/// What `sim dvv --key` remembers between runs, beside the phone's key.
#[derive(Clone, Serialize, Deserialize)]
struct SimDvvFile {
    server: String,
    /// The phone the consumer was set up for; another phone starts afresh.
    phone_device_id: String,
    consumer_id: String,
    account_ref: String,
    shop: SimShop,
}

/// The simulated merchant and its terminal.
#[derive(Clone, Serialize, Deserialize)]
struct SimShop {
    merchant_id: String,
    card_acceptor_id: String,
    merchant_category: String,
    terminal_id: String,
    iso_terminal_id: String,
    terminal_api_key: String,
}

/// The `sim dvv` output. The first nine keys are the stable contract; the rest is
/// there for people and may grow.
#[derive(Debug, Serialize)]
struct DvvOutput {
    account_ref: String,
    dvv: String,
    max_uses: i64,
    expires_at: i64,
    merchant_id: String,
    terminal_id: String,
    card_acceptor_id: String,
    iso_terminal_id: String,
    terminal_api_key: String,
    device_id: String,
    consumer_id: String,
    dvv_id: String,
    assurance: u8,
    amount_limit_minor: i64,
    merchant_category: String,
    /// The phone was enrolled by this run.
    enrolled: bool,
}

const SIM_ISO_TERMINAL_ID: &str = "SIMTRM01";

async fn dvv(args: &DvvArgs) -> anyhow::Result<ExitCode> {
    let remote = &args.remote;
    let client = remote.client()?;
    let rng = SystemRandom::new();
    let phone_args = AttestArgs {
        remote: remote.clone(),
        key: args.key.clone(),
        tamper: Vec::new(),
        kind: DeviceKind::Consumer,
        merchant_id: None,
    };
    let AttestedDevice { identity, enrolment, attestation } = attest_device(&client, &phone_args, &rng).await?;
    let state_path = args.key.as_deref().map(dvv_state_file_path);
    let remembered = match &state_path {
        Some(path) => read_json_file::<SimDvvFile>(path)?
            .filter(|f| f.server == client.base_url() && f.phone_device_id == enrolment.device_id),
        None => None,
    };
    let (consumer_id, account_ref) = match &remembered {
        Some(file) => {
            (file.consumer_id.clone(), AccountRef::parse(&file.account_ref).context("the remembered account")?)
        }
        None => set_up_consumer(&client, &enrolment.device_id, &rng).await?,
    };
    let shop = match remembered.map(|f| f.shop).filter(|shop| shop.merchant_category == args.merchant_category) {
        Some(shop) => shop,
        None => set_up_shop(&client, &args.merchant_category, &rng).await?,
    };
    if let Some(path) = &state_path {
        let file = SimDvvFile {
            server: client.base_url().to_owned(),
            phone_device_id: enrolment.device_id.clone(),
            consumer_id: consumer_id.clone(),
            account_ref: account_ref.expose().to_owned(),
            shop: shop.clone(),
        };
        write_private_file(path, &serde_json::to_vec_pretty(&file)?)?;
    }

    let outcome = attestation.outcome;
    let session = TokenSession::open(&client, Arc::new(identity), &outcome.ticket, Arc::new(SystemClock), &rng)
        .await
        .with_context(|| format!("opening the phone's session with a {} ticket", outcome.status.as_str()))?;
    let issued = Wallet::new(session)
        .request_dvv(&account_ref, Some(&args.merchant_category))
        .await
        .context("the phone asking for a DVV")?;
    let output = DvvOutput {
        account_ref: account_ref.expose().to_owned(),
        dvv: issued.dvv.expose().to_owned(),
        max_uses: issued.max_uses,
        expires_at: issued.expires_at,
        merchant_id: shop.merchant_id,
        terminal_id: shop.terminal_id,
        card_acceptor_id: shop.card_acceptor_id,
        iso_terminal_id: shop.iso_terminal_id,
        terminal_api_key: shop.terminal_api_key,
        device_id: enrolment.device_id,
        consumer_id,
        dvv_id: issued.dvv_id,
        assurance: issued.assurance.level(),
        amount_limit_minor: issued.amount_limit_minor,
        merchant_category: shop.merchant_category,
        enrolled: enrolment.fresh,
    };
    remote.print(&output, |o| {
        format!(
            "phone {} of consumer {}: DVV {} for account {} (assurance {}, {} use(s), expires in {} s), unused\n\
             terminal {} ({}) of merchant {} ({}, category {}); the full account reference and the API key are in --json",
            o.device_id,
            o.consumer_id,
            o.dvv,
            account_ref,
            o.assurance,
            o.max_uses,
            o.expires_at - SystemClock.now_unix(),
            o.terminal_id,
            o.iso_terminal_id,
            o.merchant_id,
            o.card_acceptor_id,
            o.merchant_category,
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The `sim offline` output. The first five keys are the stable contract; the rest is
/// there for people and may grow.
#[derive(Debug, Serialize)]
struct OfflineOutput {
    payment_id: String,
    /// The ledger transfer (the payment id); `None` when settlement refused it.
    transfer_id: Option<String>,
    /// base64url (unpadded) COSE_Sign1 of the server's receipt.
    receipt: Option<String>,
    settled: bool,
    /// Audio time of legs (a) and (b) together.
    sound_seconds: f64,
    /// Why settlement refused the payment.
    reason: Option<String>,
    merchant_id: String,
    merchant_name: String,
    terminal_id: String,
    phone_device_id: String,
    consumer_id: String,
    credential_id: String,
    counter: u64,
    amount_minor: u64,
    currency: String,
    leg_a_bytes: usize,
    leg_b_bytes: usize,
    leg_a_seconds: f64,
    leg_b_seconds: f64,
    profile: String,
    snr_db: f64,
}

/// The offline purchase's sample rate: every phone and POS speaker plays 48 kHz.
const OFFLINE_SAMPLE_RATE_HZ: u32 = 48_000;

async fn offline(args: &OfflineArgs) -> anyhow::Result<ExitCode> {
    let remote = &args.remote;
    let client = remote.client()?;
    // Devices attest and use their sessions with their own signatures; they hold no API key.
    let device_client = VouchClient::new(&remote.server)?;
    let rng = SystemRandom::new();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    ensure_reference_values(&client, DeviceKind::Consumer).await?;
    let merchant = client.create_merchant("Simulated café").await.context("registering a merchant")?;
    let funds = OfflineFunds { currency: "EUR".into(), funded_minor: 10_000, limit_minor: 5_000 };
    let mut phone = sim::offline_phone(&client, &device_client, &merchant.merchant_id, &funds, clock.clone(), &rng)
        .await
        .context("setting up the consumer's phone with an offline credential")?;
    let mut pos = sim::offline_terminal(&client, &merchant.merchant_id, clock, &rng)
        .await
        .context("setting up the certified terminal")?;
    let profile = Profile::from(args.profile);
    let mut to_phone = SoundChannel::new(profile, OFFLINE_SAMPLE_RATE_HZ)?.with_noise(args.snr_db, args.seed);
    let mut to_pos =
        SoundChannel::new(profile, OFFLINE_SAMPLE_RATE_HZ)?.with_noise(args.snr_db, args.seed.wrapping_add(1));
    let purchase = sim::offline_purchase(
        &mut pos,
        &mut phone.wallet,
        args.amount_minor,
        &funds.currency,
        &mut to_phone,
        &mut to_pos,
    )
    .context("the purchase over sound")?;
    let settlement = pos.settle().await.context("settling the terminal's queue")?;
    let (transfer_id, receipt, reason) = match (settlement.settled.first(), settlement.refused.first()) {
        (Some(settled), _) => (Some(settled.transfer_id.clone()), Some(b64::encode(&settled.receipt)), None),
        (None, Some((_, reason))) => (None, None, Some(reason.clone())),
        (None, None) => bail!("settlement answered nothing for the payment"),
    };
    let payment = purchase.payment;
    let output = OfflineOutput {
        payment_id: payment.payment_id,
        settled: transfer_id.is_some(),
        transfer_id,
        receipt,
        sound_seconds: millis(purchase.leg_a.audio_secs + purchase.leg_b.audio_secs),
        reason,
        merchant_id: merchant.merchant_id,
        merchant_name: purchase.prompt.merchant_name,
        terminal_id: pos.terminal_id(),
        phone_device_id: phone.device_id,
        consumer_id: phone.consumer_id,
        credential_id: payment.credential_id,
        counter: payment.counter,
        amount_minor: payment.amount_minor,
        currency: purchase.prompt.currency,
        leg_a_bytes: purchase.leg_a.bytes.len(),
        leg_b_bytes: purchase.leg_b.bytes.len(),
        leg_a_seconds: millis(purchase.leg_a.audio_secs),
        leg_b_seconds: millis(purchase.leg_b.audio_secs),
        profile: profile.to_string(),
        snr_db: args.snr_db,
    };
    remote.print(&output, |o| {
        let outcome = match (&o.transfer_id, &o.reason) {
            (Some(transfer), _) => format!("settled as transfer {transfer}, receipt signed by the server"),
            (None, reason) => format!("refused: {}", reason.as_deref().unwrap_or("no reason given")),
        };
        format!(
            "phone {} paid {}.{:02} {} to {} (terminal {}) offline, under credential {} counter {}\n\
             by sound ({}, {} dB SNR): request {} bytes in {:.2} s, approval {} bytes in {:.2} s\n\
             payment {}: {outcome}",
            o.phone_device_id,
            o.amount_minor / 100,
            o.amount_minor % 100,
            o.currency,
            o.merchant_name,
            o.terminal_id,
            o.credential_id,
            o.counter,
            o.profile,
            o.snr_db,
            o.leg_a_bytes,
            o.leg_a_seconds,
            o.leg_b_bytes,
            o.leg_b_seconds,
            o.payment_id,
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Seconds to the millisecond, for output.
fn millis(secs: f64) -> f64 {
    (secs * 1_000.0).round() / 1_000.0
}

/// A consumer who owns `phone` and one payment account with a random, Luhn-valid
/// reference.
async fn set_up_consumer(
    client: &VouchClient,
    phone: &str,
    rng: &SystemRandom,
) -> anyhow::Result<(String, AccountRef)> {
    let consumer = client.create_consumer("Simulated consumer").await.context("registering a consumer")?;
    client.add_consumer_device(&consumer.consumer_id, phone).await.map_err(|e| match e.problem_reason() {
        Some("device-has-consumer") => anyhow::Error::new(e)
            .context("the phone belongs to a consumer already but its .dvv.json state file is gone"),
        _ => anyhow::Error::new(e).context("making the phone the consumer's"),
    })?;
    let account_ref = AccountRef::with_check_digit(&random_digits::<15>(rng)?)?;
    client.add_payment_account(&consumer.consumer_id, &account_ref).await.context("registering a payment account")?;
    Ok((consumer.consumer_id, account_ref))
}

/// A merchant with a random card acceptor id and `category`, and one terminal.
async fn set_up_shop(client: &VouchClient, category: &str, rng: &SystemRandom) -> anyhow::Result<SimShop> {
    let shop = NewMerchant {
        name: "Simulated shop".into(),
        card_acceptor_id: Some(format!("SIMSHOP{}", random_digits::<8>(rng)?)),
        merchant_category: Some(category.to_owned()),
    };
    let merchant = client.create_merchant_with(&shop).await.context("registering a merchant")?;
    let terminal =
        client.create_terminal(&merchant.merchant_id, SIM_ISO_TERMINAL_ID).await.context("registering a terminal")?;
    Ok(SimShop {
        merchant_id: merchant.merchant_id,
        card_acceptor_id: terminal.card_acceptor_id,
        merchant_category: category.to_owned(),
        terminal_id: terminal.terminal_id,
        iso_terminal_id: terminal.iso_terminal_id,
        terminal_api_key: terminal.api_key,
    })
}

fn random_digits<const N: usize>(rng: &SystemRandom) -> anyhow::Result<String> {
    let bytes = vouch_proto::crypto::random_bytes::<N>(rng)?;
    Ok(bytes.iter().map(|b| char::from(b'0' + b % 10)).collect())
}

struct Enrolment {
    device_id: String,
    merchant_id: String,
    /// Enrolled by this run.
    fresh: bool,
}

/// Enrols the simulated device, under `--merchant-id` or a new simulated merchant.
async fn enrol_for_attestation(
    client: &VouchClient,
    identity: &DeviceIdentity,
    args: &AttestArgs,
    rng: &SystemRandom,
) -> anyhow::Result<Enrolment> {
    let merchant_id = match &args.merchant_id {
        Some(id) => id.clone(),
        None => client.create_merchant("Simulated merchant").await.context("registering a merchant")?.merchant_id,
    };
    let profile = SimulatedDeviceState::clean(args.kind, &merchant_id).with_tampers(&args.tamper).profile();
    match sim::enrol(client, identity, &profile, &SystemClock, rng).await {
        Ok(device) => Ok(Enrolment { device_id: device.device_id, merchant_id, fresh: true }),
        Err(e) if e.problem_reason() == Some("key-already-enrolled") => {
            Err(e).context("the key is enrolled on this server but its .vouch.json state file is gone")
        }
        Err(e) => Err(e.into()),
    }
}

/// Registers the clean model's reference values when the server has none for it, so
/// the command works against a fresh server. Reading them needs the admin scope; with a
/// narrower key the admin is assumed to have registered them.
async fn ensure_reference_values(client: &VouchClient, kind: DeviceKind) -> anyhow::Result<()> {
    let wanted = ReferenceValues::simulated(kind);
    let existing = match client.reference_values().await {
        Ok(existing) => existing,
        Err(e @ DeviceError::Problem { status: 401 | 403, .. }) => {
            eprintln!("note: cannot read reference values ({e}); assuming an admin registered them");
            return Ok(());
        }
        Err(e) => return Err(e).context("reading reference values"),
    };
    if !existing.iter().any(|r| r.model == wanted.model && r.firmware_version == wanted.firmware_version) {
        client.put_reference_values(&wanted).await.context("registering reference values")?;
    }
    Ok(())
}

fn state_file_path(key: &std::path::Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".vouch.json");
    PathBuf::from(name)
}

fn load_or_create_key(path: &std::path::Path, rng: &SystemRandom) -> anyhow::Result<DeviceIdentity> {
    if path.exists() {
        return Ok(DeviceIdentity::load_pem(path)?);
    }
    let identity = DeviceIdentity::generate(rng)?;
    identity.save_pem(path)?;
    Ok(identity)
}

fn dvv_state_file_path(key: &std::path::Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".dvv.json");
    PathBuf::from(name)
}

fn read_state_file(path: &std::path::Path) -> anyhow::Result<Option<SimDeviceFile>> {
    read_json_file(path)
}

fn read_json_file<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Written by rename, so an interrupted run leaves the previous file whole.
fn write_state_file(path: &std::path::Path, file: &SimDeviceFile) -> anyhow::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, serde_json::to_vec_pretty(file)?)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Written 0600 by rename, for files that hold secrets.
pub(crate) fn write_private_file(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temporary).with_context(|| format!("writing {}", temporary.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", temporary.display()))?;
    drop(file);
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
