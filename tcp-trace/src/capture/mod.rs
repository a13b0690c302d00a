//! The only code that touches the kernel: load and attach the eBPF programs, drain the rings,
//! decode records, read the kernel-side counters.
mod btf;
pub mod caps;
mod counters;
pub mod decode;
mod offsets;
pub mod rings;
mod slots;
pub mod sockdiag;
mod switches;
pub mod tracefs;

use std::{io, os::fd::AsFd as _, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, MapData, PerCpuArray},
    programs::TracePoint,
};
use tcp_trace_common::globals;

pub use counters::{HOOKS, KernelCounterReader, KernelCounters};
pub use decode::{DecodeError, Kept, Record};
pub use slots::{ADOPT_EVERY, Adopter, DEFAULT_SOCKET_SLOTS};
pub use switches::{Switches, UNWATCHED_WAKEUP_INTERVAL};

use crate::model::{Context, TcpState};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcp-trace"));

/// The compiled eBPF object, every program in it (the agent attaches some): for tools that
/// measure a program on its own, such as the bench's floors (tcp-trace-ebpf/src/floor.rs).
pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

/// The state tracepoint's record layout the program reads (see tcp-trace-ebpf/src/state.rs).
const STATE_LAYOUT: &[(&str, usize, usize)] = &[
    ("skaddr", 8, 8),
    ("oldstate", 16, 4),
    ("newstate", 20, 4),
    ("sport", 24, 2),
    ("dport", 26, 2),
    ("family", 28, 2),
    ("protocol", 30, 2),
    ("saddr", 32, 4),
    ("daddr", 36, 4),
    ("saddr_v6", 40, 16),
    ("daddr_v6", 56, 16),
];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "loading eBPF programs needs root, or the capabilities CAP_BPF and CAP_PERFMON (this \
         process has neither CAP_SYS_ADMIN nor both of those): run it with sudo"
    )]
    NotPrivileged,
    #[error("{0}")]
    Tracefs(io::Error),
    #[error("the kernel's sock:inet_sock_set_state differs from what the program reads: {0}")]
    Layout(String),
    #[error("loading the eBPF programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("attaching {hook} failed: {source}")]
    Attach {
        hook: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("creating the per-CPU ring buffers failed: {0}")]
    Rings(io::Error),
    #[error("{0}")]
    Slots(String),
}

/// Each CPU's ring. 2 MiB: about 15,000 records, 80 ms of the heaviest churn one CPU of these
/// machines makes (the 4 MiB of the one ring these two CPUs shared before). The memory is the
/// kernel's, allocated when the agent starts: this times the possible CPUs.
pub const DEFAULT_RING_BYTES: u32 = 2 << 20;

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Each CPU's ring buffer, in bytes: a power of two, a multiple of the page size.
    pub ring_bytes: u32,
    /// Only capture sockets in this network namespace (inode); None = every namespace.
    pub netns: Option<u32>,
    /// Longest a record may wait in the ring before the agent reads it, roughly.
    pub wakeup_interval: Duration,
    /// Use the classic state tracepoint even where the BTF one loads.
    pub classic_tracepoint: bool,
    /// Record every state transition even while no subscriber asks for state changes (the
    /// replay buffer then holds them for subscriptions resumed later), at the cost of about
    /// twice the records.
    pub all_transitions: bool,
    /// Socket slots (a power of two; 0: none): while nobody asks for every transition, the
    /// kernel keeps each socket's open and handshake in one and writes one record per socket
    /// end (capture/slots.rs).
    pub socket_slots: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            ring_bytes: DEFAULT_RING_BYTES,
            netns: None,
            wakeup_interval: Duration::from_millis(1),
            classic_tracepoint: false,
            all_transitions: false,
            socket_slots: DEFAULT_SOCKET_SLOTS,
        }
    }
}

/// Which hooks are attached, and which optional ones are not (with why).
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    pub attached: Vec<String>,
    pub missing: Vec<String>,
}

/// Receives what [`Capture::run`] drains.
pub trait Sink {
    /// The records of one drain, in kernel-time order (merged from the per-CPU rings).
    fn records<'a>(&mut self, records: impl Iterator<Item = &'a Result<Record, DecodeError>>);
    /// The drain is over; a good moment to publish. Every record the programs wrote up to
    /// `handed_on_ns` (CLOCK_MONOTONIC) has been handed on, in this drain or an earlier one.
    fn batch_done(&mut self, _handed_on_ns: u64) {}
    /// What the socket slots kept of the sockets adopted from them ([`Record::Kept`]), in no
    /// particular order: not records of the kernel's.
    fn adopted<'a>(&mut self, records: impl Iterator<Item = &'a Result<Record, DecodeError>>) {
        self.records(records);
    }
    /// Whether the sink is about to read the table as a whole (a heal): the socket slots are
    /// adopted first.
    fn wants_adoption(&self, _handed_on_ns: u64) -> bool {
        false
    }
}

/// The running kernel's member offsets, as the agent sets them in its programs (for the
/// bench's floors, which load the same object).
pub fn kernel_offsets() -> tcp_trace_common::KernelOffsets {
    offsets::resolve(&mut Hooks::default()).offsets
}

pub struct Capture {
    // Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    rings: rings::Rings,
    counters: KernelCounterReader,
    switches: Switches,
    hooks: Hooks,
    /// The socket slots, when the programs have them.
    slots: Option<slots::Slots>,
    /// False when the kernel BTF lacks `sock.sk_lock.owned`: then a task is only trusted for transitions
    /// that always run in a system call.
    context_tracked: bool,
}

impl Capture {
    /// Loads and attaches the programs. Must run inside a tokio runtime (the ring is registered
    /// with its reactor).
    pub fn load(config: &CaptureConfig) -> Result<Capture, CaptureError> {
        check_privileges()?;
        tracefs::ensure_mounted().map_err(CaptureError::Tracefs)?;
        let mut hooks = Hooks::default();
        let kernel = offsets::resolve(&mut hooks);
        let netns_filter = config.netns.unwrap_or(0);
        let wakeup_ns = u64::try_from(config.wakeup_interval.as_nanos()).unwrap_or(u64::MAX);
        let unwatched_interval = config.wakeup_interval.max(UNWATCHED_WAKEUP_INTERVAL);
        let unwatched_ns = u64::try_from(unwatched_interval.as_nanos()).unwrap_or(u64::MAX);
        let slot_count = slots::count(config, kernel.direct_missing.is_none())?;
        let slot_mask = slot_count.checked_sub(1).unwrap_or(u32::MAX);
        let mut ebpf = EbpfLoader::new()
            // No CO-RE relocations to resolve (offsets come from `offsets::resolve`), so aya need
            // not parse the kernel's BTF again: that costs tens of MiB while loading.
            .btf(None)
            .override_global(globals::NETNS_FILTER, &netns_filter, true)
            .override_global(globals::WAKEUP_INTERVAL_NS, &wakeup_ns, true)
            .override_global(globals::UNWATCHED_WAKEUP_INTERVAL_NS, &unwatched_ns, true)
            .override_global(globals::KERNEL_OFFSETS, &kernel.offsets, true)
            .override_global(globals::SLOT_MASK, &slot_mask, true)
            .map_max_entries("RINGS", possible_cpus()?)
            .map_max_entries("SOCKET_SLOT_HOLDERS", slot_count.max(1))
            .map_max_entries("SOCKET_SLOTS", slot_count.max(1))
            .load(EBPF_OBJECT)?;
        let slots = slots::Slots::map(&ebpf, slot_count)?;
        // Before any program is attached: a record that finds no ring is lost.
        let rings = per_cpu_rings(&mut ebpf, config.ring_bytes)?;

        // Without the socket lock's owner flag a transition's task is only trusted where it
        // always runs in a system call (offsets::resolve named what is missing).
        let context_tracked = kernel.offsets.sk_lock_owned != 0;
        attach_state(
            &mut ebpf,
            kernel.direct_missing,
            config.classic_tracepoint,
            &mut hooks,
        )?;

        // (event, what is lost without it, whether a BTF program exists for it: the hooks that
        // read only the socket).
        for (event, lost, has_btf) in [
            (
                "tcp_retransmit_skb",
                "live retransmit events (counts at close still come from the socket)",
                true,
            ),
            ("tcp_retransmit_synack", "SYN-ACK retransmit events", false),
            (
                "tcp_send_reset",
                "resets sent (close causes fall back to the socket's error)",
                false,
            ),
            (
                "tcp_receive_reset",
                "resets received (close causes fall back to the socket's error)",
                true,
            ),
        ] {
            // The BTF program where there is one and the kernel takes it (its recursion guard
            // is its own: another tracer's programs never make it skip), else the classic one.
            let btf = has_btf
                && kernel.direct_missing.is_none()
                && !config.classic_tracepoint
                && attach_btf_tracepoint(&mut ebpf, &format!("{event}_btf"), event)
                    .inspect_err(|err| {
                        tracing::info!(
                            "tp_btf/{event} ({}): using the classic tracepoint",
                            error_chain(err)
                        )
                    })
                    .is_ok();
            if btf {
                hooks.attached.push(format!("tp_btf:{event}"));
                continue;
            }
            optional(
                &mut hooks,
                format!("tcp:{event}"),
                lost,
                attach(&mut ebpf, event, "tcp", event),
            );
        }
        for event in ["sys_exit_accept4", "sys_exit_accept"] {
            let lost = "accepting process (accepted connections name their listener's owner)";
            optional(
                &mut hooks,
                format!("syscalls:{event}"),
                lost,
                attach(&mut ebpf, event, "syscalls", event),
            );
        }
        let keepalive_lost = "keepalive probes and answers (a dead peer still shows as ETIMEDOUT)";
        let o = &kernel.offsets;
        if o.keepalive_timer_fn != 0 && o.sk_timer != 0 && o.probes_out != 0 {
            attach_keepalive_timer(&mut ebpf, o.timer_function != 0, keepalive_lost, &mut hooks);
        } else {
            hooks.missing.push(format!(
                "timer:timer_expire_entry/exit (tcp_keepalive_timer not in /proc/kallsyms, or \
                 sock.sk_timer/icsk_probes_out not in BTF): {keepalive_lost}{}",
                caps::lacking(caps::SYSLOG, "reading addresses in /proc/kallsyms")
            ));
        }
        optional(
            &mut hooks,
            "cgroup/setsockopt".into(),
            &format!(
                "keepalive configuration (SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT){}",
                caps::lacking(caps::NET_ADMIN, "loading a cgroup program")
            ),
            attach_setsockopt(&mut ebpf),
        );
        hooks.missing.extend(caps::namespace_access());

        let counters = ebpf
            .take_map("COUNTERS")
            .expect("the object defines COUNTERS");
        let counters =
            PerCpuArray::try_from(counters).map_err(|err| CaptureError::Map("COUNTERS", err))?;
        let switches = ebpf
            .take_map("SWITCHES")
            .expect("the object defines SWITCHES");
        let switches =
            Array::try_from(switches).map_err(|err| CaptureError::Map("SWITCHES", err))?;
        // The names live as long as the agent: a dozen short strings, leaked once per load.
        let programs = ebpf
            .programs()
            .filter_map(|(name, program)| {
                let fd = program.fd().ok()?.as_fd().try_clone_to_owned().ok()?;
                Some((&*Box::leak(name.into()), fd))
            })
            .collect();
        let counters = KernelCounterReader::new(counters, programs);
        Ok(Capture {
            _ebpf: ebpf,
            rings,
            counters,
            switches: Switches::new(switches, config.wakeup_interval, unwatched_interval),
            hooks,
            slots,
            context_tracked,
        })
    }

    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// The switches that make the programs record every state transition, and wake the agent
    /// less often while nobody subscribes.
    pub fn switches(&self) -> Switches {
        self.switches.clone()
    }

    /// Asks for the socket slots' adoption before a read of the table (does nothing without
    /// slots).
    pub fn adopter(&self) -> Adopter {
        self.slots
            .as_ref()
            .map_or(Adopter::none(), slots::Slots::adopter)
    }

    /// The programs' counters, readable from any task.
    pub fn kernel_counters(&self) -> KernelCounterReader {
        self.counters.clone()
    }

    /// Drains what the rings hold now. Returns how many records it handed on.
    pub fn drain(&mut self, sink: &mut impl Sink) -> usize {
        self.drain_rings(sink, false)
    }

    fn drain_rings(&mut self, sink: &mut impl Sink, flush: bool) -> usize {
        let context_tracked = self.context_tracked;
        // Bounded: when the programs write faster than the agent reads, the rings never empty,
        // and an unbounded drain would publish nothing and hold every decoded event in memory.
        let records = self.rings.drain(MAX_DRAIN, flush, |record| {
            if !context_tracked {
                match record {
                    Ok(Record::Transition(t)) => distrust_context(t),
                    Ok(Record::Kept(Kept { close: Some(t), .. })) => distrust_context(t),
                    _ => {}
                }
            }
        });
        let n = records.len();
        sink.records(records);
        let cut = self.rings.cut();
        if let Some(slots) = &mut self.slots
            && (slots.due() || sink.wants_adoption(cut))
        {
            sink.adopted(slots.adopt(cut).iter());
            slots.done();
        }
        // Also after an empty drain: the table completes the lives of connections that closed
        // in the drain before.
        sink.batch_done(cut);
        n
    }

    /// Drains records into `sink` until `cancel` fires. Blocking: run it on a thread of its own.
    ///
    /// The programs wake the agent at most once per wake-up interval (a wake-up per record costs
    /// an irq_work and an epoll round trip each). So after a wake-up the agent keeps draining,
    /// every quarter interval, and goes back to waiting only when a drain at least one interval
    /// after the wake-up finds the ring empty: any record after that point wakes it again.
    /// (tokio's timers tick in whole milliseconds, too coarse for this loop; a thread sleeping
    /// 250 us between drains delivers within about that.)
    ///
    /// Once records have kept coming for a whole interval, it drains once per interval, the
    /// longest the programs let a record wait anyway: each drain has a cost of its own (waking
    /// every subscriber's task, a write to each, this thread's sleep), which under sustained
    /// churn outweighs the records themselves if it drains more often. The interval is the
    /// one in force at each drain: [`UNWATCHED_WAKEUP_INTERVAL`] while nobody subscribes.
    pub fn run(&mut self, cancel: &tokio_util::sync::CancellationToken, sink: &mut impl Sink) {
        raise_drain_priority();
        let fds: Vec<_> = self
            .rings
            .fds()
            .chain(self.slots.as_ref().map(slots::Slots::wake_fd))
            .collect();
        while !cancel.is_cancelled() {
            // Level-triggered: returns at once while unread records are in the ring. The
            // timeout bounds how long a stop request waits, and paces the checks a drain makes
            // with or without records (the kernel's skips, which write none; lives to complete).
            let woken_by_records = match wait_readable(&fds, Duration::from_millis(100)) {
                Ok(readable) => readable,
                Err(err) => {
                    tracing::error!("polling the ring buffers failed: {err}");
                    break;
                }
            };
            let woken = std::time::Instant::now();
            loop {
                let n = self.drain(sink);
                // Read at each drain: a subscription can change it.
                let interval = self.switches.interval();
                let follow_up = (interval / 4).max(Duration::from_micros(50));
                let busy_for = woken.elapsed();
                let idle = n == 0 && self.rings.pending() == 0;
                // After a timeout with the rings still empty, no record is on its way: back to
                // waiting at once, not after an interval of follow-up drains (an idle host
                // then wakes the agent 10 times a second, not 40).
                let done = idle && (!woken_by_records || busy_for >= interval);
                if done || cancel.is_cancelled() {
                    break;
                }
                if n >= MAX_DRAIN {
                    // Behind: read on at once.
                    continue;
                }
                std::thread::sleep(if busy_for < interval {
                    follow_up
                } else {
                    interval
                });
            }
        }
        // Whatever is left when asked to stop.
        self.drain_rings(sink, true);
    }
}

/// The CPUs the kernel may ever run a program on (/sys/devices/system/cpu/possible): one ring
/// each, since a program writes to its own CPU's.
pub fn possible_cpus() -> Result<u32, CaptureError> {
    aya::util::nr_cpus()
        .map(|n| n as u32)
        .map_err(|(path, err)| {
            CaptureError::Rings(io::Error::new(err.kind(), format!("{path}: {err}")))
        })
}

/// Creates a ring of `bytes` for each possible CPU and puts it into the programs' `RINGS`.
pub fn per_cpu_rings(ebpf: &mut Ebpf, bytes: u32) -> Result<rings::Rings, CaptureError> {
    let cpus = possible_cpus()?;
    let rings = rings::Rings::create(cpus as usize, bytes).map_err(CaptureError::Rings)?;
    let outer = ebpf.map_mut("RINGS").expect("the object defines RINGS");
    let mut outer: ArrayOfMaps<&mut MapData, MapData> =
        ArrayOfMaps::try_from(outer).map_err(|err| CaptureError::Map("RINGS", err))?;
    for (cpu, fd) in rings.map_fds().enumerate() {
        let fd = fd.try_clone_to_owned().map_err(CaptureError::Rings)?;
        let ring = MapData::from_fd(fd).map_err(|err| CaptureError::Map("RINGS", err))?;
        outer
            .set(cpu as u32, &ring, 0)
            .map_err(|err| CaptureError::Map("RINGS", err))?;
    }
    Ok(rings)
}

/// Nice value of the drain thread. When the traced workload keeps every CPU busy, the scheduler
/// gives the drain a fair share like any other thread, less than it needs: the programs then find
/// the ring full and those records are lost for good, while a workload that waits a little only
/// slows down. At nice -10 (weight 9,548 against 1,024) the drain runs when it has work (the
/// measurements are in docs/benchmarks.md). Its work is bounded by what the kernel writes, so
/// the weight costs the workload only that much CPU.
const DRAIN_NICE: libc::c_int = -10;

/// Raises the calling thread's priority to [`DRAIN_NICE`]. Needs CAP_SYS_NICE (root has it);
/// without it the drain keeps the default priority.
fn raise_drain_priority() {
    // SAFETY: gettid has no preconditions; setpriority with a thread id sets that thread only.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, DRAIN_NICE)
    };
    if rc != 0 {
        tracing::debug!(
            "the ring drain keeps the default priority ({}): under full CPU load the ring may \
             overflow sooner (grant CAP_SYS_NICE)",
            io::Error::last_os_error()
        );
    }
}

/// Most records one drain hands to the sink before it completes the batch (and the events are
/// published): a few milliseconds of the busiest churn, a few MiB of events held at most.
pub const MAX_DRAIN: usize = 16_384;

/// Waits until one of `fds` is readable (true) or `timeout` passes (false; EINTR counts as a
/// timeout).
fn wait_readable(fds: &[std::os::fd::RawFd], timeout: Duration) -> io::Result<bool> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid pollfds, a valid timespec, no signal mask.
    let rc = unsafe {
        libc::ppoll(
            pollfds.as_mut_ptr(),
            pollfds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(rc > 0)
}

/// Without the lock owner flag, a task is only known for transitions that always run in the
/// owner's system call: connect() (CLOSE -> SYN_SENT) and listen() (CLOSE -> LISTEN).
fn distrust_context(t: &mut crate::model::Transition) {
    let in_syscall =
        t.old == TcpState::Close && matches!(t.new, TcpState::SynSent | TcpState::Listen);
    if !in_syscall {
        t.context = Context::Unknown;
    }
}

/// The state hook: the BTF tracepoint program where the kernel takes it, else the classic one
/// (which needs the tracepoint's record to have the layout it reads).
fn attach_state(
    ebpf: &mut Ebpf,
    direct_missing: Option<&str>,
    classic: bool,
    hooks: &mut Hooks,
) -> Result<(), CaptureError> {
    let why_not_btf = match direct_missing {
        _ if classic => "--classic-tracepoint".to_owned(),
        None => {
            match attach_btf_tracepoint(ebpf, "inet_sock_set_state_btf", "inet_sock_set_state") {
                Ok(()) => {
                    hooks.attached.push("tp_btf:inet_sock_set_state".into());
                    let guard =
                        attach_btf_tracepoint(ebpf, counters::STATE_GUARD, "inet_sock_set_state");
                    optional(
                        hooks,
                        "tp_btf:inet_sock_set_state (guard)".into(),
                        "transitions that nest in another on one CPU (counted as kernel missed)",
                        guard,
                    );
                    return Ok(());
                }
                Err(err) => error_chain(&err),
            }
        }
        Some(missing) => format!("no offset for {missing} in the kernel BTF"),
    };
    tracing::info!(
        "tp_btf/inet_sock_set_state ({why_not_btf}): using the classic tracepoint, which costs more per transition"
    );
    tracefs::check_layout("sock", "inet_sock_set_state", STATE_LAYOUT)
        .map_err(CaptureError::Layout)?;
    attach(ebpf, "inet_sock_set_state", "sock", "inet_sock_set_state").map_err(|source| {
        CaptureError::Attach {
            hook: "sock:inet_sock_set_state",
            source,
        }
    })?;
    hooks.attached.push("sock:inet_sock_set_state".into());
    Ok(())
}

/// The keepalive timer hooks: the BTF tracepoint pair where the kernel takes it (its recursion
/// guard is its own, so another tracer's programs never make it skip a timer), else the classic
/// pair.
fn attach_keepalive_timer(ebpf: &mut Ebpf, btf: bool, lost: &str, hooks: &mut Hooks) {
    const EVENTS: [&str; 2] = ["timer_expire_entry", "timer_expire_exit"];
    let why_not_btf = if btf {
        let attached = EVENTS
            .iter()
            .try_for_each(|event| attach_btf_tracepoint(ebpf, &format!("{event}_btf"), event));
        match attached {
            Ok(()) => {
                hooks
                    .attached
                    .extend(EVENTS.iter().map(|event| format!("tp_btf:{event}")));
                return;
            }
            Err(err) => {
                // Half a pair is no use: the entry program may be attached already.
                for event in EVENTS {
                    let program: Option<&mut aya::programs::BtfTracePoint> = ebpf
                        .program_mut(&format!("{event}_btf"))
                        .and_then(|p| p.try_into().ok());
                    if let Some(program) = program {
                        let _ = program.unload();
                    }
                }
                error_chain(&err)
            }
        }
    } else {
        "no offset for timer_list.function in the kernel BTF".to_owned()
    };
    tracing::info!(
        "tp_btf/timer_expire_entry/exit ({why_not_btf}): using the classic tracepoints, which \
         miss the timers that expire while another tracer's program runs"
    );
    for event in EVENTS {
        let attached = attach(ebpf, event, "timer", event);
        optional(hooks, format!("timer:{event}"), lost, attached);
    }
}

/// Loads a BTF tracepoint program against the kernel's BTF. aya's own BTF parse of vmlinux
/// costs tens of MiB while it lives; it is dropped here, before the agent starts its work.
fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    tracepoint: &str,
) -> Result<(), aya::programs::ProgramError> {
    let btf = aya::Btf::from_sys_fs().map_err(aya::programs::ProgramError::Btf)?;
    let program: &mut aya::programs::BtfTracePoint = ebpf
        .program_mut(program)
        .expect("the object defines every program the agent attaches")
        .try_into()?;
    program.load(tracepoint, &btf)?;
    program.attach()?;
    Ok(())
}

fn attach(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    event: &str,
) -> Result<(), aya::programs::ProgramError> {
    let program: &mut TracePoint = ebpf
        .program_mut(program)
        .expect("the object defines every program the agent attaches")
        .try_into()?;
    program.load()?;
    program.attach(category, event)?;
    Ok(())
}

/// Fails unless this process may load and attach the programs.
pub fn check_privileges() -> Result<(), CaptureError> {
    if privileged() {
        Ok(())
    } else {
        Err(CaptureError::NotPrivileged)
    }
}

/// CAP_SYS_ADMIN, or CAP_BPF together with CAP_PERFMON (tracepoint programs need both).
fn privileged() -> bool {
    caps::has(caps::SYS_ADMIN) || (caps::has(caps::BPF) && caps::has(caps::PERFMON))
}

/// Records an optional hook as attached, or as missing with what is lost without it.
fn optional<E: std::error::Error>(
    hooks: &mut Hooks,
    name: String,
    lost: &str,
    result: Result<(), E>,
) {
    match result {
        Ok(()) => hooks.attached.push(name),
        Err(err) => hooks
            .missing
            .push(format!("{name} ({}): no {lost}", error_chain(&err))),
    }
}

/// An error with its causes, one line ("`bpf_link_create` failed: Invalid argument").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// The cgroup v2 mount point, from /proc/mounts (hybrid layouts mount it at .../unified).
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let (_source, target, fstype) = (parts.next()?, parts.next()?, parts.next()?);
        (fstype == "cgroup2").then(|| std::path::PathBuf::from(target))
    })
}

#[derive(Debug, thiserror::Error)]
enum SockoptAttachError {
    #[error("no cgroup2 mount in /proc/mounts")]
    NoCgroup2,
    #[error("{0}: {1}")]
    Open(std::path::PathBuf, io::Error),
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
}

/// The setsockopt program on the cgroup v2 root sees every process's setsockopt() (programs
/// attached to a cgroup apply to all its descendants). It attaches through a bpf_link, which
/// coexists with other programs on the cgroup and takes no flags (hence `Single`).
fn attach_setsockopt(ebpf: &mut Ebpf) -> Result<(), SockoptAttachError> {
    let root = cgroup2_mount().ok_or(SockoptAttachError::NoCgroup2)?;
    let cgroup =
        std::fs::File::open(&root).map_err(|err| SockoptAttachError::Open(root.clone(), err))?;
    let program: &mut aya::programs::CgroupSockopt = ebpf
        .program_mut("keepalive_setsockopt")
        .expect("the object defines keepalive_setsockopt")
        .try_into()?;
    program.load()?;
    program.attach(&cgroup, aya::programs::links::CgroupAttachMode::Single)?;
    Ok(())
}

/// The keepalive sysctls of the network namespace `pid` lives in, read from inside it (sysctls
/// under /proc/sys show the reader's namespace). Blocking; None if the process is gone.
pub fn keepalive_defaults(pid: u32) -> Option<crate::model::KeepaliveDefaults> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; setns only affects this short-lived thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        let read = |name: &str| -> Option<u32> {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(crate::model::KeepaliveDefaults {
            idle_s: read("tcp_keepalive_time")?,
            interval_s: read("tcp_keepalive_intvl")?,
            count: read("tcp_keepalive_probes")?,
        })
    })
    .join()
    .ok()
    .flatten()
}
