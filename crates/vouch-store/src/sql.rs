//! Statements over many rows: their placeholders, and reading rows by a list of ids.

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use crate::StoreError;

/// Rows one statement over many rows reads or writes at most (10 parameters each at the
/// most, far below either back-end's limit).
pub(crate) const ROWS_PER_STATEMENT: usize = 250;

/// The rows `select` finds for `ids`, one statement per [`ROWS_PER_STATEMENT`] ids, in
/// the order of `ids` chunk by chunk; `select` makes the statement from the list of
/// placeholders for one chunk's ids (`IN ({list})`).
pub(crate) async fn rows_for_ids(
    postgres: bool,
    conn: &mut AnyConnection,
    ids: &[&str],
    select: impl Fn(&str) -> String,
) -> Result<Vec<AnyRow>, StoreError> {
    let mut rows = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = select(&Placeholders::new(postgres).list(chunk.len()));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(*id);
        }
        rows.extend(query.fetch_all(&mut *conn).await?);
    }
    Ok(rows)
}

/// `ids` sorted, without repeats: the order rows are locked in.
pub(crate) fn sorted_unique<'a>(ids: &[&'a str]) -> Vec<&'a str> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A statement's parameter placeholders, made in the order the parameters are bound.
/// On PostgreSQL they are numbered (`$1`, `$2`, …). On SQLite they are anonymous (`?`),
/// which SQLite numbers in order: it finds a named parameter by a linear search of the
/// statement's names, so binding n named parameters costs n², which a statement over
/// hundreds of rows feels.
#[derive(Debug)]
pub(crate) struct Placeholders {
    postgres: bool,
    made: usize,
}

impl Placeholders {
    pub(crate) fn new(postgres: bool) -> Self {
        Placeholders { postgres, made: 0 }
    }

    pub(crate) fn next(&mut self) -> String {
        self.made += 1;
        if self.postgres { format!("${}", self.made) } else { "?".to_owned() }
    }

    /// `count` placeholders, comma-separated, for `IN (…)`.
    pub(crate) fn list(&mut self, count: usize) -> String {
        (0..count).map(|_| self.next()).collect::<Vec<_>>().join(", ")
    }

    /// `rows` parenthesised tuples of `columns` placeholders, for `VALUES …`.
    pub(crate) fn tuples(&mut self, rows: usize, columns: usize) -> String {
        (0..rows).map(|_| format!("({})", self.list(columns))).collect::<Vec<_>>().join(", ")
    }

    /// A derived table of `rows` rows with the named `columns`, each value a
    /// placeholder, for `UPDATE … FROM (…) AS name`: both back-ends join on it (SQLite
    /// names no columns of a `VALUES` list).
    pub(crate) fn derived_table(&mut self, rows: usize, columns: &[&str]) -> String {
        (0..rows)
            .map(|_| {
                let values: Vec<String> = columns.iter().map(|column| format!("{} AS {column}", self.next())).collect();
                format!("SELECT {}", values.join(", "))
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_binding_order() {
        let mut postgres = Placeholders::new(true);
        assert_eq!(postgres.list(3), "$1, $2, $3");
        assert_eq!(postgres.tuples(2, 2), "($4, $5), ($6, $7)");
        assert_eq!(postgres.next(), "$8");
        assert_eq!(
            postgres.derived_table(2, &["id", "n"]),
            "SELECT $9 AS id, $10 AS n UNION ALL SELECT $11 AS id, $12 AS n"
        );
        let mut sqlite = Placeholders::new(false);
        assert_eq!(sqlite.list(2), "?, ?");
        assert_eq!(sqlite.tuples(2, 3), "(?, ?, ?), (?, ?, ?)");
    }
}
