//! Build-script half of the typed launches: reads the `extern "C" __global__` signatures of
//! `src/*.cu` (no nvcc needed, so every build has them) and writes one Rust struct a
//! signature into OUT_DIR, included by `src/lib.rs` as `rvllm_kernels::args`.
//!
//! Naming rules (see `struct_name`):
//! - a kernel defined in a `#define RVLLM_<NAME>(...)` macro (one signature, several
//!   instantiations): `<Name>` in CamelCase, e.g. `RVLLM_GEMV_BULK` -> `GemvBulk`;
//! - any other kernel: its (bf16) name in CamelCase without the `bf16` word, which reads
//!   `elem` in a conversion (`x_to_y`): `rms_norm_bf16` -> `RmsNorm`, `bf16_to_f32` ->
//!   `ElemToF32`, `sample_tokens` -> `SampleTokens`.
//!
//! A kernel written as `DT(bf16_name, f16_name)` is built twice (common.cuh): the struct covers
//! both builds and lists both names. Types: any pointer -> `u64` (a device address), `int` /
//! `int32_t` -> `i32`, `unsigned` / `uint32_t` -> `u32`, `int64_t` -> `i64`, `uint64_t` ->
//! `u64`, `float` -> `f32`. A kernel with any other parameter type is left out with a warning.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// One parameter: its C name and Rust type.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub rust: &'static str,
    pub c_type: String,
}

/// One entry point: the bf16 (or only) build's name, and the f16 build's where there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub f16_name: Option<String>,
}

/// The kernels of one signature.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub struct_name: String,
    pub module: String,
    pub params: Vec<Param>,
    pub entries: Vec<Entry>,
}

/// Removes comments, keeping a line's continuation backslash, then joins continued lines.
fn logical_lines(text: &str) -> Vec<String> {
    let mut no_block = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        no_block.push_str(&rest[..i]);
        match rest[i + 2..].find("*/") {
            Some(j) => {
                // Keep the line count (nothing depends on it, but errors read better).
                let inner = &rest[i + 2..i + 2 + j];
                no_block.extend(inner.chars().filter(|&c| c == '\n'));
                rest = &rest[i + 2 + j + 2..];
            }
            None => {
                rest = "";
            }
        }
    }
    no_block.push_str(rest);
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in no_block.lines() {
        let continued = line.trim_end().ends_with('\\');
        let mut l = line;
        if let Some(i) = l.find("//") {
            l = &l[..i];
        }
        let l = l.trim_end().trim_end_matches('\\');
        cur.push_str(l);
        cur.push(' ');
        if !continued {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// The text inside the parentheses that open at `s[open]`, and the index after the closing one.
fn balanced(s: &str, open: usize) -> Option<(&str, usize)> {
    let mut depth = 0usize;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&s[open + 1..open + i], open + i + 1));
                }
            }
            _ => {}
        }
    }
    None
}

fn split_commas(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut cur) = (0i32, String::new());
    for c in s.chars() {
        match c {
            '(' | '<' => depth += 1,
            ')' | '>' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

fn rust_type(c_type: &str, pointer: bool) -> Option<&'static str> {
    if pointer {
        return Some("u64");
    }
    Some(match c_type {
        "int" | "int32_t" => "i32",
        "unsigned" | "unsigned int" | "uint32_t" => "u32",
        "int64_t" | "long long" => "i64",
        "uint64_t" | "unsigned long long" => "u64",
        "float" => "f32",
        _ => return None,
    })
}

const RUST_KEYWORDS: &[&str] = &[
    "as", "async", "await", "box", "break", "const", "continue", "crate", "dyn", "else", "enum",
    "extern", "false", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "match", "mod",
    "move", "mut", "priv", "pub", "ref", "return", "static", "struct", "super", "trait", "true",
    "try", "type", "unsafe", "use", "where", "while", "yield",
];

fn parse_param(p: &str) -> Result<Param, String> {
    let pointer = p.contains('*');
    let cleaned = p.replace('*', " ");
    let words: Vec<&str> = cleaned
        .split_whitespace()
        .filter(|w| !matches!(*w, "const" | "__restrict__" | "volatile"))
        .collect();
    let Some((name, ty)) = words.split_last() else {
        return Err(format!("empty parameter in `{p}`"));
    };
    let c_type = ty.join(" ");
    let rust = rust_type(&c_type, pointer)
        .ok_or_else(|| format!("parameter `{p}`: no Rust type for C type `{c_type}`"))?;
    // A C name that is a Rust keyword (`in`) becomes a raw identifier (`r#in`).
    let name = if RUST_KEYWORDS.contains(name) {
        format!("r#{name}")
    } else {
        name.to_string()
    };
    Ok(Param {
        name,
        rust,
        c_type: if pointer {
            format!("{c_type}*")
        } else {
            c_type
        },
    })
}

/// A kernel found in `text` (one logical line): its name template (`DT` pair or plain) and
/// parameters. `text` must contain `__global__`.
fn parse_kernel(text: &str) -> Result<(String, Option<String>, Vec<Param>), String> {
    let start = text.find("__global__").ok_or("no __global__")? + "__global__".len();
    let mut s = text[start..].trim_start();
    s = s
        .strip_prefix("void")
        .ok_or("kernel not returning void")?
        .trim_start();
    if let Some(rest) = s.strip_prefix("__launch_bounds__") {
        let open = rest.find('(').ok_or("__launch_bounds__ without (")?;
        let (_, end) = balanced(rest, open).ok_or("unbalanced __launch_bounds__")?;
        s = rest[end..].trim_start();
    }
    let (name, f16_name, rest) = if let Some(r) = s.strip_prefix("DT") {
        let open = r.find('(').ok_or("DT without (")?;
        let (inner, end) = balanced(r, open).ok_or("unbalanced DT(...)")?;
        let names = split_commas(inner);
        let [a, b] = names.as_slice() else {
            return Err(format!("DT({inner}): expected two names"));
        };
        (a.clone(), Some(b.clone()), &r[end..])
    } else {
        let end = s.find('(').ok_or("kernel name without (")?;
        (s[..end].trim().to_string(), None, &s[end..])
    };
    let open = rest.find('(').ok_or("no parameter list")?;
    let (params, _) = balanced(rest, open).ok_or("unbalanced parameter list")?;
    let params = split_commas(params)
        .iter()
        .map(|p| parse_param(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name, f16_name, params))
}

/// `gemv_bulk_##BF16_NAME##_b1` with `BF16_NAME` = `silu_bf16`: `gemv_bulk_silu_bf16_b1`.
fn expand(template: &str, formals: &[String], actuals: &[String]) -> String {
    let mut parts = Vec::new();
    for piece in template.split("##") {
        let p = piece.trim();
        let sub = formals
            .iter()
            .position(|f| f == p)
            .map(|i| actuals[i].clone())
            .unwrap_or_else(|| p.to_string());
        parts.push(sub);
    }
    parts.concat()
}

fn camel(words: &[&str]) -> String {
    words
        .iter()
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// The struct of a kernel: see the module's naming rules.
pub fn struct_name(kernel: &str, macro_name: Option<&str>) -> String {
    if let Some(m) = macro_name {
        let m = m.strip_prefix("RVLLM_").unwrap_or(m).to_ascii_lowercase();
        return camel(&m.split('_').collect::<Vec<_>>());
    }
    let words: Vec<&str> = kernel.split('_').collect();
    let conversion = words.contains(&"to");
    let words: Vec<&str> = words
        .into_iter()
        .filter_map(|w| match w {
            "bf16" if conversion => Some("elem"),
            "bf16" => None,
            w => Some(w),
        })
        .collect();
    camel(&words)
}

/// Every kernel signature of the `.cu` text of module `module`. `has_f16`: the module has a
/// `<module>_f16.cu` build. Kernels whose parameters have no Rust type come back in `skipped`.
pub fn parse_module(
    module: &str,
    text: &str,
    has_f16: bool,
    skipped: &mut Vec<String>,
) -> Vec<Signature> {
    let lines = logical_lines(text);
    // Macros that define a kernel: name -> (formals, the kernel's logical text).
    let mut macros: BTreeMap<String, (Vec<String>, String)> = BTreeMap::new();
    let mut plain = String::new();
    for line in &lines {
        let t = line.trim();
        let Some(def) = t.strip_prefix('#') else {
            plain.push_str(line);
            plain.push('\n');
            continue;
        };
        let Some(def) = def.trim_start().strip_prefix("define") else {
            continue;
        };
        let def = def.trim_start();
        let Some(open) = def.find('(') else { continue };
        let name = &def[..open];
        if name.contains(char::is_whitespace) || !def.contains("__global__") {
            continue;
        }
        if let Some((formals, _)) = balanced(def, open) {
            macros.insert(name.to_string(), (split_commas(formals), def.to_string()));
        }
    }
    let mut sigs: Vec<Signature> = Vec::new();
    let mut push = |sig: Signature, skipped: &mut Vec<String>| match sigs
        .iter_mut()
        .find(|s| s.struct_name == sig.struct_name)
    {
        Some(s) if s.params == sig.params => s.entries.extend(sig.entries),
        Some(s) => skipped.push(format!(
            "{module}.cu: `{}` and `{}` map to struct `{}` with different parameters",
            s.entries[0].name, sig.entries[0].name, sig.struct_name
        )),
        None => sigs.push(sig),
    };
    // Kernels written out: from each `extern "C"` that a `__global__` follows.
    let mut from = 0;
    while let Some(i) = plain[from..].find("extern \"C\"") {
        let at = from + i;
        from = at + 10;
        let after = plain[from..].trim_start();
        if !after.starts_with("__global__") {
            continue;
        }
        match parse_kernel(&plain[at..]) {
            Ok((name, f16, params)) => push(
                Signature {
                    struct_name: struct_name(&name, None),
                    module: module.to_string(),
                    params,
                    entries: vec![Entry {
                        name,
                        f16_name: f16.filter(|_| has_f16),
                    }],
                },
                skipped,
            ),
            Err(e) => skipped.push(format!("{module}.cu: {e}")),
        }
    }
    // Instantiations of the kernel macros: `RVLLM_GEMV(1, 4)` on a line of its own.
    for line in plain.lines() {
        let t = line.trim();
        let Some(open) = t.find('(') else { continue };
        let Some((formals, body)) = macros.get(t[..open].trim()) else {
            continue;
        };
        let Some((actuals, _)) = balanced(t, open) else {
            continue;
        };
        let actuals = split_commas(actuals);
        if actuals.len() != formals.len() {
            skipped.push(format!("{module}.cu: `{t}`: wrong argument count"));
            continue;
        }
        let macro_name = t[..open].trim();
        match parse_kernel(body) {
            Ok((name, f16, params)) => {
                let name = expand(&name, formals, &actuals);
                let f16 = f16.map(|f| expand(&f, formals, &actuals));
                push(
                    Signature {
                        struct_name: struct_name(&name, Some(macro_name)),
                        module: module.to_string(),
                        params,
                        entries: vec![Entry {
                            name,
                            f16_name: f16.filter(|_| has_f16),
                        }],
                    },
                    skipped,
                )
            }
            Err(e) => skipped.push(format!("{module}.cu: macro {macro_name}: {e}")),
        }
    }
    sigs
}

/// Parses every `src_dir/*.cu` module (the `_f16` wrappers hold no kernels of their own).
pub fn parse_dir(
    src_dir: &Path,
    stems: &[String],
) -> Result<(Vec<Signature>, Vec<String>), String> {
    let mut all: Vec<Signature> = Vec::new();
    let mut skipped = Vec::new();
    for stem in stems {
        if stem.ends_with("_f16") && stems.contains(&stem[..stem.len() - 4].to_string()) {
            continue;
        }
        let path = src_dir.join(format!("{stem}.cu"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let has_f16 = stems.contains(&format!("{stem}_f16"));
        for sig in parse_module(stem, &text, has_f16, &mut skipped) {
            if let Some(other) = all.iter().find(|s| s.struct_name == sig.struct_name) {
                return Err(format!(
                    "kernels in {}.cu and {}.cu both map to the argument struct `{}`; rename one",
                    other.module, sig.module, sig.struct_name
                ));
            }
            all.push(sig);
        }
    }
    Ok((all, skipped))
}

/// The Rust source of `args.rs`.
pub fn render(sigs: &[Signature]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "// Generated by kernels/launch_args.rs from the kernels' signatures; do not edit.\n"
    );
    for sig in sigs {
        let names: Vec<String> = sig
            .entries
            .iter()
            .map(|e| match &e.f16_name {
                Some(f) => format!("`{}` / `{f}`", e.name),
                None => format!("`{}`", e.name),
            })
            .collect();
        let _ = writeln!(
            s,
            "/// The arguments of {} ({}.cu), fields in the C parameter order.",
            names.join(", "),
            sig.module
        );
        let _ = writeln!(s, "#[derive(Debug, Clone, Copy, PartialEq)]");
        let _ = writeln!(s, "pub struct {} {{", sig.struct_name);
        for p in &sig.params {
            let _ = writeln!(s, "    /// `{}`", p.c_type);
            let _ = writeln!(s, "    pub {}: {},", p.name, p.rust);
        }
        let _ = writeln!(s, "}}\n");
        let _ = writeln!(s, "impl {} {{", sig.struct_name);
        let _ = writeln!(s, "    /// The C parameter names, in order.");
        let params: Vec<&str> = sig
            .params
            .iter()
            .map(|p| p.name.trim_start_matches("r#"))
            .collect();
        let _ = writeln!(
            s,
            "    pub const PARAMS: &'static [&'static str] = &{params:?};"
        );
        let _ = writeln!(s, "    /// Every entry point that takes these arguments.");
        let _ = writeln!(s, "    pub const ENTRIES: &'static [crate::Entry] = &[");
        for e in &sig.entries {
            let f16 = match &e.f16_name {
                Some(f) => format!("Some(({:?}, {f:?}))", format!("{}_f16", sig.module)),
                None => "None".into(),
            };
            let _ = writeln!(
                s,
                "        crate::Entry {{ module: {:?}, name: {:?}, f16: {f16} }},",
                sig.module, e.name
            );
        }
        let _ = writeln!(s, "    ];\n}}\n");
        let _ = writeln!(s, "impl crate::KernelArgs for {} {{", sig.struct_name);
        let _ = writeln!(
            s,
            "    const ENTRIES: &'static [crate::Entry] = {}::ENTRIES;",
            sig.struct_name
        );
        let _ = writeln!(
            s,
            "    fn params(&mut self) -> crate::Params<'_> {{\n        crate::Params::new(&mut ["
        );
        for p in &sig.params {
            let _ = writeln!(
                s,
                "            &mut self.{} as *mut {} as *mut ::std::ffi::c_void,",
                p.name, p.rust
            );
        }
        let _ = writeln!(s, "        ])\n    }}\n}}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        assert_eq!(struct_name("rms_norm_bf16", None), "RmsNorm");
        assert_eq!(struct_name("bf16_to_f32", None), "ElemToF32");
        assert_eq!(struct_name("f32_to_bf16", None), "F32ToElem");
        assert_eq!(struct_name("sample_tokens", None), "SampleTokens");
        assert_eq!(struct_name("x", Some("RVLLM_GEMV_BULK")), "GemvBulk");
    }

    #[test]
    fn parses_plain_dt_and_macro_kernels() {
        let src = r#"
// extern "C" __global__ void commented_out(int a) {}
extern "C" __global__ void __launch_bounds__(256, 2) DT(scale_bf16, scale_f16)(
    elem_t* __restrict__ out, const float* in, /* the count */ int64_t n, float s) {
}
#define RVLLM_PAIR(A, B)                                        \
    extern "C" __global__ void DT(pair_##A##_bf16, pair_##A##_f16)( \
        uint64_t seed, unsigned flags, int count) {}
RVLLM_PAIR(x, y)
RVLLM_PAIR(z, y)
extern "C" __global__ void odd(MyStruct s) {}
"#;
        let mut skipped = Vec::new();
        let sigs = parse_module("m", src, true, &mut skipped);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("MyStruct"), "{skipped:?}");
        assert_eq!(sigs.len(), 2, "{sigs:?}");
        let scale = &sigs[0];
        assert_eq!(scale.struct_name, "Scale");
        let p: Vec<(&str, &str)> = scale
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.rust))
            .collect();
        assert_eq!(
            p,
            [("out", "u64"), ("r#in", "u64"), ("n", "i64"), ("s", "f32")]
        );
        assert_eq!(scale.entries[0].f16_name.as_deref(), Some("scale_f16"));
        let pair = &sigs[1];
        assert_eq!(pair.struct_name, "Pair");
        let names: Vec<&str> = pair.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["pair_x_bf16", "pair_z_bf16"]);
        let p: Vec<&str> = pair.params.iter().map(|p| p.rust).collect();
        assert_eq!(p, ["u64", "u32", "i32"]);
        assert!(render(&sigs).contains("pub struct Pair {"));
    }
}
