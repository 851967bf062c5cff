//! The ledger: accounts and immutable double-entry transfers between them.
//!
//! An account keeps running `debits_minor` and `credits_minor`; its balance is
//! credits minus debits. Money enters the system from the issuer account of its
//! currency, the only kind allowed to go below zero, so the balances of a currency
//! always sum to zero ([`Store::ledger_imbalance`] checks it).
//!
//! Posting never runs a statement that can fail on business grounds: on PostgreSQL a
//! failed statement aborts the whole transaction, and a batch needs an outcome per
//! transfer. One transfer ([`Tx::post_transfer`]) is inserted only when both accounts
//! exist in the currency, a conflicting id is a no-op, and the debit is a conditional
//! update; whatever did not happen is undone by the statements that follow. A batch
//! ([`Tx::post_transfers`]) locks and reads its accounts first and decides every
//! outcome in memory, so it writes only what posts. The CHECK constraints on
//! `accounts` remain the last guard.

use std::collections::HashMap;

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::sql::{Placeholders, ROWS_PER_STATEMENT, rows_for_ids, sorted_unique};
use crate::{Store, StoreError, Tx};

/// The most transfers [`Tx::post_transfers`] takes at once.
pub const TRANSFER_BATCH_MAX: usize = 1_000;

/// The largest amount one transfer moves, in minor units: far above any payment,
/// and far enough below `i64::MAX` that running debits and credits cannot overflow
/// (an overflowing update would fail, and abort a PostgreSQL transaction).
pub const TRANSFER_AMOUNT_MAX_MINOR: i64 = 1_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountKind {
    /// A merchant's account, credited by settled payments.
    MerchantSettlement,
    /// A consumer's spendable money.
    ConsumerFunding,
    /// Money set aside for a consumer's offline payments.
    ConsumerOfflineReserve,
    /// Where money of a currency enters the system; may go below zero.
    Issuer,
}

impl AccountKind {
    pub const ALL: [AccountKind; 4] = [
        AccountKind::MerchantSettlement,
        AccountKind::ConsumerFunding,
        AccountKind::ConsumerOfflineReserve,
        AccountKind::Issuer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::MerchantSettlement => "merchant_settlement",
            AccountKind::ConsumerFunding => "consumer_funding",
            AccountKind::ConsumerOfflineReserve => "consumer_offline_reserve",
            AccountKind::Issuer => "issuer",
        }
    }

    /// `None` for anything but the four kinds.
    pub fn parse(text: &str) -> Option<Self> {
        AccountKind::ALL.into_iter().find(|kind| kind.as_str() == text)
    }

    /// Only issuer accounts may go below zero.
    pub fn overdraft_allowed(self) -> bool {
        self == AccountKind::Issuer
    }
}

/// A ledger account. Exactly one of `merchant_id` and `consumer_id` is set, as the
/// kind says; an issuer account has neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub kind: AccountKind,
    pub merchant_id: Option<String>,
    pub consumer_id: Option<String>,
    pub label: String,
    pub currency: String,
    /// Moved only by transfers; [`Tx::insert_account`] opens every account at zero.
    pub debits_minor: i64,
    pub credits_minor: i64,
    pub created_at: i64,
}

impl Account {
    /// A new, empty merchant settlement account.
    pub fn merchant_settlement(id: &str, merchant_id: &str, label: &str, currency: &str, created_at: i64) -> Self {
        Account {
            id: id.into(),
            kind: AccountKind::MerchantSettlement,
            merchant_id: Some(merchant_id.into()),
            consumer_id: None,
            label: label.into(),
            currency: currency.into(),
            debits_minor: 0,
            credits_minor: 0,
            created_at,
        }
    }

    /// A new, empty consumer account of `kind` (funding or offline reserve).
    pub fn consumer(
        id: &str,
        kind: AccountKind,
        consumer_id: &str,
        label: &str,
        currency: &str,
        created_at: i64,
    ) -> Self {
        Account {
            id: id.into(),
            kind,
            merchant_id: None,
            consumer_id: Some(consumer_id.into()),
            label: label.into(),
            currency: currency.into(),
            debits_minor: 0,
            credits_minor: 0,
            created_at,
        }
    }

    /// Credits minus debits, in minor units of the currency.
    pub fn balance_minor(&self) -> i64 {
        self.credits_minor.saturating_sub(self.debits_minor)
    }
}

/// The id of the one issuer account of a currency.
pub fn issuer_account_id(currency: &str) -> String {
    format!("acc_issuer_{currency}")
}

/// An immutable movement of `amount_minor` from the debit account to the credit
/// account. The id is the idempotency key: it applies at most once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub id: String,
    pub debit_account_id: String,
    pub credit_account_id: String,
    pub amount_minor: i64,
    pub currency: String,
    /// What the transfer is for, e.g. a payment id.
    pub reference: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferOutcome {
    Posted,
    /// A transfer with this id was posted before; this is the stored one, which the
    /// caller compares with its own to tell a retry from a reused id.
    AlreadyPosted(Transfer),
    /// Nothing was written.
    Refused(TransferRefusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferRefusal {
    InsufficientFunds,
    /// An account exists but holds another currency than the transfer.
    CurrencyMismatch,
    UnknownAccount,
    SameAccount,
    /// The amount is zero, negative, or above [`TRANSFER_AMOUNT_MAX_MINOR`].
    InvalidAmount,
}

const ACCOUNT_COLUMNS: &str =
    "id, kind, merchant_id, consumer_id, label, currency, debits_minor, credits_minor, created_at";
const TRANSFER_COLUMNS: &str = "id, debit_account_id, credit_account_id, amount_minor, currency, reference, created_at";

fn account_from_row(row: &AnyRow) -> Result<Account, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(Account {
        id: row.try_get("id")?,
        kind: AccountKind::parse(&kind).ok_or_else(|| StoreError::Corrupt { what: "account kind", detail: kind })?,
        merchant_id: row.try_get("merchant_id")?,
        consumer_id: row.try_get("consumer_id")?,
        label: row.try_get("label")?,
        currency: row.try_get("currency")?,
        debits_minor: row.try_get("debits_minor")?,
        credits_minor: row.try_get("credits_minor")?,
        created_at: row.try_get("created_at")?,
    })
}

fn transfer_from_row(row: &AnyRow) -> Result<Transfer, StoreError> {
    Ok(Transfer {
        id: row.try_get("id")?,
        debit_account_id: row.try_get("debit_account_id")?,
        credit_account_id: row.try_get("credit_account_id")?,
        amount_minor: row.try_get("amount_minor")?,
        currency: row.try_get("currency")?,
        reference: row.try_get("reference")?,
        created_at: row.try_get("created_at")?,
    })
}

/// An account's totals while a batch is decided, and what the batch adds to them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Balance {
    currency: String,
    overdraft_allowed: bool,
    debits_minor: i64,
    credits_minor: i64,
    debited_minor: i64,
    credited_minor: i64,
}

impl Balance {
    fn balance_minor(&self) -> i64 {
        (self.credits_minor + self.credited_minor) - (self.debits_minor + self.debited_minor)
    }
}

/// The outcome of each transfer of a batch, in order, as [`Tx::post_transfer`] would
/// decide them one after another, given the batch's accounts (locked) and the stored
/// transfers with the batch's ids; what the posted ones move is added to `balances`.
fn decide_transfers(
    transfers: &[Transfer],
    balances: &mut HashMap<String, Balance>,
    stored: &HashMap<String, Transfer>,
) -> Vec<TransferOutcome> {
    let mut posted: HashMap<&str, &Transfer> = HashMap::new();
    let mut outcomes = Vec::with_capacity(transfers.len());
    for transfer in transfers {
        let amount = transfer.amount_minor;
        let outcome = if !(1..=TRANSFER_AMOUNT_MAX_MINOR).contains(&amount) {
            TransferOutcome::Refused(TransferRefusal::InvalidAmount)
        } else if transfer.debit_account_id == transfer.credit_account_id {
            TransferOutcome::Refused(TransferRefusal::SameAccount)
        } else if let Some(prior) = stored.get(&transfer.id).or_else(|| posted.get(transfer.id.as_str()).copied()) {
            TransferOutcome::AlreadyPosted(prior.clone())
        } else {
            match (balances.get(&transfer.debit_account_id), balances.get(&transfer.credit_account_id)) {
                (Some(debit), Some(credit))
                    if debit.currency != transfer.currency || credit.currency != transfer.currency =>
                {
                    TransferOutcome::Refused(TransferRefusal::CurrencyMismatch)
                }
                (Some(debit), Some(_)) if !debit.overdraft_allowed && debit.balance_minor() < amount => {
                    TransferOutcome::Refused(TransferRefusal::InsufficientFunds)
                }
                (Some(_), Some(_)) => {
                    if let Some(debit) = balances.get_mut(&transfer.debit_account_id) {
                        debit.debited_minor += amount;
                    }
                    if let Some(credit) = balances.get_mut(&transfer.credit_account_id) {
                        credit.credited_minor += amount;
                    }
                    posted.insert(&transfer.id, transfer);
                    TransferOutcome::Posted
                }
                _ => TransferOutcome::Refused(TransferRefusal::UnknownAccount),
            }
        };
        outcomes.push(outcome);
    }
    outcomes
}

async fn fetch_account(conn: &mut sqlx::AnyConnection, id: &str) -> Result<Option<Account>, StoreError> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"));
    let row = sqlx::query(sql).bind(id).fetch_optional(conn).await?;
    row.as_ref().map(account_from_row).transpose()
}

impl Tx {
    /// Opens an account at zero, whatever its `debits_minor` and `credits_minor` say.
    pub async fn insert_account(&mut self, account: &Account) -> Result<(), StoreError> {
        let missing = if account.consumer_id.is_some() { "consumer" } else { "merchant" };
        sqlx::query(
            "INSERT INTO accounts (id, kind, merchant_id, consumer_id, label, currency, overdraft_allowed, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&account.id)
        .bind(account.kind.as_str())
        .bind(&account.merchant_id)
        .bind(&account.consumer_id)
        .bind(&account.label)
        .bind(&account.currency)
        .bind(i64::from(account.kind.overdraft_allowed()))
        .bind(account.created_at)
        .execute(self.conn())
        .await
        .map_err(StoreError::on_insert("account", missing))?;
        Ok(())
    }

    pub async fn account(&mut self, id: &str) -> Result<Account, StoreError> {
        fetch_account(self.conn(), id).await?.ok_or(StoreError::NotFound { what: "account" })
    }

    /// The oldest account of `kind` that `consumer_id` holds in `currency`, if any.
    pub async fn consumer_account(
        &mut self,
        consumer_id: &str,
        kind: AccountKind,
        currency: &str,
    ) -> Result<Option<Account>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE consumer_id = $1 AND kind = $2 AND currency = $3 \
             ORDER BY created_at, id LIMIT 1"
        ));
        let row =
            sqlx::query(sql).bind(consumer_id).bind(kind.as_str()).bind(currency).fetch_optional(self.conn()).await?;
        row.as_ref().map(account_from_row).transpose()
    }

    /// The issuer account of `currency`, opened on first use. Concurrent first uses
    /// open it once: the insert is a no-op when another got there first.
    pub async fn issuer_account(&mut self, currency: &str, now: i64) -> Result<Account, StoreError> {
        let id = issuer_account_id(currency);
        sqlx::query(
            "INSERT INTO accounts (id, kind, label, currency, overdraft_allowed, created_at) \
             VALUES ($1, 'issuer', 'issuer', $2, 1, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&id)
        .bind(currency)
        .bind(now)
        .execute(self.conn())
        .await?;
        self.account(&id).await
    }

    /// Posts one transfer; see the module header for why no statement here fails
    /// on business grounds.
    pub async fn post_transfer(&mut self, transfer: &Transfer) -> Result<TransferOutcome, StoreError> {
        if !(1..=TRANSFER_AMOUNT_MAX_MINOR).contains(&transfer.amount_minor) {
            return Ok(TransferOutcome::Refused(TransferRefusal::InvalidAmount));
        }
        if transfer.debit_account_id == transfer.credit_account_id {
            return Ok(TransferOutcome::Refused(TransferRefusal::SameAccount));
        }
        let inserted = sqlx::query(
            "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount_minor, currency, reference, \
             created_at) SELECT $1, $2, $3, $4, $5, $6, $7 \
             WHERE EXISTS (SELECT 1 FROM accounts WHERE id = $2 AND currency = $5) \
             AND EXISTS (SELECT 1 FROM accounts WHERE id = $3 AND currency = $5) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&transfer.id)
        .bind(&transfer.debit_account_id)
        .bind(&transfer.credit_account_id)
        .bind(transfer.amount_minor)
        .bind(&transfer.currency)
        .bind(&transfer.reference)
        .bind(transfer.created_at)
        .execute(self.conn())
        .await?;
        if inserted.rows_affected() == 0 {
            if let Some(stored) = self.transfer(&transfer.id).await? {
                return Ok(TransferOutcome::AlreadyPosted(stored));
            }
            return Ok(TransferOutcome::Refused(self.why_refused(transfer).await?));
        }
        // Both accounts are locked in id order, so two transfers between the same
        // pair in opposite directions cannot deadlock.
        let debit_first = transfer.debit_account_id < transfer.credit_account_id;
        if !debit_first && !self.credit(transfer, transfer.amount_minor).await? {
            return self.undo_insert(transfer, TransferRefusal::UnknownAccount).await;
        }
        let debited = sqlx::query(
            "UPDATE accounts SET debits_minor = debits_minor + $1 \
             WHERE id = $2 AND currency = $3 AND (overdraft_allowed = 1 OR credits_minor - debits_minor >= $1)",
        )
        .bind(transfer.amount_minor)
        .bind(&transfer.debit_account_id)
        .bind(&transfer.currency)
        .execute(self.conn())
        .await?;
        if debited.rows_affected() == 0 {
            if !debit_first {
                self.credit(transfer, -transfer.amount_minor).await?;
            }
            return self.undo_insert(transfer, TransferRefusal::InsufficientFunds).await;
        }
        if debit_first && !self.credit(transfer, transfer.amount_minor).await? {
            sqlx::query("UPDATE accounts SET debits_minor = debits_minor - $1 WHERE id = $2")
                .bind(transfer.amount_minor)
                .bind(&transfer.debit_account_id)
                .execute(self.conn())
                .await?;
            return self.undo_insert(transfer, TransferRefusal::UnknownAccount).await;
        }
        Ok(TransferOutcome::Posted)
    }

    /// Posts up to [`TRANSFER_BATCH_MAX`] transfers in this transaction, one outcome
    /// each, in order, as if posted one after another with [`Tx::post_transfer`], in
    /// four statements rather than three per transfer: the accounts are locked and read
    /// (in id order, so concurrent batches over the same accounts do not deadlock), the
    /// stored transfers with the batch's ids are read, the outcomes are decided in
    /// memory, and the posted transfers and each account's new totals are written.
    ///
    /// A transfer id that another transaction posts at the same moment, between other
    /// accounts, fails the batch with [`StoreError::Conflict`] and writes nothing; the
    /// same batch again finds that transfer posted.
    pub async fn post_transfers(&mut self, transfers: &[Transfer]) -> Result<Vec<TransferOutcome>, StoreError> {
        if transfers.len() > TRANSFER_BATCH_MAX {
            return Err(StoreError::TooMany { what: "transfers", max: TRANSFER_BATCH_MAX, got: transfers.len() });
        }
        let account_ids: Vec<&str> =
            transfers.iter().flat_map(|t| [t.debit_account_id.as_str(), t.credit_account_id.as_str()]).collect();
        let mut balances = self.lock_balances(&account_ids).await?;
        let transfer_ids: Vec<&str> = transfers.iter().map(|t| t.id.as_str()).collect();
        let stored = self.transfers_among(&transfer_ids).await?;
        let outcomes = decide_transfers(transfers, &mut balances, &stored);
        let posted: Vec<&Transfer> =
            transfers.iter().zip(&outcomes).filter(|(_, o)| **o == TransferOutcome::Posted).map(|(t, _)| t).collect();
        if self.insert_transfers(&posted).await? < posted.len() {
            return Err(StoreError::Conflict { what: "transfer" });
        }
        self.add_to_balances(&balances).await?;
        Ok(outcomes)
    }

    /// Locks the accounts among `ids` for this transaction (on PostgreSQL; SQLite has
    /// one writer at a time) in id order, and reads their totals.
    async fn lock_balances(&mut self, ids: &[&str]) -> Result<HashMap<String, Balance>, StoreError> {
        let lock = if self.postgres { " FOR UPDATE" } else { "" };
        let rows = rows_for_ids(self.postgres, self.conn(), &sorted_unique(ids), |list| {
            format!(
                "SELECT id, currency, overdraft_allowed, debits_minor, credits_minor FROM accounts \
                 WHERE id IN ({list}) ORDER BY id{lock}"
            )
        })
        .await?;
        let mut balances = HashMap::with_capacity(rows.len());
        for row in rows {
            let balance = Balance {
                currency: row.try_get("currency")?,
                overdraft_allowed: row.try_get::<i64, _>("overdraft_allowed")? == 1,
                debits_minor: row.try_get("debits_minor")?,
                credits_minor: row.try_get("credits_minor")?,
                debited_minor: 0,
                credited_minor: 0,
            };
            balances.insert(row.try_get("id")?, balance);
        }
        Ok(balances)
    }

    /// The stored transfers among `ids`, by id.
    async fn transfers_among(&mut self, ids: &[&str]) -> Result<HashMap<String, Transfer>, StoreError> {
        let rows = rows_for_ids(self.postgres, self.conn(), ids, |list| {
            format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id IN ({list})")
        })
        .await?;
        rows.iter().map(|row| transfer_from_row(row).map(|t| (t.id.clone(), t))).collect()
    }

    /// Inserts the transfers, skipping an id stored meanwhile; how many were inserted.
    async fn insert_transfers(&mut self, transfers: &[&Transfer]) -> Result<usize, StoreError> {
        let mut inserted = 0;
        for chunk in transfers.chunks(ROWS_PER_STATEMENT) {
            let sql = sqlx::AssertSqlSafe(format!(
                "INSERT INTO transfers ({TRANSFER_COLUMNS}) VALUES {} ON CONFLICT (id) DO NOTHING",
                Placeholders::new(self.postgres).tuples(chunk.len(), 7)
            ));
            let mut insert = sqlx::query(sql);
            for t in chunk {
                insert = insert
                    .bind(&t.id)
                    .bind(&t.debit_account_id)
                    .bind(&t.credit_account_id)
                    .bind(t.amount_minor)
                    .bind(&t.currency)
                    .bind(&t.reference)
                    .bind(t.created_at);
            }
            let rows = insert.execute(self.conn()).await?.rows_affected();
            inserted += usize::try_from(rows).unwrap_or(usize::MAX);
        }
        Ok(inserted)
    }

    /// Adds what a batch debited and credited to each account's totals. The CHECK
    /// constraints on `accounts` remain the last guard.
    async fn add_to_balances(&mut self, balances: &HashMap<String, Balance>) -> Result<(), StoreError> {
        let mut moved: Vec<(&String, &Balance)> =
            balances.iter().filter(|(_, b)| b.debited_minor != 0 || b.credited_minor != 0).collect();
        moved.sort_unstable_by_key(|(id, _)| *id);
        for chunk in moved.chunks(ROWS_PER_STATEMENT) {
            let rows = Placeholders::new(self.postgres).derived_table(chunk.len(), &["id", "debited", "credited"]);
            let sql = sqlx::AssertSqlSafe(format!(
                "UPDATE accounts SET debits_minor = debits_minor + moved.debited, \
                 credits_minor = credits_minor + moved.credited FROM ({rows}) AS moved WHERE accounts.id = moved.id"
            ));
            let mut update = sqlx::query(sql);
            for (id, balance) in chunk {
                update = update.bind(id.as_str()).bind(balance.debited_minor).bind(balance.credited_minor);
            }
            update.execute(self.conn()).await?;
        }
        Ok(())
    }

    pub async fn transfer(&mut self, id: &str) -> Result<Option<Transfer>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = $1"));
        let row = sqlx::query(sql).bind(id).fetch_optional(self.conn()).await?;
        row.as_ref().map(transfer_from_row).transpose()
    }

    /// Adds `amount_minor` (negative to undo) to the credit account; false when it
    /// does not exist in the currency.
    async fn credit(&mut self, transfer: &Transfer, amount_minor: i64) -> Result<bool, StoreError> {
        let credited =
            sqlx::query("UPDATE accounts SET credits_minor = credits_minor + $1 WHERE id = $2 AND currency = $3")
                .bind(amount_minor)
                .bind(&transfer.credit_account_id)
                .bind(&transfer.currency)
                .execute(self.conn())
                .await?;
        Ok(credited.rows_affected() == 1)
    }

    async fn undo_insert(
        &mut self,
        transfer: &Transfer,
        refusal: TransferRefusal,
    ) -> Result<TransferOutcome, StoreError> {
        sqlx::query("DELETE FROM transfers WHERE id = $1").bind(&transfer.id).execute(self.conn()).await?;
        Ok(TransferOutcome::Refused(refusal))
    }

    async fn why_refused(&mut self, transfer: &Transfer) -> Result<TransferRefusal, StoreError> {
        let rows = sqlx::query("SELECT currency FROM accounts WHERE id = $1 OR id = $2")
            .bind(&transfer.debit_account_id)
            .bind(&transfer.credit_account_id)
            .fetch_all(self.conn())
            .await?;
        if rows.len() < 2 {
            return Ok(TransferRefusal::UnknownAccount);
        }
        Ok(TransferRefusal::CurrencyMismatch)
    }
}

impl Store {
    pub async fn account(&self, id: &str) -> Result<Account, StoreError> {
        let mut conn = self.pool().acquire().await?;
        fetch_account(&mut conn, id).await?.ok_or(StoreError::NotFound { what: "account" })
    }

    /// One page of the transfers that debit or credit an account, oldest first,
    /// after the transfer `after` (its `created_at` and id) when given.
    pub async fn account_transfers(
        &self,
        account_id: &str,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<Transfer>, StoreError> {
        let (after_created_at, after_id) = after.unzip();
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {TRANSFER_COLUMNS} FROM transfers \
             WHERE (debit_account_id = $1 OR credit_account_id = $1) \
             AND ($2 IS NULL OR created_at > $2 OR (created_at = $2 AND id > $3)) \
             ORDER BY created_at, id LIMIT $4"
        ));
        let rows = sqlx::query(sql)
            .bind(account_id)
            .bind(after_created_at)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(transfer_from_row).collect()
    }

    pub async fn transfer(&self, id: &str) -> Result<Option<Transfer>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = $1"));
        let row = sqlx::query(sql).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(transfer_from_row).transpose()
    }

    /// The currencies whose balances do not sum to zero, with the sum; empty while
    /// the ledger holds its invariant.
    pub async fn ledger_imbalance(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT currency, CAST(SUM(credits_minor - debits_minor) AS BIGINT) AS imbalance FROM accounts \
             GROUP BY currency HAVING SUM(credits_minor - debits_minor) <> 0 ORDER BY currency",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|row| Ok((row.try_get("currency")?, row.try_get("imbalance")?))).collect()
    }
}
