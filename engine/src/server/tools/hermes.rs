//! `hermes`: calls written `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any
//! number of them, between content (Hermes 2 Pro and 3, Qwen2.5, Qwen3). A call left open
//! at the end of the output counts if its JSON is complete, as in vLLM.
use super::json::{call_from_object, find_growing, GrowingScan, Scan};
use super::{MarkedContent, ToolCallParser, ToolDelta};

const START: &str = "<tool_call>";
const END: &str = "</tool_call>";
const ARGS: &[&str] = &["arguments", "parameters"];

#[derive(Debug, Default)]
pub struct HermesParser {
    content: MarkedContent,
    /// Inside a call: the whitespace before its marker, and its text so far.
    call: Option<(String, String)>,
    /// How far the call's text was searched for the end marker and scanned.
    searched: usize,
    scan: GrowingScan,
}

impl HermesParser {
    fn feed(&mut self, text: &str, out: &mut ToolDelta) {
        let mut pending = text.to_string();
        loop {
            let (ws, body) = match self.call.take() {
                Some((ws, mut body)) => {
                    body.push_str(&pending);
                    (ws, body)
                }
                None => match self.content.push(START, &pending, &mut out.content) {
                    Some(found) => {
                        self.searched = 0;
                        self.scan = GrowingScan::default();
                        (found.ws, found.rest)
                    }
                    None => return,
                },
            };
            match find_growing(&body, END, &mut self.searched) {
                Some(p) => match call_from_object(&body[..p], ARGS) {
                    Some(call) => {
                        out.calls.push(call);
                        self.content.after_call = true;
                        pending = body[p + END.len()..].to_string();
                    }
                    // Not a call: the marker is content, and what follows it is read again.
                    None => pending = fall_back(ws, body, out),
                },
                // Only the first character can tell early that this is no call (a
                // GrowingScan sees nothing else as invalid): the rest waits for the end.
                None if self.scan.scan(&body) == Scan::Invalid => {
                    pending = fall_back(ws, body, out)
                }
                None => {
                    self.call = Some((ws, body));
                    return;
                }
            }
        }
    }
}

fn fall_back(ws: String, body: String, out: &mut ToolDelta) -> String {
    out.content.push_str(&ws);
    out.content.push_str(START);
    body
}

impl ToolCallParser for HermesParser {
    fn push(&mut self, text: &str) -> ToolDelta {
        let mut out = ToolDelta::default();
        self.feed(text, &mut out);
        out
    }

    fn finish(&mut self) -> ToolDelta {
        let mut out = ToolDelta::default();
        while let Some((ws, body)) = self.call.take() {
            match call_from_object(&body, ARGS) {
                Some(call) => {
                    out.calls.push(call);
                    self.content.after_call = true;
                }
                None => {
                    let body = fall_back(ws, body, &mut out);
                    self.feed(&body, &mut out);
                }
            }
        }
        self.content.finish(&mut out.content);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_whole, ToolCall, ToolParserName::Hermes};

    #[test]
    fn calls_and_content_as_vllm_reads_them() {
        let d = parse_whole(
            Hermes,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"t\", \"arguments\": {}}\n</tool_call>",
        );
        assert_eq!(d.content, "Let me check.");
        assert_eq!(
            d.calls,
            vec![
                ToolCall::new("get_weather", r#"{"city": "Paris"}"#),
                ToolCall::new("t", "{}")
            ]
        );
        // Open at the end but complete.
        let d = parse_whole(
            Hermes,
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}",
        );
        assert_eq!(
            (d.content.as_str(), d.calls),
            ("", vec![ToolCall::new("f", r#"{"a": 1}"#)])
        );
        // Broken JSON, cut-off JSON and non-calls stay content, as written.
        for text in [
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": }</tool_call> after",
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1",
            "x <tool_call>just prose</tool_call>",
            "<tool_call>{\"a\": 1}</tool_call>",
        ] {
            let d = parse_whole(Hermes, text);
            assert_eq!((d.content.as_str(), d.calls.len()), (text, 0), "{text}");
        }
        // A broken call does not hide a good one after it.
        let d = parse_whole(
            Hermes,
            "<tool_call>oops <tool_call>{\"name\": \"f\"}</tool_call>",
        );
        assert_eq!(d.content, "<tool_call>oops");
        assert_eq!(d.calls, vec![ToolCall::new("f", "{}")]);
        let d = parse_whole(Hermes, "No tools needed.\n");
        assert_eq!(d.content, "No tools needed.\n");
    }
}
