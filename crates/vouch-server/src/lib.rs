//! Vouch's HTTP service. [`router`] builds the whole API from an [`AppState`], so tests
//! drive it without a socket; [`serve`] binds it, and the ISO 8583 listener
//! (`dvv::iso8583`) when configured, with graceful shutdown of both.
//!
//! One module per capability, each owning its routes, service logic and storage calls;
//! the foundation modules (`registry`, `admin`, `ops`, `auth`, `keys`, `audit`) serve
//! them all.

mod admin;
pub mod attest;
pub mod audit;
pub mod auth;
pub mod config;
pub mod dvv;
pub mod error;
mod extract;
mod files;
pub mod keys;
pub mod ledger;
mod metrics;
pub mod offline;
mod ops;
pub mod registry;
pub mod session;
pub mod token;
pub mod tsm;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use vouch_proto::crypto::SystemRandom;
use vouch_proto::{Clock, SystemClock};
use vouch_store::{Store, StoreOptions};

pub use config::{Config, ConfigError, ConfigLayer, LogFormat};
use error::ApiError;
use keys::{DatabaseKeyStore, KeyStore, MasterKey};

pub const ADMIN_KEY_FILE: &str = "admin.key";
/// Expired enrolment nonces and DPoP proof records are purged this often.
const NONCE_PURGE_EVERY: Duration = Duration::from_secs(300);

/// What every handler shares. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    pub keys: Arc<dyn KeyStore>,
    pub config: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    pub rng: Arc<SystemRandom>,
    pub rate_limiter: Arc<auth::RateLimiter>,
    pub api_keys: Arc<auth::ApiKeyCache>,
    pub attest_policy: Arc<attest::Policy>,
    pub dpop: Arc<token::DpopState>,
    pub dvv: Arc<dvv::DvvState>,
    pub tsm: Arc<tsm::TsmState>,
    metrics: Arc<metrics::Metrics>,
}

impl AppState {
    pub fn now(&self) -> i64 {
        self.clock.now_unix()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("database: {0}")]
    Store(#[from] vouch_store::StoreError),
    #[error("signing keys: {0}")]
    Keys(#[from] keys::KeyError),
    #[error("{0}")]
    Policy(#[from] attest::PolicyError),
    #[error("cannot read the appraisal policy {path}: {source}")]
    PolicyFile { path: String, source: std::io::Error },
    #[error("bootstrap admin key: {0}")]
    Bootstrap(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    /// The HTTP client that delivers relayed messages cannot be built.
    #[error("HTTP client: {0}")]
    Http(String),
    /// A certificate, key or CA file for the ISO 8583 listener that cannot be used.
    #[error("ISO 8583 TLS: {0}")]
    Iso8583Tls(String),
}

/// Opens the database (applying migrations), loads or creates the signing keys and,
/// on an empty database, writes the bootstrap admin key to `DATA_DIR/admin.key`.
pub async fn build_state(config: Config, master_key_env: Option<&str>) -> Result<AppState, StartError> {
    build_state_with_clock(config, master_key_env, Arc::new(SystemClock)).await
}

pub async fn build_state_with_clock(
    config: Config,
    master_key_env: Option<&str>,
    clock: Arc<dyn Clock>,
) -> Result<AppState, StartError> {
    let attest_policy = Arc::new(load_policy(&config)?);
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| StartError::DataDir { path: config.data_dir.display().to_string(), source })?;
    let rng: Arc<SystemRandom> = Arc::new(SystemRandom::new());
    let store =
        Store::open(&config.database_url, StoreOptions { max_connections: config.database_connections_max }).await?;
    let master = MasterKey::load_or_create(master_key_env, &config.data_dir, &rng)?;
    let dpop = token::DpopState::new(&master, config.dpop_nonce_required, config.dpop_nonce_window_secs)
        .map_err(keys::KeyError::from)?;
    let dvv = dvv::DvvState::new(&master, config.dvv_digits).map_err(keys::KeyError::from)?;
    let delivery_timeout = Duration::from_secs(config.tsm_delivery_timeout_secs.unsigned_abs());
    let tsm = tsm::TsmState::new(&master, delivery_timeout).map_err(|e| StartError::Http(e.to_string()))?;
    let keys = DatabaseKeyStore::open(store.clone(), master, rng.clone(), clock.now_unix()).await?;
    bootstrap_admin_key(&store, &config, &rng, clock.now_unix()).await?;
    Ok(AppState {
        rate_limiter: Arc::new(auth::RateLimiter::new(config.rate_limit_per_sec, config.rate_limit_burst)),
        api_keys: Arc::new(auth::ApiKeyCache::default()),
        attest_policy,
        dpop: Arc::new(dpop),
        dvv: Arc::new(dvv),
        tsm: Arc::new(tsm),
        store,
        keys: Arc::new(keys),
        config: Arc::new(config),
        clock,
        rng,
        metrics: Arc::new(metrics::Metrics::default()),
    })
}

fn load_policy(config: &Config) -> Result<attest::Policy, StartError> {
    match &config.attest_policy_file {
        Some(path) => {
            let rego = std::fs::read_to_string(path)
                .map_err(|source| StartError::PolicyFile { path: path.display().to_string(), source })?;
            Ok(attest::Policy::compile(&path.display().to_string(), &rego)?)
        }
        None => Ok(attest::Policy::compile("attest.rego", attest::DEFAULT_POLICY)?),
    }
}

async fn bootstrap_admin_key(store: &Store, config: &Config, rng: &SystemRandom, now: i64) -> Result<(), StartError> {
    let mut tx = store.begin().await?;
    let existing = tx.count_api_keys().await?;
    drop(tx);
    if existing > 0 {
        return Ok(());
    }
    let key = match auth::create_api_key(
        store,
        rng,
        Some(auth::BOOTSTRAP_KEY_ID),
        &[auth::Scope::Admin],
        "bootstrap",
        now,
        "system",
    )
    .await
    {
        Ok(key) => key,
        // Another instance on the same database bootstrapped first.
        Err(e) if e.status() == StatusCode::CONFLICT => return Ok(()),
        Err(e) => return Err(StartError::Bootstrap(e.to_string())),
    };
    let path = config.data_dir.join(ADMIN_KEY_FILE);
    files::write_secret_file(&path, key.plaintext.as_bytes())
        .map_err(|e| StartError::Bootstrap(format!("cannot write {}: {e}", path.display())))?;
    tracing::warn!(path = %path.display(), "wrote the bootstrap admin API key; keep this file secret");
    Ok(())
}

/// The whole API and its OpenAPI description, built from the same route table so the
/// document cannot drift from the code.
pub fn api() -> (Router<AppState>, OpenApi) {
    let (router, mut openapi) = OpenApiRouter::new()
        .merge(ops::routes())
        .merge(registry::routes())
        .merge(admin::routes())
        .merge(attest::routes())
        .merge(token::routes())
        .merge(session::routes())
        .merge(dvv::routes())
        .merge(ledger::routes())
        .merge(offline::routes())
        .merge(tsm::routes())
        .split_for_parts();
    describe_responses(&mut openapi);
    merge_flattened_objects(&mut openapi);
    openapi.info.title = "Vouch".into();
    openapi.info.version = env!("CARGO_PKG_VERSION").into();
    openapi.info.description = Some("Trust server for payment devices".into());
    let components = openapi.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "api_key",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("vouch API key").build()),
    );
    components.add_security_scheme(
        "dpop",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "Authorization",
            "`Authorization: DPoP <access token>` together with a `DPoP` proof header (RFC 9449): \
             the proof carries `ath` and the latest `DPoP-Nonce`",
        ))),
    );
    (router, openapi)
}

/// A struct that flattens another (`#[serde(flatten)]` with `#[schema(inline)]`) comes
/// out as `allOf` of two objects; when one of them is closed (`deny_unknown_fields`),
/// no body satisfies both, and schema-driven clients cannot make one. Such a schema
/// becomes the one closed object it stands for.
fn merge_flattened_objects(openapi: &mut OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::{AdditionalProperties, Object, Schema};
    let Some(components) = openapi.components.as_mut() else { return };
    for schema in components.schemas.values_mut() {
        let RefOr::T(Schema::AllOf(all)) = schema else { continue };
        let objects: Option<Vec<&Object>> = all
            .items
            .iter()
            .map(|item| match item {
                RefOr::T(Schema::Object(object)) => Some(object),
                _ => None,
            })
            .collect();
        let Some(objects) = objects else { continue };
        let closed = objects
            .iter()
            .any(|o| matches!(o.additional_properties.as_deref(), Some(AdditionalProperties::FreeForm(false))));
        if !closed {
            continue;
        }
        let mut merged = Object::new();
        merged.schema_type = utoipa::openapi::schema::SchemaType::Type(utoipa::openapi::schema::Type::Object);
        merged.description = all.description.clone().or_else(|| objects.iter().find_map(|o| o.description.clone()));
        for object in &objects {
            merged.properties.extend(object.properties.clone());
            merged.required.extend(object.required.iter().cloned());
        }
        merged.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
        *schema = RefOr::T(Schema::Object(merged));
    }
}

/// OpenAPI 3.1 requires a description on every response; the route macros leave the
/// ones they derive from a status code empty.
fn describe_responses(openapi: &mut OpenApi) {
    use utoipa::openapi::RefOr;
    for item in openapi.paths.paths.values_mut() {
        let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete];
        for operation in operations.into_iter().flatten() {
            for (status, response) in operation.responses.responses.iter_mut() {
                if let RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    response.description = match status.as_str() {
                        "4XX" => "Refused: a problem document (RFC 9457) naming the reason".to_owned(),
                        code => StatusCode::from_bytes(code.as_bytes())
                            .ok()
                            .and_then(|s| s.canonical_reason())
                            .unwrap_or("Response")
                            .to_owned(),
                    };
                }
            }
        }
    }
}

pub fn router(state: AppState) -> Router {
    let (api_router, openapi) = api();
    let openapi_json = Arc::new(openapi.to_json().unwrap_or_else(|_| "{}".into()));
    let body_limit = state.config.body_bytes_max;
    api_router
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let body = openapi_json.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], body.as_str().to_owned()) }
            }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this endpoint does not accept that method",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), token::attach_nonce))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            axum::response::IntoResponse::into_response(ApiError::internal("handler panicked"))
        }))
        .with_state(state)
}

/// Background upkeep: links recorded audit entries into the chain, reloads signing keys
/// (so rotations made elsewhere are picked up) and purges expired nonces. Runs until
/// the returned handle is aborted.
pub fn spawn_upkeep(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut key_refresh = tokio::time::interval(Duration::from_secs(state.config.key_refresh_secs));
        let mut nonce_purge = tokio::time::interval(NONCE_PURGE_EVERY);
        let mut chain = tokio::time::interval(vouch_store::CHAIN_EVERY);
        chain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = chain.tick() => {
                    if let Err(e) = state.store.chain_audit().await {
                        tracing::error!(error = %e, "linking audit entries into the chain failed");
                    }
                }
                _ = key_refresh.tick() => {
                    if let Err(e) = state.keys.refresh(state.now()).await {
                        tracing::error!(error = %e, "signing key refresh failed");
                    }
                }
                _ = nonce_purge.tick() => {
                    let purged = async {
                        let mut tx = state.store.begin().await?;
                        let purged = tx.purge_enrolment_nonces(state.now()).await?
                            + tx.purge_dpop_proofs(state.now()).await?;
                        tx.commit().await.map(|()| purged)
                    }.await;
                    match purged {
                        Ok(n) if n > 0 => tracing::debug!(purged = n, "purged expired enrolment nonces and DPoP proofs"),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "nonce purge failed"),
                    }
                }
            }
        }
    })
}

/// Serves on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    serve_with_iso8583(listener, None, state, shutdown).await
}

/// Serves HTTP on `listener` and, when given, ISO 8583 on `iso8583`, until `shutdown`
/// resolves; then both stop accepting and drain what they have in hand before the
/// database closes.
pub async fn serve_with_iso8583(
    listener: tokio::net::TcpListener,
    iso8583: Option<dvv::iso8583::Iso8583Listener>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let upkeep = spawn_upkeep(state.clone());
    let delivery = tsm::spawn_delivery(state.clone());
    let store = state.store.clone();
    // One signal, two listeners: the shutdown future completes once, into a channel
    // both wait on.
    // A failing HTTP server stops the ISO 8583 listener too.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop = Arc::new(stop);
    let signal = tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            let _ = stop.send(true);
        }
    });
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stopped| *stopped).await;
    };
    let http = async {
        let served = axum::serve(listener, router(state.clone()))
            .with_graceful_shutdown(until_stopped(stopped.clone()))
            .await
            .map_err(StartError::Serve);
        let _ = stop.send(true);
        served
    };
    let iso8583 = async {
        if let Some(iso8583) = iso8583 {
            iso8583.run(state.clone(), until_stopped(stopped.clone())).await;
        }
    };
    let (result, ()) = tokio::join!(http, iso8583);
    signal.abort();
    upkeep.abort();
    delivery.abort();
    // What the last requests recorded joins the chain before the database closes.
    if let Err(e) = store.chain_audit().await {
        tracing::error!(error = %e, "linking the last audit entries into the chain failed");
    }
    store.close().await;
    result
}

/// Binds `config.listen` (and `config.iso8583_listen` when set) and serves until
/// `shutdown` resolves.
pub async fn serve(state: AppState, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), StartError> {
    let addr = state.config.listen;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
    let iso8583 = dvv::iso8583::Iso8583Listener::bind(&state.config).await?;
    tracing::info!(%addr, database = ?state.store.backend(), "vouch listening");
    serve_with_iso8583(listener, iso8583, state, shutdown).await
}
