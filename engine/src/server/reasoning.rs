//! `--reasoning-parser`: a reasoning model's thinking, written between `<think>` and
//! `</think>`, goes to the chat message's `reasoning_content` (and `reasoning`, vLLM's newer
//! name) instead of `content`, in whole responses and in stream deltas alike. The rules are
//! vLLM's parsers':
//! - `deepseek_r1`: the output is reasoning until `</think>`, whether or not the model wrote
//!   the opening `<think>` (R1's template puts it in the prompt), and content after it.
//! - `qwen3`: the same while thinking is on (Qwen3's default), and all content when the
//!   request turned it off with `chat_template_kwargs: {"enable_thinking": false}` (the
//!   template then closes an empty think block in the prompt).
//!
//! The first `<think>` before `</think>` is dropped from the reasoning. Output that ends
//! before `</think>` is all reasoning (the thinking was cut short). One splitter serves both
//! whole and streamed responses, so a stream's pieces always add up to the whole answer:
//! a delta ending in part of a tag holds that part back until the next delta settles it.
use std::str::FromStr;

use serde_json::{Map, Value};

const THINK_START: &str = "<think>";
const THINK_END: &str = "</think>";

/// The parsers served, by vLLM's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    DeepSeekR1,
    Qwen3,
}

impl ReasoningParser {
    pub const NAMES: [&'static str; 2] = ["deepseek_r1", "qwen3"];

    /// A splitter for one choice of a request rendered with `template_kwargs`.
    pub fn splitter(self, template_kwargs: &Map<String, Value>) -> ReasoningSplitter {
        let thinking = match self {
            ReasoningParser::DeepSeekR1 => true,
            ReasoningParser::Qwen3 => {
                template_kwargs.get("enable_thinking") != Some(&Value::Bool(false))
            }
        };
        ReasoningSplitter {
            in_reasoning: thinking,
            seen_start: false,
            held: String::new(),
        }
    }
}

impl FromStr for ReasoningParser {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deepseek_r1" => Ok(ReasoningParser::DeepSeekR1),
            "qwen3" => Ok(ReasoningParser::Qwen3),
            other => Err(format!(
                "unknown reasoning parser `{other}`; rvllm has {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// Text split into the model's reasoning and its answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl Split {
    fn append(&mut self, other: Split) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
    }
}

/// Splits one choice's output as it arrives (see the module comment).
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    in_reasoning: bool,
    seen_start: bool,
    /// The end of the text so far that may be the start of a tag: held back until more
    /// text (or the end) tells.
    held: String,
}

impl ReasoningSplitter {
    /// The split of `text`, the next piece of the output.
    pub fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        if !self.in_reasoning {
            out.content.push_str(text);
            return out;
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);
        let mut rest = buf.as_str();
        loop {
            let end = rest.find(THINK_END);
            let start = (!self.seen_start)
                .then(|| rest.find(THINK_START))
                .flatten()
                .filter(|&s| end.is_none_or(|e| s < e));
            if let Some(s) = start {
                out.reasoning.push_str(&rest[..s]);
                rest = &rest[s + THINK_START.len()..];
                self.seen_start = true;
                continue;
            }
            if let Some(e) = end {
                out.reasoning.push_str(&rest[..e]);
                out.content.push_str(&rest[e + THINK_END.len()..]);
                self.in_reasoning = false;
                return out;
            }
            break;
        }
        let keep = self.partial_tag_len(rest);
        out.reasoning.push_str(&rest[..rest.len() - keep]);
        self.held = rest[rest.len() - keep..].to_string();
        out
    }

    /// The end of the output: what was held back is reasoning after all.
    pub fn finish(&mut self) -> Split {
        Split {
            reasoning: std::mem::take(&mut self.held),
            content: String::new(),
        }
    }

    /// The longest end of `text` that begins a tag still to be looked for.
    fn partial_tag_len(&self, text: &str) -> usize {
        let tags: &[&str] = if self.seen_start {
            &[THINK_END]
        } else {
            &[THINK_END, THINK_START]
        };
        tags.iter()
            .flat_map(|tag| {
                (1..tag.len())
                    .rev()
                    .find(|&n| text.ends_with(&tag[..n]))
                    .into_iter()
            })
            .max()
            .unwrap_or(0)
    }
}

/// The split of a whole output.
pub fn split_whole(
    parser: ReasoningParser,
    template_kwargs: &Map<String, Value>,
    text: &str,
) -> Split {
    let mut s = parser.splitter(template_kwargs);
    let mut out = s.push(text);
    out.append(s.finish());
    out
}

/// A stream's piece, and at the end what the splitter held back.
pub fn split_piece(s: &mut ReasoningSplitter, text: &str, last: bool) -> Split {
    let mut out = s.push(text);
    if last {
        out.append(s.finish());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(p: ReasoningParser, text: &str) -> (String, String) {
        let s = split_whole(p, &Map::new(), text);
        (s.reasoning, s.content)
    }

    fn pair(r: &str, c: &str) -> (String, String) {
        (r.to_string(), c.to_string())
    }

    #[test]
    fn vllms_rules_on_whole_outputs() {
        use ReasoningParser::*;
        for p in [DeepSeekR1, Qwen3] {
            assert_eq!(
                whole(p, "<think>\nPlan.\n</think>\n\nAnswer."),
                pair("\nPlan.\n", "\n\nAnswer.")
            );
            // The opening tag came with the prompt.
            assert_eq!(whole(p, "Plan.</think>Answer."), pair("Plan.", "Answer."));
            // Cut off while thinking: all reasoning.
            assert_eq!(
                whole(p, "<think>Still thinking"),
                pair("Still thinking", "")
            );
            // Only the first closing tag ends the thinking; later tags are content.
            assert_eq!(
                whole(p, "a</think>b</think><think>c"),
                pair("a", "b</think><think>c")
            );
            // A second opening tag inside the reasoning is text.
            assert_eq!(whole(p, "<think>a<think>b</think>"), pair("a<think>b", ""));
            assert_eq!(whole(p, "x < y </thin"), pair("x < y </thin", ""));
        }
        let off: Map<String, Value> = serde_json::from_str(r#"{"enable_thinking":false}"#).unwrap();
        let s = split_whole(Qwen3, &off, "Answer. </think>");
        assert_eq!(
            (s.reasoning.as_str(), s.content.as_str()),
            ("", "Answer. </think>")
        );
        let s = split_whole(DeepSeekR1, &off, "Plan.</think>Answer.");
        assert_eq!(
            (s.reasoning.as_str(), s.content.as_str()),
            ("Plan.", "Answer.")
        );
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        assert_eq!("qwen3".parse(), Ok(ReasoningParser::Qwen3));
        assert_eq!("deepseek_r1".parse(), Ok(ReasoningParser::DeepSeekR1));
        let e = "granite".parse::<ReasoningParser>().unwrap_err();
        assert!(
            e.contains("`granite`") && e.contains("deepseek_r1, qwen3"),
            "{e}"
        );
    }

    fn streamed(p: ReasoningParser, kwargs: &Map<String, Value>, pieces: &[&str]) -> Split {
        let mut s = p.splitter(kwargs);
        let mut out = Split::default();
        for (i, piece) in pieces.iter().enumerate() {
            out.append(split_piece(&mut s, piece, i + 1 == pieces.len()));
        }
        out
    }

    /// Every output, cut at every char boundary (in two, and at every boundary at once, and
    /// in three for the short ones), streams to the same split as the whole output.
    #[test]
    fn streams_split_anywhere_add_up_to_the_whole() {
        let outputs = [
            "<think>\nPlan: add 2 and 2.\n</think>\n\nThe answer is 4.",
            "Plan.</think>Answer.",
            "<think>é ü 漢字 🙂</think>🙂 done",
            "<think>a < b and c </ d </thin k</think><think>x",
            "no tags at all < / > </",
            "<thi",
            "</think>",
            "<think></think>",
            "",
            "a</think>b</think>",
            "<<think>><</think>>",
        ];
        let off: Map<String, Value> = serde_json::from_str(r#"{"enable_thinking":false}"#).unwrap();
        for p in [ReasoningParser::DeepSeekR1, ReasoningParser::Qwen3] {
            for kwargs in [&Map::new(), &off] {
                for text in outputs {
                    let want = split_whole(p, kwargs, text);
                    let cuts: Vec<usize> = (0..=text.len())
                        .filter(|&i| text.is_char_boundary(i))
                        .collect();
                    for &i in &cuts {
                        let got = streamed(p, kwargs, &[&text[..i], &text[i..]]);
                        assert_eq!(got, want, "{p:?} {text:?} cut at {i}");
                    }
                    let chars: Vec<String> = text.chars().map(String::from).collect();
                    let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
                    assert_eq!(streamed(p, kwargs, &pieces), want, "{p:?} {text:?} by char");
                    if text.len() <= 24 {
                        for &i in &cuts {
                            for &j in cuts.iter().filter(|&&j| j >= i) {
                                let got =
                                    streamed(p, kwargs, &[&text[..i], &text[i..j], &text[j..]]);
                                assert_eq!(got, want, "{p:?} {text:?} cut at {i}, {j}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Pieces are released as soon as no tag can be in them: only a possible tag start waits.
    #[test]
    fn only_a_possible_tag_is_held_back() {
        let mut s = ReasoningParser::DeepSeekR1.splitter(&Map::new());
        assert_eq!(
            s.push("Thinking <"),
            Split {
                reasoning: "Thinking ".into(),
                content: "".into()
            }
        );
        assert_eq!(
            s.push("b>"),
            Split {
                reasoning: "<b>".into(),
                content: "".into()
            }
        );
        assert_eq!(
            s.push("ok</thi"),
            Split {
                reasoning: "ok".into(),
                content: "".into()
            }
        );
        assert_eq!(
            s.push("nk>Hi"),
            Split {
                reasoning: "".into(),
                content: "Hi".into()
            }
        );
        assert_eq!(
            s.push("</thi"),
            Split {
                reasoning: "".into(),
                content: "</thi".into()
            }
        );
    }
}
