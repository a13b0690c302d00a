//! Floors of the state hook's cost, for `cargo xtask bench` only (the agent never attaches
//! them). Each is the state program cut down to one part of its path, so the bench can measure
//! what that part alone costs a transition on the running kernel, with the same dispatch.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, map},
    maps::RingBuf,
    programs::BtfTracePointContext,
};
use tcp_trace_common::{Header, StateChange, kind};

use crate::{maps, state::wanted};

/// No work: the dispatch and the run-time statistics' own clock reads.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_empty(_ctx: BtfTracePointContext) -> u32 {
    0
}

/// A transition that writes no record: the state program's first step, the new state and the
/// transitions switch.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_skip(ctx: BtfTracePointContext) -> u32 {
    wanted(ctx.arg::<i32>(2) as u8).is_some() as u32
}

/// A transition that writes a record and reads nothing of the socket: the switch, then a
/// record of the state program's size reserved, written and submitted with its wake-up policy.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_record(ctx: BtfTracePointContext) -> u32 {
    if wanted(ctx.arg::<i32>(2) as u8).is_some() {
        empty_record(ctx.arg(0));
    }
    0
}

/// Like [`floor_record`] for every transition, the switch not read: the cost of a record when
/// every run writes one.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_record_all(ctx: BtfTracePointContext) -> u32 {
    empty_record(ctx.arg(0));
    0
}

/// One ring for all CPUs, as the agent had before each CPU got its own: sized by the bench (the
/// agent never writes to it, and leaves it at a page).
#[map(name = "FLOOR_SHARED")]
static SHARED: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Like [`floor_record_all`] through one ring shared by every CPU: beside it, what CPUs
/// writing records at once cost each other on a shared ring.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_shared(ctx: BtfTracePointContext) -> u32 {
    let Some(mut entry) = SHARED.reserve::<StateChange>(0) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    entry.write(zero_record(ctx.arg(0), now));
    maps::submit(entry, now);
    0
}

/// An all-zero state record but for its header, through the agent's ring.
#[inline(always)]
fn empty_record(sock: u64) {
    let Some(mut entry) = maps::reserve::<StateChange>() else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    entry.write(zero_record(sock, now));
    maps::submit(entry, now);
}

#[inline(always)]
fn zero_record(sock: u64, now: u64) -> StateChange {
    // SAFETY: StateChange is plain old data; all zeroes is a valid value.
    let mut record: StateChange = unsafe { core::mem::zeroed() };
    record.header = Header {
        kind: kind::STATE_CHANGE,
        cpu: 0,
        ts_ns: now,
        sock,
    };
    record
}

/// Like [`floor_record`] with a record of the header alone (24 bytes, against the state
/// record's 136): what a record costs apart from its size.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_record_small(ctx: BtfTracePointContext) -> u32 {
    if wanted(ctx.arg::<i32>(2) as u8).is_none() {
        return 0;
    }
    let Some(mut entry) = maps::reserve::<Header>() else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    entry.write(Header {
        kind: kind::STATE_CHANGE,
        cpu: 0,
        ts_ns: now,
        sock: ctx.arg(0),
    });
    maps::submit(entry, now);
    0
}
