//! Reads from kernel structs at offsets the agent resolved from the running kernel's BTF (aya's
//! eBPF side has no CO-RE relocations). Reads from untyped addresses go through
//! bpf_probe_read_kernel, and loads from BTF-typed pointers are fault-safe loads: a stale
//! pointer yields 0, never a fault.
use aya_ebpf::helpers::bpf_probe_read_kernel;

use crate::{fields::load, maps::offset};

#[inline(always)]
pub fn read<T: Copy + Default>(addr: u64) -> T {
    unsafe { bpf_probe_read_kernel(addr as *const T) }.unwrap_or_default()
}

/// `net->ns.inum`.
#[inline(always)]
fn inum_of_net(net: u64) -> u32 {
    let inum_offset = offset!(inum);
    if net == 0 || inum_offset == 0 {
        return 0;
    }
    read(net + inum_offset as u64)
}

/// The network namespace inode of a socket (`sk->__sk_common.skc_net.net->ns.inum`). Request
/// sockets share `sock_common`, so this works for them too.
///
/// Two reads every time, no per-CPU cache of the last namespace: a program run in a system
/// call can be interrupted by a softirq whose programs read the same cache, and a cache entry
/// half written when the interrupt came would file that softirq's records under the wrong
/// namespace, where the `--netns` filter drops them uncounted.
#[inline(always)]
pub fn netns_of_sock(sock: u64) -> u32 {
    let net_offset = offset!(net);
    if sock == 0 || net_offset == 0 {
        return 0;
    }
    inum_of_net(read(sock + net_offset as u64))
}

/// The network namespace of a received packet, through its device (`skb->dev->nd_net.net`).
#[inline(always)]
pub fn netns_of_skb(skb: u64) -> u32 {
    let (dev_offset, net_offset) = (offset!(skb_dev), offset!(dev_net));
    if skb == 0 || dev_offset == 0 || net_offset == 0 {
        return 0;
    }
    let dev: u64 = read(skb + dev_offset as u64);
    if dev == 0 {
        return 0;
    }
    inum_of_net(read(dev + net_offset as u64))
}

/// `sk->sk_err`.
#[inline(always)]
pub fn sk_err(sock: u64) -> u32 {
    let offset = offset!(sk_err);
    if offset == 0 {
        return 0;
    }
    read::<i32>(sock + offset as u64) as u32
}

/// Whether a process holds the socket (`sk->sk_lock.owned`), so the transition runs in its system
/// call. True where the offset is unknown: the agent then trusts no task but connect()'s and
/// listen()'s.
#[inline(always)]
pub fn lock_owned(sock: u64) -> bool {
    let offset = offset!(sk_lock_owned);
    offset == 0 || read::<i32>(sock + offset as u64) != 0
}

/// Whether `sock` is a TCP socket (`sk->sk_protocol`); true where the offset is unknown.
#[inline(always)]
pub fn is_tcp(sock: u64) -> bool {
    let offset = offset!(sk_protocol);
    offset == 0 || read::<u16>(sock + offset as u64) == tcp_trace_common::IPPROTO_TCP
}

/// `inet_csk(sk)->icsk_probes_out`: keepalive probes sent and not answered.
#[inline(always)]
pub fn probes_out(sock: u64) -> u8 {
    let offset = offset!(probes_out);
    if offset == 0 {
        return 0;
    }
    read(sock + offset as u64)
}

/// `(tcp_sk(sk)->srtt_us >> 3, tcp_sk(sk)->total_retrans)`.
#[inline(always)]
pub fn rtt_and_retransmits(sock: u64) -> (u32, u32) {
    let (srtt, retrans) = (offset!(srtt), offset!(total_retrans));
    if srtt == 0 || retrans == 0 {
        return (0, 0);
    }
    (
        read::<u32>(sock + srtt as u64) >> 3,
        read(sock + retrans as u64),
    )
}

/// `(tcp_sk(sk)->bytes_acked, tcp_sk(sk)->bytes_received)`.
#[inline(always)]
pub fn bytes(sock: u64) -> (u64, u64) {
    let (acked, received) = (offset!(bytes_acked), offset!(bytes_received));
    if acked == 0 || received == 0 {
        return (0, 0);
    }
    (read(sock + acked as u64), read(sock + received as u64))
}

/// The `struct sock` behind file descriptor `fd` of the current task
/// (`current->files->fdt->fd[fd]->private_data->sk`), or 0. Only meaningful for socket fds:
/// the agent ignores socks it does not follow. The task, its files and fd table are BTF-typed
/// (plain loads); the fd array's element and what follows are read with probe reads (an
/// indexed element, and `void *private_data`, have no type the verifier can follow).
#[inline(always)]
pub fn sock_of_fd(fd: u64) -> u64 {
    let (task_files, files_fdt, fdt_max_fds, fdt_fd, file_private_data, socket_sk) = (
        offset!(task_files),
        offset!(files_fdt),
        offset!(fdt_max_fds),
        offset!(fdt_fd),
        offset!(file_private_data),
        offset!(socket_sk),
    );
    if task_files == 0 || files_fdt == 0 || fdt_fd == 0 || file_private_data == 0 || socket_sk == 0
    {
        return 0;
    }
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task_btf() } as *const u8;
    let files: *const u8 = load(task, task_files);
    let fdt: *const u8 = load(files, files_fdt);
    if fd >= u64::from(load::<u32>(fdt, fdt_max_fds)) {
        return 0;
    }
    let fds: u64 = load(fdt, fdt_fd);
    let file: u64 = if fds == 0 { 0 } else { read(fds + fd * 8) };
    let socket: u64 = if file == 0 {
        0
    } else {
        read(file + file_private_data as u64)
    };
    if socket == 0 {
        0
    } else {
        read(socket + socket_sk as u64)
    }
}
