//! The gRPC service under load and abuse, against a real agent and real traffic: many filtered
//! subscribers, a stalled one, reconnects with since_seq, accounting that adds up, bad inputs,
//! TLS, the CLI's new views, and what a subscriber and a replay slot cost in memory.
mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::Duration,
};

use support::{
    NetNs,
    agent::{TestAgent, collect, netns_filter, stalling_client},
    pki::Pki,
    roundtrips,
};
use tcp_trace::{
    agent::AgentConfig,
    api::ListenAddr,
    client::{ClientTls, ConnectOptions},
    proto::{self, event::Body},
};
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);
/// Long enough for any extra (duplicated or leaked) event to show up.
const GRACE: Duration = Duration::from_millis(300);

/// Every event of one `roundtrips(ns, addr, n)` call: per connection 5 transitions and a closing
/// summary on each side, plus the listener's 2 and its summary.
fn roundtrip_events(n: usize) -> usize {
    n * 12 + 3
}

/// `n` connections to a listener on 127.0.0.1:`port` in `ns`, for each port in turn, all from
/// one thread (so every socket has the same owner). Unlike `roundtrips`, the ports are chosen by
/// the test, so subscribers can filter on them before the listener exists. Returns the thread's
/// task name (what the kernel reports as comm).
fn connections_on_ports(ns: &NetNs, ports: &[u16], n: usize) -> String {
    ns.run(|| {
        let comm = std::fs::read_to_string("/proc/thread-self/comm").expect("own comm");
        for &port in ports {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind");
            for _ in 0..n {
                let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
                let (mut server, _) = listener.accept().expect("accept");
                let mut byte = [0u8; 1];
                client.write_all(b"q").unwrap();
                server.read_exact(&mut byte).unwrap();
                server.write_all(b"a").unwrap();
                client.read_exact(&mut byte).unwrap();
                drop(client);
                assert_eq!(server.read(&mut byte).unwrap(), 0, "EOF");
            }
        }
        comm.trim_end().to_owned()
    })
}

fn seqs(events: &[proto::Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn lost_events(events: &[proto::Event]) -> u64 {
    events.iter().filter(|e| lost_count(e).is_some()).count() as u64
}

fn lost_count(event: &proto::Event) -> Option<u64> {
    match &event.body {
        Some(Body::Lost(lost)) => Some(lost.count),
        _ => None,
    }
}

/// The subscriber the test told apart by its queue capacity (or, with `None`, by the default).
fn by_queue(stats: &proto::Stats, queue: Option<u32>) -> &proto::SubscriberStats {
    stats
        .subscriptions
        .iter()
        .find(|s| match queue {
            Some(q) => s.queue_capacity == q,
            None => s.queue_capacity == tcp_trace::api::Limits::default().subscriber_queue as u32,
        })
        .unwrap_or_else(|| {
            panic!(
                "no subscriber with queue {queue:?}: {:#?}",
                stats.subscriptions
            )
        })
}

fn assert_adds_up(s: &proto::SubscriberStats) {
    assert_eq!(
        s.matched,
        s.delivered + s.dropped + s.queued,
        "matched = delivered + dropped + queued: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_subscribers_with_different_filters_each_get_exactly_their_share() {
    const N: usize = 6;
    const PORTS: [u16; 5] = [21001, 21002, 21003, 21004, 21005];
    let namespaces = [
        Arc::new(NetNs::new("sharea")),
        Arc::new(NetNs::new("shareb")),
    ];
    let mut agent = TestAgent::start().await;
    // The comm of the thread that will make the traffic, known before it runs.
    let comms: Vec<String> = namespaces
        .iter()
        .map(|ns| ns.run(|| std::fs::read_to_string("/proc/thread-self/comm").unwrap()))
        .map(|c| c.trim_end().to_owned())
        .collect();
    let pid = std::process::id();
    // (what the variant adds to netns + port, events it gets per listener)
    let variants: Vec<(proto::Filter, usize)> = vec![
        (proto::Filter::default(), N * 12 + 3),
        (kinds(proto::EventKind::StateChange), N * 10 + 2),
        (kinds(proto::EventKind::ConnectionClosed), N * 2 + 1),
        (directions(proto::Direction::Active), N * 6),
        (directions(proto::Direction::Passive), N * 6),
        (directions(proto::Direction::Listen), 3),
        (states(&[proto::TcpState::Established]), N * 2),
        // FIN_WAIT2 -> CLOSE, LAST_ACK -> CLOSE, LISTEN -> CLOSE, and every closing summary.
        (states(&[proto::TcpState::Close]), N * 4 + 2),
        (proto::Filter::default(), N * 12 + 3), // + comm, below
        (
            proto::Filter {
                pids: vec![pid],
                addresses: vec!["127.0.0.0/8".into()],
                ..Default::default()
            },
            N * 12 + 3,
        ),
    ];
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(tcp_trace::client::connect(&agent.addr).await.unwrap());
    }
    let mut readers = tokio::task::JoinSet::new();
    let mut total = 0;
    for (n, ns) in namespaces.iter().enumerate() {
        for &port in &PORTS {
            for (v, (extra, expected)) in variants.iter().enumerate() {
                let mut filter = extra.clone();
                filter.netns = vec![ns.inode()];
                filter.ports = vec![u32::from(port)];
                if v == 8 {
                    filter.comms = vec![comms[n].clone()];
                }
                let client = &mut channels[total % 4];
                total += 1;
                let request = proto::SubscribeRequest {
                    filter: Some(filter.clone()),
                    ..Default::default()
                };
                let mut stream = client.subscribe(request).await.unwrap().into_inner();
                let expected = *expected;
                let inode = ns.inode();
                readers.spawn(async move {
                    let events = collect(&mut stream, expected, 20 * SECOND, GRACE).await;
                    assert_eq!(events.len(), expected, "variant {v}: {filter:?}");
                    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
                    for e in &events {
                        let c = e.connection.as_ref().expect("a connection");
                        assert_eq!(c.netns, inode);
                        let ports = [
                            c.local.as_ref().unwrap().port,
                            c.remote.as_ref().unwrap().port,
                        ];
                        assert!(ports.contains(&u32::from(port)), "{e:?}");
                    }
                    (v, events.len())
                });
            }
        }
    }
    assert_eq!(total, 100);
    assert_eq!(agent.stats().await.subscribers, 100);
    let traffic: Vec<_> = namespaces
        .iter()
        .map(|ns| {
            let ns = Arc::clone(ns);
            tokio::task::spawn_blocking(move || connections_on_ports(&ns, &PORTS, N))
        })
        .collect();
    for (n, t) in traffic.into_iter().enumerate() {
        assert_eq!(
            t.await.unwrap(),
            comms[n],
            "the traffic ran on the thread it named"
        );
    }
    let mut done = 0;
    while let Some(result) = readers.join_next().await {
        result.expect("each subscriber got exactly its share");
        done += 1;
    }
    assert_eq!(done, 100);
    let stats = agent.stats().await;
    for s in &stats.subscriptions {
        assert_eq!((s.dropped, s.queued), (0, 0), "{s:?}");
        assert_adds_up(s);
    }
    agent.shutdown().await;
}

/// An agent that sees only `ns` (filtered in the kernel): its seqs are that namespace's events
/// alone.
fn only(ns: &NetNs) -> AgentConfig {
    let mut config = AgentConfig::default();
    config.capture.netns = Some(ns.inode() as u32);
    config
}

fn kinds(kind: proto::EventKind) -> proto::Filter {
    proto::Filter {
        kinds: vec![kind as i32],
        ..Default::default()
    }
}

fn directions(direction: proto::Direction) -> proto::Filter {
    proto::Filter {
        directions: vec![direction as i32],
        ..Default::default()
    }
}

fn states(states: &[proto::TcpState]) -> proto::Filter {
    proto::Filter {
        states: states.iter().map(|&s| s as i32).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_gets_lost_with_the_exact_count_and_the_others_lose_nothing() {
    const N: usize = 100;
    let ns = Arc::new(NetNs::new("stall"));
    let mut agent = TestAgent::start().await;
    let mut fast = agent.subscribe(netns_filter(ns.inode())).await;
    let mut stalled_client = stalling_client(&agent.addr).await;
    let request = proto::SubscribeRequest {
        // The same events as `fast`; GetStats tells the two apart by queue capacity.
        filter: Some(netns_filter(ns.inode())),
        queue: 16,
        ..Default::default()
    };
    let mut stalled = stalled_client
        .subscribe(request)
        .await
        .unwrap()
        .into_inner();
    let traffic_ns = Arc::clone(&ns);
    tokio::task::spawn_blocking(move || roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), N))
        .await
        .unwrap();
    let expected = roundtrip_events(N);
    let all = collect(&mut fast, expected, 10 * SECOND, GRACE).await;
    assert_eq!(all.len(), expected, "the fast subscriber loses nothing");
    assert!(all.iter().all(|e| lost_count(e).is_none()));

    let stats = agent.stats().await;
    let slow = by_queue(&stats, Some(16));
    let quick = by_queue(&stats, None);
    assert_eq!(
        (quick.matched, quick.delivered, quick.dropped),
        (expected as u64, expected as u64, 0)
    );
    assert_eq!(slow.matched, expected as u64);
    assert!(slow.dropped > 0, "the stalled one lost events: {slow:?}");
    assert_adds_up(slow);
    assert_eq!(stats.subscriber_drops, slow.dropped);

    // Now it reads: everything it was sent, then one Lost at the gap, with no new event needed
    // to carry it.
    let mut got = Vec::new();
    let mut lost = 0;
    while (got.len() as u64 - lost_events(&got)) + lost < expected as u64 {
        let event = tokio::time::timeout(10 * SECOND, stalled.message())
            .await
            .expect("the stalled subscriber is told what it lost")
            .unwrap()
            .unwrap();
        lost += lost_count(&event).unwrap_or(0);
        got.push(event);
    }
    assert_eq!(
        lost, slow.dropped,
        "Lost counts exactly what GetStats counts as dropped"
    );
    // Each Lost covers exactly the events missing between the previous event it received and
    // the Lost's seq (the last dropped one).
    let all_seqs = seqs(&all);
    let mut previous = 0;
    for event in &got {
        match lost_count(event) {
            Some(count) => {
                let missing = all_seqs
                    .iter()
                    .filter(|&&s| s > previous && s <= event.seq)
                    .count() as u64;
                assert_eq!(count, missing, "Lost at seq {}", event.seq);
            }
            None => assert!(all_seqs.contains(&event.seq)),
        }
        previous = event.seq;
    }
    assert_eq!(previous, *all_seqs.last().unwrap());
    let stats = agent.stats().await;
    let slow = by_queue(&stats, Some(16));
    assert_adds_up(slow);
    assert_eq!(
        (slow.delivered, slow.queued),
        (got.len() as u64 - lost_events(&got), 0)
    );

    // Disconnecting frees it; its accounting stays in the totals.
    drop(stalled);
    drop(stalled_client);
    let stats = agent.wait_for_subscribers(1).await;
    let t = stats.subscriber_totals.unwrap();
    assert_eq!(
        t.matched,
        t.delivered + t.dropped + t.queued + t.abandoned,
        "{t:?}"
    );
    assert_eq!(t.dropped, lost);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_since_seq_gives_a_gap_free_union_while_traffic_flows() {
    const CALLS: usize = 40;
    let ns = Arc::new(NetNs::new("resume"));
    let mut agent = TestAgent::start().await;
    let filter = netns_filter(ns.inode());
    let mut reference = agent.subscribe(filter.clone()).await;
    let mut first = agent.subscribe(filter.clone()).await;
    let traffic_ns = Arc::clone(&ns);
    let traffic = tokio::task::spawn_blocking(move || {
        for _ in 0..CALLS {
            roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), 1);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let expected = CALLS * roundtrip_events(1);
    // Read some, then go away mid-stream while the traffic goes on.
    let before = collect(&mut first, 40, 10 * SECOND, Duration::ZERO).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = before.last().unwrap().seq;
    let request = proto::SubscribeRequest {
        filter: Some(filter.clone()),
        since_seq: Some(since),
        ..Default::default()
    };
    let mut second = agent.subscribe_with(request).await;
    traffic.await.unwrap();
    let all = collect(&mut reference, expected, 10 * SECOND, GRACE).await;
    assert_eq!(all.len(), expected);
    let after = collect(&mut second, expected - before.len(), 10 * SECOND, GRACE).await;
    assert!(
        after.iter().all(|e| lost_count(e).is_none()),
        "nothing expired"
    );
    assert!(after[0].seq > since);
    let mut union = seqs(&before);
    union.extend(seqs(&after));
    assert_eq!(union, seqs(&all), "no gap, no duplicate, same order");
    let stats = agent.stats().await;
    let resumed = stats
        .subscriptions
        .iter()
        .find(|s| s.replayed > 0)
        .expect("the resumed subscriber replayed events");
    assert_eq!(resumed.matched, (expected - before.len()) as u64);
    assert_adds_up(resumed);
    agent.shutdown().await;
}

/// While the only subscriber asks for closes, the kernel records only opens and closes. A
/// subscription that later resumes that history asking for everything is told, before it,
/// that the history lacks its state changes, and gets the closes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_recorded_while_quiet_says_its_state_changes_are_missing() {
    const N: usize = 10;
    let ns = Arc::new(NetNs::new("unrec"));
    let mut agent = TestAgent::start_with(only(&ns)).await;
    let mut watcher = agent
        .subscribe(kinds(proto::EventKind::ConnectionClosed))
        .await;
    agent.wait_for_subscribers(1).await;
    let traffic_ns = Arc::clone(&ns);
    tokio::task::spawn_blocking(move || roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), N))
        .await
        .unwrap();
    // A closing summary for each side of each connection, and the listener's.
    let quiet = collect(&mut watcher, 2 * N + 1, 10 * SECOND, GRACE).await;
    assert_eq!(quiet.len(), 2 * N + 1);

    let request = proto::SubscribeRequest {
        since_seq: Some(0),
        ..Default::default()
    };
    let mut resumed = agent.subscribe_with(request).await;
    let replayed = collect(&mut resumed, 2 * N + 2, 10 * SECOND, GRACE).await;
    assert_eq!(replayed.len(), 2 * N + 2, "one marker, then the closes");
    let Some(Body::Lost(marker)) = &replayed[0].body else {
        panic!("first replayed: {:?}", replayed[0]);
    };
    assert_eq!(marker.stage, proto::LossStage::Unrecorded as i32);
    assert_eq!(marker.count, 0);
    assert_eq!(marker.first_seq, 1, "from the first event on");
    assert!(
        replayed[0].seq >= quiet.last().unwrap().seq,
        "the kernel stayed quiet to the end: {} < {}",
        replayed[0].seq,
        quiet.last().unwrap().seq
    );
    let seqs = |events: &[proto::Event]| events.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(&replayed[1..]),
        seqs(&quiet),
        "the closes, none missing"
    );
    // The subscriber that asks for everything turned recording on: no marker for what follows.
    let traffic_ns = Arc::clone(&ns);
    tokio::task::spawn_blocking(move || roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), 1))
        .await
        .unwrap();
    let live = collect(&mut resumed, roundtrip_events(1), 10 * SECOND, GRACE).await;
    assert_eq!(live.len(), roundtrip_events(1));
    assert!(live.iter().all(|e| lost_count(e).is_none()));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_gone_from_the_replay_buffer_are_one_exact_lost_and_replay_last_gives_the_latest() {
    const CALLS: usize = 5;
    let ns = Arc::new(NetNs::new("expire"));
    let mut config = AgentConfig {
        replay: 20,
        ..only(&ns)
    };
    // The replay holds events made while nobody subscribes only with --all-transitions.
    config.capture.all_transitions = true;
    let mut agent = TestAgent::start_with(config).await;
    let mut first = agent.subscribe(proto::Filter::default()).await;
    let traffic_ns = Arc::clone(&ns);
    let run = move || roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), 1);
    tokio::task::spawn_blocking(run.clone()).await.unwrap();
    let mut before = Vec::new();
    while before.len() < 5 {
        before.push(first.message().await.unwrap().unwrap());
    }
    drop(first);
    for _ in 0..CALLS {
        tokio::task::spawn_blocking(run.clone()).await.unwrap();
    }
    let total = ((CALLS + 1) * roundtrip_events(1)) as u64;
    let mut reference = agent.subscribe(proto::Filter::default()).await;
    // Wait until the agent has published all of it.
    let until = tokio::time::Instant::now() + 10 * SECOND;
    while agent.stats().await.events_published < total {
        assert!(tokio::time::Instant::now() < until, "events not published");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let request = |since_seq, replay_last| proto::SubscribeRequest {
        since_seq,
        replay_last,
        ..Default::default()
    };
    let mut resumed = agent.subscribe_with(request(Some(5), 0)).await;
    let events = collect(&mut resumed, 21, 10 * SECOND, GRACE).await;
    let oldest = total - 19;
    assert_eq!(
        lost_count(&events[0]),
        Some(oldest - 1 - 5),
        "{:?}",
        events[0]
    );
    assert_eq!(
        events[0].seq,
        oldest - 1,
        "the Lost's seq is the last event gone"
    );
    assert_eq!(seqs(&events[1..]), (oldest..=total).collect::<Vec<_>>());
    assert_eq!(seqs(&before), [1, 2, 3, 4, 5]);
    let stats = agent.stats().await;
    let replay = stats.replay.unwrap();
    assert_eq!(
        (replay.capacity, replay.held, replay.oldest_seq),
        (20, 20, oldest)
    );
    assert!(
        stats
            .subscriptions
            .iter()
            .any(|s| s.replay_expired == oldest - 6)
    );

    let mut latest = agent.subscribe_with(request(None, 3)).await;
    let events = collect(&mut latest, 3, 10 * SECOND, GRACE).await;
    assert_eq!(seqs(&events), [total - 2, total - 1, total]);
    // The newest subscription goes on live with the reference, from the same next event.
    tokio::task::spawn_blocking(run.clone()).await.unwrap();
    let next = collect(&mut latest, roundtrip_events(1), 10 * SECOND, GRACE).await;
    assert_eq!(next[0].seq, total + 1);
    assert!(reference.message().await.unwrap().is_some());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_account_for_every_kernel_record_through_to_each_subscriber() {
    const N: usize = 30;
    let ns = Arc::new(NetNs::new("account"));
    let mut agent = TestAgent::start_with(only(&ns)).await;
    let transitions = kinds(proto::EventKind::StateChange);
    let mut everything = agent.subscribe(proto::Filter::default()).await;
    let mut fast = agent.subscribe(transitions.clone()).await;
    let mut stalled_client = stalling_client(&agent.addr).await;
    let request = proto::SubscribeRequest {
        filter: Some(transitions),
        queue: 4,
        ..Default::default()
    };
    let _stalled = stalled_client
        .subscribe(request)
        .await
        .unwrap()
        .into_inner();
    let before = ns.snmp();
    let traffic_ns = Arc::clone(&ns);
    tokio::task::spawn_blocking(move || roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), N))
        .await
        .unwrap();
    let delta = ns.snmp().delta(&before);
    assert_eq!(delta.get("Tcp:ActiveOpens"), N as i64);
    let state_changes = N * 10 + 2;
    let all = roundtrip_events(N);
    collect(&mut everything, all, 10 * SECOND, GRACE).await;
    collect(&mut fast, state_changes, 10 * SECOND, GRACE).await;

    let stats = agent.stats().await;
    // The kernel wrote every record to the ring (no loss there), and the agent read and decoded
    // every one. (Records are more than transitions: the capture also reports accepts,
    // socket options, ...)
    assert_eq!(stats.kernel_ring_full, 0);
    assert!(stats.kernel_records >= state_changes as u64);
    assert_eq!(
        stats.records_decoded + stats.records_malformed,
        stats.kernel_records
    );
    assert_eq!(stats.records_malformed, 0);
    // Every transition in the namespace became one event, numbered once.
    let published = |kind: proto::EventKind| {
        stats
            .events
            .iter()
            .find(|k| k.kind == kind as i32)
            .map_or(0, |k| k.count)
    };
    assert_eq!(
        published(proto::EventKind::StateChange),
        state_changes as u64
    );
    let by_kind: u64 = stats.events.iter().map(|k| k.count).sum();
    assert_eq!(stats.events_published, by_kind);
    assert_eq!(stats.events_published, all as u64);
    // And for each subscriber of transitions: transitions in the kernel = delivered + lost in
    // the ring + dropped from its queue + still queued.
    let subs = &stats.subscriptions;
    assert_eq!(subs.len(), 3);
    for s in subs {
        assert_adds_up(s);
    }
    let stalled = by_queue(&stats, Some(4));
    assert!(stalled.dropped > 0);
    assert_eq!(
        state_changes as u64,
        stalled.delivered + stats.kernel_ring_full + stalled.dropped + stalled.queued
    );
    let named = |filter: &str| {
        subs.iter()
            .find(|s| s.filter == filter && s.queue_capacity != 4)
            .unwrap()
    };
    let fast = named("kind=state-change");
    assert_eq!((fast.delivered, fast.dropped), (state_changes as u64, 0));
    assert_eq!(named("all").delivered, all as u64);
    let t = stats.subscriber_totals.unwrap();
    assert_eq!(t.matched, t.delivered + t.dropped + t.queued + t.abandoned);
    assert_eq!(t.dropped, stats.subscriber_drops);
    // Every connection closed was seen open: client and server side, listener not counted.
    let durations = stats.connection_duration.unwrap();
    assert_eq!(durations.count, 2 * N as u64);
    assert_eq!(
        durations.buckets.iter().map(|b| b.count).sum::<u64>(),
        durations.count
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_connections_sorts_by_age_and_limits_with_the_full_count() {
    let ns = Arc::new(NetNs::new("sort"));
    let mut agent = TestAgent::start().await;
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let held_ns = Arc::clone(&ns);
    let holder = std::thread::spawn(move || {
        held_ns.run(move || {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut held = Vec::new();
            for _ in 0..3 {
                let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                let (server, _) = listener.accept().unwrap();
                held.push((client.local_addr().unwrap(), client, server));
                // Opened at distinct times, so age orders them.
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut order: Vec<SocketAddr> = held.iter().map(|h| h.0).collect();
            ready_tx.send(order.clone()).unwrap();
            hold_rx.recv().unwrap();
            order.clear();
        })
    });
    let clients = ready_rx.recv().unwrap();
    let list = |order: proto::ConnectionOrder, limit| proto::ListConnectionsRequest {
        filter: Some(proto::Filter {
            netns: vec![ns.inode()],
            directions: vec![proto::Direction::Active as i32],
            ..Default::default()
        }),
        order: order as i32,
        limit,
        ..Default::default()
    };
    let until = tokio::time::Instant::now() + 10 * SECOND;
    let response = loop {
        let r = agent
            .client
            .list_connections(list(proto::ConnectionOrder::Age, 2))
            .await
            .unwrap()
            .into_inner();
        if r.matched == 3 {
            break r;
        }
        assert!(tokio::time::Instant::now() < until, "{r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let locals: Vec<SocketAddr> = response
        .connections
        .iter()
        .map(|c| support::agent::endpoint(&c.local))
        .collect();
    assert_eq!(locals, clients[..2], "the two oldest, oldest first");
    let by_id = agent
        .client
        .list_connections(list(proto::ConnectionOrder::Id, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.connections.len(), 3);
    assert!(by_id.connections.windows(2).all(|w| w[0].id < w[1].id));
    let slowest = agent
        .client
        .list_connections(list(proto::ConnectionOrder::HandshakeLatency, 0))
        .await
        .unwrap()
        .into_inner();
    let latencies: Vec<i64> = slowest
        .connections
        .iter()
        .map(|c| c.handshake_latency.expect("measured"))
        .map(|d| d.seconds * 1_000_000_000 + i64::from(d.nanos))
        .collect();
    assert!(
        latencies.windows(2).all(|w| w[0] >= w[1]),
        "slowest first: {latencies:?}"
    );
    let established = proto::ListConnectionsRequest {
        filter: Some(proto::Filter {
            netns: vec![ns.inode()],
            states: vec![proto::TcpState::Established as i32],
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = agent
        .client
        .list_connections(established)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.matched, 6,
        "both ends of 3 connections; the listener is LISTEN"
    );
    hold_tx.send(()).unwrap();
    holder.join().unwrap();
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_each_get_a_clear_status_and_the_agent_keeps_serving() {
    let ns = Arc::new(NetNs::new("bad"));
    let config = AgentConfig {
        limits: tcp_trace::api::Limits {
            max_subscribers: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut agent = TestAgent::start_with(config).await;
    let filter = |f: proto::Filter| proto::SubscribeRequest {
        filter: Some(f),
        ..Default::default()
    };
    let cases: Vec<(proto::SubscribeRequest, Code, &str)> = vec![
        (
            filter(proto::Filter {
                addresses: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }),
            Code::InvalidArgument,
            "filter.addresses[0]: \"10.0.0.0/33\"",
        ),
        (
            filter(proto::Filter {
                ports: vec![80, 0],
                ..Default::default()
            }),
            Code::InvalidArgument,
            "filter.ports[1]",
        ),
        (
            filter(kinds_raw(&[1, 42])),
            Code::InvalidArgument,
            "filter.kinds[1]: 42 is not an event kind",
        ),
        (
            filter(proto::Filter {
                comms: vec!["a-name-longer-than-the-kernel-keeps".into()],
                ..Default::default()
            }),
            Code::InvalidArgument,
            "filter.comms[0]",
        ),
        (
            filter(proto::Filter {
                directions: vec![7],
                ..Default::default()
            }),
            Code::InvalidArgument,
            "filter.directions[0]",
        ),
        (
            filter(proto::Filter {
                states: vec![0],
                ..Default::default()
            }),
            Code::InvalidArgument,
            "filter.states[0]",
        ),
        (
            filter(proto::Filter {
                ports: (1..=200).collect(),
                addresses: (0..57).map(|i| format!("198.51.100.{i}")).collect(),
                ..Default::default()
            }),
            Code::InvalidArgument,
            "filter has 257 values, more than the 256",
        ),
        (
            proto::SubscribeRequest {
                since_seq: Some(1),
                replay_last: 10,
                ..Default::default()
            },
            Code::InvalidArgument,
            "since_seq and replay_last",
        ),
        (
            proto::SubscribeRequest {
                since_seq: Some(1 << 40),
                ..Default::default()
            },
            Code::OutOfRange,
            "since_seq 1099511627776 is beyond the latest event",
        ),
        (
            proto::SubscribeRequest {
                queue: 1 << 30,
                ..Default::default()
            },
            Code::InvalidArgument,
            "queue 1073741824 is larger than the limit",
        ),
        (
            filter(proto::Filter {
                addresses: vec!["1".repeat(100_000)],
                ..Default::default()
            }),
            Code::OutOfRange,
            "message length too large",
        ),
    ];
    for (request, code, message) in cases {
        let status = agent.client.subscribe(request).await.expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(message),
            "{:?} lacks {message:?}",
            status.message()
        );
    }
    let bad_order = proto::ListConnectionsRequest {
        order: 9,
        ..Default::default()
    };
    let status = agent.client.list_connections(bad_order).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("order 9"), "{status:?}");
    let bad_filter = proto::ListConnectionsRequest {
        filter: Some(states_raw(&[99])),
        ..Default::default()
    };
    let status = agent.client.list_connections(bad_filter).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        agent.stats().await.subscribers,
        0,
        "refused requests hold nothing"
    );

    // Too many subscribers; a freed slot is usable again.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(agent.subscribe(netns_filter(ns.inode())).await);
    }
    let status = agent
        .client
        .subscribe(filter(proto::Filter::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("--max-subscribers"), "{status:?}");
    held.pop();
    agent.wait_for_subscribers(2).await;
    held.push(agent.subscribe(netns_filter(ns.inode())).await);

    // And it still serves, exactly.
    let traffic_ns = Arc::clone(&ns);
    tokio::task::spawn_blocking(move || roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), 2))
        .await
        .unwrap();
    for stream in &mut held {
        let events = collect(stream, roundtrip_events(2), 10 * SECOND, GRACE).await;
        assert_eq!(events.len(), roundtrip_events(2));
    }
    agent.shutdown().await;
}

fn kinds_raw(values: &[i32]) -> proto::Filter {
    proto::Filter {
        kinds: values.to_vec(),
        ..Default::default()
    }
}

fn states_raw(values: &[i32]) -> proto::Filter {
    proto::Filter {
        states: values.to_vec(),
        ..Default::default()
    }
}

/// One GetStats over a fresh connection: Ok if the agent served it.
async fn ask(addr: SocketAddr, options: &ConnectOptions) -> Result<(), String> {
    let addr = ListenAddr::Tcp(addr);
    let mut client = tcp_trace::client::connect_with(&addr, options)
        .await
        .map_err(|e| e.to_string())?;
    let call = client.get_stats(proto::GetStatsRequest {});
    match tokio::time::timeout(5 * SECOND, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("{status:?}")),
        Err(_) => Err("timed out".into()),
    }
}

fn plain() -> ConnectOptions {
    ConnectOptions::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_accept_the_right_clients_and_refuse_the_rest() {
    let pki = Pki::new();
    // Off loopback, plain text is refused at start-up.
    let exposed = AgentConfig {
        listen: vec![ListenAddr::Tcp("0.0.0.0:0".parse().unwrap())],
        ..Default::default()
    };
    let refused = tcp_trace::agent::Agent::start(exposed)
        .await
        .err()
        .expect("refused");
    assert!(refused.to_string().contains("without TLS"), "{refused}");

    // TLS on loopback: a TLS client that trusts the CA is served, a plain-text one is not.
    let config = AgentConfig {
        access: pki.server(false),
        ..Default::default()
    };
    let agent = TestAgent::start_serving(config, vec!["127.0.0.1:0".parse().unwrap()]).await;
    let addr = agent.tcp_addr();
    ask(addr, &pki.client(None))
        .await
        .expect("TLS client served");
    let err = ask(addr, &plain()).await.expect_err("plain text refused");
    assert!(!err.is_empty());
    let wrong_name = ConnectOptions {
        tls: Some(ClientTls {
            domain: Some("not-the-agent.example".into()),
            ..pki.client(None).tls.unwrap()
        }),
    };
    ask(addr, &wrong_name)
        .await
        .expect_err("a certificate for another name is refused");
    agent.shutdown().await;

    // Mutual TLS, on every address: only clients with a certificate from the CA are served.
    let config = AgentConfig {
        access: pki.server(true),
        ..Default::default()
    };
    let agent = TestAgent::start_serving(config, vec!["0.0.0.0:0".parse().unwrap()]).await;
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), agent.tcp_addr().port());
    ask(addr, &pki.client(Some("client")))
        .await
        .expect("client certificate accepted");
    ask(addr, &pki.client(None))
        .await
        .expect_err("no client certificate: refused");
    ask(addr, &pki.client(Some("rogue")))
        .await
        .expect_err("a certificate from another CA: refused");
    ask(addr, &plain()).await.expect_err("plain text refused");
    // The Unix socket stays plain (guarded by its mode and group).
    let mut local = agent.client.clone();
    local.get_stats(proto::GetStatsRequest {}).await.unwrap();
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_resumes_replays_sorts_and_draws_top() {
    let ns = Arc::new(NetNs::new("cli4"));
    let mut config = only(&ns);
    // The replay holds events made while nobody subscribes only with --all-transitions.
    config.capture.all_transitions = true;
    let mut agent = TestAgent::start_with(config).await;
    let connect = agent.addr.to_string();
    let traffic_ns = Arc::clone(&ns);
    let trips = tokio::task::spawn_blocking(move || {
        roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), 1)
    })
    .await
    .unwrap();
    let until = tokio::time::Instant::now() + 10 * SECOND;
    while agent.stats().await.events_published < 15 {
        assert!(tokio::time::Instant::now() < until);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let run = support::agent::cli;
    let latest = run(&[
        "watch",
        "--json",
        "--connect",
        &connect,
        "--replay-last",
        "3",
        "--count",
        "3",
    ]);
    let latest: Vec<String> = latest
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(latest, ["13", "14", "15"]);
    let resumed = run(&[
        "watch",
        "--connect",
        &connect,
        "--since-seq",
        "10",
        "--count",
        "5",
    ]);
    let resumed: Vec<u64> = resumed
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(resumed, [11, 12, 13, 14, 15]);
    let port = trips[0].server.port().to_string();
    let closed = run(&[
        "watch",
        "--connect",
        &connect,
        "--since-seq",
        "0",
        "--count",
        "1",
        "--kind",
        "connection-closed",
        "--direction",
        "passive",
        "--port",
        &port,
    ]);
    assert!(
        closed.contains("CLOSED") && closed.contains("LISTEN > SYN_RECV"),
        "{closed}"
    );

    // stats: each subscriber in a table, the histograms.
    let _watching = agent.subscribe(proto::Filter::default()).await;
    let stats_text = run(&["stats", "--connect", &connect]);
    assert!(stats_text.contains("SUB  PEER"), "{stats_text}");
    assert!(
        stats_text.contains(&format!("unix pid={}", std::process::id())),
        "{stats_text}"
    );
    assert!(stats_text.contains("connection duration"), "{stats_text}");
    assert!(stats_text.contains("handshake latency"), "{stats_text}");
    let stats_json: serde_json::Value =
        serde_json::from_str(&run(&["stats", "--json", "--connect", &connect])).unwrap();
    assert_eq!(stats_json["subscriptions"].as_array().unwrap().len(), 1);

    // top: one frame, rates over an interval in which 3 connections are made.
    let top = tokio::process::Command::new(env!("CARGO_BIN_EXE_tcp-trace"))
        .args([
            "top",
            "--once",
            "--interval",
            "2",
            "--connect",
            &connect,
            "--direction",
            "active",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let traffic_ns = Arc::clone(&ns);
    let trips = tokio::task::spawn_blocking(move || {
        roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), 3)
    })
    .await
    .unwrap();
    let out = tokio::time::timeout(10 * SECOND, top.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let frame = String::from_utf8(out.stdout).unwrap();
    let row = frame
        .lines()
        .find(|l| l.starts_with(&format!("-> {}", trips[0].server)))
        .unwrap_or_else(|| panic!("no row for the server:\n{frame}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[2..4], ["1.5", "3"], "3 opened over 2 s:\n{frame}");
    assert_ne!(cols[4], "-", "handshake latency measured:\n{frame}");
    assert_eq!(cols[7], "0", "none failed:\n{frame}");
    assert!(
        !frame.contains('<'),
        "--direction active shows no passive peers:\n{frame}"
    );
    assert!(!frame.contains('\x1b'), "--once prints no control codes");

    // conns: sorted and limited, as JSON with the full count.
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let held_ns = Arc::clone(&ns);
    let holder = std::thread::spawn(move || {
        held_ns.run(move || {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let b = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            ready_tx.send(a.local_addr().unwrap()).unwrap();
            hold_rx.recv().unwrap();
            drop((a, b));
        })
    });
    let oldest = ready_rx.recv().unwrap();
    let until = tokio::time::Instant::now() + 10 * SECOND;
    let conns = loop {
        let json = run(&[
            "conns",
            "--json",
            "--connect",
            &connect,
            "--direction",
            "active",
            "--sort",
            "age",
            "--limit",
            "1",
        ]);
        let conns: serde_json::Value = serde_json::from_str(&json).unwrap();
        if conns["matched"] == "2" {
            break conns;
        }
        assert!(tokio::time::Instant::now() < until, "{conns}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(conns["connections"].as_array().unwrap().len(), 1);
    assert_eq!(conns["connections"][0]["local"]["port"], oldest.port());
    let table = run(&[
        "conns",
        "--connect",
        &connect,
        "--direction",
        "active",
        "--limit",
        "1",
    ]);
    assert!(table.ends_with("1 of 2 connections\n"), "{table}");
    hold_tx.send(()).unwrap();
    holder.join().unwrap();
    agent.shutdown().await;
}

/// Resident anonymous memory of a process (its heap, stacks), in KiB: not the ring buffer,
/// which is a shared mapping of the kernel's map and fills as records pass through it.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The agent as its own process, so its memory is measured alone.
struct AgentProcess {
    child: std::process::Child,
    addr: ListenAddr,
}

impl AgentProcess {
    async fn start(args: &[&str]) -> AgentProcess {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tcp-trace-mem-{}-{n}.sock", std::process::id()));
        let addr = ListenAddr::Unix(path.clone());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tcp-trace"))
            .args(["agent", "--listen", &addr.to_string()])
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let until = tokio::time::Instant::now() + 10 * SECOND;
        while tcp_trace::client::connect(&addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < until,
                "the agent process did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        AgentProcess { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        // Never hang the suite on a child that does not stop: SIGKILL after 10 s.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let ListenAddr::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn settle_rss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_millis(200)).await;
    rss_kib(pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_idle_subscriber_and_per_replay_slot_stays_small() {
    const SUBSCRIBERS: usize = 1000;
    const SLOTS: usize = 20_000;
    let ns = Arc::new(NetNs::new("mem"));
    let inode = ns.inode().to_string();
    // Two agents tracing the same namespace, without and with replay: what the second holds
    // beyond the first is the replay buffer.
    // --all-transitions: the replay fills while nobody subscribes (by default events are only
    // counted then), and both agents record alike.
    let plain =
        AgentProcess::start(&["--netns", &inode, "--replay", "0", "--all-transitions"]).await;
    let slots = SLOTS.to_string();
    let replaying =
        AgentProcess::start(&["--netns", &inode, "--replay", &slots, "--all-transitions"]).await;

    // Idle subscribers: ten client connections, 100 streams each.
    let mut client = tcp_trace::client::connect(&plain.addr).await.unwrap();
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(tcp_trace::client::connect(&plain.addr).await.unwrap());
    }
    let base = settle_rss(plain.pid()).await;
    let mut streams = Vec::new();
    for i in 0..SUBSCRIBERS {
        let request = proto::SubscribeRequest {
            filter: Some(proto::Filter {
                ports: vec![(i % 60_000 + 1) as u32],
                ..Default::default()
            }),
            ..Default::default()
        };
        streams.push(
            channels[i % 10]
                .subscribe(request)
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let stats = client
        .get_stats(proto::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.subscribers as usize, SUBSCRIBERS);
    let subscribed = settle_rss(plain.pid()).await;
    let per_subscriber = subscribed.saturating_sub(base) as f64 * 1024.0 / SUBSCRIBERS as f64;
    drop((streams, channels));
    let _ = support::agent::wait_for_subscribers(&mut client, 0).await;

    // A full replay buffer. A first connection makes the per-batch buffers of both agents
    // exist before the baseline.
    let traffic = |n| {
        let ns = Arc::clone(&ns);
        tokio::task::spawn_blocking(move || roundtrips(&ns, "127.0.0.1".parse().unwrap(), n))
    };
    traffic(1).await.unwrap();
    let mut replay_client = tcp_trace::client::connect(&replaying.addr).await.unwrap();
    let (plain_before, replay_before) = (settle_rss(plain.pid()).await, rss_kib(replaying.pid()));
    // Until the buffer is full: counting on an exact number of events would be fragile, as
    // other tracers busy on this host can make the kernel skip some (BPF recursion misses).
    let until = tokio::time::Instant::now() + 20 * SECOND;
    loop {
        let stats = replay_client
            .get_stats(proto::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if stats.replay.as_ref().unwrap().held as usize == SLOTS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "replay buffer not full: {stats:?}"
        );
        traffic(100).await.unwrap();
    }
    let (plain_after, replay_after) = (settle_rss(plain.pid()).await, rss_kib(replaying.pid()));
    let growth = |before: u64, after: u64| after.saturating_sub(before) as f64 * 1024.0;
    let per_slot =
        (growth(replay_before, replay_after) - growth(plain_before, plain_after)) / SLOTS as f64;
    eprintln!(
        "memory (resident heap of the agent process): idle {base} KiB; {SUBSCRIBERS} idle \
         subscribers +{} KiB = {per_subscriber:.0} B each; {SLOTS} events published: +{} KiB \
         with --replay {SLOTS}, +{} KiB with --replay 0, so {per_slot:.0} B per replay slot",
        subscribed.saturating_sub(base),
        replay_after.saturating_sub(replay_before),
        plain_after.saturating_sub(plain_before),
    );
    assert!(
        per_subscriber < 64.0 * 1024.0,
        "{per_subscriber} B per idle subscriber"
    );
    assert!(per_slot < 4096.0, "{per_slot} B per replay slot");
}
