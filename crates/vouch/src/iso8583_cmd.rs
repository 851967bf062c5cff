//! `vouch iso8583 send`: one authorization request (0100) or echo test (0800) to an
//! ISO 8583 listener, as a payment switch would send it, and the answer. The client is
//! `vouch_device::iso8583`; this module owns flags, files and output.
//!
//! The account reference (DE 2) is shown masked to its last four digits and DE 48 (the
//! DVV) is never shown.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use vouch_device::iso8583::{APPROVED, AuthorizationMessage, Iso8583Client, TlsClientConfig, echo};
use vouch_proto::iso8583::Message;

const ISO_TERMINAL_ID_CHARS: usize = 8;
const CARD_ACCEPTOR_ID_CHARS: usize = 15;
const STAN_MAX: u32 = 999_999;
/// Fields whose values are never printed.
const HIDDEN_FIELDS: [u8; 1] = [48];
const ACCOUNT_REF_FIELD: u8 = 2;
const ACCOUNT_REF_SHOWN_DIGITS: usize = 4;

#[derive(Debug, clap::Subcommand)]
pub enum Iso8583Command {
    /// Send one authorization request (or, with --echo, an echo test) and print the answer.
    /// Exits 0 whenever an answer arrives, whatever its response code.
    Send(SendArgs),
}

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The listener, HOST:PORT.
    #[arg(long)]
    addr: String,
    /// Send an echo test (0800, DE 70 = 301) instead of an authorization request.
    #[arg(long, conflicts_with_all = ["account_ref", "dvv", "amount", "rrn"])]
    echo: bool,
    /// DE 2: the account reference the DVV was issued for.
    #[arg(long, required_unless_present = "echo")]
    account_ref: Option<String>,
    /// DE 48 sub-element 01: the device verification value.
    #[arg(long, required_unless_present = "echo")]
    dvv: Option<String>,
    /// DE 4: the amount in minor units.
    #[arg(long, required_unless_present = "echo")]
    amount: Option<u64>,
    /// DE 49: ISO 4217 numeric currency code.
    #[arg(long, default_value = "978")]
    currency: String,
    /// DE 11: systems trace audit number, up to 6 digits [default: random].
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=i64::from(STAN_MAX)))]
    stan: Option<u32>,
    /// DE 41: terminal id, up to 8 characters (padded with spaces).
    #[arg(long, required_unless_present = "echo")]
    terminal_id: Option<String>,
    /// DE 42: card acceptor id, up to 15 characters (padded with spaces).
    #[arg(long, required_unless_present = "echo")]
    card_acceptor_id: Option<String>,
    /// DE 22: POS entry mode.
    #[arg(long, default_value = "071")]
    entry_mode: String,
    /// DE 3: processing code.
    #[arg(long, default_value = "000000")]
    processing_code: String,
    /// DE 37: retrieval reference number, 12 letters or digits.
    #[arg(long)]
    rrn: Option<String>,
    /// CA certificate(s), PEM, the listener's certificate must lead to; turns TLS on.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Client certificate chain, PEM, for mutual TLS.
    #[arg(long, value_name = "PEM", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key, PEM.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name the listener's certificate must be for [default: the host in --addr].
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(command: Iso8583Command) -> Result<ExitCode> {
    match command {
        Iso8583Command::Send(args) => send(args).await,
    }
}

async fn send(args: SendArgs) -> Result<ExitCode> {
    let request = request(&args)?;
    let tls = tls_config(&args)?;
    let started = Instant::now();
    let mut client = Iso8583Client::connect(args.addr.as_str(), tls).await?;
    let response = client.send(&request).await?;
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    // The answer is in hand; a failed close changes nothing about it.
    let _ = client.close().await;
    let summary = Summary::of(&response, elapsed_ms);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.text());
    }
    Ok(ExitCode::SUCCESS)
}

fn request(args: &SendArgs) -> Result<Message> {
    let stan = match args.stan {
        Some(stan) => stan,
        None => random_stan()?,
    };
    if args.echo {
        return Ok(echo(stan)?);
    }
    let (Some(account_ref), Some(dvv), Some(amount_minor), Some(terminal_id), Some(card_acceptor_id)) =
        (&args.account_ref, &args.dvv, args.amount, &args.terminal_id, &args.card_acceptor_id)
    else {
        bail!("an authorization request needs --account-ref, --dvv, --amount, --terminal-id and --card-acceptor-id");
    };
    let message = AuthorizationMessage {
        account_ref: account_ref.clone(),
        processing_code: args.processing_code.clone(),
        amount_minor,
        stan,
        entry_mode: args.entry_mode.clone(),
        retrieval_reference: args.rrn.clone(),
        iso_terminal_id: padded("--terminal-id", terminal_id, ISO_TERMINAL_ID_CHARS)?,
        card_acceptor_id: padded("--card-acceptor-id", card_acceptor_id, CARD_ACCEPTOR_ID_CHARS)?,
        currency_numeric: args.currency.clone(),
        dvv: dvv.clone(),
        ..AuthorizationMessage::default()
    };
    message.to_message().context("cannot build the authorization request")
}

/// `value` padded with trailing spaces to `chars`, as fixed `ans` fields are.
fn padded(flag: &str, value: &str, chars: usize) -> Result<String> {
    if value.len() > chars {
        bail!("{flag} is {} characters, over the {chars} the field holds", value.len());
    }
    Ok(format!("{value:<chars$}"))
}

fn random_stan() -> Result<u32> {
    let rng = vouch_proto::crypto::SystemRandom::new();
    let bytes: [u8; 4] = vouch_proto::crypto::random_bytes(&rng)?;
    // 1 to 999999: some hosts treat STAN 000000 as absent.
    Ok(1 + u32::from_be_bytes(bytes) % STAN_MAX)
}

fn tls_config(args: &SendArgs) -> Result<Option<TlsClientConfig>> {
    let Some(ca) = &args.tls_ca else {
        return Ok(None);
    };
    let server_name = match &args.tls_server_name {
        Some(name) => name.clone(),
        None => host_of(&args.addr).to_owned(),
    };
    Ok(Some(TlsClientConfig {
        ca_pem: read(ca)?,
        client_cert_pem: args.tls_cert.as_deref().map(read).transpose()?,
        client_key_pem: args.tls_key.as_deref().map(read).transpose()?,
        server_name,
    }))
}

/// The host of `HOST:PORT`, without the brackets of an IPv6 literal.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _port)| host);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

#[derive(Debug, serde::Serialize)]
struct Summary {
    mti: String,
    response_code: Option<String>,
    approved: bool,
    authorization_code: Option<String>,
    stan: Option<String>,
    retrieval_reference: Option<String>,
    /// Every field of the answer by number, DE 2 masked and DE 48 left out.
    fields: serde_json::Map<String, serde_json::Value>,
    elapsed_ms: u64,
}

impl Summary {
    fn of(response: &Message, elapsed_ms: u64) -> Summary {
        let get = |field: u8| response.get(field).map(|v| v.trim_end().to_owned());
        let fields = response
            .fields()
            .filter(|(field, _)| !HIDDEN_FIELDS.contains(field))
            .map(|(field, value)| {
                let shown = if field == ACCOUNT_REF_FIELD { mask(value) } else { value.to_owned() };
                (field.to_string(), serde_json::Value::String(shown))
            })
            .collect();
        Summary {
            mti: response.mti().to_string(),
            approved: response.get(39) == Some(APPROVED),
            response_code: get(39),
            authorization_code: get(38),
            stan: get(11),
            retrieval_reference: get(37),
            fields,
            elapsed_ms,
        }
    }

    fn text(&self) -> String {
        let verdict = match (&self.response_code, self.approved) {
            (_, true) => "approved".to_owned(),
            (Some(code), false) => format!("declined ({code})"),
            (None, false) => "no response code".to_owned(),
        };
        let mut text = format!("{} {verdict} in {} ms\n", self.mti, self.elapsed_ms);
        for (label, value) in [
            ("authorization code", &self.authorization_code),
            ("stan", &self.stan),
            ("retrieval reference", &self.retrieval_reference),
        ] {
            if let Some(value) = value {
                text.push_str(&format!("{label}: {value}\n"));
            }
        }
        for (field, value) in &self.fields {
            text.push_str(&format!("DE {field}: {}\n", value.as_str().unwrap_or_default()));
        }
        text
    }
}

/// The last four characters, the rest as `*`.
fn mask(value: &str) -> String {
    let hidden = value.len().saturating_sub(ACCOUNT_REF_SHOWN_DIGITS);
    let shown = value.get(hidden..).unwrap_or_default();
    format!("{}{shown}", "*".repeat(hidden))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_masks_the_account_and_leaves_out_de48() {
        let mut response = Message::new(vouch_proto::iso8583::Mti::AUTHORIZATION_RESPONSE);
        response
            .set(2, "4000001234567899")
            .unwrap()
            .set(11, "000042")
            .unwrap()
            .set(38, "A1B2C3")
            .unwrap()
            .set(39, "00")
            .unwrap()
            .set(48, "0106123456")
            .unwrap();
        let summary = Summary::of(&response, 5);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["fields"]["2"], "************7899");
        assert!(json["fields"].get("48").is_none());
        assert_eq!(json["approved"], true);
        assert_eq!(json["authorization_code"], "A1B2C3");
        let shown = format!("{json} {}", summary.text());
        assert!(!shown.contains("4000001234567899") && !shown.contains("123456"), "{shown}");
    }

    #[test]
    fn host_of_takes_the_host_of_an_address() {
        for (addr, host) in [("localhost:8583", "localhost"), ("[::1]:8583", "::1"), ("10.0.0.1:1", "10.0.0.1")] {
            assert_eq!(host_of(addr), host);
        }
    }

    #[test]
    fn padded_fills_with_spaces_and_refuses_overlong_values() {
        assert_eq!(padded("--terminal-id", "T1", 8).unwrap(), "T1      ");
        assert!(padded("--terminal-id", "TERMINAL9", 8).is_err());
    }
}
