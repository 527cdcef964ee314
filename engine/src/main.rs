//! The `rvllm` binary: argument parsing and dispatch only.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rvllm",
    about = "A vLLM-class LLM inference engine",
    disable_version_flag = true
)]
struct Cli {
    /// Print version, commit, target and compiled device backends.
    #[arg(long, short = 'V')]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate completions offline for prompts on the command line or in a file.
    Generate(rvllm::cli::generate::GenerateArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(rvllm::server::ServeArgs),
    /// Benchmarks shaped like `vllm bench`.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Latency of one batch (batch-1 decode speed, time to first token).
    Latency(rvllm::bench::offline::LatencyArgs),
    /// Offline throughput over many random prompts.
    Throughput(rvllm::bench::offline::ThroughputArgs),
    /// Load-test an OpenAI-compatible server (rvllm or another).
    Serve(rvllm::bench::serve::ServeBenchArgs),
    /// Merge the saved results of `bench serve` runs made one after another (`--shard I/N`).
    ServeMerge(rvllm::bench::serve_merge::ServeMergeArgs),
}

fn main() {
    let cli = Cli::parse_from(rvllm::cli::vllm_aliases::expand_vllm_aliases(
        std::env::args_os(),
    ));
    if cli.version {
        println!("{}", rvllm::version_string());
        return;
    }
    let result = match cli.command {
        Some(Command::Generate(a)) => rvllm::cli::generate::run(a),
        Some(Command::Serve(a)) => rvllm::server::run(a),
        Some(Command::Bench(BenchCommand::Serve(a))) => rvllm::bench::serve::run(a),
        Some(Command::Bench(BenchCommand::ServeMerge(a))) => rvllm::bench::serve_merge::run(a),
        Some(Command::Bench(BenchCommand::Latency(a))) => rvllm::bench::offline::run_latency(a),
        Some(Command::Bench(BenchCommand::Throughput(a))) => {
            rvllm::bench::offline::run_throughput(a)
        }
        None => {
            eprintln!("rvllm: give a command (generate, serve, bench); see `rvllm --help`");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
