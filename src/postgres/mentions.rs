//! What a piece of SQL names, read with sqlparser's Postgres tokenizer so that nothing inside a
//! string literal, a dollar quote or a comment counts: the names written before `(` (functions
//! and aggregates), the operator symbols, and the type names after `::`. `effects` looks them
//! up in the catalog; a name that is not a function (`AND (`) simply finds nothing there.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Characters an operator is made of in Postgres.
const OPERATOR_CHARS: &str = "+-*/<>=~!@#%^&|`?";

#[derive(Debug, Default, PartialEq)]
pub struct Mentions {
    /// Names before `(` written bare: unquoted ones folded to lower case, as Postgres folds
    /// them.
    pub calls: Vec<String>,
    /// Names before `(` written with their schema: (schema, name).
    pub qualified_calls: Vec<(String, String)>,
    /// Every run of operator characters, and each of its substrings (Postgres splits `<-` in
    /// `a<-1` into `<` and `-`): more candidates than operators, never fewer.
    pub operators: Vec<String>,
    /// Type names after `::`.
    pub types: Vec<String>,
}

impl Mentions {
    /// What `text` mentions, added to what was already there.
    pub fn read(&mut self, text: &str) {
        let dialect = PostgreSqlDialect {};
        let Ok(tokens) = Tokenizer::new(&dialect, text).tokenize() else {
            // Not SQL to this tokenizer: every word before `(` and every symbol run counts.
            self.calls.extend(words_before_parens(text));
            self.operators.extend(operator_runs(text));
            return;
        };
        let words: Vec<&Token> = tokens
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        for (i, t) in words.iter().enumerate() {
            let Token::Word(w) = t else { continue };
            if words.get(i + 1) == Some(&&Token::LParen) {
                match (
                    i.checked_sub(2).map(|j| words[j]),
                    i.checked_sub(1).map(|j| words[j]),
                ) {
                    (Some(Token::Word(schema)), Some(Token::Period)) => {
                        self.qualified_calls.push((folded(schema), folded(w)))
                    }
                    _ => self.calls.push(folded(w)),
                }
            }
            if i > 0 && words[i - 1] == &Token::DoubleColon {
                // `::schema.type`: the last name of the chain.
                let mut last = w;
                let mut j = i;
                while words.get(j + 1) == Some(&&Token::Period)
                    && let Some(Token::Word(n)) = words.get(j + 2)
                {
                    last = n;
                    j += 2;
                }
                self.types.push(folded(last));
            }
        }
        // Operators from the code with every literal, identifier and comment taken out, tokens
        // kept adjacent as written (`===` may come as `==` and `=`).
        let mut code = String::new();
        for t in &tokens {
            let s = t.to_string();
            if !matches!(t, Token::Whitespace(_)) && s.chars().all(|c| OPERATOR_CHARS.contains(c)) {
                code.push_str(&s);
            } else {
                code.push(' ');
            }
        }
        self.operators.extend(operator_runs(&code));
    }

    /// What a function's body or a view's definition mentions: as `read`, and every word as
    /// a type besides (`DECLARE x kid;` makes a value of domain `kid`, whose CHECKs run).
    pub fn read_body(&mut self, text: &str) {
        self.read(text);
        let dialect = PostgreSqlDialect {};
        match Tokenizer::new(&dialect, text).tokenize() {
            Ok(tokens) => self.types.extend(tokens.iter().filter_map(|t| match t {
                Token::Word(w) => Some(folded(w)),
                _ => None,
            })),
            Err(_) => self.types.extend(
                text.split(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
                    .filter(|w| !w.is_empty())
                    .map(str::to_lowercase),
            ),
        }
    }

    /// Sorted, without repeats.
    pub fn tidy(&mut self) {
        for v in [&mut self.calls, &mut self.operators, &mut self.types] {
            v.sort();
            v.dedup();
        }
        self.qualified_calls.sort();
        self.qualified_calls.dedup();
    }
}

/// Whether `text` says DEFAULT as a keyword (not in a literal, a comment or a quoted name);
/// text the tokenizer cannot read counts as saying it.
pub fn says_default(text: &str) -> bool {
    says_any(text, &["default"])
}

/// The words that start a statement that writes, or runs one given as text.
const WRITE_WORDS: &[&str] = &[
    "alter", "analyze", "call", "cluster", "comment", "copy", "create", "delete", "do", "drop",
    "execute", "grant", "import", "insert", "load", "merge", "refresh", "reindex", "revoke",
    "security", "truncate", "update", "vacuum",
];

/// Whether `text` (a function's body) says a word that starts a statement that writes, or
/// runs SQL given as text (`EXECUTE`), outside literals, comments and quoted names; text the
/// tokenizer cannot read counts as saying one.
pub fn says_write(text: &str) -> bool {
    says_any(text, WRITE_WORDS)
}

/// Whether `text` (a function's body) runs SQL built at run time: PL/pgSQL's `EXECUTE`.
pub fn says_execute(text: &str) -> bool {
    says_any(text, &["execute"])
}

/// Whether `text` says one of `words` (lower case) as an unquoted word, outside literals and
/// comments; true if the tokenizer cannot read it.
fn says_any(text: &str, words: &[&str]) -> bool {
    let dialect = PostgreSqlDialect {};
    Tokenizer::new(&dialect, text)
        .tokenize()
        .map_or(true, |tokens| {
            tokens.iter().any(|t| {
                matches!(t, Token::Word(w)
                    if w.quote_style.is_none()
                        && words.contains(&w.value.to_ascii_lowercase().as_str()))
            })
        })
}

fn folded(w: &sqlparser::tokenizer::Word) -> String {
    if w.quote_style.is_some() {
        w.value.clone()
    } else {
        w.value.to_lowercase()
    }
}

/// Runs of operator characters in `code`, and all their substrings.
fn operator_runs(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !OPERATOR_CHARS.contains(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && OPERATOR_CHARS.contains(chars[i]) {
            i += 1;
        }
        // Runs are short (a few characters): every substring is a candidate name.
        let run = &chars[start..i.min(start + 63)];
        for a in 0..run.len() {
            for b in a + 1..=run.len() {
                out.push(run[a..b].iter().collect());
            }
        }
    }
    out
}

/// The fallback for text the tokenizer refuses: alphanumeric words right before `(`.
fn words_before_parens(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    for (i, _) in text.match_indices('(') {
        let mut end = i;
        while end > 0 && b[end - 1] == b' ' {
            end -= 1;
        }
        let mut start = end;
        while start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            start -= 1;
        }
        if start < end {
            out.push(text[start..end].to_ascii_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Mentions;

    fn read(text: &str) -> Mentions {
        let mut m = Mentions::default();
        m.read(text);
        m.tidy();
        m
    }

    #[test]
    fn names_before_parentheses() {
        let m = read("(public.side_ins(t.id) AND (nextval('s'::regclass) > 0))");
        assert_eq!(m.calls, ["and", "nextval"]);
        assert_eq!(
            m.qualified_calls,
            [("public".to_string(), "side_ins".to_string())]
        );
        assert_eq!(
            read("\"My \"\"F\"\"\"(x) + f2 (y)").calls,
            ["My \"F\"", "f2"]
        );
        assert!(read("(1 + (2))").calls.is_empty());
        // Text in a literal, a dollar quote or a comment is not a call.
        assert!(
            read("(t.note = 'legacy system (v1) it''s f(x)'::text)")
                .calls
                .is_empty()
        );
        assert!(read("t.note = $q$ g(x) $q$ -- h(y)\n").calls.is_empty());
        assert!(read("t.note = E'\\' k(x)' /* m(z) */").calls.is_empty());
    }

    #[test]
    fn operators_and_types() {
        let m = read("(t.n === 3) AND t.x OPERATOR(public.@@!) 'a <-> b' AND t.y::public.dpos > 0");
        for op in ["===", "==", "=", "@@!", "!", ">"] {
            assert!(m.operators.contains(&op.to_string()), "{op}: {m:?}");
        }
        assert!(!m.operators.contains(&"<->".to_string()), "{m:?}");
        assert_eq!(m.types, ["dpos"]);
        assert_eq!(read("(x)::dpos").types, ["dpos"]);
    }

    #[test]
    fn default_as_a_keyword_only() {
        use super::says_default;
        assert!(says_default("ON CONFLICT (id) DO UPDATE SET v = DEFAULT"));
        assert!(says_default("do update set v = default, w = 1"));
        assert!(!says_default("SET v = 'DEFAULT' -- default\n"));
        assert!(!says_default(r#"SET "default" = 1, v = $$default$$"#));
    }

    #[test]
    fn writes_in_a_body() {
        use super::says_write;
        assert!(says_write(
            "BEGIN INSERT INTO log VALUES (NEW.id); RETURN NEW; END"
        ));
        assert!(says_write(
            "BEGIN execute format('select 1'); RETURN NEW; END"
        ));
        assert!(!says_write(
            "BEGIN IF TG_OP = 'UPDATE' THEN NEW.updated_at := now(); END IF; -- insert\n\
             RETURN NEW; END"
        ));
        assert!(!says_write(r#"BEGIN NEW."update" := 1; RETURN NEW; END"#));
    }
}
