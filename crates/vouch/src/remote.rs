//! Commands that talk to a running server over its API, as an integrator's scripts
//! would: merchants, devices, and the device simulators (`vouch sim`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;
use vouch_device::sim::{self, DeviceProfile};
use vouch_device::{DeviceIdentity, VouchClient};
use vouch_proto::SystemClock;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;

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
        write_private_file(path, identity.to_pem()?.as_bytes())?;
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

fn write_private_file(path: &std::path::Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)?;
    Ok(())
}
