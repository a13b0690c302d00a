//! `sock:inet_sock_set_state`: every TCP state transition, both families.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tcp_trace_common::{AF_INET, Header, IPPROTO_TCP, StateChange, flags, kind, tcp_state};

use crate::{
    context,
    fields::{address, field, widen},
    kernel, maps,
};

// Field offsets in the tracepoint record (/sys/kernel/tracing/events/sock/inet_sock_set_state/format);
// the agent checks them against the running kernel's format file before loading.
const SKADDR: usize = 8;
const OLDSTATE: usize = 16;
const NEWSTATE: usize = 20;
const SPORT: usize = 24;
const DPORT: usize = 26;
const FAMILY: usize = 28;
const PROTOCOL: usize = 30;
const SADDR: usize = 32;
const DADDR: usize = 36;
const SADDR_V6: usize = 40;
const DADDR_V6: usize = 56;

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // The tracepoint also fires for SCTP and MPTCP sockets.
    if field::<u16>(&ctx, PROTOCOL) != IPPROTO_TCP {
        return 0;
    }
    let sock: u64 = field(&ctx, SKADDR);
    let netns = kernel::netns_of_sock(sock);
    if !maps::netns_wanted(netns) {
        return 0;
    }
    let Some(mut entry) = maps::reserve::<StateChange>() else {
        return 0;
    };
    let new_state = field::<i32>(&ctx, NEWSTATE) as u8;
    // tcp_done() runs after the cause is stored in sk_err (tcp_reset, tcp_write_err, ICMP).
    let error = if new_state == tcp_state::CLOSE {
        kernel::sk_err(sock)
    } else {
        0
    };
    let (srtt_us, total_retrans) = match new_state {
        tcp_state::ESTABLISHED | tcp_state::CLOSE => kernel::rtt_and_retransmits(sock),
        _ => (0, 0),
    };
    let (bytes_acked, bytes_received) = if new_state == tcp_state::CLOSE {
        kernel::bytes(sock)
    } else {
        (0, 0)
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let family: u16 = field(&ctx, FAMILY);
    let (saddr, daddr) = if family == AF_INET {
        (widen(field(&ctx, SADDR)), widen(field(&ctx, DADDR)))
    } else {
        (address(&ctx, SADDR_V6), address(&ctx, DADDR_V6))
    };
    let softirq = context::softirq();
    let context_flags = if softirq == 0 {
        0
    } else {
        flags::INTERRUPT_CONTEXT | ((softirq & 0xff) << flags::SOFTIRQ_SHIFT)
    };
    entry.write(StateChange {
        header: Header {
            kind: kind::STATE_CHANGE,
            cpu: unsafe { bpf_get_smp_processor_id() },
            ts_ns: now,
            sock,
        },
        netns,
        old_state: field::<i32>(&ctx, OLDSTATE) as u8,
        new_state,
        family,
        sport: field(&ctx, SPORT),
        dport: field(&ctx, DPORT),
        flags: context_flags,
        // The current task only means something in process context.
        pid_tgid: if softirq == 0 {
            bpf_get_current_pid_tgid()
        } else {
            0
        },
        saddr,
        daddr,
        comm: if softirq == 0 {
            bpf_get_current_comm().unwrap_or_default()
        } else {
            [0; 16]
        },
        error,
        srtt_us,
        total_retrans,
        _reserved: 0,
        bytes_acked,
        bytes_received,
    });
    maps::submit(entry, now);
    0
}
