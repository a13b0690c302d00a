//! `sock:inet_sock_set_state`: every TCP state transition, both families.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tcp_trace_common::{AF_INET, Header, IPPROTO_TCP, StateChange, counter, flags, kind};

use crate::{context, maps};

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
    let netns = netns_of(sock);
    let filter = maps::netns_filter();
    if filter != 0 && filter != netns {
        maps::count(counter::FILTERED);
        return 0;
    }
    let Some(mut entry) = maps::EVENTS.reserve::<StateChange>(0) else {
        maps::count(counter::RING_FULL);
        return 0;
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
        new_state: field::<i32>(&ctx, NEWSTATE) as u8,
        family,
        sport: field(&ctx, SPORT),
        dport: field(&ctx, DPORT),
        flags: context_flags,
        pid_tgid: bpf_get_current_pid_tgid(),
        saddr,
        daddr,
        comm: bpf_get_current_comm().unwrap_or_default(),
    });
    entry.submit(maps::submit_flags(now));
    maps::count(counter::SUBMITTED);
    0
}

/// A field of the tracepoint record. Direct context loads: the verifier checks them against the
/// record and they cost less than a helper call, but it only accepts a load of the field's own
/// size at a constant offset from the context pointer, hence the volatile (single, sized) load.
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { core::ptr::read_volatile(ctx.as_ptr().add(offset).cast::<T>()) }
}

/// A 16-byte address field as two 8-byte loads (both offsets are 8-aligned in the record).
#[inline(always)]
fn address(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let high: u64 = field(ctx, offset);
    let low: u64 = field(ctx, offset + 8);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&high.to_ne_bytes());
    out[8..].copy_from_slice(&low.to_ne_bytes());
    out
}

#[inline(always)]
fn widen(v4: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&v4.to_ne_bytes());
    out
}

/// `sk->__sk_common.skc_net.net->ns.inum`, with offsets the agent read from the kernel's BTF
/// (aya's eBPF side has no CO-RE relocations). 0 when they are unknown or a read faults.
#[inline(always)]
fn netns_of(sock: u64) -> u32 {
    let (net_offset, inum_offset) = maps::netns_offsets();
    if net_offset == 0 || inum_offset == 0 {
        return 0;
    }
    unsafe {
        let Ok(net) = bpf_probe_read_kernel((sock + net_offset as u64) as *const u64) else {
            return 0;
        };
        bpf_probe_read_kernel((net + inum_offset as u64) as *const u32).unwrap_or(0)
    }
}
