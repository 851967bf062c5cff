//! Starts real Vouch servers on free ports, and sets them up for attesting devices.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use vouch_device::attest::{SimulatedDeviceState, Tamper, TamperMonitor};
use vouch_device::sim::{self, Attestation};
use vouch_device::{DeviceError, DeviceIdentity, VouchClient};
use vouch_proto::SystemClock;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::DeviceKind;
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
    start_configured(|_| {}).await
}

/// A server on a temporary SQLite database, with `configure` applied to its defaults.
pub async fn start_configured(configure: impl FnOnce(&mut Config)) -> RunningServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_data_dir(dir.path());
    configure(&mut config);
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

/// A database URL for a private schema of its own on `VOUCH_TEST_DATABASE_URL`, so runs
/// never see each other's rows; `None`, with a notice, without it.
pub async fn postgres_database() -> Option<String> {
    use sqlx::Executor;
    let Ok(base) = std::env::var("VOUCH_TEST_DATABASE_URL") else {
        eprintln!("skipping PostgreSQL case: VOUCH_TEST_DATABASE_URL is not set");
        return None;
    };
    sqlx::any::install_default_drivers();
    let schema = format!("e2e_{}", uuid::Uuid::new_v4().simple());
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&base).await.unwrap();
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).await.unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{separator}options=-c%20search_path%3D{schema}"))
}

/// A server with one merchant and the clean reference values of one device kind.
pub struct Fixture {
    pub server: RunningServer,
    pub admin: VouchClient,
    /// Devices call the attestation and token endpoints with no API key.
    pub device_client: VouchClient,
    pub kind: DeviceKind,
    pub merchant_id: String,
    pub rng: SystemRandom,
}

pub struct Device {
    pub identity: Arc<DeviceIdentity>,
    pub device_id: String,
    pub monitor: TamperMonitor,
}

pub async fn fixture() -> Fixture {
    fixture_for(DeviceKind::Terminal).await
}

pub async fn fixture_for(kind: DeviceKind) -> Fixture {
    fixture_on(start().await, kind).await
}

pub async fn fixture_on(server: RunningServer, kind: DeviceKind) -> Fixture {
    let admin = server.admin();
    let merchant_id = admin.create_merchant("Corner Coffee").await.unwrap().merchant_id;
    let reference = SimulatedDeviceState::clean(kind, &merchant_id).reference_values();
    assert_eq!(admin.put_reference_values(&reference).await.unwrap(), reference);
    let device_client = VouchClient::new(&server.url).unwrap();
    Fixture { server, admin, device_client, kind, merchant_id, rng: SystemRandom::new() }
}

impl Fixture {
    pub async fn device(&self, tampers: &[Tamper]) -> Device {
        let state = SimulatedDeviceState::clean(self.kind, &self.merchant_id).with_tampers(tampers);
        let identity = DeviceIdentity::generate(&self.rng).unwrap();
        let enrolled = sim::enrol(&self.admin, &identity, &state.profile(), &SystemClock, &self.rng).await.unwrap();
        Device { identity: Arc::new(identity), device_id: enrolled.device_id, monitor: TamperMonitor::new(state) }
    }

    pub async fn attest(&self, device: &mut Device) -> Result<Attestation, DeviceError> {
        let Device { identity, device_id, monitor } = device;
        sim::attest(&self.device_client, identity, device_id, monitor, &SystemClock, &self.rng).await
    }
}
