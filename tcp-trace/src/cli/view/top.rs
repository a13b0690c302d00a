//! `tcp-trace top`: the busiest peers, redrawn every interval. The agent already aggregates
//! peers (GetStats: opens, handshake latency, failures by cause); this view polls it once per
//! interval and turns the counters into rates, so it costs the agent one small request a
//! second, not a stream of every event.
use std::{collections::HashMap, fmt::Write as _, net::IpAddr, time::Duration};

use super::format::PeerCells;
use crate::{filter::Cidr, proto};

/// Which peers to show (all given parts must match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerFilter {
    pub netns: Vec<u64>,
    pub directions: Vec<proto::Direction>,
    pub ports: Vec<u32>,
    pub addresses: Vec<Cidr>,
}

impl PeerFilter {
    fn matches(&self, p: &proto::PeerStats) -> bool {
        let direction = proto::Direction::try_from(p.direction).unwrap_or_default();
        let ip: Option<IpAddr> = p.address.parse().ok();
        (self.netns.is_empty() || self.netns.contains(&p.netns))
            && (self.directions.is_empty() || self.directions.contains(&direction))
            && (self.ports.is_empty() || self.ports.contains(&p.port))
            && (self.addresses.is_empty()
                || ip.is_some_and(|ip| self.addresses.iter().any(|c| c.contains(ip))))
    }
}

type PeerKey = (u64, i32, String, u32);

fn key(p: &proto::PeerStats) -> PeerKey {
    (p.netns, p.direction, p.address.clone(), p.port)
}

/// The previous sample, to turn counters into rates.
#[derive(Debug, Default)]
pub struct Top {
    opened: HashMap<PeerKey, u64>,
    events_published: Option<u64>,
}

impl Top {
    pub fn new() -> Top {
        Top::default()
    }

    /// One frame from a GetStats sample taken `interval` after the previous one. On the first
    /// sample, rates are the agent's own (over its last minute).
    pub fn frame(
        &mut self,
        stats: &proto::Stats,
        interval: Duration,
        filter: &PeerFilter,
        rows: usize,
    ) -> String {
        let secs = interval.as_secs_f64().max(1e-9);
        let mut out = String::from("tcp-trace top");
        if let Some(before) = self.events_published {
            let rate = stats.events_published.saturating_sub(before) as f64 / secs;
            let _ = write!(out, "  {rate:.0} events/s");
        }
        let _ = writeln!(
            out,
            "  {} live connections  {} subscribers  lost: {} in the kernel, {} by slow subscribers",
            stats.live_connections,
            stats.subscribers,
            stats.kernel_ring_full,
            stats.subscriber_drops
        );
        let _ = writeln!(
            out,
            "{:<44} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7}  FAILURES",
            "PEER", "CONN/S", "OPENED", "HS P50", "HS P99", "SHORT%", "FAILED"
        );
        let mut peers: Vec<(f64, &proto::PeerStats)> = stats
            .peers
            .iter()
            .filter(|p| filter.matches(p))
            .map(|p| {
                let rate = match self.opened.get(&key(p)) {
                    Some(&before) => p.opened.saturating_sub(before) as f64 / secs,
                    None if self.events_published.is_some() => p.opened as f64 / secs,
                    None => p.opened_per_second,
                };
                (rate, p)
            })
            .collect();
        peers.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(b.1.opened.cmp(&a.1.opened))
                .then_with(|| key(a.1).cmp(&key(b.1)))
        });
        for (rate, p) in peers.iter().take(rows) {
            out.push_str(&row(*rate, p));
        }
        if peers.len() > rows {
            let _ = writeln!(out, "({} more peers)", peers.len() - rows);
        }
        self.opened = stats.peers.iter().map(|p| (key(p), p.opened)).collect();
        self.events_published = Some(stats.events_published);
        out
    }
}

fn row(rate: f64, p: &proto::PeerStats) -> String {
    let cells = PeerCells::new(p);
    let line = format!(
        "{:<44} {:>8.1} {:>8} {:>9} {:>9} {:>7} {:>7}  {}",
        cells.label,
        rate,
        p.opened,
        cells.handshake_p50,
        cells.handshake_p99,
        cells.short_lived,
        cells.failed,
        cells.failures
    );
    format!("{}\n", line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(
        direction: proto::Direction,
        address: &str,
        port: u32,
        opened: u64,
    ) -> proto::PeerStats {
        proto::PeerStats {
            netns: 7,
            direction: direction as i32,
            address: address.into(),
            port,
            opened,
            opened_per_second: 0.5,
            handshake_p50: Some(prost_types::Duration {
                seconds: 0,
                nanos: 64_000,
            }),
            ..Default::default()
        }
    }

    fn stats(peers: Vec<proto::PeerStats>, events: u64) -> proto::Stats {
        proto::Stats {
            peers,
            events_published: events,
            ..Default::default()
        }
    }

    #[test]
    fn peers_are_ranked_by_the_connection_rate_of_the_last_interval() {
        let mut top = Top::new();
        let all = PeerFilter::default();
        let first = top.frame(
            &stats(
                vec![peer(proto::Direction::Active, "198.51.100.2", 443, 100)],
                1000,
            ),
            Duration::from_secs(1),
            &all,
            10,
        );
        assert!(first.contains("-> 198.51.100.2:443"), "{first}");
        assert!(
            first.lines().nth(2).unwrap().contains(" 0.5 "),
            "first frame: the agent's rate\n{first}"
        );
        let refused = proto::PeerStats {
            failures: vec![proto::CauseCount {
                cause: proto::CloseCause::Refused as i32,
                count: 3,
            }],
            ..peer(proto::Direction::Active, "198.51.100.3", 80, 3)
        };
        let second = top.frame(
            &stats(
                vec![
                    peer(proto::Direction::Active, "198.51.100.2", 443, 104),
                    refused,
                    peer(proto::Direction::Passive, "2001:db8::7", 8080, 1),
                ],
                1300,
            ),
            Duration::from_secs(2),
            &all,
            10,
        );
        let lines: Vec<&str> = second.lines().collect();
        assert!(lines[0].contains("150 events/s"), "{second}");
        assert!(lines[2].starts_with("-> 198.51.100.2:443"), "{second}");
        assert!(
            lines[2].contains(" 2.0 ") && lines[2].contains("64us"),
            "{second}"
        );
        assert!(
            lines[3].starts_with("-> 198.51.100.3:80"),
            "new peers count from 0: {second}"
        );
        assert!(lines[3].ends_with("3  3 refused"), "{second}");
        assert!(
            lines[4].starts_with("<- [2001:db8::7] on :8080"),
            "{second}"
        );
        let passive = PeerFilter {
            directions: vec![proto::Direction::Passive],
            ..Default::default()
        };
        let only = top.frame(&stats(vec![], 1300), Duration::from_secs(1), &passive, 10);
        assert_eq!(only.lines().count(), 2, "{only}");
    }
}
