//! Which context a transition runs in. `tcp_set_state()` runs in softirq for most of a
//! connection's life (a packet or a timer drives it), and there the current task is whoever was
//! interrupted: reporting it as the socket's process is the classic tcpaccept/tcpstates bug.
//! The `irq:softirq_entry`/`irq:softirq_exit` tracepoints bracket every softirq handler, including
//! those run by ksoftirqd, so a per-CPU slot between them says "in softirq" exactly.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::maps::SOFTIRQ;

/// `vec` in the softirq_entry/exit records (after the 8-byte common header).
const VEC_OFFSET: usize = 8;

#[tracepoint(category = "irq", name = "softirq_entry")]
pub fn softirq_entry(ctx: TracePointContext) -> u32 {
    let vec: u32 = unsafe { ctx.read_at(VEC_OFFSET) }.unwrap_or(u32::MAX - 1);
    set(vec.wrapping_add(1));
    0
}

#[tracepoint(category = "irq", name = "softirq_exit")]
pub fn softirq_exit(_ctx: TracePointContext) -> u32 {
    set(0);
    0
}

fn set(value: u32) {
    if let Some(slot) = SOFTIRQ.get_ptr_mut(0) {
        unsafe { *slot = value };
    }
}

/// The softirq vector + 1 this CPU is serving, or 0 in process context.
pub fn softirq() -> u32 {
    match SOFTIRQ.get_ptr(0) {
        Some(slot) => unsafe { *slot },
        None => 0,
    }
}
