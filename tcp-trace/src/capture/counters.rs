//! The programs' own counters (ring-full losses, netns filter skips) and the kernel's per-program
//! miss counts, readable from any task.
use std::{
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, PerCpuArray};
use tcp_trace_common::counter;

/// Counters kept by the programs, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub ring_full: u64,
    pub filtered: u64,
    /// Program runs the kernel skipped because another BPF tracing program was running on that
    /// CPU (summed over our programs).
    pub missed: u64,
}

/// Reads the programs' per-CPU counters and the kernel's own per-program miss counts; shared
/// between the drain task and the API.
#[derive(Clone)]
pub struct KernelCounterReader {
    map: Arc<Mutex<PerCpuArray<MapData, u64>>>,
    /// The programs' names, and duplicates of their fds for their fdinfo.
    programs: Arc<Vec<(&'static str, OwnedFd)>>,
}

impl KernelCounterReader {
    pub fn new(map: PerCpuArray<MapData, u64>, programs: Vec<(&'static str, OwnedFd)>) -> Self {
        KernelCounterReader {
            map: Arc::new(Mutex::new(map)),
            programs: Arc::new(programs),
        }
    }

    pub fn read(&self) -> KernelCounters {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let sum = |index: u32| map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0);
        KernelCounters {
            ring_full: sum(counter::RING_FULL),
            filtered: sum(counter::FILTERED),
            missed: self
                .programs
                .iter()
                .map(|(_, fd)| recursion_misses(fd.as_raw_fd()))
                .sum(),
        }
    }

    /// The kernel's skips summed by hook, in [`HOOKS`] order.
    pub fn missed_by_hook(&self) -> [(&'static str, u64); HOOKS.len()] {
        let mut missed = HOOKS.map(|hook| (hook, 0));
        for (name, n) in self.missed_by_program() {
            missed[hook_of(name)].1 += n;
        }
        missed
    }

    /// The kernel's skips of each program, by the program's name (every loaded program, in
    /// name order): which hook lost runs tells which records are missing.
    pub fn missed_by_program(&self) -> Vec<(&'static str, u64)> {
        let mut missed: Vec<_> = self
            .programs
            .iter()
            .map(|(name, fd)| (*name, recursion_misses(fd.as_raw_fd())))
            .collect();
        missed.sort_unstable();
        missed
    }
}

/// The hooks, as operators ask about them: what a skipped run of each loses (the state
/// transitions; retransmits and resets; who accepted; keepalive probes; keepalive settings).
pub const HOOKS: [&str; 5] = ["state", "tcp", "accept", "keepalive", "setsockopt"];

/// The hook a program (by its name in the eBPF object) belongs to, as an index into [`HOOKS`].
fn hook_of(program: &str) -> usize {
    let hook = if program.starts_with("inet_sock_set_state") || program.starts_with("floor_") {
        "state"
    } else if program.starts_with("tcp_") {
        "tcp"
    } else if program.starts_with("sys_exit_accept") {
        "accept"
    } else if program.starts_with("timer_expire") {
        "keepalive"
    } else {
        "setsockopt"
    };
    HOOKS.iter().position(|h| *h == hook).unwrap_or(0)
}

/// How often the kernel skipped a program because another BPF tracing program was already
/// running on that CPU (`recursion_misses` in the program fd's fdinfo; the kernel does not nest
/// tracing programs). Each skip of the state program is a transition lost.
fn recursion_misses(fd: RawFd) -> u64 {
    let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
        return 0;
    };
    info.lines()
        .find_map(|line| line.strip_prefix("recursion_misses:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
