//! A JSON-schema check of the benchmark's constrained outputs, independent of the grammar
//! engine that produced them (checking llguidance's output with llguidance would prove
//! nothing). It knows the keywords of plain data schemas (types, properties, items, bounds,
//! enum / const, anyOf / oneOf / allOf); a schema using any other keyword (`pattern`,
//! `format`, `$ref`, ...) is reported as one it cannot check rather than passed.
use serde_json::{Map, Value};

/// Keywords that say nothing about validity.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "readOnly",
    "writeOnly",
    "deprecated",
];

/// Keywords [`validate`] checks.
const CHECKED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "minProperties",
    "maxProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "enum",
    "const",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "anyOf",
    "oneOf",
    "allOf",
];

/// The first keyword of `schema` (or of a schema inside it) that [`validate`] does not
/// check; None when every part of the schema is checked.
pub fn unchecked_keyword(schema: &Value) -> Option<String> {
    let obj = match schema {
        Value::Bool(_) => return None,
        Value::Object(o) => o,
        _ => return Some("(a schema that is not an object or a boolean)".into()),
    };
    for (k, v) in obj {
        if ANNOTATIONS.contains(&k.as_str()) {
            continue;
        }
        if !CHECKED.contains(&k.as_str()) {
            return Some(k.clone());
        }
        let inner = match k.as_str() {
            "properties" => v.as_object().map(|m| m.values().collect()),
            "anyOf" | "oneOf" | "allOf" => v.as_array().map(|a| a.iter().collect()),
            "items" | "additionalProperties" => Some(vec![v]),
            _ => None,
        };
        if let Some(found) = inner.into_iter().flatten().find_map(unchecked_keyword) {
            return Some(found);
        }
    }
    None
}

/// Ok when `value` is valid against `schema`; Err: where and why not. Keywords outside
/// [`CHECKED`] are ignored here: ask [`unchecked_keyword`] first.
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    check(schema, value, "$")
}

fn check(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let s = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{at}: the schema allows nothing here")),
        Value::Object(s) => s,
        _ => return Err(format!("{at}: the schema is not an object")),
    };
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.iter().any(|t| has_type(value, t)) {
            return Err(format!("{at}: {value} is not of type {t}"));
        }
    }
    if let Some(Value::Array(options)) = s.get("enum") {
        if !options.iter().any(|o| same(o, value)) {
            return Err(format!("{at}: {value} is not one of the enum's values"));
        }
    }
    if let Some(c) = s.get("const") {
        if !same(c, value) {
            return Err(format!("{at}: {value} is not the const {c}"));
        }
    }
    match value {
        Value::Object(o) => check_object(s, o, at)?,
        Value::Array(a) => check_array(s, a, at)?,
        Value::String(text) => {
            let chars = text.chars().count() as u64;
            if bound(s, "minLength").is_some_and(|m| chars < m) {
                return Err(format!(
                    "{at}: string of {chars} characters is below minLength"
                ));
            }
            if bound(s, "maxLength").is_some_and(|m| chars > m) {
                return Err(format!(
                    "{at}: string of {chars} characters is above maxLength"
                ));
            }
        }
        Value::Number(n) => check_number(s, n.as_f64().unwrap_or(f64::NAN), at)?,
        _ => {}
    }
    if let Some(Value::Array(all)) = s.get("allOf") {
        for sub in all {
            check(sub, value, at)?;
        }
    }
    if let Some(Value::Array(any)) = s.get("anyOf") {
        if !any.iter().any(|sub| check(sub, value, at).is_ok()) {
            return Err(format!("{at}: {value} matches none of anyOf"));
        }
    }
    if let Some(Value::Array(one)) = s.get("oneOf") {
        let matching = one
            .iter()
            .filter(|sub| check(sub, value, at).is_ok())
            .count();
        if matching != 1 {
            return Err(format!("{at}: {value} matches {matching} of oneOf, not 1"));
        }
    }
    Ok(())
}

fn check_object(s: &Map<String, Value>, o: &Map<String, Value>, at: &str) -> Result<(), String> {
    let props = s.get("properties").and_then(Value::as_object);
    if let Some(Value::Array(required)) = s.get("required") {
        if let Some(missing) = required
            .iter()
            .filter_map(Value::as_str)
            .find(|k| !o.contains_key(*k))
        {
            return Err(format!("{at}: required property `{missing}` is missing"));
        }
    }
    for (k, v) in o {
        let at = format!("{at}.{k}");
        match props.and_then(|p| p.get(k)) {
            Some(sub) => check(sub, v, &at)?,
            None => {
                if let Some(extra) = s.get("additionalProperties") {
                    check(extra, v, &at)?;
                }
            }
        }
    }
    let n = o.len() as u64;
    if bound(s, "minProperties").is_some_and(|m| n < m) {
        return Err(format!("{at}: {n} properties, below minProperties"));
    }
    if bound(s, "maxProperties").is_some_and(|m| n > m) {
        return Err(format!("{at}: {n} properties, above maxProperties"));
    }
    Ok(())
}

fn check_array(s: &Map<String, Value>, a: &[Value], at: &str) -> Result<(), String> {
    if let Some(items) = s.get("items") {
        for (i, v) in a.iter().enumerate() {
            check(items, v, &format!("{at}[{i}]"))?;
        }
    }
    let n = a.len() as u64;
    if bound(s, "minItems").is_some_and(|m| n < m) {
        return Err(format!("{at}: {n} items, below minItems"));
    }
    if bound(s, "maxItems").is_some_and(|m| n > m) {
        return Err(format!("{at}: {n} items, above maxItems"));
    }
    if s.get("uniqueItems") == Some(&Value::Bool(true)) {
        for (i, x) in a.iter().enumerate() {
            if a[..i].iter().any(|y| same(x, y)) {
                return Err(format!(
                    "{at}: item {i} repeats an earlier one (uniqueItems)"
                ));
            }
        }
    }
    Ok(())
}

fn check_number(s: &Map<String, Value>, x: f64, at: &str) -> Result<(), String> {
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    let fails = [
        ("minimum", num("minimum").is_some_and(|m| x < m)),
        ("maximum", num("maximum").is_some_and(|m| x > m)),
        (
            "exclusiveMinimum",
            num("exclusiveMinimum").is_some_and(|m| x <= m),
        ),
        (
            "exclusiveMaximum",
            num("exclusiveMaximum").is_some_and(|m| x >= m),
        ),
        (
            "multipleOf",
            num("multipleOf").is_some_and(|m| m > 0.0 && ((x / m) - (x / m).round()).abs() > 1e-9),
        ),
    ];
    match fails.iter().find(|f| f.1) {
        Some((k, _)) => Err(format!("{at}: {x} fails {k}")),
        None => Ok(()),
    }
}

fn bound(s: &Map<String, Value>, k: &str) -> Option<u64> {
    s.get(k).and_then(Value::as_u64)
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        // JSON Schema counts 2.0 as an integer.
        "integer" => v.as_f64().is_some_and(|x| x.fract() == 0.0),
        _ => false,
    }
}

/// JSON equality with 1 and 1.0 the same number, as JSON Schema has it.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn checks_the_data_keywords() {
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 4},
                "n": {"type": "integer", "minimum": 0, "exclusiveMaximum": 10},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2,
                         "uniqueItems": true},
                "kind": {"anyOf": [{"const": 1}, {"type": "null"}]}
            },
            "required": ["name"],
            "additionalProperties": false
        });
        assert_eq!(unchecked_keyword(&schema), None);
        let ok = |v: Value| validate(&schema, &v);
        assert!(ok(json!({"name": "abc", "n": 9, "tags": ["a", "b"], "kind": 1.0})).is_ok());
        assert!(ok(json!({"name": "ab", "kind": null, "n": 2.0})).is_ok());
        for bad in [
            json!({"n": 1}),
            json!({"name": "a"}),
            json!({"name": "abcde"}),
            json!({"name": "ab", "n": 10}),
            json!({"name": "ab", "n": 1.5}),
            json!({"name": "ab", "tags": ["c"]}),
            json!({"name": "ab", "tags": ["a", "a"]}),
            json!({"name": "ab", "tags": ["a", "b", "a"]}),
            json!({"name": "ab", "kind": 2}),
            json!({"name": "ab", "other": 1}),
            json!(["name"]),
        ] {
            assert!(ok(bad.clone()).is_err(), "{bad} passed");
        }
        assert!(validate(
            &json!({"oneOf": [{"type": "number"}, {"type": "integer"}]}),
            &json!(3)
        )
        .is_err());
    }

    #[test]
    fn names_keywords_it_cannot_check() {
        let nested = json!({"type": "object", "properties": {"d": {"type": "string",
                            "format": "date"}}});
        assert_eq!(unchecked_keyword(&nested).as_deref(), Some("format"));
        let items = json!({"type": "array", "items": {"pattern": "^a$"}});
        assert_eq!(unchecked_keyword(&items).as_deref(), Some("pattern"));
        assert_eq!(
            unchecked_keyword(&json!({"$ref": "#/x"})).as_deref(),
            Some("$ref")
        );
        assert_eq!(
            unchecked_keyword(&json!({"title": "t", "type": "string"})),
            None
        );
    }
}
