//! Clients no one here wrote: stock Python grpcio (gRPC's C core, which Ruby, C++ and PHP use
//! too), with stubs generated from proto/ at test time, calls every service on the agent's Unix
//! socket and on loopback TCP; and the README's Python snippet runs as quoted.
//!
//! grpcio sends the socket path as `:authority` on a Unix socket: without the agent's
//! normalisation (api/authority.rs) every call there fails with RST_STREAM PROTOCOL_ERROR.
//! Needs python3 with grpcio, grpcio-tools, grpcio-health-checking and grpcio-reflection, which
//! `cargo xtask test` installs.
mod support;

use std::{
    collections::BTreeSet,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use support::{NetNs, Roundtrip, agent::TestAgent, roundtrips};
use tcp_trace::{agent::AgentConfig, api::ListenAddr};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{ChildStdout, Command},
    time::timeout,
};

/// Connections each client run makes and must see closed.
const CLOSED: usize = 3;
/// Longest a Python step may take (starting the interpreter and generating stubs included).
const STEP: Duration = Duration::from_secs(60);
/// The socket the README's snippet connects to; the test's agent listens elsewhere.
const README_TARGET: &str = "unix:/run/tcp-trace/tcp-trace.sock";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_grpcio() {
    let imports = "import grpc, grpc_tools, grpc_health, grpc_reflection";
    let found = std::process::Command::new("python3")
        .args(["-c", imports])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "python3 with grpcio, grpcio-tools, grpcio-health-checking and grpcio-reflection is \
         needed: run the tests with `cargo xtask test`, which installs them"
    );
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>, what: &str) -> Option<String> {
    timeout(STEP, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no line from the Python client within {STEP:?} ({what})"))
        .expect("reading the Python client's output")
}

/// Runs tests/python/grpcio_client.py against `target` while making [`CLOSED`] connections in
/// `ns`; returns its JSON report and the connections.
async fn run_client(
    agent: &mut TestAgent,
    ns: &Arc<NetNs>,
    target: &str,
) -> (Value, Vec<Roundtrip>) {
    let mut child = Command::new("python3")
        .arg(crate_dir().join("tests/python/grpcio_client.py"))
        .arg(target)
        .arg(ns.inode().to_string())
        .arg(CLOSED.to_string())
        .arg(crate_dir().join("../proto"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 starts");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let first = next_line(&mut lines, "its Subscribe call").await;
    assert_eq!(
        first.as_deref(),
        Some("subscribed"),
        "grpcio on {target}: its traceback is above"
    );
    agent.wait_for_subscribers(1).await;
    let before = ns.snmp();
    let traffic_ns = Arc::clone(ns);
    let trips = tokio::task::spawn_blocking(move || {
        roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), CLOSED)
    })
    .await
    .expect("the connections are made");
    assert_eq!(
        ns.snmp().delta(&before).get("Tcp:ActiveOpens"),
        CLOSED as i64
    );
    let mut last = None;
    while let Some(line) = next_line(&mut lines, "its report").await {
        last = Some(line);
    }
    let status = timeout(STEP, child.wait())
        .await
        .expect("the Python client exits")
        .expect("waiting for python3");
    assert!(
        status.success(),
        "grpcio on {target} failed ({status}): its traceback is above"
    );
    let report = last.expect("the Python client printed its report");
    let report = serde_json::from_str(&report)
        .unwrap_or_else(|err| panic!("the report is not JSON ({err}): {report}"));
    (report, trips)
}

fn port(endpoint: &Value) -> u64 {
    endpoint["port"].as_u64().unwrap_or(0)
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is a list"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

fn check_report(report: &Value, trips: &[Roundtrip], kept: (u16, u16), inode: u64) {
    let target = &report["target"];
    assert_eq!(report["health"], "SERVING", "{target}");

    for (protocol, own) in [
        ("reflection_v1", "grpc.reflection.v1.ServerReflection"),
        (
            "reflection_v1alpha",
            "grpc.reflection.v1alpha.ServerReflection",
        ),
    ] {
        let services = strings(&report[protocol]);
        for service in ["tcptrace.v1.TcpTrace", "grpc.health.v1.Health", own] {
            assert!(
                services.contains(service),
                "{target} {protocol} lists {services:?}, not {service}"
            );
        }
    }

    // Subscribe: exactly the connections made while subscribed, as the kernel numbered them.
    let events = report["events"].as_array().expect("events");
    let seen: BTreeSet<(u64, u64)> = events
        .iter()
        .map(|event| {
            let connection = &event["connection"];
            assert_eq!(connection["netns"], inode.to_string(), "{target}: {event}");
            assert!(event["connectionClosed"].is_object(), "{target}: {event}");
            (port(&connection["local"]), port(&connection["remote"]))
        })
        .collect();
    let made: BTreeSet<(u64, u64)> = trips
        .iter()
        .map(|trip| (u64::from(trip.client.port()), u64::from(trip.server.port())))
        .collect();
    assert_eq!(seen, made, "{target}: the connections closed");

    // ListConnections: both ends of the connection kept open in the namespace.
    let listed: BTreeSet<(u64, u64)> = report["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| (port(&c["local"]), port(&c["remote"])))
        .collect();
    let (client, server) = (u64::from(kept.0), u64::from(kept.1));
    for end in [(client, server), (server, client)] {
        assert!(
            listed.contains(&end),
            "{target}: ListConnections {listed:?} lacks {end:?}"
        );
    }

    // GetStats, taken while this client's own subscription was open.
    assert_eq!(report["stats"]["subscribers"], 1, "{target}");

    assert_eq!(
        report["undecodable_request"], "INVALID_ARGUMENT",
        "{target}"
    );

    // Loopback answers in about a millisecond; Nagle's algorithm against the client's delayed
    // ACK made each unary call over TCP take 40+ ms.
    let seconds = report["unary_call_seconds"].as_f64().expect("a time");
    assert!(
        seconds < 0.02,
        "{target}: a unary call took {:.1} ms",
        seconds * 1e3
    );
}

/// A namespace, and an agent that traces only it, serving its Unix socket (returned) and `tcp`.
async fn traced_namespace(tag: &str, tcp: Vec<ListenAddr>) -> (Arc<NetNs>, TestAgent, PathBuf) {
    require_grpcio();
    let ns = Arc::new(NetNs::new(tag));
    let mut config = AgentConfig::default();
    config.capture.netns = Some(ns.inode() as u32);
    let agent = TestAgent::start_serving(config, tcp).await;
    let ListenAddr::Unix(path) = agent.addr.clone() else {
        panic!("the test agent serves a Unix socket")
    };
    (ns, agent, path)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_calls_every_service_on_the_unix_socket_and_on_loopback_tcp() {
    let tcp = "127.0.0.1:0".parse().unwrap();
    let (ns, mut agent, path) = traced_namespace("grpcio", vec![tcp]).await;
    // A connection that stays open through both runs, for ListConnections.
    let (_listener, client, server) = ns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind in the namespace");
        let client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (listener, client, server)
    });
    let kept = (
        client.local_addr().unwrap().port(),
        server.local_addr().unwrap().port(),
    );

    let targets = [
        format!("unix:{}", path.display()),
        agent.tcp_addr().to_string(),
    ];
    for target in targets {
        let (report, trips) = run_client(&mut agent, &ns, &target).await;
        check_report(&report, &trips, kept, ns.inode());
        agent.wait_for_subscribers(0).await;
    }
    agent.shutdown().await;
}

/// The fenced Python block of the README's "Any gRPC client" paragraph.
fn readme_snippet() -> String {
    let readme = std::fs::read_to_string(crate_dir().join("../README.md")).expect("README.md");
    let (_, after) = readme
        .split_once("Any gRPC client")
        .expect("the README has an \"Any gRPC client\" paragraph");
    let (_, code) = after
        .split_once("```python\n")
        .expect("it quotes a ```python block");
    let (code, _) = code.split_once("```").expect("the block ends");
    code.to_owned()
}

/// Generates the stubs the way the README says, into `out`.
fn generate_stubs(out: &Path) {
    std::fs::create_dir_all(out).expect("a directory for the stubs");
    let proto = crate_dir().join("../proto");
    let status = std::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("tcptrace/v1/tcptrace.proto")
        .status()
        .expect("python3 runs");
    assert!(status.success(), "grpc_tools.protoc failed: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_python_snippet_prints_live_events_from_the_unix_socket() {
    let (ns, mut agent, path) = traced_namespace("snippet", vec![]).await;
    let snippet = readme_snippet();
    assert!(
        snippet.contains(README_TARGET),
        "the snippet connects to {README_TARGET}:\n{snippet}"
    );
    let script = snippet.replace(README_TARGET, &format!("unix:{}", path.display()));
    let stubs = std::env::temp_dir().join(format!("tcp-trace-stubs-{}", std::process::id()));
    generate_stubs(&stubs);

    let mut child = Command::new("python3")
        .args(["-u", "-c", &script])
        .env("PYTHONPATH", &stubs)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 starts");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    agent.wait_for_subscribers(1).await;
    let traffic_ns = Arc::clone(&ns);
    let trip = tokio::task::spawn_blocking(move || {
        roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), 1)[0]
    })
    .await
    .expect("the connection is made");

    // print(event) writes protobuf text: wait for the connection's port in this namespace.
    let (netns, client_port) = (
        format!("netns: {}", ns.inode()),
        format!("port: {}", trip.client.port()),
    );
    let mut printed = String::new();
    while !(printed.contains(&netns) && printed.contains(&client_port)) {
        let line = next_line(&mut lines, "the snippet's events")
            .await
            .unwrap_or_else(|| panic!("the snippet ended; it printed:\n{printed}"));
        printed.push_str(&line);
        printed.push('\n');
    }
    child.kill().await.expect("the snippet stops");
    let _ = std::fs::remove_dir_all(&stubs);
    agent.shutdown().await;
}
