//! Where bpf-linker lives and the PATH that finds it: the one place every command asks.
//!
//! bpf-linker links against the nightly toolchain's own libLLVM, so a build is only good for the
//! nightly it was built with: the cache key is that nightly's rustc commit.
use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::cmd;

pub const VERSION: &str = "0.13.0";

/// bpf-linker's cache for the installed nightly, and the nightly facts needed to build it.
pub struct BpfLinker {
    /// `${XDG_CACHE_HOME:-$HOME/.cache}/tcp-trace/bpf-linker-<version>-<nightly commit>`.
    pub dir: PathBuf,
    /// PATH with `<dir>/bin` first: what every inner cargo runs with, so aya-build finds bpf-linker.
    pub path: OsString,
    /// `<nightly sysroot>/lib/libLLVM.so.*`, the library bpf-linker links against.
    pub libllvm: PathBuf,
    /// The cargo feature of bpf-linker matching nightly's LLVM, e.g. `llvm-22`.
    pub llvm_feature: String,
}

impl BpfLinker {
    pub fn exe(&self) -> PathBuf {
        self.dir.join("bin").join("bpf-linker")
    }

    /// The LLVM_PREFIX bpf-linker builds against: only `lib/`, of symlinks into the sysroot.
    pub fn llvm_prefix(&self) -> PathBuf {
        self.dir.join("llvm")
    }
}

/// Computes the cache directory for the installed nightly and the PATH to use. Builds nothing.
pub fn locate() -> Result<BpfLinker> {
    let version = cmd::capture(Command::new("rustc").args(["+nightly", "-vV"])).context(
        "the nightly toolchain is needed for the eBPF crate: rustup toolchain install nightly",
    )?;
    let commit = field(&version, "commit-hash")?;
    ensure!(
        commit.len() >= 12 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "`rustc +nightly -vV` reports commit-hash `{commit}`; a rustup nightly reports a git hash"
    );
    let llvm_major = field(&version, "LLVM version")?
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let sysroot = cmd::capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let dir = cache_home()?
        .join("tcp-trace")
        .join(format!("bpf-linker-{VERSION}-{}", &commit[..12]));
    let bin = dir.join("bin");
    let inherited = env::var_os("PATH").unwrap_or_default();
    let path = env::join_paths(std::iter::once(bin).chain(env::split_paths(&inherited)))
        .context("a PATH entry contains ':'")?;
    Ok(BpfLinker {
        dir,
        path,
        libllvm: libllvm(&Path::new(sysroot.trim()).join("lib"))?,
        llvm_feature: format!("llvm-{llvm_major}"),
    })
}

fn field<'a>(rustc_version: &'a str, name: &str) -> Result<&'a str> {
    rustc_version
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
        .map(str::trim)
        .with_context(|| format!("`rustc +nightly -vV` prints no `{name}` line"))
}

fn cache_home() -> Result<PathBuf> {
    // XDG says to ignore a relative XDG_CACHE_HOME.
    if let Some(xdg) = env::var_os("XDG_CACHE_HOME").map(PathBuf::from)
        && xdg.is_absolute()
    {
        return Ok(xdg);
    }
    let home = env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache"))
}

/// The one `libLLVM.so.<version>` in the nightly's lib dir (not `libLLVM-<major>-rust-*.so`).
fn libllvm(lib: &Path) -> Result<PathBuf> {
    let entries = lib
        .read_dir()
        .with_context(|| format!("cannot list {}", lib.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", lib.display()))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("libLLVM.so.")
        {
            found.push(entry.path());
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM.so.* in {}: is nightly installed fully?",
            lib.display()
        ),
        _ => bail!("several libLLVM.so.* in {}: {found:?}", lib.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIGHTLY: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
        commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\nLLVM version: 22.1.4\n";

    #[test]
    fn field_reads_the_value_of_a_rustc_version_line() {
        assert_eq!(
            field(NIGHTLY, "commit-hash").ok(),
            Some("e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a")
        );
        assert_eq!(field(NIGHTLY, "LLVM version").ok(), Some("22.1.4"));
        assert!(field(NIGHTLY, "host").is_err());
    }
}
