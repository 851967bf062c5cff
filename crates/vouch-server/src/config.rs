//! Configuration: defaults, then a TOML file, then `VOUCH_*` environment variables,
//! then command-line flags, each layer overriding the one before; validated once into
//! [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8700";
pub const DEFAULT_DATA_DIR: &str = "vouch-data";
pub const BODY_BYTES_MAX_DEFAULT: usize = 64 * 1024;
pub const MASTER_KEY_ENV: &str = "VOUCH_MASTER_KEY";
const ENV_PREFIX: &str = "VOUCH_";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is invalid: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{name} = {value:?} is invalid: {expected}")]
    Invalid { name: String, value: String, expected: &'static str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One layer of settings; every field optional. The file, the environment and the
/// flags each produce one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub database_connections_max: Option<u32>,
    pub issuer: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub body_bytes_max: Option<usize>,
    pub rate_limit_per_sec: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    pub enrolment_nonce_ttl_secs: Option<i64>,
    pub proof_iat_window_secs: Option<i64>,
    pub device_credential_ttl_secs: Option<i64>,
    pub key_refresh_secs: Option<u64>,
    pub attest_challenge_ttl_secs: Option<i64>,
    pub attest_ticket_ttl_secs: Option<i64>,
    pub attest_spot_check_share: Option<f64>,
    pub attest_policy_file: Option<PathBuf>,
    pub public_url: Option<String>,
    pub access_token_ttl_secs: Option<i64>,
    pub dpop_iat_window_secs: Option<i64>,
    pub dpop_nonce_required: Option<bool>,
    pub dpop_nonce_window_secs: Option<i64>,
    pub reader_grant_ttl_secs: Option<i64>,
    pub dvv_digits: Option<u8>,
    pub dvv_max_uses: Option<i64>,
    pub dvv_ttl_secs: Option<i64>,
    /// Only in the file: `[dvv_category_policies."4111"]` with `max_uses` and `ttl_secs`.
    pub dvv_category_policies: Option<BTreeMap<String, DvvPolicy>>,
    pub dvv_risk_threshold: Option<u8>,
    pub dvv_velocity_max: Option<i64>,
    pub dvv_velocity_window_secs: Option<i64>,
    pub dvv_wrong_tries_max: Option<i64>,
    pub offline_credential_ttl_secs: Option<i64>,
    pub offline_limit_max_minor: Option<i64>,
    pub offline_risk_threshold: Option<u8>,
    pub terminal_certificate_ttl_secs: Option<i64>,
    pub tsm_risk_threshold: Option<u8>,
    pub tsm_payment_certificate_ttl_secs: Option<i64>,
    pub tsm_delivery_attempts_max: Option<i64>,
    pub tsm_retry_base_secs: Option<i64>,
    pub tsm_retry_max_secs: Option<i64>,
    pub tsm_delivery_timeout_secs: Option<i64>,
    pub iso8583_listen: Option<SocketAddr>,
    pub iso8583_allow_remote: Option<bool>,
    pub iso8583_tls_cert: Option<PathBuf>,
    pub iso8583_tls_key: Option<PathBuf>,
    pub iso8583_tls_client_ca: Option<PathBuf>,
    pub iso8583_idle_timeout_secs: Option<u64>,
}

/// How long a DVV lasts: `max_uses` authorizations or `ttl_secs`, whichever ends first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DvvPolicy {
    pub max_uses: i64,
    pub ttl_secs: i64,
}

macro_rules! overlay {
    ($upper:expr, $lower:expr, $($field:ident),*) => {
        ConfigLayer { $($field: $upper.$field.or($lower.$field)),* }
    };
}

impl ConfigLayer {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }

    /// Reads `VOUCH_<FIELD>` for every field through `lookup` (the process environment
    /// in production, a map in tests).
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        fn get<T: std::str::FromStr>(
            lookup: &impl Fn(&str) -> Option<String>,
            field: &str,
            expected: &'static str,
        ) -> Result<Option<T>, ConfigError> {
            let name = format!("{ENV_PREFIX}{}", field.to_ascii_uppercase());
            match lookup(&name) {
                None => Ok(None),
                Some(value) => value.parse().map(Some).map_err(|_| ConfigError::Invalid { name, value, expected }),
            }
        }
        let log_format = match lookup("VOUCH_LOG_FORMAT").as_deref() {
            None => None,
            Some("text") => Some(LogFormat::Text),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "VOUCH_LOG_FORMAT".into(),
                    value: other.into(),
                    expected: "text or json",
                });
            }
        };
        Ok(ConfigLayer {
            listen: get(&lookup, "listen", "a socket address such as 127.0.0.1:8700")?,
            data_dir: get(&lookup, "data_dir", "a directory path")?,
            database_url: get(&lookup, "database_url", "a sqlite: or postgres:// URL")?,
            database_connections_max: get(&lookup, "database_connections_max", "a positive integer")?,
            issuer: get(&lookup, "issuer", "a URL")?,
            log_format,
            log_level: get(&lookup, "log_level", "a tracing filter such as info")?,
            body_bytes_max: get(&lookup, "body_bytes_max", "a byte count")?,
            rate_limit_per_sec: get(&lookup, "rate_limit_per_sec", "a positive integer")?,
            rate_limit_burst: get(&lookup, "rate_limit_burst", "a positive integer")?,
            enrolment_nonce_ttl_secs: get(&lookup, "enrolment_nonce_ttl_secs", "seconds")?,
            proof_iat_window_secs: get(&lookup, "proof_iat_window_secs", "seconds")?,
            device_credential_ttl_secs: get(&lookup, "device_credential_ttl_secs", "seconds")?,
            key_refresh_secs: get(&lookup, "key_refresh_secs", "seconds")?,
            attest_challenge_ttl_secs: get(&lookup, "attest_challenge_ttl_secs", "seconds")?,
            attest_ticket_ttl_secs: get(&lookup, "attest_ticket_ttl_secs", "seconds")?,
            attest_spot_check_share: get(&lookup, "attest_spot_check_share", "a share from 0 to 1")?,
            attest_policy_file: get(&lookup, "attest_policy_file", "a Rego file path")?,
            public_url: get(&lookup, "public_url", "an http(s) URL")?,
            access_token_ttl_secs: get(&lookup, "access_token_ttl_secs", "seconds")?,
            dpop_iat_window_secs: get(&lookup, "dpop_iat_window_secs", "seconds")?,
            dpop_nonce_required: get(&lookup, "dpop_nonce_required", "true or false")?,
            dpop_nonce_window_secs: get(&lookup, "dpop_nonce_window_secs", "seconds")?,
            reader_grant_ttl_secs: get(&lookup, "reader_grant_ttl_secs", "seconds")?,
            dvv_digits: get(&lookup, "dvv_digits", "4 to 12")?,
            dvv_max_uses: get(&lookup, "dvv_max_uses", "a positive integer")?,
            dvv_ttl_secs: get(&lookup, "dvv_ttl_secs", "seconds")?,
            dvv_category_policies: None,
            dvv_risk_threshold: get(&lookup, "dvv_risk_threshold", "1 to 101")?,
            dvv_velocity_max: get(&lookup, "dvv_velocity_max", "a positive integer")?,
            dvv_velocity_window_secs: get(&lookup, "dvv_velocity_window_secs", "seconds")?,
            dvv_wrong_tries_max: get(&lookup, "dvv_wrong_tries_max", "a positive integer")?,
            offline_credential_ttl_secs: get(&lookup, "offline_credential_ttl_secs", "seconds")?,
            offline_limit_max_minor: get(&lookup, "offline_limit_max_minor", "a positive integer")?,
            offline_risk_threshold: get(&lookup, "offline_risk_threshold", "1 to 101")?,
            terminal_certificate_ttl_secs: get(&lookup, "terminal_certificate_ttl_secs", "seconds")?,
            tsm_risk_threshold: get(&lookup, "tsm_risk_threshold", "1 to 101")?,
            tsm_payment_certificate_ttl_secs: get(&lookup, "tsm_payment_certificate_ttl_secs", "seconds")?,
            tsm_delivery_attempts_max: get(&lookup, "tsm_delivery_attempts_max", "1 to 100")?,
            tsm_retry_base_secs: get(&lookup, "tsm_retry_base_secs", "seconds")?,
            tsm_retry_max_secs: get(&lookup, "tsm_retry_max_secs", "seconds")?,
            tsm_delivery_timeout_secs: get(&lookup, "tsm_delivery_timeout_secs", "seconds")?,
            iso8583_listen: get(&lookup, "iso8583_listen", "a socket address such as 127.0.0.1:8583")?,
            iso8583_allow_remote: get(&lookup, "iso8583_allow_remote", "true or false")?,
            iso8583_tls_cert: get(&lookup, "iso8583_tls_cert", "a PEM certificate chain file")?,
            iso8583_tls_key: get(&lookup, "iso8583_tls_key", "a PEM private key file")?,
            iso8583_tls_client_ca: get(&lookup, "iso8583_tls_client_ca", "a PEM CA certificate file")?,
            iso8583_idle_timeout_secs: get(&lookup, "iso8583_idle_timeout_secs", "seconds")?,
        })
    }

    /// `self` wins wherever it has a value.
    pub fn over(self, lower: ConfigLayer) -> ConfigLayer {
        overlay!(
            self,
            lower,
            listen,
            data_dir,
            database_url,
            database_connections_max,
            issuer,
            log_format,
            log_level,
            body_bytes_max,
            rate_limit_per_sec,
            rate_limit_burst,
            enrolment_nonce_ttl_secs,
            proof_iat_window_secs,
            device_credential_ttl_secs,
            key_refresh_secs,
            attest_challenge_ttl_secs,
            attest_ticket_ttl_secs,
            attest_spot_check_share,
            attest_policy_file,
            public_url,
            access_token_ttl_secs,
            dpop_iat_window_secs,
            dpop_nonce_required,
            dpop_nonce_window_secs,
            reader_grant_ttl_secs,
            dvv_digits,
            dvv_max_uses,
            dvv_ttl_secs,
            dvv_category_policies,
            dvv_risk_threshold,
            dvv_velocity_max,
            dvv_velocity_window_secs,
            dvv_wrong_tries_max,
            offline_credential_ttl_secs,
            offline_limit_max_minor,
            offline_risk_threshold,
            terminal_certificate_ttl_secs,
            tsm_risk_threshold,
            tsm_payment_certificate_ttl_secs,
            tsm_delivery_attempts_max,
            tsm_retry_base_secs,
            tsm_retry_max_secs,
            tsm_delivery_timeout_secs,
            iso8583_listen,
            iso8583_allow_remote,
            iso8583_tls_cert,
            iso8583_tls_key,
            iso8583_tls_client_ca,
            iso8583_idle_timeout_secs
        )
    }
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub database_connections_max: u32,
    /// `iss` of every token the server signs.
    pub issuer: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub body_bytes_max: usize,
    /// Sustained requests per second allowed per API key, and the burst above it.
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
    pub enrolment_nonce_ttl_secs: i64,
    /// How far a proof's `iat` may lie from the server's clock.
    pub proof_iat_window_secs: i64,
    pub device_credential_ttl_secs: i64,
    /// How often each instance reloads the signing keys, so a rotation made by another
    /// instance or by `vouch keys rotate` is picked up.
    pub key_refresh_secs: u64,
    /// How long a device has to answer an attestation challenge.
    pub attest_challenge_ttl_secs: i64,
    /// How long an attestation ticket is valid.
    pub attest_ticket_ttl_secs: i64,
    /// Chance that each optional command is added to a challenge.
    pub attest_spot_check_share: f64,
    /// A Rego appraisal policy replacing the default one.
    pub attest_policy_file: Option<PathBuf>,
    /// The URL clients reach this server at (scheme, host, port), against which DPoP
    /// proofs' `htu` is checked. Unset, it is `http://` plus the request's `Host`;
    /// behind a TLS-terminating proxy, set it.
    pub public_url: Option<String>,
    /// Longest life of an access token; never beyond its attestation ticket.
    pub access_token_ttl_secs: i64,
    /// How far a DPoP proof's `iat` may lie from the server's clock.
    pub dpop_iat_window_secs: i64,
    /// Require a server-issued `DPoP-Nonce` in every proof (RFC 9449 section 8), which
    /// bounds how long a proof made in advance is good for.
    pub dpop_nonce_required: bool,
    /// How long each nonce window lasts; a nonce is accepted in its window and the
    /// ones either side.
    pub dpop_nonce_window_secs: i64,
    /// How long a reader has to accept a session grant.
    pub reader_grant_ttl_secs: i64,
    /// Length of a DVV, so it fits the terminal's field.
    pub dvv_digits: u8,
    /// How long a DVV lasts where no category policy applies.
    pub dvv_policy: DvvPolicy,
    /// Per ISO 18245 merchant category, for phones that name the category they will pay at.
    pub dvv_category_policies: BTreeMap<String, DvvPolicy>,
    /// A phone whose ticket's risk is at or above this gets no DVV.
    pub dvv_risk_threshold: u8,
    /// At most this many DVVs per phone per window.
    pub dvv_velocity_max: i64,
    pub dvv_velocity_window_secs: i64,
    /// Wrong DVVs that lock an account until its phone is validated again.
    pub dvv_wrong_tries_max: i64,
    /// How long an offline credential lasts.
    pub offline_credential_ttl_secs: i64,
    /// The largest offline limit a credential may carry, in minor units.
    pub offline_limit_max_minor: i64,
    /// A phone whose ticket's risk is at or above this gets no offline credential.
    pub offline_risk_threshold: u8,
    /// How long a terminal certificate lasts.
    pub terminal_certificate_ttl_secs: i64,
    /// A phone whose ticket's risk is at or above this is not provisioned and gets no apps.
    pub tsm_risk_threshold: u8,
    /// How long the payment certificate given to a crypto secure element lasts.
    pub tsm_payment_certificate_ttl_secs: i64,
    /// Deliveries of a relayed message tried before it is dead-lettered.
    pub tsm_delivery_attempts_max: i64,
    /// The wait after a failed delivery, doubled after each further one up to the maximum.
    pub tsm_retry_base_secs: i64,
    pub tsm_retry_max_secs: i64,
    /// How long a provider's endpoint has to answer a delivery.
    pub tsm_delivery_timeout_secs: i64,
    /// Where the ISO 8583 listener binds; none without it.
    pub iso8583_listen: Option<SocketAddr>,
    /// Allow the listener on a non-loopback address (put it behind mutual TLS).
    pub iso8583_allow_remote: bool,
    /// Server certificate chain and key for TLS on the listener.
    pub iso8583_tls_cert: Option<PathBuf>,
    pub iso8583_tls_key: Option<PathBuf>,
    /// CA whose certificates the payment switch must present (mutual TLS).
    pub iso8583_tls_client_ca: Option<PathBuf>,
    /// A connection that sends nothing for this long is closed.
    pub iso8583_idle_timeout_secs: u64,
}

impl Config {
    /// Flags over environment over file over defaults.
    pub fn resolve(flags: ConfigLayer, env: ConfigLayer, file: ConfigLayer) -> Result<Config, ConfigError> {
        let layer = flags.over(env.over(file));
        let data_dir = layer.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database_url =
            layer.database_url.unwrap_or_else(|| format!("sqlite://{}?mode=rwc", data_dir.join("vouch.db").display()));
        let listen = match layer.listen {
            Some(listen) => listen,
            None => DEFAULT_LISTEN.parse().map_err(|_| invalid("listen", DEFAULT_LISTEN, "a socket address"))?,
        };
        let config = Config {
            issuer: layer.issuer.unwrap_or_else(|| format!("http://{listen}")),
            listen,
            data_dir,
            database_url,
            database_connections_max: layer.database_connections_max.unwrap_or(16),
            log_format: layer.log_format.unwrap_or(LogFormat::Text),
            log_level: layer.log_level.unwrap_or_else(|| "info".into()),
            body_bytes_max: layer.body_bytes_max.unwrap_or(BODY_BYTES_MAX_DEFAULT),
            rate_limit_per_sec: layer.rate_limit_per_sec.unwrap_or(200),
            rate_limit_burst: layer.rate_limit_burst.unwrap_or(400),
            enrolment_nonce_ttl_secs: layer.enrolment_nonce_ttl_secs.unwrap_or(300),
            proof_iat_window_secs: layer.proof_iat_window_secs.unwrap_or(300),
            device_credential_ttl_secs: layer.device_credential_ttl_secs.unwrap_or(365 * 24 * 3600),
            key_refresh_secs: layer.key_refresh_secs.unwrap_or(10),
            attest_challenge_ttl_secs: layer.attest_challenge_ttl_secs.unwrap_or(60),
            attest_ticket_ttl_secs: layer.attest_ticket_ttl_secs.unwrap_or(900),
            attest_spot_check_share: layer.attest_spot_check_share.unwrap_or(0.25),
            attest_policy_file: layer.attest_policy_file,
            public_url: layer.public_url.map(|url| url.trim_end_matches('/').to_owned()),
            access_token_ttl_secs: layer.access_token_ttl_secs.unwrap_or(600),
            dpop_iat_window_secs: layer.dpop_iat_window_secs.unwrap_or(60),
            dpop_nonce_required: layer.dpop_nonce_required.unwrap_or(true),
            dpop_nonce_window_secs: layer.dpop_nonce_window_secs.unwrap_or(60),
            reader_grant_ttl_secs: layer.reader_grant_ttl_secs.unwrap_or(120),
            dvv_digits: layer.dvv_digits.unwrap_or(vouch_proto::dvv::DIGITS_DEFAULT),
            dvv_policy: DvvPolicy {
                max_uses: layer.dvv_max_uses.unwrap_or(1),
                ttl_secs: layer.dvv_ttl_secs.unwrap_or(300),
            },
            dvv_category_policies: layer.dvv_category_policies.unwrap_or_default(),
            dvv_risk_threshold: layer.dvv_risk_threshold.unwrap_or(50),
            dvv_velocity_max: layer.dvv_velocity_max.unwrap_or(20),
            dvv_velocity_window_secs: layer.dvv_velocity_window_secs.unwrap_or(3600),
            dvv_wrong_tries_max: layer.dvv_wrong_tries_max.unwrap_or(3),
            offline_credential_ttl_secs: layer.offline_credential_ttl_secs.unwrap_or(7 * 24 * 3600),
            offline_limit_max_minor: layer.offline_limit_max_minor.unwrap_or(100_000),
            offline_risk_threshold: layer.offline_risk_threshold.unwrap_or(50),
            terminal_certificate_ttl_secs: layer.terminal_certificate_ttl_secs.unwrap_or(30 * 24 * 3600),
            tsm_risk_threshold: layer.tsm_risk_threshold.unwrap_or(50),
            tsm_payment_certificate_ttl_secs: layer.tsm_payment_certificate_ttl_secs.unwrap_or(365 * 24 * 3600),
            tsm_delivery_attempts_max: layer.tsm_delivery_attempts_max.unwrap_or(10),
            tsm_retry_base_secs: layer.tsm_retry_base_secs.unwrap_or(2),
            tsm_retry_max_secs: layer.tsm_retry_max_secs.unwrap_or(600),
            tsm_delivery_timeout_secs: layer.tsm_delivery_timeout_secs.unwrap_or(10),
            iso8583_listen: layer.iso8583_listen,
            iso8583_allow_remote: layer.iso8583_allow_remote.unwrap_or(false),
            iso8583_tls_cert: layer.iso8583_tls_cert,
            iso8583_tls_key: layer.iso8583_tls_key,
            iso8583_tls_client_ca: layer.iso8583_tls_client_ca,
            iso8583_idle_timeout_secs: layer.iso8583_idle_timeout_secs.unwrap_or(30),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=256).contains(&self.database_connections_max) {
            return Err(invalid("database_connections_max", self.database_connections_max, "1 to 256"));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.body_bytes_max) {
            return Err(invalid("body_bytes_max", self.body_bytes_max, "1 KiB to 16 MiB"));
        }
        if self.rate_limit_per_sec == 0 || self.rate_limit_burst < self.rate_limit_per_sec {
            return Err(invalid(
                "rate_limit_burst",
                self.rate_limit_burst,
                "at least rate_limit_per_sec, which is > 0",
            ));
        }
        for (name, secs) in [
            ("enrolment_nonce_ttl_secs", self.enrolment_nonce_ttl_secs),
            ("proof_iat_window_secs", self.proof_iat_window_secs),
            ("device_credential_ttl_secs", self.device_credential_ttl_secs),
            ("attest_challenge_ttl_secs", self.attest_challenge_ttl_secs),
            ("attest_ticket_ttl_secs", self.attest_ticket_ttl_secs),
            ("access_token_ttl_secs", self.access_token_ttl_secs),
            ("dpop_iat_window_secs", self.dpop_iat_window_secs),
            ("dpop_nonce_window_secs", self.dpop_nonce_window_secs),
            ("reader_grant_ttl_secs", self.reader_grant_ttl_secs),
            ("dvv_ttl_secs", self.dvv_policy.ttl_secs),
            ("dvv_velocity_window_secs", self.dvv_velocity_window_secs),
            ("offline_credential_ttl_secs", self.offline_credential_ttl_secs),
            ("terminal_certificate_ttl_secs", self.terminal_certificate_ttl_secs),
            ("tsm_payment_certificate_ttl_secs", self.tsm_payment_certificate_ttl_secs),
            ("tsm_retry_base_secs", self.tsm_retry_base_secs),
            ("tsm_retry_max_secs", self.tsm_retry_max_secs),
            ("tsm_delivery_timeout_secs", self.tsm_delivery_timeout_secs),
        ] {
            if !(1..=10 * 365 * 24 * 3600).contains(&secs) {
                return Err(invalid(name, secs, "1 second to 10 years"));
            }
        }
        if !(0.0..=1.0).contains(&self.attest_spot_check_share) {
            return Err(invalid("attest_spot_check_share", self.attest_spot_check_share, "0 to 1"));
        }
        vouch_proto::dvv::Digits::new(self.dvv_digits)
            .map_err(|_| invalid("dvv_digits", self.dvv_digits, "4 to 12"))?;
        for (name, value) in [
            ("dvv_max_uses", self.dvv_policy.max_uses),
            ("dvv_velocity_max", self.dvv_velocity_max),
            ("dvv_wrong_tries_max", self.dvv_wrong_tries_max),
        ] {
            if !(1..=1_000_000).contains(&value) {
                return Err(invalid(name, value, "1 to 1000000"));
            }
        }
        for (category, policy) in &self.dvv_category_policies {
            let name = format!("dvv_category_policies.{category}");
            if category.len() != 4 || !category.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(&name, category, "a 4-digit ISO 18245 merchant category code"));
            }
            if !(1..=1_000_000).contains(&policy.max_uses) || !(1..=365 * 24 * 3600).contains(&policy.ttl_secs) {
                return Err(invalid(&name, format!("{policy:?}"), "max_uses 1 to 1000000 and ttl_secs 1 s to 1 year"));
            }
        }
        if !(1..=vouch_store::TRANSFER_AMOUNT_MAX_MINOR).contains(&self.offline_limit_max_minor) {
            return Err(invalid("offline_limit_max_minor", self.offline_limit_max_minor, "1 to 10^12"));
        }
        if !(1..=101).contains(&self.tsm_risk_threshold) {
            return Err(invalid("tsm_risk_threshold", self.tsm_risk_threshold, "1 to 101"));
        }
        if !(1..=100).contains(&self.tsm_delivery_attempts_max) {
            return Err(invalid("tsm_delivery_attempts_max", self.tsm_delivery_attempts_max, "1 to 100"));
        }
        if self.tsm_retry_max_secs < self.tsm_retry_base_secs {
            return Err(invalid("tsm_retry_max_secs", self.tsm_retry_max_secs, "at least tsm_retry_base_secs"));
        }
        if !(1..=101).contains(&self.offline_risk_threshold) {
            return Err(invalid("offline_risk_threshold", self.offline_risk_threshold, "1 to 101"));
        }
        if !(1..=101).contains(&self.dvv_risk_threshold) {
            return Err(invalid(
                "dvv_risk_threshold",
                self.dvv_risk_threshold,
                "1 to 101 (101 lets every risk through)",
            ));
        }
        if let Some(addr) = self.iso8583_listen
            && !addr.ip().is_loopback()
            && !self.iso8583_allow_remote
        {
            return Err(invalid("iso8583_listen", addr, "a loopback address, unless iso8583_allow_remote is set"));
        }
        if self.iso8583_tls_cert.is_some() != self.iso8583_tls_key.is_some()
            || (self.iso8583_tls_client_ca.is_some() && self.iso8583_tls_cert.is_none())
        {
            return Err(invalid(
                "iso8583_tls_cert",
                format!("{:?}", self.iso8583_tls_cert),
                "set together with iso8583_tls_key (and before iso8583_tls_client_ca)",
            ));
        }
        if self.iso8583_idle_timeout_secs == 0 {
            return Err(invalid("iso8583_idle_timeout_secs", 0, "at least 1"));
        }
        if self.key_refresh_secs == 0 {
            return Err(invalid("key_refresh_secs", 0, "at least 1"));
        }
        if let Some(url) = &self.public_url
            && (vouch_proto::dpop::normalize_uri(url).is_none() || url.contains(['?', '#']))
        {
            return Err(invalid("public_url", url, "an absolute http(s) URL without query or fragment"));
        }
        vouch_store::Backend::from_url(&self.database_url)
            .map_err(|_| invalid("database_url", &self.database_url, "a sqlite: or postgres:// URL"))?;
        Ok(())
    }

    /// Retired signing keys stay published this long: everything they signed has
    /// expired by then.
    pub fn key_overlap_secs(&self) -> i64 {
        self.device_credential_ttl_secs.max(self.attest_ticket_ttl_secs)
    }

    /// A configuration for tests and the in-process demo and bench servers.
    pub fn for_data_dir(data_dir: &Path) -> Config {
        let flags = ConfigLayer { data_dir: Some(data_dir.to_owned()), ..ConfigLayer::default() };
        // Invariant: the defaults plus a data directory always validate.
        Config::resolve(flags, ConfigLayer::default(), ConfigLayer::default()).expect("default config is valid")
    }
}

fn invalid(name: &str, value: impl std::fmt::Display, expected: &'static str) -> ConfigError {
    ConfigError::Invalid { name: name.to_owned(), value: value.to_string(), expected }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_env_over_file() {
        let file: ConfigLayer = toml::from_str(
            "listen = \"127.0.0.1:1\"\ndata_dir = \"/file\"\nrate_limit_per_sec = 5\nrate_limit_burst = 10\nlog_format = \"json\"",
        )
        .unwrap();
        let env = ConfigLayer::from_env(|name| match name {
            "VOUCH_LISTEN" => Some("127.0.0.1:2".into()),
            "VOUCH_DATA_DIR" => Some("/env".into()),
            _ => None,
        })
        .unwrap();
        let flags = ConfigLayer { listen: Some("127.0.0.1:3".parse().unwrap()), ..Default::default() };
        let config = Config::resolve(flags, env, file).unwrap();
        assert_eq!(config.listen.port(), 3);
        assert_eq!(config.data_dir, PathBuf::from("/env"));
        assert_eq!(config.rate_limit_per_sec, 5);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.database_url, "sqlite:///env/vouch.db?mode=rwc");
    }

    #[test]
    fn defaults() {
        let config = Config::resolve(ConfigLayer::default(), ConfigLayer::default(), ConfigLayer::default()).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.body_bytes_max, 64 * 1024);
    }

    #[test]
    fn invalid_values_are_named() {
        let env = ConfigLayer::from_env(|n| (n == "VOUCH_RATE_LIMIT_PER_SEC").then(|| "many".into()));
        assert!(matches!(env, Err(ConfigError::Invalid { ref name, .. }) if name == "VOUCH_RATE_LIMIT_PER_SEC"));
        let flags = ConfigLayer { database_url: Some("mysql://x".into()), ..Default::default() };
        let err = Config::resolve(flags, ConfigLayer::default(), ConfigLayer::default()).unwrap_err();
        assert!(err.to_string().contains("database_url"));
        let unknown: Result<ConfigLayer, _> = toml::from_str("listn = \"x\"");
        assert!(unknown.is_err());
    }
}
