//! What `clickhouse.verify` may be: one query that only reads this server's tables. `readonly=2`
//! (how it runs) still lets through `KILL QUERY` (another client's query cancelled, an insert
//! left half done) and table functions that reach past the server (`url`, `remote`, `s3`,
//! `mysql`, `executable`...), where readonly does not hold. Read with sqlparser's ClickHouse
//! tokenizer (comments, quotes and backticks as the server reads them).

use sqlparser::dialect::ClickHouseDialect;
use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

/// Table functions that only read this server or make rows up: the only ones `verify` may
/// call. A list of the harmless, not of the harmful: one a later server adds counts until it
/// is named here.
const LOCAL_TABLE_FUNCTIONS: &[&str] = &[
    "generaterandom",
    "generate_series",
    "generateseries",
    "merge",
    "mergetreeanalyzeindexes",
    "mergetreeanalyzeindexesuuid",
    "mergetreecodecblockcounts",
    "mergetreeindex",
    "mergetreeprojection",
    "mergetreetextindex",
    "null",
    "numbers",
    "numbers_mt",
    "primes",
    "sqlstandardvalues",
    "values",
    "view",
    "viewexplain",
    "viewifpermitted",
    "zeros",
    "zeros_mt",
];

/// Why `sql` is not one query that only reads, or None. `table_functions`: the server's
/// (`system.table_functions`); with none given, only the kind of statement is checked.
pub fn refusal(sql: &str, table_functions: &[String]) -> Option<String> {
    let tokens = match Tokenizer::new(&ClickHouseDialect {}, sql).tokenize() {
        Ok(t) => t,
        Err(e) => return Some(format!("cannot be read as SQL: {e}")),
    };
    // 18.16 ends a block comment at its first `*/`; current servers (and the tokenizer)
    // nest them: text after an inner `/*` is code to one and a comment to the other.
    if tokens.iter().any(
        |t| matches!(t, Token::Whitespace(Whitespace::MultiLineComment(c)) if c.contains("/*")),
    ) {
        return Some(
            "has a block comment inside a block comment, which servers read differently (18.16 \
             ends it at the first `*/`): write the comments one after the other"
                .into(),
        );
    }
    let significant: Vec<&Token> = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    let first = significant.iter().find(|t| **t != &Token::LParen);
    let is_query = matches!(first, Some(Token::Word(w))
        if w.quote_style.is_none()
            && (w.value.eq_ignore_ascii_case("select") || w.value.eq_ignore_ascii_case("with")));
    if !is_query {
        let starts = first.map_or_else(|| "nothing".to_string(), |t| format!("`{t}`"));
        return Some(format!(
            "must be one SELECT (or WITH ... SELECT) query, but starts with {starts}: \
             readonly=2 still lets statements such as KILL QUERY act on the server"
        ));
    }
    if let Some(i) = significant.iter().position(|t| **t == Token::SemiColon)
        && significant[i + 1..].iter().any(|t| **t != Token::SemiColon)
    {
        return Some("must be one query: it has a second statement after a `;`".into());
    }
    for (i, t) in significant.iter().enumerate() {
        let Token::Word(w) = t else { continue };
        let name = w.value.to_ascii_lowercase();
        if LOCAL_TABLE_FUNCTIONS.contains(&name.as_str())
            || !table_functions
                .iter()
                .any(|f| f.eq_ignore_ascii_case(&w.value))
        {
            continue;
        }
        // A column or table of the same name is not a call: what follows it says so. Anything
        // not plainly so (a `(`, or a token the server may read otherwise) counts as one.
        let next = significant.get(i + 1).copied();
        if !not_a_call(next) {
            return Some(format!(
                "calls the table function {}(), which reaches past this server's tables (another \
                 server, a URL, files or a program), where readonly=2 does not hold",
                w.value
            ));
        }
    }
    None
}

/// Whether a name followed by `next` is not called: anything but a `(` (comments and spaces
/// are not tokens here) or a character the tokenizer does not know (which a server may read
/// otherwise).
fn not_a_call(next: Option<&Token>) -> bool {
    !matches!(next, Some(Token::LParen | Token::Char(_)))
}

#[cfg(test)]
mod tests {
    use super::refusal;

    fn server() -> Vec<String> {
        [
            "url",
            "remote",
            "s3",
            "numbers",
            "file",
            "executable",
            "mysql",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn a_select_that_reads_this_server_passes() {
        for ok in [
            "SELECT count() FROM t",
            "  -- note\n(SELECT 1)",
            "WITH x AS (SELECT 1) SELECT * FROM x;",
            "SELECT count() FROM hits WHERE url = '' AND file != remote",
            "SELECT url, count() FROM hits GROUP BY url",
            "SELECT sum(number) FROM numbers(10)",
            "select 1 from `url`.t",
            "SELECT countIf(arrayExists(url -> url = '', urls)) FROM src",
            "SELECT count() FROM src WHERE (p > 1 ? url : file) = 'x'",
            "SELECT count() FROM src WHERE format('{}-{}', url, file) = ''",
            "SELECT 1 /* a */ /* b */",
        ] {
            assert_eq!(refusal(ok, &server()), None, "{ok}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "KILL QUERY WHERE query LIKE '%x%'",
            "/* SELECT */ KILL QUERY WHERE 1",
            "SYSTEM STOP MERGES",
            "",
            "SELECT 1; KILL QUERY WHERE 1",
            "SELECT * FROM url('http://x/', CSV, 'a String')",
            "SELECT * FROM URL ('http://x/', CSV, 'a String')",
            "SELECT * FROM remote /* c */ ('h', db.t)",
            "SELECT * FROM t, s3('http://x/f', 'CSV')",
            "SELECT count() FROM executable('x.sh', TSV, 'a Int8')",
            "SELECT * FROM mysql # c\n('h', 'db', 't', 'u', 'p')",
            "SELECT 0 /* /* */ + (SELECT count() FROM url('http://x/', CSV, 'a UInt8')) -- */",
        ] {
            assert!(refusal(bad, &server()).is_some(), "{bad}");
        }
        // Without the server's list, only the kind of statement is known.
        assert!(refusal("KILL QUERY WHERE 1", &[]).is_some());
        assert_eq!(
            refusal("SELECT * FROM url('http://x/', CSV, 'a String')", &[]),
            None
        );
    }
}
