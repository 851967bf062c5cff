//! `vouch iso8583 send` against a scripted host that answers every request it reads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};

use vouch_proto::iso8583::{Message, frame, split_frame};

/// A host on a free port answering each request on each connection: 0800 with `00`,
/// 0100 with `05` (declined), echoing every field the request carried, DE 2 and DE 48
/// included, so the test can see the command hide them.
fn host() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for socket in listener.incoming() {
            let Ok(mut socket) = socket else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 512];
            while let Ok(read @ 1..) = socket.read(&mut chunk) {
                buf.extend_from_slice(&chunk[..read]);
                let Some((consumed, body)) = split_frame(&buf).unwrap() else { continue };
                let request = Message::decode(body).unwrap();
                buf.drain(..consumed);
                let mut answer = Message::new(request.mti().response_mti().unwrap());
                for (field, value) in request.fields() {
                    answer.set(field, value).unwrap();
                }
                answer.set(39, if request.get(70).is_some() { "00" } else { "05" }).unwrap();
                socket.write_all(&frame(&answer.encode()).unwrap()).unwrap();
            }
        }
    });
    addr
}

fn vouch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vouch")).arg("iso8583").arg("send").args(args).output().expect("vouch runs")
}

#[test]
fn echo_prints_the_answer_as_json() {
    let addr = host().to_string();
    let output = vouch(&["--addr", &addr, "--echo", "--stan", "4711", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["mti"], "0810");
    assert_eq!(answer["response_code"], "00");
    assert_eq!(answer["approved"], true);
    assert_eq!(answer["stan"], "004711");
    assert_eq!(answer["fields"]["70"], "301");
    assert!(answer["elapsed_ms"].is_u64());
}

#[test]
fn a_declined_authorization_exits_0_and_never_shows_the_account_or_the_dvv() {
    let addr = host().to_string();
    let line = format!(
        "--addr {addr} --account-ref 4000001234567899 --dvv 987654 --amount 1250 --terminal-id T1 \
         --card-acceptor-id SHOP1 --rrn 000000000777"
    );
    let args: Vec<&str> = line.split_whitespace().collect();
    let text = vouch(&args);
    assert!(text.status.success(), "{text:?}");
    let shown = String::from_utf8_lossy(&text.stdout);
    assert!(shown.contains("0110 declined (05)"), "{shown}");
    assert!(shown.contains("DE 2: ************7899"), "{shown}");
    assert!(shown.contains("DE 41: T1      "), "{shown}");

    let json = vouch(&[&args[..], &["--json"]].concat());
    assert!(json.status.success(), "{json:?}");
    let answer: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(answer["approved"], false);
    assert_eq!(answer["response_code"], "05");
    assert_eq!(answer["retrieval_reference"], "000000000777");
    assert_eq!(answer["fields"]["4"], "000000001250");
    assert_eq!(answer["fields"]["49"], "978");
    assert!(answer["fields"].get("48").is_none(), "{answer}");
    for output in [&text, &json] {
        let all = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(!all.contains("4000001234567899") && !all.contains("987654"), "{all}");
    }
}

#[test]
fn no_listener_or_bad_input_exits_non_zero_with_a_reason() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let refused = vouch(&["--addr", &addr, "--echo"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot connect"), "{refused:?}");

    let addr = host().to_string();
    let line = format!(
        "--addr {addr} --account-ref 4000001234567899 --dvv 1 --amount 1 --terminal-id TERMINAL9 \
         --card-acceptor-id SHOP1"
    );
    let long_terminal = vouch(&line.split_whitespace().collect::<Vec<_>>());
    assert_eq!(long_terminal.status.code(), Some(2), "{long_terminal:?}");
    assert!(String::from_utf8_lossy(&long_terminal.stderr).contains("--terminal-id"), "{long_terminal:?}");

    let missing = vouch(&["--addr", &addr, "--amount", "1"]);
    assert!(!missing.status.success(), "{missing:?}");
}

fn free_addr() -> String {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

/// `vouch serve` with its ISO 8583 listener on, killed when dropped.
struct Served {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_opens_the_iso8583_listener_on_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (http, iso) = (free_addr(), free_addr());
    let child = Command::new(env!("CARGO_BIN_EXE_vouch"))
        .args(["serve", "--listen", &http, "--iso8583-listen", &iso])
        .env("VOUCH_DATA_DIR", dir.path())
        .env_remove("VOUCH_DATABASE_URL")
        .env_remove("VOUCH_MASTER_KEY")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _served = Served { child, _dir: dir };
    for _ in 0..100 {
        if std::net::TcpStream::connect(&iso).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let output = vouch(&["--addr", &iso, "--echo", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((answer["mti"].as_str(), answer["response_code"].as_str()), (Some("0810"), Some("00")));
}

#[test]
fn serve_refuses_a_remote_iso8583_listener_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_vouch"))
        .args(["serve", "--listen", &free_addr(), "--iso8583-listen", "0.0.0.0:8583"])
        .env("VOUCH_DATA_DIR", dir.path())
        .env_remove("VOUCH_DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("iso8583_listen"), "{output:?}");
}
