//! A request's constraint as an llguidance grammar.
use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

use crate::sampling::StructuredOutput;

/// JSON layout when the schema does not choose its own (`x-guidance`): one space after `,`
/// and `:` and no other whitespace. llguidance's default (and vLLM's, unless
/// `--structured-outputs-config.disable_any_whitespace`) lets whitespace run free between
/// tokens, where a small model can emit newlines until `max_tokens`; the fixed layout is
/// still what models write by habit (`{"a": 1, "b": 2}`), so they finish.
pub fn json_layout() -> Value {
    json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// The grammar of `spec`; Err names what is wrong with the spec itself.
pub fn top_level(spec: &StructuredOutput) -> Result<TopLevelGrammar, String> {
    Ok(match spec {
        StructuredOutput::JsonSchema(schema) => {
            TopLevelGrammar::from_json_schema(with_layout(schema))
        }
        StructuredOutput::JsonObject => {
            TopLevelGrammar::from_json_schema(with_layout(&json!({"type": "object"})))
        }
        StructuredOutput::Regex(rx) => TopLevelGrammar::from_regex(rx),
        StructuredOutput::Choice(choices) => {
            if choices.is_empty() {
                return Err("the list of choices is empty; give at least one".into());
            }
            let alternatives: Vec<String> =
                choices.iter().map(|c| regex_syntax::escape(c)).collect();
            TopLevelGrammar::from_regex(&alternatives.join("|"))
        }
        StructuredOutput::Grammar(g) => {
            if g.trim().is_empty() {
                return Err("the grammar is empty".into());
            }
            TopLevelGrammar::from_lark(g.clone())
        }
    })
}

/// `schema` with the compact layout added, unless it sets `x-guidance` itself (the server
/// puts `guided_whitespace_pattern` there). Only an object schema can carry options.
fn with_layout(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(json_layout);
    }
    schema
}
