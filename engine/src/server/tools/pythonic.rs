//! `pythonic`: calls written as a Python list of calls, `[f(a=1), g(b="x")]` (Llama 3.2
//! and 4, ToolACE), the whole output (optionally between `<|python_start|>` and
//! `<|python_end|>`). Arguments are Python literals (strings, numbers, True, False, None,
//! lists, tuples, dicts) and become JSON. An output that is not such a list is content.
//! Whether it is one is known only at the end, so an output that begins with `[` is held
//! back until then.
use super::{ToolCall, ToolCallParser, ToolDelta};

const START: &str = "<|python_start|>";
const END: &str = "<|python_end|>";

#[derive(Debug, Default)]
pub struct PythonicParser {
    buf: String,
    /// Decided: the output is content (it does not begin like a list of calls).
    content: bool,
}

impl ToolCallParser for PythonicParser {
    fn push(&mut self, text: &str) -> ToolDelta {
        let mut out = ToolDelta::default();
        if self.content {
            out.content.push_str(text);
            return out;
        }
        self.buf.push_str(text);
        let t = self.buf.trim_start();
        let t = t.strip_prefix(START).map_or(t, str::trim_start);
        if t.is_empty() || t.starts_with('[') || START.starts_with(t) {
            return out;
        }
        self.content = true;
        out.content = std::mem::take(&mut self.buf);
        out
    }

    fn finish(&mut self) -> ToolDelta {
        let text = std::mem::take(&mut self.buf);
        let t = text.trim();
        let t = t.strip_prefix(START).unwrap_or(t);
        let t = t.strip_suffix(END).unwrap_or(t).trim();
        match parse_calls(t) {
            Some(calls) if !calls.is_empty() => ToolDelta {
                content: String::new(),
                calls,
            },
            _ => ToolDelta {
                content: text,
                calls: Vec::new(),
            },
        }
    }
}

/// `[f(a=1), g()]` → the calls; None if `text` is anything else.
fn parse_calls(text: &str) -> Option<Vec<ToolCall>> {
    let mut p = Py {
        s: text.as_bytes(),
        i: 0,
        text,
    };
    p.eat(b'[')?;
    let mut calls = Vec::new();
    loop {
        p.ws();
        if p.peek() == Some(b']') {
            p.i += 1;
            break;
        }
        let name = p.ident()?;
        p.ws();
        p.eat(b'(')?;
        let mut args = Vec::new();
        loop {
            p.ws();
            if p.peek() == Some(b')') {
                p.i += 1;
                break;
            }
            let key = p.ident()?;
            p.ws();
            p.eat(b'=')?;
            p.ws();
            args.push(format!("{}: {}", json_str(&key), p.value(0)?));
            p.ws();
            match p.next()? {
                b',' => {}
                b')' => break,
                _ => return None,
            }
        }
        calls.push(ToolCall {
            name,
            arguments: format!("{{{}}}", args.join(", ")),
        });
        p.ws();
        match p.next()? {
            b',' => {}
            b']' => break,
            _ => return None,
        }
    }
    p.ws();
    (p.i == p.s.len()).then_some(calls)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// A reader of Python literals, writing them as JSON text (the `", "` and `": "`
/// separators of Python's json.dumps, as vLLM writes arguments).
struct Py<'a> {
    s: &'a [u8],
    i: usize,
    text: &'a str,
}

/// Literals nest at most this deep (a hostile output must not exhaust the stack).
const MAX_DEPTH: usize = 64;

impl Py<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }
    fn ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn ident(&mut self) -> Option<String> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            self.i += 1;
        }
        let id = &self.text[start..self.i];
        (!id.is_empty() && !id.as_bytes()[0].is_ascii_digit()).then(|| id.to_string())
    }

    fn value(&mut self, depth: usize) -> Option<String> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'\'' | b'"' => self.string().map(|s| json_str(&s)),
            b'[' | b'(' => {
                let close = if self.next()? == b'[' { b']' } else { b')' };
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.peek() == Some(close) {
                        self.i += 1;
                        break;
                    }
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.next()? {
                        b',' => {}
                        c if c == close => break,
                        _ => return None,
                    }
                }
                Some(format!("[{}]", items.join(", ")))
            }
            b'{' => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        break;
                    }
                    if !matches!(self.peek()?, b'\'' | b'"') {
                        return None;
                    }
                    let key = json_str(&self.string()?);
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    items.push(format!("{key}: {}", self.value(depth + 1)?));
                    self.ws();
                    match self.next()? {
                        b',' => {}
                        b'}' => break,
                        _ => return None,
                    }
                }
                Some(format!("{{{}}}", items.join(", ")))
            }
            _ => {
                let start = self.i;
                while self.peek().is_some_and(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'_')
                }) {
                    self.i += 1;
                }
                match &self.text[start..self.i] {
                    "True" => Some("true".into()),
                    "False" => Some("false".into()),
                    "None" => Some("null".into()),
                    n => {
                        let v: serde_json::Number = serde_json::from_str(n).ok()?;
                        Some(v.to_string())
                    }
                }
            }
        }
    }

    /// A quoted string (single or double quotes, backslash escapes).
    fn string(&mut self) -> Option<String> {
        let q = self.next()?;
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.peek().is_some_and(|c| c != q && c != b'\\') {
                self.i += 1;
            }
            out.push_str(self.text.get(start..self.i)?);
            match self.next()? {
                c if c == q => return Some(out),
                _ => {
                    let c = self.next()?;
                    match c {
                        b'n' => out.push('\n'),
                        b't' => out.push('\t'),
                        b'r' => out.push('\r'),
                        b'0' => out.push('\0'),
                        b'u' => {
                            let hex = self.text.get(self.i..self.i + 4)?;
                            out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
                            self.i += 4;
                        }
                        b'\\' | b'\'' | b'"' => out.push(c as char),
                        _ => return None,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_whole, ToolCall, ToolParserName::Pythonic};

    #[test]
    fn python_calls_become_json() {
        let d = parse_whole(
            Pythonic,
            "[get_weather(city='Paris', days=3, units=\"c\"), t(), f(x=[1, 2.5, -3e2], y={'k': (True, None)}, z='it\\'s é')]",
        );
        assert_eq!(d.content, "");
        let got: Vec<(&str, &str)> = d
            .calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "get_weather",
                    r#"{"city": "Paris", "days": 3, "units": "c"}"#
                ),
                ("t", "{}"),
                (
                    "f",
                    r#"{"x": [1, 2.5, -300.0], "y": {"k": [true, null]}, "z": "it's é"}"#
                )
            ]
        );
        for (_, a) in &got {
            serde_json::from_str::<serde_json::Value>(a).unwrap();
        }
        let d = parse_whole(Pythonic, "<|python_start|>[f(a=1)]<|python_end|>");
        assert_eq!(d.calls, vec![ToolCall::new("f", r#"{"a": 1}"#)]);
        for text in [
            "The answer is [f(a=1)]",
            "[f(a=1)] and more",
            "[f(a=1)",
            "[f(1)]",
            "[1, 2]",
            "[]",
            "[f(a=undefined)]",
            "[f(a='unterminated)]",
            "",
        ] {
            let d = parse_whole(Pythonic, text);
            assert_eq!((d.content.as_str(), d.calls.len()), (text, 0), "{text}");
        }
    }
}
