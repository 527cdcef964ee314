//! `mistral`: Mistral's tool calls after the `[TOOL_CALLS]` token (a special token: the
//! request keeps special tokens in its text), in either of Mistral's forms: a JSON array
//! `[{"name": ..., "arguments": {...}}, ...]` (tokenizers before v11), or v11's
//! `name[ARGS]{...}`, one call a `[TOOL_CALLS]`. Text before the first call is content.
use super::json::{array_items, call_from_object, partial_marker_len, GrowingScan, Scan};
use super::{MarkedContent, ToolCall, ToolCallParser, ToolDelta};

const MARK: &str = "[TOOL_CALLS]";
const ARGS_MARK: &str = "[ARGS]";

#[derive(Debug, Default)]
pub struct MistralParser {
    content: MarkedContent,
    /// After a `[TOOL_CALLS]`: the whitespace before it and the text since.
    call: Option<(String, String)>,
    /// The scan of the calls' JSON (the array, or one call's arguments).
    scan: GrowingScan,
}

enum Read {
    /// Calls read, and the bytes of the text they took.
    Calls(Vec<ToolCall>, usize),
    /// More text may complete the calls.
    Wait,
    NotCalls,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// The calls at the start of `body` (the text after `[TOOL_CALLS]`), `scan` following
/// their JSON as `body` grows.
fn read_calls(body: &str, at_end: bool, scan: &mut GrowingScan) -> Read {
    let t = body.trim_start();
    let lead = body.len() - t.len();
    let wait = if at_end { Read::NotCalls } else { Read::Wait };
    if t.is_empty() {
        return wait;
    }
    if t.starts_with('[') {
        return match scan.scan(body) {
            Scan::Complete(n) => {
                let calls: Option<Vec<ToolCall>> = array_items(&body[..n]).and_then(|items| {
                    items
                        .into_iter()
                        .map(|i| call_from_object(i, &["arguments"]))
                        .collect()
                });
                match calls {
                    Some(c) if !c.is_empty() => Read::Calls(c, n),
                    _ => Read::NotCalls,
                }
            }
            Scan::Incomplete => wait,
            Scan::Invalid => Read::NotCalls,
        };
    }
    let Some(p) = t.find(ARGS_MARK) else {
        let keep = partial_marker_len(t, &[ARGS_MARK]);
        return if t[..t.len() - keep].chars().all(is_name_char) {
            wait
        } else {
            Read::NotCalls
        };
    };
    let name = &t[..p];
    if name.is_empty() || !name.chars().all(is_name_char) {
        return Read::NotCalls;
    }
    let args = &t[p + ARGS_MARK.len()..];
    if !args.trim_start().is_empty() && !args.trim_start().starts_with('{') {
        return Read::NotCalls;
    }
    match scan.scan(args) {
        Scan::Complete(n) => Read::Calls(
            vec![ToolCall {
                name: name.to_string(),
                arguments: args[..n].trim_start().to_string(),
            }],
            lead + p + ARGS_MARK.len() + n,
        ),
        Scan::Incomplete => wait,
        Scan::Invalid => Read::NotCalls,
    }
}

impl MistralParser {
    fn feed(&mut self, text: &str, at_end: bool, out: &mut ToolDelta) {
        let mut pending = text.to_string();
        loop {
            let (ws, body) = match self.call.take() {
                Some((ws, mut body)) => {
                    body.push_str(&pending);
                    (ws, body)
                }
                None => match self.content.push(MARK, &pending, &mut out.content) {
                    Some(found) => {
                        self.scan = GrowingScan::default();
                        (found.ws, found.rest)
                    }
                    None => return,
                },
            };
            match read_calls(&body, at_end, &mut self.scan) {
                Read::Calls(calls, used) => {
                    out.calls.extend(calls);
                    self.content.after_call = true;
                    pending = body[used..].to_string();
                }
                Read::Wait => {
                    self.call = Some((ws, body));
                    return;
                }
                Read::NotCalls => {
                    out.content.push_str(&ws);
                    out.content.push_str(MARK);
                    pending = body;
                }
            }
        }
    }
}

impl ToolCallParser for MistralParser {
    fn push(&mut self, text: &str) -> ToolDelta {
        let mut out = ToolDelta::default();
        self.feed(text, false, &mut out);
        out
    }

    fn finish(&mut self) -> ToolDelta {
        let mut out = ToolDelta::default();
        self.feed("", true, &mut out);
        self.content.finish(&mut out.content);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_whole, ToolCall, ToolParserName::Mistral};

    #[test]
    fn both_forms() {
        let d = parse_whole(
            Mistral,
            "Sure. [TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"t\", \"arguments\": {}}]",
        );
        assert_eq!(d.content, "Sure.");
        assert_eq!(
            d.calls,
            vec![
                ToolCall::new("get_weather", r#"{"city": "Paris"}"#),
                ToolCall::new("t", "{}")
            ]
        );
        let d = parse_whole(
            Mistral,
            "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[ARGS]{}",
        );
        assert_eq!(d.content, "");
        assert_eq!(
            d.calls,
            vec![
                ToolCall::new("get_weather", r#"{"city": "Paris"}"#),
                ToolCall::new("get_time", "{}")
            ]
        );
        for text in [
            "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"a\": 1}",
            "[TOOL_CALLS]get weather[ARGS]{}",
            "[TOOL_CALLS]f[ARGS]{\"a\": ",
            "[TOOL_CALLS]f[ARGS][1]",
            "[TOOL_CALLS] [{\"arguments\": {}}]",
            "[TOOL_CALLS]",
            "plain [TOOL",
        ] {
            let d = parse_whole(Mistral, text);
            assert_eq!((d.content.as_str(), d.calls.len()), (text, 0), "{text}");
        }
    }
}
