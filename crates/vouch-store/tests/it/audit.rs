use sqlx::Executor;
use vouch_store::{AuditBreak, AuditEntry};

use crate::conformance;
use crate::harness::TestStore;

fn entry(n: i64) -> AuditEntry {
    AuditEntry {
        at: n,
        actor: "system".into(),
        action: "test.event".into(),
        subject: format!("s{n}"),
        detail: format!("{{\"n\":{n}}}"),
    }
}

async fn append(t: &TestStore, rows: i64) {
    append_range(t, 1..=rows).await;
}

async fn append_range(t: &TestStore, seqs: std::ops::RangeInclusive<i64>) {
    for n in seqs {
        let mut tx = t.store.begin().await.unwrap();
        tx.append_audit(&entry(n)).await.unwrap();
        tx.commit().await.unwrap();
    }
    t.store.chain_audit().await.unwrap();
}

/// Tampers with the database behind the store's back, as an attacker with SQL access would.
async fn tamper(t: &TestStore, sql: &str) {
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&t.url).await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(sql.to_owned())).await.unwrap();
}

conformance! {
    async fn entries_of_a_failed_write_leave_no_gap_in_the_chain(t: TestStore) {
        // Concurrent writes share a transaction on SQLite; the failing one appends an
        // entry and then fails, so its savepoint (and its place in the chain) is undone.
        let writes: Vec<_> = (1..=12)
            .map(|n| {
                let store = t.store.clone();
                tokio::spawn(async move {
                    store
                        .write(move |tx| {
                            Box::pin(async move {
                                tx.append_audit(&entry(n)).await?;
                                if n % 3 == 0 {
                                    return Err(vouch_store::StoreError::NotFound { what: "test" });
                                }
                                tx.append_audit(&entry(n + 100)).await
                            })
                        })
                        .await
                })
            })
            .collect();
        let mut succeeded = 0;
        for write in writes {
            succeeded += usize::from(write.await.unwrap().is_ok());
        }
        assert_eq!(succeeded, 8);
        let report = t.store.verify_audit().await.unwrap();
        assert_eq!((report.rows_checked, report.head_seq, report.first_break), (16, 16, None));
        append_range(&t, 999..=999).await;
        let last = t.store.audit_records(16, 10).await.unwrap();
        assert_eq!((last.len(), last[0].seq), (1, 17), "the stored head is where the chain ends");
    }

    async fn entries_join_the_chain_in_batches_and_once(t: TestStore) {
        let total = vouch_store::CHAIN_BATCH_ROWS + 5;
        let mut tx = t.store.begin().await.unwrap();
        for n in 1..=total {
            tx.append_audit(&entry(n)).await.unwrap();
        }
        tx.commit().await.unwrap();
        // Chainers race, as on two instances: each entry is linked exactly once.
        let chainers: Vec<_> = (0..3)
            .map(|_| {
                let store = t.store.clone();
                tokio::spawn(async move { store.chain_audit().await.unwrap() })
            })
            .collect();
        let mut chained = 0;
        for chainer in chainers {
            chained += chainer.await.unwrap();
        }
        assert_eq!(chained as i64, total);
        let report = t.store.verify_audit().await.unwrap();
        assert_eq!((report.rows_checked, report.head_seq, report.first_break), (total, total, None));
        let records = t.store.audit_records(0, 3).await.unwrap();
        assert_eq!(records.iter().map(|r| r.entry.at).collect::<Vec<_>>(), [1, 2, 3], "in the order recorded");
    }

    async fn intact_chain_verifies(t: TestStore) {
        append(&t, 5).await;
        let report = t.store.verify_audit().await.unwrap();
        assert_eq!((report.rows_checked, report.head_seq, report.first_break), (5, 5, None));
    }

    async fn empty_chain_verifies(t: TestStore) {
        let report = t.store.verify_audit().await.unwrap();
        assert_eq!((report.rows_checked, report.first_break), (0, None));
    }

    async fn edited_row_is_named(t: TestStore) {
        append(&t, 5).await;
        tamper(&t, "UPDATE audit_log SET detail = '{\"n\":99}' WHERE seq = 3").await;
        assert_eq!(t.store.verify_audit().await.unwrap().first_break, Some(AuditBreak::Edited { seq: 3 }));
    }

    async fn deleted_row_is_named(t: TestStore) {
        append(&t, 5).await;
        tamper(&t, "DELETE FROM audit_log WHERE seq = 2").await;
        assert_eq!(t.store.verify_audit().await.unwrap().first_break, Some(AuditBreak::Missing { from: 2, to: 2 }));
    }

    async fn truncated_tail_is_found(t: TestStore) {
        append(&t, 5).await;
        tamper(&t, "DELETE FROM audit_log WHERE seq >= 4").await;
        assert_eq!(t.store.verify_audit().await.unwrap().first_break, Some(AuditBreak::Truncated { head_seq: 5, last_seq: 3 }));
    }

    async fn rehashed_row_breaks_the_link(t: TestStore) {
        append(&t, 5).await;
        // Rewrite row 2 with a correctly recomputed hash: row 3 no longer links to it.
        let forged = entry(42);
        let rows = t.store.audit_records(1, 1).await.unwrap();
        let hash = vouch_store::chain_hash(2, &forged, &rows[0].prev_hash);
        let hex = vouch_proto::hex::encode(hash);
        let literal = if t.url.starts_with("sqlite") { format!("X'{hex}'") } else { format!("'\\x{hex}'::bytea") };
        tamper(&t, &format!("UPDATE audit_log SET at = 42, subject = 's42', detail = '{{\"n\":42}}', hash = {literal} WHERE seq = 2")).await;
        assert_eq!(t.store.verify_audit().await.unwrap().first_break, Some(AuditBreak::Unlinked { seq: 3 }));
    }

    async fn rewritten_last_row_disagrees_with_head(t: TestStore) {
        append(&t, 3).await;
        let rows = t.store.audit_records(2, 1).await.unwrap();
        let forged = entry(42);
        let hash = vouch_store::chain_hash(3, &forged, &rows[0].prev_hash);
        let hex = vouch_proto::hex::encode(hash);
        let literal = if t.url.starts_with("sqlite") { format!("X'{hex}'") } else { format!("'\\x{hex}'::bytea") };
        tamper(&t, &format!("UPDATE audit_log SET at = 42, subject = 's42', detail = '{{\"n\":42}}', hash = {literal} WHERE seq = 3")).await;
        assert_eq!(t.store.verify_audit().await.unwrap().first_break, Some(AuditBreak::HeadMismatch { seq: 3 }));
    }

    async fn rolled_back_append_leaves_no_gap(t: TestStore) {
        append(&t, 2).await;
        let mut tx = t.store.begin().await.unwrap();
        tx.append_audit(&entry(3)).await.unwrap();
        drop(tx);
        append_range(&t, 3..=3).await;
        let report = t.store.verify_audit().await.unwrap();
        assert_eq!((report.rows_checked, report.first_break), (3, None));
    }
}
