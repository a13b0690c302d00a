//! The benchmark harness (`cargo xtask bench`) still runs: every phase once in `--quick` mode,
//! with the agent binary of this build. No thresholds: a quick run's numbers mean nothing, and
//! the machine may be busy. Needs root, like the other kernel tests.
#[path = "../benches/churn/mod.rs"]
mod harness;

use std::{path::PathBuf, time::Duration};

use harness::{Options, report, stats::Histogram, stats::Spread};

#[test]
fn quick_bench_runs_every_phase_and_reports_every_row() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-smoke-{}", std::process::id()));
    let mut opts = Options::quick(PathBuf::from(env!("CARGO_BIN_EXE_tcp-trace")), out.clone());
    opts.command = "cargo test --test bench_smoke".into();
    let report = harness::run(&opts).unwrap_or_else(|err| panic!("quick bench failed: {err:#}"));

    let written = std::fs::read_to_string(out.join("report.md")).expect("report.md written");
    assert_eq!(written, report.markdown);
    for measure in report::MEASURES {
        assert!(
            report.rows.iter().any(|r| r.measure == *measure),
            "no {measure:?} row in:\n{}",
            report.table
        );
        assert!(written.contains(measure), "report.md lacks {measure:?}");
    }
    // The core figures were measured, not left empty.
    for measure in [
        report::RATE,
        report::LOSS,
        report::P99_TRICKLE,
        report::AGENT_CPU,
    ] {
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

#[test]
fn latency_quantiles_come_from_buckets_and_the_exact_tail() {
    let mut h = Histogram::default();
    for us in 1..=99 {
        h.record(us * 1_000);
    }
    h.record(80_000_000);
    // 50 µs falls in the [50, 55) µs bucket, reported by its upper edge.
    assert_eq!(h.quantile(0.5), Some(Duration::from_micros(55)));
    assert_eq!(h.quantile(1.0), Some(Duration::from_millis(80)));
    let s = Spread::of([3.0, 1.0, 2.0, 10.0]).expect("values");
    assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
}
