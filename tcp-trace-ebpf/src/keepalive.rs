//! Keepalive: configuration from setsockopt() (a cgroup setsockopt program), probes and dead
//! peers from the keepalive timer.
//!
//! fentry (EPERM at load) and kprobes (kernels built without them) are not available on the
//! target kernels. `timer:timer_expire_entry` fires for every kernel timer with the timer's function: for `tcp_keepalive_timer` the timer
//! is `&sk->sk_timer`. Comparing `icsk_probes_out` before (entry) and after (exit) the function
//! tells whether it sent a probe (it increments the count when it does), and a socket the timer
//! gives up on is closed inside it with sk_err = ETIMEDOUT, which the state program records.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, cgroup_sockopt, map, tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, SockoptContext, TracePointContext},
};
use tcp_trace_common::{Header, Keepalive, SocketOption, counter, kind, sockopt};

use crate::{
    fields::{field, load},
    kernel,
    maps::{self, offset},
    slots,
};

/// The keepalive timer running on this CPU, between entry and exit (timer callbacks do not
/// nest on a CPU).
#[derive(Clone, Copy)]
pub struct Running {
    sock: u64,
    netns: u32,
    probes_before: u32,
}

#[map(name = "KEEPALIVE_RUNNING")]
static RUNNING: PerCpuArray<Running> = PerCpuArray::with_max_entries(1, 0);

// Two program pairs for the one pair of hooks; the agent loads one. The BTF tracepoints have a
// recursion guard of their own; the classic ones share `bpf_prog_active` with every classic
// tracepoint and kprobe program on the host, so a timer that expires while another tracer's
// program runs on that CPU (softirqs run on the way out of an interrupt) is skipped. The agent
// falls back to the classic pair where the kernel or its BTF does not allow the first.

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn timer_expire_entry_btf(ctx: BtfTracePointContext) -> u32 {
    let timer: *const u8 = ctx.arg(0);
    let target = offset!(keepalive_timer_fn);
    // Every timer in the kernel comes here: leave at once for all but the keepalive timer.
    if target == 0 || load::<u64>(timer, offset!(timer_function)) != target {
        return 0;
    }
    entered(timer as u64);
    0
}

#[btf_tracepoint(function = "timer_expire_exit")]
pub fn timer_expire_exit_btf(ctx: BtfTracePointContext) -> u32 {
    exited(ctx.arg::<u64>(0));
    0
}

#[tracepoint(category = "timer", name = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: TracePointContext) -> u32 {
    let target = offset!(keepalive_timer_fn);
    if target == 0 || field::<u64>(&ctx, 24) != target {
        return 0;
    }
    entered(field(&ctx, 8));
    0
}

#[tracepoint(category = "timer", name = "timer_expire_exit")]
pub fn timer_expire_exit(ctx: TracePointContext) -> u32 {
    exited(field(&ctx, 8));
    0
}

/// The keepalive timer `timer` is about to run.
#[inline(always)]
fn entered(timer: u64) {
    let sock = timer.wrapping_sub(offset!(sk_timer) as u64);
    let Some(slot) = RUNNING.get_ptr_mut(0) else {
        return;
    };
    if unsafe { (*slot).sock } != 0 {
        maps::count(counter::KEEPALIVE_UNPAIRED);
    }
    // Namespace now: the socket may be freed by the time the timer function returns.
    let running = Running {
        sock,
        netns: kernel::netns_of_sock(sock),
        probes_before: u32::from(kernel::probes_out(sock)),
    };
    unsafe { *slot = running };
}

/// The timer `timer` has run: if it was the keepalive timer seen entering, record whether it
/// sent a probe.
#[inline(always)]
fn exited(timer: u64) {
    let Some(slot) = RUNNING.get_ptr_mut(0) else {
        return;
    };
    let running = unsafe { *slot };
    if running.sock == 0 {
        return;
    }
    unsafe { (*slot).sock = 0 };
    if timer.wrapping_sub(offset!(sk_timer) as u64) != running.sock {
        maps::count(counter::KEEPALIVE_UNPAIRED);
        return;
    }
    if !maps::netns_wanted(running.netns) {
        return;
    }
    slots::hand_on(running.sock);
    let Some(mut entry) = maps::reserve::<Keepalive>() else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    entry.write(Keepalive {
        header: Header {
            kind: kind::KEEPALIVE,
            cpu: unsafe { bpf_get_smp_processor_id() },
            ts_ns: now,
            sock: running.sock,
        },
        netns: running.netns,
        probes_before: running.probes_before as u8,
        probes_after: kernel::probes_out(running.sock),
        _reserved: 0,
    });
    maps::submit(entry, now);
}

/// Runs before the kernel applies a setsockopt(); always lets it through unchanged.
#[cgroup_sockopt(setsockopt)]
pub fn keepalive_setsockopt(ctx: SockoptContext) -> i32 {
    let _ = try_setsockopt(&ctx);
    1
}

fn try_setsockopt(ctx: &SockoptContext) -> Option<()> {
    let opt = unsafe { &*ctx.sockopt };
    let (level, optname) = (opt.level as u32, opt.optname as u32);
    let watched = match level {
        sockopt::SOL_SOCKET => optname == sockopt::SO_KEEPALIVE,
        sockopt::IPPROTO_TCP => matches!(
            optname,
            sockopt::TCP_KEEPIDLE | sockopt::TCP_KEEPINTVL | sockopt::TCP_KEEPCNT
        ),
        _ => false,
    };
    if !watched {
        return None;
    }
    let optval = unsafe { opt.__bindgen_anon_2.optval } as *const i32;
    let optval_end = unsafe { opt.__bindgen_anon_3.optval_end } as *const u8;
    if (optval as *const u8).wrapping_add(4) > optval_end {
        return None;
    }
    let value = unsafe { *optval };
    // The kernel's struct bpf_sockopt_kern starts with the `struct sock *`: read it as a plain
    // number (the verifier forbids arithmetic on the socket pointer itself).
    let sock: u64 = unsafe { bpf_probe_read_kernel(ctx.sockopt as *const u64) }.ok()?;
    let netns = kernel::netns_of_sock(sock);
    if !maps::netns_wanted(netns) {
        return None;
    }
    slots::hand_on(sock);
    let mut entry = maps::reserve::<SocketOption>()?;
    let now = unsafe { bpf_ktime_get_ns() };
    entry.write(SocketOption {
        header: Header {
            kind: kind::SOCKET_OPTION,
            cpu: unsafe { bpf_get_smp_processor_id() },
            ts_ns: now,
            sock,
        },
        netns,
        level,
        optname,
        value,
        pid_tgid: bpf_get_current_pid_tgid(),
        comm: bpf_get_current_comm().unwrap_or_default(),
    });
    maps::submit(entry, now);
    Some(())
}
