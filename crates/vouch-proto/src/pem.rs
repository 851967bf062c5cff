//! Minimal PEM (RFC 7468) framing for PKCS#8 private keys and X.509 certificates, so that
//! device keys and certificate chains can be exchanged with OpenSSL and secure-element tooling.

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
    match next_block(label, text)? {
        Some((der, _)) => Ok(der),
        None => Err(ProtoError::malformed("PEM", format!("no -----BEGIN {label}----- line"))),
    }
}

/// Every block with this label, in order; text around and between them (explanatory
/// text, RFC 7468 section 5.2, or blocks with other labels) is skipped.
pub fn decode_all(label: &str, text: &str) -> Result<Vec<Zeroizing<Vec<u8>>>, ProtoError> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some((der, after)) = next_block(label, rest)? {
        blocks.push(der);
        rest = after;
    }
    Ok(blocks)
}

/// A decoded block and the text after it.
type Block<'t> = (Zeroizing<Vec<u8>>, &'t str);

/// The first block with this label, or `None` when there is none.
fn next_block<'t>(label: &str, text: &'t str) -> Result<Option<Block<'t>>, ProtoError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let Some(found) = text.find(&begin) else {
        return Ok(None);
    };
    let start = found + begin.len();
    let stop = text[start..].find(&end).ok_or_else(|| ProtoError::malformed("PEM", format!("no {end} line")))? + start;
    let body: Zeroizing<String> = Zeroizing::new(text[start..stop].chars().filter(|c| !c.is_whitespace()).collect());
    let der = STANDARD.decode(body.as_bytes()).map(Zeroizing::new).map_err(|e| ProtoError::malformed("PEM", e))?;
    Ok(Some((der, &text[stop + end.len()..])))
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

    #[test]
    fn every_block_in_order_and_other_labels_skipped() {
        let text = format!(
            "subject=first\n{}{}between\n{}",
            *encode("CERTIFICATE", b"one"),
            *encode("PRIVATE KEY", b"secret"),
            *encode("CERTIFICATE", b"two")
        );
        let blocks = decode_all("CERTIFICATE", &text).unwrap();
        assert_eq!(blocks.iter().map(|b| b.as_slice()).collect::<Vec<_>>(), [b"one".as_slice(), b"two"]);
        assert!(decode_all("CERTIFICATE", "no blocks here").unwrap().is_empty());
    }

    #[test]
    fn unterminated_block_is_refused() {
        let text = format!("{}-----BEGIN CERTIFICATE-----\nAAAA\n", *encode("CERTIFICATE", b"one"));
        assert!(matches!(decode_all("CERTIFICATE", &text), Err(ProtoError::Malformed { .. })));
    }
}
