//! The connection table: what a socket's transitions mean as one connection's life. Pure and
//! synchronous; the agent feeds it transitions in the order the kernel reserved their records.
//!
//! Per socket that order is the order of the transitions: `tcp_set_state()` runs under the socket
//! lock, and the record is reserved inside the tracepoint, before the lock is released.
use std::{collections::HashMap, net::SocketAddr};

use crate::model::{Context, Task, TcpState, Transition};

/// How a connection came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// connect(): CLOSE -> SYN_SENT.
    Active,
    /// A SYN at a listener: the child socket's LISTEN -> SYN_RECV.
    Passive,
    /// listen(): CLOSE -> LISTEN.
    Listen,
    /// First seen mid-life (it predates the agent, or its opening record was lost).
    Unknown,
}

/// Why a process is named as a connection's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerSource {
    /// A transition of this socket ran in the process's own system call (connect, listen, close).
    ProcessContext,
    /// Inherited from the listening socket the connection was accepted from.
    Listener,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub task: Task,
    pub source: OwnerSource,
}

/// The states a connection went through. Fixed capacity so the table never allocates per
/// transition; a connection longer than that (rare: a normal life has 4-6 states) keeps its
/// first states and counts the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path {
    states: [TcpState; Path::CAPACITY],
    len: u8,
    /// States that did not fit.
    pub truncated: u32,
}

impl Path {
    pub const CAPACITY: usize = 12;

    fn starting_at(state: TcpState) -> Path {
        let mut path = Path {
            states: [TcpState::Close; Path::CAPACITY],
            len: 0,
            truncated: 0,
        };
        path.push(state);
        path
    }

    fn push(&mut self, state: TcpState) {
        if usize::from(self.len) < Path::CAPACITY {
            self.states[usize::from(self.len)] = state;
            self.len += 1;
        } else {
            self.truncated += 1;
        }
    }

    pub fn states(&self) -> &[TcpState] {
        &self.states[..usize::from(self.len)]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Unique for the agent's life.
    pub id: u64,
    pub sock: u64,
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub direction: Direction,
    pub owner: Option<Owner>,
    pub state: TcpState,
    /// Kernel time of the first transition seen.
    pub opened_ns: u64,
    /// Kernel time of the latest transition.
    pub last_ns: u64,
    /// Whether the agent saw the connection open (else path and duration start mid-life).
    pub seen_open: bool,
    pub path: Path,
}

impl Connection {
    pub fn duration_ns(&self) -> u64 {
        self.last_ns.saturating_sub(self.opened_ns)
    }
}

/// What one transition did to the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The connection after the transition.
    pub connection: Connection,
    /// The transition was to CLOSE: the connection's life is over and it left the table.
    pub closed: bool,
}

#[derive(Debug)]
pub struct Table {
    connections: HashMap<u64, Connection>,
    /// (netns, port) of listening sockets -> their owner, to name the owner of accepted
    /// connections: the passive open runs in softirq, where no process is current.
    listeners: HashMap<(u32, u16), Task>,
    max_connections: usize,
    next_id: u64,
    /// New connections not followed because the table was full.
    pub table_full: u64,
    /// Opening transitions for a socket the table still held: its CLOSE was never seen.
    pub reopened: u64,
}

impl Table {
    pub fn new(max_connections: usize) -> Table {
        Table {
            connections: HashMap::new(),
            listeners: HashMap::new(),
            max_connections,
            next_id: 1,
            table_full: 0,
            reopened: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.connections.values()
    }

    pub fn apply(&mut self, t: &Transition) -> Applied {
        let opening = opening(t);
        let known = self.connections.contains_key(&t.sock);
        if known && opening.is_some() {
            self.reopened += 1;
            self.connections.remove(&t.sock);
        }
        let mut connection = match self.connections.get(&t.sock) {
            Some(existing) => *existing,
            None => self.open(t, opening),
        };
        connection.state = t.new;
        connection.last_ns = t.ts_ns;
        connection.path.push(t.new);
        // Ports and addresses fill in as the kernel assigns them (connect() reports SYN_SENT
        // before the source port is chosen).
        connection.local = t.local;
        connection.remote = t.remote;
        if connection.owner.is_none()
            && let Context::Process(task) = t.context
        {
            connection.owner = Some(Owner {
                task,
                source: OwnerSource::ProcessContext,
            });
        }
        self.track_listener(t, &connection);
        let closed = t.new == TcpState::Close;
        if closed {
            self.connections.remove(&t.sock);
        } else if let Some(slot) = self.connections.get_mut(&t.sock) {
            *slot = connection;
        } else if self.connections.len() < self.max_connections {
            self.connections.insert(t.sock, connection);
        } else {
            self.table_full += 1;
        }
        Applied { connection, closed }
    }

    fn open(&mut self, t: &Transition, opening: Option<Direction>) -> Connection {
        let id = self.next_id;
        self.next_id += 1;
        let direction = opening.unwrap_or(Direction::Unknown);
        let owner = match direction {
            Direction::Passive => {
                self.listeners
                    .get(&(t.netns, t.local.port()))
                    .map(|&task| Owner {
                        task,
                        source: OwnerSource::Listener,
                    })
            }
            _ => None,
        };
        Connection {
            id,
            sock: t.sock,
            netns: t.netns,
            local: t.local,
            remote: t.remote,
            direction,
            owner,
            state: t.old,
            opened_ns: t.ts_ns,
            last_ns: t.ts_ns,
            seen_open: opening.is_some(),
            path: Path::starting_at(t.old),
        }
    }

    fn track_listener(&mut self, t: &Transition, connection: &Connection) {
        let key = (t.netns, t.local.port());
        match (t.old, t.new) {
            (_, TcpState::Listen) => {
                if let Some(owner) = connection.owner {
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
fn opening(t: &Transition) -> Option<Direction> {
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
        }
    }

    const NET_RX: Context = Context::Softirq(3);

    #[test]
    fn an_active_connection_lives_from_syn_sent_to_close() {
        let mut table = Table::new(10);
        let p = Context::Process(task(100));
        let steps = [
            (Close, SynSent, p),
            (SynSent, Established, NET_RX),
            (Established, FinWait1, p),
            (FinWait1, FinWait2, NET_RX),
            (FinWait2, Close, NET_RX),
        ];
        let mut last = None;
        for (i, (old, new, ctx)) in steps.into_iter().enumerate() {
            last = Some(table.apply(&t(1, 1000 * i as u64, old, new, ctx)));
        }
        let last = last.unwrap();
        assert!(last.closed);
        let c = last.connection;
        assert_eq!(c.direction, Direction::Active);
        assert!(c.seen_open);
        assert_eq!(
            c.path.states(),
            &[Close, SynSent, Established, FinWait1, FinWait2, Close]
        );
        assert_eq!(c.duration_ns(), 4000);
        assert_eq!(c.owner.unwrap().task.pid, 100);
        assert_eq!(c.owner.unwrap().source, OwnerSource::ProcessContext);
        assert!(table.is_empty());
    }

    #[test]
    fn softirq_transitions_never_name_the_interrupted_task_as_owner() {
        let mut table = Table::new(10);
        let applied = table.apply(&t(1, 0, Listen, SynRecv, NET_RX));
        assert_eq!(applied.connection.owner, None);
        assert_eq!(applied.connection.direction, Direction::Passive);
    }

    #[test]
    fn accepted_connections_inherit_the_listeners_owner() {
        let mut table = Table::new(10);
        table.apply(&t(1, 0, Close, Listen, Context::Process(task(42))));
        let child = table.apply(&t(2, 5, Listen, SynRecv, NET_RX)).connection;
        let owner = child.owner.unwrap();
        assert_eq!((owner.task.pid, owner.source), (42, OwnerSource::Listener));
        // Once the listener closes, new children have no owner to inherit.
        table.apply(&t(1, 6, Listen, Close, Context::Process(task(42))));
        assert_eq!(
            table
                .apply(&t(3, 7, Listen, SynRecv, NET_RX))
                .connection
                .owner,
            None
        );
    }

    #[test]
    fn a_reused_socket_address_is_a_new_connection() {
        let mut table = Table::new(10);
        let p = Context::Process(task(1));
        let first = table.apply(&t(1, 0, Close, SynSent, p)).connection.id;
        table.apply(&t(1, 1, SynSent, Close, NET_RX));
        let second = table.apply(&t(1, 2, Close, SynSent, p)).connection.id;
        assert_ne!(first, second);
        assert_eq!(table.reopened, 0);
        // An opening transition for a socket still in the table: its CLOSE was lost.
        let third = table.apply(&t(1, 3, Close, SynSent, p)).connection.id;
        assert_ne!(second, third);
        assert_eq!(table.reopened, 1);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn connections_first_seen_mid_life_say_so() {
        let mut table = Table::new(10);
        let c = table
            .apply(&t(9, 50, Established, FinWait1, NET_RX))
            .connection;
        assert_eq!(c.direction, Direction::Unknown);
        assert!(!c.seen_open);
        assert_eq!(c.path.states(), &[Established, FinWait1]);
    }

    #[test]
    fn a_full_table_counts_what_it_could_not_follow() {
        let mut table = Table::new(1);
        let p = Context::Process(task(1));
        table.apply(&t(1, 0, Close, SynSent, p));
        let applied = table.apply(&t(2, 0, Close, SynSent, p));
        assert_eq!(applied.connection.state, SynSent); // the event itself is still reported
        assert_eq!(table.len(), 1);
        assert_eq!(table.table_full, 1);
    }

    #[test]
    fn long_paths_keep_their_first_states_and_count_the_rest() {
        let mut table = Table::new(10);
        let mut last = None;
        for i in 0..20u64 {
            let (old, new) = if i % 2 == 0 {
                (Established, CloseWait)
            } else {
                (CloseWait, Established)
            };
            last = Some(table.apply(&t(1, i, old, new, NET_RX)).connection);
        }
        let path = last.unwrap().path;
        assert_eq!(path.states().len(), Path::CAPACITY);
        assert_eq!(path.truncated, 21 - Path::CAPACITY as u32);
    }
}
