//! Anonymous network namespaces for the workload: made by `unshare(CLONE_NEWNET)` on a throw-away
//! thread and held by an fd, so the kernel frees them (and every socket, TIME_WAIT included) when
//! the fd closes, even if the bench is killed: nothing to clean up, no name to collide with a test.
//!
//! The network namespace is per thread, so workload threads `setns` into it and the rest of the
//! process (the agent's clients, the main thread) stays in the host namespace.
use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    process::Command,
    thread,
};

use anyhow::{Context as _, Result, bail, ensure};

/// SIOCGIFFLAGS / SIOCSIFFLAGS from linux/sockios.h.
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;

pub struct Netns {
    fd: OwnedFd,
    /// `net->ns.inum`: what the agent reports as a connection's netns.
    pub inode: u64,
}

impl Netns {
    /// A new namespace with `lo` up, a wide ephemeral port range (the churn keeps tens of
    /// thousands of client ports in TIME_WAIT) and accept queues deep enough for the idle
    /// population, which is never accept()ed.
    pub fn new() -> Result<Netns> {
        let made = thread::Builder::new()
            .name("bench-netns".into())
            .spawn(|| -> Result<Netns> {
                // SAFETY: unshare only changes this thread's namespaces.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("unshare(CLONE_NEWNET) (the bench must run as root)");
                }
                let file = File::open("/proc/thread-self/ns/net")
                    .context("open /proc/thread-self/ns/net")?;
                let inode = file.metadata()?.ino();
                loopback_up()?;
                for (key, value) in [
                    ("ipv4/ip_local_port_range", "1024 65535"),
                    ("core/somaxconn", "65535"),
                    ("ipv4/tcp_max_syn_backlog", "65535"),
                ] {
                    let path = format!("/proc/sys/net/{key}");
                    std::fs::write(&path, value).with_context(|| format!("write {path}"))?;
                }
                Ok(Netns {
                    fd: file.into(),
                    inode,
                })
            })
            .context("spawn a thread for a new netns")?;
        match made.join() {
            Ok(result) => result,
            Err(_) => bail!("the netns thread panicked"),
        }
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> Result<()> {
        // SAFETY: setns only reads the fd, which `self` keeps open.
        if unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the bench netns");
        }
        Ok(())
    }

    /// A command whose process starts inside the namespace (a population holder, redis).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let ns_fd = self.fd.as_raw_fd();
        let mut cmd = Command::new(program);
        // SAFETY: only setns, an async-signal-safe system call, runs between fork and exec; the
        // namespace fd is inherited across fork (it is CLOEXEC, so it closes at exec).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a fresh thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name("bench-netns".into())
                .spawn_scoped(scope, || {
                    self.enter()?;
                    f()
                })
                .context("spawn a thread in the bench netns")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// The namespace's `Tcp:` counters from /proc/net/snmp.
    pub fn tcp_counters(&self) -> Result<TcpCounters> {
        self.run(|| {
            let text = std::fs::read_to_string("/proc/thread-self/net/snmp")
                .context("read /proc/thread-self/net/snmp")?;
            TcpCounters::parse(&text)
        })
    }

    /// A reader of the namespace's hashed TCP socket count (sockstat `inuse`). /proc/net files
    /// stay bound to the namespace they were opened in, so it can be read from any thread.
    pub fn sockets_in_use(&self) -> Result<SocketsInUse> {
        self.run(|| {
            let open = |name: &str| {
                let path = format!("/proc/thread-self/net/{name}");
                File::open(&path).with_context(|| format!("open {path}"))
            };
            Ok(SocketsInUse {
                files: [open("sockstat")?, open("sockstat6")?],
            })
        })
    }
}

/// The counters of /proc/net/snmp's `Tcp:` lines the bench compares events with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub active_opens: u64,
    pub passive_opens: u64,
    pub attempt_fails: u64,
    pub estab_resets: u64,
}

impl TcpCounters {
    fn parse(snmp: &str) -> Result<TcpCounters> {
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
            bail!("no Tcp: lines in /proc/net/snmp:\n{snmp}");
        };
        let pairs: Vec<(&str, &str)> = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .collect();
        let get = |name: &str| -> Result<u64> {
            let (_, value) = pairs
                .iter()
                .find(|(n, _)| *n == name)
                .with_context(|| format!("no Tcp:{name} in /proc/net/snmp"))?;
            value
                .parse()
                .with_context(|| format!("Tcp:{name} = {value:?}"))
        };
        Ok(TcpCounters {
            active_opens: get("ActiveOpens")?,
            passive_opens: get("PassiveOpens")?,
            attempt_fails: get("AttemptFails")?,
            estab_resets: get("EstabResets")?,
        })
    }

    pub fn since(&self, before: &TcpCounters) -> TcpCounters {
        TcpCounters {
            active_opens: self.active_opens - before.active_opens,
            passive_opens: self.passive_opens - before.passive_opens,
            attempt_fails: self.attempt_fails - before.attempt_fails,
            estab_resets: self.estab_resets - before.estab_resets,
        }
    }
}

/// Hashed (listening or connected, not TIME_WAIT) TCP sockets of one namespace.
pub struct SocketsInUse {
    files: [File; 2],
}

impl SocketsInUse {
    pub fn read(&mut self) -> Result<u64> {
        let mut total = 0;
        for file in &mut self.files {
            let mut text = String::new();
            file.seek(SeekFrom::Start(0))?;
            file.read_to_string(&mut text)?;
            let value = text
                .lines()
                .find(|l| l.starts_with("TCP: ") || l.starts_with("TCP6: "))
                .and_then(|l| l.split_whitespace().skip_while(|&f| f != "inuse").nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("no TCP inuse count in sockstat:\n{text}"))?;
            total += value;
        }
        Ok(total)
    }

    /// Waits until the count is `idle` again: every connection's last transition has run (the
    /// kernel unhashes a socket as it enters CLOSE or hands over to its TIME_WAIT stand-in).
    pub fn wait_for(&mut self, idle: u64, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let now = self.read()?;
            if now <= idle {
                return Ok(());
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{now} TCP sockets still in use {timeout:?} after the workload stopped (expected {idle})"
            );
            thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// `ip link set lo up` in the calling thread's namespace, by ioctl (no `ip` process needed).
fn loopback_up() -> Result<()> {
    // SAFETY: plain socket/ioctl calls on an ifreq we own; the fd is closed below.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error()).context("socket() for SIOCSIFFLAGS");
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(sock, SIOCGIFFLAGS as _, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(sock, SIOCSIFFLAGS as _, &mut req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(sock);
        if rc != 0 {
            return Err(err).context("bring lo up in the bench netns");
        }
    }
    Ok(())
}
