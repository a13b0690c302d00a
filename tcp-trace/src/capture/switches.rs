//! The agent's switches in the kernel: what the programs record, and how soon they wake it.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{Array, MapData};
use tcp_trace_common::switch;

/// Least time a record may wait before it wakes the agent while nobody subscribes: the
/// programs' `switch::UNWATCHED` interval (or `--wakeup-interval-us`, if longer). At full churn
/// a drain every millisecond cost the agent 16% more CPU and the state program 30% more time
/// per run than one every 20 ms (docs/benchmarks.md, 2026-12-03 08:31); 10 ms keeps a busy
/// CPU's records well inside its ring (2,000 at 200,000 records a second: 13% of 2 MiB).
pub const UNWATCHED_WAKEUP_INTERVAL: Duration = Duration::from_millis(10);

/// The agent's switches in the kernel (`tcp_trace_common::switch`), both off when loaded.
/// Shared: subscriptions flip them from the gRPC tasks while the drain thread owns the rest of
/// the capture.
#[derive(Clone)]
pub struct Switches {
    map: Arc<Mutex<Array<MapData, u32>>>,
    /// The wake-up interval in force, in ns: the drain paces itself by it.
    interval_ns: Arc<AtomicU64>,
    watched: Duration,
    unwatched: Duration,
}

impl Switches {
    /// Over the programs' `SWITCHES` map, both off as loaded: the drain paced by `watched`.
    pub(super) fn new(
        map: Array<MapData, u32>,
        watched: Duration,
        unwatched: Duration,
    ) -> Switches {
        Switches {
            map: Arc::new(Mutex::new(map)),
            interval_ns: Arc::new(AtomicU64::new(watched.as_nanos() as u64)),
            watched,
            unwatched,
        }
    }

    /// Whether the state programs record every transition, or only those that open, establish
    /// and close a socket.
    pub fn set_transitions(&self, on: bool) -> Result<(), aya::maps::MapError> {
        self.set(switch::TRANSITIONS, on)
    }

    /// Whether nobody subscribes: records then wake the agent at most every
    /// [`UNWATCHED_WAKEUP_INTERVAL`], not every `--wakeup-interval-us`.
    pub fn set_unwatched(&self, on: bool) -> Result<(), aya::maps::MapError> {
        self.set(switch::UNWATCHED, on)?;
        let interval = if on { self.unwatched } else { self.watched };
        self.interval_ns
            .store(interval.as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn set(&self, index: u32, on: bool) -> Result<(), aya::maps::MapError> {
        let mut switches = self.map.lock().unwrap_or_else(|p| p.into_inner());
        switches.set(index, u32::from(on), 0)
    }

    pub(super) fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns.load(Ordering::Relaxed))
    }
}
