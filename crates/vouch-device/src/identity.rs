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

    /// Writes the key as PKCS#8 PEM to a new file readable by its owner only; an
    /// existing file is never overwritten, so a saved key cannot be lost by mistake.
    pub fn save_pem(&self, path: &Path) -> Result<(), DeviceError> {
        use std::io::Write;
        let file_error = |source| DeviceError::File { path: path.display().to_string(), source };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(file_error)?;
        file.write_all(self.to_pem()?.as_bytes()).map_err(file_error)
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    pub fn jwk(&self) -> Jwk {
        self.key.verifying_key().to_jwk()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_key_loads_back_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.pem");
        let rng = SystemRandom::new();
        let identity = DeviceIdentity::generate(&rng).unwrap();
        identity.save_pem(&path).unwrap();
        assert_eq!(DeviceIdentity::load_pem(&path).unwrap().jwk(), identity.jwk());
        let other = DeviceIdentity::generate(&rng).unwrap();
        assert!(matches!(other.save_pem(&path), Err(DeviceError::File { .. })));
        assert_eq!(DeviceIdentity::load_pem(&path).unwrap().jwk(), identity.jwk());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
