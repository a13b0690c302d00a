//! One connection's life: who owns it, the states it went through, what it carried, and what
//! that means once it ends (why it ended, who closed first).
use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::Arc,
};

use crate::model::{
    Direction, KeepaliveDefaults, Task, TcpState,
    errno::{ECONNREFUSED, ECONNRESET, EHOSTUNREACH, ENETUNREACH, EPIPE, ETIMEDOUT},
};

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

    pub(super) fn starting_at(state: TcpState) -> Path {
        let mut path = Path {
            packed: [0; Path::CAPACITY / 2],
            len: 0,
        };
        path.push(state);
        path
    }

    /// Appends `state`; false if the path is full and it was not kept.
    pub(super) fn push(&mut self, state: TcpState) -> bool {
        let i = usize::from(self.len);
        if i == Path::CAPACITY {
            return false;
        }
        self.packed[i / 2] |= (state as u8) << (4 * (i % 2));
        self.len += 1;
        true
    }

    /// The kernel's numbers of the states kept, first to last.
    fn numbers(&self) -> impl DoubleEndedIterator<Item = u8> + ExactSizeIterator + '_ {
        (0..usize::from(self.len)).map(|i| (self.packed[i / 2] >> (4 * (i % 2))) & 0xf)
    }

    /// Whether `state` is among the states kept.
    pub fn contains(&self, state: TcpState) -> bool {
        self.position(state).is_some()
    }

    /// Where `state` first is in the path, without a walk: every closed connection asks this
    /// of several states, for each exporter (a walk was a fifth of the agent's instructions).
    /// The path as one word, 4 bits a state, is compared with `state` in every nibble at once:
    /// a nibble of `differ` is 0 where they are equal, and a nibble past the path's end holds 0,
    /// which no state is numbered. Subtracting 1 from every nibble sets bit 3 of a zero nibble;
    /// the borrow it leaves can set it falsely only in a higher nibble, so the lowest one set
    /// is the first match.
    pub(super) fn position(&self, state: TcpState) -> Option<usize> {
        const ONES: u64 = 0x1111_1111_1111; // one per state the path holds
        const _: () = assert!(Path::CAPACITY == 12);
        let [a, b, c, d, e, f] = self.packed;
        let word = u64::from_le_bytes([a, b, c, d, e, f, 0, 0]);
        let differ = word ^ (ONES * u64::from(state as u8));
        let zero = differ.wrapping_sub(ONES) & !differ & (ONES << 3);
        (zero != 0).then(|| zero.trailing_zeros() as usize / 4)
    }

    /// The states kept, first to last.
    pub fn states(&self) -> impl DoubleEndedIterator<Item = TcpState> + ExactSizeIterator + '_ {
        // Only push() writes, and only TcpState numbers.
        self.numbers()
            .map(|n| TcpState::from_kernel(n).expect("a path holds only states"))
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
    pub(super) local_ip: IpAddr,
    pub(super) local_port: u16,
    pub(super) remote_ip: IpAddr,
    pub(super) remote_port: u16,
    pub direction: Direction,
    /// The owner's task, meaningful when `owner_source` is set.
    pub(super) owner_task: Task,
    pub(super) owner_source: Option<OwnerSource>,
    pub state: TcpState,
    /// Kernel time of the first transition seen.
    pub opened_ns: u64,
    /// Kernel time of the latest transition.
    pub last_ns: u64,
    pub path: Path,
    /// [`Connection::handshake_ns`], or `NO_HANDSHAKE`.
    pub(super) handshake_ns: u64,
    /// Smoothed RTT at the last sample the agent got (establishment or close), microseconds.
    pub srtt_us: u32,
    /// Shared, not boxed: the table hands out a copy of the connection with every record it
    /// applies, and a boxed copy cost a malloc and a free each time (a copy here is a count).
    /// Written through [`Connection::details_mut`], which copies them only while shared.
    pub(super) details: Option<Arc<Details>>,
}

/// The owner's task of a connection that has none.
pub(super) const NO_TASK: Task = Task {
    pid: 0,
    tid: 0,
    comm: [0; 16],
};

/// No handshake measured: a latency no monotonic clock reaches (584 years).
pub(super) const NO_HANDSHAKE: u64 = u64::MAX;

/// What most connections never have, or have only once they closed. All zero (and keepalive
/// off) until set; the public accessors of [`Connection`] say what each means.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Details {
    pub(super) keepalive: Keepalive,
    pub(super) keepalive_defaults: Option<KeepaliveDefaults>,
    pub(super) handshake_retransmits: u32,
    pub(super) retransmits: u32,
    pub(super) resets_sent: u32,
    pub(super) resets_received: u32,
    pub(super) error: u32,
    pub(super) path_truncated: u32,
    /// The socket opened again before its CLOSE was seen (a record the kernel skipped): the
    /// life ended somewhere after its last transition, nobody knows how.
    pub(super) end_missed: bool,
    /// Payload bytes sent and acknowledged, and received, as the kernel counts them at close
    /// (see [`Connection::payload_bytes`]).
    pub(super) bytes_sent: u64,
    pub(super) bytes_received: u64,
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

    /// Whether the life was summarized without its CLOSE (the socket opened again first).
    pub fn end_missed(&self) -> bool {
        self.details().end_missed
    }

    /// States that did not fit in the path.
    pub fn path_truncated(&self) -> u32 {
        self.details().path_truncated
    }

    fn details(&self) -> &Details {
        self.details.as_deref().unwrap_or(&Details::NONE)
    }

    /// Gives the connection `spare` details (emptied) if it has none yet.
    pub(super) fn take_details(&mut self, spare: &mut Vec<Arc<Details>>) {
        if self.details.is_none() {
            self.details = spare.pop();
        }
    }

    /// Its details, emptied, unless something else holds them too.
    pub(super) fn give_back_details(&mut self) -> Option<Arc<Details>> {
        let mut details = self.details.take()?;
        *Arc::get_mut(&mut details)? = Details::NONE;
        Some(details)
    }

    pub(super) fn details_mut(&mut self) -> &mut Details {
        Arc::make_mut(self.details.get_or_insert_default())
    }

    /// Sets one of the details, allocating them only for a value other than the default.
    pub(super) fn set_detail<T: Default + PartialEq>(
        &mut self,
        value: T,
        field: fn(&mut Details) -> &mut T,
    ) {
        if self.details.is_some() || value != T::default() {
            *field(self.details_mut()) = value;
        }
    }

    pub(super) fn set_endpoints(&mut self, local: SocketAddr, remote: SocketAddr) {
        (self.local_ip, self.local_port) = (local.ip(), local.port());
        (self.remote_ip, self.remote_port) = (remote.ip(), remote.port());
    }

    pub(super) fn set_owner(&mut self, task: Task, source: OwnerSource) {
        self.owner_task = task;
        self.owner_source = Some(source);
    }

    pub(super) fn enter(&mut self, state: TcpState) {
        self.state = state;
        if !self.path.push(state) {
            self.details_mut().path_truncated += 1;
        }
    }

    /// Enters the states a socket must have passed through between the one the table holds and
    /// `to`, the state it leaves now, when the kernel did not record those transitions. Between
    /// ESTABLISHED and CLOSE each state has one possible predecessor (FIN_WAIT2 and CLOSING
    /// follow FIN_WAIT1, LAST_ACK follows CLOSE_WAIT), so the path, and with it the closer and
    /// the cause, come out as if every transition had been recorded.
    pub(super) fn infer_path_to(&mut self, to: TcpState) {
        if self.state == to || self.direction == Direction::Unknown {
            return;
        }
        use TcpState::*;
        let chain: &[TcpState] = match to {
            FinWait1 => &[FinWait1],
            FinWait2 => &[FinWait1, FinWait2],
            Closing => &[FinWait1, Closing],
            TimeWait => &[FinWait1, FinWait2, TimeWait],
            CloseWait => &[CloseWait],
            LastAck => &[CloseWait, LastAck],
            _ => &[],
        };
        // Only from ESTABLISHED or a state on the way: anything else is not a life the kernel
        // can have had, and is left as recorded.
        let from = match chain.iter().position(|&s| s == self.state) {
            Some(at) => at + 1,
            None if self.state == Established => 0,
            None => return,
        };
        for &state in &chain[from..] {
            self.enter(state);
        }
    }

    pub fn duration_ns(&self) -> u64 {
        self.last_ns.saturating_sub(self.opened_ns)
    }

    pub(super) fn visited(&self, state: TcpState) -> bool {
        self.path.contains(state)
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
        // CLOSING anywhere means both FINs crossed; else the first of FIN_WAIT1 (we sent the
        // first FIN) and CLOSE_WAIT (the peer did).
        if self.path.contains(TcpState::Closing) {
            return Closer::Simultaneous;
        }
        match (
            self.path.position(TcpState::FinWait1),
            self.path.position(TcpState::CloseWait),
        ) {
            (Some(local), Some(remote)) if remote < local => Closer::Remote,
            (Some(_), _) => Closer::Local,
            (None, Some(_)) => Closer::Remote,
            (None, None) => Closer::None,
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

#[cfg(test)]
mod tests {
    use super::{Connection, Details, Path, TcpState};

    #[test]
    fn a_path_gives_back_every_state_it_kept_in_order() {
        let mut path = Path::starting_at(TcpState::BoundInactive);
        for &state in TcpState::ALL.iter().rev().skip(1) {
            path.push(state);
        }
        let mut kept: Vec<_> = TcpState::ALL.iter().rev().copied().collect();
        kept.truncate(Path::CAPACITY);
        assert_eq!(path.states().collect::<Vec<_>>(), kept);
    }

    /// `position` finds a state where a walk of the path does, for every path of up to four
    /// states (with repeats, which a real path never has) and for full ones.
    #[test]
    fn a_state_is_found_where_a_walk_finds_it() {
        let walk = |path: &Path, state: TcpState| path.states().position(|s| s == state);
        let check = |path: &Path| {
            for &state in TcpState::ALL.iter() {
                assert_eq!(
                    path.position(state),
                    walk(path, state),
                    "{path:?} {state:?}"
                );
            }
        };
        let all = TcpState::ALL;
        for &a in all.iter() {
            for &b in all.iter() {
                for &c in all.iter() {
                    for &d in all.iter() {
                        let mut path = Path::starting_at(a);
                        check(&path);
                        for s in [b, c, d] {
                            path.push(s);
                            check(&path);
                        }
                    }
                }
            }
        }
        let mut full = Path::starting_at(TcpState::Close);
        for &s in all.iter().rev() {
            full.push(s);
            check(&full);
        }
    }

    /// The table holds one per tracked socket in a `HashMap<u64, Connection>`: 100,000 of them
    /// must fit the agent in 64 MiB (docs/benchmarks.md), and hashbrown rounds 100,000 up to
    /// 131,072 slots (16 MiB at 128 bytes). Grow it only knowingly.
    #[test]
    fn a_connection_stays_within_its_memory_budget() {
        let slot = std::mem::size_of::<(u64, Connection)>();
        assert!(slot <= 136, "a table slot takes {slot} bytes");
    }

    /// Allocated for keepalive sockets and at close, with the Arc's two counts: one 112-byte
    /// malloc chunk at most.
    #[test]
    fn the_details_stay_within_their_memory_budget() {
        let details = std::mem::size_of::<Details>();
        assert!(details <= 88, "the details take {details} bytes");
    }
}
