//! The ISO 8583 client against a scripted host: framing, the answer checks, and each way
//! a host can fail to answer.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use vouch_device::DeviceError;
use vouch_device::iso8583::{Iso8583Client, echo};
use vouch_proto::iso8583::{Message, Mti, frame, split_frame};

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
