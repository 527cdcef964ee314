//! Structured-output load for `rvllm bench serve`, after vLLM's
//! benchmarks/benchmark_serving_structured_output.py: a share of the requests
//! (`--structured-output-ratio`) carries a JSON schema (`--json-schema-path`, else a
//! built-in one) as vLLM's `structured_outputs: {"json": ...}`, which rvllm's server takes
//! on both endpoints, token-id prompts included. The report counts the constrained outputs
//! that are complete JSON documents valid against the schema.
//!
//! The built-in schema never has to close: an object whose one string can run to any
//! length. With `--ignore-eos` every constrained request then generates the same number of
//! tokens as an unconstrained one, and every one of them is masked by the grammar (a string's
//! mask is the costliest to build: nearly every token is allowed), so the time per output
//! token of the two runs compares like with like.
use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde_json::{json, Value};

use super::schema_check::{unchecked_keyword, validate};

#[derive(Args, Clone, Debug, Default)]
pub struct StructuredOutputArgs {
    /// Fraction of the requests constrained by the JSON schema (0 to 1); which ones is drawn
    /// from --seed, apart from the prompts, so runs at different ratios send the same prompts.
    #[arg(long, default_value_t = 0.0)]
    pub structured_output_ratio: f64,
    /// The JSON schema of the constrained requests (default: an object with one unbounded
    /// string, {"text": "..."}, which never forces the output to end).
    #[arg(long, alias = "json-schema")]
    pub json_schema_path: Option<PathBuf>,
}

/// The built-in schema: see the module's comment.
pub fn default_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
        "additionalProperties": false
    })
}

/// The schema and which of `n` requests carry it; None when the ratio is 0.
pub fn plan(args: &StructuredOutputArgs, n: usize, seed: u64) -> Result<Option<Plan>> {
    let ratio = args.structured_output_ratio;
    if !(0.0..=1.0).contains(&ratio) {
        bail!("--structured-output-ratio must be between 0 and 1, got {ratio}");
    }
    let schema = match &args.json_schema_path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading --json-schema-path {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("--json-schema-path {} is not JSON", p.display()))?
        }
        None => default_schema(),
    };
    let count = (n as f64 * ratio).round() as usize;
    if count == 0 {
        return Ok(None);
    }
    // Its own stream, so the prompts and arrival times do not depend on the ratio.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x005e_ed0f_5c4e_3a00);
    let constrained = sample(&mut rng, n, count).into_iter().collect();
    Ok(Some(Plan {
        schema,
        constrained,
    }))
}

pub struct Plan {
    pub schema: Value,
    pub constrained: HashSet<usize>,
}

impl Plan {
    /// Constrains request `i`'s body when the plan says so; true if it did.
    pub fn apply(&self, i: usize, body: &mut Value) -> bool {
        if !self.constrained.contains(&i) {
            return false;
        }
        body["structured_outputs"] = json!({"json": self.schema});
        true
    }
}

/// What became of the constrained requests' outputs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tally {
    /// Constrained requests that completed (their stream ended normally).
    pub constrained: usize,
    /// Outputs that are whole JSON documents, or that the server ended (`stop`).
    pub complete: usize,
    /// Complete outputs valid against the schema.
    pub valid: usize,
    /// Cut off by max_tokens before the document closed: not judged.
    pub truncated: usize,
    /// Why the schema's validity was not checked (a keyword the checker does not know):
    /// `valid` then counts outputs that are JSON only.
    pub unchecked: Option<String>,
    /// The first invalid output and why.
    pub first_invalid: Option<String>,
}

/// Judges the outputs `(text, finish_reason)` of the constrained requests against `schema`.
pub fn tally<'a>(
    schema: &Value,
    outputs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Tally {
    let mut t = Tally {
        unchecked: unchecked_keyword(schema),
        ..Tally::default()
    };
    for (text, finish) in outputs {
        t.constrained += 1;
        let parsed = serde_json::from_str::<Value>(text.trim());
        let verdict = match &parsed {
            Ok(v) if t.unchecked.is_some() => Ok(v),
            Ok(v) => validate(schema, v).map(|_| v),
            Err(e) => Err(format!("not JSON ({e})")),
        };
        match verdict {
            Ok(_) => {
                t.complete += 1;
                t.valid += 1;
            }
            // Never closed and cut off by length: nothing to judge.
            Err(_) if parsed.is_err() && finish != Some("stop") => t.truncated += 1,
            Err(why) => {
                t.complete += 1;
                if t.first_invalid.is_none() {
                    let head: String = text.chars().take(200).collect();
                    t.first_invalid = Some(format!("{why}: {head}"));
                }
            }
        }
    }
    t
}

impl Tally {
    pub fn print(&self, ratio: f64) {
        let line = |k: &str, v: String| println!("{k:<40} {v:<10}");
        println!("{:-^50}", "Structured Output");
        line("Structured output ratio:", format!("{ratio}"));
        line("Constrained requests:", self.constrained.to_string());
        line("Complete outputs:", self.complete.to_string());
        let valid = match &self.unchecked {
            None => "Valid against the schema:",
            Some(_) => "Valid JSON (schema not checked):",
        };
        line(valid, self.valid.to_string());
        line("Truncated (max_tokens):", self.truncated.to_string());
        if let Some(k) = &self.unchecked {
            println!("(the schema uses `{k}`, which the benchmark's checker does not know)");
        }
        if let Some(bad) = &self.first_invalid {
            println!("First invalid output: {bad}");
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "structured_output_requests": self.constrained,
            "structured_output_complete": self.complete,
            "structured_output_valid": self.valid,
            "structured_output_truncated": self.truncated,
            "structured_output_schema_checked": self.unchecked.is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_picks_a_seeded_share_of_requests() {
        let args = |r: f64| StructuredOutputArgs {
            structured_output_ratio: r,
            json_schema_path: None,
        };
        assert!(plan(&args(0.0), 10, 0).unwrap().is_none());
        let half = plan(&args(0.5), 10, 3).unwrap().unwrap();
        assert_eq!(half.constrained.len(), 5);
        assert_eq!(
            half.constrained,
            plan(&args(0.5), 10, 3).unwrap().unwrap().constrained
        );
        assert_eq!(
            plan(&args(1.0), 7, 0).unwrap().unwrap().constrained.len(),
            7
        );
        assert!(plan(&args(1.5), 7, 0).is_err());
        let mut body = json!({"prompt": [1, 2]});
        let all = plan(&args(1.0), 2, 0).unwrap().unwrap();
        assert!(all.apply(1, &mut body));
        assert_eq!(body["structured_outputs"]["json"], default_schema());
    }

    #[test]
    fn outputs_are_judged_only_when_complete() {
        let schema = default_schema();
        let t = tally(
            &schema,
            [
                (r#"{"text": "abc"}"#, Some("stop")),
                (r#"{"text": "ab"#, Some("length")),
                (r#"{"text": 3}"#, Some("stop")),
                (r#"{"text": "x"#, Some("stop")),
                (r#"{"text": "x"}"#, Some("length")),
            ],
        );
        assert_eq!(
            (t.constrained, t.complete, t.valid, t.truncated),
            (5, 4, 2, 1)
        );
        assert!(t.first_invalid.unwrap().contains("not of type"));
        let t = tally(
            &json!({"type": "string", "format": "date"}),
            [("\"x\"", None)],
        );
        assert_eq!((t.valid, t.unchecked.as_deref()), (1, Some("format")));
    }
}
