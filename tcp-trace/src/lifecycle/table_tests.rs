//! The table, fed transitions by hand: what each kind of life means.
use super::*;
use crate::{
    lifecycle::{
        Cause, Closer, KeepaliveSettings,
        testing::{LIVES, OPENED},
    },
    model::{KeepaliveOption, KeepaliveTimer, Reset, SocketOption, errno::*},
};
use TcpState::*;

#[test]
fn an_active_connection_lives_from_syn_sent_to_close() {
    let mut table = Table::new(10, Peers::new(10, 1_000));
    let p = Context::Process(Task::test(100, "app"));
    let steps = [
        (Close, SynSent, p),
        (SynSent, Established, Context::Kernel),
        (Established, FinWait1, p),
        (FinWait1, FinWait2, Context::Kernel),
        (FinWait2, Close, Context::Kernel),
    ];
    let mut last = None;
    for (i, (old, new, ctx)) in steps.into_iter().enumerate() {
        last = Some(table.apply(&Transition::test(1, 1000 * i as u64, old, new).by(ctx)));
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
    let applied = table.apply(&Transition::test(1, 0, Listen, SynRecv));
    assert_eq!(applied.connection.owner(), None);
    assert_eq!(applied.connection.direction, Direction::Passive);
}

#[test]
fn accepted_connections_inherit_the_listeners_owner() {
    let mut table = Table::new(10, Peers::new(10, 1_000));
    table.apply(&Transition::test(1, 0, Close, Listen).by_process(42));
    let child = table
        .apply(&Transition::test(2, 5, Listen, SynRecv))
        .connection;
    let owner = child.owner().unwrap();
    assert_eq!((owner.task.pid, owner.source), (42, OwnerSource::Listener));
    // Once the listener closes, new children have no owner to inherit.
    table.apply(&Transition::test(1, 6, Listen, Close).by_process(42));
    assert_eq!(
        table
            .apply(&Transition::test(3, 7, Listen, SynRecv))
            .connection
            .owner(),
        None
    );
}

#[test]
fn a_reused_socket_address_is_a_new_connection() {
    let mut table = Table::new(10, Peers::new(10, 1_000));
    let connect = |ts| Transition::test(1, ts, Close, SynSent).by_process(1);
    let first = table.apply(&connect(0)).connection.id;
    table.apply(&Transition::test(1, 1, SynSent, Close));
    let second = table.apply(&connect(2)).connection.id;
    assert_ne!(first, second);
    assert_eq!(table.reopened, 0);
    // An opening transition for a socket still in the table: its CLOSE was lost.
    let third = table.apply(&connect(3)).connection.id;
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
        .apply(&Transition::test(9, 50, Established, FinWait1))
        .connection;
    assert_eq!(c.direction, Direction::Unknown);
    assert!(!c.seen_open());
    assert_eq!(c.path.states().collect::<Vec<_>>(), [Established, FinWait1]);
}

#[test]
fn a_full_table_counts_what_it_could_not_follow() {
    let mut table = Table::new(1, Peers::new(10, 1_000));
    table.apply(&Transition::test(1, 0, Close, SynSent).by_process(1));
    let applied = table.apply(&Transition::test(2, 0, Close, SynSent).by_process(1));
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
        last = Some(table.apply(&Transition::test(1, i, old, new)).connection);
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
    Transition::test(1, 10, from, Close).error(error)
}

#[test]
fn a_refused_connect_is_a_failure_with_its_reason_not_a_short_connection() {
    let mut table = Table::new(10, Peers::new(10, 1_000));
    table.apply(&Transition::test(1, 0, Close, SynSent).by_process(1));
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
    table.apply(&Transition::test(1, 0, Close, SynSent).by_process(1));
    table.apply(&Transition::test(1, 1, SynSent, Established));
    table.apply(&Transition::test(1, 2, Established, Close).by_process(1));
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
        table.apply(&Transition::test(1, 0, Close, SynSent).by_process(1));
        table.apply(&Transition::test(1, 1_000_000, SynSent, Established).rtt(50, 1));
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
    table.apply(&Transition::test(1, 0, Close, SynSent).by_process(1));
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
    assert_eq!(table.keepalive_unfollowed, 0);
    let unfollowed = KeepaliveTimer {
        sock: 2,
        ..timer(0, 1)
    };
    assert!(table.keepalive_timer(&unfollowed).is_none());
    assert_eq!(
        table.keepalive_unfollowed, 1,
        "a probe the table cannot count is counted"
    );
}

#[test]
fn socket_options_set_their_own_settings_over_the_namespace_defaults() {
    let mut table = Table::new(10, Peers::new(10, 1_000));
    table.apply(&Transition::test(1, 0, Close, SynSent).by_process(1));
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
        task: Task::test(1, "app"),
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
fn an_established_connection_without_keepalive_allocates_nothing_beyond_its_slot() {
    let mut table = Table::new(10, Peers::new(10, 1_000));
    table.apply(&Transition::test(1, 0, Close, SynSent).by_process(1));
    let c = table
        .apply(&Transition::test(1, 1_000, SynSent, Established).rtt(50, 0))
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
        .apply(
            &Transition::test(1, 0, Close, SynSent)
                .by_process(1)
                .between(local, remote),
        )
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
        table.apply(&Transition::test(2, i as u64, old, new));
    }
    let [c] = &finish(&mut table)[..] else {
        panic!()
    };
    assert_eq!(
        (c.first_closer(), c.cause()),
        (Closer::Remote, Cause::Orderly)
    );
}

/// The lives of both ends of a connection closed by each side, and by a reset, as the kernel
/// records them with every transition, and as it records them with its switch off (only the
/// transitions into SYN_SENT, ESTABLISHED, LISTEN and CLOSE).
#[test]
fn a_life_recorded_without_its_middle_transitions_is_summarized_as_if_all_were_recorded() {
    for life in &LIVES[..OPENED] {
        let summarize = |quiet: bool| {
            let mut table = Table::new(10, Peers::new(10, 1_000));
            let mut last = None;
            for (i, &(old, new)) in life.iter().enumerate() {
                if quiet && !tcp_trace_common::recorded_when_quiet(new as u8) {
                    continue;
                }
                let t = Transition {
                    all_recorded: !quiet,
                    ..Transition::test(1, 1000 * i as u64, old, new).bytes(10, 10)
                };
                let applied = table.apply(&t);
                last = Some((applied.closed, applied.connection.clone()));
            }
            let (closed, connection) = last.expect("a CLOSE is always recorded");
            assert!(closed && table.is_empty(), "{life:?}");
            connection
        };
        let (all, quiet) = (summarize(false), summarize(true));
        let path = |c: &Connection| c.path.states().collect::<Vec<_>>();
        assert_eq!(path(&quiet), path(&all), "{life:?}");
        assert_eq!(quiet.direction, all.direction, "{life:?}");
        assert_eq!(quiet.first_closer(), all.first_closer(), "{life:?}");
        assert_eq!(quiet.cause(), all.cause(), "{life:?}");
        assert_eq!(quiet.payload_bytes(), all.payload_bytes(), "{life:?}");
        assert_eq!(quiet.last_ns, all.last_ns, "{life:?}");
    }
}
