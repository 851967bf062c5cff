//! The ISO 8583 client against a scripted host (framing, the answer checks, and each way
//! a host can fail to answer) and against a real server's listener over mutual TLS.

use std::net::SocketAddr;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use vouch_device::DeviceError;
use vouch_device::iso8583::{AuthorizationMessage, Iso8583Client, TlsClientConfig, echo};
use vouch_proto::iso8583::{Message, Mti, frame, split_frame};
use vouch_server::dvv::iso8583::Iso8583Listener;
use vouch_server::{Config, build_state, serve_with_iso8583};

/// What the scripted host does with the one request it reads.
enum Script {
    /// Answers with this MTI, echoing DE 7, 11 and 70, adding DE 39 `00`.
    Answer(Mti),
    /// Answers with DE 11 replaced by this value.
    AnswerStan(&'static str),
    /// Sends these raw bytes.
    Raw(Vec<u8>),
    /// Closes the connection.
    Close,
    /// Reads and never answers.
    Silent,
}

async fn host(script: Script) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let request = loop {
            if let Some((_, body)) = split_frame(&buf).unwrap() {
                break Message::decode(body).unwrap();
            }
            let mut chunk = [0u8; 512];
            let read = socket.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..read]);
        };
        let answer = |mti: Mti, stan: Option<&str>| {
            let mut answer = Message::new(mti);
            for field in [7, 11, 70] {
                if let Some(value) = request.get(field) {
                    answer.set(field, value).unwrap();
                }
            }
            if let Some(stan) = stan {
                answer.set(11, stan).unwrap();
            }
            answer.set(39, "00").unwrap();
            frame(&answer.encode()).unwrap()
        };
        let bytes = match script {
            Script::Answer(mti) => answer(mti, None),
            Script::AnswerStan(stan) => answer(Mti::NETWORK_MANAGEMENT_RESPONSE, Some(stan)),
            Script::Raw(bytes) => bytes,
            Script::Close => return,
            Script::Silent => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
        };
        // Byte by byte, so the client has to put the frame together.
        for byte in bytes {
            socket.write_all(&[byte]).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    addr
}

async fn send_echo(script: Script) -> Result<Message, DeviceError> {
    let addr = host(script).await;
    let mut client = Iso8583Client::connect(addr, None).await?.with_response_timeout(Duration::from_millis(300));
    client.send(&echo(42)?).await
}

#[tokio::test]
async fn echo_is_answered_with_an_0810() {
    let answer = send_echo(Script::Answer(Mti::NETWORK_MANAGEMENT_RESPONSE)).await.unwrap();
    assert_eq!(answer.mti(), Mti::NETWORK_MANAGEMENT_RESPONSE);
    assert_eq!(answer.get(11), Some("000042"));
    assert_eq!(answer.get(70), Some("301"));
    assert_eq!(answer.get(39), Some("00"));
}

#[tokio::test]
async fn answers_that_do_not_answer_the_request_are_refused() {
    let wrong_mti = send_echo(Script::Answer(Mti::AUTHORIZATION_RESPONSE)).await;
    assert!(
        matches!(wrong_mti, Err(DeviceError::UnexpectedMti { expected, found })
            if expected == Mti::NETWORK_MANAGEMENT_RESPONSE && found == Mti::AUTHORIZATION_RESPONSE),
        "{wrong_mti:?}"
    );
    let wrong_stan = send_echo(Script::AnswerStan("000043")).await;
    assert!(matches!(wrong_stan, Err(DeviceError::UnexpectedStan { .. })), "{wrong_stan:?}");
    let garbage = send_echo(Script::Raw(frame(b"08X0").unwrap())).await;
    assert!(matches!(garbage, Err(DeviceError::Proto(_))), "{garbage:?}");
    let oversized = send_echo(Script::Raw(vec![0xff, 0xff, b'0'])).await;
    assert!(matches!(oversized, Err(DeviceError::Proto(_))), "{oversized:?}");
}

#[tokio::test]
async fn a_host_that_closes_or_stays_silent_is_an_error() {
    let closed = send_echo(Script::Close).await;
    assert!(matches!(closed, Err(DeviceError::Closed { .. } | DeviceError::Connection(_))), "{closed:?}");
    let half = send_echo(Script::Raw(vec![0x00, 0x20, b'0', b'8'])).await;
    assert!(matches!(half, Err(DeviceError::Timeout { waited_ms: 300 })), "{half:?}");
    let silent = send_echo(Script::Silent).await;
    assert!(matches!(silent, Err(DeviceError::Timeout { .. })), "{silent:?}");
}

#[tokio::test]
async fn an_answer_cannot_be_sent() {
    let addr = host(Script::Silent).await;
    let mut client = Iso8583Client::connect(addr, None).await.unwrap();
    let answer = Message::new(Mti::AUTHORIZATION_RESPONSE);
    assert!(matches!(client.send(&answer).await, Err(DeviceError::NotARequest { .. })));
}

#[tokio::test]
async fn nobody_listening_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let refused = Iso8583Client::connect(addr, None).await;
    assert!(matches!(refused, Err(DeviceError::Connect { .. })), "{refused:?}");
}

/// A CA and the certificates it issued: `localhost` for the server, one for the switch.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki { dir: tempfile::tempdir().unwrap(), ca: ca() };
        let (cert, key) = pki.leaf("localhost");
        std::fs::write(pki.dir.path().join("ca.pem"), pki.ca.pem()).unwrap();
        std::fs::write(pki.dir.path().join("server.pem"), cert).unwrap();
        std::fs::write(pki.dir.path().join("server.key"), key).unwrap();
        pki
    }

    fn leaf(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn client(&self, identity: Option<(String, String)>) -> TlsClientConfig {
        let (client_cert_pem, client_key_pem) = match identity {
            Some((cert, key)) => (Some(cert.into_bytes()), Some(key.into_bytes())),
            None => (None, None),
        };
        TlsClientConfig {
            ca_pem: self.ca.pem().into_bytes(),
            client_cert_pem,
            client_key_pem,
            server_name: "localhost".into(),
        }
    }
}

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A whole server, HTTP and ISO 8583 behind mutual TLS, on free ports; stopped on drop.
struct Server {
    iso8583: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
    }
}

async fn server(pki: &Pki) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_data_dir(dir.path());
    config.iso8583_tls_cert = Some(pki.dir.path().join("server.pem"));
    config.iso8583_tls_key = Some(pki.dir.path().join("server.key"));
    config.iso8583_tls_client_ca = Some(pki.dir.path().join("ca.pem"));
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let iso8583 = Iso8583Listener::on(TcpListener::bind("127.0.0.1:0").await.unwrap(), &config).unwrap();
    let addr = iso8583.local_addr().unwrap();
    let state = build_state(config, None).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_with_iso8583(http, Some(iso8583), state, async move {
        let _ = stopped.await;
    }));
    Server { iso8583: addr, stop: Some(stop), _dir: dir }
}

#[tokio::test]
async fn a_switch_with_a_certificate_talks_to_the_server_over_mutual_tls() {
    let pki = Pki::new();
    let server = server(&pki).await;
    let tls = pki.client(Some(pki.leaf("switch.example")));
    let mut client = Iso8583Client::connect(server.iso8583, Some(tls)).await.unwrap();
    let answer = client.send(&echo(1).unwrap()).await.unwrap();
    assert_eq!((answer.mti(), answer.get(39)), (Mti::NETWORK_MANAGEMENT_RESPONSE, Some("00")));

    let request = AuthorizationMessage {
        account_ref: "4895370012003478".into(),
        amount_minor: 1250,
        stan: 2,
        iso_terminal_id: "NOSUCHT1".into(),
        card_acceptor_id: "NO SUCH SHOP   ".into(),
        currency_numeric: "978".into(),
        dvv: "312345".into(),
        ..AuthorizationMessage::default()
    };
    let answer = client.send(&request.to_message().unwrap()).await.unwrap();
    assert_eq!((answer.mti(), answer.get(39)), (Mti::AUTHORIZATION_RESPONSE, Some("03")));
    client.close().await.unwrap();
}

#[tokio::test]
async fn a_switch_without_a_certificate_from_the_ca_is_refused() {
    let pki = Pki::new();
    let server = server(&pki).await;
    let stranger = Pki::new();
    for (name, tls) in [("no certificate", pki.client(None)), ("another CA's", pki.client(Some(stranger.leaf("x"))))] {
        // TLS 1.3: the server judges the client's certificate after the client's side
        // of the handshake is done, so the refusal may come on connect or on the first
        // exchange.
        let refused = async {
            let mut client = Iso8583Client::connect(server.iso8583, Some(tls)).await?;
            client.send(&echo(1)?).await
        }
        .await;
        assert!(
            matches!(
                refused,
                Err(DeviceError::Connect { .. } | DeviceError::Connection(_) | DeviceError::Closed { .. })
            ),
            "{name}: {refused:?}"
        );
    }
}

#[tokio::test]
async fn tls_settings_that_cannot_work_are_refused_before_connecting() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("switch.example");
    let cases = [
        (
            "a certificate without its key",
            TlsClientConfig { client_key_pem: None, ..pki.client(Some((cert.clone(), key.clone()))) },
        ),
        (
            "a key without its certificate",
            TlsClientConfig { client_cert_pem: None, ..pki.client(Some((cert.clone(), key.clone()))) },
        ),
        (
            "a key that is not PEM",
            TlsClientConfig { client_key_pem: Some(b"not a key".to_vec()), ..pki.client(Some((cert, key))) },
        ),
        ("no CA", TlsClientConfig { ca_pem: Vec::new(), ..pki.client(None) }),
        ("a bad server name", TlsClientConfig { server_name: "not a name!".into(), ..pki.client(None) }),
    ];
    for (name, tls) in cases {
        // Nothing listens there: a TLS refusal must come before any connection attempt.
        let refused = Iso8583Client::connect("127.0.0.1:9", Some(tls)).await;
        assert!(matches!(refused, Err(DeviceError::TlsConfig(_))), "{name}: {refused:?}");
    }
}
