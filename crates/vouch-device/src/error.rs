use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The server refused the request with an RFC 9457 problem document.
    #[error("server refused ({status}, {problem_type}): {detail}")]
    Problem {
        status: u16,
        problem_type: String,
        detail: String,
        /// The RFC 6749 error code (`invalid_grant`, `invalid_token`, …) that OAuth
        /// endpoints and DPoP-protected requests add.
        oauth_error: Option<String>,
    },
    #[error("unexpected response {status}: {body}")]
    UnexpectedResponse { status: u16, body: String },
    #[error("cannot reach the server: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Proto(#[from] vouch_proto::ProtoError),
    #[error("the server's answer does not check out: {0}")]
    Untrusted(String),
    #[error("{path}: {source}")]
    File { path: String, source: std::io::Error },
    /// The attestation ticket a session was opened with has expired, so no new token
    /// can be had with it: attest again and open a new session.
    #[error("the attestation ticket expired at {expired_at}; attest again")]
    TicketExpired { expired_at: i64 },
    /// A card reader refused a grant, or one side of a reader session refused what the
    /// other sent: the session is over.
    #[error("session refused ({refusal}): {detail}")]
    Session { refusal: crate::session::SessionRefusal, detail: String },
    /// The byte pipe between a reader and a POS app failed.
    #[error(transparent)]
    Pipe(#[from] crate::session::PipeError),
    /// Card data that is not the BER-TLV it should be.
    #[error("card data: {0}")]
    CardData(#[from] vouch_proto::tlv::TlvError),
    /// The ISO 8583 host could not be reached, or the TLS handshake with it failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    /// An open ISO 8583 connection failed, e.g. the host reset it.
    #[error("ISO 8583 connection: {0}")]
    Connection(std::io::Error),
    /// The host closed the connection before a whole answer arrived.
    #[error("the host closed the connection ({pending_bytes} bytes of an answer received)")]
    Closed { pending_bytes: usize },
    /// No whole answer arrived in the time allowed.
    #[error("no answer within {waited_ms} ms")]
    Timeout { waited_ms: u64 },
    /// The message sent has no answering MTI (it is itself an answer or a notification).
    #[error("{mti} is not a request: nothing answers it")]
    NotARequest { mti: vouch_proto::iso8583::Mti },
    /// The answer is not of the type that answers the request.
    #[error("expected a {expected} answer, got {found}")]
    UnexpectedMti { expected: vouch_proto::iso8583::Mti, found: vouch_proto::iso8583::Mti },
    /// The answer's STAN (DE 11) is not the request's.
    #[error("the answer's STAN {found} is not the request's {expected}")]
    UnexpectedStan { expected: String, found: String },
    /// A CA, certificate, key or server name for TLS that cannot be used.
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// An offline wallet or POS cannot take the step with what it holds: no
    /// credential, a counter this POS has seen before, a full queue. What it was shown
    /// and refused to trust is [`DeviceError::Proto`] instead, with its
    /// [`vouch_proto::offline::OfflineCheck`].
    #[error("offline payment refused ({refusal}): {detail}")]
    Offline { refusal: crate::offline::OfflineRefusal, detail: String },
    /// Nothing could be heard in a recording, and why.
    #[error("sound: {0}")]
    Sound(#[from] vouch_sonic::Error),
    /// A secure element cannot take the step with what it holds or was given. What it
    /// was shown and found not authentic or not installable is [`DeviceError::Proto`]
    /// instead, a [`vouch_proto::tsm::TsmRefusal`] where the TSM rules say why.
    #[error("secure element refused ({refusal}): {detail}")]
    Se { refusal: crate::tsm::SeRefusal, detail: String },
    /// A device maker could not make a certificate.
    #[error("cannot make the certificate: {0}")]
    Certificate(String),
    /// A receiver could not listen on its address.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
}

impl DeviceError {
    /// The problem type's reason (`urn:vouch:problem:<reason>`), for refusals.
    pub fn problem_reason(&self) -> Option<&str> {
        match self {
            DeviceError::Problem { problem_type, .. } => problem_type.rsplit(':').next(),
            _ => None,
        }
    }

    /// Why a reader or a channel refused, for [`DeviceError::Session`].
    pub fn session_refusal(&self) -> Option<crate::session::SessionRefusal> {
        match self {
            DeviceError::Session { refusal, .. } => Some(*refusal),
            _ => None,
        }
    }

    /// Which check of an offline payment failed, for what a wallet or a POS refused to
    /// trust.
    pub fn offline_check(&self) -> Option<vouch_proto::offline::OfflineCheck> {
        match self {
            DeviceError::Proto(vouch_proto::ProtoError::OfflineRefused { check, .. }) => Some(*check),
            _ => None,
        }
    }

    /// Why an offline wallet or POS could not take a step, for [`DeviceError::Offline`].
    pub fn offline_refusal(&self) -> Option<crate::offline::OfflineRefusal> {
        match self {
            DeviceError::Offline { refusal, .. } => Some(*refusal),
            _ => None,
        }
    }

    /// Why a secure element refused, for [`DeviceError::Se`].
    pub fn se_refusal(&self) -> Option<crate::tsm::SeRefusal> {
        match self {
            DeviceError::Se { refusal, .. } => Some(*refusal),
            _ => None,
        }
    }

    /// Which TSM rule what a secure element was shown broke.
    pub fn tsm_refusal(&self) -> Option<vouch_proto::tsm::TsmRefusal> {
        match self {
            DeviceError::Proto(vouch_proto::ProtoError::TsmRefused { why, .. }) => Some(*why),
            _ => None,
        }
    }

    /// The RFC 6749 error code of a refusal, e.g. `invalid_token`.
    pub fn oauth_error(&self) -> Option<&str> {
        match self {
            DeviceError::Problem { oauth_error, .. } => oauth_error.as_deref(),
            _ => None,
        }
    }
}
