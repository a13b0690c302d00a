//! What the programs need to know about the running kernel, found before loading: member
//! offsets from its BTF, each declared once in [`MEMBERS`] with what is lost without it, and the
//! keepalive timer's address. The result is the one [`KernelOffsets`] global the programs read.
use tcp_trace_common::KernelOffsets;

use super::{Hooks, btf};

/// Who reads a member, and so what a kernel without it loses.
#[derive(Clone, Copy)]
enum Need {
    /// Optional: the capability named is lost without it.
    Lost(&'static str),
    /// Also loaded by the BTF state program, which has no fallbacks (a load at an unknown
    /// offset would not pass the verifier): without it the classic tracepoint is used, and the
    /// capability named is lost.
    Direct(&'static str),
    /// Only the BTF state program loads it (0 is a valid offset there: `skc_daddr` is at 0);
    /// without it the classic tracepoint is used, which reads these from its record.
    StateOnly,
}

use Need::{Direct, Lost, StateOnly};

/// Where a member's offset goes in [`KernelOffsets`].
type Field = fn(&mut KernelOffsets) -> &mut u32;

const NETNS: &str = "network namespace of sockets";
const RESET_NETNS: &str = "network namespace of resets sent without a socket";
const KEEPALIVE: &str = "keepalive probes";
const ACCEPTOR: &str = "the process that accepted a connection";

/// Every member offset the programs use: where it goes, its path in the kernel's BTF (a struct,
/// then members), and who needs it. The BTF state program's members come first, so the first
/// one missing is the one its fallback names.
#[rustfmt::skip] // A table: one member a line.
const MEMBERS: &[(Field, &str, Need)] = &[
    (|o| &mut o.net, "sock.__sk_common.skc_net.net", Direct(NETNS)),
    (|o| &mut o.inum, "net.ns.inum", Direct(NETNS)),
    (|o| &mut o.sk_err, "sock.sk_err", Direct("why connections closed")),
    (|o| &mut o.sk_lock_owned, "sock.sk_lock.owned", Direct(
        "telling a socket's own system calls from packets and timers, so only connect() and \
         listen() transitions name a process",
    )),
    (|o| &mut o.srtt, "tcp_sock.srtt_us", Direct("passive handshake latency")),
    (|o| &mut o.total_retrans, "tcp_sock.total_retrans", Direct("handshake retransmits")),
    (|o| &mut o.bytes_acked, "tcp_sock.bytes_acked", Direct("bytes sent")),
    (|o| &mut o.bytes_received, "tcp_sock.bytes_received", Direct("bytes received")),
    (|o| &mut o.sock.family, "sock.__sk_common.skc_family", StateOnly),
    (|o| &mut o.sock.dport, "sock.__sk_common.skc_dport", StateOnly),
    (|o| &mut o.sock.daddr, "sock.__sk_common.skc_daddr", StateOnly),
    (|o| &mut o.sock.v6_saddr, "sock.__sk_common.skc_v6_rcv_saddr", StateOnly),
    (|o| &mut o.sock.v6_daddr, "sock.__sk_common.skc_v6_daddr", StateOnly),
    (|o| &mut o.sock.inet_sport, "inet_sock.inet_sport", StateOnly),
    (|o| &mut o.sock.inet_saddr, "inet_sock.inet_saddr", StateOnly),
    (|o| &mut o.sock.task_comm, "task_struct.comm", StateOnly),
    (|o| &mut o.sock.state, "sock.__sk_common.skc_state", StateOnly),
    (|o| &mut o.sk_protocol, "sock.sk_protocol", Lost(
        "skipping accept() of sockets other than TCP in the kernel",
    )),
    (|o| &mut o.sk_timer, "sock.sk_timer", Lost(KEEPALIVE)),
    (|o| &mut o.probes_out, "inet_connection_sock.icsk_probes_out", Lost(KEEPALIVE)),
    (|o| &mut o.timer_function, "timer_list.function", Lost(
        "keepalive probes while another tracer runs (the classic timer hooks share the kernel's \
         recursion guard with every tracer on the host, and miss timers it holds)",
    )),
    (|o| &mut o.skb_dev, "sk_buff.dev", Lost(RESET_NETNS)),
    (|o| &mut o.dev_net, "net_device.nd_net.net", Lost(RESET_NETNS)),
    (|o| &mut o.task_files, "task_struct.files", Lost(ACCEPTOR)),
    (|o| &mut o.files_fdt, "files_struct.fdt", Lost(ACCEPTOR)),
    (|o| &mut o.fdt_max_fds, "fdtable.max_fds", Lost(ACCEPTOR)),
    (|o| &mut o.fdt_fd, "fdtable.fd", Lost(ACCEPTOR)),
    (|o| &mut o.file_private_data, "file.private_data", Lost(ACCEPTOR)),
    (|o| &mut o.socket_sk, "socket.sk", Lost(ACCEPTOR)),
];

/// The kernel facts, and whether the BTF state program can load.
pub(super) struct Resolved {
    pub offsets: KernelOffsets,
    /// The first member the BTF state program loads that the kernel's BTF lacks.
    pub direct_missing: Option<&'static str>,
}

/// Resolves every member of [`MEMBERS`]; each one missing is named in `hooks.missing` with
/// what is lost without it.
pub(super) fn resolve(hooks: &mut Hooks) -> Resolved {
    let mut offsets = KernelOffsets {
        keepalive_timer_fn: kallsyms_address("tcp_keepalive_timer").unwrap_or(0),
        ..KernelOffsets::default()
    };
    let btf = match btf::Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(err) => {
            hooks.missing.push(format!(
                "kernel BTF (/sys/kernel/btf/vmlinux: {err}): no network namespaces, close errors, \
                 handshake retransmits or keepalive probes"
            ));
            return Resolved {
                offsets,
                direct_missing: Some(MEMBERS[0].1),
            };
        }
    };
    let mut direct_missing = None;
    for &(field, path, need) in MEMBERS {
        match btf.member_offset(path) {
            Ok(offset) => *field(&mut offsets) = offset,
            Err(err) => {
                if let Lost(lost) | Direct(lost) = need {
                    hooks.missing.push(format!("{path} ({err}): {lost}"));
                }
                if let Direct(_) | StateOnly = need {
                    direct_missing = direct_missing.or(Some(path));
                }
            }
        }
    }
    Resolved {
        offsets,
        direct_missing,
    }
}

/// The address of a kernel function, from /proc/kallsyms (zeros there mean kptr_restrict hides it).
fn kallsyms_address(symbol: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let (addr, _kind, name) = (parts.next()?, parts.next()?, parts.next()?);
        (name == symbol)
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&a| a != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_goes_to_its_own_field() {
        let mut offsets = KernelOffsets::default();
        for (i, (field, _, _)) in MEMBERS.iter().enumerate() {
            *field(&mut offsets) = i as u32 + 1;
        }
        let mut seen: Vec<u32> = MEMBERS
            .iter()
            .map(|(field, _, _)| *field(&mut offsets))
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), MEMBERS.len(), "two members write one field");
        // Every u32 field is in the table (but `SockLayout::_reserved`, the padding).
        let fields = (size_of::<KernelOffsets>() - size_of::<u64>()) / size_of::<u32>() - 1;
        assert_eq!(MEMBERS.len(), fields);
    }

    #[test]
    fn running_kernel_btf_has_every_member() {
        let mut hooks = Hooks::default();
        let resolved = resolve(&mut hooks);
        assert_eq!(hooks.missing, Vec::<String>::new());
        assert_eq!(resolved.direct_missing, None);
        assert!(resolved.offsets.net > 0 && resolved.offsets.inum > 0);
    }
}
