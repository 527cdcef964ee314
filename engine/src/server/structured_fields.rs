//! The request fields that ask for structured output, read into one
//! `SamplingParams::structured_output`: OpenAI's `response_format` (`json_object`,
//! `json_schema` with `strict`), vLLM's `structured_outputs` object and its older
//! `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (with
//! `guided_whitespace_pattern` and `guided_decoding_backend`). A request may ask for one kind
//! of constraint; whether it compiles is checked at admission, where the tokenizer is known.
use serde_json::{json, Map, Value};

use super::super::error::ApiError;
use crate::sampling::StructuredOutput;

/// The fields as the request gave them (both endpoints have all of them).
#[derive(Default)]
pub struct StructuredFields<'a> {
    pub response_format: Option<&'a Value>,
    pub structured_outputs: Option<&'a Value>,
    pub guided_json: Option<&'a Value>,
    pub guided_regex: Option<&'a Value>,
    pub guided_choice: Option<&'a Value>,
    pub guided_grammar: Option<&'a Value>,
    pub guided_decoding_backend: Option<&'a Value>,
    pub guided_whitespace_pattern: Option<&'a Value>,
}

/// JSON layout options a request may set (vLLM's `disable_any_whitespace` and
/// `whitespace_pattern`); None keeps the engine's compact layout.
#[derive(Default)]
struct Layout {
    flexible: Option<bool>,
    pattern: Option<String>,
    /// vLLM's `disable_additional_properties`: objects without `additionalProperties` get
    /// `false`.
    closed_objects: bool,
}

/// The constraint these fields ask for (None: none), or a 400 naming the field.
pub fn structured_output(f: &StructuredFields) -> Result<Option<StructuredOutput>, ApiError> {
    let mut found: Vec<(String, StructuredOutput)> = Vec::new();
    let mut layout = Layout::default();
    if let Some(rf) = present(f.response_format) {
        if let Some(spec) = response_format(rf)? {
            found.push(("response_format".into(), spec));
        }
    }
    if let Some(so) = present(f.structured_outputs) {
        found.extend(structured_outputs(so, &mut layout)?);
    }
    if let Some(v) = present(f.guided_json) {
        found.push(("guided_json".into(), json_schema("guided_json", v)?));
    }
    if let Some(v) = present(f.guided_regex) {
        found.push((
            "guided_regex".into(),
            StructuredOutput::Regex(string("guided_regex", v)?),
        ));
    }
    if let Some(v) = present(f.guided_choice) {
        found.push(("guided_choice".into(), choice("guided_choice", v)?));
    }
    if let Some(v) = present(f.guided_grammar) {
        found.push((
            "guided_grammar".into(),
            StructuredOutput::Grammar(string("guided_grammar", v)?),
        ));
    }
    if let Some(v) = present(f.guided_whitespace_pattern) {
        layout.pattern = Some(string("guided_whitespace_pattern", v)?);
    }
    if let Some(v) = present(f.guided_decoding_backend) {
        backend("guided_decoding_backend", v)?;
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        return Err(ApiError::invalid(
            names[1],
            format!(
                "only one kind of structured output may be asked for, but this request gives {}; \
                 keep one",
                names.join(" and ")
            ),
        ));
    }
    Ok(found.pop().map(|(_, spec)| with_layout(spec, &layout)))
}

/// A field that is there and not null.
fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

/// OpenAI's `response_format`: `text` (no constraint), `json_object` or `json_schema`.
fn response_format(rf: &Value) -> Result<Option<StructuredOutput>, ApiError> {
    let param = "response_format";
    let obj = rf.as_object().ok_or_else(|| {
        ApiError::invalid(
            param,
            "`response_format` must be an object such as {\"type\": \"json_object\"}",
        )
    })?;
    let kind = obj.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            "response_format.type",
            "`response_format.type` is required: text, json_object or json_schema",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(StructuredOutput::JsonObject)),
        "json_schema" => {
            let js = obj
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema",
                        "`response_format.json_schema` is required with type json_schema: \
                     {\"name\": ..., \"schema\": {...}}",
                    )
                })?;
            if let Some(s) = js.get("strict").filter(|s| !s.is_null() && !s.is_boolean()) {
                return Err(ApiError::invalid(
                    "response_format.json_schema.strict",
                    format!("`strict` must be true or false, not {s}"),
                ));
            }
            // vLLM's name for the schema is `schema`; its Python model also reads `json_schema`.
            let schema = js
                .get("schema")
                .or_else(|| js.get("json_schema"))
                .filter(|s| !s.is_null())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema.schema",
                        "`response_format.json_schema.schema` is required: the JSON schema the \
                         output must match",
                    )
                })?;
            // The output is held to the schema whether `strict` is true or not, as in vLLM.
            Ok(Some(json_schema(
                "response_format.json_schema.schema",
                schema,
            )?))
        }
        "structural_tag" => Err(unsupported_kind("response_format", "structural_tag")),
        other => Err(ApiError::invalid(
            "response_format.type",
            format!(
                "unknown `response_format.type` `{other}`: use text, json_object or json_schema"
            ),
        )),
    }
}

/// vLLM's `structured_outputs` (`StructuredOutputsParams`): one of `json`, `regex`,
/// `choice`, `grammar`, `json_object`, with its layout options.
fn structured_outputs(
    so: &Value,
    layout: &mut Layout,
) -> Result<Vec<(String, StructuredOutput)>, ApiError> {
    let obj = so.as_object().ok_or_else(|| {
        ApiError::invalid(
            "structured_outputs",
            "`structured_outputs` must be an object such as {\"regex\": \"[0-9]+\"}",
        )
    })?;
    let mut found = Vec::new();
    for (key, v) in obj.iter().filter(|(_, v)| !v.is_null()) {
        let param = format!("structured_outputs.{key}");
        match key.as_str() {
            "json" => found.push((param.clone(), json_schema(&param, v)?)),
            "regex" => found.push((param.clone(), StructuredOutput::Regex(string(&param, v)?))),
            "choice" => found.push((param.clone(), choice(&param, v)?)),
            "grammar" => found.push((param.clone(), StructuredOutput::Grammar(string(&param, v)?))),
            "json_object" => {
                if boolean(&param, v)? {
                    found.push((param.clone(), StructuredOutput::JsonObject));
                }
            }
            "disable_any_whitespace" => layout.flexible = Some(!boolean(&param, v)?),
            "whitespace_pattern" => layout.pattern = Some(string(&param, v)?),
            // There is one backend and nothing to fall back from.
            "disable_fallback" => {
                boolean(&param, v)?;
            }
            "disable_additional_properties" => layout.closed_objects = boolean(&param, v)?,
            "structural_tag" => {
                return Err(unsupported_kind("structured_outputs", "structural_tag"))
            }
            "backend" | "_backend" => backend(&param, v)?,
            _ => {
                return Err(ApiError::invalid(
                    &param,
                    format!(
                        "unknown field `{key}` in `structured_outputs`: use json, regex, choice, \
                         grammar or json_object"
                    ),
                ))
            }
        }
    }
    Ok(found)
}

/// A JSON schema given as JSON or as a string holding JSON (vLLM takes both).
fn json_schema(param: &str, v: &Value) -> Result<StructuredOutput, ApiError> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(s).map_err(|e| {
            ApiError::invalid(
                param,
                format!("`{param}` is a string that is not JSON: {e}"),
            )
        })?,
        other => other.clone(),
    };
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be a JSON schema (an object), not {schema}"),
        ));
    }
    Ok(StructuredOutput::JsonSchema(schema))
}

fn choice(param: &str, v: &Value) -> Result<StructuredOutput, ApiError> {
    let items = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
        ApiError::invalid(
            param,
            format!("`{param}` must be a non-empty list of strings"),
        )
    })?;
    items
        .iter()
        .map(|c| c.as_str().map(String::from))
        .collect::<Option<Vec<_>>>()
        .map(StructuredOutput::Choice)
        .ok_or_else(|| ApiError::invalid(param, format!("`{param}` must be a list of strings")))
}

fn string(param: &str, v: &Value) -> Result<String, ApiError> {
    v.as_str()
        .map(String::from)
        .ok_or_else(|| ApiError::invalid(param, format!("`{param}` must be a string, not {v}")))
}

fn boolean(param: &str, v: &Value) -> Result<bool, ApiError> {
    v.as_bool().ok_or_else(|| {
        ApiError::invalid(param, format!("`{param}` must be true or false, not {v}"))
    })
}

/// vLLM's per-request backend choice: rvllm has one, llguidance (vLLM's `guidance`).
fn backend(param: &str, v: &Value) -> Result<(), ApiError> {
    match v.as_str() {
        Some("auto" | "guidance" | "llguidance") => Ok(()),
        _ => Err(ApiError::invalid(
            param,
            format!(
                "`{param}` {v} is not served: rvllm's structured output uses llguidance only \
                 (send auto or guidance, or leave it out)"
            ),
        )),
    }
}

fn unsupported_kind(param: &str, kind: &str) -> ApiError {
    let mut e = ApiError::invalid(
        param,
        format!(
            "`{param}`: `{kind}` structured output is not supported by rvllm; use a JSON schema, \
             regex, choice or grammar"
        ),
    );
    e.code = Some("unsupported_parameter");
    e
}

/// The layout options go into a JSON schema's `x-guidance` (llguidance's own options);
/// other kinds have no whitespace to set.
fn with_layout(spec: StructuredOutput, layout: &Layout) -> StructuredOutput {
    let spec = match spec {
        StructuredOutput::JsonSchema(mut s) if layout.closed_objects => {
            close_objects(&mut s);
            StructuredOutput::JsonSchema(s)
        }
        other => other,
    };
    if layout.flexible.is_none() && layout.pattern.is_none() {
        return spec;
    }
    let schema = match spec {
        StructuredOutput::JsonSchema(s) => s,
        StructuredOutput::JsonObject => json!({"type": "object"}),
        other => return other,
    };
    let Value::Object(mut map) = schema else {
        return StructuredOutput::JsonSchema(schema);
    };
    if !map.contains_key("x-guidance") {
        let mut opts = match crate::sampling::structured::json_layout() {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if let Some(flexible) = layout.flexible {
            opts.insert("whitespace_flexible".into(), json!(flexible));
            if flexible {
                // vLLM's flexible layout: llguidance's own separators, any whitespace between.
                opts.insert("item_separator".into(), json!(","));
                opts.insert("key_separator".into(), json!(":"));
            }
        }
        if let Some(p) = &layout.pattern {
            opts.insert("whitespace_pattern".into(), json!(p));
        }
        map.insert("x-guidance".into(), Value::Object(opts));
    }
    StructuredOutput::JsonSchema(Value::Object(map))
}

/// Every object schema (one with `properties`, or of type object) in `schema`, however deep,
/// that does not say `additionalProperties` gets `false`, as vLLM's
/// `disable_additional_properties` does.
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is_object = map.contains_key("properties")
                || map.get("type").and_then(Value::as_str) == Some("object");
            if is_object && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<Option<StructuredOutput>, ApiError> {
        let get = |k: &str| body.get(k);
        structured_output(&StructuredFields {
            response_format: get("response_format"),
            structured_outputs: get("structured_outputs"),
            guided_json: get("guided_json"),
            guided_regex: get("guided_regex"),
            guided_choice: get("guided_choice"),
            guided_grammar: get("guided_grammar"),
            guided_decoding_backend: get("guided_decoding_backend"),
            guided_whitespace_pattern: get("guided_whitespace_pattern"),
        })
    }

    #[test]
    fn each_field_gives_its_constraint() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let cases = [
            (json!({"response_format": {"type": "text"}}), None),
            (
                json!({"response_format": {"type": "json_object"}}),
                Some(StructuredOutput::JsonObject),
            ),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                Some(StructuredOutput::JsonSchema(schema.clone())),
            ),
            (
                json!({"guided_json": schema.to_string()}),
                Some(StructuredOutput::JsonSchema(schema.clone())),
            ),
            (
                json!({"guided_regex": "a+"}),
                Some(StructuredOutput::Regex("a+".into())),
            ),
            (
                json!({"guided_choice": ["x", "y"]}),
                Some(StructuredOutput::Choice(vec!["x".into(), "y".into()])),
            ),
            (
                json!({"guided_grammar": "start: \"a\""}),
                Some(StructuredOutput::Grammar("start: \"a\"".into())),
            ),
            (
                json!({"structured_outputs": {"regex": "b"}}),
                Some(StructuredOutput::Regex("b".into())),
            ),
            (
                json!({"structured_outputs": {"json_object": true}}),
                Some(StructuredOutput::JsonObject),
            ),
            (json!({"structured_outputs": {"json_object": false}}), None),
            (
                json!({"guided_regex": "a", "guided_decoding_backend": "guidance"}),
                Some(StructuredOutput::Regex("a".into())),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                parse(body.clone()).map_err(|e| e.message).unwrap(),
                want,
                "{body}"
            );
        }
    }

    #[test]
    fn layout_options_reach_the_schema() {
        let got =
            parse(json!({"guided_json": {"type": "object"}, "guided_whitespace_pattern": "[ ]?"}))
                .map_err(|e| e.message)
                .unwrap();
        let Some(StructuredOutput::JsonSchema(s)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(s["x-guidance"]["whitespace_pattern"], "[ ]?");
        let got = parse(
            json!({"structured_outputs": {"json_object": true, "disable_any_whitespace": false}}),
        )
        .map_err(|e| e.message)
        .unwrap();
        let Some(StructuredOutput::JsonSchema(s)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(s["x-guidance"]["whitespace_flexible"], true);
        let got = parse(
            json!({"structured_outputs": {"disable_additional_properties": true,
            "json": {"type": "object", "properties": {"a": {"properties": {}},
                     "b": {"type": "object", "additionalProperties": true}}}}}),
        )
        .map_err(|e| e.message)
        .unwrap();
        let Some(StructuredOutput::JsonSchema(s)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        assert_eq!(s["properties"]["b"]["additionalProperties"], true);
    }

    #[test]
    fn bad_or_conflicting_fields_are_400s_naming_them() {
        let cases = [
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                "guided_regex",
            ),
            (
                json!({"structured_outputs": {"regex": "a"}, "guided_choice": ["b"]}),
                "guided_choice",
            ),
            (
                json!({"structured_outputs": {"regex": "a", "json_object": true}}),
                "structured_outputs.json_object",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format.type",
            ),
            (json!({"response_format": "json"}), "response_format"),
            (json!({"guided_json": "{not json"}), "guided_json"),
            (json!({"guided_json": 3}), "guided_json"),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_choice": ["a", 1]}), "guided_choice"),
            (json!({"guided_regex": 5}), "guided_regex"),
            (
                json!({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}),
                "guided_decoding_backend",
            ),
            (
                json!({"structured_outputs": {"regexp": "a"}}),
                "structured_outputs.regexp",
            ),
            (
                json!({"structured_outputs": {"structural_tag": "{}"}}),
                "structured_outputs",
            ),
        ];
        for (body, param) in cases {
            let e = parse(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }
}
