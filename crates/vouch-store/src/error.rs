use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("unsupported database URL scheme {scheme:?}, expected sqlite: or postgres://")]
    UnsupportedUrl { scheme: String },
    #[error("{what} already exists")]
    Conflict { what: &'static str },
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("{what} refers to a {missing} that does not exist")]
    MissingReference { what: &'static str, missing: &'static str },
    #[error("a {from} device cannot become {to}")]
    StatusTransition { from: &'static str, to: &'static str },
    #[error("at most {max} {what} at once, got {got}")]
    TooMany { what: &'static str, max: usize, got: usize },
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("the transaction did not commit: {detail}")]
    CommitFailed { detail: String },
    #[error("migration {version} failed: {source}")]
    Migration { version: i64, source: sqlx::Error },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Maps constraint violations to the domain error they stand for; anything else
    /// stays a database error.
    pub(crate) fn on_insert(what: &'static str, missing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict { what },
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                StoreError::MissingReference { what, missing }
            }
            _ => StoreError::Database(e),
        }
    }
}
