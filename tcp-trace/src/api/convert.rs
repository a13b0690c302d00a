//! Domain types -> proto messages, in one place.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{
    filter::Keys,
    lifecycle::{Applied, Connection, Direction, OwnerSource},
    model::{Task, TcpState, Transition},
    proto,
};

/// Maps the kernel's CLOCK_MONOTONIC timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let real = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        Clock {
            offset_ns: real - mono,
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        let ns = i128::from(monotonic_ns) + self.offset_ns;
        UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
    }

    pub fn timestamp(&self, monotonic_ns: u64) -> prost_types::Timestamp {
        self.wall(monotonic_ns).into()
    }
}

pub fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

pub fn state(s: TcpState) -> proto::TcpState {
    proto::TcpState::try_from(s as i32).unwrap_or(proto::TcpState::Unspecified)
}

fn direction(d: Direction) -> proto::Direction {
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
        address: addr.ip().to_string(),
        port: u32::from(addr.port()),
    }
}

pub fn connection(c: &Connection, clock: &Clock) -> proto::Connection {
    let owner = match c.owner {
        Some(owner) => {
            let attribution = match owner.source {
                OwnerSource::ProcessContext => proto::Attribution::ProcessContext,
                OwnerSource::Listener => proto::Attribution::SocketOwner,
            };
            process(&owner.task, attribution)
        }
        None => no_process(),
    };
    proto::Connection {
        id: c.id,
        sock: c.sock,
        ip_version: if c.local.is_ipv4() { 4 } else { 6 },
        local: Some(endpoint(c.local)),
        remote: Some(endpoint(c.remote)),
        netns: u64::from(c.netns),
        direction: direction(c.direction) as i32,
        owner: Some(owner),
        state: state(c.state) as i32,
        opened_at: Some(clock.timestamp(c.opened_ns)),
    }
}

pub fn keys(c: &Connection, kind: proto::EventKind) -> Keys {
    Keys {
        kind,
        local: c.local,
        remote: c.remote,
        pid: c.owner.map(|o| o.task.pid),
        netns: c.netns,
    }
}

/// The events one transition produces: its state change, and the closing summary when the
/// connection reached CLOSE. `seq` is set by the bus.
pub fn events(
    t: &Transition,
    applied: &Applied,
    clock: &Clock,
    out: &mut Vec<(proto::Event, Keys)>,
) {
    let c = &applied.connection;
    let conn = connection(c, clock);
    let task = match t.context.task() {
        Some(task) => process(task, proto::Attribution::ProcessContext),
        None => no_process(),
    };
    let change = proto::StateChange {
        old_state: state(t.old) as i32,
        new_state: state(t.new) as i32,
        task: Some(task),
        context: t.context.describe().to_owned(),
    };
    let event = |connection, body| proto::Event {
        seq: 0,
        time: Some(clock.timestamp(t.ts_ns)),
        kernel_time_ns: t.ts_ns,
        connection: Some(connection),
        body: Some(body),
    };
    if applied.closed {
        out.push((
            event(conn.clone(), proto::event::Body::StateChange(change)),
            keys(c, proto::EventKind::StateChange),
        ));
        let closed = proto::ConnectionClosed {
            path: c.path.states().iter().map(|&s| state(s) as i32).collect(),
            duration: prost_types::Duration::try_from(Duration::from_nanos(c.duration_ns())).ok(),
            seen_open: c.seen_open,
        };
        out.push((
            event(conn, proto::event::Body::ConnectionClosed(closed)),
            keys(c, proto::EventKind::ConnectionClosed),
        ));
    } else {
        out.push((
            event(conn, proto::event::Body::StateChange(change)),
            keys(c, proto::EventKind::StateChange),
        ));
    }
}

pub fn lost(count: u64, last_seq: u64) -> proto::Event {
    proto::Event {
        seq: last_seq,
        time: Some(SystemTime::now().into()),
        kernel_time_ns: 0,
        connection: None,
        body: Some(proto::event::Body::Lost(proto::Lost { count })),
    }
}
