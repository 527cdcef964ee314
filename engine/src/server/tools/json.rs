//! JSON pieces of tool-call outputs: where a value ends in a growing text, and a call
//! object's name and the raw text of its arguments (kept as the model wrote them, so the
//! `arguments` string keeps its key order, and a stream and a whole response agree).
use serde::de::IgnoredAny;

use super::ToolCall;

/// How far a JSON value at the start of a text (after whitespace) has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The value ends at this byte offset.
    Complete(usize),
    /// The text so far begins a value; more may complete it.
    Incomplete,
    /// The text cannot begin a value.
    Invalid,
}

/// Scan the object (`{`) or array (`[`) that `text` begins with, after whitespace. Other
/// values are refused: only a closing bracket tells a growing text's value has ended.
pub fn scan_container(text: &str) -> Scan {
    let start = text.len() - text.trim_start().len();
    match text[start..].chars().next() {
        None => return Scan::Incomplete,
        Some('{' | '[') => {}
        Some(_) => return Scan::Invalid,
    }
    let mut it = serde_json::Deserializer::from_str(text).into_iter::<IgnoredAny>();
    match it.next() {
        Some(Ok(_)) => Scan::Complete(it.byte_offset()),
        Some(Err(e)) if e.is_eof() => Scan::Incomplete,
        None => Scan::Incomplete,
        Some(Err(_)) => Scan::Invalid,
    }
}

/// [`scan_container`] for a text that grows: each call reads only the bytes added since
/// the last (a long call streamed token by token costs linear time, not quadratic). It
/// follows brackets and strings only; the value it finds complete is then parsed in full.
/// Reset it when the text starts anew.
#[derive(Debug, Clone, Default)]
pub struct GrowingScan {
    /// The value's end, once found.
    end: Option<usize>,
    pos: usize,
    depth: usize,
    opened: bool,
    in_str: bool,
    escaped: bool,
}

impl GrowingScan {
    /// Where the object or array `text` begins with (after whitespace) ends; `text` must
    /// extend the text of the previous call.
    pub fn scan(&mut self, text: &str) -> Scan {
        if let Some(end) = self.end {
            return Scan::Complete(end);
        }
        let bytes = text.as_bytes();
        while let Some(&c) = bytes.get(self.pos) {
            self.pos += 1;
            if !self.opened {
                match c {
                    b'{' | b'[' => {
                        self.opened = true;
                        self.depth = 1;
                    }
                    c if c.is_ascii_whitespace() => {}
                    _ => return Scan::Invalid,
                }
            } else if self.in_str {
                match c {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_str = false,
                    _ => {}
                }
            } else {
                match c {
                    b'"' => self.in_str = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            self.end = Some(self.pos);
                            return Scan::Complete(self.pos);
                        }
                    }
                    _ => {}
                }
            }
        }
        Scan::Incomplete
    }
}

/// `text.find(marker)` for a text that grows: `searched` is how far earlier calls looked.
pub fn find_growing(text: &str, marker: &str, searched: &mut usize) -> Option<usize> {
    let mut from = searched.saturating_sub(marker.len() - 1);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let found = text[from..].find(marker).map(|p| from + p);
    *searched = text.len();
    found
}

/// The length of the JSON value `text` begins with (no leading whitespace), if complete.
fn value_len(text: &str) -> Option<usize> {
    let mut it = serde_json::Deserializer::from_str(text).into_iter::<IgnoredAny>();
    match it.next() {
        Some(Ok(_)) => Some(it.byte_offset()),
        _ => None,
    }
}

fn skip_ws(s: &str, i: usize) -> usize {
    i + (s[i..].len() - s[i..].trim_start().len())
}

/// The entries of the JSON object `text` (whitespace around it allowed) with each value's
/// raw text; None if `text` is not exactly one object.
pub fn object_entries(text: &str) -> Option<Vec<(String, &str)>> {
    let mut i = skip_ws(text, 0);
    if !text[i..].starts_with('{') {
        return None;
    }
    i = skip_ws(text, i + 1);
    let mut out = Vec::new();
    if text[i..].starts_with('}') {
        i += 1;
    } else {
        loop {
            let mut it = serde_json::Deserializer::from_str(&text[i..]).into_iter::<String>();
            let key = it.next()?.ok()?;
            i = skip_ws(text, i + it.byte_offset());
            i = skip_ws(text, i + text[i..].starts_with(':').then_some(1)?);
            let n = value_len(&text[i..])?;
            out.push((key, &text[i..i + n]));
            i = skip_ws(text, i + n);
            match text[i..].chars().next()? {
                ',' => i = skip_ws(text, i + 1),
                '}' => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    text[i..].trim().is_empty().then_some(out)
}

/// The raw text of each item of the JSON array `text` (whitespace around it allowed);
/// None if `text` is not exactly one array.
pub fn array_items(text: &str) -> Option<Vec<&str>> {
    let mut i = skip_ws(text, 0);
    if !text[i..].starts_with('[') {
        return None;
    }
    i = skip_ws(text, i + 1);
    let mut out = Vec::new();
    if text[i..].starts_with(']') {
        i += 1;
    } else {
        loop {
            let n = value_len(&text[i..])?;
            out.push(&text[i..i + n]);
            i = skip_ws(text, i + n);
            match text[i..].chars().next()? {
                ',' => i = skip_ws(text, i + 1),
                ']' => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    text[i..].trim().is_empty().then_some(out)
}

/// A call written as a JSON object `{"name": ..., <args_key>: {...}}`, the arguments under
/// the first of `args_keys` present. Arguments may be missing or null (no arguments: `{}`),
/// an object, or a string holding a JSON object (some models write them so); anything
/// else is not a call.
pub fn call_from_object(text: &str, args_keys: &[&str]) -> Option<ToolCall> {
    let entries = object_entries(text)?;
    let name = entries.iter().find(|(k, _)| k == "name")?.1;
    let name: String = serde_json::from_str(name).ok()?;
    if name.is_empty() {
        return None;
    }
    let args = args_keys
        .iter()
        .find_map(|key| entries.iter().find(|(k, _)| k == key))
        .map(|(_, v)| *v);
    Some(ToolCall {
        name,
        arguments: arguments_text(args)?,
    })
}

/// A call's `arguments` string from the raw JSON of its arguments (None: absent).
pub fn arguments_text(raw: Option<&str>) -> Option<String> {
    let Some(raw) = raw else {
        return Some("{}".into());
    };
    match raw.trim_start().chars().next()? {
        '{' => Some(raw.to_string()),
        'n' if raw == "null" => Some("{}".into()),
        '"' => {
            let s: String = serde_json::from_str(raw).ok()?;
            let inner = s.trim();
            (inner.starts_with('{') && value_len(inner) == Some(inner.len()))
                .then(|| inner.to_string())
        }
        _ => None,
    }
}

/// The longest end of `text` that is the start of one of `markers` (held back in a
/// stream until the next piece tells whether the marker follows).
pub fn partial_marker_len(text: &str, markers: &[&str]) -> usize {
    markers
        .iter()
        .flat_map(|m| {
            (1..m.len())
                .rev()
                .find(|&n| m.is_char_boundary(n) && text.ends_with(&m[..n]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_are_scanned_to_their_end() {
        assert_eq!(
            scan_container(r#" {"a": [1, "}"]} tail"#),
            Scan::Complete(16)
        );
        assert_eq!(scan_container(r#"{"a": [1, "}"#), Scan::Incomplete);
        assert_eq!(scan_container("  "), Scan::Incomplete);
        assert_eq!(scan_container(r#"{"a" 1}"#), Scan::Invalid);
        assert_eq!(scan_container("12"), Scan::Invalid);
        assert_eq!(scan_container("[1,2]x"), Scan::Complete(5));
    }

    #[test]
    fn call_objects_keep_the_raw_arguments() {
        let c = call_from_object(
            r#" {"name": "f", "arguments": {"z": 1, "a": [true, null]}} "#,
            &["arguments"],
        )
        .unwrap();
        assert_eq!(c.name, "f");
        assert_eq!(c.arguments, r#"{"z": 1, "a": [true, null]}"#);
        let c = call_from_object(
            r#"{"parameters":{"x":1.5},"name":"g"}"#,
            &["arguments", "parameters"],
        )
        .unwrap();
        assert_eq!(
            (c.name.as_str(), c.arguments.as_str()),
            ("g", r#"{"x":1.5}"#)
        );
        let c = call_from_object(r#"{"name":"h"}"#, &["arguments"]).unwrap();
        assert_eq!(c.arguments, "{}");
        let c =
            call_from_object(r#"{"name":"h","arguments":"{\"a\": 1}"}"#, &["arguments"]).unwrap();
        assert_eq!(c.arguments, r#"{"a": 1}"#);
        for bad in [
            r#"{"name": 3}"#,
            r#"{"arguments": {}}"#,
            r#"{"name": "", "arguments": {}}"#,
            r#"{"name": "f", "arguments": [1]}"#,
            r#"{"name": "f", "arguments": "not json"}"#,
            r#"{"name": "f", "arguments": {}} x"#,
            r#"{"name": "f", "arguments": {}"#,
            r#"{"name": "f",}"#,
            "",
        ] {
            assert_eq!(call_from_object(bad, &["arguments"]), None, "{bad}");
        }
    }

    #[test]
    fn array_items_are_raw() {
        assert_eq!(
            array_items(r#" [ {"a": 1} , 2,"x"] "#),
            Some(vec![r#"{"a": 1}"#, "2", r#""x""#])
        );
        assert_eq!(array_items("[]"), Some(vec![]));
        assert_eq!(array_items("[1,]"), None);
        assert_eq!(array_items("[1] 2"), None);
    }

    #[test]
    fn growing_scans_agree_with_whole_scans() {
        let texts = [
            r#" {"a": [1, "}\"]"], "b": {}} tail"#,
            r#"[{"x": "[", "y": "\\"}]"#,
            "  x",
            r#"{"a": "#,
            "",
        ];
        for t in texts {
            let whole = GrowingScan::default().scan(t);
            for i in (0..=t.len()).filter(|&i| t.is_char_boundary(i)) {
                let mut g = GrowingScan::default();
                let first = g.scan(&t[..i]);
                let got = if first == Scan::Incomplete {
                    g.scan(t)
                } else {
                    first
                };
                assert_eq!(got, whole, "{t:?} at {i}");
            }
            if let Scan::Complete(n) = whole {
                assert_eq!(scan_container(t), Scan::Complete(n), "{t:?}");
            }
        }
        let mut searched = 0;
        assert_eq!(
            find_growing("ab</tool", "</tool_call>", &mut searched),
            None
        );
        assert_eq!(
            find_growing("ab</tool_call>", "</tool_call>", &mut searched),
            Some(2)
        );
    }

    #[test]
    fn partial_markers() {
        assert_eq!(partial_marker_len("ab<tool", &["<tool_call>"]), 5);
        assert_eq!(partial_marker_len("ab<tool_call>", &["<tool_call>"]), 0);
        assert_eq!(partial_marker_len("x[", &["[TOOL_CALLS]", "[ARGS]"]), 1);
    }
}
