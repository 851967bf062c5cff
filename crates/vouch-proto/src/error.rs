use thiserror::Error;

/// Everything that can be wrong with a protocol object. Each variant says what was
/// found and, where it helps the caller fix it, what was expected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} is {len} bytes, over the limit of {max}")]
    TooLarge { what: &'static str, len: usize, max: usize },
    #[error("unsupported algorithm {found:?}, expected {expected}")]
    UnsupportedAlgorithm { found: String, expected: &'static str },
    #[error("unexpected token type {found:?}, expected {expected:?}")]
    WrongType { found: Option<String>, expected: &'static str },
    #[error("signature does not verify")]
    BadSignature,
    #[error("HPKE: {0}")]
    Hpke(String),
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("expired at {exp}, now {now}")]
    Expired { exp: i64, now: i64 },
    #[error("issued at {iat}, outside the accepted window around {now} (±{window_secs} s)")]
    StaleIssuedAt { iat: i64, now: i64, window_secs: i64 },
    #[error("claim {claim} is {found:?}, expected {expected:?}")]
    ClaimMismatch { claim: &'static str, found: String, expected: String },
    #[error("DPoP proof refused ({}): {detail}", check.as_str())]
    InvalidDpopProof { check: crate::dpop::DpopCheck, detail: String },
    #[error("signed by unknown key {kid:?}, expected one of the published or pinned keys")]
    UnknownSigningKey { kid: String },
    #[error("secure channel: {0}")]
    Channel(String),
    #[error("record refused ({}): {detail}", why.as_str())]
    RecordRefused { why: crate::session::RecordRefusal, detail: String },
    #[error("the secure channel is closed after a refused record")]
    ChannelClosed,
    #[error("COSE_Sign1 refused ({}): {detail}", why.as_str())]
    CoseRefused { why: crate::cose::CoseRefusal, detail: String },
    #[error("certificate refused ({}): {detail}", why.as_str())]
    CertificateRefused { why: crate::x509::CertificateRefusal, detail: String },
    #[error("offline payment refused ({}): {detail}", check.as_str())]
    OfflineRefused { check: crate::offline::OfflineCheck, detail: String },
    #[error("TSM refused ({}): {detail}", why.as_str())]
    TsmRefused { why: crate::tsm::TsmRefusal, detail: String },
    #[error("random number generator failed")]
    Rng,
    #[error("ISO 8583 {0}")]
    Iso8583(#[from] crate::iso8583::Iso8583Error),
}

impl ProtoError {
    pub(crate) fn malformed(what: &'static str, detail: impl ToString) -> Self {
        ProtoError::Malformed { what, detail: detail.to_string() }
    }
}
