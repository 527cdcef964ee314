//! `llama3_json`: Llama 3.1–3.3's JSON tool calls. The output is calls when it begins
//! (after whitespace) with `<|python_tag|>` (a special token, so usually not in the text)
//! or `{`: JSON objects `{"name": ..., "parameters": {...}}` (or `"arguments"`), separated
//! by `;`. Any other output is content. From the first text that is not a call on, the
//! rest of the output is content, as written.
use super::json::{call_from_object, GrowingScan, Scan};
use super::{BufferedParser, ToolDelta};

const PYTHON_TAG: &str = "<|python_tag|>";
const ARGS: &[&str] = &["parameters", "arguments"];

#[derive(Debug, Default)]
enum State {
    /// Nothing but whitespace (or part of the python tag) yet.
    #[default]
    Start,
    /// Reading calls; `buf` from the output's start (or the last call's end).
    Calls,
    Content,
}

#[derive(Debug, Default)]
pub struct Llama3JsonParser {
    state: State,
    /// The text not yet released: from the output's start until the first call, then
    /// from the end of the last call.
    buf: String,
    /// Where the calls' JSON resumes in `buf` (after the tag and separators).
    pos: usize,
    /// The scan of the value at `pos`.
    scan: GrowingScan,
    calls: usize,
}

impl Llama3JsonParser {
    fn read(&mut self, out: &mut ToolDelta, at_end: bool) {
        loop {
            match self.state {
                State::Content => {
                    out.content.push_str(&std::mem::take(&mut self.buf));
                    return;
                }
                State::Start => {
                    let t = self.buf.trim_start();
                    let lead = self.buf.len() - t.len();
                    if let Some(rest) = t.strip_prefix(PYTHON_TAG) {
                        self.pos = self.buf.len() - rest.len();
                        self.state = State::Calls;
                    } else if t.starts_with('{') {
                        self.pos = lead;
                        self.state = State::Calls;
                    } else if !at_end && (t.is_empty() || PYTHON_TAG.starts_with(t)) {
                        return;
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Calls => {
                    let rest = &self.buf[self.pos..];
                    let t = rest.trim_start();
                    let skip = rest.len() - t.len();
                    if t.is_empty() {
                        if at_end && self.calls == 0 {
                            self.state = State::Content;
                            continue;
                        }
                        if at_end {
                            self.buf.clear();
                        }
                        return;
                    }
                    if self.calls > 0 && t.starts_with(';') {
                        self.pos += skip + 1;
                        self.scan = GrowingScan::default();
                        continue;
                    }
                    let object = t.starts_with('{');
                    match self.scan.scan(rest) {
                        Scan::Complete(n) if object => match call_from_object(&rest[..n], ARGS) {
                            Some(call) => {
                                out.calls.push(call);
                                self.calls += 1;
                                let end = self.pos + n;
                                self.buf.drain(..end);
                                self.pos = 0;
                                self.scan = GrowingScan::default();
                            }
                            None => self.state = State::Content,
                        },
                        Scan::Incomplete if !at_end => return,
                        _ => self.state = State::Content,
                    }
                }
            }
        }
    }
}

impl BufferedParser for Llama3JsonParser {
    fn buffer(&mut self) -> &mut String {
        &mut self.buf
    }

    fn step(&mut self, out: &mut ToolDelta, at_end: bool) {
        self.read(out, at_end)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_whole, ToolCall, ToolParserName::Llama3Json};

    #[test]
    fn json_calls_and_content() {
        let d = parse_whole(
            Llama3Json,
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"t\", \"parameters\": {}}",
        );
        assert_eq!(d.content, "");
        assert_eq!(
            d.calls,
            vec![
                ToolCall::new("get_weather", r#"{"city": "Paris"}"#),
                ToolCall::new("t", "{}")
            ]
        );
        let d = parse_whole(
            Llama3Json,
            " {\"name\": \"f\", \"arguments\": {\"x\": [1]}}\n",
        );
        assert_eq!(d.calls.len(), 1);
        assert_eq!(d.content, "");
        for text in [
            "The weather is {\"name\": \"f\"}",
            "{\"name\": \"f\", \"parameters\": {\"x\": ",
            "{\"not\": \"a call\"}",
            "{broken",
            "<|python_tag|>",
            "  ",
        ] {
            let d = parse_whole(Llama3Json, text);
            assert_eq!((d.content.as_str(), d.calls.len()), (text, 0), "{text}");
        }
        // Text after a call is content.
        let d = parse_whole(Llama3Json, "{\"name\": \"f\", \"parameters\": {}} Done.");
        assert_eq!((d.content.as_str(), d.calls.len()), (" Done.", 1));
    }
}
