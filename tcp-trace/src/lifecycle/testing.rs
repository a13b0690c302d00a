//! Transitions, tasks and whole lives for unit tests, built one way everywhere the table is fed
//! by hand (`lifecycle`, `event`, `export`).
//!
//! `Transition::test(sock, ts_ns, old, new)` is a transition the kernel ran (no process) between
//! [`LOCAL`] and [`REMOTE`] in [`NETNS`], every counter 0; the builder methods change one field.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::model::{Context, Task, TcpState, TcpState::*, Transition};

pub(crate) const NETNS: u32 = 7;
pub(crate) const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
pub(crate) const REMOTE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);

/// Lives of every kind the table completes, each ending in CLOSE; the first [`OPENED`] are
/// seen from their open, the rest only from the middle (no open, no handshake).
pub(crate) const LIVES: [&[(TcpState, TcpState)]; 7] = [
    // Active end, closing first; passive end, closed by its peer.
    &[
        (Close, SynSent),
        (SynSent, Established),
        (Established, FinWait1),
        (FinWait1, FinWait2),
        (FinWait2, Close),
    ],
    &[
        (Listen, SynRecv),
        (SynRecv, Established),
        (Established, CloseWait),
        (CloseWait, LastAck),
        (LastAck, Close),
    ],
    // Both FINs crossing; a reset in CLOSE_WAIT; a failed connect (refused, timed out).
    &[
        (Close, SynSent),
        (SynSent, Established),
        (Established, FinWait1),
        (FinWait1, Closing),
        (Closing, Close),
    ],
    &[
        (Listen, SynRecv),
        (SynRecv, Established),
        (Established, CloseWait),
        (CloseWait, Close),
    ],
    &[(Close, SynSent), (SynSent, Close)],
    // Seen from the middle: a reset in FIN_WAIT1; both FINs crossing.
    &[(Established, FinWait1), (FinWait1, Close)],
    &[
        (Established, FinWait1),
        (FinWait1, Closing),
        (Closing, Close),
    ],
];
pub(crate) const OPENED: usize = 5;

impl Task {
    /// Process `pid` (its only thread) named `comm`, cut to the kernel's 16 bytes.
    pub(crate) fn test(pid: u32, comm: &str) -> Task {
        let mut name = [0u8; 16];
        let len = comm.len().min(name.len());
        name[..len].copy_from_slice(&comm.as_bytes()[..len]);
        Task {
            pid,
            tid: pid,
            comm: name,
        }
    }
}

impl Transition {
    /// Socket `sock` moves from `old` to `new` at `ts_ns`; see the module for the rest.
    pub(crate) fn test(sock: u64, ts_ns: u64, old: TcpState, new: TcpState) -> Transition {
        Transition {
            ts_ns,
            sock,
            netns: NETNS,
            old,
            new,
            local: LOCAL,
            remote: REMOTE,
            context: Context::Kernel,
            cpu: 0,
            error: 0,
            srtt_us: 0,
            total_retrans: 0,
            bytes_acked: 0,
            bytes_received: 0,
            all_recorded: true,
        }
    }

    pub(crate) fn by(self, context: Context) -> Transition {
        Transition { context, ..self }
    }

    /// Run in a system call of process `pid`.
    pub(crate) fn by_process(self, pid: u32) -> Transition {
        self.by(Context::Process(Task::test(pid, "app")))
    }

    pub(crate) fn local_port(self, port: u16) -> Transition {
        let local = SocketAddr::new(self.local.ip(), port);
        Transition { local, ..self }
    }

    pub(crate) fn remote_port(self, port: u16) -> Transition {
        let remote = SocketAddr::new(self.remote.ip(), port);
        Transition { remote, ..self }
    }

    pub(crate) fn in_netns(self, netns: u32) -> Transition {
        Transition { netns, ..self }
    }

    pub(crate) fn between(self, local: SocketAddr, remote: SocketAddr) -> Transition {
        Transition {
            local,
            remote,
            ..self
        }
    }

    /// As a quiet kernel records it: not every transition of the socket is recorded.
    pub(crate) fn quiet(self) -> Transition {
        Transition {
            all_recorded: false,
            ..self
        }
    }

    /// `sk_err` at close.
    pub(crate) fn error(self, error: u32) -> Transition {
        Transition { error, ..self }
    }

    /// Smoothed RTT and segments retransmitted so far.
    pub(crate) fn rtt(self, srtt_us: u32, total_retrans: u32) -> Transition {
        Transition {
            srtt_us,
            total_retrans,
            ..self
        }
    }

    /// Payload bytes acknowledged by the peer and received from it.
    pub(crate) fn bytes(self, bytes_acked: u64, bytes_received: u64) -> Transition {
        Transition {
            bytes_acked,
            bytes_received,
            ..self
        }
    }
}
