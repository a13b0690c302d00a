//! `watch`: one readable line per event.
use std::fmt::Write as _;

use super::format::{enum_name, state_name, write_duration, write_owner, write_tuple, write_words};
use crate::proto;

/// `HH:MM:SS.micros` (UTC) of a timestamp.
fn write_time_of_day(out: &mut String, ts: Option<&prost_types::Timestamp>) {
    let Some(ts) = ts else {
        out.push_str("--:--:--.------");
        return;
    };
    let secs = ts.seconds.rem_euclid(86_400) as u32;
    let micros = (ts.nanos / 1000).clamp(0, 999_999) as u32;
    push_digits(out, secs / 3600, 2);
    out.push(':');
    push_digits(out, secs / 60 % 60, 2);
    out.push(':');
    push_digits(out, secs % 60, 2);
    out.push('.');
    push_digits(out, micros, 6);
}

/// `value` as exactly `width` decimal digits (zero-padded; `value` fits).
fn push_digits(out: &mut String, mut value: u32, width: usize) {
    let mut digits = [b'0'; 10];
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (value % 10) as u8;
        value /= 10;
    }
    out.extend(digits[..width].iter().map(|&d| char::from(d)));
}

/// One readable line per event.
pub fn event_line(event: &proto::Event) -> String {
    let mut line = String::new();
    write_event_line(&mut line, event);
    line
}

/// [`event_line`], appended to `line` (a buffer reused from event to event), with no newline.
pub fn write_event_line(line: &mut String, event: &proto::Event) {
    write_time_of_day(line, event.time.as_ref());
    let _ = write!(line, " {:>7} ", event.seq);
    let conn = event.connection.as_ref();
    if let Some(c) = conn {
        if c.id != 0 {
            let _ = write!(line, "conn {} ", c.id);
        }
        write_tuple(line, c);
        line.push(' ');
    }
    match &event.body {
        Some(proto::event::Body::StateChange(change)) => state_change_text(line, change, conn),
        Some(proto::event::Body::ConnectionClosed(closed)) => closed_text(line, closed),
        Some(proto::event::Body::Lost(lost)) if lost.stage == proto::LossStage::Kernel as i32 => {
            let _ = write!(
                line,
                "LOST up to {} transitions in the kernel ({} ring full, {} runs skipped): \
                 connections are healed from the kernel's socket list",
                lost.count, lost.ring_full, lost.runs_skipped
            );
        }
        Some(proto::event::Body::Lost(lost)) if lost.stage == proto::LossStage::Replay as i32 => {
            let _ = write!(
                line,
                "LOST {} events: they had left the agent's replay buffer (--replay)",
                lost.count
            );
        }
        Some(proto::event::Body::Lost(lost))
            if lost.stage == proto::LossStage::Unrecorded as i32 =>
        {
            let _ = write!(
                line,
                "NOT RECORDED: state changes of seqs {} to {} (nobody asked for them then; \
                 closing summaries are exact)",
                lost.first_seq, event.seq
            );
        }
        Some(proto::event::Body::Lost(lost)) => {
            let _ = write!(
                line,
                "LOST {} events: this client read too slowly",
                lost.count
            );
        }
        Some(proto::event::Body::Retransmit(r)) => {
            let what = if r.state == proto::TcpState::SynSent as i32 {
                "SYN"
            } else {
                "segment"
            };
            let _ = write!(
                line,
                "{what} retransmitted (#{} in {})",
                r.count,
                state_name(r.state)
            );
        }
        Some(proto::event::Body::Reset(r)) => {
            line.push_str(if r.sent {
                "RESET sent"
            } else {
                "RESET received"
            });
            if r.without_socket {
                line.push_str(" (no socket: nothing listens there)");
            }
        }
        Some(proto::event::Body::Keepalive(k)) => keepalive_text(line, k),
        None => line.push_str("(empty event)"),
    }
    if let Some(c) = conn {
        let _ = write!(line, "  netns {}", c.netns);
    }
}

fn state_change_text(
    line: &mut String,
    change: &proto::StateChange,
    conn: Option<&proto::Connection>,
) {
    line.push_str(state_name(change.old_state));
    line.push_str(" -> ");
    line.push_str(state_name(change.new_state));
    if let Some(h) = &change.handshake {
        line.push_str("  handshake ");
        write_duration(line, h.latency.as_ref());
        if h.retransmits > 0 {
            let _ = write!(line, " after {} retransmit(s)", h.retransmits);
        }
    }
    if !change.error_name.is_empty() {
        line.push_str("  ");
        line.push_str(&change.error_name);
    }
    match change.task.as_ref() {
        Some(t) if t.attribution == proto::Attribution::ProcessContext as i32 => {
            let _ = write!(line, "  by {}/{}", t.pid, t.comm);
        }
        _ => {
            line.push_str("  in ");
            line.push_str(&change.context);
            if let Some(c) = conn {
                line.push_str(", owner ");
                write_owner(line, c.owner.as_ref());
            }
        }
    }
}

fn closed_text(line: &mut String, closed: &proto::ConnectionClosed) {
    line.push_str("CLOSED ");
    write_words(line, enum_name::<proto::CloseCause>(closed.cause));
    if !closed.error_name.is_empty() {
        let _ = write!(line, " ({})", closed.error_name);
    }
    let first_fin = proto::Closer::try_from(closed.first_fin).ok();
    match first_fin {
        Some(proto::Closer::Local) => line.push_str(", closed here first"),
        Some(proto::Closer::Remote) => line.push_str(", peer closed first"),
        Some(proto::Closer::Simultaneous) => line.push_str(", both closed at once"),
        _ => {}
    }
    let lifetime = if closed.lifetime == proto::Lifetime::Long as i32 {
        "long-lived"
    } else {
        "short-lived"
    };
    line.push_str(" after ");
    write_duration(line, closed.duration.as_ref());
    let _ = write!(line, " ({lifetime})");
    if let Some(h) = &closed.handshake {
        line.push_str(", handshake ");
        write_duration(line, h.latency.as_ref());
        if h.retransmits > 0 {
            let _ = write!(line, " with {} retransmit(s)", h.retransmits);
        }
    } else if closed.failed_handshake_retransmits > 0 {
        let _ = write!(
            line,
            ", {} SYN retransmit(s)",
            closed.failed_handshake_retransmits
        );
    }
    if closed.bytes_sent > 0 || closed.bytes_received > 0 {
        let _ = write!(
            line,
            ", {} B out / {} B in",
            closed.bytes_sent, closed.bytes_received
        );
    }
    if closed.retransmits > 0 {
        let _ = write!(line, ", {} retransmits", closed.retransmits);
    }
    if closed.keepalive_probes > 0 {
        let _ = write!(line, ", {} keepalive probe(s)", closed.keepalive_probes);
    }
    line.push_str(": ");
    for (i, &state) in closed.path.iter().enumerate() {
        if i > 0 {
            line.push_str(" > ");
        }
        line.push_str(state_name(state));
    }
    if !closed.seen_open {
        line.push_str(" (opened before the agent saw it)");
    }
}

fn keepalive_text(line: &mut String, k: &proto::Keepalive) {
    use proto::keepalive::What;
    let settings = |line: &mut String| {
        if let Some(s) = &k.settings {
            let _ = write!(
                line,
                " (idle {}s, every {}s, {} probes)",
                s.idle_seconds, s.interval_seconds, s.count
            );
        }
    };
    match What::try_from(k.what) {
        Ok(What::Enabled) => {
            line.push_str("KEEPALIVE on");
            settings(line);
        }
        Ok(What::Disabled) => line.push_str("KEEPALIVE off"),
        Ok(What::Changed) => {
            line.push_str("KEEPALIVE changed");
            settings(line);
        }
        Ok(What::ProbeSent) => {
            let count = k.settings.as_ref().map(|s| s.count).unwrap_or(0);
            let _ = write!(line, "KEEPALIVE probe {} of {count} sent", k.probe);
        }
        Ok(What::PeerAnswered) => {
            let _ = write!(
                line,
                "KEEPALIVE peer answered after {} probe(s): alive",
                k.probe
            );
        }
        _ => line.push_str("KEEPALIVE ?"),
    }
    if let Some(by) = &k.by {
        let _ = write!(line, "  by {}/{}", by.pid, by.comm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(direction: proto::Direction) -> proto::Connection {
        proto::Connection {
            id: 7,
            local: Some(proto::Endpoint {
                address: "127.0.0.1".into(),
                port: 41000,
            }),
            remote: Some(proto::Endpoint {
                address: "127.0.0.1".into(),
                port: 8080,
            }),
            netns: 4026532000,
            direction: direction as i32,
            owner: Some(proto::Process {
                pid: 12,
                tid: 12,
                comm: "curl".into(),
                attribution: proto::Attribution::ProcessContext as i32,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_state_change_line_names_the_task_only_in_process_context() {
        let mut event = proto::Event {
            seq: 5,
            time: Some(prost_types::Timestamp {
                seconds: 3600 + 62,
                nanos: 1_500_000,
            }),
            connection: Some(conn(proto::Direction::Active)),
            body: Some(proto::event::Body::StateChange(proto::StateChange {
                old_state: proto::TcpState::Close as i32,
                new_state: proto::TcpState::SynSent as i32,
                task: Some(proto::Process {
                    pid: 12,
                    tid: 13,
                    comm: "curl".into(),
                    attribution: proto::Attribution::ProcessContext as i32,
                }),
                context: "process".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(
            event_line(&event),
            "01:01:02.001500       5 conn 7 127.0.0.1:41000 -> 127.0.0.1:8080 CLOSE -> SYN_SENT  by 12/curl  netns 4026532000"
        );
        event.body = Some(proto::event::Body::StateChange(proto::StateChange {
            old_state: proto::TcpState::SynSent as i32,
            new_state: proto::TcpState::Established as i32,
            task: Some(proto::Process {
                attribution: proto::Attribution::None as i32,
                ..Default::default()
            }),
            context: "kernel".into(),
            ..Default::default()
        }));
        assert!(event_line(&event).contains("SYN_SENT -> ESTABLISHED  in kernel, owner 12/curl"));
    }

    #[test]
    fn a_closed_line_tells_the_whole_path_and_duration() {
        let event = proto::Event {
            seq: 9,
            connection: Some(conn(proto::Direction::Passive)),
            body: Some(proto::event::Body::ConnectionClosed(
                proto::ConnectionClosed {
                    path: [
                        proto::TcpState::Listen,
                        proto::TcpState::SynRecv,
                        proto::TcpState::Established,
                        proto::TcpState::Close,
                    ]
                    .iter()
                    .map(|&s| s as i32)
                    .collect(),
                    duration: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 2_500_000,
                    }),
                    seen_open: true,
                    cause: proto::CloseCause::ResetReceived as i32,
                    error_name: "ECONNRESET".into(),
                    first_fin: proto::Closer::None as i32,
                    lifetime: proto::Lifetime::Short as i32,
                    handshake: Some(proto::Handshake {
                        latency: Some(prost_types::Duration {
                            seconds: 1,
                            nanos: 20_000_000,
                        }),
                        retransmits: 1,
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let line = event_line(&event);
        assert!(line.contains("127.0.0.1:41000 <- 127.0.0.1:8080"), "{line}");
        assert!(
            line.contains(
                "CLOSED reset received (ECONNRESET) after 2.5ms (short-lived), handshake 1.02s with 1 retransmit(s): LISTEN > SYN_RECV > ESTABLISHED > CLOSE"
            ),
            "{line}"
        );
    }
}
