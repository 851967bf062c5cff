//! Starts real Vouch servers on free ports.

use std::net::SocketAddr;

use tokio::sync::oneshot;
use vouch_device::VouchClient;
use vouch_server::{AppState, Config, build_state, serve_on};

pub struct RunningServer {
    pub url: String,
    pub state: AppState,
    pub admin_key: String,
    stop: Option<oneshot::Sender<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl RunningServer {
    pub fn admin(&self) -> VouchClient {
        VouchClient::new(&self.url).unwrap().with_api_key(&self.admin_key)
    }
}

/// A server on a temporary SQLite database.
pub async fn start() -> RunningServer {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::for_data_dir(dir.path());
    start_with(config, None, Some(dir)).await
}

/// A server on `config`; `master_key` shared by instances of one database.
pub async fn start_with(mut config: Config, master_key: Option<&str>, dir: Option<tempfile::TempDir>) -> RunningServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    config.listen = addr;
    config.rate_limit_per_sec = 10_000;
    config.rate_limit_burst = 10_000;
    let data_dir = config.data_dir.clone();
    let state = build_state(config, master_key).await.unwrap();
    let admin_key = std::fs::read_to_string(data_dir.join(vouch_server::ADMIN_KEY_FILE))
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_on(listener, state.clone(), async move {
        let _ = stopped.await;
    }));
    RunningServer { url: format!("http://{addr}"), state, admin_key, stop: Some(stop), _dir: dir }
}
