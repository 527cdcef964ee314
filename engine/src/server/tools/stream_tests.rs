//! Every parser, fed each output of its corpus cut at every char boundary (in two, char by
//! char, and in three for the short ones), streams to exactly the whole output's parse.
use super::{parse_whole, ToolDelta, ToolParserName};

fn streamed(name: ToolParserName, pieces: &[&str]) -> ToolDelta {
    let mut p = name.parser();
    let mut out = ToolDelta::default();
    for piece in pieces {
        out.append(p.push(piece));
    }
    out.append(p.finish());
    out
}

/// Outputs every parser must read the same whole and streamed: calls, content around them,
/// broken and cut-off calls, markers in prose, non-ASCII text and replacement characters
/// (a detokenizer's stand-in for bytes that are not UTF-8).
const COMMON: &[&str] = &[
    "",
    " ",
    "Plain answer, no tools.\n",
    "é ü 漢字 🙂 \u{fffd}\u{fffd} done",
    "{",
    "[",
    "<",
    "{\"name\": \"f\", \"arguments\": {\"a\": 1}}",
    "[{\"name\": \"f\", \"arguments\": {}}]",
];

fn corpus(name: ToolParserName) -> Vec<String> {
    let own: &[&str] = match name {
        ToolParserName::Hermes => &[
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "Let me look.\n\n<tool_call>{\"name\": \"a\", \"arguments\": {\"q\": \"</tool_call>\"}}</tool_call>\n<tool_call>{\"name\": \"b\"}</tool_call>\nDone 🙂",
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}",
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": ",
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": }</tool_call> after",
            "x <tool_call>just prose</tool_call> y",
            "<tool_call>oops <tool_call>{\"name\": \"f\"}</tool_call>",
            "<tool_call>{\"a\": 1}</tool_call><tool_call>{\"name\": \"é\", \"arguments\": {\"漢\": \"🙂\"}}</tool_call>",
            "a < b <tool_ca ll> </tool_call> <tool_call",
            "<tool_call></tool_call>",
            "  <tool_call>  {\"name\":\"f\",\"arguments\":\"{\\\"x\\\": 2}\"}  </tool_call>  ",
        ],
        ToolParserName::Llama3Json => &[
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            "{\"name\": \"a\", \"parameters\": {\"s\": \"}{;\"}}; {\"name\": \"b\", \"parameters\": {}}",
            "  {\"name\": \"f\", \"arguments\": {\"x\": [1, {\"y\": null}]}}  ",
            "{\"name\": \"f\", \"parameters\": {}} Done.",
            "{\"name\": \"f\", \"parameters\": {}}; trailing",
            "{\"name\": \"f\", \"parameters\": {\"x\": ",
            "{\"not\": \"a call\"}",
            "<|python_tag|>",
            "<|python_ta",
            "<|pyth0n_tag|>{}",
            "The weather is {\"name\": \"f\"}",
        ],
        ToolParserName::Mistral => &[
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]",
            "Sure.\n[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"s\": \"]\"}}, {\"name\": \"b\", \"arguments\": {}}] ok",
            "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[ARGS]{}",
            "[TOOL_CALLS]f[ARGS]{\"a\": \"[ARGS]\"} then text",
            "[TOOL_CALLS]get weather[ARGS]{}",
            "[TOOL_CALLS]f[ARGS]{\"a\": ",
            "[TOOL_CALLS]f[AR",
            "[TOOL_CALLS]f[ARGS][1]",
            "[TOOL_CALLS] [{\"arguments\": {}}] [TOOL_CALLS]g[ARGS]{}",
            "[TOOL_CALLS]",
            "plain [TOOL",
            "[TOOL_CALLS]é[ARGS]{}",
        ],
        ToolParserName::Pythonic => &[
            "[get_weather(city='Paris'), t()]",
            " <|python_start|>[f(a=1, b=\"x\")]<|python_end|> ",
            "[f(x=[1, 2.5], y={'k': (True, None)}, z='it\\'s é')]",
            "[f(a=1)] and more",
            "[f(a=1)",
            "<|python_sta",
            "The answer is [f(a=1)]",
            "[f(a='unterminated)]",
        ],
    };
    own.iter().chain(COMMON).map(|s| s.to_string()).collect()
}

#[test]
fn streams_cut_anywhere_add_up_to_the_whole() {
    for name in [
        ToolParserName::Hermes,
        ToolParserName::Llama3Json,
        ToolParserName::Mistral,
        ToolParserName::Pythonic,
    ] {
        for text in corpus(name) {
            let want = parse_whole(name, &text);
            for call in &want.calls {
                serde_json::from_str::<serde_json::Value>(&call.arguments)
                    .unwrap_or_else(|e| panic!("{name:?} {text:?}: arguments not JSON: {e}"));
            }
            let cuts: Vec<usize> = (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            for &i in &cuts {
                let got = streamed(name, &[&text[..i], &text[i..]]);
                assert_eq!(got, want, "{name:?} {text:?} cut at {i}");
            }
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(streamed(name, &pieces), want, "{name:?} {text:?} by char");
            if text.len() <= 40 {
                for &i in &cuts {
                    for &j in cuts.iter().filter(|&&j| j >= i) {
                        let got = streamed(name, &[&text[..i], &text[i..j], &text[j..]]);
                        assert_eq!(got, want, "{name:?} {text:?} cut at {i}, {j}");
                    }
                }
            }
        }
    }
}

/// Content is released as soon as no marker can be in it.
#[test]
fn content_is_not_held_longer_than_a_marker_needs() {
    let mut p = ToolParserName::Hermes.parser();
    assert_eq!(p.push("Hello <").content, "Hello");
    assert_eq!(p.push("b> and").content, " <b> and");
    let mut p = ToolParserName::Llama3Json.parser();
    assert_eq!(p.push("Hi").content, "Hi");
    let mut p = ToolParserName::Mistral.parser();
    assert_eq!(p.push("ok [TOOL").content, "ok");
}

#[test]
fn unknown_names_list_the_known_ones() {
    assert_eq!("hermes".parse(), Ok(ToolParserName::Hermes));
    assert_eq!("llama3_json".parse(), Ok(ToolParserName::Llama3Json));
    let e = "granite".parse::<ToolParserName>().unwrap_err();
    assert!(
        e.contains("`granite`") && e.contains("hermes, llama3_json, mistral, pythonic"),
        "{e}"
    );
    let id = ToolParserName::Mistral.call_id();
    assert!(
        id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "{id}"
    );
    let id = ToolParserName::Hermes.call_id();
    assert!(
        id.starts_with("chatcmpl-tool-") && id.len() == 14 + 32,
        "{id}"
    );
}

/// Random outputs built from the pieces calls are made of (markers, brackets, quotes, keys,
/// separators, non-ASCII text): every parser, and the `required` reader, reads each the
/// same whole and streamed, never panics, and every call it finds has JSON arguments.
#[test]
fn random_outputs_of_call_pieces_stream_like_the_whole() {
    const PIECES: &[&str] = &[
        "<tool_call>",
        "</tool_call>",
        "[TOOL_CALLS]",
        "[ARGS]",
        "<|python_tag|>",
        "<|python_start|>",
        "{",
        "}",
        "[",
        "]",
        "(",
        ")",
        "\"name\"",
        "\"arguments\"",
        "\"parameters\"",
        ": ",
        ":",
        ", ",
        ",",
        ";",
        "\"f\"",
        "\"é\"",
        "f",
        "x=",
        "'s'",
        "1",
        "{}",
        "{\"name\": \"f\", \"arguments\": {\"a\": [1]}}",
        "[{\"name\": \"g\", \"parameters\": {}}",
        "f(x=1)",
        "g[ARGS]{\"b\": \"}\"}",
        " ",
        "\n",
        "é",
        "🙂",
        "\\",
        "\"",
        "<",
        "[TOOL",
        "</tool",
        "\u{fffd}",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as usize) % n
    };
    type MakeParser = fn() -> Box<dyn super::ToolCallParser>;
    let parsers: Vec<(&str, MakeParser)> = vec![
        ("hermes", || ToolParserName::Hermes.parser()),
        ("llama3_json", || ToolParserName::Llama3Json.parser()),
        ("mistral", || ToolParserName::Mistral.parser()),
        ("pythonic", || ToolParserName::Pythonic.parser()),
        ("required", || {
            Box::new(super::required::RequiredParser::default())
        }),
    ];
    let mut found = 0;
    for _ in 0..2000 {
        let len = next(14);
        let text: String = (0..len).map(|_| PIECES[next(PIECES.len())]).collect();
        for (name, make) in &parsers {
            let run = |pieces: &[&str]| {
                let mut p = make();
                let mut out = ToolDelta::default();
                for piece in pieces {
                    out.append(p.push(piece));
                }
                out.append(p.finish());
                out
            };
            let want = run(&[&text]);
            found += want.calls.len();
            for call in &want.calls {
                assert!(
                    serde_json::from_str::<serde_json::Value>(&call.arguments)
                        .is_ok_and(|v| v.is_object()),
                    "{name} {text:?}: {call:?}"
                );
            }
            for i in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                assert_eq!(
                    run(&[&text[..i], &text[i..]]),
                    want,
                    "{name} {text:?} cut at {i}"
                );
            }
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(run(&pieces), want, "{name} {text:?} by char");
        }
    }
    assert!(found > 80, "only {found} calls in the random outputs");
}

/// A long call streamed a byte at a time costs linear time: each piece is read once
/// (a parser rescanning its whole call on every piece took seconds here).
#[test]
fn long_calls_stream_in_linear_time() {
    let body = "x".repeat(400_000);
    let outputs = [
        (
            ToolParserName::Hermes,
            format!(
                "<tool_call>{{\"name\": \"w\", \"arguments\": {{\"s\": \"{body}\"}}}}</tool_call>"
            ),
        ),
        (
            ToolParserName::Llama3Json,
            format!("{{\"name\": \"w\", \"parameters\": {{\"s\": \"{body}\"}}}}"),
        ),
        (
            ToolParserName::Mistral,
            format!("[TOOL_CALLS]w[ARGS]{{\"s\": \"{body}\"}}"),
        ),
        (
            ToolParserName::Mistral,
            format!("[TOOL_CALLS][{{\"name\": \"w\", \"arguments\": {{\"s\": \"{body}\"}}}}]"),
        ),
    ];
    for (name, text) in outputs {
        let start = std::time::Instant::now();
        let mut p = name.parser();
        let mut out = ToolDelta::default();
        for chunk in text.as_bytes().chunks(4) {
            out.append(p.push(std::str::from_utf8(chunk).unwrap()));
        }
        out.append(p.finish());
        assert_eq!(out.calls.len(), 1, "{name:?}");
        assert_eq!(out.calls[0].arguments.len(), body.len() + 9, "{name:?}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "{name:?}: {:?}",
            start.elapsed()
        );
    }
}
