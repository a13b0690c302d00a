//! The programs' own counters (ring-full losses, netns filter skips) and the kernel's per-program
//! miss counts, readable from any task.
use std::{
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, PerCpuArray};
use tcp_trace_common::counter;

/// Counters kept by the programs, summed over CPUs, and the kernel's skips of each program: one
/// read of the map and of each program's info.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub ring_full: u64,
    pub filtered: u64,
    /// Program runs the kernel skipped because the program (or, for a classic tracepoint, any
    /// tracing program) was running on that CPU, summed over `by_program`.
    pub missed: u64,
    /// The state program's skips its guard recorded instead (`counter::RECOVERED`): not lost,
    /// and not in `missed`.
    pub recovered: u64,
    /// Keepalive timer runs whose entry and exit did not pair up (`counter::KEEPALIVE_UNPAIRED`).
    pub keepalive_unpaired: u64,
    /// Sockets that found their slot another's (`counter::SLOT_TAKEN`), and records written
    /// past a busy slot (`counter::SLOT_CONTENDED`).
    pub slot_taken: u64,
    pub slot_contended: u64,
    /// `missed` by program name (every loaded program but the guard, in name order): which
    /// hook lost runs tells which records are missing.
    pub by_program: Vec<(&'static str, u64)>,
}

impl KernelCounters {
    /// `missed` summed by hook, in [`HOOKS`] order.
    pub fn missed_by_hook(&self) -> [(&'static str, u64); HOOKS.len()] {
        let mut missed = HOOKS.map(|hook| (hook, 0));
        for &(name, n) in &self.by_program {
            missed[hook_of(name)].1 += n;
        }
        missed
    }
}

/// Reads the programs' per-CPU counters and the kernel's own per-program miss counts; shared
/// between the drain task and the API.
#[derive(Clone)]
pub struct KernelCounterReader {
    /// None in a replay of records with no kernel behind it: every count 0.
    map: Option<Arc<Mutex<PerCpuArray<MapData, u64>>>>,
    /// The programs' names, and duplicates of their fds for their info.
    programs: Arc<Vec<(&'static str, OwnedFd)>>,
}

impl KernelCounterReader {
    pub fn new(map: PerCpuArray<MapData, u64>, programs: Vec<(&'static str, OwnedFd)>) -> Self {
        KernelCounterReader {
            map: Some(Arc::new(Mutex::new(map))),
            programs: Arc::new(programs),
        }
    }

    /// A reader of no programs and no map: what a replay of recorded records reads.
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        KernelCounterReader {
            map: None,
            programs: Arc::new(Vec::new()),
        }
    }

    pub fn read(&self) -> KernelCounters {
        let mut by_program: Vec<_> = self
            .programs
            .iter()
            // The guard's own skips lose nothing: it is skipped only where it already runs,
            // and there the state program is free to run.
            .filter(|(name, _)| *name != STATE_GUARD)
            .map(|(name, fd)| (*name, recursion_misses(fd.as_raw_fd())))
            .collect();
        by_program.sort_unstable();
        // The map after the skips (the kernel counts a skip before the guard records it): a
        // recovery that slips in between makes `missed` a moment late, never ahead.
        let [
            ring_full,
            filtered,
            recovered,
            keepalive_unpaired,
            slot_taken,
            slot_contended,
        ] = match &self.map {
            None => [0; 6],
            Some(map) => {
                let map = map.lock().unwrap_or_else(|p| p.into_inner());
                let sum = |index: u32| map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0);
                [
                    sum(counter::RING_FULL),
                    sum(counter::FILTERED),
                    sum(counter::RECOVERED),
                    sum(counter::KEEPALIVE_UNPAIRED),
                    sum(counter::SLOT_TAKEN),
                    sum(counter::SLOT_CONTENDED),
                ]
            }
        };
        for (name, n) in &mut by_program {
            if *name == STATE_BTF {
                *n = n.saturating_sub(recovered);
            }
        }
        KernelCounters {
            ring_full,
            filtered,
            missed: by_program.iter().map(|(_, n)| n).sum(),
            recovered,
            keepalive_unpaired,
            slot_taken,
            slot_contended,
            by_program,
        }
    }
}

/// The BTF state program, and its guard (`tcp-trace-ebpf` `state.rs`): the state program's
/// skips the guard recorded are not lost.
pub(super) const STATE_BTF: &str = "inet_sock_set_state_btf";
pub(super) const STATE_GUARD: &str = "set_state_guard";

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

/// How often the kernel skipped a program because it (or, for a classic tracepoint, any
/// tracing program) was already running on that CPU: `recursion_misses` of the program's
/// `bpf_prog_info`. Each skip of the state program is a transition lost. Asked of the kernel
/// with one BPF_OBJ_GET_INFO_BY_FD per program, rather than by formatting and parsing each
/// program's /proc fdinfo text (four times a second, and at every scrape).
fn recursion_misses(fd: RawFd) -> u64 {
    prog_info(fd).map_or(0, |info| info.recursion_misses)
}

/// The fields of `struct bpf_prog_info` (include/uapi/linux/bpf.h) read here, and where.
struct ProgInfo {
    #[cfg_attr(not(test), allow(dead_code))]
    id: u32,
    recursion_misses: u64,
    #[cfg_attr(not(test), allow(dead_code))]
    verified_insns: u32,
}

fn prog_info(fd: RawFd) -> Option<ProgInfo> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// The struct up to `attach_btf_id` (Linux 5.16); a newer kernel fills no more than this,
    /// an older one says in `info_len` how much it filled.
    const INFO_LEN: usize = 232;
    const ID: usize = 4;
    const RECURSION_MISSES: usize = 208;
    const VERIFIED_INSNS: usize = 216;
    #[repr(C, align(8))]
    struct Info([u8; INFO_LEN]);
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = Info([0; INFO_LEN]);
    let mut attr = Attr {
        bpf_fd: u32::try_from(fd).ok()?,
        info_len: INFO_LEN as u32,
        info: info.0.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points the kernel at `info`, INFO_LEN bytes it may write; both outlive the
    // call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    let filled = attr.info_len as usize;
    if rc != 0 || filled < ID + 4 {
        return None;
    }
    let u64_at = |at: usize| u64::from_ne_bytes(info.0[at..at + 8].try_into().unwrap_or_default());
    Some(ProgInfo {
        id: u32::from_ne_bytes(info.0[ID..ID + 4].try_into().unwrap_or_default()),
        // Linux 5.12 added the field: an older kernel skips nothing it would count.
        recursion_misses: if filled >= RECURSION_MISSES + 8 {
            u64_at(RECURSION_MISSES)
        } else {
            0
        },
        verified_insns: if filled >= VERIFIED_INSNS + 4 {
            u32::from_ne_bytes(
                info.0[VERIFIED_INSNS..VERIFIED_INSNS + 4]
                    .try_into()
                    .unwrap_or_default(),
            )
        } else {
            0
        },
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd};

    use super::*;

    /// Needs root (CI runs as root): a program of the agent's own object, loaded, asked both ways.
    #[test]
    fn the_kernel_answers_a_programs_info_as_its_fdinfo_says() {
        let mut ebpf = aya::EbpfLoader::new()
            .load(crate::capture::object())
            .expect("the agent's object loads (as root)");
        let program: &mut aya::programs::TracePoint = ebpf
            .program_mut("tcp_receive_reset")
            .expect("the object has it")
            .try_into()
            .expect("a classic tracepoint");
        program.load().expect("it loads");
        let fd = program.fd().expect("loaded").as_fd().as_raw_fd();
        let info = prog_info(fd).expect("BPF_OBJ_GET_INFO_BY_FD answers");
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let field = |name: &str| -> u64 {
            fdinfo
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in {fdinfo}"))
        };
        assert_eq!(u64::from(info.id), field("prog_id:"));
        // The field after recursion_misses, non-zero: the offsets around it are right.
        assert!(info.verified_insns > 0);
        assert_eq!(u64::from(info.verified_insns), field("verified_insns:"));
        assert_eq!(info.recursion_misses, field("recursion_misses:"));
    }
}
