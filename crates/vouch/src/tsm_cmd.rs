//! `vouch tsm`: the service provider's side of the trusted service manager.
//! `provider-listen` runs a receiver for the messages Vouch relays: it opens each with
//! the provider's key, acknowledges it, and prints it once, however often it is
//! delivered.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use vouch_device::VouchClient;
use vouch_device::tsm::{ProviderReceiver, ReceivedMessage};
use vouch_proto::crypto::SystemRandom;
use vouch_proto::hpke::HpkePrivateKey;
use vouch_proto::{b64, hex};
use zeroize::Zeroizing;

#[derive(Debug, clap::Subcommand)]
pub enum TsmCommand {
    /// Receive, open and print the messages Vouch relays to a service provider.
    ProviderListen(ProviderListenArgs),
}

#[derive(Debug, clap::Args)]
pub struct ProviderListenArgs {
    /// Address to receive deliveries on.
    #[arg(long, default_value = "127.0.0.1:8710")]
    listen: SocketAddr,
    /// The provider's private key (64 hex digits), created (0600) when missing; without
    /// it, a key for this run only.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Register the provider with this server (`POST /v1/service-providers`) at start.
    #[arg(long, requires = "api_key")]
    server: Option<String>,
    /// Admin API key for --server.
    #[arg(long, env = "VOUCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The provider's name when registering.
    #[arg(long, default_value = "Service provider")]
    name: String,
    /// The endpoint Vouch delivers to when registering [default: http://LISTEN/].
    #[arg(long)]
    endpoint: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

pub async fn run(command: TsmCommand) -> anyhow::Result<ExitCode> {
    match command {
        TsmCommand::ProviderListen(args) => provider_listen(args).await,
    }
}

async fn provider_listen(args: ProviderListenArgs) -> anyhow::Result<ExitCode> {
    let key = match &args.key {
        Some(path) => load_or_create_key(path)?,
        None => HpkePrivateKey::generate(&SystemRandom::new())?,
    };
    let receiver = ProviderReceiver::bind(args.listen, key).await?;
    let endpoint = args.endpoint.clone().unwrap_or_else(|| receiver.endpoint());
    let provider_id = match (&args.server, &args.api_key) {
        (Some(server), Some(api_key)) => {
            let admin = VouchClient::new(server)?.with_api_key(api_key);
            let provider = admin
                .create_service_provider(&args.name, &endpoint, receiver.public_jwk())
                .await
                .context("registering the service provider")?;
            Some(provider.service_provider_id)
        }
        _ => None,
    };
    let started = json!({
        "event": "listening",
        "endpoint": endpoint,
        "public_jwk": receiver.public_jwk(),
        "service_provider_id": provider_id,
    });
    if args.json {
        println!("{started}");
    } else {
        println!("listening on {endpoint}");
        println!("public key (JWK): {}", serde_json::to_string(receiver.public_jwk())?);
        if let Some(id) = &started["service_provider_id"].as_str() {
            println!("registered as service provider {id}");
        }
    }
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            messages = receiver.next_messages() => {
                for message in messages {
                    print_message(&message, args.json);
                }
            }
        }
    }
    let stats = receiver.stats();
    if !args.json {
        println!("received {} messages ({} repeated deliveries acknowledged again)", stats.received, stats.duplicates);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_message(message: &ReceivedMessage, json_lines: bool) {
    let payload_text = std::str::from_utf8(&message.body.payload).ok();
    if json_lines {
        let line = json!({
            "event": "message",
            "message_id": message.message_id,
            "provider_id": message.provider_id,
            "device_id": message.device_id,
            "counter": message.counter,
            "created_at": message.created_at,
            "payment_certificate": message.body.payment_certificate,
            "payload": b64::encode(&message.body.payload),
            "payload_text": payload_text,
        });
        println!("{line}");
    } else {
        let shown = payload_text.map_or_else(|| format!("{} bytes", message.body.payload.len()), |t| format!("{t:?}"));
        println!("{} from {} (counter {}): {shown}", message.message_id, message.device_id, message.counter);
    }
}

/// The key in `path` (64 hex digits), or a new one written there, readable by the owner alone.
fn load_or_create_key(path: &Path) -> anyhow::Result<HpkePrivateKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            let scalar = hex::decode(text.trim())
                .map(Zeroizing::new)
                .filter(|scalar| scalar.len() == 32)
                .with_context(|| format!("{} does not hold 64 hex digits", path.display()))?;
            Ok(HpkePrivateKey::from_bytes(&scalar).with_context(|| format!("the key in {}", path.display()))?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = HpkePrivateKey::generate(&SystemRandom::new())?;
            let text = Zeroizing::new(hex::encode(*key.to_bytes()));
            crate::remote::write_private_file(path, text.as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
