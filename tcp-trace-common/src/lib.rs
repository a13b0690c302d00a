//! The records tcp-trace's eBPF programs write into the ring buffer, and the globals the agent
//! hands to them at load time. `#[repr(C)]`, no implicit padding, fixed-width integers only: this
//! file is the one definition of the wire between the kernel and the agent.
#![no_std]

/// What a record is. Every record starts with a [`Header`], so the agent reads `kind` first.
pub mod kind {
    /// A [`StateChange`](super::StateChange): `sock:inet_sock_set_state` fired for a TCP socket.
    pub const STATE_CHANGE: u32 = 1;
    /// A [`Retransmit`](super::Retransmit): `tcp:tcp_retransmit_skb` or `tcp:tcp_retransmit_synack`.
    pub const RETRANSMIT: u32 = 2;
    /// A [`Reset`](super::Reset): `tcp:tcp_send_reset` or `tcp:tcp_receive_reset`.
    pub const RESET: u32 = 3;
    /// A [`Keepalive`](super::Keepalive): the keepalive timer of a socket ran.
    pub const KEEPALIVE: u32 = 4;
    /// A [`SocketOption`](super::SocketOption): setsockopt() of a keepalive option.
    pub const SOCKET_OPTION: u32 = 5;
    /// An [`Accept`](super::Accept): accept() returned a socket to a process.
    pub const ACCEPT: u32 = 6;
    /// A [`KeptFacts`](super::KeptFacts): what a socket's slot kept, handed on before a record
    /// of the socket that needs them (see [`slot`](super::slot)).
    pub const KEPT: u32 = 7;
    /// A [`KeptClose`](super::KeptClose): a socket's CLOSE, with what its slot kept of its life.
    pub const KEPT_CLOSE: u32 = 8;
}

/// Bits of [`Kept::have`]: which of its facts are set.
pub mod kept {
    /// connect(): `opened_ns` is the SYN_SENT transition.
    pub const OPENED: u32 = 1 << 0;
    /// `established_ns`, `srtt_us` and `total_retrans` are the ESTABLISHED transition.
    pub const ESTABLISHED: u32 = 1 << 1;
    /// A passive open: ESTABLISHED came from SYN_RECV (and `opened_ns` is its time).
    pub const PASSIVE: u32 = 1 << 2;
    /// `pid_tgid` and `comm` are the task that connect()ed (with [`OPENED`]) or accept()ed
    /// (with [`ACCEPTED`]).
    pub const OWNER: u32 = 1 << 3;
    /// accept() returned the socket at `owner_ns`.
    pub const ACCEPTED: u32 = 1 << 4;
}

/// Values of [`Retransmit::what`].
pub mod retransmit {
    /// A segment of the socket itself (a SYN while in SYN_SENT).
    pub const SEGMENT: u8 = 1;
    /// A SYN-ACK of a listener's request socket; the 4-tuple names the future connection.
    pub const SYNACK: u8 = 2;
}

/// Values of [`Reset::direction`].
pub mod reset {
    pub const SENT: u8 = 1;
    pub const RECEIVED: u8 = 2;
}

/// Bits of [`StateChange::flags`].
pub mod flags {
    /// No process held the socket's lock (`sk->sk_lock.owned`): a packet or a timer drove the
    /// transition in softirq, or the kernel finished a socket no process holds any more. The
    /// current task has nothing to do with the socket, so `pid_tgid` and `comm` are 0. Every
    /// system call that changes a TCP socket's state holds its lock, and softirq never changes
    /// the state of a socket a process holds (it queues the packet to the socket's backlog, which
    /// the owner's system call then processes, still holding the lock).
    pub const KERNEL_CONTEXT: u32 = 1 << 0;
    /// Written while [`switch::TRANSITIONS`] was on: the kernel recorded every transition of
    /// the socket around this one. Without it, the programs recorded only the transitions that
    /// open, establish and close a socket (see [`switch`]), so this one must not be shown as a
    /// state-change event: its neighbours are missing.
    pub const ALL_TRANSITIONS: u32 = 1 << 1;
}

/// The agent's switches, the entries of the `SWITCHES` array map (a u32 each, 0 = off), which it
/// writes while the programs run.
pub mod switch {
    /// Record every state transition. Off (the agent's state while no subscriber asks for
    /// state-change events), the state programs record only transitions into SYN_SENT,
    /// ESTABLISHED, LISTEN and CLOSE: what the agent's table and its summaries need (the states
    /// between ESTABLISHED and CLOSE follow from the state a socket closes from). The others
    /// cost a tracepoint dispatch and a few loads, and no record.
    pub const TRANSITIONS: u32 = 0;
    /// No subscriber at all: the programs wake the agent at most once per
    /// [`UNWATCHED_WAKEUP_INTERVAL_NS`](super::globals::UNWATCHED_WAKEUP_INTERVAL_NS) instead of
    /// once per [`WAKEUP_INTERVAL_NS`](super::globals::WAKEUP_INTERVAL_NS). Nobody waits for
    /// the records then (the table, summaries and metrics only need them soon), and a drain
    /// every millisecond costs the agent and the programs more than the records do.
    pub const UNWATCHED: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Whether the state programs record a transition to `new_state` with [`switch::TRANSITIONS`] off.
#[inline(always)]
pub const fn recorded_when_quiet(new_state: u8) -> bool {
    matches!(
        new_state,
        tcp_state::SYN_SENT | tcp_state::ESTABLISHED | tcp_state::LISTEN | tcp_state::CLOSE
    )
}

/// The exported handshake histogram's buckets: below 1 s for handshakes without a
/// retransmitted SYN, then one bucket just past each SYN retransmission (Linux's initial RTO
/// is 1 s, doubling: the handshakes that needed 1, 2, 3 retransmits complete just after 1 s,
/// 3 s, 7 s) and one for slow answers after. Here because the bench's kernel-side floor
/// (`floor_aggregate`) buckets with them too.
pub const HANDSHAKE_BOUNDS_NS: &[u64] = &[
    100_000,
    300_000,
    1_000_000,
    3_000_000,
    10_000_000,
    30_000_000,
    100_000_000,
    300_000_000,
    1_000_000_000,
    1_500_000_000,
    3_000_000_000,
    3_500_000_000,
    7_000_000_000,
    7_500_000_000,
    15_000_000_000,
    31_000_000_000,
];

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
    /// `sk->sk_err` on transitions to CLOSE (ECONNREFUSED, ETIMEDOUT, ECONNRESET, ...), else 0:
    /// the kernel sets it before tcp_done() moves the socket to CLOSE.
    pub error: u32,
    /// On transitions to ESTABLISHED and CLOSE: `tcp_sock.srtt_us >> 3` (microseconds). At
    /// SYN_RECV -> ESTABLISHED it is the SYN-ACK's round trip (tcp_synack_rtt_meas runs first).
    pub srtt_us: u32,
    /// On transitions to ESTABLISHED and CLOSE: `tcp_sock.total_retrans`. For a handshake that
    /// is the SYNs (active) or SYN-ACKs (passive, copied from the request) retransmitted.
    pub total_retrans: u32,
    pub _reserved: u32,
    /// On transitions to CLOSE: `tcp_sock.bytes_acked` (payload bytes sent and acknowledged)
    /// and `tcp_sock.bytes_received`.
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

impl StateChange {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// A retransmission.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retransmit {
    /// `sock` is the socket (SEGMENT) or the listener (SYNACK).
    pub header: Header,
    pub netns: u32,
    /// One of [`retransmit`].
    pub what: u8,
    /// The socket's TCP state (SEGMENT; SYN_RECV for SYNACK).
    pub state: u8,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _reserved: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// A TCP reset sent or received.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    /// `sock` is 0 for a reset sent with no socket (answering a segment to a closed port).
    pub header: Header,
    pub netns: u32,
    /// One of [`reset`].
    pub direction: u8,
    /// The socket's TCP state, 0 without a socket.
    pub state: u8,
    pub _reserved: u16,
    /// `enum sk_rst_reason` for sent resets.
    pub reason: u32,
    /// The segment's (or socket's) 4-tuple from the sender's point of view; family 0 = unknown.
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _reserved2: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// The keepalive timer ran for a socket (`timer:timer_expire_entry`/`exit` around
/// `tcp_keepalive_timer`). A probe was sent if `probes_after > probes_before`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub header: Header,
    pub netns: u32,
    /// `icsk_probes_out` before and after the timer function.
    pub probes_before: u8,
    pub probes_after: u8,
    pub _reserved: u16,
}

/// setsockopt() of SO_KEEPALIVE or TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT, seen by a cgroup
/// setsockopt program before the kernel applies it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOption {
    pub header: Header,
    pub netns: u32,
    pub level: u32,
    pub optname: u32,
    pub value: i32,
    pub pid_tgid: u64,
    pub comm: [u8; 16],
}

/// accept()/accept4() returned a socket: the process that took the passive connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accept {
    pub header: Header,
    pub netns: u32,
    pub _reserved: u32,
    pub pid_tgid: u64,
    pub comm: [u8; 16],
}

/// setsockopt levels and names tcp-trace watches.
pub mod sockopt {
    pub const SOL_SOCKET: u32 = 1;
    pub const SO_KEEPALIVE: u32 = 9;
    pub const IPPROTO_TCP: u32 = 6;
    pub const TCP_KEEPIDLE: u32 = 4;
    pub const TCP_KEEPINTVL: u32 = 5;
    pub const TCP_KEEPCNT: u32 = 6;
}

/// Globals the agent sets at load time (`EbpfLoader::set_global`). The eBPF side reads them
/// through `read_volatile` so the compiler cannot fold the defaults in.
pub mod globals {
    /// Only report sockets in this network namespace (inode); 0 = all.
    pub const NETNS_FILTER: &str = "NETNS_FILTER";
    /// Minimum nanoseconds between two consumer wake-ups forced by the programs.
    pub const WAKEUP_INTERVAL_NS: &str = "WAKEUP_INTERVAL_NS";
    /// The same while [`switch::UNWATCHED`](super::switch::UNWATCHED) is on.
    pub const UNWATCHED_WAKEUP_INTERVAL_NS: &str = "UNWATCHED_WAKEUP_INTERVAL_NS";
    /// The number of socket slots ([`slot`](super::slot)) less one (a power of two less one), or
    /// `u32::MAX`: no slots, every transition recorded as it happens.
    pub const SLOT_MASK: &str = "SLOT_MASK";
    /// The running kernel's [`KernelOffsets`](super::KernelOffsets).
    pub const KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
}

/// What the programs need to know about the running kernel, found by the agent before loading
/// (member offsets from its BTF, one address from /proc/kallsyms) and set as one global in
/// frozen .rodata, so the verifier sees each value as a constant. 0 = unknown, except in
/// [`SockLayout`]; the programs skip what needs an unknown offset. Each field's BTF member path,
/// and what is lost without it, is in the agent's one table (tcp-trace/src/capture/offsets.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// The network namespace of a socket: its `net`, and that net's inode number.
    pub net: u32,
    pub inum: u32,
    /// `struct sock` members.
    pub sk_err: u32,
    pub sk_lock_owned: u32,
    pub sk_protocol: u32,
    /// `struct tcp_sock` members.
    pub srtt: u32,
    pub total_retrans: u32,
    pub bytes_acked: u32,
    pub bytes_received: u32,
    /// The keepalive timer in a socket, and its count of unanswered probes.
    pub sk_timer: u32,
    pub probes_out: u32,
    /// The netns of resets sent without a socket: a packet's device, and that device's net.
    pub skb_dev: u32,
    pub dev_net: u32,
    /// From the current task to an fd's socket.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// `timer_list.function`: the BTF timer programs read an expiring timer's function from it.
    pub timer_function: u32,
    /// Address of `tcp_keepalive_timer` (from /proc/kallsyms), which the keepalive programs
    /// compare every expiring timer's function with.
    pub keepalive_timer_fn: u64,
    /// What the BTF tracepoint program loads from sockets.
    pub sock: SockLayout,
}

/// Member offsets the BTF tracepoint program loads directly from a `struct sock` (and the
/// current task), resolved from the running kernel's BTF by the agent. The verifier knows these
/// as constants (they sit in frozen, read-only .rodata) and checks each load against the
/// kernel's BTF, so a wrong offset fails the load instead of reading the wrong field. The agent
/// only loads that program when it resolved all of them (`skc_daddr` is at 0, so 0 cannot mean
/// unknown here); otherwise it loads the classic tracepoint program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLayout {
    /// `sock.__sk_common.skc_family`, `.skc_dport`, `.skc_daddr`, `.skc_v6_rcv_saddr`,
    /// `.skc_v6_daddr`.
    pub family: u32,
    pub dport: u32,
    pub daddr: u32,
    pub v6_saddr: u32,
    pub v6_daddr: u32,
    /// `inet_sock.inet_sport` and `inet_sock.inet_saddr` (what the classic tracepoint reports).
    pub inet_sport: u32,
    pub inet_saddr: u32,
    /// `task_struct.comm`.
    pub task_comm: u32,
    /// `sock.__sk_common.skc_state` (the BTF retransmit program reports it).
    pub state: u32,
    /// Keeps the struct (and `KernelOffsets`) free of padding.
    pub _reserved: u32,
}

/// Indices into the `COUNTERS` per-CPU array.
pub mod counter {
    /// Records that could not be reserved because the ring was full: lost in the kernel.
    pub const RING_FULL: u32 = 0;
    /// Transitions skipped by the kernel-side netns filter.
    pub const FILTERED: u32 = 1;
    /// Runs of the BTF state program the kernel skipped (it was already running on that CPU,
    /// an interrupt's softirq nested in it) that its guard program recorded instead: to be
    /// taken from the state program's `recursion_misses`, which counts them all.
    pub const RECOVERED: u32 = 2;
    /// Keepalive timer exits that did not match the keepalive entry seen on that CPU, and
    /// entries that found another keepalive timer's entry still waiting for its exit: a
    /// probe such a run sent is not recorded.
    pub const KEEPALIVE_UNPAIRED: u32 = 3;
    /// Sockets that found their slot ([`slot`](super::slot)) held by another: their transitions are
    /// recorded as they happen, as without slots. Nothing is lost; it costs records.
    pub const SLOT_TAKEN: u32 = 4;
    /// Sockets whose slot another program held past a few tries: a record went out without
    /// the slot's facts, which the agent adopts later (the connection's open is late).
    pub const SLOT_CONTENDED: u32 = 5;
    pub const COUNT: u32 = 6;
    // Successes are not counted in the kernel: the agent counts what it reads.
}

/// What the kernel keeps of a socket's life in its slot ([`slot`]) instead of writing records: its
/// open, its handshake's end and its owner. Handed on at its close ([`KeptClose`]), before any
/// other record of the socket ([`KeptFacts`]), or when the agent adopts the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// Bits of [`kept`].
    pub have: u32,
    pub netns: u32,
    /// The tuple as of the latest fact (a SYN_SENT socket has no source port yet).
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _reserved: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// When the slot was taken: connect()'s SYN_SENT, or a passive open's ESTABLISHED.
    pub opened_ns: u64,
    pub established_ns: u64,
    /// At ESTABLISHED, as [`StateChange::srtt_us`] and [`StateChange::total_retrans`].
    pub srtt_us: u32,
    pub total_retrans: u32,
    /// When accept() returned the socket ([`kept::ACCEPTED`]).
    pub owner_ns: u64,
    pub pid_tgid: u64,
    pub comm: [u8; 16],
}

/// The socket slots: the `SOCKET_SLOT_HOLDERS` array (a `u64` each) and the `SOCKET_SLOTS`
/// array (a [`Kept`] each), of the same length. A socket's slot is fixed by its address (a
/// hash, [`slot_index`]); a socket whose slot another holds goes without, and its transitions
/// are recorded as they happen.
///
/// A holder is the only word written concurrently, by compare-and-swap only:
/// - [`slot::FREE`] -> [`slot::BUSY`]: a socket's program claims the slot, writes the facts,
///   then stores the socket's address;
/// - socket -> [`slot::BUSY`]: a program of the socket (to add a fact, or to take the facts for
///   a record and store [`slot::FREE`]), or the agent adopting the facts (then
///   [`slot::FREE`]). Whoever wins owns the facts; a program that loses to the agent records
///   its transition as it happens, after the agent's adoption.
///
/// Values of a holder that are not a socket.
pub mod slot {
    pub const FREE: u64 = 0;
    pub const BUSY: u64 = 1;
}

/// The slot of a socket: Fibonacci hashing of its address (sockets are slab objects a few KiB
/// apart), masked to the number of slots (a power of two).
#[inline(always)]
pub const fn slot_index(sock: u64, mask: u32) -> u32 {
    (sock.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32 & mask
}

/// A slot's facts handed on before another record of its socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptFacts {
    /// `ts_ns` is when the facts left the slot.
    pub header: Header,
    pub kept: Kept,
}

/// A socket's transition to CLOSE with what its slot kept: the one record of a connection end
/// while nobody asks for every transition.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptClose {
    /// `header.kind` is [`kind::KEPT_CLOSE`].
    pub change: StateChange,
    pub kept: Kept,
}

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::Kept {}
    unsafe impl aya::Pod for super::KeptFacts {}
    unsafe impl aya::Pod for super::KeptClose {}
    // SAFETY: plain old data, `#[repr(C)]`, every bit pattern valid, no padding.
    unsafe impl aya::Pod for super::Header {}
    unsafe impl aya::Pod for super::StateChange {}
    unsafe impl aya::Pod for super::Retransmit {}
    unsafe impl aya::Pod for super::Reset {}
    unsafe impl aya::Pod for super::Keepalive {}
    unsafe impl aya::Pod for super::SocketOption {}
    unsafe impl aya::Pod for super::Accept {}
    unsafe impl aya::Pod for super::SockLayout {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}

// No implicit padding: the sizes below are the sums of the fields.
const _: () = assert!(core::mem::size_of::<Header>() == 24);
const _: () = assert!(core::mem::size_of::<StateChange>() == 24 + 8 + 8 + 8 + 32 + 16 + 16 + 16);
const _: () = assert!(core::mem::size_of::<Retransmit>() == 24 + 8 + 8 + 32);
const _: () = assert!(core::mem::size_of::<Reset>() == 24 + 8 + 8 + 8 + 32);
const _: () = assert!(core::mem::size_of::<Keepalive>() == 24 + 8);
const _: () = assert!(core::mem::size_of::<SocketOption>() == 24 + 16 + 8 + 16);
const _: () = assert!(core::mem::size_of::<Accept>() == 24 + 8 + 8 + 16);
const _: () = assert!(core::mem::size_of::<SockLayout>() == 10 * 4);
const _: () = assert!(core::mem::size_of::<Kept>() == 8 + 8 + 32 + 8 + 8 + 8 + 8 + 8 + 16);
const _: () = assert!(core::mem::size_of::<KeptFacts>() == 24 + 104);
const _: () = assert!(core::mem::size_of::<KeptClose>() == 128 + 104);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 20 * 4 + 8 + 10 * 4);
