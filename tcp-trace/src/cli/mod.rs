//! The command line: one binary that is the agent and its clients. [`args`] holds the flags;
//! the rest of this module renders the agent's answers as text.
use std::fmt::Write as _;

use crate::proto;

pub mod args;

fn state_name(value: i32) -> &'static str {
    proto::TcpState::try_from(value)
        .map(|s| s.as_str_name().trim_start_matches("TCP_STATE_"))
        .unwrap_or("?")
}

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

fn write_endpoint(out: &mut String, e: Option<&proto::Endpoint>) {
    match e {
        Some(e) if e.address.contains(':') => {
            let _ = write!(out, "[{}]:{}", e.address, e.port);
        }
        Some(e) => {
            let _ = write!(out, "{}:{}", e.address, e.port);
        }
        None => out.push('?'),
    }
}

#[cfg(test)]
fn endpoint(e: Option<&proto::Endpoint>) -> String {
    let mut out = String::new();
    write_endpoint(&mut out, e);
    out
}

/// Local and remote, with the arrow pointing from client to server.
fn write_tuple(out: &mut String, c: &proto::Connection) {
    write_endpoint(out, c.local.as_ref());
    let arrow = match proto::Direction::try_from(c.direction) {
        Ok(proto::Direction::Active) => " -> ",
        Ok(proto::Direction::Passive) => " <- ",
        Ok(proto::Direction::Listen) => {
            out.push_str(" (listening)");
            return;
        }
        _ => " -- ",
    };
    out.push_str(arrow);
    write_endpoint(out, c.remote.as_ref());
}

fn tuple(c: &proto::Connection) -> String {
    let mut out = String::new();
    write_tuple(&mut out, c);
    out
}

fn direction_name(value: i32) -> &'static str {
    match proto::Direction::try_from(value) {
        Ok(proto::Direction::Active) => "active",
        Ok(proto::Direction::Passive) => "passive",
        Ok(proto::Direction::Listen) => "listen",
        _ => "unknown",
    }
}

fn write_owner(out: &mut String, p: Option<&proto::Process>) {
    match p {
        Some(p) if p.attribution != proto::Attribution::None as i32 && p.pid != 0 => {
            let _ = write!(out, "{}/{}", p.pid, p.comm);
        }
        _ => out.push('-'),
    }
}

fn owner(p: Option<&proto::Process>) -> String {
    let mut out = String::new();
    write_owner(&mut out, p);
    out
}

fn write_duration(out: &mut String, d: Option<&prost_types::Duration>) {
    let Some(d) = d else {
        out.push('?');
        return;
    };
    let secs = d.seconds as f64 + f64::from(d.nanos) / 1e9;
    let _ = match secs {
        s if s < 1e-3 => write!(out, "{:.0}us", s * 1e6),
        s if s < 1.0 => write!(out, "{:.1}ms", s * 1e3),
        s => write!(out, "{s:.2}s"),
    };
}

fn duration(d: Option<&prost_types::Duration>) -> String {
    let mut out = String::new();
    write_duration(&mut out, d);
    out
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

/// An enum value's name without its prefix, in lower case with spaces: `reset received`.
fn write_enum_name(out: &mut String, name: Option<&str>, prefix: &str) {
    match name {
        Some(name) => out.extend(name.trim_start_matches(prefix).chars().map(|c| {
            if c == '_' {
                ' '
            } else {
                c.to_ascii_lowercase()
            }
        })),
        None => out.push('?'),
    }
}

fn enum_name(name: Option<&str>, prefix: &str) -> String {
    let mut out = String::new();
    write_enum_name(&mut out, name, prefix);
    out
}

fn closed_text(line: &mut String, closed: &proto::ConnectionClosed) {
    let cause = proto::CloseCause::try_from(closed.cause)
        .ok()
        .map(|c| c.as_str_name());
    line.push_str("CLOSED ");
    write_enum_name(line, cause, "CLOSE_CAUSE_");
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

/// The live connections as a table.
pub fn connections_table(
    conns: &[proto::Connection],
    matched: u64,
    now: std::time::SystemTime,
) -> String {
    let mut out = format!(
        "{:>8}  {:<8} {:<12} {:<46} {:<11} {:<22} {:>9}\n",
        "ID", "DIR", "STATE", "LOCAL / REMOTE", "NETNS", "OWNER", "AGE"
    );
    for c in conns {
        let age = c
            .opened_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| now.duration_since(t).ok())
            .and_then(|d| prost_types::Duration::try_from(d).ok());
        let _ = writeln!(
            out,
            "{:>8}  {:<8} {:<12} {:<46} {:<11} {:<22} {:>9}",
            c.id,
            direction_name(c.direction),
            state_name(c.state),
            tuple(c),
            c.netns,
            owner(c.owner.as_ref()),
            duration(age.as_ref()),
        );
    }
    if matched > conns.len() as u64 {
        let _ = write!(out, "{} of {matched} connections", conns.len());
    } else {
        let _ = write!(out, "{} connections", conns.len());
    }
    out
}

/// A peer as a user reads it: `-> ADDRESS:PORT` for a service this host connects to,
/// `<- ADDRESS on :PORT` for clients of a local port.
pub fn peer_label(p: &proto::PeerStats) -> String {
    let address = if p.address.contains(':') {
        format!("[{}]", p.address)
    } else {
        p.address.clone()
    };
    if p.direction == proto::Direction::Active as i32 {
        format!("-> {address}:{}", p.port)
    } else {
        format!("<- {address} on :{}", p.port)
    }
}

/// Per-peer aggregates: churn, handshake latency, failures.
pub fn peers_table(peers: &[proto::PeerStats]) -> String {
    let mut out = format!(
        "\n{:<48} {:>8} {:>7} {:>9} {:>9} {:>9} {:>7}  {}\n",
        "PEER", "OPENED", "CONN/S", "HS P50", "HS P99", "SHORT %", "FAILED", "FAILURES"
    );
    for p in peers {
        let peer = peer_label(p);
        let short = if p.closed > 0 {
            format!("{:.0}", 100.0 * p.short_lived as f64 / p.closed as f64)
        } else {
            "-".into()
        };
        let failures: Vec<String> = p
            .failures
            .iter()
            .map(|f| {
                let cause = proto::CloseCause::try_from(f.cause)
                    .ok()
                    .map(|c| c.as_str_name());
                format!("{} {}", f.count, enum_name(cause, "CLOSE_CAUSE_"))
            })
            .collect();
        let failed: u64 = p.failures.iter().map(|f| f.count).sum();
        let _ = writeln!(
            out,
            "{:<48} {:>8} {:>7.2} {:>9} {:>9} {:>9} {:>7}  {}",
            format!("{peer} (netns {})", p.netns),
            p.opened,
            p.opened_per_second,
            p.handshake_p50
                .as_ref()
                .map(|d| duration(Some(d)))
                .unwrap_or_else(|| "-".into()),
            p.handshake_p99
                .as_ref()
                .map(|d| duration(Some(d)))
                .unwrap_or_else(|| "-".into()),
            short,
            failed,
            failures.join(", ")
        );
    }
    out
}

pub fn stats_text(s: &proto::Stats) -> String {
    let mut out = String::new();
    let mut row = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<28} {value}");
    };
    for k in &s.events {
        let kind = proto::EventKind::try_from(k.kind)
            .map(|k| k.as_str_name())
            .unwrap_or("?");
        row(
            &format!(
                "events {}",
                kind.trim_start_matches("EVENT_KIND_").to_lowercase()
            ),
            k.count.to_string(),
        );
    }
    row(
        "events published (last seq)",
        s.events_published.to_string(),
    );
    row("kernel records", s.kernel_records.to_string());
    row("kernel ring full (lost)", s.kernel_ring_full.to_string());
    row("kernel filtered (--netns)", s.kernel_filtered.to_string());
    row("kernel missed (nested BPF)", s.kernel_missed.to_string());
    row("records decoded", s.records_decoded.to_string());
    row("records malformed", s.records_malformed.to_string());
    row("live connections", s.live_connections.to_string());
    row("not followed (table full)", s.table_full.to_string());
    row("ends missed (cause unknown)", s.ends_missed.to_string());
    row(
        "healed: closed / adopted (heals)",
        format!("{} / {} ({})", s.healed_closed, s.healed_adopted, s.heals),
    );
    if let Some(r) = &s.replay {
        let held = match r.oldest_seq {
            0 => format!("{} of {} events", r.held, r.capacity),
            oldest => format!(
                "{} of {} events (seq {oldest} to {})",
                r.held, r.capacity, s.events_published
            ),
        };
        row("replay buffer", held);
    }
    row("subscribers", s.subscribers.to_string());
    row("subscriber drops", s.subscriber_drops.to_string());
    if let Some(t) = &s.subscriber_totals {
        row(
            "subscriber events",
            format!(
                "{} matched = {} delivered + {} dropped + {} queued + {} abandoned",
                t.matched, t.delivered, t.dropped, t.queued, t.abandoned
            ),
        );
    }
    row("hooks attached", s.hooks_attached.join(", "));
    row(
        "hooks missing",
        if s.hooks_missing.is_empty() {
            "none".into()
        } else {
            s.hooks_missing.join("; ")
        },
    );
    if let Some(h) = s.handshake_latency.as_ref().filter(|h| h.count > 0) {
        out.push_str("\nhandshake latency\n");
        out.push_str(&histogram_text(h));
    }
    if let Some(h) = s.connection_duration.as_ref().filter(|h| h.count > 0) {
        out.push_str("\nconnection duration (closed connections seen open)\n");
        out.push_str(&histogram_text(h));
    }
    if !s.peers.is_empty() {
        out.push_str(&peers_table(&s.peers));
    }
    if !s.subscriptions.is_empty() {
        out.push('\n');
        out.push_str(&subscribers_table(&s.subscriptions));
    }
    out.trim_end().to_owned()
}

/// One line per bucket up to the last non-empty one, with a bar scaled to the largest.
pub fn histogram_text(h: &proto::Histogram) -> String {
    let mut out = String::new();
    let largest = h.buckets.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    let last = h.buckets.iter().rposition(|b| b.count > 0).unwrap_or(0);
    let mut lower = "0".to_string();
    for b in &h.buckets[..=last] {
        let upper = b
            .upper_bound
            .as_ref()
            .map_or_else(|| "inf".to_string(), |d| duration(Some(d)));
        let bar = "#".repeat(((b.count * 40).div_ceil(largest)) as usize);
        let line = format!(
            "  {:>18} {:>10}  {bar}",
            format!("{lower} - {upper}"),
            b.count
        );
        out.push_str(line.trim_end());
        out.push('\n');
        lower = upper;
    }
    let mean = h.sum.as_ref().map(|sum| {
        let ns = sum.seconds as f64 * 1e9 + f64::from(sum.nanos);
        let mean_ns = ns / h.count.max(1) as f64;
        duration(Some(&prost_types::Duration {
            seconds: (mean_ns / 1e9) as i64,
            nanos: (mean_ns % 1e9) as i32,
        }))
    });
    let _ = writeln!(
        out,
        "  {} connections, mean {}",
        h.count,
        mean.unwrap_or_else(|| "?".into())
    );
    out
}

/// Each subscriber's accounting: matched = delivered + dropped + queued.
pub fn subscribers_table(subs: &[proto::SubscriberStats]) -> String {
    let mut out = format!(
        "{:>5}  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}\n",
        "SUB", "PEER", "QUEUE", "QUEUED", "MATCHED", "DELIVERED", "DROPPED", "REPLAYED", "FILTER"
    );
    for s in subs {
        let _ = writeln!(
            out,
            "{:>5}  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
            s.id,
            s.peer,
            s.queue_capacity,
            s.queued,
            s.matched,
            s.delivered,
            s.dropped,
            s.replayed,
            s.filter
        );
    }
    out
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

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        assert_eq!(
            endpoint(Some(&proto::Endpoint {
                address: "::1".into(),
                port: 80
            })),
            "[::1]:80"
        );
    }
}
