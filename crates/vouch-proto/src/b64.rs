//! Base64url without padding (RFC 7515 section 2), the only encoding JOSE allows.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::ProtoError;

pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn decode(what: &'static str, text: &str) -> Result<Vec<u8>, ProtoError> {
    URL_SAFE_NO_PAD.decode(text).map_err(|e| ProtoError::malformed(what, e))
}
