//! ListConnections in pages against a real agent: thousands of held connections listed page by
//! page while others open and close, compared with the namespace's own socket list.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use prost::Message as _;
use support::{
    NetNs,
    agent::{TestAgent, netns_filter},
};
use tcp_trace::{
    agent::AgentConfig,
    api::Limits,
    capture::CaptureConfig,
    proto::{self, tcp_trace_client::TcpTraceClient},
};
use tonic::{Code, transport::Channel};

/// Connections held open through a listing.
const HELD: usize = 3000;
/// /proc/net/tcp states (include/net/tcp_states.h).
const ESTABLISHED: u8 = 1;
const LISTEN: u8 = 10;

/// Descriptors both tests need at once: each held connection costs two, and the default soft
/// limit is often 1024.
const OPEN_FILES: u64 = 16_384;

/// Raises the soft limit on open files; the hard one too where it is lower, which root may do
/// with CAP_SYS_RESOURCE (some containers drop it: then the hard limit must be high enough).
fn raise_open_files(at_least: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid resource and a valid out pointer.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    if limit.rlim_cur >= at_least {
        return;
    }
    limit.rlim_cur = at_least;
    limit.rlim_max = limit.rlim_max.max(at_least);
    // SAFETY: a valid resource and a valid limit.
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) },
        0,
        "setrlimit NOFILE {at_least}: {} (run the tests as root with CAP_SYS_RESOURCE, or raise \
         the hard limit: ulimit -Hn {at_least})",
        std::io::Error::last_os_error()
    );
}

/// An agent that traces only `ns` (the kernel-side filter), with `limits`.
async fn agent_for(ns: &NetNs, limits: Limits) -> TestAgent {
    let netns = u32::try_from(ns.inode()).expect("namespace inodes fit 32 bits");
    TestAgent::start_with(AgentConfig {
        capture: CaptureConfig {
            netns: Some(netns),
            ..Default::default()
        },
        limits,
        ..Default::default()
    })
    .await
}

/// Opens `n` connections to `listener` (connect, then accept, so the accept queue never
/// fills) and returns both ends of each.
fn open(listener: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
    let addr = listener.local_addr().expect("listener address");
    (0..n)
        .map(|i| {
            let client = TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("connection {i} of {n} to {addr}: {e}"));
            let (server, _) = listener.accept().expect("accept");
            (client, server)
        })
        .collect()
}

/// A connection as the kernel lists it: (local port, remote port).
fn ports(c: &proto::Connection) -> (u16, u16) {
    let port = |e: &Option<proto::Endpoint>| e.as_ref().map_or(0, |e| e.port as u16);
    (port(&c.local), port(&c.remote))
}

/// Waits until the agent's table holds `n` connections on `port`.
async fn wait_for_table(client: &mut TcpTraceClient<Channel>, ns: &NetNs, port: u16, n: u64) {
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let request = proto::ListConnectionsRequest {
            filter: Some(proto::Filter {
                ports: vec![u32::from(port)],
                ..netns_filter(ns.inode())
            }),
            page_size: 1,
            ..Default::default()
        };
        let matched = client
            .list_connections(request)
            .await
            .expect("ListConnections")
            .into_inner()
            .matched;
        if matched == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the agent tracks {matched} connections on port {port}, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every page of `request`, calling `between` after each.
async fn pages(
    client: &mut TcpTraceClient<Channel>,
    mut request: proto::ListConnectionsRequest,
    mut between: impl FnMut(),
) -> Vec<proto::ListConnectionsResponse> {
    let mut out = Vec::new();
    loop {
        let page = client
            .list_connections(request.clone())
            .await
            .unwrap_or_else(|s| panic!("page {}: {s:?}", out.len()))
            .into_inner();
        let next = page.next_page_token.clone();
        out.push(page);
        if next.is_empty() {
            return out;
        }
        assert!(out.len() < 10_000, "the listing advances");
        request.page_token = next;
        between();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_list_each_connection_that_lives_throughout_once_while_others_open_and_close() {
    raise_open_files(OPEN_FILES);
    let ns = Arc::new(NetNs::new("paging"));
    let mut agent = agent_for(&ns, Limits::default()).await;

    // Held and doomed connections to one listener, interleaved: one doomed in six, so that
    // closing them removes connections before and after any page boundary.
    let (listening_tx, listening_rx) = mpsc::channel();
    let (close_tx, close_rx) = mpsc::channel::<usize>();
    let holder = ns.spawn(move || {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut held = Vec::new();
        let mut doomed = Vec::new();
        for _ in 0..HELD / 5 {
            held.extend(open(&listener, 5));
            doomed.extend(open(&listener, 1));
        }
        let doomed_ports: BTreeSet<u16> = doomed
            .iter()
            .map(|(c, _)| c.local_addr().expect("local address").port())
            .collect();
        listening_tx
            .send((listener.local_addr().expect("address"), doomed_ports))
            .expect("the test waits");
        // Close doomed connections as told, until the test hangs up.
        while let Ok(n) = close_rx.recv() {
            doomed.truncate(doomed.len().saturating_sub(n));
        }
        drop(doomed);
        (listener, held)
    });
    let (addr, doomed_ports): (SocketAddr, BTreeSet<u16>) =
        listening_rx.recv().expect("the holder listens");
    let port = addr.port();
    let doomed_count = doomed_ports.len();
    wait_for_table(
        &mut agent.client,
        &ns,
        port,
        2 * (HELD + doomed_count) as u64 + 1,
    )
    .await;

    // Churn on another listener: connections that open and close all through the listing.
    let stop = Arc::new(AtomicBool::new(false));
    let churn_stop = Arc::clone(&stop);
    let churn = ns.spawn(move || {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut opened = 0;
        while !churn_stop.load(Ordering::Relaxed) {
            drop(open(&listener, 1));
            opened += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        opened
    });

    let orders = [
        proto::ConnectionOrder::Id,
        proto::ConnectionOrder::Age,
        proto::ConnectionOrder::HandshakeLatency,
    ];
    let mut listings = BTreeMap::new();
    for order in orders {
        let request = proto::ListConnectionsRequest {
            filter: Some(netns_filter(ns.inode())),
            order: order as i32,
            page_size: 97,
            ..Default::default()
        };
        // Close 10 doomed connections after each page of the first listing.
        let close = |n| {
            let _ = close_tx.send(n);
        };
        let listing = pages(&mut agent.client, request, || {
            if order == proto::ConnectionOrder::Id {
                close(10);
            }
        })
        .await;
        listings.insert(order.as_str_name(), listing);
    }
    stop.store(true, Ordering::Relaxed);
    let churned = churn.join().expect("churn thread");
    // The holder closes what is left of the doomed and hands over the held ones.
    drop(close_tx);
    let (listener, held) = holder.join().expect("holder thread");
    assert_eq!(held.len(), HELD);
    let kernel: BTreeSet<(u16, u16)> = ns
        .tcp_sockets()
        .into_iter()
        .filter(|&(local, remote, state)| {
            (local == port || remote == port) && matches!(state, ESTABLISHED | LISTEN)
        })
        .map(|(local, remote, _)| (local, remote))
        .collect();
    assert_eq!(
        kernel.len(),
        2 * HELD + 1,
        "held connections and the listener"
    );

    for (order, listing) in &listings {
        let all: Vec<&proto::Connection> = listing.iter().flat_map(|p| &p.connections).collect();
        let mut ids: Vec<u64> = all.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all.len(), "{order}: a connection listed twice");
        let mut held: BTreeMap<(u16, u16), usize> = BTreeMap::new();
        for c in &all {
            let (local, remote) = ports(c);
            let is_doomed = doomed_ports.contains(&local) || doomed_ports.contains(&remote);
            if (local == port || remote == port) && !is_doomed {
                *held.entry((local, remote)).or_default() += 1;
            }
        }
        assert!(
            held.values().all(|&n| n == 1),
            "{order}: listed more than once: {:?}",
            held.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
        );
        let listed: BTreeSet<(u16, u16)> = held.into_keys().collect();
        assert_eq!(
            listed.symmetric_difference(&kernel).collect::<Vec<_>>(),
            Vec::<&(u16, u16)>::new(),
            "{order}: the pages against the kernel's list"
        );
        assert!(
            listing.len() > 2 * HELD / 97,
            "{order}: {} pages of at most 97",
            listing.len()
        );
        assert!(listing.iter().all(|p| p.connections.len() <= 97));
    }
    // The listing did run while the table changed.
    assert!(churned > 10, "{churned} connections churned");
    let first = &listings[proto::ConnectionOrder::Id.as_str_name()];
    assert!(
        first.first().map(|p| p.matched) > first.last().map(|p| p.matched),
        "doomed connections closed during the first listing"
    );
    drop((listener, held));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_stops_at_the_byte_cap_however_many_connections_are_asked_for() {
    raise_open_files(OPEN_FILES);
    let ns = NetNs::new("pagebytes");
    let cap = 32 << 10;
    let mut agent = agent_for(
        &ns,
        Limits {
            max_page_bytes: cap,
            ..Limits::default()
        },
    )
    .await;
    let (listener, held) = ns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let held = open(&listener, HELD / 2);
        (listener, held)
    });
    let port = listener.local_addr().expect("address").port();
    let total = 2 * held.len() as u64 + 1;
    wait_for_table(&mut agent.client, &ns, port, total).await;

    let request = proto::ListConnectionsRequest {
        filter: Some(netns_filter(ns.inode())),
        page_size: u32::MAX,
        ..Default::default()
    };
    let listing = pages(&mut agent.client, request.clone(), || {}).await;
    for (i, page) in listing.iter().enumerate() {
        let len = page.encoded_len();
        // The cap counts the connections; token and count add a few dozen bytes.
        assert!(len <= cap + 128, "page {i}: {len} bytes");
        assert_eq!(page.matched, total);
    }
    assert!(listing.len() > 1, "{total} connections in one page");
    let ids: Vec<u64> = listing
        .iter()
        .flat_map(|p| &p.connections)
        .map(|c| c.id)
        .collect();
    assert_eq!(ids.len() as u64, total);
    assert!(ids.is_sorted_by(|a, b| a < b), "in id order, once each");

    // A limit counts over all the pages.
    let limited = proto::ListConnectionsRequest {
        limit: 250,
        page_size: 100,
        ..request.clone()
    };
    let listing = pages(&mut agent.client, limited.clone(), || {}).await;
    let sizes: Vec<usize> = listing.iter().map(|p| p.connections.len()).collect();
    assert_eq!(sizes, [100, 100, 50]);

    // Tokens continue only their own request, and only unchanged.
    let first = agent
        .client
        .list_connections(limited.clone())
        .await
        .expect("first page")
        .into_inner();
    let token = first.next_page_token;
    for (name, bad) in [
        (
            "another filter",
            proto::ListConnectionsRequest {
                filter: Some(proto::Filter {
                    ports: vec![u32::from(port)],
                    ..netns_filter(ns.inode())
                }),
                page_token: token.clone(),
                ..limited.clone()
            },
        ),
        (
            "another limit",
            proto::ListConnectionsRequest {
                limit: 0,
                page_token: token.clone(),
                ..limited.clone()
            },
        ),
        (
            "a made-up token",
            proto::ListConnectionsRequest {
                page_token: "0123".into(),
                ..limited.clone()
            },
        ),
    ] {
        let status = agent.client.list_connections(bad).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().starts_with("page_token"),
            "{name}: {}",
            status.message()
        );
    }
    drop(held);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conns_prints_every_connection_fetching_page_after_page() {
    raise_open_files(OPEN_FILES);
    let ns = NetNs::new("pagecli");
    let mut agent = agent_for(&ns, Limits::default()).await;
    let (listener, held) = ns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let held = open(&listener, 300);
        (listener, held)
    });
    let port = listener.local_addr().expect("address").port();
    let total = 2 * held.len() + 1;
    wait_for_table(&mut agent.client, &ns, port, total as u64).await;
    let connect = agent.addr.to_string();
    let netns = ns.inode().to_string();
    let conns = |extra: &[&str]| {
        let mut args = vec!["conns", "--connect", &connect, "--netns", &netns];
        args.extend_from_slice(extra);
        support::agent::cli(&args)
    };

    // Header, one row per connection, footer.
    let table = conns(&["--page-size", "64"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), total + 2, "{table}");
    assert_eq!(lines.last(), Some(&format!("{total} connections").as_str()));
    let ids: BTreeSet<&str> = lines[1..=total]
        .iter()
        .map(|l| l.split_whitespace().next().expect("an id"))
        .collect();
    assert_eq!(ids.len(), total, "each connection once");

    // JSON: one ListConnectionsResponse holding every page's connections.
    let json: serde_json::Value =
        serde_json::from_str(&conns(&["--json", "--page-size", "64"])).expect("one JSON object");
    assert_eq!(
        json["connections"].as_array().map(Vec::len),
        Some(total),
        "{json}"
    );
    assert_eq!(
        json["matched"],
        total.to_string(),
        "uint64 is a JSON string"
    );
    assert_eq!(json.get("nextPageToken"), None, "no page after the last");

    // A limit counts over the pages; the footer tells how many matched.
    let table = conns(&["--page-size", "64", "--limit", "150"]);
    assert_eq!(table.lines().count(), 150 + 2, "{table}");
    assert!(
        table.ends_with(&format!("150 of {total} connections\n")),
        "{table}"
    );
    drop((listener, held));
    agent.shutdown().await;
}
