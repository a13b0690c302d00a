//! The agent's own counters, and the snapshot GetStats returns.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use aya::maps::{MapData, PerCpuArray};
use tcp_trace_common::counter;

use crate::{
    bus::BusCounters,
    capture::{Hooks, KernelCounters},
    proto,
};

/// Reads the programs' per-CPU counters; shared between the drain task and the API.
#[derive(Clone)]
pub struct KernelCounterReader(Arc<Mutex<PerCpuArray<MapData, u64>>>);

impl KernelCounterReader {
    pub fn new(map: PerCpuArray<MapData, u64>) -> Self {
        KernelCounterReader(Arc::new(Mutex::new(map)))
    }

    pub fn read(&self) -> KernelCounters {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let sum = |index: u32| map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0);
        KernelCounters {
            submitted: sum(counter::SUBMITTED),
            ring_full: sum(counter::RING_FULL),
            filtered: sum(counter::FILTERED),
        }
    }
}

pub struct AgentStats {
    pub records_decoded: AtomicU64,
    pub records_malformed: AtomicU64,
    pub kernel: KernelCounterReader,
    pub hooks: Hooks,
    pub started_at: SystemTime,
}

impl AgentStats {
    pub fn new(kernel: KernelCounterReader, hooks: Hooks) -> Self {
        AgentStats {
            records_decoded: AtomicU64::new(0),
            records_malformed: AtomicU64::new(0),
            kernel,
            hooks,
            started_at: SystemTime::now(),
        }
    }

    pub fn snapshot(
        &self,
        bus: &BusCounters,
        live_connections: u64,
        table_full: u64,
    ) -> proto::Stats {
        let kernel = self.kernel.read();
        let kinds = [
            proto::EventKind::StateChange,
            proto::EventKind::ConnectionClosed,
            proto::EventKind::Retransmit,
            proto::EventKind::Reset,
            proto::EventKind::Keepalive,
        ];
        proto::Stats {
            events: kinds
                .iter()
                .map(|&kind| proto::KindCount {
                    kind: kind as i32,
                    count: bus.by_kind[kind as usize],
                })
                .collect(),
            kernel_records: kernel.submitted,
            kernel_ring_full: kernel.ring_full,
            kernel_filtered: kernel.filtered,
            records_decoded: self.records_decoded.load(Ordering::Relaxed),
            records_malformed: self.records_malformed.load(Ordering::Relaxed),
            subscribers: u32::try_from(bus.subscribers).unwrap_or(u32::MAX),
            live_connections,
            table_full,
            subscriber_drops: bus.dropped,
            hooks_attached: self.hooks.attached.clone(),
            hooks_missing: self.hooks.missing.clone(),
            started_at: Some(self.started_at.into()),
            // The lifecycle aggregates are added by the caller, which holds the table.
            ..Default::default()
        }
    }
}
