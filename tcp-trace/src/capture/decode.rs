//! Kernel record bytes -> [`Transition`]. Pure: unit-tested without a kernel.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tcp_trace_common::{AF_INET, AF_INET6, Header, StateChange, flags, kind};

use crate::model::{Context, Task, TcpState, Transition};

/// Why a record could not be decoded: the kernel and agent disagree about the wire format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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
}

/// A decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Transition(Transition),
}

pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let header: Header = read(bytes).ok_or(DecodeError::Short(bytes.len()))?;
    match header.kind {
        kind::STATE_CHANGE => {
            let raw: StateChange = read(bytes).ok_or(DecodeError::Size {
                kind: header.kind,
                len: bytes.len(),
                expected: StateChange::SIZE,
            })?;
            transition(&raw).map(Record::Transition)
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

fn transition(raw: &StateChange) -> Result<Transition, DecodeError> {
    let state = |value| TcpState::from_kernel(value).ok_or(DecodeError::State(value));
    let (local, remote) = match raw.family {
        AF_INET => (v4(&raw.saddr), v4(&raw.daddr)),
        AF_INET6 => (
            IpAddr::V6(Ipv6Addr::from(raw.saddr)),
            IpAddr::V6(Ipv6Addr::from(raw.daddr)),
        ),
        other => return Err(DecodeError::Family(other)),
    };
    let context = if raw.flags & flags::INTERRUPT_CONTEXT != 0 {
        let vec_plus_one = (raw.flags & flags::SOFTIRQ_MASK) >> flags::SOFTIRQ_SHIFT;
        Context::Softirq(vec_plus_one.saturating_sub(1) as u8)
    } else {
        Context::Process(Task {
            pid: (raw.pid_tgid >> 32) as u32,
            tid: raw.pid_tgid as u32,
            comm: raw.comm,
        })
    };
    Ok(Transition {
        ts_ns: raw.header.ts_ns,
        sock: raw.header.sock,
        netns: raw.netns,
        old: state(raw.old_state)?,
        new: state(raw.new_state)?,
        local: SocketAddr::new(local, raw.sport),
        remote: SocketAddr::new(remote, raw.dport),
        context,
        cpu: raw.header.cpu,
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
        let Record::Transition(t) = decode(&bytes_of(&raw)).unwrap();
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
        let Record::Transition(t) = decode(&bytes_of(&raw)).unwrap();
        assert_eq!(t.local, "[::1]:40000".parse().unwrap());
        assert_eq!(t.remote, "[::2]:80".parse().unwrap());
    }

    #[test]
    fn softirq_context_names_no_task() {
        let mut raw = raw_state_change(10, 3, AF_INET);
        raw.flags = flags::INTERRUPT_CONTEXT | (4 << flags::SOFTIRQ_SHIFT); // NET_RX (3) + 1
        let Record::Transition(t) = decode(&bytes_of(&raw)).unwrap();
        assert_eq!(t.context, Context::Softirq(3));
        assert_eq!(t.context.describe(), "softirq:NET_RX");
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
}
