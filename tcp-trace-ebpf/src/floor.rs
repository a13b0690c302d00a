//! Floors of the state hook's cost, for `cargo xtask bench` only (the agent never attaches
//! them). Each is the state program cut down to one part of its path, so the bench can measure
//! what that part alone costs a transition on the running kernel, with the same dispatch.
use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::{bpf_ktime_get_ns, generated::bpf_sk_storage_get},
    macros::{btf_map, btf_tracepoint, map},
    maps::{HashMap, RingBuf},
    programs::BtfTracePointContext,
};
use tcp_trace_common::{Header, StateChange, kind, tcp_state};

use crate::{
    maps,
    state::{log_seen, wanted},
};

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

/// Exactly what the state program runs for a transition it does not record: the guard's log,
/// then the switch. Its cost plus the guard's is what such a transition costs the agent.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_quiet(ctx: BtfTracePointContext) -> u32 {
    log_seen(&ctx);
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

/// [`empty_record`] at a time already read.
#[inline(always)]
fn empty_record_at(sock: u64, now: u64) {
    if let Some(mut entry) = maps::reserve::<StateChange>() {
        entry.write(zero_record(sock, now));
        maps::submit(entry, now);
    }
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

/// What a socket end keeps in the kernel under the one-record-per-end design: when it opened,
/// when its handshake ended, its latest state. The floors below write it and nothing else.
#[repr(C)]
pub struct SockState {
    opened_ns: u64,
    established_ns: u64,
    last_ns: u64,
    state: u32,
    transitions: u32,
}

/// Socket-local storage for the floors: the kernel keeps the value in the socket itself and
/// frees it with the socket, so a lookup is a pointer walk, not a hash.
#[btf_map]
static FLOOR_SOCKS: SkStorage<SockState> = SkStorage::new();

/// The socket's storage, created on its first transition. Null if the kernel could not
/// allocate it.
#[inline(always)]
fn storage_of(ctx: &BtfTracePointContext) -> *mut SockState {
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // The map's address, as the BTF map's own (crate-private) `as_ptr` takes it.
    let map = core::ptr::from_ref(&FLOOR_SOCKS).cast_mut().cast();
    // SAFETY: a map of this object and the tracepoint's socket, as the helper takes them.
    unsafe {
        bpf_sk_storage_get(
            map,
            sk,
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast()
}

/// The state program reduced to its socket-storage update, with no record: what every
/// transition costs under the one-record-per-end design, and what a transition that writes
/// no record costs there.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_storage(ctx: BtfTracePointContext) -> u32 {
    update(&ctx);
    0
}

/// [`floor_storage`] plus one record when the socket closes: the floor of a state program
/// that writes one record per socket end (2 a connection, against the 5 the always-on program
/// writes today), and through its drain, the floor of an agent that reads only those.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_storage_end(ctx: BtfTracePointContext) -> u32 {
    let Some((state, now)) = update(&ctx) else {
        return 0;
    };
    if state == tcp_state::CLOSE {
        empty_record_at(ctx.arg(0), now);
    }
    0
}

/// The same state in a preallocated hash map keyed by the socket's address instead of the
/// socket's storage: no allocation per socket, a hash lookup per transition, and a delete when
/// the socket closes. One entry here; the bench sets the size before it loads the object.
#[map(name = "FLOOR_SOCK_HASH")]
static SOCK_HASH: HashMap<u64, SockState> = HashMap::with_max_entries(1, 0);

/// [`floor_storage_end`] with the state in [`SOCK_HASH`]: which of the two places for a
/// socket's state costs a transition less.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_hash_end(ctx: BtfTracePointContext) -> u32 {
    let key: u64 = ctx.arg(0);
    let sock = match SOCK_HASH.get_ptr_mut(key) {
        Some(sock) => sock,
        None => {
            // SAFETY: plain old data; all zeroes is a valid value.
            let fresh: SockState = unsafe { core::mem::zeroed() };
            if SOCK_HASH.insert(key, fresh, 0).is_err() {
                return 0;
            }
            let Some(sock) = SOCK_HASH.get_ptr_mut(key) else {
                return 0;
            };
            sock
        }
    };
    let Some((state, now)) = accumulate(&ctx, sock) else {
        return 0;
    };
    if state == tcp_state::CLOSE {
        let _ = SOCK_HASH.remove(key);
        empty_record_at(key, now);
    }
    0
}

/// Accumulates the transition in the socket's storage: its new state and time, and the open
/// and handshake times when they happen.
#[inline(always)]
fn update(ctx: &BtfTracePointContext) -> Option<(u8, u64)> {
    accumulate(ctx, storage_of(ctx))
}

#[inline(always)]
fn accumulate(ctx: &BtfTracePointContext, sock: *mut SockState) -> Option<(u8, u64)> {
    let new_state = ctx.arg::<i32>(2) as u8;
    if sock.is_null() {
        return None;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: non-null storage the helper or the map returned for this socket.
    unsafe {
        match new_state {
            tcp_state::SYN_SENT | tcp_state::SYN_RECV => (*sock).opened_ns = now,
            tcp_state::ESTABLISHED => (*sock).established_ns = now,
            _ => {}
        }
        (*sock).last_ns = now;
        (*sock).state = new_state.into();
        (*sock).transitions += 1;
    }
    Some((new_state, now))
}
