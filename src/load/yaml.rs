//! The YAML layer: splits a file into documents and deserialises each with exact positions.
//!
//! Pass 1 walks the parser's events once (no alias expansion, bounded depth and event count)
//! to find each document's byte range, its `kind` and `name`, and the position of every field.
//! Pass 2 deserialises one document's slice into its concrete type with serde-saphyr under a
//! tight budget, so errors keep their line and column (serde's internally tagged enums lose
//! them) and alias bombs are stopped.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::de::DeserializeOwned;
use serde_saphyr::granit_parser::{Event, Parser};

use crate::diag::{Pos, did_you_mean};

/// Per-file limits. A file past any of them is refused with an error, not read further.
pub const MAX_DEPTH: usize = 32;
pub const MAX_EVENTS: usize = 400_000;
pub const MAX_ALIASES: usize = 1_000;
pub const MAX_DOCUMENTS: usize = 10_000;

/// A problem found at a position in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub code: &'static str,
    pub pos: Pos,
    pub message: String,
    pub help: Option<String>,
}

impl Problem {
    fn new(code: &'static str, pos: Pos, message: impl Into<String>) -> Problem {
        Problem {
            code,
            pos,
            message: message.into(),
            help: None,
        }
    }
}

/// What pass 1 learned about one document.
#[derive(Debug, Clone, Default)]
pub struct RawDoc {
    /// Byte range of the document's text, whole lines, so positions map back by line offset.
    pub range: Range<usize>,
    /// Number of lines before `range` starts.
    pub line_offset: u32,
    /// Where the document's content starts.
    pub pos: Pos,
    /// The top-level `kind` value and where it is.
    pub kind: Option<(String, Pos)>,
    /// The top-level `name` value.
    pub name: Option<String>,
    /// Position of every value, by dotted path (`source.path`, `ports.ide`, `command[0]`).
    pub fields: BTreeMap<String, Pos>,
    /// The root node is a mapping (every document kind is one).
    pub is_mapping: bool,
    /// The document has no content at all (`---` at the end of a file, or only comments).
    pub empty: bool,
}

enum Frame {
    Map {
        key: Option<String>,
        expect_key: bool,
    },
    Seq {
        index: usize,
    },
}

fn pos_of(m: &serde_saphyr::granit_parser::Marker) -> Pos {
    Pos {
        line: m.line() as u32,
        column: m.col() as u32 + 1,
    }
}

fn line_starts(text: &str) -> Vec<usize> {
    let mut v = vec![0];
    v.extend(text.match_indices('\n').map(|(i, _)| i + 1));
    v
}

/// Is the position of the value at `path` worth keeping? Those diagnostics point at: top-level
/// fields, and the fields of `source`, `health` and `ports` (a port's name too); not list items
/// nor the entries of free-form maps such as `env`, which can be many.
fn keeps_position(path: &str) -> bool {
    if path.contains('[') {
        return false;
    }
    match path.split_once('.') {
        None => true,
        Some((top, _)) => matches!(top, "source" | "health" | "ports"),
    }
}

/// Pass 1: split `text` into documents and index their fields, within `MAX_EVENTS` nodes.
pub fn scan(text: &str) -> Result<Vec<RawDoc>, Problem> {
    scan_within(text, MAX_EVENTS).map(|(docs, _)| docs)
}

/// `scan` within at most `max_events` parser events (the load's node budget may leave fewer
/// than `MAX_EVENTS`); also returns how many it took.
pub fn scan_within(text: &str, max_events: usize) -> Result<(Vec<RawDoc>, usize), Problem> {
    let starts = line_starts(text);
    let line_start = |line: u32| {
        starts
            .get(line.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(text.len())
    };
    let mut parser = Parser::new_from_str(text);
    let mut docs: Vec<RawDoc> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut path: Vec<String> = Vec::new();
    let mut events = 0usize;
    let mut aliases = 0usize;
    let mut cur: Option<RawDoc> = None;
    let mut first_node_seen = false;

    while let Some(ev) = parser.next_event() {
        let (event, span) =
            ev.map_err(|e| Problem::new("yaml-syntax", pos_of(e.marker()), e.info()))?;
        events += 1;
        if events > max_events {
            return Err(Problem::new(
                "too-large",
                pos_of(&span.start),
                format!(
                    "the file has more than {max_events} YAML nodes; split it into smaller files"
                ),
            ));
        }
        let at = pos_of(&span.start);
        match event {
            Event::DocumentStart(explicit, _) => {
                if docs.len() >= MAX_DOCUMENTS {
                    return Err(Problem::new(
                        "too-large",
                        at,
                        format!("the file has more than {MAX_DOCUMENTS} documents"),
                    ));
                }
                // The first document's text starts at the top of the file (so comments and
                // directives before it stay with it); later ones at their `---` line.
                let _ = explicit;
                let start_line = if docs.is_empty() { 1 } else { at.line.max(1) };
                if let Some(last) = docs.last_mut() {
                    last.range.end = line_start(start_line);
                }
                cur = Some(RawDoc {
                    range: line_start(start_line)..text.len(),
                    line_offset: start_line - 1,
                    pos: at,
                    empty: true,
                    ..RawDoc::default()
                });
                first_node_seen = false;
            }
            Event::DocumentEnd => {
                if let Some(d) = cur.take() {
                    docs.push(d);
                }
                stack.clear();
                path.clear();
            }
            Event::Alias(_)
            | Event::Scalar(..)
            | Event::MappingStart(..)
            | Event::SequenceStart(..) => {
                let Some(doc) = cur.as_mut() else { continue };
                if matches!(event, Event::Alias(_)) {
                    aliases += 1;
                    if aliases > MAX_ALIASES {
                        return Err(Problem::new(
                            "too-many-aliases",
                            at,
                            format!("the file uses more than {MAX_ALIASES} aliases"),
                        ));
                    }
                }
                if !first_node_seen {
                    first_node_seen = true;
                    doc.pos = at;
                    doc.is_mapping = matches!(event, Event::MappingStart(..));
                    doc.empty = matches!(&event, Event::Scalar(v, serde_saphyr::granit_parser::ScalarStyle::Plain, ..) if v.is_empty() || v == "~");
                }
                // Is this node a mapping key?
                let mut is_key = false;
                match stack.last_mut() {
                    Some(Frame::Map { key, expect_key }) if *expect_key => {
                        is_key = true;
                        *expect_key = false;
                        *key = match &event {
                            Event::Scalar(v, ..) => Some(v.to_string()),
                            _ => Some("?".into()),
                        };
                    }
                    Some(Frame::Map { key, expect_key }) => {
                        *expect_key = true;
                        path.push(key.clone().unwrap_or_default());
                    }
                    Some(Frame::Seq { index }) => {
                        let i = *index;
                        *index += 1;
                        match path.last_mut() {
                            Some(p) => p.push_str(&format!("[{i}]")),
                            None => path.push(format!("[{i}]")),
                        }
                    }
                    None => {}
                }
                if is_key {
                    if let (Event::Scalar(..), Some(Frame::Map { key: Some(k), .. })) =
                        (&event, stack.last())
                    {
                        let mut p = path.join(".");
                        if !p.is_empty() {
                            p.push('.');
                        }
                        p.push_str(k);
                        p.push_str("#key");
                        if keeps_position(&p) {
                            doc.fields.insert(p, at);
                        }
                    }
                    if matches!(event, Event::MappingStart(..) | Event::SequenceStart(..)) {
                        // A complex key: walk it without recording positions.
                        push_frame(&mut stack, &event, at)?;
                        path.push("?".into());
                    }
                    continue;
                }
                let depth_path = path.join(".");
                if keeps_position(&depth_path) {
                    doc.fields.entry(depth_path).or_insert(at);
                }
                if stack.len() == 1
                    && path.len() == 1
                    && let Event::Scalar(v, ..) = &event
                {
                    match path[0].as_str() {
                        "kind" => doc.kind = Some((v.to_string(), at)),
                        "name" => doc.name = Some(v.to_string()),
                        _ => {}
                    }
                }
                match event {
                    Event::MappingStart(..) | Event::SequenceStart(..) => {
                        push_frame(&mut stack, &event, at)?
                    }
                    _ => pop_seq_segment(&mut stack, &mut path),
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                pop_seq_segment(&mut stack, &mut path);
            }
            _ => {}
        }
    }
    if let Some(d) = cur.take() {
        docs.push(d);
    }
    Ok((docs, events))
}

fn push_frame(stack: &mut Vec<Frame>, event: &Event<'_>, at: Pos) -> Result<(), Problem> {
    if stack.len() >= MAX_DEPTH {
        return Err(Problem::new(
            "too-deep",
            at,
            format!("nesting deeper than {MAX_DEPTH} levels; desired-state documents are shallow"),
        ));
    }
    stack.push(match event {
        Event::SequenceStart(..) => Frame::Seq { index: 0 },
        _ => Frame::Map {
            key: None,
            expect_key: true,
        },
    });
    Ok(())
}

/// After a value is complete, drop the path segment that led to it.
fn pop_seq_segment(stack: &mut [Frame], path: &mut Vec<String>) {
    match stack.last() {
        Some(Frame::Map { .. }) => {
            path.pop();
        }
        Some(Frame::Seq { .. }) => {
            if let Some(p) = path.last_mut()
                && let Some(i) = p.rfind('[')
            {
                p.truncate(i);
                if p.is_empty() {
                    path.pop();
                }
            }
        }
        None => {
            path.clear();
        }
    }
}

fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = MAX_EVENTS;
    budget.max_aliases = MAX_ALIASES;
    budget.max_depth = MAX_DEPTH;
    budget.max_documents = 1;
    budget.max_nodes = 100_000;
    budget.max_total_scalar_bytes = 8 << 20;
    budget.max_reader_input_bytes = Some(8 << 20);
    let mut opts = serde_saphyr::Options::default();
    opts.budget = Some(budget);
    opts
}

/// Pass 2: deserialise one document of `text` into `T`, with positions in the whole file.
pub fn deserialize<T: DeserializeOwned>(text: &str, doc: &RawDoc) -> Result<T, Problem> {
    let slice = &text[doc.range.clone()];
    serde_saphyr::from_str_with_options::<T>(slice, options()).map_err(|e| {
        let pos = e
            .location()
            .filter(|l| l.line() > 0)
            .map(|l| Pos {
                line: l.line() as u32 + doc.line_offset,
                column: l.column() as u32,
            })
            .unwrap_or(doc.pos);
        let raw = e.without_snippet().to_string();
        let message = strip_location(&raw);
        problem_from_message(&message, pos)
    })
}

/// serde-saphyr's plain message starts with `error: line N column M: `; we show positions our way.
fn strip_location(raw: &str) -> String {
    let first = raw.lines().next().unwrap_or(raw);
    let s = first.strip_prefix("error: ").unwrap_or(first);
    let s = match s.strip_prefix("line ") {
        Some(rest) => match rest.find(": ") {
            Some(i) if rest[..i].contains("column") => &rest[i + 2..],
            _ => s,
        },
        None => s,
    };
    // Some messages end with ` at line N column M`.
    let s = match s.rfind(" at line ") {
        Some(i) => &s[..i],
        None => s,
    };
    s.to_string()
}

fn problem_from_message(message: &str, pos: Pos) -> Problem {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        let field = &rest[..end];
        let expected: Vec<&str> = rest[end..]
            .split_once("expected ")
            .map(|(_, l)| {
                l.trim_start_matches("one of ")
                    .split(',')
                    .map(|s| s.trim().trim_matches('`'))
                    .filter(|s| !s.is_empty() && *s != "kind")
                    .collect()
            })
            .unwrap_or_default();
        let help = match did_you_mean(field, expected.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("known fields here: {}", expected.join(", ")),
        };
        return Problem {
            code: "unknown-field",
            pos,
            message: format!("unknown field `{field}`"),
            help: Some(help),
        };
    }
    if let Some(after) = message.strip_prefix("unknown variant `") {
        let mut p = Problem::new("unknown-value", pos, message);
        if let Some((v, rest)) = after.split_once('`') {
            let expected: Vec<&str> = rest
                .split_once("expected ")
                .map(|(_, l)| {
                    l.trim_start_matches("one of ")
                        .split(',')
                        .map(|s| s.trim().trim_matches('`'))
                        .collect()
                })
                .unwrap_or_default();
            p.message = format!("unknown value `{v}`");
            p.help = Some(match did_you_mean(v, expected.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("expected one of: {}", expected.join(", ")),
            });
            if expected.contains(&"env") && expected.contains(&"file") {
                p.help = Some(
                    "secrets are read from `{env: NAME}` or `{file: PATH}`, never written inline"
                        .into(),
                );
            }
        }
        return p;
    }
    if let Some(i) = message.find("budget breached: ") {
        let what: String = message[i + 17..]
            .chars()
            .take_while(|c| c.is_alphanumeric())
            .collect();
        return Problem {
            code: "too-large",
            pos,
            message: format!("the document expands past vessel's limits ({what})"),
            help: Some("aliases or nesting expand it too far; write the values out plainly".into()),
        };
    }
    if message.starts_with("missing field") {
        return Problem::new("missing-field", pos, message);
    }
    Problem::new("invalid-value", pos, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_indexes_fields() {
        let text = "# lead comment\nkind: Plan\nname: small\nports: {ide: 8080}\n---\nkind: Session\nname: u1\nsource:\n  path: /srv/u1\n  exclude: [a, b]\n";
        let docs = scan(text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].kind.as_ref().map(|k| k.0.as_str()), Some("Plan"));
        assert_eq!(docs[0].name.as_deref(), Some("small"));
        assert_eq!(
            docs[0].fields.get("ports.ide"),
            Some(&Pos {
                line: 4,
                column: 14
            })
        );
        assert_eq!(docs[1].line_offset, 4);
        assert_eq!(
            docs[1].fields.get("source.path"),
            Some(&Pos { line: 9, column: 9 })
        );
        // Positions of list items and of free-form maps' entries are not kept.
        assert_eq!(docs[1].fields.get("source.exclude[1]"), None);
        assert_eq!(
            docs[1].fields.get("source.exclude"),
            Some(&Pos {
                line: 10,
                column: 12
            })
        );
        assert_eq!(
            docs[1].fields.get("name#key"),
            Some(&Pos { line: 7, column: 1 })
        );
        assert!(text[docs[1].range.clone()].starts_with("---\nkind: Session"));
    }

    #[test]
    fn trailing_separator_is_an_empty_document() {
        let docs = scan("kind: Plan\nname: a\n---\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert!(!docs[0].empty);
        assert!(docs[1].empty);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let err = scan(&text).unwrap_err();
        assert!(matches!(err.code, "too-deep" | "yaml-syntax"), "{err:?}");
    }
}
