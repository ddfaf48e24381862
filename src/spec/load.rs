//! Reading spec files and directories, and turning YAML errors into `file:line:col: field: why`.

use super::raw::RawSpec;
use super::{Spec, validate};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Where `${VAR}` values come from, and whether an unset one is an error.
pub struct Env<'a> {
    pub lookup: &'a dyn Fn(&str) -> Option<String>,
    /// `validate` runs without secrets: unset variables are reported, not fatal.
    pub allow_unset: bool,
}

impl Env<'static> {
    /// The process environment, strict about unset variables.
    pub fn process() -> Self {
        Env {
            lookup: &|name| std::env::var(name).ok(),
            allow_unset: false,
        }
    }
}

/// Expand the command line's files and directories into spec files: a directory contributes
/// its `*.yaml` / `*.yml` in file-name order, like migrations.
pub fn expand_paths(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for arg in args {
        let meta =
            std::fs::metadata(arg).map_err(|e| Error::Usage(format!("{}: {e}", arg.display())))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(arg)
                .map_err(|e| Error::Io(format!("{}: {e}", arg.display())))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                })
                .collect();
            found.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
            if found.is_empty() {
                return Err(Error::Usage(format!(
                    "{}: no *.yaml specs in this directory",
                    arg.display()
                )));
            }
            files.extend(found);
        } else {
            files.push(arg.clone());
        }
    }
    // The same file named twice (`a.yaml ./a.yaml`, a directory and a file in it) is one spec.
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    Ok(files)
}

/// Each spec whose job name an earlier spec of `specs` already has, with why that is refused:
/// the name keys the checkpoint, so two specs under one name would share one job's progress.
pub fn duplicate_names<'a>(specs: impl IntoIterator<Item = &'a Spec>) -> Vec<(&'a Path, String)> {
    let mut seen: std::collections::HashMap<&str, &Path> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for s in specs {
        match seen.get(s.name.as_str()) {
            Some(first) => out.push((
                s.file.as_path(),
                format!(
                    "{}: job name {:?} is also the name of {}; names key the checkpoint and \
                     must be unique (set `name:` in one of them)",
                    s.file.display(),
                    s.name,
                    first.display()
                ),
            )),
            None => {
                seen.insert(&s.name, &s.file);
            }
        }
    }
    out
}

/// Read, parse and validate one spec file.
pub fn load_file(path: &Path, env: &Env) -> Result<Spec> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Spec(format!("{}: cannot read spec: {e}", path.display())))?;
    // A YAML error quotes the line it stops at: its secrets are known before parsing.
    crate::redact::register_spec_text(&text);
    let raw = parse_yaml(path, &text)?;
    validate::validate(path, raw, env)
}

fn parse_yaml(path: &Path, text: &str) -> Result<RawSpec> {
    if text.trim().is_empty() {
        return Err(Error::Spec(format!(
            "{}:1:1: the spec is empty: it needs at least a `postgres:` section",
            path.display()
        )));
    }
    let mut field = String::new();
    // A tag the spec does not know (`table: !include t.sql`) is an error, never dropped: the
    // value under it was read as plain text, and `!include` named the table `t.sql`.
    let options = serde_saphyr::options! { reject_unsupported_tags: true };
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize::<_, RawSpec>(de).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        Error::Spec(describe_yaml_error(
            path,
            &field,
            &e,
            !may_hold_a_secret(text),
        ))
    })
}

/// Whether spec text may show a secret: a password written in it in any form (`password`
/// anywhere, any case), or credentials in a URL (`user:pw@host`). A YAML error then quotes no
/// line of it: recognizing every way YAML can lay out a value (block scalars, quoted or
/// explicit keys, folded lines, flow mappings) to mask it is not a promise to make.
fn may_hold_a_secret(text: &str) -> bool {
    text.to_ascii_lowercase().contains("password") || text.contains('@')
}

/// `file:line:col: field `a.b`: message`, followed by the parser's snippet of the spot when
/// `quote` allows.
fn describe_yaml_error(path: &Path, field: &str, e: &serde_saphyr::Error, quote: bool) -> String {
    let bare = e.without_snippet().to_string();
    // The bare text is "error: line L column C: message at line L, column C".
    let mut message = bare
        .strip_prefix("error: ")
        .unwrap_or(&bare)
        .split_once(": ")
        .filter(|(head, _)| head.starts_with("line "))
        .map(|(_, m)| m.to_string())
        .unwrap_or_else(|| bare.clone());
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    // `Spanned<T>` shows up as a `value` step in the path; it is not a spec field.
    let mut field: Vec<&str> = field
        .split('.')
        .filter(|p| !p.is_empty() && *p != "value" && *p != "?")
        .collect();
    let named = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .map(|m| m.split(['`', ',']).next().unwrap_or("").trim().to_string())
    };
    let missing = named("missing field `");
    let duplicate = named("duplicate mapping key: ");
    if let Some(name) = missing.as_deref().or(duplicate.as_deref()) {
        field.push(name);
    }
    if let Some(name) = &duplicate {
        message = format!("duplicate key `{name}`: each key may appear only once");
    }
    if matches!(
        e.without_snippet(),
        serde_saphyr::Error::MultipleDocuments { .. }
    ) {
        message = "a second YAML document starts here (after `---`): a spec file holds one job; \
                   put each job in a file of its own (a directory runs them in file-name order)"
            .to_string();
    }
    let field = field.join(".");
    // serde's hint is for Rust programmers, not for whoever writes the spec.
    const NULL: &str = "cannot deserialize null into string; use Option<String>";
    let null_means = if field.is_empty() {
        "a key has no name: write it before the `:`"
    } else {
        "has no value: write one after the `:`"
    };
    let message = message.replace(NULL, null_means);
    let place = match e.location() {
        Some(l) if l.line() > 0 => format!("{}:{}:{}", path.display(), l.line(), l.column()),
        _ => path.display().to_string(),
    };
    // No field applies when the text itself is not YAML (or not a mapping of fields).
    let field = if field.is_empty() {
        "not valid YAML for a spec: ".to_string()
    } else {
        format!("field `{field}`: ")
    };
    let snippet: String = if quote {
        e.to_string()
            .lines()
            .skip(1)
            .map(|l| format!("\n{}", l.replace(NULL, null_means)))
            .collect()
    } else {
        String::new()
    };
    format!("{place}: {field}{message}{snippet}")
}
