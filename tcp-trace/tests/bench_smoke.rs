//! The benchmark (`cargo xtask bench`, the tcp-trace-bench crate) still runs: every phase once
//! in `--quick` mode, with the agent binary of this build. No thresholds: a quick run's numbers
//! mean nothing, and the machine may be busy. Needs root, like the other kernel tests.
use std::path::PathBuf;

use tcp_trace_bench::{Options, figures};

#[test]
fn quick_bench_runs_every_phase_and_reports_every_row() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-smoke-{}", std::process::id()));
    let mut opts = Options::quick(PathBuf::from(env!("CARGO_BIN_EXE_tcp-trace")), out.clone());
    opts.command = "cargo test --test bench_smoke".into();
    let report =
        tcp_trace_bench::run(&opts).unwrap_or_else(|err| panic!("quick bench failed: {err:#}"));

    let written = std::fs::read_to_string(out.join("report.md")).expect("report.md written");
    assert_eq!(written, report.markdown);
    for measure in figures::MEASURES {
        assert!(
            report.rows.iter().any(|r| r.measure == *measure),
            "no {measure:?} row in:\n{}",
            report.table
        );
        assert!(written.contains(measure), "report.md lacks {measure:?}");
    }
    // The core figures were measured, not left empty; redis only where it is installed
    // (`cargo xtask test` installs it).
    let mut measured = vec![
        figures::RATE,
        figures::RATIO_COUNTED,
        figures::LOSS,
        figures::P99_TRICKLE,
        figures::AGENT_CPU,
        figures::AGENT_CPU_CONNECTION,
    ];
    if opts.redis_tools.is_some() {
        measured.push(figures::REDIS_RATE);
    }
    for measure in measured {
        assert!(
            report
                .rows
                .iter()
                .any(|r| r.measure == measure && r.value.is_some()),
            "{measure:?} has no value:\n{}",
            report.table
        );
    }
    let svg = std::fs::read_to_string(out.join("report.svg")).expect("report.svg written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let csv = std::fs::read_to_string(out.join("runs.csv")).expect("runs.csv written");
    assert!(csv.lines().count() > 5, "one line per run:\n{csv}");
    let _ = std::fs::remove_dir_all(&out);
}
