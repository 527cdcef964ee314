//! vLLM's multi-letter single-dash spellings (`-tp 2`, `-pp=1`, `-dp 1`), which clap cannot
//! declare (its short flags are one character): rewritten to the long flags before parsing,
//! so a `vllm serve` command line runs unchanged.
use std::ffi::OsString;

/// (vLLM's short spelling, the long flag it stands for).
const ALIASES: [(&str, &str); 3] = [
    ("-tp", "--tensor-parallel-size"),
    ("-pp", "--pipeline-parallel-size"),
    ("-dp", "--data-parallel-size"),
];

/// `args` with each alias (alone, or as `-tp=N`) replaced by its long flag; nothing after a
/// `--` is touched (it may be a prompt).
pub fn expand_vllm_aliases(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut literal = false;
    for a in args {
        if literal {
            out.push(a);
            continue;
        }
        if a == "--" {
            literal = true;
            out.push(a);
            continue;
        }
        out.push(expand_one(&a).unwrap_or(a));
    }
    out
}

fn expand_one(arg: &OsString) -> Option<OsString> {
    let s = arg.to_str()?;
    ALIASES.iter().find_map(|(short, long)| {
        if s == *short {
            Some(OsString::from(*long))
        } else {
            s.strip_prefix(short)
                .and_then(|rest| rest.strip_prefix('='))
                .map(|value| OsString::from(format!("{long}={value}")))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(args: &[&str]) -> Vec<String> {
        expand_vllm_aliases(args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn short_spellings_become_long_flags_before_a_double_dash_only() {
        assert_eq!(
            expand(&["rvllm", "serve", "m", "-tp", "2", "-pp=1", "-dp", "1"]),
            [
                "rvllm",
                "serve",
                "m",
                "--tensor-parallel-size",
                "2",
                "--pipeline-parallel-size=1",
                "--data-parallel-size",
                "1"
            ]
        );
        assert_eq!(
            expand(&["rvllm", "generate", "-tpx", "--", "-tp"]),
            ["rvllm", "generate", "-tpx", "--", "-tp"]
        );
    }
}
