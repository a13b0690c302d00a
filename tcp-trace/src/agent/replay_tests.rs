//! The pipeline's own cost per connection, with no kernel behind it: the always-on agent's
//! records of a churn (five a connection, as a quiet kernel writes them) replayed through the
//! drain's `Sink`, a drain of 20 connections at a time. Ignored by default: it measures, it does
//! not check. Run it under callgrind for instruction counts, which the noisy shared machines
//! here cannot disturb (`docs/benchmarks.md`, "The agent's own work"):
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
    bus::{Bus, BusConfig},
    capture::{DecodeError, Hooks, KernelCounterReader, Record, Sink},
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

/// The records a quiet kernel writes for connection `i`, client and server end, at `ts`.
fn connection(i: u64, ts: u64, out: &mut Vec<Result<Record, DecodeError>>) {
    let server = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 6379);
    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1024 + (i % 60_000) as u16);
    // Kernel socket addresses: slab objects 2 KiB apart, reused as connections come and go.
    let (active, passive) = (
        0xffff_8880_0000_0000 + (i % 4096) * 4096,
        0xffff_8880_0000_0800 + (i % 4096) * 4096,
    );
    let at = |sock, dt, old, new, local, remote| {
        Transition::test(sock, ts + dt, old, new)
            .between(local, remote)
            .quiet()
    };
    out.extend(
        [
            at(active, 0, Close, SynSent, client, server).by_process(100),
            at(passive, 20_000, SynRecv, Established, server, client).rtt(20, 0),
            at(active, 20_000, SynSent, Established, client, server).rtt(20, 0),
            at(active, 60_000, FinWait2, Close, client, server)
                .by_process(100)
                .bytes(14, 7),
            at(passive, 70_000, LastAck, Close, server, client).bytes(7, 14),
        ]
        .map(|t| Ok(Record::Transition(t))),
    );
}

#[test]
#[ignore = "a measurement: run it on its own, see the module"]
fn replay() {
    let mut pipeline = pipeline();
    let mut records = Vec::new();
    let started = Instant::now();
    for drain in 0..CONNECTIONS / PER_DRAIN {
        records.clear();
        for i in drain * PER_DRAIN..(drain + 1) * PER_DRAIN {
            connection(i, i * 50_000, &mut records);
        }
        pipeline.records(records.iter());
        pipeline.batch_done(u64::MAX);
    }
    let took = started.elapsed();
    let table = pipeline.table.lock().unwrap();
    assert_eq!(table.len(), 0, "every connection closed");
    eprintln!(
        "{CONNECTIONS} connections in {took:?}: {:.0} ns a connection, {:.2} CPU-s per million",
        took.as_nanos() as f64 / CONNECTIONS as f64,
        took.as_secs_f64() * 1e6 / CONNECTIONS as f64
    );
}
