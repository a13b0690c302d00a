//! Running system commands: every command that changes something is printed before it runs.
use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};

/// The workspace root: the inner `cargo` commands run there whatever directory `cargo xtask` ran in.
pub fn repo_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints `cmd`, runs it with inherited stdio and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

/// Runs a read-only probe quietly and returns its stdout.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    ensure!(
        output.status.success(),
        "`{shown}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8(output.stdout).with_context(|| format!("`{shown}` printed non-UTF-8"))
}

/// Whether a probe starts and exits successfully; its output is discarded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `cmd` as a shell line, environment overrides first; an extended PATH shows as `dir:$PATH`.
pub fn display(cmd: &Command) -> String {
    let inherited_path = env::var_os("PATH").unwrap_or_default();
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        let Some(value) = value else { continue };
        let value = value.to_string_lossy();
        let shown = match value.strip_suffix(&*inherited_path.to_string_lossy()) {
            Some(prefix) if key == "PATH" && prefix.ends_with(':') => format!("{prefix}$PATH"),
            _ => quote(value.as_ref()),
        };
        words.push(format!("{}={shown}", key.to_string_lossy()));
    }
    words.push(quote(&cmd.get_program().to_string_lossy()));
    words.extend(cmd.get_args().map(|arg| quote(&arg.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+@,%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Finds an executable on PATH, or in the sbin directories a non-root PATH often lacks (ip, nft).
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(OsStr::new(name)))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    #[test]
    fn display_shows_an_extended_path_as_a_prefix_of_dollar_path() {
        let mut path = OsString::from("/cache/bin:");
        path.push(env::var_os("PATH").unwrap_or_default());
        let mut cmd = Command::new("cargo");
        cmd.arg("test").env("PATH", path);
        assert_eq!(display(&cmd), "PATH=/cache/bin:$PATH cargo test");
    }

    #[test]
    fn display_quotes_words_a_shell_would_split() {
        let mut cmd = Command::new("tcp-trace");
        cmd.args(["agent", "a b", "it's", ""]);
        assert_eq!(display(&cmd), r"tcp-trace agent 'a b' 'it'\''s' ''");
    }
}
