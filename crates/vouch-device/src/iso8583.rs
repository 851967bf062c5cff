//! The payment-switch side of Vouch's ISO 8583 link: [`Iso8583Client`] sends one framed
//! message at a time over TCP, optionally TLS with a client certificate (mutual TLS), and
//! reads the one framed answer; [`AuthorizationMessage`] and [`echo`] build the 0100 and
//! 0800 it sends. The codec is `vouch_proto::iso8583`; this module owns the socket.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use vouch_proto::iso8583::{
    self, LENGTH_HEADER_BYTES, MESSAGE_BYTES_MAX, Message, Mti, TransmissionTime, additional_data_with_dvv,
    format_amount_minor,
};

use crate::DeviceError;

/// How long [`Iso8583Client::connect`] waits for TCP and the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Iso8583Client::send`] waits for the whole answer after sending.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// DE 70 of an echo test: network management information code 301.
pub const ECHO_TEST_CODE: &str = "301";
/// DE 39 of an approval.
pub const APPROVED: &str = "00";

const READ_CHUNK_BYTES: usize = 1024;

/// TLS towards the Vouch listener. `ca_pem` holds the CA certificate(s) the server's chain
/// must lead to; the client certificate chain and its PKCS#8, PKCS#1 or SEC1 key, both PEM,
/// come together or not at all (mutual TLS needs them).
#[derive(Clone)]
pub struct TlsClientConfig {
    pub ca_pem: Vec<u8>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
    /// The DNS name or IP address the server's certificate must be for.
    pub server_name: String,
}

impl std::fmt::Debug for TlsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClientConfig")
            .field("client_certificate", &self.client_cert_pem.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClientConfig {
    fn connector(&self) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), DeviceError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| DeviceError::TlsConfig(format!("{what}: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            roots.add(cert.map_err(|e| bad("CA certificate", &e))?).map_err(|e| bad("CA certificate", &e))?;
        }
        if roots.is_empty() {
            return Err(DeviceError::TlsConfig("the CA file holds no certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", &e))?
            .with_root_certificates(roots);
        let config = match (&self.client_cert_pem, &self.client_key_pem) {
            (Some(cert_pem), Some(key_pem)) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad("client certificate", &e))?;
                if chain.is_empty() {
                    return Err(DeviceError::TlsConfig("the client certificate file holds no certificate".into()));
                }
                let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("client key", &e))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| bad("client certificate", &e))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(DeviceError::TlsConfig(
                    "a client certificate and its key go together: give both or neither".into(),
                ));
            }
        };
        let server_name = ServerName::try_from(self.server_name.clone()).map_err(|e| bad("server name", &e))?;
        Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), server_name))
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

/// One connection to Vouch's ISO 8583 listener. Requests go one at a time: [`send`]
/// writes a frame and reads the answer before it returns.
///
/// [`send`]: Iso8583Client::send
pub struct Iso8583Client {
    stream: Box<dyn Stream>,
    /// Bytes read past the last answer. The listener answers in order and only once per
    /// request, so this stays empty unless a host misbehaves; it never grows past one
    /// frame.
    buf: Vec<u8>,
    response_timeout: Duration,
}

impl std::fmt::Debug for Iso8583Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iso8583Client").field("response_timeout", &self.response_timeout).finish_non_exhaustive()
    }
}

impl Iso8583Client {
    /// Opens a connection, with TLS when `tls` is given, within [`CONNECT_TIMEOUT`].
    pub async fn connect(
        addr: impl ToSocketAddrs + std::fmt::Display,
        tls: Option<TlsClientConfig>,
    ) -> Result<Iso8583Client, DeviceError> {
        let shown = addr.to_string();
        let connect_error = |source: std::io::Error| DeviceError::Connect { addr: shown.clone(), source };
        let timed_out = || {
            connect_error(std::io::Error::new(std::io::ErrorKind::TimedOut, "no connection within the time allowed"))
        };
        let tls = tls.as_ref().map(TlsClientConfig::connector).transpose()?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out())?
            .map_err(connect_error)?;
        tcp.set_nodelay(true).map_err(connect_error)?;
        let stream: Box<dyn Stream> = match tls {
            None => Box::new(tcp),
            Some((connector, server_name)) => Box::new(
                tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, tcp))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(connect_error)?,
            ),
        };
        Ok(Iso8583Client { stream, buf: Vec::new(), response_timeout: RESPONSE_TIMEOUT })
    }

    /// Waits `timeout` rather than [`RESPONSE_TIMEOUT`] for each answer.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Iso8583Client {
        self.response_timeout = timeout;
        self
    }

    /// Sends `request` and returns the answer, checking that its MTI answers the
    /// request's (0110 for 0100, 0810 for 0800) and that it echoes the STAN (DE 11)
    /// when both carry one. An answer that arrives but refuses the request (any DE 39
    /// but `00`) is still `Ok`.
    pub async fn send(&mut self, request: &Message) -> Result<Message, DeviceError> {
        let expected = request.mti().response_mti().ok_or(DeviceError::NotARequest { mti: request.mti() })?;
        let framed = iso8583::frame(&request.encode())?;
        let waited_ms = u64::try_from(self.response_timeout.as_millis()).unwrap_or(u64::MAX);
        let response = tokio::time::timeout(self.response_timeout, async {
            self.stream.write_all(&framed).await.map_err(DeviceError::Connection)?;
            self.stream.flush().await.map_err(DeviceError::Connection)?;
            self.read_frame().await
        })
        .await
        .map_err(|_| DeviceError::Timeout { waited_ms })??;
        if response.mti() != expected {
            return Err(DeviceError::UnexpectedMti { expected, found: response.mti() });
        }
        if let (Some(sent), Some(found)) = (request.get(11), response.get(11))
            && sent != found
        {
            return Err(DeviceError::UnexpectedStan { expected: sent.to_owned(), found: found.to_owned() });
        }
        Ok(response)
    }

    async fn read_frame(&mut self) -> Result<Message, DeviceError> {
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        loop {
            if let Some((consumed, body)) = iso8583::split_frame(&self.buf)? {
                let message = Message::decode(body);
                self.buf.drain(..consumed);
                return Ok(message?);
            }
            // split_frame refuses a header over MESSAGE_BYTES_MAX, so reading up to one
            // whole frame bounds the buffer.
            let room = (LENGTH_HEADER_BYTES + MESSAGE_BYTES_MAX).saturating_sub(self.buf.len()).min(chunk.len());
            let read =
                self.stream.read(chunk.get_mut(..room).unwrap_or_default()).await.map_err(DeviceError::Connection)?;
            if read == 0 {
                return Err(DeviceError::Closed { pending_bytes: self.buf.len() });
            }
            self.buf.extend_from_slice(chunk.get(..read).unwrap_or_default());
        }
    }

    /// Closes the connection, TLS `close_notify` included.
    pub async fn close(mut self) -> Result<(), DeviceError> {
        self.stream.shutdown().await.map_err(DeviceError::Connection)
    }
}

/// An authorization request (0100) from typed inputs. [`Default`] gives the processing
/// code `000000` (purchase), entry mode `071` and the current UTC time; the other
/// fields have to be set:
///
/// ```
/// # use vouch_device::iso8583::AuthorizationMessage;
/// let request = AuthorizationMessage {
///     account_ref: "4000001234567899".into(),
///     amount_minor: 1250,
///     currency_numeric: "978".into(),
///     stan: 42,
///     iso_terminal_id: "TERM0001".into(),
///     card_acceptor_id: "SHOP00000000001".into(),
///     dvv: "123456".into(),
///     ..AuthorizationMessage::default()
/// }
/// .to_message()?;
/// assert_eq!(request.get(4), Some("000000001250"));
/// # Ok::<(), vouch_device::DeviceError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorizationMessage {
    /// DE 2: the account reference, up to 19 digits.
    pub account_ref: String,
    /// DE 3, 6 digits.
    pub processing_code: String,
    /// DE 4, in minor units of `currency_numeric`; at most 12 digits.
    pub amount_minor: u64,
    /// DE 7.
    pub transmission_time: TransmissionTime,
    /// DE 11, the systems trace audit number: 0 to 999999.
    pub stan: u32,
    /// DE 22, 3 digits.
    pub entry_mode: String,
    /// DE 37, 12 letters or digits, when the acquirer assigns one.
    pub retrieval_reference: Option<String>,
    /// DE 41, exactly 8 characters (pad with trailing spaces).
    pub iso_terminal_id: String,
    /// DE 42, exactly 15 characters (pad with trailing spaces).
    pub card_acceptor_id: String,
    /// DE 49, the ISO 4217 numeric code, e.g. `978`.
    pub currency_numeric: String,
    /// DE 48 sub-element 01: the device verification value, digits.
    pub dvv: String,
}

impl std::fmt::Debug for AuthorizationMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizationMessage")
            .field("account_ref", &format_args!("<{} digits>", self.account_ref.len()))
            .field("processing_code", &self.processing_code)
            .field("amount_minor", &self.amount_minor)
            .field("transmission_time", &self.transmission_time)
            .field("stan", &self.stan)
            .field("entry_mode", &self.entry_mode)
            .field("retrieval_reference", &self.retrieval_reference)
            .field("iso_terminal_id", &self.iso_terminal_id)
            .field("card_acceptor_id", &self.card_acceptor_id)
            .field("currency_numeric", &self.currency_numeric)
            .finish_non_exhaustive()
    }
}

impl Default for AuthorizationMessage {
    fn default() -> AuthorizationMessage {
        AuthorizationMessage {
            account_ref: String::new(),
            processing_code: "000000".into(),
            amount_minor: 0,
            transmission_time: transmission_time_now(),
            stan: 0,
            entry_mode: "071".into(),
            retrieval_reference: None,
            iso_terminal_id: String::new(),
            card_acceptor_id: String::new(),
            currency_numeric: String::new(),
            dvv: String::new(),
        }
    }
}

impl AuthorizationMessage {
    /// The 0100 with DE 2, 3, 4, 7, 11, 22, 37 (when given), 41, 42, 48 and 49, refusing
    /// any value that does not fit its field.
    pub fn to_message(&self) -> Result<Message, DeviceError> {
        let mut message = Message::new(Mti::AUTHORIZATION_REQUEST);
        message
            .set(2, self.account_ref.as_str())?
            .set(3, self.processing_code.as_str())?
            .set(4, format_amount_minor(self.amount_minor)?)?
            .set(7, self.transmission_time.to_string())?
            .set(11, stan_field(self.stan))?
            .set(22, self.entry_mode.as_str())?
            .set(41, self.iso_terminal_id.as_str())?
            .set(42, self.card_acceptor_id.as_str())?
            .set(48, additional_data_with_dvv(&self.dvv)?)?
            .set(49, self.currency_numeric.as_str())?;
        if let Some(rrn) = &self.retrieval_reference {
            message.set(37, rrn.as_str())?;
        }
        Ok(message)
    }
}

/// An echo test (0800, DE 70 `301`) with STAN `stan`, sent now.
pub fn echo(stan: u32) -> Result<Message, DeviceError> {
    echo_at(stan, transmission_time_now())
}

/// [`echo`] at a given transmission time.
pub fn echo_at(stan: u32, transmission_time: TransmissionTime) -> Result<Message, DeviceError> {
    let mut message = Message::new(Mti::NETWORK_MANAGEMENT_REQUEST);
    message.set(7, transmission_time.to_string())?.set(11, stan_field(stan))?.set(70, ECHO_TEST_CODE)?;
    Ok(message)
}

/// DE 11 as six digits; a STAN over 999999 gives seven, which `Message::set` refuses.
fn stan_field(stan: u32) -> String {
    format!("{stan:06}")
}

fn transmission_time_now() -> TransmissionTime {
    let unix_secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    TransmissionTime::from_unix_secs(i64::try_from(unix_secs).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> AuthorizationMessage {
        AuthorizationMessage {
            account_ref: "4000001234567899".into(),
            amount_minor: 1250,
            transmission_time: TransmissionTime::new(3, 14, 15, 9, 26).unwrap(),
            stan: 42,
            iso_terminal_id: "TERM0001".into(),
            card_acceptor_id: "SHOP00000000001".into(),
            currency_numeric: "978".into(),
            dvv: "123456".into(),
            ..AuthorizationMessage::default()
        }
    }

    #[test]
    fn authorization_message_carries_every_field() {
        let message = request().to_message().unwrap();
        assert_eq!(message.mti(), Mti::AUTHORIZATION_REQUEST);
        let fields: Vec<(u8, &str)> = message.fields().collect();
        assert_eq!(
            fields,
            [
                (2, "4000001234567899"),
                (3, "000000"),
                (4, "000000001250"),
                (7, "0314150926"),
                (11, "000042"),
                (22, "071"),
                (41, "TERM0001"),
                (42, "SHOP00000000001"),
                (48, "0106123456"),
                (49, "978"),
            ]
        );
        let with_rrn = AuthorizationMessage { retrieval_reference: Some("000000000777".into()), ..request() };
        assert_eq!(with_rrn.to_message().unwrap().get(37), Some("000000000777"));
    }

    #[test]
    fn authorization_message_refuses_values_that_do_not_fit() {
        let cases: [(&str, AuthorizationMessage); 6] = [
            ("stan", AuthorizationMessage { stan: 1_000_000, ..request() }),
            ("terminal", AuthorizationMessage { iso_terminal_id: "T1".into(), ..request() }),
            ("dvv", AuthorizationMessage { dvv: "12a456".into(), ..request() }),
            ("amount", AuthorizationMessage { amount_minor: 10u64.pow(12), ..request() }),
            ("account", AuthorizationMessage { account_ref: "4000-0012".into(), ..request() }),
            ("rrn", AuthorizationMessage { retrieval_reference: Some("short".into()), ..request() }),
        ];
        for (name, case) in cases {
            assert!(matches!(case.to_message(), Err(DeviceError::Proto(_))), "{name}");
        }
    }

    #[test]
    fn debug_hides_the_account_and_the_dvv() {
        let shown = format!("{:?}", request());
        assert!(!shown.contains("4000001234567899") && !shown.contains("123456"), "{shown}");
    }

    #[test]
    fn echo_is_an_0800_with_code_301() {
        let message = echo_at(7, TransmissionTime::new(12, 31, 23, 59, 59).unwrap()).unwrap();
        assert_eq!(message.mti(), Mti::NETWORK_MANAGEMENT_REQUEST);
        let fields: Vec<(u8, &str)> = message.fields().collect();
        assert_eq!(fields, [(7, "1231235959"), (11, "000007"), (70, "301")]);
    }

    #[test]
    fn tls_config_refuses_an_empty_ca() {
        let config = TlsClientConfig {
            ca_pem: Vec::new(),
            client_cert_pem: None,
            client_key_pem: None,
            server_name: "localhost".into(),
        };
        assert!(matches!(config.connector(), Err(DeviceError::TlsConfig(_))));
    }
}
