//! The agent's vocabulary, taken from TCP itself. Plain data shared by every stage.
use std::{fmt, net::SocketAddr};

/// Linux TCP states, numbered as in `include/net/tcp_states.h` (and in the proto's `TcpState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
    BoundInactive = 13,
}

impl TcpState {
    pub const ALL: [TcpState; 13] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
        TcpState::BoundInactive,
    ];

    pub fn from_kernel(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value).checked_sub(1)?).copied()
    }

    /// The name the kernel's own tracepoint output uses, without its `TCP_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
            TcpState::BoundInactive => "BOUND_INACTIVE",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        let name = name
            .trim_start_matches("TCP_STATE_")
            .trim_start_matches("TCP_");
        Self::ALL
            .into_iter()
            .find(|state| state.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a connection came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// connect(): CLOSE -> SYN_SENT.
    Active,
    /// A SYN at a listener: the child socket's LISTEN -> SYN_RECV.
    Passive,
    /// listen(): CLOSE -> LISTEN.
    Listen,
    /// First seen mid-life (it predates the agent, or its opening record was lost).
    Unknown,
}

impl Direction {
    pub const ALL: [Direction; 4] = [
        Direction::Active,
        Direction::Passive,
        Direction::Listen,
        Direction::Unknown,
    ];

    /// The direction in the CLI's words (`--direction active`).
    pub fn name(self) -> &'static str {
        match self {
            Direction::Active => "active",
            Direction::Passive => "passive",
            Direction::Listen => "listen",
            Direction::Unknown => "unknown",
        }
    }
}

/// A task as the kernel reports it: `bpf_get_current_pid_tgid()` and `bpf_get_current_comm()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    /// Thread group id: what ps calls PID.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// NUL-padded task name.
    pub comm: [u8; 16],
}

impl Task {
    pub fn comm(&self) -> &str {
        let end = self
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.comm.len());
        std::str::from_utf8(&self.comm[..end]).unwrap_or("?")
    }
}

/// Where a transition ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// In a system call of this task (connect, listen, close, ...): the task is the socket's user.
    Process(Task),
    /// Outside any process's hold on the socket: a packet or a timer drove the transition (in
    /// softirq), or the kernel finished a socket no process holds. The current task has nothing
    /// to do with the socket.
    Kernel,
    /// Not known: the kernel's BTF does not say where a socket's lock owner flag is.
    Unknown,
}

impl Context {
    pub fn describe(&self) -> &'static str {
        match self {
            Context::Process(_) => "process",
            Context::Kernel => "kernel",
            Context::Unknown => "unknown",
        }
    }

    pub fn task(&self) -> Option<&Task> {
        match self {
            Context::Process(task) => Some(task),
            Context::Kernel | Context::Unknown => None,
        }
    }
}

/// One TCP state transition, decoded from the kernel's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the socket.
    pub sock: u64,
    pub netns: u32,
    pub old: TcpState,
    pub new: TcpState,
    /// Local side: the tracepoint's source. Port 0 before the port is bound (connect() reports
    /// SYN_SENT before inet_hash_connect() picks the port).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub context: Context,
    pub cpu: u32,
    /// `sk_err` on transitions to CLOSE (errno: ECONNREFUSED, ETIMEDOUT, ...), else 0.
    pub error: u32,
    /// On transitions to ESTABLISHED and CLOSE: smoothed RTT (microseconds) and segments
    /// retransmitted so far (SYNs or SYN-ACKs during a handshake).
    pub srtt_us: u32,
    pub total_retrans: u32,
    /// On transitions to CLOSE: payload bytes sent and acknowledged, and received.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Recorded while the kernel recorded every transition (the agent's switch was on): the
    /// transition may be shown as an event. Otherwise only the transitions that open,
    /// establish and close a socket are recorded, and the table infers the rest.
    pub all_recorded: bool,
}

/// A segment retransmitted by a socket, or a SYN-ACK by a listener's request socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retransmit {
    pub ts_ns: u64,
    /// The socket, or the listener for a SYN-ACK.
    pub sock: u64,
    pub netns: u32,
    pub syn_ack: bool,
    pub state: TcpState,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// A TCP reset sent or received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub ts_ns: u64,
    /// 0 for a reset sent without a socket (answering a segment to a closed port).
    pub sock: u64,
    pub netns: u32,
    pub sent: bool,
    /// The kernel's `enum sk_rst_reason` for sent resets.
    pub reason: u32,
    /// Local and remote end, if the kernel reported them.
    pub tuple: Option<(SocketAddr, SocketAddr)>,
}

/// The keepalive timer of a socket ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveTimer {
    pub ts_ns: u64,
    pub sock: u64,
    pub netns: u32,
    /// Unanswered probes before and after the timer function: a probe went out if it grew.
    pub probes_before: u8,
    pub probes_after: u8,
}

/// A keepalive socket option being set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepaliveOption {
    /// SO_KEEPALIVE: on (non-zero) or off.
    Enabled,
    /// TCP_KEEPIDLE, seconds.
    Idle,
    /// TCP_KEEPINTVL, seconds.
    Interval,
    /// TCP_KEEPCNT.
    Count,
}

/// setsockopt() of a keepalive option, seen before the kernel applies it (in the caller's
/// own context, so `task` is the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOption {
    pub ts_ns: u64,
    pub sock: u64,
    pub netns: u32,
    pub option: KeepaliveOption,
    pub value: i32,
    pub task: Task,
}

/// The namespace's keepalive defaults (net.ipv4.tcp_keepalive_time/intvl/probes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveDefaults {
    pub idle_s: u32,
    pub interval_s: u32,
    pub count: u32,
}

impl KeepaliveDefaults {
    /// Linux's built-in defaults, for namespaces whose sysctls could not be read.
    pub const LINUX: KeepaliveDefaults = KeepaliveDefaults {
        idle_s: 7200,
        interval_s: 75,
        count: 9,
    };
}

/// accept() handed a socket to a process: the process that took the passive connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accept {
    pub ts_ns: u64,
    pub sock: u64,
    pub netns: u32,
    pub task: Task,
}

/// The socket errors (`sk_err`) that tell why a connection ended, as Linux numbers them.
pub mod errno {
    pub const EPIPE: u32 = 32;
    pub const ENETUNREACH: u32 = 101;
    pub const ECONNABORTED: u32 = 103;
    pub const ECONNRESET: u32 = 104;
    pub const ETIMEDOUT: u32 = 110;
    pub const ECONNREFUSED: u32 = 111;
    pub const EHOSTUNREACH: u32 = 113;
}
