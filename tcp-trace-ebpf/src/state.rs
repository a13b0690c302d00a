//! `sock:inet_sock_set_state`: every TCP state transition, both families.
//!
//! Two programs for the one hook; the agent loads one. The BTF tracepoint (`tp_btf`) gets the
//! socket as a typed pointer and reads its fields with plain loads the verifier checks against
//! the kernel's BTF: no record is formatted for it and no helper call per field. The classic
//! tracepoint reads the formatted record plus `bpf_probe_read_kernel` for what the record lacks;
//! the agent falls back to it where the kernel or its BTF does not allow the first.
//!
//! The kernel runs a BTF tracepoint program once per CPU at a time: a transition in a softirq
//! that an interrupt started in the middle of the program's run in a system call (connect,
//! close, a socket's backlog) finds it running and is skipped, only counted. Softirqs do that
//! in batches: a timer tick's expired SYN timers, a backlog of packets. So a second program,
//! the guard, is attached after it on the same hook. The state program writes each transition
//! it sees (socket, old and new state) into a small per-CPU log as its first act; the guard,
//! which the kernel runs right after it for the same transition, finds it there unless the
//! kernel skipped the state program, and then records it in its place.
//!
//! A log, not a "running" flag set inside the state program: the kernel counts a program as
//! running from before its first instruction to after its last, so a flag leaves those edges
//! uncovered, and one interrupt landing there lost a whole softirq batch (20 expired SYN
//! timers) to the skip. A log rather than one mark: a softirq can run between the state program
//! and the guard of one transition, and its own transitions overwrite the latest entry; the
//! outer guard still finds its transition a few entries back.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, generated::bpf_skc_to_tcp_sock,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, TracePointContext},
};
use tcp_trace_common::{
    AF_INET, Header, IPPROTO_TCP, KeptClose, StateChange, counter, flags, kept, kind,
    recorded_when_quiet, tcp_state,
};

use crate::{
    fields::{address, field, load, load_bytes16, widen},
    kernel,
    maps::{self, offset},
    slots,
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
    let new_state = field::<i32>(&ctx, NEWSTATE) as u8;
    let Some(all) = wanted(new_state) else {
        return 0;
    };
    let sock: u64 = field(&ctx, SKADDR);
    let netns = kernel::netns_of_sock(sock);
    if !maps::netns_wanted(netns) {
        return 0;
    }
    let Some(mut entry) = maps::reserve::<StateChange>() else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let family: u16 = field(&ctx, FAMILY);
    let (saddr, daddr) = if family == AF_INET {
        (widen(field(&ctx, SADDR)), widen(field(&ctx, DADDR)))
    } else {
        (address(&ctx, SADDR_V6), address(&ctx, DADDR_V6))
    };
    let transition = Transition {
        sock,
        netns,
        old_state: field::<i32>(&ctx, OLDSTATE) as u8,
        new_state,
        family,
        sport: field(&ctx, SPORT),
        dport: field(&ctx, DPORT),
        saddr,
        daddr,
    };
    let fields = SockFields::at(
        new_state,
        || kernel::sk_err(sock),
        || kernel::rtt_and_retransmits(sock),
        || kernel::bytes(sock),
    );
    let task = Task::current(kernel::lock_owned(sock), || {
        bpf_get_current_comm().unwrap_or_default()
    });
    entry.write(transition.record(now, task, fields, all));
    maps::submit(entry, now);
    0
}

/// Entries of the per-CPU log of transitions the state program saw: more than a softirq's
/// batch (a timer tick's expired SYN timers come 20 at a time).
const SEEN_LOG: usize = 64;

/// The transitions the BTF state program saw last on this CPU, as (socket, states) entries.
#[repr(C)]
pub struct Seen {
    next: u32,
    _pad: u32,
    socks: [u64; SEEN_LOG],
    states: [u32; SEEN_LOG],
}

#[map(name = "STATE_SEEN")]
static SEEN: PerCpuArray<Seen> = PerCpuArray::with_max_entries(1, 0);

/// A transition's old and new state side by side (a socket makes each transition at most once
/// per life).
#[inline(always)]
fn states(ctx: &BtfTracePointContext) -> u32 {
    (ctx.arg::<i32>(1) as u32 & 0xff) << 8 | (ctx.arg::<i32>(2) as u32 & 0xff)
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    log_seen(&ctx);
    record_btf(&ctx);
    0
}

/// The state program's first act: the transition goes into the per-CPU log its guard reads.
#[inline(always)]
pub(crate) fn log_seen(ctx: &BtfTracePointContext) {
    if let Some(seen) = SEEN.get_ptr_mut(0) {
        unsafe {
            let i = (*seen).next as usize % SEEN_LOG;
            (*seen).socks[i] = ctx.arg::<u64>(0);
            (*seen).states[i] = states(ctx);
            (*seen).next = (*seen).next.wrapping_add(1);
        }
    }
}

/// The state program's stand-in for the transitions the kernel skips it for (module doc). Its
/// name fits the kernel's 15 bytes, apart from the state program's in `bpftool` and the bench.
/// The agent attaches it after the state program, so that the kernel runs it after it.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn set_state_guard(ctx: BtfTracePointContext) -> u32 {
    let Some(seen) = SEEN.get_ptr(0) else {
        return 0;
    };
    let (sock, states) = (ctx.arg::<u64>(0), states(&ctx));
    unsafe {
        let last = (*seen).next.wrapping_sub(1) as usize % SEEN_LOG;
        if (*seen).socks[last] == sock && (*seen).states[last] == states {
            return 0;
        }
        // Rare: a softirq ran between the state program and this guard, or the kernel
        // skipped the state program.
        for i in 0..SEEN_LOG {
            if (*seen).socks[i] == sock && (*seen).states[i] == states {
                return 0;
            }
        }
    }
    maps::count(counter::RECOVERED);
    record_btf(&ctx);
    0
}

#[inline(always)]
pub(crate) fn record_btf(ctx: &BtfTracePointContext) -> u32 {
    let new_state = ctx.arg::<i32>(2) as u8;
    let Some(all) = wanted(new_state) else {
        return 0;
    };
    let sk: *const u8 = ctx.arg(0);
    // Null for anything but a full TCP socket (the hook also fires for SCTP and MPTCP). Every
    // socket that changes TCP state is a full one: request sockets have no tracepoint.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) } as *const u8;
    if tp.is_null() {
        return 0;
    }
    let netns = netns_of(tp);
    if !maps::netns_wanted(netns) {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let old_state = ctx.arg::<i32>(1) as u8;
    let (srtt, retrans) = (offset!(srtt), offset!(total_retrans));
    let rtt_and_retransmits = || (load::<u32>(tp, srtt) >> 3, load(tp, retrans));
    let owned = load::<i32>(tp, offset!(sk_lock_owned)) != 0;
    let task = || {
        Task::current(owned, || {
            let task = unsafe { bpf_get_current_task_btf() } as *const u8;
            load_bytes16(task, offset!(sock.task_comm))
        })
    };
    // With slots, the transitions of an open and a handshake go into the socket's slot and
    // its CLOSE carries them; asked for every transition, the slot's facts go out first.
    let mut held = None;
    if slots::on()
        && let Some(sock) = slots::number(sk as u64)
    {
        if all {
            slots::hand_on_number(sock);
        } else {
            match new_state {
                tcp_state::SYN_SENT | tcp_state::ESTABLISHED => {
                    if keep(
                        tp,
                        sock,
                        netns,
                        old_state,
                        new_state,
                        now,
                        rtt_and_retransmits,
                        task,
                    ) {
                        return 0;
                    }
                }
                tcp_state::CLOSE => held = slots::take(sock),
                _ => {}
            }
        }
    }
    let (family, sport, dport, saddr, daddr) = tuple_of(tp);
    let transition = Transition {
        sock: sk as u64,
        netns,
        old_state,
        new_state,
        family,
        sport,
        dport,
        saddr,
        daddr,
    };
    let (acked, received) = (offset!(bytes_acked), offset!(bytes_received));
    let fields = SockFields::at(
        new_state,
        || load::<i32>(tp, offset!(sk_err)) as u32,
        rtt_and_retransmits,
        || (load(tp, acked), load(tp, received)),
    );
    let task = task();
    if let Some(held) = held {
        let Some(mut entry) = maps::reserve::<KeptClose>() else {
            held.free();
            return 0;
        };
        let mut record = transition.record(now, task, fields, all);
        record.header.kind = kind::KEPT_CLOSE;
        let close = entry.as_mut_ptr();
        // SAFETY: the reserved record, and the slot, this program's until `free`.
        unsafe {
            (*close).change = record;
            core::ptr::copy_nonoverlapping(held.kept(), &raw mut (*close).kept, 1);
        }
        held.free();
        maps::submit(entry, now);
        return 0;
    }
    let Some(mut entry) = maps::reserve::<StateChange>() else {
        return 0;
    };
    entry.write(transition.record(now, task, fields, all));
    maps::submit(entry, now);
    0
}

/// Keeps an open (SYN_SENT, or a passive open's ESTABLISHED) in a slot it claims, or a
/// handshake's end in the slot its socket holds. False when the transition is to be recorded
/// as it happens: the socket holds no slot, or its slot is another's. Written in place: the
/// BPF stack has no room for a copy.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn keep(
    tp: *const u8,
    sock: u64,
    netns: u32,
    old_state: u8,
    new_state: u8,
    now: u64,
    rtt_and_retransmits: impl FnOnce() -> (u32, u32),
    task: impl FnOnce() -> Task,
) -> bool {
    let passive = new_state == tcp_state::ESTABLISHED && old_state == tcp_state::SYN_RECV;
    let held = if new_state == tcp_state::SYN_SENT || passive {
        slots::claim(sock)
    } else {
        slots::take(sock)
    };
    let Some(held) = held else {
        return false;
    };
    let kept = held.kept();
    // SAFETY: the slot is this program's until `keep`.
    unsafe {
        if new_state == tcp_state::SYN_SENT {
            let task = task();
            let owned = task.flags & flags::KERNEL_CONTEXT == 0;
            (*kept).have = if owned {
                kept::OPENED | kept::OWNER
            } else {
                kept::OPENED
            };
            (*kept).netns = netns;
            (*kept).opened_ns = now;
            (*kept).owner_ns = now;
            (*kept).pid_tgid = task.pid_tgid;
            (*kept).comm = task.comm;
            (*kept).established_ns = 0;
            ((*kept).srtt_us, (*kept).total_retrans) = (0, 0);
        } else {
            let (srtt_us, total_retrans) = rtt_and_retransmits();
            if passive {
                (*kept).have = kept::PASSIVE | kept::ESTABLISHED;
                (*kept).netns = netns;
                (*kept).opened_ns = now;
                (*kept).owner_ns = 0;
                (*kept).pid_tgid = 0;
                (*kept).comm = [0; 16];
            } else {
                (*kept).have |= kept::ESTABLISHED;
            }
            (*kept).established_ns = now;
            ((*kept).srtt_us, (*kept).total_retrans) = (srtt_us, total_retrans);
        }
        let (family, sport, dport, saddr, daddr) = tuple_of(tp);
        ((*kept).family, (*kept).sport, (*kept).dport) = (family, sport, dport);
        ((*kept).saddr, (*kept).daddr) = (saddr, daddr);
    }
    held.keep();
    true
}

/// Whether a transition to `new_state` is recorded, and if so whether every transition is
/// (the record's `ALL_TRANSITIONS` flag). Decided first, on the state alone, so that a
/// transition nobody asked for costs the dispatch, one load and one array lookup.
#[inline(always)]
pub(crate) fn wanted(new_state: u8) -> Option<bool> {
    let all = maps::all_transitions();
    (all || recorded_when_quiet(new_state)).then_some(all)
}

/// The transition and the socket's endpoints, as both programs get them.
struct Transition {
    sock: u64,
    netns: u32,
    old_state: u8,
    new_state: u8,
    family: u16,
    sport: u16,
    dport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

impl Transition {
    #[inline(always)]
    fn record(self, now: u64, task: Task, fields: SockFields, all: bool) -> StateChange {
        let all = if all { flags::ALL_TRANSITIONS } else { 0 };
        StateChange {
            header: Header {
                kind: kind::STATE_CHANGE,
                cpu: unsafe { bpf_get_smp_processor_id() },
                ts_ns: now,
                sock: self.sock,
            },
            netns: self.netns,
            old_state: self.old_state,
            new_state: self.new_state,
            family: self.family,
            sport: self.sport,
            dport: self.dport,
            flags: task.flags | all,
            pid_tgid: task.pid_tgid,
            saddr: self.saddr,
            daddr: self.daddr,
            comm: task.comm,
            error: fields.error,
            srtt_us: fields.srtt_us,
            total_retrans: fields.total_retrans,
            _reserved: 0,
            bytes_acked: fields.bytes_acked,
            bytes_received: fields.bytes_received,
        }
    }
}

/// What is read from the socket itself, only on the transitions where it means something.
struct SockFields {
    error: u32,
    srtt_us: u32,
    total_retrans: u32,
    bytes_acked: u64,
    bytes_received: u64,
}

impl SockFields {
    #[inline(always)]
    fn at(
        new_state: u8,
        error: impl FnOnce() -> u32,
        rtt_and_retransmits: impl FnOnce() -> (u32, u32),
        bytes: impl FnOnce() -> (u64, u64),
    ) -> SockFields {
        let closing = new_state == tcp_state::CLOSE;
        let (srtt_us, total_retrans) = if closing || new_state == tcp_state::ESTABLISHED {
            rtt_and_retransmits()
        } else {
            (0, 0)
        };
        let (bytes_acked, bytes_received) = if closing { bytes() } else { (0, 0) };
        SockFields {
            // tcp_done() runs after the cause is stored in sk_err (tcp_reset, tcp_write_err, ICMP).
            error: if closing { error() } else { 0 },
            srtt_us,
            total_retrans,
            bytes_acked,
            bytes_received,
        }
    }
}

/// The current task, where it means something: in a system call of the process that holds the
/// socket (`owned`). Otherwise a packet or a timer drove the transition and the current task is
/// whoever the CPU interrupted, so it is left out and the flags say why.
struct Task {
    flags: u32,
    pid_tgid: u64,
    comm: [u8; 16],
}

impl Task {
    #[inline(always)]
    fn current(owned: bool, comm: impl FnOnce() -> [u8; 16]) -> Task {
        if owned {
            Task {
                flags: 0,
                pid_tgid: bpf_get_current_pid_tgid(),
                comm: comm(),
            }
        } else {
            Task {
                flags: flags::KERNEL_CONTEXT,
                pid_tgid: 0,
                comm: [0; 16],
            }
        }
    }
}

/// A socket's family, ports (host order, as the classic tracepoints report them) and addresses,
/// by direct loads at the offsets of `SockLayout`.
#[inline(always)]
pub(crate) fn tuple_of(sk: *const u8) -> (u16, u16, u16, [u8; 16], [u8; 16]) {
    let family: u16 = load(sk, offset!(sock.family));
    let (saddr, daddr) = if family == AF_INET {
        (
            widen(load(sk, offset!(sock.inet_saddr))),
            widen(load(sk, offset!(sock.daddr))),
        )
    } else {
        (
            load_bytes16(sk, offset!(sock.v6_saddr)),
            load_bytes16(sk, offset!(sock.v6_daddr)),
        )
    };
    (
        family,
        u16::from_be(load(sk, offset!(sock.inet_sport))),
        u16::from_be(load(sk, offset!(sock.dport))),
        saddr,
        daddr,
    )
}

/// `sk->__sk_common.skc_net.net->ns.inum`, by two loads.
#[inline(always)]
pub(crate) fn netns_of(sk: *const u8) -> u32 {
    let net: *const u8 = load(sk, offset!(net));
    load(net, offset!(inum))
}
