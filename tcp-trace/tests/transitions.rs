//! Every TCP state transition, captured by the real eBPF programs on the real kernel, streamed
//! over gRPC and checked against the kernel's own counters in a namespace the test made.
mod support;

use std::{net::IpAddr, sync::Arc, time::Duration};

use support::{
    NetNs,
    agent::{TestAgent, collect, endpoint, netns_filter, path, transitions_by_connection},
    roundtrips, roundtrips_across_cpus,
};
use tcp_trace::{
    agent::AgentConfig,
    proto::{self, event::Body},
};

const CLIENT: &[&str] = &[
    "CLOSE",
    "SYN_SENT",
    "ESTABLISHED",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "CLOSE",
];
const SERVER: &[&str] = &[
    "LISTEN",
    "SYN_RECV",
    "ESTABLISHED",
    "CLOSE_WAIT",
    "LAST_ACK",
    "CLOSE",
];
const LISTENER: &[&str] = &["CLOSE", "LISTEN", "CLOSE"];

/// Per connection: 5 transitions and 1 closing summary on each side; plus the listener's 2 + 1.
fn expected_events(n: usize) -> usize {
    n * 12 + 3
}

/// How the test's connections are made: [`roundtrips`] or [`roundtrips_across_cpus`].
type Traffic = fn(&NetNs, IpAddr, usize) -> Vec<support::Roundtrip>;

async fn exact_sequences_match_the_kernel_counters(addr: &str, program: StateProgram) {
    exact_sequences_of(addr, program, roundtrips, 40).await;
}

async fn exact_sequences_of(addr: &str, program: StateProgram, traffic: Traffic, n: usize) {
    let ns = Arc::new(NetNs::new("seq"));
    let mut agent = agent_with(program).await;
    let mut stream = agent.subscribe(netns_filter(ns.inode())).await;
    let before = ns.snmp();
    let addr: IpAddr = addr.parse().unwrap();
    let traffic_ns = Arc::clone(&ns);
    let trips = tokio::task::spawn_blocking(move || traffic(&traffic_ns, addr, n))
        .await
        .unwrap();
    let delta = ns.snmp().delta(&before);
    let events = collect(
        &mut stream,
        expected_events(n),
        Duration::from_secs(10),
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(
        events.len(),
        expected_events(n),
        "no duplicated or foreign events"
    );

    // Sequence numbers strictly increase; every event is from this namespace.
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(
        events
            .iter()
            .all(|e| e.connection.as_ref().unwrap().netns == ns.inode())
    );

    // The kernel's counters of this namespace agree with what was captured.
    let count_new = |state: proto::TcpState| {
        events
            .iter()
            .filter(
                |e| matches!(&e.body, Some(Body::StateChange(c)) if c.new_state == state as i32),
            )
            .count() as i64
    };
    assert_eq!(delta.get("Tcp:ActiveOpens"), n as i64);
    assert_eq!(
        count_new(proto::TcpState::SynSent),
        delta.get("Tcp:ActiveOpens")
    );
    assert_eq!(
        count_new(proto::TcpState::SynRecv),
        delta.get("Tcp:PassiveOpens")
    );

    // Every connection, both sides, went through exactly the expected transitions.
    let by_conn = transitions_by_connection(&events);
    let conn_of = |local: std::net::SocketAddr, remote: std::net::SocketAddr| {
        events
            .iter()
            .filter_map(|e| e.connection.as_ref())
            .find(|c| endpoint(&c.local) == local && endpoint(&c.remote) == remote)
            .unwrap_or_else(|| panic!("no connection {local} - {remote}"))
            .id
    };
    for trip in &trips {
        assert_eq!(
            by_conn[&conn_of(trip.client, trip.server)],
            path(CLIENT),
            "client {}",
            trip.client
        );
        assert_eq!(
            by_conn[&conn_of(trip.server, trip.client)],
            path(SERVER),
            "server side of {}",
            trip.client
        );
    }
    let listeners: Vec<_> = by_conn.values().filter(|t| **t == path(LISTENER)).collect();
    assert_eq!(listeners.len(), 1);
    assert_eq!(by_conn.len(), 2 * n + 1);

    // Each connection's closing summary tells the same path.
    for event in &events {
        if let Some(Body::ConnectionClosed(closed)) = &event.body {
            let id = event.connection.as_ref().unwrap().id;
            let states: Vec<String> = closed
                .path
                .iter()
                .map(|&s| support::agent::state(s))
                .collect();
            let mut expected = vec![by_conn[&id][0].0.clone()];
            expected.extend(by_conn[&id].iter().map(|(_, new)| new.clone()));
            assert_eq!(states, expected);
            assert!(closed.seen_open);
            assert!(closed.duration.is_some());
        }
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ipv4_connection_has_its_exact_transitions_on_both_sides_and_matches_snmp() {
    exact_sequences_match_the_kernel_counters("127.0.0.1", StateProgram::Btf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ipv6_connection_has_its_exact_transitions_on_both_sides_and_matches_snmp() {
    exact_sequences_match_the_kernel_counters("::1", StateProgram::Btf).await;
}

/// The fallback for kernels without BTF tracepoints must report exactly the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classic_tracepoint_program_reports_the_same_on_both_families() {
    exact_sequences_match_the_kernel_counters("127.0.0.1", StateProgram::Classic).await;
    exact_sequences_match_the_kernel_counters("::1", StateProgram::Classic).await;
}

/// Each CPU writes its records into a ring of its own, and the agent merges the rings by time.
/// Here every step of a connection runs on another CPU than the step before (connect,
/// accept, each close), so each socket's transitions are split between two rings, and an agent
/// that read the rings one after the other would show them out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_recorded_on_different_cpus_arrive_in_order() {
    exact_sequences_of("127.0.0.1", StateProgram::Btf, roundtrips_across_cpus, 200).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StateProgram {
    Btf,
    Classic,
}

/// An agent tracing transitions with `program`, checked to be the one attached.
async fn agent_with(program: StateProgram) -> TestAgent {
    let mut config = AgentConfig::default();
    config.capture.classic_tracepoint = program == StateProgram::Classic;
    let agent = TestAgent::start_with(config).await;
    let hook = match program {
        StateProgram::Btf => "tp_btf:inet_sock_set_state",
        StateProgram::Classic => "sock:inet_sock_set_state",
    };
    assert!(
        agent.hooks().attached.iter().any(|h| h == hook),
        "{hook} not in {:?}",
        agent.hooks().attached
    );
    agent
}

/// The classic tracer bug: a transition run in softirq reported with the pid of whatever process
/// was interrupted (tcp-trace names a task only where its system call holds the socket). Here a separate process (bash) is the client; the server is this test process.
/// The server's passive open runs in softirq while bash is current, and must not name bash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn softirq_transitions_are_never_attributed_to_the_interrupted_process() {
    transitions_name_only_the_process_whose_call_made_them(StateProgram::Btf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classic_tracepoint_program_attributes_transitions_the_same_way() {
    transitions_name_only_the_process_whose_call_made_them(StateProgram::Classic).await;
}

async fn transitions_name_only_the_process_whose_call_made_them(program: StateProgram) {
    let ns = Arc::new(NetNs::new("pid"));
    let mut agent = agent_with(program).await;
    let mut stream = agent.subscribe(netns_filter(ns.inode())).await;
    let server_ns = Arc::clone(&ns);
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let accept_tid = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let tid = Arc::clone(&accept_tid);
    let server = std::thread::spawn(move || {
        server_ns.run(move || {
            use std::io::{Read, Write};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            port_tx.send(listener.local_addr().unwrap().port()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            // SAFETY: gettid has no preconditions.
            tid.store(
                unsafe { libc::gettid() } as u32,
                std::sync::atomic::Ordering::Relaxed,
            );
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).unwrap();
            conn.write_all(b"y").unwrap();
            assert_eq!(conn.read(&mut byte).unwrap(), 0, "client closes first");
        })
    });
    let port = port_rx.recv().unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; printf x >&3; head -c1 <&3 >/dev/null; exec 3>&-"
    );
    let client = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "bash", "-c", &script])
        .spawn()
        .unwrap();
    let bash_pid = client.id().unwrap(); // `ip netns exec` execs bash in place: same pid
    let status = client.wait_with_output().await.unwrap().status;
    assert!(status.success());
    server.join().unwrap();
    let events = collect(
        &mut stream,
        expected_events(1),
        Duration::from_secs(10),
        Duration::from_millis(200),
    )
    .await;
    let me = std::process::id();

    for event in &events {
        let Some(Body::StateChange(change)) = &event.body else {
            continue;
        };
        let conn = event.connection.as_ref().unwrap();
        let transition = format!(
            "{} -> {}",
            support::agent::state(change.old_state),
            support::agent::state(change.new_state)
        );
        let task = change.task.as_ref().unwrap();
        let client_side = conn.direction == proto::Direction::Active as i32;
        if task.attribution == proto::Attribution::ProcessContext as i32 {
            let expected = if client_side { bash_pid } else { me };
            assert_eq!(
                task.pid,
                expected,
                "{transition} on the {} side ran in the wrong process's context: {task:?}",
                if client_side { "client" } else { "server" }
            );
        } else {
            assert_eq!(task.pid, 0, "{transition}: no pid outside process context");
            assert!(
                change.context == "kernel",
                "{transition}: {}",
                change.context
            );
        }
        match (client_side, transition.as_str()) {
            (true, "CLOSE -> SYN_SENT") => assert_eq!(task.pid, bash_pid, "connect() runs in bash"),
            (false, "LISTEN -> SYN_RECV") => {
                assert_ne!(task.pid, bash_pid, "the passive open is not bash's");
                // The accepted connection's owner is the listener's: this test process.
                let owner = conn.owner.as_ref().unwrap();
                assert_eq!(
                    (owner.pid, owner.attribution),
                    (me, proto::Attribution::SocketOwner as i32)
                );
            }
            _ => {}
        }
    }
    // Once accept() returned the socket, the accepting thread owns the connection.
    let server_owner = events
        .iter()
        .filter_map(|e| match &e.body {
            Some(Body::ConnectionClosed(_)) => e.connection.as_ref(),
            _ => None,
        })
        .find(|c| c.direction == proto::Direction::Passive as i32)
        .and_then(|c| c.owner.clone())
        .unwrap();
    assert_eq!(
        (server_owner.pid, server_owner.tid, server_owner.attribution),
        (
            me,
            accept_tid.load(std::sync::atomic::Ordering::Relaxed),
            proto::Attribution::Accepted as i32
        )
    );
    let client_owner = events
        .iter()
        .filter_map(|e| e.connection.as_ref())
        .find(|c| c.direction == proto::Direction::Active as i32)
        .and_then(|c| c.owner.clone())
        .unwrap();
    assert_eq!(
        (client_owner.pid, client_owner.comm.as_str()),
        (bash_pid, "bash")
    );
    agent.shutdown().await;
}

/// Tracepoints see every namespace; a netns filter lets through exactly its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_netns_filter_passes_exactly_its_namespace() {
    let (a, b) = (Arc::new(NetNs::new("fa")), Arc::new(NetNs::new("fb")));
    let mut agent = TestAgent::start().await;
    let mut only_a = agent.subscribe(netns_filter(a.inode())).await;
    let mut only_b = agent.subscribe(netns_filter(b.inode())).await;
    let (ta, tb) = (Arc::clone(&a), Arc::clone(&b));
    let (ra, rb) = tokio::join!(
        tokio::task::spawn_blocking(move || roundtrips(&ta, "127.0.0.1".parse().unwrap(), 7)),
        tokio::task::spawn_blocking(move || roundtrips(&tb, "::1".parse().unwrap(), 3)),
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let grace = Duration::from_millis(300);
    let events_a = collect(
        &mut only_a,
        expected_events(ra.len()),
        Duration::from_secs(10),
        grace,
    )
    .await;
    let events_b = collect(
        &mut only_b,
        expected_events(rb.len()),
        Duration::from_secs(10),
        grace,
    )
    .await;
    assert_eq!(events_a.len(), expected_events(7));
    assert_eq!(events_b.len(), expected_events(3));
    assert!(
        events_a
            .iter()
            .all(|e| e.connection.as_ref().unwrap().netns == a.inode())
    );
    assert!(
        events_b
            .iter()
            .all(|e| e.connection.as_ref().unwrap().netns == b.inode())
    );
    assert!(
        events_b
            .iter()
            .all(|e| endpoint(&e.connection.as_ref().unwrap().local).is_ipv6())
    );
    agent.shutdown().await;
}

/// The accept hook runs for every accept() on the host; only TCP sockets may become records.
/// With the kernel-side filter on a fresh namespace, Unix accepts there add no record, while
/// one TCP connection adds its transitions and its accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_unix_sockets_writes_no_record() {
    use std::os::unix::net::{UnixListener, UnixStream};
    let ns = Arc::new(NetNs::new("unix"));
    let mut config = AgentConfig::default();
    config.capture.netns = Some(u32::try_from(ns.inode()).unwrap());
    // The TCP control's records as without socket slots (tests/slots.rs counts those).
    config.capture.socket_slots = 0;
    let mut agent = TestAgent::start_with(config).await;
    let unix_ns = Arc::clone(&ns);
    tokio::task::spawn_blocking(move || {
        unix_ns.run(|| {
            use std::os::linux::net::SocketAddrExt as _;
            // An abstract address belongs to the namespace, like the sockets.
            let name = format!("tcp-trace-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
            let listener = UnixListener::bind_addr(&addr).unwrap();
            for _ in 0..5 {
                let _client = UnixStream::connect_addr(&addr).unwrap();
                listener.accept().unwrap();
            }
        })
    })
    .await
    .unwrap();
    // Give the agent a few drains, then the control: a TCP connection in the same namespace.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        agent.stats().await.kernel_records,
        0,
        "Unix accepts wrote records"
    );
    let tcp_ns = Arc::clone(&ns);
    tokio::task::spawn_blocking(move || roundtrips(&tcp_ns, "127.0.0.1".parse().unwrap(), 1))
        .await
        .unwrap();
    // No subscriber asks for state changes, so the kernel records only what the table needs:
    // 2 listener transitions (LISTEN, CLOSE), the client's SYN_SENT, ESTABLISHED and CLOSE, the
    // server end's ESTABLISHED and CLOSE, and 1 accept.
    const RECORDS: u64 = 2 + 3 + 2 + 1;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while agent.stats().await.kernel_records < RECORDS {
        assert!(
            tokio::time::Instant::now() < until,
            "the TCP records did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(agent.stats().await.kernel_records, RECORDS);
    agent.shutdown().await;
}
