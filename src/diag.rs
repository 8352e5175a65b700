//! Diagnostics people can act on: what is wrong, where (file, line, column), and how to fix it.
//!
//! A `Diagnostic` is plain data, rendered rustc-style for terminals or as JSON for machines.
//! It carries the offending source line so rendering needs no file access.

use std::fmt::Write as _;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable identifier for the kind of problem, such as `unknown-field`.
    pub code: &'static str,
    /// The file, as given to the loader (relative to the tree's root where possible).
    pub file: PathBuf,
    /// 1-based line; 0 when the problem is about the file as a whole.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
    pub message: String,
    /// A short note shown under the caret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// How to fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    /// The source line the problem is on, for rendering.
    #[serde(skip)]
    pub snippet: Option<String>,
}

/// A position in a file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Diagnostic {
    pub fn error(
        code: &'static str,
        file: impl Into<PathBuf>,
        pos: Pos,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            file: file.into(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
            label: None,
            help: None,
            snippet: None,
        }
    }

    pub fn warning(
        code: &'static str,
        file: impl Into<PathBuf>,
        pos: Pos,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, file, pos, message)
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Attach the source line this diagnostic points at, taken from the file's text.
    pub fn with_source(mut self, text: &str) -> Self {
        if self.line > 0 {
            self.snippet = text
                .lines()
                .nth(self.line as usize - 1)
                .map(|l| l.chars().take(200).collect());
        }
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `file:line:col`, as editors and terminals link it.
    pub fn location(&self) -> String {
        if self.line == 0 {
            self.file.display().to_string()
        } else {
            format!("{}:{}:{}", self.file.display(), self.line, self.column)
        }
    }

    /// Render rustc-style:
    ///
    /// ```text
    /// error[missing-plan]: session `user-2` names plan `large`, which does not exist
    ///   --> sessions/user-2.yaml:4:7
    ///    |
    ///  4 | plan: large
    ///    |       ^^^^^ no plan named `large`
    ///    = help: known plans: small
    /// ```
    pub fn render(&self, color: bool) -> String {
        let (red, yellow, blue, bold, reset) = if color {
            (
                "\x1b[1;31m",
                "\x1b[1;33m",
                "\x1b[1;34m",
                "\x1b[1m",
                "\x1b[0m",
            )
        } else {
            ("", "", "", "", "")
        };
        let (sev, sc) = match self.severity {
            Severity::Error => ("error", red),
            Severity::Warning => ("warning", yellow),
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{sc}{sev}[{}]{reset}{bold}: {}{reset}",
            self.code, self.message
        );
        let gutter = if self.line > 0 {
            self.line.to_string().len()
        } else {
            1
        };
        let pad = " ".repeat(gutter);
        let _ = writeln!(out, "{pad}{blue}-->{reset} {}", self.location());
        if let Some(src) = &self.snippet {
            let _ = writeln!(out, "{pad} {blue}|{reset}");
            let _ = writeln!(out, "{blue}{}{reset} {blue}|{reset} {src}", self.line);
            let col = self.column.max(1) as usize - 1;
            let width = token_width(src, col);
            let label = self
                .label
                .as_deref()
                .map(|l| format!(" {l}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{pad} {blue}|{reset} {}{sc}{}{label}{reset}",
                " ".repeat(col.min(src.chars().count())),
                "^".repeat(width)
            );
        }
        if let Some(help) = &self.help {
            let _ = writeln!(out, "{pad} {blue}={reset} {bold}help{reset}: {help}");
        }
        out
    }
}

/// How many characters the token starting at `col` spans (at least one).
fn token_width(line: &str, col: usize) -> usize {
    let rest: String = line.chars().skip(col).collect();
    let rest = rest.trim_end();
    if rest.is_empty() {
        return 1;
    }
    let stop = |c: char| c.is_whitespace() || c == ',' || c == '}' || c == ']' || c == '#';
    let n = match rest.chars().next() {
        Some(q @ ('"' | '\'')) => rest[1..]
            .find(q)
            .map(|i| i + 2)
            .unwrap_or(rest.chars().count()),
        _ => rest.chars().take_while(|c| !stop(*c)).count(),
    };
    n.max(1)
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(word, c);
        let limit = (c.len().max(word.len()) / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
            // Transposition counts as one edit (`plna` -> `plan`).
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev[j - 1]); // prev row, two back, approximated
            }
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_finds_typos_and_not_strangers() {
        let fields = ["name", "plan", "owner", "state", "source", "expires"];
        assert_eq!(did_you_mean("plna", fields), Some("plan"));
        assert_eq!(did_you_mean("expirse", fields), Some("expires"));
        assert_eq!(did_you_mean("ownr", fields), Some("owner"));
        assert_eq!(did_you_mean("colour", fields), None);
    }

    #[test]
    fn renders_like_rustc() {
        let d = Diagnostic::error(
            "missing-plan",
            "s.yaml",
            Pos { line: 3, column: 7 },
            "no such plan",
        )
        .with_label("here")
        .with_help("known plans: small")
        .with_source("kind: Session\nname: a\nplan: large\n");
        let r = d.render(false);
        assert!(r.contains("error[missing-plan]: no such plan"), "{r}");
        assert!(r.contains("--> s.yaml:3:7"), "{r}");
        assert!(r.contains("3 | plan: large"), "{r}");
        assert!(r.contains("  |       ^^^^^ here"), "{r}");
        assert!(r.contains("= help: known plans: small"), "{r}");
    }
}
