//! `cargo xtask setup`: bootstrap a clean Debian machine. Every step checks before it acts, so a
//! second run changes nothing and prints only the bpf-linker line.
use std::{fs, io, os::unix::fs::symlink, path::Path, process::Command};

use anyhow::{Context, Result, ensure};

use crate::{
    cmd,
    linker::{self, BpfLinker, VERSION},
};

/// A program a command needs, and the Debian package that ships it.
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

/// What the integration tests run: `ip netns`/veth pairs, and nft rules that black-hole a peer.
pub const TEST_TOOLS: &[Tool] = &[
    Tool {
        program: "ip",
        package: "iproute2",
    },
    Tool {
        program: "nft",
        package: "nftables",
    },
    // tests/export.rs: a real Prometheus server, and promtool.
    Tool {
        program: "prometheus",
        package: "prometheus",
    },
];

/// PyPI packages the export tests' OTLP receiver (tcp-trace/tests/python) imports: (module,
/// package).
pub const EXPORT_PYTHON: &[(&str, &str)] = &[
    ("grpc", "grpcio"),
    ("opentelemetry.proto", "opentelemetry-proto"),
];

pub fn run() -> Result<()> {
    toolchain()?;
    system_tools(TEST_TOOLS)?;
    export_python(EXPORT_PYTHON)
}

/// Installs with pip the `packages` whose module python3 cannot import.
pub fn export_python(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(module, _)| {
            !cmd::succeeds(Command::new("python3").args(["-c", &format!("import {module}")]))
        })
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    cmd::run(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(&missing),
    )
}

/// What any cargo build of the workspace needs: nightly's rust-src (aya-build uses
/// `-Z build-std=core`) and bpf-linker. Returns where bpf-linker is, for the PATH.
pub fn toolchain() -> Result<BpfLinker> {
    rust_src()?;
    let linker = linker::locate()?;
    bpf_linker(&linker)?;
    Ok(linker)
}

fn rust_src() -> Result<()> {
    let installed = cmd::capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|line| line.trim() == "rust-src") {
        return Ok(());
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker(linker: &BpfLinker) -> Result<()> {
    link_libllvm(linker)?;
    if runs(linker) {
        eprintln!("bpf-linker {VERSION}: cached in {}", linker.dir.display());
        return Ok(());
    }
    let prefix = linker.llvm_prefix();
    cmd::run(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args(["+nightly", "install", &format!("bpf-linker@{VERSION}")])
            .args(["--no-default-features", "--features", &linker.llvm_feature])
            // A half-built or broken install is still recorded in <root>/.crates.toml; without
            // --force cargo would call it installed and build nothing.
            .arg("--force")
            .arg("--root")
            .arg(&linker.dir),
    )?;
    ensure!(
        runs(linker),
        "{} was built but `--version` fails",
        linker.exe().display()
    );
    eprintln!("bpf-linker {VERSION}: built into {}", linker.dir.display());
    Ok(())
}

/// Makes `<prefix>/lib` hold the nightly's libLLVM under both names bpf-linker needs:
/// `libLLVM.so`, which its build links with `-lLLVM`, and the library's own file name, which is its
/// soname: the built binary asks for that name and searches `<prefix>/lib` (its RUNPATH). Without
/// the second link it only loads under `rustup run`, which puts the toolchain's lib dir on
/// LD_LIBRARY_PATH, and fails when run directly.
fn link_libllvm(linker: &BpfLinker) -> Result<()> {
    let lib = linker.llvm_prefix().join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let soname = linker
        .libllvm
        .file_name()
        .context("libLLVM path has a file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        ensure_symlink(&lib.join(name), &linker.libllvm)?;
    }
    Ok(())
}

fn ensure_symlink(link: &Path, target: &Path) -> Result<()> {
    match fs::read_link(link) {
        Ok(current) if current == target => return Ok(()),
        Ok(_) => {
            fs::remove_file(link).with_context(|| format!("cannot replace {}", link.display()))?
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("{} is not a symlink", link.display()));
        }
    }
    symlink(target, link).with_context(|| format!("cannot create {}", link.display()))
}

/// Whether the cached bpf-linker runs on its own (RUNPATH only, no inherited LD_LIBRARY_PATH).
fn runs(linker: &BpfLinker) -> bool {
    cmd::succeeds(
        Command::new(linker.exe())
            .arg("--version")
            .env_remove("LD_LIBRARY_PATH"),
    )
}

/// Installs the Debian packages of missing `tools` as root; otherwise says what to install.
pub fn system_tools(tools: &[Tool]) -> Result<()> {
    let missing: Vec<&Tool> = tools
        .iter()
        .filter(|tool| cmd::find_program(tool.program).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|tool| tool.package).collect();
    if !cmd::is_root() {
        let programs: Vec<&str> = missing.iter().map(|tool| tool.program).collect();
        eprintln!(
            "missing {}: install with `sudo apt-get install {}` (the integration tests need them)",
            programs.join(", "),
            packages.join(" ")
        );
        return Ok(());
    }
    let apt_get = || {
        let mut apt = Command::new("apt-get");
        apt.env("DEBIAN_FRONTEND", "noninteractive");
        apt
    };
    cmd::run(apt_get().args(["update", "-qq"]))?;
    cmd::run(
        apt_get()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&packages),
    )?;
    for tool in missing {
        ensure!(
            cmd::find_program(tool.program).is_some(),
            "`{}` is still missing after installing {}",
            tool.program,
            tool.package
        );
    }
    Ok(())
}
