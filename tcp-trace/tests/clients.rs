//! What a user of the clients (`watch`, `conns`, `stats`, `top`) sees when the other end goes
//! away or refuses them: a reader that closes the pipe ends the client quietly, a full disk gets
//! one line, and TLS mistakes get a sentence that says what to pass.
mod support;

use std::{
    io::{BufRead, BufReader},
    os::fd::OwnedFd,
    process::{Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use support::{NetNs, agent::TestAgent, pki::Pki, roundtrips};
use tcp_trace::agent::AgentConfig;

const TCP_TRACE: &str = env!("CARGO_BIN_EXE_tcp-trace");

/// Waits for a client process, killing it after 20 s (a client that hangs fails the test).
fn finish(mut child: std::process::Child, what: &str) -> Output {
    let until = Instant::now() + Duration::from_secs(20);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("the client's output")
}

/// Runs the binary with stdout on the write end of a pipe whose read end is already closed.
fn into_closed_pipe(args: &[String]) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let child = Command::new(TCP_TRACE)
        .args(args)
        .stdout(Stdio::from(OwnedFd::from(writer)))
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tcp-trace binary runs");
    finish(child, &format!("{args:?} into a closed pipe"))
}

fn into_dev_full(args: &[String]) -> Output {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let child = Command::new(TCP_TRACE)
        .args(args)
        .stdout(full)
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tcp-trace binary runs");
    finish(child, &format!("{args:?} into /dev/full"))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An agent in a namespace of its own with `trips` connections' events held for replay.
async fn agent_with_history(tag: &str, trips: usize) -> (Arc<NetNs>, TestAgent) {
    let ns = Arc::new(NetNs::new(tag));
    let mut config = AgentConfig::default();
    config.capture.netns = Some(ns.inode() as u32);
    // Nobody subscribes while the history is made: only --all-transitions builds it.
    config.capture.all_transitions = true;
    let mut agent = TestAgent::start_with(config).await;
    let traffic = Arc::clone(&ns);
    tokio::task::spawn_blocking(move || roundtrips(&traffic, "127.0.0.1".parse().unwrap(), trips))
        .await
        .unwrap();
    // Every connection's two closing summaries are published once the agent has seen them.
    let until = Instant::now() + Duration::from_secs(10);
    while agent.stats().await.events_published < 12 * trips as u64 {
        assert!(
            Instant::now() < until,
            "the agent did not publish the trips"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ns, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_every_client_quietly_and_a_full_disk_gets_one_line() {
    let (_ns, agent) = agent_with_history("pipe", 300).await;
    let connect = agent.addr.to_string();
    let clients = [
        args(&["watch", "--connect", &connect, "--replay-last", "1000"]),
        args(&[
            "watch",
            "--json",
            "--connect",
            &connect,
            "--replay-last",
            "1000",
        ]),
        args(&["stats", "--connect", &connect]),
        args(&["stats", "--json", "--connect", &connect]),
        args(&["conns", "--connect", &connect]),
        args(&["conns", "--json", "--connect", &connect]),
        args(&["top", "--once", "--interval", "0.1", "--connect", &connect]),
    ];
    let results = tokio::task::spawn_blocking(move || {
        clients
            .iter()
            .map(|a| (a.clone(), into_closed_pipe(a), into_dev_full(a)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (args, closed, full) in results {
        // Rust ignores SIGPIPE, so the write sees EPIPE: rc 0, nothing said.
        assert_eq!(
            closed.status.code(),
            Some(0),
            "{args:?}: {}",
            stderr(&closed)
        );
        assert_eq!(stderr(&closed), "", "{args:?} into a closed pipe");
        let said = stderr(&full);
        assert_eq!(full.status.code(), Some(1), "{args:?}: {said}");
        assert!(!said.contains("panicked"), "{args:?}: {said}");
        assert_eq!(
            said.trim_end(),
            "tcp-trace: cannot write to stdout: No space left on device (os error 28)",
            "{args:?} into /dev/full"
        );
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_piped_into_head_ends_with_rc_0_when_head_exits() {
    // Enough history for several batches: the write after `head` exits finds the pipe closed.
    let (_ns, agent) = agent_with_history("head", 300).await;
    let connect = agent.addr.to_string();
    for json in [false, true] {
        let mut command = Command::new(TCP_TRACE);
        command.args(["watch", "--connect", &connect, "--replay-last", "3600"]);
        if json {
            command.arg("--json");
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the tcp-trace binary runs");
        // `head -1`: one line, then the reader is gone.
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.ends_with('\n'), "one whole line: {first:?}");
        let out = tokio::task::spawn_blocking(move || finish(child, "watch | head -1"))
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "json {json}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "json {json}");
    }
    agent.shutdown().await;
}

/// Runs a client that must fail, returning its one line of stderr.
fn refused(args: &[&str]) -> String {
    let child = Command::new(TCP_TRACE)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tcp-trace binary runs");
    let out = finish(child, &format!("{args:?}"));
    let said = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
    assert!(!said.contains("panicked"), "{args:?}: {said}");
    assert_eq!(said.lines().count(), 1, "{args:?}: one line: {said}");
    said
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mistakes_each_get_a_sentence_that_says_what_to_pass() {
    let pki = Pki::new();
    let mutual = AgentConfig {
        access: pki.server(true),
        ..Default::default()
    };
    let loopback = || vec!["127.0.0.1:0".parse().unwrap()];
    let tls_agent = TestAgent::start_serving(mutual, loopback()).await;
    let plain_agent = TestAgent::start_serving(AgentConfig::default(), loopback()).await;
    let tls_addr = tls_agent.tcp_addr().to_string();
    let plain_addr = plain_agent.tcp_addr().to_string();
    let ca = pki.path("ca.pem").display().to_string();
    let file = |name: &str| pki.path(name).display().to_string();
    let (cert, key) = (file("client.pem"), file("client.key"));
    let (rogue_cert, rogue_key) = (file("rogue.pem"), file("rogue.key"));
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            args(&["stats", "--connect", &tls_addr, "--tls-ca", &ca]),
            "the agent requires a client certificate: pass --tls-cert and --tls-key".into(),
        ),
        (
            args(&["watch", "--connect", &tls_addr, "--tls-ca", &ca]),
            "the agent requires a client certificate: pass --tls-cert and --tls-key".into(),
        ),
        (
            args(&[
                "stats",
                "--connect",
                &tls_addr,
                "--tls-ca",
                &ca,
                "--tls-cert",
                &rogue_cert,
                "--tls-key",
                &rogue_key,
            ]),
            "the agent refused the client certificate".into(),
        ),
        (
            args(&["stats", "--connect", &tls_addr]),
            format!("the agent at {tls_addr} serves TLS: pass --tls-ca"),
        ),
        (
            args(&["conns", "--connect", &tls_addr]),
            format!("the agent at {tls_addr} serves TLS: pass --tls-ca"),
        ),
        (
            args(&[
                "stats",
                "--connect",
                &plain_addr,
                "--tls-ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ]),
            format!("the agent at {plain_addr} does not serve TLS"),
        ),
    ];
    let said = tokio::task::spawn_blocking(move || {
        cases
            .into_iter()
            .map(|(args, expected)| {
                let list: Vec<&str> = args.iter().map(String::as_str).collect();
                (args.clone(), refused(&list), expected)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let wrong: Vec<String> = said
        .iter()
        .filter(|(_, said, expected)| !said.contains(expected))
        .map(|(args, said, expected)| format!("{args:?}\n  said: {said}  expected: {expected}"))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The right certificate is served.
    let ok = Command::new(TCP_TRACE)
        .args(["stats", "--connect", &tls_addr, "--tls-ca", &ca])
        .args(["--tls-cert", &cert, "--tls-key", &key])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", stderr(&ok));
    tls_agent.shutdown().await;
    plain_agent.shutdown().await;
}
