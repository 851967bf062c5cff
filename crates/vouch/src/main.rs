//! The `vouch` command. Parses flags into the library's configuration, calls the
//! library, and maps errors to an exit code; the work happens in the crates below.

mod bench;
mod demo;
mod iso8583_cmd;
mod operator;
mod remote;
mod sonic_cmd;
mod tsm_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "vouch", version, about = "Trust server for payment devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (embedded SQLite in the data directory unless --database says otherwise).
    Serve(ServeArgs),
    /// Administration that works on the database directly.
    Admin {
        #[command(subcommand)]
        command: operator::AdminCommand,
    },
    /// Server signing keys.
    Keys {
        #[command(subcommand)]
        command: operator::KeysCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: operator::AuditCommand,
    },
    /// Merchants, over the API.
    Merchant {
        #[command(subcommand)]
        command: remote::MerchantCommand,
    },
    /// Devices, over the API.
    Device {
        #[command(subcommand)]
        command: remote::DeviceCommand,
    },
    /// Device simulators against any server.
    Sim {
        #[command(subcommand)]
        command: remote::SimCommand,
    },
    /// Walk through Vouch's flows against an in-process server.
    Demo,
    /// Measure throughput and latency against the raw crypto rate.
    Bench(bench::BenchArgs),
    /// Data over sound: encode, decode, benchmark.
    Sonic {
        #[command(subcommand)]
        command: sonic_cmd::SonicCommand,
    },
    /// ISO 8583 messages to a listener, as a payment switch sends them.
    Iso8583 {
        #[command(subcommand)]
        command: iso8583_cmd::Iso8583Command,
    },
    /// The trusted service manager's service-provider side.
    Tsm {
        #[command(subcommand)]
        command: tsm_cmd::TsmCommand,
    },
}

/// Where the server keeps its data; shared by `serve` and the operator commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// TOML configuration file.
    #[arg(long, env = "VOUCH_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8700].
    #[arg(long, env = "VOUCH_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Data directory (SQLite database, master key, bootstrap admin key) [default: ./vouch-data].
    #[arg(long, env = "VOUCH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH or postgres://... [default: the data directory's vouch.db].
    #[arg(long = "database", env = "VOUCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Log format: text or json.
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

/// `vouch serve`: where the data is, and the listeners only the server has.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Also accept ISO 8583 authorization requests on this address, e.g. 127.0.0.1:8583.
    #[arg(long, env = "VOUCH_ISO8583_LISTEN")]
    iso8583_listen: Option<std::net::SocketAddr>,
    /// Allow --iso8583-listen on a non-loopback address (put it behind mutual TLS).
    #[arg(long)]
    iso8583_allow_remote: bool,
    /// Certificate chain (PEM) for TLS on the ISO 8583 listener.
    #[arg(long, env = "VOUCH_ISO8583_TLS_CERT", value_name = "PEM", requires = "iso8583_tls_key")]
    iso8583_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "VOUCH_ISO8583_TLS_KEY", value_name = "PEM", requires = "iso8583_tls_cert")]
    iso8583_tls_key: Option<PathBuf>,
    /// CA (PEM) whose certificates ISO 8583 clients must present: mutual TLS.
    #[arg(long, env = "VOUCH_ISO8583_TLS_CLIENT_CA", value_name = "PEM", requires = "iso8583_tls_cert")]
    iso8583_tls_client_ca: Option<PathBuf>,
}

impl ServeArgs {
    pub fn config(&self) -> anyhow::Result<vouch_server::Config> {
        self.server.config_with(vouch_server::ConfigLayer {
            iso8583_listen: self.iso8583_listen,
            // Unset rather than false, so the environment or the file can still allow it.
            iso8583_allow_remote: self.iso8583_allow_remote.then_some(true),
            iso8583_tls_cert: self.iso8583_tls_cert.clone(),
            iso8583_tls_key: self.iso8583_tls_key.clone(),
            iso8583_tls_client_ca: self.iso8583_tls_client_ca.clone(),
            ..Default::default()
        })
    }
}

impl ServerArgs {
    /// Flags over `VOUCH_*` environment over the config file over defaults. Clap has
    /// already merged each flag with its environment variable (flag first).
    pub fn config(&self) -> anyhow::Result<vouch_server::Config> {
        self.config_with(vouch_server::ConfigLayer::default())
    }

    /// [`ServerArgs::config`] with `more` flags set by the command.
    fn config_with(&self, more: vouch_server::ConfigLayer) -> anyhow::Result<vouch_server::Config> {
        let flags = vouch_server::ConfigLayer {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            log_format: match self.log_format.as_deref() {
                Some("json") => Some(vouch_server::LogFormat::Json),
                Some(_) => Some(vouch_server::LogFormat::Text),
                None => None,
            },
            ..Default::default()
        }
        .over(more);
        let env = vouch_server::ConfigLayer::from_env(|name| std::env::var(name).ok())?;
        let file = match &self.config {
            Some(path) => vouch_server::ConfigLayer::from_file(path)?,
            None => vouch_server::ConfigLayer::default(),
        };
        Ok(vouch_server::Config::resolve(flags, env, file)?)
    }
}

fn init_logging(format: vouch_server::LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VOUCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        vouch_server::LogFormat::Json => builder.json().init(),
        vouch_server::LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return report(Err(e.into())),
    };
    report(runtime.block_on(run(cli.command)))
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => {
            let config = args.config()?;
            init_logging(config.log_format, &config.log_level);
            operator::serve(config).await
        }
        Command::Admin { command } => operator::admin(command).await,
        Command::Keys { command } => operator::keys(command).await,
        Command::Audit { command } => operator::audit(command).await,
        Command::Merchant { command } => remote::merchant(command).await,
        Command::Device { command } => remote::device(command).await,
        Command::Sim { command } => remote::sim(command).await,
        Command::Demo => demo::run().await,
        Command::Bench(args) => bench::run(args).await,
        Command::Sonic { command } => sonic_cmd::run(command),
        Command::Iso8583 { command } => iso8583_cmd::run(command).await,
        Command::Tsm { command } => tsm_cmd::run(command).await,
    }
}

fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
