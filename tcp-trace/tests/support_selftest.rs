//! Proves the shared test helpers in `support/` against the kernel itself (run as root). The
//! other integration tests trust these helpers for isolation and for their ground truth.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use support::{
    Counters, FirstCloser, NetNs, roundtrips, roundtrips_between, roundtrips_server_closes_first,
};

const LOOPBACK_V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LOOPBACK_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
const TIME_WAIT: u8 = 6;

#[test]
fn dropped_namespace_no_longer_exists() {
    let ns = NetNs::new("drop");
    let path = format!("/run/netns/{}", ns.name());
    assert!(Path::new(&path).exists(), "{path} missing after NetNs::new");
    drop(ns);
    assert!(!Path::new(&path).exists(), "{path} still there after drop");
}

#[test]
fn namespace_is_removed_when_the_test_panics() {
    let mut path = String::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let ns = NetNs::new("panic");
        path = format!("/run/netns/{}", ns.name());
        panic!("test failure inside a namespace");
    }));
    assert!(result.is_err());
    assert!(
        !path.is_empty() && !Path::new(&path).exists(),
        "{path} survived a panic"
    );
}

#[test]
fn inode_is_what_stat_prints_inside_the_namespace() {
    let ns = NetNs::new("inode");
    let inside: u64 = ns
        .exec(&["stat", "-L", "-c", "%i", "/proc/self/ns/net"])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(ns.inode(), inside);
    let from_thread = ns.run(|| std::fs::metadata("/proc/thread-self/ns/net").unwrap());
    assert_eq!(
        ns.inode(),
        std::os::unix::fs::MetadataExt::ino(&from_thread)
    );
    let host = std::fs::metadata("/proc/self/ns/net").unwrap();
    assert_ne!(
        ns.inode(),
        std::os::unix::fs::MetadataExt::ino(&host),
        "not a new namespace"
    );
}

#[test]
fn run_propagates_panics_and_spawn_runs_concurrently_inside() {
    let ns = NetNs::new("run");
    let result = catch_unwind(AssertUnwindSafe(|| ns.run(|| panic!("boom"))));
    let message = result.unwrap_err().downcast::<&str>().unwrap();
    assert_eq!(*message, "boom");

    let listener = ns.run(|| TcpListener::bind((LOOPBACK_V4, 0)).unwrap());
    let server_addr = listener.local_addr().unwrap();
    let server = ns.spawn(move || listener.accept().unwrap().1);
    let client = ns.run(|| std::net::TcpStream::connect(server_addr).unwrap());
    assert_eq!(server.join().unwrap(), client.local_addr().unwrap());
}

#[test]
fn exec_sysctl_changes_only_this_namespace() {
    let ns = NetNs::new("sysctl");
    let key = "/proc/sys/net/ipv4/tcp_keepalive_time";
    let host_before = std::fs::read_to_string(key).unwrap();
    ns.exec(&["sysctl", "-w", "net.ipv4.tcp_keepalive_time=17"]);
    assert_eq!(
        ns.run(|| std::fs::read_to_string(key).unwrap()).trim(),
        "17"
    );
    assert_eq!(std::fs::read_to_string(key).unwrap(), host_before);
}

#[test]
#[should_panic(expected = "stat: cannot statx '/nonexistent'")]
fn exec_failure_panics_with_stderr() {
    NetNs::new("fail").exec(&["stat", "/nonexistent"]);
}

#[test]
#[should_panic(expected = "no kernel counter \"Tcp:NoSuchCounter\"")]
fn missing_counter_panics_naming_it() {
    NetNs::new("nokey").snmp().get("Tcp:NoSuchCounter");
}

#[test]
fn fresh_namespace_has_zero_tcp_counters() {
    let c = NetNs::new("zero").snmp();
    for key in [
        "Tcp:ActiveOpens",
        "Tcp:PassiveOpens",
        "Tcp:OutRsts",
        "TcpExt:TCPKeepAlive",
    ] {
        assert_eq!(c.get(key), 0, "{key}");
    }
}

/// Asserts the deltas every clean roundtrip workload must produce, and prints them.
fn assert_clean_opens(delta: &Counters, active: i64, passive: i64) {
    eprintln!(
        "ActiveOpens={} PassiveOpens={} AttemptFails={} EstabResets={} OutRsts={} CurrEstab={}",
        delta.get("Tcp:ActiveOpens"),
        delta.get("Tcp:PassiveOpens"),
        delta.get("Tcp:AttemptFails"),
        delta.get("Tcp:EstabResets"),
        delta.get("Tcp:OutRsts"),
        delta.get("Tcp:CurrEstab"),
    );
    assert_eq!(delta.get("Tcp:ActiveOpens"), active);
    assert_eq!(delta.get("Tcp:PassiveOpens"), passive);
    for key in [
        "Tcp:AttemptFails",
        "Tcp:EstabResets",
        "Tcp:OutRsts",
        "Tcp:CurrEstab",
    ] {
        assert_eq!(delta.get(key), 0, "{key}");
    }
}

fn check_loopback(addr: IpAddr, first: FirstCloser) {
    const N: usize = 25;
    let ns = NetNs::new("loop");
    let before = ns.snmp();
    let trips = match first {
        FirstCloser::Client => roundtrips(&ns, addr, N),
        FirstCloser::Server => roundtrips_server_closes_first(&ns, addr, N),
    };
    assert_clean_opens(&ns.snmp().delta(&before), N as i64, N as i64);

    assert_eq!(trips.len(), N);
    let server = trips[0].server;
    let mut client_ports: Vec<u16> = trips.iter().map(|t| t.client.port()).collect();
    client_ports.sort();
    client_ports.dedup();
    assert_eq!(client_ports.len(), N, "client ports must differ");
    for t in &trips {
        assert_eq!((t.client.ip(), t.server), (addr, server));
    }
    // Whoever closed first is the one left in TIME_WAIT; nothing else of the connections remains.
    let sockets = ns.tcp_sockets();
    for t in &trips {
        let (closer, peer) = match first {
            FirstCloser::Client => (t.client.port(), t.server.port()),
            FirstCloser::Server => (t.server.port(), t.client.port()),
        };
        assert!(
            sockets.contains(&(closer, peer, TIME_WAIT)),
            "{t:?} not in TIME_WAIT: {sockets:?}"
        );
        assert!(
            !sockets.iter().any(|&(l, r, _)| (l, r) == (peer, closer)),
            "{t:?}: the second closer's socket still exists: {sockets:?}"
        );
    }
}

#[test]
fn roundtrips_over_ipv4_loopback_open_exactly_n_connections() {
    check_loopback(LOOPBACK_V4, FirstCloser::Client);
}

#[test]
fn roundtrips_over_ipv6_loopback_open_exactly_n_connections() {
    check_loopback(LOOPBACK_V6, FirstCloser::Client);
}

#[test]
fn server_closing_first_leaves_the_server_in_time_wait_ipv4() {
    check_loopback(LOOPBACK_V4, FirstCloser::Server);
}

#[test]
fn server_closing_first_leaves_the_server_in_time_wait_ipv6() {
    check_loopback(LOOPBACK_V6, FirstCloser::Server);
}

#[test]
fn veth_pair_carries_tcp_between_namespaces_over_ipv4_and_ipv6() {
    const N: usize = 10;
    let a = NetNs::new("vetha");
    let b = NetNs::new("vethb");
    let pair = NetNs::veth_pair(&a, &b);
    let addrs = a.exec(&["ip", "-o", "addr", "show", "dev", &pair.a_dev]);
    assert!(
        addrs.contains("198.51.100.1/24") && addrs.contains("2001:db8::1/64"),
        "{addrs}"
    );
    let global_v6 = addrs
        .lines()
        .find(|l| l.contains("2001:db8::1/64"))
        .unwrap();
    assert!(
        !global_v6.contains("tentative"),
        "usable at once (nodad): {global_v6}"
    );

    for (server_ns, client_ns, server_addr, client_addr) in [
        (&a, &b, pair.a_v4, pair.b_v4),
        (&b, &a, pair.b_v6, pair.a_v6),
    ] {
        let (server_before, client_before) = (server_ns.snmp(), client_ns.snmp());
        let trips = roundtrips_between(client_ns, server_ns, server_addr, N, FirstCloser::Client);
        assert_clean_opens(&server_ns.snmp().delta(&server_before), 0, N as i64);
        assert_clean_opens(&client_ns.snmp().delta(&client_before), N as i64, 0);
        assert!(
            trips
                .iter()
                .all(|t| t.client.ip() == client_addr && t.server.ip() == server_addr)
        );
    }
}

#[test]
fn tcp_in_use_counts_this_namespaces_hashed_sockets_only() {
    let ns = NetNs::new("inuse");
    let mut in_use = ns.tcp_in_use();
    assert_eq!(in_use.read(), 0);
    let other = NetNs::new("other");
    let _elsewhere = other.run(|| TcpListener::bind((LOOPBACK_V4, 0)).unwrap());
    let v4 = ns.run(|| TcpListener::bind((LOOPBACK_V4, 0)).unwrap());
    let v6 = ns.run(|| TcpListener::bind((LOOPBACK_V6, 0)).unwrap());
    assert_eq!(in_use.read(), 2);
    drop((v4, v6));
    // A parallel test's fork can still hold a copy of the listeners' fds until its exec closes
    // them (they are CLOEXEC), so the count may reach 0 a moment after the drop, but it must.
    let deadline = Instant::now() + Duration::from_secs(2);
    while in_use.read() != 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(in_use.read(), 0);
}
