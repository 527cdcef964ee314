//! The request side of tool calling: `tools`, `tool_choice` and `parallel_tool_calls`
//! read as vLLM reads them, and for `tool_choice` `required` or a named function the JSON
//! schema the output is constrained to (vLLM's shapes, so the same outputs are allowed).
use serde_json::{json, Map, Value};

use crate::server::error::ApiError;

/// Which tool calls the request allows or demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the output is all content (the tools still reach the chat template).
    None,
    /// The model decides; calls are found by the server's `--tool-call-parser`.
    Auto,
    /// At least one call: the output is constrained to a JSON array of calls.
    Required,
    /// A call of this function: the output is constrained to its arguments.
    Named(String),
}

/// A request's tools and what it asks of them.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    /// The tool definitions as sent, for the chat template.
    pub tools: Vec<Value>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): false keeps only the first call.
    pub parallel: bool,
}

const NAMED_USAGE: &str =
    "a named choice is written {\"type\": \"function\", \"function\": {\"name\": \"my_function\"}}";

/// Read `tools`, `tool_choice` and `parallel_tool_calls` (vLLM's rules: `tool_choice`
/// defaults to `auto` when there are tools and `none` otherwise; any choice but `none`
/// needs `tools`; `required` with an empty list means `none`; a named function must be one
/// of the tools). None: the request has neither tools nor a choice.
pub fn read_tools(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolRequest>, ApiError> {
    let tools = match tools {
        Some(t) => Some(check_tools(t)?),
        None => None,
    };
    let choice = match choice.filter(|c| !c.is_null()) {
        None if tools.as_ref().is_some_and(|t| !t.is_empty()) => ToolChoice::Auto,
        None => ToolChoice::None,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(c) => {
            let Some(list) = &tools else {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "When using `tool_choice`, `tools` must be set: send the function \
                     definitions in `tools`, or leave `tool_choice` out",
                ));
            };
            match c {
                Value::String(s) if s == "auto" => ToolChoice::Auto,
                // OpenAI's rule: `required` with no tools behaves as `none`.
                Value::String(s) if s == "required" && list.is_empty() => ToolChoice::None,
                Value::String(s) if s == "required" => ToolChoice::Required,
                Value::Object(o) => ToolChoice::Named(named_choice(o, list)?),
                other => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!(
                            "Invalid value for `tool_choice`: {other}; only named tools, \
                             \"none\", \"auto\" or \"required\" are supported"
                        ),
                    ))
                }
            }
        }
    };
    if tools.is_none() && choice == ToolChoice::None {
        return Ok(None);
    }
    Ok(Some(ToolRequest {
        tools: tools.unwrap_or_default(),
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

fn named_choice(o: &Map<String, Value>, tools: &[Value]) -> Result<String, ApiError> {
    let bad = |m: String| ApiError::invalid("tool_choice", format!("{m}; {NAMED_USAGE}"));
    if let Some(t) = o.get("type").filter(|t| t.as_str() != Some("function")) {
        return Err(bad(format!(
            "`tool_choice.type` must be \"function\", got {t}"
        )));
    }
    let function = o
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("`tool_choice.function` must be an object".into()))?;
    let name = match function.get("name") {
        Some(Value::String(n)) if !n.is_empty() => n,
        _ => {
            return Err(bad(
                "`tool_choice.function.name` must be a function's name".into()
            ))
        }
    };
    if !tools.iter().any(|t| tool_name(t) == Some(name)) {
        return Err(ApiError::invalid(
            "tool_choice",
            format!(
                "The tool specified in `tool_choice` (`{name}`) does not match any of the \
                 specified `tools`"
            ),
        ));
    }
    Ok(name.clone())
}

fn tool_name(tool: &Value) -> Option<&String> {
    match tool.get("function")?.get("name")? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

fn tool_parameters(tool: &Value) -> Option<&Value> {
    tool.get("function")?
        .get("parameters")
        .filter(|p| !p.is_null())
}

/// Each tool must be `{"type": "function", "function": {"name": ..., "description"?,
/// "parameters"?: {...}}}`.
fn check_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    for (i, t) in tools.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        let o = t.as_object().ok_or_else(|| {
            ApiError::invalid(
                at(""),
                "a tool is an object: {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )
        })?;
        if let Some(k) = o.get("type").filter(|k| k.as_str() != Some("function")) {
            return Err(ApiError::invalid(
                at(".type"),
                format!("only tools of type \"function\" are served, got {k}"),
            ));
        }
        let f = o
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                ApiError::invalid(
                    at(".function"),
                    "a tool needs a `function` object with the function's `name`",
                )
            })?;
        match f.get("name") {
            Some(Value::String(n)) if !n.is_empty() => {}
            _ => {
                return Err(ApiError::invalid(
                    at(".function.name"),
                    "a function needs a non-empty `name` string",
                ))
            }
        }
        if let Some(d) = f
            .get("description")
            .filter(|d| !d.is_null() && !d.is_string())
        {
            return Err(ApiError::invalid(
                at(".function.description"),
                format!("`description` must be a string, got {d}"),
            ));
        }
        if let Some(p) = f
            .get("parameters")
            .filter(|p| !p.is_null() && !p.is_object())
        {
            return Err(ApiError::invalid(
                at(".function.parameters"),
                format!("`parameters` must be a JSON schema object, got {p}"),
            ));
        }
    }
    Ok(tools.to_vec())
}

fn empty_object_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

/// The JSON schema a `required` or named choice constrains the output to (None for none
/// and auto). Named: the function's parameters. Required: vLLM's array of
/// `{"name": <one tool's name>, "parameters": <its parameters>}` objects, at least one
/// (at most one without parallel calls), the tools' `$defs` gathered at the top.
pub fn output_schema(req: &ToolRequest) -> Result<Option<Value>, ApiError> {
    match &req.choice {
        ToolChoice::None | ToolChoice::Auto => Ok(None),
        ToolChoice::Named(name) => Ok(Some(
            req.tools
                .iter()
                .find(|t| tool_name(t) == Some(name))
                .and_then(tool_parameters)
                .cloned()
                .unwrap_or_else(empty_object_schema),
        )),
        ToolChoice::Required => {
            let mut defs = Map::new();
            let mut any_of = Vec::new();
            for (i, t) in req.tools.iter().enumerate() {
                let mut params = tool_parameters(t)
                    .cloned()
                    .unwrap_or_else(empty_object_schema);
                if let Some(Value::Object(d)) =
                    params.as_object_mut().and_then(|p| p.remove("$defs"))
                {
                    for (k, v) in d {
                        match defs.get(&k) {
                            Some(old) if *old != v => {
                                return Err(ApiError::invalid(
                                    format!("tools[{i}].function.parameters"),
                                    format!(
                                        "Tool definition `{k}` has multiple schemas across \
                                         the tools, which is not supported with tool_choice \
                                         \"required\"; give the definitions distinct names"
                                    ),
                                ))
                            }
                            _ => {
                                defs.insert(k, v);
                            }
                        }
                    }
                }
                any_of.push(json!({
                    "properties": {
                        "name": {"type": "string", "enum": [tool_name(t)]},
                        "parameters": params,
                    },
                    "required": ["name", "parameters"],
                }));
            }
            let mut schema = json!({
                "type": "array",
                "minItems": 1,
                "items": {"type": "object", "anyOf": any_of},
            });
            if !req.parallel {
                schema["maxItems"] = json!(1);
            }
            if !defs.is_empty() {
                schema["$defs"] = Value::Object(defs);
            }
            Ok(Some(schema))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(tools: &str, choice: Option<&str>) -> Result<Option<ToolRequest>, ApiError> {
        let tools: Option<Vec<Value>> = serde_json::from_str(tools).unwrap();
        let choice: Option<Value> = choice.map(|c| serde_json::from_str(c).unwrap());
        read_tools(tools.as_deref(), choice.as_ref(), None)
    }

    const TOOLS: &str = r##"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"$ref":"#/$defs/City"}},"required":["city"],"$defs":{"City":{"type":"string"}}}}},
                            {"type":"function","function":{"name":"now"}}]"##;

    #[test]
    fn choices_as_vllm_reads_them() {
        let c = |t: &str, ch: Option<&str>| read(t, ch).unwrap().map(|r| r.choice);
        assert_eq!(c(TOOLS, None), Some(ToolChoice::Auto));
        assert_eq!(c(TOOLS, Some(r#""none""#)), Some(ToolChoice::None));
        assert_eq!(c(TOOLS, Some(r#""required""#)), Some(ToolChoice::Required));
        assert_eq!(
            c(
                TOOLS,
                Some(r#"{"type":"function","function":{"name":"now"}}"#)
            ),
            Some(ToolChoice::Named("now".into()))
        );
        assert_eq!(c("null", None), None);
        assert_eq!(c("null", Some(r#""none""#)), None);
        assert_eq!(c("[]", None), Some(ToolChoice::None));
        assert_eq!(c("[]", Some(r#""required""#)), Some(ToolChoice::None));
        for (tools, choice, says) in [
            ("null", r#""auto""#, "`tools` must be set"),
            ("null", r#""required""#, "`tools` must be set"),
            (TOOLS, r#""any""#, "Invalid value for `tool_choice`"),
            (
                TOOLS,
                r#"{"type":"function","function":{"name":"nope"}}"#,
                "does not match",
            ),
            (TOOLS, r#"{"type":"function"}"#, "tool_choice.function"),
            (
                TOOLS,
                r#"{"type":"function","function":{"name":""}}"#,
                "function's name",
            ),
        ] {
            let e = read(tools, Some(choice)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("tool_choice"));
            assert!(e.message.contains(says), "{choice}: {}", e.message);
        }
        for (tools, param) in [
            (r#"[{"type":"retrieval"}]"#, "tools[0].type"),
            (r#"[1]"#, "tools[0]"),
            (r#"[{"type":"function"}]"#, "tools[0].function"),
            (r#"[{"function":{"name":""}}]"#, "tools[0].function.name"),
            (
                r#"[{"function":{"name":"f","parameters":[]}}]"#,
                "tools[0].function.parameters",
            ),
        ] {
            let e = read(tools, None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{tools}");
        }
    }

    #[test]
    fn schemas_have_vllms_shapes() {
        let named = read(
            TOOLS,
            Some(r#"{"type":"function","function":{"name":"get_weather"}}"#),
        )
        .unwrap()
        .unwrap();
        let s = output_schema(&named).unwrap().unwrap();
        assert_eq!(s["required"], json!(["city"]));
        let named_now = read(
            TOOLS,
            Some(r#"{"type":"function","function":{"name":"now"}}"#),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            output_schema(&named_now).unwrap().unwrap(),
            empty_object_schema()
        );
        let mut req = read(TOOLS, Some(r#""required""#)).unwrap().unwrap();
        let s = output_schema(&req).unwrap().unwrap();
        assert_eq!(s["type"], "array");
        assert_eq!(s["minItems"], 1);
        assert!(s.get("maxItems").is_none());
        assert_eq!(
            s["items"]["anyOf"][0]["properties"]["name"]["enum"],
            json!(["get_weather"])
        );
        assert!(s["items"]["anyOf"][0]["properties"]["parameters"]
            .get("$defs")
            .is_none());
        assert_eq!(s["$defs"]["City"], json!({"type": "string"}));
        assert_eq!(
            s["items"]["anyOf"][1]["properties"]["parameters"],
            empty_object_schema()
        );
        req.parallel = false;
        assert_eq!(output_schema(&req).unwrap().unwrap()["maxItems"], 1);
        let auto = read(TOOLS, None).unwrap().unwrap();
        assert_eq!(output_schema(&auto).unwrap(), None);
    }
}
