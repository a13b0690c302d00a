//! `cargo xtask package`: the Debian package ([`deb`]) and, with `--check`, the package installed
//! and checked as an operator would meet it ([`check`]).
use anyhow::{Result, ensure};

use crate::{build, cmd, setup};

mod check;
mod deb;

pub use check::run as check_installed;
pub use deb::{Profile, build_deb};

/// Builds the release binary (the dev one with `dev`), then the .deb; with `check`, installs
/// and checks it, then purges it.
pub fn run(check: bool, dev: bool) -> Result<()> {
    let linker = setup::toolchain()?;
    let mut cargo = build::cargo(&linker, "build");
    cargo.args(["--package", deb::NAME]);
    let profile = if dev {
        Profile::Dev
    } else {
        cargo.arg("--release");
        Profile::Release
    };
    cmd::run(&mut cargo)?;
    let deb = build_deb(profile)?;
    eprintln!("package: {}", deb.display());
    if check {
        ensure!(
            cmd::is_root(),
            "`cargo xtask package --check` installs the package: run it as root"
        );
        let outcome = check_installed(&deb)?;
        println!(
            "package checks: {} passed, {} failed",
            outcome.passed, outcome.failed
        );
        ensure!(
            outcome.failed == 0,
            "{} package check(s) failed",
            outcome.failed
        );
    }
    Ok(())
}
