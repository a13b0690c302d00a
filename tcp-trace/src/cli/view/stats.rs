//! `stats`: the agent's counters, histograms, peers and subscribers.
use std::fmt::Write as _;

use super::format::{PeerCells, duration, enum_name};
use crate::proto;

/// Per-peer aggregates: churn, handshake latency, failures.
pub fn peers_table(peers: &[proto::PeerStats]) -> String {
    let mut out = format!(
        "\n{:<48} {:>8} {:>7} {:>9} {:>9} {:>9} {:>7}  {}\n",
        "PEER", "OPENED", "CONN/S", "HS P50", "HS P99", "SHORT %", "FAILED", "FAILURES"
    );
    for p in peers {
        let cells = PeerCells::new(p);
        let _ = writeln!(
            out,
            "{:<48} {:>8} {:>7.2} {:>9} {:>9} {:>9} {:>7}  {}",
            format!("{} (netns {})", cells.label, p.netns),
            p.opened,
            p.opened_per_second,
            cells.handshake_p50,
            cells.handshake_p99,
            cells.short_lived,
            cells.failed,
            cells.failures
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
        let kind = enum_name::<proto::EventKind>(k.kind).unwrap_or("?");
        row(
            &format!("events {}", kind.to_lowercase()),
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
    row("kernel missed (nested BPF)", missed(s));
    row("kernel nested, recorded", s.kernel_recovered.to_string());
    row("records decoded", s.records_decoded.to_string());
    row("records malformed", s.records_malformed.to_string());
    row("live connections", s.live_connections.to_string());
    row("not followed (table full)", s.table_full.to_string());
    row("ends missed (cause unknown)", s.ends_missed.to_string());
    row(
        "keepalive runs, unfollowed",
        s.keepalive_unfollowed.to_string(),
    );
    row(
        "keepalive runs, unpaired",
        s.kernel_keepalive_unpaired.to_string(),
    );
    row(
        "kernel slots: taken / contended / adopted",
        format!(
            "{} / {} / {}",
            s.kernel_slot_taken, s.kernel_slot_contended, s.slots_adopted
        ),
    );
    row(
        "healed: closed / adopted (heals)",
        format!("{} / {} ({})", s.healed_closed, s.healed_adopted, s.heals),
    );
    if let Some(cpu) = &s.heal_cpu {
        row(
            "heal socket lists, CPU",
            format!("{:.3} s", cpu.seconds as f64 + f64::from(cpu.nanos) * 1e-9),
        );
    }
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

/// The kernel's skips, and which programs they were (sorted by name; programs never skipped are
/// left out).
fn missed(s: &proto::Stats) -> String {
    let mut by: Vec<_> = s
        .kernel_missed_by_program
        .iter()
        .filter(|(_, n)| **n > 0)
        .collect();
    by.sort_unstable();
    if by.is_empty() {
        return s.kernel_missed.to_string();
    }
    let by: Vec<_> = by.iter().map(|(name, n)| format!("{name} {n}")).collect();
    format!("{} ({})", s.kernel_missed, by.join(", "))
}
