//! The kernel's own list of TCP sockets, per network namespace, from sock_diag/inet_diag over
//! netlink (what `ss` reads), so the connection table can be healed against it after records
//! were lost.
//!
//! A netlink socket answers for the network namespace it was created in, so the socket for a
//! namespace is made on a short-lived thread that entered it (setns affects only the calling
//! thread). Each namespace's socket is kept for the next dump; it holds a reference to its
//! namespace, so sockets of namespaces that no longer show up are closed.
use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use crate::model::TcpState;

/// One socket as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSocket {
    pub netns: u32,
    pub state: TcpState,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's socket cookie (SO_COOKIE): unique for the kernel's life, never 0 once read.
    pub cookie: u64,
}

/// The sockets of some namespaces, and when the dump began and ended.
#[derive(Clone, Debug, Default)]
pub struct SocketList {
    /// CLOCK_MONOTONIC (the clock of bpf_ktime_get_ns) just before the first request.
    pub started_ns: u64,
    /// CLOCK_MONOTONIC just after the last reply. A socket missing from the list closed before
    /// this time, so the kernel recorded its CLOSE before it too.
    pub finished_ns: u64,
    /// Namespaces whose dump completed; only these are listed.
    pub netns: Vec<u32>,
    pub sockets: Vec<KernelSocket>,
}

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("network namespace {0} has no process and no /run/netns entry to enter it by")]
    NoPath(u32),
    #[error("entering network namespace {0} ({1}) failed: {2}")]
    Enter(u32, PathBuf, io::Error),
    #[error("sock_diag netlink socket: {0}")]
    Socket(io::Error),
    #[error("sock_diag dump in network namespace {0}: {1}")]
    Dump(u32, io::Error),
}

/// The states the table follows: what TIME_WAIT, request (SYN_RECV) and bound-only sockets
/// are not. Dumping only these also keeps a mass close's TIME_WAIT sockets out of the cost.
pub const DUMPED_STATES: [TcpState; 8] = [
    TcpState::Established,
    TcpState::SynSent,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Listen,
    TcpState::Closing,
];

/// Most namespaces whose netlink socket is kept between dumps; beyond it, one is opened per dump.
const MAX_CACHED: usize = 256;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The older request the kernel keeps beside SOCK_DIAG_BY_FAMILY: it dumps both families in
/// one walk of the socket hash (family AF_UNSPEC), where SOCK_DIAG_BY_FAMILY walks the whole
/// hash once per family. Every namespace's dump walks every namespace's sockets, TIME_WAIT
/// included, so the walks are most of a list's cost.
const TCPDIAG_GETSOCK: u16 = 18;

/// `struct inet_diag_sockid` (linux/inet_diag.h): ports and addresses in network order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_req`, TCPDIAG_GETSOCK's request.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CompatRequest {
    family: u8,
    src_len: u8,
    dst_len: u8,
    ext: u8,
    id: SockId,
    states: u32,
    dbs: u32,
}

/// `struct inet_diag_msg`, the start of each answer.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
struct Message<R> {
    header: libc::nlmsghdr,
    request: R,
}

/// Lists TCP sockets per namespace, keeping a netlink socket per namespace between dumps.
#[derive(Default)]
pub struct SockDiag {
    sockets: HashMap<u32, OwnedFd>,
    buf: Vec<u8>,
    seq: u32,
    /// The kernel refused TCPDIAG_GETSOCK: each family is dumped on its own.
    per_family: bool,
}

impl SockDiag {
    /// Dumps the TCP sockets of `only` (the agent's --netns), or of every namespace a process
    /// or /run/netns holds. A namespace that cannot be dumped is left out of the list (and
    /// named in the returned errors).
    pub fn list(&mut self, only: Option<u32>) -> (SocketList, Vec<SockDiagError>) {
        let namespaces = namespaces(only);
        let wanted: Vec<u32> = match only {
            Some(ns) => vec![ns],
            None => namespaces.keys().copied().collect(),
        };
        self.list_in(&wanted, Some(&namespaces), state_mask(&DUMPED_STATES))
    }

    /// Dumps the TCP sockets of the namespaces `netns` that are in one of `states`. The kernel
    /// filters by state as it walks its socket hash, so sockets in other states cost no answer:
    /// a dump of a few states stays cheap among many established sockets. Namespaces are
    /// looked up (a walk of /proc) only when one has no socket kept from an earlier dump.
    pub fn list_states(
        &mut self,
        netns: &[u32],
        states: &[TcpState],
    ) -> (SocketList, Vec<SockDiagError>) {
        let known = netns.iter().all(|ns| self.sockets.contains_key(ns));
        let only = match netns {
            [ns] => Some(*ns),
            _ => None,
        };
        let namespaces = (!known).then(|| namespaces(only));
        self.list_in(netns, namespaces.as_ref(), state_mask(states))
    }

    fn list_in(
        &mut self,
        wanted: &[u32],
        namespaces: Option<&HashMap<u32, PathBuf>>,
        states: u32,
    ) -> (SocketList, Vec<SockDiagError>) {
        // Sockets of namespaces gone from view (or no longer asked for): closing them lets the
        // namespace go.
        self.sockets.retain(|ns, _| wanted.contains(ns));
        let mut list = SocketList {
            started_ns: monotonic_ns(),
            ..SocketList::default()
        };
        let mut errors = Vec::new();
        for &ns in wanted {
            let before = list.sockets.len();
            let path = namespaces.and_then(|n| n.get(&ns));
            match self.dump_namespace(ns, path, states, &mut list.sockets) {
                Ok(()) => list.netns.push(ns),
                Err(err) => {
                    list.sockets.truncate(before);
                    self.sockets.remove(&ns);
                    errors.push(err);
                }
            }
        }
        list.finished_ns = monotonic_ns();
        (list, errors)
    }

    fn dump_namespace(
        &mut self,
        ns: u32,
        path: Option<&PathBuf>,
        states: u32,
        out: &mut Vec<KernelSocket>,
    ) -> Result<(), SockDiagError> {
        let fd = match self.sockets.remove(&ns) {
            Some(fd) => fd,
            None => open_in(ns, path.ok_or(SockDiagError::NoPath(ns))?)?,
        };
        let before = out.len();
        let one_walk = !self.per_family
            && match self.dump(&fd, ns, TCPDIAG_GETSOCK, both_families(states), out) {
                Ok(()) => true,
                Err(err) => {
                    // A kernel without the older request refuses it: per family from now on.
                    // Any other failure (a signal, memory) is this list's only.
                    self.per_family = refused(&err);
                    tracing::debug!(
                        "one walk for both families failed ({err}); per family{}",
                        if self.per_family {
                            " from now on"
                        } else {
                            " this time"
                        }
                    );
                    false
                }
            };
        let result = if one_walk {
            Ok(())
        } else {
            out.truncate(before);
            [libc::AF_INET, libc::AF_INET6]
                .into_iter()
                .try_for_each(|family| {
                    let request = one_family(family as u8, states);
                    self.dump(&fd, ns, SOCK_DIAG_BY_FAMILY, request, out)
                })
                .map_err(|err| SockDiagError::Dump(ns, err))
        };
        if result.is_ok() && self.sockets.len() < MAX_CACHED {
            self.sockets.insert(ns, fd);
        }
        result
    }

    /// One dump of TCP sockets: `request` of netlink type `kind` (the kernel answers with
    /// messages of the same type).
    fn dump<R: Copy>(
        &mut self,
        fd: &OwnedFd,
        netns: u32,
        kind: u16,
        request: R,
        out: &mut Vec<KernelSocket>,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let message = Message {
            header: libc::nlmsghdr {
                nlmsg_len: std::mem::size_of::<Message<R>>() as u32,
                nlmsg_type: kind,
                nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
                nlmsg_seq: self.seq,
                nlmsg_pid: 0,
            },
            request,
        };
        // SAFETY: sends the bytes of a plain repr(C) value on a socket we own.
        let sent = unsafe {
            libc::send(
                fd.as_raw_fd(),
                (&raw const message).cast(),
                std::mem::size_of::<Message<R>>(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel fills each read with as many answers as fit (about 32 KiB by default).
        self.buf.resize(64 << 10, 0);
        loop {
            // SAFETY: reads into a buffer of the length given.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let n = n as usize;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if parse(&self.buf[..n], self.seq, kind, netns, out)? {
                return Ok(());
            }
        }
    }
}

/// TCPDIAG_GETSOCK's request for the TCP sockets of both families in `states`.
/// The kernel's answer to a request type it does not handle: `sock_diag` without the
/// compatibility handler (`inet_diag` built without it, or its module absent) says EOPNOTSUPP;
/// an unknown type, EINVAL.
fn refused(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
    )
}

fn both_families(states: u32) -> CompatRequest {
    CompatRequest {
        family: libc::AF_UNSPEC as u8,
        states,
        ..CompatRequest::default()
    }
}

/// SOCK_DIAG_BY_FAMILY's request for `family`'s TCP sockets in `states`.
fn one_family(family: u8, states: u32) -> Request {
    Request {
        family,
        protocol: libc::IPPROTO_TCP as u8,
        states,
        ..Request::default()
    }
}

/// The kernel's bitmask of `states` (bit n for state n, as `inet_diag_req_v2.idiag_states`).
fn state_mask(states: &[TcpState]) -> u32 {
    states
        .iter()
        .fold(0, |mask, &state| mask | 1 << state as u32)
}

/// Parses one read's netlink messages into `out`; true once the dump is done.
fn parse(
    mut buf: &[u8],
    seq: u32,
    kind: u16,
    netns: u32,
    out: &mut Vec<KernelSocket>,
) -> io::Result<bool> {
    const HEADER: usize = std::mem::size_of::<libc::nlmsghdr>();
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer");
    while buf.len() >= HEADER {
        // SAFETY: HEADER bytes are there; read_unaligned takes any alignment.
        let header: libc::nlmsghdr = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        let len = header.nlmsg_len as usize;
        if len < HEADER || len > buf.len() {
            return Err(malformed());
        }
        let body = &buf[HEADER..len];
        // Messages are padded to 4 bytes.
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        if header.nlmsg_seq != seq {
            continue;
        }
        match i32::from(header.nlmsg_type) {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                return Err(io::Error::from_raw_os_error(-errno));
            }
            _ if header.nlmsg_type == kind => {
                if body.len() < std::mem::size_of::<DiagMsg>() {
                    return Err(malformed());
                }
                // SAFETY: a DiagMsg's bytes are there; any bit pattern is a valid DiagMsg.
                let msg: DiagMsg = unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) };
                if let Some(socket) = kernel_socket(&msg, netns) {
                    out.push(socket);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

fn kernel_socket(msg: &DiagMsg, netns: u32) -> Option<KernelSocket> {
    let ip = |bytes: &[u8; 16]| -> Option<IpAddr> {
        match i32::from(msg.family) {
            libc::AF_INET => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()),
            libc::AF_INET6 => Some(Ipv6Addr::from(*bytes).into()),
            _ => None,
        }
    };
    let id = &msg.id;
    Some(KernelSocket {
        netns,
        state: TcpState::from_kernel(msg.state)?,
        local: SocketAddr::new(ip(&id.src)?, u16::from_be_bytes(id.sport)),
        remote: SocketAddr::new(ip(&id.dst)?, u16::from_be_bytes(id.dport)),
        cookie: u64::from(id.cookie[0]) | u64::from(id.cookie[1]) << 32,
    })
}

/// A sock_diag socket in namespace `ns`, entered through `path` (an nsfs file).
fn open_in(ns: u32, path: &Path) -> Result<OwnedFd, SockDiagError> {
    let enter_error = |err| SockDiagError::Enter(ns, path.to_owned(), err);
    if own_namespace() == Some(ns) {
        return open_socket().map_err(SockDiagError::Socket);
    }
    let file = std::fs::File::open(path).map_err(enter_error)?;
    let opened = std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; setns only changes this short-lived thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(Err(io::Error::last_os_error()));
        }
        open_socket().map_err(Ok)
    })
    .join()
    .unwrap_or_else(|_| Err(Err(io::Error::other("the thread entering it panicked"))));
    opened.map_err(|err| match err {
        Err(setns) => enter_error(setns),
        Ok(socket) => SockDiagError::Socket(socket),
    })
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn own_namespace() -> Option<u32> {
    nsfs_inode(Path::new("/proc/thread-self/ns/net"))
}

fn nsfs_inode(path: &Path) -> Option<u32> {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| u32::try_from(m.ino()).ok())
}

/// Network namespaces by inode, each with a path to enter it by: /run/netns entries (`ip netns`),
/// then processes. With `only`, stops once that one is found.
fn namespaces(only: Option<u32>) -> HashMap<u32, PathBuf> {
    let mut found = HashMap::new();
    let mut seen_pids = HashSet::new();
    let bind_mounts = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path());
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            seen_pids.insert(pid).then(|| entry.path().join("ns/net"))
        });
    for path in bind_mounts.chain(processes) {
        let Some(ns) = nsfs_inode(&path) else {
            continue;
        };
        found.entry(ns).or_insert(path);
        if only == Some(ns) {
            break;
        }
    }
    found
}

pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_answer_have_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<SockId>(), 48);
        assert_eq!(std::mem::size_of::<Request>(), 56);
        assert_eq!(std::mem::size_of::<DiagMsg>(), 72);
        assert_eq!(std::mem::size_of::<Message<Request>>(), 72);
        assert_eq!(std::mem::size_of::<CompatRequest>(), 60);
        assert_eq!(std::mem::size_of::<Message<CompatRequest>>(), 76);
    }

    #[test]
    fn only_a_refusal_of_the_one_walk_request_makes_lists_per_family_for_good() {
        let error = |errno| io::Error::from_raw_os_error(errno);
        assert!(refused(&error(libc::EOPNOTSUPP)) && refused(&error(libc::EINVAL)));
        assert!(!refused(&error(libc::EINTR)) && !refused(&error(libc::ENOBUFS)));
        assert!(!refused(&io::Error::from(io::ErrorKind::InvalidData)));
    }

    #[test]
    fn one_walk_lists_both_families_as_one_dump_per_family_does() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let ours = [v4.local_addr().unwrap(), v6.local_addr().unwrap()];
        let ns = own_namespace().unwrap();
        let listed = |diag: &mut SockDiag| {
            let (list, errors) = diag.list_states(&[ns], &[TcpState::Listen]);
            assert!(errors.is_empty(), "{:?}", errors.len());
            let mut found: Vec<_> = list
                .sockets
                .iter()
                .filter(|s| ours.contains(&s.local))
                .map(|s| (s.local, s.state, s.cookie))
                .collect();
            found.sort();
            found
        };
        let mut one_walk = SockDiag::default();
        let found = listed(&mut one_walk);
        assert!(!one_walk.per_family, "the kernel refused TCPDIAG_GETSOCK");
        assert_eq!(found.len(), 2, "{found:?}");
        let mut per_family = SockDiag {
            per_family: true,
            ..SockDiag::default()
        };
        assert_eq!(listed(&mut per_family), found);
    }

    #[test]
    fn an_answer_becomes_a_socket_with_host_order_ports_and_the_cookie() {
        let mut msg = DiagMsg {
            family: libc::AF_INET as u8,
            state: 10,
            ..DiagMsg::default()
        };
        msg.id.sport = 8080u16.to_be_bytes();
        msg.id.src[..4].copy_from_slice(&[127, 0, 0, 1]);
        msg.id.cookie = [7, 1];
        let s = kernel_socket(&msg, 9).unwrap();
        assert_eq!(s.state, TcpState::Listen);
        assert_eq!(s.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.remote, "0.0.0.0:0".parse().unwrap());
        assert_eq!(s.cookie, (1 << 32) | 7);
    }
}
