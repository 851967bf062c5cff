//! Group commit for SQLite: write jobs from many requests run one after another inside
//! one transaction, each in its own savepoint, and are answered only after that
//! transaction commits. One fsync then covers the whole batch, so durability
//! (`synchronous = FULL`) does not cap throughput at the disk's fsync rate.
//!
//! A job of one statement needs no savepoint: SQLite undoes a failed statement by itself
//! and the transaction goes on. That saves two round trips to the connection's thread
//! on the hottest writes (a DPoP proof recorded per protected request).
//!
//! A job that fails rolls back to its savepoint and is answered at once; the others in
//! the batch are unaffected. If the commit itself fails, every job in the batch gets the
//! error, and none of them took effect.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::{mpsc, oneshot};

use crate::{StoreError, Tx};

/// Jobs per transaction, bounding how long one commit can keep others waiting.
pub const BATCH_JOBS_MAX: usize = 256;
/// Jobs waiting for the writer; beyond this, callers wait to enqueue.
pub const QUEUE_JOBS_MAX: usize = 4_096;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Called once the batch's fate is known: `Ok` after commit, the error otherwise.
type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;

type Work = Box<dyn for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Option<Completion>> + Send>;

pub(crate) struct Job {
    work: Work,
    /// The work runs exactly one statement, so it needs no savepoint of its own.
    single_statement: bool,
}

pub(crate) fn job<T, F>(work: F, single_statement: bool) -> (Job, oneshot::Receiver<Result<T, StoreError>>)
where
    T: Send + 'static,
    F: for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<T, StoreError>> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let work: Work = Box::new(move |tx| {
        Box::pin(async move {
            match work(tx).await {
                Ok(value) => Some(Box::new(move |committed: Result<(), String>| {
                    let _ = reply.send(committed.map(|()| value).map_err(|detail| StoreError::CommitFailed { detail }));
                }) as Completion),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    None
                }
            }
        })
    });
    (Job { work, single_statement }, answer)
}

/// Runs until every sender is dropped.
pub(crate) async fn run_writer(store: crate::Store, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(BATCH_JOBS_MAX);
    while jobs.recv_many(&mut batch, BATCH_JOBS_MAX).await > 0 {
        // Each batch runs as its own task so that a job that panics fails only its
        // batch (whose callers see their write fail and whose transaction rolls back),
        // not the writer every later write depends on.
        let running = tokio::spawn(run_batch(store.clone(), std::mem::take(&mut batch)));
        if let Err(e) = running.await {
            tracing::error!(error = %e, "a group commit batch failed");
        }
    }
}

async fn run_batch(store: crate::Store, batch: Vec<Job>) {
    let mut tx = match store.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "group commit could not begin a transaction");
            // A job that is never run answers through its dropped sender, which its
            // caller sees as a failed write.
            drop(batch);
            return;
        }
    };
    let mut completions = Vec::new();
    for job in batch {
        if job.single_statement {
            completions.extend((job.work)(&mut tx).await);
            continue;
        }
        if let Err(e) = savepoint(&mut tx, "SAVEPOINT job").await {
            tracing::error!(error = %e, "group commit could not open a savepoint");
            continue;
        }
        match (job.work)(&mut tx).await {
            Some(completion) => {
                if savepoint(&mut tx, "RELEASE SAVEPOINT job").await.is_ok() {
                    completions.push(completion);
                } else {
                    completion(Err("could not release the job's savepoint".into()));
                }
            }
            None => {
                let _ = savepoint(&mut tx, "ROLLBACK TO SAVEPOINT job").await;
                let _ = savepoint(&mut tx, "RELEASE SAVEPOINT job").await;
            }
        }
    }
    let committed = tx.commit().await.map_err(|e| e.to_string());
    for completion in completions {
        completion(committed.clone());
    }
}

async fn savepoint(tx: &mut Tx, statement: &'static str) -> Result<(), StoreError> {
    sqlx::query(statement).execute(tx.conn()).await?;
    Ok(())
}
