//! Catching the table up with a dump of the states a quiet kernel does not record.
use std::net::SocketAddr;

use super::*;
use crate::{
    capture::sockdiag::{DUMPED_STATES, KernelSocket},
    lifecycle::Cause,
};
use TcpState::*;

const NS: u32 = 7;
const SERVER: &str = "127.0.0.1:8080";

/// A transition of the server end of the connection from `remote_port`, as a quiet kernel
/// records it (`all_recorded` false) unless `all`.
fn server(
    sock: u64,
    ts: u64,
    (old, new): (TcpState, TcpState),
    port: u16,
    all: bool,
) -> Transition {
    let t = Transition::test(sock, ts, old, new).in_netns(NS).between(
        SERVER.parse().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], port)),
    );
    if all { t } else { t.quiet() }
}

fn dump(started_ns: u64, sockets: &[(TcpState, u16)]) -> SocketList {
    SocketList {
        started_ns,
        finished_ns: started_ns,
        netns: vec![NS],
        sockets: sockets
            .iter()
            .enumerate()
            .map(|(i, &(state, port))| KernelSocket {
                netns: NS,
                state,
                local: SERVER.parse().unwrap(),
                remote: SocketAddr::from(([127, 0, 0, 1], port)),
                cookie: i as u64 + 1,
            })
            .collect(),
    }
}

fn state_of(table: &Table, sock: u64) -> TcpState {
    table.connections.get(&sock).unwrap().state
}

#[test]
fn the_dumped_states_are_the_followed_ones_a_quiet_kernel_does_not_record() {
    let unrecorded: Vec<TcpState> = DUMPED_STATES
        .into_iter()
        .filter(|&s| !tcp_trace_common::recorded_when_quiet(s as u8))
        .collect();
    assert_eq!(unrecorded, UNRECORDED_WHEN_QUIET);
}

#[test]
fn a_dump_moves_a_quiet_row_through_the_states_between_and_its_close_is_whole() {
    let mut table = Table::new(10, Peers::new(10, 1_000));
    table.apply(&server(1, 10, (SynRecv, Established), 40001, false));
    table.apply(&server(2, 10, (SynRecv, Established), 40002, false));
    assert_eq!(table.behind_netns(u64::MAX), vec![NS]);
    assert_eq!(table.catch_up(&dump(100, &[(LastAck, 40001)])), 1);
    assert_eq!(
        (state_of(&table, 1), state_of(&table, 2)),
        (LastAck, Established)
    );
    let closed = table.apply(&server(1, 200, (LastAck, Close), 40001, false));
    let path: Vec<TcpState> = closed.connection.path.states().collect();
    assert_eq!(
        path,
        [Listen, SynRecv, Established, CloseWait, LastAck, Close]
    );
    assert_eq!(closed.connection.cause(), Cause::Orderly);
}

#[test]
fn a_row_that_moved_since_the_dump_began_or_shares_its_addresses_is_left_alone() {
    let mut table = Table::new(10, Peers::new(10, 1_000));
    table.apply(&server(1, 150, (SynRecv, Established), 40001, false));
    // Two rows for one address pair: one of them is a socket whose close is on its way.
    table.apply(&server(2, 10, (SynRecv, Established), 40002, false));
    table.apply(&server(3, 20, (SynRecv, Established), 40002, false));
    let list = dump(100, &[(CloseWait, 40001), (CloseWait, 40002)]);
    assert_eq!(table.catch_up(&list), 0);
    assert_eq!(state_of(&table, 1), Established);
}

#[test]
fn a_record_of_a_transition_a_dump_already_made_does_not_repeat_it() {
    let mut table = Table::new(10, Peers::new(10, 1_000));
    table.apply(&server(1, 10, (SynRecv, Established), 40001, false));
    table.catch_up(&dump(100, &[(CloseWait, 40001)]));
    // Recording turned on as the socket entered CLOSE_WAIT: its record comes after the dump.
    table.apply(&server(1, 90, (Established, CloseWait), 40001, true));
    table.apply(&server(1, 300, (CloseWait, LastAck), 40001, true));
    let closed = table.apply(&server(1, 400, (LastAck, Close), 40001, true));
    let path: Vec<TcpState> = closed.connection.path.states().collect();
    assert_eq!(
        path,
        [Listen, SynRecv, Established, CloseWait, LastAck, Close]
    );
    assert!(
        table.behind_netns(u64::MAX).is_empty(),
        "the table is empty"
    );
}
