//! The Debian package, built with dpkg-deb from the agent binary, the systemd unit and
//! maintainer scripts in deploy/debian/, and a man page made from `--help`.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use crate::cmd;

/// The package's name, which is also the binary's and the unit's.
pub const NAME: &str = "tcp-trace";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Which build the package holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `cargo build --release`: what ships.
    Release,
    /// The dev build `cargo test` has just made: `cargo xtask test` packages it to test the
    /// package without a release build (minutes on 2 cores). Everything else is the same.
    Dev,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "debug",
        }
    }
}

/// Files installed from deploy/debian/: (source, path in the package, mode).
const INSTALLED: &[(&str, &str, u32)] = &[
    (
        "tcp-trace.service",
        "lib/systemd/system/tcp-trace.service",
        0o644,
    ),
    ("default", "etc/default/tcp-trace", 0o644),
];
const MAINTAINER_SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];

pub fn deploy_dir() -> PathBuf {
    cmd::repo_root().join("deploy").join("debian")
}

/// Stages the package tree under target/debian/ and builds the .deb next to it.
pub fn build_deb(profile: Profile) -> Result<PathBuf> {
    ensure!(
        cmd::find_program("dpkg-deb").is_some(),
        "dpkg-deb is missing: `cargo xtask package` builds Debian packages on Debian (apt-get install dpkg)"
    );
    let target = cmd::repo_root().join("target");
    let binary = target.join(profile.dir()).join(NAME);
    ensure!(
        binary.is_file(),
        "{} is missing: build it first",
        binary.display()
    );
    let arch = cmd::capture(Command::new("dpkg").arg("--print-architecture"))?;
    let arch = arch.trim();
    let out = target.join("debian");
    let stage = out.join(format!("{NAME}_{VERSION}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("cannot clear {}", stage.display()))?;
    }

    let bin = stage.join("usr/bin").join(NAME);
    copy(&binary, &bin, 0o755)?;
    // Debug info is most of a dev build's size; the package needs none of it.
    if cmd::find_program("strip").is_some() {
        cmd::run(Command::new("strip").arg("--strip-debug").arg(&bin))?;
    }
    let deploy = deploy_dir();
    for (source, dest, mode) in INSTALLED {
        copy(&deploy.join(source), &stage.join(dest), *mode)?;
    }
    let man = stage.join("usr/share/man/man1").join(format!("{NAME}.1"));
    write(&man, &man_page(&binary)?, 0o644)?;
    cmd::run(Command::new("gzip").args(["-9", "-n"]).arg(&man))?;

    let debian = stage.join("DEBIAN");
    for script in MAINTAINER_SCRIPTS {
        copy(&deploy.join(script), &debian.join(script), 0o755)?;
    }
    write(&debian.join("conffiles"), "/etc/default/tcp-trace\n", 0o644)?;
    write(&debian.join("control"), &control(arch, &stage)?, 0o644)?;

    let deb = out.join(format!("{NAME}_{VERSION}_{arch}.deb"));
    let compression = match profile {
        Profile::Release => "-Zxz",
        // Fast: this one is installed by the test and thrown away.
        Profile::Dev => "-Zgzip",
    };
    cmd::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", compression, "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

fn control(arch: &str, stage: &Path) -> Result<String> {
    let kib = dir_size(stage)? / 1024;
    Ok(format!(
        "Package: {NAME}
Version: {VERSION}
Architecture: {arch}
Maintainer: tcp-trace developers <tcp-trace@localhost>
Section: net
Priority: optional
Installed-Size: {kib}
Depends: adduser
Description: TCP connection lifecycles, traced with eBPF and streamed over gRPC
 An agent that follows every TCP socket from its first state transition to
 CLOSE (handshakes, failures and their causes, keepalive, resets, who closed
 first) and serves it over gRPC on /run/tcp-trace/tcp-trace.sock, with the
 clients watch, conns, stats and top. Runs as user tcp-trace under systemd with
 a measured set of capabilities; members of group tcp-trace may connect.
"
    ))
}

/// A man page from the binary's own `--help` and each subcommand's, so it covers every flag
/// clap knows, in clap's words.
fn man_page(binary: &Path) -> Result<String> {
    let help = |args: &[&str]| -> Result<String> {
        cmd::capture(Command::new(binary).args(args).env("COLUMNS", "100"))
    };
    let top = help(&["--help"])?;
    let mut page = format!(
        ".TH TCP-TRACE 1 \"\" \"tcp-trace {VERSION}\" \"User Commands\"\n\
         .SH NAME\ntcp-trace \\- TCP connection lifecycles, traced with eBPF and streamed over gRPC\n\
         .SH SYNOPSIS\n.B tcp-trace\n.I COMMAND\n[\\fIOPTIONS\\fR]\n\
         .SH DESCRIPTION\n.nf\n{}.fi\n",
        roff(&top)
    );
    for command in subcommands(&top) {
        let text = help(&[command, "--help"])?;
        page.push_str(&format!(
            ".SH \"TCP-TRACE {}\"\n.nf\n{}.fi\n",
            command.to_uppercase(),
            roff(&text)
        ));
    }
    page.push_str(
        ".SH FILES\n.TP\n/lib/systemd/system/tcp-trace.service\nthe agent's unit: user tcp-trace, \
         its capabilities, the socket in /run/tcp-trace\n.TP\n/etc/default/tcp-trace\nextra \
         flags for the agent (TCP_TRACE_ARGS)\n.TP\n/run/tcp-trace/tcp-trace.sock\nthe agent's \
         gRPC socket, mode 0660, group tcp-trace\n",
    );
    Ok(page)
}

/// The names under `Commands:` in clap's help, without `help`.
fn subcommands(help: &str) -> Vec<&str> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect()
}

/// Text safe inside `.nf`: backslashes escaped, and no line read as a request.
fn roff(text: &str) -> String {
    text.lines()
        .map(|line| {
            let line = line.replace('\\', "\\e");
            if line.starts_with('.') || line.starts_with('\'') {
                format!("\\&{line}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect()
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", to.display()))
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(to, text).with_context(|| format!("cannot write {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommands_are_read_from_clap_help_without_help_itself() {
        let help = "About\n\nUsage: tcp-trace <COMMAND>\n\nCommands:\n  agent  Run the agent\n  \
                    watch  Stream events\n  help   Print this message\n\nOptions:\n  -h, --help\n";
        assert_eq!(subcommands(help), ["agent", "watch"]);
    }

    #[test]
    fn roff_escapes_backslashes_and_leading_dots() {
        assert_eq!(roff("a\\b\n.x\n'y\n  .z"), "a\\eb\n\\&.x\n\\&'y\n  .z\n");
    }
}
