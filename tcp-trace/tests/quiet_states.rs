//! ListConnections tells each connection's state as the kernel has it, also while the kernel
//! records only opens and closes (nobody asks for state changes): the table never hears of
//! CLOSE_WAIT, FIN_WAIT1/2 or LAST_ACK then, and the listing asks the kernel.
mod support;

use std::{
    collections::BTreeSet,
    io::Read,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use support::{
    NetNs,
    agent::{TestAgent, endpoint, netns_filter, state},
};
use tcp_trace::{agent::AgentConfig, proto};

/// (local port, remote port, state name) of each socket, sorted.
type Sockets = Vec<(u16, u16, String)>;

/// The kernel's sockets of `ns` that the table follows (not TIME_WAIT, not request sockets).
fn kernel_sockets(ns: &NetNs) -> Sockets {
    let mut sockets: Sockets = ns
        .tcp_sockets()
        .into_iter()
        .filter(|&(_, _, s)| s != 6 && s != 3)
        .map(|(local, remote, s)| (local, remote, state(i32::from(s))))
        .collect();
    sockets.sort_unstable();
    sockets
}

async fn listed_sockets(agent: &mut TestAgent, ns: &NetNs) -> Sockets {
    let mut sockets: Sockets = agent
        .connections(ns.inode())
        .await
        .iter()
        .map(|c| {
            let (local, remote) = (endpoint(&c.local), endpoint(&c.remote));
            (local.port(), remote.port(), state(c.state))
        })
        .collect();
    sockets.sort_unstable();
    sockets
}

/// Sockets held in every state a quiet kernel does not record and a test can hold without a
/// timer running out, plus ESTABLISHED ones, with the kernel's socket list once it settled.
/// Port `dropped`'s listener never gets another segment once its connections are set up.
struct Held {
    _sockets: Vec<TcpStream>,
    _listeners: [TcpListener; 2],
}

fn hold_states(ns: &NetNs) -> Held {
    let (free, dropped) = ns.run(|| {
        let bind = || TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        (bind(), bind())
    });
    let port = |l: &TcpListener| l.local_addr().expect("bound").port();
    let dropped_port = port(&dropped);
    let pair = |listener: &TcpListener| {
        let addr: SocketAddr = listener.local_addr().expect("bound");
        let client = ns.run(|| TcpStream::connect(addr).expect("connect on loopback"));
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    };
    // ESTABLISHED both ways.
    let (est_client, est_server) = pair(&free);
    // The client half-closes, the server never does: FIN_WAIT2 and CLOSE_WAIT.
    let (fw2_client, cw_server) = pair(&free);
    fw2_client.shutdown(Shutdown::Write).expect("shutdown");
    // Two more to the port whose segments will be dropped.
    let (la_client, mut la_server) = pair(&dropped);
    let (fw1_client, fw1_server) = pair(&dropped);
    la_client.shutdown(Shutdown::Write).expect("shutdown");
    // The server reads the FIN before the drop starts, so it is in CLOSE_WAIT.
    let mut eof = [0u8; 1];
    assert_eq!(la_server.read(&mut eof).expect("read the FIN"), 0);
    ns.exec(&[
        "nft",
        &format!(
            "add table inet t; add chain inet t in {{ type filter hook input priority 0; }}; \
             add rule inet t in tcp dport {dropped_port} drop"
        ),
    ]);
    // The server's FIN is answered by an ACK that is dropped: LAST_ACK (the client is in
    // TIME_WAIT). The client's FIN is dropped: FIN_WAIT1 (the server stays ESTABLISHED).
    la_server.shutdown(Shutdown::Both).expect("shutdown");
    fw1_client.shutdown(Shutdown::Write).expect("shutdown");
    Held {
        _sockets: vec![
            est_client, est_server, fw2_client, cw_server, la_client, la_server, fw1_client,
            fw1_server,
        ],
        _listeners: [free, dropped],
    }
}

/// Waits until the kernel lists the states `hold_states` makes, and returns its list.
fn settled(ns: &NetNs) -> Sockets {
    let wanted = [
        "CLOSE_WAIT",
        "ESTABLISHED",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "LAST_ACK",
        "LISTEN",
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sockets = kernel_sockets(ns);
        let states: BTreeSet<&str> = sockets.iter().map(|(_, _, s)| s.as_str()).collect();
        if states == BTreeSet::from(wanted) {
            return sockets;
        }
        assert!(
            Instant::now() < deadline,
            "the kernel's sockets did not reach {wanted:?}: {sockets:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lists until the answer equals `kernel` (the drain applies the records a moment after the
/// kernel writes them), or fails with the last answer.
async fn assert_listed_as_kernel(agent: &mut TestAgent, ns: &NetNs, kernel: &Sockets) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let listed = listed_sockets(agent, ns).await;
        if &listed == kernel || Instant::now() > deadline {
            assert_eq!(
                &listed, kernel,
                "ListConnections against the kernel's sockets"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn agent_config(ns: &NetNs, all_transitions: bool) -> AgentConfig {
    let mut config = AgentConfig::default();
    config.capture.netns = Some(u32::try_from(ns.inode()).expect("a namespace inode fits u32"));
    config.capture.all_transitions = all_transitions;
    // No healing: its periodic socket list would correct states too, only later.
    config.heal_interval = Duration::ZERO;
    config
}

/// Holds sockets in closing states in a namespace followed by an agent (recording every
/// transition or not), turns recording on with a subscriber first if `subscribe`, and checks that
/// ListConnections tells the kernel's states.
async fn lists_the_kernels_states(tag: &str, all_transitions: bool, subscribe: bool) {
    let ns = NetNs::new(tag);
    let mut agent = TestAgent::start_with(agent_config(&ns, all_transitions)).await;
    let held = hold_states(&ns);
    let kernel = settled(&ns);
    let _stream = if subscribe {
        let mut filter = netns_filter(ns.inode());
        filter.kinds = vec![proto::EventKind::StateChange as i32];
        let stream = agent.subscribe(filter).await;
        agent.wait_for_subscribers(1).await;
        Some(stream)
    } else {
        None
    };
    assert_listed_as_kernel(&mut agent, &ns, &kernel).await;
    drop(held);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_quiet_list_connections_reports_closing_states_exactly_as_the_kernel_lists_them() {
    lists_the_kernels_states("quietlist", false, false).await;
}

/// The kernel records every transition from then on, but the table never heard of the ones
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_entered_while_quiet_are_listed_right_after_a_subscriber_turns_recording_on() {
    lists_the_kernels_states("quieton", false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_all_transitions_recorded_list_connections_reports_closing_states_as_the_kernel() {
    lists_the_kernels_states("alllist", true, false).await;
}
