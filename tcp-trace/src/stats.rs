//! The agent's own counters, and the snapshot GetStats returns.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use crate::{
    bus::{BusSnapshot, SubscriberSnapshot},
    capture::{Hooks, KernelCounterReader},
    event::convert,
    lifecycle::{Connection, Direction, Table},
    proto,
};

/// The hooks the kernel's skips are counted by (/metrics `tcptrace_kernel_runs_missed_total`).
pub use crate::capture::HOOKS;

/// Brings the table up to the kernel's open connections before a snapshot of it (GetStats,
/// `/metrics`, OTLP, listings): the agent's wiring, the socket slots' adoption. Blocking,
/// briefly.
pub type BeforeRead = Arc<dyn Fn() + Send + Sync>;

pub struct AgentStats {
    pub records_decoded: AtomicU64,
    pub records_malformed: AtomicU64,
    /// Sockets whose open the agent took from their kernel slot (capture/slots.rs).
    pub slots_adopted: AtomicU64,
    pub kernel: KernelCounterReader,
    pub hooks: Hooks,
    pub started_at: SystemTime,
    /// Lifetimes of closed connections the agent saw open.
    pub connection_duration: Histogram,
    /// Handshake latencies, as each connection is established.
    pub handshake_latency: Histogram,
    /// Healing against the kernel's socket list: lists compared, connections closed and
    /// sockets adopted by them.
    pub heals: AtomicU64,
    pub healed_closed: AtomicU64,
    pub healed_adopted: AtomicU64,
    /// CPU the heal's socket lists took (the kernel's walks of its socket hash included).
    pub heal_cpu_ns: AtomicU64,
}

impl AgentStats {
    pub fn new(kernel: KernelCounterReader, hooks: Hooks) -> Self {
        AgentStats {
            records_decoded: AtomicU64::new(0),
            records_malformed: AtomicU64::new(0),
            slots_adopted: AtomicU64::new(0),
            kernel,
            hooks,
            started_at: SystemTime::now(),
            connection_duration: Histogram::new(DURATION_BOUNDS_NS),
            handshake_latency: Histogram::new(DURATION_BOUNDS_NS),
            heals: AtomicU64::new(0),
            healed_closed: AtomicU64::new(0),
            healed_adopted: AtomicU64::new(0),
            heal_cpu_ns: AtomicU64::new(0),
        }
    }

    /// One list of the kernel's sockets compared with the table.
    pub fn healed(&self, healed: &crate::lifecycle::Healed) {
        self.heals.fetch_add(1, Ordering::Relaxed);
        self.healed_closed
            .fetch_add(healed.closed, Ordering::Relaxed);
        self.healed_adopted
            .fetch_add(healed.adopted, Ordering::Relaxed);
    }

    /// A connection established, after a handshake of `ns`.
    pub fn established(&self, handshake_ns: u64) {
        self.handshake_latency.record(handshake_ns);
    }

    /// A connection whose life is complete: its duration counts if the agent saw it open and
    /// close, and it was not a listener.
    pub fn closed(&self, c: &Connection) {
        if c.seen_open() && !c.end_missed() && c.direction != Direction::Listen {
            self.connection_duration.record(c.duration_ns());
        }
    }

    /// Everything GetStats answers: these counters, the bus's, and the table's (its lock held
    /// by the caller, briefly).
    pub fn snapshot(&self, bus: &BusSnapshot, table: &Table) -> proto::Stats {
        let kernel = self.kernel.read();
        // Every kind an event can have, seen or not. Lost counts the kernel losses published
        // (queue drops are per subscriber: subscriber_drops).
        let events = bus
            .by_kind
            .iter()
            .map(|&(kind, count)| proto::KindCount {
                kind: kind as i32,
                count,
            })
            .collect();
        proto::Stats {
            events,
            kernel_records: self.records_decoded.load(Ordering::Relaxed)
                + self.records_malformed.load(Ordering::Relaxed),
            kernel_ring_full: kernel.ring_full,
            kernel_filtered: kernel.filtered,
            kernel_missed: kernel.missed,
            kernel_recovered: kernel.recovered,
            kernel_keepalive_unpaired: kernel.keepalive_unpaired,
            kernel_slot_taken: kernel.slot_taken,
            kernel_slot_contended: kernel.slot_contended,
            kernel_missed_by_program: kernel
                .by_program
                .iter()
                .map(|&(name, n)| (name.to_owned(), n))
                .collect(),
            records_decoded: self.records_decoded.load(Ordering::Relaxed),
            records_malformed: self.records_malformed.load(Ordering::Relaxed),
            slots_adopted: self.slots_adopted.load(Ordering::Relaxed),
            subscribers: u32::try_from(bus.subscribers.len()).unwrap_or(u32::MAX),
            live_connections: table.len() as u64,
            table_full: table.table_full,
            ends_missed: table.reopened,
            peers: convert::peers(&table.peers),
            peers_full: table.peers.peers_full,
            long_lived_threshold: convert::duration(table.peers.long_lived_ns()),
            subscriber_drops: bus.totals.dropped,
            hooks_attached: self.hooks.attached.clone(),
            hooks_missing: self.hooks.missing.clone(),
            started_at: Some(self.started_at.into()),
            events_published: bus.last_seq,
            subscriptions: bus.subscribers.iter().map(subscriber).collect(),
            subscriber_totals: Some(proto::SubscriberTotals {
                matched: bus.totals.matched,
                delivered: bus.totals.delivered,
                dropped: bus.totals.dropped,
                queued: bus.totals.queued,
                abandoned: bus.totals.abandoned,
            }),
            replay: Some(proto::ReplayStats {
                capacity: bus.replay_capacity as u64,
                held: bus.replay_held as u64,
                oldest_seq: bus.replay_oldest_seq,
            }),
            connection_duration: Some(self.connection_duration.to_proto()),
            handshake_latency: Some(self.handshake_latency.to_proto()),
            heals: self.heals.load(Ordering::Relaxed),
            keepalive_unfollowed: table.keepalive_unfollowed,
            healed_closed: self.healed_closed.load(Ordering::Relaxed),
            healed_adopted: self.healed_adopted.load(Ordering::Relaxed),
            heal_cpu: convert::duration(self.heal_cpu_ns.load(Ordering::Relaxed)),
        }
    }
}

fn subscriber(s: &SubscriberSnapshot) -> proto::SubscriberStats {
    proto::SubscriberStats {
        id: s.id,
        filter: s.filter.clone(),
        peer: s.peer.clone(),
        subscribed_at: Some(s.since.into()),
        queue_capacity: u32::try_from(s.queue_capacity).unwrap_or(u32::MAX),
        matched: s.matched,
        replayed: s.replayed,
        delivered: s.delivered,
        dropped: s.dropped,
        queued: s.queued,
        replay_expired: s.replay_expired,
    }
}

/// Upper bounds of the connection-duration and handshake-latency buckets: 10us to 30 min in steps of about 3x, which
/// separates loopback, LAN, WAN, request/response and long-lived connections.
pub const DURATION_BOUNDS_NS: &[u64] = &[
    10_000,
    30_000,
    100_000,
    300_000,
    1_000_000,
    3_000_000,
    10_000_000,
    30_000_000,
    100_000_000,
    300_000_000,
    1_000_000_000,
    3_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    300_000_000_000,
    1_800_000_000_000,
];

/// Fixed buckets of nanosecond values, updated without a lock.
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, and one for everything above the last.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn record(&self, ns: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < ns);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn to_proto(&self) -> proto::Histogram {
        let buckets: Vec<proto::HistogramBucket> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, count)| proto::HistogramBucket {
                upper_bound: self.bounds.get(i).and_then(|&ns| convert::duration(ns)),
                count: count.load(Ordering::Relaxed),
            })
            .collect();
        proto::Histogram {
            count: buckets.iter().map(|b| b.count).sum(),
            buckets,
            sum: convert::duration(self.sum_ns.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fall_in_the_first_bucket_whose_bound_they_do_not_exceed() {
        let h = Histogram::new(&[10, 100]);
        for ns in [0, 10, 11, 100, 101, 5000] {
            h.record(ns);
        }
        let p = h.to_proto();
        let counts: Vec<u64> = p.buckets.iter().map(|b| b.count).collect();
        assert_eq!(counts, [2, 2, 2]);
        assert_eq!(p.count, 6);
        assert!(
            p.buckets[2].upper_bound.is_none(),
            "the last bucket is open"
        );
        assert_eq!(p.sum.unwrap().nanos, 5222);
    }
}
