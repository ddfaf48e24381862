//! The canonical text of a spec's SQL, for telling one job's spec from another's: sqlparser's
//! rendering of what it parsed (PostgreSQL dialect), so whitespace, line breaks, comments and the
//! case of keywords do not make another spec. SQL the parser cannot read is taken as written.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

/// `statement`, canonical.
pub fn statement(sql: &str) -> String {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) if !statements.is_empty() => statements
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(";\n"),
        _ => sql.trim().to_string(),
    }
}

/// One expression (`postgres.where`), canonical.
pub fn expression(sql: &str) -> String {
    let dialect = PostgreSqlDialect {};
    let parsed = Parser::new(&dialect).try_with_sql(sql).and_then(|mut p| {
        let e = p.parse_expr()?;
        match p.peek_token().token {
            Token::EOF => Ok(Some(e)),
            _ => Ok(None),
        }
    });
    match parsed {
        Ok(Some(e)) => e.to_string(),
        _ => sql.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_comments_and_keyword_case_do_not_count() {
        let a = statement("UPDATE t SET v = v + 1 WHERE id = ANY($1)");
        let b = statement(
            "-- bump\nupdate t\n   set v = v + 1   /* every row */\n where id = any($1)\n",
        );
        assert_eq!(a, b);
        assert_eq!(
            expression("created_at < '2024-01-01'"),
            expression("created_at<'2024-01-01'  -- old ones")
        );
    }

    #[test]
    fn what_the_sql_says_still_counts() {
        let a = statement("UPDATE t SET v = v + 1 WHERE id = ANY($1)");
        assert_ne!(a, statement("UPDATE t SET v = v + 2 WHERE id = ANY($1)"));
        assert_ne!(a, statement("UPDATE t SET v = 'a  b' WHERE id = ANY($1)"));
        assert_ne!(
            statement("UPDATE t SET v = 'a  b' WHERE id = ANY($1)"),
            statement("UPDATE t SET v = 'a b' WHERE id = ANY($1)")
        );
        assert_ne!(expression("a = 1"), expression("a = 2"));
    }

    #[test]
    fn sql_the_parser_cannot_read_is_taken_as_written() {
        assert_eq!(statement("  FROBNICATE t  "), "FROBNICATE t");
        assert_ne!(statement("FROBNICATE  t"), statement("FROBNICATE t"));
    }
}
