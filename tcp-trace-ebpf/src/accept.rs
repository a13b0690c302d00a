//! Who accepted a passive connection. The passive open itself runs in softirq (no process is
//! current), but accept() returns the socket in the acceptor's own context: at
//! `syscalls:sys_exit_accept4` the returned fd leads to the socket.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tcp_trace_common::{Accept, Header, kept, kind};

use crate::{fields::field, kernel, maps, slots};

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx);
    0
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) {
    // `long ret` after `int __syscall_nr` (and padding): the new fd, or -errno.
    let fd: i64 = field(ctx, 16);
    if fd < 0 {
        return;
    }
    // Every accept() on the host comes here: Unix and other sockets stop at the protocol.
    let sock = kernel::sock_of_fd(fd as u64);
    if sock == 0 || !kernel::is_tcp(sock) {
        return;
    }
    let netns = kernel::netns_of_sock(sock);
    if !maps::netns_wanted(netns) {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    // A socket that keeps its open in a slot keeps its owner there too: no record.
    if slots::on()
        && let Some(held) = slots::take(sock)
    {
        // SAFETY: the slot is this program's until `keep`.
        unsafe {
            let kept = held.kept();
            (*kept).have |= kept::OWNER | kept::ACCEPTED;
            (*kept).owner_ns = now;
            (*kept).pid_tgid = bpf_get_current_pid_tgid();
            (*kept).comm = bpf_get_current_comm().unwrap_or_default();
        }
        held.keep();
        return;
    }
    let Some(mut entry) = maps::reserve::<Accept>() else {
        return;
    };
    entry.write(Accept {
        header: Header {
            kind: kind::ACCEPT,
            cpu: unsafe { bpf_get_smp_processor_id() },
            ts_ns: now,
            sock,
        },
        netns,
        _reserved: 0,
        pid_tgid: bpf_get_current_pid_tgid(),
        comm: bpf_get_current_comm().unwrap_or_default(),
    });
    maps::submit(entry, now);
}
