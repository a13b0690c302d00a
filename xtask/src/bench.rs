//! `cargo xtask bench`: the benchmark (the tcp-trace-bench crate, tcp-trace/bench) in release
//! mode with the release agent, as root, with bpftrace installed for the side-by-side runs and redis for the real-server phase.
//! Writes `<target>/bench/report.md`, `report.svg` and `runs.csv`, and prints the table.
//!
//! Arguments after `--` go to the bench (`--quick`, `--rounds N`, `--duration S`,
//! `--concurrency N`, `--phases churn,always-on,redis,...`, `--idle N`, `--population N`,
//! `--no-bpftrace`; `-- --help` lists them), except `--docs`, which xtask keeps: after the run it copies the
//! report to docs/benchmarks.{md,svg,csv}, keeping the hand-written `## Analysis` section of the
//! current docs/benchmarks.md.
use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, ensure};

use crate::{
    build, cmd,
    setup::{self, Tool},
};

const BPFTRACE: &[Tool] = &[Tool {
    program: "bpftrace",
    package: "bpftrace",
}];

/// The links in report.md that name its sibling files, and their names under docs/.
const RENAMES: &[(&str, &str)] = &[
    ("](report.svg)", "](benchmarks.svg)"),
    ("`runs.csv`", "`benchmarks.csv`"),
];

/// The heading of the hand-written part of docs/benchmarks.md, kept when the report is replaced.
const ANALYSIS: &str = "\n## Analysis";

pub fn run(args: &[OsString]) -> Result<ExitCode> {
    ensure!(
        cmd::is_root(),
        "`cargo xtask bench` must run as root (sudo -E cargo xtask bench): it loads eBPF \
         programs, creates network namespaces and reads BPF run-time statistics"
    );
    let docs = args.iter().any(|a| a == "--docs");
    let bench_args: Vec<&OsString> = args.iter().filter(|a| *a != "--docs").collect();
    let linker = setup::toolchain()?;
    // Only the benchmarks need bpftrace, so `setup` does not install it.
    setup::system_tools(BPFTRACE)?;
    // The `redis` phase's server and load tool: the ones tests/watch_follows.rs runs.
    for tool in setup::TEST_TOOLS
        .iter()
        .filter(|t| t.program.starts_with("redis-"))
    {
        setup::system_tools(std::slice::from_ref(tool))?;
    }

    let out = target_dir().join("bench");
    let mut shown = vec!["cargo xtask bench".to_owned()];
    if !args.is_empty() {
        shown.push("--".into());
        shown.extend(args.iter().map(|a| a.to_string_lossy().into_owned()));
    }
    // The agent and the bench, optimised; the bench runs the agent binary as a child process.
    let mut build = build::cargo(&linker, "build");
    build.args([
        "--release",
        "--package",
        "tcp-trace",
        "--package",
        "tcp-trace-bench",
    ]);
    build.arg("--bins");
    cmd::run(&mut build)?;
    let release = target_dir().join("release");
    let mut bench = std::process::Command::new(release.join("tcp-trace-bench"));
    bench
        .arg("--agent")
        .arg(release.join("tcp-trace"))
        .args(&bench_args)
        .arg("--out")
        .arg(&out)
        .env("TCP_TRACE_BENCH_COMMAND", shown.join(" "));
    cmd::run(&mut bench)?;
    if docs {
        publish(&out, &cmd::repo_root().join("docs"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies the report into `docs` as benchmarks.{md,svg,csv}.
fn publish(out: &Path, docs: &Path) -> Result<()> {
    let read = |name: &str| {
        let path = out.join(name);
        fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    };
    let mut report = read("report.md")?;
    for (from, to) in RENAMES {
        ensure!(
            report.contains(from),
            "report.md no longer links {from}: update RENAMES in xtask/src/bench.rs"
        );
        report = report.replace(from, to);
    }
    let target = docs.join("benchmarks.md");
    if let Ok(current) = fs::read_to_string(&target)
        && let Some(at) = current.find(ANALYSIS)
    {
        report = format!("{}\n{}", report.trim_end(), &current[at..]);
    }
    fs::create_dir_all(docs).with_context(|| format!("create {}", docs.display()))?;
    fs::write(&target, report).with_context(|| format!("write {}", target.display()))?;
    fs::write(docs.join("benchmarks.svg"), read("report.svg")?)?;
    fs::write(docs.join("benchmarks.csv"), read("runs.csv")?)?;
    eprintln!("copied the report to {}", target.display());
    Ok(())
}

/// Where cargo builds: CARGO_TARGET_DIR (relative to the workspace root) or `<root>/target`.
fn target_dir() -> PathBuf {
    let root = cmd::repo_root();
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_renames_the_links_and_keeps_the_hand_written_analysis() {
        let root = env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        let (out, docs) = (root.join("out"), root.join("docs"));
        fs::create_dir_all(&out).unwrap();
        fs::create_dir_all(&docs).unwrap();
        fs::write(
            out.join("report.md"),
            "# new\n\n![figures](report.svg)\n- raw: `runs.csv`\n",
        )
        .unwrap();
        fs::write(out.join("report.svg"), "<svg/>").unwrap();
        fs::write(out.join("runs.csv"), "a,b\n").unwrap();
        fs::write(docs.join("benchmarks.md"), "# old\n\n## Analysis\n\nkept\n").unwrap();

        publish(&out, &docs).unwrap();
        let md = fs::read_to_string(docs.join("benchmarks.md")).unwrap();
        assert_eq!(
            md,
            "# new\n\n![figures](benchmarks.svg)\n- raw: `benchmarks.csv`\n\n## Analysis\n\nkept\n"
        );
        assert_eq!(
            fs::read_to_string(docs.join("benchmarks.svg")).unwrap(),
            "<svg/>"
        );
        let _ = fs::remove_dir_all(&root);
    }
}
