use std::path::Path;
use std::process::{Command, Output};

use crate::serve::{ServeProcess, postgres_schema};

fn vouch(args: &[&str], data_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vouch"))
        .args(args)
        .env("VOUCH_DATA_DIR", data_dir)
        .env_remove("VOUCH_DATABASE_URL")
        .env_remove("VOUCH_MASTER_KEY")
        .output()
        .expect("vouch runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn audit_verify_names_the_edited_row_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    for scope in ["provision", "terminal", "admin"] {
        let created = vouch(&["admin", "create-key", "--scope", scope, "--json"], dir.path());
        assert!(created.status.success(), "{created:?}");
        let key: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
        assert!(key["api_key"].as_str().unwrap().starts_with("vouch_"));
    }
    let rotated = vouch(&["keys", "rotate"], dir.path());
    assert!(rotated.status.success(), "{rotated:?}");

    let intact = vouch(&["audit", "verify"], dir.path());
    assert!(intact.status.success(), "{intact:?}");
    assert!(stdout(&intact).contains("intact"), "{}", stdout(&intact));

    edit_audit_row(&dir.path().join("vouch.db"));
    let broken = vouch(&["audit", "verify", "--json"], dir.path());
    assert_eq!(broken.status.code(), Some(1), "{broken:?}");
    let report: serde_json::Value = serde_json::from_slice(&broken.stdout).unwrap();
    assert_eq!(report["intact"], false);
    assert_eq!(report["first_broken_seq"], 2);
    assert!(report["first_break"].as_str().unwrap().contains("row 2 was edited"), "{report}");
}

/// Edits row 2 behind the server's back, as someone with database access could.
fn edit_audit_row(db: &Path) {
    let url = format!("sqlite://{}", db.display());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use sqlx::Executor;
        sqlx::any::install_default_drivers();
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.unwrap();
        conn.execute("UPDATE audit_log SET actor = 'someone else' WHERE seq = 2").await.unwrap();
    });
}

#[test]
fn unknown_scope_and_bad_config_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let refused = vouch(&["admin", "create-key", "--scope", "root"], dir.path());
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a scope"));
    let bad_db = vouch(&["audit", "verify", "--database", "mysql://nowhere"], dir.path());
    assert_eq!(bad_db.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_db.stderr).contains("database_url"));
}

#[test]
fn sim_enroll_prints_the_documented_json() {
    let server = ServeProcess::start(None);
    let dir = tempfile::tempdir().unwrap();
    let args = ["sim", "enroll", "--server", &server.url, "--api-key", &server.admin_key, "--kind", "reader", "--json"];
    let out = vouch(&args, dir.path());
    assert!(out.status.success(), "{out:?}");
    let enrolled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["device_id", "kind", "jwk", "device_credential"] {
        assert!(enrolled.get(key).is_some(), "missing {key} in {enrolled}");
    }
    assert_eq!(enrolled["kind"], "reader");
}

#[test]
fn sim_attest_prints_the_documented_json_and_keeps_one_device_per_key() {
    let server = ServeProcess::start(None);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("terminal.pem");
    let key = key.to_str().unwrap();
    let attest = |extra: &[&str]| {
        let mut args = vec!["sim", "attest", "--server", &server.url, "--api-key", &server.admin_key, "--key", key];
        args.extend_from_slice(extra);
        args.push("--json");
        let out = vouch(&args, dir.path());
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let clean = attest(&[]);
    for field in ["device_id", "status", "ticket", "reasons"] {
        assert!(clean.get(field).is_some(), "missing {field} in {clean}");
    }
    assert_eq!(clean["status"], "affirming", "{clean}");
    assert_eq!(clean["reasons"], serde_json::json!([]));

    let rooted = attest(&["--tamper", "root"]);
    assert_eq!(rooted["device_id"], clean["device_id"], "the key file keeps one enrolment");
    assert_eq!(rooted["status"], "contraindicated", "{rooted}");
    let codes: Vec<&str> = rooted["reasons"].as_array().unwrap().iter().map(|r| r["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["rooted"], "{rooted}");
}

#[test]
fn sim_token_prints_the_documented_json_and_keeps_one_device_per_key() {
    let server = ServeProcess::start(None);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("terminal.pem");
    let key = key.to_str().unwrap();
    let token = |extra: &[&str]| {
        let mut args = vec!["sim", "token", "--server", &server.url, "--api-key", &server.admin_key];
        args.extend_from_slice(extra);
        args.push("--json");
        vouch(&args, dir.path())
    };
    let out = token(&["--key", key]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let positions: Vec<usize> = ["device_id", "access_token", "sid", "subsession_token"]
        .iter()
        .map(|field| text.find(&format!("\"{field}\":")).unwrap_or_else(|| panic!("missing {field} in {text}")))
        .collect();
    assert!(text.starts_with("{\"device_id\":") && positions.is_sorted(), "keys out of order: {text}");
    let first: serde_json::Value = serde_json::from_str(&text).unwrap();
    let claims = |token: &serde_json::Value| {
        let payload = token.as_str().unwrap().split('.').nth(1).unwrap();
        serde_json::from_slice::<serde_json::Value>(&vouch_proto::b64::decode("token", payload).unwrap()).unwrap()
    };
    let (session, subsession) = (claims(&first["access_token"]), claims(&first["subsession_token"]));
    let jkt = vouch_device::DeviceIdentity::load_pem(Path::new(key)).unwrap().jwk().thumbprint();
    assert_eq!(session["cnf"]["jkt"], jkt.as_str(), "{session}");
    assert_eq!(session["sub"], first["device_id"]);
    assert_eq!(session["sid"], first["sid"]);
    assert_eq!(subsession["sid"], first["sid"]);
    assert_eq!(subsession["cnf"], session["cnf"]);
    assert!(subsession["subsession_id"].is_string(), "{subsession}");

    let again: serde_json::Value = serde_json::from_slice(&token(&["--key", key]).stdout).unwrap();
    assert_eq!(again["device_id"], first["device_id"], "the key file keeps one enrolment");
    assert_ne!(again["sid"], first["sid"], "each run opens a new session");

    let denied = token(&["--tamper", "root"]);
    assert_eq!(denied.status.code(), Some(2), "{denied:?}");
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("contraindicated") && stderr.contains("ticket-denied"), "{stderr}");
}

/// `sim session` runs the reader as a second process on a byte pipe: a granted
/// session carries one card read each way, a tampered reader is refused with the
/// server's reason, and both are answers (exit 0).
fn check_sim_session(server: &ServeProcess) {
    let dir = tempfile::tempdir().unwrap();
    let session = |extra: &[&str]| {
        let mut args = vec!["sim", "session", "--server", &server.url, "--api-key", &server.admin_key];
        args.extend_from_slice(extra);
        args.push("--json");
        let out = vouch(&args, dir.path());
        assert!(out.status.success(), "{out:?}");
        let text = stdout(&out);
        let positions: Vec<usize> = ["session_id", "status", "reasons", "records_exchanged"]
            .iter()
            .map(|key| text.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("missing {key} in {text}")))
            .collect();
        assert!(text.starts_with("{\"session_id\":") && positions.is_sorted(), "keys out of order: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json.as_object().unwrap().len(), 4, "exactly the documented keys: {json}");
        json
    };
    let granted = session(&[]);
    assert_eq!(granted["status"], "granted", "{granted}");
    assert!(granted["session_id"].as_str().unwrap().starts_with("rs_"), "{granted}");
    assert_eq!(granted["reasons"], serde_json::json!([]));
    assert_eq!(granted["records_exchanged"], 2, "one card read and its acknowledgement");

    let refused = session(&["--tamper-reader"]);
    assert_eq!(refused["status"], "refused", "{refused}");
    assert_eq!(refused["session_id"], serde_json::Value::Null);
    assert_eq!(refused["reasons"], serde_json::json!(["reader-tampered"]));
    assert_eq!(refused["records_exchanged"], 0);
}

#[test]
fn sim_session_runs_the_reader_as_a_second_process_and_prints_the_documented_json() {
    check_sim_session(&ServeProcess::start(None));
}

/// The same two processes against a server on PostgreSQL, in a schema of its own.
#[test]
fn sim_session_runs_the_reader_as_a_second_process_on_postgres() {
    let Some(url) = postgres_schema() else { return };
    check_sim_session(&ServeProcess::start(Some(&url)));
}

/// `sim dvv` sets the parties up once per phone key and obtains one unused value per
/// run; a terminal then presents the printed value with the printed key.
fn check_sim_dvv(server: &ServeProcess) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("phone.pem");
    let key = key.to_str().unwrap();
    let sim_dvv = || {
        let args = ["sim", "dvv", "--server", &server.url, "--api-key", &server.admin_key, "--key", key, "--json"];
        let out = vouch(&args, dir.path());
        assert!(out.status.success(), "{out:?}");
        let text = stdout(&out);
        let keys = [
            "account_ref",
            "dvv",
            "max_uses",
            "expires_at",
            "merchant_id",
            "terminal_id",
            "card_acceptor_id",
            "iso_terminal_id",
            "terminal_api_key",
        ];
        let positions: Vec<usize> = keys
            .iter()
            .map(|key| text.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("missing {key} in {text}")))
            .collect();
        assert!(text.starts_with("{\"account_ref\":") && positions.is_sorted(), "keys out of order: {text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let first = sim_dvv();
    let field = |json: &serde_json::Value, key: &str| json[key].as_str().unwrap().to_owned();
    vouch_proto::dvv::AccountRef::parse(&field(&first, "account_ref")).expect("a Luhn-valid account reference");
    let dvv = field(&first, "dvv");
    assert!(dvv.len() == 6 && dvv.bytes().all(|b| b.is_ascii_digit()), "{first}");
    assert_eq!((field(&first, "card_acceptor_id").len(), field(&first, "iso_terminal_id").len()), (15, 8));
    assert_eq!(first["max_uses"], 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let state = std::fs::metadata(format!("{key}.dvv.json")).unwrap();
        assert_eq!(state.permissions().mode() & 0o777, 0o600, "the state file holds the terminal's key");
    }

    let second = sim_dvv();
    for key in ["account_ref", "merchant_id", "terminal_id", "terminal_api_key", "device_id", "consumer_id"] {
        assert_eq!(second[key], first[key], "{key}: the key file keeps one set of parties");
    }
    assert_ne!(second["dvv"], first["dvv"]);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let authorize = |printed: &serde_json::Value, stan: &str| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let body = serde_json::json!({
            "merchant_id": printed["merchant_id"], "terminal_id": printed["terminal_id"], "stan": stan,
            "transmission_time": vouch_proto::iso8583::TransmissionTime::from_unix_secs(now).to_string(),
            "amount": 1250, "currency": "978", "account_ref": printed["account_ref"], "dvv": printed["dvv"],
            "entry_mode": "071",
        });
        let request = reqwest::Client::new()
            .post(format!("{}/v1/authorizations", server.url))
            .bearer_auth(field(printed, "terminal_api_key"))
            .json(&body);
        runtime.block_on(async {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            let decided: serde_json::Value = response.json().await.unwrap();
            (field(&decided, "response_code"), field(&decided, "reason"))
        })
    };
    assert_eq!(authorize(&second, "000001"), ("00".to_owned(), "approved".to_owned()), "the printed value was unused");
    assert_eq!(
        authorize(&first, "000002"),
        ("54".to_owned(), "dvv-superseded".to_owned()),
        "a newer value replaced it"
    );
}

#[test]
fn sim_dvv_prints_an_unused_value_that_a_terminal_gets_approved() {
    check_sim_dvv(&ServeProcess::start(None));
}

#[test]
fn sim_dvv_prints_an_unused_value_that_a_terminal_gets_approved_on_postgres() {
    let Some(url) = postgres_schema() else { return };
    check_sim_dvv(&ServeProcess::start(Some(&url)));
}

/// `sim offline` sets everything up with the admin key, runs one purchase with both
/// legs carried by noisy sound, settles it, and prints a receipt that verifies with the
/// server's key from the JWK Set.
fn check_sim_offline(server: &ServeProcess) {
    let dir = tempfile::tempdir().unwrap();
    let args = ["sim", "offline", "--server", &server.url, "--api-key", &server.admin_key, "--snr-db", "5", "--json"];
    let out = vouch(&args, dir.path());
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let positions: Vec<usize> = ["payment_id", "transfer_id", "receipt", "settled", "sound_seconds"]
        .iter()
        .map(|key| text.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("missing {key} in {text}")))
        .collect();
    assert!(text.starts_with("{\"payment_id\":") && positions.is_sorted(), "keys out of order: {text}");
    let printed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(printed["settled"], true, "{printed}");
    let seconds = |key: &str| printed[key].as_f64().unwrap();
    assert!(seconds("leg_a_seconds") > 0.5 && seconds("leg_b_seconds") > 0.5, "{printed}");
    assert!((seconds("sound_seconds") - seconds("leg_a_seconds") - seconds("leg_b_seconds")).abs() < 0.002);
    assert!(printed["leg_a_bytes"].as_u64().unwrap() < 512 && printed["leg_b_bytes"].as_u64().unwrap() < 512);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let jwks: vouch_proto::JwkSet = runtime.block_on(async {
        let response = reqwest::get(format!("{}/.well-known/jwks.json", server.url)).await.unwrap();
        response.json().await.unwrap()
    });
    let receipt = vouch_proto::b64::decode("receipt", printed["receipt"].as_str().unwrap()).unwrap();
    let verified = vouch_proto::offline::verify_receipt(&receipt, |kid| jwks.cose_key(kid)).unwrap();
    let r = verified.value();
    assert_eq!(printed["payment_id"], vouch_proto::hex::encode(r.payment_id).as_str());
    assert_eq!(printed["transfer_id"], vouch_proto::hex::encode(r.transfer_id).as_str());
    assert_eq!((r.amount_minor, r.currency), (1_250, 978));
}

mod sim_offline_prints_a_settled_purchase_whose_receipt_verifies {
    #[test]
    fn sqlite() {
        super::check_sim_offline(&super::ServeProcess::start(None));
    }

    #[test]
    fn postgres() {
        let Some(url) = super::postgres_schema() else { return };
        super::check_sim_offline(&super::ServeProcess::start(Some(&url)));
    }
}

#[test]
fn sonic_round_trips_a_wav_file() {
    let dir = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..200u32).map(|i| (i * 7 % 256) as u8).collect();
    let input = dir.path().join("payload.bin");
    std::fs::write(&input, &payload).unwrap();
    let wav = dir.path().join("tx.wav");
    let output = dir.path().join("rx.bin");
    let encoded = vouch(
        &[
            "sonic",
            "encode",
            "--profile",
            "audible",
            "--rate",
            "44100",
            "--in",
            input.to_str().unwrap(),
            "--out",
            wav.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(encoded.status.success(), "{encoded:?}");
    let decoded =
        vouch(&["sonic", "decode", "--in", wav.to_str().unwrap(), "--out", output.to_str().unwrap()], dir.path());
    assert!(decoded.status.success(), "{decoded:?}");
    assert_eq!(std::fs::read(&output).unwrap(), payload);

    let silence = dir.path().join("silence.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(&silence, spec).unwrap();
    for _ in 0..48_000 {
        writer.write_sample(0i16).unwrap();
    }
    writer.finalize().unwrap();
    let nothing = vouch(&["sonic", "decode", "--in", silence.to_str().unwrap()], dir.path());
    assert_eq!(nothing.status.code(), Some(1), "{nothing:?}");
}

/// `vouch tsm provider-listen` registers the provider, then opens, acknowledges and
/// prints each relayed message once, however often it is delivered; its key persists.
#[test]
fn tsm_provider_listen_registers_and_prints_each_message_once() {
    use std::io::{BufRead, BufReader};
    use vouch_proto::jwk::Jwk;
    use vouch_proto::tsm::{MessageBody, RelayEnvelope, seal_relay};

    let server = ServeProcess::start(None);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("provider.key");
    let listen = crate::serve::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vouch"))
        .args(["tsm", "provider-listen", "--listen", &listen, "--name", "First Bank", "--json"])
        .args(["--key", key_file.to_str().unwrap(), "--server", &server.url, "--api-key", &server.admin_key])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(started["event"], "listening", "{started}");
    assert_eq!(started["endpoint"], format!("http://{listen}/"));
    let provider_id = started["service_provider_id"].as_str().unwrap().to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let admin = vouch_device::VouchClient::new(&server.url).unwrap().with_api_key(&server.admin_key);
        let registered = admin.service_providers().await.unwrap();
        let record = registered.iter().find(|p| p.service_provider_id == provider_id).unwrap();
        assert_eq!(serde_json::to_value(&record.public_jwk).unwrap(), started["public_jwk"]);

        let jwk: Jwk = serde_json::from_value(started["public_jwk"].clone()).unwrap();
        let key = vouch_proto::hpke::HpkePublicKey::from_sec1(jwk.verifying_key().unwrap().sec1()).unwrap();
        let body = MessageBody {
            payment_certificate: "cert".into(),
            provider_id: provider_id.clone(),
            payload: b"pay 5".to_vec(),
        };
        let rng = vouch_proto::crypto::SystemRandom::new();
        let sealed = seal_relay(&key, "msg_1", &provider_id, "dev_1", 7, &body, &rng).unwrap();
        let envelope = RelayEnvelope {
            message_id: "msg_1".into(),
            provider_id: provider_id.clone(),
            device_id: "dev_1".into(),
            counter: 7,
            enc: vouch_proto::b64::encode(sealed.enc),
            ciphertext: vouch_proto::b64::encode(&sealed.ciphertext),
            created_at: 1,
        };
        let http = reqwest::Client::new();
        for _ in 0..2 {
            let answer = http
                .post(format!("http://{listen}/"))
                .header("Idempotency-Key", "msg_1")
                .json(&envelope)
                .send()
                .await
                .unwrap();
            assert!(answer.status().is_success(), "{answer:?}");
        }
    });
    let message: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        (
            &message["event"],
            &message["message_id"],
            &message["device_id"],
            &message["counter"],
            &message["payload_text"]
        ),
        (&"message".into(), &"msg_1".into(), &"dev_1".into(), &7.into(), &"pay 5".into()),
        "{message}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(lines.next().is_none_or(|line| line.is_err()), "a second delivery of msg_1 was printed again");

    // The same key file gives the same provider key.
    let mut again = Command::new(env!("CARGO_BIN_EXE_vouch"))
        .args(["tsm", "provider-listen", "--listen", &crate::serve::free_port(), "--json"])
        .args(["--key", key_file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(again.stdout.take().unwrap()).lines();
    let restarted: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(restarted["public_jwk"], started["public_jwk"]);
    again.kill().unwrap();
    again.wait().unwrap();
}
