//! `postgres.where` is ONE boolean expression: checked with a SQL parser (sqlparser, PostgreSQL
//! dialect) that must consume every token, and spliced by the engine only as `wrap` returns it,
//! so neither a parenthesis, a second statement nor a trailing comment can escape it.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Ok if `text` is exactly one SQL expression; otherwise why not, for `postgres.where`.
pub fn check(text: &str) -> Result<(), String> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, text)
        .tokenize_with_location()
        .map_err(|e| format!("is not valid SQL: {e}"))?;
    if let Some(t) = tokens.iter().find(|t| t.token == Token::SemiColon) {
        return Err(format!(
            "must be ONE boolean expression, but has a `;` at {}: a second statement is never \
             allowed here",
            place(&t.span)
        ));
    }
    // A dollar quote's tag follows the rules of an identifier in Postgres: `$1$...$1$` is
    // `$1` and more to Postgres, whatever a tokenizer that takes it for a quote says.
    let digit_tag = |t: &Token| {
        matches!(t, Token::DollarQuotedString(q)
            if q.tag.as_deref().is_some_and(|tag| tag.starts_with(|c: char| c.is_ascii_digit())))
    };
    if let Some(t) = tokens
        .iter()
        .find(|t| matches!(t.token, Token::Placeholder(_)) || digit_tag(&t.token))
    {
        return Err(format!(
            "must not use the parameter {} (at {}): `where` filters the table alone; $1 is \
             the batch's keys in `statement`",
            t.token,
            place(&t.span)
        ));
    }
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(tokens);
    let expr = parser
        .parse_expr()
        .map_err(|e| format!("is not one SQL expression: {e}"))?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        let parsed: String = expr.to_string().chars().take(60).collect();
        return Err(format!(
            "must be ONE boolean expression, but the expression `{parsed}` ends before `{}` at \
             {} (unbalanced parentheses, or more text after the expression)",
            next.token,
            place(&next.span)
        ));
    }
    Ok(())
}

fn place(span: &sqlparser::tokenizer::Span) -> String {
    format!("line {}, column {}", span.start.line, span.start.column)
}

/// `where` as the engine must splice it: `(\n<text>\n)`. The newline before the closing
/// parenthesis ends a trailing `-- comment`, so it cannot swallow what the engine appends.
pub fn wrap(text: &str) -> String {
    format!("(\n{text}\n)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sqlparser::ast::{BinaryOperator, Expr, SetExpr, Statement};

    const ACCEPTED: &[&str] = &[
        "entry_type = 'track' AND dj_name IS NULL",
        "id::text <> '' AND created_at::date >= '2024-01-01'",
        "a IS DISTINCT FROM b",
        "name ILIKE 'abc%'",
        "name ~ '^x' AND name !~* 'y'",
        "status = ANY(ARRAY['a', 'b'])",
        "payload->>'kind' = 'x' AND payload->'a' IS NOT NULL",
        "n BETWEEN 1 AND 10",
        "owner_id IN (SELECT id FROM users WHERE active)",
        "lower(name) = 'x' AND coalesce(x, 0) > 1",
        "created_at < now() - interval '1 day'",
        "NOT EXISTS (SELECT 1 FROM t2 WHERE t2.id = t.id)",
        "n = 0 -- only the zero rows",
        "n = 0 /* block */",
        "x = 'a;b' AND y = $$dollar ; quoted$$",
        "(a OR b) AND (c OR d)",
        "true",
    ];

    const REJECTED: &[(&str, &str)] = &[
        ("n = 0) OR (true", "unbalanced parentheses"),
        ("true); DROP TABLE victim; --", "`;`"),
        ("true; DELETE FROM t", "`;`"),
        ("(n = 0", "not one SQL expression"),
        ("n = 0 n = 1", "more text after"),
        ("", "not one SQL expression"),
        ("-- only a comment", "not one SQL expression"),
        ("n = 'unterminated", "not valid SQL"),
        ("n = 0 /* unterminated", "not valid SQL"),
        ("id = ANY($1)", "must not use the parameter $1"),
        (
            "n::text = $1$ ) OR (true --$1$",
            "must not use the parameter",
        ),
        ("SELECT 1", "more text after"),
    ];

    #[test]
    fn accepts_postgres_expressions() {
        for text in ACCEPTED {
            assert_eq!(check(text), Ok(()), "{text}");
        }
    }

    #[test]
    fn rejects_anything_but_one_expression() {
        for (text, why) in REJECTED {
            let e = check(text).expect_err(text);
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    /// The engine's batch query with `where` spliced as `wrap` returns it, then a condition of
    /// its own appended: the SELECT's filter must be `(<where>) AND <appended>`, exactly.
    fn spliced_filter(text: &str) -> Option<Expr> {
        let sql = format!(
            "SELECT k FROM t WHERE {} AND k > 5 ORDER BY k LIMIT 10",
            wrap(text)
        );
        let stmts = Parser::parse_sql(&PostgreSqlDialect {}, &sql).ok()?;
        let [Statement::Query(q)] = stmts.as_slice() else {
            return None;
        };
        q.limit_clause.as_ref()?;
        let SetExpr::Select(select) = q.body.as_ref() else {
            return None;
        };
        select.selection.clone()
    }

    fn assert_contained(text: &str) {
        let filter = spliced_filter(text).unwrap_or_else(|| panic!("{text:?} broke the query"));
        let Expr::BinaryOp { left, op, right } = &filter else {
            panic!("{text:?}: filter is {filter}");
        };
        assert_eq!(*op, BinaryOperator::And, "{text:?}: {filter}");
        assert!(
            matches!(left.as_ref(), Expr::Nested(_)),
            "{text:?}: {filter}"
        );
        assert_eq!(right.to_string(), "k > 5", "{text:?}: {filter}");
    }

    #[test]
    fn wrapped_text_cannot_escape() {
        for text in ACCEPTED {
            assert_contained(text);
        }
        // Without the newlines, a trailing comment swallows the rest of the engine's query.
        let naive = "SELECT k FROM t WHERE (n = 0 -- c) AND k > 5 ORDER BY k LIMIT 10";
        assert!(Parser::parse_sql(&PostgreSqlDialect {}, naive).is_err());
    }

    /// Token soup: anything `check` accepts stays inside its parentheses once wrapped.
    fn soup() -> impl Strategy<Value = String> {
        let word = prop::sample::select(vec![
            "n", "=", "0", ")", "(", "OR", "AND", "NOT", "true", "--", "-- c\n", "/*", "*/", ";",
            "'", "'x'", "$$", "E'\\''", "\n", "::int", "IS", "NULL", "IN", ",", "1", "ANY",
            "ARRAY[1]", "->>", "'k'", "DROP", "TABLE", "v", "\"q\"", "\\", "-", "+",
        ]);
        prop::collection::vec(word, 1..14).prop_map(|w| w.join(" "))
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]
        #[test]
        fn accepted_soup_stays_contained(text in soup()) {
            if check(&text).is_ok() {
                assert_contained(&text);
            }
        }
    }
}
