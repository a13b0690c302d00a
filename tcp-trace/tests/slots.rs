//! Socket slots (tcp-trace-ebpf/src/slots.rs, capture/slots.rs): while nobody asks for every
//! transition, the kernel keeps a socket's open, handshake and owner in a slot and writes one
//! record at its close. Proven here on the real kernel: connections that never closed are listed
//! and counted from their slots; a subscriber that arrives while sockets hold slots sees their
//! later transitions in order; a slot array too small for the sockets loses nothing (the
//! sockets without one are recorded as without slots, and counted).
mod support;

use std::{
    collections::BTreeMap,
    net::{TcpListener, TcpStream},
    time::Duration,
};

use support::{
    NetNs,
    agent::{TestAgent, collect, transitions_by_connection},
    roundtrips,
};
use tcp_trace::{agent::AgentConfig, proto};

fn config(ns: &NetNs, slots: u32) -> AgentConfig {
    let mut config = AgentConfig::default();
    config.capture.netns = Some(ns.inode() as u32);
    config.capture.socket_slots = slots;
    config
}

/// `n` connections to a listener in `ns`, both ends held open: (clients, servers, listener).
fn hold(ns: &NetNs, n: usize) -> (Vec<TcpStream>, Vec<TcpStream>, TcpListener) {
    ns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let addr = listener.local_addr().expect("bound");
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..n {
            clients.push(TcpStream::connect(addr).expect("connect on loopback"));
            servers.push(listener.accept().expect("accept").0);
        }
        (clients, servers, listener)
    })
}

/// A subscription to the summaries of `ns`'s connections, once the agent counts it.
async fn summaries(agent: &mut TestAgent, ns: &NetNs) -> tonic::Streaming<proto::Event> {
    let stream = agent
        .subscribe(proto::Filter {
            netns: vec![ns.inode()],
            kinds: vec![proto::EventKind::ConnectionClosed as i32],
            ..Default::default()
        })
        .await;
    agent.wait_for_subscribers(1).await;
    stream
}

/// Connections opened and held, listed at once (no wait for any drain): each from its slot,
/// with its owner and handshake, and none of them in a record before the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_in_their_slots_are_listed_with_owner_and_handshake() {
    let ns = NetNs::new("slotlist");
    let mut agent = TestAgent::start_with(config(&ns, 1 << 14)).await;
    let before = agent.stats().await;
    let n = 20;
    let (clients, servers, _listener) = hold(&ns, n);
    let connections = agent.connections(ns.inode()).await;
    let pid = std::process::id();
    let established: Vec<_> = connections
        .iter()
        .filter(|c| c.state == proto::TcpState::Established as i32)
        .collect();
    assert_eq!(
        established.len(),
        2 * n,
        "every held socket is listed: {connections:#?}"
    );
    for c in &established {
        let owner = c.owner.as_ref().expect("an owner");
        assert_eq!(owner.pid, pid, "owned by this process: {c:?}");
        let handshake = c.handshake_latency.as_ref().expect("a handshake latency");
        assert!(
            handshake.seconds == 0 && handshake.nanos > 0,
            "a loopback handshake: {c:?}"
        );
    }
    let active = established
        .iter()
        .filter(|c| c.direction == proto::Direction::Active as i32)
        .count();
    assert_eq!(active, n, "half of them connect()ed");
    let stats = agent.stats().await;
    assert_eq!(
        stats.live_connections,
        2 * n as u64 + 1,
        "GetStats counts them too (and the listener)"
    );
    // The listener's LISTEN is the only record: the opens, handshakes and accepts stayed in
    // their slots until the listing took them.
    let records = stats.kernel_records - before.kernel_records;
    assert!(
        records < n as u64,
        "{records} records for {n} connections held open: the slots were not used"
    );
    assert_eq!(stats.kernel_slot_taken, 0, "16,384 slots for 41 sockets");
    drop((clients, servers));
    agent.shutdown().await;
}

/// Sockets hold their slots when a subscriber asks for every transition: their later
/// transitions reach it in order, and their summaries keep what the slots kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_arriving_while_sockets_hold_slots_sees_their_closes_in_order() {
    let ns = NetNs::new("slotsub");
    let mut agent = TestAgent::start_with(config(&ns, 1 << 14)).await;
    let n = 10;
    let (clients, servers, _listener) = hold(&ns, n);
    let mut stream = agent
        .subscribe(proto::Filter {
            netns: vec![ns.inode()],
            kinds: vec![
                proto::EventKind::StateChange as i32,
                proto::EventKind::ConnectionClosed as i32,
            ],
            ..Default::default()
        })
        .await;
    agent.wait_for_subscribers(1).await;
    // The clients close first: FIN_WAIT1 -> FIN_WAIT2 -> CLOSE on their side (a closed
    // socket's FIN_WAIT2 goes on in a timewait socket, without a transition of its own),
    // CLOSE_WAIT -> LAST_ACK -> CLOSE on the servers'.
    drop(clients);
    std::thread::sleep(Duration::from_millis(50));
    drop(servers);
    // Per socket end 3 transitions and a summary.
    let events = collect(
        &mut stream,
        n * (4 + 4),
        Duration::from_secs(10),
        Duration::from_millis(300),
    )
    .await;
    let by_connection = transitions_by_connection(&events);
    let path = |states: &[(&str, &str)]| -> Vec<(String, String)> {
        states
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    let client_path = path(&[
        ("ESTABLISHED", "FIN_WAIT1"),
        ("FIN_WAIT1", "FIN_WAIT2"),
        ("FIN_WAIT2", "CLOSE"),
    ]);
    let server_path = path(&[
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ]);
    let mut paths: BTreeMap<&str, usize> = BTreeMap::new();
    for transitions in by_connection.values() {
        let kind = if *transitions == client_path {
            "client"
        } else if *transitions == server_path {
            "server"
        } else {
            panic!("out of order or incomplete: {transitions:?}\n{events:#?}")
        };
        *paths.entry(kind).or_default() += 1;
    }
    assert_eq!(paths, BTreeMap::from([("client", n), ("server", n)]));
    let summaries: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.body {
            Some(proto::event::Body::ConnectionClosed(closed)) => {
                Some((e.connection.as_ref().expect("a connection"), closed))
            }
            _ => None,
        })
        .collect();
    assert_eq!(summaries.len(), 2 * n, "a summary per socket end");
    for (c, closed) in summaries {
        assert!(closed.seen_open, "opened in a slot, seen open: {c:?}");
        assert!(c.handshake_latency.is_some(), "the slot's handshake: {c:?}");
        assert_eq!(
            c.owner.as_ref().map(|o| o.pid),
            Some(std::process::id()),
            "the slot's owner: {c:?}"
        );
    }
    agent.shutdown().await;
}

/// One slot for every socket of a churn: all but the socket holding it are recorded as
/// without slots and counted, and every life is still reported, as the kernel counted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_for_many_sockets_loses_nothing() {
    let ns = NetNs::new("slotone");
    let mut agent = TestAgent::start_with(config(&ns, 1)).await;
    let mut stream = summaries(&mut agent, &ns).await;
    let before = ns.snmp();
    let n = 200;
    let trips = roundtrips(&ns, "127.0.0.1".parse().unwrap(), n);
    assert_eq!(trips.len(), n);
    let events = collect(
        &mut stream,
        2 * n,
        Duration::from_secs(20),
        Duration::from_millis(300),
    )
    .await;
    let counted = ns.snmp().delta(&before);
    // The connections' summaries (the listener's too, once it closed).
    let closed: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.body {
            Some(proto::event::Body::ConnectionClosed(closed)) => {
                Some((e.connection.as_ref().expect("a connection"), closed))
            }
            _ => None,
        })
        .filter(|(c, _)| c.direction != proto::Direction::Listen as i32)
        .collect();
    let active = closed
        .iter()
        .filter(|(c, _)| c.direction == proto::Direction::Active as i32)
        .count();
    let passive = closed
        .iter()
        .filter(|(c, _)| c.direction == proto::Direction::Passive as i32)
        .count();
    assert_eq!(active as i64, counted.get("Tcp:ActiveOpens"));
    assert_eq!(passive as i64, counted.get("Tcp:PassiveOpens"));
    for (c, summary) in &closed {
        assert!(summary.seen_open, "every open seen: {c:?}");
        assert!(
            c.handshake_latency.is_some(),
            "every handshake seen: {c:?} {summary:?}"
        );
        assert!(c.owner.is_some(), "every owner seen: {c:?}");
    }
    let stats = agent.stats().await;
    assert!(
        stats.kernel_slot_taken > 0,
        "with one slot, sockets found it taken"
    );
    assert_eq!(stats.kernel_ring_full, 0);
    agent.shutdown().await;
}

/// With slots, a connection end is one record: its CLOSE with what its slot kept (a socket
/// adopted mid-handshake, or before its accept(), adds the one record its slot no longer
/// holds). The listener's LISTEN and CLOSE are records as without slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_end_is_one_record() {
    let ns = NetNs::new("slotrec");
    let mut agent = TestAgent::start_with(config(&ns, 1 << 14)).await;
    let mut stream = summaries(&mut agent, &ns).await;
    let before = agent.stats().await;
    let n = 50;
    roundtrips(&ns, "127.0.0.1".parse().unwrap(), n);
    collect(
        &mut stream,
        2 * n,
        Duration::from_secs(10),
        Duration::from_millis(300),
    )
    .await;
    let stats = agent.stats().await;
    let records = stats.kernel_records - before.kernel_records;
    let adopted = stats.slots_adopted - before.slots_adopted;
    let ends = 2 * n as u64 + 2;
    assert!(
        records >= ends && records <= ends + adopted,
        "{records} records for {n} connections and a listener ({adopted} sockets adopted)"
    );
    assert_eq!(stats.kernel_slot_taken, 0);
    agent.shutdown().await;
}
