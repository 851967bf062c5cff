//! Commands for the operator on the server's host: `serve`, and the administration
//! that works on the database directly (`admin create-key`, `keys rotate`,
//! `audit verify`), so it works before any API key exists and while the server is down.

use std::process::ExitCode;

use anyhow::Context;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::{Clock, SystemClock};
use vouch_server::Config;
use vouch_server::auth::Scope;
use vouch_server::config::MASTER_KEY_ENV;
use vouch_server::keys::{DatabaseKeyStore, KeyStore, MasterKey};
use vouch_store::{Store, StoreOptions};

use crate::ServerArgs;

#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Create a scoped API key and print it (once).
    CreateKey {
        #[command(flatten)]
        server: ServerArgs,
        /// Scope: admin, provision or terminal. Repeat for several.
        #[arg(long = "scope", required = true, value_parser = parse_scope)]
        scopes: Vec<Scope>,
        /// What the key is for.
        #[arg(long, default_value = "created by vouch admin")]
        label: String,
        /// Print a JSON object instead of the bare key.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Add a new active signing key; the old one stays published until what it signed expires.
    Rotate {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain; exit 1 naming the first edited, inserted or deleted row.
    Verify {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long)]
        json: bool,
    },
}

fn parse_scope(text: &str) -> Result<Scope, String> {
    Scope::parse(text).ok_or_else(|| format!("{text:?} is not a scope (admin, provision, terminal)"))
}

pub async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let master_env = std::env::var(MASTER_KEY_ENV).ok();
    let state = vouch_server::build_state(config, master_env.as_deref()).await?;
    vouch_server::serve(state, shutdown_signal()).await?;
    tracing::info!("vouch stopped");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down: draining in-flight requests");
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let options = StoreOptions { max_connections: 2 };
    Store::open(&config.database_url, options).await.with_context(|| format!("opening {}", config.database_url))
}

pub async fn admin(command: AdminCommand) -> anyhow::Result<ExitCode> {
    match command {
        AdminCommand::CreateKey { server, scopes, label, json } => {
            let config = server.config()?;
            let store = open_store(&config).await?;
            let rng = SystemRandom::new();
            let key =
                vouch_server::auth::create_api_key(&store, &rng, None, &scopes, &label, SystemClock.now_unix(), "cli")
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
                let out =
                    serde_json::json!({ "key_id": key.record.id, "api_key": key.plaintext.as_str(), "scopes": scopes });
                println!("{out}");
            } else {
                println!("{}", key.plaintext.as_str());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Rotate { server } => {
            let config = server.config()?;
            let store = open_store(&config).await?;
            let rng = std::sync::Arc::new(SystemRandom::new());
            let master_env = std::env::var(MASTER_KEY_ENV).ok();
            let master = MasterKey::load_or_create(master_env.as_deref(), &config.data_dir, &rng)?;
            let now = SystemClock.now_unix();
            let keys = DatabaseKeyStore::open(store, master, rng, now).await?;
            let kid = keys.rotate(now, config.key_overlap_secs(), "cli").await?;
            println!("new signing key {kid}; servers pick it up within {} s", config.key_refresh_secs);
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify { server, json } => {
            let config = server.config()?;
            let store = open_store(&config).await?;
            let report = vouch_server::audit::verify(&store).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else if let Some(first_break) = &report.first_break {
                println!("audit chain BROKEN after {} intact rows: {first_break}", report.rows_checked);
            } else {
                println!("audit chain intact: {} rows", report.rows_checked);
            }
            Ok(if report.intact { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
