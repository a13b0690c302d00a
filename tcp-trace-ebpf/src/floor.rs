//! Floors of the state hook's cost, for `cargo xtask bench` only (the agent never attaches
//! them). Each is the state program cut down to one part of its path, so the bench can measure
//! what that part alone costs a transition on the running kernel, with the same dispatch.
use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_sk_storage_get, bpf_skc_to_tcp_sock},
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::BtfTracePointContext,
};
use tcp_trace_common::{HANDSHAKE_BOUNDS_NS, Header, StateChange, kind, tcp_state};

use crate::{
    fields::load,
    maps::{self, global, offset},
    slots::{cas, number as scalar},
    state::{log_seen, netns_of, record_btf, tuple_of, wanted},
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

/// Who owned a socket at its connect, as the state program takes it there.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Owner {
    pid_tgid: u64,
    comm: [u8; 16],
}

impl Owner {
    #[inline(always)]
    fn current() -> Owner {
        Owner {
            pid_tgid: bpf_get_current_pid_tgid(),
            comm: bpf_get_current_comm().unwrap_or_default(),
        }
    }
}

/// The record at a socket's close under the one-record-per-end floors: what the kernel kept
/// of its life (open and handshake times, the owner) in a state record's place.
#[inline(always)]
fn kept_record(sock: u64, now: u64, opened_ns: u64, established_ns: u64, owner: Owner) {
    if let Some(mut entry) = maps::reserve::<StateChange>() {
        let mut record = zero_record(sock, now);
        record.pid_tgid = owner.pid_tgid;
        record.comm = owner.comm;
        record.bytes_acked = opened_ns;
        record.bytes_received = established_ns;
        entry.write(record);
        maps::submit(entry, now);
    }
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
    let Some(sock) = entry(&SOCK_HASH, &key) else {
        return 0;
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

/// The entry of `key`, made all zero if there was none; `None` when the map is full.
#[inline(always)]
fn entry<V>(map: &HashMap<u64, V>, key: &u64) -> Option<*mut V> {
    map.get_ptr_mut(key).or_else(|| {
        // SAFETY: the floors' values are plain old data; all zeroes is a valid value.
        let fresh: V = unsafe { core::mem::zeroed() };
        map.insert(key, fresh, 0).ok()?;
        map.get_ptr_mut(key)
    })
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

/// The one-record-per-end design as it would run: the socket's state touched only where it
/// changes what the record at close says (connect: the open time and the owner; establishment:
/// the handshake's end; close: read, recorded, deleted). The other transitions run the state
/// program's unrecorded path, as [`floor_quiet`]. [`floor_hash_end`] touches the map at every
/// transition, which overstates this design.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_hash_few(ctx: BtfTracePointContext) -> u32 {
    log_seen(&ctx);
    let new_state = ctx.arg::<i32>(2) as u8;
    if wanted(new_state).is_none() {
        return 0;
    }
    let key: u64 = ctx.arg(0);
    let now = unsafe { bpf_ktime_get_ns() };
    match new_state {
        tcp_state::SYN_SENT | tcp_state::ESTABLISHED => {
            let Some(agg) = entry(&AGG_SOCKS, &key) else {
                return 0;
            };
            // SAFETY: the entry found or made above.
            unsafe {
                if new_state == tcp_state::SYN_SENT {
                    (*agg).state.opened_ns = now;
                    (*agg).owner = Owner::current();
                } else {
                    (*agg).state.established_ns = now;
                }
            }
        }
        tcp_state::CLOSE => {
            let Some(agg) = AGG_SOCKS.get_ptr(key) else {
                empty_record_at(key, now);
                return 0;
            };
            // SAFETY: the entry found above; deleted only below, by this program.
            let agg = unsafe { &*agg };
            kept_record(
                key,
                now,
                agg.state.opened_ns,
                agg.state.established_ns,
                agg.owner,
            );
            let _ = AGG_SOCKS.remove(key);
        }
        _ => {}
    }
    0
}

/// A socket's state in [`SLOTS`]: the socket that holds the slot (0: free), then what the
/// record at its close carries.
#[repr(C)]
pub struct Slot {
    sock: u64,
    opened_ns: u64,
    established_ns: u64,
    owner: Owner,
}

/// Socket states without a hash map: an array of slots indexed by a hash of the socket's
/// address, each claimed by one socket with a compare-and-swap and freed at its close. An
/// array lookup is inlined by the verifier, and a claim takes no lock and no allocation. A
/// socket whose slot another holds goes without (its records are written as today). The bench
/// sets the size, a power of two.
#[map(name = "FLOOR_SLOTS")]
static SLOTS: Array<Slot> = Array::with_max_entries(1, 0);

/// The slot of `sock`: Fibonacci hashing of its address (sockets are slab objects a few KiB
/// apart), then the map's size as a mask.
#[inline(always)]
fn slot_of(sock: u64) -> Option<*mut Slot> {
    let mask = global!(FLOOR_SLOTS_MASK);
    SLOTS.get_ptr_mut((sock.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32 & mask)
}

/// `N - 1` for the `N` slots the bench gives [`SLOTS`] (set in .rodata before loading).
#[unsafe(no_mangle)]
static FLOOR_SLOTS_MASK: u32 = 0;

/// The one-record-per-end design with [`SLOTS`] for the state: [`floor_hash_few`] without the
/// hash map's locks, allocation and hashing.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_slots(ctx: BtfTracePointContext) -> u32 {
    slots(&ctx, false)
}

/// [`floor_slots`] with today's records where it writes any: read from the socket as the
/// state program reads them (the tuple, namespace, error, RTT, retransmits and bytes at
/// close, the task where it owns the socket). What the slot design's state program would
/// cost but for the kept facts' 40 bytes in the record at close.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_slots_full(ctx: BtfTracePointContext) -> u32 {
    slots(&ctx, true)
}

/// The slot floors: `full` writes the state program's own records, else empty ones.
#[inline(always)]
fn slots(ctx: &BtfTracePointContext, full: bool) -> u32 {
    let record = |sock, now| {
        if full {
            record_btf(ctx);
        } else {
            empty_record_at(sock, now);
        }
    };
    log_seen(ctx);
    let new_state = ctx.arg::<i32>(2) as u8;
    if wanted(new_state).is_none() {
        return 0;
    }
    let Some(sock) = scalar(ctx.arg(0)) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(slot) = slot_of(sock) else {
        return 0;
    };
    // SAFETY: an element of the array; its first word changes only by `cas` or its holder.
    let holder = unsafe { &raw mut (*slot).sock };
    // One call of `record` below: each is the whole state program inlined, and two do not fit
    // the BPF stack.
    let (write, free) = match new_state {
        tcp_state::SYN_SENT | tcp_state::ESTABLISHED => {
            let held = unsafe {
                let now_held = core::ptr::read_volatile(holder);
                now_held == sock || (now_held == 0 && cas(holder, 0, sock) == 0)
            };
            if held {
                // SAFETY: the slot is this socket's until its close frees it.
                unsafe {
                    if new_state == tcp_state::SYN_SENT {
                        (*slot).opened_ns = now;
                        (*slot).owner = Owner::current();
                    } else {
                        (*slot).established_ns = now;
                    }
                }
            }
            // Taken by another socket: this one's records go as today.
            (!held, false)
        }
        tcp_state::CLOSE => {
            if unsafe { core::ptr::read_volatile(holder) } != sock {
                (true, false)
            } else {
                // SAFETY: this socket's slot, freed below.
                let (opened_ns, established_ns, owner) = unsafe {
                    let kept = ((*slot).opened_ns, (*slot).established_ns, (*slot).owner);
                    ((*slot).opened_ns, (*slot).established_ns) = (0, 0);
                    kept
                };
                if !full {
                    kept_record(sock, now, opened_ns, established_ns, owner);
                }
                (full, true)
            }
        }
        // LISTEN: recorded as today.
        _ => (true, false),
    };
    if write {
        record(sock, now);
    }
    if free {
        unsafe { core::ptr::write_volatile(holder, 0) };
    }
    0
}

/// Slots of [`FLOOR_METRICS`] (the bench gives it 64): the exported metrics' counters a close
/// moves under the design that aggregates in the kernel (opens and closes by direction,
/// failures, the handshake and duration histograms), summed per CPU as Prometheus counters are.
const HANDSHAKE_HISTOGRAM: u32 = 8;
const DURATION_HISTOGRAM: u32 = 32;

/// One slot here: the agent loads this object too, and every map in it is created.
#[map(name = "FLOOR_METRICS")]
static METRICS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A remote peer as the agent's per-peer aggregates key it (`lifecycle::PeerKey`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PeerKey {
    netns: u32,
    port: u16,
    active: u16,
    address: [u8; 16],
}

/// What the agent keeps per peer: connections, failures, handshakes in power-of-two
/// microsecond buckets.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PeerTotals {
    connections: u64,
    failures: u64,
    handshake_us: [u32; 32],
}

/// Per CPU, so that CPUs closing connections to one peer at once share no cache line. One
/// entry here, the bench sets the size: the agent loads this object too, and a preallocated
/// per-CPU hash of 4,096 peers took 1.5 MiB of its locked memory on 2 CPUs, more per CPU.
#[map(name = "FLOOR_PEERS")]
static PEERS: PerCpuHashMap<PeerKey, PeerTotals> = PerCpuHashMap::with_max_entries(1, 0);

/// The design that needs no record for an always-on connection: [`floor_hash_end`]'s state
/// (and the owner at connect), and at close, instead of a record, the metrics and the peer's
/// totals updated in the kernel for the agent to read when asked. The floor of that design's
/// state program; its agent does nothing per connection.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_aggregate(ctx: BtfTracePointContext) -> u32 {
    let key: u64 = ctx.arg(0);
    let Some(agg) = entry(&AGG_SOCKS, &key) else {
        return 0;
    };
    // SAFETY: the entry found or made above, which this program alone writes.
    let sock = unsafe { &raw mut (*agg).state };
    let Some((state, now)) = accumulate(&ctx, sock) else {
        return 0;
    };
    if state == tcp_state::SYN_SENT {
        // SAFETY: the entry found or made above.
        unsafe { (*agg).owner = Owner::current() };
    }
    if state != tcp_state::CLOSE {
        return 0;
    }
    let tp =
        unsafe { bpf_skc_to_tcp_sock(ctx.arg::<*mut core::ffi::c_void>(0).cast()) } as *const u8;
    if tp.is_null() {
        let _ = AGG_SOCKS.remove(key);
        return 0;
    }
    let netns = netns_of(tp);
    let (_family, sport, dport, _saddr, daddr) = tuple_of(tp);
    let error = load::<i32>(tp, offset!(sk_err));
    // SAFETY: the entry found or made above; this program holds no other reference to it.
    let (opened, established) = unsafe { ((*sock).opened_ns, (*sock).established_ns) };
    let active = unsafe { (*agg).owner.pid_tgid } != 0;
    let handshake = if established > opened && opened != 0 {
        established - opened
    } else {
        0
    };
    bump(active as u32);
    bump(2 + (error != 0) as u32);
    bump(HANDSHAKE_HISTOGRAM + bucket(handshake));
    bump(DURATION_HISTOGRAM + bucket(now.wrapping_sub(opened)));
    // A connection this host opened: the remote service. One it accepted: the remote address
    // and the local port (the remote port is ephemeral, one per connection).
    let peer = PeerKey {
        netns,
        port: if active { dport } else { sport },
        active: active as u16,
        address: daddr,
    };
    let totals = PEERS.get_ptr_mut(&peer).or_else(|| {
        // SAFETY: plain old data; all zeroes is a valid value.
        let fresh: PeerTotals = unsafe { core::mem::zeroed() };
        PEERS.insert(&peer, &fresh, 0).ok()?;
        PEERS.get_ptr_mut(&peer)
    });
    let Some(totals) = totals else {
        let _ = AGG_SOCKS.remove(key);
        return 0;
    };
    let us_bucket = (64 - (handshake / 1000).leading_zeros()).min(31) as usize;
    // SAFETY: this CPU's copy of the peer's totals.
    unsafe {
        (*totals).connections += 1;
        (*totals).failures += (error != 0) as u64;
        if let Some(b) = (*totals).handshake_us.get_mut(us_bucket) {
            *b += 1;
        }
    }
    let _ = AGG_SOCKS.remove(key);
    0
}

/// A socket's state under [`floor_aggregate`]: [`SockState`] and the owner taken at connect.
#[repr(C)]
pub struct AggState {
    state: SockState,
    owner: Owner,
}

/// [`SOCK_HASH`] for [`floor_aggregate`]; the bench sets the size.
#[map(name = "FLOOR_AGG_SOCKS")]
static AGG_SOCKS: HashMap<u64, AggState> = HashMap::with_max_entries(1, 0);

/// The first bucket whose bound holds `ns` (16: past the last).
#[inline(always)]
fn bucket(ns: u64) -> u32 {
    let mut i = 0;
    while i < HANDSHAKE_BOUNDS_NS.len() {
        if ns <= HANDSHAKE_BOUNDS_NS[i] {
            return i as u32;
        }
        i += 1;
    }
    HANDSHAKE_BOUNDS_NS.len() as u32
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(counter) = METRICS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot.
        unsafe { *counter += 1 };
    }
}
