//! The table of sockets followed now: each kernel record applied to its socket's connection,
//! lives handed out once they end.
use std::{
    collections::{HashMap, hash_map::Entry},
    num::NonZeroU32,
    sync::Arc,
};

use super::{
    Connection, Direction, KeepaliveDefaults, OwnerSource, Path, Peers,
    connection::{Details, NO_HANDSHAKE, NO_TASK},
    heal::{Key, key},
    socket_map::SocketMap,
};
use crate::{
    capture::sockdiag::SocketList,
    model::{
        Accept, Context, KeepaliveOption, KeepaliveTimer, Reset, Retransmit, SocketOption, Task,
        TcpState, Transition,
    },
};

/// The states a socket can sit in that the kernel does not record while it records only opens
/// and closes (`tcp_trace_common::recorded_when_quiet`): a table that heard nothing of them
/// shows the state before.
pub const UNRECORDED_WHEN_QUIET: [TcpState; 5] = [
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Closing,
];

/// The states a row can show while its socket moved on unrecorded: the ones an
/// [`UNRECORDED_WHEN_QUIET`] state follows.
const BEHIND_WHEN_QUIET: [TcpState; 3] = [
    TcpState::Established,
    TcpState::FinWait1,
    TcpState::CloseWait,
];

/// What one transition did to the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied<'a> {
    /// The connection after the transition, where the table holds it.
    pub connection: &'a Connection,
    /// The transition was to CLOSE: the connection's life is over and it left the table.
    pub closed: bool,
    /// The transition began a life (connect, listen, or a SYN at a listener).
    pub opened: bool,
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

/// Spare details the table keeps: a drain's closes at full churn.
const SPARE_DETAILS: usize = 4096;

/// (netns, port) of listening sockets -> their owner.
type Listeners = HashMap<(u32, u16), Task>;

#[derive(Debug)]
pub struct Table {
    pub(super) connections: SocketMap<Connection>,
    /// Connections that reached CLOSE, held for one more drain so that what the kernel reports
    /// right after tcp_done() (the reset a close sends, the keepalive timer's exit) still
    /// joins them. Keyed by socket.
    pub(super) closing: SocketMap<(Connection, u64)>,
    /// Closed lives completed early (their socket was reused), for the next end_batch.
    pub(super) finished: Vec<Connection>,
    pub(super) batch: u64,
    /// (netns, port) of listening sockets -> their owner, to name the owner of accepted
    /// connections: the passive open runs in softirq, where no process is current.
    pub(super) listeners: Listeners,
    pub(super) max_connections: usize,
    /// The connection of the latest transition when the table was full: not followed.
    unfollowed: Option<Connection>,
    /// Details of lives completed, emptied, for the next closes (at most [`SPARE_DETAILS`]).
    spare_details: Vec<Arc<Details>>,
    pub(super) next_id: u64,
    /// New connections not followed because the table was full.
    pub table_full: u64,
    /// Opening transitions for a socket the table still held: its CLOSE was never seen.
    pub reopened: u64,
    /// Keepalive timer runs on sockets the table does not hold.
    pub keepalive_unfollowed: u64,
    /// Aggregates per remote peer.
    pub peers: Peers,
    /// What healing against the kernel's socket list remembers (see `heal`).
    pub(super) healing: super::heal::Healing,
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
            unfollowed: None,
            spare_details: Vec::new(),
            next_id: 1,
            table_full: 0,
            reopened: 0,
            keepalive_unfollowed: 0,
            peers,
            healing: super::heal::Healing::default(),
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

    /// Takes back the details of `lives`, completed and handed out by [`Table::end_batch`],
    /// once nothing needs them, for the connections that close next.
    pub fn recycle(&mut self, lives: impl Iterator<Item = Connection>) {
        for mut life in lives {
            if self.spare_details.len() < SPARE_DETAILS
                && let Some(details) = life.give_back_details()
            {
                self.spare_details.push(details);
            }
        }
    }

    /// Every connection still held as closing (at shutdown).
    pub fn flush_closing(&mut self, out: &mut Vec<Connection>) {
        out.append(&mut self.finished);
        out.extend(self.closing.drain().map(|(_, (c, _))| c));
    }

    /// The live connection of a socket, or the one that just closed.
    fn connection_mut(&mut self, sock: u64) -> Option<&mut Connection> {
        connection_in(&mut self.connections, &mut self.closing, sock)
    }

    pub fn retransmit(&mut self, r: &Retransmit) -> Option<&Connection> {
        if r.syn_ack {
            // The request socket is not a connection yet; the child's handshake carries the
            // kernel's count of SYN-ACK retransmits once it exists.
            return None;
        }
        let c = self.connection_mut(r.sock)?;
        c.details_mut().retransmits += 1;
        Some(c)
    }

    /// accept() returned the socket to a process: that process owns the connection now.
    pub fn accepted(&mut self, a: &Accept) -> Option<&Connection> {
        let c = self.connection_mut(a.sock)?;
        c.set_owner(a.task, OwnerSource::Accepted);
        Some(c)
    }

    pub fn reset(&mut self, r: &Reset) -> Option<&Connection> {
        let c = self.connection_mut(r.sock)?;
        let details = c.details_mut();
        if r.sent {
            details.resets_sent += 1;
        } else {
            details.resets_received += 1;
        }
        Some(c)
    }

    /// What a run of the keepalive timer meant: the peer answering the previous series (its
    /// ACK reset the kernel's count to 0), a probe going out, or both.
    pub fn keepalive_timer(
        &mut self,
        k: &KeepaliveTimer,
    ) -> Option<(&Connection, [Option<KeepaliveChange>; 2])> {
        let Some(c) = connection_in(&mut self.connections, &mut self.closing, k.sock) else {
            self.keepalive_unfollowed += 1;
            return None;
        };
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
        Some((c, changes))
    }

    pub fn socket_option(
        &mut self,
        o: &SocketOption,
        defaults: KeepaliveDefaults,
    ) -> Option<(&Connection, KeepaliveChange)> {
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
            c,
            KeepaliveChange::Configured {
                option: o.option,
                value: o.value,
                task: o.task,
            },
        ))
    }

    /// Applies `t` to its socket's connection, in its slot: no copy of the connection is made
    /// (a copy per record, and one back, were a fifth of the agent's time under churn).
    pub fn apply(&mut self, t: &Transition) -> Applied<'_> {
        let opening = opening(t, || self.connections.contains_key(&t.sock));
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
        } else {
            self.claim_adopted(t);
        }
        let room = self.connections.len() < self.max_connections;
        let connection = match self.connections.entry(t.sock) {
            Entry::Occupied(slot) => slot.into_mut(),
            Entry::Vacant(slot) if room => {
                slot.insert(open(&mut self.next_id, &self.listeners, t, opening))
            }
            // Full: a connection of this one transition, not followed.
            Entry::Vacant(_) => {
                self.table_full += 1;
                self.unfollowed
                    .insert(open(&mut self.next_id, &self.listeners, t, opening))
            }
        };
        let entered_from = connection.state;
        // A dump (`catch_up`) may have moved the row past this transition already, while the
        // record was on its way: the row is not in the state the socket leaves, its path has
        // the one it enters (a socket enters each at most once in a life), and it does not go
        // back.
        let ahead =
            t.new != TcpState::Close && connection.state != t.old && connection.visited(t.new);
        if !ahead {
            // Transitions the kernel did not record (its switch was off) lie between the state
            // the table holds and the one the socket leaves now.
            connection.infer_path_to(t.old);
            connection.enter(t.new);
        }
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
                // A close of a connection that carried data has details: from those of the
                // lives closed before, not a malloc and a free each.
                if t.bytes_acked != 0 || t.bytes_received != 0 || t.error != 0 {
                    connection.take_details(&mut self.spare_details);
                }
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
        track_listener(&mut self.listeners, t, connection);
        if opening.is_some() {
            self.peers.opened(connection);
        }
        if t.new == TcpState::Established {
            self.peers.established(connection);
        }
        let closed = t.new == TcpState::Close;
        let connection = if !closed {
            match self.connections.get(&t.sock) {
                Some(c) => c,
                None => self.unfollowed.as_ref().expect("just set"),
            }
        } else {
            // Held one more drain (see `closing`), moved there whole.
            let connection = match self.connections.remove(&t.sock) {
                Some(c) => c,
                None => self.unfollowed.take().expect("just set"),
            };
            &self
                .closing
                .entry(t.sock)
                .insert_entry((connection, self.batch))
                .into_mut()
                .0
        };
        Applied {
            connection,
            closed,
            opened: opening.is_some(),
        }
    }

    /// The namespaces of the connections whose state may be behind their socket's: in a state
    /// an unrecorded one follows, with no transition since the kernel began recording all of
    /// them (`recording_all_since_ns`, CLOCK_MONOTONIC; u64::MAX while it records only opens
    /// and closes). Empty when the table is exact.
    pub fn behind_netns(&self, recording_all_since_ns: u64) -> Vec<u32> {
        let mut netns: Vec<u32> = Vec::new();
        for c in self.connections.values() {
            if c.last_ns < recording_all_since_ns
                && BEHIND_WHEN_QUIET.contains(&c.state)
                && !netns.contains(&c.netns)
            {
                netns.push(c.netns);
            }
        }
        netns
    }

    /// Moves connections to the state `list` (a dump of [`UNRECORDED_WHEN_QUIET`] states)
    /// shows their socket in, through the states between (as a recorded close would have).
    /// Only where the kernel cannot have told the table: a connection with a transition since
    /// the dump began is left alone, so is one whose addresses two listed sockets or two
    /// connections share, and one the listed state cannot follow (its socket was reused).
    /// Returns how many moved.
    pub fn catch_up(&mut self, list: &SocketList) -> u64 {
        if list.sockets.is_empty() {
            return 0;
        }
        let mut listed: HashMap<Key, Option<TcpState>> = HashMap::with_capacity(list.sockets.len());
        // The listed sockets' port pairs, a test far cheaper than hashing a row's key: a dump of
        // a few closing sockets is matched against a table of 100,000s.
        let mut ports = PortFilter::default();
        for s in &list.sockets {
            listed
                .entry(key(s.netns, s.local, s.remote))
                .and_modify(|state| *state = None)
                .or_insert(Some(s.state));
            ports.insert(s.local.port(), s.remote.port());
        }
        let mut claims: HashMap<Key, (u32, u64, TcpState)> = HashMap::new();
        for (&sock, c) in self.connections.iter() {
            if c.last_ns >= list.started_ns
                || !BEHIND_WHEN_QUIET.contains(&c.state)
                || !ports.contains(c.local_port, c.remote_port)
            {
                continue;
            }
            let k = key(c.netns, c.local(), c.remote());
            if let Some(Some(state)) = listed.get(&k)
                && *state != c.state
            {
                let claim = claims.entry(k).or_insert((0, sock, *state));
                claim.0 += 1;
            }
        }
        let mut moved = 0;
        for (count, sock, state) in claims.into_values() {
            let Some(c) = self.connections.get_mut(&sock) else {
                continue;
            };
            let mut probe = c.clone();
            probe.infer_path_to(state);
            if count == 1 && probe.state == state {
                *c = probe;
                moved += 1;
            }
        }
        moved
    }
}

/// The live connection of a socket in `connections`, or the one that just closed.
fn connection_in<'a>(
    connections: &'a mut SocketMap<Connection>,
    closing: &'a mut SocketMap<(Connection, u64)>,
    sock: u64,
) -> Option<&'a mut Connection> {
    match connections.get_mut(&sock) {
        Some(c) => Some(c),
        None => closing.get_mut(&sock).map(|(c, _)| c),
    }
}

/// A new connection for the first transition seen of its socket.
fn open(
    next_id: &mut u64,
    listeners: &Listeners,
    t: &Transition,
    opening: Option<Direction>,
) -> Connection {
    let id = *next_id;
    *next_id += 1;
    let direction = opening.unwrap_or(Direction::Unknown);
    // A passive socket is first seen leaving SYN_RECV when the kernel did not record its
    // LISTEN -> SYN_RECV: its life began at the listener all the same.
    let first = match (direction, t.old) {
        (Direction::Passive, TcpState::SynRecv) => TcpState::Listen,
        _ => t.old,
    };
    let mut path = Path::starting_at(first);
    if first != t.old {
        path.push(t.old);
    }
    let listener = match direction {
        Direction::Passive => listeners.get(&(t.netns, t.local.port())).copied(),
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
        path,
        handshake_ns: NO_HANDSHAKE,
        srtt_us: 0,
        details: None,
    }
}

/// Remembers who owns a listening socket, for the connections accepted from it.
fn track_listener(listeners: &mut Listeners, t: &Transition, connection: &Connection) {
    let key = (t.netns, t.local.port());
    match (t.old, t.new) {
        (_, TcpState::Listen) => {
            if let Some(owner) = connection.owner() {
                listeners.insert(key, owner.task);
            }
        }
        (TcpState::Listen, TcpState::Close) => {
            listeners.remove(&key);
        }
        _ => {}
    }
}

/// A set of (local port, remote port) pairs that may answer yes for a pair not in it: one bit per
/// hash of the pair.
struct PortFilter(Box<[u64; 1024]>);

impl Default for PortFilter {
    fn default() -> Self {
        PortFilter(Box::new([0; 1024]))
    }
}

impl PortFilter {
    fn bit(local: u16, remote: u16) -> (usize, u64) {
        let h = (u32::from(local) << 16 | u32::from(remote)).wrapping_mul(0x9e37_79b1) >> 16;
        ((h as usize >> 6) & 1023, 1 << (h & 63))
    }

    fn insert(&mut self, local: u16, remote: u16) {
        let (word, bit) = Self::bit(local, remote);
        self.0[word] |= bit;
    }

    fn contains(&self, local: u16, remote: u16) -> bool {
        let (word, bit) = Self::bit(local, remote);
        self.0[word] & bit != 0
    }
}

/// The transitions that start a socket's life, and what kind of life. A passive socket's first
/// record may be its SYN_RECV -> ESTABLISHED (or -> CLOSE): the kernel records LISTEN -> SYN_RECV
/// only while its switch asks for every transition. `held`: the table holds the socket already.
fn opening(t: &Transition, held: impl FnOnce() -> bool) -> Option<Direction> {
    match (t.old, t.new) {
        (TcpState::Close, TcpState::SynSent) => Some(Direction::Active),
        (TcpState::Close, TcpState::Listen) => Some(Direction::Listen),
        (TcpState::Listen, TcpState::SynRecv) => Some(Direction::Passive),
        (TcpState::SynRecv, _) if !t.all_recorded && !held() => Some(Direction::Passive),
        _ => None,
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "catch_up_tests.rs"]
mod catch_up_tests;
