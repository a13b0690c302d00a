//! What tcp-trace's privileged integration tests (`tcp-trace/tests`) and its benchmark
//! (`tcp-trace/bench`) share, in the manner of aya's integration-test crate: network namespaces
//! and the kernel's own counters in them, real agents ([`agent`] in-process, [`process`] as a
//! child process), test certificates ([`pki`]). They run as root, tests in parallel threads, on
//! one kernel shared with everything else on the machine.
//!
//! Isolation is the point: every test makes its own network namespace(s), and traffic only flows on
//! loopback inside them or over veth pairs between namespaces the test made, with documentation
//! addresses (198.51.100.0/24, 2001:db8::/32). The kernel keeps TCP counters and socket tables per
//! network namespace, so a test can compare what the tracer saw with exact kernel numbers even while
//! other tests run.
//!
//! Everything but [`process`] panics with context instead of returning errors, so a failure keeps
//! its backtrace.
//!
//! ```ignore
//! let ns = NetNs::new("opens");
//! let before = ns.snmp();
//! let trips = roundtrips(&ns, "127.0.0.1".parse().unwrap(), 10);
//! assert_eq!(ns.snmp().delta(&before).get("Tcp:ActiveOpens"), 10);
//! ```
pub mod agent;
pub mod hidden;
pub mod pki;
pub mod process;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::{fs::MetadataExt, process::CommandExt};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Longest any single step of a workload may block before the test fails instead of hanging.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Name prefix of every namespace these helpers make; also how stale ones are recognised.
const PREFIX: &str = "tcpt-";

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// `ip netns add` mounts /run/netns on first use; two of them racing on a fresh machine can stack
/// two mounts there and hide each other's namespaces. Serialising add/del in-process avoids that.
static IP_NETNS: Mutex<()> = Mutex::new(());

static STALE_REMOVED: Once = Once::new();

/// A network namespace owned by one test, deleted on drop (also when the test panics). Deleting it
/// removes every interface, address and nft rule inside; sockets still open keep the kernel object
/// alive until they close, but the name is gone at once.
pub struct NetNs {
    name: String,
    /// Open handle on /run/netns/<name>: what `setns(2)` needs, and it pins the namespace.
    fd: File,
}

impl NetNs {
    /// Creates `tcpt-<tag>-<pid>-<n>` with `lo` up (so 127.0.0.1 and ::1 work inside).
    pub fn new(tag: &str) -> NetNs {
        assert!(
            !tag.is_empty() && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "namespace tag {tag:?}: use letters, digits and _ only"
        );
        let name = format!(
            "{PREFIX}{tag}-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        {
            let _guard = IP_NETNS.lock().unwrap_or_else(|e| e.into_inner());
            STALE_REMOVED.call_once(remove_stale_namespaces);
            ip(&["netns", "add", &name]);
        }
        let path = format!("/run/netns/{name}");
        let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let ns = NetNs { name, fd };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace inode: what `stat -L -c %i /proc/<pid>/ns/net` prints inside, and what the
    /// kernel stores as `net->ns.inum` (the tracer's namespace id).
    pub fn inode(&self) -> u64 {
        self.fd
            .metadata()
            .unwrap_or_else(|e| panic!("fstat netns {}: {e}", self.name))
            .ino()
    }

    /// Moves the calling thread (only it: the network namespace is per thread) into the
    /// namespace, for threads a caller spawns itself (e.g. scoped workers).
    pub fn enter(&self) {
        enter(&self.fd, &self.name);
    }

    /// A command whose process starts inside the namespace without `ip netns exec` (which
    /// mounts a sysfs of its own and hides the host's cgroup tree).
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

    /// Writes `/proc/sys/net/<key>` inside the namespace (per-namespace sysctls such as
    /// `ipv4/ip_local_port_range`).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/net/{key}");
        self.run(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("write {value:?} to {path} in {}: {e}", self.name));
    }

    /// Runs `f` on a fresh thread that joined this namespace, and returns its result (a panic in `f`
    /// is re-raised here). The network namespace is per thread, and a socket stays in the namespace
    /// it was created in, so sockets made by `f` can be returned and used from any thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(self.name.clone())
                .spawn_scoped(scope, || {
                    enter(&self.fd, &self.name);
                    f()
                })
                .unwrap_or_else(|e| panic!("spawn thread for {}: {e}", self.name));
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`NetNs::run`] but returns at once, for a server and a client that run concurrently.
    /// The thread holds its own handle on the namespace, so it may outlive this `NetNs`.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let fd = self
            .fd
            .try_clone()
            .unwrap_or_else(|e| panic!("dup netns fd: {e}"));
        let name = self.name.clone();
        thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                enter(&fd, &name);
                f()
            })
            .unwrap_or_else(|e| panic!("spawn thread for {}: {e}", self.name))
    }

    /// Runs a command inside the namespace (`ip netns exec`), e.g. `nft` or `sysctl -w`, panics
    /// with its stderr if it fails, and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// The namespace's own TCP/IP counters (`/proc/net/snmp` and `/proc/net/netstat` as seen from a
    /// thread inside it: `/proc/self/net` would show the main thread's namespace instead).
    pub fn snmp(&self) -> Counters {
        self.run(|| {
            let mut counters = Counters::default();
            for file in ["snmp", "netstat"] {
                counters.parse(&read_proc(&format!("/proc/thread-self/net/{file}")));
            }
            counters
        })
    }

    /// Connects `a` and `b` with a veth pair: a gets 198.51.100.1/24 and 2001:db8::1/64, b gets .2 and
    /// ::2. One pair per two namespaces (the addresses are fixed). Both ends are made directly inside
    /// their namespaces, so the device names never meet in the host namespace; the pair goes away
    /// with either namespace.
    pub fn veth_pair(a: &NetNs, b: &NetNs) -> VethPair {
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // Interface names are limited to 15 bytes (IFNAMSIZ - 1).
        let pair = VethPair {
            a_dev: format!("tcpt{n}a"),
            b_dev: format!("tcpt{n}b"),
            a_v4: Ipv4Addr::new(198, 51, 100, 1).into(),
            b_v4: Ipv4Addr::new(198, 51, 100, 2).into(),
            a_v6: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
            b_v6: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2).into(),
        };
        let (a_dev, b_dev) = (&pair.a_dev, &pair.b_dev);
        ip_words(&format!(
            "link add name {a_dev} netns {} type veth peer name {b_dev} netns {}",
            a.name, b.name
        ));
        for (ns, dev, v4, v6) in [
            (a, a_dev, pair.a_v4, pair.a_v6),
            (b, b_dev, pair.b_v4, pair.b_v6),
        ] {
            ip_words(&format!("-n {} addr add {v4}/24 dev {dev}", ns.name));
            // nodad: without it the address stays "tentative" (unusable) for about a second.
            ip_words(&format!("-n {} addr add {v6}/64 dev {dev} nodad", ns.name));
            ip_words(&format!("-n {} link set {dev} up", ns.name));
        }
        pair
    }

    /// The TCP sockets of this namespace as (local port, remote port, state), from
    /// `/proc/net/tcp` and `/proc/net/tcp6` (state numbers as in `include/net/tcp_states.h`).
    /// For assertions, not loops: each read walks the host's whole connection hash table.
    pub fn tcp_sockets(&self) -> Vec<(u16, u16, u8)> {
        self.run(|| {
            let mut sockets = Vec::new();
            for file in ["tcp", "tcp6"] {
                let text = read_proc(&format!("/proc/thread-self/net/{file}"));
                sockets.extend(text.lines().skip(1).map(parse_tcp_line));
            }
            sockets
        })
    }

    /// A reader of this namespace's count of hashed TCP sockets (see [`TcpInUse`]).
    pub fn tcp_in_use(&self) -> TcpInUse {
        self.run(|| TcpInUse {
            files: ["sockstat", "sockstat6"].map(|file| {
                let path = format!("/proc/thread-self/net/{file}");
                File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"))
            }),
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _guard = IP_NETNS.lock().unwrap_or_else(|e| e.into_inner());
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let failed = match &out {
            Ok(out) if out.status.success() => return,
            Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        // A second panic while unwinding would abort and hide the first failure.
        if thread::panicking() {
            eprintln!("ip netns del {}: {failed}", self.name);
        } else {
            panic!("ip netns del {}: {failed}", self.name);
        }
    }
}

/// The two ends of a veth pair made by [`NetNs::veth_pair`]: device names and addresses.
#[derive(Debug, Clone)]
pub struct VethPair {
    pub a_dev: String,
    pub b_dev: String,
    pub a_v4: IpAddr,
    pub b_v4: IpAddr,
    pub a_v6: IpAddr,
    pub b_v6: IpAddr,
}

/// Kernel counters keyed like `Tcp:ActiveOpens` or `TcpExt:TCPKeepAlive`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters(pub BTreeMap<String, i64>);

impl Counters {
    /// Panics naming the key (and the keys its group does have) if the kernel does not have it.
    pub fn get(&self, key: &str) -> i64 {
        match self.0.get(key) {
            Some(value) => *value,
            None => {
                let group = key.split(':').next().unwrap_or(key);
                let known: Vec<_> = self
                    .0
                    .keys()
                    .filter(|k| k.starts_with(&format!("{group}:")))
                    .collect();
                panic!("no kernel counter {key:?}; {group} has: {known:?}")
            }
        }
    }

    /// `self - before` for every key, e.g. `ns.snmp().delta(&before).get("Tcp:ActiveOpens")`.
    pub fn delta(&self, before: &Counters) -> Counters {
        let delta = self
            .0
            .iter()
            .map(|(key, now)| (key.clone(), now - before.0.get(key).copied().unwrap_or(0)));
        Counters(delta.collect())
    }

    /// Both files are pairs of lines: `Tcp: RtoAlgorithm RtoMin ...` then `Tcp: 1 200 ...`.
    fn parse(&mut self, text: &str) {
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [header, values] = pair else {
                panic!("odd line count in:\n{text}")
            };
            let (group, names) = header.split_once(':').expect("`Group:` header");
            let (_, values) = values.split_once(':').expect("`Group:` values");
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                let value = value
                    .parse()
                    .unwrap_or_else(|e| panic!("{group}:{name}={value}: {e}"));
                self.0.insert(format!("{group}:{name}"), value);
            }
        }
    }
}

/// One connection made by [`roundtrips`]: the client's and the server's address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roundtrip {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// Which side calls `close()` first (does the active close, and ends up in TIME_WAIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstCloser {
    Client,
    Server,
}

/// `n` sequential connections to a listener on `addr:0` in `ns`: connect, client sends 1 byte,
/// server reads it and answers 1 byte, client reads it, client closes, server reads EOF and closes.
/// Each connection is fully closed (see [`roundtrips_between`]) before the next one starts.
pub fn roundtrips(ns: &NetNs, addr: IpAddr, n: usize) -> Vec<Roundtrip> {
    roundtrips_between(ns, ns, addr, n, FirstCloser::Client)
}

/// As [`roundtrips`], but the server closes right after answering; the client reads the byte, then
/// EOF, then closes.
pub fn roundtrips_server_closes_first(ns: &NetNs, addr: IpAddr, n: usize) -> Vec<Roundtrip> {
    roundtrips_between(ns, ns, addr, n, FirstCloser::Server)
}

/// The general form: client sockets in `client_ns`, the listener on `addr:0` in `server_ns` (the
/// same namespace, or two joined by a veth pair).
///
/// Everything runs on one thread, in a fixed order, so each connection's state transitions happen
/// in the same sequence every time. After both `close()` calls it waits until the namespaces hold
/// as many hashed TCP sockets as before the connection: on loopback the last ACK is usually handled
/// before `close()` returns, but softirq work may be deferred to ksoftirqd, and the next connection
/// must not overlap this one's last transition. That count is per namespace, so nothing else may
/// open or close TCP sockets in these namespaces meanwhile (use a namespace per workload).
pub fn roundtrips_between(
    client_ns: &NetNs,
    server_ns: &NetNs,
    addr: IpAddr,
    n: usize,
    first: FirstCloser,
) -> Vec<Roundtrip> {
    roundtrips_hopping(client_ns, server_ns, addr, n, first, &mut || {})
}

/// As [`roundtrips`], but each step of a connection runs on another CPU than the step before
/// (connect, then accept and the exchange, then the first close, then the second, alternating
/// between two CPUs and starting on the other one for each connection), so that its transitions
/// are recorded on different CPUs. Panics on a machine with fewer than two CPUs.
pub fn roundtrips_across_cpus(ns: &NetNs, addr: IpAddr, n: usize) -> Vec<Roundtrip> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls get valid pointers to it.
    let allowed: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    };
    assert!(
        allowed.len() >= 2,
        "this needs two CPUs; the thread may run on {allowed:?}"
    );
    let (a, b) = (allowed[0], allowed[1]);
    let mut step = 0usize;
    // The connections run on a thread of their own (`NetNs::run`), which alone is moved.
    roundtrips_hopping(ns, ns, addr, n, FirstCloser::Client, &mut || {
        step += 1;
        pin_to(if step.is_multiple_of(2) { a } else { b });
    })
}

/// Moves the calling thread to `cpu` (and waits until it runs there).
fn pin_to(cpu: usize) {
    // SAFETY: a set holding one CPU, passed by valid pointer, for the calling thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity({cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
}

fn roundtrips_hopping(
    client_ns: &NetNs,
    server_ns: &NetNs,
    addr: IpAddr,
    n: usize,
    first: FirstCloser,
    hop: &mut (dyn FnMut() + Send),
) -> Vec<Roundtrip> {
    let listener = server_ns.run(|| {
        TcpListener::bind((addr, 0))
            .unwrap_or_else(|e| panic!("bind {addr}:0 in {}: {e}", server_ns.name))
    });
    let server = listener.local_addr().expect("listener address");
    let mut in_use = vec![server_ns.tcp_in_use()];
    if client_ns.name != server_ns.name {
        in_use.push(client_ns.tcp_in_use());
    }
    let idle: Vec<i64> = in_use.iter_mut().map(TcpInUse::read).collect();
    client_ns.run(|| {
        (0..n)
            .map(|i| {
                let trip = roundtrip(&listener, server, first, hop).unwrap_or_else(|e| {
                    panic!("connection {i} of {n} to {server} ({first:?} closes first): {e}")
                });
                wait_until_closed(&mut in_use, &idle, trip);
                trip
            })
            .collect()
    })
}

/// One connection's life; the caller's thread must be in the client's namespace.
fn roundtrip(
    listener: &TcpListener,
    server: SocketAddr,
    first: FirstCloser,
    hop: &mut (dyn FnMut() + Send),
) -> std::io::Result<Roundtrip> {
    hop();
    let mut client = TcpStream::connect_timeout(&server, STEP_TIMEOUT)?;
    client.set_read_timeout(Some(STEP_TIMEOUT))?;
    hop();
    // The handshake is complete once connect() returns, so accept() does not wait for the client.
    let (mut accepted, peer) = listener.accept()?;
    accepted.set_read_timeout(Some(STEP_TIMEOUT))?;
    let trip = Roundtrip {
        client: client.local_addr()?,
        server,
    };
    assert_eq!(peer, trip.client, "accepted a connection that is not ours");

    let mut byte = [0u8; 1];
    client.write_all(b"q")?;
    accepted.read_exact(&mut byte)?;
    accepted.write_all(b"a")?;
    client.read_exact(&mut byte)?;
    // Each side only closes with nothing unread, otherwise close() sends a RST instead of a FIN.
    let (first, mut second) = match first {
        FirstCloser::Client => (client, accepted),
        FirstCloser::Server => (accepted, client),
    };
    hop();
    drop(first);
    hop();
    let eof = second.read(&mut byte)?;
    assert_eq!(eof, 0, "expected EOF after the peer closed");
    drop(second);
    Ok(trip)
}

/// Waits until every namespace is back to its idle count of hashed TCP sockets. The kernel unhashes
/// a socket as it enters CLOSE (LAST_ACK -> CLOSE), or as its TIME_WAIT stand-in replaces it
/// (FIN_WAIT2 -> TIME_WAIT), so this is the end of the connection's last transition, give or take
/// the few instructions between the unhash and the state tracepoint in the same kernel function.
fn wait_until_closed(in_use: &mut [TcpInUse], idle: &[i64], trip: Roundtrip) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    for (counter, &idle) in in_use.iter_mut().zip(idle) {
        if let Err(now) = counter.wait_for(idle, deadline) {
            panic!(
                "{trip:?} not closed: {now} TCP sockets in use, {idle} when idle \
                 (is something else using TCP in this namespace?)"
            );
        }
    }
}

/// The number of hashed (listening or connected, not TIME_WAIT) TCP sockets of one namespace, from
/// the `inuse` fields of `/proc/net/sockstat{,6}`. The kernel keeps these per namespace, so reading
/// them is cheap, unlike `/proc/net/tcp`, which walks the whole host's connection hash table
/// on every read. A /proc/net file stays bound to the namespace it was opened in,
/// so the files are opened once inside and then re-read from any thread.
pub struct TcpInUse {
    files: [File; 2],
}

impl TcpInUse {
    pub fn read(&mut self) -> i64 {
        let mut total = 0;
        for file in &mut self.files {
            let mut text = String::new();
            file.seek(SeekFrom::Start(0)).expect("rewind sockstat");
            file.read_to_string(&mut text).expect("read sockstat");
            let line = text
                .lines()
                .find(|l| l.starts_with("TCP: ") || l.starts_with("TCP6: "));
            let value =
                line.and_then(|l| l.split_whitespace().skip_while(|&f| f != "inuse").nth(1));
            total += value
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or_else(|| panic!("no TCP inuse count in sockstat:\n{text}"));
        }
        total
    }

    /// Waits until the count is back to `idle` (every connection's last transition has run);
    /// past `deadline`, returns the count it is stuck at.
    pub fn wait_for(&mut self, idle: i64, deadline: Instant) -> Result<(), i64> {
        loop {
            let now = self.read();
            if now <= idle {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(now);
            }
            thread::sleep(Duration::from_micros(100));
        }
    }
}

/// A line of `/proc/net/tcp{,6}`: `sl local_address rem_address st ...`, addresses as `HEX:PORT`.
fn parse_tcp_line(line: &str) -> (u16, u16, u8) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = |field: &str| {
        let (_, port) = field
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("bad address in {line:?}"));
        u16::from_str_radix(port, 16).unwrap_or_else(|e| panic!("bad port in {line:?}: {e}"))
    };
    let state =
        u8::from_str_radix(fields[3], 16).unwrap_or_else(|e| panic!("bad state in {line:?}: {e}"));
    (port(fields[1]), port(fields[2]), state)
}

/// Moves the calling thread (only it: the network namespace is per thread) into the namespace.
fn enter(fd: &File, name: &str) {
    // SAFETY: setns only reads the descriptor, which `fd` keeps open for the call.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!("setns into {name}: {}", std::io::Error::last_os_error());
    }
}

fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Runs `ip args...`, panics with its stderr on failure, returns its stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!(
            "run ip {}: {e} (is iproute2 installed? are we root?)",
            args.join(" ")
        )
    });
    if !out.status.success() {
        panic!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`ip`] with the arguments given as one line; only for arguments without spaces.
fn ip_words(args: &str) -> String {
    ip(&args.split_whitespace().collect::<Vec<_>>())
}

/// Deletes namespaces left by test processes that died without unwinding (SIGKILL, abort), i.e.
/// `tcpt-<tag>-<pid>-<n>` whose pid no longer exists. Called once per process, with `IP_NETNS` held.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest
            .rsplit('-')
            .nth(1)
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        {
            let out = Command::new("ip").args(["netns", "del", &name]).output();
            if out.is_ok_and(|out| out.status.success()) {
                eprintln!("removed namespace {name} left by dead process {pid}");
            }
        }
    }
}

/// A plain HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str, accept: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// The sum of a metric's samples in Prometheus text whose labels contain `labels` (`""`: all of
/// them), e.g. `metric_sum(text, "tcptrace_events_lost_total", "stage=\"kernel_ring\"")`.
pub fn metric_sum(text: &str, name: &str, labels: &str) -> i64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name).is_some_and(|rest| {
                rest.starts_with(['{', ' '])
                    && rest
                        .split_once(' ')
                        .is_some_and(|(l, _)| l.contains(labels))
            })
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as i64
}
