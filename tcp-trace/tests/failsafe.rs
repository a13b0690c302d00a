//! What an operator hits on day one: bad TLS files, a bad --listen path, a umask of 000,
//! SIGHUP, sizes out of bounds. The agent either starts as asked or stops at once, saying why,
//! with nothing left attached, bound or destroyed.
//!
//! No test here loads the programs in this process: the agents that run are `tcp-trace agent`
//! child processes, so a count of this process's BPF file descriptors means something.
use std::{
    io::{BufRead, BufReader, Read},
    os::unix::{
        fs::{FileTypeExt, MetadataExt, PermissionsExt},
        process::{CommandExt, ExitStatusExt},
    },
    path::PathBuf,
    process::{Child, ChildStderr, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tcp_trace::{
    agent::{Agent, AgentConfig},
    api::{Access, ListenAddr, TlsFiles},
};

/// Longest a refused start may take: well under a supervisor's patience.
const REFUSED_WITHIN: Duration = Duration::from_secs(5);

/// A directory of the test's own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("tcp-trace-failsafe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate and its key, a key of another pair, and files that are not what they claim.
fn tls_material(dir: &Scratch) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    dir.write("cert.pem", cert.pem());
    dir.write("key.pem", key.serialize_pem());
    dir.write(
        "other.key",
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    dir.write("garbage", "this is not PEM\n");
    // Well-formed PEM around three bytes that are no certificate.
    dir.write(
        "bad-ca.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
}

/// (cert, key, client CA, what the message must say) for each kind of bad material.
fn bad_tls_cases(dir: &Scratch) -> Vec<(PathBuf, PathBuf, Option<PathBuf>, Vec<String>)> {
    let p = |name: &str| dir.path(name);
    let names = |flag: &str, name: &str, what: &str| {
        vec![format!("{flag} {}", p(name).display()), what.to_owned()]
    };
    vec![
        (
            p("garbage"),
            p("key.pem"),
            None,
            names("--tls-cert", "garbage", "no certificate"),
        ),
        (
            p("cert.pem"),
            p("garbage"),
            None,
            names("--tls-key", "garbage", "no private key"),
        ),
        (
            p("cert.pem"),
            p("missing.pem"),
            None,
            names("--tls-key", "missing.pem", "cannot read"),
        ),
        (
            p("cert.pem"),
            p("other.key"),
            None,
            vec![
                format!("--tls-key {}", p("other.key").display()),
                format!("--tls-cert {}", p("cert.pem").display()),
                "is not the private key of the certificate".into(),
            ],
        ),
        (
            p("cert.pem"),
            p("key.pem"),
            Some(p("bad-ca.pem")),
            names(
                "--tls-client-ca",
                "bad-ca.pem",
                "not usable as a CA certificate",
            ),
        ),
        (
            p("cert.pem"),
            p("key.pem"),
            Some(p("garbage")),
            names("--tls-client-ca", "garbage", "no certificate"),
        ),
    ]
}

/// This process's open BPF objects (programs, links, maps).
fn bpf_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("anon_inode:bpf"))
        })
        .count()
}

fn tcp_trace() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tcp-trace"))
}

/// Runs a command that must stop by itself within `limit`; kills it (by its own pid) and fails
/// the test if it does not.
fn run_to_exit(mut command: Command, limit: Duration) -> (ExitStatus, String, Duration) {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcp-trace runs");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status, stderr, started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `tcp-trace agent`, killed on drop if a test failed before stopping it.
struct ChildAgent {
    child: Child,
    lines: BufReader<ChildStderr>,
    /// Its start-up lines, up to "tracing".
    stderr: String,
}

impl ChildAgent {
    /// Starts the agent and waits until it says it is tracing.
    fn start(mut command: Command) -> ChildAgent {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcp-trace runs");
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let mut stderr = String::new();
        while !stderr.contains("tcp-trace: tracing") {
            let before = stderr.len();
            lines.read_line(&mut stderr).unwrap();
            if stderr.len() == before {
                let _ = child.wait();
                panic!("the agent stopped before tracing: {stderr}");
            }
        }
        ChildAgent {
            child,
            lines,
            stderr,
        }
    }

    /// Sends `signal` and waits (at most 5 s) for the agent to exit; returns its status and
    /// what it printed after starting.
    fn stop(mut self, signal: i32) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < REFUSED_WITHIN,
                "still running 5 s after signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = String::new();
        self.lines.read_to_string(&mut rest).unwrap();
        (status, rest)
    }
}

impl Drop for ChildAgent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn bad_tls_material_stops_the_agent_at_once_naming_the_file_and_what_is_wrong() {
    let dir = Scratch::new("tls-bin");
    tls_material(&dir);
    let socket = dir.path("agent.sock");
    for (cert, key, ca, said) in bad_tls_cases(&dir) {
        let mut command = tcp_trace();
        command
            .args(["agent", "--listen", "127.0.0.1:0", "--listen"])
            .arg(format!("unix:{}", socket.display()))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key);
        if let Some(ca) = &ca {
            command.arg("--tls-client-ca").arg(ca);
        }
        let (status, stderr, took) = run_to_exit(command, REFUSED_WITHIN);
        assert!(!status.success(), "{said:?}: exited {status}");
        assert_eq!(status.signal(), None, "{said:?}: not killed");
        for words in &said {
            assert!(
                stderr.contains(words.as_str()),
                "{words:?} not in: {stderr}"
            );
        }
        assert!(!stderr.contains("attached"), "nothing was loaded: {stderr}");
        assert!(!socket.exists(), "nothing was bound");
        assert!(took < REFUSED_WITHIN, "{took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_material_fails_agent_start_with_no_program_loaded_or_socket_bound() {
    let dir = Scratch::new("tls-lib");
    tls_material(&dir);
    let socket = dir.path("agent.sock");
    for (cert, key, client_ca, said) in bad_tls_cases(&dir) {
        let config = AgentConfig {
            listen: vec![
                ListenAddr::Unix(socket.clone()),
                ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
            ],
            access: Access {
                socket_group: None,
                tls: Some(TlsFiles {
                    cert,
                    key,
                    client_ca,
                }),
            },
            ..Default::default()
        };
        let started = Instant::now();
        let err = tokio::time::timeout(REFUSED_WITHIN, Agent::start(config))
            .await
            .expect("Agent::start returns")
            .err()
            .expect("refused");
        assert!(started.elapsed() < REFUSED_WITHIN);
        for words in &said {
            assert!(
                err.to_string().contains(words.as_str()),
                "{words:?} not in: {err}"
            );
        }
        assert_eq!(bpf_fds(), 0, "{err}: no BPF object held");
        assert!(!socket.exists(), "{err}: nothing bound");
    }
}

#[test]
fn a_file_a_symlink_or_a_directory_at_the_listen_path_is_refused_and_left_intact() {
    let dir = Scratch::new("listen");
    let file = dir.write("file", "precious");
    let target = dir.write("target", "the link's target");
    let link = dir.path("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let subdir = dir.path("subdir");
    std::fs::create_dir(&subdir).unwrap();
    let missing = dir.path("no/such/dir/agent.sock");
    for (path, what) in [
        (&file, "a regular file"),
        (&link, "a symbolic link"),
        (&subdir, "a directory"),
        (&missing, "does not exist"),
    ] {
        let mut command = tcp_trace();
        command
            .args(["agent", "--listen"])
            .arg(format!("unix:{}", path.display()));
        let (status, stderr, _) = run_to_exit(command, REFUSED_WITHIN);
        assert!(!status.success());
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
        assert!(stderr.contains(what), "{what:?} not in: {stderr}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"the link's target");
    assert!(subdir.is_dir());
    assert!(!dir.path("no").exists(), "no directory created");
}

#[test]
fn under_umask_000_the_socket_is_never_seen_with_a_mode_other_than_0660() {
    let dir = Scratch::new("umask");
    let socket = dir.path("agent.sock");
    // Everything that appears in the directory while the agent starts, as (name, mode).
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (dir, stop) = (dir.0.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                    if let Ok(meta) = std::fs::symlink_metadata(entry.path()) {
                        let mode = meta.permissions().mode();
                        let kind = if meta.file_type().is_socket() {
                            "socket"
                        } else {
                            "other"
                        };
                        if !seen.contains(&(kind, mode, meta.is_dir())) {
                            seen.push((kind, mode, meta.is_dir()));
                        }
                    }
                }
            }
            seen
        })
    };
    let mut command = tcp_trace();
    command
        .args(["agent", "--netns", "1", "--listen"])
        .arg(format!("unix:{}", socket.display()));
    // SAFETY: umask(2) is async-signal-safe; it only sets the child's mask before exec.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let agent = ChildAgent::start(command);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert_eq!(meta.uid(), 0);
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    for (kind, mode, is_dir) in &seen {
        match (*kind, is_dir) {
            ("socket", _) => assert_eq!(mode & 0o7777, 0o660, "{seen:?}"),
            // The agent's private directory, where the socket is bound before it moves.
            (_, true) => assert_eq!(mode & 0o7777, 0o700, "{seen:?}"),
            _ => panic!("something else appeared: {seen:?}"),
        }
    }
    let (status, _) = agent.stop(libc::SIGTERM);
    assert!(status.success());
    assert_eq!(
        std::fs::read_dir(&dir.0).unwrap().count(),
        0,
        "nothing left behind"
    );
}

#[test]
fn sighup_stops_the_agent_cleanly_and_removes_its_socket() {
    let dir = Scratch::new("hup");
    let socket = dir.path("agent.sock");
    let mut command = tcp_trace();
    command
        .args(["agent", "--netns", "1", "--listen"])
        .arg(format!("unix:{}", socket.display()));
    let agent = ChildAgent::start(command);
    assert!(socket.exists());
    let (status, rest) = agent.stop(libc::SIGHUP);
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.contains("tcp-trace: stopped"), "{rest}");
    assert!(!socket.exists());
}

#[test]
fn start_up_warns_of_a_netns_that_matches_nothing_and_of_a_plain_text_tcp_port() {
    let dir = Scratch::new("warn");
    let mut command = tcp_trace();
    command
        .args([
            "agent",
            "--netns",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--listen",
        ])
        .arg(format!("unix:{}", dir.path("agent.sock").display()));
    let agent = ChildAgent::start(command);
    let said = agent.stderr.clone();
    let (status, _) = agent.stop(libc::SIGTERM);
    assert!(status.success());
    assert!(said.contains("no network namespace has inode 1"), "{said}");
    assert!(
        said.contains("plain-text TCP: every local user can connect"),
        "{said}"
    );
    assert_eq!(said.matches("warning").count(), 2, "only those: {said}");
}

#[test]
fn sizes_beyond_their_bounds_are_refused_before_anything_starts() {
    for (flags, said) in [
        (&["--replay", "100000000"][..], "MiB"),
        (&["--netns", "0"][..], "no namespace"),
        (&["--max-connections", "0"][..], "--max-connections"),
        (&["--ring-bytes", "2147483648"][..], "resident"),
    ] {
        let mut command = tcp_trace();
        command.arg("agent").args(flags);
        let (status, stderr, _) = run_to_exit(command, REFUSED_WITHIN);
        assert_eq!(status.code(), Some(2), "{flags:?}: a usage error");
        assert!(stderr.contains(said), "{said:?} not in: {stderr}");
    }
}
