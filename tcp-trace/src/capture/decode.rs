//! Kernel record bytes -> [`Transition`]. Pure: unit-tested without a kernel.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tcp_trace_common::{
    AF_INET, AF_INET6, Accept as RawAccept, Header, Keepalive, Kept as RawKept, KeptClose,
    KeptFacts, Reset as RawReset, Retransmit as RawRetransmit, SocketOption as RawSocketOption,
    StateChange, flags, kept, kind, reset, retransmit, sockopt,
};

use crate::model::{
    Accept, Context, KeepaliveOption, KeepaliveTimer, Reset, Retransmit, SocketOption, Task,
    TcpState, Transition,
};

/// Why a record could not be decoded: the kernel and agent disagree about the wire format.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("record of kind {kind} has {len} bytes, expected {expected}")]
    Size {
        kind: u32,
        len: usize,
        expected: usize,
    },
    #[error("unknown TCP state {0}")]
    State(u8),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown socket option {0}/{1}")]
    Option(u32, u32),
}

/// A decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Transition(Transition),
    Retransmit(Retransmit),
    Reset(Reset),
    Keepalive(KeepaliveTimer),
    SocketOption(SocketOption),
    Accept(Accept),
    /// What a socket's slot kept of its open and handshake, with its CLOSE at its end: it
    /// stands for [`Kept::parts`], then the close.
    Kept(Kept),
}

/// A socket's open, handshake end and owner as the kernel kept them in its slot
/// (`tcp_trace_common::slot`) instead of recording them, from a record or the agent's
/// adoption of the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    pub sock: u64,
    pub cpu: u32,
    /// Their family checked by [`Kept::new`].
    facts: RawKept,
    /// The socket's CLOSE, when the facts came with it.
    pub close: Option<Transition>,
}

impl Kept {
    /// Facts kept in a slot, read from it (the agent adopting it) or from a record.
    pub fn new(sock: u64, cpu: u32, facts: RawKept) -> Result<Kept, DecodeError> {
        addresses(facts.family, &facts.saddr, &facts.daddr)?;
        Ok(Kept {
            sock,
            cpu,
            facts,
            close: None,
        })
    }

    /// What the facts stand for, in the order it happened: the SYN_SENT of a connect(), the
    /// ESTABLISHED, the accept(). Each as the kernel would have recorded it while it records
    /// only opens and closes.
    pub fn parts(&self) -> (Option<Transition>, Option<Transition>, Option<Accept>) {
        let f = &self.facts;
        // The tuple as of the latest fact.
        let (local, remote) =
            addresses(f.family, &f.saddr, &f.daddr).expect("the family was checked by Kept::new");
        let (local, remote) = (
            SocketAddr::new(local, f.sport),
            SocketAddr::new(remote, f.dport),
        );
        let transition = |ts_ns, old, new, context, srtt_us, total_retrans| Transition {
            ts_ns,
            sock: self.sock,
            netns: f.netns,
            old,
            new,
            local,
            remote,
            context,
            cpu: self.cpu,
            error: 0,
            srtt_us,
            total_retrans,
            bytes_acked: 0,
            bytes_received: 0,
            all_recorded: false,
        };
        let owner = task(f.pid_tgid, f.comm);
        let opened = (f.have & kept::OPENED != 0).then(|| {
            let context = if f.have & kept::OWNER != 0 {
                Context::Process(owner)
            } else {
                Context::Kernel
            };
            transition(
                f.opened_ns,
                TcpState::Close,
                TcpState::SynSent,
                context,
                0,
                0,
            )
        });
        let established = (f.have & kept::ESTABLISHED != 0).then(|| {
            let old = if f.have & kept::PASSIVE != 0 {
                TcpState::SynRecv
            } else {
                TcpState::SynSent
            };
            transition(
                f.established_ns,
                old,
                TcpState::Established,
                Context::Kernel,
                f.srtt_us,
                f.total_retrans,
            )
        });
        let accepted = (f.have & kept::ACCEPTED != 0).then_some(Accept {
            ts_ns: f.owner_ns,
            sock: self.sock,
            netns: f.netns,
            task: owner,
        });
        (opened, established, accepted)
    }
}

pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let header: Header = read(bytes).ok_or(DecodeError::Short(bytes.len()))?;
    match header.kind {
        kind::STATE_CHANGE => transition(&record(bytes, header.kind)?).map(Record::Transition),
        kind::RETRANSMIT => retransmission(&record(bytes, header.kind)?).map(Record::Retransmit),
        kind::RESET => reset_of(&record(bytes, header.kind)?).map(Record::Reset),
        kind::KEEPALIVE => {
            let raw: Keepalive = record(bytes, header.kind)?;
            Ok(Record::Keepalive(KeepaliveTimer {
                ts_ns: raw.header.ts_ns,
                sock: raw.header.sock,
                netns: raw.netns,
                probes_before: raw.probes_before,
                probes_after: raw.probes_after,
            }))
        }
        kind::SOCKET_OPTION => {
            socket_option(&record(bytes, header.kind)?).map(Record::SocketOption)
        }
        kind::KEPT => {
            let raw: KeptFacts = record(bytes, header.kind)?;
            Kept::new(raw.header.sock, raw.header.cpu, raw.kept).map(Record::Kept)
        }
        kind::KEPT_CLOSE => {
            let raw: KeptClose = record(bytes, header.kind)?;
            let mut kept = Kept::new(raw.change.header.sock, raw.change.header.cpu, raw.kept)?;
            kept.close = Some(transition(&raw.change)?);
            Ok(Record::Kept(kept))
        }
        kind::ACCEPT => {
            let raw: RawAccept = record(bytes, header.kind)?;
            Ok(Record::Accept(Accept {
                ts_ns: raw.header.ts_ns,
                sock: raw.header.sock,
                netns: raw.netns,
                task: task(raw.pid_tgid, raw.comm),
            }))
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

fn record<T: aya::Pod>(bytes: &[u8], kind: u32) -> Result<T, DecodeError> {
    read(bytes).ok_or(DecodeError::Size {
        kind,
        len: bytes.len(),
        expected: std::mem::size_of::<T>(),
    })
}

fn tcp_state(value: u8) -> Result<TcpState, DecodeError> {
    TcpState::from_kernel(value).ok_or(DecodeError::State(value))
}

fn addresses(
    family: u16,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
) -> Result<(IpAddr, IpAddr), DecodeError> {
    match family {
        AF_INET => Ok((v4(saddr), v4(daddr))),
        AF_INET6 => Ok((
            IpAddr::V6(Ipv6Addr::from(*saddr)),
            IpAddr::V6(Ipv6Addr::from(*daddr)),
        )),
        other => Err(DecodeError::Family(other)),
    }
}

fn task(pid_tgid: u64, comm: [u8; 16]) -> Task {
    Task {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm,
    }
}

fn retransmission(raw: &RawRetransmit) -> Result<Retransmit, DecodeError> {
    let (local, remote) = addresses(raw.family, &raw.saddr, &raw.daddr)?;
    Ok(Retransmit {
        ts_ns: raw.header.ts_ns,
        sock: raw.header.sock,
        netns: raw.netns,
        syn_ack: raw.what == retransmit::SYNACK,
        state: tcp_state(raw.state)?,
        local: SocketAddr::new(local, raw.sport),
        remote: SocketAddr::new(remote, raw.dport),
    })
}

fn reset_of(raw: &RawReset) -> Result<Reset, DecodeError> {
    let tuple = addresses(raw.family, &raw.saddr, &raw.daddr)
        .ok()
        .map(|(s, d)| (SocketAddr::new(s, raw.sport), SocketAddr::new(d, raw.dport)));
    Ok(Reset {
        ts_ns: raw.header.ts_ns,
        sock: raw.header.sock,
        netns: raw.netns,
        sent: raw.direction == reset::SENT,
        reason: raw.reason,
        tuple,
    })
}

fn socket_option(raw: &RawSocketOption) -> Result<SocketOption, DecodeError> {
    let option = match (raw.level, raw.optname) {
        (sockopt::SOL_SOCKET, sockopt::SO_KEEPALIVE) => KeepaliveOption::Enabled,
        (sockopt::IPPROTO_TCP, sockopt::TCP_KEEPIDLE) => KeepaliveOption::Idle,
        (sockopt::IPPROTO_TCP, sockopt::TCP_KEEPINTVL) => KeepaliveOption::Interval,
        (sockopt::IPPROTO_TCP, sockopt::TCP_KEEPCNT) => KeepaliveOption::Count,
        (level, name) => return Err(DecodeError::Option(level, name)),
    };
    Ok(SocketOption {
        ts_ns: raw.header.ts_ns,
        sock: raw.header.sock,
        netns: raw.netns,
        option,
        value: raw.value,
        task: task(raw.pid_tgid, raw.comm),
    })
}

fn transition(raw: &StateChange) -> Result<Transition, DecodeError> {
    let (local, remote) = addresses(raw.family, &raw.saddr, &raw.daddr)?;
    let context = if raw.flags & flags::KERNEL_CONTEXT != 0 {
        Context::Kernel
    } else {
        Context::Process(task(raw.pid_tgid, raw.comm))
    };
    Ok(Transition {
        ts_ns: raw.header.ts_ns,
        sock: raw.header.sock,
        netns: raw.netns,
        old: tcp_state(raw.old_state)?,
        new: tcp_state(raw.new_state)?,
        local: SocketAddr::new(local, raw.sport),
        remote: SocketAddr::new(remote, raw.dport),
        context,
        cpu: raw.header.cpu,
        error: raw.error,
        srtt_us: raw.srtt_us,
        total_retrans: raw.total_retrans,
        bytes_acked: raw.bytes_acked,
        bytes_received: raw.bytes_received,
        all_recorded: raw.flags & flags::ALL_TRANSITIONS != 0,
    })
}

fn v4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

/// Copies a `#[repr(C)]` record out of the ring (ring entries are only 8-byte aligned, and the
/// slice may be shorter than `T` if the kernel side is older).
fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: T is Pod (every bit pattern valid) and the slice holds at least size_of::<T>() bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn raw_state_change(old: u8, new: u8, family: u16) -> StateChange {
        let mut saddr = [0u8; 16];
        let mut daddr = [0u8; 16];
        if family == AF_INET {
            saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
            daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        } else {
            saddr[15] = 1;
            daddr[15] = 2;
        }
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        StateChange {
            header: Header {
                kind: kind::STATE_CHANGE,
                cpu: 1,
                ts_ns: 42,
                sock: 0xffff_0000_1234,
            },
            netns: 4026531840,
            old_state: old,
            new_state: new,
            family,
            sport: 40000,
            dport: 80,
            flags: 0,
            pid_tgid: (1000u64 << 32) | 1001,
            saddr,
            daddr,
            comm,
            error: 0,
            srtt_us: 0,
            total_retrans: 0,
            _reserved: 0,
            bytes_acked: 0,
            bytes_received: 0,
        }
    }

    pub fn bytes_of(raw: &StateChange) -> Vec<u8> {
        // SAFETY: StateChange is Pod with no padding.
        unsafe {
            std::slice::from_raw_parts((raw as *const StateChange).cast::<u8>(), StateChange::SIZE)
        }
        .to_vec()
    }

    #[test]
    fn ipv4_process_context_transition_decodes_every_field() {
        let raw = raw_state_change(7, 2, AF_INET);
        let Record::Transition(t) = decode(&bytes_of(&raw)).unwrap() else {
            panic!()
        };
        assert_eq!(t.old, TcpState::Close);
        assert_eq!(t.new, TcpState::SynSent);
        assert_eq!(t.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(t.remote, "127.0.0.2:80".parse().unwrap());
        assert_eq!(t.netns, 4026531840);
        assert_eq!(t.ts_ns, 42);
        let task = t.context.task().unwrap();
        assert_eq!((task.pid, task.tid, task.comm()), (1000, 1001, "curl"));
    }

    #[test]
    fn ipv6_addresses_decode_from_all_16_bytes() {
        let raw = raw_state_change(10, 3, AF_INET6);
        let Record::Transition(t) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("a transition")
        };
        assert_eq!(t.local, "[::1]:40000".parse().unwrap());
        assert_eq!(t.remote, "[::2]:80".parse().unwrap());
    }

    #[test]
    fn kernel_context_names_no_task() {
        let mut raw = raw_state_change(10, 3, AF_INET);
        raw.flags = flags::KERNEL_CONTEXT;
        let Record::Transition(t) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("a transition")
        };
        assert_eq!(t.context, Context::Kernel);
        assert_eq!(t.context.describe(), "kernel");
        assert!(t.context.task().is_none());
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        let raw = raw_state_change(7, 2, AF_INET);
        let bytes = bytes_of(&raw);
        assert_eq!(decode(&bytes[..10]), Err(DecodeError::Short(10)));
        assert!(matches!(
            decode(&bytes[..40]),
            Err(DecodeError::Size { .. })
        ));
        let mut unknown = bytes.clone();
        unknown[0] = 99;
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(99)));
        let bad_state = raw_state_change(7, 42, AF_INET);
        assert_eq!(decode(&bytes_of(&bad_state)), Err(DecodeError::State(42)));
        let bad_family = raw_state_change(7, 2, 1);
        assert_eq!(decode(&bytes_of(&bad_family)), Err(DecodeError::Family(1)));
    }

    /// A close with the facts its slot kept of an active open: connect()'s SYN_SENT with its
    /// owner, then the ESTABLISHED, then the close, each with the slot's tuple and times.
    #[test]
    fn a_kept_close_stands_for_the_open_the_handshake_and_the_close() {
        let mut change = raw_state_change(1, 7, AF_INET);
        change.header.kind = kind::KEPT_CLOSE;
        change.header.ts_ns = 900;
        let kept = RawKept {
            have: kept::OPENED | kept::OWNER | kept::ESTABLISHED,
            netns: change.netns,
            family: AF_INET,
            sport: 40000,
            dport: 80,
            saddr: change.saddr,
            daddr: change.daddr,
            opened_ns: 100,
            established_ns: 130,
            srtt_us: 12,
            total_retrans: 1,
            owner_ns: 100,
            pid_tgid: change.pid_tgid,
            comm: change.comm,
            ..RawKept::default()
        };
        let raw = KeptClose { change, kept };
        // SAFETY: KeptClose is Pod with no padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw as *const KeptClose).cast::<u8>(),
                std::mem::size_of::<KeptClose>(),
            )
        };
        let Record::Kept(k) = decode(bytes).unwrap() else {
            panic!("kept facts")
        };
        let (Some(open), Some(established), None) = k.parts() else {
            panic!("an open and a handshake: {:?}", k.parts())
        };
        assert_eq!(
            (open.old, open.new, open.ts_ns),
            (TcpState::Close, TcpState::SynSent, 100)
        );
        assert_eq!(open.context.task().map(|t| t.pid), Some(1000));
        assert_eq!(open.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(
            (established.old, established.new, established.ts_ns),
            (TcpState::SynSent, TcpState::Established, 130)
        );
        assert_eq!((established.srtt_us, established.total_retrans), (12, 1));
        assert!(!open.all_recorded && !established.all_recorded);
        let close = k.close.expect("the close");
        assert_eq!(
            (close.old, close.new, close.ts_ns),
            (TcpState::Established, TcpState::Close, 900)
        );
    }

    /// A passive open's slot: ESTABLISHED from SYN_RECV, then accept()'s owner.
    #[test]
    fn kept_facts_of_an_accepted_socket_stand_for_its_handshake_and_accept() {
        let kept = RawKept {
            have: kept::PASSIVE | kept::ESTABLISHED | kept::OWNER | kept::ACCEPTED,
            family: AF_INET,
            opened_ns: 10,
            established_ns: 10,
            owner_ns: 20,
            pid_tgid: 7 << 32 | 8,
            ..RawKept::default()
        };
        let k = Kept::new(0xffff_0000_5678, 0, kept).unwrap();
        let (None, Some(established), Some(accept)) = k.parts() else {
            panic!("a handshake and an accept: {:?}", k.parts())
        };
        assert_eq!(
            (established.old, established.new),
            (TcpState::SynRecv, TcpState::Established)
        );
        assert_eq!((accept.ts_ns, accept.task.pid, accept.task.tid), (20, 7, 8));
    }
}
