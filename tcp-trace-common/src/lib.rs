//! The records tcp-trace's eBPF programs write into the ring buffer, and the globals the agent
//! hands to them at load time. `#[repr(C)]`, no implicit padding, fixed-width integers only: this
//! file is the one definition of the wire between the kernel and the agent.
#![no_std]

/// What a record is. Every record starts with a [`Header`], so the agent reads `kind` first.
pub mod kind {
    /// A [`StateChange`](super::StateChange): `sock:inet_sock_set_state` fired for a TCP socket.
    pub const STATE_CHANGE: u32 = 1;
}

/// Bits of [`StateChange::flags`].
pub mod flags {
    /// The transition ran in softirq (or hardirq/NMI) context, so the current task is whoever was
    /// interrupted and `pid_tgid`/`comm` say nothing about the socket's owner.
    pub const INTERRUPT_CONTEXT: u32 = 1 << 0;
    /// Bits 8..16 hold the softirq vector + 1 (`irq:softirq_entry`'s `vec`: 1 TIMER, 3 NET_RX, ...)
    /// when [`INTERRUPT_CONTEXT`] is set.
    pub const SOFTIRQ_SHIFT: u32 = 8;
    pub const SOFTIRQ_MASK: u32 = 0xff << SOFTIRQ_SHIFT;
}

/// Linux TCP states, numbered as in `include/net/tcp_states.h`.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
    pub const BOUND_INACTIVE: u8 = 13;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// The first bytes of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// One of [`kind`].
    pub kind: u32,
    /// The CPU the program ran on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, nanoseconds.
    pub ts_ns: u64,
    /// The kernel address of the `struct sock`. Stable for the socket's life; reused only after
    /// the socket is freed, which is after its transition to CLOSE.
    pub sock: u64,
}

/// One TCP state transition, from the `sock:inet_sock_set_state` tracepoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub header: Header,
    /// Inode number of the socket's network namespace (`stat -L -c %i /proc/PID/ns/net`); 0 when
    /// the agent could not find the offsets in the kernel's BTF.
    pub netns: u32,
    pub old_state: u8,
    pub new_state: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Host byte order, as the tracepoint reports them.
    pub sport: u16,
    pub dport: u16,
    /// Bits from [`flags`].
    pub flags: u32,
    /// `bpf_get_current_pid_tgid()`: tgid in the high half, thread id in the low half.
    pub pid_tgid: u64,
    /// Source and destination address; IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The current task's name, NUL padded.
    pub comm: [u8; 16],
}

impl StateChange {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// Globals the agent sets at load time (`EbpfLoader::set_global`). The eBPF side reads them
/// through `read_volatile` so the compiler cannot fold the defaults in.
pub mod globals {
    /// Offset of `sock.__sk_common.skc_net` in the running kernel (from its BTF); 0 = unknown.
    pub const NETNS_NET_OFFSET: &str = "NETNS_NET_OFFSET";
    /// Offset of `net.ns.inum`; 0 = unknown.
    pub const NETNS_INUM_OFFSET: &str = "NETNS_INUM_OFFSET";
    /// Only report sockets in this network namespace (inode); 0 = all.
    pub const NETNS_FILTER: &str = "NETNS_FILTER";
    /// Minimum nanoseconds between two consumer wake-ups forced by the programs.
    pub const WAKEUP_INTERVAL_NS: &str = "WAKEUP_INTERVAL_NS";
}

/// Indices into the `COUNTERS` per-CPU array.
pub mod counter {
    /// Records that could not be reserved because the ring was full: lost in the kernel.
    pub const RING_FULL: u32 = 0;
    /// Records written.
    pub const SUBMITTED: u32 = 1;
    /// Transitions skipped by the kernel-side netns filter.
    pub const FILTERED: u32 = 2;
    pub const COUNT: u32 = 3;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data, `#[repr(C)]`, every bit pattern valid, no padding.
    unsafe impl aya::Pod for super::Header {}
    unsafe impl aya::Pod for super::StateChange {}
}

// No implicit padding: the sizes below are the sums of the fields.
const _: () = assert!(core::mem::size_of::<Header>() == 24);
const _: () = assert!(core::mem::size_of::<StateChange>() == 24 + 8 + 8 + 8 + 32 + 16);
