//! What the tracers watch: a connection-churn generator, and a population of idle keepalive
//! connections (held open, never accept()ed, so the server side needs no fd).
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, Stdio},
    sync::atomic::{AtomicI32, AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use tcp_trace_test_support::{Counters, NetNs};

/// No step of a connection may block longer than this (the bench is bounded in time).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variable that turns the bench binary into a population holder.
pub const HOLD_ENV: &str = "TCP_TRACE_BENCH_HOLD";

/// A fresh namespace for one run, with `lo` up, a wide ephemeral port range (the churn keeps
/// tens of thousands of client ports in TIME_WAIT) and accept queues deep enough for the idle
/// population, which is never accept()ed. Deleting it (on drop) frees every socket, TIME_WAIT
/// included.
pub fn netns() -> NetNs {
    let ns = NetNs::new("bench");
    for (key, value) in [
        ("ipv4/ip_local_port_range", "1024 65535"),
        ("core/somaxconn", "65535"),
        ("ipv4/tcp_max_syn_backlog", "65535"),
    ] {
        ns.sysctl(key, value);
    }
    ns
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
    /// The namespace's counters now.
    pub fn read(ns: &NetNs) -> TcpCounters {
        TcpCounters::from(&ns.snmp())
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

impl From<&Counters> for TcpCounters {
    fn from(c: &Counters) -> TcpCounters {
        // The kernel's counters never go below 0.
        let get = |key: &str| c.get(key).max(0) as u64;
        TcpCounters {
            active_opens: get("Tcp:ActiveOpens"),
            passive_opens: get("Tcp:PassiveOpens"),
            attempt_fails: get("Tcp:AttemptFails"),
            estab_resets: get("Tcp:EstabResets"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ChurnSpec {
    /// Worker threads, each with its own listener.
    pub concurrency: usize,
    /// Connections per second over all workers; None = as fast as they go.
    pub rate: Option<f64>,
    pub duration: Duration,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ChurnResult {
    /// Connections completed (connect, request, response, close on both sides).
    pub connections: u64,
    /// Connections that failed somewhere (then the kernel's counters, not this, are the truth).
    pub errors: u64,
    pub elapsed: Duration,
    /// Listening sockets opened and closed by the workers (each is 2 transitions + a summary).
    pub listeners: u64,
}

/// Runs the churn: each worker makes connections one at a time on its own listener: connect,
/// client sends 1 byte, server answers 1 byte, client closes, server reads EOF and closes. The
/// same fixed order every time, so each connection makes the same transitions (5 per side).
///
/// The workload makes no setsockopt() call (tcp-trace's cgroup setsockopt program would run on
/// it); instead a watchdog bounds it: workers still blocked [`STEP_TIMEOUT`] after the deadline
/// get their sockets shut down, which fails their blocking calls.
pub fn churn(ns: &NetNs, spec: ChurnSpec) -> Result<ChurnResult> {
    let start = Instant::now() + Duration::from_millis(5);
    let deadline = start + spec.duration;
    let per_worker_interval = spec
        .rate
        .map(|rate| Duration::from_secs_f64(spec.concurrency as f64 / rate.max(0.001)));
    let open: Vec<OpenFds> = (0..spec.concurrency).map(|_| OpenFds::default()).collect();
    let finished = AtomicUsize::new(0);
    let results: Vec<Result<(u64, u64)>> = thread::scope(|scope| {
        let workers: Vec<_> = open
            .iter()
            .enumerate()
            .map(|(i, fds)| {
                let finished = &finished;
                thread::Builder::new()
                    .name(format!("churn-{i}"))
                    .spawn_scoped(scope, move || {
                        // Counted even if the worker panics, so the watchdog ends.
                        let _finished = Finished(finished);
                        ns.enter();
                        // Spread paced workers over the interval instead of firing together.
                        let offset = per_worker_interval
                            .map(|iv| iv.mul_f64(i as f64 / spec.concurrency as f64))
                            .unwrap_or_default();
                        worker(start + offset, deadline, per_worker_interval, fds)
                    })
            })
            .collect();
        let _watchdog = thread::Builder::new()
            .name("churn-watchdog".into())
            .spawn_scoped(scope, || {
                while finished.load(Ordering::SeqCst) < spec.concurrency {
                    if Instant::now() > deadline + STEP_TIMEOUT {
                        open.iter().for_each(OpenFds::shutdown);
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            });
        workers
            .into_iter()
            .map(|w| match w {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a churn worker panicked"))),
                Err(err) => Err(err).context("spawn a churn worker"),
            })
            .collect()
    });
    // Workers stop at the deadline, so the measured time is the workload's duration.
    let mut total = ChurnResult {
        elapsed: spec.duration,
        listeners: spec.concurrency as u64,
        ..Default::default()
    };
    for result in results {
        let (connections, errors) = result?;
        total.connections += connections;
        total.errors += errors;
    }
    Ok(total)
}

/// Counts a worker as finished when dropped.
struct Finished<'a>(&'a AtomicUsize);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The sockets a worker has open right now (-1: none), for the watchdog.
#[derive(Default)]
struct OpenFds([AtomicI32; 2]);

impl OpenFds {
    fn set(&self, client: i32, server: i32) {
        self.0[0].store(client, Ordering::Relaxed);
        self.0[1].store(server, Ordering::Relaxed);
    }

    fn shutdown(&self) {
        for fd in &self.0 {
            let fd = fd.load(Ordering::Relaxed);
            if fd > 0 {
                // SAFETY: shutdown on a socket fd; at worst it is already closed (EBADF).
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
    }
}

fn worker(
    start: Instant,
    deadline: Instant,
    interval: Option<Duration>,
    fds: &OpenFds,
) -> Result<(u64, u64)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind a churn listener")?;
    let server = listener.local_addr()?;
    sleep_until(start);
    let (mut done, mut errors) = (0u64, 0u64);
    let mut next = start;
    loop {
        if let Some(interval) = interval {
            sleep_until(next);
            next += interval;
        }
        if Instant::now() >= deadline {
            break;
        }
        match one_connection(&listener, server, fds) {
            Ok(()) => done += 1,
            Err(_) => {
                errors += 1;
                // Something is wrong (ports, memory): do not spin on it.
                thread::sleep(Duration::from_millis(1));
            }
        }
        fds.set(-1, -1);
    }
    Ok((done, errors))
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        thread::sleep(at - now);
    }
}

fn one_connection(
    listener: &TcpListener,
    server: SocketAddr,
    fds: &OpenFds,
) -> std::io::Result<()> {
    let mut client = TcpStream::connect(server)?;
    // On loopback the handshake completes inside connect(), so accept() does not wait.
    let (mut accepted, _) = listener.accept()?;
    fds.set(client.as_raw_fd(), accepted.as_raw_fd());
    let mut byte = [0u8; 1];
    client.write_all(b"q")?;
    accepted.read_exact(&mut byte)?;
    accepted.write_all(b"a")?;
    client.read_exact(&mut byte)?;
    // Each side closes with nothing unread, so close() sends a FIN, not a RST.
    fds.set(-1, accepted.as_raw_fd());
    drop(client);
    if accepted.read(&mut byte)? != 0 {
        return Err(std::io::Error::other("expected EOF from the client"));
    }
    fds.set(-1, -1);
    drop(accepted);
    Ok(())
}

/// Idle connections held open: client sockets with SO_KEEPALIVE, server sides left in the
/// listeners' accept queues (full sockets, tracked like any other, but no fd). Closing the
/// listeners resets them, so teardown takes no time.
pub struct Population {
    pub connections: usize,
    pub listeners: Vec<TcpListener>,
    local: Vec<TcpStream>,
    holders: Vec<Child>,
}

impl Population {
    /// Opens `n` connections in `ns`. Client sockets are held in this process while its fd
    /// limit allows, otherwise by child processes (`holder_exe` with [`HOLD_ENV`] set), each with
    /// its own fd limit: RLIMIT_NOFILE cannot be raised past the hard limit without
    /// CAP_SYS_RESOURCE.
    ///
    /// `rate` paces the opening (connections per second over all holders; None = at once):
    /// a steady state is what the memory figure is about, not a burst.
    pub fn open(
        ns: &NetNs,
        n: usize,
        keepalive: Duration,
        rate: Option<f64>,
        holder_exe: Option<&Path>,
    ) -> Result<Population> {
        const PER_LISTENER: usize = 16_000;
        let listeners: Vec<TcpListener> = ns.run(|| {
            (0..n.div_ceil(PER_LISTENER).max(1))
                .map(|_| {
                    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
                    // std listens with a small backlog; listen() again raises it (the netns's
                    // somaxconn was raised when it was made).
                    // SAFETY: listen on a socket we own.
                    if unsafe { libc::listen(l.as_raw_fd(), 65_535) } != 0 {
                        return Err(std::io::Error::last_os_error()).context("listen(65535)");
                    }
                    Ok(l)
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<std::io::Result<_>>()?;
        let budget = fd_budget();
        let mut population = Population {
            connections: n,
            listeners,
            local: Vec::new(),
            holders: Vec::new(),
        };
        if n <= budget {
            population.local = ns.run(|| connect_all(&addrs, n, keepalive, rate))?;
            return Ok(population);
        }
        let exe = holder_exe.with_context(|| {
            format!(
                "{n} idle connections do not fit this process's fd limit ({budget} free) and \
                 there is no holder executable"
            )
        })?;
        let hard = nofile().1 as usize;
        let per_child = hard.saturating_sub(64).max(1_000);
        let children = n.div_ceil(per_child);
        let mut left = n;
        while left > 0 {
            let count = left.min(per_child);
            let child_rate = rate.map(|r| r / children as f64);
            population
                .holders
                .push(spawn_holder(ns, exe, &addrs, count, keepalive, child_rate)?);
            left -= count;
        }
        for holder in &mut population.holders {
            let stdout = holder.stdout.take().context("holder stdout")?;
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            ensure!(
                line.trim() == "ready",
                "a population holder failed: {:?} (see its stderr above)",
                line.trim()
            );
        }
        Ok(population)
    }

    /// Tracked sockets: both ends of every connection, plus the listeners.
    pub fn sockets(&self) -> usize {
        2 * self.connections + self.listeners.len()
    }

    /// State changes opening it made: 2 per side (to SYN_SENT and ESTABLISHED; to SYN_RECV
    /// and ESTABLISHED) and 1 per listener (to LISTEN).
    pub fn opening_events(&self) -> u64 {
        4 * self.connections as u64 + self.listeners.len() as u64
    }
}

impl Drop for Population {
    fn drop(&mut self) {
        self.listeners.clear();
        self.local.clear();
        for holder in &mut self.holders {
            // Closing its stdin tells a holder to exit (its sockets close with it).
            drop(holder.stdin.take());
        }
        for holder in &mut self.holders {
            let _ = holder.wait();
        }
    }
}

fn connect_all(
    addrs: &[SocketAddr],
    n: usize,
    keepalive: Duration,
    rate: Option<f64>,
) -> Result<Vec<TcpStream>> {
    let start = Instant::now();
    (0..n)
        .map(|i| {
            if let Some(rate) = rate {
                sleep_until(start + Duration::from_secs_f64(i as f64 / rate.max(1.0)));
            }
            let addr = addrs[i % addrs.len()];
            let stream = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
                .with_context(|| format!("idle connection {i} of {n} to {addr}"))?;
            set_keepalive(&stream, keepalive)?;
            Ok(stream)
        })
        .collect()
}

fn set_keepalive(stream: &TcpStream, idle: Duration) -> Result<()> {
    let fd = stream.as_raw_fd();
    let secs = idle.as_secs().clamp(1, 32_767) as libc::c_int;
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs),
    ] {
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setsockopt keepalive");
        }
    }
    Ok(())
}

fn spawn_holder(
    ns: &NetNs,
    exe: &Path,
    addrs: &[SocketAddr],
    count: usize,
    keepalive: Duration,
    rate: Option<f64>,
) -> Result<Child> {
    let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let spec = format!(
        "{count};{};{};{}",
        keepalive.as_secs(),
        rate.unwrap_or(0.0),
        addrs.join(",")
    );
    let mut cmd = ns.command(exe);
    cmd.env(HOLD_ENV, spec)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd.spawn()
        .with_context(|| format!("start a population holder {}", exe.display()))
}

/// The holder's side: `TCP_TRACE_BENCH_HOLD=<count>;<keepalive secs>;<rate, 0 = at
/// once>;<addr>,<addr>...`. Connects, says `ready`, then holds the connections until stdin
/// closes.
pub fn hold_main(spec: &str) -> Result<()> {
    let parts: Vec<&str> = spec.splitn(4, ';').collect();
    let [count, keepalive, rate, addrs] = parts[..] else {
        bail!("bad {HOLD_ENV}={spec:?}");
    };
    let count: usize = count.parse()?;
    let keepalive = Duration::from_secs(keepalive.parse()?);
    let rate: f64 = rate.parse()?;
    let rate = (rate > 0.0).then_some(rate);
    let addrs: Vec<SocketAddr> = addrs.split(',').map(str::parse).collect::<Result<_, _>>()?;
    raise_nofile();
    let held = connect_all(&addrs, count, keepalive, rate)?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    drop(held);
    Ok(())
}

/// (soft, hard) RLIMIT_NOFILE.
fn nofile() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (limit.rlim_cur, limit.rlim_max)
}

/// Raises the soft fd limit to the hard one (allowed without privileges).
pub fn raise_nofile() {
    let (_, hard) = nofile();
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass; failure leaves the old limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}

/// Fds this process may still open, keeping a margin for agents' sockets, files, pipes.
fn fd_budget() -> usize {
    let open = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    (nofile().0 as usize).saturating_sub(open + 1_024)
}
