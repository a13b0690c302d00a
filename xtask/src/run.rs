//! `cargo xtask run`: build, then replace this process with `tcp-trace agent`, so the agent owns
//! the terminal, gets Ctrl-C directly and its exit status is the command's.
use std::{
    env, ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf, process::Command,
};

use anyhow::{Context, Result};

use crate::{build, cmd};

pub fn run(release: bool, args: &[OsString]) -> Result<()> {
    build::run(release)?;
    let profile = if release { "release" } else { "debug" };
    let mut agent = Command::new(target_dir().join(profile).join("tcp-trace"));
    agent.arg("agent").args(args);
    let shown = cmd::display(&agent);
    eprintln!("$ {shown}");
    // Not root is no reason to stop: the agent says itself what it lacks.
    let err = agent.exec();
    Err(err).with_context(|| format!("cannot run `{shown}`"))
}

/// Where `cargo build` put its output: CARGO_TARGET_DIR (relative to the workspace root, where
/// the build ran) or `<root>/target`.
pub fn target_dir() -> PathBuf {
    let root = cmd::repo_root();
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}
