//! The ISO 8583 listener: a payment switch's authorization requests (0100) and network
//! management messages (0800) over TCP, optionally TLS with client certificates
//! required (mutual TLS). Each frame is read into a bounded buffer and decoded by
//! `vouch_proto::iso8583`; an 0100 is decided by [`decide`], the same decision the HTTP
//! endpoint makes.
//!
//! Limits: at most [`CONNECTIONS_MAX`] connections at once (further ones wait in the
//! accept backlog); a connection that sends nothing for `iso8583_idle_timeout_secs` is
//! closed, and so is one that takes longer than that (or [`FRAME_DEADLINE_MAX`]) to
//! deliver a frame it has begun or to take its answer. Requests on one connection are
//! answered one at a time, in order.
//!
//! A request Vouch cannot read but whose MTI it can is answered with response code `30`
//! (format error), echoing what could be salvaged; a stream without even that, or with
//! a length header over the limit, cannot be resynchronized and is closed. A failure of
//! Vouch's own (the database) is answered `96`. DE 2 and DE 48 never reach the log.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use vouch_proto::iso8583::{
    AdditionalData, LENGTH_HEADER_BYTES, MESSAGE_BYTES_MAX, Message, Mti, TransmissionTime, frame, parse_amount_minor,
    split_frame,
};
use vouch_store::AuthorizationRecord;

use super::{AuthorizationRequest, Channel, ResponseCode, TerminalKey, decide};
use crate::{AppState, Config, StartError};

/// Connections served at once.
pub const CONNECTIONS_MAX: usize = 256;
/// The longest a frame may take to arrive once begun, or an answer to be taken, and
/// the longest a TLS handshake may take; the idle timeout when shorter.
pub const FRAME_DEADLINE_MAX: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections to finish the request in hand.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const READ_CHUNK_BYTES: usize = 1024;

/// DE 39 for a message type or network function Vouch does not handle.
const INVALID_TRANSACTION: &str = "12";
/// DE 70 codes an 0800 may carry: sign-on, sign-off, echo test.
const NETWORK_CODES: [&str; 3] = ["001", "002", "301"];
/// What an 0810 echoes.
const NETWORK_ECHOED: [u8; 3] = [7, 11, 70];
/// What every 0110 echoes from its 0100 when present.
///
/// DE 2 is deliberately not echoed, although many networks do: the switch matches the
/// answer to its request by DE 7, 11, 41 and 42, so echoing the account reference would
/// only put it on the wire, and in every log that captures answers, once more.
const AUTHORIZATION_ECHOED: [u8; 8] = [3, 4, 7, 11, 37, 41, 42, 49];
/// What a format-error answer echoes from a message that could not be decoded.
const SALVAGE_ECHOED: [u8; 4] = [7, 11, 41, 42];
/// Fields an 0100 must carry; DE 48 must also hold sub-element 01 (the DVV).
const AUTHORIZATION_REQUIRED: [u8; 10] = [2, 3, 4, 7, 11, 22, 41, 42, 48, 49];
const RETRIEVAL_REFERENCE_FIELD: u8 = 37;
const AUTHORIZATION_CODE_FIELD: u8 = 38;
const RESPONSE_CODE_FIELD: u8 = 39;

/// The ISO 8583 listener, bound and with its TLS configuration loaded, ready to
/// [`run`](Iso8583Listener::run).
pub struct Iso8583Listener {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Iso8583Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iso8583Listener")
            .field("addr", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Iso8583Listener {
    /// Binds `config.iso8583_listen`; `None` when it is not set.
    pub async fn bind(config: &Config) -> Result<Option<Iso8583Listener>, StartError> {
        let Some(addr) = config.iso8583_listen else {
            return Ok(None);
        };
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
        Iso8583Listener::on(listener, config).map(Some)
    }

    /// Serves on `listener`, with TLS when `config` names a certificate and key, and
    /// client certificates from `config.iso8583_tls_client_ca` required when it is set.
    pub fn on(listener: TcpListener, config: &Config) -> Result<Iso8583Listener, StartError> {
        let tls = match (&config.iso8583_tls_cert, &config.iso8583_tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key, config.iso8583_tls_client_ca.as_deref())?),
            _ => None,
        };
        Ok(Iso8583Listener { listener, tls })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts and serves connections until `shutdown` resolves, then stops accepting,
    /// lets each connection finish the request in hand (for up to [`DRAIN_TIMEOUT`]) and
    /// returns.
    pub async fn run(self, state: AppState, shutdown: impl Future<Output = ()> + Send) {
        let addr = self.listener.local_addr().ok();
        tracing::info!(?addr, tls = self.tls.is_some(), "ISO 8583 listening");
        let idle = Duration::from_secs(state.config.iso8583_idle_timeout_secs);
        let (stop, stopped) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                // Invariant: the semaphore is never closed.
                permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let (socket, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "ISO 8583 accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            while connections.try_join_next().is_some() {}
            let (state, tls, stopped) = (state.clone(), self.tls.clone(), stopped.clone());
            connections.spawn(async move {
                let _permit = permit;
                // Answers are small and a switch waits for each: do not hold them back.
                let _ = socket.set_nodelay(true);
                let served = match tls {
                    None => serve_connection(&state, socket, peer, idle, stopped).await,
                    Some(acceptor) => {
                        let handshake = tokio::time::timeout(frame_deadline(idle), acceptor.accept(socket)).await;
                        match handshake {
                            Ok(Ok(stream)) => serve_connection(&state, stream, peer, idle, stopped).await,
                            Ok(Err(e)) => Err(Closed::Handshake(e)),
                            Err(_) => Err(Closed::HandshakeTimeout),
                        }
                    }
                };
                match served {
                    Ok(()) => tracing::debug!(%peer, "ISO 8583 connection closed"),
                    Err(reason) => tracing::info!(%peer, %reason, "ISO 8583 connection dropped"),
                }
            });
        }
        drop(self.listener);
        let _ = stop.send(true);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} });
        if drained.await.is_err() {
            connections.abort_all();
        }
        tracing::info!(?addr, "ISO 8583 listener stopped");
    }
}

fn tls_acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let bad = |path: &Path, e: &dyn std::fmt::Display| StartError::Iso8583Tls(format!("{}: {e}", path.display()));
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(cert, &e))?;
    if chain.is_empty() {
        return Err(bad(cert, &"no certificate in the file"));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, &e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(ca, &e))? {
                roots.add(cert.map_err(|e| bad(ca, &e))?).map_err(|e| bad(ca, &e))?;
            }
            if roots.is_empty() {
                return Err(bad(ca, &"no CA certificate in the file"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(ca, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, private_key).map_err(|e| bad(cert, &e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn frame_deadline(idle: Duration) -> Duration {
    idle.min(FRAME_DEADLINE_MAX)
}

/// Why a connection was dropped rather than closed by its peer between frames or by
/// shutdown.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake took too long")]
    HandshakeTimeout,
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("a frame took longer than {0:?}")]
    SlowFrame(Duration),
    #[error("the peer closed the connection inside a frame ({0} bytes buffered)")]
    Truncated(usize),
    #[error("a frame that cannot be read: {0}")]
    Unframeable(vouch_proto::ProtoError),
    #[error("a message with no answer: {0}")]
    Unanswerable(&'static str),
    #[error("the answer was not taken within {0:?}")]
    SlowReader(Duration),
    #[error("IO: {0}")]
    Io(std::io::Error),
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    state: &AppState,
    mut stream: S,
    peer: SocketAddr,
    idle: Duration,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), Closed> {
    let deadline = frame_deadline(idle);
    // Bounded: split_frame refuses a header over MESSAGE_BYTES_MAX, so at most one whole
    // frame is ever buffered before it is taken off.
    let mut buf: Vec<u8> = Vec::with_capacity(LENGTH_HEADER_BYTES + MESSAGE_BYTES_MAX);
    let mut chunk = [0u8; READ_CHUNK_BYTES];
    let mut frame_began: Option<Instant> = None;
    loop {
        if let Some((consumed, body)) = split_frame(&buf).map_err(Closed::Unframeable)? {
            let started = Instant::now();
            let answer = answer(state, body, peer).await;
            buf.drain(..consumed);
            frame_began = if buf.is_empty() { None } else { Some(Instant::now()) };
            let answer = answer?;
            state.metrics.observe_iso8583(&answer, started.elapsed());
            // Invariant: an answer holds at most the request's fields plus three short
            // ones, far under MESSAGE_BYTES_MAX; a refusal here would be a bug.
            let framed = frame(&answer.encode()).map_err(Closed::Unframeable)?;
            tokio::time::timeout(deadline, async {
                stream.write_all(&framed).await?;
                stream.flush().await
            })
            .await
            .map_err(|_| Closed::SlowReader(deadline))?
            .map_err(Closed::Io)?;
            continue;
        }
        let wait = match frame_began {
            None => idle,
            Some(began) => deadline.saturating_sub(began.elapsed()),
        };
        let room = (LENGTH_HEADER_BYTES + MESSAGE_BYTES_MAX).saturating_sub(buf.len()).min(chunk.len());
        let read = tokio::select! {
            () = async {
                let _ = stopped.wait_for(|stopped| *stopped).await;
            } => {
                // Best effort: over TLS this sends close_notify, so the switch sees a clean end.
                let _ = tokio::time::timeout(deadline, stream.shutdown()).await;
                return Ok(());
            }
            read = tokio::time::timeout(wait, stream.read(chunk.get_mut(..room).unwrap_or_default())) => read,
        };
        let read = match read {
            Err(_) if frame_began.is_some() => return Err(Closed::SlowFrame(deadline)),
            Err(_) => return Err(Closed::Idle(idle)),
            Ok(read) => read.map_err(Closed::Io)?,
        };
        if read == 0 {
            return if buf.is_empty() { Ok(()) } else { Err(Closed::Truncated(buf.len())) };
        }
        buf.extend_from_slice(chunk.get(..read).unwrap_or_default());
        frame_began.get_or_insert_with(Instant::now);
    }
}

/// The answer to one frame's body; `Err` when there is none and the connection closes.
async fn answer(state: &AppState, body: &[u8], peer: SocketAddr) -> Result<Message, Closed> {
    let request = match Message::decode_or_salvage(body) {
        Ok(request) => request,
        Err(refused) => {
            let mti = refused.mti.ok_or(Closed::Unanswerable("no readable MTI"))?;
            let response_mti = mti.response_mti().ok_or(Closed::Unanswerable("an undecodable non-request"))?;
            tracing::info!(%peer, %mti, error = %refused.error, "ISO 8583 format error");
            let mut answer = Message::new(response_mti);
            for field in SALVAGE_ECHOED {
                if let Some(value) = refused.fields.get(&field) {
                    put(&mut answer, field, value);
                }
            }
            put(&mut answer, RESPONSE_CODE_FIELD, ResponseCode::FormatError.as_str());
            return Ok(answer);
        }
    };
    let mti = request.mti();
    let Some(response_mti) = mti.response_mti() else {
        return Err(Closed::Unanswerable("not a request"));
    };
    let answer = match mti {
        Mti::NETWORK_MANAGEMENT_REQUEST => network_management(&request),
        Mti::AUTHORIZATION_REQUEST => authorization(state, &request).await,
        _ => echoing(&request, response_mti, &SALVAGE_ECHOED, INVALID_TRANSACTION),
    };
    tracing::info!(
        %peer,
        %mti,
        stan = request.get(11).unwrap_or_default(),
        terminal = request.get(41).unwrap_or_default(),
        card_acceptor = request.get(42).unwrap_or_default(),
        response_code = answer.get(RESPONSE_CODE_FIELD).unwrap_or_default(),
        "ISO 8583 request"
    );
    Ok(answer)
}

/// 0800 → 0810: sign-on, sign-off and echo test are answered `00`.
fn network_management(request: &Message) -> Message {
    let response_mti = Mti::NETWORK_MANAGEMENT_RESPONSE;
    if NETWORK_ECHOED.iter().any(|field| request.get(*field).is_none()) {
        return echoing(request, response_mti, &NETWORK_ECHOED, ResponseCode::FormatError.as_str());
    }
    let code = match request.get(70) {
        Some(code) if NETWORK_CODES.contains(&code) => ResponseCode::Approved.as_str(),
        _ => INVALID_TRANSACTION,
    };
    echoing(request, response_mti, &NETWORK_ECHOED, code)
}

/// 0100 → 0110.
async fn authorization(state: &AppState, request: &Message) -> Message {
    let reply =
        |code: ResponseCode| echoing(request, Mti::AUTHORIZATION_RESPONSE, &AUTHORIZATION_ECHOED, code.as_str());
    let Some(fields) = AuthorizationFields::parse(state, request) else {
        return reply(ResponseCode::FormatError);
    };
    let key = TerminalKey::IsoIds {
        card_acceptor_id: fields.card_acceptor_id.to_owned(),
        iso_terminal_id: fields.iso_terminal_id.to_owned(),
    };
    let known = match state.dvv.terminal(&state.store, key).await {
        Ok(Some(known)) => known,
        Ok(None) => return reply(ResponseCode::InvalidMerchant),
        Err(e) => {
            tracing::error!(error = %e, "ISO 8583: cannot look the terminal up");
            return reply(ResponseCode::SystemMalfunction);
        }
    };
    let (terminal, merchant) = &*known;
    match decide(state, terminal, merchant, fields.request).await {
        Ok(record) => authorization_answer(request, &record),
        Err(e) => {
            tracing::error!(error = %e, terminal = %terminal.id, "ISO 8583: authorization failed");
            reply(ResponseCode::SystemMalfunction)
        }
    }
}

fn authorization_answer(request: &Message, record: &AuthorizationRecord) -> Message {
    let mut answer = echoing(request, Mti::AUTHORIZATION_RESPONSE, &AUTHORIZATION_ECHOED, &record.response_code);
    put(&mut answer, RETRIEVAL_REFERENCE_FIELD, &record.retrieval_reference);
    if record.response_code == ResponseCode::Approved.as_str()
        && let Some(code) = &record.authorization_code
    {
        put(&mut answer, AUTHORIZATION_CODE_FIELD, code);
    }
    answer
}

/// An 0100's fields, checked as the HTTP endpoint checks its body, so both channels
/// decide on the same inputs and a request malformed on either is not a decision (it
/// is not recorded and costs the account no wrong try).
struct AuthorizationFields<'a> {
    card_acceptor_id: &'a str,
    iso_terminal_id: &'a str,
    request: AuthorizationRequest,
}

impl<'a> AuthorizationFields<'a> {
    /// `None` for a format error. The codec has already checked each field's length and
    /// characters; what is left is presence, DE 48's sub-elements and ranges.
    fn parse(state: &AppState, request: &'a Message) -> Option<AuthorizationFields<'a>> {
        if AUTHORIZATION_REQUIRED.iter().any(|field| request.get(*field).is_none()) {
            return None;
        }
        let field = |number: u8| request.get(number).unwrap_or_default();
        let all_digits = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        let dvv = AdditionalData::parse(field(48)).ok()?.dvv().ok()??.to_owned();
        let amount_minor = i64::try_from(parse_amount_minor(field(4)).ok()?).ok()?;
        let currency = field(49);
        let account_ref = field(2);
        let well_formed = dvv.len() == usize::from(state.dvv.digits.count())
            && amount_minor >= 1
            && TransmissionTime::parse(field(7)).is_ok()
            && currency.len() == 3
            && all_digits(currency)
            && account_ref.len() == vouch_proto::dvv::ACCOUNT_REF_DIGITS;
        if !well_formed {
            return None;
        }
        Some(AuthorizationFields {
            card_acceptor_id: field(42),
            iso_terminal_id: field(41),
            request: AuthorizationRequest {
                stan: field(11).to_owned(),
                transmission_time: field(7).to_owned(),
                amount_minor,
                currency: currency.to_owned(),
                account_ref: account_ref.to_owned(),
                dvv,
                entry_mode: field(22).to_owned(),
                retrieval_reference: request.get(RETRIEVAL_REFERENCE_FIELD).map(str::to_owned),
                channel: Channel::Iso8583,
            },
        })
    }
}

/// An answer of type `mti` carrying `request`'s `echoed` fields that it has, and DE 39.
fn echoing(request: &Message, mti: Mti, echoed: &[u8], response_code: &str) -> Message {
    let mut answer = Message::new(mti);
    for &field in echoed {
        if let Some(value) = request.get(field) {
            put(&mut answer, field, value);
        }
    }
    put(&mut answer, RESPONSE_CODE_FIELD, response_code);
    answer
}

/// Sets a field whose value is known to fit (echoed from a decoded message, or made by
/// Vouch); a refusal would be a bug, logged rather than answered.
fn put(message: &mut Message, field: u8, value: &str) {
    if let Err(e) = message.set(field, value) {
        tracing::error!(field, error = %e, "ISO 8583: an answer field does not fit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_request() -> Message {
        let mut request = Message::new(Mti::NETWORK_MANAGEMENT_REQUEST);
        request.set(7, "1124103000").unwrap().set(11, "000001").unwrap().set(70, "301").unwrap();
        request
    }

    #[test]
    fn network_management_echoes_and_approves_known_codes_only() {
        let answer = network_management(&echo_request());
        assert_eq!(answer.mti(), Mti::NETWORK_MANAGEMENT_RESPONSE);
        let fields: Vec<_> = answer.fields().collect();
        assert_eq!(fields, [(7, "1124103000"), (11, "000001"), (39, "00"), (70, "301")]);

        let mut key_change = echo_request();
        key_change.set(70, "161").unwrap();
        assert_eq!(network_management(&key_change).get(39), Some(INVALID_TRANSACTION));

        let mut no_time = echo_request();
        no_time.remove(7);
        assert_eq!(network_management(&no_time).get(39), Some("30"));
    }

    #[test]
    fn an_authorization_answer_never_echoes_de2_or_de48() {
        let mut request = Message::new(Mti::AUTHORIZATION_REQUEST);
        for (field, value) in [(2, "4895370012003478"), (4, "000000001250"), (11, "000042"), (48, "0106312345")] {
            request.set(field, value).unwrap();
        }
        let answer = echoing(&request, Mti::AUTHORIZATION_RESPONSE, &AUTHORIZATION_ECHOED, "05");
        let fields: Vec<_> = answer.fields().collect();
        assert_eq!(fields, [(4, "000000001250"), (11, "000042"), (39, "05")]);
    }
}
