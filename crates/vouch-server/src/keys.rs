//! Server signing keys: ES256 keys generated on first start, sealed at rest under the
//! master key (AES-256-GCM), published as a JWK Set with overlap after rotation.
//!
//! [`KeyStore`] is the seam for other back-ends (a PKCS#11 HSM signs without ever
//! handing out the private key); [`DatabaseKeyStore`] keeps sealed keys in the database
//! so every instance sharing it signs with the same active key.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use vouch_proto::crypto::{SystemRandom, random_bytes};
use vouch_proto::jws::{self, Header};
use vouch_proto::{Jwk, JwkSet, SigningKey, VerifyingKey};
use vouch_store::{SigningKeyRecord, Store, StoreError};
use zeroize::Zeroizing;

use crate::audit;

pub const MASTER_KEY_FILE: &str = "master.key";
const MASTER_KEY_BYTES: usize = 32;
const SEAL_AAD_PREFIX: &[u8] = b"vouch-signing-key:";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("master key: {0}")]
    MasterKey(String),
    #[error("signing key {kid} cannot be unsealed: wrong master key or corrupt record")]
    Unseal { kid: String },
    #[error("no active signing key")]
    NoActiveKey,
    #[error(transparent)]
    Proto(#[from] vouch_proto::ProtoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key that seals signing keys at rest. Zeroized on drop, never logged.
pub struct MasterKey(Zeroizing<[u8; MASTER_KEY_BYTES]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.len() != MASTER_KEY_BYTES * 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::MasterKey(format!("expected {} hex digits", MASTER_KEY_BYTES * 2)));
        }
        let mut key = Zeroizing::new([0u8; MASTER_KEY_BYTES]);
        for (i, byte) in key.iter_mut().enumerate() {
            // Invariant: the text is all ASCII hex digits of the right length.
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| KeyError::MasterKey(e.to_string()))?;
        }
        Ok(MasterKey(key))
    }

    pub fn generate(rng: &SystemRandom) -> Result<Self, KeyError> {
        Ok(MasterKey(Zeroizing::new(random_bytes(rng)?)))
    }

    /// A key for another purpose, bound to `label` (HMAC-SHA256 of the label under the
    /// master key), so every instance given the same master key derives the same one.
    pub fn derive(&self, label: &str) -> Zeroizing<[u8; 32]> {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &*self.0);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(aws_lc_rs::hmac::sign(&key, label.as_bytes()).as_ref());
        out
    }

    fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(vouch_proto::hex::encode(*self.0))
    }

    /// `VOUCH_MASTER_KEY` when set; otherwise `DATA_DIR/master.key`, created (0600)
    /// on first use.
    pub fn load_or_create(env_value: Option<&str>, data_dir: &Path, rng: &SystemRandom) -> Result<Self, KeyError> {
        if let Some(hex) = env_value {
            return Self::from_hex(hex);
        }
        let path = data_dir.join(MASTER_KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_hex(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate(rng)?;
                crate::files::write_secret_file(&path, key.to_hex().as_bytes())
                    .map_err(|e| KeyError::MasterKey(format!("cannot create {}: {e}", path.display())))?;
                tracing::info!(path = %path.display(), "created master key file");
                Ok(key)
            }
            Err(e) => Err(KeyError::MasterKey(format!("cannot read {}: {e}", path.display()))),
        }
    }

    fn sealing_key(&self) -> SealingKey {
        SealingKey::new(&self.0)
    }

    /// `nonce || ciphertext || tag`, bound to `kid` as associated data.
    fn seal(&self, kid: &str, plaintext: &[u8], rng: &SystemRandom) -> Result<Vec<u8>, KeyError> {
        self.sealing_key().seal(&seal_aad(kid), plaintext, rng)
    }

    fn unseal(&self, kid: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.sealing_key().open(&seal_aad(kid), sealed).ok_or_else(|| KeyError::Unseal { kid: kid.to_owned() })
    }
}

fn seal_aad(kid: &str) -> Vec<u8> {
    [SEAL_AAD_PREFIX, kid.as_bytes()].concat()
}

/// AES-256-GCM for secrets at rest: `nonce || ciphertext || tag` with a random nonce,
/// bound to associated data that names what the secret belongs to, so a sealed value
/// copied to another record does not open. The master key seals signing keys with one;
/// keys derived from it seal other secrets.
pub struct SealingKey(LessSafeKey);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    pub fn new(key: &[u8; 32]) -> Self {
        // Invariant: the key is exactly 32 bytes, AES-256's key length.
        SealingKey(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key")))
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8], rng: &SystemRandom) -> Result<Vec<u8>, KeyError> {
        let nonce_bytes: [u8; NONCE_LEN] = random_bytes(rng)?;
        let mut sealed = nonce_bytes.to_vec();
        let mut buffer = Zeroizing::new(plaintext.to_vec());
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(aad), &mut *buffer)
            .map_err(|_| KeyError::MasterKey("sealing failed".into()))?;
        sealed.extend_from_slice(&buffer);
        Ok(sealed)
    }

    /// The plaintext; `None` when `sealed` does not open under this key and `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (nonce, ciphertext) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = Zeroizing::new(ciphertext.to_vec());
        let plaintext_len = self.0.open_in_place(nonce, Aad::from(aad), &mut buffer).ok()?.len();
        buffer.truncate(plaintext_len);
        Some(buffer)
    }
}

/// What a cached signed object must say of itself: when it stops being good.
pub trait Expiring {
    fn exp(&self) -> i64;
}

/// Server-signed objects whose signature verified, remembered by the SHA-256 of their
/// text, so one presented again costs a hash rather than a signature check. On every
/// use the key that signed it must still be published and its expiry not passed, so a
/// retired key or an expired object is refused as if it had been checked afresh.
pub struct VerifiedCache<C> {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], Verified<C>>>,
    entries_max: usize,
}

struct Verified<C> {
    claims: Arc<C>,
    kid: String,
}

impl<C> Clone for Verified<C> {
    fn clone(&self) -> Self {
        Verified { claims: Arc::clone(&self.claims), kid: self.kid.clone() }
    }
}

impl<C> std::fmt::Debug for VerifiedCache<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedCache").field("entries_max", &self.entries_max).finish_non_exhaustive()
    }
}

impl<C: Expiring> VerifiedCache<C> {
    pub fn new(entries_max: usize) -> Self {
        VerifiedCache { entries: std::sync::Mutex::new(std::collections::HashMap::new()), entries_max }
    }

    /// The claims of the object whose text hashes to `hash`: from the cache, or from
    /// `verify`, which is given the lookup of the server's published keys by kid.
    pub fn verified(
        &self,
        keys: &dyn KeyStore,
        now: i64,
        hash: [u8; 32],
        verify: impl FnOnce(&dyn Fn(&str) -> Option<VerifyingKey>) -> Result<C, vouch_proto::ProtoError>,
    ) -> Result<Arc<C>, vouch_proto::ProtoError> {
        let cached = self.lock().get(&hash).cloned();
        if let Some(verified) = cached {
            if keys.verifying_key(&verified.kid).is_none() {
                return Err(vouch_proto::ProtoError::UnknownSigningKey { kid: verified.kid });
            }
            vouch_proto::jwt::check_expiry(verified.claims.exp(), now, 0)?;
            return Ok(verified.claims);
        }
        let kid = std::cell::OnceCell::new();
        let claims = verify(&|k: &str| {
            let _ = kid.set(k.to_owned());
            keys.verifying_key(k)
        })?;
        let kid = kid
            .into_inner()
            .ok_or_else(|| vouch_proto::ProtoError::InvalidKey("the signed object names no signing key".into()))?;
        let verified = Verified { claims: Arc::new(claims), kid };
        let mut entries = self.lock();
        if entries.len() >= self.entries_max {
            entries.retain(|_, v| v.claims.exp() >= now);
            if entries.len() >= self.entries_max {
                entries.clear();
            }
        }
        entries.insert(hash, verified.clone());
        Ok(verified.claims)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 32], Verified<C>>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub type KeyFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, KeyError>> + Send + 'a>>;

/// Where the server's signatures come from.
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// Signs a compact JWS with the active key, setting `kid` in the header.
    fn sign_jws(&self, header: Header, payload: &[u8]) -> Result<String, KeyError>;
    /// Signs `payload` as a tagged COSE_Sign1 (ES256) with the active key and the COSE
    /// external data `aad`; the kid header holds the bytes of the key's id, as published
    /// in the JWK Set.
    fn sign_cose(&self, payload: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// A published key by id, for verifying what the server signed.
    fn verifying_key(&self, kid: &str) -> Option<VerifyingKey>;
    /// The keys to publish at `/.well-known/jwks.json`.
    fn jwk_set(&self) -> JwkSet;
    /// Makes a new active key; the current one stays published for `overlap_secs`.
    fn rotate<'a>(&'a self, now: i64, overlap_secs: i64, actor: &'a str) -> KeyFuture<'a, String>;
    /// Picks up keys rotated elsewhere (another instance, the CLI).
    fn refresh(&self, now: i64) -> KeyFuture<'_, ()>;
}

struct LoadedKey {
    kid: String,
    signing: Option<SigningKey>,
    verifying: VerifyingKey,
}

#[derive(Default)]
struct LoadedKeys {
    /// Newest first; the first with a signing half is the active key.
    keys: Vec<LoadedKey>,
}

/// Signing keys sealed in the database, cached in memory and refreshed periodically.
pub struct DatabaseKeyStore {
    store: Store,
    master: MasterKey,
    rng: Arc<SystemRandom>,
    loaded: RwLock<LoadedKeys>,
}

impl std::fmt::Debug for DatabaseKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseKeyStore").finish_non_exhaustive()
    }
}

impl DatabaseKeyStore {
    /// Loads the published keys, generating the first one on an empty database.
    pub async fn open(store: Store, master: MasterKey, rng: Arc<SystemRandom>, now: i64) -> Result<Self, KeyError> {
        let keys = DatabaseKeyStore { store, master, rng, loaded: RwLock::new(LoadedKeys::default()) };
        keys.reload(now).await?;
        if keys.active_kid().is_none() {
            match rotate(&keys.store, &keys.master, &keys.rng, now, 0, "system").await {
                Ok(kid) => tracing::info!(%kid, "generated the first signing key"),
                // Another instance bootstrapped at the same moment; use its key.
                Err(KeyError::Store(StoreError::Conflict { .. })) => {}
                Err(e) => return Err(e),
            }
            keys.reload(now).await?;
        }
        Ok(keys)
    }

    async fn reload(&self, now: i64) -> Result<(), KeyError> {
        let records = self.store.published_signing_keys(now).await?;
        let mut keys = Vec::with_capacity(records.len());
        for record in records {
            let public: Jwk =
                serde_json::from_str(&record.public_jwk).map_err(|_| KeyError::Unseal { kid: record.kid.clone() })?;
            let signing = if record.retired_at.is_none() {
                let pkcs8 = self.master.unseal(&record.kid, &record.sealed_pkcs8)?;
                Some(SigningKey::from_pkcs8_der(&pkcs8)?)
            } else {
                None
            };
            keys.push(LoadedKey { verifying: public.verifying_key()?, kid: record.kid, signing });
        }
        *self.loaded.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = LoadedKeys { keys };
        Ok(())
    }

    pub fn active_kid(&self) -> Option<String> {
        let loaded = self.loaded.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        loaded.keys.iter().find(|k| k.signing.is_some()).map(|k| k.kid.clone())
    }
}

impl KeyStore for DatabaseKeyStore {
    fn sign_jws(&self, header: Header, payload: &[u8]) -> Result<String, KeyError> {
        let loaded = self.loaded.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (kid, key) =
            loaded.keys.iter().find_map(|k| Some((&k.kid, k.signing.as_ref()?))).ok_or(KeyError::NoActiveKey)?;
        Ok(jws::sign(&header.with_kid(kid.clone()), payload, key, &*self.rng)?)
    }

    fn sign_cose(&self, payload: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let loaded = self.loaded.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (kid, key) =
            loaded.keys.iter().find_map(|k| Some((&k.kid, k.signing.as_ref()?))).ok_or(KeyError::NoActiveKey)?;
        Ok(vouch_proto::cose::sign1_with_aad(payload, aad, Some(kid.as_bytes()), key, &*self.rng)?)
    }

    fn verifying_key(&self, kid: &str) -> Option<VerifyingKey> {
        let loaded = self.loaded.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        loaded.keys.iter().find(|k| k.kid == kid).map(|k| k.verifying)
    }

    fn jwk_set(&self) -> JwkSet {
        let loaded = self.loaded.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        JwkSet { keys: loaded.keys.iter().map(|k| k.verifying.to_jwk().with_kid(k.kid.clone())).collect() }
    }

    fn rotate<'a>(&'a self, now: i64, overlap_secs: i64, actor: &'a str) -> KeyFuture<'a, String> {
        Box::pin(async move {
            let kid = rotate(&self.store, &self.master, &self.rng, now, overlap_secs, actor).await?;
            self.reload(now).await?;
            Ok(kid)
        })
    }

    fn refresh(&self, now: i64) -> KeyFuture<'_, ()> {
        Box::pin(self.reload(now))
    }
}

/// Generates a new active key and retires the current one, which stays published for
/// `overlap_secs`. Audited in the same transaction. Returns the new `kid`.
async fn rotate(
    store: &Store,
    master: &MasterKey,
    rng: &SystemRandom,
    now: i64,
    overlap_secs: i64,
    actor: &str,
) -> Result<String, KeyError> {
    let key = SigningKey::generate(rng)?;
    let public = key.verifying_key();
    let kid = format!("{}-{}", now, &public.thumbprint()[..8]);
    let record = SigningKeyRecord {
        sealed_pkcs8: master.seal(&kid, &key.to_pkcs8_der()?, rng)?,
        public_jwk: serde_json::to_string(&public.to_jwk()).map_err(|e| KeyError::MasterKey(e.to_string()))?,
        kid: kid.clone(),
        created_at: now,
        retired_at: None,
        publish_until: None,
    };
    let mut tx = store.begin().await?;
    tx.rotate_signing_key(&record, now.saturating_add(overlap_secs)).await?;
    tx.append_audit(&audit::entry(
        now,
        actor,
        "key.rotated",
        &kid,
        serde_json::json!({ "overlap_secs": overlap_secs }),
    ))
    .await?;
    tx.commit().await?;
    Ok(kid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vouch_proto::crypto::SystemRandom;

    #[test]
    fn seal_round_trip_is_bound_to_kid() {
        let rng = SystemRandom::new();
        let master = MasterKey::generate(&rng).unwrap();
        let sealed = master.seal("k1", b"secret", &rng).unwrap();
        assert_eq!(&*master.unseal("k1", &sealed).unwrap(), b"secret");
        assert!(matches!(master.unseal("k2", &sealed), Err(KeyError::Unseal { .. })));
        let other = MasterKey::generate(&rng).unwrap();
        assert!(matches!(other.unseal("k1", &sealed), Err(KeyError::Unseal { .. })));
        assert!(matches!(master.unseal("k1", &sealed[..5]), Err(KeyError::Unseal { .. })));
    }

    #[test]
    fn master_key_hex() {
        let rng = SystemRandom::new();
        let key = MasterKey::generate(&rng).unwrap();
        let back = MasterKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(*back.0, *key.0);
        assert!(MasterKey::from_hex("abc").is_err());
        assert!(MasterKey::from_hex(&"zz".repeat(32)).is_err());
        assert_eq!(format!("{key:?}"), "MasterKey(..)");
    }

    #[test]
    fn derived_keys_depend_on_label_and_master() {
        let rng = SystemRandom::new();
        let key = MasterKey::generate(&rng).unwrap();
        let same = MasterKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(*key.derive("a"), *same.derive("a"));
        assert_ne!(*key.derive("a"), *key.derive("b"));
        assert_ne!(*key.derive("a"), *MasterKey::generate(&rng).unwrap().derive("a"));
    }
}
