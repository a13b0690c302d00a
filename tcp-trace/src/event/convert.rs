//! Domain types -> proto messages, in one place.
use std::time::{Duration, SystemTime};

use super::{Clock, EventKind, Keys, clock::clock_ns};
use crate::{
    lifecycle::{
        Cause, Closer, Connection, Direction, KeepaliveChange, KeepaliveDefaults, OwnerSource,
        Peers, peers::FAILURE_CAUSES,
    },
    model::{KeepaliveOption, Reset, Retransmit, Task, TcpState, errno},
    proto,
};

pub fn state(s: TcpState) -> proto::TcpState {
    proto::TcpState::try_from(s as i32).unwrap_or(proto::TcpState::Unspecified)
}

pub(super) fn direction(d: Direction) -> proto::Direction {
    match d {
        Direction::Active => proto::Direction::Active,
        Direction::Passive => proto::Direction::Passive,
        Direction::Listen => proto::Direction::Listen,
        Direction::Unknown => proto::Direction::Unknown,
    }
}

fn process(task: &Task, attribution: proto::Attribution) -> proto::Process {
    proto::Process {
        pid: task.pid,
        tid: task.tid,
        comm: task.comm().to_owned(),
        attribution: attribution as i32,
    }
}

fn no_process() -> proto::Process {
    proto::Process {
        attribution: proto::Attribution::None as i32,
        ..Default::default()
    }
}

fn endpoint(addr: std::net::SocketAddr) -> proto::Endpoint {
    proto::Endpoint {
        address: address(addr.ip()),
        port: u32::from(addr.port()),
    }
}

/// An address as text, the same as its `Display`. Every event carries two, so IPv4 (the common
/// case) is written directly into a String of the right size: through `core::fmt` it cost more
/// than building the rest of the event.
fn address(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(ip) = ip else {
        return ip.to_string();
    };
    let (text, len) = ipv4_text(ip);
    String::from_utf8_lossy(&text[..len]).into_owned()
}

/// An IPv4 address's dotted quad, in the first `len` bytes.
pub(super) fn ipv4_text(ip: std::net::Ipv4Addr) -> ([u8; 15], usize) {
    let mut text = [0; 15];
    let mut len = 0;
    let mut push = |b: u8| {
        text[len] = b;
        len += 1;
    };
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            push(b'.');
        }
        if octet >= 100 {
            push(b'0' + octet / 100);
        }
        if octet >= 10 {
            push(b'0' + octet / 10 % 10);
        }
        push(b'0' + octet % 10);
    }
    (text, len)
}

/// The connection's owner as far as known, and how it is known.
pub(super) fn owner(c: &Connection) -> (Option<Task>, proto::Attribution) {
    match c.owner() {
        Some(owner) => {
            let attribution = match owner.source {
                OwnerSource::ProcessContext => proto::Attribution::ProcessContext,
                OwnerSource::Listener => proto::Attribution::SocketOwner,
                OwnerSource::Accepted => proto::Attribution::Accepted,
            };
            (Some(owner.task), attribution)
        }
        None => (None, proto::Attribution::None),
    }
}

pub fn connection(c: &Connection, clock: &Clock) -> proto::Connection {
    let owner = match owner(c) {
        (Some(task), attribution) => process(&task, attribution),
        (None, _) => no_process(),
    };
    proto::Connection {
        id: c.id,
        sock: c.sock,
        ip_version: if c.local().is_ipv4() { 4 } else { 6 },
        local: Some(endpoint(c.local())),
        remote: Some(endpoint(c.remote())),
        netns: u64::from(c.netns),
        direction: direction(c.direction) as i32,
        owner: Some(owner),
        state: state(c.state) as i32,
        opened_at: Some(clock.timestamp(c.opened_ns)),
        handshake_latency: c.handshake_ns().and_then(duration),
        keepalive: keepalive_settings(c),
    }
}

pub fn keys(c: &Connection, kind: EventKind) -> Keys {
    Keys {
        kind,
        local: c.local(),
        remote: c.remote(),
        pid: c.owner().map(|o| o.task.pid),
        netns: c.netns,
        comm: c.owner().map_or([0; 16], |o| o.task.comm),
        direction: c.direction,
        state: Some(c.state),
    }
}

fn event(
    ts_ns: u64,
    clock: &Clock,
    connection: proto::Connection,
    body: proto::event::Body,
) -> proto::Event {
    proto::Event {
        seq: 0,
        time: Some(clock.timestamp(ts_ns)),
        kernel_time_ns: ts_ns,
        connection: Some(connection),
        body: Some(body),
    }
}

pub fn duration(ns: u64) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(Duration::from_nanos(ns)).ok()
}

/// The kernel's name for an errno tcp-trace reports.
pub fn errno_name(errno: u32) -> String {
    errno_text(errno).into_owned()
}

/// `errno_name`, allocating only for an errno without a name here.
pub(super) fn errno_text(errno: u32) -> std::borrow::Cow<'static, str> {
    match errno {
        0 => "".into(),
        errno::EPIPE => "EPIPE".into(),
        errno::ENETUNREACH => "ENETUNREACH".into(),
        errno::ECONNABORTED => "ECONNABORTED".into(),
        errno::ECONNRESET => "ECONNRESET".into(),
        errno::ETIMEDOUT => "ETIMEDOUT".into(),
        errno::ECONNREFUSED => "ECONNREFUSED".into(),
        errno::EHOSTUNREACH => "EHOSTUNREACH".into(),
        n => format!("errno {n}").into(),
    }
}

pub(super) fn handshake(c: &Connection) -> Option<proto::Handshake> {
    c.handshake_ns().map(|ns| proto::Handshake {
        latency: duration(ns),
        retransmits: c.handshake_retransmits(),
    })
}

pub(super) fn keepalive_settings(c: &Connection) -> Option<proto::KeepaliveSettings> {
    let k = c.keepalive();
    if !k.enabled && k.idle_s.is_none() && k.interval_s.is_none() && k.count.is_none() {
        return None;
    }
    let effective = k.effective(c.keepalive_defaults().unwrap_or(KeepaliveDefaults::LINUX));
    Some(proto::KeepaliveSettings {
        enabled: k.enabled,
        idle_seconds: effective.idle_s,
        interval_seconds: effective.interval_s,
        count: effective.count,
        idle_set: k.idle_s.is_some(),
        interval_set: k.interval_s.is_some(),
        count_set: k.count.is_some(),
    })
}

/// The state change event of one transition, built as a message: the reference the hand-written
/// encoding (`Encoder::state_change`) is tested against.
#[cfg(test)]
pub fn state_change(
    t: &crate::model::Transition,
    c: &Connection,
    clock: &Clock,
) -> (proto::Event, Keys) {
    let task = match t.context.task() {
        Some(task) => process(task, proto::Attribution::ProcessContext),
        None => no_process(),
    };
    let change = proto::StateChange {
        old_state: state(t.old) as i32,
        new_state: state(t.new) as i32,
        task: Some(task),
        context: t.context.describe().to_owned(),
        handshake: if t.new == TcpState::Established {
            handshake(c)
        } else {
            None
        },
        error: t.error,
        error_name: errno_name(t.error),
    };
    let body = proto::event::Body::StateChange(change);
    (
        event(t.ts_ns, clock, connection(c, clock), body),
        keys(c, EventKind::StateChange),
    )
}

fn cause(c: Cause) -> proto::CloseCause {
    match c {
        Cause::Orderly => proto::CloseCause::Orderly,
        Cause::ResetSent => proto::CloseCause::ResetSent,
        Cause::ResetReceived => proto::CloseCause::ResetReceived,
        Cause::Refused => proto::CloseCause::Refused,
        Cause::ConnectTimeout => proto::CloseCause::ConnectTimeout,
        Cause::Unreachable => proto::CloseCause::Unreachable,
        Cause::KeepaliveTimeout => proto::CloseCause::KeepaliveTimeout,
        Cause::RetransmitTimeout => proto::CloseCause::RetransmitTimeout,
        Cause::Aborted => proto::CloseCause::Aborted,
        Cause::ListenerClosed => proto::CloseCause::ListenerClosed,
        Cause::Unknown => proto::CloseCause::Unknown,
    }
}

fn closer(c: Closer) -> proto::Closer {
    match c {
        Closer::Local => proto::Closer::Local,
        Closer::Remote => proto::Closer::Remote,
        Closer::Simultaneous => proto::Closer::Simultaneous,
        Closer::None => proto::Closer::None,
    }
}

/// The closing summary of a connection whose life is complete.
pub fn closed(c: &Connection, clock: &Clock, long_lived_ns: u64) -> (proto::Event, Keys) {
    (
        event(
            c.last_ns,
            clock,
            connection(c, clock),
            closed_body(c, long_lived_ns),
        ),
        keys(c, EventKind::ConnectionClosed),
    )
}

/// The body of [`closed`]'s event.
pub fn closed_body(c: &Connection, long_lived_ns: u64) -> proto::event::Body {
    let lifetime = if c.duration_ns() >= long_lived_ns {
        proto::Lifetime::Long
    } else {
        proto::Lifetime::Short
    };
    let established = c.handshake_ns().is_some();
    let (bytes_sent, bytes_received) = c.payload_bytes();
    let summary = proto::ConnectionClosed {
        path: c.path.states().map(|s| state(s) as i32).collect(),
        duration: duration(c.duration_ns()),
        seen_open: c.seen_open(),
        cause: cause(c.cause()) as i32,
        first_fin: closer(c.first_closer()) as i32,
        lifetime: lifetime as i32,
        handshake: handshake(c),
        failed_handshake_retransmits: if established {
            0
        } else {
            c.handshake_retransmits()
        },
        retransmits: c.retransmits(),
        resets_sent: c.resets_sent(),
        resets_received: c.resets_received(),
        error: c.error(),
        error_name: errno_name(c.error()),
        keepalive: keepalive_settings(c),
        keepalive_probes: c.keepalive().probes,
        keepalive_unanswered: c.keepalive().unanswered,
        srtt_us: c.srtt_us,
        bytes_sent,
        bytes_received,
    };
    proto::event::Body::ConnectionClosed(summary)
}

pub fn retransmit(r: &Retransmit, c: &Connection, clock: &Clock) -> (proto::Event, Keys) {
    (
        event(r.ts_ns, clock, connection(c, clock), retransmit_body(r, c)),
        keys(c, EventKind::Retransmit),
    )
}

/// The body of [`retransmit`]'s event.
pub fn retransmit_body(r: &Retransmit, c: &Connection) -> proto::event::Body {
    proto::event::Body::Retransmit(proto::Retransmit {
        state: state(r.state) as i32,
        count: c.retransmits(),
    })
}

/// A reset, of a known connection or (sent without a socket) of bare endpoints.
pub fn reset(r: &Reset, c: Option<&Connection>, clock: &Clock) -> (proto::Event, Keys) {
    let body = proto::event::Body::Reset(proto::Reset {
        sent: r.sent,
        reason: r.reason,
        without_socket: r.sock == 0,
    });
    let (conn, keys) = match c {
        Some(c) => (connection(c, clock), keys(c, EventKind::Reset)),
        None => {
            let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
            let (local, remote) = r.tuple.unwrap_or((unspecified, unspecified));
            let conn = proto::Connection {
                sock: r.sock,
                ip_version: if local.is_ipv4() { 4 } else { 6 },
                local: Some(endpoint(local)),
                remote: Some(endpoint(remote)),
                netns: u64::from(r.netns),
                direction: proto::Direction::Unknown as i32,
                owner: Some(no_process()),
                ..Default::default()
            };
            let keys = Keys {
                kind: EventKind::Reset,
                local,
                remote,
                pid: None,
                netns: r.netns,
                comm: [0; 16],
                direction: Direction::Unknown,
                state: None,
            };
            (conn, keys)
        }
    };
    (event(r.ts_ns, clock, conn, body), keys)
}

pub fn keepalive(
    ts_ns: u64,
    change: &KeepaliveChange,
    c: &Connection,
    clock: &Clock,
) -> (proto::Event, Keys) {
    (
        event(
            ts_ns,
            clock,
            connection(c, clock),
            keepalive_body(change, c),
        ),
        keys(c, EventKind::Keepalive),
    )
}

/// The body of [`keepalive`]'s event.
pub fn keepalive_body(change: &KeepaliveChange, c: &Connection) -> proto::event::Body {
    use proto::keepalive::What;
    let (what, probe, by) = match *change {
        KeepaliveChange::Configured {
            option,
            value,
            task,
        } => {
            let what = match (option, value) {
                (KeepaliveOption::Enabled, 0) => What::Disabled,
                (KeepaliveOption::Enabled, _) => What::Enabled,
                _ => What::Changed,
            };
            (
                what,
                0,
                Some(process(&task, proto::Attribution::ProcessContext)),
            )
        }
        KeepaliveChange::ProbeSent { probe } => (What::ProbeSent, probe, None),
        KeepaliveChange::PeerAnswered { probes } => (What::PeerAnswered, probes, None),
    };
    proto::event::Body::Keepalive(proto::Keepalive {
        what: what as i32,
        probe,
        settings: keepalive_settings(c),
        by,
    })
}

pub fn lost(count: u64, last_seq: u64, stage: proto::LossStage) -> proto::Event {
    proto::Event {
        seq: last_seq,
        time: Some(SystemTime::now().into()),
        kernel_time_ns: 0,
        connection: None,
        body: Some(proto::event::Body::Lost(proto::Lost {
            count,
            stage: stage as i32,
            ..Default::default()
        })),
    }
}

/// Replayed history without state changes from `first_seq` to `last_seq`: nobody asked for
/// them then, so the kernel did not record them.
pub fn unrecorded(first_seq: u64, last_seq: u64) -> proto::Event {
    let mut event = lost(0, last_seq, proto::LossStage::Unrecorded);
    if let Some(proto::event::Body::Lost(lost)) = &mut event.body {
        lost.first_seq = first_seq;
    }
    event
}

/// Records lost in the kernel (a full ring, skipped runs): an event of its own, for every
/// subscriber (the bus delivers kind LOST whatever the filter).
pub fn kernel_lost(ring_full: u64, runs_skipped: u64) -> (proto::Event, Keys) {
    let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let event = proto::Event {
        body: Some(proto::event::Body::Lost(proto::Lost {
            count: ring_full + runs_skipped,
            stage: proto::LossStage::Kernel as i32,
            ring_full,
            runs_skipped,
            first_seq: 0,
        })),
        ..lost(0, 0, proto::LossStage::Kernel)
    };
    let keys = Keys {
        kind: EventKind::Lost,
        local: unspecified,
        remote: unspecified,
        pid: None,
        netns: 0,
        comm: [0; 16],
        direction: Direction::Unknown,
        state: None,
    };
    (event, keys)
}

/// The per-peer aggregates, busiest first.
pub fn peers(peers: &Peers) -> Vec<proto::PeerStats> {
    let now_ns = u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0);
    let mut out: Vec<proto::PeerStats> = peers
        .iter()
        .map(|(key, p)| proto::PeerStats {
            netns: u64::from(key.netns),
            direction: if key.active {
                proto::Direction::Active
            } else {
                proto::Direction::Passive
            } as i32,
            address: key.address.to_string(),
            port: u32::from(key.port),
            opened: p.opened,
            closed: p.closed,
            opened_per_second: p.rate_per_second(now_ns),
            handshake_p50: p.handshake.quantile_ns(0.50).and_then(duration),
            handshake_p90: p.handshake.quantile_ns(0.90).and_then(duration),
            handshake_p99: p.handshake.quantile_ns(0.99).and_then(duration),
            handshakes: p.handshake.count,
            short_lived: p.short_lived,
            long_lived: p.long_lived,
            failures: FAILURE_CAUSES
                .iter()
                .zip(p.failures)
                .filter(|&(_, n)| n > 0)
                .map(|(&c, count)| proto::CauseCount {
                    cause: cause(c) as i32,
                    count,
                })
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| b.opened.cmp(&a.opened).then(a.address.cmp(&b.address)));
    out
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::address;

    #[test]
    fn addresses_read_exactly_as_their_display() {
        for octet in 0..=255 {
            for ip in [
                Ipv4Addr::new(octet, 0, 0, 1),
                Ipv4Addr::new(10, octet, 7, octet),
                Ipv4Addr::new(255, 255, octet, 0),
            ] {
                assert_eq!(address(IpAddr::V4(ip)), ip.to_string());
            }
        }
        for ip in [
            Ipv6Addr::LOCALHOST,
            "fe80::1:2".parse().unwrap(),
            "::ffff:127.0.0.1".parse().unwrap(),
        ] {
            assert_eq!(address(IpAddr::V6(ip)), ip.to_string());
        }
    }
}
