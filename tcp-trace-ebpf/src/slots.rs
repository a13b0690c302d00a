//! Socket slots: what the kernel keeps of a socket's life instead of writing records, while
//! nobody asks for every transition. A connection end is then one record, its CLOSE with the
//! kept facts (`KeptClose`), not its SYN_SENT, ESTABLISHED, accept and CLOSE.
//!
//! A socket's slot is fixed by its address (`slot_index`). The protocol is in
//! `tcp_trace_common::slot`: every change of a holder is a compare-and-swap, and whoever moves
//! it from a socket to `BUSY` owns the facts until it stores the socket (kept) or `FREE`
//! (handed on). The agent adopts slots the same way (tcp-trace/src/capture/slots.rs).
//!
//! Every program that records something about a socket calls [`hand_on`] first: a slot's
//! facts then always reach the agent before any other record of the socket.
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, PerCpuArray},
};
use tcp_trace_common::{Header, Kept, KeptFacts, counter, kind, slot, slot_index};

use crate::maps::{self, global};

/// `BPF_F_MMAPABLE`: the agent maps the array and adopts slots without a system call.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Each slot's holder (`tcp_trace_common::slot`), apart from its facts: every recorded
/// transition may look here for a slot its socket holds, and 8 bytes a slot (128 KiB for
/// 16,384) stay in the CPU's cache where the facts' 104 would not. The agent sets the number
/// of slots (a power of two) at load, the same for both arrays.
#[map(name = "SOCKET_SLOT_HOLDERS")]
static HOLDERS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Each slot's facts, written only by whoever moved its holder to `BUSY`.
#[map(name = "SOCKET_SLOTS")]
static SLOTS: Array<Kept> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// `tcp_trace_common::globals::SLOT_MASK`, set by the agent before loading.
#[unsafe(no_mangle)]
static SLOT_MASK: u32 = u32::MAX;

/// A word of scratch per CPU; see [`number`].
#[map(name = "SLOT_SCRATCH")]
static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// How often a program tries a slot another program holds for a moment (an accept() writing
/// its owner, another CPU's transition) before it records without it.
const TRIES: usize = 8;

/// Whether the agent gave the programs slots.
#[inline(always)]
pub(crate) fn on() -> bool {
    global!(SLOT_MASK) != u32::MAX
}

/// The socket's address as a number: the verifier allows no arithmetic on the typed pointer
/// a BTF tracepoint passes, but a word read back from a map is a plain scalar.
#[inline(always)]
pub(crate) fn number(sock: u64) -> Option<u64> {
    let word = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's word of the map.
    unsafe {
        core::ptr::write_volatile(word, sock);
        Some(core::ptr::read_volatile(word))
    }
}

/// `*at = new` if `*at == old`, atomically; returns what `*at` held. BPF's CMPXCHG (BPF ISA
/// v3), written out: Rust's BPF target offers no compare-and-swap.
#[inline(always)]
pub(crate) unsafe fn cas(at: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({at} + 0, r0, {new})",
            at = in(reg) at,
            new = in(reg) new,
            inout("r0") r0,
        );
    }
    r0
}

/// A slot this program owns (its holder is `BUSY`) until [`Held::keep`] or [`Held::free`].
pub(crate) struct Held {
    holder: *mut u64,
    kept: *mut Kept,
    sock: u64,
}

impl Held {
    #[inline(always)]
    pub(crate) fn kept(&self) -> *mut Kept {
        self.kept
    }

    /// The socket holds the slot again, with the facts as written.
    #[inline(always)]
    pub(crate) fn keep(self) {
        barrier();
        // SAFETY: the slot is this program's; the facts are written before the holder.
        unsafe { core::ptr::write_volatile(self.holder, self.sock) };
    }

    /// The facts were taken: the slot is free for any socket.
    #[inline(always)]
    pub(crate) fn free(self) {
        barrier();
        unsafe { core::ptr::write_volatile(self.holder, slot::FREE) };
    }
}

/// Keeps the compiler from moving the facts' stores past the holder's (BPF has no fence
/// instruction; the CPU keeps stores in order on x86 and the kernel's BPF JITs' memory model).
#[inline(always)]
fn barrier() {
    // SAFETY: an empty assembly block, which may read and write memory as far as the compiler
    // knows.
    unsafe { core::arch::asm!("", options(nostack)) };
}

/// The socket's slot: its holder, and its facts.
#[inline(always)]
fn slot_of(sock: u64) -> Option<(*mut u64, *mut Kept)> {
    let index = slot_index(sock, global!(SLOT_MASK));
    Some((HOLDERS.get_ptr_mut(index)?, SLOTS.get_ptr_mut(index)?))
}

/// Claims the socket's slot for a new life, or counts it taken (the socket then goes without).
#[inline(always)]
pub(crate) fn claim(sock: u64) -> Option<Held> {
    let (holder, kept) = slot_of(sock)?;
    // SAFETY: an element of the array; a holder changes by compare-and-swap only.
    if unsafe { cas(holder, slot::FREE, slot::BUSY) } != slot::FREE {
        maps::count(counter::SLOT_TAKEN);
        return None;
    }
    Some(Held { holder, kept, sock })
}

/// The socket's slot, if the socket holds it: None when it holds none (or the agent adopted
/// its facts), and, counted, when another program kept it busy past a few tries.
#[inline(always)]
pub(crate) fn take(sock: u64) -> Option<Held> {
    let (holder, kept) = slot_of(sock)?;
    // Most sockets asked hold no slot (every socket, while every transition is recorded): a
    // plain load tells, without the locked instruction's cost.
    let now_held = unsafe { core::ptr::read_volatile(holder) };
    if now_held != sock && now_held != slot::BUSY {
        return None;
    }
    for _ in 0..TRIES {
        match unsafe { cas(holder, sock, slot::BUSY) } {
            s if s == sock => return Some(Held { holder, kept, sock }),
            slot::BUSY => continue,
            _ => return None,
        }
    }
    maps::count(counter::SLOT_CONTENDED);
    None
}

/// Hands the socket's kept facts on as a record of their own, if it holds its slot: before any
/// other record of the socket, which the agent applies to the connection they open.
#[inline(always)]
pub(crate) fn hand_on(sock: u64) {
    if !on() {
        return;
    }
    if let Some(sock) = number(sock) {
        hand_on_number(sock);
    }
}

/// [`hand_on`] for a socket address already made a number (slots on).
#[inline(always)]
pub(crate) fn hand_on_number(sock: u64) {
    let Some(held) = take(sock) else {
        return;
    };
    // SAFETY: the slot is this program's until `free`.
    let kept = unsafe { *held.kept() };
    held.free();
    let Some(mut entry) = maps::reserve::<KeptFacts>() else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    entry.write(KeptFacts {
        header: Header {
            kind: kind::KEPT,
            cpu: unsafe { bpf_get_smp_processor_id() },
            ts_ns: now,
            sock,
        },
        kept,
    });
    maps::submit(entry, now);
}
