//! Minimal PEM (RFC 7468) framing for PKCS#8 private keys, so that device keys can be
//! exchanged with OpenSSL and secure-element tooling.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use crate::ProtoError;

const LINE_CHARS: usize = 64;

pub fn encode(label: &str, der: &[u8]) -> Zeroizing<String> {
    let body = Zeroizing::new(STANDARD.encode(der));
    let mut out = Zeroizing::new(format!("-----BEGIN {label}-----\n"));
    for line in body.as_bytes().chunks(LINE_CHARS) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub fn decode(label: &str, text: &str) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start =
        text.find(&begin).ok_or_else(|| ProtoError::malformed("PEM", format!("no {begin} line")))? + begin.len();
    let stop = text[start..].find(&end).ok_or_else(|| ProtoError::malformed("PEM", format!("no {end} line")))? + start;
    let body: Zeroizing<String> = Zeroizing::new(text[start..stop].chars().filter(|c| !c.is_whitespace()).collect());
    STANDARD.decode(body.as_bytes()).map(Zeroizing::new).map_err(|e| ProtoError::malformed("PEM", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = encode("PRIVATE KEY", &der);
        assert!(pem.lines().all(|l| l.len() <= LINE_CHARS));
        assert_eq!(*decode("PRIVATE KEY", &pem).unwrap(), der);
    }

    #[test]
    fn wrong_label_is_refused() {
        let pem = encode("CERTIFICATE", b"x");
        assert!(matches!(decode("PRIVATE KEY", &pem), Err(ProtoError::Malformed { .. })));
    }
}
