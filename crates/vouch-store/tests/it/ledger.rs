use std::collections::HashSet;

use vouch_store::{
    Account, AccountKind, Consumer, StoreError, TRANSFER_AMOUNT_MAX_MINOR, TRANSFER_BATCH_MAX, Transfer,
    TransferOutcome, TransferRefusal, issuer_account_id,
};

use crate::conformance;
use crate::harness::TestStore;
use crate::registry::merchant;

fn transfer(id: &str, debit: &str, credit: &str, amount_minor: i64) -> Transfer {
    Transfer {
        id: id.into(),
        debit_account_id: debit.into(),
        credit_account_id: credit.into(),
        amount_minor,
        currency: "EUR".into(),
        reference: format!("ref-{id}"),
        created_at: 100,
    }
}

/// Merchant `m1` with settlement account `shop`; consumer `c1` with funding account
/// `fund` and reserve `reserve`; the EUR issuer account; and `usd`, a USD funding account.
async fn with_accounts(t: &TestStore) {
    let mut tx = t.store.begin().await.unwrap();
    tx.insert_merchant(&merchant("m1")).await.unwrap();
    tx.insert_consumer(&Consumer { id: "c1".into(), name: "Ada".into(), created_at: 1 }).await.unwrap();
    tx.insert_account(&Account::merchant_settlement("shop", "m1", "settlement", "EUR", 1)).await.unwrap();
    for (id, kind, currency) in [
        ("fund", AccountKind::ConsumerFunding, "EUR"),
        ("reserve", AccountKind::ConsumerOfflineReserve, "EUR"),
        ("usd", AccountKind::ConsumerFunding, "USD"),
    ] {
        tx.insert_account(&Account::consumer(id, kind, "c1", id, currency, 1)).await.unwrap();
    }
    tx.issuer_account("EUR", 1).await.unwrap();
    tx.commit().await.unwrap();
}

async fn post(t: &TestStore, transfer: Transfer) -> TransferOutcome {
    t.store.write(move |tx| Box::pin(async move { tx.post_transfer(&transfer).await })).await.unwrap()
}

async fn balance(t: &TestStore, id: &str) -> i64 {
    t.store.account(id).await.unwrap().balance_minor()
}

fn eur_issuer() -> String {
    issuer_account_id("EUR")
}

conformance! {
    async fn posting_moves_balances_and_lists_the_transfer(t: TestStore) {
        with_accounts(&t).await;
        assert_eq!(post(&t, transfer("t1", &eur_issuer(), "fund", 5_000)).await, TransferOutcome::Posted);
        assert_eq!(post(&t, transfer("t2", "fund", "reserve", 1_200)).await, TransferOutcome::Posted);
        let fund = t.store.account("fund").await.unwrap();
        assert_eq!((fund.credits_minor, fund.debits_minor, fund.balance_minor()), (5_000, 1_200, 3_800));
        assert_eq!(balance(&t, "reserve").await, 1_200);
        assert_eq!(balance(&t, &eur_issuer()).await, -5_000);
        let page = t.store.account_transfers("fund", None, 10).await.unwrap();
        assert_eq!(page.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
        assert_eq!(page[0], transfer("t1", &eur_issuer(), "fund", 5_000));
        let rest = t.store.account_transfers("fund", Some((100, "t1")), 10).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert!(t.store.ledger_imbalance().await.unwrap().is_empty());
    }

    async fn a_transfer_id_applies_once(t: TestStore) {
        with_accounts(&t).await;
        let first = transfer("t1", &eur_issuer(), "fund", 700);
        assert_eq!(post(&t, first.clone()).await, TransferOutcome::Posted);
        assert_eq!(post(&t, first.clone()).await, TransferOutcome::AlreadyPosted(first.clone()));
        // A different transfer under a used id is not posted either; the stored one comes back.
        assert_eq!(post(&t, transfer("t1", &eur_issuer(), "fund", 9)).await, TransferOutcome::AlreadyPosted(first));
        assert_eq!(balance(&t, "fund").await, 700);
    }

    async fn racing_posts_of_one_transfer_apply_once(t: TestStore) {
        with_accounts(&t).await;
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let store = t.store.clone();
                tokio::spawn(async move {
                    let transfer = transfer("t1", &eur_issuer(), "fund", 300);
                    store.write(move |tx| Box::pin(async move { tx.post_transfer(&transfer).await })).await.unwrap()
                })
            })
            .collect();
        let mut posted = 0;
        for racer in racers {
            posted += usize::from(racer.await.unwrap() == TransferOutcome::Posted);
        }
        assert_eq!(posted, 1);
        assert_eq!(balance(&t, "fund").await, 300);
        assert_eq!(t.store.account_transfers("fund", None, 10).await.unwrap().len(), 1);
    }

    async fn refusals_write_nothing(t: TestStore) {
        with_accounts(&t).await;
        assert_eq!(post(&t, transfer("t0", &eur_issuer(), "fund", 100)).await, TransferOutcome::Posted);
        let cases = [
            (transfer("t1", "fund", "reserve", 101), TransferRefusal::InsufficientFunds),
            (transfer("t2", "fund", "usd", 10), TransferRefusal::CurrencyMismatch),
            (transfer("t3", "fund", "ghost", 10), TransferRefusal::UnknownAccount),
            (transfer("t4", "ghost", "fund", 10), TransferRefusal::UnknownAccount),
            (transfer("t5", "fund", "fund", 10), TransferRefusal::SameAccount),
            (transfer("t6", "fund", "reserve", 0), TransferRefusal::InvalidAmount),
            (transfer("t7", "fund", "reserve", -5), TransferRefusal::InvalidAmount),
            (transfer("t10", &eur_issuer(), "fund", TRANSFER_AMOUNT_MAX_MINOR + 1), TransferRefusal::InvalidAmount),
            // The reserve holds nothing, whichever account comes first in id order.
            (transfer("t8", "reserve", "fund", 1), TransferRefusal::InsufficientFunds),
            (transfer("t9", "shop", "fund", 1), TransferRefusal::InsufficientFunds),
        ];
        for (transfer, refusal) in cases {
            let id = transfer.id.clone();
            assert_eq!(post(&t, transfer).await, TransferOutcome::Refused(refusal), "{id}");
            assert!(t.store.transfer(&id).await.unwrap().is_none(), "{id}");
        }
        assert_eq!(balance(&t, "fund").await, 100);
        for id in ["reserve", "shop", "usd"] {
            let account = t.store.account(id).await.unwrap();
            assert_eq!((account.debits_minor, account.credits_minor), (0, 0), "{id}");
        }
        // A refused id is free to post later.
        assert_eq!(post(&t, transfer("t1", "fund", "reserve", 100)).await, TransferOutcome::Posted);
    }

    async fn issuer_accounts_go_below_zero_and_open_once(t: TestStore) {
        with_accounts(&t).await;
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let store = t.store.clone();
                tokio::spawn(async move {
                    store.write(|tx| Box::pin(async move { tx.issuer_account("GBP", 5).await })).await.unwrap()
                })
            })
            .collect();
        let mut ids = HashSet::new();
        for racer in racers {
            let issuer = racer.await.unwrap();
            assert_eq!((issuer.kind, issuer.merchant_id, issuer.consumer_id), (AccountKind::Issuer, None, None));
            ids.insert(issuer.id);
        }
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), [issuer_account_id("GBP")]);
        assert_eq!(post(&t, transfer("t1", &eur_issuer(), "shop", 10_000)).await, TransferOutcome::Posted);
        assert_eq!(balance(&t, &eur_issuer()).await, -10_000);
    }

    async fn a_batch_has_one_outcome_per_transfer(t: TestStore) {
        with_accounts(&t).await;
        let batch = vec![
            transfer("b1", &eur_issuer(), "fund", 1_000),
            transfer("b2", "fund", "reserve", 600),
            transfer("b3", "fund", "reserve", 600),
            transfer("b1", &eur_issuer(), "fund", 1_000),
            transfer("b4", "reserve", "ghost", 1),
            transfer("b5", "reserve", "shop", 600),
        ];
        let outcomes = t
            .store
            .write(move |tx| Box::pin(async move { tx.post_transfers(&batch).await }))
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            [
                TransferOutcome::Posted,
                TransferOutcome::Posted,
                TransferOutcome::Refused(TransferRefusal::InsufficientFunds),
                TransferOutcome::AlreadyPosted(transfer("b1", &eur_issuer(), "fund", 1_000)),
                TransferOutcome::Refused(TransferRefusal::UnknownAccount),
                TransferOutcome::Posted,
            ]
        );
        assert_eq!((balance(&t, "fund").await, balance(&t, "reserve").await, balance(&t, "shop").await), (400, 0, 600));
        let too_many: Vec<_> = (0..=TRANSFER_BATCH_MAX).map(|i| transfer(&format!("x{i}"), "fund", "shop", 1)).collect();
        let mut tx = t.store.begin().await.unwrap();
        assert!(matches!(tx.post_transfers(&too_many).await, Err(StoreError::TooMany { .. })));
    }

    async fn random_transfers_keep_the_ledger_balanced(t: TestStore) {
        with_accounts(&t).await;
        let accounts = [eur_issuer(), "fund".into(), "reserve".into(), "shop".into()];
        // A fixed-seed xorshift, so a failure replays.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let mut posted = 0;
        for chunk in 0..6 {
            let batch: Vec<_> = (0..50)
                .map(|i| {
                    let debit = next(4) as usize;
                    let credit = (debit + 1 + next(3) as usize) % 4;
                    let mut transfer = transfer(&format!("r{chunk}-{i}"), &accounts[debit], &accounts[credit], 1 + next(500) as i64);
                    transfer.created_at = i64::from(chunk);
                    transfer
                })
                .collect();
            let outcomes = t.store.write(move |tx| Box::pin(async move { tx.post_transfers(&batch).await })).await.unwrap();
            posted += outcomes.iter().filter(|o| **o == TransferOutcome::Posted).count();
        }
        assert!(posted > 100, "only {posted} posted");
        assert!(t.store.ledger_imbalance().await.unwrap().is_empty());
        for id in &accounts[1..] {
            assert!(balance(&t, id).await >= 0, "{id}");
        }
    }

    async fn accounts_have_one_owner_as_their_kind_says(t: TestStore) {
        with_accounts(&t).await;
        let shop = t.store.account("shop").await.unwrap();
        assert_eq!((shop.kind, shop.merchant_id.as_deref(), shop.consumer_id), (AccountKind::MerchantSettlement, Some("m1"), None));
        let mut tx = t.store.begin().await.unwrap();
        let orphan = Account::consumer("a9", AccountKind::ConsumerFunding, "ghost", "x", "EUR", 1);
        assert!(matches!(tx.insert_account(&orphan).await, Err(StoreError::MissingReference { missing: "consumer", .. })));
    }
}

conformance! {
    async fn overlapping_batches_in_opposite_orders_post_each_transfer_once(t: TestStore) {
        with_accounts(&t).await;
        let ring: Vec<String> = (0..6).map(|i| format!("ring{i}")).collect();
        let mut tx = t.store.begin().await.unwrap();
        for id in &ring {
            tx.insert_account(&Account::consumer(id, AccountKind::ConsumerFunding, "c1", id, "EUR", 1)).await.unwrap();
            assert_eq!(tx.post_transfer(&transfer(&format!("seed-{id}"), &eur_issuer(), id, 1_000)).await.unwrap(), TransferOutcome::Posted);
        }
        tx.commit().await.unwrap();
        for round in 0..5 {
            let batch: Vec<_> = (0..ring.len())
                .map(|i| transfer(&format!("{round}-{i}"), &ring[i], &ring[(i + 1) % ring.len()], 10))
                .collect();
            let mut reversed = batch.clone();
            reversed.reverse();
            let racers: Vec<_> = [batch, reversed]
                .into_iter()
                .map(|batch| {
                    let store = t.store.clone();
                    tokio::spawn(async move { store.write(move |tx| Box::pin(async move { tx.post_transfers(&batch).await })).await })
                })
                .collect();
            let mut posted = 0;
            for racer in racers {
                let outcomes = racer.await.unwrap().unwrap();
                posted += outcomes.iter().filter(|o| **o == TransferOutcome::Posted).count();
            }
            assert_eq!(posted, ring.len(), "round {round}");
        }
        for id in &ring {
            assert_eq!(balance(&t, id).await, 1_000, "{id}");
        }
        assert!(t.store.ledger_imbalance().await.unwrap().is_empty());
    }

    async fn a_batch_posts_as_one_transfer_after_another(t: TestStore) {
        with_accounts(&t).await;
        // A second set of the same accounts, posted to one transfer at a time.
        let mut tx = t.store.begin().await.unwrap();
        tx.insert_account(&Account::merchant_settlement("shop_b", "m1", "settlement", "EUR", 1)).await.unwrap();
        for (id, kind, currency) in [
            ("fund_b", AccountKind::ConsumerFunding, "EUR"),
            ("reserve_b", AccountKind::ConsumerOfflineReserve, "EUR"),
            ("usd_b", AccountKind::ConsumerFunding, "USD"),
        ] {
            tx.insert_account(&Account::consumer(id, kind, "c1", id, currency, 1)).await.unwrap();
        }
        tx.commit().await.unwrap();
        let names = [eur_issuer(), "fund".into(), "reserve".into(), "shop".into(), "usd".into(), "ghost".into()];
        let mirrored = |name: &str| if name == eur_issuer() { name.to_owned() } else { format!("{name}_b") };
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let mut seen = HashSet::new();
        for round in 0..4 {
            // Ids repeat within and across rounds; a few amounts are invalid.
            let batch: Vec<Transfer> = (0..120)
                .map(|_| {
                    let amount = [0, -3, 1_000].get(next(40) as usize).copied().unwrap_or(1 + next(700) as i64);
                    let debit = &names[next(6) as usize];
                    let credit = &names[next(6) as usize];
                    transfer(&format!("q{}", next(150)), debit, credit, amount)
                })
                .collect();
            let one_by_one: Vec<Transfer> = batch
                .iter()
                .map(|t| Transfer {
                    id: format!("{}_b", t.id),
                    debit_account_id: mirrored(&t.debit_account_id),
                    credit_account_id: mirrored(&t.credit_account_id),
                    ..t.clone()
                })
                .collect();
            let posted = t.store.write(move |tx| Box::pin(async move { tx.post_transfers(&batch).await })).await.unwrap();
            let mut tx = t.store.begin().await.unwrap();
            let mut alone = Vec::new();
            for transfer in &one_by_one {
                alone.push(tx.post_transfer(transfer).await.unwrap());
            }
            tx.commit().await.unwrap();
            for (i, (batched, single)) in posted.iter().zip(&alone).enumerate() {
                let single = match single {
                    TransferOutcome::AlreadyPosted(stored) => {
                        let unmirror = |id: &str| id.strip_suffix("_b").unwrap_or(id).to_owned();
                        TransferOutcome::AlreadyPosted(Transfer {
                            id: unmirror(&stored.id),
                            debit_account_id: unmirror(&stored.debit_account_id),
                            credit_account_id: unmirror(&stored.credit_account_id),
                            ..stored.clone()
                        })
                    }
                    other => other.clone(),
                };
                assert_eq!(*batched, single, "round {round}, transfer {i}");
                seen.insert(match single {
                    TransferOutcome::Posted => "posted".to_owned(),
                    TransferOutcome::AlreadyPosted(_) => "already".to_owned(),
                    TransferOutcome::Refused(refusal) => format!("{refusal:?}"),
                });
            }
        }
        assert_eq!(seen.len(), 7, "every outcome occurs: {seen:?}");
        for name in &names[1..5] {
            let (batched, alone) = (t.store.account(name).await.unwrap(), t.store.account(&mirrored(name)).await.unwrap());
            assert_eq!((batched.debits_minor, batched.credits_minor), (alone.debits_minor, alone.credits_minor), "{name}");
        }
        assert!(t.store.ledger_imbalance().await.unwrap().is_empty());
    }

    async fn a_batch_meeting_its_id_posted_elsewhere_at_the_same_moment_writes_nothing(t: TestStore) {
        with_accounts(&t).await;
        assert_eq!(post(&t, transfer("seed", &eur_issuer(), "reserve", 500)).await, TransferOutcome::Posted);
        let mut first = t.store.begin().await.unwrap();
        let elsewhere = transfer("x", &eur_issuer(), "fund", 100);
        assert_eq!(first.post_transfer(&elsewhere).await.unwrap(), TransferOutcome::Posted);
        let store = t.store.clone();
        // The same id between other accounts, in a batch that shares no account with it.
        let racer = tokio::spawn(async move {
            let batch = vec![transfer("y", "reserve", "shop", 10), transfer("x", "reserve", "shop", 50)];
            store.write(move |tx| Box::pin(async move { tx.post_transfers(&batch).await })).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        first.commit().await.unwrap();
        match racer.await.unwrap() {
            // PostgreSQL: the batch read no "x", then met it when inserting.
            Err(StoreError::Conflict { what: "transfer" }) => assert!(t.store.transfer("y").await.unwrap().is_none()),
            // SQLite: the batch's transaction began after the first committed.
            Ok(outcomes) => assert_eq!(outcomes, [TransferOutcome::Posted, TransferOutcome::AlreadyPosted(elsewhere)]),
            Err(e) => panic!("{e}"),
        }
        assert_eq!(balance(&t, "fund").await, 100);
        assert!(t.store.ledger_imbalance().await.unwrap().is_empty());
    }
}
