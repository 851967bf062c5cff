//! `vouch serve` as a child process on a free port, and private PostgreSQL schemas.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

/// How long a starting server may take to accept connections.
const START_WAIT: Duration = Duration::from_secs(20);

/// A `vouch serve` child process on a free port, killed when dropped. It can be killed
/// with SIGKILL and started again on the same data directory and database.
pub struct ServeProcess {
    child: Child,
    pub url: String,
    /// The bootstrap admin key; empty on an instance that found the database bootstrapped.
    pub admin_key: String,
    database: Option<String>,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl ServeProcess {
    /// `vouch serve` on `database`, or on SQLite in its data directory.
    pub fn start(database: Option<&str>) -> ServeProcess {
        Self::start_with(database, &[])
    }

    /// As [`ServeProcess::start`], with these `VOUCH_*` variables set.
    pub fn start_with(database: Option<&str>, env: &[(&str, &str)]) -> ServeProcess {
        let dir = tempfile::tempdir().unwrap();
        let database = database.map(str::to_owned);
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (child, url) = spawn(dir.path(), database.as_deref(), &env);
        let admin_key = admin_key(dir.path());
        ServeProcess { child, url, admin_key, database, env, dir }
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same data directory and database, on a new port.
    pub fn restart(&mut self) {
        self.kill();
        let (child, url) = spawn(self.dir.path(), self.database.as_deref(), &self.env);
        (self.child, self.url) = (child, url);
    }

    /// The database the server runs on, as `Store::open` takes it.
    pub fn database_url(&self) -> String {
        let sqlite = || format!("sqlite://{}", self.dir.path().join("vouch.db").display());
        self.database.clone().unwrap_or_else(sqlite)
    }
}

fn spawn(dir: &Path, database: Option<&str>, env: &[(String, String)]) -> (Child, String) {
    let listen = free_port();
    let mut args = vec!["serve", "--listen", &listen];
    if let Some(url) = database {
        args.extend(["--database", url]);
    }
    let mut command = Command::new(env!("CARGO_BIN_EXE_vouch"));
    command
        .args(args)
        .env("VOUCH_DATA_DIR", dir)
        .env_remove("VOUCH_DATABASE_URL")
        .env_remove("VOUCH_MASTER_KEY")
        .stderr(std::process::Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(&listen).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("vouch serve exited at start: {status}");
        }
        assert!(started.elapsed() < START_WAIT, "vouch serve did not listen on {listen} within {START_WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, format!("http://{listen}"))
}

/// The server writes the key before it listens; only the instance that bootstraps a
/// database writes one.
fn admin_key(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("admin.key")).map(|key| key.trim().to_owned()).unwrap_or_default()
}

pub fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A database URL for a new schema of its own on `VOUCH_TEST_DATABASE_URL`; `None`,
/// with a notice, without it.
pub fn postgres_schema() -> Option<String> {
    let Ok(base) = std::env::var("VOUCH_TEST_DATABASE_URL") else {
        eprintln!("skipping PostgreSQL case: VOUCH_TEST_DATABASE_URL is not set");
        return None;
    };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let schema = format!("cli_{}_{nanos}", std::process::id());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use sqlx::Executor;
        sqlx::any::install_default_drivers();
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&base).await.unwrap();
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).await.unwrap();
    });
    let separator = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{separator}options=-c%20search_path%3D{schema}"))
}
