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
    // A real server under connection churn (tests/watch_follows.rs).
    Tool {
        program: "redis-server",
        package: "redis-server",
    },
    Tool {
        program: "redis-benchmark",
        package: "redis-tools",
    },
    // tests/cotenant.rs: another BPF tracer on the host.
    Tool {
        program: "bpftrace",
        package: "bpftrace",
    },
    // tests/export.rs: a real Prometheus server, and promtool.
    Tool {
        program: "prometheus",
        package: "prometheus",
    },
];

pub fn run() -> Result<()> {
    toolchain()?;
    system_tools(TEST_TOOLS)?;
    python_packages(TEST_PYTHON_PACKAGES)
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

/// A PyPI package and the top-level module that shows it is installed.
pub struct PythonPackage {
    pub module: &'static str,
    pub package: &'static str,
}

/// What tests/grpcio.rs runs: stock gRPC for Python, a client no one here wrote.
pub const TEST_PYTHON_PACKAGES: &[PythonPackage] = &[
    PythonPackage {
        module: "grpc",
        package: "grpcio",
    },
    PythonPackage {
        module: "grpc_tools",
        package: "grpcio-tools",
    },
    PythonPackage {
        module: "grpc_health",
        package: "grpcio-health-checking",
    },
    PythonPackage {
        module: "grpc_reflection",
        package: "grpcio-reflection",
    },
    // tests/export.rs: the OTLP receiver, built from the official protos.
    PythonPackage {
        module: "opentelemetry.proto",
        package: "opentelemetry-proto",
    },
];

/// Installs the packages of missing modules with `python3 -m pip` (python3 and pip from Debian
/// first if need be). When all are there it costs one quick python3 start and prints nothing.
pub fn python_packages(packages: &[PythonPackage]) -> Result<()> {
    system_tools(&[Tool {
        program: "python3",
        package: "python3",
    }])?;
    // find_spec locates a module without importing it.
    // find_spec of a dotted name imports its parent, which fails when that is missing too.
    let probe = "import importlib.util, sys\n\
                 def missing(m):\n    \
                     try:\n        return importlib.util.find_spec(m) is None\n    \
                     except ModuleNotFoundError:\n        return True\n\
                 print(' '.join(m for m in sys.argv[1:] if missing(m)))";
    let modules = packages.iter().map(|p| p.module);
    let missing = cmd::capture(
        Command::new("python3")
            .args(["-c", probe])
            .args(modules.clone()),
    )?;
    let missing: Vec<&str> = missing.split_whitespace().collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
        system_tools(&[Tool {
            program: "pip3",
            package: "python3-pip",
        }])?;
    }
    let wanted = packages
        .iter()
        .filter(|p| missing.contains(&p.module))
        .map(|p| p.package);
    cmd::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            // Debian marks its python3 externally managed; these are test tools, not the system's.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .args(wanted),
    )?;
    let still = cmd::capture(Command::new("python3").args(["-c", probe]).args(modules))?;
    ensure!(
        still.trim().is_empty(),
        "Python modules {} are still missing after pip install",
        still.trim()
    );
    Ok(())
}
