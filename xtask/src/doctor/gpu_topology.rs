//! How the GPUs of this host reach each other, for `doctor`: `nvidia-smi topo -m` (the link
//! between each pair: NVLink, or which PCIe path) and `nvidia-smi topo -p2p r` (whether CUDA
//! peer-to-peer reads work), parsed into one short line. Tensor parallelism all-reduces twice
//! per layer, so a pair that only meets over PCIe (worse, across CPU sockets) is what makes a
//! split model slow.
use std::collections::BTreeMap;
use std::process::Command;

/// One GPU pair's entry in a topology matrix: `GPU a`, `GPU b` (a < b) and the cell text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub a: usize,
    pub b: usize,
    pub cell: String,
}

/// Removes terminal escape sequences (nvidia-smi underlines the header row).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ params final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `GPU3` → 3.
fn gpu_index(name: &str) -> Option<usize> {
    name.strip_prefix("GPU")?.parse().ok()
}

/// The GPU-to-GPU cells of an `nvidia-smi topo` matrix (`-m` or `-p2p`): the header row names
/// the columns (GPUs, then NICs and affinities, which are skipped), each `GPU<i>` row gives
/// its cells in the same order. Each unordered pair once. None when there is no matrix.
pub fn parse_matrix(text: &str) -> Option<(usize, Vec<Pair>)> {
    let text = strip_ansi(text);
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .by_ref()
        .find(|l| l.split('\t').any(|c| c.trim() == "GPU0"))?
        .split('\t')
        .map(|c| c.trim().to_string())
        .collect();
    // Rows start with their name; the header starts with an empty cell (or none at all when
    // the leading whitespace is spaces), so columns are found by name, not position.
    let columns: Vec<(usize, usize)> = header
        .iter()
        .filter(|c| !c.is_empty())
        .enumerate()
        .filter_map(|(col, name)| gpu_index(name).map(|g| (col, g)))
        .collect();
    let mut gpus = 0;
    let mut cells: BTreeMap<(usize, usize), String> = BTreeMap::new();
    for line in lines {
        let fields: Vec<&str> = line
            .split('\t')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let Some(row) = fields.first().and_then(|f| gpu_index(f)) else {
            continue;
        };
        gpus = gpus.max(row + 1);
        for &(col, g) in &columns {
            if let Some(cell) = fields.get(col + 1) {
                if g != row {
                    cells
                        .entry((row.min(g), row.max(g)))
                        .or_insert_with(|| cell.to_string());
                }
            }
        }
    }
    if gpus == 0 {
        return None;
    }
    let pairs = cells
        .into_iter()
        .map(|((a, b), cell)| Pair { a, b, cell })
        .collect();
    Some((gpus, pairs))
}

/// `NV12` → 12 (a bonded set of 12 NVLinks).
fn nvlinks(cell: &str) -> Option<u32> {
    cell.strip_prefix("NV")?.parse().ok()
}

fn pair_list(pairs: &[&Pair]) -> String {
    pairs
        .iter()
        .map(|p| format!("GPU{}-GPU{} ({})", p.a, p.b, p.cell))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `topo -m` says, in one line: the NVLink pairs and the PCIe-only ones.
pub fn summarize_links(gpus: usize, pairs: &[Pair]) -> String {
    if gpus < 2 {
        return format!("{gpus} GPU: no GPU pairs");
    }
    let (nv, pcie): (Vec<&Pair>, Vec<&Pair>) =
        pairs.iter().partition(|p| nvlinks(&p.cell).is_some());
    let mut parts = vec![format!("{gpus} GPUs, {} pairs", pairs.len())];
    let nv_cells: std::collections::BTreeSet<&str> = nv.iter().map(|p| p.cell.as_str()).collect();
    if pcie.is_empty() && nv_cells.len() == 1 {
        let cell = nv_cells.first().copied().unwrap_or_default();
        parts.push(format!("every pair over NVLink ({cell})"));
    } else if nv.is_empty() {
        parts.push("no NVLink".into());
    } else {
        parts.push(format!("NVLink: {}", pair_list(&nv)));
    }
    if !pcie.is_empty() {
        parts.push(format!("PCIe only: {}", pair_list(&pcie)));
    }
    parts.join("; ")
}

/// What `topo -p2p r` says: the pairs whose peer-to-peer reads are not OK.
pub fn summarize_p2p(pairs: &[Pair]) -> String {
    let bad: Vec<&Pair> = pairs.iter().filter(|p| p.cell != "OK").collect();
    if pairs.is_empty() {
        "no GPU pairs".into()
    } else if bad.is_empty() {
        "peer-to-peer reads OK on every pair".into()
    } else {
        format!(
            "peer-to-peer reads not available: {} (NCCL then goes through host memory)",
            pair_list(&bad)
        )
    }
}

fn nvidia_smi(args: &[&str]) -> Result<String, String> {
    let out = Command::new("nvidia-smi")
        .args(args)
        .output()
        .map_err(|e| format!("nvidia-smi not found ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "`nvidia-smi {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The host's topology line, or why there is none (no nvidia-smi, no GPU, an unreadable
/// matrix).
pub fn describe() -> Result<String, String> {
    let links = nvidia_smi(&["topo", "-m"])?;
    let (gpus, pairs) =
        parse_matrix(&links).ok_or("`nvidia-smi topo -m` printed no GPU matrix (no GPU?)")?;
    let mut line = summarize_links(gpus, &pairs);
    if gpus >= 2 {
        match nvidia_smi(&["topo", "-p2p", "r"]).map(|t| parse_matrix(&t)) {
            Ok(Some((_, p2p))) => line = format!("{line}; {}", summarize_p2p(&p2p)),
            Ok(None) => line.push_str("; peer-to-peer status unreadable"),
            Err(e) => line = format!("{line}; peer-to-peer status unknown: {e}"),
        }
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two GPUs joined by four NVLinks, as `nvidia-smi topo -m` prints them (header
    /// underlined with escape codes, tab-separated, then the legend).
    const TWO_NVLINK: &str = "\u{1b}[4m\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\u{1b}[0m
GPU0\t X \tNV4\t0-31\t0\t\tN/A
GPU1\tNV4\t X \t0-31\t0\t\tN/A

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node
  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)
  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)
  PIX  = Connection traversing at most a single PCIe bridge
  NV#  = Connection traversing a bonded set of # NVLinks
";

    /// Two PCIe GPUs on different sockets, with a NIC column and its legend.
    const TWO_PCIE_NIC: &str = "\tGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tSYS\tNODE\t0-15\t0\t\tN/A
GPU1\tSYS\t X \tPIX\t16-31\t1\t\tN/A
NIC0\tNODE\tPIX\t X \t\t\t\t

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NV#  = Connection traversing a bonded set of # NVLinks

NIC Legend:

  NIC0: mlx5_0
";

    /// An 8-GPU NVSwitch board (every pair NV18), as on an HGX H100.
    fn eight_nvswitch() -> String {
        let mut t = String::from("\tGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n");
        for r in 0..8 {
            t.push_str(&format!("GPU{r}"));
            for c in 0..8 {
                t.push_str(if r == c { "\t X " } else { "\tNV18" });
            }
            let (cpus, node) = if r < 4 {
                ("0-55,112-167", 0)
            } else {
                ("56-111,168-223", 1)
            };
            t.push_str(&format!("\t{cpus}\t{node}\t\tN/A\n"));
        }
        t.push_str("\nLegend:\n\n  X    = Self\n  NV#  = Connection traversing a bonded set of # NVLinks\n");
        t
    }

    /// Eight GPUs as two NVLink-bridged quads (an older 8-GPU PCIe box): pairs inside a quad
    /// NVLink, across quads PCIe.
    fn eight_two_quads() -> String {
        let mut t = String::from(
            "\tGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tCPU Affinity\tNUMA Affinity\n",
        );
        for r in 0..8 {
            t.push_str(&format!("GPU{r}"));
            for c in 0..8 {
                let cell = if r == c {
                    " X ".to_string()
                } else if r / 4 == c / 4 {
                    "NV2".to_string()
                } else {
                    "SYS".to_string()
                };
                t.push_str(&format!("\t{cell}"));
            }
            t.push_str("\t0-63\t0\n");
        }
        t
    }

    #[test]
    fn two_gpus_over_nvlink() {
        let (gpus, pairs) = parse_matrix(TWO_NVLINK).unwrap();
        assert_eq!(gpus, 2);
        assert_eq!(
            pairs,
            vec![Pair {
                a: 0,
                b: 1,
                cell: "NV4".into()
            }]
        );
        assert_eq!(
            summarize_links(gpus, &pairs),
            "2 GPUs, 1 pairs; every pair over NVLink (NV4)"
        );
    }

    #[test]
    fn pcie_pairs_are_named_and_nic_columns_ignored() {
        let (gpus, pairs) = parse_matrix(TWO_PCIE_NIC).unwrap();
        assert_eq!(gpus, 2);
        assert_eq!(
            pairs,
            vec![Pair {
                a: 0,
                b: 1,
                cell: "SYS".into()
            }]
        );
        assert_eq!(
            summarize_links(gpus, &pairs),
            "2 GPUs, 1 pairs; no NVLink; PCIe only: GPU0-GPU1 (SYS)"
        );
    }

    #[test]
    fn eight_gpus_on_nvswitch() {
        let (gpus, pairs) = parse_matrix(&eight_nvswitch()).unwrap();
        assert_eq!((gpus, pairs.len()), (8, 28));
        assert!(pairs.iter().all(|p| p.cell == "NV18" && p.a < p.b));
        assert_eq!(
            summarize_links(gpus, &pairs),
            "8 GPUs, 28 pairs; every pair over NVLink (NV18)"
        );
    }

    #[test]
    fn eight_gpus_in_two_nvlink_quads() {
        let (gpus, pairs) = parse_matrix(&eight_two_quads()).unwrap();
        assert_eq!((gpus, pairs.len()), (8, 28));
        let nv = pairs.iter().filter(|p| p.cell == "NV2").count();
        assert_eq!(nv, 12, "6 pairs inside each quad");
        let line = summarize_links(gpus, &pairs);
        assert!(line.contains("NVLink: GPU0-GPU1 (NV2)"), "{line}");
        assert!(line.contains("PCIe only: GPU0-GPU4 (SYS)"), "{line}");
        assert!(!line.contains("GPU0-GPU4 (NV2)"), "{line}");
    }

    #[test]
    fn p2p_matrix_names_the_unsupported_pairs() {
        let text = " \tGPU0\tGPU1\tGPU2\t\nGPU0\tX\tOK\tNS\t\nGPU1\tOK\tX\tNS\t\nGPU2\tNS\tNS\tX\t\n\nLegend:\n\n  X    = Self\n  OK   = Status Ok\n  NS   = Not supported\n";
        let (gpus, pairs) = parse_matrix(text).unwrap();
        assert_eq!((gpus, pairs.len()), (3, 3));
        assert_eq!(
            summarize_p2p(&pairs),
            "peer-to-peer reads not available: GPU0-GPU2 (NS), GPU1-GPU2 (NS) (NCCL then goes through host memory)"
        );
        let ok: Vec<Pair> = pairs.into_iter().filter(|p| p.cell == "OK").collect();
        assert_eq!(summarize_p2p(&ok), "peer-to-peer reads OK on every pair");
    }

    #[test]
    fn no_matrix_and_one_gpu() {
        assert_eq!(parse_matrix("No devices were found\n"), None);
        let one = "\tGPU0\tCPU Affinity\tNUMA Affinity\nGPU0\t X \t0-7\t0\n";
        let (gpus, pairs) = parse_matrix(one).unwrap();
        assert_eq!((gpus, pairs.len()), (1, 0));
        assert_eq!(summarize_links(gpus, &pairs), "1 GPU: no GPU pairs");
    }
}
