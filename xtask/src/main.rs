//! `cargo xtask <command>`: thin developer commands over cargo, rustup and apt-get. No product
//! logic lives here; every command prints the commands it runs.
use std::{ffi::OsString, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod build;
mod cmd;
mod linker;
mod package;
mod run;
mod setup;
mod test;

#[derive(Parser)]
#[command(about = "Developer commands for tcp-trace (cargo xtask <command>)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need: nightly rust-src, bpf-linker (built once, cached), ip and nft.
    Setup,
    /// Build the workspace; tcp-trace's build script builds the eBPF object with bpf-linker.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `tcp-trace agent ARGS...` in the foreground.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments for `tcp-trace agent`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run the whole test suite; must run as root (sudo -E cargo xtask test).
    Test {
        /// Arguments for `cargo test`; arguments for the test binaries go after a further `--`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build the Debian package (release binary, systemd unit, man page) into target/debian/;
    /// `--check` then installs it, checks it as `cargo xtask test` does, and purges it (root).
    Package {
        #[arg(long)]
        check: bool,
        /// Package the dev build instead of a release build (quick, for testing the package).
        #[arg(long)]
        dev: bool,
    },
    /// Run the benchmark (as root): tcp-trace against no tracer and bpftrace, report in
    /// target/bench/ (`--docs` also refreshes docs/benchmarks.md; `--quick` for a smoke run).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    // The error chain is the whole message: each step says what failed and what to do, and a
    // backtrace into xtask (RUST_BACKTRACE is often set) would only bury it.
    dispatch(Cli::parse().command).unwrap_or_else(|err| {
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Setup => setup::run()?,
        Command::Build { release } => build::run(release)?,
        Command::Run { release, args } => run::run(release, &args)?,
        Command::Test { args } => test::run(&args)?,
        Command::Bench { args } => return bench::run(&args),
        Command::Package { check, dev } => package::run(check, dev)?,
    }
    Ok(ExitCode::SUCCESS)
}
