//! `${VAR}` and `${VAR:-default}` substitution from the environment. A bare `$1` is left alone:
//! it is a SQL parameter, not a variable.

/// Expand every `${NAME}` / `${NAME:-default}` in `text`. `lookup` returns a variable's value.
/// On an unset variable without a default, returns the variable's name as the error.
pub fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let body_start = start + 2;
        let Some(len) = rest[body_start..].find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let body = &rest[body_start..body_start + len];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            // Not a variable reference (e.g. a literal in SQL): keep it verbatim.
            out.push_str(&rest[start..body_start + len + 1]);
        } else {
            match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(name.to_string()),
            }
        }
        rest = &rest[body_start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::expand;

    fn env(name: &str) -> Option<String> {
        (name == "DB").then(|| "postgres://h/db".to_string())
    }

    #[test]
    fn expands_vars_and_defaults() {
        assert_eq!(expand("${DB}", &env).unwrap(), "postgres://h/db");
        assert_eq!(expand("x ${NOPE:-5s} y", &env).unwrap(), "x 5s y");
        assert_eq!(expand("id = ANY($1)", &env).unwrap(), "id = ANY($1)");
        assert_eq!(expand("${NOPE}", &env).unwrap_err(), "NOPE");
        assert_eq!(expand("'${1}' ${DB", &env).unwrap(), "'${1}' ${DB");
    }
}
