//! The connection table: what a socket's transitions mean as one connection's life. Pure and
//! synchronous; the agent feeds it transitions in the order the kernel reserved their records.
//!
//! Per socket that order is the order of the transitions: `tcp_set_state()` runs under the socket
//! lock, and the record is reserved inside the tracepoint, before the lock is released.
pub mod peers;
mod socket_map;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
};

pub use peers::{PeerKey, PeerStats, Peers};
use socket_map::SocketMap;

pub use crate::model::Direction;

use crate::model::{
    Accept, Context, KeepaliveOption, KeepaliveTimer, Reset, Retransmit, SocketOption, Task,
    TcpState, Transition,
};

const ECONNRESET: u32 = 104;
const ENETUNREACH: u32 = 101;
const EHOSTUNREACH: u32 = 113;
const ECONNREFUSED: u32 = 111;
const ETIMEDOUT: u32 = 110;
const EPIPE: u32 = 32;

/// Why a process is named as a connection's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerSource {
    /// A transition of this socket ran in the process's own system call (connect, listen, close).
    ProcessContext,
    /// Inherited from the listening socket the connection was accepted from.
    Listener,
    /// The process whose accept() returned the socket.
    Accepted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub task: Task,
    pub source: OwnerSource,
}

/// The states a connection went through. Fixed capacity so the table never allocates per
/// transition; a connection longer than that (rare: a normal life has 4-6 states) keeps its
/// first states, and the connection counts the rest ([`Connection::path_truncated`]). Four bits
/// a state (the kernel numbers them 1-13): the table holds one path per tracked socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path {
    /// State `i` in the low (even `i`) or high (odd `i`) half of byte `i / 2`.
    packed: [u8; Path::CAPACITY / 2],
    len: u8,
}

impl Path {
    pub const CAPACITY: usize = 12;

    fn starting_at(state: TcpState) -> Path {
        let mut path = Path {
            packed: [0; Path::CAPACITY / 2],
            len: 0,
        };
        path.push(state);
        path
    }

    /// Appends `state`; false if the path is full and it was not kept.
    fn push(&mut self, state: TcpState) -> bool {
        let i = usize::from(self.len);
        if i == Path::CAPACITY {
            return false;
        }
        self.packed[i / 2] |= (state as u8) << (4 * (i % 2));
        self.len += 1;
        true
    }

    fn get(&self, i: usize) -> TcpState {
        let number = (self.packed[i / 2] >> (4 * (i % 2))) & 0xf;
        // Only push() writes, and only TcpState numbers.
        TcpState::from_kernel(number).expect("a path holds only states")
    }

    /// The states kept, first to last.
    pub fn states(&self) -> impl DoubleEndedIterator<Item = TcpState> + ExactSizeIterator + '_ {
        (0..usize::from(self.len)).map(|i| self.get(i))
    }
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// FINs both ways.
    Orderly,
    /// This host aborted it with a reset (SO_LINGER 0, close() with unread data, ...).
    ResetSent,
    /// The peer reset it.
    ResetReceived,
    /// The peer answered the SYN with a reset: nothing listens there.
    Refused,
    /// No answer to the SYNs (ETIMEDOUT in SYN_SENT).
    ConnectTimeout,
    /// ICMP unreachable (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// Keepalive probes went unanswered: the peer was declared dead.
    KeepaliveTimeout,
    /// Data went unacknowledged until the retransmission timer gave up.
    RetransmitTimeout,
    /// Closed before it was established, without an error (e.g. a non-blocking connect()
    /// abandoned).
    Aborted,
    /// A listening socket was closed.
    ListenerClosed,
    /// First seen mid-life and closed without a telling sign.
    Unknown,
}

/// Which side sent the first FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closer {
    Local,
    Remote,
    /// Both FINs crossed (CLOSING).
    Simultaneous,
    /// No FIN: never established, or reset.
    None,
}

/// What is known of a connection's keepalive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keepalive {
    pub enabled: bool,
    /// Set on the socket (TCP_KEEPIDLE/INTVL/CNT); None = the namespace's sysctl. The kernel
    /// takes only values from 1, so the zero niche keeps each in 4 bytes.
    pub idle_s: Option<NonZeroU32>,
    pub interval_s: Option<NonZeroU32>,
    pub count: Option<NonZeroU32>,
    /// Probes sent and not (yet) answered.
    pub unanswered: u32,
    /// Probes sent over the connection's life.
    pub probes: u32,
}

/// The namespace's keepalive defaults (net.ipv4.tcp_keepalive_time/intvl/probes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveDefaults {
    pub idle_s: u32,
    pub interval_s: u32,
    pub count: u32,
}

impl KeepaliveDefaults {
    /// Linux's built-in defaults, for namespaces whose sysctls could not be read.
    pub const LINUX: KeepaliveDefaults = KeepaliveDefaults {
        idle_s: 7200,
        interval_s: 75,
        count: 9,
    };
}

/// Effective keepalive settings: the socket's own where set, else the namespace's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveSettings {
    pub idle_s: u32,
    pub interval_s: u32,
    pub count: u32,
}

impl Keepalive {
    /// Never configured, no probes sent.
    pub const OFF: Keepalive = Keepalive {
        enabled: false,
        idle_s: None,
        interval_s: None,
        count: None,
        unanswered: 0,
        probes: 0,
    };

    pub fn effective(&self, defaults: KeepaliveDefaults) -> KeepaliveSettings {
        KeepaliveSettings {
            idle_s: self.idle_s.map_or(defaults.idle_s, NonZeroU32::get),
            interval_s: self.interval_s.map_or(defaults.interval_s, NonZeroU32::get),
            count: self.count.map_or(defaults.count, NonZeroU32::get),
        }
    }
}

/// One tracked socket's life. The table holds one per socket (100,000 and more), so it is kept
/// small: addresses without `SocketAddr`'s IPv6 flow and scope fields (the kernel's records
/// carry neither), the owner without an `Option` tag, the path four bits a state, and what most
/// connections never get (keepalive, resets, retransmits) or get only as they close (error,
/// byte counts) in [`Details`], allocated when the first of it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Unique for the agent's life.
    pub id: u64,
    pub sock: u64,
    pub netns: u32,
    local_ip: IpAddr,
    local_port: u16,
    remote_ip: IpAddr,
    remote_port: u16,
    pub direction: Direction,
    /// The owner's task, meaningful when `owner_source` is set.
    owner_task: Task,
    owner_source: Option<OwnerSource>,
    pub state: TcpState,
    /// Kernel time of the first transition seen.
    pub opened_ns: u64,
    /// Kernel time of the latest transition.
    pub last_ns: u64,
    pub path: Path,
    /// [`Connection::handshake_ns`], or `NO_HANDSHAKE`.
    handshake_ns: u64,
    /// Smoothed RTT at the last sample the agent got (establishment or close), microseconds.
    pub srtt_us: u32,
    details: Option<Box<Details>>,
}

/// The owner's task of a connection that has none.
const NO_TASK: Task = Task {
    pid: 0,
    tid: 0,
    comm: [0; 16],
};

/// No handshake measured: a latency no monotonic clock reaches (584 years).
const NO_HANDSHAKE: u64 = u64::MAX;

/// What most connections never have, or have only once they closed. All zero (and keepalive
/// off) until set; the public accessors of [`Connection`] say what each means.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Details {
    keepalive: Keepalive,
    keepalive_defaults: Option<KeepaliveDefaults>,
    handshake_retransmits: u32,
    retransmits: u32,
    resets_sent: u32,
    resets_received: u32,
    error: u32,
    path_truncated: u32,
    /// The socket opened again before its CLOSE was seen (a record the kernel skipped): the
    /// life ended somewhere after its last transition, nobody knows how.
    end_missed: bool,
    /// Payload bytes sent and acknowledged, and received, as the kernel counts them at close
    /// (see [`Connection::payload_bytes`]).
    bytes_sent: u64,
    bytes_received: u64,
}

impl Details {
    /// The details of a connection that has none.
    const NONE: Details = Details {
        keepalive: Keepalive::OFF,
        keepalive_defaults: None,
        handshake_retransmits: 0,
        retransmits: 0,
        resets_sent: 0,
        resets_received: 0,
        error: 0,
        path_truncated: 0,
        end_missed: false,
        bytes_sent: 0,
        bytes_received: 0,
    };
}

impl Connection {
    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(self.local_ip, self.local_port)
    }

    pub fn remote(&self) -> SocketAddr {
        SocketAddr::new(self.remote_ip, self.remote_port)
    }

    pub fn owner(&self) -> Option<Owner> {
        self.owner_source.map(|source| Owner {
            task: self.owner_task,
            source,
        })
    }

    /// Whether the agent saw the connection open (else path and duration start mid-life).
    pub fn seen_open(&self) -> bool {
        self.direction != Direction::Unknown
    }

    /// Handshake latency, once established. Active: connect() (SYN_SENT) to ESTABLISHED.
    /// Passive: the SYN-ACK's round trip, the kernel's first RTT sample (the child socket only
    /// exists once the final ACK is in, so its SYN_RECV -> ESTABLISHED takes microseconds).
    pub fn handshake_ns(&self) -> Option<u64> {
        (self.handshake_ns != NO_HANDSHAKE).then_some(self.handshake_ns)
    }

    /// SYNs (active) or SYN-ACKs (passive) retransmitted during the handshake, known once it
    /// completed or failed.
    pub fn handshake_retransmits(&self) -> u32 {
        self.details().handshake_retransmits
    }

    /// Segments retransmitted (live count; at close the kernel's own total).
    pub fn retransmits(&self) -> u32 {
        self.details().retransmits
    }

    pub fn resets_sent(&self) -> u32 {
        self.details().resets_sent
    }

    pub fn resets_received(&self) -> u32 {
        self.details().resets_received
    }

    pub fn keepalive(&self) -> Keepalive {
        self.details().keepalive
    }

    /// The namespace's keepalive sysctls, once keepalive was configured on the socket.
    pub fn keepalive_defaults(&self) -> Option<KeepaliveDefaults> {
        self.details().keepalive_defaults
    }

    /// `sk_err` when it closed (errno), 0 if none.
    pub fn error(&self) -> u32 {
        self.details().error
    }

    /// States that did not fit in the path.
    /// Whether the life was summarized without its CLOSE (the socket opened again first).
    pub fn end_missed(&self) -> bool {
        self.details().end_missed
    }

    pub fn path_truncated(&self) -> u32 {
        self.details().path_truncated
    }

    fn details(&self) -> &Details {
        self.details.as_deref().unwrap_or(&Details::NONE)
    }

    fn details_mut(&mut self) -> &mut Details {
        self.details.get_or_insert_default()
    }

    /// Sets one of the details, allocating them only for a value other than the default.
    fn set_detail<T: Default + PartialEq>(&mut self, value: T, field: fn(&mut Details) -> &mut T) {
        if self.details.is_some() || value != T::default() {
            *field(self.details_mut()) = value;
        }
    }

    fn set_endpoints(&mut self, local: SocketAddr, remote: SocketAddr) {
        (self.local_ip, self.local_port) = (local.ip(), local.port());
        (self.remote_ip, self.remote_port) = (remote.ip(), remote.port());
    }

    fn set_owner(&mut self, task: Task, source: OwnerSource) {
        self.owner_task = task;
        self.owner_source = Some(source);
    }

    fn enter(&mut self, state: TcpState) {
        self.state = state;
        if !self.path.push(state) {
            self.details_mut().path_truncated += 1;
        }
    }

    pub fn duration_ns(&self) -> u64 {
        self.last_ns.saturating_sub(self.opened_ns)
    }

    fn visited(&self, state: TcpState) -> bool {
        self.path.states().any(|s| s == state)
    }

    /// Payload bytes sent (and acknowledged) and received. The kernel counts sequence space,
    /// where a SYN and a FIN take one each: `bytes_acked` includes our SYN when we connected
    /// (the SYN-ACK's ack moves snd_una; an accepted socket starts past it), and each side's
    /// FIN once acknowledged (we went on from FIN_WAIT1, or LAST_ACK ended orderly) or
    /// received (CLOSE_WAIT, CLOSING, or an orderly end after FIN_WAIT2).
    pub fn payload_bytes(&self) -> (u64, u64) {
        let orderly = self.cause() == Cause::Orderly;
        let ended_from = |s: TcpState| self.path.states().rev().nth(1) == Some(s);
        let our_fin_acked = self.visited(TcpState::FinWait2)
            || (orderly && (ended_from(TcpState::LastAck) || self.visited(TcpState::Closing)));
        let their_fin_received = self.visited(TcpState::CloseWait)
            || self.visited(TcpState::Closing)
            || (orderly && ended_from(TcpState::FinWait2));
        let our_syn_acked =
            self.direction == Direction::Active && self.visited(TcpState::Established);
        let details = self.details();
        (
            details
                .bytes_sent
                .saturating_sub(u64::from(our_fin_acked) + u64::from(our_syn_acked)),
            details
                .bytes_received
                .saturating_sub(u64::from(their_fin_received)),
        )
    }

    /// Who sent the first FIN, from the states the connection went through.
    pub fn first_closer(&self) -> Closer {
        let at = |s| self.path.states().position(|x| x == s);
        match (
            at(TcpState::FinWait1),
            at(TcpState::CloseWait),
            at(TcpState::Closing),
        ) {
            (_, _, Some(_)) => Closer::Simultaneous,
            (Some(_), None, _) => Closer::Local,
            (None, Some(_), _) => Closer::Remote,
            (Some(a), Some(b), _) if a < b => Closer::Local,
            (Some(_), Some(_), _) => Closer::Remote,
            (None, None, _) => Closer::None,
        }
    }

    /// Why it ended; meaningful once it is closed.
    pub fn cause(&self) -> Cause {
        if self.direction == Direction::Listen {
            return Cause::ListenerClosed;
        }
        let established = self.visited(TcpState::Established);
        let details = self.details();
        if details.end_missed {
            return Cause::Unknown;
        }
        match details.error {
            ECONNREFUSED => return Cause::Refused,
            EHOSTUNREACH | ENETUNREACH => return Cause::Unreachable,
            ETIMEDOUT if !established => return Cause::ConnectTimeout,
            ETIMEDOUT if details.keepalive.unanswered > 0 => return Cause::KeepaliveTimeout,
            ETIMEDOUT => return Cause::RetransmitTimeout,
            ECONNRESET | EPIPE => return Cause::ResetReceived,
            _ => {}
        }
        if details.resets_received > 0 {
            Cause::ResetReceived
        } else if details.resets_sent > 0 {
            Cause::ResetSent
        } else if !established && self.seen_open() {
            Cause::Aborted
        } else if self.first_closer() != Closer::None {
            Cause::Orderly
        } else {
            Cause::Unknown
        }
    }
}

/// What one transition did to the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The connection after the transition.
    pub connection: Connection,
    /// The transition was to CLOSE: the connection's life is over and it left the table.
    pub closed: bool,
}

/// What a keepalive record meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepaliveChange {
    /// SO_KEEPALIVE turned on, or off, or one of its settings changed (by `task`).
    Configured {
        option: KeepaliveOption,
        value: i32,
        task: Task,
    },
    /// Probe number `probe` of the current unanswered series went out.
    ProbeSent { probe: u32 },
    /// The peer answered after `probes` probes: it is alive.
    PeerAnswered { probes: u32 },
}

#[derive(Debug)]
pub struct Table {
    connections: SocketMap<Connection>,
    /// Connections that reached CLOSE, held for one more drain so that what the kernel reports
    /// right after tcp_done() (the reset a close sends, the keepalive timer's exit) still
    /// joins them. Keyed by socket.
    closing: SocketMap<(Connection, u64)>,
    /// Closed lives completed early (their socket was reused), for the next end_batch.
    finished: Vec<Connection>,
    batch: u64,
    /// (netns, port) of listening sockets -> their owner, to name the owner of accepted
    /// connections: the passive open runs in softirq, where no process is current.
    listeners: HashMap<(u32, u16), Task>,
    max_connections: usize,
    next_id: u64,
    /// New connections not followed because the table was full.
    pub table_full: u64,
    /// Opening transitions for a socket the table still held: its CLOSE was never seen.
    pub reopened: u64,
    /// Aggregates per remote peer.
    pub peers: Peers,
}

impl Table {
    pub fn new(max_connections: usize, peers: Peers) -> Table {
        Table {
            connections: SocketMap::default(),
            closing: SocketMap::default(),
            finished: Vec::new(),
            batch: 0,
            listeners: HashMap::new(),
            max_connections,
            next_id: 1,
            table_full: 0,
            reopened: 0,
            peers,
        }
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// Connections the table holds without growing.
    pub fn capacity(&self) -> usize {
        self.connections.capacity()
    }

    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.connections.values()
    }

    /// Ends a drain: returns (into `out`) the connections that reached CLOSE in an earlier
    /// drain, whose lives are now complete.
    pub fn end_batch(&mut self, out: &mut Vec<Connection>) {
        let batch = self.batch;
        out.append(&mut self.finished);
        let done = self
            .closing
            .extract_if(|_, (_, closed_in)| *closed_in < batch)
            .map(|(_, (connection, _))| connection);
        out.extend(done);
        for connection in out.iter() {
            self.peers.closed(connection);
        }
        self.batch += 1;
    }

    /// Every connection still held as closing (at shutdown).
    pub fn flush_closing(&mut self, out: &mut Vec<Connection>) {
        out.append(&mut self.finished);
        out.extend(self.closing.drain().map(|(_, (c, _))| c));
    }

    /// The live connection of a socket, or the one that just closed.
    fn connection_mut(&mut self, sock: u64) -> Option<&mut Connection> {
        match self.connections.get_mut(&sock) {
            Some(c) => Some(c),
            None => self.closing.get_mut(&sock).map(|(c, _)| c),
        }
    }

    pub fn retransmit(&mut self, r: &Retransmit) -> Option<Connection> {
        if r.syn_ack {
            // The request socket is not a connection yet; the child's handshake carries the
            // kernel's count of SYN-ACK retransmits once it exists.
            return None;
        }
        let c = self.connection_mut(r.sock)?;
        c.details_mut().retransmits += 1;
        Some(c.clone())
    }

    /// accept() returned the socket to a process: that process owns the connection now.
    pub fn accepted(&mut self, a: &Accept) -> Option<Connection> {
        let c = self.connection_mut(a.sock)?;
        c.set_owner(a.task, OwnerSource::Accepted);
        Some(c.clone())
    }

    pub fn reset(&mut self, r: &Reset) -> Option<Connection> {
        let c = self.connection_mut(r.sock)?;
        let details = c.details_mut();
        if r.sent {
            details.resets_sent += 1;
        } else {
            details.resets_received += 1;
        }
        Some(c.clone())
    }

    /// What a run of the keepalive timer meant: the peer answering the previous series (its
    /// ACK reset the kernel's count to 0), a probe going out, or both.
    pub fn keepalive_timer(
        &mut self,
        k: &KeepaliveTimer,
    ) -> Option<(Connection, [Option<KeepaliveChange>; 2])> {
        let c = self.connection_mut(k.sock)?;
        let mut changes = [None, None];
        if k.probes_before == 0 && c.keepalive().unanswered > 0 {
            let probes = std::mem::take(&mut c.details_mut().keepalive.unanswered);
            changes[0] = Some(KeepaliveChange::PeerAnswered { probes });
        }
        if k.probes_after > k.probes_before {
            let keepalive = &mut c.details_mut().keepalive;
            keepalive.unanswered = u32::from(k.probes_after);
            keepalive.probes += 1;
            changes[1] = Some(KeepaliveChange::ProbeSent {
                probe: u32::from(k.probes_after),
            });
        }
        if changes == [None, None] {
            return None;
        }
        Some((c.clone(), changes))
    }

    pub fn socket_option(
        &mut self,
        o: &SocketOption,
        defaults: KeepaliveDefaults,
    ) -> Option<(Connection, KeepaliveChange)> {
        let c = self.connection_mut(o.sock)?;
        let details = c.details_mut();
        details.keepalive_defaults = Some(defaults);
        let keepalive = &mut details.keepalive;
        let value = u32::try_from(o.value).ok().and_then(NonZeroU32::new);
        match o.option {
            KeepaliveOption::Enabled => keepalive.enabled = o.value != 0,
            KeepaliveOption::Idle => keepalive.idle_s = value,
            KeepaliveOption::Interval => keepalive.interval_s = value,
            KeepaliveOption::Count => keepalive.count = value,
        }
        Some((
            c.clone(),
            KeepaliveChange::Configured {
                option: o.option,
                value: o.value,
                task: o.task,
            },
        ))
    }

    pub fn apply(&mut self, t: &Transition) -> Applied {
        let opening = opening(t);
        if opening.is_some() {
            // A socket the table still holds: its CLOSE was never seen. Summarize the old life
            // as it stands, cause unknown.
            if let Some(mut old) = self.connections.remove(&t.sock) {
                self.reopened += 1;
                old.details_mut().end_missed = true;
                self.finished.push(old);
            }
            // A socket reused after CLOSE: the old life is complete now.
            if let Some((old, _)) = self.closing.remove(&t.sock) {
                self.finished.push(old);
            }
        }
        let mut connection = match self.connections.get(&t.sock) {
            Some(existing) => existing.clone(),
            None => self.open(t, opening),
        };
        let entered_from = connection.state;
        connection.enter(t.new);
        connection.last_ns = t.ts_ns;
        match t.new {
            TcpState::Established => {
                connection.srtt_us = t.srtt_us;
                match entered_from {
                    TcpState::SynSent => {
                        // An active open's life starts at connect()'s SYN_SENT.
                        connection.handshake_ns = if connection.direction == Direction::Active {
                            t.ts_ns.saturating_sub(connection.opened_ns)
                        } else {
                            NO_HANDSHAKE
                        };
                        connection.set_detail(t.total_retrans, |d| &mut d.handshake_retransmits);
                    }
                    TcpState::SynRecv => {
                        connection.handshake_ns = u64::from(t.srtt_us) * 1000;
                        connection.set_detail(t.total_retrans, |d| &mut d.handshake_retransmits);
                    }
                    _ => {}
                }
            }
            TcpState::Close => {
                connection.set_detail(t.error, |d| &mut d.error);
                connection.set_detail(t.bytes_acked, |d| &mut d.bytes_sent);
                connection.set_detail(t.bytes_received, |d| &mut d.bytes_received);
                if t.srtt_us != 0 {
                    connection.srtt_us = t.srtt_us;
                }
                // The kernel's own count of retransmitted segments, SYNs included.
                let retransmits = connection.retransmits().max(t.total_retrans);
                connection.set_detail(retransmits, |d| &mut d.retransmits);
                if !connection.visited(TcpState::Established) {
                    connection.set_detail(t.total_retrans, |d| &mut d.handshake_retransmits);
                }
            }
            _ => {}
        }
        // Ports and addresses fill in as the kernel assigns them (connect() reports SYN_SENT
        // before the source port is chosen).
        connection.set_endpoints(t.local, t.remote);
        if connection.owner_source.is_none()
            && let Context::Process(task) = t.context
        {
            connection.set_owner(task, OwnerSource::ProcessContext);
        }
        self.track_listener(t, &connection);
        if opening.is_some() {
            self.peers.opened(&connection);
        }
        if t.new == TcpState::Established {
            self.peers.established(&connection);
        }
        let closed = t.new == TcpState::Close;
        if closed {
            self.connections.remove(&t.sock);
            self.closing
                .insert(t.sock, (connection.clone(), self.batch));
        } else if let Some(slot) = self.connections.get_mut(&t.sock) {
            slot.clone_from(&connection);
        } else if self.connections.len() < self.max_connections {
            self.connections.insert(t.sock, connection.clone());
        } else {
            self.table_full += 1;
        }
        Applied { connection, closed }
    }

    fn open(&mut self, t: &Transition, opening: Option<Direction>) -> Connection {
        let id = self.next_id;
        self.next_id += 1;
        let direction = opening.unwrap_or(Direction::Unknown);
        let listener = match direction {
            Direction::Passive => self.listeners.get(&(t.netns, t.local.port())).copied(),
            _ => None,
        };
        Connection {
            id,
            sock: t.sock,
            netns: t.netns,
            local_ip: t.local.ip(),
            local_port: t.local.port(),
            remote_ip: t.remote.ip(),
            remote_port: t.remote.port(),
            direction,
            owner_task: listener.unwrap_or(NO_TASK),
            owner_source: listener.map(|_| OwnerSource::Listener),
            state: t.old,
            opened_ns: t.ts_ns,
            last_ns: t.ts_ns,
            path: Path::starting_at(t.old),
            handshake_ns: NO_HANDSHAKE,
            srtt_us: 0,
            details: None,
        }
    }

    fn track_listener(&mut self, t: &Transition, connection: &Connection) {
        let key = (t.netns, t.local.port());
        match (t.old, t.new) {
            (_, TcpState::Listen) => {
                if let Some(owner) = connection.owner() {
                    self.listeners.insert(key, owner.task);
                }
            }
            (TcpState::Listen, TcpState::Close) => {
                self.listeners.remove(&key);
            }
            _ => {}
        }
    }
}

/// The transitions that start a socket's life, and what kind of life.
pub fn opening(t: &Transition) -> Option<Direction> {
    match (t.old, t.new) {
        (TcpState::Close, TcpState::SynSent) => Some(Direction::Active),
        (TcpState::Close, TcpState::Listen) => Some(Direction::Listen),
        (TcpState::Listen, TcpState::SynRecv) => Some(Direction::Passive),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{KeepaliveOption, KeepaliveTimer, Reset, SocketOption};
    use TcpState::*;

    fn task(pid: u32) -> Task {
        let mut comm = [0u8; 16];
        comm[..3].copy_from_slice(b"app");
        Task {
            pid,
            tid: pid,
            comm,
        }
    }

    fn t(sock: u64, ts: u64, old: TcpState, new: TcpState, context: Context) -> Transition {
        Transition {
            ts_ns: ts,
            sock,
            netns: 7,
            old,
            new,
            local: "127.0.0.1:8080".parse().unwrap(),
            remote: "127.0.0.1:40000".parse().unwrap(),
            context,
            cpu: 0,
            error: 0,
            srtt_us: 0,
            total_retrans: 0,
            bytes_acked: 0,
            bytes_received: 0,
        }
    }

    const KERNEL: Context = Context::Kernel;

    #[test]
    fn an_active_connection_lives_from_syn_sent_to_close() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        let p = Context::Process(task(100));
        let steps = [
            (Close, SynSent, p),
            (SynSent, Established, KERNEL),
            (Established, FinWait1, p),
            (FinWait1, FinWait2, KERNEL),
            (FinWait2, Close, KERNEL),
        ];
        let mut last = None;
        for (i, (old, new, ctx)) in steps.into_iter().enumerate() {
            last = Some(table.apply(&t(1, 1000 * i as u64, old, new, ctx)));
        }
        let last = last.unwrap();
        assert!(last.closed);
        let c = last.connection;
        assert_eq!(c.direction, Direction::Active);
        assert!(c.seen_open());
        assert_eq!(
            c.path.states().collect::<Vec<_>>(),
            [Close, SynSent, Established, FinWait1, FinWait2, Close]
        );
        assert_eq!(c.duration_ns(), 4000);
        assert_eq!(c.owner().unwrap().task.pid, 100);
        assert_eq!(c.owner().unwrap().source, OwnerSource::ProcessContext);
        assert!(table.is_empty());
    }

    #[test]
    fn kernel_context_transitions_never_name_the_interrupted_task_as_owner() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        let applied = table.apply(&t(1, 0, Listen, SynRecv, KERNEL));
        assert_eq!(applied.connection.owner(), None);
        assert_eq!(applied.connection.direction, Direction::Passive);
    }

    #[test]
    fn accepted_connections_inherit_the_listeners_owner() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        table.apply(&t(1, 0, Close, Listen, Context::Process(task(42))));
        let child = table.apply(&t(2, 5, Listen, SynRecv, KERNEL)).connection;
        let owner = child.owner().unwrap();
        assert_eq!((owner.task.pid, owner.source), (42, OwnerSource::Listener));
        // Once the listener closes, new children have no owner to inherit.
        table.apply(&t(1, 6, Listen, Close, Context::Process(task(42))));
        assert_eq!(
            table
                .apply(&t(3, 7, Listen, SynRecv, KERNEL))
                .connection
                .owner(),
            None
        );
    }

    #[test]
    fn a_reused_socket_address_is_a_new_connection() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        let p = Context::Process(task(1));
        let first = table.apply(&t(1, 0, Close, SynSent, p)).connection.id;
        table.apply(&t(1, 1, SynSent, Close, KERNEL));
        let second = table.apply(&t(1, 2, Close, SynSent, p)).connection.id;
        assert_ne!(first, second);
        assert_eq!(table.reopened, 0);
        // An opening transition for a socket still in the table: its CLOSE was lost.
        let third = table.apply(&t(1, 3, Close, SynSent, p)).connection.id;
        assert_ne!(second, third);
        assert_eq!(table.reopened, 1);
        assert_eq!(table.len(), 1);
        // The life whose end was missed is still summarized, with no cause made up.
        let mut done = Vec::new();
        table.end_batch(&mut done);
        let missed = done.iter().find(|c| c.id == second).unwrap();
        assert_eq!(missed.cause(), Cause::Unknown);
        assert_eq!(missed.state, SynSent);
    }

    #[test]
    fn connections_first_seen_mid_life_say_so() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        let c = table
            .apply(&t(9, 50, Established, FinWait1, KERNEL))
            .connection;
        assert_eq!(c.direction, Direction::Unknown);
        assert!(!c.seen_open());
        assert_eq!(c.path.states().collect::<Vec<_>>(), [Established, FinWait1]);
    }

    #[test]
    fn a_full_table_counts_what_it_could_not_follow() {
        let mut table = Table::new(1, Peers::new(10, 1_000));
        let p = Context::Process(task(1));
        table.apply(&t(1, 0, Close, SynSent, p));
        let applied = table.apply(&t(2, 0, Close, SynSent, p));
        assert_eq!(applied.connection.state, SynSent); // the event itself is still reported
        assert_eq!(table.len(), 1);
        assert_eq!(table.table_full, 1);
    }

    #[test]
    fn long_paths_keep_their_first_states_and_count_the_rest() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        let mut last = None;
        for i in 0..20u64 {
            let (old, new) = if i % 2 == 0 {
                (Established, CloseWait)
            } else {
                (CloseWait, Established)
            };
            last = Some(table.apply(&t(1, i, old, new, KERNEL)).connection);
        }
        let last = last.unwrap();
        assert_eq!(last.path.states().len(), Path::CAPACITY);
        assert_eq!(last.path_truncated(), 21 - Path::CAPACITY as u32);
    }

    fn finish(table: &mut Table) -> Vec<Connection> {
        let mut out = Vec::new();
        table.end_batch(&mut out);
        table.end_batch(&mut out);
        out
    }

    fn close_with(error: u32, from: TcpState) -> Transition {
        Transition {
            error,
            ..t(1, 10, from, Close, KERNEL)
        }
    }

    #[test]
    fn a_refused_connect_is_a_failure_with_its_reason_not_a_short_connection() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        table.apply(&t(1, 0, Close, SynSent, Context::Process(task(1))));
        table.apply(&close_with(ECONNREFUSED, SynSent));
        let [c] = &finish(&mut table)[..] else {
            panic!("one life completes")
        };
        assert_eq!(c.cause(), Cause::Refused);
        assert_eq!(c.first_closer(), Closer::None);
        assert_eq!(c.handshake_ns(), None);
    }

    #[test]
    fn a_summary_waits_one_drain_so_a_reset_sent_after_close_joins_it() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        table.apply(&t(1, 0, Close, SynSent, Context::Process(task(1))));
        table.apply(&t(1, 1, SynSent, Established, KERNEL));
        table.apply(&t(1, 2, Established, Close, Context::Process(task(1))));
        let mut out = Vec::new();
        table.end_batch(&mut out);
        assert!(out.is_empty(), "held for one more drain");
        // tcp_disconnect() moves to CLOSE first and sends the reset after.
        let reset = Reset {
            ts_ns: 3,
            sock: 1,
            netns: 7,
            sent: true,
            reason: 0,
            tuple: None,
        };
        assert!(table.reset(&reset).is_some());
        table.end_batch(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].cause(), Cause::ResetSent);
    }

    #[test]
    fn causes_follow_the_socket_error_and_what_the_connection_went_through() {
        let established = |table: &mut Table| {
            table.apply(&t(1, 0, Close, SynSent, Context::Process(task(1))));
            table.apply(&Transition {
                srtt_us: 50,
                total_retrans: 1,
                ..t(1, 1_000_000, SynSent, Established, KERNEL)
            });
        };
        let cases = [
            (ETIMEDOUT, true, Cause::KeepaliveTimeout),
            (ETIMEDOUT, false, Cause::RetransmitTimeout),
            (ECONNRESET, false, Cause::ResetReceived),
            (0, false, Cause::Unknown),
        ];
        for (error, probing, expected) in cases {
            let mut table = Table::new(10, Peers::new(10, 1_000));
            established(&mut table);
            if probing {
                let timer = KeepaliveTimer {
                    ts_ns: 2,
                    sock: 1,
                    netns: 7,
                    probes_before: 0,
                    probes_after: 1,
                };
                table.keepalive_timer(&timer).unwrap();
            }
            table.apply(&close_with(error, Established));
            let [c] = &finish(&mut table)[..] else {
                panic!()
            };
            assert_eq!(c.cause(), expected, "error {error}, probing {probing}");
            assert_eq!(
                (c.handshake_ns(), c.handshake_retransmits()),
                (Some(1_000_000), 1)
            );
        }
    }

    #[test]
    fn keepalive_probes_count_up_and_an_answer_resets_the_series() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        table.apply(&t(1, 0, Close, SynSent, Context::Process(task(1))));
        let timer = |before, after| KeepaliveTimer {
            ts_ns: 5,
            sock: 1,
            netns: 7,
            probes_before: before,
            probes_after: after,
        };
        let (_, changes) = table.keepalive_timer(&timer(0, 1)).unwrap();
        assert_eq!(
            changes,
            [None, Some(KeepaliveChange::ProbeSent { probe: 1 })]
        );
        let (_, changes) = table.keepalive_timer(&timer(1, 2)).unwrap();
        assert_eq!(
            changes,
            [None, Some(KeepaliveChange::ProbeSent { probe: 2 })]
        );
        // The peer's ACK zeroed the count; this run sends the next series' first probe.
        let (c, changes) = table.keepalive_timer(&timer(0, 1)).unwrap();
        assert_eq!(
            changes,
            [
                Some(KeepaliveChange::PeerAnswered { probes: 2 }),
                Some(KeepaliveChange::ProbeSent { probe: 1 })
            ]
        );
        assert_eq!((c.keepalive().probes, c.keepalive().unanswered), (3, 1));
        assert!(
            table.keepalive_timer(&timer(1, 1)).is_none(),
            "a run that changes nothing says nothing"
        );
    }

    #[test]
    fn socket_options_set_their_own_settings_over_the_namespace_defaults() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        table.apply(&t(1, 0, Close, SynSent, Context::Process(task(1))));
        let defaults = KeepaliveDefaults {
            idle_s: 600,
            interval_s: 30,
            count: 5,
        };
        let set = |option, value| SocketOption {
            ts_ns: 1,
            sock: 1,
            netns: 7,
            option,
            value,
            task: task(1),
        };
        table
            .socket_option(&set(KeepaliveOption::Enabled, 1), defaults)
            .unwrap();
        let (c, _) = table
            .socket_option(&set(KeepaliveOption::Idle, 10), defaults)
            .unwrap();
        assert!(c.keepalive().enabled);
        let effective = c.keepalive().effective(c.keepalive_defaults().unwrap());
        assert_eq!(
            effective,
            KeepaliveSettings {
                idle_s: 10,
                interval_s: 30,
                count: 5
            }
        );
    }

    #[test]
    fn a_path_gives_back_every_state_it_kept_in_order() {
        let mut path = Path::starting_at(BoundInactive);
        for &state in TcpState::ALL.iter().rev().skip(1) {
            path.push(state);
        }
        let mut kept: Vec<_> = TcpState::ALL.iter().rev().copied().collect();
        kept.truncate(Path::CAPACITY);
        assert_eq!(path.states().collect::<Vec<_>>(), kept);
    }

    #[test]
    fn an_established_connection_without_keepalive_allocates_nothing_beyond_its_slot() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        table.apply(&t(1, 0, Close, SynSent, Context::Process(task(1))));
        let c = table
            .apply(&Transition {
                srtt_us: 50,
                ..t(1, 1_000, SynSent, Established, KERNEL)
            })
            .connection;
        assert_eq!(c.details, None);
        assert_eq!((c.handshake_ns(), c.srtt_us), (Some(1_000), 50));
    }

    #[test]
    fn ipv6_endpoints_come_back_as_they_were_reported() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        let (local, remote) = (
            "[fd00::1]:443".parse().unwrap(),
            "[fd00::2]:50000".parse().unwrap(),
        );
        let c = table
            .apply(&Transition {
                local,
                remote,
                ..t(1, 0, Close, SynSent, Context::Process(task(1)))
            })
            .connection;
        assert_eq!((c.local(), c.remote()), (local, remote));
    }

    #[test]
    fn the_first_fin_names_who_closed() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        for (i, (old, new)) in [
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, CloseWait),
            (CloseWait, LastAck),
            (LastAck, Close),
        ]
        .into_iter()
        .enumerate()
        {
            table.apply(&t(2, i as u64, old, new, KERNEL));
        }
        let [c] = &finish(&mut table)[..] else {
            panic!()
        };
        assert_eq!(
            (c.first_closer(), c.cause()),
            (Closer::Remote, Cause::Orderly)
        );
    }
}

#[cfg(test)]
mod footprint {
    use super::{Connection, Details};

    /// The table holds one per tracked socket in a `HashMap<u64, Connection>`: 100,000 of them
    /// must fit the agent in 64 MiB (docs/benchmarks.md), and hashbrown rounds 100,000 up to
    /// 131,072 slots (16 MiB at 128 bytes). Grow it only knowingly.
    #[test]
    fn a_connection_stays_within_its_memory_budget() {
        let slot = std::mem::size_of::<(u64, Connection)>();
        assert!(slot <= 136, "a table slot takes {slot} bytes");
    }

    /// Allocated for keepalive sockets and at close: one 96-byte malloc chunk at most.
    #[test]
    fn the_details_stay_within_their_memory_budget() {
        let details = std::mem::size_of::<Details>();
        assert!(details <= 88, "the details take {details} bytes");
    }
}
