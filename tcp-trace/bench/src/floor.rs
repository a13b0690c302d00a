//! The floors of the state hook's cost: programs of the agent's own object cut down to one part
//! of the state program's path (tcp-trace-ebpf/src/floor.rs), each attached alone to the same
//! BTF tracepoint by this process, with the agent's ring and wake-up policy. Their run time per
//! transition, beside the real program's in the same phase, says how much of its cost any
//! design must pay here: what no change to the program can remove.
use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
};

use anyhow::{Context as _, Result};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, RingBuf},
    programs::{BtfTracePoint, ProgramError},
};
use tcp_trace::capture::{self, CaptureConfig};
use tcp_trace_common::{KernelOffsets, globals, switch};

/// Which cut-down program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FloorProgram {
    /// Returns at once: dispatch and the run-time statistics' own clock reads.
    Empty,
    /// The state and the transitions switch: a transition that writes no record.
    Skip,
    /// The state program's own path for a transition it does not record: the guard's log
    /// and the switch.
    Quiet,
    /// The switch, then a record of the state program's size reserved, written, submitted.
    Record,
    /// A record of that size for every transition, the switch not read.
    RecordAll,
    /// The switch, then a record of the header alone.
    RecordSmall,
    /// As `RecordAll`, through one ring shared by every CPU instead of a ring per CPU.
    Shared,
    /// The one-record-per-end design's update of the socket's own storage, no record.
    Storage,
    /// That update, and one record when the socket closes (2 a connection).
    StorageEnd,
    /// As `StorageEnd` with the state in a preallocated hash map keyed by the socket.
    HashEnd,
    /// The hash map touched only at connect, establishment and close, the record at close
    /// carrying what it kept: the one-record-per-end design as it would run.
    HashFew,
    /// As `HashFew` with the state in an array of slots claimed per socket: no hash map.
    Slots,
    /// As `Slots` with the state program's own records, read from the socket.
    SlotsFull,
    /// As `HashEnd` with the owner taken at connect, and at close the metrics and the peer's
    /// totals updated in kernel maps instead of a record: no record at all.
    Aggregate,
}

impl FloorProgram {
    pub const ALL: [FloorProgram; 14] = [
        FloorProgram::Empty,
        FloorProgram::Skip,
        FloorProgram::Quiet,
        FloorProgram::Record,
        FloorProgram::RecordAll,
        FloorProgram::RecordSmall,
        FloorProgram::Shared,
        FloorProgram::Storage,
        FloorProgram::StorageEnd,
        FloorProgram::HashEnd,
        FloorProgram::HashFew,
        FloorProgram::Slots,
        FloorProgram::SlotsFull,
        FloorProgram::Aggregate,
    ];

    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            FloorProgram::Empty => "floor_empty",
            FloorProgram::Skip => "floor_skip",
            FloorProgram::Quiet => "floor_quiet",
            FloorProgram::Record => "floor_record",
            FloorProgram::RecordAll => "floor_record_all",
            FloorProgram::RecordSmall => "floor_record_small",
            FloorProgram::Shared => "floor_shared",
            FloorProgram::Storage => "floor_storage",
            FloorProgram::StorageEnd => "floor_storage_end",
            FloorProgram::HashEnd => "floor_hash_end",
            FloorProgram::HashFew => "floor_hash_few",
            FloorProgram::Slots => "floor_slots",
            FloorProgram::SlotsFull => "floor_slots_full",
            FloorProgram::Aggregate => "floor_aggregate",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            FloorProgram::Empty => "floor: empty tp_btf program",
            FloorProgram::Skip => "floor: switch only, no record",
            FloorProgram::Quiet => "floor: the state program's unrecorded path",
            FloorProgram::Record => "floor: switch and an empty record",
            FloorProgram::RecordAll => "floor: an empty record every run",
            FloorProgram::RecordSmall => "floor: switch and a header-only record",
            FloorProgram::Shared => "floor: a record every run, one ring for all CPUs",
            FloorProgram::Storage => "floor: socket storage updated, no record",
            FloorProgram::StorageEnd => "floor: socket storage, a record at close",
            FloorProgram::HashEnd => "floor: hash map by socket, a record at close",
            FloorProgram::HashFew => {
                "floor: hash map at connect, establishment and close, a record at close"
            }
            FloorProgram::Slots => "floor: a slot per socket in an array, a record at close",
            FloorProgram::SlotsFull => {
                "floor: a slot per socket, the state program's own record at close"
            }
            FloorProgram::Aggregate => "floor: hash map by socket, metrics and peers in the kernel",
        }
    }
}

/// Slots of `floor_slots`: a power of two, many times the sockets the churn holds at once.
const SLOTS: u32 = 1 << 16;

/// The running kernel's member offsets, resolved from its BTF once for every floor run.
fn kernel_offsets() -> &'static KernelOffsets {
    static OFFSETS: OnceLock<KernelOffsets> = OnceLock::new();
    OFFSETS.get_or_init(capture::kernel_offsets)
}

/// The name of the thread that drains a floor's rings (the bench measures its CPU).
pub const DRAIN_THREAD: &str = "floor-drain";

/// A floor program attached by this process, its rings drained (read, merged, decoded and
/// dropped) by a thread as the agent's drain reads them.
pub struct Floor {
    _ebpf: Ebpf,
    stop: Arc<AtomicBool>,
    drain: Option<JoinHandle<()>>,
}

impl Floor {
    pub fn start(program: FloorProgram) -> Result<Floor> {
        let defaults = CaptureConfig::default();
        let wakeup_ns = u64::try_from(defaults.wakeup_interval.as_nanos()).unwrap_or(u64::MAX);
        // At the pace of the always-on agent, whose floors these are: nobody subscribes.
        let pace = capture::UNWATCHED_WAKEUP_INTERVAL;
        let unwatched_ns = pace.as_nanos() as u64;
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global(globals::WAKEUP_INTERVAL_NS, &wakeup_ns, true)
            .override_global(globals::UNWATCHED_WAKEUP_INTERVAL_NS, &unwatched_ns, true)
            .map_max_entries("RINGS", capture::possible_cpus()?)
            // The size the one ring had before the rings were per CPU.
            .map_max_entries("FLOOR_SHARED", 4 << 20)
            // Room for every socket of the churn at once (TIME_WAIT holds none: it is not a
            // full socket).
            .map_max_entries("FLOOR_SOCK_HASH", 1 << 16)
            .map_max_entries("FLOOR_AGG_SOCKS", 1 << 16)
            // `floor_aggregate`'s counters and the peers of the churn (one listener each).
            .map_max_entries("FLOOR_METRICS", 64)
            .map_max_entries("FLOOR_PEERS", 4096)
            .map_max_entries("FLOOR_SLOTS", SLOTS)
            .override_global("FLOOR_SLOTS_MASK", &(SLOTS - 1), true)
            // `floor_aggregate` reads the socket's tuple and namespace as the state program does.
            .override_global(globals::KERNEL_OFFSETS, kernel_offsets(), true)
            .load(capture::object())
            .context("load the agent's eBPF object")?;
        let mut rings = capture::per_cpu_rings(&mut ebpf, defaults.ring_bytes)?;
        let mut switches: Array<_, u32> =
            Array::try_from(ebpf.map_mut("SWITCHES").context("no SWITCHES map")?)?;
        switches.set(switch::UNWATCHED, 1, 0)?;
        let shared = ebpf
            .take_map("FLOOR_SHARED")
            .context("no FLOOR_SHARED map")?;
        let mut shared = RingBuf::try_from(shared)?;
        let btf = Btf::from_sys_fs().context("the kernel's BTF")?;
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(program.name())
            .with_context(|| format!("no program {} in the object", program.name()))?
            .try_into()?;
        prog.load("inet_sock_set_state", &btf)
            .and_then(|()| prog.attach().map(drop))
            .map_err(|e: ProgramError| anyhow::anyhow!(capture::error_chain(&e)))
            .with_context(|| format!("attach {}", program.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let drain = thread::Builder::new().name(DRAIN_THREAD.into()).spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    // As the agent's drain reads them (held records wait for the next drain).
                    while rings.drain(capture::MAX_DRAIN, false, |_| {}).len() > 0 {}
                    while shared.next().is_some() {}
                    thread::sleep(pace);
                }
            }
        })?;
        Ok(Floor {
            _ebpf: ebpf,
            stop,
            drain: Some(drain),
        })
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}
