//! `cargo xtask test`: the whole suite, as root, on a machine `setup` has prepared.
use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    process::Stdio,
};

use anyhow::{Context, Result, ensure};

use crate::{build, cmd, setup};

pub fn run(args: &[OsString]) -> Result<()> {
    ensure!(
        cmd::is_root(),
        "`cargo xtask test` must run as root (sudo -E cargo xtask test) because the tests load \
         eBPF programs and create network namespaces"
    );
    let linker = setup::toolchain()?;
    setup::system_tools(setup::TEST_TOOLS)?;
    setup::export_python(setup::EXPORT_PYTHON)?;
    let mut cargo = build::cargo(&linker, "test");
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
    println!("tests: {} passed, {} failed", total.passed, total.failed);
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
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
