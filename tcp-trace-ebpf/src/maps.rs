//! Every map of the eBPF side, and the globals the agent sets at load time.
use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    btf_maps::{ArrayOfMaps, RingBuf},
    helpers::bpf_get_smp_processor_id,
    macros::{btf_map, map},
    maps::{Array, PerCpuArray, ring_buf::RingBufEntry},
};
use tcp_trace_common::{KernelOffsets, SockLayout, counter, switch};

/// One ring of records per CPU, indexed by the CPU a program runs on: no lock or cache line
/// shared between CPUs that write records at once. Each ring holds its CPU's records in the
/// order they were reserved; the agent merges the rings by time. The agent sets the number of
/// entries (the possible CPUs), creates the rings (`--ring-bytes`) and puts them here before it
/// attaches any program. The inner ring's size here is only the template's.
#[btf_map]
static RINGS: ArrayOfMaps<RingBuf<u8, 4096>, 1> = ArrayOfMaps::new();

/// Per-CPU counters, indexed by `tcp_trace_common::counter`.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// The agent's switches, indexed by `tcp_trace_common::switch`; it writes them at run time.
#[map(name = "SWITCHES")]
static SWITCHES: Array<u32> = Array::with_max_entries(switch::COUNT, 0);

/// When the programs last forced a consumer wake-up (bpf_ktime_get_ns).
#[map(name = "LAST_WAKEUP")]
static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

// Globals: the agent overwrites these in .rodata before loading (EbpfLoader::set_global).
#[unsafe(no_mangle)]
static NETNS_FILTER: u32 = 0;
#[unsafe(no_mangle)]
static WAKEUP_INTERVAL_NS: u64 = 1_000_000;
#[unsafe(no_mangle)]
static UNWATCHED_WAKEUP_INTERVAL_NS: u64 = 10_000_000;

#[unsafe(no_mangle)]
pub(crate) static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    net: 0,
    inum: 0,
    sk_err: 0,
    sk_lock_owned: 0,
    sk_protocol: 0,
    srtt: 0,
    total_retrans: 0,
    bytes_acked: 0,
    bytes_received: 0,
    sk_timer: 0,
    probes_out: 0,
    skb_dev: 0,
    dev_net: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    timer_function: 0,
    keepalive_timer_fn: 0,
    sock: SockLayout {
        family: 0,
        dport: 0,
        daddr: 0,
        v6_saddr: 0,
        v6_daddr: 0,
        inet_sport: 0,
        inet_saddr: 0,
        task_comm: 0,
        state: 0,
        _reserved: 0,
    },
};

/// A member of [`KernelOffsets`] (`offset!(sk_err)`, `offset!(sock.family)`), read through a
/// volatile load so the compiler cannot fold in the default. The verifier knows the value as a
/// constant: the global sits in frozen, read-only .rodata.
macro_rules! offset {
    ($($field:ident).+) => {
        unsafe { core::ptr::read_volatile(&raw const $crate::maps::KERNEL_OFFSETS.$($field).+) }
    };
}
pub(crate) use offset;

/// Read a global through a volatile load so the compiler cannot fold in the default.
macro_rules! global {
    ($name:ident) => {
        unsafe { core::ptr::read_volatile(&raw const $name) }
    };
}
pub(crate) use global;

/// Whether the agent asked for every state transition (`switch::TRANSITIONS`).
#[inline(always)]
pub fn all_transitions() -> bool {
    // An array lookup: the verifier inlines it into a bounds check and a load.
    SWITCHES.get(switch::TRANSITIONS).is_some_and(|&on| on != 0)
}

pub fn netns_filter() -> u32 {
    global!(NETNS_FILTER)
}

/// Whether a record for this network namespace passes the agent's `--netns` filter; counts
/// the ones that do not.
pub fn netns_wanted(netns: u32) -> bool {
    let filter = netns_filter();
    if filter != 0 && filter != netns {
        count(counter::FILTERED);
        return false;
    }
    true
}

/// Reserves a record, counting a full ring as a kernel-side loss.
pub fn reserve<T: 'static>() -> Option<RingBufEntry<T>> {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let entry = RINGS.get(cpu).and_then(|ring| ring.reserve_untyped::<T>(0));
    if entry.is_none() {
        count(counter::RING_FULL);
    }
    entry
}

/// Submits a reserved record with the wake-up policy of [`submit_flags`].
pub fn submit<T: 'static>(entry: RingBufEntry<T>, now: u64) {
    entry.submit(submit_flags(now));
}

pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Flags for `bpf_ringbuf_submit`. A wake-up per record costs an irq_work and an epoll wake-up
/// each, more than the record itself, so a record wakes the agent only if no record did in the
/// last WAKEUP_INTERVAL_NS. The agent, once woken, keeps draining every interval until a drain
/// one interval after its last wake-up finds the ring empty, so a record that did not wake it
/// still arrives within about one interval. The interval is longer while nobody subscribes
/// (`switch::UNWATCHED`).
pub fn submit_flags(now: u64) -> u64 {
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else {
        return BPF_RB_FORCE_WAKEUP as u64;
    };
    let interval = if SWITCHES.get(switch::UNWATCHED).is_some_and(|&on| on != 0) {
        global!(UNWATCHED_WAKEUP_INTERVAL_NS)
    } else {
        global!(WAKEUP_INTERVAL_NS)
    };
    // Racy across CPUs by design: at worst two CPUs both wake the agent.
    unsafe {
        if now.wrapping_sub(*last) >= interval {
            *last = now;
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            BPF_RB_NO_WAKEUP as u64
        }
    }
}
