//! `cargo xtask test`: the whole suite, as root, on a machine `setup` has prepared.
use std::ffi::OsString;

use anyhow::{Result, ensure};

use crate::{build, cmd, setup};

pub fn run(args: &[OsString]) -> Result<()> {
    ensure!(
        cmd::is_root(),
        "`cargo xtask test` must run as root (sudo -E cargo xtask test) because the tests load \
         eBPF programs and create network namespaces"
    );
    let linker = setup::toolchain()?;
    setup::system_tools(setup::TEST_TOOLS)?;
    cmd::run(build::cargo(&linker, "test").args(args))
}
