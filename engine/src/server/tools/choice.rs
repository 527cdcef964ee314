//! One choice's tool calls in a chat response: its text after any reasoning is read by
//! the server's parser (`auto`), or is the constrained output of `required` (a JSON array
//! of calls) or of a named function (its arguments, streamed as they come). Calls get
//! their ids and indexes here, and the choice's finish reason follows vLLM's rules.
use serde_json::{json, Value};

use super::request::{ToolChoice, ToolRequest};
use super::required::RequiredParser;
use super::{default_call_id, ToolCallParser, ToolParserName};

/// A piece of one call in a stream: the first piece of a call has its id and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallDelta {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

impl CallDelta {
    /// OpenAI's stream form of the piece.
    pub fn to_json(&self) -> Value {
        let mut function = serde_json::Map::new();
        if let Some(n) = &self.name {
            function.insert("name".into(), n.clone().into());
        }
        function.insert("arguments".into(), self.arguments.clone().into());
        let mut v = json!({"index": self.index});
        if let Some(id) = &self.id {
            v["id"] = id.clone().into();
            v["type"] = "function".into();
        }
        v["function"] = Value::Object(function);
        v
    }
}

/// A piece of a choice's text: content and pieces of calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChoiceDelta {
    pub content: String,
    pub calls: Vec<CallDelta>,
}

/// A whole call, as a response's `message.tool_calls` holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOut {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl CallOut {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// Add a stream's call pieces to the whole calls, as a client does.
pub fn accumulate(calls: &mut Vec<CallOut>, pieces: &[CallDelta]) {
    for p in pieces {
        if p.index == calls.len() {
            calls.push(CallOut {
                id: p.id.clone().unwrap_or_default(),
                name: p.name.clone().unwrap_or_default(),
                arguments: String::new(),
            });
        }
        if let Some(c) = calls.get_mut(p.index) {
            c.arguments.push_str(&p.arguments);
        }
    }
}

enum Mode {
    Parsed {
        parser: Box<dyn ToolCallParser>,
        ids: Option<ToolParserName>,
    },
    Named {
        name: String,
        started: bool,
        /// Whitespace at the end of the text so far: sent only if more text follows.
        held: String,
    },
}

/// The tool-call state of one choice.
pub struct ChoiceTools {
    mode: Mode,
    parallel: bool,
    made: usize,
}

impl ChoiceTools {
    /// None where the choice's text is all content: no tools, `tool_choice` none, or
    /// auto with an empty tool list or without a parser (refused before generation, see
    /// chat.rs).
    pub fn new(req: &ToolRequest, parser: Option<ToolParserName>) -> Option<ChoiceTools> {
        let mode = match &req.choice {
            ToolChoice::None => return None,
            // No tools to call (vLLM reads calls only where `tools` is non-empty).
            ToolChoice::Auto if req.tools.is_empty() => return None,
            ToolChoice::Auto => Mode::Parsed {
                parser: parser?.parser(),
                ids: parser,
            },
            ToolChoice::Required => Mode::Parsed {
                parser: Box::new(RequiredParser::default()),
                ids: None,
            },
            ToolChoice::Named(name) => Mode::Named {
                name: name.clone(),
                started: false,
                held: String::new(),
            },
        };
        Some(ChoiceTools {
            mode,
            parallel: req.parallel,
            made: 0,
        })
    }

    /// The next piece of the choice's content (after reasoning), the last one with `last`.
    pub fn push(&mut self, text: &str, last: bool) -> ChoiceDelta {
        let mut out = ChoiceDelta::default();
        match &mut self.mode {
            Mode::Parsed { parser, ids } => {
                let mut d = parser.push(text);
                if last {
                    d.append(parser.finish());
                }
                out.content = d.content;
                for call in d.calls {
                    // Without parallel calls only the first is kept (vLLM's rule).
                    if self.made > 0 && !self.parallel {
                        continue;
                    }
                    out.calls.push(CallDelta {
                        index: self.made,
                        id: Some(ids.map_or_else(default_call_id, |p| p.call_id())),
                        name: Some(call.name),
                        arguments: call.arguments,
                    });
                    self.made += 1;
                }
            }
            Mode::Named {
                name,
                started,
                held,
            } => {
                let mut buf = std::mem::take(held);
                buf.push_str(text);
                let body = if *started { &buf[..] } else { buf.trim_start() };
                let args = body.trim_end();
                if !args.is_empty() {
                    out.calls.push(CallDelta {
                        index: 0,
                        id: (!*started).then(default_call_id),
                        name: (!*started).then(|| name.clone()),
                        arguments: args.to_string(),
                    });
                    *started = true;
                    self.made = 1;
                }
                if !last {
                    *held = body[args.len()..].to_string();
                }
            }
        }
        out
    }

    /// The finish reason: `tool_calls` when calls were made (by the parser or for
    /// `required`) and the model stopped; a named function's call keeps the model's
    /// reason, as OpenAI does; an output cut by its length says so.
    pub fn finish_reason(&self, engine: &'static str) -> &'static str {
        let parsed = matches!(self.mode, Mode::Parsed { .. });
        if self.made > 0 && parsed && engine == "stop" {
            "tool_calls"
        } else {
            engine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::read_tools;
    use super::*;

    fn tools(choice: &str, parallel: bool) -> ChoiceTools {
        let t: Vec<Value> = serde_json::from_str(
            r#"[{"type":"function","function":{"name":"f"}},{"type":"function","function":{"name":"g"}}]"#,
        )
        .unwrap();
        let c: Value = serde_json::from_str(choice).unwrap();
        let req = read_tools(Some(&t), Some(&c), Some(parallel))
            .unwrap()
            .unwrap();
        ChoiceTools::new(&req, Some(ToolParserName::Hermes)).unwrap()
    }

    /// Whole and streamed (every char boundary, and char by char) give the same calls.
    fn run(choice: &str, parallel: bool, text: &str) -> (String, Vec<CallOut>, &'static str) {
        let whole = |pieces: &[&str]| {
            let mut t = tools(choice, parallel);
            let (mut content, mut calls) = (String::new(), Vec::new());
            for (i, p) in pieces.iter().enumerate() {
                let d = t.push(p, i + 1 == pieces.len());
                content.push_str(&d.content);
                accumulate(&mut calls, &d.calls);
            }
            for c in &mut calls {
                assert!(!c.id.is_empty());
                c.id.clear();
            }
            (content, calls, t.finish_reason("stop"))
        };
        let want = whole(&[text]);
        for i in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            assert_eq!(
                whole(&[&text[..i], &text[i..]]),
                want,
                "{text:?} cut at {i}"
            );
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(whole(&pieces), want, "{text:?} by char");
        want
    }

    fn out(name: &str, args: &str) -> CallOut {
        CallOut {
            id: String::new(),
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn required_named_and_auto_outputs() {
        let req = r#""required""#;
        let text = r#"[{"name": "f", "parameters": {"a": "é"}}, {"name": "g", "parameters": {}}]"#;
        assert_eq!(
            run(req, true, text),
            (
                String::new(),
                vec![out("f", r#"{"a": "é"}"#), out("g", "{}")],
                "tool_calls"
            )
        );
        assert_eq!(
            run(req, false, text),
            (String::new(), vec![out("f", r#"{"a": "é"}"#)], "tool_calls")
        );
        // Cut short: the complete calls, the rest as content.
        let cut = r#"[{"name": "f", "parameters": {}}, {"name": "g", "param"#;
        assert_eq!(
            run(req, true, cut),
            (
                r#", {"name": "g", "param"#.into(),
                vec![out("f", "{}")],
                "tool_calls"
            )
        );
        assert_eq!(run(req, true, "[{\"na").0, "[{\"na");
        let named = r#"{"type":"function","function":{"name":"g"}}"#;
        assert_eq!(
            run(named, true, " {\"x\": [1, 2]}\n"),
            (String::new(), vec![out("g", "{\"x\": [1, 2]}")], "stop")
        );
        assert_eq!(run(named, true, "  ").1, vec![]);
        let auto = r#""auto""#;
        assert_eq!(
            run(auto, true, "Hi <tool_call>{\"name\": \"f\"}</tool_call>"),
            ("Hi".into(), vec![out("f", "{}")], "tool_calls")
        );
        assert_eq!(run(auto, true, "Hi"), ("Hi".into(), vec![], "stop"));
    }

    #[test]
    fn wire_forms() {
        let d = CallDelta {
            index: 1,
            id: Some("chatcmpl-tool-1".into()),
            name: Some("f".into()),
            arguments: "{}".into(),
        };
        assert_eq!(
            d.to_json(),
            json!({"index": 1, "id": "chatcmpl-tool-1", "type": "function",
                   "function": {"name": "f", "arguments": "{}"}})
        );
        let d = CallDelta {
            index: 0,
            id: None,
            name: None,
            arguments: "1}".into(),
        };
        assert_eq!(
            d.to_json(),
            json!({"index": 0, "function": {"arguments": "1}"}})
        );
    }
}
