//! A device's identity key: a P-256 key that, on real hardware, never leaves the secure
//! element or keystore. Simulators keep it in a PKCS#8 PEM file.

use std::path::Path;

use vouch_proto::crypto::SystemRandom;
use vouch_proto::{Jwk, SigningKey};

use crate::DeviceError;

#[derive(Debug)]
pub struct DeviceIdentity {
    key: SigningKey,
}

impl DeviceIdentity {
    pub fn generate(rng: &SystemRandom) -> Result<Self, DeviceError> {
        Ok(DeviceIdentity { key: SigningKey::generate(rng)? })
    }

    pub fn from_key(key: SigningKey) -> Self {
        DeviceIdentity { key }
    }

    pub fn load_pem(path: &Path) -> Result<Self, DeviceError> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|source| DeviceError::File { path: path.display().to_string(), source })?,
        );
        Ok(DeviceIdentity { key: SigningKey::from_pkcs8_pem(&text)? })
    }

    pub fn to_pem(&self) -> Result<zeroize::Zeroizing<String>, DeviceError> {
        Ok(self.key.to_pkcs8_pem()?)
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    pub fn jwk(&self) -> Jwk {
        self.key.verifying_key().to_jwk()
    }
}
