//! `cargo xtask bench`: not written yet. It will follow `test`: `setup::toolchain()` for the PATH,
//! `setup::system_tools(&[Tool { program: "bpftrace", package: "bpftrace" }])` (bpftrace is needed
//! by the benchmarks only, so `setup` does not install it), then its cargo command through
//! `build::cargo`.
use std::{ffi::OsString, process::ExitCode};

use anyhow::Result;

pub fn run(_args: &[OsString]) -> Result<ExitCode> {
    eprintln!("cargo xtask bench: not yet implemented");
    Ok(ExitCode::from(2))
}
