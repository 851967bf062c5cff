//! Parameter lists for statements over many rows, numbered as both back-ends read them.

/// `$first, $first+1, …`: `count` parameters, for `IN (…)`.
pub(crate) fn parameters(first: usize, count: usize) -> String {
    (first..first + count).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// `($1, …, $columns), ($columns+1, …), …`: `rows` tuples of `columns` parameters
/// numbered from `first`, for `VALUES …`.
pub(crate) fn tuples(first: usize, rows: usize, columns: usize) -> String {
    (0..rows).map(|row| format!("({})", parameters(first + row * columns, columns))).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_from_first() {
        assert_eq!(parameters(1, 3), "$1, $2, $3");
        assert_eq!(parameters(4, 1), "$4");
        assert_eq!(tuples(1, 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(tuples(3, 1, 2), "($3, $4)");
    }
}
