//! The pipeline's own cost per connection, with no kernel behind it: the always-on agent's
//! records of a churn (five a connection, as a quiet kernel writes them) replayed through the
//! drain's `Sink`, a drain of 20 connections at a time; (`replay_slots`) the same churn as the
//! kernel writes it with socket slots, one record per socket end; and (`replay_watched`) every
//! record of each connection (ten) with one subscriber, whose events are built, encoded and
//! queued.
//! Ignored by default: they measure, they do not check. Run them under callgrind for
//! instruction counts, which the noisy shared machines here cannot disturb
//! (`docs/benchmarks.md`, 2026-12-03 06:36):
//!
//! ```text
//! cargo test --release -p tcp-trace --lib replay -- --ignored --nocapture
//! valgrind --tool=callgrind target/release/deps/tcp_trace-<hash> replay --ignored
//! ```
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{heal::Heal, pipeline::Pipeline};
use crate::{
    bus::{Bus, BusConfig, Start, SubscribeRequest},
    capture::{DecodeError, Hooks, Kept, KernelCounterReader, Record, Sink},
    event::Events,
    export::Observer,
    lifecycle::{Peers, Table},
    model::{TcpState::*, Transition},
    stats::AgentStats,
};

const CONNECTIONS: u64 = 200_000;
const PER_DRAIN: u64 = 20;

fn pipeline() -> Pipeline {
    let stats = Arc::new(AgentStats::new(
        KernelCounterReader::none(),
        Hooks::default(),
    ));
    Pipeline {
        table: Arc::new(Mutex::new(Table::new(
            1_000_000,
            Peers::new(10_000, 60_000_000_000),
        ))),
        bus: Bus::new(BusConfig::default()),
        stats: Arc::clone(&stats),
        events: Events::default(),
        keep_replay: false,
        closed: Vec::new(),
        keepalive_defaults: HashMap::new(),
        warned_malformed: false,
        table_capacity: 0,
        heal: Heal::start(Duration::ZERO, None, &stats),
        export: Observer::metrics_only(),
    }
}

/// The records a kernel writes for connection `i`, client and server end, at `ts`: five while
/// quiet (`all`: false), ten while a subscriber asks for state changes.
fn connection(i: u64, ts: u64, all: bool, out: &mut Vec<Result<Record, DecodeError>>) {
    let server = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 6379);
    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1024 + (i % 60_000) as u16);
    // Kernel socket addresses: slab objects 2 KiB apart, reused as connections come and go.
    let (active, passive) = (
        0xffff_8880_0000_0000 + (i % 4096) * 4096,
        0xffff_8880_0000_0800 + (i % 4096) * 4096,
    );
    let at = |sock, dt, old, new, local, remote| {
        let t = Transition::test(sock, ts + dt, old, new).between(local, remote);
        Some(if all { t } else { t.quiet() })
    };
    let every = |t: Option<Transition>| t.filter(|_| all);
    out.extend(
        [
            at(active, 0, Close, SynSent, client, server).map(|t| t.by_process(100)),
            every(at(passive, 10_000, Listen, SynRecv, server, client)),
            at(passive, 20_000, SynRecv, Established, server, client).map(|t| t.rtt(20, 0)),
            at(active, 20_000, SynSent, Established, client, server).map(|t| t.rtt(20, 0)),
            every(at(active, 40_000, Established, FinWait1, client, server)),
            every(at(passive, 45_000, Established, CloseWait, server, client)),
            every(at(active, 50_000, FinWait1, FinWait2, client, server)),
            every(at(passive, 55_000, CloseWait, LastAck, server, client)),
            at(active, 60_000, FinWait2, Close, client, server)
                .map(|t| t.by_process(100).bytes(14, 7)),
            at(passive, 70_000, LastAck, Close, server, client).map(|t| t.bytes(7, 14)),
        ]
        .into_iter()
        .flatten()
        .map(|t| Ok(Record::Transition(t))),
    );
}

/// The records of [`connection`] as the kernel writes them with socket slots: each end's
/// CLOSE with what its slot kept (the client's connect and handshake, the server's handshake
/// and accept).
fn kept_connection(i: u64, ts: u64, out: &mut Vec<Result<Record, DecodeError>>) {
    let mut quiet = Vec::new();
    connection(i, ts, false, &mut quiet);
    let t = |r: &Result<Record, DecodeError>| match r {
        Ok(Record::Transition(t)) => *t,
        _ => unreachable!("transitions only"),
    };
    let (open, passive_established, established, active_close, passive_close) = (
        t(&quiet[0]),
        t(&quiet[1]),
        t(&quiet[2]),
        t(&quiet[3]),
        t(&quiet[4]),
    );
    let facts = |t: &Transition, have: u32, opened_ns: u64| tcp_trace_common::Kept {
        have,
        netns: t.netns,
        family: tcp_trace_common::AF_INET,
        sport: t.local.port(),
        dport: t.remote.port(),
        saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        opened_ns,
        established_ns: t.ts_ns,
        srtt_us: t.srtt_us,
        total_retrans: t.total_retrans,
        owner_ns: opened_ns,
        pid_tgid: 100 << 32 | 100,
        ..Default::default()
    };
    use tcp_trace_common::kept::*;
    let client = facts(&established, OPENED | OWNER | ESTABLISHED, open.ts_ns);
    let server = facts(
        &passive_established,
        PASSIVE | ESTABLISHED | OWNER | ACCEPTED,
        passive_established.ts_ns,
    );
    for (sock, facts, close) in [
        (open.sock, client, active_close),
        (passive_established.sock, server, passive_close),
    ] {
        let mut kept = Kept::new(sock, 0, facts).expect("an IPv4 tuple");
        kept.close = Some(close);
        out.push(Ok(Record::Kept(kept)));
    }
}

/// Replays `connections` through `pipeline`; returns how long it took.
fn run(pipeline: &mut Pipeline, connections: u64, all: bool) -> Duration {
    run_with(pipeline, connections, |i, ts, out| {
        connection(i, ts, all, out)
    })
}

/// Replays `connections`, each written by `write`, through `pipeline`.
fn run_with(
    pipeline: &mut Pipeline,
    connections: u64,
    write: impl Fn(u64, u64, &mut Vec<Result<Record, DecodeError>>),
) -> Duration {
    let mut records = Vec::new();
    let started = Instant::now();
    for drain in 0..connections / PER_DRAIN {
        records.clear();
        for i in drain * PER_DRAIN..(drain + 1) * PER_DRAIN {
            write(i, i * 100_000, &mut records);
        }
        pipeline.records(records.iter());
        pipeline.batch_done(u64::MAX);
    }
    // The last drain's closes complete in the next.
    pipeline.batch_done(u64::MAX);
    let took = started.elapsed();
    assert_eq!(
        pipeline.table.lock().unwrap().len(),
        0,
        "every connection closed"
    );
    eprintln!(
        "{connections} connections in {took:?}: {:.0} ns a connection",
        took.as_nanos() as f64 / connections as f64,
    );
    took
}

#[test]
#[ignore = "a measurement: run it on its own, see the module"]
fn replay() {
    run(&mut pipeline(), CONNECTIONS, false);
}

#[test]
#[ignore = "a measurement: run it on its own, see the module"]
fn replay_slots() {
    run_with(&mut pipeline(), CONNECTIONS, kept_connection);
}

#[test]
#[ignore = "a measurement: run it on its own, see the module"]
fn replay_watched() {
    let mut pipeline = pipeline();
    let mut subscription = pipeline
        .bus
        .subscribe(SubscribeRequest {
            filter: Default::default(),
            queue: usize::MAX,
            queue_bytes: usize::MAX,
            start: Start::Live,
            peer: "replay".into(),
        })
        .unwrap();
    // A subscriber that keeps up: each drain's events taken off its queue.
    let connections = CONNECTIONS / 4;
    run(&mut pipeline, connections, true);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut delivered = 0;
    while let std::task::Poll::Ready(Some(delivery)) = subscription.poll_next(&mut cx) {
        delivered += u64::from(matches!(delivery, crate::bus::Delivery::Event(_)));
    }
    assert_eq!(delivered, connections * 12, "12 events a connection");
}
