//! The ISO 8583 listener on a free port, spoken to as a payment switch would: echo,
//! format errors for each kind of malformed message, closed connections for streams
//! that cannot be answered, the idle timeout, mutual TLS, and authorizations with real
//! DVVs decided as the HTTP endpoint decides them.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use vouch_proto::iso8583::{Message, Mti, frame, split_frame};
use vouch_server::AppState;
use vouch_server::dvv::iso8583::Iso8583Listener;

use crate::dvv::{ACCOUNT, CARD_ACCEPTOR_ID, ISO_TERMINAL_ID, Market, OTHER_ACCOUNT};
use crate::support::{server, server_with};

/// How long a test waits for an answer or a close before failing.
const ANSWER_WAIT: Duration = Duration::from_secs(5);
const TRANSMISSION_TIME: &str = "1124103000";

/// A running listener, stopped when dropped or by [`Running::stop`].
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
        tokio::time::timeout(ANSWER_WAIT, &mut self.task).await.expect("the listener stops").unwrap();
    }
}

async fn listen(state: &AppState) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let iso = Iso8583Listener::on(listener, &state.config).unwrap();
    let addr = iso.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let state = state.clone();
    let task = tokio::spawn(async move {
        iso.run(state, async {
            let _ = stopped.await;
        })
        .await;
    });
    Running { addr, stop: Some(stop), task }
}

/// The switch's end of a connection.
struct Link<S> {
    stream: S,
    buf: Vec<u8>,
}

impl Link<TcpStream> {
    async fn tcp(addr: SocketAddr) -> Link<TcpStream> {
        Link { stream: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next answer, or `None` when the server closed the connection; bytes that are
    /// not a frame (a TLS alert, say) are an error.
    async fn read(&mut self) -> std::io::Result<Option<Message>> {
        loop {
            let framed = split_frame(&self.buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if let Some((consumed, body)) = framed {
                let message = Message::decode(body).unwrap();
                self.buf.drain(..consumed);
                return Ok(Some(message));
            }
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(ANSWER_WAIT, self.stream.read(&mut chunk)).await.expect("an answer")?;
            if read == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..read]);
        }
    }

    async fn send(&mut self, message: &Message) -> Message {
        self.write(&frame(&message.encode()).unwrap()).await;
        self.read().await.unwrap().expect("an answer, not a close")
    }

    async fn send_body(&mut self, body: &[u8]) -> Option<Message> {
        self.write(&frame(body).unwrap()).await;
        self.read().await.unwrap()
    }
}

fn echo(stan: &str) -> Message {
    let mut echo = Message::new(Mti::NETWORK_MANAGEMENT_REQUEST);
    echo.set(7, TRANSMISSION_TIME).unwrap().set(11, stan).unwrap().set(70, "301").unwrap();
    echo
}

fn authorization(stan: u32, account: &str, dvv: &str, amount: u64) -> Message {
    let mut request = Message::new(Mti::AUTHORIZATION_REQUEST);
    request
        .set(2, account)
        .unwrap()
        .set(3, "000000")
        .unwrap()
        .set(4, format!("{amount:012}"))
        .unwrap()
        .set(7, TRANSMISSION_TIME)
        .unwrap()
        .set(11, format!("{stan:06}"))
        .unwrap()
        .set(22, "071")
        .unwrap()
        .set(41, ISO_TERMINAL_ID)
        .unwrap()
        .set(42, CARD_ACCEPTOR_ID)
        .unwrap()
        .set(48, format!("01{:02}{dvv}", dvv.len()))
        .unwrap()
        .set(49, "978")
        .unwrap();
    request
}

fn fields(message: &Message) -> Vec<(u8, String)> {
    message.fields().map(|(field, value)| (field, value.to_owned())).collect()
}

#[tokio::test]
async fn echo_tests_are_answered_in_order_on_one_connection() {
    let server = server().await;
    let running = listen(&server.state).await;
    let mut link = Link::tcp(running.addr).await;
    let answer = link.send(&echo("000001")).await;
    assert_eq!(answer.mti(), Mti::NETWORK_MANAGEMENT_RESPONSE);
    let expected = [(7, TRANSMISSION_TIME), (11, "000001"), (39, "00"), (70, "301")];
    assert_eq!(fields(&answer), expected.map(|(f, v)| (f, v.to_owned())));

    // Three requests in one write: three answers, in the order asked.
    let pipelined: Vec<u8> =
        ["000002", "000003", "000004"].iter().flat_map(|stan| frame(&echo(stan).encode()).unwrap()).collect();
    link.write(&pipelined).await;
    for stan in ["000002", "000003", "000004"] {
        assert_eq!(link.read().await.unwrap().unwrap().get(11), Some(stan));
    }
    running.stop().await;
}

#[tokio::test]
async fn malformed_messages_get_a_format_error_echoing_what_could_be_read() {
    let server = server().await;
    let running = listen(&server.state).await;
    let valid = authorization(7, ACCOUNT, "312345", 1250);
    let valid_body = String::from_utf8(valid.encode()).unwrap();
    let without = |field: u8| {
        let mut message = valid.clone();
        message.remove(field);
        message.encode()
    };
    let with = |field: u8, value: &str| {
        let mut message = valid.clone();
        message.set(field, value).unwrap();
        message.encode()
    };
    // (name, body, the DE 11 the answer can echo)
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("bitmap not hex", format!("0100{}", "Z".repeat(16)).into_bytes(), None),
        ("non-digit amount", valid_body.replace("000000001250", "0000000012X0").into_bytes(), None),
        ("non-digit entry mode", valid_body.replace("000007071", "00000707X").into_bytes(), Some("000007")),
        ("trailing bytes", [valid.encode(), b"00".to_vec()].concat(), Some("000007")),
        ("no DE 48", without(48), Some("000007")),
        ("no DE 2", without(2), Some("000007")),
        ("no DE 7", without(7), Some("000007")),
        ("no DE 49", without(49), Some("000007")),
        ("DE 48 without a DVV", with(48, "0203abc"), Some("000007")),
        ("DE 48 malformed", with(48, "01"), Some("000007")),
        ("a DVV of letters", with(48, "0106ABCDEF"), Some("000007")),
        ("a DVV of the wrong length", with(48, "01043123"), Some("000007")),
        ("amount zero", with(4, "000000000000"), Some("000007")),
        ("no such date", with(7, "0230103000"), Some("000007")),
        ("letters for a currency", with(49, "EUR"), Some("000007")),
        ("an account reference of 19 digits", with(2, "4895370012003478123"), Some("000007")),
    ];
    let mut link = Link::tcp(running.addr).await;
    for (name, body, stan) in cases {
        let answer = link.send_body(&body).await.unwrap_or_else(|| panic!("{name}: closed"));
        assert_eq!(answer.mti(), Mti::AUTHORIZATION_RESPONSE, "{name}");
        assert_eq!(answer.get(39), Some("30"), "{name}");
        assert_eq!(answer.get(11), stan, "{name}");
        assert_eq!(answer.get(2), None, "{name}: DE 2 is never echoed");
        assert_eq!(answer.get(48), None, "{name}: DE 48 is never echoed");
    }
    // A readable message type Vouch does not handle is an invalid transaction.
    let mut reversal = Message::new(Mti::new(400).unwrap());
    reversal.set(11, "000008").unwrap();
    let answer = link.send(&reversal).await;
    assert_eq!((answer.mti(), answer.get(39), answer.get(11)), (Mti::new(410).unwrap(), Some("12"), Some("000008")));
    // The connection is still good.
    assert_eq!(link.send(&echo("000009")).await.get(39), Some("00"));
}

#[tokio::test]
async fn streams_that_cannot_be_answered_are_closed() {
    let server = server().await;
    let running = listen(&server.state).await;
    let mut undecodable_answer = Message::new(Mti::AUTHORIZATION_RESPONSE).encode();
    undecodable_answer.extend_from_slice(b"junk");
    let cases: [(&str, Vec<u8>); 5] = [
        ("garbage without an MTI", frame(b"HELLO, SWITCH").unwrap()),
        ("an empty frame", frame(b"").unwrap()),
        ("an undecodable answer, which has no answer", frame(&undecodable_answer).unwrap()),
        ("a well-formed answer", frame(&Message::new(Mti::NETWORK_MANAGEMENT_RESPONSE).encode()).unwrap()),
        ("a length header over the limit", vec![0xff, 0xff, b'0', b'1', b'0', b'0']),
    ];
    for (name, bytes) in cases {
        let mut link = Link::tcp(running.addr).await;
        link.write(&bytes).await;
        assert!(matches!(link.read().await, Ok(None) | Err(_)), "{name}: the connection closes");
    }
}

#[tokio::test]
async fn an_unknown_terminal_is_an_invalid_merchant() {
    let server = server().await;
    let running = listen(&server.state).await;
    let mut link = Link::tcp(running.addr).await;
    let answer = link.send(&authorization(1, ACCOUNT, "312345", 1250)).await;
    assert_eq!(answer.mti(), Mti::AUTHORIZATION_RESPONSE);
    let expected = [
        (3, "000000"),
        (4, "000000001250"),
        (7, TRANSMISSION_TIME),
        (11, "000001"),
        (39, "03"),
        (41, ISO_TERMINAL_ID),
        (42, CARD_ACCEPTOR_ID),
        (49, "978"),
    ];
    assert_eq!(fields(&answer), expected.map(|(f, v)| (f, v.to_owned())));
}

#[tokio::test]
async fn a_database_failure_is_a_system_malfunction_not_a_crash() {
    let server = server().await;
    let running = listen(&server.state).await;
    server.state.store.close().await;
    let mut link = Link::tcp(running.addr).await;
    let answer = link.send(&authorization(1, ACCOUNT, "312345", 1250)).await;
    assert_eq!((answer.get(39), answer.get(11)), (Some("96"), Some("000001")));
    assert_eq!(link.send(&echo("000002")).await.get(39), Some("00"), "the listener carries on");
}

#[tokio::test]
async fn slow_and_silent_clients_are_dropped_after_the_idle_timeout() {
    let server = server_with(|config| config.iso8583_idle_timeout_secs = 1).await;
    let running = listen(&server.state).await;
    let half_frame = &frame(&echo("000001").encode()).unwrap()[..20];
    let trickle = async |link: &mut Link<TcpStream>| {
        // A byte every 300 ms: never idle for 1 s, but the frame is not done in 1 s.
        for byte in half_frame {
            if link.stream.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    for case in ["half a frame, then nothing", "nothing at all", "a byte at a time"] {
        let mut link = Link::tcp(running.addr).await;
        let started = Instant::now();
        match case {
            "half a frame, then nothing" => link.write(half_frame).await,
            "a byte at a time" => {
                // The server may close while bytes are still being written.
                let _ = tokio::time::timeout(Duration::from_secs(3), trickle(&mut link)).await;
            }
            _ => {}
        }
        let closed = link.read().await;
        let waited = started.elapsed();
        assert!(matches!(closed, Ok(None) | Err(_)), "{case}: dropped");
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(4), "{case}: after {waited:?}");
    }
    // A client that keeps talking is kept.
    let mut link = Link::tcp(running.addr).await;
    for stan in ["000001", "000002", "000003"] {
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(link.send(&echo(stan)).await.get(39), Some("00"));
    }
}

#[tokio::test]
async fn shutdown_stops_accepting_and_closes_idle_connections() {
    let server = server().await;
    let running = listen(&server.state).await;
    let addr = running.addr;
    let mut link = Link::tcp(addr).await;
    assert_eq!(link.send(&echo("000001")).await.get(39), Some("00"));
    running.stop().await;
    assert!(matches!(link.read().await, Ok(None) | Err(_)), "the open connection is closed");
    assert!(TcpStream::connect(addr).await.is_err(), "nothing listens any more");
}

/// A CA, and certificates it issued for the server (`localhost`) and a switch.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let ca = ca();
        let dir = tempfile::tempdir().unwrap();
        let (server_cert, server_key) = leaf(&ca, "localhost");
        let (client_cert_pem, client_key_pem) = leaf(&ca, "switch.example");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), server_cert).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key).unwrap();
        Pki { ca_pem: ca.pem(), client_cert_pem, client_key_pem, dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `name` and its key, both PEM.
fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, name: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

async fn tls_link(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> std::io::Result<Link<tokio_rustls::client::TlsStream<TcpStream>>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
    Ok(Link { stream, buf: Vec::new() })
}

/// Sends an echo over a fresh TLS connection: the answer, or the error that ended it.
async fn tls_echo(addr: SocketAddr, ca_pem: &str, client: Option<(&str, &str)>) -> std::io::Result<Option<Message>> {
    let mut link = tls_link(addr, ca_pem, client).await?;
    // With TLS 1.3 the server checks the client's certificate after the client thinks the
    // handshake is over, so a refusal shows on the first write or read.
    link.stream.write_all(&frame(&echo("000001").encode()).unwrap()).await?;
    link.stream.flush().await?;
    link.read().await
}

#[tokio::test]
async fn mutual_tls_admits_only_switches_with_a_certificate_from_the_ca() {
    let pki = Pki::new();
    let server = server_with(|config| {
        config.iso8583_tls_cert = Some(pki.path("server.pem"));
        config.iso8583_tls_key = Some(pki.path("server.key"));
        config.iso8583_tls_client_ca = Some(pki.path("ca.pem"));
    })
    .await;
    let running = listen(&server.state).await;
    let switch = Some((pki.client_cert_pem.as_str(), pki.client_key_pem.as_str()));

    let answer = tls_echo(running.addr, &pki.ca_pem, switch).await.unwrap().expect("an answer");
    assert_eq!((answer.mti(), answer.get(39)), (Mti::NETWORK_MANAGEMENT_RESPONSE, Some("00")));

    let anonymous = tls_echo(running.addr, &pki.ca_pem, None).await;
    assert!(matches!(anonymous, Err(_) | Ok(None)), "no certificate: refused, got {anonymous:?}");

    let stranger_ca = ca();
    let (cert, key) = leaf(&stranger_ca, "switch.example");
    let stranger = tls_echo(running.addr, &pki.ca_pem, Some((&cert, &key))).await;
    assert!(matches!(stranger, Err(_) | Ok(None)), "a certificate from another CA: refused, got {stranger:?}");

    let mut plain = Link::tcp(running.addr).await;
    plain.write(&frame(&echo("000002").encode()).unwrap()).await;
    assert!(matches!(plain.read().await, Ok(None) | Err(_)), "plain TCP: refused");
}

#[tokio::test]
async fn tls_files_that_cannot_be_used_stop_the_start() {
    let pki = Pki::new();
    let listener = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cases: [(&str, &Path, &Path, Option<&Path>); 3] = [
        ("missing certificate", &pki.path("nowhere.pem"), &pki.path("server.key"), None),
        ("key in place of the certificate", &pki.path("server.key"), &pki.path("server.key"), None),
        (
            "certificate in place of the CA",
            &pki.path("server.pem"),
            &pki.path("server.key"),
            Some(&pki.path("server.key")),
        ),
    ];
    for (name, cert, key, client_ca) in cases {
        let server = server_with(|config| {
            config.iso8583_tls_cert = Some(cert.to_owned());
            config.iso8583_tls_key = Some(key.to_owned());
            config.iso8583_tls_client_ca = client_ca.map(Path::to_owned);
        })
        .await;
        let std_listener = listener();
        std_listener.set_nonblocking(true).unwrap();
        let tokio_listener = TcpListener::from_std(std_listener).unwrap();
        let refused = Iso8583Listener::on(tokio_listener, &server.state.config);
        assert!(matches!(refused, Err(vouch_server::StartError::Iso8583Tls(_))), "{name}: {refused:?}");
    }
}

/// A value that differs from `dvv` in its last digit.
fn wrong(dvv: &str) -> String {
    let (head, last) = dvv.split_at(dvv.len() - 1);
    format!("{head}{}", (last.parse::<u8>().unwrap() + 1) % 10)
}

#[tokio::test]
async fn authorizations_over_iso8583_are_decided_like_http_ones() {
    let mut market = Market::new().await;
    let state = market.phone.fx.server.state.clone();
    let running = listen(&state).await;
    let mut link = Link::tcp(running.addr).await;
    let dvv = market.issue(ACCOUNT).await["dvv"].as_str().unwrap().to_owned();

    let approve = authorization(101, ACCOUNT, &dvv, 1250);
    let approved = link.send(&approve).await;
    assert_eq!(approved.mti(), Mti::AUTHORIZATION_RESPONSE);
    assert_eq!(approved.get(39), Some("00"));
    let authorization_code = approved.get(38).expect("DE 38 on an approval").to_owned();
    let rrn = approved.get(37).expect("a retrieval reference is made").to_owned();
    assert_eq!(rrn.len(), 12);
    for field in [3, 4, 7, 11, 41, 42, 49] {
        assert_eq!(approved.get(field), approve.get(field), "DE {field} is echoed");
    }
    assert_eq!((approved.get(2), approved.get(48)), (None, None), "DE 2 and DE 48 are not echoed");

    // A retry (same terminal, STAN and DE 7) gets the first answer, and uses nothing.
    let retried = link.send(&approve).await;
    assert_eq!(
        (retried.get(39), retried.get(38), retried.get(37)),
        (Some("00"), Some(&*authorization_code), Some(&*rrn))
    );

    // The value is used up; a wrong one and another account's are declined without DE 38.
    let declines = [
        ("used up", authorization(102, ACCOUNT, &dvv, 1250), "54"),
        ("wrong value", authorization(103, ACCOUNT, &wrong(&dvv), 1250), "05"),
        ("unknown account", authorization(104, "4000000000000002", &dvv, 1250), "14"),
    ];
    for (name, request, code) in declines {
        let answer = link.send(&request).await;
        assert_eq!((answer.get(39), answer.get(38)), (Some(code), None), "{name}");
    }

    // A fresh value over the limit, then within it; with the switch's own DE 37.
    let issued = market.issue(OTHER_ACCOUNT).await;
    let (fresh, limit) = (issued["dvv"].as_str().unwrap().to_owned(), issued["amount_limit_minor"].as_u64().unwrap());
    let over = link.send(&authorization(105, OTHER_ACCOUNT, &fresh, limit + 1)).await;
    assert_eq!(over.get(39), Some("61"));
    let mut with_rrn = authorization(106, OTHER_ACCOUNT, &fresh, limit);
    with_rrn.set(37, "RRN000000106").unwrap();
    let answer = link.send(&with_rrn).await;
    assert_eq!((answer.get(39), answer.get(37)), (Some("00"), Some("RRN000000106")));

    // Decisions made over ISO 8583 are recorded and audited like HTTP ones.
    let audit = market.phone.fx.server.audit().await;
    let decided: Vec<_> = audit.iter().map(|r| &r.entry).filter(|e| e.action == "authorization.decided").collect();
    assert_eq!(decided.len(), 6, "one per decision, retries excluded");
    assert!(decided.iter().all(|e| e.detail.contains(r#""channel":"iso8583""#)), "{decided:?}");
    assert!(!audit.iter().any(|r| r.entry.detail.contains(ACCOUNT)), "the account is never audited");
}
