use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The server refused the request with an RFC 9457 problem document.
    #[error("server refused ({status}, {problem_type}): {detail}")]
    Problem { status: u16, problem_type: String, detail: String },
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
}

impl DeviceError {
    /// The problem type's reason (`urn:vouch:problem:<reason>`), for refusals.
    pub fn problem_reason(&self) -> Option<&str> {
        match self {
            DeviceError::Problem { problem_type, .. } => problem_type.rsplit(':').next(),
            _ => None,
        }
    }
}
