//! `cargo xtask test`: the whole suite, as root, on a machine `setup` has prepared.
use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    process::Stdio,
};

use anyhow::{Context, Result, ensure};

use crate::{build, cmd, package, run, setup};

pub fn run(args: &[OsString]) -> Result<()> {
    ensure!(
        cmd::is_root(),
        "`cargo xtask test` must run as root (sudo -E cargo xtask test) because the tests load \
         eBPF programs and create network namespaces"
    );
    let linker = setup::toolchain()?;
    setup::system_tools(setup::TEST_TOOLS)?;
    setup::python_packages(setup::TEST_PYTHON_PACKAGES)?;
    let mut cargo = build::cargo(&linker, "test");
    if needs_optimised_binary(args) {
        // Some tests run the agent (and `watch`) against a busy server, which a debug build
        // cannot follow; only the binary is built optimised (the tests stay debug).
        let mut release = build::cargo(&linker, "build");
        release.args(["--release", "-p", "tcp-trace", "--bin", "tcp-trace"]);
        cmd::run(&mut release)?;
        let binary = run::target_dir().join("release").join("tcp-trace");
        cargo.env("TCP_TRACE_OPTIMISED_BIN", binary);
    }
    cargo.args(args).stdout(Stdio::piped());
    let shown = cmd::display(&cargo);
    eprintln!("$ {shown}");
    let mut child = cargo
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    // Pass the output through, and add up the test binaries' results: the suite's total is
    // the last line, where CI (and people) look.
    let mut total = Totals::default();
    let stdout = child.stdout.take().context("cargo's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        println!("{line}");
        total.add(&line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    // The package, built from the dev binary the tests just built, installed and checked
    // (seconds; a release build would take minutes). Only for the whole suite.
    if args.is_empty() && status.success() {
        let checked = package::build_deb(package::Profile::Dev)
            .and_then(|deb| package::check_installed(&deb));
        match checked {
            Ok(outcome) => {
                total.passed += outcome.passed;
                total.failed += outcome.failed;
            }
            Err(err) => {
                println!("package checks could not run: {err:#}");
                total.failed += 1;
            }
        }
    }
    println!("tests: {} passed, {} failed", total.passed, total.failed);
    ensure!(status.success(), "`{shown}` failed ({status})");
    ensure!(total.failed == 0, "{} check(s) failed", total.failed);
    Ok(())
}

/// The tests that run the optimised binary (TCP_TRACE_OPTIMISED_BIN).
const OPTIMISED: [&str; 3] = ["watch_follows", "cotenant", "nested"];

/// Whether the tests asked for may include one of [`OPTIMISED`]: the whole suite, or such a
/// test named. A `--release` run uses its own optimised binary.
fn needs_optimised_binary(args: &[OsString]) -> bool {
    let named = |a: &OsString| OPTIMISED.iter().any(|t| a.to_string_lossy().contains(t));
    let release = args.iter().any(|a| a == "--release");
    !release && (args.is_empty() || args.iter().any(named))
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
}

impl Totals {
    /// Adds a libtest summary line: `test result: ok. 39 passed; 0 failed; 0 ignored; ...`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_optimised_binary_is_built_for_the_whole_suite_and_for_the_test_that_needs_it() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(needs_optimised_binary(&[]));
        assert!(needs_optimised_binary(&args(&[
            "--",
            "--test",
            "watch_follows"
        ])));
        assert!(needs_optimised_binary(&args(&["--", "--test", "cotenant"])));
        assert!(!needs_optimised_binary(&args(&["--", "--lib", "bus"])));
        assert!(!needs_optimised_binary(&args(&[
            "--release",
            "--test",
            "watch_follows"
        ])));
    }

    #[test]
    fn totals_add_up_libtest_summary_lines_and_ignore_the_rest() {
        let mut t = Totals::default();
        t.add("test result: ok. 39 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.04s");
        t.add("test result: FAILED. 6 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add("test foo ... ok");
        assert_eq!(
            t,
            Totals {
                passed: 45,
                failed: 1
            }
        );
    }
}
