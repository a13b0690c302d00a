//! Every map of the eBPF side, and the globals the agent sets at load time.
use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use tcp_trace_common::{SockLayout, counter};

/// The records, in the order the kernel reserved them. Its size is set by the agent (`--ring-bytes`).
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU counters, indexed by `tcp_trace_common::counter`.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// When the programs last forced a consumer wake-up (bpf_ktime_get_ns).
#[map(name = "LAST_WAKEUP")]
static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

// Globals: the agent overwrites these in .rodata before loading (EbpfLoader::set_global).
#[unsafe(no_mangle)]
static NETNS_NET_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static NETNS_INUM_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static NETNS_FILTER: u32 = 0;
#[unsafe(no_mangle)]
static WAKEUP_INTERVAL_NS: u64 = 1_000_000;
#[unsafe(no_mangle)]
static SK_ERR_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SK_LOCK_OWNED_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SK_PROTOCOL_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SRTT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TOTAL_RETRANS_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static BYTES_ACKED_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static BYTES_RECEIVED_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SK_TIMER_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static PROBES_OUT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SKB_DEV_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static DEV_NET_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static KEEPALIVE_TIMER_FN: u64 = 0;
#[unsafe(no_mangle)]
static TASK_FILES_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FILES_FDT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FDT_MAX_FDS_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FDT_FD_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FILE_PRIVATE_DATA_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SOCKET_SK_OFFSET: u32 = 0;

#[unsafe(no_mangle)]
pub(crate) static SOCK_LAYOUT: SockLayout = SockLayout {
    family: 0,
    dport: 0,
    daddr: 0,
    v6_saddr: 0,
    v6_daddr: 0,
    inet_sport: 0,
    inet_saddr: 0,
    task_comm: 0,
};

/// A member offset from [`SockLayout`], as a constant the verifier knows.
macro_rules! layout {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&raw const $crate::maps::SOCK_LAYOUT.$field) }
    };
}
pub(crate) use layout;

/// Read a global through a volatile load so the compiler cannot fold in the default.
macro_rules! global {
    ($name:ident) => {
        unsafe { core::ptr::read_volatile(&raw const $name) }
    };
}

pub fn netns_offsets() -> (u32, u32) {
    (global!(NETNS_NET_OFFSET), global!(NETNS_INUM_OFFSET))
}

pub fn netns_filter() -> u32 {
    global!(NETNS_FILTER)
}

pub fn sk_err_offset() -> u32 {
    global!(SK_ERR_OFFSET)
}

pub fn sk_lock_owned_offset() -> u32 {
    global!(SK_LOCK_OWNED_OFFSET)
}

pub fn sk_protocol_offset() -> u32 {
    global!(SK_PROTOCOL_OFFSET)
}

pub fn tcp_sock_offsets() -> (u32, u32) {
    (global!(SRTT_OFFSET), global!(TOTAL_RETRANS_OFFSET))
}

pub fn bytes_offsets() -> (u32, u32) {
    (global!(BYTES_ACKED_OFFSET), global!(BYTES_RECEIVED_OFFSET))
}

pub fn sk_timer_offset() -> u32 {
    global!(SK_TIMER_OFFSET)
}

pub fn probes_out_offset() -> u32 {
    global!(PROBES_OUT_OFFSET)
}

pub fn skb_dev_offsets() -> (u32, u32) {
    (global!(SKB_DEV_OFFSET), global!(DEV_NET_OFFSET))
}

/// Offsets from a task to an fd's socket (see `tcp_trace_common::globals`).
pub struct FdPath {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
}

pub fn fd_path() -> FdPath {
    FdPath {
        task_files: global!(TASK_FILES_OFFSET),
        files_fdt: global!(FILES_FDT_OFFSET),
        fdt_max_fds: global!(FDT_MAX_FDS_OFFSET),
        fdt_fd: global!(FDT_FD_OFFSET),
        file_private_data: global!(FILE_PRIVATE_DATA_OFFSET),
        socket_sk: global!(SOCKET_SK_OFFSET),
    }
}

pub fn keepalive_timer_fn() -> u64 {
    global!(KEEPALIVE_TIMER_FN)
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
pub fn reserve<T: 'static>() -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        count(counter::RING_FULL);
    }
    entry
}

/// Submits a reserved record with the wake-up policy of [`submit_flags`].
pub fn submit<T: 'static>(entry: aya_ebpf::maps::ring_buf::RingBufEntry<T>, now: u64) {
    entry.submit(submit_flags(now));
}

pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Flags for `bpf_ringbuf_submit`. A wake-up per record costs an irq_work and an epoll wake-up
/// each (../shared/PLATFORM.md measured a 20x slowdown), so a record wakes the agent only if no
/// record did in the last WAKEUP_INTERVAL_NS. The agent, once woken, keeps draining every interval
/// until a drain one interval after its last wake-up finds the ring empty, so a record that did
/// not wake it still arrives within about one interval.
pub fn submit_flags(now: u64) -> u64 {
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else {
        return BPF_RB_FORCE_WAKEUP as u64;
    };
    let interval = global!(WAKEUP_INTERVAL_NS);
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
