//! Healing the table against the kernel's own socket list, for lives whose records were lost
//! (a full ring, a run the kernel skipped): a connection whose CLOSE never came would stay
//! "live" forever, and one whose opening was lost would never be listed.
//!
//! The list has no socket addresses (the table's key), so a connection and a listed socket are
//! matched by namespace, local and remote address and port. A list is only compared with the
//! table once the agent has handed on every record the programs wrote before the dump was
//! complete (the rings' cut, `Sink::batch_done`): the state tracepoint writes a CLOSE's record
//! before `tcp_set_state()` unhashes the socket, so by then the table has seen every CLOSE of a
//! socket the dump missed, unless the record was lost. A drain that merely began after the dump
//! is not enough: an agent behind the kernel reads each ring only in part.
//!
//! The dump is not atomic (the kernel resumes it bucket by bucket, so a socket can be skipped
//! when its chain changes between reads), and a socket can close or open while it runs. So:
//! - a connection with a transition after the dump began is never judged by it;
//! - a connection is closed only when two lists in a row lack it, and a socket is adopted only
//!   when the table lacked it at two lists in a row (its cookie identifies it across lists).
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use super::{
    Connection, Direction, Path, Table,
    connection::{NO_HANDSHAKE, NO_TASK},
};
use crate::{
    capture::sockdiag::SocketList,
    model::{TcpState, Transition},
};

/// What matches a connection with a listed socket. Addresses in canonical form: a dual-stack
/// socket's IPv4-mapped address is the IPv4 address.
/// Packed in five words: one heal builds and sorts a few keys per socket (60,000 and more),
/// and hashing them as one 40-byte write costs a fraction of hashing two `SocketAddr`s field by
/// field (the hasher stays std's: peers choose their addresses and ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Key([u64; 5]);

pub(super) fn key(netns: u32, local: SocketAddr, remote: SocketAddr) -> Key {
    let ip = |a: SocketAddr| {
        let v6 = match a.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let bits = v6.to_bits();
        [(bits >> 64) as u64, bits as u64]
    };
    let ([l0, l1], [r0, r1]) = (ip(local), ip(remote));
    let head = u64::from(netns) << 32 | u64::from(local.port()) << 16 | u64::from(remote.port());
    Key([head, l0, l1, r0, r1])
}

/// The key of a socket by its remote end only (local address and port unspecified).
fn remote_key(netns: u32, remote: SocketAddr) -> Key {
    key(netns, SocketAddr::from(([0, 0, 0, 0], 0)), remote)
}

/// What healing remembers between lists.
#[derive(Debug, Default)]
pub struct Healing {
    /// Ids of connections the last list lacked.
    absent: HashSet<u64>,
    /// Cookies of sockets the table lacked at the last list.
    unknown: HashSet<u64>,
    /// Adopted connections not yet seen in a transition, keyed in the table by their cookie:
    /// their first transition moves them to their socket address.
    adopted: HashMap<Key, u64>,
}

/// What one list changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Healed {
    /// Connections the kernel no longer has, summarized with cause UNKNOWN.
    pub closed: u64,
    /// Sockets the kernel has and the table lacked, now followed (not seen open).
    pub adopted: u64,
    /// Suspects wait for the next list to be confirmed: heal again soon.
    pub pending: bool,
}

/// Per key, how many sockets the list has, and the state of the last one.
type Listed = HashMap<Key, (u32, TcpState)>;

impl Table {
    /// Compares the table with the kernel's list of sockets. Closed connections go out with the
    /// next [`Table::end_batch`], as if their CLOSE had come.
    pub fn heal(&mut self, list: &SocketList) -> Healed {
        let dumped: HashSet<u32> = list.netns.iter().copied().collect();
        let mut listed_keys = Listed::with_capacity(list.sockets.len());
        // Sockets listed in SYN_SENT by remote: connect() reports SYN_SENT before it picks the
        // local port, so the table may hold such a connection with port 0.
        let mut connecting: HashSet<Key> = HashSet::new();
        for s in &list.sockets {
            let entry = listed_keys
                .entry(key(s.netns, s.local, s.remote))
                .or_insert((0, s.state));
            *entry = (entry.0 + 1, s.state);
            if s.state == TcpState::SynSent {
                connecting.insert(remote_key(s.netns, s.remote));
            }
        }
        let closed = self.close_unlisted(list, &dumped, &listed_keys, &connecting);
        let adopted = self.adopt_unknown(list, &listed_keys);
        Healed {
            closed,
            adopted,
            pending: !self.healing.absent.is_empty() || !self.healing.unknown.is_empty(),
        }
    }

    fn close_unlisted(
        &mut self,
        list: &SocketList,
        dumped: &HashSet<u32>,
        listed_keys: &Listed,
        connecting: &HashSet<Key>,
    ) -> u64 {
        // Per key, the connections that may claim a listed socket: the ones that moved since
        // the dump began first (they are surely alive), then the most recently active.
        let mut claims: Vec<(Key, bool, u64, u64, u64)> =
            Vec::with_capacity(self.connections.len());
        for (&sock, c) in self.connections.iter() {
            // Every state is judged: the table never holds TIME_WAIT or request sockets, and a
            // child in SYN_RECV older than the dump is stale (it leaves SYN_RECV in the same
            // softirq that made it).
            if !dumped.contains(&c.netns) {
                continue;
            }
            if c.local_port == 0 && connecting.contains(&remote_key(c.netns, c.remote())) {
                continue;
            }
            let recent = c.last_ns >= list.started_ns;
            claims.push((
                key(c.netns, c.local(), c.remote()),
                recent,
                c.last_ns,
                c.id,
                sock,
            ));
        }
        claims.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
        let mut absent = HashSet::new();
        let mut doomed = Vec::new();
        let mut stale = Vec::new();
        let mut i = 0;
        while i < claims.len() {
            let group = claims[i..]
                .iter()
                .take_while(|c| c.0 == claims[i].0)
                .count();
            let (slots, state) = listed_keys
                .get(&claims[i].0)
                .map_or((0, None), |&(n, state)| (n as usize, Some(state)));
            // One socket, one claim: the connection missed a transition if its state differs.
            if let (1, Some(state), (_, false, _, _, sock)) = (slots, state, claims[i]) {
                stale.push((sock, state));
            }
            for &(_, recent, _, id, sock) in claims[i..i + group].iter().skip(slots) {
                if recent {
                    continue;
                }
                if self.healing.absent.contains(&id) {
                    doomed.push(sock);
                } else {
                    absent.insert(id);
                }
            }
            i += group;
        }
        self.healing.absent = absent;
        for (sock, state) in stale {
            if let Some(c) = self.connections.get_mut(&sock)
                && c.state != state
            {
                // Through the states between, as a recorded close would have: the kernel
                // records none of them while quiet.
                c.infer_path_to(state);
                if c.state != state {
                    c.enter(state);
                }
            }
        }
        for sock in &doomed {
            if let Some(mut c) = self.connections.remove(sock) {
                self.healing.adopted.retain(|_, cookie| cookie != sock);
                c.details_mut().end_missed = true;
                self.finished.push(c);
            }
        }
        doomed.len() as u64
    }

    fn adopt_unknown(&mut self, list: &SocketList, listed_keys: &Listed) -> u64 {
        let mut known: HashMap<Key, u32> =
            HashMap::with_capacity(self.connections.len() + self.closing.len());
        let tracked = self
            .connections
            .values()
            .chain(self.closing.values().map(|(c, _)| c));
        let mut connecting_unported = HashSet::new();
        for c in tracked {
            *known
                .entry(key(c.netns, c.local(), c.remote()))
                .or_default() += 1;
            if c.local_port == 0 {
                connecting_unported.insert(remote_key(c.netns, c.remote()));
            }
        }
        let mut unknown = HashSet::new();
        let mut adopted = 0;
        let mut spare: HashMap<Key, u32> = HashMap::with_capacity(list.sockets.len());
        for s in &list.sockets {
            let k = key(s.netns, s.local, s.remote);
            let excess = spare.entry(k).or_insert_with(|| {
                let listed = listed_keys.get(&k).map_or(0, |&(n, _)| n);
                listed.saturating_sub(known.get(&k).copied().unwrap_or(0))
            });
            let already = self.connections.contains_key(&s.cookie);
            if *excess == 0
                || already
                || s.state == TcpState::SynRecv
                || (s.state == TcpState::SynSent
                    && connecting_unported.contains(&remote_key(s.netns, s.remote)))
            {
                continue;
            }
            *excess -= 1;
            if !self.healing.unknown.contains(&s.cookie) {
                unknown.insert(s.cookie);
                continue;
            }
            if self.connections.len() >= self.max_connections {
                self.table_full += 1;
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let connection = Connection {
                id,
                // Not known from the list; the first transition fills it in.
                sock: 0,
                netns: s.netns,
                local_ip: s.local.ip(),
                local_port: s.local.port(),
                remote_ip: s.remote.ip(),
                remote_port: s.remote.port(),
                direction: if s.state == TcpState::Listen {
                    Direction::Listen
                } else {
                    Direction::Unknown
                },
                owner_task: NO_TASK,
                owner_source: None,
                state: s.state,
                opened_ns: list.started_ns,
                last_ns: list.started_ns,
                path: Path::starting_at(s.state),
                handshake_ns: NO_HANDSHAKE,
                srtt_us: 0,
                details: None,
            };
            // Cookies count up from 1; socket addresses are kernel addresses, far above.
            self.connections.insert(s.cookie, connection);
            self.healing.adopted.insert(k, s.cookie);
            adopted += 1;
        }
        self.healing.unknown = unknown;
        adopted
    }

    /// Before a transition of a socket the table does not hold: if it is an adopted one (same
    /// addresses), it moves to its socket address.
    pub(super) fn claim_adopted(&mut self, t: &Transition) {
        if self.healing.adopted.is_empty() || self.connections.contains_key(&t.sock) {
            return;
        }
        let Some(cookie) = self
            .healing
            .adopted
            .remove(&key(t.netns, t.local, t.remote))
        else {
            return;
        };
        if let Some(mut c) = self.connections.remove(&cookie) {
            c.sock = t.sock;
            self.connections.insert(t.sock, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capture::sockdiag::KernelSocket,
        lifecycle::{
            Cause, Peers,
            testing::{LOCAL, NETNS},
        },
        model::TcpState::*,
    };

    fn socket(cookie: u64, state: TcpState, remote_port: u16) -> KernelSocket {
        KernelSocket {
            netns: NETNS,
            state,
            local: LOCAL,
            remote: SocketAddr::new(LOCAL.ip(), remote_port),
            cookie,
        }
    }

    fn list(started_ns: u64, sockets: Vec<KernelSocket>) -> SocketList {
        SocketList {
            started_ns,
            finished_ns: started_ns,
            netns: vec![NETNS],
            sockets,
        }
    }

    fn established(table: &mut Table, sock: u64, ts: u64, remote_port: u16) {
        table.apply(&Transition::test(sock, ts, Listen, SynRecv).remote_port(remote_port));
        table.apply(&Transition::test(sock, ts, SynRecv, Established).remote_port(remote_port));
    }

    fn done(table: &mut Table) -> Vec<Connection> {
        let mut out = Vec::new();
        table.end_batch(&mut out);
        out
    }

    #[test]
    fn a_connection_two_lists_lack_is_closed_with_cause_unknown_and_kept_ones_stay() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        established(&mut table, 1, 10, 40001); // its CLOSE was lost
        established(&mut table, 2, 10, 40002);
        let kernel = vec![socket(900, Established, 40002)];
        let first = table.heal(&list(100, kernel.clone()));
        assert_eq!(
            (first.closed, first.pending),
            (0, true),
            "one list is not enough"
        );
        let second = table.heal(&list(200, kernel));
        assert_eq!((second.closed, second.adopted), (1, 0));
        let out = done(&mut table);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].sock, out[0].cause()), (1, Cause::Unknown));
        assert!(out[0].seen_open(), "it was seen open");
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_connection_that_moved_after_the_dump_began_is_not_judged_by_it() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        established(&mut table, 1, 150, 40001); // opened while the dump ran
        for started in [100, 120] {
            assert_eq!(table.heal(&list(started, vec![])).closed, 0);
        }
        assert_eq!(table.len(), 1);
        // Once it is older than the dumps, two lists without it close it.
        table.heal(&list(200, vec![]));
        assert_eq!(table.heal(&list(300, vec![])).closed, 1);
    }

    #[test]
    fn a_listed_socket_is_adopted_only_when_two_lists_find_it_unknown() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        let healed = table.heal(&list(100, vec![socket(900, Established, 40001)]));
        assert_eq!((healed.adopted, healed.pending), (0, true));
        // A socket listed once and gone (it closed, or its record was in the ring) is not.
        assert_eq!(
            table
                .heal(&list(200, vec![socket(901, Established, 40002)]))
                .adopted,
            0
        );
        let healed = table.heal(&list(300, vec![socket(901, Established, 40002)]));
        assert_eq!(healed.adopted, 1);
        let c = table.connections().next().unwrap();
        assert!(!c.seen_open());
        assert_eq!((c.state, c.remote().port()), (Established, 40002));
    }

    #[test]
    fn an_adopted_connection_moves_to_its_socket_at_its_first_transition() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        let kernel = vec![socket(900, Established, 40001)];
        table.heal(&list(100, kernel.clone()));
        table.heal(&list(200, kernel));
        let id = table.connections().next().unwrap().id;
        let applied = table.apply(
            &Transition::test(0xffff_8880_0000_1000, 300, Established, CloseWait)
                .remote_port(40001),
        );
        assert_eq!(
            (applied.connection.id, applied.connection.sock),
            (id, 0xffff_8880_0000_1000)
        );
        assert_eq!(
            applied.connection.path.states().collect::<Vec<_>>(),
            [Established, CloseWait]
        );
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_ghost_and_a_live_socket_with_the_same_addresses_lose_only_the_ghost() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        established(&mut table, 1, 10, 40001); // ghost: CLOSE lost, port reused since
        established(&mut table, 2, 50, 40001);
        let kernel = vec![socket(900, Established, 40001)];
        table.heal(&list(100, kernel.clone()));
        assert_eq!(table.heal(&list(200, kernel)).closed, 1);
        assert_eq!(table.connections().next().unwrap().sock, 2);
    }

    #[test]
    fn a_socket_still_connecting_without_its_port_is_neither_closed_nor_adopted() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        // connect() reports SYN_SENT before it binds the local port.
        let connect = Transition::test(1, 10, Close, SynSent)
            .local_port(0)
            .remote_port(80);
        table.apply(&connect);
        let kernel = vec![KernelSocket {
            local: "127.0.0.1:43210".parse().unwrap(),
            ..socket(900, SynSent, 80)
        }];
        for started in [100, 200, 300] {
            assert_eq!(
                table.heal(&list(started, kernel.clone())),
                Healed::default()
            );
        }
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_connection_that_missed_a_transition_takes_the_listed_state() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        // Its ESTABLISHED was lost.
        table.apply(&Transition::test(1, 10, Listen, SynRecv).remote_port(40001));
        let healed = table.heal(&list(100, vec![socket(900, Established, 40001)]));
        assert_eq!(healed, Healed::default());
        let c = table.connections().next().unwrap();
        assert_eq!(
            (c.state, c.path.states().collect::<Vec<_>>()),
            (Established, vec![Listen, SynRecv, Established])
        );
    }

    #[test]
    fn connections_in_namespaces_not_listed_are_left_alone() {
        let mut table = Table::new(10, Peers::new(10, 1_000));
        established(&mut table, 1, 10, 40001);
        let other = SocketList {
            netns: vec![NETNS + 1],
            ..list(100, vec![])
        };
        table.heal(&other);
        assert_eq!(table.heal(&other).closed, 0);
    }
}
