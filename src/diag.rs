//! Diagnostics people can act on: what is wrong, where (file, line, column), and how to fix it.
//!
//! A `Diagnostic` is plain data, rendered rustc-style for terminals or as JSON for machines.
//! It carries the offending source line so rendering needs no file access.

use std::collections::BTreeMap;
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

    /// Attach the source line this diagnostic points at, taken from the file's text. Scans the
    /// text: for many diagnostics of one file use `attach_snippets` or `SourceLines`.
    pub fn with_source(mut self, text: &str) -> Self {
        attach_snippets(std::slice::from_mut(&mut self), text);
        self
    }

    /// Attach the source line this diagnostic points at, from the lines kept of its file.
    pub fn with_lines(mut self, lines: &SourceLines) -> Self {
        if self.line > 0 {
            self.snippet = lines.get(self.line).map(str::to_string);
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

/// How many characters of a source line a snippet shows.
pub const SNIPPET_CHARS: usize = 200;

/// Source lines kept for snippets after a file's text is gone: only the lines asked for, each
/// cut to what a snippet shows, so holding them costs what rendering needs and no more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceLines(BTreeMap<u32, String>);

impl SourceLines {
    /// The lines of `text` numbered in `wanted` (1-based; 0 is ignored), in one pass.
    pub fn pick(text: &str, wanted: impl IntoIterator<Item = u32>) -> SourceLines {
        let mut wanted: Vec<u32> = wanted.into_iter().filter(|l| *l > 0).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut out = BTreeMap::new();
        let mut want = wanted.into_iter().peekable();
        for (i, line) in text.lines().enumerate() {
            let Some(&next) = want.peek() else { break };
            let n = i as u32 + 1;
            if n == next {
                out.insert(n, line.chars().take(SNIPPET_CHARS).collect());
                want.next();
            }
        }
        SourceLines(out)
    }

    /// Line `line` (1-based), as far as a snippet shows it, if it was kept.
    pub fn get(&self, line: u32) -> Option<&str> {
        self.0.get(&line).map(String::as_str)
    }
}

/// Attach to each of `diags` the source line it points at, reading `text` once for all of them
/// (linear in the text and the number of diagnostics, however many there are).
pub fn attach_snippets(diags: &mut [Diagnostic], text: &str) {
    let lines = SourceLines::pick(text, diags.iter().map(|d| d.line));
    for d in diags.iter_mut().filter(|d| d.line > 0) {
        d.snippet = lines.get(d.line).map(str::to_string);
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

/// A list of names for a message, bounded: at most `max` names, each cut to
/// `SUGGEST_MAX_CHARS` characters, then how many more there are. (A diagnostic that listed
/// every name would make many diagnostics quadratic in size.)
pub fn name_list<'a>(names: impl IntoIterator<Item = &'a str>, max: usize) -> String {
    let mut out = String::new();
    let mut more = 0usize;
    for (i, n) in names.into_iter().enumerate() {
        if i >= max {
            more += 1;
            continue;
        }
        if i > 0 {
            out.push_str(", ");
        }
        let mut chars = n.chars();
        out.extend(chars.by_ref().take(SUGGEST_MAX_CHARS));
        if chars.next().is_some() {
            out.push_str("...");
        }
    }
    if more > 0 {
        let _ = write!(out, ", and {more} more");
    }
    out
}

/// "Did you mean" compares words of at most this many characters: typos are in names people
/// type, and the comparison is quadratic in the lengths.
pub const SUGGEST_MAX_CHARS: usize = 64;

/// "Did you mean" looks at no more than this many candidates for one word.
pub const SUGGEST_MAX_CANDIDATES: usize = 256;

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
///
/// Bounded: a word or candidate longer than `SUGGEST_MAX_CHARS` is never compared, at most
/// `SUGGEST_MAX_CANDIDATES` candidates are looked at, and each comparison stops as soon as it
/// cannot come within the limit, so one call costs at most about 256 x 64 x 64 steps whatever
/// the input.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let w: Vec<char> = word.chars().take(SUGGEST_MAX_CHARS + 1).collect();
    if w.len() > SUGGEST_MAX_CHARS {
        return None;
    }
    let mut best: Option<(usize, &str)> = None;
    let mut buf: Vec<char> = Vec::with_capacity(SUGGEST_MAX_CHARS + 1);
    for c in candidates.into_iter().take(SUGGEST_MAX_CANDIDATES) {
        buf.clear();
        buf.extend(c.chars().take(SUGGEST_MAX_CHARS + 1));
        if buf.len() > SUGGEST_MAX_CHARS {
            continue;
        }
        let mut limit = (buf.len().max(w.len()) / 3).max(1);
        if let Some((bd, _)) = best {
            // Only a strictly closer candidate replaces the best one.
            limit = limit.min(bd.saturating_sub(1));
        }
        if let Some(d) = edit_distance_within(&w, &buf, limit) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// The edit distance of `a` and `b` (insertions, deletions, substitutions, and a transposition
/// of neighbours counting as one) if it is at most `limit`; `None` as soon as it cannot be.
fn edit_distance_within(a: &[char], b: &[char], limit: usize) -> Option<usize> {
    if a.len().abs_diff(b.len()) > limit {
        return None;
    }
    let mut prev2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        let mut row_min = cur[0];
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
            // Transposition counts as one edit (`plna` -> `plan`).
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
            row_min = row_min.min(cur[j]);
        }
        if row_min > limit {
            return None;
        }
        std::mem::swap(&mut prev2, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    Some(prev[b.len()]).filter(|d| *d <= limit)
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
        // Ties keep the first candidate; a closer later one wins.
        assert_eq!(did_you_mean("nam", ["nap", "name"]), Some("nap"));
        assert_eq!(did_you_mean("sourc", ["souce", "source"]), Some("source"));
    }

    #[test]
    fn did_you_mean_is_bounded() {
        // Long words are not compared at all (this took 40 s per pass at 100,000 characters).
        let long = "p".repeat(100_000);
        let near = format!("{long}q");
        let t = std::time::Instant::now();
        assert_eq!(did_you_mean(&long, [near.as_str()]), None);
        assert_eq!(did_you_mean("plan", [near.as_str(), "plam"]), Some("plam"));
        // Only the first candidates are looked at.
        let many = |at: usize| -> Vec<String> {
            (0..10_000)
                .map(|i| match i == at {
                    true => "needle".to_string(),
                    false => format!("zzzzzzzzzz{i}"),
                })
                .collect()
        };
        let early = many(3);
        assert_eq!(
            did_you_mean("neddle", early.iter().map(String::as_str)),
            Some("needle")
        );
        let late = many(9_999);
        assert_eq!(
            did_you_mean("neddle", late.iter().map(String::as_str)),
            None
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn name_lists_are_bounded() {
        assert_eq!(name_list(["a", "b"], 3), "a, b");
        assert_eq!(
            name_list(["a", "b", "c", "d", "e"], 3),
            "a, b, c, and 2 more"
        );
        let long = "x".repeat(1000);
        assert_eq!(
            name_list([long.as_str()], 3),
            format!("{}...", "x".repeat(64))
        );
    }

    #[test]
    fn snippets_for_many_diagnostics_come_from_one_pass() {
        let text = "a: 1\nb: 2\n\nd: 4\n";
        let mut diags: Vec<Diagnostic> = [4, 1, 0, 9, 2]
            .into_iter()
            .map(|line| Diagnostic::error("x", "f.yaml", Pos { line, column: 1 }, "m"))
            .collect();
        attach_snippets(&mut diags, text);
        let got: Vec<Option<&str>> = diags.iter().map(|d| d.snippet.as_deref()).collect();
        assert_eq!(got, [Some("d: 4"), Some("a: 1"), None, None, Some("b: 2")]);
        let lines = SourceLines::pick(&format!("{}\nk: v\n", "x".repeat(1000)), [1, 2]);
        assert_eq!(lines.get(1).map(|l| l.len()), Some(SNIPPET_CHARS));
        assert_eq!(lines.get(2), Some("k: v"));
        assert_eq!(lines.get(3), None);
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
