//! Retransmissions and resets: `tcp:tcp_retransmit_skb`, `tcp:tcp_retransmit_synack`,
//! `tcp:tcp_send_reset`, `tcp:tcp_receive_reset`.
//!
//! The two hooks whose only argument of use is the socket have a BTF tracepoint program too,
//! which the agent prefers: a classic tracepoint program is skipped whenever any classic or
//! kprobe program runs on that CPU (`bpf_prog_active`, shared with every tracer on the host and
//! with tcp-trace's own accept hook), a BTF one only when it runs there itself.
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, generated::bpf_skc_to_tcp_sock},
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use tcp_trace_common::{AF_INET, Header, Reset, Retransmit, kind, reset, retransmit, tcp_state};

use crate::{
    fields::{field, load, widen},
    kernel,
    maps::{self, offset},
    slots,
    state::{netns_of, tuple_of},
};

fn header(kind: u32, now: u64, sock: u64) -> Header {
    Header {
        kind,
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns: now,
        sock,
    }
}

/// Offsets of the 4-tuple fields in the two retransmit records.
struct TupleAt {
    sport: usize,
    family: usize,
    saddr: usize,
    saddr_v6: usize,
}

#[inline(always)]
fn retransmit(ctx: &TracePointContext, what: u8, sock: u64, state: u8, at: TupleAt) {
    let netns = kernel::netns_of_sock(sock);
    if !maps::netns_wanted(netns) {
        return;
    }
    if what == retransmit::SEGMENT {
        slots::hand_on(sock);
    }
    let Some(mut entry) = maps::reserve::<Retransmit>() else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let family: u16 = field(ctx, at.family);
    // The v4 and v6 address fields are adjacent pairs: saddr, daddr (4 bytes each) and
    // saddr_v6, daddr_v6 (16 bytes each). Their offsets are not 8-aligned here, so the v6
    // ones are read with the probe helper rather than direct loads.
    let (saddr, daddr) = if family == AF_INET {
        (
            widen(read_u32(ctx, at.saddr)),
            widen(read_u32(ctx, at.saddr + 4)),
        )
    } else {
        (read_16(ctx, at.saddr_v6), read_16(ctx, at.saddr_v6 + 16))
    };
    entry.write(Retransmit {
        header: header(kind::RETRANSMIT, now, sock),
        netns,
        what,
        state,
        family,
        sport: field(ctx, at.sport),
        dport: field(ctx, at.sport + 2),
        _reserved: 0,
        saddr,
        daddr,
    });
    maps::submit(entry, now);
}

fn read_u32(ctx: &TracePointContext, offset: usize) -> u32 {
    unsafe { ctx.read_at::<u32>(offset) }.unwrap_or(0)
}

fn read_16(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    unsafe { ctx.read_at::<[u8; 16]>(offset) }.unwrap_or([0; 16])
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let sock: u64 = field(&ctx, 16);
    let state = field::<i32>(&ctx, 24) as u8;
    let at = TupleAt {
        sport: 28,
        family: 32,
        saddr: 34,
        saddr_v6: 42,
    };
    retransmit(&ctx, retransmit::SEGMENT, sock, state, at);
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let listener: u64 = field(&ctx, 8);
    let at = TupleAt {
        sport: 24,
        family: 28,
        saddr: 30,
        saddr_v6: 38,
    };
    retransmit(&ctx, retransmit::SYNACK, listener, tcp_state::SYN_RECV, at);
    0
}

/// A 4-tuple: family, source port, destination port, source and destination address.
type Tuple = (u16, u16, u16, [u8; 16], [u8; 16]);

#[inline(always)]
fn reset(direction: u8, sock: u64, netns: u32, state: u8, reason: u32, tuple: Tuple) {
    if !maps::netns_wanted(netns) {
        return;
    }
    if sock != 0 {
        slots::hand_on(sock);
    }
    let Some(mut entry) = maps::reserve::<Reset>() else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let (family, sport, dport, saddr, daddr) = tuple;
    entry.write(Reset {
        header: header(kind::RESET, now, sock),
        netns,
        direction,
        state,
        _reserved: 0,
        reason,
        family,
        sport,
        dport,
        _reserved2: 0,
        saddr,
        daddr,
    });
    maps::submit(entry, now);
}

/// `tcp_send_reset` carries the addresses as two `struct sockaddr_in6`-sized buffers holding a
/// sockaddr_in or sockaddr_in6 (family, big-endian port, address).
fn sockaddr_tuple(ctx: &TracePointContext) -> Tuple {
    let family = read_u16(ctx, 32);
    let (sport, dport) = (
        u16::from_be(read_u16(ctx, 34)),
        u16::from_be(read_u16(ctx, 62)),
    );
    let (saddr, daddr) = if family == AF_INET {
        (widen(read_u32(ctx, 36)), widen(read_u32(ctx, 64)))
    } else {
        (read_16(ctx, 40), read_16(ctx, 68))
    };
    (family, sport, dport, saddr, daddr)
}

fn read_u16(ctx: &TracePointContext, offset: usize) -> u16 {
    unsafe { ctx.read_at::<u16>(offset) }.unwrap_or(0)
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let skb: u64 = field(&ctx, 8);
    let sock: u64 = field(&ctx, 16);
    // A reset answering a segment for which there is no socket (a closed port) has only the
    // segment: its namespace is its device's.
    let (netns, state) = if sock != 0 {
        (kernel::netns_of_sock(sock), field::<i32>(&ctx, 24) as u8)
    } else {
        (kernel::netns_of_skb(skb), 0)
    };
    reset(
        reset::SENT,
        sock,
        netns,
        state,
        field(&ctx, 28),
        sockaddr_tuple(&ctx),
    );
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let sock: u64 = field(&ctx, 8);
    let family: u16 = field(&ctx, 20);
    let (saddr, daddr) = if family == AF_INET {
        (widen(read_u32(&ctx, 22)), widen(read_u32(&ctx, 26)))
    } else {
        (read_16(&ctx, 30), read_16(&ctx, 46))
    };
    let tuple = (family, field(&ctx, 16), field(&ctx, 18), saddr, daddr);
    reset(
        reset::RECEIVED,
        sock,
        kernel::netns_of_sock(sock),
        0,
        0,
        tuple,
    );
    0
}

/// The socket argument as the `tcp_sock` it is, so that the verifier lets the programs read
/// `inet_sock` members beyond `struct sock` (null for anything but a full TCP socket).
#[inline(always)]
fn tcp_sock(ctx: &BtfTracePointContext) -> Option<*const u8> {
    let sk: *const u8 = ctx.arg(0);
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) } as *const u8;
    (!tp.is_null()).then_some(tp)
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_btf(ctx: BtfTracePointContext) -> u32 {
    let Some(sk) = tcp_sock(&ctx) else {
        return 0;
    };
    let netns = netns_of(sk);
    if !maps::netns_wanted(netns) {
        return 0;
    }
    slots::hand_on(sk as u64);
    let Some(mut entry) = maps::reserve::<Retransmit>() else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let (family, sport, dport, saddr, daddr) = tuple_of(sk);
    entry.write(Retransmit {
        header: header(kind::RETRANSMIT, now, sk as u64),
        netns,
        what: retransmit::SEGMENT,
        state: load(sk, offset!(sock.state)),
        family,
        sport,
        dport,
        _reserved: 0,
        saddr,
        daddr,
    });
    maps::submit(entry, now);
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> u32 {
    let Some(sk) = tcp_sock(&ctx) else {
        return 0;
    };
    reset(reset::RECEIVED, sk as u64, netns_of(sk), 0, 0, tuple_of(sk));
    0
}
