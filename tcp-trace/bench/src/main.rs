//! The benchmark: how much tcp-trace costs a host that opens and closes connections as fast as
//! it can (and a real server doing so), whether it loses anything, and how it compares with
//! bpftrace. Run it with `sudo -E cargo xtask bench` (or `-- --quick`), which builds the agent
//! and passes it as `--agent`; the harness is this crate's library, which tcp-trace's
//! `tests/bench_smoke.rs` runs too.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use tcp_trace_bench as harness;

#[derive(Parser)]
#[command(about = "tcp-trace benchmark (run it through `cargo xtask bench`)")]
struct Args {
    /// The `tcp-trace` binary to run as the agent (default: the one beside this binary).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// A few seconds of every phase, for the smoke test: numbers mean nothing.
    #[arg(long)]
    quick: bool,
    /// Paired rounds at full churn (each runs every variant once).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per full-churn run.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Churn worker threads (default: one per CPU).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Connections per second of the trickle phase.
    #[arg(long, value_name = "CONN_PER_S")]
    trickle_rate: Option<f64>,
    /// Idle keepalive connections held open during every churn run.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,
    /// Connections held open for the memory figure (two tracked sockets each; 0 skips it).
    #[arg(long, value_name = "N")]
    population: Option<usize>,
    /// Run only these phases (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(harness::PHASES))]
    phases: Vec<String>,
    /// Skip bpftrace even if it is installed.
    #[arg(long)]
    no_bpftrace: bool,
    /// Where to write report.md, report.svg, runs.csv and the tracers' logs.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The command to quote in the report.
    #[arg(
        long,
        value_name = "TEXT",
        env = "TCP_TRACE_BENCH_COMMAND",
        hide = true
    )]
    command: Option<String>,
}

fn main() -> ExitCode {
    if let Ok(spec) = std::env::var(harness::workload::HOLD_ENV) {
        return match harness::workload::hold_main(&spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("population holder: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = Args::parse();
    let agent = args.agent.unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap_or_default();
        exe.with_file_name("tcp-trace")
    });
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench"));
    let mut opts = if args.quick {
        harness::Options::quick(agent, out)
    } else {
        harness::Options::full(agent, out)
    };
    opts.holder_exe = std::env::current_exe().ok();
    if let Some(n) = args.rounds {
        opts.rounds = n.max(1);
    }
    if let Some(s) = args.duration {
        opts.duration = Duration::from_secs_f64(s.max(0.1));
    }
    if let Some(n) = args.concurrency {
        opts.concurrency = n.max(1);
    }
    if let Some(rate) = args.trickle_rate {
        opts.trickle_rate = rate.max(1.0);
    }
    if let Some(n) = args.idle {
        opts.idle = n;
    }
    if let Some(n) = args.population {
        opts.population = n;
    }
    if !args.phases.is_empty() {
        opts.phases = args.phases;
    }
    if args.no_bpftrace {
        opts.bpftrace = None;
    }
    if let Some(command) = args.command {
        opts.command = command;
    }
    match harness::run(&opts) {
        Ok(report) => {
            println!("{}", report.table);
            println!("report: {}", report.path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}
