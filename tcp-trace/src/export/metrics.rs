//! The exported metrics: counters the pipeline bumps once per connection (at its open, its
//! establishment, its close) and per keepalive probe, and a snapshot of every family that reads
//! the rest from the other stages (the table, the bus, the kernel counters) when asked.
//!
//! Every label is an enum of this crate, so the number of series is fixed by construction: no
//! address, port, process or namespace ever becomes a label ([`MAX_SERIES`]).
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{
    lifecycle::{Cause, Closer, Connection, Direction},
    model::TcpState,
    stats::{DURATION_BOUNDS_NS, HOOKS, Histogram},
};

pub use tcp_trace_common::HANDSHAKE_BOUNDS_NS;

/// Directions of opened connections (listeners are not connections).
const OPENED: [Direction; 2] = [Direction::Active, Direction::Passive];
/// Directions of closed connections: also those first seen mid-life.
const CLOSED: [Direction; 3] = [Direction::Active, Direction::Passive, Direction::Unknown];
/// The causes a connection (not a listener) can close with.
const CAUSES: [Cause; 10] = [
    Cause::Orderly,
    Cause::ResetSent,
    Cause::ResetReceived,
    Cause::Refused,
    Cause::ConnectTimeout,
    Cause::Unreachable,
    Cause::KeepaliveTimeout,
    Cause::RetransmitTimeout,
    Cause::Aborted,
    Cause::Unknown,
];
const CLOSERS: [Closer; 4] = [
    Closer::Local,
    Closer::Remote,
    Closer::Simultaneous,
    Closer::None,
];
/// Whether a connection that ended this way failed (`tcptrace_connection_failures_total`).
pub(super) fn is_failure(cause: Cause) -> bool {
    FAILURES.iter().any(|&(x, _)| x == cause)
}

/// Failures, in the words of the OpenTelemetry drafts for TCP where they have one.
const FAILURES: [(Cause, &str); 7] = [
    (Cause::Refused, "refused"),
    (Cause::ResetReceived, "reset"),
    (Cause::ResetSent, "reset_sent"),
    (Cause::ConnectTimeout, "timed_out"),
    (Cause::Unreachable, "unreachable"),
    (Cause::KeepaliveTimeout, "keepalive_timeout"),
    (Cause::RetransmitTimeout, "retransmit_timeout"),
];
/// Where events are lost, in pipeline order.
pub const LOSS_STAGES: [&str; 5] = [
    "kernel_ring",
    "kernel_missed",
    "subscriber",
    "table_full",
    "otlp",
];

/// Most series all families together can have, whatever the traffic: the product of each
/// family's label values (README, "Metrics").
pub const MAX_SERIES: usize = OPENED.len() // opened
    + CLOSED.len() * FAILURES.len() // failures
    + CLOSED.len() * CAUSES.len() * CLOSERS.len() // closed
    + 2 * OPENED.len() // handshake and connection duration
    + OPENED.len() // SYN retransmits
    + 2 // keepalive probes and dead peers
    + CLOSED.len() * TcpState::ALL.len() // live
    + LOSS_STAGES.len()
    + HOOKS.len() // runs missed
    + 1; // build info

pub(super) fn cause_name(c: Cause) -> &'static str {
    match c {
        Cause::Orderly => "orderly",
        Cause::ResetSent => "reset_sent",
        Cause::ResetReceived => "reset_received",
        Cause::Refused => "refused",
        Cause::ConnectTimeout => "connect_timeout",
        Cause::Unreachable => "unreachable",
        Cause::KeepaliveTimeout => "keepalive_timeout",
        Cause::RetransmitTimeout => "retransmit_timeout",
        Cause::Aborted => "aborted",
        Cause::ListenerClosed => "listener_closed",
        Cause::Unknown => "unknown",
    }
}

pub(super) fn closer_name(c: Closer) -> &'static str {
    match c {
        Closer::Local => "local",
        Closer::Remote => "remote",
        Closer::Simultaneous => "simultaneous",
        Closer::None => "none",
    }
}

fn position<T: PartialEq>(all: &[T], x: &T) -> Option<usize> {
    all.iter().position(|y| y == x)
}

fn counters(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn bump(counters: &[AtomicU64], i: usize, by: u64) {
    counters[i].fetch_add(by, Ordering::Relaxed);
}

/// The counters kept as connections open and close. Lock-free: the drain thread updates them,
/// scrapes and the OTLP exporter read them.
pub struct Metrics {
    opened: Box<[AtomicU64]>,
    /// [direction][failure]
    failures: Box<[AtomicU64]>,
    /// [direction][cause][closer]
    closed: Box<[AtomicU64]>,
    handshake: [Histogram; 2],
    duration: [Histogram; 2],
    syn_retransmits: Box<[AtomicU64]>,
    keepalive_probes: AtomicU64,
    keepalive_dead_peers: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            opened: counters(OPENED.len()),
            failures: counters(CLOSED.len() * FAILURES.len()),
            closed: counters(CLOSED.len() * CAUSES.len() * CLOSERS.len()),
            handshake: [0; 2].map(|_| Histogram::new(HANDSHAKE_BOUNDS_NS)),
            duration: [0; 2].map(|_| Histogram::new(DURATION_BOUNDS_NS)),
            syn_retransmits: counters(OPENED.len()),
            keepalive_probes: AtomicU64::new(0),
            keepalive_dead_peers: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// A connection opened: its first transition (connect()'s SYN_SENT, a SYN at a listener).
    pub fn opened(&self, c: &Connection) {
        if let Some(d) = position(&OPENED, &c.direction) {
            bump(&self.opened, d, 1);
        }
    }

    /// A connection established: its handshake's latency and retransmitted SYNs (SYN-ACKs for
    /// a passive open).
    pub fn established(&self, c: &Connection) {
        let Some(d) = position(&OPENED, &c.direction) else {
            return;
        };
        if let Some(ns) = c.handshake_ns() {
            self.handshake[d].record(ns);
        }
        bump(
            &self.syn_retransmits,
            d,
            u64::from(c.handshake_retransmits()),
        );
    }

    /// A keepalive probe went out.
    pub fn keepalive_probe(&self) {
        self.keepalive_probes.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection's life is complete.
    pub fn closed(&self, c: &Connection) {
        let Some(d) = position(&CLOSED, &c.direction) else {
            return; // a listener
        };
        let cause = c.cause();
        if let Some(f) = FAILURES.iter().position(|&(x, _)| x == cause) {
            bump(&self.failures, d * FAILURES.len() + f, 1);
        }
        if let (Some(k), Some(w)) = (
            position(&CAUSES, &cause),
            position(&CLOSERS, &c.first_closer()),
        ) {
            bump(&self.closed, (d * CAUSES.len() + k) * CLOSERS.len() + w, 1);
        }
        if cause == Cause::KeepaliveTimeout {
            self.keepalive_dead_peers.fetch_add(1, Ordering::Relaxed);
        }
        let Some(d) = position(&OPENED, &c.direction) else {
            return; // first seen mid-life: neither its handshake nor its length is known
        };
        let established = c.path.contains(TcpState::Established);
        if !established {
            // A failed handshake's retransmits; an established one counted them then.
            bump(
                &self.syn_retransmits,
                d,
                u64::from(c.handshake_retransmits()),
            );
        }
        if !c.end_missed() {
            self.duration[d].record(c.duration_ns());
        }
    }
}

/// What the scrape reads from the other stages, as it is then.
#[derive(Clone, Copy, Debug, Default)]
pub struct Live {
    /// Connections the table follows, by [direction of `CLOSED`][state number - 1].
    pub connections: [[u64; TcpState::ALL.len()]; CLOSED.len()],
    /// Losses by stage, in [`LOSS_STAGES`] order.
    pub lost: [u64; LOSS_STAGES.len()],
    /// The kernel's skips of the programs (`kernel_missed`) by hook.
    pub missed_by_hook: [(&'static str, u64); HOOKS.len()],
}

impl Live {
    /// Counts the table's connections by direction and state (listeners left out).
    pub fn count<'a>(&mut self, connections: impl Iterator<Item = &'a Connection>) {
        for c in connections {
            if let Some(d) = position(&CLOSED, &c.direction) {
                self.connections[d][usize::from(c.state as u8 - 1)] += 1;
            }
        }
    }
}

/// One metric family, in the product's own terms: what both exporters translate.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// Without the unit and `_total` suffixes, which each exposition adds its own way.
    pub name: &'static str,
    pub help: &'static str,
    pub seconds: bool,
    pub kind: Kind,
    pub points: Vec<Point>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Info,
}

pub type Labels = Vec<(&'static str, &'static str)>;

#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub labels: Labels,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Counter(u64),
    Gauge(u64),
    Histogram(HistogramValue),
}

/// A histogram in seconds: each bucket's upper bound and its own count (not cumulative), the
/// last one unbounded.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramValue {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl HistogramValue {
    fn of(h: &Histogram) -> HistogramValue {
        let p = h.to_proto();
        // Nanoseconds divided once, so that bounds print as written (0.0003, not 0.00030000000000000003).
        let seconds =
            |d: &prost_types::Duration| (d.seconds as f64 * 1e9 + f64::from(d.nanos)) / 1e9;
        HistogramValue {
            bounds: p
                .buckets
                .iter()
                .filter_map(|b| b.upper_bound.as_ref().map(seconds))
                .collect(),
            counts: p.buckets.iter().map(|b| b.count).collect(),
            sum: p.sum.as_ref().map_or(0.0, seconds),
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

fn counter(
    name: &'static str,
    help: &'static str,
    points: impl Iterator<Item = (Labels, u64)>,
) -> Family {
    Family {
        name,
        help,
        seconds: false,
        kind: Kind::Counter,
        points: points
            .map(|(labels, v)| Point {
                labels,
                value: Value::Counter(v),
            })
            .collect(),
    }
}

fn histograms(name: &'static str, help: &'static str, by_direction: &[Histogram; 2]) -> Family {
    Family {
        name,
        help,
        seconds: true,
        kind: Kind::Histogram,
        points: OPENED
            .iter()
            .zip(by_direction)
            .map(|(d, h)| Point {
                labels: vec![("direction", d.name())],
                value: Value::Histogram(HistogramValue::of(h)),
            })
            .collect(),
    }
}

/// Failures and closes: only the combinations seen, as most never happen (a refused connection
/// has no closer); the bound is the same.
fn seen(counters: &[AtomicU64]) -> impl Fn((Labels, usize)) -> Option<(Labels, u64)> + '_ {
    move |(labels, i)| {
        let v = load(&counters[i]);
        (v > 0).then_some((labels, v))
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Metrics {
    /// Every family, the counters as they are now and the rest from `live`.
    pub fn families(&self, live: &Live) -> Vec<Family> {
        let opened = OPENED
            .iter()
            .enumerate()
            .map(|(i, d)| (vec![("direction", d.name())], load(&self.opened[i])));
        let failures = CLOSED.iter().enumerate().flat_map(|(i, d)| {
            FAILURES.iter().enumerate().map(move |(f, &(_, reason))| {
                (
                    vec![("direction", d.name()), ("reason", reason)],
                    (i * FAILURES.len() + f),
                )
            })
        });
        let closed = CLOSED.iter().enumerate().flat_map(|(i, d)| {
            CAUSES.iter().enumerate().flat_map(move |(k, &cause)| {
                CLOSERS.iter().enumerate().map(move |(w, &closer)| {
                    (
                        vec![
                            ("direction", d.name()),
                            ("cause", cause_name(cause)),
                            ("closer", closer_name(closer)),
                        ],
                        (i * CAUSES.len() + k) * CLOSERS.len() + w,
                    )
                })
            })
        });
        let live_connections = CLOSED.iter().enumerate().flat_map(|(i, d)| {
            TcpState::ALL.iter().filter_map(move |&s| {
                let n = live.connections[i][usize::from(s as u8 - 1)];
                // Every direction's ESTABLISHED always, so a dashboard sees 0, not nothing.
                (n > 0 || s == TcpState::Established).then(|| Point {
                    labels: vec![("direction", d.name()), ("state", state_label(s))],
                    value: Value::Gauge(n),
                })
            })
        });
        vec![
            counter(
                "tcptrace_connections_opened",
                "TCP connections opened: active (connect) or passive (a SYN at a listener).",
                opened,
            ),
            counter(
                "tcptrace_connection_failures",
                "Connections that ended in failure, by reason.",
                failures.filter_map(seen(&self.failures)),
            ),
            counter(
                "tcptrace_connections_closed",
                "Connections whose life ended, by cause and by the side that sent the first FIN.",
                closed.filter_map(seen(&self.closed)),
            ),
            histograms(
                "tcptrace_handshake_duration",
                "Handshake latency: connect() to ESTABLISHED (active), the SYN-ACK's round trip \
                 (passive). Buckets just past 1, 3 and 7 s hold handshakes that needed 1, 2, 3 \
                 retransmitted SYNs.",
                &self.handshake,
            ),
            histograms(
                "tcptrace_connection_duration",
                "Lifetime of closed connections the agent saw open.",
                &self.duration,
            ),
            counter(
                "tcptrace_syn_retransmits",
                "SYNs (active) and SYN-ACKs (passive) retransmitted during handshakes.",
                OPENED.iter().enumerate().map(|(i, d)| {
                    (
                        vec![("direction", d.name())],
                        load(&self.syn_retransmits[i]),
                    )
                }),
            ),
            counter(
                "tcptrace_keepalive_probes",
                "Keepalive probes sent.",
                std::iter::once((vec![], load(&self.keepalive_probes))),
            ),
            counter(
                "tcptrace_keepalive_dead_peers",
                "Connections closed because their peer did not answer keepalive probes.",
                std::iter::once((vec![], load(&self.keepalive_dead_peers))),
            ),
            Family {
                name: "tcptrace_connections_live",
                help: "Connections the agent follows now, by direction and state.",
                seconds: false,
                kind: Kind::Gauge,
                points: live_connections.collect(),
            },
            counter(
                "tcptrace_events_lost",
                "Records or events lost, by the stage that lost them: the kernel ring was full, \
                 the kernel skipped a program (another tracer on the CPU), a subscriber's queue \
                 was full, the connection table was full, the OTLP queue was full or the \
                 collector refused.",
                LOSS_STAGES
                    .iter()
                    .zip(live.lost)
                    .map(|(&stage, n)| (vec![("stage", stage)], n)),
            ),
            counter(
                "tcptrace_kernel_runs_missed",
                "Runs of the agent's programs the kernel skipped (stage kernel_missed), by hook: \
                 state transitions, tcp retransmits and resets, accept, keepalive timers. A skip \
                 happens when the program, or for the classic tracepoints any tracing program, \
                 was already running on that CPU.",
                live.missed_by_hook
                    .iter()
                    .map(|&(hook, n)| (vec![("hook", hook)], n)),
            ),
            Family {
                name: "tcptrace_build",
                help: "The agent's version.",
                seconds: false,
                kind: Kind::Info,
                points: vec![Point {
                    labels: vec![("version", env!("CARGO_PKG_VERSION"))],
                    value: Value::Gauge(1),
                }],
            },
        ]
    }
}

/// A state as a label value: the kernel's name in lower case.
fn state_label(s: TcpState) -> &'static str {
    match s {
        TcpState::Established => "established",
        TcpState::SynSent => "syn_sent",
        TcpState::SynRecv => "syn_recv",
        TcpState::FinWait1 => "fin_wait1",
        TcpState::FinWait2 => "fin_wait2",
        TcpState::TimeWait => "time_wait",
        TcpState::Close => "close",
        TcpState::CloseWait => "close_wait",
        TcpState::LastAck => "last_ack",
        TcpState::Listen => "listen",
        TcpState::Closing => "closing",
        TcpState::NewSynRecv => "new_syn_recv",
        TcpState::BoundInactive => "bound_inactive",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_stays_within_the_stated_series_bound_when_every_counter_moved() {
        let metrics = Metrics::default();
        for counters in [
            &metrics.opened,
            &metrics.failures,
            &metrics.closed,
            &metrics.syn_retransmits,
        ] {
            for c in counters.iter() {
                c.store(1, Ordering::Relaxed);
            }
        }
        let live = Live {
            connections: [[1; TcpState::ALL.len()]; CLOSED.len()],
            lost: [1; LOSS_STAGES.len()],
            missed_by_hook: HOOKS.map(|hook| (hook, 1)),
        };
        let series: usize = metrics.families(&live).iter().map(|f| f.points.len()).sum();
        assert_eq!(series, MAX_SERIES);
    }

    #[test]
    fn handshake_buckets_separate_zero_one_two_and_three_syn_retransmits() {
        let h = Histogram::new(HANDSHAKE_BOUNDS_NS);
        // Loopback-fast answers after 0, 1, 2, 3 retransmitted SYNs (RTO 1 s, doubling).
        for ns in [50_000, 1_000_050_000, 3_000_050_000, 7_000_050_000] {
            h.record(ns);
        }
        let v = HistogramValue::of(&h);
        let buckets: Vec<usize> = v
            .counts
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(buckets.len(), 4, "each in its own bucket: {buckets:?}");
        let upper: Vec<f64> = buckets.iter().map(|&i| v.bounds[i]).collect();
        assert_eq!(upper, [0.0001, 1.5, 3.5, 7.5]);
    }
}
