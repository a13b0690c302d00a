//! `cargo xtask build`: the toolchain parts of setup, then `cargo build` with bpf-linker on PATH.
use std::process::Command;

use anyhow::Result;

use crate::{cmd, linker::BpfLinker, setup};

pub fn run(release: bool) -> Result<()> {
    let linker = setup::toolchain()?;
    let mut build = cargo(&linker, "build");
    if release {
        build.arg("--release");
    }
    cmd::run(&mut build)
}

/// `cargo <subcommand>` at the workspace root (so the default members, which leave out the
/// eBPF crate), with bpf-linker first on PATH: tcp-trace/build.rs builds the eBPF crate through
/// aya-build, whose nightly cargo links with whatever `bpf-linker` PATH finds.
pub fn cargo(linker: &BpfLinker, subcommand: &str) -> Command {
    let mut cargo = Command::new("cargo");
    cargo
        .arg(subcommand)
        .env("PATH", &linker.path)
        .current_dir(cmd::repo_root());
    cargo
}
