//! Chat templates: the Jinja templates of tokenizer_config.json, rendered with minijinja the
//! way transformers renders them (trim_blocks, lstrip_blocks, Python string methods,
//! `raise_exception`, `tojson`, `strftime_now`, `bos_token` / `eos_token`).
use anyhow::Result;
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// The most template instructions (minijinja "fuel") one rendering may execute. Real chat
/// templates spend a few dozen to a few hundred per message (the tests measure the ones we
/// ship against), so this covers conversations far longer than any context, while a
/// template that loops without end is stopped after about a second of CPU.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// Why a chat template produced no prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum RenderError {
    /// The model has no template and none was given.
    NoTemplate,
    /// The template failed: syntax, `raise_exception`, a bad value.
    Template(String),
    /// Rendering used up its TEMPLATE_FUEL instructions.
    OutOfFuel { fuel: u64 },
    /// The rendered text grew past `limit` bytes (the caller's bound; see `render`).
    TooLong { limit: usize },
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::NoTemplate => write!(
                f,
                "this model's tokenizer has no chat template; pass one explicitly (e.g. --chat-template FILE) or send plain prompts"
            ),
            RenderError::Template(m) => write!(f, "chat template failed: {m}"),
            RenderError::OutOfFuel { fuel } => write!(
                f,
                "chat template failed: rendering stopped at the limit of {fuel} template \
                 instructions (the work one rendering may do); the template loops too much \
                 for these messages"
            ),
            RenderError::TooLong { limit } => write!(
                f,
                "the rendered chat prompt is longer than {limit} bytes"
            ),
        }
    }
}

impl std::error::Error for RenderError {}

/// The rendered text, refusing to grow past `limit` bytes: a template can write far more
/// than it reads (a string repeated in a loop), and the caller knows how long a prompt can
/// usefully be.
struct BoundedOutput {
    buf: Vec<u8>,
    limit: usize,
    over: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            self.over = true;
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];

/// A small strftime over a UTC unix time: the specifiers chat templates use for "today's
/// date" (%d %m %Y %y %b %B %a %A %H %M %S %%). Others are kept literally.
pub(crate) fn strftime_utc(secs: i64, fmt: &str) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let month = MONTHS[(m - 1) as usize];
    let weekday = WEEKDAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// JSON as Python's `json.dumps(x, ensure_ascii=False, indent=indent)` writes it, which is
/// what transformers' `tojson` gives templates: `", "` / `": "` separators (`","` with an
/// indent), keys in insertion order, no HTML escaping of `<` `>` `&` (minijinja's own
/// `tojson` escapes them, which would change prompts holding special tokens).
fn python_json(
    v: &minijinja::Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    let scalar = |j: serde_json::Value| j.to_string();
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number => match v.as_i64() {
            Some(i) if v.is_integer() => out.push_str(&i.to_string()),
            _ => {
                let f = f64::try_from(v.clone())?;
                out.push_str(&scalar(serde_json::Value::from(f)));
            }
        },
        K::String => out.push_str(&scalar(serde_json::Value::from(v.as_str().unwrap_or("")))),
        K::Map => {
            let keys: Vec<minijinja::Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&scalar(serde_json::Value::from(k.to_string())));
                out.push_str(": ");
                python_json(&v.get_item(k)?, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        K::Seq | K::Iterable => {
            let items: Vec<minijinja::Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                python_json(it, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot serialize a value of kind {}", v.kind()),
            ))
        }
    }
    Ok(())
}

fn tojson_filter(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; output is always ensure_ascii=False in insertion order.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    python_json(&value, indent, 0, &mut out)?;
    Ok(out)
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    // transformers renders with trim_blocks and lstrip_blocks on.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson_filter);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        strftime_utc(now, &fmt)
    });
    env
}

/// Render `template` for `messages`, into at most `max_bytes` bytes of text. Template
/// errors (syntax, `raise_exception`) come back carrying the template's own message.
pub(crate) fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    max_bytes: Option<usize>,
) -> Result<String, RenderError> {
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    render_context(template, ctx, max_bytes)
}

/// The names a chat template's context always sets; `extra` variables may not replace them.
pub const RESERVED_TEMPLATE_VARIABLES: [&str; 4] = [
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

impl super::Tokenizer {
    /// The names a chat template's context always sets (see `render_chat_json`).
    pub const RESERVED_TEMPLATE_VARIABLES: [&'static str; 4] = RESERVED_TEMPLATE_VARIABLES;

    /// Render messages given as JSON objects (OpenAI's: `role`, `content`, and whatever
    /// else a turn carries, e.g. `tool_calls`, `tool_call_id`, `reasoning_content`), with
    /// `extra` variables in the template's context beside the usual ones (vLLM's
    /// `chat_template_kwargs`, `documents`, `reasoning_effort`). An `extra` name among
    /// RESERVED_TEMPLATE_VARIABLES is an error: the caller's own arguments set those.
    pub fn render_chat_json(
        &self,
        messages: &[serde_json::Value],
        extra: &serde_json::Map<String, serde_json::Value>,
        add_generation_prompt: bool,
        template_override: Option<&str>,
        max_bytes: Option<usize>,
    ) -> Result<String, RenderError> {
        let template = template_override
            .or(self.chat_template())
            .ok_or(RenderError::NoTemplate)?;
        render_json(
            template,
            messages,
            extra,
            add_generation_prompt,
            self.bos_token(),
            self.eos_token(),
            max_bytes,
        )
    }
}

/// `render` for JSON messages and extra context variables (see `render_chat_json`).
pub(crate) fn render_json(
    template: &str,
    messages: &[serde_json::Value],
    extra: &serde_json::Map<String, serde_json::Value>,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    max_bytes: Option<usize>,
) -> Result<String, RenderError> {
    if let Some(k) = extra
        .keys()
        .find(|k| RESERVED_TEMPLATE_VARIABLES.contains(&k.as_str()))
    {
        return Err(RenderError::Template(format!(
            "`{k}` cannot be passed as a template variable: the request's own fields set it"
        )));
    }
    let messages: Vec<minijinja::Value> = messages.iter().map(template_message).collect();
    let base = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    let ctx = minijinja::context! { ..base, ..minijinja::Value::from_serialize(extra) };
    render_context(template, ctx, max_bytes)
}

/// A message for the template. A tool call's `function.arguments` given as a JSON string
/// (OpenAI's form) becomes a mapping, as transformers' tool-use templates expect, with its
/// keys in the order the string has them (as Python's json.loads keeps them), so `tojson`
/// writes the arguments back as the model wrote them.
fn template_message(m: &serde_json::Value) -> minijinja::Value {
    let Some(calls) = m.get("tool_calls").and_then(|c| c.as_array()) else {
        return minijinja::Value::from_serialize(m);
    };
    let calls: Vec<minijinja::Value> = calls
        .iter()
        .map(|call| {
            let args = call
                .get("function")
                .and_then(|f| f.get("arguments"))
                .and_then(|a| a.as_str())
                .and_then(|a| serde_json::from_str::<OrderedJson>(a).ok());
            match args {
                Some(OrderedJson(args)) => {
                    let mut function = vec![];
                    for (k, v) in call["function"].as_object().into_iter().flatten() {
                        let v = if k == "arguments" {
                            args.clone()
                        } else {
                            minijinja::Value::from_serialize(v)
                        };
                        function.push((k.clone(), v));
                    }
                    let mut out = vec![];
                    for (k, v) in call.as_object().into_iter().flatten() {
                        let v = if k == "function" {
                            OrderedMap::value(std::mem::take(&mut function))
                        } else {
                            minijinja::Value::from_serialize(v)
                        };
                        out.push((k.clone(), v));
                    }
                    OrderedMap::value(out)
                }
                None => minijinja::Value::from_serialize(call),
            }
        })
        .collect();
    let fields = m
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let v = if k == "tool_calls" {
                minijinja::Value::from(calls.clone())
            } else {
                minijinja::Value::from_serialize(v)
            };
            (k.clone(), v)
        })
        .collect();
    OrderedMap::value(fields)
}

/// A template mapping that keeps its keys in insertion order.
#[derive(Debug)]
struct OrderedMap(Vec<(String, minijinja::Value)>);

impl OrderedMap {
    fn value(entries: Vec<(String, minijinja::Value)>) -> minijinja::Value {
        minijinja::Value::from_object(OrderedMap(entries))
    }
}

impl minijinja::value::Object for OrderedMap {
    fn repr(self: &std::sync::Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Map
    }

    fn get_value(self: &std::sync::Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        let key = key.as_str()?;
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &std::sync::Arc<Self>) -> minijinja::value::Enumerator {
        minijinja::value::Enumerator::Values(
            self.0
                .iter()
                .map(|(k, _)| minijinja::Value::from(k.as_str()))
                .collect(),
        )
    }
}

/// JSON read into template values with object keys kept in order (serde_json's own maps
/// sort them).
struct OrderedJson(minijinja::Value);

impl<'de> Deserialize<'de> for OrderedJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedJson;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, v: bool) -> Result<OrderedJson, E> {
                Ok(OrderedJson(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<OrderedJson, E> {
                Ok(OrderedJson(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<OrderedJson, E> {
                Ok(OrderedJson(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<OrderedJson, E> {
                Ok(OrderedJson(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<OrderedJson, E> {
                Ok(OrderedJson(v.into()))
            }
            fn visit_unit<E>(self) -> Result<OrderedJson, E> {
                Ok(OrderedJson(minijinja::Value::from(())))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<OrderedJson, A::Error> {
                let mut items = vec![];
                while let Some(OrderedJson(v)) = a.next_element()? {
                    items.push(v);
                }
                Ok(OrderedJson(items.into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<OrderedJson, A::Error> {
                let mut entries: Vec<(String, minijinja::Value)> = vec![];
                while let Some((k, OrderedJson(v))) = a.next_entry::<String, OrderedJson>()? {
                    // A repeated key keeps its first place and its last value, as in Python.
                    match entries.iter_mut().find(|(e, _)| *e == k) {
                        Some(e) => e.1 = v,
                        None => entries.push((k, v)),
                    }
                }
                Ok(OrderedJson(OrderedMap::value(entries)))
            }
        }
        d.deserialize_any(V)
    }
}

fn render_context(
    template: &str,
    ctx: minijinja::Value,
    max_bytes: Option<usize>,
) -> Result<String, RenderError> {
    let env = environment();
    let mut out = BoundedOutput {
        buf: Vec::new(),
        limit: max_bytes.unwrap_or(usize::MAX),
        over: false,
    };
    let rendered = env
        .template_from_str(template)
        .and_then(|t| t.render_captured_to(ctx, &mut out).map(drop));
    match rendered {
        Ok(_) => String::from_utf8(out.buf)
            .map_err(|e| RenderError::Template(format!("the output is not UTF-8: {e}"))),
        Err(_) if out.over => Err(RenderError::TooLong { limit: out.limit }),
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(RenderError::OutOfFuel {
            fuel: TEMPLATE_FUEL,
        }),
        Err(e) => {
            // raise_exception's message is the useful part; keep minijinja's detail for syntax.
            let msg = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("template error").to_string(),
                _ => format!("{e:#}"),
            };
            Err(RenderError::Template(msg))
        }
    }
}

/// Fuel a rendering uses (for the tests that keep TEMPLATE_FUEL well above real templates).
#[cfg(test)]
pub(crate) fn fuel_used(template: &str, messages: &[ChatMessage]) -> u64 {
    let env = environment();
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => "<s>",
        eos_token => "</s>",
    };
    let t = env.template_from_str(template).unwrap();
    let captured = t.render_captured(ctx).unwrap();
    let used = captured.state().fuel_levels().unwrap().0;
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        assert_eq!(
            strftime_utc(0, "%d %b %Y %A %H:%M:%S"),
            "01 Jan 1970 Thursday 00:00:00"
        );
        // 2024-02-29 12:34:56 UTC was a Thursday.
        assert_eq!(
            strftime_utc(1_709_210_096, "%Y-%m-%d %a %B %y %%"),
            "2024-02-29 Thu February 24 %"
        );
    }

    #[test]
    fn python_methods_tojson_and_raise_exception() {
        let msgs = vec![ChatMessage::new("user", "  hi  ")];
        let out = render(
            "{% for m in messages %}{{ m.content.strip() }}|{{ m.role.startswith('us') }}|{{ m.content | tojson }}{% endfor %}",
            &msgs,
            false,
            None,
            None,
            None,
        )
        .unwrap();
        assert_eq!(out, r#"hi|True|"  hi  ""#);
        let e = render(
            "{{ raise_exception('Conversation roles must alternate') }}",
            &msgs,
            false,
            None,
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
        let e = render("{% for %}", &msgs, false, None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat template failed"), "{e}");
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let msgs = vec![ChatMessage::new("user", "<|im_start|>é \"q\"\n")];
        let out = render("{{ messages | tojson }}", &msgs, false, None, None, None).unwrap();
        // Python keeps insertion order: role before content, as ChatMessage declares them.
        assert_eq!(
            out,
            r#"[{"role": "user", "content": "<|im_start|>é \"q\"\n"}]"#
        );
        let out = render(
            "{{ {'a': [1, 2.5, none, true], 'b': {}} | tojson(indent=2) }}",
            &msgs,
            false,
            None,
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            out,
            "{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"b\": {}\n}"
        );
    }

    #[test]
    fn trim_blocks_and_special_token_variables() {
        let t = "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}>{{ eos_token }}{% endif %}";
        let out = render(
            t,
            &[
                ChatMessage::new("user", "a"),
                ChatMessage::new("system", "b"),
            ],
            true,
            Some("<s>"),
            Some("</s>"),
            None,
        )
        .unwrap();
        assert_eq!(out, "<s>\n[a]\n></s>");
    }

    #[test]
    fn runaway_templates_stop_at_the_fuel_limit() {
        let msgs = vec![ChatMessage::new("user", "hi")];
        // 2 * 10^8 loop steps: about 15 s of CPU without a limit.
        let t = "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(2) %}{% endfor %}{% endfor %}{% endfor %}";
        let start = std::time::Instant::now();
        let e = render(t, &msgs, true, None, None, None).unwrap_err();
        assert_eq!(
            e,
            RenderError::OutOfFuel {
                fuel: TEMPLATE_FUEL
            }
        );
        assert!(
            e.to_string()
                .contains("limit of 20000000 template instructions"),
            "{e}"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn output_stops_at_the_callers_bound() {
        let msgs = vec![ChatMessage::new("user", "hi")];
        let t = "{% for i in range(10000) %}{{ 'x' * 1000000 }}{% endfor %}";
        let e = render(t, &msgs, true, None, None, Some(5_000_000)).unwrap_err();
        assert_eq!(e, RenderError::TooLong { limit: 5_000_000 });
        let ok = render("{{ 'x' * 10 }}", &msgs, true, None, None, Some(10)).unwrap();
        assert_eq!(ok, "xxxxxxxxxx");
    }

    /// A Qwen3/Hermes-style template, in the shape of the real ones: assistant turns with
    /// `reasoning_content` and `tool_calls` (arguments as a mapping), `tool` turns grouped
    /// into a user turn, and `enable_thinking` from the request's template kwargs.
    const QWEN3_STYLE: &str = r#"{%- for m in messages %}
{%- if m.role == 'assistant' %}
{{- '<|im_start|>assistant\n' }}
{%- if m.reasoning_content %}{{ '<think>\n' + m.reasoning_content + '\n</think>\n\n' }}{% endif %}
{{- m.content }}
{%- for tc in m.tool_calls or [] %}
{%- set f = tc.function if tc.function else tc %}
{{- '\n<tool_call>\n{"name": "' + f.name + '", "arguments": ' }}
{%- if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}
{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif m.role == 'tool' %}
{{- '<|im_start|>user\n<tool_response id="' + m.tool_call_id + '">\n' + m.content + '\n</tool_response><|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}
{%- endif %}"#;

    #[test]
    fn json_messages_carry_tool_calls_reasoning_and_tool_results() {
        let msgs: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"role":"user","content":"Weather in Paris?"},
                {"role":"assistant","content":"","reasoning_content":"Use the tool.",
                 "tool_calls":[{"id":"c1","type":"function","function":{"name":"weather","arguments":{"city":"Paris"}}}]},
                {"role":"tool","tool_call_id":"c1","content":"21C"}]"#,
        )
        .unwrap();
        let none = serde_json::Map::new();
        let out = render_json(QWEN3_STYLE, &msgs, &none, true, None, None, None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nWeather in Paris?<|im_end|>\n\
             <|im_start|>assistant\n<think>\nUse the tool.\n</think>\n\n\n\
             <tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n\
             <|im_start|>user\n<tool_response id=\"c1\">\n21C\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("enable_thinking".into(), serde_json::Value::Bool(false));
        let off = render_json(QWEN3_STYLE, &msgs[..1], &kwargs, true, None, None, None).unwrap();
        assert!(
            off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            "{off:?}"
        );
        let on = render_json(QWEN3_STYLE, &msgs[..1], &none, true, None, None, None).unwrap();
        assert!(on.ends_with("<|im_start|>assistant\n"), "{on:?}");
    }

    #[test]
    fn string_arguments_become_mappings_with_their_keys_in_order() {
        let msgs = vec![serde_json::json!({"role": "assistant", "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w",
                "arguments": "{\"unit\": \"C\", \"city\": \"Paris\", \"days\": [1, {\"z\": 1, \"a\": 2}]}"}}]})];
        let none = serde_json::Map::new();
        let t = "{% for c in messages[0].tool_calls %}{{ c.function.arguments | tojson }}|\
                 {{ c.function.arguments.city }}|{{ c.id }}|{{ c.function.name }}\
                 {% for k in c.function.arguments %};{{ k }}{% endfor %}\
                 {% for k, v in c.function.arguments | items %},{{ k }}={{ v }}{% endfor %}\
                 |{{ c.function.arguments is mapping }}{% endfor %}";
        let out = render_json(t, &msgs, &none, false, None, None, None).unwrap();
        assert_eq!(
            out,
            r#"{"unit": "C", "city": "Paris", "days": [1, {"z": 1, "a": 2}]}|Paris|c1|w;unit;city;days,unit=C,city=Paris,days=[1, {"z": 1, "a": 2}]|True"#
        );
    }

    #[test]
    fn extra_variables_cannot_replace_the_reserved_ones() {
        let msgs = vec![serde_json::json!({"role": "user", "content": "hi"})];
        for name in RESERVED_TEMPLATE_VARIABLES {
            let mut kwargs = serde_json::Map::new();
            kwargs.insert(name.into(), serde_json::json!("x"));
            let e = render_json("{{ messages }}", &msgs, &kwargs, true, None, None, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{name}`")), "{e}");
        }
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("reasoning_effort".into(), serde_json::json!("low"));
        let out = render_json(
            "{{ reasoning_effort }}|{{ messages[0].content }}",
            &msgs,
            &kwargs,
            true,
            None,
            None,
            None,
        )
        .unwrap();
        assert_eq!(out, "low|hi");
    }

    /// Every template shipped with the test models, over a conversation of 2,000 turns,
    /// spends a small fraction of TEMPLATE_FUEL (at most 1/20): a budget that stops runaway
    /// templates never stops a real one.
    #[test]
    fn real_templates_use_a_small_part_of_the_fuel() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny");
        let msgs: Vec<ChatMessage> = std::iter::once(ChatMessage::new("system", "Be brief."))
            .chain((0..2000).map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                ChatMessage::new(role, format!("message number {i} with some words in it"))
            }))
            .collect();
        let mut checked = 0;
        for model in ["llama3", "mistral", "qwen2"] {
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(model).join("tokenizer_config.json")).unwrap(),
            )
            .unwrap();
            let Some(t) = cfg["chat_template"].as_str() else {
                continue;
            };
            let used = fuel_used(t, &msgs);
            eprintln!("{model}: {used} fuel for {} messages", msgs.len());
            assert!(used * 20 < TEMPLATE_FUEL, "{model}: {used}");
            checked += 1;
        }
        assert!(checked > 0, "no fixture has a chat template");
    }
}
