//! How many nvcc jobs run at once.
//!
//! Standard library only: `kernels/build.rs` includes this file with `#[path]` so the build
//! script and `cargo xtask doctor` compute the same default.
#![allow(dead_code)]

/// Memory one nvcc job may need at peak (cicc + ptxas on a large kernel).
pub const BYTES_PER_JOB: u64 = 2 << 30;

/// Parses a `MAX_JOBS` / `--jobs` value: a positive integer.
pub fn parse_max_jobs(value: &str) -> Result<usize, String> {
    let v = value.trim();
    match v.parse::<usize>() {
        Ok(0) => Err("MAX_JOBS=0: the number of parallel compile jobs must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "MAX_JOBS=`{value}` is not a number; set it to a positive integer such as MAX_JOBS=2"
        )),
    }
}

/// The default: one job per core, but no more than free memory / 2 GiB, and at least one.
pub fn default_jobs(cores: usize, mem_available: Option<u64>) -> usize {
    let by_mem = match mem_available {
        Some(bytes) => (bytes / BYTES_PER_JOB) as usize,
        None => cores,
    };
    cores.min(by_mem).max(1)
}

/// What was chosen and why, for doctor and build logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobsChoice {
    pub jobs: usize,
    pub reason: String,
}

/// Resolution order: `--jobs` (or `RVLLM_JOBS`, which xtask passes to the build script), then
/// `MAX_JOBS`, then the default. An explicit value is honoured as given, even above the
/// memory cap: the user asked for it.
pub fn resolve_jobs(
    explicit: Option<&str>,
    max_jobs_env: Option<&str>,
    cores: usize,
    mem_available: Option<u64>,
) -> Result<JobsChoice, String> {
    if let Some(v) = explicit.filter(|v| !v.trim().is_empty()) {
        let jobs = parse_max_jobs(v)?;
        return Ok(JobsChoice {
            jobs,
            reason: "--jobs".into(),
        });
    }
    if let Some(v) = max_jobs_env.filter(|v| !v.trim().is_empty()) {
        let jobs = parse_max_jobs(v)?;
        return Ok(JobsChoice {
            jobs,
            reason: "MAX_JOBS".into(),
        });
    }
    let jobs = default_jobs(cores, mem_available);
    let mem = match mem_available {
        Some(b) => format!("{:.1} GiB free", b as f64 / (1u64 << 30) as f64),
        None => "free memory unknown".into(),
    };
    Ok(JobsChoice {
        jobs,
        reason: format!("default: min({cores} cores, {mem} / 2 GiB)"),
    })
}

/// `MemAvailable` from /proc/meminfo, in bytes (None off Linux).
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_available(&text)
}

pub fn parse_meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn cpu_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn parses_positive_integers_and_rejects_the_rest() {
        assert_eq!(parse_max_jobs("4"), Ok(4));
        assert_eq!(parse_max_jobs(" 12\n"), Ok(12));
        assert!(parse_max_jobs("0").unwrap_err().contains("at least 1"));
        assert!(parse_max_jobs("four").unwrap_err().contains("not a number"));
        assert!(parse_max_jobs("-2").is_err());
        assert!(parse_max_jobs("2.5").is_err());
    }

    #[test]
    fn default_is_capped_by_memory() {
        assert_eq!(default_jobs(16, Some(64 * GIB)), 16);
        assert_eq!(default_jobs(16, Some(9 * GIB)), 4);
        assert_eq!(default_jobs(2, Some(24 * GIB)), 2);
        // Less than one job's worth of memory still runs one job.
        assert_eq!(default_jobs(8, Some(GIB)), 1);
        assert_eq!(default_jobs(8, None), 8);
    }

    #[test]
    fn explicit_beats_max_jobs_beats_default() {
        let c = resolve_jobs(Some("3"), Some("5"), 16, Some(64 * GIB)).unwrap();
        assert_eq!((c.jobs, c.reason.as_str()), (3, "--jobs"));
        let c = resolve_jobs(None, Some("5"), 16, Some(4 * GIB)).unwrap();
        assert_eq!((c.jobs, c.reason.as_str()), (5, "MAX_JOBS"));
        let c = resolve_jobs(None, Some(""), 16, Some(6 * GIB)).unwrap();
        assert_eq!(c.jobs, 3);
        assert!(c.reason.starts_with("default"));
        assert!(resolve_jobs(None, Some("lots"), 16, None)
            .unwrap_err()
            .contains("MAX_JOBS=`lots`"));
    }

    #[test]
    fn reads_mem_available() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   4194304 kB\n";
        assert_eq!(parse_meminfo_available(text), Some(4 * GIB));
        assert_eq!(parse_meminfo_available("MemTotal: 1 kB\n"), None);
    }
}
