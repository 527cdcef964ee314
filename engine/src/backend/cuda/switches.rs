//! The CUDA backend's diagnostic settings: `RVLLM_*` environment variables read once, at
//! start-up (`CudaSettings::from_env`), into one struct that the `Gpu` carries and the backend
//! reads; nothing deeper in the backend looks at the environment. A switch takes one of a
//! fixed set of values, and anything else is an error that lists them, so that a mistyped A/B
//! never silently measures the default twice.
//!
//! Kernel variants that measured slower are not switches: they left the engine and live on in
//! the kernel tests (the fold merge and the classic GEMV as gpu_bench.rs benchmarks, the
//! 6-stage GEMV in gpu_kernels.rs' reference test; BENCHMARKS.md has their history). Setting one of their old switches to a non-default value is an error that says so.

use anyhow::{bail, Result};

/// The settings of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaSettings {
    /// `RVLLM_PDL` (default on): launch kernels with programmatic dependent launch where the
    /// GPU has it (sm_90+); `0`, `false`, `off` or `no` turn it off.
    pub pdl: bool,
    /// `RVLLM_DECODE_COMPACT` (`1`, `0`): batch-1 decode attention through the compact kernel;
    /// `0` keeps the full kernel there too (a same-binary A/B).
    pub decode_compact: bool,
    /// `RVLLM_GEMV_EVICT_FIRST` (`1`, `0`): gemv_bulk streams the weights with an L2
    /// evict-first policy (+1.1 % batch-1 decode on an H200, BENCHMARKS.md).
    pub gemv_evict_first: bool,
    /// `RVLLM_PROFILE_KERNELS=1`: CUDA events around every eager kernel launch.
    pub profile_kernels: bool,
    /// `RVLLM_SKIP_KERNELS=pat1,pat2` (diagnostic only: outputs are wrong): kernels whose
    /// name contains a pattern are not launched.
    pub skip_kernels: Vec<String>,
    /// `RVLLM_TRACE_BLOCKS=<file>`: the kernels' block timeline goes to this file.
    pub trace_blocks: Option<String>,
    /// `RVLLM_NCCL_TP1` (`0`, `1`): at tensor-parallel size 1 the GPU runner still joins an
    /// NCCL group (of its one GPU) and the decoder calls its in-place all-reduces after O and
    /// down, as every rank of a sharded model does; a same-binary A/B of what the
    /// tensor-parallel path costs batch-1 decode, and the one-GPU proof that it gives the
    /// same tokens (tests/tests/gpu_nccl.rs).
    pub nccl_at_tp1: bool,
}

/// The variable of `CudaSettings::nccl_at_tp1`.
pub const NCCL_AT_TP1_ENV: &str = "RVLLM_NCCL_TP1";

impl Default for CudaSettings {
    fn default() -> Self {
        Self::from_lookup(|_| None).expect("the defaults parse")
    }
}

/// Switches of variants that left the engine: (variable, its default value, why).
const REMOVED: &[(&str, &str, &str)] = &[
    (
        "RVLLM_DECODE_REDUCE",
        "kernel",
        "the last-block merge (`fold`) measured slower than the reduce kernel; kernels/tests/gpu_bench.rs keeps it as a benchmark",
    ),
    (
        "RVLLM_GEMV",
        "bulk",
        "the warp-per-row GEMV (`classic`) measured slower than gemv_bulk on sm_90+; kernels/tests/gpu_bench.rs keeps it as a benchmark",
    ),
    (
        "RVLLM_GEMV_STAGES",
        "4",
        "the 6-stage bulk GEMV measured slower than the 4-stage one; kernels/tests/gpu_kernels.rs still checks its build",
    ),
];

impl CudaSettings {
    /// The settings of this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The settings `var` gives (a variable's value, None when unset).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        for &(name, default, why) in REMOVED {
            if let Some(v) = var(name) {
                let v = v.trim();
                if !v.is_empty() && v != default {
                    bail!(
                        "{name}={v}: removed ({why}; BENCHMARKS.md has the measurements); \
                         unset {name}"
                    );
                }
            }
        }
        let pdl = !matches!(
            var("RVLLM_PDL").as_deref().map(str::trim),
            Some("0" | "false" | "off" | "no")
        );
        let decode_compact = parse(
            "RVLLM_DECODE_COMPACT",
            var("RVLLM_DECODE_COMPACT").as_deref(),
            &[("1", true), ("0", false)],
        )?;
        let gemv_evict_first = parse(
            "RVLLM_GEMV_EVICT_FIRST",
            var("RVLLM_GEMV_EVICT_FIRST").as_deref(),
            &[("1", true), ("0", false)],
        )?;
        let profile_kernels = matches!(
            var("RVLLM_PROFILE_KERNELS").as_deref().map(str::trim),
            Some("1" | "true" | "on" | "yes")
        );
        let skip_kernels = skip_patterns(var("RVLLM_SKIP_KERNELS").as_deref());
        let trace_blocks = var("RVLLM_TRACE_BLOCKS").filter(|p| !p.trim().is_empty());
        let nccl_at_tp1 = parse(
            NCCL_AT_TP1_ENV,
            var(NCCL_AT_TP1_ENV).as_deref(),
            &[("0", false), ("1", true)],
        )?;
        Ok(Self {
            pdl,
            decode_compact,
            gemv_evict_first,
            profile_kernels,
            skip_kernels,
            trace_blocks,
            nccl_at_tp1,
        })
    }

    /// Whether to launch with programmatic dependent launch on a GPU of this compute
    /// capability.
    pub fn pdl_on(&self, compute_capability: (i32, i32)) -> bool {
        self.pdl && compute_capability.0 >= 9
    }
}

/// The patterns of `RVLLM_SKIP_KERNELS` (comma-separated, blanks ignored).
fn skip_patterns(env: Option<&str>) -> Vec<String> {
    env.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

/// The value of switch `name` among `choices` (value, meaning); the first choice is the
/// default, taken when the variable is unset or empty.
fn parse<T: Copy>(name: &str, value: Option<&str>, choices: &[(&str, T)]) -> Result<T> {
    let value = value.map(str::trim).unwrap_or("");
    let Some(&(default_name, default)) = choices.first() else {
        bail!("{name}: no values defined (a bug)");
    };
    if value.is_empty() {
        return Ok(default);
    }
    if let Some(&(_, meaning)) = choices.iter().find(|(v, _)| *v == value) {
        return Ok(meaning);
    }
    let others: Vec<&str> = choices[1..].iter().map(|(v, _)| *v).collect();
    bail!(
        "{name}={value}: use {default_name} (the default) or {}",
        others.join(" or ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHOICES: &[(&str, usize)] = &[("4", 4), ("6", 6)];

    fn settings(vars: &[(&str, &str)]) -> Result<CudaSettings> {
        CudaSettings::from_lookup(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn unset_or_blank_is_the_first_choice() {
        assert_eq!(parse("RVLLM_X", None, CHOICES).unwrap(), 4);
        assert_eq!(parse("RVLLM_X", Some("  "), CHOICES).unwrap(), 4);
        assert_eq!(parse("RVLLM_X", Some(" 6 "), CHOICES).unwrap(), 6);
        assert_eq!(parse("RVLLM_X", Some("4"), CHOICES).unwrap(), 4);
    }

    #[test]
    fn other_values_are_errors_that_list_the_choices() {
        let e = parse("RVLLM_X", Some("5"), CHOICES)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "RVLLM_X=5: use 4 (the default) or 6");
        let three = &[("kernel", 0), ("fold", 1), ("other", 2)];
        let e = parse("RVLLM_Y", Some("x"), three).unwrap_err().to_string();
        assert_eq!(e, "RVLLM_Y=x: use kernel (the default) or fold or other");
    }

    #[test]
    fn defaults_are_the_fast_paths_with_no_diagnostics() {
        let s = settings(&[]).unwrap();
        assert_eq!(s, CudaSettings::default());
        assert!(s.pdl && s.decode_compact && s.gemv_evict_first);
        assert!(!s.profile_kernels && s.skip_kernels.is_empty() && s.trace_blocks.is_none());
        assert!(!s.nccl_at_tp1);
    }

    #[test]
    fn each_variable_sets_its_field() {
        let s = settings(&[
            ("RVLLM_PDL", " off "),
            ("RVLLM_DECODE_COMPACT", "0"),
            ("RVLLM_GEMV_EVICT_FIRST", "0"),
            ("RVLLM_PROFILE_KERNELS", "1"),
            ("RVLLM_SKIP_KERNELS", "rope_and, reduce "),
            ("RVLLM_TRACE_BLOCKS", "trace.bin"),
            ("RVLLM_NCCL_TP1", "1"),
        ])
        .unwrap();
        assert!(!s.pdl && !s.decode_compact && !s.gemv_evict_first && s.profile_kernels);
        assert!(s.nccl_at_tp1);
        assert_eq!(s.skip_kernels, ["rope_and", "reduce"]);
        assert_eq!(s.trace_blocks.as_deref(), Some("trace.bin"));
        assert!(settings(&[("RVLLM_TRACE_BLOCKS", " ")])
            .unwrap()
            .trace_blocks
            .is_none());
        assert!(settings(&[("RVLLM_SKIP_KERNELS", " , ")])
            .unwrap()
            .skip_kernels
            .is_empty());
        assert!(
            !settings(&[("RVLLM_PROFILE_KERNELS", "0")])
                .unwrap()
                .profile_kernels
        );
        let e = settings(&[("RVLLM_DECODE_COMPACT", "2")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "RVLLM_DECODE_COMPACT=2: use 1 (the default) or 0"
        );
        // A mistyped switch is an error, not a silent measurement of the plain path.
        assert!(!settings(&[("RVLLM_NCCL_TP1", "0")]).unwrap().nccl_at_tp1);
        let e = settings(&[("RVLLM_NCCL_TP1", "yes")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "RVLLM_NCCL_TP1=yes: use 0 (the default) or 1"
        );
    }

    #[test]
    fn pdl_only_on_hopper_and_newer_unless_turned_off() {
        let on = settings(&[("RVLLM_PDL", "1")]).unwrap();
        assert!(on.pdl_on((9, 0)) && on.pdl_on((10, 0)) && !on.pdl_on((8, 9)));
        for off in ["0", "off", "no", "false"] {
            assert!(!settings(&[("RVLLM_PDL", off)]).unwrap().pdl_on((9, 0)));
        }
    }

    #[test]
    fn removed_variants_are_refused_and_their_defaults_accepted() {
        for (name, slower) in [
            ("RVLLM_DECODE_REDUCE", "fold"),
            ("RVLLM_GEMV", "classic"),
            ("RVLLM_GEMV_STAGES", "6"),
        ] {
            let e = settings(&[(name, slower)]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{name}={slower}: removed")), "{e}");
        }
        for (name, default) in [
            ("RVLLM_DECODE_REDUCE", "kernel"),
            ("RVLLM_GEMV", "bulk"),
            ("RVLLM_GEMV_STAGES", "4"),
        ] {
            assert!(settings(&[(name, default)]).is_ok());
        }
    }
}
