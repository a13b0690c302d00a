//! Aggregates per remote peer: what users ask to find churn that should be pooled, slow or
//! failing handshakes, and dead peers.
use std::{
    collections::{HashMap, hash_map::Entry},
    net::IpAddr,
};

use super::{Cause, Connection, Direction};

/// A peer as users think of it: for connections this host opened, the remote service
/// (address and port); for connections it accepted, the remote address and the local port
/// (the remote port is ephemeral, one per connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub netns: u32,
    pub active: bool,
    pub address: IpAddr,
    pub port: u16,
}

impl PeerKey {
    pub fn of(c: &Connection) -> Option<PeerKey> {
        let (active, port) = match c.direction {
            Direction::Active => (true, c.remote().port()),
            Direction::Passive => (false, c.local().port()),
            Direction::Listen | Direction::Unknown => return None,
        };
        Some(PeerKey {
            netns: c.netns,
            active,
            address: c.remote().ip(),
            port,
        })
    }
}

/// Handshake latencies in power-of-two microsecond buckets: bucket i holds [2^i, 2^(i+1)) us.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u32; 32],
    pub count: u64,
}

impl Histogram {
    pub fn record(&mut self, ns: u64) {
        let us = (ns / 1000).max(1);
        let bucket = (63 - us.leading_zeros() as usize).min(31);
        self.buckets[bucket] = self.buckets[bucket].saturating_add(1);
        self.count += 1;
    }

    /// The `q` quantile (0..=1), as the upper bound of its bucket, in nanoseconds.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return Some((1u64 << (i + 1)) * 1000);
            }
        }
        None
    }
}

/// Failures counted by cause.
pub const FAILURE_CAUSES: [Cause; 7] = [
    Cause::Refused,
    Cause::ConnectTimeout,
    Cause::Unreachable,
    Cause::ResetReceived,
    Cause::ResetSent,
    Cause::KeepaliveTimeout,
    Cause::RetransmitTimeout,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerStats {
    pub opened: u64,
    pub closed: u64,
    /// Closed connections that lived less than the long-lived threshold.
    pub short_lived: u64,
    pub long_lived: u64,
    /// Indexed like [`FAILURE_CAUSES`].
    pub failures: [u64; 7],
    pub handshake: Histogram,
    /// Opens per second over the last 60 s: one slot per second of kernel time.
    recent: [u32; 60],
    recent_second: u64,
}

impl Default for PeerStats {
    fn default() -> Self {
        PeerStats {
            opened: 0,
            closed: 0,
            short_lived: 0,
            long_lived: 0,
            failures: [0; 7],
            handshake: Histogram::default(),
            recent: [0; 60],
            recent_second: 0,
        }
    }
}

impl PeerStats {
    fn tick(&mut self, now_ns: u64) {
        let second = now_ns / 1_000_000_000;
        let gap = second.saturating_sub(self.recent_second);
        if gap >= 60 {
            self.recent = [0; 60];
        } else {
            for s in 1..=gap {
                self.recent[((self.recent_second + s) % 60) as usize] = 0;
            }
        }
        self.recent_second = self.recent_second.max(second);
    }

    /// Connections opened per second, averaged over the last 60 seconds before `now_ns`.
    pub fn rate_per_second(&self, now_ns: u64) -> f64 {
        let mut copy = *self;
        copy.tick(now_ns);
        f64::from(copy.recent.iter().sum::<u32>()) / 60.0
    }

    pub fn failed(&self) -> u64 {
        self.failures.iter().sum()
    }
}

/// Peers remembered from the latest lookups.
const RECENT: usize = 4;

#[derive(Debug)]
pub struct Peers {
    /// Each peer's place in `stats`. Hashed with foldhash, seeded per process (a remote host
    /// chooses its address and port), where SipHash cost the agent several percent at churn.
    index: HashMap<PeerKey, u32, foldhash::fast::RandomState>,
    /// Peers in the order first seen; never removed, so a place stays valid.
    stats: Vec<(PeerKey, PeerStats)>,
    /// The peers of the latest lookups: a connection is looked up at its open, establishment
    /// and close, and churn goes to a few peers (and on loopback, to both ends of each), so
    /// most lookups need no hash. Replaced in turn.
    recent: [Option<(PeerKey, u32)>; RECENT],
    next_recent: usize,
    max_peers: usize,
    long_lived_ns: u64,
    /// Connections not aggregated because the peer table was full.
    pub peers_full: u64,
}

impl Peers {
    pub fn new(max_peers: usize, long_lived_ns: u64) -> Peers {
        Peers {
            index: HashMap::default(),
            stats: Vec::new(),
            recent: [None; RECENT],
            next_recent: 0,
            max_peers,
            long_lived_ns,
            peers_full: 0,
        }
    }

    pub fn long_lived_ns(&self) -> u64 {
        self.long_lived_ns
    }

    fn entry(&mut self, c: &Connection) -> Option<&mut PeerStats> {
        let key = PeerKey::of(c)?;
        let recent = self.recent.iter().flatten().find(|(peer, _)| *peer == key);
        let place = match recent {
            Some(&(_, place)) => place,
            None => {
                let place = match self.index.entry(key) {
                    Entry::Occupied(peer) => *peer.get(),
                    Entry::Vacant(peer) if self.stats.len() < self.max_peers => {
                        let place = self.stats.len() as u32;
                        self.stats.push((key, PeerStats::default()));
                        *peer.insert(place)
                    }
                    Entry::Vacant(_) => {
                        self.peers_full += 1;
                        return None;
                    }
                };
                self.recent[self.next_recent] = Some((key, place));
                self.next_recent = (self.next_recent + 1) % RECENT;
                place
            }
        };
        Some(&mut self.stats[place as usize].1)
    }

    pub fn opened(&mut self, c: &Connection) {
        if let Some(p) = self.entry(c) {
            p.opened += 1;
            p.tick(c.opened_ns);
            p.recent[(c.opened_ns / 1_000_000_000 % 60) as usize] += 1;
        }
    }

    pub fn established(&mut self, c: &Connection) {
        if let (Some(ns), Some(p)) = (c.handshake_ns(), self.entry(c)) {
            p.handshake.record(ns);
        }
    }

    pub fn closed(&mut self, c: &Connection) {
        let long_lived_ns = self.long_lived_ns;
        let Some(p) = self.entry(c) else { return };
        p.closed += 1;
        if c.duration_ns() >= long_lived_ns {
            p.long_lived += 1;
        } else {
            p.short_lived += 1;
        }
        if let Some(i) = FAILURE_CAUSES.iter().position(|&cause| cause == c.cause()) {
            p.failures[i] += 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PeerKey, &PeerStats)> {
        self.stats.iter().map(|(key, stats)| (key, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_power_of_two_buckets() {
        let mut h = Histogram::default();
        for us in [100u64, 100, 100, 100, 100, 100, 100, 100, 100, 5000] {
            h.record(us * 1000);
        }
        assert_eq!(h.quantile_ns(0.5), Some(128_000)); // 100 us is in [64, 128)
        assert_eq!(h.quantile_ns(0.99), Some(8_192_000)); // 5 ms is in [4096, 8192) us
        assert_eq!(Histogram::default().quantile_ns(0.5), None);
    }

    #[test]
    fn the_rate_counts_opens_in_the_last_minute_only() {
        let mut p = PeerStats::default();
        for s in 0..30u64 {
            p.tick(s * 1_000_000_000);
            p.recent[(s % 60) as usize] += 2;
        }
        assert_eq!(p.rate_per_second(29_000_000_000), 1.0);
        assert_eq!(p.rate_per_second(200_000_000_000), 0.0);
    }
}
